//! Node agents as their own processes: a [`NodeAgent`] behind the shared JSON-line TCP
//! server ([`crate::jsonl::server`]) and the orchestrator's client for it.

use std::io::BufReader;
use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::jsonl as wire;
use crate::jsonl::server::LineServer;
use crate::jsonl::tcp::connect_with_retry;

use super::agent::{NodeInfo, NodeInitRequest, NodeReport};
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

/// A running node agent server; dropping it stops it (after the requests in progress).
#[derive(Debug)]
pub struct NodeServer {
    server: LineServer,
}

impl NodeServer {
    pub fn addr(&self) -> SocketAddr {
        self.server.addr()
    }
    /// Blocks while the server runs (for the `blocklab node serve` process).
    pub fn wait(self) {
        self.server.wait();
    }
}

/// Serves `agent` (a [`NodeAgent`](super::NodeAgent) or a
/// [`CephNodeAgent`](super::CephNodeAgent)) on `listener` (a thread per connection).
pub fn serve_node(
    agent: impl Node + Send + 'static,
    listener: TcpListener,
) -> std::io::Result<NodeServer> {
    let agent = Arc::new(agent);
    let server = LineServer::start(listener, "node", move |req| match req {
        Ok(NodeRequest::Describe) => match agent.describe() {
            Ok(i) => NodeResponse::Info(i),
            Err(e) => NodeResponse::Error {
                message: e.to_string(),
            },
        },
        Ok(NodeRequest::Init(req)) => match agent.init(&req) {
            Ok(rep) => NodeResponse::Report(rep),
            Err(e) => NodeResponse::Error {
                message: e.to_string(),
            },
        },
        Err(e) => NodeResponse::Error {
            message: format!("bad request: {e}"),
        },
    })?;
    Ok(NodeServer { server })
}

/// The orchestrator's handle on a node agent in another process: one connection per
/// request, with a bounded connect retry.
#[derive(Debug)]
pub struct RemoteNode {
    addr: String,
    connect_retry: Duration,
    init_timeout: Duration,
}

/// How long the orchestrator waits for a node's answer to `describe`.
const DESCRIBE_TIMEOUT: Duration = Duration::from_secs(10);

/// How long it waits for a node's answer to `init`, by default: a node that deploys its
/// daemons one by one may take minutes, one that hangs must not hang the orchestrator.
pub const DEFAULT_INIT_TIMEOUT: Duration = Duration::from_secs(900);

impl RemoteNode {
    /// The node agent at `addr` (nothing is sent before the first request).
    pub fn new(addr: &str) -> RemoteNode {
        RemoteNode {
            addr: addr.into(),
            connect_retry: crate::monitor::DEFAULT_CONNECT_RETRY,
            init_timeout: DEFAULT_INIT_TIMEOUT,
        }
    }

    /// How long to wait for the node's answer to `init`.
    pub fn with_init_timeout(mut self, d: Duration) -> RemoteNode {
        self.init_timeout = d;
        self
    }

    /// How long to keep retrying an unreachable node agent.
    pub fn with_connect_retry(mut self, d: Duration) -> RemoteNode {
        self.connect_retry = d;
        self
    }

    fn call(&self, req: &NodeRequest, timeout: Duration) -> Result<NodeResponse> {
        let io = |what| {
            let addr = self.addr.clone();
            move |source| InitError::NodeIo {
                addr,
                what,
                cause: source,
            }
        };
        let s = connect_with_retry(&self.addr, self.connect_retry)?;
        // Every call has a deadline: a node that never answers is a failed node.
        s.set_read_timeout(Some(timeout))
            .map_err(io("set the read timeout"))?;
        let mut w = s.try_clone().map_err(io("clone socket"))?;
        wire::send(&mut w, req).map_err(io("send"))?;
        match wire::recv::<NodeResponse>(&mut BufReader::new(s))
            .map_err(|e| io("receive")(e.into()))?
        {
            Some(NodeResponse::Error { message }) => Err(InitError::Node {
                node: self.addr.clone(),
                message,
            }),
            Some(resp) => Ok(resp),
            None => Err(io("receive")(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "the node agent closed the connection",
            ))),
        }
    }

    fn unexpected(&self, r: NodeResponse) -> InitError {
        InitError::Node {
            node: self.addr.clone(),
            message: format!("unexpected answer {r:?}"),
        }
    }
}

impl Node for RemoteNode {
    fn describe(&self) -> Result<NodeInfo> {
        match self.call(&NodeRequest::Describe, DESCRIBE_TIMEOUT)? {
            NodeResponse::Info(i) => Ok(i),
            r => Err(self.unexpected(r)),
        }
    }
    fn init(&self, req: &NodeInitRequest) -> Result<NodeReport> {
        match self.call(&NodeRequest::Init(req.clone()), self.init_timeout)? {
            NodeResponse::Report(r) => Ok(r),
            r => Err(self.unexpected(r)),
        }
    }
}
