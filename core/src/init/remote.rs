//! Node agents as their own processes: a small TCP server in front of a [`NodeAgent`]
//! and the orchestrator's client for it (one JSON line per message).

use std::io::BufReader;
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::jsonl as wire;

use super::agent::{NodeAgent, NodeInfo, NodeInitRequest, NodeReport};
use super::error::{InitError, Result};
use super::orchestrate::Node;

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "req", rename_all = "snake_case")]
enum NodeRequest {
    Describe,
    Init(NodeInitRequest),
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "resp", rename_all = "snake_case")]
enum NodeResponse {
    Info(NodeInfo),
    Report(NodeReport),
    Error { message: String },
}

/// A running node agent server; dropping it stops it.
pub struct NodeServer {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<TcpStream>>>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for NodeServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeServer")
            .field("addr", &self.addr)
            .finish()
    }
}

impl NodeServer {
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
    /// Blocks until the server stops (for the `blocklab node serve` process).
    pub fn wait(mut self) {
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for NodeServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for c in self
            .conns
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain(..)
        {
            let _ = c.shutdown(Shutdown::Both);
        }
        let _ = TcpStream::connect(self.addr);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Serves `agent` on `listener` (a thread per connection).
pub fn serve_node(agent: NodeAgent, listener: TcpListener) -> std::io::Result<NodeServer> {
    let addr = listener.local_addr()?;
    let stop = Arc::new(AtomicBool::new(false));
    let conns = Arc::new(Mutex::new(Vec::new()));
    let agent = Arc::new(agent);
    let (st, cs) = (stop.clone(), conns.clone());
    let thread = std::thread::spawn(move || {
        let mut handlers: Vec<JoinHandle<()>> = Vec::new();
        for conn in listener.incoming() {
            if st.load(Ordering::SeqCst) {
                break;
            }
            let Ok(conn) = conn else { continue };
            if let Ok(c) = conn.try_clone() {
                cs.lock().unwrap_or_else(|p| p.into_inner()).push(c);
            }
            let agent = agent.clone();
            handlers.push(std::thread::spawn(move || serve_conn(&agent, conn)));
            handlers.retain(|h| !h.is_finished());
        }
        for h in handlers {
            let _ = h.join();
        }
    });
    Ok(NodeServer {
        addr,
        stop,
        conns,
        thread: Some(thread),
    })
}

fn serve_conn(agent: &NodeAgent, conn: TcpStream) {
    let Ok(mut w) = conn.try_clone() else { return };
    let mut r = BufReader::new(conn);
    while let Ok(Some(req)) = wire::recv::<NodeRequest>(&mut r) {
        let resp = match req {
            NodeRequest::Describe => NodeResponse::Info(agent.info()),
            NodeRequest::Init(req) => match agent.init(&req) {
                Ok(rep) => NodeResponse::Report(rep),
                Err(e) => NodeResponse::Error {
                    message: e.to_string(),
                },
            },
        };
        if wire::send(&mut w, &resp).is_err() {
            return;
        }
    }
}

/// The orchestrator's handle on a node agent in another process.
#[derive(Debug)]
pub struct RemoteNode {
    addr: String,
    name: String,
    connect_timeout: Duration,
}

impl RemoteNode {
    /// Connects once to learn the node's name.
    pub fn connect(addr: &str) -> Result<RemoteNode> {
        let mut n = RemoteNode {
            addr: addr.into(),
            name: String::new(),
            connect_timeout: Duration::from_secs(5),
        };
        n.name = n.describe()?.name;
        Ok(n)
    }

    fn call(&self, req: &NodeRequest) -> Result<NodeResponse> {
        let io = |what| {
            let addr = self.addr.clone();
            move |source| InitError::NodeIo { addr, what, source }
        };
        let sa = self
            .addr
            .to_socket_addrs()
            .map_err(io("resolve"))?
            .next()
            .ok_or_else(|| {
                io("resolve")(std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "address resolves to nothing",
                ))
            })?;
        let s = TcpStream::connect_timeout(&sa, self.connect_timeout).map_err(io("connect"))?;
        let mut w = s.try_clone().map_err(io("clone socket"))?;
        wire::send(&mut w, req).map_err(io("send"))?;
        let mut r = BufReader::new(s);
        match wire::recv::<NodeResponse>(&mut r).map_err(|e| io("receive")(e.into()))? {
            Some(NodeResponse::Error { message }) => Err(InitError::Node {
                node: if self.name.is_empty() {
                    self.addr.clone()
                } else {
                    self.name.clone()
                },
                message,
            }),
            Some(resp) => Ok(resp),
            None => Err(io("receive")(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "the node agent closed the connection",
            ))),
        }
    }
}

impl Node for RemoteNode {
    fn name(&self) -> &str {
        &self.name
    }
    fn describe(&self) -> Result<NodeInfo> {
        match self.call(&NodeRequest::Describe)? {
            NodeResponse::Info(i) => Ok(i),
            r => Err(InitError::Node {
                node: self.addr.clone(),
                message: format!("unexpected answer {r:?}"),
            }),
        }
    }
    fn init(&self, req: &NodeInitRequest) -> Result<NodeReport> {
        match self.call(&NodeRequest::Init(req.clone()))? {
            NodeResponse::Report(r) => Ok(r),
            r => Err(InitError::Node {
                node: self.name.clone(),
                message: format!("unexpected answer {r:?}"),
            }),
        }
    }
}
