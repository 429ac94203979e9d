//! The wire protocol: one JSON object per line over TCP (client ↔ VIP holder, holder ↔
//! block service, block service → VIP), and one JSON datagram per heartbeat over UDP
//! between dispatchers. Lines are limited to [`MAX_LINE`] bytes; anything that does not
//! parse is a [`WireError::Malformed`] naming what was wrong. A server reads with
//! [`Conn::recv_or_refuse`], which answers a malformed or over-long line with one refusal
//! ([`Msg::refusal`]) and ends the conversation; the client takes a refusal as final.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;

use serde::{Deserialize, Serialize};

use super::dispatcher::Epoch;
use crate::jsonl::{self, LineError};

/// Longest accepted line.
pub const MAX_LINE: usize = 1 << 20;

/// A management operation that changes volumes (journaled, at most once per operation id).
/// Listing is not an operation: see [`Msg::List`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Op {
    Create { name: String, size: u64 },
    Delete { name: String },
    Copy { src: String, dst: String },
}

impl Op {
    pub fn kind(&self) -> &'static str {
        match self {
            Op::Create { .. } => "create",
            Op::Delete { .. } => "delete",
            Op::Copy { .. } => "copy",
        }
    }
}

/// A volume as reported to clients.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeInfo {
    pub name: String,
    pub size: u64,
}

/// What an operation produced.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum OpResult {
    Created {
        name: String,
        size: u64,
    },
    Deleted {
        name: String,
    },
    Copied {
        src: String,
        dst: String,
        bytes: u64,
    },
    Error {
        message: String,
    },
}

impl OpResult {
    pub fn is_ok(&self) -> bool {
        !matches!(self, OpResult::Error { .. })
    }
    /// An error result with this message.
    pub fn error(message: impl Into<String>) -> OpResult {
        OpResult::Error {
            message: message.into(),
        }
    }
}

/// Every TCP message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "msg", rename_all = "snake_case")]
pub enum Msg {
    /// Client → VIP holder (or a node, in `client_retry`). `tag` groups the attempts of one
    /// logical operation for accounting (the experiment); it changes nothing.
    Request {
        op_id: String,
        op: Op,
        #[serde(default)]
        tag: Option<String>,
    },
    /// The answer to a request, with the operation id it belongs to.
    Reply {
        op_id: String,
        result: OpResult,
    },
    /// Holder → block service: run this operation (at most once per op id). With
    /// `session_bound` (the `client_retry` baseline) the service abandons the operation if
    /// this connection closes before it finished.
    Submit {
        op_id: String,
        op: Op,
        epoch: Epoch,
        node: u32,
        session_bound: bool,
        #[serde(default)]
        tag: Option<String>,
    },
    /// Service → holder → client: the operation is running; the result comes later on
    /// this connection, or, if it is gone, as a `Deliver` to the VIP. Repeated every
    /// [`KEEPALIVE`] while the operation runs, so a silent connection means a dead peer,
    /// not a long copy.
    Accepted {
        op_id: String,
    },
    /// Service → holder: refused without running (stale epoch); the holder must not answer
    /// the client (it is no longer authoritative).
    Fenced {
        op_id: String,
        current: Epoch,
    },
    /// Service → VIP: the result of an operation whose submitter went away (with the
    /// operation, so the holder answers a re-send only if its arguments match).
    Deliver {
        op_id: String,
        op: Op,
        result: OpResult,
    },
    Ack {
        op_id: String,
    },
    /// Holder → service on takeover.
    Claim {
        epoch: Epoch,
        node: u32,
    },
    /// Node → its block service: liveness probe (as an rbd client's watch would).
    Ping {
        node: u32,
    },
    Pong,
    /// Client → holder → service: the volumes now (not journaled, no operation id).
    List,
    /// The answer to `List`.
    Listed {
        volumes: Vec<VolumeInfo>,
    },
}

/// How often the service repeats `Accepted` while an operation runs.
pub const KEEPALIVE: std::time::Duration = std::time::Duration::from_millis(100);

impl Msg {
    /// The reply that refuses a request (`op_id` may be empty when it could not be read).
    pub fn refusal(op_id: impl Into<String>, message: impl Into<String>) -> Msg {
        Msg::Reply {
            op_id: op_id.into(),
            result: OpResult::error(message),
        }
    }
    /// The refusal of a message this end does not take.
    pub fn unexpected(&self) -> Msg {
        Msg::refusal("", format!("unexpected message {self:?}"))
    }
}

/// Errors of the wire layer.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("connection closed")]
    Closed,
    #[error("malformed message: {0}")]
    Malformed(String),
    #[error("message longer than {MAX_LINE} bytes")]
    TooLong,
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// Reads one message; `Closed` at a clean end of stream.
pub fn read_msg<R: BufRead>(r: &mut R) -> Result<Msg, WireError> {
    match jsonl::recv_limited(r, MAX_LINE) {
        Ok(Some(m)) => Ok(m),
        Ok(None) => Err(WireError::Closed),
        Err(LineError::TooLong(_)) => Err(WireError::TooLong),
        Err(LineError::Truncated) => Err(WireError::Malformed("truncated line".into())),
        Err(LineError::Malformed(e)) => Err(WireError::Malformed(e)),
        Err(LineError::Io(e)) => Err(WireError::Io(e)),
    }
}

/// Writes one message (one line) and flushes.
pub fn write_msg<W: Write>(w: &mut W, m: &Msg) -> Result<(), WireError> {
    Ok(jsonl::send(w, m)?)
}

/// A connection with a buffered reader over a clone of the stream.
#[derive(Debug)]
pub struct Conn {
    pub stream: TcpStream,
    reader: BufReader<TcpStream>,
}

impl Conn {
    pub fn new(stream: TcpStream) -> std::io::Result<Conn> {
        stream.set_nodelay(true)?;
        let reader = BufReader::new(stream.try_clone()?);
        Ok(Conn { stream, reader })
    }
    pub fn send(&mut self, m: &Msg) -> Result<(), WireError> {
        write_msg(&mut self.stream, m)
    }
    pub fn recv(&mut self) -> Result<Msg, WireError> {
        read_msg(&mut self.reader)
    }
    /// Reads the next message of a conversation this end serves. A malformed or over-long
    /// line is answered with one refusal and ends the conversation (`Ok(None)`), as does a
    /// clean close; other errors (time-outs, resets) are returned.
    pub fn recv_or_refuse(&mut self) -> Result<Option<Msg>, WireError> {
        match self.recv() {
            Ok(m) => Ok(Some(m)),
            Err(WireError::Closed) => Ok(None),
            Err(e @ (WireError::Malformed(_) | WireError::TooLong)) => {
                self.send(&Msg::refusal("", format!("malformed request: {e}")))?;
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_malformed() {
        let m = Msg::Request {
            op_id: "a1".into(),
            op: Op::Copy {
                src: "v".into(),
                dst: "w".into(),
            },
            tag: None,
        };
        let mut buf = Vec::new();
        write_msg(&mut buf, &m).unwrap();
        assert_eq!(read_msg(&mut &buf[..]).unwrap(), m);
        for bad in [
            &b"not json\n"[..],
            b"{\"msg\":\"request\"}\n",
            b"{\"msg\":\"request\",\"op_id\":\"x\",\"op\":{\"kind\":\"explode\"}}\n",
        ] {
            assert!(matches!(
                read_msg(&mut &bad[..]),
                Err(WireError::Malformed(_))
            ));
        }
        assert!(matches!(read_msg(&mut &b""[..]), Err(WireError::Closed)));
        assert!(matches!(
            read_msg(&mut &b"{\"msg\":"[..]),
            Err(WireError::Malformed(_))
        ));
        // `list` is no longer an operation kind.
        assert!(matches!(
            read_msg(
                &mut &b"{\"msg\":\"request\",\"op_id\":\"x\",\"op\":{\"kind\":\"list\"}}\n"[..]
            ),
            Err(WireError::Malformed(_))
        ));
    }

    #[test]
    fn over_long_and_malformed_lines_get_one_refusal_and_end_the_conversation() {
        use std::net::TcpListener;
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let server = std::thread::spawn(move || {
            let mut answers = Vec::new();
            for _ in 0..2 {
                let (s, _) = l.accept().unwrap();
                let mut c = Conn::new(s).unwrap();
                answers.push(c.recv_or_refuse().unwrap());
            }
            answers
        });
        for mut bad in [vec![b'x'; MAX_LINE + 10], b"{\"msg\":\"nope\"}".to_vec()] {
            bad.push(b'\n');
            let mut s = TcpStream::connect(addr).unwrap();
            // The server may stop reading the over-long line before it all went out.
            let _ = s.write_all(&bad);
            let mut c = Conn::new(s).unwrap();
            match c.recv().unwrap() {
                Msg::Reply {
                    op_id,
                    result: OpResult::Error { message },
                } => {
                    assert_eq!(op_id, "");
                    assert!(message.starts_with("malformed request"), "{message}");
                }
                other => panic!("{other:?}"),
            }
            // Then the server ends the conversation (a reset if it left bytes unread).
            assert!(c.recv().is_err());
        }
        assert_eq!(server.join().unwrap(), vec![None, None]);
    }
}
