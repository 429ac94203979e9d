//! exp-init: how long deploying N daemons takes with each initialisation strategy
//! (sequential, parallel_nodes, parallel_daemons, parallel, parallel_nobatch), against a
//! bound measured in the same run, on two backends: blocklab's own monitor and daemons
//! (`local`), and a real Ceph cluster deploying BlueStore OSDs (`ceph`).
//!
//! Beside exp-init.csv, exp-init-phases.csv has every daemon's steps and exp-init-hist.csv
//! each row's histogram of the daemons' deployment times (`daemon_us`, from which
//! `daemon_p50_ms`… are taken).

mod ceph;
mod local;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use blocklab::init::{InitRun, Strategy};
use clap::Parser;
use harness::args::{or_default, parse_size, parse_whole_ms, Repetitions};
use harness::devices::precondition;
use harness::progress::Progress;
use harness::{CommonArgs, CsvOut, HistOut, LatencyHist, Profile, RunMeta};
use serde::Serialize;

/// Repetitions per configuration: quick, full.
const REPETITIONS: Repetitions = Repetitions { quick: 3, full: 5 };

/// Where daemons are deployed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
#[value(rename_all = "snake_case")]
enum Backend {
    /// blocklab's monitor and daemons.
    Blocklab,
    /// A private Ceph 16 cluster: ceph-mon and BlueStore ceph-osd daemons.
    Ceph,
}

impl Backend {
    fn name(self) -> &'static str {
        match self {
            Backend::Blocklab => "blocklab",
            Backend::Ceph => "ceph",
        }
    }
}

impl std::fmt::Display for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Measures how long deploying N daemons takes and compares the initialisation strategies
/// (sequential, parallel_nodes, parallel_daemons, parallel, parallel_nobatch) with each
/// other and with bounds measured in the same run, on blocklab's own cluster and on a real
/// Ceph cluster.
///
/// blocklab backend — quick: 3 nodes × {1,4,8} daemons per node, 256 MiB devices, 50 ms
/// propose interval; full: {1,2,3,4} nodes × {1,4,8}, 256 MiB and 16 GiB (sparse) devices.
/// Ceph backend — quick: 2 nodes × 2 OSDs; full: 3 nodes × 8 OSDs; 2 GiB devices, node
/// agents as `blocklab node serve --ceph` processes, a fresh cluster per run. Repetitions:
/// quick 3, full 5; the strategies' order rotates with the repetition. Writes
/// OUT/exp-init.csv (one row per backend, configuration, strategy and repetition),
/// OUT/exp-init-phases.csv (one row per daemon and step) and OUT/exp-init-hist.csv.
#[derive(Debug, Parser)]
#[command(name = "exp-init", version, mut_arg("repetitions", |a| REPETITIONS.help(a)))]
struct Cli {
    #[command(flatten)]
    common: CommonArgs,
    /// Backends to run (default: blocklab,ceph; blocklab alone, with a note, where the Ceph
    /// backend cannot run: without root, with --files, or without Ceph installed).
    #[arg(long, value_delimiter = ',')]
    backends: Vec<Backend>,
    /// blocklab backend: node counts to sweep (default quick: 3; full: 1,2,3,4).
    #[arg(long, value_delimiter = ',')]
    nodes: Vec<usize>,
    /// blocklab backend: daemons (devices) per node to sweep (default quick and full:
    /// 1,4,8).
    #[arg(long, value_delimiter = ',')]
    daemons: Vec<usize>,
    /// blocklab backend: device sizes to sweep, e.g. 256M,16G (default: --size, else
    /// quick: 256M; full: 256M,16G; with --devices only the given devices' size is used).
    #[arg(long, value_delimiter = ',', value_parser = parse_size)]
    device_sizes: Vec<u64>,
    /// blocklab backend: monitor propose intervals to sweep, whole milliseconds, e.g.
    /// 50ms,1s (default quick and full: 50ms; 1s is Ceph's default, whose deploys take
    /// about 20 times as long).
    #[arg(long, value_name = "DURATION", value_parser = parse_whole_ms, value_delimiter = ',')]
    propose_intervals: Vec<Duration>,
    /// Ceph backend: shapes to deploy, NODESxOSDS, e.g. 2x2,3x8 (default quick: 2x2;
    /// full: 3x8).
    #[arg(long, value_delimiter = ',', value_parser = parse_shape)]
    ceph_shapes: Vec<(usize, usize)>,
    /// Ceph backend: size of each OSD's device (at least 1G; default 2G).
    #[arg(long, value_parser = parse_size, default_value = "2G")]
    ceph_device_size: u64,
    /// Strategies to run (default: all five), alternating within each configuration.
    #[arg(long, value_delimiter = ',')]
    strategies: Vec<Strategy>,
    /// How much each device writes in the aggregate-bandwidth measurement, e.g. 16M (at
    /// least 1M).
    #[arg(long, value_parser = parse_size, default_value = "16M")]
    bandwidth_size: u64,
}

/// `NODESxOSDS`, both at least 1.
fn parse_shape(s: &str) -> Result<(usize, usize), String> {
    let (n, d) = s
        .split_once(['x', 'X'])
        .ok_or_else(|| format!("{s:?}: expected NODESxOSDS, e.g. 3x8"))?;
    let num = |v: &str| {
        v.trim()
            .parse::<usize>()
            .ok()
            .filter(|&v| v > 0)
            .ok_or_else(|| format!("{s:?}: {v:?} is not a count of at least 1"))
    };
    Ok((num(n)?, num(d)?))
}

#[derive(Debug, Serialize)]
struct Row {
    backend: &'static str,
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
    flushes: u64,
    /// CPU time of the daemons' steps (Ceph: the programs each step ran and the OSDs until
    /// up); empty where not measured.
    cpu_ms: Option<f64>,
    /// Sum of the cluster's processes' peak resident sets at the end of the run (Ceph);
    /// empty where not measured.
    peak_rss_kib: Option<u64>,
}

/// A row's configuration columns: the key of its histogram in exp-init-hist.csv.
#[derive(Debug, Clone, Serialize)]
struct HistKey {
    backend: &'static str,
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
            backend: self.backend,
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
    backend: &'static str,
    strategy: &'static str,
    nodes: usize,
    daemons_per_node: usize,
    repetition: u32,
    daemon_id: u32,
    phase: String,
    ms: f64,
    cpu_ms: Option<f64>,
}

/// What one run of one strategy is: its configuration.
#[derive(Debug, Clone, Copy)]
struct RunKey {
    backend: Backend,
    strategy: Strategy,
    nodes: usize,
    dpn: usize,
    size: u64,
    interval: Duration,
    rep: u32,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn main() -> std::process::ExitCode {
    harness::exit_on_error("exp-init", run(Cli::parse()))
}

/// The run's outputs and progress.
struct Out {
    csv: CsvOut<Row>,
    phases: CsvOut<PhaseRow>,
    hists: HistOut<HistKey>,
    prog: Progress,
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
            measured: Vec::new(),
        })
    }

    /// Writes one strategy's run: its row (with `bound`; none: NaN), its daemons' steps
    /// and their histogram. A failed daemon fails the run.
    fn record(
        &mut self,
        k: &RunKey,
        run: &InitRun,
        bound: Option<Duration>,
        peak_rss_kib: Option<u64>,
    ) -> anyhow::Result<()> {
        if let Some(f) = run.failed().next() {
            bail!(
                "{} {}: daemon on {} failed: {}",
                k.backend,
                k.strategy,
                f.device,
                f.error.as_deref().unwrap_or("?")
            );
        }
        let proposals = run
            .monitor_proposals
            .context("the monitor did not answer after the run")?;
        let mut h = LatencyHist::new();
        let (mut bytes, mut flushes, mut cpu) = (0, 0, None::<u64>);
        for d in &run.daemons {
            h.record_us(d.duration());
            bytes += d.bytes_written;
            flushes += d.flushes;
            for s in &d.steps {
                if let Some(c) = s.cpu_ns {
                    cpu = Some(cpu.unwrap_or(0) + c);
                }
                self.phases.write(&PhaseRow {
                    backend: k.backend.name(),
                    strategy: k.strategy.name(),
                    nodes: k.nodes,
                    daemons_per_node: k.dpn,
                    repetition: k.rep,
                    daemon_id: d.id.unwrap_or(u32::MAX),
                    phase: s.step.clone(),
                    ms: s.ns as f64 / 1e6,
                    cpu_ms: s.cpu_ns.map(|c| c as f64 / 1e6),
                })?;
            }
        }
        let p = h.percentiles();
        let row = Row {
            backend: k.backend.name(),
            strategy: k.strategy.name(),
            nodes: k.nodes,
            daemons_per_node: k.dpn,
            device_size_bytes: k.size,
            propose_interval_ms: k.interval.as_millis() as u64,
            repetition: k.rep,
            total_ms: ms(run.total),
            bound_ms: bound.map_or(f64::NAN, ms),
            daemon_p50_ms: p.p50 as f64 / 1e3,
            daemon_p99_ms: p.p99 as f64 / 1e3,
            daemon_max_ms: p.max as f64 / 1e3,
            max_in_flight: run.max_in_flight,
            monitor_proposals: proposals,
            bytes_written: bytes,
            flushes,
            cpu_ms: cpu.map(|c| c as f64 / 1e6),
            peak_rss_kib,
        };
        self.prog.step(&format!(
            "{} {} {}x{}: {:.1} ms (bound {:.1} ms)",
            k.backend, k.strategy, k.nodes, k.dpn, row.total_ms, row.bound_ms
        ));
        self.csv.write(&row)?;
        self.hists.write(&row.hist_key(), &[("daemon_us", &h)])?;
        Ok(())
    }
}

/// Aggregate write bandwidth (bytes/s) of `paths` written all at once: each device gets
/// `per_device` bytes (whole MiB) in 1 MiB sequential writes, then fsync
/// ([`precondition`], one thread per device).
fn aggregate_bandwidth(paths: &[PathBuf], per_device: u64) -> anyhow::Result<f64> {
    const MIB: u64 = 1 << 20;
    let devs: Vec<blocklab::dev::Device> = paths
        .iter()
        .map(|p| blocklab::dev::Device::open(p).with_context(|| format!("opening {}", p.display())))
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

/// The order strategies run in for repetition `rep`: rotated, so that none always runs
/// first or last.
fn rotated(strategies: &[Strategy], rep: u32) -> Vec<Strategy> {
    let mut order = strategies.to_vec();
    order.rotate_left(rep as usize % strategies.len());
    order
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let a = &cli.common;
    let backends = if cli.backends.is_empty() {
        match ceph::unavailable(a) {
            None => vec![Backend::Blocklab, Backend::Ceph],
            Some(why) => {
                eprintln!(
                    "exp-init: the Ceph backend does not run ({why}); its claims will have no data"
                );
                vec![Backend::Blocklab]
            }
        }
    } else {
        cli.backends.clone()
    };
    let strategies = or_default(&cli.strategies, Strategy::ALL.to_vec());
    if cli.bandwidth_size < 1 << 20 {
        bail!("--bandwidth-size must be at least 1M");
    }
    let reps = a.repetitions_or(REPETITIONS);
    let local = backends
        .contains(&Backend::Blocklab)
        .then(|| local::Sweep::new(&cli, &strategies, reps))
        .transpose()?;
    let ceph = backends
        .contains(&Backend::Ceph)
        .then(|| ceph::Sweep::new(&cli, &strategies, reps))
        .transpose()?;
    let steps =
        local.as_ref().map_or(0, local::Sweep::steps) + ceph.as_ref().map_or(0, ceph::Sweep::steps);
    let mut out = Out::create(a, steps)?;
    let mut meta = RunMeta::start("exp-init", a.profile);
    let mut described = Vec::new();
    if let Some(s) = &local {
        for &size in &s.sizes {
            described.push(local::run_size(&cli, s, size, &mut out)?);
        }
    }
    if let Some(s) = &ceph {
        described.push(ceph::run(&cli, s, &mut out)?);
    }
    out.prog.finish();
    meta.devices = serde_json::Value::Array(described);
    meta.extra = serde_json::json!({
        "backends": backends.iter().map(|b| b.name()).collect::<Vec<_>>(),
        "strategies": strategies.iter().map(|s| s.name()).collect::<Vec<_>>(),
        "repetitions": reps, "quick": a.profile == Profile::Quick,
        "bandwidth_bytes": cli.bandwidth_size,
        "blocklab": local.as_ref().map(local::Sweep::describe),
        "ceph": ceph.as_ref().map(ceph::Sweep::describe),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_parse() {
        assert_eq!(parse_shape("3x8"), Ok((3, 8)));
        assert_eq!(parse_shape("2X1"), Ok((2, 1)));
        assert!(parse_shape("3").is_err());
        assert!(parse_shape("0x8").unwrap_err().contains("at least 1"));
    }
}
