//! An append-only log file of records, one line each: `CRC32C-HEX SPACE JSON`. The one
//! journal format of the crate (the monitor's map journal, the failover operation journal).
//!
//! * An append writes one line and `fdatasync`s it before it counts.
//! * Replay returns every record in order. A last line without its newline is the torn
//!   tail of an append that never completed (nobody was answered for it): it is cut off.
//!   Any other bad line — a checksum mismatch, bad JSON, a complete last line that does
//!   not verify — is corruption and refused, so that an acknowledged record is never
//!   silently dropped.
//! * The file is locked (`flock`) while a [`LineLog`] holds it: a second writer, in this
//!   process or another, is refused instead of interleaving records.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::marker::PhantomData;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::Serialize;

/// Errors of a line log.
#[derive(Debug, thiserror::Error)]
pub enum LineLogError {
    #[error("{path}: {what}: {cause}")]
    Io {
        path: PathBuf,
        what: &'static str,
        cause: std::io::Error,
    },
    #[error("{path} line {line}: {reason}")]
    Corrupt {
        path: PathBuf,
        line: usize,
        reason: String,
    },
    #[error("{path} is in use by another writer (locked)")]
    Locked { path: PathBuf },
}

/// An open, locked log of records `R`.
#[derive(Debug)]
pub struct LineLog<R> {
    path: PathBuf,
    file: File,
    _records: PhantomData<fn(R)>,
}

fn io<'a>(path: &'a Path, what: &'static str) -> impl FnOnce(std::io::Error) -> LineLogError + 'a {
    move |source| LineLogError::Io {
        path: path.to_path_buf(),
        what,
        cause: source,
    }
}

/// Encodes one record as its line (with the newline).
pub fn encode_line<R: Serialize>(rec: &R) -> Vec<u8> {
    let json = serde_json::to_string(rec).expect("journal records serialize");
    format!("{:08x} {json}\n", crc32c::crc32c(json.as_bytes())).into_bytes()
}

/// Decodes one line (without its newline).
fn decode_line<R: DeserializeOwned>(line: &[u8]) -> Result<R, String> {
    let s = std::str::from_utf8(line).map_err(|_| "not UTF-8".to_string())?;
    let (crc, json) = s.split_once(' ').ok_or("no checksum")?;
    let crc = u32::from_str_radix(crc, 16).map_err(|_| "bad checksum field".to_string())?;
    if crc32c::crc32c(json.as_bytes()) != crc {
        return Err("checksum mismatch".into());
    }
    serde_json::from_str(json).map_err(|e| e.to_string())
}

/// Replays `path`: the records and the length of the valid prefix (everything but a torn
/// last line). A missing file is empty.
fn replay<R: DeserializeOwned>(path: &Path) -> Result<(Vec<R>, u64, bool), LineLogError> {
    let f = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((Vec::new(), 0, false)),
        Err(e) => return Err(io(path, "open")(e)),
    };
    let mut r = BufReader::new(f);
    let mut out = Vec::new();
    let mut good = 0u64;
    let mut buf = Vec::new();
    for line in 1.. {
        buf.clear();
        if r.read_until(b'\n', &mut buf).map_err(io(path, "read"))? == 0 {
            return Ok((out, good, false));
        }
        if buf.last() != Some(&b'\n') {
            // Torn tail: only the last line can lack its newline.
            return Ok((out, good, true));
        }
        let rec = decode_line(&buf[..buf.len() - 1]).map_err(|reason| LineLogError::Corrupt {
            path: path.to_path_buf(),
            line,
            reason,
        })?;
        out.push(rec);
        good += buf.len() as u64;
    }
    unreachable!("the loop returns")
}

impl<R: Serialize + DeserializeOwned> LineLog<R> {
    /// Opens (creating it if missing) and locks the log at `path`, cuts a torn tail, and
    /// returns it with its records.
    pub fn open(path: &Path) -> Result<(LineLog<R>, Vec<R>), LineLogError> {
        let created = !path.exists();
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .read(true)
            .open(path)
            .map_err(io(path, "open for append"))?;
        if rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive).is_err() {
            return Err(LineLogError::Locked {
                path: path.to_path_buf(),
            });
        }
        if created {
            // Make the new file's directory entry durable too.
            if let Some(dir) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
                File::open(dir)
                    .and_then(|d| d.sync_all())
                    .map_err(io(path, "fsync of the directory"))?;
            }
        }
        let (records, good, torn) = replay(path)?;
        if torn {
            file.set_len(good).map_err(io(path, "cut a torn tail"))?;
            file.sync_all().map_err(io(path, "fsync"))?;
        }
        Ok((
            LineLog {
                path: path.to_path_buf(),
                file,
                _records: PhantomData,
            },
            records,
        ))
    }

    /// Appends one record durably (write + fdatasync).
    pub fn append(&mut self, rec: &R) -> Result<(), LineLogError> {
        self.file
            .write_all(&encode_line(rec))
            .map_err(io(&self.path, "append"))?;
        self.file.sync_data().map_err(io(&self.path, "fdatasync"))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Reads the records of a log without opening it for writing (no lock, no cut): for
/// readers such as an experiment's accounting while the writer runs. A torn last line is
/// left out.
pub fn read_records<R: DeserializeOwned>(path: &Path) -> Result<Vec<R>, LineLogError> {
    replay(path).map(|(r, _, _)| r)
}

#[cfg(test)]
mod tests {
    use super::*;

    type Log = LineLog<(u32, String)>;

    #[test]
    fn replay_cut_torn_tail_refuse_corruption_and_second_writer() {
        let dir = crate::testing::scratch();
        let p = dir.path().join("j");
        let (mut log, recs) = Log::open(&p).unwrap();
        assert!(recs.is_empty());
        log.append(&(1, "a".into())).unwrap();
        log.append(&(2, "b".into())).unwrap();
        assert!(matches!(Log::open(&p), Err(LineLogError::Locked { .. })));
        drop(log);
        // A torn append is cut, and appending continues on a fresh line.
        std::fs::OpenOptions::new()
            .append(true)
            .open(&p)
            .unwrap()
            .write_all(b"deadbeef [3,\"c")
            .unwrap();
        assert_eq!(read_records::<(u32, String)>(&p).unwrap().len(), 2);
        let (mut log, recs) = Log::open(&p).unwrap();
        assert_eq!(recs, vec![(1, "a".into()), (2, "b".into())]);
        log.append(&(3, "c".into())).unwrap();
        drop(log);
        assert_eq!(Log::open(&p).unwrap().1.len(), 3);
        // A complete line that does not verify is corruption, also when it is the last.
        let mut text = std::fs::read_to_string(&p).unwrap();
        text = text.replace("\"c\"", "\"x\"");
        std::fs::write(&p, text).unwrap();
        match Log::open(&p) {
            Err(LineLogError::Corrupt { line, reason, .. }) => {
                assert_eq!(line, 3);
                assert!(reason.contains("checksum"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
    }
}
