"""inferd.client: the library applications import.

    from inferd.client import Client
    with Client() as c:
        print(c.classify(image))
"""
from inferd.client.client import Client, ModelInfo, NearDuplicate, Prediction
from inferd.client.errors import (DaemonUnavailable, DeadlineExceeded, InferdError, InferenceFailed,
                                  InvalidInput, NoHealthyDevice, Overloaded, PermissionDenied,
                                  ProtocolError, ShuttingDown)

__all__ = ["Client", "ModelInfo", "Prediction", "NearDuplicate", "InferdError", "DaemonUnavailable", "ShuttingDown",
           "ProtocolError", "InvalidInput", "Overloaded", "DeadlineExceeded", "PermissionDenied",
           "InferenceFailed", "NoHealthyDevice"]
