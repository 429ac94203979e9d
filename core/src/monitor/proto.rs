//! The monitor's request/response messages (one JSON line each, see [`crate::jsonl`]).

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::map::ClusterMap;

/// A client's request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "req", rename_all = "snake_case")]
pub enum Request {
    /// Answered at once with the committed epoch.
    Ping,
    /// Answered at once with the committed map.
    GetMap,
    /// Allocates one id per slot (the smallest free ones; a slot whose daemon is in the
    /// map and not `up` gets that daemon's id back) in one request, for any number of
    /// nodes; answered after the proposal holding them is committed.
    Alloc { slots: Vec<Slot> },
    /// Records the daemon's uuid and key after mkfs: `new → formatted` (again on a
    /// formatted daemon of the same uuid: only the key is replaced).
    Register { id: u32, uuid: Uuid, key: String },
    /// The daemon's init report: `formatted → up`, or `failed` with a reason.
    Report { id: u32, outcome: Outcome },
    /// Removes a daemon from the map (its id becomes free again).
    Remove { id: u32 },
}

/// A device of a node that needs a daemon id.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Slot {
    pub node: String,
    pub device: String,
    /// The host the node runs on; when given, the monitor also refuses a device of this
    /// host that belongs to another node's daemon.
    #[serde(default)]
    pub host: String,
}

/// What a daemon's initialisation came to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum Outcome {
    Up,
    Failed { reason: String },
}

/// The monitor's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "resp", rename_all = "snake_case")]
pub enum Response {
    Pong {
        epoch: u64,
    },
    Map {
        map: ClusterMap,
    },
    /// Ids allocated, committed in `epoch`.
    Ids {
        ids: Vec<u32>,
        epoch: u64,
    },
    /// The change was committed in `epoch`.
    Committed {
        epoch: u64,
    },
    Error {
        message: String,
    },
}
