//! Errors of mkfs, mount and inspect. Each names the device.

use std::path::PathBuf;

use crate::dev::DevError;
use crate::format::FormatError;

use super::Phase;

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Dev(#[from] DevError),
    #[error("{path}: {cause}")]
    Format { path: PathBuf, cause: FormatError },
    #[error("{path}: refusing to format: the device holds {found}; use --force to overwrite it")]
    Refused { path: PathBuf, found: String },
    #[error("{path}: not mountable: {reason}")]
    NotMountable { path: PathBuf, reason: String },
    #[error("{path}: no blocklab label: the device holds {found}")]
    NoLabel { path: PathBuf, found: String },
    #[error("{path}: mkfs stopped after phase {phase} (injected crash)")]
    InjectedStop { path: PathBuf, phase: Phase },
}

pub type Result<T, E = DaemonError> = std::result::Result<T, E>;
