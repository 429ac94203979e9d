//! The monitor's TCP server: a thread per connection, one proposer thread that batches
//! staged changes into proposals, journals each (fdatasync) and only then answers the
//! waiting clients.

use std::io::BufReader;
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
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
use crate::jsonl as wire;

type Waiter = mpsc::Sender<Response>;

struct Inner {
    state: MonitorState<Waiter>,
    stopped: Option<String>,
    conns: Vec<TcpStream>,
}

struct Shared {
    inner: Mutex<Inner>,
    wake: Condvar,
    stop: AtomicBool,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A running monitor. Dropping it stops it (threads joined, connections closed).
pub struct Monitor {
    addr: SocketAddr,
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
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
        let addr = listener.local_addr().map_err(|source| MonitorError::Io {
            addr: "listener".into(),
            what: "local_addr",
            source,
        })?;
        let shared = Arc::new(Shared {
            inner: Mutex::new(Inner {
                state: MonitorState::new(map, config),
                stopped: None,
                conns: Vec::new(),
            }),
            wake: Condvar::new(),
            stop: AtomicBool::new(false),
        });
        let s = shared.clone();
        let proposer = std::thread::Builder::new()
            .name("monitor-proposer".into())
            .spawn(move || propose_loop(&s, store))
            .expect("spawn proposer");
        let s = shared.clone();
        let acceptor = std::thread::Builder::new()
            .name("monitor-accept".into())
            .spawn(move || accept_loop(&s, listener))
            .expect("spawn acceptor");
        Ok(Monitor {
            addr,
            shared,
            threads: vec![proposer, acceptor],
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The committed map.
    pub fn map(&self) -> ClusterMap {
        self.shared.lock().state.committed_map().clone()
    }

    /// Stops serving and joins the threads.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        if self.shared.stop.swap(true, Ordering::SeqCst) {
            return;
        }
        {
            let mut g = self.shared.lock();
            for c in g.conns.drain(..) {
                let _ = c.shutdown(Shutdown::Both);
            }
        }
        self.shared.wake.notify_all();
        // Wake the acceptor.
        let _ = TcpStream::connect(self.addr);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for Monitor {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn accept_loop(shared: &Arc<Shared>, listener: TcpListener) {
    let mut handlers = Vec::new();
    for conn in listener.incoming() {
        if shared.stop.load(Ordering::SeqCst) {
            break;
        }
        let Ok(conn) = conn else { continue };
        let _ = conn.set_nodelay(true);
        if let Ok(c) = conn.try_clone() {
            shared.lock().conns.push(c);
        }
        let s = shared.clone();
        handlers.push(std::thread::spawn(move || serve_conn(&s, conn)));
        handlers.retain(|h: &JoinHandle<()>| !h.is_finished());
    }
    for h in handlers {
        let _ = h.join();
    }
}

fn serve_conn(shared: &Shared, conn: TcpStream) {
    let Ok(mut writer) = conn.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(conn);
    loop {
        let req: Request = match wire::recv(&mut reader) {
            Ok(Some(r)) => r,
            Ok(None) => return,
            Err(e) => {
                let _ = wire::send(
                    &mut writer,
                    &Response::Error {
                        message: format!("bad request: {e}"),
                    },
                );
                return;
            }
        };
        let resp = handle(shared, req);
        if wire::send(&mut writer, &resp).is_err() {
            return;
        }
    }
}

fn handle(shared: &Shared, req: Request) -> Response {
    let (tx, rx) = mpsc::channel();
    {
        let mut g = shared.lock();
        if let Some(why) = &g.stopped {
            return Response::Error {
                message: MonitorError::Stopped(why.clone()).to_string(),
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
    rx.recv().unwrap_or_else(|_| Response::Error {
        message: "the monitor stopped before the change was committed".into(),
    })
}

fn propose_loop(shared: &Shared, mut store: Box<dyn MapStore>) {
    let mut g = shared.lock();
    loop {
        if shared.stop.load(Ordering::SeqCst) {
            return;
        }
        let now = Instant::now();
        if let Some(p) = g.state.take_proposal(now) {
            drop(g);
            let r = store.commit(p.epoch, &p.changes);
            g = shared.lock();
            match r {
                Ok(()) => {
                    g.state.committed(Instant::now());
                    for (w, resp) in p.replies {
                        let _ = w.send(resp);
                    }
                }
                Err(e) => {
                    let why = e.to_string();
                    for (w, _) in p.replies {
                        let _ = w.send(Response::Error {
                            message: format!("commit failed: {why}"),
                        });
                    }
                    g.stopped = Some(why);
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
