//! The store path: a node process's external port (on the shared server,
//! [`crate::jsonl::server`]; its messages are in [`super::wire`]), and the client.
//!
//! Client: `route` at the index server → the chosen process's endpoint → `store`
//! (a JSON header line, then the data). The process takes a block with room (first the
//! unfilled-block table, then a device's free blocks), writes the data there through
//! io_uring with O_DIRECT, commits the block, records channel → location at the index
//! server, and only then offers the block's remaining room to the unfilled table and
//! answers. A failed record undoes the commit (a fresh block is freed, a partly filled
//! one goes back to its previous contents). A node without room answers `node_full`; the
//! client tells the index and asks for another node, until the index says the cluster is
//! full. An endpoint the client cannot connect to is reported to the index, which drops
//! it if it cannot reach it either, and the client routes again.
//!
//! One store at a time per process (the process's current-block record names one block).
//! Known gap: a process killed after committing a fresh block but before the index
//! recorded it leaves that block filled and unrecorded (the audit reports it as leaked);
//! closing it needs recovery to consult the index server.

use std::io::{BufReader, Read};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use super::allocator::BlockAllocator;
use super::node::NodeProcess;
use super::segs::{BlockRef, BlockState, DeviceSeg, Unfilled, MAX_DEVICES};
use super::wire::{
    self, recv_reply, send, Body, DeviceAdded, Done, ErrorKind, IndexRequest, Located, Location,
    Refusal, Reply, Routed, StoreRequest, Stored,
};
use super::{AllocError, UNIT};
use crate::dev::{AlignedBuf, Device, IoEngine, UringEngine};
use crate::jsonl::server::{Answer, Conn, Server};

/// How many endpoints a client may find unreachable for one store before it gives up.
const MAX_UNREACHABLE: usize = 8;

/// One process's store service.
pub struct StoreService {
    node_name: String,
    index: String,
    p: Arc<NodeProcess>,
    inner: Mutex<Inner>,
    /// The external port's server, once [`serve`](Self::serve) started it.
    server: Mutex<Option<Server<TcpListener>>>,
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
    /// The open device of each device index, with the serial of the segment it was
    /// opened for (an index can be reused for another device).
    devices: Vec<Option<(u64, Device)>>,
    /// The online device indexes as of device epoch `online_epoch`.
    online: Vec<u16>,
    online_epoch: u64,
    next: usize,
}

/// The open device behind segment `d` (from `devices`, the cache of [`Inner`]).
fn open_device<'a>(
    devices: &'a mut [Option<(u64, Device)>],
    d: &DeviceSeg,
) -> Result<&'a Device, AllocError> {
    {
        let slot = &mut devices[d.index() as usize % MAX_DEVICES];
        if slot
            .as_ref()
            .is_none_or(|(serial, _)| *serial != d.serial())
        {
            *slot = Some((d.serial(), Device::open(d.device_path())?));
        }
    }
    let slot = &devices[d.index() as usize % MAX_DEVICES];
    Ok(&slot.as_ref().expect("just set").1)
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
                devices: (0..MAX_DEVICES).map(|_| None).collect(),
                online: Vec::new(),
                online_epoch: u64::MAX,
                next: p.cfg.proc_id as usize,
            }),
            p,
            server: Mutex::new(None),
        })
    }

    /// Registers the endpoint of `l` with the index server, then serves it (one thread
    /// per connection) until [`stop`](Self::stop). Returns the endpoint.
    pub fn serve(self: Arc<Self>, l: TcpListener) -> Result<String, AllocError> {
        let ep = l
            .local_addr()
            .map_err(|e| AllocError::net("local_addr", e))?
            .to_string();
        wire::call::<_, Done>(
            &self.index,
            &IndexRequest::RegisterProcess {
                node: self.node_name.clone(),
                proc_id: self.p.cfg.proc_id,
                endpoint: ep.clone(),
            },
        )?
        .into_result()?;
        let me = self.clone();
        let server = Server::serve(l, "store", move |mut c| me.conn(&mut c))
            .map_err(|e| AllocError::net("starting the store server", e))?;
        *self.server.lock().unwrap_or_else(|e| e.into_inner()) = Some(server);
        Ok(ep)
    }

    /// Stops the external port's server; returns once its connections are closed.
    pub fn stop(&self) {
        let server = self.server.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(s) = server {
            s.stop();
        }
    }

    fn conn(&self, c: &mut Conn<TcpStream>) {
        wire::converse(c, |req, r| match req {
            StoreRequest::Store { channel, len } => self.store_request(r, channel, len),
            StoreRequest::DeviceOnline { device } => Answer::Reply(
                Reply::from(self.p.device_online(&device).map(|dev| DeviceAdded { dev }))
                    .into_body(),
            ),
        })
    }

    /// A `store` request: its `len` bytes of data follow on `r`.
    fn store_request(
        &self,
        r: &mut BufReader<TcpStream>,
        channel: u64,
        len: u64,
    ) -> Answer<Reply<Body>> {
        let bs = self.p.at.node.block_size();
        if len > bs {
            // Drain what the client sent, then refuse.
            let _ = std::io::copy(&mut r.take(len), &mut std::io::sink());
            let e = AllocError::TooLarge {
                len,
                block_size: bs,
            };
            return Answer::Reply(Reply::refused(Some(ErrorKind::TooLarge), e));
        }
        let mut data = vec![0u8; len as usize];
        if r.read_exact(&mut data).is_err() {
            return Answer::Close;
        }
        Answer::Reply(match self.store(channel, &data) {
            Ok(loc) => Reply::Ok(Body::Stored(Stored { loc })),
            Err(e @ AllocError::NodeFull) => Reply::refused(Some(ErrorKind::NodeFull), e),
            Err(e) => Reply::refused(None, e),
        })
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
            let mut buf = AlignedBuf::new((units as u64 * UNIT) as usize);
            buf[..data.len()].copy_from_slice(data);
            let off_in_block = prior as u64 * UNIT;
            let dev_off = d.block_offset(b.block) + off_in_block;
            let written = open_device(&mut inner.devices, d).and_then(|dev| {
                inner.eng.write_at(dev, dev_off, &buf)?;
                Ok(dev.path().to_path_buf())
            });
            let used = prior + units;
            let committed =
                written.and_then(|path| inner.alloc.commit(b, used as u64 * UNIT).map(|()| path));
            let device = match committed {
                Ok(path) => path,
                Err(AllocError::DeviceOffline { .. }) => continue, // placed again elsewhere
                Err(e) => {
                    self.give_back(inner, b, prior);
                    return Err(e);
                }
            };
            let loc = Location {
                node: self.node_name.clone(),
                device,
                dev: b.dev,
                block: b.block,
                device_offset: dev_off,
                offset_in_block: off_in_block,
                len: data.len() as u64,
            };
            let recorded = wire::call::<_, Done>(
                &self.index,
                &IndexRequest::Record {
                    channel,
                    loc: loc.clone(),
                },
            )
            .and_then(|rep| match rep {
                Reply::Ok(Done {}) => Ok(()),
                Reply::Refused(r) => Err(AllocError::Protocol(format!(
                    "the index did not record channel {channel}: {}",
                    r.error
                ))),
            });
            if let Err(e) = recorded {
                self.undo_commit(inner, b, prior, used);
                return Err(e);
            }
            // Recorded: only now may another store append to the block.
            if used < block_units {
                let _l = at.unfilled.lock()?;
                at.unfilled.put(Unfilled {
                    block: b,
                    used_units: used,
                });
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
        let me = self.p.cfg.proc_id;
        {
            let _l = at.unfilled.lock()?;
            let online = |dev: u16| at.device(dev).map(|d| d.is_online()).unwrap_or(false);
            while let Some(u) = at.unfilled.take_fitting(units, block_units, online) {
                // The entry is gone from the table either way; the block is ours only if
                // it still holds what the entry says (it may have been freed since).
                let d = at.device(u.block.dev)?;
                if d.cas_state(
                    u.block.block,
                    BlockState::Filled {
                        used_units: u.used_units,
                    },
                    BlockState::InFlight {
                        owner: me,
                        prior_units: u.used_units,
                    },
                ) {
                    self.p.me.current().store(u.block.pack(), Ordering::Release);
                    return Ok((u.block, u.used_units));
                }
            }
        }
        let epoch = at.node.device_epoch().load(Ordering::Acquire);
        if epoch != inner.online_epoch {
            inner.online = at.online_devices();
            inner.online_epoch = epoch;
        }
        let n = inner.online.len();
        for _ in 0..n {
            let dev = inner.online[inner.next % n];
            inner.next += 1;
            match inner.alloc.alloc(dev) {
                Ok(b) => return Ok((b, 0)),
                Err(AllocError::DeviceFull { .. }) | Err(AllocError::DeviceOffline { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        Err(AllocError::NodeFull)
    }

    /// Undoes a placement whose write or commit failed.
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

    /// Undoes a commit the index did not record: a fresh block is freed; a partly filled
    /// one goes back to its `prior` units (and to the unfilled table).
    fn undo_commit(&self, inner: &mut Inner, b: BlockRef, prior: u32, used: u32) {
        if prior == 0 {
            let _ = inner.alloc.free(b);
            return;
        }
        let at = &self.p.at;
        // Under the table lock: recovery and `place` are excluded, and the block is in
        // nobody's hands but ours (filled, not in the table).
        if let (Ok(_l), Ok(d)) = (at.unfilled.lock(), at.device(b.dev)) {
            if d.cas_state(
                b.block,
                BlockState::Filled { used_units: used },
                BlockState::Filled { used_units: prior },
            ) {
                at.unfilled.put(Unfilled {
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
    let mut unreachable = 0;
    loop {
        let route = IndexRequest::Route {
            channel,
            exclude: exclude.clone(),
        };
        let Routed { node, endpoint: ep } = match wire::call::<_, Routed>(index, &route)? {
            Reply::Ok(r) => r,
            Reply::Refused(Refusal { kind, error }) => {
                return Err(match kind {
                    Some(ErrorKind::ClusterFull) => AllocError::ClusterFull {
                        len: data.len() as u64,
                    },
                    Some(ErrorKind::NoNode) => AllocError::NoNode,
                    _ => AllocError::Protocol(error),
                })
            }
        };
        let mut s = match TcpStream::connect(&ep) {
            Ok(s) => s,
            Err(e) => {
                unreachable += 1;
                if unreachable > MAX_UNREACHABLE {
                    return Err(AllocError::net(format!("connecting to {ep}"), e));
                }
                // A process that died (or restarted on another port): tell the index,
                // then route again.
                let gone = IndexRequest::Unreachable { node, endpoint: ep };
                let _ = wire::call::<_, Done>(index, &gone);
                continue;
            }
        };
        send(
            &mut s,
            &StoreRequest::Store {
                channel,
                len: data.len() as u64,
            },
        )
        .and_then(|()| std::io::Write::write_all(&mut s, data))
        .map_err(|e| AllocError::net(format!("sending to {ep}"), e))?;
        let mut rd = BufReader::new(s);
        let rep = recv_reply::<Stored>(&mut rd)?
            .ok_or_else(|| AllocError::Protocol(format!("{ep} closed the connection")))?;
        match rep {
            Reply::Ok(Stored { loc }) => return Ok(loc),
            Reply::Refused(Refusal {
                kind: Some(ErrorKind::NodeFull),
                ..
            }) => {
                let _ =
                    wire::call::<_, Done>(index, &IndexRequest::NodeFull { node: node.clone() });
                exclude.push(node);
            }
            Reply::Refused(Refusal {
                kind: Some(ErrorKind::TooLarge),
                error,
            }) => return Err(AllocError::BadInput(error)),
            Reply::Refused(r) => return Err(AllocError::Protocol(r.error)),
        }
    }
}

/// Every piece stored for `channel`, read back from the devices (in store order).
pub fn client_fetch(index: &str, channel: u64) -> Result<Vec<Vec<u8>>, AllocError> {
    let locs = match wire::call::<_, Located>(index, &IndexRequest::Lookup { channel })? {
        Reply::Ok(l) => l.locs,
        Reply::Refused(Refusal {
            kind: Some(ErrorKind::NotFound),
            ..
        }) => return Err(AllocError::NotFound { channel }),
        Reply::Refused(r) => return Err(AllocError::Protocol(r.error)),
    };
    let mut eng = UringEngine::with_queue_depth(1)?;
    let mut out = Vec::new();
    for l in locs {
        let dev = Device::open_read_only(&l.device)?;
        let mut buf = AlignedBuf::new(l.len.div_ceil(UNIT).max(1) as usize * UNIT as usize);
        eng.read_at(&dev, l.device_offset, &mut buf)?;
        out.push(buf[..l.len as usize].to_vec());
    }
    Ok(out)
}
