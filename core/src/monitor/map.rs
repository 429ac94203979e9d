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
    /// The daemon's uuid: given at allocation (mkfs writes it into the label, so a device
    /// formatted for an earlier daemon of the same id is told apart), confirmed by
    /// registration. `None` only in maps journaled before allocations carried one.
    pub uuid: Option<Uuid>,
    /// The node agent that owns the device.
    pub node: String,
    /// The host the node runs on (empty: not given by the client that allocated the id).
    #[serde(default)]
    pub host: String,
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
    /// A new id for (node, device), or the id the map already holds for them when that
    /// daemon is not `up` (an init that failed or was interrupted, run again): it is reset
    /// to `new`.
    Alloc {
        id: u32,
        node: String,
        device: String,
        #[serde(default, skip_serializing_if = "String::is_empty")]
        host: String,
        /// The daemon's uuid (absent in journals written before allocations carried one).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        uuid: Option<Uuid>,
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

    /// The daemon of `device` of `node` that is not `failed`, else the failed one with the
    /// smallest id: the id a new allocation for them reuses unless it is `up`.
    pub fn daemon_of(&self, node: &str, device: &str) -> Option<&DaemonEntry> {
        let mut of = self
            .daemons
            .values()
            .filter(|d| d.node == node && d.device == device);
        let first = of.next()?;
        if first.state != DaemonState::Failed {
            return Some(first);
        }
        Some(of.find(|d| d.state != DaemonState::Failed).unwrap_or(first))
    }

    /// Checks that `change` is valid on this map (without applying it).
    pub fn check(&self, change: &Change) -> Result<(), MonitorError> {
        match change {
            Change::Alloc {
                id,
                node,
                device,
                host,
                ..
            } => {
                if node.is_empty() || device.is_empty() {
                    return Err(MonitorError::BadRequest(
                        "node and device names must not be empty".into(),
                    ));
                }
                if let Some(e) = self.daemons.get(id) {
                    if &e.node != node || &e.device != device {
                        return Err(MonitorError::Conflict(format!("id {id} is taken")));
                    }
                    if e.state == DaemonState::Up {
                        return Err(MonitorError::Conflict(format!(
                            "device {device} of node {node} already belongs to daemon {id} (up)"
                        )));
                    }
                }
                // One daemon that is not failed per device of a node, and per device of a
                // host (two node agents on one host must not format the same device).
                let clash = self.daemons.values().find(|d| {
                    d.id != *id
                        && d.state != DaemonState::Failed
                        && d.device == *device
                        && (d.node == *node || (!host.is_empty() && d.host == *host))
                });
                if let Some(other) = clash {
                    let whose = if &other.node == node {
                        format!("node {node}")
                    } else {
                        format!("host {host} (node {})", other.node)
                    };
                    return Err(MonitorError::Conflict(format!(
                        "device {device} of {whose} already belongs to daemon {} ({})",
                        other.id, other.state
                    )));
                }
                Ok(())
            }
            Change::Register { id, uuid, .. } => {
                let e = self.entry(*id)?;
                match e.state {
                    // The uuid the allocation gave (if any) is the one mkfs must have used.
                    DaemonState::New if e.uuid.is_none_or(|u| u == *uuid) => Ok(()),
                    DaemonState::New => Err(MonitorError::Conflict(format!(
                        "daemon {id} was allocated with uuid {}, not {uuid}",
                        e.uuid.map(|u| u.to_string()).unwrap_or_default()
                    ))),
                    // A repeated registration (its answer was lost, or a rerun found the
                    // device formatted): the same daemon, so it only replaces the key.
                    DaemonState::Formatted if e.uuid == Some(*uuid) => Ok(()),
                    DaemonState::Formatted => Err(MonitorError::Conflict(format!(
                        "daemon {id} is registered with uuid {}, not {uuid}",
                        e.uuid.map(|u| u.to_string()).unwrap_or_default()
                    ))),
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

    /// Applies a change that [`ClusterMap::check`] accepts (checked again here).
    pub fn apply(&mut self, change: &Change) -> Result<(), MonitorError> {
        self.check(change)?;
        fn entry<'a>(m: &'a mut ClusterMap, id: &u32) -> Result<&'a mut DaemonEntry, MonitorError> {
            m.daemons
                .get_mut(id)
                .ok_or(MonitorError::UnknownDaemon { id: *id })
        }
        match change {
            Change::Alloc {
                id,
                node,
                device,
                host,
                uuid,
            } => {
                self.daemons.insert(
                    *id,
                    DaemonEntry {
                        id: *id,
                        uuid: *uuid,
                        node: node.clone(),
                        host: host.clone(),
                        device: device.clone(),
                        state: DaemonState::New,
                        key: None,
                        reason: None,
                    },
                );
            }
            Change::Register { id, uuid, key } => {
                let e = entry(self, id)?;
                e.uuid = Some(*uuid);
                e.key = Some(key.clone());
                e.state = DaemonState::Formatted;
            }
            Change::Up { id } => entry(self, id)?.state = DaemonState::Up,
            Change::Failed { id, reason } => {
                let e = entry(self, id)?;
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
        alloc_on(id, "n0", "h0", dev)
    }

    fn alloc_on(id: u32, node: &str, host: &str, dev: &str) -> Change {
        Change::Alloc {
            id,
            node: node.into(),
            device: dev.into(),
            host: host.into(),
            uuid: None,
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

    #[test]
    fn a_daemon_that_is_not_up_keeps_its_id_and_registration_repeats() {
        let mut m = ClusterMap::new(Uuid::new_v4());
        m.apply(&alloc(0, "/dev/a")).unwrap();
        // Allocating (node, device) again while `new`: the same id, reset to new.
        m.apply(&alloc(0, "/dev/a")).unwrap();
        let u = Uuid::new_v4();
        let reg = |key: &str| Change::Register {
            id: 0,
            uuid: u,
            key: key.into(),
        };
        m.apply(&reg("k1")).unwrap();
        // The same registration again (a lost answer): accepted, the key replaced.
        m.apply(&reg("k2")).unwrap();
        assert_eq!(m.daemons[&0].key.as_deref(), Some("k2"));
        // Another uuid for a registered daemon is refused.
        let e = m
            .apply(&Change::Register {
                id: 0,
                uuid: Uuid::new_v4(),
                key: "k".into(),
            })
            .unwrap_err();
        assert!(e.to_string().contains("registered with uuid"), "{e}");
        m.apply(&Change::Failed {
            id: 0,
            reason: "report lost".into(),
        })
        .unwrap();
        assert_eq!(m.daemon_of("n0", "/dev/a").unwrap().id, 0);
        // Failed: a rerun gets the same id back, state new, reason gone.
        m.apply(&alloc(0, "/dev/a")).unwrap();
        let e = &m.daemons[&0];
        assert_eq!(
            (e.state, e.uuid, e.reason.as_deref()),
            (DaemonState::New, None, None)
        );
        m.apply(&reg("k3")).unwrap();
        m.apply(&Change::Up { id: 0 }).unwrap();
        // Up: no second allocation, neither under its id nor under another.
        for id in [0, 1] {
            let e = m.apply(&alloc(id, "/dev/a")).unwrap_err();
            assert!(
                e.to_string().contains("already belongs to daemon 0 (up)"),
                "{e}"
            );
        }
        // Another node's id is not reused for this device.
        m.apply(&alloc_on(1, "n1", "h1", "/dev/b")).unwrap();
        let e = m.apply(&alloc(1, "/dev/c")).unwrap_err();
        assert!(e.to_string().contains("id 1 is taken"), "{e}");
    }

    #[test]
    fn one_daemon_per_device_of_a_host() {
        let mut m = ClusterMap::new(Uuid::new_v4());
        m.apply(&alloc_on(0, "n0", "h", "/dev/a")).unwrap();
        // Another node on the same host with the same device.
        let e = m.apply(&alloc_on(1, "n1", "h", "/dev/a")).unwrap_err();
        assert!(
            e.to_string()
                .contains("device /dev/a of host h (node n0) already belongs to daemon 0"),
            "{e}"
        );
        // The same path on another host is another device.
        m.apply(&alloc_on(1, "n1", "h2", "/dev/a")).unwrap();
        // Once the first one failed, the device may go to another node.
        m.apply(&Change::Failed {
            id: 0,
            reason: "x".into(),
        })
        .unwrap();
        m.apply(&alloc_on(2, "n2", "h", "/dev/a")).unwrap();
        // A client that gives no host is checked per node only.
        m.apply(&alloc_on(3, "n3", "", "/dev/a")).unwrap();
    }
}
