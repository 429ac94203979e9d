//! The label at offset 0 (and its copies): who this device belongs to and where
//! everything is.

use super::codec::{Reader, Writer};
use super::{Layout, Result, FORMAT_VERSION, LABEL_MAGIC};

/// Set once mkfs completed: the commit point of the format.
pub const LABEL_FLAG_READY: u32 = 1;

/// The device label. Its on-disk form carries [`FORMAT_VERSION`], the only version
/// [`Label::decode`] accepts.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Label {
    pub flags: u32,
    pub cluster_fsid: uuid::Uuid,
    pub daemon_id: u32,
    pub daemon_uuid: uuid::Uuid,
    pub birth_time_unix_ns: u64,
    pub layout: Layout,
}

impl Label {
    pub fn is_ready(&self) -> bool {
        self.flags & LABEL_FLAG_READY != 0
    }

    /// The label with `ready` set (or cleared).
    pub fn with_ready(&self, ready: bool) -> Label {
        let mut l = self.clone();
        if ready {
            l.flags |= LABEL_FLAG_READY;
        } else {
            l.flags &= !LABEL_FLAG_READY;
        }
        l
    }

    /// One 4 KiB block.
    pub fn encode(&self) -> Vec<u8> {
        let l = &self.layout;
        let mut w = Writer::new();
        w.bytes(&LABEL_MAGIC)
            .u32(FORMAT_VERSION)
            .u32(self.flags)
            .bytes(self.cluster_fsid.as_bytes())
            .u32(self.daemon_id)
            .bytes(self.daemon_uuid.as_bytes())
            .u64(self.birth_time_unix_ns)
            .u64(l.device_size)
            .u32(l.alloc_unit)
            .u64(l.superblock_offset)
            .u64(l.log_offset)
            .u64(l.log_len)
            .u64(l.bitmap_offset)
            .u64(l.bitmap_len)
            .u64(l.data_offset)
            .u64(l.data_len)
            .u32(l.label_copies.len() as u32);
        for i in 0..3 {
            w.u64(l.label_copies.get(i).copied().unwrap_or(0));
        }
        w.seal()
    }

    /// Decodes and verifies (magic, CRC32C, version) one 4 KiB block.
    pub fn decode(buf: &[u8]) -> Result<Label> {
        let mut r = Reader::open(buf, "label", &LABEL_MAGIC, FORMAT_VERSION)?;
        let flags = r.u32();
        let cluster_fsid = uuid::Uuid::from_bytes(r.bytes());
        let daemon_id = r.u32();
        let daemon_uuid = uuid::Uuid::from_bytes(r.bytes());
        let birth_time_unix_ns = r.u64();
        let device_size = r.u64();
        let alloc_unit = r.u32();
        let superblock_offset = r.u64();
        let log_offset = r.u64();
        let log_len = r.u64();
        let bitmap_offset = r.u64();
        let bitmap_len = r.u64();
        let data_offset = r.u64();
        let data_len = r.u64();
        let ncopies = (r.u32() as usize).min(3);
        let copies: Vec<u64> = (0..3).map(|_| r.u64()).collect();
        Ok(Label {
            flags,
            cluster_fsid,
            daemon_id,
            daemon_uuid,
            birth_time_unix_ns,
            layout: Layout {
                device_size,
                alloc_unit,
                superblock_offset,
                log_offset,
                log_len,
                bitmap_offset,
                bitmap_len,
                data_offset,
                data_len,
                label_copies: copies[..ncopies].to_vec(),
            },
        })
    }
}
