//! A node process: leader election by binding the internal port, follower registration,
//! device online/offline, restart paths.
//!
//! * Start: a process that ran before first takes the owner lock of its record
//!   (`proc-<id>.shm`, an `flock` held for its whole life), which proves its previous
//!   incarnation is gone. Then it binds `127.0.0.1:<internal port>`. Success → leader:
//!   create (first run) or attach (restart) the node, device and unfilled segments,
//!   recover every process record whose process is dead (this releases what a previous
//!   leader incarnation left), then serve the port. Failure → follower: connect and
//!   register. Both roles refuse a node of another strategy or block size.
//! * Registration (`{"op":"register",...}` JSON line): the leader creates
//!   `proc-<id>.shm` for a first-time process; a process that ran before hands over the
//!   path of its existing segment, whose in-flight block the leader returns (unless that
//!   was done already) before handing it back. The connection stays open: its EOF tells
//!   the leader the follower is gone (the leader recovers it once its owner lock is free)
//!   and tells the follower the leader is gone (it runs the election again).
//! * Devices: a scan that finds a device without a segment asks the leader, which
//!   resolves its block region ([`super::region::resolve`]) and creates the segment
//!   (`device_online`); `device_offline` marks a segment offline under pause, drops its
//!   unfilled-table entries and unlinks it. Blocks in flight on it are not returned: the
//!   device is gone, and their writers' commits fail with `DeviceOffline`. Both bump the
//!   node's device epoch, which processes check to attach new segments. Device indexes
//!   are handed out in order; once all [`MAX_DEVICES`] were used, the lowest index whose
//!   segment is gone is reused (processes then replace their mapping of it).
//! * Everything that creates or removes segments or recovers records runs under the
//!   process's `admin` lock ([`Attached`]); only the leader does it.

use std::io::{BufRead, BufReader};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::allocator::{BlockAllocator, LocalAllocator};
use super::central::{self, CentralClient};
use super::recovery;
use super::region::{self, DeviceSpec};
use super::segs::{
    check_block_size, DeviceSeg, NodeSeg, OwnerLock, ProcSeg, UnfilledSeg, MAX_DEVICES,
    STATUS_OFFLINE,
};
use super::shm::RetainingSlot;
use super::{AllocError, Strategy};

/// How long a process keeps trying to become leader or reach one.
pub const ELECTION_TIMEOUT: Duration = Duration::from_secs(30);
/// The proc id of the leader's central-allocation service record.
pub const CENTRAL_PROC_ID: u16 = 0;

/// Settings of one node process.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// Node directory: every shared-memory segment and the central socket live here.
    pub dir: PathBuf,
    pub internal_port: u16,
    /// This process's id on the node, 1..=65535 (stable across restarts).
    pub proc_id: u16,
    pub strategy: Strategy,
    pub block_size: u64,
    /// Devices this process sees on the node (its scan).
    pub devices: Vec<DeviceSpec>,
    pub unfilled_capacity: usize,
}

/// The segments a process has attached.
#[derive(Debug)]
pub struct Attached {
    pub dir: PathBuf,
    pub node: NodeSeg,
    /// The node's fence protocol is asymmetric (read once at attach).
    pub asym: bool,
    pub unfilled: UnfilledSeg,
    devices: Vec<RetainingSlot<DeviceSeg>>,
    epoch_seen: AtomicU64,
    refresh_lock: Mutex<()>,
    /// Serialises this process's segment creation and removal, registrations and
    /// recoveries (the leader's connection threads, its own scan, a takeover).
    admin: Mutex<()>,
}

pub fn node_path(dir: &Path) -> PathBuf {
    dir.join("node.shm")
}
pub fn unfilled_path(dir: &Path) -> PathBuf {
    dir.join("unfilled.shm")
}
pub fn device_path(dir: &Path, i: u16) -> PathBuf {
    dir.join(format!("dev-{i}.shm"))
}
pub fn proc_path(dir: &Path, id: u16) -> PathBuf {
    dir.join(format!("proc-{id}.shm"))
}
pub fn central_socket(dir: &Path) -> PathBuf {
    dir.join("central.sock")
}

fn io<'a>(path: &'a Path, op: &'static str) -> impl FnOnce(std::io::Error) -> AllocError + 'a {
    move |source| AllocError::Os {
        path: path.to_path_buf(),
        op,
        source,
    }
}

impl Attached {
    /// Attaches the node's segments in `dir` (refusing wrong magic/version).
    pub fn open(dir: &Path) -> Result<Attached, AllocError> {
        let node = NodeSeg::attach(&node_path(dir))?;
        let at = Attached {
            dir: dir.to_path_buf(),
            asym: node.asymmetric_fence(),
            node,
            unfilled: UnfilledSeg::attach(&unfilled_path(dir))?,
            devices: (0..MAX_DEVICES).map(|_| RetainingSlot::default()).collect(),
            epoch_seen: AtomicU64::new(u64::MAX),
            refresh_lock: Mutex::new(()),
            admin: Mutex::new(()),
        };
        at.refresh()?;
        Ok(at)
    }

    /// [`open`](Self::open), refusing a node created with another strategy or block size.
    pub fn open_checked(
        dir: &Path,
        strategy: Strategy,
        block_size: u64,
    ) -> Result<Attached, AllocError> {
        let at = Self::open(dir)?;
        let (s, bs) = (at.node.strategy(), at.node.block_size());
        if s != Some(strategy) || bs != block_size {
            return Err(AllocError::BadSegment {
                path: node_path(dir),
                reason: format!(
                    "node was created with strategy {} and block size {bs}, this process runs {strategy} with {block_size}",
                    s.map_or("unknown".to_string(), |s| s.to_string()),
                ),
            });
        }
        Ok(at)
    }

    fn admin(&self) -> MutexGuard<'_, ()> {
        self.admin.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Attaches device segments that appeared since the last look, replacing an offline
    /// one whose index was given to a new segment (cheap when the node's device epoch did
    /// not move).
    pub fn refresh(&self) -> Result<(), AllocError> {
        let epoch = self.node.device_epoch().load(Ordering::Acquire);
        if self.epoch_seen.load(Ordering::Acquire) == epoch {
            return Ok(());
        }
        self.rescan(epoch)
    }

    /// [`refresh`](Self::refresh) whatever the epoch says: for the leader's segment
    /// changes and recovery, which must also see a segment whose creator died before it
    /// bumped the epoch.
    pub fn rescan_devices(&self) -> Result<(), AllocError> {
        self.rescan(self.node.device_epoch().load(Ordering::Acquire))
    }

    fn rescan(&self, epoch: u64) -> Result<(), AllocError> {
        let _g = self.refresh_lock.lock().unwrap_or_else(|e| e.into_inner());
        for (i, slot) in self.devices.iter().enumerate() {
            // An online segment keeps its index: it goes offline before it is unlinked.
            let cur = slot.get();
            if cur.is_some_and(|d| d.is_online()) {
                continue;
            }
            let path = device_path(&self.dir, i as u16);
            match DeviceSeg::attach(&path) {
                Ok(d) if d.index() != i as u16 => {
                    // Its header is shared memory: an index that does not match the file
                    // would alias another device's slot.
                    return Err(AllocError::BadSegment {
                        path,
                        reason: format!(
                            "segment of device {} in the file of device {i}",
                            d.index()
                        ),
                    });
                }
                Ok(d) => {
                    if cur.map(|c| c.serial()) != Some(d.serial()) {
                        slot.set(d);
                    }
                }
                Err(AllocError::NoSegment { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        self.epoch_seen.store(epoch, Ordering::Release);
        Ok(())
    }

    /// Device segment `i` (attaching it if it appeared).
    #[inline]
    pub fn device(&self, i: u16) -> Result<&DeviceSeg, AllocError> {
        let slot = self
            .devices
            .get(i as usize)
            .ok_or(AllocError::NoDevice { dev: i })?;
        if let Some(d) = slot.get() {
            return Ok(d);
        }
        self.refresh()?;
        slot.get().ok_or(AllocError::NoDevice { dev: i })
    }

    /// After `old` (device `i`) was found offline: the newer segment that took index `i`
    /// since, if any.
    pub fn reattach(&self, i: u16, old: &DeviceSeg) -> Result<Option<&DeviceSeg>, AllocError> {
        self.refresh()?;
        let d = self.device(i)?;
        Ok((!std::ptr::eq(d, old) && d.is_online()).then_some(d))
    }

    /// Every attached device segment (online or not).
    pub fn attached_devices(&self) -> impl Iterator<Item = &DeviceSeg> {
        self.devices.iter().filter_map(|d| d.get())
    }

    /// Indexes of the online devices.
    pub fn online_devices(&self) -> Vec<u16> {
        let _ = self.refresh();
        self.attached_devices()
            .filter(|d| d.is_online())
            .map(|d| d.index())
            .collect()
    }

    /// Every process record in the node directory.
    pub fn proc_records(&self) -> Result<Vec<(PathBuf, ProcSeg)>, AllocError> {
        let mut out = Vec::new();
        let rd = std::fs::read_dir(&self.dir).map_err(io(&self.dir, "readdir"))?;
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with("proc-") && name.ends_with(".shm") {
                match ProcSeg::attach(&e.path()) {
                    Ok(p) => out.push((e.path(), p)),
                    Err(AllocError::NoSegment { .. }) => {}
                    Err(e) => return Err(e),
                }
            }
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }
}

// ------------------------------------------------------------------ protocol

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    Register {
        proc_id: u16,
        pid: u32,
        /// The process's existing segment (a restart), if any: the process holds its
        /// owner lock.
        existing: Option<PathBuf>,
    },
    DeviceOnline {
        device: DeviceSpec,
    },
    DeviceOffline {
        dev: u16,
    },
}

/// The `kind` of a reply to a line that is not a valid request.
pub const KIND_BAD_REQUEST: &str = "bad_request";

#[derive(Debug, Serialize, Deserialize)]
pub struct Reply {
    pub ok: bool,
    #[serde(default)]
    pub error: Option<String>,
    #[serde(default)]
    pub kind: Option<String>,
    #[serde(default)]
    pub proc_seg: Option<PathBuf>,
    #[serde(default)]
    pub dev: Option<u16>,
    #[serde(default)]
    pub recovered_blocks: usize,
}

impl Reply {
    fn ok() -> Reply {
        Reply {
            ok: true,
            error: None,
            kind: None,
            proc_seg: None,
            dev: None,
            recovered_blocks: 0,
        }
    }
    fn err(e: impl std::fmt::Display) -> Reply {
        Reply {
            ok: false,
            error: Some(e.to_string()),
            ..Reply::ok()
        }
    }
}

pub(crate) use crate::jsonl::send as send_line;

/// One JSON-line message (`None` at a clean end of stream), as an allocation error.
pub(crate) fn recv_line<T: serde::de::DeserializeOwned>(
    r: &mut impl BufRead,
) -> Result<Option<T>, AllocError> {
    crate::jsonl::recv(r).map_err(|e| match e {
        crate::jsonl::LineError::Io(e) => AllocError::net("reading a message", e),
        e => AllocError::Protocol(e.to_string()),
    })
}

/// Longest request line the allocation ports (node, index, store) accept.
pub const MAX_REQUEST_LINE: usize = 64 << 10;

/// What a server read from a connection.
pub(crate) enum Incoming<T> {
    Request(T),
    /// Not a valid request: answer `bad_request` with `error`; `fatal` when the stream
    /// cannot be read on (a line over the limit), so the connection closes after the reply.
    Bad {
        error: String,
        fatal: bool,
    },
    /// End of stream, or the peer is gone.
    End,
}

/// The next request of a JSON-line server connection.
pub(crate) fn next_request<T: serde::de::DeserializeOwned>(r: &mut impl BufRead) -> Incoming<T> {
    use crate::jsonl::LineError;
    match crate::jsonl::recv_limited(r, MAX_REQUEST_LINE) {
        Ok(Some(t)) => Incoming::Request(t),
        Ok(None) => Incoming::End,
        Err(LineError::Malformed(e)) => Incoming::Bad {
            error: format!("malformed request: {e}"),
            fatal: false,
        },
        Err(e @ LineError::TooLong(_)) => Incoming::Bad {
            error: e.to_string(),
            fatal: true,
        },
        Err(LineError::Truncated) | Err(LineError::Io(_)) => Incoming::End,
    }
}

// ------------------------------------------------------------------ leader side

/// State of the leader's service, shared by its connection threads.
struct Leader {
    cfg: NodeConfig,
    at: Arc<Attached>,
    /// The owner lock of the central service's record (`central` strategy).
    _central_lock: Option<OwnerLock>,
}

/// Creates (first run) or attaches (restart) the node's segments as leader, recovers
/// dead processes, and returns the attached view.
fn leader_setup(cfg: &NodeConfig) -> Result<Arc<Attached>, AllocError> {
    std::fs::create_dir_all(&cfg.dir).map_err(io(&cfg.dir, "mkdir"))?;
    let np = node_path(&cfg.dir);
    if !np.exists() {
        match NodeSeg::create(&np, cfg.strategy, cfg.block_size) {
            Ok(_) | Err(AllocError::AlreadyExists { .. }) => {}
            Err(e) => return Err(e),
        }
    }
    let up = unfilled_path(&cfg.dir);
    if !up.exists() {
        match UnfilledSeg::create(&up, cfg.unfilled_capacity) {
            Ok(_) | Err(AllocError::AlreadyExists { .. }) => {}
            Err(e) => return Err(e),
        }
    }
    let at = Arc::new(Attached::open_checked(
        &cfg.dir,
        cfg.strategy,
        cfg.block_size,
    )?);
    leader_takeover(cfg, &at)?;
    Ok(at)
}

/// The leader's first act, at start or after taking over from a dead leader: bring its
/// own devices online, recover every dead process (the old leader included) and record
/// itself as leader.
fn leader_takeover(cfg: &NodeConfig, at: &Attached) -> Result<(), AllocError> {
    for spec in &cfg.devices {
        add_device(at, spec, cfg.strategy, cfg.block_size)?;
    }
    {
        let _g = at.admin();
        recovery::recover_dead(at)?;
    }
    at.node
        .leader_pid()
        .store(std::process::id() as u64, Ordering::Release);
    Ok(())
}

/// Creates the segment of `spec` unless an online segment for the same path exists;
/// returns its index. The block region is resolved (and an explicit one checked) here.
fn add_device(
    at: &Attached,
    spec: &DeviceSpec,
    strategy: Strategy,
    block_size: u64,
) -> Result<u16, AllocError> {
    let _g = at.admin();
    at.rescan_devices()?;
    if let Some(d) = at
        .attached_devices()
        .find(|d| d.is_online() && d.device_path() == spec.path)
    {
        return Ok(d.index());
    }
    let (region, _) = region::resolve(spec, block_size)?;
    let (i, serial) = pick_index(at)?;
    // Entries for an earlier device with this index (a leader that died between marking
    // it offline and dropping its entries) must not be matched against the new device.
    {
        let _l = at.unfilled.lock()?;
        at.unfilled.remove_where(|u| u.block.dev == i);
    }
    DeviceSeg::create(
        &device_path(&at.dir, i),
        i,
        serial,
        &region,
        block_size,
        strategy.free_mode(),
    )?;
    at.node.device_epoch().fetch_add(1, Ordering::AcqRel);
    at.refresh()?;
    Ok(i)
}

/// The index and serial of a new device segment: indexes in order while unused ones
/// remain, then the lowest whose segment is gone. Admin lock held.
fn pick_index(at: &Attached) -> Result<(u16, u64), AllocError> {
    let serial = at.node.device_serial().fetch_add(1, Ordering::AcqRel);
    let free = |i: u16| -> Result<bool, AllocError> {
        let p = device_path(&at.dir, i);
        match DeviceSeg::attach(&p) {
            Err(AllocError::NoSegment { .. }) => Ok(true),
            // Left behind by a leader that died while taking it offline.
            Ok(d) if !d.is_online() => match std::fs::remove_file(&p) {
                Ok(()) => Ok(true),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(true),
                Err(e) => Err(io(&p, "unlink")(e)),
            },
            Ok(_) => Ok(false),
            Err(e) => Err(e),
        }
    };
    if serial < MAX_DEVICES as u64 && free(serial as u16)? {
        return Ok((serial as u16, serial));
    }
    for i in 0..MAX_DEVICES as u16 {
        if free(i)? {
            return Ok((i, serial));
        }
    }
    Err(AllocError::BadInput(format!(
        "the node already has {MAX_DEVICES} devices"
    )))
}

/// Takes device `dev` offline: marks it unusable under pause, drops its unfilled-table
/// entries, unlinks its segment. Its in-flight blocks go with it (their commits fail).
fn remove_device(at: &Attached, dev: u16) -> Result<(), AllocError> {
    let _g = at.admin();
    at.rescan_devices()?;
    let d = at.device(dev)?;
    if !d.is_online() {
        return Ok(());
    }
    let q = recovery::quiesce(at)?;
    d.status().store(STATUS_OFFLINE, Ordering::Release);
    at.unfilled.remove_where(|u| u.block.dev == dev);
    drop(q);
    let p = device_path(&at.dir, dev);
    match std::fs::remove_file(&p) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io(&p, "unlink")(e)),
    }
    at.node.device_epoch().fetch_add(1, Ordering::AcqRel);
    Ok(())
}

/// Registers process `proc_id` (leader side); returns its segment path and how many
/// blocks recovery returned.
fn register_proc(
    at: &Attached,
    proc_id: u16,
    pid: u32,
    existing: Option<&Path>,
) -> Result<(PathBuf, usize), AllocError> {
    let _g = at.admin();
    let path = proc_path(&at.dir, proc_id);
    if let Some(e) = existing {
        if e != path {
            return Err(AllocError::BadInput(format!(
                "process {proc_id} handed over segment {}, expected {}",
                e.display(),
                path.display()
            )));
        }
    }
    if !path.exists() {
        if existing.is_some() {
            return Err(AllocError::NoSegment { path });
        }
        let rec = ProcSeg::create(&path, proc_id)?;
        rec.pid().store(pid as u64, Ordering::Release);
        return Ok((path, 0));
    }
    let rec = ProcSeg::attach(&path)?;
    if rec.proc_id() != proc_id {
        return Err(AllocError::BadSegment {
            path,
            reason: format!("belongs to process {}, not {proc_id}", rec.proc_id()),
        });
    }
    let old = rec.pid().load(Ordering::Acquire) as u32;
    if old == pid {
        // The same process again (it re-registers with a new leader).
        return Ok((path, 0));
    }
    // A restarted process holds the record's owner lock (it took it before registering),
    // so the lock is held now either way; without a handed-over segment a held lock is
    // another live process with this id.
    let held = ProcSeg::owner_alive(&path)?;
    match (existing.is_some(), held) {
        (true, false) => {
            return Err(AllocError::Protocol(format!(
                "process {proc_id} handed over {} without holding its owner lock",
                path.display()
            )))
        }
        (false, true) => {
            return Err(AllocError::BadInput(format!(
                "process id {proc_id} is in use by a live process"
            )))
        }
        _ => {}
    }
    // pid 0: its blocks were returned already (by a leader's recovery).
    let recovered = if old != 0 {
        recovery::recover_process(at, &rec)?.blocks()
    } else {
        0
    };
    rec.pid().store(pid as u64, Ordering::Release);
    Ok((path, recovered))
}

/// After a follower's connection dropped: once its owner lock is free (its process is
/// gone), return what it left, unless it registered again meanwhile.
fn recover_if_gone(at: &Attached, proc_id: u16, pid: u32) {
    let path = proc_path(&at.dir, proc_id);
    let deadline = Instant::now() + Duration::from_secs(10);
    while ProcSeg::owner_alive(&path).unwrap_or(false) {
        if Instant::now() > deadline {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let _g = at.admin();
    if let Ok(rec) = ProcSeg::attach(&path) {
        if rec.pid().load(Ordering::Acquire) as u32 == pid
            && !ProcSeg::owner_alive(&path).unwrap_or(true)
        {
            if let Err(e) = recovery::recover_process(at, &rec) {
                eprintln!("alloc: recovering process {proc_id} failed: {e}");
            }
        }
    }
}

impl Leader {
    fn handle(self: &Arc<Self>, stream: TcpStream) {
        let mut w = match stream.try_clone() {
            Ok(w) => w,
            Err(_) => return,
        };
        let mut r = BufReader::new(stream);
        let mut registered: Option<(u16, u32)> = None;
        loop {
            let (reply, close) = match next_request::<Request>(&mut r) {
                Incoming::End => break,
                Incoming::Bad { error, fatal } => (
                    Reply {
                        kind: Some(KIND_BAD_REQUEST.into()),
                        ..Reply::err(error)
                    },
                    fatal,
                ),
                Incoming::Request(req) => (self.apply(req, &mut registered), false),
            };
            if send_line(&mut w, &reply).is_err() || close {
                break;
            }
        }
        // The connection is gone. If it was a registered follower and its process died,
        // return what it held.
        if let Some((proc_id, pid)) = registered {
            recover_if_gone(&self.at, proc_id, pid);
        }
    }

    fn apply(&self, req: Request, registered: &mut Option<(u16, u32)>) -> Reply {
        let (at, cfg) = (&self.at, &self.cfg);
        match req {
            Request::Register {
                proc_id,
                pid,
                existing,
            } => match register_proc(at, proc_id, pid, existing.as_deref()) {
                Ok((p, n)) => {
                    *registered = Some((proc_id, pid));
                    Reply {
                        proc_seg: Some(p),
                        recovered_blocks: n,
                        ..Reply::ok()
                    }
                }
                Err(e) => Reply::err(e),
            },
            Request::DeviceOnline { device } => {
                match add_device(at, &device, cfg.strategy, cfg.block_size) {
                    Ok(i) => Reply {
                        dev: Some(i),
                        ..Reply::ok()
                    },
                    Err(e) => Reply::err(e),
                }
            }
            Request::DeviceOffline { dev } => match remove_device(at, dev) {
                Ok(()) => Reply::ok(),
                Err(e) => Reply::err(e),
            },
        }
    }
}

fn serve_leader(leader: Arc<Leader>, listener: TcpListener, stop: Arc<AtomicBool>) {
    std::thread::Builder::new()
        .name("alloc-leader".into())
        .spawn(move || {
            for s in listener.incoming() {
                if stop.load(Ordering::Acquire) {
                    break;
                }
                if let Ok(s) = s {
                    let l = leader.clone();
                    let _ = std::thread::Builder::new()
                        .name("alloc-leader-conn".into())
                        .spawn(move || l.handle(s));
                }
            }
        })
        .expect("spawning the leader thread");
}

fn start_leader_services(
    cfg: &NodeConfig,
    at: &Arc<Attached>,
    listener: TcpListener,
    stop: Arc<AtomicBool>,
) -> Result<(), AllocError> {
    let mut central_lock = None;
    if cfg.strategy == Strategy::Central {
        let path = proc_path(&cfg.dir, CENTRAL_PROC_ID);
        if !path.exists() {
            ProcSeg::create(&path, CENTRAL_PROC_ID)?;
        }
        // The previous leader's service (if any) is gone: recovery returned its record.
        central_lock = Some(ProcSeg::lock_owner(&path)?);
        let rec = Arc::new(ProcSeg::attach(&path)?);
        rec.pid()
            .store(std::process::id() as u64, Ordering::Release);
        rec.busy().store(0, Ordering::Release);
        central::serve(at.clone(), rec, &central_socket(&cfg.dir))?;
    }
    let leader = Arc::new(Leader {
        cfg: cfg.clone(),
        at: at.clone(),
        _central_lock: central_lock,
    });
    serve_leader(leader, listener, stop);
    Ok(())
}

// ------------------------------------------------------------------ process

/// This process's role.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Leader,
    Follower,
}

/// A running node process.
pub struct NodeProcess {
    pub cfg: NodeConfig,
    pub at: Arc<Attached>,
    pub me: Arc<ProcSeg>,
    role: Arc<Mutex<Role>>,
    stop: Arc<AtomicBool>,
    /// Blocks returned for this process's previous incarnation when it (re)registered.
    pub recovered_at_start: usize,
    /// Held for the life of the process: how the others know it is alive.
    _owner_lock: OwnerLock,
}

impl std::fmt::Debug for NodeProcess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeProcess")
            .field("proc_id", &self.cfg.proc_id)
            .field("role", &self.role())
            .finish()
    }
}

fn bind_internal(port: u16) -> std::io::Result<TcpListener> {
    TcpListener::bind(("127.0.0.1", port))
}

/// Connects to the leader and registers; returns the open connection.
fn register_with_leader(
    cfg: &NodeConfig,
    existing: Option<&Path>,
) -> Result<Option<(TcpStream, Reply)>, AllocError> {
    let mut s = match TcpStream::connect(("127.0.0.1", cfg.internal_port)) {
        Ok(s) => s,
        Err(_) => return Ok(None),
    };
    let req = Request::Register {
        proc_id: cfg.proc_id,
        pid: std::process::id(),
        existing: existing.map(Path::to_path_buf),
    };
    if send_line(&mut s, &req).is_err() {
        return Ok(None);
    }
    let mut r = BufReader::new(s.try_clone().map_err(|e| AllocError::net("clone", e))?);
    match recv_line::<Reply>(&mut r) {
        Ok(Some(rep)) if rep.ok => Ok(Some((s, rep))),
        Ok(Some(rep)) => Err(AllocError::Protocol(
            rep.error.unwrap_or_else(|| "registration refused".into()),
        )),
        Ok(None) | Err(_) => Ok(None),
    }
}

enum Elected {
    Leader(TcpListener),
    Follower(TcpStream, Reply),
}

fn elect(cfg: &NodeConfig, existing: Option<&Path>) -> Result<Elected, AllocError> {
    let deadline = Instant::now() + ELECTION_TIMEOUT;
    loop {
        match bind_internal(cfg.internal_port) {
            Ok(l) => return Ok(Elected::Leader(l)),
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {}
            Err(e) => {
                return Err(AllocError::net(
                    format!("binding internal port {}", cfg.internal_port),
                    e,
                ))
            }
        }
        if let Some((s, rep)) = register_with_leader(cfg, existing)? {
            return Ok(Elected::Follower(s, rep));
        }
        if Instant::now() > deadline {
            return Err(AllocError::Timeout(format!(
                "neither bound nor reached a leader on port {} within {ELECTION_TIMEOUT:?}",
                cfg.internal_port
            )));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

impl NodeProcess {
    /// Starts this process: input checks, election, then leader set-up or registration.
    pub fn start(cfg: NodeConfig) -> Result<NodeProcess, AllocError> {
        if cfg.proc_id == CENTRAL_PROC_ID {
            return Err(AllocError::BadInput(
                "process id 0 is reserved for the leader's central service".into(),
            ));
        }
        // Before anything is created: a bad block size must not poison the directory.
        check_block_size(cfg.block_size)?;
        if cfg.unfilled_capacity == 0 {
            return Err(AllocError::BadInput(
                "the unfilled-block table needs at least one entry".into(),
            ));
        }
        // A restart: take the record's owner lock first. It is refused while a live
        // process holds it, and holding it proves the previous incarnation is gone.
        let own = proc_path(&cfg.dir, cfg.proc_id);
        let early_lock = if own.exists() {
            Some(ProcSeg::lock_owner(&own)?)
        } else {
            None
        };
        let existing = early_lock.as_ref().map(|_| own.as_path());
        let stop = Arc::new(AtomicBool::new(false));
        let (at, me_path, role, recovered, conn) = match elect(&cfg, existing)? {
            Elected::Leader(l) => {
                let at = leader_setup(&cfg)?;
                let (p, n) = register_proc(&at, cfg.proc_id, std::process::id(), existing)?;
                start_leader_services(&cfg, &at, l, stop.clone())?;
                (at, p, Role::Leader, n, None)
            }
            Elected::Follower(s, rep) => {
                let at = Arc::new(Attached::open_checked(
                    &cfg.dir,
                    cfg.strategy,
                    cfg.block_size,
                )?);
                let p = rep
                    .proc_seg
                    .clone()
                    .ok_or_else(|| AllocError::Protocol("no segment in reply".into()))?;
                (at, p, Role::Follower, rep.recovered_blocks, Some(s))
            }
        };
        let owner_lock = match early_lock {
            Some(l) => l,
            None => ProcSeg::lock_owner(&me_path)?,
        };
        let p = NodeProcess {
            me: Arc::new(ProcSeg::attach(&me_path)?),
            cfg,
            at,
            role: Arc::new(Mutex::new(role)),
            stop,
            recovered_at_start: recovered,
            _owner_lock: owner_lock,
        };
        if let Some(s) = conn {
            p.watch_leader(s);
        }
        Ok(p)
    }

    pub fn role(&self) -> Role {
        *self.role.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn is_leader(&self) -> bool {
        self.role() == Role::Leader
    }

    /// The allocator of this process's strategy.
    pub fn allocator(&self) -> Result<Box<dyn BlockAllocator>, AllocError> {
        Ok(match self.cfg.strategy {
            Strategy::Shm | Strategy::Mutex => Box::new(LocalAllocator::new(
                self.at.clone(),
                self.me.clone(),
                self.cfg.strategy,
            )),
            Strategy::Central => Box::new(CentralClient::connect(
                &central_socket(&self.cfg.dir),
                self.at.clone(),
                self.me.clone(),
            )?),
        })
    }

    /// Watches the registration connection; when the leader goes away, runs the
    /// election again (and takes over as leader if it wins).
    fn watch_leader(&self, s: TcpStream) {
        let cfg = self.cfg.clone();
        let at = self.at.clone();
        let role = self.role.clone();
        let stop = self.stop.clone();
        std::thread::Builder::new()
            .name("alloc-follower-watch".into())
            .spawn(move || {
                let own = proc_path(&cfg.dir, cfg.proc_id);
                let mut conn = s;
                loop {
                    let mut buf = [0u8; 64];
                    loop {
                        match std::io::Read::read(&mut conn, &mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(_) => {}
                        }
                    }
                    if stop.load(Ordering::Acquire) {
                        return;
                    }
                    match elect(&cfg, Some(&own)) {
                        Ok(Elected::Leader(l)) => {
                            let r = leader_takeover(&cfg, &at)
                                .and_then(|()| start_leader_services(&cfg, &at, l, stop.clone()));
                            if let Err(e) = r {
                                eprintln!("alloc: taking over as leader failed: {e}");
                                return;
                            }
                            *role.lock().unwrap_or_else(|e| e.into_inner()) = Role::Leader;
                            return;
                        }
                        Ok(Elected::Follower(s, _)) => conn = s,
                        Err(e) => {
                            eprintln!("alloc: re-election failed: {e}");
                            return;
                        }
                    }
                }
            })
            .expect("spawning the follower watch thread");
    }

    /// Asks the leader (or, as leader, does it) to bring `device` online; returns its index.
    pub fn device_online(&self, device: &DeviceSpec) -> Result<u16, AllocError> {
        if self.is_leader() {
            return add_device(&self.at, device, self.cfg.strategy, self.cfg.block_size);
        }
        let rep = self.ask_leader(&Request::DeviceOnline {
            device: device.clone(),
        })?;
        self.at.refresh()?;
        rep.dev
            .ok_or_else(|| AllocError::Protocol("no device index in reply".into()))
    }

    /// Asks the leader (or, as leader, does it) to take device `dev` offline.
    pub fn device_offline(&self, dev: u16) -> Result<(), AllocError> {
        if self.is_leader() {
            return remove_device(&self.at, dev);
        }
        self.ask_leader(&Request::DeviceOffline { dev })?;
        Ok(())
    }

    /// Scans this process's devices: any without an online segment is brought online.
    /// Returns their indexes, in the order given.
    pub fn scan(&self, devices: &[DeviceSpec]) -> Result<Vec<u16>, AllocError> {
        self.at.refresh()?;
        let mut out = Vec::new();
        for spec in devices {
            let known = self
                .at
                .attached_devices()
                .find(|d| d.is_online() && d.device_path() == spec.path)
                .map(|d| d.index());
            out.push(match known {
                Some(i) => i,
                None => self.device_online(spec)?,
            });
        }
        Ok(out)
    }

    fn ask_leader(&self, req: &Request) -> Result<Reply, AllocError> {
        ask_leader(self.cfg.internal_port, req)
    }

    /// Stops serving (best effort; the process normally just exits).
    pub fn shutdown(&self) {
        self.stop.store(true, Ordering::Release);
    }
}

/// Sends one request to the leader on `internal_port` and returns its (successful) reply.
pub fn ask_leader(internal_port: u16, req: &Request) -> Result<Reply, AllocError> {
    let mut s = TcpStream::connect(("127.0.0.1", internal_port))
        .map_err(|e| AllocError::net("connecting to the leader", e))?;
    send_line(&mut s, req).map_err(|e| AllocError::net("asking the leader", e))?;
    let mut r = BufReader::new(s);
    match recv_line::<Reply>(&mut r)? {
        Some(rep) if rep.ok => Ok(rep),
        Some(rep) => Err(AllocError::Protocol(
            rep.error.unwrap_or_else(|| "refused".into()),
        )),
        None => Err(AllocError::Protocol("leader closed the connection".into())),
    }
}
