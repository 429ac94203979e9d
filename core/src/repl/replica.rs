//! A replica: the protocol [`Node`] driven by a loop that owns the log, the storage engine,
//! the TCP connections and the clock: what it is started with ([`ReplicaOptions`]),
//! starting it ([`spawn`], [`run`]), and its loop. Its connections are made and read in
//! `peers.rs`, its device regions opened in `storage.rs`.
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
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::apply::Applier;
use super::kv::KvStore;
use super::log::{record_size, LogError};
use super::peers::{self, Event, Stopper, Streams};
use super::protocol::{Config, Entry, Message, Node, NodeId, Stats};
use super::storage::{open_storage, Storage};
use super::transport::{Bytes, Link};
use super::wire::{self, Frame, Status, WIRE_VERSION};

pub use super::error::{AdmitError, ReplicaError};
pub use super::hooks::{Hooks, NoHooks};
pub use super::spec::PolicySpec;
pub use super::storage::Regions;

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

/// The same report is printed at most once per this period.
const REPORT_EVERY: Duration = Duration::from_secs(10);

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
    check_options(&opts)?;
    let (st, kv, node) = open_node(&opts)?;

    let stopper = Arc::new(Stopper::new(stop));
    let streams: Streams = Arc::default();
    let (tx, inbox) = mpsc::channel::<Event>();
    let io = |what: &str| {
        let what = what.to_string();
        move |source| ReplicaError::Io {
            what,
            cause: source,
        }
    };
    let listener = opts.listener.try_clone().map_err(io("listener"))?;
    let server = peers::accept(listener, &tx, &streams, &stopper).map_err(io("listener"))?;
    let threads: Vec<JoinHandle<()>> = if opts.id == opts.primary {
        peers::connect_all(opts.id, &opts.peers, &tx, &streams, &stopper)
    } else {
        Vec::new()
    };
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

/// Errs on options no replica can run with.
fn check_options(opts: &ReplicaOptions) -> Result<(), ReplicaError> {
    if !opts.members.contains(&opts.primary) {
        return Err(ReplicaError::Config(format!(
            "primary {} is not among the members {:?}",
            opts.primary, opts.members
        )));
    }
    if opts.tick.is_zero() {
        return Err(ReplicaError::Config("tick must be > 0".into()));
    }
    if opts.id == opts.primary {
        if let Some(m) = opts
            .members
            .iter()
            .find(|&&m| m != opts.id && !opts.peers.iter().any(|(p, _)| p == &m))
        {
            return Err(ReplicaError::Config(format!(
                "the primary needs the address of every secondary (--peers {m}=HOST:PORT,...)"
            )));
        }
    }
    Ok(())
}

/// Opens the device and starts the protocol node on what it holds: a primary starts a new
/// term, above every term the log holds (its header's, which a secondary keeps up to date
/// with the terms it adopts, and its entries'), so a former secondary started as the
/// primary never reuses a term it accepted entries in. No connection exists yet.
fn open_node(opts: &ReplicaOptions) -> Result<(Storage, KvStore, Node), ReplicaError> {
    let (mut st, mut kv, recovered) =
        open_storage(&opts.device, opts.regions, opts.fresh, opts.force)?;
    let mut cfg = Config::new(
        opts.id,
        opts.primary,
        opts.members.clone(),
        opts.policy.to_policy(opts.tick),
    );
    cfg.retransmit_ticks = (opts.retransmit.as_nanos() / opts.tick.as_nanos()).max(1) as u64;
    let mut node = if opts.id == opts.primary {
        // The recovered log's keys hold slots even before they are applied again.
        for e in &recovered {
            if let Ok(key) = kv.check(&e.payload) {
                kv.reserve(key);
            }
        }
        let term = st.log.term().max(recovered.last().map_or(0, |e| e.term)) + 1;
        st.log.set_term(&mut st.eng, term)?;
        Node::new_primary(cfg, term, recovered)?
    } else {
        Node::new_secondary(cfg, st.log.term(), recovered)?
    };
    // No connection exists yet: each secondary is probed once its connection is up.
    for &(peer, _) in &opts.peers {
        node.peer_disconnected(peer);
    }
    Ok((st, kv, node))
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
        if let Some(term) = rd.persist_term {
            // A secondary's new term is durable before anything of this Ready goes out.
            self.st.log.set_term(&mut self.st.eng, term)?;
        }
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
                c.link.send_bytes(b.clone());
                continue;
            }
            let mut v = Vec::new();
            if let Err(e) = wire::encode_message(&m, &mut v) {
                self.reporter
                    .report(format_args!("not sending a message to {to}: {e}"));
                continue;
            }
            let b: Bytes = Arc::new(v);
            c.link.send_bytes(b.clone());
            if matches!(&m, Message::Append { entries, .. } if !entries.is_empty()) {
                shared.push((m, b));
            }
        }
    }

    fn reply(&mut self, conn: u64, f: &Frame) {
        if let Some(c) = self.conns.get(&conn) {
            if let Err(e) = c.link.send(f) {
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
