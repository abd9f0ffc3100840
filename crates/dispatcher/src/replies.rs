//! A connection's replies on their way out: the queue its writer empties,
//! and the in-flight allowance that bounds it. Every answer holds a
//! [`Permit`] of its connection until it is written (or the connection is
//! gone): a client that never reads cannot make the dispatcher queue
//! replies without bound. No channel, no semaphore: one small `Rc` per
//! connection, whose queue is allocated only once replies wait.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::rc::Rc;

use ipc_core::proto::Outcome;
use tokio::sync::Notify;

use crate::slots::Settled;

/// What a connection's writer sends back to its client.
#[derive(Debug)]
pub struct Reply {
    pub req_id: u64,
    pub outcome: Outcome,
    pub body: Body,
    /// The request's in-flight allowance, if it had one (a reply about the
    /// connection itself, id 0, has none).
    pub permit: Option<Permit>,
}

/// Where a reply's result bytes are.
#[derive(Debug)]
pub enum Body {
    /// Bytes `result` of the slot the lease holds (a job's answer).
    Slot {
        result: std::ops::Range<usize>,
        /// Held until the reply is written: then the slot is freed.
        lease: Settled,
    },
    /// Inline: an answer the dispatcher made itself (status, errors).
    Inline(Vec<u8>),
}

/// One connection's replies and in-flight count.
#[derive(Debug)]
pub struct Replies {
    queue: RefCell<VecDeque<Reply>>,
    /// Woken when a reply is queued.
    queued: Notify,
    in_flight: Cell<usize>,
    max_in_flight: usize,
    /// Woken when a permit is returned.
    returned: Notify,
    /// The writer is gone: replies are dropped as they come (freeing their slots).
    closed: Cell<bool>,
    /// The connection's requests are still being read (more may come).
    reading: Cell<bool>,
}

impl Replies {
    pub fn new(max_in_flight: usize) -> Rc<Self> {
        Rc::new(Replies {
            queue: RefCell::new(VecDeque::new()),
            queued: Notify::new(),
            in_flight: Cell::new(0),
            max_in_flight,
            returned: Notify::new(),
            closed: Cell::new(false),
            reading: Cell::new(true),
        })
    }

    /// A permit now, if the connection has one left.
    pub fn try_permit(self: &Rc<Self>) -> Option<Permit> {
        let n = self.in_flight.get();
        (n < self.max_in_flight).then(|| {
            self.in_flight.set(n + 1);
            Permit(Rc::clone(self))
        })
    }

    /// Waits for a permit.
    pub async fn permit(self: &Rc<Self>) -> Permit {
        loop {
            let returned = self.returned.notified();
            if let Some(p) = self.try_permit() {
                return p;
            }
            returned.await;
        }
    }

    /// Queues a reply for the writer (dropped at once if the writer is gone).
    pub fn send(&self, reply: Reply) {
        if self.closed.get() {
            return;
        }
        self.queue.borrow_mut().push_back(reply);
        self.queued.notify_one();
    }

    /// The next reply, if one waits.
    pub fn try_next(&self) -> Option<Reply> {
        self.queue.borrow_mut().pop_front()
    }

    /// Waits for the next reply; `None` once none can come any more (no
    /// request is read, none waits for its answer).
    pub async fn next(&self) -> Option<Reply> {
        loop {
            let queued = self.queued.notified();
            if let Some(r) = self.try_next() {
                return Some(r);
            }
            if !self.reading.get() && self.in_flight.get() == 0 {
                return None;
            }
            queued.await;
        }
    }

    /// No more requests will be read: the writer ends once the last answer
    /// is written.
    pub fn reading_done(&self) {
        self.reading.set(false);
        self.queued.notify_one();
    }

    /// The writer is gone: drops what waits and what comes later.
    pub fn close(&self) {
        self.closed.set(true);
        let dropped: Vec<Reply> = self.queue.borrow_mut().drain(..).collect();
        drop(dropped); // outside the borrow: dropping a permit touches `in_flight` only
    }
}

/// One request's place among its connection's in-flight requests,
/// returned when dropped. It is also the way back: a job answers through it.
#[derive(Debug)]
pub struct Permit(Rc<Replies>);

impl Permit {
    /// Sends the answer, which keeps this permit until it is written.
    pub fn answer(self, req_id: u64, outcome: Outcome, body: Body) {
        let replies = Rc::clone(&self.0);
        replies.send(Reply {
            req_id,
            outcome,
            body,
            permit: Some(self),
        });
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.0.in_flight.set(self.0.in_flight.get() - 1);
        self.0.returned.notify_one();
        // The writer may be waiting for the last answer to end.
        self.0.queued.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inline(permit: Option<Permit>) -> Reply {
        Reply {
            req_id: 1,
            outcome: Outcome::Ok,
            body: Body::Inline(vec![]),
            permit,
        }
    }

    #[test]
    fn permits_are_bounded_and_come_back_when_replies_are_written_or_dropped() {
        let r = Replies::new(2);
        let a = r.try_permit().expect("first");
        let b = r.try_permit().expect("second");
        assert!(r.try_permit().is_none(), "only two in flight");
        drop(a);
        let c = r.try_permit().expect("a returned permit is reused");
        r.send(inline(Some(b)));
        assert!(r.try_permit().is_none(), "a queued reply keeps its permit");
        drop(r.try_next().expect("queued"));
        assert!(r.try_permit().is_some(), "written: its permit is back");
        r.close();
        r.send(inline(Some(c)));
        assert!(r.try_next().is_none(), "nothing is queued once closed");
        assert_eq!(r.in_flight.get(), 0, "and its permit is back at once");
    }
}
