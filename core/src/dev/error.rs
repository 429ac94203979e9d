//! The one error type of the device layer. Every variant names the device (and the
//! offset where there is one), so a failure deep in an experiment is still readable.

use std::path::PathBuf;

/// An error of the block-device layer.
#[derive(Debug, thiserror::Error)]
pub enum DevError {
    #[error("{path}: {op} failed: {cause}")]
    Os {
        path: PathBuf,
        op: &'static str,
        cause: std::io::Error,
    },
    #[error("{path}: no such file or device")]
    NotFound { path: PathBuf },
    #[error("{path}: is a directory, not a block device or regular file")]
    IsDirectory { path: PathBuf },
    #[error("{path}: is neither a block device nor a regular file")]
    UnsupportedKind { path: PathBuf },
    #[error("{path}: is read-only (opened for writing: {cause})")]
    ReadOnly {
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error("{path}: permission denied (root needed for block devices?): {cause}")]
    PermissionDenied {
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error("{path}: in use (mounted, held by another driver such as device-mapper, md or LVM, or opened exclusively by another process)")]
    InUse { path: PathBuf },
    #[error("{path}: {what} {value} is not a multiple of the device alignment {align} bytes")]
    Misaligned {
        path: PathBuf,
        what: &'static str,
        value: u64,
        align: u64,
    },
    #[error(
        "{path}: buffer address {addr:#x} is not aligned to {align} bytes (use dev::AlignedBuf)"
    )]
    MisalignedBuffer {
        path: PathBuf,
        addr: usize,
        align: usize,
    },
    #[error("{path}: I/O of {len} bytes at offset {offset} goes past the end of the device ({size} bytes)")]
    PastEnd {
        path: PathBuf,
        offset: u64,
        len: u64,
        size: u64,
    },
    #[error("{path}: {op} at offset {offset} ({len} bytes) failed: {cause}")]
    Io {
        path: PathBuf,
        op: &'static str,
        offset: u64,
        len: u64,
        cause: std::io::Error,
    },
    #[error("{path}: short {op} at offset {offset}: {done} of {len} bytes, then end of device")]
    Short {
        path: PathBuf,
        op: &'static str,
        offset: u64,
        len: u64,
        done: u64,
    },
    #[error("{path}: device is {size} bytes, the run needs at least {needed}")]
    TooSmall {
        path: PathBuf,
        size: u64,
        needed: u64,
    },
    #[error("io_uring: {op} failed: {cause}")]
    Ring {
        op: &'static str,
        cause: std::io::Error,
    },
    #[error("invalid engine configuration: {0}")]
    Config(String),
    /// Callers add what to do instead (the experiments: `--files DIR`; the CLI: run as root).
    #[error("provisioning loop devices needs root (running as uid {uid})")]
    NotRoot { uid: u32 },
    #[error("provisioning: {0}")]
    Provision(String),
}

/// Result of the device layer.
pub type Result<T, E = DevError> = std::result::Result<T, E>;

impl DevError {
    pub(crate) fn os(path: impl Into<PathBuf>, op: &'static str, source: std::io::Error) -> Self {
        DevError::Os {
            path: path.into(),
            op,
            cause: source,
        }
    }
}
