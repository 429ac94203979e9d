//! Shared-memory block allocation across the processes of a storage node.
//!
//! A node runs several processes. The first to bind the node's internal port is the
//! leader ([`node`]); it creates the shared-memory segments ([`segs`]): one per device
//! (the free blocks of the device: a lock-free bitmap, one bit per block claimed with a
//! CAS on its word, plus one state word per block), one per process (the block it is
//! currently writing, for crash recovery; its process holds an `flock` on it while it
//! lives), one node segment (pause flag, device epoch) and the unfilled-block table
//! (partly filled blocks, under a robust process-shared lock). Followers register with
//! the leader over the internal port and then allocate straight from shared memory.
//!
//! Three strategies implement [`BlockAllocator`] ([`allocator`]):
//! * `shm`: lock-free bitmap in shared memory, each process searching from its own cache
//!   line (the mechanism);
//! * `mutex`: one robust process-shared mutex around a free list in shared memory;
//! * `central`: the leader allocates, followers ask it over a Unix socket ([`central`]).
//!
//! Crash recovery ([`recovery`]) pauses the node, waits until no live process is inside
//! an allocator operation, returns a dead process's in-flight blocks and rebuilds the free
//! structures from the per-block state words. [`attached`] is a process's view of the
//! node's segments and where each lives. [`region`] resolves a device to its block
//! region. [`audit`] walks every block of every device.
//! [`index`] is the index server, [`store`] the process's external port and the client;
//! [`wire`] holds the messages of the node, index and store ports.
//!
//! `unsafe` lives only in [`shm`] and [`shm_lock`] (the crate denies it elsewhere).

pub mod allocator;
pub mod attached;
pub mod audit;
pub mod central;
pub mod index;
pub mod node;
pub mod recovery;
pub mod region;
pub mod segs;
#[allow(unsafe_code)]
pub mod shm;
#[allow(unsafe_code)]
pub mod shm_lock;
pub mod store;
pub mod wire;

use std::path::PathBuf;

pub use allocator::{BlockAllocator, Hints, LocalAllocator};
pub use region::{ByteRange, DeviceSpec};
pub use segs::{BlockRef, BlockState, DeviceRegion, FreeMode};

/// Allocation unit inside a block (data is appended in multiples of it; O_DIRECT).
pub const UNIT: u64 = 4096;

crate::names::named_enum! {
    /// The allocation strategy of a node.
    #[derive(serde::Serialize, serde::Deserialize)]
    #[serde(rename_all = "snake_case")]
    pub enum Strategy("strategy") {
        Shm,
        Mutex,
        Central,
    }
}

impl Strategy {
    pub const ALL: [Strategy; 3] = [Strategy::Shm, Strategy::Mutex, Strategy::Central];

    /// The free structure the device segments use under this strategy.
    pub fn free_mode(self) -> FreeMode {
        match self {
            Strategy::Shm | Strategy::Central => FreeMode::Bitmap,
            Strategy::Mutex => FreeMode::Locked,
        }
    }

    pub fn code(self) -> u64 {
        match self {
            Strategy::Shm => 1,
            Strategy::Mutex => 2,
            Strategy::Central => 3,
        }
    }

    pub fn from_code(c: u64) -> Option<Strategy> {
        Strategy::ALL.into_iter().find(|s| s.code() == c)
    }
}

/// Errors of the allocation mechanism.
#[derive(Debug, thiserror::Error)]
pub enum AllocError {
    #[error("{path}: {op} failed: {cause}")]
    Os {
        path: PathBuf,
        op: &'static str,
        cause: std::io::Error,
    },
    #[error("{path}: refusing to attach shared-memory segment: {reason}")]
    BadSegment { path: PathBuf, reason: String },
    #[error("{path}: no such shared-memory segment")]
    NoSegment { path: PathBuf },
    #[error("{path}: shared-memory segment already exists")]
    AlreadyExists { path: PathBuf },
    #[error("robust lock: {op} failed: {cause}")]
    Lock {
        op: &'static str,
        cause: std::io::Error,
    },
    #[error("device {dev}: no free block (device full)")]
    DeviceFull { dev: u16 },
    #[error("no device of this node has a free block (node full)")]
    NodeFull,
    #[error("device {dev} is offline")]
    DeviceOffline { dev: u16 },
    #[error("device {dev} is not known to this node")]
    NoDevice { dev: u16 },
    #[error("request of {len} bytes is larger than a block ({block_size} bytes)")]
    TooLarge { len: u64, block_size: u64 },
    #[error("channel {channel} was never stored")]
    NotFound { channel: u64 },
    #[error("the cluster is full: no node has room for {len} bytes")]
    ClusterFull { len: u64 },
    #[error("no node process is registered with the index server")]
    NoNode,
    #[error("block {dev}:{block} is not held by this process")]
    NotHeld { dev: u16, block: u32 },
    #[error("{what}: {cause}")]
    Net { what: String, cause: std::io::Error },
    #[error("protocol error: {0}")]
    Protocol(String),
    #[error("{0}")]
    BadInput(String),
    #[error("timed out: {0}")]
    Timeout(String),
    #[error(transparent)]
    Dev(#[from] crate::dev::DevError),
}

impl AllocError {
    pub(crate) fn net(what: impl Into<String>, source: std::io::Error) -> AllocError {
        AllocError::Net {
            what: what.into(),
            cause: source,
        }
    }
}
