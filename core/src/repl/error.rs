//! The errors of a replica: what stops it ([`ReplicaError`]) and why the primary refuses a
//! write ([`AdmitError`]).

use std::path::PathBuf;

use crate::dev::DevError;

use super::kv::{Invalid, KvError};
use super::log::LogError;
use super::protocol::ProtocolError;

/// Errors of a replica.
#[derive(Debug, thiserror::Error)]
pub enum ReplicaError {
    #[error(transparent)]
    Dev(#[from] DevError),
    #[error(transparent)]
    Log(#[from] LogError),
    #[error(transparent)]
    Kv(#[from] KvError),
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    #[error(transparent)]
    Refused(#[from] AdmitError),
    #[error("{cause}; still after waiting {} s for it to be released", .waited.as_secs())]
    Busy {
        cause: DevError,
        waited: std::time::Duration,
    },
    #[error("{path}: holds {found}; refusing to overwrite it without --force")]
    Foreign { path: PathBuf, found: String },
    #[error("{what}: {cause}")]
    Io { what: String, cause: std::io::Error },
    #[error("bad replica configuration: {0}")]
    Config(String),
}

/// Why the primary refuses a write before it enters the log.
#[derive(Debug, thiserror::Error)]
pub enum AdmitError {
    #[error(transparent)]
    Invalid(#[from] Invalid),
    #[error("log region full: {left} bytes left, the write needs {need}")]
    LogFull { need: u64, left: u64 },
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
}
