//! The TCP side of a JSON-line request/response protocol: a server (accept loop, a thread
//! per connection, a registry of open connections so that stopping closes them) and a
//! client connect with a bounded retry. The monitor and the node agents use it; a
//! protocol only supplies its message types and a handler.

use std::collections::HashMap;
use std::io::BufReader;
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;
use serde::Serialize;

use super::{recv, send, LineError};

/// How long a connection's last answer may take to write once the server stops.
const STOP_WRITE_TIMEOUT: Duration = Duration::from_secs(5);

/// Longest pause of the accept loop after an accept error (out of file descriptors, ...).
const MAX_ACCEPT_BACKOFF: Duration = Duration::from_secs(1);

/// A connect that kept failing for the whole retry time.
#[derive(Debug, thiserror::Error)]
#[error("{addr} unreachable after {attempts} attempts over {waited:?}: {source}")]
pub struct Unreachable {
    pub addr: String,
    pub attempts: u32,
    pub waited: Duration,
    #[source]
    pub source: std::io::Error,
}

/// Connects to `addr` (TCP_NODELAY), retrying with backoff (20 ms doubling up to 500 ms)
/// for at most `retry_for`; at least one attempt is made.
pub fn connect_with_retry(addr: &str, retry_for: Duration) -> Result<TcpStream, Unreachable> {
    let start = Instant::now();
    let mut attempts = 0u32;
    let mut backoff = Duration::from_millis(20);
    loop {
        attempts += 1;
        let r = addr
            .to_socket_addrs()
            .and_then(|mut a| {
                a.next().ok_or_else(|| {
                    std::io::Error::new(std::io::ErrorKind::NotFound, "address resolves to nothing")
                })
            })
            .and_then(|sa| TcpStream::connect_timeout(&sa, Duration::from_secs(2)));
        match r {
            Ok(s) => {
                let _ = s.set_nodelay(true);
                return Ok(s);
            }
            Err(source) => {
                let waited = start.elapsed();
                if waited + backoff > retry_for {
                    return Err(Unreachable {
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

struct Registry {
    stop: AtomicBool,
    conns: Mutex<HashMap<u64, TcpStream>>,
}

impl Registry {
    fn conns(&self) -> MutexGuard<'_, HashMap<u64, TcpStream>> {
        self.conns.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A running JSON-line server. Dropping it stops it: no new connections, no further
/// requests read from the open ones (a request being handled still gets its answer),
/// every connection thread joined (so a handler must not block forever).
pub struct LineServer {
    addr: SocketAddr,
    name: String,
    registry: Arc<Registry>,
    /// A second handle on the listening socket, to wake the accept loop on stop.
    listener: TcpListener,
    acceptor: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for LineServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LineServer")
            .field("name", &self.name)
            .field("addr", &self.addr)
            .finish()
    }
}

impl LineServer {
    /// Serves `listener`: every request line of every connection goes to `handler`, whose
    /// answer is sent back as one line. A line that is not a request reaches `handler` as
    /// the error ([`LineError::Malformed`] or [`LineError::TooLong`]); its answer is sent
    /// and the connection closed. `name` names the threads and log lines.
    pub fn start<Req, Resp, H>(
        listener: TcpListener,
        name: &str,
        handler: H,
    ) -> std::io::Result<LineServer>
    where
        Req: DeserializeOwned,
        Resp: Serialize,
        H: Fn(Result<Req, LineError>) -> Resp + Send + Sync + 'static,
    {
        let addr = listener.local_addr()?;
        let wake = listener.try_clone()?;
        let registry = Arc::new(Registry {
            stop: AtomicBool::new(false),
            conns: Mutex::new(HashMap::new()),
        });
        let reg = registry.clone();
        let handler = Arc::new(handler);
        let n = name.to_string();
        let acceptor = std::thread::Builder::new()
            .name(format!("{name}-accept"))
            .spawn(move || accept_loop(&n, &reg, &listener, handler))?;
        Ok(LineServer {
            addr,
            name: name.into(),
            registry,
            listener: wake,
            acceptor: Some(acceptor),
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Open connections right now.
    pub fn connections(&self) -> usize {
        self.registry.conns().len()
    }

    /// Blocks until the accept loop ends (it ends only when the server is stopped or the
    /// listening socket fails), for a process whose only job is to serve.
    pub fn wait(mut self) {
        if let Some(t) = self.acceptor.take() {
            let _ = t.join();
        }
    }

    /// Stops serving (see the type's docs).
    pub fn stop(self) {}

    fn shutdown(&mut self) {
        if self.registry.stop.swap(true, Ordering::SeqCst) {
            return;
        }
        // Linux: shutting a listening socket down makes a blocked accept() fail (EINVAL).
        let _ = rustix::net::shutdown(&self.listener, rustix::net::Shutdown::Read);
        // Shut the reading side only: a handler still finishing a request writes its
        // answer (within a bounded time), then reads the end of the stream and returns.
        for c in self.registry.conns().values() {
            let _ = c.set_write_timeout(Some(STOP_WRITE_TIMEOUT));
            let _ = c.shutdown(Shutdown::Read);
        }
        if let Some(t) = self.acceptor.take() {
            let _ = t.join();
        }
    }
}

impl Drop for LineServer {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Is this accept error about the one connection (retry at once) rather than the server
/// (back off)?
fn per_connection(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::ECONNABORTED | libc::EINTR | libc::EPROTO | libc::EPERM)
    )
}

fn accept_loop<Req, Resp, H>(
    name: &str,
    reg: &Arc<Registry>,
    listener: &TcpListener,
    handler: Arc<H>,
) where
    Req: DeserializeOwned,
    Resp: Serialize,
    H: Fn(Result<Req, LineError>) -> Resp + Send + Sync + 'static,
{
    let mut handlers: Vec<JoinHandle<()>> = Vec::new();
    let mut next_id = 0u64;
    let mut backoff = Duration::ZERO;
    loop {
        let accepted = listener.accept();
        if reg.stop.load(Ordering::SeqCst) {
            break;
        }
        let conn = match accepted {
            Ok((c, _)) => c,
            Err(e) if per_connection(&e) => continue,
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                eprintln!("{name}: the listening socket failed ({e}); no longer accepting");
                break;
            }
            Err(e) => {
                // Out of file descriptors, memory or buffers: the error repeats until
                // connections close, so wait instead of spinning, and say so once.
                if backoff.is_zero() {
                    eprintln!("{name}: accept failed: {e}; retrying with backoff");
                }
                backoff = (backoff * 2).clamp(Duration::from_millis(10), MAX_ACCEPT_BACKOFF);
                std::thread::sleep(backoff);
                continue;
            }
        };
        backoff = Duration::ZERO;
        let _ = conn.set_nodelay(true);
        let id = next_id;
        next_id += 1;
        match conn.try_clone() {
            Ok(c) => {
                reg.conns().insert(id, c);
            }
            Err(e) => {
                eprintln!("{name}: dropping a connection: {e}");
                continue;
            }
        }
        // A stop between the check above and the registration would miss this
        // connection: look again now that it is registered.
        if reg.stop.load(Ordering::SeqCst) {
            let _ = conn.shutdown(Shutdown::Read);
        }
        let (r, h) = (reg.clone(), handler.clone());
        let spawned = std::thread::Builder::new()
            .name(format!("{name}-conn"))
            .spawn(move || {
                serve_conn(conn, &*h);
                r.conns().remove(&id);
            });
        match spawned {
            Ok(t) => handlers.push(t),
            Err(e) => {
                eprintln!("{name}: dropping a connection: no thread for it: {e}");
                if let Some(c) = reg.conns().remove(&id) {
                    let _ = c.shutdown(Shutdown::Both);
                }
            }
        }
        handlers.retain(|h| !h.is_finished());
    }
    for h in handlers {
        let _ = h.join();
    }
}

fn serve_conn<Req, Resp, H>(conn: TcpStream, handler: &H)
where
    Req: DeserializeOwned,
    Resp: Serialize,
    H: Fn(Result<Req, LineError>) -> Resp,
{
    let Ok(mut writer) = conn.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(conn);
    loop {
        let (resp, last) = match recv::<Req>(&mut reader) {
            Ok(Some(req)) => (handler(Ok(req)), false),
            Ok(None) | Err(LineError::Io(_) | LineError::Truncated) => return,
            Err(e) => (handler(Err(e)), true),
        };
        if send(&mut writer, &resp).is_err() || last {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn echo() -> LineServer {
        LineServer::start(
            TcpListener::bind("127.0.0.1:0").unwrap(),
            "echo",
            |r: Result<u32, LineError>| match r {
                Ok(n) => Ok(n + 1),
                Err(e) => Err(e.to_string()),
            },
        )
        .unwrap()
    }

    fn call(c: &mut TcpStream, line: &[u8]) -> Option<Result<u32, String>> {
        use std::io::Write;
        c.write_all(line).unwrap();
        recv(&mut BufReader::new(c.try_clone().unwrap())).unwrap()
    }

    #[test]
    fn answers_forgets_closed_connections_and_stops_with_clients_connected() {
        let s = echo();
        let addr = s.addr().to_string();
        let mut a = connect_with_retry(&addr, Duration::from_secs(5)).unwrap();
        assert_eq!(call(&mut a, b"41\n"), Some(Ok(42)));
        // A line that is not a request: an answer, then the connection is closed.
        let mut b = connect_with_retry(&addr, Duration::from_secs(5)).unwrap();
        let r = call(&mut b, b"{nope\n").unwrap();
        assert!(r.unwrap_err().contains("malformed"));
        assert!(recv::<u32>(&mut BufReader::new(b)).unwrap().is_none());
        // Closed connections leave the registry.
        for _ in 0..20 {
            let mut c = connect_with_retry(&addr, Duration::from_secs(5)).unwrap();
            assert_eq!(call(&mut c, b"1\n"), Some(Ok(2)));
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        while s.connections() != 1 {
            assert!(
                Instant::now() < deadline,
                "{} connections registered",
                s.connections()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        // Stopping closes the connection that is still open and returns.
        s.stop();
        assert!(recv::<u32>(&mut BufReader::new(a.try_clone().unwrap()))
            .unwrap()
            .is_none());
        let e = connect_with_retry(&addr, Duration::from_millis(50)).unwrap_err();
        assert!(e.to_string().contains("unreachable after"), "{e}");
        assert!(e.attempts >= 1);
    }
}
