//! The monitor's client library: one TCP connection, one request at a time.

use std::io::BufReader;
use std::net::{TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use uuid::Uuid;

use super::error::{MonitorError, Result};
use super::map::ClusterMap;
use super::proto::{Outcome, Request, Response, Slot};
use crate::jsonl as wire;

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
        let start = Instant::now();
        let mut attempts = 0u32;
        let mut backoff = Duration::from_millis(20);
        loop {
            attempts += 1;
            let r = addr
                .to_socket_addrs()
                .and_then(|mut a| {
                    a.next().ok_or_else(|| {
                        std::io::Error::new(
                            std::io::ErrorKind::NotFound,
                            "address resolves to nothing",
                        )
                    })
                })
                .and_then(|sa| TcpStream::connect_timeout(&sa, Duration::from_secs(2)));
            match r {
                Ok(s) => {
                    let _ = s.set_nodelay(true);
                    let writer = s.try_clone().map_err(|source| MonitorError::Io {
                        addr: addr.into(),
                        what: "clone socket",
                        source,
                    })?;
                    return Ok(MonitorClient {
                        addr: addr.into(),
                        reader: BufReader::new(s),
                        writer,
                    });
                }
                Err(source) => {
                    let waited = start.elapsed();
                    if waited + backoff > retry_for {
                        return Err(MonitorError::Unreachable {
                            addr: addr.into(),
                            attempts,
                            waited,
                            source,
                        });
                    }
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(Duration::from_millis(500));
                }
            }
        }
    }

    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// Sends a request and waits for its answer; a refusal becomes [`MonitorError::Remote`].
    pub fn call(&mut self, req: &Request) -> Result<Response> {
        let addr = self.addr.clone();
        let io = |what| move |source| MonitorError::Io { addr, what, source };
        wire::send(&mut self.writer, req).map_err(io("send"))?;
        let addr = self.addr.clone();
        match wire::recv::<Response>(&mut self.reader) {
            Ok(Some(Response::Error { message })) => Err(MonitorError::Remote(message)),
            Ok(Some(r)) => Ok(r),
            Ok(None) => Err(MonitorError::Io {
                addr,
                what: "receive",
                source: std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "the monitor closed the connection",
                ),
            }),
            Err(source) => Err(MonitorError::Io {
                addr,
                what: "receive",
                source: source.into(),
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

    /// Allocates one id per device of `node` in one request (the smallest free ids).
    pub fn alloc(&mut self, node: &str, devices: &[String]) -> Result<Vec<u32>> {
        let slots: Vec<Slot> = devices
            .iter()
            .map(|d| Slot {
                node: node.into(),
                device: d.clone(),
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
