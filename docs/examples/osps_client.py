#!/usr/bin/env python3
"""A standalone OSPS client, Python 3 standard library only.

Written from docs/PROTOCOL.md alone, as a check that the document is enough
to talk to the dispatcher. Section numbers in comments refer to that document.

For programs, prefer the package in python/ (`pip install ./python`,
`import osps`): the same client with typed exceptions and a retrying
client, and an SDK to write workers in Python.

Command line:

    osps_client.py [--socket PATH | --tcp HOST:PORT | --instance NAME] OP [ARGS...]
        Sends OP with ARGS and the bytes of stdin as the payload (no payload
        when stdin is a terminal), writes the result bytes to stdout.
        Exit status: 0 on success; 1 when the server answered with an error
        (printed as "error: <kind name>: <message>" on stderr); 2 when the
        dispatcher could not be reached or broke the protocol.
        Before sending anything, it checks who serves the socket or port
        (section 3.2): our uid, root, or $OSPS_SERVER_UID (a uid or a name);
        the Rust client's checks of the socket's directories are not repeated.

    osps_client.py --socket PATH --selftest
        Runs a series of checks against a running dispatcher; prints
        "selftest ok" and exits 0, or says what failed and exits 1.

As a module:

    with Client.connect_unix("/run/user/1000/osps/default/default.sock") as c:
        digest = c.call("sha256", [], b"hello")
        report = c.status()
"""

import argparse
import hashlib
import ipaddress
import json
import os
import pwd
import select
import socket
import struct
import sys
import time

# --- constants (PROTOCOL.md sections 3, 4 and 11) ---------------------------

MAGIC = b"OSPS"
PROTOCOL_VERSION = 1
HELLO_LEN = 8
HELLO_ACCEPTED = 0
HELLO_VERSION_UNSUPPORTED = 1
HELLO_REFUSED = 2
HELLO_DENIED = 3
HELLO_FLAG_TOKEN = 1  # client hello flag: u16 LE length + token bytes follow
MAX_TOKEN_LEN = 256
PREFIX_LEN = 4
MAX_FRAME = 64 * 1024  # the dispatcher's default; replies are a few bytes anyway
COALESCE = 16 * 1024  # payloads up to this go out in the same write as their header
SEND_CHUNK = 256 * 1024  # larger ones in chunks, looking for an early answer between them

# ErrorKind, by variant index (section 6): (Rust name, name shown to people).
ERROR_KINDS = [
    ("BadRequest", "bad request"),
    ("UnknownOp", "unknown operation"),
    ("TooLarge", "too large"),
    ("Timeout", "timeout"),
    ("WorkerCrashed", "worker crashed"),
    ("FaultInjectionDisabled", "fault injection disabled"),
    ("ShuttingDown", "shutting down"),
    ("InvalidInput", "invalid input"),
    ("Internal", "internal error"),
    ("CommandFailed", "command failed"),
    ("OutOfMemory", "out of memory"),
    ("Cancelled", "cancelled"),
]
KIND_INDEX = {rust: i for i, (rust, _) in enumerate(ERROR_KINDS)}

# Largest varint per integer type, and the largest value its last byte may
# hold (section 5.1: postcard rejects anything else).
VARINT_LIMITS = {"u16": (3, 0x03), "u32": (5, 0x0F), "u64": (10, 0x01)}


class ProtocolError(Exception):
    """The peer broke the protocol, is not an OSPS dispatcher, or went away."""


class RemoteError(Exception):
    """The dispatcher answered a request with an error (Outcome::Err)."""

    def __init__(self, kind, message, req_id=None):
        self.kind = kind  # the variant index
        self.message = message
        self.req_id = req_id
        super().__init__(f"{self.kind_name}: {message}")

    @property
    def kind_rust(self):
        """The Rust variant name, e.g. "UnknownOp" (or "Kind<N>" if unknown to us)."""
        return ERROR_KINDS[self.kind][0] if self.kind < len(ERROR_KINDS) else f"Kind{self.kind}"

    @property
    def kind_name(self):
        """The short stable name, e.g. "unknown operation"."""
        return ERROR_KINDS[self.kind][1] if self.kind < len(ERROR_KINDS) else f"error kind {self.kind}"


# --- postcard primitives (section 5) ----------------------------------------

def encode_varint(n):
    """Unsigned LEB128: 7 bits per byte, least significant first, high bit = more."""
    if n < 0:
        raise ValueError("varints here are unsigned")
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def decode_varint(buf, pos, kind="u64"):
    """Decodes a varint of integer type `kind` at buf[pos]; returns (value, new pos)."""
    max_len, max_last = VARINT_LIMITS[kind]
    value = 0
    for i in range(max_len):
        if pos >= len(buf):
            raise ProtocolError("message ends inside a varint")
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << (7 * i)
        if not b & 0x80:
            if i == max_len - 1 and b > max_last:
                raise ProtocolError(f"varint too large for {kind}")
            return value, pos
    raise ProtocolError(f"varint longer than {max_len} bytes for {kind}")


def encode_string(s):
    data = s.encode("utf-8")
    return encode_varint(len(data)) + data


def decode_string(buf, pos):
    n, pos = decode_varint(buf, pos, "u64")
    if pos + n > len(buf):
        raise ProtocolError("message ends inside a string")
    try:
        return buf[pos:pos + n].decode("utf-8"), pos + n
    except UnicodeDecodeError as e:
        raise ProtocolError(f"string is not UTF-8: {e}") from None


# --- hello (section 3) --------------------------------------------------------

def encode_hello(version=PROTOCOL_VERSION, field=0):
    """The 8 bytes: "OSPS", version u16 LE, then flags (client) / status (server) u16 LE."""
    return MAGIC + version.to_bytes(2, "little") + field.to_bytes(2, "little")


def decode_hello(data):
    """Returns (version, field), or None when the magic is wrong."""
    if len(data) != HELLO_LEN or data[:4] != MAGIC:
        return None
    return int.from_bytes(data[4:6], "little"), int.from_bytes(data[6:8], "little")


# --- messages (section 5.3) ---------------------------------------------------

def encode_request(req_id, op, args, payload_len):
    """Body of a Request: id u64, op String, args Vec<String>, payload_len u64."""
    body = encode_varint(req_id) + encode_string(op) + encode_varint(len(args))
    for a in args:
        body += encode_string(a)
    return body + encode_varint(payload_len)


def encode_frame(body):
    """A frame: body length as u32 little-endian, then the body."""
    return len(body).to_bytes(PREFIX_LEN, "little") + body


def decode_response(body):
    """Decodes a whole Response body.

    Returns (id, error, result_len) where error is None for Outcome::Ok, else
    a RemoteError. Trailing bytes after the message are an error.
    """
    req_id, pos = decode_varint(body, 0, "u64")
    outcome, pos = decode_varint(body, pos, "u32")  # enum variant index
    error = None
    if outcome == 0:  # Outcome::Ok: no fields
        pass
    elif outcome == 1:  # Outcome::Err(RemoteError { kind, message })
        kind, pos = decode_varint(body, pos, "u32")
        message, pos = decode_string(body, pos)
        error = RemoteError(kind, message, req_id)
    else:
        raise ProtocolError(f"unknown Outcome variant {outcome}")
    result_len, pos = decode_varint(body, pos, "u64")
    if pos != len(body):
        raise ProtocolError(f"{len(body) - pos} trailing bytes after the response")
    if error is not None and result_len != 0:
        raise ProtocolError("an error reply announced result bytes")
    return req_id, error, result_len


# --- connection ---------------------------------------------------------------

def default_socket_path(instance=None):
    """<base>/<instance>/<instance>.sock, base as in section 2."""
    instance = instance or os.environ.get("OSPS_INSTANCE") or "default"
    base = os.environ.get("OSPS_RUNTIME_DIR")
    if not base:
        xdg = os.environ.get("XDG_RUNTIME_DIR")
        base = os.path.join(xdg, "osps") if xdg else f"/tmp/osps-{os.getuid()}"
    return os.path.join(base, instance, f"{instance}.sock")


# --- verifying the server (section 3.2) ---------------------------------------

def trusted_uids(extra=()):
    """Our uid, root, and the uids we were told to accept (OSPS_SERVER_UID)."""
    uids = {os.getuid(), 0, *extra}
    env = os.environ.get("OSPS_SERVER_UID")
    if env:
        uids.add(int(env) if env.isdigit() else pwd.getpwnam(env).pw_uid)
    return uids


def unix_server_uid(sock):
    """The uid that listens on a connected Unix socket (SO_PEERCRED)."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", creds)[1]


def _proc_addr(text):
    """/proc/net/tcp{,6} address: 32-bit words in host order, then the port."""
    addr, port = text.split(":")
    raw = b"".join(struct.pack("=I", int(addr[i:i + 8], 16)) for i in range(0, len(addr), 8))
    ip = socket.inet_ntop(socket.AF_INET if len(raw) == 4 else socket.AF_INET6, raw)
    return ip.removeprefix("::ffff:"), int(port, 16)


def tcp_server_uid(sock):
    """The uid owning the server's side of a connected TCP socket, from the
    row of /proc/net/tcp or tcp6 whose local address is the server's and
    remote address ours; None when there is none (another host)."""
    ours, theirs = sock.getsockname()[:2], sock.getpeername()[:2]
    norm = lambda a: (a[0].removeprefix("::ffff:"), a[1])  # noqa: E731
    ours, theirs = norm(ours), norm(theirs)
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


def verify_server(sock, where, accept=()):
    """Raises ProtocolError unless the server is run by a trusted uid (before
    anything is sent: no hello, no token, no payload)."""
    if sock.family == socket.AF_UNIX:
        uid = unix_server_uid(sock)
    else:
        uid = tcp_server_uid(sock)
        if uid is None:
            ip = ipaddress.ip_address(sock.getpeername()[0])
            ip = getattr(ip, "ipv4_mapped", None) or ip  # ::ffff:127.0.0.1 is loopback too
            if not ip.is_loopback:
                return  # another host: only a secure tunnel can vouch for it
            raise ProtocolError(f"refusing to talk to {where}: cannot tell which user serves it")
    if uid not in trusted_uids(accept):
        raise ProtocolError(
            f"refusing to talk to {where}: it is served by uid {uid}, not by us (uid {os.getuid()}) "
            f"or root; if that user runs your dispatcher, set OSPS_SERVER_UID={uid}")


class Client:
    """One connection to a dispatcher. Not thread-safe."""

    def __init__(self, sock):
        self.sock = sock
        self.rfile = sock.makefile("rb", buffering=64 * 1024)
        self.next_id = 1
        self.early = {}  # replies read while waiting for another id

    @classmethod
    def connect_unix(cls, path, timeout=None, accept=()):
        """`accept`: uids besides ours and root that may serve us (section 3.2)."""
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(timeout)
        try:
            s.connect(path)
            verify_server(s, f"unix:{path}", accept)
        except BaseException:
            s.close()
            raise
        return cls._handshake(s)

    @classmethod
    def connect_tcp(cls, host, port, timeout=None, token=None, accept=()):
        """`token`: bytes, for a port started with --token-file (see load_token)."""
        s = socket.create_connection((host, port), timeout=timeout)
        try:
            verify_server(s, f"tcp:{host}:{port}", accept)
        except BaseException:
            s.close()
            raise
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return cls._handshake(s, token)

    @classmethod
    def _handshake(cls, s, token=None):
        c = cls(s)
        try:
            hello(c, token)
        except BaseException:
            c.close()
            raise
        return c

    def close(self):
        try:
            self.rfile.close()
        finally:
            self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def read_exact(self, n):
        data = self.rfile.read(n)
        if data is None or len(data) < n:
            got = 0 if data is None else len(data)
            raise ProtocolError(f"connection closed after {got} of {n} bytes")
        return data

    def send(self, op, args=(), payload=b""):
        """Sends one request without waiting for the reply; returns its id.

        The server refuses an oversized payload from its header alone, then
        closes (section 9). So between chunks of a large payload this looks
        for answers: a `too large` answer to this request (or one about the
        connection, id 0) stops the sending and is raised at once; other
        answers are kept for recv/wait. If a write fails because the server
        closed, its answer is raised instead of the write error when it sent one.
        """
        req_id = self.next_id
        self.next_id += 1
        body = encode_request(req_id, op, list(args), len(payload))
        header = encode_frame(body)
        if len(payload) <= COALESCE:
            chunks = [header + bytes(payload)]
        else:
            view = memoryview(payload)
            chunks = [header] + [view[i:i + SEND_CHUNK] for i in range(0, len(view), SEND_CHUNK)]
        for chunk in chunks:
            while select.select([self.sock], [], [], 0)[0]:
                self._take_answer(req_id)
            try:
                self.sock.sendall(chunk)
            except (BrokenPipeError, ConnectionResetError):
                answer = self._answer_after_write_failure(req_id)
                if answer is not None:
                    raise answer from None
                raise
        return req_id

    def _take_answer(self, req_id):
        """Reads one reply while `req_id` is being sent: raises the one that
        ends the request and the connection, keeps the others."""
        rid, result = self._recv_fresh()
        if isinstance(result, RemoteError) and (
                rid == 0 or (rid == req_id and result.kind == KIND_INDEX["TooLarge"])):
            raise result
        self.early[rid] = result

    def _answer_after_write_failure(self, req_id, within=1.0):
        """The server's answer explaining a failed write, if it sent one."""
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
            self.sock.settimeout(old)
        result = self.early.pop(req_id, None)
        return result if isinstance(result, RemoteError) else None

    def recv(self):
        """Reads the next reply, whatever its id: (id, result bytes or RemoteError)."""
        if self.early:
            req_id = next(iter(self.early))
            return req_id, self.early.pop(req_id)
        return self._recv_fresh()

    def _recv_fresh(self):
        prefix = self.rfile.read(PREFIX_LEN)
        if not prefix:
            raise ProtocolError("the dispatcher closed the connection")
        if len(prefix) < PREFIX_LEN:
            raise ProtocolError("connection closed inside a frame prefix")
        n = int.from_bytes(prefix, "little")
        if n > MAX_FRAME:
            raise ProtocolError(f"reply frame of {n} bytes exceeds {MAX_FRAME}")
        req_id, error, result_len = decode_response(self.read_exact(n))
        if error is not None:
            return req_id, error
        return req_id, self.read_exact(result_len)

    def wait(self, req_id):
        """Waits for the reply to `req_id`, keeping others; raises RemoteError on error."""
        while True:
            if req_id in self.early:
                rid, result = req_id, self.early.pop(req_id)
            else:
                rid, result = self._recv_fresh()
            if rid == req_id:
                if isinstance(result, RemoteError):
                    raise result
                return result
            if rid == 0 and isinstance(result, RemoteError):
                # About the connection itself (section 9): it closes next.
                raise result
            self.early[rid] = result

    def call(self, op, args=(), payload=b""):
        """Runs `op` and returns its result bytes (RemoteError on a server error)."""
        return self.wait(self.send(op, args, payload))

    def status(self):
        """The dispatcher's status report, as a dict (section 7)."""
        return json.loads(self.call("status").decode("utf-8"))


def load_token(path):
    """Reads a token file as the Rust tools do (section 3.1): mode 0600 or
    stricter, owned by this user, 16 to 256 bytes once trailing whitespace is cut."""
    st = os.stat(path)
    if st.st_mode & 0o077:
        raise ProtocolError(f"token file {path}: mode {st.st_mode & 0o7777:04o} is readable by others; chmod 600")
    if st.st_uid != os.geteuid():
        raise ProtocolError(f"token file {path}: owned by uid {st.st_uid}, not by this user")
    with open(path, "rb") as f:
        token = f.read(MAX_TOKEN_LEN + 64).rstrip(b" \t\n\r\x0c")  # as Rust's is_ascii_whitespace
    if not 16 <= len(token) <= MAX_TOKEN_LEN:
        raise ProtocolError(f"token file {path}: a token is 16 to {MAX_TOKEN_LEN} bytes, not {len(token)}")
    return token


def encode_opening(token=None):
    """What a client sends first: the hello, then its token if it has one."""
    if token is None:
        return encode_hello(PROTOCOL_VERSION, 0)
    return encode_hello(PROTOCOL_VERSION, HELLO_FLAG_TOKEN) + len(token).to_bytes(2, "little") + token


def hello(client, token=None):
    """Performs the handshake on a fresh Client (section 3)."""
    client.sock.sendall(encode_opening(token))
    answer = client.rfile.read(HELLO_LEN) or b""
    decoded = decode_hello(answer) if len(answer) == HELLO_LEN else None
    if decoded is None:
        rest = client.rfile.read(512) or b""
        text = (answer + rest).decode("utf-8", "replace").strip()
        raise ProtocolError(f"not an OSPS dispatcher (it answered {text!r})")
    version, status = decoded
    if status != HELLO_ACCEPTED:
        line = (client.rfile.read(1024) or b"").decode("utf-8", "replace").strip()
        what = {HELLO_VERSION_UNSUPPORTED: "version unsupported", HELLO_REFUSED: "refused",
                HELLO_DENIED: "denied"}
        raise ProtocolError(
            f"connection {what.get(status, f'status {status}')} (server speaks v{version}): {line}"
        )
    return version


def call(op, args=(), payload=b"", socket_path=None, timeout=None):
    """One-shot: connect, run `op`, close."""
    with Client.connect_unix(socket_path or default_socket_path(), timeout) as c:
        return c.call(op, args, payload)


def status(socket_path=None, timeout=None):
    """One-shot status report."""
    with Client.connect_unix(socket_path or default_socket_path(), timeout) as c:
        return c.status()


# --- self test ------------------------------------------------------------------

ASCII_WHITESPACE = b" \t\n\x0c\r"  # Rust's u8::is_ascii_whitespace (no \x0b)


def expected_wc(data):
    words, in_word = 0, False
    for b in data:
        if b in ASCII_WHITESPACE:
            in_word = False
        elif not in_word:
            in_word, words = True, words + 1
    lines = data.count(b"\n")
    return f"{lines} {words} {len(data)}\n".encode()


def expect_remote(fn, kind):
    try:
        got = fn()
    except RemoteError as e:
        if e.kind != KIND_INDEX[kind]:
            raise AssertionError(f"expected {kind}, got {e.kind_rust}: {e.message}") from None
        return e
    raise AssertionError(f"expected a {kind} error, got a result {got[:60]!r}")


def read_to_eof(sock, limit=1 << 20):
    out = bytearray()
    while len(out) < limit:
        chunk = sock.recv(65536)
        if not chunk:
            break
        out += chunk
    return bytes(out)


def raw_socket(path, timeout):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    s.connect(path)
    return s


def selftest(path, timeout=60.0, tcp=None, token_file=None):
    """Checks every section against the dispatcher at `path`; with `tcp`
    (HOST:PORT of a port started with --token-file) and `token_file`, also
    the token handshake."""
    checks = []

    def check(name):
        def register(fn):
            checks.append((name, fn))
            return fn
        return register

    c = Client.connect_unix(path, timeout)

    @check("ping")
    def _():
        got = c.call("ping")
        assert got == b"pong\n", got

    @check("the server is verified: SO_PEERCRED gives our uid")
    def _():
        assert unix_server_uid(c.sock) == os.getuid(), unix_server_uid(c.sock)

    @check("echo 100 KB")
    def _():
        data = os.urandom(100 * 1024)
        got = c.call("echo", [], data)
        assert got == data, f"{len(got)} bytes back, differ"

    @check("upper")
    def _():
        data = b"Hello, World! caf\xc3\xa9 \x00\xff z"
        got = c.call("upper", [], data)
        assert got == b"HELLO, WORLD! CAF\xc3\xa9 \x00\xff Z", got

    @check("sha256")
    def _():
        data = os.urandom(70000)
        got = c.call("sha256", [], data)
        want = (hashlib.sha256(data).hexdigest() + "\n").encode()
        assert got == want, (got, want)
        assert c.call("sha256", [], b"abc") == (
            b"ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad\n")

    @check("wc")
    def _():
        for data in [b"one two\nthree\n\n  four", b"", b"a\x0bb\tc\r\n", b"\n\n"]:
            got = c.call("wc", [], data)
            assert got == expected_wc(data), (data, got, expected_wc(data))
        assert c.call("wc", [], b"one two\nthree\n\n  four") == b"3 4 21\n"

    @check("cancel (section 8.1, example 12.8): the request's answer first")
    def _():
        frame = encode_frame(encode_request(5, "cancel", ["4"], 0))
        assert frame.hex(" ") == "0c 00 00 00 05 06 63 61 6e 63 65 6c 01 01 34 00", frame.hex(" ")
        with Client.connect_unix(path, timeout) as own:
            rid = own.send("sleep", ["60000"])
            time.sleep(0.2)  # running (or queued: cancelled alike)
            cid = own.send("cancel", [str(rid)])
            first, second = own.recv(), own.recv()
            assert first[0] == rid and isinstance(first[1], RemoteError), first
            assert first[1].kind_rust == "Cancelled", first[1]
            assert second == (cid, b"cancelled\n"), second
            assert own.call("cancel", [str(rid)]) == b"not found\n"
        # Ids belong to their connection: another one's cancel finds nothing.
        assert c.call("cancel", [str(rid)]) == b"not found\n"

    @check("status")
    def _():
        s = c.status()
        assert isinstance(s["dispatcher_pid"], int) and not isinstance(s["dispatcher_pid"], bool), s
        assert s["protocol_version"] == PROTOCOL_VERSION, s
        for key in ["instance", "uptime_ms", "socket", "tcp", "segment", "workers", "jobs_done",
                    "jobs_failed", "queue_depth", "in_flight", "connections", "shutting_down",
                    "latency"]:
            assert key in s, f"status lacks {key!r}"
        for key in ["backend", "name", "path", "size", "generation", "slots_in_use",
                    "slot_bytes_in_use", "max_payload"]:
            assert key in s["segment"], f"status.segment lacks {key!r}"
        for w in s["workers"]:
            assert set(w) == {"index", "pid", "state", "jobs_done", "restarts", "jobs_failed",
                              "uptime_ms", "last_exit", "pool"}, w
        for p in s["pools"]:
            assert set(p) == {"name", "kind", "program", "ops", "workers", "jobs_done",
                              "jobs_failed", "restarts", "recycled", "recycled_above_rss", "queue_depth",
                              "job_timeout_ms", "max_attempts", "max_result",
                              "memory_limit_mib", "memory_limit_by", "out_of_memory",
                              "start_failure", "segment", "run_as"}, p
            assert p["segment"]["name"] != "", p
            assert {w["pool"] for w in s["workers"]} <= {p["name"] for p in s["pools"]}, s
        assert set(s["latency"]) == {"window_s", "count", "p50_us", "p90_us", "p99_us",
                                     "max_us"}, s["latency"]

    @check("unknown op")
    def _():
        e = expect_remote(lambda: c.call("frobnicate", [], b"x"), "UnknownOp")
        assert "frobnicate" in e.message, e.message
        assert c.call("ping") == b"pong\n", "connection unusable after an error"

    @check("bad arguments")
    def _():
        expect_remote(lambda: c.call("sleep", ["soon"]), "InvalidInput")
        expect_remote(lambda: c.call("ping", ["x"]), "InvalidInput")
        assert c.call("sleep", ["1"]) == b"slept 1 ms\n"

    @check("status with a payload")
    def _():
        expect_remote(lambda: c.call("status", [], b"xyz"), "BadRequest")
        assert c.call("ping") == b"pong\n"

    @check("20 pipelined upper requests")
    def _():
        inputs = {}
        for i in range(20):
            data = (f"request {i}: " + "abcdefghij" * (i * 37 % 50)).encode()
            inputs[c.send("upper", [], data)] = data
        seen = []
        for _ in range(20):
            rid, result = c.recv()
            assert rid in inputs, f"reply to unknown id {rid}"
            assert rid not in seen, f"two replies to id {rid}"
            assert not isinstance(result, Exception), result
            assert result == inputs[rid].upper(), rid
            seen.append(rid)
        assert sorted(seen) == sorted(inputs)

    @check("hello and first request in one write")
    def _():
        s = raw_socket(path, timeout)
        try:
            s.sendall(encode_hello() + encode_frame(encode_request(5, "ping", [], 0)))
            s.shutdown(socket.SHUT_WR)  # the dispatcher still answers, then closes
            data = read_to_eof(s)
        finally:
            s.close()
        assert data[:8] == encode_hello(PROTOCOL_VERSION, HELLO_ACCEPTED), data
        assert data[8:] == bytes.fromhex("03000000 05 00 05") + b"pong\n", data.hex()

    @check("wrong version")
    def _():
        s = raw_socket(path, timeout)
        try:
            s.sendall(encode_hello(99, 0))
            data = read_to_eof(s)
        finally:
            s.close()
        assert decode_hello(data[:8]) == (PROTOCOL_VERSION, HELLO_VERSION_UNSUPPORTED), data
        assert data.endswith(b"\n") and b"99" in data[8:], data

    @check("not OSPS: text and HTTP")
    def _():
        for probe, start in [(b"hello there\n", b"OSPS job server"),
                             (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", b"HTTP/1.0 400 Bad Request\r\n")]:
            s = raw_socket(path, timeout)
            try:
                s.sendall(probe)
                data = read_to_eof(s)
            finally:
                s.close()
            assert data.startswith(start) and data.endswith(b"\n"), data

    @check("corrupt frame: id 0 bad request, then close")
    def _():
        with Client.connect_unix(path, timeout) as k:
            k.sock.sendall(encode_frame(b"\x05\x03\xff\xfe\xfd"))  # op is not UTF-8
            rid, result = k.recv()
            assert rid == 0 and isinstance(result, RemoteError), (rid, result)
            assert result.kind == KIND_INDEX["BadRequest"], result
            assert k.rfile.read(1) == b"", "connection not closed"

    @check("payload over the limit: too large, then close")
    def _():
        limit = c.status()["segment"]["max_payload"]
        with Client.connect_unix(path, timeout) as k:
            k.sock.sendall(encode_frame(encode_request(7, "echo", [], limit + 1)))
            rid, result = k.recv()  # answered from the header alone
            assert rid == 7 and isinstance(result, RemoteError), (rid, result)
            assert result.kind == KIND_INDEX["TooLarge"], result
            assert k.rfile.read(1) == b"", "connection not closed"

    if tcp:
        host, _, port = tcp.rpartition(":")
        host, port = host.strip("[]"), int(port)

        def opening_answer(opening):
            s = socket.create_connection((host, port), timeout=timeout)
            try:
                s.sendall(opening)
                return read_to_eof(s)
            finally:
                s.close()

        @check("tcp: the right token is admitted")
        def _():
            with Client.connect_tcp(host, port, timeout, load_token(token_file)) as k:
                assert k.call("upper", [], b"token ok") == b"TOKEN OK"
                assert tcp_server_uid(k.sock) == os.getuid(), tcp_server_uid(k.sock)

        @check("tcp: no token, a wrong token, an oversized token: denied with a line")
        def _():
            token = load_token(token_file)
            wrong = bytes([token[0] ^ 1]) + token[1:]
            for opening in [encode_opening(None), encode_opening(wrong),
                            encode_hello(PROTOCOL_VERSION, HELLO_FLAG_TOKEN) + (300).to_bytes(2, "little")]:
                data = opening_answer(opening)
                assert decode_hello(data[:8]) == (PROTOCOL_VERSION, HELLO_DENIED), data
                assert data.endswith(b"\n") and b"token" in data[8:], data

    failed = []
    try:
        for name, fn in checks:
            try:
                fn()
                print(f"  ok    {name}", file=sys.stderr)
            except Exception as e:  # noqa: BLE001 - report every failure
                failed.append(name)
                print(f"  FAIL  {name}: {type(e).__name__}: {e}", file=sys.stderr)
    finally:
        c.close()
    if failed:
        print(f"selftest failed: {', '.join(failed)}")
        return 1
    print("selftest ok")
    return 0


# --- command line ----------------------------------------------------------------

def main(argv=None):
    p = argparse.ArgumentParser(
        description="OSPS client (Python, standard library only; see docs/PROTOCOL.md).")
    target = p.add_mutually_exclusive_group()
    target.add_argument("--socket", metavar="PATH", help="the dispatcher's Unix socket")
    target.add_argument("--tcp", metavar="HOST:PORT", help="the dispatcher's loopback TCP address")
    target.add_argument("--instance", help="instance name (socket path derived as in PROTOCOL.md)")
    p.add_argument("--timeout", type=float, default=None, help="seconds to wait on the socket")
    p.add_argument("--token-file", metavar="PATH", help="present this token (file mode 0600) on --tcp")
    p.add_argument("--selftest", action="store_true", help="run the self test against --socket")
    p.add_argument("--selftest-tcp", metavar="HOST:PORT",
                   help="with --selftest: also test the token handshake on this port (needs --token-file)")
    p.add_argument("op", nargs="?", help="operation, e.g. ping, sha256, status (options go before it)")
    p.add_argument("args", nargs=argparse.REMAINDER, help="operation arguments")
    a = p.parse_args(argv)

    if a.selftest:
        if not a.socket:
            p.error("--selftest needs --socket PATH")
        try:
            return selftest(a.socket, a.timeout or 60.0, a.selftest_tcp, a.token_file)
        except (OSError, ProtocolError, RemoteError) as e:
            print(f"selftest failed: cannot run: {e}")
            return 1
    if not a.op:
        p.error("an operation is required (or --selftest)")

    payload = b"" if sys.stdin is None or sys.stdin.isatty() else sys.stdin.buffer.read()
    where = f"tcp:{a.tcp}" if a.tcp else (a.socket or default_socket_path(a.instance))
    try:
        if a.tcp:
            host, _, port = a.tcp.rpartition(":")
            token = load_token(a.token_file) if a.token_file else None
            c = Client.connect_tcp(host.strip("[]"), int(port), a.timeout, token)
        else:
            c = Client.connect_unix(where, a.timeout)
        with c:
            result = c.call(a.op, a.args, payload)
    except RemoteError as e:
        hint = ""
        if e.kind == KIND_INDEX["TooLarge"]:
            hint = (" (the limit is the dispatcher's --max-payload; raise it there,"
                    " with a --segment-mib large enough to hold it)")
        print(f"error: {e.kind_name}: {e.message}{hint}", file=sys.stderr)
        return 1
    except (OSError, ValueError) as e:
        print(f"error: {where}: {e}", file=sys.stderr)
        return 2
    except ProtocolError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    sys.stdout.buffer.write(result)
    sys.stdout.buffer.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
