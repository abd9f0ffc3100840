//! The instance lock: an exclusive `flock` on a file in the runtime directory,
//! held for the dispatcher's whole life. The kernel drops it when the process
//! dies, however it dies, so a free lock proves that whatever is left under
//! the instance's names belongs to a dead predecessor.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};

/// Errors taking the lock.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Another live process holds it.
    #[error("instance is already served by a live dispatcher (pid {pid}) holding {path}; stop it first or choose another --instance")]
    Held { pid: String, path: PathBuf },
    #[error("cannot use lock file {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// A held instance lock; released (and its file removed) on drop.
#[derive(Debug)]
pub struct InstanceLock {
    file: Option<Flock<File>>,
    path: PathBuf,
}

impl InstanceLock {
    /// Takes the lock at `path` without waiting and writes our pid in it.
    /// A symbolic link at `path` is refused (`O_NOFOLLOW`): the lock file is
    /// truncated and written, so following a link planted there would let
    /// whoever planted it choose the file we overwrite.
    pub fn acquire(path: &Path) -> Result<InstanceLock, LockError> {
        let io = |source| LockError::Io {
            path: path.to_path_buf(),
            source,
        };
        loop {
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .mode(0o600)
                .custom_flags(libc::O_NOFOLLOW)
                .open(path)
                .map_err(io)?;
            let mut locked = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
                Ok(l) => l,
                Err((mut file, nix::errno::Errno::EWOULDBLOCK)) => {
                    let mut pid = String::new();
                    let _ = file.read_to_string(&mut pid);
                    let pid = pid.trim();
                    let pid = if pid.is_empty() {
                        "unknown".to_owned()
                    } else {
                        pid.to_owned()
                    };
                    return Err(LockError::Held {
                        pid,
                        path: path.to_path_buf(),
                    });
                }
                Err((_, e)) => return Err(io(e.into())),
            };
            // A predecessor may have unlinked the file between our open and
            // our lock: then we hold a lock nobody else can see. Retry.
            let same = match (locked.metadata(), std::fs::symlink_metadata(path)) {
                (Ok(a), Ok(b)) => a.ino() == b.ino() && a.dev() == b.dev(),
                _ => false,
            };
            if !same {
                continue;
            }
            locked.set_len(0).map_err(io)?;
            locked.rewind().map_err(io)?;
            writeln!(locked, "{}", std::process::id()).map_err(io)?;
            return Ok(InstanceLock {
                file: Some(locked),
                path: path.to_path_buf(),
            });
        }
    }

    /// The lock file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Whether a live process holds the lock at `path`: `Some(pid)` (as written
/// in the file, or `unknown`) if so. A probe that creates nothing: it takes
/// a shared lock without waiting and releases it at once.
pub fn holder(path: &Path) -> Option<String> {
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
        .ok()?;
    match Flock::lock(file, FlockArg::LockSharedNonblock) {
        Ok(_released_on_drop) => None,
        Err((mut file, nix::errno::Errno::EWOULDBLOCK)) => {
            let mut pid = String::new();
            let _ = file.read_to_string(&mut pid);
            let pid = pid.trim();
            Some(if pid.is_empty() { "unknown" } else { pid }.to_owned())
        }
        Err(_) => None,
    }
}

impl Drop for InstanceLock {
    fn drop(&mut self) {
        // Unlink while still holding the lock, then release: a newcomer that
        // opened the old inode notices the swap and retries (see `acquire`).
        let _ = std::fs::remove_file(&self.path);
        drop(self.file.take());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_taker_is_refused_with_the_holders_pid() {
        let dir = std::env::temp_dir().join(format!("osps-lock-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("x.lock");
        let held = InstanceLock::acquire(&path).unwrap();
        match InstanceLock::acquire(&path) {
            Err(LockError::Held { pid, .. }) => assert_eq!(pid, std::process::id().to_string()),
            other => panic!("expected Held, got {other:?}"),
        }
        drop(held);
        assert!(!path.exists(), "the lock file is removed on release");
        let again = InstanceLock::acquire(&path).unwrap();
        assert_eq!(holder(&path), Some(std::process::id().to_string()));
        drop(again);
        assert_eq!(holder(&path), None, "free once released");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
