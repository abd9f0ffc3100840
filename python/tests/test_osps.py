"""Tests of the osps package against a real dispatcher.

Run by crates/client/tests/python_package.rs, which installs the package in
a fresh venv, starts a watchdog and dispatcher with the pools of
osps_test_workers.py, and sets:

    OSPS_TEST_INSTANCE, OSPS_TEST_RUNTIME_DIR  where the dispatcher is
    OSPS_TEST_SCRATCH                         a directory for the tests' files
    OSPS_TEST_TOKEN_FILE                      the token of the dispatcher's TCP port

Standard library only (unittest). The tests that need no dispatcher
(wire encoding, a worker run alone) run anywhere.
"""

import hashlib
import os
import random
import signal
import subprocess
import sys
import threading
import time
import unittest
from typing import List

import osps
from osps import _wire as wire

INSTANCE = os.environ.get("OSPS_TEST_INSTANCE")
RUNTIME_DIR = os.environ.get("OSPS_TEST_RUNTIME_DIR")
SCRATCH = os.environ.get("OSPS_TEST_SCRATCH", "/tmp")
HERE = os.path.dirname(os.path.abspath(__file__))
needs_dispatcher = unittest.skipUnless(INSTANCE, "OSPS_TEST_INSTANCE is not set")


def connect() -> osps.Client:
    return osps.connect(INSTANCE, runtime_dir=RUNTIME_DIR)


def retrying(**kw: float) -> osps.RetryingClient:
    return osps.RetryingClient(INSTANCE, runtime_dir=RUNTIME_DIR, **kw)


class WireTest(unittest.TestCase):
    def test_varints_and_the_documented_request_bytes(self) -> None:
        self.assertEqual(wire.encode_varint(300), b"\xac\x02")
        # PROTOCOL 12.2: sha256 of "abc", id 3.
        self.assertEqual(wire.encode_frame(wire.encode_request(3, "sha256", [], 3)).hex(),
                         "0a00000003067368613235360003")

    def test_error_kinds_map_to_classes(self) -> None:
        e = wire.decode_response(b"\x07\x01\x0a\x02no\x00")[1]
        self.assertIsInstance(e, osps.OutOfMemoryError)
        self.assertEqual((e.kind, e.message, e.req_id), (10, "no", 7))
        e = wire.decode_response(b"\x07\x01\x09\x00\x00")[1]
        self.assertIsInstance(e, osps.CommandFailedError)
        e = wire.decode_response(b"\x07\x01\x0b\x00\x00")[1]
        self.assertIsInstance(e, osps.JobCancelledError)
        self.assertNotIsInstance(e, __import__("concurrent.futures").futures.CancelledError)
        # PROTOCOL 12.9: a reload denied (PermissionDenied, index 12).
        said = b"only uid 1000 (the dispatcher's) or root may reload it, on the Unix socket; uid 1001 may not"
        e = wire.decode_response(b"\x03\x01\x0c\x5c" + said + b"\x00")[1]
        self.assertIsInstance(e, osps.PermissionDeniedError)
        self.assertEqual((e.kind, e.message, e.req_id), (12, said.decode(), 3))
        self.assertEqual(wire.encode_frame(wire.encode_request(3, "reload", [], 0)).hex(),
                         "0a000000030672656c6f61640000")
        e = wire.decode_response(b"\x07\x01\x63\x00\x00")[1]
        self.assertIs(type(e), osps.RemoteError)
        self.assertEqual(str(e), "error kind 99: ")

    def test_instance_paths_follow_the_runtime_dir_rules(self) -> None:
        old = dict(os.environ)
        try:
            os.environ.pop("OSPS_RUNTIME_DIR", None)
            os.environ["XDG_RUNTIME_DIR"] = "/run/user/7"
            self.assertEqual(osps.instance_paths("a"),
                             ("/run/user/7/osps/a/a.sock", "/run/user/7/osps/a/a.lock"))
            os.environ["OSPS_RUNTIME_DIR"] = "/r"
            os.environ["OSPS_INSTANCE"] = "b"
            self.assertEqual(osps.instance_paths()[0], "/r/b/b.sock")
            self.assertEqual(osps.instance_paths("c", "/x")[0], "/x/c/c.sock")
            del os.environ["XDG_RUNTIME_DIR"], os.environ["OSPS_RUNTIME_DIR"]
            self.assertEqual(osps.instance_paths("d")[0], f"/tmp/osps-{os.getuid()}/d/d.sock")
            with self.assertRaises(ValueError):
                osps.instance_paths("-x")
        finally:
            os.environ.clear()
            os.environ.update(old)


class WorkerAloneTest(unittest.TestCase):
    """A worker run by hand on a segment made here (PROTOCOL 13.13)."""

    def test_the_segment_is_neither_unlinked_nor_reported_by_the_resource_tracker(self) -> None:
        name = f"osps-pytest-{os.getpid()}-{random.getrandbits(32):08x}"
        path = "/dev/shm/" + name
        arena = 1 << 20
        hdr = __import__("struct").pack("<8sIIQQIIQQ", b"OSPSSEG\0", 2, 4096, 4096 + arena, arena,
                                         0, 0, 1, 0)
        with open(path, "wb") as f:
            f.write(hdr.ljust(4096, b"\0") + b"hello world".ljust(arena, b"\0"))
        try:
            # Job { job_id 1, "pyupper", [], slot {0, 8192}, input_len 11, ready 11, attempt 1 }
            job = wire.encode_frame(b"\x00\x01" + wire.encode_string("pyupper")
                                    + b"\x00\x00\x80\x40\x0b\x0b\x01")
            env = dict(os.environ, OSPS_SEGMENT="/" + name)
            env.pop("OSPS_PARENT_PID", None)
            p = subprocess.run([sys.executable, "-m", "osps_test_workers"], input=job, cwd=HERE,
                               env=env, capture_output=True, timeout=60)
            self.assertEqual(p.returncode, 0, p.stderr)
            # Ready, then Done { job 1, Ok, offset 11, len 11 }.
            self.assertTrue(p.stdout.endswith(bytes.fromhex("05000000 01 01 00 0b 0b")), p.stdout.hex())
            with open(path, "rb") as f:
                f.seek(4096)
                self.assertEqual(f.read(22), b"hello worldHELLO WORLD")
            time.sleep(0.5)  # a resource tracker would act once its parent is gone
            self.assertTrue(os.path.exists(path), "the worker's exit removed the segment")
            self.assertNotIn(b"resource_tracker", p.stderr)
            self.assertNotIn(b"leaked", p.stderr)
        finally:
            if os.path.exists(path):
                os.unlink(path)

    def test_a_worker_started_by_hand_says_what_it_needs(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("OSPS_")}
        p = subprocess.run([sys.executable, "-m", "osps_test_workers"], cwd=HERE, env=env,
                           capture_output=True, timeout=60, stdin=subprocess.DEVNULL)
        self.assertEqual(p.returncode, 2)
        self.assertIn(b"OSPS_SEGMENT is not set", p.stderr)
        self.assertEqual(p.stdout, b"")

    def test_reserved_and_duplicate_names_are_refused(self) -> None:
        from osps.worker import Worker
        w = Worker("t")
        w.op("a")(lambda d, a: b"")
        for bad in ("ping", "status", "", "a"):
            with self.assertRaises(ValueError):
                w.op(bad)


class FakeServer:
    """A Unix socket that answers the hello, reads one request per
    connection and then does what `behave(conn, request_id)` does."""

    def __init__(self, behave) -> None:
        import socket as _socket
        self.path = os.path.join(SCRATCH, f"fake-{random.getrandbits(32):08x}.sock")
        self.sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
        self.sock.bind(self.path)
        self.sock.listen(16)
        self.requests = 0
        self.payloads: List[bytes] = []
        self.behave = behave
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn, conn.makefile("rb") as f:
                f.read(8)
                conn.sendall(wire.encode_hello(1, 0))
                n = int.from_bytes(f.read(4), "little")
                if n == 0:
                    continue
                body = wire.Reader(f.read(n))
                req_id = body.varint()
                body.string()
                body.strings()
                self.payloads.append(f.read(body.varint()))
                self.requests += 1
                self.behave(conn, req_id)

    def close(self) -> None:
        self.sock.close()
        os.unlink(self.path)


def _pong(conn, req_id: int) -> None:
    conn.sendall(wire.encode_frame(wire.encode_varint(req_id) + b"\x00\x05") + b"pong\n")


class RetryRulesTest(unittest.TestCase):
    """The RetryingClient's rules, against a fake server."""

    def test_a_request_whose_answer_is_lost_is_sent_at_most_4_times(self) -> None:
        server = FakeServer(lambda conn, req_id: None)  # reads it, closes: answer lost
        try:
            rc = osps.RetryingClient(socket_path=server.path, deadline=30.0)
            self.addCleanup(rc.close)
            with self.assertRaises(osps.ResentError) as e:
                rc.call("ping")
            self.assertEqual((e.exception.sends, server.requests), (4, 4))
            self.assertIsInstance(e.exception.last, osps.ConnectionLost)
        finally:
            server.close()

    def test_waiting_for_an_answer_does_not_count_against_the_retry_deadline(self) -> None:
        def slow(conn, req_id: int) -> None:
            time.sleep(1.0)
            _pong(conn, req_id)
        server = FakeServer(slow)
        try:
            rc = osps.RetryingClient(socket_path=server.path, deadline=0.2)
            self.addCleanup(rc.close)
            self.assertEqual(rc.call("ping"), b"pong\n")
            self.assertEqual(server.requests, 1)
        finally:
            server.close()

    def test_shutting_down_is_sent_again_and_not_counted_as_a_lost_send(self) -> None:
        def stopping_then_pong(conn, req_id: int) -> None:
            if server.requests <= 5:
                msg = wire.encode_string("the dispatcher is shutting down; retry later")
                conn.sendall(wire.encode_frame(wire.encode_varint(req_id) + b"\x01\x06" + msg + b"\x00"))
            else:
                _pong(conn, req_id)
        server = FakeServer(stopping_then_pong)
        try:
            rc = osps.RetryingClient(socket_path=server.path, deadline=30.0)
            self.addCleanup(rc.close)
            self.assertEqual(rc.call("ping"), b"pong\n")
            self.assertEqual((server.requests, rc.retries), (6, 5))
        finally:
            server.close()

    def test_other_answers_are_not_sent_again(self) -> None:
        def invalid(conn, req_id: int) -> None:
            msg = wire.encode_string("nope")
            conn.sendall(wire.encode_frame(wire.encode_varint(req_id) + b"\x01\x07" + msg + b"\x00"))
        server = FakeServer(invalid)
        try:
            rc = osps.RetryingClient(socket_path=server.path, deadline=30.0)
            self.addCleanup(rc.close)
            with self.assertRaises(osps.InvalidInputError):
                rc.call("ping")
            self.assertEqual(server.requests, 1)
        finally:
            server.close()


@needs_dispatcher
class CallTest(unittest.TestCase):
    def test_python_operations_answer_the_right_bytes(self) -> None:
        data = os.urandom(100_000)
        with connect() as c:
            self.assertEqual(c.call("pyupper", b"Hello, caf\xc3\xa9 z"), b"HELLO, CAF\xc3\xa9 Z")
            self.assertEqual(c.call("pysha256", data), (hashlib.sha256(data).hexdigest() + "\n").encode())
            self.assertEqual(c.call("pyecho", data), data)
            self.assertEqual(c.call("pyargs", b"", "one", "two words", ""), b"one\x00two words\x00")
            self.assertEqual(c.call("ping"), b"pong\n")
            # A print in an operation does not break the pipe protocol.
            self.assertEqual(c.call("pyprint"), b"quiet\n")

    def test_a_result_larger_than_the_slot_grows_into_a_result_area(self) -> None:
        data = bytes(range(256)) * 40  # 10 KiB in, 1 MiB out: past the slot's room
        with connect() as c:
            got = c.call("pyexpand", data, "100")
        self.assertEqual(got, b"".join(bytes([b]) * 100 for b in data))

    def test_pipelined_requests_are_matched_by_id(self) -> None:
        with connect() as c:
            sent = {c.send("pyupper", f"req {i}".encode()): f"REQ {i}".encode() for i in range(30)}
            for _ in range(30):
                rid, result = c.recv()
                self.assertEqual(result, sent.pop(rid))
            self.assertEqual(sent, {})

    @unittest.skipUnless(os.environ.get("OSPS_TEST_TOKEN_FILE"), "no TCP port with a token")
    def test_tcp_with_a_token(self) -> None:
        with connect() as c:
            tcp = c.status()["tcp"]
        token_file = os.environ["OSPS_TEST_TOKEN_FILE"]
        with osps.connect(tcp=tcp, token_file=token_file) as c:
            self.assertEqual(c.call("pyupper", b"over tcp"), b"OVER TCP")
        with self.assertRaises(osps.HelloRefused) as e:
            osps.connect(tcp=tcp, token=b"not-the-token-0123456789")
        self.assertEqual(e.exception.status, 3)  # denied
        rc = osps.RetryingClient(tcp=tcp, token_file=token_file)
        self.addCleanup(rc.close)
        self.assertEqual(rc.call("pyupper", b"retrying"), b"RETRYING")

    def test_status_lists_the_pools(self) -> None:
        with connect() as c:
            st = c.status()
        pools = {p["name"]: p for p in st["pools"]}
        self.assertIn("pysha256", pools["py"]["ops"])
        self.assertEqual(sorted(pools["big"]["ops"]), ["bigmem", "bigsha256"])

    def test_an_exception_is_a_typed_error_naming_it(self) -> None:
        with connect() as c:
            with self.assertRaises(osps.InvalidInputError) as e:
                c.call("pyraise", b"{oops")
            self.assertEqual(e.exception.message,
                             "operation \"pyraise\" raised ValueError: cannot parse b'{oops'")
            with self.assertRaises(osps.InternalError) as e:
                c.call("pyraise", b"", "key")
            self.assertEqual(e.exception.message, "operation \"pyraise\" raised KeyError: 'missing'")
            with self.assertRaises(osps.InvalidInputError) as e:
                c.call("pyraise", b"", "typed")
            self.assertEqual(e.exception.message, "no header in the input")
            with self.assertRaises(osps.UnknownOpError):
                c.call("frobnicate")
            # The same connection and worker serve on.
            self.assertEqual(c.call("pyupper", b"still here"), b"STILL HERE")


@needs_dispatcher
class ExampleTest(unittest.TestCase):
    """python/examples/untrusted.py, served as the pool `untrusted`."""

    def test_the_example_parses_untrusted_input_and_refuses_bad_input_by_kind(self) -> None:
        import io
        import json
        import zipfile
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as z:
            z.writestr("a.txt", "hello")
        with connect() as c:
            got = json.loads(c.call("xmlstats", b"<a><b/><b>text</b></a>"))
            self.assertEqual(got, {"elements": 3, "root": "a", "tags": {"a": 1, "b": 2}})
            self.assertEqual(c.call("zipindex", buf.getvalue()),
                             b"5\t" + hashlib.sha256(b"hello").hexdigest().encode() + b"\ta.txt\n")
            with self.assertRaises(osps.InvalidInputError) as e:
                c.call("xmlstats", b"<a><b></a>")
            self.assertIn("not well-formed XML: mismatched tag", e.exception.message)
            with self.assertRaises(osps.InvalidInputError):
                c.call("zipindex", b"not a zip")


@needs_dispatcher
class LoadTest(unittest.TestCase):
    def test_100_concurrent_clients_of_50_calls_each_get_correct_bytes(self) -> None:
        failures: List[str] = []
        done = [0]
        lock = threading.Lock()

        def client(n: int) -> None:
            rng = random.Random(n)
            try:
                with connect() as c:
                    for i in range(50):
                        data = rng.randbytes(rng.randrange(0, 3000))
                        if i % 2:
                            want = (hashlib.sha256(data).hexdigest() + "\n").encode()
                            got = c.call("pysha256", data)
                        else:
                            want, got = data.upper(), c.call("pyupper", data)
                        if got != want:
                            raise AssertionError(f"client {n} call {i}: wrong bytes")
                        with lock:
                            done[0] += 1
            except Exception as e:  # noqa: BLE001 - collected for the assertion
                with lock:
                    failures.append(f"client {n}: {type(e).__name__}: {e}")

        threads = [threading.Thread(target=client, args=(n,)) for n in range(100)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        self.assertEqual(failures, [])
        self.assertEqual(done[0], 100 * 50)


@needs_dispatcher
class CancelTest(unittest.TestCase):
    def _busy(self, c: osps.Client, n: int) -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            workers = [w for w in c.status()["workers"] if w["pool"] == "py"]
            if sum(w["state"] == "busy" for w in workers) >= n:
                return
            time.sleep(0.02)
        self.fail(f"{n} py workers never busy")

    def test_a_queued_and_a_running_call_are_cancelled(self) -> None:
        self.assertEqual(osps.JobCancelledError.KIND, 11)
        self.assertEqual(osps.JobCancelledError.NAME, "cancelled")
        with connect() as c, connect() as watcher, connect() as stranger:
            long = c.send("pysleep", b"", "60000")
            short = [c.send("pysleep", b"", "2000") for _ in range(3)]
            self._busy(watcher, 4)  # every py worker: the next one waits in the queue
            queued = c.send("pyupper", b"queued")
            # Ids are per connection: another one cannot cancel them.
            self.assertFalse(stranger.cancel(queued))
            self.assertFalse(stranger.cancel(long))
            began = time.monotonic()
            self.assertTrue(c.cancel(queued))
            with self.assertRaises(osps.JobCancelledError) as e:
                c.wait(queued)
            self.assertEqual(e.exception.kind_name, "cancelled")
            self.assertTrue(c.cancel(long))
            with self.assertRaises(osps.JobCancelledError):
                c.wait(long)
            self.assertLess(time.monotonic() - began, 1.5, "not waiting for the sleeps")
            self.assertEqual([c.wait(i) for i in short], [b"slept\n"] * 3, "the others ran on")
            self.assertFalse(c.cancel(long), "answered already")
            # The pipelined form: the request's answer comes before the cancel's.
            rid = c.send("pysleep", b"", "60000")
            self._busy(watcher, 1)
            cid = c.send_cancel(rid)
            first, second = c.recv(), c.recv()
            self.assertEqual(first[0], rid)
            self.assertIsInstance(first[1], osps.JobCancelledError)
            self.assertEqual(second, (cid, b"cancelled\n"))
            self.assertEqual(c.call("pyupper", b"after"), b"AFTER")


@needs_dispatcher
class CrashTest(unittest.TestCase):
    def test_a_segfault_is_retried_then_worker_crashed_while_others_are_served(self) -> None:
        runs = os.path.join(SCRATCH, f"segv-runs-{random.getrandbits(32):08x}")
        stop = threading.Event()
        served = [0]
        failures: List[str] = []

        def others() -> None:
            try:
                with connect() as c:
                    while not stop.is_set():
                        if c.call("pyupper", b"other") != b"OTHER":
                            raise AssertionError("wrong bytes")
                        served[0] += 1
            except Exception as e:  # noqa: BLE001
                failures.append(f"{type(e).__name__}: {e}")

        t = threading.Thread(target=others)
        t.start()
        try:
            with connect() as c:
                for _ in range(3):
                    with self.assertRaises(osps.WorkerCrashedError) as e:
                        c.call("pysegv", b"", runs)
                    self.assertIn("pysegv", e.exception.message)
                    self.assertIn("died on each of 2 attempts", e.exception.message)
                with self.assertRaises(osps.WorkerCrashedError):
                    c.call("pyexit")
                self.assertEqual(c.call("pyupper", b"after"), b"AFTER")
        finally:
            stop.set()
            t.join(60)
        self.assertEqual(failures, [])
        self.assertGreater(served[0], 0)
        with open(runs) as f:
            pids = f.read().split()
        self.assertEqual(len(pids), 6, "max_attempts = 2: two runs per call")
        self.assertEqual(len(set(pids)), 6, "each run on a fresh worker")


def _mem(c: osps.Client) -> List[int]:
    return [int(x) for x in c.call("bigmem").split()]


@needs_dispatcher
class BigPayloadTest(unittest.TestCase):
    def test_64_mib_are_hashed_in_place_without_a_copy(self) -> None:
        data = os.urandom(64 << 20)
        with connect() as c:
            hwm0, shm0, pid0 = _mem(c)
            got = c.call("bigsha256", data)
            hwm1, shm1, pid1 = _mem(c)
        self.assertEqual(got, (hashlib.sha256(data).hexdigest() + "\n").encode())
        self.assertEqual(pid0, pid1, "one worker")
        # The peak resident memory grew by the shared pages it read (the
        # payload in the segment) and by little else: a copy would add 64 MiB.
        private_growth_kib = (hwm1 - hwm0) - (shm1 - shm0)
        print(f"\n  64 MiB hashed: VmHWM {hwm0} -> {hwm1} KiB, RssShmem {shm0} -> {shm1} KiB, "
              f"private growth {private_growth_kib} KiB", file=sys.stderr)
        self.assertGreater(shm1 - shm0, 60 << 10, "the payload was read in the segment")
        self.assertLess(private_growth_kib, 8 << 10)


@needs_dispatcher
class StreamTest(unittest.TestCase):
    def test_a_streaming_operation_hashes_a_large_payload_as_it_arrives(self) -> None:
        data = os.urandom(8 << 20)
        with connect() as c:
            got = c.call("pysha256s", data).decode().split()
            small = c.call("pysha256s", b"abc").decode().split()
        self.assertEqual(got[0], hashlib.sha256(data).hexdigest())
        # Sent to the worker while it arrived: more than one part.
        self.assertGreater(int(got[1]), 1, got)
        # A small input is one part.
        self.assertEqual(small, [hashlib.sha256(b"abc").hexdigest(), "1"])


@needs_dispatcher
class ZzRetryingTest(unittest.TestCase):
    """Last (unittest sorts by name): kills the dispatcher."""

    def test_a_retrying_client_survives_dispatcher_kills_with_every_answer_right(self) -> None:
        stop = threading.Event()
        failures: List[str] = []
        counts = [0] * 8

        def caller(n: int) -> None:
            rng = random.Random(n)
            try:
                with retrying(deadline=30.0) as rc:
                    while not stop.is_set():
                        data = rng.randbytes(rng.randrange(1, 2000))
                        if rc.call("pyupper", data) != data.upper():
                            raise AssertionError("wrong bytes")
                        counts[n] += 1
            except Exception as e:  # noqa: BLE001
                failures.append(f"caller {n}: {type(e).__name__}: {e}")

        threads = [threading.Thread(target=caller, args=(n,)) for n in range(8)]
        for t in threads:
            t.start()
        killed = set()
        try:
            for _ in range(3):
                time.sleep(0.7)
                with retrying(deadline=30.0) as rc:
                    pid = rc.status()["dispatcher_pid"]
                os.kill(pid, signal.SIGKILL)
                killed.add(pid)
            time.sleep(0.7)
        finally:
            stop.set()
            for t in threads:
                t.join(120)
        self.assertEqual(failures, [])
        self.assertTrue(all(counts), counts)
        with retrying(deadline=30.0) as rc:
            self.assertNotIn(rc.status()["dispatcher_pid"], killed)

    def test_a_retrying_client_stops_at_once_when_no_dispatcher_runs(self) -> None:
        rc = osps.RetryingClient("nobody-runs-this", runtime_dir=SCRATCH, start_grace=0.2)
        self.addCleanup(rc.close)
        began = time.monotonic()
        with self.assertRaises(osps.OspsConnectionError):
            rc.call("ping")
        self.assertLess(time.monotonic() - began, 5)


def executor(**kw) -> osps.Executor:
    return osps.Executor(INSTANCE, runtime_dir=RUNTIME_DIR, **kw)


@needs_dispatcher
class ExecutorTest(unittest.TestCase):
    """osps.Executor, the concurrent.futures face."""

    def test_submit_and_map_give_futures_of_bytes_and_typed_errors(self) -> None:
        import concurrent.futures as cf
        datas = [f"item {i}".encode() for i in range(100)]
        with executor(max_workers=4) as ex:
            self.assertIsInstance(ex, cf.Executor)
            self.assertEqual(list(ex.map("pyupper", datas)), [d.upper() for d in datas])
            self.assertEqual(ex.submit("pyargs", b"", "a", "b c").result(), b"a\x00b c")
            bad = ex.submit("pyraise", b"{oops")
            self.assertIsInstance(bad.exception(60), osps.InvalidInputError)
            self.assertIn("raised ValueError", bad.exception().message)
            # A crash fails its own future only: no BrokenProcessPool.
            pending = [ex.submit("pyupper", d) for d in datas[:20]]
            crash = ex.submit("pysegv")
            pending += [ex.submit("pyupper", d) for d in datas[20:40]]
            self.assertIsInstance(crash.exception(120), osps.WorkerCrashedError)
            self.assertEqual([f.result(120) for f in pending], [d.upper() for d in datas[:40]])
            self.assertEqual(ex.submit("pyupper", b"after").result(60), b"AFTER")
            clients = list(ex._clients)
        self.assertTrue(1 <= len(clients) <= 4, len(clients))
        self.assertTrue(all(rc._client is None for rc in clients), "shutdown closes the connections")
        self.assertEqual(ex._clients, [])
        with self.assertRaises(RuntimeError):
            ex.submit("pyupper", b"late")

    def test_max_workers_calls_run_at_once(self) -> None:
        with executor(max_workers=4) as ex:
            ex.submit("ping").result(60)  # connected
            began = time.monotonic()
            got = list(ex.map("pysleep", [b""] * 8, ["400"] * 8))
            took = time.monotonic() - began
        self.assertEqual(got, [b"slept\n"] * 8)
        self.assertGreaterEqual(took, 0.8)
        self.assertLess(took, 2.4, "8 calls of 0.4 s on 4 threads take 2 rounds, not 8")

    def test_cancelling_a_future_cancels_its_call(self) -> None:
        with executor(max_workers=1) as ex, connect() as watcher:
            running = ex.submit("pysleep", b"", "60000")
            waiting = ex.submit("pyupper", b"never")  # behind it, in the executor
            deadline = time.monotonic() + 60
            while not any(w["pool"] == "py" and w["state"] == "busy"
                          for w in watcher.status()["workers"]):
                self.assertLess(time.monotonic(), deadline, "the sleep never ran")
                time.sleep(0.02)
            time.sleep(0.1)  # sent whole: the call waits for its answer
            self.assertTrue(waiting.cancel(), "not started: cancelled as concurrent.futures does")
            self.assertTrue(waiting.cancelled())
            began = time.monotonic()
            self.assertFalse(running.cancel(), "running: False, and cancelled on the dispatcher")
            self.assertIsInstance(running.exception(30), osps.JobCancelledError)
            self.assertLess(time.monotonic() - began, 5)
            # The thread's connection stays in step (the cancel's answer was read).
            self.assertEqual(ex.submit("pyupper", b"after").result(60), b"AFTER")
            done = ex.submit("pyupper", b"done")
            self.assertEqual(done.result(60), b"DONE")
            self.assertFalse(done.cancel(), "a finished call")

    def test_bad_options_fail_at_construction(self) -> None:
        with self.assertRaises(TypeError):
            osps.Executor(INSTANCE, runtime_dir=RUNTIME_DIR, no_such_option=1)


class _CountingFile:
    """A binary file that records the size of each read."""

    def __init__(self, path: str) -> None:
        self.f = open(path, "rb")
        self.reads: List[int] = []

    def tell(self) -> int:
        return self.f.tell()

    def seek(self, pos: int, whence: int = 0) -> int:
        return self.f.seek(pos, whence)

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(n)
        self.reads.append(len(data))
        return data

    def readinto(self, buf) -> int:
        n = self.f.readinto(buf)
        self.reads.append(n)
        return n

    def close(self) -> None:
        self.f.close()


class RecordingServer(FakeServer):
    """A FakeServer, named for the tests that read its `payloads`."""


def _answer_sha256(server: "RecordingServer"):
    def behave(conn, req_id: int) -> None:
        if server.requests == 1:
            return  # the first answer is lost: the client must send it again
        digest = hashlib.sha256(server.payloads[-1]).hexdigest().encode()
        conn.sendall(wire.encode_frame(wire.encode_varint(req_id) + b"\x00"
                                       + wire.encode_varint(len(digest))) + digest)
    return behave


class CallFileRulesTest(unittest.TestCase):
    """call_file against a fake server: what goes out, and resends."""

    def test_a_retrying_client_sends_the_file_again_from_where_it_stood(self) -> None:
        path = os.path.join(SCRATCH, f"resend-{random.getrandbits(32):08x}")
        data = os.urandom(3 << 20)
        with open(path, "wb") as f:
            f.write(data)
        self.addCleanup(os.unlink, path)
        for start, arg in ((0, path), (5, None)):
            server = RecordingServer(lambda conn, req_id: None)
            server.behave = _answer_sha256(server)
            try:
                with osps.RetryingClient(socket_path=server.path, deadline=30.0) as rc:
                    if arg is None:
                        arg = _CountingFile(path)
                        self.addCleanup(arg.close)
                        arg.seek(start)
                    got = rc.call_file("sha256", arg)
                want = data[start:]
                self.assertEqual(got, hashlib.sha256(want).hexdigest().encode())
                self.assertEqual(server.payloads, [want, want])
                if isinstance(arg, _CountingFile):
                    self.assertEqual(sum(arg.reads), 2 * len(want))
                    self.assertLessEqual(max(arg.reads), 256 << 10, "read in chunks")
            finally:
                server.close()

    def test_a_small_file_goes_out_whole_and_a_file_that_shrinks_is_refused(self) -> None:
        path = os.path.join(SCRATCH, f"small-{random.getrandbits(32):08x}")
        with open(path, "wb") as f:
            f.write(b"tiny")
        self.addCleanup(os.unlink, path)
        def pong_unless_gone(conn, req_id: int) -> None:
            try:
                _pong(conn, req_id)
            except OSError:
                pass  # the client of the cut-short request has gone
        server = RecordingServer(pong_unless_gone)
        self.addCleanup(server.close)
        with osps.connect(socket_path=server.path) as c:
            self.assertEqual(c.call_file("x", path), b"pong\n")
        self.assertEqual(server.payloads, [b"tiny"])

        class Shrinking(_CountingFile):
            def seek(self, pos: int, whence: int = 0) -> int:
                got = self.f.seek(pos, whence)
                return got + (1 << 20) if whence == os.SEEK_END else got
        f = Shrinking(path)
        self.addCleanup(f.close)
        c = osps.connect(socket_path=server.path)
        with self.assertRaises(ValueError) as e:
            c.call_file("x", f)
        self.assertIn("ended", str(e.exception))


@needs_dispatcher
class CallFileTest(unittest.TestCase):
    def test_64_mib_stream_from_a_file_with_the_client_staying_small(self) -> None:
        path = os.path.join(SCRATCH, f"big-{random.getrandbits(32):08x}")
        h = hashlib.sha256()
        with open(path, "wb") as f:
            for _ in range(64):
                chunk = os.urandom(1 << 20)
                h.update(chunk)
                f.write(chunk)
        self.addCleanup(os.unlink, path)
        want = (h.hexdigest() + "\n").encode()
        # A fresh process, so its peak RSS (VmHWM: ru_maxrss would count
        # this process's, from before the exec) is this call's alone.
        script = (
            "import osps, sys\n"
            "c = osps.connect(sys.argv[1], runtime_dir=sys.argv[2])\n"
            "sys.stdout.buffer.write(c.call_file('bigsha256', sys.argv[3]))\n"
            "print([l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM:')][0])\n")
        p = subprocess.run([sys.executable, "-c", script, INSTANCE, RUNTIME_DIR, path],
                           capture_output=True, timeout=300)
        self.assertEqual(p.returncode, 0, p.stderr)
        digest, maxrss_kib = p.stdout.rsplit(b"\n", 2)[:2]
        self.assertEqual(digest + b"\n", want)
        print(f"\n  64 MiB from a file: the client's peak RSS {int(maxrss_kib) >> 10} MiB",
              file=sys.stderr)
        self.assertLess(int(maxrss_kib), 40 << 10, "the file was not read into memory whole")
        # In this process too, through a RetryingClient, counting the reads.
        f = _CountingFile(path)
        self.addCleanup(f.close)
        with retrying(deadline=30.0) as rc:
            self.assertEqual(rc.call_file("bigsha256", f), want)
        self.assertEqual(sum(f.reads), 64 << 20)
        self.assertLessEqual(max(f.reads), 256 << 10)


if __name__ == "__main__":
    unittest.main()
