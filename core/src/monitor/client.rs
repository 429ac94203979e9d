//! The monitor's client library: one TCP connection, one request at a time.

use std::io::BufReader;
use std::net::TcpStream;
use std::time::Duration;

use uuid::Uuid;

use super::error::{MonitorError, Result};
use super::map::ClusterMap;
use super::proto::{Outcome, Request, Response, Slot};
use crate::jsonl as wire;
use crate::jsonl::tcp::connect_with_retry;

/// How long [`MonitorClient::connect`] keeps retrying by default.
pub const DEFAULT_CONNECT_RETRY: Duration = Duration::from_secs(5);

/// A connection to the monitor.
#[derive(Debug)]
pub struct MonitorClient {
    addr: String,
    reader: BufReader<TcpStream>,
    writer: TcpStream,
}

impl MonitorClient {
    /// Connects to `addr`, retrying with backoff for at most `retry_for`; then fails with
    /// [`MonitorError::Unreachable`].
    pub fn connect(addr: &str, retry_for: Duration) -> Result<MonitorClient> {
        let s = connect_with_retry(addr, retry_for).map_err(|e| MonitorError::Unreachable {
            addr: e.addr,
            attempts: e.attempts,
            waited: e.waited,
            cause: e.cause,
        })?;
        let writer = s.try_clone().map_err(|source| MonitorError::Io {
            addr: addr.into(),
            what: "clone socket",
            cause: source,
        })?;
        Ok(MonitorClient {
            addr: addr.into(),
            reader: BufReader::new(s),
            writer,
        })
    }

    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// Sends a request and waits for its answer; a refusal becomes [`MonitorError::Remote`].
    pub fn call(&mut self, req: &Request) -> Result<Response> {
        let addr = self.addr.clone();
        let io = |what| {
            move |source| MonitorError::Io {
                addr,
                what,
                cause: source,
            }
        };
        wire::send(&mut self.writer, req).map_err(io("send"))?;
        let addr = self.addr.clone();
        match wire::recv::<Response>(&mut self.reader) {
            Ok(Some(Response::Error { message })) => Err(MonitorError::Remote(message)),
            Ok(Some(r)) => Ok(r),
            Ok(None) => Err(MonitorError::Io {
                addr,
                what: "receive",
                cause: std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "the monitor closed the connection",
                ),
            }),
            Err(source) => Err(MonitorError::Io {
                addr,
                what: "receive",
                cause: source.into(),
            }),
        }
    }

    fn unexpected(r: Response) -> MonitorError {
        MonitorError::Protocol(format!("unexpected answer {r:?}"))
    }

    /// The committed epoch.
    pub fn ping(&mut self) -> Result<u64> {
        match self.call(&Request::Ping)? {
            Response::Pong { epoch } => Ok(epoch),
            r => Err(Self::unexpected(r)),
        }
    }

    pub fn map(&mut self) -> Result<ClusterMap> {
        match self.call(&Request::GetMap)? {
            Response::Map { map } => Ok(map),
            r => Err(Self::unexpected(r)),
        }
    }

    /// Allocates one id per device of `node` in one request (the smallest free ids, or
    /// the ids of those devices' daemons that are in the map and not up). The host is not
    /// given: see [`Slot::host`].
    pub fn alloc(&mut self, node: &str, devices: &[String]) -> Result<Vec<u32>> {
        let slots: Vec<Slot> = devices
            .iter()
            .map(|d| Slot {
                node: node.into(),
                device: d.clone(),
                host: String::new(),
            })
            .collect();
        self.alloc_batch(&slots)
    }

    /// Allocates one id per slot, of any nodes, in one request.
    pub fn alloc_batch(&mut self, slots: &[Slot]) -> Result<Vec<u32>> {
        match self.call(&Request::Alloc {
            slots: slots.to_vec(),
        })? {
            Response::Ids { ids, .. } if ids.len() == slots.len() => Ok(ids),
            r => Err(Self::unexpected(r)),
        }
    }

    fn committed(&mut self, req: Request) -> Result<u64> {
        match self.call(&req)? {
            Response::Committed { epoch } => Ok(epoch),
            r => Err(Self::unexpected(r)),
        }
    }

    pub fn register(&mut self, id: u32, uuid: Uuid, key: &str) -> Result<u64> {
        self.committed(Request::Register {
            id,
            uuid,
            key: key.into(),
        })
    }

    pub fn report(&mut self, id: u32, outcome: Outcome) -> Result<u64> {
        self.committed(Request::Report { id, outcome })
    }

    pub fn remove(&mut self, id: u32) -> Result<u64> {
        self.committed(Request::Remove { id })
    }
}
