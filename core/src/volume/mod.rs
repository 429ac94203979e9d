//! Volumes as extents on daemon devices: create, delete, copy (an io_uring read/write
//! pipeline with several requests in flight), with the catalog persisted so it survives a
//! restart.
//!
//! * Each device contributes a data region `[data_offset, size)`, cut into allocation units
//!   (default 1 MiB). Free space is a bitmap per device, one bit per unit, rebuilt from the
//!   catalog on open (the catalog is the source of truth; a crash between allocating and
//!   committing leaves no leaked space).
//! * The catalog (`volumes.json` in the store's directory) is replaced atomically: written
//!   to a temporary file, fsynced, renamed, directory fsynced. A volume appears in it only
//!   once its data is in place (after a copy's flush).
//! * Opening a store for the first time probes every device and refuses one with foreign
//!   data (a filesystem, a partition table, another blocklab cluster's label, non-zero
//!   bytes) unless `force` is set.
//!
//! Deviation from DESIGN.md: the daemon format (`core::format`, with its on-device bitmap)
//! was built in parallel; until it is merged the data region starts at a fixed 1 MiB offset
//! and the bitmap lives in memory, derived from the catalog.

pub mod copy;
pub mod store;

pub use copy::{copy_extents, CopyStats};
pub use store::{Extent, StoreConfig, Volume, VolumeError, VolumeStore};
