//! The slot pool: the segment's [`Arena`] (segment + allocator), the caps
//! on what one connection and one peer may hold, and the leases through
//! which everything else reaches a slot's bytes.
//!
//! Ownership is in the types: a [`SlotLease`] holds one slot and gives its
//! bytes only as `bytes(&self)` / `bytes_mut(&mut self)`. A job whose payload
//! still arrives while a worker already reads it ([`JobSlot::Streamed`]) is
//! shared through [`Streamed`]: the connection owns the lease while it
//! uploads ([`Uploading`], writing only past what it has announced) and puts
//! it back when the upload ends, however it ends; the job side needs only
//! the slot's [`Region`] to send, and takes the lease back for its reply
//! ([`JobSlot::settle`]) once the upload is over. No `RefCell` borrow is
//! held across an `.await`.

use std::cell::{Cell, RefCell};
use std::ops::Range;
use std::rc::Rc;

use ipc_core::alloc::AllocError;
use ipc_core::frame::FrameError;
use ipc_core::status::SegmentStatus;
use ipc_core::{Arena, Region, Segment, Slot, SlotAllocator};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::sync::Notify;

use crate::admission::{Holder, PeerHoldings, SlotLimits, Wait};

/// Room kept after every payload for small results (digests, counts), so an
/// operation never has to overwrite its input to answer.
pub const RESULT_RESERVE: u64 = 4096;

/// How long a worker's ask for room past its slot waits for the arena.
pub const ROOM_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// Why a result gets no room.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoRoom {
    /// Shutdown has begun.
    Closed,
    /// None came free within [`ROOM_WAIT`] (within the peer's share and
    /// outside the reserve for small requests).
    Busy,
}

/// The segment's slots and who holds them.
#[derive(Debug)]
pub struct SlotPool {
    arena: Arena,
    /// Caps on the slot bytes a connection and a peer hold.
    pub limits: SlotLimits,
    /// Slot bytes held per peer.
    peer_held: PeerHoldings,
    /// Woken whenever a slot is released (or the pool closes).
    freed: Notify,
    /// Set once shutdown begins: no more leases.
    closed: Cell<bool>,
}

impl SlotPool {
    /// The pool of a segment this process created, with caps for requests
    /// up to `max_payload` bytes.
    pub fn new(segment: Segment, max_payload: u64, conn_pct: u64, peer_pct: u64) -> Rc<Self> {
        let arena_len = segment.arena_len() as u64;
        let limits = SlotLimits::new(
            arena_len,
            SlotAllocator::slot_len(max_payload + RESULT_RESERVE),
            conn_pct,
            peer_pct,
        );
        Rc::new(SlotPool {
            arena: Arena::new(segment).expect("the dispatcher created its segment"),
            limits,
            peer_held: PeerHoldings::default(),
            freed: Notify::new(),
            closed: Cell::new(false),
        })
    }

    /// The segment (name, header, populating).
    pub fn segment(&self) -> &Segment {
        self.arena.segment()
    }

    /// Slots on loan: every accepted job holds one until its reply is written
    /// (a dead worker's job: until that worker is reaped, if later).
    pub fn in_use(&self) -> usize {
        self.arena.in_use()
    }

    /// The segment half of the status report (`max_payload` left to the caller).
    pub fn describe(&self, attached_here: usize) -> SegmentStatus {
        self.arena.describe(attached_here)
    }

    /// Refuses leases from now on, and wakes those waiting for one (to be refused).
    pub fn close(&self) {
        self.closed.set(true);
        self.freed.notify_waiters();
    }

    /// Resolves once no slot is on loan.
    pub async fn all_returned(&self) {
        loop {
            let freed = self.freed.notified();
            if self.in_use() == 0 {
                return;
            }
            freed.await;
        }
    }

    /// Waits for a slot of `len` bytes for `holder`'s connection
    /// (back-pressure when the arena is full, or when the connection or its
    /// peer holds all its caps allow: then only this connection waits);
    /// `None` once the pool is closed. `len` must not exceed the largest
    /// slot (the configuration check guarantees it for any payload up to
    /// `max_payload`).
    pub async fn lease(self: &Rc<Self>, len: u64, holder: &Rc<Holder>) -> Option<SlotLease> {
        let slot_len = SlotAllocator::slot_len(len);
        // Set while this waits: what stops it (told in the log if the
        // connection is dropped meanwhile).
        let mut waiting = None;
        loop {
            let freed = self.freed.notified();
            if self.closed.get() {
                return None;
            }
            let why = match self.try_lease(len, slot_len, holder, true) {
                Ok(lease) => return Some(lease),
                Err(why) => why,
            };
            match &waiting {
                None => waiting = Some(holder.wait(why)),
                Some(w) => w.now(why),
            }
            freed.await;
        }
    }

    /// Waits, up to [`ROOM_WAIT`], for room for a job's result of `len`
    /// bytes (a worker's `Grow`), counted against `holder`'s connection and
    /// peer. The connection's cap does not apply (the job holds its slot
    /// already, and the pool's `max_result` bounds it); the peer's cap and
    /// the reserve for small requests do, so one peer's results cannot take
    /// the arena from the others. The wait is short: jobs that each hold
    /// rooms and wait for more must not wait on each other until they time
    /// out.
    pub async fn lease_room(
        self: &Rc<Self>,
        len: u64,
        holder: &Rc<Holder>,
    ) -> Result<SlotLease, NoRoom> {
        let slot_len = SlotAllocator::slot_len(len);
        let wait = async {
            loop {
                let freed = self.freed.notified();
                if self.closed.get() {
                    return Err(NoRoom::Closed);
                }
                match self.try_lease(len, slot_len, holder, false) {
                    Ok(lease) => return Ok(lease),
                    Err(why) => tracing::trace!(len, "a result waits for room: {why:?}"),
                }
                freed.await;
            }
        };
        tokio::time::timeout(ROOM_WAIT, wait)
            .await
            .unwrap_or(Err(NoRoom::Busy))
    }

    /// A slot now (within the connection's cap if `conn_capped`, within
    /// the peer's and the reserve always), or what stops it.
    fn try_lease(
        self: &Rc<Self>,
        len: u64,
        slot_len: u64,
        holder: &Rc<Holder>,
        conn_capped: bool,
    ) -> Result<SlotLease, Wait> {
        let conn_held = if conn_capped { holder.held.get() } else { 0 };
        let blocked = self.limits.blocked_by(
            slot_len,
            conn_held,
            self.peer_held.get(&holder.peer),
            self.arena.bytes_in_use(),
        );
        if let Some(why) = blocked {
            return Err(why);
        }
        match self.arena.alloc(len) {
            Ok(slot) => {
                let got = slot.region().len();
                holder.held.set(holder.held.get() + got);
                self.peer_held.add(&holder.peer, got);
                Ok(SlotLease {
                    pool: Rc::clone(self),
                    slot: Some(slot),
                    holder: Rc::clone(holder),
                })
            }
            Err(AllocError::Exhausted { .. }) => Err(Wait::Arena),
            Err(e @ AllocError::TooLarge { .. }) => unreachable!("callers check sizes first: {e}"),
        }
    }
}

/// A slot on loan from the pool; returned when dropped, wherever that is
/// (reply written, connection gone, job abandoned), so slots never leak.
/// Its bytes count against its connection's and its peer's caps meanwhile.
#[derive(Debug)]
pub struct SlotLease {
    pool: Rc<SlotPool>,
    slot: Option<Slot>,
    holder: Rc<Holder>,
}

impl SlotLease {
    fn slot(&self) -> &Slot {
        self.slot.as_ref().expect("slot held until drop")
    }

    /// The slot's bytes in the arena.
    pub fn region(&self) -> Region {
        self.slot().region()
    }

    /// The slot's bytes (while no worker has the slot).
    pub fn bytes(&self) -> &[u8] {
        self.pool
            .arena
            .bytes(self.slot())
            .expect("a slot of the pool's arena")
    }

    /// The slot's bytes, for writing (while no worker has the slot).
    pub fn bytes_mut(&mut self) -> &mut [u8] {
        self.bytes_mut_from(0)
    }

    /// The slot's bytes from `from` on, for writing while a worker may read
    /// those before `from`.
    fn bytes_mut_from(&mut self, from: u64) -> &mut [u8] {
        let slot = self.slot.as_mut().expect("slot held until drop");
        self.pool
            .arena
            .bytes_mut_from(slot, from)
            .expect("a slot of the pool's arena")
    }
}

impl Drop for SlotLease {
    fn drop(&mut self) {
        if let Some(slot) = self.slot.take() {
            let len = slot.region().len();
            self.holder.held.set(self.holder.held.get() - len);
            self.pool.peer_held.sub(&self.holder.peer, len);
            self.pool
                .arena
                .free(slot)
                .expect("a slot of the pool's arena");
            self.pool.freed.notify_waiters();
        }
    }
}

/// A job's hold on its slot while the job is queued or with a worker: it
/// gives the slot's `Region` (for the `Job` frame) and no bytes, since the
/// worker may be writing them. Only [`JobSlot::settle`], which consumes it
/// once the worker has answered (or is dead and reaped), leads back to the
/// bytes. It also holds the result areas given to the worker past the
/// slot (`Room`), the last one holding the result.
#[derive(Debug)]
pub struct JobSlot {
    hold: Hold,
    rooms: Vec<SlotLease>,
    holder: Rc<Holder>,
}

#[derive(Debug)]
enum Hold {
    /// The payload is all in: the job alone holds the slot.
    Own(SlotLease),
    /// The payload may still be arriving: the connection reading it holds
    /// the lease until the upload ends, so the slot is freed only once
    /// neither writes nor reads it.
    Streamed(Rc<Streamed>),
}

impl JobSlot {
    /// A slot whose payload is all in.
    pub fn own(lease: SlotLease) -> JobSlot {
        JobSlot {
            holder: Rc::clone(&lease.holder),
            hold: Hold::Own(lease),
            rooms: Vec::new(),
        }
    }

    /// The slot's bytes in the arena.
    pub fn region(&self) -> Region {
        match &self.hold {
            Hold::Own(lease) => lease.region(),
            Hold::Streamed(s) => s.region,
        }
    }

    /// Where the worker's result lies: the last room given, else the slot.
    pub fn result_area(&self) -> Region {
        self.rooms
            .last()
            .map_or_else(|| self.region(), SlotLease::region)
    }

    /// The connection whose job this is (whose bytes a room counts against).
    pub fn holder(&self) -> &Rc<Holder> {
        &self.holder
    }

    /// Gives back the result areas of a run that ended with its worker's
    /// death: a run again starts from its slot (its areas freed, not read).
    pub fn clear_rooms(&mut self) {
        self.rooms.clear();
    }

    /// Adds a result area given to the worker (it holds it until it answers).
    pub fn add_room(&mut self, room: SlotLease) {
        self.rooms.push(room);
    }

    /// The payload's upload, unless it has arrived in full.
    pub fn upload(&self) -> Option<&Rc<Streamed>> {
        match &self.hold {
            Hold::Streamed(s) if s.upload.state() != UploadState::Complete => Some(s),
            _ => None,
        }
    }

    /// Once the worker has answered (or is dead and reaped): the slot is
    /// the dispatcher's again, its bytes readable if the upload is over too
    /// (the connection has put the lease back).
    pub fn settle(self) -> Settled {
        let hold = match self.hold {
            Hold::Streamed(s) => {
                let back = s.lease.borrow_mut().take();
                match back {
                    Some(lease) => Hold::Own(lease),
                    None => Hold::Streamed(s),
                }
            }
            own => own,
        };
        Settled {
            hold,
            rooms: self.rooms,
        }
    }
}

/// A job's slot (and result areas) back from its worker, held by the
/// reply until it is written.
#[derive(Debug)]
pub struct Settled {
    hold: Hold,
    rooms: Vec<SlotLease>,
}

impl Settled {
    /// Bytes `range` of the result area (the last room, else the slot),
    /// for the reply: empty (whatever the range) while the connection may
    /// still write the slot, or if the range is out of the area.
    pub fn result(&self, range: Range<usize>) -> &[u8] {
        if let Some(room) = self.rooms.last() {
            return room.bytes().get(range).unwrap_or(&[]);
        }
        match &self.hold {
            Hold::Own(lease) => lease.bytes().get(range).unwrap_or(&[]),
            Hold::Streamed(_) => &[],
        }
    }
}

/// A slot whose payload arrives while its job may already run.
#[derive(Debug)]
pub struct Streamed {
    region: Region,
    /// Empty while the connection uploads (it holds the lease).
    lease: RefCell<Option<SlotLease>>,
    pub upload: Upload,
}

/// The connection's side of a streamed upload: it owns the lease meanwhile,
/// and puts it back (marking the upload failed if it was not finished) when
/// dropped, e.g. with its connection.
#[derive(Debug)]
pub struct Uploading {
    streamed: Rc<Streamed>,
    lease: Option<SlotLease>,
    len: u64,
}

impl Uploading {
    /// Starts the upload of `len` bytes into the lease's slot; the job's side is returned with it.
    pub fn start(lease: SlotLease, len: u64) -> (Uploading, JobSlot) {
        let streamed = Rc::new(Streamed {
            region: lease.region(),
            lease: RefCell::new(None),
            upload: Upload::new(len),
        });
        let job = JobSlot {
            holder: Rc::clone(&lease.holder),
            hold: Hold::Streamed(Rc::clone(&streamed)),
            rooms: Vec::new(),
        };
        let up = Uploading {
            streamed,
            lease: Some(lease),
            len,
        };
        (up, job)
    }

    /// Reads the payload into the slot, announcing progress as it comes.
    /// Each read borrows only the part of the slot not yet announced.
    pub async fn read_from<R: AsyncRead + Unpin>(&mut self, rd: &mut R) -> Result<(), FrameError> {
        let mut got = 0u64;
        while got < self.len {
            let lease = self.lease.as_mut().expect("held while uploading");
            let tail = &mut lease.bytes_mut_from(got)[..(self.len - got) as usize];
            match rd.read(tail).await? {
                0 => {
                    return Err(FrameError::Truncated {
                        expected: self.len as usize,
                        got: got as usize,
                    })
                }
                n => got += n as u64,
            }
            self.streamed.upload.advance(got);
        }
        Ok(())
    }

    /// Ends the upload: `complete` when all bytes are in.
    pub fn finish(mut self, complete: bool) {
        self.end(complete);
    }

    /// Puts the lease back first, so an upload seen complete has its lease in place.
    fn end(&mut self, complete: bool) {
        if let Some(lease) = self.lease.take() {
            *self.streamed.lease.borrow_mut() = Some(lease);
        }
        if self.streamed.upload.state() == UploadState::Arriving {
            self.streamed.upload.end(complete);
        }
    }
}

impl Drop for Uploading {
    fn drop(&mut self) {
        self.end(false);
    }
}

/// How far a payload has come.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UploadState {
    Arriving,
    Complete,
    /// The client left or stalled: the rest will never come.
    Failed,
}

/// What the worker running a streamed job must be told next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum News {
    /// `ready` bytes are in; `last` when that is all of them.
    More { ready: u64, last: bool },
    /// The payload will not arrive in full.
    Abort,
}

/// Progress of a payload being read into its slot, written by the
/// connection and read by the worker driver running its job.
#[derive(Debug)]
pub struct Upload {
    len: u64,
    ready: Cell<u64>,
    state: Cell<UploadState>,
    /// `ready` at the last wake-up of the driver.
    woken_at: Cell<u64>,
    /// Bytes between wake-ups: the worker hears of progress at most 64 times
    /// per payload (and every 256 KiB at most often).
    step: u64,
    progress: Notify,
}

impl Upload {
    pub fn new(len: u64) -> Self {
        Upload {
            len,
            ready: Cell::new(0),
            state: Cell::new(UploadState::Arriving),
            woken_at: Cell::new(0),
            step: (len / 64).max(256 << 10),
            progress: Notify::new(),
        }
    }

    pub fn state(&self) -> UploadState {
        self.state.get()
    }

    /// Bytes in the slot so far.
    pub fn ready(&self) -> u64 {
        self.ready.get()
    }

    /// Notes that `ready` bytes are in; wakes the driver every `step` bytes.
    pub fn advance(&self, ready: u64) {
        self.ready.set(ready);
        if ready >= self.woken_at.get() + self.step {
            self.woken_at.set(ready);
            self.progress.notify_one();
        }
    }

    /// Ends the upload: `complete` when all bytes are in, else failed.
    pub fn end(&self, complete: bool) {
        let state = if complete && self.ready.get() == self.len {
            UploadState::Complete
        } else {
            UploadState::Failed
        };
        self.state.set(state);
        self.progress.notify_one();
    }

    /// What a worker told of `told` bytes must hear now, if anything (asked
    /// on each wake-up, so progress is told at the pace of `advance`).
    pub fn news(&self, told: u64) -> Option<News> {
        match self.state.get() {
            UploadState::Failed => Some(News::Abort),
            UploadState::Complete => Some(News::More {
                ready: self.len,
                last: true,
            }),
            UploadState::Arriving if self.ready.get() > told => Some(News::More {
                ready: self.ready.get(),
                last: false,
            }),
            UploadState::Arriving => None,
        }
    }

    /// Waits for the next wake-up (a permit given while nobody waited is kept).
    pub async fn changed(&self) {
        self.progress.notified().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::admission::PeerKey;

    /// A pool over a fresh 1 MiB segment, and a connection's holder.
    fn pool(tag: &str) -> (Rc<SlotPool>, Rc<Holder>) {
        let name = format!("/osps-unit-slots-{}-{tag}", std::process::id());
        let seg = Segment::create(&name, 1 << 20, 1).unwrap();
        (
            SlotPool::new(seg, 64 << 10, 100, 100),
            Holder::new(PeerKey::Unknown),
        )
    }

    fn lease(pool: &Rc<SlotPool>, holder: &Rc<Holder>) -> SlotLease {
        pool.try_lease(4, 4096, holder, true).expect("room")
    }

    fn upload(up: &mut Uploading, bytes: &[u8]) -> Result<(), FrameError> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(up.read_from(&mut { bytes }))
    }

    #[test]
    fn a_lease_counts_against_its_holder_until_dropped() {
        let (pool, holder) = pool("count");
        let mut l = lease(&pool, &holder);
        l.bytes_mut()[..2].copy_from_slice(b"hi");
        assert_eq!(&l.bytes()[..2], b"hi");
        assert_eq!((pool.in_use(), holder.held.get()), (1, 4096));
        drop(l);
        assert_eq!((pool.in_use(), holder.held.get()), (0, 0));
        pool.close();
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        assert!(rt.block_on(pool.lease(4, &holder)).is_none(), "closed");
    }

    #[test]
    fn a_streamed_slot_gives_reply_bytes_only_once_its_upload_is_over() {
        let (pool, holder) = pool("stream");
        let (mut up, job) = Uploading::start(lease(&pool, &holder), 4);
        assert!(job.upload().is_some());
        // A worker that answers while the upload runs: nothing is read.
        let early = job.settle();
        assert_eq!(early.result(0..4), b"");
        upload(&mut up, b"abcd").unwrap();
        up.finish(true);
        assert_eq!(early.result(0..4), b"", "settled while the upload ran");
        drop(early);
        assert_eq!(pool.in_use(), 0);
        // Answered once the upload is over: the reply reads the slot.
        let (mut up, job) = Uploading::start(lease(&pool, &holder), 4);
        upload(&mut up, b"abcd").unwrap();
        up.finish(true);
        assert!(job.upload().is_none(), "complete");
        let done = job.settle();
        assert_eq!(done.result(0..4), b"abcd");
        assert_eq!(done.result(0..1 << 30), b"", "out of the slot");
        assert_eq!(pool.in_use(), 1);
        drop(done);
        assert_eq!(pool.in_use(), 0);
    }

    #[test]
    fn an_upload_dropped_midway_fails_and_frees_the_slot_after_the_job() {
        let (pool, holder) = pool("drop");
        let (mut up, job) = Uploading::start(lease(&pool, &holder), 4);
        assert!(matches!(
            upload(&mut up, b"ab"),
            Err(FrameError::Truncated {
                expected: 4,
                got: 2
            })
        ));
        let s = job.upload().expect("streamed, not complete");
        assert_eq!(s.upload.ready(), 2, "progress announced");
        drop(up); // the connection goes
        assert_eq!(s.upload.state(), UploadState::Failed);
        assert_eq!(s.upload.news(2), Some(News::Abort));
        assert_eq!(pool.in_use(), 1, "the job still holds the slot");
        drop(job.settle());
        assert_eq!((pool.in_use(), holder.held.get()), (0, 0));
    }

    #[test]
    fn an_upload_the_job_let_go_of_frees_its_slot_when_it_ends() {
        let (pool, holder) = pool("early");
        let (mut up, job) = Uploading::start(lease(&pool, &holder), 4);
        drop(job.settle()); // answered early, reply written
        assert_eq!(pool.in_use(), 1, "the connection still writes");
        upload(&mut up, b"abcd").unwrap();
        up.finish(true);
        assert_eq!(pool.in_use(), 0);
    }
}
