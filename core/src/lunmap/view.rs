//! The in-memory copy of the map a gateway decides on, and the pure logic that keeps it
//! current: node events in, [`Change`]s out. No I/O here, so it is tested directly.

use super::{GatewayInfo, Layout, Lun, LunMapError, Result, Target};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};

/// A node event with the node's data already read (by [`super::follow`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeEvent {
    /// Created or changed, with its current data.
    Upsert {
        path: String,
        data: Vec<u8>,
    },
    Remove {
        path: String,
    },
}

/// What changed in the view.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// A LUN was added or its definition changed.
    LunUpdated {
        lun: String,
    },
    LunRemoved {
        lun: String,
    },
    Mapped {
        lun: String,
        target: String,
        initiator: String,
    },
    Unmapped {
        lun: String,
        target: String,
        initiator: String,
    },
    GatewayUp {
        node: String,
    },
    GatewayDown {
        node: String,
    },
    /// A LUN node's data does not decode: the LUN is kept in the view (so its mappings stay
    /// known) but not served until a good definition arrives.
    Corrupt {
        path: String,
        reason: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TargetState {
    pub target: Option<Target>,
    pub initiators: BTreeSet<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LunState {
    /// The LUN's definition, or why its node does not decode (then it is not served).
    pub lun: std::result::Result<Lun, String>,
    pub targets: BTreeMap<String, TargetState>,
}

/// The whole map of one cluster plus the live gateways.
#[derive(Debug, Clone)]
pub struct MapView {
    pub layout: Layout,
    pub luns: BTreeMap<String, LunState>,
    pub gateways: BTreeMap<String, Option<GatewayInfo>>,
}

/// The map as a document (the filesync baseline's file format, and `lunmap list --json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct MapDoc {
    pub luns: Vec<LunDoc>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LunDoc {
    pub lun: Lun,
    pub targets: Vec<TargetDoc>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TargetDoc {
    pub target: Target,
    pub initiators: Vec<String>,
}

/// What a node of the cluster's subtree is (see [`MapView::classify`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind<'a> {
    Lun(&'a str),
    Target(&'a str, &'a str),
    Initiator(&'a str, &'a str, &'a str),
    Gateway(&'a str),
    /// Anything else (directories, id claims, other clusters): nothing the view keeps.
    Other,
}

impl MapView {
    pub fn new(layout: Layout) -> MapView {
        MapView {
            layout,
            luns: BTreeMap::new(),
            gateways: BTreeMap::new(),
        }
    }

    /// What the node at `path` is, by its position in the layout (never by its name, so
    /// a cluster or LUN named like a layout directory is classified right).
    pub(crate) fn classify<'a>(&self, path: &'a str) -> Kind<'a> {
        let root = self.layout.root();
        let Some(rest) = path.strip_prefix(root.as_str()) else {
            return Kind::Other;
        };
        let Some(rest) = rest.strip_prefix('/') else {
            return Kind::Other;
        };
        let parts: Vec<&'a str> = rest.split('/').collect();
        match parts.as_slice() {
            ["lunmap", "luns", l] => Kind::Lun(l),
            ["lunmap", "luns", l, "targets", t] => Kind::Target(l, t),
            ["lunmap", "luns", l, "targets", t, "initiators", i] => Kind::Initiator(l, t, i),
            ["gateways", n] => Kind::Gateway(n),
            _ => Kind::Other,
        }
    }

    /// Applies one event; returns what changed (nothing for irrelevant or repeated events).
    pub fn apply(&mut self, ev: &NodeEvent) -> Vec<Change> {
        let mut out = Vec::new();
        match ev {
            NodeEvent::Upsert { path, data } => match self.classify(path) {
                Kind::Lun(l) => {
                    let lun = serde_json::from_slice::<Lun>(data).map_err(|e| e.to_string());
                    let changed = match self.luns.get_mut(l) {
                        Some(st) if st.lun == lun => false,
                        Some(st) => {
                            st.lun = lun.clone();
                            true
                        }
                        None => {
                            self.luns.insert(
                                l.into(),
                                LunState {
                                    lun: lun.clone(),
                                    targets: BTreeMap::new(),
                                },
                            );
                            true
                        }
                    };
                    if changed {
                        out.push(lun_change(l, path, &lun));
                    }
                }
                Kind::Target(l, t) => {
                    if let Some(st) = self.luns.get_mut(l) {
                        let target = serde_json::from_slice::<Target>(data).ok();
                        st.targets.entry(t.into()).or_default().target = target;
                    }
                }
                Kind::Initiator(l, t, i) => {
                    if let Some(st) = self.luns.get_mut(l) {
                        if st
                            .targets
                            .entry(t.into())
                            .or_default()
                            .initiators
                            .insert(i.into())
                        {
                            out.push(Change::Mapped {
                                lun: l.into(),
                                target: t.into(),
                                initiator: i.into(),
                            });
                        }
                    }
                }
                Kind::Gateway(n) => {
                    let info = serde_json::from_slice::<GatewayInfo>(data).ok();
                    if self.gateways.insert(n.into(), info).is_none() {
                        out.push(Change::GatewayUp { node: n.into() });
                    }
                }
                Kind::Other => {}
            },
            NodeEvent::Remove { path } => match self.classify(path) {
                Kind::Lun(l) => {
                    if let Some(st) = self.luns.remove(l) {
                        for (t, ts) in st.targets {
                            for i in ts.initiators {
                                out.push(Change::Unmapped {
                                    lun: l.into(),
                                    target: t.clone(),
                                    initiator: i,
                                });
                            }
                        }
                        out.push(Change::LunRemoved { lun: l.into() });
                    }
                }
                Kind::Target(l, t) => {
                    if let Some(st) = self.luns.get_mut(l) {
                        if let Some(ts) = st.targets.remove(t) {
                            for i in ts.initiators {
                                out.push(Change::Unmapped {
                                    lun: l.into(),
                                    target: t.into(),
                                    initiator: i,
                                });
                            }
                        }
                    }
                }
                Kind::Initiator(l, t, i) => {
                    if let Some(ts) = self.luns.get_mut(l).and_then(|st| st.targets.get_mut(t)) {
                        if ts.initiators.remove(i) {
                            out.push(Change::Unmapped {
                                lun: l.into(),
                                target: t.into(),
                                initiator: i.into(),
                            });
                        }
                    }
                }
                Kind::Gateway(n) => {
                    if self.gateways.remove(n).is_some() {
                        out.push(Change::GatewayDown { node: n.into() });
                    }
                }
                Kind::Other => {}
            },
        }
        out
    }

    /// Replaces the map part (not the gateways) by `new`; returns the differences.
    pub fn replace_map(&mut self, new: BTreeMap<String, LunState>) -> Vec<Change> {
        let mut out = Vec::new();
        for (l, st) in &self.luns {
            match new.get(l) {
                None => {
                    for (t, ts) in &st.targets {
                        for i in &ts.initiators {
                            out.push(Change::Unmapped {
                                lun: l.clone(),
                                target: t.clone(),
                                initiator: i.clone(),
                            });
                        }
                    }
                    out.push(Change::LunRemoved { lun: l.clone() });
                }
                Some(nst) => {
                    for (t, ts) in &st.targets {
                        for i in &ts.initiators {
                            if !nst.targets.get(t).is_some_and(|n| n.initiators.contains(i)) {
                                out.push(Change::Unmapped {
                                    lun: l.clone(),
                                    target: t.clone(),
                                    initiator: i.clone(),
                                });
                            }
                        }
                    }
                }
            }
        }
        for (l, nst) in &new {
            let old = self.luns.get(l);
            if old.is_none_or(|o| o.lun != nst.lun) {
                out.push(lun_change(l, &self.layout.lun(l), &nst.lun));
            }
            for (t, ts) in &nst.targets {
                for i in &ts.initiators {
                    if !old
                        .is_some_and(|o| o.targets.get(t).is_some_and(|x| x.initiators.contains(i)))
                    {
                        out.push(Change::Mapped {
                            lun: l.clone(),
                            target: t.clone(),
                            initiator: i.clone(),
                        });
                    }
                }
            }
        }
        self.luns = new;
        out
    }

    /// Replaces the gateway set; returns who came and went.
    pub fn replace_gateways(&mut self, new: BTreeMap<String, Option<GatewayInfo>>) -> Vec<Change> {
        let mut out = Vec::new();
        for n in self.gateways.keys() {
            if !new.contains_key(n) {
                out.push(Change::GatewayDown { node: n.clone() });
            }
        }
        for n in new.keys() {
            if !self.gateways.contains_key(n) {
                out.push(Change::GatewayUp { node: n.clone() });
            }
        }
        self.gateways = new;
        out
    }

    /// Replaces the map and the gateways by a freshly loaded view; returns the differences.
    pub fn apply_loaded(&mut self, loaded: MapView) -> Vec<Change> {
        let mut out = self.replace_map(loaded.luns);
        out.extend(self.replace_gateways(loaded.gateways));
        out
    }

    /// The I/O path's decision: may `initiator` reach `lun` through `target`?
    pub fn check(&self, lun: &str, target: &str, initiator: &str) -> Result<&Lun> {
        let st = self
            .luns
            .get(lun)
            .ok_or_else(|| LunMapError::NoSuchLun(lun.into()))?;
        if st
            .targets
            .get(target)
            .is_some_and(|t| t.initiators.contains(initiator))
        {
            st.lun.as_ref().map_err(|reason| LunMapError::Corrupt {
                path: self.layout.lun(lun),
                reason: reason.clone(),
            })
        } else {
            Err(LunMapError::NotMapped {
                lun: lun.into(),
                target: target.into(),
                initiator: initiator.into(),
            })
        }
    }

    /// `(lun, target)` pairs through which `initiator` is mapped.
    pub fn query_initiator(&self, initiator: &str) -> Vec<(String, String)> {
        let mut out = Vec::new();
        for (l, st) in &self.luns {
            for (t, ts) in &st.targets {
                if ts.initiators.contains(initiator) {
                    out.push((l.clone(), t.clone()));
                }
            }
        }
        out
    }

    /// Number of (lun, target, initiator) mappings.
    pub fn mapping_count(&self) -> usize {
        self.luns
            .values()
            .flat_map(|s| s.targets.values())
            .map(|t| t.initiators.len())
            .sum()
    }

    /// The map as a document; LUNs whose node does not decode are left out.
    pub fn to_doc(&self) -> MapDoc {
        MapDoc {
            luns: self
                .luns
                .values()
                .filter_map(|st| st.lun.as_ref().ok().map(|l| (l, st)))
                .map(|(lun, st)| LunDoc {
                    lun: lun.clone(),
                    targets: st
                        .targets
                        .iter()
                        .map(|(t, ts)| TargetDoc {
                            target: ts.target.clone().unwrap_or_else(|| Target {
                                iqn: t.clone(),
                                portal: String::new(),
                            }),
                            initiators: ts.initiators.iter().cloned().collect(),
                        })
                        .collect(),
                })
                .collect(),
        }
    }
}

/// The change reporting a LUN's new state: updated, or corrupt.
fn lun_change(lun: &str, path: &str, state: &std::result::Result<Lun, String>) -> Change {
    match state {
        Ok(_) => Change::LunUpdated { lun: lun.into() },
        Err(reason) => Change::Corrupt {
            path: path.into(),
            reason: reason.clone(),
        },
    }
}

/// The map part of a document as view state.
pub fn luns_from_doc(doc: &MapDoc) -> BTreeMap<String, LunState> {
    doc.luns
        .iter()
        .map(|ld| {
            (
                ld.lun.name.clone(),
                LunState {
                    lun: Ok(ld.lun.clone()),
                    targets: ld
                        .targets
                        .iter()
                        .map(|td| {
                            (
                                td.target.iqn.clone(),
                                TargetState {
                                    target: Some(td.target.clone()),
                                    initiators: td.initiators.iter().cloned().collect(),
                                },
                            )
                        })
                        .collect(),
                },
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::super::Backing;
    use super::*;

    fn lun(name: &str, size_mib: u64) -> Vec<u8> {
        serde_json::to_vec(&Lun {
            id: 1,
            name: name.into(),
            size_bytes: size_mib << 20,
            backing: Backing::Range {
                device: "/dev/loop9".into(),
                offset: 0,
            },
        })
        .unwrap()
    }

    fn up(path: &str, data: Vec<u8>) -> NodeEvent {
        NodeEvent::Upsert {
            path: path.into(),
            data,
        }
    }

    const T: &str = "iqn.2026-11.lab.blocklab:t0";
    const I: &str = "iqn.2026-11.lab.host:h1";

    #[test]
    fn events_build_the_map_and_decide_io() {
        let mut v = MapView::new(Layout::new("c1").unwrap());
        let l = "/blocklab/c1/lunmap/luns/db0";
        assert_eq!(
            v.apply(&up(l, lun("db0", 1))),
            vec![Change::LunUpdated { lun: "db0".into() }]
        );
        assert!(matches!(
            v.check("db0", T, I),
            Err(LunMapError::NotMapped { .. })
        ));
        assert!(matches!(
            v.check("nope", T, I),
            Err(LunMapError::NoSuchLun(_))
        ));
        let tp = format!("{l}/targets/{T}");
        assert!(v.apply(&up(&format!("{l}/targets"), vec![])).is_empty());
        assert!(v
            .apply(&up(&tp, br#"{"iqn":"x","portal":"p"}"#.to_vec()))
            .is_empty());
        let ip = format!("{tp}/initiators/{I}");
        let mapped = Change::Mapped {
            lun: "db0".into(),
            target: T.into(),
            initiator: I.into(),
        };
        assert_eq!(v.apply(&up(&ip, vec![])), vec![mapped.clone()]);
        assert!(v.apply(&up(&ip, vec![])).is_empty(), "idempotent");
        assert_eq!(v.check("db0", T, I).unwrap().name, "db0");
        assert!(v.check("db0", "iqn.2026-11.lab.blocklab:other", I).is_err());
        assert_eq!(
            v.query_initiator(I),
            vec![("db0".to_string(), T.to_string())]
        );
        // A changed definition; the same one again is no change.
        assert_eq!(
            v.apply(&up(l, lun("db0", 2))),
            vec![Change::LunUpdated { lun: "db0".into() }]
        );
        assert!(v.apply(&up(l, lun("db0", 2))).is_empty());
        // A definition that does not decode: reported, not served, mappings kept; a good
        // one serves again.
        let ch = v.apply(&up(l, b"{broken".to_vec()));
        assert!(
            matches!(&ch[..], [Change::Corrupt { path, .. }] if path == l),
            "{ch:?}"
        );
        assert!(matches!(
            v.check("db0", T, I),
            Err(LunMapError::Corrupt { .. })
        ));
        assert!(v.to_doc().luns.is_empty());
        assert_eq!(v.query_initiator(I).len(), 1);
        v.apply(&up(l, lun("db0", 2)));
        assert!(v.check("db0", T, I).is_ok());
        // Unmap.
        assert_eq!(
            v.apply(&NodeEvent::Remove { path: ip.clone() }),
            vec![Change::Unmapped {
                lun: "db0".into(),
                target: T.into(),
                initiator: I.into()
            }]
        );
        assert!(v.check("db0", T, I).is_err());
        // Other clusters and unknown paths are ignored.
        assert!(v
            .apply(&up("/blocklab/c2/lunmap/luns/db0", lun("db0", 1)))
            .is_empty());
        // Gateways.
        assert_eq!(
            v.apply(&up("/blocklab/c1/gateways/gw1", vec![])),
            vec![Change::GatewayUp { node: "gw1".into() }]
        );
        assert_eq!(
            v.apply(&NodeEvent::Remove {
                path: "/blocklab/c1/gateways/gw1".into()
            }),
            vec![Change::GatewayDown { node: "gw1".into() }]
        );
    }

    #[test]
    fn replace_reports_differences_and_doc_round_trips() {
        let mut v = MapView::new(Layout::new("c1").unwrap());
        let l = "/blocklab/c1/lunmap/luns/db0";
        v.apply(&up(l, lun("db0", 1)));
        v.apply(&up(&format!("{l}/targets/{T}/initiators/{I}"), vec![]));
        let doc = v.to_doc();
        let json = serde_json::to_string(&doc).unwrap();
        let back: MapDoc = serde_json::from_str(&json).unwrap();
        let mut new = luns_from_doc(&back);
        assert!(v.replace_map(new.clone()).is_empty());
        assert_eq!(v.mapping_count(), 1);
        let h2 = "iqn.2026-11.lab.host:h2";
        new.get_mut("db0")
            .unwrap()
            .targets
            .get_mut(T)
            .unwrap()
            .initiators = [h2.to_string()].into();
        let ch = v.replace_map(new);
        assert!(ch.contains(&Change::Mapped {
            lun: "db0".into(),
            target: T.into(),
            initiator: h2.into()
        }));
        assert!(ch.contains(&Change::Unmapped {
            lun: "db0".into(),
            target: T.into(),
            initiator: I.into()
        }));
        let ch = v.replace_map(BTreeMap::new());
        assert!(ch.contains(&Change::LunRemoved { lun: "db0".into() }));
    }
}

#[cfg(test)]
mod classify_tests {
    use super::*;

    #[test]
    fn classification_goes_by_position_not_by_name() {
        // A cluster and a LUN named like the layout's directories.
        let v = MapView::new(Layout::new("initiators").unwrap());
        let r = "/blocklab/initiators";
        assert_eq!(
            v.classify(&format!("{r}/lunmap/luns/initiators")),
            Kind::Lun("initiators")
        );
        assert_eq!(
            v.classify(&format!("{r}/lunmap/luns/initiators/targets/t")),
            Kind::Target("initiators", "t")
        );
        assert_eq!(
            v.classify(&format!(
                "{r}/lunmap/luns/initiators/targets/t/initiators/i"
            )),
            Kind::Initiator("initiators", "t", "i")
        );
        assert_eq!(
            v.classify(&format!("{r}/lunmap/luns/targets/targets/t/initiators")),
            Kind::Other
        );
        assert_eq!(v.classify(&format!("{r}/gateways/g")), Kind::Gateway("g"));
        for other in [
            r.to_string(),
            format!("{r}/lunmap"),
            format!("{r}/lunmap/luns"),
            format!("{r}/lunmap/ids/7"),
            format!("{r}x/lunmap/luns/a"),
            "/blocklab/other/lunmap/luns/a".to_string(),
        ] {
            assert_eq!(v.classify(&other), Kind::Other, "{other}");
        }
    }
}
