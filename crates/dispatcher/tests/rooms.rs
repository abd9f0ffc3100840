//! A worker program in another language as a pool: `tests/workers/grower.py`
//! is written from docs/PROTOCOL.md section 13 alone (Python, no SDK). It
//! answers `ping`; a run that got a result area and died does not leak
//! that area into the next run's answer; and a greedy job that keeps asking for result areas is
//! refused once its areas would pass three times its pool's limit, as one
//! over the limit is at once; the areas are freed when the job ends.

use std::path::Path;

use ipc_core::proto::ErrorKind;
use osps_client::ClientError;
use osps_testkit::{config_file, Instance};

fn too_large(r: Result<Vec<u8>, ClientError>) -> String {
    match r {
        Err(ClientError::Remote(e)) if e.kind == ErrorKind::TooLarge => e.message,
        other => panic!("too large expected, got {other:?}"),
    }
}

#[test]
fn a_python_worker_serves_and_a_greedy_job_is_refused_room_past_three_times_the_limit() {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/workers/grower.py");
    let (_dir, path) = config_file(&format!(
        "[pools.builtin]\nenabled = false\n\n[pools.py]\nprogram = [\"python3\", \"{}\"]\nworkers = 1\nmax_result_mib = 1\n",
        script.display()
    ));
    let inst = Instance::start(
        "rooms",
        &[
            "--config",
            path.to_str().unwrap(),
            "--segment-mib",
            "16",
            "--max-payload",
            "65536",
        ],
    );
    let mut c = inst.client();
    c.ping().unwrap();
    let st = inst.status();
    assert_eq!(
        (st.pools[0].kind.as_str(), &st.pools[0].ops[..]),
        ("program", &["grow".to_owned(), "stale".to_owned()][..])
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
    inst.wait_status("the areas freed", |st| st.segment.slots_in_use == 0);
    c.ping().unwrap();
    assert!(inst.status().workers.iter().all(|w| w.restarts == 1));
}

#[test]
fn results_cannot_take_the_arena_from_others_and_a_wait_for_room_is_short() {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/workers/grower.py");
    let (_dir, path) = config_file(&format!(
        "[pools.builtin]\nworkers = 1\n\n[pools.py]\nprogram = [\"python3\", \"{}\"]\nworkers = 1\nmax_result_mib = 4\n",
        script.display()
    ));
    let inst = Instance::start(
        "rooms-busy",
        &[
            "--config",
            path.to_str().unwrap(),
            "--segment-mib",
            "8",
            "--max-payload",
            "65536",
        ],
    );
    let endpoint = inst.endpoint();
    let began = std::time::Instant::now();
    let greedy = std::thread::spawn(move || {
        let mut c = osps_client::Client::connect(&endpoint).unwrap();
        too_large(c.call("grow", &["1048576"], b""))
    });
    // While it holds what its peer may of the 8 MiB arena and waits for
    // more, the same peer's small requests are served from the reserve.
    inst.wait_status("the greedy job holds areas", |st| {
        st.segment.slot_bytes_in_use >= 4 << 20
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
        began.elapsed() < std::time::Duration::from_secs(10),
        "{:?}",
        began.elapsed()
    );
    inst.wait_status("the areas freed", |st| st.segment.slots_in_use == 0);
}

/// A pool whose first worker takes 8 s to be ready (a program that
/// sleeps first), next to the builtin pool.
fn slow_pool() -> (tempfile::TempDir, std::path::PathBuf) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/workers/grower.py");
    config_file(&format!(
        "[pools.builtin]\nworkers = 1\n\n[pools.slow]\nprogram = [\"sh\", \"-c\", \"sleep 8; exec python3 {}\"]\nworkers = 1\nmax_result_mib = 1\n",
        script.display()
    ))
}

#[test]
fn a_slow_pool_neither_keeps_the_dispatcher_from_serving_nor_loses_its_operations() {
    let (_dir, path) = slow_pool();
    let args = [
        "--config",
        path.to_str().unwrap(),
        "--segment-mib",
        "16",
        "--max-payload",
        "65536",
    ];
    // Alone: it listens before the slow pool is ready, and a request for
    // that pool's operation waits for it rather than being told it is unknown.
    let t = std::time::Instant::now();
    let inst = Instance::start_answering("rooms-slow", &args);
    assert_eq!(inst.client().call("upper", &[], b"up").unwrap(), b"UP");
    assert!(
        t.elapsed() < std::time::Duration::from_millis(7500),
        "{:?}",
        t.elapsed()
    );
    let said = too_large(inst.client().call("grow", &["2000000"], b""));
    assert!(said.contains("exceeds pool \"slow\"'s limit"), "{said}");
    drop(inst);
    // Under the watchdog (start timeout 10 s): never taken for hung, as it
    // was when the dispatcher listened only once every pool was ready.
    let inst = Instance::supervised("rooms-slowwd", &[], &args);
    let st = inst.status();
    assert_eq!(st.watchdog.as_ref().map(|w| w.restarts), Some(0), "{st:?}");
    assert_eq!(st.pools[1].ops, ["grow", "stale"]);
}
