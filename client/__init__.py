"""inferd.client: the library applications import.

    from inferd.client import Client
    with Client() as c:
        print(c.classify(image))
"""
from inferd.client.admin import AdminClient
from inferd.client.client import Client, ModelInfo, NearDuplicate, Prediction
from inferd.client.errors import (DaemonUnavailable, DeadlineExceeded, InferdError, InferenceFailed,
                                  InvalidInput, NoHealthyDevice, Overloaded, PermissionDenied,
                                  ProtocolError, ReloadFailed, ShuttingDown)

__all__ = ["Client", "AdminClient", "ReloadFailed", "ModelInfo", "Prediction", "NearDuplicate", "InferdError", "DaemonUnavailable", "ShuttingDown",
           "ProtocolError", "InvalidInput", "Overloaded", "DeadlineExceeded", "PermissionDenied",
           "InferenceFailed", "NoHealthyDevice"]
