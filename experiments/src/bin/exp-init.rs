//! exp-init: how long deploying N daemons takes with each initialisation strategy
//! (sequential, parallel_nodes, parallel_daemons, parallel), against the physical bound
//! of the same configuration measured in the same run.
//!
//! For every (nodes, daemons per node, device size, propose interval, repetition) the four
//! strategies run back to back, alternating, each against a fresh monitor (TCP, journal
//! fsynced per proposal) and in-process node agents that talk to it over TCP. Before them
//! the run measures (a) each device's mkfs time alone, one device at a time, and (b) the
//! aggregate write bandwidth of the devices of the configuration, all written at once;
//! `bound_ms = max(slowest lone mkfs, bytes written / aggregate bandwidth) +
//! min_proposals(strategy) × propose_interval`.

use std::net::TcpListener;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use blocklab::daemon::{self, MkfsRequest};
use blocklab::dev::{AlignedBuf, Device, IoEngine, IoRequest, UringEngine};
use blocklab::init::{self, Node, NodeAgent, Strategy};
use blocklab::monitor::{FileJournal, Monitor, ProposeConfig};
use clap::Parser;
use harness::args::parse_size;
use harness::progress::Progress;
use harness::{CommonArgs, CsvOut, DeviceSet, LatencyHist, Profile, RunMeta};
use serde::Serialize;

/// Deploy time of N daemons with four initialisation strategies, and its physical bound.
///
/// Quick profile: 3 nodes × {1,4,8} daemons per node, 256 MiB devices, 50 ms propose
/// interval, 3 repetitions (24 loop devices). Full profile: {1,2,3,4} nodes × {1,4,8,12}
/// daemons per node, 1 GiB and 16 GiB (sparse) devices, 50 ms and 1 s propose intervals,
/// 3 repetitions (48 loop devices). Writes OUT/exp-init.csv (one row per configuration,
/// strategy and repetition) and OUT/exp-init-phases.csv (one row per daemon and step).
#[derive(Debug, Parser)]
#[command(name = "exp-init", version)]
struct Cli {
    #[command(flatten)]
    common: CommonArgs,
    /// Node counts to sweep (default: the profile's).
    #[arg(long, value_delimiter = ',')]
    nodes: Vec<usize>,
    /// Daemons (devices) per node to sweep (default: the profile's).
    #[arg(long, value_delimiter = ',')]
    daemons: Vec<usize>,
    /// Device sizes to sweep, e.g. 256M,16G (default: --size, else the profile's; with
    /// --devices only the given devices' size is used).
    #[arg(long, value_delimiter = ',', value_parser = parse_size)]
    device_sizes: Vec<u64>,
    /// Monitor propose intervals to sweep, in ms (default: the profile's).
    #[arg(long, value_delimiter = ',')]
    propose_intervals_ms: Vec<u64>,
    /// Strategies to run (default: all four), alternating within each configuration.
    #[arg(long, value_delimiter = ',')]
    strategies: Vec<Strategy>,
    /// Bytes each device writes in the aggregate-bandwidth measurement.
    #[arg(long, value_parser = parse_size, default_value = "16M")]
    bandwidth_bytes: u64,
}

#[derive(Debug, Serialize)]
struct Row {
    strategy: &'static str,
    nodes: usize,
    daemons_per_node: usize,
    device_size_bytes: u64,
    propose_interval_ms: u64,
    repetition: u32,
    total_ms: f64,
    bound_ms: f64,
    daemon_p50_ms: f64,
    daemon_p99_ms: f64,
    daemon_max_ms: f64,
    max_in_flight: usize,
    monitor_proposals: u64,
    bytes_written: u64,
}

#[derive(Debug, Serialize)]
struct PhaseRow {
    strategy: &'static str,
    nodes: usize,
    daemons_per_node: usize,
    repetition: u32,
    daemon_id: u32,
    phase: String,
    ms: f64,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Each device's mkfs alone, one at a time: the slowest, and the bytes one mkfs writes.
fn lone_mkfs(paths: &[PathBuf]) -> anyhow::Result<(Duration, u64)> {
    let mut eng = UringEngine::with_queue_depth(16)?;
    let fsid = uuid::Uuid::new_v4();
    let mut worst = Duration::ZERO;
    let mut bytes = 0;
    for (i, p) in paths.iter().enumerate() {
        let dev = Device::open(p)?;
        let mut req = MkfsRequest::new(fsid, i as u32);
        req.force = true;
        let t = Instant::now();
        let rep = daemon::mkfs(&mut eng, &dev, &req)
            .with_context(|| format!("lone mkfs of {}", p.display()))?;
        worst = worst.max(t.elapsed());
        bytes = rep.bytes_written;
    }
    Ok((worst, bytes))
}

/// Aggregate write bandwidth (bytes/s) of `paths` written all at once: each device gets
/// `per_device` bytes in 1 MiB writes at queue depth 8, then fsync.
fn aggregate_bandwidth(paths: &[PathBuf], per_device: u64) -> anyhow::Result<f64> {
    const BS: usize = 1 << 20;
    let start = Instant::now();
    let results: Vec<anyhow::Result<u64>> = std::thread::scope(|s| {
        let hs: Vec<_> = paths
            .iter()
            .map(|p| {
                s.spawn(move || -> anyhow::Result<u64> {
                    let dev = Device::open(p)?;
                    let n = (per_device.min(dev.size()) / BS as u64).max(1);
                    let mut buf = AlignedBuf::new(BS);
                    buf.iter_mut()
                        .enumerate()
                        .for_each(|(i, b)| *b = i as u8 | 1);
                    let mut eng = UringEngine::with_queue_depth(8)?;
                    let mut reqs: Vec<IoRequest<'_>> = (0..n)
                        .map(|i| IoRequest::write(&dev, i * BS as u64, &buf))
                        .collect();
                    reqs.push(IoRequest::fsync(&dev));
                    eng.execute(&mut reqs)?;
                    Ok(n * BS as u64)
                })
            })
            .collect();
        hs.into_iter()
            .map(|h| h.join().expect("bandwidth thread panicked"))
            .collect()
    });
    let secs = start.elapsed().as_secs_f64();
    let mut total = 0;
    for r in results {
        total += r?;
    }
    Ok(total as f64 / secs)
}

struct Config {
    nodes: usize,
    dpn: usize,
    size: u64,
    interval_ms: u64,
}

fn main() -> std::process::ExitCode {
    harness::exit_on_error("exp-init", run(Cli::parse()))
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let a = &cli.common;
    let quick = a.profile == Profile::Quick;
    let nodes = if cli.nodes.is_empty() {
        a.pick(vec![3], vec![1, 2, 3, 4])
    } else {
        cli.nodes.clone()
    };
    let dpns = if cli.daemons.is_empty() {
        a.pick(vec![1, 4, 8], vec![1, 4, 8, 12])
    } else {
        cli.daemons.clone()
    };
    let sizes = if let (true, Some(s)) = (cli.device_sizes.is_empty(), a.size) {
        vec![s]
    } else if cli.device_sizes.is_empty() {
        a.pick(vec![256 << 20], vec![1 << 30, 16 << 30])
    } else {
        cli.device_sizes.clone()
    };
    let intervals = if cli.propose_intervals_ms.is_empty() {
        a.pick(vec![50], vec![50, 1000])
    } else {
        cli.propose_intervals_ms.clone()
    };
    let strategies = if cli.strategies.is_empty() {
        Strategy::ALL.to_vec()
    } else {
        cli.strategies.clone()
    };
    if nodes.contains(&0) || dpns.contains(&0) {
        bail!("--nodes and --daemons must be at least 1");
    }
    let reps = a.repetitions_or(3, 3);
    let max_devices = nodes.iter().max().unwrap() * dpns.iter().max().unwrap();
    let sizes: Vec<u64> = if a.devices.is_empty() { sizes } else { vec![0] };
    let configs_per_size = nodes.len() * dpns.len() * intervals.len();
    let total_steps = (sizes.len() * configs_per_size * reps as usize * strategies.len()) as u64;

    let mut csv = CsvOut::<Row>::create(&a.out, "exp-init.csv", a.overwrite)?;
    let mut phases = CsvOut::<PhaseRow>::create(&a.out, "exp-init-phases.csv", a.overwrite)?;
    let mut meta = RunMeta::start("exp-init", a.profile);
    let mut prog = Progress::new("exp-init", total_steps);
    let journal_dir = tempfile::Builder::new()
        .prefix("exp-init-mon-")
        .tempdir_in("/var/tmp")
        .context("creating the monitors' journal directory")?;
    let mut described = Vec::new();
    let mut measured = Vec::new();

    for &size in &sizes {
        let mut args = a.clone();
        if size != 0 {
            args.size = Some(size);
        }
        let set = DeviceSet::setup(&args, max_devices, 64 << 20, size.max(64 << 20))?;
        described.push(set.describe());
        let size = set.size();
        prog.note(&format!(
            "{max_devices} devices of {size} bytes: {}",
            set.paths()[0].display()
        ));
        let mut configs = Vec::new();
        for &n in &nodes {
            for &d in &dpns {
                for &i in &intervals {
                    configs.push(Config {
                        nodes: n,
                        dpn: d,
                        size,
                        interval_ms: i,
                    });
                }
            }
        }
        for c in &configs {
            let paths = &set.paths()[..c.nodes * c.dpn];
            for rep in 0..reps {
                let bw = aggregate_bandwidth(paths, cli.bandwidth_bytes)?;
                let (lone, per_mkfs) = lone_mkfs(paths)?;
                let io_bound = ms(lone).max(per_mkfs as f64 * paths.len() as f64 / bw * 1e3);
                measured.push(serde_json::json!({
                    "nodes": c.nodes, "daemons_per_node": c.dpn, "device_size_bytes": c.size,
                    "repetition": rep, "aggregate_write_mib_s": bw / (1 << 20) as f64,
                    "slowest_lone_mkfs_ms": ms(lone), "mkfs_bytes": per_mkfs,
                }));
                for &strategy in &strategies {
                    let row = run_one(
                        c,
                        strategy,
                        rep,
                        paths,
                        journal_dir.path(),
                        io_bound,
                        &mut phases,
                    )?;
                    prog.step(&format!(
                        "{strategy} {}x{} {} B {} ms: {:.1} ms (bound {:.1} ms)",
                        c.nodes, c.dpn, c.size, c.interval_ms, row.total_ms, row.bound_ms
                    ));
                    csv.write(&row)?;
                }
            }
        }
        set.teardown()?;
    }
    prog.finish();
    meta.devices = serde_json::Value::Array(described);
    meta.extra = serde_json::json!({
        "nodes": nodes, "daemons_per_node": dpns, "propose_intervals_ms": intervals,
        "strategies": strategies.iter().map(|s| s.name()).collect::<Vec<_>>(),
        "repetitions": reps, "quick": quick, "bandwidth_bytes": cli.bandwidth_bytes,
        "bound_measurements": measured,
    });
    let m = meta.finish(&a.out, a.overwrite)?;
    eprintln!(
        "wrote {} ({} rows), {} ({} rows), {}",
        csv.path().display(),
        csv.rows(),
        phases.path().display(),
        phases.rows(),
        m.display()
    );
    Ok(())
}

fn run_one(
    c: &Config,
    strategy: Strategy,
    rep: u32,
    paths: &[PathBuf],
    journal_dir: &std::path::Path,
    io_bound_ms: f64,
    phases: &mut CsvOut<PhaseRow>,
) -> anyhow::Result<Row> {
    let interval = Duration::from_millis(c.interval_ms);
    let journal = journal_dir.join(format!("{}-{}.journal", strategy, uuid::Uuid::new_v4()));
    let mon = Monitor::start(
        TcpListener::bind("127.0.0.1:0")?,
        Box::new(FileJournal::new(&journal)),
        ProposeConfig::with_interval(interval),
        None,
    )?;
    let addr = mon.addr().to_string();
    let agents: Vec<NodeAgent> = (0..c.nodes)
        .map(|k| {
            NodeAgent::new(
                &format!("node{k}"),
                &paths[k * c.dpn..(k + 1) * c.dpn],
                &addr,
            )
        })
        .collect::<Result<_, _>>()?;
    let nodes: Vec<&dyn Node> = agents.iter().map(|a| a as &dyn Node).collect();
    // force: the devices hold the previous run's cluster (the harness checked them).
    let run = init::run(strategy, &addr, &nodes, true, Duration::from_secs(30))
        .with_context(|| format!("{strategy} on {}x{}", c.nodes, c.dpn))?;
    if let Some(f) = run.failed().next() {
        bail!("{strategy}: daemon on {} failed: {:?}", f.device, f.error);
    }
    mon.stop();
    let _ = std::fs::remove_file(&journal);
    let mut h = LatencyHist::new();
    let mut bytes = 0;
    for d in &run.daemons {
        h.record_us(d.duration());
        bytes += d.bytes_written;
        for s in &d.steps {
            phases.write(&PhaseRow {
                strategy: strategy.name(),
                nodes: c.nodes,
                daemons_per_node: c.dpn,
                repetition: rep,
                daemon_id: d.id.unwrap_or(u32::MAX),
                phase: s.step.clone(),
                ms: s.ns as f64 / 1e6,
            })?;
        }
    }
    let p = h.percentiles();
    let min_props = strategy.min_proposals(c.nodes as u64, c.dpn as u64);
    Ok(Row {
        strategy: strategy.name(),
        nodes: c.nodes,
        daemons_per_node: c.dpn,
        device_size_bytes: c.size,
        propose_interval_ms: c.interval_ms,
        repetition: rep,
        total_ms: ms(run.total),
        bound_ms: io_bound_ms + (min_props * c.interval_ms) as f64,
        daemon_p50_ms: p.p50 as f64 / 1e3,
        daemon_p99_ms: p.p99 as f64 / 1e3,
        daemon_max_ms: p.max as f64 / 1e3,
        max_in_flight: run.max_in_flight,
        monitor_proposals: run.monitor_proposals,
        bytes_written: bytes,
    })
}
