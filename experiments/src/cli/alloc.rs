//! `blocklab alloc ...`: node processes of the shared-memory allocator, and the worker
//! process exp-alloc and the multi-process tests drive (hidden `alloc worker`).
//!
//! The worker speaks JSON lines: on stdout `{"event":"ready",...}` once it is leader or
//! registered, then `{"event":"done",...}` after its run; on stdin it waits for a `go`
//! line before running and for end of input before exiting (so a leader outlives its
//! followers' runs). `go stop-in-flight-after=SECS` makes it stop after SECS with a block
//! allocated and written but not committed, say `{"event":"in_flight",...}` and wait to
//! be killed (crash tests and exp-alloc's crash runs).

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use blocklab::alloc::attached::Attached;
use blocklab::alloc::node::{self, NodeConfig, NodeProcess};
use blocklab::alloc::segs::MAX_DEVICES;
use blocklab::alloc::wire::{DeviceAdded, Done, NodeRequest};
use blocklab::alloc::{AllocError, BlockAllocator, BlockRef, ByteRange, DeviceSpec, Strategy};
use blocklab::dev::{AlignedBuf, Device, IoEngine, UringEngine};
use clap::{Args, Subcommand};
use serde::{Deserialize, Serialize};

use crate::args::{format_duration, parse_duration, parse_size};

/// One allocation in this many is timed for the latency histogram.
const LATENCY_SAMPLE: u64 = 8;

/// Parses a device: `PATH` (its blocks go into the data region of a formatted daemon
/// device, else after the first MiB) or `OFFSET:LEN:PATH` (an explicit region, sizes with
/// K/M/G suffixes, checked against the same rule when the device comes online).
pub fn parse_device(s: &str) -> Result<DeviceSpec, String> {
    if s.is_empty() {
        return Err("empty device".into());
    }
    let mut it = s.splitn(3, ':');
    if let (Some(o), Some(l), Some(p)) = (it.next(), it.next(), it.next()) {
        if let (Ok(offset), Ok(len)) = (parse_size(o), parse_size(l)) {
            if p.is_empty() {
                return Err(format!("device {s:?}: no path after OFFSET:LEN:"));
            }
            return Ok(DeviceSpec {
                path: PathBuf::from(p),
                range: Some(ByteRange { offset, len }),
            });
        }
    }
    Ok(DeviceSpec::path(s))
}

#[derive(Debug, Subcommand)]
pub enum AllocCmd {
    /// One node process of an allocation run, driven over stdin/stdout (internal: used by
    /// exp-alloc and the tests).
    #[command(hide = true)]
    Worker(WorkerArgs),
    /// Take the robust lock of a device segment and hold it until killed (internal: tests
    /// of a lock holder that dies).
    #[command(hide = true)]
    HoldLock {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long, default_value_t = 0)]
        dev: u16,
    },
    /// Ask the node's leader to take a device offline.
    DeviceOffline {
        /// The node's internal port.
        #[arg(long)]
        internal_port: u16,
        /// Device index on the node.
        #[arg(long)]
        dev: u16,
    },
    /// Ask the node's leader to bring a device online (PATH or OFFSET:LEN:PATH); prints
    /// its index.
    DeviceOnline {
        #[arg(long)]
        internal_port: u16,
        #[arg(long, value_parser = parse_device)]
        device: DeviceSpec,
    },
    /// Run a node process: elect/register, scan devices, serve store requests on an
    /// external port registered with the index server. Prints `ready ENDPOINT ROLE`.
    Node(NodeServeArgs),
    /// Audit a node: every block of every device free, in use and recorded, or leaked.
    Audit {
        /// Node directory.
        #[arg(long)]
        dir: PathBuf,
    },
}

/// Arguments of a node process.
#[derive(Debug, Clone, Args)]
pub struct NodeArgs {
    /// Node directory for the shared-memory segments (normally under /dev/shm).
    #[arg(long)]
    pub dir: PathBuf,
    /// This process's id on the node (1..65535, stable across restarts).
    #[arg(long)]
    pub proc_id: u16,
    /// The node's internal port; the process that binds it is leader.
    #[arg(long)]
    pub internal_port: u16,
    /// shm (lock-free shared memory), mutex (robust-mutex free list) or central (leader over a Unix socket).
    #[arg(long, default_value = "shm")]
    pub strategy: Strategy,
    /// Block size (multiple of 4 KiB).
    #[arg(long, default_value = "64K", value_parser = parse_size)]
    pub block_size: u64,
    /// A device blocks are carved from: PATH (the data region of a formatted daemon
    /// device, else everything after the first MiB) or OFFSET:LEN:PATH (an explicit
    /// region inside that); several comma-separated.
    #[arg(long, value_parser = parse_device, value_delimiter = ',', required = true)]
    pub devices: Vec<DeviceSpec>,
    /// Entries of the unfilled-block table.
    #[arg(long, default_value_t = 256)]
    pub unfilled_capacity: usize,
}

impl NodeArgs {
    pub fn config(&self) -> NodeConfig {
        NodeConfig {
            dir: self.dir.clone(),
            internal_port: self.internal_port,
            proc_id: self.proc_id,
            strategy: self.strategy,
            block_size: self.block_size,
            devices: self.devices.clone(),
            unfilled_capacity: self.unfilled_capacity,
        }
    }
}

#[derive(Debug, Clone, Args)]
pub struct NodeServeArgs {
    #[command(flatten)]
    pub node: NodeArgs,
    /// Name of the storage node (processes of one node share it).
    #[arg(long)]
    pub node_name: String,
    /// The index server, HOST:PORT.
    #[arg(long)]
    pub index: String,
    /// External address to serve store requests on.
    #[arg(long, default_value = "127.0.0.1:0")]
    pub listen: String,
}

/// `blocklab index ...`: the index server and its client.
#[derive(Debug, Subcommand)]
pub enum IndexCmd {
    /// Serve the index (channel -> node/device/block; node -> process endpoints). Prints
    /// `listening HOST:PORT`.
    Serve {
        #[arg(long, default_value = "127.0.0.1:7400")]
        listen: String,
    },
    /// Store a file's contents as one piece of a channel (at most one block).
    Store {
        #[arg(long)]
        index: String,
        #[arg(long)]
        channel: u64,
        #[arg(long)]
        file: PathBuf,
    },
    /// Print where a channel's pieces are and write their contents to --out (concatenated).
    Fetch {
        #[arg(long)]
        index: String,
        #[arg(long)]
        channel: u64,
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Tell a node (through one of its processes) that a device came online (PATH or
    /// OFFSET:LEN:PATH).
    DeviceOnline {
        #[arg(long)]
        index: String,
        #[arg(long)]
        node: String,
        #[arg(long, value_parser = parse_device)]
        device: DeviceSpec,
    },
}

pub fn run_index(cmd: IndexCmd) -> anyhow::Result<()> {
    use blocklab::alloc::index::IndexServer;
    use blocklab::alloc::store;
    use blocklab::alloc::wire::{self, IndexRequest};
    match cmd {
        IndexCmd::Serve { listen } => {
            let s = IndexServer::start(&listen)
                .with_context(|| format!("serving the index on {listen}"))?;
            println!("listening {}", s.addr);
            std::io::stdout().flush()?;
            loop {
                std::thread::park();
            }
        }
        IndexCmd::Store {
            index,
            channel,
            file,
        } => {
            let data =
                std::fs::read(&file).with_context(|| format!("reading {}", file.display()))?;
            let loc = store::client_store(&index, channel, &data)
                .with_context(|| format!("storing channel {channel}"))?;
            println!("{}", serde_json::to_string(&loc)?);
            Ok(())
        }
        IndexCmd::Fetch {
            index,
            channel,
            out,
        } => {
            let pieces = store::client_fetch(&index, channel)
                .with_context(|| format!("fetching channel {channel}"))?;
            let all: Vec<u8> = pieces.concat();
            eprintln!(
                "channel {channel}: {} pieces, {} bytes",
                pieces.len(),
                all.len()
            );
            if let Some(o) = out {
                std::fs::write(&o, &all).with_context(|| format!("writing {}", o.display()))?;
            }
            Ok(())
        }
        IndexCmd::DeviceOnline {
            index,
            node,
            device,
        } => {
            let req = IndexRequest::DeviceOnline {
                node: node.clone(),
                device,
            };
            let rep = match wire::call::<_, DeviceAdded>(&index, &req)? {
                wire::Reply::Ok(rep) => rep,
                wire::Reply::Refused(r) => bail!("node {node}: {}", r.error),
            };
            println!("device {} online on {node}", rep.dev);
            Ok(())
        }
    }
}

fn node_serve(a: NodeServeArgs) -> anyhow::Result<()> {
    use blocklab::alloc::store::StoreService;
    let cfg = a.node.config();
    let p =
        std::sync::Arc::new(NodeProcess::start(cfg.clone()).context("starting the node process")?);
    p.scan(&cfg.devices).context("scanning devices")?;
    let l =
        std::net::TcpListener::bind(&a.listen).with_context(|| format!("binding {}", a.listen))?;
    let svc = std::sync::Arc::new(StoreService::new(p.clone(), &a.node_name, &a.index)?);
    let ep = svc.serve(l).context("registering with the index server")?;
    println!(
        "ready {ep} {}",
        if p.is_leader() { "leader" } else { "follower" }
    );
    std::io::stdout().flush()?;
    loop {
        std::thread::park();
    }
}

#[derive(Debug, Clone, Args)]
pub struct WorkerArgs {
    #[command(flatten)]
    pub node: NodeArgs,
    /// How long to run after `go`, e.g. 800ms.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration, default_value = "1s")]
    pub duration: Duration,
    /// Write 4 KiB into each allocated block (io_uring, O_DIRECT) before freeing it.
    #[arg(long)]
    pub with_io: bool,
    /// Blocks to allocate, write and keep (committed) after the run, reported for the audit.
    #[arg(long, default_value_t = 4)]
    pub hold: usize,
}

/// What a worker prints.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum WorkerEvent {
    Ready {
        proc_id: u16,
        pid: u32,
        leader: bool,
        recovered: usize,
    },
    Done {
        proc_id: u16,
        leader: bool,
        ops: u64,
        elapsed_ns: u64,
        /// Allocation latencies: (value in ns, count) pairs of the histogram.
        alloc_ns: Vec<(u64, u64)>,
        held: Vec<BlockRef>,
    },
    /// Stopped (as asked) with `block` allocated and written, not committed.
    InFlight { proc_id: u16, block: BlockRef },
}

/// What the driver's `go` line asks for.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Go {
    Run,
    /// Run this long, then stop with a block in flight.
    StopInFlightAfter(Duration),
}

fn parse_go(line: &str) -> anyhow::Result<Go> {
    let line = line.trim();
    if line == "go" {
        return Ok(Go::Run);
    }
    if let Some(v) = line.strip_prefix("go stop-in-flight-after=") {
        let d = parse_duration(v).map_err(|e| anyhow::anyhow!("{line:?}: {e}"))?;
        return Ok(Go::StopInFlightAfter(d));
    }
    bail!("expected `go` on stdin, got {line:?}")
}

fn emit(ev: &WorkerEvent) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    serde_json::to_writer(&mut out, ev)?;
    out.write_all(b"\n")?;
    out.flush()?;
    Ok(())
}

/// Allocates from the devices in turn, starting at `next`; skips full or offline ones.
fn alloc_any(
    a: &mut dyn BlockAllocator,
    devs: &[u16],
    next: &mut usize,
) -> Result<BlockRef, AllocError> {
    for _ in 0..devs.len() {
        let d = devs[*next % devs.len()];
        *next += 1;
        match a.alloc(d) {
            Ok(b) => return Ok(b),
            Err(AllocError::DeviceFull { .. }) | Err(AllocError::DeviceOffline { .. }) => {}
            Err(e) => return Err(e),
        }
    }
    Err(AllocError::NodeFull)
}

/// The worker's block writes (with `--with-io`): the devices it opened, an engine and a
/// block of its process id's byte.
struct BlockWriter {
    /// Device index (from the scan) -> the open device, its region offset, block size.
    opened: Vec<Option<(Device, u64, u64)>>,
    eng: UringEngine,
    buf: AlignedBuf,
}

impl BlockWriter {
    /// Opens the scanned devices `devs` of `p` when `with_io` (none otherwise).
    fn open(p: &NodeProcess, devs: &[u16], with_io: bool, proc_id: u16) -> anyhow::Result<Self> {
        let mut opened: Vec<Option<(Device, u64, u64)>> = (0..MAX_DEVICES).map(|_| None).collect();
        if with_io {
            for &i in devs {
                let d = p.at.device(i)?;
                let r = d.region();
                let dev = Device::open(&r.path)
                    .with_context(|| format!("opening {}", r.path.display()))?;
                opened[i as usize % MAX_DEVICES] = Some((dev, r.offset, d.block_size()));
            }
        }
        let eng = UringEngine::with_queue_depth(1)?;
        let mut buf = AlignedBuf::new(4096);
        buf.fill(proc_id as u8);
        Ok(BlockWriter { opened, eng, buf })
    }

    fn write(&mut self, b: BlockRef) -> anyhow::Result<()> {
        let (dev, offset, bs) = self.opened[b.dev as usize % MAX_DEVICES]
            .as_ref()
            .context("block on a device this process did not open")?;
        self.eng
            .write_at(dev, offset + b.block as u64 * bs, &self.buf)?;
        Ok(())
    }
}

/// Allocates a block as [`alloc_any`] and, when given a writer, writes it.
fn alloc_written(
    a: &mut dyn BlockAllocator,
    devs: &[u16],
    next: &mut usize,
    writer: Option<&mut BlockWriter>,
) -> anyhow::Result<BlockRef> {
    let b = alloc_any(a, devs, next)?;
    if let Some(w) = writer {
        w.write(b)?;
    }
    Ok(b)
}

/// Reads (and drops) stdin until the driver closes it.
fn wait_for_eof(stdin: &mut impl BufRead) -> anyhow::Result<()> {
    let mut rest = String::new();
    while stdin.read_line(&mut rest)? > 0 {
        rest.clear();
    }
    Ok(())
}

fn worker(args: WorkerArgs) -> anyhow::Result<()> {
    let cfg = args.node.config();
    let p = NodeProcess::start(cfg.clone()).context("starting the node process")?;
    let devs = p.scan(&cfg.devices).context("scanning devices")?;
    let mut a = p.allocator()?;
    emit(&WorkerEvent::Ready {
        proc_id: cfg.proc_id,
        pid: std::process::id(),
        leader: p.is_leader(),
        recovered: p.recovered_at_start,
    })?;
    let mut stdin = std::io::stdin().lock();
    let mut line = String::new();
    stdin.read_line(&mut line)?;
    let go = parse_go(&line)?;
    let mut w = BlockWriter::open(&p, &devs, args.with_io, cfg.proc_id)?;
    let mut hist = crate::LatencyHist::new();
    let clock = quanta::Clock::new();
    let mut next = cfg.proc_id as usize;
    let mut ops = 0u64;
    let run_for = match go {
        Go::Run => args.duration,
        Go::StopInFlightAfter(d) => d,
    };
    let start = Instant::now();
    let until = start + run_for;
    loop {
        // Check the clock every 64 operations only.
        if ops % 64 == 0 && Instant::now() >= until {
            break;
        }
        // Time one allocation in LATENCY_SAMPLE with the TSC (quanta; two back-to-back
        // reads differ by about 19 ns here, where `Instant::now` pairs differ by 49 ns),
        // and only one in LATENCY_SAMPLE so clock reads do not eat the throughput.
        let b = if ops % LATENCY_SAMPLE == 0 {
            let t0 = clock.raw();
            let b = alloc_any(a.as_mut(), &devs, &mut next)?;
            hist.record(clock.delta_as_nanos(t0, clock.raw()));
            b
        } else {
            alloc_any(a.as_mut(), &devs, &mut next)?
        };
        if args.with_io {
            w.write(b)?;
        }
        a.free(b)?;
        ops += 1;
    }
    let elapsed_ns = start.elapsed().as_nanos() as u64;
    if go != Go::Run {
        // Allocated and written, never committed: what a crash mid-write leaves.
        let b = alloc_written(a.as_mut(), &devs, &mut next, args.with_io.then_some(&mut w))?;
        emit(&WorkerEvent::InFlight {
            proc_id: cfg.proc_id,
            block: b,
        })?;
        wait_for_eof(&mut stdin)?;
        bail!("worker {}: stopped with block {b} in flight", cfg.proc_id);
    }
    let mut held = Vec::new();
    for _ in 0..args.hold {
        let b = alloc_written(a.as_mut(), &devs, &mut next, args.with_io.then_some(&mut w))?;
        a.commit(b, 4096)?;
        held.push(b);
    }
    emit(&WorkerEvent::Done {
        proc_id: cfg.proc_id,
        leader: p.is_leader(),
        ops,
        elapsed_ns,
        alloc_ns: hist.recorded(),
        held,
    })?;
    // Stay up (a leader serves the others) until the driver closes stdin.
    wait_for_eof(&mut stdin)
}

pub fn run(cmd: AllocCmd) -> anyhow::Result<()> {
    match cmd {
        AllocCmd::Worker(a) => worker(a),
        AllocCmd::Node(a) => node_serve(a),
        AllocCmd::HoldLock { dir, dev } => {
            let at = Attached::open(&dir)?;
            let d = at.device(dev)?;
            let g = d.mutex().lock()?;
            println!("locked");
            std::io::stdout().flush()?;
            loop {
                std::thread::sleep(Duration::from_secs(3600));
                let _ = &g;
            }
        }
        AllocCmd::DeviceOffline { internal_port, dev } => {
            node::ask_leader::<Done>(internal_port, &NodeRequest::DeviceOffline { dev })
                .with_context(|| format!("taking device {dev} offline"))?;
            println!("device {dev} offline");
            Ok(())
        }
        AllocCmd::DeviceOnline {
            internal_port,
            device,
        } => {
            let rep: DeviceAdded = node::ask_leader(
                internal_port,
                &NodeRequest::DeviceOnline {
                    device: device.clone(),
                },
            )
            .with_context(|| format!("bringing {} online", device.path.display()))?;
            println!("{}", rep.dev);
            Ok(())
        }
        AllocCmd::Audit { dir } => {
            let at = Attached::open(&dir)?;
            let rep = blocklab::alloc::audit::audit(&at, &[])?;
            println!("{}", serde_json::to_string_pretty(&rep)?);
            Ok(())
        }
    }
}

// ------------------------------------------------------------------ driver side

/// A spawned worker process; killed on drop.
pub struct WorkerProc {
    pub proc_id: u16,
    child: Child,
    stdin: Option<ChildStdin>,
    events: mpsc::Receiver<anyhow::Result<WorkerEvent>>,
}

impl std::fmt::Debug for WorkerProc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerProc")
            .field("proc_id", &self.proc_id)
            .field("pid", &self.child.id())
            .finish()
    }
}

/// How to start workers of one node.
#[derive(Debug, Clone)]
pub struct WorkerSpec {
    /// The `blocklab` binary.
    pub exe: PathBuf,
    pub node: NodeArgs,
    pub duration: Duration,
    pub with_io: bool,
    pub hold: usize,
}

impl WorkerProc {
    pub fn spawn(spec: &WorkerSpec, proc_id: u16) -> anyhow::Result<WorkerProc> {
        let n = &spec.node;
        let mut cmd = Command::new(&spec.exe);
        cmd.args(["alloc", "worker", "--dir"])
            .arg(&n.dir)
            .args(["--proc-id", &proc_id.to_string()])
            .args(["--internal-port", &n.internal_port.to_string()])
            .args(["--strategy", n.strategy.name()])
            .args(["--block-size", &n.block_size.to_string()])
            .args(["--duration", &format_duration(spec.duration)])
            .args(["--hold", &spec.hold.to_string()])
            .args(["--unfilled-capacity", &n.unfilled_capacity.to_string()]);
        let devices: Vec<String> = n.devices.iter().map(|d| d.to_string()).collect();
        cmd.arg("--devices").arg(devices.join(","));
        if spec.with_io {
            cmd.arg("--with-io");
        }
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("spawning {}", spec.exe.display()))?;
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().context("worker stdout")?;
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let ev = line.map_err(anyhow::Error::from).and_then(|l| {
                    serde_json::from_str::<WorkerEvent>(&l)
                        .with_context(|| format!("worker said {l:?}"))
                });
                if tx.send(ev).is_err() {
                    break;
                }
            }
        });
        Ok(WorkerProc {
            proc_id,
            child,
            stdin,
            events: rx,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The next event, within `timeout`.
    pub fn event(&mut self, timeout: Duration) -> anyhow::Result<WorkerEvent> {
        match self.events.recv_timeout(timeout) {
            Ok(ev) => ev,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                bail!("worker {} said nothing for {timeout:?}", self.proc_id)
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                let st = self.child.wait().ok();
                bail!("worker {} exited ({st:?})", self.proc_id)
            }
        }
    }

    pub fn go(&mut self) -> anyhow::Result<()> {
        self.say("go")
    }

    /// `go`, but stop after `after` with a block allocated and written and not
    /// committed, and say so with an `in_flight` event.
    pub fn go_stop_in_flight(&mut self, after: Duration) -> anyhow::Result<()> {
        self.say(&format!(
            "go stop-in-flight-after={}",
            format_duration(after)
        ))
    }

    fn say(&mut self, line: &str) -> anyhow::Result<()> {
        let s = self.stdin.as_mut().context("worker stdin closed")?;
        writeln!(s, "{line}")?;
        s.flush()?;
        Ok(())
    }

    /// Closes stdin and waits for a clean exit.
    pub fn finish(mut self) -> anyhow::Result<()> {
        self.stdin = None;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(st) = self.child.try_wait()? {
                if !st.success() {
                    bail!("worker {} exited with {st}", self.proc_id);
                }
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("worker {} did not exit", self.proc_id);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// SIGKILL, and wait until it is gone.
    pub fn kill(mut self) -> anyhow::Result<()> {
        self.child.kill()?;
        self.child.wait()?;
        Ok(())
    }
}

impl Drop for WorkerProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
