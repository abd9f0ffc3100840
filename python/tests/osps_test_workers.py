"""The worker program the package's tests run as a pool:
`program = [VENV/bin/python, -m, osps_test_workers]` (with `cwd` this
directory). Each operation exercises one part of the SDK. With the argument
`big` it serves `bigsha256` and `bigmem` instead (a pool of one worker, so
that the memory it reports is the one that hashed)."""

import ctypes
import hashlib
import os
import sys
import time

from osps import InvalidInputError
from osps.worker import Worker

w = Worker("osps-test-workers")
BIG = sys.argv[1:] == ["big"]


@w.op("pyupper")
def upper(data: memoryview, args: list) -> bytes:
    return bytes(data).upper()


@w.op("pysha256")
def sha256(data: memoryview, args: list) -> bytes:
    # hashlib reads the memoryview where it lies: no copy of the payload.
    return (hashlib.sha256(data).hexdigest() + "\n").encode()


@w.op("pyecho")
def echo(data: memoryview, args: list) -> memoryview:
    return data  # the input itself: answered in place


@w.op("pyargs")
def args_op(data: memoryview, args: list) -> bytes:
    return "\x00".join(args).encode()


@w.op("pyexpand")
def expand(data: memoryview, args: list) -> bytes:
    """Each input byte repeated N times: a result larger than the slot's room."""
    n = int(args[0])
    return b"".join(bytes([b]) * n for b in bytes(data))


@w.op("pyraise")
def fail(data: memoryview, args: list) -> bytes:
    if args and args[0] == "typed":
        raise InvalidInputError("no header in the input")
    if args and args[0] == "key":
        raise KeyError("missing")
    raise ValueError(f"cannot parse {bytes(data)!r}")


@w.op("pysegv")
def segv(data: memoryview, args: list) -> bytes:
    # Records each run, so the test can count the dispatcher's attempts.
    if args:
        with open(args[0], "a") as f:
            f.write(f"{os.getpid()}\n")
    ctypes.string_at(0)
    return b"unreachable"


@w.op("pyexit")
def hard_exit(data: memoryview, args: list) -> bytes:
    os._exit(3)


@w.op("pysleep")
def sleep(data: memoryview, args: list) -> bytes:
    time.sleep(int(args[0]) / 1000)
    return b"slept\n"


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


@w.op("pymem")
def mem(data: memoryview, args: list) -> bytes:
    """This worker's peak resident memory and its resident shared memory, in KiB."""
    return f"{_status_kib('VmHWM')} {_status_kib('RssShmem')} {os.getpid()}\n".encode()


@w.op("pyprint")
def noisy(data: memoryview, args: list) -> bytes:
    print("a print in an operation goes to stderr, not into the protocol")
    return b"quiet\n"


@w.stream("pysha256s")
def sha256_streamed(chunks, args: list) -> bytes:
    # Hashed as it arrives; answers the digest and how many parts it came in.
    h, parts = hashlib.sha256(), 0
    for chunk in chunks:
        h.update(chunk)
        parts += 1
    return f"{h.hexdigest()} {parts}\n".encode()


if BIG:
    w.ops.clear()
    w.streams.clear()
    w.op("bigsha256")(sha256)
    w.op("bigmem")(mem)

if __name__ == "__main__":
    w.run()
