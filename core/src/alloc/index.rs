//! The index server: per node, the external endpoint of each of its processes; per
//! channel, where its data went. JSON lines over TCP.
//!
//! * `register_process {node, proc_id, endpoint}`: a node process announces its external
//!   port; a restarted process (same node and proc id) replaces its old endpoint.
//! * `route {channel, exclude}`: picks a node (round robin over nodes not full and not
//!   excluded) and one of its processes (by channel); "no node registered" when the index
//!   knows no process, "cluster is full" when every node is full or excluded.
//! * `unreachable {node, endpoint}`: a client could not connect to an endpoint; the index
//!   tries it too and forgets it if it cannot connect either.
//! * `node_full {node}`: a process reports its node out of space.
//! * `record {channel, loc}` / `lookup {channel}` (clear not-found) / `records`.
//! * `device_online {node, device}`: tells one of the node's processes that a device came
//!   online; the node's leader initialises it.
//!
//! A line that is not a valid request gets `{ok: false, kind: "bad_request", error}`.

use std::collections::{BTreeMap, HashMap};
use std::io::{BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use super::node::{next_request, recv_line, send_line, Incoming, KIND_BAD_REQUEST};
use super::region::DeviceSpec;
use super::AllocError;

/// Where a piece of a channel's data lives.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Location {
    pub node: String,
    pub device: PathBuf,
    pub dev: u16,
    pub block: u32,
    /// Byte offset of the data on the device.
    pub device_offset: u64,
    /// Offset of the data inside its block.
    pub offset_in_block: u64,
    pub len: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum IndexRequest {
    RegisterProcess {
        node: String,
        proc_id: u16,
        endpoint: String,
    },
    Route {
        channel: u64,
        exclude: Vec<String>,
    },
    Unreachable {
        node: String,
        endpoint: String,
    },
    NodeFull {
        node: String,
    },
    Record {
        channel: u64,
        loc: Location,
    },
    Lookup {
        channel: u64,
    },
    Records,
    DeviceOnline {
        node: String,
        device: DeviceSpec,
    },
}

/// Error kinds a client can act on.
pub const KIND_NOT_FOUND: &str = "not_found";
pub const KIND_CLUSTER_FULL: &str = "cluster_full";
pub const KIND_NODE_FULL: &str = "node_full";
pub const KIND_TOO_LARGE: &str = "too_large";
pub const KIND_NO_NODE: &str = "no_node";

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct IndexReply {
    pub ok: bool,
    #[serde(default)]
    pub error: Option<String>,
    #[serde(default)]
    pub kind: Option<String>,
    #[serde(default)]
    pub node: Option<String>,
    #[serde(default)]
    pub endpoint: Option<String>,
    #[serde(default)]
    pub locs: Vec<Location>,
    #[serde(default)]
    pub records: Vec<(u64, Location)>,
    #[serde(default)]
    pub dev: Option<u16>,
}

impl IndexReply {
    pub fn ok() -> IndexReply {
        IndexReply {
            ok: true,
            ..Default::default()
        }
    }
    pub fn err(kind: Option<&str>, e: impl std::fmt::Display) -> IndexReply {
        IndexReply {
            ok: false,
            error: Some(e.to_string()),
            kind: kind.map(str::to_string),
            ..Default::default()
        }
    }
}

#[derive(Debug, Default)]
struct NodeEntry {
    /// Endpoint of each process, by proc id.
    endpoints: BTreeMap<u16, String>,
    full: bool,
}

/// The index's state, apart from I/O (tested directly).
#[derive(Debug, Default)]
pub struct IndexState {
    nodes: BTreeMap<String, NodeEntry>,
    records: HashMap<u64, Vec<Location>>,
    next: usize,
}

impl IndexState {
    /// Handles one request that needs no forwarding.
    pub fn apply(&mut self, req: IndexRequest) -> IndexReply {
        match req {
            IndexRequest::RegisterProcess {
                node,
                proc_id,
                endpoint,
            } => {
                let e = self.nodes.entry(node).or_default();
                e.endpoints.insert(proc_id, endpoint);
                IndexReply::ok()
            }
            IndexRequest::Route { channel, exclude } => {
                if self.nodes.values().all(|e| e.endpoints.is_empty()) {
                    return IndexReply::err(
                        Some(KIND_NO_NODE),
                        "no node process is registered with the index",
                    );
                }
                let cands: Vec<(&String, &NodeEntry)> = self
                    .nodes
                    .iter()
                    .filter(|(n, e)| !e.full && !exclude.contains(n) && !e.endpoints.is_empty())
                    .collect();
                if cands.is_empty() {
                    return IndexReply::err(
                        Some(KIND_CLUSTER_FULL),
                        "the cluster is full: no node has room",
                    );
                }
                let (n, e) = cands[self.next % cands.len()];
                self.next = self.next.wrapping_add(1);
                let i = (channel % e.endpoints.len() as u64) as usize;
                IndexReply {
                    node: Some(n.clone()),
                    endpoint: e.endpoints.values().nth(i).cloned(),
                    ..IndexReply::ok()
                }
            }
            IndexRequest::Unreachable { node, endpoint } => {
                if let Some(e) = self.nodes.get_mut(&node) {
                    e.endpoints.retain(|_, ep| *ep != endpoint);
                }
                IndexReply::ok()
            }
            IndexRequest::NodeFull { node } => {
                if let Some(e) = self.nodes.get_mut(&node) {
                    e.full = true;
                }
                IndexReply::ok()
            }
            IndexRequest::Record { channel, loc } => {
                self.records.entry(channel).or_default().push(loc);
                IndexReply::ok()
            }
            IndexRequest::Lookup { channel } => match self.records.get(&channel) {
                Some(l) => IndexReply {
                    locs: l.clone(),
                    ..IndexReply::ok()
                },
                None => IndexReply::err(Some(KIND_NOT_FOUND), AllocError::NotFound { channel }),
            },
            IndexRequest::Records => {
                let mut records: Vec<(u64, Location)> = self
                    .records
                    .iter()
                    .flat_map(|(c, ls)| ls.iter().map(|l| (*c, l.clone())))
                    .collect();
                records.sort_by_key(|r| r.0);
                IndexReply {
                    records,
                    ..IndexReply::ok()
                }
            }
            IndexRequest::DeviceOnline { node, .. } => {
                // A device coming online gives the node room again.
                if let Some(e) = self.nodes.get_mut(&node) {
                    e.full = false;
                }
                IndexReply::ok()
            }
        }
    }

    fn endpoints(&self, node: &str) -> Vec<String> {
        self.nodes
            .get(node)
            .map(|e| e.endpoints.values().cloned().collect())
            .unwrap_or_default()
    }
}

/// Sends one request to `addr` and reads the reply.
pub fn call<Q: Serialize>(addr: &str, req: &Q) -> Result<IndexReply, AllocError> {
    let mut s = TcpStream::connect(addr)
        .map_err(|e| AllocError::net(format!("connecting to {addr}"), e))?;
    send_line(&mut s, req).map_err(|e| AllocError::net(format!("sending to {addr}"), e))?;
    let mut r = BufReader::new(s);
    recv_line::<IndexReply>(&mut r)?
        .ok_or_else(|| AllocError::Protocol(format!("{addr} closed the connection")))
}

/// A running index server.
#[derive(Debug)]
pub struct IndexServer {
    pub addr: SocketAddr,
}

impl IndexServer {
    /// Binds `listen` and serves in background threads.
    pub fn start(listen: &str) -> Result<IndexServer, AllocError> {
        let l = TcpListener::bind(listen)
            .map_err(|e| AllocError::net(format!("binding {listen}"), e))?;
        let addr = l
            .local_addr()
            .map_err(|e| AllocError::net("local_addr", e))?;
        let state = Arc::new(Mutex::new(IndexState::default()));
        std::thread::Builder::new()
            .name("index-accept".into())
            .spawn(move || {
                for s in l.incoming().flatten() {
                    let st = state.clone();
                    let _ = std::thread::Builder::new()
                        .name("index-conn".into())
                        .spawn(move || serve_conn(st, s));
                }
            })
            .map_err(|e| AllocError::net("spawning", e))?;
        Ok(IndexServer { addr })
    }
}

fn serve_conn(state: Arc<Mutex<IndexState>>, s: TcpStream) {
    let Ok(mut w) = s.try_clone() else { return };
    let mut r = BufReader::new(s);
    let lock = || state.lock().unwrap_or_else(|e| e.into_inner());
    loop {
        let (reply, close) = match next_request::<IndexRequest>(&mut r) {
            Incoming::End => break,
            Incoming::Bad { error, fatal } => {
                (IndexReply::err(Some(KIND_BAD_REQUEST), error), fatal)
            }
            Incoming::Request(IndexRequest::DeviceOnline { node, device }) => {
                let eps = lock().endpoints(&node);
                let fwd = super::store::StoreRequest::DeviceOnline {
                    device: device.clone(),
                };
                let mut rep = IndexReply::err(None, format!("node {node:?} has no process"));
                for ep in eps {
                    match call(&ep, &fwd) {
                        Ok(r) if r.ok => {
                            lock().apply(IndexRequest::DeviceOnline {
                                node: node.clone(),
                                device: device.clone(),
                            });
                            rep = r;
                            break;
                        }
                        Ok(r) => rep = r,
                        Err(e) => rep = IndexReply::err(None, e),
                    }
                }
                (rep, false)
            }
            Incoming::Request(IndexRequest::Unreachable { node, endpoint }) => {
                // Forget the endpoint only if the index cannot reach it either.
                let reachable = endpoint.parse::<SocketAddr>().is_ok_and(|a| {
                    TcpStream::connect_timeout(&a, std::time::Duration::from_secs(1)).is_ok()
                });
                let rep = if reachable {
                    IndexReply::ok()
                } else {
                    lock().apply(IndexRequest::Unreachable { node, endpoint })
                };
                (rep, false)
            }
            Incoming::Request(other) => (lock().apply(other), false),
        };
        if send_line(&mut w, &reply).is_err() || close {
            break;
        }
        let _ = w.flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn loc(node: &str) -> Location {
        Location {
            node: node.into(),
            device: "/dev/x".into(),
            dev: 0,
            block: 1,
            device_offset: 4096,
            offset_in_block: 0,
            len: 10,
        }
    }

    #[test]
    fn routing_skips_full_and_excluded_nodes_then_reports_cluster_full() {
        let mut s = IndexState::default();
        let r = s.apply(IndexRequest::Route {
            channel: 1,
            exclude: vec![],
        });
        assert_eq!(
            r.kind.as_deref(),
            Some(KIND_NO_NODE),
            "empty cluster: {r:?}"
        );
        for (n, id, ep) in [("a", 1, "1"), ("a", 2, "2"), ("b", 1, "3")] {
            assert!(
                s.apply(IndexRequest::RegisterProcess {
                    node: n.into(),
                    proc_id: id,
                    endpoint: ep.into()
                })
                .ok
            );
        }
        let r = s.apply(IndexRequest::Route {
            channel: 1,
            exclude: vec![],
        });
        assert!(r.ok);
        let r = s.apply(IndexRequest::Route {
            channel: 1,
            exclude: vec!["a".into()],
        });
        assert_eq!(r.node.as_deref(), Some("b"));
        assert_eq!(r.endpoint.as_deref(), Some("3"));
        s.apply(IndexRequest::NodeFull { node: "b".into() });
        let r = s.apply(IndexRequest::Route {
            channel: 3,
            exclude: vec![],
        });
        assert_eq!(r.node.as_deref(), Some("a"));
        assert_eq!(
            r.endpoint.as_deref(),
            Some("2"),
            "process picked by channel"
        );
        let r = s.apply(IndexRequest::Route {
            channel: 3,
            exclude: vec!["a".into()],
        });
        assert!(!r.ok);
        assert_eq!(r.kind.as_deref(), Some(KIND_CLUSTER_FULL));
        // A device coming online on b makes it routable again.
        s.apply(IndexRequest::DeviceOnline {
            node: "b".into(),
            device: DeviceSpec::path("/dev/y"),
        });
        let r = s.apply(IndexRequest::Route {
            channel: 3,
            exclude: vec!["a".into()],
        });
        assert_eq!(r.node.as_deref(), Some("b"));
    }

    #[test]
    fn a_restarted_process_replaces_its_endpoint_and_an_unreachable_one_is_forgotten() {
        let mut s = IndexState::default();
        let reg = |s: &mut IndexState, id: u16, ep: &str| {
            s.apply(IndexRequest::RegisterProcess {
                node: "a".into(),
                proc_id: id,
                endpoint: ep.into(),
            })
        };
        reg(&mut s, 1, "old-1");
        reg(&mut s, 2, "ep-2");
        // Process 1 restarts on another port: its old endpoint is gone.
        reg(&mut s, 1, "new-1");
        let eps: Vec<String> = (0..4)
            .map(|ch| {
                s.apply(IndexRequest::Route {
                    channel: ch,
                    exclude: vec![],
                })
                .endpoint
                .unwrap()
            })
            .collect();
        assert_eq!(eps, ["new-1", "ep-2", "new-1", "ep-2"]);
        // Process 2 died without a restart: once reported, every channel goes to 1.
        s.apply(IndexRequest::Unreachable {
            node: "a".into(),
            endpoint: "ep-2".into(),
        });
        for ch in 0..4 {
            let r = s.apply(IndexRequest::Route {
                channel: ch,
                exclude: vec![],
            });
            assert_eq!(r.endpoint.as_deref(), Some("new-1"));
        }
        // Every process gone: no node, rather than a full cluster.
        s.apply(IndexRequest::Unreachable {
            node: "a".into(),
            endpoint: "new-1".into(),
        });
        let r = s.apply(IndexRequest::Route {
            channel: 0,
            exclude: vec![],
        });
        assert_eq!(r.kind.as_deref(), Some(KIND_NO_NODE), "{r:?}");
        assert!(r.error.unwrap().contains("no node"));
    }

    #[test]
    fn lookup_of_a_channel_never_stored_is_a_clear_not_found() {
        let mut s = IndexState::default();
        let r = s.apply(IndexRequest::Lookup { channel: 42 });
        assert!(!r.ok);
        assert_eq!(r.kind.as_deref(), Some(KIND_NOT_FOUND));
        assert_eq!(r.error.as_deref(), Some("channel 42 was never stored"));
        s.apply(IndexRequest::Record {
            channel: 42,
            loc: loc("a"),
        });
        s.apply(IndexRequest::Record {
            channel: 42,
            loc: loc("b"),
        });
        let r = s.apply(IndexRequest::Lookup { channel: 42 });
        assert_eq!(r.locs, vec![loc("a"), loc("b")]);
        assert_eq!(s.apply(IndexRequest::Records).records.len(), 2);
    }
}
