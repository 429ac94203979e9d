//! exp-alloc: block allocation across the real OS processes of a storage node.
//!
//! For every repetition, process count {1, 2, 4, 8} and {allocation only, allocation +
//! 4 KiB write}, the strategies `shm` (lock-free shared memory), `mutex` (robust
//! process-shared mutex around a shared free list) and `central` (the leader allocates,
//! followers ask over a Unix socket) run one after the other (alternating). Each
//! configuration starts N `blocklab alloc worker` processes on a fresh node directory;
//! they elect a leader by binding the internal port, register, and on `go` allocate and
//! free (optionally writing 4 KiB into each block through io_uring, O_DIRECT) for a fixed
//! time, then keep a few committed blocks. An audit then walks every block of every
//! device: free, in use and recorded, or neither (leaked); owned twice (double).
//!
//! The crash run (`shm_crash_follower`, `shm_crash_leader` rows): 4 processes with I/O;
//! one stops 40% into the run with a block allocated and written but not committed, is
//! SIGKILLed there and restarted with the same process id; recovery must have returned
//! exactly that block (the run fails otherwise), and the audit after the run must find
//! nothing leaked and nothing double-allocated.
//!
//! CSV columns: strategy,processes,with_io,repetition,ops,ops_per_s,alloc_p50_ns,
//! alloc_p99_ns,leaked_blocks,double_allocated. Beside it, exp-alloc-hist.csv: each row's
//! allocation latency histogram (metric `alloc_ns`, all processes merged).

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::{bail, Context};
use blocklab::alloc::attached::{proc_path, Attached};
use blocklab::alloc::audit::{audit, Record};
use blocklab::alloc::region::{region_of, RegionSource};
use blocklab::alloc::segs::ProcSeg;
use blocklab::alloc::BlockRef;
use blocklab::alloc::{DeviceRegion, DeviceSpec, Strategy};
use blocklab::dev::UringEngine;
use clap::Parser;
use harness::args::Repetitions;
use harness::cli::alloc::{NodeArgs, WorkerEvent, WorkerProc, WorkerSpec};
use harness::progress::Progress;
use harness::{CommonArgs, CsvOut, DeviceSet, HistOut, LatencyHist, RunMeta};
use serde::Serialize;

/// Repetitions per configuration: quick, full.
const REPETITIONS: Repetitions = Repetitions { quick: 2, full: 5 };

/// Measures block-allocation throughput and latency across the real OS processes of one
/// storage node and compares lock-free shared memory (shm) with a locked free list (mutex)
/// and a central allocator (central); a crash run checks recovery. Writes
/// OUT/exp-alloc.csv.
#[derive(Debug, Parser)]
#[command(name = "exp-alloc", version, mut_arg("repetitions", |a| REPETITIONS.help(a)))]
struct Args {
    #[command(flatten)]
    common: CommonArgs,
    /// Strategies to compare, alternating within each configuration.
    #[arg(long, value_delimiter = ',', default_value = "shm,mutex,central")]
    strategies: Vec<Strategy>,
    /// Process counts (real OS processes of one node; quick and full alike).
    #[arg(long, value_delimiter = ',', default_value = "1,2,4,8")]
    processes: Vec<u16>,
    /// How long each configuration runs, e.g. 800ms (default: quick 800ms, full 3s).
    #[arg(long, value_name = "DURATION", value_parser = harness::args::parse_positive_duration)]
    duration: Option<Duration>,
    /// Block size (multiple of 4 KiB).
    #[arg(long, default_value = "64K", value_parser = harness::args::parse_size)]
    block_size: u64,
    /// Skip the crash run.
    #[arg(long)]
    no_crash: bool,
    /// Where node directories (shared-memory segments) are created.
    #[arg(long, default_value = "/dev/shm")]
    shm_root: PathBuf,
}

#[derive(Debug, Serialize)]
struct Row {
    strategy: String,
    processes: u32,
    with_io: bool,
    repetition: u32,
    ops: u64,
    ops_per_s: f64,
    alloc_p50_ns: u64,
    alloc_p99_ns: u64,
    leaked_blocks: u64,
    double_allocated: u64,
}

/// A row's configuration columns: the key of its histogram in exp-alloc-hist.csv.
#[derive(Debug, Clone, Serialize)]
struct HistKey {
    strategy: String,
    processes: u32,
    with_io: bool,
    repetition: u32,
}

impl Row {
    fn hist_key(&self) -> HistKey {
        HistKey {
            strategy: self.strategy.clone(),
            processes: self.processes,
            with_io: self.with_io,
            repetition: self.repetition,
        }
    }
}

/// Where the blocks go on each device: the data region of a formatted daemon device,
/// else after the first MiB (which the device probe inspects) to the end.
fn regions(set: &DeviceSet, block_size: u64) -> anyhow::Result<Vec<(DeviceRegion, RegionSource)>> {
    let mut eng = UringEngine::with_queue_depth(1)?;
    (0..set.len())
        .map(|i| {
            let dev = set.open(i)?;
            region_of(&mut eng, &dev, block_size)
                .with_context(|| format!("block region of {}", dev.path().display()))
        })
        .collect()
}

#[derive(Debug, Clone, Copy)]
enum Crash {
    None,
    Follower,
    Leader,
}

struct Outcome {
    row: Row,
    /// Allocation latency (ns) of every process.
    hist: LatencyHist,
    /// In-flight blocks recovery returned for the killed process (crash runs).
    recovered_at_restart: Option<u64>,
    /// The block it had in flight, with its state after the run.
    returned_block: Option<String>,
}

struct NodeDir(PathBuf);
impl Drop for NodeDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// What every run shares.
struct Env<'a> {
    exe: &'a Path,
    /// The node directory (shared-memory segments), made anew for each run.
    dir: &'a Path,
    block_size: u64,
    devices: &'a [DeviceRegion],
}

/// One run: `procs` processes of `strategy` for `duration`.
#[derive(Debug, Clone, Copy)]
struct RunSpec {
    strategy: Strategy,
    procs: u16,
    with_io: bool,
    duration: Duration,
    crash: Crash,
}

impl RunSpec {
    /// The strategy column: the strategy, and which process a crash run killed.
    fn name(&self) -> String {
        match self.crash {
            Crash::None => self.strategy.name().to_string(),
            Crash::Follower => format!("{}_crash_follower", self.strategy.name()),
            Crash::Leader => format!("{}_crash_leader", self.strategy.name()),
        }
    }
}

/// How long a worker may take to answer.
const WAIT: Duration = Duration::from_secs(60);

/// Starts `procs` workers and waits until each is ready; the leader's process id.
fn start_workers(spec: &WorkerSpec, procs: u16) -> anyhow::Result<(Vec<WorkerProc>, u16)> {
    let mut workers: Vec<WorkerProc> = (1..=procs)
        .map(|i| WorkerProc::spawn(spec, i))
        .collect::<anyhow::Result<_>>()?;
    let mut leader = None;
    for w in &mut workers {
        match w.event(WAIT)? {
            WorkerEvent::Ready {
                leader: true,
                proc_id,
                ..
            } => {
                if leader.replace(proc_id).is_some() {
                    bail!("two leaders on one node");
                }
            }
            WorkerEvent::Ready { .. } => {}
            e => bail!("unexpected {e:?}"),
        }
    }
    Ok((workers, leader.context("no leader was elected")?))
}

/// Lets every worker go; a crash run's victim stops with a block written but not
/// committed, dies there (SIGKILL) and is restarted. The victim's id and its block.
fn go_and_crash(
    spec: &WorkerSpec,
    run: &RunSpec,
    workers: &mut Vec<WorkerProc>,
    leader: u16,
) -> anyhow::Result<Option<(u16, BlockRef)>> {
    let victim = match run.crash {
        Crash::None => None,
        Crash::Follower => workers.iter().position(|w| w.proc_id != leader),
        Crash::Leader => workers.iter().position(|w| w.proc_id == leader),
    };
    for (i, w) in workers.iter_mut().enumerate() {
        if Some(i) == victim {
            w.go_stop_in_flight(run.duration.mul_f64(0.4))?;
        } else {
            w.go()?;
        }
    }
    let Some(v) = victim else {
        return Ok(None);
    };
    let mut w = workers.remove(v);
    let b = match w.event(WAIT)? {
        WorkerEvent::InFlight { block, .. } => block,
        e => bail!("unexpected {e:?}"),
    };
    let id = w.proc_id;
    w.kill()?;
    let mut again = WorkerProc::spawn(spec, id)?;
    match again.event(WAIT)? {
        WorkerEvent::Ready { .. } => {}
        e => bail!("unexpected {e:?}"),
    }
    again.go()?;
    workers.push(again);
    Ok(Some((id, b)))
}

/// What the workers reported at the end.
struct Done {
    ops: u64,
    /// Sum of each process's own rate (each ran the same wall time).
    rate: f64,
    hist: LatencyHist,
    /// The blocks they hold, for the audit.
    records: Vec<Record>,
}

fn collect_done(workers: &mut [WorkerProc], duration: Duration) -> anyhow::Result<Done> {
    let mut done = Done {
        ops: 0,
        rate: 0.0,
        hist: LatencyHist::new(),
        records: Vec::new(),
    };
    for w in workers {
        match w.event(WAIT + duration)? {
            WorkerEvent::Done {
                ops: o,
                elapsed_ns,
                alloc_ns,
                held,
                ..
            } => {
                done.ops += o;
                done.rate += o as f64 / (elapsed_ns.max(1) as f64 / 1e9);
                for (v, c) in alloc_ns {
                    done.hist.record_n(v, c);
                }
                done.records.extend(held.into_iter().map(|b| Record {
                    block: b,
                    offset: 0,
                    len: 4096,
                }));
            }
            e => bail!("unexpected {e:?}"),
        }
    }
    Ok(done)
}

/// Checks that the restarted victim's recovery returned exactly its in-flight block `b`;
/// the count and the block with its state after the run.
fn check_recovery(
    at: &Attached,
    dir: &Path,
    id: u16,
    b: BlockRef,
) -> anyhow::Result<(u64, String)> {
    let rec = ProcSeg::attach(&proc_path(dir, id))?;
    let n = rec.recovered().load(Ordering::Acquire);
    let last = BlockRef::unpack(rec.last_recovered().load(Ordering::Acquire));
    if n != 1 || last != Some(b) {
        bail!(
            "process {id} was killed with block {b} in flight, but recovery returned {n} block(s), the last {last:?}"
        );
    }
    let state = at
        .device(b.dev)
        .map(|d| format!("{:?}", d.load_state(b.block)));
    Ok((
        n,
        format!(
            "{b} (after the run: {})",
            state.unwrap_or_else(|e| e.to_string())
        ),
    ))
}

fn run_config(env: &Env<'_>, run: RunSpec) -> anyhow::Result<Outcome> {
    let dir = env.dir;
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let _cleanup = NodeDir(dir.to_path_buf());
    let spec = WorkerSpec {
        exe: env.exe.to_path_buf(),
        node: NodeArgs {
            dir: dir.to_path_buf(),
            proc_id: 0,
            internal_port: blocklab::netutil::free_port().context("finding a free port")?,
            strategy: run.strategy,
            block_size: env.block_size,
            // By path: the leader resolves each to the region `regions` computed.
            devices: env
                .devices
                .iter()
                .map(|r| DeviceSpec::path(&r.path))
                .collect(),
            unfilled_capacity: 256,
        },
        duration: run.duration,
        with_io: run.with_io,
        hold: 4,
    };
    let (mut workers, leader) = start_workers(&spec, run.procs)?;
    let in_flight = go_and_crash(&spec, &run, &mut workers, leader)?;
    let done = collect_done(&mut workers, run.duration)?;
    // Audit while every worker is up and idle (quiescent).
    let at = Attached::open(dir).context("attaching the node for the audit")?;
    let recovered = match in_flight {
        Some((id, b)) => Some(check_recovery(&at, dir, id, b)?),
        None => None,
    };
    let rep = audit(&at, &done.records)?;
    if !rep.problems.is_empty() {
        eprintln!(
            "audit of {} x{}: {:?}",
            run.strategy, run.procs, rep.problems
        );
    }
    // Followers first, then the current leader (which serves them until the end; after a
    // leader crash it is whichever follower took over).
    let leader_pid = at.node.leader_pid().load(Ordering::Acquire) as u32;
    workers.sort_by_key(|w| w.pid() == leader_pid);
    for w in workers {
        w.finish()?;
    }
    let pct = done.hist.percentiles();
    Ok(Outcome {
        row: Row {
            strategy: run.name(),
            processes: run.procs as u32,
            with_io: run.with_io,
            repetition: 0,
            ops: done.ops,
            ops_per_s: done.rate,
            alloc_p50_ns: pct.p50,
            alloc_p99_ns: pct.p99,
            leaked_blocks: rep.leaked_blocks,
            double_allocated: rep.double_allocated,
        },
        hist: done.hist,
        recovered_at_restart: recovered.as_ref().map(|r| r.0),
        returned_block: recovered.map(|r| r.1),
    })
}

/// Writes every block region once (1 MiB requests, 8 in flight), so runs with I/O do not
/// pay for allocating a sparse backing file's extents on first write.
fn prefill(regions: &[DeviceRegion]) -> anyhow::Result<()> {
    use blocklab::dev::{AlignedBuf, Device, IoEngine, IoRequest};
    let mut eng = UringEngine::with_queue_depth(8)?;
    let chunk = 1u64 << 20;
    let bufs: Vec<AlignedBuf> = (0..8).map(|_| AlignedBuf::new(chunk as usize)).collect();
    for r in regions {
        let dev = Device::open(&r.path)?;
        let mut off = r.offset;
        let end = r.offset + r.len;
        while off < end {
            let mut reqs = Vec::new();
            for b in &bufs {
                if off >= end {
                    break;
                }
                let len = chunk.min(end - off) as usize;
                reqs.push(IoRequest::write(&dev, off, &b[..len]));
                off += len as u64;
            }
            eng.execute(&mut reqs)
                .with_context(|| format!("prefilling {}", r.path.display()))?;
        }
    }
    Ok(())
}

/// The devices' block regions, each written once, and where each region came from.
fn prefilled_regions(
    set: &DeviceSet,
    block_size: u64,
) -> anyhow::Result<(Vec<DeviceRegion>, Vec<String>)> {
    let with_src = regions(set, block_size)?;
    let devices: Vec<DeviceRegion> = with_src.iter().map(|r| r.0.clone()).collect();
    let sources: Vec<String> = with_src.iter().map(|r| format!("{:?}", r.1)).collect();
    eprintln!("exp-alloc: writing the block regions once (no sparse-file allocation during runs)");
    prefill(&devices)?;
    Ok((devices, sources))
}

/// One run of the comparison, in repetition `rep`: its row and latency histogram.
fn compared_run(env: &Env<'_>, run: RunSpec, rep: u32) -> anyhow::Result<(Row, LatencyHist)> {
    let (s, procs, with_io) = (run.strategy, run.procs, run.with_io);
    let mut out = run_config(env, run)
        .with_context(|| format!("{s} with {procs} processes, io={with_io}"))?;
    out.row.repetition = rep;
    Ok((out.row, out.hist))
}

/// The crash run killing `crash`'s process, in repetition `rep`: its row and latency
/// histogram, and what recovery returned at the restart.
fn crash_run(
    env: &Env<'_>,
    crash: Crash,
    duration: Duration,
    rep: u32,
) -> anyhow::Result<(Row, LatencyHist, serde_json::Value)> {
    let run = RunSpec {
        strategy: Strategy::Shm,
        procs: 4,
        with_io: true,
        duration: duration.max(Duration::from_millis(500)),
        crash,
    };
    let mut out = run_config(env, run).with_context(|| format!("crash run ({crash:?})"))?;
    out.row.repetition = rep;
    let restart = serde_json::json!({
        "repetition": rep,
        "victim": format!("{crash:?}").to_lowercase(),
        "in_flight_blocks_returned": out.recovered_at_restart,
        "returned_block": out.returned_block,
    });
    Ok((out.row, out.hist, restart))
}

fn main() -> std::process::ExitCode {
    harness::exit_on_error("exp-alloc", run(Args::parse()))
}

fn run(args: Args) -> anyhow::Result<()> {
    let c = &args.common;
    let reps = c.repetitions_or(REPETITIONS);
    let duration = args
        .duration
        .unwrap_or(c.pick(Duration::from_secs_f64(0.8), Duration::from_secs_f64(3.0)));
    let exe = harness::blocklab_bin(None)?;
    let set = DeviceSet::setup(c, 2, 64 << 20, 256 << 20)?;
    let (devices, sources) = prefilled_regions(&set, args.block_size)?;
    let mut meta = RunMeta::start("exp-alloc", c.profile);
    meta.devices = set.describe();
    let mut csv = CsvOut::<Row>::create(&c.out, "exp-alloc.csv", c.overwrite)?;
    let mut hists = HistOut::<HistKey>::create(&c.out, "exp-alloc", c.overwrite)?;
    let dir = args
        .shm_root
        .join(format!("blocklab-exp-alloc-{}", std::process::id()));
    let crash_runs: Vec<Crash> = if args.no_crash {
        vec![]
    } else {
        vec![Crash::Follower, Crash::Leader]
    };
    let env = Env {
        exe: &exe,
        dir: &dir,
        block_size: args.block_size,
        devices: &devices,
    };
    let total = reps as u64
        * (args.processes.len() as u64 * 2 * args.strategies.len() as u64
            + crash_runs.len() as u64);
    let mut prog = Progress::new("exp-alloc", total);
    let mut recovered = Vec::new();
    for rep in 0..reps {
        for &procs in &args.processes {
            for with_io in [false, true] {
                for &s in &args.strategies {
                    let run = RunSpec {
                        strategy: s,
                        procs,
                        with_io,
                        duration,
                        crash: Crash::None,
                    };
                    let (row, hist) = compared_run(&env, run, rep)?;
                    prog.step(&format!(
                        "rep {rep} {s} x{procs} io={with_io}: {:.0} ops/s",
                        row.ops_per_s
                    ));
                    csv.write(&row)?;
                    hists.write(&row.hist_key(), &[("alloc_ns", &hist)])?;
                }
            }
        }
        for &crash in &crash_runs {
            let (row, hist, restart) = crash_run(&env, crash, duration, rep)?;
            prog.step(&format!(
                "rep {rep} {}: leaked {} double {}",
                row.strategy, row.leaked_blocks, row.double_allocated
            ));
            recovered.push(restart);
            csv.write(&row)?;
            hists.write(&row.hist_key(), &[("alloc_ns", &hist)])?;
        }
    }
    prog.finish();
    meta.extra = serde_json::json!({
        "seconds_per_config": duration.as_secs_f64(),
        "block_size": args.block_size,
        "regions": devices,
        "region_sources": sources,
        "crash_restarts": recovered,
        "note": "ops_per_s is the sum of the processes' own rates; alloc latency is the time of one alloc() call, one call in 8 timed with the TSC (quanta), clock overhead (about 19 ns) included",
    });
    meta.finish(&c.out, c.overwrite)?;
    eprintln!(
        "wrote {} and {}",
        csv.path().display(),
        hists.path().display()
    );
    Ok(())
}
