//! The daemon's on-disk format: faithful to BlueStore's shape, minimal.
//!
//! ```text
//! offset 0        label (4 KiB): magic, version, cluster fsid, daemon id and uuid, device
//!                 size, birth time, layout, `ready` flag, CRC32C. Copies at 1, 10 and
//!                 100 GiB where the device is large enough (inside the data region, their
//!                 units marked used in the bitmap).
//! 4 KiB           superblock (4 KiB): allocation unit, unit counters, generation, CRC32C.
//! 8 KiB           log region (default 4 MiB); its first block is the init record.
//! after the log   free-space bitmap: one bit per allocation unit of the whole device
//!                 (32 KiB per GiB at 4 KiB units), 1 = used; metadata units are used.
//! after that      data region, to the last whole allocation unit.
//! ```
//!
//! Every structure is encoded little-endian into one 4 KiB block whose last four bytes are
//! the CRC32C of the rest. Decoding checks magic, version and CRC and reports which
//! structure failed and why. This module only encodes and decodes; writing to devices is
//! the daemon's job (`daemon::mkfs`), in phases with the label's `ready` flag as the
//! commit point.

mod bitmap;
mod codec;
mod label;
mod layout;
mod log_record;
mod superblock;

pub use bitmap::Bitmap;
pub use label::{Label, LABEL_FLAG_READY};
pub use layout::{Layout, LayoutParams, DEFAULT_ALLOC_UNIT, DEFAULT_LOG_LEN, LABEL_COPY_OFFSETS};
pub use log_record::LogInitRecord;
pub use superblock::Superblock;

/// Size of every metadata block.
pub const BLOCK: usize = 4096;
/// The on-disk format version this code writes and reads.
pub const FORMAT_VERSION: u32 = 1;
/// Magic of the label (also what `dev::probe` recognises).
pub const LABEL_MAGIC: [u8; 8] = *crate::dev::probe::BLOCKLAB_MAGIC;
/// Magic of the superblock.
pub const SUPERBLOCK_MAGIC: [u8; 8] = *b"BLKLABSB";
/// Magic of the log region's init record.
pub const LOG_INIT_MAGIC: [u8; 8] = *b"BLKLABLG";

/// Why a structure could not be decoded or a layout not computed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FormatError {
    #[error("{what}: bad magic (not a blocklab {what})")]
    BadMagic { what: &'static str },
    #[error(
        "{what}: format version {found} is not supported (this build reads version {supported})"
    )]
    BadVersion {
        what: &'static str,
        found: u32,
        supported: u32,
    },
    #[error("{what}: checksum mismatch (stored {stored:#010x}, computed {computed:#010x})")]
    BadCrc {
        what: &'static str,
        stored: u32,
        computed: u32,
    },
    #[error("{what}: buffer of {len} bytes, need {need}")]
    Truncated {
        what: &'static str,
        len: usize,
        need: usize,
    },
    #[error("device of {size} bytes is too small for the layout: needs at least {needed} bytes")]
    TooSmall { size: u64, needed: u64 },
    #[error("invalid layout: {0}")]
    Layout(String),
    #[error("bitmap: {0}")]
    Bitmap(String),
}

/// Result of this module.
pub type Result<T, E = FormatError> = std::result::Result<T, E>;

#[cfg(test)]
mod tests;
