//! A worker session's decisions, apart from its I/O: which queued jobs go to
//! the worker with the one it runs, what its payload's progress means, and
//! what an answer, a death, a timeout or a stop does to the jobs it holds.
//! Pure but for its log lines (time is passed in), so every rule has a
//! table-driven test below;
//! the driver (`driver.rs`) does the reading, writing and waiting.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use ipc_core::proto::{ErrorKind, Outcome};

use crate::slots::News;

/// Jobs one worker may have been sent and not yet answered. More than one
/// only when no worker is idle, so a long job holds back few others.
pub const MAX_BATCH: usize = 8;
/// Bytes of job frames sent ahead to a busy worker, at most (well under a
/// pipe's capacity, so neither side can block writing while the other does).
pub const MAX_BATCH_BYTES: usize = 4096;

/// What the session needs to know of a job.
pub trait SessionJob {
    /// The job's number (what the worker's answer names).
    fn id(&self) -> u64;
    /// About how many bytes its frame takes in the job pipe.
    fn frame_size(&self) -> usize;
    /// Whether its payload is still arriving.
    fn arriving(&self) -> bool;
    /// Runs so far that ended with the worker dying.
    fn attempts(&mut self) -> &mut u8;
    /// Whether its client cancelled it.
    fn cancelled(&self) -> bool {
        false
    }
}

/// How a worker's service ended.
#[derive(Debug)]
pub enum End<J> {
    /// Asked to stop while idle: its stdin is closed and it exits by itself.
    Stop,
    /// It died, hung or broke protocol: its process group is killed. Its jobs
    /// are requeued, and their slots freed, only once it is dead, so no slot
    /// is reused while the worker could still write into it (a dead
    /// worker's jobs given up are answered before: the driver's
    /// `answer_first` keeps their slots until the reap).
    Kill {
        why: String,
        answer: Vec<(J, ErrorKind, String)>,
        requeue: Vec<J>,
        /// A hang, not a death: SIGTERM first, so the worker may log what it
        /// was doing, and SIGKILL after a grace period.
        term_first: bool,
    },
}

/// Whether a queued job may go to a busy worker behind what it runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ahead {
    /// Send it with the others, in the same write.
    Take,
    /// Put it back at the front of the queue and send nothing more now.
    PutBack,
}

/// What an answer from the worker means.
#[derive(Debug)]
pub enum Answered<J> {
    /// The running job is done: answer it.
    Job(J),
    /// An answer for a job the worker is not running: the worker must go.
    Unexpected,
    /// The worker says the running job crashed it (with what it said): it
    /// is dying; the job is retried or given up as on any death.
    Crashed(String),
    /// The answer breaks the protocol: the worker must go.
    Broke(String),
}

/// The jobs a worker holds and what it has been told.
#[derive(Debug)]
pub struct Session<J> {
    /// Jobs sent (or about to be) and not yet answered, oldest (the one
    /// running) first; the first `written` of them are in the pipe.
    sent: VecDeque<J>,
    written: usize,
    /// Since when the running job counts against the job timeout.
    head_since: Instant,
    /// While the running job's payload is still arriving (from the moment
    /// the job is taken until the worker has been told all of it is in, or
    /// that it never will be): how many bytes the worker was told are in.
    /// Nothing is sent ahead meanwhile, and no timeout runs (the
    /// connection's frame deadline bounds the upload); it starts once all is in.
    told: Option<u64>,
    /// Attempts per job: the first run plus retries after worker crashes.
    max_attempts: u8,
    /// The running job's `Grow` not answered yet: the bytes asked.
    grow: Option<u64>,
    /// Bytes of result area given to the running job so far.
    rooms_held: u64,
    /// The largest result a job may have (the pool's `max_result`).
    max_result: u64,
}

/// The result areas one job may hold, as a multiple of its pool's
/// `max_result`: enough for a result grown by doubling (less than twice the
/// last area) and one more area of up to the limit (PROTOCOL §13.14). Each
/// area stays the worker's until the job ends: a worker asking again and
/// again would otherwise hold the arena other jobs need.
pub const ROOMS_PER_RESULT: u64 = 3;

/// What to answer a worker's unanswered `Grow`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ask {
    /// Give it an area of this many bytes, once the arena has room.
    Wait(u64),
    /// Refuse: more than the pool's limit.
    OverLimit { len: u64, limit: u64 },
    /// Refuse: the job's areas would hold `held` bytes, more than
    /// [`ROOMS_PER_RESULT`] times the limit.
    TooMuchHeld { held: u64, limit: u64 },
}

impl<J: SessionJob> Session<J> {
    pub fn new(max_attempts: u8, now: Instant) -> Self {
        Session {
            sent: VecDeque::new(),
            written: 0,
            head_since: now,
            told: None,
            max_attempts,
            grow: None,
            rooms_held: 0,
            max_result: u64::MAX,
        }
    }

    /// Limits the results of the jobs to `max_result` bytes (the pool's).
    pub fn limit_results(mut self, max_result: u64) -> Self {
        self.max_result = max_result;
        self
    }

    /// Whether the worker holds no job (it waits for one).
    pub fn is_idle(&self) -> bool {
        self.sent.is_empty()
    }

    /// The running job, if any.
    pub fn head(&self) -> Option<&J> {
        self.sent.front()
    }

    /// Jobs held.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.sent.len()
    }

    /// Whether the running job's payload is still arriving.
    pub fn arriving(&self) -> bool {
        self.told.is_some()
    }

    /// Gives an idle worker its job.
    pub fn start(&mut self, job: J, now: Instant) {
        debug_assert!(self.sent.is_empty());
        self.head_since = now;
        self.told = job.arriving().then_some(0);
        self.sent.push_back(job);
    }

    /// Whether to look for jobs to send ahead: only while no other worker
    /// is idle, below the batch limit, and never behind or ahead of a job
    /// whose payload is arriving (the worker reads that payload's news from
    /// its pipe until it is all in).
    pub fn may_send_ahead(&self, idle_workers: usize) -> bool {
        self.sent.len() < MAX_BATCH && idle_workers == 0 && self.told.is_none()
    }

    /// Whether `job` goes ahead, with `ahead` bytes of frames already
    /// chosen in this round (small jobs only, none still uploading).
    pub fn ahead(ahead: usize, job: &J) -> Ahead {
        if ahead + job.frame_size() > MAX_BATCH_BYTES || job.arriving() {
            Ahead::PutBack
        } else {
            Ahead::Take
        }
    }

    /// Adds a job sent ahead.
    pub fn push_ahead(&mut self, job: J) {
        self.sent.push_back(job);
    }

    /// The jobs chosen but not yet written to the pipe.
    pub fn unwritten(&self) -> impl Iterator<Item = &J> {
        self.sent.range(self.written..)
    }

    /// Notes that every job held is in the pipe; `complete` tells whether
    /// the running job's payload was all in when its frame was written
    /// (then there is no news to give).
    pub fn written(&mut self, complete: bool) {
        self.written = self.sent.len();
        if complete {
            self.told = None;
        }
    }

    /// Bytes of the arriving payload the worker was told of.
    pub fn told(&self) -> Option<u64> {
        self.told
    }

    /// Notes that the worker was given `news` of its payload.
    pub fn tell(&mut self, news: News, now: Instant) {
        match news {
            News::More { ready, last: false } => self.told = Some(ready),
            News::More { last: true, .. } | News::Abort => {
                self.told = None;
                self.head_since = now;
            }
        }
    }

    /// When the running job times out, if its timeout runs (not while its
    /// payload arrives, nor when there is none).
    pub fn deadline(&self, timeout: Duration) -> Option<Instant> {
        (!self.sent.is_empty() && self.told.is_none()).then(|| self.head_since + timeout)
    }

    /// The worker answered job `job_id` with `outcome`.
    pub fn answered(&mut self, job_id: u64, outcome: &Outcome, now: Instant) -> Answered<J> {
        let ok = matches!(outcome, Outcome::Ok);
        if self.told.is_some() && ok {
            // Success before the payload was all in: the result would be
            // read from a slot the connection may still be writing.
            return Answered::Broke(format!(
                "job {job_id} succeeded before its payload had arrived"
            ));
        }
        if self.sent.front().map(SessionJob::id) != Some(job_id) || self.written == 0 {
            return Answered::Unexpected;
        }
        if let Outcome::Err(e) = outcome {
            if e.kind == ErrorKind::WorkerCrashed {
                // The worker says the job crashed it (an operation panicked):
                // that is its death, with its last words.
                return Answered::Crashed(e.message.clone());
            }
        }
        // An error may come early (bad arguments); the news still sent for
        // that job is ignored by the worker. A room it asked for is no
        // longer wanted.
        self.told = None;
        self.grow = None;
        self.rooms_held = 0;
        self.written -= 1;
        self.head_since = now;
        Answered::Job(self.sent.pop_front().expect("checked above"))
    }

    /// The worker asks for `len` bytes of result area for job `job_id`:
    /// accepted only for the running job, with none asked already.
    pub fn asked(&mut self, job_id: u64, len: u64) -> Result<(), String> {
        let running = self
            .sent
            .front()
            .map(SessionJob::id)
            .filter(|_| self.written > 0);
        if running != Some(job_id) {
            return Err(format!(
                "Grow for job {job_id}, which is not the running job"
            ));
        }
        if self.grow.is_some() {
            return Err(format!(
                "a second Grow for job {job_id} before the first was answered"
            ));
        }
        if len == 0 {
            return Err(format!("a Grow of 0 bytes for job {job_id}"));
        }
        self.grow = Some(len);
        Ok(())
    }

    /// What to answer the running job's unanswered `Grow`, if there is one.
    pub fn pending_ask(&self) -> Option<Ask> {
        let len = self.grow?;
        let (limit, held) = (self.max_result, self.rooms_held.saturating_add(len));
        Some(if len > limit {
            Ask::OverLimit { len, limit }
        } else if held > limit.saturating_mul(ROOMS_PER_RESULT) {
            Ask::TooMuchHeld { held, limit }
        } else {
            Ask::Wait(len)
        })
    }

    /// The `Grow` is answered now, with an area of `given` bytes (0 for a
    /// refusal): the running job (to hold its area).
    pub fn grow_answered(&mut self, given: u64) -> Option<&mut J> {
        self.grow.take()?;
        self.rooms_held = self.rooms_held.saturating_add(given);
        self.sent.front_mut()
    }

    /// The running job ran past its timeout.
    pub fn timed_out(mut self, timeout: Duration) -> End<J> {
        let head = self.sent.pop_front();
        let msg =
            format!("the job ran longer than {timeout:?}; its worker was killed and replaced");
        End::Kill {
            why: "job timeout".into(),
            answer: head
                .map(|h| (h, ErrorKind::Timeout, msg))
                .into_iter()
                .collect(),
            requeue: self.sent.into(),
            term_first: true,
        }
    }

    /// The running job was cancelled by its client (`message`, for it): the
    /// worker is killed as for a timeout (SIGTERM, then SIGKILL), the job
    /// answered `Cancelled` and not retried; the others had not started and
    /// go back to the queue without an attempt. `None` when the running job
    /// is not cancelled, or not yet in the pipe.
    pub fn cancelled(&mut self, message: impl FnOnce(&J) -> String) -> Option<End<J>> {
        let head = self
            .sent
            .front()
            .filter(|h| h.cancelled() && self.written > 0)?;
        let message = message(head);
        let head = self.sent.pop_front().expect("checked above");
        Some(End::Kill {
            why: "job cancelled by its client".into(),
            answer: vec![(head, ErrorKind::Cancelled, message)],
            requeue: std::mem::take(&mut self.sent).into(),
            term_first: true,
        })
    }

    /// Shutdown's drain deadline passed while the worker held jobs.
    pub fn stopped(self) -> End<J> {
        let msg =
            "the dispatcher is shutting down and the job did not finish within the drain deadline";
        End::Kill {
            why: "stopped during a job".into(),
            answer: self
                .sent
                .into_iter()
                .map(|j| (j, ErrorKind::ShuttingDown, msg.to_owned()))
                .collect(),
            requeue: vec![],
            term_first: false,
        }
    }

    /// The worker died: the running job counts an attempt and is retried
    /// while it has attempts left (then answered `worker crashed`); the
    /// others had not started and go back to the queue without one.
    pub fn died(self, why: String, op: impl FnOnce(&J) -> String) -> End<J> {
        self.ended(why, None, op)
    }

    /// The worker said the running job crashed it (`said`): its death, and
    /// a job given up carries those last words.
    pub fn crashed(self, said: String, op: impl FnOnce(&J) -> String) -> End<J> {
        let why = format!("it reported a crash: {said}");
        self.ended(why, Some(&said), op)
    }

    fn ended(mut self, why: String, said: Option<&str>, op: impl FnOnce(&J) -> String) -> End<J> {
        let Some(mut head) = self.sent.pop_front() else {
            return End::Kill {
                why,
                answer: vec![],
                requeue: vec![],
                term_first: false,
            };
        };
        *head.attempts() += 1;
        let attempts = *head.attempts();
        let op = op(&head);
        let mut requeue = Vec::with_capacity(self.sent.len() + 1);
        let mut answer = Vec::new();
        if attempts < self.max_attempts {
            let left = self.max_attempts - attempts;
            tracing::warn!(job = head.id(), %op, "worker died during the job; retrying it ({left} attempt(s) left)");
            requeue.push(head);
        } else {
            let mut msg = format!(
                "the worker running {op:?} died on each of {attempts} attempts; the job was given up"
            );
            if let Some(said) = said {
                msg.push_str(&format!("; the worker said: {said}"));
            }
            answer.push((head, ErrorKind::WorkerCrashed, msg));
        }
        requeue.extend(self.sent);
        End::Kill {
            why,
            answer,
            requeue,
            term_first: false,
        }
    }

    /// The worker died of the running job going past its pool's memory
    /// limit: that job is answered `out of memory` (`message`) and not
    /// retried, whatever its attempts (it would fail again); the others
    /// had not started and go back to the queue without an attempt.
    pub fn out_of_memory(mut self, why: String, message: String) -> End<J> {
        let answer = self
            .sent
            .pop_front()
            .map(|head| (head, ErrorKind::OutOfMemory, message))
            .into_iter()
            .collect();
        End::Kill {
            why,
            answer,
            requeue: self.sent.into(),
            term_first: false,
        }
    }

    /// The worker broke protocol: its running job gets an internal error,
    /// the rest are requeued.
    pub fn broke(mut self, why: String) -> End<J> {
        let answer = self
            .sent
            .pop_front()
            .map(|head| {
                let msg = "the worker broke protocol; it was replaced".to_owned();
                (head, ErrorKind::Internal, msg)
            })
            .into_iter()
            .collect();
        End::Kill {
            why: format!("protocol violation: {why}"),
            answer,
            requeue: self.sent.into(),
            term_first: false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ipc_core::proto::RemoteError;

    #[derive(Debug, Clone, PartialEq, Eq)]
    struct J {
        id: u64,
        size: usize,
        arriving: bool,
        attempts: u8,
        cancelled: bool,
    }

    impl SessionJob for J {
        fn id(&self) -> u64 {
            self.id
        }
        fn frame_size(&self) -> usize {
            self.size
        }
        fn arriving(&self) -> bool {
            self.arriving
        }
        fn attempts(&mut self) -> &mut u8 {
            &mut self.attempts
        }
        fn cancelled(&self) -> bool {
            self.cancelled
        }
    }

    fn job(id: u64) -> J {
        J {
            id,
            size: 100,
            arriving: false,
            attempts: 0,
            cancelled: false,
        }
    }

    fn streamed(id: u64) -> J {
        J {
            arriving: true,
            ..job(id)
        }
    }

    fn ids(js: &[J]) -> Vec<u64> {
        js.iter().map(|j| j.id).collect()
    }

    fn kill(end: End<J>) -> (String, Vec<(u64, ErrorKind)>, Vec<u64>) {
        match end {
            End::Kill {
                why,
                answer,
                requeue,
                ..
            } => (
                why,
                answer.into_iter().map(|(j, k, _)| (j.id, k)).collect(),
                ids(&requeue),
            ),
            End::Stop => panic!("not a kill"),
        }
    }

    /// A session holding `held` jobs (the first from `start`), all written.
    fn holding(held: &[J], now: Instant) -> Session<J> {
        let mut s = Session::new(2, now);
        let mut it = held.iter().cloned();
        if let Some(first) = it.next() {
            s.start(first, now);
            it.for_each(|j| s.push_ahead(j));
            s.written(false);
        }
        s
    }

    #[test]
    fn batching_table() {
        let t0 = Instant::now();
        // (jobs held, the first's payload arriving, idle workers elsewhere) -> may send ahead
        let rows: &[(usize, bool, usize, bool)] = &[
            (1, false, 0, true),  // busy, nobody idle: batch
            (1, false, 1, false), // another worker is idle: it takes the job
            (7, false, 0, true),
            (8, false, 0, false), // at the batch limit
            (1, true, 0, false),  // a payload arrives: nothing behind it
        ];
        for &(held, arriving, idle, expect) in rows {
            let mut jobs: Vec<J> = (1..=held as u64).map(job).collect();
            jobs[0].arriving = arriving;
            let s = holding(&jobs, t0);
            assert_eq!(
                s.may_send_ahead(idle),
                expect,
                "held {held}, arriving {arriving}, idle {idle}"
            );
        }
        // (bytes already chosen, job size, job arriving) -> verdict
        let rows: &[(usize, usize, bool, Ahead)] = &[
            (0, 100, false, Ahead::Take),
            (3996, 100, false, Ahead::Take), // exactly fills the budget
            (3997, 100, false, Ahead::PutBack),
            (0, 5000, false, Ahead::PutBack), // a large frame is never sent ahead
            (0, 100, true, Ahead::PutBack),   // nor a job whose payload arrives
        ];
        for &(ahead, size, arriving, expect) in rows {
            let j = J {
                size,
                arriving,
                ..job(9)
            };
            assert_eq!(
                Session::ahead(ahead, &j),
                expect,
                "ahead {ahead}, size {size}, arriving {arriving}"
            );
        }
    }

    #[test]
    fn streaming_table() {
        let t0 = Instant::now();
        let t1 = t0 + Duration::from_secs(1);
        let timeout = Duration::from_secs(5);
        // (news given, told after, deadline after)
        let rows: &[(&[News], Option<u64>, Option<Instant>)] = &[
            (&[], Some(0), None), // no timeout while the payload arrives
            (
                &[News::More {
                    ready: 10,
                    last: false,
                }],
                Some(10),
                None,
            ),
            (
                &[
                    News::More {
                        ready: 10,
                        last: false,
                    },
                    News::More {
                        ready: 20,
                        last: true,
                    },
                ],
                None,
                Some(t1 + timeout), // the timeout starts once all is in
            ),
            (&[News::Abort], None, Some(t1 + timeout)),
        ];
        for (news, told, deadline) in rows {
            let mut s = Session::new(2, t0);
            s.start(streamed(1), t0);
            s.written(false);
            for n in news.iter() {
                s.tell(*n, t1);
            }
            assert_eq!(s.told(), *told, "{news:?}");
            assert_eq!(s.deadline(timeout), *deadline, "{news:?}");
        }
        // A payload all in when the job frame is written: no news, timeout runs.
        let mut s = Session::new(2, t0);
        s.start(streamed(1), t0);
        s.written(true);
        assert_eq!((s.told(), s.deadline(timeout)), (None, Some(t0 + timeout)));
    }

    #[test]
    fn answer_table() {
        let t0 = Instant::now();
        let t1 = t0 + Duration::from_millis(7);
        let ok = Outcome::Ok;
        let err = Outcome::Err(RemoteError::new(ErrorKind::InvalidInput, "bad"));
        let crash = Outcome::Err(RemoteError::new(ErrorKind::WorkerCrashed, "panicked"));
        // (head arriving, answered id, outcome) -> answered job id, crashed, or broke
        #[derive(Debug, PartialEq)]
        enum Want {
            Job(u64),
            Crashed,
            Broke,
        }
        let rows: &[(bool, u64, &Outcome, Want)] = &[
            (false, 1, &ok, Want::Job(1)),
            (false, 1, &err, Want::Job(1)),
            (false, 2, &ok, Want::Broke),      // not the running job
            (true, 1, &ok, Want::Broke),       // success before the payload was in
            (true, 1, &err, Want::Job(1)),     // an early error is fine
            (false, 1, &crash, Want::Crashed), // the worker says the job killed it
            (true, 1, &crash, Want::Crashed),
            (false, 2, &crash, Want::Broke), // ... but not of a job it is not running
        ];
        for (arriving, id, outcome, want) in rows {
            let mut first = job(1);
            first.arriving = *arriving;
            let mut s = holding(&[first, job(2)], t0);
            let got = match s.answered(*id, outcome, t1) {
                Answered::Job(j) => {
                    // The next job's timeout starts now; nothing arrives any more.
                    assert_eq!(s.deadline(Duration::ZERO), Some(t1));
                    assert_eq!((s.len(), s.told()), (1, None));
                    Want::Job(j.id)
                }
                Answered::Crashed(said) => {
                    assert_eq!(said, "panicked");
                    assert_eq!(s.len(), 2, "the job stays with the dying worker");
                    Want::Crashed
                }
                Answered::Broke(_) | Answered::Unexpected => Want::Broke,
            };
            assert_eq!(&got, want, "arriving {arriving}, id {id}, {outcome:?}");
        }
        // An answer for a job not yet written is a violation too.
        let mut s: Session<J> = Session::new(2, t0);
        s.start(job(1), t0);
        assert!(matches!(s.answered(1, &ok, t1), Answered::Unexpected));
    }

    #[test]
    fn death_and_retry_table() {
        let t0 = Instant::now();
        // (max attempts, head's attempts before, held) -> answered, requeued
        type Row = (
            u8,
            u8,
            &'static [u64],
            &'static [(u64, ErrorKind)],
            &'static [u64],
        );
        let rows: &[Row] = &[
            (2, 0, &[1, 2, 3], &[], &[1, 2, 3]), // retried once, first in line
            (2, 1, &[1, 2], &[(1, ErrorKind::WorkerCrashed)], &[2]),
            (1, 0, &[1], &[(1, ErrorKind::WorkerCrashed)], &[]), // never retried
            (3, 1, &[1], &[], &[1]),
            (2, 0, &[], &[], &[]), // idle: nothing to answer
        ];
        for &(max, before, held, answered, requeued) in rows {
            let mut jobs: Vec<J> = held.iter().map(|&i| job(i)).collect();
            if let Some(h) = jobs.first_mut() {
                h.attempts = before;
            }
            let mut s = holding(&jobs, t0);
            s.max_attempts = max;
            let (why, a, r) = kill(s.died("result pipe closed".into(), |j| j.id.to_string()));
            assert_eq!(why, "result pipe closed");
            assert_eq!(
                (a.as_slice(), r.as_slice()),
                (answered, requeued),
                "{max} {before} {held:?}"
            );
        }
    }

    #[test]
    fn a_reported_crash_is_a_death_whose_given_up_job_carries_the_last_words() {
        let t0 = Instant::now();
        let op = |j: &J| j.id.to_string();
        // Attempts left: retried, like any death.
        let (_, a, r) = kill(holding(&[job(1), job(2)], t0).crashed("boom".into(), op));
        assert_eq!((a, r), (vec![], vec![1, 2]));
        // The last attempt: given up, with what the worker said.
        let mut last = job(1);
        last.attempts = 1;
        match holding(&[last], t0).crashed("boom".into(), op) {
            End::Kill { answer, .. } => {
                let (_, kind, msg) = &answer[0];
                assert_eq!(*kind, ErrorKind::WorkerCrashed);
                assert!(msg.ends_with("; the worker said: boom"), "{msg}");
            }
            End::Stop => panic!("a kill"),
        }
    }

    #[test]
    fn a_job_out_of_memory_is_answered_at_once_and_the_rest_requeued() {
        let t0 = Instant::now();
        // Never retried, even with attempts left.
        let held = [job(1), job(2), job(3)];
        let (why, a, r) = kill(holding(&held, t0).out_of_memory("oom".into(), "m".into()));
        assert_eq!(why, "oom");
        assert_eq!((a, r), (vec![(1, ErrorKind::OutOfMemory)], vec![2, 3]));
    }

    #[test]
    fn timeout_stop_and_violation_table() {
        let t0 = Instant::now();
        let held = [job(1), job(2), job(3)];
        let (why, a, r) = kill(holding(&held, t0).timed_out(Duration::from_secs(1)));
        assert_eq!(why, "job timeout");
        assert_eq!((a, r), (vec![(1, ErrorKind::Timeout)], vec![2, 3]));
        let (_, a, r) = kill(holding(&held, t0).stopped());
        let every: Vec<_> = [1, 2, 3].map(|i| (i, ErrorKind::ShuttingDown)).into();
        assert_eq!((a, r), (every, vec![]));
        let (why, a, r) = kill(holding(&held, t0).broke("bad frame".into()));
        assert!(why.contains("bad frame"));
        assert_eq!((a, r), (vec![(1, ErrorKind::Internal)], vec![2, 3]));
        // Nothing held: no deadline.
        assert_eq!(holding(&[], t0).deadline(Duration::ZERO), None);
    }

    #[test]
    fn grow_table() {
        let t0 = Instant::now();
        let mut s = holding(&[job(1), job(2)], t0);
        // Only the running job, once at a time, never 0 bytes.
        assert!(s.asked(2, 10).unwrap_err().contains("not the running job"));
        assert!(s.asked(1, 0).unwrap_err().contains("0 bytes"));
        assert_eq!(s.pending_ask(), None);
        s.asked(1, 10).unwrap();
        assert!(s.asked(1, 20).unwrap_err().contains("second Grow"));
        assert_eq!(s.pending_ask(), Some(Ask::Wait(10)));
        assert_eq!(s.grow_answered(16).map(|j| j.id), Some(1));
        assert_eq!(
            (s.pending_ask(), s.grow_answered(0).map(|j| j.id)),
            (None, None)
        );
        // Asked again, then the job is answered: the ask is forgotten.
        s.asked(1, 30).unwrap();
        assert!(matches!(s.answered(1, &Outcome::Ok, t0), Answered::Job(_)));
        assert_eq!(s.pending_ask(), None);
        assert!(s.asked(1, 5).is_err(), "job 1 is done");
        s.asked(2, 5).unwrap();
        // Nothing held: nothing to grow.
        assert!(holding(&[], t0).asked(1, 5).is_err());
    }

    #[test]
    fn room_limits_table() {
        let t0 = Instant::now();
        let mut s = holding(&[job(1), job(2)], t0).limit_results(100);
        // Over the limit: refused, and the job may ask again for less.
        s.asked(1, 101).unwrap();
        let over = Ask::OverLimit {
            len: 101,
            limit: 100,
        };
        assert_eq!(s.pending_ask(), Some(over));
        s.grow_answered(0);
        // Areas given add up, to three times the limit.
        for (ask, given) in [(64, 64), (100, 128), (90, 96)] {
            s.asked(1, ask).unwrap();
            assert_eq!(s.pending_ask(), Some(Ask::Wait(ask)));
            s.grow_answered(given);
        }
        s.asked(1, 13).unwrap();
        let held = Ask::TooMuchHeld {
            held: 301,
            limit: 100,
        };
        assert_eq!(s.pending_ask(), Some(held), "288 held, 13 more");
        s.grow_answered(0);
        s.asked(1, 12).unwrap();
        assert_eq!(s.pending_ask(), Some(Ask::Wait(12)), "300 is the most");
        s.grow_answered(12);
        // The next job starts with none held.
        assert!(matches!(s.answered(1, &Outcome::Ok, t0), Answered::Job(_)));
        s.asked(2, 100).unwrap();
        assert_eq!(s.pending_ask(), Some(Ask::Wait(100)));
    }

    #[test]
    fn a_cancelled_running_job_ends_its_worker_and_is_not_retried() {
        let t0 = Instant::now();
        let cancelled = |id| J {
            cancelled: true,
            ..job(id)
        };
        let mut ahead = holding(&[job(1), cancelled(2)], t0);
        assert!(
            ahead.cancelled(|_| String::new()).is_none(),
            "sent ahead: waits to be the running job"
        );
        assert_eq!(ahead.len(), 2);
        let mut unwritten = Session::new(2, t0);
        unwritten.start(cancelled(1), t0);
        assert!(
            unwritten.cancelled(|_| String::new()).is_none(),
            "not in the pipe yet"
        );
        let mut s = holding(&[cancelled(1), job(2), job(3)], t0);
        let end = s.cancelled(|j| format!("job {}", j.id)).expect("a kill");
        assert!(
            matches!(end, End::Kill { term_first: true, ref answer, .. } if answer[0].2 == "job 1")
        );
        let (why, answer, requeue) = kill(end);
        assert!(why.contains("cancelled"), "{why}");
        assert_eq!(answer, [(1, ErrorKind::Cancelled)]);
        assert_eq!(requeue, [2, 3], "the others go back, unstarted");
        assert!(s.is_idle());
    }
}
