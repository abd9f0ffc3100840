//! `osps-dispatcher --config FILE`: the dispatcher's options from a TOML file.
//!
//! Every flag of [`Config`] is a key of the file, its long name with
//! underscores (`--job-timeout-ms` is `job_timeout_ms`). The file is read
//! with its spans (`toml::de::DeTable`), so each refusal names the file,
//! the line and the key in one line. Each value is checked by the flag's own
//! clap parser (ranges, possible values), then [`Config::validate`] checks
//! the combinations, as for flags: the rules are written once.
//!
//! Precedence: the command line, then the file, then the flag's default
//! (none of [`Config`]'s flags reads the environment; `--instance`,
//! `--runtime-dir` and `--log-format`, which do, are not keys of the file).
//!
//! Pools: `[pools.builtin]` (the osps-worker pool, `--worker-exe`) takes
//! `enabled` and the top-level options of [`POOL_KEYS`] (set there or at
//! the top, not both). Every other `[pools.NAME]` is a pool of its own:
//! `program` (a worker program) or `exec` with `ops` (a command per job),
//! `env` and `cwd`, its own [`POOL_KEYS`] (the top-level values when
//! absent) and, for exec, `pass_args`. Each program is looked up when the
//! file is read. The other containment keys (user, group, a segment per
//! pool) are refused as not supported yet, until they work.

use std::any::TypeId;
use std::collections::BTreeMap;
use std::ffi::OsString;
use std::ops::Range;
use std::path::{Path, PathBuf};

use clap::parser::ValueSource;
use clap::{Arg, ArgAction, ArgMatches};
use toml::de::{DeTable, DeValue};
use toml::Spanned;

use crate::pools::{find_program, valid_op, PoolKind, PoolSpec, RunAs, BUILTIN};
use crate::{Config, Invalid};

/// Keys of `[pools.builtin]` besides `enabled`: each is the top-level
/// option of the same name, set once.
const POOL_KEYS: &[&str] = &[
    "workers",
    "job_timeout_ms",
    "max_attempts",
    "max_result_mib",
    "recycle_after_jobs",
    "recycle_above_rss_mib",
    "segment_mib",
    "segment",
    "memory_limit_mib",
];

/// Whom a pool's workers run as: keys of every pool, the builtin one too.
const RUN_AS_KEYS: &[&str] = &["user", "group"];

/// Shared flags every OSPS binary takes: not read from the file, so the
/// watchdog, the dispatcher and the client always agree on them.
const SHARED_FLAGS: &[&str] = &["instance", "runtime_dir", "log_format"];

/// A refusal: one line, `FILE:LINE: what`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}{}: {message}", file.display(), line.map(|l| format!(":{l}")).unwrap_or_default())]
pub struct FileError {
    pub file: PathBuf,
    pub line: Option<usize>,
    pub message: String,
}

/// What the file sets: arguments to put before the command line's (only
/// for the options the command line does not set), and the line of each key.
#[derive(Debug, Clone, Default)]
pub struct FromFile {
    pub file: PathBuf,
    /// The file's text, as read.
    pub text: String,
    pub args: Vec<OsString>,
    /// Line of each key set (by its flag's id: `workers`, `backend`, ...).
    lines: BTreeMap<String, (usize, String)>,
    /// The ids of keys the command line overrides.
    overridden: Vec<String>,
    /// The pools of their own (`[pools.NAME]` but builtin), in the file's order.
    pub pools: Vec<PoolSpec>,
    /// Whether the builtin pool runs (`[pools.builtin] enabled`, true unless set).
    pub builtin: bool,
    /// Whom the builtin pool's workers run as (`[pools.builtin] user, group`).
    pub builtin_run_as: Option<RunAs>,
    /// The operations exec pools name: the pool and line of each.
    claimed: BTreeMap<String, (String, usize)>,
}

impl FromFile {
    /// Names the file's line and key for a refusal of [`Config::validate`],
    /// if the key it blames came from the file.
    pub fn locate(&self, invalid: &Invalid) -> Option<FileError> {
        let key = invalid.key.replace('-', "_");
        let arg = config_args().into_iter().find(|a| file_key(a) == key)?;
        let id = arg.get_id().as_str();
        if self.overridden.iter().any(|o| o == id) {
            return None;
        }
        let (line, name) = self.lines.get(id)?;
        Some(FileError {
            file: self.file.clone(),
            line: Some(*line),
            message: format!("key \"{name}\": {}", invalid.message),
        })
    }
}

/// The flags of [`Config`], as clap knows them.
pub fn config_args() -> Vec<Arg> {
    let cmd = <Config as clap::Args>::augment_args(clap::Command::new("config"));
    cmd.get_arguments().cloned().collect()
}

/// The key of a flag: its long name with underscores.
fn file_key(arg: &Arg) -> String {
    arg.get_long()
        .unwrap_or(arg.get_id().as_str())
        .replace('-', "_")
}

/// Reads `path` and returns what it sets that `matches` (the command line)
/// does not; refuses the whole file at its first error.
pub fn read(path: &Path, matches: &ArgMatches) -> Result<FromFile, FileError> {
    let text = read_trusted(path).map_err(|message| FileError {
        file: path.to_owned(),
        line: None,
        message,
    })?;
    let mut reader = Reader {
        file: path.to_owned(),
        text: &text,
        args: config_args(),
        out: FromFile {
            file: path.to_owned(),
            builtin: true,
            ..FromFile::default()
        },
    };
    let table = DeTable::parse(&text).map_err(|e| {
        // One line, whatever the parser says.
        let message = e.message().split_whitespace().collect::<Vec<_>>().join(" ");
        reader.error(e.span(), message)
    })?;
    reader.table(table.get_ref(), matches)?;
    let mut out = reader.out;
    out.text = text;
    Ok(out)
}

/// The file's text, if no other user could have written it: it names the
/// programs the pools run, as the dispatcher's user (read again at each
/// reload and restart). Owned by us or root, not group- or world-writable.
fn read_trusted(path: &Path) -> Result<String, String> {
    use std::io::Read;
    use std::os::unix::fs::MetadataExt;
    let cannot = |e: std::io::Error| format!("cannot read the configuration file: {e}");
    let mut file = std::fs::File::open(path).map_err(cannot)?;
    let meta = file.metadata().map_err(cannot)?;
    let me = nix::unistd::geteuid().as_raw();
    if meta.uid() != me && meta.uid() != 0 {
        return Err(format!(
            "the configuration file is owned by uid {}, not by uid {me} (ours) or root; it names the programs run as uid {me}",
            meta.uid()
        ));
    }
    if meta.mode() & 0o022 != 0 {
        return Err(format!(
            "the configuration file is writable by other users (mode {:04o}); it names the programs run as uid {me}: chmod go-w it",
            meta.mode() & 0o7777
        ));
    }
    let mut text = String::new();
    file.read_to_string(&mut text).map_err(cannot)?;
    Ok(text)
}

/// A key of the file, with its place.
type Key<'i> = Spanned<std::borrow::Cow<'i, str>>;
/// A key and its value.
type Entry<'v, 'i> = (&'v Key<'i>, &'v Spanned<DeValue<'i>>);

/// One file being read.
struct Reader<'t> {
    file: PathBuf,
    text: &'t str,
    args: Vec<Arg>,
    out: FromFile,
}

/// The TOML type a flag takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Boolean,
    Integer,
    String,
    Integers,
    Strings,
}

impl Kind {
    fn of(arg: &Arg) -> Kind {
        let t = arg.get_value_parser().type_id();
        let ints = [
            TypeId::of::<u64>(),
            TypeId::of::<usize>(),
            TypeId::of::<u32>(),
            TypeId::of::<u8>(),
        ];
        let int = ints.iter().any(|i| t == *i);
        match (arg.get_action(), int) {
            (ArgAction::SetTrue, _) => Kind::Boolean,
            (ArgAction::Append, true) => Kind::Integers,
            (ArgAction::Append, false) => Kind::Strings,
            (_, true) => Kind::Integer,
            (_, false) => Kind::String,
        }
    }

    fn expected(self) -> &'static str {
        match self {
            Kind::Boolean => "a boolean (true or false)",
            Kind::Integer => "an integer",
            Kind::String => "a string",
            Kind::Integers => "an array of integers",
            Kind::Strings => "an array of strings",
        }
    }
}

impl Reader<'_> {
    fn line(&self, span: Option<Range<usize>>) -> Option<usize> {
        let at = span?.start.min(self.text.len());
        Some(self.text[..at].matches('\n').count() + 1)
    }

    fn error(&self, span: Option<Range<usize>>, message: impl Into<String>) -> FileError {
        FileError {
            file: self.file.clone(),
            line: self.line(span),
            message: message.into(),
        }
    }

    /// The top-level table.
    fn table(&mut self, table: &DeTable<'_>, matches: &ArgMatches) -> Result<(), FileError> {
        let mut builtin = Vec::new();
        for (key, value) in table {
            let name = key.get_ref().as_ref();
            if name == "pools" {
                builtin = self.pools(key, value)?;
                continue;
            }
            self.option(key, value, name, name, matches)?;
        }
        for ((key, value), name) in builtin {
            if let Some((line, _)) = self.out.lines.get(name) {
                let message = format!("key \"pools.builtin.{name}\": conflicts with \"{name}\" at line {line}; set the builtin pool's {name} once");
                return Err(self.error(Some(key.span()), message));
            }
            self.option(key, value, name, &format!("pools.builtin.{name}"), matches)?;
        }
        Ok(())
    }

    /// One option: its type checked, its value checked by the flag's own
    /// parser, and kept unless the command line sets it.
    fn option(
        &mut self,
        key: &Key<'_>,
        value: &Spanned<DeValue<'_>>,
        name: &str,
        shown: &str,
        matches: &ArgMatches,
    ) -> Result<(), FileError> {
        let Some(arg) = self.args.iter().find(|a| file_key(a) == name).cloned() else {
            return Err(self.unknown(key, name));
        };
        let kind = Kind::of(&arg);
        let Some(values) = strings(value.get_ref(), kind) else {
            let message = format!(
                "key \"{shown}\": expected {}, found {}",
                kind.expected(),
                found(value.get_ref(), kind)
            );
            return Err(self.error(Some(value.span()), message));
        };
        let long = arg.get_long().unwrap_or(name).to_owned();
        let args: Vec<OsString> = match kind {
            Kind::Boolean if values == ["true"] => vec![format!("--{long}").into()],
            Kind::Boolean => Vec::new(),
            _ => values
                .iter()
                .map(|v| format!("--{long}={v}").into())
                .collect(),
        };
        self.parse_alone(&args)
            .map_err(|m| self.error(Some(value.span()), format!("key \"{shown}\": {m}")))?;
        let id = arg.get_id().as_str().to_owned();
        let line = self.line(Some(key.span())).unwrap_or(1);
        if let Some((first, _)) = self.out.lines.get(&id) {
            let message = format!("key \"{shown}\": set twice (first at line {first})");
            return Err(self.error(Some(key.span()), message));
        }
        // Recorded even when the command line overrides it, for conflicts.
        self.out.lines.insert(id.clone(), (line, shown.to_owned()));
        if matches.value_source(&id) == Some(ValueSource::CommandLine) {
            self.out.overridden.push(id);
        } else {
            self.out.args.extend(args);
        }
        Ok(())
    }

    /// Runs the flags' own parsers on one option's arguments.
    fn parse_alone(&self, args: &[OsString]) -> Result<(), String> {
        let cmd = <Config as clap::Args>::augment_args(clap::Command::new("config"))
            .no_binary_name(true)
            .color(clap::ColorChoice::Never);
        cmd.try_get_matches_from(args).map(drop).map_err(|e| {
            let text = e.render().to_string();
            let text = text.split("\n\nFor more information").next().unwrap_or("");
            let text = text.strip_prefix("error: ").unwrap_or(text);
            text.split_whitespace().collect::<Vec<_>>().join(" ")
        })
    }

    fn unknown(&self, key: &Key<'_>, name: &str) -> FileError {
        if SHARED_FLAGS.contains(&name) {
            let flag = name.replace('_', "-");
            let message = format!("key \"{name}\" is not read from the file: give --{flag} (or its environment variable) to every OSPS program, so they agree");
            return self.error(Some(key.span()), message);
        }
        let known: Vec<String> = self
            .args
            .iter()
            .map(file_key)
            .chain(["pools".into()])
            .collect();
        let message = format!("unknown key \"{name}\"{}", suggest(name, &known));
        self.error(Some(key.span()), message)
    }

    /// `[pools]`: `[pools.builtin]` sets the top-level options of its
    /// [`POOL_KEYS`] (returned, with the option each sets) and `enabled`;
    /// every other table is a pool of its own (kept in `out.pools`).
    fn pools<'v, 'i>(
        &mut self,
        key: &Key<'i>,
        value: &'v Spanned<DeValue<'i>>,
    ) -> Result<Vec<(Entry<'v, 'i>, &'static str)>, FileError> {
        let Some(pools) = value.get_ref().as_table() else {
            let message = format!(
                "key \"pools\": expected a table of pools ([pools.NAME]), found {}",
                found(value.get_ref(), Kind::String)
            );
            return Err(self.error(Some(key.span()), message));
        };
        let mut given = Vec::new();
        for (pool, table) in pools {
            let pool_name = pool.get_ref().as_ref();
            let Some(table) = table.get_ref().as_table() else {
                let message = format!(
                    "key \"pools.{pool_name}\": expected a table, found {}",
                    found(table.get_ref(), Kind::String)
                );
                return Err(self.error(Some(pool.span()), message));
            };
            if pool_name == BUILTIN {
                given.extend(self.builtin_pool(table)?);
            } else {
                let spec = self.pool(pool, table)?;
                self.out.pools.push(spec);
            }
        }
        Ok(given)
    }

    /// `[pools.builtin]`: `enabled`, and the [`POOL_KEYS`] as top-level options.
    fn builtin_pool<'v, 'i>(
        &mut self,
        table: &'v DeTable<'i>,
    ) -> Result<Vec<(Entry<'v, 'i>, &'static str)>, FileError> {
        let mut given = Vec::new();
        let mut run_as = RunAsKeys::default();
        for (k, v) in table {
            let name = k.get_ref().as_ref();
            if name == "enabled" {
                self.out.builtin = self.boolean(k, v, "pools.builtin.enabled")?;
            } else if RUN_AS_KEYS.contains(&name) {
                self.run_as_key(&mut run_as, BUILTIN, k, v)?;
            } else if let Some(&top) = POOL_KEYS.iter().find(|&&p| p == name) {
                given.push(((k, v), top));
            } else if KIND_KEYS.contains(&name) {
                let message = format!("key \"pools.builtin.{name}\": the builtin pool runs --worker-exe (worker_exe) as it is; a program, a command, env and cwd are for a pool of its own, [pools.NAME]");
                return Err(self.error(Some(k.span()), message));
            } else {
                let known: Vec<&str> = POOL_KEYS
                    .iter()
                    .chain(RUN_AS_KEYS)
                    .copied()
                    .chain(["enabled"])
                    .collect();
                return Err(self.pool_key_error(
                    k,
                    BUILTIN,
                    &known,
                    "the builtin pool runs --worker-exe and takes",
                ));
            }
        }
        self.out.builtin_run_as = self.resolve_run_as(&run_as)?;
        Ok(given)
    }

    /// `user = "NAME"` or `group = "NAME"` of a pool, kept with its place.
    fn run_as_key(
        &self,
        r: &mut RunAsKeys,
        pool: &str,
        k: &Key<'_>,
        v: &Spanned<DeValue<'_>>,
    ) -> Result<(), FileError> {
        let name = k.get_ref().as_ref();
        let Some(value) = v.get_ref().as_str() else {
            let message = format!(
                "key \"pools.{pool}.{name}\": expected a {name} name (a string), found {}",
                found(v.get_ref(), Kind::String)
            );
            return Err(self.error(Some(v.span()), message));
        };
        let slot = if name == "user" {
            &mut r.user
        } else {
            &mut r.group
        };
        *slot = Some((v.span(), value.to_owned()));
        Ok(())
    }

    /// The pool's [`RunAs`], if it set `user` or `group`.
    fn resolve_run_as(&self, r: &RunAsKeys) -> Result<Option<RunAs>, FileError> {
        if r.user.is_none() && r.group.is_none() {
            return Ok(None);
        }
        let (user, group) = (r.user.as_ref(), r.group.as_ref());
        RunAs::resolve(
            user.map(|(_, n)| n.as_str()),
            group.map(|(_, n)| n.as_str()),
        )
        .map(Some)
        .map_err(|e| {
            let span = r.user.as_ref().or(r.group.as_ref()).map(|(s, _)| s.clone());
            self.error(span, e)
        })
    }

    /// A refusal of an unknown key `k` of pool `pool`.
    fn pool_key_error(&self, k: &Key<'_>, pool: &str, known: &[&str], what: &str) -> FileError {
        let name = k.get_ref().as_ref();
        let keys = known
            .iter()
            .map(|k| format!("\"{k}\""))
            .collect::<Vec<_>>()
            .join(", ");
        let all: Vec<String> = known.iter().map(|s| s.to_string()).collect();
        let message = format!(
            "unknown key \"pools.{pool}.{name}\"{}; {what} {keys}",
            suggest(name, &all)
        );
        self.error(Some(k.span()), message)
    }

    /// `[pools.NAME]`, a pool of its own: `program` or `exec` (with `ops`).
    fn pool(&mut self, pool: &Key<'_>, table: &DeTable<'_>) -> Result<PoolSpec, FileError> {
        let name = pool.get_ref().as_ref();
        let valid = !name.is_empty()
            && name.len() <= 32
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        if !valid {
            let message = format!("pool name \"{name}\": use 1 to 32 letters, digits, '_' or '-'");
            return Err(self.error(Some(pool.span()), message));
        }
        let mut p = PoolKeys::default();
        for (k, v) in table {
            self.pool_key(&mut p, name, k, v)?;
        }
        let origin = format!(
            "{}:{}",
            self.file.display(),
            self.line(Some(pool.span())).unwrap_or(1)
        );
        let at = |key: &Option<(Range<usize>, Vec<String>)>| key.as_ref().map(|(s, _)| s.clone());
        let kind = match (p.program.take(), p.exec.take()) {
            (Some((_, argv)), None) => {
                if let Some((span, _)) = &p.ops {
                    let message = format!("key \"pools.{name}.ops\": a program pool's workers announce their operations themselves; \"ops\" is for an exec pool");
                    return Err(self.error(Some(span.clone()), message));
                }
                if let Some(span) = &p.pass_args_at {
                    let message = format!("key \"pools.{name}.pass_args\": only an exec pool passes arguments to a command");
                    return Err(self.error(Some(span.clone()), message));
                }
                PoolKind::Program { argv }
            }
            (None, Some((_, argv))) => {
                let Some((span, ops)) = p.ops.take() else {
                    let message = format!("pool \"{name}\": an exec pool needs \"ops\", the operations its command serves (e.g. ops = [\"{name}\"])");
                    return Err(self.error(Some(pool.span()), message));
                };
                self.claim_ops(name, &ops, span)?;
                PoolKind::Exec {
                    argv,
                    ops,
                    pass_args: p.pass_args,
                }
            }
            (Some(_), Some(_)) => {
                let message = format!("pool \"{name}\": give \"program\" (a worker program) or \"exec\" (a command per job), not both");
                return Err(self.error(at(&p.exec).or(Some(pool.span())), message));
            }
            (None, None) => {
                let message = format!("pool \"{name}\": give \"program\" (a worker program that speaks the worker protocol) or \"exec\" (a command run per job)");
                return Err(self.error(Some(pool.span()), message));
            }
        };
        Ok(PoolSpec {
            name: name.to_owned(),
            kind,
            workers: p.workers,
            job_timeout_ms: p.job_timeout_ms,
            max_attempts: p.max_attempts,
            max_result_mib: p.max_result_mib,
            recycle_after_jobs: p.recycle_after_jobs,
            recycle_above_rss_mib: p.recycle_above_rss_mib,
            segment_mib: p.segment_mib,
            backend: p.backend,
            run_as: self.resolve_run_as(&p.run_as)?,
            memory_limit_mib: p.memory_limit_mib,
            env: std::mem::take(&mut p.env),
            cwd: p.cwd.take(),
            origin,
        })
    }
}

/// Keys only a pool of its own takes (what it runs); it takes the
/// [`POOL_KEYS`] too.
const KIND_KEYS: &[&str] = &["program", "exec", "ops", "pass_args", "env", "cwd"];

/// The keys of one `[pools.NAME]` table, as read.
#[derive(Debug, Default)]
struct PoolKeys {
    program: Option<(Range<usize>, Vec<String>)>,
    exec: Option<(Range<usize>, Vec<String>)>,
    ops: Option<(Range<usize>, Vec<String>)>,
    workers: Option<usize>,
    job_timeout_ms: Option<u64>,
    max_attempts: Option<u8>,
    max_result_mib: Option<u64>,
    recycle_after_jobs: Option<u64>,
    recycle_above_rss_mib: Option<u64>,
    segment_mib: Option<u64>,
    backend: Option<ipc_core::Backend>,
    run_as: RunAsKeys,
    memory_limit_mib: Option<u64>,
    env: Vec<(String, String)>,
    cwd: Option<PathBuf>,
    pass_args: bool,
    pass_args_at: Option<Range<usize>>,
}

/// A pool's `user` and `group`, as read (with their places).
#[derive(Debug, Default)]
struct RunAsKeys {
    user: Option<(Range<usize>, String)>,
    group: Option<(Range<usize>, String)>,
}

impl Reader<'_> {
    /// A pool's `program` or `exec`: its argv, the program found (in
    /// `PATH` without a `/`) and, given as a path, made absolute: the
    /// workers may run elsewhere (`cwd`). Symlinks are kept: a venv's
    /// `bin/python` is one, and Python finds its venv by the path it was
    /// run as.
    fn program_argv(
        &mut self,
        pool: &str,
        v: &Spanned<DeValue<'_>>,
        shown: &str,
    ) -> Result<Vec<String>, FileError> {
        let mut argv = self.string_list(v, shown)?;
        let program = find_program(&argv[0])
            .map_err(|e| self.error(Some(v.span()), format!("key \"{shown}\": {e}")))?;
        tracing::debug!(pool, program = %program.display(), "found");
        if argv[0].contains('/') {
            if let Ok(full) = std::path::absolute(&program) {
                argv[0] = full.display().to_string();
            }
        }
        Ok(argv)
    }

    /// One key of a pool of its own, checked.
    fn pool_key(
        &mut self,
        p: &mut PoolKeys,
        pool: &str,
        k: &Key<'_>,
        v: &Spanned<DeValue<'_>>,
    ) -> Result<(), FileError> {
        let name = k.get_ref().as_ref();
        let shown = format!("pools.{pool}.{name}");
        let span = Some(v.span());
        match name {
            "program" | "exec" => {
                let argv = self.program_argv(pool, v, &shown)?;
                let slot = if name == "program" {
                    &mut p.program
                } else {
                    &mut p.exec
                };
                *slot = Some((v.span(), argv));
            }
            "ops" => {
                let ops = self.string_list(v, &shown)?;
                if let Some(bad) = ops.iter().find(|o| !valid_op(o)) {
                    let message = format!("key \"{shown}\": \"{bad}\" cannot be an operation's name (1 to 64 bytes, no leading '-'; ping is every worker's; status, metrics, cancel and reload the dispatcher's)");
                    return Err(self.error(span, message));
                }
                p.ops = Some((v.span(), ops));
            }
            "workers" => p.workers = Some(self.integer(v, &shown, 1..=1024)? as usize),
            "job_timeout_ms" => {
                p.job_timeout_ms = Some(self.integer(v, &shown, 1..=u32::MAX as u64)?)
            }
            "max_attempts" => p.max_attempts = Some(self.integer(v, &shown, 1..=100)? as u8),
            "max_result_mib" => p.max_result_mib = Some(self.integer(v, &shown, 1..=1 << 20)?),
            "recycle_after_jobs" => {
                p.recycle_after_jobs = Some(self.integer(v, &shown, 1..=u32::MAX as u64)?)
            }
            "recycle_above_rss_mib" => {
                p.recycle_above_rss_mib = Some(self.integer(v, &shown, 1..=1 << 20)?)
            }
            "segment_mib" => p.segment_mib = Some(self.integer(v, &shown, 1..=1 << 20)?),
            "segment" => p.backend = Some(self.backend(v, &shown)?),
            "user" | "group" => self.run_as_key(&mut p.run_as, pool, k, v)?,
            "memory_limit_mib" => {
                let mib = self.integer(v, &shown, 0..=i64::MAX as u64)?;
                let mib = ipc_core::memory::parse_limit_mib(&mib.to_string())
                    .map_err(|m| self.error(span, format!("key \"{shown}\": {m}")))?;
                p.memory_limit_mib = Some(mib);
            }
            "env" => p.env = self.env(v, &shown)?,
            "cwd" => p.cwd = Some(self.cwd(v, &shown)?),
            "pass_args" => {
                p.pass_args = self.boolean(k, v, &shown)?;
                p.pass_args_at = Some(k.span());
            }
            _ => {
                let known: Vec<&str> = KIND_KEYS
                    .iter()
                    .chain(POOL_KEYS)
                    .chain(RUN_AS_KEYS)
                    .copied()
                    .collect();
                return Err(self.pool_key_error(k, pool, &known, "a pool takes"));
            }
        }
        Ok(())
    }

    /// `segment = "posix"` or `"sysv"`: a pool's segment backend.
    fn backend(
        &self,
        v: &Spanned<DeValue<'_>>,
        shown: &str,
    ) -> Result<ipc_core::Backend, FileError> {
        let backend = v.get_ref().as_str().and_then(|b| b.parse().ok());
        backend.ok_or_else(|| {
            let names = ipc_core::Backend::ALL
                .map(|b| format!("\"{b}\""))
                .join(" or ");
            self.error(Some(v.span()), format!("key \"{shown}\": expected {names}"))
        })
    }

    /// Records that pool `name` serves `ops`; refuses one another pool of
    /// the file serves.
    fn claim_ops(
        &mut self,
        name: &str,
        ops: &[String],
        span: Range<usize>,
    ) -> Result<(), FileError> {
        let line = self.line(Some(span.clone())).unwrap_or(1);
        for op in ops {
            if let Some((other, at)) = self.out.claimed.get(op) {
                let message = format!("key \"pools.{name}.ops\": operation \"{op}\" is served by pool \"{other}\" too (line {at}); an operation is served by one pool");
                return Err(self.error(Some(span), message));
            }
            self.out.claimed.insert(op.clone(), (name.to_owned(), line));
        }
        Ok(())
    }

    /// `env = { NAME = "value", ... }`: variables added to the workers'
    /// environment (not the `OSPS_` ones, which OSPS sets).
    fn env(
        &self,
        v: &Spanned<DeValue<'_>>,
        shown: &str,
    ) -> Result<Vec<(String, String)>, FileError> {
        let bad = |message: String| {
            Err(self.error(Some(v.span()), format!("key \"{shown}\": {message}")))
        };
        let Some(table) = v.get_ref().as_table() else {
            return bad(format!(
                "expected a table of strings (env = {{ NAME = \"value\" }}), found a {}",
                v.get_ref().type_str()
            ));
        };
        let mut env = Vec::new();
        for (name, value) in table {
            let name = name.get_ref().as_ref();
            let ok_name = !name.is_empty() && !name.contains(['=', '\0']);
            if !ok_name || name.starts_with("OSPS_") {
                return bad(format!("{name:?} cannot be set here (a name without '=', not one of OSPS_*, which OSPS sets)"));
            }
            match value.get_ref() {
                DeValue::String(s) if !s.contains('\0') => {
                    env.push((name.to_owned(), s.to_string()))
                }
                other => {
                    return bad(format!(
                        "{name}: expected a string, found a {}",
                        other.type_str()
                    ))
                }
            }
        }
        Ok(env)
    }

    /// `cwd = "/dir"`: the workers' working directory, which must exist.
    fn cwd(&self, v: &Spanned<DeValue<'_>>, shown: &str) -> Result<PathBuf, FileError> {
        let at = Some(v.span());
        let Some(dir) = v.get_ref().as_str() else {
            let message = format!(
                "key \"{shown}\": expected a string, found a {}",
                v.get_ref().type_str()
            );
            return Err(self.error(at, message));
        };
        match std::fs::metadata(dir) {
            Ok(m) if m.is_dir() => Ok(PathBuf::from(dir)),
            Ok(_) => Err(self.error(at, format!("key \"{shown}\": {dir}: not a directory"))),
            Err(e) => Err(self.error(at, format!("key \"{shown}\": {dir}: {e}"))),
        }
    }

    /// A non-empty array of strings (at most 64).
    fn string_list(&self, v: &Spanned<DeValue<'_>>, shown: &str) -> Result<Vec<String>, FileError> {
        match strings(v.get_ref(), Kind::Strings) {
            Some(list) if !list.is_empty() && list.len() <= 64 => Ok(list),
            Some(_) => Err(self.error(
                Some(v.span()),
                format!("key \"{shown}\": expected 1 to 64 strings"),
            )),
            None => Err(self.error(
                Some(v.span()),
                format!(
                    "key \"{shown}\": expected an array of strings, found {}",
                    found(v.get_ref(), Kind::Strings)
                ),
            )),
        }
    }

    fn integer(
        &self,
        v: &Spanned<DeValue<'_>>,
        shown: &str,
        range: std::ops::RangeInclusive<u64>,
    ) -> Result<u64, FileError> {
        let n = strings(v.get_ref(), Kind::Integer).and_then(|s| s[0].parse::<i64>().ok());
        let Some(n) = n else {
            let message = format!(
                "key \"{shown}\": expected an integer, found {}",
                found(v.get_ref(), Kind::Integer)
            );
            return Err(self.error(Some(v.span()), message));
        };
        match u64::try_from(n) {
            Ok(n) if range.contains(&n) => Ok(n),
            _ => Err(self.error(
                Some(v.span()),
                format!(
                    "key \"{shown}\": {n} is not in {}..={}",
                    range.start(),
                    range.end()
                ),
            )),
        }
    }

    fn boolean(
        &self,
        k: &Key<'_>,
        v: &Spanned<DeValue<'_>>,
        shown: &str,
    ) -> Result<bool, FileError> {
        match v.get_ref() {
            DeValue::Boolean(b) => Ok(*b),
            other => {
                let _ = k;
                let message = format!(
                    "key \"{shown}\": expected a boolean (true or false), found a {}",
                    other.type_str()
                );
                Err(self.error(Some(v.span()), message))
            }
        }
    }
}

/// A value as the flag's arguments, if it has the flag's type.
fn strings(value: &DeValue<'_>, kind: Kind) -> Option<Vec<String>> {
    let scalar = |v: &DeValue<'_>, int: bool| -> Option<String> {
        match v {
            DeValue::Integer(i) if int => i64::from_str_radix(i.as_str(), i.radix())
                .ok()
                .map(|n| n.to_string()),
            DeValue::String(s) if !int => Some(s.to_string()),
            _ => None,
        }
    };
    match (kind, value) {
        (Kind::Boolean, DeValue::Boolean(b)) => Some(vec![b.to_string()]),
        (Kind::Integer, v) => Some(vec![scalar(v, true)?]),
        (Kind::String, v) => Some(vec![scalar(v, false)?]),
        (Kind::Integers | Kind::Strings, DeValue::Array(items)) => items
            .iter()
            .map(|v| scalar(v.get_ref(), kind == Kind::Integers))
            .collect(),
        _ => None,
    }
}

/// What a value is, for a type error (in an array wanted of `kind`, the
/// first item that is not).
fn found(value: &DeValue<'_>, kind: Kind) -> String {
    let wanted = if kind == Kind::Integers {
        "integer"
    } else {
        "string"
    };
    match value {
        DeValue::Integer(i) if i64::from_str_radix(i.as_str(), i.radix()).is_err() => {
            "an integer out of range".into()
        }
        DeValue::Integer(_) => "an integer".into(),
        DeValue::Array(items) => items
            .iter()
            .map(|v| v.get_ref().type_str())
            .find(|t| *t != wanted)
            .map_or("an array".into(), |t| format!("an array holding a {t}")),
        other => format!("a {}", other.type_str()),
    }
}

/// ` (did you mean "KEY"?)` for the known key nearest a misspelt one.
fn suggest(name: &str, known: &[String]) -> String {
    known
        .iter()
        .map(|k| (strsim::jaro_winkler(name, k), k))
        .filter(|(score, _)| *score > 0.8)
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, k)| format!(" (did you mean \"{k}\"?)"))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_flag_takes_its_toml_type() {
        let kinds: BTreeMap<String, Kind> = config_args()
            .iter()
            .map(|a| (file_key(a), Kind::of(a)))
            .collect();
        let want = [
            ("workers", Kind::Integer),
            ("max_tcp_connections", Kind::Integer),
            ("write_timeout_ms", Kind::Integer),
            ("allow_uid", Kind::Integers),
            ("segment", Kind::String),
            ("tcp", Kind::String),
            ("worker_exe", Kind::String),
            ("tcp_allow_remote", Kind::Boolean),
            ("allow_fault_injection", Kind::Boolean),
        ];
        for (key, kind) in want {
            assert_eq!(kinds.get(key), Some(&kind), "{key}");
        }
        // Not keys: the shared flags, and what is not a flag.
        for key in SHARED_FLAGS.iter().chain(&["watchdog", "pools"]) {
            assert!(!kinds.contains_key(*key), "{key}");
        }
    }

    #[test]
    fn a_misspelt_key_gets_the_nearest_one_and_nonsense_none() {
        let known: Vec<String> = ["workers", "job_timeout_ms", "max_payload"]
            .map(String::from)
            .into();
        assert_eq!(
            suggest("job_timout_ms", &known),
            " (did you mean \"job_timeout_ms\"?)"
        );
        assert_eq!(suggest("wrokers", &known), " (did you mean \"workers\"?)");
        assert_eq!(suggest("zzz", &known), "");
    }

    #[test]
    fn values_take_the_flags_type_or_say_what_they_are() {
        let text = "a = 5\nb = \"x\"\nc = [1, 2]\nd = [1, \"x\"]\ne = true\nf = 1.5\ng = 0x10\n";
        let t = DeTable::parse(text).unwrap().into_inner();
        let v = |k: &str| t.get(k).unwrap().get_ref().clone();
        assert_eq!(strings(&v("a"), Kind::Integer), Some(vec!["5".into()]));
        assert_eq!(strings(&v("g"), Kind::Integer), Some(vec!["16".into()]));
        assert_eq!(strings(&v("b"), Kind::String), Some(vec!["x".into()]));
        assert_eq!(
            strings(&v("c"), Kind::Integers),
            Some(vec!["1".into(), "2".into()])
        );
        assert_eq!(strings(&v("e"), Kind::Boolean), Some(vec!["true".into()]));
        assert_eq!(strings(&v("b"), Kind::Integer), None);
        assert_eq!(strings(&v("a"), Kind::Integers), None);
        assert_eq!(found(&v("d"), Kind::Integers), "an array holding a string");
        assert_eq!(found(&v("f"), Kind::Integer), "a float");
        assert_eq!(found(&v("e"), Kind::Integer), "a boolean");
    }
}
