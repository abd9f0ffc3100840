//! What happens under the instance lock at a start, and when a watchdog gives
//! up: clearing a dead dispatcher's leftovers (its segment, only if it is
//! ours; its socket; its state file) and making a fresh segment under an
//! unguessable name recorded in the state file.
//!
//! Nothing here opens, maps or trusts an object another uid could have made:
//! what must survive a crash (the generation, the segment's name) lives in
//! the state file inside the instance's own directory, and the segment of a
//! predecessor is removed by name after an ownership check, never mapped.

use crate::lock::{InstanceLock, LockError};
use crate::paths::{InstanceState, PathError, RecordedSegment, RuntimePaths};
use crate::segment::{self, Backend, Removal, Segment, SegmentError};

/// Fresh names tried before giving up (each collision is a 1 in 2^64 chance,
/// or an object someone made under that exact name).
const NAME_ATTEMPTS: usize = 16;

/// What a dead predecessor left, as found (and cleared) under the lock.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Predecessor {
    /// Its segment's generation (0 if none was recorded).
    pub generation: u64,
    /// What was removed, for the log (`segment NAME`, `cgroup DIR`,
    /// `socket PATH`).
    pub removed: Vec<String>,
}

/// Removes what a dead dispatcher of this instance left behind: the segments
/// named in the state file (only if ours, or given by us to the uid
/// recorded with it: [`segment::remove_if_given`]), a
/// segment under the old fixed name of a version before the state file
/// ([`RuntimePaths::legacy_segment_name`], both backends, also only if ours),
/// its workers' memory cgroups ([`crate::cgroup::remove_leftovers`], with
/// what is still in them) and the socket, unless `keep_socket` (a socket the watchdog or systemd
/// holds, passed to the caller: it outlives every dispatcher). Holding
/// `_lock` proves no live dispatcher owns them. The state file is kept (the
/// caller writes the next one, or removes it).
pub fn clear_predecessor(
    paths: &RuntimePaths,
    _lock: &InstanceLock,
    keep_socket: bool,
) -> Predecessor {
    let mut found = Predecessor::default();
    let euid = nix::unistd::geteuid().as_raw();
    let mut remove =
        |name: &str, owner: u32, what: &str| match segment::remove_if_given(name, owner) {
            Removal::Removed => found.removed.push(format!("segment {name}")),
            Removal::Absent => {}
            // Another uid's object under a name it could guess: never touched.
            Removal::Foreign { uid } => tracing::warn!(
                segment = %name,
                owner = uid,
                "the {what} name is held by another uid; left alone"
            ),
        };
    let state = match paths.read_state() {
        Ok(state) => state,
        Err(e) => {
            tracing::warn!("{e}; starting from generation 1");
            None
        }
    };
    for s in state.iter().flat_map(|st| &st.segments) {
        remove(&s.name, s.owner, "recorded segment's");
    }
    let legacy = paths.legacy_segment_name();
    for name in Backend::ALL.map(|b| b.segment_name(&legacy)) {
        remove(&name, euid, "old fixed segment");
    }
    if let Some(state) = state {
        found.generation = state.generation;
    }
    found.removed.extend(crate::cgroup::remove_leftovers(paths));
    let socket = paths.socket();
    if !keep_socket && std::fs::remove_file(&socket).is_ok() {
        found.removed.push(format!("socket {}", socket.display()));
    }
    found
}

/// A segment to make at a start: one per pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Wanted {
    pub backend: Backend,
    pub arena_len: usize,
    /// The uid and gid to give it to (a pool's `user`); `None`: ours.
    pub owner: Option<(u32, u32)>,
}

/// Creates the instance's segments, one per [`Wanted`], in order: each
/// under a fresh random name (retried if taken), recorded with
/// `generation` and its owner in the state file *before* the segment is
/// made, so a crash at any point leaves nothing unrecorded; each in its
/// backend (whose name format the recorded name carries, e.g. the `sysv:`
/// prefix), and given to its owner before its name goes anywhere else. On
/// an error, those made already are removed with the state file.
pub fn create_segments(
    paths: &RuntimePaths,
    _lock: &InstanceLock,
    wanted: &[Wanted],
    generation: u64,
) -> Result<Vec<Segment>, StartError> {
    let mut made = Vec::with_capacity(wanted.len());
    let mut recorded = Vec::with_capacity(wanted.len());
    for w in wanted {
        match create_one(paths, w, generation, &mut recorded) {
            Ok(seg) => made.push(seg),
            Err(e) => {
                drop(made); // their creator: dropping unlinks them
                paths.remove_state();
                return Err(e);
            }
        }
    }
    Ok(made)
}

/// Makes more segments for a running dispatcher (a reload's new pools),
/// like [`create_segments`]: each recorded in the state file after `kept`
/// (the segments the dispatcher holds, recorded already) before it is made.
/// Returns them and the state file's list now. On an error, those made
/// already are removed and the state file names `kept` again.
pub fn add_segments(
    paths: &RuntimePaths,
    _lock: &InstanceLock,
    kept: &[RecordedSegment],
    wanted: &[Wanted],
    generation: u64,
) -> Result<(Vec<Segment>, Vec<RecordedSegment>), StartError> {
    let mut made = Vec::with_capacity(wanted.len());
    let mut recorded = kept.to_vec();
    for w in wanted {
        match create_one(paths, w, generation, &mut recorded) {
            Ok(seg) => made.push(seg),
            Err(e) => {
                drop(made); // their creator: dropping unlinks them
                let _ = paths.write_state(&InstanceState {
                    generation,
                    segments: kept.to_vec(),
                });
                return Err(e);
            }
        }
    }
    Ok((made, recorded))
}

/// One segment of [`create_segments`]; `recorded` holds those made before
/// it, and this one's name once made.
fn create_one(
    paths: &RuntimePaths,
    w: &Wanted,
    generation: u64,
    recorded: &mut Vec<RecordedSegment>,
) -> Result<Segment, StartError> {
    let euid = nix::unistd::geteuid().as_raw();
    for _ in 0..NAME_ATTEMPTS {
        let name = paths
            .new_segment_name()
            .map_err(|e| StartError::Random(e.to_string()))?;
        recorded.push(RecordedSegment {
            name: w.backend.segment_name(&name),
            owner: w.owner.map_or(euid, |(uid, _)| uid),
        });
        paths.write_state(&InstanceState {
            generation,
            segments: recorded.clone(),
        })?;
        let name = &recorded[recorded.len() - 1].name;
        match Segment::create(name, w.arena_len, generation) {
            Ok(seg) => {
                if let Some((uid, gid)) = w.owner {
                    seg.give_to(uid, gid)?;
                }
                return Ok(seg);
            }
            Err(SegmentError::Exists { .. }) => {
                tracing::warn!(segment = %name, "segment name already taken; trying another");
                recorded.pop();
            }
            Err(e) => return Err(e.into()),
        }
    }
    Err(StartError::NoFreeName(NAME_ATTEMPTS))
}

/// Why [`create_segments`] failed.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Paths(#[from] PathError),
    #[error(transparent)]
    Segment(#[from] SegmentError),
    #[error("cannot read random bytes for a segment name: {0}")]
    Random(String),
    #[error("{0} fresh random segment names were all taken")]
    NoFreeName(usize),
}

/// Clears a dead dispatcher's leftovers for whoever outlives it (a watchdog
/// that gives up, or one whose dispatcher had to be SIGKILLed): takes the
/// instance lock first, so a live dispatcher's objects are never touched
/// ([`LockError::Held`] then), removes the segment, socket and state file,
/// releases the lock (which removes the lock file) and, with `remove_dir`
/// (the caller created the instance directory), removes that directory if
/// this left it empty. The socket is kept with `keep_socket` (systemd's, from
/// `osps.socket`). Returns what was removed.
pub fn remove_leftovers(
    paths: &RuntimePaths,
    remove_dir: bool,
    keep_socket: bool,
) -> Result<Vec<String>, LockError> {
    if std::fs::symlink_metadata(paths.dir()).is_err() {
        return Ok(Vec::new()); // nothing there: nothing left
    }
    if !paths.dir_is_ours() {
        // Gone and made again by someone else (the base directory may be a
        // shared sticky one such as /tmp), or never ours: whatever is in it
        // is theirs, and opening a lock file there could follow a link they
        // planted. Touch nothing.
        tracing::warn!(
            dir = %paths.dir().display(),
            "not clearing leftovers: the instance directory is not ours alone"
        );
        return Ok(Vec::new());
    }
    let lock = InstanceLock::acquire(&paths.lock_file())?;
    let found = clear_predecessor(paths, &lock, keep_socket);
    paths.remove_state();
    let _ = std::fs::remove_file(paths.applied_config());
    drop(lock);
    if remove_dir {
        paths.remove_dir_if_empty();
    }
    Ok(found.removed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    /// A directory standing in for a shared sticky base such as /tmp.
    fn shared_base() -> tempfile::TempDir {
        let base = tempfile::tempdir().unwrap();
        std::fs::set_permissions(base.path(), std::fs::Permissions::from_mode(0o1777)).unwrap();
        base
    }

    #[test]
    fn leftovers_are_not_cleared_in_an_instance_directory_others_can_write() {
        let base = shared_base();
        let paths = RuntimePaths::new("victim", Some(base.path())).unwrap();
        let target = base.path().join("precious");
        std::fs::write(&target, b"keep me\n").unwrap();
        // The instance directory was removed at a stop and made again by
        // someone else, with a lock file that is a link to another file.
        std::fs::create_dir(paths.dir()).unwrap();
        std::fs::set_permissions(paths.dir(), std::fs::Permissions::from_mode(0o777)).unwrap();
        std::os::unix::fs::symlink(&target, paths.lock_file()).unwrap();
        assert_eq!(
            remove_leftovers(&paths, true, false).unwrap(),
            Vec::<String>::new()
        );
        assert_eq!(std::fs::read(&target).unwrap(), b"keep me\n");
        assert!(
            std::fs::symlink_metadata(paths.lock_file()).is_ok(),
            "theirs, left alone"
        );
    }

    #[test]
    fn leftovers_are_not_cleared_in_an_instance_directory_of_another_uid() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: needs root to give the directory to another uid");
            return;
        }
        let base = shared_base();
        let paths = RuntimePaths::new("victim", Some(base.path())).unwrap();
        let target = base.path().join("precious");
        std::fs::write(&target, b"keep me\n").unwrap();
        std::fs::create_dir(paths.dir()).unwrap();
        std::os::unix::fs::symlink(&target, paths.lock_file()).unwrap();
        std::os::unix::fs::chown(paths.dir(), Some(65534), Some(65534)).unwrap();
        assert_eq!(
            remove_leftovers(&paths, true, false).unwrap(),
            Vec::<String>::new()
        );
        assert_eq!(std::fs::read(&target).unwrap(), b"keep me\n");
    }

    #[test]
    fn the_lock_is_never_taken_through_a_link() {
        let base = tempfile::tempdir().unwrap();
        let target = base.path().join("precious");
        std::fs::write(&target, b"keep me\n").unwrap();
        let link = base.path().join("x.lock");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        assert!(InstanceLock::acquire(&link).is_err());
        assert_eq!(std::fs::read(&target).unwrap(), b"keep me\n");
    }

    #[test]
    fn leftovers_in_our_own_directory_are_cleared() {
        let base = tempfile::tempdir().unwrap();
        let paths = RuntimePaths::new("mine", Some(base.path())).unwrap();
        assert!(paths.ensure_dir().unwrap());
        std::fs::write(paths.socket(), b"").unwrap();
        remove_leftovers(&paths, true, false).unwrap();
        assert!(
            !paths.dir().exists(),
            "our empty instance directory is removed"
        );
    }
}
