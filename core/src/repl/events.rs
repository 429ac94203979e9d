//! [`EventLog`]: a replica's timeline written to a file, so that an experiment running
//! every replica as its own process can put the processes' events on one clock.
//!
//! Times are `CLOCK_MONOTONIC` nanoseconds ([`MonoClock`]), which every process on the
//! machine shares. The replica loop only sends a small record over a channel; a writer
//! thread formats and writes them, flushing whenever the channel runs dry, so a replica
//! killed with SIGKILL loses at most the records of its last moments.
//!
//! One record per line, `kind,a,b,c,t_ns`:
//!
//! | kind | a | b | c | when |
//! |---|---|---|---|---|
//! | `propose` | index | | | primary: a client write was appended to the log |
//! | `commit` | commit index | | | primary: the commit advanced; secondary: it learned a larger commit |
//! | `apply` | first index | last index | | entries were applied to the storage engine |
//! | `persist` | first index | last index | log flushes so far | entries were made durable with one write |
//! | `peer` | secondary id | | | primary: connection to a secondary up |
//! | `counters` | empty appends sent | empty appends answered | probes sent | a counter changed |

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::thread::JoinHandle;
use std::time::Instant;

use super::hooks::Hooks;
use super::protocol::{Entry, NodeId, Stats};

/// `Instant`s as `CLOCK_MONOTONIC` nanoseconds (the clock `Instant` reads on Linux),
/// comparable across processes.
#[derive(Debug, Clone, Copy)]
pub struct MonoClock {
    base: Instant,
    base_ns: i64,
}

impl MonoClock {
    pub fn new() -> MonoClock {
        let base = Instant::now();
        let ts = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
        MonoClock {
            base,
            base_ns: ts.tv_sec * 1_000_000_000 + ts.tv_nsec,
        }
    }
    /// `t` in nanoseconds of `CLOCK_MONOTONIC`.
    pub fn ns(&self, t: Instant) -> i64 {
        if t >= self.base {
            self.base_ns + (t - self.base).as_nanos() as i64
        } else {
            self.base_ns - (self.base - t).as_nanos() as i64
        }
    }
    /// Now, in nanoseconds of `CLOCK_MONOTONIC`.
    pub fn now_ns(&self) -> i64 {
        self.ns(Instant::now())
    }
}

impl Default for MonoClock {
    fn default() -> Self {
        MonoClock::new()
    }
}

/// One record of the timeline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    Propose {
        index: u64,
    },
    Commit {
        commit: u64,
    },
    Apply {
        first: u64,
        last: u64,
    },
    Persist {
        first: u64,
        last: u64,
        flushes: u64,
    },
    Peer {
        id: NodeId,
    },
    Counters {
        empty_appends: u64,
        empty_responses: u64,
        probes: u64,
    },
}

impl Event {
    fn fields(&self) -> (&'static str, u64, u64, u64) {
        match *self {
            Event::Propose { index } => ("propose", index, 0, 0),
            Event::Commit { commit } => ("commit", commit, 0, 0),
            Event::Apply { first, last } => ("apply", first, last, 0),
            Event::Persist {
                first,
                last,
                flushes,
            } => ("persist", first, last, flushes),
            Event::Peer { id } => ("peer", u64::from(id), 0, 0),
            Event::Counters {
                empty_appends,
                empty_responses,
                probes,
            } => ("counters", empty_appends, empty_responses, probes),
        }
    }

    /// Parses one line written by [`EventLog`]: the event and its time.
    pub fn parse(line: &str) -> Option<(Event, i64)> {
        let f: Vec<&str> = line.split(',').collect();
        let [kind, a, b, c, t] = f[..] else {
            return None;
        };
        let num = |s: &str| s.parse::<u64>().ok();
        let (a, b, c) = (num(a)?, num(b)?, num(c)?);
        let t: i64 = t.parse().ok()?;
        let e = match kind {
            "propose" => Event::Propose { index: a },
            "commit" => Event::Commit { commit: a },
            "apply" => Event::Apply { first: a, last: b },
            "persist" => Event::Persist {
                first: a,
                last: b,
                flushes: c,
            },
            "peer" => Event::Peer {
                id: NodeId::try_from(a).ok()?,
            },
            "counters" => Event::Counters {
                empty_appends: a,
                empty_responses: b,
                probes: c,
            },
            _ => return None,
        };
        Some((e, t))
    }
}

/// Reads a timeline written by [`EventLog`]; a torn last line (a killed writer) is
/// skipped, any other bad line is an error naming it.
pub fn read_events(path: &Path) -> std::io::Result<Vec<(Event, i64)>> {
    let text = std::fs::read_to_string(path)?;
    let lines: Vec<&str> = text.lines().collect();
    let complete = if text.ends_with('\n') {
        lines.len()
    } else {
        lines.len().saturating_sub(1)
    };
    lines[..complete]
        .iter()
        .enumerate()
        .map(|(n, l)| {
            Event::parse(l).ok_or_else(|| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("{}:{}: not an event: {l:?}", path.display(), n + 1),
                )
            })
        })
        .collect()
}

/// [`Hooks`] that write the replica's timeline to a file (see the module docs).
#[derive(Debug)]
pub struct EventLog {
    clock: MonoClock,
    tx: Option<Sender<(Event, i64)>>,
    writer: Option<JoinHandle<()>>,
    last_counters: (u64, u64, u64),
}

impl EventLog {
    /// Creates (truncates) `path` and starts the writer thread.
    pub fn create(path: &Path) -> std::io::Result<EventLog> {
        let file = File::create(path)?;
        let (tx, rx) = channel();
        let writer = std::thread::Builder::new()
            .name("repl-events".into())
            .spawn(move || write_events(rx, BufWriter::with_capacity(64 << 10, file)))?;
        Ok(EventLog {
            clock: MonoClock::new(),
            tx: Some(tx),
            writer: Some(writer),
            last_counters: (0, 0, 0),
        })
    }

    fn record(&self, e: Event, t: Instant) {
        if let Some(tx) = &self.tx {
            let _ = tx.send((e, self.clock.ns(t)));
        }
    }
}

fn write_events(rx: Receiver<(Event, i64)>, mut out: BufWriter<File>) {
    let write = |out: &mut BufWriter<File>, (e, t): (Event, i64)| {
        let (k, a, b, c) = e.fields();
        writeln!(out, "{k},{a},{b},{c},{t}")
    };
    while let Ok(ev) = rx.recv() {
        if write(&mut out, ev).is_err() {
            return;
        }
        while let Ok(ev) = rx.try_recv() {
            if write(&mut out, ev).is_err() {
                return;
            }
        }
        if out.flush().is_err() {
            return;
        }
    }
    let _ = out.flush();
}

impl Drop for EventLog {
    fn drop(&mut self) {
        drop(self.tx.take());
        if let Some(w) = self.writer.take() {
            let _ = w.join();
        }
    }
}

impl Hooks for EventLog {
    fn proposed(&mut self, index: u64, now: Instant) {
        self.record(Event::Propose { index }, now);
    }
    fn committed(&mut self, commit: u64, now: Instant) {
        self.record(Event::Commit { commit }, now);
    }
    fn applied(&mut self, entries: &[Entry], now: Instant) {
        if let (Some(f), Some(l)) = (entries.first(), entries.last()) {
            self.record(
                Event::Apply {
                    first: f.index,
                    last: l.index,
                },
                now,
            );
        }
    }
    fn persisted(&mut self, first: u64, last: u64, flushes: u64) {
        self.record(
            Event::Persist {
                first,
                last,
                flushes,
            },
            Instant::now(),
        );
    }
    fn peer_connected(&mut self, peer: NodeId) {
        self.record(Event::Peer { id: peer }, Instant::now());
    }
    fn loop_done(&mut self, stats: &Stats) {
        let now = (stats.empty_appends, stats.empty_responses, stats.probes);
        if now != self.last_counters {
            self.last_counters = now;
            self.record(
                Event::Counters {
                    empty_appends: now.0,
                    empty_responses: now.1,
                    probes: now.2,
                },
                Instant::now(),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_print_and_parse_back() {
        let all = [
            Event::Propose { index: 7 },
            Event::Commit { commit: 9 },
            Event::Apply { first: 1, last: 4 },
            Event::Persist {
                first: 2,
                last: 2,
                flushes: 11,
            },
            Event::Peer { id: 3 },
            Event::Counters {
                empty_appends: 1,
                empty_responses: 2,
                probes: 3,
            },
        ];
        for e in all {
            let (k, a, b, c) = e.fields();
            let line = format!("{k},{a},{b},{c},-12");
            assert_eq!(Event::parse(&line), Some((e, -12)), "{line}");
        }
        assert_eq!(Event::parse("bogus,1,2,3,4"), None);
        assert_eq!(Event::parse("commit,1"), None);
    }

    #[test]
    fn a_log_is_read_back_and_a_torn_last_line_is_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("ev");
        {
            let mut log = EventLog::create(&p).unwrap();
            log.proposed(1, Instant::now());
            log.committed(1, Instant::now());
        }
        let ev = read_events(&p).unwrap();
        assert_eq!(ev.len(), 2);
        assert!(ev[0].1 <= ev[1].1);
        let mut text = std::fs::read_to_string(&p).unwrap();
        text.push_str("apply,1,");
        std::fs::write(&p, &text).unwrap();
        assert_eq!(read_events(&p).unwrap().len(), 2);
        std::fs::write(&p, "nonsense\n").unwrap();
        assert!(read_events(&p)
            .unwrap_err()
            .to_string()
            .contains("not an event"));
    }

    #[test]
    fn the_clock_agrees_with_clock_monotonic() {
        let c = MonoClock::new();
        let a = c.now_ns();
        let ts = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
        let b = ts.tv_sec * 1_000_000_000 + ts.tv_nsec;
        let a2 = c.now_ns();
        assert!(a <= b + 1_000_000 && b <= a2 + 1_000_000);
    }
}
