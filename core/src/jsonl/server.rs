//! The one server of the crate's socket ports, TCP or Unix: an accept loop (with backoff
//! when accepting fails for want of resources), a thread per connection, a registry of
//! the open connections, and a stop that closes the listening socket and every connection
//! and returns once all of them are closed.
//!
//! Two modes, one built on the other:
//! * connection mode ([`Server::serve`]): the handler gets each connection as a [`Conn`]
//!   (the stream, and whether the server is stopping) and runs its protocol on it: long
//!   conversations with keepalives, payload bytes after a header line, binary frames. A
//!   handler may hand the connection on to another thread (the connection stays
//!   registered until the [`Conn`] is dropped);
//! * request/response mode ([`converse`] on a connection, [`LineServer`] for a whole
//!   server): one JSON-line request, one JSON-line answer.
//!
//! Stopping shuts the reading side of every connection: a handler blocked reading sees
//! the end of the stream, one still working on a request finishes it and writes its answer
//! (within [`STOP_WRITE_TIMEOUT`]). A handler must therefore not block forever on anything
//! but its connection.

use std::collections::HashMap;
use std::io::{BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Serialize;

use super::{recv_limited, send, LineError, MAX_LINE};

/// How long a connection's last answer may take to write once the server stops.
pub const STOP_WRITE_TIMEOUT: Duration = Duration::from_secs(5);

/// Longest pause of the accept loop after an accept error (out of file descriptors, ...).
const MAX_ACCEPT_BACKOFF: Duration = Duration::from_secs(1);

/// A listening socket the server can run on.
pub trait Listener: AsFd + Send + 'static {
    /// The stream of an accepted connection.
    type Stream: Read + Write + AsFd + From<OwnedFd> + Send + 'static;
    /// The address the socket listens on.
    type Addr: Clone + std::fmt::Debug + Send + Sync + 'static;
    fn listening_on(&self) -> std::io::Result<Self::Addr>;
}

impl Listener for TcpListener {
    type Stream = TcpStream;
    type Addr = SocketAddr;
    fn listening_on(&self) -> std::io::Result<SocketAddr> {
        self.local_addr()
    }
}

impl Listener for UnixListener {
    type Stream = UnixStream;
    type Addr = std::os::unix::net::SocketAddr;
    fn listening_on(&self) -> std::io::Result<Self::Addr> {
        self.local_addr()
    }
}

/// What the accept loop, the connections and the server handle share.
struct Shared {
    stop: AtomicBool,
    /// A duplicate of each open connection's socket, to shut it down on stop.
    conns: Mutex<HashMap<u64, OwnedFd>>,
    /// Signalled whenever a connection leaves the registry.
    closed: Condvar,
}

impl Shared {
    fn conns(&self) -> MutexGuard<'_, HashMap<u64, OwnedFd>> {
        self.conns.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn stopping(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }
}

/// One accepted connection. It stays in the server's registry (and a stop waits for it)
/// until it is dropped.
pub struct Conn<S> {
    stream: S,
    id: u64,
    shared: Arc<Shared>,
}

impl<S> std::fmt::Debug for Conn<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conn").field("id", &self.id).finish()
    }
}

impl<S: AsFd + From<OwnedFd>> Conn<S> {
    pub fn stream(&self) -> &S {
        &self.stream
    }

    pub fn stream_mut(&mut self) -> &mut S {
        &mut self.stream
    }

    /// A second handle on the connection's socket (a reader beside a writer, say).
    pub fn try_clone(&self) -> std::io::Result<S> {
        Ok(S::from(self.stream.as_fd().try_clone_to_owned()?))
    }

    /// The server is stopping: read no further request.
    pub fn stopping(&self) -> bool {
        self.shared.stopping()
    }
}

/// The descriptor of a connection, for code that polls several.
impl<S: AsFd> AsFd for Conn<S> {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.stream.as_fd()
    }
}

impl<S> Drop for Conn<S> {
    fn drop(&mut self) {
        let mut conns = self.shared.conns();
        conns.remove(&self.id);
        self.shared.closed.notify_all();
    }
}

/// Shuts the reading side of every registered connection down (bounding the time their
/// last answers may take to write).
fn shut_connections(shared: &Shared) {
    for fd in shared.conns().values() {
        let _ = rustix::net::sockopt::set_socket_timeout(
            fd,
            rustix::net::sockopt::Timeout::Send,
            Some(STOP_WRITE_TIMEOUT),
        );
        let _ = rustix::net::shutdown(fd, rustix::net::Shutdown::Read);
    }
}

/// A running server. Dropping it stops it (see [`Server::stop`]), unless it was made to
/// [`keep_serving_when_dropped`](Server::keep_serving_when_dropped).
pub struct Server<L: Listener> {
    addr: L::Addr,
    name: String,
    shared: Arc<Shared>,
    /// A second handle on the listening socket, to wake the accept loop on stop.
    wake: OwnedFd,
    /// The accept loop; it returns the threads of the connections it started.
    acceptor: Option<JoinHandle<Vec<JoinHandle<()>>>>,
    stop_on_drop: bool,
}

/// The server of the JSON-line request/response ports over TCP (monitor, node agents).
pub type LineServer = Server<TcpListener>;

impl<L: Listener> std::fmt::Debug for Server<L> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("name", &self.name)
            .field("addr", &self.addr)
            .finish()
    }
}

impl<L: Listener> Server<L> {
    /// Serves `listener` in connection mode: every accepted connection goes to `handler`
    /// on a thread of its own. `name` names the threads and log lines.
    pub fn serve<H>(listener: L, name: &str, handler: H) -> std::io::Result<Server<L>>
    where
        H: Fn(Conn<L::Stream>) + Send + Sync + 'static,
    {
        let addr = listener.listening_on()?;
        // A listener handed over in non-blocking mode would make the loop spin.
        rustix::io::ioctl_fionbio(&listener, false)?;
        let wake = listener.as_fd().try_clone_to_owned()?;
        let shared = Arc::new(Shared {
            stop: AtomicBool::new(false),
            conns: Mutex::new(HashMap::new()),
            closed: Condvar::new(),
        });
        let sh = shared.clone();
        let n = name.to_string();
        let acceptor = std::thread::Builder::new()
            .name(format!("{name}-accept"))
            .spawn(move || accept_loop(&n, &sh, Listening(listener), handler))?;
        Ok(Server {
            addr,
            name: name.into(),
            shared,
            wake,
            acceptor: Some(acceptor),
            stop_on_drop: true,
        })
    }

    /// Dropping the handle will leave the server running for the rest of the process (for
    /// an owner that keeps only its address, as the binaries and tests do with the
    /// allocation ports); [`stop`](Self::stop) still stops it.
    pub fn keep_serving_when_dropped(mut self) -> Server<L> {
        self.stop_on_drop = false;
        self
    }

    pub fn addr(&self) -> L::Addr {
        self.addr.clone()
    }

    /// Open connections right now.
    pub fn connections(&self) -> usize {
        self.shared.conns().len()
    }

    /// Blocks until the accept loop ends (it ends only when the server is stopped or the
    /// listening socket fails), for a process whose only job is to serve; then stops.
    pub fn wait(mut self) {
        let handlers = self.acceptor.take().map(|t| t.join().unwrap_or_default());
        self.finish(handlers);
    }

    /// Stops serving: no new connections (the listening socket is closed when this
    /// returns), no further requests read from the open ones (a request being handled
    /// still gets its answer); returns once every connection is closed and its thread
    /// ended.
    pub fn stop(mut self) {
        let handlers = self.close_listener();
        finish(&self.shared, handlers);
    }

    /// [`stop`](Self::stop), except that the waiting for the open connections happens on
    /// a thread of its own: this returns once the listening socket is closed. For a
    /// caller that must not wait for a long request (a dispatcher giving up an address).
    pub fn stop_in_background(mut self) {
        let handlers = self.close_listener();
        let name = format!("{}-drain", self.name);
        let shared = self.shared.clone();
        let drain = move || finish(&shared, handlers);
        if let Err(e) = std::thread::Builder::new().name(name).spawn(drain) {
            eprintln!("{}: no thread to wait for the connections: {e}", self.name);
        }
    }

    /// Stops accepting and shuts the connections' reading sides; returns the connection
    /// threads once the accept loop ended (and the listening socket is closed).
    fn close_listener(&mut self) -> Option<Vec<JoinHandle<()>>> {
        let acceptor = self.acceptor.take()?;
        self.shared.stop.store(true, Ordering::SeqCst);
        // Linux: shutting a listening socket down makes a blocked accept fail (EINVAL),
        // TCP and Unix alike.
        let _ = rustix::net::shutdown(&self.wake, rustix::net::Shutdown::Read);
        shut_connections(&self.shared);
        Some(acceptor.join().unwrap_or_default())
    }

    fn finish(&mut self, handlers: Option<Vec<JoinHandle<()>>>) {
        self.shared.stop.store(true, Ordering::SeqCst);
        shut_connections(&self.shared);
        finish(&self.shared, handlers);
    }
}

/// Joins the connection threads, then waits until every connection (including those
/// handed on to other threads) is closed.
fn finish(shared: &Shared, handlers: Option<Vec<JoinHandle<()>>>) {
    for h in handlers.into_iter().flatten() {
        let _ = h.join();
    }
    let mut conns = shared.conns();
    while !conns.is_empty() {
        conns = shared.closed.wait(conns).unwrap_or_else(|p| p.into_inner());
    }
}

impl<L: Listener> Drop for Server<L> {
    fn drop(&mut self) {
        // Not after `stop`, `wait` or `stop_in_background`, which took the accept loop.
        if self.stop_on_drop && self.acceptor.is_some() {
            let handlers = self.close_listener();
            finish(&self.shared, handlers);
        }
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

/// The listening socket of the accept loop.
struct Listening<L>(L);

impl<L: AsFd> Listening<L> {
    /// The next connection (close-on-exec, blocking, like std's `accept`, whatever the
    /// socket family).
    fn accept(&self) -> std::io::Result<OwnedFd> {
        Ok(rustix::net::accept_with(
            &self.0,
            rustix::net::SocketFlags::CLOEXEC,
        )?)
    }
}

fn accept_loop<L, H>(
    name: &str,
    shared: &Arc<Shared>,
    listener: Listening<L>,
    handler: H,
) -> Vec<JoinHandle<()>>
where
    L: Listener,
    H: Fn(Conn<L::Stream>) + Send + Sync + 'static,
{
    let handler = Arc::new(handler);
    let mut handlers: Vec<JoinHandle<()>> = Vec::new();
    let mut next_id = 0u64;
    let mut backoff = Duration::ZERO;
    loop {
        let accepted = listener.accept();
        if shared.stopping() {
            break;
        }
        let fd = match accepted {
            Ok(fd) => fd,
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
        let id = next_id;
        next_id += 1;
        match fd.try_clone() {
            Ok(dup) => {
                shared.conns().insert(id, dup);
            }
            Err(e) => {
                eprintln!("{name}: dropping a connection: {e}");
                continue;
            }
        }
        // A stop between the check above and the registration would miss this
        // connection: look again now that it is registered.
        if shared.stopping() {
            let _ = rustix::net::shutdown(&fd, rustix::net::Shutdown::Read);
        }
        let conn = Conn {
            stream: L::Stream::from(fd),
            id,
            shared: shared.clone(),
        };
        let h = handler.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("{name}-conn"))
            .spawn(move || h(conn));
        match spawned {
            Ok(t) => handlers.push(t),
            // The connection went down with the closure: it is closed and unregistered.
            Err(e) => eprintln!("{name}: dropping a connection: no thread for it: {e}"),
        }
        handlers.retain(|h| !h.is_finished());
    }
    handlers
}

/// What a request/response handler does after a request.
#[derive(Debug)]
pub enum Answer<R> {
    /// Send this answer and read the next request.
    Reply(R),
    /// Send this answer and close the connection.
    ReplyAndClose(R),
    /// Close the connection without an answer.
    Close,
}

/// The request/response conversation of one connection: each request line (at most
/// `max_line` bytes) goes to `handle`, with the connection's reader for a payload that
/// follows the line; its answer is sent back as one line. A line that is not a request
/// reaches `handle` as the error ([`LineError::Malformed`] or [`LineError::TooLong`]); after
/// an over-long line the connection is closed once answered (the stream cannot be read
/// on). Returns at the end of the stream or when the connection fails.
pub fn converse<S, Req, Resp, H>(conn: &mut Conn<S>, max_line: usize, mut handle: H)
where
    S: Read + Write + AsFd + From<OwnedFd>,
    Req: DeserializeOwned,
    Resp: Serialize,
    H: FnMut(Result<Req, LineError>, &mut BufReader<S>) -> Answer<Resp>,
{
    let Ok(reader) = conn.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(reader);
    loop {
        let (answer, fatal) = match recv_limited::<Req>(&mut reader, max_line) {
            Ok(Some(req)) => (handle(Ok(req), &mut reader), false),
            Ok(None) | Err(LineError::Io(_) | LineError::Truncated) => return,
            Err(e) => {
                let fatal = matches!(e, LineError::TooLong(_));
                (handle(Err(e), &mut reader), fatal)
            }
        };
        let (resp, close) = match answer {
            Answer::Reply(r) => (r, fatal),
            Answer::ReplyAndClose(r) => (r, true),
            Answer::Close => return,
        };
        if send(conn.stream_mut(), &resp).is_err() || close {
            return;
        }
    }
}

impl Server<TcpListener> {
    /// Serves `listener` in request/response mode (TCP_NODELAY, lines up to
    /// [`MAX_LINE`]): every request line of every connection goes to `handler`, whose
    /// answer is sent back as one line. A line that is not a request reaches `handler` as
    /// the error; its answer is sent and the connection closed.
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
        Server::serve(listener, name, move |mut conn| {
            let _ = conn.stream().set_nodelay(true);
            converse(&mut conn, MAX_LINE, |req, _| match req {
                Ok(req) => Answer::Reply(handler(Ok(req))),
                Err(e) => Answer::ReplyAndClose(handler(Err(e))),
            });
        })
    }
}

#[cfg(test)]
mod tests {
    use super::super::recv;
    use super::super::tcp::connect_with_retry;
    use super::*;
    use std::time::Instant;

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

    #[test]
    fn a_unix_server_stops_with_a_connection_handed_to_another_thread() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        // Connections go to one worker thread, which echoes bytes until end of stream.
        let (tx, rx) = std::sync::mpsc::channel::<Conn<UnixStream>>();
        let tx = Mutex::new(tx);
        let worker = std::thread::spawn(move || {
            for mut c in rx {
                let mut b = [0u8; 1];
                while c.stream_mut().read_exact(&mut b).is_ok() {
                    c.stream_mut().write_all(&b).unwrap();
                }
            }
        });
        let s = Server::serve(UnixListener::bind(&path).unwrap(), "unix", move |c| {
            let _ = tx.lock().unwrap().send(c);
        })
        .unwrap();
        let mut c = UnixStream::connect(&path).unwrap();
        c.write_all(b"x").unwrap();
        let mut b = [0u8; 1];
        c.read_exact(&mut b).unwrap();
        assert_eq!(&b, b"x");
        assert_eq!(s.connections(), 1);
        // The stop ends the worker's read; the connection closes; the worker's channel
        // is gone with the server.
        s.stop();
        assert_eq!(c.read(&mut b).unwrap(), 0);
        worker.join().unwrap();
        assert!(UnixStream::connect(&path).is_err());
    }
}
