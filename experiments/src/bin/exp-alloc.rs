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
//! The crash run (`shm-crash-follower`, `shm-crash-leader` rows): 4 processes with I/O;
//! one stops 40% into the run with a block allocated and written but not committed, is
//! SIGKILLed there and restarted with the same process id; recovery must have returned
//! exactly that block (the run fails otherwise), and the audit after the run must find
//! nothing leaked and nothing double-allocated.
//!
//! CSV columns: strategy,processes,with_io,repetition,ops,ops_per_s,alloc_p50_ns,
//! alloc_p99_ns,leaked_blocks,double_allocated.

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
use harness::cli::alloc::{free_port, NodeArgs, WorkerEvent, WorkerProc, WorkerSpec};
use harness::progress::Progress;
use harness::{CommonArgs, CsvOut, DeviceSet, RunMeta};
use serde::Serialize;

/// Shared-memory block allocation across real node processes vs. a locked free list and
/// a central allocator; plus a crash run. Writes OUT/exp-alloc.csv.
#[derive(Debug, Parser)]
#[command(name = "exp-alloc", version, about, long_about = None)]
struct Args {
    #[command(flatten)]
    common: CommonArgs,
    /// Strategies to compare, alternating within each configuration.
    #[arg(long, value_delimiter = ',', default_value = "shm,mutex,central")]
    strategies: Vec<Strategy>,
    /// Process counts (real OS processes of one node).
    #[arg(long, value_delimiter = ',', default_value = "1,2,4,8")]
    processes: Vec<u16>,
    /// Seconds each configuration runs (default: quick 0.8, full 3).
    #[arg(long)]
    seconds: Option<f64>,
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

#[allow(clippy::too_many_arguments)]
fn run_config(
    exe: &Path,
    dir: &Path,
    strategy: Strategy,
    procs: u16,
    with_io: bool,
    seconds: f64,
    block_size: u64,
    devices: &[DeviceRegion],
    crash: Crash,
) -> anyhow::Result<Outcome> {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let _cleanup = NodeDir(dir.to_path_buf());
    let spec = WorkerSpec {
        exe: exe.to_path_buf(),
        node: NodeArgs {
            dir: dir.to_path_buf(),
            proc_id: 0,
            internal_port: free_port()?,
            strategy,
            block_size,
            // By path: the leader resolves each to the region `regions` computed.
            devices: devices.iter().map(|r| DeviceSpec::path(&r.path)).collect(),
            unfilled_capacity: 256,
        },
        seconds,
        with_io,
        hold: 4,
    };
    let wait = Duration::from_secs(60);
    let mut workers: Vec<WorkerProc> = (1..=procs)
        .map(|i| WorkerProc::spawn(&spec, i))
        .collect::<anyhow::Result<_>>()?;
    let mut leader = None;
    for w in &mut workers {
        match w.event(wait)? {
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
    let leader = leader.context("no leader was elected")?;
    let victim = match crash {
        Crash::None => None,
        Crash::Follower => workers.iter().position(|w| w.proc_id != leader),
        Crash::Leader => workers.iter().position(|w| w.proc_id == leader),
    };
    for (i, w) in workers.iter_mut().enumerate() {
        if Some(i) == victim {
            w.go_stop_in_flight(seconds * 0.4)?;
        } else {
            w.go()?;
        }
    }
    // The victim stops with a block written but not committed; it dies there.
    let mut in_flight = None;
    if let Some(v) = victim {
        let mut w = workers.remove(v);
        let b = match w.event(wait)? {
            WorkerEvent::InFlight { block, .. } => block,
            e => bail!("unexpected {e:?}"),
        };
        let id = w.proc_id;
        w.kill()?;
        in_flight = Some((id, b));
        let mut again = WorkerProc::spawn(&spec, id)?;
        match again.event(wait)? {
            WorkerEvent::Ready { .. } => {}
            e => bail!("unexpected {e:?}"),
        }
        again.go()?;
        workers.push(again);
    }
    let mut hist = harness::LatencyHist::new();
    let (mut ops, mut records) = (0u64, Vec::new());
    let mut rate = 0.0;
    for w in &mut workers {
        match w.event(wait + Duration::from_secs_f64(seconds))? {
            WorkerEvent::Done {
                ops: o,
                elapsed_ns,
                alloc_ns,
                held,
                ..
            } => {
                ops += o;
                rate += o as f64 / (elapsed_ns.max(1) as f64 / 1e9);
                for (v, c) in alloc_ns {
                    hist.record_n(v, c);
                }
                records.extend(held.into_iter().map(|b| Record {
                    block: b,
                    offset: 0,
                    len: 4096,
                }));
            }
            e => bail!("unexpected {e:?}"),
        }
    }
    // Audit while every worker is up and idle (quiescent).
    let at = Attached::open(dir).context("attaching the node for the audit")?;
    let mut recovered_at_restart = None;
    let mut returned_block = None;
    if let Some((id, b)) = in_flight {
        let rec = ProcSeg::attach(&proc_path(dir, id))?;
        let n = rec.recovered().load(Ordering::Acquire);
        let last = BlockRef::unpack(rec.last_recovered().load(Ordering::Acquire));
        if n != 1 || last != Some(b) {
            bail!(
                "process {id} was killed with block {b} in flight, but recovery returned {n} block(s), the last {last:?}"
            );
        }
        recovered_at_restart = Some(n);
        let state = at
            .device(b.dev)
            .map(|d| format!("{:?}", d.load_state(b.block)));
        returned_block = Some(format!(
            "{b} (after the run: {})",
            state.unwrap_or_else(|e| e.to_string())
        ));
    }
    let rep = audit(&at, &records)?;
    if !rep.problems.is_empty() {
        eprintln!("audit of {strategy} x{procs}: {:?}", rep.problems);
    }
    // Followers first, then the current leader (which serves them until the end; after a
    // leader crash it is whichever follower took over).
    let leader_pid = at.node.leader_pid().load(Ordering::Acquire) as u32;
    workers.sort_by_key(|w| w.pid() == leader_pid);
    for w in workers {
        w.finish()?;
    }
    let name = match crash {
        Crash::None => strategy.name().to_string(),
        Crash::Follower => format!("{}-crash-follower", strategy.name()),
        Crash::Leader => format!("{}-crash-leader", strategy.name()),
    };
    let pct = hist.percentiles();
    Ok(Outcome {
        row: Row {
            strategy: name,
            processes: procs as u32,
            with_io,
            repetition: 0,
            ops,
            // Sum of each process's own rate (each ran the same wall time).
            ops_per_s: rate,
            alloc_p50_ns: pct.p50,
            alloc_p99_ns: pct.p99,
            leaked_blocks: rep.leaked_blocks,
            double_allocated: rep.double_allocated,
        },
        recovered_at_restart,
        returned_block,
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

fn main() -> std::process::ExitCode {
    harness::exit_on_error("exp-alloc", run(Args::parse()))
}

fn run(args: Args) -> anyhow::Result<()> {
    let c = &args.common;
    let reps = c.repetitions_or(2, 5);
    let seconds = args.seconds.unwrap_or(c.pick(0.8, 3.0));
    let exe = harness::blocklab_bin(None)?;
    let set = DeviceSet::setup(c, 2, 64 << 20, 256 << 20)?;
    let with_src = regions(&set, args.block_size)?;
    let devices: Vec<DeviceRegion> = with_src.iter().map(|r| r.0.clone()).collect();
    let sources: Vec<String> = with_src.iter().map(|r| format!("{:?}", r.1)).collect();
    eprintln!("exp-alloc: writing the block regions once (no sparse-file allocation during runs)");
    prefill(&devices)?;
    let mut meta = RunMeta::start("exp-alloc", c.profile);
    meta.devices = set.describe();
    let mut csv = CsvOut::<Row>::create(&c.out, "exp-alloc.csv", c.overwrite)?;
    let dir = args
        .shm_root
        .join(format!("blocklab-exp-alloc-{}", std::process::id()));
    let crash_runs: Vec<Crash> = if args.no_crash {
        vec![]
    } else {
        vec![Crash::Follower, Crash::Leader]
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
                    prog.step(&format!("rep {rep} {s} x{procs} io={with_io}"));
                    let mut out = run_config(
                        &exe,
                        &dir,
                        s,
                        procs,
                        with_io,
                        seconds,
                        args.block_size,
                        &devices,
                        Crash::None,
                    )
                    .with_context(|| format!("{s} with {procs} processes, io={with_io}"))?;
                    out.row.repetition = rep;
                    csv.write(&out.row)?;
                }
            }
        }
        for &crash in &crash_runs {
            prog.step(&format!("rep {rep} crash {crash:?}"));
            let mut out = run_config(
                &exe,
                &dir,
                Strategy::Shm,
                4,
                true,
                seconds.max(0.5),
                args.block_size,
                &devices,
                crash,
            )
            .with_context(|| format!("crash run ({crash:?})"))?;
            out.row.repetition = rep;
            recovered.push(serde_json::json!({
                "repetition": rep,
                "victim": format!("{crash:?}").to_lowercase(),
                "in_flight_blocks_returned": out.recovered_at_restart,
                "returned_block": out.returned_block,
            }));
            csv.write(&out.row)?;
        }
    }
    prog.finish();
    meta.extra = serde_json::json!({
        "seconds_per_config": seconds,
        "block_size": args.block_size,
        "regions": devices,
        "region_sources": sources,
        "crash_restarts": recovered,
        "note": "ops_per_s is the sum of the processes' own rates; alloc latency is the time of one alloc() call, one call in 8 timed with the TSC (quanta), clock overhead (about 19 ns) included",
    });
    meta.finish(&c.out, c.overwrite)?;
    eprintln!("wrote {}", csv.path().display());
    Ok(())
}
