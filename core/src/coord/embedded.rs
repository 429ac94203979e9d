//! The embedded backend: the tree lives in this process and is persisted to one file.
//!
//! Every change of a persistent node rewrites the store file before the call returns:
//! the whole tree is written to `PATH.tmp`, fsynced, renamed over `PATH`, and the directory
//! is fsynced. File format: one header line `BLOCKLAB-COORD 1 crc32c=XXXXXXXX len=N`
//! followed by N bytes of JSON (the persistent nodes). A file whose header, checksum or
//! JSON does not check out is refused with [`CoordError::CorruptStore`] and left untouched.
//! Ephemeral nodes are not persisted: they belong to sessions of this process.
//!
//! One process owns a store file at a time: [`EmbeddedStore::open`] takes an exclusive
//! `flock` on `PATH.lock` and fails with [`CoordError::StoreLocked`] if another holder
//! exists. Sessions are handles from [`EmbeddedStore::session`].

use super::path::validate_path;
use super::{children_prefix, Coord, CoordError, NodeKind, Op, Result, Stat, Watch, WatchEvent};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};

const MAGIC: &str = "BLOCKLAB-COORD";
const FORMAT: u32 = 1;

#[derive(Debug, Clone)]
struct Node {
    data: Vec<u8>,
    version: i32,
    owner: Option<u64>,
}

#[derive(Serialize, Deserialize)]
struct PersistedNode {
    path: String,
    data: Vec<u8>,
    version: i32,
}

#[derive(Serialize, Deserialize)]
struct Persisted {
    nodes: Vec<PersistedNode>,
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
        source,
    }
}

impl EmbeddedStore {
    /// Opens (or creates) the store file at `path`. Refuses a corrupt file and a file
    /// locked by another process.
    pub fn open(path: impl AsRef<Path>) -> Result<Arc<EmbeddedStore>> {
        let path = path.as_ref().to_path_buf();
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
        nodes.insert(
            "/".to_string(),
            Node {
                data: Vec::new(),
                version: 0,
                owner: None,
            },
        );
        let exists = path.exists();
        if exists {
            let bytes = std::fs::read(&path).map_err(|e| io_err(&path, e))?;
            for n in decode(&bytes).map_err(|reason| CoordError::CorruptStore {
                path: path.display().to_string(),
                reason,
            })? {
                nodes.insert(
                    n.path,
                    Node {
                        data: n.data,
                        version: n.version,
                        owner: None,
                    },
                );
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
                .map(|(p, n)| PersistedNode {
                    path: p.clone(),
                    data: n.data.clone(),
                    version: n.version,
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

    /// Applies `ops` atomically for session `session`; returns the watch events.
    fn apply(&self, session: u64, ops: &[Op], multi: bool) -> Result<()> {
        let mut inner = self.lock();
        let mut work = inner.nodes.clone();
        let mut events = Vec::new();
        let mut persistent_change = false;
        for (index, op) in ops.iter().enumerate() {
            match apply_op(&mut work, session, op, &mut events) {
                Ok(p) => persistent_change |= p,
                Err(e) if multi => {
                    return Err(CoordError::MultiFailed {
                        index,
                        source: Box::new(e),
                    })
                }
                Err(e) => return Err(e),
            }
        }
        if persistent_change {
            self.persist(&work)?;
        }
        inner.nodes = work;
        deliver(&mut inner.watchers, events);
        Ok(())
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

fn decode(bytes: &[u8]) -> std::result::Result<Vec<PersistedNode>, String> {
    let nl = bytes
        .iter()
        .position(|&b| b == b'\n')
        .ok_or("no header line")?;
    let header = std::str::from_utf8(&bytes[..nl]).map_err(|_| "header is not text")?;
    let mut it = header.split(' ');
    if it.next() != Some(MAGIC) {
        return Err(format!("bad magic (expected {MAGIC})"));
    }
    if it.next() != Some("1") {
        return Err("unknown format version".into());
    }
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
    let p: Persisted = serde_json::from_slice(body).map_err(|e| format!("bad JSON: {e}"))?;
    for n in &p.nodes {
        validate_path(&n.path).map_err(|e| e.to_string())?;
    }
    Ok(p.nodes)
}

fn num_children(nodes: &BTreeMap<String, Node>, path: &str) -> u32 {
    let prefix = children_prefix(path);
    nodes
        .range(prefix.clone()..)
        .take_while(|(p, _)| p.starts_with(&prefix))
        .filter(|(p, _)| p.len() > prefix.len())
        .filter(|(p, _)| !p[prefix.len()..].contains('/'))
        .count() as u32
}

fn stat_of(nodes: &BTreeMap<String, Node>, path: &str, n: &Node) -> Stat {
    Stat {
        version: n.version,
        ephemeral_owner: n.owner,
        num_children: num_children(nodes, path),
    }
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

/// Applies one op to `nodes`; returns whether a persistent node changed.
fn apply_op(
    nodes: &mut BTreeMap<String, Node>,
    session: u64,
    op: &Op,
    events: &mut Vec<WatchEvent>,
) -> Result<bool> {
    let path = op.path();
    validate_path(path)?;
    match op {
        Op::Check { version, .. } => {
            let n = nodes
                .get(path)
                .ok_or_else(|| CoordError::NoNode(path.into()))?;
            check_version(path, n, Some(*version))?;
            Ok(false)
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
            nodes.insert(
                path.into(),
                Node {
                    data: data.clone(),
                    version: 0,
                    owner,
                },
            );
            events.push(WatchEvent::Created(path.into()));
            Ok(owner.is_none())
        }
        Op::Set { data, version, .. } => {
            let n = nodes
                .get_mut(path)
                .ok_or_else(|| CoordError::NoNode(path.into()))?;
            check_version(path, n, *version)?;
            n.data = data.clone();
            n.version += 1;
            events.push(WatchEvent::DataChanged(path.into()));
            Ok(n.owner.is_none())
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
            if num_children(nodes, path) > 0 {
                return Err(CoordError::NotEmpty(path.into()));
            }
            let persistent = n.owner.is_none();
            nodes.remove(path);
            events.push(WatchEvent::Deleted(path.into()));
            Ok(persistent)
        }
    }
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
        self.store.apply(
            self.id,
            &[Op::Create {
                path: path.into(),
                data: data.to_vec(),
                kind,
            }],
            false,
        )?;
        self.exists(path)?
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
        Ok((n.data.clone(), stat_of(&inner.nodes, path, n)))
    }

    fn exists(&self, path: &str) -> Result<Option<Stat>> {
        self.live()?;
        validate_path(path)?;
        let inner = self.store.lock();
        Ok(inner
            .nodes
            .get(path)
            .map(|n| stat_of(&inner.nodes, path, n)))
    }

    fn set(&self, path: &str, data: &[u8], version: Option<i32>) -> Result<Stat> {
        self.live()?;
        self.store.apply(
            self.id,
            &[Op::Set {
                path: path.into(),
                data: data.to_vec(),
                version,
            }],
            false,
        )?;
        self.exists(path)?
            .ok_or_else(|| CoordError::NoNode(path.into()))
    }

    fn delete(&self, path: &str, version: Option<i32>) -> Result<()> {
        self.live()?;
        self.store.apply(
            self.id,
            &[Op::Delete {
                path: path.into(),
                version,
            }],
            false,
        )
    }

    fn children(&self, path: &str) -> Result<Vec<String>> {
        self.live()?;
        validate_path(path)?;
        let inner = self.store.lock();
        if !inner.nodes.contains_key(path) {
            return Err(CoordError::NoNode(path.into()));
        }
        let prefix = children_prefix(path);
        Ok(inner
            .nodes
            .range(prefix.clone()..)
            .take_while(|(p, _)| p.starts_with(&prefix))
            .filter(|(p, _)| p.len() > prefix.len())
            .map(|(p, _)| &p[prefix.len()..])
            .filter(|rest| !rest.contains('/'))
            .map(str::to_string)
            .collect())
    }

    fn multi(&self, ops: &[Op]) -> Result<()> {
        self.live()?;
        self.store.apply(self.id, ops, true)
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
