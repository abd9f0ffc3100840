//! Running OSPS programs as `nobody` (uid 65534) from a test run as root:
//! the other uid of the attacks and of the unprivileged instances.

#![allow(dead_code)] // each test file uses a part

use std::path::{Path, PathBuf};
use std::process::Command;

/// `nobody`'s uid (and `nogroup`'s gid).
pub const NOBODY: u32 = 65534;

/// Whether the test runs as root (else the other-uid tests are skipped).
pub fn root_or_skip(what: &str) -> bool {
    let root = nix::unistd::getuid().is_root();
    if !root {
        eprintln!("skipped: {what} needs root (to act as another uid)");
    }
    root
}

/// Copies a workspace binary into `dir` (mode 0755), where `nobody` can run
/// it: the checkout itself may sit where `nobody` cannot read.
pub fn copy_bin(name: &str, dir: &Path) -> PathBuf {
    let to = dir.join(name);
    osps_testkit::install_exe(&osps_testkit::bin(name), &to);
    to
}

/// A command that runs `program` as `nobody` (primary group `nogroup`, no others).
pub fn as_nobody(program: &Path) -> Command {
    let mut c = Command::new("setpriv");
    c.args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(program);
    c
}

/// `osps-client ping` run as `nobody` against `socket`: exit code and stderr.
pub fn ping_as_nobody(client: &Path, socket: &Path) -> (Option<i32>, String) {
    let out = as_nobody(client)
        .arg("--connect")
        .arg(format!("unix:{}", socket.display()))
        .args(["ping", "--timeout-ms", "2000"])
        .output()
        .expect("setpriv runs");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A process killed and reaped when dropped, even when an assertion failed.
pub use osps_testkit::Reaped as Proc;

/// Removes everything of an instance when dropped, after its processes are
/// gone (declare it before the [`Proc`]s, so it drops after them): segments
/// of any generation (`/dev/shm` entries with the instance's prefix, and the
/// System V segment the state file names), socket, state and lock files.
pub struct Leftovers {
    /// The instance's runtime directory.
    pub dir: PathBuf,
    /// Segment names start with this (`osps-<uid>-<instance>-`, no slash).
    pub prefix: String,
}

impl Drop for Leftovers {
    fn drop(&mut self) {
        if let Ok(entries) = std::fs::read_dir(&self.dir) {
            for e in entries.flatten() {
                let text = std::fs::read_to_string(e.path()).unwrap_or_default();
                for line in text.lines() {
                    if let Some(name) = line.strip_prefix("segment ") {
                        ipc_core::segment::unlink(name);
                    }
                }
                let _ = std::fs::remove_file(e.path());
            }
        }
        if let Ok(entries) = std::fs::read_dir("/dev/shm") {
            for e in entries.flatten() {
                if e.file_name().to_string_lossy().starts_with(&self.prefix) {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
    }
}
