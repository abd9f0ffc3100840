//! Routing with pools that fail: `ping` goes to a pool with a live worker
//! (not one whose program cannot start), and a worker that announces a
//! name no operation may have (`status`, the dispatcher's) is refused.

use std::path::Path;
use std::time::{Duration, Instant};

use osps_testkit::{config_file, Instance};

#[test]
fn ping_goes_to_a_pool_with_a_live_worker_even_when_it_is_busy() {
    let (_dir, path) = config_file(
        "[pools.builtin]\nworkers = 1\n\n[pools.broken]\nprogram = [\"false\"]\nworkers = 1\n",
    );
    let inst = Instance::start_answering(
        "route-ping",
        &[
            "--config",
            path.to_str().unwrap(),
            "--segment-mib",
            "16",
            "--max-payload",
            "65536",
        ],
    );
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
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/workers/grower.py");
    let (_dir, path) = config_file(&format!(
        "[pools.builtin]\nworkers = 1\n\n[pools.bad]\nprogram = [\"python3\", \"{}\", \"status\"]\nworkers = 1\n",
        script.display()
    ));
    let inst = Instance::start_answering(
        "route-status",
        &[
            "--config",
            path.to_str().unwrap(),
            "--segment-mib",
            "16",
            "--max-payload",
            "65536",
        ],
    );
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
