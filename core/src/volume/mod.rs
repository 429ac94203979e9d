//! Volumes as extents on daemon devices: create, delete, copy (an io_uring read/write
//! pipeline with several requests in flight), with the catalog persisted so it survives a
//! restart.
//!
//! * Each device contributes the data region of its daemon-format [`Layout`]
//!   (`core::format`): a formatted device (ready blocklab label) is used through its label's
//!   layout and its on-device free-space bitmap, which the store updates (touched bitmap
//!   blocks + the superblock's counters, flushed) before committing the catalog. A blank
//!   device gets the same layout computed in memory (1 MiB units) and an in-memory bitmap.
//! * On open every bitmap is rebuilt from the layout and the catalog (the catalog is the
//!   source of truth) and a formatted device's bitmap is rewritten if it differs, so a crash
//!   between the bitmap write and the catalog commit leaks nothing.
//! * The catalog (`volumes.json` in the store's directory) is replaced atomically: written
//!   to a temporary file, fsynced, renamed, directory fsynced. A volume appears in it only
//!   once its data is in place (after a copy's flush).
//! * Opening a store for the first time probes every device and refuses one with foreign
//!   data (a filesystem, a partition table, another blocklab cluster's label, non-zero
//!   bytes) unless `force` is set.
//!
//! [`Layout`]: crate::format::Layout

pub mod copy;
pub mod store;

pub use copy::{copy_extents, CopyStats};
pub use store::{Extent, StoreConfig, Volume, VolumeError, VolumeStore};
