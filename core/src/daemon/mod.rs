//! The data daemon's device side: `mkfs` in phases through the io_uring engine (each
//! phase timed, a crash between any two phases leaves a device that `mount` rejects and
//! `mkfs` completes), `mount` (verifies every checksum and the layout) and `inspect`.
//!
//! mkfs phases, in order: `probe` (read the first MiB, refuse foreign data) → `label`
//! (label without `ready`, at 0) → `superblock` → `log` (the init record in the log
//! region's first block) → `bitmap` → `flush` → `commit` (label copies with `ready`, flush, then
//! the primary label with `ready`, flush). The primary label's `ready` flag is the commit
//! point.

mod error;
mod mkfs;
mod mount;

pub use error::{DaemonError, Result};
pub use mkfs::{mkfs, MkfsReport, MkfsRequest};
pub use mount::{inspect, mount, read_label, Inspection, Mounted};

/// Queue depth of the io_uring engine a daemon formats its device with.
pub const MKFS_QUEUE_DEPTH: u32 = 16;

/// Opens the device at `path` exclusively, read-write, and runs [`mkfs`] on it through an engine of its
/// own ([`MKFS_QUEUE_DEPTH`]).
pub fn mkfs_path(path: &std::path::Path, req: &MkfsRequest) -> Result<MkfsReport> {
    // Exclusive: a device that is mounted or held by device-mapper, md or LVM is refused
    // (`force` does not override that), and nothing can claim it while mkfs writes.
    let dev = crate::dev::Device::open_exclusive(path)?;
    let mut eng = crate::dev::UringEngine::with_queue_depth(MKFS_QUEUE_DEPTH)?;
    mkfs(&mut eng, &dev, req)
}

crate::names::named_enum! {
    /// The phases of mkfs, in order.
    #[derive(serde::Serialize, serde::Deserialize)]
    #[serde(rename_all = "snake_case")]
    pub enum Phase("phase") {
        Probe,
        Label,
        Superblock,
        Log,
        Bitmap,
        Flush,
        Commit,
    }
}

impl Phase {
    pub const ALL: [Phase; 7] = [
        Phase::Probe,
        Phase::Label,
        Phase::Superblock,
        Phase::Log,
        Phase::Bitmap,
        Phase::Flush,
        Phase::Commit,
    ];
}
