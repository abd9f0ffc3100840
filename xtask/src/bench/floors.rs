//! The floors: the cheapest way the kernel can make the same hops as OSPS,
//! measured in the same run. Helper processes are this same `xtask` binary
//! started in a hidden mode (`__uds-echo`, `__pipe-echo`, `__chain-middle`);
//! the servers use the same event loop as the dispatcher (tokio current-thread).

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Message size of the latency floors.
pub const MSG: usize = 64;

/// Runs a hidden helper mode; returns false if `mode` is not one.
pub fn helper(mode: &str, args: &[String]) -> Result<bool> {
    match mode {
        "__uds-echo" => uds_echo_server(Path::new(&args[0]))?,
        "__pipe-echo" => pipe_echo()?,
        "__chain-middle" => chain_middle(Path::new(&args[0]))?,
        "__uds-bulk" => uds_bulk_server(Path::new(&args[0]), args[1].parse()?)?,
        _ => return Ok(false),
    }
    Ok(true)
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

/// A UDS echo server: every byte read is written back.
fn uds_echo_server(path: &Path) -> Result<()> {
    let rt = runtime()?;
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, async {
        let l = tokio::net::UnixListener::bind(path)?;
        loop {
            let (mut s, _) = l.accept().await?;
            tokio::task::spawn_local(async move {
                let mut buf = vec![0u8; 256 * 1024];
                loop {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            if s.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                        }
                    }
                }
            });
        }
    })
}

/// Echoes stdin to stdout, as a worker's pipes would carry it.
fn pipe_echo() -> Result<()> {
    let mut input = std::io::stdin().lock();
    let mut output = std::io::stdout().lock();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = input.read(&mut buf)?;
        if n == 0 {
            return Ok(());
        }
        output.write_all(&buf[..n])?;
        output.flush()?;
    }
}

/// The architectural floor's middle: client —UDS→ here —pipe→ end —pipe→
/// here —UDS→ client, on the dispatcher's kind of event loop.
fn chain_middle(path: &Path) -> Result<()> {
    let rt = runtime()?;
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, async {
        let mut end = tokio::process::Command::new(std::env::current_exe()?)
            .arg("__pipe-echo")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()?;
        let mut to_end = end.stdin.take().expect("piped");
        let mut from_end = end.stdout.take().expect("piped");
        let l = tokio::net::UnixListener::bind(path)?;
        let mut msg = [0u8; MSG];
        loop {
            // One client at a time (the readiness probe, then the bench's client).
            let (mut s, _) = l.accept().await?;
            while s.read_exact(&mut msg).await.is_ok() {
                to_end.write_all(&msg).await?;
                from_end.read_exact(&mut msg).await?;
                s.write_all(&msg).await?;
            }
        }
    })
}

/// A helper process, killed and reaped on drop.
pub struct Helper {
    child: Child,
    pub socket: Option<PathBuf>,
}

impl Drop for Helper {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(s) = &self.socket {
            let _ = std::fs::remove_file(s);
        }
    }
}

/// Starts `xtask <mode> <socket>` and waits until the socket accepts.
pub fn start_server(mode: &str, socket: &Path) -> Result<Helper> {
    let child = Command::new(std::env::current_exe()?)
        .arg(mode)
        .arg(socket)
        .stdin(Stdio::null())
        .spawn()?;
    let h = Helper {
        child,
        socket: Some(socket.to_path_buf()),
    };
    osps_testkit::wait_for(Duration::from_secs(10), || UnixStream::connect(socket).ok())
        .context("helper server did not start")?;
    Ok(h)
}

/// A round trip to measure, and the helper processes that answer it.
pub struct Pinger {
    _peers: Vec<Helper>,
    pub once: Box<dyn FnMut() -> Result<()>>,
}

/// One `MSG`-byte round trip on a stream.
fn round_trip<S: Read + Write>(s: &mut S) -> Result<()> {
    let mut msg = [7u8; MSG];
    s.write_all(&msg)?;
    s.read_exact(&mut msg)?;
    Ok(())
}

/// f1: UDS ping-pong with an echo server process.
pub fn uds_pinger(dir: &Path) -> Result<Pinger> {
    let sock = dir.join("f1.sock");
    let server = start_server("__uds-echo", &sock)?;
    let mut s = UnixStream::connect(&sock)?;
    Ok(Pinger {
        _peers: vec![server],
        once: Box::new(move || round_trip(&mut s)),
    })
}

/// f2: pipe ping-pong with a child process.
pub fn pipe_pinger() -> Result<Pinger> {
    let mut child = Command::new(std::env::current_exe()?)
        .arg("__pipe-echo")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()?;
    let mut to = child.stdin.take().expect("piped");
    let mut from = child.stdout.take().expect("piped");
    let peer = Helper {
        child,
        socket: None,
    };
    Ok(Pinger {
        _peers: vec![peer],
        once: Box::new(move || {
            let mut msg = [7u8; MSG];
            to.write_all(&msg)?;
            from.read_exact(&mut msg)?;
            Ok(())
        }),
    })
}

/// f3: the chain client —UDS→ middle —pipe→ end —pipe→ middle —UDS→ client.
pub fn chain_pinger(dir: &Path) -> Result<Pinger> {
    let sock = dir.join("f3.sock");
    let middle = start_server("__chain-middle", &sock)?;
    let mut s = UnixStream::connect(&sock)?;
    Ok(Pinger {
        _peers: vec![middle],
        once: Box::new(move || round_trip(&mut s)),
    })
}

/// f4: requests per second against a UDS echo server with `conns` concurrent connections.
pub fn uds_echo_rps(dir: &Path, conns: usize, dur: Duration) -> Result<(f64, Vec<u64>)> {
    let sock = dir.join(format!("f4-{conns}.sock"));
    let _server = start_server("__uds-echo", &sock)?;
    crate::bench::load(conns, dur, |_| {
        let mut s = UnixStream::connect(&sock)?;
        Ok(move || -> Result<()> {
            let mut msg = [1u8; MSG];
            s.write_all(&msg)?;
            s.read_exact(&mut msg)?;
            Ok(())
        })
    })
}

/// A server that reads a whole `len`-byte request, then writes it back: the
/// request/response shape of an OSPS echo, without OSPS.
fn uds_bulk_server(path: &Path, len: usize) -> Result<()> {
    // Fault the buffer in before listening: OSPS's slot is warm after its first use too.
    let mut buf = vec![1u8; len];
    let l = std::os::unix::net::UnixListener::bind(path)?;
    for s in l.incoming() {
        let mut s = s?;
        if s.read_exact(&mut buf).is_ok() {
            let _ = s.write_all(&buf);
        }
    }
    Ok(())
}

/// f5: 64 MiB each way through a raw UDS server. `in_turn`: the whole request,
/// then the whole response (the shape of an OSPS echo, used for the ratio);
/// otherwise both directions at once (full duplex, for information).
/// Returns payload bytes per second (`len` / time).
pub fn uds_stream(dir: &Path, len: usize, in_turn: bool) -> Result<f64> {
    let sock = dir.join(if in_turn {
        "f5-turn.sock"
    } else {
        "f5-duplex.sock"
    });
    let _server = if in_turn {
        let child = Command::new(std::env::current_exe()?)
            .arg("__uds-bulk")
            .arg(&sock)
            .arg(len.to_string())
            .stdin(Stdio::null())
            .spawn()?;
        let h = Helper {
            child,
            socket: Some(sock.clone()),
        };
        osps_testkit::wait_for(Duration::from_secs(10), || sock.exists().then_some(()))
            .context("bulk server did not start")?;
        h
    } else {
        start_server("__uds-echo", &sock)?
    };
    let s = UnixStream::connect(&sock)?;
    let mut w = s.try_clone()?;
    let mut r = s;
    let data = vec![0x5au8; len];
    let t = Instant::now();
    let writer = std::thread::spawn(move || w.write_all(&data));
    let mut back = vec![0u8; len];
    r.read_exact(&mut back)?;
    let elapsed = t.elapsed();
    writer.join().expect("writer")?;
    Ok(len as f64 / elapsed.as_secs_f64())
}

/// f6: memcpy of `len` bytes; bytes/s (best of 5).
pub fn memcpy(len: usize) -> f64 {
    let src = vec![0xa5u8; len];
    let mut dst = vec![0u8; len];
    dst.copy_from_slice(&src); // fault the pages in first
    let best = (0..5)
        .map(|_| {
            let t = Instant::now();
            dst.copy_from_slice(std::hint::black_box(&src));
            std::hint::black_box(&dst);
            t.elapsed()
        })
        .min()
        .expect("5 runs");
    len as f64 / best.as_secs_f64()
}
