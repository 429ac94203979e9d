//! Keeping a gateway's [`MapView`] current: from a coordination watch ([`follow_coord`]) or,
//! for the baseline, by polling a copied file ([`super::filesync::follow_file`]).

use super::editor::LunMap;
use super::view::{Change, MapView, NodeEvent};
use super::{mono_ns, Layout, LunMapError, Result};
use crate::coord::{Coord, WatchEvent};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::thread::JoinHandle;
use std::time::Duration;

/// Called after each change is applied to the view, with CLOCK_MONOTONIC ns.
pub type OnChange = Box<dyn FnMut(&Change, u64) + Send>;

/// A running follower thread; stops when dropped.
pub struct Follower {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Result<()>>>,
}

impl std::fmt::Debug for Follower {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Follower").finish()
    }
}

impl Follower {
    pub(crate) fn spawn(
        name: &str,
        body: impl FnOnce(Arc<AtomicBool>) -> Result<()> + Send + 'static,
    ) -> Follower {
        let stop = Arc::new(AtomicBool::new(false));
        let s = Arc::clone(&stop);
        let thread = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || body(s))
            .expect("spawning a thread");
        Follower {
            stop,
            thread: Some(thread),
        }
    }

    /// True once the follower thread has ended (for example its session was lost).
    pub fn finished(&self) -> bool {
        self.thread.as_ref().is_none_or(|t| t.is_finished())
    }

    /// Stops the thread and returns how it ended ([`LunMapError::Panicked`] if it
    /// panicked).
    pub fn stop(mut self) -> Result<()> {
        self.stop.store(true, Ordering::SeqCst);
        match self.thread.take() {
            None => Ok(()),
            Some(t) => {
                let name = t.thread().name().unwrap_or("follower").to_string();
                t.join().unwrap_or(Err(LunMapError::Panicked(name)))
            }
        }
    }
}

impl Drop for Follower {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Applies `f` to the view under its write lock, then reports every change it returned
/// (all with one CLOCK_MONOTONIC time, taken after the lock is released).
pub(crate) fn emit(
    view: &RwLock<MapView>,
    on_change: &mut OnChange,
    f: impl FnOnce(&mut MapView) -> Vec<Change>,
) {
    let changes = {
        let mut v = view.write().unwrap_or_else(|e| e.into_inner());
        f(&mut v)
    };
    if changes.is_empty() {
        return;
    }
    let now = mono_ns();
    for c in &changes {
        on_change(c, now);
    }
}

/// Subscribes to the cluster's subtree, loads the map, then applies every event to `view`.
/// The initial load is done before this returns (so a gateway serves a complete map).
///
/// Events are handled in batches (everything queued when the follower wakes up). Events
/// that need no read (a mapping created or deleted, any node deleted) are applied and
/// reported first; then the nodes whose data the view keeps (LUNs, targets, gateways) are
/// read in one batched read and applied. Events of a LUN whose own node is among the reads
/// wait for that read, so a LUN and its first mappings arriving together apply in order.
pub fn follow_coord(
    coord: Arc<dyn Coord>,
    layout: Layout,
    view: Arc<RwLock<MapView>>,
    mut on_change: OnChange,
) -> Result<Follower> {
    let watch = coord.watch(&layout.root())?;
    {
        let map = LunMap::open(&*coord, &layout.cluster)?;
        let loaded = map.load()?;
        emit(&view, &mut on_change, |v| v.apply_loaded(loaded));
    }
    Ok(Follower::spawn("lunmap-follow", move |stop| {
        let map = LunMap::attach(&*coord, layout.clone());
        let classifier = MapView::new(layout);
        // After a reconnect, or when a read failed because the connection dropped, the
        // whole map is reloaded (retrying while the backend is away; other errors end
        // the follower, so a gateway never serves a silently frozen map).
        let mut need_reload = false;
        while !stop.load(Ordering::SeqCst) {
            if need_reload {
                match map.load() {
                    Ok(loaded) => {
                        need_reload = false;
                        emit(&view, &mut on_change, |v| v.apply_loaded(loaded));
                    }
                    Err(e) if transient(&e) => {
                        std::thread::sleep(Duration::from_millis(100));
                        continue;
                    }
                    Err(e) => return Err(e),
                }
            }
            let Some(first) = watch.recv_timeout(Duration::from_millis(100)) else {
                continue;
            };
            let mut batch = vec![first];
            while let Some(ev) = watch.try_recv() {
                batch.push(ev);
            }
            if batch.iter().any(|e| matches!(e, WatchEvent::SessionLost)) {
                return Err(crate::coord::CoordError::SessionExpired.into());
            }
            if batch.iter().any(|e| matches!(e, WatchEvent::Resync)) {
                need_reload = true;
                continue;
            }
            let plan = plan_batch(&classifier, &batch);
            emit(&view, &mut on_change, |v| {
                plan.now.iter().flat_map(|e| v.apply(e)).collect()
            });
            if plan.later.is_empty() {
                continue;
            }
            let read = match map.node_events(&plan.reads) {
                Ok(r) => r,
                Err(e) if transient(&e) => {
                    need_reload = true;
                    continue;
                }
                Err(e) => return Err(e),
            };
            emit(&view, &mut on_change, |v| {
                plan.later
                    .iter()
                    .flat_map(|step| match step {
                        Later::Event(e) => v.apply(e),
                        Later::Read(k) => v.apply(&read[*k]),
                    })
                    .collect()
            });
        }
        Ok(())
    }))
}

/// The second phase of a batch, in the batch's order.
#[derive(Debug, PartialEq, Eq)]
enum Later {
    Event(NodeEvent),
    /// The node read as `reads[k]`: its current data, or its removal.
    Read(usize),
}

#[derive(Debug, Default, PartialEq, Eq)]
struct Plan {
    /// Applied at once: no read needed.
    now: Vec<NodeEvent>,
    /// Nodes to read, each once.
    reads: Vec<String>,
    /// Applied after the reads.
    later: Vec<Later>,
}

/// Splits a batch of watch events into what can be applied without reading and what
/// needs (or must wait for) a read. A node's read stands at its first create/change in
/// the batch (and again at the first one after a delete of it); a read returns the node's
/// current data, so later changes of it in the batch need no read of their own. Pure:
/// tested without a backend.
fn plan_batch(classifier: &MapView, batch: &[WatchEvent]) -> Plan {
    use super::view::Kind;
    use std::collections::HashMap;
    let mut plan = Plan::default();
    // LUNs and gateways whose own node is read in this batch: their later events wait.
    let mut waiting: Vec<String> = Vec::new();
    // Node → index of its read, while no delete of it came after that read.
    let mut placed: HashMap<&str, usize> = HashMap::new();
    let mut read_index: HashMap<&str, usize> = HashMap::new();
    for ev in batch {
        let (path, upsert) = match ev {
            WatchEvent::Created(p) | WatchEvent::DataChanged(p) => (p.as_str(), true),
            WatchEvent::Deleted(p) => (p.as_str(), false),
            WatchEvent::Resync | WatchEvent::SessionLost => continue,
        };
        // A node whose path is not valid here (a name made by hand, e.g. over 255 bytes)
        // cannot be read: left out, as the initial load leaves it out, instead of failing
        // the read of the whole batch and stopping the follower.
        if crate::coord::path::validate_path(path).is_err() {
            continue;
        }
        let kind = classifier.classify(path);
        let (key, needs_read) = match kind {
            Kind::Other => continue,
            Kind::Lun(l) | Kind::Target(l, _) => (format!("l/{l}"), upsert),
            Kind::Initiator(l, _, _) => (format!("l/{l}"), false),
            Kind::Gateway(g) => (format!("g/{g}"), upsert),
        };
        let waits = waiting.contains(&key);
        if needs_read {
            // A LUN's or a gateway's read makes its later events wait; a target's data
            // (its portal) is not needed to apply its mappings.
            if !matches!(kind, Kind::Target(..)) && !waits {
                waiting.push(key);
            }
            if !placed.contains_key(path) {
                let next = read_index.len();
                let k = *read_index.entry(path).or_insert(next);
                if k == plan.reads.len() {
                    plan.reads.push(path.to_string());
                }
                placed.insert(path, k);
                plan.later.push(Later::Read(k));
            }
            continue;
        }
        let e = if upsert {
            // An initiator's node carries nothing the view needs.
            NodeEvent::Upsert {
                path: path.to_string(),
                data: Vec::new(),
            }
        } else {
            placed.remove(path);
            NodeEvent::Remove {
                path: path.to_string(),
            }
        };
        if waits {
            plan.later.push(Later::Event(e));
        } else {
            plan.now.push(e);
        }
    }
    plan
}

/// Errors worth retrying: the backend is (for now) unreachable.
fn transient(e: &LunMapError) -> bool {
    matches!(
        e,
        LunMapError::Coord(
            crate::coord::CoordError::ConnectionLoss | crate::coord::CoordError::Zk { .. }
        )
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(events: &[WatchEvent]) -> Plan {
        plan_batch(&MapView::new(Layout::new("c1").unwrap()), events)
    }

    const L: &str = "/blocklab/c1/lunmap/luns/db0";

    fn t() -> String {
        format!("{L}/targets/iqn.2026-11.lab.blocklab:t0")
    }
    fn i(n: u32) -> String {
        format!("{}/initiators/iqn.2026-11.lab.host:h{n}", t())
    }
    fn up(p: &str) -> NodeEvent {
        NodeEvent::Upsert {
            path: p.into(),
            data: Vec::new(),
        }
    }
    fn rm(p: &str) -> NodeEvent {
        NodeEvent::Remove { path: p.into() }
    }

    #[test]
    fn stopping_a_follower_that_panicked_is_an_error() {
        let f = Follower::spawn("test-follower", |_| panic!("deliberately"));
        while !f.finished() {
            std::thread::sleep(Duration::from_millis(1));
        }
        let e = f.stop().unwrap_err();
        assert!(
            matches!(&e, LunMapError::Panicked(n) if n == "test-follower"),
            "{e}"
        );
        let ok = Follower::spawn("test-follower", |stop| {
            while !stop.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(1));
            }
            Ok(())
        });
        ok.stop().unwrap();
    }

    #[test]
    fn a_node_with_an_invalid_name_is_left_out() {
        use WatchEvent::*;
        // A LUN made by hand with a name over 255 bytes: no read of it is planned (the read
        // would fail and stop the follower), the valid LUN next to it is read.
        let long = format!("/blocklab/c1/lunmap/luns/{}", "x".repeat(300));
        let p = plan(&[Created(long.clone()), Created(L.into())]);
        assert_eq!(p.reads, vec![L.to_string()]);
        assert!(p.now.is_empty());
    }

    #[test]
    fn mappings_apply_before_any_read() {
        use WatchEvent::*;
        // A map through a new target: the mapping needs no read; the target is read after.
        let p = plan(&[
            Created(t()),
            Created(format!("{}/initiators", t())),
            Created(i(1)),
            Deleted(i(2)),
        ]);
        assert_eq!(p.now, vec![up(&i(1)), rm(&i(2))]);
        assert_eq!(p.reads, vec![t()]);
        assert_eq!(p.later, vec![Later::Read(0)]);
    }

    #[test]
    fn a_new_lun_and_its_mappings_keep_their_order() {
        use WatchEvent::*;
        let p = plan(&[
            Created(L.into()),
            Created(format!("{L}/targets")),
            Created(t()),
            Created(i(1)),
            DataChanged(L.into()),
            Created("/blocklab/c1/gateways/gw1".into()),
            Created("/blocklab/c1/lunmap/luns/other/targets/x/initiators/y".into()),
        ]);
        assert_eq!(
            p.now,
            vec![up("/blocklab/c1/lunmap/luns/other/targets/x/initiators/y")]
        );
        assert_eq!(
            p.reads,
            vec![L.to_string(), t(), "/blocklab/c1/gateways/gw1".to_string()]
        );
        assert_eq!(
            p.later,
            vec![
                Later::Read(0),
                Later::Read(1),
                Later::Event(up(&i(1))),
                Later::Read(2)
            ]
        );
    }

    #[test]
    fn a_node_deleted_and_created_again_is_read_again() {
        use WatchEvent::*;
        let g = "/blocklab/c1/gateways/gw1";
        let p = plan(&[
            Created(g.into()),
            DataChanged(g.into()),
            Deleted(g.into()),
            Created(g.into()),
        ]);
        assert!(p.now.is_empty());
        assert_eq!(p.reads, vec![g.to_string()]);
        assert_eq!(
            p.later,
            vec![Later::Read(0), Later::Event(rm(g)), Later::Read(0)]
        );
    }
}
