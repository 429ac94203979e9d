//! init's Ceph backend: the same strategies, deploying BlueStore OSDs into a private Ceph
//! cluster ([`crate::ceph`]). A node agent ([`CephNodeAgent`]) deploys one OSD per device:
//! its device checked, an id from the monitor (unless the batch gave it one), its
//! directory, mkfs, the daemon started and up in the monitor's map, its result written to
//! the monitor's config-key store. The orchestrator ([`run_ceph`]) asks for every id in
//! one session of `osd new`s when the strategy batches, runs the nodes, and takes each
//! OSD's result from the monitor's side: up in its OSD map and reported.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::json;

use crate::ceph::{osd, CephConf, CephError, MonClient, MonCommand};
use crate::procstat;

use super::agent::{
    canonical_devices, each_daemon, hostname, unix_ns, DaemonKey, DaemonOutcome, NodeInfo,
    NodeInitRequest, NodeReport,
};
use super::error::{InitError, Result};
use super::orchestrate::{charge_batch, describe, each_node, max_in_flight, InitRun, Node};
use super::Strategy;

/// How long an OSD may take from its start until it is up, by default.
pub const DEFAULT_UP_TIMEOUT: Duration = Duration::from_secs(120);

/// A node agent of the Ceph backend: owns block devices, deploys one OSD on each.
#[derive(Debug, Clone)]
pub struct CephNodeAgent {
    name: String,
    host: String,
    devices: Vec<PathBuf>,
    conf: CephConf,
    up_timeout: Duration,
}

impl CephNodeAgent {
    /// A node named `name` owning `devices`, deploying into the cluster `conf`. Refuses a
    /// device listed twice (after resolving symlinks) or one that does not exist.
    pub fn new(name: &str, devices: &[PathBuf], conf: CephConf) -> Result<CephNodeAgent> {
        Ok(CephNodeAgent {
            name: name.into(),
            host: hostname(),
            devices: canonical_devices(name, devices)?,
            conf,
            up_timeout: DEFAULT_UP_TIMEOUT,
        })
    }

    /// How long an OSD may take from its start until it is up.
    pub fn with_up_timeout(mut self, d: Duration) -> CephNodeAgent {
        self.up_timeout = d;
        self
    }

    pub fn info(&self) -> NodeInfo {
        NodeInfo::of(&self.name, &self.host, &self.devices)
    }

    /// Deploys one OSD per device, one by one or all at once. With ids from a batch, the
    /// request carries each OSD's uuid and secret too; an OSD's own failure is in its
    /// outcome (and in the monitor's config-key store when it had an id).
    pub fn init(&self, req: &NodeInitRequest) -> Result<NodeReport> {
        let devices: Vec<String> = self.info().devices;
        let grants: Option<Vec<(u32, DaemonKey)>> = match (&req.ids, &req.keys) {
            (None, _) => None,
            (Some(ids), Some(keys)) if ids.len() == devices.len() && keys.len() == ids.len() => {
                Some(ids.iter().copied().zip(keys.iter().cloned()).collect())
            }
            (Some(ids), _) => {
                return Err(InitError::IdCount {
                    node: self.name.clone(),
                    ids: ids.len().min(req.keys.as_ref().map_or(0, Vec::len)),
                    devices: devices.len(),
                })
            }
        };
        let daemons = each_daemon(&self.name, &devices, req.parallel, |i| {
            let grant = grants.as_ref().map(|g| g[i].clone());
            self.osd(&self.devices[i], grant, req.force)
        });
        Ok(NodeReport {
            node: self.name.clone(),
            daemons,
        })
    }

    fn osd(&self, dev: &Path, grant: Option<(u32, DaemonKey)>, force: bool) -> DaemonOutcome {
        let t0 = Instant::now();
        let mut out = DaemonOutcome::new(&self.name, &dev.display().to_string(), None);
        out.id = grant.as_ref().map(|(id, _)| *id);
        if let Err(e) = self.osd_steps(dev, grant, force, &mut out) {
            let why = e.to_string();
            if let Some(id) = out.id {
                // Best effort: the monitor learns why this id did not come up.
                let failed =
                    json!({"node": self.name, "device": out.device, "up": false, "error": why});
                let _ = MonClient::admin(&self.conf).command(osd::report_command(id, &failed));
            }
            out.error = Some(why);
        }
        out.elapsed_ns = t0.elapsed().as_nanos() as u64;
        out.end_unix_ns = unix_ns();
        out
    }

    fn osd_steps(
        &self,
        dev: &Path,
        grant: Option<(u32, DaemonKey)>,
        force: bool,
        out: &mut DaemonOutcome,
    ) -> std::result::Result<(), CephError> {
        let c = &self.conf;
        let t = Instant::now();
        osd::check_device(dev, force)?;
        out.step("check", t);
        // CPU of the programs each step runs (children this process waits for).
        let children = || procstat::children_cpu().unwrap_or_default();
        let (id, key) = match grant {
            Some(g) => g,
            None => {
                // As ceph-volume: a secret, then `osd new` in a session of its own.
                let (t, cpu) = (Instant::now(), children());
                let key = DaemonKey::generate();
                let answer = MonClient::bootstrap_osd(c)
                    .command(osd::new_id_command(key.uuid, &key.secret))?;
                let id = osd::parse_new_id(&answer)?;
                out.id = Some(id);
                out.step_cpu("alloc", t, Some(children().saturating_sub(cpu)));
                (id, key)
            }
        };
        let t = Instant::now();
        osd::prepare_dir(c, id, dev, &key.secret)?;
        out.step("prepare", t);
        let counters = || {
            crate::dev::io_counters(dev).map_err(|e| CephError::Io {
                what: "reading the device's I/O counters",
                path: dev.into(),
                cause: std::io::Error::other(e.to_string()),
            })
        };
        let before = counters()?;
        let (t, cpu) = (Instant::now(), children());
        osd::mkfs(c, id, key.uuid)?;
        out.step_cpu("mkfs", t, Some(children().saturating_sub(cpu)));
        let done = counters()?.since(&before);
        out.bytes_written = done.bytes_written;
        out.flushes = done.flushes;
        let (t, cpu) = (Instant::now(), children());
        osd::start(c, id)?;
        osd::await_up(c, id, self.up_timeout)?;
        // The daemon forked away from the program started: its own CPU comes from /proc.
        let daemon = osd::pid(c, id)
            .and_then(procstat::cpu_of)
            .unwrap_or_default();
        out.step_cpu("up", t, Some(children().saturating_sub(cpu) + daemon));
        let (t, cpu) = (Instant::now(), children());
        let result = json!({"node": self.name, "device": out.device, "uuid": key.uuid, "up": true});
        MonClient::admin(c).command(osd::report_command(id, &result))?;
        out.step_cpu("report", t, Some(children().saturating_sub(cpu)));
        Ok(())
    }
}

impl Node for CephNodeAgent {
    fn describe(&self) -> Result<NodeInfo> {
        Ok(self.info())
    }
    fn init(&self, req: &NodeInitRequest) -> Result<NodeReport> {
        CephNodeAgent::init(self, req)
    }
}

/// Releases the ids an earlier, interrupted attempt left `new` (allocated, never started:
/// its node agent died, or the orchestrator did) with `osd purge-new`, so that a rerun
/// strands none; the release is recorded in the OSD's config-key report. Returns them.
pub fn release_stranded(admin: &MonClient) -> Result<Vec<u32>> {
    let map = osd::osd_map(admin)?;
    let stranded: Vec<u32> = map
        .osds
        .iter()
        .filter(|o| !o.up && o.state.iter().any(|s| s == "new"))
        .map(|o| o.id)
        .collect();
    for &id in &stranded {
        admin.command(MonCommand::new(json!({
            "prefix": "osd purge-new",
            "id": id,
            "yes_i_really_mean_it": true,
        })))?;
        let note = json!({"up": false, "released": true, "error": "allocated by an attempt that never started it; released"});
        admin.command(osd::report_command(id, &note))?;
    }
    Ok(stranded)
}

/// Deploys an OSD on every device of every node with `strategy` into the cluster `conf`.
/// Ids an interrupted earlier attempt left `new` are released first ([`release_stranded`]).
/// With a batching strategy every id comes from one session of `osd new`s before any node
/// starts. Afterwards the monitor is asked: an OSD counts as deployed only if its map has
/// it up and its config-key store has its report; `monitor_proposals` is how many OSD-map
/// epochs the run added.
pub fn run_ceph(
    strategy: Strategy,
    conf: &CephConf,
    nodes: &[&dyn Node],
    force: bool,
) -> Result<InitRun> {
    let infos = describe(nodes)?;
    let admin = MonClient::admin(conf);
    release_stranded(&admin)?;
    let epoch0 = osd::osd_map(&admin)?.epoch;
    let start = Instant::now();
    let mut grants: Vec<Option<(Vec<u32>, Vec<DaemonKey>)>> = vec![None; nodes.len()];
    let mut batch = None;
    if strategy.batch() {
        let t = Instant::now();
        let keys: Vec<Vec<DaemonKey>> = infos
            .iter()
            .map(|i| i.devices.iter().map(|_| DaemonKey::generate()).collect())
            .collect();
        let cmds: Vec<MonCommand> = keys
            .iter()
            .flatten()
            .map(|k| osd::new_id_command(k.uuid, &k.secret))
            .collect();
        let session = MonClient::bootstrap_osd(conf).session(&cmds)?;
        let mut ids = session
            .answers
            .into_iter()
            .zip(&cmds)
            .map(|(a, c)| osd::parse_new_id(&a.into_result(c)?));
        for (k, node_keys) in keys.into_iter().enumerate() {
            let node_ids = node_keys
                .iter()
                .map(|_| ids.next().expect("one answer per command"))
                .collect::<std::result::Result<Vec<u32>, CephError>>()?;
            grants[k] = Some((node_ids, node_keys));
        }
        batch = Some(t.elapsed());
    }
    let req = |k: usize| NodeInitRequest {
        ids: grants[k].as_ref().map(|(ids, _)| ids.clone()),
        keys: grants[k].as_ref().map(|(_, keys)| keys.clone()),
        parallel: strategy.parallel_daemons(),
        force,
    };
    let reports = each_node(strategy.parallel_nodes(), nodes, &infos, req);
    let mut daemons = Vec::new();
    for (k, r) in reports.into_iter().enumerate() {
        match r {
            Ok(rep) => daemons.extend(rep.daemons),
            Err(e) => {
                let why = e.to_string();
                for (j, d) in infos[k].devices.iter().enumerate() {
                    let id = grants[k].as_ref().map(|(ids, _)| ids[j]);
                    daemons.push(DaemonOutcome::node_failed(&infos[k].name, d, id, &why));
                }
            }
        }
    }
    let total = start.elapsed();
    if let Some(d) = batch {
        charge_batch(&mut daemons, d);
    }
    // The monitor's side decides what was deployed.
    let map = osd::osd_map(&admin)?;
    let reported = osd::reports(&admin)?;
    for o in daemons.iter_mut().filter(|o| o.is_up()) {
        let Some(id) = o.id else {
            o.error = Some("no id".into());
            continue;
        };
        if !map.get(id).is_some_and(|s| s.up) {
            o.error = Some(format!("osd.{id} is not up in the monitor's map"));
        } else if !reported
            .iter()
            .any(|(r, v)| *r == id && v["up"] == true && v["device"] == o.device.as_str())
        {
            o.error = Some(format!(
                "osd.{id} has no report in the monitor's config-key store"
            ));
        }
    }
    Ok(InitRun {
        strategy,
        total,
        max_in_flight: max_in_flight(&daemons),
        daemons,
        monitor_proposals: Some(map.epoch.saturating_sub(epoch0)),
    })
}
