//! The shared-memory segment: a fixed header followed by the slot arena.
//!
//! The dispatcher creates it (mode 0600, set explicitly, exclusively under a
//! fresh random name) and is its only allocator; workers open it by the name
//! the dispatcher gives them. A start never opens nor maps an object it finds:
//! a dead predecessor's segment is removed with [`remove_if_ours`]. Ownership
//! of a slot passes with the message that names it, so no cross-process lock
//! guards the bytes. This is the one module with `unsafe` code.
//!
//! Layers, bottom up: a [`Backend`] (POSIX or System V, each one private
//! type behind the small `Shm`/`Map` traits) makes, opens and removes the
//! object; [`Segment`] is the mapping, its header and its bounds, whatever
//! the backend; [`Arena`] is the creator's side, the segment together with
//! its slot allocator. Bytes are reached only in these ways:
//!
//! - the dispatcher: [`Arena::bytes`]/[`Arena::bytes_mut`], through a
//!   [`Slot`] of that arena (not `Clone`; `&mut Slot` for writing), so two
//!   live `&mut` to one byte cannot exist in the process;
//! - a worker: [`Segment::claim`] (`&mut self`: one slot view at a time) once
//!   a job's input is all in, or [`Segment::claims`] (itself `&mut self`,
//!   as is each [`Claims::claim`]) for several disjoint regions at once (a
//!   job's slot and the result areas the dispatcher gives it), and [`Segment::copy_out`] for a prefix that is still arriving (a
//!   raw copy bounded by the announced length: no reference to bytes another
//!   process writes).
//!
//! A [`Region`] is a range checked against the arena; it carries no access.

use std::cell::RefCell;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use shared_memory::{Shmem, ShmemConf, ShmemError};

use crate::alloc::{AllocError, Slot, SlotAllocator};
use crate::status::SegmentStatus;

/// Magic at the start of the header.
pub const SEGMENT_MAGIC: [u8; 8] = *b"OSPSSEG\0";
/// Version of the header layout below; bumped on any change (2: the unread
/// dispatcher heartbeat word was removed).
pub const LAYOUT_VERSION: u32 = 2;
/// Bytes reserved for the header; the arena starts here (page aligned).
pub const HEADER_LEN: usize = 4096;

/// A byte range of the arena (offsets from the arena's start). Made only by
/// the allocator (a [`Slot`]'s region) or by [`Segment::check`], so it lies
/// inside an arena; it gives no access to bytes by itself. On the wire it
/// travels as [`crate::proto::WireRegion`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Region {
    offset: u64,
    len: u64,
}

impl Region {
    /// For the allocator, whose blocks lie inside its arena by construction.
    pub(crate) fn new(offset: u64, len: u64) -> Region {
        Region { offset, len }
    }

    /// Offset from the start of the arena.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// Length in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the region has no bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// The header at the start of the segment. `#[repr(C)]`, no pointers, fixed
/// size: every process sees the same layout. Counters are atomics so any
/// process can read them while another updates them.
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
    /// Jobs the workers ran to the end (any outcome) since the segment was
    /// built, counted by the workers themselves (status: `segment.jobs_run`).
    pub jobs_done: AtomicU64,
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
    #[error("a slot of another arena was used with the arena of segment {name}")]
    ForeignSlot { name: String },
    #[error("region {offset}+{len} overlaps a region claimed already (a job's slot and result areas are disjoint)")]
    Overlaps { offset: u64, len: u64 },
    #[error(
        "segment {name} was opened, not created, by this process: only its creator allocates in it"
    )]
    NotCreator { name: String },
    #[error("segment {name} is mapped in this process already (a process keeps one handle to a segment, so no two views of its bytes alias)")]
    MappedTwice { name: String },
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
    #[error("cannot give segment {name} to uid {uid}: {source}")]
    Give {
        name: String,
        uid: u32,
        #[source]
        source: std::io::Error,
    },
}

/// Names that start with this select the System V backend (`shmget`, listed
/// by `ipcs -m`); other names are POSIX (`shm_open`, under `/dev/shm`).
pub const SYSV_PREFIX: &str = "sysv:";

/// The kind of shared memory a segment lives in. Its name says which: a
/// name that starts with [`SYSV_PREFIX`] is System V, any other POSIX (the
/// format of state files and of `--segment NAME`). Adding a backend means a
/// variant here and one private type implementing `Shm` and `Map` below.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Backend {
    /// `shm_open`, under `/dev/shm`.
    #[default]
    Posix,
    /// `shmget`, listed by `ipcs -m`; its key derives from the name.
    SysV,
}

impl Backend {
    /// Every backend.
    pub const ALL: [Backend; 2] = [Backend::Posix, Backend::SysV];

    /// The backend a segment name selects.
    pub fn of(name: &str) -> Backend {
        if name.starts_with(SYSV_PREFIX) {
            Backend::SysV
        } else {
            Backend::Posix
        }
    }

    /// Its name on the command line (`--segment`) and in the status report.
    pub fn as_str(self) -> &'static str {
        match self {
            Backend::Posix => "posix",
            Backend::SysV => "sysv",
        }
    }

    /// The segment name that selects this backend for a POSIX-style `base` name.
    pub fn segment_name(self, base: &str) -> String {
        match self {
            Backend::Posix => base.to_owned(),
            Backend::SysV => format!("{SYSV_PREFIX}{base}"),
        }
    }

    /// A segment name without what selects its backend: the inverse of
    /// [`Backend::segment_name`].
    pub fn base_name(name: &str) -> &str {
        name.strip_prefix(SYSV_PREFIX).unwrap_or(name)
    }

    fn imp(self) -> &'static dyn Shm {
        match self {
            Backend::Posix => &PosixShm,
            Backend::SysV => &SysvShm,
        }
    }
}

impl std::fmt::Display for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Backend {
    type Err = String;

    fn from_str(s: &str) -> Result<Backend, String> {
        Backend::ALL
            .into_iter()
            .find(|b| b.as_str() == s)
            .ok_or_else(|| format!("unknown segment backend {s:?} (posix or sysv)"))
    }
}

/// What one backend does with names: the only backend-specific code, with
/// [`Map`]. Everything above it (header, bounds, slots) is the same for all.
trait Shm {
    /// Makes the object `name` of `size` bytes, mode 0600 exactly,
    /// [`SegmentError::Exists`] if the name is taken; the mapping owns it.
    fn create(&self, name: &str, size: usize) -> Result<Box<dyn Map>, SegmentError>;
    /// Maps an existing object.
    fn open(&self, name: &str) -> Result<Box<dyn Map>, SegmentError>;
    /// Removes the object; whether one was there.
    fn unlink(&self, name: &str) -> bool;
    /// Removes the object only if `euid` owns it, without mapping it.
    fn remove_if_ours(&self, name: &str, euid: u32, owner: u32) -> Removal;
    /// Gives the object (made by this process, not yet shared) to `uid`/`gid`.
    fn give(&self, name: &str, id: &dyn Map, uid: u32, gid: u32) -> std::io::Result<()>;
    /// Whether an object of that name exists.
    fn exists(&self, name: &str) -> bool;
}

/// A backend's live mapping: removed by its owner on drop.
trait Map {
    fn as_ptr(&self) -> *mut u8;
    fn len(&self) -> usize;
    fn is_owner(&self) -> bool;
    fn disown(&mut self);
    /// What the system says of the object now.
    fn describe(&self, name: &str) -> Described;
    /// Which object this maps, the same for every mapping of it in the
    /// process whatever name reached it.
    fn identity(&self, name: &str) -> String;
    /// The System V id, for a System V mapping.
    fn sysv_id(&self) -> Option<i32> {
        None
    }
}

/// A backend's description of its object (the backend-neutral part of
/// [`SegmentStatus`]).
struct Described {
    path: String,
    see: String,
    mode: Option<u32>,
    owner_uid: Option<u32>,
    /// Processes attached, when the system counts them.
    attached: Option<usize>,
}

/// The System V key of a segment name (with or without [`SYSV_PREFIX`]):
/// a stable hash, positive and never `IPC_PRIVATE`.
pub fn sysv_key(name: &str) -> i32 {
    let base = name.strip_prefix(SYSV_PREFIX).unwrap_or(name);
    let h = base.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    });
    ((h as u32) & 0x7fff_ffff).max(1) as i32
}

/// The POSIX backend: `shm_open` objects under `/dev/shm`.
struct PosixShm;

/// A POSIX mapping (the `shared_memory` crate unlinks an owner's on drop).
struct PosixMap(Shmem);

impl Map for PosixMap {
    fn as_ptr(&self) -> *mut u8 {
        self.0.as_ptr()
    }

    fn len(&self) -> usize {
        self.0.len()
    }

    fn is_owner(&self) -> bool {
        self.0.is_owner()
    }

    fn disown(&mut self) {
        self.0.set_owner(false);
    }

    fn describe(&self, name: &str) -> Described {
        use std::os::unix::fs::MetadataExt;
        let path = fs_path(name);
        let meta = std::fs::metadata(&path).ok();
        Described {
            see: format!("ls -l {path}"),
            mode: meta.as_ref().map(|m| m.mode() & 0o7777),
            owner_uid: meta.as_ref().map(|m| m.uid()),
            attached: None,
            path,
        }
    }

    fn identity(&self, name: &str) -> String {
        use std::os::unix::fs::MetadataExt;
        match std::fs::metadata(fs_path(name)) {
            Ok(m) => format!("posix {}:{}", m.dev(), m.ino()),
            Err(_) => format!("posix {}", name.trim_start_matches('/')),
        }
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

impl Shm for PosixShm {
    fn create(&self, name: &str, size: usize) -> Result<Box<dyn Map>, SegmentError> {
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
        // Owned from here: an error below drops (and so unlinks) it.
        let map = PosixMap(shmem);
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
        Ok(Box::new(map))
    }

    fn open(&self, name: &str) -> Result<Box<dyn Map>, SegmentError> {
        let shmem = ShmemConf::new()
            .os_id(name)
            .open()
            .map_err(|e| SegmentError::Open {
                name: name.to_owned(),
                detail: shm_detail(e),
            })?;
        Ok(Box::new(PosixMap(shmem)))
    }

    fn unlink(&self, name: &str) -> bool {
        nix::sys::mman::shm_unlink(name).is_ok()
    }

    /// The `/dev/shm` entry is `lstat`ed: a regular file of `owner` (`/dev/shm`
    /// is sticky, so only its owner can swap it before the unlink).
    fn remove_if_ours(&self, name: &str, _euid: u32, owner: u32) -> Removal {
        use std::os::unix::fs::MetadataExt;
        match std::fs::symlink_metadata(fs_path(name)) {
            Err(_) => Removal::Absent,
            Ok(m) if !m.file_type().is_file() || m.uid() != owner => {
                Removal::Foreign { uid: m.uid() }
            }
            Ok(_) => {
                if nix::sys::mman::shm_unlink(name).is_ok() {
                    Removal::Removed
                } else {
                    Removal::Absent
                }
            }
        }
    }

    fn exists(&self, name: &str) -> bool {
        std::path::Path::new(&fs_path(name)).exists()
    }

    /// `lchown` of the `/dev/shm` entry this process just made (exclusively,
    /// in a sticky directory: nobody else can have swapped it).
    fn give(&self, name: &str, _map: &dyn Map, uid: u32, gid: u32) -> std::io::Result<()> {
        std::os::unix::fs::lchown(fs_path(name), Some(uid), Some(gid))
    }
}

/// The System V backend: `shmget` objects keyed by [`sysv_key`].
struct SysvShm;

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

impl Map for SysvMap {
    fn as_ptr(&self) -> *mut u8 {
        self.addr
    }

    fn len(&self) -> usize {
        self.len
    }

    fn is_owner(&self) -> bool {
        self.owner
    }

    fn disown(&mut self) {
        self.owner = false;
    }

    fn describe(&self, name: &str) -> Described {
        let ds = sysv_stat(self.id).ok();
        Described {
            path: String::new(),
            see: format!("ipcs -m -i {} (key 0x{:08x})", self.id, sysv_key(name)),
            mode: ds.map(|d| d.shm_perm.mode as u32 & 0o777),
            owner_uid: ds.map(|d| d.shm_perm.uid),
            attached: ds.map(|d| d.shm_nattch as usize),
        }
    }

    fn identity(&self, _name: &str) -> String {
        format!("sysv {}", self.id)
    }

    fn sysv_id(&self) -> Option<i32> {
        Some(self.id)
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

/// The id of the System V object of that name, if there is one.
fn sysv_id(name: &str) -> Option<i32> {
    // SAFETY: shmget takes no buffer.
    let id = unsafe { libc::shmget(sysv_key(name), 0, 0) };
    (id >= 0).then_some(id)
}

fn sysv_remove(id: i32) -> bool {
    // SAFETY: shmctl(IPC_RMID) takes no buffer.
    unsafe { libc::shmctl(id, libc::IPC_RMID, std::ptr::null_mut()) == 0 }
}

impl Shm for SysvShm {
    fn create(&self, name: &str, size: usize) -> Result<Box<dyn Map>, SegmentError> {
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
                sysv_remove(id); // ours, just made
                return Err(err(e));
            }
        };
        Ok(Box::new(SysvMap {
            id,
            addr,
            len: size,
            owner: true,
        }))
    }

    fn open(&self, name: &str) -> Result<Box<dyn Map>, SegmentError> {
        let open_err = |detail: String| SegmentError::Open {
            name: name.to_owned(),
            detail,
        };
        let id =
            sysv_id(name).ok_or_else(|| open_err(std::io::Error::last_os_error().to_string()))?;
        let len = sysv_stat(id)
            .map_err(|e| open_err(e.to_string()))?
            .shm_segsz;
        let addr = sysv_attach(id).map_err(|e| open_err(e.to_string()))?;
        Ok(Box::new(SysvMap {
            id,
            addr,
            len,
            owner: false,
        }))
    }

    fn unlink(&self, name: &str) -> bool {
        sysv_id(name).is_some_and(sysv_remove)
    }

    /// The kernel's `IPC_STAT` must name us as creator before `IPC_RMID`:
    /// the creator is the kernel's record, which no other uid can change
    /// (the owner, `owner` when we gave it to a pool's user, can: it is not
    /// what decides).
    fn remove_if_ours(&self, name: &str, euid: u32, _owner: u32) -> Removal {
        let Some(ds) = sysv_id(name).and_then(|id| Some((id, sysv_stat(id).ok()?))) else {
            return Removal::Absent;
        };
        let (id, ds) = ds;
        if ds.shm_perm.cuid != euid {
            return Removal::Foreign {
                uid: ds.shm_perm.cuid,
            };
        }
        if sysv_remove(id) {
            Removal::Removed
        } else {
            Removal::Absent
        }
    }

    fn exists(&self, name: &str) -> bool {
        sysv_id(name).is_some()
    }

    /// `IPC_SET` of the owner (the creator stays this process's uid).
    fn give(&self, _name: &str, map: &dyn Map, uid: u32, gid: u32) -> std::io::Result<()> {
        let id = map
            .sysv_id()
            .ok_or_else(|| std::io::Error::other("not a System V mapping"))?;
        let mut ds = sysv_stat(id)?;
        ds.shm_perm.uid = uid;
        ds.shm_perm.gid = gid;
        // SAFETY: `ds` is a valid shmid_ds (from IPC_STAT) that IPC_SET only reads.
        if unsafe { libc::shmctl(id, libc::IPC_SET, &mut ds) } == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    }
}

/// Removes a segment by name (either backend); returns whether one was there.
/// For tests and clean-up of names known to be ours; a start uses
/// [`remove_if_ours`].
pub fn unlink(name: &str) -> bool {
    Backend::of(name).imp().unlink(name)
}

/// What [`remove_if_ours`] found under a name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Removal {
    /// Nothing of that name.
    Absent,
    /// Ours: removed.
    Removed,
    /// Someone else's (its owner's uid, or for System V its creator's), or
    /// not a plain segment: left alone.
    Foreign { uid: u32 },
}

/// Removes a segment by name (either backend) only if it belongs to this
/// process's effective uid, without ever opening or mapping it: for POSIX
/// the `/dev/shm` entry is `lstat`ed (a regular file of ours; `/dev/shm` is
/// sticky, so nobody else can swap it before the unlink), for System V the
/// kernel's `IPC_STAT` must name us as creator before `IPC_RMID`.
pub fn remove_if_ours(name: &str) -> Removal {
    let euid = nix::unistd::geteuid().as_raw();
    Backend::of(name).imp().remove_if_ours(name, euid, euid)
}

/// [`remove_if_ours`] of a segment this uid made and gave to `owner` (a
/// pool's `user`): for POSIX a regular file owned by `owner`, for System V
/// created by us (whoever owns it now: its owner may have changed that).
pub fn remove_if_given(name: &str, owner: u32) -> Removal {
    let euid = nix::unistd::geteuid().as_raw();
    Backend::of(name).imp().remove_if_ours(name, euid, owner)
}

/// Whether a segment of that name exists (either backend).
pub fn exists(name: &str) -> bool {
    Backend::of(name).imp().exists(name)
}

/// Where a POSIX segment name shows up in the file system.
pub fn fs_path(name: &str) -> String {
    format!("/dev/shm/{}", name.trim_start_matches('/'))
}

/// The segments this process maps, by [`Map::identity`], and how many
/// handles (at most one: [`Segment::open`] refuses a second), so no second
/// mapping can alias the bytes a handle lends out (an [`Arena`]'s slots, a
/// worker's [`Segment::claim`]).
static MAPPED: std::sync::Mutex<Vec<Mapped>> = std::sync::Mutex::new(Vec::new());

#[derive(Debug)]
struct Mapped {
    identity: String,
    handles: usize,
}

/// Runs `f` on the register entry of `identity` (made if missing, removed
/// once no handle is left).
fn with_mapped<T>(identity: &str, f: impl FnOnce(&mut Mapped) -> T) -> T {
    let mut all = MAPPED.lock().unwrap_or_else(|e| e.into_inner());
    let at = match all.iter().position(|m| m.identity == identity) {
        Some(at) => at,
        None => {
            all.push(Mapped {
                identity: identity.to_owned(),
                handles: 0,
            });
            all.len() - 1
        }
    };
    let out = f(&mut all[at]);
    if all[at].handles == 0 {
        all.swap_remove(at);
    }
    out
}

/// A mapped segment. Dropping the creator's handle unlinks the name.
pub struct Segment {
    map: Box<dyn Map>,
    name: String,
    /// Made by this handle (an [`Arena`] may be built on it), even once disowned.
    created: bool,
    /// Its entry in the process's register of mapped segments.
    identity: String,
    /// A thread filling in this process's page tables for the mapping, and
    /// the sender whose drop cancels it if it has not started yet.
    populating: RefCell<Option<(std::sync::mpsc::Sender<()>, std::thread::JoinHandle<()>)>>,
}

impl Drop for Segment {
    fn drop(&mut self) {
        // The populating thread works on our mapping: it must be done before
        // the mapping goes (the `map` field is dropped after this).
        if let Some((cancel, t)) = self.populating.get_mut().take() {
            drop(cancel);
            let _ = t.join();
        }
        with_mapped(&self.identity, |m| m.handles -= 1);
    }
}

impl std::fmt::Debug for Segment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Segment")
            .field("name", &self.name)
            .field("len", &self.map.len())
            .field("owner", &self.map.is_owner())
            .field("backend", &self.backend())
            .finish()
    }
}

impl Segment {
    /// Creates a segment named `name` (e.g. `/osps-1000-default`; the
    /// [`Backend`] follows from it) with an arena of `arena_len` bytes, mode
    /// 0600 whatever the umask, and writes its header. Fails with
    /// [`SegmentError::Exists`] if the name is taken.
    pub fn create(name: &str, arena_len: usize, generation: u64) -> Result<Segment, SegmentError> {
        let size = HEADER_LEN + arena_len;
        let map = Backend::of(name).imp().create(name, size)?;
        let identity = map.identity(name);
        with_mapped(&identity, |m| m.handles += 1);
        let seg = Segment {
            map,
            name: name.to_owned(),
            created: true,
            identity,
            populating: Default::default(),
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
        };
        // SAFETY: the mapping is at least HEADER_LEN bytes, page aligned (so
        // aligned for SegmentHeader), freshly created and not yet shared with
        // any other process, so this write races with nothing.
        unsafe { std::ptr::write(seg.map.as_ptr().cast::<SegmentHeader>(), header) };
        Ok(seg)
    }

    /// Gives a segment this process just created (before its name is
    /// handed to anyone) to `uid` and `gid`, keeping its mode 0600: its
    /// owner and root alone can open it. For a pool whose workers run as
    /// another user.
    pub fn give_to(&self, uid: u32, gid: u32) -> Result<(), SegmentError> {
        let imp = self.backend().imp();
        imp.give(&self.name, self.map.as_ref(), uid, gid)
            .map_err(|source| SegmentError::Give {
                name: self.name.clone(),
                uid,
                source,
            })
    }

    /// Opens an existing segment and checks its header. A process maps a
    /// segment once: opening one this process has mapped already (created,
    /// or opened and not yet dropped) fails with
    /// [`SegmentError::MappedTwice`], so that no two handles here can give
    /// views of the same bytes at two addresses (see [`Segment::claim`]).
    pub fn open(name: &str) -> Result<Segment, SegmentError> {
        let map = Backend::of(name).imp().open(name)?;
        let identity = map.identity(name);
        let first = with_mapped(&identity, |m| {
            m.handles += 1;
            m.handles == 1
        });
        // From here the handle is counted: dropping `seg` (on any return)
        // counts it out again.
        let seg = Segment {
            map,
            name: name.to_owned(),
            created: false,
            identity,
            populating: Default::default(),
        };
        if !first {
            return Err(SegmentError::MappedTwice {
                name: name.to_owned(),
            });
        }
        let bad = |detail: String| SegmentError::BadHeader {
            name: name.to_owned(),
            detail,
        };
        if seg.map.len() < HEADER_LEN {
            return Err(bad(format!("only {} bytes long", seg.map.len())));
        }
        let h = seg.header();
        if h.magic != SEGMENT_MAGIC {
            return Err(bad("wrong magic".into()));
        }
        if h.layout_version != LAYOUT_VERSION {
            return Err(bad(format!("layout version {}", h.layout_version)));
        }
        if h.header_len as usize != HEADER_LEN
            || h.total_len != seg.map.len() as u64
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

    /// The kind of shared memory it lives in.
    pub fn backend(&self) -> Backend {
        Backend::of(&self.name)
    }

    /// Total mapped size in bytes.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Always false: a segment has at least its header.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Size of the slot arena.
    pub fn arena_len(&self) -> usize {
        self.map.len() - HEADER_LEN
    }

    /// Whether this handle created the segment (and unlinks it on drop).
    pub fn is_owner(&self) -> bool {
        self.map.is_owner()
    }

    /// The shared header.
    pub fn header(&self) -> &SegmentHeader {
        // SAFETY: the mapping is at least HEADER_LEN bytes (checked at open,
        // guaranteed at create) and page aligned; the header was initialised
        // by its creator before the name was handed to anyone. Its mutable
        // fields are atomics, so shared references are sound across processes.
        unsafe { &*self.map.as_ptr().cast::<SegmentHeader>() }
    }

    /// The region `offset`..`offset + len` of the arena, if it lies inside
    /// (how a worker turns a job frame's numbers into a [`Region`]).
    pub fn check(&self, offset: u64, len: u64) -> Result<Region, SegmentError> {
        let arena_len = self.arena_len() as u64;
        match offset.checked_add(len) {
            Some(end) if end <= arena_len => Ok(Region { offset, len }),
            _ => Err(SegmentError::OutOfBounds {
                offset,
                len,
                arena_len,
            }),
        }
    }

    /// The address of a region's first byte, after checking it lies in this
    /// segment's arena (a region of another segment may not).
    fn start_of(&self, r: Region) -> Result<*mut u8, SegmentError> {
        self.check(r.offset, r.len)?;
        // SAFETY: HEADER_LEN + offset + len <= the mapping's length (checked
        // above), so the pointer stays inside the mapping.
        Ok(unsafe { self.map.as_ptr().add(HEADER_LEN + r.offset as usize) })
    }

    /// A worker's view of the slot its running job names, for reading and
    /// writing in place, once the job's input is all in. `&mut self`: one
    /// view at a time in this process, and none while [`Segment::copy_out`]
    /// runs. Other processes keep out under the slot protocol: the slot is
    /// the worker's from its `Job` frame (with all input announced) until
    /// its `JobDone`.
    pub fn claim(&mut self, slot: Region) -> Result<&mut [u8], SegmentError> {
        let start = self.start_of(slot)?;
        // SAFETY: in bounds (start_of); the mapping outlives the borrow of
        // `self`, which is exclusive, so this process holds no other
        // reference into the segment's arena meanwhile.
        Ok(unsafe { std::slice::from_raw_parts_mut(start, slot.len as usize) })
    }

    /// A way to claim several regions at once, each as its own `&mut [u8]`,
    /// for as long as the segment stays borrowed: a worker's view of its
    /// job's slot and of the result areas given to it while it runs.
    /// [`Claims::claim`] refuses a region overlapping one claimed before, so
    /// no two views alias.
    pub fn claims(&mut self) -> Claims<'_> {
        Claims {
            segment: self,
            taken: Vec::new(),
        }
    }

    /// Copies bytes `from..` of `slot` into `dst`, but none at or past
    /// `announced` (how much of the slot its writer has said is in place):
    /// the way to read a prefix that another process is still extending.
    /// Returns how many bytes were copied (0 once `from` reaches `announced`).
    /// The bytes are copied through a raw pointer, never a reference:
    /// another process may write the slot meanwhile (past `announced`, if
    /// the caller is right about it; if it is not, the copy may hold torn
    /// bytes, but no Rust reference is ever made to memory under a writer).
    /// A plain copy rather than volatile loads: these bytes are read once,
    /// into private memory, and a volatile copy (a word at a time) made a
    /// streamed 64 MiB `sha256` 12% slower. `&mut self`, like
    /// [`Segment::claim`]: no reference into the arena lives in this
    /// process meanwhile.
    pub fn copy_out(
        &mut self,
        slot: Region,
        from: u64,
        announced: u64,
        dst: &mut [u8],
    ) -> Result<usize, SegmentError> {
        let start = self.start_of(slot)?;
        let end = announced.min(slot.len);
        let n = end.saturating_sub(from).min(dst.len() as u64) as usize;
        if n > 0 {
            // SAFETY: from + n <= slot.len (n is bounded by end - from, end
            // by slot.len), inside the mapping (start_of). The source is read
            // through a raw pointer into private memory (`dst`, which cannot
            // overlap the mapping), never through a reference; if another
            // process writes some of those bytes meanwhile (the caller is
            // wrong about `announced`), the copy holds torn bytes.
            unsafe { std::ptr::copy_nonoverlapping(start.add(from as usize), dst.as_mut_ptr(), n) };
        }
        Ok(n)
    }

    /// What the system says of the segment now, whatever its backend: the
    /// segment half of the status report (`slots_*` and `max_payload` are
    /// left 0 for the allocator's owner to fill in). `attached_here` is how
    /// many processes the caller knows to have it mapped, reported where the
    /// backend does not count them itself.
    pub fn describe(&self, attached_here: usize) -> SegmentStatus {
        let d = self.map.describe(&self.name);
        SegmentStatus {
            backend: self.backend().as_str().into(),
            name: self.name.clone(),
            path: d.path,
            see: d.see,
            size: self.len() as u64,
            generation: self.header().generation.load(Ordering::Relaxed),
            jobs_run: self.header().jobs_done.load(Ordering::Relaxed),
            slots_in_use: 0,
            slot_bytes_in_use: 0,
            max_payload: 0,
            mode: d.mode.map_or("?".into(), |m| format!("{m:04o}")),
            owner_uid: d.owner_uid.unwrap_or(u32::MAX),
            attached: d.attached.unwrap_or(attached_here),
        }
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
        let (addr, len) = (self.map.as_ptr() as usize, self.map.len());
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

    /// Drops this process's page-table entries for the arena
    /// (`MADV_DONTNEED`), and nothing else: the pages and their bytes stay
    /// in the segment, for every process, and the next touch here maps the
    /// same page again (a minor fault). What it saves is the kernel's work
    /// when this process dies: it tears down the process's page tables
    /// before it closes its files, so a killed worker that kept the whole
    /// arena mapped (65,536 entries for 256 MiB) is seen dead, by EOF on its
    /// pipe, milliseconds late. The header's page is left mapped (every job
    /// touches it). A fill in progress ([`Segment::populate_in_background`])
    /// may map some pages again.
    pub fn drop_page_tables(&self) -> std::io::Result<()> {
        // From the first page boundary at or after the header (the header
        // is one page where pages are 4 KiB; where they are larger, the
        // arena's first bytes share the header's page and stay mapped).
        let page = nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
            .ok()
            .flatten()
            .map_or(HEADER_LEN, |p| p as usize);
        let start = HEADER_LEN.next_multiple_of(page);
        if start >= self.map.len() {
            return Ok(());
        }
        // SAFETY: the range is start..len of this mapping: inside it, and
        // page aligned (start is a multiple of the page size, and so is the
        // mapping's address). Both backends map the segment MAP_SHARED over
        // a shmem object (POSIX shm_open + mmap MAP_SHARED; System V shmat),
        // and nothing here locks or remaps it. For a shared mapping of
        // shmem, MADV_DONTNEED only removes this process's page-table
        // entries: the pages belong to the object and keep their bytes
        // (unlike a private mapping, where it would throw away copy-on-write
        // copies). So no byte any reference can reach changes: a
        // `&[u8]`/`&mut [u8]` from a claim or an arena slot, or the header,
        // alive in this process (on this or another thread) reads the same
        // bytes after it, the same page faulting back in, and a write made
        // before it is in the page. It is what the kernel may do to such a
        // mapping at any time anyway (reclaim unmaps shmem pages); it reads
        // or writes no memory through Rust references.
        let rc = unsafe {
            libc::madvise(
                self.map.as_ptr().add(start).cast::<libc::c_void>(),
                self.map.len() - start,
                libc::MADV_DONTNEED,
            )
        };
        if rc == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
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
        self.map.disown();
    }
}

/// Counters updated in the header.
/// Disjoint views of a segment's regions, from [`Segment::claims`]. It
/// holds the segment's exclusive borrow, so this process makes no other
/// view of the arena while any view it gave lives.
pub struct Claims<'s> {
    segment: &'s mut Segment,
    /// The regions given so far.
    taken: Vec<Region>,
}

impl std::fmt::Debug for Claims<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Claims")
            .field("segment", &self.segment.name)
            .field("taken", &self.taken)
            .finish()
    }
}

impl<'s> Claims<'s> {
    /// The region `offset`..`offset + len` of the arena, if it lies inside
    /// (as [`Segment::check`]).
    pub fn check(&self, offset: u64, len: u64) -> Result<Region, SegmentError> {
        self.segment.check(offset, len)
    }

    /// A view of `region` for reading and writing, valid as long as the
    /// segment's borrow (not this `Claims`'s: the views outlive it): the
    /// worker's under the slot protocol (its job's slot, or a result area
    /// the dispatcher gave). Fails if it lies outside the arena or overlaps
    /// a region claimed before (an empty region overlaps nothing).
    pub fn claim(&mut self, region: Region) -> Result<&'s mut [u8], SegmentError> {
        let start = self.segment.start_of(region)?;
        let end = region.offset + region.len;
        let overlaps = |t: &Region| region.offset < t.offset + t.len && t.offset < end;
        if !region.is_empty() && self.taken.iter().any(overlaps) {
            return Err(SegmentError::Overlaps {
                offset: region.offset,
                len: region.len,
            });
        }
        self.taken.push(region);
        // SAFETY: in bounds (start_of). The region overlaps no other region
        // this `Claims` gave a view of (checked above, and recorded), and
        // `self.segment` is an exclusive borrow of the segment for 's, the
        // views' lifetime: no other reference into the arena is made in this
        // process while they live. Other processes keep out of it under the
        // slot protocol, as for [`Segment::claim`].
        Ok(unsafe { std::slice::from_raw_parts_mut(start, region.len as usize) })
    }
}

impl SegmentHeader {
    /// Adds one to the completed-jobs counter.
    pub fn count_job(&self) {
        self.jobs_done.fetch_add(1, Ordering::Relaxed);
    }
}

/// Identities of arenas, so a slot is only ever used with its own.
static NEXT_ARENA: AtomicU64 = AtomicU64::new(1);

/// The creator's side of a segment: the segment together with the slot
/// allocator over its arena (single-threaded: the allocator sits in a
/// `RefCell`, never borrowed past a call). Slots it hands out carry its
/// identity, and their bytes are reached only through it, as `&` of a
/// `&Slot` or `&mut` of a `&mut Slot`: since a [`Slot`] is not `Clone` and
/// slots never overlap, this process cannot hold two `&mut` to one byte.
#[derive(Debug)]
pub struct Arena {
    segment: Segment,
    alloc: RefCell<SlotAllocator>,
    id: u64,
}

impl Arena {
    /// The arena of a segment this handle created (disowned or not), and
    /// the only handle to it in this process (none can be opened while the
    /// arena lives: [`SegmentError::MappedTwice`]).
    pub fn new(segment: Segment) -> Result<Arena, SegmentError> {
        if !segment.created {
            return Err(SegmentError::NotCreator {
                name: segment.name.clone(),
            });
        }
        let alone = with_mapped(&segment.identity, |m| m.handles == 1);
        if !alone {
            return Err(SegmentError::MappedTwice {
                name: segment.name.clone(),
            });
        }
        let id = NEXT_ARENA.fetch_add(1, Ordering::Relaxed);
        Ok(Arena {
            alloc: RefCell::new(SlotAllocator::for_arena(segment.arena_len() as u64, id)),
            segment,
            id,
        })
    }

    /// The segment (for its name, header and description).
    pub fn segment(&self) -> &Segment {
        &self.segment
    }

    /// A slot of at least `len` bytes (whole pages); see [`SlotAllocator::alloc`].
    pub fn alloc(&self, len: u64) -> Result<Slot, AllocError> {
        self.alloc.borrow_mut().alloc(len)
    }

    /// Returns a slot of this arena.
    pub fn free(&self, slot: Slot) -> Result<(), SegmentError> {
        self.own(&slot)?;
        self.alloc.borrow_mut().free(slot);
        Ok(())
    }

    /// Slots currently allocated.
    pub fn in_use(&self) -> usize {
        self.alloc.borrow().in_use()
    }

    /// Bytes currently allocated (whole pages).
    pub fn bytes_in_use(&self) -> u64 {
        self.alloc.borrow().bytes_in_use()
    }

    fn own(&self, slot: &Slot) -> Result<(), SegmentError> {
        if slot.arena() == self.id {
            Ok(())
        } else {
            Err(SegmentError::ForeignSlot {
                name: self.segment.name.clone(),
            })
        }
    }

    /// A slot's bytes, for reading (while the slot is the dispatcher's under
    /// the slot protocol: not while a worker runs its job).
    pub fn bytes<'a>(&'a self, slot: &'a Slot) -> Result<&'a [u8], SegmentError> {
        self.own(slot)?;
        let r = slot.region();
        let start = self.segment.start_of(r)?;
        // SAFETY: in bounds (start_of). The slot is this arena's (checked
        // above) and borrowed shared for the result's lifetime; a `&mut` to
        // these bytes needs `&mut` of this very slot (no other slot
        // overlaps it), so none exists meanwhile in this process.
        Ok(unsafe { std::slice::from_raw_parts(start, r.len as usize) })
    }

    /// A slot's bytes, for writing (same rule as [`Arena::bytes`]).
    pub fn bytes_mut<'a>(&'a self, slot: &'a mut Slot) -> Result<&'a mut [u8], SegmentError> {
        self.bytes_mut_from(slot, 0)
    }

    /// A slot's bytes from `from` on (none if `from` is past its end), for
    /// writing while a worker may read the part before `from`: no reference
    /// to that part is made.
    pub fn bytes_mut_from<'a>(
        &'a self,
        slot: &'a mut Slot,
        from: u64,
    ) -> Result<&'a mut [u8], SegmentError> {
        self.own(slot)?;
        let r = slot.region();
        let start = self.segment.start_of(r)?;
        let from = from.min(r.len);
        // SAFETY: in bounds (start_of, and from <= len). The slot is this
        // arena's (checked above), allocated by its allocator, which never
        // hands out overlapping slots, and not `Clone`; it is borrowed
        // exclusively for the result's lifetime, so no other reference to
        // these bytes exists in this process meanwhile.
        Ok(unsafe {
            std::slice::from_raw_parts_mut(start.add(from as usize), (r.len - from) as usize)
        })
    }

    /// The segment half of the status report, with the allocator's figures.
    pub fn describe(&self, attached_here: usize) -> SegmentStatus {
        SegmentStatus {
            slots_in_use: self.in_use(),
            slot_bytes_in_use: self.bytes_in_use(),
            ..self.segment.describe(attached_here)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(tag: &str) -> String {
        format!("/osps-unit-{}-{tag}", std::process::id())
    }

    /// The same segment name for each backend: every segment test runs on all.
    fn both(tag: &str) -> [String; 2] {
        Backend::ALL.map(|b| b.segment_name(&name(tag)))
    }

    /// Permission bits of a segment, as its backend reports them.
    fn mode_of(seg: &Segment) -> u32 {
        u32::from_str_radix(&seg.describe(1).mode, 8).unwrap()
    }

    /// A region's bytes, copied out.
    fn read(seg: &mut Segment, r: Region) -> Vec<u8> {
        let mut out = vec![0; r.len() as usize];
        assert_eq!(seg.copy_out(r, 0, r.len(), &mut out).unwrap(), out.len());
        out
    }

    #[test]
    fn claims_give_disjoint_views_at_once_and_refuse_overlaps() {
        let n = name("claims");
        let mut seg = Segment::create(&n, 1 << 16, 1).unwrap();
        let mut claims = seg.claims();
        let a = claims.claim(Region::new(0, 100)).unwrap();
        let b = claims.claim(Region::new(100, 50)).unwrap();
        a.fill(1);
        b.fill(2);
        b[..10].copy_from_slice(&a[..10]);
        for (offset, len) in [(99, 2), (0, 1), (120, 500), (10, 20)] {
            let e = claims.claim(Region::new(offset, len)).unwrap_err();
            assert!(matches!(e, SegmentError::Overlaps { .. }), "{e}");
        }
        assert!(
            claims.claim(Region::new(50, 0)).is_ok(),
            "empty: no overlap"
        );
        assert!(matches!(
            claims.claim(Region::new(1 << 16, 1)),
            Err(SegmentError::OutOfBounds { .. })
        ));
        assert_eq!(claims.claim(Region::new(150, 1)).unwrap(), &[0]);
        drop(claims); // the views live on, the segment borrowed
        b[11] = 3;
        let (a, b) = (a.to_vec(), b.to_vec());
        assert_eq!(read(&mut seg, Region::new(0, 100)), a);
        assert_eq!(read(&mut seg, Region::new(100, 50)), b);
        assert_eq!(&b[..12], &[1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 2, 3]);
    }

    #[test]
    fn create_open_share_and_unlink() {
        for n in both("share") {
            share_and_unlink(&n);
        }
    }

    /// Another process holding the segment open: this test binary, run as
    /// the ignored test `opener` below. It reads `len` bytes at `offset`
    /// and prints them, writes `write` there and counts a job, says `done`,
    /// and keeps the segment mapped until its stdin closes.
    struct Opener {
        child: std::process::Child,
        out: std::io::BufReader<std::process::ChildStdout>,
    }

    impl Opener {
        fn start(n: &str, r: Region, write: &str) -> Opener {
            let mut child = std::process::Command::new(std::env::current_exe().unwrap())
                .args([
                    "--exact",
                    "segment::tests::opener",
                    "--ignored",
                    "--nocapture",
                ])
                .env("OSPS_TEST_SEGMENT", n)
                .env("OSPS_TEST_REGION", format!("{} {}", r.offset(), r.len()))
                .env("OSPS_TEST_WRITE", write)
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .spawn()
                .unwrap();
            let out = std::io::BufReader::new(child.stdout.take().unwrap());
            Opener { child, out }
        }

        /// The next line the opener printed that is its own (not the test harness's).
        fn line(&mut self) -> String {
            use std::io::BufRead;
            loop {
                let mut l = String::new();
                assert!(self.out.read_line(&mut l).unwrap() > 0, "the opener ended");
                if let Some(said) = l.trim_end().strip_prefix("opener: ") {
                    return said.to_owned();
                }
            }
        }
    }

    impl Drop for Opener {
        fn drop(&mut self) {
            drop(self.child.stdin.take());
            let _ = self.child.wait();
        }
    }

    #[test]
    #[ignore = "run by other tests, as another process"]
    fn opener() {
        let n = std::env::var("OSPS_TEST_SEGMENT").unwrap();
        let r = std::env::var("OSPS_TEST_REGION").unwrap();
        let (off, len) = r.split_once(' ').unwrap();
        let mut seg = Segment::open(&n).unwrap();
        assert!(!seg.is_owner());
        let h = seg.header();
        let (gen, owner) = (
            h.generation.load(Ordering::Relaxed),
            h.owner_pid.load(Ordering::Relaxed),
        );
        let r = seg
            .check(off.parse().unwrap(), len.parse().unwrap())
            .unwrap();
        let got = String::from_utf8(read(&mut seg, r)).unwrap();
        println!("opener: {got} {gen} {owner}");
        let write = std::env::var("OSPS_TEST_WRITE").unwrap();
        seg.claim(r).unwrap().copy_from_slice(write.as_bytes());
        seg.header().count_job();
        println!("opener: done");
        let _ = std::io::Read::read_to_end(&mut std::io::stdin(), &mut Vec::new());
    }

    fn share_and_unlink(n: &str) {
        let n = n.to_owned();
        let mut seg = Segment::create(&n, 1 << 20, 7).unwrap();
        assert!(exists(&n), "{n}");
        let r = seg.check(4096, 5).unwrap();
        seg.claim(r).unwrap().copy_from_slice(b"hello");
        // Another process sees what this one wrote, and this one what it writes.
        let mut other = Opener::start(&n, r, "HELLO");
        assert_eq!(other.line(), format!("hello 7 {}", std::process::id()));
        assert_eq!(other.line(), "done");
        assert_eq!(read(&mut seg, r), b"HELLO");
        assert_eq!(seg.header().jobs_done.load(Ordering::Relaxed), 1);
        // In this process, the segment is mapped once.
        assert!(matches!(
            Segment::open(&n),
            Err(SegmentError::MappedTwice { .. })
        ));
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
        // `attached` given as 99: the kernel's own count must win.
        let info = seg.describe(99);
        let key = sysv_key(&n);
        assert_eq!(
            (info.backend.as_str(), info.mode.as_str(), info.attached),
            ("sysv", "0600", 1)
        );
        assert!(
            info.see.contains(&format!("key 0x{key:08x}")),
            "{}",
            info.see
        );
        let table = std::fs::read_to_string("/proc/sysvipc/shm").unwrap();
        assert!(
            table
                .lines()
                .any(|l| l.split_whitespace().next() == Some(&key.to_string())),
            "key {key} not in /proc/sysvipc/shm"
        );
        let mut other = Opener::start(&n, seg.check(0, 1).unwrap(), "x");
        assert_eq!(other.line().split(' ').count(), 3);
        assert_eq!(seg.describe(99).attached, 2);
        drop(other);
        drop(seg);
        let table = std::fs::read_to_string("/proc/sysvipc/shm").unwrap();
        assert!(
            !table
                .lines()
                .any(|l| l.split_whitespace().next() == Some(&key.to_string())),
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
        let mut seg = Segment::create(n, 8 << 20, 1).unwrap();
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
        let all = seg.check(0, 8 << 20).unwrap();
        seg.claim(all).unwrap().fill(1);
        let taken = faults() - before;
        assert!(
            taken < 64,
            "{taken} minor faults writing 2048 populated pages"
        );
    }

    /// Resident KiB of this process's mapping that starts at `addr`
    /// (`/proc/self/smaps`: the pages it has page-table entries for).
    fn rss_kib_at(addr: usize) -> u64 {
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let mut ours = false;
        for line in smaps.lines() {
            let start = line.split_once('-').map(|(s, _)| s);
            if let Some(start) = start.and_then(|s| usize::from_str_radix(s, 16).ok()) {
                ours = start == addr;
            } else if ours && line.starts_with("Rss:") {
                return line.split_whitespace().nth(1).unwrap().parse().unwrap();
            }
        }
        panic!("no mapping at {addr:#x} in /proc/self/smaps");
    }

    #[test]
    fn dropping_page_tables_unmaps_the_arena_and_keeps_its_bytes() {
        for n in both("drop") {
            drop_keeps_bytes(&n);
        }
    }

    fn drop_keeps_bytes(n: &str) {
        const LEN: usize = 8 << 20;
        let byte = |i: usize| b'a' + (i * 7 % 26) as u8;
        let arena = Arena::new(Segment::create(n, LEN, 1).unwrap()).unwrap();
        let addr = arena.segment().map.as_ptr() as usize;
        let mut slot = arena.alloc(LEN as u64 / 2).unwrap();
        let mut other = arena.alloc(LEN as u64 / 4).unwrap();
        for (i, b) in arena.bytes_mut(&mut other).unwrap().iter_mut().enumerate() {
            *b = byte(i + 1);
        }
        // A view still alive across the drop: its bytes stay what they were.
        let view = arena.bytes_mut(&mut slot).unwrap();
        for (i, b) in view.iter_mut().enumerate() {
            *b = byte(i);
        }
        assert!(rss_kib_at(addr) >= (LEN / 2 + LEN / 4) as u64 / 1024);
        arena.segment().drop_page_tables().unwrap();
        let left = rss_kib_at(addr);
        assert!(left <= 64, "{left} KiB still mapped after the drop");
        assert!(view.iter().enumerate().all(|(i, &b)| b == byte(i)));
        view[0] = b'A';
        let bytes = arena.bytes(&other).unwrap();
        assert!(bytes.iter().enumerate().all(|(i, &b)| b == byte(i + 1)));
        // Another process reads them in the segment, and writes there;
        // its write is seen here through the pages mapped again.
        arena.segment().drop_page_tables().unwrap();
        let r = arena.segment().check(slot.region().offset(), 8).unwrap();
        let mut o = Opener::start(n, r, "written!");
        let want: String = "A".chars().chain((1..8).map(|i| byte(i) as char)).collect();
        assert_eq!(o.line(), format!("{want} 1 {}", std::process::id()));
        assert_eq!(o.line(), "done");
        let after = &arena.bytes(&slot).unwrap()[..9];
        assert_eq!((&after[..8], after[8]), (&b"written!"[..], byte(8)));
        drop(o);
        arena.free(slot).unwrap();
        arena.free(other).unwrap();
    }

    #[test]
    fn out_of_bounds_regions_are_refused() {
        for n in both("bounds") {
            bounds(&n);
        }
    }

    fn bounds(n: &str) {
        let mut seg = Segment::create(n, 8192, 1).unwrap();
        assert!(seg.check(8192, 1).is_err());
        assert!(seg.check(u64::MAX, 2).is_err());
        assert!(seg.check(0, 8192).is_ok());
        // A region checked against a larger segment is refused by a smaller one.
        let big = Segment::create(&format!("{n}-big"), 16384, 1).unwrap();
        let far = big.check(8192, 4096).unwrap();
        assert!(matches!(
            seg.copy_out(far, 0, 4096, &mut [0; 16]),
            Err(SegmentError::OutOfBounds { .. })
        ));
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

    #[test]
    fn a_slot_of_one_arena_is_refused_by_another() {
        let a = Arena::new(Segment::create(&name("arena-a"), 1 << 16, 1).unwrap()).unwrap();
        let b = Arena::new(Segment::create(&name("arena-b"), 1 << 16, 1).unwrap()).unwrap();
        let mut slot = a.alloc(100).unwrap();
        a.bytes_mut(&mut slot).unwrap()[..3].copy_from_slice(b"abc");
        assert_eq!(&a.bytes(&slot).unwrap()[..3], b"abc");
        // The tail alone: from an offset to the slot's end, never past it.
        let tail = a.bytes_mut_from(&mut slot, 4094).unwrap();
        assert_eq!(tail.len(), 2);
        tail.copy_from_slice(b"yz");
        assert_eq!(&a.bytes(&slot).unwrap()[4093..], b"\0yz");
        assert!(a.bytes_mut_from(&mut slot, 1 << 20).unwrap().is_empty());
        assert!(matches!(
            b.bytes(&slot),
            Err(SegmentError::ForeignSlot { .. })
        ));
        assert!(matches!(
            b.bytes_mut(&mut slot),
            Err(SegmentError::ForeignSlot { .. })
        ));
        // A free-standing allocator's slot reaches no arena either.
        let loose = SlotAllocator::new(1 << 16).alloc(100).unwrap();
        assert!(a.bytes(&loose).is_err());
        assert_eq!(b.in_use(), 0);
        a.free(slot).unwrap();
        assert_eq!(a.in_use(), 0);
    }

    #[test]
    fn a_segment_an_arena_allocates_in_is_mapped_once_in_the_process() {
        for n in both("once") {
            let arena = Arena::new(Segment::create(&n, 4096, 1).unwrap()).unwrap();
            assert!(
                matches!(Segment::open(&n), Err(SegmentError::MappedTwice { .. })),
                "{n}: the arena's segment"
            );
            // The POSIX name without its slash reaches the same object.
            if Backend::of(&n) == Backend::Posix {
                assert!(matches!(
                    Segment::open(n.trim_start_matches('/')),
                    Err(SegmentError::MappedTwice { .. })
                ));
            }
            drop(arena);
            assert!(!exists(&n), "{n}: the arena's creator unlinks it");
        }
    }

    #[test]
    fn a_segment_is_mapped_once_in_a_process_and_a_refused_open_leaves_no_trace() {
        for n in both("one-handle") {
            let mut seg = Segment::create(&n, 4096, 1).unwrap();
            assert!(matches!(
                Segment::open(&n),
                Err(SegmentError::MappedTwice { .. })
            ));
            // Two handles could each claim the same bytes: two `&mut` at two addresses.
            seg.disown();
            drop(seg);
            let first = Segment::open(&n).unwrap();
            assert!(matches!(
                Segment::open(&n),
                Err(SegmentError::MappedTwice { .. })
            ));
            drop(first);
            // Refusals did not leave the handle counted: it opens again.
            let again = Segment::open(&n).unwrap();
            drop(again);
            assert!(unlink(&n));
        }
        // An object too short for a header is refused and not counted either.
        let n = name("short");
        std::fs::write(fs_path(&n), [0u8; 100]).unwrap();
        assert!(matches!(
            Segment::open(&n),
            Err(SegmentError::BadHeader { .. })
        ));
        let identity = {
            use std::os::unix::fs::MetadataExt;
            let m = std::fs::metadata(fs_path(&n)).unwrap();
            format!("posix {}:{}", m.dev(), m.ino())
        };
        let counted = MAPPED
            .lock()
            .unwrap()
            .iter()
            .any(|m| m.identity == identity);
        assert!(!counted, "a refused open left {identity} in the register");
        assert!(unlink(&n));
    }

    #[test]
    fn only_the_creator_gets_an_arena() {
        let n = name("arena-open");
        let mut seg = Segment::create(&n, 4096, 1).unwrap();
        seg.disown();
        drop(seg);
        assert!(matches!(
            Arena::new(Segment::open(&n).unwrap()),
            Err(SegmentError::NotCreator { .. })
        ));
        assert!(unlink(&n));
    }

    #[test]
    fn copy_out_stops_at_the_announced_length() {
        let mut seg = Segment::create(&name("copy"), 8192, 1).unwrap();
        let slot = seg.check(4096, 4096).unwrap();
        let bytes = seg.claim(slot).unwrap();
        for (i, b) in bytes.iter_mut().enumerate() {
            *b = i as u8;
        }
        // (from, announced, room) -> bytes copied
        let table = [
            (0, 10, 64, 10),
            (4, 10, 64, 6),
            (10, 10, 64, 0),
            (12, 10, 64, 0),
            (0, 10, 3, 3),
            (0, 1 << 20, 8192, 4096), // announced past the slot: the slot bounds it
            (4000, 4096, 8192, 96),
        ];
        for (from, announced, room, want) in table {
            let mut dst = vec![0xffu8; room];
            let got = seg.copy_out(slot, from, announced, &mut dst).unwrap();
            assert_eq!(got, want, "from {from} announced {announced} room {room}");
            let expect: Vec<u8> = (from..from + want as u64).map(|i| i as u8).collect();
            assert_eq!(&dst[..got], &expect[..]);
            assert!(
                dst[got..].iter().all(|&b| b == 0xff),
                "nothing past the copy"
            );
        }
    }

    #[test]
    fn backends_are_named_as_on_the_command_line_and_in_segment_names() {
        // (--segment value, backend, name made for base "/x")
        let table = [
            ("posix", Backend::Posix, "/x"),
            ("sysv", Backend::SysV, "sysv:/x"),
        ];
        for (arg, backend, made) in table {
            assert_eq!(arg.parse::<Backend>(), Ok(backend));
            assert_eq!(backend.to_string(), arg);
            assert_eq!(backend.segment_name("/x"), made);
            assert_eq!(Backend::of(made), backend);
            assert_eq!(Backend::base_name(made), "/x");
        }
        assert!("tmpfs".parse::<Backend>().is_err());
        assert_eq!(Backend::default(), Backend::Posix);
    }

    #[test]
    fn a_posix_segment_describes_its_file_and_takes_the_callers_count() {
        let seg = Segment::create(&name("describe"), 4096, 3).unwrap();
        seg.header().count_job();
        let d = seg.describe(4);
        assert_eq!(
            (
                d.backend.as_str(),
                d.mode.as_str(),
                d.attached,
                d.generation,
                d.jobs_run
            ),
            ("posix", "0600", 4, 3, 1)
        );
        assert_eq!(d.path, fs_path(seg.name()));
        assert_eq!(d.owner_uid, nix::unistd::geteuid().as_raw());
        assert_eq!(d.size, (HEADER_LEN + 4096) as u64);
    }
}
