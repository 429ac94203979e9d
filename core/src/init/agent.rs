//! The node agent: owns a set of devices, initialises one daemon per device (id, mkfs,
//! registration, report) one by one or all in parallel.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::daemon::{self, MkfsRequest};
use crate::dev::{Device, UringEngine};
use crate::monitor::{MonitorClient, Outcome};

use super::error::{InitError, Result};

/// Queue depth of each daemon's engine during mkfs.
const MKFS_QUEUE_DEPTH: u32 = 16;

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

/// What the orchestrator asks a node to do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInitRequest {
    /// Ids from a batch allocation, one per device in order; `None`: each daemon requests
    /// its own id.
    pub ids: Option<Vec<u32>>,
    /// Initialise the node's daemons in parallel (else one by one).
    pub parallel: bool,
    /// Overwrite foreign data on the devices.
    pub force: bool,
}

/// One timed step of a daemon's initialisation: `alloc`, the mkfs phases, `register`,
/// `report`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepTime {
    pub step: String,
    pub ns: u64,
}

/// How one daemon's initialisation went.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DaemonOutcome {
    pub node: String,
    pub device: String,
    pub id: Option<u32>,
    pub daemon_uuid: Option<Uuid>,
    /// `None`: the daemon is up; else why it failed (also reported to the monitor when
    /// the daemon had an id).
    pub error: Option<String>,
    pub already_formatted: bool,
    pub start_unix_ns: u64,
    pub end_unix_ns: u64,
    pub steps: Vec<StepTime>,
    pub bytes_written: u64,
}

impl DaemonOutcome {
    pub fn duration(&self) -> Duration {
        Duration::from_nanos(self.end_unix_ns.saturating_sub(self.start_unix_ns))
    }
    pub fn is_up(&self) -> bool {
        self.error.is_none()
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

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "localhost".into())
}

impl NodeAgent {
    /// A node named `name` owning `devices`, reporting to the monitor at `monitor`.
    /// Refuses a device listed twice (after resolving symlinks) or one that does not exist.
    pub fn new(name: &str, devices: &[PathBuf], monitor: &str) -> Result<NodeAgent> {
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
                source: crate::dev::DevError::Os {
                    path: d.clone(),
                    op: "resolve path",
                    source: e,
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
        Ok(NodeAgent {
            name: name.into(),
            host: hostname(),
            devices: canon,
            monitor: monitor.into(),
            connect_retry: crate::monitor::DEFAULT_CONNECT_RETRY,
        })
    }

    /// How long to keep retrying an unreachable monitor.
    pub fn with_connect_retry(mut self, d: Duration) -> NodeAgent {
        self.connect_retry = d;
        self
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn devices(&self) -> &[PathBuf] {
        &self.devices
    }

    pub fn info(&self) -> NodeInfo {
        NodeInfo {
            name: self.name.clone(),
            host: self.host.clone(),
            devices: self
                .devices
                .iter()
                .map(|d| d.display().to_string())
                .collect(),
        }
    }

    fn connect(&self) -> Result<MonitorClient> {
        Ok(MonitorClient::connect(&self.monitor, self.connect_retry)?)
    }

    /// Initialises one daemon per device. Errors that concern the whole node (monitor
    /// unreachable, wrong ids) come back before anything is formatted; a daemon's own
    /// failure is in its outcome (and in the monitor's map) and does not stop the others.
    pub fn init(&self, req: &NodeInitRequest) -> Result<NodeReport> {
        let mut mon = self.connect()?;
        let map = mon.map()?;
        if let Some(ids) = &req.ids {
            if ids.len() != self.devices.len() {
                return Err(InitError::IdCount {
                    node: self.name.clone(),
                    ids: ids.len(),
                    devices: self.devices.len(),
                });
            }
            for (&id, dev) in ids.iter().zip(&self.devices) {
                let dev = dev.display().to_string();
                let e = map.daemons.get(&id).ok_or(InitError::UnknownId {
                    node: self.name.clone(),
                    id,
                })?;
                if e.node != self.name || e.device != dev {
                    return Err(InitError::WrongId {
                        node: self.name.clone(),
                        id,
                        owner: format!("{} of node {}", e.device, e.node),
                        device: dev,
                    });
                }
            }
        }
        drop(mon);
        let fsid = map.fsid;
        let id_of = |i: usize| req.ids.as_ref().map(|ids| ids[i]);
        let daemons = if req.parallel {
            std::thread::scope(|s| {
                let handles: Vec<_> = self
                    .devices
                    .iter()
                    .enumerate()
                    .map(|(i, d)| {
                        let id = id_of(i);
                        std::thread::Builder::new()
                            .name(format!("init-{}-{i}", self.name))
                            .spawn_scoped(s, move || self.daemon(fsid, id, d, req.force))
                            .expect("spawn daemon thread")
                    })
                    .collect();
                handles
                    .into_iter()
                    .map(|h| h.join().expect("daemon thread panicked"))
                    .collect()
            })
        } else {
            self.devices
                .iter()
                .enumerate()
                .map(|(i, d)| self.daemon(fsid, id_of(i), d, req.force))
                .collect()
        };
        Ok(NodeReport {
            node: self.name.clone(),
            daemons,
        })
    }

    /// One daemon: id (unless given), mkfs, register, report.
    fn daemon(&self, fsid: Uuid, id: Option<u32>, path: &Path, force: bool) -> DaemonOutcome {
        let mut out = DaemonOutcome {
            node: self.name.clone(),
            device: path.display().to_string(),
            id,
            daemon_uuid: None,
            error: None,
            already_formatted: false,
            start_unix_ns: unix_ns(),
            end_unix_ns: 0,
            steps: Vec::new(),
            bytes_written: 0,
        };
        let r = self.daemon_steps(fsid, path, force, &mut out);
        if let Err((e, mon)) = r {
            out.error = Some(e.clone());
            if let (Some(id), Some(mut mon)) = (out.id, mon) {
                // Best effort: the monitor learns why.
                let _ = mon.report(id, Outcome::Failed { reason: e });
            }
        }
        out.end_unix_ns = unix_ns();
        out
    }

    fn daemon_steps(
        &self,
        fsid: Uuid,
        path: &Path,
        force: bool,
        out: &mut DaemonOutcome,
    ) -> std::result::Result<(), (String, Option<MonitorClient>)> {
        let step = |out: &mut DaemonOutcome, name: &str, t: Instant| {
            out.steps.push(StepTime {
                step: name.into(),
                ns: t.elapsed().as_nanos() as u64,
            })
        };
        let mut mon = self.connect().map_err(|e| (e.to_string(), None))?;
        if out.id.is_none() {
            let t = Instant::now();
            let ids = mon
                .alloc(&self.name, std::slice::from_ref(&out.device))
                .map_err(|e| (format!("id request: {e}"), None))?;
            out.id = Some(ids[0]);
            step(out, "alloc", t);
        }
        let id = out.id.expect("set above");
        macro_rules! fail {
            ($e:expr) => {
                return Err(($e, Some(mon)))
            };
        }
        let dev = match Device::open(path) {
            Ok(d) => d,
            Err(e) => fail!(e.to_string()),
        };
        let mut eng = match UringEngine::with_queue_depth(MKFS_QUEUE_DEPTH) {
            Ok(e) => e,
            Err(e) => fail!(e.to_string()),
        };
        let mut req = MkfsRequest::new(fsid, id);
        req.force = force;
        let rep = match daemon::mkfs(&mut eng, &dev, &req) {
            Ok(r) => r,
            Err(e) => fail!(e.to_string()),
        };
        for (p, d) in &rep.phases {
            out.steps.push(StepTime {
                step: p.name().into(),
                ns: d.as_nanos() as u64,
            });
        }
        out.already_formatted = rep.already_formatted;
        out.bytes_written = rep.bytes_written;
        out.daemon_uuid = Some(rep.label.daemon_uuid);
        let key = Uuid::new_v4().simple().to_string();
        let t = Instant::now();
        if let Err(e) = mon.register(id, rep.label.daemon_uuid, &key) {
            fail!(format!("registration: {e}"));
        }
        step(out, "register", t);
        let t = Instant::now();
        if let Err(e) = mon.report(id, Outcome::Up) {
            return Err((format!("report: {e}"), None));
        }
        step(out, "report", t);
        Ok(())
    }
}
