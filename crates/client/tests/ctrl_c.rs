//! Ctrl-C on `osps-client run`: the job is cancelled on the dispatcher (its
//! worker killed and replaced at once) and the client exits 130 with one
//! line; a second Ctrl-C exits at once. And `Client::cancel` in the library.

use std::process::Stdio;
use std::time::{Duration, Instant};

use ipc_core::status::WorkerState;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use osps_client::ClientError;
use osps_testkit::{client_command, spawn_capturing, wait_for, Instance, Reaped, PATIENCE};

const ARGS: &[&str] = osps_testkit::args!(1, 16, 4194304);

/// `osps-client run sleep 60000` against `inst`, once its job runs: the
/// client, and the pid of the worker running its job.
fn sleeping_client(inst: &Instance) -> (Reaped, u32) {
    let mut cmd = client_command(inst.name(), inst.runtime_dir());
    cmd.args(["run", "sleep", "60000"]);
    let client = Reaped(Some(spawn_capturing(&mut cmd, Stdio::null()).unwrap()));
    let st = inst.wait_status("the client's job running", |s| {
        s.workers[0].state == WorkerState::Busy
    });
    // The handler is installed before the request goes out; give the
    // client a moment to be waiting for the answer.
    std::thread::sleep(Duration::from_millis(100));
    (client, st.workers[0].pid)
}

fn interrupt(client: &Reaped) {
    kill(Pid::from_raw(client.pid() as i32), Signal::SIGINT).unwrap();
}

#[test]
fn ctrl_c_cancels_the_job_on_the_dispatcher_and_exits_130() {
    let inst = Instance::start("ctrlc", ARGS);
    let (client, old) = sleeping_client(&inst);
    let t = Instant::now();
    interrupt(&client);
    // The job ends on the dispatcher within a second: its worker is gone.
    let ended = wait_for(PATIENCE, || {
        let st = inst.try_status()?;
        let w = &st.workers[0];
        (w.pid != old && w.state != WorkerState::Busy).then(|| t.elapsed())
    })
    .expect("the worker replaced");
    eprintln!("job ended on the dispatcher {ended:?} after Ctrl-C");
    assert!(ended < Duration::from_secs(1), "{ended:?}");
    let out = client.output();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("cancelled"), "{stderr}");
    assert!(out.stdout.is_empty());
    let st = inst.wait_status("a new worker up", |s| s.workers[0].state.is_up());
    assert_eq!((st.jobs_cancelled, st.jobs_failed), (1, 0), "{st:?}");
    assert_ne!(st.workers[0].pid, old);
}

#[test]
fn a_second_ctrl_c_exits_at_once() {
    // A dispatcher that never answers (stopped): the cancel gets no answer.
    let inst = Instance::start("ctrlc2", ARGS);
    let (mut client, _) = sleeping_client(&inst);
    inst.signal(Signal::SIGSTOP);
    interrupt(&client);
    std::thread::sleep(Duration::from_millis(200));
    // The first Ctrl-C waits for the cancel's answer (2 s at most).
    let waiting = client.0.as_mut().unwrap().try_wait().unwrap().is_none();
    let t = Instant::now();
    interrupt(&client);
    let out = client.output();
    inst.signal(Signal::SIGCONT);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(waiting, "the first Ctrl-C ended the client: {stderr}");
    assert_eq!(out.status.code(), Some(130), "{stderr}");
    assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
}

#[test]
fn the_library_cancels_by_the_id_send_gave() {
    let inst = Instance::start("libcancel", ARGS);
    let mut c = inst.client();
    let id = c.send("sleep", &["60000"], &[]).unwrap();
    inst.wait_status("the job running", |s| {
        s.workers[0].state == WorkerState::Busy
    });
    assert!(c.cancel(id).unwrap());
    // Its answer came first, and was kept for `wait`.
    match c.wait(id) {
        Err(ClientError::Remote(e)) => {
            assert_eq!(e.kind, ipc_core::ErrorKind::Cancelled, "{e}");
            assert_eq!(e.kind.name(), "cancelled");
        }
        other => panic!("{other:?}"),
    }
    assert!(!c.cancel(id).unwrap(), "answered already");
    assert_eq!(c.call("echo", &[], b"on").unwrap(), b"on");
}
