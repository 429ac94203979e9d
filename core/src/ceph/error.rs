//! Errors of the Ceph driver.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum CephError {
    #[error("{program} is not installed (Debian package {package})")]
    Missing {
        program: &'static str,
        package: &'static str,
    },
    #[error("starting {program}: {cause}")]
    Spawn {
        program: String,
        cause: std::io::Error,
    },
    #[error("{what} failed ({status}): {stderr}")]
    Failed {
        what: String,
        status: std::process::ExitStatus,
        stderr: String,
    },
    #[error("{what}: {}: {cause}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error("the monitor refused {command} ({code}): {message}")]
    Command {
        command: String,
        code: i64,
        message: String,
    },
    #[error("{what}: unexpected answer: {text}")]
    Parse { what: String, text: String },
    #[error("{what}: no answer within {secs:.1} s")]
    Timeout { what: String, secs: f64 },
    #[error("{}: {found}; refusing to deploy an OSD on it (--force overwrites it)", path.display())]
    Foreign { path: PathBuf, found: String },
    #[error("{}: not a block device", path.display())]
    NotBlock { path: PathBuf },
    #[error("{}: not a Ceph cluster made by blocklab (no blocklab-cluster.json); leaving it alone", path.display())]
    NotACluster { path: PathBuf },
    #[error("{}: a Ceph cluster directory exists already (another run's, or someone else's)", path.display())]
    Exists { path: PathBuf },
}

pub type Result<T, E = CephError> = std::result::Result<T, E>;
