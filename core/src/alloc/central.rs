//! The `central` baseline: the leader allocates; every other process asks it over a Unix
//! socket, one round trip per allocation and per free.
//!
//! Wire format (fixed 8 bytes each way): request `[op, 0, dev u16 LE, block u32 LE]`
//! with op 1 = alloc, 2 = free, after a 2-byte hello carrying the caller's proc id;
//! reply `[status, 0, dev u16 LE, block u32 LE]`.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::allocator::{alloc_for, commit_for, free_with, BlockAllocator, Hints};
use super::node::Attached;
use super::segs::{BlockRef, ProcSeg};
use super::{AllocError, Strategy};

const OP_ALLOC: u8 = 1;
const OP_FREE: u8 = 2;

const ST_OK: u8 = 0;
const ST_FULL: u8 = 1;
const ST_OFFLINE: u8 = 2;
const ST_NO_DEVICE: u8 = 3;
const ST_NOT_HELD: u8 = 4;
const ST_OTHER: u8 = 5;

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

/// Serves central allocation on `path` (the leader). `rec` is the service's own busy
/// record (proc id 0).
pub fn serve(at: Arc<Attached>, rec: Arc<ProcSeg>, path: &Path) -> Result<(), AllocError> {
    let _ = std::fs::remove_file(path);
    let l = UnixListener::bind(path).map_err(|e| AllocError::Os {
        path: path.to_path_buf(),
        op: "bind",
        source: e,
    })?;
    // One server thread serialises every allocation: the point of the baseline.
    let (tx, rx) = std::sync::mpsc::channel::<UnixStream>();
    let at2 = at.clone();
    std::thread::Builder::new()
        .name("alloc-central-accept".into())
        .spawn(move || {
            for s in l.incoming().flatten() {
                if tx.send(s).is_err() {
                    break;
                }
            }
        })
        .map_err(|e| AllocError::net("spawning", e))?;
    std::thread::Builder::new()
        .name("alloc-central".into())
        .spawn(move || serve_loop(at2, rec, rx))
        .map_err(|e| AllocError::net("spawning", e))?;
    Ok(())
}

/// Polls every connection in turn (one thread; the allocator itself is single-threaded).
fn serve_loop(at: Arc<Attached>, rec: Arc<ProcSeg>, rx: std::sync::mpsc::Receiver<UnixStream>) {
    use std::os::fd::AsFd;
    let mut conns: Vec<(UnixStream, Option<u16>)> = Vec::new();
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
            match rx.recv_timeout(std::time::Duration::from_millis(50)) {
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
        for (i, (s, who)) in conns.iter_mut().enumerate() {
            if !ready[i] {
                continue;
            }
            let _ = s.as_fd();
            if who.is_none() {
                let mut h = [0u8; 2];
                if s.read_exact(&mut h).is_err() {
                    dead.push(i);
                    continue;
                }
                *who = Some(u16::from_le_bytes(h));
                continue;
            }
            let owner = who.unwrap_or(0);
            let mut m = [0u8; 8];
            if s.read_exact(&mut m).is_err() {
                dead.push(i);
                continue;
            }
            let (op, dev, block) = decode(&m);
            let reply = match op {
                OP_ALLOC => match alloc_for(&at, &rec, owner, dev, &mut hints) {
                    Ok(b) => encode(ST_OK, b.dev, b.block),
                    Err(e) => encode(status_of(&e), dev, 0),
                },
                OP_FREE => match free_with(&at, &rec, BlockRef { dev, block }) {
                    Ok(()) => encode(ST_OK, dev, block),
                    Err(e) => encode(status_of(&e), dev, block),
                },
                _ => encode(ST_OTHER, dev, block),
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
    s: UnixStream,
    at: Arc<Attached>,
    me: Arc<ProcSeg>,
    id: u16,
}

impl CentralClient {
    pub fn connect(
        path: &Path,
        at: Arc<Attached>,
        me: Arc<ProcSeg>,
    ) -> Result<CentralClient, AllocError> {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        let mut s = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) if std::time::Instant::now() > deadline => {
                    return Err(AllocError::net(
                        format!("connecting to the central allocator at {}", path.display()),
                        e,
                    ))
                }
                Err(_) => std::thread::sleep(std::time::Duration::from_millis(10)),
            }
        };
        let id = me.proc_id();
        s.write_all(&id.to_le_bytes())
            .map_err(|e| AllocError::net("central hello", e))?;
        Ok(CentralClient { s, at, me, id })
    }

    fn call(&mut self, op: u8, dev: u16, block: u32) -> Result<(u16, u32), AllocError> {
        self.s
            .write_all(&encode(op, dev, block))
            .map_err(|e| AllocError::net("central request", e))?;
        let mut m = [0u8; 8];
        self.s
            .read_exact(&mut m)
            .map_err(|e| AllocError::net("central reply", e))?;
        let (st, d, b) = decode(&m);
        match st {
            ST_OK => Ok((d, b)),
            ST_FULL => Err(AllocError::DeviceFull { dev }),
            ST_OFFLINE => Err(AllocError::DeviceOffline { dev }),
            ST_NO_DEVICE => Err(AllocError::NoDevice { dev }),
            ST_NOT_HELD => Err(AllocError::NotHeld { dev, block }),
            _ => Err(AllocError::Protocol(format!(
                "central allocator status {st}"
            ))),
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
