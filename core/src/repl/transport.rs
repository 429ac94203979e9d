//! TCP transport: one writer thread per connection with an optional injected one-way delay
//! (this kernel has no netem), and a blocking frame reader.

use std::io::{BufReader, Read, Write};
use std::net::TcpStream;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use super::wire::{self, Frame, WireError, MAX_FRAME};

/// Transport errors.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("connection to {peer}: {source}")]
    Io {
        peer: String,
        #[source]
        source: std::io::Error,
    },
    #[error("bad frame from {peer}: {source}")]
    Wire {
        peer: String,
        #[source]
        source: WireError,
    },
}

/// The sending half of a connection. Frames are written in order by a writer thread, each
/// no earlier than the `delay` given to [`Link::send`] after the call (the injected
/// one-way delay; constant per link, so order is kept).
#[derive(Debug, Clone)]
pub struct Link {
    tx: mpsc::Sender<(Instant, Vec<u8>)>,
}

impl Link {
    /// Starts the writer thread on (a clone of) `stream`.
    pub fn spawn(stream: &TcpStream) -> std::io::Result<Link> {
        let mut s = stream.try_clone()?;
        s.set_nodelay(true)?;
        let (tx, rx) = mpsc::channel::<(Instant, Vec<u8>)>();
        std::thread::Builder::new()
            .name("repl-link".into())
            .spawn(move || {
                let mut batch = Vec::new();
                while let Ok((due, bytes)) = rx.recv() {
                    let now = Instant::now();
                    if due > now {
                        std::thread::sleep(due - now);
                    }
                    batch.clear();
                    batch.extend_from_slice(&bytes);
                    // Coalesce what is already due into one write.
                    while let Ok((d, b)) = rx.try_recv() {
                        if d > Instant::now() {
                            if s.write_all(&batch).is_err() {
                                return;
                            }
                            batch.clear();
                            let now = Instant::now();
                            if d > now {
                                std::thread::sleep(d - now);
                            }
                        }
                        batch.extend_from_slice(&b);
                    }
                    if s.write_all(&batch).is_err() {
                        let _ = s.shutdown(std::net::Shutdown::Both);
                        return;
                    }
                }
                let _ = s.shutdown(std::net::Shutdown::Write);
            })?;
        Ok(Link { tx })
    }

    /// Queues an encoded frame; false when the connection's writer is gone.
    pub fn send_bytes(&self, bytes: Vec<u8>, delay: Duration) -> bool {
        self.tx.send((Instant::now() + delay, bytes)).is_ok()
    }

    /// Encodes and queues a frame.
    pub fn send(&self, f: &Frame, delay: Duration) -> bool {
        self.send_bytes(wire::encode_to_vec(f), delay)
    }
}

/// Reads frames from `stream` until EOF (Ok) or an error, handing each to `on_frame`. A
/// bad frame ends the connection with [`TransportError::Wire`].
pub fn read_frames(
    stream: &TcpStream,
    mut on_frame: impl FnMut(Frame) -> bool,
) -> Result<(), TransportError> {
    let peer = stream
        .peer_addr()
        .map(|a| a.to_string())
        .unwrap_or_else(|_| "?".into());
    let mut r = BufReader::with_capacity(256 << 10, stream);
    let mut len = [0u8; 4];
    let mut body = Vec::new();
    loop {
        match r.read_exact(&mut len) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(source) => return Err(TransportError::Io { peer, source }),
        }
        let n = u32::from_le_bytes(len) as usize;
        if n > MAX_FRAME {
            return Err(TransportError::Wire {
                peer,
                source: WireError::Oversized {
                    len: n,
                    max: MAX_FRAME,
                },
            });
        }
        body.resize(n, 0);
        if let Err(source) = r.read_exact(&mut body) {
            if source.kind() == std::io::ErrorKind::UnexpectedEof {
                return Err(TransportError::Wire {
                    peer,
                    source: WireError::Truncated {
                        what: "frame (connection closed)",
                        need: n,
                        have: 0,
                    },
                });
            }
            return Err(TransportError::Io { peer, source });
        }
        let f = wire::decode_body(&body).map_err(|source| TransportError::Wire {
            peer: peer.clone(),
            source,
        })?;
        if !on_frame(f) {
            return Ok(());
        }
    }
}
