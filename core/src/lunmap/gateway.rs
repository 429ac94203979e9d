//! A gateway: serves block reads and writes of LUNs over TCP, each request decided on the
//! gateway's in-memory [`MapView`]: an initiator the map does not allow gets a clear error
//! and no byte is read or written. I/O goes through io_uring ([`crate::dev::UringEngine`],
//! one engine per connection thread) on the LUN's backing device range.
//!
//! Optionally ([`GatewayServer::start_confirming`]) a refusal is confirmed against the
//! coordination backend before it is returned: `sync`, then read the initiator's node. A
//! request that races the watch notification of a just-acknowledged mapping is then served
//! instead of refused, at the cost of round trips on the (rare) refusal path only.
//!
//! Wire protocol (one request at a time per connection): a JSON line [`Request`], followed
//! for writes by `len` payload bytes; the answer is a JSON line [`Reply`], followed for
//! successful reads by `len` bytes. A write whose `len` is 0 or not a multiple of 4096 is
//! answered with an error, and its `len` bytes are still consumed so the connection stays
//! usable; a request over [`MAX_IO`] is answered with an error and the connection closed.
//!
//! The port runs on the shared server ([`crate::jsonl::server`], connection mode).

use super::view::MapView;
use super::{validate_iqn, validate_simple_name, Backing, Layout, Lun, LunMapError};
use crate::coord::{self, Coord, CoordError, ReadResult};
use crate::dev::{AlignedBuf, Device, IoEngine, UringEngine};
use crate::jsonl;
use crate::jsonl::server::{self, Server};
use serde::{Deserialize, Serialize};
use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::io::{BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

/// Largest single request.
pub const MAX_IO: u64 = 4 << 20;

/// Longest request line a gateway reads (names and IQNs are far shorter).
pub const MAX_REQUEST_LINE: usize = 4096;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IoKind {
    Read,
    Write,
}

/// One I/O request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    pub op: IoKind,
    pub lun: String,
    pub target: String,
    pub initiator: String,
    pub offset: u64,
    pub len: u64,
}

/// The answer to a request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reply {
    pub ok: bool,
    /// True when the map refused the initiator (as opposed to an I/O or request error).
    #[serde(default)]
    pub refused: bool,
    #[serde(default)]
    pub error: String,
}

/// Counters of a running gateway.
#[derive(Debug, Default)]
pub struct Stats {
    pub served: AtomicU64,
    pub refused: AtomicU64,
    pub failed: AtomicU64,
    /// Requests the view refused but the backend confirmed as mapped (then served).
    pub confirmed: AtomicU64,
}

impl std::fmt::Display for Stats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = |c: &AtomicU64| c.load(Ordering::Relaxed);
        write!(
            f,
            "served {}, refused {}, failed {}, confirmed by the backend {}",
            n(&self.served),
            n(&self.refused),
            n(&self.failed),
            n(&self.confirmed)
        )
    }
}

/// A running gateway server; stops when dropped (its connections closed).
pub struct GatewayServer {
    addr: SocketAddr,
    _server: Server<TcpListener>,
    stats: Arc<Stats>,
}

impl std::fmt::Debug for GatewayServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GatewayServer")
            .field("addr", &self.addr)
            .finish()
    }
}

impl GatewayServer {
    /// Binds `listen` and serves requests decided on `view`.
    pub fn start(listen: SocketAddr, view: Arc<RwLock<MapView>>) -> std::io::Result<GatewayServer> {
        Self::start_with(listen, view, None)
    }

    /// Like [`GatewayServer::start`], but a refusal by the view is confirmed with `coord`
    /// (sync + read) first; a mapping the view has not caught up with yet is served.
    pub fn start_confirming(
        listen: SocketAddr,
        view: Arc<RwLock<MapView>>,
        coord: Arc<dyn Coord>,
    ) -> std::io::Result<GatewayServer> {
        Self::start_with(listen, view, Some(coord))
    }

    fn start_with(
        listen: SocketAddr,
        view: Arc<RwLock<MapView>>,
        confirm: Option<Arc<dyn Coord>>,
    ) -> std::io::Result<GatewayServer> {
        let listener = TcpListener::bind(listen)?;
        let addr = listener.local_addr()?;
        let stats = Arc::new(Stats::default());
        let st = Arc::clone(&stats);
        let server = Server::serve(listener, "gateway", move |conn| {
            serve_conn(conn, &view, Arc::clone(&st), confirm.clone())
        })?;
        Ok(GatewayServer {
            addr,
            _server: server,
            stats,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn stats(&self) -> &Stats {
        &self.stats
    }
}

struct Conn {
    engine: Option<UringEngine>,
    devices: HashMap<PathBuf, Device>,
    confirm: Option<Arc<dyn Coord>>,
    stats: Arc<Stats>,
}

fn reply_err(refused: bool, error: String) -> Reply {
    Reply {
        ok: false,
        refused,
        error,
    }
}

/// Why a request's length cannot be served, if it cannot.
fn bad_len(len: u64) -> Option<String> {
    (len == 0 || len % 4096 != 0)
        .then(|| format!("length {len} must be a positive multiple of 4096"))
}

fn serve_conn(
    accepted: server::Conn<TcpStream>,
    view: &RwLock<MapView>,
    stats: Arc<Stats>,
    confirm: Option<Arc<dyn Coord>>,
) {
    let Ok(stream) = accepted.try_clone() else {
        return;
    };
    let _ = stream.set_nodelay(true);
    let Ok(mut out) = stream.try_clone() else {
        return;
    };
    let mut input = BufReader::new(stream);
    let mut conn = Conn {
        engine: None,
        devices: HashMap::new(),
        confirm,
        stats: Arc::clone(&stats),
    };
    while !accepted.stopping() {
        // A bounded line: a client sending bytes without a newline cannot grow the buffer.
        let req: Request = match jsonl::recv_limited(&mut input, MAX_REQUEST_LINE) {
            Ok(Some(r)) => r,
            Ok(None) | Err(jsonl::LineError::Io(_)) => return,
            Err(e) => {
                let _ = send(
                    &mut out,
                    &reply_err(false, format!("bad request: {e}")),
                    None,
                );
                return;
            }
        };
        if req.len > MAX_IO {
            let _ = send(
                &mut out,
                &reply_err(
                    false,
                    format!("request of {} bytes exceeds {MAX_IO}", req.len),
                ),
                None,
            );
            return;
        }
        // A write's payload is consumed in every case, so the stream stays in step. One of a
        // length the device cannot take is answered first, then read and dropped.
        if let (IoKind::Write, Some(why)) = (req.op, bad_len(req.len)) {
            stats.failed.fetch_add(1, Ordering::Relaxed);
            if send(&mut out, &reply_err(false, why), None).is_err()
                || std::io::copy(&mut (&mut input).take(req.len), &mut std::io::sink()).ok()
                    != Some(req.len)
            {
                return;
            }
            continue;
        }
        let payload = if req.op == IoKind::Write {
            let mut b = AlignedBuf::new(req.len as usize);
            if input.read_exact(&mut b).is_err() {
                return;
            }
            Some(b)
        } else {
            None
        };
        let (reply, data) = handle(&mut conn, view, &req, payload.as_ref());
        let counter = if reply.ok {
            &stats.served
        } else if reply.refused {
            &stats.refused
        } else {
            &stats.failed
        };
        counter.fetch_add(1, Ordering::Relaxed);
        if send(&mut out, &reply, data.as_deref()).is_err() {
            return;
        }
    }
}

fn send(out: &mut TcpStream, reply: &Reply, data: Option<&[u8]>) -> std::io::Result<()> {
    let mut buf = serde_json::to_vec(reply).expect("plain data");
    buf.push(b'\n');
    if let Some(d) = data {
        buf.extend_from_slice(d);
    }
    out.write_all(&buf)
}

fn handle(
    conn: &mut Conn,
    view: &RwLock<MapView>,
    req: &Request,
    payload: Option<&AlignedBuf>,
) -> (Reply, Option<AlignedBuf>) {
    // The decision, on the map as it is now.
    let decided = {
        let v = view.read().unwrap_or_else(|e| e.into_inner());
        match v.check(&req.lun, &req.target, &req.initiator) {
            Ok(l) => Ok(l.clone()),
            Err(e @ (LunMapError::NotMapped { .. } | LunMapError::NoSuchLun(_))) => {
                Err((e, v.layout.clone()))
            }
            Err(e) => return (reply_err(false, e.to_string()), None),
        }
    };
    let lun = match decided {
        Ok(l) => l,
        Err((e, layout)) => match conn
            .confirm
            .as_deref()
            .map(|c| confirm_mapped(c, &layout, req))
        {
            Some(Ok(Some(l))) => {
                conn.stats.confirmed.fetch_add(1, Ordering::Relaxed);
                l
            }
            Some(Err(ce)) => {
                return (
                    reply_err(false, format!("cannot confirm refusal ({e}): {ce}")),
                    None,
                )
            }
            _ => return (reply_err(true, format!("refused: {e}")), None),
        },
    };
    if let Some(why) = bad_len(req.len) {
        return (reply_err(false, why), None);
    }
    if req.offset % 4096 != 0 {
        return (
            reply_err(
                false,
                format!("offset {} must be a multiple of 4096", req.offset),
            ),
            None,
        );
    }
    if req
        .offset
        .checked_add(req.len)
        .is_none_or(|end| end > lun.size_bytes)
    {
        return (
            reply_err(
                false,
                format!(
                    "range {}+{} is beyond LUN {} of {} bytes",
                    req.offset, req.len, lun.name, lun.size_bytes
                ),
            ),
            None,
        );
    }
    let (device, base) = match &lun.backing {
        Backing::Range { device, offset } => (PathBuf::from(device), *offset),
        Backing::Volume { volume } => {
            return (
                reply_err(
                    false,
                    format!(
                    "LUN {} is backed by volume {volume}; this gateway serves device ranges only",
                    lun.name
                ),
                ),
                None,
            )
        }
    };
    let engine = match &mut conn.engine {
        Some(e) => e,
        None => match UringEngine::with_queue_depth(4) {
            Ok(e) => conn.engine.insert(e),
            Err(e) => return (reply_err(false, format!("io_uring: {e}")), None),
        },
    };
    let dev = match conn.devices.entry(device) {
        Entry::Occupied(o) => o.into_mut(),
        Entry::Vacant(v) => match Device::open(v.key()) {
            Ok(d) => v.insert(d),
            Err(e) => return (reply_err(false, e.to_string()), None),
        },
    };
    let off = base + req.offset;
    if let Err(e) = dev.check_range(off, req.len) {
        return (reply_err(false, e.to_string()), None);
    }
    let ok = Reply {
        ok: true,
        refused: false,
        error: String::new(),
    };
    match payload {
        Some(p) => match engine.write_at(dev, off, p) {
            Ok(()) => (ok, None),
            Err(e) => (reply_err(false, e.to_string()), None),
        },
        None => {
            let mut b = AlignedBuf::new(req.len as usize);
            match engine.read_at(dev, off, &mut b) {
                Ok(()) => (ok, Some(b)),
                Err(e) => (reply_err(false, e.to_string()), None),
            }
        }
    }
}

/// Asks the backend whether `req`'s initiator is mapped (a sync, then one batched read of
/// the initiator's and the LUN's nodes); the LUN if so.
fn confirm_mapped(
    coord: &dyn Coord,
    layout: &Layout,
    req: &Request,
) -> Result<Option<Lun>, CoordError> {
    if validate_simple_name("LUN name", &req.lun).is_err()
        || validate_iqn("target", &req.target).is_err()
        || validate_iqn("initiator", &req.initiator).is_err()
    {
        return Ok(None);
    }
    let lun_path = layout.lun(&req.lun);
    coord.sync(&lun_path)?;
    let r = coord.read_many(&[
        coord::Read::Data(layout.initiator(&req.lun, &req.target, &req.initiator)),
        coord::Read::Data(lun_path),
    ])?;
    match (&r[0], &r[1]) {
        (ReadResult::Data(..), ReadResult::Data(d, _)) => Ok(serde_json::from_slice(d).ok()),
        _ => Ok(None),
    }
}

/// A client of a gateway (one connection).
pub struct GatewayClient {
    out: TcpStream,
    input: BufReader<TcpStream>,
}

impl std::fmt::Debug for GatewayClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GatewayClient").finish()
    }
}

impl GatewayClient {
    pub fn connect(addr: SocketAddr) -> std::io::Result<GatewayClient> {
        let s = TcpStream::connect(addr)?;
        s.set_nodelay(true)?;
        s.set_read_timeout(Some(std::time::Duration::from_secs(60)))?;
        Ok(GatewayClient {
            out: s.try_clone()?,
            input: BufReader::new(s),
        })
    }

    fn call(&mut self, req: &Request, payload: Option<&[u8]>) -> std::io::Result<(Reply, Vec<u8>)> {
        let mut buf = serde_json::to_vec(req).expect("plain data");
        buf.push(b'\n');
        if let Some(p) = payload {
            buf.extend_from_slice(p);
        }
        self.out.write_all(&buf)?;
        let reply: Reply =
            jsonl::recv_limited(&mut self.input, jsonl::MAX_LINE)?.ok_or_else(|| {
                std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "gateway closed the connection",
                )
            })?;
        let mut data = Vec::new();
        if reply.ok && req.op == IoKind::Read {
            data.resize(req.len as usize, 0);
            self.input.read_exact(&mut data)?;
        }
        Ok((reply, data))
    }

    /// Reads `len` bytes at `offset` of `lun` as `initiator` through `target`.
    pub fn read(
        &mut self,
        lun: &str,
        target: &str,
        initiator: &str,
        offset: u64,
        len: u64,
    ) -> std::io::Result<(Reply, Vec<u8>)> {
        self.call(
            &Request {
                op: IoKind::Read,
                lun: lun.into(),
                target: target.into(),
                initiator: initiator.into(),
                offset,
                len,
            },
            None,
        )
    }

    /// Writes `data` at `offset` of `lun` as `initiator` through `target`.
    pub fn write(
        &mut self,
        lun: &str,
        target: &str,
        initiator: &str,
        offset: u64,
        data: &[u8],
    ) -> std::io::Result<Reply> {
        self.call(
            &Request {
                op: IoKind::Write,
                lun: lun.into(),
                target: target.into(),
                initiator: initiator.into(),
                offset,
                len: data.len() as u64,
            },
            Some(data),
        )
        .map(|(r, _)| r)
    }
}
