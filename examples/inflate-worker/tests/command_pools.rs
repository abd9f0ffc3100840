//! Command pools served by a real dispatcher from a configuration file,
//! next to the builtin pool and the example worker: each job runs the
//! command (`osps-worker` in exec mode) with the payload on its stdin and
//! its stdout as the result, however large; a failing command, one past its
//! timeout with children of its own, and arguments are answered as
//! documented, and no process of a job is left.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ipc_core::proto::{ErrorKind, RemoteError};
use osps_testkit::Instance;

const WORKER: &str = env!("CARGO_BIN_EXE_inflate-worker");

/// A configuration file in a fresh directory (kept alive by the guard).
fn config(text: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("osps.toml");
    std::fs::write(&path, text).unwrap();
    (dir, path)
}

fn start(tag: &str, path: &Path) -> Instance {
    Instance::start(
        tag,
        &[
            "--config",
            path.to_str().unwrap(),
            "--segment-mib",
            "64",
            "--max-payload",
            "4194304",
        ],
    )
}

fn remote(e: osps_client::ClientError) -> RemoteError {
    match e {
        osps_client::ClientError::Remote(e) => e,
        other => panic!("a typed error expected, got {other}"),
    }
}

/// `len` bytes that do not compress (xorshift).
fn noise(len: usize) -> Vec<u8> {
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn gunzip(gz: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(gz)
        .read_to_end(&mut out)
        .unwrap();
    out
}

/// Live (not zombie) processes of process group `pgid`.
fn group_members(pgid: i32) -> Vec<i32> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let Some(close) = text.rfind(')') else {
            continue;
        };
        let fields: Vec<&str> = text[close + 2..].split(' ').collect();
        if fields.len() > 2 && fields[2] == pgid.to_string() && !matches!(fields[0], "Z" | "X") {
            found.push(pid);
        }
    }
    found
}

/// Kills a command's process group when the test ends, however it ends.
struct GroupGuard(i32);

impl Drop for GroupGuard {
    fn drop(&mut self) {
        let _ = nix::sys::signal::killpg(
            nix::unistd::Pid::from_raw(self.0),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}

fn assert_group_gone(pgid: i32) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !group_members(pgid).is_empty() {
        assert!(
            Instant::now() < deadline,
            "group {pgid} left: {:?}",
            group_members(pgid)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn three_pools_builtin_the_example_worker_and_a_command_each_answer_their_operations() {
    let (_dir, path) = config(&format!(
        "[pools.builtin]\nworkers = 1\n\n\
         [pools.inflate]\nprogram = [\"{WORKER}\"]\nworkers = 1\n\n\
         [pools.gz]\nexec = [\"gzip\", \"-c\"]\nops = [\"gzip_c\"]\nworkers = 2\n"
    ));
    let inst = start("cmd-three", &path);
    let mut c = inst.client();
    // 1 MiB of random data through the command pool: larger than it went in,
    // and gunzips to the input.
    let data = noise(1 << 20);
    let gz = c.call("gzip_c", &[], &data).unwrap();
    assert!(gz.len() > data.len(), "{} bytes", gz.len());
    assert!(gunzip(&gz) == data);
    // The example worker's operation, and a builtin one.
    assert!(c.call("gunzip", &[], &gz).unwrap() == data);
    assert_eq!(c.call("upper", &[], b"abc").unwrap(), b"ABC");
    c.ping().unwrap();
    let st = inst.status();
    let gz_pool = st.pools.iter().find(|p| p.name == "gz").unwrap();
    assert_eq!(
        (gz_pool.kind.as_str(), &gz_pool.ops[..]),
        ("exec", &["gzip_c".to_owned()][..])
    );
    assert!(st.workers.iter().all(|w| w.restarts == 0), "{st:?}");
}

#[test]
fn a_failing_command_and_one_past_its_timeout_get_clear_errors_and_leave_nothing() {
    let (_dir, path) = config(
        "[pools.builtin]\nworkers = 1\n\n\
         [pools.fail]\nexec = [\"sh\", \"-c\", \"echo oops >&2; exit 3\"]\nops = [\"fail\"]\nworkers = 1\n\n\
         [pools.slow]\nexec = [\"sh\", \"-c\", \"echo started $$ >&2; sleep 100 & sleep 100\"]\nops = [\"slow\"]\nworkers = 1\njob_timeout_ms = 500\n\n\
         [pools.args]\nexec = [\"sh\", \"-c\", \"printf '%s,' \\\"$@\\\"\", \"sh\"]\nops = [\"args\"]\npass_args = true\nworkers = 1\n",
    );
    let inst = start("cmd-errors", &path);
    let mut c = inst.client();
    let e = remote(c.call("fail", &[], b"x").unwrap_err());
    assert_eq!(
        (e.kind, e.message.as_str()),
        (
            ErrorKind::CommandFailed,
            "sh exited with status 3; stderr: oops"
        )
    );
    let began = Instant::now();
    let e = remote(c.call("slow", &[], b"").unwrap_err());
    assert_eq!(e.kind, ErrorKind::Timeout, "{e}");
    let pgid: i32 = e
        .message
        .strip_prefix("sh ran past 500 ms and was killed; stderr: started ")
        .unwrap_or_else(|| panic!("{e}"))
        .parse()
        .unwrap();
    let _guard = GroupGuard(pgid);
    assert!(
        began.elapsed() < Duration::from_secs(3),
        "{:?}",
        began.elapsed()
    );
    assert_group_gone(pgid);
    assert_eq!(c.call("args", &["a b", "c"], b"").unwrap(), b"a b,c,");
    // The command pools' workers answered all of it: none was replaced.
    let st = inst.status();
    assert!(st.workers.iter().all(|w| w.restarts == 0), "{st:?}");
}
