//! A node process: leader election by binding the internal port, follower registration,
//! device online/offline, restart paths.
//!
//! * Start: bind `127.0.0.1:<internal port>`. Success → leader: create (first run) or
//!   attach (restart) the node, device and unfilled segments, recover every process
//!   record whose process is dead (this releases what a previous leader incarnation
//!   left), then serve the port. Failure → follower: connect and register.
//! * Registration (`{"op":"register",...}` JSON line): the leader creates
//!   `proc-<id>.shm` for a first-time process; a process that ran before hands over the
//!   path of its existing segment, which the leader validates and recovers (its
//!   in-flight block goes back) before handing it back. The connection stays open: its
//!   EOF tells the leader the follower is gone (the leader then recovers it once its pid
//!   is dead) and tells the follower the leader is gone (it runs the election again).
//! * Devices: a scan that finds a device without a segment asks the leader, which
//!   creates the segment (`device_online`); `device_offline` marks a segment unusable,
//!   releases its in-flight and unfilled entries and unlinks it. Both bump the node's
//!   device epoch, which processes check to attach new segments.

use std::io::{BufRead, BufReader};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::allocator::{BlockAllocator, LocalAllocator};
use super::central::{self, CentralClient};
use super::recovery;
use super::segs::{
    DeviceRegion, DeviceSeg, NodeSeg, ProcSeg, UnfilledSeg, MAX_DEVICES, STATUS_OFFLINE,
};
use super::{pid_alive, AllocError, Strategy};

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
    pub devices: Vec<DeviceRegion>,
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
    devices: Vec<OnceLock<DeviceSeg>>,
    epoch_seen: AtomicU64,
    refresh_lock: Mutex<()>,
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
            devices: (0..MAX_DEVICES).map(|_| OnceLock::new()).collect(),
            epoch_seen: AtomicU64::new(u64::MAX),
            refresh_lock: Mutex::new(()),
        };
        at.refresh()?;
        Ok(at)
    }

    /// Attaches device segments that appeared since the last look (cheap when the
    /// node's device epoch did not move).
    pub fn refresh(&self) -> Result<(), AllocError> {
        let epoch = self.node.device_epoch().load(Ordering::Acquire);
        if self.epoch_seen.load(Ordering::Acquire) == epoch {
            return Ok(());
        }
        let _g = self.refresh_lock.lock().unwrap_or_else(|e| e.into_inner());
        for i in 0..MAX_DEVICES as u16 {
            if self.devices[i as usize].get().is_some() {
                continue;
            }
            match DeviceSeg::attach(&device_path(&self.dir, i)) {
                Ok(d) => {
                    let _ = self.devices[i as usize].set(d);
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
        /// The process's existing segment (a restart), if any.
        existing: Option<PathBuf>,
    },
    DeviceOnline {
        region: DeviceRegion,
    },
    DeviceOffline {
        dev: u16,
    },
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Reply {
    pub ok: bool,
    #[serde(default)]
    pub error: Option<String>,
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

// ------------------------------------------------------------------ leader side

/// State of the leader's service, shared by its connection threads.
struct Leader {
    cfg: NodeConfig,
    at: Arc<Attached>,
    /// Serialises segment creation and recoveries.
    admin: Mutex<()>,
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
    let node = NodeSeg::attach(&np)?;
    if node.strategy() != Some(cfg.strategy) || node.block_size() != cfg.block_size {
        return Err(AllocError::BadSegment {
            path: np,
            reason: format!(
                "node was created with strategy {:?} and block size {}, this process runs {} with {}",
                node.strategy(),
                node.block_size(),
                cfg.strategy,
                cfg.block_size
            ),
        });
    }
    let up = unfilled_path(&cfg.dir);
    if !up.exists() {
        match UnfilledSeg::create(&up, cfg.unfilled_capacity) {
            Ok(_) | Err(AllocError::AlreadyExists { .. }) => {}
            Err(e) => return Err(e),
        }
    }
    let at = Arc::new(Attached::open(&cfg.dir)?);
    for region in &cfg.devices {
        add_device(&at, region, cfg.strategy, cfg.block_size)?;
    }
    // A leader that ran before (or took over from a dead one) releases what dead
    // processes, itself included, left in the segments.
    recovery::recover_dead(&at)?;
    node.leader_pid()
        .store(std::process::id() as u64, Ordering::Release);
    node.leader_term().fetch_add(1, Ordering::AcqRel);
    Ok(at)
}

/// Creates the segment of `region` unless an online segment for the same path exists;
/// returns its index.
fn add_device(
    at: &Attached,
    region: &DeviceRegion,
    strategy: Strategy,
    block_size: u64,
) -> Result<u16, AllocError> {
    at.refresh()?;
    if let Some(d) = at
        .attached_devices()
        .find(|d| d.is_online() && d.device_path() == region.path)
    {
        return Ok(d.index());
    }
    let i = at.node.next_device().fetch_add(1, Ordering::AcqRel);
    if i >= MAX_DEVICES as u64 {
        return Err(AllocError::BadInput(format!(
            "node already had {MAX_DEVICES} devices"
        )));
    }
    DeviceSeg::create(
        &device_path(&at.dir, i as u16),
        i as u16,
        region,
        block_size,
        strategy.free_mode(),
    )?;
    at.node.device_epoch().fetch_add(1, Ordering::AcqRel);
    at.refresh()?;
    Ok(i as u16)
}

/// Takes device `dev` offline: marks it unusable, releases its in-flight blocks and
/// unfilled entries, unlinks its segment.
fn remove_device(at: &Attached, dev: u16) -> Result<(), AllocError> {
    let d = at.device(dev)?;
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
    let mut recovered = 0;
    if path.exists() {
        let rec = ProcSeg::attach(&path)?;
        if rec.proc_id() != proc_id {
            return Err(AllocError::BadSegment {
                path,
                reason: format!("belongs to process {}, not {proc_id}", rec.proc_id()),
            });
        }
        let old = rec.pid().load(Ordering::Acquire) as u32;
        if old != pid {
            if old != 0 && pid_alive(old) {
                return Err(AllocError::BadInput(format!(
                    "process id {proc_id} is in use by live pid {old}"
                )));
            }
            let r = recovery::recover_process(at, &rec)?;
            recovered = r.freed.len() + r.returned_unfilled.len();
            rec.incarnation().fetch_add(1, Ordering::AcqRel);
            rec.pid().store(pid as u64, Ordering::Release);
        }
    } else {
        let rec = ProcSeg::create(&path, proc_id)?;
        rec.pid().store(pid as u64, Ordering::Release);
        rec.incarnation().store(1, Ordering::Release);
    }
    Ok((path, recovered))
}

impl Leader {
    fn handle(self: &Arc<Self>, stream: TcpStream) {
        let mut w = match stream.try_clone() {
            Ok(w) => w,
            Err(_) => return,
        };
        let mut r = BufReader::new(stream);
        let mut registered: Option<(u16, u32)> = None;
        while let Ok(Some(req)) = recv_line::<Request>(&mut r) {
            let reply = {
                let _g = self.admin.lock().unwrap_or_else(|e| e.into_inner());
                match req {
                    Request::Register {
                        proc_id,
                        pid,
                        existing,
                    } => match register_proc(&self.at, proc_id, pid, existing.as_deref()) {
                        Ok((p, n)) => {
                            registered = Some((proc_id, pid));
                            Reply {
                                proc_seg: Some(p),
                                recovered_blocks: n,
                                ..Reply::ok()
                            }
                        }
                        Err(e) => Reply::err(e),
                    },
                    Request::DeviceOnline { region } => {
                        match add_device(&self.at, &region, self.cfg.strategy, self.cfg.block_size)
                        {
                            Ok(i) => Reply {
                                dev: Some(i),
                                ..Reply::ok()
                            },
                            Err(e) => Reply::err(e),
                        }
                    }
                    Request::DeviceOffline { dev } => match remove_device(&self.at, dev) {
                        Ok(()) => Reply::ok(),
                        Err(e) => Reply::err(e),
                    },
                }
            };
            if send_line(&mut w, &reply).is_err() {
                break;
            }
        }
        // The connection is gone. If it was a registered follower and its process died,
        // return what it held.
        if let Some((proc_id, pid)) = registered {
            let deadline = Instant::now() + Duration::from_secs(10);
            while pid_alive(pid) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            if !pid_alive(pid) {
                let _g = self.admin.lock().unwrap_or_else(|e| e.into_inner());
                if let Ok(rec) = ProcSeg::attach(&proc_path(&self.at.dir, proc_id)) {
                    if rec.pid().load(Ordering::Acquire) as u32 == pid {
                        let _ = recovery::recover_process(&self.at, &rec);
                        rec.pid().store(0, Ordering::Release);
                    }
                }
            }
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
    /// Blocks the leader returned when this process (re)registered.
    pub recovered_at_start: usize,
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
fn register_with_leader(cfg: &NodeConfig) -> Result<Option<(TcpStream, Reply)>, AllocError> {
    let mut s = match TcpStream::connect(("127.0.0.1", cfg.internal_port)) {
        Ok(s) => s,
        Err(_) => return Ok(None),
    };
    let own = proc_path(&cfg.dir, cfg.proc_id);
    let existing = own.exists().then_some(own);
    let req = Request::Register {
        proc_id: cfg.proc_id,
        pid: std::process::id(),
        existing,
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

fn elect(cfg: &NodeConfig) -> Result<Elected, AllocError> {
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
        if let Some((s, rep)) = register_with_leader(cfg)? {
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
    /// Starts this process: election, then leader set-up or registration.
    pub fn start(cfg: NodeConfig) -> Result<NodeProcess, AllocError> {
        if cfg.proc_id == CENTRAL_PROC_ID {
            return Err(AllocError::BadInput(
                "process id 0 is reserved for the leader's central service".into(),
            ));
        }
        let stop = Arc::new(AtomicBool::new(false));
        match elect(&cfg)? {
            Elected::Leader(l) => {
                let at = leader_setup(&cfg)?;
                let (me_path, _) = register_proc(&at, cfg.proc_id, std::process::id(), None)?;
                let me = Arc::new(ProcSeg::attach(&me_path)?);
                let role = Arc::new(Mutex::new(Role::Leader));
                start_leader_services(&cfg, &at, l, stop.clone())?;
                Ok(NodeProcess {
                    cfg,
                    at,
                    me,
                    role,
                    stop,
                    recovered_at_start: 0,
                })
            }
            Elected::Follower(s, rep) => {
                let at = Arc::new(Attached::open(&cfg.dir)?);
                let path = rep
                    .proc_seg
                    .clone()
                    .ok_or_else(|| AllocError::Protocol("no segment in reply".into()))?;
                let me = Arc::new(ProcSeg::attach(&path)?);
                let role = Arc::new(Mutex::new(Role::Follower));
                let p = NodeProcess {
                    cfg,
                    at,
                    me,
                    role,
                    stop,
                    recovered_at_start: rep.recovered_blocks,
                };
                p.watch_leader(s);
                Ok(p)
            }
        }
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
                    match elect(&cfg) {
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

    /// Asks the leader (or, as leader, does it) to bring `region` online; returns its index.
    pub fn device_online(&self, region: &DeviceRegion) -> Result<u16, AllocError> {
        if self.is_leader() {
            return add_device(&self.at, region, self.cfg.strategy, self.cfg.block_size);
        }
        let rep = self.ask_leader(&Request::DeviceOnline {
            region: region.clone(),
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
    pub fn scan(&self, regions: &[DeviceRegion]) -> Result<Vec<u16>, AllocError> {
        self.at.refresh()?;
        let mut out = Vec::new();
        for r in regions {
            let known = self
                .at
                .attached_devices()
                .find(|d| d.is_online() && d.device_path() == r.path)
                .map(|d| d.index());
            out.push(match known {
                Some(i) => i,
                None => self.device_online(r)?,
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

/// A follower that won the election after the leader died: recover dead processes
/// (the old leader included) and record itself as leader.
fn leader_takeover(cfg: &NodeConfig, at: &Attached) -> Result<(), AllocError> {
    for region in &cfg.devices {
        add_device(at, region, cfg.strategy, cfg.block_size)?;
    }
    recovery::recover_dead(at)?;
    at.node
        .leader_pid()
        .store(std::process::id() as u64, Ordering::Release);
    at.node.leader_term().fetch_add(1, Ordering::AcqRel);
    Ok(())
}

fn start_leader_services(
    cfg: &NodeConfig,
    at: &Arc<Attached>,
    listener: TcpListener,
    stop: Arc<AtomicBool>,
) -> Result<(), AllocError> {
    if cfg.strategy == Strategy::Central {
        let (p, _) = {
            let path = proc_path(&cfg.dir, CENTRAL_PROC_ID);
            if path.exists() {
                let rec = ProcSeg::attach(&path)?;
                rec.pid()
                    .store(std::process::id() as u64, Ordering::Release);
                rec.busy().store(0, Ordering::Release);
                (path, 0)
            } else {
                let rec = ProcSeg::create(&path, CENTRAL_PROC_ID)?;
                rec.pid()
                    .store(std::process::id() as u64, Ordering::Release);
                (path, 0)
            }
        };
        let rec = Arc::new(ProcSeg::attach(&p)?);
        central::serve(at.clone(), rec, &central_socket(&cfg.dir))?;
    }
    let leader = Arc::new(Leader {
        cfg: cfg.clone(),
        at: at.clone(),
        admin: Mutex::new(()),
    });
    serve_leader(leader, listener, stop);
    Ok(())
}
