//! The apply worker: committed entries are applied to the storage engine on a thread of
//! their own, with its own io_uring engine, so that the replica loop goes on handling
//! frames while a batch is being written.
//!
//! Why a thread: applying is local work that nothing in the protocol waits for, but its
//! writes take from tens of µs to a few ms on a busy machine. Done inside the loop, an
//! acknowledgement that arrives meanwhile waits for it, and so does everything the
//! acknowledgement triggers: the next commit, and the notifications and client answers
//! that follow it. (Measured, when `idle` still waited for each secondary's own
//! acknowledgement: with the primary applying inside its loop, the slower secondary's
//! acknowledgement typically arrived during the apply of the entry just committed, and
//! `single` writes at RTT 0 gave `idle` apply-lag tails of 1–2 ms that `eager` did not
//! have; without the primary's apply they were gone.) TiKV's apply pool and etcd's
//! application loop separate the two for the same reason.
//!
//! Batches are applied in the order they were handed over, one at a time; the store is
//! shared with the loop behind a mutex for the primary's admission checks
//! ([`KvStore::check`], [`KvStore::reserve`]) and status answers. The worker holds it only
//! to plan a batch and to commit it ([`KvStore::plan`], [`KvStore::commit`]), not while
//! the batch's slots are written, so a proposal never waits for the device.

use std::sync::{mpsc, Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Instant;

use crate::dev::{DevError, UringEngine};

use super::kv::{Invalid, KvError, KvStore};
use super::protocol::Entry;

/// A batch the worker applied.
#[derive(Debug)]
pub struct Applied {
    pub entries: Vec<Entry>,
    /// When its writes completed.
    pub at: Instant,
    /// Entries skipped as invalid, with why.
    pub rejected: Vec<(u64, Invalid)>,
}

/// The apply worker of one replica.
#[derive(Debug)]
pub struct Applier {
    kv: Arc<Mutex<KvStore>>,
    tx: Option<mpsc::Sender<Vec<Entry>>>,
    thread: Option<JoinHandle<Result<(), KvError>>>,
}

impl Applier {
    /// Starts the worker on `kv`. `done` is called on the worker's thread after every
    /// batch, and with `None` once an error stopped it (nothing handed over later is
    /// applied; [`Applier::finish`] returns the error).
    pub fn spawn(
        kv: KvStore,
        done: impl FnMut(Option<Applied>) + Send + 'static,
    ) -> Result<Applier, DevError> {
        let eng = UringEngine::with_queue_depth(64)?;
        let kv = Arc::new(Mutex::new(kv));
        let (tx, rx) = mpsc::channel::<Vec<Entry>>();
        let shared = kv.clone();
        let thread = std::thread::Builder::new()
            .name("repl-apply".into())
            .spawn(move || work(eng, &shared, &rx, done))
            .map_err(|source| DevError::Config(format!("starting the apply thread: {source}")))?;
        Ok(Applier {
            kv,
            tx: Some(tx),
            thread: Some(thread),
        })
    }

    /// Hands committed entries over (in commit order).
    pub fn submit(&self, entries: Vec<Entry>) {
        if let Some(tx) = &self.tx {
            // A worker that stopped on an error has reported it through `done`.
            let _ = tx.send(entries);
        }
    }

    /// The store, for checks and reads between batches.
    pub fn store(&self) -> MutexGuard<'_, KvStore> {
        self.kv.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Applies everything handed over, stops the worker and returns the applied index, or
    /// the error that stopped it.
    pub fn finish(mut self) -> Result<u64, KvError> {
        match self.stop() {
            Some(Ok(r)) => r?,
            Some(Err(panic)) => std::panic::resume_unwind(panic),
            None => {}
        }
        Ok(self.store().applied())
    }

    /// Closes the hand-over channel and waits for the worker to drain it.
    fn stop(&mut self) -> Option<std::thread::Result<Result<(), KvError>>> {
        self.tx = None;
        self.thread.take().map(JoinHandle::join)
    }
}

impl Drop for Applier {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

fn work(
    mut eng: UringEngine,
    kv: &Mutex<KvStore>,
    rx: &mpsc::Receiver<Vec<Entry>>,
    mut done: impl FnMut(Option<Applied>),
) -> Result<(), KvError> {
    let lock = || kv.lock().unwrap_or_else(|e| e.into_inner());
    for entries in rx {
        // The store is locked to plan and to commit, not while the slots are written, so
        // the loop's admission checks and status answers do not wait for the device.
        // (The plan's guard must be dropped before the commit locks again.)
        let plan = lock().plan(&entries);
        let applied = plan.and_then(|plan| {
            plan.write(&mut eng)?;
            lock().commit(plan)
        });
        match applied {
            Ok(rejected) => done(Some(Applied {
                entries,
                at: Instant::now(),
                rejected,
            })),
            Err(e) => {
                done(None);
                return Err(e);
            }
        }
    }
    Ok(())
}
