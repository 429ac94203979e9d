//! Volumes as extents on daemon devices: create, delete, copy (an io_uring read/write
//! pipeline with several requests in flight), with the catalog persisted so it survives a
//! restart.
//!
//! * Each device contributes the data region of its daemon-format [`Layout`]
//!   (`core::format`): a formatted device (ready blocklab label) is opened with
//!   [`crate::daemon::mount`] (every checksum verified) and used through its label's layout
//!   and its on-device free-space bitmap, which the store updates (touched bitmap blocks +
//!   the superblock's counter in one batch per change, then one flush per device) before
//!   committing the catalog. A blank device gets the same layout computed in memory (1 MiB
//!   units) and an in-memory bitmap.
//! * On open every bitmap is rebuilt from the layout and the catalog (the catalog is the
//!   source of truth) and a formatted device's bitmap and superblock counter are rewritten
//!   if they differ, so a crash between the bitmap write and the catalog commit leaks
//!   nothing, and one between the bitmap and superblock writes leaves a device that mounts
//!   (the counter is a hint) and is corrected.
//! * The catalog (`volumes.json` in the store's directory, `flock`ed through
//!   `volumes.lock`: one store per directory) is replaced atomically: written to a
//!   temporary file, fsynced, renamed, directory fsynced. A volume appears in it only once
//!   its data is in place (after a copy's flush). The same write records what the
//!   operation did under its operation id ([`Applied`], the last [`APPLIED_KEEP`]), so a
//!   caller that crashed after the commit learns the outcome instead of re-running it.
//! * Copy destinations go to other devices than the source's where there is room.
//! * Files: [`store`] (the store and its catalog), [`copy`] (the copy pipeline),
//!   [`extent`] (the [`Extent`] both use).
//! * Opening a store for the first time probes every device and refuses one with foreign
//!   data (a filesystem, a partition table, another blocklab cluster's label, non-zero
//!   bytes) unless `force` is set.
//!
//! [`Layout`]: crate::format::Layout

pub mod copy;
pub mod extent;
pub mod store;

pub use copy::{copy_extents, CopyBuffers, CopyStats};
pub use extent::Extent;
pub use store::{
    Applied, StoreConfig, Volume, VolumeError, VolumeStore, APPLIED_KEEP, MAX_COPY_DEPTH,
};
