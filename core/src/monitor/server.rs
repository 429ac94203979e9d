//! The monitor's TCP server: the shared JSON-line server ([`crate::jsonl::server`]) with a
//! thread per connection, and one proposer thread that batches staged changes into
//! proposals, makes each durable and only then answers the waiting clients.
//!
//! Every client whose change is staged gets an answer: its proposal's commit, or an error
//! when the commit fails or the monitor stops first. A failed commit stops the monitor
//! (it no longer knows what the store holds); [`Monitor::wait`] returns then.

use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Instant;

use uuid::Uuid;

use super::error::{MonitorError, Result};
use super::journal::MapStore;
use super::map::ClusterMap;
use super::proto::{Request, Response};
use super::state::{MonitorState, ProposeConfig};
use crate::jsonl::server::LineServer;

type Waiter = mpsc::Sender<Response>;

/// What a client whose change was staged hears when the monitor stops first.
const NOT_COMMITTED: &str = "the monitor stopped before the change was committed";

struct Inner {
    state: MonitorState<Waiter>,
    /// Why the proposer stopped by itself (a failed commit).
    failed: Option<String>,
    /// The proposer thread has ended.
    proposer_done: bool,
}

struct Shared {
    inner: Mutex<Inner>,
    /// Wakes the proposer (a change was staged, or stop).
    wake: Condvar,
    /// Wakes [`Monitor::wait`].
    done: Condvar,
    stop: AtomicBool,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Answers every client whose change is staged but not yet in a proposal.
fn abort_staged(g: &mut Inner, why: &str) {
    for w in g.state.abort() {
        let _ = w.send(Response::Error {
            message: why.to_string(),
        });
    }
}

/// A running monitor. Dropping it stops it (staged changes answered with an error,
/// connections closed, threads joined).
pub struct Monitor {
    addr: SocketAddr,
    shared: Arc<Shared>,
    server: Option<LineServer>,
    proposer: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Monitor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Monitor").field("addr", &self.addr).finish()
    }
}

impl Monitor {
    /// Loads the map from `store` (or creates a new cluster with `new_fsid`, or a random
    /// fsid) and serves on `listener`.
    pub fn start(
        listener: TcpListener,
        mut store: Box<dyn MapStore>,
        config: ProposeConfig,
        new_fsid: Option<Uuid>,
    ) -> Result<Monitor> {
        let map = match store.load()? {
            Some(m) => {
                if let Some(f) = new_fsid.filter(|f| *f != m.fsid) {
                    return Err(MonitorError::Conflict(format!(
                        "the journal holds cluster {}, not {f}",
                        m.fsid
                    )));
                }
                m
            }
            None => {
                let fsid = new_fsid.unwrap_or_else(Uuid::new_v4);
                store.create(fsid)?;
                ClusterMap::new(fsid)
            }
        };
        let io = |what| {
            move |source| MonitorError::Io {
                addr: "listener".into(),
                what,
                cause: source,
            }
        };
        let addr = listener.local_addr().map_err(io("local_addr"))?;
        let shared = Arc::new(Shared {
            inner: Mutex::new(Inner {
                state: MonitorState::new(map, config),
                failed: None,
                proposer_done: false,
            }),
            wake: Condvar::new(),
            done: Condvar::new(),
            stop: AtomicBool::new(false),
        });
        let s = shared.clone();
        let proposer = std::thread::Builder::new()
            .name("monitor-proposer".into())
            .spawn(move || {
                propose_loop(&s, store);
                s.lock().proposer_done = true;
                s.done.notify_all();
            })
            .map_err(io("spawn the proposer"))?;
        let s = shared.clone();
        let server = LineServer::start(listener, "monitor", move |req| match req {
            Ok(req) => handle(&s, req),
            Err(e) => Response::Error {
                message: format!("bad request: {e}"),
            },
        });
        let mut m = Monitor {
            addr,
            shared,
            server: None,
            proposer: Some(proposer),
        };
        // On error, dropping `m` stops the proposer.
        m.server = Some(server.map_err(io("start serving"))?);
        Ok(m)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The committed map.
    pub fn map(&self) -> ClusterMap {
        self.shared.lock().state.committed_map().clone()
    }

    /// Clients whose changes are staged, waiting for a proposal.
    pub fn waiting(&self) -> usize {
        self.shared.lock().state.waiting()
    }

    /// Blocks until the monitor stops by itself and says why: a commit failed (the store
    /// refused or lost the write, or another monitor wrote the map). The monitor answers
    /// every request with that error from then on; a process serving it should exit.
    pub fn wait(&self) -> MonitorError {
        let mut g = self.shared.lock();
        while g.failed.is_none() && !g.proposer_done {
            g = self.shared.done.wait(g).unwrap_or_else(|p| p.into_inner());
        }
        MonitorError::Stopped(
            g.failed
                .clone()
                .unwrap_or_else(|| "the proposer ended".into()),
        )
    }

    /// Stops serving and joins the threads.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        {
            let mut g = self.shared.lock();
            if self.shared.stop.swap(true, Ordering::SeqCst) {
                return;
            }
            // Requests staged from now on are refused (see `handle`); these are answered.
            abort_staged(&mut g, NOT_COMMITTED);
        }
        self.shared.wake.notify_all();
        // Closes the connections and joins their threads: none waits for an answer any
        // more, except for a proposal being committed, which the proposer answers.
        drop(self.server.take());
        if let Some(t) = self.proposer.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Monitor {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn handle(shared: &Shared, req: Request) -> Response {
    let (tx, rx) = mpsc::channel();
    {
        let mut g = shared.lock();
        if let Some(why) = &g.failed {
            return Response::Error {
                message: MonitorError::Stopped(why.clone()).to_string(),
            };
        }
        if shared.stop.load(Ordering::SeqCst) {
            return Response::Error {
                message: "the monitor is stopping".into(),
            };
        }
        match g.state.submit(req, tx, Instant::now()) {
            Ok(Some(r)) => return r,
            Ok(None) => shared.wake.notify_all(),
            Err(e) => {
                return Response::Error {
                    message: e.to_string(),
                }
            }
        }
    }
    // Every staged waiter is answered: by its proposal, or by `abort_staged` when the
    // monitor stops or a commit fails before.
    rx.recv().unwrap_or_else(|_| Response::Error {
        message: NOT_COMMITTED.into(),
    })
}

fn propose_loop(shared: &Shared, mut store: Box<dyn MapStore>) {
    let mut g = shared.lock();
    loop {
        if shared.stop.load(Ordering::SeqCst) {
            abort_staged(&mut g, NOT_COMMITTED);
            return;
        }
        let now = Instant::now();
        if let Some(p) = g.state.take_proposal(now) {
            drop(g);
            let r = store.commit(&p.next, &p.changes);
            g = shared.lock();
            match r {
                Ok(()) => {
                    g.state.committed(Instant::now());
                    for (w, resp) in p.replies {
                        let _ = w.send(resp);
                    }
                }
                Err(e) => {
                    let why = format!("commit failed: {e}");
                    for (w, _) in p.replies {
                        let _ = w.send(Response::Error {
                            message: why.clone(),
                        });
                    }
                    abort_staged(&mut g, &format!("{NOT_COMMITTED} ({why})"));
                    g.failed = Some(why);
                    shared.done.notify_all();
                    return;
                }
            }
            continue;
        }
        g = match g.state.deadline() {
            Some(d) => {
                shared
                    .wake
                    .wait_timeout(g, d.saturating_duration_since(now))
                    .unwrap_or_else(|p| p.into_inner())
                    .0
            }
            None => shared.wake.wait(g).unwrap_or_else(|p| p.into_inner()),
        };
    }
}
