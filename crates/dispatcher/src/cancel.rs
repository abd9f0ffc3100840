//! Cancelling a request (`cancel ID`, PROTOCOL section 8): each job carries
//! a [`Ticket`], and its connection's [`Tickets`] finds it by request id.
//! Only the connection that sent a request holds its ticket, so only it can
//! cancel it.
//!
//! A cancel acts at once: a queued job is taken off its pool's queue and
//! answered `Cancelled`; a job a worker holds is marked, and the worker's
//! driver, woken through [`Shared::cancels`], kills and replaces the worker
//! (or answers the job when it finds it between a death and a requeue).
//! The cancel itself is answered only once the request is: its
//! [`CancelReply`] waits on the ticket and is queued right after the
//! request's own answer, so a client reads the request's answer first, and
//! nothing about that request after the cancel's.

use std::cell::{Cell, RefCell};
use std::rc::{Rc, Weak};

use ipc_core::proto::{self, ErrorKind, Outcome};

use crate::replies::{Body, Permit};
use crate::shared::Shared;

/// A job's cancellation state, shared by the job and its connection.
#[derive(Debug)]
pub struct Ticket {
    /// The id (`Pool::index`) of the pool whose queue the job goes on.
    pool: usize,
    job_id: u64,
    /// The id of the cancel that cancelled it, once one did.
    by: Cell<Option<u64>>,
    /// Once the job is answered: whether with `Cancelled`.
    answered: Cell<Option<bool>>,
    /// Cancels answered after this job is.
    waiting: RefCell<Vec<Rc<CancelReply>>>,
}

impl Ticket {
    /// Whether a cancel asked for the job to end.
    pub fn cancelled(&self) -> bool {
        self.by.get().is_some()
    }

    /// What the cancelled job is answered.
    pub fn message(&self) -> String {
        match self.by.get() {
            Some(by) => format!("cancelled by the client (request {by})"),
            None => "cancelled by the client".to_owned(),
        }
    }

    /// The job is being answered `outcome`: returns the cancels that
    /// waited for it, told whether it was cancelled; drop them once the
    /// job's answer is queued, and each queues its own (`cancelled` or
    /// `not found`) after it.
    #[must_use = "dropped after the job's answer is queued, they answer the cancels"]
    pub fn answers_cancels(&self, outcome: &Outcome) -> Vec<Rc<CancelReply>> {
        let cancelled = matches!(outcome, Outcome::Err(e) if e.kind == ErrorKind::Cancelled);
        self.answered.set(Some(cancelled));
        let waiting = std::mem::take(&mut *self.waiting.borrow_mut());
        for reply in &waiting {
            reply.cancelled.set(reply.cancelled.get() || cancelled);
        }
        waiting
    }
}

/// One connection's tickets, by request id (the connection's own ids).
#[derive(Debug, Default)]
pub struct Tickets {
    live: RefCell<Vec<(u64, Weak<Ticket>)>>,
}

impl Tickets {
    /// A ticket for job `job_id` of pool `pool`, the answer to request `req_id`.
    pub fn issue(&self, req_id: u64, pool: usize, job_id: u64) -> Rc<Ticket> {
        let ticket = Rc::new(Ticket {
            pool,
            job_id,
            by: Cell::new(None),
            answered: Cell::new(None),
            waiting: RefCell::new(Vec::new()),
        });
        let mut live = self.live.borrow_mut();
        if live.len() == live.capacity() {
            // Answered jobs' tickets are gone: forget them before growing
            // (amortised: at most as many live as in flight).
            live.retain(|(_, t)| t.strong_count() > 0);
        }
        live.push((req_id, Rc::downgrade(&ticket)));
        ticket
    }

    /// Cancels the pending requests of id `target` (a client should have one
    /// at most; all are cancelled) for cancel request `by`: a queued job is
    /// answered now, one a worker holds is marked and its driver woken.
    /// Returns the tickets found pending.
    pub fn cancel(&self, shared: &Shared, target: u64, by: u64) -> Vec<Rc<Ticket>> {
        let found: Vec<Rc<Ticket>> = self
            .live
            .borrow()
            .iter()
            .filter(|(id, _)| *id == target)
            .filter_map(|(_, t)| t.upgrade())
            .filter(|t| t.answered.get().is_none())
            .collect();
        for ticket in found.iter().filter(|t| !t.cancelled()) {
            ticket.by.set(Some(by));
            // The pool by its id (a reload may have retired it).
            let pool = shared.pools.get(ticket.pool);
            match pool.and_then(|p| p.queue.remove(ticket.job_id)) {
                Some(job) => {
                    tracing::debug!(job = ticket.job_id, "queued job cancelled");
                    let message = ticket.message();
                    crate::driver::answer_err(shared, job, ErrorKind::Cancelled, message);
                }
                // A driver holds it: running, sent ahead, or its worker dying.
                None => shared.cancels.notify_waiters(),
            }
        }
        found
    }
}

/// A cancel's answer, queued when dropped: once every ticket it waits on
/// is answered (at once when none is pending).
#[derive(Debug)]
pub struct CancelReply {
    id: u64,
    permit: Option<Permit>,
    /// Whether a request it waited on was answered `Cancelled`.
    cancelled: Cell<bool>,
}

impl Drop for CancelReply {
    fn drop(&mut self) {
        let Some(permit) = self.permit.take() else {
            return;
        };
        let result = if self.cancelled.get() {
            proto::CANCEL_DONE
        } else {
            proto::CANCEL_NOT_FOUND
        };
        permit.answer(self.id, Outcome::Ok, Body::Inline(result.to_vec()));
    }
}

/// Answers cancel request `id` through `permit` once the requests it
/// `found` pending are answered: `cancelled` if one was answered
/// `Cancelled`, else `not found`.
pub fn answer(found: Vec<Rc<Ticket>>, id: u64, permit: Permit) {
    let reply = Rc::new(CancelReply {
        id,
        permit: Some(permit),
        cancelled: Cell::new(false),
    });
    for ticket in found {
        match ticket.answered.get() {
            Some(cancelled) => reply.cancelled.set(reply.cancelled.get() || cancelled),
            None => ticket.waiting.borrow_mut().push(Rc::clone(&reply)),
        }
    }
}

/// The target of a `cancel` request: its one argument, a request id in
/// decimal.
pub fn target(args: &[std::borrow::Cow<'_, str>]) -> Result<u64, String> {
    match args {
        [id] => id.parse().map_err(|_| {
            format!("cancel: {id:?} is not a request id (a decimal number from 0 to 2^64-1)")
        }),
        _ => Err(format!(
            "cancel takes one argument, the id of an earlier request on this connection; got {}",
            args.len()
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::replies::Replies;

    fn ok_of(r: &crate::replies::Reply) -> (u64, Vec<u8>) {
        match (&r.outcome, &r.body) {
            (Outcome::Ok, Body::Inline(b)) => (r.req_id, b.clone()),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_cancel_is_answered_after_the_request_it_waits_on() {
        let replies = Replies::new(8);
        let tickets = Tickets::default();
        let t = tickets.issue(4, 0, 1);
        t.by.set(Some(5));
        answer(vec![Rc::clone(&t)], 5, replies.try_permit().unwrap());
        assert!(replies.try_next().is_none(), "waits for request 4");
        // Request 4's answer is queued first, then the cancel's.
        let err = Outcome::Err(ipc_core::proto::RemoteError::new(ErrorKind::Cancelled, "x"));
        drop(t.answers_cancels(&err));
        assert_eq!(
            ok_of(&replies.try_next().unwrap()),
            (5, b"cancelled\n".to_vec())
        );
    }

    #[test]
    fn a_request_answered_otherwise_or_not_pending_is_not_found() {
        let replies = Replies::new(8);
        let tickets = Tickets::default();
        let t = tickets.issue(4, 0, 1);
        answer(vec![Rc::clone(&t)], 5, replies.try_permit().unwrap());
        drop(t.answers_cancels(&Outcome::Ok));
        assert_eq!(
            ok_of(&replies.try_next().unwrap()),
            (5, b"not found\n".to_vec())
        );
        answer(vec![], 6, replies.try_permit().unwrap());
        assert_eq!(
            ok_of(&replies.try_next().unwrap()),
            (6, b"not found\n".to_vec())
        );
        // A ticket dropped unanswered answers its cancels too.
        let t = tickets.issue(7, 0, 2);
        answer(vec![Rc::clone(&t)], 8, replies.try_permit().unwrap());
        drop(t);
        assert_eq!(
            ok_of(&replies.try_next().unwrap()),
            (8, b"not found\n".to_vec())
        );
    }

    #[test]
    fn answered_tickets_are_forgotten() {
        let tickets = Tickets::default();
        for i in 0..1000 {
            drop(tickets.issue(i, 0, i));
        }
        assert!(
            tickets.live.borrow().len() <= 64,
            "{}",
            tickets.live.borrow().len()
        );
    }

    #[test]
    fn the_target_is_one_decimal_id() {
        let args = |a: &[&'static str]| a.iter().map(|s| (*s).into()).collect::<Vec<_>>();
        assert_eq!(target(&args(&["42"])), Ok(42));
        assert!(target(&args(&[])).is_err());
        assert!(target(&args(&["1", "2"])).is_err());
        assert!(target(&args(&["-1"])).is_err());
        assert!(target(&args(&["x"])).is_err());
    }
}
