//! A connection's requests, read one after another by its [`Handler`]: the
//! header (under the idle, then the frame deadline), then what the request
//! asks. `status` and refusals are answered by the dispatcher itself; a job
//! gets a slot, its payload is read from the socket straight into the slot,
//! and it goes on the queue. A large payload of an operation that streams
//! goes on the queue first and is read while a worker already starts on it.

use std::rc::Rc;
use std::time::{Duration, Instant};

use ipc_core::frame::{self, FrameError};
use ipc_core::proto::{self, ErrorKind, Outcome, RemoteError, Request};
use tokio::io::{AsyncBufRead, AsyncBufReadExt};

use crate::admission::{Holder, Wait};
use crate::handshake::skip;
use crate::pools::Pool;
use crate::replies::{Body, Permit, Replies, Reply};
use crate::shared::{OpName, QueuedJob, Shared};
use crate::slots::{JobSlot, SlotLease, Uploading, RESULT_RESERVE};

/// How reading a connection's requests ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// The client left, went idle or stalled: close.
    Gone,
    /// The connection must close after the replies already queued (a
    /// request it could not take); the client's leftover bytes are drained
    /// first, so it reads the answer rather than a reset.
    Refused,
}

/// A request's header, taken out of the read buffer.
struct Header {
    id: u64,
    op: OpName,
    args: Vec<std::borrow::Cow<'static, str>>,
    payload_len: u64,
}

/// Reads one connection's requests and turns them into jobs.
pub struct Handler<'a, R> {
    pub shared: &'a Rc<Shared>,
    pub rd: &'a mut R,
    pub replies: &'a Rc<Replies>,
    pub holder: &'a Rc<Holder>,
    /// The tickets of this connection's jobs, for `cancel`.
    pub tickets: crate::cancel::Tickets,
}

impl<R: AsyncBufRead + Unpin> Handler<'_, R> {
    fn frame_deadline(&self) -> Duration {
        Duration::from_millis(self.shared.config.frame_timeout_ms)
    }

    /// Reads requests until the client leaves or misbehaves.
    pub async fn run(mut self) -> Ended {
        let mut scratch = Vec::with_capacity(256);
        // One idle timer for the connection's life, moved on for each
        // request: moved later, a timer stays in the runtime's wheel (a
        // timeout made per request is put in and taken out each time).
        let mut idle = std::pin::pin!(tokio::time::sleep(Duration::ZERO));
        loop {
            let req = match self.next_request(&mut scratch, idle.as_mut()).await {
                Ok(req) => req,
                Err(ended) => return ended,
            };
            if req.op.as_str() == proto::OP_CANCEL && req.payload_len == 0 {
                self.cancel(req).await;
                continue;
            }
            let permit = self.permit().await;
            if req.payload_len > self.shared.max_payload {
                let msg = format!(
                    "payload of {} bytes exceeds the limit of {} bytes; closing the connection",
                    req.payload_len, self.shared.max_payload
                );
                answer_err(permit, req.id, ErrorKind::TooLarge, msg);
                return Ended::Refused;
            }
            // The dispatcher's own operations (cancel is above: it takes
            // no place in flight), then the pools'.
            let answered = match (req.op.as_str(), req.payload_len) {
                (proto::OP_STATUS, 0) => {
                    let report = crate::status::report(self.shared);
                    serde_json::to_vec(&report).expect("status serialises")
                }
                (proto::OP_RELOAD, 0) => {
                    let (outcome, body) =
                        match crate::reload::answer(self.shared, &self.holder.peer).await {
                            Ok(summary) => (Outcome::Ok, format!("{summary}\n").into_bytes()),
                            Err(r) => (error(r.kind, r.message), Vec::new()),
                        };
                    permit.answer(req.id, outcome, Body::Inline(body));
                    continue;
                }
                (proto::OP_METRICS, 0) => crate::metrics::render(self.shared).into_bytes(),
                (op, _) if proto::DISPATCHER_OPS.contains(&op) => {
                    let message = format!("{op} takes no payload");
                    match self
                        .refuse(req, permit, ErrorKind::BadRequest, message)
                        .await
                    {
                        Ok(()) => continue,
                        Err(ended) => return ended,
                    }
                }
                _ => match self.take(req, permit).await {
                    Ok(()) => continue,
                    Err(ended) => return ended,
                },
            };
            permit.answer(req.id, Outcome::Ok, Body::Inline(answered));
        }
    }

    /// Waits for the next request (idle deadline), then for all of its
    /// header (frame deadline).
    async fn next_request(
        &mut self,
        scratch: &mut Vec<u8>,
        mut timer: std::pin::Pin<&mut tokio::time::Sleep>,
    ) -> Result<Header, Ended> {
        let idle = Duration::from_millis(self.shared.config.idle_timeout_ms);
        timer.as_mut().reset(tokio::time::Instant::now() + idle);
        let filled = tokio::select! {
            biased;
            r = self.rd.fill_buf() => Some(r.map(|b| b.is_empty())),
            () = timer => None,
        };
        match filled {
            None => {
                tracing::info!("closing a connection idle for {idle:?}");
                return Err(Ended::Gone);
            }
            Some(Ok(true)) => return Err(Ended::Gone),
            Some(Ok(false)) => {}
            Some(Err(e)) => {
                tracing::debug!("connection ended: {e}");
                return Err(Ended::Gone);
            }
        }
        let deadline = self.frame_deadline();
        let max = self.shared.config.max_frame;
        let header = tokio::time::timeout(deadline, frame::read_body_async(self.rd, scratch, max));
        // Decoded in place: the request borrows its strings from `scratch`.
        let decoded = header
            .await
            .unwrap_or(Err(FrameError::Stalled))
            .and_then(|()| frame::decode_body::<Request<'_>>(scratch));
        match decoded {
            Ok(r) => Ok(Header {
                id: r.id,
                op: OpName::new(&r.op),
                args: r.args.iter().map(|a| a.to_string().into()).collect(),
                payload_len: r.payload_len,
            }),
            Err(FrameError::Stalled) => Err(self.stalled()),
            Err(e @ (FrameError::TooLarge { .. } | FrameError::Corrupt(_))) => {
                tracing::info!("closing connection: {e}");
                // About the connection itself: id 0, no permit.
                self.replies.send(Reply {
                    req_id: 0,
                    outcome: error(
                        ErrorKind::BadRequest,
                        format!("{e}; closing the connection"),
                    ),
                    body: Body::Inline(Vec::new()),
                    permit: None,
                });
                Err(Ended::Refused)
            }
            Err(e) => {
                tracing::debug!("connection ended: {e}");
                Err(Ended::Gone)
            }
        }
    }

    fn stalled(&self) -> Ended {
        let deadline = self.frame_deadline();
        tracing::info!("dropping a connection that stalled inside a request for {deadline:?}");
        Ended::Gone
    }

    /// One of the connection's in-flight permits; waits while all are out
    /// (its replies not yet written).
    async fn permit(&self) -> Permit {
        match self.replies.try_permit() {
            Some(p) => p,
            None => {
                let _waiting = self.holder.wait(Wait::InFlight);
                self.replies.permit().await
            }
        }
    }

    /// A `cancel`: acts at once (before waiting for a place in flight, so a
    /// connection with all its places taken can still cancel), then answers
    /// after the request it cancels (`cancel.rs`).
    async fn cancel(&mut self, req: Header) {
        let found = crate::cancel::target(&req.args)
            .map(|target| self.tickets.cancel(self.shared, target, req.id));
        let permit = self.permit().await;
        match found {
            Ok(found) => crate::cancel::answer(found, req.id, permit),
            Err(message) => answer_err(permit, req.id, ErrorKind::InvalidInput, message),
        }
    }

    /// Takes a job's request: its pool, a slot, its payload, the queue.
    async fn take(&mut self, req: Header, permit: Permit) -> Result<(), Ended> {
        let shared = self.shared;
        // Routed again when a reload retired the pool while this waited
        // for a slot of it (its workers stop once its slots are back).
        let (pool, lease) = loop {
            let Some(pool) = shared.route_when_known(req.op.as_str()).await else {
                let message = shared.unknown_op(req.op.as_str());
                return self
                    .refuse(req, permit, ErrorKind::UnknownOp, message)
                    .await;
            };
            match self.lease(&req, &pool).await {
                Ok(Some(lease)) if pool.retired() => drop(lease),
                Ok(Some(lease)) => break (pool, lease),
                Ok(None) if pool.retired() => {}
                Ok(None) => {
                    let message = SHUTTING_DOWN.to_owned();
                    return self
                        .refuse(req, permit, ErrorKind::ShuttingDown, message)
                        .await;
                }
                Err(message) => {
                    return self.refuse(req, permit, ErrorKind::TooLarge, message).await;
                }
            }
        };
        if !shared.life.draining() && pool.queue.should_stream(req.op.as_str(), req.payload_len) {
            return self.stream(req, &pool, lease, permit).await;
        }
        self.read_payload(req, &pool, lease, permit).await
    }

    /// A slot of `pool`'s segment for `req`'s payload (`None` if shutdown
    /// begins while it waits), or why the pool cannot take it.
    async fn lease(&self, req: &Header, pool: &Rc<Pool>) -> Result<Option<SlotLease>, String> {
        if req.payload_len > pool.config.max_payload {
            let message = format!(
                "payload of {} bytes exceeds pool \"{}\"'s limit of {} bytes (its segment's largest slot; segment_mib)",
                req.payload_len,
                pool.name(),
                pool.config.max_payload
            );
            return Err(message);
        }
        // A slot of the pool's segment; waiting for one ends if shutdown begins.
        let len = req.payload_len + RESULT_RESERVE;
        Ok(pool.slots.lease(len, self.holder).await)
    }

    /// Answers why a request is refused at once, then skips its payload
    /// to stay in step with the stream (under the same deadline as any
    /// payload: a refused one cannot be trickled forever).
    async fn refuse(
        &mut self,
        req: Header,
        permit: Permit,
        kind: ErrorKind,
        message: String,
    ) -> Result<(), Ended> {
        answer_err(permit, req.id, kind, message);
        match tokio::time::timeout(self.frame_deadline(), skip(self.rd, req.payload_len)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => {
                tracing::debug!("connection ended inside a payload: {e}");
                Err(Ended::Gone)
            }
            Err(_) => Err(self.stalled()),
        }
    }

    /// Reads the payload into the slot, then queues the job.
    async fn read_payload(
        &mut self,
        req: Header,
        pool: &Pool,
        mut lease: SlotLease,
        permit: Permit,
    ) -> Result<(), Ended> {
        let len = req.payload_len as usize;
        let buf = &mut lease.bytes_mut()[..len];
        let payload = tokio::time::timeout(
            self.frame_deadline(),
            frame::read_payload_async(self.rd, buf),
        );
        if let Err(e) = payload.await.unwrap_or(Err(FrameError::Stalled)) {
            return Err(left_inside(req.id, req.payload_len, e));
        }
        if self.shared.life.workers_stopped() {
            // The drain deadline passed while the payload arrived: no worker will take it.
            drop(lease);
            shutting_down(permit, req.id);
            return Ok(());
        }
        let job = self.job(req, pool, JobSlot::own(lease), permit);
        pool.queue.push(job, false);
        Ok(())
    }

    /// Queues the job now, for an idle worker to start on, and reads the
    /// payload as it comes; the connection holds the slot until the upload
    /// ends (or is dropped with it: then the job hears the payload never will).
    async fn stream(
        &mut self,
        req: Header,
        pool: &Pool,
        lease: SlotLease,
        permit: Permit,
    ) -> Result<(), Ended> {
        let (id, len) = (req.id, req.payload_len);
        let (mut uploading, slot) = Uploading::start(lease, len);
        let job = self.job(req, pool, slot, permit);
        pool.queue.push(job, false);
        let payload = tokio::time::timeout(self.frame_deadline(), uploading.read_from(self.rd));
        let read = payload.await.unwrap_or(Err(FrameError::Stalled));
        uploading.finish(read.is_ok());
        read.map_err(|e| left_inside(id, len, e))
    }

    fn job(&self, req: Header, pool: &Pool, lease: JobSlot, reply: Permit) -> QueuedJob {
        let job_id = self.shared.next_job_id();
        QueuedJob {
            ticket: self.tickets.issue(req.id, pool.index, job_id),
            job_id,
            req_id: req.id,
            op: req.op,
            args: req.args,
            lease,
            input_len: req.payload_len,
            reply,
            attempts: 0,
            received: Instant::now(),
            metrics: Rc::clone(&pool.metrics),
        }
    }
}

fn left_inside(id: u64, len: u64, e: FrameError) -> Ended {
    tracing::info!(id, "client left inside a {len}-byte payload: {e}");
    Ended::Gone
}

fn error(kind: ErrorKind, message: String) -> Outcome {
    Outcome::Err(RemoteError::new(kind, message))
}

fn answer_err(permit: Permit, id: u64, kind: ErrorKind, message: String) {
    permit.answer(id, error(kind, message), Body::Inline(Vec::new()));
}

const SHUTTING_DOWN: &str = "the dispatcher is shutting down; retry later";

fn shutting_down(permit: Permit, id: u64) {
    answer_err(permit, id, ErrorKind::ShuttingDown, SHUTTING_DOWN.into());
}
