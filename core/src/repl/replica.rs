//! A replica: the protocol [`Node`] driven by a loop that owns the log, the storage engine,
//! the TCP connections and the clock.
//!
//! The primary connects to every secondary (and reconnects when a connection breaks);
//! secondaries answer on the connection an append came in on. Clients connect to the
//! primary and send `ClientWrite`s; each is answered with `ClientAck` once committed. Any
//! replica answers `StatusReq`. In-process users (the experiment) may attach [`Hooks`]:
//! a workload that proposes from inside the loop, and observers of commit and apply times.

use std::collections::{BTreeMap, HashMap};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::dev::{probe, DevError, Device, Found, UringEngine};
use crate::format::{Label, Layout};

use super::kv::{KvError, KvStore};
use super::log::{record_size, LogError, LogStore};
use super::protocol::{Config, Entry, Message, Node, NodeId, Policy, ProtocolError, Stats};
use super::transport::{read_frames, Link};
use super::wire::{Frame, Status};

/// Errors of a replica.
#[derive(Debug, thiserror::Error)]
pub enum ReplicaError {
    #[error(transparent)]
    Dev(#[from] DevError),
    #[error("replication log: {0}")]
    Log(#[from] LogError),
    #[error("storage engine: {0}")]
    Kv(#[from] KvError),
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    #[error("{path}: holds other data ({found}); refusing to overwrite it without --force")]
    Foreign { path: PathBuf, found: String },
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("bad replica configuration: {0}")]
    Config(String),
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

    /// Formatted regions when `path` carries a ready blocklab label, else
    /// [`Regions::plain`]`(log_len, data_len)`. Returns whether the device was formatted.
    pub fn detect(
        path: &std::path::Path,
        log_len: u64,
        data_len: u64,
    ) -> Result<(Regions, bool), ReplicaError> {
        let dev = Device::open_read_only(path)?;
        let mut eng = UringEngine::with_queue_depth(1)?;
        let mut b = crate::dev::AlignedBuf::new(crate::format::BLOCK);
        crate::dev::IoEngine::read_at(&mut eng, &dev, 0, &mut b)?;
        match Label::decode(&b) {
            Ok(l) if l.is_ready() => Ok((Regions::formatted(&l.layout, data_len), true)),
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
    pub fn name(&self) -> &'static str {
        match self {
            PolicySpec::Piggyback => "piggyback",
            PolicySpec::Periodic(_) => "periodic",
            PolicySpec::Eager => "eager",
            PolicySpec::Idle => "idle",
            PolicySpec::IdleDelayed(_) => "idle_delayed",
        }
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
            PolicySpec::IdleDelayed(d) if d.is_zero() => Policy::Idle,
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
    /// Primary: the secondaries' addresses.
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
    /// Overwrite a device holding other data.
    pub force: bool,
    /// Group commit: append everything the protocol hands out at once with one flush
    /// (the default). Without it every entry is appended and flushed on its own, so the
    /// number of flushes is the number of entries, whatever the timing: what exp-commit
    /// uses to show that notifications cost no flush.
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
    /// The loop handled everything pending: the node's counters, the log flushes since
    /// start, and the durable index.
    fn loop_done(&mut self, _stats: &Stats, _log_flushes: u64, _durable: u64) {}
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
        peer: Option<NodeId>,
    },
    Frame {
        conn: u64,
        frame: Frame,
    },
    Closed {
        conn: u64,
    },
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
            source,
        })?;
    let stop = Arc::new(AtomicBool::new(false));
    let (ready_tx, ready_rx) = mpsc::channel();
    let stop2 = stop.clone();
    let thread = std::thread::Builder::new()
        .name(format!("replica-{}", opts.id))
        .spawn(move || run(opts, hooks, stop2, Some(ready_tx)))
        .map_err(|source| ReplicaError::Io {
            what: "spawning the replica thread".into(),
            source,
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
    kv: KvStore,
}

fn open_storage(opts: &ReplicaOptions) -> Result<(Storage, Vec<Entry>), ReplicaError> {
    let mut eng = UringEngine::with_queue_depth(64)?;
    let r = opts.regions;
    let dev = Device::open(&opts.device)?;
    dev.require_size(r.end())?;
    if !opts.fresh {
        match LogStore::open(&mut eng, dev, r.log_offset, r.log_len) {
            Ok((log, entries)) => {
                let kv_dev = Device::open(&opts.device)?;
                let kv = KvStore::open(&mut eng, kv_dev, r.data_offset, r.data_len)?;
                return Ok((Storage { eng, log, kv }, entries));
            }
            Err(LogError::NotALog { .. }) => {}
            Err(e) => return Err(e.into()),
        }
    }
    let dev = Device::open(&opts.device)?;
    if !opts.force {
        let found = probe(&mut eng, &dev)?;
        let ours = LogStore::open(
            &mut eng,
            Device::open(&opts.device)?,
            r.log_offset,
            r.log_len,
        )
        .is_ok();
        // A formatted daemon device (ready label) is ours to use: its log region holds
        // the replication log, its data region the storage engine.
        let formatted =
            found == Found::Blocklab && Regions::detect(&opts.device, r.log_len, r.data_len)?.1;
        if found != Found::Empty && !ours && !formatted {
            return Err(ReplicaError::Foreign {
                path: opts.device.clone(),
                found: format!("{found:?}"),
            });
        }
    }
    let log = LogStore::create(&mut eng, dev, r.log_offset, r.log_len)?;
    let kv = KvStore::create(
        &mut eng,
        Device::open(&opts.device)?,
        r.data_offset,
        r.data_len,
    )?;
    Ok((Storage { eng, log, kv }, Vec::new()))
}

static NEXT_CONN: AtomicU64 = AtomicU64::new(1);

/// Runs a replica until `stop` is set (or an error). `started` is signalled once the device
/// is open and the listener accepts.
pub fn run(
    opts: ReplicaOptions,
    mut hooks: Box<dyn Hooks>,
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
    let (mut st, recovered) = open_storage(&opts)?;
    let is_primary = opts.id == opts.primary;
    let mut cfg = Config::new(
        opts.id,
        opts.members.clone(),
        opts.policy.to_policy(opts.tick),
    );
    cfg.retransmit_ticks = (opts.retransmit.as_nanos() / opts.tick.as_nanos()).max(1) as u64;
    let mut node = if is_primary {
        let term = st.log.term() + 1;
        st.log.set_term(&mut st.eng, term)?;
        Node::new_primary(cfg, term, recovered)?
    } else {
        Node::new_secondary(cfg, recovered)?
    };
    let flushes_at_start = st.log.flushes();

    let (tx, inbox) = mpsc::channel::<Event>();
    let delay = opts.delay;
    let mut threads: Vec<JoinHandle<()>> = Vec::new();
    // Accept connections.
    opts.listener
        .set_nonblocking(true)
        .map_err(|source| ReplicaError::Io {
            what: "listener".into(),
            source,
        })?;
    let listener = opts
        .listener
        .try_clone()
        .map_err(|source| ReplicaError::Io {
            what: "listener".into(),
            source,
        })?;
    {
        let tx = tx.clone();
        let stop = stop.clone();
        threads.push(std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((s, _)) => {
                        let _ = s.set_nonblocking(false);
                        serve_conn(s, None, tx.clone());
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(5))
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        }));
    }
    // The primary connects to every secondary, again whenever a connection breaks.
    if is_primary {
        for &(peer, addr) in &opts.peers {
            let tx = tx.clone();
            let stop = stop.clone();
            threads.push(std::thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    if let Ok(s) = TcpStream::connect_timeout(&addr, Duration::from_secs(1)) {
                        if let Some(h) = serve_conn(s, Some(peer), tx.clone()) {
                            let _ = h.join();
                        }
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
            }));
        }
    }
    drop(tx);
    if let Some(s) = started {
        let _ = s.send(());
    }

    let mut conns: HashMap<u64, (Link, TcpStream)> = HashMap::new();
    let mut peer_conn: HashMap<NodeId, u64> = HashMap::new();
    let mut clients: BTreeMap<u64, (u64, u64)> = BTreeMap::new(); // index -> (conn, id)
    let mut pending_bytes = 0u64;
    let start = Instant::now();
    let mut ticks_done = 0u64;
    let mut seen_commit = node.commit();
    // Only the primary polls its hooks for proposals; a secondary waits for frames alone.
    let mut next_poll: Option<Instant> = is_primary.then_some(start);
    let mut props: Vec<Vec<u8>> = Vec::new();
    let mut wakeups = 0u64;
    let result: Result<(), ReplicaError> = (|| {
        while !stop.load(Ordering::SeqCst) {
            wakeups += 1;
            let now = Instant::now();
            let mut until = now + Duration::from_millis(20);
            if let Some(t) = node.ticks_to_next_timer() {
                let at = start
                    + Duration::from_nanos(
                        (opts.tick.as_nanos() as u64).saturating_mul(ticks_done + t),
                    );
                until = until.min(at);
            }
            if let Some(p) = next_poll {
                until = until.min(p);
            }
            let mut events = Vec::new();
            match inbox.recv_timeout(until.saturating_duration_since(now)) {
                Ok(ev) => {
                    events.push(ev);
                    while let Ok(ev) = inbox.try_recv() {
                        events.push(ev);
                        if events.len() >= 4096 {
                            break;
                        }
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
            for ev in events {
                match ev {
                    Event::Conn {
                        conn,
                        link,
                        stream,
                        peer,
                    } => {
                        conns.insert(conn, (link, stream));
                        if let Some(p) = peer {
                            peer_conn.insert(p, conn);
                            node.peer_reconnected(p);
                        }
                    }
                    Event::Closed { conn } => {
                        conns.remove(&conn);
                        peer_conn.retain(|_, c| *c != conn);
                    }
                    Event::Frame { conn, frame } => match frame {
                        Frame::Repl(m) => {
                            let from = match &m {
                                Message::Append { from, .. } | Message::AppendResp { from, .. } => {
                                    *from
                                }
                            };
                            if !node.is_primary() {
                                peer_conn.insert(from, conn);
                            }
                            node.step(m);
                        }
                        Frame::ClientWrite { id, payload } => {
                            let reply = |conns: &HashMap<u64, (Link, TcpStream)>, f: Frame| {
                                if let Some((l, _)) = conns.get(&conn) {
                                    l.send(&f, Duration::ZERO);
                                }
                            };
                            if !node.is_primary() {
                                reply(
                                    &conns,
                                    Frame::ClientErr {
                                        id,
                                        message: format!("replica {} is not the primary", opts.id),
                                    },
                                );
                                continue;
                            }
                            let need = record_size(payload.len());
                            if need + pending_bytes > st.log.space_left() {
                                reply(
                                    &conns,
                                    Frame::ClientErr {
                                        id,
                                        message: format!(
                                            "log region full: {} bytes left, the write needs {need}",
                                            st.log.space_left().saturating_sub(pending_bytes)
                                        ),
                                    },
                                );
                                continue;
                            }
                            let index = node.propose(payload)?;
                            pending_bytes += need;
                            clients.insert(index, (conn, id));
                        }
                        Frame::StatusReq => {
                            if let Some((l, _)) = conns.get(&conn) {
                                l.send(
                                    &Frame::Status(Status {
                                        id: opts.id,
                                        primary: node.is_primary(),
                                        term: node.term(),
                                        last_index: node.last_index(),
                                        durable_index: node.durable_index(),
                                        commit: node.commit(),
                                        applied: st.kv.applied(),
                                    }),
                                    Duration::ZERO,
                                );
                            }
                        }
                        _ => {}
                    },
                }
            }
            let target = (start.elapsed().as_nanos() / opts.tick.as_nanos()) as u64;
            while ticks_done < target {
                node.tick();
                ticks_done += 1;
            }
            loop {
                let now = Instant::now();
                let advanced = node.commit() > seen_commit;
                if advanced {
                    seen_commit = node.commit();
                    hooks.committed(seen_commit, now);
                }
                // The workload reacts to commits before the primary decides it is idle.
                if node.is_primary() && (advanced || next_poll.is_some_and(|p| p <= now)) {
                    next_poll = hooks.poll(now, &mut props);
                    for p in props.drain(..) {
                        let need = record_size(p.len());
                        if need + pending_bytes > st.log.space_left() {
                            return Err(LogError::Full {
                                need,
                                left: st.log.space_left().saturating_sub(pending_bytes),
                                len: opts.regions.log_len,
                            }
                            .into());
                        }
                        let index = node.propose(p)?;
                        pending_bytes += need;
                        hooks.proposed(index, now);
                    }
                }
                if !node.has_ready() {
                    hooks.loop_done(
                        &node.stats(),
                        st.log.flushes() - flushes_at_start,
                        node.durable_index(),
                    );
                    break;
                }
                let rd = node.ready();
                for (to, m) in rd.messages {
                    send_to(&conns, &peer_conn, to, m, delay);
                }
                if let Some(t) = rd.truncate_from {
                    st.log.truncate(&mut st.eng, t)?;
                }
                if let Some(last) = rd.persist.last().map(|e| e.index) {
                    if opts.group_commit {
                        st.log.append(&mut st.eng, &rd.persist)?;
                    } else {
                        for e in &rd.persist {
                            st.log.append(&mut st.eng, std::slice::from_ref(e))?;
                        }
                    }
                    pending_bytes = 0;
                    node.persisted(last);
                }
                for (to, m) in rd.persisted_messages {
                    send_to(&conns, &peer_conn, to, m, delay);
                }
                if !rd.apply.is_empty() {
                    st.kv.apply(&mut st.eng, &rd.apply)?;
                    hooks.applied(&rd.apply, Instant::now());
                }
                if let Some(c) = rd.committed {
                    while let Some((&index, _)) = clients.first_key_value() {
                        if index > c {
                            break;
                        }
                        let (_, (conn, id)) = clients.pop_first().expect("non-empty");
                        if let Some((l, _)) = conns.get(&conn) {
                            l.send(&Frame::ClientAck { id, index }, Duration::ZERO);
                        }
                    }
                }
            }
        }
        Ok(())
    })();
    stop.store(true, Ordering::SeqCst);
    for (_, (_, s)) in conns.drain() {
        let _ = s.shutdown(std::net::Shutdown::Both);
    }
    drop(inbox);
    for t in threads {
        let _ = t.join();
    }
    result?;
    Ok(ReplicaReport {
        stats: node.stats(),
        log_flushes: st.log.flushes() - flushes_at_start,
        last_index: node.last_index(),
        commit: node.commit(),
        applied: st.kv.applied(),
        term: node.term(),
        wakeups,
    })
}

fn send_to(
    conns: &HashMap<u64, (Link, TcpStream)>,
    peer_conn: &HashMap<NodeId, u64>,
    to: NodeId,
    m: Message,
    delay: Duration,
) {
    if let Some((l, _)) = peer_conn.get(&to).and_then(|c| conns.get(c)) {
        l.send(&Frame::Repl(m), delay);
    }
}

/// Registers a connection with the loop and reads its frames on a thread. Returns the
/// reader thread.
fn serve_conn(
    s: TcpStream,
    peer: Option<NodeId>,
    tx: mpsc::Sender<Event>,
) -> Option<JoinHandle<()>> {
    let conn = NEXT_CONN.fetch_add(1, Ordering::Relaxed);
    let link = Link::spawn(&s).ok()?;
    let stream = s.try_clone().ok()?;
    tx.send(Event::Conn {
        conn,
        link,
        stream,
        peer,
    })
    .ok()?;
    std::thread::Builder::new()
        .name("repl-read".into())
        .spawn(move || {
            let r = read_frames(&s, |frame| tx.send(Event::Frame { conn, frame }).is_ok());
            if let Err(e) = r {
                eprintln!("blocklab repl: closing connection: {e}");
            }
            let _ = s.shutdown(std::net::Shutdown::Both);
            let _ = tx.send(Event::Closed { conn });
        })
        .ok()
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
    }
}
