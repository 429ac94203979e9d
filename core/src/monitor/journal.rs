//! Durable storage of the monitor's map: the [`MapStore`] trait and its file journal.
//!
//! The journal is a [`LineLog`] (CRC-checked JSON lines, each fdatasynced before it
//! counts, a torn tail cut, any other bad line refused, one writer at a time): first a
//! `create` record with the fsid, then one `proposal` record per committed proposal with
//! its epoch and changes. The coordination backend ([`super::coord_store`]) implements
//! [`MapStore`] too.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::error::{MonitorError, Result};
use super::map::{Change, ClusterMap};
use crate::linelog::{LineLog, LineLogError};

/// Where the monitor keeps its map.
pub trait MapStore: Send {
    /// The stored map, or `None` if the store is empty (a new cluster).
    fn load(&mut self) -> Result<Option<ClusterMap>>;
    /// Records a new cluster (before anything else).
    fn create(&mut self, fsid: Uuid) -> Result<()>;
    /// Durably records one proposal: `changes` turn the stored map into `next` (epoch
    /// `next.epoch`); a store keeps whichever of the two it needs. Returns only once the
    /// proposal would survive a crash.
    fn commit(&mut self, next: &ClusterMap, changes: &[Change]) -> Result<()>;
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "record", rename_all = "snake_case")]
enum Record {
    Create { fsid: Uuid },
    Proposal { epoch: u64, changes: Vec<Change> },
}

/// The file journal.
#[derive(Debug)]
pub struct FileJournal {
    path: PathBuf,
    log: Option<LineLog<Record>>,
}

impl From<LineLogError> for MonitorError {
    fn from(e: LineLogError) -> MonitorError {
        match e {
            LineLogError::Io {
                path,
                what,
                cause: source,
            } => MonitorError::Journal {
                path,
                what,
                cause: source,
            },
            LineLogError::Corrupt { path, line, reason } => {
                MonitorError::JournalCorrupt { path, line, reason }
            }
            e @ LineLogError::Locked { .. } => MonitorError::Store(e.to_string()),
        }
    }
}

impl FileJournal {
    pub fn new(path: impl Into<PathBuf>) -> FileJournal {
        FileJournal {
            path: path.into(),
            log: None,
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn corrupt(&self, line: usize, reason: impl Into<String>) -> MonitorError {
        MonitorError::JournalCorrupt {
            path: self.path.clone(),
            line,
            reason: reason.into(),
        }
    }

    /// Opens (and locks) the log; returns its records when it opens it.
    fn open(&mut self) -> Result<Vec<Record>> {
        if self.log.is_some() {
            return Ok(Vec::new());
        }
        let (log, records) = LineLog::open(&self.path)?;
        self.log = Some(log);
        Ok(records)
    }

    fn append(&mut self, rec: &Record) -> Result<()> {
        self.open()?;
        Ok(self.log.as_mut().expect("opened above").append(rec)?)
    }
}

impl MapStore for FileJournal {
    fn load(&mut self) -> Result<Option<ClusterMap>> {
        // Every load replays the file (a second one must not see an empty journal and
        // make its caller create the map again).
        self.log = None;
        let records = self.open()?;
        let mut map: Option<ClusterMap> = None;
        for (i, rec) in records.into_iter().enumerate() {
            let lineno = i + 1;
            match (rec, map.as_mut()) {
                (Record::Create { fsid }, None) => map = Some(ClusterMap::new(fsid)),
                (Record::Create { .. }, Some(_)) => {
                    return Err(self.corrupt(lineno, "second create record"))
                }
                (Record::Proposal { .. }, None) => {
                    return Err(self.corrupt(lineno, "proposal before the create record"))
                }
                (Record::Proposal { epoch, changes }, Some(m)) => {
                    if epoch != m.epoch + 1 {
                        return Err(self
                            .corrupt(lineno, format!("epoch {epoch} follows epoch {}", m.epoch)));
                    }
                    for c in &changes {
                        m.apply(c).map_err(|e| {
                            self.corrupt(lineno, format!("change does not apply: {e}"))
                        })?;
                    }
                    m.epoch = epoch;
                }
            }
        }
        Ok(map)
    }

    fn create(&mut self, fsid: Uuid) -> Result<()> {
        self.append(&Record::Create { fsid })
    }

    fn commit(&mut self, next: &ClusterMap, changes: &[Change]) -> Result<()> {
        self.append(&Record::Proposal {
            epoch: next.epoch,
            changes: changes.to_vec(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// Commits `changes` on top of `map` (as the monitor does).
    fn commit(j: &mut FileJournal, map: &mut ClusterMap, changes: &[Change]) {
        for c in changes {
            map.apply(c).unwrap();
        }
        map.epoch += 1;
        j.commit(map, changes).unwrap();
    }

    fn alloc0() -> Change {
        Change::Alloc {
            id: 0,
            node: "n".into(),
            device: "/d".into(),
            host: String::new(),
            uuid: None,
        }
    }

    #[test]
    fn replays_and_cuts_a_torn_tail() {
        let dir = crate::testing::scratch();
        let path = dir.path().join("mon.journal");
        let fsid = Uuid::new_v4();
        let mut j = FileJournal::new(&path);
        assert!(j.load().unwrap().is_none());
        j.create(fsid).unwrap();
        let mut map = ClusterMap::new(fsid);
        commit(&mut j, &mut map, &[alloc0()]);
        // A second monitor on the same journal is refused while this one holds it.
        let e = FileJournal::new(&path).load().unwrap_err();
        assert!(e.to_string().contains("in use"), "{e}");
        drop(j);
        // A torn append.
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
        f.write_all(b"deadbeef {\"record\":\"propos").unwrap();
        drop(f);
        // The tail is cut, so appending continues cleanly.
        let mut j = FileJournal::new(&path);
        let m = j.load().unwrap().unwrap();
        assert_eq!(m.fsid, fsid);
        assert_eq!(m.epoch, 1);
        assert_eq!(m.daemons.len(), 1);
        let mut map = m;
        commit(&mut j, &mut map, &[Change::Remove { id: 0 }]);
        drop(j);
        let m = FileJournal::new(&path).load().unwrap().unwrap();
        assert_eq!(m.epoch, 2);
        assert!(m.daemons.is_empty());
    }

    #[test]
    fn a_line_that_does_not_replay_is_an_error() {
        let dir = crate::testing::scratch();
        let path = dir.path().join("mon.journal");
        let mut j = FileJournal::new(&path);
        let fsid = Uuid::new_v4();
        j.create(fsid).unwrap();
        let mut map = ClusterMap::new(fsid);
        commit(&mut j, &mut map, &[alloc0()]);
        commit(&mut j, &mut map, &[Change::Remove { id: 0 }]);
        drop(j);
        let mut text = std::fs::read_to_string(&path).unwrap();
        text = text.replacen("\"epoch\":1", "\"epoch\":7", 1);
        std::fs::write(&path, text).unwrap();
        let e = FileJournal::new(&path).load().unwrap_err();
        assert!(
            matches!(e, MonitorError::JournalCorrupt { line: 2, .. }),
            "{e}"
        );
    }
}
