//! VIP backends. Acquiring the VIP yields the listener clients reach it through; releasing
//! drops the listener and removes the address.
//!
//! * [`VipBackend::Loopback`]: the VIP is an address in 127.0.0.0/8; only the holder binds
//!   `VIP:port`, so the kernel guarantees one holder per machine. No privileges needed.
//! * [`VipBackend::Netns`]: the node runs inside its own network namespace with a veth
//!   (`lower`) on a bridge. Taking the VIP creates a macvlan `vip_dev` on the veth with a
//!   fixed virtual MAC (as VRRP does) and `arp_notify` on (inherited from the namespace's
//!   `default`), adds `VIP/32`, and brings it up — one `ip -batch` — and the kernel sends
//!   the gratuitous ARP that moves the clients' ARP entries. Giving it up deletes the
//!   macvlan. Needs root (run under `ip netns exec`).

use std::net::{IpAddr, SocketAddr, TcpListener};
use std::process::Command;

/// Errors of the VIP backends.
#[derive(Debug, thiserror::Error)]
pub enum VipError {
    #[error("binding the VIP {addr}: {cause}")]
    Bind {
        addr: SocketAddr,
        cause: std::io::Error,
    },
    #[error("`{cmd}` failed: {msg}")]
    Command { cmd: String, msg: String },
    #[error("loopback VIP {0} is not in 127.0.0.0/8")]
    NotLoopback(IpAddr),
}

crate::names::named_enum! {
    /// Which kind of VIP backend (the name on the command line and in the CSV).
    pub enum VipKind("VIP backend") {
        Loopback,
        Netns,
    }
}

impl VipKind {
    pub const ALL: [VipKind; 2] = [VipKind::Loopback, VipKind::Netns];
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

/// Runs a command (e.g. `ip …`) and fails with its standard error if it fails.
pub fn run(args: &[&str]) -> Result<(), VipError> {
    let Some((prog, rest)) = args.split_first() else {
        return Err(VipError::Command {
            cmd: String::new(),
            msg: "empty command".into(),
        });
    };
    let out = Command::new(prog)
        .args(rest)
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

/// Runs `ip -batch -` with `cmds` on its standard input.
fn run_batch(cmds: &str) -> Result<(), VipError> {
    use std::io::Write;
    let fail = |msg: String| VipError::Command {
        cmd: format!("ip -batch - <<< {cmds:?}"),
        msg,
    };
    let mut child = Command::new("ip")
        .args(["-batch", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| fail(e.to_string()))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(cmds.as_bytes())
            .map_err(|e| fail(e.to_string()))?;
    }
    let out = child.wait_with_output().map_err(|e| fail(e.to_string()))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(fail(
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        ))
    }
}

impl VipBackend {
    pub fn vip(&self) -> IpAddr {
        match self {
            VipBackend::Loopback { vip } | VipBackend::Netns { vip, .. } => *vip,
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
                // New devices of this namespace inherit arp_notify from `default`, so the
                // macvlan announces itself when it comes up; one `ip -batch` (one fork)
                // creates it with the virtual MAC, adds the VIP and brings it up.
                let notify = "/proc/sys/net/ipv4/conf/default/arp_notify";
                std::fs::write(notify, "1").map_err(|e| VipError::Command {
                    cmd: format!("write 1 to {notify}"),
                    msg: e.to_string(),
                })?;
                let batch = format!(
                    "link add link {lower} name {vip_dev} address {mac} type macvlan mode bridge\n\
                     addr add {vip}/32 dev {vip_dev}\n\
                     link set {vip_dev} up\n"
                );
                if let Err(first) = run_batch(&batch) {
                    // A macvlan left by an earlier incarnation: remove it and try once more.
                    self.clean();
                    if let Err(e) = run_batch(&batch) {
                        self.clean();
                        return Err(match e {
                            VipError::Command { cmd, msg } => VipError::Command {
                                cmd,
                                msg: format!("{msg} (first attempt: {first})"),
                            },
                            other => other,
                        });
                    }
                }
            }
        }
        match TcpListener::bind(addr) {
            Ok(l) => Ok(l),
            Err(source) => {
                self.clean();
                Err(VipError::Bind {
                    addr,
                    cause: source,
                })
            }
        }
    }

    /// Gives the VIP up (the listener is dropped by the caller first).
    pub fn release(&self) {
        self.clean();
    }
}
