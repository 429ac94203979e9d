//! Editing the map in a coordination backend: every edit is one atomic multi-operation
//! conditional on the LUN version the editor read, retried on conflict, so concurrent
//! editors never lose each other's changes.

use super::view::{LunState, MapView, NodeEvent, TargetState};
use super::{
    validate_iqn, validate_simple_name, Backing, GatewayInfo, Layout, Lun, LunMapError, Result,
    Target,
};
use crate::coord::{ensure_path, Coord, CoordError, NodeKind, Op};
use std::collections::BTreeMap;

/// How many times an edit is retried when other editors keep changing the same LUN.
pub const MAX_ATTEMPTS: u32 = 1000;

/// A handle for reading and editing one cluster's map.
pub struct LunMap<'c> {
    coord: &'c dyn Coord,
    layout: Layout,
}

/// Result of an acknowledged edit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ack {
    /// The LUN's generation after the edit.
    pub generation: u64,
    /// How many attempts the edit took (> 1 when it lost races against other editors).
    pub attempts: u32,
    /// False when the edit found the map already in the requested state.
    pub changed: bool,
}

fn is_conflict(e: &CoordError) -> bool {
    match e {
        CoordError::MultiFailed { source, .. } => matches!(
            **source,
            CoordError::BadVersion { .. } | CoordError::NodeExists(_) | CoordError::NoNode(_)
        ),
        CoordError::BadVersion { .. } => true,
        _ => false,
    }
}

impl<'c> LunMap<'c> {
    /// Opens the map of `cluster` and creates the layout's directories if missing.
    pub fn open(coord: &'c dyn Coord, cluster: &str) -> Result<LunMap<'c>> {
        let layout = Layout::new(cluster)?;
        ensure_path(coord, &layout.luns())?;
        ensure_path(coord, &layout.gateways())?;
        Ok(LunMap { coord, layout })
    }

    /// A handle on the map of `cluster` that does not touch the backend (no directory
    /// creation), for followers that must not fail while the backend is away.
    pub fn attach(coord: &'c dyn Coord, layout: Layout) -> LunMap<'c> {
        LunMap { coord, layout }
    }

    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// Creates a LUN (with its empty `targets` node) atomically.
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
            generation: 0,
        };
        let data = serde_json::to_vec(&lun).expect("plain data");
        match self.coord.multi(&[
            Op::create(self.layout.lun(name), data),
            Op::create(self.layout.targets(name), Vec::new()),
        ]) {
            Ok(()) => Ok(lun),
            Err(CoordError::MultiFailed { source, .. })
                if matches!(*source, CoordError::NodeExists(_)) =>
            {
                Err(LunMapError::LunExists(name.into()))
            }
            Err(e) => Err(e.into()),
        }
    }

    fn read_lun(&self, name: &str) -> Result<(Lun, i32)> {
        let path = self.layout.lun(name);
        match self.coord.get(&path) {
            Ok((d, s)) => {
                let lun = serde_json::from_slice::<Lun>(&d).map_err(|e| LunMapError::Corrupt {
                    path: path.clone(),
                    reason: e.to_string(),
                })?;
                Ok((lun, s.version))
            }
            Err(CoordError::NoNode(_)) => Err(LunMapError::NoSuchLun(name.into())),
            Err(e) => Err(e.into()),
        }
    }

    /// Deletes a LUN. Refused while initiators are mapped unless `force`.
    pub fn delete_lun(&self, name: &str, force: bool) -> Result<()> {
        validate_simple_name("LUN name", name)?;
        for attempt in 1..=MAX_ATTEMPTS {
            let (_, version) = self.read_lun(name)?;
            let mut ops = Vec::new();
            let mut mapped = 0;
            for t in self.children(&self.layout.targets(name))? {
                let ip = self.layout.initiators(name, &t);
                let inits = self.children(&ip)?;
                mapped += inits.len();
                for i in &inits {
                    ops.push(Op::delete(self.layout.initiator(name, &t, i), None));
                }
                if self.coord.exists(&ip)?.is_some() {
                    ops.push(Op::delete(ip, None));
                }
                ops.push(Op::delete(self.layout.target(name, &t), None));
            }
            if mapped > 0 && !force {
                return Err(LunMapError::StillMapped {
                    lun: name.into(),
                    initiators: mapped,
                });
            }
            ops.push(Op::delete(self.layout.targets(name), None));
            ops.push(Op::delete(self.layout.lun(name), Some(version)));
            match self.coord.multi(&ops) {
                Ok(()) => return Ok(()),
                Err(e) if is_conflict(&e) && attempt < MAX_ATTEMPTS => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(LunMapError::Contention(name.into(), MAX_ATTEMPTS))
    }

    fn children(&self, path: &str) -> Result<Vec<String>> {
        match self.coord.children(path) {
            Ok(c) => Ok(c),
            Err(CoordError::NoNode(_)) => Ok(Vec::new()),
            Err(e) => Err(e.into()),
        }
    }

    /// Maps `initiator` to `lun` through `target` (created if new) atomically.
    pub fn map(&self, lun: &str, target: &Target, initiator: &str) -> Result<Ack> {
        validate_simple_name("LUN name", lun)?;
        validate_iqn("target", &target.iqn)?;
        validate_iqn("initiator", initiator)?;
        let tp = self.layout.target(lun, &target.iqn);
        let ipath = self.layout.initiator(lun, &target.iqn, initiator);
        for attempt in 1..=MAX_ATTEMPTS {
            let (mut l, version) = self.read_lun(lun)?;
            if self.coord.exists(&ipath)?.is_some() {
                return Ok(Ack {
                    generation: l.generation,
                    attempts: attempt,
                    changed: false,
                });
            }
            l.generation += 1;
            let mut ops = vec![Op::set(
                self.layout.lun(lun),
                serde_json::to_vec(&l).expect("plain data"),
                Some(version),
            )];
            if self.coord.exists(&tp)?.is_none() {
                ops.push(Op::create(
                    tp.clone(),
                    serde_json::to_vec(target).expect("plain data"),
                ));
                ops.push(Op::create(
                    self.layout.initiators(lun, &target.iqn),
                    Vec::new(),
                ));
            }
            ops.push(Op::create(
                ipath.clone(),
                serde_json::to_vec(&super::Initiator {
                    iqn: initiator.into(),
                })
                .expect("plain data"),
            ));
            if let Some(ack) = self.try_commit(&ops, l.generation, attempt)? {
                return Ok(ack);
            }
        }
        Err(LunMapError::Contention(lun.into(), MAX_ATTEMPTS))
    }

    /// Removes the mapping of `initiator` to `lun` through `target` atomically.
    pub fn unmap(&self, lun: &str, target: &str, initiator: &str) -> Result<Ack> {
        validate_simple_name("LUN name", lun)?;
        validate_iqn("target", target)?;
        validate_iqn("initiator", initiator)?;
        let ipath = self.layout.initiator(lun, target, initiator);
        for attempt in 1..=MAX_ATTEMPTS {
            let (mut l, version) = self.read_lun(lun)?;
            if self.coord.exists(&ipath)?.is_none() {
                return Err(LunMapError::NotMapped {
                    lun: lun.into(),
                    target: target.into(),
                    initiator: initiator.into(),
                });
            }
            l.generation += 1;
            let ops = [
                Op::set(
                    self.layout.lun(lun),
                    serde_json::to_vec(&l).expect("plain data"),
                    Some(version),
                ),
                Op::delete(ipath.clone(), None),
            ];
            if let Some(ack) = self.try_commit(&ops, l.generation, attempt)? {
                return Ok(ack);
            }
        }
        Err(LunMapError::Contention(lun.into(), MAX_ATTEMPTS))
    }

    /// Applies one optimistic attempt's operations atomically: `Some(ack)` when they
    /// committed, `None` when another editor changed the LUN first (read again and retry).
    fn try_commit(&self, ops: &[Op], generation: u64, attempt: u32) -> Result<Option<Ack>> {
        match self.coord.multi(ops) {
            Ok(()) => Ok(Some(Ack {
                generation,
                attempts: attempt,
                changed: true,
            })),
            Err(e) if is_conflict(&e) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Reads the whole map (and the live gateways) into a view.
    pub fn load(&self) -> Result<MapView> {
        let mut v = MapView::new(self.layout.clone());
        let mut luns = BTreeMap::new();
        for name in self.children(&self.layout.luns())? {
            let (lun, _) = match self.read_lun(&name) {
                Ok(x) => x,
                Err(LunMapError::NoSuchLun(_)) => continue,
                Err(e) => return Err(e),
            };
            let mut targets = BTreeMap::new();
            for t in self.children(&self.layout.targets(&name))? {
                let target = match self.coord.get(&self.layout.target(&name, &t)) {
                    Ok((d, _)) => serde_json::from_slice(&d).ok(),
                    Err(CoordError::NoNode(_)) => continue,
                    Err(e) => return Err(e.into()),
                };
                let initiators = self
                    .children(&self.layout.initiators(&name, &t))?
                    .into_iter()
                    .collect();
                targets.insert(t, TargetState { target, initiators });
            }
            luns.insert(name, LunState { lun, targets });
        }
        v.replace_map(luns);
        let mut gws = BTreeMap::new();
        for n in self.children(&self.layout.gateways())? {
            if let Ok((d, _)) = self.coord.get(&self.layout.gateway(&n)) {
                gws.insert(n, serde_json::from_slice(&d).ok());
            }
        }
        v.replace_gateways(gws);
        Ok(v)
    }

    /// `(lun, target)` pairs through which `initiator` is mapped.
    pub fn query_initiator(&self, initiator: &str) -> Result<Vec<(String, String)>> {
        validate_iqn("initiator", initiator)?;
        Ok(self.load()?.query_initiator(initiator))
    }

    /// Registers a gateway as an ephemeral node of this session.
    pub fn register_gateway(&self, info: &GatewayInfo) -> Result<()> {
        validate_simple_name("node name", &info.node)?;
        self.coord.create(
            &self.layout.gateway(&info.node),
            &serde_json::to_vec(info).expect("plain data"),
            NodeKind::Ephemeral,
        )?;
        Ok(())
    }

    /// Reads the data of a node for a follower (`None` if it is gone).
    pub fn node_event(&self, path: &str, removed: bool) -> Result<NodeEvent> {
        if removed {
            return Ok(NodeEvent::Remove { path: path.into() });
        }
        match self.coord.get(path) {
            Ok((data, _)) => Ok(NodeEvent::Upsert {
                path: path.into(),
                data,
            }),
            Err(CoordError::NoNode(_)) => Ok(NodeEvent::Remove { path: path.into() }),
            Err(e) => Err(e.into()),
        }
    }
}
