//! The messages of the allocation ports, all JSON lines over TCP: a node's internal port
//! ([`NodeRequest`], served by its leader, [`super::node`]), the index server
//! ([`IndexRequest`], [`super::index`]) and a process's external port ([`StoreRequest`],
//! [`super::store`]); the replies they share ([`Reply`]), and the client call.
//!
//! Every reply is one line: `{"ok": true, ...}` with the fields of the request's answer
//! ([`Done`], [`Registered`], [`DeviceAdded`], [`Routed`], [`Located`], [`Records`],
//! [`Stored`]), or `{"ok": false, "kind": ..., "error": ...}` ([`Refusal`]), whose
//! [`ErrorKind`] (when present) is something the client can act on. A line that is not a
//! valid request is refused with kind `bad_request`; the connection stays open, unless the
//! line was over [`MAX_REQUEST_LINE`] bytes.

use std::io::{BufRead, BufReader};
use std::net::TcpStream;
use std::path::PathBuf;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::region::DeviceSpec;
use super::AllocError;
use crate::jsonl::server::{self, Answer, Conn};
use crate::jsonl::LineError;

/// Longest request line the allocation ports accept.
pub const MAX_REQUEST_LINE: usize = 64 << 10;

/// Requests on a node's internal port (to its leader).
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum NodeRequest {
    /// Answered with [`Registered`]; the connection then stays open for the life of the
    /// follower.
    Register {
        proc_id: u16,
        pid: u32,
        /// The process's existing segment (a restart), if any: the process holds its
        /// owner lock.
        existing: Option<PathBuf>,
    },
    /// Answered with [`DeviceAdded`].
    DeviceOnline {
        device: DeviceSpec,
    },
    DeviceOffline {
        dev: u16,
    },
}

/// Requests to the index server.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum IndexRequest {
    RegisterProcess {
        node: String,
        proc_id: u16,
        endpoint: String,
    },
    /// Answered with [`Routed`].
    Route {
        channel: u64,
        exclude: Vec<String>,
    },
    Unreachable {
        node: String,
        endpoint: String,
    },
    NodeFull {
        node: String,
    },
    Record {
        channel: u64,
        loc: Location,
    },
    /// Answered with [`Located`].
    Lookup {
        channel: u64,
    },
    /// Answered with [`Records`].
    Records,
    /// Forwarded to one of the node's processes; answered with its [`DeviceAdded`].
    DeviceOnline {
        node: String,
        device: DeviceSpec,
    },
}

/// Requests on a process's external port.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum StoreRequest {
    /// Followed by `len` bytes of data; answered with [`Stored`].
    Store { channel: u64, len: u64 },
    /// The index server says a device came online on this node; answered with
    /// [`DeviceAdded`].
    DeviceOnline { device: DeviceSpec },
}

/// Where a piece of a channel's data lives.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Location {
    pub node: String,
    pub device: PathBuf,
    pub dev: u16,
    pub block: u32,
    /// Byte offset of the data on the device.
    pub device_offset: u64,
    /// Offset of the data inside its block.
    pub offset_in_block: u64,
    pub len: u64,
}

/// The answer of a request that only succeeds or fails.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Done {}

/// A process registered with its leader.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Registered {
    pub proc_seg: PathBuf,
    /// Blocks returned for the process's previous incarnation.
    pub recovered_blocks: usize,
}

/// A device is online, with this index.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceAdded {
    pub dev: u16,
}

/// Where a channel's data goes: a node and one of its processes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Routed {
    pub node: String,
    pub endpoint: String,
}

/// Every piece stored for a channel, in store order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Located {
    pub locs: Vec<Location>,
}

/// Every record of the index, by channel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Records {
    pub records: Vec<(u64, Location)>,
}

/// Where a store put its data.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stored {
    pub loc: Location,
}

/// The answer a port sends, whichever request it was.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum Body {
    Done(Done),
    Registered(Registered),
    DeviceAdded(DeviceAdded),
    Routed(Routed),
    Located(Located),
    Records(Records),
    Stored(Stored),
}

/// Refusals a client can act on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// The line was not a valid request.
    BadRequest,
    NotFound,
    ClusterFull,
    NodeFull,
    TooLarge,
    NoNode,
}

/// A refused request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refusal {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<ErrorKind>,
    pub error: String,
}

/// A reply: the request's answer, or its refusal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply<T> {
    Ok(T),
    Refused(Refusal),
}

impl<T> Reply<T> {
    pub fn refused(kind: Option<ErrorKind>, error: impl std::fmt::Display) -> Reply<T> {
        Reply::Refused(Refusal {
            kind,
            error: error.to_string(),
        })
    }

    /// The answer; a refusal becomes [`AllocError::Protocol`] with its text.
    pub fn into_result(self) -> Result<T, AllocError> {
        match self {
            Reply::Ok(t) => Ok(t),
            Reply::Refused(r) => Err(AllocError::Protocol(r.error)),
        }
    }

    /// The answer as the port's [`Body`].
    pub fn into_body(self) -> Reply<Body>
    where
        T: Into<Body>,
    {
        match self {
            Reply::Ok(t) => Reply::Ok(t.into()),
            Reply::Refused(r) => Reply::Refused(r),
        }
    }
}

impl<T, E: std::fmt::Display> From<Result<T, E>> for Reply<T> {
    /// An error becomes a refusal without a kind.
    fn from(r: Result<T, E>) -> Reply<T> {
        match r {
            Ok(t) => Reply::Ok(t),
            Err(e) => Reply::refused(None, e),
        }
    }
}

macro_rules! into_body {
    ($($t:ident),*) => {
        $(impl From<$t> for Body {
            fn from(t: $t) -> Body {
                Body::$t(t)
            }
        })*
    };
}
into_body!(
    Done,
    Registered,
    DeviceAdded,
    Routed,
    Located,
    Records,
    Stored
);

/// How a reply is written: `ok` beside the answer's (or the refusal's) fields.
#[derive(Serialize)]
struct WireOut<'a, B> {
    ok: bool,
    #[serde(flatten)]
    body: &'a B,
}

impl<T: Serialize> Serialize for Reply<T> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Reply::Ok(body) => WireOut { ok: true, body }.serialize(s),
            Reply::Refused(body) => WireOut { ok: false, body }.serialize(s),
        }
    }
}

impl<'de, T: DeserializeOwned> Deserialize<'de> for Reply<T> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        struct WireIn {
            ok: bool,
            #[serde(flatten)]
            rest: serde_json::Map<String, serde_json::Value>,
        }
        let w = WireIn::deserialize(d)?;
        let rest = serde_json::Value::Object(w.rest);
        let r = match w.ok {
            true => T::deserialize(rest).map(Reply::Ok),
            false => Refusal::deserialize(rest).map(Reply::Refused),
        };
        r.map_err(serde::de::Error::custom)
    }
}

pub(crate) use crate::jsonl::send;

/// One reply (`None` at a clean end of stream), as an allocation error.
pub(crate) fn recv_reply<T: DeserializeOwned>(
    r: &mut impl BufRead,
) -> Result<Option<Reply<T>>, AllocError> {
    crate::jsonl::recv(r).map_err(|e| match e {
        LineError::Io(e) => AllocError::net("reading a message", e),
        e => AllocError::Protocol(e.to_string()),
    })
}

/// Sends one request to `addr` (on a connection of its own) and reads the reply.
pub fn call<Q: Serialize, T: DeserializeOwned>(
    addr: &str,
    req: &Q,
) -> Result<Reply<T>, AllocError> {
    let mut s = TcpStream::connect(addr)
        .map_err(|e| AllocError::net(format!("connecting to {addr}"), e))?;
    send(&mut s, req).map_err(|e| AllocError::net(format!("sending to {addr}"), e))?;
    recv_reply(&mut BufReader::new(s))?
        .ok_or_else(|| AllocError::Protocol(format!("{addr} closed the connection")))
}

/// Serves the requests of one connection of an allocation port: each goes to `handle`
/// (with the connection's reader, for data that follows a request); a line that is not a
/// request is refused with [`ErrorKind::BadRequest`].
pub(super) fn converse<Q: DeserializeOwned>(
    conn: &mut Conn<TcpStream>,
    mut handle: impl FnMut(Q, &mut BufReader<TcpStream>) -> Answer<Reply<Body>>,
) {
    server::converse(conn, MAX_REQUEST_LINE, |req, r| match req {
        Ok(q) => handle(q, r),
        Err(e) => {
            let error = match e {
                LineError::Malformed(m) => format!("malformed request: {m}"),
                e => e.to_string(),
            };
            Answer::Reply(Reply::refused(Some(ErrorKind::BadRequest), error))
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_carry_ok_beside_the_answer_or_the_refusal() {
        let ok: Reply<Body> = Reply::Ok(Body::DeviceAdded(DeviceAdded { dev: 3 }));
        let line = serde_json::to_string(&ok).unwrap();
        assert_eq!(line, r#"{"ok":true,"dev":3}"#);
        let back: Reply<DeviceAdded> = serde_json::from_str(&line).unwrap();
        assert_eq!(back, Reply::Ok(DeviceAdded { dev: 3 }));
        let done = serde_json::to_string(&Reply::Ok(Body::Done(Done {}))).unwrap();
        assert_eq!(done, r#"{"ok":true}"#);
        let no: Reply<Body> = Reply::refused(Some(ErrorKind::NodeFull), "full");
        let line = serde_json::to_string(&no).unwrap();
        assert_eq!(line, r#"{"ok":false,"kind":"node_full","error":"full"}"#);
        let back: Reply<Stored> = serde_json::from_str(&line).unwrap();
        assert_eq!(back, Reply::refused(Some(ErrorKind::NodeFull), "full"));
        let plain: Reply<Done> = serde_json::from_str(r#"{"ok":false,"error":"x"}"#).unwrap();
        assert_eq!(
            plain.into_result().unwrap_err().to_string(),
            "protocol error: x"
        );
        // An answer without the fields the client expects is an error, not a default.
        assert!(serde_json::from_str::<Reply<Stored>>(r#"{"ok":true}"#).is_err());
    }
}
