//! Errors of the monitor, its journal and its client.

use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum MonitorError {
    #[error("unknown daemon id {id}: the monitor's map has no such daemon")]
    UnknownDaemon { id: u32 },
    #[error("conflict: {0}")]
    Conflict(String),
    #[error("bad request: {0}")]
    BadRequest(String),
    #[error("monitor at {addr} unreachable after {attempts} attempts over {waited:?}: {cause}")]
    Unreachable {
        addr: String,
        attempts: u32,
        waited: Duration,
        cause: std::io::Error,
    },
    #[error("monitor connection ({addr}): {what}: {cause}")]
    Io {
        addr: String,
        what: &'static str,
        cause: std::io::Error,
    },
    #[error("monitor protocol: {0}")]
    Protocol(String),
    #[error("the monitor refused: {0}")]
    Remote(String),
    #[error("journal {path}: {what}: {cause}")]
    Journal {
        path: PathBuf,
        what: &'static str,
        cause: std::io::Error,
    },
    #[error("journal {path}: line {line} is corrupt: {reason}")]
    JournalCorrupt {
        path: PathBuf,
        line: usize,
        reason: String,
    },
    #[error("map store: {0}")]
    Store(String),
    /// The monitor stopped by itself (a failed commit) and refuses every request.
    #[error("the monitor stopped: {0}")]
    Stopped(String),
}

pub type Result<T, E = MonitorError> = std::result::Result<T, E>;
