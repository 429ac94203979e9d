//! exp-failover: a client runs a stream of create/copy/delete operations against a
//! three-node management cluster while the harness SIGKILLs the node serving it (the VIP
//! holder; in `client_retry`, the node the client talks to) at random points — in the
//! middle of copies too — restarts it, and repeats.
//!
//! Per (mode, vip backend, heartbeat, repetition) and per operation in flight at the kill
//! (`create`, `copy`, `delete`, and `all`), one CSV row:
//! `mode,vip_backend,heartbeat_ms,operation,repetition,kills,ops,
//! delivery_after_kill_p50_ms,delivery_after_kill_p99_ms,vip_move_p50_ms,lost_results,
//! duplicate_executions,reexecuted_bytes`.
//!
//! * delivery_after_kill: from the kill to the next result the client receives.
//! * vip_move: from the kill to the next node's `vip_acquired` event (vip_handoff only).
//! * lost_results: logical operations whose result the client never got right (gave up, or
//!   got an error for an operation that should have succeeded — e.g. "already exists" from
//!   a re-issued create whose first execution had succeeded).
//! * duplicate_executions: from the block service's journal: successful executions of one
//!   logical operation beyond the first.
//! * reexecuted_bytes: bytes copied (journal `done` and `aborted` records) beyond one copy
//!   of each logical copy operation.
//!
//! A sidecar `exp-failover-kills.csv` has one row per kill
//! (`mode,vip_backend,heartbeat_ms,repetition,kill,operation,delivery_ms,vip_move_ms`), and
//! `exp-failover-hist.csv` each row's histograms (`delivery_after_kill_us`, `vip_move_us`).
//!
//! Before the kill runs, a copy-throughput measurement on the same devices
//! (`exp-failover-copy.csv`, one row per repetition:
//! `repetition,copy_mib,chunk_kib,depth,seconds,mib_per_s,fio_read_mib_per_s,fio_write_mib_per_s`):
//! the volume store copies a written `--copy-bench-size` volume from one device to the other
//! (the service's pipeline, 1 MiB × 8 in flight, no rate cap), and fio reads the source
//! device and writes the destination device sequentially with the same block size and
//! queue depth (io_uring, O_DIRECT; columns empty when fio is not installed).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use blocklab::failover::client::Client;
use blocklab::failover::journal::{read_records, Record};
use blocklab::failover::wire::{Op, OpResult};
use blocklab::volume::{StoreConfig, VolumeStore};
use clap::Parser;
use harness::args::{
    millis, or_default, parse_bytes, parse_positive_duration, parse_size, parse_whole_ms,
    Repetitions,
};
use harness::cli::failover::cluster::{enter_netns, unix_us, Cluster, ClusterSpec, Mode, VipKind};
use harness::progress::Progress;
use harness::{CommonArgs, CsvOut, DeviceSet, HistOut, LatencyHist, RunMeta};
use rand::Rng;

const MIB: u64 = 1 << 20;

/// Repetitions per configuration: quick, full.
const REPETITIONS: Repetitions = Repetitions { quick: 2, full: 5 };

/// Measures result delivery after a SIGKILL of the serving management node, VIP move time,
/// lost results, duplicate executions and re-executed bytes, and compares VIP failover of
/// the management service (vip_handoff) with client retry (client_retry). Writes
/// OUT/exp-failover.csv, exp-failover-kills.csv and exp-failover-copy.csv.
#[derive(Debug, Parser)]
#[command(name = "exp-failover", version, mut_arg("repetitions", |a| REPETITIONS.help(a)))]
struct Args {
    #[command(flatten)]
    common: CommonArgs,
    /// Modes to compare (alternating within the run): vip_handoff, client_retry.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "vip_handoff,client_retry"
    )]
    modes: Vec<Mode>,
    /// VIP backends: loopback, netns (netns needs root; skipped with a note otherwise).
    /// Default: loopback,netns as root, loopback otherwise.
    #[arg(long, value_delimiter = ',')]
    backends: Vec<VipKind>,
    /// Heartbeat periods, whole milliseconds, e.g. 50ms,100ms (default: quick 100ms; full
    /// 50ms,100ms,200ms).
    #[arg(long, value_name = "DURATION", value_parser = parse_whole_ms, value_delimiter = ',')]
    heartbeats: Vec<Duration>,
    /// Kills per configuration and repetition (default: quick 10, full 10; full's 5
    /// repetitions make 50 kills per configuration).
    #[arg(long)]
    kills: Option<usize>,
    /// Size of each volume, e.g. 16M (default: quick 16M, full 64M).
    #[arg(long, value_parser = parse_size)]
    volume_size: Option<u64>,
    /// Copy throughput cap of the block service, bytes per second, e.g. 128M for 128 MiB/s,
    /// so copies last long enough to be killed in the middle of (default: quick 64M, full
    /// 128M; 0 = device speed).
    #[arg(long, value_parser = parse_bytes)]
    copy_rate: Option<u64>,
    /// vip_handoff client: re-send the same operation id after this long without an
    /// answer, e.g. 500ms (cheap: the journal makes re-sends idempotent).
    #[arg(long, value_name = "DURATION", value_parser = parse_positive_duration, default_value = "500ms")]
    resend: Duration,
    /// client_retry client: give up on a request after this long without an answer and
    /// issue a new one, e.g. 2s (must exceed the longest operation, or copies re-run
    /// needlessly).
    #[arg(long, value_name = "DURATION", value_parser = parse_positive_duration, default_value = "2s")]
    retry_timeout: Duration,
    /// The `blocklab` binary (default: next to this one).
    #[arg(long)]
    blocklab_bin: Option<PathBuf>,
    /// Seed of the random kill points: repetition r uses seed + r (every configuration of a
    /// repetition gets the same kill points).
    #[arg(long, default_value_t = 7)]
    seed: u64,
    /// Size of the copy-throughput measurement's volume, whole MiB, e.g. 256M (default:
    /// quick 256M, full 1G; 0 = skip it).
    #[arg(long, value_parser = parse_bytes)]
    copy_bench_size: Option<u64>,
    /// The fio binary for the copy measurement's device reference (skipped with a note if
    /// it cannot be run).
    #[arg(long, default_value = "fio")]
    fio: String,
}

/// One copy-throughput measurement (`exp-failover-copy.csv`).
#[derive(Debug, serde::Serialize)]
struct CopyRow {
    repetition: u32,
    copy_mib: u64,
    chunk_kib: u64,
    depth: usize,
    seconds: f64,
    mib_per_s: f64,
    fio_read_mib_per_s: Option<f64>,
    fio_write_mib_per_s: Option<f64>,
}

#[derive(Debug, serde::Serialize)]
struct Row {
    mode: String,
    vip_backend: String,
    heartbeat_ms: u64,
    operation: String,
    repetition: u32,
    kills: u64,
    ops: u64,
    delivery_after_kill_p50_ms: f64,
    delivery_after_kill_p99_ms: f64,
    vip_move_p50_ms: Option<f64>,
    lost_results: u64,
    duplicate_executions: u64,
    reexecuted_bytes: u64,
}

/// A row's configuration columns: the key of its histograms in exp-failover-hist.csv.
#[derive(Debug, Clone, serde::Serialize)]
struct HistKey {
    mode: String,
    vip_backend: String,
    heartbeat_ms: u64,
    operation: String,
    repetition: u32,
}

impl Row {
    fn hist_key(&self) -> HistKey {
        HistKey {
            mode: self.mode.clone(),
            vip_backend: self.vip_backend.clone(),
            heartbeat_ms: self.heartbeat_ms,
            operation: self.operation.clone(),
            repetition: self.repetition,
        }
    }
}

/// One kill (sidecar `exp-failover-kills.csv`, for the distributions).
#[derive(Debug, serde::Serialize)]
struct KillRow {
    mode: String,
    vip_backend: String,
    heartbeat_ms: u64,
    repetition: u32,
    kill: u64,
    operation: String,
    delivery_ms: Option<f64>,
    vip_move_ms: Option<f64>,
}

/// One logical operation as the client saw it.
#[derive(Debug, Clone)]
struct Done {
    kind: &'static str,
    end_us: u128,
    correct: bool,
}

#[derive(Debug, Clone, Copy)]
struct Config {
    mode: Mode,
    backend: VipKind,
    heartbeat: Duration,
}

impl Config {
    /// The heartbeat column (whole ms: `--heartbeats` takes whole milliseconds only).
    fn heartbeat_ms(&self) -> u64 {
        self.heartbeat.as_millis() as u64
    }
}

/// What the client thread shares with the killer.
#[derive(Default)]
struct Shared {
    /// Kind of the operation in flight (None between operations).
    in_flight: Mutex<Option<&'static str>>,
    done: Mutex<Vec<Done>>,
    stop: AtomicBool,
    /// client_retry: index of the node the client currently talks to.
    target: AtomicUsize,
}

fn workload(i: u64, size: u64) -> Op {
    let k = i / 4;
    match i % 4 {
        0 => Op::Create {
            name: format!("a{k}"),
            size,
        },
        1 => Op::Copy {
            src: format!("a{k}"),
            dst: format!("b{k}"),
        },
        2 => Op::Delete {
            name: format!("a{k}"),
        },
        _ => Op::Delete {
            name: format!("b{k}"),
        },
    }
}

/// What the client thread needs.
struct ClientSpec {
    mode: Mode,
    vip: std::net::SocketAddr,
    nodes: Vec<std::net::SocketAddr>,
    /// The network namespace the client runs in (netns backend).
    netns: Option<String>,
    /// Prefix of the operations' tags.
    run: String,
    size: u64,
    resend: Duration,
    retry_timeout: Duration,
}

/// Runs the workload until told to stop, recording each operation's end and whether it
/// got its result.
fn client_loop(sh: Arc<Shared>, spec: ClientSpec) -> anyhow::Result<()> {
    if let Some(ns) = &spec.netns {
        enter_netns(ns)?;
    }
    let mut vip_client = Client::new(vec![spec.vip]);
    vip_client.resend_after = spec.resend;
    vip_client.give_up = Duration::from_secs(30);
    let mut retry_client = Client::new(spec.nodes);
    retry_client.resend_after = spec.retry_timeout;
    retry_client.give_up = Duration::from_secs(30);
    let mut i = 0u64;
    while !sh.stop.load(Ordering::Relaxed) {
        let op = workload(i, spec.size);
        let tag = format!("{}-{i}", spec.run);
        *sh.in_flight.lock().unwrap() = Some(op.kind());
        let res = match spec.mode {
            Mode::VipHandoff => vip_client
                .call(&tag, &op, Some(tag.clone()))
                .map(|(r, _)| r),
            Mode::ClientRetry => {
                let mut next = sh.target.load(Ordering::Relaxed);
                let r = retry_client.call_retry(&tag, &op, &mut next);
                sh.target.store(next, Ordering::Relaxed);
                r.map(|(r, _)| r)
            }
        };
        let correct = matches!(
            (&op, &res),
            (Op::Create { .. }, Ok(OpResult::Created { .. }))
                | (Op::Copy { .. }, Ok(OpResult::Copied { .. }))
                | (Op::Delete { .. }, Ok(OpResult::Deleted { .. }))
        );
        if !correct {
            eprintln!("note: operation {tag} ({op:?}) did not get its result: {res:?}");
        }
        let end_us = unix_us();
        *sh.in_flight.lock().unwrap() = None;
        sh.done.lock().unwrap().push(Done {
            kind: op.kind(),
            end_us,
            correct,
        });
        i += 1;
    }
    Ok(())
}

struct KillRec {
    kind: &'static str,
    delivery_us: Option<u128>,
    vip_move_us: Option<u128>,
}

/// The settings every configuration runs with.
struct Settings {
    /// The `blocklab` binary the nodes run.
    bin: PathBuf,
    kills: usize,
    /// Bytes of each volume.
    size: u64,
    /// Bytes per second cap of copies (0: none).
    copy_rate: u64,
    resend: Duration,
    retry_timeout: Duration,
}

/// The CSVs every configuration writes rows to.
struct Outputs {
    rows: CsvOut<Row>,
    kills: CsvOut<KillRow>,
    hists: HistOut<HistKey>,
}

/// Polls `f` every 2 ms until it returns a value or `timeout` passes.
fn poll_for<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() > deadline {
            return None;
        }
        thread::sleep(Duration::from_millis(2));
    }
}

/// One configuration's cluster and the client running against it.
struct Run<'a> {
    cfg: Config,
    rep: u32,
    settings: &'a Settings,
    cluster: Cluster,
    sh: Arc<Shared>,
}

impl Run<'_> {
    /// Starts the three nodes in `dir` and waits until they serve.
    fn start_cluster(
        set: &DeviceSet,
        cfg: Config,
        settings: &Settings,
        dir: &Path,
    ) -> anyhow::Result<Cluster> {
        let spec = ClusterSpec {
            bin: settings.bin.clone(),
            dir: dir.join("cluster"),
            devices: set.paths().to_vec(),
            // The devices were provisioned for this run (or given with --force): earlier
            // configurations' volumes are ours to overwrite.
            force: true,
            nodes: 3,
            mode: cfg.mode,
            heartbeat: cfg.heartbeat,
            backend: cfg.backend,
            copy_rate: settings.copy_rate,
            journal: None,
            service_args: Vec::new(),
        };
        let cluster = Cluster::start(spec).context("starting the cluster")?;
        if cfg.mode == Mode::VipHandoff {
            cluster.wait_holder(None, Duration::from_secs(30))?;
        } else {
            cluster.wait_event_from_all("listening", Duration::from_secs(30))?;
        }
        Ok(cluster)
    }
    /// Starts the client thread.
    fn start_client(&self) -> thread::JoinHandle<anyhow::Result<()>> {
        let spec = ClientSpec {
            mode: self.cfg.mode,
            vip: self.cluster.vip,
            nodes: self.cluster.node_addrs.clone(),
            netns: self.cluster.net.as_ref().map(|n| n.client.clone()),
            run: format!("r{}{}", self.rep, unix_us() % 100000),
            size: self.settings.size,
            resend: self.settings.resend,
            retry_timeout: self.settings.retry_timeout,
        };
        let sh = self.sh.clone();
        thread::spawn(move || client_loop(sh, spec))
    }
    /// Kill `k`: at a random point, SIGKILLs the serving node, waits for the client's
    /// next result and (vip_handoff) the VIP's move, restarts the node and lets it settle.
    fn kill_once(
        &mut self,
        k: usize,
        rng: &mut rand::rngs::StdRng,
        prog: &mut Progress,
    ) -> anyhow::Result<KillRec> {
        let (cfg, settings) = (self.cfg, self.settings);
        // A random point: 50..(copy time + 400) ms into the stream.
        let copy_ms = (settings.size * 1000)
            .checked_div(settings.copy_rate)
            .unwrap_or(50);
        let wait = rng.random_range(50..(copy_ms + 400));
        thread::sleep(Duration::from_millis(wait));
        let victim = match cfg.mode {
            Mode::VipHandoff => self.cluster.wait_holder(None, Duration::from_secs(30))?,
            Mode::ClientRetry => self.sh.target.load(Ordering::Relaxed) % 3,
        };
        let kind = self.sh.in_flight.lock().unwrap().unwrap_or("idle");
        let t_kill = self.cluster.kill_node(victim)?;
        // Delivery: the first result the client receives after the kill.
        let delivered = poll_for(Duration::from_secs(40), || {
            let d = self.sh.done.lock().unwrap();
            d.iter()
                .find(|x| x.end_us >= t_kill)
                .map(|x| (x.end_us - t_kill, x.kind))
        });
        let delivery = delivered.map(|(d, _)| d);
        let kind = match (kind, delivered) {
            ("idle", Some((_, next_kind))) => next_kind,
            _ => kind,
        };
        let vip_move = match cfg.mode {
            Mode::VipHandoff => poll_for(Duration::from_secs(30), || {
                self.cluster
                    .acquisition_after(t_kill)
                    .map(|e| e.unix_us - t_kill)
            }),
            Mode::ClientRetry => None,
        };
        self.cluster.start_node(victim)?;
        // Long enough for the restarted node to be heard by its peers before the next kill.
        thread::sleep(cfg.heartbeat * 3 + Duration::from_millis(200));
        prog.step(&format!(
            "{} {} hb={}ms rep {}: kill {}/{} during {kind}: delivered after {}",
            cfg.mode.name(),
            cfg.backend.name(),
            cfg.heartbeat_ms(),
            self.rep,
            k + 1,
            settings.kills,
            delivery.map_or("never".into(), |d| format!("{:.0} ms", d as f64 / 1000.0))
        ));
        Ok(KillRec {
            kind,
            delivery_us: delivery,
            vip_move_us: vip_move,
        })
    }
}

/// The journal per logical operation (tag).
#[derive(Default)]
struct Accounting {
    /// op_id → tag.
    op_tag: HashMap<String, String>,
    /// op_id → kind.
    op_kind: HashMap<String, &'static str>,
    /// tag → successful executions.
    ok_execs: HashMap<String, u64>,
    /// tag → bytes copied (done and aborted).
    bytes_by_tag: HashMap<String, u64>,
}

impl Accounting {
    fn of(journal: &[Record]) -> Accounting {
        let mut a = Accounting::default();
        for r in journal {
            match r {
                Record::Started { op_id, op, tag, .. } => {
                    let t = tag.clone().unwrap_or_else(|| op_id.clone());
                    a.op_tag.insert(op_id.clone(), t);
                    a.op_kind.insert(op_id.clone(), op.kind());
                }
                Record::Done {
                    op_id,
                    result,
                    bytes,
                } => {
                    if let Some(t) = a.op_tag.get(op_id) {
                        if result.is_ok() {
                            *a.ok_execs.entry(t.clone()).or_default() += 1;
                        }
                        *a.bytes_by_tag.entry(t.clone()).or_default() += bytes;
                    }
                }
                Record::Aborted { op_id, bytes } => {
                    if let Some(t) = a.op_tag.get(op_id) {
                        *a.bytes_by_tag.entry(t.clone()).or_default() += bytes;
                    }
                }
                Record::Epoch { .. } => {}
            }
        }
        a
    }
    /// tag → kind.
    fn tag_kind(&self) -> HashMap<&String, &'static str> {
        self.op_tag
            .iter()
            .map(|(id, t)| (t, self.op_kind.get(id).copied().unwrap_or("list")))
            .collect()
    }
    /// Successful executions beyond the first, of the operations `sel` selects.
    fn duplicates(&self, tag_kind: &HashMap<&String, &str>, sel: impl Fn(&str) -> bool) -> u64 {
        self.ok_execs
            .iter()
            .filter(|(t, _)| tag_kind.get(t).is_some_and(|k| sel(k)))
            .map(|(_, n)| n.saturating_sub(1))
            .sum()
    }
    /// Bytes copied beyond one copy of each successful copy `sel` selects.
    fn reexecuted_bytes(
        &self,
        tag_kind: &HashMap<&String, &str>,
        sel: impl Fn(&str) -> bool,
        size: u64,
    ) -> u64 {
        let mut reexec = 0u64;
        for (t, b) in &self.bytes_by_tag {
            if tag_kind.get(t).is_some_and(|k| *k == "copy" && sel(k)) {
                let once = if self.ok_execs.get(t).copied().unwrap_or(0) > 0 {
                    size
                } else {
                    0
                };
                reexec += b.saturating_sub(once);
            }
        }
        reexec
    }
}

/// The row of one `operation` (`create`, `copy`, `delete` or `all`), and its histograms
/// (µs) of delivery after a kill and of the VIP's move.
fn operation_row(
    operation: &str,
    run: (Config, u32, u64),
    recs: &[KillRec],
    done: &[Done],
    acct: &Accounting,
) -> (Row, LatencyHist, LatencyHist) {
    let (cfg, rep, size) = run;
    let sel = |k: &str| operation == "all" || k == operation;
    let tag_kind = acct.tag_kind();
    let mut delivery = LatencyHist::new();
    let mut moves = LatencyHist::new();
    let mut nk = 0u64;
    let mut undelivered = 0u64;
    for r in recs.iter().filter(|r| sel(r.kind)) {
        nk += 1;
        match r.delivery_us {
            Some(d) => delivery.record(d as u64),
            None => undelivered += 1,
        }
        if let Some(m) = r.vip_move_us {
            moves.record(m as u64);
        }
    }
    let lost = done.iter().filter(|d| sel(d.kind) && !d.correct).count() as u64;
    let p = delivery.percentiles();
    let row = Row {
        mode: cfg.mode.name().into(),
        vip_backend: cfg.backend.name().into(),
        heartbeat_ms: cfg.heartbeat_ms(),
        operation: operation.into(),
        repetition: rep,
        kills: nk,
        ops: done.iter().filter(|d| sel(d.kind)).count() as u64,
        delivery_after_kill_p50_ms: p.p50 as f64 / 1000.0,
        delivery_after_kill_p99_ms: p.p99 as f64 / 1000.0,
        vip_move_p50_ms: (!moves.is_empty()).then(|| moves.percentiles().p50 as f64 / 1000.0),
        lost_results: lost + undelivered,
        duplicate_executions: acct.duplicates(&tag_kind, sel),
        reexecuted_bytes: acct.reexecuted_bytes(&tag_kind, sel, size),
    };
    (row, delivery, moves)
}

/// Writes the kill rows, then one row per operation kind and `all`.
fn write_rows(
    out: &mut Outputs,
    run: (Config, u32, u64),
    recs: &[KillRec],
    done: &[Done],
    journal: &[Record],
) -> anyhow::Result<()> {
    let (cfg, rep, _) = run;
    let acct = Accounting::of(journal);
    for (k, r) in recs.iter().enumerate() {
        out.kills.write(&KillRow {
            mode: cfg.mode.name().into(),
            vip_backend: cfg.backend.name().into(),
            heartbeat_ms: cfg.heartbeat_ms(),
            repetition: rep,
            kill: k as u64,
            operation: r.kind.into(),
            delivery_ms: r.delivery_us.map(|d| d as f64 / 1000.0),
            vip_move_ms: r.vip_move_us.map(|d| d as f64 / 1000.0),
        })?;
    }
    for operation in ["create", "copy", "delete", "all"] {
        let (row, delivery, moves) = operation_row(operation, run, recs, done, &acct);
        out.rows.write(&row)?;
        out.hists.write(
            &row.hist_key(),
            &[
                ("delivery_after_kill_us", &delivery),
                ("vip_move_us", &moves),
            ],
        )?;
    }
    Ok(())
}

/// One configuration and repetition: the cluster, the client, `kills` kills, the rows.
fn run_config(
    set: &DeviceSet,
    cfg: Config,
    rep: u32,
    settings: &Settings,
    rng: &mut rand::rngs::StdRng,
    prog: &mut Progress,
    out: &mut Outputs,
) -> anyhow::Result<()> {
    let dir = tempfile::Builder::new()
        .prefix("exp-failover-")
        .tempdir_in("/var/tmp")?;
    let mut run = Run {
        cfg,
        rep,
        settings,
        cluster: Run::start_cluster(set, cfg, settings, dir.path())?,
        sh: Arc::new(Shared::default()),
    };
    let client = run.start_client();
    let mut recs = Vec::new();
    for k in 0..settings.kills {
        recs.push(run.kill_once(k, rng, prog)?);
    }
    run.sh.stop.store(true, Ordering::Relaxed);
    match client.join() {
        Ok(r) => r?,
        Err(_) => bail!("the client thread panicked"),
    }
    let done = run.sh.done.lock().unwrap().clone();
    run.cluster.stop_service()?;
    let journal = read_records(&run.cluster.journal_path())?;
    write_rows(out, (cfg, rep, settings.size), &recs, &done, &journal)
}

/// Copies a written `mib` MiB volume from device 0 to device 1 `reps` times with the block
/// service's pipeline (default store settings, no rate cap), and measures fio's sequential
/// read of device 0 and write of device 1 with the same block size and queue depth.
fn copy_bench(
    set: &DeviceSet,
    mib: u64,
    reps: u32,
    fio: &str,
    csv: &mut CsvOut<CopyRow>,
    prog: &mut Progress,
) -> anyhow::Result<()> {
    let cfg = StoreConfig::default();
    let dir = tempfile::Builder::new()
        .prefix("exp-failover-copy-")
        .tempdir_in("/var/tmp")?;
    let size = mib * MIB;
    {
        // The devices were provisioned for this run (or given with --force).
        let mut st = VolumeStore::open(&dir.path().join("store"), set.paths(), cfg, true)?;
        st.create("src", size, None)?;
        let piece = 16 * MIB;
        let data: Vec<u8> = (0..piece as usize).map(|i| (i % 251) as u8).collect();
        let mut off = 0;
        while off < size {
            let n = piece.min(size - off);
            st.write("src", off, &data[..n as usize])?;
            off += n;
        }
        let mut fio_ok = true;
        for rep in 0..reps {
            let t = Instant::now();
            st.copy("src", "dst", None, &mut |_| true)
                .map_err(|(e, _)| e)
                .context("copying")?;
            let seconds = t.elapsed().as_secs_f64();
            let placed: Vec<usize> = st
                .get("dst")
                .map_or(vec![], |v| v.extents.iter().map(|e| e.device).collect());
            st.delete("dst", None)?;
            let mut fio_mib = |path: &Path, rw: &str| -> Option<f64> {
                if !fio_ok {
                    return None;
                }
                match run_fio(fio, path, rw, size, cfg.copy_chunk, cfg.copy_depth) {
                    Ok(v) => Some(v),
                    Err(e) => {
                        eprintln!("note: no fio reference for the copy: {e:#}");
                        fio_ok = false;
                        None
                    }
                }
            };
            let fio_read = fio_mib(&set.paths()[0], "read");
            let fio_write = fio_mib(&set.paths()[1], "write");
            prog.step(&format!(
                "copy {mib} MiB (to devices {placed:?}) rep {rep}: {seconds:.2} s, {:.0} MiB/s",
                mib as f64 / seconds
            ));
            csv.write(&CopyRow {
                repetition: rep,
                copy_mib: mib,
                chunk_kib: cfg.copy_chunk / 1024,
                depth: cfg.copy_depth,
                seconds,
                mib_per_s: mib as f64 / seconds,
                fio_read_mib_per_s: fio_read,
                fio_write_mib_per_s: fio_write,
            })?;
        }
    }
    Ok(())
}

/// fio's sequential `rw` (read or write) bandwidth over the first `size` bytes of `path`
/// with `bs`-byte requests at queue depth `depth` (io_uring, O_DIRECT), in MiB/s.
fn run_fio(
    fio: &str,
    path: &Path,
    rw: &str,
    size: u64,
    bs: u64,
    depth: usize,
) -> anyhow::Result<f64> {
    let out = Command::new(fio)
        .arg("--name=exp-failover-copy")
        .arg(format!("--filename={}", path.display()))
        .arg("--ioengine=io_uring")
        .arg("--direct=1")
        .arg(format!("--rw={rw}"))
        .arg(format!("--bs={bs}"))
        .arg(format!("--iodepth={depth}"))
        .arg(format!("--size={size}"))
        .arg("--output-format=json")
        .output()
        .with_context(|| format!("running {fio}"))?;
    if !out.status.success() {
        bail!(
            "fio failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let v = harness::fio::json(&out.stdout)?;
    let bw_kib = v["jobs"][0][rw]["bw"]
        .as_f64()
        .with_context(|| format!("fio JSON lacks jobs[0].{rw}.bw"))?;
    Ok(bw_kib / 1024.0)
}

fn main() -> std::process::ExitCode {
    harness::exit_on_error("exp-failover", run(Args::parse()))
}

/// The VIP backends to run: `--backends`, else every one that can run (netns needs root).
fn backends(args: &Args) -> Vec<VipKind> {
    let root = rustix::process::geteuid().is_root();
    let all = if root {
        VipKind::ALL.to_vec()
    } else {
        vec![VipKind::Loopback]
    };
    let wanted = or_default(&args.backends, all);
    let mut backends = Vec::new();
    for b in wanted {
        if b == VipKind::Netns && !root {
            eprintln!("note: skipping the netns backend: it needs root");
        } else if !backends.contains(&b) {
            backends.push(b);
        }
    }
    backends
}

/// The configurations: every heartbeat × mode × backend. `client_retry` has no VIP but
/// runs on the same network: on netns a dead node's link is down, so the baseline's
/// client waits for its timeout as it would on real hosts.
fn configs(args: &Args) -> anyhow::Result<Vec<Config>> {
    let backends = backends(args);
    let ms = Duration::from_millis;
    let heartbeats = or_default(
        &args.heartbeats,
        args.common
            .pick(vec![ms(100)], vec![ms(50), ms(100), ms(200)]),
    );
    let mut configs = Vec::new();
    for &heartbeat in &heartbeats {
        for &mode in &args.modes {
            for &backend in &backends {
                configs.push(Config {
                    mode,
                    backend,
                    heartbeat,
                });
            }
        }
    }
    Ok(configs)
}

/// The settings from the flags and the profile.
fn settings(args: &Args) -> anyhow::Result<Settings> {
    let c = &args.common;
    let kills = args.kills.unwrap_or(10);
    if kills == 0 {
        bail!("--kills must be at least 1");
    }
    Ok(Settings {
        bin: PathBuf::new(),
        kills,
        size: args.volume_size.unwrap_or(c.pick(16 * MIB, 64 * MIB)),
        copy_rate: args.copy_rate.unwrap_or(c.pick(64 * MIB, 128 * MIB)),
        resend: args.resend,
        retry_timeout: args.retry_timeout,
    })
}

/// meta.json's `extra`: the run's settings.
fn meta_extra(args: &Args, settings: &Settings, copy_mib: u64) -> serde_json::Value {
    serde_json::json!({
        "kills_per_config": settings.kills,
        "volume_bytes": settings.size,
        "copy_rate_mib_s": settings.copy_rate as f64 / MIB as f64,
        "nodes": 3,
        "dead_after_periods": 3,
        "takeover_after_periods": 4,
        "vip_client_resend_ms": millis(args.resend),
        "retry_client_timeout_ms": millis(args.retry_timeout),
        "seed": args.seed,
        "copy_bench_mib": copy_mib,
    })
}

fn run(args: Args) -> anyhow::Result<()> {
    let c = &args.common;
    let configs = configs(&args)?;
    let mut settings = settings(&args)?;
    let reps = c.repetitions_or(REPETITIONS);
    settings.bin = harness::blocklab_bin(args.blocklab_bin.as_deref())?;
    let copy_bytes = args
        .copy_bench_size
        .unwrap_or(c.pick(256 * MIB, 1024 * MIB));
    if copy_bytes % MIB != 0 {
        bail!("--copy-bench-size must be a whole number of MiB");
    }
    let copy_mib = copy_bytes / MIB;
    // A live volume set needs at most two volumes of `size` at once; leave room. The copy
    // measurement needs its volume on each device.
    let dev_size = (settings.size * 4 + 64 * MIB)
        .max(copy_mib * MIB + 64 * MIB)
        .max(128 * MIB);
    let set = DeviceSet::setup(c, 2, dev_size / 2, dev_size).context("setting up devices")?;
    let mut meta = RunMeta::start("exp-failover", c.profile);
    meta.devices = set.describe();
    meta.extra = meta_extra(&args, &settings, copy_mib);
    let copy_steps = if copy_mib > 0 { reps as usize } else { 0 };
    let mut prog = Progress::new(
        "exp-failover",
        (copy_steps + configs.len() * reps as usize * settings.kills) as u64,
    );
    if copy_mib > 0 {
        let mut ccsv = CsvOut::<CopyRow>::create(&c.out, "exp-failover-copy.csv", c.overwrite)?;
        copy_bench(&set, copy_mib, reps, &args.fio, &mut ccsv, &mut prog)
            .context("copy measurement")?;
    }
    let mut out = Outputs {
        rows: CsvOut::<Row>::create(&c.out, "exp-failover.csv", c.overwrite)?,
        kills: CsvOut::<KillRow>::create(&c.out, "exp-failover-kills.csv", c.overwrite)?,
        hists: HistOut::create(&c.out, "exp-failover", c.overwrite)?,
    };
    // Repetitions outermost so configurations alternate within the run.
    for rep in 0..reps {
        for cfg in &configs {
            // The same kill points for every configuration of a repetition.
            let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(
                args.seed.wrapping_add(rep as u64),
            );
            run_config(&set, *cfg, rep, &settings, &mut rng, &mut prog, &mut out).with_context(
                || {
                    format!(
                        "{} {} hb={} ms rep {rep}",
                        cfg.mode.name(),
                        cfg.backend.name(),
                        cfg.heartbeat_ms()
                    )
                },
            )?;
        }
    }
    prog.finish();
    meta.finish(&c.out, c.overwrite)?;
    eprintln!(
        "wrote {} and {}",
        out.rows.path().display(),
        out.hists.path().display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use blocklab::failover::dispatcher::Epoch;

    fn started(op_id: &str, tag: &str) -> Record {
        Record::Started {
            op_id: op_id.into(),
            op: Op::Delete { name: "v".into() },
            epoch: Epoch {
                counter: 1,
                node: 1,
            },
            node: 1,
            tag: Some(tag.into()),
        }
    }

    fn done(op_id: &str, ok: bool) -> Record {
        Record::Done {
            op_id: op_id.into(),
            result: if ok {
                OpResult::Deleted { name: "v".into() }
            } else {
                OpResult::error("no such volume")
            },
            bytes: 0,
        }
    }

    /// The duplicate-execution counter counts: one logical operation (tag) that succeeds
    /// under two operation ids is one duplicate; a failed retry is none.
    #[test]
    fn a_second_successful_execution_of_one_operation_is_a_duplicate() {
        let once = [started("a", "t"), done("a", true)];
        let acct = Accounting::of(&once);
        assert_eq!(acct.duplicates(&acct.tag_kind(), |_| true), 0);
        let twice = [
            started("a", "t"),
            done("a", true),
            started("b", "t"),
            done("b", true),
            started("c", "t"),
            done("c", false),
        ];
        let acct = Accounting::of(&twice);
        assert_eq!(acct.duplicates(&acct.tag_kind(), |_| true), 1);
        assert_eq!(acct.duplicates(&acct.tag_kind(), |k| k == "copy"), 0);
    }
}
