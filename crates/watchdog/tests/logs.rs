//! `--log-format json`: every line the watchdog, the dispatcher and the
//! workers write is one JSON object naming its role and pid, and the
//! lifecycle events (start, ready, child exit, shutdown steps) are at info.

use nix::sys::signal::Signal;
use osps_testkit::{wait_for, Instance, PATIENCE};

#[test]
fn json_logs_name_role_and_pid_and_carry_the_lifecycle() {
    let mut inst = Instance::supervised(
        "jsonlog",
        &["--log-format", "json", "--heartbeat-ms", "100"],
        osps_testkit::args!(2, 16, 1048576),
    );
    let watchdog = inst.pid();
    let dispatcher = inst.dispatcher_pid();
    assert_eq!(inst.client().call("ping", &[], &[]).unwrap(), b"pong\n");
    // The watchdog's own verdict comes with its next heartbeat.
    assert!(
        wait_for(PATIENCE, || inst
            .log()
            .contains("ready: the dispatcher answers")
            .then_some(()))
        .is_some(),
        "{}",
        inst.log()
    );
    inst.signal(Signal::SIGTERM);
    assert!(inst.wait_exit(PATIENCE).expect("watchdog exits").success());

    let log = inst.log();
    let mut events = Vec::new();
    for line in log.lines() {
        let v: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("not one JSON object ({e}): {line}"));
        let span = &v["spans"][0];
        let (role, pid) = (
            span["role"].as_str().unwrap(),
            span["pid"].as_u64().unwrap(),
        );
        match role {
            "watchdog" => assert_eq!(pid, u64::from(watchdog), "{line}"),
            "dispatcher" => assert_eq!(pid, u64::from(dispatcher), "{line}"),
            other => panic!("unexpected role {other}: {line}"),
        }
        assert!(
            v["timestamp"].is_string() && v["level"].is_string(),
            "{line}"
        );
        events.push((
            role.to_owned(),
            v["level"].as_str().unwrap().to_owned(),
            v["fields"]["message"].as_str().unwrap().to_owned(),
        ));
    }
    // In this order, each at info.
    let expected = [
        ("watchdog", "watchdog started"),
        ("watchdog", "dispatcher started"),
        // Each pool's first worker is ready before the dispatcher listens.
        ("dispatcher", "worker started"),
        ("dispatcher", "dispatcher ready"),
        (
            "watchdog",
            "ready: the dispatcher answers and 2 worker(s) are up",
        ),
        ("watchdog", "SIGTERM received"),
        ("watchdog", "stopping the dispatcher (SIGTERM)"),
        ("dispatcher", "SIGTERM: shutting down"),
        (
            "dispatcher",
            "closing the workers' job pipes and reaping them",
        ),
        ("dispatcher", "worker stopped: exit status 0"),
        ("dispatcher", "dispatcher stopped"),
        ("watchdog", "dispatcher exited: exit status 0"),
        ("watchdog", "watchdog stopped"),
    ];
    let mut at = 0;
    for (role, start) in expected {
        let found = events[at..]
            .iter()
            .position(|(r, _, m)| r == role && m.starts_with(start))
            .unwrap_or_else(|| panic!("no {role} {start:?} after event {at}; log:\n{log}"));
        at += found;
        assert_eq!(events[at].1, "INFO", "{:?}", events[at]);
        at += 1;
    }
}
