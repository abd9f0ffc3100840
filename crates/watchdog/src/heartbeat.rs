//! The heartbeat: every interval, ask the dispatcher for its status over its
//! own socket (a request it answers itself, without a worker) and count the
//! misses. A stopped (SIGSTOP) or wedged dispatcher still has its socket in
//! the kernel, so connecting works but the answer never comes: that is a miss.
//! A dispatcher that answers the hello with `Refused` (full) is alive, not
//! hung: never a miss. (It admits its watchdog outside its budgets anyway,
//! knowing it by pid.)

use std::cell::Cell;
use std::path::PathBuf;
use std::rc::Rc;
use std::time::{Duration, Instant};

use ipc_core::frame::{self, DEFAULT_MAX_FRAME};
use ipc_core::proto::{self, HelloStatus, Outcome, Request, Response, HELLO_LEN, PROTOCOL_VERSION};
use ipc_core::status::StatusReport;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::sync::mpsc;

/// Heartbeat settings.
#[derive(Debug, Clone)]
pub struct Settings {
    pub socket: PathBuf,
    pub interval: Duration,
    pub miss_limit: u32,
    /// A new dispatcher that never answers within this is hung too.
    pub start_timeout: Duration,
}

/// A report to the supervisor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Beat {
    /// `pid` missed `misses` heartbeats in a row (0 misses: it never
    /// answered within the start timeout).
    Missed { pid: u32, misses: u32 },
    /// `pid` answered and has `workers` workers up (idle or busy): the whole
    /// path serves. Sent once per dispatcher: when all its workers are up,
    /// or at the second answer with at least one up.
    Serving { pid: u32, workers: usize },
}

/// Watches whichever dispatcher pid `watched` names, forever.
pub async fn run(
    settings: Settings,
    watched: Rc<Cell<Option<u32>>>,
    tx: mpsc::UnboundedSender<Beat>,
) {
    let mut tick = tokio::time::interval(settings.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut watch = Watch::new(None);
    let mut next_id = 1u64;
    loop {
        tick.tick().await;
        let pid = watched.get();
        if pid != watch.pid {
            watch = Watch::new(pid);
        }
        let Some(pid) = pid else { continue };
        next_id += 1;
        let probe = probe(&mut watch.conn, &settings.socket, pid, next_id);
        let outcome = match tokio::time::timeout(settings.interval, probe).await {
            Ok(r) => r,
            Err(_) => Err(Probe::Unanswered("no answer in time".into())),
        };
        let beat = match outcome {
            Ok(report) => watch.answered(pid, &report),
            Err(Probe::Refused) => watch.refused(pid),
            Err(failure) => watch.missed(pid, &failure, &settings),
        };
        if let Some(beat) = beat {
            let _ = tx.send(beat);
        }
    }
}

/// What the heartbeat knows about the dispatcher it watches.
#[derive(Debug)]
struct Watch {
    /// The watched pid.
    pid: Option<u32>,
    conn: Option<UnixStream>,
    /// Since when it has been watched (or last reported as never answering).
    since: Instant,
    /// It answered at least once.
    answered: bool,
    /// [`Beat::Serving`] was sent.
    serving: bool,
    /// An answer showed some workers up, not all (see [`Watch::answered`]).
    partly_up: bool,
    /// Heartbeats missed in a row.
    misses: u32,
}

impl Watch {
    fn new(pid: Option<u32>) -> Watch {
        Watch {
            pid,
            conn: None,
            since: Instant::now(),
            answered: false,
            serving: false,
            partly_up: false,
            misses: 0,
        }
    }

    /// It answered with `report`: [`Beat::Serving`] once every worker is up,
    /// or at the second answer with one up.
    fn answered(&mut self, pid: u32, report: &StatusReport) -> Option<Beat> {
        if !self.answered {
            self.answered = true;
            tracing::info!(pid, "dispatcher answers its heartbeat");
        }
        if self.misses > 0 {
            tracing::info!(
                pid,
                "heartbeat answered again after {} miss(es)",
                self.misses
            );
        }
        self.misses = 0;
        let workers = report.workers.iter().filter(|w| w.state.is_up()).count();
        if self.serving || workers == 0 {
            return None;
        }
        // Serving once every worker is up, or at the next answer with one
        // up: the held socket answers the first probe the moment the
        // dispatcher listens, while its other workers may still be starting.
        if workers < report.workers.len() && !std::mem::replace(&mut self.partly_up, true) {
            return None;
        }
        self.serving = true;
        Some(Beat::Serving { pid, workers })
    }

    /// Only a live event loop answers a hello: alive, if full.
    fn refused(&mut self, pid: u32) -> Option<Beat> {
        tracing::debug!(
            pid,
            "the dispatcher refused the heartbeat's connection (full): alive, not a miss"
        );
        self.answered = true;
        self.misses = 0;
        self.conn = None;
        None
    }

    /// Before its first answer, a dispatcher is still starting, bounded by
    /// the start timeout: whether its socket refuses us or (a socket the
    /// watchdog holds, `held`) takes the connection into its backlog and
    /// nobody answers yet; unless it is stopped (SIGSTOP): a stopped process
    /// is not starting, and misses count as after an answer (else a
    /// dispatcher stopped before its first answer would be found hung only
    /// after the whole start timeout, the service down meanwhile). After
    /// the first answer, each failure is a miss.
    fn missed(&mut self, pid: u32, failure: &Probe, settings: &Settings) -> Option<Beat> {
        self.conn = None;
        let why = match failure {
            Probe::NotListening => "socket not listening",
            Probe::Unanswered(why) => why.as_str(),
            Probe::Refused => "refused",
        };
        if self.answered || stopped(pid) {
            self.misses += 1;
            tracing::debug!(pid, misses = self.misses, "heartbeat missed: {why}");
            if self.misses >= settings.miss_limit {
                let misses = std::mem::take(&mut self.misses);
                return Some(Beat::Missed { pid, misses });
            }
        } else if self.since.elapsed() > settings.start_timeout {
            self.since = Instant::now();
            return Some(Beat::Missed { pid, misses: 0 });
        }
        None
    }
}

/// Whether process `pid` is stopped (state `T`, or `t` under a tracer).
fn stopped(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| crate::descendants::parent_and_state(&stat))
        .is_some_and(|(_, state)| matches!(state, 'T' | 't'))
}

/// Why a probe failed.
#[derive(Debug)]
enum Probe {
    /// Nobody accepts connections on the socket (yet).
    NotListening,
    /// Connected, but no valid answer.
    Unanswered(String),
    /// The dispatcher answered the hello with `Refused`: alive, but full.
    Refused,
}

fn unanswered(e: impl std::fmt::Display) -> Probe {
    Probe::Unanswered(e.to_string())
}

/// One status round trip; reconnects when needed. Checks that the answer
/// comes from the dispatcher we watch, and returns its report.
async fn probe(
    conn: &mut Option<UnixStream>,
    socket: &PathBuf,
    pid: u32,
    id: u64,
) -> Result<StatusReport, Probe> {
    if conn.is_none() {
        let mut s = UnixStream::connect(socket)
            .await
            .map_err(|_| Probe::NotListening)?;
        s.write_all(&proto::encode_hello(PROTOCOL_VERSION, 0))
            .await
            .map_err(unanswered)?;
        let mut hello = [0u8; HELLO_LEN];
        s.read_exact(&mut hello).await.map_err(unanswered)?;
        match proto::decode_hello(&hello) {
            Some((PROTOCOL_VERSION, 0)) => {}
            Some((_, status)) if status == HelloStatus::Refused as u16 => {
                return Err(Probe::Refused)
            }
            _ => return Err(unanswered("bad hello")),
        }
        *conn = Some(s);
    }
    let s = conn.as_mut().expect("connected above");
    let mut out = Vec::with_capacity(64);
    let req = Request {
        id,
        op: proto::OP_STATUS.into(),
        args: Default::default(),
        payload_len: 0,
    };
    frame::encode(&req, &mut out).map_err(unanswered)?;
    s.write_all(&out).await.map_err(unanswered)?;
    let resp: Response = frame::read_frame_async(s, &mut out, DEFAULT_MAX_FRAME)
        .await
        .map_err(unanswered)?;
    let mut body = vec![0u8; resp.result_len.min(1 << 20) as usize];
    frame::read_payload_async(s, &mut body)
        .await
        .map_err(unanswered)?;
    if resp.id != id || resp.outcome != Outcome::Ok {
        return Err(unanswered(format!("unexpected reply {resp:?}")));
    }
    let report: StatusReport = serde_json::from_slice(&body).map_err(unanswered)?;
    if report.dispatcher_pid != pid {
        return Err(unanswered(format!(
            "answered by pid {}, expected {pid}",
            report.dispatcher_pid
        )));
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A socket that answers every hello with `Refused`, as a full dispatcher does.
    async fn refuse_all(listener: tokio::net::UnixListener) {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            tokio::task::spawn_local(async move {
                let mut hello = [0u8; HELLO_LEN];
                let _ = s.read_exact(&mut hello).await;
                let mut msg =
                    proto::encode_hello(PROTOCOL_VERSION, HelloStatus::Refused as u16).to_vec();
                msg.extend_from_slice(b"OSPS dispatcher is full\n");
                let _ = s.write_all(&msg).await;
            });
        }
    }

    /// A dispatcher stopped before its first answer is hung after the miss
    /// limit, not after the start timeout; a running one that has not
    /// answered yet is still starting.
    #[test]
    fn a_process_stopped_before_its_first_answer_misses_at_once() {
        use nix::sys::signal::{kill, Signal};
        let settings = Settings {
            socket: PathBuf::from("/nonexistent"),
            interval: Duration::from_millis(100),
            miss_limit: 3,
            start_timeout: Duration::from_secs(3600),
        };
        let mut child = std::process::Command::new("sleep")
            .arg("60")
            .spawn()
            .expect("sleep runs");
        let pid = child.id();
        let mut watch = Watch::new(Some(pid));
        let unanswered = Probe::Unanswered("no answer in time".into());
        for _ in 0..5 {
            assert_eq!(watch.missed(pid, &unanswered, &settings), None, "starting");
        }
        kill(nix::unistd::Pid::from_raw(pid as i32), Signal::SIGSTOP).unwrap();
        let mut beats = Vec::new();
        for _ in 0..50 {
            if stopped(pid) {
                beats.extend(watch.missed(pid, &unanswered, &settings));
                if !beats.is_empty() {
                    break;
                }
            } else {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        let _ = child.kill();
        let _ = child.wait();
        assert_eq!(beats, [Beat::Missed { pid, misses: 3 }]);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_refused_hello_is_not_a_miss() {
        let dir = tempfile::tempdir().expect("temp dir");
        let socket = dir.path().join("full.sock");
        let listener = tokio::net::UnixListener::bind(&socket).expect("bind");
        let local = tokio::task::LocalSet::new();
        let (tx, mut rx) = mpsc::unbounded_channel();
        let settings = Settings {
            socket,
            interval: Duration::from_millis(20),
            miss_limit: 2,
            start_timeout: Duration::from_millis(100),
        };
        let watched = Rc::new(Cell::new(Some(4242)));
        local
            .run_until(async {
                tokio::task::spawn_local(refuse_all(listener));
                tokio::task::spawn_local(run(settings, watched, tx));
                tokio::time::sleep(Duration::from_millis(600)).await;
            })
            .await;
        let mut beats = Vec::new();
        while let Ok(b) = rx.try_recv() {
            beats.push(b);
        }
        assert!(
            beats.iter().all(|b| !matches!(b, Beat::Missed { .. })),
            "a dispatcher that answers Refused counted as hung: {beats:?}"
        );
    }
}
