//! The superblock at 4 KiB: allocation unit and counters.

use super::codec::{Reader, Writer};
use super::{Result, FORMAT_VERSION, SUPERBLOCK_MAGIC};

/// The superblock.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Superblock {
    pub cluster_fsid: uuid::Uuid,
    pub daemon_id: u32,
    pub alloc_unit: u32,
    /// Units the bitmap covers (the whole device).
    pub total_units: u64,
    /// Units marked used in the bitmap (metadata included).
    pub used_units: u64,
    /// Bumped on every rewrite of the superblock.
    pub generation: u64,
}

impl Superblock {
    pub fn free_units(&self) -> u64 {
        self.total_units.saturating_sub(self.used_units)
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::new();
        w.bytes(&SUPERBLOCK_MAGIC)
            .u32(FORMAT_VERSION)
            .bytes(self.cluster_fsid.as_bytes())
            .u32(self.daemon_id)
            .u32(self.alloc_unit)
            .u64(self.total_units)
            .u64(self.used_units)
            .u64(self.generation);
        w.seal()
    }

    pub fn decode(buf: &[u8]) -> Result<Superblock> {
        let mut r = Reader::open(buf, "superblock", &SUPERBLOCK_MAGIC, FORMAT_VERSION)?;
        Ok(Superblock {
            cluster_fsid: uuid::Uuid::from_bytes(r.bytes()),
            daemon_id: r.u32(),
            alloc_unit: r.u32(),
            total_units: r.u64(),
            used_units: r.u64(),
            generation: r.u64(),
        })
    }
}
