//! `blocklab gateway` (serve LUN I/O decided on the live map) and
//! `blocklab lunmap create-lun|delete-lun|map|unmap|list|query|gateways|watch|io`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::{bail, Context};
use blocklab::coord::{self, ConnectOptions, Coord, CoordSpec};
use blocklab::lunmap::editor::LunMap;
use blocklab::lunmap::filesync;
use blocklab::lunmap::follow::{follow_coord, Follower, OnChange};
use blocklab::lunmap::gateway::{GatewayClient, GatewayServer};
use blocklab::lunmap::view::{Change, MapView};
use blocklab::lunmap::{validate_simple_name, Backing, GatewayInfo, Layout};
use clap::{Args, Subcommand};

use crate::args::{parse_offset, parse_positive_duration, parse_size};

/// Default coordination backend: the embedded store.
pub const DEFAULT_COORD: &str = "embedded:/var/tmp/blocklab/coord.store";

fn parse_coord(s: &str) -> Result<CoordSpec, String> {
    CoordSpec::parse(s).map_err(|e| e.to_string())
}

/// `spec` if other processes can reach it (ZooKeeper); the reason otherwise. `who` says
/// what needs other processes ("exp-lunmap runs gateways as separate processes").
pub fn shared_coord(who: &str, spec: CoordSpec) -> Result<CoordSpec, String> {
    match spec {
        z @ CoordSpec::ZooKeeper { .. } => Ok(z),
        CoordSpec::Embedded(p) => Err(format!(
            "{who}, which an in-process embedded store ({}) cannot serve: its owner locks every other process out; give --coord zk://HOST:PORT[/chroot]",
            p.display()
        )),
    }
}

/// A `--coord` value that must be ZooKeeper (exp-lunmap's `--coord`).
pub fn parse_zk(s: &str) -> Result<CoordSpec, String> {
    shared_coord(
        "exp-lunmap runs gateways as separate processes",
        parse_coord(s)?,
    )
}

/// Where the map lives and which cluster.
#[derive(Debug, Clone, Args)]
pub struct MapArgs {
    /// Coordination backend: `embedded:PATH` or `zk://host:port[,host:port...][/chroot]`.
    #[arg(long, default_value = DEFAULT_COORD, value_parser = parse_coord)]
    pub coord: CoordSpec,
    /// Cluster name (the map lives under /blocklab/<cluster>).
    #[arg(long, default_value = "default")]
    pub cluster: String,
    /// ZooKeeper session timeout, e.g. 6s.
    #[arg(long, value_name = "DURATION", value_parser = parse_positive_duration, default_value = "6s")]
    pub session_timeout: Duration,
    /// How long to retry an unreachable ZooKeeper before giving up, e.g. 10s.
    #[arg(long, value_name = "DURATION", value_parser = parse_positive_duration, default_value = "10s")]
    pub connect_timeout: Duration,
}

impl MapArgs {
    fn connect(&self) -> anyhow::Result<Box<dyn Coord>> {
        if let CoordSpec::Embedded(p) = &self.coord {
            if let Some(d) = p.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
            }
        }
        coord::connect(
            &self.coord,
            &ConnectOptions {
                session_timeout: self.session_timeout,
                connect_deadline: self.connect_timeout,
            },
        )
        .with_context(|| format!("connecting to {}", self.coord))
    }

    /// Connects and runs `f` on the cluster's map (the connection ends after it).
    fn edit<T>(&self, f: impl FnOnce(&LunMap<'_>) -> anyhow::Result<T>) -> anyhow::Result<T> {
        let c = self.connect()?;
        f(&LunMap::open(&*c, &self.cluster)?)
    }
}

/// `blocklab gateway`.
#[derive(Debug, Args)]
pub struct GatewayArgs {
    /// The map's backend (`zk://...`: gateways and editors are separate processes, so the
    /// embedded store is refused), cluster and session settings.
    #[command(flatten)]
    pub map: MapArgs,
    /// This gateway's node name (its ephemeral node is /blocklab/<cluster>/gateways/<node>).
    #[arg(long)]
    pub node: String,
    /// Address to serve block I/O on (port 0: any free port; the address is printed).
    #[arg(long, default_value = "127.0.0.1:0")]
    pub listen: SocketAddr,
    /// Baseline mode: follow the map file copied into this directory instead of --coord.
    #[arg(long)]
    pub filesync_dir: Option<PathBuf>,
    /// Baseline mode: directory of heartbeat files shared by all gateways.
    #[arg(long, requires = "filesync_dir")]
    pub heartbeat_dir: Option<PathBuf>,
    /// Baseline mode: heartbeat advert interval, e.g. 1s (keepalived's default).
    #[arg(long, value_name = "DURATION", value_parser = parse_positive_duration, default_value = "1s")]
    pub advert_interval: Duration,
    /// Baseline mode: how often the copied map file is polled, e.g. 100ms.
    #[arg(long, value_name = "DURATION", value_parser = parse_positive_duration, default_value = "100ms")]
    pub poll_interval: Duration,
    /// Confirm each refusal with the coordination backend (sync + read) before returning
    /// it, so a mapping acknowledged but not yet delivered by the watch is served.
    #[arg(long, conflicts_with = "filesync_dir")]
    pub confirm_refusals: bool,
    /// Print every applied change on stdout with its CLOCK_MONOTONIC time
    /// (`mapped LUN TARGET INITIATOR NS`, `gateway-down NODE NS`, ...).
    #[arg(long)]
    pub events: bool,
}

fn printer(events: bool) -> OnChange {
    Box::new(move |c: &Change, ns: u64| {
        if !events {
            return;
        }
        let line = match c {
            Change::Mapped {
                lun,
                target,
                initiator,
            } => format!("mapped {lun} {target} {initiator} {ns}"),
            Change::Unmapped {
                lun,
                target,
                initiator,
            } => format!("unmapped {lun} {target} {initiator} {ns}"),
            Change::LunUpdated { lun } => format!("lun {lun} {ns}"),
            Change::LunRemoved { lun } => format!("lun-removed {lun} {ns}"),
            Change::GatewayUp { node } => format!("gateway-up {node} {ns}"),
            Change::GatewayDown { node } => format!("gateway-down {node} {ns}"),
            Change::Corrupt { path, reason } => format!("corrupt {path} {ns} {reason}"),
        };
        println!("{line}");
    })
}

/// The printer of `--events`, and a warning on stderr for every corrupt LUN node (whether
/// or not events are printed: such a LUN is not served).
fn reporter(events: bool) -> OnChange {
    let mut print = printer(events);
    Box::new(move |c: &Change, ns: u64| {
        if let Change::Corrupt { path, reason } = c {
            eprintln!("warning: map node {path} does not decode ({reason}); its LUN is not served until it is fixed");
        }
        print(c, ns);
    })
}

/// Waits for Ctrl-C / SIGTERM (`stop`) or for a follower to end; the follower's error if it
/// ended.
fn run_until_stopped(stop: &AtomicBool, followers: Vec<Follower>) -> anyhow::Result<()> {
    while !stop.load(Ordering::SeqCst) {
        if followers.iter().any(|f| f.finished()) {
            for f in followers {
                f.stop().context("following the map")?;
            }
            bail!("the map follower stopped");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    for f in followers {
        f.stop().context("following the map")?;
    }
    Ok(())
}

fn stop_flag() -> anyhow::Result<Arc<AtomicBool>> {
    let stop = Arc::new(AtomicBool::new(false));
    let s = Arc::clone(&stop);
    ctrlc::set_handler(move || s.store(true, Ordering::SeqCst))
        .context("installing the signal handler")?;
    Ok(stop)
}

pub fn run_gateway(a: GatewayArgs) -> anyhow::Result<()> {
    check_gateway_args(&a)?;
    let layout = Layout::new(&a.map.cluster)?;
    let view = Arc::new(RwLock::new(MapView::new(layout.clone())));
    let stop = stop_flag()?;
    let (follower, coord_handle) = follow_map(&a, &layout, &view)?;
    let mut followers = vec![follower];
    let server = start_gateway_server(&a, &view, coord_handle.as_ref())?;
    followers.extend(heartbeats(&a, &view)?);
    println!("ready {}", server.addr());
    eprintln!(
        "gateway {} serving on {} ({})",
        a.node,
        server.addr(),
        coord_handle
            .as_ref()
            .map_or_else(|| "filesync baseline".to_string(), |c| c.describe())
    );
    let ended = run_until_stopped(&stop, followers);
    eprintln!("gateway {} stopping: {}", a.node, server.stats());
    drop(server);
    if let Some(c) = coord_handle {
        c.close();
    }
    ended
}

/// Errs on a bad node name, or on a map backend other processes cannot reach (outside
/// the filesync baseline).
fn check_gateway_args(a: &GatewayArgs) -> anyhow::Result<()> {
    validate_simple_name("node name", &a.node)?;
    if a.filesync_dir.is_none() {
        shared_coord(
            "a gateway follows a map that editors (other processes) change",
            a.map.coord.clone(),
        )
        .map_err(anyhow::Error::msg)?;
    }
    Ok(())
}

/// Starts following the map into `view`: the copied map file (filesync baseline) or the
/// coordination backend, whose connection is returned.
fn follow_map(
    a: &GatewayArgs,
    layout: &Layout,
    view: &Arc<RwLock<MapView>>,
) -> anyhow::Result<(Follower, Option<Arc<dyn Coord>>)> {
    match &a.filesync_dir {
        Some(dir) => {
            let f = filesync::follow_file(
                dir.clone(),
                Arc::clone(view),
                reporter(a.events),
                a.poll_interval,
            );
            Ok((f, None))
        }
        None => {
            let c: Arc<dyn Coord> = Arc::from(a.map.connect()?);
            let f = follow_coord(
                Arc::clone(&c),
                layout.clone(),
                Arc::clone(view),
                reporter(a.events),
            )
            .context("following the map")?;
            Ok((f, Some(c)))
        }
    }
}

/// Starts serving block I/O decided on `view` and registers the gateway on the
/// coordination backend (when there is one).
fn start_gateway_server(
    a: &GatewayArgs,
    view: &Arc<RwLock<MapView>>,
    coord_handle: Option<&Arc<dyn Coord>>,
) -> anyhow::Result<GatewayServer> {
    let server = match (coord_handle, a.confirm_refusals) {
        (Some(c), true) => {
            GatewayServer::start_confirming(a.listen, Arc::clone(view), Arc::clone(c))
        }
        _ => GatewayServer::start(a.listen, Arc::clone(view)),
    }
    .with_context(|| format!("listening on {}", a.listen))?;
    let info = GatewayInfo {
        node: a.node.clone(),
        addr: server.addr().to_string(),
        pid: std::process::id(),
    };
    if let Some(c) = coord_handle {
        LunMap::open(&**c, &a.map.cluster)?
            .register_gateway(&info)
            .with_context(|| format!("registering gateway {}", a.node))?;
    }
    Ok(server)
}

/// Filesync baseline with a heartbeat directory: this gateway's heartbeat, and the
/// follower of everyone's (none otherwise).
fn heartbeats(a: &GatewayArgs, view: &Arc<RwLock<MapView>>) -> anyhow::Result<Vec<Follower>> {
    let mut followers = Vec::new();
    if let (Some(_), Some(hb)) = (&a.filesync_dir, &a.heartbeat_dir) {
        std::fs::create_dir_all(hb).with_context(|| format!("creating {}", hb.display()))?;
        let advert = a.advert_interval;
        followers.push(filesync::start_heartbeat(
            hb.clone(),
            a.node.clone(),
            advert,
        ));
        followers.push(filesync::follow_heartbeats(
            hb.clone(),
            Arc::clone(view),
            printer(a.events),
            advert,
        ));
    }
    Ok(followers)
}

#[derive(Debug, Subcommand)]
pub enum LunmapCmd {
    /// Create a LUN backed by a byte range of a device.
    CreateLun {
        #[command(flatten)]
        map: MapArgs,
        /// LUN name: 1-64 of [a-z0-9._-].
        name: String,
        /// LUN number, unique in the cluster (no default: a second LUN with the same
        /// number is refused).
        #[arg(long)]
        id: u32,
        /// Size in bytes (K/M/G suffixes), a multiple of 4096.
        #[arg(long, value_parser = parse_size)]
        size: u64,
        /// Backing block device (or file).
        #[arg(long)]
        device: String,
        /// Byte offset of the LUN on the device, a multiple of 4096.
        #[arg(long, value_parser = parse_offset, default_value = "0")]
        offset: u64,
    },
    /// Delete a LUN; refused while initiators are mapped unless --force.
    DeleteLun {
        #[command(flatten)]
        map: MapArgs,
        name: String,
        /// Delete even though initiators are still mapped.
        #[arg(long)]
        force: bool,
    },
    /// Allow an initiator to reach a LUN through a target (atomic).
    Map {
        #[command(flatten)]
        mapping: MappingArgs,
        /// Portal of the target: a new target is created under the LUN with it (default
        /// 0.0.0.0:3260); an existing target must have it (a target's portal is fixed at
        /// creation).
        #[arg(long)]
        portal: Option<String>,
    },
    /// Remove an initiator's mapping (atomic).
    Unmap {
        #[command(flatten)]
        mapping: MappingArgs,
    },
    /// Print the whole map (JSON).
    List {
        #[command(flatten)]
        map: MapArgs,
    },
    /// Which LUNs (through which targets) an initiator may reach.
    Query {
        #[command(flatten)]
        map: MapArgs,
        #[arg(long)]
        initiator: String,
    },
    /// Live gateways.
    Gateways {
        #[command(flatten)]
        map: MapArgs,
    },
    /// Follow the map: print the whole map's contents as changes, then every change as it
    /// happens (`mapped LUN TARGET INITIATOR NS`, `gateway-down NODE NS`, ...) until Ctrl-C.
    Watch {
        #[command(flatten)]
        map: MapArgs,
    },
    /// Read (or write a repeated byte) through a gateway, as an initiator.
    Io(IoArgs),
}

// The map, a LUN, a target and an initiator: what `lunmap map` and `lunmap unmap` name.
#[derive(Debug, Args)]
pub struct MappingArgs {
    #[command(flatten)]
    map: MapArgs,
    lun: String,
    /// Target IQN.
    #[arg(long)]
    target: String,
    /// Initiator IQN.
    #[arg(long)]
    initiator: String,
}

// `lunmap io`.
#[derive(Debug, Args)]
pub struct IoArgs {
    /// Gateway address (printed by `blocklab gateway`).
    #[arg(long)]
    gateway: SocketAddr,
    #[arg(long)]
    lun: String,
    #[arg(long)]
    target: String,
    #[arg(long)]
    initiator: String,
    #[arg(long, value_parser = parse_offset, default_value = "0")]
    offset: u64,
    #[arg(long, value_parser = parse_size, default_value = "4096")]
    len: u64,
    /// Write this byte value instead of reading.
    #[arg(long)]
    write_byte: Option<u8>,
}

pub fn run(cmd: LunmapCmd) -> anyhow::Result<()> {
    match cmd {
        LunmapCmd::CreateLun {
            map,
            name,
            id,
            size,
            device,
            offset,
        } => map.edit(|m| {
            let lun = m.create_lun(id, &name, size, Backing::Range { device, offset })?;
            println!("{}", serde_json::to_string(&lun)?);
            Ok(())
        }),
        LunmapCmd::DeleteLun { map, name, force } => map.edit(|m| {
            m.delete_lun(&name, force)?;
            println!("deleted LUN {name}");
            Ok(())
        }),
        LunmapCmd::Map { mapping: a, portal } => a.map.edit(|m| {
            let ack = m.map_via(&a.lun, &a.target, portal.as_deref(), &a.initiator)?;
            println!(
                "mapped {} to {} via {}{}",
                a.initiator,
                a.lun,
                a.target,
                if ack.changed { "" } else { " (already mapped)" }
            );
            Ok(())
        }),
        LunmapCmd::Unmap { mapping: a } => a.map.edit(|m| {
            m.unmap(&a.lun, &a.target, &a.initiator)?;
            println!("unmapped {} from {} via {}", a.initiator, a.lun, a.target);
            Ok(())
        }),
        LunmapCmd::List { map } => map.edit(list),
        LunmapCmd::Query { map, initiator } => map.edit(|m| {
            for (l, t) in m.query_initiator(&initiator)? {
                println!("{l}\t{t}");
            }
            Ok(())
        }),
        LunmapCmd::Gateways { map } => map.edit(|m| {
            for (n, info) in m.gateways()? {
                match info {
                    Some(i) => println!("{n}\t{}\tpid {}", i.addr, i.pid),
                    None => println!("{n}"),
                }
            }
            Ok(())
        }),
        LunmapCmd::Watch { map } => watch(&map),
        LunmapCmd::Io(a) => gateway_io(a),
    }
}

/// `lunmap list`: the whole map as JSON, with a warning for each LUN left out.
fn list(m: &LunMap<'_>) -> anyhow::Result<()> {
    let v = m.load()?;
    for (name, st) in &v.luns {
        if let Err(reason) = &st.lun {
            eprintln!(
                "warning: LUN {name}: node {} does not decode ({reason}); left out",
                v.layout.lun(name)
            );
        }
    }
    println!("{}", serde_json::to_string_pretty(&v.to_doc())?);
    Ok(())
}

/// `lunmap watch`: prints the map's changes until Ctrl-C.
fn watch(map: &MapArgs) -> anyhow::Result<()> {
    shared_coord(
        "watch follows changes that other processes make",
        map.coord.clone(),
    )
    .map_err(anyhow::Error::msg)?;
    let layout = Layout::new(&map.cluster)?;
    let stop = stop_flag()?;
    let c: Arc<dyn Coord> = Arc::from(map.connect()?);
    let view = Arc::new(RwLock::new(MapView::new(layout.clone())));
    let f =
        follow_coord(Arc::clone(&c), layout, view, reporter(true)).context("following the map")?;
    let ended = run_until_stopped(&stop, vec![f]);
    c.close();
    ended
}

/// `lunmap io`: one read (or write) through a gateway.
fn gateway_io(a: IoArgs) -> anyhow::Result<()> {
    let IoArgs {
        gateway,
        lun,
        target,
        initiator,
        offset,
        len,
        write_byte,
    } = a;
    let mut cl = GatewayClient::connect(gateway)
        .with_context(|| format!("connecting to gateway {gateway}"))?;
    let reply = match write_byte {
        Some(b) => cl.write(&lun, &target, &initiator, offset, &vec![b; len as usize])?,
        None => {
            let (r, data) = cl.read(&lun, &target, &initiator, offset, len)?;
            if r.ok {
                let nz = data.iter().filter(|&&x| x != 0).count();
                println!(
                    "read {} bytes ({nz} non-zero), first byte {:#04x}",
                    data.len(),
                    data.first().copied().unwrap_or(0)
                );
            }
            r
        }
    };
    if !reply.ok {
        bail!("{}", reply.error);
    }
    println!("ok");
    Ok(())
}
