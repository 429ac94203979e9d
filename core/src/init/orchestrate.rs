//! The orchestrator: checks the nodes' devices, allocates ids (in one batch for the
//! `parallel` strategy), and runs the nodes one by one or in parallel.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::monitor::{DaemonState, MonitorClient, MonitorError, Outcome, Slot};

use super::agent::{
    up_id, DaemonOutcome, NodeAgent, NodeInfo, NodeInitRequest, NodeReport, StepTime,
};
use super::error::{InitError, Result};
use super::Strategy;

/// A node agent, in this process or behind TCP.
pub trait Node: Sync {
    fn describe(&self) -> Result<NodeInfo>;
    fn init(&self, req: &NodeInitRequest) -> Result<NodeReport>;
}

impl<N: Node + ?Sized + Send> Node for Box<N> {
    fn describe(&self) -> Result<NodeInfo> {
        (**self).describe()
    }
    fn init(&self, req: &NodeInitRequest) -> Result<NodeReport> {
        (**self).init(req)
    }
}

impl Node for NodeAgent {
    fn describe(&self) -> Result<NodeInfo> {
        Ok(self.info())
    }
    fn init(&self, req: &NodeInitRequest) -> Result<NodeReport> {
        NodeAgent::init(self, req)
    }
}

/// The result of one initialisation run.
#[derive(Debug, Clone)]
pub struct InitRun {
    pub strategy: Strategy,
    /// Wall time from the first request to the last report.
    pub total: Duration,
    /// Every daemon's outcome, node by node in device order (a node that failed as a
    /// whole has one failed outcome per device).
    pub daemons: Vec<DaemonOutcome>,
    /// Most daemons in flight at the same moment (each daemon from its own start on its
    /// node to its end; daemons found up already do not count).
    pub max_in_flight: usize,
    /// Proposals the monitor committed during the run (`None`: the monitor could not be
    /// asked at the end).
    pub monitor_proposals: Option<u64>,
}

impl InitRun {
    pub fn failed(&self) -> impl Iterator<Item = &DaemonOutcome> {
        self.daemons.iter().filter(|d| !d.is_up())
    }
}

/// Counts a batch allocation that took `d` as the first step (`alloc`) of every daemon
/// that ran.
pub(super) fn charge_batch(daemons: &mut [DaemonOutcome], d: Duration) {
    for o in daemons.iter_mut().filter(|o| !o.already_up) {
        o.elapsed_ns += d.as_nanos() as u64;
        o.steps.insert(
            0,
            StepTime {
                step: "alloc".into(),
                ns: d.as_nanos() as u64,
                cpu_ns: None,
            },
        );
    }
}

/// Most intervals `[start, end)` overlapping at one moment.
pub(super) fn max_in_flight(daemons: &[DaemonOutcome]) -> usize {
    let mut ev: Vec<(u64, i32)> = daemons
        .iter()
        .filter(|d| !d.already_up)
        .flat_map(|d| [(d.start_unix_ns, 1), (d.end_unix_ns, -1)])
        .collect();
    // Ends before starts at the same instant.
    ev.sort_unstable();
    let (mut cur, mut max) = (0i32, 0i32);
    for (_, e) in ev {
        cur += e;
        max = max.max(cur);
    }
    max as usize
}

/// What every node owns, checked: no device listed twice by a node, or by two nodes on
/// the same host.
pub(super) fn describe(nodes: &[&dyn Node]) -> Result<Vec<NodeInfo>> {
    if nodes.is_empty() {
        return Err(InitError::NoNodes);
    }
    let infos: Vec<NodeInfo> = nodes.iter().map(|n| n.describe()).collect::<Result<_>>()?;
    let mut owner: HashMap<(&str, &str), &str> = HashMap::new();
    for i in &infos {
        for d in &i.devices {
            if let Some(first) = owner.insert((&i.host, d), &i.name) {
                return Err(if first == i.name {
                    InitError::DuplicateDevice {
                        node: i.name.clone(),
                        device: d.clone(),
                    }
                } else {
                    InitError::SharedDevice {
                        device: d.clone(),
                        host: i.host.clone(),
                        first: first.into(),
                        second: i.name.clone(),
                    }
                });
            }
        }
    }
    Ok(infos)
}

/// Sends each node its request (`req(k)` for node `k`), all at once or one after another;
/// one answer per node, in order.
pub(super) fn each_node(
    parallel: bool,
    nodes: &[&dyn Node],
    infos: &[NodeInfo],
    req: impl Fn(usize) -> NodeInitRequest,
) -> Vec<Result<NodeReport>> {
    if !parallel {
        return nodes
            .iter()
            .enumerate()
            .map(|(k, n)| n.init(&req(k)))
            .collect();
    }
    std::thread::scope(|s| {
        let hs: Vec<_> = nodes
            .iter()
            .enumerate()
            .map(|(k, n)| {
                let r = req(k);
                s.spawn(move || n.init(&r))
            })
            .collect();
        hs.into_iter()
            .zip(infos)
            .map(|(h, i)| {
                h.join().unwrap_or_else(|_| {
                    Err(InitError::Node {
                        node: i.name.clone(),
                        message: "the node's thread panicked".into(),
                    })
                })
            })
            .collect()
    })
}

/// Initialises every device of every node with `strategy`, reporting to the monitor at
/// `monitor`. Refuses, before anything is written, a device listed twice by a node or by
/// two nodes on the same host, and an unreachable monitor or node. Devices whose daemon
/// the map has `up` already are left alone; those whose daemon failed or never finished
/// get their id back (see [`crate::monitor::Request::Alloc`]), so running init again after
/// a failure resumes. A node that fails as a whole (unreachable, wrong ids) does not stop
/// the others: its devices are reported failed, to the monitor too for ids allocated for
/// them in a batch that are still `new`.
pub fn run(
    strategy: Strategy,
    monitor: &str,
    nodes: &[&dyn Node],
    force: bool,
    connect_retry: Duration,
) -> Result<InitRun> {
    let infos = describe(nodes)?;
    let mut mon = MonitorClient::connect(monitor, connect_retry)?;
    let epoch0 = mon.ping()?;
    let map = mon.map()?;
    let start = Instant::now();

    let mut ids: Vec<Option<Vec<u32>>> = vec![None; nodes.len()];
    // The batch allocation counts as every daemon's `alloc` step.
    let mut batch_alloc: Option<Duration> = None;
    if strategy.batch() {
        let t = Instant::now();
        let slots: Vec<Slot> = infos
            .iter()
            .flat_map(|i| {
                i.devices
                    .iter()
                    .filter(|d| up_id(&map, &i.name, d).is_none())
                    .map(|d| Slot {
                        node: i.name.clone(),
                        device: d.clone(),
                        host: i.host.clone(),
                    })
            })
            .collect();
        let mut fresh = if slots.is_empty() {
            Vec::new()
        } else {
            mon.alloc_batch(&slots)?
        }
        .into_iter();
        batch_alloc = Some(t.elapsed());
        for (k, i) in infos.iter().enumerate() {
            let mut node_ids = Vec::with_capacity(i.devices.len());
            for d in &i.devices {
                // `alloc_batch` checked that there is one id per slot.
                let id = up_id(&map, &i.name, d).or_else(|| fresh.next());
                node_ids.push(id.ok_or_else(|| {
                    MonitorError::Protocol("fewer ids than devices in the answer".into())
                })?);
            }
            ids[k] = Some(node_ids);
        }
    }
    let req = |k: usize| NodeInitRequest {
        ids: ids[k].clone(),
        keys: None,
        parallel: strategy.parallel_daemons(),
        force,
    };
    let reports = each_node(strategy.parallel_nodes(), nodes, &infos, req);
    let mut daemons = Vec::new();
    for (k, r) in reports.into_iter().enumerate() {
        match r {
            Ok(rep) => daemons.extend(rep.daemons),
            Err(e) => {
                let info = &infos[k];
                let why = e.to_string();
                // Batch ids of a node that never started are marked failed (with the
                // reason) rather than left `new`. Not when the node may still be at work
                // (its answer was lost), and only ids that are still `new` now.
                let stranded: Vec<u32> = match (&ids[k], &e) {
                    (
                        _,
                        InitError::NodeIo {
                            what: "receive", ..
                        },
                    )
                    | (None, _) => Vec::new(),
                    (Some(node_ids), _) => match mon.map() {
                        Ok(now) => node_ids
                            .iter()
                            .copied()
                            .filter(|id| {
                                now.daemons.get(id).map(|d| d.state) == Some(DaemonState::New)
                            })
                            .collect(),
                        Err(_) => Vec::new(),
                    },
                };
                for (j, d) in info.devices.iter().enumerate() {
                    let id = ids[k].as_ref().map(|v| v[j]);
                    let mut o = DaemonOutcome::node_failed(&info.name, d, id, &why);
                    if let Some(id) = id.filter(|id| stranded.contains(id)) {
                        let failed = Outcome::Failed {
                            reason: why.clone(),
                        };
                        if let Err(e) = mon.report(id, failed) {
                            o.error = Some(format!("{why}; reporting it failed too: {e}"));
                        }
                    }
                    daemons.push(o);
                }
            }
        }
    }
    let total = start.elapsed();
    if let Some(d) = batch_alloc {
        charge_batch(&mut daemons, d);
    }
    let monitor_proposals = mon.ping().ok().map(|e| e.saturating_sub(epoch0));
    Ok(InitRun {
        strategy,
        total,
        max_in_flight: max_in_flight(&daemons),
        daemons,
        monitor_proposals,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn span(start: u64, end: u64) -> DaemonOutcome {
        let mut o = DaemonOutcome::node_failed("n", "/d", None, "");
        o.error = None;
        o.start_unix_ns = start;
        o.end_unix_ns = end;
        o
    }

    #[test]
    fn max_in_flight_counts_overlapping_intervals() {
        assert_eq!(max_in_flight(&[]), 0);
        // Back to back: one at a time.
        assert_eq!(max_in_flight(&[span(0, 10), span(10, 20), span(20, 30)]), 1);
        assert_eq!(max_in_flight(&[span(0, 10), span(5, 20), span(6, 7)]), 3);
        assert_eq!(max_in_flight(&[span(0, 10), span(5, 20), span(12, 30)]), 2);
        // A daemon found up already did not run.
        let mut up = span(0, 30);
        up.already_up = true;
        assert_eq!(max_in_flight(&[span(0, 10), up]), 1);
    }
}
