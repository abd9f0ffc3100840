//! OSPS core library: everything the processes share — the wire (messages and
//! framing), the shared-memory segment and its slot allocator, the instance
//! lock, socket endpoints and runtime paths.
//!
//! Binaries never touch raw bytes or the segment's memory themselves: they go
//! through the types here. `unsafe` code lives in [`segment`] only.

#[cfg(feature = "activation")]
pub mod activation;
pub mod alloc;
pub mod cgroup;
pub mod children;
#[cfg(feature = "cli")]
pub mod cli;
pub mod endpoint;
pub mod env;
pub mod frame;
pub mod lock;
pub mod logging;
pub mod memory;
pub mod paths;
pub mod peer;
pub mod proto;
pub mod segment;
pub mod start;
pub mod status;
pub mod token;

pub use alloc::{AllocError, Slot, SlotAllocator};
pub use endpoint::Endpoint;
pub use frame::FrameError;
pub use lock::{InstanceLock, LockError};
pub use paths::{PathError, RuntimePaths};
pub use proto::{ErrorKind, Outcome, RemoteError, Request, Response};
pub use segment::{Arena, Backend, Claims, Region, Segment, SegmentError};
