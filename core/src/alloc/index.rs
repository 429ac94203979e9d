//! The index server: per node, the external endpoint of each of its processes; per
//! channel, where its data went. JSON lines over TCP ([`super::wire::IndexRequest`]), on
//! the shared server ([`crate::jsonl::server`]).
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
//! A line that is not a valid request gets `{ok: false, kind: "bad_request", error}`
//! ([`super::wire::Reply`]).

use std::collections::{BTreeMap, HashMap};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};

use super::wire::{
    self, Body, DeviceAdded, Done, ErrorKind, IndexRequest, Located, Location, Records, Reply,
    Routed, StoreRequest,
};
use super::AllocError;
use crate::jsonl::server::{Answer, Conn, Server};

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
    pub fn apply(&mut self, req: IndexRequest) -> Reply<Body> {
        let done = || Reply::Ok(Body::Done(Done {}));
        match req {
            IndexRequest::RegisterProcess {
                node,
                proc_id,
                endpoint,
            } => {
                let e = self.nodes.entry(node).or_default();
                e.endpoints.insert(proc_id, endpoint);
                done()
            }
            IndexRequest::Route { channel, exclude } => self.route(channel, &exclude).into_body(),
            IndexRequest::Unreachable { node, endpoint } => {
                if let Some(e) = self.nodes.get_mut(&node) {
                    e.endpoints.retain(|_, ep| *ep != endpoint);
                }
                done()
            }
            IndexRequest::NodeFull { node } => {
                if let Some(e) = self.nodes.get_mut(&node) {
                    e.full = true;
                }
                done()
            }
            IndexRequest::Record { channel, loc } => {
                self.records.entry(channel).or_default().push(loc);
                done()
            }
            IndexRequest::Lookup { channel } => match self.records.get(&channel) {
                Some(l) => Reply::Ok(Body::Located(Located { locs: l.clone() })),
                None => Reply::refused(Some(ErrorKind::NotFound), AllocError::NotFound { channel }),
            },
            IndexRequest::Records => {
                let mut records: Vec<(u64, Location)> = self
                    .records
                    .iter()
                    .flat_map(|(c, ls)| ls.iter().map(|l| (*c, l.clone())))
                    .collect();
                records.sort_by_key(|r| r.0);
                Reply::Ok(Body::Records(Records { records }))
            }
            IndexRequest::DeviceOnline { node, .. } => {
                // A device coming online gives the node room again.
                if let Some(e) = self.nodes.get_mut(&node) {
                    e.full = false;
                }
                done()
            }
        }
    }

    fn route(&mut self, channel: u64, exclude: &[String]) -> Reply<Routed> {
        if self.nodes.values().all(|e| e.endpoints.is_empty()) {
            return Reply::refused(
                Some(ErrorKind::NoNode),
                "no node process is registered with the index",
            );
        }
        let cands: Vec<(&String, &NodeEntry)> = self
            .nodes
            .iter()
            .filter(|(n, e)| !e.full && !exclude.contains(n) && !e.endpoints.is_empty())
            .collect();
        if cands.is_empty() {
            return Reply::refused(
                Some(ErrorKind::ClusterFull),
                "the cluster is full: no node has room",
            );
        }
        let (n, e) = cands[self.next % cands.len()];
        self.next = self.next.wrapping_add(1);
        let i = (channel % e.endpoints.len() as u64) as usize;
        // `i` is below the number of endpoints, which is not zero.
        let endpoint = e.endpoints.values().nth(i).cloned().unwrap_or_default();
        Reply::Ok(Routed {
            node: n.clone(),
            endpoint,
        })
    }

    fn endpoints(&self, node: &str) -> Vec<String> {
        self.nodes
            .get(node)
            .map(|e| e.endpoints.values().cloned().collect())
            .unwrap_or_default()
    }
}

/// Every record of the index at `addr`, by channel.
pub fn records(addr: &str) -> Result<Vec<(u64, Location)>, AllocError> {
    Ok(wire::call::<_, Records>(addr, &IndexRequest::Records)?
        .into_result()?
        .records)
}

/// A running index server. Dropping the handle leaves it running for the rest of the
/// process (the `index serve` process and the tests keep only its address);
/// [`stop`](Self::stop) stops it.
#[derive(Debug)]
pub struct IndexServer {
    pub addr: SocketAddr,
    server: Server<TcpListener>,
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
        let server = Server::serve(l, "index", move |mut conn: Conn<TcpStream>| {
            wire::converse(&mut conn, |req, _| Answer::Reply(handle(&state, req)))
        })
        .map_err(|e| AllocError::net("starting the index server", e))?
        .keep_serving_when_dropped();
        Ok(IndexServer { addr, server })
    }

    /// Stops the server; returns once its connections are closed.
    pub fn stop(self) {
        self.server.stop();
    }
}

/// One request, with the forwarding and checks that need the network (outside the
/// state's lock).
fn handle(state: &Mutex<IndexState>, req: IndexRequest) -> Reply<Body> {
    let lock = || state.lock().unwrap_or_else(|e| e.into_inner());
    match req {
        IndexRequest::DeviceOnline { node, device } => {
            let eps = lock().endpoints(&node);
            let fwd = StoreRequest::DeviceOnline {
                device: device.clone(),
            };
            let mut rep = Reply::refused(None, format!("node {node:?} has no process"));
            for ep in eps {
                match wire::call::<_, DeviceAdded>(&ep, &fwd) {
                    Ok(Reply::Ok(added)) => {
                        lock().apply(IndexRequest::DeviceOnline {
                            node: node.clone(),
                            device: device.clone(),
                        });
                        return Reply::Ok(Body::DeviceAdded(added));
                    }
                    Ok(Reply::Refused(r)) => rep = Reply::Refused(r),
                    Err(e) => rep = Reply::refused(None, e),
                }
            }
            rep
        }
        IndexRequest::Unreachable { node, endpoint } => {
            // Forget the endpoint only if the index cannot reach it either.
            let reachable = endpoint.parse::<SocketAddr>().is_ok_and(|a| {
                TcpStream::connect_timeout(&a, std::time::Duration::from_secs(1)).is_ok()
            });
            if reachable {
                Reply::Ok(Body::Done(Done {}))
            } else {
                lock().apply(IndexRequest::Unreachable { node, endpoint })
            }
        }
        other => lock().apply(other),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::alloc::region::DeviceSpec;

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

    fn kind(r: &Reply<Body>) -> Option<ErrorKind> {
        match r {
            Reply::Refused(f) => f.kind,
            Reply::Ok(_) => None,
        }
    }

    fn route(s: &mut IndexState, channel: u64, exclude: &[&str]) -> Reply<Body> {
        s.apply(IndexRequest::Route {
            channel,
            exclude: exclude.iter().map(|n| n.to_string()).collect(),
        })
    }

    /// The (node, endpoint) a route picked.
    fn routed(r: Reply<Body>) -> (String, String) {
        match r {
            Reply::Ok(Body::Routed(r)) => (r.node, r.endpoint),
            other => panic!("not routed: {other:?}"),
        }
    }

    #[test]
    fn routing_skips_full_and_excluded_nodes_then_reports_cluster_full() {
        let mut s = IndexState::default();
        let r = route(&mut s, 1, &[]);
        assert_eq!(kind(&r), Some(ErrorKind::NoNode), "empty cluster: {r:?}");
        for (n, id, ep) in [("a", 1, "1"), ("a", 2, "2"), ("b", 1, "3")] {
            let r = s.apply(IndexRequest::RegisterProcess {
                node: n.into(),
                proc_id: id,
                endpoint: ep.into(),
            });
            assert_eq!(r, Reply::Ok(Body::Done(Done {})));
        }
        routed(route(&mut s, 1, &[]));
        assert_eq!(routed(route(&mut s, 1, &["a"])), ("b".into(), "3".into()));
        s.apply(IndexRequest::NodeFull { node: "b".into() });
        assert_eq!(
            routed(route(&mut s, 3, &[])),
            ("a".into(), "2".into()),
            "process picked by channel"
        );
        let r = route(&mut s, 3, &["a"]);
        assert_eq!(kind(&r), Some(ErrorKind::ClusterFull), "{r:?}");
        // A device coming online on b makes it routable again.
        s.apply(IndexRequest::DeviceOnline {
            node: "b".into(),
            device: DeviceSpec::path("/dev/y"),
        });
        assert_eq!(routed(route(&mut s, 3, &["a"])).0, "b");
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
        let eps: Vec<String> = (0..4).map(|ch| routed(route(&mut s, ch, &[])).1).collect();
        assert_eq!(eps, ["new-1", "ep-2", "new-1", "ep-2"]);
        // Process 2 died without a restart: once reported, every channel goes to 1.
        s.apply(IndexRequest::Unreachable {
            node: "a".into(),
            endpoint: "ep-2".into(),
        });
        for ch in 0..4 {
            assert_eq!(routed(route(&mut s, ch, &[])).1, "new-1");
        }
        // Every process gone: no node, rather than a full cluster.
        s.apply(IndexRequest::Unreachable {
            node: "a".into(),
            endpoint: "new-1".into(),
        });
        match route(&mut s, 0, &[]) {
            Reply::Refused(f) => {
                assert_eq!(f.kind, Some(ErrorKind::NoNode), "{f:?}");
                assert!(f.error.contains("no node"), "{f:?}");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn lookup_of_a_channel_never_stored_is_a_clear_not_found() {
        let mut s = IndexState::default();
        let r = s.apply(IndexRequest::Lookup { channel: 42 });
        assert_eq!(
            r,
            Reply::refused(Some(ErrorKind::NotFound), "channel 42 was never stored")
        );
        s.apply(IndexRequest::Record {
            channel: 42,
            loc: loc("a"),
        });
        s.apply(IndexRequest::Record {
            channel: 42,
            loc: loc("b"),
        });
        let r = s.apply(IndexRequest::Lookup { channel: 42 });
        assert_eq!(
            r,
            Reply::Ok(Body::Located(Located {
                locs: vec![loc("a"), loc("b")]
            }))
        );
        match s.apply(IndexRequest::Records) {
            Reply::Ok(Body::Records(r)) => assert_eq!(r.records.len(), 2),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn the_server_answers_and_stops_with_a_client_connected() {
        use std::io::{BufRead, BufReader, Write};
        let s = IndexServer::start("127.0.0.1:0").unwrap();
        let addr = s.addr.to_string();
        assert_eq!(records(&addr).unwrap(), vec![]);
        let mut c = TcpStream::connect(&addr).unwrap();
        c.write_all(b"{\"op\":\"records\"}\n").unwrap();
        let mut r = BufReader::new(c.try_clone().unwrap());
        let mut line = String::new();
        r.read_line(&mut line).unwrap();
        assert_eq!(line, "{\"ok\":true,\"records\":[]}\n");
        s.stop();
        line.clear();
        assert_eq!(r.read_line(&mut line).unwrap(), 0, "closed by the stop");
        assert!(records(&addr).is_err(), "no longer listening");
    }
}
