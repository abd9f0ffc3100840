//! Admission: what one peer may take from the dispatcher. Each listener has
//! its own budgets (connections, handshakes), sized at start to what the
//! open-file limit allows after a reserve for the workers; handshakes that
//! say nothing are evicted oldest first; and the slot bytes one connection,
//! and one peer (a uid on the Unix socket, an address on TCP), may hold at
//! once are capped, with a reserve of the arena that only small requests use;
//! and a peer other than the owner (a uid admitted by `--allow-uid`, an
//! address on a TCP listener that needs the token) may hold at most half of
//! its listener's connections.
//! Pure logic and single-threaded bookkeeping: no I/O here.

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::rc::Rc;
use std::time::Instant;

use ipc_core::SlotAllocator;
use tokio::sync::Notify;

use crate::Config;

/// Connections in their handshake per listener, at most (fewer when the fd
/// limit is low). Beyond, the oldest silent one is evicted.
pub const MAX_HANDSHAKING: usize = 128;
/// Refusals being answered at once, at most; beyond, closed without a word.
pub const MAX_REFUSING: usize = 64;

/// Descriptors the dispatcher needs besides its clients: standard streams,
/// the runtime's epoll, wakers and signal pipes, the listeners, the lock
/// file, the segment, the log, with room to spare.
pub const FD_BASE: u64 = 32;
/// Descriptors each running worker costs (its stdin and stdout pipes, the
/// child handle), and those a respawn needs for a moment (both ends of three
/// pipes, the exec-error pipe).
pub const FD_PER_WORKER: u64 = 4;
pub const FD_SPAWN: u64 = 8;
/// The watchdog's heartbeat connection (admitted outside every budget).
pub const FD_WATCHDOG: u64 = 2;

/// Slots up to this size are small: they may use the arena's reserve and
/// are not held to the per-peer cap's limit alone (see [`SlotLimits`]).
pub const SMALL_SLOT: u64 = 64 << 10;

/// Who a connection comes from, for the per-peer budgets.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum PeerKey {
    /// A Unix-socket peer, by uid (`SO_PEERCRED`).
    Uid(u32),
    /// A TCP peer, by source address (any port).
    Addr(IpAddr),
    /// The credentials could not be read.
    Unknown,
}

impl std::fmt::Display for PeerKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PeerKey::Uid(u) => write!(f, "uid {u}"),
            PeerKey::Addr(a) => write!(f, "address {a}"),
            PeerKey::Unknown => f.write_str("an unknown peer"),
        }
    }
}

/// The budgets each listener gets, from the configuration and the fd limit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Budgets {
    /// Admitted clients on the Unix socket.
    pub unix_connections: usize,
    /// Admitted clients on the TCP listener.
    pub tcp_connections: usize,
    /// Connections in their handshake, per listener.
    pub handshakes: usize,
    /// Refusals being answered at once.
    pub refusing: usize,
    /// The open-file limit they were sized for.
    pub fd_limit: u64,
    /// Descriptors kept for the dispatcher itself, its workers and the watchdog's probe.
    pub fd_reserve: u64,
}

impl Budgets {
    /// Sizes the budgets so that every client descriptor they allow, plus
    /// the reserve, fits under `fd_limit`: a full dispatcher can still
    /// respawn a worker and answer the watchdog. `None` when even one
    /// client per listener would not fit.
    pub fn for_fd_limit(config: &Config, fd_limit: u64) -> Option<Budgets> {
        let listeners = if config.tcp.is_some() { 2 } else { 1 };
        let reserve = fd_reserve(config.total_workers());
        let avail = fd_limit.saturating_sub(reserve);
        // At least a handshake, a refusal and a client per listener.
        if avail < 1 + 2 * listeners {
            return None;
        }
        let handshakes = (avail / (4 * listeners)).clamp(1, MAX_HANDSHAKING as u64);
        let refusing = (avail / 8).clamp(1, MAX_REFUSING as u64);
        let room = (avail - listeners * handshakes - refusing) as usize;
        // Each listener gets what it asks if both fit; else an equal share,
        // and what one leaves of its share goes to the other.
        let unix_ask = config.max_connections;
        let tcp_ask = if config.tcp.is_some() {
            config.tcp_connections()
        } else {
            0
        };
        let share = (room / listeners as usize).max(1);
        let unix = unix_ask.min(share.max(room.saturating_sub(tcp_ask)));
        let tcp = tcp_ask.min(share.max(room.saturating_sub(unix)));
        Some(Budgets {
            unix_connections: unix.max(1),
            tcp_connections: if config.tcp.is_some() {
                tcp.max(1)
            } else {
                config.tcp_connections()
            },
            handshakes: handshakes as usize,
            refusing: refusing as usize,
            fd_limit,
            fd_reserve: reserve,
        })
    }
}

/// Descriptors kept back from clients for `workers` workers.
pub fn fd_reserve(workers: usize) -> u64 {
    FD_BASE + FD_PER_WORKER * workers as u64 + FD_SPAWN + FD_WATCHDOG
}

/// Admission as a whole: each listener's gate, the refusals being answered,
/// and the token TCP clients must present.
#[derive(Debug)]
pub struct Admission {
    pub unix: Gate,
    pub tcp: Gate,
    /// Refusals being answered, and at most.
    refusing: Cell<usize>,
    max_refusing: usize,
    /// The token TCP clients must present (from `--token-file`), if any.
    pub tcp_token: Option<Box<[u8]>>,
}

impl Admission {
    pub fn new(budgets: &Budgets, tcp_token: Option<Box<[u8]>>) -> Self {
        Admission {
            unix: Gate::new(
                "--max-connections",
                budgets.unix_connections,
                budgets.handshakes,
            ),
            tcp: Gate::new(
                "--max-tcp-connections",
                budgets.tcp_connections,
                budgets.handshakes,
            ),
            refusing: Cell::new(0),
            max_refusing: budgets.refusing,
            tcp_token,
        }
    }

    /// Counts one refusal being answered while the guard lives; `None` in
    /// a flood (more at once than the budget): close without a word.
    pub fn refusing(&self) -> Option<Counted<'_>> {
        (self.refusing.get() < self.max_refusing).then(|| Counted::new(&self.refusing))
    }

    /// Admitted clients on both listeners.
    pub fn connections(&self) -> usize {
        self.unix.connections.get() + self.tcp.connections.get()
    }
}

/// Counts one holder of a budget while alive.
#[derive(Debug)]
pub struct Counted<'a>(&'a Cell<usize>);

impl<'a> Counted<'a> {
    fn new(count: &'a Cell<usize>) -> Self {
        count.set(count.get() + 1);
        Counted(count)
    }
}

impl Drop for Counted<'_> {
    fn drop(&mut self) {
        self.0.set(self.0.get() - 1);
    }
}

/// One listener's admission state.
#[derive(Debug)]
pub struct Gate {
    /// What the refusal line names: `--max-connections` or `--max-tcp-connections`.
    pub flag: &'static str,
    /// Admitted clients at most.
    pub max_connections: usize,
    /// Admitted clients now.
    pub connections: Cell<usize>,
    /// Admitted clients one peer held to a share may have at once: half
    /// the budget (at least one), so that no such peer can take it all.
    pub peer_share: usize,
    /// Admitted clients now, of each peer held to the share.
    shares: RefCell<HashMap<PeerKey, usize>>,
    /// Connections in their handshake.
    pub handshakes: Handshakes,
}

/// Why a connection is not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The listener's budget is spent.
    Full,
    /// The peer, held to a share, has its share already.
    PeerShare,
}

impl Gate {
    pub fn new(flag: &'static str, max_connections: usize, handshakes: usize) -> Self {
        Gate {
            flag,
            max_connections,
            connections: Cell::new(0),
            peer_share: (max_connections / 2).max(1),
            shares: RefCell::new(HashMap::new()),
            handshakes: Handshakes::new(handshakes),
        }
    }

    pub fn is_full(&self) -> bool {
        self.connections.get() >= self.max_connections
    }

    /// Why a connection from `peer` cannot be admitted now (`None`: it
    /// can). `capped`: the peer is held to [`Gate::peer_share`] (a Unix
    /// peer admitted only by `--allow-uid`, a TCP address on a listener
    /// that needs the token); the owner is not.
    pub fn refuses(&self, peer: &PeerKey, capped: bool) -> Option<Refusal> {
        if self.is_full() {
            Some(Refusal::Full)
        } else if capped && self.held_by(peer) >= self.peer_share {
            Some(Refusal::PeerShare)
        } else {
            None
        }
    }

    /// Admitted connections `peer` holds now (counted for capped peers only).
    pub fn held_by(&self, peer: &PeerKey) -> usize {
        self.shares.borrow().get(peer).copied().unwrap_or(0)
    }

    /// Counts an admitted connection (see [`Gate::refuses`]) until the
    /// returned mark is dropped.
    pub fn admit(&self, peer: &PeerKey, capped: bool) -> Admitted<'_> {
        self.connections.set(self.connections.get() + 1);
        let peer = capped.then(|| {
            *self.shares.borrow_mut().entry(peer.clone()).or_insert(0) += 1;
            peer.clone()
        });
        Admitted { gate: self, peer }
    }
}

/// An admitted connection's place in its listener's budget (and its peer's share).
#[derive(Debug)]
pub struct Admitted<'a> {
    gate: &'a Gate,
    peer: Option<PeerKey>,
}

impl Drop for Admitted<'_> {
    fn drop(&mut self) {
        let g = self.gate;
        g.connections.set(g.connections.get() - 1);
        if let Some(peer) = &self.peer {
            let mut shares = g.shares.borrow_mut();
            if let Some(n) = shares.get_mut(peer) {
                *n -= 1;
                if *n == 0 {
                    shares.remove(peer);
                }
            }
        }
    }
}

/// The connections of one listener still in their handshake, oldest first.
/// A new one is always taken: when its peer already has its share (a
/// quarter of the budget), that peer's oldest is evicted; else, when the
/// budget is full, the oldest of all is. So a flood of silent connections
/// cannot keep out a client that says hello at once.
#[derive(Debug)]
pub struct Handshakes {
    max: usize,
    per_peer: usize,
    next: Cell<u64>,
    live: RefCell<BTreeMap<u64, (PeerKey, Rc<Notify>)>>,
    evicted: Cell<u64>,
}

impl Handshakes {
    pub fn new(max: usize) -> Self {
        let max = max.max(1);
        Handshakes {
            max,
            per_peer: (max / 4).max(1),
            next: Cell::new(0),
            live: RefCell::new(BTreeMap::new()),
            evicted: Cell::new(0),
        }
    }

    /// Registers a new handshake from `peer`, evicting another if the budget
    /// requires it. The ticket leaves the register when dropped.
    pub fn enter(&self, peer: PeerKey) -> Ticket<'_> {
        let mut live = self.live.borrow_mut();
        let mut from_peer = live.iter().filter(|(_, (p, _))| *p == peer);
        let oldest_of_peer = from_peer.next().map(|(seq, _)| *seq);
        let of_peer = oldest_of_peer.map_or(0, |_| 1 + from_peer.count());
        let victim = if of_peer >= self.per_peer {
            oldest_of_peer
        } else if live.len() >= self.max {
            live.keys().next().copied()
        } else {
            None
        };
        if let Some(seq) = victim {
            if let Some((_, evict)) = live.remove(&seq) {
                evict.notify_one();
                self.evicted.set(self.evicted.get() + 1);
            }
        }
        let seq = self.next.get();
        self.next.set(seq + 1);
        let evicted = Rc::new(Notify::new());
        live.insert(seq, (peer, Rc::clone(&evicted)));
        Ticket {
            register: self,
            seq,
            evicted,
        }
    }

    /// Handshakes in progress.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.live.borrow().len()
    }

    /// Handshakes evicted so far.
    #[cfg(test)]
    fn evicted(&self) -> u64 {
        self.evicted.get()
    }
}

/// A connection's place among the handshakes.
#[derive(Debug)]
pub struct Ticket<'a> {
    register: &'a Handshakes,
    seq: u64,
    evicted: Rc<Notify>,
}

impl Ticket<'_> {
    /// Resolves when a newer connection evicted this one.
    pub async fn evicted(&self) {
        self.evicted.notified().await
    }
}

impl Drop for Ticket<'_> {
    fn drop(&mut self) {
        self.register.live.borrow_mut().remove(&self.seq);
    }
}

/// The caps on slot bytes held at once, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlotLimits {
    /// The arena.
    pub arena: u64,
    /// By one connection (never less than one largest request's slot).
    pub conn: u64,
    /// By one peer's connections together, for large slots (never less than `conn`).
    pub peer: u64,
    /// The end of the arena that large slots leave to small ones.
    pub reserve: u64,
}

impl SlotLimits {
    /// From percentages of the arena; `max_request` is the slot of the
    /// largest request (`max_payload` plus the result reserve).
    pub fn new(arena: u64, max_request: u64, conn_percent: u64, peer_percent: u64) -> Self {
        let share = |pct: u64| {
            SlotAllocator::slot_len((arena as u128 * pct.clamp(1, 100) as u128 / 100) as u64)
                .min(arena)
        };
        let conn = share(conn_percent).max(max_request);
        let peer = share(peer_percent).max(conn);
        let reserve = SlotAllocator::slot_len(arena / 16)
            .min(arena.saturating_sub(max_request))
            .min(arena);
        SlotLimits {
            arena,
            conn,
            peer,
            reserve,
        }
    }

    /// Whether a connection holding `conn_held` bytes, whose peer holds
    /// `peer_held`, may take a slot of `slot` bytes while `in_use` bytes of
    /// the arena are leased: `None` if it may, else which cap stops it.
    /// Every slot keeps its connection under `conn`. A large slot also keeps
    /// its peer under `peer`, and leaves the last `reserve` bytes of the
    /// arena free. A small one may go `reserve` past the peer cap and use
    /// the reserve: so small requests of a peer whose other connections hold
    /// all they may (all local clients share a uid) still get a slot.
    pub fn blocked_by(
        &self,
        slot: u64,
        conn_held: u64,
        peer_held: u64,
        in_use: u64,
    ) -> Option<Wait> {
        if conn_held + slot > self.conn {
            Some(Wait::ConnCap)
        } else if slot <= SMALL_SLOT {
            (peer_held + slot > self.peer + self.reserve).then_some(Wait::PeerCap)
        } else if peer_held + slot > self.peer {
            Some(Wait::PeerCap)
        } else {
            (in_use + slot > self.arena - self.reserve).then_some(Wait::Arena)
        }
    }
}

/// What a connection's reader waits for before it reads the next request
/// on: while it waits, the client's further bytes stay in the socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wait {
    /// A place among the connection's requests in flight (`--max-in-flight`).
    InFlight,
    /// A slot: the connection holds its own share of the arena
    /// (`--conn-arena-percent`); only its own replies being written free it.
    ConnCap,
    /// A slot: the connection's peer holds its share (`--peer-arena-percent`).
    PeerCap,
    /// A slot: the arena is full (or would leave its reserve to small requests).
    Arena,
}

/// What one connection holds, and whose it is.
#[derive(Debug)]
pub struct Holder {
    pub peer: PeerKey,
    pub held: Cell<u64>,
    /// What the connection's reader waits for now, and since when (so that
    /// the writer, when it drops a client that takes no reply bytes, can
    /// say why the client may have stopped reading).
    waiting: Cell<Option<(Wait, Instant)>>,
}

impl Holder {
    pub fn new(peer: PeerKey) -> Rc<Self> {
        Rc::new(Holder {
            peer,
            held: Cell::new(0),
            waiting: Cell::new(None),
        })
    }

    /// Marks the reader waiting for `why` until the mark is dropped (or
    /// moved on with [`Waiting::now`]); its start time is kept.
    pub fn wait(&self, why: Wait) -> Waiting<'_> {
        self.waiting.set(Some((why, Instant::now())));
        Waiting(self)
    }

    /// What the reader waits for now, and since when.
    pub fn waiting(&self) -> Option<(Wait, Instant)> {
        self.waiting.get()
    }
}

/// The mark of a reader's wait; cleared when dropped.
#[derive(Debug)]
pub struct Waiting<'a>(&'a Holder);

impl Waiting<'_> {
    /// The same wait goes on, now for `why`.
    pub fn now(&self, why: Wait) {
        if let Some((_, since)) = self.0.waiting.get() {
            self.0.waiting.set(Some((why, since)));
        }
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.waiting.set(None);
    }
}

/// Slot bytes held per peer.
#[derive(Debug, Default)]
pub struct PeerHoldings(RefCell<HashMap<PeerKey, u64>>);

impl PeerHoldings {
    pub fn get(&self, peer: &PeerKey) -> u64 {
        self.0.borrow().get(peer).copied().unwrap_or(0)
    }

    pub fn add(&self, peer: &PeerKey, bytes: u64) {
        *self.0.borrow_mut().entry(peer.clone()).or_insert(0) += bytes;
    }

    pub fn sub(&self, peer: &PeerKey, bytes: u64) {
        let mut map = self.0.borrow_mut();
        if let Some(held) = map.get_mut(peer) {
            *held = held.saturating_sub(bytes);
            if *held == 0 {
                map.remove(peer);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn slot_caps_per_connection_per_peer_and_the_reserve() {
        // 8 MiB arena, largest request 2 MiB: conn 2 MiB, peer 6 MiB, reserve 512 KiB.
        let l = SlotLimits::new(8 * MIB, 2 * MIB, 25, 75);
        assert_eq!((l.conn, l.peer, l.reserve), (2 * MIB, 6 * MIB, 512 << 10));
        let big = 2 * MIB;
        let small = 4096;
        // (slot, conn held, peer held, arena in use, admitted)
        let table = [
            (big, 0, 0, 0, true),
            (big, big, big, big, false),          // the connection's cap
            (small, big - small, big, big, true), // up to the cap exactly
            (big, 0, 6 * MIB, 6 * MIB, false),    // the peer's cap
            (small, 0, 6 * MIB, 6 * MIB, true),   // small: past it, into the reserve
            (small, 0, 6 * MIB + (512 << 10), 7 * MIB, false), // not past the reserve too
            (big, 0, 0, 6 * MIB, false),          // another peer: large leave the reserve
            (small, 0, 0, 8 * MIB - small, true), // small use it
        ];
        for (slot, conn, peer, in_use, want) in table {
            assert_eq!(
                l.blocked_by(slot, conn, peer, in_use).is_none(),
                want,
                "slot {slot} conn {conn} peer {peer} in use {in_use}"
            );
        }
    }

    #[test]
    fn a_refused_slot_says_which_cap_stops_it() {
        let l = SlotLimits::new(8 * MIB, 2 * MIB, 25, 75);
        let big = 2 * MIB;
        assert_eq!(l.blocked_by(big, big, big, big), Some(Wait::ConnCap));
        assert_eq!(l.blocked_by(4096, big, big, big), Some(Wait::ConnCap));
        assert_eq!(l.blocked_by(big, 0, 6 * MIB, 6 * MIB), Some(Wait::PeerCap));
        assert_eq!(l.blocked_by(big, 0, 0, 6 * MIB), Some(Wait::Arena));
        assert_eq!(l.blocked_by(big, 0, 0, 0), None);
    }

    #[test]
    fn a_readers_wait_is_marked_until_it_ends() {
        let h = Holder::new(PeerKey::Uid(1));
        assert_eq!(h.waiting(), None);
        {
            let w = h.wait(Wait::Arena);
            let since = h.waiting().expect("marked").1;
            w.now(Wait::ConnCap);
            assert_eq!(h.waiting(), Some((Wait::ConnCap, since)));
        }
        assert_eq!(h.waiting(), None);
    }

    #[test]
    fn a_connection_may_always_send_the_largest_request() {
        // Largest request bigger than the shares: the caps grow to it, the reserve shrinks.
        let l = SlotLimits::new(8 * MIB, 8 * MIB - 4096, 25, 75);
        assert_eq!(
            (l.conn, l.peer, l.reserve),
            (8 * MIB - 4096, 8 * MIB - 4096, 4096)
        );
        assert_eq!(l.blocked_by(8 * MIB - 4096, 0, 0, 0), None);
    }

    #[test]
    fn silent_handshakes_are_evicted_oldest_first_per_peer_then_overall() {
        let h = Handshakes::new(8); // 2 per peer
        let a = PeerKey::Uid(1);
        let t1 = h.enter(a.clone());
        let _t2 = h.enter(a.clone());
        let _t3 = h.enter(a.clone()); // a's third: a's oldest (t1) goes
        assert_eq!((h.len(), h.evicted()), (2, 1));
        drop(t1); // leaving after eviction changes nothing
        assert_eq!(h.len(), 2);
        let others: Vec<_> = (2..8).map(|u| h.enter(PeerKey::Uid(u))).collect();
        assert_eq!(h.len(), 8);
        let _late = h.enter(PeerKey::Uid(99)); // full: the oldest of all goes
        assert_eq!((h.len(), h.evicted()), (8, 2));
        drop(others);
        assert_eq!(h.len(), 2);
    }

    /// Admits `n` connections of `peer`, each one checked first.
    fn admit_all<'g>(g: &'g Gate, peer: &PeerKey, capped: bool, n: usize) -> Vec<Admitted<'g>> {
        (0..n)
            .map(|_| {
                assert_eq!(g.refuses(peer, capped), None);
                g.admit(peer, capped)
            })
            .collect()
    }

    #[test]
    fn a_capped_peer_holds_at_most_half_of_the_budget_and_the_owner_the_rest() {
        let g = Gate::new("--max-connections", 8, 4);
        assert_eq!(g.peer_share, 4);
        let other = PeerKey::Uid(65534);
        let owner = PeerKey::Uid(0);
        let theirs = admit_all(&g, &other, true, 4);
        assert_eq!(g.refuses(&other, true), Some(Refusal::PeerShare));
        // Another capped peer has a share of its own; the owner is not capped.
        assert_eq!(g.refuses(&PeerKey::Uid(1000), true), None);
        let ours = admit_all(&g, &owner, false, 4);
        assert_eq!(g.refuses(&owner, false), Some(Refusal::Full));
        assert_eq!(g.refuses(&other, true), Some(Refusal::Full));
        drop(ours);
        assert_eq!(g.refuses(&other, true), Some(Refusal::PeerShare));
        drop(theirs);
        assert_eq!((g.connections.get(), g.held_by(&other)), (0, 0));
        // A budget of one: the share is one.
        assert_eq!(Gate::new("--max-connections", 1, 1).peer_share, 1);
    }

    #[test]
    fn budgets_fit_under_the_fd_limit() {
        let mut c = Config::new("t");
        c.workers = 2;
        let b = Budgets::for_fd_limit(&c, 64).expect("fits");
        let clients = b.unix_connections + b.handshakes + b.refusing;
        assert!(b.unix_connections < 1024 && b.unix_connections >= 1);
        assert!(clients as u64 + fd_reserve(2) <= 64, "{b:?}");
        c.tcp = Some("127.0.0.1:0".parse().unwrap());
        let b = Budgets::for_fd_limit(&c, 64).expect("fits");
        let clients = b.unix_connections + b.tcp_connections + 2 * b.handshakes + b.refusing;
        assert!(clients as u64 + fd_reserve(2) <= 64, "{b:?}");
        // What one listener does not ask goes to the other.
        c.max_tcp_connections = Some(2);
        let b = Budgets::for_fd_limit(&c, 64).expect("fits");
        let clients = b.unix_connections + b.tcp_connections + 2 * b.handshakes + b.refusing;
        assert_eq!(b.tcp_connections, 2, "{b:?}");
        assert_eq!(clients as u64 + fd_reserve(2), 64, "{b:?}");
        c.max_tcp_connections = None;
        // A high limit leaves the configured values alone.
        let b = Budgets::for_fd_limit(&c, 1 << 20).expect("fits");
        assert_eq!((b.unix_connections, b.tcp_connections), (1024, 1024));
        assert_eq!((b.handshakes, b.refusing), (MAX_HANDSHAKING, MAX_REFUSING));
        assert!(Budgets::for_fd_limit(&c, 20).is_none());
    }
}
