"""Write OSPS operations in Python: a worker program of a pool.

    from osps.worker import Worker

    w = Worker()

    @w.op("parse")
    def parse(data: memoryview, args: list) -> bytes:
        return json.dumps(json.loads(bytes(data))).encode()

    if __name__ == "__main__":
        w.run()

and in the dispatcher's configuration file:

    [pools.parse]
    program = ["/path/to/venv/bin/python", "-m", "myjobs"]

`Worker.run` speaks the worker protocol (docs/PROTOCOL.md section 13) on
stdin and stdout. It maps the pool's shared-memory segment (named in
`OSPS_SEGMENT`) once, and hands each operation a read-only `memoryview` of
its input **in place** in the segment (no copy; it is valid only during the
call: copy what you keep). What the operation returns (bytes, bytearray or
a memoryview) is written into the segment after the input, or into a larger
result area the dispatcher gives (`Grow`/`Room`) when it does not fit.

Errors: raise a `osps.RemoteError` subclass (`osps.InvalidInputError("no
header")`) to answer that kind with your message. Any other exception is
answered `invalid input` when it is a `ValueError` (json, int(), unicode
errors: the input's fault) and `internal error` otherwise, with the message
`operation "parse" raised ValueError: <its message>`; its traceback goes to
the worker's stderr (the dispatcher's log) and the worker serves on. A
`MemoryError` ends the worker (under a pool's `memory_limit_mib` the
dispatcher answers `out of memory`), and so does a crash (`os._exit`, a
segfault in a C extension): the dispatcher runs the job again on a fresh
worker up to the pool's `max_attempts`, then answers `worker crashed`.

`print()` in an operation goes to stderr: stdout is the protocol's. The
segment is never unlinked by this process, and Python's resource tracker
never learns of it (it would otherwise unlink it, or warn of a "leaked"
object, when the worker exits).
"""

import ctypes
import os
import struct
import sys
import traceback
from typing import BinaryIO, Callable, Dict, Iterator, List, Optional, Tuple, Union

from . import _wire as wire
from .errors import ProtocolError, RemoteError

Result = Union[bytes, bytearray, memoryview, None]
Operation = Callable[[memoryview, List[str]], Result]

PIPE_VERSION = 4
HEADER_LEN = 4096
LAYOUT_VERSION = 2
SEG_MAGIC = b"OSPSSEG\x00"
MAX_MESSAGE = 1024
SYSV_PREFIX = "sysv:"
RESERVED = ("ping", "status", "metrics", "cancel", "reload")

# Kinds (PROTOCOL section 6) the SDK answers itself.
_BAD_REQUEST, _UNKNOWN_OP, _TOO_LARGE, _INVALID_INPUT, _INTERNAL = 0, 1, 2, 7, 8


class WorkerExit(Exception):
    """Ends `Worker.serve` with an exit status and a line for stderr."""

    def __init__(self, status: int, line: str) -> None:
        super().__init__(line)
        self.status = status


# --- the segment (PROTOCOL 13.12) ------------------------------------------------

class Segment:
    """The pool's segment, mapped read-write: `buf` is all of it."""

    def __init__(self, buf: memoryview, closer: Callable[[], None]) -> None:
        self.buf = buf
        self._closer = closer

    def close(self) -> None:
        try:
            self.buf.release()
            self._closer()
        except BufferError:
            pass  # an operation kept a view; the mapping goes with the process


def _open_posix(name: str) -> Segment:
    """Maps /dev/shm/NAME with multiprocessing.shared_memory, keeping it away
    from the resource tracker (which would unlink it or warn at exit)."""
    from multiprocessing import shared_memory

    bare = name.lstrip("/")
    if sys.version_info >= (3, 13):
        shm = shared_memory.SharedMemory(bare, track=False)  # type: ignore[call-arg]
    else:
        from multiprocessing import resource_tracker

        register = resource_tracker.register

        def register_all_but_shared_memory(rname: str, rtype: str) -> None:
            if rtype != "shared_memory":
                register(rname, rtype)

        # 3.8 to 3.12 register every segment opened, not only those created;
        # an unregister after the fact leaves a window in which the tracker
        # (a process of its own) could outlive us and unlink the segment.
        resource_tracker.register = register_all_but_shared_memory  # type: ignore[assignment]
        try:
            shm = shared_memory.SharedMemory(bare)
        finally:
            resource_tracker.register = register  # type: ignore[assignment]
    assert shm.buf is not None
    return Segment(shm.buf, shm.close)


def sysv_key(name: str) -> int:
    """The System V key of a `sysv:` segment name (FNV-1a of the rest, PROTOCOL 13.1)."""
    h = 0xCBF29CE484222325
    for b in name[len(SYSV_PREFIX):].encode():
        h = ((h ^ b) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    key = h & 0x7FFFFFFF
    return key or 1


def _open_sysv(name: str) -> Segment:
    """Attaches a System V segment with shmget and shmat (ctypes)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.shmget.argtypes = [ctypes.c_int, ctypes.c_size_t, ctypes.c_int]
    libc.shmget.restype = ctypes.c_int
    libc.shmat.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int]
    libc.shmat.restype = ctypes.c_void_p
    libc.shmdt.argtypes = [ctypes.c_void_p]
    shmid = libc.shmget(sysv_key(name), 0, 0)
    if shmid < 0:
        raise OSError(ctypes.get_errno(), f"shmget: {os.strerror(ctypes.get_errno())}")
    size = _sysv_size(shmid)
    addr = libc.shmat(shmid, None, 0)
    if addr is None or addr == ctypes.c_void_p(-1).value:
        raise OSError(ctypes.get_errno(), f"shmat: {os.strerror(ctypes.get_errno())}")
    buf = memoryview((ctypes.c_ubyte * size).from_address(addr)).cast("B")
    return Segment(buf, lambda: libc.shmdt(ctypes.c_void_p(addr)))


def _sysv_size(shmid: int) -> int:
    with open("/proc/sysvipc/shm") as f:
        for row in f.read().splitlines()[1:]:
            cols = row.split()
            if int(cols[1]) == shmid:
                return int(cols[3])
    raise OSError(f"System V segment {shmid} is not in /proc/sysvipc/shm")


def open_segment(name: str, parent_pid: Optional[int]) -> Segment:
    """Maps the segment `name` and checks its header; raises WorkerExit if unfit."""
    try:
        seg = _open_sysv(name) if name.startswith(SYSV_PREFIX) else _open_posix(name)
    except OSError as e:
        raise WorkerExit(1, f"cannot open segment {name}: {e}") from None
    magic, layout, header_len, total, arena, owner = struct.unpack_from("=8sIIQQI", seg.buf, 0)
    why = None
    if magic != SEG_MAGIC:
        why = "not an OSPS segment (bad magic)"
    elif layout != LAYOUT_VERSION:
        why = f"segment layout {layout}, this SDK reads {LAYOUT_VERSION}"
    elif header_len != HEADER_LEN or total != len(seg.buf) or arena != total - HEADER_LEN:
        why = f"header says {total} bytes ({header_len} of header), the object has {len(seg.buf)}"
    elif parent_pid is not None and owner != parent_pid:
        why = f"it belongs to pid {owner}, not to our parent {parent_pid}"
    if why is not None:
        seg.close()
        raise WorkerExit(1, f"segment {name} refused: {why}")
    return seg


# --- the pipes (PROTOCOL 13.2, 13.3) -----------------------------------------------

class _Pipes:
    """Frames in from the dispatcher, frames out to it."""

    def __init__(self, inp: BinaryIO, out: BinaryIO) -> None:
        self.inp = inp
        self.out = out

    def receive(self) -> Optional[wire.Reader]:
        """The next frame's body, or None at end of input at a frame boundary."""
        head = self.inp.read(4)
        if not head:
            return None
        if len(head) < 4:
            raise WorkerExit(1, "the job pipe ended inside a frame prefix")
        n = int.from_bytes(head, "little")
        if n > wire.MAX_FRAME:
            raise WorkerExit(1, f"a frame of {n} bytes on the job pipe exceeds {wire.MAX_FRAME}")
        body = self.inp.read(n)
        if len(body) < n:
            raise WorkerExit(1, "the job pipe ended inside a frame")
        return wire.Reader(body)

    def send(self, body: bytes) -> None:
        self.out.write(wire.encode_frame(body))
        self.out.flush()

    def done_ok(self, job_id: int, offset: int, length: int) -> None:
        self.send(b"\x01" + wire.encode_varint(job_id) + b"\x00"
                  + wire.encode_varint(offset) + wire.encode_varint(length))

    def done_err(self, job_id: int, kind: int, message: str) -> None:
        self.send(b"\x01" + wire.encode_varint(job_id) + b"\x01" + wire.encode_varint(kind)
                  + wire.encode_string(_cut(message)) + b"\x00\x00")


def _cut(message: str) -> str:
    raw = message.encode("utf-8")
    if len(raw) <= MAX_MESSAGE:
        return message
    return raw[:MAX_MESSAGE].decode("utf-8", "ignore")


class _Job:
    """A `Job` frame's fields."""

    def __init__(self, r: wire.Reader) -> None:
        self.job_id = r.varint()
        self.op = r.string()
        self.args = r.strings()
        self.slot_offset = r.varint()
        self.slot_len = r.varint()
        self.input_len = r.varint()
        self.ready = r.varint()
        self.attempt = r.varint("u32")
        r.end()


class _Aborted(Exception):
    """The payload of a streamed job will never arrive in full (`Abort`)."""


class _Whole:
    """A streaming operation called with a whole input: one chunk."""

    def __init__(self, f: Callable[[Iterator[memoryview], List[str]], Result]) -> None:
        self.f = f

    def __call__(self, data: memoryview, args: List[str]) -> Result:
        return self.f(iter([data]), args)


# --- the worker ---------------------------------------------------------------------

class Worker:
    """A worker program: the operations it serves, and the loop that serves them."""

    def __init__(self, name: Optional[str] = None) -> None:
        self.name = name or os.path.basename(sys.argv[0] or "python-worker")
        self.ops: Dict[str, Operation] = {}
        self._seg: Optional[Segment] = None
        self._pending: List[wire.Reader] = []
        # Operations that take their input as it arrives (`Worker.stream`).
        self.streams: Dict[str, Callable[[Iterator[memoryview], List[str]], Result]] = {}

    def op(self, name: str) -> Callable[[Operation], Operation]:
        """Registers the decorated `f(data: memoryview, args: list[str]) -> bytes` as `name`."""
        if not name or name in RESERVED or name in self.ops:
            raise ValueError(f"operation name {name!r} is empty, reserved (ping, status, metrics, cancel, reload) or taken")
        if len(self.ops) >= 64:
            raise ValueError("a worker serves at most 64 operations")

        def register(f: Operation) -> Operation:
            self.ops[name] = f
            return f
        return register

    def stream(self, name: str) -> Callable[[Callable[[Iterator[memoryview], List[str]], Result]],
                                             Callable[[Iterator[memoryview], List[str]], Result]]:
        """Registers the decorated `f(chunks, args) -> bytes` as `name`, a
        streaming operation: `chunks` yields read-only memoryviews of the
        input in order, each as soon as the dispatcher has it in the
        segment (a large payload is hashed while it still arrives; PROTOCOL
        §13.6), every one valid until the next is asked for. A small
        input comes as one chunk."""
        register_op = self.op(name)

        def register(f: Callable[[Iterator[memoryview], List[str]], Result]):
            self.streams[name] = f
            register_op(_Whole(f))  # type: ignore[arg-type]
            return f
        return register

    def run(self) -> None:
        """Serves jobs until the dispatcher closes stdin; exits the process (0 then)."""
        segment = os.environ.get("OSPS_SEGMENT")
        if not segment:
            _die(f"{self.name}: OSPS_SEGMENT is not set: a worker is started by osps-dispatcher "
                 "(a pool's `program`); see docs/PROTOCOL.md section 13")
        parent = os.environ.get("OSPS_PARENT_PID")
        # Our own copies of the pipes; fd 0 and 1 become /dev/null and stderr,
        # so that an operation's input() or print() cannot break the protocol.
        inp = os.fdopen(os.dup(0), "rb", buffering=64 * 1024)
        out = os.fdopen(os.dup(1), "wb", buffering=0)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.close(null)
        os.dup2(2, 1)
        try:
            status = self.serve(segment, int(parent) if parent else None, inp, out)  # type: ignore[arg-type]
        except WorkerExit as e:
            print(f"{self.name}: {e}", file=sys.stderr, flush=True)
            status = e.status
        sys.stdout.flush()
        sys.exit(status)

    def serve(self, segment: str, parent_pid: Optional[int], inp: BinaryIO, out: BinaryIO) -> int:
        """The protocol: map the segment, say `Ready`, answer jobs until EOF."""
        if parent_pid is not None:
            _die_with_parent(parent_pid)
        self._seg = open_segment(segment, parent_pid)
        pipes = _Pipes(inp, out)
        try:
            ops = list(self.ops)
            streams = list(self.streams)
            pipes.send(b"\x00" + wire.encode_varint(os.getpid()) + wire.encode_varint(PIPE_VERSION)
                       + wire.encode_varint(len(streams))
                       + b"".join(wire.encode_string(o) for o in streams)
                       + wire.encode_varint(len(ops))
                       + b"".join(wire.encode_string(o) for o in ops))
            while True:
                r = self._pending.pop(0) if self._pending else pipes.receive()
                if r is None:
                    return 0
                try:
                    variant = r.varint("u32")
                    if variant == 0:
                        self._job(pipes, _Job(r))
                    elif variant not in (1, 2):  # More/Abort of a job answered early: ignored
                        raise WorkerExit(1, f"unexpected frame (variant {variant}) between jobs")
                except ProtocolError as e:
                    raise WorkerExit(1, f"corrupt frame on the job pipe: {e}") from None
        finally:
            self._seg.close()
            self._seg = None

    def _job(self, pipes: _Pipes, job: _Job) -> None:
        assert self._seg is not None
        arena = len(self._seg.buf) - HEADER_LEN
        if (job.slot_offset + job.slot_len > arena or job.input_len > job.slot_len
                or job.ready > job.input_len):
            pipes.done_err(job.job_id, _INTERNAL, "bad job: slot outside the arena or input past it")
            return
        if job.ready < job.input_len:
            if job.op not in self.streams:
                pipes.done_err(job.job_id, _INTERNAL, f"a streamed input for {job.op!r}, which this worker does not stream")
                return
            self._streamed(pipes, job, self.streams[job.op])
            return
        start = HEADER_LEN + job.slot_offset
        if job.op == "ping":
            if job.args:
                pipes.done_err(job.job_id, _INVALID_INPUT,
                               f"expected 0 argument(s), got {len(job.args)}; usage: ping")
            else:
                self._reply(pipes, job, b"pong\n")
            return
        f = self.ops.get(job.op)
        if f is None:
            pipes.done_err(job.job_id, _UNKNOWN_OP,
                           f"{job.op!r} is not an operation; known: {', '.join(['ping', *self.ops])}")
            return
        data = self._seg.buf[start:start + job.input_len].toreadonly()
        try:
            self._run_op(pipes, job, f, data)
        finally:
            try:
                data.release()
            except BufferError:
                pass  # the operation kept a view of it

    def _streamed(self, pipes: _Pipes, job: _Job, f: Callable[[Iterator[memoryview], List[str]], Result]) -> None:
        """A job sent while its payload arrives: `f` gets the input part by
        part as `More` frames announce it; the result is written only once
        all of it is in (the dispatcher writes the slot until then)."""
        assert self._seg is not None
        start = HEADER_LEN + job.slot_offset
        seg = self._seg
        state = {"ready": job.ready, "aborted": False}

        def wait_more() -> None:
            while True:
                r = pipes.receive()
                if r is None:
                    raise WorkerExit(0, "the job pipe closed while a payload arrived")
                variant = r.varint("u32")
                if variant == 0:
                    pipes.done_err(job.job_id, _INTERNAL, "a job came while a payload still arrived")
                    raise WorkerExit(1, "a Job frame while a job's input still arrived")
                job_id = r.varint()
                if job_id != job.job_id:
                    continue  # news of an older job: ignored
                if variant == 1:
                    state["ready"] = min(r.varint(), job.input_len)
                    return
                if variant == 2:
                    state["aborted"] = True
                    return

        def chunks() -> Iterator[memoryview]:
            done = 0
            while True:
                if state["ready"] > done:
                    view = seg.buf[start + done:start + state["ready"]].toreadonly()
                    done = state["ready"]
                    try:
                        yield view
                    finally:
                        view.release()
                if done >= job.input_len:
                    return
                wait_more()
                if state["aborted"]:
                    raise _Aborted()

        def run(_data: memoryview, args: List[str]) -> Result:
            result = f(chunks(), args)
            # Nothing goes in the slot before the last `More`: an operation
            # done early waits for the rest of its input.
            while state["ready"] < job.input_len:
                wait_more()
                if state["aborted"]:
                    raise _Aborted()
            return result

        try:
            self._run_op(pipes, job, run, memoryview(b""))
        except _Aborted:
            pipes.done_err(job.job_id, _BAD_REQUEST, "the payload did not arrive in full")

    def _run_op(self, pipes: _Pipes, job: _Job, f: Operation, data: memoryview) -> None:
        try:
            result = f(data, list(job.args))
        except (_Aborted, WorkerExit):
            raise
        except RemoteError as e:
            pipes.done_err(job.job_id, e.kind, e.message)
            return
        except MemoryError:
            raise  # the process may be in any state: end it (the dispatcher tells `out of memory`)
        except Exception as e:  # noqa: BLE001 - every exception becomes the client's error
            traceback.print_exc()
            sys.stderr.flush()
            kind = _INVALID_INPUT if isinstance(e, ValueError) else _INTERNAL
            pipes.done_err(job.job_id, kind, f'operation "{job.op}" raised {type(e).__name__}: {e}')
            return
        if result is data:  # the input itself: answered in place, no copy
            pipes.done_ok(job.job_id, 0, job.input_len)
        else:
            self._reply(pipes, job, result)

    def _reply(self, pipes: _Pipes, job: _Job, result: Result) -> None:
        """Writes `result` after the input, or in a result area, and answers `Done`."""
        assert self._seg is not None
        if result is None:
            result = b""
        try:
            view = memoryview(result).cast("B")
        except TypeError:
            pipes.done_err(job.job_id, _INTERNAL, f'operation "{job.op}" returned a '
                           f"{type(result).__name__}, not bytes")
            return
        n = len(view)
        if n <= job.slot_len - job.input_len:
            at = HEADER_LEN + job.slot_offset + job.input_len
            self._seg.buf[at:at + n] = view
            pipes.done_ok(job.job_id, job.input_len, n)
            return
        area = self._grow(pipes, job, n)
        if isinstance(area, str):
            pipes.done_err(job.job_id, _TOO_LARGE, area)
            return
        at = HEADER_LEN + area[0]
        self._seg.buf[at:at + n] = view
        pipes.done_ok(job.job_id, 0, n)

    def _grow(self, pipes: _Pipes, job: _Job, n: int) -> Union[Tuple[int, int], str]:
        """Asks for a result area of `n` bytes (PROTOCOL 13.14): (offset, len), or the refusal."""
        assert self._seg is not None
        pipes.send(b"\x02" + wire.encode_varint(job.job_id) + wire.encode_varint(n))
        while True:
            r = pipes.receive()
            if r is None:
                raise WorkerExit(1, "the job pipe ended while waiting for room")
            variant = r.varint("u32")
            if variant == 0:
                r.pos = 0
                self._pending.append(r)  # a job sent ahead: run it after this one
                continue
            if variant in (1, 2):
                continue
            job_id = r.varint()
            if variant not in (3, 4) or job_id != job.job_id:
                raise WorkerExit(1, f"unexpected frame (variant {variant}, job {job_id}) "
                                 f"while job {job.job_id} waits for room")
            if variant == 4:
                return r.string()
            offset, length = r.varint(), r.varint()
            if length < n or offset + length > len(self._seg.buf) - HEADER_LEN:
                raise WorkerExit(1, f"room of {length} bytes at {offset} does not hold {n} bytes")
            return offset, length


def _die(line: str) -> None:
    print(line, file=sys.stderr, flush=True)
    sys.exit(2)


def _die_with_parent(parent_pid: int) -> None:
    """PR_SET_PDEATHSIG = SIGKILL, then make sure the parent had not died already."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, 9, 0, 0, 0)  # PR_SET_PDEATHSIG, SIGKILL
    except (OSError, AttributeError):
        pass  # not Linux: stdin's end still stops us
    if os.getppid() != parent_pid:
        raise WorkerExit(1, f"the dispatcher (pid {parent_pid}) is gone")
