"""inferd.client: the library applications import. It needs numpy, msgpack, blake3, posix_ipc and
Pillow, never torch (a torch tensor is accepted when torch is there) nor inferd.daemon.

    from inferd.client import Client                  # threads and scripts
    with Client() as c:
        print(c.classify(image))

    from inferd.client import AsyncClient             # asyncio programs
    async with AsyncClient() as c:
        print(await c.classify(image))
"""
from .admin import AdminClient
from .aio import AsyncClient
from .client import Client, ModelInfo, NearDuplicate, Prediction, Predictions
from .errors import (DaemonUnavailable, DeadlineExceeded, InferdError, InferenceFailed,
                     InvalidInput, NoHealthyDevice, Overloaded, PermissionDenied, ProtocolError,
                     ReloadFailed, ShuttingDown, UnknownModel)

__all__ = ["Client", "AsyncClient", "AdminClient", "ReloadFailed", "ModelInfo", "Prediction", "Predictions",
           "NearDuplicate", "InferdError", "DaemonUnavailable", "ShuttingDown", "ProtocolError",
           "InvalidInput", "Overloaded", "DeadlineExceeded", "PermissionDenied", "InferenceFailed",
           "NoHealthyDevice", "UnknownModel"]
