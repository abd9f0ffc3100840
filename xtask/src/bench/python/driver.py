"""o9 of `cargo xtask bench`: OSPS with Python workers against
`concurrent.futures.ProcessPoolExecutor`, the same functions (benchjobs.py),
the same number of worker processes, the same interpreter; the callers are
threads of this process on both sides (an `osps.Client` each, or
`submit(...).result()` on the shared executor). Each case takes turns:
OSPS then the executor, `--rounds` times, `--secs` each. Prints one JSON
object on stdout."""

import argparse
import concurrent.futures as cf
import json
import sys
import threading
import time

import osps
import benchjobs

SMALL = bytes(range(64))
BIG = bytes(range(256)) * (1 << 16)  # 16 MiB
CRASH_AT = 10


def rate(callers, secs, make):
    """Calls per second of `callers` threads, each calling `make(i)()` in a loop for `secs`."""
    calls = [make(i) for i in range(callers)]
    stop = threading.Event()
    counts = [0] * callers
    errors = []
    ready = threading.Barrier(callers + 1)

    def loop(i):
        ready.wait()
        n = 0
        try:
            while not stop.is_set():
                calls[i]()
                n += 1
        except BaseException as e:  # reported below
            errors.append(e)
        counts[i] = n

    threads = [threading.Thread(target=loop, args=(i,)) for i in range(callers)]
    for t in threads:
        t.start()
    ready.wait()
    t0 = time.perf_counter()
    time.sleep(secs)
    stop.set()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    if errors:
        raise errors[0]
    return sum(counts) / elapsed


def checked(got, want, what):
    if got != want:
        raise SystemExit(f"{what}: a wrong answer {got[:80]!r}")


def osps_caller(clients, op, data, want):
    def make(i):
        c = clients[i]
        return lambda: checked(c.call(op, data), want, f"OSPS {op}")
    return make


def ppe_caller(ex, f, data, want):
    def make(_i):
        return lambda: checked(ex.submit(f, data).result(), want, f"executor {f.__name__}")
    return make


def throughput(a, ex, clients):
    """The four cases, OSPS and the executor taking turns."""
    out = {}
    for name, op, f, data in [("small", "py_len", benchjobs.length, SMALL),
                              ("16mib", "py_sha256", benchjobs.sha256, BIG)]:
        want = f(data)
        for callers in (1, 8):
            got = {"osps": 0.0, "ppe": 0.0}
            for _ in range(a.rounds):
                got["osps"] += rate(callers, a.secs, osps_caller(clients, op, data, want)) / a.rounds
                got["ppe"] += rate(callers, a.secs, ppe_caller(ex, f, data, want)) / a.rounds
            out[f"{name}_c{callers}"] = got
    return out


def crash_osps(a, c):
    """100 pipelined calls on one connection, one of them crashing its worker."""
    t0 = time.perf_counter()
    ids = [c.send("py_crash" if i == CRASH_AT else "py_nap", SMALL) for i in range(a.calls)]
    failed, crash_error = 0, None
    for i, rid in enumerate(ids):
        try:
            checked(c.wait(rid), SMALL, "OSPS py_nap")
        except osps.RemoteError as e:
            failed += 1
            if i == CRASH_AT:
                crash_error = type(e).__name__
    return {"failed": failed, "crash_error": crash_error, "secs": time.perf_counter() - t0}


def crash_ppe(a):
    """100 submitted calls on a fresh executor, one of them crashing its worker."""
    with cf.ProcessPoolExecutor(a.workers) as ex:
        list(ex.map(benchjobs.nap, [SMALL] * (4 * a.workers)))  # every worker started
        t0 = time.perf_counter()
        futs = [ex.submit(benchjobs.crash if i == CRASH_AT else benchjobs.nap, SMALL)
                for i in range(a.calls)]
        cf.wait(futs)
        failed, errors = 0, set()
        for f in futs:
            e = f.exception()
            if e is None:
                checked(f.result(), SMALL, "executor nap")
            else:
                failed += 1
                errors.add(type(e).__name__)
        return {"failed": failed, "crash_error": ",".join(sorted(errors)),
                "secs": time.perf_counter() - t0}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--instance", required=True)
    p.add_argument("--runtime-dir", required=True)
    p.add_argument("--workers", type=int, required=True)
    p.add_argument("--secs", type=float, required=True)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--calls", type=int, default=100)
    a = p.parse_args()
    clients = [osps.connect(a.instance, runtime_dir=a.runtime_dir) for _ in range(8)]
    with cf.ProcessPoolExecutor(a.workers) as ex:
        # Warm both: every executor worker started, every OSPS client connected and served.
        list(ex.map(benchjobs.length, [SMALL] * (8 * a.workers)))
        for c in clients:
            c.call("py_len", SMALL)
        out = throughput(a, ex, clients)
    out["crash"] = {"osps": crash_osps(a, clients[0]), "ppe": crash_ppe(a), "calls": a.calls}
    for c in clients:
        c.close()
    out["python"] = sys.version.split()[0]
    out["executable"] = sys.executable
    out["workers"] = a.workers
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
