//! Replication end to end: `blocklab repl serve` processes talking TCP, on loop devices
//! when root (sparse files otherwise). The primary is killed with SIGKILL mid-stream and
//! restarted; afterwards every acknowledged write is on a majority and everything is
//! applied in order on every replica (checked by reading the devices). Also: an
//! unreachable secondary, a full log region on the primary and on one secondary, bad and
//! forged frames sent to a replica, another wire version at either end, a foreign device,
//! a formatted daemon device, a log damaged in the middle, a second replica on a device.

use std::io::{BufRead as _, BufReader, Write as _};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use blocklab::dev::{Device, UringEngine};
use blocklab::repl::client::{Client, ClientError};
use blocklab::repl::kv::{put_payload, split_payload, KvStore};
use blocklab::repl::log::LogStore;
use blocklab::repl::replica::Regions;
use blocklab::repl::wire::{encode_to_vec, read_frame, Frame, Status, WIRE_VERSION};
use blocklab::repl::{Entry, Message};
use blocklab::testing::{
    free_port, spawn_announcing, wait_for, KillOnDrop, LoopDevices, TestDevices,
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

/// `n` devices of `size` bytes: loop devices when root, else sparse files. Declare it
/// before the processes using it, so they are killed before the devices go.
fn devices(name: &str, n: usize, size: u64) -> TestDevices {
    TestDevices::loop_or_files(&format!("repl-{name}-{}", std::process::id()), n, size)
}

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
        "--retransmit".into(),
        "100ms".into(),
    ]
}

fn peers(a1: SocketAddr, a2: SocketAddr) -> Vec<String> {
    vec!["--peers".into(), format!("1={a1},2={a2}")]
}

fn status(addr: SocketAddr) -> Option<Status> {
    Client::connect(addr, Duration::from_secs(5))
        .ok()?
        .status()
        .ok()
}

/// The log entries and the storage engine's (index, key, value) on a replica's device.
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
        .map(|(k, v)| (k, v.index, v.value().to_vec()))
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
    let (_, a1) = serve(&mut procs, &common(1, &devs[1], "idle_ack"));
    let (_, a2) = serve(&mut procs, &common(2, &devs[2], "idle_ack"));
    let mut pargs = common(0, &devs[0], "idle_ack");
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
    procs[p0].kill();
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
                log.get(*index as usize - 1)
                    .is_some_and(|e| split_payload(&e.payload).unwrap() == (*key, value.as_slice()))
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
                let (k, v) = split_payload(&e.payload).unwrap();
                (k, e.index, v.to_vec())
            })
            .collect();
        want.sort();
        assert_eq!(kv, &want, "replica {i}'s storage engine");
    }
    g.teardown().unwrap();
}

#[test]
fn the_primary_keeps_committing_and_notifying_with_a_secondary_unreachable() {
    let devs = devices("unreachable", 3, 32 << 20);
    let mut procs = Procs::new();
    let (_, a1) = serve(&mut procs, &common(1, &devs.paths()[1], "idle_ack"));
    // Secondary 2's address: a port nobody listens on.
    let a2 = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let mut pargs = common(0, &devs.paths()[0], "idle_ack");
    pargs.extend(peers(a1, a2));
    let (_, a0) = serve(&mut procs, &pargs);
    let mut c = Client::connect(a0, Duration::from_secs(10)).unwrap();
    for k in 1..=20u64 {
        assert_eq!(c.write(put_payload(k, b"x")).unwrap(), k);
    }
    assert_eq!(status(a0).unwrap().commit, 20);
    // The client is answered at the commit; the apply worker applies right after.
    wait_for("the primary applied all 20", WAIT, || {
        status(a0).is_some_and(|s| s.applied == 20)
    });
    // The dead secondary does not hold the idle notification back: the live one learns the
    // commit without another write and applies everything.
    wait_for("secondary 1 applied all 20", WAIT, || {
        status(a1).is_some_and(|s| s.durable_index == 20 && s.applied == 20)
    });
}

#[test]
fn a_full_log_region_refuses_writes_with_a_clear_error() {
    let devs = devices("full-log", 3, 32 << 20);
    let mut procs = Procs::new();
    let small = |id: u32| with_log_size(common(id, &devs.paths()[id as usize], "eager"), "64K");
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
    for d in devs.paths() {
        assert_eq!(read_log(d, 64 << 10).len() as u64, ok);
    }
}

fn with_log_size(mut args: Vec<String>, size: &str) -> Vec<String> {
    let i = args.iter().position(|x| x == "--log-size").unwrap();
    args[i + 1] = size.into();
    args
}

fn read_log(dev: &Path, log_size: u64) -> Vec<Entry> {
    let mut eng = UringEngine::with_queue_depth(4).unwrap();
    let r = Regions::plain(log_size, DATA_SIZE);
    LogStore::open(
        &mut eng,
        Device::open(dev).unwrap(),
        r.log_offset,
        r.log_len,
    )
    .unwrap()
    .1
}

#[test]
fn a_secondary_with_a_full_log_keeps_serving_while_the_others_commit() {
    let devs = devices("secondary-full", 3, 32 << 20);
    let mut procs = Procs::new();
    // Secondary 1 has a 64 KiB log, the others the default.
    let (_, a1) = serve(
        &mut procs,
        &with_log_size(common(1, &devs.paths()[1], "idle_ack"), "64K"),
    );
    let (_, a2) = serve(&mut procs, &common(2, &devs.paths()[2], "idle_ack"));
    let mut pargs = common(0, &devs.paths()[0], "idle_ack");
    pargs.extend(peers(a1, a2));
    let (_, a0) = serve(&mut procs, &pargs);
    let mut c = Client::connect(a0, Duration::from_secs(10)).unwrap();
    // About 60 of these fill 64 KiB; write twice as many.
    const N: u64 = 120;
    for k in 1..=N {
        assert_eq!(c.write(put_payload(k, &[7u8; 1000])).unwrap(), k);
    }
    wait_for("secondary 2 applied everything", WAIT, || {
        status(a2).is_some_and(|s| s.applied == N)
    });
    // Secondary 1 still answers, holds a durable prefix and applied what it holds.
    let s1 = status(a1).expect("the full secondary keeps serving");
    assert!(s1.durable_index > 0 && s1.durable_index < N, "{s1:?}");
    wait_for("secondary 1 applied its durable prefix", WAIT, || {
        status(a1).is_some_and(|s| s.applied == s.durable_index)
    });
    let s1 = status(a1).unwrap();
    drop(procs);
    let log1 = read_log(&devs.paths()[1], 64 << 10);
    let log0 = read_log(&devs.paths()[0], LOG_SIZE);
    assert_eq!(log1.len() as u64, s1.durable_index);
    assert_eq!(
        &log0[..log1.len()],
        &log1[..],
        "the full log holds an intact prefix"
    );
}

fn read_one(s: &mut TcpStream) -> Option<Frame> {
    read_frame(s, &mut Vec::new()).ok().flatten()
}

#[test]
fn bad_and_forged_frames_are_refused_and_the_replica_keeps_serving() {
    let devs = devices("bad-frames", 3, 32 << 20);
    let mut procs = Procs::new();
    let (_, a1) = serve(&mut procs, &common(1, &devs.paths()[1], "idle_ack"));
    let bad: Vec<Vec<u8>> = vec![
        // Another wire version.
        {
            let mut f = encode_to_vec(&Frame::StatusReq).unwrap();
            f[4] = WIRE_VERSION + 1;
            f
        },
        // Oversized length prefix.
        u32::MAX.to_le_bytes().to_vec(),
        // Garbage body.
        vec![6, 0, 0, 0, WIRE_VERSION, 99, 1, 2, 3, 4],
        // Truncated write.
        {
            let mut f = encode_to_vec(&Frame::ClientWrite {
                id: 1,
                payload: vec![1; 32].into(),
            })
            .unwrap();
            f.truncate(20);
            let len = (f.len() - 4) as u32;
            f[..4].copy_from_slice(&len.to_le_bytes());
            f
        },
        // A connection closed inside a length prefix.
        vec![8, 0],
    ];
    for b in bad {
        let mut s = TcpStream::connect(a1).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        s.write_all(&b).unwrap();
        s.shutdown(std::net::Shutdown::Write).unwrap();
        // The replica closes the connection instead of answering.
        let mut buf = [0u8; 16];
        let n = std::io::Read::read(&mut s, &mut buf).unwrap_or(0);
        assert_eq!(n, 0, "the replica answered a bad frame");
    }
    let forged = |from: u32| {
        encode_to_vec(&Frame::Repl(Message::Append {
            term: 99,
            from,
            prev_index: 0,
            prev_term: 0,
            commit: 1,
            entries: vec![Entry {
                term: 99,
                index: 1,
                payload: put_payload(1, b"forged").into(),
            }],
        }))
        .unwrap()
    };
    // An append on a connection that did not introduce itself: dropped (the connection
    // may still ask for the status).
    let mut s = TcpStream::connect(a1).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    s.write_all(&forged(0)).unwrap();
    s.write_all(&encode_to_vec(&Frame::StatusReq).unwrap())
        .unwrap();
    match read_one(&mut s) {
        Some(Frame::Status(st)) => assert_eq!((st.last_index, st.term), (0, 0), "{st:?}"),
        other => panic!("expected the status, got {other:?}"),
    }
    // A replica that is not the primary introducing itself: answered with a Hello, then
    // closed; its append is never applied.
    let mut s = TcpStream::connect(a1).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    s.write_all(&encode_to_vec(&Frame::hello(2)).unwrap())
        .unwrap();
    s.write_all(&forged(2)).unwrap();
    assert_eq!(read_one(&mut s), Some(Frame::hello(1)));
    assert_eq!(read_one(&mut s), None, "closed after the Hello");
    // The primary speaking another version: told our version, then closed.
    let mut s = TcpStream::connect(a1).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut hello = encode_to_vec(&Frame::hello(0)).unwrap();
    hello[4] = WIRE_VERSION + 1;
    s.write_all(&hello).unwrap();
    assert_eq!(read_one(&mut s), Some(Frame::hello(1)));
    assert_eq!(read_one(&mut s), None, "closed after the Hello");
    // Still serving, nothing appended; a write to a secondary is refused clearly.
    let st = status(a1).unwrap();
    assert_eq!((st.last_index, st.term), (0, 0), "{st:?}");
    let err = Client::connect(a1, Duration::from_secs(5))
        .unwrap()
        .write(put_payload(1, b"x"))
        .unwrap_err();
    assert!(err.to_string().contains("not the primary"), "{err}");
}

#[test]
fn bad_writes_are_refused_before_they_reach_the_log() {
    let devs = devices("bad-writes", 3, 32 << 20);
    let mut procs = Procs::new();
    let (_, a1) = serve(&mut procs, &common(1, &devs.paths()[1], "idle_ack"));
    let (_, a2) = serve(&mut procs, &common(2, &devs.paths()[2], "idle_ack"));
    let mut pargs = common(0, &devs.paths()[0], "idle_ack");
    pargs.extend(peers(a1, a2));
    let (_, a0) = serve(&mut procs, &pargs);
    let mut c = Client::connect(a0, Duration::from_secs(10)).unwrap();
    assert_eq!(c.write(put_payload(1, b"first")).unwrap(), 1);
    let refused = |r: Result<u64, ClientError>| match r {
        Err(ClientError::Refused { message, .. }) => message,
        other => panic!("expected a refusal, got {other:?}"),
    };
    let m = refused(c.write(vec![1u8, 2, 3]));
    assert!(m.contains("shorter than its 8-byte key"), "{m}");
    let m = refused(c.write(put_payload(2, &[0u8; 5000])));
    assert!(m.contains("exceeds the slot limit"), "{m}");
    // Keys that share a home slot both get one (the data region has 2047 slots).
    let slots = blocklab::repl::kv::slots_for(DATA_SIZE);
    assert_eq!(c.write(put_payload(1 + slots, b"same home")).unwrap(), 2);
    assert_eq!(c.write(put_payload(3, b"after")).unwrap(), 3);
    wait_for("every replica applied 3", WAIT, || {
        [a0, a1, a2]
            .iter()
            .all(|a| status(*a).is_some_and(|s| s.applied == 3 && s.last_index == 3))
    });
}

#[test]
fn a_secondary_speaking_another_wire_version_is_reported_and_a_client_times_out_clearly() {
    let devs = devices("version", 1, 32 << 20);
    // A fake secondary: answers every Hello with one of another version.
    let fake = TcpListener::bind("127.0.0.1:0").unwrap();
    let fake_addr = fake.local_addr().unwrap();
    let (hellos_tx, hellos) = mpsc::channel();
    std::thread::spawn(move || {
        for s in fake.incoming() {
            let Ok(mut s) = s else { return };
            let got = read_one(&mut s);
            let mut h = encode_to_vec(&Frame::hello(1)).unwrap();
            h[4] = WIRE_VERSION + 1;
            let _ = s.write_all(&h);
            if hellos_tx.send(got).is_err() {
                return;
            }
        }
    });
    let mut procs = Procs::new();
    let mut args = common(0, &devs.paths()[0], "idle_ack");
    let i = args.iter().position(|x| x == "0,1,2").unwrap();
    args[i] = "0,1".into();
    args.extend(["--peers".to_string(), format!("1={fake_addr}")]);
    let (child, line) = spawn_announcing(
        Command::new(BIN)
            .args(["repl", "serve"])
            .args(&args)
            .stderr(Stdio::piped()),
    );
    procs.push(child);
    let a0: SocketAddr = line.strip_prefix("listening on ").unwrap().parse().unwrap();
    let stderr = procs[0].0.stderr.take().unwrap();
    let (lines_tx, lines) = mpsc::channel();
    std::thread::spawn(move || {
        for l in BufReader::new(stderr).lines() {
            let Ok(l) = l else { return };
            if lines_tx.send(l).is_err() {
                return;
            }
        }
    });
    // The primary introduced itself with our version and its id...
    let first = hellos.recv_timeout(WAIT).unwrap();
    assert_eq!(first, Some(Frame::hello(0)));
    // ...reports the mismatch...
    let deadline = Instant::now() + WAIT;
    let report = loop {
        let l = lines
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .expect("a report of the version mismatch");
        if l.contains("speaks wire version") {
            break l;
        }
    };
    assert!(
        report.contains(&format!("secondary 1 at {fake_addr}"))
            && report.contains(&format!("speaks wire version {}", WIRE_VERSION + 1)),
        "{report}"
    );
    // ...and tries again later.
    assert_eq!(hellos.recv_timeout(WAIT).unwrap(), Some(Frame::hello(0)));
    // Without a majority nothing commits: the client says so instead of a bare timeout.
    let err = Client::connect(a0, Duration::from_secs(1))
        .unwrap()
        .write(put_payload(1, b"x"))
        .unwrap_err();
    assert!(matches!(err, ClientError::Timeout { .. }), "{err}");
    assert!(
        err.to_string()
            .contains("is a majority of the replicas reachable?"),
        "{err}"
    );
}

#[test]
fn a_device_with_other_data_is_refused_without_force() {
    let devs = devices("foreign", 1, 32 << 20);
    let p = &devs.paths()[0];
    {
        let mut f = std::fs::OpenOptions::new().write(true).open(p).unwrap();
        f.write_all(&[0xabu8; 8192]).unwrap();
        f.sync_all().unwrap();
    }
    let out = Command::new(BIN)
        .args(["repl", "serve"])
        .args(common(1, p, "idle_ack"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("refusing to overwrite it without --force"),
        "{err}"
    );
    // The data is untouched.
    let mut head = [0u8; 16];
    std::io::Read::read_exact(&mut std::fs::File::open(p).unwrap(), &mut head).unwrap();
    assert_eq!(head, [0xab; 16]);
}

#[test]
fn a_formatted_daemon_device_is_used_through_its_layout_with_force_once() {
    use blocklab::daemon::{mkfs, MkfsRequest};
    use blocklab::format::Label;
    let devs = devices("formatted", 1, 64 << 20);
    let p = &devs.paths()[0];
    let fsid = uuid::Uuid::new_v4();
    let mut eng = UringEngine::with_queue_depth(4).unwrap();
    mkfs(
        &mut eng,
        &Device::open(p).unwrap(),
        &MkfsRequest::new(fsid, 7),
    )
    .unwrap();
    let args: Vec<String> = ["--id", "0", "--members", "0", "--device"]
        .iter()
        .map(|s| s.to_string())
        .chain([p.display().to_string()])
        .collect();
    // Another daemon's device: refused without --force, naming its cluster and daemon.
    let out = Command::new(BIN)
        .args(["repl", "serve"])
        .args(&args)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("a blocklab label of cluster {fsid} daemon 7"))
            && err.contains("without --force"),
        "{err}"
    );
    // With --force: a one-member cluster writes into the format's log region.
    let mut procs = Procs::new();
    let mut forced = args.clone();
    forced.push("--force".into());
    let (_, a0) = serve(&mut procs, &forced);
    let mut c = Client::connect(a0, Duration::from_secs(10)).unwrap();
    for k in 1..=5u64 {
        assert_eq!(c.write(put_payload(k, b"v")).unwrap(), k);
    }
    drop(procs);
    // The log is now ours: a restart recovers it without --force.
    let mut procs = Procs::new();
    let (_, a0) = serve(&mut procs, &args);
    assert_eq!(status(a0).unwrap().last_index, 5);
    drop(procs);
    let (r, formatted) = Regions::detect(p, LOG_SIZE, DATA_SIZE).unwrap();
    assert!(formatted);
    let (_, log) =
        LogStore::open(&mut eng, Device::open(p).unwrap(), r.log_offset, r.log_len).unwrap();
    assert_eq!(log.len(), 5);
    // The label is intact.
    let mut b = blocklab::dev::AlignedBuf::new(4096);
    blocklab::dev::IoEngine::read_at(&mut eng, &Device::open(p).unwrap(), 0, &mut b).unwrap();
    assert!(Label::decode(&b).unwrap().is_ready());
}

/// In-process replicas (so their reports can be read): with group commit off every entry
/// costs exactly one flush on every replica, whatever the policy sends besides and also
/// when a batch of entries is persisted at once (the first half of the writes is proposed
/// in one batch), and the replica reports each flush with the entry it wrote; an idle
/// replica sleeps in its loop
/// instead of spinning (a secondary once spun on a poll deadline that only the primary
/// ever moves); every secondary applies every write.
#[test]
fn per_entry_flushes_and_idle_replicas_sleep() {
    use blocklab::repl::replica::{self, Hooks, PolicySpec, ReplicaOptions};
    use blocklab::repl::NodeId;

    #[derive(Default)]
    struct Seen {
        /// (first, last, flushes so far) of every flush.
        flushes: Vec<(u64, u64, u64)>,
        connected: Vec<NodeId>,
    }
    /// The flushes seen, and (on the primary) payloads to propose at the first poll.
    struct Record(Arc<Mutex<Seen>>, Vec<Vec<u8>>);
    impl Hooks for Record {
        fn poll(&mut self, _now: Instant, propose: &mut Vec<Vec<u8>>) -> Option<Instant> {
            propose.append(&mut self.1);
            None
        }
        fn persisted(&mut self, first: u64, last: u64, flushes: u64) {
            self.0.lock().unwrap().flushes.push((first, last, flushes));
        }
        fn peer_connected(&mut self, peer: NodeId) {
            self.0.lock().unwrap().connected.push(peer);
        }
    }

    let devs = devices("in-process", 3, 32 << 20);
    let regions = Regions::plain(LOG_SIZE, DATA_SIZE);
    let opts = |id: u32, peers: Vec<(u32, SocketAddr)>| ReplicaOptions {
        id,
        members: vec![0, 1, 2],
        primary: 0,
        peers,
        listener: TcpListener::bind("127.0.0.1:0").unwrap(),
        device: devs.paths()[id as usize].clone(),
        regions,
        policy: PolicySpec::parse("eager").unwrap(),
        tick: Duration::from_micros(100),
        retransmit: Duration::from_millis(200),
        fresh: true,
        force: true,
        group_commit: false,
    };
    let seen: Vec<Arc<Mutex<Seen>>> = (0..3).map(|_| Arc::default()).collect();
    const N: u64 = 12;
    let batch: Vec<Vec<u8>> = (1..=N / 2).map(|k| put_payload(k, b"b")).collect();
    let s1 = replica::spawn(opts(1, vec![]), Box::new(Record(seen[1].clone(), vec![]))).unwrap();
    let s2 = replica::spawn(opts(2, vec![]), Box::new(Record(seen[2].clone(), vec![]))).unwrap();
    let p = replica::spawn(
        opts(0, vec![(1, s1.addr()), (2, s2.addr())]),
        Box::new(Record(seen[0].clone(), batch)),
    )
    .unwrap();
    let started = Instant::now();
    let mut c = Client::connect(p.addr(), Duration::from_secs(10)).unwrap();
    for k in N / 2 + 1..=N {
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
        assert_eq!(r.apply_rejected, 0, "replica {id}");
        // Each flush reported with exactly the entry it wrote and the running count.
        let want: Vec<(u64, u64, u64)> = (1..=N).map(|i| (i, i, i)).collect();
        assert_eq!(seen[id].lock().unwrap().flushes, want, "replica {id}");
        // 50 ceiling wake-ups a second plus one per frame and timer, with a wide margin;
        // a spinning loop makes hundreds of thousands.
        let bound = (secs * 50.0) as u64 + 40 * N + 200;
        assert!(
            r.wakeups <= bound,
            "replica {id} woke {} times in {secs:.2} s (bound {bound}): its loop spins",
            r.wakeups
        );
    }
    let mut connected = seen[0].lock().unwrap().connected.clone();
    connected.sort();
    assert_eq!(connected, [1, 2], "the primary reported both connections");
    assert!(
        reports[0].stats.empty_appends > 0,
        "eager sent notifications"
    );
}

/// `repl serve` arguments of a one-replica cluster on `p` with an 8 MiB log.
fn lone_replica(p: &std::path::Path) -> Vec<String> {
    [
        "--id",
        "0",
        "--members",
        "0",
        "--log-size",
        "8M",
        "--device",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain([p.display().to_string()])
    .collect()
}

/// A log damaged in the middle (a byte of an early record flipped, megabytes of intact
/// records after it): `repl serve` refuses to start, printing the cause once, with the
/// record and where it is.
#[test]
fn a_log_damaged_in_the_middle_is_refused_with_its_cause_once() {
    let devs = devices("damaged", 1, 32 << 20);
    let p = &devs.paths()[0];
    let args = lone_replica(p);
    let mut procs = Procs::new();
    let (_, a0) = serve(&mut procs, &args);
    let mut c = Client::connect(a0, Duration::from_secs(10)).unwrap();
    let value = [5u8; 4000];
    for k in 1..=400u64 {
        assert_eq!(c.write(put_payload(k, &value)).unwrap(), k);
    }
    drop(c);
    drop(procs);
    // Record 3's payload: records are packed from the block after the log header.
    let record = blocklab::repl::log::record_size(put_payload(1, &value).len());
    let at = (1 << 20) + 4096 + 2 * record + 100;
    let mut eng = UringEngine::with_queue_depth(1).unwrap();
    let dev = Device::open(p).unwrap();
    let mut b = blocklab::dev::AlignedBuf::new(4096);
    let block = at - at % 4096;
    blocklab::dev::IoEngine::read_at(&mut eng, &dev, block, &mut b).unwrap();
    b[(at - block) as usize] ^= 0x40;
    blocklab::dev::IoEngine::write_at(&mut eng, &dev, block, &b).unwrap();
    drop(dev);

    let out = Command::new(BIN)
        .args(["repl", "serve"])
        .args(&args)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    let record_start = at - 100;
    for part in [
        format!("record 3 at byte {record_start} is damaged (checksum mismatch)"),
        "corrupt in the middle".to_string(),
        "refusing to recover it".to_string(),
    ] {
        assert_eq!(err.matches(&part).count(), 1, "{part:?} once in: {err}");
    }
    assert!(err.contains(&p.display().to_string()), "{err}");
}

/// The device is opened exclusively: a second `repl serve` on it is refused, saying so
/// once, and the first keeps serving.
#[test]
fn a_second_serve_on_the_same_device_is_refused() {
    let Some(g) = LoopDevices::provision(&format!("repl-excl-{}", std::process::id()), 1, 32 << 20)
    else {
        return;
    };
    let p = &g.paths()[0];
    let args = lone_replica(p);
    let mut procs = Procs::new();
    let (_, a0) = serve(&mut procs, &args);
    let out = Command::new(BIN)
        .args(["repl", "serve"])
        .args(&args)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.matches("in use").count(), 1, "{err}");
    assert!(err.contains(&p.display().to_string()), "{err}");
    let mut c = Client::connect(a0, Duration::from_secs(10)).unwrap();
    assert_eq!(c.write(put_payload(1, b"v")).unwrap(), 1);
    drop(procs);
}
