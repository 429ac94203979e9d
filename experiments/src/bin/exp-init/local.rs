//! exp-init's blocklab backend: blocklab's monitor (TCP, journal fsynced per proposal) and
//! in-process node agents that talk to it over TCP, a fresh monitor per run.
//!
//! For every (nodes, daemons per node, device size, repetition) the run first measures
//! (a) the aggregate write bandwidth of the configuration's devices, all written at once,
//! and (b) each device's mkfs time alone, one device at a time (the shorter of two
//! passes). Then, for every propose interval, the strategies run back to back. `bound_ms`
//! is [`Strategy::lower_bound`] of those measurements: `(2W − 1) × propose_interval +
//! Σ over the W waves of the strategy's longest chain of max(slowest mkfs of the wave,
//! propose_interval)`, where for `parallel` (one wave of every device) the wave's mkfs
//! time is also at least every device's mkfs bytes at the aggregate bandwidth. With mkfs
//! shorter than the interval that is `(min_proposals − 1) × propose_interval`.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use blocklab::daemon::{self, MkfsRequest};
use blocklab::init::{self, BoundInput, InitRun, Node, NodeAgent, Strategy};
use blocklab::monitor::{FileJournal, Monitor, ProposeConfig};
use harness::args::or_default;
use harness::DeviceSet;

use crate::{aggregate_bandwidth, ms, rotated, Backend, Cli, Out, RunKey};

/// What the blocklab backend sweeps, from the flags and the profile.
pub struct Sweep {
    nodes: Vec<usize>,
    dpns: Vec<usize>,
    /// Device sizes (`[0]` with --devices: the given devices' size).
    pub sizes: Vec<u64>,
    intervals: Vec<Duration>,
    strategies: Vec<Strategy>,
    reps: u32,
}

impl Sweep {
    pub fn new(cli: &Cli, strategies: &[Strategy], reps: u32) -> anyhow::Result<Sweep> {
        let a = &cli.common;
        let nodes = or_default(&cli.nodes, a.pick(vec![3], vec![1, 2, 3, 4]));
        let dpns = or_default(&cli.daemons, vec![1, 4, 8]);
        let sizes = match (cli.device_sizes.is_empty(), a.size) {
            (true, Some(s)) => vec![s],
            (true, None) => a.pick(vec![256 << 20], vec![256 << 20, 16 << 30]),
            (false, _) => cli.device_sizes.clone(),
        };
        let intervals = or_default(&cli.propose_intervals, vec![Duration::from_millis(50)]);
        if nodes.contains(&0) || dpns.contains(&0) {
            bail!("--nodes and --daemons must be at least 1");
        }
        let sizes: Vec<u64> = if a.devices.is_empty() { sizes } else { vec![0] };
        Ok(Sweep {
            nodes,
            dpns,
            sizes,
            intervals,
            strategies: strategies.to_vec(),
            reps,
        })
    }
    fn max_devices(&self) -> usize {
        self.nodes.iter().max().unwrap() * self.dpns.iter().max().unwrap()
    }
    pub fn steps(&self) -> u64 {
        let configs_per_size = self.nodes.len() * self.dpns.len() * self.intervals.len();
        (self.sizes.len() * configs_per_size * self.reps as usize * self.strategies.len()) as u64
    }
    /// The sweep, for meta.json.
    pub fn describe(&self) -> serde_json::Value {
        serde_json::json!({
            "nodes": self.nodes, "daemons_per_node": self.dpns, "device_sizes": self.sizes,
            "propose_intervals_ms": self.intervals.iter().map(|d| d.as_millis() as u64).collect::<Vec<_>>(),
        })
    }
}

/// Each device's mkfs alone, one device at a time: its shortest time over two passes
/// (the first mkfs on a fresh sparse backing file also pays for allocating its blocks,
/// which the strategies' mkfs then do not), and the bytes one mkfs writes.
fn lone_mkfs(paths: &[PathBuf]) -> anyhow::Result<(Vec<Duration>, u64)> {
    let mut times = vec![Duration::MAX; paths.len()];
    let mut bytes = 0;
    for _pass in 0..2 {
        // A new cluster each pass, so that mkfs formats again instead of finding the
        // device formatted already.
        let fsid = uuid::Uuid::new_v4();
        for (i, p) in paths.iter().enumerate() {
            let mut req = MkfsRequest::new(fsid, i as u32);
            req.force = true;
            let t = Instant::now();
            let rep = daemon::mkfs_path(p, &req)
                .with_context(|| format!("lone mkfs of {}", p.display()))?;
            times[i] = times[i].min(t.elapsed());
            anyhow::ensure!(
                !rep.already_formatted,
                "lone mkfs of {}: nothing written",
                p.display()
            );
            bytes = rep.bytes_written;
        }
    }
    Ok((times, bytes))
}

/// What the strategies' lower bounds are computed from, measured once per (nodes,
/// daemons, size, repetition).
struct BoundInputs {
    /// Each device's lone mkfs, by node.
    lone_by_node: Vec<Vec<Duration>>,
    /// Every device's mkfs bytes written at the aggregate bandwidth.
    all_at_once: Duration,
}

/// Measures the bound's inputs on `paths` (`d` daemons per node); the measurement's
/// record for meta.json.
fn measure_bound(
    paths: &[PathBuf],
    d: usize,
    bandwidth_size: u64,
) -> anyhow::Result<(BoundInputs, serde_json::Value)> {
    let bw = aggregate_bandwidth(paths, bandwidth_size)?;
    let (lone, per_mkfs) = lone_mkfs(paths)?;
    let all_at_once = Duration::from_secs_f64(per_mkfs as f64 * paths.len() as f64 / bw);
    let record = serde_json::json!({
        "aggregate_write_mib_s": bw / (1 << 20) as f64,
        "lone_mkfs_ms": lone.iter().map(|t| ms(*t)).collect::<Vec<_>>(),
        "mkfs_bytes": per_mkfs, "all_at_once_ms": ms(all_at_once),
    });
    let inputs = BoundInputs {
        lone_by_node: lone.chunks(d).map(|c| c.to_vec()).collect(),
        all_at_once,
    };
    Ok((inputs, record))
}

/// One repetition of `n` nodes × `d` daemons on `paths`: the bound's measurements, then
/// every interval and strategy (each repetition starts with the next strategy).
fn run_repetition(
    cli: &Cli,
    sweep: &Sweep,
    (n, d, size, rep): (usize, usize, u64, u32),
    paths: &[PathBuf],
    journal_dir: &Path,
    out: &mut Out,
) -> anyhow::Result<()> {
    let (bound_in, mut record) = measure_bound(paths, d, cli.bandwidth_size)?;
    record["backend"] = "blocklab".into();
    record["nodes"] = n.into();
    record["daemons_per_node"] = d.into();
    record["device_size_bytes"] = size.into();
    record["repetition"] = rep.into();
    out.measured.push(record);
    for &interval in &sweep.intervals {
        for strategy in rotated(&sweep.strategies, rep) {
            let bound = strategy.lower_bound(&BoundInput {
                lone_mkfs: &bound_in.lone_by_node,
                all_at_once: bound_in.all_at_once,
                propose_interval: interval,
            });
            let k = RunKey {
                backend: Backend::Blocklab,
                strategy,
                nodes: n,
                dpn: d,
                size,
                interval,
                rep,
            };
            let run = run_one(&k, paths, journal_dir)?;
            out.record(&k, &run, Some(bound), None)?;
        }
    }
    Ok(())
}

/// Every configuration on devices of `size` bytes (0: the given devices); the device
/// set's description.
pub fn run_size(
    cli: &Cli,
    sweep: &Sweep,
    size: u64,
    out: &mut Out,
) -> anyhow::Result<serde_json::Value> {
    let mut args = cli.common.clone();
    if size != 0 {
        args.size = Some(size);
    }
    let max_devices = sweep.max_devices();
    let set = DeviceSet::setup(&args, max_devices, 64 << 20, size.max(64 << 20))?;
    let described = set.describe();
    let size = set.size();
    out.prog.note(&format!(
        "blocklab: {max_devices} devices of {size} bytes: {}",
        set.paths()[0].display()
    ));
    let journal_dir = tempfile::Builder::new()
        .prefix("exp-init-mon-")
        .tempdir_in("/var/tmp")
        .context("creating the monitors' journal directory")?;
    // Repetitions outermost, so drift meets every configuration alike.
    for rep in 0..sweep.reps {
        for &n in &sweep.nodes {
            for &d in &sweep.dpns {
                let paths = &set.paths()[..n * d];
                run_repetition(
                    cli,
                    sweep,
                    (n, d, size, rep),
                    paths,
                    journal_dir.path(),
                    out,
                )?;
            }
        }
    }
    set.teardown()?;
    Ok(described)
}

/// One strategy on one configuration, against a fresh monitor.
fn run_one(k: &RunKey, paths: &[PathBuf], journal_dir: &Path) -> anyhow::Result<InitRun> {
    let journal = journal_dir.join(format!("{}-{}.journal", k.strategy, uuid::Uuid::new_v4()));
    let mon = Monitor::start(
        TcpListener::bind("127.0.0.1:0")?,
        Box::new(FileJournal::new(&journal)),
        ProposeConfig::with_interval(k.interval),
        None,
    )?;
    let addr = mon.addr().to_string();
    let agents: Vec<NodeAgent> = (0..k.nodes)
        .map(|i| {
            NodeAgent::new(
                &format!("node{i}"),
                &paths[i * k.dpn..(i + 1) * k.dpn],
                &addr,
            )
        })
        .collect::<Result<_, _>>()?;
    let nodes: Vec<&dyn Node> = agents.iter().map(|a| a as &dyn Node).collect();
    // force: the devices hold the previous run's cluster (the harness checked them).
    let run = init::run(k.strategy, &addr, &nodes, true, Duration::from_secs(30))
        .with_context(|| format!("{} on {}x{}", k.strategy, k.nodes, k.dpn))?;
    mon.stop();
    let _ = std::fs::remove_file(&journal);
    Ok(run)
}
