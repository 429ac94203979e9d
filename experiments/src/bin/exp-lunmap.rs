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
use blocklab::lunmap::follow::{follow_coord, Follower};
use blocklab::lunmap::gateway::GatewayClient;
use blocklab::lunmap::view::{Change, MapView};
use blocklab::lunmap::{mono_ns, Backing, Layout, Lun, Target};
use clap::{Parser, ValueEnum};
use harness::args::parse_ms;
use harness::cli::lunmap::parse_zk;
use harness::{CommonArgs, CsvOut, DeviceSet, LatencyHist, RunMeta};
use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
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

/// LUN-map propagation, lost updates, stale decisions and failure detection: ZooKeeper
/// against a copied file.
#[derive(Debug, Parser)]
#[command(name = "exp-lunmap", version)]
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
    /// Gateway process counts to sweep.
    #[arg(long, value_delimiter = ',', default_values_t = [1usize, 4, 8])]
    gateways: Vec<usize>,
    /// Concurrent editor counts to sweep.
    #[arg(long, value_delimiter = ',', default_values_t = [1usize, 4])]
    editors: Vec<usize>,
    /// Map changes per configuration and repetition, split across editors (default: quick
    /// 24, full 200).
    #[arg(long)]
    changes: Option<usize>,
    /// Pause of each editor between its changes, in milliseconds.
    #[arg(long, value_parser = parse_ms, default_value_t = 25)]
    change_gap_ms: u64,
    /// ZooKeeper session timeout of gateways and observer, in milliseconds (the private
    /// server runs with tickTime 500 ms, so 1000..10000 are possible).
    #[arg(long, value_parser = parse_ms, default_value_t = 2000)]
    session_timeout_ms: u64,
    /// filesync: interval of the rsync-like copy to every gateway, in milliseconds.
    #[arg(long, value_parser = parse_ms, default_value_t = 1000)]
    sync_interval_ms: u64,
    /// filesync: how often gateways poll their copy, in milliseconds.
    #[arg(long, value_parser = parse_ms, default_value_t = 100)]
    poll_ms: u64,
    /// filesync: heartbeat advert interval in milliseconds (keepalived default 1000;
    /// a gateway is declared dead after 3 × advert + skew ≈ 3.6 × advert).
    #[arg(long, value_parser = parse_ms, default_value_t = 1000)]
    advert_ms: u64,
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
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { return };
                let f: Vec<&str> = line.split(' ').collect();
                match f.as_slice() {
                    ["ready", addr] => {
                        let _ = tx.send(addr.to_string());
                    }
                    ["mapped", _lun, _t, init, ns] => {
                        if let Ok(ns) = ns.parse() {
                            log.lock()
                                .unwrap()
                                .mapped
                                .entry((i, init.to_string()))
                                .or_insert(ns);
                        }
                    }
                    ["gateway-down", node, ns] => {
                        if let Ok(ns) = ns.parse() {
                            log.lock()
                                .unwrap()
                                .down
                                .entry((i, node.to_string()))
                                .or_insert(ns);
                        }
                    }
                    _ => {}
                }
            }
        });
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
}

fn run_one(a: &Args, bin: &Path, zk: Option<&CoordSpec>, cfg: &RunCfg<'_>) -> anyhow::Result<Row> {
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
    let session_timeout = Duration::from_millis(a.session_timeout_ms);
    let opts = ConnectOptions {
        session_timeout,
        connect_deadline: Duration::from_secs(10),
    };
    let log = Arc::new(Mutex::new(EventLog::default()));
    let observer_view = Arc::new(RwLock::new(MapView::new(layout.clone())));
    let observer_down: Arc<Mutex<HashMap<String, u64>>> = Arc::default();
    let on_obs = {
        let d = Arc::clone(&observer_down);
        Box::new(move |c: &Change, ns: u64| {
            if let Change::GatewayDown { node } = c {
                d.lock().unwrap().entry(node.clone()).or_insert(ns);
            }
        })
    };
    // Backend set-up: the LUN exists before gateways start.
    let (editors, gws, _observer, _syncer): (Editors, Gateways, Follower, Option<Follower>) =
        match cfg.backend {
            BackendKind::Zookeeper | BackendKind::ZookeeperConfirm => {
                let spec = zk.context("no ZooKeeper")?.clone();
                let confirm = cfg.backend == BackendKind::ZookeeperConfirm;
                let c = coord::connect(&spec, &opts)?;
                LunMap::open(&*c, &cluster)?.create_lun(
                    lun.id,
                    LUN,
                    LUN_SIZE,
                    lun.backing.clone(),
                )?;
                let spec_s = spec.to_string();
                let cl = cluster.clone();
                let st = a.session_timeout_ms.to_string();
                let gws = spawn_gateways(
                    bin,
                    cfg.gateways,
                    &|_| {
                        let mut v: Vec<String> = vec![
                            "--coord".into(),
                            spec_s.clone(),
                            "--cluster".into(),
                            cl.clone(),
                            "--session-timeout-ms".into(),
                            st.clone(),
                        ];
                        if confirm {
                            v.push("--confirm-refusals".into());
                        }
                        v
                    },
                    tmp.path(),
                    &log,
                )?;
                let obs: Arc<dyn Coord> = Arc::from(coord::connect(&spec, &opts)?);
                let f = follow_coord(obs, layout.clone(), Arc::clone(&observer_view), on_obs)?;
                (
                    Editors::Zk {
                        spec,
                        opts: opts.clone(),
                    },
                    gws,
                    f,
                    None,
                )
            }
            BackendKind::Filesync => {
                let master = tmp.path().join("master.json");
                let hb = tmp.path().join("heartbeats");
                std::fs::create_dir_all(&hb)?;
                let ed = FileEditor::new(&master);
                ed.create_lun(lun.clone())?;
                let dirs: Vec<PathBuf> = (0..cfg.gateways)
                    .map(|i| tmp.path().join(format!("gw{i}")))
                    .collect();
                for d in &dirs {
                    std::fs::create_dir_all(d)?;
                }
                let syncer = filesync::start_syncer(
                    master.clone(),
                    dirs.clone(),
                    Duration::from_millis(a.sync_interval_ms),
                );
                let (hb_s, adv, poll) = (
                    hb.display().to_string(),
                    a.advert_ms.to_string(),
                    a.poll_ms.to_string(),
                );
                let cl = cluster.clone();
                let gws = spawn_gateways(
                    bin,
                    cfg.gateways,
                    &|i| {
                        vec![
                            "--filesync-dir".into(),
                            dirs[i].display().to_string(),
                            "--heartbeat-dir".into(),
                            hb_s.clone(),
                            "--advert-ms".into(),
                            adv.clone(),
                            "--poll-ms".into(),
                            poll.clone(),
                            "--cluster".into(),
                            cl.clone(),
                        ]
                    },
                    tmp.path(),
                    &log,
                )?;
                let f = filesync::follow_heartbeats(
                    hb,
                    Arc::clone(&observer_view),
                    on_obs,
                    Duration::from_millis(a.advert_ms),
                );
                (Editors::File(ed), gws, f, Some(syncer))
            }
        };
    // Everyone sees every gateway before the measurement starts.
    wait_until(
        "the observer to see every gateway",
        Duration::from_secs(60),
        || {
            let v = observer_view.read().unwrap();
            gws.nodes.iter().all(|n| v.gateways.contains_key(n))
        },
    )?;

    // Editors.
    let per_editor = cfg.changes.div_ceil(cfg.editors);
    let acked: Mutex<Vec<Acked>> = Mutex::new(Vec::new());
    let stale = std::sync::atomic::AtomicU64::new(0);
    let gap = Duration::from_millis(a.change_gap_ms);
    let target = Target {
        iqn: TARGET.into(),
        portal: "127.0.0.1:3260".into(),
    };
    std::thread::scope(|s| -> anyhow::Result<()> {
        let mut handles = Vec::new();
        for e in 0..cfg.editors {
            let (editors, acked, stale, target, gws, cluster) =
                (&editors, &acked, &stale, &target, &gws, &cluster);
            let n = per_editor.min(cfg.changes.saturating_sub(e * per_editor));
            handles.push(s.spawn(move || -> anyhow::Result<()> {
                let zk_session = match editors {
                    Editors::Zk { spec, opts } => Some(coord::connect(spec, opts)?),
                    Editors::File(_) => None,
                };
                let map = match &zk_session {
                    Some(c) => Some(LunMap::open(&**c, cluster)?),
                    None => None,
                };
                let mut clients = gws
                    .addrs
                    .iter()
                    .map(|a| GatewayClient::connect(*a))
                    .collect::<std::io::Result<Vec<_>>>()?;
                for k in 0..n {
                    let initiator = format!("iqn.2026-11.lab.host:e{e}-c{k}");
                    match (&map, editors) {
                        (Some(m), _) => {
                            m.map(LUN, target, &initiator)?;
                        }
                        (None, Editors::File(f)) => {
                            f.map(LUN, target, &initiator)?;
                        }
                        _ => unreachable!("editor without backend"),
                    }
                    let ack_ns = mono_ns();
                    acked.lock().unwrap().push(Acked {
                        initiator: initiator.clone(),
                        ack_ns,
                    });
                    for c in clients.iter_mut() {
                        let (r, _) = c.read(LUN, TARGET, &initiator, 0, 4096)?;
                        if r.refused {
                            stale.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        } else if !r.ok {
                            bail!("gateway I/O failed: {}", r.error);
                        }
                    }
                    std::thread::sleep(gap);
                }
                Ok(())
            }));
        }
        for h in handles {
            h.join()
                .map_err(|_| anyhow::anyhow!("editor thread panicked"))??;
        }
        Ok(())
    })?;
    let acked = acked.into_inner().unwrap();

    // The final map: acknowledged changes missing from it are lost updates.
    let final_initiators: std::collections::HashSet<String> = match &editors {
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
    };
    let lost_updates = acked
        .iter()
        .filter(|x| !final_initiators.contains(&x.initiator))
        .count();
    let surviving: Vec<&Acked> = acked
        .iter()
        .filter(|x| final_initiators.contains(&x.initiator))
        .collect();
    // Wait until every gateway applied every surviving change.
    let settle =
        Duration::from_millis(3 * (a.sync_interval_ms + a.poll_ms)) + Duration::from_secs(30);
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
    {
        let l = log.lock().unwrap();
        for x in &surviving {
            let last = (0..cfg.gateways)
                .map(|g| l.mapped.get(&(g, x.initiator.clone())).copied())
                .collect::<Option<Vec<u64>>>();
            if let Some(ts) = last {
                let max = ts.into_iter().max().unwrap_or(x.ack_ns);
                // A gateway can apply a change before the editor sees its acknowledgement.
                hist.record(max.saturating_sub(x.ack_ns) / 1000);
            }
        }
    }
    let p = hist.percentiles();

    // Failure detection: SIGKILL gw0; every other gateway and the observer must notice.
    let victim = gws.nodes[0].clone();
    let mut gws = gws;
    let kill_ns;
    {
        let child = gws.children[0].as_mut().context("gateway 0")?;
        kill_ns = mono_ns();
        child.kill().context("SIGKILL of gateway 0")?;
        let _ = child.wait();
    }
    gws.children[0] = None;
    let detect_budget = session_timeout
        .max(filesync::master_down(Duration::from_millis(a.advert_ms)))
        + Duration::from_secs(30);
    wait_until(
        "every party to notice the dead gateway",
        detect_budget,
        || {
            let l = log.lock().unwrap();
            observer_down.lock().unwrap().contains_key(&victim)
                && (1..cfg.gateways).all(|g| l.down.contains_key(&(g, victim.clone())))
        },
    )?;
    let detected = {
        let l = log.lock().unwrap();
        let mut t = observer_down.lock().unwrap()[&victim];
        for g in 1..cfg.gateways {
            t = t.max(l.down[&(g, victim.clone())]);
        }
        t
    };
    drop(gws);
    if let Editors::Zk { spec, opts } = &editors {
        // Leave the shared server small: remove this run's subtree.
        if let Ok(c) = coord::connect(spec, opts) {
            let _ = coord::delete_recursive(&*c, &layout.root());
        }
    }
    let ms = |us: u64| us as f64 / 1000.0;
    Ok(Row {
        backend: cfg.backend.to_string(),
        gateways: cfg.gateways,
        editors: cfg.editors,
        changes: acked.len(),
        repetition: cfg.rep,
        propagation_p50_ms: ms(p.p50),
        propagation_p99_ms: ms(p.p99),
        propagation_max_ms: ms(p.max),
        lost_updates,
        stale_reads: stale.into_inner(),
        detect_dead_ms: detected.saturating_sub(kill_ns) as f64 / 1e6,
    })
}

fn main() -> std::process::ExitCode {
    harness::exit_on_error("exp-lunmap", run(Args::parse()))
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
    // Quick keeps 3 repetitions too: with 24 changes a p99 is the largest of them, and the
    // claims take the median run, which one VM stall must not decide.
    let reps = a.common.repetitions_or(3, 3);
    let set = DeviceSet::setup(&a.common, 1, LUN_SIZE, 64 << 20)?;
    let device = set.paths()[0].display().to_string();
    let mut meta = RunMeta::start("exp-lunmap", a.common.profile);
    meta.devices = set.describe();
    let mut csv = CsvOut::<Row>::create(&a.common.out, "exp-lunmap.csv", a.common.overwrite)?;

    let needs_zk = a.backends.iter().any(|b| *b != BackendKind::Filesync);
    let (_server, zk_spec) = match (&a.coord, needs_zk) {
        (Some(s), _) => (None, Some(s.clone())),
        (None, true) => {
            eprintln!("starting a private ZooKeeper server");
            let z = ZkServer::start().context("starting ZooKeeper (Debian package zookeeper)")?;
            let spec = z.spec("/exp-lunmap");
            (Some(z), Some(spec))
        }
        (None, false) => (None, None),
    };
    meta.extra = serde_json::json!({
        "zookeeper": zk_spec.as_ref().map(|s| s.to_string()),
        "session_timeout_ms": a.session_timeout_ms,
        "sync_interval_ms": a.sync_interval_ms,
        "poll_ms": a.poll_ms,
        "advert_ms": a.advert_ms,
        "master_down_ms": filesync::master_down(Duration::from_millis(a.advert_ms)).as_millis() as u64,
        "change_gap_ms": a.change_gap_ms,
        "changes": changes,
        "lun_size_bytes": LUN_SIZE,
    });
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
                    };
                    let row = run_one(&a, &bin, zk_spec.as_ref(), &cfg)
                        .with_context(|| format!("{b} gateways={g} editors={e} rep={rep}"))?;
                    progress.step(&format!(
                        "{b} g={g} e={e}: p99 {:.1} ms, lost {}, stale {}, detect {:.0} ms",
                        row.propagation_p99_ms,
                        row.lost_updates,
                        row.stale_reads,
                        row.detect_dead_ms
                    ));
                    csv.write(&row)?;
                }
            }
        }
    }
    progress.finish();
    let out = meta.finish(&a.common.out, a.common.overwrite)?;
    eprintln!("wrote {} and {}", csv.path().display(), out.display());
    Ok(())
}
