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
//! * The leader serves the internal port ([`super::wire::NodeRequest`]) on the shared
//!   server ([`crate::jsonl::server`]), and under the `central` strategy the central
//!   allocator ([`super::central`]); [`NodeProcess::shutdown`] stops both.
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
//!   process's `admin` lock ([`Attached`], [`super::attached`]); only the leader does it.

use std::io::BufReader;
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;

use super::allocator::{BlockAllocator, LocalAllocator};
use super::attached::{
    central_socket, device_path, io, node_path, proc_path, unfilled_path, Attached,
};
use super::central::{self, CentralClient, CENTRAL_PROC_ID};
use super::recovery;
use super::region::{self, DeviceSpec};
use super::segs::{
    check_block_size, DeviceSeg, NodeSeg, OwnerLock, ProcSeg, UnfilledSeg, MAX_DEVICES,
    STATUS_OFFLINE,
};
use super::wire::{
    self, recv_reply, send, Body, DeviceAdded, Done, NodeRequest, Registered, Reply,
};
use super::{AllocError, Strategy};
use crate::jsonl::server::{Answer, Conn, Server};

/// How long a process keeps trying to become leader or reach one.
pub const ELECTION_TIMEOUT: Duration = Duration::from_secs(30);

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
/// gone), return what it left, unless it registered again meanwhile. Gives up when the
/// leader's server stops.
fn recover_if_gone(at: &Attached, proc_id: u16, pid: u32, stopping: &dyn Fn() -> bool) {
    let path = proc_path(&at.dir, proc_id);
    let deadline = Instant::now() + Duration::from_secs(10);
    while ProcSeg::owner_alive(&path).unwrap_or(false) {
        if Instant::now() > deadline || stopping() {
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
    /// One connection of the internal port.
    fn handle(&self, mut conn: Conn<TcpStream>) {
        let mut registered: Option<(u16, u32)> = None;
        wire::converse(&mut conn, |req, _| {
            Answer::Reply(self.apply(req, &mut registered))
        });
        // The connection is gone. If it was a registered follower and its process died,
        // return what it held.
        if let Some((proc_id, pid)) = registered {
            recover_if_gone(&self.at, proc_id, pid, &|| conn.stopping());
        }
    }

    fn apply(&self, req: NodeRequest, registered: &mut Option<(u16, u32)>) -> Reply<Body> {
        let (at, cfg) = (&self.at, &self.cfg);
        match req {
            NodeRequest::Register {
                proc_id,
                pid,
                existing,
            } => {
                let r = register_proc(at, proc_id, pid, existing.as_deref());
                if r.is_ok() {
                    *registered = Some((proc_id, pid));
                }
                Reply::from(r.map(|(proc_seg, recovered_blocks)| Registered {
                    proc_seg,
                    recovered_blocks,
                }))
                .into_body()
            }
            NodeRequest::DeviceOnline { device } => Reply::from(
                add_device(at, &device, cfg.strategy, cfg.block_size)
                    .map(|dev| DeviceAdded { dev }),
            )
            .into_body(),
            NodeRequest::DeviceOffline { dev } => {
                Reply::from(remove_device(at, dev).map(|()| Done {})).into_body()
            }
        }
    }
}

/// The servers a leader runs: its internal port and, under the `central` strategy, the
/// central allocator. Dropped without [`stop`](Self::stop), they keep running for the
/// rest of the OS process (the leader role outlives a dropped [`NodeProcess`] handle, as
/// it did before the servers could stop).
struct LeaderServices {
    internal: Server<TcpListener>,
    central: Option<Server<UnixListener>>,
}

impl LeaderServices {
    /// Stops the central allocator, then the internal port (whose end releases the
    /// central service's owner lock).
    fn stop(self) {
        if let Some(s) = self.central {
            s.stop();
        }
        self.internal.stop();
    }
}

fn start_leader_services(
    cfg: &NodeConfig,
    at: &Arc<Attached>,
    listener: TcpListener,
) -> Result<LeaderServices, AllocError> {
    let mut central_lock = None;
    let mut central_server = None;
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
        let s = central::serve(at.clone(), rec, &central_socket(&cfg.dir))?;
        central_server = Some(s.keep_serving_when_dropped());
    }
    let leader = Leader {
        cfg: cfg.clone(),
        at: at.clone(),
        _central_lock: central_lock,
    };
    let internal = Server::serve(listener, "alloc-leader", move |conn| leader.handle(conn))
        .map_err(|e| AllocError::net("starting the leader's server", e))?
        .keep_serving_when_dropped();
    Ok(LeaderServices {
        internal,
        central: central_server,
    })
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
    /// The leader's servers, once this process leads.
    services: Arc<Mutex<Option<LeaderServices>>>,
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
) -> Result<Option<(TcpStream, Registered)>, AllocError> {
    let mut s = match TcpStream::connect(("127.0.0.1", cfg.internal_port)) {
        Ok(s) => s,
        Err(_) => return Ok(None),
    };
    let req = NodeRequest::Register {
        proc_id: cfg.proc_id,
        pid: std::process::id(),
        existing: existing.map(Path::to_path_buf),
    };
    if send(&mut s, &req).is_err() {
        return Ok(None);
    }
    let mut r = BufReader::new(s.try_clone().map_err(|e| AllocError::net("clone", e))?);
    match recv_reply::<Registered>(&mut r) {
        Ok(Some(Reply::Ok(rep))) => Ok(Some((s, rep))),
        Ok(Some(Reply::Refused(r))) => Err(AllocError::Protocol(r.error)),
        Ok(None) | Err(_) => Ok(None),
    }
}

enum Elected {
    Leader(TcpListener),
    Follower(TcpStream, Registered),
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
        let mut services = None;
        let (at, me_path, role, recovered, conn) = match elect(&cfg, existing)? {
            Elected::Leader(l) => {
                let at = leader_setup(&cfg)?;
                let (p, n) = register_proc(&at, cfg.proc_id, std::process::id(), existing)?;
                services = Some(start_leader_services(&cfg, &at, l)?);
                (at, p, Role::Leader, n, None)
            }
            Elected::Follower(s, rep) => {
                let at = Arc::new(Attached::open_checked(
                    &cfg.dir,
                    cfg.strategy,
                    cfg.block_size,
                )?);
                (
                    at,
                    rep.proc_seg,
                    Role::Follower,
                    rep.recovered_blocks,
                    Some(s),
                )
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
            stop: Arc::new(AtomicBool::new(false)),
            services: Arc::new(Mutex::new(services)),
            recovered_at_start: recovered,
            _owner_lock: owner_lock,
        };
        if let Some(s) = conn {
            p.watch_leader(s)
                .map_err(|e| AllocError::net("starting the follower's watch thread", e))?;
        }
        Ok(p)
    }

    pub fn role(&self) -> Role {
        *lock(&self.role)
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
    fn watch_leader(&self, s: TcpStream) -> std::io::Result<()> {
        let cfg = self.cfg.clone();
        let at = self.at.clone();
        let role = self.role.clone();
        let stop = self.stop.clone();
        let services = self.services.clone();
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
                                .and_then(|()| start_leader_services(&cfg, &at, l));
                            match r {
                                Ok(s) => *lock(&services) = Some(s),
                                Err(e) => {
                                    eprintln!("alloc: taking over as leader failed: {e}");
                                    return;
                                }
                            }
                            *lock(&role) = Role::Leader;
                            // A shutdown during the takeover did not see these servers.
                            if stop.load(Ordering::Acquire) {
                                if let Some(s) = lock(&services).take() {
                                    s.stop();
                                }
                            }
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
            .map(drop)
    }

    /// Asks the leader (or, as leader, does it) to bring `device` online; returns its index.
    pub fn device_online(&self, device: &DeviceSpec) -> Result<u16, AllocError> {
        if self.is_leader() {
            return add_device(&self.at, device, self.cfg.strategy, self.cfg.block_size);
        }
        let rep: DeviceAdded = ask_leader(
            self.cfg.internal_port,
            &NodeRequest::DeviceOnline {
                device: device.clone(),
            },
        )?;
        self.at.refresh()?;
        Ok(rep.dev)
    }

    /// Asks the leader (or, as leader, does it) to take device `dev` offline.
    pub fn device_offline(&self, dev: u16) -> Result<(), AllocError> {
        if self.is_leader() {
            return remove_device(&self.at, dev);
        }
        ask_leader::<Done>(self.cfg.internal_port, &NodeRequest::DeviceOffline { dev })?;
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

    /// Stops the leader's servers (internal port, central allocator; their connections
    /// are closed when this returns) and keeps a follower from taking over. The process
    /// normally just exits; a handle dropped without this leaves the servers running.
    pub fn shutdown(&self) {
        self.stop.store(true, Ordering::Release);
        if let Some(s) = lock(&self.services).take() {
            s.stop();
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Sends one request to the leader on `internal_port` and returns its answer.
pub fn ask_leader<T: DeserializeOwned>(
    internal_port: u16,
    req: &NodeRequest,
) -> Result<T, AllocError> {
    wire::call(&format!("127.0.0.1:{internal_port}"), req)?.into_result()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, Read, Write};
    use std::os::unix::net::UnixStream;

    #[test]
    fn shutdown_stops_the_leader_servers_and_closes_their_connections() {
        let files = tempfile::tempdir_in("/var/tmp").unwrap();
        let dev = files.path().join("a");
        let f = std::fs::File::create(&dev).unwrap();
        f.set_len((1 << 20) + 8 * 65536).unwrap();
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .unwrap()
            .port();
        let cfg = NodeConfig {
            dir: files.path().join("node"),
            internal_port: port,
            proc_id: 1,
            strategy: Strategy::Central,
            block_size: 65536,
            devices: vec![DeviceSpec::path(&dev)],
            unfilled_capacity: 4,
        };
        let p = NodeProcess::start(cfg.clone()).unwrap();
        assert!(p.is_leader());
        // The central allocator answers, and a client is connected to the internal port.
        let mut a = p.allocator().unwrap();
        let b = a.alloc(0).unwrap();
        a.free(b).unwrap();
        let mut c = TcpStream::connect(("127.0.0.1", port)).unwrap();
        // One exchange first, so the server has accepted and registered the connection: a
        // connection still in the listen backlog is reset by the kernel when the listener
        // closes, which is not what this test is about.
        c.write_all(b"{\"op\":\"device_offline\",\"dev\":99}\n")
            .unwrap();
        let mut line = String::new();
        std::io::BufReader::new(c.try_clone().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert!(line.contains("\"ok\":false"), "{line}");
        p.shutdown();
        assert_eq!(c.read(&mut [0u8; 1]).unwrap(), 0, "connection closed");
        assert!(TcpStream::connect(("127.0.0.1", port)).is_err());
        assert!(UnixStream::connect(central_socket(&cfg.dir)).is_err());
    }
}
