//! Coordination backends: a small, ZooKeeper-shaped tree of versioned nodes that several
//! processes (or threads) of a blocklab cluster share.
//!
//! # The model
//!
//! The store is a tree of *nodes* addressed by absolute paths (`/blocklab/c1/lunmap`).
//! Every node holds a byte string (`data`) and a data *version* that starts at 0 and grows by
//! one on every [`Coord::set`]. A node is either *persistent* (it lives until deleted) or
//! *ephemeral* (it is deleted automatically when the session that created it ends; it may not
//! have children). A node can only be created when its parent exists; [`ensure_path`] creates
//! missing ancestors.
//!
//! Every handle implementing [`Coord`] is one *session*. Dropping the handle (or
//! [`Coord::close`]) ends the session at once and removes its ephemeral nodes. A process that
//! dies without closing loses its session after the session timeout (ZooKeeper) or at once
//! (embedded: the store lives in the process).
//!
//! # Operations
//!
//! - [`Coord::create`], [`Coord::get`], [`Coord::exists`], [`Coord::set`], [`Coord::delete`],
//!   [`Coord::children`]. `set` and `delete` take an optional expected version: with
//!   `Some(v)` they fail with [`CoordError::BadVersion`] unless the node's version is `v`
//!   (optimistic concurrency: read, compute, write back with the version you read).
//! - [`Coord::multi`]: a list of [`Op`]s (check version, create, set, delete) applied
//!   atomically: all of them or none. On failure the error is [`CoordError::MultiFailed`]
//!   naming the index of the first failing operation; nothing was changed.
//! - [`Coord::watch`]: a persistent, recursive watch on a subtree. The returned [`Watch`]
//!   delivers one [`WatchEvent`] per change of any node in the subtree (created, data
//!   changed, deleted), in the order the store applied them. Events carry the path only;
//!   read the node to learn its data. [`WatchEvent::Resync`] means events may have been
//!   missed (the ZooKeeper connection was lost and re-established): re-read the subtree.
//!   [`WatchEvent::SessionLost`] means the session expired: ephemerals of this handle are
//!   gone, open a new handle.
//!
//! - [`Coord::sync`]: catch up with every acknowledged change before the next read (reads
//!   of a ZooKeeper session may otherwise lag behind another session's acknowledged write).
//! - [`Coord::read_many`]: several reads (data or children) in one round trip (ZooKeeper's
//!   `multiRead`), answered from one consistent state; a missing node is a per-read
//!   [`ReadResult::NoNode`], not an error of the whole call.
//! - [`Coord::ensure_path`] (and the free [`ensure_path`]): create a path and its missing
//!   ancestors; one read when the path exists already.
//!
//! All methods are synchronous and may be called from any thread (`Coord: Send + Sync`);
//! the ZooKeeper backend runs its client on an internal tokio runtime.
//!
//! # Backends
//!
//! - [`embedded`]: in-process, persisted to one file (written to a temporary file, fsynced
//!   and renamed before any operation returns). The default: needs nothing installed. A
//!   store file is owned by one process at a time (a lock file enforces it); within that
//!   process [`connect`] hands out new sessions of the store already open. A corrupt
//!   store file is refused and never overwritten.
//! - [`zookeeper`]: a real ZooKeeper (≥ 3.6, for persistent recursive watches) through the
//!   `zookeeper-client` crate, `multi` for atomic changes.
//!
//! Select a backend with a [`CoordSpec`] string: `embedded:PATH` or
//! `zk://host:port[,host:port...][/chroot]`, and [`connect`].
//!
//! [`zk_server`] starts a private ZooKeeper server for tests and experiments.

pub mod embedded;
pub mod path;
pub mod zk_server;
pub mod zookeeper;

use std::sync::mpsc;
use std::time::Duration;

pub use path::validate_path;

/// Errors of the coordination backends.
#[derive(Debug, thiserror::Error)]
pub enum CoordError {
    #[error("no node {0}")]
    NoNode(String),
    #[error("node {0} already exists")]
    NodeExists(String),
    #[error("version mismatch on {path}: expected {expected}")]
    BadVersion { path: String, expected: i32 },
    #[error("node {0} has children")]
    NotEmpty(String),
    #[error("node {0} is ephemeral and cannot have children")]
    NoChildrenForEphemerals(String),
    #[error("invalid path {path:?}: {reason}")]
    InvalidPath { path: String, reason: &'static str },
    #[error("atomic operation failed at op {index}: {cause}")]
    MultiFailed {
        index: usize,
        cause: Box<CoordError>,
    },
    #[error("invalid coordination spec {spec:?}: {reason}")]
    InvalidSpec { spec: String, reason: String },
    #[error(
        "ZooKeeper at {servers} unreachable after {attempts} attempts over {waited_ms} ms: {last}"
    )]
    Unreachable {
        servers: String,
        attempts: u32,
        waited_ms: u64,
        last: String,
    },
    #[error("ZooKeeper connection lost")]
    ConnectionLoss,
    #[error("coordination session expired")]
    SessionExpired,
    #[error("ZooKeeper error on {path}: {message}")]
    Zk { path: String, message: String },
    #[error(
        "embedded store {path} is corrupt ({reason}); refusing to open it (it was left untouched)"
    )]
    CorruptStore { path: String, reason: String },
    #[error("embedded store {path} is in use by another process (lock {lock})")]
    StoreLocked { path: String, lock: String },
    #[error("I/O error on {path}: {cause}")]
    Io { path: String, cause: std::io::Error },
    #[error("ZooKeeper server: {0}")]
    Server(String),
}

pub type Result<T, E = CoordError> = std::result::Result<T, E>;

/// What a node is, as returned by reads and writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stat {
    /// Data version: 0 after create, +1 per `set`.
    pub version: i32,
    /// Session that owns this node if it is ephemeral.
    pub ephemeral_owner: Option<u64>,
    /// Number of direct children.
    pub num_children: u32,
}

/// Lifetime of a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeKind {
    Persistent,
    /// Removed when the creating session ends.
    Ephemeral,
}

/// One operation of an atomic [`Coord::multi`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Fails unless the node exists with this version.
    Check { path: String, version: i32 },
    Create {
        path: String,
        data: Vec<u8>,
        kind: NodeKind,
    },
    /// `version: None` sets unconditionally.
    Set {
        path: String,
        data: Vec<u8>,
        version: Option<i32>,
    },
    /// `version: None` deletes unconditionally.
    Delete { path: String, version: Option<i32> },
}

impl Op {
    pub fn path(&self) -> &str {
        match self {
            Op::Check { path, .. }
            | Op::Create { path, .. }
            | Op::Set { path, .. }
            | Op::Delete { path, .. } => path,
        }
    }
    pub fn check(path: impl Into<String>, version: i32) -> Op {
        Op::Check {
            path: path.into(),
            version,
        }
    }
    pub fn create(path: impl Into<String>, data: impl Into<Vec<u8>>) -> Op {
        Op::Create {
            path: path.into(),
            data: data.into(),
            kind: NodeKind::Persistent,
        }
    }
    pub fn set(path: impl Into<String>, data: impl Into<Vec<u8>>, version: Option<i32>) -> Op {
        Op::Set {
            path: path.into(),
            data: data.into(),
            version,
        }
    }
    pub fn delete(path: impl Into<String>, version: Option<i32>) -> Op {
        Op::Delete {
            path: path.into(),
            version,
        }
    }
}

/// One read of a [`Coord::read_many`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Read {
    /// Data and stat of a node.
    Data(String),
    /// Names of the direct children of a node, sorted.
    Children(String),
}

impl Read {
    pub fn path(&self) -> &str {
        match self {
            Read::Data(p) | Read::Children(p) => p,
        }
    }
}

/// The answer to one [`Read`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReadResult {
    Data(Vec<u8>, Stat),
    Children(Vec<String>),
    /// The node does not exist.
    NoNode,
}

/// A change seen by a [`Watch`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchEvent {
    Created(String),
    DataChanged(String),
    Deleted(String),
    /// Events may have been missed (connection lost and re-established): re-read.
    Resync,
    /// The session expired or was closed; no more events will come.
    SessionLost,
}

impl WatchEvent {
    /// The node path for node events.
    pub fn path(&self) -> Option<&str> {
        match self {
            WatchEvent::Created(p) | WatchEvent::DataChanged(p) | WatchEvent::Deleted(p) => Some(p),
            _ => None,
        }
    }
}

/// A persistent recursive watch; dropping it stops delivery.
#[derive(Debug)]
pub struct Watch {
    rx: mpsc::Receiver<WatchEvent>,
    /// Keeps backend-side resources (e.g. the forwarding task) alive.
    _guard: Option<Box<dyn std::any::Any + Send>>,
}

impl Watch {
    pub(crate) fn new(
        rx: mpsc::Receiver<WatchEvent>,
        guard: Option<Box<dyn std::any::Any + Send>>,
    ) -> Watch {
        Watch { rx, _guard: guard }
    }

    /// Waits up to `timeout` for the next event. `None` on timeout or when the backend is gone
    /// (then [`WatchEvent::SessionLost`] was delivered before).
    pub fn recv_timeout(&self, timeout: Duration) -> Option<WatchEvent> {
        self.rx.recv_timeout(timeout).ok()
    }

    /// The next event if one is queued.
    pub fn try_recv(&self) -> Option<WatchEvent> {
        self.rx.try_recv().ok()
    }
}

/// A session with a coordination backend. See the module documentation for semantics.
pub trait Coord: Send + Sync {
    /// Creates a node; its parent must exist. Errors: `NodeExists`, `NoNode` (parent),
    /// `NoChildrenForEphemerals`, `InvalidPath`.
    fn create(&self, path: &str, data: &[u8], kind: NodeKind) -> Result<Stat>;
    /// Data and stat of a node. Error: `NoNode`.
    fn get(&self, path: &str) -> Result<(Vec<u8>, Stat)>;
    /// Stat of a node, `None` if absent.
    fn exists(&self, path: &str) -> Result<Option<Stat>>;
    /// Replaces a node's data; with `Some(v)` only if its version is `v`.
    fn set(&self, path: &str, data: &[u8], version: Option<i32>) -> Result<Stat>;
    /// Deletes a node without children; with `Some(v)` only if its version is `v`.
    fn delete(&self, path: &str, version: Option<i32>) -> Result<()>;
    /// Names (not paths) of the direct children, sorted.
    fn children(&self, path: &str) -> Result<Vec<String>>;
    /// Applies all operations atomically, or none.
    fn multi(&self, ops: &[Op]) -> Result<()>;
    /// Persistent recursive watch on `path` and everything below it (the node need not exist).
    fn watch(&self, path: &str) -> Result<Watch>;
    /// Several reads in one round trip, answered from one consistent state of the store
    /// (ZooKeeper `multiRead`; one lock hold on the embedded store). One result per read,
    /// in order; a missing node is [`ReadResult::NoNode`]. The default issues the reads one
    /// by one.
    fn read_many(&self, reads: &[Read]) -> Result<Vec<ReadResult>> {
        reads
            .iter()
            .map(|r| {
                let res = match r {
                    Read::Data(p) => self.get(p).map(|(d, s)| ReadResult::Data(d, s)),
                    Read::Children(p) => self.children(p).map(ReadResult::Children),
                };
                match res {
                    Err(CoordError::NoNode(_)) => Ok(ReadResult::NoNode),
                    r => r,
                }
            })
            .collect()
    }
    /// Creates `path` and every missing ancestor as persistent nodes with empty data. The
    /// deepest path is checked first, so an existing path costs one read.
    fn ensure_path(&self, path: &str) -> Result<()> {
        ensure_path_by_parts(self, path)
    }
    /// Brings this session up to date with every change acknowledged to any session before
    /// the call (ZooKeeper `sync`; a no-op for the embedded store), so a following read
    /// sees them.
    fn sync(&self, path: &str) -> Result<()>;
    /// Identifier of this session.
    fn session_id(&self) -> u64;
    /// Human-readable description ("embedded:/path", "zk://...").
    fn describe(&self) -> String;
    /// Ends the session now (ephemerals removed). Further calls fail. Also done on drop.
    fn close(&self);
}

/// Creates `path` and every missing ancestor as persistent nodes with empty data
/// ([`Coord::ensure_path`]).
pub fn ensure_path(c: &dyn Coord, path: &str) -> Result<()> {
    c.ensure_path(path)
}

/// [`Coord::ensure_path`] with the basic operations: `exists` on the path, then on its
/// ancestors upwards until one exists, then `create` downwards from there.
pub(crate) fn ensure_path_by_parts<C: Coord + ?Sized>(c: &C, path: &str) -> Result<()> {
    validate_path(path)?;
    if path == "/" || c.exists(path)?.is_some() {
        return Ok(());
    }
    let mut missing = vec![path];
    let mut cur = path;
    while let Some(p) = parent(cur) {
        if p == "/" || c.exists(p)?.is_some() {
            break;
        }
        missing.push(p);
        cur = p;
    }
    for p in missing.into_iter().rev() {
        match c.create(p, b"", NodeKind::Persistent) {
            Ok(_) | Err(CoordError::NodeExists(_)) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Deletes `path` and its whole subtree (children first). Absent nodes are ignored.
pub fn delete_recursive(c: &dyn Coord, path: &str) -> Result<()> {
    let kids = match c.children(path) {
        Ok(k) => k,
        Err(CoordError::NoNode(_)) => return Ok(()),
        Err(e) => return Err(e),
    };
    for k in kids {
        delete_recursive(c, &join(path, &k))?;
    }
    if path == "/" {
        return Ok(());
    }
    match c.delete(path, None) {
        Ok(()) | Err(CoordError::NoNode(_)) => Ok(()),
        Err(e) => Err(e),
    }
}

/// Which backend to use, parsed from `embedded:PATH` or `zk://host:port[,..][/chroot]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CoordSpec {
    Embedded(std::path::PathBuf),
    ZooKeeper {
        /// `host:port,host:port`
        servers: String,
        /// `/chroot` or `/` for none.
        chroot: String,
    },
}

impl CoordSpec {
    pub fn parse(spec: &str) -> Result<CoordSpec> {
        let bad = |reason: &str| CoordError::InvalidSpec {
            spec: spec.to_string(),
            reason: reason.to_string(),
        };
        if let Some(p) = spec.strip_prefix("embedded:") {
            if p.is_empty() {
                return Err(bad("embedded needs a file path: embedded:PATH"));
            }
            return Ok(CoordSpec::Embedded(p.into()));
        }
        if let Some(rest) = spec.strip_prefix("zk://") {
            let (servers, chroot) = match rest.find('/') {
                Some(i) => (&rest[..i], &rest[i..]),
                None => (rest, "/"),
            };
            let chroot = if chroot.len() > 1 {
                chroot.trim_end_matches('/')
            } else {
                "/"
            };
            if servers.is_empty() {
                return Err(bad("no server: zk://host:port[,host:port...][/chroot]"));
            }
            for s in servers.split(',') {
                let Some((host, port)) = s.rsplit_once(':') else {
                    return Err(bad(&format!("server {s:?} needs host:port")));
                };
                if host.is_empty() || port.parse::<u16>().is_err() {
                    return Err(bad(&format!("server {s:?} needs host:port")));
                }
            }
            validate_path(chroot).map_err(|e| bad(&e.to_string()))?;
            return Ok(CoordSpec::ZooKeeper {
                servers: servers.to_string(),
                chroot: chroot.to_string(),
            });
        }
        Err(bad(
            "expected embedded:PATH or zk://host:port[,host:port...][/chroot]",
        ))
    }
}

impl std::fmt::Display for CoordSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CoordSpec::Embedded(p) => write!(f, "embedded:{}", p.display()),
            CoordSpec::ZooKeeper { servers, chroot } if chroot == "/" => {
                write!(f, "zk://{servers}")
            }
            CoordSpec::ZooKeeper { servers, chroot } => write!(f, "zk://{servers}{chroot}"),
        }
    }
}

/// Options for [`connect`].
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    /// ZooKeeper session timeout (the server clamps it to [2, 20] × tickTime).
    pub session_timeout: Duration,
    /// Total time to keep retrying an unreachable ZooKeeper before giving up.
    pub connect_deadline: Duration,
}

impl Default for ConnectOptions {
    fn default() -> Self {
        ConnectOptions {
            session_timeout: Duration::from_secs(6),
            connect_deadline: Duration::from_secs(10),
        }
    }
}

/// Opens a session with the backend named by `spec`. For `embedded:PATH`, a store this
/// process has open already gives a new session of it; otherwise the store is opened
/// (and fails with [`CoordError::StoreLocked`] if another process owns it).
pub fn connect(spec: &CoordSpec, opts: &ConnectOptions) -> Result<Box<dyn Coord>> {
    match spec {
        CoordSpec::Embedded(p) => {
            let store = embedded::EmbeddedStore::open_shared(p)?;
            Ok(Box::new(store.session()))
        }
        CoordSpec::ZooKeeper { servers, chroot } => Ok(Box::new(zookeeper::ZkCoord::connect(
            servers, chroot, opts,
        )?)),
    }
}

/// Parent of an absolute path (`/` for top-level nodes), `None` for `/`.
pub fn parent(path: &str) -> Option<&str> {
    if path == "/" {
        return None;
    }
    match path.rfind('/') {
        Some(0) => Some("/"),
        Some(i) => Some(&path[..i]),
        None => None,
    }
}

/// `path/` (or `/` for the root): the key prefix shared by all descendants.
pub(crate) fn children_prefix(path: &str) -> String {
    if path == "/" {
        "/".to_string()
    } else {
        format!("{path}/")
    }
}

/// Joins a parent path and a child name.
pub fn join(parent: &str, name: &str) -> String {
    if parent == "/" {
        format!("/{name}")
    } else {
        format!("{parent}/{name}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_specs() {
        assert_eq!(
            CoordSpec::parse("embedded:/tmp/x.store").unwrap(),
            CoordSpec::Embedded("/tmp/x.store".into())
        );
        assert_eq!(
            CoordSpec::parse("zk://127.0.0.1:2181,h2:2182/a/b").unwrap(),
            CoordSpec::ZooKeeper {
                servers: "127.0.0.1:2181,h2:2182".into(),
                chroot: "/a/b".into()
            }
        );
        assert_eq!(
            CoordSpec::parse("zk://h:1").unwrap(),
            CoordSpec::ZooKeeper {
                servers: "h:1".into(),
                chroot: "/".into()
            }
        );
        for bad in [
            "",
            "zk://",
            "zk://host",
            "zk://h:x/a",
            "embedded:",
            "etcd://h:1",
            "zk://h:1/a//b",
        ] {
            assert!(CoordSpec::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn parent_and_join() {
        assert_eq!(parent("/a"), Some("/"));
        assert_eq!(parent("/a/b"), Some("/a"));
        assert_eq!(parent("/"), None);
        assert_eq!(join("/", "a"), "/a");
        assert_eq!(join("/a", "b"), "/a/b");
    }
}
