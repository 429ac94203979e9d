//! `blocklab repl serve|write|status`: a replica process, and a client of one.

use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use blocklab::repl::client::Client;
use blocklab::repl::events::EventLog;
use blocklab::repl::kv::put_payload;
use blocklab::repl::replica::{self, NoHooks, PolicySpec, Regions, ReplicaOptions, ReplicaReport};
use blocklab::repl::NodeId;
use clap::{Args, Subcommand};

use crate::args::{parse_duration, parse_positive_duration, parse_size};

#[derive(Debug, Subcommand)]
pub enum ReplCmd {
    /// Run one replica (primary or secondary) on a device until SIGTERM/SIGINT.
    ///
    /// Prints `listening on ADDR` once the device is open. A device holding a replication
    /// log is recovered (restart), unless the log is damaged in the middle; an empty device
    /// gets a new log; anything else (a formatted daemon device without a replication log
    /// included) is refused unless --force. A block device is opened exclusively: one that
    /// is mounted or used by another replica is refused.
    Serve(ServeArgs),
    /// Write KEY=VALUE through the primary; prints the committed index.
    Write {
        /// The primary's address.
        #[arg(long)]
        to: SocketAddr,
        #[arg(long)]
        key: u64,
        #[arg(long)]
        value: String,
    },
    /// Print a replica's status.
    Status {
        #[arg(long)]
        to: SocketAddr,
    },
}

// `repl serve`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// This replica's id.
    #[arg(long)]
    id: NodeId,
    /// Every member's id, comma separated (this one included).
    #[arg(long, value_delimiter = ',', required = true)]
    members: Vec<NodeId>,
    /// The primary's id.
    #[arg(long, default_value_t = 0)]
    primary: NodeId,
    /// Address to listen on (port 0: any free port).
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// Primary only: every secondary's address, as ID=HOST:PORT, comma-separated.
    #[arg(long, value_parser = parse_peer, value_delimiter = ',')]
    peers: Vec<(NodeId, SocketAddr)>,
    /// Block device (or regular file) holding the log and the storage engine.
    #[arg(long)]
    device: PathBuf,
    /// Commit notification: piggyback, periodic:H, eager, idle_ack (the patent's), idle_commit,
    /// idle_delayed:D with H and D durations, e.g. periodic:50ms (see docs/repl.md).
    #[arg(long, default_value = "idle_ack", value_parser = parse_policy)]
    policy: PolicySpec,
    /// Length of a protocol tick, e.g. 100us.
    #[arg(long, value_name = "DURATION", value_parser = parse_positive_duration, default_value = "100us")]
    tick: Duration,
    /// Resend unacknowledged entries or notifications after this long, e.g. 200ms.
    #[arg(long, value_name = "DURATION", value_parser = parse_positive_duration, default_value = "200ms")]
    retransmit: Duration,
    /// Size of the log region (K/M/G) on a device that is not formatted; on a formatted
    /// daemon device the log lives in its log region.
    #[arg(long, default_value = "64M", value_parser = parse_size)]
    log_size: u64,
    /// Size of the storage engine's data region (K/M/G).
    #[arg(long, default_value = "16M", value_parser = parse_size)]
    data_size: u64,
    /// Start a new, empty log even if the device holds one.
    #[arg(long)]
    fresh: bool,
    /// Give every entry a durable write of its own instead of one per batch (group
    /// commit, the default): the number of log flushes is then the number of entries.
    #[arg(long)]
    no_group_commit: bool,
    /// Write the replica's timeline (proposals, commits, persists, applies, message
    /// counters, on CLOCK_MONOTONIC) to this file, which is created or truncated.
    #[arg(long, value_name = "FILE")]
    events: Option<PathBuf>,
    /// Use a device that holds anything but a replication log (another daemon's or
    /// cluster's format, a file system, other data): its log and data regions are
    /// overwritten.
    #[arg(long)]
    force: bool,
}

/// A commit-notification policy (`--policy` here, exp-commit's `--policies`): as
/// [`PolicySpec::parse`], with the duration of `periodic:H` and `idle_delayed:D` read by
/// the one duration parser, so it carries a unit (`periodic:50ms`, `idle_delayed:500us`).
pub fn parse_policy(s: &str) -> Result<PolicySpec, String> {
    let duration = |p: &str| parse_duration(p).map_err(|e| format!("{s:?}: {e}"));
    match s.split_once(':') {
        Some(("periodic", p)) => Ok(PolicySpec::Periodic(duration(p)?)),
        Some(("idle_delayed", p)) => Ok(PolicySpec::IdleDelayed(duration(p)?)),
        _ => PolicySpec::parse(s),
    }
}

fn parse_peer(s: &str) -> Result<(NodeId, SocketAddr), String> {
    let (id, addr) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?}: expected ID=HOST:PORT"))?;
    let id: NodeId = id
        .parse()
        .map_err(|_| format!("{s:?}: {id:?} is not a replica id"))?;
    let addr: SocketAddr = addr
        .parse()
        .map_err(|_| format!("{s:?}: {addr:?} is not HOST:PORT"))?;
    Ok((id, addr))
}

pub fn run(cmd: ReplCmd) -> anyhow::Result<()> {
    match cmd {
        ReplCmd::Serve(a) => serve(a)?,
        ReplCmd::Write { to, key, value } => {
            let mut c = Client::connect(to, Duration::from_secs(10))?;
            let index = c.write(put_payload(key, value.as_bytes()))?;
            println!("{index}");
        }
        ReplCmd::Status { to } => {
            let mut c = Client::connect(to, Duration::from_secs(10))?;
            let s = c.status()?;
            println!(
                "id {} primary {} term {} last_index {} durable {} commit {} applied {}",
                s.id, s.primary, s.term, s.last_index, s.durable_index, s.commit, s.applied
            );
        }
    }
    Ok(())
}

/// `repl serve`: runs the replica until SIGTERM/SIGINT, then prints what it did.
fn serve(a: ServeArgs) -> anyhow::Result<()> {
    let (id, device) = (a.id, a.device.clone());
    let hooks: Box<dyn replica::Hooks> = match &a.events {
        Some(p) => {
            Box::new(EventLog::create(p).with_context(|| format!("creating {}", p.display()))?)
        }
        None => Box::new(NoHooks),
    };
    let (opts, addr) = replica_options(a)?;
    let stop = Arc::new(AtomicBool::new(false));
    let s2 = stop.clone();
    ctrlc::set_handler(move || s2.store(true, Ordering::SeqCst))
        .context("installing the SIGTERM/SIGINT handler")?;
    let (tx, rx) = std::sync::mpsc::channel();
    let t = std::thread::spawn(move || replica::run(opts, hooks, stop, Some(tx)));
    if rx.recv().is_ok() {
        use std::io::Write;
        println!("listening on {addr}");
        std::io::stdout().flush()?;
    }
    let report = t
        .join()
        .map_err(|_| anyhow::anyhow!("replica thread panicked"))?
        .with_context(|| format!("replica {id} on {}", device.display()))?;
    print_report(id, &report);
    Ok(())
}

/// Checks the arguments, finds the device's regions and binds the listener: the replica's
/// options and the address it listens on.
fn replica_options(a: ServeArgs) -> anyhow::Result<(ReplicaOptions, SocketAddr)> {
    let ServeArgs {
        id,
        members,
        primary,
        listen,
        peers,
        device,
        policy,
        tick,
        retransmit,
        log_size,
        data_size,
        fresh,
        no_group_commit,
        events: _,
        force,
    } = a;
    if !members.contains(&id) {
        bail!("--id {id} is not among --members {members:?}");
    }
    let (regions, formatted) = Regions::detect(&device, log_size, data_size)
        .with_context(|| format!("reading {}", device.display()))?;
    if formatted {
        eprintln!(
            "{}: formatted daemon device: log in its log region ({} bytes at {}), storage engine in its data region",
            device.display(),
            regions.log_len,
            regions.log_offset
        );
    }
    let listener = TcpListener::bind(listen).with_context(|| format!("listening on {listen}"))?;
    let addr = listener.local_addr()?;
    let opts = ReplicaOptions {
        id,
        members,
        primary,
        peers,
        listener,
        device,
        regions,
        policy,
        tick,
        retransmit,
        fresh,
        force,
        group_commit: !no_group_commit,
    };
    Ok((opts, addr))
}

/// The line `repl serve` prints when its replica stopped.
fn print_report(id: NodeId, report: &ReplicaReport) {
    let s = report.stats;
    eprintln!(
        "replica {id} stopped: term {} last_index {} commit {} applied {} \
         apply_rejected {} log_flushes {} appends_with_entries {} empty_appends {} \
         empty_responses {} probes {} retransmits {}",
        report.term,
        report.last_index,
        report.commit,
        report.applied,
        report.apply_rejected,
        report.log_flushes,
        s.appends_with_entries,
        s.empty_appends,
        s.empty_responses,
        s.probes,
        s.retransmits
    );
}
