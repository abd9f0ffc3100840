//! The System V backend, seen with `ipcs -m`: listed with perms 600 while the
//! dispatcher runs, removed by an ordered shutdown, and a crashed
//! dispatcher's segment removed at the next start (which makes its own under
//! a fresh name, so a fresh key).

use std::process::Command;
use std::time::Duration;

use nix::sys::signal::Signal;
use osps_testkit::{sysv_name, wait_for, Instance, PATIENCE};

const ARGS: &[&str] = osps_testkit::args!(2, 8, 1048576, "--segment", "sysv");

/// The `ipcs -m` line of the segment with this key, if listed.
fn ipcs_line(key: i32) -> Option<String> {
    let out = Command::new("ipcs")
        .arg("-m")
        .output()
        .expect("ipcs runs (util-linux)");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let key = format!("0x{:08x}", key);
    text.lines()
        .find(|l| l.split_whitespace().next() == Some(key.as_str()))
        .map(str::to_owned)
}

#[test]
fn ipcs_lists_the_segment_with_perms_600_and_an_ordered_stop_removes_it() {
    let mut inst = Instance::start("sysv", ARGS);
    let key = ipc_core::segment::sysv_key(&sysv_name(&inst.paths));
    let line = ipcs_line(key).expect("ipcs -m lists the segment while OSPS runs");
    let cols: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(cols[3], "600", "perms: {line}");
    assert_eq!(
        cols[5], "3",
        "attached: the dispatcher and 2 workers: {line}"
    );
    let s = inst.status().segment;
    assert_eq!(
        (s.backend.as_str(), s.mode.as_str(), s.attached),
        ("sysv", "0600", 3)
    );
    assert!(s.see.starts_with("ipcs -m -i "), "{}", s.see);
    assert!(
        !inst.paths.segment_path().exists(),
        "nothing under /dev/shm"
    );
    let data: Vec<u8> = (0..1_000_000u32).map(|i| (i % 241) as u8).collect();
    assert_eq!(
        inst.client().call("upper", &[], &data).unwrap(),
        data.to_ascii_uppercase()
    );

    inst.signal(Signal::SIGTERM);
    assert_eq!(inst.wait_exit(PATIENCE).expect("exits").code(), Some(0));
    assert_eq!(
        ipcs_line(key),
        None,
        "removed (IPC_RMID) by the ordered shutdown"
    );
    assert_eq!(inst.leftovers(), Vec::<String>::new());
}

#[test]
fn a_crashed_dispatchers_segment_is_removed_at_the_next_start() {
    let inst = Instance::supervised("sysvcrash", &["--heartbeat-ms", "100"], ARGS);
    let key = ipc_core::segment::sysv_key(&sysv_name(&inst.paths));
    let old = inst.dispatcher_pid();
    assert_eq!(inst.status().segment.generation, 1);
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(old as i32), Signal::SIGKILL).unwrap();
    let s = wait_for(PATIENCE, || {
        inst.try_status()
            .filter(|s| s.dispatcher_pid != old && s.workers.iter().all(|w| w.state == "idle"))
    })
    .expect("the watchdog restarts the dispatcher");
    assert_eq!(
        s.segment.generation, 2,
        "rebuilt from the dead one's generation"
    );
    assert!(inst
        .log()
        .contains("removed the segment of a dead predecessor"));
    // The dead one's segment is gone; the new one (a fresh name, so a fresh
    // key) is listed once, attached by the new processes only.
    assert_eq!(
        ipcs_line(key),
        None,
        "the dead dispatcher's segment is removed"
    );
    let new_key = ipc_core::segment::sysv_key(&s.segment.name);
    assert_ne!(new_key, key);
    let table = std::fs::read_to_string("/proc/sysvipc/shm").unwrap();
    let ours = table
        .lines()
        .filter(|l| l.split_whitespace().next() == Some(&new_key.to_string()))
        .count();
    assert_eq!(ours, 1);
    let key = new_key;
    let line = ipcs_line(key).expect("listed");
    assert!(
        wait_for(Duration::from_secs(5), || (ipcs_line(key)?
            .split_whitespace()
            .nth(5)?
            == "3")
            .then_some(()))
        .is_some(),
        "{line}"
    );
}
