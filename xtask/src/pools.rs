//! The three kinds of pools the demo, chaos and bench run side by side: the
//! builtin pool (`osps-worker`), a program pool running the example worker
//! (`examples/inflate-worker`, built with the SDK) and a command pool
//! (`exec = ["gzip", "-c"]`), from a configuration file written in a
//! temporary directory; and the checks of their answers.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use anyhow::{ensure, Context, Result};

/// The program pool's name and the example worker's binary.
pub const PROGRAM_POOL: &str = "inflate";
pub const PROGRAM_BIN: &str = "inflate-worker";
/// The command pool's name, command and operation (not `gzip`: the example
/// worker serves an operation of that name, and one operation is served by
/// one pool).
pub const EXEC_POOL: &str = "compress";
pub const EXEC_CMD: [&str; 2] = ["gzip", "-c"];
pub const EXEC_OP: &str = "gzip_c";

/// Workers of each pool.
#[derive(Debug, Clone, Copy)]
pub struct Sizes {
    pub builtin: usize,
    pub program: usize,
    pub exec: usize,
}

/// A configuration file, removed with its directory on drop.
#[derive(Debug)]
pub struct ConfigFile {
    _dir: tempfile::TempDir,
    pub path: PathBuf,
    pub text: String,
}

impl ConfigFile {
    /// Writes `text` to `osps.toml` in a fresh temporary directory.
    pub fn write(text: String) -> Result<ConfigFile> {
        let dir = tempfile::Builder::new().prefix("osps-xtask-").tempdir()?;
        let path = dir.path().join("osps.toml");
        std::fs::write(&path, &text).with_context(|| format!("writing {}", path.display()))?;
        Ok(ConfigFile {
            _dir: dir,
            path,
            text,
        })
    }

    /// The path, as the dispatcher's `--config` argument.
    pub fn arg(&self) -> &str {
        self.path.to_str().expect("a temporary path is UTF-8")
    }
}

/// TOML string array of `items` (basic strings, escaped).
pub fn toml_array<S: AsRef<str>>(items: &[S]) -> String {
    let quoted: Vec<String> = items
        .iter()
        .map(|s| {
            let mut q = String::from('"');
            for c in s.as_ref().chars() {
                match c {
                    '"' => q.push_str("\\\""),
                    '\\' => q.push_str("\\\\"),
                    c if c.is_control() => q.push_str(&format!("\\u{:04X}", c as u32)),
                    c => q.push(c),
                }
            }
            q.push('"');
            q
        })
        .collect();
    format!("[{}]", quoted.join(", "))
}

/// The three-pool configuration: builtin, the example worker as a program
/// pool (`program`, its path), and `gzip -c` as a command pool; each with
/// a segment of its own of another size, a memory limit of its own
/// (builtin 256 MiB per worker, the program pool 128, the command pool
/// 64) and, run as root, another user: builtin as root, the program pool
/// as `nobody`, the command pool as `daemon` (so no pool can open
/// another's segment); the command pool asks for a System V segment, and
/// the program pool, run as root, gets one too (a pool of another user
/// always does); builtin's is POSIX.
pub fn three_pools(program: &Path, n: Sizes) -> String {
    let root = nix::unistd::geteuid().is_root();
    let user = |name: &str| {
        if root {
            format!("user = {name:?}\n")
        } else {
            String::new()
        }
    };
    format!(
        "# Written by cargo xtask: the three kinds of pools.\n\n\
         [pools.builtin]\nworkers = {}\nmemory_limit_mib = 256\n\n\
         [pools.{PROGRAM_POOL}]\nprogram = {}\nworkers = {}\nsegment_mib = 16\nmemory_limit_mib = 128\n{}\n\
         [pools.{EXEC_POOL}]\nexec = {}\nops = [{EXEC_OP:?}]\nworkers = {}\nsegment_mib = 8\nsegment = \"sysv\"\nmemory_limit_mib = 64\n{}",
        n.builtin,
        toml_array(&[program.display().to_string()]),
        n.program,
        user("nobody"),
        toml_array(&EXEC_CMD),
        n.exec,
        user("daemon"),
    )
}

/// A small deterministic generator (xorshift), so a run can be replayed with a seed.
#[derive(Debug)]
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    /// `len` random bytes (incompressible).
    pub fn bytes(&mut self, len: usize) -> Vec<u8> {
        let mut v = Vec::with_capacity(len + 8);
        while v.len() < len {
            v.extend_from_slice(&self.next().to_le_bytes());
        }
        v.truncate(len);
        v
    }
}

/// gzip of `data` (in process, flate2).
pub fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(data).expect("writing to a Vec");
    e.finish().expect("writing to a Vec")
}

/// What `gz` decompresses to, or why it is not gzip.
pub fn gunzip(gz: &[u8]) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    flate2::read::MultiGzDecoder::new(gz)
        .read_to_end(&mut out)
        .context("not valid gzip")?;
    Ok(out)
}

/// The example worker's answer to `gunzip_crc32` of a gzip of `data`.
pub fn crc_line(data: &[u8]) -> Vec<u8> {
    format!("{} {:08x}\n", data.len(), crc32fast::hash(data)).into_bytes()
}

/// Checks an answer of the command pool: gzip that decompresses to `input`.
pub fn check_gzip(input: &[u8], answer: &[u8]) -> Result<()> {
    let back = gunzip(answer)?;
    ensure!(
        back == input,
        "the {} bytes of gzip decompress to {} bytes, not the {} sent",
        answer.len(),
        back.len(),
        input.len()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_config_names_three_pools_of_three_kinds() {
        let text = three_pools(
            Path::new("/x/inflate-worker"),
            Sizes {
                builtin: 2,
                program: 1,
                exec: 3,
            },
        );
        assert!(text.contains("[pools.builtin]\nworkers = 2\n"), "{text}");
        assert!(
            text.contains("[pools.inflate]\nprogram = [\"/x/inflate-worker\"]\nworkers = 1\n"),
            "{text}"
        );
        let exec = format!(
            "[pools.compress]\nexec = [\"gzip\", \"-c\"]\nops = [{EXEC_OP:?}]\nworkers = 3\n"
        );
        assert!(text.contains(&exec), "{text}");
    }

    #[test]
    fn toml_arrays_escape_what_a_basic_string_must() {
        assert_eq!(
            toml_array(&["/a b/wörker", "say \"hi\"", "c:\\x", "del\u{7f}"]),
            r#"["/a b/wörker", "say \"hi\"", "c:\\x", "del\u007F"]"#
        );
    }

    #[test]
    fn gzip_answers_are_checked_against_the_input() {
        let data = b"some bytes, some bytes".to_vec();
        check_gzip(&data, &gzip(&data)).unwrap();
        assert!(check_gzip(&data, &gzip(b"other")).is_err());
        assert!(check_gzip(&data, &data).is_err());
        assert_eq!(crc_line(b"abc"), b"3 352441c2\n");
    }
}
