//! An etcd reference cluster for exp-commit: how long etcd's followers take to apply a
//! write the leader acknowledged, under the same injected network delay as blocklab's
//! replicas.
//!
//! [`EtcdCluster::start`] runs a cluster of Debian's `etcd` (package `etcd-server`, 3.4),
//! each member its own process with a private data directory under one scratch directory,
//! client and peer URLs on free 127.0.0.1 ports. Peer traffic goes through delay proxies
//! ([`blocklab::delayproxy`]) with one-way delay RTT/2: member *i* listens on its real peer
//! port and advertises the proxy in front of it, so every byte between two members passes
//! exactly one proxy (the one of the member that was connected to), and each member pair sees
//! the round-trip time RTT. Client traffic (the measuring client's puts and watches) is not
//! delayed. Dropping the cluster kills every member (SIGKILL), stops the proxies and removes
//! the directory.
//!
//! [`EtcdCluster::run_sparse`] measures follower apply lag: the client puts key *k* to the
//! leader through etcd's v3 HTTP/JSON gateway (`POST /v3/kv/put`, one kept-alive
//! connection) and notes `t_ack` when the response arrives; a watch on each follower's own
//! client URL (`POST /v3/watch`, streamed, over the run's key prefix) reports the event when
//! that follower has applied the put (etcd serves a watch from the member's own store) and
//! the watching thread notes `t_event`. The lag of put *k* on a follower is `t_event −
//! t_ack`: signed, as a follower may apply a put before the leader's answer reaches the
//! client. Both times come from one monotonic clock (one process). A follower whose watch
//! does not report a put is an error, never a lag of 0.
//!
//! ```no_run
//! use harness::etcd::{EtcdCluster, EtcdOptions, SparseWorkload};
//! use std::time::Duration;
//! let mut cluster = EtcdCluster::start(EtcdOptions::with_rtt(Duration::from_millis(1)))?;
//! let samples = cluster.run_sparse(&SparseWorkload::new(20, Duration::from_millis(250)))?;
//! for s in &samples {
//!     for l in &s.lags {
//!         println!("put {} follower {}: lag {} ns", s.index, l.member, l.lag_ns);
//!     }
//! }
//! # Ok::<(), anyhow::Error>(())
//! ```
//!
//! The program is `etcd` on `PATH` unless `BLOCKLAB_ETCD` names another.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use base64::Engine;
use blocklab::delayproxy::{DelayProxy, DelaySpec, ProxyStats};
use serde_json::{json, Value};

/// The environment variable naming the etcd program to run instead of `etcd` on `PATH`.
pub const PROGRAM_VAR: &str = "BLOCKLAB_ETCD";

/// The Debian package that installs `etcd`.
pub const PACKAGE: &str = "etcd-server";

/// How long one HTTP request to a member may take (status, health, put).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// The etcd program: `BLOCKLAB_ETCD`, else `etcd` (found on `PATH`).
pub fn program() -> PathBuf {
    std::env::var_os(PROGRAM_VAR)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("etcd"))
}

/// The version `program --version` reports (`3.4.23`), for a run's `meta.json`; `None`
/// when it cannot be run or says no version.
pub fn version(program: &Path) -> Option<String> {
    let out = Command::new(program).arg("--version").output().ok()?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("etcd Version:"))
        .map(|v| v.trim().to_string())
}

/// How to run a cluster.
#[derive(Debug, Clone)]
pub struct EtcdOptions {
    /// Number of members (at least 1; 3 for the reference).
    pub members: usize,
    /// Round-trip time between members: each peer proxy delays both directions by RTT/2.
    pub rtt: Duration,
    /// Jitter of the proxies' delay, a fraction in [0, 1) (see [`DelaySpec`]).
    pub jitter: f64,
    /// Seed of the proxies' jitter (proxy *i* uses `seed + i`).
    pub seed: u64,
    /// Where the cluster's scratch directory is made (data directories, logs). `/var/tmp`
    /// by default; `/dev/shm` keeps etcd's fsyncs in memory, like memory-backed loop devices.
    /// Each member preallocates 128 MB of write-ahead log there.
    pub base_dir: PathBuf,
    /// The etcd program (default: [`program`]).
    pub program: PathBuf,
    /// etcd's `--heartbeat-interval` (whole milliseconds; etcd's default 100 ms).
    pub heartbeat: Duration,
    /// etcd's `--election-timeout` (whole milliseconds; etcd's default 1 s).
    pub election: Duration,
    /// How long the members may take to form a healthy cluster with a leader.
    pub start_timeout: Duration,
}

impl Default for EtcdOptions {
    fn default() -> Self {
        EtcdOptions {
            members: 3,
            rtt: Duration::ZERO,
            jitter: 0.0,
            seed: 1,
            base_dir: PathBuf::from("/var/tmp"),
            program: program(),
            heartbeat: Duration::from_millis(100),
            election: Duration::from_millis(1000),
            start_timeout: Duration::from_secs(60),
        }
    }
}

impl EtcdOptions {
    /// Three members, RTT `rtt` between them, everything else as [`Default`].
    pub fn with_rtt(rtt: Duration) -> EtcdOptions {
        EtcdOptions {
            rtt,
            ..EtcdOptions::default()
        }
    }
}

/// A sparse workload: `puts` puts, one every `gap` (scheduled from the first, so a slow
/// put does not shift the others), each with a value of `value_size` bytes.
#[derive(Debug, Clone)]
pub struct SparseWorkload {
    pub puts: usize,
    pub gap: Duration,
    pub value_size: usize,
    /// How long after the last put's answer every follower's watch may take to report the
    /// puts it has not reported yet; then the missing ones are an error.
    pub settle: Duration,
}

impl SparseWorkload {
    /// `puts` puts of 64-byte values, `gap` apart, 10 s to settle.
    pub fn new(puts: usize, gap: Duration) -> SparseWorkload {
        SparseWorkload {
            puts,
            gap,
            value_size: 64,
            settle: Duration::from_secs(10),
        }
    }
}

/// The apply lag of one put on one follower.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FollowerLag {
    /// The follower's member index (see [`EtcdCluster::client_url`]).
    pub member: usize,
    /// `t_event − t_ack` in nanoseconds: when the follower's watch reported the put, minus
    /// when the leader's answer to it arrived. Negative when the follower applied it first.
    pub lag_ns: i64,
}

/// One put of a run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PutSample {
    /// Position in the run, from 0.
    pub index: usize,
    /// The revision etcd gave the put.
    pub revision: u64,
    /// From sending the put to its answer, in nanoseconds.
    pub put_latency_ns: u64,
    /// One entry per follower, in member order.
    pub lags: Vec<FollowerLag>,
}

/// One member: its process, its ports, the proxy in front of its peer port.
struct Member {
    name: String,
    client_url: String,
    peer: SocketAddr,
    proxy: DelayProxy,
    child: Option<Child>,
    log: PathBuf,
}

impl Member {
    fn log_tail(&self) -> String {
        let s = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = s.lines().collect();
        lines[lines.len().saturating_sub(5)..].join(" | ")
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A running etcd cluster; see the [module documentation](self). Dropping it kills the
/// members, stops the proxies and removes its directory.
#[must_use = "the cluster is torn down when dropped"]
pub struct EtcdCluster {
    members: Vec<Member>,
    leader: usize,
    agent: ureq::Agent,
    runs: u64,
    rtt: Duration,
    // Last: removed once the members are dead.
    dir: tempfile::TempDir,
}

impl std::fmt::Debug for EtcdCluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdCluster")
            .field("dir", &self.dir.path())
            .field("members", &self.members.len())
            .field("leader", &self.leader)
            .field("rtt", &self.rtt)
            .finish()
    }
}

fn free_port() -> anyhow::Result<u16> {
    blocklab::netutil::free_port().context("finding a free port on 127.0.0.1")
}

fn whole_ms(d: Duration, what: &str) -> anyhow::Result<u128> {
    ensure!(
        !d.is_zero() && d.subsec_nanos() % 1_000_000 == 0,
        "{what} {d:?}: etcd takes a whole, positive number of milliseconds"
    );
    Ok(d.as_millis())
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// The end of the key range of `prefix`: the prefix with its last byte incremented (the
/// bytes here are never 0xff).
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    if let Some(last) = end.last_mut() {
        *last += 1;
    }
    end
}

/// A uint64 of the gateway's JSON: a string of digits (grpc-gateway), or a number.
fn json_u64(v: &Value) -> Option<u64> {
    match v {
        Value::String(s) => s.parse().ok(),
        Value::Number(n) => n.as_u64(),
        _ => None,
    }
}

/// `a − b` in signed nanoseconds.
fn signed_ns(a: Instant, b: Instant) -> i64 {
    if a >= b {
        i64::try_from((a - b).as_nanos()).unwrap_or(i64::MAX)
    } else {
        -i64::try_from((b - a).as_nanos()).unwrap_or(i64::MAX)
    }
}

impl EtcdCluster {
    /// Starts the members and their proxies and waits (at most `opts.start_timeout`) until
    /// every member is healthy and they agree on a leader. A member that fails to start
    /// (its log's last lines are in the error) fails the whole start; when a port found
    /// free was taken in between, it tries again on new ports (three times at most).
    pub fn start(opts: EtcdOptions) -> anyhow::Result<EtcdCluster> {
        ensure!(
            opts.members >= 1,
            "an etcd cluster needs at least one member"
        );
        let heartbeat = whole_ms(opts.heartbeat, "--heartbeat-interval")?;
        let election = whole_ms(opts.election, "--election-timeout")?;
        let mut attempt = 0;
        loop {
            attempt += 1;
            match EtcdCluster::launch(&opts, heartbeat, election) {
                Ok(c) => return Ok(c),
                Err(e) if attempt < 3 && format!("{e:#}").contains("address already in use") => {
                    eprintln!("etcd: a port was taken, trying again: {e:#}");
                }
                Err(e) => return Err(e),
            }
        }
    }

    fn launch(opts: &EtcdOptions, heartbeat: u128, election: u128) -> anyhow::Result<EtcdCluster> {
        let dir = tempfile::Builder::new()
            .prefix("blocklab-etcd-")
            .tempdir_in(&opts.base_dir)
            .with_context(|| {
                format!("making a scratch directory in {}", opts.base_dir.display())
            })?;
        let mut members = Vec::with_capacity(opts.members);
        for i in 0..opts.members {
            let peer = SocketAddr::from(([127, 0, 0, 1], free_port()?));
            let spec = DelaySpec::new(opts.rtt / 2, opts.jitter, opts.seed.wrapping_add(i as u64))?;
            let proxy = DelayProxy::bind("127.0.0.1:0".parse()?, peer, spec)
                .with_context(|| format!("starting the peer proxy of member {i}"))?;
            members.push(Member {
                name: format!("m{i}"),
                client_url: format!("http://127.0.0.1:{}", free_port()?),
                peer,
                proxy,
                child: None,
                log: dir.path().join(format!("m{i}.log")),
            });
        }
        let initial_cluster = members
            .iter()
            .map(|m| format!("{}=http://{}", m.name, m.proxy.addr()))
            .collect::<Vec<_>>()
            .join(",");
        let token = format!(
            "blocklab-{}-{}",
            std::process::id(),
            dir.path().file_name().unwrap_or_default().to_string_lossy()
        );
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .timeout_connect(Some(Duration::from_secs(5)))
            .timeout_global(Some(REQUEST_TIMEOUT))
            .http_status_as_error(false)
            .max_idle_age(Duration::from_secs(3600))
            .build()
            .into();
        let mut cluster = EtcdCluster {
            members,
            leader: 0,
            agent,
            runs: 0,
            rtt: opts.rtt,
            dir,
        };
        for i in 0..cluster.members.len() {
            let m = &cluster.members[i];
            let log = std::fs::File::create(&m.log)
                .with_context(|| format!("creating {}", m.log.display()))?;
            let mut cmd = Command::new(&opts.program);
            // No ETCD_* variable of this environment may configure the members.
            for (k, _) in std::env::vars_os() {
                if k.to_string_lossy().starts_with("ETCD_") {
                    cmd.env_remove(k);
                }
            }
            cmd.arg("--name")
                .arg(&m.name)
                .arg("--data-dir")
                .arg(cluster.dir.path().join(&m.name))
                .arg("--listen-client-urls")
                .arg(&m.client_url)
                .arg("--advertise-client-urls")
                .arg(&m.client_url)
                .arg("--listen-peer-urls")
                .arg(format!("http://{}", m.peer))
                .arg("--initial-advertise-peer-urls")
                .arg(format!("http://{}", m.proxy.addr()))
                .arg("--initial-cluster")
                .arg(&initial_cluster)
                .arg("--initial-cluster-state")
                .arg("new")
                .arg("--initial-cluster-token")
                .arg(&token)
                .arg("--heartbeat-interval")
                .arg(heartbeat.to_string())
                .arg("--election-timeout")
                .arg(election.to_string())
                .arg("--logger")
                .arg("zap")
                .arg("--log-outputs")
                .arg("stderr")
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log);
            let child = cmd.spawn().map_err(|e| {
                if e.kind() == std::io::ErrorKind::NotFound {
                    anyhow::anyhow!(
                        "{} is not installed (Debian: apt-get install {PACKAGE}; or set {PROGRAM_VAR})",
                        opts.program.display()
                    )
                } else {
                    anyhow::anyhow!("running {}: {e}", opts.program.display())
                }
            })?;
            cluster.members[i].child = Some(child);
        }
        cluster.wait_ready(opts.start_timeout)?;
        Ok(cluster)
    }

    /// Waits until every member answers `/health` with true and all agree on a leader.
    fn wait_ready(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            for m in &mut self.members {
                if let Some(c) = m.child.as_mut() {
                    if let Some(status) = c.try_wait()? {
                        m.child = None;
                        bail!(
                            "etcd member {} exited ({status}) while the cluster formed; its last log lines: {}",
                            m.name,
                            m.log_tail()
                        );
                    }
                }
            }
            let last = match self.healthy_leader() {
                Ok(leader) => {
                    self.leader = leader;
                    return Ok(());
                }
                Err(e) => e,
            };
            if Instant::now() >= deadline {
                let logs: Vec<String> = self
                    .members
                    .iter()
                    .map(|m| format!("{}: {}", m.name, m.log_tail()))
                    .collect();
                bail!(
                    "the etcd cluster was not healthy with a leader within {timeout:?}: {last:#}; \
                     the members' last log lines: {}",
                    logs.join(" || ")
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The leader's member index, when every member is healthy and they agree on it.
    fn healthy_leader(&self) -> anyhow::Result<usize> {
        let mut ids = Vec::with_capacity(self.members.len());
        let mut leaders = Vec::with_capacity(self.members.len());
        for m in &self.members {
            let health = self.get(&format!("{}/health", m.client_url))?;
            ensure!(
                health["health"] == "true",
                "member {} is not healthy: {health}",
                m.name
            );
            let status = self.post(
                &format!("{}/v3/maintenance/status", m.client_url),
                &json!({}),
            )?;
            let id = json_u64(&status["header"]["member_id"]);
            let leader = json_u64(&status["leader"]);
            match (id, leader) {
                (Some(id), Some(leader)) if leader != 0 => {
                    ids.push(id);
                    leaders.push(leader);
                }
                _ => bail!("member {} knows no leader: {status}", m.name),
            }
        }
        ensure!(
            leaders.iter().all(|l| *l == leaders[0]),
            "the members disagree on the leader: {leaders:?}"
        );
        ids.iter()
            .position(|id| *id == leaders[0])
            .with_context(|| format!("leader {} is no member of {ids:?}", leaders[0]))
    }

    fn get(&self, url: &str) -> anyhow::Result<Value> {
        let r = self
            .agent
            .get(url)
            .call()
            .with_context(|| format!("GET {url}"))?;
        Self::json_body(url, r)
    }

    fn post(&self, url: &str, body: &Value) -> anyhow::Result<Value> {
        let r = self
            .agent
            .post(url)
            .header("Content-Type", "application/json")
            .send(body.to_string())
            .with_context(|| format!("POST {url}"))?;
        Self::json_body(url, r)
    }

    fn json_body(url: &str, r: ureq::http::Response<ureq::Body>) -> anyhow::Result<Value> {
        let status = r.status();
        let text = r
            .into_body()
            .read_to_string()
            .with_context(|| format!("reading the answer of {url}"))?;
        ensure!(status.is_success(), "{url}: {status}: {text}");
        serde_json::from_str(&text).with_context(|| format!("{url}: not JSON: {text}"))
    }

    /// Number of members.
    pub fn len(&self) -> usize {
        self.members.len()
    }

    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// The leader found when the cluster formed, or by the last [`find_leader`](Self::find_leader)
    /// or [`run_sparse`](Self::run_sparse).
    pub fn leader(&self) -> usize {
        self.leader
    }

    /// Every member but the leader, in member order.
    pub fn followers(&self) -> Vec<usize> {
        (0..self.members.len())
            .filter(|&i| i != self.leader)
            .collect()
    }

    /// Asks the members who leads now (they must agree and be healthy) and remembers it.
    pub fn find_leader(&mut self) -> anyhow::Result<usize> {
        self.leader = self.healthy_leader()?;
        Ok(self.leader)
    }

    /// Member `i`'s client URL, `http://127.0.0.1:PORT` (not delayed).
    pub fn client_url(&self, i: usize) -> &str {
        &self.members[i].client_url
    }

    /// The address other members reach member `i`'s peer port at: its proxy.
    pub fn peer_proxy_addr(&self, i: usize) -> SocketAddr {
        self.members[i].proxy.addr()
    }

    /// Process ids of the members that run.
    pub fn pids(&self) -> Vec<u32> {
        self.members
            .iter()
            .filter_map(|m| m.child.as_ref().map(|c| c.id()))
            .collect()
    }

    /// The scratch directory (data directories `mI/`, logs `mI.log`).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The RTT the proxies inject (each direction RTT/2).
    pub fn rtt(&self) -> Duration {
        self.rtt
    }

    /// What each member's peer proxy forwarded so far, in member order.
    pub fn proxy_stats(&self) -> Vec<ProxyStats> {
        self.members.iter().map(|m| m.proxy.stats()).collect()
    }

    /// Puts `key` = `value` through the leader; returns the put's revision.
    pub fn put(&self, key: &[u8], value: &[u8]) -> anyhow::Result<u64> {
        let url = format!("{}/v3/kv/put", self.members[self.leader].client_url);
        let r = self.post(&url, &json!({"key": b64(key), "value": b64(value)}))?;
        json_u64(&r["header"]["revision"]).with_context(|| format!("{url}: no revision in {r}"))
    }

    /// Runs `w` against the current leader (asked first) and returns one sample per put,
    /// in order, each with the lag of every follower. Keys are `blocklab/run-N/k` with a
    /// fresh N per run, so runs on one cluster do not see each other's puts. An error when
    /// a put fails, or a follower's watch fails or has not reported every put within
    /// `w.settle` of the last answer (naming the follower and the puts).
    pub fn run_sparse(&mut self, w: &SparseWorkload) -> anyhow::Result<Vec<PutSample>> {
        ensure!(w.puts > 0, "a run needs at least one put");
        self.find_leader()?;
        let run = self.runs;
        self.runs += 1;
        let prefix = format!("blocklab/run-{run}/");
        let keys: Vec<String> = (0..w.puts).map(|k| format!("{prefix}{k:06}")).collect();
        let index: HashMap<Vec<u8>, usize> = keys
            .iter()
            .enumerate()
            .map(|(i, k)| (k.clone().into_bytes(), i))
            .collect();
        let followers = self.followers();
        // The watches: each thread reports (follower, put, when) and ends once it saw every
        // put, or its stream failed, or its time ran out (the run's length and a margin).
        let watch_for =
            w.gap * u32::try_from(w.puts).unwrap_or(u32::MAX) + w.settle + Duration::from_secs(60);
        let (tx, rx) = mpsc::channel::<WatchMsg>();
        for &f in &followers {
            let url = format!("{}/v3/watch", self.members[f].client_url);
            let req = self
                .agent
                .post(&url)
                .config()
                .timeout_global(Some(watch_for))
                .build()
                .header("Content-Type", "application/json");
            let body = json!({"create_request": {
                "key": b64(prefix.as_bytes()),
                "range_end": b64(&prefix_end(prefix.as_bytes())),
            }})
            .to_string();
            let (tx, index) = (tx.clone(), index.clone());
            std::thread::Builder::new()
                .name(format!("etcd-watch-m{f}"))
                .spawn(move || {
                    if let Err(e) = watch(req, body, f, &index, &tx) {
                        let _ = tx.send(WatchMsg::Failed(f, format!("{e:#}")));
                    }
                })
                .context("starting a watch thread")?;
        }
        drop(tx);
        // Every watch is in place before the first put.
        let mut created = 0;
        let mut early: Vec<WatchMsg> = Vec::new();
        while created < followers.len() {
            match rx.recv_timeout(REQUEST_TIMEOUT) {
                Ok(WatchMsg::Created) => created += 1,
                Ok(WatchMsg::Failed(f, e)) => bail!("the watch on member {f}: {e}"),
                Ok(m @ WatchMsg::Event { .. }) => early.push(m),
                Err(_) => {
                    bail!("the followers' watches were not created within {REQUEST_TIMEOUT:?}")
                }
            }
        }
        // One put outside the watched range first, so the measured ones find the kept-alive
        // connection open.
        self.put(format!("blocklab/run-{run}-warmup").as_bytes(), b"")?;
        let value = vec![b'v'; w.value_size];
        let mut acks = Vec::with_capacity(w.puts);
        let start = Instant::now();
        for (k, key) in keys.iter().enumerate() {
            let at = start + w.gap * u32::try_from(k).unwrap_or(u32::MAX);
            let now = Instant::now();
            if at > now {
                std::thread::sleep(at - now);
            }
            let sent = Instant::now();
            let revision = self
                .put(key.as_bytes(), &value)
                .with_context(|| format!("put {k} of {}", w.puts))?;
            let acked = Instant::now();
            acks.push((revision, sent, acked));
        }
        // Collect until every follower reported every put, or `settle` after the last ack.
        let deadline = acks.last().map_or_else(Instant::now, |a| a.2) + w.settle;
        let mut seen: HashMap<(usize, usize), Instant> = HashMap::new();
        let mut failed: Vec<String> = Vec::new();
        let mut take = |m: WatchMsg, seen: &mut HashMap<(usize, usize), Instant>| match m {
            WatchMsg::Event { member, put, at } => {
                seen.entry((member, put)).or_insert(at);
            }
            WatchMsg::Failed(f, e) => failed.push(format!("member {f}: {e}")),
            WatchMsg::Created => {}
        };
        for m in early {
            take(m, &mut seen);
        }
        let want = followers.len() * w.puts;
        while seen.len() < want {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(m) => take(m, &mut seen),
                Err(_) => break, // time is up, or every watch ended
            }
        }
        let mut missing = Vec::new();
        for &f in &followers {
            let puts: Vec<usize> = (0..w.puts)
                .filter(|&k| !seen.contains_key(&(f, k)))
                .collect();
            if !puts.is_empty() {
                missing.push(format!("member {f} missed puts {puts:?}"));
            }
        }
        if !missing.is_empty() {
            bail!(
                "the followers' watches did not report every put within {:?} of the last answer: {}{}",
                w.settle,
                missing.join("; "),
                if failed.is_empty() {
                    String::new()
                } else {
                    format!(" (watch errors: {})", failed.join("; "))
                }
            );
        }
        Ok(acks
            .iter()
            .enumerate()
            .map(|(k, &(revision, sent, acked))| PutSample {
                index: k,
                revision,
                put_latency_ns: u64::try_from((acked - sent).as_nanos()).unwrap_or(u64::MAX),
                lags: followers
                    .iter()
                    .map(|&f| FollowerLag {
                        member: f,
                        lag_ns: signed_ns(seen[&(f, k)], acked),
                    })
                    .collect(),
            })
            .collect())
    }
}

/// What a watch thread reports.
enum WatchMsg {
    Created,
    Event {
        member: usize,
        put: usize,
        at: Instant,
    },
    Failed(usize, String),
}

/// One follower's watch: sends the create request, reports `Created`, then an `Event` per
/// watched put (noting the time its message was read) until it saw all of `index`.
fn watch(
    req: ureq::RequestBuilder<ureq::typestate::WithBody>,
    body: String,
    member: usize,
    index: &HashMap<Vec<u8>, usize>,
    tx: &mpsc::Sender<WatchMsg>,
) -> anyhow::Result<()> {
    let r = req.send(body).context("opening the watch")?;
    let status = r.status();
    let mut lines = BufReader::new(r.into_body().into_reader());
    ensure!(status.is_success(), "opening the watch: {status}");
    let mut left: std::collections::HashSet<usize> = index.values().copied().collect();
    let mut line = String::new();
    let decode = base64::engine::general_purpose::STANDARD;
    while !left.is_empty() {
        line.clear();
        let n = lines
            .read_line(&mut line)
            .context("reading the watch stream")?;
        let at = Instant::now();
        ensure!(n > 0, "the watch stream ended");
        if line.trim().is_empty() {
            continue;
        }
        let msg: Value = serde_json::from_str(&line)
            .with_context(|| format!("not JSON on the watch stream: {line}"))?;
        if let Some(e) = msg.get("error") {
            bail!("the watch failed: {e}");
        }
        let result = &msg["result"];
        if result["created"] == true {
            tx.send(WatchMsg::Created)?;
        }
        if result["canceled"] == true {
            bail!("the watch was canceled: {result}");
        }
        for ev in result["events"].as_array().into_iter().flatten() {
            let key = ev["kv"]["key"].as_str().unwrap_or_default();
            let key = decode
                .decode(key)
                .with_context(|| format!("a watch event's key {key:?}"))?;
            if let Some(&put) = index.get(&key) {
                if left.remove(&put) {
                    tx.send(WatchMsg::Event { member, put, at })?;
                }
            }
        }
    }
    Ok(())
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        // The members first (their peer connections close), then the proxies (fields),
        // then the directory.
        for m in &mut self.members {
            m.kill();
        }
    }
}
