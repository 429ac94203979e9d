//! Editing the map in a coordination backend: every edit is one atomic multi-operation
//! built from what the editor read; when another editor changed the same nodes in between,
//! the multi fails as a whole, the editor reads again and retries (with a jittered backoff,
//! a bounded number of times), so concurrent editors never lose each other's changes.
//!
//! Round trips on ZooKeeper: `map` reads the LUN and the target in one `multiRead` and
//! commits one multi (2); `unmap` is one delete (1, plus one read to tell a missing LUN from
//! a missing mapping when it fails); `create_lun` is one multi.
//!
//! A failure that repeats on an unchanged map is not a race but a layout blocklab does not
//! write (a node created or removed by hand): it ends the retries with
//! [`LunMapError::Structural`] naming the node.

use super::view::{LunState, MapView, NodeEvent, TargetState};
use super::{
    validate_iqn, validate_simple_name, Backing, GatewayInfo, IdClaim, Initiator, Layout, Lun,
    LunMapError, Result, Target, DEFAULT_PORTAL,
};
use crate::coord::path::validate_name;
use crate::coord::{ensure_path, Coord, CoordError, NodeKind, Op, Read, ReadResult};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

/// How many times an edit is tried when other editors keep changing the same nodes.
pub const MAX_ATTEMPTS: u32 = 16;

/// Upper bound of the (jittered, doubling) pause between two attempts.
const MAX_BACKOFF: Duration = Duration::from_millis(50);

/// A handle for reading and editing one cluster's map.
pub struct LunMap<'c> {
    coord: &'c dyn Coord,
    layout: Layout,
    /// The retry backoff's jitter ([`LunMap::with_seed`]).
    jitter: Mutex<StdRng>,
}

/// Result of an acknowledged edit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ack {
    /// How many attempts the edit took (> 1 when it lost races against other editors).
    pub attempts: u32,
    /// False when the edit found the map already in the requested state.
    pub changed: bool,
}

/// One attempt of an edit.
enum Step<T> {
    Done(T),
    /// The multi failed the way a concurrent edit makes it fail; `seen` is what this
    /// attempt read (a retry on an unchanged `seen` that fails again is structural).
    Retry {
        seen: Vec<ReadResult>,
        error: CoordError,
    },
}

/// The failure of a multi that another editor's concurrent commit can cause: a node
/// checked, created or deleted was changed, created or deleted in between.
fn is_race(e: &CoordError) -> bool {
    matches!(
        e,
        CoordError::MultiFailed { cause: source, .. } if matches!(
            **source,
            CoordError::BadVersion { .. }
                | CoordError::NoNode(_)
                | CoordError::NodeExists(_)
                | CoordError::NotEmpty(_)
        )
    )
}

/// The node a failed multi names.
fn failed_path(e: &CoordError) -> String {
    match e {
        CoordError::MultiFailed { cause: source, .. } => failed_path(source),
        CoordError::NoNode(p) | CoordError::NodeExists(p) | CoordError::NotEmpty(p) => p.clone(),
        CoordError::BadVersion { path, .. } => path.clone(),
        other => other.to_string(),
    }
}

/// A random pause before attempt `attempt + 1`: up to 1 ms × 2^(attempt − 1), at most
/// [`MAX_BACKOFF`], so editors that collided do not collide again in lockstep.
fn backoff(rng: &mut StdRng, attempt: u32) -> Duration {
    let cap = Duration::from_millis(1 << attempt.saturating_sub(1).min(6)).min(MAX_BACKOFF);
    Duration::from_micros(rng.random_range(0..=cap.as_micros() as u64))
}

fn json<T: serde::Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).expect("plain data")
}

impl<'c> LunMap<'c> {
    /// Opens the map of `cluster` and creates the layout's directories if missing (one
    /// read when they exist).
    pub fn open(coord: &'c dyn Coord, cluster: &str) -> Result<LunMap<'c>> {
        let layout = Layout::new(cluster)?;
        let dirs = [layout.luns(), layout.ids(), layout.gateways()];
        let reads: Vec<Read> = dirs.iter().map(|d| Read::Data(d.clone())).collect();
        for (dir, r) in dirs.iter().zip(coord.read_many(&reads)?) {
            if r == ReadResult::NoNode {
                ensure_path(coord, dir)?;
            }
        }
        Ok(LunMap::attach(coord, layout))
    }

    /// A handle on the map of `cluster` that does not touch the backend (no directory
    /// creation), for followers that must not fail while the backend is away.
    pub fn attach(coord: &'c dyn Coord, layout: Layout) -> LunMap<'c> {
        LunMap {
            coord,
            layout,
            jitter: Mutex::new(StdRng::from_os_rng()),
        }
    }

    /// Draws the retry backoff's jitter from a generator seeded with `seed` (an
    /// experiment's `--seed`), so a run can be repeated. Without it the generator is seeded
    /// by the OS, so that separate editors never back off in lockstep; editors given seeds
    /// need different ones for the same reason.
    pub fn with_seed(self, seed: u64) -> LunMap<'c> {
        LunMap {
            jitter: Mutex::new(StdRng::seed_from_u64(seed)),
            ..self
        }
    }

    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// Runs `attempt` until it is done, retrying races with a backoff; a race that repeats
    /// on an unchanged read is structural.
    fn retry<T>(&self, lun: &str, mut attempt: impl FnMut(u32) -> Result<Step<T>>) -> Result<T> {
        let mut last: Option<Vec<ReadResult>> = None;
        for n in 1..=MAX_ATTEMPTS {
            match attempt(n)? {
                Step::Done(t) => return Ok(t),
                Step::Retry { seen, error } => {
                    if last.as_ref() == Some(&seen) {
                        return Err(LunMapError::Structural {
                            lun: lun.into(),
                            path: failed_path(&error),
                            source: error,
                        });
                    }
                    last = Some(seen);
                    let pause = {
                        let mut rng = self.jitter.lock().unwrap_or_else(|p| p.into_inner());
                        backoff(&mut rng, n)
                    };
                    std::thread::sleep(pause);
                }
            }
        }
        Err(LunMapError::Contention(lun.into(), MAX_ATTEMPTS))
    }

    /// Creates a LUN (with its empty `targets` node and the claim of its id) atomically.
    /// Refused when the name or the id is taken.
    pub fn create_lun(
        &self,
        id: u32,
        name: &str,
        size_bytes: u64,
        backing: Backing,
    ) -> Result<Lun> {
        validate_simple_name("LUN name", name)?;
        if size_bytes == 0 || size_bytes % 4096 != 0 {
            return Err(LunMapError::BadLun {
                lun: name.into(),
                reason: format!("size {size_bytes} must be a positive multiple of 4096"),
            });
        }
        match &backing {
            Backing::Range { device, offset } => {
                if device.is_empty() || offset % 4096 != 0 {
                    return Err(LunMapError::BadLun {
                        lun: name.into(),
                        reason: "backing needs a device path and a 4096-aligned offset".into(),
                    });
                }
            }
            Backing::Volume { volume } => validate_simple_name("volume name", volume)?,
        }
        let lun = Lun {
            id,
            name: name.into(),
            size_bytes,
            backing,
        };
        let claim = IdClaim { lun: name.into() };
        match self.coord.multi(&[
            Op::create(self.layout.lun(name), json(&lun)),
            Op::create(self.layout.targets(name), Vec::new()),
            Op::create(self.layout.id(id), json(&claim)),
        ]) {
            Ok(()) => Ok(lun),
            Err(CoordError::MultiFailed {
                index,
                cause: source,
            }) if matches!(*source, CoordError::NodeExists(_)) => {
                if index < 2 {
                    return Err(LunMapError::LunExists(name.into()));
                }
                let other = match self.coord.get(&self.layout.id(id)) {
                    Ok((d, _)) => serde_json::from_slice::<IdClaim>(&d)
                        .map(|c| c.lun)
                        .unwrap_or_else(|_| "(unreadable claim)".into()),
                    Err(_) => "(released meanwhile; try again)".into(),
                };
                Err(LunMapError::IdInUse { id, lun: other })
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Deletes a LUN with its id claim. Refused while initiators are mapped unless
    /// `force` (then the mappings go in the same multi-operation). A map racing the delete
    /// makes the multi fail; the next attempt sees the new mapping (and refuses).
    pub fn delete_lun(&self, name: &str, force: bool) -> Result<()> {
        validate_simple_name("LUN name", name)?;
        let lp = self.layout.lun(name);
        let tsp = self.layout.targets(name);
        self.retry(name, |_| {
            let mut seen = self
                .coord
                .read_many(&[Read::Data(lp.clone()), Read::Children(tsp.clone())])?;
            let (lun, version) = match &seen[0] {
                ReadResult::Data(d, s) => (serde_json::from_slice::<Lun>(d).ok(), s.version),
                _ => return Err(LunMapError::NoSuchLun(name.into())),
            };
            let targets = match &seen[1] {
                ReadResult::Children(c) => c.clone(),
                _ => Vec::new(),
            };
            let mut reads: Vec<Read> = targets
                .iter()
                .map(|t| Read::Children(self.layout.initiators(name, t)))
                .collect();
            if let Some(l) = &lun {
                reads.push(Read::Data(self.layout.id(l.id)));
            }
            let more = self.coord.read_many(&reads)?;
            // The version check first: a LUN deleted or redefined meanwhile fails at index 0.
            let mut ops = vec![Op::check(lp.clone(), version)];
            let mut mapped = 0;
            for (t, r) in targets.iter().zip(&more) {
                if let ReadResult::Children(inits) = r {
                    mapped += inits.len();
                    for i in inits {
                        ops.push(Op::delete(self.layout.initiator(name, t, i), None));
                    }
                    ops.push(Op::delete(self.layout.initiators(name, t), None));
                }
                ops.push(Op::delete(self.layout.target(name, t), None));
            }
            if mapped > 0 && !force {
                return Err(LunMapError::StillMapped {
                    lun: name.into(),
                    initiators: mapped,
                });
            }
            if seen[1] != ReadResult::NoNode {
                ops.push(Op::delete(tsp.clone(), None));
            }
            if let (Some(l), Some(ReadResult::Data(d, s))) = (&lun, more.get(targets.len())) {
                // Only this LUN's own claim.
                if serde_json::from_slice::<IdClaim>(d).is_ok_and(|c| c.lun == name) {
                    ops.push(Op::delete(self.layout.id(l.id), Some(s.version)));
                }
            }
            ops.push(Op::delete(lp.clone(), Some(version)));
            match self.coord.multi(&ops) {
                Ok(()) => Ok(Step::Done(())),
                Err(e) if is_race(&e) => {
                    seen.extend(more);
                    Ok(Step::Retry { seen, error: e })
                }
                Err(e) => Err(e.into()),
            }
        })
    }

    fn children(&self, path: &str) -> Result<Vec<String>> {
        match self.coord.children(path) {
            Ok(c) => Ok(c),
            Err(CoordError::NoNode(_)) => Ok(Vec::new()),
            Err(e) => Err(e.into()),
        }
    }

    /// Maps `initiator` to `lun` through `target` atomically. A new target is created with
    /// `target.portal`; an existing target must have that portal
    /// ([`LunMapError::PortalMismatch`] otherwise).
    pub fn map(&self, lun: &str, target: &Target, initiator: &str) -> Result<Ack> {
        self.map_via(lun, &target.iqn, Some(&target.portal), initiator)
    }

    /// Maps `initiator` to `lun` through the target `target_iqn` atomically. `portal`:
    /// `None` uses the existing target whatever its portal, or creates the target at
    /// [`DEFAULT_PORTAL`]; `Some(p)` creates the target at `p` or requires the existing
    /// target to be at `p`. Mapping an initiator that is mapped already changes nothing
    /// (`changed: false`).
    pub fn map_via(
        &self,
        lun: &str,
        target_iqn: &str,
        portal: Option<&str>,
        initiator: &str,
    ) -> Result<Ack> {
        validate_simple_name("LUN name", lun)?;
        validate_iqn("target", target_iqn)?;
        validate_iqn("initiator", initiator)?;
        let lp = self.layout.lun(lun);
        let tp = self.layout.target(lun, target_iqn);
        let ipath = self.layout.initiator(lun, target_iqn, initiator);
        let idata = json(&Initiator {
            iqn: initiator.into(),
        });
        self.retry(lun, |attempt| {
            let seen = self
                .coord
                .read_many(&[Read::Data(lp.clone()), Read::Data(tp.clone())])?;
            let ReadResult::Data(_, lun_stat) = &seen[0] else {
                return Err(LunMapError::NoSuchLun(lun.into()));
            };
            // The LUN as read: deleted (or redefined) meanwhile fails the multi at index 0.
            let mut ops = vec![Op::check(lp.clone(), lun_stat.version)];
            match &seen[1] {
                ReadResult::Data(d, _) => {
                    let t: Target =
                        serde_json::from_slice(d).map_err(|e| LunMapError::Corrupt {
                            path: tp.clone(),
                            reason: e.to_string(),
                        })?;
                    if let Some(p) = portal.filter(|p| *p != t.portal) {
                        return Err(LunMapError::PortalMismatch {
                            lun: lun.into(),
                            target: target_iqn.into(),
                            portal: t.portal,
                            wanted: p.into(),
                        });
                    }
                }
                _ => {
                    let t = Target {
                        iqn: target_iqn.into(),
                        portal: portal.unwrap_or(DEFAULT_PORTAL).into(),
                    };
                    ops.push(Op::create(tp.clone(), json(&t)));
                    ops.push(Op::create(
                        self.layout.initiators(lun, target_iqn),
                        Vec::new(),
                    ));
                }
            }
            let at = ops.len();
            ops.push(Op::create(ipath.clone(), idata.clone()));
            match self.coord.multi(&ops) {
                Ok(()) => Ok(Step::Done(Ack {
                    attempts: attempt,
                    changed: true,
                })),
                Err(CoordError::MultiFailed {
                    index,
                    cause: source,
                }) if index == at && matches!(*source, CoordError::NodeExists(_)) => {
                    Ok(Step::Done(Ack {
                        attempts: attempt,
                        changed: false,
                    }))
                }
                Err(e) if is_race(&e) => Ok(Step::Retry { seen, error: e }),
                Err(e) => Err(e.into()),
            }
        })
    }

    /// Removes the mapping of `initiator` to `lun` through `target` (one delete).
    pub fn unmap(&self, lun: &str, target: &str, initiator: &str) -> Result<Ack> {
        validate_simple_name("LUN name", lun)?;
        validate_iqn("target", target)?;
        validate_iqn("initiator", initiator)?;
        match self
            .coord
            .delete(&self.layout.initiator(lun, target, initiator), None)
        {
            Ok(()) => Ok(Ack {
                attempts: 1,
                changed: true,
            }),
            Err(CoordError::NoNode(_)) => {
                if self.coord.exists(&self.layout.lun(lun))?.is_none() {
                    Err(LunMapError::NoSuchLun(lun.into()))
                } else {
                    Err(LunMapError::NotMapped {
                        lun: lun.into(),
                        target: target.into(),
                        initiator: initiator.into(),
                    })
                }
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Reads the whole map (and the live gateways) into a view, in three batched reads
    /// (names; LUNs, target lists and gateways; targets and initiator lists). A LUN whose
    /// node does not decode is in the view as corrupt (not served; see
    /// [`super::view::Change::Corrupt`]), so one bad node never fails the whole load.
    pub fn load(&self) -> Result<MapView> {
        let l = &self.layout;
        let top = self
            .coord
            .read_many(&[Read::Children(l.luns()), Read::Children(l.gateways())])?;
        // Names that are no valid node names (made by hand) cannot be read: left out.
        let names = |r: &ReadResult| match r {
            ReadResult::Children(c) => c
                .iter()
                .filter(|n| validate_name(n).is_ok())
                .cloned()
                .collect(),
            _ => Vec::new(),
        };
        let (luns, gws) = (names(&top[0]), names(&top[1]));
        let mut reads = Vec::with_capacity(2 * luns.len() + gws.len());
        for n in &luns {
            reads.push(Read::Data(l.lun(n)));
            reads.push(Read::Children(l.targets(n)));
        }
        reads.extend(gws.iter().map(|g| Read::Data(l.gateway(g))));
        let second = self.coord.read_many(&reads)?;
        let mut found = Vec::new();
        let mut target_reads = Vec::new();
        for (n, r) in luns.iter().zip(second.chunks(2)) {
            let ReadResult::Data(d, _) = &r[0] else {
                continue; // deleted meanwhile
            };
            let lun = serde_json::from_slice::<Lun>(d).map_err(|e| e.to_string());
            let targets = names(&r[1]);
            for t in &targets {
                target_reads.push(Read::Data(l.target(n, t)));
                target_reads.push(Read::Children(l.initiators(n, t)));
            }
            found.push((n, lun, targets));
        }
        let third = self.coord.read_many(&target_reads)?;
        let mut third = third.chunks(2);
        let mut map = BTreeMap::new();
        for (n, lun, targets) in found {
            let mut ts = BTreeMap::new();
            for t in targets {
                let Some([data, inits]) = third.next() else {
                    break;
                };
                let target = match data {
                    ReadResult::Data(d, _) => serde_json::from_slice(d).ok(),
                    _ => continue, // deleted meanwhile
                };
                let initiators = names(inits).into_iter().collect();
                ts.insert(t, TargetState { target, initiators });
            }
            map.insert(n.clone(), LunState { lun, targets: ts });
        }
        let mut v = MapView::new(l.clone());
        v.replace_map(map);
        let gateways = gws
            .into_iter()
            .zip(&second[2 * luns.len()..])
            .filter_map(|(g, r)| match r {
                ReadResult::Data(d, _) => Some((g, serde_json::from_slice(d).ok())),
                _ => None,
            })
            .collect();
        v.replace_gateways(gateways);
        Ok(v)
    }

    /// `(lun, target)` pairs through which `initiator` is mapped: three batched reads
    /// (LUN names, their targets, the initiator's node under each), no LUN or target data.
    pub fn query_initiator(&self, initiator: &str) -> Result<Vec<(String, String)>> {
        validate_iqn("initiator", initiator)?;
        let l = &self.layout;
        let luns = self.children(&l.luns())?;
        let reads: Vec<Read> = luns.iter().map(|n| Read::Children(l.targets(n))).collect();
        let mut pairs = Vec::new();
        for (n, r) in luns.iter().zip(self.coord.read_many(&reads)?) {
            if let ReadResult::Children(ts) = r {
                pairs.extend(ts.into_iter().map(|t| (n.clone(), t)));
            }
        }
        let reads: Vec<Read> = pairs
            .iter()
            .map(|(n, t)| Read::Data(l.initiator(n, t, initiator)))
            .collect();
        Ok(pairs
            .into_iter()
            .zip(self.coord.read_many(&reads)?)
            .filter(|(_, r)| matches!(r, ReadResult::Data(..)))
            .map(|(p, _)| p)
            .collect())
    }

    /// The initiators mapped to `lun` through `target` (one read; empty when the target
    /// does not exist).
    pub fn initiators(&self, lun: &str, target: &str) -> Result<Vec<String>> {
        validate_simple_name("LUN name", lun)?;
        validate_iqn("target", target)?;
        self.children(&self.layout.initiators(lun, target))
    }

    /// The live gateways (two reads: names, then all their nodes).
    pub fn gateways(&self) -> Result<BTreeMap<String, Option<GatewayInfo>>> {
        let names = self.children(&self.layout.gateways())?;
        let reads: Vec<Read> = names
            .iter()
            .map(|n| Read::Data(self.layout.gateway(n)))
            .collect();
        Ok(names
            .into_iter()
            .zip(self.coord.read_many(&reads)?)
            .filter_map(|(n, r)| match r {
                ReadResult::Data(d, _) => Some((n, serde_json::from_slice(&d).ok())),
                _ => None,
            })
            .collect())
    }

    /// Registers a gateway as an ephemeral node of this session.
    pub fn register_gateway(&self, info: &GatewayInfo) -> Result<()> {
        validate_simple_name("node name", &info.node)?;
        self.coord.create(
            &self.layout.gateway(&info.node),
            &json(info),
            NodeKind::Ephemeral,
        )?;
        Ok(())
    }

    /// Reads the current data of the nodes at `paths` for a follower, in one batched read:
    /// an `Upsert` with the data, or a `Remove` for a node that is gone.
    pub fn node_events(&self, paths: &[String]) -> Result<Vec<NodeEvent>> {
        let reads: Vec<Read> = paths.iter().map(|p| Read::Data(p.clone())).collect();
        Ok(paths
            .iter()
            .zip(self.coord.read_many(&reads)?)
            .map(|(p, r)| match r {
                ReadResult::Data(data, _) => NodeEvent::Upsert {
                    path: p.clone(),
                    data,
                },
                _ => NodeEvent::Remove { path: p.clone() },
            })
            .collect())
    }
}
