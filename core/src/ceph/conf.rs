//! A private cluster's configuration: its name, fsid, monitor address and the one directory
//! that holds everything of it (no file outside it, so a host's own Ceph is not touched).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::error::{CephError, Result};

/// The cluster name blocklab gives its private clusters (Ceph's file names and admin
/// sockets carry it, so they never collide with a host cluster's `ceph`).
pub const CLUSTER_NAME: &str = "blocklab";

/// Where a private cluster lives and how to reach its monitor; what a node agent needs to
/// deploy OSDs into it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CephConf {
    /// The cluster's directory: config, keyrings, monitor and OSD data, sockets, logs.
    pub dir: PathBuf,
    pub fsid: Uuid,
    /// The monitor's messenger v1 address.
    pub mon_addr: SocketAddr,
}

/// Settings that keep an OSD small: BlueStore's cache fixed at 128 MiB instead of
/// autotuned towards `osd_memory_target` (4 GiB), so 24 OSDs fit a 24 GiB machine.
const OSD_SETTINGS: &str = "\
osd objectstore = bluestore
bluestore cache autotune = false
bluestore cache size = 128M
osd pool default size = 1
";

impl CephConf {
    pub fn new(dir: &Path, mon_addr: SocketAddr) -> CephConf {
        CephConf {
            dir: dir.to_path_buf(),
            fsid: Uuid::new_v4(),
            mon_addr,
        }
    }

    /// Where the cluster's description ([`CephConf`] as JSON) is kept in its directory;
    /// its presence is what marks a directory as a cluster blocklab made.
    pub fn description_path(dir: &Path) -> PathBuf {
        dir.join("blocklab-cluster.json")
    }

    /// Writes the description into the cluster directory.
    pub fn save(&self) -> Result<()> {
        let path = CephConf::description_path(&self.dir);
        let text = serde_json::to_string_pretty(self).expect("a CephConf serialises");
        std::fs::write(&path, text).map_err(|cause| CephError::Io {
            what: "writing the cluster description",
            path,
            cause,
        })
    }

    /// The cluster blocklab made in `dir`; a directory without its description is refused
    /// (it is not one of blocklab's clusters).
    pub fn load(dir: &Path) -> Result<CephConf> {
        let path = CephConf::description_path(dir);
        let text = std::fs::read_to_string(&path).map_err(|cause| match cause.kind() {
            std::io::ErrorKind::NotFound => CephError::NotACluster {
                path: dir.to_path_buf(),
            },
            _ => CephError::Io {
                what: "reading the cluster description",
                path: path.clone(),
                cause,
            },
        })?;
        serde_json::from_str(&text).map_err(|_| CephError::Parse {
            what: format!("cluster description {}", path.display()),
            text,
        })
    }

    /// The config file every Ceph program of this cluster is started with (`-c`); also
    /// how teardown recognises the cluster's processes.
    pub fn conf_path(&self) -> PathBuf {
        self.dir.join(format!("{CLUSTER_NAME}.conf"))
    }
    /// The monitor's initial keyring (`mon.`, `client.admin`, `client.bootstrap-osd`).
    pub fn mon_keyring(&self) -> PathBuf {
        self.dir.join("mon.keyring")
    }
    /// An entity's keyring in the cluster directory (`client.admin`, `client.bootstrap-osd`).
    pub fn keyring(&self, entity: &str) -> PathBuf {
        self.dir.join(format!("{CLUSTER_NAME}.{entity}.keyring"))
    }
    pub fn monmap(&self) -> PathBuf {
        self.dir.join("monmap")
    }
    pub fn mon_data(&self) -> PathBuf {
        self.dir.join("mon").join(format!("{CLUSTER_NAME}-a"))
    }
    /// OSD `id`'s data directory (its `block` links to the device).
    pub fn osd_dir(&self, id: u32) -> PathBuf {
        self.dir.join("osd").join(format!("{CLUSTER_NAME}-{id}"))
    }
    pub fn run_dir(&self) -> PathBuf {
        self.dir.join("run")
    }
    /// A daemon's admin socket, e.g. `osd.3`.
    pub fn admin_socket(&self, name: &str) -> PathBuf {
        self.run_dir().join(format!("{CLUSTER_NAME}-{name}.asok"))
    }
    pub fn log_dir(&self) -> PathBuf {
        self.dir.join("log")
    }

    /// The text of the config file: one monitor on `mon_addr` (messenger v1 only), cephx
    /// on, every path under the cluster directory.
    pub fn render(&self) -> String {
        let d = self.dir.display();
        format!(
            "\
[global]
fsid = {fsid}
mon host = v1:{mon}
mon initial members = a
ms bind msgr2 = false
auth cluster required = cephx
auth service required = cephx
auth client required = cephx
run dir = {d}/run
admin socket = {d}/run/$cluster-$name.asok
log file = {d}/log/$cluster-$name.log
pid file = {d}/run/$cluster-$name.pid
mon data = {d}/mon/$cluster-$id
osd data = {d}/osd/$cluster-$id
keyring = {d}/$cluster.$name.keyring
mon allow pool delete = true
mon warn on pool no redundancy = false
mon data avail warn = 1
mon data avail crit = 0
{OSD_SETTINGS}
[mon]
keyring = {d}/mon/$cluster-$id/keyring

[osd]
keyring = {d}/osd/$cluster-$id/keyring
",
            fsid = self.fsid,
            mon = self.mon_addr,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_path_is_under_the_cluster_directory() {
        let c = CephConf::new(Path::new("/x/c"), "127.0.0.1:6789".parse().unwrap());
        let text = c.render();
        assert!(text.contains(&format!("fsid = {}", c.fsid)));
        assert!(text.contains("mon host = v1:127.0.0.1:6789"));
        for line in text.lines().filter(|l| l.contains('/')) {
            let path = line.split(" = ").nth(1).unwrap();
            assert!(path.starts_with("/x/c/"), "{line}");
        }
        assert_eq!(c.osd_dir(3), Path::new("/x/c/osd/blocklab-3"));
        assert_eq!(
            c.admin_socket("osd.3"),
            Path::new("/x/c/run/blocklab-osd.3.asok")
        );
    }
}
