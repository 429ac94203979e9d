//! `blocklab ceph create|status|teardown`: a private Ceph cluster (one monitor on
//! loopback, cephx on) for `blocklab node serve --ceph DIR` and `blocklab init --ceph DIR`
//! to deploy BlueStore OSDs into.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use blocklab::ceph::{self, osd, CephCluster, CephConf, MonClient};
use clap::Subcommand;

#[derive(Debug, Subcommand)]
pub enum CephCmd {
    /// Create a cluster in DIR (new or empty) and start its monitor; it keeps running
    /// until `blocklab ceph teardown DIR`. Prints the monitor's address and config file.
    Create {
        /// The cluster's directory (created; refused if it holds anything).
        dir: PathBuf,
        /// The monitor's address (port 0: a free port).
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: SocketAddr,
    },
    /// Print the monitor's OSD map (id, up, state) and the results OSDs reported.
    Status {
        /// The cluster's directory.
        dir: PathBuf,
    },
    /// Stop every daemon of the cluster in DIR and remove DIR. A directory that is not a
    /// cluster `blocklab ceph create` made is refused.
    Teardown {
        /// The cluster's directory.
        dir: PathBuf,
    },
}

pub fn run(cmd: CephCmd) -> anyhow::Result<()> {
    match cmd {
        CephCmd::Create { dir, mut listen } => {
            if listen.port() == 0 {
                listen.set_port(free_port(listen)?);
            }
            let c = CephCluster::create(&dir, listen)
                .with_context(|| format!("creating a Ceph cluster in {}", dir.display()))?;
            let conf = c.detach();
            println!(
                "cluster {} in {}: monitor on {}, config {}",
                conf.fsid,
                conf.dir.display(),
                conf.mon_addr,
                conf.conf_path().display()
            );
            Ok(())
        }
        CephCmd::Status { dir } => {
            let conf = CephConf::load(&dir)?;
            let admin = MonClient::admin(&conf);
            let map = osd::osd_map(&admin)?;
            println!(
                "osdmap epoch {}: {} OSDs, {} up",
                map.epoch,
                map.osds.len(),
                map.up()
            );
            for o in &map.osds {
                println!(
                    "osd.{}\t{}\t{}",
                    o.id,
                    if o.up { "up" } else { "down" },
                    o.state.join(",")
                );
            }
            for (id, r) in osd::reports(&admin)? {
                println!("report osd.{id}\t{r}");
            }
            Ok(())
        }
        CephCmd::Teardown { dir } => {
            let conf = CephConf::load(&dir)?;
            let n = ceph::processes(&conf.conf_path()).len();
            ceph::teardown(&conf)?;
            println!("stopped {n} daemons and removed {}", dir.display());
            Ok(())
        }
    }
}

/// A port that is free on `addr`'s host now (the monitor binds it moments later).
fn free_port(addr: SocketAddr) -> anyhow::Result<u16> {
    let l = std::net::TcpListener::bind(SocketAddr::new(addr.ip(), 0))
        .with_context(|| format!("finding a free port on {}", addr.ip()))?;
    Ok(l.local_addr()?.port())
}
