//! The orchestrator: checks the nodes' devices, allocates ids (in one batch for the
//! `parallel` strategy), and runs the nodes one by one or in parallel.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::monitor::{MonitorClient, Slot};

use super::agent::{
    unix_ns, DaemonOutcome, NodeAgent, NodeInfo, NodeInitRequest, NodeReport, StepTime,
};
use super::error::{InitError, Result};
use super::Strategy;

/// A node agent, in this process or behind TCP.
pub trait Node: Sync {
    fn name(&self) -> &str;
    fn describe(&self) -> Result<NodeInfo>;
    fn init(&self, req: &NodeInitRequest) -> Result<NodeReport>;
}

impl Node for NodeAgent {
    fn name(&self) -> &str {
        NodeAgent::name(self)
    }
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
    /// Every daemon's outcome, node by node in device order.
    pub daemons: Vec<DaemonOutcome>,
    /// Most daemons in flight at the same moment.
    pub max_in_flight: usize,
    /// Proposals the monitor committed during the run.
    pub monitor_proposals: u64,
}

impl InitRun {
    pub fn failed(&self) -> impl Iterator<Item = &DaemonOutcome> {
        self.daemons.iter().filter(|d| !d.is_up())
    }
}

/// Most intervals `[start, end)` overlapping at one moment.
pub fn max_in_flight(daemons: &[DaemonOutcome]) -> usize {
    let mut ev: Vec<(u64, i32)> = daemons
        .iter()
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

/// Initialises every device of every node with `strategy`, reporting to the monitor at
/// `monitor`. Refuses, before anything is written, a device listed by two nodes on the
/// same host.
pub fn run(
    strategy: Strategy,
    monitor: &str,
    nodes: &[&dyn Node],
    force: bool,
    connect_retry: Duration,
) -> Result<InitRun> {
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
    let mut mon = MonitorClient::connect(monitor, connect_retry)?;
    let epoch0 = mon.ping()?;
    let start = Instant::now();

    let mut ids: Vec<Option<Vec<u32>>> = vec![None; nodes.len()];
    // The batch allocation counts as every daemon's `alloc` step.
    let mut batch_alloc: Option<(u64, Duration)> = None;
    if strategy == Strategy::Parallel {
        let (t, t_ns) = (Instant::now(), unix_ns());
        let slots: Vec<Slot> = infos
            .iter()
            .flat_map(|i| {
                i.devices.iter().map(|d| Slot {
                    node: i.name.clone(),
                    device: d.clone(),
                })
            })
            .collect();
        let all = mon.alloc_batch(&slots)?;
        batch_alloc = Some((t_ns, t.elapsed()));
        let mut it = all.into_iter();
        for (k, i) in infos.iter().enumerate() {
            ids[k] = Some(it.by_ref().take(i.devices.len()).collect());
        }
    }
    let req = |k: usize| NodeInitRequest {
        ids: ids[k].clone(),
        parallel: strategy.parallel_daemons(),
        force,
    };
    let reports: Vec<Result<NodeReport>> = if strategy.parallel_nodes() {
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
                .map(|h| h.join().expect("node thread panicked"))
                .collect()
        })
    } else {
        nodes
            .iter()
            .enumerate()
            .map(|(k, n)| n.init(&req(k)))
            .collect()
    };
    let total = start.elapsed();
    let mut daemons = Vec::new();
    for r in reports {
        daemons.extend(r?.daemons);
    }
    if let Some((start_ns, d)) = batch_alloc {
        for o in &mut daemons {
            o.start_unix_ns = start_ns;
            o.steps.insert(
                0,
                StepTime {
                    step: "alloc".into(),
                    ns: d.as_nanos() as u64,
                },
            );
        }
    }
    let epoch1 = mon.ping()?;
    Ok(InitRun {
        strategy,
        total,
        max_in_flight: max_in_flight(&daemons),
        daemons,
        monitor_proposals: epoch1 - epoch0,
    })
}
