//! The wire format: length-prefixed binary frames with a version byte.
//!
//! ```text
//! frame   = len:u32le  version:u8  kind:u8  body        (len counts version+kind+body)
//! Append     (1) = term:u64 from:u32 prev_index:u64 prev_term:u64 commit:u64 n:u32 entry*n
//! entry          = term:u64 index:u64 plen:u32 payload[plen]
//! AppendResp (2) = term:u64 from:u32 success:u8 match_index:u64 commit:u64 last_index:u64
//! ClientWrite(3) = id:u64 plen:u32 payload[plen]
//! ClientAck  (4) = id:u64 index:u64
//! ClientErr  (5) = id:u64 mlen:u32 utf8[mlen]
//! StatusReq  (6) = (empty)
//! Status     (7) = id:u32 primary:u8 term:u64 last_index:u64 durable:u64 commit:u64 applied:u64
//! ```
//!
//! All integers little-endian. The decoder never panics: a truncated, oversized, garbage or
//! other-version frame is a [`WireError`] naming what is wrong.

use super::protocol::{Entry, Message, NodeId};

/// The version this build speaks.
pub const WIRE_VERSION: u8 = 1;
/// Largest frame accepted (version+kind+body), 16 MiB.
pub const MAX_FRAME: usize = 16 << 20;

/// A frame that cannot be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    Oversized { len: usize, max: usize },
    #[error("frame too short: {len} bytes, a frame has at least a version and a kind byte")]
    TooShort { len: usize },
    #[error("peer speaks wire version {got}, this build speaks version {want}")]
    Version { got: u8, want: u8 },
    #[error("unknown message kind {0}")]
    UnknownKind(u8),
    #[error("truncated {what}: needed {need} more bytes, frame has {have}")]
    Truncated {
        what: &'static str,
        need: usize,
        have: usize,
    },
    #[error("{0} trailing bytes after the message")]
    Trailing(usize),
    #[error("malformed frame: {0}")]
    Malformed(&'static str),
}

/// Everything that travels between replicas and between clients and the primary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// Replica-to-replica protocol message.
    Repl(Message),
    /// A client asks the primary to replicate `payload`.
    ClientWrite {
        id: u64,
        payload: Vec<u8>,
    },
    /// The write `id` is committed at `index`.
    ClientAck {
        id: u64,
        index: u64,
    },
    /// The write `id` was refused (not primary, log full...).
    ClientErr {
        id: u64,
        message: String,
    },
    /// Asks a replica for its [`Status`].
    StatusReq,
    Status(Status),
}

/// A replica's progress, as reported over the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Status {
    pub id: NodeId,
    pub primary: bool,
    pub term: u64,
    pub last_index: u64,
    pub durable_index: u64,
    pub commit: u64,
    pub applied: u64,
}

const K_APPEND: u8 = 1;
const K_APPEND_RESP: u8 = 2;
const K_CLIENT_WRITE: u8 = 3;
const K_CLIENT_ACK: u8 = 4;
const K_CLIENT_ERR: u8 = 5;
const K_STATUS_REQ: u8 = 6;
const K_STATUS: u8 = 7;

/// Appends the encoded frame of `f` (length prefix included) to `out`.
pub fn encode(f: &Frame, out: &mut Vec<u8>) {
    let start = out.len();
    out.extend_from_slice(&[0; 4]);
    out.push(WIRE_VERSION);
    match f {
        Frame::Repl(Message::Append {
            term,
            from,
            prev_index,
            prev_term,
            commit,
            entries,
        }) => {
            out.push(K_APPEND);
            put64(out, *term);
            put32(out, *from);
            put64(out, *prev_index);
            put64(out, *prev_term);
            put64(out, *commit);
            put32(out, entries.len() as u32);
            for e in entries {
                put64(out, e.term);
                put64(out, e.index);
                put32(out, e.payload.len() as u32);
                out.extend_from_slice(&e.payload);
            }
        }
        Frame::Repl(Message::AppendResp {
            term,
            from,
            success,
            match_index,
            commit,
            last_index,
        }) => {
            out.push(K_APPEND_RESP);
            put64(out, *term);
            put32(out, *from);
            out.push(*success as u8);
            put64(out, *match_index);
            put64(out, *commit);
            put64(out, *last_index);
        }
        Frame::ClientWrite { id, payload } => {
            out.push(K_CLIENT_WRITE);
            put64(out, *id);
            put32(out, payload.len() as u32);
            out.extend_from_slice(payload);
        }
        Frame::ClientAck { id, index } => {
            out.push(K_CLIENT_ACK);
            put64(out, *id);
            put64(out, *index);
        }
        Frame::ClientErr { id, message } => {
            out.push(K_CLIENT_ERR);
            put64(out, *id);
            put32(out, message.len() as u32);
            out.extend_from_slice(message.as_bytes());
        }
        Frame::StatusReq => out.push(K_STATUS_REQ),
        Frame::Status(s) => {
            out.push(K_STATUS);
            put32(out, s.id);
            out.push(s.primary as u8);
            put64(out, s.term);
            put64(out, s.last_index);
            put64(out, s.durable_index);
            put64(out, s.commit);
            put64(out, s.applied);
        }
    }
    let len = (out.len() - start - 4) as u32;
    out[start..start + 4].copy_from_slice(&len.to_le_bytes());
}

/// Encodes one frame into a fresh buffer.
pub fn encode_to_vec(f: &Frame) -> Vec<u8> {
    let mut v = Vec::new();
    encode(f, &mut v);
    v
}

/// Length of the frame at the start of `buf`, if its length prefix is complete:
/// `Ok(Some(total))` (prefix included), `Ok(None)` when fewer than 4 bytes are there,
/// an error when the prefix announces an oversized frame.
pub fn frame_len(buf: &[u8]) -> Result<Option<usize>, WireError> {
    if buf.len() < 4 {
        return Ok(None);
    }
    let len = u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
    if len > MAX_FRAME {
        return Err(WireError::Oversized {
            len,
            max: MAX_FRAME,
        });
    }
    Ok(Some(4 + len))
}

/// Decodes one frame from the start of `buf`: `Ok(None)` when `buf` does not hold a whole
/// frame yet, else the frame and the bytes it used.
pub fn decode(buf: &[u8]) -> Result<Option<(Frame, usize)>, WireError> {
    let Some(total) = frame_len(buf)? else {
        return Ok(None);
    };
    if buf.len() < total {
        return Ok(None);
    }
    let f = decode_body(&buf[4..total])?;
    Ok(Some((f, total)))
}

/// Decodes a frame without its length prefix (version, kind, body).
pub fn decode_body(b: &[u8]) -> Result<Frame, WireError> {
    if b.len() > MAX_FRAME {
        return Err(WireError::Oversized {
            len: b.len(),
            max: MAX_FRAME,
        });
    }
    if b.len() < 2 {
        return Err(WireError::TooShort { len: b.len() });
    }
    if b[0] != WIRE_VERSION {
        return Err(WireError::Version {
            got: b[0],
            want: WIRE_VERSION,
        });
    }
    let mut r = Reader { b: &b[2..] };
    let f = match b[1] {
        K_APPEND => {
            let term = r.u64("append term")?;
            let from = r.u32("append sender")?;
            let prev_index = r.u64("append prev_index")?;
            let prev_term = r.u64("append prev_term")?;
            let commit = r.u64("append commit")?;
            let n = r.u32("append entry count")? as usize;
            // Each entry has at least 20 bytes: refuse counts the frame cannot hold before
            // allocating.
            if n > r.b.len() / 20 {
                return Err(WireError::Truncated {
                    what: "append entries",
                    need: n.saturating_mul(20),
                    have: r.b.len(),
                });
            }
            let mut entries = Vec::with_capacity(n);
            let mut expect = prev_index;
            for _ in 0..n {
                let term = r.u64("entry term")?;
                let index = r.u64("entry index")?;
                let plen = r.u32("entry payload length")? as usize;
                let payload = r.bytes(plen, "entry payload")?.to_vec();
                expect = expect
                    .checked_add(1)
                    .ok_or(WireError::Malformed("entry index overflows"))?;
                if index != expect {
                    return Err(WireError::Malformed(
                        "entry indexes must follow prev_index consecutively",
                    ));
                }
                entries.push(Entry {
                    term,
                    index,
                    payload,
                });
            }
            Frame::Repl(Message::Append {
                term,
                from,
                prev_index,
                prev_term,
                commit,
                entries,
            })
        }
        K_APPEND_RESP => {
            let term = r.u64("response term")?;
            let from = r.u32("response sender")?;
            let success = match r.u8("response success flag")? {
                0 => false,
                1 => true,
                _ => return Err(WireError::Malformed("success flag is neither 0 nor 1")),
            };
            Frame::Repl(Message::AppendResp {
                term,
                from,
                success,
                match_index: r.u64("response match_index")?,
                commit: r.u64("response commit")?,
                last_index: r.u64("response last_index")?,
            })
        }
        K_CLIENT_WRITE => {
            let id = r.u64("write id")?;
            let plen = r.u32("write payload length")? as usize;
            let payload = r.bytes(plen, "write payload")?.to_vec();
            Frame::ClientWrite { id, payload }
        }
        K_CLIENT_ACK => Frame::ClientAck {
            id: r.u64("ack id")?,
            index: r.u64("ack index")?,
        },
        K_CLIENT_ERR => {
            let id = r.u64("error id")?;
            let mlen = r.u32("error message length")? as usize;
            let m = r.bytes(mlen, "error message")?;
            let message = String::from_utf8(m.to_vec())
                .map_err(|_| WireError::Malformed("error message is not UTF-8"))?;
            Frame::ClientErr { id, message }
        }
        K_STATUS_REQ => Frame::StatusReq,
        K_STATUS => {
            let id = r.u32("status id")?;
            let primary = match r.u8("status primary flag")? {
                0 => false,
                1 => true,
                _ => return Err(WireError::Malformed("primary flag is neither 0 nor 1")),
            };
            Frame::Status(Status {
                id,
                primary,
                term: r.u64("status term")?,
                last_index: r.u64("status last_index")?,
                durable_index: r.u64("status durable_index")?,
                commit: r.u64("status commit")?,
                applied: r.u64("status applied")?,
            })
        }
        k => return Err(WireError::UnknownKind(k)),
    };
    if !r.b.is_empty() {
        return Err(WireError::Trailing(r.b.len()));
    }
    Ok(f)
}

fn put64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_le_bytes());
}
fn put32(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_le_bytes());
}

struct Reader<'a> {
    b: &'a [u8],
}

impl<'a> Reader<'a> {
    fn bytes(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], WireError> {
        if self.b.len() < n {
            return Err(WireError::Truncated {
                what,
                need: n - self.b.len(),
                have: self.b.len(),
            });
        }
        let (h, t) = self.b.split_at(n);
        self.b = t;
        Ok(h)
    }
    fn u8(&mut self, what: &'static str) -> Result<u8, WireError> {
        Ok(self.bytes(1, what)?[0])
    }
    fn u32(&mut self, what: &'static str) -> Result<u32, WireError> {
        let b = self.bytes(4, what)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self, what: &'static str) -> Result<u64, WireError> {
        let b = self.bytes(8, what)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }
}
