//! The cluster map: fsid, epoch and the daemons, and the changes a proposal applies to it.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::error::MonitorError;

/// Lifecycle of a daemon in the map: `new → formatted → up`, or `failed` from any of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DaemonState {
    /// An id was allocated; the device is not formatted yet.
    New,
    /// mkfs finished and the daemon's key is registered.
    Formatted,
    /// The daemon reported itself initialised and running.
    Up,
    /// Initialisation failed; `reason` says why.
    Failed,
}

impl std::fmt::Display for DaemonState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            DaemonState::New => "new",
            DaemonState::Formatted => "formatted",
            DaemonState::Up => "up",
            DaemonState::Failed => "failed",
        })
    }
}

/// One daemon of the cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DaemonEntry {
    pub id: u32,
    /// Set by registration (the uuid mkfs wrote into the label).
    pub uuid: Option<Uuid>,
    /// The node agent that owns the device.
    pub node: String,
    /// The device path on that node.
    pub device: String,
    pub state: DaemonState,
    /// The daemon's authentication key, set by registration.
    pub key: Option<String>,
    /// Why initialisation failed (state `failed`).
    pub reason: Option<String>,
}

/// The cluster map. Every committed proposal increments `epoch`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterMap {
    pub fsid: Uuid,
    pub epoch: u64,
    /// Serialized as a list (JSON object keys would be strings).
    #[serde(with = "daemons_as_list")]
    pub daemons: BTreeMap<u32, DaemonEntry>,
}

mod daemons_as_list {
    use super::DaemonEntry;
    use serde::{Deserialize, Deserializer, Serializer};
    use std::collections::BTreeMap;

    pub fn serialize<S: Serializer>(
        m: &BTreeMap<u32, DaemonEntry>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        s.collect_seq(m.values())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<BTreeMap<u32, DaemonEntry>, D::Error> {
        let v = Vec::<DaemonEntry>::deserialize(d)?;
        Ok(v.into_iter().map(|e| (e.id, e)).collect())
    }
}

/// One change of the map; a proposal is a list of them, journaled before it is applied.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Change {
    Alloc {
        id: u32,
        node: String,
        device: String,
    },
    Register {
        id: u32,
        uuid: Uuid,
        key: String,
    },
    Up {
        id: u32,
    },
    Failed {
        id: u32,
        reason: String,
    },
    Remove {
        id: u32,
    },
}

impl ClusterMap {
    /// An empty map of a new cluster (epoch 0: nothing committed yet).
    pub fn new(fsid: Uuid) -> ClusterMap {
        ClusterMap {
            fsid,
            epoch: 0,
            daemons: BTreeMap::new(),
        }
    }

    /// The `n` smallest ids not in the map.
    pub fn smallest_free(&self, n: usize) -> Vec<u32> {
        let mut out = Vec::with_capacity(n);
        let mut candidate = 0u32;
        while out.len() < n {
            if !self.daemons.contains_key(&candidate) {
                out.push(candidate);
            }
            candidate += 1;
        }
        out
    }

    fn entry(&self, id: u32) -> Result<&DaemonEntry, MonitorError> {
        self.daemons
            .get(&id)
            .ok_or(MonitorError::UnknownDaemon { id })
    }

    /// Checks that `change` is valid on this map (without applying it).
    pub fn check(&self, change: &Change) -> Result<(), MonitorError> {
        match change {
            Change::Alloc { id, node, device } => {
                if self.daemons.contains_key(id) {
                    return Err(MonitorError::Conflict(format!("id {id} is taken")));
                }
                if node.is_empty() || device.is_empty() {
                    return Err(MonitorError::BadRequest(
                        "node and device names must not be empty".into(),
                    ));
                }
                if let Some(other) = self.daemons.values().find(|d| {
                    &d.node == node && &d.device == device && d.state != DaemonState::Failed
                }) {
                    return Err(MonitorError::Conflict(format!(
                        "device {device} of node {node} already belongs to daemon {} ({})",
                        other.id, other.state
                    )));
                }
                Ok(())
            }
            Change::Register { id, .. } => {
                let e = self.entry(*id)?;
                match e.state {
                    DaemonState::New => Ok(()),
                    s => Err(MonitorError::Conflict(format!(
                        "daemon {id} is {s}, registration needs state new"
                    ))),
                }
            }
            Change::Up { id } => {
                let e = self.entry(*id)?;
                match e.state {
                    DaemonState::Formatted | DaemonState::Up => Ok(()),
                    s => Err(MonitorError::Conflict(format!(
                        "daemon {id} is {s}, it must be formatted (registered) before it is up"
                    ))),
                }
            }
            Change::Failed { id, .. } | Change::Remove { id } => self.entry(*id).map(|_| ()),
        }
    }

    /// Applies a change that [`ClusterMap::check`] accepted.
    pub fn apply(&mut self, change: &Change) -> Result<(), MonitorError> {
        self.check(change)?;
        match change {
            Change::Alloc { id, node, device } => {
                self.daemons.insert(
                    *id,
                    DaemonEntry {
                        id: *id,
                        uuid: None,
                        node: node.clone(),
                        device: device.clone(),
                        state: DaemonState::New,
                        key: None,
                        reason: None,
                    },
                );
            }
            Change::Register { id, uuid, key } => {
                let e = self.daemons.get_mut(id).expect("checked");
                e.uuid = Some(*uuid);
                e.key = Some(key.clone());
                e.state = DaemonState::Formatted;
            }
            Change::Up { id } => {
                self.daemons.get_mut(id).expect("checked").state = DaemonState::Up;
            }
            Change::Failed { id, reason } => {
                let e = self.daemons.get_mut(id).expect("checked");
                e.state = DaemonState::Failed;
                e.reason = Some(reason.clone());
            }
            Change::Remove { id } => {
                self.daemons.remove(id);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn alloc(id: u32, dev: &str) -> Change {
        Change::Alloc {
            id,
            node: "n0".into(),
            device: dev.into(),
        }
    }

    #[test]
    fn smallest_free_fills_holes() {
        let mut m = ClusterMap::new(Uuid::new_v4());
        for i in 0..5 {
            m.apply(&alloc(i, &format!("/dev/d{i}"))).unwrap();
        }
        m.apply(&Change::Remove { id: 1 }).unwrap();
        m.apply(&Change::Remove { id: 3 }).unwrap();
        assert_eq!(m.smallest_free(4), vec![1, 3, 5, 6]);
    }

    #[test]
    fn lifecycle_is_enforced() {
        let mut m = ClusterMap::new(Uuid::new_v4());
        m.apply(&alloc(0, "/dev/a")).unwrap();
        assert!(matches!(
            m.apply(&Change::Up { id: 0 }),
            Err(MonitorError::Conflict(_))
        ));
        m.apply(&Change::Register {
            id: 0,
            uuid: Uuid::new_v4(),
            key: "k".into(),
        })
        .unwrap();
        m.apply(&Change::Up { id: 0 }).unwrap();
        assert_eq!(m.daemons[&0].state, DaemonState::Up);
        assert!(matches!(
            m.apply(&Change::Up { id: 7 }),
            Err(MonitorError::UnknownDaemon { id: 7 })
        ));
        // The same device of the same node cannot get a second id.
        assert!(matches!(
            m.apply(&alloc(1, "/dev/a")),
            Err(MonitorError::Conflict(_))
        ));
    }
}
