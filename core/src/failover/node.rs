//! A storage node's management service and task dispatcher (`blocklab mgmt serve`).
//!
//! One thread runs the [`Dispatcher`]: every heartbeat period it probes the node's own
//! block-service connection (a `Ping`), ticks, and sends its heartbeat to the peers over
//! UDP; in between it receives the peers' heartbeats. `Acquire` announces the epoch to the
//! block service (`Claim`) and takes the VIP through the [`VipBackend`]; `Release` drops it.
//!
//! While holding, the shared server ([`crate::jsonl::server`]) accepts clients on
//! `VIP:port`: each request is looked up
//! in the node's cache of delivered results (answered from it only if the cached operation
//! has the same arguments), else submitted to the block service with the holder's epoch;
//! the service's `Accepted` keepalives are forwarded to the client while the operation
//! runs, and the result when it comes back. Results the service delivers to the VIP (their
//! submitter died or was superseded) are cached and acknowledged. `List` is forwarded.
//!
//! In the `client_retry` baseline there is no VIP: each node listens on its own address and
//! submits session-bound (the service drops the work if this node dies).
//!
//! Events (VIP acquired/released) go to stdout as lines `event=vip_acquired node=N
//! epoch=C.N unix_us=T`, which the experiment reads.

use std::collections::HashMap;
use std::io::Write;
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use super::dispatcher::{Action, Dispatcher, Epoch, Heartbeat, Input, NodeId, Timing};
use super::service::CONN_IDLE_TIMEOUT;
use super::vip::{VipBackend, VipError};
use super::wire::{Conn, Msg, Op, OpResult, WireError};
use crate::jsonl::server::{self, Server};

crate::names::named_enum! {
    /// How management requests survive a node failure.
    pub enum Mode("mode") {
        /// The VIP moves to a healthy node; results are delivered through it.
        #[strum(to_string = "vip_handoff", serialize = "vip-handoff")]
        VipHandoff,
        /// The baseline: no VIP; a node's death abandons its work; the client re-issues.
        #[strum(to_string = "client_retry", serialize = "client-retry")]
        ClientRetry,
    }
}

impl Mode {
    pub const ALL: [Mode; 2] = [Mode::VipHandoff, Mode::ClientRetry];
}

/// Settings of one node.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    pub id: NodeId,
    /// Every node's heartbeat (UDP) address, this node's included.
    pub peers: Vec<(NodeId, SocketAddr)>,
    pub service: SocketAddr,
    pub vip: VipBackend,
    /// The management port (on the VIP; on `listen` in `client_retry`).
    pub port: u16,
    /// This node's own address for `client_retry` requests.
    pub listen: SocketAddr,
    pub mode: Mode,
    pub heartbeat: Duration,
    pub timing: Timing,
}

/// Errors of a node.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("node {0} is not in the peer list")]
    NotInPeers(NodeId),
    #[error("binding {addr}: {cause}")]
    Bind {
        addr: SocketAddr,
        cause: std::io::Error,
    },
    #[error("serving {addr}")]
    Serve {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Vip(#[from] VipError),
}

/// Microseconds since the Unix epoch (the clock of the event lines).
pub fn unix_us() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros())
        .unwrap_or(0)
}

fn event(line: &str) {
    let mut o = std::io::stdout().lock();
    let _ = writeln!(o, "{line} unix_us={}", unix_us());
    let _ = o.flush();
}

/// Results delivered to the VIP, by operation id, with the operation they belong to.
type Cache = Arc<Mutex<HashMap<String, (Op, OpResult)>>>;

/// The management port while this node holds the VIP.
struct Holding {
    server: Server<TcpListener>,
}

/// Runs the node until `stop` is set.
pub fn run_node(cfg: NodeConfig, stop: Arc<AtomicBool>) -> Result<(), NodeError> {
    let me = cfg
        .peers
        .iter()
        .find(|(id, _)| *id == cfg.id)
        .map(|(_, a)| *a)
        .ok_or(NodeError::NotInPeers(cfg.id))?;
    let cache: Cache = Arc::new(Mutex::new(HashMap::new()));
    let epoch = Arc::new(Mutex::new(Epoch::ZERO));

    if cfg.mode == Mode::ClientRetry {
        let l = TcpListener::bind(cfg.listen).map_err(|source| NodeError::Bind {
            addr: cfg.listen,
            cause: source,
        })?;
        event(&format!(
            "event=listening node={} addr={}",
            cfg.id, cfg.listen
        ));
        let server = serve(l, &cfg, cache, epoch).map_err(|source| NodeError::Serve {
            addr: cfg.listen,
            source,
        })?;
        // The node still pings its block service every period (its liveness there).
        let mut probe: Option<Conn> = None;
        while !stop.load(Ordering::Relaxed) {
            let t = Instant::now();
            probe_service(&mut probe, cfg.service, cfg.id, cfg.heartbeat);
            thread::sleep(cfg.heartbeat.saturating_sub(t.elapsed()));
        }
        server.stop_in_background();
        return Ok(());
    }

    cfg.vip.clean();
    let udp = UdpSocket::bind(me).map_err(|source| NodeError::Bind {
        addr: me,
        cause: source,
    })?;
    let ids: Vec<NodeId> = cfg.peers.iter().map(|(id, _)| *id).collect();
    let mut d = Dispatcher::new(cfg.id, &ids, cfg.timing);
    let mut probe: Option<Conn> = None;
    let mut holding: Option<Holding> = None;
    let mut next_tick = Instant::now();
    let mut buf = vec![0u8; 4096];
    event(&format!("event=started node={}", cfg.id));
    while !stop.load(Ordering::Relaxed) {
        let now = Instant::now();
        if now < next_tick {
            let _ = udp.set_read_timeout(Some(next_tick - now));
            if let Ok((n, _)) = udp.recv_from(&mut buf) {
                if let Ok(hb) = serde_json::from_slice::<Heartbeat>(&buf[..n]) {
                    let acts = d.step(Input::Heartbeat(hb));
                    apply(&acts, &cfg, &udp, &mut d, &mut holding, &cache, &epoch);
                }
            }
            continue;
        }
        next_tick += cfg.heartbeat;
        if next_tick < Instant::now() {
            next_tick = Instant::now() + cfg.heartbeat;
        }
        let ok = probe_service(&mut probe, cfg.service, cfg.id, cfg.heartbeat);
        d.step(Input::Probe { ok });
        let acts = d.step(Input::Tick);
        apply(&acts, &cfg, &udp, &mut d, &mut holding, &cache, &epoch);
    }
    if let Some(h) = holding.take() {
        h.server.stop_in_background();
        cfg.vip.release();
    }
    Ok(())
}

fn probe_service(probe: &mut Option<Conn>, service: SocketAddr, id: NodeId, t: Duration) -> bool {
    let t = t.max(Duration::from_millis(20));
    if probe.is_none() {
        *probe = TcpStream::connect_timeout(&service, t).ok().and_then(|s| {
            s.set_read_timeout(Some(t)).ok()?;
            Conn::new(s).ok()
        });
    }
    let ok = match probe.as_mut() {
        Some(c) => c.send(&Msg::Ping { node: id }).is_ok() && matches!(c.recv(), Ok(Msg::Pong)),
        None => false,
    };
    if !ok {
        *probe = None;
    }
    ok
}

/// Announces `epoch` to the block service. `Err(Some(current))`: fenced by the service's
/// newer epoch; `Err(None)`: the service could not be asked or refused otherwise.
fn claim(service: SocketAddr, epoch: Epoch, node: NodeId) -> Result<(), Option<Epoch>> {
    let attempt = || -> Result<Msg, WireError> {
        let s = TcpStream::connect_timeout(&service, Duration::from_millis(500))?;
        s.set_read_timeout(Some(Duration::from_secs(2)))?;
        let mut c = Conn::new(s)?;
        c.send(&Msg::Claim { epoch, node })?;
        c.recv()
    };
    match attempt() {
        Ok(Msg::Ack { .. }) => Ok(()),
        Ok(Msg::Fenced { current, .. }) => Err(Some(current)),
        _ => Err(None),
    }
}

#[allow(clippy::too_many_arguments)]
fn apply(
    acts: &[Action],
    cfg: &NodeConfig,
    udp: &UdpSocket,
    d: &mut Dispatcher,
    holding: &mut Option<Holding>,
    cache: &Cache,
    epoch: &Arc<Mutex<Epoch>>,
) {
    for a in acts {
        match a {
            Action::Broadcast => {
                // Built now, after the actions before it (a failed Acquire is not announced).
                if let Ok(bytes) = serde_json::to_vec(&d.heartbeat()) {
                    for (id, addr) in &cfg.peers {
                        if *id != cfg.id {
                            let _ = udp.send_to(&bytes, addr);
                        }
                    }
                }
            }
            Action::Acquire(e) => {
                if let Err(seen) = claim(cfg.service, *e, cfg.id) {
                    event(&format!(
                        "event=vip_claim_fenced node={} epoch={}.{}",
                        cfg.id, e.counter, e.node
                    ));
                    d.acquire_failed(seen);
                    continue;
                }
                let served = match cfg.vip.acquire(cfg.port) {
                    Ok(l) => serve(l, cfg, cache.clone(), epoch.clone()).map_err(|e| {
                        cfg.vip.release();
                        format!("serving the management port: {e}")
                    }),
                    Err(e) => Err(e.to_string()),
                };
                match served {
                    Ok(server) => {
                        *epoch.lock().unwrap_or_else(|p| p.into_inner()) = *e;
                        event(&format!(
                            "event=vip_acquired node={} epoch={}.{}",
                            cfg.id, e.counter, e.node
                        ));
                        *holding = Some(Holding { server });
                    }
                    Err(err) => {
                        event(&format!(
                            "event=vip_acquire_failed node={} error={err:?}",
                            cfg.id
                        ));
                        d.acquire_failed(None);
                    }
                }
            }
            Action::Release => {
                // The port closes now; requests in progress finish on their own.
                if let Some(h) = holding.take() {
                    h.server.stop_in_background();
                }
                cfg.vip.release();
                event(&format!("event=vip_released node={}", cfg.id));
            }
        }
    }
}

/// Serves clients (and deliveries) on `l` until the server is stopped.
fn serve(
    l: TcpListener,
    cfg: &NodeConfig,
    cache: Cache,
    epoch: Arc<Mutex<Epoch>>,
) -> std::io::Result<Server<TcpListener>> {
    let cfg = cfg.clone();
    Server::serve(l, "mgmt", move |accepted| {
        let _ = handle_client(accepted, &cfg, &cache, &epoch);
    })
}

fn handle_client(
    accepted: server::Conn<TcpStream>,
    cfg: &NodeConfig,
    cache: &Cache,
    epoch: &Mutex<Epoch>,
) -> Result<(), WireError> {
    let s = accepted.try_clone()?;
    s.set_read_timeout(Some(CONN_IDLE_TIMEOUT))?;
    let mut conn = Conn::new(s)?;
    while let Some(m) = conn.recv_or_refuse()? {
        match m {
            Msg::Deliver { op_id, op, result } => {
                cache
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(op_id.clone(), (op, result));
                conn.send(&Msg::Ack { op_id })?;
            }
            Msg::Request { op_id, op, tag } => {
                if accepted.stopping() {
                    return Ok(());
                }
                let cached = cache
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .get(&op_id)
                    .cloned();
                let result = match cached {
                    Some((first, r)) if first == op => r,
                    Some((first, _)) => OpResult::error(format!(
                        "operation id {op_id:?} was already used with different arguments ({first:?})"
                    )),
                    None => {
                        let e = *epoch.lock().unwrap_or_else(|p| p.into_inner());
                        match submit(cfg, &mut conn, &op_id, op, tag, e)? {
                            Some(r) => r,
                            // Fenced, the service went away, or the client did: not
                            // authoritative; the client resends (to whoever holds the VIP).
                            None => return Ok(()),
                        }
                    }
                };
                conn.send(&Msg::Reply { op_id, result })?;
            }
            Msg::List => match list(cfg) {
                Ok(volumes) => conn.send(&Msg::Listed { volumes })?,
                Err(e) => conn.send(&Msg::refusal("", format!("listing volumes: {e}")))?,
            },
            other => conn.send(&other.unexpected())?,
        }
    }
    Ok(())
}

fn service_conn(cfg: &NodeConfig) -> Result<Conn, WireError> {
    let s = TcpStream::connect_timeout(&cfg.service, Duration::from_secs(2))?;
    s.set_read_timeout(Some(CONN_IDLE_TIMEOUT))?;
    Ok(Conn::new(s)?)
}

fn list(cfg: &NodeConfig) -> Result<Vec<super::wire::VolumeInfo>, WireError> {
    let mut c = service_conn(cfg)?;
    c.send(&Msg::List)?;
    match c.recv()? {
        Msg::Listed { volumes } => Ok(volumes),
        other => Err(WireError::Malformed(format!(
            "expected listed, got {other:?}"
        ))),
    }
}

/// Submits to the block service and waits for the result, forwarding the service's
/// `Accepted` keepalives to the client; `None` if fenced or either side went away.
fn submit(
    cfg: &NodeConfig,
    client: &mut Conn,
    op_id: &str,
    op: Op,
    tag: Option<String>,
    epoch: Epoch,
) -> Result<Option<OpResult>, WireError> {
    let mut c = service_conn(cfg)?;
    c.send(&Msg::Submit {
        op_id: op_id.to_string(),
        op,
        epoch,
        node: cfg.id,
        session_bound: cfg.mode == Mode::ClientRetry,
        tag,
    })?;
    loop {
        match c.recv() {
            Ok(m @ Msg::Accepted { .. }) => {
                if client.send(&m).is_err() {
                    // The client is gone; dropping the service connection tells the
                    // service (it delivers the result to the VIP when it is done).
                    return Ok(None);
                }
            }
            Ok(Msg::Reply { result, .. }) => return Ok(Some(result)),
            Ok(Msg::Fenced { .. }) | Err(_) => return Ok(None),
            Ok(_) => continue,
        }
    }
}
