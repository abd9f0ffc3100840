//! `osps-client`: the command-line client. Errors print one line and exit non-zero.

use std::fs::File;
use std::io::{self, Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use ipc_core::Endpoint;
use osps_client::{Client, ClientError};

/// Talks to an OSPS dispatcher.
#[derive(Debug, Parser)]
#[command(name = "osps-client", version)]
struct Args {
    /// Instance name (selects the socket).
    #[arg(long, global = true, env = "OSPS_INSTANCE", default_value = "default")]
    instance: String,
    /// Base runtime directory [default: $XDG_RUNTIME_DIR/osps, else /tmp/osps-<uid>].
    #[arg(long, global = true, env = "OSPS_RUNTIME_DIR")]
    runtime_dir: Option<PathBuf>,
    /// Connect here instead of the instance's socket: unix:PATH or tcp:HOST:PORT.
    #[arg(long, global = true)]
    connect: Option<Endpoint>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Round trip through the dispatcher and a worker; exits 0 when the whole path answers.
    Ping {
        /// Give up after this many milliseconds.
        #[arg(long, default_value_t = 5_000)]
        timeout_ms: u64,
    },
    /// Runs an operation: ping, echo, upper, sha256, wc, sleep MS.
    Run {
        /// The operation.
        op: String,
        /// Its arguments (e.g. the milliseconds of `sleep`).
        args: Vec<String>,
        /// Payload: a file, or - for stdin [default: empty].
        #[arg(long, short)]
        input: Option<PathBuf>,
        /// Where to write the result: a file, or - for stdout.
        #[arg(long, short, default_value = "-")]
        output: PathBuf,
    },
    /// Shows the dispatcher's status: processes, counters, socket and segment.
    Status {
        /// Print the raw JSON report.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("osps-client: {e}");
            ExitCode::FAILURE
        }
    }
}

fn connect(args: &Args) -> Result<Client, ClientError> {
    match &args.connect {
        Some(ep) => Client::connect(ep),
        None => Client::connect_instance(&args.instance, args.runtime_dir.as_deref()),
    }
}

fn run(args: Args) -> Result<(), ClientError> {
    let mut client = connect(&args)?;
    match args.command {
        Command::Ping { timeout_ms } => {
            client.set_timeout(Some(Duration::from_millis(timeout_ms.max(1))))?;
            let start = std::time::Instant::now();
            client.ping()?;
            println!(
                "pong from {} in {:.3} ms",
                client.endpoint(),
                start.elapsed().as_secs_f64() * 1e3
            );
        }
        Command::Run {
            op,
            args: op_args,
            input,
            output,
        } => {
            let op_args: Vec<&str> = op_args.iter().map(String::as_str).collect();
            let mut out: Box<dyn Write> =
                if output.as_os_str() == "-" {
                    Box::new(io::stdout().lock())
                } else {
                    Box::new(File::create(&output).map_err(|e| {
                        io::Error::new(e.kind(), format!("{}: {e}", output.display()))
                    })?)
                };
            match input {
                None => {
                    client.call_streaming(&op, &op_args, 0, io::empty(), &mut out)?;
                }
                Some(p) if p.as_os_str() == "-" => {
                    let mut buf = Vec::new();
                    io::stdin().lock().read_to_end(&mut buf)?;
                    client.call_streaming(&op, &op_args, buf.len() as u64, &buf[..], &mut out)?;
                }
                Some(p) => {
                    let f = File::open(&p)
                        .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", p.display())))?;
                    let len = f.metadata()?.len();
                    client.call_streaming(&op, &op_args, len, f, &mut out)?;
                }
            }
            out.flush()?;
        }
        Command::Status { json } => {
            let report = client.status()?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&report).expect("report serialises")
                );
            } else {
                print_status(&report);
            }
        }
    }
    Ok(())
}

fn print_status(r: &ipc_core::status::StatusReport) {
    use std::fmt::Write as _;
    let mut o = String::new();
    let _ = writeln!(o, "instance      {}", r.instance);
    let _ = writeln!(
        o,
        "dispatcher    pid {}, up {:.1} s{}",
        r.dispatcher_pid,
        r.uptime_ms as f64 / 1e3,
        if r.shutting_down {
            ", shutting down"
        } else {
            ""
        }
    );
    match &r.watchdog {
        Some(w) => {
            let cause = if w.last_restart_cause.is_empty() {
                "none".to_owned()
            } else {
                w.last_restart_cause.clone()
            };
            let _ = writeln!(
                o,
                "watchdog      pid {}; dispatcher restarts {}; last restart cause: {cause}",
                w.pid, w.restarts
            );
        }
        None => {
            let _ = writeln!(o, "watchdog      none (dispatcher started directly)");
        }
    }
    let _ = writeln!(o, "socket        {}", r.socket);
    if let Some(tcp) = &r.tcp {
        let _ = writeln!(o, "tcp           {tcp}");
    }
    let s = &r.segment;
    let _ = writeln!(
        o,
        "segment       {} ({}, {} MiB, generation {}) — see: ls -l {}",
        s.name,
        s.backend,
        s.size >> 20,
        s.generation,
        s.path
    );
    let _ = writeln!(
        o,
        "slots         {} in use ({} KiB); max payload {} bytes",
        s.slots_in_use,
        s.slot_bytes_in_use >> 10,
        s.max_payload
    );
    let _ = writeln!(
        o,
        "jobs          {} done, {} failed, {} in flight, {} queued; {} connection(s)",
        r.jobs_done, r.jobs_failed, r.in_flight, r.queue_depth, r.connections
    );
    let _ = writeln!(
        o,
        "workers       {:>5} {:>8} {:>9} {:>9} {:>8}",
        "#", "pid", "state", "jobs", "restarts"
    );
    for w in &r.workers {
        let _ = writeln!(
            o,
            "              {:>5} {:>8} {:>9} {:>9} {:>8}",
            w.index, w.pid, w.state, w.jobs_done, w.restarts
        );
    }
    print!("{o}");
}
