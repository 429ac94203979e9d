//! A blocking client of a replica: writes (answered once committed) and status queries.

use std::io::{BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use super::wire::{encode_to_vec, read_frame, Frame, ReadError, Status, WireError};

/// Client errors.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("{addr}: {cause}")]
    Io {
        addr: SocketAddr,
        cause: std::io::Error,
    },
    #[error("{addr}: {cause}")]
    Wire { addr: SocketAddr, cause: WireError },
    #[error("{addr}: no answer within {secs} s (is a majority of the replicas reachable?)")]
    Timeout { addr: SocketAddr, secs: f64 },
    #[error("{addr}: connection closed before the answer")]
    Closed { addr: SocketAddr },
    #[error("{addr}: write refused: {message}")]
    Refused { addr: SocketAddr, message: String },
    #[error("{addr}: unexpected answer {got}")]
    Unexpected { addr: SocketAddr, got: String },
}

/// One connection to a replica. After a timeout the connection is closed (an answer may
/// still be on its way); connect again to go on.
#[derive(Debug)]
pub struct Client {
    addr: SocketAddr,
    timeout: Duration,
    stream: TcpStream,
    reader: BufReader<TcpStream>,
    body: Vec<u8>,
    next_id: u64,
}

impl Client {
    /// Connects within `timeout`, which is also how long a call waits for its answer.
    pub fn connect(addr: SocketAddr, timeout: Duration) -> Result<Client, ClientError> {
        let io = |source| ClientError::Io {
            addr,
            cause: source,
        };
        let stream = TcpStream::connect_timeout(&addr, timeout).map_err(io)?;
        stream.set_nodelay(true).map_err(io)?;
        stream.set_read_timeout(Some(timeout)).map_err(io)?;
        let reader = BufReader::with_capacity(64 << 10, stream.try_clone().map_err(io)?);
        Ok(Client {
            addr,
            timeout,
            stream,
            reader,
            body: Vec::new(),
            next_id: 1,
        })
    }

    fn call(&mut self, f: &Frame) -> Result<Frame, ClientError> {
        let addr = self.addr;
        let bytes = encode_to_vec(f).map_err(|source| ClientError::Wire {
            addr,
            cause: source,
        })?;
        self.stream
            .write_all(&bytes)
            .map_err(|source| ClientError::Io {
                addr,
                cause: source,
            })?;
        let r = next_frame(addr, self.timeout, &mut self.reader, &mut self.body);
        if let Err(ClientError::Timeout { .. }) = r {
            // An answer may still come: this connection is done.
            let _ = self.stream.shutdown(std::net::Shutdown::Both);
        }
        r
    }

    /// Replicates `payload`; returns its index once committed.
    pub fn write(&mut self, payload: impl Into<Arc<[u8]>>) -> Result<u64, ClientError> {
        let id = self.next_id;
        self.next_id += 1;
        let payload = payload.into();
        match self.call(&Frame::ClientWrite { id, payload })? {
            Frame::ClientAck { id: got, index } if got == id => Ok(index),
            Frame::ClientErr { message, .. } => Err(ClientError::Refused {
                addr: self.addr,
                message,
            }),
            other => Err(ClientError::Unexpected {
                addr: self.addr,
                got: format!("{other:?}"),
            }),
        }
    }

    pub fn status(&mut self) -> Result<Status, ClientError> {
        match self.call(&Frame::StatusReq)? {
            Frame::Status(s) => Ok(s),
            other => Err(ClientError::Unexpected {
                addr: self.addr,
                got: format!("{other:?}"),
            }),
        }
    }

    /// Splits the connection for pipelined writes: one side sends writes without waiting,
    /// the other reads their answers as they come (in commit order, by write id).
    pub fn pipeline(self) -> (WriteSender, AckReceiver) {
        (
            WriteSender {
                addr: self.addr,
                stream: self.stream,
                next_id: self.next_id,
            },
            AckReceiver {
                addr: self.addr,
                timeout: self.timeout,
                reader: self.reader,
                body: self.body,
            },
        )
    }
}

/// The sending side of a pipelined connection ([`Client::pipeline`]).
#[derive(Debug)]
pub struct WriteSender {
    addr: SocketAddr,
    stream: TcpStream,
    next_id: u64,
}

impl WriteSender {
    /// Sends a write; returns its id (the answer's id).
    pub fn send(&mut self, payload: impl Into<Arc<[u8]>>) -> Result<u64, ClientError> {
        let addr = self.addr;
        let id = self.next_id;
        self.next_id += 1;
        let bytes = encode_to_vec(&Frame::ClientWrite {
            id,
            payload: payload.into(),
        })
        .map_err(|cause| ClientError::Wire { addr, cause })?;
        self.stream
            .write_all(&bytes)
            .map_err(|cause| ClientError::Io { addr, cause })?;
        Ok(id)
    }
}

/// The answer side of a pipelined connection ([`Client::pipeline`]).
#[derive(Debug)]
pub struct AckReceiver {
    addr: SocketAddr,
    timeout: Duration,
    reader: BufReader<TcpStream>,
    body: Vec<u8>,
}

impl AckReceiver {
    /// The next answer: the write's id and its committed index, or why it was refused.
    /// Waits at most the connection's timeout.
    pub fn recv(&mut self) -> Result<(u64, Result<u64, String>), ClientError> {
        match next_frame(self.addr, self.timeout, &mut self.reader, &mut self.body)? {
            Frame::ClientAck { id, index } => Ok((id, Ok(index))),
            Frame::ClientErr { id, message } => Ok((id, Err(message))),
            other => Err(ClientError::Unexpected {
                addr: self.addr,
                got: format!("{other:?}"),
            }),
        }
    }
}

/// The next frame on a client connection, with its errors as [`ClientError`]s (a read
/// timeout as [`ClientError::Timeout`]).
fn next_frame(
    addr: SocketAddr,
    timeout: Duration,
    reader: &mut BufReader<TcpStream>,
    body: &mut Vec<u8>,
) -> Result<Frame, ClientError> {
    match read_frame(reader, body) {
        Ok(Some(f)) => Ok(f),
        Ok(None) => Err(ClientError::Closed { addr }),
        Err(ReadError::Io(e))
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) =>
        {
            Err(ClientError::Timeout {
                addr,
                secs: timeout.as_secs_f64(),
            })
        }
        Err(ReadError::Io(cause)) => Err(ClientError::Io { addr, cause }),
        Err(ReadError::Wire(cause)) => Err(ClientError::Wire { addr, cause }),
    }
}
