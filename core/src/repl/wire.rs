//! The wire format: length-prefixed binary frames with a version byte.
//!
//! ```text
//! frame   = len:u32le  version:u8  kind:u8  body        (len counts version+kind+body)
//! Hello      (0) = id:u32
//! Append     (1) = term:u64 from:u32 prev_index:u64 prev_term:u64 commit:u64 n:u32 entry*n
//! entry          = term:u64 index:u64 plen:u32 payload[plen]
//! AppendResp (2) = term:u64 from:u32 outcome:u8 match_index:u64 commit:u64 last_index:u64
//!                  [need:u64 left:u64 when outcome = 2]
//!                  (outcome 0: mismatch, 1: ok, 2: log full)
//! ClientWrite(3) = id:u64 plen:u32 payload[plen]
//! ClientAck  (4) = id:u64 index:u64
//! ClientErr  (5) = id:u64 mlen:u32 utf8[mlen]
//! StatusReq  (6) = (empty)
//! Status     (7) = id:u32 primary:u8 term:u64 last_index:u64 durable:u64 commit:u64 applied:u64
//! ```
//!
//! All integers little-endian. A replica opening a connection to another sends `Hello`
//! first and the other answers with its own. `Hello`'s layout is frozen: it is decoded
//! whatever version byte it carries (the byte is the sender's version), so two builds of
//! different versions can tell each other so instead of failing on the first frame. The
//! decoder never panics: a truncated, oversized, garbage or other-version frame is a
//! [`WireError`] naming what is wrong. The encoder refuses a frame larger than
//! [`MAX_FRAME`].

use std::io::Read;
use std::sync::Arc;

use super::protocol::{
    AppendOutcome, Entry, Message, NodeId, DEFAULT_MAX_BATCH_BYTES, DEFAULT_MAX_BATCH_ENTRIES,
};

/// The version this build speaks (2: `Hello`, the append outcome with its reason).
pub const WIRE_VERSION: u8 = 2;
/// Largest frame accepted (version+kind+body), 16 MiB.
pub const MAX_FRAME: usize = 16 << 20;

/// A frame that cannot be encoded or decoded.
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

/// Reading a frame from a stream failed.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Wire(#[from] WireError),
}

/// Everything that travels between replicas and between clients and the primary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// The first frame on a connection between replicas, each way: who is speaking and
    /// which wire version it speaks.
    Hello {
        version: u8,
        id: NodeId,
    },
    /// Replica-to-replica protocol message.
    Repl(Message),
    /// A client asks the primary to replicate `payload`.
    ClientWrite {
        id: u64,
        payload: Arc<[u8]>,
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

impl Frame {
    /// This build's `Hello` for replica `id`.
    pub fn hello(id: NodeId) -> Frame {
        Frame::Hello {
            version: WIRE_VERSION,
            id,
        }
    }
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

const K_HELLO: u8 = 0;
const K_APPEND: u8 = 1;
const K_APPEND_RESP: u8 = 2;
const K_CLIENT_WRITE: u8 = 3;
const K_CLIENT_ACK: u8 = 4;
const K_CLIENT_ERR: u8 = 5;
const K_STATUS_REQ: u8 = 6;
const K_STATUS: u8 = 7;

const OUTCOME_MISMATCH: u8 = 0;
const OUTCOME_OK: u8 = 1;
const OUTCOME_LOG_FULL: u8 = 2;

/// Bytes of an `Append` frame (version and kind included) before its entries.
const APPEND_OVERHEAD: usize = 2 + 8 + 4 + 8 + 8 + 8 + 4;
/// Bytes of an entry in an `Append` besides its payload.
const ENTRY_OVERHEAD: usize = 8 + 8 + 4;
// The largest append the protocol builds by default fits a frame with room to spare.
const _: () = assert!(
    APPEND_OVERHEAD + DEFAULT_MAX_BATCH_ENTRIES * ENTRY_OVERHEAD + DEFAULT_MAX_BATCH_BYTES
        <= MAX_FRAME / 4
);

/// Appends the encoded frame of `f` (length prefix included) to `out`. A frame larger than
/// [`MAX_FRAME`] is refused and `out` is left as it was.
pub fn encode(f: &Frame, out: &mut Vec<u8>) -> Result<(), WireError> {
    let start = out.len();
    out.extend_from_slice(&[0; 4]);
    match f {
        Frame::Hello { version, id } => {
            out.push(*version);
            out.push(K_HELLO);
            put32(out, *id);
        }
        Frame::Repl(m) => {
            out.push(WIRE_VERSION);
            encode_message_body(m, out);
        }
        Frame::ClientWrite { id, payload } => {
            out.extend_from_slice(&[WIRE_VERSION, K_CLIENT_WRITE]);
            put64(out, *id);
            put32(out, payload.len() as u32);
            out.extend_from_slice(payload);
        }
        Frame::ClientAck { id, index } => {
            out.extend_from_slice(&[WIRE_VERSION, K_CLIENT_ACK]);
            put64(out, *id);
            put64(out, *index);
        }
        Frame::ClientErr { id, message } => {
            out.extend_from_slice(&[WIRE_VERSION, K_CLIENT_ERR]);
            put64(out, *id);
            put32(out, message.len() as u32);
            out.extend_from_slice(message.as_bytes());
        }
        Frame::StatusReq => out.extend_from_slice(&[WIRE_VERSION, K_STATUS_REQ]),
        Frame::Status(s) => {
            out.extend_from_slice(&[WIRE_VERSION, K_STATUS]);
            put32(out, s.id);
            out.push(s.primary as u8);
            put64(out, s.term);
            put64(out, s.last_index);
            put64(out, s.durable_index);
            put64(out, s.commit);
            put64(out, s.applied);
        }
    }
    finish(out, start)
}

/// Appends the encoded `Repl` frame of `m` (what [`encode`] writes for `Frame::Repl(m)`)
/// without needing to own the message.
pub fn encode_message(m: &Message, out: &mut Vec<u8>) -> Result<(), WireError> {
    let start = out.len();
    out.extend_from_slice(&[0; 4]);
    out.push(WIRE_VERSION);
    encode_message_body(m, out);
    finish(out, start)
}

fn finish(out: &mut Vec<u8>, start: usize) -> Result<(), WireError> {
    let len = out.len() - start - 4;
    if len > MAX_FRAME {
        out.truncate(start);
        return Err(WireError::Oversized {
            len,
            max: MAX_FRAME,
        });
    }
    out[start..start + 4].copy_from_slice(&(len as u32).to_le_bytes());
    Ok(())
}

fn encode_message_body(m: &Message, out: &mut Vec<u8>) {
    match m {
        Message::Append {
            term,
            from,
            prev_index,
            prev_term,
            commit,
            entries,
        } => {
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
        Message::AppendResp {
            term,
            from,
            outcome,
            match_index,
            commit,
            last_index,
        } => {
            out.push(K_APPEND_RESP);
            put64(out, *term);
            put32(out, *from);
            out.push(match outcome {
                AppendOutcome::Mismatch => OUTCOME_MISMATCH,
                AppendOutcome::Ok => OUTCOME_OK,
                AppendOutcome::LogFull { .. } => OUTCOME_LOG_FULL,
            });
            put64(out, *match_index);
            put64(out, *commit);
            put64(out, *last_index);
            if let AppendOutcome::LogFull { need, left } = outcome {
                put64(out, *need);
                put64(out, *left);
            }
        }
    }
}

/// Encodes one frame into a fresh buffer.
pub fn encode_to_vec(f: &Frame) -> Result<Vec<u8>, WireError> {
    let mut v = Vec::new();
    encode(f, &mut v)?;
    Ok(v)
}

/// Length of the frame at the start of `buf`, if its length prefix is complete:
/// `Ok(Some(total))` (prefix included), `Ok(None)` when fewer than 4 bytes are there,
/// an error when the prefix announces an oversized frame.
fn frame_len(buf: &[u8]) -> Result<Option<usize>, WireError> {
    if buf.len() < 4 {
        return Ok(None);
    }
    let len = u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
    check_len(len)?;
    Ok(Some(4 + len))
}

fn check_len(len: usize) -> Result<(), WireError> {
    if len > MAX_FRAME {
        return Err(WireError::Oversized {
            len,
            max: MAX_FRAME,
        });
    }
    Ok(())
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

/// Reads one frame from a stream, using `body` as the buffer for its bytes. `Ok(None)` at
/// a clean end of stream (between frames); a stream that ends inside a frame, its length
/// prefix included, is [`WireError::Truncated`].
pub fn read_frame(r: &mut impl Read, body: &mut Vec<u8>) -> Result<Option<Frame>, ReadError> {
    let mut len = [0u8; 4];
    match read_full(r, &mut len)? {
        0 => return Ok(None),
        4 => {}
        have => {
            return Err(WireError::Truncated {
                what: "length prefix (connection closed)",
                need: 4 - have,
                have,
            }
            .into())
        }
    }
    let n = u32::from_le_bytes(len) as usize;
    check_len(n)?;
    body.resize(n, 0);
    let have = read_full(r, body)?;
    if have < n {
        return Err(WireError::Truncated {
            what: "frame (connection closed)",
            need: n - have,
            have,
        }
        .into());
    }
    Ok(Some(decode_body(body)?))
}

/// Reads until `buf` is full or the stream ends; returns the bytes read.
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

/// Decodes a frame without its length prefix (version, kind, body).
pub fn decode_body(b: &[u8]) -> Result<Frame, WireError> {
    check_len(b.len())?;
    if b.len() < 2 {
        return Err(WireError::TooShort { len: b.len() });
    }
    let mut r = Reader { b: &b[2..] };
    if b[1] == K_HELLO {
        // Frozen layout: decoded whatever the version, so a mismatch can be reported.
        let id = r.u32("hello id")?;
        r.end()?;
        return Ok(Frame::Hello { version: b[0], id });
    }
    if b[0] != WIRE_VERSION {
        return Err(WireError::Version {
            got: b[0],
            want: WIRE_VERSION,
        });
    }
    let f = match b[1] {
        K_APPEND => {
            let term = r.u64("append term")?;
            let from = r.u32("append sender")?;
            let prev_index = r.u64("append prev_index")?;
            let prev_term = r.u64("append prev_term")?;
            let commit = r.u64("append commit")?;
            let n = r.u32("append entry count")? as usize;
            // Each entry has at least ENTRY_OVERHEAD bytes: refuse counts the frame cannot
            // hold before allocating.
            if n > r.b.len() / ENTRY_OVERHEAD {
                return Err(WireError::Truncated {
                    what: "append entries",
                    need: n.saturating_mul(ENTRY_OVERHEAD),
                    have: r.b.len(),
                });
            }
            let mut entries = Vec::with_capacity(n);
            let mut expect = prev_index;
            for _ in 0..n {
                let term = r.u64("entry term")?;
                let index = r.u64("entry index")?;
                let plen = r.u32("entry payload length")? as usize;
                let payload = Arc::from(r.bytes(plen, "entry payload")?);
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
            let code = r.u8("response outcome")?;
            let match_index = r.u64("response match_index")?;
            let commit = r.u64("response commit")?;
            let last_index = r.u64("response last_index")?;
            let outcome = match code {
                OUTCOME_MISMATCH => AppendOutcome::Mismatch,
                OUTCOME_OK => AppendOutcome::Ok,
                OUTCOME_LOG_FULL => AppendOutcome::LogFull {
                    need: r.u64("response bytes needed")?,
                    left: r.u64("response bytes left")?,
                },
                _ => return Err(WireError::Malformed("unknown append outcome")),
            };
            Frame::Repl(Message::AppendResp {
                term,
                from,
                outcome,
                match_index,
                commit,
                last_index,
            })
        }
        K_CLIENT_WRITE => {
            let id = r.u64("write id")?;
            let plen = r.u32("write payload length")? as usize;
            let payload = Arc::from(r.bytes(plen, "write payload")?);
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
    r.end()?;
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
    fn end(&self) -> Result<(), WireError> {
        if !self.b.is_empty() {
            return Err(WireError::Trailing(self.b.len()));
        }
        Ok(())
    }
}
