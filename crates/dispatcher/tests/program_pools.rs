//! Program pools, with a worker written in another language:
//! `tests/workers/grower.py` is written from docs/PROTOCOL.md section 13
//! alone (Python, no SDK). It answers `ping`; a run that got a result area
//! and died does not leak that area into the next run's answer; a greedy
//! job that keeps asking for result areas is refused once its areas would
//! pass three times its pool's limit (one over the limit at once), and a
//! wait for room is short while the peer's small requests go on; a pool
//! slow to start neither keeps the dispatcher from serving nor loses its
//! operations; `ping` goes to a pool with a live worker; a worker
//! announcing `status` is refused; a worker that leaks is recycled by its
//! resident memory, with no job failed; a worker whose result pipe closes
//! has its job answered then, before it is reaped, and its slot freed only
//! once it is.

use std::path::Path;
use std::time::{Duration, Instant};

use ipc_core::proto::ErrorKind;
use osps_client::ClientError;
use osps_testkit::{config_file, pool_segment, Instance};

/// The arguments of a dispatcher serving the configuration `config` (in
/// which `GROWER` stands for the Python worker's path), with a segment of
/// `segment_mib` and payloads of up to 64 KiB; the guard keeps the file.
fn setup(config: &str, segment_mib: &str) -> (tempfile::TempDir, Vec<String>) {
    let grower = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/workers/grower.py");
    let (dir, path) = config_file(&config.replace("GROWER", grower.to_str().unwrap()));
    let args = [
        "--config",
        path.to_str().unwrap(),
        "--segment-mib",
        segment_mib,
        "--max-payload",
        "65536",
    ];
    (dir, args.map(String::from).to_vec())
}

fn strs(args: &[String]) -> Vec<&str> {
    args.iter().map(String::as_str).collect()
}

fn too_large(r: Result<Vec<u8>, ClientError>) -> String {
    match r {
        Err(ClientError::Remote(e)) if e.kind == ErrorKind::TooLarge => e.message,
        other => panic!("too large expected, got {other:?}"),
    }
}

#[test]
fn a_python_worker_serves_and_a_greedy_job_is_refused_room_past_three_times_the_limit() {
    let (_dir, args) = setup(
        "[pools.builtin]\nenabled = false\n\n[pools.py]\nprogram = [\"python3\", \"GROWER\"]\nworkers = 1\nmax_result_mib = 1\n",
        "16",
    );
    let inst = Instance::start("pp-grow", &strs(&args));
    let mut c = inst.client();
    c.ping().unwrap();
    let st = inst.status();
    assert_eq!(
        (st.pools[0].kind.as_str(), &st.pools[0].ops[..]),
        (
            "program",
            &[
                "grow".to_owned(),
                "leak".to_owned(),
                "shared".to_owned(),
                "stale".to_owned(),
                "vanish".to_owned()
            ][..]
        )
    );
    // A run that got an area and died: the next run answers in its slot,
    // and the client gets that answer, not the dead run's area.
    assert_eq!(c.call("stale", &[], b"input").unwrap(), b"fresh\n");
    // Areas of 1 MiB, one after another: three are given, the fourth refused.
    let said = too_large(c.call("grow", &["1048576"], b""));
    assert!(
        said.contains("the job's result areas would hold")
            && said.contains("more than 3 times pool \"py\"'s limit of 1048576 bytes"),
        "{said}"
    );
    // More than the limit at once: refused at once.
    let said = too_large(c.call("grow", &["1048577"], b""));
    assert_eq!(
        said,
        "a result of 1048577 bytes exceeds pool \"py\"'s limit of 1048576 bytes (max_result_mib)"
    );
    // The job's areas went with it; the worker serves on.
    inst.wait_status("the areas freed", |st| {
        pool_segment(st, "py").slots_in_use == 0
    });
    c.ping().unwrap();
    assert!(inst.status().workers.iter().all(|w| w.restarts == 1));
}

#[test]
fn results_cannot_take_the_arena_from_others_and_a_wait_for_room_is_short() {
    let (_dir, args) = setup(
        "[pools.builtin]\nworkers = 1\n\n[pools.py]\nprogram = [\"python3\", \"GROWER\"]\nworkers = 1\nmax_result_mib = 4\n",
        "8",
    );
    let inst = Instance::start("pp-busy", &strs(&args));
    let endpoint = inst.endpoint();
    let began = Instant::now();
    let greedy = std::thread::spawn(move || {
        let mut c = osps_client::Client::connect(&endpoint).unwrap();
        too_large(c.call("grow", &["1048576"], b""))
    });
    // While it holds what its peer may of its pool's 8 MiB arena and
    // waits for more, the same peer's requests to another pool are served
    // (from that pool's own segment).
    inst.wait_status("the greedy job holds areas", |st| {
        pool_segment(st, "py").slot_bytes_in_use >= 4 << 20
    });
    let mut c = inst.client();
    for _ in 0..20 {
        assert_eq!(c.call("upper", &[], b"served").unwrap(), b"SERVED");
    }
    // The wait for room is short: refused, not left to the job's timeout.
    let said = greedy.join().unwrap();
    assert!(
        said.starts_with("no room in the shared segment for a result of 1048576 bytes within 2s"),
        "{said}"
    );
    assert!(
        began.elapsed() < Duration::from_secs(10),
        "{:?}",
        began.elapsed()
    );
    inst.wait_status("the areas freed", |st| {
        pool_segment(st, "py").slots_in_use == 0
    });
}

#[test]
fn a_slow_pool_neither_keeps_the_dispatcher_from_serving_nor_loses_its_operations() {
    // Its first worker takes 8 s to be ready (a program that sleeps first).
    let (_dir, args) = setup(
        "[pools.builtin]\nworkers = 1\n\n[pools.slow]\nprogram = [\"sh\", \"-c\", \"sleep 8; exec python3 GROWER\"]\nworkers = 1\nmax_result_mib = 1\n",
        "16",
    );
    // Alone: it listens before the slow pool is ready, and a request for
    // that pool's operation waits for it rather than being told it is unknown.
    let t = Instant::now();
    let inst = Instance::start_answering("pp-slow", &strs(&args));
    assert_eq!(inst.client().call("upper", &[], b"up").unwrap(), b"UP");
    assert!(
        t.elapsed() < Duration::from_millis(7500),
        "{:?}",
        t.elapsed()
    );
    let said = too_large(inst.client().call("grow", &["2000000"], b""));
    assert!(said.contains("exceeds pool \"slow\"'s limit"), "{said}");
    drop(inst);
    // Under the watchdog (start timeout 10 s): never taken for hung, as it
    // was when the dispatcher listened only once every pool was ready.
    let inst = Instance::supervised("pp-slowwd", &[], &strs(&args));
    let st = inst.status();
    assert_eq!(st.watchdog.as_ref().map(|w| w.restarts), Some(0), "{st:?}");
    assert_eq!(
        st.pools[1].ops,
        ["grow", "leak", "shared", "stale", "vanish"]
    );
}

#[test]
fn ping_goes_to_a_pool_with_a_live_worker_even_when_it_is_busy() {
    let (_dir, args) = setup(
        "[pools.builtin]\nworkers = 1\n\n[pools.broken]\nprogram = [\"false\"]\nworkers = 1\n",
        "16",
    );
    let inst = Instance::start_answering("pp-ping", &strs(&args));
    inst.wait_status("the builtin worker up", |st| {
        st.workers
            .iter()
            .any(|w| w.pool == "builtin" && w.state == "idle")
    });
    let endpoint = inst.endpoint();
    let sleeper = std::thread::spawn(move || {
        let mut c = osps_client::Client::connect(&endpoint).unwrap();
        c.call("sleep", &["1500"], b"")
    });
    inst.wait_status("the builtin worker busy", |st| {
        st.workers
            .iter()
            .any(|w| w.pool == "builtin" && w.state == "busy")
    });
    // No pool has an idle worker: the ping waits for the builtin one.
    let t = Instant::now();
    assert_eq!(inst.client().call("ping", &[], b"").unwrap(), b"pong\n");
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
    assert_eq!(sleeper.join().unwrap().unwrap(), b"slept 1500 ms\n");
}

#[test]
fn a_worker_announcing_status_is_refused() {
    let (_dir, args) = setup(
        "[pools.builtin]\nworkers = 1\n\n[pools.bad]\nprogram = [\"python3\", \"GROWER\", \"status\"]\nworkers = 1\n",
        "16",
    );
    let inst = Instance::start_answering("pp-status", &strs(&args));
    let st = inst.wait_status("the bad pool refused", |st| {
        st.pools.iter().any(|p| {
            p.name == "bad"
                && p.start_failure.as_deref().is_some_and(|f| {
                    f.contains("announces \"status\", which cannot be an operation's name")
                })
        })
    });
    assert!(st.pools[1].ops.is_empty(), "{st:?}");
    // The dispatcher still answers status itself, and the builtin pool serves.
    assert_eq!(inst.client().call("upper", &[], b"ok").unwrap(), b"OK");
}

#[test]
fn a_worker_that_leaks_is_recycled_by_its_memory_with_no_job_failed() {
    let (_dir, args) = setup(
        "[pools.builtin]\nenabled = false\n\n[pools.py]\nprogram = [\"python3\", \"GROWER\"]\nworkers = 1\nrecycle_above_rss_mib = 60\n",
        "16",
    );
    let inst = Instance::start("pp-leak", &strs(&args));
    let mut c = inst.client();
    let mut pids = Vec::new();
    // 20 MiB kept per job: over 60 MiB after the third or so.
    for _ in 0..8 {
        let pid = String::from_utf8(c.call("leak", &["20"], b"").unwrap()).unwrap();
        pids.push(pid);
    }
    let st = inst.wait_status("a worker recycled for its memory", |st| {
        st.pools[0].recycled_above_rss >= 1
    });
    let pool = &st.pools[0];
    assert_eq!((pool.restarts, pool.jobs_failed), (0, 0), "{pool:?}");
    assert_eq!(pool.recycled, pool.recycled_above_rss, "{pool:?}");
    // The next job runs on the fresh process (the leaky one kept serving
    // while its replacement started).
    let fresh = String::from_utf8(c.call("leak", &["1"], b"").unwrap()).unwrap();
    assert!(!pids.contains(&fresh), "{fresh} served before: {pids:?}");
    assert!(
        inst.log().contains("worker recycled with ")
            && inst.log().contains("MiB resident (recycle_above_rss_mib)"),
        "{}",
        inst.log()
    );
}

#[test]
fn a_dead_workers_job_is_answered_at_once_and_its_slot_freed_once_it_is_reaped() {
    let (_dir, args) = setup(
        "[pools.builtin]\nenabled = false\n\n[pools.py]\nprogram = [\"python3\", \"GROWER\"]\nworkers = 1\nmax_attempts = 1\n",
        "16",
    );
    let inst = Instance::start("pp-vanish", &strs(&args));
    let mut c = inst.client();
    // Whether the answer came while the dead worker still existed, and a
    // status after it too (this test's own thread may be held up past the
    // reap on a busy machine: tried again then, up to 3 times).
    let (mut unreaped, mut slot_seen_held) = (false, false);
    for _ in 0..3 {
        let st = inst.wait_status("a worker up", |st| st.workers[0].state.is_up());
        let pid = st.workers[0].pid;
        let proc = format!("/proc/{pid}");
        // 1 GiB to free: its exit takes tens of ms after the kill (about
        // 50-90 ms here), while its pipe said it was gone before the kill.
        let got = c.call("vanish", &["1024"], b"");
        unreaped |= Path::new(&proc).exists();
        match got {
            Err(ClientError::Remote(e)) if e.kind == ErrorKind::WorkerCrashed => {}
            other => panic!("worker crashed expected, got {other:?}"),
        }
        // Until it is reaped, its job's slot is not free: a status taken
        // while the process still exists counts it; and the job lost is
        // counted already, against the worker as in the total.
        let st = inst.status();
        if Path::new(&proc).exists() {
            assert_eq!(pool_segment(&st, "py").slots_in_use, 1, "{st:?}");
            assert_eq!(st.workers[0].jobs_failed, st.jobs_failed, "{st:?}");
            slot_seen_held = true;
        }
        let st = inst.wait_status("reaped, replaced and its slot freed", |st| {
            pool_segment(st, "py").slots_in_use == 0
                && st.workers[0].pid != pid
                && st.workers[0].state.is_up()
        });
        assert!(!Path::new(&proc).exists(), "{st:?}");
        if slot_seen_held {
            break;
        }
    }
    assert!(unreaped, "answered only once the worker was reaped");
    assert!(
        slot_seen_held,
        "never saw a status while the dead worker existed"
    );
    assert_eq!(c.call("ping", &[], b"").unwrap(), b"pong\n");
}
