//! Newline-delimited JSON over a byte stream: one message per line. The one codec of the
//! crate's JSON-line protocols (monitor, node agents, allocation node / index / store
//! ports, failover service and nodes, lunmap gateways); each protocol only defines its
//! message types. [`server`]: the one server of every socket port (accept loop,
//! connection registry, stop; connection and request/response modes), JSON-line or not;
//! [`tcp`]: the client's connect retry.

use std::io::{BufRead, Write};

use serde::de::DeserializeOwned;
use serde::Serialize;

pub mod server;
pub mod tcp;

/// Longest accepted message line (a map of thousands of daemons fits easily).
pub const MAX_LINE: usize = 64 << 20;

/// Why a line could not be read as a message.
#[derive(Debug, thiserror::Error)]
pub enum LineError {
    #[error("message longer than {0} bytes")]
    TooLong(usize),
    #[error("connection closed in the middle of a message")]
    Truncated,
    #[error("malformed message: {0}")]
    Malformed(String),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

impl From<LineError> for std::io::Error {
    fn from(e: LineError) -> std::io::Error {
        match e {
            LineError::Io(e) => e,
            LineError::Truncated => std::io::Error::new(std::io::ErrorKind::UnexpectedEof, e),
            e => std::io::Error::new(std::io::ErrorKind::InvalidData, e),
        }
    }
}

/// Writes `msg` as one JSON line and flushes.
pub fn send<T: Serialize>(w: &mut impl Write, msg: &T) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(msg).map_err(std::io::Error::other)?;
    line.push(b'\n');
    w.write_all(&line)?;
    w.flush()
}

/// Reads one JSON line of at most [`MAX_LINE`] bytes; `Ok(None)` at a clean end of stream.
pub fn recv<T: DeserializeOwned>(r: &mut impl BufRead) -> Result<Option<T>, LineError> {
    recv_limited(r, MAX_LINE)
}

/// [`recv`] with a protocol's own line limit.
pub fn recv_limited<T: DeserializeOwned>(
    r: &mut impl BufRead,
    max: usize,
) -> Result<Option<T>, LineError> {
    let mut line = Vec::new();
    let n = std::io::Read::take(&mut *r, max as u64 + 1).read_until(b'\n', &mut line)?;
    if n == 0 {
        return Ok(None);
    }
    if line.last() != Some(&b'\n') {
        return Err(if line.len() > max {
            LineError::TooLong(max)
        } else {
            LineError::Truncated
        });
    }
    parse(&line).map(Some)
}

/// Parses one line (with or without its newline).
pub fn parse<T: DeserializeOwned>(line: &[u8]) -> Result<T, LineError> {
    serde_json::from_slice(line).map_err(|e| LineError::Malformed(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_eof_truncation_and_garbage() {
        let mut buf = Vec::new();
        send(&mut buf, &vec![1u32, 2]).unwrap();
        send(&mut buf, &"x").unwrap();
        let mut r = std::io::Cursor::new(buf);
        assert_eq!(recv::<Vec<u32>>(&mut r).unwrap(), Some(vec![1, 2]));
        assert_eq!(recv::<String>(&mut r).unwrap(), Some("x".into()));
        assert!(recv::<String>(&mut r).unwrap().is_none());
        let mut cut = std::io::Cursor::new(b"[1,2".to_vec());
        assert!(matches!(
            recv::<Vec<u32>>(&mut cut),
            Err(LineError::Truncated)
        ));
        let mut bad = std::io::Cursor::new(b"{nope\n".to_vec());
        assert!(matches!(
            recv::<Vec<u32>>(&mut bad),
            Err(LineError::Malformed(_))
        ));
    }
}
