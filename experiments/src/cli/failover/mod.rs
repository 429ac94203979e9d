//! `blocklab mgmt serve|block-service` and `blocklab volume create|delete|copy|list`.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use blocklab::coord::CoordSpec;
use blocklab::failover::client::Client;
use blocklab::failover::dispatcher::Timing;
use blocklab::failover::node::{run_node, Mode, NodeConfig};
use blocklab::failover::service::{JournalSpec, Service, ServiceConfig};
use blocklab::failover::vip::{VipBackend, VipKind};
use blocklab::failover::wire::{Op, OpResult};
use blocklab::volume::StoreConfig;
use clap::{Args, Subcommand};

use crate::args::{parse_bytes, parse_positive_duration, parse_size};

pub mod cluster;

#[derive(Debug, Subcommand)]
pub enum MgmtCmd {
    /// Run one storage node's management service and task dispatcher.
    Serve(ServeArgs),
    /// Run the block service the nodes act on (volume store + operation journal).
    BlockService(BlockServiceArgs),
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// This node's id (must appear in --peers).
    #[arg(long)]
    pub node: u32,
    /// Every node's heartbeat (UDP) address: `ID=IP:PORT,ID=IP:PORT,...`.
    #[arg(long, value_parser = parse_peers, value_delimiter = ',', required = true)]
    pub peers: Vec<(u32, SocketAddr)>,
    /// The block service's address.
    #[arg(long)]
    pub service: SocketAddr,
    /// The virtual IP (loopback: an address in 127.0.0.0/8).
    #[arg(long)]
    pub vip: IpAddr,
    /// The management port clients use on the VIP.
    #[arg(long)]
    pub port: u16,
    /// vip_handoff (the mechanism) or client_retry (baseline: no VIP; listen on --listen).
    #[arg(long, default_value = "vip_handoff")]
    pub mode: Mode,
    /// This node's own request address (client_retry only).
    #[arg(long)]
    pub listen: Option<SocketAddr>,
    /// Heartbeat period, e.g. 100ms.
    #[arg(long, value_name = "DURATION", value_parser = parse_positive_duration, default_value = "100ms")]
    pub heartbeat: Duration,
    /// A peer silent for more than this many periods is dead.
    #[arg(long, default_value_t = 3)]
    pub dead_after: u64,
    /// A holder silent for more than this many periods is replaced (> --dead-after).
    #[arg(long, default_value_t = 4)]
    pub takeover_after: u64,
    /// loopback (bind the VIP on 127.x; no privileges) or netns (run inside the node's
    /// network namespace as root; the VIP is a macvlan with a virtual MAC).
    #[arg(long, default_value = "loopback")]
    pub vip_backend: VipKind,
    /// netns: the node's interface the VIP macvlan sits on.
    #[arg(long, default_value = "eth0")]
    pub netns_lower: String,
    /// netns: name of the VIP macvlan.
    #[arg(long, default_value = "vip0")]
    pub netns_vip_dev: String,
    /// netns: the VIP's virtual MAC (the same on every node, as with VRRP).
    #[arg(long, default_value = "02:00:5e:00:01:01")]
    pub netns_mac: String,
}

#[derive(Debug, Args)]
pub struct BlockServiceArgs {
    /// Address to listen on.
    #[arg(long)]
    pub listen: SocketAddr,
    /// VIP:port where results go when their submitter died.
    #[arg(long)]
    pub vip: SocketAddr,
    /// Directory of the volume catalog and the operation journal.
    #[arg(long)]
    pub state_dir: PathBuf,
    /// The devices volumes are carved from (block devices or files), comma separated.
    #[arg(long, value_delimiter = ',', required = true)]
    pub devices: Vec<PathBuf>,
    /// Use devices that hold other data (destroys it).
    #[arg(long)]
    pub force: bool,
    /// Copy chunk size (K/M/G suffix; a positive multiple of 4K).
    #[arg(long, value_parser = parse_size, default_value = "1M")]
    pub copy_chunk: u64,
    /// Copy chunks in flight (1..=2048).
    #[arg(long, default_value_t = 8)]
    pub copy_depth: usize,
    /// Cap copy throughput at this many bytes per second, e.g. 64M for 64 MiB/s (0 = full
    /// speed); lets small test volumes copy as long as large ones would.
    #[arg(long, value_parser = parse_bytes, default_value = "0")]
    pub copy_rate: u64,
    /// A node whose pings stop for this long is dead, e.g. 500ms: its session-bound
    /// (client_retry) operations are abandoned.
    #[arg(long, value_name = "DURATION", value_parser = parse_positive_duration, default_value = "500ms")]
    pub session_timeout: Duration,
    /// Where the operation journal lives: `file` (journal.jsonl in --state-dir),
    /// `embedded:PATH` or `zk://host:port[,...][/chroot]` (the coordination backend).
    #[arg(long, default_value = "file")]
    pub journal: String,
    /// Path of the journal in the coordination backend.
    #[arg(long, default_value = "/blocklab/failover")]
    pub journal_root: String,
    /// Crash injection (tests): stop dead after this operation's catalog commit, before
    /// its journal `Done` record.
    #[arg(long, hide = true)]
    pub crash_after_commit: Option<String>,
}

#[derive(Debug, Args)]
pub struct VolumeArgs {
    /// The management VIP and port.
    #[arg(long)]
    pub vip: SocketAddr,
    /// Operation id (default: a fresh UUID). Re-using an id returns the first result.
    #[arg(long)]
    pub op_id: Option<String>,
    /// Re-send the same operation id after this long without any message, e.g. 5s (the
    /// holder forwards keepalives while an operation runs).
    #[arg(long, value_name = "DURATION", value_parser = parse_positive_duration, default_value = "5s")]
    pub resend: Duration,
    /// Give up after this long without any message, e.g. 60s (not of total time: a long
    /// copy that keeps sending keepalives is waited for).
    #[arg(long, value_name = "DURATION", value_parser = parse_positive_duration, default_value = "60s")]
    pub give_up: Duration,
    #[command(subcommand)]
    pub cmd: VolumeCmd,
}

#[derive(Debug, Subcommand)]
pub enum VolumeCmd {
    /// Create a volume.
    Create {
        name: String,
        /// Size (K/M/G/T suffix).
        #[arg(long, value_parser = parse_size)]
        size: u64,
    },
    /// Delete a volume.
    Delete { name: String },
    /// Copy a volume into a new one.
    Copy { src: String, dst: String },
    /// List volumes.
    List,
}

fn parse_peers(s: &str) -> Result<(u32, SocketAddr), String> {
    let (id, addr) = s
        .split_once('=')
        .ok_or_else(|| format!("peer {s:?} is not ID=IP:PORT"))?;
    Ok((
        id.parse().map_err(|e| format!("peer id {id:?}: {e}"))?,
        addr.parse()
            .map_err(|e| format!("peer address {addr:?}: {e}"))?,
    ))
}

fn stop_flag() -> anyhow::Result<Arc<AtomicBool>> {
    let stop = Arc::new(AtomicBool::new(false));
    let s = stop.clone();
    ctrlc::set_handler(move || s.store(true, Ordering::Relaxed))
        .context("installing the signal handler")?;
    Ok(stop)
}

pub fn run_mgmt(cmd: MgmtCmd) -> anyhow::Result<()> {
    match cmd {
        MgmtCmd::Serve(a) => {
            let cfg = node_config(a)?;
            let stop = stop_flag()?;
            run_node(cfg, stop).context("management node")?;
        }
        MgmtCmd::BlockService(a) => {
            let svc = Service::start(service_config(a)?).context("starting the block service")?;
            println!("event=service_listening addr={}", svc.addr);
            let stop = stop_flag()?;
            svc.wait(&stop).context("block service")?;
        }
    }
    Ok(())
}

/// `mgmt serve`'s node, from its checked arguments.
fn node_config(a: ServeArgs) -> anyhow::Result<NodeConfig> {
    if a.peers.is_empty() {
        bail!("--peers is empty");
    }
    let mode = a.mode;
    let listen = match (mode, a.listen) {
        (Mode::ClientRetry, None) => bail!("--mode client_retry needs --listen"),
        (_, Some(l)) => l,
        (_, None) => SocketAddr::new(a.vip, a.port),
    };
    let vip = match a.vip_backend {
        VipKind::Loopback => {
            if !a.vip.is_loopback() {
                bail!(
                    "--vip {} is not in 127.0.0.0/8 (the loopback backend)",
                    a.vip
                );
            }
            VipBackend::Loopback { vip: a.vip }
        }
        VipKind::Netns => VipBackend::Netns {
            vip: a.vip,
            lower: a.netns_lower,
            vip_dev: a.netns_vip_dev,
            mac: a.netns_mac,
        },
    };
    if a.takeover_after <= a.dead_after {
        bail!("--takeover-after must exceed --dead-after");
    }
    Ok(NodeConfig {
        id: a.node,
        peers: a.peers,
        service: a.service,
        vip,
        port: a.port,
        listen,
        mode,
        heartbeat: a.heartbeat,
        timing: Timing {
            dead_after: a.dead_after,
            takeover_after: a.takeover_after,
        },
    })
}

/// `mgmt block-service`'s service, from its arguments.
fn service_config(a: BlockServiceArgs) -> anyhow::Result<ServiceConfig> {
    Ok(ServiceConfig {
        listen: a.listen,
        vip: a.vip,
        state_dir: a.state_dir,
        devices: a.devices,
        store: StoreConfig {
            copy_chunk: a.copy_chunk,
            copy_depth: a.copy_depth,
            ..StoreConfig::default()
        },
        force: a.force,
        deliver_for: Duration::from_secs(120),
        copy_rate: (a.copy_rate > 0).then_some(a.copy_rate),
        session_timeout: a.session_timeout,
        journal: if a.journal == "file" {
            JournalSpec::File
        } else {
            JournalSpec::Coord {
                spec: CoordSpec::parse(&a.journal).context("--journal")?,
                root: a.journal_root,
            }
        },
        crash_after_commit: a.crash_after_commit,
    })
}

pub fn run_volume(a: VolumeArgs) -> anyhow::Result<()> {
    let mut client = Client::new(vec![a.vip]);
    client.resend_after = a.resend;
    client.give_up = a.give_up;
    let op = match a.cmd {
        VolumeCmd::Create { name, size } => Op::Create { name, size },
        VolumeCmd::Delete { name } => Op::Delete { name },
        VolumeCmd::Copy { src, dst } => Op::Copy { src, dst },
        VolumeCmd::List => {
            for v in client.list().context("list")? {
                println!("{}\t{}", v.name, v.size);
            }
            return Ok(());
        }
    };
    let op_id = a.op_id.unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    let (result, info) = client
        .call(&op_id, &op, None)
        .with_context(|| format!("{} (operation {op_id})", op.kind()))?;
    match result {
        OpResult::Error { message } => bail!("{message} (operation {op_id})"),
        OpResult::Created { name, size } => println!("created {name} ({size} bytes)"),
        OpResult::Deleted { name } => println!("deleted {name}"),
        OpResult::Copied { src, dst, bytes } => println!("copied {src} to {dst} ({bytes} bytes)"),
    }
    eprintln!("operation {op_id}: {} attempt(s)", info.attempts);
    Ok(())
}
