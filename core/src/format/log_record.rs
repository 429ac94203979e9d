//! The init record in the first block of the log region.

use super::codec::{Reader, Writer};
use super::{Result, FORMAT_VERSION, LOG_INIT_MAGIC};

/// Written by mkfs at the start of the log region; the log proper starts in the next
/// block. A log user (replication) checks it before trusting anything after it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LogInitRecord {
    pub daemon_uuid: uuid::Uuid,
    /// Length of the whole log region, init record included.
    pub log_len: u64,
    pub birth_time_unix_ns: u64,
}

impl LogInitRecord {
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::new();
        w.bytes(&LOG_INIT_MAGIC)
            .u32(FORMAT_VERSION)
            .bytes(self.daemon_uuid.as_bytes())
            .u64(self.log_len)
            .u64(self.birth_time_unix_ns);
        w.seal()
    }

    pub fn decode(buf: &[u8]) -> Result<LogInitRecord> {
        let mut r = Reader::open(buf, "log init record", &LOG_INIT_MAGIC, FORMAT_VERSION)?;
        Ok(LogInitRecord {
            daemon_uuid: uuid::Uuid::from_bytes(r.bytes()),
            log_len: r.u64(),
            birth_time_unix_ns: r.u64(),
        })
    }
}
