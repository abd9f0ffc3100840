"""OSPS for Python: a client of the OSPS job server (`osps.client`) and an
SDK to write its workers in Python (`osps.worker`). Standard library only.

    import osps
    with osps.connect() as c:                 # the default instance
        print(c.call("sha256", b"hello"))
"""

from .client import Client, Endpoint, Executor, RetryingClient, connect, instance_paths, load_token
from .errors import (BadRequestError, CallTimeout, CommandFailedError, ConnectionLost,
                     FaultInjectionDisabledError, HelloRefused, InternalError, InvalidInputError,
                     JobCancelledError, JobTimeoutError, OspsConnectionError, OspsError, OutOfMemoryError,
                     PermissionDeniedError, ProtocolError, RemoteError, ResentError, ShuttingDownError,
                     TooLargeError,
                     UnknownOpError, UntrustedServer, WorkerCrashedError)

__version__ = "0.1.0"

__all__ = [
    "BadRequestError", "CallTimeout", "Client", "CommandFailedError", "ConnectionLost", "Endpoint",
    "Executor", "FaultInjectionDisabledError", "HelloRefused", "InternalError", "InvalidInputError",
    "JobCancelledError", "JobTimeoutError", "OspsConnectionError", "OspsError", "OutOfMemoryError",
    "PermissionDeniedError", "ProtocolError",
    "RemoteError", "ResentError", "RetryingClient", "ShuttingDownError", "TooLargeError",
    "UnknownOpError", "UntrustedServer", "WorkerCrashedError", "connect", "instance_paths",
    "load_token",
]
