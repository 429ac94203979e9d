//! TCP transport: one writer thread per connection
//! (this kernel has no netem), and a blocking frame reader.

use std::io::{BufReader, Write};
use std::net::TcpStream;
use std::sync::{mpsc, Arc};

use super::wire::{self, Frame, ReadError, WireError};

/// Transport errors.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("connection to {peer}: {cause}")]
    Io { peer: String, cause: std::io::Error },
    #[error("bad frame from {peer}: {cause}")]
    Wire { peer: String, cause: WireError },
}

/// An encoded frame, shared when the same frame goes to several connections.
pub(crate) type Bytes = Arc<Vec<u8>>;

/// The sending half of a connection. Frames are written in order by a writer thread, so
/// the replica loop never blocks on a slow peer. Network delay is not injected here: it
/// comes from the link proxies between replica processes (see docs/repl.md).
#[derive(Debug, Clone)]
pub struct Link {
    tx: mpsc::Sender<Bytes>,
}

impl Link {
    /// Starts the writer thread on (a clone of) `stream`.
    pub fn spawn(stream: &TcpStream) -> std::io::Result<Link> {
        let mut s = stream.try_clone()?;
        s.set_nodelay(true)?;
        let (tx, rx) = mpsc::channel::<Bytes>();
        std::thread::Builder::new()
            .name("repl-link".into())
            .spawn(move || {
                if write_loop(&mut s, &rx).is_err() {
                    let _ = s.shutdown(std::net::Shutdown::Both);
                } else {
                    let _ = s.shutdown(std::net::Shutdown::Write);
                }
            })?;
        Ok(Link { tx })
    }

    /// Queues an encoded frame (ignored when the connection's writer is gone: the reader
    /// of the connection reports its end).
    pub(crate) fn send_bytes(&self, bytes: Bytes) {
        let _ = self.tx.send(bytes);
    }

    /// Encodes and queues a frame; an oversized frame is refused.
    pub fn send(&self, f: &Frame) -> Result<(), WireError> {
        self.send_bytes(Arc::new(wire::encode_to_vec(f)?));
        Ok(())
    }
}

/// Writes queued frames until every sender is gone. A frame with nothing queued behind it
/// is written as it is; frames queued behind it are coalesced into one write.
fn write_loop(s: &mut TcpStream, rx: &mpsc::Receiver<Bytes>) -> std::io::Result<()> {
    let mut batch = Vec::new();
    while let Ok(bytes) = rx.recv() {
        let Ok(mut next) = rx.try_recv() else {
            s.write_all(&bytes)?;
            continue;
        };
        batch.clear();
        batch.extend_from_slice(&bytes);
        loop {
            batch.extend_from_slice(&next);
            match rx.try_recv() {
                Ok(n) => next = n,
                Err(_) => break,
            }
        }
        s.write_all(&batch)?;
    }
    Ok(())
}

/// Reads frames from `stream` until EOF (Ok) or an error, handing each to `on_frame`
/// (which returns false to stop). A bad frame, or a stream that ends inside a frame, ends
/// the connection with [`TransportError::Wire`].
pub fn read_frames(
    stream: &TcpStream,
    mut on_frame: impl FnMut(Frame) -> bool,
) -> Result<(), TransportError> {
    let peer = stream
        .peer_addr()
        .map(|a| a.to_string())
        .unwrap_or_else(|_| "?".into());
    let mut r = BufReader::with_capacity(256 << 10, stream);
    let mut body = Vec::new();
    loop {
        match wire::read_frame(&mut r, &mut body) {
            Ok(Some(f)) => {
                if !on_frame(f) {
                    return Ok(());
                }
            }
            Ok(None) => return Ok(()),
            Err(ReadError::Io(source)) => {
                return Err(TransportError::Io {
                    peer,
                    cause: source,
                })
            }
            Err(ReadError::Wire(source)) => {
                return Err(TransportError::Wire {
                    peer,
                    cause: source,
                })
            }
        }
    }
}
