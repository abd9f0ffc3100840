"""Exceptions of the OSPS package.

`RemoteError` is an error the dispatcher answered; it has one subclass per
error kind of docs/PROTOCOL.md section 6 (the wire carries the kind's index,
`RemoteError.kind`), so callers can catch what they can act on:

    try:
        client.call("parse", data)
    except osps.InvalidInputError as e:
        ...

An index this package does not know (a newer dispatcher) is a plain
`RemoteError`. Failures of the connection itself are `OspsConnectionError`
(also an `OSError`), a peer that breaks the protocol `ProtocolError`.
"""

from typing import Dict, Optional, Type


class OspsError(Exception):
    """Base of every exception this package raises."""


class ProtocolError(OspsError):
    """The peer broke the protocol or is not an OSPS dispatcher."""


class OspsConnectionError(OspsError, OSError):
    """The dispatcher could not be reached, or the connection was lost."""


class ConnectionLost(OspsConnectionError):
    """The connection closed or broke before the answer (a `RetryingClient`
    sends the request again)."""


class HelloRefused(OspsConnectionError):
    """The dispatcher answered the hello with a refusal (`status` is the code:
    1 version unsupported, 2 refused because full, 3 denied)."""

    def __init__(self, status: int, line: str) -> None:
        self.status = status
        self.line = line
        what = {1: "version unsupported", 2: "refused", 3: "denied"}.get(status, f"status {status}")
        super().__init__(f"connection {what}: {line}")


class UntrustedServer(OspsError):
    """The socket or port is served by a user we do not trust: nothing was sent."""


class ResentError(OspsError):
    """A `RetryingClient` sent the request 4 times (`MAX_SENDS`) and lost the
    connection before each answer: it is not sent again, since each send may
    have run it."""

    def __init__(self, sends: int, last: BaseException) -> None:
        self.sends = sends
        self.last = last
        super().__init__(
            f"sent the request {sends} times without getting its answer; not sending it again, "
            f"as it may have run each time (last: {last})")


class CallTimeout(OspsError):
    """No answer within the caller's `overall` time."""


class RemoteError(OspsError):
    """The dispatcher answered a request with an error.

    Raise a subclass in a worker's operation (`osps.worker`) to answer that
    kind: `raise osps.InvalidInputError("no header")`.
    """

    #: The error kind's index on the wire (docs/PROTOCOL.md section 6).
    KIND = 8
    #: The kind's short stable name, as the Rust CLI prints it.
    NAME = "internal error"

    def __init__(self, message: str, req_id: Optional[int] = None, kind: Optional[int] = None) -> None:
        self.kind: int = self.KIND if kind is None else kind
        self.message = message
        self.req_id = req_id
        super().__init__(f"{self.kind_name}: {message}")

    @property
    def kind_name(self) -> str:
        cls = BY_KIND.get(self.kind)
        return cls.NAME if cls is not None else f"error kind {self.kind}"

    @staticmethod
    def of_kind(kind: int, message: str, req_id: Optional[int] = None) -> "RemoteError":
        """The exception of the class for `kind` (a plain RemoteError for a kind unknown here)."""
        return BY_KIND.get(kind, RemoteError)(message, req_id, kind)


class BadRequestError(RemoteError):
    """A request frame that cannot be decoded, or `status` with a payload."""

    KIND = 0
    NAME = "bad request"


class UnknownOpError(RemoteError):
    """No pool serves an operation of that name."""

    KIND = 1
    NAME = "unknown operation"


class TooLargeError(RemoteError):
    """The payload, or the job's result, is over its limit."""

    KIND = 2
    NAME = "too large"


class JobTimeoutError(RemoteError):
    """The job ran past its timeout; its worker was killed and replaced."""

    KIND = 3
    NAME = "timeout"


class WorkerCrashedError(RemoteError):
    """The worker died running the job, on each of its attempts."""

    KIND = 4
    NAME = "worker crashed"


class FaultInjectionDisabledError(RemoteError):
    """A fault-injecting operation, on a dispatcher that does not allow them."""

    KIND = 5
    NAME = "fault injection disabled"


class ShuttingDownError(RemoteError):
    """The dispatcher is stopping (a `RetryingClient` sends again)."""

    KIND = 6
    NAME = "shutting down"


class InvalidInputError(RemoteError):
    """The operation cannot process its input or arguments."""

    KIND = 7
    NAME = "invalid input"


class InternalError(RemoteError):
    """A failure inside the server, or an operation's unexpected exception."""

    KIND = 8
    NAME = "internal error"


class CommandFailedError(RemoteError):
    """A command pool's command exited non-zero or was killed."""

    KIND = 9
    NAME = "command failed"


class OutOfMemoryError(RemoteError):
    """The job went past its pool's memory limit; not retried."""

    KIND = 10
    NAME = "out of memory"


class JobCancelledError(RemoteError):
    """The request was cancelled by its client (`Client.cancel`): taken off
    the queue, or its worker killed and replaced; not retried.

    Not `concurrent.futures.CancelledError` (nor a subclass of it): that one
    means a future that never ran and whose `cancelled()` is true, and
    `Future.result()` raises it on its own; this is the dispatcher's answer
    to a job it had accepted, an error like any other `RemoteError` (a
    running `osps.Executor` future whose call is cancelled ends with it).
    """

    KIND = 11
    NAME = "cancelled"


class PermissionDeniedError(RemoteError):
    """The peer may not ask this of the dispatcher (e.g. `reload` from
    another uid than the dispatcher's own or root, or over TCP)."""

    KIND = 12
    NAME = "permission denied"


#: The exception class of each error kind, by index.
BY_KIND: Dict[int, Type[RemoteError]] = {c.KIND: c for c in (
    BadRequestError,
    UnknownOpError,
    TooLargeError,
    JobTimeoutError,
    WorkerCrashedError,
    FaultInjectionDisabledError,
    ShuttingDownError,
    InvalidInputError,
    InternalError,
    CommandFailedError,
    OutOfMemoryError,
    JobCancelledError,
    PermissionDeniedError,
)}
