//! The baseline: the map as a JSON file ([`MapDoc`]) that editors rewrite
//! (read–modify–write, as an operator editing a config file would), copied to every
//! gateway's directory on an interval (as an rsync cron job would), and polled by gateways.
//! Failure detection is a keepalived-like heartbeat: each gateway rewrites
//! `HEARTBEAT_DIR/<node>` every advert interval; a party declares it dead after
//! `3 × advert + skew` without a beat (keepalived's master-down interval, skew
//! `(256 − priority)/256 × advert` with priority 100).

use super::follow::{emit, Follower, OnChange};
use super::view::{luns_from_doc, MapDoc, MapView, TargetDoc};
use super::{mono_ns, validate_iqn, validate_simple_name, Lun, LunMapError, Result, Target};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, RwLock};
use std::time::Duration;

/// File name of the map in the master and every gateway directory.
pub const MAP_FILE: &str = "lunmap.json";

fn io(path: &Path, source: std::io::Error) -> LunMapError {
    LunMapError::Io {
        path: path.display().to_string(),
        cause: source,
    }
}

/// Writes `bytes` to `path` atomically ([`crate::fsutil::write_atomic`]).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    crate::fsutil::write_atomic(path, bytes).map_err(|e| io(path, e))
}

/// Reads a map file; a missing file is an empty map.
pub fn read_doc(path: &Path) -> Result<MapDoc> {
    match std::fs::read(path) {
        Ok(b) => serde_json::from_slice(&b).map_err(|e| LunMapError::Corrupt {
            path: path.display().to_string(),
            reason: e.to_string(),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(MapDoc::default()),
        Err(e) => Err(io(path, e)),
    }
}

/// An editor of the master file. No locking: concurrent editors can overwrite each
/// other's changes, which is what the baseline measures.
#[derive(Debug, Clone)]
pub struct FileEditor {
    pub master: PathBuf,
}

impl FileEditor {
    pub fn new(master: impl Into<PathBuf>) -> FileEditor {
        FileEditor {
            master: master.into(),
        }
    }

    pub fn create_lun(&self, lun: Lun) -> Result<()> {
        validate_simple_name("LUN name", &lun.name)?;
        let mut doc = read_doc(&self.master)?;
        if doc.luns.iter().any(|l| l.lun.name == lun.name) {
            return Err(LunMapError::LunExists(lun.name));
        }
        doc.luns.push(super::view::LunDoc {
            lun,
            targets: Vec::new(),
        });
        write_atomic(
            &self.master,
            &serde_json::to_vec_pretty(&doc).expect("plain data"),
        )
    }

    /// Maps an initiator; returns whether the file changed (false: mapped already).
    pub fn map(&self, lun: &str, target: &Target, initiator: &str) -> Result<bool> {
        validate_iqn("target", &target.iqn)?;
        validate_iqn("initiator", initiator)?;
        let mut doc = read_doc(&self.master)?;
        let l = doc
            .luns
            .iter_mut()
            .find(|l| l.lun.name == lun)
            .ok_or_else(|| LunMapError::NoSuchLun(lun.into()))?;
        match l.targets.iter_mut().find(|t| t.target.iqn == target.iqn) {
            Some(t) if t.initiators.iter().any(|i| i == initiator) => return Ok(false),
            Some(t) => t.initiators.push(initiator.into()),
            None => l.targets.push(TargetDoc {
                target: target.clone(),
                initiators: vec![initiator.into()],
            }),
        }
        write_atomic(
            &self.master,
            &serde_json::to_vec_pretty(&doc).expect("plain data"),
        )?;
        Ok(true)
    }
}

/// Copies the master file into each directory every `interval` (rsync-like: temporary
/// file then rename, only when the content changed).
pub fn start_syncer(master: PathBuf, dests: Vec<PathBuf>, interval: Duration) -> Follower {
    Follower::spawn("filesync-copy", move |stop| {
        let mut last: Option<Vec<u8>> = None;
        while !stop.load(Ordering::SeqCst) {
            if let Ok(bytes) = std::fs::read(&master) {
                if last.as_deref() != Some(&bytes[..]) {
                    for d in &dests {
                        write_atomic(&d.join(MAP_FILE), &bytes)?;
                    }
                    last = Some(bytes);
                }
            }
            sleep_unless(&stop, interval);
        }
        Ok(())
    })
}

fn sleep_unless(stop: &std::sync::atomic::AtomicBool, d: Duration) {
    let end = std::time::Instant::now() + d;
    while !stop.load(Ordering::SeqCst) {
        let left = end.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return;
        }
        std::thread::sleep(left.min(Duration::from_millis(50)));
    }
}

/// Called when a polled map file does not parse, with the error
/// ([`LunMapError::Corrupt`]): the file is refused and the view keeps its last good map.
/// Called once per distinct content of the file.
pub type OnRefused = Box<dyn FnMut(&LunMapError) + Send>;

/// Polls `dir/lunmap.json` every `poll` and applies differences to `view`.
pub fn follow_file(
    dir: PathBuf,
    view: Arc<RwLock<MapView>>,
    on_change: OnChange,
    poll: Duration,
) -> Follower {
    follow_file_reporting(dir, view, on_change, Box::new(|_| {}), poll)
}

/// [`follow_file`] that also reports each map file it refuses to `on_refused`.
pub fn follow_file_reporting(
    dir: PathBuf,
    view: Arc<RwLock<MapView>>,
    mut on_change: OnChange,
    mut on_refused: OnRefused,
    poll: Duration,
) -> Follower {
    Follower::spawn("filesync-poll", move |stop| {
        let path = dir.join(MAP_FILE);
        let mut last: Option<Vec<u8>> = None;
        while !stop.load(Ordering::SeqCst) {
            if let Ok(bytes) = std::fs::read(&path) {
                if last.as_deref() != Some(&bytes[..]) {
                    // A file that does not parse is refused; the previous map stays.
                    match serde_json::from_slice::<MapDoc>(&bytes) {
                        Ok(doc) => emit(&view, &mut on_change, |v| {
                            v.replace_map(luns_from_doc(&doc))
                        }),
                        Err(e) => on_refused(&LunMapError::Corrupt {
                            path: path.display().to_string(),
                            reason: e.to_string(),
                        }),
                    }
                    last = Some(bytes);
                }
            }
            sleep_unless(&stop, poll);
        }
        Ok(())
    })
}

/// keepalived's master-down interval for an advert interval (priority 100).
pub fn master_down(advert: Duration) -> Duration {
    advert * 3 + advert * (256 - 100) / 256
}

/// Writes `dir/<node>` (CLOCK_MONOTONIC ns) every `advert`.
pub fn start_heartbeat(dir: PathBuf, node: String, advert: Duration) -> Follower {
    Follower::spawn("filesync-heartbeat", move |stop| {
        let path = dir.join(&node);
        while !stop.load(Ordering::SeqCst) {
            write_atomic(&path, mono_ns().to_string().as_bytes())?;
            sleep_unless(&stop, advert);
        }
        Ok(())
    })
}

/// Watches `dir` for heartbeats: a node is up while its last beat is younger than
/// [`master_down`]`(advert)`; reports GatewayUp/GatewayDown into `view`.
pub fn follow_heartbeats(
    dir: PathBuf,
    view: Arc<RwLock<MapView>>,
    mut on_change: OnChange,
    advert: Duration,
) -> Follower {
    let limit = master_down(advert).as_nanos() as u64;
    Follower::spawn("filesync-hb-watch", move |stop| {
        while !stop.load(Ordering::SeqCst) {
            let now = mono_ns();
            let mut alive = BTreeMap::new();
            if let Ok(rd) = std::fs::read_dir(&dir) {
                for e in rd.flatten() {
                    let name = e.file_name().to_string_lossy().to_string();
                    if name.contains(crate::fsutil::TEMP_MARKER) {
                        continue;
                    }
                    let beat = std::fs::read_to_string(e.path())
                        .ok()
                        .and_then(|s| s.trim().parse::<u64>().ok());
                    if beat.is_some_and(|b| now.saturating_sub(b) < limit) {
                        alive.insert(name, None);
                    }
                }
            }
            emit(&view, &mut on_change, |v| v.replace_gateways(alive));
            sleep_unless(&stop, advert / 10);
        }
        Ok(())
    })
}
