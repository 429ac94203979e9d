//! A replica's connections, outside its loop: what the connection threads send the loop
//! ([`Event`]), the inbound connections accepted on the shared server
//! ([`crate::jsonl::server`], connection mode), the primary's connections to its
//! secondaries (handshake, reconnect with exponential backoff), each connection read on a
//! thread of its own, and the [`Stopper`] those threads wait on.

use std::collections::HashMap;
use std::io::Write;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::jsonl::server::Server;

use super::apply::Applied;
use super::protocol::NodeId;
use super::transport::{read_frames, Link};
use super::wire::{self, Frame, WireError, WIRE_VERSION};

/// What the replica loop receives.
pub(super) enum Event {
    Conn {
        conn: u64,
        link: Link,
        stream: TcpStream,
        /// Outgoing replica connections: the peer, whose handshake is done.
        peer: Option<NodeId>,
    },
    Frame {
        conn: u64,
        frame: Frame,
    },
    Closed {
        conn: u64,
    },
    /// The apply worker applied a batch (`None`: an error stopped it).
    Applied(Option<Applied>),
}

static NEXT_CONN: AtomicU64 = AtomicU64::new(1);

/// Shortest and longest wait before the primary connects to a secondary again.
const MIN_BACKOFF: Duration = Duration::from_millis(20);
const MAX_BACKOFF: Duration = Duration::from_secs(2);
/// A connection that lasted this long resets the backoff.
const STABLE: Duration = Duration::from_secs(1);
/// How long the primary waits for a secondary's `Hello`.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(2);

/// Exponential backoff: twice the last wait, at most [`MAX_BACKOFF`].
fn next_backoff(last: Duration) -> Duration {
    (last * 2).clamp(MIN_BACKOFF, MAX_BACKOFF)
}

/// The stop flag, and a way to wake the threads that sleep on it.
pub(super) struct Stopper {
    flag: Arc<AtomicBool>,
    lock: Mutex<()>,
    cv: Condvar,
}

impl Stopper {
    pub(super) fn new(flag: Arc<AtomicBool>) -> Stopper {
        Stopper {
            flag,
            lock: Mutex::new(()),
            cv: Condvar::new(),
        }
    }
    pub(super) fn stopped(&self) -> bool {
        self.flag.load(Ordering::SeqCst)
    }
    pub(super) fn stop(&self) {
        self.flag.store(true, Ordering::SeqCst);
        let _g = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        self.cv.notify_all();
    }
    /// Sleeps `d`, or less when stopped.
    fn sleep(&self, d: Duration) {
        let g = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        let _ = self.cv.wait_timeout_while(g, d, |_| !self.stopped());
    }
}

/// Every connection's stream, so that stopping can end its reader.
pub(super) type Streams = Arc<Mutex<HashMap<u64, TcpStream>>>;

/// Accepts connections on the shared server; each one's frames are read on its thread.
pub(super) fn accept(
    listener: TcpListener,
    tx: &mpsc::Sender<Event>,
    streams: &Streams,
    stopper: &Arc<Stopper>,
) -> std::io::Result<Server<TcpListener>> {
    let (tx, stopper, streams) = (tx.clone(), stopper.clone(), streams.clone());
    Server::serve(listener, "repl", move |accepted| {
        let Ok(s) = accepted.try_clone() else {
            return;
        };
        if let Some(conn) = register_conn(&s, None, &tx, &streams, &stopper) {
            read_conn(&s, conn, &tx, &streams);
        }
    })
}

/// The primary `me` connects to every secondary in `peers`, again whenever a connection
/// breaks: one thread each, returned.
pub(super) fn connect_all(
    me: NodeId,
    peers: &[(NodeId, SocketAddr)],
    tx: &mpsc::Sender<Event>,
    streams: &Streams,
    stopper: &Arc<Stopper>,
) -> Vec<JoinHandle<()>> {
    let mut threads = Vec::new();
    for &(peer, addr) in peers {
        let (tx, stopper, streams) = (tx.clone(), stopper.clone(), streams.clone());
        threads.push(std::thread::spawn(move || {
            connect_loop(me, peer, addr, &tx, &streams, &stopper)
        }));
    }
    threads
}

/// Why a connection to a secondary was not made.
#[derive(Debug, thiserror::Error)]
enum ConnectError {
    #[error("unreachable: {0}")]
    Unreachable(std::io::Error),
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Wire(#[from] WireError),
    #[error("speaks wire version {got}, this replica speaks version {WIRE_VERSION}")]
    Version { got: u8 },
    #[error("answers as replica {got}")]
    WrongId { got: NodeId },
    #[error("no handshake answer: {0}")]
    NoHello(String),
}

/// Connects to secondary `peer` and exchanges `Hello`s.
fn greet(me: NodeId, peer: NodeId, addr: SocketAddr) -> Result<TcpStream, ConnectError> {
    let s =
        TcpStream::connect_timeout(&addr, HANDSHAKE_TIMEOUT).map_err(ConnectError::Unreachable)?;
    s.set_nodelay(true)?;
    (&s).write_all(&wire::encode_to_vec(&Frame::hello(me))?)?;
    s.set_read_timeout(Some(HANDSHAKE_TIMEOUT))?;
    let mut body = Vec::new();
    match wire::read_frame(&mut &s, &mut body) {
        Ok(Some(Frame::Hello { version, .. })) if version != WIRE_VERSION => {
            return Err(ConnectError::Version { got: version })
        }
        Ok(Some(Frame::Hello { id, .. })) if id != peer => {
            return Err(ConnectError::WrongId { got: id })
        }
        Ok(Some(Frame::Hello { .. })) => {}
        Ok(Some(_)) => return Err(ConnectError::NoHello("another frame came first".into())),
        Ok(None) => return Err(ConnectError::NoHello("connection closed".into())),
        Err(e) => return Err(ConnectError::NoHello(e.to_string())),
    }
    s.set_read_timeout(None)?;
    Ok(s)
}

/// The primary's connection to one secondary: connect, greet, serve until it breaks, and
/// again after an exponential backoff; failures are reported when they change.
fn connect_loop(
    me: NodeId,
    peer: NodeId,
    addr: SocketAddr,
    tx: &mpsc::Sender<Event>,
    streams: &Streams,
    stopper: &Stopper,
) {
    let mut backoff = MIN_BACKOFF;
    let mut last_err: Option<String> = None;
    while !stopper.stopped() {
        match greet(me, peer, addr) {
            Ok(s) => {
                if last_err.take().is_some() {
                    eprintln!("blocklab repl {me}: secondary {peer} at {addr}: connected");
                }
                let began = Instant::now();
                if let Some(h) = serve_conn(s, Some(peer), tx, streams, stopper) {
                    let _ = h.join();
                }
                backoff = if began.elapsed() >= STABLE {
                    MIN_BACKOFF
                } else {
                    next_backoff(backoff)
                };
            }
            Err(e) => {
                let m = e.to_string();
                if last_err.as_deref() != Some(m.as_str()) {
                    eprintln!(
                        "blocklab repl {me}: secondary {peer} at {addr}: {m}; retrying with \
                         backoff (up to {} s)",
                        MAX_BACKOFF.as_secs()
                    );
                    last_err = Some(m);
                }
                backoff = next_backoff(backoff);
            }
        }
        stopper.sleep(backoff);
    }
}

/// Registers a connection with the loop and reads its frames on a thread. Returns the
/// reader thread.
fn serve_conn(
    s: TcpStream,
    peer: Option<NodeId>,
    tx: &mpsc::Sender<Event>,
    streams: &Streams,
    stopper: &Stopper,
) -> Option<JoinHandle<()>> {
    let conn = register_conn(&s, peer, tx, streams, stopper)?;
    let (tx, streams) = (tx.clone(), streams.clone());
    std::thread::Builder::new()
        .name("repl-read".into())
        .spawn(move || read_conn(&s, conn, &tx, &streams))
        .ok()
}

/// Registers a connection with the loop; returns its id.
fn register_conn(
    s: &TcpStream,
    peer: Option<NodeId>,
    tx: &mpsc::Sender<Event>,
    streams: &Streams,
    stopper: &Stopper,
) -> Option<u64> {
    let conn = NEXT_CONN.fetch_add(1, Ordering::Relaxed);
    let link = Link::spawn(s).ok()?;
    let stream = s.try_clone().ok()?;
    streams
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(conn, s.try_clone().ok()?);
    if stopper.stopped() {
        let _ = s.shutdown(std::net::Shutdown::Both);
    }
    tx.send(Event::Conn {
        conn,
        link,
        stream,
        peer,
    })
    .ok()?;
    Some(conn)
}

/// Reads a registered connection's frames into the loop until it ends.
fn read_conn(s: &TcpStream, conn: u64, tx: &mpsc::Sender<Event>, streams: &Streams) {
    let r = read_frames(s, |frame| tx.send(Event::Frame { conn, frame }).is_ok());
    if let Err(e) = r {
        eprintln!("blocklab repl: closing connection: {e}");
    }
    let _ = s.shutdown(std::net::Shutdown::Both);
    streams
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .remove(&conn);
    let _ = tx.send(Event::Closed { conn });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reconnect_backoff_doubles_up_to_its_ceiling() {
        let mut d = MIN_BACKOFF;
        let mut seen = vec![d];
        for _ in 0..10 {
            d = next_backoff(d);
            seen.push(d);
        }
        assert_eq!(seen[1], MIN_BACKOFF * 2);
        assert!(seen.windows(2).all(|w| w[1] >= w[0]));
        assert_eq!(*seen.last().unwrap(), MAX_BACKOFF);
    }
}
