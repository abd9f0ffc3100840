//! One client connection: its opening (`handshake.rs`), then its
//! [`Handler`] reading requests and its [`ReplyWriter`] writing replies, as
//! two futures of the connection's one task, so a client may pipeline many
//! requests. An idle connection costs its task (about 2.6 KB), a 4 KiB
//! read buffer, one [`Replies`] and the small buffers its last replies used.

use std::rc::Rc;
use std::time::Duration;

use ipc_core::proto::{self, HelloStatus, PROTOCOL_VERSION};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

use crate::admission::{Gate, Holder, PeerKey};
use crate::handler::{Ended, Handler};
use crate::handshake::{
    handshake, linger, log_denied, log_rate_limited, refusal_line, refuse, refuse_hello, Failed,
    Failure,
};
use crate::metrics::{Listener, Refused};
use crate::replies::Replies;
use crate::shared::Shared;
use crate::writer::ReplyWriter;

/// Bytes a connection reads ahead (headers of pipelined requests).
const READ_BUFFER: usize = 4096;

/// Which listener a connection came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    /// The Unix socket (the peer's uid was checked already).
    Unix,
    /// TCP; `needs_token`: the peer must present the dispatcher's token.
    Tcp { needs_token: bool },
    /// The watchdog's heartbeat, on the Unix socket (`SO_PEERCRED` pid is the
    /// watchdog that started us): admitted outside every budget, so that no
    /// flood of clients can make a healthy dispatcher look hung.
    Watchdog,
}

impl Via {
    /// The listener it came through, for the metrics.
    fn listener(self) -> Listener {
        match self {
            Via::Unix | Via::Watchdog => Listener::Unix,
            Via::Tcp { .. } => Listener::Tcp,
        }
    }

    /// The listener's budgets; `None` for the watchdog, which has none.
    fn gate(self, shared: &Shared) -> Option<&Gate> {
        match self {
            Via::Unix => Some(&shared.admission.unix),
            Via::Tcp { .. } => Some(&shared.admission.tcp),
            Via::Watchdog => None,
        }
    }
}

/// Who is on the other end: a name for the log and a key for the budgets.
#[derive(Debug, Clone)]
pub struct Peer {
    pub name: String,
    pub key: PeerKey,
    /// Held to a share of its listener's connections (half): a uid admitted
    /// only by `--allow-uid`, or a TCP address on a listener that needs the
    /// token. The owner (our own uid, root) is not.
    pub capped: bool,
}

/// Bytes of a reply the kernel may hold unsent on a TCP connection.
const TCP_NOTSENT_LOWAT: u32 = 128 << 10;

/// Sets up an accepted TCP connection: no Nagle delay (replies are written
/// whole), and at most [`TCP_NOTSENT_LOWAT`] bytes queued unsent
/// (`TCP_NOTSENT_LOWAT`), so that the socket turns writable again as soon
/// as the client takes some of a reply: without it, a send buffer grown to
/// a few MiB turns writable only once a third of it is free, and the write
/// deadline, which counts time without progress, would see a slow but
/// steady reader stall for seconds. (Bytes in flight are still bounded by
/// the congestion and receive windows only: no loss of throughput.)
pub fn tune_tcp(stream: &tokio::net::TcpStream) {
    let _ = stream.set_nodelay(true);
    if let Err(e) = socket2::SockRef::from(stream).set_tcp_notsent_lowat(TCP_NOTSENT_LOWAT) {
        tracing::debug!("TCP_NOTSENT_LOWAT not set: {e}");
    }
}

/// Takes an accepted connection: serves it, or refuses it when its
/// listener's connection budget is spent.
pub async fn accept<S>(shared: Rc<Shared>, stream: S, peer: Peer, via: Via)
where
    S: AsyncRead + AsyncWrite + 'static,
{
    match via.gate(&shared) {
        Some(gate) => match gate.refuses(&peer.key, peer.capped) {
            Some(why) => {
                shared.metrics.refused(via.listener(), refusal(why));
                refuse(&shared, stream, &peer, gate, why).await
            }
            None => serve(shared, stream, peer, via).await,
        },
        None => serve(shared, stream, peer, via).await,
    }
}

/// Serves one accepted connection to its end.
async fn serve<S>(shared: Rc<Shared>, stream: S, peer: Peer, via: Via)
where
    S: AsyncRead + AsyncWrite + 'static,
{
    let gate = via.gate(&shared);
    let ticket = gate.map(|g| g.handshakes.enter(peer.key.clone()));
    let (rd, mut wr) = tokio::io::split(stream);
    // A small read buffer: a request's prefix and header arrive in one read
    // (large payloads bypass it, straight into their slot).
    let mut rd = tokio::io::BufReader::with_capacity(READ_BUFFER, rd);
    let deadline = Duration::from_millis(shared.config.handshake_timeout_ms);
    let token = match via {
        Via::Tcp { needs_token: true } => shared.admission.tcp_token.as_deref(),
        _ => None,
    };
    // Until admitted, a newer connection may evict this one (also while it
    // lingers after a refusal: every descriptor stays within a budget).
    let evicted = || async {
        match &ticket {
            Some(t) => t.evicted().await,
            None => std::future::pending().await,
        }
    };
    let opened = tokio::select! {
        // Boxed: its buffer is needed during the handshake only, and the
        // task's size is what every connection keeps for its whole life.
        r = tokio::time::timeout(deadline, Box::pin(handshake(&mut rd, &mut wr, token))) => r,
        () = evicted() => {
            shared.metrics.refused(via.listener(), Refused::Evicted);
            log_rate_limited(
                || tracing::info!(peer = %peer.name, "evicted the oldest connection still silent in its handshake: the listener's handshake budget is full (such evictions are logged at most once a second)"),
            );
            return;
        }
    };
    let name = &peer.name;
    let failed = match opened {
        Ok(Ok(())) => match gate.and_then(|g| Some((g, g.refuses(&peer.key, peer.capped)?))) {
            // Others were admitted while this one said hello.
            Some((gate, why)) => {
                shared.metrics.refused(via.listener(), refusal(why));
                let line = refusal_line(gate, &peer.key, why);
                refuse_hello(&mut wr, HelloStatus::Refused, &line).await;
                Failure::Answered
            }
            None => {
                // Counted before the first await, so the limit holds exactly.
                let _admitted = gate.map(|g| g.admit(&peer.key, peer.capped));
                drop(ticket);
                return serve_admitted(&shared, rd, wr, peer).await;
            }
        },
        Ok(Err(failed)) => handshake_failed(&shared, via, name, failed),
        Err(_) => {
            shared
                .metrics
                .refused(via.listener(), Refused::HandshakeTimeout);
            tracing::info!(peer = %name, "connection dropped: no handshake within {deadline:?}");
            return;
        }
    };
    let _ = wr.shutdown().await;
    if failed == Failure::Answered {
        tokio::select! {
            () = linger(&mut rd) => {}
            () = evicted() => {}
        }
    }
}

/// Counts and logs a failed handshake; returns how it failed.
fn handshake_failed(shared: &Shared, via: Via, name: &str, failed: Failed) -> Failure {
    let Failed {
        reason,
        how,
        refused,
    } = failed;
    if let Some(why) = refused {
        shared.metrics.refused(via.listener(), why);
    }
    if how == Failure::Denied {
        log_denied(
            || tracing::warn!(peer = %name, "connection denied at handshake: {reason} (denials are logged at most once a second)"),
        );
    } else {
        log_rate_limited(
            || tracing::info!(peer = %name, "connection refused at handshake: {reason} (such refusals are logged at most once a second)"),
        );
    }
    how
}

/// A budget's refusal, for the metrics.
fn refusal(why: crate::admission::Refusal) -> Refused {
    match why {
        crate::admission::Refusal::Full => Refused::Full,
        crate::admission::Refusal::PeerShare => Refused::PeerShare,
    }
}

/// Serves an admitted client: accepts its hello, then reads its requests
/// and writes their replies until it leaves.
async fn serve_admitted<R, W>(shared: &Rc<Shared>, mut rd: R, wr: W, peer: Peer)
where
    R: tokio::io::AsyncBufRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let replies = Replies::new(shared.config.max_in_flight);
    // However this ends (the task may also be dropped with the runtime):
    // replies still queued hold permits, and so the `Replies`; drop them.
    let _close = CloseOnDrop(&replies);
    let holder = Holder::new(peer.key);
    let mut writer = ReplyWriter {
        shared,
        wr,
        replies: &replies,
        holder: &holder,
        peer: &peer.name,
        out: Vec::new(),
    };
    let accepted = proto::encode_hello(PROTOCOL_VERSION, HelloStatus::Accepted as u16);
    if writer.wr.write_all(&accepted).await.is_err() {
        return;
    }
    tracing::debug!(peer = %peer.name, "client connected");
    let handler = Handler {
        shared,
        rd: &mut rd,
        replies: &replies,
        holder: &holder,
        tickets: Default::default(),
    };
    let (ended, wrote) = {
        let mut reading = std::pin::pin!(handler.run());
        let mut writing = std::pin::pin!(writer.run());
        tokio::select! {
            ended = &mut reading => {
                replies.reading_done();
                (Some(ended), writing.await)
            }
            // The writer ends first only when it gave up (the client left,
            // or took no reply bytes for the write deadline): stop reading
            // too, and close. What this connection still holds is freed as
            // its jobs end.
            wrote = &mut writing => (None, wrote),
        }
    };
    if wrote {
        writer.shut().await;
    }
    if ended == Some(Ended::Refused) {
        linger(&mut rd).await;
    }
}

/// Closes a connection's replies when dropped.
struct CloseOnDrop<'a>(&'a Replies);

impl Drop for CloseOnDrop<'_> {
    fn drop(&mut self) {
        self.0.close();
    }
}
