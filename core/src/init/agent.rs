//! The node agent: owns a set of devices, initialises one daemon per device (id, mkfs,
//! registration, report) one by one or all in parallel.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::daemon::{self, MkfsRequest};
use crate::monitor::{ClusterMap, DaemonState, MonitorClient, Outcome, Slot};

use super::error::{InitError, Result};

/// A node agent.
#[derive(Debug, Clone)]
pub struct NodeAgent {
    name: String,
    host: String,
    devices: Vec<PathBuf>,
    monitor: String,
    connect_retry: Duration,
}

/// What a node owns (for the orchestrator's checks and batch allocation).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    pub name: String,
    pub host: String,
    pub devices: Vec<String>,
}

impl NodeInfo {
    /// A node's description from its name, host and (resolved) devices.
    pub(super) fn of(name: &str, host: &str, devices: &[PathBuf]) -> NodeInfo {
        NodeInfo {
            name: name.into(),
            host: host.into(),
            devices: devices.iter().map(|d| d.display().to_string()).collect(),
        }
    }
}

/// What the orchestrator asks a node to do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInitRequest {
    /// Ids from a batch allocation, one per device in order; `None`: each daemon requests
    /// its own id.
    pub ids: Option<Vec<u32>>,
    /// Ceph backend: the OSDs' uuids and cephx secrets that the batch registered with
    /// their ids, in the same order (`None` with the blocklab backend or without a batch).
    #[serde(default)]
    pub keys: Option<Vec<DaemonKey>>,
    /// Initialise the node's daemons in parallel (else one by one).
    pub parallel: bool,
    /// Overwrite foreign data on the devices.
    pub force: bool,
}

/// An OSD's identity as `osd new` registered it: its uuid and cephx secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DaemonKey {
    pub uuid: Uuid,
    pub secret: String,
}

impl DaemonKey {
    /// A new OSD's identity: a random uuid and a fresh secret.
    pub fn generate() -> DaemonKey {
        DaemonKey {
            uuid: Uuid::new_v4(),
            secret: crate::ceph::osd::gen_secret(),
        }
    }
}

/// One timed step of a daemon's initialisation: `alloc`, the mkfs phases, `register`,
/// `report`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepTime {
    pub step: String,
    pub ns: u64,
    /// CPU time the step's programs used (Ceph backend: the programs a step runs and, for
    /// `up`, the OSD daemon until it was up), where measured. Exact only when the daemon
    /// ran alone on its node: concurrent steps' programs are counted together.
    #[serde(default)]
    pub cpu_ns: Option<u64>,
}

/// How one daemon's initialisation went.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DaemonOutcome {
    pub node: String,
    pub device: String,
    pub id: Option<u32>,
    /// `None`: the daemon is up; else why it failed (also reported to the monitor when
    /// the daemon had an id).
    pub error: Option<String>,
    /// The map had this device's daemon `up` already: nothing was done.
    pub already_up: bool,
    /// mkfs found the device formatted for this daemon already (a rerun) and wrote nothing.
    pub already_formatted: bool,
    /// Wall-clock start and end of the daemon's own work on its node, only to tell which
    /// daemons overlapped (also across processes); durations come from `elapsed_ns`.
    pub start_unix_ns: u64,
    pub end_unix_ns: u64,
    /// How long the daemon took (monotonic clock), including a batch allocation made for
    /// it before it started.
    pub elapsed_ns: u64,
    pub steps: Vec<StepTime>,
    pub bytes_written: u64,
    /// Flushes the device completed during mkfs (the kernel's counters; 0 where not
    /// measured).
    #[serde(default)]
    pub flushes: u64,
}

impl DaemonOutcome {
    pub(super) fn new(node: &str, device: &str, id: Option<u32>) -> DaemonOutcome {
        let now = unix_ns();
        DaemonOutcome {
            node: node.into(),
            device: device.into(),
            id,
            error: None,
            already_up: false,
            already_formatted: false,
            start_unix_ns: now,
            end_unix_ns: now,
            elapsed_ns: 0,
            steps: Vec::new(),
            bytes_written: 0,
            flushes: 0,
        }
    }

    /// A daemon that did not run because its node failed as a whole.
    pub(super) fn node_failed(node: &str, device: &str, id: Option<u32>, why: &str) -> Self {
        let mut o = DaemonOutcome::new(node, device, id);
        o.error = Some(why.into());
        o
    }

    pub fn duration(&self) -> Duration {
        Duration::from_nanos(self.elapsed_ns)
    }

    pub fn is_up(&self) -> bool {
        self.error.is_none()
    }

    pub(super) fn step(&mut self, name: &str, since: Instant) {
        self.step_cpu(name, since, None);
    }

    /// A step that used `cpu` of CPU time.
    pub(super) fn step_cpu(&mut self, name: &str, since: Instant, cpu: Option<Duration>) {
        self.steps.push(StepTime {
            step: name.into(),
            ns: since.elapsed().as_nanos() as u64,
            cpu_ns: cpu.map(|c| c.as_nanos() as u64),
        });
    }
}

/// A node's answer: one outcome per device, in device order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeReport {
    pub node: String,
    pub daemons: Vec<DaemonOutcome>,
}

pub(super) fn unix_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

pub(super) fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "localhost".into())
}

/// The id of the daemon of `device` of `node` if the map has it `up`.
pub(super) fn up_id(map: &ClusterMap, node: &str, device: &str) -> Option<u32> {
    map.daemon_of(node, device)
        .filter(|e| e.state == DaemonState::Up)
        .map(|e| e.id)
}

/// A node's devices with symlinks resolved. Refuses a node without a name, a device that
/// does not exist and one listed twice.
pub(super) fn canonical_devices(name: &str, devices: &[PathBuf]) -> Result<Vec<PathBuf>> {
    if name.is_empty() {
        return Err(InitError::Node {
            node: name.into(),
            message: "a node needs a name".into(),
        });
    }
    let mut canon = Vec::with_capacity(devices.len());
    for d in devices {
        let c = std::fs::canonicalize(d).map_err(|e| InitError::Device {
            node: name.into(),
            path: d.clone(),
            cause: crate::dev::DevError::Os {
                path: d.clone(),
                op: "resolve path",
                cause: e,
            },
        })?;
        if canon.contains(&c) {
            return Err(InitError::DuplicateDevice {
                node: name.into(),
                device: d.display().to_string(),
            });
        }
        canon.push(c);
    }
    Ok(canon)
}

/// Runs `daemon(i)` for each of a node's `devices`, one after another or each on its own
/// thread at once; one outcome per device, in order (a panicked or unstartable thread is
/// that daemon's failure).
pub(super) fn each_daemon(
    node: &str,
    devices: &[String],
    parallel: bool,
    daemon: impl Fn(usize) -> DaemonOutcome + Sync,
) -> Vec<DaemonOutcome> {
    if !parallel {
        return (0..devices.len()).map(daemon).collect();
    }
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..devices.len())
            .map(|i| {
                let daemon = &daemon;
                std::thread::Builder::new()
                    .name(format!("init-{node}-{i}"))
                    .spawn_scoped(s, move || daemon(i))
            })
            .collect();
        handles
            .into_iter()
            .enumerate()
            .map(|(i, h)| match h {
                Ok(h) => h.join().unwrap_or_else(|_| {
                    DaemonOutcome::node_failed(
                        node,
                        &devices[i],
                        None,
                        "the daemon's thread panicked",
                    )
                }),
                Err(e) => DaemonOutcome::node_failed(
                    node,
                    &devices[i],
                    None,
                    &format!("no thread for the daemon: {e}"),
                ),
            })
            .collect()
    })
}

impl NodeAgent {
    /// A node named `name` owning `devices`, reporting to the monitor at `monitor`.
    /// Refuses a device listed twice (after resolving symlinks) or one that does not exist.
    pub fn new(name: &str, devices: &[PathBuf], monitor: &str) -> Result<NodeAgent> {
        Ok(NodeAgent {
            name: name.into(),
            host: hostname(),
            devices: canonical_devices(name, devices)?,
            monitor: monitor.into(),
            connect_retry: crate::monitor::DEFAULT_CONNECT_RETRY,
        })
    }

    /// How long to keep retrying an unreachable monitor.
    pub fn with_connect_retry(mut self, d: Duration) -> NodeAgent {
        self.connect_retry = d;
        self
    }

    pub fn info(&self) -> NodeInfo {
        NodeInfo::of(&self.name, &self.host, &self.devices)
    }

    fn connect(&self) -> Result<MonitorClient> {
        Ok(MonitorClient::connect(&self.monitor, self.connect_retry)?)
    }

    /// Initialises one daemon per device; a device whose daemon the map has `up` already
    /// is left alone (`already_up`). Errors that concern the whole node (monitor
    /// unreachable, wrong ids) come back before anything is formatted; a daemon's own
    /// failure is in its outcome (and in the monitor's map) and does not stop the others.
    pub fn init(&self, req: &NodeInitRequest) -> Result<NodeReport> {
        let map = self.connect()?.map()?;
        let devices: Vec<String> = self
            .devices
            .iter()
            .map(|d| d.display().to_string())
            .collect();
        if let Some(ids) = &req.ids {
            if ids.len() != devices.len() {
                return Err(InitError::IdCount {
                    node: self.name.clone(),
                    ids: ids.len(),
                    devices: devices.len(),
                });
            }
            for (&id, dev) in ids.iter().zip(&devices) {
                let e = map.daemons.get(&id).ok_or(InitError::UnknownId {
                    node: self.name.clone(),
                    id,
                })?;
                if e.node != self.name || e.device != *dev {
                    return Err(InitError::WrongId {
                        node: self.name.clone(),
                        id,
                        owner: format!("{} of node {}", e.device, e.node),
                        device: dev.clone(),
                    });
                }
            }
        }
        let fsid = map.fsid;
        let daemon = |i: usize| {
            let dev = &devices[i];
            let given = req.ids.as_ref().map(|ids| ids[i]);
            match up_id(&map, &self.name, dev) {
                Some(id) if given.is_none() || given == Some(id) => {
                    let mut o = DaemonOutcome::new(&self.name, dev, Some(id));
                    o.already_up = true;
                    o
                }
                _ => self.daemon(fsid, given, &self.devices[i], req.force),
            }
        };
        let daemons = each_daemon(&self.name, &devices, req.parallel, daemon);
        Ok(NodeReport {
            node: self.name.clone(),
            daemons,
        })
    }

    /// One daemon: id (unless given), mkfs, register, report; on failure, the monitor
    /// learns why (best effort) when the daemon has an id.
    fn daemon(&self, fsid: Uuid, id: Option<u32>, path: &Path, force: bool) -> DaemonOutcome {
        let t0 = Instant::now();
        let mut out = DaemonOutcome::new(&self.name, &path.display().to_string(), id);
        match self.connect() {
            Err(e) => out.error = Some(e.to_string()),
            Ok(mut mon) => {
                if let Err(e) = self.daemon_steps(&mut mon, fsid, path, force, &mut out) {
                    if let Some(id) = out.id {
                        let _ = mon.report(id, Outcome::Failed { reason: e.clone() });
                    }
                    out.error = Some(e);
                }
            }
        }
        out.elapsed_ns = t0.elapsed().as_nanos() as u64;
        out.end_unix_ns = unix_ns();
        out
    }

    fn daemon_steps(
        &self,
        mon: &mut MonitorClient,
        fsid: Uuid,
        path: &Path,
        force: bool,
        out: &mut DaemonOutcome,
    ) -> std::result::Result<(), String> {
        let id = match out.id {
            Some(id) => id,
            None => {
                let t = Instant::now();
                let slot = Slot {
                    node: self.name.clone(),
                    device: out.device.clone(),
                    host: self.host.clone(),
                };
                let ids = mon
                    .alloc_batch(&[slot])
                    .map_err(|e| format!("id request: {e}"))?;
                out.id = ids.first().copied();
                out.step("alloc", t);
                out.id.ok_or("id request: no id in the answer")?
            }
        };
        // The uuid the monitor gave this daemon at allocation: mkfs formats with it, and
        // refuses (without force) a device formatted for an earlier daemon of the same id.
        let uuid = mon
            .map()
            .map_err(|e| format!("reading the map: {e}"))?
            .daemons
            .get(&id)
            .and_then(|e| e.uuid);
        let mut req = MkfsRequest::new(fsid, id);
        req.daemon_uuid = uuid;
        req.force = force;
        let rep = daemon::mkfs_path(path, &req).map_err(|e| e.to_string())?;
        for (p, d) in &rep.phases {
            out.steps.push(StepTime {
                step: p.name().into(),
                ns: d.as_nanos() as u64,
                cpu_ns: None,
            });
        }
        out.already_formatted = rep.already_formatted;
        out.bytes_written = rep.bytes_written;
        // The daemon's key lives in the monitor's map only (the daemon would fetch it
        // from there when it starts); a rerun registers a new one.
        let key = Uuid::new_v4().simple().to_string();
        let t = Instant::now();
        mon.register(id, rep.label.daemon_uuid, &key)
            .map_err(|e| format!("registration: {e}"))?;
        out.step("register", t);
        let t = Instant::now();
        mon.report(id, Outcome::Up)
            .map_err(|e| format!("report: {e}"))?;
        out.step("report", t);
        Ok(())
    }
}
