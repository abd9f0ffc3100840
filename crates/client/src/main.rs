//! `osps-client`: the command-line client. Errors print one line and exit non-zero.

use std::fs::File;
use std::io::{self, IsTerminal, Read, Seek, SeekFrom, Write};
use std::os::fd::AsFd;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

mod interrupt;
mod progress;

use clap::{Parser, Subcommand};
use ipc_core::Endpoint;
use osps_client::{Client, ClientError, RetryPolicy, RetryingClient};

/// Talks to an OSPS dispatcher.
#[derive(Debug, Parser)]
#[command(
    name = "osps-client",
    version,
    mut_arg("instance", |a| a.help("Instance name (selects the socket)")),
)]
struct Args {
    #[command(flatten)]
    place: ipc_core::cli::InstanceArgs,
    /// Connect here instead of the instance's socket: unix:PATH or tcp:HOST:PORT.
    #[arg(long, global = true)]
    connect: Option<Endpoint>,
    /// Present the token in this file (mode 0600) in the hello: needed on a TCP port started with --token-file.
    #[arg(long, global = true, env = ipc_core::env::TOKEN_FILE)]
    token_file: Option<PathBuf>,
    /// Keep reconnecting and retrying (e.g. across a dispatcher restart) for this many milliseconds.
    /// Only reconnecting counts: once a request is sent, its answer is awaited as long as the
    /// dispatcher's job timeout allows (or `run --timeout-ms`).
    #[arg(long, global = true, default_value_t = RetryPolicy::default().deadline.as_millis() as u64)]
    retry_ms: u64,
    /// Also accept a dispatcher run by this user (uid or name); our own uid and root always are.
    /// The client checks who serves the socket or loopback port before it sends anything.
    #[arg(long, global = true, env = ipc_core::env::SERVER_UID, value_parser = parse_uid)]
    server_uid: Option<u32>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Round trip through the dispatcher and a worker; exits 0 only when the
    /// whole path answers (a liveness probe).
    Ping {
        /// Give up after this many milliseconds, retrying until then (exit 1); a
        /// dispatcher still starting (no socket yet) is waited for all that time [default: 5000].
        #[arg(long, visible_alias = "timeout")]
        timeout_ms: Option<u64>,
    },
    /// Runs an operation: a builtin one (ping, echo, upper, sha256, wc, sleep MS) or any a pool serves (status lists them).
    Run {
        /// The operation.
        op: String,
        /// Its arguments (e.g. the milliseconds of `sleep`).
        args: Vec<String>,
        /// Payload: a file, or - for stdin [default: empty].
        #[arg(long, short)]
        input: Option<PathBuf>,
        /// Where to write the result: a file (replaced only when the job succeeds), or - for stdout;
        /// a descriptor's name (/dev/stdout, /dev/fd/N, /proc/self/fd/N) or a device or pipe is written in place.
        #[arg(long, short, default_value = "-")]
        output: PathBuf,
        /// Give up when the answer has not come within this many milliseconds of starting
        /// (reconnecting included) [default: wait as long as the dispatcher's job timeout allows].
        #[arg(long)]
        timeout_ms: Option<u64>,
    },
    /// Shows the dispatcher's status: processes, queue, latency, segment, endpoints.
    Status {
        /// Print the JSON report (with --watch: one report per line).
        #[arg(long)]
        json: bool,
        /// Refresh until interrupted (Ctrl-C).
        #[arg(long, short)]
        watch: bool,
        /// With --watch: milliseconds between refreshes.
        #[arg(long, default_value_t = 1000)]
        interval_ms: u64,
    },
    /// Makes the dispatcher read its configuration file again and apply it rolling (as SIGHUP does); prints what changed, or why nothing did (exit 1).
    Reload,
    /// Prints the dispatcher's metrics in the Prometheus text exposition format.
    Metrics,
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(ClientError::Remote(e)) if e.kind == ipc_core::ErrorKind::Cancelled => {
            // Only our Ctrl-C cancels a request of our connection.
            eprintln!("osps-client: interrupted: the job was cancelled on the dispatcher");
            ExitCode::from(interrupt::EXIT_INTERRUPTED)
        }
        Err(e) => {
            eprintln!("osps-client: {e}{}", hint(&e));
            ExitCode::FAILURE
        }
    }
}

/// What to do about an error, when the server's line does not say it.
fn hint(e: &ClientError) -> &'static str {
    match e {
        ClientError::Remote(r)
            if r.kind == ipc_core::ErrorKind::TooLarge
                && r.message.ends_with("closing the connection") =>
        {
            " (the limit is the dispatcher's --max-payload; raise it there, with a --segment-mib large enough to hold it)"
        }
        _ => "",
    }
}

/// A uid, or the name of a user.
fn parse_uid(s: &str) -> Result<u32, String> {
    if let Ok(uid) = s.parse() {
        return Ok(uid);
    }
    match nix::unistd::User::from_name(s) {
        Ok(Some(u)) => Ok(u.uid.as_raw()),
        Ok(None) => Err(format!("no user named {s:?}")),
        Err(e) => Err(format!("cannot look up user {s:?}: {e}")),
    }
}

/// A client for the instance or `--connect` endpoint: it retries for
/// `--retry-ms` (reconnecting) and, with `overall`, gives up after it. A
/// timeout the user gave (`explicit`) is also how long a dispatcher still
/// starting is waited for; otherwise [`RetryPolicy::start_grace`].
fn retrying(
    args: &Args,
    deadline_ms: u64,
    overall: Option<u64>,
    explicit: bool,
) -> Result<RetryingClient, ClientError> {
    let mut policy = RetryPolicy {
        deadline: Duration::from_millis(deadline_ms.max(1)),
        overall: overall.map(|ms| Duration::from_millis(ms.max(1))),
        ..RetryPolicy::default()
    };
    if let (true, Some(all)) = (explicit, policy.overall) {
        policy.start_grace = all;
    }
    let mut client = match &args.connect {
        Some(ep) => RetryingClient::new(ep.clone(), policy),
        None => RetryingClient::for_instance(
            &args.place.instance,
            args.place.runtime_dir.as_deref(),
            policy,
        )?,
    };
    if let Some(uid) = args.server_uid {
        client = client.with_server_uid(uid);
    }
    if let Some(path) = &args.token_file {
        client = client.with_token(ipc_core::token::load(path)?);
    }
    // A person at a terminal is told what a wait is for; scripts are not.
    if io::stderr().is_terminal() && !matches!(args.command, Command::Status { watch: true, .. }) {
        client = client.on_waiting(|w| eprintln!("osps-client: {w}"));
    }
    Ok(client)
}

/// Where a result goes; can start over when a request is retried.
enum Sink {
    Stdout {
        written: u64,
    },
    /// A temporary file beside the target, renamed over it once the job has
    /// succeeded; removed (when dropped) if it fails, so a failed job leaves
    /// no file and an existing one untouched.
    Temp {
        file: tempfile::NamedTempFile,
        target: PathBuf,
    },
    /// Something other than a regular file (a device, a pipe), or an open
    /// descriptor's name (`/dev/stdout` when stdout is a file): written in
    /// place, so a retry is refused once bytes went out, as for stdout.
    Direct {
        file: File,
        path: PathBuf,
        written: u64,
    },
}

/// Whether `path` names an open descriptor rather than a file: a link under
/// `/dev` or `/proc` (`/dev/stdout`, `/dev/fd/N`, `/proc/self/fd/N`). Such a
/// name leads to whatever the descriptor is (a file the shell redirected
/// to, with `>>` perhaps): it is written through, never replaced.
fn names_a_descriptor(path: &Path) -> bool {
    let Ok(abs) = std::path::absolute(path) else {
        return false;
    };
    (abs.starts_with("/dev") || abs.starts_with("/proc"))
        && std::fs::symlink_metadata(&abs).is_ok_and(|m| m.file_type().is_symlink())
}

/// Our own stdout or stderr when `path` is one of their names
/// (`/dev/stdout`, `/dev/fd/1`, `/proc/self/fd/1`, and the same for 2), as a
/// duplicate of the descriptor: it shares the file position and the append
/// mode with the shell's, so what the shell writes next lands after the
/// result. Opening the name again would make a new open file with a
/// position of its own, and the shell's next line would overwrite the
/// result in a file redirected with `>`.
fn inherited(path: &Path) -> Option<File> {
    let fd = match path.to_str()? {
        "/dev/stdout" | "/dev/fd/1" | "/proc/self/fd/1" => 1,
        "/dev/stderr" | "/dev/fd/2" | "/proc/self/fd/2" => 2,
        _ => return None,
    };
    let owned = if fd == 1 {
        io::stdout().as_fd().try_clone_to_owned()
    } else {
        io::stderr().as_fd().try_clone_to_owned()
    };
    owned.ok().map(File::from)
}

impl Sink {
    fn open(path: &Path) -> io::Result<Sink> {
        if path.as_os_str() == "-" {
            return Ok(Sink::Stdout { written: 0 });
        }
        if let Some(file) = inherited(path) {
            return Ok(Sink::Direct {
                file,
                path: path.to_path_buf(),
                written: 0,
            });
        }
        let err = |e: io::Error| io::Error::new(e.kind(), format!("{}: {e}", path.display()));
        let direct = |append: bool| {
            let file = std::fs::OpenOptions::new()
                .write(true)
                .append(append)
                .open(path)
                .map_err(err)?;
            Ok(Sink::Direct {
                file,
                path: path.to_path_buf(),
                written: 0,
            })
        };
        let (target, mode) = match std::fs::metadata(path) {
            // Written after what the file holds (the shell truncated it for `>`).
            Ok(m) if names_a_descriptor(path) => return direct(m.is_file()),
            Ok(m) if !m.is_file() => return direct(false),
            // Through a symbolic link: replace the file it points to, not the link.
            Ok(m) => (std::fs::canonicalize(path).map_err(err)?, Some(m.mode())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => (path.to_path_buf(), None),
            Err(e) => return Err(err(e)),
        };
        let dir = match target.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        let name = target.file_name().unwrap_or_default().to_string_lossy();
        let file = tempfile::Builder::new()
            .prefix(&format!(".{name}."))
            .suffix(".part")
            // As File::create would: 0666 less the umask for a new file.
            .permissions(std::fs::Permissions::from_mode(0o666))
            .tempfile_in(dir)
            .map_err(err)?;
        if let Some(mode) = mode {
            // Replacing a file keeps its mode.
            file.as_file()
                .set_permissions(std::fs::Permissions::from_mode(mode & 0o7777))
                .map_err(err)?;
        }
        Ok(Sink::Temp { file, target })
    }

    /// Prepares for an attempt: a file is emptied; stdout cannot take back
    /// bytes already written, so then the retry is refused.
    fn restart(&mut self) -> Result<(), ClientError> {
        match self {
            Sink::Stdout { written: 0 } => Ok(()),
            Sink::Stdout { written } => Err(ClientError::Protocol(format!(
                "connection lost after {written} result bytes went to stdout; not retrying"
            ))),
            Sink::Temp { file, .. } => {
                file.as_file().set_len(0)?;
                file.as_file_mut().seek(SeekFrom::Start(0))?;
                Ok(())
            }
            Sink::Direct { written: 0, .. } => Ok(()),
            Sink::Direct { written, path, .. } => Err(ClientError::Protocol(format!(
                "connection lost after {written} result bytes went to {}; not retrying",
                path.display()
            ))),
        }
    }

    /// The job succeeded: flush, and put the file in place.
    fn finish(self) -> io::Result<()> {
        match self {
            Sink::Stdout { .. } => io::stdout().flush(),
            Sink::Temp { mut file, target } => {
                file.flush()?;
                file.persist(&target).map(drop).map_err(|e| {
                    io::Error::new(e.error.kind(), format!("{}: {}", target.display(), e.error))
                })
            }
            Sink::Direct { mut file, .. } => file.flush(),
        }
    }
}

impl Write for Sink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Sink::Stdout { written } => {
                let n = io::stdout().write(buf)?;
                *written += n as u64;
                Ok(n)
            }
            Sink::Temp { file, .. } => file.write(buf),
            Sink::Direct { file, written, .. } => {
                let n = file.write(buf)?;
                *written += n as u64;
                Ok(n)
            }
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Sink::Stdout { .. } => io::stdout().flush(),
            Sink::Temp { file, .. } => file.flush(),
            Sink::Direct { file, .. } => file.flush(),
        }
    }
}

/// What `run` asks for.
struct Job<'a> {
    op: &'a str,
    args: &'a [&'a str],
    payload: &'a Payload<'a>,
}

enum Payload<'a> {
    Bytes(Vec<u8>),
    File(&'a Path),
}

fn open_input(p: &Path) -> io::Result<File> {
    File::open(p).map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", p.display())))
}

fn run(args: Args) -> Result<(), ClientError> {
    match &args.command {
        Command::Ping { timeout_ms } => ping(&args, *timeout_ms),
        Command::Run {
            op,
            args: op_args,
            input,
            output,
            timeout_ms,
        } => {
            let mut client = retrying(&args, args.retry_ms, *timeout_ms, true)?;
            let op_args: Vec<&str> = op_args.iter().map(String::as_str).collect();
            let mut sink = Sink::open(output)?;
            let result_on_terminal =
                matches!(sink, Sink::Stdout { .. }) && io::stdout().is_terminal();
            let payload = read_payload(input.as_deref())?;
            let ctrl_c = interrupt::CtrlC::install()?;
            client.run(|c| {
                let job = Job {
                    op,
                    args: &op_args,
                    payload: &payload,
                };
                run_once(c, &job, &mut sink, result_on_terminal, &ctrl_c)
            })?;
            sink.finish()?;
            Ok(())
        }
        Command::Status {
            json,
            watch,
            interval_ms,
        } => {
            // Answered by the dispatcher itself, at once: no job to wait for.
            let mut client = retrying(&args, args.retry_ms, Some(args.retry_ms), false)?;
            if *watch {
                let every = Duration::from_millis((*interval_ms).max(50));
                return Ok(watch_status(&mut client, *json, every)?);
            }
            let report = client.status()?;
            if *json {
                let json = serde_json::to_string_pretty(&report).expect("report serialises");
                emit(format!("{json}\n").as_bytes())?;
            } else {
                emit(osps_client::render::status_table(&report).as_bytes())?;
            }
            Ok(())
        }
        Command::Reload => {
            // A request whose answer was lost is sent again: reading the same file twice changes nothing the second time.
            // No overall deadline: the answer comes once the new pools'
            // workers are ready, which the dispatcher bounds (about 11 s).
            let mut client = retrying(&args, args.retry_ms, None, false)?;
            let summary = client.run(|c| c.call(ipc_core::proto::OP_RELOAD, &[], &[]))?;
            emit(&summary)?;
            Ok(())
        }
        Command::Metrics => {
            // Answered by the dispatcher itself, like status.
            let mut client = retrying(&args, args.retry_ms, Some(args.retry_ms), false)?;
            emit(client.metrics()?.as_bytes())?;
            Ok(())
        }
    }
}

/// Writes `bytes` to stdout. A reader gone away (`osps-client status --json
/// | head`) ends the client at once with status 141, what a shell shows
/// for a program SIGPIPE killed (Rust ignores SIGPIPE; `print!` would
/// panic).
fn emit(bytes: &[u8]) -> io::Result<()> {
    let mut out = io::stdout().lock();
    quiet_on_broken_pipe(out.write_all(bytes).and_then(|()| out.flush()))
}

/// A write to stdout's result: where its reader went away, the client
/// ends there with status 141 (see [`emit`]).
fn quiet_on_broken_pipe(written: io::Result<()>) -> io::Result<()> {
    match written {
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => std::process::exit(EXIT_BROKEN_PIPE),
        done => done,
    }
}

/// 128 + SIGPIPE: how a shell reports a process SIGPIPE ended.
const EXIT_BROKEN_PIPE: i32 = 141;

/// `ping`: one round trip through the whole path, timed.
fn ping(args: &Args, timeout_ms: Option<u64>) -> Result<(), ClientError> {
    let ms = timeout_ms.unwrap_or(5_000);
    let mut client = retrying(args, ms, Some(ms), timeout_ms.is_some())?;
    let start = std::time::Instant::now();
    client.run(Client::ping)?;
    let how = if client.retries > 0 {
        format!(" after {} retries", client.retries)
    } else {
        String::new()
    };
    let ms = start.elapsed().as_secs_f64() * 1e3;
    emit(format!("pong from {} in {ms:.3} ms{how}\n", client.endpoint()).as_bytes())?;
    Ok(())
}

/// The payload of `run --input`: a file is reopened on each attempt; stdin
/// can only be read once, so it is kept.
fn read_payload(input: Option<&Path>) -> Result<Payload<'_>, ClientError> {
    Ok(match input {
        Some(p) if p.as_os_str() == "-" => {
            let mut buf = Vec::new();
            io::stdin().lock().read_to_end(&mut buf)?;
            Payload::Bytes(buf)
        }
        Some(p) => {
            open_input(p)?; // report a missing file at once, not after retries
            Payload::File(p)
        }
        None => Payload::Bytes(Vec::new()),
    })
}

/// One attempt of `run`: streams the payload in and the result out, with a
/// progress line when the result does not go to the terminal; returns the
/// result's length.
fn run_once(
    c: &mut Client,
    job: &Job<'_>,
    sink: &mut Sink,
    result_on_terminal: bool,
    ctrl_c: &interrupt::CtrlC,
) -> Result<u64, ClientError> {
    let op = job.op;
    sink.restart()?;
    let (len, input): (u64, Box<dyn Read>) = match job.payload {
        Payload::Bytes(bytes) => (bytes.len() as u64, Box::new(&bytes[..])),
        Payload::File(p) => {
            let f = open_input(p)?;
            (f.metadata()?.len(), Box::new(f))
        }
    };
    let mut progress = progress::Progress::new(op, len, result_on_terminal);
    let input = progress.reader(input);
    let mut output = progress.writer(&mut *sink);
    // Sent whole, the job can be cancelled by Ctrl-C until it is answered.
    let result = c.send_from(op, job.args, len, input).and_then(|id| {
        let _armed = ctrl_c.arm(c.canceller(id)?);
        c.recv_streaming(id, &mut output, |n| progress.receiving(n))
    });
    progress.clear();
    drop(output);
    // Result bytes already out (stdout, a pipe) cannot be taken
    // back: say so now rather than after reconnecting.
    result.or_else(|e| {
        if e.is_retryable() {
            sink.restart()?;
        }
        Err(e)
    })
}

/// `status --watch`: redraws the table in place on a terminal (a new table
/// after a blank line otherwise; with `--json`, one JSON report per line),
/// and keeps going across dispatcher restarts.
fn watch_status(client: &mut RetryingClient, json: bool, every: Duration) -> io::Result<()> {
    loop {
        quiet_on_broken_pipe(watch_frame(client, json, every))?;
        std::thread::sleep(every);
    }
}

/// One frame of `status --watch`.
fn watch_frame(client: &mut RetryingClient, json: bool, every: Duration) -> io::Result<()> {
    let tty = io::stdout().is_terminal();
    let mut out = io::stdout().lock();
    let frame = match client.status() {
        Ok(r) if json => serde_json::to_string(&r).expect("report serialises") + "\n",
        Ok(r) => osps_client::render::status_table(&r),
        Err(e) => format!("waiting for the dispatcher: {e}\n"),
    };
    if tty && !json {
        // Home, draw, clear what the previous (longer) frame left below.
        write!(
            out,
            "\x1b[H\x1b[2J{frame}\n(every {} ms; Ctrl-C to quit)\n",
            every.as_millis()
        )?;
    } else if json {
        write!(out, "{frame}")?;
    } else {
        writeln!(out, "{frame}")?;
    }
    out.flush()
}
