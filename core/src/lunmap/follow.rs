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

    /// Stops the thread and returns how it ended.
    pub fn stop(mut self) -> Result<()> {
        self.stop.store(true, Ordering::SeqCst);
        match self.thread.take().map(|t| t.join()) {
            Some(Ok(r)) => r,
            _ => Ok(()),
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

fn emit(
    view: &RwLock<MapView>,
    on_change: &mut OnChange,
    f: impl FnOnce(&mut MapView) -> Vec<Change>,
) {
    let changes = {
        let mut v = view.write().unwrap_or_else(|e| e.into_inner());
        f(&mut v)
    };
    let now = mono_ns();
    for c in &changes {
        on_change(c, now);
    }
}

/// Subscribes to the cluster's subtree, loads the map, then applies every event to `view`.
/// The initial load is done before this returns (so a gateway serves a complete map).
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
        emit(&view, &mut on_change, |v| {
            let mut c = v.replace_map(loaded.luns);
            c.extend(v.replace_gateways(loaded.gateways));
            c
        });
    }
    Ok(Follower::spawn("lunmap-follow", move |stop| {
        let map = LunMap::attach(&*coord, layout);
        // After a reconnect, or when a read failed because the connection dropped, the
        // whole map is reloaded (retrying until the backend answers or the session is lost).
        let mut need_reload = false;
        while !stop.load(Ordering::SeqCst) {
            if need_reload {
                match map.load() {
                    Ok(loaded) => {
                        need_reload = false;
                        emit(&view, &mut on_change, |v| {
                            let mut c = v.replace_map(loaded.luns);
                            c.extend(v.replace_gateways(loaded.gateways));
                            c
                        });
                    }
                    Err(e) if fatal(&e) => return Err(e),
                    Err(_) => {
                        std::thread::sleep(Duration::from_millis(100));
                        continue;
                    }
                }
            }
            let Some(first) = watch.recv_timeout(Duration::from_millis(100)) else {
                continue;
            };
            // Take everything already queued: under bursts, a node changed several times is
            // read once (its latest data), and structural events are applied in order.
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
            let mut events = Vec::with_capacity(batch.len());
            for (k, ev) in batch.iter().enumerate() {
                let node_ev = match ev {
                    WatchEvent::Created(p) | WatchEvent::DataChanged(p) => {
                        if p.contains("/initiators/") {
                            // Initiator nodes carry nothing the gateway needs: no read.
                            NodeEvent::Upsert {
                                path: p.clone(),
                                data: Vec::new(),
                            }
                        } else if matches!(ev, WatchEvent::DataChanged(_))
                            && batch[k + 1..]
                                .iter()
                                .any(|later| matches!(later, WatchEvent::DataChanged(q) if q == p))
                        {
                            // A later change of the same node in this batch reads it.
                            continue;
                        } else {
                            match map.node_event(p, false) {
                                Ok(e) => e,
                                Err(e) if fatal(&e) => return Err(e),
                                Err(_) => {
                                    need_reload = true;
                                    break;
                                }
                            }
                        }
                    }
                    WatchEvent::Deleted(p) => NodeEvent::Remove { path: p.clone() },
                    WatchEvent::Resync | WatchEvent::SessionLost => continue,
                };
                events.push(node_ev);
            }
            if need_reload {
                continue;
            }
            emit(&view, &mut on_change, |v| {
                events.iter().flat_map(|e| v.apply(e)).collect()
            });
        }
        Ok(())
    }))
}

/// Errors after which following cannot continue (the session is gone).
fn fatal(e: &LunMapError) -> bool {
    matches!(
        e,
        LunMapError::Coord(crate::coord::CoordError::SessionExpired)
    )
}
