//! The `central` baseline: the leader allocates; every other process asks it over a Unix
//! socket, one round trip per allocation and per free.
//!
//! Wire format, little-endian:
//! * hello (client → server, once per connection): `[proc id u16, flags u8, 0]`; flag 1 =
//!   reconnect (the previous server died). The server checks the caller (its peer pid
//!   must be the pid in the caller's process record) and, on a reconnect, returns the
//!   caller's in-flight blocks its record does not name (allocations whose replies the
//!   dead server never sent). It answers like a request.
//! * request: `[op, 0, dev u16, block u32]`, op 1 = alloc, 2 = free.
//! * reply: `[status, 0, dev u16, block u32]`; for status "other" the `dev` field is the
//!   length of a UTF-8 error text that follows.
//!
//! A client whose connection breaks (the leader died) connects again to the new leader's
//! server, once per call, and repeats the call.
//!
//! The socket runs on the shared server ([`crate::jsonl::server`], connection mode): each
//! accepted connection is handed to the one thread that serves them all.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::allocator::{alloc_for, commit_for, free_with, BlockAllocator, Hints};
use super::attached::{proc_path, Attached};
use super::recovery;
use super::segs::{BlockRef, ProcSeg};
use super::{AllocError, Strategy};
use crate::jsonl::server::{Conn, Server};

/// The proc id of the leader's central-allocation service record.
pub const CENTRAL_PROC_ID: u16 = 0;

const OP_ALLOC: u8 = 1;
const OP_FREE: u8 = 2;

const HELLO_RECONNECT: u8 = 1;

const ST_OK: u8 = 0;
const ST_FULL: u8 = 1;
const ST_OFFLINE: u8 = 2;
const ST_NO_DEVICE: u8 = 3;
const ST_NOT_HELD: u8 = 4;
const ST_OTHER: u8 = 5;

/// Longest error text sent back.
const MAX_TEXT: usize = 4096;

/// How long a client keeps trying to reach a server.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

fn status_of(e: &AllocError) -> u8 {
    match e {
        AllocError::DeviceFull { .. } => ST_FULL,
        AllocError::DeviceOffline { .. } => ST_OFFLINE,
        AllocError::NoDevice { .. } => ST_NO_DEVICE,
        AllocError::NotHeld { .. } => ST_NOT_HELD,
        _ => ST_OTHER,
    }
}

fn encode(a: u8, dev: u16, block: u32) -> [u8; 8] {
    let mut m = [0u8; 8];
    m[0] = a;
    m[2..4].copy_from_slice(&dev.to_le_bytes());
    m[4..8].copy_from_slice(&block.to_le_bytes());
    m
}

fn decode(m: &[u8; 8]) -> (u8, u16, u32) {
    (
        m[0],
        u16::from_le_bytes([m[2], m[3]]),
        u32::from_le_bytes([m[4], m[5], m[6], m[7]]),
    )
}

/// The reply to a failed request: its status, and for "other" the error's text.
fn error_reply(e: &AllocError, dev: u16, block: u32) -> Vec<u8> {
    let st = status_of(e);
    if st != ST_OTHER {
        return encode(st, dev, block).to_vec();
    }
    let text = e.to_string();
    let mut n = text.len().min(MAX_TEXT);
    while !text.is_char_boundary(n) {
        n -= 1;
    }
    let mut m = encode(ST_OTHER, n as u16, block).to_vec();
    m.extend_from_slice(&text.as_bytes()[..n]);
    m
}

/// Serves central allocation on `path` (the leader) until the returned server is stopped.
/// `rec` is the service's own busy record (proc id 0).
pub fn serve(
    at: Arc<Attached>,
    rec: Arc<ProcSeg>,
    path: &Path,
) -> Result<Server<UnixListener>, AllocError> {
    let _ = std::fs::remove_file(path);
    let l = UnixListener::bind(path).map_err(|e| AllocError::Os {
        path: path.to_path_buf(),
        op: "bind",
        cause: e,
    })?;
    // One server thread serialises every allocation: the point of the baseline. It ends
    // once the server stopped (the channel's sender is gone) and its connections closed.
    let (tx, rx) = std::sync::mpsc::channel::<UnixConn>();
    std::thread::Builder::new()
        .name("alloc-central".into())
        .spawn(move || serve_loop(at, rec, rx))
        .map_err(|e| AllocError::net("spawning", e))?;
    Server::serve(l, "alloc-central", move |c| {
        let _ = tx.send(c);
    })
    .map_err(|e| AllocError::net("starting the central allocator's server", e))
}

type UnixConn = Conn<UnixStream>;

/// Checks a hello: `id` is a registered process and the peer is that process. On a
/// reconnect, returns the caller's orphaned in-flight blocks.
fn hello(at: &Attached, s: &UnixStream, id: u16, flags: u8) -> Result<(), AllocError> {
    if id == CENTRAL_PROC_ID {
        return Err(AllocError::BadInput(format!(
            "process id {id} is the central service's own"
        )));
    }
    let path = proc_path(&at.dir, id);
    let rec = ProcSeg::attach(&path).map_err(|e| match e {
        AllocError::NoSegment { .. } => {
            AllocError::BadInput(format!("process {id} is not registered on this node"))
        }
        e => e,
    })?;
    let peer = rustix::net::sockopt::socket_peercred(s)
        .map_err(|e| AllocError::net("reading the caller's credentials", e.into()))?
        .pid
        .as_raw_nonzero()
        .get() as u64;
    let owner = rec.pid().load(Ordering::Acquire);
    if owner != peer {
        return Err(AllocError::BadInput(format!(
            "process {id} is registered as pid {owner}, the caller is pid {peer}"
        )));
    }
    if flags & HELLO_RECONNECT != 0 {
        recovery::recover_orphans(at, &rec)?;
    }
    Ok(())
}

/// Polls every connection in turn (one thread; the allocator itself is single-threaded).
fn serve_loop(at: Arc<Attached>, rec: Arc<ProcSeg>, rx: std::sync::mpsc::Receiver<UnixConn>) {
    let mut conns: Vec<(UnixConn, Option<u16>)> = Vec::new();
    let mut hints = Hints::new(rec.proc_id());
    loop {
        loop {
            match rx.try_recv() {
                Ok(s) => conns.push((s, None)),
                Err(std::sync::mpsc::TryRecvError::Empty) => break,
                Err(std::sync::mpsc::TryRecvError::Disconnected) => {
                    if conns.is_empty() {
                        return;
                    }
                    break;
                }
            }
        }
        if conns.is_empty() {
            match rx.recv_timeout(Duration::from_millis(50)) {
                Ok(s) => conns.push((s, None)),
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => continue,
                Err(_) => return,
            }
        }
        let mut fds: Vec<rustix::event::PollFd<'_>> = conns
            .iter()
            .map(|(s, _)| rustix::event::PollFd::new(s, rustix::event::PollFlags::IN))
            .collect();
        let timeout = rustix::event::Timespec {
            tv_sec: 0,
            tv_nsec: 20_000_000,
        };
        if rustix::event::poll(&mut fds, Some(&timeout)).is_err() {
            continue;
        }
        let ready: Vec<bool> = fds.iter().map(|f| !f.revents().is_empty()).collect();
        drop(fds);
        let mut dead = Vec::new();
        for (i, (c, who)) in conns.iter_mut().enumerate() {
            if !ready[i] {
                continue;
            }
            let s = c.stream_mut();
            let reply = match *who {
                None => {
                    let mut h = [0u8; 4];
                    if s.read_exact(&mut h).is_err() {
                        dead.push(i);
                        continue;
                    }
                    let id = u16::from_le_bytes([h[0], h[1]]);
                    match hello(&at, s, id, h[2]) {
                        Ok(()) => {
                            *who = Some(id);
                            encode(ST_OK, 0, 0).to_vec()
                        }
                        // Answer, then drop the connection.
                        Err(e) => {
                            let _ = s.write_all(&error_reply(&e, 0, 0));
                            dead.push(i);
                            continue;
                        }
                    }
                }
                Some(owner) => {
                    let mut m = [0u8; 8];
                    if s.read_exact(&mut m).is_err() {
                        dead.push(i);
                        continue;
                    }
                    let (op, dev, block) = decode(&m);
                    match op {
                        OP_ALLOC => match alloc_for(&at, &rec, owner, dev, &mut hints) {
                            Ok(b) => encode(ST_OK, b.dev, b.block).to_vec(),
                            Err(e) => error_reply(&e, dev, 0),
                        },
                        OP_FREE => match free_with(&at, &rec, owner, BlockRef { dev, block }) {
                            Ok(()) => encode(ST_OK, dev, block).to_vec(),
                            Err(e) => error_reply(&e, dev, block),
                        },
                        _ => error_reply(
                            &AllocError::Protocol(format!("unknown central operation {op}")),
                            dev,
                            block,
                        ),
                    }
                }
            };
            if s.write_all(&reply).is_err() {
                dead.push(i);
            }
        }
        for i in dead.into_iter().rev() {
            conns.swap_remove(i);
        }
    }
}

/// A follower's allocator under the `central` strategy.
pub struct CentralClient {
    path: PathBuf,
    s: UnixStream,
    at: Arc<Attached>,
    me: Arc<ProcSeg>,
    id: u16,
}

impl std::fmt::Debug for CentralClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CentralClient")
            .field("path", &self.path)
            .field("id", &self.id)
            .finish()
    }
}

/// A broken connection (the server is gone), as opposed to an answer.
enum CallError {
    Transport(std::io::Error),
    Answer(AllocError),
}

impl CentralClient {
    pub fn connect(
        path: &Path,
        at: Arc<Attached>,
        me: Arc<ProcSeg>,
    ) -> Result<CentralClient, AllocError> {
        let id = me.proc_id();
        let s = Self::open(path, id, 0)?;
        Ok(CentralClient {
            path: path.to_path_buf(),
            s,
            at,
            me,
            id,
        })
    }

    /// Connects (waiting for a server to listen) and says hello. A connection that
    /// breaks before the answer is tried again: a dying server's listener can still
    /// take a connection (and then reset it) after its other sockets are closed.
    fn open(path: &Path, id: u16, flags: u8) -> Result<UnixStream, AllocError> {
        let what = || format!("central allocator at {}", path.display());
        let deadline = Instant::now() + CONNECT_TIMEOUT;
        loop {
            let e = match UnixStream::connect(path) {
                Ok(mut s) => {
                    let [a, b] = id.to_le_bytes();
                    match s.write_all(&[a, b, flags, 0]) {
                        Ok(()) => match Self::answer(&mut s, 0, 0) {
                            Ok(_) => return Ok(s),
                            Err(CallError::Answer(e)) => return Err(e),
                            Err(CallError::Transport(e)) => e,
                        },
                        Err(e) => e,
                    }
                }
                Err(e) => e,
            };
            if Instant::now() > deadline {
                return Err(AllocError::net(format!("connecting to the {}", what()), e));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Reads one reply.
    fn answer(s: &mut UnixStream, dev: u16, block: u32) -> Result<(u16, u32), CallError> {
        let mut m = [0u8; 8];
        s.read_exact(&mut m).map_err(CallError::Transport)?;
        let (st, d, b) = decode(&m);
        Err(CallError::Answer(match st {
            ST_OK => return Ok((d, b)),
            ST_FULL => AllocError::DeviceFull { dev },
            ST_OFFLINE => AllocError::DeviceOffline { dev },
            ST_NO_DEVICE => AllocError::NoDevice { dev },
            ST_NOT_HELD => AllocError::NotHeld { dev, block },
            ST_OTHER => {
                let mut text = vec![0u8; d as usize];
                s.read_exact(&mut text).map_err(CallError::Transport)?;
                AllocError::Protocol(format!(
                    "central allocator: {}",
                    String::from_utf8_lossy(&text)
                ))
            }
            st => AllocError::Protocol(format!("central allocator status {st}")),
        }))
    }

    fn round_trip(&mut self, op: u8, dev: u16, block: u32) -> Result<(u16, u32), CallError> {
        self.s
            .write_all(&encode(op, dev, block))
            .map_err(CallError::Transport)?;
        Self::answer(&mut self.s, dev, block)
    }

    fn call(&mut self, op: u8, dev: u16, block: u32) -> Result<(u16, u32), AllocError> {
        match self.round_trip(op, dev, block) {
            Ok(r) => return Ok(r),
            Err(CallError::Answer(e)) => return Err(e),
            Err(CallError::Transport(_)) => {}
        }
        // The server is gone (its leader died): reach the next one, which returns what
        // the dead one allocated for us without telling us, and ask again once.
        self.s = Self::open(&self.path, self.id, HELLO_RECONNECT)?;
        match self.round_trip(op, dev, block) {
            Ok(r) => Ok(r),
            // Freed by the dead server before it died, or by the reconnect's recovery.
            Err(CallError::Answer(AllocError::NotHeld { .. })) if op == OP_FREE => Ok((dev, block)),
            Err(CallError::Answer(e)) => Err(e),
            Err(CallError::Transport(e)) => Err(AllocError::net(
                format!("central allocator at {}", self.path.display()),
                e,
            )),
        }
    }
}

impl BlockAllocator for CentralClient {
    fn alloc(&mut self, dev: u16) -> Result<BlockRef, AllocError> {
        let (d, b) = self.call(OP_ALLOC, dev, 0)?;
        let r = BlockRef { dev: d, block: b };
        self.me.current().store(r.pack(), Ordering::Release);
        Ok(r)
    }
    fn commit(&mut self, b: BlockRef, used_bytes: u64) -> Result<(), AllocError> {
        commit_for(&self.at, &self.me, self.id, b, used_bytes)
    }
    fn free(&mut self, b: BlockRef) -> Result<(), AllocError> {
        self.me.clear_current_if(b);
        self.call(OP_FREE, b.dev, b.block).map(|_| ())
    }
    fn strategy(&self) -> Strategy {
        Strategy::Central
    }
}
