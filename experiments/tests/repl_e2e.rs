//! Replication end to end: `blocklab repl serve` processes talking TCP, on loop devices.
//! The primary is killed with SIGKILL mid-stream and restarted; afterwards every
//! acknowledged write is on a majority and everything is applied in order on every replica
//! (checked by reading the devices). Also: an unreachable secondary, a full log region,
//! and bad frames sent to a replica.

use std::io::Write as _;
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use blocklab::dev::{Device, UringEngine};
use blocklab::repl::client::{Client, ClientError};
use blocklab::repl::kv::{put_payload, split_payload, KvStore};
use blocklab::repl::log::LogStore;
use blocklab::repl::replica::Regions;
use blocklab::repl::wire::{encode_to_vec, Frame, Status};
use blocklab::repl::Entry;
use blocklab::testing::{
    sparse_file, sparse_files, spawn_announcing, wait_for, KillOnDrop, LoopDevices,
};

/// How long a test waits for a condition before failing.
const WAIT: Duration = Duration::from_secs(60);

/// (index, key, value) of a write.
type Write = (u64, u64, Vec<u8>);

const BIN: &str = env!("CARGO_BIN_EXE_blocklab");
const LOG_SIZE: u64 = 8 << 20;
const DATA_SIZE: u64 = 8 << 20;

/// Child processes, killed on drop (every exit path of the test).
type Procs = Vec<KillOnDrop>;

/// Starts `blocklab repl serve` and waits for its `listening on ADDR` line.
fn serve(procs: &mut Procs, args: &[String]) -> (usize, SocketAddr) {
    let (child, line) = spawn_announcing(
        Command::new(BIN)
            .arg("repl")
            .arg("serve")
            .args(args)
            .stderr(Stdio::inherit()),
    );
    procs.push(child);
    let addr = line
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("replica did not start: {line:?}"))
        .parse()
        .unwrap();
    (procs.len() - 1, addr)
}

fn common(id: u32, dev: &Path, policy: &str) -> Vec<String> {
    vec![
        "--id".into(),
        id.to_string(),
        "--members".into(),
        "0,1,2".into(),
        "--device".into(),
        dev.display().to_string(),
        "--policy".into(),
        policy.into(),
        "--log-size".into(),
        LOG_SIZE.to_string(),
        "--data-size".into(),
        DATA_SIZE.to_string(),
        "--retransmit-ms".into(),
        "100".into(),
    ]
}

fn peers(a1: SocketAddr, a2: SocketAddr) -> Vec<String> {
    vec![
        "--peer".into(),
        format!("1={a1}"),
        "--peer".into(),
        format!("2={a2}"),
    ]
}

fn status(addr: SocketAddr) -> Option<Status> {
    Client::connect(addr, Duration::from_secs(5))
        .ok()?
        .status()
        .ok()
}

/// Polls until `f` holds, with a generous deadline.
fn read_device(path: &Path) -> (Vec<Entry>, Vec<Write>) {
    let mut eng = UringEngine::with_queue_depth(4).unwrap();
    let r = Regions::plain(LOG_SIZE, DATA_SIZE);
    let (_, log) = LogStore::open(
        &mut eng,
        Device::open(path).unwrap(),
        r.log_offset,
        r.log_len,
    )
    .unwrap();
    let kv = KvStore::open(
        &mut eng,
        Device::open(path).unwrap(),
        r.data_offset,
        r.data_len,
    )
    .unwrap();
    let kvs = kv
        .entries()
        .map(|(k, v)| (k, v.index, v.value.clone()))
        .collect();
    (log, kvs)
}

#[test]
fn kill_9_the_primary_mid_stream_and_recover() {
    let Some(g) = LoopDevices::provision(&format!("repl-e2e-{}", std::process::id()), 3, 64 << 20)
    else {
        return;
    };
    let devs: Vec<PathBuf> = g.paths();
    let mut procs = Procs::new();
    let (_, a1) = serve(&mut procs, &common(1, &devs[1], "idle"));
    let (_, a2) = serve(&mut procs, &common(2, &devs[2], "idle"));
    let mut pargs = common(0, &devs[0], "idle");
    pargs.extend(peers(a1, a2));
    let (p0, a0) = serve(&mut procs, &pargs);

    // Four writers, each write a distinct key; acknowledged (index, key, value) recorded.
    let primary = Arc::new(Mutex::new(a0));
    let acked: Arc<Mutex<Vec<Write>>> = Arc::default();
    let next_key = Arc::new(AtomicU64::new(1));
    let phase2 = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let limit = 600u64;
    let writers: Vec<_> = (0..4)
        .map(|_| {
            let (primary, acked, next_key, phase2, stop) = (
                primary.clone(),
                acked.clone(),
                next_key.clone(),
                phase2.clone(),
                stop.clone(),
            );
            std::thread::spawn(move || {
                let mut client: Option<(SocketAddr, Client)> = None;
                while !stop.load(Ordering::SeqCst) {
                    let addr = *primary.lock().unwrap();
                    if client.as_ref().is_none_or(|(a, _)| *a != addr) {
                        client = Client::connect(addr, Duration::from_secs(5))
                            .ok()
                            .map(|c| (addr, c));
                        if client.is_none() {
                            std::thread::sleep(Duration::from_millis(20));
                            continue;
                        }
                    }
                    let key = next_key.fetch_add(1, Ordering::SeqCst);
                    if key > limit {
                        return;
                    }
                    let value = format!("value-{key}").into_bytes();
                    match client.as_mut().unwrap().1.write(put_payload(key, &value)) {
                        Ok(index) => acked.lock().unwrap().push((index, key, value)),
                        Err(ClientError::Refused { message, .. }) => panic!("refused: {message}"),
                        Err(_) => {
                            // The primary died: outcome unknown. Wait for the new one.
                            client = None;
                            while !phase2.load(Ordering::SeqCst) && !stop.load(Ordering::SeqCst) {
                                std::thread::sleep(Duration::from_millis(10));
                            }
                        }
                    }
                }
            })
        })
        .collect();

    wait_for("150 acknowledged writes", WAIT, || {
        acked.lock().unwrap().len() >= 150
    });
    // SIGKILL mid-stream.
    procs[p0].0.kill().unwrap();
    procs[p0].0.wait().unwrap();
    let before_kill = acked.lock().unwrap().len();
    // Restart on the same device: it recovers its log with a new term.
    let (_, a0) = serve(&mut procs, &pargs);
    *primary.lock().unwrap() = a0;
    phase2.store(true, Ordering::SeqCst);
    wait_for("300 acknowledged writes", WAIT, || {
        acked.lock().unwrap().len() >= 300
    });
    stop.store(true, Ordering::SeqCst);
    for w in writers {
        w.join().unwrap();
    }
    let st0 = status(a0).unwrap();
    assert_eq!(st0.term, 2, "the restarted primary runs in a new term");
    // Everything converges: every replica applied the whole log.
    wait_for("all replicas applied everything", WAIT, || {
        let p = status(a0).unwrap();
        p.commit == p.last_index
            && [a0, a1, a2].iter().all(|a| {
                status(*a)
                    .is_some_and(|s| s.applied == p.last_index && s.last_index == p.last_index)
            })
    });
    drop(procs); // SIGKILL every replica; then read what is on the devices.

    let on_disk: Vec<_> = devs.iter().map(|d| read_device(d)).collect();
    let acked = acked.lock().unwrap().clone();
    assert!(acked.len() >= 300 && before_kill >= 150);
    for (index, key, value) in &acked {
        let holders = on_disk
            .iter()
            .filter(|(log, _)| {
                log.get(*index as usize - 1).is_some_and(|e| {
                    split_payload(e.index, &e.payload).unwrap() == (*key, value.as_slice())
                })
            })
            .count();
        assert!(
            holders >= 2,
            "acknowledged write {index} (key {key}) on {holders} logs"
        );
    }
    // All logs are identical, and each storage engine holds exactly the log's writes.
    let (log0, _) = &on_disk[0];
    for (i, (log, kv)) in on_disk.iter().enumerate() {
        assert_eq!(log, log0, "replica {i}'s log differs");
        let mut want: Vec<Write> = log
            .iter()
            .map(|e| {
                let (k, v) = split_payload(e.index, &e.payload).unwrap();
                (k, e.index, v.to_vec())
            })
            .collect();
        want.sort();
        assert_eq!(kv, &want, "replica {i}'s storage engine");
    }
    g.teardown().unwrap();
}

fn file_devs(dir: &tempfile::TempDir) -> Vec<PathBuf> {
    sparse_files(dir.path(), 3, 32 << 20)
}

#[test]
fn the_primary_keeps_committing_with_a_secondary_unreachable() {
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let devs = file_devs(&dir);
    let mut procs = Procs::new();
    let (_, a1) = serve(&mut procs, &common(1, &devs[1], "idle"));
    // Secondary 2's address: a port nobody listens on.
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let a2 = dead.local_addr().unwrap();
    drop(dead);
    let mut pargs = common(0, &devs[0], "idle");
    pargs.extend(peers(a1, a2));
    let (_, a0) = serve(&mut procs, &pargs);
    let mut c = Client::connect(a0, Duration::from_secs(10)).unwrap();
    for k in 1..=20u64 {
        assert_eq!(c.write(put_payload(k, b"x")).unwrap(), k);
    }
    let s = status(a0).unwrap();
    assert_eq!((s.commit, s.applied), (20, 20));
    // The reachable secondary has durably stored everything; it applies what it learned.
    wait_for("secondary 1 durable", WAIT, || {
        status(a1).unwrap().durable_index == 20
    });
}

#[test]
fn a_full_log_region_refuses_writes_with_a_clear_error() {
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let devs = file_devs(&dir);
    let mut procs = Procs::new();
    let small = |id: u32| {
        let mut a = common(id, &devs[id as usize], "eager");
        let i = a.iter().position(|x| x == "--log-size").unwrap();
        a[i + 1] = "64K".into();
        a
    };
    let (_, a1) = serve(&mut procs, &small(1));
    let (_, a2) = serve(&mut procs, &small(2));
    let mut pargs = small(0);
    pargs.extend(peers(a1, a2));
    let (_, a0) = serve(&mut procs, &pargs);
    let mut c = Client::connect(a0, Duration::from_secs(10)).unwrap();
    let mut ok = 0u64;
    let err = loop {
        match c.write(put_payload(ok + 1, &[7u8; 1000])) {
            Ok(i) => {
                ok += 1;
                assert_eq!(i, ok);
            }
            Err(e) => break e,
        }
        assert!(ok < 1000, "a 64 KiB log never filled");
    };
    assert!(
        err.to_string().contains("log region full"),
        "unexpected error: {err}"
    );
    // Nothing was corrupted: the replicas keep serving and hold every accepted write.
    wait_for("all applied", WAIT, || {
        [a0, a1, a2]
            .iter()
            .all(|a| status(*a).is_some_and(|s| s.applied == ok))
    });
    drop(procs);
    for d in &devs {
        let mut eng = UringEngine::with_queue_depth(4).unwrap();
        let r = Regions::plain(64 << 10, DATA_SIZE);
        let (_, log) =
            LogStore::open(&mut eng, Device::open(d).unwrap(), r.log_offset, r.log_len).unwrap();
        assert_eq!(log.len() as u64, ok);
    }
}

#[test]
fn bad_frames_close_the_connection_and_the_replica_keeps_serving() {
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let devs = file_devs(&dir);
    let mut procs = Procs::new();
    let (_, a1) = serve(&mut procs, &common(1, &devs[1], "idle"));
    let bad: Vec<Vec<u8>> = vec![
        // Another wire version.
        {
            let mut f = encode_to_vec(&Frame::StatusReq);
            f[4] = 2;
            f
        },
        // Oversized length prefix.
        u32::MAX.to_le_bytes().to_vec(),
        // Garbage body.
        vec![6, 0, 0, 0, 1, 99, 1, 2, 3, 4],
        // Truncated append.
        {
            let mut f = encode_to_vec(&Frame::ClientWrite {
                id: 1,
                payload: vec![1; 32],
            });
            f.truncate(20);
            let len = (f.len() - 4) as u32;
            f[..4].copy_from_slice(&len.to_le_bytes());
            f
        },
    ];
    for b in bad {
        let mut s = TcpStream::connect(a1).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        s.write_all(&b).unwrap();
        // The replica closes the connection instead of answering.
        let mut buf = [0u8; 16];
        let n = std::io::Read::read(&mut s, &mut buf).unwrap_or(0);
        assert_eq!(n, 0, "the replica answered a bad frame");
    }
    // Still serving; a write to a secondary is refused clearly.
    assert!(status(a1).is_some());
    let err = Client::connect(a1, Duration::from_secs(5))
        .unwrap()
        .write(put_payload(1, b"x"))
        .unwrap_err();
    assert!(err.to_string().contains("not the primary"), "{err}");
}

#[test]
fn a_device_with_other_data_is_refused_without_force() {
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let p = dir.path().join("foreign.img");
    let mut f = std::fs::File::create(&p).unwrap();
    f.write_all(&[0xabu8; 8192]).unwrap();
    f.set_len(32 << 20).unwrap();
    let out = Command::new(BIN)
        .args(["repl", "serve"])
        .args(common(1, &p, "idle"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("refusing to overwrite it without --force"),
        "{err}"
    );
}

#[test]
fn a_formatted_daemon_device_is_used_through_its_layout() {
    use blocklab::format::{Label, Layout, LayoutParams, LABEL_FLAG_READY};
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let p = dir.path().join("daemon.img");
    sparse_file(&p, 64 << 20);
    let layout = Layout::compute(64 << 20, LayoutParams::default()).unwrap();
    let label = Label {
        flags: LABEL_FLAG_READY,
        cluster_fsid: uuid::Uuid::new_v4(),
        daemon_id: 0,
        daemon_uuid: uuid::Uuid::new_v4(),
        birth_time_unix_ns: 1,
        layout,
    };
    let mut eng = UringEngine::with_queue_depth(4).unwrap();
    let mut b = blocklab::dev::AlignedBuf::new(4096);
    b.copy_from_slice(&label.encode());
    blocklab::dev::IoEngine::write_at(&mut eng, &Device::open(&p).unwrap(), 0, &b).unwrap();
    // A one-member cluster: no --force needed on a formatted device.
    let mut procs = Procs::new();
    let args: Vec<String> = ["--id", "0", "--members", "0", "--device"]
        .iter()
        .map(|s| s.to_string())
        .chain([p.display().to_string()])
        .collect();
    let (_, a0) = serve(&mut procs, &args);
    let mut c = Client::connect(a0, Duration::from_secs(10)).unwrap();
    for k in 1..=5u64 {
        assert_eq!(c.write(put_payload(k, b"v")).unwrap(), k);
    }
    drop(procs);
    let (r, formatted) = Regions::detect(&p, LOG_SIZE, DATA_SIZE).unwrap();
    assert!(formatted);
    let (_, log) =
        LogStore::open(&mut eng, Device::open(&p).unwrap(), r.log_offset, r.log_len).unwrap();
    assert_eq!(log.len(), 5);
    // The label is intact.
    blocklab::dev::IoEngine::read_at(&mut eng, &Device::open(&p).unwrap(), 0, &mut b).unwrap();
    assert!(Label::decode(&b).unwrap().is_ready());
}

/// In-process replicas (so their reports can be read): with group commit off every entry
/// costs exactly one flush on every replica, whatever the policy sends besides; an idle
/// replica sleeps in its loop instead of spinning (a secondary once spun on a poll
/// deadline that only the primary ever moves); every secondary applies every write.
#[test]
fn per_entry_flushes_and_idle_replicas_sleep() {
    use blocklab::repl::replica::{self, NoHooks, PolicySpec, ReplicaOptions};
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let devs = file_devs(&dir);
    let regions = Regions::plain(LOG_SIZE, DATA_SIZE);
    let opts = |id: u32, peers: Vec<(u32, SocketAddr)>| ReplicaOptions {
        id,
        members: vec![0, 1, 2],
        primary: 0,
        peers,
        listener: std::net::TcpListener::bind("127.0.0.1:0").unwrap(),
        device: devs[id as usize].clone(),
        regions,
        policy: PolicySpec::parse("eager").unwrap(),
        tick: Duration::from_micros(100),
        retransmit: Duration::from_millis(200),
        delay: Duration::ZERO,
        fresh: true,
        force: true,
        group_commit: false,
    };
    let s1 = replica::spawn(opts(1, vec![]), Box::new(NoHooks)).unwrap();
    let s2 = replica::spawn(opts(2, vec![]), Box::new(NoHooks)).unwrap();
    let p = replica::spawn(
        opts(0, vec![(1, s1.addr()), (2, s2.addr())]),
        Box::new(NoHooks),
    )
    .unwrap();
    let started = Instant::now();
    let mut c = Client::connect(p.addr(), Duration::from_secs(10)).unwrap();
    const N: u64 = 12;
    for k in 1..=N {
        assert_eq!(c.write(put_payload(k, b"v")).unwrap(), k);
    }
    wait_for("both secondaries applied everything", WAIT, || {
        [s1.addr(), s2.addr()]
            .iter()
            .all(|a| status(*a).is_some_and(|s| s.applied == N))
    });
    // Idle for a while: a sleeping loop wakes at most every 20 ms.
    std::thread::sleep(Duration::from_millis(300));
    let secs = started.elapsed().as_secs_f64();
    let reports = [p.stop().unwrap(), s1.stop().unwrap(), s2.stop().unwrap()];
    for (id, r) in reports.iter().enumerate() {
        assert_eq!(r.log_flushes, N, "replica {id}: one flush per entry");
        assert_eq!(r.applied, N, "replica {id}");
        // 50 ceiling wake-ups a second plus one per frame and timer, with a wide margin;
        // a spinning loop makes hundreds of thousands.
        let bound = (secs * 50.0) as u64 + 40 * N + 200;
        assert!(
            r.wakeups <= bound,
            "replica {id} woke {} times in {secs:.2} s (bound {bound}): its loop spins",
            r.wakeups
        );
    }
    assert!(
        reports[0].stats.empty_appends > 0,
        "eager sent notifications"
    );
}
