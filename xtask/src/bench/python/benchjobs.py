"""The Python functions o9 of `cargo xtask bench` runs, the same ones on
both sides: in a `concurrent.futures.ProcessPoolExecutor` (called with
bytes) and as the operations of an OSPS pool of Python workers (called with
a memoryview of the payload in the pool's shared segment), when this module
runs as a program (`python3 -m benchjobs`)."""

import hashlib
import os
import time

# How long a call of `nap` works: long enough that the 100 calls of the
# crash trial are all pending when the crashing one runs.
NAP_SECS = 0.01


def length(data):
    """A small call: the input's length, in decimal."""
    return str(len(data)).encode()


def sha256(data):
    """A bulk call: the payload's sha256, in hex (read in place when it is a memoryview)."""
    return hashlib.sha256(data).hexdigest().encode()


def nap(data):
    """A call of the crash trial: works a moment, answers its input."""
    time.sleep(NAP_SECS)
    return bytes(data)


def crash(data):
    """The call that kills its worker process, as a segfault would."""
    os._exit(1)


OPS = {"py_len": length, "py_sha256": sha256, "py_nap": nap, "py_crash": crash}


def main():
    from osps.worker import Worker

    w = Worker()
    for name, f in OPS.items():
        w.op(name)(lambda data, args, f=f: f(data))
    w.run()


if __name__ == "__main__":
    main()
