//! The shared secret a TCP client presents in its hello when the dispatcher
//! asks for one (`--token-file`; required for a non-loopback address).
//!
//! The token lives in a file that only its owner may read: [`load`] refuses a
//! file that the group or others can read or write, or that belongs to
//! another user, so a token cannot leak through loose permissions unnoticed.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// Shortest token accepted, in bytes (after trimming trailing whitespace).
pub const MIN_TOKEN_LEN: usize = 16;
/// Longest token accepted, in bytes; also the most a dispatcher reads.
pub const MAX_TOKEN_LEN: usize = 256;

/// Why a token file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// The file cannot be read.
    #[error("token file {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What the system said.
        #[source]
        source: std::io::Error,
    },
    /// The file's mode, owner, kind or contents are not acceptable.
    #[error("token file {path}: {why}")]
    Unsafe {
        /// The file.
        path: PathBuf,
        /// What is wrong and how to fix it.
        why: String,
    },
}

/// How to make a good token file (quoted in errors).
pub const HOW_TO_MAKE: &str = "make one with: (umask 077; head -c 32 /dev/urandom | base64 > FILE)";

/// Reads a token file: a regular file of mode 0600 or 0400 owned by the
/// current user, holding one token of 16 to 256 bytes (trailing whitespace,
/// such as the newline an editor adds, is not part of it).
pub fn load(path: &Path) -> Result<Vec<u8>, TokenError> {
    let io = |source| TokenError::Io {
        path: path.to_owned(),
        source,
    };
    let bad = |why: String| TokenError::Unsafe {
        path: path.to_owned(),
        why,
    };
    // One open: the checks apply to the very file that is read.
    let file = std::fs::File::open(path).map_err(io)?;
    let meta = file.metadata().map_err(io)?;
    if !meta.is_file() {
        return Err(bad("not a regular file".into()));
    }
    let mode = meta.mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(bad(format!(
            "mode {mode:04o} lets other users read or change it; run chmod 600 on it"
        )));
    }
    let me = nix::unistd::geteuid().as_raw();
    if meta.uid() != me {
        return Err(bad(format!(
            "owned by uid {}, not by this user (uid {me})",
            meta.uid()
        )));
    }
    let mut token = Vec::with_capacity(MAX_TOKEN_LEN + 1);
    // Enough to see that it is too long, whatever its size.
    std::io::Read::read_to_end(
        &mut std::io::Read::take(&file, (MAX_TOKEN_LEN + 64) as u64),
        &mut token,
    )
    .map_err(io)?;
    while token.last().is_some_and(u8::is_ascii_whitespace) {
        token.pop();
    }
    if !(MIN_TOKEN_LEN..=MAX_TOKEN_LEN).contains(&token.len()) {
        return Err(bad(format!(
            "holds {} bytes; a token is {MIN_TOKEN_LEN} to {MAX_TOKEN_LEN} bytes ({HOW_TO_MAKE})",
            token.len()
        )));
    }
    Ok(token)
}

/// Compares two tokens in time that depends on their lengths only, not on
/// where they differ (so a remote peer cannot guess a token byte by byte):
/// `subtle`'s constant-time equality.
pub fn matches(expected: &[u8], presented: &[u8]) -> bool {
    bool::from(subtle::ConstantTimeEq::ct_eq(expected, presented))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn file(mode: u32, body: &[u8]) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("token");
        std::fs::write(&p, body).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
        (dir, p)
    }

    #[test]
    fn a_private_file_is_read_without_its_newline() {
        let (_d, p) = file(0o600, b"0123456789abcdef-token\n");
        assert_eq!(load(&p).unwrap(), b"0123456789abcdef-token");
        let (_d, p) = file(0o400, b"0123456789abcdef");
        assert_eq!(load(&p).unwrap(), b"0123456789abcdef");
    }

    #[test]
    fn loose_modes_short_tokens_and_directories_are_refused() {
        for mode in [0o644, 0o640, 0o604, 0o660, 0o606] {
            let (_d, p) = file(mode, b"0123456789abcdef-token");
            let e = load(&p).unwrap_err().to_string();
            assert!(e.contains("chmod 600"), "{mode:o}: {e}");
        }
        let (_d, p) = file(0o600, b"short\n");
        assert!(load(&p).unwrap_err().to_string().contains("16 to 256"));
        let (_d, p) = file(0o600, &[b'x'; MAX_TOKEN_LEN + 1]);
        assert!(load(&p).is_err());
        let d = tempfile::tempdir().unwrap();
        assert!(load(d.path()).unwrap_err().to_string().contains("regular"));
        assert!(matches!(
            load(&d.path().join("missing")),
            Err(TokenError::Io { .. })
        ));
    }

    #[test]
    fn matching_needs_every_byte_and_the_length() {
        assert!(matches(b"abcdef", b"abcdef"));
        assert!(!matches(b"abcdef", b"abcdeg"));
        assert!(!matches(b"abcdef", b"abcde"));
        assert!(!matches(b"abcdef", b"abcdefg"));
        assert!(!matches(b"abcdef", b""));
        assert!(!matches(b"\xff", b""));
    }
}
