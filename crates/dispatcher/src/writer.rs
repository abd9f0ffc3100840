//! A connection's replies, written as they complete: small ones batched
//! into one write, a large result sent straight from its slot. The write
//! deadline is about progress: a client that takes no byte of its replies
//! for that long is dropped, and the slots of its replies are freed; a slow
//! reader that keeps taking bytes is served, however long a large reply
//! takes.

use std::rc::Rc;
use std::time::Duration;

use ipc_core::frame;
use ipc_core::proto::Response;
use tokio::io::{AsyncWrite, AsyncWriteExt};

use crate::admission::{Holder, Wait};
use crate::handshake::log_rate_limited;
use crate::replies::{Body, Replies, Reply};
use crate::shared::Shared;

/// Results up to this size are copied into the batch; larger ones are
/// written from their slot.
const INLINE_RESULT: usize = 16 * 1024;
/// A batch is written once it holds this much.
const BATCH: usize = 64 * 1024;

/// How writing a reply ended.
#[derive(Debug)]
enum Written {
    Done,
    /// The connection failed (the client left).
    Gone(std::io::Error),
    /// No byte could be written for the whole deadline.
    Stalled,
}

/// Writes one connection's replies.
pub struct ReplyWriter<'a, W> {
    pub shared: &'a Shared,
    pub wr: W,
    pub replies: &'a Rc<Replies>,
    pub holder: &'a Holder,
    pub peer: &'a str,
    /// The batch buffer, kept between batches (no allocation per reply)
    /// unless a batch grew it past [`KEEP`].
    pub out: Vec<u8>,
}

/// Batch buffer capacity kept between batches: enough for the small
/// replies of a busy connection, little for an idle one to hold.
const KEEP: usize = 4096;

impl<W: AsyncWrite + Unpin> ReplyWriter<'_, W> {
    fn deadline(&self) -> Duration {
        Duration::from_millis(self.shared.config.write_timeout_ms)
    }

    /// Writes replies until none can come any more (then returns true), or
    /// until the client is gone or stalls (then false, and replies that
    /// come later are dropped, freeing their slots).
    pub async fn run(&mut self) -> bool {
        loop {
            let Some(first) = self.replies.next().await else {
                return true;
            };
            if !self.write_batch(first).await {
                self.replies.close();
                return false;
            }
        }
    }

    /// Closes the write side (after the last reply), within the deadline.
    pub async fn shut(&mut self) {
        let _ = tokio::time::timeout(self.deadline(), async {
            let _ = self.wr.flush().await;
            let _ = self.wr.shutdown().await;
        })
        .await;
    }

    /// Writes `first` and the replies already waiting behind it, in one
    /// write when they are small.
    async fn write_batch(&mut self, first: Reply) -> bool {
        let mut out = std::mem::take(&mut self.out);
        let written = self.fill_and_write(first, &mut out).await;
        out.clear();
        if out.capacity() <= KEEP {
            self.out = out;
        }
        written
    }

    async fn fill_and_write(&mut self, first: Reply, out: &mut Vec<u8>) -> bool {
        let mut next = Some(first);
        while let Some(reply) = next.take() {
            let Reply {
                req_id,
                outcome,
                body,
                permit: _held_until_written,
            } = reply;
            let bytes = match &body {
                Body::Inline(bytes) => bytes.as_slice(),
                Body::Slot { result, lease } => lease.result(result.clone()),
            };
            let resp = Response {
                id: req_id,
                outcome,
                result_len: bytes.len() as u64,
            };
            frame::encode(&resp, out).expect("responses encode");
            if bytes.len() <= INLINE_RESULT {
                out.extend_from_slice(bytes);
            } else {
                // Large result: header, then the bytes straight from the slot.
                if !self.write(out).await || !self.write(bytes).await {
                    return false;
                }
                out.clear();
            }
            drop(body);
            if out.len() < BATCH {
                next = self.replies.try_next();
            }
        }
        out.is_empty() || self.write(out).await
    }

    /// Writes all of `buf`; false when the client is gone or stalled (said
    /// in the log).
    async fn write(&mut self, buf: &[u8]) -> bool {
        let deadline = self.deadline();
        match write_progressing(&mut self.wr, buf, deadline).await {
            Written::Done => true,
            Written::Gone(e) => {
                let peer = self.peer;
                tracing::debug!(%peer, "connection ended while writing a reply: {e}");
                false
            }
            Written::Stalled => {
                let why = stall_cause(self.shared, self.holder, deadline);
                let peer = self.peer;
                log_rate_limited(
                    || tracing::info!(%peer, "dropping a connection: {why}; its slots are freed (logged at most once a second)"),
                );
                false
            }
        }
    }
}

/// Writes all of `buf`, as fast as the client takes it: fails only when no
/// byte of it could be written for `deadline` (the deadline starts again
/// after each write that took some bytes), not when the whole takes longer.
/// The writer is the socket itself (nothing buffers in between), so there
/// is nothing to flush per reply; the writer flushes once when it ends.
async fn write_progressing<W: AsyncWrite + Unpin>(
    wr: &mut W,
    mut buf: &[u8],
    deadline: Duration,
) -> Written {
    while !buf.is_empty() {
        match tokio::time::timeout(deadline, wr.write(buf)).await {
            Ok(Ok(0)) => return Written::Gone(std::io::ErrorKind::WriteZero.into()),
            Ok(Ok(n)) => buf = &buf[n..],
            Ok(Err(e)) => return Written::Gone(e),
            Err(_) => return Written::Stalled,
        }
    }
    Written::Done
}

/// Why a connection whose client took no reply bytes for `deadline` is
/// dropped, for the log: what its reader was waiting for meanwhile tells
/// whether the client is blocked writing a request the dispatcher will not
/// read until the client reads its replies (the client writes without
/// reading: PROTOCOL §10), or simply does not read.
fn stall_cause(shared: &Shared, holder: &Holder, deadline: Duration) -> String {
    let stalled =
        format!("its client took no byte of its replies for {deadline:?} (--write-timeout-ms)");
    let Some((wait, since)) = holder.waiting() else {
        return format!("{stalled}: it did not read its replies");
    };
    let waited = since.elapsed();
    let writes = "the client writes requests without reading its replies (a client must read replies while it writes: docs/PROTOCOL.md §10)";
    match wait {
        Wait::ConnCap => format!(
            "{stalled} while its next request waited {waited:.1?} for a slot over the connection's own share of the arena of its pool's segment (--conn-arena-percent), which only writing its replies frees: {writes}"
        ),
        Wait::InFlight => format!(
            "{stalled} while its next request waited {waited:.1?} behind {} unanswered requests (--max-in-flight), which only writing its replies frees: {writes}",
            shared.config.max_in_flight
        ),
        Wait::PeerCap => format!(
            "{stalled} while its next request waited {waited:.1?} for a slot (its peer holds its share of the arena, --peer-arena-percent): it did not read its replies"
        ),
        Wait::Arena => format!(
            "{stalled} while its next request waited {waited:.1?} for a slot (the arena is full): it did not read its replies"
        ),
    }
}
