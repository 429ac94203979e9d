//! The embedded backend: the tree lives in this process and is persisted to one file.
//!
//! Every change of a persistent node rewrites the store file before the call returns:
//! the whole tree is written to a temporary file, fsynced, renamed over `PATH`, and the
//! directory is fsynced ([`crate::fsutil::write_atomic`]). File format: one header line
//! `BLOCKLAB-COORD 2 crc32c=XXXXXXXX len=N` followed by N bytes of JSON (the persistent
//! nodes; a node's data as a string when it is UTF-8, else as hex). Files of format 1 (data
//! as arrays of numbers) are still read; the next change rewrites them as format 2. A file
//! whose header, checksum or JSON does not check out is refused with
//! [`CoordError::CorruptStore`] and left untouched. Ephemeral nodes are not persisted: they
//! belong to sessions of this process.
//!
//! One process owns a store file at a time: [`EmbeddedStore::open`] takes an exclusive
//! `flock` on `PATH.lock` and fails with [`CoordError::StoreLocked`] if another holder
//! exists. Sessions are handles from [`EmbeddedStore::session`]; within the owning process,
//! [`EmbeddedStore::open_shared`] (what [`super::connect`] uses) returns the store already
//! open instead of failing.

use super::path::validate_path;
use super::{
    children_prefix, Coord, CoordError, NodeKind, Op, Read, ReadResult, Result, Stat, Watch,
    WatchEvent,
};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex, Weak};

const MAGIC: &str = "BLOCKLAB-COORD";
const FORMAT: u32 = 2;

#[derive(Debug, Clone)]
struct Node {
    data: Vec<u8>,
    version: i32,
    owner: Option<u64>,
    /// Number of direct children (kept up to date by every create and delete).
    children: u32,
}

impl Node {
    fn new(data: Vec<u8>, owner: Option<u64>) -> Node {
        Node {
            data,
            version: 0,
            owner,
            children: 0,
        }
    }

    fn stat(&self) -> Stat {
        Stat {
            version: self.version,
            ephemeral_owner: self.owner,
            num_children: self.children,
        }
    }
}

/// Format 1: data as a JSON array of numbers.
#[derive(Deserialize)]
struct PersistedNodeV1 {
    path: String,
    data: Vec<u8>,
    version: i32,
}

#[derive(Deserialize)]
struct PersistedV1 {
    nodes: Vec<PersistedNodeV1>,
}

/// Format 2: data as a string when it is UTF-8 (`text`), else as hex (`hex`).
#[derive(Serialize, Deserialize)]
struct PersistedNode {
    path: String,
    version: i32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    text: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    hex: Option<String>,
}

#[derive(Serialize, Deserialize)]
struct Persisted {
    nodes: Vec<PersistedNode>,
}

fn to_hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn from_hex(s: &str) -> Option<Vec<u8>> {
    if s.len() % 2 != 0 {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

struct Watcher {
    prefix: String,
    session: u64,
    tx: mpsc::Sender<WatchEvent>,
}

struct Inner {
    nodes: BTreeMap<String, Node>,
    watchers: Vec<Watcher>,
    next_session: u64,
}

/// An open embedded store. Cheap to share (`Arc`); sessions keep it alive.
pub struct EmbeddedStore {
    path: PathBuf,
    inner: Mutex<Inner>,
    _lock: File,
}

impl std::fmt::Debug for EmbeddedStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedStore")
            .field("path", &self.path)
            .finish()
    }
}

fn io_err(path: &Path, source: std::io::Error) -> CoordError {
    CoordError::Io {
        path: path.display().to_string(),
        cause: source,
    }
}

/// The stores this process has open, by file (see [`EmbeddedStore::open_shared`]).
static OPEN_STORES: Mutex<BTreeMap<PathBuf, Weak<EmbeddedStore>>> = Mutex::new(BTreeMap::new());

/// The registry key of a store file: its directory resolved, so two spellings of one
/// file meet.
fn registry_key(path: &Path) -> PathBuf {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    match (std::fs::canonicalize(dir), path.file_name()) {
        (Ok(d), Some(name)) => d.join(name),
        _ => path.to_path_buf(),
    }
}

/// Reverses one applied operation (see [`EmbeddedStore::apply`]).
enum Undo {
    /// The node was created: remove it again.
    Created(String),
    /// The node's data and version were replaced.
    Set(String, Vec<u8>, i32),
    /// The node was deleted: put it back.
    Deleted(String, Node),
}

impl EmbeddedStore {
    /// Opens (or creates) the store file at `path` as its owner. Refuses a corrupt file and
    /// a file locked by another owner (another process, or an earlier `open` in this
    /// process that is still alive; use [`EmbeddedStore::open_shared`] to share it).
    pub fn open(path: impl AsRef<Path>) -> Result<Arc<EmbeddedStore>> {
        let mut reg = OPEN_STORES.lock().unwrap_or_else(|e| e.into_inner());
        let store = Self::open_locked(path.as_ref())?;
        reg.retain(|_, w| w.strong_count() > 0);
        reg.insert(registry_key(path.as_ref()), Arc::downgrade(&store));
        Ok(store)
    }

    /// The store at `path` if this process has it open already, else [`EmbeddedStore::open`].
    pub fn open_shared(path: impl AsRef<Path>) -> Result<Arc<EmbeddedStore>> {
        let key = registry_key(path.as_ref());
        let mut reg = OPEN_STORES.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(s) = reg.get(&key).and_then(Weak::upgrade) {
            return Ok(s);
        }
        let store = Self::open_locked(path.as_ref())?;
        reg.retain(|_, w| w.strong_count() > 0);
        reg.insert(key, Arc::downgrade(&store));
        Ok(store)
    }

    fn open_locked(path: &Path) -> Result<Arc<EmbeddedStore>> {
        let path = path.to_path_buf();
        let lock_path = PathBuf::from(format!("{}.lock", path.display()));
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| io_err(&lock_path, e))?;
        if rustix::fs::flock(&lock, rustix::fs::FlockOperation::NonBlockingLockExclusive).is_err() {
            return Err(CoordError::StoreLocked {
                path: path.display().to_string(),
                lock: lock_path.display().to_string(),
            });
        }
        let mut nodes = BTreeMap::new();
        nodes.insert("/".to_string(), Node::new(Vec::new(), None));
        let exists = path.exists();
        if exists {
            let bytes = std::fs::read(&path).map_err(|e| io_err(&path, e))?;
            let loaded = decode(&bytes).map_err(|reason| CoordError::CorruptStore {
                path: path.display().to_string(),
                reason,
            })?;
            for (p, data, version) in loaded {
                nodes.insert(
                    p,
                    Node {
                        version,
                        ..Node::new(data, None)
                    },
                );
            }
            // Child counts, and every node's parent must be there.
            let paths: Vec<String> = nodes.keys().filter(|p| *p != "/").cloned().collect();
            for p in paths {
                let parent = super::parent(&p).unwrap_or("/");
                match nodes.get_mut(parent) {
                    Some(n) => n.children += 1,
                    None => {
                        return Err(CoordError::CorruptStore {
                            path: path.display().to_string(),
                            reason: format!("node {p} has no parent node"),
                        })
                    }
                }
            }
        }
        let store = EmbeddedStore {
            path,
            inner: Mutex::new(Inner {
                nodes,
                watchers: Vec::new(),
                next_session: 1,
            }),
            _lock: lock,
        };
        if !exists {
            let inner = store.inner.lock().unwrap_or_else(|e| e.into_inner());
            store.persist(&inner.nodes)?;
        }
        Ok(Arc::new(store))
    }

    /// The store file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Opens a new session.
    pub fn session(self: &Arc<Self>) -> EmbeddedCoord {
        let mut inner = self.lock();
        let id = inner.next_session;
        inner.next_session += 1;
        EmbeddedCoord {
            store: Arc::clone(self),
            id,
            closed: AtomicBool::new(false),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn persist(&self, nodes: &BTreeMap<String, Node>) -> Result<()> {
        let persisted = Persisted {
            nodes: nodes
                .iter()
                .filter(|(p, n)| n.owner.is_none() && p.as_str() != "/")
                .map(|(p, n)| {
                    let (text, hex) = match std::str::from_utf8(&n.data) {
                        Ok(t) => (Some(t.to_string()), None),
                        Err(_) => (None, Some(to_hex(&n.data))),
                    };
                    PersistedNode {
                        path: p.clone(),
                        version: n.version,
                        text,
                        hex,
                    }
                })
                .collect(),
        };
        let body = serde_json::to_vec(&persisted).expect("serialising plain data cannot fail");
        let header = format!(
            "{MAGIC} {FORMAT} crc32c={:08x} len={}\n",
            crc32c::crc32c(&body),
            body.len()
        );
        let mut bytes = header.into_bytes();
        bytes.extend_from_slice(&body);
        crate::fsutil::write_atomic(&self.path, &bytes).map_err(|e| io_err(&self.path, e))
    }

    /// Applies `ops` atomically for session `session`: in place, with an undo log that
    /// restores the tree if an op fails or the file cannot be written. Returns the stat
    /// of the last op's node after the change (`None` for a delete), taken under the lock.
    fn apply(&self, session: u64, ops: &[Op], multi: bool) -> Result<Option<Stat>> {
        let mut inner = self.lock();
        let mut undo = Vec::new();
        let mut events = Vec::new();
        let mut persistent_change = false;
        let mut last = None;
        for (index, op) in ops.iter().enumerate() {
            match apply_op(&mut inner.nodes, session, op, &mut events, &mut undo) {
                Ok((p, stat)) => {
                    persistent_change |= p;
                    last = stat;
                }
                Err(e) => {
                    rollback(&mut inner.nodes, undo);
                    return Err(if multi {
                        CoordError::MultiFailed {
                            index,
                            cause: Box::new(e),
                        }
                    } else {
                        e
                    });
                }
            }
        }
        if persistent_change {
            if let Err(e) = self.persist(&inner.nodes) {
                rollback(&mut inner.nodes, undo);
                return Err(e);
            }
        }
        deliver(&mut inner.watchers, events);
        Ok(last)
    }

    fn end_session(&self, session: u64) {
        let mut inner = self.lock();
        let owned: Vec<String> = inner
            .nodes
            .iter()
            .filter(|(_, n)| n.owner == Some(session))
            .map(|(p, _)| p.clone())
            .collect();
        let mut events = Vec::new();
        for p in owned.into_iter().rev() {
            inner.nodes.remove(&p);
            if let Some(n) = inner.nodes.get_mut(super::parent(&p).unwrap_or("/")) {
                n.children = n.children.saturating_sub(1);
            }
            events.push(WatchEvent::Deleted(p));
        }
        for w in inner.watchers.iter().filter(|w| w.session == session) {
            let _ = w.tx.send(WatchEvent::SessionLost);
        }
        inner.watchers.retain(|w| w.session != session);
        deliver(&mut inner.watchers, events);
    }
}

fn under(prefix: &str, path: &str) -> bool {
    prefix == "/"
        || path == prefix
        || (path.starts_with(prefix) && path.as_bytes().get(prefix.len()) == Some(&b'/'))
}

fn deliver(watchers: &mut Vec<Watcher>, events: Vec<WatchEvent>) {
    for ev in events {
        let p = ev.path().unwrap_or("/").to_string();
        watchers.retain(|w| !under(&w.prefix, &p) || w.tx.send(ev.clone()).is_ok());
    }
}

/// The persistent nodes of a store file: (path, data, version).
fn decode(bytes: &[u8]) -> std::result::Result<Vec<(String, Vec<u8>, i32)>, String> {
    let nl = bytes
        .iter()
        .position(|&b| b == b'\n')
        .ok_or("no header line")?;
    let header = std::str::from_utf8(&bytes[..nl]).map_err(|_| "header is not text")?;
    let mut it = header.split(' ');
    if it.next() != Some(MAGIC) {
        return Err(format!("bad magic (expected {MAGIC})"));
    }
    let format = match it.next() {
        Some("1") => 1,
        Some("2") => 2,
        Some(v) => {
            return Err(format!(
                "unknown format version {v:?} (this build reads 1 and 2)"
            ))
        }
        None => return Err("no format version".into()),
    };
    let crc = it
        .next()
        .and_then(|s| s.strip_prefix("crc32c="))
        .and_then(|s| u32::from_str_radix(s, 16).ok())
        .ok_or("bad crc32c field")?;
    let len = it
        .next()
        .and_then(|s| s.strip_prefix("len="))
        .and_then(|s| s.parse::<usize>().ok())
        .ok_or("bad len field")?;
    let body = &bytes[nl + 1..];
    if body.len() != len {
        return Err(format!("body is {} bytes, header says {len}", body.len()));
    }
    if crc32c::crc32c(body) != crc {
        return Err("checksum mismatch".into());
    }
    let bad_json = |e: serde_json::Error| format!("bad JSON: {e}");
    let nodes: Vec<(String, Vec<u8>, i32)> = if format == 1 {
        let p: PersistedV1 = serde_json::from_slice(body).map_err(bad_json)?;
        p.nodes
            .into_iter()
            .map(|n| (n.path, n.data, n.version))
            .collect()
    } else {
        let p: Persisted = serde_json::from_slice(body).map_err(bad_json)?;
        p.nodes
            .into_iter()
            .map(|n| {
                let data = match (n.text, n.hex) {
                    (Some(t), None) => t.into_bytes(),
                    (None, Some(h)) => {
                        from_hex(&h).ok_or_else(|| format!("node {}: bad hex data", n.path))?
                    }
                    (None, None) => Vec::new(),
                    (Some(_), Some(_)) => {
                        return Err(format!("node {}: both text and hex data", n.path))
                    }
                };
                Ok((n.path, data, n.version))
            })
            .collect::<std::result::Result<_, String>>()?
    };
    for (p, _, _) in &nodes {
        validate_path(p).map_err(|e| e.to_string())?;
        if p == "/" {
            return Err("the root is not a stored node".into());
        }
    }
    Ok(nodes)
}

fn check_version(path: &str, n: &Node, version: Option<i32>) -> Result<()> {
    match version {
        Some(v) if v != n.version => Err(CoordError::BadVersion {
            path: path.to_string(),
            expected: v,
        }),
        _ => Ok(()),
    }
}

fn adjust_children(nodes: &mut BTreeMap<String, Node>, path: &str, up: bool) {
    if let Some(n) = nodes.get_mut(super::parent(path).unwrap_or("/")) {
        if up {
            n.children += 1;
        } else {
            n.children = n.children.saturating_sub(1);
        }
    }
}

fn rollback(nodes: &mut BTreeMap<String, Node>, undo: Vec<Undo>) {
    for u in undo.into_iter().rev() {
        match u {
            Undo::Created(p) => {
                nodes.remove(&p);
                adjust_children(nodes, &p, false);
            }
            Undo::Set(p, data, version) => {
                if let Some(n) = nodes.get_mut(&p) {
                    n.data = data;
                    n.version = version;
                }
            }
            Undo::Deleted(p, n) => {
                nodes.insert(p.clone(), n);
                adjust_children(nodes, &p, true);
            }
        }
    }
}

/// Applies one op to `nodes` and records how to undo it; returns whether a persistent node
/// changed and the op's node stat afterwards (`None` after a delete).
fn apply_op(
    nodes: &mut BTreeMap<String, Node>,
    session: u64,
    op: &Op,
    events: &mut Vec<WatchEvent>,
    undo: &mut Vec<Undo>,
) -> Result<(bool, Option<Stat>)> {
    let path = op.path();
    validate_path(path)?;
    match op {
        Op::Check { version, .. } => {
            let n = nodes
                .get(path)
                .ok_or_else(|| CoordError::NoNode(path.into()))?;
            check_version(path, n, Some(*version))?;
            Ok((false, Some(n.stat())))
        }
        Op::Create { data, kind, .. } => {
            if path == "/" || nodes.contains_key(path) {
                return Err(CoordError::NodeExists(path.into()));
            }
            let parent = super::parent(path).unwrap_or("/");
            let pn = nodes
                .get(parent)
                .ok_or_else(|| CoordError::NoNode(parent.into()))?;
            if pn.owner.is_some() {
                return Err(CoordError::NoChildrenForEphemerals(parent.into()));
            }
            let owner = match kind {
                NodeKind::Persistent => None,
                NodeKind::Ephemeral => Some(session),
            };
            let node = Node::new(data.clone(), owner);
            let stat = node.stat();
            nodes.insert(path.into(), node);
            adjust_children(nodes, path, true);
            undo.push(Undo::Created(path.into()));
            events.push(WatchEvent::Created(path.into()));
            Ok((owner.is_none(), Some(stat)))
        }
        Op::Set { data, version, .. } => {
            let n = nodes
                .get_mut(path)
                .ok_or_else(|| CoordError::NoNode(path.into()))?;
            check_version(path, n, *version)?;
            let old = std::mem::replace(&mut n.data, data.clone());
            undo.push(Undo::Set(path.into(), old, n.version));
            n.version += 1;
            events.push(WatchEvent::DataChanged(path.into()));
            Ok((n.owner.is_none(), Some(n.stat())))
        }
        Op::Delete { version, .. } => {
            if path == "/" {
                return Err(CoordError::InvalidPath {
                    path: "/".into(),
                    reason: "cannot delete the root",
                });
            }
            let n = nodes
                .get(path)
                .ok_or_else(|| CoordError::NoNode(path.into()))?;
            check_version(path, n, *version)?;
            if n.children > 0 {
                return Err(CoordError::NotEmpty(path.into()));
            }
            let n = nodes.remove(path).expect("checked above");
            adjust_children(nodes, path, false);
            let persistent = n.owner.is_none();
            undo.push(Undo::Deleted(path.into(), n));
            events.push(WatchEvent::Deleted(path.into()));
            Ok((persistent, None))
        }
    }
}

fn children_of(nodes: &BTreeMap<String, Node>, path: &str) -> Vec<String> {
    let prefix = children_prefix(path);
    nodes
        .range(prefix.clone()..)
        .take_while(|(p, _)| p.starts_with(&prefix))
        .map(|(p, _)| &p[prefix.len()..])
        .filter(|rest| !rest.is_empty() && !rest.contains('/'))
        .map(str::to_string)
        .collect()
}

/// One session of an [`EmbeddedStore`].
pub struct EmbeddedCoord {
    store: Arc<EmbeddedStore>,
    id: u64,
    closed: AtomicBool,
}

impl std::fmt::Debug for EmbeddedCoord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedCoord")
            .field("path", &self.store.path)
            .field("session", &self.id)
            .finish()
    }
}

impl EmbeddedCoord {
    fn live(&self) -> Result<()> {
        if self.closed.load(Ordering::SeqCst) {
            Err(CoordError::SessionExpired)
        } else {
            Ok(())
        }
    }

    /// The store this session belongs to (open more sessions from it).
    pub fn store(&self) -> &Arc<EmbeddedStore> {
        &self.store
    }
}

impl Coord for EmbeddedCoord {
    fn create(&self, path: &str, data: &[u8], kind: NodeKind) -> Result<Stat> {
        self.live()?;
        self.store
            .apply(
                self.id,
                &[Op::Create {
                    path: path.into(),
                    data: data.to_vec(),
                    kind,
                }],
                false,
            )?
            .ok_or_else(|| CoordError::NoNode(path.into()))
    }

    fn get(&self, path: &str) -> Result<(Vec<u8>, Stat)> {
        self.live()?;
        validate_path(path)?;
        let inner = self.store.lock();
        let n = inner
            .nodes
            .get(path)
            .ok_or_else(|| CoordError::NoNode(path.into()))?;
        Ok((n.data.clone(), n.stat()))
    }

    fn exists(&self, path: &str) -> Result<Option<Stat>> {
        self.live()?;
        validate_path(path)?;
        Ok(self.store.lock().nodes.get(path).map(Node::stat))
    }

    fn set(&self, path: &str, data: &[u8], version: Option<i32>) -> Result<Stat> {
        self.live()?;
        self.store
            .apply(
                self.id,
                &[Op::Set {
                    path: path.into(),
                    data: data.to_vec(),
                    version,
                }],
                false,
            )?
            .ok_or_else(|| CoordError::NoNode(path.into()))
    }

    fn delete(&self, path: &str, version: Option<i32>) -> Result<()> {
        self.live()?;
        self.store
            .apply(
                self.id,
                &[Op::Delete {
                    path: path.into(),
                    version,
                }],
                false,
            )
            .map(|_| ())
    }

    fn children(&self, path: &str) -> Result<Vec<String>> {
        self.live()?;
        validate_path(path)?;
        let inner = self.store.lock();
        if !inner.nodes.contains_key(path) {
            return Err(CoordError::NoNode(path.into()));
        }
        Ok(children_of(&inner.nodes, path))
    }

    fn multi(&self, ops: &[Op]) -> Result<()> {
        self.live()?;
        self.store.apply(self.id, ops, true).map(|_| ())
    }

    fn read_many(&self, reads: &[Read]) -> Result<Vec<ReadResult>> {
        self.live()?;
        for r in reads {
            validate_path(r.path())?;
        }
        let inner = self.store.lock();
        Ok(reads
            .iter()
            .map(|r| match (r, inner.nodes.get(r.path())) {
                (_, None) => ReadResult::NoNode,
                (Read::Data(_), Some(n)) => ReadResult::Data(n.data.clone(), n.stat()),
                (Read::Children(p), Some(_)) => ReadResult::Children(children_of(&inner.nodes, p)),
            })
            .collect())
    }

    fn watch(&self, path: &str) -> Result<Watch> {
        self.live()?;
        validate_path(path)?;
        let (tx, rx) = mpsc::channel();
        self.store.lock().watchers.push(Watcher {
            prefix: path.into(),
            session: self.id,
            tx,
        });
        Ok(Watch::new(rx, None))
    }

    fn sync(&self, path: &str) -> Result<()> {
        self.live()?;
        validate_path(path)
    }

    fn session_id(&self) -> u64 {
        self.id
    }

    fn describe(&self) -> String {
        format!("embedded:{}", self.store.path.display())
    }

    fn close(&self) {
        if !self.closed.swap(true, Ordering::SeqCst) {
            self.store.end_session(self.id);
        }
    }
}

impl Drop for EmbeddedCoord {
    fn drop(&mut self) {
        self.close();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trips() {
        for b in [&b""[..], &b"\x00\xff\x10"[..], &[0xc3, 0x28][..]] {
            assert_eq!(from_hex(&to_hex(b)).unwrap(), b);
        }
        assert!(from_hex("abc").is_none());
        assert!(from_hex("zz").is_none());
    }
}
