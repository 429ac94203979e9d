//! Newline-delimited JSON over a byte stream: one message per line. Used by the monitor
//! protocol and by the node agents' protocol.

use std::io::{BufRead, Write};

use serde::de::DeserializeOwned;
use serde::Serialize;

/// Longest accepted message line (a map of thousands of daemons fits easily).
pub const MAX_LINE: usize = 64 << 20;

/// Writes `msg` as one JSON line and flushes.
pub fn send<T: Serialize>(w: &mut impl Write, msg: &T) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(msg).map_err(std::io::Error::other)?;
    line.push(b'\n');
    w.write_all(&line)?;
    w.flush()
}

/// Reads one JSON line; `Ok(None)` at a clean end of stream.
pub fn recv<T: DeserializeOwned>(r: &mut impl BufRead) -> std::io::Result<Option<T>> {
    let mut line = Vec::new();
    let n = std::io::Read::take(&mut *r, MAX_LINE as u64 + 1).read_until(b'\n', &mut line)?;
    if n == 0 {
        return Ok(None);
    }
    if line.last() != Some(&b'\n') {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "connection closed in the middle of a message (or message too long)",
        ));
    }
    serde_json::from_slice(&line)
        .map(Some)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}
