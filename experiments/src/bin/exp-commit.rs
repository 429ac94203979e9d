//! exp-commit: how long secondaries wait to apply committed entries, and what each commit
//! notification policy costs in messages, under four workloads.
//!
//! Every (policy, workload, replicas, RTT, repetition) runs a fresh cluster: one primary
//! and N-1 secondaries, each a replica loop on its own thread with its own device (log and
//! storage engine through io_uring), talking over real TCP sockets on loopback with the
//! injected one-way delay RTT/2 on every frame. The replicas share one process so that
//! commit and apply times come from one monotonic clock. The workload runs inside the
//! primary's loop (an in-process client with zero think time).
//!
//! Two measurement choices, both flags: every entry is flushed on its own (no group
//! commit, `--group-commit` to batch), so `log_flushes` depends on the writes alone and any
//! flush a notification caused would show; and provisioned devices are backed by tmpfs
//! (`--backing disk` for this machine's disk), because the virtual disk's flush jitter
//! (p99 4 ms, stalls of tens of ms) is larger than the delays being compared.
//!
//! Beside exp-commit.csv, exp-commit-hist.csv keeps each run's histograms: `apply_lag_us`
//! and `commit_lag_us` (from the commit to each secondary's apply / learning of it) and
//! `write_us` (from a write's arrival to its commit).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use blocklab::daemon::{self, MkfsRequest};
use blocklab::dev::{Device, UringEngine};
use blocklab::repl::kv::{put_payload, slots_for};
use blocklab::repl::replica::{
    self, Hooks, PolicySpec, Regions, ReplicaHandle, ReplicaOptions, ReplicaReport,
};
use blocklab::repl::{Entry, NodeId, Stats};
use clap::{Parser, ValueEnum};
use harness::args::{
    millis, or_default, parse_bytes, parse_duration, parse_positive_duration, Repetitions,
};
use harness::cli::repl::parse_policy;
use harness::progress::Progress;
use harness::{CommonArgs, CpuTimes, CsvOut, DeviceSet, HistOut, LatencyHist, RunMeta};
use rand::{rngs::StdRng, Rng, SeedableRng};

const LOG_LEN: u64 = 64 << 20;
const DATA_LEN: u64 = 16 << 20;
/// Writes go to keys `n mod KEYS`: every key the storage engine has a slot for.
const KEYS: u64 = slots_for(DATA_LEN);

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, serde::Serialize)]
#[serde(rename_all = "snake_case")]
#[value(rename_all = "snake_case")]
enum Workload {
    /// One write, then an idle gap G, repeated.
    Single,
    /// A burst of N writes, then an idle gap G, repeated.
    Bursty,
    /// Open-loop Poisson arrivals at each rate of --rates.
    Poisson,
    /// Closed loop at saturation: --depth writes outstanding, a new one as each commits.
    Closed,
}

impl Workload {
    fn name(self) -> &'static str {
        match self {
            Workload::Single => "single",
            Workload::Bursty => "bursty",
            Workload::Poisson => "poisson",
            Workload::Closed => "closed",
        }
    }
}

/// Where provisioned loop devices keep their sparse backing files.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, serde::Serialize)]
#[serde(rename_all = "snake_case")]
#[value(rename_all = "snake_case")]
enum Backing {
    /// tmpfs (`/dev/shm/blocklab`): a flush costs tens of microseconds, like an NVMe
    /// device with power-loss protection.
    Memory,
    /// The file system of `--state-dir` (this machine's virtual disk).
    Disk,
}

/// Where memory-backed loop devices live.
const MEMORY_STATE_DIR: &str = "/dev/shm/blocklab";

/// Repetitions per configuration: quick, full.
const REPETITIONS: Repetitions = Repetitions { quick: 2, full: 5 };

/// Measures how long secondaries take to apply committed writes (apply lag) and what each
/// commit-notification policy costs in messages and flushes, and compares the policies
/// (piggyback, periodic, eager, idle, idle_delayed) under four workloads (see docs/repl.md).
///
/// Profiles (every run a fresh cluster; policies alternate innermost, repetitions
/// outermost): quick: 3 replicas, RTT 0 and 1 ms, Poisson at 200/s, 2 repetitions; full:
/// 3 replicas, RTT 0, 1 and 10 ms, Poisson at 50, 200 and 1000/s, 5 repetitions. Both use a
/// 250 ms idle gap, longer than the longest heartbeat compared (200 ms) plus the largest
/// RTT, so every policy is compared on idle periods.
#[derive(Debug, Parser)]
#[command(name = "exp-commit", version, mut_arg("repetitions", |a| REPETITIONS.help(a)))]
struct Args {
    #[command(flatten)]
    common: CommonArgs,
    /// Policies to compare: piggyback, periodic:H, eager, idle, idle_delayed:D with H and D
    /// durations, e.g. periodic:50ms,idle (default: all, with H ∈ {50ms, 200ms} and
    /// D ∈ {1ms, 10ms}).
    #[arg(long, value_delimiter = ',', value_parser = parse_policy)]
    policies: Vec<PolicySpec>,
    /// Workloads (default: all four).
    #[arg(long, value_delimiter = ',', value_enum)]
    workloads: Vec<Workload>,
    /// Cluster sizes (default quick and full: 3; e.g. 3,5 adds a row of panels per size to
    /// the figures).
    #[arg(long, value_delimiter = ',')]
    replicas: Vec<usize>,
    /// Injected round-trip times, applied as RTT/2 one-way on every frame, e.g. 0s,1ms
    /// (default quick: 0s,1ms; full: 0s,1ms,10ms).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration, value_delimiter = ',')]
    rtt: Vec<Duration>,
    /// Poisson arrival rates per second (default quick: 200; full: 50,200,1000).
    #[arg(long, value_delimiter = ',')]
    rates: Vec<f64>,
    /// Idle gap G of single and bursty, e.g. 300ms (default quick and full: 250ms). Keep it
    /// longer than the longest periodic heartbeat compared plus the RTT: a shorter gap lets
    /// the next write carry the commit before the heartbeat does.
    #[arg(long, value_name = "DURATION", value_parser = parse_positive_duration)]
    gap: Option<Duration>,
    /// Writes per burst in bursty.
    #[arg(long, default_value_t = 10)]
    burst: usize,
    /// Measured writes per run of single (default quick: 16; full: 20: latency percentiles
    /// come from the repetitions' merged histograms, which in full hold 2 secondaries × 20
    /// writes × 5 repetitions = 200 samples per configuration with 3 replicas).
    #[arg(long)]
    single_writes: Option<u64>,
    /// Bursts per run of bursty (default quick: 4; full: 6).
    #[arg(long)]
    bursts: Option<u64>,
    /// How long Poisson arrivals last per run, e.g. 600ms (default quick: 500ms; full: 1s).
    #[arg(long, value_name = "DURATION", value_parser = parse_positive_duration)]
    poisson_duration: Option<Duration>,
    /// Measured writes per run of closed (default quick: 500; full: 2000).
    #[arg(long)]
    closed_writes: Option<u64>,
    /// Writes outstanding in closed.
    #[arg(long, default_value_t = 4)]
    depth: usize,
    /// Size of the value of each write, e.g. 56 or 1K (the key is 8 bytes more).
    #[arg(long, value_parser = parse_bytes, default_value = "56")]
    value_size: u64,
    /// Protocol tick, e.g. 100us.
    #[arg(long, value_name = "DURATION", value_parser = parse_positive_duration, default_value = "100us")]
    tick: Duration,
    /// Group commit: each replica appends everything pending with one flush. Off by
    /// default: every entry is then flushed on its own, so `log_flushes` counts exactly the
    /// writes' flushes and a flush caused by a notification would show; with group commit
    /// the batching follows the timing, which the policies change.
    #[arg(long)]
    group_commit: bool,
    /// Where provisioned loop devices keep their backing files (ignored with --devices and
    /// --files). `memory` (the default) because on a virtual disk a flush takes 0.3 ms at
    /// the median and 4 ms at p99 with stalls of tens of ms, which would drown the
    /// sub-millisecond notification delays being compared; `disk` measures them anyway.
    #[arg(long, value_enum, default_value_t = Backing::Memory)]
    backing: Backing,
    /// Also write OUT/exp-commit-samples.csv: one row per measured write and secondary
    /// with the times (µs, relative to the commit) at which each replica persisted it and
    /// the secondary learned the commit and applied it, for CDFs and for finding where a
    /// tail comes from.
    #[arg(long)]
    samples: bool,
    /// Seed of the Poisson arrivals: repetition r uses seed + r (every policy of a
    /// repetition sees the same arrivals).
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

/// One measured write as one secondary saw it (`--samples`). Times are µs relative to the
/// primary's commit of the write; negative when before it.
#[derive(Debug, serde::Serialize)]
struct Sample {
    policy: &'static str,
    param_ms: f64,
    workload: &'static str,
    replicas: usize,
    rtt_ms: f64,
    repetition: u32,
    index: u64,
    secondary: usize,
    arrival_us: i64,
    primary_persisted_us: i64,
    persisted_us: i64,
    /// The slowest other secondary (empty with one secondary).
    other_persisted_max_us: Option<i64>,
    learned_us: i64,
    applied_us: i64,
}

#[derive(Debug, serde::Serialize)]
struct Row {
    policy: &'static str,
    param_ms: f64,
    workload: &'static str,
    rate_per_s: f64,
    replicas: usize,
    rtt_ms: f64,
    repetition: u32,
    writes: u64,
    apply_lag_p50_us: u64,
    apply_lag_p99_us: u64,
    apply_lag_max_us: u64,
    commit_lag_p99_us: u64,
    extra_messages: u64,
    extra_messages_per_write: f64,
    log_flushes: u64,
    write_p50_us: u64,
    write_p99_us: u64,
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
            repetition: self.repetition,
        }
    }
}

/// What the replicas' hooks record during one run.
#[derive(Debug, Default)]
struct Rec {
    /// Per index (1-based, slot 0 unused): arrival of the write at the primary.
    arrival: Vec<Option<Instant>>,
    commit: Vec<Option<Instant>>,
    /// Per secondary, per index: when it learned the entry is committed / applied it.
    learned: Vec<Vec<Option<Instant>>>,
    applied: Vec<Vec<Option<Instant>>>,
    /// Last measured index, once the workload issued its last measured write.
    measured: Option<u64>,
    first_arrival: Option<Instant>,
    last_arrival: Option<Instant>,
    /// Index of the final (unmeasured) carrier write.
    carrier: Option<u64>,
    empties_at_carrier: Option<u64>,
    /// Per replica (0 = primary): the first index of every log flush, as the replica
    /// reported it.
    flush_starts: Vec<Vec<u64>>,
    /// Per replica (0 = primary), per index: when the replica reported it durable.
    persisted_at: Vec<Vec<Option<Instant>>>,
}

fn set(v: &mut Vec<Option<Instant>>, i: u64, t: Instant) {
    let i = i as usize;
    if v.len() <= i {
        v.resize(i + 1, None);
    }
    if v[i].is_none() {
        v[i] = Some(t);
    }
}

impl Rec {
    fn persisted(&mut self, replica: usize, first: u64, last: u64) {
        let now = Instant::now();
        for i in first..=last {
            set(&mut self.persisted_at[replica], i, now);
        }
        self.flush_starts[replica].push(first);
    }
    /// Whether every replica reported index `m` durable (a log is durable in index order,
    /// so everything before it is too).
    fn all_durable(&self, m: u64) -> bool {
        self.persisted_at
            .iter()
            .all(|p| p.get(m as usize).is_some_and(Option::is_some))
    }
    /// Flushes that wrote a measured entry (those starting at or before the last one;
    /// with group commit one of them may also hold the carrier).
    fn measured_flushes(&self, m: u64) -> u64 {
        self.flush_starts
            .iter()
            .flatten()
            .filter(|&&first| first <= m)
            .count() as u64
    }
}

struct Secondary {
    slot: usize,
    rec: Arc<Mutex<Rec>>,
    learned: u64,
}

impl Hooks for Secondary {
    fn committed(&mut self, commit: u64, now: Instant) {
        let mut r = self.rec.lock().expect("lock");
        for i in self.learned + 1..=commit {
            set(&mut r.learned[self.slot], i, now);
        }
        self.learned = commit;
    }
    fn applied(&mut self, entries: &[Entry], now: Instant) {
        let mut r = self.rec.lock().expect("lock");
        for e in entries {
            set(&mut r.applied[self.slot], e.index, now);
        }
    }
    fn persisted(&mut self, first: u64, last: u64, _flushes: u64) {
        self.rec
            .lock()
            .expect("lock")
            .persisted(self.slot + 1, first, last);
    }
}

/// The workload, inside the primary's loop.
struct Primary {
    rec: Arc<Mutex<Rec>>,
    kind: Workload,
    gap: Duration,
    burst: usize,
    rate: f64,
    depth: usize,
    total: u64,
    duration: Duration,
    value: Vec<u8>,
    rng: StdRng,
    peers: u64,
    connected: u64,
    t0: Option<Instant>,
    issued: u64,
    next_arrival: Option<Instant>,
    /// Scheduled arrival times of proposals not yet given an index.
    queue: std::collections::VecDeque<Instant>,
    committed: u64,
    carrier_proposed: bool,
}

impl Primary {
    fn payload(&self, n: u64) -> Vec<u8> {
        put_payload(n % KEYS, &self.value)
    }
    fn finished_issuing(&self) -> bool {
        match self.kind {
            Workload::Poisson => self.issued > 0 && self.next_arrival.is_none(),
            _ => self.issued >= self.total,
        }
    }
}

impl Primary {
    fn new(args: &Args, spec: &RunSpec, plan: &Plan, rec: Arc<Mutex<Rec>>) -> Primary {
        let sizes = plan.sizes;
        let (total, duration) = match spec.workload {
            Workload::Single => (sizes.single_writes, Duration::ZERO),
            Workload::Bursty => (sizes.bursts * args.burst as u64, Duration::ZERO),
            Workload::Poisson => (u64::MAX, sizes.poisson),
            Workload::Closed => (sizes.closed_writes, Duration::ZERO),
        };
        Primary {
            rec,
            kind: spec.workload,
            gap: plan.gap,
            burst: args.burst.max(1),
            rate: spec.rate,
            depth: args.depth.max(1),
            total,
            duration,
            value: vec![0x5a; args.value_size as usize],
            rng: StdRng::seed_from_u64(args.seed.wrapping_add(spec.repetition as u64)),
            peers: (spec.replicas - 1) as u64,
            connected: 0,
            t0: None,
            issued: 0,
            next_arrival: None,
            queue: Default::default(),
            committed: 0,
            carrier_proposed: false,
        }
    }
    fn issue(&mut self, at: Instant, out: &mut Vec<Vec<u8>>) {
        self.issued += 1;
        out.push(self.payload(self.issued));
        self.queue.push_back(at);
    }
    /// Closed loop: keeps `depth` writes outstanding from `t0` on.
    fn issue_closed(&mut self, now: Instant, t0: Instant, out: &mut Vec<Vec<u8>>) {
        if now < t0 {
            return;
        }
        while self.issued < self.total
            && self.issued - self.committed.min(self.issued) < self.depth as u64
        {
            self.issue(now, out);
        }
    }
    /// Single, bursty and Poisson: every arrival due by `now`, then schedules the next.
    fn issue_scheduled(&mut self, now: Instant, t0: Instant, out: &mut Vec<Vec<u8>>) {
        while let Some(at) = self.next_arrival {
            if at > now {
                break;
            }
            let n = if self.kind == Workload::Bursty {
                self.burst as u64
            } else {
                1
            };
            for _ in 0..n {
                self.issue(at, out);
            }
            self.next_arrival = match self.kind {
                Workload::Poisson => {
                    let u: f64 = self.rng.random_range(f64::EPSILON..1.0);
                    let next = at + Duration::from_secs_f64(-u.ln() / self.rate);
                    (next < t0 + self.duration).then_some(next)
                }
                _ => (self.issued < self.total).then_some(at + self.gap),
            };
        }
    }
    /// Once every measured write committed and a gap passed: the unmeasured carrier
    /// write. Returns when to poll again.
    fn propose_carrier(&mut self, now: Instant, out: &mut Vec<Vec<u8>>) -> Option<Instant> {
        let last = self.rec.lock().expect("lock").last_arrival;
        let carrier_at = last.map(|t| t + self.gap).unwrap_or(now);
        if self.committed >= self.issued && now >= carrier_at {
            self.carrier_proposed = true;
            out.push(self.payload(self.issued + 1));
            self.queue.push_back(now);
            return None;
        }
        Some(carrier_at.max(now + Duration::from_millis(1)))
    }
}

impl Hooks for Primary {
    fn poll(&mut self, now: Instant, out: &mut Vec<Vec<u8>>) -> Option<Instant> {
        if self.connected < self.peers {
            return Some(now + Duration::from_millis(1));
        }
        let t0 = *self.t0.get_or_insert(now + Duration::from_millis(10));
        if self.next_arrival.is_none() && self.issued == 0 {
            self.next_arrival = Some(t0);
        }
        if !self.finished_issuing() {
            match self.kind {
                Workload::Closed => self.issue_closed(now, t0, out),
                _ => self.issue_scheduled(now, t0, out),
            }
            if self.finished_issuing() {
                self.rec.lock().expect("lock").measured = Some(self.issued);
            }
        }
        if self.finished_issuing() && !self.carrier_proposed {
            return self.propose_carrier(now, out);
        }
        if self.carrier_proposed {
            return None;
        }
        match self.kind {
            Workload::Closed => Some(now + Duration::from_millis(5)),
            _ => self.next_arrival,
        }
    }
    fn proposed(&mut self, index: u64, _now: Instant) {
        let at = self.queue.pop_front().expect("one arrival per proposal");
        let mut r = self.rec.lock().expect("lock");
        set(&mut r.arrival, index, at);
        if self.carrier_proposed && self.queue.is_empty() {
            r.carrier = Some(index);
        } else {
            r.first_arrival.get_or_insert(at);
            r.last_arrival = Some(at);
        }
    }
    fn committed(&mut self, commit: u64, now: Instant) {
        let mut r = self.rec.lock().expect("lock");
        for i in self.committed + 1..=commit {
            set(&mut r.commit, i, now);
        }
        self.committed = commit;
    }
    fn peer_connected(&mut self, _peer: NodeId) {
        self.connected += 1;
    }
    fn persisted(&mut self, first: u64, last: u64, _flushes: u64) {
        self.rec.lock().expect("lock").persisted(0, first, last);
    }
    fn loop_done(&mut self, stats: &Stats) {
        if self.carrier_proposed {
            let mut r = self.rec.lock().expect("lock");
            r.empties_at_carrier.get_or_insert(stats.empty_appends);
        }
    }
}

struct RunSpec {
    policy: PolicySpec,
    workload: Workload,
    rate: f64,
    replicas: usize,
    rtt: Duration,
    repetition: u32,
}

impl RunSpec {
    /// The RTT column.
    fn rtt_ms(&self) -> f64 {
        millis(self.rtt)
    }
}

impl std::fmt::Display for RunSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} / {} / {} replicas / rtt {} ms / repetition {}",
            self.policy,
            self.workload.name(),
            self.replicas,
            self.rtt_ms(),
            self.repetition
        )
    }
}

/// Run lengths per workload.
#[derive(Debug, Clone, Copy)]
struct Sizes {
    single_writes: u64,
    bursts: u64,
    poisson: Duration,
    closed_writes: u64,
}

/// What the whole run sweeps, from the flags and the profile.
struct Plan {
    policies: Vec<PolicySpec>,
    workloads: Vec<Workload>,
    replicas: Vec<usize>,
    rtts: Vec<Duration>,
    rates: Vec<f64>,
    gap: Duration,
    sizes: Sizes,
    reps: u32,
}

impl Plan {
    fn new(args: &Args) -> anyhow::Result<Plan> {
        let c = &args.common;
        let default_policies = [
            "piggyback",
            "periodic:50ms",
            "periodic:200ms",
            "eager",
            "idle",
            "idle_delayed:1ms",
            "idle_delayed:10ms",
        ]
        .iter()
        .map(|s| parse_policy(s).expect("valid"))
        .collect();
        let all_workloads = vec![
            Workload::Single,
            Workload::Bursty,
            Workload::Poisson,
            Workload::Closed,
        ];
        let ms = |v: f64| Duration::from_secs_f64(v / 1e3);
        let plan = Plan {
            policies: or_default(&args.policies, default_policies),
            workloads: or_default(&args.workloads, all_workloads),
            replicas: or_default(&args.replicas, vec![3]),
            rtts: or_default(
                &args.rtt,
                c.pick(vec![ms(0.0), ms(1.0)], vec![ms(0.0), ms(1.0), ms(10.0)]),
            ),
            rates: or_default(&args.rates, c.pick(vec![200.0], vec![50.0, 200.0, 1000.0])),
            gap: args.gap.unwrap_or(ms(250.0)),
            sizes: Sizes {
                single_writes: args.single_writes.unwrap_or(c.pick(16, 20)),
                bursts: args.bursts.unwrap_or(c.pick(4, 6)),
                poisson: args
                    .poisson_duration
                    .unwrap_or(c.pick(ms(500.0), ms(1000.0))),
                closed_writes: args.closed_writes.unwrap_or(c.pick(500, 2000)),
            },
            reps: c.repetitions_or(REPETITIONS),
        };
        plan.check()?;
        Ok(plan)
    }
    fn check(&self) -> anyhow::Result<()> {
        if let Some(&r) = self.replicas.iter().find(|&&r| r < 2) {
            bail!("--replicas {r}: a cluster needs a primary and at least one secondary");
        }
        if self.rates.iter().any(|r| !(r.is_finite() && *r > 0.0)) {
            bail!("--rates values must be > 0");
        }
        let s = &self.sizes;
        if s.single_writes == 0 || s.bursts == 0 || s.closed_writes == 0 {
            bail!("--single-writes, --bursts and --closed-writes must be > 0");
        }
        Ok(())
    }
    /// Every run in order: repetitions outermost, policies innermost (alternating, so a
    /// noisy moment hits all alike).
    fn specs(&self) -> Vec<RunSpec> {
        let mut specs = Vec::new();
        for repetition in 0..self.reps {
            for &workload in &self.workloads {
                let rates = if workload == Workload::Poisson {
                    self.rates.clone()
                } else {
                    vec![0.0]
                };
                for &rate in &rates {
                    for &replicas in &self.replicas {
                        for &rtt in &self.rtts {
                            for &policy in &self.policies {
                                specs.push(RunSpec {
                                    policy,
                                    workload,
                                    rate,
                                    replicas,
                                    rtt,
                                    repetition,
                                });
                            }
                        }
                    }
                }
            }
        }
        specs
    }
    /// How long a run's workload is expected to last.
    fn expected(&self, workload: Workload) -> Duration {
        let (gap, s) = (self.gap, self.sizes);
        match workload {
            Workload::Single => gap * (s.single_writes as u32 + 1),
            Workload::Bursty => gap * (s.bursts as u32 + 1),
            Workload::Poisson => s.poisson + gap,
            Workload::Closed => gap,
        }
    }
}

impl Rec {
    fn new(replicas: usize) -> Rec {
        Rec {
            learned: vec![Vec::new(); replicas - 1],
            applied: vec![Vec::new(); replicas - 1],
            flush_starts: vec![Vec::new(); replicas],
            persisted_at: vec![Vec::new(); replicas],
            ..Rec::default()
        }
    }
    /// Whether the run is over: every secondary applied the last measured write (the
    /// carrier's own commit may never reach them, with piggyback: it carries the commit
    /// of every measured write) and every replica has it durable.
    fn finished(&self) -> bool {
        let (Some(_), Some(m)) = (self.carrier, self.measured) else {
            return false;
        };
        self.applied
            .iter()
            .all(|a| a.get(m as usize).is_some_and(|t| t.is_some()))
            && self.empties_at_carrier.is_some()
            && self.all_durable(m)
    }
}

/// Replica `id` of one run: device `id` of the set, the run's policy, tick and delay.
fn replica_options(
    args: &Args,
    set: &DeviceSet,
    spec: &RunSpec,
    id: u32,
    peers: Vec<(u32, std::net::SocketAddr)>,
) -> anyhow::Result<ReplicaOptions> {
    let path = &set.paths()[id as usize];
    let (regions, formatted) = Regions::detect(path, LOG_LEN, DATA_LEN)?;
    if !formatted {
        bail!("{} is not a formatted daemon device", path.display());
    }
    Ok(ReplicaOptions {
        id,
        members: (0..spec.replicas as u32).collect(),
        primary: 0,
        peers,
        listener: std::net::TcpListener::bind("127.0.0.1:0").context("binding a port")?,
        device: path.clone(),
        regions,
        policy: spec.policy,
        tick: args.tick,
        retransmit: Duration::from_millis(1000),
        delay: spec.rtt / 2,
        fresh: true,
        force: true,
        group_commit: args.group_commit,
    })
}

/// The replicas of one run.
struct Cluster {
    primary: ReplicaHandle,
    secondaries: Vec<ReplicaHandle>,
}

impl Cluster {
    /// Starts the secondaries, then the primary, which runs the workload.
    fn start(
        args: &Args,
        set: &DeviceSet,
        spec: &RunSpec,
        plan: &Plan,
        rec: &Arc<Mutex<Rec>>,
    ) -> anyhow::Result<Cluster> {
        let mut secondaries = Vec::new();
        let mut peers = Vec::new();
        for id in 1..spec.replicas as u32 {
            let hooks = Secondary {
                slot: id as usize - 1,
                rec: rec.clone(),
                learned: 0,
            };
            let h = replica::spawn(
                replica_options(args, set, spec, id, Vec::new())?,
                Box::new(hooks),
            )
            .with_context(|| format!("starting secondary {id}"))?;
            peers.push((id, h.addr()));
            secondaries.push(h);
        }
        let hook = Primary::new(args, spec, plan, rec.clone());
        let primary = replica::spawn(replica_options(args, set, spec, 0, peers)?, Box::new(hook))
            .context("starting the primary")?;
        Ok(Cluster {
            primary,
            secondaries,
        })
    }
    /// Waits until every secondary applied the carrier (everything measured is then
    /// applied), a replica stopped, or `expected` plus two minutes passed.
    fn await_end(&self, rec: &Mutex<Rec>, expected: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + expected + Duration::from_secs(120);
        loop {
            if rec.lock().expect("lock").finished() {
                return Ok(());
            }
            if self.primary.is_finished() || self.secondaries.iter().any(|s| s.is_finished()) {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "run did not finish within {:?}",
                    expected + Duration::from_secs(120)
                );
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    /// Stops every replica; the primary's report.
    fn stop(self) -> anyhow::Result<ReplicaReport> {
        let report = self.primary.stop().context("primary")?;
        for (i, s) in self.secondaries.into_iter().enumerate() {
            s.stop().with_context(|| format!("secondary {}", i + 1))?;
        }
        Ok(report)
    }
}

fn run_one(
    args: &Args,
    set: &DeviceSet,
    spec: &RunSpec,
    plan: &Plan,
) -> anyhow::Result<(Row, Latencies)> {
    let rec = Arc::new(Mutex::new(Rec::new(spec.replicas)));
    let cluster = Cluster::start(args, set, spec, plan, &rec)?;
    cluster.await_end(&rec, plan.expected(spec.workload))?;
    let report = cluster.stop()?;
    let r = rec.lock().expect("lock");
    measure(&r, spec, plan.gap, &report, args.samples)
}

/// Signed µs from the commit `c` to `t`.
fn rel(t: Instant, c: Instant) -> i64 {
    if t >= c {
        (t - c).as_micros() as i64
    } else {
        -((c - t).as_micros() as i64)
    }
}

/// The latencies of one run's measured writes.
#[derive(Default)]
struct Latencies {
    /// From commit to each secondary's apply.
    apply: LatencyHist,
    /// From commit to each secondary learning it.
    learn: LatencyHist,
    /// From arrival to commit.
    write: LatencyHist,
    samples: Vec<Sample>,
}

impl Rec {
    /// When `replica` (0 = primary) reported write `i` durable.
    fn persisted_of(&self, replica: usize, i: usize) -> anyhow::Result<Instant> {
        self.persisted_at[replica]
            .get(i)
            .copied()
            .flatten()
            .with_context(|| format!("replica {replica} never reported write {i} durable"))
    }
    /// Write `i` as secondary `s` saw it, relative to its commit `c`.
    fn sample(&self, spec: &RunSpec, i: usize, s: usize, c: Instant) -> anyhow::Result<Sample> {
        let mut other = None;
        for o in (0..self.learned.len()).filter(|&o| o != s) {
            other = other.max(Some(rel(self.persisted_of(o + 1, i)?, c)));
        }
        let arrival = self.arrival[i].context("no arrival")?;
        let a = self.applied[s][i].context("measured write never applied")?;
        let l = self.learned[s][i].context("commit never learned")?;
        Ok(Sample {
            policy: spec.policy.name(),
            param_ms: spec.policy.param_ms(),
            workload: spec.workload.name(),
            replicas: spec.replicas,
            rtt_ms: spec.rtt_ms(),
            repetition: spec.repetition,
            index: i as u64,
            secondary: s + 1,
            arrival_us: rel(arrival, c),
            primary_persisted_us: rel(self.persisted_of(0, i)?, c),
            persisted_us: rel(self.persisted_of(s + 1, i)?, c),
            other_persisted_max_us: other,
            learned_us: rel(l, c),
            applied_us: rel(a, c),
        })
    }
    /// The latencies of writes 1..=measured (and their samples, with `samples`).
    fn latencies(&self, spec: &RunSpec, measured: u64, samples: bool) -> anyhow::Result<Latencies> {
        let mut out = Latencies::default();
        for i in 1..=measured as usize {
            let c = self.commit[i].context("measured write never committed")?;
            let arrival = self.arrival[i].context("no arrival")?;
            out.write.record_us(c.saturating_duration_since(arrival));
            for s in 0..self.learned.len() {
                let a = self.applied[s][i].context("measured write never applied")?;
                out.apply.record_us(a.saturating_duration_since(c));
                let l = self.learned[s][i].context("commit never learned")?;
                out.learn.record_us(l.saturating_duration_since(c));
                if samples {
                    out.samples.push(self.sample(spec, i, s, c)?);
                }
            }
        }
        Ok(out)
    }
    /// The achieved arrival rate of writes 1..=measured.
    fn rate(&self, spec: &RunSpec, measured: u64, gap: Duration) -> f64 {
        let active = match (self.first_arrival, self.last_arrival) {
            (Some(a), Some(b)) if b > a => (b - a).as_secs_f64(),
            _ => 0.0,
        };
        match spec.workload {
            Workload::Poisson => spec.rate,
            Workload::Closed => {
                let end = self.commit[measured as usize].expect("checked");
                measured as f64 / (end - self.first_arrival.expect("set")).as_secs_f64()
            }
            _ if active > 0.0 => measured as f64 / (active + gap.as_secs_f64()),
            _ => 0.0,
        }
    }
}

/// The row and the latencies (with samples) of one finished run.
fn measure(
    r: &Rec,
    spec: &RunSpec,
    gap: Duration,
    report: &ReplicaReport,
    samples: bool,
) -> anyhow::Result<(Row, Latencies)> {
    let measured = r.measured.context("workload never finished")?;
    let lat = r.latencies(spec, measured, samples)?;
    let extra = r.empties_at_carrier.unwrap_or(report.stats.empty_appends);
    let rate = r.rate(spec, measured, gap);
    let a = lat.apply.percentiles();
    let w = lat.write.percentiles();
    let row = Row {
        policy: spec.policy.name(),
        param_ms: spec.policy.param_ms(),
        workload: spec.workload.name(),
        rate_per_s: (rate * 100.0).round() / 100.0,
        replicas: spec.replicas,
        rtt_ms: spec.rtt_ms(),
        repetition: spec.repetition,
        writes: measured,
        apply_lag_p50_us: a.p50,
        apply_lag_p99_us: a.p99,
        apply_lag_max_us: a.max,
        commit_lag_p99_us: lat.learn.percentiles().p99,
        extra_messages: extra,
        extra_messages_per_write: (extra as f64 / measured as f64 * 10_000.0).round() / 10_000.0,
        log_flushes: r.measured_flushes(measured),
        write_p50_us: w.p50,
        write_p99_us: w.p99,
    };
    Ok((row, lat))
}

fn main() -> std::process::ExitCode {
    harness::exit_on_error("exp-commit", run(Args::parse()))
}

/// The device set: `max_replicas` devices, provisioned ones on tmpfs with `--backing
/// memory`; and how they are backed, for meta.json.
fn setup_devices(args: &Args, max_replicas: usize) -> anyhow::Result<(DeviceSet, String)> {
    let c = &args.common;
    let mut common = c.clone();
    if args.backing == Backing::Memory {
        if !std::path::Path::new("/dev/shm").is_dir() {
            bail!("--backing memory needs tmpfs at /dev/shm, which this machine lacks; pass --backing disk");
        }
        common.state_dir = MEMORY_STATE_DIR.into();
    }
    let set = DeviceSet::setup(&common, max_replicas, 96 << 20, 128 << 20)?;
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
/// lives in its log region, the storage engine at the start of its data region. Every
/// run starts a fresh log and store in these regions: they are written once now so no
/// run pays for filling the sparse backing file.
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
    let s = &plan.sizes;
    serde_json::json!({
        "gap_ms": millis(plan.gap),
        "burst": args.burst,
        "depth": args.depth,
        "value_bytes": args.value_size,
        "tick_us": args.tick.as_secs_f64() * 1e6,
        "seed": args.seed,
        "group_commit": args.group_commit,
        "backing": backing,
        "preconditioned": "log and data regions written once before the first run",
        "single_writes": s.single_writes, "bursts": s.bursts, "poisson_secs": s.poisson.as_secs_f64(), "closed_writes": s.closed_writes,
        "replicas_in_one_process": "replicas are threads of this process talking over loopback TCP, so commit and apply times share one monotonic clock",
        "log_region_bytes": LOG_LEN, "data_region_bytes": DATA_LEN,
        "devices_formatted": "core::daemon::mkfs; log in the format's log region, storage engine at the start of its data region",
    })
}

/// exp-commit.csv, exp-commit-hist.csv and, with `--samples`, exp-commit-samples.csv.
struct Outputs {
    rows: CsvOut<Row>,
    hists: HistOut<HistKey>,
    samples: Option<CsvOut<Sample>>,
}

impl Outputs {
    fn create(args: &Args) -> anyhow::Result<Outputs> {
        let c = &args.common;
        let rows = CsvOut::<Row>::create(&c.out, "exp-commit.csv", c.overwrite)?;
        let hists = HistOut::create(&c.out, "exp-commit", c.overwrite)?;
        let samples = if args.samples {
            Some(CsvOut::<Sample>::create(
                &c.out,
                "exp-commit-samples.csv",
                c.overwrite,
            )?)
        } else {
            None
        };
        Ok(Outputs {
            rows,
            hists,
            samples,
        })
    }
    fn write(&mut self, row: &Row, lat: &Latencies) -> anyhow::Result<()> {
        self.rows.write(row)?;
        self.hists.write(
            &row.hist_key(),
            &[
                ("apply_lag_us", &lat.apply),
                ("commit_lag_us", &lat.learn),
                ("write_us", &lat.write),
            ],
        )?;
        if let Some(out) = self.samples.as_mut() {
            out.write_all(&lat.samples)?;
        }
        Ok(())
    }
    fn report(&self) {
        eprintln!("wrote {}", self.rows.path().display());
        eprintln!("wrote {}", self.hists.path().display());
        if let Some(out) = &self.samples {
            eprintln!("wrote {}", out.path().display());
        }
    }
}

fn run(args: Args) -> anyhow::Result<()> {
    let c = &args.common;
    let plan = Plan::new(&args)?;
    let max_replicas = *plan.replicas.iter().max().expect("non-empty");
    let (set, backing) = setup_devices(&args, max_replicas)?;
    format_devices(&set)?;
    let mut meta = RunMeta::start("exp-commit", c.profile);
    meta.devices = set.describe();
    meta.extra = meta_extra(&args, &plan, &backing);
    let mut out = Outputs::create(&args)?;
    let specs = plan.specs();
    let mut progress = Progress::new("exp-commit", specs.len() as u64);
    for spec in &specs {
        let cpu_before = CpuTimes::now();
        let (row, lat) = run_one(&args, &set, spec, &plan).with_context(|| spec.to_string())?;
        // The VM's steal time during the run: multi-ms stalls that decide a p99 come with it.
        let steal = CpuTimes::steal_percent_since(cpu_before)
            .map_or_else(|| "?".into(), |p| format!("{p}%"));
        progress.step(&format!(
            "{} {} rtt={}ms apply_p99={}us extra/write={} steal={steal}",
            spec.policy,
            spec.workload.name(),
            spec.rtt_ms(),
            row.apply_lag_p99_us,
            row.extra_messages_per_write
        ));
        out.write(&row, &lat)?;
    }
    progress.finish();
    meta.finish(&c.out, c.overwrite)?;
    out.report();
    set.teardown()?;
    Ok(())
}
