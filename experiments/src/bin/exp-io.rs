//! exp-io: blocklab's io_uring engine against fio's io_uring engine on the same device,
//! with the same block size and queue depth, alternating tool by tool per repetition.
//!
//! Raw data beside exp-io.csv: exp-io-hist.csv (blocklab's completion latency histogram
//! per row, `lat_ns`) and exp-io-fio/ (fio's JSON output per row,
//! `<pattern>-bs<bytes>-qd<depth>-rep<k>.json`).

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context};
use blocklab::dev::{Device, IoEngine, Pattern, StreamLimit, StreamOp, StreamSpec, UringEngine};
use clap::Parser;
use harness::args::Repetitions;
use harness::progress::Progress;
use harness::{CommonArgs, CsvOut, DeviceSet, HistOut, LatencyHist, RunMeta};

/// Repetitions per configuration: quick, full.
const REPETITIONS: Repetitions = Repetitions { quick: 2, full: 5 };

/// Measures IOPS, bandwidth and latency of blocklab's io_uring engine and compares them
/// with fio's io_uring engine on the same device: 4 KiB random write/read at QD 1 and 32,
/// 1 MiB sequential write/read at QD 8. Each repetition runs every workload, the two tools
/// back to back. Writes OUT/exp-io.csv.
#[derive(Debug, Parser)]
#[command(name = "exp-io", version, mut_arg("repetitions", |a| REPETITIONS.help(a)))]
struct Args {
    #[command(flatten)]
    common: CommonArgs,
    /// How long each tool runs each pattern, e.g. 2s or 500ms (default: quick 2s, full 6s).
    #[arg(long, value_name = "DURATION", value_parser = harness::args::parse_positive_duration)]
    duration: Option<Duration>,
    /// Bytes at the start of the device the patterns cover, at least 8M (default: 256M
    /// quick, 1G full). A given device must be at least this large; provisioned devices
    /// and files are made this large (or --size, if larger).
    #[arg(long, value_parser = harness::args::parse_size)]
    region: Option<u64>,
    /// Register buffers and the file with the ring, in both tools (fio --fixedbufs --registerfiles).
    #[arg(long)]
    fixed: bool,
    /// Path of the fio binary.
    #[arg(long, default_value = "fio")]
    fio: String,
    /// Seed of the random offsets, blocklab's and fio's (--randseed) alike: repetition r
    /// uses seed + r.
    #[arg(long, default_value_t = 4096)]
    seed: u64,
}

#[derive(Debug, Clone, Copy)]
struct Workload {
    name: &'static str,
    op: StreamOp,
    random: bool,
    block_size: usize,
    queue_depth: u32,
}

const WORKLOADS: [Workload; 6] = [
    Workload {
        name: "randwrite",
        op: StreamOp::Write,
        random: true,
        block_size: 4096,
        queue_depth: 1,
    },
    Workload {
        name: "randwrite",
        op: StreamOp::Write,
        random: true,
        block_size: 4096,
        queue_depth: 32,
    },
    Workload {
        name: "randread",
        op: StreamOp::Read,
        random: true,
        block_size: 4096,
        queue_depth: 1,
    },
    Workload {
        name: "randread",
        op: StreamOp::Read,
        random: true,
        block_size: 4096,
        queue_depth: 32,
    },
    Workload {
        name: "write",
        op: StreamOp::Write,
        random: false,
        block_size: 1 << 20,
        queue_depth: 8,
    },
    Workload {
        name: "read",
        op: StreamOp::Read,
        random: false,
        block_size: 1 << 20,
        queue_depth: 8,
    },
];

#[derive(Debug, serde::Serialize)]
struct Row {
    tool: &'static str,
    pattern: &'static str,
    block_size_bytes: usize,
    queue_depth: u32,
    repetition: u32,
    iops: f64,
    bandwidth_mib_s: f64,
    lat_p50_us: f64,
    lat_p99_us: f64,
    device: String,
}

/// A row's configuration columns: the key of its histogram in exp-io-hist.csv.
#[derive(Debug, Clone, serde::Serialize)]
struct HistKey {
    tool: &'static str,
    pattern: &'static str,
    block_size_bytes: usize,
    queue_depth: u32,
    repetition: u32,
}

impl Row {
    fn hist_key(&self) -> HistKey {
        HistKey {
            tool: self.tool,
            pattern: self.pattern,
            block_size_bytes: self.block_size_bytes,
            queue_depth: self.queue_depth,
            repetition: self.repetition,
        }
    }
}

struct Measured {
    iops: f64,
    mib_s: f64,
    p50_us: f64,
    p99_us: f64,
    /// blocklab: the completion latency histogram (ns).
    hist: Option<LatencyHist>,
    /// fio: its JSON output, as it printed it.
    fio_json: Option<Vec<u8>>,
}

fn run_blocklab(
    dev: &Device,
    w: &Workload,
    region: u64,
    duration: Duration,
    fixed: bool,
    seed: u64,
) -> anyhow::Result<Measured> {
    let mut eng = UringEngine::with_queue_depth(w.queue_depth)?;
    let spec = StreamSpec {
        op: w.op,
        pattern: if w.random {
            Pattern::Random { seed }
        } else {
            Pattern::Sequential
        },
        block_size: w.block_size,
        queue_depth: w.queue_depth,
        region_offset: 0,
        region_len: region,
        limit: StreamLimit::Time(duration),
        fixed_buffers: fixed,
        fixed_file: fixed,
    };
    let mut hist = LatencyHist::new();
    let stats = eng.stream(dev, &spec, &mut |lat| hist.record_ns(lat))?;
    let p = hist.percentiles();
    Ok(Measured {
        iops: stats.iops(),
        mib_s: stats.mib_per_s(),
        p50_us: p.p50 as f64 / 1000.0,
        p99_us: p.p99 as f64 / 1000.0,
        hist: Some(hist),
        fio_json: None,
    })
}

fn run_fio(
    fio: &str,
    path: &Path,
    w: &Workload,
    region: u64,
    duration: Duration,
    fixed: bool,
    seed: u64,
) -> anyhow::Result<Measured> {
    let mut cmd = Command::new(fio);
    cmd.arg("--name=exp-io")
        .arg(format!("--filename={}", path.display()))
        .arg("--ioengine=io_uring")
        .arg("--direct=1")
        .arg(format!("--rw={}", w.name))
        .arg(format!("--bs={}", w.block_size))
        .arg(format!("--iodepth={}", w.queue_depth))
        .arg(format!("--size={region}"))
        .arg("--time_based")
        .arg(format!("--runtime={}ms", duration.as_millis()))
        .arg("--norandommap")
        .arg(format!("--randseed={seed}"))
        .arg("--output-format=json");
    if fixed {
        cmd.arg("--fixedbufs").arg("--registerfiles");
    }
    let out = cmd.output().with_context(|| {
        format!("running {fio} (install Debian's fio package; scripts/test does)")
    })?;
    if !out.status.success() {
        bail!(
            "fio failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let mut m = parse_fio(&out.stdout, w.op)?;
    m.fio_json = Some(harness::fio::document(&out.stdout)?.to_vec());
    Ok(m)
}

/// Extracts IOPS, bandwidth and completion-latency percentiles from fio's JSON output.
fn parse_fio(json: &[u8], op: StreamOp) -> anyhow::Result<Measured> {
    let v = harness::fio::json(json)?;
    let side = if op == StreamOp::Read {
        "read"
    } else {
        "write"
    };
    let job = &v["jobs"][0][side];
    let num = |p: &serde_json::Value, what: &str| {
        p.as_f64()
            .with_context(|| format!("fio JSON lacks {side}.{what}"))
    };
    let iops = num(&job["iops"], "iops")?;
    let bw_kib = num(&job["bw"], "bw")?;
    let pct = &job["clat_ns"]["percentile"];
    Ok(Measured {
        iops,
        mib_s: bw_kib / 1024.0,
        p50_us: num(&pct["50.000000"], "clat_ns.percentile.50")? / 1000.0,
        p99_us: num(&pct["99.000000"], "clat_ns.percentile.99")? / 1000.0,
        hist: None,
        fio_json: None,
    })
}

fn main() -> std::process::ExitCode {
    harness::exit_on_error("exp-io", run(Args::parse()))
}

/// fio's version, or an error saying how to install it.
fn fio_version(fio: &str) -> anyhow::Result<String> {
    match Command::new(fio).arg("--version").output() {
        Ok(o) if o.status.success() => Ok(String::from_utf8_lossy(&o.stdout).trim().to_string()),
        _ => bail!("{fio} not found: install Debian's fio package (scripts/test does)"),
    }
}

/// One run's settings.
struct Settings<'a> {
    args: &'a Args,
    duration: Duration,
    region: u64,
}

/// exp-io.csv and the raw data beside it.
struct Outputs {
    csv: CsvOut<Row>,
    hists: HistOut<HistKey>,
}

impl Outputs {
    /// The row, and its raw data: blocklab's histogram, or fio's JSON in exp-io-fio/.
    fn write(&mut self, args: &Args, row: &Row, m: &Measured) -> anyhow::Result<()> {
        self.csv.write(row)?;
        if let Some(h) = &m.hist {
            self.hists.write(&row.hist_key(), &[("lat_ns", h)])?;
        }
        if let Some(json) = &m.fio_json {
            let name = format!(
                "{}-bs{}-qd{}-rep{}.json",
                row.pattern, row.block_size_bytes, row.queue_depth, row.repetition
            );
            let c = &args.common;
            harness::output::write_raw(&c.out.join("exp-io-fio"), &name, json, c.overwrite)?;
        }
        Ok(())
    }
}

/// Repetition `rep` of every workload, the two tools back to back, alternating which goes
/// first so drift affects both alike; adds blocklab's and fio's figures (IOPS for 4 KiB,
/// MiB/s for 1 MiB) to each workload's `sums`.
fn run_repetition(
    st: &Settings<'_>,
    dev: &Device,
    rep: u32,
    sums: &mut [(f64, f64)],
    out: &mut Outputs,
    progress: &mut Progress,
) -> anyhow::Result<()> {
    let order: [&str; 2] = if rep % 2 == 0 {
        ["blocklab", "fio"]
    } else {
        ["fio", "blocklab"]
    };
    for (w, (sum_b, sum_f)) in WORKLOADS.iter().zip(sums.iter_mut()) {
        for tool in order {
            let (args, region, duration) = (st.args, st.region, st.duration);
            let seed = args.seed.wrapping_add(rep as u64);
            let m = if tool == "blocklab" {
                run_blocklab(dev, w, region, duration, args.fixed, seed)?
            } else {
                run_fio(&args.fio, dev.path(), w, region, duration, args.fixed, seed)?
            };
            let figure = if w.block_size >= 1 << 20 {
                m.mib_s
            } else {
                m.iops
            };
            if tool == "blocklab" {
                *sum_b += figure;
            } else {
                *sum_f += figure;
            }
            let row = Row {
                tool,
                pattern: w.name,
                block_size_bytes: w.block_size,
                queue_depth: w.queue_depth,
                repetition: rep,
                iops: m.iops,
                bandwidth_mib_s: m.mib_s,
                lat_p50_us: m.p50_us,
                lat_p99_us: m.p99_us,
                device: dev.path().display().to_string(),
            };
            out.write(args, &row, &m)?;
            progress.step(&format!(
                "{tool} {} bs={} qd={} rep {rep}: {:.0} IOPS {:.0} MiB/s",
                w.name, w.block_size, w.queue_depth, m.iops, m.mib_s
            ));
        }
    }
    Ok(())
}

/// Prints blocklab / fio per workload; the ratios by workload, for meta.json.
fn ratios(reps: u32, sums: &[(String, f64, f64)]) -> serde_json::Map<String, serde_json::Value> {
    println!("blocklab / fio (IOPS for 4 KiB, MiB/s for 1 MiB; mean over {reps} repetitions):");
    let mut summary = serde_json::Map::new();
    for (name, b, f) in sums {
        let r = if *f > 0.0 { b / f } else { f64::NAN };
        println!("  {name:<28} {r:.3}");
        summary.insert(name.clone(), serde_json::json!(r));
    }
    summary
}

fn run(args: Args) -> anyhow::Result<()> {
    let c = &args.common;
    let duration = args
        .duration
        .unwrap_or(c.pick(Duration::from_secs_f64(2.0), Duration::from_secs_f64(6.0)));
    let region = args.region.unwrap_or(c.pick(256 << 20, 1 << 30));
    if region < (8 << 20) {
        bail!("--region must be at least 8 MiB (1 MiB blocks at QD 8)");
    }
    let reps = c.repetitions_or(REPETITIONS);
    let fio_version = fio_version(&args.fio)?;

    // The set is at least `region` bytes (given devices are checked, the others made so).
    let set = DeviceSet::setup(c, 1, region, region)?;
    let dev = set.open(0)?;
    let mut out = Outputs {
        csv: CsvOut::<Row>::create(&c.out, "exp-io.csv", c.overwrite)?,
        hists: HistOut::create(&c.out, "exp-io", c.overwrite)?,
    };
    let mut meta = RunMeta::start("exp-io", c.profile);
    meta.devices = set.describe();
    harness::devices::precondition(&dev, 0, region)?;

    let st = Settings {
        args: &args,
        duration,
        region,
    };
    let mut progress = Progress::new("exp-io", (reps as usize * WORKLOADS.len() * 2) as u64);
    // Repetitions outermost, so every workload and tool meets the same drift.
    let mut totals = [(0.0, 0.0); WORKLOADS.len()];
    for rep in 0..reps {
        run_repetition(&st, &dev, rep, &mut totals, &mut out, &mut progress)?;
    }
    progress.finish();
    let sums: Vec<(String, f64, f64)> = WORKLOADS
        .iter()
        .zip(totals)
        .map(|(w, (b, f))| {
            let name = format!("{} bs={} qd={}", w.name, w.block_size, w.queue_depth);
            (name, b, f)
        })
        .collect();
    let summary = ratios(reps, &sums);
    meta.extra = serde_json::json!({
        "seconds_per_run": duration.as_secs_f64(), "region_bytes": region, "fixed": args.fixed,
        "seed": args.seed,
        "fio_version": fio_version, "ratio_blocklab_over_fio": summary,
    });
    meta.finish(&c.out, c.overwrite)?;
    // Closed before teardown: a loop device still open is not detached at once.
    drop(dev);
    set.teardown()?;
    eprintln!(
        "wrote {}, {} and {}",
        out.csv.path().display(),
        out.hists.path().display(),
        c.out.join("exp-io-fio").display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_fio_json() {
        let json = br#"note: something
{"jobs":[{"write":{"iops":1000.5,"bw":4002,"clat_ns":{"percentile":{"50.000000":12000,"99.000000":50000}}},
          "read":{"iops":0,"bw":0}}]}"#;
        let m = parse_fio(json, StreamOp::Write).unwrap();
        assert_eq!(m.iops, 1000.5);
        assert!((m.mib_s - 4002.0 / 1024.0).abs() < 1e-9);
        assert_eq!(m.p50_us, 12.0);
        assert_eq!(m.p99_us, 50.0);
        assert!(parse_fio(b"no json here", StreamOp::Read).is_err());
        assert!(
            parse_fio(json, StreamOp::Read).is_err(),
            "missing percentiles is an error"
        );
    }
}
