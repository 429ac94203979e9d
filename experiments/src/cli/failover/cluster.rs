//! Starts a failover cluster as real processes — one `blocklab mgmt block-service` and N
//! `blocklab mgmt serve` — for the end-to-end tests and `exp-failover`; kills and restarts
//! nodes; reads their event lines. With the `netns` backend it first builds the network:
//! one namespace per node, one for the block service, one for the client, all on a bridge
//! inside a switch namespace (nothing is added to the caller's namespace), and deletes every
//! namespace on drop.

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, UdpSocket};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use crate::args::format_duration;
use anyhow::{bail, Context};
pub use blocklab::failover::node::{unix_us, Mode};
use blocklab::failover::vip::run;
pub use blocklab::failover::vip::VipKind;

/// What to start.
#[derive(Debug, Clone)]
pub struct ClusterSpec {
    /// The `blocklab` binary.
    pub bin: PathBuf,
    /// Working directory: service state, logs.
    pub dir: PathBuf,
    pub devices: Vec<PathBuf>,
    pub force: bool,
    pub nodes: usize,
    pub mode: Mode,
    /// The nodes' heartbeat period (the service's session timeout is 5 of them).
    pub heartbeat: Duration,
    pub backend: VipKind,
    /// Copy throughput cap of the block service, bytes per second (0: none).
    pub copy_rate: u64,
    /// The block service's `--journal` (None: `file`).
    pub journal: Option<String>,
    /// More arguments for the block service (e.g. the hidden crash injection).
    pub service_args: Vec<String>,
}

/// An event line of a node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub node: usize,
    pub kind: String,
    pub epoch: Option<(u64, u32)>,
    pub unix_us: u128,
}

fn parse_event(node: usize, line: &str) -> Option<Event> {
    let mut kind = None;
    let mut epoch = None;
    let mut t = None;
    for kv in line.split_whitespace() {
        let (k, v) = kv.split_once('=')?;
        match k {
            "event" => kind = Some(v.to_string()),
            "epoch" => {
                let (c, n) = v.split_once('.')?;
                epoch = Some((c.parse().ok()?, n.parse().ok()?));
            }
            "unix_us" => t = v.parse().ok(),
            _ => {}
        }
    }
    Some(Event {
        node,
        kind: kind?,
        epoch,
        unix_us: t?,
    })
}

/// Moves the calling thread into the network namespace `name` (`/run/netns/NAME`; network
/// namespaces are per thread), so its sockets reach the cluster the way a host there would.
pub fn enter_netns(name: &str) -> anyhow::Result<()> {
    let f = File::open(format!("/run/netns/{name}"))
        .with_context(|| format!("opening network namespace {name}"))?;
    rustix::thread::move_into_link_name_space(
        f.as_fd(),
        Some(rustix::thread::LinkNameSpaceType::Network),
    )
    .with_context(|| format!("entering network namespace {name}"))?;
    Ok(())
}

/// The namespaces and addresses of a `netns` cluster.
#[derive(Debug)]
pub struct NetTopo {
    pub switch: String,
    pub nodes: Vec<String>,
    pub service: String,
    pub client: String,
    pub prefix: String,
    created: Vec<String>,
}

impl NetTopo {
    pub fn create(tag: &str, n: usize) -> anyhow::Result<NetTopo> {
        let pid = std::process::id();
        let mut t = NetTopo {
            switch: format!("{tag}w"),
            nodes: (0..n).map(|i| format!("{tag}n{i}")).collect(),
            service: format!("{tag}s"),
            client: format!("{tag}c"),
            prefix: format!("10.{}.{}", 100 + (pid % 100), (pid / 100) % 250),
            created: Vec::new(),
        };
        run(&["ip", "netns", "add", &t.switch])?;
        t.created.push(t.switch.clone());
        run(&[
            "ip", "-n", &t.switch, "link", "add", "br0", "type", "bridge",
        ])?;
        run(&["ip", "-n", &t.switch, "link", "set", "br0", "up"])?;
        let mut hosts: Vec<(String, u32)> = t
            .nodes
            .iter()
            .enumerate()
            .map(|(i, ns)| (ns.clone(), i as u32 + 1))
            .collect();
        hosts.push((t.service.clone(), 250));
        hosts.push((t.client.clone(), 200));
        for (k, (ns, host)) in hosts.iter().enumerate() {
            run(&["ip", "netns", "add", ns])?;
            t.created.push(ns.clone());
            let port = format!("p{k}");
            run(&[
                "ip", "-n", &t.switch, "link", "add", &port, "type", "veth", "peer", "name",
                "eth0", "netns", ns,
            ])?;
            run(&[
                "ip", "-n", &t.switch, "link", "set", &port, "master", "br0", "up",
            ])?;
            run(&["ip", "-n", ns, "link", "set", "lo", "up"])?;
            run(&[
                "ip",
                "-n",
                ns,
                "addr",
                "add",
                &format!("{}.{host}/24", t.prefix),
                "dev",
                "eth0",
            ])?;
            run(&["ip", "-n", ns, "link", "set", "eth0", "up"])?;
        }
        Ok(t)
    }

    pub fn addr(&self, host: u32) -> Ipv4Addr {
        format!("{}.{host}", self.prefix)
            .parse()
            .expect("prefix is a.b.c")
    }
}

impl Drop for NetTopo {
    fn drop(&mut self) {
        for ns in self.created.iter().rev() {
            let _ = Command::new("ip")
                .args(["netns", "del", ns])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }
}

fn free_tcp_port(ip: IpAddr) -> anyhow::Result<u16> {
    Ok(TcpListener::bind((ip, 0))?.local_addr()?.port())
}

fn free_udp_port() -> anyhow::Result<u16> {
    Ok(UdpSocket::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// A running cluster; every process is killed and every namespace deleted on drop.
#[derive(Debug)]
pub struct Cluster {
    pub spec: ClusterSpec,
    svc: Option<Child>,
    nodes: Vec<Option<Child>>,
    events: Arc<Mutex<Vec<Event>>>,
    /// Where clients send requests: the VIP, or in `client_retry` each node's address.
    pub vip: SocketAddr,
    pub node_addrs: Vec<SocketAddr>,
    hb_addrs: Vec<SocketAddr>,
    service: SocketAddr,
    pub net: Option<NetTopo>,
}

impl Cluster {
    pub fn journal_path(&self) -> PathBuf {
        self.spec.dir.join("service").join("journal.jsonl")
    }
    pub fn service_dir(&self) -> PathBuf {
        self.spec.dir.join("service")
    }

    pub fn start(spec: ClusterSpec) -> anyhow::Result<Cluster> {
        std::fs::create_dir_all(&spec.dir)?;
        let pid = std::process::id();
        let uniq = (unix_us() % 200) as u32;
        let (vip, service, node_addrs, hb_addrs, net) = match spec.backend {
            VipKind::Loopback => {
                let vip_ip = IpAddr::V4(Ipv4Addr::new(
                    127,
                    (20 + pid % 200) as u8,
                    (uniq + 20) as u8,
                    1,
                ));
                let vip = SocketAddr::new(vip_ip, free_tcp_port(vip_ip)?);
                let lo = IpAddr::V4(Ipv4Addr::LOCALHOST);
                let service = SocketAddr::new(lo, free_tcp_port(lo)?);
                let mut nodes = Vec::new();
                let mut hbs = Vec::new();
                for _ in 0..spec.nodes {
                    nodes.push(SocketAddr::new(lo, free_tcp_port(lo)?));
                    hbs.push(SocketAddr::new(lo, free_udp_port()?));
                }
                (vip, service, nodes, hbs, None)
            }
            VipKind::Netns => {
                let tag = format!("bf{}{}", pid % 100000, uniq);
                let t = NetTopo::create(&tag, spec.nodes)?;
                let vip = SocketAddr::new(IpAddr::V4(t.addr(100)), 7200);
                let service = SocketAddr::new(IpAddr::V4(t.addr(250)), 7100);
                let nodes = (0..spec.nodes)
                    .map(|i| SocketAddr::new(IpAddr::V4(t.addr(i as u32 + 1)), 7300))
                    .collect();
                let hbs = (0..spec.nodes)
                    .map(|i| SocketAddr::new(IpAddr::V4(t.addr(i as u32 + 1)), 7110))
                    .collect();
                (vip, service, nodes, hbs, Some(t))
            }
        };
        let mut c = Cluster {
            nodes: (0..spec.nodes).map(|_| None).collect(),
            spec,
            svc: None,
            events: Arc::new(Mutex::new(Vec::new())),
            vip,
            node_addrs,
            hb_addrs,
            service,
            net,
        };
        c.start_service()?;
        for i in 0..c.spec.nodes {
            c.start_node(i)?;
        }
        Ok(c)
    }

    fn command(&self, ns: Option<&str>) -> Command {
        match ns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(&self.spec.bin);
                c
            }
            None => Command::new(&self.spec.bin),
        }
    }

    fn log(&self, name: &str) -> anyhow::Result<Stdio> {
        Ok(Stdio::from(
            File::options()
                .create(true)
                .append(true)
                .open(self.spec.dir.join(name))?,
        ))
    }

    /// Starts the block service (again, after [`Cluster::stop_service`]).
    pub fn start_service(&mut self) -> anyhow::Result<()> {
        let devices = self
            .spec
            .devices
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(",");
        let ns = self.net.as_ref().map(|n| n.service.clone());
        let mut cmd = self.command(ns.as_deref());
        cmd.args(["mgmt", "block-service", "--listen"])
            .arg(self.service.to_string())
            .arg("--vip")
            .arg(self.vip.to_string())
            .arg("--state-dir")
            .arg(self.service_dir())
            .arg("--devices")
            .arg(devices)
            .arg("--copy-rate")
            .arg(self.spec.copy_rate.to_string())
            .arg("--session-timeout")
            .arg(format_duration(self.spec.heartbeat * 5))
            .arg("--journal")
            .arg(self.spec.journal.as_deref().unwrap_or("file"));
        if self.spec.force {
            cmd.arg("--force");
        }
        cmd.args(&self.spec.service_args);
        cmd.stdout(Stdio::piped()).stderr(self.log("service.log")?);
        let mut child = cmd.spawn().context("starting the block service")?;
        let out = child.stdout.take().context("service stdout")?;
        let mut lines = BufReader::new(out).lines();
        match lines.next() {
            Some(Ok(l)) if l.starts_with("event=service_listening") => {}
            other => {
                let _ = child.kill();
                let _ = child.wait();
                let log =
                    std::fs::read_to_string(self.spec.dir.join("service.log")).unwrap_or_default();
                bail!(
                    "the block service did not start ({other:?}): {}",
                    log.trim()
                );
            }
        }
        thread::spawn(move || for _ in lines {});
        self.svc = Some(child);
        Ok(())
    }

    /// Starts (or restarts) node `i`.
    pub fn start_node(&mut self, i: usize) -> anyhow::Result<()> {
        if let (Some(net), VipKind::Netns) = (&self.net, self.spec.backend) {
            run(&["ip", "-n", &net.nodes[i], "link", "set", "eth0", "up"])?;
        }
        let ns = self.net.as_ref().map(|n| n.nodes[i].clone());
        let mut cmd = self.command(ns.as_deref());
        cmd.args(["mgmt", "serve", "--node", &i.to_string()]);
        let peers: Vec<String> = (self.hb_addrs.iter().enumerate())
            .map(|(j, a)| format!("{j}={a}"))
            .collect();
        cmd.arg("--peers").arg(peers.join(","));
        cmd.arg("--service")
            .arg(self.service.to_string())
            .arg("--vip")
            .arg(self.vip.ip().to_string())
            .arg("--port")
            .arg(self.vip.port().to_string())
            .arg("--heartbeat")
            .arg(format_duration(self.spec.heartbeat))
            .arg("--vip-backend")
            .arg(self.spec.backend.name())
            .arg("--mode")
            .arg(self.spec.mode.name())
            .arg("--listen")
            .arg(self.node_addrs[i].to_string());
        cmd.stdout(Stdio::piped())
            .stderr(self.log(&format!("node{i}.log"))?);
        let mut child = cmd.spawn().with_context(|| format!("starting node {i}"))?;
        let out = child.stdout.take().context("node stdout")?;
        let events = self.events.clone();
        thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if let Some(e) = parse_event(i, &line) {
                    events.lock().unwrap_or_else(|p| p.into_inner()).push(e);
                }
            }
        });
        self.nodes[i] = Some(child);
        Ok(())
    }

    /// SIGKILLs node `i` (with `netns`, first takes its link down: the host is gone, not just
    /// the process). Returns the kill time in unix µs.
    pub fn kill_node(&mut self, i: usize) -> anyhow::Result<u128> {
        let t = unix_us();
        // The link goes first, as when a host loses power: nothing (no FIN, no RST from the
        // dying process's sockets) reaches the others.
        if let Some(net) = &self.net {
            run(&["ip", "-n", &net.nodes[i], "link", "set", "eth0", "down"])?;
        }
        if let Some(mut c) = self.nodes[i].take() {
            c.kill().context("SIGKILL")?;
            let _ = c.wait();
        }
        Ok(t)
    }

    pub fn is_running(&self, i: usize) -> bool {
        self.nodes[i].is_some()
    }

    pub fn events(&self) -> Vec<Event> {
        self.events
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The node currently holding the VIP: the running node with the newest acquisition
    /// not followed by a release.
    pub fn holder(&self) -> Option<usize> {
        let ev = self.events();
        let mut best: Option<(u64, u32, usize)> = None;
        for (k, e) in ev.iter().enumerate() {
            if e.kind != "vip_acquired" || !self.is_running(e.node) {
                continue;
            }
            let released = ev[k + 1..]
                .iter()
                .any(|x| x.node == e.node && x.kind == "vip_released");
            if released {
                continue;
            }
            let (c, n) = e.epoch.unwrap_or((0, 0));
            if best.is_none_or(|b| (c, n) > (b.0, b.1)) {
                best = Some((c, n, e.node));
            }
        }
        best.map(|b| b.2)
    }

    /// Waits (up to `timeout`) for a holder other than `not`.
    pub fn wait_holder(&self, not: Option<usize>, timeout: Duration) -> anyhow::Result<usize> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(h) = self.holder() {
                if Some(h) != not {
                    return Ok(h);
                }
            }
            if Instant::now() > deadline {
                bail!(
                    "no VIP holder after {timeout:?}; events: {:?}",
                    self.events()
                );
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits (up to `timeout`) until every running node reported `event` (e.g. `listening`
    /// in `client_retry`, `started` otherwise) since it was last started.
    pub fn wait_event_from_all(&self, event: &str, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let ev = self.events();
            let missing: Vec<usize> = (0..self.spec.nodes)
                .filter(|&i| self.is_running(i))
                .filter(|&i| !ev.iter().any(|e| e.node == i && e.kind == event))
                .collect();
            if missing.is_empty() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("nodes {missing:?} never reported {event} within {timeout:?}");
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// The first VIP acquisition after `since_us` (unix µs).
    pub fn acquisition_after(&self, since_us: u128) -> Option<Event> {
        self.events()
            .into_iter()
            .filter(|e| e.kind == "vip_acquired" && e.unix_us >= since_us)
            .min_by_key(|e| e.unix_us)
    }

    /// Waits (up to `timeout`) for the block service to exit by itself; its exit status.
    pub fn wait_service_exit(
        &mut self,
        timeout: Duration,
    ) -> anyhow::Result<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        let c = self
            .svc
            .as_mut()
            .context("the block service is not running")?;
        loop {
            if let Some(st) = c.try_wait()? {
                self.svc = None;
                return Ok(st);
            }
            if Instant::now() > deadline {
                bail!("the block service is still running after {timeout:?}");
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// Stops the block service gracefully (SIGTERM) so its store can be opened by others.
    pub fn stop_service(&mut self) -> anyhow::Result<()> {
        if let Some(mut c) = self.svc.take() {
            let pid = rustix::process::Pid::from_raw(c.id() as i32).context("service pid")?;
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                if c.try_wait()?.is_some() {
                    break;
                }
                if Instant::now() > deadline {
                    let _ = c.kill();
                    let _ = c.wait();
                    break;
                }
                thread::sleep(Duration::from_millis(10));
            }
        }
        Ok(())
    }

    pub fn dir(&self) -> &Path {
        &self.spec.dir
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for c in self.nodes.iter_mut().flatten() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if let Some(c) = self.svc.as_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
        // `net` (the namespaces) drops after this, once no process uses them.
    }
}
