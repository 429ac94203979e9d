//! The block service ("the cluster" the management nodes act on): owns the volume store and
//! the operation journal, runs each operation id at most once on one executor thread,
//! answers on the submitting connection, and — when no submitter is left to answer —
//! delivers the result to the VIP, wherever it now is.
//!
//! Fencing: a submission carries its holder's epoch; one older than the highest epoch the
//! journal has seen is refused (`Fenced`) without running anything.

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use super::coord_journal::CoordJournal;
use super::dispatcher::Epoch;
use super::journal::{FileJournal, JournalError, OpJournal, OpState, Record};
use super::wire::{Conn, Msg, Op, OpResult, VolumeInfo, WireError};
use crate::volume::{StoreConfig, VolumeError, VolumeStore};

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
    #[error("listening on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

struct Job {
    op_id: String,
    op: Op,
    abort: Arc<AtomicBool>,
    session_bound: bool,
}

/// When each node last pinged.
type Pings = Arc<Mutex<HashMap<u32, Instant>>>;

struct Shared {
    journal: Box<dyn OpJournal>,
    waiters: HashMap<String, Vec<Sender<OpResult>>>,
    aborts: HashMap<String, Arc<AtomicBool>>,
}

/// A running block service (threads stop when `stop` is set).
pub struct Service {
    pub addr: SocketAddr,
    stop: Arc<AtomicBool>,
    threads: Vec<thread::JoinHandle<()>>,
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
        // Executions cut short by a restart of the service: abandoned (their effects were
        // never committed to the catalog); a resubmission of the id runs them again.
        for op_id in journal.running() {
            journal.append(Record::Aborted { op_id, bytes: 0 })?;
        }
        let listener = TcpListener::bind(cfg.listen).map_err(|source| ServiceError::Listen {
            addr: cfg.listen,
            source,
        })?;
        let addr = listener
            .local_addr()
            .map_err(|source| ServiceError::Listen {
                addr: cfg.listen,
                source,
            })?;
        listener
            .set_nonblocking(true)
            .map_err(|source| ServiceError::Listen { addr, source })?;
        let shared = Arc::new(Mutex::new(Shared {
            journal,
            waiters: HashMap::new(),
            aborts: HashMap::new(),
        }));
        let stop = Arc::new(AtomicBool::new(false));
        let pings: Pings = Arc::new(Mutex::new(HashMap::new()));
        let (jobs_tx, jobs_rx) = mpsc::channel::<Job>();
        let (list_tx, list_rx) = mpsc::channel::<Sender<Vec<VolumeInfo>>>();
        let mut threads = Vec::new();
        {
            let shared = shared.clone();
            let stop = stop.clone();
            let cfg = cfg.clone();
            threads.push(thread::spawn(move || {
                executor(store, jobs_rx, list_rx, shared, stop, cfg)
            }));
        }
        {
            let stop = stop.clone();
            threads.push(thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((s, _)) => {
                            let _ = s.set_nonblocking(false);
                            let shared = shared.clone();
                            let jobs = jobs_tx.clone();
                            let lists = list_tx.clone();
                            let st = cfg.session_timeout;
                            let pings = pings.clone();
                            thread::spawn(move || {
                                let _ = handle(s, shared, jobs, lists, pings, st);
                            });
                        }
                        Err(_) => thread::sleep(Duration::from_millis(5)),
                    }
                }
            }));
        }
        Ok(Service {
            addr,
            stop,
            threads,
        })
    }

    /// Stops accepting and joins the service threads.
    pub fn stop(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }

    /// Runs until `stop` is set from outside (for the `blocklab mgmt block-service` binary).
    pub fn wait(self, stop: &AtomicBool) {
        while !stop.load(Ordering::Relaxed) {
            thread::sleep(Duration::from_millis(50));
        }
        self.stop();
    }
}

fn refuse(msg: String) -> OpResult {
    OpResult::Error { message: msg }
}

fn handle(
    stream: TcpStream,
    shared: Arc<Mutex<Shared>>,
    jobs: Sender<Job>,
    lists: Sender<Sender<Vec<VolumeInfo>>>,
    pings: Pings,
    session_timeout: Duration,
) -> Result<(), WireError> {
    let mut conn = Conn::new(stream)?;
    loop {
        let m = match conn.recv() {
            Ok(m) => m,
            Err(WireError::Malformed(e)) => {
                conn.send(&Msg::Reply {
                    op_id: String::new(),
                    result: refuse(format!("malformed request: {e}")),
                })?;
                return Ok(());
            }
            Err(e) => return Err(e),
        };
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
                let mut sh = shared.lock().unwrap_or_else(|p| p.into_inner());
                if epoch > sh.journal.max_epoch() {
                    if let Err(e) = sh.journal.append(Record::Epoch { epoch }) {
                        drop(sh);
                        conn.send(&Msg::Reply {
                            op_id: String::new(),
                            result: refuse(e.to_string()),
                        })?;
                        continue;
                    }
                }
                let current = sh.journal.max_epoch();
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
                if op == Op::List {
                    let (tx, rx) = mpsc::channel();
                    let _ = lists.send(tx);
                    let volumes = rx.recv().unwrap_or_default();
                    conn.send(&Msg::Reply {
                        op_id,
                        result: OpResult::Listed { volumes },
                    })?;
                    continue;
                }
                let rx = match admit(&shared, &jobs, &op_id, op, epoch, node, session_bound, tag) {
                    Admit::Answer(m) => {
                        conn.send(&m)?;
                        continue;
                    }
                    Admit::Wait(rx) => rx,
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
                match wait_result(&conn, &rx, &alive) {
                    Some(result) => conn.send(&Msg::Reply { op_id, result })?,
                    None => {
                        // The submitter went away.
                        if session_bound {
                            let sh = shared.lock().unwrap_or_else(|p| p.into_inner());
                            if let Some(a) = sh.aborts.get(&op_id) {
                                a.store(true, Ordering::Relaxed);
                            }
                        }
                        return Ok(());
                    }
                }
            }
            Msg::Request { op_id, .. } => {
                conn.send(&Msg::Reply {
                    op_id,
                    result: refuse("this is the block service; send requests to the VIP".into()),
                })?;
            }
            other => {
                conn.send(&Msg::Reply {
                    op_id: String::new(),
                    result: refuse(format!("unexpected message {other:?}")),
                })?;
            }
        }
    }
}

enum Admit {
    Answer(Msg),
    Wait(Receiver<OpResult>),
}

#[allow(clippy::too_many_arguments)]
fn admit(
    shared: &Mutex<Shared>,
    jobs: &Sender<Job>,
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
        return reply(refuse("operation id must be 1-128 characters".into()));
    }
    let mut sh = shared.lock().unwrap_or_else(|p| p.into_inner());
    let current = sh.journal.max_epoch();
    if epoch < current {
        return Admit::Answer(Msg::Fenced {
            op_id: op_id.to_string(),
            current,
        });
    }
    match sh.journal.state(op_id).cloned() {
        Some(s) if *s.op() != op => {
            return reply(refuse(format!(
                "operation id {op_id:?} was already used with different arguments ({:?})",
                s.op()
            )))
        }
        Some(OpState::Done { result, .. }) => return reply(result),
        Some(OpState::Running { .. }) => {
            let (tx, rx) = mpsc::channel();
            sh.waiters.entry(op_id.to_string()).or_default().push(tx);
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
        return reply(refuse(e.to_string()));
    }
    let (tx, rx) = mpsc::channel();
    sh.waiters.insert(op_id.to_string(), vec![tx]);
    let abort = Arc::new(AtomicBool::new(false));
    sh.aborts.insert(op_id.to_string(), abort.clone());
    drop(sh);
    let _ = jobs.send(Job {
        op_id: op_id.to_string(),
        op,
        abort,
        session_bound,
    });
    Admit::Wait(rx)
}

/// Waits for the result while watching the connection (and, through `alive`, the
/// submitting node's pings); `None` if either is gone first.
fn wait_result(conn: &Conn, rx: &Receiver<OpResult>, alive: &dyn Fn() -> bool) -> Option<OpResult> {
    let _ = conn.stream.set_nonblocking(true);
    let out = loop {
        match rx.recv_timeout(Duration::from_millis(10)) {
            Ok(r) => break Some(r),
            Err(RecvTimeoutError::Disconnected) => break None,
            Err(RecvTimeoutError::Timeout) => {
                if !alive() {
                    break None;
                }
                let mut b = [0u8; 1];
                match conn.stream.peek(&mut b) {
                    Ok(0) => break None,
                    Ok(_) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(_) => break None,
                }
            }
        }
    };
    let _ = conn.stream.set_nonblocking(false);
    out
}

fn executor(
    mut store: VolumeStore,
    jobs: Receiver<Job>,
    lists: Receiver<Sender<Vec<VolumeInfo>>>,
    shared: Arc<Mutex<Shared>>,
    stop: Arc<AtomicBool>,
    cfg: ServiceConfig,
) {
    while !stop.load(Ordering::Relaxed) {
        while let Ok(tx) = lists.try_recv() {
            let _ = tx.send(
                store
                    .list()
                    .into_iter()
                    .map(|v| VolumeInfo {
                        name: v.name,
                        size: v.size,
                    })
                    .collect(),
            );
        }
        let job = match jobs.recv_timeout(Duration::from_millis(5)) {
            Ok(j) => j,
            Err(_) => continue,
        };
        let (result, bytes, aborted) = execute(&mut store, &job, cfg.copy_rate);
        let mut sh = shared.lock().unwrap_or_else(|p| p.into_inner());
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
        if sh.journal.append(rec).is_err() {
            // Without a durable record the result must not be handed out.
            continue;
        }
        drop(sh);
        if aborted {
            continue;
        }
        let mut delivered = false;
        for w in waiters {
            delivered |= w.send(result.clone()).is_ok();
        }
        if !delivered && !job.session_bound {
            let vip = cfg.vip;
            let deliver_for = cfg.deliver_for;
            let op_id = job.op_id.clone();
            thread::spawn(move || deliver(vip, op_id, result, deliver_for));
        }
    }
}

fn execute(store: &mut VolumeStore, job: &Job, rate: Option<u64>) -> (OpResult, u64, bool) {
    let err = |e: VolumeError| OpResult::Error {
        message: e.to_string(),
    };
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
        Op::Delete { name } => match store.delete(name) {
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
                Err((VolumeError::Stopped(_), bytes)) => (
                    OpResult::Error {
                        message: "abandoned".into(),
                    },
                    bytes,
                    true,
                ),
                Err((e, bytes)) => (err(e), bytes, false),
            }
        }
        Op::List => (OpResult::Listed { volumes: vec![] }, 0, false),
    }
}

/// Offers a result to the VIP until someone there acknowledges it or time runs out.
fn deliver(vip: SocketAddr, op_id: String, result: OpResult, deliver_for: Duration) {
    let deadline = Instant::now() + deliver_for;
    while Instant::now() < deadline {
        let attempt = || -> Result<(), WireError> {
            let s = TcpStream::connect_timeout(&vip, Duration::from_millis(200))?;
            s.set_read_timeout(Some(Duration::from_secs(2)))?;
            let mut c = Conn::new(s)?;
            c.send(&Msg::Deliver {
                op_id: op_id.clone(),
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
