//! A blocking client of a replica: writes (answered once committed) and status queries.

use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use super::transport::{read_frames, TransportError};
use super::wire::{encode_to_vec, Frame, Status};

/// Client errors.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("{addr}: {source}")]
    Io {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Transport(#[from] TransportError),
    #[error("{addr}: connection closed before the answer")]
    Closed { addr: SocketAddr },
    #[error("{addr}: write refused: {message}")]
    Refused { addr: SocketAddr, message: String },
    #[error("{addr}: unexpected answer {got}")]
    Unexpected { addr: SocketAddr, got: String },
}

/// One connection to a replica.
#[derive(Debug)]
pub struct Client {
    addr: SocketAddr,
    stream: TcpStream,
    next_id: u64,
}

impl Client {
    pub fn connect(addr: SocketAddr, timeout: Duration) -> Result<Client, ClientError> {
        let io = |source| ClientError::Io { addr, source };
        let stream = TcpStream::connect_timeout(&addr, timeout).map_err(io)?;
        stream.set_nodelay(true).map_err(io)?;
        stream.set_read_timeout(Some(timeout)).map_err(io)?;
        Ok(Client {
            addr,
            stream,
            next_id: 1,
        })
    }

    fn call(&mut self, f: &Frame) -> Result<Frame, ClientError> {
        use std::io::Write;
        let addr = self.addr;
        self.stream
            .write_all(&encode_to_vec(f))
            .map_err(|source| ClientError::Io { addr, source })?;
        let mut got = None;
        read_frames(&self.stream, |fr| {
            got = Some(fr);
            false
        })?;
        got.ok_or(ClientError::Closed { addr })
    }

    /// Replicates `payload`; returns its index once committed.
    pub fn write(&mut self, payload: Vec<u8>) -> Result<u64, ClientError> {
        let id = self.next_id;
        self.next_id += 1;
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
}
