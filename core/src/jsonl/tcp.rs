//! The client side of a TCP JSON-line protocol: a connect with a bounded retry (the
//! server side is [`super::server`]).

use std::net::{TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

/// A connect that kept failing for the whole retry time.
#[derive(Debug, thiserror::Error)]
#[error("{addr} unreachable after {attempts} attempts over {waited:?}: {cause}")]
pub struct Unreachable {
    pub addr: String,
    pub attempts: u32,
    pub waited: Duration,
    pub cause: std::io::Error,
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
                        cause: source,
                    });
                }
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(Duration::from_millis(500));
            }
        }
    }
}
