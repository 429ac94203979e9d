//! The ZooKeeper backend: a real ZooKeeper server (≥ 3.6) through the `zookeeper-client`
//! crate, run on an internal tokio runtime so the [`Coord`] surface stays synchronous.
//!
//! Atomic changes use ZooKeeper's `multi`; watches are persistent recursive watches
//! (`addWatch … PERSISTENT_RECURSIVE`). ZooKeeper may drop watch events while the
//! connection is down (ZOOKEEPER-4698), so a reconnection is reported as
//! [`WatchEvent::Resync`]. A chroot named in the spec is created on connect if missing.

use super::path::validate_path;
use super::{
    ConnectOptions, Coord, CoordError, NodeKind, Op, Read, ReadResult, Result, Stat, Watch,
    WatchEvent,
};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use zookeeper_client as zk;

/// One ZooKeeper session.
pub struct ZkCoord {
    rt: tokio::runtime::Runtime,
    client: Arc<Mutex<Option<zk::Client>>>,
    servers: String,
    chroot: String,
    session: u64,
}

impl std::fmt::Debug for ZkCoord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ZkCoord")
            .field("servers", &self.servers)
            .field("chroot", &self.chroot)
            .field("session", &format_args!("{:#x}", self.session))
            .finish()
    }
}

/// The [`CoordError`] of a ZooKeeper error on `path`; `expected` is the version the
/// request was conditional on (reported by `BadVersion`).
fn map_err(e: zk::Error, path: &str, expected: Option<i32>) -> CoordError {
    match e {
        zk::Error::NoNode => CoordError::NoNode(path.into()),
        zk::Error::NodeExists => CoordError::NodeExists(path.into()),
        zk::Error::BadVersion => CoordError::BadVersion {
            path: path.into(),
            expected: expected.unwrap_or(-1),
        },
        zk::Error::NotEmpty => CoordError::NotEmpty(path.into()),
        zk::Error::NoChildrenForEphemerals => CoordError::NoChildrenForEphemerals(path.into()),
        zk::Error::ConnectionLoss => CoordError::ConnectionLoss,
        zk::Error::SessionExpired | zk::Error::ClientClosed => CoordError::SessionExpired,
        other => CoordError::Zk {
            path: path.into(),
            message: other.to_string(),
        },
    }
}

/// Reads per multiRead request.
const MULTI_READ_CHUNK: usize = 128;

fn persistent() -> zk::CreateOptions<'static> {
    zk::CreateMode::Persistent.with_acls(zk::Acls::anyone_all())
}

fn ephemeral() -> zk::CreateOptions<'static> {
    zk::CreateMode::Ephemeral.with_acls(zk::Acls::anyone_all())
}

fn stat(s: &zk::Stat) -> Stat {
    Stat {
        version: s.version,
        ephemeral_owner: (s.ephemeral_owner != 0).then_some(s.ephemeral_owner as u64),
        num_children: s.num_children.max(0) as u32,
    }
}

impl ZkCoord {
    /// Connects to `servers` (`host:port,host:port`), retrying until
    /// `opts.connect_deadline`; creates `chroot` if missing and roots the session there.
    pub fn connect(servers: &str, chroot: &str, opts: &ConnectOptions) -> Result<ZkCoord> {
        validate_path(chroot)?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("coord-zk")
            .enable_all()
            .build()
            .map_err(|e| CoordError::Io {
                path: "tokio runtime".into(),
                cause: e,
            })?;
        let start = Instant::now();
        let mut attempts = 0u32;
        let client = loop {
            attempts += 1;
            let remaining = opts.connect_deadline.saturating_sub(start.elapsed());
            let attempt = rt.block_on(async {
                tokio::time::timeout(
                    remaining.max(Duration::from_millis(100)),
                    zk::Client::connector()
                        .with_session_timeout(opts.session_timeout)
                        .with_connection_timeout(Duration::from_secs(2).min(opts.connect_deadline))
                        .with_fail_eagerly()
                        .connect(servers),
                )
                .await
            });
            let last = match attempt {
                Ok(Ok(c)) => break c,
                Ok(Err(e)) => e.to_string(),
                Err(_) => "timed out".to_string(),
            };
            if start.elapsed() + Duration::from_millis(250) >= opts.connect_deadline {
                return Err(CoordError::Unreachable {
                    servers: servers.into(),
                    attempts,
                    waited_ms: start.elapsed().as_millis() as u64,
                    last,
                });
            }
            std::thread::sleep(Duration::from_millis(250));
        };
        let client = if chroot == "/" {
            client
        } else {
            rt.block_on(client.mkdir(chroot, &persistent()))
                .map_err(|e| map_err(e, chroot, None))?;
            client
                .chroot(chroot.to_string())
                .map_err(|_| CoordError::InvalidPath {
                    path: chroot.into(),
                    reason: "not a valid chroot",
                })?
        };
        let session = client.session_id().0 as u64;
        Ok(ZkCoord {
            rt,
            client: Arc::new(Mutex::new(Some(client))),
            servers: servers.into(),
            chroot: chroot.into(),
            session,
        })
    }

    fn client(&self) -> Result<zk::Client> {
        self.client
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .ok_or(CoordError::SessionExpired)
    }

    /// Waits (up to `timeout`) until the session is connected; after a server restart this
    /// is when requests work again.
    pub fn wait_connected(&self, timeout: Duration) -> Result<()> {
        let c = self.client()?;
        let mut w = c.state_watcher();
        let deadline = Instant::now() + timeout;
        loop {
            let s = w.peek_state();
            match s {
                zk::SessionState::SyncConnected | zk::SessionState::ConnectedReadOnly => {
                    return Ok(())
                }
                s if s.is_terminated() => return Err(CoordError::SessionExpired),
                _ => {}
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(CoordError::ConnectionLoss);
            }
            let _ = self
                .rt
                .block_on(async { tokio::time::timeout(left, w.changed()).await });
        }
    }
}

struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl Coord for ZkCoord {
    fn create(&self, path: &str, data: &[u8], kind: NodeKind) -> Result<Stat> {
        validate_path(path)?;
        let c = self.client()?;
        let opts = match kind {
            NodeKind::Persistent => persistent(),
            NodeKind::Ephemeral => ephemeral(),
        };
        let (s, _) = self
            .rt
            .block_on(c.create(path, data, &opts))
            .map_err(|e| map_err(e, path, None))?;
        Ok(stat(&s))
    }

    fn get(&self, path: &str) -> Result<(Vec<u8>, Stat)> {
        validate_path(path)?;
        let c = self.client()?;
        let (d, s) = self
            .rt
            .block_on(c.get_data(path))
            .map_err(|e| map_err(e, path, None))?;
        Ok((d, stat(&s)))
    }

    fn exists(&self, path: &str) -> Result<Option<Stat>> {
        validate_path(path)?;
        let c = self.client()?;
        let s = self
            .rt
            .block_on(c.check_stat(path))
            .map_err(|e| map_err(e, path, None))?;
        Ok(s.as_ref().map(stat))
    }

    fn set(&self, path: &str, data: &[u8], version: Option<i32>) -> Result<Stat> {
        validate_path(path)?;
        let c = self.client()?;
        let s = self
            .rt
            .block_on(c.set_data(path, data, version))
            .map_err(|e| map_err(e, path, version))?;
        Ok(stat(&s))
    }

    fn delete(&self, path: &str, version: Option<i32>) -> Result<()> {
        validate_path(path)?;
        if path == "/" {
            return Err(CoordError::InvalidPath {
                path: "/".into(),
                reason: "cannot delete the root",
            });
        }
        let c = self.client()?;
        self.rt
            .block_on(c.delete(path, version))
            .map_err(|e| map_err(e, path, version))
    }

    fn children(&self, path: &str) -> Result<Vec<String>> {
        validate_path(path)?;
        let c = self.client()?;
        let mut v = self
            .rt
            .block_on(c.list_children(path))
            .map_err(|e| map_err(e, path, None))?;
        if path == "/" && self.chroot == "/" {
            v.retain(|n| n != "zookeeper");
        }
        v.sort();
        Ok(v)
    }

    fn multi(&self, ops: &[Op]) -> Result<()> {
        for op in ops {
            validate_path(op.path())?;
        }
        if ops.is_empty() {
            return Ok(());
        }
        let c = self.client()?;
        let mut w = c.new_multi_writer();
        let add = |w: &mut zk::MultiWriter<'_>, op: &Op| -> std::result::Result<(), zk::Error> {
            match op {
                Op::Check { path, version } => w.add_check_version(path, *version),
                Op::Create { path, data, kind } => {
                    let o = match kind {
                        NodeKind::Persistent => persistent(),
                        NodeKind::Ephemeral => ephemeral(),
                    };
                    w.add_create(path, data, &o)
                }
                Op::Set {
                    path,
                    data,
                    version,
                } => w.add_set_data(path, data, *version),
                Op::Delete { path, version } => w.add_delete(path, *version),
            }
        };
        let failed = |index: usize, e: zk::Error| {
            let op = &ops[index.min(ops.len() - 1)];
            let expected = match op {
                Op::Check { version, .. } => Some(*version),
                Op::Set { version, .. } | Op::Delete { version, .. } => *version,
                Op::Create { .. } => None,
            };
            CoordError::MultiFailed {
                index,
                cause: Box::new(map_err(e, op.path(), expected)),
            }
        };
        for (index, op) in ops.iter().enumerate() {
            add(&mut w, op).map_err(|e| failed(index, e))?;
        }
        match self.rt.block_on(w.commit()) {
            Ok(_) => Ok(()),
            Err(zk::MultiWriteError::OperationFailed { index, source }) => {
                Err(failed(index, source))
            }
            Err(zk::MultiWriteError::RequestFailed { source }) => {
                Err(map_err(source, "(multi)", None))
            }
        }
    }

    fn read_many(&self, reads: &[Read]) -> Result<Vec<ReadResult>> {
        for r in reads {
            validate_path(r.path())?;
        }
        let c = self.client()?;
        let mut out = Vec::with_capacity(reads.len());
        // Bounded requests: a multiRead answer is one ZooKeeper packet (jute.maxbuffer).
        for chunk in reads.chunks(MULTI_READ_CHUNK) {
            let mut r = c.new_multi_reader();
            for read in chunk {
                match read {
                    Read::Data(p) => r.add_get_data(p),
                    Read::Children(p) => r.add_get_children(p),
                }
                .map_err(|e| map_err(e, read.path(), None))?;
            }
            let results = self
                .rt
                .block_on(r.commit())
                .map_err(|e| map_err(e, "(multiRead)", None))?;
            if results.len() != chunk.len() {
                return Err(CoordError::Zk {
                    path: "(multiRead)".into(),
                    message: format!("{} answers to {} reads", results.len(), chunk.len()),
                });
            }
            for (read, res) in chunk.iter().zip(results) {
                out.push(match res {
                    zk::MultiReadResult::Data { data, stat: s } => ReadResult::Data(data, stat(&s)),
                    zk::MultiReadResult::Children { mut children } => {
                        if read.path() == "/" && self.chroot == "/" {
                            children.retain(|n| n != "zookeeper");
                        }
                        children.sort();
                        ReadResult::Children(children)
                    }
                    zk::MultiReadResult::Error {
                        err: zk::Error::NoNode,
                    } => ReadResult::NoNode,
                    zk::MultiReadResult::Error { err } => {
                        return Err(map_err(err, read.path(), None))
                    }
                    other => {
                        return Err(CoordError::Zk {
                            path: read.path().into(),
                            message: format!("unexpected multiRead answer {other:?}"),
                        })
                    }
                });
            }
        }
        Ok(out)
    }

    fn ensure_path(&self, path: &str) -> Result<()> {
        validate_path(path)?;
        if path == "/" || self.exists(path)?.is_some() {
            return Ok(());
        }
        let c = self.client()?;
        self.rt
            .block_on(c.mkdir(path, &persistent()))
            .map_err(|e| map_err(e, path, None))
    }

    fn watch(&self, path: &str) -> Result<Watch> {
        validate_path(path)?;
        let c = self.client()?;
        let mut watcher = self
            .rt
            .block_on(c.watch(path, zk::AddWatchMode::PersistentRecursive))
            .map_err(|e| map_err(e, path, None))?;
        let (tx, rx) = mpsc::channel();
        let mut state = c.state_watcher();
        drop(c);
        let shared = Arc::clone(&self.client);
        let path = path.to_string();
        // zookeeper-client 0.11.2 does not re-register persistent watches after a
        // reconnect (its SetWatches request omits them), so this task follows the session
        // state and adds the watch again after every reconnection, reporting Resync.
        let task = self.rt.spawn(async move {
            let mut disconnected = false;
            loop {
                tokio::select! {
                    ev = watcher.changed() => {
                        let out = match ev.event_type {
                            zk::EventType::NodeCreated => WatchEvent::Created(ev.path),
                            zk::EventType::NodeDeleted => WatchEvent::Deleted(ev.path),
                            zk::EventType::NodeDataChanged => WatchEvent::DataChanged(ev.path),
                            zk::EventType::NodeChildrenChanged => continue,
                            // After a terminal session event the watcher must not be polled
                            // again (the crate panics on a closed stream).
                            zk::EventType::Session if ev.session_state.is_terminated() => {
                                let _ = tx.send(WatchEvent::SessionLost);
                                return;
                            }
                            zk::EventType::Session => continue,
                        };
                        if tx.send(out).is_err() {
                            return;
                        }
                    }
                    st = state.changed() => match st {
                        zk::SessionState::Disconnected => disconnected = true,
                        zk::SessionState::SyncConnected | zk::SessionState::ConnectedReadOnly => {
                            if !disconnected {
                                continue;
                            }
                            let client = shared.lock().unwrap_or_else(|e| e.into_inner()).clone();
                            let Some(client) = client else {
                                let _ = tx.send(WatchEvent::SessionLost);
                                return;
                            };
                            match client.watch(&path, zk::AddWatchMode::PersistentRecursive).await {
                                Ok(w) => {
                                    watcher = w;
                                    disconnected = false;
                                    if tx.send(WatchEvent::Resync).is_err() {
                                        return;
                                    }
                                }
                                // Lost again before the watch was added: retry on the next
                                // SyncConnected.
                                Err(_) => continue,
                            }
                        }
                        _ => {
                            let _ = tx.send(WatchEvent::SessionLost);
                            return;
                        }
                    },
                }
            }
        });
        Ok(Watch::new(
            rx,
            Some(Box::new(AbortOnDrop(task.abort_handle()))),
        ))
    }

    fn sync(&self, path: &str) -> Result<()> {
        validate_path(path)?;
        let c = self.client()?;
        self.rt
            .block_on(c.sync(path))
            .map_err(|e| map_err(e, path, None))
    }

    fn session_id(&self) -> u64 {
        self.session
    }

    fn describe(&self) -> String {
        super::CoordSpec::ZooKeeper {
            servers: self.servers.clone(),
            chroot: self.chroot.clone(),
        }
        .to_string()
    }

    fn close(&self) {
        let c = self.client.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(c) = c {
            // Dropping the last handle makes the session task send CloseSession; wait
            // (bounded) until it reports the session closed so ephemerals are gone at once.
            let mut w = c.state_watcher();
            drop(c);
            self.rt.block_on(async {
                let _ = tokio::time::timeout(Duration::from_secs(3), async {
                    while !w.peek_state().is_terminated() {
                        w.changed().await;
                    }
                })
                .await;
            });
        }
    }
}

impl Drop for ZkCoord {
    fn drop(&mut self) {
        self.close();
    }
}
