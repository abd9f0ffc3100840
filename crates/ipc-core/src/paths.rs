//! Runtime paths of an instance: its directory, socket, lock file and segment
//! name, all derived from the instance name so instances run side by side.

use std::fs;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Environment variable that overrides the base runtime directory.
pub const RUNTIME_DIR_ENV: &str = crate::env::RUNTIME_DIR;
/// Environment variable that names the instance (`--instance` wins over it).
pub const INSTANCE_ENV: &str = crate::env::INSTANCE;
/// The instance used when none is named.
pub const DEFAULT_INSTANCE: &str = "default";
/// Longest accepted instance name (keeps socket paths under `sun_path`'s 108 bytes).
pub const MAX_INSTANCE_LEN: usize = 48;

/// Errors while deriving or preparing runtime paths.
#[derive(Debug, thiserror::Error)]
pub enum PathError {
    #[error("invalid instance name {name:?}: use 1 to {MAX_INSTANCE_LEN} characters from [A-Za-z0-9_.-], not starting with '.' or '-'")]
    InvalidInstance { name: String },
    #[error("cannot prepare runtime directory {path}: {source}")]
    Dir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("runtime directory {path} is owned by uid {owner}, not by us (uid {uid}); remove it or choose another with --runtime-dir")]
    ForeignDir { path: PathBuf, owner: u32, uid: u32 },
    #[error("runtime directory {path} has mode {mode:04o}: writable by other users without the sticky bit, so they could replace what OSPS puts there; OSPS does not change the mode of a directory it did not create: use another --runtime-dir, or fix its mode yourself (chmod go-w, or +t for a shared one)")]
    UnsafeDir { path: PathBuf, mode: u32 },
    #[error("state file {path} is not trusted: {why}; remove it if you know no dispatcher of this instance runs")]
    State { path: PathBuf, why: String },
    #[error("socket path {path} is {len} bytes long; the limit is 107: choose a shorter --runtime-dir or instance name")]
    SocketPathTooLong { path: PathBuf, len: usize },
}

/// The paths of one instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuntimePaths {
    instance: String,
    dir: PathBuf,
    uid: u32,
}

/// Checks an instance name: it ends up in a file name and a segment name.
pub fn validate_instance(name: &str) -> Result<(), PathError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_INSTANCE_LEN
        && !name.starts_with(['.', '-'])
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(PathError::InvalidInstance {
            name: name.to_owned(),
        })
    }
}

/// The default base directory: `$XDG_RUNTIME_DIR/osps`, else `/tmp/osps-<uid>`.
pub fn default_base_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os(RUNTIME_DIR_ENV).filter(|d| !d.is_empty()) {
        return PathBuf::from(dir);
    }
    match std::env::var_os("XDG_RUNTIME_DIR").filter(|d| !d.is_empty()) {
        Some(xdg) => Path::new(&xdg).join("osps"),
        None => PathBuf::from(format!("/tmp/osps-{}", nix::unistd::getuid())),
    }
}

/// FNV-1a: a small, stable hash (the prefix must not change between builds).
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

/// The most of a state file read: a line per pool's segment (under 100
/// bytes each) for [`MAX_POOLS`] pools, with room to spare.
const STATE_MAX: u64 = 64 << 10;

/// The most pools a dispatcher runs (each has a segment, named in the
/// state file).
pub const MAX_POOLS: usize = 256;

/// What one dispatcher leaves for the next in [`RuntimePaths::state_file`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceState {
    /// The generation of the segments last built (the next start adds one).
    pub generation: u64,
    /// Those segments (one per pool, in the pools' order; the last one may
    /// be a name about to be tried), never empty.
    pub segments: Vec<RecordedSegment>,
}

/// A segment named in the state file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordedSegment {
    /// Its name, with the `sysv:` prefix for the System V backend.
    pub name: String,
    /// The uid it was given to: the dispatcher's, or its pool's `user`.
    pub owner: u32,
}

/// Creates `dir` with `mode` if absent (exactly that mode, whatever the
/// umask); else checks it without changing it. Returns its mode bits, its
/// group, and whether this call created it.
fn prepare_dir(dir: &Path, mode: u32, uid: u32, base: bool) -> Result<(u32, u32, bool), PathError> {
    let err = |source| PathError::Dir {
        path: dir.to_path_buf(),
        source,
    };
    let created = match fs::DirBuilder::new().mode(mode).create(dir) {
        Ok(()) => true,
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => false,
        Err(e) => return Err(err(e)),
    };
    let meta = fs::symlink_metadata(dir).map_err(err)?;
    if !meta.is_dir() {
        return Err(err(std::io::Error::other(
            "not a directory (a symlink or a file is not accepted)",
        )));
    }
    if created {
        // Ours, just made: the umask may have taken bits away.
        if meta.mode() & 0o777 != mode {
            let keep = meta.mode() & 0o7000; // e.g. setgid inherited from the parent
            fs::set_permissions(dir, fs::Permissions::from_mode(keep | mode)).map_err(err)?;
        }
        return Ok((mode, meta.gid(), true));
    }
    let owner_ok = meta.uid() == uid || (base && meta.uid() == 0);
    if !owner_ok {
        return Err(PathError::ForeignDir {
            path: dir.to_path_buf(),
            owner: meta.uid(),
            uid,
        });
    }
    let m = meta.mode() & 0o7777;
    let sticky = m & 0o1000 != 0;
    if m & 0o022 != 0 && !(base && sticky) {
        return Err(PathError::UnsafeDir {
            path: dir.to_path_buf(),
            mode: m,
        });
    }
    Ok((m, meta.gid(), false))
}

impl RuntimePaths {
    /// Paths of `instance` under `base` (or [`default_base_dir`] when `None`).
    pub fn new(instance: &str, base: Option<&Path>) -> Result<Self, PathError> {
        validate_instance(instance)?;
        let base = base.map(Path::to_path_buf).unwrap_or_else(default_base_dir);
        let base = std::path::absolute(&base).unwrap_or(base);
        let paths = RuntimePaths {
            instance: instance.to_owned(),
            dir: base.join(instance),
            uid: nix::unistd::getuid().as_raw(),
        };
        let sock = paths.socket();
        let len = sock.as_os_str().len();
        if len > 107 {
            return Err(PathError::SocketPathTooLong { path: sock, len });
        }
        Ok(paths)
    }

    /// The instance name.
    pub fn instance(&self) -> &str {
        &self.instance
    }

    /// The instance's runtime directory (mode 0700).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The dispatcher's Unix socket.
    pub fn socket(&self) -> PathBuf {
        self.dir.join(format!("{}.sock", self.instance))
    }

    /// The lock file the live dispatcher holds (`flock`) and writes its pid in.
    pub fn lock_file(&self) -> PathBuf {
        self.dir.join(format!("{}.lock", self.instance))
    }

    /// The start of every segment name of this instance:
    /// `/osps-<uid>-<instance>-<8 hex digits>-`. The uid keeps two users'
    /// instances apart; the digits hash the instance directory (`DIR/NAME`), so the same
    /// instance name in two runtime directories (two locks) is told apart.
    /// Each dispatcher appends 16 fresh random hex digits
    /// ([`RuntimePaths::new_segment_name`]), so no other user can guess a
    /// name before it is made, and records the name in the state file.
    pub fn segment_prefix(&self) -> String {
        format!(
            "/osps-{}-{}-{:08x}-",
            self.uid,
            self.instance,
            fnv1a(self.dir.as_os_str().as_encoded_bytes()) as u32
        )
    }

    /// A fresh, unguessable segment name: [`RuntimePaths::segment_prefix`]
    /// followed by 64 random bits (from the kernel) in hex.
    pub fn new_segment_name(&self) -> std::io::Result<String> {
        use std::io::Read;
        let mut bytes = [0u8; 8];
        fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
        Ok(format!(
            "{}{:016x}",
            self.segment_prefix(),
            u64::from_ne_bytes(bytes)
        ))
    }

    /// Whether `name` (POSIX, or System V with its `sysv:` prefix) has the
    /// form this instance gives its segments; the state file is trusted only
    /// for such names.
    pub fn is_segment_name(&self, name: &str) -> bool {
        let bare = crate::segment::Backend::base_name(name);
        bare.strip_prefix(&self.segment_prefix())
            .is_some_and(|r| r.len() == 16 && r.bytes().all(|b| b.is_ascii_hexdigit()))
    }

    /// The segment name the live (or last, crashed) dispatcher recorded in
    /// the state file, without the System V prefix; when none is recorded,
    /// [`RuntimePaths::segment_prefix`] (which names no segment). For tools
    /// and tests: the dispatcher itself reads [`RuntimePaths::read_state`].
    pub fn segment_name(&self) -> String {
        match self.read_state() {
            Ok(Some(st)) => crate::segment::Backend::base_name(&st.segments[0].name).to_owned(),
            _ => self.segment_prefix(),
        }
    }

    /// Where the recorded POSIX segment shows up in the file system.
    pub fn segment_path(&self) -> PathBuf {
        PathBuf::from(format!("/dev/shm{}", self.segment_name()))
    }

    /// The state file: what one dispatcher leaves for the next (generation
    /// and segment name), inside the instance's own directory so no other
    /// user can write it.
    pub fn state_file(&self) -> PathBuf {
        self.dir.join(format!("{}.state", self.instance))
    }

    /// The name of the directory holding the instance's workers' memory
    /// cgroups (`crate::cgroup`): `osps-UID-INSTANCE-HASH`, the hash of the
    /// runtime directory as in [`RuntimePaths::segment_prefix`], so the
    /// same instance name in two runtime directories has two.
    pub fn cgroup_name(&self) -> String {
        let prefix = self.segment_prefix();
        prefix
            .trim_start_matches('/')
            .trim_end_matches('-')
            .to_owned()
    }

    /// Where the path of that directory is kept while it exists (it may be
    /// under another cgroup than the next dispatcher's, which must find it).
    pub fn cgroup_record(&self) -> PathBuf {
        self.dir.join(format!("{}.cgroup", self.instance))
    }

    /// The path [`RuntimePaths::cgroup_record`] holds, if it is a regular
    /// file of ours (read as the state file is); `None` otherwise.
    pub fn read_cgroup_record(&self) -> Option<PathBuf> {
        read_own(&self.cgroup_record(), 4096)
            .ok()
            .flatten()
            .map(PathBuf::from)
    }

    /// The configuration file's text as the dispatcher last applied it (at
    /// its start or a reload): what a dispatcher restarted after a crash
    /// serves with when the file itself is refused (broken since).
    pub fn applied_config(&self) -> PathBuf {
        self.dir.join(format!("{}.applied.toml", self.instance))
    }

    /// Writes [`RuntimePaths::applied_config`], mode 0600, by a rename (a
    /// reader never sees half of it). Call only with the instance lock held
    /// and the directory checked as ours.
    pub fn save_applied_config(&self, text: &str) -> std::io::Result<()> {
        write_private(&self.applied_config(), text.as_bytes())
    }

    /// Reads the state file: `None` if there is none. A file that is not a
    /// regular file of ours, or does not parse, or names a segment not of
    /// this instance's form, is an error (and is not trusted).
    pub fn read_state(&self) -> Result<Option<InstanceState>, PathError> {
        let path = self.state_file();
        let bad = |why: String| PathError::State {
            path: path.clone(),
            why,
        };
        let Some(text) = read_own(&path, STATE_MAX).map_err(bad)? else {
            return Ok(None);
        };
        let euid = nix::unistd::geteuid().as_raw();
        let (mut generation, mut segments, mut ok) = (None, Vec::new(), true);
        for line in text.lines() {
            match line.split_once(' ') {
                Some(("generation", g)) => generation = g.trim().parse::<u64>().ok(),
                Some(("segment", s)) => match self.recorded(s, euid) {
                    Some(r) => segments.push(r),
                    None => ok = false,
                },
                _ => {}
            }
        }
        match generation {
            Some(generation) if ok && !segments.is_empty() => Ok(Some(InstanceState {
                generation,
                segments,
            })),
            _ => Err(bad(format!("unreadable contents {text:?}"))),
        }
    }

    /// A state file's `segment NAME [OWNER]` (no owner: ours, as a version
    /// with one segment wrote it); `None` for a name not of this instance.
    fn recorded(&self, line: &str, euid: u32) -> Option<RecordedSegment> {
        let mut words = line.split_whitespace();
        let name = words.next().filter(|n| self.is_segment_name(n))?;
        let owner = match words.next() {
            Some(uid) => uid.parse().ok()?,
            None => euid,
        };
        words.next().is_none().then(|| RecordedSegment {
            name: name.to_owned(),
            owner,
        })
    }

    /// Writes the state file atomically (a temporary file beside it, mode
    /// 0600, renamed over it).
    pub fn write_state(&self, state: &InstanceState) -> Result<(), PathError> {
        let path = self.state_file();
        let mut text = format!("generation {}\n", state.generation);
        for s in &state.segments {
            text.push_str(&format!("segment {} {}\n", s.name, s.owner));
        }
        write_private(&path, text.as_bytes()).map_err(|source| PathError::Dir { path, source })
    }

    /// Removes the state file (after an ordered stop, or once a dead
    /// dispatcher's leftovers are gone).
    pub fn remove_state(&self) {
        let _ = fs::remove_file(self.state_file());
    }

    /// Checks the base directory and creates the instance directory.
    ///
    /// The base directory is created (mode 0700) if absent. If it exists it
    /// is used as it is, never chmodded: it must be a directory (not a
    /// symlink) owned by us or by root, and not writable by group or others
    /// unless its sticky bit is set (like `/tmp`); else this refuses clearly.
    ///
    /// The instance directory, when this call creates it, gets mode 0700
    /// plus the base directory's group read and search bits, and then the
    /// base's group (so a group-shared base, the `--allow-uid` recipe,
    /// extends to it). If it exists it must be ours and not writable by
    /// group or others; its mode and group are kept as they are.
    ///
    /// Returns whether this call created the instance directory: only then
    /// may the caller remove it ([`RuntimePaths::remove_dir_if_empty`]).
    pub fn ensure_dir(&self) -> Result<bool, PathError> {
        let uid = nix::unistd::geteuid().as_raw();
        let base = self.dir.parent().unwrap_or(&self.dir);
        let (base_mode, base_gid, _) = prepare_dir(base, 0o700, uid, true)?;
        let shared = base_mode & 0o050;
        let (_, gid, created) = prepare_dir(&self.dir, 0o700 | shared, uid, false)?;
        if created && shared != 0 && gid != base_gid {
            // Best effort (allowed to root, or to a member of that group): a
            // new instance directory shares the base's group with its bits.
            let _ = std::os::unix::fs::chown(&self.dir, None, Some(base_gid));
        }
        Ok(created)
    }

    /// Whether the instance directory exists, is a directory (not a link),
    /// belongs to our effective uid and is writable by no one else: only
    /// then is nobody else able to put or swap anything in it, and may
    /// files in it be opened, truncated or removed by path.
    pub fn dir_is_ours(&self) -> bool {
        fs::symlink_metadata(&self.dir).is_ok_and(|m| {
            m.is_dir() && m.uid() == nix::unistd::geteuid().as_raw() && m.mode() & 0o022 == 0
        })
    }

    /// Removes the instance directory if it is empty (best effort). Only for
    /// a directory the caller created ([`RuntimePaths::ensure_dir`] said
    /// so): one OSPS did not create is never removed.
    pub fn remove_dir_if_empty(&self) {
        let _ = fs::remove_dir(&self.dir);
    }

    /// The name segments of this instance had before names got a random
    /// part (`/osps-<uid>-<instance>-<8 hex digits>`, and its System V key
    /// with the `sysv:` prefix): a segment a crashed dispatcher of that
    /// version left under it is removed at start (only if ours).
    pub fn legacy_segment_name(&self) -> String {
        self.segment_prefix().trim_end_matches('-').to_owned()
    }
}

/// Writes `bytes` to `path` whole or not at all: a temporary file beside
/// it (`PATH.tmp`, mode 0600, not through a link), renamed over it. Call
/// only in a directory checked as ours, with the instance lock held.
pub(crate) fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let _ = fs::remove_file(&tmp);
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&tmp)?;
    f.write_all(bytes)?;
    drop(f);
    fs::rename(&tmp, path)
}

/// The text of `path` (at most `max` bytes), if it exists: opened without
/// following a link (nor blocking on a FIFO), and refused unless the file
/// opened is a regular file owned by this process's uid (the reason).
fn read_own(path: &Path, max: u64) -> Result<Option<String>, String> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = match fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e.to_string()),
    };
    let meta = file.metadata().map_err(|e| e.to_string())?;
    let euid = nix::unistd::geteuid().as_raw();
    if !meta.is_file() || meta.uid() != euid {
        return Err(format!(
            "not a regular file owned by uid {euid} (owner {})",
            meta.uid()
        ));
    }
    let mut text = String::new();
    file.by_ref()
        .take(max)
        .read_to_string(&mut text)
        .map_err(|e| e.to_string())?;
    Ok(Some(text))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instance_names_are_checked() {
        for good in ["default", "a", "t-1_2.x", "A9"] {
            validate_instance(good).unwrap();
        }
        for bad in ["", ".hidden", "-x", "a/b", "a b", "é", &"x".repeat(49)] {
            assert!(validate_instance(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn paths_carry_the_instance_name() {
        let p = RuntimePaths::new("blue", Some(Path::new("/run/test"))).unwrap();
        assert_eq!(p.dir(), Path::new("/run/test/blue"));
        assert!(p.socket().to_str().unwrap().contains("blue"));
        assert!(p.lock_file().to_str().unwrap().contains("blue"));
        assert!(p.segment_name().starts_with("/osps-") && p.segment_name().contains("-blue-"));
    }

    #[test]
    fn segment_names_are_fresh_and_recognised() {
        let p = RuntimePaths::new("blue", Some(Path::new("/run/test"))).unwrap();
        let (a, b) = (p.new_segment_name().unwrap(), p.new_segment_name().unwrap());
        assert_ne!(a, b);
        for n in [&a, &format!("sysv:{b}")] {
            assert!(p.is_segment_name(n), "{n}");
        }
        for other in [
            RuntimePaths::new("blue-x", Some(Path::new("/run/test"))).unwrap(),
            RuntimePaths::new("blue", Some(Path::new("/run/other"))).unwrap(),
        ] {
            assert!(!other.is_segment_name(&a), "{a}");
        }
        for n in [
            &p.segment_prefix(),
            "/etc/passwd",
            &format!("{a}0"),
            "/osps-0-blue-../../x",
        ] {
            assert!(!p.is_segment_name(n), "{n}");
        }
    }

    #[test]
    fn the_state_file_round_trips_and_an_untrusted_one_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let p = RuntimePaths::new("st", Some(tmp.path())).unwrap();
        p.ensure_dir().unwrap();
        assert_eq!(p.read_state().unwrap(), None);
        let st = InstanceState {
            generation: u64::MAX,
            segments: vec![
                RecordedSegment {
                    name: format!("sysv:{}", p.new_segment_name().unwrap()),
                    owner: 0,
                },
                RecordedSegment {
                    name: p.new_segment_name().unwrap(),
                    owner: 65534,
                },
            ],
        };
        p.write_state(&st).unwrap();
        assert_eq!(p.read_state().unwrap(), Some(st.clone()));
        let first = &st.segments[0].name;
        assert_eq!(p.segment_name(), first.strip_prefix("sysv:").unwrap());
        // A file of a version with one segment and no owner: ours.
        let euid = nix::unistd::geteuid().as_raw();
        fs::write(p.state_file(), format!("generation 3\nsegment {first}\n")).unwrap();
        let old = p.read_state().unwrap().unwrap();
        assert_eq!((old.generation, old.segments[0].owner), (3, euid));
        let bad_owner = format!("generation 3\nsegment {first} nobody\n");
        fs::write(p.state_file(), bad_owner).unwrap();
        assert!(matches!(p.read_state(), Err(PathError::State { .. })));
        assert_eq!(fs::metadata(p.state_file()).unwrap().mode() & 0o777, 0o600);
        fs::write(p.state_file(), "generation 3\nsegment /dev/shm/../x\n").unwrap();
        assert!(matches!(p.read_state(), Err(PathError::State { .. })));
        p.remove_state();
        std::os::unix::fs::symlink("/etc/hostname", p.state_file()).unwrap();
        assert!(matches!(p.read_state(), Err(PathError::State { .. })));
    }

    #[test]
    fn a_state_file_naming_a_segment_per_pool_for_the_most_pools_is_read_whole() {
        let tmp = tempfile::tempdir().unwrap();
        let p = RuntimePaths::new("many-pools-instance", Some(tmp.path())).unwrap();
        p.ensure_dir().unwrap();
        let segments: Vec<RecordedSegment> = (0..MAX_POOLS)
            .map(|i| RecordedSegment {
                name: format!("sysv:{}", p.new_segment_name().unwrap()),
                owner: 4_000_000_000 - i as u32,
            })
            .collect();
        let st = InstanceState {
            generation: u64::MAX,
            segments,
        };
        p.write_state(&st).unwrap();
        let len = fs::metadata(p.state_file()).unwrap().len();
        assert!(len > 16 << 10 && len < STATE_MAX, "{len}");
        assert_eq!(p.read_state().unwrap(), Some(st));
    }

    #[test]
    fn directories_are_0700_under_any_umask() {
        let tmp = std::env::temp_dir().join(format!("osps-paths-test-{}", std::process::id()));
        let p = RuntimePaths::new("x", Some(&tmp)).unwrap();
        let old = nix::sys::stat::umask(nix::sys::stat::Mode::empty());
        let res = p.ensure_dir();
        nix::sys::stat::umask(old);
        res.unwrap();
        for d in [&tmp, &p.dir().to_path_buf()] {
            assert_eq!(
                fs::metadata(d).unwrap().mode() & 0o777,
                0o700,
                "{}",
                d.display()
            );
        }
        fs::remove_dir_all(&tmp).unwrap();
    }
}
