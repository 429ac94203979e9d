//! LUN mapping: which initiators may reach which LUN through which target, kept in a
//! coordination backend ([`crate::coord`], ZooKeeper in a real cluster) so that every change
//! is atomic and every gateway learns of it at once.
//!
//! # Layout (readable with ZooKeeper's own `zkCli.sh`)
//!
//! The LUN is the main entity; targets and initiators hang below it:
//!
//! ```text
//! /blocklab/<cluster>/lunmap/luns/<lun>                                 Lun as JSON
//! /blocklab/<cluster>/lunmap/luns/<lun>/targets                         (empty)
//! /blocklab/<cluster>/lunmap/luns/<lun>/targets/<target>                Target as JSON
//! /blocklab/<cluster>/lunmap/luns/<lun>/targets/<target>/initiators     (empty)
//! /blocklab/<cluster>/lunmap/luns/<lun>/targets/<target>/initiators/<initiator>  {"iqn":..}
//! /blocklab/<cluster>/lunmap/ids/<id>                                   {"lun":<lun>}
//! /blocklab/<cluster>/gateways/<node>                                   ephemeral, Gateway as JSON
//! ```
//!
//! `ids/<id>` reserves a LUN id: it is created in the same multi-operation as its LUN (a
//! second LUN with the same id is refused) and deleted with it.
//!
//! `<lun>` is the LUN's name, `<target>` and `<initiator>` are IQNs. For example
//! `zkCli.sh -server 127.0.0.1:2181 ls -R /blocklab/c1` shows the whole map and
//! `get /blocklab/c1/lunmap/luns/db0` the LUN.
//!
//! # Consistency
//!
//! Every edit is one atomic multi-operation ([`editor`]). A mapping is a node of its own,
//! so a map creates one node and an unmap deletes one: two editors mapping different
//! initiators never touch the same node and never lose each other's change, and the
//! races that remain (two editors creating the same target, a map racing a LUN delete)
//! make the loser's multi fail as a whole at the node both touched; it reads again and
//! retries on the new state. The LUN node itself changes only when the LUN is created or
//! deleted, so a map or unmap is one watch event per gateway and needs no read there.
//! Gateways keep
//! an in-memory [`view::MapView`] fed by a recursive watch on `/blocklab/<cluster>`
//! ([`follow`]) and decide every I/O request on it ([`gateway`]). Gateways register an
//! ephemeral node, so a gateway that dies disappears when its session times out.
//!
//! The baseline [`filesync`] keeps the same map as a JSON file copied to every gateway on an
//! interval, with a keepalived-like heartbeat for failure detection.

pub mod editor;
pub mod filesync;
pub mod follow;
pub mod gateway;
pub mod view;

use crate::coord::CoordError;
use serde::{Deserialize, Serialize};

/// Where a LUN's bytes live.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Backing {
    /// `size_bytes` bytes of a (formatted) device starting at `offset`.
    Range { device: String, offset: u64 },
    /// A volume (issue 7); gateways do not serve these yet.
    Volume { volume: String },
}

/// A LUN: the main entity of the map. (Nodes written by earlier versions also carry a
/// `generation` counter; it is ignored.)
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lun {
    pub id: u32,
    pub name: String,
    pub size_bytes: u64,
    pub backing: Backing,
}

/// The portal of a target created by a map that names none.
pub const DEFAULT_PORTAL: &str = "0.0.0.0:3260";

/// What `lunmap/ids/<id>` holds: the LUN that uses the id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdClaim {
    pub lun: String,
}

/// An iSCSI-style target through which initiators reach a LUN.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Target {
    pub iqn: String,
    pub portal: String,
}

/// A host allowed to reach a LUN through a target.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Initiator {
    pub iqn: String,
}

/// A registered gateway (ephemeral node).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GatewayInfo {
    pub node: String,
    pub addr: String,
    pub pid: u32,
}

/// Errors of LUN mapping.
#[derive(Debug, thiserror::Error)]
pub enum LunMapError {
    #[error("invalid {what} {value:?}: {reason}")]
    InvalidName {
        what: &'static str,
        value: String,
        reason: &'static str,
    },
    #[error("LUN {0} does not exist")]
    NoSuchLun(String),
    #[error("LUN {0} already exists")]
    LunExists(String),
    #[error("LUN id {id} is already used by LUN {lun}")]
    IdInUse { id: u32, lun: String },
    #[error(
        "target {target} of LUN {lun} is at portal {portal}, not {wanted}; a target's portal is fixed when the target is created (map with --portal {portal}, or leave --portal out)"
    )]
    PortalMismatch {
        lun: String,
        target: String,
        portal: String,
        wanted: String,
    },
    #[error("LUN {lun} is still mapped to {initiators} initiator(s); unmap them first or force")]
    StillMapped { lun: String, initiators: usize },
    #[error("initiator {initiator} is not mapped to LUN {lun} through target {target}")]
    NotMapped {
        lun: String,
        target: String,
        initiator: String,
    },
    #[error("LUN {lun}: {reason}")]
    BadLun { lun: String, reason: String },
    #[error("too many conflicting concurrent edits of LUN {0}; giving up after {1} attempts")]
    Contention(String, u32),
    #[error("corrupt map node {path}: {reason}")]
    Corrupt { path: String, reason: String },
    #[error(
        "LUN {lun}: the edit failed twice in the same way on an unchanged map ({source}); the layout under {path} is not what blocklab writes (edited by hand?)"
    )]
    Structural {
        lun: String,
        path: String,
        #[source]
        source: CoordError,
    },
    #[error("the {0} thread panicked")]
    Panicked(String),
    #[error(transparent)]
    Coord(#[from] CoordError),
    #[error("{path}: {cause}")]
    Io { path: String, cause: std::io::Error },
}

pub type Result<T, E = LunMapError> = std::result::Result<T, E>;

fn invalid(what: &'static str, value: &str, reason: &'static str) -> LunMapError {
    LunMapError::InvalidName {
        what,
        value: value.to_string(),
        reason,
    }
}

/// LUN, cluster and node names: 1–64 of `[a-z0-9._-]`, starting with a letter or digit.
pub fn validate_simple_name(what: &'static str, s: &str) -> Result<()> {
    if s.is_empty() || s.len() > 64 {
        return Err(invalid(what, s, "must be 1 to 64 characters"));
    }
    if !s.as_bytes()[0].is_ascii_alphanumeric() {
        return Err(invalid(what, s, "must start with a letter or digit"));
    }
    if !s
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
    {
        return Err(invalid(
            what,
            s,
            "only lowercase letters, digits, `.`, `_` and `-` are allowed",
        ));
    }
    Ok(())
}

/// An iSCSI qualified name: `iqn.YYYY-MM.reversed.domain[:identifier]` (lowercase) or
/// `eui.` followed by 16 hex digits. Always a valid node name.
pub fn validate_iqn(what: &'static str, s: &str) -> Result<()> {
    if s.len() > 223 {
        return Err(invalid(what, s, "longer than 223 bytes"));
    }
    if let Some(hex) = s.strip_prefix("eui.") {
        if hex.len() == 16 && hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Ok(());
        }
        return Err(invalid(what, s, "eui. must be followed by 16 hex digits"));
    }
    let Some(rest) = s.strip_prefix("iqn.") else {
        return Err(invalid(what, s, "must start with iqn. or eui."));
    };
    let b = rest.as_bytes();
    let date_ok = b.len() > 8
        && b[..4].iter().all(u8::is_ascii_digit)
        && b[4] == b'-'
        && b[5..7].iter().all(u8::is_ascii_digit)
        && b[7] == b'.'
        && (b"01".contains(&b[5])
            && (b[5] == b'0' && b[6] != b'0' || b[5] == b'1' && b[6] <= b'2'));
    if !date_ok {
        return Err(invalid(what, s, "expected iqn.YYYY-MM.domain[:name]"));
    }
    let (domain, ident) = match rest[8..].split_once(':') {
        Some((d, i)) => (d, Some(i)),
        None => (&rest[8..], None),
    };
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.bytes()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-')
    };
    if !domain.split('.').all(label_ok) {
        return Err(invalid(
            what,
            s,
            "naming authority must be a reversed domain name (lowercase)",
        ));
    }
    if let Some(i) = ident {
        if i.is_empty()
            || !i
                .bytes()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || b".-:_".contains(&c))
        {
            return Err(invalid(
                what,
                s,
                "identifier after `:` may hold only lowercase letters, digits, `.`, `-`, `:`, `_`",
            ));
        }
    }
    Ok(())
}

/// Paths of the layout for one cluster.
#[derive(Debug, Clone)]
pub struct Layout {
    pub cluster: String,
}

impl Layout {
    pub fn new(cluster: &str) -> Result<Layout> {
        validate_simple_name("cluster name", cluster)?;
        Ok(Layout {
            cluster: cluster.to_string(),
        })
    }
    pub fn root(&self) -> String {
        format!("/blocklab/{}", self.cluster)
    }
    pub fn luns(&self) -> String {
        format!("/blocklab/{}/lunmap/luns", self.cluster)
    }
    pub fn lun(&self, lun: &str) -> String {
        format!("{}/{lun}", self.luns())
    }
    pub fn targets(&self, lun: &str) -> String {
        format!("{}/targets", self.lun(lun))
    }
    pub fn target(&self, lun: &str, t: &str) -> String {
        format!("{}/targets/{t}", self.lun(lun))
    }
    pub fn initiators(&self, lun: &str, t: &str) -> String {
        format!("{}/initiators", self.target(lun, t))
    }
    pub fn initiator(&self, lun: &str, t: &str, i: &str) -> String {
        format!("{}/initiators/{i}", self.target(lun, t))
    }
    pub fn ids(&self) -> String {
        format!("/blocklab/{}/lunmap/ids", self.cluster)
    }
    pub fn id(&self, id: u32) -> String {
        format!("{}/{id}", self.ids())
    }
    pub fn gateways(&self) -> String {
        format!("/blocklab/{}/gateways", self.cluster)
    }
    pub fn gateway(&self, node: &str) -> String {
        format!("{}/{node}", self.gateways())
    }
}

/// CLOCK_MONOTONIC in nanoseconds: comparable across processes on one machine (used to
/// measure propagation between an editor and gateway processes).
pub fn mono_ns() -> u64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    t.tv_sec as u64 * 1_000_000_000 + t.tv_nsec as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iqns() {
        for ok in [
            "iqn.2026-11.lab.blocklab:gw1",
            "iqn.1993-08.org.debian:01:abcdef",
            "iqn.2001-04.com.example",
            "eui.02004567a425678d",
        ] {
            validate_iqn("initiator", ok).unwrap();
        }
        for bad in [
            "",
            "iqn.",
            "iqn.2026-13.lab.x",
            "iqn.26-11.lab.x",
            "iqn.2026-11.Lab.x",
            "iqn.2026-11.lab..x",
            "iqn.2026-11.lab.x:",
            "iqn.2026-11.lab.x:a/b",
            "eui.123",
            "naa.123",
            "iqn.2026-11.lab.x:has space",
        ] {
            assert!(validate_iqn("initiator", bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn names() {
        validate_simple_name("LUN name", "db0").unwrap();
        validate_simple_name("LUN name", "a.b_c-1").unwrap();
        for bad in ["", "-a", "A", "a/b", "a b", ".", "..", &"x".repeat(65)] {
            assert!(validate_simple_name("LUN name", bad).is_err(), "{bad:?}");
        }
    }
}
