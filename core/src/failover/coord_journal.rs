//! The operation journal in the coordination backend (`core::coord`: embedded store or
//! ZooKeeper), so the record of every operation and its result lives where every node can
//! read it, not in the block service's own file.
//!
//! Layout under `root` (e.g. `/blocklab/failover`):
//! * `ops/<hex(op_id)>`: JSON [`Entry`]: every record of that operation id in order.
//!   A `Started` record for a new id is a `create` (fails if another writer got there
//!   first: at most once even with two writers); later records are version-checked `set`s.
//! * `epoch`: the highest holder epoch, raised with a version-checked `set`.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use super::dispatcher::Epoch;
use super::journal::{Index, JournalError, OpJournal, Record};
use crate::coord::{ensure_path, Coord, CoordError, NodeKind};

/// What is stored per operation id.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Entry {
    pub records: Vec<Record>,
}

/// An [`OpJournal`] over a [`Coord`] session.
pub struct CoordJournal {
    coord: Box<dyn Coord>,
    root: String,
    index: Index,
    versions: HashMap<String, i32>,
    epoch_version: i32,
}

impl std::fmt::Debug for CoordJournal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CoordJournal")
            .field("coord", &self.coord.describe())
            .field("root", &self.root)
            .finish()
    }
}

fn hex(s: &str) -> String {
    s.bytes().map(|b| format!("{b:02x}")).collect()
}

fn err(root: &str, source: CoordError) -> JournalError {
    JournalError::Coord {
        root: root.to_string(),
        cause: source,
    }
}

fn bad(root: &str, path: &str, e: impl std::fmt::Display) -> JournalError {
    JournalError::BadEntry {
        root: root.to_string(),
        path: path.to_string(),
        msg: e.to_string(),
    }
}

impl CoordJournal {
    /// Opens the journal under `root`, creating it, and loads every operation.
    pub fn open(coord: Box<dyn Coord>, root: &str) -> Result<CoordJournal, JournalError> {
        let ops = format!("{root}/ops");
        ensure_path(coord.as_ref(), &ops).map_err(|e| err(root, e))?;
        let epoch_path = format!("{root}/epoch");
        let mut index = Index::default();
        let epoch_version = match coord.get(&epoch_path) {
            Ok((data, stat)) => {
                if !data.is_empty() {
                    let e: Epoch =
                        serde_json::from_slice(&data).map_err(|e| bad(root, &epoch_path, e))?;
                    index.apply(&Record::Epoch { epoch: e });
                }
                stat.version
            }
            Err(CoordError::NoNode(_)) => {
                match coord.create(&epoch_path, b"", NodeKind::Persistent) {
                    Ok(s) => s.version,
                    Err(CoordError::NodeExists(_)) => {
                        coord.get(&epoch_path).map_err(|e| err(root, e))?.1.version
                    }
                    Err(e) => return Err(err(root, e)),
                }
            }
            Err(e) => return Err(err(root, e)),
        };
        let mut versions = HashMap::new();
        for child in coord.children(&ops).map_err(|e| err(root, e))? {
            let path = format!("{ops}/{child}");
            let (data, stat) = coord.get(&path).map_err(|e| err(root, e))?;
            let entry: Entry = serde_json::from_slice(&data).map_err(|e| bad(root, &path, e))?;
            let mut op_id = None;
            for r in &entry.records {
                if let Record::Started { op_id: id, .. } = r {
                    op_id = Some(id.clone());
                }
                index.apply(r);
            }
            if let Some(id) = op_id {
                versions.insert(id, stat.version);
            }
        }
        Ok(CoordJournal {
            coord,
            root: root.to_string(),
            index,
            versions,
            epoch_version,
        })
    }

    fn op_path(&self, op_id: &str) -> String {
        format!("{}/ops/{}", self.root, hex(op_id))
    }

    /// Every record of every operation (per operation in order), for accounting.
    pub fn all_records(&self) -> Result<Vec<Record>, JournalError> {
        let ops = format!("{}/ops", self.root);
        let mut out = Vec::new();
        for child in self.coord.children(&ops).map_err(|e| err(&self.root, e))? {
            let path = format!("{ops}/{child}");
            let (data, _) = self.coord.get(&path).map_err(|e| err(&self.root, e))?;
            let entry: Entry =
                serde_json::from_slice(&data).map_err(|e| bad(&self.root, &path, e))?;
            out.extend(entry.records);
        }
        Ok(out)
    }

    fn append_op(&mut self, op_id: &str, rec: Record) -> Result<(), JournalError> {
        let path = self.op_path(op_id);
        match self.versions.get(op_id).copied() {
            None => {
                let data = serde_json::to_vec(&Entry {
                    records: vec![rec.clone()],
                })
                .map_err(|e| bad(&self.root, &path, e))?;
                let stat = self
                    .coord
                    .create(&path, &data, NodeKind::Persistent)
                    .map_err(|e| err(&self.root, e))?;
                self.versions.insert(op_id.to_string(), stat.version);
            }
            Some(v) => {
                let (data, _) = self.coord.get(&path).map_err(|e| err(&self.root, e))?;
                let mut entry: Entry =
                    serde_json::from_slice(&data).map_err(|e| bad(&self.root, &path, e))?;
                entry.records.push(rec.clone());
                let data = serde_json::to_vec(&entry).map_err(|e| bad(&self.root, &path, e))?;
                let stat = self
                    .coord
                    .set(&path, &data, Some(v))
                    .map_err(|e| err(&self.root, e))?;
                self.versions.insert(op_id.to_string(), stat.version);
            }
        }
        self.index.apply(&rec);
        Ok(())
    }
}

impl OpJournal for CoordJournal {
    fn append(&mut self, rec: Record) -> Result<(), JournalError> {
        match &rec {
            Record::Started { op_id, .. }
            | Record::Done { op_id, .. }
            | Record::Aborted { op_id, .. } => {
                let id = op_id.clone();
                self.append_op(&id, rec)
            }
            Record::Epoch { epoch } => {
                let path = format!("{}/epoch", self.root);
                let data = serde_json::to_vec(epoch).map_err(|e| bad(&self.root, &path, e))?;
                let stat = self
                    .coord
                    .set(&path, &data, Some(self.epoch_version))
                    .map_err(|e| err(&self.root, e))?;
                self.epoch_version = stat.version;
                self.index.apply(&rec);
                Ok(())
            }
        }
    }
    fn index(&self) -> &Index {
        &self.index
    }
}
