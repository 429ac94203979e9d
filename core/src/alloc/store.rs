//! The store path: a node process's external port, and the client.
//!
//! Client: `route` at the index server → the chosen process's endpoint → `store`
//! (a JSON header line, then the data). The process takes a block with room (first the
//! unfilled-block table, then a device's free blocks), writes the data there through
//! io_uring with O_DIRECT, commits the block, records channel → location at the index
//! server and only then answers. A node without room answers `node_full`; the client
//! tells the index and asks for another node, until the index says the cluster is full.
//!
//! One store at a time per process (the process's current-block record names one block).
//! Known gap: a process killed after committing a fresh block but before the index
//! recorded it leaves that block filled and unrecorded (the audit reports it as leaked);
//! closing it needs recovery to consult the index server.

use std::collections::HashMap;
use std::io::{BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use super::allocator::BlockAllocator;
use super::index::{
    self, IndexReply, IndexRequest, Location, KIND_CLUSTER_FULL, KIND_NODE_FULL, KIND_NOT_FOUND,
    KIND_TOO_LARGE,
};
use super::node::{recv_line, send_line, NodeProcess};
use super::segs::{BlockRef, BlockState, DeviceRegion, Unfilled};
use super::{AllocError, UNIT};
use crate::dev::{AlignedBuf, Device, IoEngine, UringEngine};

/// Requests on a process's external port.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum StoreRequest {
    /// Followed by `len` bytes of data.
    Store { channel: u64, len: u64 },
    /// The index server says a device came online on this node.
    DeviceOnline { region: DeviceRegion },
}

/// One process's store service.
pub struct StoreService {
    node_name: String,
    index: String,
    p: Arc<NodeProcess>,
    inner: Mutex<Inner>,
}

impl std::fmt::Debug for StoreService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreService")
            .field("node", &self.node_name)
            .finish()
    }
}

struct Inner {
    alloc: Box<dyn BlockAllocator>,
    eng: UringEngine,
    devices: HashMap<u16, Device>,
    next: usize,
}

impl StoreService {
    pub fn new(
        p: Arc<NodeProcess>,
        node_name: &str,
        index: &str,
    ) -> Result<StoreService, AllocError> {
        let alloc = p.allocator()?;
        Ok(StoreService {
            node_name: node_name.to_string(),
            index: index.to_string(),
            inner: Mutex::new(Inner {
                alloc,
                eng: UringEngine::with_queue_depth(4)?,
                devices: HashMap::new(),
                next: p.cfg.proc_id as usize,
            }),
            p,
        })
    }

    /// Serves the external port (forever, one thread per connection) and registers the
    /// endpoint with the index server.
    pub fn serve(self: Arc<Self>, l: TcpListener) -> Result<String, AllocError> {
        let ep = l
            .local_addr()
            .map_err(|e| AllocError::net("local_addr", e))?
            .to_string();
        let rep = index::call(
            &self.index,
            &IndexRequest::RegisterProcess {
                node: self.node_name.clone(),
                endpoint: ep.clone(),
            },
        )?;
        if !rep.ok {
            return Err(AllocError::Protocol(rep.error.unwrap_or_default()));
        }
        let me = self.clone();
        std::thread::Builder::new()
            .name("store-accept".into())
            .spawn(move || {
                for s in l.incoming().flatten() {
                    let me = me.clone();
                    let _ = std::thread::Builder::new()
                        .name("store-conn".into())
                        .spawn(move || me.conn(s));
                }
            })
            .map_err(|e| AllocError::net("spawning", e))?;
        Ok(ep)
    }

    fn conn(&self, s: TcpStream) {
        let Ok(mut w) = s.try_clone() else { return };
        let mut r = BufReader::new(s);
        while let Ok(Some(req)) = recv_line::<StoreRequest>(&mut r) {
            let reply = match req {
                StoreRequest::Store { channel, len } => {
                    let bs = self.p.at.node.block_size();
                    if len > bs {
                        // Drain what the client sent, then refuse.
                        let _ = std::io::copy(&mut (&mut r).take(len), &mut std::io::sink());
                        IndexReply::err(
                            Some(KIND_TOO_LARGE),
                            AllocError::TooLarge {
                                len,
                                block_size: bs,
                            },
                        )
                    } else {
                        let mut data = vec![0u8; len as usize];
                        if r.read_exact(&mut data).is_err() {
                            break;
                        }
                        match self.store(channel, &data) {
                            Ok(loc) => IndexReply {
                                locs: vec![loc],
                                ..IndexReply::ok()
                            },
                            Err(AllocError::NodeFull) => {
                                IndexReply::err(Some(KIND_NODE_FULL), AllocError::NodeFull)
                            }
                            Err(e) => IndexReply::err(None, e),
                        }
                    }
                }
                StoreRequest::DeviceOnline { region } => match self.p.device_online(&region) {
                    Ok(i) => IndexReply {
                        dev: Some(i),
                        ..IndexReply::ok()
                    },
                    Err(e) => IndexReply::err(None, e),
                },
            };
            if send_line(&mut w, &reply).is_err() {
                break;
            }
        }
    }

    /// Places, writes, commits and records `data` for `channel`.
    pub fn store(&self, channel: u64, data: &[u8]) -> Result<Location, AllocError> {
        let at = &self.p.at;
        let bs = at.node.block_size();
        if data.len() as u64 > bs {
            return Err(AllocError::TooLarge {
                len: data.len() as u64,
                block_size: bs,
            });
        }
        let units = (data.len() as u64).div_ceil(UNIT).max(1) as u32;
        let block_units = (bs / UNIT) as u32;
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let inner = &mut *g;
        loop {
            at.refresh()?;
            let (b, prior) = self.place(inner, units, block_units)?;
            let d = at.device(b.dev)?;
            let region = d.region();
            if let std::collections::hash_map::Entry::Vacant(e) = inner.devices.entry(b.dev) {
                e.insert(Device::open(&region.path)?);
            }
            let dev = &inner.devices[&b.dev];
            let mut buf = AlignedBuf::new((units as u64 * UNIT) as usize);
            buf[..data.len()].copy_from_slice(data);
            let off_in_block = prior as u64 * UNIT;
            let dev_off = d.block_offset(b.block) + off_in_block;
            let written = inner.eng.write_at(dev, dev_off, &buf);
            let used = prior + units;
            let committed = written
                .map_err(AllocError::from)
                .and_then(|()| inner.alloc.commit(b, used as u64 * UNIT));
            match committed {
                Ok(()) => {}
                Err(AllocError::DeviceOffline { .. }) => continue, // placed again elsewhere
                Err(e) => {
                    self.give_back(inner, b, prior);
                    return Err(e);
                }
            }
            if used < block_units {
                let _l = at.unfilled.lock()?;
                at.unfilled.put(Unfilled {
                    block: b,
                    used_units: used,
                });
            }
            let loc = Location {
                node: self.node_name.clone(),
                device: region.path.clone(),
                dev: b.dev,
                block: b.block,
                device_offset: dev_off,
                offset_in_block: off_in_block,
                len: data.len() as u64,
            };
            let rep = index::call(
                &self.index,
                &IndexRequest::Record {
                    channel,
                    loc: loc.clone(),
                },
            )?;
            if !rep.ok {
                return Err(AllocError::Protocol(rep.error.unwrap_or_default()));
            }
            return Ok(loc);
        }
    }

    /// A block with `units` of room: an unfilled one first, else a free one. Returns the
    /// block and the units already used in it.
    fn place(
        &self,
        inner: &mut Inner,
        units: u32,
        block_units: u32,
    ) -> Result<(BlockRef, u32), AllocError> {
        let at = &self.p.at;
        {
            let _l = at.unfilled.lock()?;
            let online = |dev: u16| at.device(dev).map(|d| d.is_online()).unwrap_or(false);
            if let Some(u) = at.unfilled.take_fitting(units, block_units, online) {
                let d = at.device(u.block.dev)?;
                d.set_state(
                    u.block.block,
                    BlockState::InFlight {
                        owner: self.p.cfg.proc_id,
                        prior_units: u.used_units,
                    },
                );
                self.p.me.current().store(u.block.pack(), Ordering::Release);
                return Ok((u.block, u.used_units));
            }
        }
        let devs = at.online_devices();
        for _ in 0..devs.len() {
            let dev = devs[inner.next % devs.len()];
            inner.next += 1;
            match inner.alloc.alloc(dev) {
                Ok(b) => return Ok((b, 0)),
                Err(AllocError::DeviceFull { .. }) | Err(AllocError::DeviceOffline { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        Err(AllocError::NodeFull)
    }

    /// Undoes a placement whose write failed.
    fn give_back(&self, inner: &mut Inner, b: BlockRef, prior: u32) {
        if prior == 0 {
            let _ = inner.alloc.free(b);
        } else if inner.alloc.commit(b, prior as u64 * UNIT).is_ok() {
            if let Ok(_l) = self.p.at.unfilled.lock() {
                self.p.at.unfilled.put(Unfilled {
                    block: b,
                    used_units: prior,
                });
            }
        }
    }
}

/// Stores `data` for `channel` through the index server at `index`.
pub fn client_store(index: &str, channel: u64, data: &[u8]) -> Result<Location, AllocError> {
    let mut exclude: Vec<String> = Vec::new();
    loop {
        let r = index::call(
            index,
            &IndexRequest::Route {
                channel,
                exclude: exclude.clone(),
            },
        )?;
        if !r.ok {
            if r.kind.as_deref() == Some(KIND_CLUSTER_FULL) {
                return Err(AllocError::ClusterFull {
                    len: data.len() as u64,
                });
            }
            return Err(AllocError::Protocol(r.error.unwrap_or_default()));
        }
        let node = r.node.unwrap_or_default();
        let ep = r
            .endpoint
            .ok_or_else(|| AllocError::Protocol("route without endpoint".into()))?;
        let mut s = TcpStream::connect(&ep)
            .map_err(|e| AllocError::net(format!("connecting to {ep}"), e))?;
        send_line(
            &mut s,
            &StoreRequest::Store {
                channel,
                len: data.len() as u64,
            },
        )
        .and_then(|()| s.write_all(data))
        .map_err(|e| AllocError::net(format!("sending to {ep}"), e))?;
        let mut rd = BufReader::new(s);
        let rep: IndexReply = recv_line(&mut rd)?
            .ok_or_else(|| AllocError::Protocol(format!("{ep} closed the connection")))?;
        if rep.ok {
            return rep
                .locs
                .into_iter()
                .next()
                .ok_or_else(|| AllocError::Protocol("store reply without location".into()));
        }
        match rep.kind.as_deref() {
            Some(KIND_NODE_FULL) => {
                let _ = index::call(index, &IndexRequest::NodeFull { node: node.clone() });
                exclude.push(node);
            }
            Some(KIND_TOO_LARGE) => {
                return Err(AllocError::BadInput(rep.error.unwrap_or_default()));
            }
            _ => return Err(AllocError::Protocol(rep.error.unwrap_or_default())),
        }
    }
}

/// Every piece stored for `channel`, read back from the devices (in store order).
pub fn client_fetch(index: &str, channel: u64) -> Result<Vec<Vec<u8>>, AllocError> {
    let r = index::call(index, &IndexRequest::Lookup { channel })?;
    if !r.ok {
        if r.kind.as_deref() == Some(KIND_NOT_FOUND) {
            return Err(AllocError::NotFound { channel });
        }
        return Err(AllocError::Protocol(r.error.unwrap_or_default()));
    }
    let mut eng = UringEngine::with_queue_depth(1)?;
    let mut out = Vec::new();
    for l in r.locs {
        let dev = Device::open_read_only(&l.device)?;
        let mut buf = AlignedBuf::new(l.len.div_ceil(UNIT).max(1) as usize * UNIT as usize);
        eng.read_at(&dev, l.device_offset, &mut buf)?;
        out.push(buf[..l.len as usize].to_vec());
    }
    Ok(out)
}
