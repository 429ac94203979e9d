//! VIP backends. Acquiring the VIP yields the listener clients reach it through; releasing
//! drops the listener and removes the address.
//!
//! * [`VipBackend::Loopback`]: the VIP is an address in 127.0.0.0/8; only the holder binds
//!   `VIP:port`, so the kernel guarantees one holder per machine. No privileges needed.
//! * [`VipBackend::Netns`]: the node runs inside its own network namespace with a veth
//!   (`lower`) on a bridge. Taking the VIP creates a macvlan `vip_dev` on the veth with a
//!   fixed virtual MAC (as VRRP does), turns on `arp_notify` for it, adds `VIP/32`, and
//!   brings it up: the kernel then sends the gratuitous ARP that moves the clients' ARP
//!   entries. Giving it up deletes the macvlan. Needs root (run under `ip netns exec`).

use std::net::{IpAddr, SocketAddr, TcpListener};
use std::process::Command;

/// Errors of the VIP backends.
#[derive(Debug, thiserror::Error)]
pub enum VipError {
    #[error("binding the VIP {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("`{cmd}` failed: {msg}")]
    Command { cmd: String, msg: String },
    #[error("loopback VIP {0} is not in 127.0.0.0/8")]
    NotLoopback(IpAddr),
}

/// Which backend, with its settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VipBackend {
    Loopback {
        vip: IpAddr,
    },
    Netns {
        vip: IpAddr,
        /// The node's veth inside its namespace.
        lower: String,
        /// The macvlan created for the VIP.
        vip_dev: String,
        /// The virtual MAC, e.g. `02:00:5e:00:01:01`.
        mac: String,
    },
}

fn run(args: &[&str]) -> Result<(), VipError> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .map_err(|e| VipError::Command {
            cmd: args.join(" "),
            msg: e.to_string(),
        })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(VipError::Command {
            cmd: args.join(" "),
            msg: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}

impl VipBackend {
    pub fn vip(&self) -> IpAddr {
        match self {
            VipBackend::Loopback { vip } | VipBackend::Netns { vip, .. } => *vip,
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            VipBackend::Loopback { .. } => "loopback",
            VipBackend::Netns { .. } => "netns",
        }
    }

    /// Removes a VIP left behind by an earlier incarnation of this node (startup).
    pub fn clean(&self) {
        if let VipBackend::Netns { vip_dev, .. } = self {
            let _ = run(&["ip", "link", "del", vip_dev]);
        }
    }

    /// Takes the VIP and returns the listener on `VIP:port`.
    pub fn acquire(&self, port: u16) -> Result<TcpListener, VipError> {
        let addr = SocketAddr::new(self.vip(), port);
        match self {
            VipBackend::Loopback { vip } => {
                if !vip.is_loopback() {
                    return Err(VipError::NotLoopback(*vip));
                }
            }
            VipBackend::Netns {
                vip,
                lower,
                vip_dev,
                mac,
            } => {
                self.clean();
                run(&[
                    "ip", "link", "add", vip_dev, "link", lower, "type", "macvlan", "mode",
                    "bridge",
                ])?;
                let setup = || -> Result<(), VipError> {
                    run(&["ip", "link", "set", vip_dev, "address", mac])?;
                    let notify = format!("/proc/sys/net/ipv4/conf/{vip_dev}/arp_notify");
                    std::fs::write(&notify, "1").map_err(|e| VipError::Command {
                        cmd: format!("write 1 to {notify}"),
                        msg: e.to_string(),
                    })?;
                    run(&["ip", "addr", "add", &format!("{vip}/32"), "dev", vip_dev])?;
                    run(&["ip", "link", "set", vip_dev, "up"])
                };
                if let Err(e) = setup() {
                    self.clean();
                    return Err(e);
                }
            }
        }
        match TcpListener::bind(addr) {
            Ok(l) => Ok(l),
            Err(source) => {
                self.clean();
                Err(VipError::Bind { addr, source })
            }
        }
    }

    /// Gives the VIP up (the listener is dropped by the caller first).
    pub fn release(&self) {
        self.clean();
    }
}
