//! A replica: the protocol [`Node`] driven by a loop that owns the log, the storage engine,
//! the TCP connections and the clock. Inbound connections arrive through the shared server
//! ([`crate::jsonl::server`], connection mode), each read on its own thread.
//!
//! The primary connects to every secondary (and reconnects with exponential backoff when a
//! connection breaks). Each side of a replica connection first sends a `Hello` (wire
//! version and replica id): a secondary accepts appends only on a connection on which the
//! configured primary introduced itself, and both sides report a version mismatch instead
//! of retrying in silence. Secondaries answer on the connection an append came in on.
//! Clients connect to the primary and send `ClientWrite`s; each is answered with
//! `ClientAck` once committed, or with `ClientErr` at once when it cannot be applied. Any
//! replica answers `StatusReq`. In-process users (the experiment) may attach [`Hooks`]: a
//! workload that proposes from inside the loop, and observers of commit, apply and flush
//! times.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Display;
use std::io::Write;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::daemon::{self, DaemonError};
use crate::dev::{probe_head, DevError, Device, Found, UringEngine};
use crate::format::{Label, Layout};

use super::apply::{Applied, Applier};
use super::kv::{Invalid, KvError, KvStore};
use super::log::{record_size, LogError, LogStore};
use super::protocol::{Config, Entry, Message, Node, NodeId, Policy, ProtocolError, Stats};
use super::transport::{read_frames, Bytes, Link};
use super::wire::{self, Frame, Status, WireError, WIRE_VERSION};
use crate::jsonl::server::Server;

/// Errors of a replica.
#[derive(Debug, thiserror::Error)]
pub enum ReplicaError {
    #[error(transparent)]
    Dev(#[from] DevError),
    #[error(transparent)]
    Log(#[from] LogError),
    #[error(transparent)]
    Kv(#[from] KvError),
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    #[error(transparent)]
    Refused(#[from] AdmitError),
    #[error("{path}: holds {found}; refusing to overwrite it without --force")]
    Foreign { path: PathBuf, found: String },
    #[error("{what}: {cause}")]
    Io { what: String, cause: std::io::Error },
    #[error("bad replica configuration: {0}")]
    Config(String),
}

/// Why the primary refuses a write before it enters the log.
#[derive(Debug, thiserror::Error)]
pub enum AdmitError {
    #[error(transparent)]
    Invalid(#[from] Invalid),
    #[error("log region full: {left} bytes left, the write needs {need}")]
    LogFull { need: u64, left: u64 },
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
}

/// Where on the device the log and the storage engine live.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Regions {
    pub log_offset: u64,
    pub log_len: u64,
    pub data_offset: u64,
    pub data_len: u64,
}

impl Regions {
    /// The layout used on a device that is not formatted as a daemon device: the first MiB
    /// is left alone, then a log of `log_len` bytes, then a data region of `data_len`.
    pub fn plain(log_len: u64, data_len: u64) -> Regions {
        Regions {
            log_offset: 1 << 20,
            log_len,
            data_offset: (1 << 20) + log_len,
            data_len,
        }
    }
    pub fn end(&self) -> u64 {
        (self.log_offset + self.log_len).max(self.data_offset + self.data_len)
    }

    /// The regions of a formatted daemon device (`core::format`): the log region after its
    /// init record block, and the first `data_len` bytes of the data region (all of it
    /// when smaller).
    pub fn formatted(layout: &Layout, data_len: u64) -> Regions {
        let block = crate::format::BLOCK as u64;
        Regions {
            log_offset: layout.log_offset + block,
            log_len: layout.log_len.saturating_sub(block),
            data_offset: layout.data_offset,
            data_len: data_len.min(layout.data_len) / block * block,
        }
    }

    /// Formatted regions when `path` carries a ready blocklab label (read with the daemon's
    /// own label reader), else [`Regions::plain`]`(log_len, data_len)`. Returns whether
    /// the device was formatted.
    pub fn detect(
        path: &Path,
        log_len: u64,
        data_len: u64,
    ) -> Result<(Regions, bool), ReplicaError> {
        let dev = Device::open_read_only(path)?;
        let mut eng = UringEngine::with_queue_depth(1)?;
        match daemon::read_label(&mut eng, &dev) {
            Ok(l) if l.is_ready() => Ok((Regions::formatted(&l.layout, data_len), true)),
            Err(DaemonError::Dev(e)) => Err(e.into()),
            _ => Ok((Regions::plain(log_len, data_len), false)),
        }
    }
}

/// Policy with durations, converted to ticks for the protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PolicySpec {
    Piggyback,
    Periodic(Duration),
    Eager,
    Idle,
    IdleDelayed(Duration),
}

impl PolicySpec {
    /// Parses `piggyback`, `periodic:50ms`/`periodic:50`, `eager`, `idle`,
    /// `idle_delayed:1ms`/`idle_delayed:1` (milliseconds when no unit).
    pub fn parse(s: &str) -> Result<PolicySpec, String> {
        let (name, param) = match s.split_once(':') {
            Some((n, p)) => (n, Some(p)),
            None => (s, None),
        };
        let ms = |p: Option<&str>| -> Result<Duration, String> {
            let p = p.ok_or_else(|| format!("{s:?}: {name} needs a duration, e.g. {name}:50ms"))?;
            let num = p.trim_end_matches("ms");
            let v: f64 = num
                .parse()
                .map_err(|_| format!("{s:?}: {p:?} is not a duration in milliseconds"))?;
            if !(v.is_finite() && v >= 0.0) {
                return Err(format!("{s:?}: duration must be ≥ 0"));
            }
            Ok(Duration::from_secs_f64(v / 1000.0))
        };
        let no_param = |p: Option<&str>| match p {
            Some(_) => Err(format!("{s:?}: {name} takes no parameter")),
            None => Ok(()),
        };
        match name {
            "piggyback" => no_param(param).map(|_| PolicySpec::Piggyback),
            "eager" => no_param(param).map(|_| PolicySpec::Eager),
            "idle" => no_param(param).map(|_| PolicySpec::Idle),
            "periodic" => Ok(PolicySpec::Periodic(ms(param)?)),
            "idle_delayed" => Ok(PolicySpec::IdleDelayed(ms(param)?)),
            _ => Err(format!(
                "{s:?}: unknown policy (piggyback, periodic:H, eager, idle, idle_delayed:D)"
            )),
        }
    }
    /// The protocol policy's name ([`Policy::name`]).
    pub fn name(&self) -> &'static str {
        self.to_policy(Duration::from_millis(1)).name()
    }
    /// H or d in milliseconds (0 when the policy has no parameter).
    pub fn param_ms(&self) -> f64 {
        match self {
            PolicySpec::Periodic(d) | PolicySpec::IdleDelayed(d) => d.as_secs_f64() * 1000.0,
            _ => 0.0,
        }
    }
    pub fn to_policy(&self, tick: Duration) -> Policy {
        let ticks = |d: &Duration| (d.as_nanos() / tick.as_nanos().max(1)).max(1) as u64;
        match self {
            PolicySpec::Piggyback => Policy::Piggyback,
            PolicySpec::Periodic(d) => Policy::Periodic { every: ticks(d) },
            PolicySpec::Eager => Policy::Eager,
            PolicySpec::Idle => Policy::Idle,
            PolicySpec::IdleDelayed(d) if d.is_zero() => Policy::IdleDelayed { delay: 0 },
            PolicySpec::IdleDelayed(d) => Policy::IdleDelayed { delay: ticks(d) },
        }
    }
}

impl std::fmt::Display for PolicySpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PolicySpec::Periodic(_) | PolicySpec::IdleDelayed(_) => {
                write!(f, "{}:{}ms", self.name(), self.param_ms())
            }
            _ => f.write_str(self.name()),
        }
    }
}

/// What a replica is started with.
#[derive(Debug)]
pub struct ReplicaOptions {
    pub id: NodeId,
    pub members: Vec<NodeId>,
    pub primary: NodeId,
    /// Primary: every secondary's address.
    pub peers: Vec<(NodeId, SocketAddr)>,
    /// Bound listener for secondaries' and clients' connections.
    pub listener: TcpListener,
    pub device: PathBuf,
    pub regions: Regions,
    pub policy: PolicySpec,
    /// Length of one protocol tick.
    pub tick: Duration,
    pub retransmit: Duration,
    /// One-way delay injected on every frame this replica sends.
    pub delay: Duration,
    /// Start a new, empty log and store (else recover what the device holds, or start
    /// empty on an empty device).
    pub fresh: bool,
    /// Use a device that holds anything but a replication log in its log region (another
    /// daemon's or cluster's format, a file system, other data).
    pub force: bool,
    /// Group commit: append everything the protocol hands out at once with one flush
    /// (the default). Without it every entry gets a durable write of its own (all of a
    /// batch in flight at once), so the number of flushes is the number of entries,
    /// whatever the timing: what exp-commit uses to show that notifications cost no flush.
    pub group_commit: bool,
}

/// In-process hooks into the replica loop (all optional).
pub trait Hooks: Send {
    /// Primary: payloads to propose now; returns when to be asked again.
    fn poll(&mut self, _now: Instant, _propose: &mut Vec<Vec<u8>>) -> Option<Instant> {
        None
    }
    /// Primary: a proposal was appended at `index`.
    fn proposed(&mut self, _index: u64, _now: Instant) {}
    /// The commit index advanced to `commit` (on a secondary: the commit it learned).
    fn committed(&mut self, _commit: u64, _now: Instant) {}
    /// Entries were applied to the storage engine.
    fn applied(&mut self, _entries: &[Entry], _now: Instant) {}
    /// Entries `first..=last` were appended to the log with one durable write (one call per
    /// write the log reports, in index order: one per batch with group commit, one per
    /// entry without); `flushes` is the log's flush count since start, this one included.
    fn persisted(&mut self, _first: u64, _last: u64, _flushes: u64) {}
    /// Primary: the connection to secondary `peer` is up (handshake done).
    fn peer_connected(&mut self, _peer: NodeId) {}
    /// The loop handled everything pending; the node's counters.
    fn loop_done(&mut self, _stats: &Stats) {}
}

/// No hooks.
#[derive(Debug, Default)]
pub struct NoHooks;
impl Hooks for NoHooks {}

/// What a replica did, reported when it stops.
#[derive(Debug, Clone, Copy, Default)]
pub struct ReplicaReport {
    pub stats: Stats,
    pub log_flushes: u64,
    pub last_index: u64,
    pub commit: u64,
    pub applied: u64,
    /// Committed entries the storage engine skipped as invalid.
    pub apply_rejected: u64,
    pub term: u64,
    /// Times the loop woke up (a frame, a timer, a poll or its 20 ms ceiling): an idle
    /// replica wakes about 50 times a second, a spinning one millions of times.
    pub wakeups: u64,
}

enum Event {
    Conn {
        conn: u64,
        link: Link,
        stream: TcpStream,
        /// Outgoing replica connections: the peer, whose handshake is done.
        peer: Option<NodeId>,
    },
    Frame {
        conn: u64,
        frame: Frame,
    },
    Closed {
        conn: u64,
    },
    /// The apply worker applied a batch (`None`: an error stopped it).
    Applied(Option<Applied>),
}

/// A running replica (its loop on its own thread).
#[derive(Debug)]
pub struct ReplicaHandle {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Result<ReplicaReport, ReplicaError>>>,
}

impl ReplicaHandle {
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
    /// Stops the loop and returns its report (or the error that stopped it earlier).
    pub fn stop(mut self) -> Result<ReplicaReport, ReplicaError> {
        self.stop.store(true, Ordering::SeqCst);
        match self.thread.take().expect("joined once").join() {
            Ok(r) => r,
            Err(_) => Err(ReplicaError::Config("replica thread panicked".into())),
        }
    }
    pub fn is_finished(&self) -> bool {
        self.thread.as_ref().is_none_or(|t| t.is_finished())
    }
}

impl Drop for ReplicaHandle {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Opens the device and starts the replica loop on a thread.
pub fn spawn(opts: ReplicaOptions, hooks: Box<dyn Hooks>) -> Result<ReplicaHandle, ReplicaError> {
    let addr = opts
        .listener
        .local_addr()
        .map_err(|source| ReplicaError::Io {
            what: "listener address".into(),
            cause: source,
        })?;
    let stop = Arc::new(AtomicBool::new(false));
    let (ready_tx, ready_rx) = mpsc::channel();
    let stop2 = stop.clone();
    let thread = std::thread::Builder::new()
        .name(format!("replica-{}", opts.id))
        .spawn(move || run(opts, hooks, stop2, Some(ready_tx)))
        .map_err(|source| ReplicaError::Io {
            what: "spawning the replica thread".into(),
            cause: source,
        })?;
    let mut h = ReplicaHandle {
        addr,
        stop,
        thread: Some(thread),
    };
    // Wait until the device is open (or opening failed).
    if ready_rx.recv().is_err() {
        return match h.thread.take().expect("thread").join() {
            Ok(Err(e)) => Err(e),
            _ => Err(ReplicaError::Config("replica thread ended at start".into())),
        };
    }
    Ok(h)
}

struct Storage {
    eng: UringEngine,
    log: LogStore,
}

/// Opens (or, with `fresh` or on a device without a log, creates) the log and the store.
/// Ownership is decided from the log region's first block alone: a replication log there
/// is ours; anything else needs `force` unless the device is empty.
fn open_storage(opts: &ReplicaOptions) -> Result<(Storage, KvStore, Vec<Entry>), ReplicaError> {
    let mut eng = UringEngine::with_queue_depth(64)?;
    let r = opts.regions;
    let open = || Device::open(&opts.device);
    let dev = open()?;
    dev.require_size(r.end())?;
    let ours = LogStore::holds_log(&mut eng, &dev, r.log_offset)?;
    if ours && !opts.fresh {
        let (log, entries) = LogStore::open(&mut eng, dev, r.log_offset, r.log_len)?;
        let kv = KvStore::open(&mut eng, open()?, r.data_offset, r.data_len)?;
        return Ok((Storage { eng, log }, kv, entries));
    }
    if !ours && !opts.force {
        refuse_foreign(&mut eng, &dev)?;
    }
    let log = LogStore::create(&mut eng, dev, r.log_offset, r.log_len)?;
    let kv = KvStore::create(&mut eng, open()?, r.data_offset, r.data_len)?;
    Ok((Storage { eng, log }, kv, Vec::new()))
}

/// Errs unless the device's first MiB is empty, naming what it holds (a daemon device's
/// cluster and daemon id).
fn refuse_foreign(eng: &mut UringEngine, dev: &Device) -> Result<(), ReplicaError> {
    // One read: the label is decoded from the bytes the probe read.
    let probed = probe_head(eng, dev)?;
    let found = match probed.found {
        Found::Empty => return Ok(()),
        Found::Blocklab => match Label::decode(probed.head()) {
            Ok(l) => format!(
                "a blocklab label of cluster {} daemon {} and no replication log",
                l.cluster_fsid, l.daemon_id
            ),
            Err(e) => format!("a damaged blocklab label ({e})"),
        },
        other => other.to_string(),
    };
    Err(ReplicaError::Foreign {
        path: dev.path().to_path_buf(),
        found,
    })
}

static NEXT_CONN: AtomicU64 = AtomicU64::new(1);

/// Shortest and longest wait before the primary connects to a secondary again.
const MIN_BACKOFF: Duration = Duration::from_millis(20);
const MAX_BACKOFF: Duration = Duration::from_secs(2);
/// A connection that lasted this long resets the backoff.
const STABLE: Duration = Duration::from_secs(1);
/// How long the primary waits for a secondary's `Hello`.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(2);
/// The same report is printed at most once per this period.
const REPORT_EVERY: Duration = Duration::from_secs(10);

/// Exponential backoff: twice the last wait, at most [`MAX_BACKOFF`].
fn next_backoff(last: Duration) -> Duration {
    (last * 2).clamp(MIN_BACKOFF, MAX_BACKOFF)
}

/// The stop flag, and a way to wake the threads that sleep on it.
struct Stopper {
    flag: Arc<AtomicBool>,
    lock: Mutex<()>,
    cv: Condvar,
}

impl Stopper {
    fn stopped(&self) -> bool {
        self.flag.load(Ordering::SeqCst)
    }
    fn stop(&self) {
        self.flag.store(true, Ordering::SeqCst);
        let _g = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        self.cv.notify_all();
    }
    /// Sleeps `d`, or less when stopped.
    fn sleep(&self, d: Duration) {
        let g = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        let _ = self.cv.wait_timeout_while(g, d, |_| !self.stopped());
    }
}

/// Every connection's stream, so that stopping can end its reader.
type Streams = Arc<Mutex<HashMap<u64, TcpStream>>>;

/// Errors of the operator's attention, printed at most once per [`REPORT_EVERY`] each.
struct Reporter {
    id: NodeId,
    seen: HashMap<String, Instant>,
}

impl Reporter {
    fn report(&mut self, what: impl Display) {
        let m = what.to_string();
        let now = Instant::now();
        if self
            .seen
            .get(&m)
            .is_some_and(|t| now.duration_since(*t) < REPORT_EVERY)
        {
            return;
        }
        if self.seen.len() > 1024 {
            self.seen.clear();
        }
        eprintln!("blocklab repl {}: {m}", self.id);
        self.seen.insert(m, now);
    }
}

struct Conn {
    link: Link,
    stream: TcpStream,
    /// The replica at the other end, once its `Hello` was accepted (clients have none).
    peer: Option<NodeId>,
}

/// The replica loop's state.
struct Driver<'a> {
    opts: &'a ReplicaOptions,
    node: Node,
    st: Storage,
    applier: Applier,
    hooks: Box<dyn Hooks>,
    conns: HashMap<u64, Conn>,
    peer_conn: HashMap<NodeId, u64>,
    /// index → (connection, client's write id) of writes waiting for their commit.
    clients: BTreeMap<u64, (u64, u64)>,
    /// Record bytes of the entries proposed but not appended yet: the log's `space_left`
    /// does not count them, and a write is admitted only if it fits after them. Every
    /// append writes everything proposed so far, so it goes back to 0 after each.
    unappended: u64,
    flushes_at_start: u64,
    apply_rejected: u64,
    /// The apply worker stopped on an error ([`Applier::finish`] returns it).
    apply_failed: bool,
    reporter: Reporter,
}

/// Runs a replica until `stop` is set (or an error). `started` is signalled once the device
/// is open and the listener accepts.
pub fn run(
    opts: ReplicaOptions,
    hooks: Box<dyn Hooks>,
    stop: Arc<AtomicBool>,
    started: Option<mpsc::Sender<()>>,
) -> Result<ReplicaReport, ReplicaError> {
    if !opts.members.contains(&opts.primary) {
        return Err(ReplicaError::Config(format!(
            "primary {} is not among the members {:?}",
            opts.primary, opts.members
        )));
    }
    if opts.tick.is_zero() {
        return Err(ReplicaError::Config("tick must be > 0".into()));
    }
    let is_primary = opts.id == opts.primary;
    if is_primary {
        if let Some(m) = opts
            .members
            .iter()
            .find(|&&m| m != opts.id && !opts.peers.iter().any(|(p, _)| p == &m))
        {
            return Err(ReplicaError::Config(format!(
                "the primary needs the address of every secondary (--peer {m}=HOST:PORT)"
            )));
        }
    }
    let (mut st, mut kv, recovered) = open_storage(&opts)?;
    let mut cfg = Config::new(
        opts.id,
        opts.primary,
        opts.members.clone(),
        opts.policy.to_policy(opts.tick),
    );
    cfg.retransmit_ticks = (opts.retransmit.as_nanos() / opts.tick.as_nanos()).max(1) as u64;
    let mut node = if is_primary {
        // The recovered log's keys hold slots even before they are applied again.
        for e in &recovered {
            if let Ok(key) = kv.check(&e.payload) {
                kv.reserve(key);
            }
        }
        let term = st.log.term() + 1;
        st.log.set_term(&mut st.eng, term)?;
        Node::new_primary(cfg, term, recovered)?
    } else {
        Node::new_secondary(cfg, recovered)?
    };
    // No connection exists yet: each secondary is probed once its connection is up.
    for &(peer, _) in &opts.peers {
        node.peer_disconnected(peer);
    }

    let stopper = Arc::new(Stopper {
        flag: stop,
        lock: Mutex::new(()),
        cv: Condvar::new(),
    });
    let streams: Streams = Arc::default();
    let (tx, inbox) = mpsc::channel::<Event>();
    let mut threads: Vec<JoinHandle<()>> = Vec::new();
    let io = |what: &str| {
        let what = what.to_string();
        move |source| ReplicaError::Io {
            what,
            cause: source,
        }
    };
    // Accept connections on the shared server; each one's frames are read on its thread.
    let listener = opts.listener.try_clone().map_err(io("listener"))?;
    let server = {
        let (tx, stopper, streams) = (tx.clone(), stopper.clone(), streams.clone());
        Server::serve(listener, "repl", move |accepted| {
            let Ok(s) = accepted.try_clone() else {
                return;
            };
            if let Some(conn) = register_conn(&s, None, &tx, &streams, &stopper) {
                read_conn(&s, conn, &tx, &streams);
            }
        })
        .map_err(io("listener"))?
    };
    // The primary connects to every secondary, again whenever a connection breaks.
    if is_primary {
        for &(peer, addr) in &opts.peers {
            let (tx, stopper, streams) = (tx.clone(), stopper.clone(), streams.clone());
            let me = opts.id;
            threads.push(std::thread::spawn(move || {
                connect_loop(me, peer, addr, &tx, &streams, &stopper)
            }));
        }
    }
    let applier = {
        let tx = tx.clone();
        Applier::spawn(kv, move |a| {
            let _ = tx.send(Event::Applied(a));
        })?
    };
    drop(tx);
    if let Some(s) = started {
        let _ = s.send(());
    }

    let flushes_at_start = st.log.flushes();
    let mut d = Driver {
        opts: &opts,
        node,
        st,
        applier,
        hooks,
        conns: HashMap::new(),
        peer_conn: HashMap::new(),
        clients: BTreeMap::new(),
        unappended: 0,
        flushes_at_start,
        apply_rejected: 0,
        apply_failed: false,
        reporter: Reporter {
            id: opts.id,
            seen: HashMap::new(),
        },
    };
    let mut wakeups = 0u64;
    let result = d.run_loop(&inbox, &stopper, &mut wakeups);
    stopper.stop();
    for s in streams.lock().unwrap_or_else(|e| e.into_inner()).values() {
        let _ = s.shutdown(std::net::Shutdown::Both);
    }
    server.stop();
    d.conns.clear();
    // Everything handed to the apply worker is applied before the replica stops.
    let applied = d.applier.finish();
    drop(inbox);
    for t in threads {
        let _ = t.join();
    }
    result?;
    let applied = applied?;
    Ok(ReplicaReport {
        stats: d.node.stats(),
        log_flushes: d.st.log.flushes() - d.flushes_at_start,
        last_index: d.node.last_index(),
        commit: d.node.commit(),
        applied,
        apply_rejected: d.apply_rejected,
        term: d.node.term(),
        wakeups,
    })
}

impl Driver<'_> {
    fn run_loop(
        &mut self,
        inbox: &mpsc::Receiver<Event>,
        stopper: &Stopper,
        wakeups: &mut u64,
    ) -> Result<(), ReplicaError> {
        let tick = self.opts.tick;
        let start = Instant::now();
        let mut ticks_done = 0u64;
        let mut seen_commit = self.node.commit();
        // Only the primary polls its hooks for proposals; a secondary waits for frames alone.
        let mut next_poll: Option<Instant> = self.node.is_primary().then_some(start);
        let mut props: Vec<Vec<u8>> = Vec::new();
        while !stopper.stopped() {
            *wakeups += 1;
            let now = Instant::now();
            let mut until = now + Duration::from_millis(20);
            if let Some(t) = self.node.ticks_to_next_timer() {
                let at = start
                    + Duration::from_nanos((tick.as_nanos() as u64).saturating_mul(ticks_done + t));
                until = until.min(at);
            }
            if let Some(p) = next_poll {
                until = until.min(p);
            }
            match inbox.recv_timeout(until.saturating_duration_since(now)) {
                Ok(ev) => {
                    self.handle(ev);
                    for ev in inbox.try_iter().take(4095) {
                        self.handle(ev);
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
            if self.apply_failed {
                break;
            }
            let target = (start.elapsed().as_nanos() / tick.as_nanos()) as u64;
            if target > ticks_done {
                self.node.advance_to(target);
                ticks_done = target;
            }
            loop {
                let now = Instant::now();
                let advanced = self.node.commit() > seen_commit;
                if advanced {
                    seen_commit = self.node.commit();
                    self.hooks.committed(seen_commit, now);
                }
                // The workload reacts to commits before the primary decides it is idle.
                if self.node.is_primary() && (advanced || next_poll.is_some_and(|p| p <= now)) {
                    next_poll = self.hooks.poll(now, &mut props);
                    for p in props.drain(..) {
                        let index = self.admit(p.into())?;
                        self.hooks.proposed(index, now);
                    }
                }
                if !self.node.has_ready() {
                    self.hooks.loop_done(&self.node.stats());
                    break;
                }
                self.process_ready()?;
            }
        }
        Ok(())
    }

    /// Admits a client write on the primary: the storage engine must be able to apply it
    /// and the log region must have room for it; then proposes it.
    fn admit(&mut self, payload: Arc<[u8]>) -> Result<u64, AdmitError> {
        let mut kv = self.applier.store();
        let key = kv.check(&payload)?;
        let need = record_size(payload.len());
        let left = self.st.log.space_left().saturating_sub(self.unappended);
        if need > left {
            return Err(AdmitError::LogFull { need, left });
        }
        let index = self.node.propose(payload)?;
        kv.reserve(key);
        self.unappended += need;
        Ok(index)
    }

    fn process_ready(&mut self) -> Result<(), ReplicaError> {
        let rd = self.node.ready();
        self.send(rd.messages);
        if let Some(t) = rd.truncate_from {
            self.st.log.truncate(&mut self.st.eng, t)?;
        }
        if self.persist(&rd.persist)? {
            self.send(rd.persisted_messages);
        }
        if let Some(c) = rd.committed {
            // Answer clients before applying: the write is committed, applying is local.
            while let Some((&index, _)) = self.clients.first_key_value() {
                if index > c {
                    break;
                }
                let (_, (conn, id)) = self.clients.pop_first().expect("non-empty");
                self.reply(conn, &Frame::ClientAck { id, index });
            }
        }
        if !rd.apply.is_empty() {
            self.applier.submit(rd.apply);
        }
        Ok(())
    }

    /// Appends `entries` durably (one flush for all with group commit, else one durable
    /// write per entry, all in flight at once). Returns false when a secondary's log region
    /// is full: nothing was appended, the node was told, and the acknowledgements of this
    /// Ready must not be sent.
    fn persist(&mut self, entries: &[Entry]) -> Result<bool, ReplicaError> {
        let (Some(first), Some(last)) = (entries.first(), entries.last()) else {
            return Ok(true);
        };
        let (first, last) = (first.index, last.index);
        self.unappended = 0;
        let appended = if self.opts.group_commit {
            self.st.log.append(&mut self.st.eng, entries)
        } else {
            self.st.log.append_each(&mut self.st.eng, entries)
        };
        match appended {
            Ok(writes) => {
                // One report per durable write, in index order, each with the flush count
                // once it was done.
                let mut flushes =
                    self.st.log.flushes() - self.flushes_at_start - writes.len() as u64;
                for w in writes {
                    flushes += 1;
                    self.hooks.persisted(*w.start(), *w.end(), flushes);
                }
                self.node.persisted(last);
                Ok(true)
            }
            Err(LogError::Full { need, left, .. }) if !self.node.is_primary() => {
                self.reporter.report(format_args!(
                    "log region full: entries from {first} need {need} bytes, {left} left; \
                     refusing them and telling the primary, still serving"
                ));
                self.node.persist_failed(need, left);
                Ok(false)
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Sends protocol messages; an append going to several secondaries is encoded once.
    fn send(&mut self, msgs: Vec<(NodeId, Message)>) {
        let mut shared: Vec<(Message, Bytes)> = Vec::new();
        for (to, m) in msgs {
            let Some(c) = self.peer_conn.get(&to).and_then(|c| self.conns.get(c)) else {
                continue;
            };
            if let Some((_, b)) = shared.iter().find(|(s, _)| *s == m) {
                c.link.send_bytes(b.clone(), self.opts.delay);
                continue;
            }
            let mut v = Vec::new();
            if let Err(e) = wire::encode_message(&m, &mut v) {
                self.reporter
                    .report(format_args!("not sending a message to {to}: {e}"));
                continue;
            }
            let b: Bytes = Arc::new(v);
            c.link.send_bytes(b.clone(), self.opts.delay);
            if matches!(&m, Message::Append { entries, .. } if !entries.is_empty()) {
                shared.push((m, b));
            }
        }
    }

    fn reply(&mut self, conn: u64, f: &Frame) {
        if let Some(c) = self.conns.get(&conn) {
            if let Err(e) = c.link.send(f, Duration::ZERO) {
                self.reporter.report(format_args!("not answering: {e}"));
            }
        }
    }

    /// Forgets a connection: its frames are ignored from now on, and what was queued on it
    /// is still written before its sending side is shut down (shutting it down at once, with
    /// the peer's frames unread, would reset it and lose the queued frames).
    fn close(&mut self, conn: u64) {
        if let Some(c) = self.conns.remove(&conn) {
            if let Some(p) = c.peer {
                if self.peer_conn.get(&p) == Some(&conn) {
                    self.peer_conn.remove(&p);
                    self.node.peer_disconnected(p);
                }
            }
        }
    }

    fn peer_addr(&self, conn: u64) -> String {
        self.conns
            .get(&conn)
            .and_then(|c| c.stream.peer_addr().ok())
            .map_or_else(|| "?".into(), |a| a.to_string())
    }

    fn handle(&mut self, ev: Event) {
        match ev {
            Event::Conn {
                conn,
                link,
                stream,
                peer,
            } => {
                self.conns.insert(conn, Conn { link, stream, peer });
                if let Some(p) = peer {
                    self.peer_conn.insert(p, conn);
                    self.node.peer_reconnected(p);
                    self.hooks.peer_connected(p);
                }
            }
            Event::Closed { conn } => self.close(conn),
            Event::Applied(Some(a)) => {
                for (index, why) in a.rejected {
                    self.apply_rejected += 1;
                    self.reporter
                        .report(format_args!("committed entry {index} skipped: {why}"));
                }
                self.hooks.applied(&a.entries, a.at);
            }
            Event::Applied(None) => self.apply_failed = true,
            Event::Frame { conn, frame } => self.on_frame(conn, frame),
        }
    }

    fn on_frame(&mut self, conn: u64, frame: Frame) {
        if !self.conns.contains_key(&conn) {
            return; // closed by us
        }
        match frame {
            Frame::Hello { version, id } => self.on_hello(conn, version, id),
            Frame::Repl(m) => {
                let from = m.from();
                let peer = self.conns.get(&conn).and_then(|c| c.peer);
                if peer != Some(from) {
                    let who = peer.map_or_else(
                        || "did not introduce itself".to_string(),
                        |p| format!("introduced itself as replica {p}"),
                    );
                    let addr = self.peer_addr(conn);
                    self.reporter.report(format_args!(
                        "dropped a replication message from replica {from}: the connection \
                         from {addr} {who}"
                    ));
                    return;
                }
                if let Err(e) = self.node.step(m) {
                    self.reporter.report(e);
                }
            }
            Frame::ClientWrite { id, payload } => {
                if !self.node.is_primary() {
                    let message = format!("replica {} is not the primary", self.opts.id);
                    self.reply(conn, &Frame::ClientErr { id, message });
                    return;
                }
                match self.admit(payload) {
                    Ok(index) => {
                        self.clients.insert(index, (conn, id));
                    }
                    Err(e) => {
                        let message = e.to_string();
                        self.reply(conn, &Frame::ClientErr { id, message });
                    }
                }
            }
            Frame::StatusReq => {
                let s = Status {
                    id: self.opts.id,
                    primary: self.node.is_primary(),
                    term: self.node.term(),
                    last_index: self.node.last_index(),
                    durable_index: self.node.durable_index(),
                    commit: self.node.commit(),
                    applied: self.applier.store().applied(),
                };
                self.reply(conn, &Frame::Status(s));
            }
            Frame::ClientAck { .. } | Frame::ClientErr { .. } | Frame::Status(_) => {}
        }
    }

    /// A replica introduced itself on an incoming connection: answer with our `Hello`
    /// (so a mismatch is seen at both ends) and keep the connection only if it is the
    /// configured primary speaking our version.
    fn on_hello(&mut self, conn: u64, version: u8, id: NodeId) {
        self.reply(conn, &Frame::hello(self.opts.id));
        let addr = self.peer_addr(conn);
        let refusal = if version != WIRE_VERSION {
            Some(format!(
                "replica {id} at {addr} speaks wire version {version}, this replica speaks \
                 version {WIRE_VERSION}; closing its connection"
            ))
        } else if self.node.is_primary() || id != self.opts.primary {
            Some(format!(
                "replica {id} at {addr} connected as the primary, but the primary is {}; \
                 closing its connection",
                self.opts.primary
            ))
        } else {
            None
        };
        if let Some(r) = refusal {
            self.reporter.report(r);
            self.close(conn);
            return;
        }
        if let Some(c) = self.conns.get_mut(&conn) {
            c.peer = Some(id);
            self.peer_conn.insert(id, conn);
        }
    }
}

/// Why a connection to a secondary was not made.
#[derive(Debug, thiserror::Error)]
enum ConnectError {
    #[error("unreachable: {0}")]
    Unreachable(std::io::Error),
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Wire(#[from] WireError),
    #[error("speaks wire version {got}, this replica speaks version {WIRE_VERSION}")]
    Version { got: u8 },
    #[error("answers as replica {got}")]
    WrongId { got: NodeId },
    #[error("no handshake answer: {0}")]
    NoHello(String),
}

/// Connects to secondary `peer` and exchanges `Hello`s.
fn greet(me: NodeId, peer: NodeId, addr: SocketAddr) -> Result<TcpStream, ConnectError> {
    let s =
        TcpStream::connect_timeout(&addr, HANDSHAKE_TIMEOUT).map_err(ConnectError::Unreachable)?;
    s.set_nodelay(true)?;
    (&s).write_all(&wire::encode_to_vec(&Frame::hello(me))?)?;
    s.set_read_timeout(Some(HANDSHAKE_TIMEOUT))?;
    let mut body = Vec::new();
    match wire::read_frame(&mut &s, &mut body) {
        Ok(Some(Frame::Hello { version, .. })) if version != WIRE_VERSION => {
            return Err(ConnectError::Version { got: version })
        }
        Ok(Some(Frame::Hello { id, .. })) if id != peer => {
            return Err(ConnectError::WrongId { got: id })
        }
        Ok(Some(Frame::Hello { .. })) => {}
        Ok(Some(_)) => return Err(ConnectError::NoHello("another frame came first".into())),
        Ok(None) => return Err(ConnectError::NoHello("connection closed".into())),
        Err(e) => return Err(ConnectError::NoHello(e.to_string())),
    }
    s.set_read_timeout(None)?;
    Ok(s)
}

/// The primary's connection to one secondary: connect, greet, serve until it breaks, and
/// again after an exponential backoff; failures are reported when they change.
fn connect_loop(
    me: NodeId,
    peer: NodeId,
    addr: SocketAddr,
    tx: &mpsc::Sender<Event>,
    streams: &Streams,
    stopper: &Stopper,
) {
    let mut backoff = MIN_BACKOFF;
    let mut last_err: Option<String> = None;
    while !stopper.stopped() {
        match greet(me, peer, addr) {
            Ok(s) => {
                if last_err.take().is_some() {
                    eprintln!("blocklab repl {me}: secondary {peer} at {addr}: connected");
                }
                let began = Instant::now();
                if let Some(h) = serve_conn(s, Some(peer), tx, streams, stopper) {
                    let _ = h.join();
                }
                backoff = if began.elapsed() >= STABLE {
                    MIN_BACKOFF
                } else {
                    next_backoff(backoff)
                };
            }
            Err(e) => {
                let m = e.to_string();
                if last_err.as_deref() != Some(m.as_str()) {
                    eprintln!(
                        "blocklab repl {me}: secondary {peer} at {addr}: {m}; retrying with \
                         backoff (up to {} s)",
                        MAX_BACKOFF.as_secs()
                    );
                    last_err = Some(m);
                }
                backoff = next_backoff(backoff);
            }
        }
        stopper.sleep(backoff);
    }
}

/// Registers a connection with the loop and reads its frames on a thread. Returns the
/// reader thread.
fn serve_conn(
    s: TcpStream,
    peer: Option<NodeId>,
    tx: &mpsc::Sender<Event>,
    streams: &Streams,
    stopper: &Stopper,
) -> Option<JoinHandle<()>> {
    let conn = register_conn(&s, peer, tx, streams, stopper)?;
    let (tx, streams) = (tx.clone(), streams.clone());
    std::thread::Builder::new()
        .name("repl-read".into())
        .spawn(move || read_conn(&s, conn, &tx, &streams))
        .ok()
}

/// Registers a connection with the loop; returns its id.
fn register_conn(
    s: &TcpStream,
    peer: Option<NodeId>,
    tx: &mpsc::Sender<Event>,
    streams: &Streams,
    stopper: &Stopper,
) -> Option<u64> {
    let conn = NEXT_CONN.fetch_add(1, Ordering::Relaxed);
    let link = Link::spawn(s).ok()?;
    let stream = s.try_clone().ok()?;
    streams
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(conn, s.try_clone().ok()?);
    if stopper.stopped() {
        let _ = s.shutdown(std::net::Shutdown::Both);
    }
    tx.send(Event::Conn {
        conn,
        link,
        stream,
        peer,
    })
    .ok()?;
    Some(conn)
}

/// Reads a registered connection's frames into the loop until it ends.
fn read_conn(s: &TcpStream, conn: u64, tx: &mpsc::Sender<Event>, streams: &Streams) {
    let r = read_frames(s, |frame| tx.send(Event::Frame { conn, frame }).is_ok());
    if let Err(e) = r {
        eprintln!("blocklab repl: closing connection: {e}");
    }
    let _ = s.shutdown(std::net::Shutdown::Both);
    streams
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .remove(&conn);
    let _ = tx.send(Event::Closed { conn });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policy_specs_parse_and_bad_ones_say_why() {
        assert_eq!(PolicySpec::parse("idle"), Ok(PolicySpec::Idle));
        assert_eq!(
            PolicySpec::parse("periodic:50"),
            Ok(PolicySpec::Periodic(Duration::from_millis(50)))
        );
        assert_eq!(
            PolicySpec::parse("idle_delayed:1ms"),
            Ok(PolicySpec::IdleDelayed(Duration::from_millis(1)))
        );
        let tick = Duration::from_micros(100);
        assert_eq!(
            PolicySpec::parse("periodic:200").unwrap().to_policy(tick),
            Policy::Periodic { every: 2000 }
        );
        assert!(PolicySpec::parse("periodic")
            .unwrap_err()
            .contains("needs a duration"));
        assert!(PolicySpec::parse("eager:5")
            .unwrap_err()
            .contains("takes no parameter"));
        assert!(PolicySpec::parse("sometimes")
            .unwrap_err()
            .contains("unknown policy"));
        assert!(PolicySpec::parse("periodic:-1").is_err());
        assert!(PolicySpec::parse("periodic:abc").is_err());
        // Names come from the protocol's policies, and print back to what parses.
        for s in [
            "piggyback",
            "periodic:50",
            "eager",
            "idle",
            "idle_delayed:0",
        ] {
            let p = PolicySpec::parse(s).unwrap();
            assert_eq!(PolicySpec::parse(&p.to_string()), Ok(p), "{s}");
        }
        assert_eq!(
            PolicySpec::parse("idle_delayed:0").unwrap().name(),
            "idle_delayed"
        );
    }

    #[test]
    fn reconnect_backoff_doubles_up_to_its_ceiling() {
        let mut d = MIN_BACKOFF;
        let mut seen = vec![d];
        for _ in 0..10 {
            d = next_backoff(d);
            seen.push(d);
        }
        assert_eq!(seen[1], MIN_BACKOFF * 2);
        assert!(seen.windows(2).all(|w| w[1] >= w[0]));
        assert_eq!(*seen.last().unwrap(), MAX_BACKOFF);
    }
}
