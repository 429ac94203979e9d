//! exp-init's Ceph backend: BlueStore OSDs deployed into a private Ceph 16 cluster, a
//! fresh cluster (monitor on a free loopback port) per run, one `blocklab node serve
//! --ceph` process per node, the devices zeroed at their start (`force`) between runs.
//!
//! The bound of a repetition comes from measurements of the same repetition: the slowest
//! lone OSD deployment (an OSD of the `sequential` run, which deploys one at a time, from
//! its first step to its report), the CPU time of every OSD's deployment (the programs its
//! steps ran and the OSD daemon until up, measured while it ran alone in `sequential`)
//! spread over every CPU, and every mkfs's bytes at the devices' aggregate write
//! bandwidth. `bound_ms` is the largest of the three, the same for every strategy of the
//! repetition; without a `sequential` run it is missing (NaN).

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context};
use blocklab::ceph::{self, CephCluster};
use blocklab::init::{self, InitRun, Node, RemoteNode, Strategy};
use harness::child::Announced;
use harness::DeviceSet;

use crate::{aggregate_bandwidth, ms, rotated, Backend, Cli, Out, RunKey};

/// Ceph's `paxos_propose_interval` default (the clusters keep Ceph's defaults), for the
/// `propose_interval_ms` column.
const CEPH_PROPOSE_INTERVAL: Duration = Duration::from_secs(1);

/// What the Ceph backend sweeps.
pub struct Sweep {
    shapes: Vec<(usize, usize)>,
    size: u64,
    strategies: Vec<Strategy>,
    reps: u32,
    bin: PathBuf,
}

impl Sweep {
    pub fn new(cli: &Cli, strategies: &[Strategy], reps: u32) -> anyhow::Result<Sweep> {
        let a = &cli.common;
        let shapes =
            harness::args::or_default(&cli.ceph_shapes, a.pick(vec![(2, 2)], vec![(3, 8)]));
        if let Some(why) = unavailable(a) {
            bail!("the Ceph backend cannot run: {why}");
        }
        if cli.ceph_device_size < 1 << 30 {
            bail!("--ceph-device-size must be at least 1G (BlueStore's own metadata needs room)");
        }
        Ok(Sweep {
            shapes,
            size: cli.ceph_device_size,
            strategies: strategies.to_vec(),
            reps,
            bin: harness::blocklab_bin(None)?,
        })
    }

    fn max_devices(&self) -> usize {
        self.shapes.iter().map(|(n, d)| n * d).max().unwrap_or(1)
    }

    pub fn steps(&self) -> u64 {
        (self.shapes.len() * self.reps as usize * self.strategies.len()) as u64
    }

    /// The sweep, for meta.json.
    pub fn describe(&self) -> serde_json::Value {
        serde_json::json!({
            "shapes": self.shapes.iter().map(|(n, d)| format!("{n}x{d}")).collect::<Vec<_>>(),
            "device_size_bytes": self.size,
            "propose_interval_ms": CEPH_PROPOSE_INTERVAL.as_millis() as u64,
        })
    }
}

/// Why the Ceph backend cannot run here, if it cannot: OSDs need block devices (root, not
/// --files) and Ceph's programs.
pub fn unavailable(a: &harness::CommonArgs) -> Option<String> {
    if a.files.is_some() {
        return Some("--files gives regular files; OSDs need block devices".into());
    }
    if a.devices.is_empty() && !rustix::process::geteuid().is_root() {
        return Some("loop devices need root".into());
    }
    if let Some((what, package)) = ceph::missing() {
        return Some(format!("{what} is missing: apt-get install {package}"));
    }
    None
}

/// Every shape and repetition; the device set's description.
pub fn run(cli: &Cli, sweep: &Sweep, out: &mut Out) -> anyhow::Result<serde_json::Value> {
    let mut args = cli.common.clone();
    args.size = Some(sweep.size);
    let set = DeviceSet::setup(&args, sweep.max_devices(), 1 << 30, sweep.size)?;
    let described = set.describe();
    out.prog.note(&format!(
        "ceph: {} devices of {} bytes: {}",
        sweep.max_devices(),
        set.size(),
        set.paths()[0].display()
    ));
    let state = tempfile::Builder::new()
        .prefix("exp-init-ceph-")
        .tempdir_in("/var/tmp")
        .context("creating the clusters' directory")?;
    for rep in 0..sweep.reps {
        for &(n, d) in &sweep.shapes {
            let paths = &set.paths()[..n * d];
            let bw = aggregate_bandwidth(paths, cli.bandwidth_size)?;
            let mut runs = Vec::new();
            for strategy in rotated(&sweep.strategies, rep) {
                let k = RunKey {
                    backend: Backend::Ceph,
                    strategy,
                    nodes: n,
                    dpn: d,
                    size: set.size(),
                    interval: CEPH_PROPOSE_INTERVAL,
                    rep,
                };
                let (run, rss) = run_one(&k, paths, &sweep.bin, state.path())
                    .with_context(|| format!("ceph {strategy} on {n}x{d}, repetition {rep}"))?;
                runs.push((k, run, rss));
            }
            let (bound, mut record) = bound(&runs, bw);
            record["backend"] = "ceph".into();
            record["nodes"] = n.into();
            record["daemons_per_node"] = d.into();
            record["repetition"] = rep.into();
            out.measured.push(record);
            for (k, run, rss) in &runs {
                out.record(k, run, bound, Some(*rss))?;
            }
        }
    }
    set.teardown()?;
    Ok(described)
}

/// The repetition's bound (see the module docs) and its inputs for meta.json.
fn bound(runs: &[(RunKey, InitRun, u64)], bandwidth: f64) -> (Option<Duration>, serde_json::Value) {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    let seq = runs
        .iter()
        .find(|(k, ..)| k.strategy == Strategy::Sequential);
    let Some((_, seq, _)) = seq else {
        return (
            None,
            serde_json::json!({"note": "no sequential run: no bound"}),
        );
    };
    let lone = seq
        .daemons
        .iter()
        .map(|o| o.duration())
        .max()
        .unwrap_or_default();
    let cpu_ns: u64 = seq
        .daemons
        .iter()
        .flat_map(|o| &o.steps)
        .filter_map(|s| s.cpu_ns)
        .sum();
    let cpu = Duration::from_secs_f64(cpu_ns as f64 / 1e9 / cpus);
    let bytes: u64 = seq.daemons.iter().map(|o| o.bytes_written).sum();
    let device = Duration::from_secs_f64(bytes as f64 / bandwidth);
    let b = lone.max(cpu).max(device);
    let record = serde_json::json!({
        "slowest_lone_deploy_ms": ms(lone), "cpu_all_ms": ms(cpu), "cpus": cpus,
        "mkfs_bytes_all": bytes, "aggregate_write_mib_s": bandwidth / (1 << 20) as f64,
        "device_all_ms": ms(device), "bound_ms": ms(b),
    });
    (Some(b), record)
}

/// One strategy: a fresh cluster, node agent processes, the deployment; the run and the
/// cluster's peak resident memory (KiB) at its end. Everything is torn down on return.
fn run_one(
    k: &RunKey,
    paths: &[PathBuf],
    bin: &std::path::Path,
    state: &std::path::Path,
) -> anyhow::Result<(InitRun, u64)> {
    let port = blocklab::netutil::free_port().context("finding a port for the monitor")?;
    let dir = state.join(format!("{}-{}", k.strategy, k.rep));
    let cluster = CephCluster::create(&dir, SocketAddr::from((Ipv4Addr::LOCALHOST, port)))?;
    let conf = cluster.conf().clone();
    let agents: Vec<Announced> = (0..k.nodes)
        .map(|i| {
            let devs: Vec<String> = paths[i * k.dpn..(i + 1) * k.dpn]
                .iter()
                .map(|p| p.display().to_string())
                .collect();
            Announced::spawn(
                Command::new(bin).args([
                    "node",
                    "serve",
                    "--listen",
                    "127.0.0.1:0",
                    "--name",
                    &format!("node{i}"),
                    "--ceph",
                    &conf.dir.display().to_string(),
                    "--devices",
                    &devs.join(","),
                ]),
                &format!("node agent node{i}"),
                &state.join(format!("node{i}.stderr")),
                Duration::from_secs(10),
            )
        })
        .collect::<anyhow::Result<_>>()?;
    let remotes: Vec<RemoteNode> = agents
        .iter()
        .map(|a| RemoteNode::new(&a.addr.to_string()))
        .collect();
    let nodes: Vec<&dyn Node> = remotes.iter().map(|r| r as &dyn Node).collect();
    // force: the devices hold the previous run's OSDs (this run provisioned them).
    let run = init::run_ceph(k.strategy, &conf, &nodes, true)?;
    let rss = ceph::peak_rss_kib(&conf);
    drop(agents);
    cluster.teardown()?;
    Ok((run, rss))
}
