//! Durable storage of the monitor's map: the [`MapStore`] trait and its file journal.
//!
//! The journal is a file of lines `CRC32C-HEX SPACE JSON`: first a `create` record with the
//! fsid, then one `proposal` record per committed proposal with its epoch and changes.
//! Each commit appends one line and `fdatasync`s it before the monitor answers anyone.
//! Loading replays the records; a torn last line (a crash in the middle of an append) is
//! cut off, since nobody was answered for it; a bad line anywhere else is corruption.
//! (The coordination backend of a later issue can implement [`MapStore`] too.)

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::error::{MonitorError, Result};
use super::map::{Change, ClusterMap};

/// Where the monitor keeps its map.
pub trait MapStore: Send {
    /// The stored map, or `None` if the store is empty (a new cluster).
    fn load(&mut self) -> Result<Option<ClusterMap>>;
    /// Records a new cluster (before anything else).
    fn create(&mut self, fsid: Uuid) -> Result<()>;
    /// Durably records one proposal; returns only once it would survive a crash.
    fn commit(&mut self, epoch: u64, changes: &[Change]) -> Result<()>;
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
    file: Option<File>,
}

impl FileJournal {
    pub fn new(path: impl Into<PathBuf>) -> FileJournal {
        FileJournal {
            path: path.into(),
            file: None,
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn err(&self, what: &'static str) -> impl FnOnce(std::io::Error) -> MonitorError + '_ {
        move |source| MonitorError::Journal {
            path: self.path.clone(),
            what,
            source,
        }
    }

    fn corrupt(&self, line: usize, reason: impl Into<String>) -> MonitorError {
        MonitorError::JournalCorrupt {
            path: self.path.clone(),
            line,
            reason: reason.into(),
        }
    }

    fn append(&mut self, rec: &Record) -> Result<()> {
        if self.file.is_none() {
            let f = OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.path)
                .map_err(self.err("open for append"))?;
            self.file = Some(f);
        }
        let json = serde_json::to_string(rec).expect("records serialize");
        let line = format!("{:08x} {json}\n", crc32c::crc32c(json.as_bytes()));
        let path = self.path.clone();
        let f = self.file.as_mut().expect("opened above");
        let io = |what| {
            let path = path.clone();
            move |source| MonitorError::Journal { path, what, source }
        };
        f.write_all(line.as_bytes()).map_err(io("append"))?;
        f.sync_data().map_err(io("fdatasync"))?;
        Ok(())
    }

    fn parse(&self, lineno: usize, line: &str) -> Result<Record> {
        let (crc, json) = line
            .split_once(' ')
            .ok_or_else(|| self.corrupt(lineno, "no checksum"))?;
        let crc =
            u32::from_str_radix(crc, 16).map_err(|_| self.corrupt(lineno, "bad checksum field"))?;
        if crc32c::crc32c(json.as_bytes()) != crc {
            return Err(self.corrupt(lineno, "checksum mismatch"));
        }
        serde_json::from_str(json).map_err(|e| self.corrupt(lineno, e.to_string()))
    }
}

impl MapStore for FileJournal {
    fn load(&mut self) -> Result<Option<ClusterMap>> {
        let f = match File::open(&self.path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(self.err("open")(e)),
        };
        let mut lines = Vec::new();
        let mut reader = BufReader::new(f);
        loop {
            let mut buf = Vec::new();
            let n = reader
                .read_until(b'\n', &mut buf)
                .map_err(self.err("read"))?;
            if n == 0 {
                break;
            }
            lines.push(buf);
        }
        let mut map: Option<ClusterMap> = None;
        let mut good_len = 0u64;
        let count = lines.len();
        for (i, raw) in lines.iter().enumerate() {
            let lineno = i + 1;
            let last = i + 1 == count;
            let complete = raw.last() == Some(&b'\n');
            let parsed = std::str::from_utf8(raw)
                .map_err(|_| self.corrupt(lineno, "not UTF-8"))
                .and_then(|s| self.parse(lineno, s.trim_end_matches('\n')));
            let rec = match parsed {
                Ok(r) if complete => r,
                Ok(_) | Err(_) if last => {
                    // Torn tail of an append that never completed: nobody was answered.
                    let f = OpenOptions::new()
                        .write(true)
                        .open(&self.path)
                        .map_err(self.err("open to cut a torn tail"))?;
                    f.set_len(good_len).map_err(self.err("cut a torn tail"))?;
                    f.sync_all().map_err(self.err("fsync"))?;
                    break;
                }
                Ok(_) => unreachable!("only the last line can lack a newline"),
                Err(e) => return Err(e),
            };
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
            good_len += raw.len() as u64;
        }
        Ok(map)
    }

    fn create(&mut self, fsid: Uuid) -> Result<()> {
        self.append(&Record::Create { fsid })?;
        // Make the new file's directory entry durable too.
        if let Some(dir) = self.path.parent().filter(|p| !p.as_os_str().is_empty()) {
            File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(self.err("fsync of the directory"))?;
        }
        Ok(())
    }

    fn commit(&mut self, epoch: u64, changes: &[Change]) -> Result<()> {
        self.append(&Record::Proposal {
            epoch,
            changes: changes.to_vec(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replays_and_cuts_a_torn_tail() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mon.journal");
        let fsid = Uuid::new_v4();
        let mut j = FileJournal::new(&path);
        assert!(j.load().unwrap().is_none());
        j.create(fsid).unwrap();
        j.commit(
            1,
            &[Change::Alloc {
                id: 0,
                node: "n".into(),
                device: "/d".into(),
            }],
        )
        .unwrap();
        // A torn append.
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(b"deadbeef {\"record\":\"propos").unwrap();
        drop(f);
        let m = FileJournal::new(&path).load().unwrap().unwrap();
        assert_eq!(m.fsid, fsid);
        assert_eq!(m.epoch, 1);
        assert_eq!(m.daemons.len(), 1);
        // The tail was cut, so appending continues cleanly.
        let mut j = FileJournal::new(&path);
        j.load().unwrap();
        j.commit(2, &[Change::Remove { id: 0 }]).unwrap();
        let m = FileJournal::new(&path).load().unwrap().unwrap();
        assert_eq!(m.epoch, 2);
        assert!(m.daemons.is_empty());
    }

    #[test]
    fn corruption_in_the_middle_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mon.journal");
        let mut j = FileJournal::new(&path);
        j.create(Uuid::new_v4()).unwrap();
        j.commit(
            1,
            &[Change::Alloc {
                id: 0,
                node: "n".into(),
                device: "/d".into(),
            }],
        )
        .unwrap();
        j.commit(2, &[Change::Remove { id: 0 }]).unwrap();
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
