//! One conformance suite for every coordination backend: the embedded store and a real
//! ZooKeeper server started by the test (Debian's `zookeeper` package).

use blocklab::coord::embedded::EmbeddedStore;
use blocklab::coord::zk_server::ZkServer;
use blocklab::coord::zookeeper::ZkCoord;
use blocklab::coord::{
    connect, ensure_path, ConnectOptions, Coord, CoordError, CoordSpec, NodeKind, Op, Read,
    ReadResult, WatchEvent,
};
use blocklab::testing::{free_port, next_event, require_zookeeper, retry, scratch_dir, wait_for};
use std::time::{Duration, Instant};

type Factory<'a> = &'a dyn Fn() -> Box<dyn Coord>;

const WAIT: Duration = Duration::from_secs(30);

/// Collects `n` node events (skipping Resync) or panics after the deadline.
fn collect(w: &blocklab::coord::Watch, n: usize) -> Vec<WatchEvent> {
    let deadline = Instant::now() + WAIT;
    let mut out = Vec::new();
    while out.len() < n {
        let left = deadline.saturating_duration_since(Instant::now());
        let what = format!("event {} of {n} after {out:?}", out.len() + 1);
        out.push(next_event(w, &what, left, |e| *e != WatchEvent::Resync));
    }
    out
}

fn suite_versions(new: Factory<'_>, base: &str) {
    let c = new();
    ensure_path(&*c, base).unwrap();
    let a = format!("{base}/a");
    let s = c.create(&a, b"one", NodeKind::Persistent).unwrap();
    assert_eq!(s.version, 0);
    assert_eq!(s.ephemeral_owner, None);
    assert_eq!(c.get(&a).unwrap().0, b"one");
    assert!(matches!(
        c.create(&a, b"x", NodeKind::Persistent),
        Err(CoordError::NodeExists(_))
    ));
    assert!(matches!(
        c.create(&format!("{base}/missing/child"), b"", NodeKind::Persistent),
        Err(CoordError::NoNode(_))
    ));
    assert_eq!(c.set(&a, b"two", Some(0)).unwrap().version, 1);
    assert!(matches!(
        c.set(&a, b"lost", Some(0)),
        Err(CoordError::BadVersion { expected: 0, .. })
    ));
    assert_eq!(c.get(&a).unwrap().0, b"two", "a failed set changed nothing");
    assert_eq!(c.set(&a, b"three", None).unwrap().version, 2);
    c.create(&format!("{a}/z"), b"", NodeKind::Persistent)
        .unwrap();
    c.create(&format!("{a}/m"), b"", NodeKind::Persistent)
        .unwrap();
    assert_eq!(c.children(&a).unwrap(), vec!["m", "z"]);
    assert_eq!(c.get(&a).unwrap().1.num_children, 2);
    assert!(matches!(c.delete(&a, None), Err(CoordError::NotEmpty(_))));
    c.delete(&format!("{a}/z"), None).unwrap();
    c.delete(&format!("{a}/m"), Some(0)).unwrap();
    assert!(matches!(
        c.delete(&a, Some(1)),
        Err(CoordError::BadVersion { expected: 1, .. })
    ));
    assert_eq!(c.get(&a).unwrap().1.num_children, 0);
    c.delete(&a, Some(2)).unwrap();
    assert!(matches!(c.get(&a), Err(CoordError::NoNode(_))));
    assert_eq!(c.exists(&a).unwrap(), None);
    assert!(matches!(c.children(&a), Err(CoordError::NoNode(_))));
    for bad in ["relative", "/trailing/", "/a//b", "/a/../b"] {
        assert!(
            matches!(c.get(bad), Err(CoordError::InvalidPath { .. })),
            "{bad}"
        );
    }
}

fn suite_multi(new: Factory<'_>, base: &str) {
    let c = new();
    ensure_path(&*c, base).unwrap();
    let p = |n: &str| format!("{base}/{n}");
    c.create(&p("v"), b"v0", NodeKind::Persistent).unwrap();
    // A failing op at the end: nothing of the earlier ops may be visible.
    let err = c
        .multi(&[
            Op::create(p("a"), b"a".to_vec()),
            Op::set(p("v"), b"v1".to_vec(), Some(0)),
            Op::check(p("v"), 7),
        ])
        .unwrap_err();
    match err {
        CoordError::MultiFailed {
            index,
            cause: source,
        } => {
            assert_eq!(index, 2);
            assert!(
                matches!(*source, CoordError::BadVersion { expected: 7, .. }),
                "{source}"
            );
        }
        e => panic!("expected MultiFailed, got {e}"),
    }
    // A conditional set or delete inside a multi names the version it expected.
    for op in [
        Op::set(p("v"), b"x".to_vec(), Some(5)),
        Op::delete(p("v"), Some(6)),
    ] {
        let want = match &op {
            Op::Set { version, .. } | Op::Delete { version, .. } => version.unwrap(),
            _ => unreachable!(),
        };
        match c
            .multi(&[Op::create(p("a"), b"a".to_vec()), op])
            .unwrap_err()
        {
            CoordError::MultiFailed {
                index: 1,
                cause: source,
            } => assert!(
                matches!(*source, CoordError::BadVersion { expected, .. } if expected == want),
                "{source}"
            ),
            e => panic!("expected MultiFailed at 1, got {e}"),
        }
    }
    assert_eq!(
        c.get(base).unwrap().1.num_children,
        1,
        "rollback kept the count"
    );
    assert_eq!(c.exists(&p("a")).unwrap(), None);
    assert_eq!(
        c.get(&p("v")).unwrap(),
        (b"v0".to_vec(), c.exists(&p("v")).unwrap().unwrap())
    );
    assert_eq!(c.get(&p("v")).unwrap().1.version, 0);
    // Creating a node and its child in one multi works (ops see earlier ops).
    c.multi(&[
        Op::check(p("v"), 0),
        Op::create(p("a"), b"a".to_vec()),
        Op::create(p("a/b"), b"b".to_vec()),
        Op::set(p("v"), b"v1".to_vec(), Some(0)),
    ])
    .unwrap();
    assert_eq!(c.get(&p("a/b")).unwrap().0, b"b");
    assert_eq!(c.get(&p("v")).unwrap().1.version, 1);
    // Two editors racing on the same version: exactly one wins.
    let d = new();
    let r1 = c.multi(&[
        Op::set(p("v"), b"c".to_vec(), Some(1)),
        Op::create(p("c"), b"".to_vec()),
    ]);
    let r2 = d.multi(&[
        Op::set(p("v"), b"d".to_vec(), Some(1)),
        Op::create(p("d"), b"".to_vec()),
    ]);
    assert!(r1.is_ok());
    assert!(matches!(r2, Err(CoordError::MultiFailed { index: 0, .. })));
    // After sync, a session reads what another session had acknowledged.
    d.sync(&p("v")).unwrap();
    assert_eq!(d.get(&p("v")).unwrap().0, b"c");
    assert!(d.exists(&p("c")).unwrap().is_some());
    assert_eq!(c.exists(&p("d")).unwrap(), None);
    // Delete inside a multi, then the parent.
    c.multi(&[Op::delete(p("a/b"), Some(0)), Op::delete(p("a"), None)])
        .unwrap();
    assert_eq!(c.exists(&p("a")).unwrap(), None);
    // An invalid path in a multi is refused before anything is applied.
    assert!(c
        .multi(&[
            Op::create(p("x"), b"".to_vec()),
            Op::create("bad", b"".to_vec())
        ])
        .is_err());
    assert_eq!(c.exists(&p("x")).unwrap(), None);
}

fn suite_ephemeral(new: Factory<'_>, base: &str) {
    let a = new();
    let b = new();
    ensure_path(&*a, base).unwrap();
    let e = format!("{base}/gw1");
    let w = b.watch(base).unwrap();
    let s = a.create(&e, b"alive", NodeKind::Ephemeral).unwrap();
    assert_eq!(s.ephemeral_owner, Some(a.session_id()));
    assert_ne!(a.session_id(), b.session_id());
    assert_eq!(b.get(&e).unwrap().1.ephemeral_owner, Some(a.session_id()));
    assert!(matches!(
        a.create(&format!("{e}/child"), b"", NodeKind::Persistent),
        Err(CoordError::NoChildrenForEphemerals(_))
    ));
    a.create(&format!("{base}/keep"), b"", NodeKind::Persistent)
        .unwrap();
    // Session loss: the ephemeral goes, the persistent node stays, watchers learn it.
    drop(a);
    wait_for("ephemeral removal", WAIT, || {
        b.exists(&e).unwrap().is_none()
    });
    assert!(b.exists(&format!("{base}/keep")).unwrap().is_some());
    let evs = collect(&w, 3);
    assert_eq!(
        evs,
        vec![
            WatchEvent::Created(e.clone()),
            WatchEvent::Created(format!("{base}/keep")),
            WatchEvent::Deleted(e.clone()),
        ]
    );
    // A closed session refuses further work.
    let c = new();
    c.close();
    assert!(c.get(base).is_err());
}

fn suite_watch_order(new: Factory<'_>, base: &str) {
    let writer = new();
    let reader = new();
    ensure_path(&*writer, base).unwrap();
    let w = reader.watch(base).unwrap();
    let other = new();
    ensure_path(&*other, &format!("{base}-sibling")).unwrap();
    let mut expect = Vec::new();
    for i in 0..20 {
        let p = format!("{base}/n{i:02}");
        writer.create(&p, b"", NodeKind::Persistent).unwrap();
        expect.push(WatchEvent::Created(p.clone()));
        // A change outside the subtree is not delivered.
        other
            .set(&format!("{base}-sibling"), format!("{i}").as_bytes(), None)
            .unwrap();
        writer.set(&p, b"x", Some(0)).unwrap();
        expect.push(WatchEvent::DataChanged(p.clone()));
        let q = format!("{p}/deep");
        writer
            .multi(&[
                Op::create(q.clone(), b"".to_vec()),
                Op::set(p.clone(), b"y".to_vec(), Some(1)),
            ])
            .unwrap();
        expect.push(WatchEvent::Created(q.clone()));
        expect.push(WatchEvent::DataChanged(p.clone()));
        writer.delete(&q, None).unwrap();
        expect.push(WatchEvent::Deleted(q));
    }
    let got = collect(&w, expect.len());
    assert_eq!(got, expect);
    // No extra events: a fence written after everything else is the very next event.
    let fence = format!("{base}/fence");
    writer.create(&fence, b"", NodeKind::Persistent).unwrap();
    assert_eq!(
        collect(&w, 1),
        vec![WatchEvent::Created(fence)],
        "no extra events"
    );
    // Concurrent writers: every change is delivered exactly once.
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let c = new();
            let base = base.to_string();
            std::thread::spawn(move || {
                for i in 0..10 {
                    c.create(&format!("{base}/t{t}-{i}"), b"", NodeKind::Persistent)
                        .unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let mut got = collect(&w, 40);
    got.sort_by(|a, b| a.path().cmp(&b.path()));
    got.dedup();
    assert_eq!(got.len(), 40);
    assert!(got.iter().all(|e| matches!(e, WatchEvent::Created(_))));
}

fn suite_reads(new: Factory<'_>, base: &str) {
    let c = new();
    // ensure_path: deep, then again (a no-op), then a sibling branch.
    ensure_path(&*c, &format!("{base}/x/y/z")).unwrap();
    ensure_path(&*c, &format!("{base}/x/y/z")).unwrap();
    ensure_path(&*c, &format!("{base}/x/w")).unwrap();
    assert_eq!(c.children(&format!("{base}/x")).unwrap(), vec!["w", "y"]);
    c.set(&format!("{base}/x/y"), b"data", None).unwrap();
    let r = c
        .read_many(&[
            Read::Data(format!("{base}/x/y")),
            Read::Children(format!("{base}/x")),
            Read::Data(format!("{base}/nope")),
            Read::Children(format!("{base}/nope")),
            Read::Children(format!("{base}/x/y/z")),
        ])
        .unwrap();
    assert_eq!(r.len(), 5);
    match &r[0] {
        ReadResult::Data(d, s) => {
            assert_eq!(d, b"data");
            assert_eq!((s.version, s.num_children), (1, 1));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        r[1..],
        [
            ReadResult::Children(vec!["w".into(), "y".into()]),
            ReadResult::NoNode,
            ReadResult::NoNode,
            ReadResult::Children(vec![]),
        ]
    );
    assert_eq!(c.read_many(&[]).unwrap(), vec![]);
    assert!(matches!(
        c.read_many(&[Read::Data("bad".into())]),
        Err(CoordError::InvalidPath { .. })
    ));
    // More reads than one request carries.
    let many: Vec<Read> = (0..300)
        .map(|_| Read::Data(format!("{base}/x/y")))
        .collect();
    let r = c.read_many(&many).unwrap();
    assert_eq!(r.len(), 300);
    assert!(r
        .iter()
        .all(|x| matches!(x, ReadResult::Data(d, _) if d == b"data")));
}

/// What `create` and `set` return is the node's stat right after that very change, also
/// while other sessions write the same node.
fn suite_returned_stats(new: Factory<'_>, base: &str) {
    let c = new();
    ensure_path(&*c, base).unwrap();
    let n = format!("{base}/n");
    assert_eq!(c.create(&n, b"", NodeKind::Persistent).unwrap().version, 0);
    let versions = std::sync::Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for _ in 0..4 {
            let (n, versions) = (&n, &versions);
            let c = new();
            s.spawn(move || {
                for _ in 0..25 {
                    let v = c.set(n, b"x", None).unwrap().version;
                    versions.lock().unwrap().push(v);
                }
            });
        }
    });
    let mut v = versions.into_inner().unwrap();
    v.sort();
    assert_eq!(
        v,
        (1..=100).collect::<Vec<i32>>(),
        "every set saw its own version"
    );
}

fn run_suite(new: Factory<'_>) {
    suite_versions(new, "/conf/versions");
    suite_multi(new, "/conf/multi");
    suite_ephemeral(new, "/conf/ephemeral");
    suite_watch_order(new, "/conf/watch");
    suite_reads(new, "/conf/reads");
    suite_returned_stats(new, "/conf/stats");
}

fn tempdir() -> tempfile::TempDir {
    scratch_dir("blocklab-coord-")
}

#[test]
fn embedded_conformance() {
    let dir = tempdir();
    let store = EmbeddedStore::open(dir.path().join("coord.store")).unwrap();
    run_suite(&|| Box::new(store.session()));
}

#[test]
fn zookeeper_conformance() {
    if !require_zookeeper() {
        return;
    }
    let zk = ZkServer::start().unwrap();
    let spec = zk.spec("/suite");
    let opts = ConnectOptions::default();
    run_suite(&|| connect(&spec, &opts).unwrap());
}

#[test]
fn embedded_store_persists_and_refuses_corruption() {
    let dir = tempdir();
    let path = dir.path().join("coord.store");
    {
        let store = EmbeddedStore::open(&path).unwrap();
        let c = store.session();
        ensure_path(&c, "/a/b").unwrap();
        c.set("/a/b", b"kept", None).unwrap();
        c.create("/a/eph", b"", NodeKind::Ephemeral).unwrap();
        // The store is owned by one holder at a time.
        assert!(matches!(
            EmbeddedStore::open(&path),
            Err(CoordError::StoreLocked { .. })
        ));
    }
    {
        let c = connect(
            &CoordSpec::Embedded(path.clone()),
            &ConnectOptions::default(),
        )
        .unwrap();
        let (d, s) = c.get("/a/b").unwrap();
        assert_eq!(d, b"kept");
        assert_eq!(s.version, 1);
        assert_eq!(
            c.exists("/a/eph").unwrap(),
            None,
            "ephemerals do not survive"
        );
    }
    // Flip one byte of the body: refused, and the file is left exactly as it was.
    let mut bytes = std::fs::read(&path).unwrap();
    let last = bytes.len() - 2;
    bytes[last] ^= 0x20;
    std::fs::write(&path, &bytes).unwrap();
    let err = EmbeddedStore::open(&path).unwrap_err();
    assert!(matches!(err, CoordError::CorruptStore { .. }), "{err}");
    assert!(err.to_string().contains("checksum"), "{err}");
    assert_eq!(std::fs::read(&path).unwrap(), bytes);
    // Garbage and an empty file are refused too.
    for junk in [&b"hello world"[..], &b""[..]] {
        std::fs::write(&path, junk).unwrap();
        assert!(matches!(
            EmbeddedStore::open(&path),
            Err(CoordError::CorruptStore { .. })
        ));
        assert_eq!(std::fs::read(&path).unwrap(), junk);
    }
}

#[test]
fn connect_shares_an_embedded_store_open_in_this_process() {
    let dir = tempdir();
    let path = dir.path().join("coord.store");
    let spec = CoordSpec::Embedded(path.clone());
    let a = connect(&spec, &ConnectOptions::default()).unwrap();
    // Another spelling of the same file meets the same store.
    let b = connect(
        &CoordSpec::Embedded(dir.path().join(".").join("coord.store")),
        &ConnectOptions::default(),
    )
    .unwrap();
    assert_ne!(a.session_id(), b.session_id());
    let w = b.watch("/").unwrap();
    a.create("/eph", b"", NodeKind::Ephemeral).unwrap();
    assert_eq!(
        b.get("/eph").unwrap().1.ephemeral_owner,
        Some(a.session_id())
    );
    assert_eq!(collect(&w, 1), vec![WatchEvent::Created("/eph".into())]);
    // The store still has one owner: a second explicit open is refused.
    assert!(matches!(
        EmbeddedStore::open(&path),
        Err(CoordError::StoreLocked { .. })
    ));
    drop(a);
    assert_eq!(b.exists("/eph").unwrap(), None, "a's session ended");
    drop((b, w));
    // The last session gone, the store is closed and its lock released.
    let s = EmbeddedStore::open(&path).unwrap();
    // ... and a store opened explicitly is shared with connect too.
    let c = connect(&spec, &ConnectOptions::default()).unwrap();
    c.create("/p", b"", NodeKind::Persistent).unwrap();
    assert!(s.session().exists("/p").unwrap().is_some());
}

/// A store file of format 1 (data as arrays of numbers), written as version 0.x did.
fn v1_store(nodes: &str) -> Vec<u8> {
    let body = format!(r#"{{"nodes":{nodes}}}"#);
    let mut f = format!(
        "BLOCKLAB-COORD 1 crc32c={:08x} len={}\n",
        crc32c::crc32c(body.as_bytes()),
        body.len()
    )
    .into_bytes();
    f.extend_from_slice(body.as_bytes());
    f
}

#[test]
fn embedded_store_reads_format_1_and_writes_data_as_text() {
    let dir = tempdir();
    let path = dir.path().join("coord.store");
    std::fs::write(
        &path,
        v1_store(
            r#"[{"path":"/a","data":[104,105],"version":3},{"path":"/a/b","data":[],"version":0}]"#,
        ),
    )
    .unwrap();
    {
        let store = EmbeddedStore::open(&path).unwrap();
        let c = store.session();
        let (d, s) = c.get("/a").unwrap();
        assert_eq!(
            (d.as_slice(), s.version, s.num_children),
            (&b"hi"[..], 3, 1)
        );
        // The next change writes format 2: UTF-8 data as a string, other bytes as hex.
        c.create("/bin", &[0xff, 0x00, 0x7f], NodeKind::Persistent)
            .unwrap();
        c.create("/json", br#"{"k":"v"}"#, NodeKind::Persistent)
            .unwrap();
    }
    let text = String::from_utf8(std::fs::read(&path).unwrap()).unwrap();
    assert!(text.starts_with("BLOCKLAB-COORD 2 "), "{text}");
    assert!(text.contains(r#""text":"{\"k\":\"v\"}""#), "{text}");
    assert!(text.contains(r#""hex":"ff007f""#), "{text}");
    let store = EmbeddedStore::open(&path).unwrap();
    let c = store.session();
    assert_eq!(c.get("/bin").unwrap().0, vec![0xff, 0x00, 0x7f]);
    assert_eq!(c.get("/a").unwrap().0, b"hi");
    assert_eq!(c.get("/a/b").unwrap().1.version, 0);
    drop((c, store));
    // A format this build does not know, and an orphan node, are refused, untouched.
    for bad in [
        {
            let mut f = v1_store("[]");
            f[15] = b'9';
            f
        },
        v1_store(r#"[{"path":"/x/y","data":[],"version":0}]"#),
    ] {
        std::fs::write(&path, &bad).unwrap();
        let e = EmbeddedStore::open(&path).unwrap_err();
        assert!(matches!(e, CoordError::CorruptStore { .. }), "{e}");
        assert_eq!(std::fs::read(&path).unwrap(), bad);
    }
}

#[test]
fn missing_zookeeper_install_is_a_clear_error() {
    let opts = blocklab::coord::zk_server::ZkServerOptions {
        script: "/nonexistent/zkServer.sh".into(),
        ..Default::default()
    };
    let err = ZkServer::start_with(opts).unwrap_err();
    assert!(err.to_string().contains("not installed"), "{err}");
}

#[test]
fn zookeeper_unreachable_is_a_clear_error() {
    // A port nobody listens on.
    let port = free_port();
    let opts = ConnectOptions {
        connect_deadline: Duration::from_secs(2),
        ..ConnectOptions::default()
    };
    let err = ZkCoord::connect(&format!("127.0.0.1:{port}"), "/", &opts).unwrap_err();
    match &err {
        CoordError::Unreachable { attempts, .. } => assert!(*attempts >= 1),
        e => panic!("expected Unreachable, got {e}"),
    }
    assert!(err.to_string().contains("unreachable"), "{err}");
    assert!(CoordSpec::parse("zk://nohostport").is_err());
}

#[test]
fn zookeeper_restart_keeps_data_and_sessions_reconnect() {
    if !require_zookeeper() {
        return;
    }
    let mut zk = ZkServer::start().unwrap();
    let opts = ConnectOptions {
        session_timeout: Duration::from_secs(10),
        ..ConnectOptions::default()
    };
    let c = ZkCoord::connect(&zk.connect_string(), "/restart", &opts).unwrap();
    ensure_path(&c, "/map/l0").unwrap();
    c.set("/map/l0", b"before", None).unwrap();
    c.create("/gw", b"", NodeKind::Ephemeral).unwrap();
    let w = c.watch("/map").unwrap();
    zk.restart().unwrap();
    c.wait_connected(WAIT).unwrap();
    // Requests work again (retry through the reconnect window).
    let (data, _) = retry("a read after the restart", WAIT, || c.get("/map/l0"));
    assert_eq!(data, b"before");
    assert!(
        c.exists("/gw").unwrap().is_some(),
        "session survived a restart shorter than its timeout"
    );
    c.set("/map/l0", b"after", None).unwrap();
    let mut saw_resync = false;
    next_event(&w, "the change after the restart", WAIT, |e| match e {
        WatchEvent::Resync => {
            saw_resync = true;
            false
        }
        WatchEvent::DataChanged(p) => p == "/map/l0",
        other => {
            eprintln!("event: {other:?}");
            false
        }
    });
    assert!(saw_resync, "a reconnect is reported as Resync");
    // A fresh client sees the same map.
    let d = ZkCoord::connect(&zk.connect_string(), "/restart", &opts).unwrap();
    assert_eq!(d.get("/map/l0").unwrap().0, b"after");
}
