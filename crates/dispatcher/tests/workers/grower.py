"""A worker in Python, from docs/PROTOCOL.md section 13 alone (no SDK): it
serves `ping`; `grow N`, which asks the dispatcher for result areas of N
bytes again and again (a greedy worker) until refused, then answers the
refusal (after 16 areas it gives up asking and answers success, so a
dispatcher that never refuses is caught); and `stale`, whose first attempt
writes STALE in a result area it was given and dies, and whose second
answers `fresh` in its slot; and `leak N`, which keeps N MiB more of
memory for good (a leaking worker) and answers its pid; `shared N`, the
same in N MiB of shared anonymous memory (`mmap.mmap(-1, ...)`, which
`RLIMIT_DATA` does not count: only a memory cgroup does); `vanish N`,
which takes N MiB of private memory in small pages (touched), closes its result pipe (stdout)
without a word and lives on until killed (a worker whose death the
dispatcher learns from its pipe, and whose exit then takes a while: the
kernel frees those N MiB before the process can be reaped); and `scan
MARKER PREFIX` (announced when `scan` is given as an argument), a
hostile worker's search: it tries to open and read every OSPS object it
can find (POSIX segments in /dev/shm, System V segments listed in
/proc/sysvipc/shm) and answers `FOUND MARKER in NAME` for each that holds
MARKER, one line per POSIX segment whose name starts with PREFIX (`own
NAME`, `opened NAME` or `denied NAME (why)`), one line per System V segment
(`own`, `opened` or `denied sysv key 0x...`), and the System V count
(`sysv: N opened, M denied`). The segment
is mapped from /dev/shm, or attached for System V (OSPS_SEGMENT in the
environment)."""

import ctypes
import mmap
import os
import struct
import sys
import time

IN, OUT = sys.stdin.buffer, sys.stdout.buffer


def varint(n):
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def string(s):
    b = s.encode()
    return varint(len(b)) + b


class Reader:
    def __init__(self, body):
        self.b, self.i = body, 0

    def varint(self):
        n = shift = 0
        while True:
            byte = self.b[self.i]
            self.i += 1
            n |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                return n

    def string(self):
        n = self.varint()
        s = self.b[self.i:self.i + n].decode()
        self.i += n
        return s


def send(body):
    OUT.write(struct.pack("<I", len(body)) + body)
    OUT.flush()


def receive():
    head = IN.read(4)
    if len(head) < 4:
        return None
    (n,) = struct.unpack("<I", head)
    return Reader(IN.read(n))


def done(job_id, ok, offset=0, length=0, kind=0, message=""):
    outcome = b"\x00" if ok else b"\x01" + varint(kind) + string(message)
    send(b"\x01" + varint(job_id) + outcome + varint(offset) + varint(length))


def grow(job_id, n):
    """Asks for areas of n bytes until refused; returns the answer."""
    for _ in range(16):
        send(b"\x02" + varint(job_id) + varint(n))
        while True:
            r = receive()
            variant = r.varint()
            if variant in (1, 2):  # More / Abort of an earlier job: ignore
                continue
            break
        if variant == 4:  # NoRoom { job_id, message }
            r.varint()
            return r.string()
        assert variant == 3, variant  # Room { job_id, area }
    return None


LEAKED = []
LIBC = ctypes.CDLL(None, use_errno=True)
LIBC.shmat.restype = ctypes.c_void_p
LIBC.shmat.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int]
LIBC.shmget.argtypes = [ctypes.c_int, ctypes.c_size_t, ctypes.c_int]
SHM_RDONLY = 0o10000


def sysv_attach(shmid, size):
    """A System V segment's bytes (a copy), or raises OSError."""
    addr = LIBC.shmat(shmid, None, SHM_RDONLY)
    if addr is None or addr == ctypes.c_void_p(-1).value:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    try:
        return ctypes.string_at(addr, size)
    finally:
        LIBC.shmdt(ctypes.c_void_p(addr))


def sysv_key(name):
    """The key of a `sysv:` segment name: FNV-1a (64-bit) of the rest, its
    low 31 bits, 1 if 0 (PROTOCOL 13.1)."""
    h = 0xCBF29CE484222325
    for b in name[len("sysv:"):].encode():
        h = ((h ^ b) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return (h & 0x7FFFFFFF) or 1


def open_segment(name):
    """The segment, writable: /dev/shm/NAME mapped, or, for `sysv:NAME`,
    the System V segment attached (shmget of its key, shmat)."""
    if not name.startswith("sysv:"):
        with open("/dev/shm/" + name.lstrip("/"), "r+b") as f:
            return mmap.mmap(f.fileno(), 0)
    shmid = LIBC.shmget(sysv_key(name), 0, 0)
    if shmid < 0:
        raise OSError(ctypes.get_errno(), "shmget")
    with open("/proc/sysvipc/shm") as f:
        size = next(int(r.split()[3]) for r in f.read().splitlines()[1:]
                    if int(r.split()[1]) == shmid)
    addr = LIBC.shmat(shmid, None, 0)
    if addr is None or addr == ctypes.c_void_p(-1).value:
        raise OSError(ctypes.get_errno(), "shmat")
    return memoryview((ctypes.c_ubyte * size).from_address(addr)).cast("B")


def scan(marker, prefix, own):
    """Every OSPS object this process can open, and what is in it."""
    lines = []
    for entry in sorted(os.listdir("/dev/shm")):
        if not entry.startswith("osps-"):
            continue
        name = "/" + entry
        ours = name.startswith(prefix)
        try:
            with open("/dev/shm/" + entry, "rb") as f:
                data = f.read()
        except OSError as e:
            if ours:
                lines.append(f"denied {name} ({e.strerror})")
            continue
        if ours:
            lines.append(("own " if name == own else "opened ") + name)
        if marker in data:
            lines.append(f"FOUND {marker.decode()} in {name}")
    opened = denied = 0
    own_key = sysv_key(own) if own.startswith("sysv:") else None
    with open("/proc/sysvipc/shm") as f:
        rows = [r.split() for r in f.read().splitlines()[1:]]
    for row in rows:
        key, shmid, size = int(row[0]) & 0xFFFFFFFF, int(row[1]), int(row[3])
        name = f"sysv key {key:#010x}"
        try:
            data = sysv_attach(shmid, size)
        except OSError as e:
            denied += 1
            lines.append(f"denied {name} ({e.strerror})")
            continue
        opened += 1
        lines.append(("own " if key == own_key else "opened ") + name)
        if marker in data:
            lines.append(f"FOUND {marker.decode()} in {name}")
    lines.append(f"sysv: {opened} opened, {denied} denied")
    return "\n".join(lines) + "\n"


def main():
    name = os.environ["OSPS_SEGMENT"]
    seg = open_segment(name)
    assert seg[:8] == b"OSPSSEG\x00"
    # Ready { pid, version 4, streams [], ops ["grow", "stale", "leak", "shared", "vanish", and any names given as arguments] }
    ops = ["grow", "stale", "leak", "shared", "vanish"] + sys.argv[1:]
    send(b"\x00" + varint(os.getpid()) + varint(4) + varint(0) + varint(len(ops))
         + b"".join(string(o) for o in ops))
    while True:
        r = receive()
        if r is None:
            return 0
        if r.varint() != 0:  # not a Job
            continue
        job_id, op = r.varint(), r.string()
        args = [r.string() for _ in range(r.varint())]
        offset, _slot_len = r.varint(), r.varint()
        input_len, _ready, attempt = r.varint(), r.varint(), r.varint()
        if op == "stale" and attempt == 1:
            send(b"\x02" + varint(job_id) + varint(100))
            room = receive()
            assert room.varint() == 3, "Room"
            room.varint()
            at = 4096 + room.varint()
            seg[at:at + 5] = b"STALE"
            os._exit(1)
        if op == "stale":
            at = 4096 + offset + input_len
            seg[at:at + 6] = b"fresh\n"
            done(job_id, True, input_len, 6)
        elif op == "leak":
            LEAKED.append(b"x" * (int(args[0]) << 20))  # touched: resident
            answer = str(os.getpid()).encode()
            at = 4096 + offset + input_len
            seg[at:at + len(answer)] = answer
            done(job_id, True, input_len, len(answer))
        elif op == "vanish":
            # Private memory in 4 KiB pages (not huge ones, which the kernel
            # frees fast), each touched.
            area = mmap.mmap(-1, int(args[0]) << 20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
            area.madvise(mmap.MADV_NOHUGEPAGE)
            for page in range(0, len(area), mmap.PAGESIZE):
                area[page] = 1
            LEAKED.append(area)
            os.close(1)
            time.sleep(3600)
        elif op == "shared":
            area = mmap.mmap(-1, int(args[0]) << 20)  # MAP_SHARED | MAP_ANONYMOUS
            for page in range(0, len(area), mmap.PAGESIZE):
                area[page] = 1  # touched: resident
            LEAKED.append(area)
            answer = str(os.getpid()).encode()
            at = 4096 + offset + input_len
            seg[at:at + len(answer)] = answer
            done(job_id, True, input_len, len(answer))
        elif op == "scan":
            answer = scan(args[0].encode(), args[1], name).encode()
            at = 4096 + offset + input_len
            seg[at:at + len(answer)] = answer
            done(job_id, True, input_len, len(answer))
        elif op == "ping":
            at = 4096 + offset + input_len
            seg[at:at + 5] = b"pong\n"
            done(job_id, True, input_len, 5)
        elif op == "grow":
            refused = grow(job_id, int(args[0]))
            if refused is None:
                done(job_id, True)
            else:
                done(job_id, False, kind=2, message=refused)  # TooLarge
        else:
            done(job_id, False, kind=1, message=f"{op!r} is not served here")


sys.exit(main())
