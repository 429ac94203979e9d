//! The index server: per node, the external endpoint of each of its processes; per
//! channel, where its data went. JSON lines over TCP.
//!
//! * `register_process {node, endpoint}`: a node process announces its external port.
//! * `route {channel, exclude}`: picks a node (round robin over nodes not full and not
//!   excluded) and one of its processes (by channel); "cluster is full" when none is left.
//! * `node_full {node}`: a process reports its node out of space.
//! * `record {channel, loc}` / `lookup {channel}` (clear not-found) / `records`.
//! * `device_online {node, region}`: tells one of the node's processes that a device came
//!   online; the node's leader initialises it.

use std::collections::{BTreeMap, HashMap};
use std::io::{BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use super::node::{recv_line, send_line};
use super::segs::DeviceRegion;
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
    RegisterProcess { node: String, endpoint: String },
    Route { channel: u64, exclude: Vec<String> },
    NodeFull { node: String },
    Record { channel: u64, loc: Location },
    Lookup { channel: u64 },
    Records,
    DeviceOnline { node: String, region: DeviceRegion },
}

/// Error kinds a client can act on.
pub const KIND_NOT_FOUND: &str = "not_found";
pub const KIND_CLUSTER_FULL: &str = "cluster_full";
pub const KIND_NODE_FULL: &str = "node_full";
pub const KIND_TOO_LARGE: &str = "too_large";

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
    endpoints: Vec<String>,
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
            IndexRequest::RegisterProcess { node, endpoint } => {
                let e = self.nodes.entry(node).or_default();
                if !e.endpoints.contains(&endpoint) {
                    e.endpoints.push(endpoint);
                }
                IndexReply::ok()
            }
            IndexRequest::Route { channel, exclude } => {
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
                IndexReply {
                    node: Some(n.clone()),
                    endpoint: Some(
                        e.endpoints[(channel % e.endpoints.len() as u64) as usize].clone(),
                    ),
                    ..IndexReply::ok()
                }
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
            .map(|e| e.endpoints.clone())
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
    while let Ok(Some(req)) = recv_line::<IndexRequest>(&mut r) {
        let reply = match req {
            IndexRequest::DeviceOnline { node, region } => {
                let eps = state
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .endpoints(&node);
                let fwd = super::store::StoreRequest::DeviceOnline {
                    region: region.clone(),
                };
                let mut rep = IndexReply::err(None, format!("node {node:?} has no process"));
                for ep in eps {
                    match call(&ep, &fwd) {
                        Ok(r) if r.ok => {
                            state.lock().unwrap_or_else(|e| e.into_inner()).apply(
                                IndexRequest::DeviceOnline {
                                    node: node.clone(),
                                    region: region.clone(),
                                },
                            );
                            rep = r;
                            break;
                        }
                        Ok(r) => rep = r,
                        Err(e) => rep = IndexReply::err(None, e),
                    }
                }
                rep
            }
            other => state.lock().unwrap_or_else(|e| e.into_inner()).apply(other),
        };
        if send_line(&mut w, &reply).is_err() {
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
        for (n, ep) in [("a", "1"), ("a", "2"), ("b", "3")] {
            assert!(
                s.apply(IndexRequest::RegisterProcess {
                    node: n.into(),
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
            region: DeviceRegion {
                path: "/dev/y".into(),
                offset: 0,
                len: 1 << 20,
            },
        });
        let r = s.apply(IndexRequest::Route {
            channel: 3,
            exclude: vec!["a".into()],
        });
        assert_eq!(r.node.as_deref(), Some("b"));
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
