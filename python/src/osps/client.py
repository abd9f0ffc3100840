"""Clients of an OSPS dispatcher (docs/PROTOCOL.md).

    import osps

    with osps.connect("default") as c:          # an instance name, like osps-client
        digest = c.call("sha256", b"hello")
        c.call("sleep", b"", "10")             # arguments after the payload
        report = c.status()

    rc = osps.RetryingClient(instance="default")  # survives dispatcher restarts
    rc.call("parse", data)

`Client` is one connection (not thread-safe: use one per thread); it also
pipelines (`send`, then `recv` or `wait`), and streams a payload from a file
(`call_file`, `send_file`). `Executor` is a `concurrent.futures.Executor`
on a dispatcher: `submit(op, data, *args)` returns a `Future` of the bytes. `RetryingClient` reconnects and
sends again on a lost connection or a `shutting down` answer, like the Rust
`RetryingClient` (PROTOCOL section 14): backoff from 5 ms doubling to 200 ms,
a retry deadline counting only the time spent reconnecting (waiting for an
answer on an open connection does not count), at most 4 sends of one request
whose answer is lost, and, for an instance, no waiting once its socket and
lock file are both gone after a start grace of 2 s.
"""

import concurrent.futures
import ipaddress
import json
import os
import pwd
import select
import socket
import struct
import threading
import time
from typing import (Any, BinaryIO, Callable, Dict, Iterable, Iterator, List, Optional, Set, Tuple,
                    TypeVar, Union)

from . import _wire as wire
from .errors import (ConnectionLost, HelloRefused, JobCancelledError, OspsConnectionError, OspsError,
                     ProtocolError, RemoteError, ResentError, CallTimeout, ShuttingDownError, TooLargeError, UntrustedServer)

Payload = Union[bytes, bytearray, memoryview]
T = TypeVar("T")

COALESCE = 16 * 1024  # payloads up to this go out in the same write as their header
SEND_CHUNK = 256 * 1024  # larger ones in chunks, looking for an early answer between them
HANDSHAKE_TIMEOUT = 10.0
MAX_SENDS = 4
DEFAULT_INSTANCE = "default"


# --- where the dispatcher is (PROTOCOL section 2) ------------------------------

def runtime_base(runtime_dir: Optional[str] = None) -> str:
    """The base runtime directory: `runtime_dir`, else $OSPS_RUNTIME_DIR, else
    $XDG_RUNTIME_DIR/osps, else /tmp/osps-<uid>."""
    if runtime_dir:
        return runtime_dir
    base = os.environ.get("OSPS_RUNTIME_DIR")
    if base:
        return base
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    return os.path.join(xdg, "osps") if xdg else f"/tmp/osps-{os.getuid()}"


def validate_instance(name: str) -> None:
    ok = (0 < len(name) <= 48 and name[0] not in ".-"
          and all(c.isascii() and (c.isalnum() or c in "_.-") for c in name))
    if not ok:
        raise ValueError(f"invalid instance name {name!r}: use 1 to 48 characters from "
                         "[A-Za-z0-9_.-], not starting with '.' or '-'")


def instance_paths(instance: Optional[str] = None, runtime_dir: Optional[str] = None) -> Tuple[str, str]:
    """(socket path, lock file path) of an instance (default: $OSPS_INSTANCE, else "default")."""
    instance = instance or os.environ.get("OSPS_INSTANCE") or DEFAULT_INSTANCE
    validate_instance(instance)
    d = os.path.join(runtime_base(runtime_dir), instance)
    return os.path.join(d, f"{instance}.sock"), os.path.join(d, f"{instance}.lock")


def load_token(path: str) -> bytes:
    """Reads a token file as the Rust tools do (PROTOCOL 3.1): mode 0600 or
    stricter, owned by this user, 16 to 256 bytes once trailing whitespace is cut."""
    st = os.stat(path)
    if st.st_mode & 0o077:
        raise ValueError(f"token file {path}: mode {st.st_mode & 0o7777:04o} is readable by others; chmod 600")
    if st.st_uid != os.geteuid():
        raise ValueError(f"token file {path}: owned by uid {st.st_uid}, not by this user")
    with open(path, "rb") as f:
        token = f.read(wire.MAX_TOKEN_LEN + 64).rstrip(b" \t\n\r\x0c")
    if not 16 <= len(token) <= wire.MAX_TOKEN_LEN:
        raise ValueError(f"token file {path}: a token is 16 to {wire.MAX_TOKEN_LEN} bytes, not {len(token)}")
    return token


# --- who serves us (PROTOCOL section 3.2) --------------------------------------

def _trusted_uids(extra: Iterable[int]) -> Set[int]:
    uids = {os.getuid(), 0, *extra}
    env = os.environ.get("OSPS_SERVER_UID")
    if env:
        uids.add(int(env) if env.isdigit() else pwd.getpwnam(env).pw_uid)
    return uids


def _proc_addr(text: str) -> Tuple[str, int]:
    addr, port = text.split(":")
    raw = b"".join(struct.pack("=I", int(addr[i:i + 8], 16)) for i in range(0, len(addr), 8))
    ip = socket.inet_ntop(socket.AF_INET if len(raw) == 4 else socket.AF_INET6, raw)
    return _unmapped(ip), int(port, 16)


def _unmapped(ip: str) -> str:
    return ip[7:] if ip.startswith("::ffff:") else ip


def _tcp_server_uid(sock: socket.socket) -> Optional[int]:
    """The uid owning the server's side of a local TCP connection (/proc/net/tcp*)."""
    ours = (_unmapped(sock.getsockname()[0]), sock.getsockname()[1])
    theirs = (_unmapped(sock.getpeername()[0]), sock.getpeername()[1])
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                rows = f.read().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            f = row.split()
            if len(f) > 7 and _proc_addr(f[1]) == theirs and _proc_addr(f[2]) == ours:
                return int(f[7])
    return None


def _verify_server(sock: socket.socket, where: str, accept: Iterable[int]) -> None:
    if sock.family == socket.AF_UNIX:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        uid: Optional[int] = struct.unpack("3i", creds)[1]
    else:
        uid = _tcp_server_uid(sock)
        if uid is None:
            ip = ipaddress.ip_address(sock.getpeername()[0])
            mapped = getattr(ip, "ipv4_mapped", None)
            if not (mapped or ip).is_loopback:
                return  # another host: only a secure tunnel can vouch for it
            raise UntrustedServer(f"refusing to talk to {where}: cannot tell which user serves it")
    if uid not in _trusted_uids(accept):
        raise UntrustedServer(
            f"refusing to talk to {where}: it is served by uid {uid}, not by us (uid {os.getuid()}) "
            f"or root; if that user runs your dispatcher, set OSPS_SERVER_UID={uid}")


# --- one connection ------------------------------------------------------------

FileArg = Union[str, bytes, "os.PathLike[str]", BinaryIO]


class _FileShrank(Exception):
    pass


def _file_chunks(f: BinaryIO, header: bytes, size: int) -> Iterator[Payload]:
    """The header, then `size` bytes of `f` in chunks read into one reused
    buffer (each is sent before the next is read)."""
    if size <= COALESCE:
        data = f.read(size) if size else b""
        if len(data) < size:
            raise _FileShrank(f"the file ended {size - len(data)} bytes early")
        yield header + data
        return
    yield header
    buf = memoryview(bytearray(SEND_CHUNK))
    left = size
    while left:
        n = f.readinto(buf[:min(left, SEND_CHUNK)])  # type: ignore[attr-defined]
        if not n:
            raise _FileShrank(f"the file ended {left} bytes early")
        yield buf[:n]
        left -= n

class Endpoint:
    """Where a dispatcher listens: a Unix socket path, or a TCP address with
    an optional token; `lock_file` (an instance's) tells a dead instance."""

    def __init__(self, socket_path: Optional[str] = None, tcp: Optional[Tuple[str, int]] = None,
                 token: Optional[bytes] = None, lock_file: Optional[str] = None,
                 accept: Iterable[int] = ()) -> None:
        if (socket_path is None) == (tcp is None):
            raise ValueError("an endpoint is a socket path or a TCP address")
        self.socket_path = socket_path
        self.tcp = tcp
        self.token = token
        self.lock_file = lock_file
        self.accept = tuple(accept)

    @classmethod
    def resolve(cls, instance: Optional[str] = None, *, socket_path: Optional[str] = None,
                tcp: Optional[str] = None, token: Optional[bytes] = None,
                token_file: Optional[str] = None, runtime_dir: Optional[str] = None,
                accept: Iterable[int] = ()) -> "Endpoint":
        """An instance name (the default), a socket path, or TCP "HOST:PORT"."""
        if token_file is not None:
            token = load_token(token_file)
        if tcp is not None:
            host, _, port = tcp.rpartition(":")
            return cls(tcp=(host.strip("[]"), int(port)), token=token, accept=accept)
        if socket_path is not None:
            return cls(socket_path=socket_path, accept=accept)
        sock, lock = instance_paths(instance, runtime_dir)
        return cls(socket_path=sock, lock_file=lock, accept=accept)

    def __str__(self) -> str:
        if self.tcp is not None:
            return f"tcp:{self.tcp[0]}:{self.tcp[1]}"
        return f"unix:{self.socket_path}"

    def open(self, timeout: Optional[float]) -> "Client":
        """Connects, checks who serves it, and does the handshake, each within `timeout`."""
        where = str(self)
        if self.tcp is not None:
            s = socket.create_connection(self.tcp, timeout=timeout)
        else:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(timeout)
            try:
                s.connect(self.socket_path)  # type: ignore[arg-type]
            except BaseException:
                s.close()
                raise
        try:
            _verify_server(s, where, self.accept)
            if self.tcp is not None:
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            c = Client(s, where)
            c._hello(self.token)
            s.settimeout(None)
        except BaseException:
            s.close()
            raise
        return c


class Client:
    """One connection to a dispatcher. Not thread-safe: one per thread.

    Use `connect()` to make one. `call(op, data, *args)` runs an operation
    and returns its result bytes, or raises the `RemoteError` subclass of
    the dispatcher's answer.
    """

    def __init__(self, sock: socket.socket, endpoint: str = "") -> None:
        self.sock = sock
        self.endpoint = endpoint
        self._rfile = sock.makefile("rb", buffering=64 * 1024)
        self._next_id = 1
        self._early: Dict[int, Union[bytes, RemoteError]] = {}
        #: Requests sent whole on this connection (what `RetryingClient` counts).
        self.sent_whole = 0

    def close(self) -> None:
        try:
            self._rfile.close()
        finally:
            self.sock.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def settimeout(self, timeout: Optional[float]) -> None:
        """Bounds each read and write (None: wait as long as the server takes)."""
        self.sock.settimeout(timeout)

    def _hello(self, token: Optional[bytes]) -> None:
        try:
            self.sock.sendall(wire.encode_opening(token))
            answer = self._rfile.read(wire.HELLO_LEN) or b""
        except (ConnectionResetError, BrokenPipeError, ConnectionAbortedError):
            raise ConnectionLost(f"{self.endpoint} closed the connection without answering the hello "
                                 "(busy or restarting)") from None
        if not answer:
            raise ConnectionLost(f"{self.endpoint} closed the connection without answering the hello "
                                 "(busy or restarting)")
        decoded = wire.decode_hello(answer) if len(answer) == wire.HELLO_LEN else None
        if decoded is None:
            text = (answer + (self._rfile.read(512) or b"")).decode("utf-8", "replace").strip()
            raise ProtocolError(f"{self.endpoint} is not an OSPS dispatcher (it answered {text!r})")
        _version, status = decoded
        if status != wire.HELLO_ACCEPTED:
            line = (self._rfile.read(1024) or b"").decode("utf-8", "replace").strip()
            raise HelloRefused(status, line)

    def _read_exact(self, n: int) -> bytes:
        try:
            data = self._rfile.read(n)
        except (ConnectionResetError, ConnectionAbortedError) as e:
            raise ConnectionLost(f"connection to {self.endpoint} lost: {e}") from None
        if data is None or len(data) < n:
            got = 0 if data is None else len(data)
            raise ConnectionLost(f"{self.endpoint} closed the connection after {got} of {n} bytes")
        return data

    def send(self, op: str, data: Payload = b"", *args: str) -> int:
        """Sends one request without waiting for its answer; returns its id.

        Between chunks of a large payload it looks for answers: a `too
        large` answer to this request (or one about the connection, id 0)
        stops the sending and is raised at once; others are kept for
        `recv`/`wait`. A write that fails because the server closed raises
        the server's answer when it sent one.
        """
        view = memoryview(data).cast("B") if not isinstance(data, bytes) else memoryview(data)
        req_id, header = self._next_request(op, args, len(view))
        if len(view) <= COALESCE:
            chunks: List[Payload] = [header + bytes(view)]
        else:
            chunks = [header] + [view[i:i + SEND_CHUNK] for i in range(0, len(view), SEND_CHUNK)]
        return self._send_chunks(req_id, chunks)

    def send_file(self, op: str, file: FileArg, *args: str) -> int:
        """`send` with the payload read from `file` as it goes out: a path
        (opened and closed here), or a seekable binary file, whose payload is
        what lies from its position to its end. The file is read in chunks
        of 256 KiB into one buffer, never whole. A file that ends before
        the size it had when the header went out raises `ValueError` and
        closes this connection (its request was cut short)."""
        if isinstance(file, (str, bytes, os.PathLike)):
            with open(file, "rb") as f:
                return self.send_file(op, f, *args)
        start = file.tell()
        size = file.seek(0, os.SEEK_END) - start
        file.seek(start)
        req_id, header = self._next_request(op, args, size)
        try:
            return self._send_chunks(req_id, _file_chunks(file, header, size))
        except _FileShrank as e:
            self.close()
            raise ValueError(f"{e}; the request was cut short and the connection closed") from None

    def _next_request(self, op: str, args: Tuple[str, ...], length: int) -> Tuple[int, bytes]:
        req_id = self._next_id
        self._next_id += 1
        return req_id, wire.encode_frame(wire.encode_request(req_id, op, [str(a) for a in args], length))

    def _send_chunks(self, req_id: int, chunks: Iterable[Payload]) -> int:
        for chunk in chunks:
            while select.select([self.sock], [], [], 0)[0]:
                self._take_answer(req_id)
            try:
                self.sock.sendall(chunk)
            except (BrokenPipeError, ConnectionResetError, ConnectionAbortedError) as e:
                answer = self._answer_after_write_failure(req_id)
                if answer is not None:
                    raise answer from None
                raise ConnectionLost(f"connection to {self.endpoint} lost while sending: {e}") from None
        self.sent_whole += 1
        return req_id

    def _take_answer(self, req_id: int) -> None:
        rid, result = self._recv_fresh()
        if isinstance(result, RemoteError) and (
                rid == 0 or (rid == req_id and isinstance(result, TooLargeError))):
            raise result
        self._early[rid] = result

    def _answer_after_write_failure(self, req_id: int, within: float = 1.0) -> Optional[RemoteError]:
        old = self.sock.gettimeout()
        self.sock.settimeout(within)
        try:
            for _ in range(1024):
                self._take_answer(req_id)
        except RemoteError as e:
            return e
        except (OSError, ProtocolError):
            pass
        finally:
            try:
                self.sock.settimeout(old)
            except OSError:
                pass
        result = self._early.pop(req_id, None)
        return result if isinstance(result, RemoteError) else None

    def _recv_fresh(self) -> Tuple[int, Union[bytes, RemoteError]]:
        prefix = self._read_exact(wire.PREFIX_LEN)
        n = int.from_bytes(prefix, "little")
        if n > wire.MAX_FRAME:
            raise ProtocolError(f"reply frame of {n} bytes exceeds {wire.MAX_FRAME}")
        req_id, error, result_len = wire.decode_response(self._read_exact(n))
        if error is not None:
            return req_id, error
        return req_id, self._read_exact(result_len)

    def recv(self) -> Tuple[int, Union[bytes, RemoteError]]:
        """The next answer, whatever its id: (id, result bytes or the RemoteError)."""
        if self._early:
            req_id = next(iter(self._early))
            return req_id, self._early.pop(req_id)
        return self._recv_fresh()

    def wait(self, req_id: int) -> bytes:
        """The answer to `req_id` (others are kept); raises its RemoteError."""
        while True:
            if req_id in self._early:
                rid, result = req_id, self._early.pop(req_id)
            else:
                rid, result = self._recv_fresh()
            if rid == req_id or (rid == 0 and isinstance(result, RemoteError)):
                if isinstance(result, RemoteError):
                    raise result
                return result
            self._early[rid] = result

    def call(self, op: str, data: Payload = b"", *args: str) -> bytes:
        """Runs `op` on `data` with string `args`; returns the result bytes."""
        return self.wait(self.send(op, data, *args))

    def send_cancel(self, req_id: int) -> int:
        """Sends a `cancel` of request `req_id` (sent on this connection,
        its answer not yet received) without waiting; returns the cancel's
        own id. A queued job is taken off its queue, a running one's worker
        killed and replaced; the request is answered `JobCancelledError`.
        Its answer always comes before the cancel's, whose result is
        `b"cancelled\\n"`, or `b"not found\\n"` when the request was not
        pending (answered already, or answered otherwise meanwhile). Only
        this connection can cancel its requests (PROTOCOL section 8)."""
        return self.send(wire.OP_CANCEL, b"", str(req_id))

    def cancel(self, req_id: int) -> bool:
        """Cancels request `req_id` (see `send_cancel`) and waits for the
        cancel's answer: True when the request was cancelled, False when it
        was not pending. Either way its own answer has arrived by then and
        is kept for `wait`/`recv` (`JobCancelledError` when this is True)."""
        got = self.wait(self.send_cancel(req_id))
        if got == wire.CANCEL_DONE:
            return True
        if got == wire.CANCEL_NOT_FOUND:
            return False
        raise ProtocolError(f"cancel answered {got!r}")

    def _cancel_frame(self, req_id: int) -> Tuple[int, bytes]:
        """An id and the whole frame of a `cancel` of `req_id`, for another
        thread to send while this client waits (`_CallFuture.cancel`)."""
        return self._next_request(wire.OP_CANCEL, (str(req_id),), 0)

    def call_file(self, op: str, file: FileArg, *args: str) -> bytes:
        """`call` with the payload streamed from `file` (see `send_file`):
        a file of any size up to the dispatcher's `--max-payload` goes out
        without being read into memory whole."""
        return self.wait(self.send_file(op, file, *args))

    def status(self) -> Dict[str, Any]:
        """The dispatcher's status report (PROTOCOL section 7)."""
        return json.loads(self.call("status").decode("utf-8"))  # type: ignore[no-any-return]

    def ping(self) -> None:
        got = self.call("ping")
        if got != b"pong\n":
            raise ProtocolError(f"ping answered {got!r}")


def connect(instance: Optional[str] = None, *, socket_path: Optional[str] = None,
            tcp: Optional[str] = None, token: Optional[bytes] = None,
            token_file: Optional[str] = None, runtime_dir: Optional[str] = None,
            timeout: Optional[float] = HANDSHAKE_TIMEOUT, accept: Iterable[int] = ()) -> Client:
    """A connected `Client`: to an instance by name (default: $OSPS_INSTANCE,
    else "default"; its socket found as PROTOCOL section 2 says), to a
    `socket_path`, or to `tcp` "HOST:PORT" (with `token` or `token_file`
    when the port wants one). `timeout` bounds the connect and handshake;
    the client then waits for answers as long as the server takes.
    `accept`: uids besides ours and root that may serve us."""
    ep = Endpoint.resolve(instance, socket_path=socket_path, tcp=tcp, token=token,
                          token_file=token_file, runtime_dir=runtime_dir, accept=accept)
    try:
        return ep.open(timeout)
    except (FileNotFoundError, ConnectionRefusedError) as e:
        raise OspsConnectionError(e.errno, f"cannot connect to {ep}: {e.strerror}") from None


# --- retries (PROTOCOL section 14) --------------------------------------------

def _is_connect_failure(e: BaseException) -> bool:
    """A connect that found nobody (no socket, refused): a dispatcher may be coming."""
    return isinstance(e, (FileNotFoundError, ConnectionRefusedError))


def _is_retryable(e: BaseException) -> bool:
    if isinstance(e, RemoteError):
        return isinstance(e, ShuttingDownError)
    if isinstance(e, HelloRefused):
        return e.status == wire.HELLO_REFUSED
    if isinstance(e, (ConnectionLost, ConnectionError, FileNotFoundError, socket.timeout)):
        return True
    return False


class _Run:
    """Where one `RetryingClient` call stands: its clock and what it has seen."""

    def __init__(self, first_delay: float, overall: Optional[float]) -> None:
        self.start = time.monotonic()
        self.ends = None if overall is None else self.start + overall
        self.answering = 0.0  # spent waiting for answers, not reconnecting
        self.delay = first_delay
        self.sends = 0
        self.last_answer: Optional[BaseException] = None

    def reconnecting(self, now: float) -> float:
        return now - self.start - self.answering

    def overall_left(self, now: float) -> Optional[float]:
        return None if self.ends is None else max(self.ends - now, 0.001)


class RetryingClient:
    """A client that reconnects and sends again, so a dispatcher restart
    costs the caller only latency. Delivery is at least once: a request
    whose connection was lost may have run (PROTOCOL section 14).

    `deadline`: seconds spent reconnecting (not waiting for answers) after
    which a call gives up; `overall`: when set, the whole call's bound;
    `start_grace`: for an instance, how long a missing socket and lock file
    are taken for a dispatcher still starting. Not thread-safe.
    """

    def __init__(self, instance: Optional[str] = None, *, socket_path: Optional[str] = None,
                 tcp: Optional[str] = None, token: Optional[bytes] = None,
                 token_file: Optional[str] = None, runtime_dir: Optional[str] = None,
                 deadline: float = 10.0, first_delay: float = 0.005, max_delay: float = 0.2,
                 overall: Optional[float] = None, start_grace: float = 2.0,
                 accept: Iterable[int] = ()) -> None:
        self.endpoint = Endpoint.resolve(instance, socket_path=socket_path, tcp=tcp, token=token,
                                         token_file=token_file, runtime_dir=runtime_dir, accept=accept)
        self.deadline = deadline
        self.first_delay = first_delay
        self.max_delay = max_delay
        self.overall = overall
        self.start_grace = start_grace
        self._client: Optional[Client] = None
        #: Attempts that failed and were retried, since creation.
        self.retries = 0

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    def __enter__(self) -> "RetryingClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def call(self, op: str, data: Payload = b"", *args: str) -> bytes:
        """`Client.call`, with reconnection and resends."""
        return self.run(lambda c: c.call(op, data, *args))

    def call_file(self, op: str, file: FileArg, *args: str) -> bytes:
        """`Client.call_file`, with reconnection and resends: each send
        reads the file again from where it stood at the call (a path is
        opened once; a file object must be seekable)."""
        if isinstance(file, (str, bytes, os.PathLike)):
            with open(file, "rb") as f:
                return self.call_file(op, f, *args)
        start = file.tell()

        def attempt(c: Client) -> bytes:
            file.seek(start)
            return c.call_file(op, file, *args)
        return self.run(attempt)

    def status(self) -> Dict[str, Any]:
        return self.run(Client.status)

    def run(self, attempt: Callable[[Client], T]) -> T:
        """Runs `attempt` on a connected client until it succeeds, fails for a
        reason a retry cannot cure, or the retry deadline passes."""
        run = _Run(self.first_delay, self.overall)
        while True:
            try:
                return self._attempt_once(run, attempt)
            except Exception as e:  # noqa: BLE001 - sorted out just below
                if not (isinstance(e, RemoteError) and not isinstance(e, ShuttingDownError)):
                    self.close()  # its state is unknown; a resend goes to a new connection
                self._retry_after(run, e)
            self.retries += 1
            time.sleep(run.delay)
            run.delay = min(run.delay * 2, self.max_delay)

    def _attempt_once(self, run: _Run, attempt: Callable[[Client], T]) -> T:
        now = time.monotonic()
        left = run.overall_left(now)
        if self._client is None:
            budget = max(0.001, min(self.deadline - run.reconnecting(now),
                                    left if left is not None else HANDSHAKE_TIMEOUT,
                                    HANDSHAKE_TIMEOUT))
            self._client = self.endpoint.open(budget)
        c = self._client
        t = time.monotonic()
        before = c.sent_whole
        answered = False
        try:
            c.settimeout(left)
            result = attempt(c)
            answered = True
            return result
        except RemoteError:
            answered = True  # an answer (even `shutting down`) does not count as a lost send
            raise
        finally:
            run.answering += time.monotonic() - t
            if c.sent_whole > before and not answered:
                run.sends += 1

    def _retry_after(self, run: _Run, e: Exception) -> None:
        """Returns to retry after `run.delay`, or raises what the call ends with."""
        now = time.monotonic()
        if isinstance(e, socket.timeout) and run.ends is not None and now + 0.001 >= run.ends:
            raise CallTimeout(f"no answer from {self.endpoint} within {self.overall} s") from e
        lock = self.endpoint.lock_file
        no_lock = _is_connect_failure(e) and lock is not None and not os.path.exists(lock)
        grace_left = max(0.0, self.start_grace - (now - run.start))
        if (no_lock and grace_left == 0) or not _is_retryable(e):
            self._give_up(run, e)
        if isinstance(e, (RemoteError, HelloRefused)):
            run.last_answer = e
        if run.sends >= MAX_SENDS:
            raise ResentError(run.sends, e) from e
        left = self.deadline - run.reconnecting(now)
        if run.ends is not None:
            left = min(left, run.ends - now)
        if run.delay >= left:
            if isinstance(e, socket.timeout):
                raise CallTimeout(f"no answer from {self.endpoint} within {self.overall} s") from e
            self._give_up(run, e)

    def _give_up(self, run: _Run, e: Exception) -> None:
        """Raises `e`, or the server's last answer when `e` only says a connect failed."""
        if run.last_answer is not None and (_is_connect_failure(e) or isinstance(e, ConnectionLost)):
            raise run.last_answer from e
        if _is_connect_failure(e) and isinstance(e, OSError):
            raise OspsConnectionError(e.errno, f"cannot connect to {self.endpoint}: {e.strerror}") from e
        raise e


# --- a concurrent.futures face ------------------------------------------------

class Executor(concurrent.futures.Executor):
    """A `concurrent.futures.Executor` whose calls run on a dispatcher:
    `submit(op, data, *args)` returns a `Future` of the result bytes, and
    `map(op, datas)` (from the base class) yields results in order.

        with osps.Executor("default", max_workers=8) as ex:
            digests = list(ex.map("sha256", blobs))
            f = ex.submit("parse", data, "strict")
            f.result()                      # bytes, or raises the typed error

    It is meant as a drop-in for code written against `ProcessPoolExecutor`
    (`submit`, `map`, `as_completed`, `wait`, `shutdown`, `with`), minus
    its failure modes: a call that crashes its worker fails only its own
    future (`WorkerCrashedError`, after the pool's `max_attempts`), never
    the pending ones (no `BrokenProcessPool`), and a dispatcher restart
    costs latency, not errors.

    Why threads each with its own `RetryingClient` rather than one
    pipelining connection: each call gets the retrying client's full rules
    (reconnect, resend, deadlines) on its own, so a lost connection or a
    failed send touches one call and not every call in flight on a shared
    socket; the threads wait on sockets with the GIL released, so N of them
    keep N calls in flight; and no reader thread has to demultiplex answers.
    A pipelined connection saves threads, which matters little at the
    concurrency an executor is given (`max_workers`, default as
    `ThreadPoolExecutor`'s). Connections are opened lazily, one per thread
    that runs a call, and `shutdown` closes them.

    The options are `RetryingClient`'s (`instance`, `socket_path`, `tcp`,
    `token_file`, `deadline`, `overall`, ...). A payload is not copied at
    `submit`: do not change a bytearray until its future is done.
    """

    def __init__(self, instance: Optional[str] = None, *, max_workers: Optional[int] = None,
                 **options: Any) -> None:
        RetryingClient(instance, **options).close()  # bad options fail here, not in a future
        self._instance = instance
        self._options = options
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers, thread_name_prefix="osps")
        self._local = threading.local()
        self._lock = threading.Lock()
        self._clients: List[RetryingClient] = []

    def _client(self) -> RetryingClient:
        rc: Optional[RetryingClient] = getattr(self._local, "client", None)
        if rc is None:
            rc = RetryingClient(self._instance, **self._options)
            self._local.client = rc
            with self._lock:
                self._clients.append(rc)
        return rc

    def _call(self, fut: "_CallFuture", op: str, data: Payload, args: Tuple[str, ...]) -> None:
        if not fut.set_running_or_notify_cancel():
            return
        try:
            result = self._client().run(lambda c: fut._attempt(c, op, data, args))
        except BaseException as e:  # noqa: BLE001 - the future carries it
            fut.set_exception(e)
        else:
            fut.set_result(result)

    def submit(self, op: str, data: Payload = b"", *args: str) -> "concurrent.futures.Future[bytes]":  # type: ignore[override]
        """Schedules `op` on `data` with `args`; the future's result is the
        result bytes, or its exception the typed error of the answer.
        `cancel()` of a call not started yet cancels it (True, as
        `concurrent.futures` does); of a running call, it sends a `cancel`
        to the dispatcher and returns False: the future then ends with
        `JobCancelledError` (or with its result, if that came first)."""
        fut = _CallFuture()
        inner = self._pool.submit(self._call, fut, op, data, args)
        # shutdown(cancel_futures=True) cancels the pool's future: ours too.
        inner.add_done_callback(lambda f: fut.cancel() if f.cancelled() else None)
        return fut

    def _close_clients(self) -> None:
        with self._lock:
            clients, self._clients = self._clients, []
        for rc in clients:
            rc.close()

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """As `concurrent.futures.Executor.shutdown`; the connections are
        closed once the running calls are done (at once with `wait`, else
        by a background thread)."""
        self._pool.shutdown(wait=wait, cancel_futures=cancel_futures)
        if wait:
            self._close_clients()
        else:
            threading.Thread(target=lambda: (self._pool.shutdown(wait=True), self._close_clients()),
                             name="osps-executor-close", daemon=True).start()


class _CallFuture(concurrent.futures.Future):  # type: ignore[type-arg]
    """A future of `Executor.submit`: `cancel()` of a running call sends a
    `cancel` of it on its connection (from the caller's thread, while the
    call's thread waits for the answer: the frame is made by the owner, the
    lock keeps the two writers apart)."""

    def __init__(self) -> None:
        super().__init__()
        self._guard = threading.Lock()
        #: While the call waits for its answer: its client and the cancel to send.
        self._target: Optional[Tuple[Client, int, bytes]] = None
        #: The cancel sent on the current connection, by id.
        self._cancel_sent: Optional[int] = None
        #: A cancel was asked for while the call ran (a resend is not made).
        self._cancel_wanted = False

    def cancel(self) -> bool:
        if super().cancel():
            return True
        with self._guard:
            if self.done():
                return False
            self._cancel_wanted = True
            if self._target is not None and self._cancel_sent is None:
                client, cancel_id, frame = self._target
                try:
                    client.sock.sendall(frame)
                    self._cancel_sent = cancel_id
                except OSError:
                    pass  # the connection is going: the call ends without us
        return False

    def _attempt(self, c: Client, op: str, data: Payload, args: Tuple[str, ...]) -> bytes:
        """One attempt of the call on `c`, cancellable once sent whole."""
        with self._guard:
            if self._cancel_wanted:
                raise JobCancelledError("cancelled by the client before it was sent again")
        req_id = c.send(op, data, *args)
        cancel_id, frame = c._cancel_frame(req_id)
        with self._guard:
            self._target = (c, cancel_id, frame)
            if self._cancel_wanted:  # asked for while the request went out
                c.sock.sendall(frame)
                self._cancel_sent = cancel_id
        try:
            return c.wait(req_id)
        finally:
            with self._guard:
                self._target, sent, self._cancel_sent = None, self._cancel_sent, None
            if sent is not None:
                try:
                    c.wait(sent)  # its answer, right behind the request's: keep in step
                except (OSError, OspsError):
                    pass
