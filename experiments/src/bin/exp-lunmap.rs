//! exp-lunmap: how fast and how safely a LUN-map change reaches every gateway, and how fast
//! a dead gateway is noticed: the map in ZooKeeper (atomic multi, watches, ephemeral nodes)
//! against the filesync baseline (a JSON file copied to every gateway on an interval,
//! polled, keepalived-like heartbeats).
//!
//! For each configuration (backend × gateways × editors) and repetition: start G gateway
//! processes (`blocklab gateway`, the binary next to this one), let E editor threads apply
//! `changes` mappings of new initiators to one LUN, and after each acknowledged change send
//! one read per gateway as that initiator (a refusal is a stale read: the gateway decided on
//! a map older than the acknowledged change). Propagation is the time from the
//! acknowledgement to the moment the last gateway applied the change (gateways report each
//! applied change with its CLOCK_MONOTONIC time on stdout). Then one gateway is killed with
//! SIGKILL and the time until every other gateway and the observer know it is measured.
//!
//! Beside exp-lunmap.csv, exp-lunmap-hist.csv keeps each row's histograms: `propagation_us`
//! (one value per surviving change) and `detect_dead_us` (from the kill to each other
//! gateway and the observer noticing; `detect_dead_ms` is the last of them).

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use blocklab::coord::zk_server::ZkServer;
use blocklab::coord::{self, ConnectOptions, Coord, CoordSpec};
use blocklab::lunmap::editor::LunMap;
use blocklab::lunmap::filesync::{self, FileEditor};
use blocklab::lunmap::follow::{follow_coord, Follower, OnChange};
use blocklab::lunmap::gateway::GatewayClient;
use blocklab::lunmap::view::{Change, MapView};
use blocklab::lunmap::{mono_ns, Backing, Layout, Lun, Target};
use clap::{Parser, ValueEnum};
use harness::args::{
    format_duration, millis, parse_duration, parse_positive_duration, Repetitions,
};
use harness::cli::lunmap::parse_zk;
use harness::{CommonArgs, CsvOut, DeviceSet, HistOut, LatencyHist, RunMeta};
use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
#[value(rename_all = "snake_case")]
enum BackendKind {
    /// The map in ZooKeeper: atomic multi, recursive watches, ephemeral gateway nodes.
    Zookeeper,
    /// As zookeeper, and gateways confirm a refusal with ZooKeeper (sync + read) first.
    ZookeeperConfirm,
    /// Baseline: JSON file copied to every gateway on an interval, polled; heartbeats.
    Filesync,
}

impl std::fmt::Display for BackendKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.to_possible_value() {
            Some(v) => f.write_str(v.get_name()),
            None => write!(f, "{self:?}"),
        }
    }
}

/// Repetitions per configuration: quick, full.
const REPETITIONS: Repetitions = Repetitions { quick: 2, full: 5 };

/// Measures how fast and how safely a LUN-map change reaches every gateway (propagation,
/// lost updates, stale reads) and how fast a dead gateway is noticed, and compares the map
/// in ZooKeeper with a JSON file copied to every gateway (filesync).
#[derive(Debug, Parser)]
#[command(name = "exp-lunmap", version, mut_arg("repetitions", |a| REPETITIONS.help(a)))]
struct Args {
    #[command(flatten)]
    common: CommonArgs,
    /// Use this ZooKeeper (`zk://host:port[,...][/chroot]`) instead of starting a private
    /// server (Debian's zookeeper package) on a free port with a temporary data directory.
    #[arg(long, value_parser = parse_zk)]
    coord: Option<CoordSpec>,
    /// Backends to compare (alternating within the run).
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = [BackendKind::Zookeeper, BackendKind::ZookeeperConfirm, BackendKind::Filesync])]
    backends: Vec<BackendKind>,
    /// Gateway process counts to sweep (quick and full alike).
    #[arg(long, value_delimiter = ',', default_values_t = [1usize, 4, 8])]
    gateways: Vec<usize>,
    /// Concurrent editor counts to sweep (quick and full alike).
    #[arg(long, value_delimiter = ',', default_values_t = [1usize, 4])]
    editors: Vec<usize>,
    /// Map changes per configuration and repetition, split across editors (default: quick
    /// 24, full 200).
    #[arg(long)]
    changes: Option<usize>,
    /// Pause of each editor between its changes, e.g. 25ms.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration, default_value = "25ms")]
    change_gap: Duration,
    /// ZooKeeper session timeout of gateways and observer, e.g. 2s (the private server runs
    /// with tickTime 500 ms, so 1s..10s are possible).
    #[arg(long, value_name = "DURATION", value_parser = parse_positive_duration, default_value = "2s")]
    session_timeout: Duration,
    /// filesync: interval of the rsync-like copy to every gateway, e.g. 1s.
    #[arg(long, value_name = "DURATION", value_parser = parse_positive_duration, default_value = "1s")]
    sync_interval: Duration,
    /// filesync: how often gateways poll their copy, e.g. 100ms.
    #[arg(long, value_name = "DURATION", value_parser = parse_positive_duration, default_value = "100ms")]
    poll_interval: Duration,
    /// filesync: heartbeat advert interval, e.g. 1s (keepalived's default; a gateway is
    /// declared dead after 3 × advert + skew ≈ 3.6 × advert).
    #[arg(long, value_name = "DURATION", value_parser = parse_positive_duration, default_value = "1s")]
    advert_interval: Duration,
    /// Seed of the editors' retry jitter: repetition r uses seed + r, editor e of it a
    /// generator derived from that and e.
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

#[derive(Debug, Serialize)]
struct Row {
    backend: String,
    gateways: usize,
    editors: usize,
    changes: usize,
    repetition: u32,
    propagation_p50_ms: f64,
    propagation_p99_ms: f64,
    propagation_max_ms: f64,
    lost_updates: usize,
    stale_reads: u64,
    detect_dead_ms: f64,
}

/// A row's configuration columns: the key of its histograms in exp-lunmap-hist.csv.
#[derive(Debug, Clone, Serialize)]
struct HistKey {
    backend: String,
    gateways: usize,
    editors: usize,
    changes: usize,
    repetition: u32,
}

impl Row {
    fn hist_key(&self) -> HistKey {
        HistKey {
            backend: self.backend.clone(),
            gateways: self.gateways,
            editors: self.editors,
            changes: self.changes,
            repetition: self.repetition,
        }
    }
}

const LUN: &str = "lun0";
const TARGET: &str = "iqn.2026-11.lab.blocklab:target0";
const LUN_SIZE: u64 = 16 << 20;

/// What gateway processes reported.
#[derive(Default)]
struct EventLog {
    /// (gateway index, initiator) → when that gateway applied the mapping.
    mapped: HashMap<(usize, String), u64>,
    /// (observing gateway index, dead node) → when it noticed.
    down: HashMap<(usize, String), u64>,
}

/// Gateway child processes, killed on every exit path.
struct Gateways {
    children: Vec<Option<Child>>,
    addrs: Vec<SocketAddr>,
    nodes: Vec<String>,
}

impl Drop for Gateways {
    fn drop(&mut self) {
        // SIGTERM first so ZooKeeper sessions close cleanly, then SIGKILL.
        for c in self.children.iter().flatten() {
            if let Some(pid) = rustix::process::Pid::from_raw(c.id() as i32) {
                let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
            }
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        for c in self.children.iter_mut().flatten() {
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Records what a gateway's `--events` stdout reports (`ready ADDR`, `mapped LUN TARGET
/// INITIATOR NS`, `gateway-down NODE NS`) until it closes; `ready` goes to `ready`.
fn read_events(
    gw: usize,
    out: std::process::ChildStdout,
    ready: mpsc::Sender<String>,
    log: &Mutex<EventLog>,
) {
    // The first report of (gateway, key) counts.
    let first = |map: &mut HashMap<(usize, String), u64>, key: &str, ns: &str| {
        if let Ok(ns) = ns.parse() {
            map.entry((gw, key.to_string())).or_insert(ns);
        }
    };
    for line in BufReader::new(out).lines() {
        let Ok(line) = line else { return };
        let f: Vec<&str> = line.split(' ').collect();
        match f.as_slice() {
            ["ready", addr] => {
                let _ = ready.send(addr.to_string());
            }
            ["mapped", _lun, _t, init, ns] => first(&mut log.lock().unwrap().mapped, init, ns),
            ["gateway-down", node, ns] => first(&mut log.lock().unwrap().down, node, ns),
            _ => {}
        }
    }
}

fn spawn_gateways(
    bin: &Path,
    count: usize,
    args_for: &dyn Fn(usize) -> Vec<String>,
    log_dir: &Path,
    log: &Arc<Mutex<EventLog>>,
) -> anyhow::Result<Gateways> {
    let mut gws = Gateways {
        children: Vec::new(),
        addrs: Vec::new(),
        nodes: Vec::new(),
    };
    let mut readies = Vec::new();
    for i in 0..count {
        let node = format!("gw{i}");
        let stderr = std::fs::File::create(log_dir.join(format!("{node}.log")))?;
        let mut child = Command::new(bin)
            .arg("gateway")
            .args(["--node", &node, "--events"])
            .args(args_for(i))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let out = child.stdout.take().context("gateway stdout")?;
        gws.children.push(Some(child));
        gws.nodes.push(node);
        let (tx, rx) = mpsc::channel();
        readies.push(rx);
        let log = Arc::clone(log);
        std::thread::spawn(move || read_events(i, out, tx, &log));
    }
    for (i, rx) in readies.into_iter().enumerate() {
        let addr = rx.recv_timeout(Duration::from_secs(60)).with_context(|| {
            format!(
                "gateway gw{i} did not become ready; see {}",
                log_dir.join(format!("gw{i}.log")).display()
            )
        })?;
        gws.addrs.push(addr.parse().context("gateway address")?);
    }
    Ok(gws)
}

fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    while !f() {
        if Instant::now() >= deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    Ok(())
}

/// The editor side of one backend.
enum Editors {
    Zk {
        spec: CoordSpec,
        opts: ConnectOptions,
    },
    File(FileEditor),
}

struct Acked {
    initiator: String,
    ack_ns: u64,
}

struct RunCfg<'a> {
    backend: BackendKind,
    gateways: usize,
    editors: usize,
    changes: usize,
    rep: u32,
    run_tag: &'a str,
    device: &'a str,
    /// Seed of this run's editors (`--seed` + repetition).
    seed: u64,
}

/// What one run's parts share: its map, its directory, the gateways' reports and the
/// observer's view. Declared before the backend so the directory outlives the processes.
struct RunCtx {
    cluster: String,
    layout: Layout,
    tmp: tempfile::TempDir,
    lun: Lun,
    opts: ConnectOptions,
    log: Arc<Mutex<EventLog>>,
    observer_view: Arc<RwLock<MapView>>,
    /// Dead node → when the observer noticed.
    observer_down: Arc<Mutex<HashMap<String, u64>>>,
}

impl RunCtx {
    fn new(a: &Args, cfg: &RunCfg<'_>) -> anyhow::Result<RunCtx> {
        let cluster = format!(
            "{}-{}-g{}-e{}-r{}",
            cfg.run_tag, cfg.backend, cfg.gateways, cfg.editors, cfg.rep
        );
        let layout = Layout::new(&cluster)?;
        let tmp = tempfile::Builder::new()
            .prefix("exp-lunmap-")
            .tempdir()
            .context("temporary directory")?;
        let lun = Lun {
            id: 0,
            name: LUN.into(),
            size_bytes: LUN_SIZE,
            backing: Backing::Range {
                device: cfg.device.into(),
                offset: 0,
            },
        };
        let opts = ConnectOptions {
            session_timeout: a.session_timeout,
            connect_deadline: Duration::from_secs(10),
        };
        Ok(RunCtx {
            observer_view: Arc::new(RwLock::new(MapView::new(layout.clone()))),
            cluster,
            layout,
            tmp,
            lun,
            opts,
            log: Arc::default(),
            observer_down: Arc::default(),
        })
    }
    /// The observer's change callback: records when it noticed each dead gateway.
    fn on_observed(&self) -> OnChange {
        let d = Arc::clone(&self.observer_down);
        Box::new(move |c: &Change, ns: u64| {
            if let Change::GatewayDown { node } = c {
                d.lock().unwrap().entry(node.clone()).or_insert(ns);
            }
        })
    }
}

/// One backend at work: (filesync) the copier, the observer, the gateway processes and
/// its editors. Fields drop in this order: the copier and the observer stop before the
/// gateways are killed.
struct Backend {
    syncer: Option<Follower>,
    observer: Follower,
    gws: Gateways,
    editors: Editors,
}

/// The ZooKeeper backend: the LUN created in ZooKeeper, gateways and the observer
/// watching it.
fn start_zookeeper(
    a: &Args,
    bin: &Path,
    zk: Option<&CoordSpec>,
    cfg: &RunCfg<'_>,
    ctx: &RunCtx,
) -> anyhow::Result<Backend> {
    let spec = zk.context("no ZooKeeper")?.clone();
    let c = coord::connect(&spec, &ctx.opts)?;
    LunMap::open(&*c, &ctx.cluster)?.create_lun(
        ctx.lun.id,
        LUN,
        LUN_SIZE,
        ctx.lun.backing.clone(),
    )?;
    let mut args: Vec<String> = vec![
        "--coord".into(),
        spec.to_string(),
        "--cluster".into(),
        ctx.cluster.clone(),
        "--session-timeout".into(),
        format_duration(a.session_timeout),
    ];
    if cfg.backend == BackendKind::ZookeeperConfirm {
        args.push("--confirm-refusals".into());
    }
    let gws = spawn_gateways(
        bin,
        cfg.gateways,
        &|_| args.clone(),
        ctx.tmp.path(),
        &ctx.log,
    )?;
    let obs: Arc<dyn Coord> = Arc::from(coord::connect(&spec, &ctx.opts)?);
    let observer = follow_coord(
        obs,
        ctx.layout.clone(),
        Arc::clone(&ctx.observer_view),
        ctx.on_observed(),
    )?;
    Ok(Backend {
        editors: Editors::Zk {
            spec,
            opts: ctx.opts.clone(),
        },
        gws,
        observer,
        syncer: None,
    })
}

/// The filesync baseline: a master file copied to one directory per gateway, gateways
/// polling their copy and writing heartbeats, the observer following the heartbeats.
fn start_filesync(a: &Args, bin: &Path, cfg: &RunCfg<'_>, ctx: &RunCtx) -> anyhow::Result<Backend> {
    let master = ctx.tmp.path().join("master.json");
    let hb = ctx.tmp.path().join("heartbeats");
    std::fs::create_dir_all(&hb)?;
    let ed = FileEditor::new(&master);
    ed.create_lun(ctx.lun.clone())?;
    let dirs: Vec<PathBuf> = (0..cfg.gateways)
        .map(|i| ctx.tmp.path().join(format!("gw{i}")))
        .collect();
    for d in &dirs {
        std::fs::create_dir_all(d)?;
    }
    let syncer = filesync::start_syncer(master.clone(), dirs.clone(), a.sync_interval);
    let args_for = |i: usize| -> Vec<String> {
        vec![
            "--filesync-dir".into(),
            dirs[i].display().to_string(),
            "--heartbeat-dir".into(),
            hb.display().to_string(),
            "--advert-interval".into(),
            format_duration(a.advert_interval),
            "--poll-interval".into(),
            format_duration(a.poll_interval),
            "--cluster".into(),
            ctx.cluster.clone(),
        ]
    };
    let gws = spawn_gateways(bin, cfg.gateways, &args_for, ctx.tmp.path(), &ctx.log)?;
    let observer = filesync::follow_heartbeats(
        hb,
        Arc::clone(&ctx.observer_view),
        ctx.on_observed(),
        a.advert_interval,
    );
    Ok(Backend {
        editors: Editors::File(ed),
        gws,
        observer,
        syncer: Some(syncer),
    })
}

/// What the editor threads share.
struct EditCtx<'a> {
    editors: &'a Editors,
    gws: &'a Gateways,
    cluster: &'a str,
    target: Target,
    gap: Duration,
    /// The run's seed; editor `e` seeds its retry jitter with it and `e`.
    seed: u64,
    acked: Mutex<Vec<Acked>>,
    /// Reads a gateway refused after the change was acknowledged.
    stale: std::sync::atomic::AtomicU64,
}

impl EditCtx<'_> {
    /// Editor `e`: `n` new initiators mapped to the LUN, each change followed by one
    /// read per gateway as the new initiator.
    fn edit(&self, e: usize, n: usize) -> anyhow::Result<()> {
        let zk_session = match self.editors {
            Editors::Zk { spec, opts } => Some(coord::connect(spec, opts)?),
            Editors::File(_) => None,
        };
        let map = match &zk_session {
            Some(c) => Some(
                LunMap::open(&**c, self.cluster)?
                    .with_seed(self.seed ^ (e as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15)),
            ),
            None => None,
        };
        let mut clients = self
            .gws
            .addrs
            .iter()
            .map(|a| GatewayClient::connect(*a))
            .collect::<std::io::Result<Vec<_>>>()?;
        for k in 0..n {
            let initiator = format!("iqn.2026-11.lab.host:e{e}-c{k}");
            match (&map, self.editors) {
                (Some(m), _) => {
                    m.map(LUN, &self.target, &initiator)?;
                }
                (None, Editors::File(f)) => {
                    f.map(LUN, &self.target, &initiator)?;
                }
                _ => unreachable!("editor without backend"),
            }
            let ack_ns = mono_ns();
            self.acked.lock().unwrap().push(Acked {
                initiator: initiator.clone(),
                ack_ns,
            });
            self.read_each(&mut clients, &initiator)?;
            std::thread::sleep(self.gap);
        }
        Ok(())
    }
    /// One read per gateway as `initiator`; a refusal is a stale read.
    fn read_each(&self, clients: &mut [GatewayClient], initiator: &str) -> anyhow::Result<()> {
        for c in clients.iter_mut() {
            let (r, _) = c.read(LUN, TARGET, initiator, 0, 4096)?;
            if r.refused {
                self.stale
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            } else if !r.ok {
                bail!("gateway I/O failed: {}", r.error);
            }
        }
        Ok(())
    }
}

/// Runs the editor threads to the end: the acknowledged changes and the stale reads.
fn run_editors(
    a: &Args,
    cfg: &RunCfg<'_>,
    be: &Backend,
    ctx: &RunCtx,
) -> anyhow::Result<(Vec<Acked>, u64)> {
    let ed = EditCtx {
        editors: &be.editors,
        gws: &be.gws,
        cluster: &ctx.cluster,
        target: Target {
            iqn: TARGET.into(),
            portal: "127.0.0.1:3260".into(),
        },
        gap: a.change_gap,
        seed: cfg.seed,
        acked: Mutex::new(Vec::new()),
        stale: Default::default(),
    };
    let per_editor = cfg.changes.div_ceil(cfg.editors);
    std::thread::scope(|s| -> anyhow::Result<()> {
        let mut handles = Vec::new();
        for e in 0..cfg.editors {
            let n = per_editor.min(cfg.changes.saturating_sub(e * per_editor));
            let ed = &ed;
            handles.push(s.spawn(move || ed.edit(e, n)));
        }
        for h in handles {
            h.join()
                .map_err(|_| anyhow::anyhow!("editor thread panicked"))??;
        }
        Ok(())
    })?;
    Ok((ed.acked.into_inner().unwrap(), ed.stale.into_inner()))
}

/// The acknowledged changes the final map still has, and those it lost (a lost update:
/// an editor was told its change was made, and the map does not have it).
fn split_lost<'a>(
    acked: &'a [Acked],
    final_initiators: &std::collections::HashSet<String>,
) -> (Vec<&'a Acked>, Vec<&'a Acked>) {
    acked
        .iter()
        .partition(|x| final_initiators.contains(&x.initiator))
}

/// The initiators of the final map: acknowledged changes missing from it are lost
/// updates.
fn final_initiators(
    editors: &Editors,
    layout: &Layout,
) -> anyhow::Result<std::collections::HashSet<String>> {
    Ok(match editors {
        Editors::Zk { spec, opts } => {
            let c = coord::connect(spec, opts)?;
            LunMap::attach(&*c, layout.clone())
                .initiators(LUN, TARGET)?
                .into_iter()
                .collect()
        }
        Editors::File(f) => filesync::read_doc(&f.master)?
            .luns
            .iter()
            .filter(|l| l.lun.name == LUN)
            .flat_map(|l| l.targets.iter())
            .filter(|t| t.target.iqn == TARGET)
            .flat_map(|t| t.initiators.iter().cloned())
            .collect(),
    })
}

/// Waits (up to a budget) until every gateway applied every surviving change, then the
/// propagation of each (µs): from its acknowledgement to the last gateway applying it
/// (changes that did not arrive are left out, with a warning).
fn propagation(
    a: &Args,
    cfg: &RunCfg<'_>,
    log: &Mutex<EventLog>,
    surviving: &[&Acked],
) -> LatencyHist {
    let settle = 3 * (a.sync_interval + a.poll_interval) + Duration::from_secs(30);
    let arrived = wait_until("every gateway to apply every change", settle, || {
        let l = log.lock().unwrap();
        surviving
            .iter()
            .all(|x| (0..cfg.gateways).all(|g| l.mapped.contains_key(&(g, x.initiator.clone()))))
    });
    if let Err(e) = &arrived {
        eprintln!(
            "warning: {e}; changes that did not arrive are left out of the propagation figures"
        );
    }
    let mut hist = LatencyHist::new();
    let l = log.lock().unwrap();
    for x in surviving {
        let last = (0..cfg.gateways)
            .map(|g| l.mapped.get(&(g, x.initiator.clone())).copied())
            .collect::<Option<Vec<u64>>>();
        if let Some(ts) = last {
            let max = ts.into_iter().max().unwrap_or(x.ack_ns);
            // A gateway can apply a change before the editor sees its acknowledgement.
            hist.record(max.saturating_sub(x.ack_ns) / 1000);
        }
    }
    hist
}

/// Failure detection: SIGKILLs gateway 0 and waits until every other gateway and the
/// observer noticed. Returns the ns from the kill to the last of them noticing, and the
/// µs from the kill to each of them noticing.
fn detect_dead(
    a: &Args,
    cfg: &RunCfg<'_>,
    ctx: &RunCtx,
    gws: &mut Gateways,
) -> anyhow::Result<(u64, LatencyHist)> {
    let victim = gws.nodes[0].clone();
    let kill_ns;
    {
        let child = gws.children[0].as_mut().context("gateway 0")?;
        kill_ns = mono_ns();
        child.kill().context("SIGKILL of gateway 0")?;
        let _ = child.wait();
    }
    gws.children[0] = None;
    let detect_budget = ctx
        .opts
        .session_timeout
        .max(filesync::master_down(a.advert_interval))
        + Duration::from_secs(30);
    wait_until(
        "every party to notice the dead gateway",
        detect_budget,
        || {
            let l = ctx.log.lock().unwrap();
            ctx.observer_down.lock().unwrap().contains_key(&victim)
                && (1..cfg.gateways).all(|g| l.down.contains_key(&(g, victim.clone())))
        },
    )?;
    let l = ctx.log.lock().unwrap();
    let mut detected = ctx.observer_down.lock().unwrap()[&victim];
    let mut each = LatencyHist::new();
    each.record(detected.saturating_sub(kill_ns) / 1000);
    for g in 1..cfg.gateways {
        let t = l.down[&(g, victim.clone())];
        each.record(t.saturating_sub(kill_ns) / 1000);
        detected = detected.max(t);
    }
    Ok((detected.saturating_sub(kill_ns), each))
}

/// One configuration and repetition: its row, and its histograms of propagation and of
/// detection (µs).
fn run_one(
    a: &Args,
    bin: &Path,
    zk: Option<&CoordSpec>,
    cfg: &RunCfg<'_>,
) -> anyhow::Result<(Row, LatencyHist, LatencyHist)> {
    let ctx = RunCtx::new(a, cfg)?;
    // Backend set-up: the LUN exists before gateways start.
    let be = match cfg.backend {
        BackendKind::Zookeeper | BackendKind::ZookeeperConfirm => {
            start_zookeeper(a, bin, zk, cfg, &ctx)?
        }
        BackendKind::Filesync => start_filesync(a, bin, cfg, &ctx)?,
    };
    // Everyone sees every gateway before the measurement starts.
    wait_until(
        "the observer to see every gateway",
        Duration::from_secs(60),
        || {
            let v = ctx.observer_view.read().unwrap();
            be.gws.nodes.iter().all(|n| v.gateways.contains_key(n))
        },
    )?;
    let (acked, stale_reads) = run_editors(a, cfg, &be, &ctx)?;
    let final_initiators = final_initiators(&be.editors, &ctx.layout)?;
    let (surviving, lost) = split_lost(&acked, &final_initiators);
    let propagated = propagation(a, cfg, &ctx.log, &surviving);
    let p = propagated.percentiles();
    // The gateways go first (a SIGKILL, then the rest at drop); the copier and the
    // observer stop at the end.
    let Backend {
        editors,
        mut gws,
        observer: _observer,
        syncer: _syncer,
    } = be;
    let (detect_ns, detected) = detect_dead(a, cfg, &ctx, &mut gws)?;
    drop(gws);
    if let Editors::Zk { spec, opts } = &editors {
        // Leave the shared server small: remove this run's subtree.
        if let Ok(c) = coord::connect(spec, opts) {
            let _ = coord::delete_recursive(&*c, &ctx.layout.root());
        }
    }
    let ms = |us: u64| us as f64 / 1000.0;
    let row = Row {
        backend: cfg.backend.to_string(),
        gateways: cfg.gateways,
        editors: cfg.editors,
        changes: acked.len(),
        repetition: cfg.rep,
        propagation_p50_ms: ms(p.p50),
        propagation_p99_ms: ms(p.p99),
        propagation_max_ms: ms(p.max),
        lost_updates: lost.len(),
        stale_reads,
        detect_dead_ms: detect_ns as f64 / 1e6,
    };
    Ok((row, propagated, detected))
}

fn main() -> std::process::ExitCode {
    harness::exit_on_error("exp-lunmap", run(Args::parse()))
}

/// The ZooKeeper the runs use: `--coord`, else a private server when a backend needs one
/// (kept running while the first value lives).
fn zookeeper(a: &Args) -> anyhow::Result<(Option<ZkServer>, Option<CoordSpec>)> {
    let needs_zk = a.backends.iter().any(|b| *b != BackendKind::Filesync);
    Ok(match (&a.coord, needs_zk) {
        (Some(s), _) => (None, Some(s.clone())),
        (None, true) => {
            eprintln!("starting a private ZooKeeper server");
            let z = ZkServer::start().context("starting ZooKeeper (Debian package zookeeper)")?;
            let spec = z.spec("/exp-lunmap");
            (Some(z), Some(spec))
        }
        (None, false) => (None, None),
    })
}

/// meta.json's `extra`: the run's settings.
fn meta_extra(a: &Args, zk: Option<&CoordSpec>, changes: usize) -> serde_json::Value {
    serde_json::json!({
        "zookeeper": zk.map(|s| s.to_string()),
        "session_timeout_ms": millis(a.session_timeout),
        "sync_interval_ms": millis(a.sync_interval),
        "poll_ms": millis(a.poll_interval),
        "advert_ms": millis(a.advert_interval),
        "master_down_ms": millis(filesync::master_down(a.advert_interval)),
        "change_gap_ms": millis(a.change_gap),
        "seed": a.seed,
        "changes": changes,
        "lun_size_bytes": LUN_SIZE,
    })
}

fn run(a: Args) -> anyhow::Result<()> {
    if a.gateways.contains(&0) || a.editors.contains(&0) {
        bail!("--gateways and --editors must be at least 1");
    }
    let bin = harness::blocklab_bin(None)?;
    let changes = a.changes.unwrap_or(a.common.pick(24, 200));
    if changes == 0 {
        bail!("--changes must be at least 1");
    }
    // Propagation percentiles come from the repetitions' merged histograms: quick's 2 × 24
    // changes make a p99 that one VM stall can set (quick verdicts are indicative); full's
    // 5 × 200 do not.
    let reps = a.common.repetitions_or(REPETITIONS);
    let set = DeviceSet::setup(&a.common, 1, LUN_SIZE, 64 << 20)?;
    let device = set.paths()[0].display().to_string();
    let mut meta = RunMeta::start("exp-lunmap", a.common.profile);
    meta.devices = set.describe();
    let mut csv = CsvOut::<Row>::create(&a.common.out, "exp-lunmap.csv", a.common.overwrite)?;
    let mut hists = HistOut::create(&a.common.out, "exp-lunmap", a.common.overwrite)?;
    let (_server, zk_spec) = zookeeper(&a)?;
    meta.extra = meta_extra(&a, zk_spec.as_ref(), changes);
    let run_tag = format!("x{}", &meta.run_id[..8]);
    let total = reps as u64 * (a.gateways.len() * a.editors.len() * a.backends.len()) as u64;
    let mut progress = harness::progress::Progress::new("exp-lunmap", total);
    for rep in 0..reps {
        for &g in &a.gateways {
            for &e in &a.editors {
                for &b in &a.backends {
                    let cfg = RunCfg {
                        backend: b,
                        gateways: g,
                        editors: e,
                        changes,
                        rep,
                        run_tag: &run_tag,
                        device: &device,
                        seed: a.seed.wrapping_add(rep as u64),
                    };
                    let (row, propagated, detected) = run_one(&a, &bin, zk_spec.as_ref(), &cfg)
                        .with_context(|| format!("{b} gateways={g} editors={e} rep={rep}"))?;
                    progress.step(&format!(
                        "{b} g={g} e={e}: p99 {:.1} ms, lost {}, stale {}, detect {:.0} ms",
                        row.propagation_p99_ms,
                        row.lost_updates,
                        row.stale_reads,
                        row.detect_dead_ms
                    ));
                    csv.write(&row)?;
                    hists.write(
                        &row.hist_key(),
                        &[
                            ("propagation_us", &propagated),
                            ("detect_dead_us", &detected),
                        ],
                    )?;
                }
            }
        }
    }
    progress.finish();
    let out = meta.finish(&a.common.out, a.common.overwrite)?;
    eprintln!(
        "wrote {}, {} and {}",
        csv.path().display(),
        hists.path().display(),
        out.display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The lost-update counter counts: an acknowledged change the final map lacks (as when
    /// two editors of a copied file overwrite each other) is lost; the others survive.
    #[test]
    fn an_acknowledged_change_missing_from_the_final_map_is_lost() {
        let acked: Vec<Acked> = ["iqn.a", "iqn.b", "iqn.c"]
            .iter()
            .map(|i| Acked {
                initiator: i.to_string(),
                ack_ns: 0,
            })
            .collect();
        let all: std::collections::HashSet<String> =
            acked.iter().map(|a| a.initiator.clone()).collect();
        let (kept, lost) = split_lost(&acked, &all);
        assert_eq!((kept.len(), lost.len()), (3, 0));
        let mut overwritten = all.clone();
        overwritten.remove("iqn.b");
        let (kept, lost) = split_lost(&acked, &overwritten);
        assert_eq!((kept.len(), lost.len()), (2, 1));
        assert_eq!(lost[0].initiator, "iqn.b");
    }
}
