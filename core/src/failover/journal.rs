//! The operation journal: every operation id with its arguments, its state and its result.
//! It makes an operation run at most once (a second submission of the same id finds the
//! first) and its result deliverable later by any node (the result stays in the journal).
//!
//! [`OpJournal`] is the small trait. [`FileJournal`] (the default) is a
//! [`crate::linelog::LineLog`] owned by the block service, each record fsynced before it
//! counts, replayed on open. [`super::coord_journal::CoordJournal`] keeps the same records in the coordination
//! backend (embedded store or ZooKeeper).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::dispatcher::Epoch;
use super::wire::{Op, OpResult};
use crate::linelog::{self, LineLog, LineLogError};

/// One journal record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "rec", rename_all = "snake_case")]
pub enum Record {
    /// An execution started.
    Started {
        op_id: String,
        op: Op,
        epoch: Epoch,
        node: u32,
        tag: Option<String>,
    },
    /// It finished with this result (`bytes` = data it wrote).
    Done {
        op_id: String,
        result: OpResult,
        bytes: u64,
    },
    /// It was abandoned (session-bound submission whose submitter went away, or a restart
    /// of the service); `bytes` = data written before it stopped, wasted.
    Aborted { op_id: String, bytes: u64 },
    /// The highest holder epoch seen (fencing survives a restart).
    Epoch { epoch: Epoch },
}

/// The state of one operation id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OpState {
    Running { op: Op },
    Done { op: Op, result: OpResult },
    Aborted { op: Op },
}

impl OpState {
    pub fn op(&self) -> &Op {
        match self {
            OpState::Running { op } | OpState::Done { op, .. } | OpState::Aborted { op } => op,
        }
    }
}

/// Errors of the journal.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("journal {path}: {cause}")]
    Io {
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error("journal {path} line {line}: {msg}")]
    Corrupt {
        path: PathBuf,
        line: usize,
        msg: String,
    },
    /// The coordination backend failed (a [`super::coord_journal::CoordJournal`]).
    #[error("journal {root} in the coordination backend: {cause}")]
    Coord {
        root: String,
        cause: crate::coord::CoordError,
    },
    /// A record in the coordination backend does not decode.
    #[error("journal {root}: {path}: {msg}")]
    BadEntry {
        root: String,
        path: String,
        msg: String,
    },
}

/// What an operation journal offers.
pub trait OpJournal: Send {
    /// Appends a record durably and applies it.
    fn append(&mut self, rec: Record) -> Result<(), JournalError>;
    /// The in-memory index of every record appended or recovered so far.
    fn index(&self) -> &Index;
    fn state(&self, op_id: &str) -> Option<&OpState> {
        self.index().ops.get(op_id)
    }
    fn max_epoch(&self) -> Epoch {
        self.index().max_epoch.unwrap_or(Epoch::ZERO)
    }
    /// Operation ids whose execution started and neither finished nor was abandoned.
    fn running(&self) -> Vec<String> {
        self.index().running()
    }
}

/// Applies records to an in-memory index.
#[derive(Debug, Default, Clone)]
pub struct Index {
    pub ops: HashMap<String, OpState>,
    pub max_epoch: Option<Epoch>,
}

impl Index {
    pub fn apply(&mut self, rec: &Record) {
        match rec {
            Record::Started {
                op_id, op, epoch, ..
            } => {
                self.ops
                    .insert(op_id.clone(), OpState::Running { op: op.clone() });
                self.bump(*epoch);
            }
            Record::Done { op_id, result, .. } => {
                if let Some(s) = self.ops.get_mut(op_id) {
                    *s = OpState::Done {
                        op: s.op().clone(),
                        result: result.clone(),
                    };
                }
            }
            Record::Aborted { op_id, .. } => {
                if let Some(s) = self.ops.get_mut(op_id) {
                    *s = OpState::Aborted { op: s.op().clone() };
                }
            }
            Record::Epoch { epoch } => self.bump(*epoch),
        }
    }
    pub fn running(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .ops
            .iter()
            .filter(|(_, s)| matches!(s, OpState::Running { .. }))
            .map(|(k, _)| k.clone())
            .collect();
        v.sort();
        v
    }
    fn bump(&mut self, e: Epoch) {
        self.max_epoch = Some(self.max_epoch.map_or(e, |m| m.max(e)));
    }
}

/// The operation journal in a file: a [`LineLog`] (CRC-checked JSON lines, each
/// fdatasynced before it counts, a torn tail cut, any other bad line refused, one writer).
#[derive(Debug)]
pub struct FileJournal {
    log: LineLog<Record>,
    index: Index,
}

impl From<LineLogError> for JournalError {
    fn from(e: LineLogError) -> JournalError {
        match e {
            LineLogError::Io {
                path,
                cause: source,
                ..
            } => JournalError::Io {
                path,
                cause: source,
            },
            LineLogError::Corrupt { path, line, reason } => JournalError::Corrupt {
                path,
                line,
                msg: reason,
            },
            LineLogError::Locked { path } => JournalError::Io {
                path,
                cause: std::io::Error::new(
                    std::io::ErrorKind::ResourceBusy,
                    "in use by another block service (locked)",
                ),
            },
        }
    }
}

impl FileJournal {
    /// Opens (creating and locking) the journal and replays it.
    pub fn open(path: &Path) -> Result<FileJournal, JournalError> {
        let (log, records) = LineLog::open(path)?;
        let mut index = Index::default();
        for r in &records {
            index.apply(r);
        }
        Ok(FileJournal { log, index })
    }
}

/// Reads every record of a journal file without opening it for writing (for the
/// experiment's accounting while the service runs).
pub fn read_records(path: &Path) -> Result<Vec<Record>, JournalError> {
    Ok(linelog::read_records(path)?)
}

impl OpJournal for FileJournal {
    fn append(&mut self, rec: Record) -> Result<(), JournalError> {
        self.log.append(&rec)?;
        self.index.apply(&rec);
        Ok(())
    }
    fn index(&self) -> &Index {
        &self.index
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replay_restores_states_and_epoch() {
        let dir = crate::testing::scratch();
        let p = dir.path().join("j");
        let e = Epoch {
            counter: 3,
            node: 1,
        };
        let delete_started = |op_id: &str, name: &str| Record::Started {
            op_id: op_id.into(),
            op: Op::Delete { name: name.into() },
            epoch: e,
            node: 1,
            tag: None,
        };
        {
            let mut j = FileJournal::open(&p).unwrap();
            j.append(delete_started("a", "x")).unwrap();
            j.append(Record::Done {
                op_id: "a".into(),
                result: OpResult::Deleted { name: "x".into() },
                bytes: 0,
            })
            .unwrap();
            j.append(delete_started("b", "y")).unwrap();
        }
        // A torn tail from a crash mid-append is ignored.
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new().append(true).open(&p).unwrap();
        f.write_all(b"0123abcd {\"rec\":\"done\",\"op_").unwrap();
        let j = FileJournal::open(&p).unwrap();
        assert_eq!(j.max_epoch(), e);
        assert!(matches!(j.state("a"), Some(OpState::Done { .. })));
        assert!(matches!(j.state("b"), Some(OpState::Running { .. })));
        assert!(j.state("c").is_none());
    }
}
