//! The block service ("the cluster" the management nodes act on): owns the volume store and
//! the operation journal, runs each operation id at most once on one executor thread,
//! answers on the submitting connection, and — when no submitter is left to answer —
//! delivers the result to the VIP, wherever it now is.
//!
//! Fencing: a submission carries its holder's epoch; one older than the highest epoch the
//! journal has seen is refused (`Fenced`) without running anything. When a newer holder
//! claims the VIP, every submission waiting under an older epoch is orphaned: its result
//! goes to the VIP (the new holder) rather than to a connection whose far end may be a dead
//! host that never resets it.
//!
//! Crash safety: the volume store records each operation's outcome under its id in the
//! same catalog write as the change, so an execution cut short by a restart of the service
//! after that commit becomes `Done` from the catalog (not run again); one cut short before
//! it becomes `Aborted` (nothing was committed; a re-send runs it). A journal write that
//! fails after an execution stops the service with an error (waiters get the error).

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex, RwLock};
use std::thread;
use std::time::{Duration, Instant};

use super::coord_journal::CoordJournal;
use super::dispatcher::Epoch;
use super::journal::{FileJournal, JournalError, OpJournal, OpState, Record};
use super::wire::{Conn, Msg, Op, OpResult, VolumeInfo, WireError, KEEPALIVE};
use crate::jsonl::server::{self, Server};
use crate::volume::{Applied, StoreConfig, VolumeError, VolumeStore};

/// A service connection silent for this long is closed (a peer whose host died never
/// closes it).
pub const CONN_IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// Where the operation journal lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JournalSpec {
    /// `journal.jsonl` in the state directory.
    File,
    /// Under `root` in a coordination backend.
    Coord {
        spec: crate::coord::CoordSpec,
        root: String,
    },
}

/// Settings of a block service.
#[derive(Debug, Clone)]
pub struct ServiceConfig {
    pub listen: SocketAddr,
    /// Where results go when their submitter is gone (the VIP and management port).
    pub vip: SocketAddr,
    pub state_dir: PathBuf,
    pub devices: Vec<PathBuf>,
    pub store: StoreConfig,
    pub force: bool,
    /// How long a result is offered to the VIP before it is left in the journal only.
    pub deliver_for: Duration,
    /// Caps copy throughput (bytes/s) so a small volume's copy lasts as long as a large
    /// one's would (the experiment kills nodes in the middle of copies). `None` = full speed.
    pub copy_rate: Option<u64>,
    /// A node whose pings stop for this long is dead: its session-bound operations
    /// (`client_retry`) are abandoned, as a cluster drops a dead client's work.
    pub session_timeout: Duration,
    pub journal: JournalSpec,
    /// Crash injection for tests: right after the operation with this id committed its
    /// change to the catalog, and before the journal records it `Done`, the service stops
    /// dead (nothing more is journaled or answered; [`Service::wait`] returns an error).
    #[doc(hidden)]
    pub crash_after_commit: Option<String>,
}

/// Errors of the block service.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error(transparent)]
    Volume(#[from] VolumeError),
    #[error(transparent)]
    Journal(#[from] JournalError),
    #[error("coordination backend: {0}")]
    Coord(String),
    #[error("the block service stopped: {0}")]
    Fatal(String),
    #[error("listening on {addr}: {cause}")]
    Listen {
        addr: SocketAddr,
        cause: std::io::Error,
    },
}

struct Job {
    op_id: String,
    op: Op,
    abort: Arc<AtomicBool>,
    session_bound: bool,
}

/// What the executor thread takes, in order.
enum Work {
    Run(Job),
    Stop,
}

/// When each node last pinged.
type Pings = Arc<Mutex<HashMap<u32, Instant>>>;

/// The volumes as of the last finished operation (`List` is answered from it, never
/// waiting behind a running copy).
type Snapshot = Arc<RwLock<Vec<VolumeInfo>>>;

/// A submitter waiting for a result, with the epoch it submitted under.
struct Waiter {
    epoch: Epoch,
    tx: Sender<OpResult>,
}

struct Shared {
    journal: Box<dyn OpJournal>,
    waiters: HashMap<String, Vec<Waiter>>,
    aborts: HashMap<String, Arc<AtomicBool>>,
    /// Set when the journal could not record an outcome: nothing more is admitted and the
    /// service stops.
    fatal: Option<String>,
}

fn lock(shared: &Mutex<Shared>) -> std::sync::MutexGuard<'_, Shared> {
    shared.lock().unwrap_or_else(|p| p.into_inner())
}

/// A running block service: the executor thread, and the port on the shared server
/// ([`crate::jsonl::server`]).
pub struct Service {
    pub addr: SocketAddr,
    stop: Arc<AtomicBool>,
    executor: Option<thread::JoinHandle<()>>,
    server: Option<Server<TcpListener>>,
    work: Sender<Work>,
    shared: Arc<Mutex<Shared>>,
}

impl std::fmt::Debug for Service {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Service").field("addr", &self.addr).finish()
    }
}

impl Service {
    /// Opens store and journal, binds, and starts serving.
    pub fn start(cfg: ServiceConfig) -> Result<Service, ServiceError> {
        let store = VolumeStore::open(&cfg.state_dir, &cfg.devices, cfg.store, cfg.force)?;
        let mut journal: Box<dyn OpJournal> = match &cfg.journal {
            JournalSpec::File => Box::new(FileJournal::open(&cfg.state_dir.join("journal.jsonl"))?),
            JournalSpec::Coord { spec, root } => {
                let c = crate::coord::connect(spec, &crate::coord::ConnectOptions::default())
                    .map_err(|e| ServiceError::Coord(e.to_string()))?;
                Box::new(CoordJournal::open(c, root)?)
            }
        };
        // Executions cut short by a restart of the service: done if the catalog holds their
        // committed outcome (the crash fell between the catalog commit and the journal's
        // `Done`), else abandoned (nothing was committed; a resubmission runs them again).
        for op_id in journal.running() {
            let rec = match store.applied(&op_id) {
                Some(a) => {
                    let (result, bytes) = applied_result(a);
                    Record::Done {
                        op_id,
                        result,
                        bytes,
                    }
                }
                None => Record::Aborted { op_id, bytes: 0 },
            };
            journal.append(rec)?;
        }
        let volumes: Snapshot = Arc::new(RwLock::new(snapshot(&store)));
        let listener = TcpListener::bind(cfg.listen).map_err(|source| ServiceError::Listen {
            addr: cfg.listen,
            cause: source,
        })?;
        let addr = listener
            .local_addr()
            .map_err(|source| ServiceError::Listen {
                addr: cfg.listen,
                cause: source,
            })?;
        let shared = Arc::new(Mutex::new(Shared {
            journal,
            waiters: HashMap::new(),
            aborts: HashMap::new(),
            fatal: None,
        }));
        let stop = Arc::new(AtomicBool::new(false));
        let pings: Pings = Arc::new(Mutex::new(HashMap::new()));
        let (work_tx, work_rx) = mpsc::channel::<Work>();
        let executor = {
            let (shared, stop, cfg, volumes) =
                (shared.clone(), stop.clone(), cfg.clone(), volumes.clone());
            thread::spawn(move || executor(store, work_rx, shared, volumes, stop, cfg))
        };
        let handler = Handler {
            shared: shared.clone(),
            work: work_tx.clone(),
            volumes,
            pings,
            session_timeout: cfg.session_timeout,
        };
        let server = Server::serve(listener, "block-service", move |conn| {
            let _ = handler.handle(conn);
        })
        .map_err(|source| ServiceError::Listen {
            addr,
            cause: source,
        })?;
        Ok(Service {
            addr,
            stop,
            executor: Some(executor),
            server: Some(server),
            work: work_tx,
            shared,
        })
    }

    /// Stops the service: the executor finishes the operation it runs (its submitters
    /// get the result), then the port stops; returns once every connection is closed.
    pub fn stop(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.work.send(Work::Stop);
        if let Some(t) = self.executor.take() {
            let _ = t.join();
        }
        if let Some(s) = self.server.take() {
            s.stop();
        }
    }

    /// Runs until `stop` is set from outside (for the `blocklab mgmt block-service` binary)
    /// or the service stops itself on a journal failure ([`ServiceError::Fatal`]).
    pub fn wait(self, stop: &AtomicBool) -> Result<(), ServiceError> {
        while !stop.load(Ordering::Relaxed) && !self.stop.load(Ordering::Relaxed) {
            thread::sleep(Duration::from_millis(50));
        }
        let fatal = lock(&self.shared).fatal.clone();
        self.stop();
        match fatal {
            Some(msg) => Err(ServiceError::Fatal(msg)),
            None => Ok(()),
        }
    }
}

fn snapshot(store: &VolumeStore) -> Vec<VolumeInfo> {
    store
        .list()
        .into_iter()
        .map(|v| VolumeInfo {
            name: v.name,
            size: v.size,
        })
        .collect()
}

/// The result (and bytes written) of an operation whose change the catalog holds.
fn applied_result(a: &Applied) -> (OpResult, u64) {
    match a.clone() {
        Applied::Created { name, size } => (OpResult::Created { name, size }, 0),
        Applied::Deleted { name } => (OpResult::Deleted { name }, 0),
        Applied::Copied { src, dst, bytes } => (OpResult::Copied { src, dst, bytes }, bytes),
    }
}

/// The connections' view of the service.
struct Handler {
    shared: Arc<Mutex<Shared>>,
    work: Sender<Work>,
    volumes: Snapshot,
    pings: Pings,
    session_timeout: Duration,
}

impl Handler {
    /// One connection (it stays registered with the server while this runs).
    fn handle(&self, accepted: server::Conn<TcpStream>) -> Result<(), WireError> {
        let (shared, pings, session_timeout) = (&self.shared, &self.pings, self.session_timeout);
        let stream = accepted.try_clone()?;
        stream.set_read_timeout(Some(CONN_IDLE_TIMEOUT))?;
        let mut conn = Conn::new(stream)?;
        while let Some(m) = conn.recv_or_refuse()? {
            match m {
                Msg::Ping { node } => {
                    // Its own lock: a ping never waits behind a journal fsync.
                    pings
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert(node, Instant::now());
                    conn.send(&Msg::Pong)?
                }
                Msg::Claim { epoch, .. } => {
                    let mut sh = lock(shared);
                    if epoch > sh.journal.max_epoch() {
                        if let Err(e) = sh.journal.append(Record::Epoch { epoch }) {
                            drop(sh);
                            conn.send(&Msg::refusal("", e.to_string()))?;
                            continue;
                        }
                    }
                    let current = sh.journal.max_epoch();
                    if current == epoch {
                        // Submitters of older epochs are orphaned: their results go to the VIP.
                        for ws in sh.waiters.values_mut() {
                            ws.retain(|w| w.epoch >= epoch);
                        }
                    }
                    drop(sh);
                    if current == epoch {
                        conn.send(&Msg::Ack {
                            op_id: String::new(),
                        })?;
                    } else {
                        conn.send(&Msg::Fenced {
                            op_id: String::new(),
                            current,
                        })?;
                    }
                }
                Msg::Submit {
                    op_id,
                    op,
                    epoch,
                    node,
                    session_bound,
                    tag,
                } => {
                    let rx = match admit(
                        shared,
                        &self.work,
                        &op_id,
                        op,
                        epoch,
                        node,
                        session_bound,
                        tag,
                    ) {
                        Admit::Answer(m) => {
                            conn.send(&m)?;
                            continue;
                        }
                        Admit::Wait(rx) => rx,
                        Admit::Close => return Ok(()),
                    };
                    conn.send(&Msg::Accepted {
                        op_id: op_id.clone(),
                    })?;
                    let alive = || {
                        !session_bound || {
                            let p = pings.lock().unwrap_or_else(|p| p.into_inner());
                            p.get(&node).is_none_or(|t| t.elapsed() < session_timeout)
                        }
                    };
                    match wait_result(&mut conn, &op_id, &rx, &alive) {
                        Some(result) => conn.send(&Msg::Reply { op_id, result })?,
                        None => {
                            // The submitter went away (or was orphaned by a newer holder).
                            if session_bound {
                                if let Some(a) = lock(shared).aborts.get(&op_id) {
                                    a.store(true, Ordering::Relaxed);
                                }
                            }
                            return Ok(());
                        }
                    }
                }
                Msg::List => {
                    let volumes = self
                        .volumes
                        .read()
                        .unwrap_or_else(|p| p.into_inner())
                        .clone();
                    conn.send(&Msg::Listed { volumes })?;
                }
                Msg::Request { op_id, .. } => {
                    conn.send(&Msg::refusal(
                        op_id,
                        "this is the block service; send requests to the VIP",
                    ))?;
                }
                other => conn.send(&other.unexpected())?,
            }
        }
        Ok(())
    }
}

enum Admit {
    Answer(Msg),
    Wait(Receiver<OpResult>),
    /// The service is stopping after a journal failure: close without a final answer, so
    /// the client sends the operation again to whoever serves next (an error reply would
    /// be final, and the operation may have been committed).
    Close,
}

#[allow(clippy::too_many_arguments)]
fn admit(
    shared: &Mutex<Shared>,
    work: &Sender<Work>,
    op_id: &str,
    op: Op,
    epoch: Epoch,
    node: u32,
    session_bound: bool,
    tag: Option<String>,
) -> Admit {
    let reply = |result| {
        Admit::Answer(Msg::Reply {
            op_id: op_id.to_string(),
            result,
        })
    };
    if op_id.is_empty() || op_id.len() > 128 {
        return reply(OpResult::error("operation id must be 1-128 characters"));
    }
    let mut sh = lock(shared);
    if sh.fatal.is_some() {
        return Admit::Close;
    }
    let current = sh.journal.max_epoch();
    if epoch < current {
        return Admit::Answer(Msg::Fenced {
            op_id: op_id.to_string(),
            current,
        });
    }
    match sh.journal.state(op_id).cloned() {
        Some(s) if *s.op() != op => {
            return reply(OpResult::error(format!(
                "operation id {op_id:?} was already used with different arguments ({:?})",
                s.op()
            )))
        }
        Some(OpState::Done { result, .. }) => return reply(result),
        Some(OpState::Running { .. }) => {
            let (tx, rx) = mpsc::channel();
            sh.waiters
                .entry(op_id.to_string())
                .or_default()
                .push(Waiter { epoch, tx });
            return Admit::Wait(rx);
        }
        Some(OpState::Aborted { .. }) | None => {}
    }
    if let Err(e) = sh.journal.append(Record::Started {
        op_id: op_id.to_string(),
        op: op.clone(),
        epoch,
        node,
        tag,
    }) {
        return reply(OpResult::error(e.to_string()));
    }
    let (tx, rx) = mpsc::channel();
    sh.waiters
        .insert(op_id.to_string(), vec![Waiter { epoch, tx }]);
    let abort = Arc::new(AtomicBool::new(false));
    sh.aborts.insert(op_id.to_string(), abort.clone());
    drop(sh);
    let _ = work.send(Work::Run(Job {
        op_id: op_id.to_string(),
        op,
        abort,
        session_bound,
    }));
    Admit::Wait(rx)
}

/// Waits for the result while watching the connection (and, through `alive`, the
/// submitting node's pings), repeating `Accepted` every [`KEEPALIVE`]; `None` if the
/// connection or the node is gone first, or the waiter was orphaned by a newer holder.
fn wait_result(
    conn: &mut Conn,
    op_id: &str,
    rx: &Receiver<OpResult>,
    alive: &dyn Fn() -> bool,
) -> Option<OpResult> {
    let mut last_sent = Instant::now();
    loop {
        match rx.recv_timeout(Duration::from_millis(10)) {
            Ok(r) => return Some(r),
            Err(RecvTimeoutError::Disconnected) => return None,
            Err(RecvTimeoutError::Timeout) => {
                if !alive() {
                    return None;
                }
                let _ = conn.stream.set_nonblocking(true);
                let mut b = [0u8; 1];
                let gone = match conn.stream.peek(&mut b) {
                    Ok(0) => true,
                    Ok(_) => false,
                    Err(e) => e.kind() != std::io::ErrorKind::WouldBlock,
                };
                let _ = conn.stream.set_nonblocking(false);
                if gone {
                    return None;
                }
                if last_sent.elapsed() >= KEEPALIVE {
                    last_sent = Instant::now();
                    let still = Msg::Accepted {
                        op_id: op_id.to_string(),
                    };
                    if conn.send(&still).is_err() {
                        return None;
                    }
                }
            }
        }
    }
}

fn executor(
    mut store: VolumeStore,
    work: Receiver<Work>,
    shared: Arc<Mutex<Shared>>,
    volumes: Snapshot,
    stop: Arc<AtomicBool>,
    cfg: ServiceConfig,
) {
    while let Ok(Work::Run(job)) = work.recv() {
        let (result, bytes, aborted) = execute(&mut store, &job, cfg.copy_rate);
        if cfg.crash_after_commit.as_deref() == Some(job.op_id.as_str()) {
            lock(&shared).fatal = Some(format!(
                "injected crash after the catalog commit of operation {:?}",
                job.op_id
            ));
            stop.store(true, Ordering::Relaxed);
            return;
        }
        *volumes.write().unwrap_or_else(|p| p.into_inner()) = snapshot(&store);
        let mut sh = lock(&shared);
        sh.aborts.remove(&job.op_id);
        let waiters = sh.waiters.remove(&job.op_id).unwrap_or_default();
        let rec = if aborted {
            Record::Aborted {
                op_id: job.op_id.clone(),
                bytes,
            }
        } else {
            Record::Done {
                op_id: job.op_id.clone(),
                result: result.clone(),
                bytes,
            }
        };
        if let Err(e) = sh.journal.append(rec) {
            // Without a durable record the result must not be handed out, and the journal
            // can no longer keep operations at most once: stop. The waiters get no answer
            // (their connections close, so their clients send again and the restarted
            // service answers from the catalog): an error would be final although the
            // operation may have been committed.
            let msg = format!(
                "recording the outcome of operation {:?} in the journal failed: {e}",
                job.op_id
            );
            sh.fatal = Some(msg);
            sh.waiters.clear();
            drop(sh);
            drop(waiters);
            stop.store(true, Ordering::Relaxed);
            return;
        }
        drop(sh);
        if aborted {
            continue;
        }
        let mut delivered = false;
        for w in waiters {
            delivered |= w.tx.send(result.clone()).is_ok();
        }
        if !delivered && !job.session_bound {
            let (vip, deliver_for) = (cfg.vip, cfg.deliver_for);
            let (op_id, op) = (job.op_id.clone(), job.op.clone());
            thread::spawn(move || deliver(vip, op_id, op, result, deliver_for));
        }
    }
}

fn execute(store: &mut VolumeStore, job: &Job, rate: Option<u64>) -> (OpResult, u64, bool) {
    let err = |e: VolumeError| OpResult::error(e.to_string());
    match &job.op {
        Op::Create { name, size } => match store.create(name, *size, Some(&job.op_id)) {
            Ok(v) => (
                OpResult::Created {
                    name: v.name,
                    size: v.size,
                },
                0,
                false,
            ),
            Err(e) => (err(e), 0, false),
        },
        Op::Delete { name } => match store.delete(name, Some(&job.op_id)) {
            Ok(v) => (OpResult::Deleted { name: v.name }, 0, false),
            Err(e) => (err(e), 0, false),
        },
        Op::Copy { src, dst } => {
            let abort = job.abort.clone();
            let start = Instant::now();
            match store.copy(src, dst, Some(&job.op_id), &mut |b| {
                if let Some(r) = rate.filter(|&r| r > 0) {
                    let due = Duration::from_secs_f64(b as f64 / r as f64);
                    let el = start.elapsed();
                    if due > el {
                        thread::sleep(due - el);
                    }
                }
                !abort.load(Ordering::Relaxed)
            }) {
                Ok((v, st)) => (
                    OpResult::Copied {
                        src: src.clone(),
                        dst: v.name,
                        bytes: st.bytes,
                    },
                    st.bytes,
                    false,
                ),
                Err((VolumeError::Stopped(_), bytes)) => {
                    (OpResult::error("abandoned"), bytes, true)
                }
                Err((e, bytes)) => (err(e), bytes, false),
            }
        }
    }
}

/// Offers a result to the VIP until someone there acknowledges it or time runs out.
fn deliver(vip: SocketAddr, op_id: String, op: Op, result: OpResult, deliver_for: Duration) {
    let deadline = Instant::now() + deliver_for;
    while Instant::now() < deadline {
        let attempt = || -> Result<(), WireError> {
            let s = TcpStream::connect_timeout(&vip, Duration::from_millis(200))?;
            s.set_read_timeout(Some(Duration::from_secs(2)))?;
            let mut c = Conn::new(s)?;
            c.send(&Msg::Deliver {
                op_id: op_id.clone(),
                op: op.clone(),
                result: result.clone(),
            })?;
            match c.recv()? {
                Msg::Ack { .. } => Ok(()),
                other => Err(WireError::Malformed(format!("expected ack, got {other:?}"))),
            }
        };
        if attempt().is_ok() {
            return;
        }
        thread::sleep(Duration::from_millis(10));
    }
}
