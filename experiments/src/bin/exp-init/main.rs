//! exp-init: how long deploying N daemons takes with each initialisation strategy
//! (sequential, parallel_nodes, parallel_daemons, parallel), against the physical bound
//! of the same configuration measured in the same run.
//!
//! For every (nodes, daemons per node, device size, repetition) the run first measures
//! (a) the aggregate write bandwidth of the configuration's devices, all written at once
//! (`harness::devices::precondition` on every device in parallel), and (b) each device's
//! mkfs time alone, one device at a time (the shorter of two passes). Then, for every propose interval, the four
//! strategies run back to back, each against a fresh monitor (TCP, journal fsynced per
//! proposal) and in-process node agents that talk to it over TCP; their order rotates
//! with the repetition, so no strategy always runs first or last. `bound_ms` is
//! [`Strategy::lower_bound`] of those measurements: `(2W − 1) × propose_interval +
//! Σ over the W waves of the strategy's longest chain of max(slowest mkfs of the wave,
//! propose_interval)`, where for `parallel` (one wave of every device) the wave's mkfs
//! time is also at least every device's mkfs bytes at the aggregate bandwidth. With mkfs
//! shorter than the interval that is `(min_proposals − 1) × propose_interval`.
//!
//! Beside exp-init.csv, exp-init-hist.csv keeps each row's histogram of the daemons'
//! initialisation times (`daemon_us`, from which `daemon_p50_ms`… are taken).

use std::net::TcpListener;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use blocklab::daemon::{self, MkfsRequest};
use blocklab::dev::Device;
use blocklab::init::{self, BoundInput, Node, NodeAgent, Strategy};
use blocklab::monitor::{FileJournal, Monitor, ProposeConfig};
use clap::Parser;
use harness::args::{or_default, parse_size, parse_whole_ms, Repetitions};
use harness::devices::precondition;
use harness::progress::Progress;
use harness::{CommonArgs, CsvOut, DeviceSet, HistOut, LatencyHist, Profile, RunMeta};
use serde::Serialize;

/// Repetitions per configuration: quick, full.
const REPETITIONS: Repetitions = Repetitions { quick: 3, full: 5 };

/// Measures how long deploying N daemons takes and compares the four initialisation
/// strategies (sequential, parallel_nodes, parallel_daemons, parallel) with each other and
/// with the physical lower bound measured in the same run.
///
/// Quick profile: 3 nodes × {1,4,8} daemons per node, 256 MiB devices, 50 ms propose
/// interval, 3 repetitions (24 loop devices). Full profile: {1,2,3,4} nodes × {1,4,8}
/// daemons per node, 256 MiB and 16 GiB (sparse) devices, 50 ms propose interval, 5
/// repetitions (32 loop devices). Each device size is its own device set, run after the
/// other; within a size, repetitions are the outer loop and the strategies the inner one.
/// Writes OUT/exp-init.csv (one row per configuration, strategy and repetition) and
/// OUT/exp-init-phases.csv (one row per daemon and step).
#[derive(Debug, Parser)]
#[command(name = "exp-init", version, mut_arg("repetitions", |a| REPETITIONS.help(a)))]
struct Cli {
    #[command(flatten)]
    common: CommonArgs,
    /// Node counts to sweep (default quick: 3; full: 1,2,3,4).
    #[arg(long, value_delimiter = ',')]
    nodes: Vec<usize>,
    /// Daemons (devices) per node to sweep (default quick and full: 1,4,8).
    #[arg(long, value_delimiter = ',')]
    daemons: Vec<usize>,
    /// Device sizes to sweep, e.g. 256M,16G (default: --size, else quick: 256M; full:
    /// 256M,16G; with --devices only the given devices' size is used).
    #[arg(long, value_delimiter = ',', value_parser = parse_size)]
    device_sizes: Vec<u64>,
    /// Monitor propose intervals to sweep, whole milliseconds, e.g. 50ms,1s (default quick
    /// and full: 50ms; 50ms,1s adds Ceph's default, whose deploys take about 20 times as
    /// long).
    #[arg(long, value_name = "DURATION", value_parser = parse_whole_ms, value_delimiter = ',')]
    propose_intervals: Vec<Duration>,
    /// Strategies to run (default: all four), alternating within each configuration.
    #[arg(long, value_delimiter = ',')]
    strategies: Vec<Strategy>,
    /// How much each device writes in the aggregate-bandwidth measurement, e.g. 16M (at
    /// least 1M).
    #[arg(long, value_parser = parse_size, default_value = "16M")]
    bandwidth_size: u64,
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

/// A row's configuration columns: the key of its histogram in exp-init-hist.csv.
#[derive(Debug, Clone, Serialize)]
struct HistKey {
    strategy: &'static str,
    nodes: usize,
    daemons_per_node: usize,
    device_size_bytes: u64,
    propose_interval_ms: u64,
    repetition: u32,
}

impl Row {
    fn hist_key(&self) -> HistKey {
        HistKey {
            strategy: self.strategy,
            nodes: self.nodes,
            daemons_per_node: self.daemons_per_node,
            device_size_bytes: self.device_size_bytes,
            propose_interval_ms: self.propose_interval_ms,
            repetition: self.repetition,
        }
    }
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

/// Aggregate write bandwidth (bytes/s) of `paths` written all at once: each device gets
/// `per_device` bytes (whole MiB) in 1 MiB sequential writes, then fsync
/// ([`precondition`], one thread per device).
fn aggregate_bandwidth(paths: &[PathBuf], per_device: u64) -> anyhow::Result<f64> {
    const MIB: u64 = 1 << 20;
    let devs: Vec<Device> = paths
        .iter()
        .map(|p| Device::open(p).with_context(|| format!("opening {}", p.display())))
        .collect::<anyhow::Result<_>>()?;
    let lens: Vec<u64> = devs
        .iter()
        .map(|d| per_device.min(d.size()) / MIB * MIB)
        .collect();
    if lens.contains(&0) {
        bail!("--bandwidth-size and the devices must be at least 1 MiB");
    }
    let start = Instant::now();
    let results: Vec<anyhow::Result<()>> = std::thread::scope(|s| {
        let hs: Vec<_> = devs
            .iter()
            .zip(&lens)
            .map(|(d, &len)| s.spawn(move || precondition(d, 0, len)))
            .collect();
        hs.into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("bandwidth thread panicked")))
            })
            .collect()
    });
    let secs = start.elapsed().as_secs_f64();
    for r in results {
        r?;
    }
    Ok(lens.iter().sum::<u64>() as f64 / secs)
}

struct Config {
    nodes: usize,
    dpn: usize,
    size: u64,
    interval: Duration,
}

fn main() -> std::process::ExitCode {
    harness::exit_on_error("exp-init", run(Cli::parse()))
}

/// What the run sweeps, from the flags and the profile.
struct Sweep {
    nodes: Vec<usize>,
    dpns: Vec<usize>,
    /// Device sizes (`[0]` with --devices: the given devices' size).
    sizes: Vec<u64>,
    intervals: Vec<Duration>,
    strategies: Vec<Strategy>,
    reps: u32,
}

impl Sweep {
    fn new(cli: &Cli) -> anyhow::Result<Sweep> {
        let a = &cli.common;
        let nodes = or_default(&cli.nodes, a.pick(vec![3], vec![1, 2, 3, 4]));
        let dpns = or_default(&cli.daemons, vec![1, 4, 8]);
        let sizes = match (cli.device_sizes.is_empty(), a.size) {
            (true, Some(s)) => vec![s],
            (true, None) => a.pick(vec![256 << 20], vec![256 << 20, 16 << 30]),
            (false, _) => cli.device_sizes.clone(),
        };
        let intervals = or_default(&cli.propose_intervals, vec![Duration::from_millis(50)]);
        let strategies = or_default(&cli.strategies, Strategy::ALL.to_vec());
        if nodes.contains(&0) || dpns.contains(&0) {
            bail!("--nodes and --daemons must be at least 1");
        }
        let sizes: Vec<u64> = if a.devices.is_empty() { sizes } else { vec![0] };
        if cli.bandwidth_size < 1 << 20 {
            bail!("--bandwidth-size must be at least 1M");
        }
        Ok(Sweep {
            nodes,
            dpns,
            sizes,
            intervals,
            strategies,
            reps: a.repetitions_or(REPETITIONS),
        })
    }
    fn max_devices(&self) -> usize {
        self.nodes.iter().max().unwrap() * self.dpns.iter().max().unwrap()
    }
    fn steps(&self) -> u64 {
        let configs_per_size = self.nodes.len() * self.dpns.len() * self.intervals.len();
        (self.sizes.len() * configs_per_size * self.reps as usize * self.strategies.len()) as u64
    }
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

/// The run's outputs and progress.
struct Out {
    csv: CsvOut<Row>,
    phases: CsvOut<PhaseRow>,
    hists: HistOut<HistKey>,
    prog: Progress,
    journal_dir: tempfile::TempDir,
    /// The bound measurements, for meta.json.
    measured: Vec<serde_json::Value>,
}

impl Out {
    fn create(a: &CommonArgs, steps: u64) -> anyhow::Result<Out> {
        Ok(Out {
            csv: CsvOut::<Row>::create(&a.out, "exp-init.csv", a.overwrite)?,
            phases: CsvOut::<PhaseRow>::create(&a.out, "exp-init-phases.csv", a.overwrite)?,
            hists: HistOut::create(&a.out, "exp-init", a.overwrite)?,
            prog: Progress::new("exp-init", steps),
            journal_dir: tempfile::Builder::new()
                .prefix("exp-init-mon-")
                .tempdir_in("/var/tmp")
                .context("creating the monitors' journal directory")?,
            measured: Vec::new(),
        })
    }
}

/// One repetition of `n` nodes × `d` daemons on `paths`: the bound's measurements, then
/// every interval and strategy (each repetition starts with the next strategy).
fn run_repetition(
    cli: &Cli,
    sweep: &Sweep,
    (n, d, size, rep): (usize, usize, u64, u32),
    paths: &[PathBuf],
    out: &mut Out,
) -> anyhow::Result<()> {
    let (bound_in, mut record) = measure_bound(paths, d, cli.bandwidth_size)?;
    record["nodes"] = n.into();
    record["daemons_per_node"] = d.into();
    record["device_size_bytes"] = size.into();
    record["repetition"] = rep.into();
    out.measured.push(record);
    let mut order = sweep.strategies.clone();
    order.rotate_left(rep as usize % sweep.strategies.len());
    for &interval in &sweep.intervals {
        let c = Config {
            nodes: n,
            dpn: d,
            size,
            interval,
        };
        for &strategy in &order {
            let bound = strategy.lower_bound(&BoundInput {
                lone_mkfs: &bound_in.lone_by_node,
                all_at_once: bound_in.all_at_once,
                propose_interval: interval,
            });
            let (row, daemons) = run_one(
                &c,
                strategy,
                rep,
                paths,
                out.journal_dir.path(),
                ms(bound),
                &mut out.phases,
            )?;
            out.prog.step(&format!(
                "{strategy} {n}x{d} {size} B {interval:?}: {:.1} ms (bound {:.1} ms)",
                row.total_ms, row.bound_ms
            ));
            out.csv.write(&row)?;
            out.hists
                .write(&row.hist_key(), &[("daemon_us", &daemons)])?;
        }
    }
    Ok(())
}

/// Every configuration on devices of `size` bytes (0: the given devices); the device
/// set's description.
fn run_size(
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
        "{max_devices} devices of {size} bytes: {}",
        set.paths()[0].display()
    ));
    // Repetitions outermost, so drift meets every configuration alike.
    for rep in 0..sweep.reps {
        for &n in &sweep.nodes {
            for &d in &sweep.dpns {
                let paths = &set.paths()[..n * d];
                run_repetition(cli, sweep, (n, d, size, rep), paths, out)?;
            }
        }
    }
    set.teardown()?;
    Ok(described)
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let a = &cli.common;
    let sweep = Sweep::new(&cli)?;
    let mut out = Out::create(a, sweep.steps())?;
    let mut meta = RunMeta::start("exp-init", a.profile);
    let mut described = Vec::new();
    for &size in &sweep.sizes {
        described.push(run_size(&cli, &sweep, size, &mut out)?);
    }
    out.prog.finish();
    meta.devices = serde_json::Value::Array(described);
    meta.extra = serde_json::json!({
        "nodes": sweep.nodes, "daemons_per_node": sweep.dpns,
        "propose_intervals_ms": sweep.intervals.iter().map(|d| d.as_millis() as u64).collect::<Vec<_>>(),
        "strategies": sweep.strategies.iter().map(|s| s.name()).collect::<Vec<_>>(),
        "repetitions": sweep.reps, "quick": a.profile == Profile::Quick, "bandwidth_bytes": cli.bandwidth_size,
        "bound_measurements": out.measured,
    });
    let m = meta.finish(&a.out, a.overwrite)?;
    eprintln!(
        "wrote {} ({} rows), {} ({} rows), {}, {}",
        out.csv.path().display(),
        out.csv.rows(),
        out.phases.path().display(),
        out.phases.rows(),
        out.hists.path().display(),
        m.display()
    );
    Ok(())
}

/// One strategy on one configuration: its row and the histogram (µs) of its daemons'
/// initialisation times.
fn run_one(
    c: &Config,
    strategy: Strategy,
    rep: u32,
    paths: &[PathBuf],
    journal_dir: &std::path::Path,
    bound_ms: f64,
    phases: &mut CsvOut<PhaseRow>,
) -> anyhow::Result<(Row, LatencyHist)> {
    let interval = c.interval;
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
    let proposals = run
        .monitor_proposals
        .context("the monitor did not answer after the run")?;
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
    let row = Row {
        strategy: strategy.name(),
        nodes: c.nodes,
        daemons_per_node: c.dpn,
        device_size_bytes: c.size,
        propose_interval_ms: c.interval.as_millis() as u64,
        repetition: rep,
        total_ms: ms(run.total),
        bound_ms,
        daemon_p50_ms: p.p50 as f64 / 1e3,
        daemon_p99_ms: p.p99 as f64 / 1e3,
        daemon_max_ms: p.max as f64 / 1e3,
        max_in_flight: run.max_in_flight,
        monitor_proposals: proposals,
        bytes_written: bytes,
    };
    Ok((row, h))
}
