//! A replication cluster of OS processes: every replica is a `blocklab repl serve`, and the
//! primary reaches each secondary through its own `blocklab proxy` process, which delays
//! every byte by the link's one-way delay (this kernel has no netem). Each replica writes
//! its timeline ([`blocklab::repl::events`]) to a file per incarnation, so a killed and
//! restarted replica keeps the events of both lives.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

pub use crate::child::Announced;
use blocklab::repl::events::{read_events, Event};
use blocklab::repl::replica::PolicySpec;
use blocklab::repl::NodeId;

/// How to run a cluster.
#[derive(Debug, Clone)]
pub struct ClusterSpec {
    /// The `blocklab` binary.
    pub bin: PathBuf,
    /// One device per replica (replica i on device i).
    pub devices: Vec<PathBuf>,
    pub policy: PolicySpec,
    pub tick: Duration,
    pub retransmit: Duration,
    /// One-way delay of every link (each direction), and its jitter as a fraction.
    pub one_way: Duration,
    pub jitter: f64,
    pub group_commit: bool,
    /// Timelines and stderr files go here.
    pub dir: PathBuf,
    pub seed: u64,
}

/// A running cluster: replica 0 is the primary.
pub struct Cluster {
    spec: ClusterSpec,
    replicas: Vec<Option<Announced>>,
    /// Where each secondary listens (kept across restarts: its proxy forwards there).
    listen: Vec<SocketAddr>,
    proxies: Vec<Announced>,
    /// Incarnations started so far, per replica.
    lives: Vec<u32>,
}

const START_TIMEOUT: Duration = Duration::from_secs(30);
const STOP_TIMEOUT: Duration = Duration::from_secs(30);

impl Cluster {
    /// Starts the secondaries, a proxy in front of each, then the primary, all on fresh
    /// logs.
    pub fn start(spec: ClusterSpec) -> anyhow::Result<Cluster> {
        let n = spec.devices.len();
        if n < 2 {
            bail!("a cluster needs a primary and at least one secondary");
        }
        let mut c = Cluster {
            replicas: (0..n).map(|_| None).collect(),
            listen: vec![SocketAddr::from(([127, 0, 0, 1], 0)); n],
            proxies: Vec::new(),
            lives: vec![0; n],
            spec,
        };
        for id in 1..n as NodeId {
            c.start_replica(id, true)?;
            c.listen[id as usize] = c.replica(id)?.addr;
        }
        for id in 1..n {
            let p = c.start_proxy(id)?;
            c.proxies.push(p);
        }
        c.start_replica(0, true)?;
        Ok(c)
    }

    fn start_proxy(&self, id: usize) -> anyhow::Result<Announced> {
        let s = &self.spec;
        let mut cmd = Command::new(&s.bin);
        cmd.args(["proxy", "--listen", "127.0.0.1:0", "--to"])
            .arg(self.listen[id].to_string())
            .arg("--delay")
            .arg(format!("{}ns", s.one_way.as_nanos()))
            .arg("--jitter")
            .arg(format!("{}%", s.jitter * 100.0))
            .arg("--seed")
            .arg((s.seed.wrapping_mul(31) + id as u64).to_string());
        Announced::spawn(
            &mut cmd,
            &format!("proxy to replica {id}"),
            &s.dir.join(format!("proxy-{id}.stderr")),
            START_TIMEOUT,
        )
    }

    /// The timeline file of `id`'s incarnation `life` (1-based).
    pub fn events_path(&self, id: NodeId, life: u32) -> PathBuf {
        self.spec.dir.join(format!("replica-{id}-{life}.events"))
    }

    fn start_replica(&mut self, id: NodeId, fresh: bool) -> anyhow::Result<()> {
        let s = &self.spec;
        let n = s.devices.len();
        let i = id as usize;
        self.lives[i] += 1;
        let life = self.lives[i];
        let members: Vec<String> = (0..n).map(|m| m.to_string()).collect();
        let mut cmd = Command::new(&s.bin);
        cmd.args(["repl", "serve", "--id"])
            .arg(id.to_string())
            .arg("--members")
            .arg(members.join(","))
            .args(["--primary", "0", "--device"])
            .arg(&s.devices[i])
            .arg("--policy")
            .arg(s.policy.to_string())
            .arg("--tick")
            .arg(format!("{}ns", s.tick.as_nanos()))
            .arg("--retransmit")
            .arg(format!("{}ns", s.retransmit.as_nanos()))
            .arg("--listen")
            .arg(self.listen[i].to_string())
            .arg("--events")
            .arg(self.events_path(id, life));
        if !s.group_commit {
            cmd.arg("--no-group-commit");
        }
        if fresh {
            // The devices are preconditioned daemon devices: the log region holds data
            // that is not a replication log.
            cmd.args(["--fresh", "--force"]);
        }
        if id == 0 {
            let peers: Vec<String> = self
                .proxies
                .iter()
                .enumerate()
                .map(|(k, p)| format!("{}={}", k + 1, p.addr))
                .collect();
            cmd.arg("--peers").arg(peers.join(","));
        }
        let what = format!("replica {id}");
        let a = Announced::spawn(
            &mut cmd,
            &what,
            &s.dir.join(format!("replica-{id}-{life}.stderr")),
            START_TIMEOUT,
        )?;
        self.replicas[i] = Some(a);
        Ok(())
    }

    fn replica(&self, id: NodeId) -> anyhow::Result<&Announced> {
        self.replicas
            .get(id as usize)
            .and_then(Option::as_ref)
            .with_context(|| format!("replica {id} is not running"))
    }

    /// Where clients reach replica `id` (the primary: where writes go).
    pub fn addr(&self, id: NodeId) -> anyhow::Result<SocketAddr> {
        Ok(self.replica(id)?.addr)
    }

    pub fn replicas(&self) -> usize {
        self.spec.devices.len()
    }

    /// Waits until the primary's current life connected to every secondary.
    pub fn await_connected(&self, timeout: Duration) -> anyhow::Result<()> {
        let path = self.events_path(0, self.lives[0]);
        let want = self.replicas() - 1;
        let deadline = Instant::now() + timeout;
        loop {
            let ev = read_events(&path).unwrap_or_default();
            let mut up: Vec<NodeId> = ev
                .iter()
                .filter_map(|(e, _)| match e {
                    Event::Peer { id } => Some(*id),
                    _ => None,
                })
                .collect();
            up.sort_unstable();
            up.dedup();
            if up.len() >= want {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "the primary connected to {} of {want} secondaries within {timeout:?}",
                    up.len()
                );
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Waits until the secondaries have answered the probe the primary sends on each
    /// connection (one per `peer` event; probes queued before a connection was up are
    /// dropped unsent), so that a workload started after this does not count probe
    /// answers as notification answers.
    pub fn await_probed(&self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        let last_counters = |life: &[(Event, i64)]| {
            life.iter()
                .rev()
                .find_map(|(e, _)| match *e {
                    Event::Counters {
                        empty_responses,
                        probes,
                        ..
                    } => Some((empty_responses, probes)),
                    _ => None,
                })
                .unwrap_or((0, 0))
        };
        loop {
            let probes = self
                .current_events(0)?
                .iter()
                .filter(|(e, _)| matches!(e, Event::Peer { .. }))
                .count() as u64;
            let mut answered = 0;
            for id in 1..self.replicas() as NodeId {
                answered += last_counters(&self.current_events(id)?).0;
            }
            if probes > 0 && answered >= probes {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("the secondaries answered {answered} of {probes} probes within {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// SIGKILLs replica `id`.
    pub fn kill(&mut self, id: NodeId) {
        if let Some(mut a) = self.replicas[id as usize].take() {
            a.kill();
        }
    }

    /// Restarts replica `id` on its device, recovering its log (a new timeline file).
    pub fn restart(&mut self, id: NodeId) -> anyhow::Result<()> {
        self.kill(id);
        self.start_replica(id, false)
    }

    /// SIGKILLs every link proxy: bytes in flight between the replicas are lost.
    pub fn kill_links(&mut self) {
        for p in &mut self.proxies {
            p.kill();
        }
        self.proxies.clear();
    }

    /// Starts a new proxy per secondary (after [`Cluster::kill_links`]); a primary
    /// (re)started afterwards connects through them.
    pub fn restart_links(&mut self) -> anyhow::Result<()> {
        self.kill_links();
        for id in 1..self.replicas() {
            let p = self.start_proxy(id)?;
            self.proxies.push(p);
        }
        Ok(())
    }

    /// A replica that exited on its own, if any.
    pub fn exited(&mut self) -> Option<NodeId> {
        (0..self.replicas() as NodeId).find(|&id| {
            self.replicas[id as usize]
                .as_mut()
                .is_some_and(|a| a.exited())
        })
    }

    /// The timeline of replica `id`'s current (last) life.
    pub fn current_events(&self, id: NodeId) -> anyhow::Result<Vec<(Event, i64)>> {
        let p = self.events_path(id, self.lives[id as usize]);
        read_events(&p).with_context(|| format!("reading {}", p.display()))
    }

    /// The timelines of replica `id`, one per life, in order.
    pub fn events(&self, id: NodeId) -> anyhow::Result<Vec<Vec<(Event, i64)>>> {
        (1..=self.lives[id as usize])
            .map(|life| {
                let p = self.events_path(id, life);
                read_events(&p).with_context(|| format!("reading {}", p.display()))
            })
            .collect()
    }

    /// Stops every replica with SIGTERM (their timelines are then complete), then the
    /// proxies.
    pub fn stop(mut self) -> anyhow::Result<()> {
        let mut first_err = None;
        for a in self.replicas.iter_mut().flatten() {
            if let Err(e) = a.terminate(STOP_TIMEOUT) {
                first_err.get_or_insert(e);
            }
        }
        for p in &mut self.proxies {
            p.kill();
        }
        first_err.map_or(Ok(()), Err)
    }
}
