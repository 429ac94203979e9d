//! Errors of node agents and the orchestration.

use std::path::PathBuf;

use crate::dev::DevError;
use crate::monitor::MonitorError;

#[derive(Debug, thiserror::Error)]
pub enum InitError {
    #[error(transparent)]
    Monitor(#[from] MonitorError),
    #[error(transparent)]
    Ceph(#[from] crate::ceph::CephError),
    #[error("node {node}: device {device} is listed twice")]
    DuplicateDevice { node: String, device: String },
    #[error("device {device} on host {host} is listed by node {first} and by node {second}")]
    SharedDevice {
        device: String,
        host: String,
        first: String,
        second: String,
    },
    #[error("node {node}: device {}: {cause}", path.display())]
    Device {
        node: String,
        path: PathBuf,
        cause: DevError,
    },
    #[error("node {node}: {ids} ids for {devices} devices")]
    IdCount {
        node: String,
        ids: usize,
        devices: usize,
    },
    #[error("node {node}: unknown daemon id {id}: the monitor's map has no such daemon")]
    UnknownId { node: String, id: u32 },
    #[error("node {node}: daemon id {id} belongs to {owner} in the monitor's map, not to {device} of this node")]
    WrongId {
        node: String,
        id: u32,
        owner: String,
        device: String,
    },
    #[error("node {node}: {message}")]
    Node { node: String, message: String },
    #[error("no nodes to initialise")]
    NoNodes,
    #[error(transparent)]
    NodeUnreachable(#[from] crate::jsonl::tcp::Unreachable),
    #[error("node agent at {addr}: {what}: {cause}")]
    NodeIo {
        addr: String,
        what: &'static str,
        cause: std::io::Error,
    },
}

pub type Result<T, E = InitError> = std::result::Result<T, E>;
