//! exp-commit: how long secondaries wait to apply committed writes, and what each commit
//! notification policy costs in messages, across write rates, delays and cluster sizes;
//! beside a real etcd cluster; and whether a kill in the idle window breaks safety.
//!
//! Every replica is its own `blocklab repl serve` process on its own loop device (backed
//! by a file on this machine's disk unless `--backing memory`), the primary reaches each
//! secondary through a `blocklab proxy` process that delays every byte by RTT/2 (±
//! jitter), and this process is the client, writing to the primary over TCP. Replicas
//! write their timelines to files on CLOCK_MONOTONIC, which every process shares, so the
//! apply lag (a secondary's apply minus the primary's commit) is measured across
//! processes. See docs/repl.md.

mod etcd_arm;
mod kills;
mod measure;
mod workload;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use blocklab::daemon::{self, MkfsRequest};
use blocklab::dev::{Device, UringEngine};
use blocklab::repl::kv::slots_for;
use blocklab::repl::replica::{PolicySpec, Regions};
use clap::{Parser, ValueEnum};
use harness::args::{
    millis, or_default, parse_bytes, parse_duration, parse_positive_duration, Repetitions,
};
use harness::cli::repl::parse_policy;
use harness::progress::Progress;
use harness::repl_cluster::{Cluster, ClusterSpec};
use harness::{CommonArgs, CpuTimes, CsvOut, DeviceSet, HistOut, RunMeta};

use kills::{KillRow, Scenario};
use measure::Measured;
use workload::Load;

const LOG_LEN: u64 = 64 << 20;
const DATA_LEN: u64 = 16 << 20;
/// Writes go to keys `n mod KEYS`: every key the storage engine has a slot for.
const KEYS: u64 = slots_for(DATA_LEN);

/// Repetitions per configuration: quick, full.
const REPETITIONS: Repetitions = Repetitions { quick: 2, full: 5 };

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, serde::Serialize)]
#[serde(rename_all = "snake_case")]
#[value(rename_all = "snake_case")]
enum Workload {
    /// Open loop, Poisson arrivals at each rate of --rates.
    Poisson,
    /// Bursts of --burst writes, --gap apart.
    Bursty,
    /// Closed loop: --clients connections, each writing again once answered.
    Closed,
}

impl Workload {
    fn name(self) -> &'static str {
        match self {
            Workload::Poisson => "poisson",
            Workload::Bursty => "bursty",
            Workload::Closed => "closed",
        }
    }
}

/// Where provisioned loop devices keep their backing files.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, serde::Serialize)]
#[serde(rename_all = "snake_case")]
#[value(rename_all = "snake_case")]
enum Backing {
    /// The file system of `--state-dir` (this machine's virtual disk).
    Disk,
    /// tmpfs (`/dev/shm/blocklab`): an explicitly named extra arm, where a flush costs
    /// tens of microseconds.
    Memory,
}

impl Backing {
    fn name(self) -> &'static str {
        match self {
            Backing::Disk => "disk",
            Backing::Memory => "memory",
        }
    }
}

/// Where memory-backed loop devices live.
const MEMORY_STATE_DIR: &str = "/dev/shm/blocklab";

/// Measures the apply lag of secondaries and the messages and flushes each commit-notification
/// policy costs, and compares the policies (idle_ack, the patent's, against piggyback,
/// periodic, eager, idle_commit, idle_delayed) across write rates, bursts, RTTs and cluster
/// sizes, with a 3-member etcd cluster beside; kills replicas in the idle window to check
/// that no secondary applies an uncommitted entry and all converge (see docs/repl.md).
///
/// Replicas, link proxies and etcd members are separate processes. Profiles (policies
/// innermost, repetitions outermost): quick: RTT 1 ms at 10/s and 200/s, bursts and a
/// closed loop, RTT 0 at 10/s, etcd at RTT 1 ms, the three kills with idle_ack, 2
/// repetitions; full: RTT 1 ms at 10, 50 and 500/s, bursts and a closed loop, RTT 0 and
/// 10 ms at 10 and 50/s and bursts, 5 replicas at 10 and 50/s, etcd at every RTT, the kills
/// with idle_ack and idle_commit, 5 repetitions.
#[derive(Debug, Parser)]
#[command(name = "exp-commit", version, mut_arg("repetitions", |a| REPETITIONS.help(a)))]
struct Args {
    #[command(flatten)]
    common: CommonArgs,
    /// Policies to compare: piggyback, periodic:H, eager, idle_ack (the patent's),
    /// idle_commit, idle_delayed:D with H and D durations (default: piggyback,
    /// periodic:50ms, eager, idle_ack, idle_commit, idle_delayed:1ms).
    #[arg(long, value_delimiter = ',', value_parser = parse_policy)]
    policies: Vec<PolicySpec>,
    /// Workloads. Giving any of --workloads, --rates, --rtt, --replicas runs their cross
    /// product (the others at their defaults: every workload, the profile's rates and
    /// RTTs, 3 replicas) instead of the profile's grid.
    #[arg(long, value_delimiter = ',', value_enum)]
    workloads: Vec<Workload>,
    /// Poisson rates per second, e.g. 10,50,500.
    #[arg(long, value_delimiter = ',')]
    rates: Vec<f64>,
    /// Round-trip times between primary and secondaries, injected by the link proxies as
    /// RTT/2 each way, e.g. 0s,1ms,10ms.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration, value_delimiter = ',')]
    rtt: Vec<Duration>,
    /// Cluster sizes, e.g. 3,5.
    #[arg(long, value_delimiter = ',')]
    replicas: Vec<usize>,
    /// Jitter of the link delay, ± this fraction of it (percent).
    #[arg(long, default_value_t = 10.0)]
    jitter_percent: f64,
    /// Measured writes per Poisson run at rates up to 10/s (sparse; default quick 8, full 60;
    /// the full grid's cells other than 3 replicas at RTT 1 ms run half as many).
    #[arg(long)]
    sparse_writes: Option<u64>,
    /// Seconds of arrivals per Poisson run above 10/s (default quick 0.5, full 2):
    /// writes = rate × this.
    #[arg(long, value_name = "DURATION", value_parser = parse_positive_duration)]
    poisson_duration: Option<Duration>,
    /// Gap between bursts, and before the final carrier write, e.g. 250ms.
    #[arg(long, value_name = "DURATION", value_parser = parse_positive_duration, default_value = "250ms")]
    gap: Duration,
    /// Writes per burst.
    #[arg(long, default_value_t = 10)]
    burst: u64,
    /// Bursts per run (default quick 2, full 4).
    #[arg(long)]
    bursts: Option<u64>,
    /// Connections of the closed loop.
    #[arg(long, default_value_t = 4)]
    clients: usize,
    /// Length of a closed-loop run (default quick 500ms, full 1s).
    #[arg(long, value_name = "DURATION", value_parser = parse_positive_duration)]
    closed_duration: Option<Duration>,
    /// Size of the value of each write, e.g. 56 or 1K (the key is 8 bytes more).
    #[arg(long, value_parser = parse_bytes, default_value = "56")]
    value_size: u64,
    /// Protocol tick, e.g. 100us.
    #[arg(long, value_name = "DURATION", value_parser = parse_positive_duration, default_value = "100us")]
    tick: Duration,
    /// Group commit on every replica. Off by default: every entry is then flushed on its
    /// own, so `log_flushes` counts exactly the writes' flushes and a flush a
    /// notification caused would show.
    #[arg(long)]
    group_commit: bool,
    /// Where provisioned loop devices keep their backing files.
    #[arg(long, value_enum, default_value_t = Backing::Disk)]
    backing: Backing,
    /// RTTs of the etcd reference (default quick 1ms, full 0s,1ms,10ms); `none` skips it.
    #[arg(long, value_name = "DURATION|none", value_delimiter = ',')]
    etcd_rtt: Vec<String>,
    /// Kill scenarios (default: all three).
    #[arg(long, value_delimiter = ',', value_enum)]
    kills: Vec<Scenario>,
    /// Policies of the kill runs (default quick idle_ack; full idle_ack,idle_commit).
    #[arg(long, value_delimiter = ',', value_parser = parse_policy)]
    kill_policies: Vec<PolicySpec>,
    /// Skip the kill runs.
    #[arg(long)]
    no_kills: bool,
    /// Keep every run's replica timelines (`replica-ID-LIFE.events`) and stderr files in
    /// this directory, one subdirectory per run (it must be empty or absent).
    #[arg(long, value_name = "DIR")]
    timelines: Option<PathBuf>,
    /// The blocklab binary the replicas and proxies run (default: the one next to this).
    #[arg(long)]
    blocklab: Option<PathBuf>,
    /// Seed of the arrivals and the link jitter: repetition r uses seed + r (every policy
    /// of a repetition sees the same arrivals).
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

/// One configuration of the grid (policies and repetitions aside).
#[derive(Debug, Clone, Copy)]
struct Cell {
    workload: Workload,
    load: Load,
    /// Nominal rate (Poisson), 0 otherwise.
    rate: f64,
    rtt: Duration,
    replicas: usize,
}

struct RunSpec {
    policy: PolicySpec,
    cell: Cell,
    repetition: u32,
}

impl std::fmt::Display for RunSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} / {}{} / {} replicas / rtt {} ms / repetition {}",
            self.policy,
            self.cell.workload.name(),
            if self.cell.rate > 0.0 {
                format!(" {}/s", self.cell.rate)
            } else {
                String::new()
            },
            self.cell.replicas,
            millis(self.cell.rtt),
            self.repetition
        )
    }
}

#[derive(Debug, serde::Serialize)]
struct Row {
    policy: &'static str,
    param_ms: f64,
    workload: &'static str,
    rate_per_s: f64,
    replicas: usize,
    rtt_ms: f64,
    backing: &'static str,
    repetition: u32,
    writes: u64,
    achieved_per_s: f64,
    apply_lag_p50_us: u64,
    apply_lag_p99_us: u64,
    apply_lag_p999_us: u64,
    apply_lag_max_us: u64,
    commit_lag_p99_us: Option<u64>,
    empty_messages: Option<u64>,
    empty_responses: Option<u64>,
    extra_messages_per_write: Option<f64>,
    log_flushes: Option<u64>,
    write_p50_us: u64,
    write_p99_us: u64,
    /// Entries a secondary applied before the primary committed them (must be 0).
    violations: Option<u64>,
}

/// A row's configuration columns: the key of its histograms in exp-commit-hist.csv.
#[derive(Debug, Clone, serde::Serialize)]
struct HistKey {
    policy: &'static str,
    param_ms: f64,
    workload: &'static str,
    rate_per_s: f64,
    replicas: usize,
    rtt_ms: f64,
    backing: &'static str,
    repetition: u32,
}

impl Row {
    fn hist_key(&self) -> HistKey {
        HistKey {
            policy: self.policy,
            param_ms: self.param_ms,
            workload: self.workload,
            rate_per_s: self.rate_per_s,
            replicas: self.replicas,
            rtt_ms: self.rtt_ms,
            backing: self.backing,
            repetition: self.repetition,
        }
    }
}

/// What the whole run does, from the flags and the profile.
struct Plan {
    policies: Vec<PolicySpec>,
    cells: Vec<Cell>,
    reps: u32,
    etcd_rtts: Vec<Duration>,
    etcd_writes: u64,
    kills: Vec<Scenario>,
    kill_policies: Vec<PolicySpec>,
}

/// The sparse rate: Poisson writes 100 ms apart on average, well above the largest RTT
/// (10 ms) and the 50 ms heartbeat compared.
const SPARSE_RATE: f64 = 10.0;

impl Plan {
    fn new(args: &Args) -> anyhow::Result<Plan> {
        let c = &args.common;
        let ms = |v: f64| Duration::from_secs_f64(v / 1e3);
        let sparse_writes = args.sparse_writes.unwrap_or(c.pick(8, 60));
        let poisson_secs = args
            .poisson_duration
            .unwrap_or(c.pick(ms(500.0), ms(2000.0)));
        let bursts = args.bursts.unwrap_or(c.pick(2, 4));
        let closed = args
            .closed_duration
            .unwrap_or(c.pick(ms(500.0), ms(1000.0)));
        if sparse_writes == 0 || bursts == 0 || args.burst == 0 || args.clients == 0 {
            bail!("--sparse-writes, --bursts, --burst and --clients must be > 0");
        }
        if !(0.0..100.0).contains(&args.jitter_percent) {
            bail!("--jitter-percent must be in [0, 100)");
        }
        let half = (sparse_writes / 2).max(1);
        let cell_n =
            |workload: Workload, rate: f64, rtt: Duration, replicas: usize, sparse: u64| {
                let load = match workload {
                    Workload::Poisson => Load::Poisson {
                        rate,
                        writes: if rate <= 10.0 {
                            sparse
                        } else {
                            ((rate * poisson_secs.as_secs_f64()).round() as u64).max(1)
                        },
                    },
                    Workload::Bursty => Load::Bursty {
                        bursts,
                        size: args.burst,
                        gap: args.gap,
                    },
                    Workload::Closed => Load::Closed {
                        clients: args.clients,
                        duration: closed,
                    },
                };
                Cell {
                    workload,
                    load,
                    rate: if workload == Workload::Poisson {
                        rate
                    } else {
                        0.0
                    },
                    rtt,
                    replicas,
                }
            };
        let cell = |w, rate, rtt, n| cell_n(w, rate, rtt, n, sparse_writes);
        // Outside the reference setting (3 replicas, RTT 1 ms), half the sparse writes.
        let side = |w, rate, rtt, n| cell_n(w, rate, rtt, n, half);
        use Workload::*;
        let custom = !(args.workloads.is_empty()
            && args.rates.is_empty()
            && args.rtt.is_empty()
            && args.replicas.is_empty());
        let cells = if custom {
            let workloads = or_default(&args.workloads, vec![Poisson, Bursty, Closed]);
            let rates = or_default(
                &args.rates,
                c.pick(vec![SPARSE_RATE, 200.0], vec![SPARSE_RATE, 50.0, 500.0]),
            );
            let rtts = or_default(
                &args.rtt,
                c.pick(vec![ms(0.0), ms(1.0)], vec![ms(0.0), ms(1.0), ms(10.0)]),
            );
            let sizes = or_default(&args.replicas, vec![3]);
            let mut v = Vec::new();
            for &w in &workloads {
                let rs = if w == Poisson {
                    rates.clone()
                } else {
                    vec![0.0]
                };
                for &r in &rs {
                    for &rtt in &rtts {
                        for &n in &sizes {
                            v.push(cell(w, r, rtt, n));
                        }
                    }
                }
            }
            v
        } else {
            let (r0, r1, r10) = (ms(0.0), ms(1.0), ms(10.0));
            match c.profile {
                harness::Profile::Quick => vec![
                    cell(Poisson, SPARSE_RATE, r1, 3),
                    cell(Poisson, 200.0, r1, 3),
                    cell(Bursty, 0.0, r1, 3),
                    cell(Closed, 0.0, r1, 3),
                    cell(Poisson, SPARSE_RATE, r0, 3),
                ],
                harness::Profile::Full => vec![
                    cell(Poisson, SPARSE_RATE, r1, 3),
                    cell(Poisson, 50.0, r1, 3),
                    cell(Poisson, 500.0, r1, 3),
                    cell(Bursty, 0.0, r1, 3),
                    cell(Closed, 0.0, r1, 3),
                    side(Poisson, SPARSE_RATE, r0, 3),
                    side(Poisson, 50.0, r0, 3),
                    side(Bursty, 0.0, r0, 3),
                    side(Poisson, SPARSE_RATE, r10, 3),
                    side(Poisson, 50.0, r10, 3),
                    side(Bursty, 0.0, r10, 3),
                    side(Poisson, SPARSE_RATE, r1, 5),
                    side(Poisson, 50.0, r1, 5),
                ],
            }
        };
        if let Some(cl) = cells.iter().find(|cl| cl.replicas < 2) {
            bail!(
                "--replicas {}: a cluster needs a primary and at least one secondary",
                cl.replicas
            );
        }
        if cells
            .iter()
            .any(|cl| cl.workload == Poisson && !(cl.rate.is_finite() && cl.rate > 0.0))
        {
            bail!("--rates values must be > 0");
        }
        let etcd_rtts = if args.etcd_rtt.iter().any(|s| s == "none") {
            Vec::new()
        } else if args.etcd_rtt.is_empty() {
            c.pick(vec![ms(1.0)], vec![ms(0.0), ms(1.0), ms(10.0)])
        } else {
            args.etcd_rtt
                .iter()
                .map(|s| parse_duration(s).map_err(|e| anyhow::anyhow!("--etcd-rtt: {e}")))
                .collect::<anyhow::Result<_>>()?
        };
        let p = |s: &str| parse_policy(s).expect("valid policy");
        Ok(Plan {
            policies: or_default(
                &args.policies,
                [
                    "piggyback",
                    "periodic:50ms",
                    "eager",
                    "idle_ack",
                    "idle_commit",
                    "idle_delayed:1ms",
                ]
                .map(p)
                .to_vec(),
            ),
            cells,
            reps: c.repetitions_or(REPETITIONS),
            etcd_rtts,
            etcd_writes: sparse_writes,
            kills: if args.no_kills {
                Vec::new()
            } else {
                or_default(&args.kills, Scenario::ALL.to_vec())
            },
            kill_policies: or_default(
                &args.kill_policies,
                c.pick(vec![p("idle_ack")], vec![p("idle_ack"), p("idle_commit")]),
            ),
        })
    }

    /// Every measured run in order: repetitions outermost, policies innermost.
    fn specs(&self) -> Vec<RunSpec> {
        let mut v = Vec::new();
        for repetition in 0..self.reps {
            for &cell in &self.cells {
                for &policy in &self.policies {
                    v.push(RunSpec {
                        policy,
                        cell,
                        repetition,
                    });
                }
            }
        }
        v
    }

    fn max_replicas(&self) -> usize {
        self.cells
            .iter()
            .map(|c| c.replicas)
            .max()
            .unwrap_or(3)
            .max(3)
    }
}

/// The directory of the runs' timelines.
enum Scratch {
    Temporary(tempfile::TempDir),
    Kept(PathBuf),
}

impl Scratch {
    fn new(kept: Option<PathBuf>) -> anyhow::Result<Scratch> {
        match kept {
            None => Ok(Scratch::Temporary(
                tempfile::Builder::new().prefix("exp-commit-").tempdir()?,
            )),
            Some(d) => {
                if d.exists() && std::fs::read_dir(&d)?.next().is_some() {
                    bail!(
                        "--timelines {}: not empty (nothing is overwritten)",
                        d.display()
                    );
                }
                std::fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
                Ok(Scratch::Kept(d))
            }
        }
    }
    fn path(&self) -> &std::path::Path {
        match self {
            Scratch::Temporary(t) => t.path(),
            Scratch::Kept(d) => d,
        }
    }
    /// The directory name of a run: one reused directory when temporary, one per run
    /// (from its description) when kept.
    fn run_name(&self, what: &str) -> String {
        match self {
            Scratch::Temporary(_) => "run".into(),
            Scratch::Kept(_) => what
                .chars()
                .map(|c| {
                    if c.is_ascii_alphanumeric() || c == '.' || c == '_' {
                        c
                    } else {
                        '-'
                    }
                })
                .collect(),
        }
    }
}

/// What every run shares.
struct Ctx {
    bin: PathBuf,
    devices: Vec<PathBuf>,
    /// Where each run's timelines and stderr files go: a temporary directory, or
    /// `--timelines` (kept).
    scratch: Scratch,
    args: Args,
}

impl Ctx {
    fn cluster_spec(
        &self,
        policy: PolicySpec,
        replicas: usize,
        rtt: Duration,
        seed: u64,
        dir: &str,
    ) -> anyhow::Result<ClusterSpec> {
        let dir = self.scratch.path().join(dir);
        // A kept directory keeps every run; a temporary one only the current run.
        if dir.exists() {
            std::fs::remove_dir_all(&dir)?;
        }
        std::fs::create_dir_all(&dir)?;
        Ok(ClusterSpec {
            bin: self.bin.clone(),
            devices: self.devices[..replicas].to_vec(),
            policy,
            tick: self.args.tick,
            retransmit: Duration::from_millis(1000),
            one_way: rtt / 2,
            jitter: self.args.jitter_percent / 100.0,
            group_commit: self.args.group_commit,
            dir,
            seed,
        })
    }
}

/// Waits until every secondary applied `index` (their timelines say so).
fn await_applied(
    c: &Cluster,
    index: u64,
    timeout: Duration,
) -> anyhow::Result<Vec<Vec<(blocklab::repl::events::Event, i64)>>> {
    let deadline = Instant::now() + timeout;
    loop {
        let lives: Vec<_> = (1..c.replicas() as u32)
            .map(|id| c.current_events(id))
            .collect::<anyhow::Result<_>>()?;
        if measure::all_applied(&lives, index) {
            return Ok(lives);
        }
        if Instant::now() > deadline {
            bail!("the secondaries did not all apply write {index} within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// One measured run on a fresh cluster.
fn run_one(ctx: &Ctx, spec: &RunSpec) -> anyhow::Result<Measured> {
    let seed = ctx.args.seed + u64::from(spec.repetition);
    let name = ctx.scratch.run_name(&spec.to_string());
    let cs = ctx.cluster_spec(spec.policy, spec.cell.replicas, spec.cell.rtt, seed, &name)?;
    let mut c = Cluster::start(cs)?;
    c.await_connected(Duration::from_secs(20))?;
    c.await_probed(Duration::from_secs(20))?;
    let out = workload::run(
        c.addr(0)?,
        &spec.cell.load,
        seed,
        ctx.args.gap,
        KEYS,
        ctx.args.value_size as usize,
    )?;
    let last = out
        .writes
        .iter()
        .map(|w| w.index)
        .max()
        .context("no measured write")?;
    await_applied(&c, last, Duration::from_secs(30))?;
    if let Some(id) = c.exited() {
        bail!("replica {id} exited during the run");
    }
    c.stop()?;
    // Complete timelines, now that every replica stopped.
    let primary = c_events(&ctx.scratch.path().join(&name), 0)?;
    let secondaries: Vec<_> = (1..spec.cell.replicas as u32)
        .map(|id| c_events(&ctx.scratch.path().join(&name), id))
        .collect::<anyhow::Result<_>>()?;
    let mut m = measure::measure(&primary, &secondaries, &out)?;
    let lives: Vec<_> = secondaries
        .into_iter()
        .enumerate()
        .map(|(i, l)| (i as u32 + 1, vec![l]))
        .collect();
    m.violations = blocklab::repl::check::applied_uncommitted(&[primary], &lives).len() as u64;
    Ok(m)
}

/// The first life's timeline of replica `id` in a run directory.
fn c_events(
    dir: &std::path::Path,
    id: u32,
) -> anyhow::Result<Vec<(blocklab::repl::events::Event, i64)>> {
    let p = dir.join(format!("replica-{id}-1.events"));
    blocklab::repl::events::read_events(&p).with_context(|| format!("reading {}", p.display()))
}

fn row_of(spec: &RunSpec, m: &Measured, backing: Backing) -> Row {
    let a = m.apply.percentiles();
    let w = m.write.percentiles();
    let extra = m.empty_messages + m.empty_responses;
    // The offered rate: Poisson's; bursty's long-run rate (a burst per gap); the closed
    // loop's achieved rate.
    let rate = match spec.cell.load {
        Load::Poisson { rate, .. } => rate,
        Load::Bursty { size, gap, .. } => round2(size as f64 / gap.as_secs_f64()),
        Load::Closed { .. } => round2(m.rate_per_s),
    };
    Row {
        policy: spec.policy.name(),
        param_ms: spec.policy.param_ms(),
        workload: spec.cell.workload.name(),
        rate_per_s: rate,
        replicas: spec.cell.replicas,
        rtt_ms: millis(spec.cell.rtt),
        backing: backing.name(),
        repetition: spec.repetition,
        writes: m.writes,
        achieved_per_s: round2(m.rate_per_s),
        apply_lag_p50_us: a.p50,
        apply_lag_p99_us: a.p99,
        apply_lag_p999_us: a.p999,
        apply_lag_max_us: a.max,
        commit_lag_p99_us: Some(m.learn.percentiles().p99),
        empty_messages: Some(m.empty_messages),
        empty_responses: Some(m.empty_responses),
        extra_messages_per_write: Some(
            (extra as f64 / m.writes as f64 * 10_000.0).round() / 10_000.0,
        ),
        log_flushes: Some(m.log_flushes),
        write_p50_us: w.p50,
        write_p99_us: w.p99,
        violations: Some(m.violations),
    }
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

fn main() -> std::process::ExitCode {
    harness::exit_on_error("exp-commit", run(Args::parse()))
}

/// The device set (provisioned ones on tmpfs with `--backing memory`) and how it is
/// backed, for meta.json.
fn setup_devices(args: &Args, count: usize) -> anyhow::Result<(DeviceSet, String)> {
    let c = &args.common;
    let mut common = c.clone();
    if args.backing == Backing::Memory {
        if !std::path::Path::new("/dev/shm").is_dir() {
            bail!("--backing memory needs tmpfs at /dev/shm, which this machine lacks; use --backing disk");
        }
        common.state_dir = MEMORY_STATE_DIR.into();
    }
    let set = DeviceSet::setup(&common, count, 96 << 20, 128 << 20)?;
    let backing = match set.source() {
        harness::devices::Source::Provisioned => match args.backing {
            Backing::Memory => {
                format!("loop devices over sparse files on tmpfs ({MEMORY_STATE_DIR})")
            }
            Backing::Disk => format!(
                "loop devices over sparse files in {}",
                c.state_dir.display()
            ),
        },
        harness::devices::Source::Given => "the given devices".to_string(),
        harness::devices::Source::Files => "regular files (--files)".to_string(),
    };
    Ok((set, backing))
}

/// Formats every device as a daemon device (core::daemon::mkfs): the replication log
/// lives in its log region, the storage engine at the start of its data region. The
/// regions are written once now so no run pays for filling the sparse backing file.
fn format_devices(set: &DeviceSet) -> anyhow::Result<()> {
    let fsid = uuid::Uuid::new_v4();
    for (i, p) in set.paths().iter().enumerate() {
        let dev = Device::open(p).with_context(|| format!("opening {}", p.display()))?;
        let mut eng = UringEngine::with_queue_depth(8)?;
        let mut req = MkfsRequest::new(fsid, i as u32);
        // The device set already refused foreign data on given devices without --force.
        req.force = true;
        req.params.log_len = LOG_LEN;
        daemon::mkfs(&mut eng, &dev, &req)
            .with_context(|| format!("formatting {}", p.display()))?;
        let (r, _) = Regions::detect(p, LOG_LEN, DATA_LEN)?;
        harness::devices::precondition(&dev, r.log_offset, r.log_len)?;
        harness::devices::precondition(&dev, r.data_offset, r.data_len)?;
    }
    Ok(())
}

/// meta.json's `extra`: the run's settings.
fn meta_extra(args: &Args, plan: &Plan, backing: &str) -> serde_json::Value {
    serde_json::json!({
        "gap_ms": millis(args.gap),
        "burst": args.burst,
        "clients": args.clients,
        "value_bytes": args.value_size,
        "tick_us": args.tick.as_secs_f64() * 1e6,
        "seed": args.seed,
        "group_commit": args.group_commit,
        "backing": backing,
        "jitter_percent": args.jitter_percent,
        "cells": plan.cells.iter().map(|c| serde_json::json!({
            "workload": c.workload.name(), "load": c.load, "rtt_ms": millis(c.rtt), "replicas": c.replicas,
        })).collect::<Vec<_>>(),
        "processes": "every replica a `blocklab repl serve` process; one `blocklab proxy` process per primary-secondary link delaying each byte by RTT/2 ± jitter; this process is the client",
        "clock": "replicas write timelines on CLOCK_MONOTONIC, shared by every process",
        "etcd_rtts_ms": plan.etcd_rtts.iter().map(|d| millis(*d)).collect::<Vec<_>>(),
        "kill_one_way_ms": millis(kills::ONE_WAY),
        "log_region_bytes": LOG_LEN, "data_region_bytes": DATA_LEN,
        "preconditioned": "log and data regions written once before the first run",
    })
}

/// exp-commit.csv, exp-commit-hist.csv and exp-commit-kills.csv.
struct Outputs {
    rows: CsvOut<Row>,
    hists: HistOut<HistKey>,
    kills: Option<CsvOut<KillRow>>,
}

impl Outputs {
    fn create(args: &Args, kills: bool) -> anyhow::Result<Outputs> {
        let c = &args.common;
        Ok(Outputs {
            rows: CsvOut::create(&c.out, "exp-commit.csv", c.overwrite)?,
            hists: HistOut::create(&c.out, "exp-commit", c.overwrite)?,
            kills: if kills {
                Some(CsvOut::create(&c.out, "exp-commit-kills.csv", c.overwrite)?)
            } else {
                None
            },
        })
    }
    fn write(&mut self, row: &Row, m: &Measured) -> anyhow::Result<()> {
        self.rows.write(row)?;
        self.hists.write(
            &row.hist_key(),
            &[
                ("apply_lag_us", &m.apply),
                ("commit_lag_us", &m.learn),
                ("write_us", &m.write),
            ],
        )
    }
    fn report(&self) {
        eprintln!("wrote {}", self.rows.path().display());
        eprintln!("wrote {}", self.hists.path().display());
        if let Some(k) = &self.kills {
            eprintln!("wrote {}", k.path().display());
        }
    }
}

fn run(args: Args) -> anyhow::Result<()> {
    let plan = Plan::new(&args)?;
    let bin = harness::blocklab_bin(args.blocklab.as_deref())?;
    let scratch = Scratch::new(args.timelines.clone())?;
    let etcd_version = if plan.etcd_rtts.is_empty() {
        None
    } else {
        Some(etcd_arm::check_installed()?)
    };
    let (set, backing) = setup_devices(&args, plan.max_replicas())?;
    format_devices(&set)?;
    let mut meta = RunMeta::start("exp-commit", args.common.profile);
    meta.devices = set.describe();
    meta.extra = meta_extra(&args, &plan, &backing);
    meta.extra["etcd"] = serde_json::json!(etcd_version);
    let mut out = Outputs::create(&args, !plan.kills.is_empty())?;
    let specs = plan.specs();
    let kill_runs = plan.kills.len() * plan.kill_policies.len();
    let etcd_runs = plan.etcd_rtts.len() * plan.reps as usize;
    let mut progress = Progress::new("exp-commit", (specs.len() + kill_runs + etcd_runs) as u64);
    let ctx = Ctx {
        bin,
        devices: set.paths().to_vec(),
        scratch,
        args,
    };
    for spec in &specs {
        let cpu_before = CpuTimes::now();
        let m = run_one(&ctx, spec).with_context(|| spec.to_string())?;
        let row = row_of(spec, &m, ctx.args.backing);
        let steal = CpuTimes::steal_percent_since(cpu_before)
            .map_or_else(|| "?".into(), |p| format!("{p}%"));
        progress.step(&format!(
            "{spec}: apply_p99={}us extra/write={} steal={steal}",
            row.apply_lag_p99_us,
            row.extra_messages_per_write.unwrap_or(0.0)
        ));
        out.write(&row, &m)?;
    }
    for repetition in 0..plan.reps {
        for &rtt in &plan.etcd_rtts {
            let seed = ctx.args.seed + u64::from(repetition);
            let r = etcd_arm::run(
                rtt,
                ctx.args.jitter_percent / 100.0,
                plan.etcd_writes,
                SPARSE_RATE,
                seed,
            )
            .with_context(|| format!("etcd / rtt {} ms / repetition {repetition}", millis(rtt)))?;
            let spec = RunSpec {
                policy: PolicySpec::Eager,
                cell: Cell {
                    workload: Workload::Poisson,
                    load: Load::Poisson {
                        rate: SPARSE_RATE,
                        writes: plan.etcd_writes,
                    },
                    rate: SPARSE_RATE,
                    rtt,
                    replicas: 3,
                },
                repetition,
            };
            let mut row = row_of(&spec, &r, Backing::Disk);
            row.policy = "etcd";
            row.backing = "etcd";
            row.commit_lag_p99_us = None;
            row.empty_messages = None;
            row.empty_responses = None;
            row.extra_messages_per_write = None;
            row.log_flushes = None;
            row.violations = None;
            progress.step(&format!(
                "etcd rtt={}ms repetition {repetition}: apply_p99={}us",
                millis(rtt),
                row.apply_lag_p99_us
            ));
            out.write(&row, &r)?;
        }
    }
    for &policy in &plan.kill_policies {
        for &scenario in &plan.kills {
            let name = ctx
                .scratch
                .run_name(&format!("kill {} {policy}", scenario.name()));
            let cs = ctx.cluster_spec(policy, 3, Duration::ZERO, ctx.args.seed, &name)?;
            let row = kills::run(cs, scenario, 0, (LOG_LEN, DATA_LEN))
                .with_context(|| format!("kill run {} / {policy}", scenario.name()))?;
            progress.step(&format!(
                "kill {} / {policy}: window_hit={} violations={}",
                row.scenario, row.window_hit, row.violations
            ));
            out.kills
                .as_mut()
                .expect("created with kills")
                .write(&row)?;
        }
    }
    progress.finish();
    meta.finish(&ctx.args.common.out, ctx.args.common.overwrite)?;
    out.report();
    drop(ctx);
    set.teardown()?;
    Ok(())
}
