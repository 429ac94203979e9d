//! `blocklab mkfs|inspect|monitor|node|init`: the daemon's device side, the monitor, the
//! node agents and the orchestrator of daemon initialisation.

use std::io::Write;
use std::net::TcpListener;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use blocklab::ceph::CephConf;
use blocklab::coord::{self, ConnectOptions, CoordSpec};
use blocklab::daemon::{self, DaemonError, MkfsRequest, Phase};
use blocklab::dev::{Device, UringEngine};
use blocklab::init::{self, CephNodeAgent, Node, NodeAgent, NodeInitRequest, RemoteNode, Strategy};
use blocklab::monitor::coord_store::DEFAULT_MAP_PATH;
use blocklab::monitor::{
    CoordStore, DaemonState, FileJournal, MapStore, Monitor, MonitorClient, ProposeConfig,
};
use clap::{Args, Subcommand};
use uuid::Uuid;

use crate::args::parse_duration;

/// `blocklab mkfs`.
#[derive(Debug, Args)]
pub struct MkfsArgs {
    /// The block device (or regular file) to format.
    pub device: PathBuf,
    /// The cluster's fsid (the monitor's map has it: `blocklab monitor map`).
    #[arg(long)]
    pub cluster_fsid: Uuid,
    /// The daemon id this device is formatted for.
    #[arg(long)]
    pub id: u32,
    /// Overwrite whatever the device holds (another label, a filesystem, data).
    #[arg(long)]
    pub force: bool,
    /// Testing: die by SIGKILL right after this mkfs phase (probe, label, superblock, log,
    /// bitmap, flush, commit).
    #[arg(long, hide = true)]
    pub crash_after: Option<Phase>,
}

/// `blocklab inspect`.
#[derive(Debug, Args)]
pub struct InspectArgs {
    /// The device to read.
    pub device: PathBuf,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Subcommand)]
pub enum MonitorCmd {
    /// Run a monitor: TCP server, map journaled (fsync) to a file, proposals batched.
    Serve {
        /// Address to listen on (port 0: any free port; the chosen address is printed).
        #[arg(long, default_value = "127.0.0.1:6789")]
        listen: String,
        /// The journal file (created with a new cluster if missing).
        #[arg(long, required_unless_present = "store", conflicts_with = "store")]
        journal: Option<PathBuf>,
        /// Keep the map on a coordination backend instead: embedded:PATH or
        /// zk://host:port[,host:port...][/chroot] (node /blocklab/monitor/map).
        #[arg(long)]
        store: Option<String>,
        /// Least time between two proposals, e.g. 50ms (Ceph's default: 1s).
        #[arg(long, value_name = "DURATION", value_parser = parse_duration, default_value = "1s")]
        propose_interval: Duration,
        /// Least time a change waits for company when the monitor was idle, e.g. 50ms
        /// (Ceph's paxos_min_wait: 50ms; capped at the propose interval).
        #[arg(long, value_name = "DURATION", value_parser = parse_duration, default_value = "0s")]
        min_wait: Duration,
        /// fsid of a new cluster (default: random); must match an existing journal.
        #[arg(long)]
        fsid: Option<Uuid>,
    },
    /// Remove a daemon from the map (its id becomes free again). An `up` daemon only
    /// with --force.
    Remove {
        /// The monitor's address.
        #[arg(long)]
        monitor: String,
        /// The daemon's id.
        #[arg(long)]
        id: u32,
        /// Remove it even if it is up.
        #[arg(long)]
        force: bool,
    },
    /// Print the monitor's committed map.
    Map {
        /// The monitor's address.
        #[arg(long)]
        monitor: String,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
}

/// Which cluster daemons are initialised in: blocklab's monitor, or a Ceph cluster
/// `blocklab ceph create` made.
#[derive(Debug, Args)]
#[group(required = true, multiple = false)]
pub struct ClusterArgs {
    /// blocklab's monitor, by address.
    #[arg(long)]
    pub monitor: Option<String>,
    /// A Ceph cluster `blocklab ceph create` made, by its directory: the daemons are
    /// BlueStore OSDs.
    #[arg(long, value_name = "DIR")]
    pub ceph: Option<PathBuf>,
}

/// A node agent's identity and devices.
#[derive(Debug, Args)]
pub struct NodeArgs {
    /// The node's name (unique in the cluster).
    #[arg(long)]
    pub name: String,
    #[command(flatten)]
    pub cluster: ClusterArgs,
    /// The devices this node owns, comma-separated.
    #[arg(long, required = true, value_delimiter = ',')]
    pub devices: Vec<PathBuf>,
    /// How long to keep retrying an unreachable monitor, e.g. 5s.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration, default_value = "5s")]
    pub connect_retry: Duration,
}

#[derive(Debug, Subcommand)]
pub enum NodeCmd {
    /// Run a node agent that the orchestrator (`blocklab init`) drives over TCP.
    Serve {
        #[command(flatten)]
        node: NodeArgs,
        /// Address to listen on (port 0: any free port; the chosen address is printed).
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: String,
    },
    /// Initialise this node's daemons now: each daemon requests its own id, formats its
    /// device, registers and reports.
    Init {
        #[command(flatten)]
        node: NodeArgs,
        /// Initialise the daemons in parallel (else one by one).
        #[arg(long)]
        parallel: bool,
        /// Overwrite foreign data on the devices.
        #[arg(long)]
        force: bool,
    },
}

/// `blocklab init`: the orchestrator.
#[derive(Debug, Args)]
pub struct InitArgs {
    #[command(flatten)]
    pub cluster: ClusterArgs,
    /// Node agents' addresses (`blocklab node serve`), comma-separated.
    #[arg(long, required = true, value_delimiter = ',')]
    pub nodes: Vec<String>,
    /// sequential, parallel_nodes, parallel_daemons or parallel.
    #[arg(long, default_value = "parallel")]
    pub strategy: Strategy,
    /// Overwrite foreign data on the devices.
    #[arg(long)]
    pub force: bool,
}

pub fn mkfs(a: MkfsArgs) -> anyhow::Result<()> {
    let mut req = MkfsRequest::new(a.cluster_fsid, a.id);
    req.force = a.force;
    req.stop_after = a.crash_after;
    match daemon::mkfs_path(&a.device, &req) {
        Ok(rep) if rep.already_formatted => {
            println!(
                "{}: already formatted for cluster {} daemon {} (uuid {}): nothing to do",
                a.device.display(),
                a.cluster_fsid,
                a.id,
                rep.label.daemon_uuid
            );
            Ok(())
        }
        Ok(rep) => {
            let phases: Vec<String> = rep
                .phases
                .iter()
                .map(|(p, d)| format!("{p} {:.2} ms", d.as_secs_f64() * 1e3))
                .collect();
            println!(
                "{}: formatted for cluster {} daemon {} (uuid {}), {} bytes written in {:.2} ms [{}]",
                a.device.display(),
                a.cluster_fsid,
                a.id,
                rep.label.daemon_uuid,
                rep.bytes_written,
                rep.total().as_secs_f64() * 1e3,
                phases.join(", ")
            );
            Ok(())
        }
        Err(DaemonError::InjectedStop { .. }) => {
            let _ = std::io::stdout().flush();
            rustix::process::kill_process(rustix::process::getpid(), rustix::process::Signal::KILL)
                .context("killing myself for --crash-after")?;
            unreachable!("SIGKILL returned")
        }
        Err(e) => Err(e.into()),
    }
}

pub fn inspect(a: InspectArgs) -> anyhow::Result<()> {
    let dev = Device::open_read_only(&a.device)
        .with_context(|| format!("opening {}", a.device.display()))?;
    let mut eng = UringEngine::with_queue_depth(4)?;
    let ins = daemon::inspect(&mut eng, &dev)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&ins)?);
    } else {
        let l = &ins.label;
        println!("device        {}", ins.device);
        println!("size          {} bytes", ins.size_bytes);
        println!("cluster fsid  {}", l.cluster_fsid);
        println!("daemon id     {}", l.daemon_id);
        println!("daemon uuid   {}", l.daemon_uuid);
        println!("version       {}", blocklab::format::FORMAT_VERSION);
        println!("ready         {}", ins.ready);
        println!("birth (ns)    {}", l.birth_time_unix_ns);
        let y = &l.layout;
        println!("alloc unit    {}", y.alloc_unit);
        println!("superblock    @{}", y.superblock_offset);
        println!("log           @{} len {}", y.log_offset, y.log_len);
        println!("bitmap        @{} len {}", y.bitmap_offset, y.bitmap_len);
        println!("data          @{} len {}", y.data_offset, y.data_len);
        println!("label copies  {:?}", y.label_copies);
        match (&ins.mount_error, &ins.superblock) {
            (None, Some(sb)) => println!(
                "mountable     yes ({} of {} units free)",
                sb.free_units(),
                sb.total_units
            ),
            (Some(e), _) => println!("mountable     no: {e}"),
            _ => {}
        }
    }
    if let Some(e) = &ins.mount_error {
        bail!("{} does not mount: {e}", ins.device);
    }
    Ok(())
}

pub fn monitor(cmd: MonitorCmd) -> anyhow::Result<()> {
    match cmd {
        MonitorCmd::Serve {
            listen,
            journal,
            store,
            propose_interval,
            min_wait,
            fsid,
        } => {
            let (backend, what) = map_store(journal, store)?;
            let l = TcpListener::bind(&listen).with_context(|| format!("binding {listen}"))?;
            let config = ProposeConfig {
                propose_interval,
                min_wait,
            };
            let m = Monitor::start(l, backend, config, fsid)
                .with_context(|| format!("starting the monitor on {what}"))?;
            let map = m.map();
            println!(
                "monitor listening on {} cluster {} epoch {}",
                m.addr(),
                map.fsid,
                map.epoch
            );
            std::io::stdout().flush()?;
            // Serves until a commit fails; then there is nothing left to serve.
            Err(m.wait()).context("the monitor stopped")
        }
        MonitorCmd::Remove { monitor, id, force } => remove_daemon(&monitor, id, force),
        MonitorCmd::Map { monitor, json } => print_map(&monitor, json),
    }
}

/// Where `monitor serve` keeps the map (`--journal` or `--store`), and its description.
fn map_store(
    journal: Option<PathBuf>,
    store: Option<String>,
) -> anyhow::Result<(Box<dyn MapStore>, String)> {
    Ok(match (journal, store) {
        (Some(j), _) => (
            Box::new(FileJournal::new(&j)),
            format!("journal {}", j.display()),
        ),
        (None, Some(s)) => {
            let spec = CoordSpec::parse(&s)?;
            let c = coord::connect(&spec, &ConnectOptions::default())
                .with_context(|| format!("connecting to {spec}"))?;
            (
                Box::new(CoordStore::new(c, DEFAULT_MAP_PATH)),
                format!("store {spec}"),
            )
        }
        (None, None) => bail!("give --journal or --store"),
    })
}

/// `monitor remove`.
fn remove_daemon(monitor: &str, id: u32, force: bool) -> anyhow::Result<()> {
    let mut c = MonitorClient::connect(monitor, blocklab::monitor::DEFAULT_CONNECT_RETRY)?;
    let map = c.map()?;
    let Some(d) = map.daemons.get(&id) else {
        bail!("the map has no daemon {id}");
    };
    if d.state == DaemonState::Up && !force {
        bail!(
            "daemon {id} ({} of node {}) is up; use --force to remove it anyway",
            d.device,
            d.node
        );
    }
    let epoch = c.remove(id)?;
    println!(
        "removed daemon {id} ({} of node {}) in epoch {epoch}",
        d.device, d.node
    );
    Ok(())
}

/// `monitor map`.
fn print_map(monitor: &str, json: bool) -> anyhow::Result<()> {
    let mut c = MonitorClient::connect(monitor, blocklab::monitor::DEFAULT_CONNECT_RETRY)?;
    let map = c.map()?;
    if json {
        println!("{}", serde_json::to_string_pretty(&map)?);
    } else {
        println!("cluster {} epoch {}", map.fsid, map.epoch);
        for d in map.daemons.values() {
            println!(
                "{}\t{}\t{}\t{}\t{}",
                d.id,
                d.state,
                d.node,
                d.device,
                d.reason.as_deref().unwrap_or("")
            );
        }
    }
    Ok(())
}

/// The node agent `n` describes, of either backend.
fn agent(n: &NodeArgs) -> anyhow::Result<Box<dyn Node + Send>> {
    Ok(match (&n.cluster.monitor, &n.cluster.ceph) {
        (Some(m), _) => {
            Box::new(NodeAgent::new(&n.name, &n.devices, m)?.with_connect_retry(n.connect_retry))
        }
        (None, Some(dir)) => {
            let conf = CephConf::load(dir)?;
            Box::new(CephNodeAgent::new(&n.name, &n.devices, conf)?)
        }
        (None, None) => unreachable!("clap requires --monitor or --ceph"),
    })
}

fn print_outcomes(daemons: &[init::DaemonOutcome]) -> usize {
    let mut failed = 0;
    for d in daemons {
        let id = d.id.map(|i| i.to_string()).unwrap_or_else(|| "-".into());
        match &d.error {
            None if d.already_up => println!("{}\t{}\t{id}\tup\t(already up)", d.node, d.device),
            None => println!(
                "{}\t{}\t{id}\tup\t{:.1} ms{}",
                d.node,
                d.device,
                d.duration().as_secs_f64() * 1e3,
                if d.already_formatted {
                    " (already formatted)"
                } else {
                    ""
                }
            ),
            Some(e) => {
                failed += 1;
                println!("{}\t{}\t{id}\tfailed\t{e}", d.node, d.device)
            }
        }
    }
    failed
}

pub fn node(cmd: NodeCmd) -> anyhow::Result<()> {
    match cmd {
        NodeCmd::Serve { node, listen } => {
            let a = agent(&node)?;
            let l = TcpListener::bind(&listen).with_context(|| format!("binding {listen}"))?;
            let s = init::serve_node(a, l)?;
            println!("node {} listening on {}", node.name, s.addr());
            std::io::stdout().flush()?;
            s.wait();
            Ok(())
        }
        NodeCmd::Init {
            node,
            parallel,
            force,
        } => {
            let rep = agent(&node)?.init(&NodeInitRequest {
                keys: None,
                ids: None,
                parallel,
                force,
            })?;
            let failed = print_outcomes(&rep.daemons);
            if failed > 0 {
                bail!("{failed} of {} daemons failed", rep.daemons.len());
            }
            Ok(())
        }
    }
}

pub fn orchestrate(a: InitArgs) -> anyhow::Result<()> {
    let remotes: Vec<RemoteNode> = a.nodes.iter().map(|n| RemoteNode::new(n)).collect();
    let nodes: Vec<&dyn Node> = remotes.iter().map(|r| r as &dyn Node).collect();
    let run = match (&a.cluster.monitor, &a.cluster.ceph) {
        (Some(m), _) => init::run(
            a.strategy,
            m,
            &nodes,
            a.force,
            blocklab::monitor::DEFAULT_CONNECT_RETRY,
        )?,
        (None, Some(dir)) => init::run_ceph(a.strategy, &CephConf::load(dir)?, &nodes, a.force)?,
        (None, None) => unreachable!("clap requires --monitor or --ceph"),
    };
    let failed = print_outcomes(&run.daemons);
    println!(
        "{}: {} daemons in {:.1} ms, {} in flight at most, {} monitor proposals",
        run.strategy,
        run.daemons.len(),
        run.total.as_secs_f64() * 1e3,
        run.max_in_flight,
        run.monitor_proposals
            .map(|p| p.to_string())
            .unwrap_or_else(|| "? (monitor unreachable at the end)".into())
    );
    if failed > 0 {
        bail!("{failed} of {} daemons failed", run.daemons.len());
    }
    Ok(())
}
