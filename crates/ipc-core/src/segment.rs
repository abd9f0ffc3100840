//! The shared-memory segment: a fixed header followed by the slot arena.
//!
//! The dispatcher creates it (mode 0600, set explicitly, exclusively under a
//! fresh random name) and is its only allocator; workers open it by the name
//! the dispatcher gives them. A start never opens nor maps an object it finds:
//! a dead predecessor's segment is removed with [`remove_if_ours`]. Ownership of a slot passes with the
//! message that names it, so no cross-process lock guards the bytes. This is
//! the one module with `unsafe` code.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use serde::{Deserialize, Serialize};
use shared_memory::{Shmem, ShmemConf, ShmemError};

/// Magic at the start of the header.
pub const SEGMENT_MAGIC: [u8; 8] = *b"OSPSSEG\0";
/// Version of the header layout below; bumped on any change.
pub const LAYOUT_VERSION: u32 = 1;
/// Bytes reserved for the header; the arena starts here (page aligned).
pub const HEADER_LEN: usize = 4096;

/// A byte range of the arena, as carried in messages (offsets from the arena's start).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Region {
    /// Offset from the start of the arena.
    pub offset: u64,
    /// Length in bytes.
    pub len: u64,
}

/// The header at the start of the segment. `#[repr(C)]`, no pointers, fixed
/// size: every process sees the same layout. Counters are atomics so any
/// process can read them while the dispatcher updates them.
#[repr(C)]
#[derive(Debug)]
pub struct SegmentHeader {
    /// [`SEGMENT_MAGIC`].
    pub magic: [u8; 8],
    /// [`LAYOUT_VERSION`].
    pub layout_version: u32,
    /// [`HEADER_LEN`].
    pub header_len: u32,
    /// Size of the whole segment in bytes.
    pub total_len: u64,
    /// Size of the slot arena in bytes.
    pub arena_len: u64,
    /// Pid of the dispatcher that created the segment.
    pub owner_pid: AtomicU32,
    _pad: u32,
    /// Incremented each time a dispatcher of this instance builds the segment anew.
    pub generation: AtomicU64,
    /// Jobs completed (any outcome) since the segment was built.
    pub jobs_done: AtomicU64,
    /// Dispatcher heartbeat: milliseconds since the Unix epoch, refreshed by its event loop.
    pub dispatcher_heartbeat_ms: AtomicU64,
}

const _: () = assert!(std::mem::size_of::<SegmentHeader>() <= HEADER_LEN);

/// Errors creating, opening or using a segment.
#[derive(Debug, thiserror::Error)]
pub enum SegmentError {
    #[error("shared-memory segment {name} already exists; its name is taken (a start picks a fresh random name and tries again)")]
    Exists { name: String },
    #[error("cannot create shared-memory segment {name} of {size} bytes: {detail}")]
    Create {
        name: String,
        size: usize,
        detail: String,
    },
    #[error("cannot open shared-memory segment {name}: {detail} (is the dispatcher running?)")]
    Open { name: String, detail: String },
    #[error("segment {name} is not an OSPS segment of layout {LAYOUT_VERSION}: {detail}")]
    BadHeader { name: String, detail: String },
    #[error("region {offset}+{len} lies outside the arena of {arena_len} bytes")]
    OutOfBounds {
        offset: u64,
        len: u64,
        arena_len: u64,
    },
    #[error("/dev/shm has room for {available} bytes, but segment {name} needs {size}: free space there, enlarge it (e.g. docker --shm-size), or lower --segment-mib")]
    NoSpace {
        name: String,
        size: usize,
        available: u64,
    },
    #[error("cannot reserve {size} bytes for segment {name}: {detail}")]
    Reserve {
        name: String,
        size: usize,
        detail: String,
    },
    #[error("cannot set mode 0600 on {path}: {source}")]
    Mode {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// Names that start with this select the System V backend (`shmget`, listed
/// by `ipcs -m`); other names are POSIX (`shm_open`, under `/dev/shm`).
pub const SYSV_PREFIX: &str = "sysv:";

/// The System V key of a segment name (with or without [`SYSV_PREFIX`]):
/// a stable hash, positive and never `IPC_PRIVATE`.
pub fn sysv_key(name: &str) -> i32 {
    let base = name.strip_prefix(SYSV_PREFIX).unwrap_or(name);
    let h = base.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    });
    ((h as u32) & 0x7fff_ffff).max(1) as i32
}

/// What the kernel says of a System V segment (`IPC_STAT`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SysvInfo {
    /// The key (`ipcs -m` shows it in hex).
    pub key: i32,
    /// The id (`ipcs -m -i ID`).
    pub id: i32,
    /// Processes attached.
    pub nattch: u64,
    /// Permission bits.
    pub mode: u32,
    /// Owner's uid.
    pub uid: u32,
}

/// A System V mapping: attached with `shmat`, detached on drop, and removed
/// (`IPC_RMID`) by its owner.
struct SysvMap {
    id: i32,
    addr: *mut u8,
    len: usize,
    owner: bool,
}

impl Drop for SysvMap {
    fn drop(&mut self) {
        // SAFETY: `addr` is the address `shmat` returned for this mapping and
        // nothing borrows from it any more (borrows are tied to the Segment,
        // which is being dropped); `shmctl(IPC_RMID)` takes no buffer.
        unsafe {
            libc::shmdt(self.addr.cast());
            if self.owner {
                libc::shmctl(self.id, libc::IPC_RMID, std::ptr::null_mut());
            }
        }
    }
}

/// The mapping behind a segment, of either backend.
enum Mapping {
    Posix(Shmem),
    Sysv(SysvMap),
}

impl Mapping {
    fn as_ptr(&self) -> *mut u8 {
        match self {
            Mapping::Posix(m) => m.as_ptr(),
            Mapping::Sysv(m) => m.addr,
        }
    }

    fn len(&self) -> usize {
        match self {
            Mapping::Posix(m) => m.len(),
            Mapping::Sysv(m) => m.len,
        }
    }

    fn is_owner(&self) -> bool {
        match self {
            Mapping::Posix(m) => m.is_owner(),
            Mapping::Sysv(m) => m.owner,
        }
    }

    fn disown(&mut self) {
        match self {
            Mapping::Posix(m) => {
                m.set_owner(false);
            }
            Mapping::Sysv(m) => m.owner = false,
        }
    }
}

fn sysv_stat(id: i32) -> std::io::Result<libc::shmid_ds> {
    // SAFETY: shmid_ds is plain old data (integers), valid when zeroed, and
    // IPC_STAT writes exactly one into the buffer we pass.
    unsafe {
        let mut ds: libc::shmid_ds = std::mem::zeroed();
        if libc::shmctl(id, libc::IPC_STAT, &mut ds) == 0 {
            Ok(ds)
        } else {
            Err(std::io::Error::last_os_error())
        }
    }
}

fn sysv_attach(id: i32) -> std::io::Result<*mut u8> {
    // SAFETY: shmat with a null address lets the kernel choose where to map;
    // it returns (void*)-1 on failure, checked here.
    let addr = unsafe { libc::shmat(id, std::ptr::null(), 0) };
    if addr as isize == -1 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(addr.cast())
}

/// A mapped segment. Dropping the creator's handle unlinks the name.
pub struct Segment {
    shmem: Mapping,
    name: String,
    /// A thread filling in this process's page tables for the mapping, and
    /// the sender whose drop cancels it if it has not started yet.
    populating:
        std::cell::RefCell<Option<(std::sync::mpsc::Sender<()>, std::thread::JoinHandle<()>)>>,
}

impl Drop for Segment {
    fn drop(&mut self) {
        // The populating thread works on our mapping: it must be done before
        // the mapping goes (the `shmem` field is dropped after this).
        if let Some((cancel, t)) = self.populating.get_mut().take() {
            drop(cancel);
            let _ = t.join();
        }
    }
}

impl std::fmt::Debug for Segment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Segment")
            .field("name", &self.name)
            .field("len", &self.shmem.len())
            .field("owner", &self.shmem.is_owner())
            .field("sysv", &matches!(self.shmem, Mapping::Sysv(_)))
            .finish()
    }
}

fn shm_detail(e: ShmemError) -> String {
    match e {
        ShmemError::MapCreateFailed(errno)
        | ShmemError::MapOpenFailed(errno)
        | ShmemError::UnknownOsError(errno) => {
            std::io::Error::from_raw_os_error(errno as i32).to_string()
        }
        other => other.to_string(),
    }
}

/// Reserves the segment's tmpfs pages now, so that a `/dev/shm` too small
/// for it is a clear error at start instead of a SIGBUS when a page is first
/// touched under load.
fn reserve(path: &str, name: &str, size: usize) -> Result<(), SegmentError> {
    use std::os::fd::AsRawFd;
    let fail = |detail: String| SegmentError::Reserve {
        name: name.to_owned(),
        size,
        detail,
    };
    // Check first: asking tmpfs for more than it has would fill it before failing.
    let fs = nix::sys::statvfs::statvfs(path).map_err(|e| fail(e.to_string()))?;
    let available = fs.blocks_available() as u64 * fs.fragment_size() as u64;
    if size as u64 > available {
        return Err(SegmentError::NoSpace {
            name: name.to_owned(),
            size,
            available,
        });
    }
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(|e| fail(e.to_string()))?;
    match nix::fcntl::posix_fallocate(file.as_raw_fd(), 0, size as i64) {
        Ok(()) => Ok(()),
        Err(nix::errno::Errno::ENOSPC) => Err(SegmentError::NoSpace {
            name: name.to_owned(),
            size,
            available,
        }),
        Err(e) => Err(fail(e.to_string())),
    }
}

/// Removes a segment by name (either backend); returns whether one was there.
/// For tests and clean-up of names known to be ours; a start uses
/// [`remove_if_ours`].
pub fn unlink(name: &str) -> bool {
    if name.starts_with(SYSV_PREFIX) {
        // SAFETY: shmget and shmctl(IPC_RMID) take no buffers.
        unsafe {
            let id = libc::shmget(sysv_key(name), 0, 0);
            id >= 0 && libc::shmctl(id, libc::IPC_RMID, std::ptr::null_mut()) == 0
        }
    } else {
        nix::sys::mman::shm_unlink(name).is_ok()
    }
}

/// What [`remove_if_ours`] found under a name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Removal {
    /// Nothing of that name.
    Absent,
    /// Ours: removed.
    Removed,
    /// Someone else's (owner uid given), or not a plain segment: left alone.
    Foreign { uid: u32 },
}

/// Removes a segment by name (either backend) only if it belongs to this
/// process's effective uid, without ever opening or mapping it: for POSIX
/// the `/dev/shm` entry is `lstat`ed (a regular file of ours; `/dev/shm` is
/// sticky, so nobody else can swap it before the unlink), for System V the
/// kernel's `IPC_STAT` must name us as owner and creator before `IPC_RMID`.
pub fn remove_if_ours(name: &str) -> Removal {
    use std::os::unix::fs::MetadataExt;
    let euid = nix::unistd::geteuid().as_raw();
    if name.starts_with(SYSV_PREFIX) {
        // SAFETY: shmget takes no buffer.
        let id = unsafe { libc::shmget(sysv_key(name), 0, 0) };
        if id < 0 {
            return Removal::Absent;
        }
        let Ok(ds) = sysv_stat(id) else {
            return Removal::Absent;
        };
        let (uid, cuid) = (ds.shm_perm.uid, ds.shm_perm.cuid);
        if uid != euid || cuid != euid {
            return Removal::Foreign { uid: cuid };
        }
        // SAFETY: shmctl(IPC_RMID) takes no buffer.
        let rc = unsafe { libc::shmctl(id, libc::IPC_RMID, std::ptr::null_mut()) };
        return if rc == 0 {
            Removal::Removed
        } else {
            Removal::Absent
        };
    }
    match std::fs::symlink_metadata(fs_path(name)) {
        Err(_) => Removal::Absent,
        Ok(m) if !m.file_type().is_file() || m.uid() != euid => Removal::Foreign { uid: m.uid() },
        Ok(_) => {
            if nix::sys::mman::shm_unlink(name).is_ok() {
                Removal::Removed
            } else {
                Removal::Absent
            }
        }
    }
}

/// Whether a segment of that name exists (either backend).
pub fn exists(name: &str) -> bool {
    if name.starts_with(SYSV_PREFIX) {
        // SAFETY: shmget takes no buffer.
        unsafe { libc::shmget(sysv_key(name), 0, 0) >= 0 }
    } else {
        std::path::Path::new(&fs_path(name)).exists()
    }
}

/// Where a POSIX segment name shows up in the file system.
pub fn fs_path(name: &str) -> String {
    format!("/dev/shm/{}", name.trim_start_matches('/'))
}

impl Segment {
    /// Creates a segment named `name` (e.g. `/osps-1000-default`) with an arena
    /// of `arena_len` bytes, mode 0600 whatever the umask, and writes its header.
    /// Fails with [`SegmentError::Exists`] if the name is taken.
    pub fn create(name: &str, arena_len: usize, generation: u64) -> Result<Segment, SegmentError> {
        let size = HEADER_LEN + arena_len;
        let seg = if name.starts_with(SYSV_PREFIX) {
            Segment::create_sysv(name, size)?
        } else {
            Segment::create_posix(name, size)?
        };
        let header = SegmentHeader {
            magic: SEGMENT_MAGIC,
            layout_version: LAYOUT_VERSION,
            header_len: HEADER_LEN as u32,
            total_len: size as u64,
            arena_len: arena_len as u64,
            owner_pid: AtomicU32::new(std::process::id()),
            _pad: 0,
            generation: AtomicU64::new(generation),
            jobs_done: AtomicU64::new(0),
            dispatcher_heartbeat_ms: AtomicU64::new(0),
        };
        // SAFETY: the mapping is at least HEADER_LEN bytes, page aligned (so
        // aligned for SegmentHeader), freshly created and not yet shared with
        // any other process, so this write races with nothing.
        unsafe { std::ptr::write(seg.shmem.as_ptr().cast::<SegmentHeader>(), header) };
        Ok(seg)
    }

    fn create_posix(name: &str, size: usize) -> Result<Segment, SegmentError> {
        let shmem = ShmemConf::new()
            .os_id(name)
            .size(size)
            .create()
            .map_err(|e| match e {
                ShmemError::MappingIdExists => SegmentError::Exists {
                    name: name.to_owned(),
                },
                e => SegmentError::Create {
                    name: name.to_owned(),
                    size,
                    detail: shm_detail(e),
                },
            })?;
        let seg = Segment {
            shmem: Mapping::Posix(shmem),
            name: name.to_owned(),
            populating: Default::default(),
        };
        // shm_open applied the umask to 0600; make the mode exact.
        let path = fs_path(name);
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).map_err(
            |source| SegmentError::Mode {
                path: path.clone(),
                source,
            },
        )?;
        reserve(&path, name, size)?;
        Ok(seg)
    }

    fn create_sysv(name: &str, size: usize) -> Result<Segment, SegmentError> {
        let err = |e: std::io::Error| match e.raw_os_error() {
            Some(libc::EEXIST) => SegmentError::Exists {
                name: name.to_owned(),
            },
            _ => SegmentError::Create {
                name: name.to_owned(),
                size,
                detail: e.to_string(),
            },
        };
        // SAFETY: shmget takes no buffer. Mode 0600 is exact: System V
        // permissions are not filtered by the umask.
        let id = unsafe {
            libc::shmget(
                sysv_key(name),
                size,
                libc::IPC_CREAT | libc::IPC_EXCL | 0o600,
            )
        };
        if id < 0 {
            return Err(err(std::io::Error::last_os_error()));
        }
        let addr = match sysv_attach(id) {
            Ok(a) => a,
            Err(e) => {
                // SAFETY: shmctl(IPC_RMID) takes no buffer; the id is ours, just made.
                unsafe { libc::shmctl(id, libc::IPC_RMID, std::ptr::null_mut()) };
                return Err(err(e));
            }
        };
        let map = SysvMap {
            id,
            addr,
            len: size,
            owner: true,
        };
        Ok(Segment {
            shmem: Mapping::Sysv(map),
            name: name.to_owned(),
            populating: Default::default(),
        })
    }

    fn open_mapping(name: &str) -> Result<Mapping, SegmentError> {
        let open_err = |detail: String| SegmentError::Open {
            name: name.to_owned(),
            detail,
        };
        if !name.starts_with(SYSV_PREFIX) {
            let shmem = ShmemConf::new()
                .os_id(name)
                .open()
                .map_err(|e| open_err(shm_detail(e)))?;
            return Ok(Mapping::Posix(shmem));
        }
        // SAFETY: shmget takes no buffer.
        let id = unsafe { libc::shmget(sysv_key(name), 0, 0) };
        if id < 0 {
            return Err(open_err(std::io::Error::last_os_error().to_string()));
        }
        let len = sysv_stat(id)
            .map_err(|e| open_err(e.to_string()))?
            .shm_segsz;
        let addr = sysv_attach(id).map_err(|e| open_err(e.to_string()))?;
        Ok(Mapping::Sysv(SysvMap {
            id,
            addr,
            len,
            owner: false,
        }))
    }

    /// For a System V segment, what the kernel says of it now.
    pub fn sysv_info(&self) -> Option<SysvInfo> {
        let Mapping::Sysv(m) = &self.shmem else {
            return None;
        };
        let ds = sysv_stat(m.id).ok()?;
        Some(SysvInfo {
            key: sysv_key(&self.name),
            id: m.id,
            nattch: ds.shm_nattch,
            mode: ds.shm_perm.mode as u32 & 0o777,
            uid: ds.shm_perm.uid,
        })
    }

    /// Opens an existing segment and checks its header.
    pub fn open(name: &str) -> Result<Segment, SegmentError> {
        let shmem = Segment::open_mapping(name)?;
        let bad = |detail: String| SegmentError::BadHeader {
            name: name.to_owned(),
            detail,
        };
        if shmem.len() < HEADER_LEN {
            return Err(bad(format!("only {} bytes long", shmem.len())));
        }
        let seg = Segment {
            shmem,
            name: name.to_owned(),
            populating: Default::default(),
        };
        let h = seg.header();
        if h.magic != SEGMENT_MAGIC {
            return Err(bad("wrong magic".into()));
        }
        if h.layout_version != LAYOUT_VERSION {
            return Err(bad(format!("layout version {}", h.layout_version)));
        }
        if h.header_len as usize != HEADER_LEN
            || h.total_len != seg.shmem.len() as u64
            || h.arena_len + HEADER_LEN as u64 != h.total_len
        {
            return Err(bad("sizes disagree with the mapping".into()));
        }
        Ok(seg)
    }

    /// The segment's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Total mapped size in bytes.
    pub fn len(&self) -> usize {
        self.shmem.len()
    }

    /// Always false: a segment has at least its header.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Size of the slot arena.
    pub fn arena_len(&self) -> usize {
        self.shmem.len() - HEADER_LEN
    }

    /// Whether this handle created the segment (and unlinks it on drop).
    pub fn is_owner(&self) -> bool {
        self.shmem.is_owner()
    }

    /// The shared header.
    pub fn header(&self) -> &SegmentHeader {
        // SAFETY: the mapping is at least HEADER_LEN bytes (checked at open,
        // guaranteed at create) and page aligned; the header was initialised
        // by its creator before the name was handed to anyone. Its mutable
        // fields are atomics, so shared references are sound across processes.
        unsafe { &*self.shmem.as_ptr().cast::<SegmentHeader>() }
    }

    fn check(&self, r: Region) -> Result<(), SegmentError> {
        let arena_len = self.arena_len() as u64;
        match r.offset.checked_add(r.len) {
            Some(end) if end <= arena_len => Ok(()),
            _ => Err(SegmentError::OutOfBounds {
                offset: r.offset,
                len: r.len,
                arena_len,
            }),
        }
    }

    /// The bytes of a region, for reading.
    ///
    /// The caller must own the region under the slot protocol (see module
    /// docs): the dispatcher between allocation and handing the job to a
    /// worker, and again once the worker has answered; the worker while it
    /// runs the job.
    pub fn bytes(&self, r: Region) -> Result<&[u8], SegmentError> {
        self.check(r)?;
        // SAFETY: the region lies inside the mapping (checked above), which
        // lives as long as `self`. No other process writes the region while
        // the caller owns it under the slot protocol.
        Ok(unsafe {
            std::slice::from_raw_parts(
                self.shmem.as_ptr().add(HEADER_LEN + r.offset as usize),
                r.len as usize,
            )
        })
    }

    /// The bytes of a region, for writing in place. Same ownership rule as
    /// [`Segment::bytes`]; in addition the dispatcher's allocator never hands
    /// out overlapping regions, so two live `&mut` never alias.
    #[allow(clippy::mut_from_ref)]
    pub fn bytes_mut(&self, r: Region) -> Result<&mut [u8], SegmentError> {
        self.check(r)?;
        // SAFETY: in bounds (checked above); the mapping outlives the borrow.
        // Exclusivity comes from the slot protocol: one owner per slot at a
        // time, and slots never overlap (TLSF allocator in `alloc`).
        Ok(unsafe {
            std::slice::from_raw_parts_mut(
                self.shmem.as_ptr().add(HEADER_LEN + r.offset as usize),
                r.len as usize,
            )
        })
    }

    /// Fills in this process's page tables for the whole mapping on a
    /// background thread (`MADV_POPULATE_WRITE`), `after` a delay, so that no
    /// request pays a page fault the first time it uses a slot. The delay
    /// keeps the work out of start-up (and so out of recovery time): the
    /// kernel holds the process's memory-map lock while it works. Dropping
    /// the segment before the delay is over cancels it. Best effort: on
    /// kernels before 5.14 the pages fault in on first use.
    pub fn populate_in_background(&self, after: std::time::Duration) {
        if self.populating.borrow().is_some() {
            return;
        }
        let (addr, len) = (self.shmem.as_ptr() as usize, self.shmem.len());
        let (cancel, cancelled) = std::sync::mpsc::channel::<()>();
        let spawned = std::thread::Builder::new()
            .name("osps-populate".into())
            .spawn(move || {
                if cancelled.recv_timeout(after) != Err(std::sync::mpsc::RecvTimeoutError::Timeout)
                {
                    return; // the segment is going away
                }
                // SAFETY: setpriority takes no pointer; it lowers this thread's
                // priority so requests go first.
                unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, 19) };
                // In chunks: the kernel holds the memory-map lock while it works on
                // one, and the process may need it (spawning a worker, allocating);
                // between chunks, a drop of the segment cancels the rest.
                const CHUNK: usize = 8 << 20;
                for start in (0..len).step_by(CHUNK) {
                    if cancelled.try_recv() != Err(std::sync::mpsc::TryRecvError::Empty) {
                        return;
                    }
                    let n = CHUNK.min(len - start);
                    // SAFETY: madvise only fills in the kernel's page tables for a
                    // range of this process's mapping (inside it: start < len and
                    // n <= len - start); it reads or writes no memory through Rust
                    // references. The mapping outlives this thread: `Segment::drop`
                    // signals and joins it before the mapping goes.
                    let rc = unsafe {
                        libc::madvise(
                            (addr + start) as *mut libc::c_void,
                            n,
                            libc::MADV_POPULATE_WRITE,
                        )
                    };
                    if rc != 0 {
                        tracing::debug!("MADV_POPULATE_WRITE: {}", std::io::Error::last_os_error());
                        return;
                    }
                }
            });
        if let Ok(t) = spawned {
            *self.populating.borrow_mut() = Some((cancel, t));
        }
    }

    /// Waits until [`Segment::populate_in_background`] is done.
    pub fn wait_populated(&self) {
        let taken = self.populating.borrow_mut().take();
        if let Some((cancel, t)) = taken {
            let _ = t.join();
            drop(cancel);
        }
    }

    /// Stops this handle from unlinking the name on drop (e.g. after fork).
    pub fn disown(&mut self) {
        self.shmem.disown();
    }
}

/// Counters updated in the header.
impl SegmentHeader {
    /// Adds one to the completed-jobs counter.
    pub fn count_job(&self) {
        self.jobs_done.fetch_add(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(tag: &str) -> String {
        format!("/osps-unit-{}-{tag}", std::process::id())
    }

    /// The same segment name for each backend: every segment test runs on both.
    fn both(tag: &str) -> [String; 2] {
        [name(tag), format!("{SYSV_PREFIX}{}", name(tag))]
    }

    /// Permission bits of a segment, as its backend reports them.
    fn mode_of(seg: &Segment) -> u32 {
        use std::os::unix::fs::PermissionsExt;
        match seg.sysv_info() {
            Some(info) => info.mode,
            None => {
                std::fs::metadata(fs_path(seg.name()))
                    .unwrap()
                    .permissions()
                    .mode()
                    & 0o777
            }
        }
    }

    #[test]
    fn create_open_share_and_unlink() {
        for n in both("share") {
            share_and_unlink(&n);
        }
    }

    fn share_and_unlink(n: &str) {
        let n = n.to_owned();
        let seg = Segment::create(&n, 1 << 20, 7).unwrap();
        assert!(exists(&n), "{n}");
        let r = Region {
            offset: 4096,
            len: 5,
        };
        seg.bytes_mut(r).unwrap().copy_from_slice(b"hello");
        let other = Segment::open(&n).unwrap();
        assert!(!other.is_owner());
        assert_eq!(other.bytes(r).unwrap(), b"hello");
        assert_eq!(other.header().generation.load(Ordering::Relaxed), 7);
        assert_eq!(
            other.header().owner_pid.load(Ordering::Relaxed),
            std::process::id()
        );
        other.bytes_mut(r).unwrap().copy_from_slice(b"HELLO");
        assert_eq!(seg.bytes(r).unwrap(), b"HELLO");
        other.header().count_job();
        assert_eq!(seg.header().jobs_done.load(Ordering::Relaxed), 1);
        drop(other);
        assert!(exists(&n), "a reader must not unlink {n}");
        drop(seg);
        assert!(!exists(&n), "the creator unlinks {n}");
        assert!(matches!(Segment::open(&n), Err(SegmentError::Open { .. })));
    }

    #[test]
    fn mode_is_0600_and_names_are_exclusive() {
        for n in both("mode") {
            let old = nix::sys::stat::umask(nix::sys::stat::Mode::empty());
            let seg = Segment::create(&n, 4096, 1);
            nix::sys::stat::umask(old);
            let seg = seg.unwrap();
            assert_eq!(mode_of(&seg), 0o600, "{n} under umask 000");
            assert!(
                matches!(
                    Segment::create(&n, 4096, 1),
                    Err(SegmentError::Exists { .. })
                ),
                "{n}"
            );
            drop(seg);
            assert!(!exists(&n));
        }
    }

    #[test]
    fn a_sysv_segment_is_listed_by_the_kernel_with_its_attachments() {
        let n = format!("{SYSV_PREFIX}{}", name("ipcs"));
        let seg = Segment::create(&n, 4096, 1).unwrap();
        let info = seg.sysv_info().expect("sysv");
        assert_eq!((info.key, info.mode, info.nattch), (sysv_key(&n), 0o600, 1));
        let table = std::fs::read_to_string("/proc/sysvipc/shm").unwrap();
        assert!(
            table
                .lines()
                .any(|l| l.split_whitespace().next() == Some(&info.key.to_string())),
            "key {} not in /proc/sysvipc/shm",
            info.key
        );
        let other = Segment::open(&n).unwrap();
        assert_eq!(other.sysv_info().unwrap().nattch, 2);
        drop(other);
        drop(seg);
        let table = std::fs::read_to_string("/proc/sysvipc/shm").unwrap();
        assert!(
            !table
                .lines()
                .any(|l| l.split_whitespace().next() == Some(&info.key.to_string())),
            "removed on drop"
        );
    }

    #[test]
    fn a_segment_larger_than_dev_shm_is_refused_at_creation_and_leaves_nothing() {
        let n = name("huge");
        let fs = nix::sys::statvfs::statvfs("/dev/shm").unwrap();
        let size = (fs.blocks_available() as u64 * fs.fragment_size() as u64 + (1 << 20)) as usize; // more than there is
        match Segment::create(&n, size, 1) {
            Err(SegmentError::NoSpace { available, .. }) => assert!(available < size as u64),
            other => panic!("expected NoSpace, got {other:?}"),
        }
        assert!(
            !std::path::Path::new(&fs_path(&n)).exists(),
            "the failed segment is unlinked"
        );
    }

    #[test]
    fn populating_maps_every_page_so_first_use_takes_no_fault() {
        for n in both("populate") {
            populate(&n);
        }
    }

    fn populate(n: &str) {
        let seg = Segment::create(n, 8 << 20, 1).unwrap();
        seg.populate_in_background(std::time::Duration::ZERO);
        seg.wait_populated();
        let faults = || -> u64 {
            let stat = std::fs::read_to_string("/proc/thread-self/stat").unwrap();
            stat[stat.rfind(')').unwrap() + 2..]
                .split(' ')
                .nth(7)
                .unwrap()
                .parse()
                .unwrap()
        };
        let before = faults();
        seg.bytes_mut(Region {
            offset: 0,
            len: 8 << 20,
        })
        .unwrap()
        .fill(1);
        let taken = faults() - before;
        assert!(
            taken < 64,
            "{taken} minor faults writing 2048 populated pages"
        );
    }

    #[test]
    fn out_of_bounds_regions_are_refused() {
        for n in both("bounds") {
            bounds(&n);
        }
    }

    fn bounds(n: &str) {
        let seg = Segment::create(n, 8192, 1).unwrap();
        assert!(seg
            .bytes(Region {
                offset: 8192,
                len: 1
            })
            .is_err());
        assert!(seg
            .bytes(Region {
                offset: u64::MAX,
                len: 2
            })
            .is_err());
        assert!(seg
            .bytes(Region {
                offset: 0,
                len: 8192
            })
            .is_ok());
    }

    #[test]
    fn only_our_own_segments_are_removed_and_none_is_opened() {
        use std::os::unix::fs::MetadataExt;
        for n in both("ours") {
            let mut seg = Segment::create(&n, 4096, 1).unwrap();
            seg.disown();
            drop(seg);
            assert_eq!(remove_if_ours(&n), Removal::Removed, "{n}");
            assert_eq!(remove_if_ours(&n), Removal::Absent, "{n}");
        }
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped the foreign half: making another uid's file needs root");
            return;
        }
        // Another uid's file under the name (a squatter's): left as it is.
        let n = name("theirs");
        let path = fs_path(&n);
        std::fs::write(&path, b"not ours").unwrap();
        std::os::unix::fs::chown(&path, Some(65534), Some(65534)).unwrap();
        assert_eq!(remove_if_ours(&n), Removal::Foreign { uid: 65534 });
        assert_eq!(std::fs::read(&path).unwrap(), b"not ours");
        assert_eq!(std::fs::metadata(&path).unwrap().uid(), 65534);
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn a_foreign_object_is_not_taken_for_a_segment() {
        let n = name("foreign");
        let mut other = ShmemConf::new()
            .os_id(&n)
            .size(HEADER_LEN * 2)
            .create()
            .unwrap();
        assert!(matches!(
            Segment::open(&n),
            Err(SegmentError::BadHeader { .. })
        ));
        other.set_owner(true);
        assert!(unlink(&n) || !std::path::Path::new(&fs_path(&n)).exists());
    }
}
