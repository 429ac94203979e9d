//! A forwarding TCP proxy that delays what it forwards: network delay injected outside the
//! processes that talk (this kernel has no netem), one proxy per link.
//!
//! For every accepted connection the proxy connects to its target (TCP_NODELAY on both
//! sockets) and forwards both directions. Each direction has a reader and a writer thread
//! with a timed queue between them: every chunk read is stamped with its arrival and a
//! one-way delay `d` drawn for it uniformly from `[delay·(1−j), delay·(1+j)]`, and the
//! writer delivers it no earlier than arrival + `d` and never before the chunk read before
//! it (TCP keeps byte order, so a chunk with a short draw waits for a longer one ahead of
//! it). The writer sleeps until a chunk is due (timer slack 1 ns, no busy wait). With a
//! delay of 0 a direction has one thread and forwards at once.
//!
//! What it does not emulate: loss, reordering, duplication, bandwidth limits or queueing
//! beyond the delay; the delay applies to chunks as `read` returns them, not to packets.
//!
//! An end of stream on one side is passed on to the other (after the data before it, with
//! its delay) as a half-close; a failure on either side (reset, write error) closes both
//! sockets of the connection at once. [`DelayProxy::stop`] (or a drop) stops accepting and
//! closes every connection.
//!
//! ```no_run
//! use blocklab::delayproxy::{DelayProxy, DelaySpec};
//! use std::time::Duration;
//! let spec = DelaySpec::new(Duration::from_micros(500), 0.1, 1).unwrap();
//! let p = DelayProxy::bind("127.0.0.1:0".parse().unwrap(), "127.0.0.1:2380".parse().unwrap(), spec)
//!     .unwrap();
//! println!("connect to {} instead of 127.0.0.1:2380", p.addr());
//! let s = p.stats(); // bytes and chunks forwarded per direction
//! # let _ = s;
//! ```

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::num::NonZeroU64;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::jsonl::server::{Conn, Server};

/// The longest read: one chunk of the timed queue.
pub const CHUNK: usize = 64 * 1024;

/// How long connecting to the target may take before the accepted connection is closed.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// How often a connection whose client side ended looks whether the proxy stops.
const STOP_POLL: Duration = Duration::from_millis(50);

/// The longest delay a [`DelaySpec`] accepts.
pub const MAX_DELAY: Duration = Duration::from_secs(3600);

/// Errors of the delay proxy.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("jitter {0} is outside [0, 1): it is a fraction of the delay (0.1 is 10%)")]
    Jitter(f64),
    #[error("delay {0:?} is longer than the maximum {MAX_DELAY:?}")]
    Delay(Duration),
    #[error("{what}: {cause}")]
    Io { what: String, cause: std::io::Error },
}

/// The one-way delay of a proxy: `delay`, with each chunk's delay drawn uniformly from
/// `[delay·(1−jitter), delay·(1+jitter)]` by a generator seeded from `seed` (and the
/// connection's number and direction, so runs with the same seed draw the same delays for
/// the same connections and chunks).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DelaySpec {
    delay: Duration,
    jitter: f64,
    seed: u64,
}

impl DelaySpec {
    /// A delay with jitter `jitter` (a fraction in `[0, 1)`), drawn from `seed`.
    pub fn new(delay: Duration, jitter: f64, seed: u64) -> Result<DelaySpec, ProxyError> {
        // `!(0 <= j < 1)` also refuses NaN.
        if !(0.0..1.0).contains(&jitter) {
            return Err(ProxyError::Jitter(jitter));
        }
        if delay > MAX_DELAY {
            return Err(ProxyError::Delay(delay));
        }
        Ok(DelaySpec {
            delay,
            jitter,
            seed,
        })
    }

    /// A constant delay (no jitter); longer than [`MAX_DELAY`] is refused.
    pub fn fixed(delay: Duration) -> Result<DelaySpec, ProxyError> {
        DelaySpec::new(delay, 0.0, 0)
    }

    /// No delay: chunks are forwarded as they are read.
    pub fn none() -> DelaySpec {
        DelaySpec {
            delay: Duration::ZERO,
            jitter: 0.0,
            seed: 0,
        }
    }

    pub fn delay(&self) -> Duration {
        self.delay
    }

    pub fn jitter(&self) -> f64 {
        self.jitter
    }

    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// The shortest and the longest delay a chunk can get.
    pub fn bounds(&self) -> (Duration, Duration) {
        let (lo, hi) = self.bounds_ns();
        (Duration::from_nanos(lo), Duration::from_nanos(hi))
    }

    fn bounds_ns(&self) -> (u64, u64) {
        // At most MAX_DELAY · 2 in nanoseconds: far below 2^63.
        let d = self.delay.as_nanos() as f64;
        let lo = (d * (1.0 - self.jitter)).round() as u64;
        let hi = (d * (1.0 + self.jitter)).round() as u64;
        (lo, hi.max(lo))
    }

    /// The draws of connection `conn`, direction `dir`.
    fn draws(&self, conn: u64, dir: Direction) -> Draws {
        let (lo, hi) = self.bounds_ns();
        let stream = conn.wrapping_mul(2).wrapping_add(dir as u64);
        Draws {
            lo,
            hi,
            rng: StdRng::seed_from_u64(self.seed ^ stream.wrapping_mul(0x9e37_79b9_7f4a_7c15)),
        }
    }
}

/// The per-chunk delays of one direction of one connection.
struct Draws {
    lo: u64,
    hi: u64,
    rng: StdRng,
}

impl Draws {
    fn next(&mut self) -> Duration {
        if self.lo == self.hi {
            return Duration::from_nanos(self.lo);
        }
        Duration::from_nanos(self.rng.random_range(self.lo..=self.hi))
    }
}

/// A direction of a proxied connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// From the connecting client to the target.
    ToTarget = 0,
    /// From the target back to the client.
    ToClient = 1,
}

/// What one direction forwarded: bytes and chunks written to the other side.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct DirectionStats {
    pub bytes: u64,
    pub chunks: u64,
}

/// What a proxy did since it started, over all its connections.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ProxyStats {
    /// Client to target.
    pub to_target: DirectionStats,
    /// Target to client.
    pub to_client: DirectionStats,
    /// Connections accepted.
    pub connections: u64,
    /// Accepted connections closed because the target could not be reached.
    pub failed_connects: u64,
}

#[derive(Default)]
struct Counters {
    bytes: [AtomicU64; 2],
    chunks: [AtomicU64; 2],
    connections: AtomicU64,
    failed_connects: AtomicU64,
}

impl Counters {
    fn forwarded(&self, dir: Direction, bytes: usize) {
        self.bytes[dir as usize].fetch_add(bytes as u64, Ordering::Relaxed);
        self.chunks[dir as usize].fetch_add(1, Ordering::Relaxed);
    }

    fn direction(&self, dir: Direction) -> DirectionStats {
        DirectionStats {
            bytes: self.bytes[dir as usize].load(Ordering::Relaxed),
            chunks: self.chunks[dir as usize].load(Ordering::Relaxed),
        }
    }
}

/// A running delay proxy. Dropping it stops it, as [`DelayProxy::stop`] does.
pub struct DelayProxy {
    server: Server<TcpListener>,
    target: SocketAddr,
    spec: DelaySpec,
    counters: Arc<Counters>,
}

impl std::fmt::Debug for DelayProxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DelayProxy")
            .field("addr", &self.server.addr())
            .field("target", &self.target)
            .field("spec", &self.spec)
            .finish()
    }
}

impl DelayProxy {
    /// Binds `listen` (port 0: any free port) and proxies its connections to `target`.
    pub fn bind(
        listen: SocketAddr,
        target: SocketAddr,
        spec: DelaySpec,
    ) -> Result<DelayProxy, ProxyError> {
        let listener = TcpListener::bind(listen).map_err(|cause| ProxyError::Io {
            what: format!("listening on {listen}"),
            cause,
        })?;
        DelayProxy::start(listener, target, spec)
    }

    /// Proxies the connections of `listener` to `target`, with the delay of `spec`.
    pub fn start(
        listener: TcpListener,
        target: SocketAddr,
        spec: DelaySpec,
    ) -> Result<DelayProxy, ProxyError> {
        let counters = Arc::new(Counters::default());
        let c = counters.clone();
        let server = Server::serve(listener, "delayproxy", move |conn| {
            let n = c.connections.fetch_add(1, Ordering::Relaxed);
            proxy_connection(conn, n, target, spec, &c);
        })
        .map_err(|cause| ProxyError::Io {
            what: format!("serving the proxy to {target}"),
            cause,
        })?;
        Ok(DelayProxy {
            server,
            target,
            spec,
            counters,
        })
    }

    /// The address clients connect to.
    pub fn addr(&self) -> SocketAddr {
        self.server.addr()
    }

    /// Where the connections go.
    pub fn target(&self) -> SocketAddr {
        self.target
    }

    pub fn spec(&self) -> DelaySpec {
        self.spec
    }

    /// Bytes and chunks forwarded so far (counted once written to the other side).
    pub fn stats(&self) -> ProxyStats {
        let c = &self.counters;
        ProxyStats {
            to_target: c.direction(Direction::ToTarget),
            to_client: c.direction(Direction::ToClient),
            connections: c.connections.load(Ordering::Relaxed),
            failed_connects: c.failed_connects.load(Ordering::Relaxed),
        }
    }

    /// Connections open right now.
    pub fn open_connections(&self) -> usize {
        self.server.connections()
    }

    /// Stops accepting and closes every connection (data still queued is dropped);
    /// returns once every connection's threads ended.
    pub fn stop(self) {
        self.server.stop();
    }
}

/// Both sockets of a proxied connection, to close them at once when either side fails.
struct Pair {
    client: TcpStream,
    target: TcpStream,
}

impl Pair {
    fn abort(&self) {
        let _ = self.client.shutdown(Shutdown::Both);
        let _ = self.target.shutdown(Shutdown::Both);
    }
}

/// One accepted connection: connects to the target and forwards both directions (the
/// client-to-target one on this thread) until both ended.
fn proxy_connection(
    conn: Conn<TcpStream>,
    n: u64,
    target: SocketAddr,
    spec: DelaySpec,
    counters: &Arc<Counters>,
) {
    let upstream = match TcpStream::connect_timeout(&target, CONNECT_TIMEOUT) {
        Ok(s) => s,
        Err(e) => {
            counters.failed_connects.fetch_add(1, Ordering::Relaxed);
            eprintln!("delayproxy: connecting to {target}: {e}; closing the client's connection");
            return;
        }
    };
    let clones = || -> std::io::Result<_> {
        conn.stream().set_nodelay(true)?;
        upstream.set_nodelay(true)?;
        let pair = Arc::new(Pair {
            client: conn.try_clone()?,
            target: upstream.try_clone()?,
        });
        Ok((
            pair,
            (conn.try_clone()?, upstream.try_clone()?),
            (upstream.try_clone()?, conn.try_clone()?),
        ))
    };
    let (pair, (c_in, t_out), (t_in, c_out)) = match clones() {
        Ok(x) => x,
        Err(e) => {
            eprintln!("delayproxy: setting up a connection to {target}: {e}");
            return;
        }
    };
    let (done_tx, done) = mpsc::channel::<()>();
    let back = {
        let (pair, counters) = (pair.clone(), counters.clone());
        let draws = spec.draws(n, Direction::ToClient);
        std::thread::Builder::new()
            .name("delayproxy-back".into())
            .spawn(move || {
                pump(t_in, c_out, Direction::ToClient, draws, &counters, &pair);
                drop(done_tx);
            })
    };
    let back = match back {
        Ok(t) => t,
        Err(e) => {
            eprintln!("delayproxy: no thread for a connection to {target}: {e}");
            return;
        }
    };
    let draws = spec.draws(n, Direction::ToTarget);
    pump(c_in, t_out, Direction::ToTarget, draws, counters, &pair);
    // The client's side ended. The target's may go on (a half-close); a stop of the
    // server closes it rather than wait for the target to close (the server's stop shuts
    // only the client's socket).
    while let Err(mpsc::RecvTimeoutError::Timeout) = done.recv_timeout(STOP_POLL) {
        if conn.stopping() {
            pair.abort();
        }
    }
    let _ = back.join();
    // `conn` leaves the server's registry here.
}

/// Forwards `from` to `to` until `from` ends (the end passed on as a half-close of `to`) or
/// either side fails (both sockets of the connection closed).
fn pump(
    mut from: TcpStream,
    mut to: TcpStream,
    dir: Direction,
    mut draws: Draws,
    counters: &Arc<Counters>,
    pair: &Arc<Pair>,
) {
    let mut buf = vec![0u8; CHUNK];
    if draws.hi == 0 {
        loop {
            match from.read(&mut buf) {
                Ok(0) => {
                    let _ = to.shutdown(Shutdown::Write);
                    return;
                }
                Ok(n) => {
                    if to.write_all(&buf[..n]).is_err() {
                        break;
                    }
                    counters.forwarded(dir, n);
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
        pair.abort();
        return;
    }
    let (tx, rx) = mpsc::channel::<(Instant, Vec<u8>)>();
    let writer = {
        let (counters, pair) = (counters.clone(), pair.clone());
        std::thread::Builder::new()
            .name("delayproxy-write".into())
            .spawn(move || {
                if deliver(&mut to, &rx, dir, &counters).is_err() {
                    pair.abort();
                }
            })
    };
    let writer = match writer {
        Ok(t) => t,
        Err(e) => {
            eprintln!("delayproxy: no writer thread: {e}");
            pair.abort();
            return;
        }
    };
    loop {
        match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                let due = Instant::now() + draws.next();
                if tx.send((due, buf[..n].to_vec())).is_err() {
                    break; // the writer failed (and closed the connection)
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => {
                pair.abort();
                break;
            }
        }
    }
    drop(tx);
    let _ = writer.join();
}

/// The writer of a delayed direction: delivers each chunk once due, in order; at the end
/// of the queue half-closes `to`.
fn deliver(
    to: &mut TcpStream,
    rx: &mpsc::Receiver<(Instant, Vec<u8>)>,
    dir: Direction,
    counters: &Counters,
) -> std::io::Result<()> {
    // Sleeps end within microseconds of their deadline, not the default 50 µs slack.
    let _ = rustix::thread::set_current_timer_slack(NonZeroU64::new(1));
    for (due, chunk) in rx {
        let now = Instant::now();
        if due > now {
            std::thread::sleep(due - now);
        }
        to.write_all(&chunk)?;
        counters.forwarded(dir, chunk.len());
    }
    to.shutdown(Shutdown::Write)
}
