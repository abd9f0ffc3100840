//! Runtime paths of an instance: its directory, socket, lock file and segment
//! name, all derived from the instance name so instances run side by side.

use std::fs;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Environment variable that overrides the base runtime directory.
pub const RUNTIME_DIR_ENV: &str = "OSPS_RUNTIME_DIR";
/// Environment variable that names the instance (`--instance` wins over it).
pub const INSTANCE_ENV: &str = "OSPS_INSTANCE";
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

/// FNV-1a: a small, stable hash (the name must not change between builds).
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    })
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

    /// The POSIX shared-memory name (`/dev/shm/<name without the slash>`):
    /// `/osps-<uid>-<instance>-<8 hex digits>`. The uid keeps two users'
    /// instances apart; the digits hash the runtime directory, because the
    /// lock that guards the name lives there: two runtime directories (say,
    /// one with `XDG_RUNTIME_DIR` set and one without) hold two locks, so they
    /// must not share a segment either.
    pub fn segment_name(&self) -> String {
        format!(
            "/osps-{}-{}-{:08x}",
            self.uid,
            self.instance,
            fnv1a(self.dir.as_os_str().as_encoded_bytes()) as u32
        )
    }

    /// Where the segment shows up in the file system.
    pub fn segment_path(&self) -> PathBuf {
        PathBuf::from(format!("/dev/shm{}", self.segment_name()))
    }

    /// Creates the base and instance directories with mode 0700 (set
    /// explicitly, whatever the umask) and checks that we own them.
    pub fn ensure_dir(&self) -> Result<(), PathError> {
        let uid = self.uid;
        for dir in [self.dir.parent().unwrap_or(&self.dir), &self.dir] {
            let err = |source| PathError::Dir {
                path: dir.to_path_buf(),
                source,
            };
            match fs::DirBuilder::new().mode(0o700).create(dir) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(err(e)),
            }
            let meta = fs::symlink_metadata(dir).map_err(err)?;
            if !meta.is_dir() {
                return Err(err(std::io::Error::other("not a directory")));
            }
            if meta.uid() != uid {
                return Err(PathError::ForeignDir {
                    path: dir.to_path_buf(),
                    owner: meta.uid(),
                    uid,
                });
            }
            if meta.mode() & 0o777 != 0o700 {
                fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(err)?;
            }
        }
        Ok(())
    }

    /// Removes the instance directory if it is empty (best effort).
    pub fn remove_dir_if_empty(&self) {
        let _ = fs::remove_dir(&self.dir);
    }
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
    fn the_same_instance_in_two_runtime_directories_gets_two_segments() {
        let a = RuntimePaths::new("blue", Some(Path::new("/run/user/1000/osps"))).unwrap();
        let b = RuntimePaths::new("blue", Some(Path::new("/tmp/osps-1000"))).unwrap();
        assert_ne!(a.segment_name(), b.segment_name());
        assert_eq!(
            a.segment_name(),
            RuntimePaths::new("blue", Some(Path::new("/run/user/1000/osps")))
                .unwrap()
                .segment_name()
        );
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
