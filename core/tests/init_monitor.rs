//! The monitor end to end over real TCP sockets: restart keeps the map, concurrent batch
//! allocation returns distinct smallest-free ids, bad input gets clear errors, one
//! monitor per journal, a corrupt journal is refused, stopping answers every client.

use std::net::TcpListener;
use std::time::Duration;

use blocklab::monitor::{
    DaemonState, FileJournal, Monitor, MonitorClient, MonitorError, Outcome, ProposeConfig, Slot,
};
use blocklab::testing::{free_port, require_zookeeper, scratch, wait_for};
use uuid::Uuid;

fn try_start(journal: &std::path::Path, interval_ms: u64) -> Result<Monitor, MonitorError> {
    Monitor::start(
        TcpListener::bind("127.0.0.1:0").unwrap(),
        Box::new(FileJournal::new(journal)),
        ProposeConfig::with_interval(Duration::from_millis(interval_ms)),
        None,
    )
}

fn start(journal: &std::path::Path, interval_ms: u64) -> Monitor {
    try_start(journal, interval_ms).unwrap()
}

fn client(m: &Monitor) -> MonitorClient {
    MonitorClient::connect(&m.addr().to_string(), Duration::from_secs(30)).unwrap()
}

#[test]
fn restart_keeps_the_map() {
    let dir = scratch();
    let j = dir.path().join("mon.journal");
    let m = start(&j, 20);
    let mut c = client(&m);
    let devs: Vec<String> = (0..3).map(|i| format!("/dev/fake{i}")).collect();
    let ids = c.alloc("node-a", &devs).unwrap();
    assert_eq!(ids, vec![0, 1, 2]);
    let u = c.map().unwrap().daemons[&0]
        .uuid
        .expect("allocation gives a uuid");
    c.register(0, u, "key0").unwrap();
    c.report(0, Outcome::Up).unwrap();
    c.report(
        1,
        Outcome::Failed {
            reason: "device refused".into(),
        },
    )
    .unwrap();
    let before = c.map().unwrap();
    assert_eq!(before.epoch, 4);
    drop(c);
    m.stop();

    let m = start(&j, 20);
    let mut c = client(&m);
    let after = c.map().unwrap();
    assert_eq!(after, before);
    assert_eq!(after.daemons[&0].state, DaemonState::Up);
    assert_eq!(after.daemons[&0].uuid, Some(u));
    assert_eq!(after.daemons[&0].key.as_deref(), Some("key0"));
    assert_eq!(after.daemons[&1].state, DaemonState::Failed);
    assert_eq!(after.daemons[&2].state, DaemonState::New);
    // New proposals continue from the restored epoch.
    assert_eq!(c.alloc("node-b", &["/dev/x".into()]).unwrap(), vec![3]);
    assert_eq!(c.ping().unwrap(), 5);
}

#[test]
fn concurrent_batch_allocation_gives_distinct_smallest_free_ids() {
    let dir = scratch();
    let m = start(&dir.path().join("j"), 30);
    let addr = m.addr().to_string();
    // Make holes: allocate 0..6, remove 1 and 4.
    let mut c = client(&m);
    let pre: Vec<String> = (0..6).map(|i| format!("/pre{i}")).collect();
    c.alloc("pre", &pre).unwrap();
    c.remove(1).unwrap();
    c.remove(4).unwrap();
    let epoch0 = c.ping().unwrap();
    let threads: Vec<_> = (0..8)
        .map(|t| {
            let addr = addr.clone();
            std::thread::spawn(move || {
                let mut c = MonitorClient::connect(&addr, Duration::from_secs(30)).unwrap();
                let devs: Vec<String> = (0..3).map(|i| format!("/dev/n{t}d{i}")).collect();
                c.alloc(&format!("node{t}"), &devs).unwrap()
            })
        })
        .collect();
    let mut all: Vec<u32> = threads
        .into_iter()
        .flat_map(|t| t.join().unwrap())
        .collect();
    all.sort_unstable();
    let mut expected = vec![1, 4];
    expected.extend(6..28);
    assert_eq!(all, expected);
    let map = c.map().unwrap();
    assert_eq!(map.daemons.len(), 4 + 24);
    // 24 allocations in 8 requests were batched into fewer proposals than requests.
    assert!(map.epoch - epoch0 <= 8);
}

#[test]
fn bad_requests_get_clear_errors() {
    let dir = scratch();
    let m = start(&dir.path().join("j"), 0);
    let mut c = client(&m);
    let e = c.register(42, Uuid::new_v4(), "k").unwrap_err();
    assert!(e.to_string().contains("unknown daemon id 42"), "{e}");
    let e = c.report(7, Outcome::Up).unwrap_err();
    assert!(e.to_string().contains("unknown daemon id 7"), "{e}");
    c.alloc("a", &["/d".into()]).unwrap();
    let e = c.report(0, Outcome::Up).unwrap_err();
    assert!(e.to_string().contains("must be formatted"), "{e}");
    // While daemon 0 is not up, allocating its device again is a rerun: the same id.
    assert_eq!(c.alloc("a", &["/d".into()]).unwrap(), vec![0]);
    // Registration with another uuid than the allocation gave is refused.
    let e = c.register(0, Uuid::new_v4(), "k").unwrap_err();
    assert!(e.to_string().contains("allocated with uuid"), "{e}");
    let u = c.map().unwrap().daemons[&0].uuid.unwrap();
    c.register(0, u, "k").unwrap();
    // A repeated registration of the same daemon is accepted, another uuid is not.
    c.register(0, u, "k2").unwrap();
    let e = c.register(0, Uuid::new_v4(), "k").unwrap_err();
    assert!(e.to_string().contains("registered with uuid"), "{e}");
    c.report(0, Outcome::Up).unwrap();
    let e = c.alloc("a", &["/d".into()]).unwrap_err();
    assert!(
        e.to_string().contains("already belongs to daemon 0 (up)"),
        "{e}"
    );
    // Two nodes of one host with the same device.
    let slot = |node: &str| Slot {
        node: node.into(),
        device: "/dev/sdx".into(),
        host: "h1".into(),
    };
    c.alloc_batch(&[slot("n1")]).unwrap();
    let e = c.alloc_batch(&[slot("n2")]).unwrap_err();
    assert!(
        e.to_string()
            .contains("device /dev/sdx of host h1 (node n1) already belongs to daemon 1"),
        "{e}"
    );
    // Nothing of the refused requests reached the map.
    let map = c.map().unwrap();
    assert_eq!(map.daemons.len(), 2);
    assert_eq!(map.daemons[&0].state, DaemonState::Up);
    assert_eq!(map.daemons[&0].uuid, Some(u));
    assert_eq!(map.daemons[&0].key.as_deref(), Some("k2"));
}

#[test]
fn one_monitor_per_journal_and_a_corrupt_journal_is_refused() {
    let dir = scratch();
    let j = dir.path().join("mon.journal");
    let m = start(&j, 0);
    let mut c = client(&m);
    c.alloc("n", &["/d0".into(), "/d1".into()]).unwrap();
    // A second monitor on the same journal is refused while the first runs.
    let e = try_start(&j, 0).unwrap_err();
    assert!(e.to_string().contains("in use"), "{e}");
    let before = c.map().unwrap();
    drop(c);
    m.stop();
    // A complete last line whose checksum does not match is not a torn append: refused,
    // not cut.
    let text = std::fs::read_to_string(&j).unwrap();
    let damaged = text.replacen("/d1", "/d9", 1);
    assert_ne!(damaged, text);
    std::fs::write(&j, &damaged).unwrap();
    let e = try_start(&j, 0).unwrap_err();
    assert!(
        matches!(e, MonitorError::JournalCorrupt { line: 2, .. }),
        "{e}"
    );
    assert_eq!(std::fs::read_to_string(&j).unwrap(), damaged);
    // Repaired, it replays to the same map.
    std::fs::write(&j, &text).unwrap();
    let m = start(&j, 0);
    assert_eq!(m.map(), before);
}

#[test]
fn stopping_answers_a_client_whose_change_waits_for_the_interval() {
    let dir = scratch();
    // An hour between proposals: the second change cannot be committed before the stop.
    let m = start(&dir.path().join("j"), 3_600_000);
    let mut c = client(&m);
    c.alloc("n", &["/d0".into()]).unwrap();
    let addr = m.addr().to_string();
    let waiting = std::thread::spawn(move || {
        let mut c = MonitorClient::connect(&addr, Duration::from_secs(30)).unwrap();
        c.alloc("n", &["/d1".into()])
    });
    wait_for("the change to be staged", Duration::from_secs(30), || {
        m.waiting() == 1
    });
    // Another client is connected and idle: stop must not wait for it either.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        m.stop();
        let _ = tx.send(());
    });
    wait_for("stop to return", Duration::from_secs(60), || {
        rx.try_recv().is_ok()
    });
    let e = waiting.join().unwrap().unwrap_err();
    assert!(
        e.to_string()
            .contains("the monitor stopped before the change was committed"),
        "{e}"
    );
    // Nothing of it was committed: a restart has the first allocation only.
    let m = start(&dir.path().join("j"), 0);
    assert_eq!(m.map().daemons.len(), 1);
    drop(c);
}

#[test]
fn unreachable_monitor_fails_after_a_bounded_retry() {
    // A port nobody listens on: bind, note it, close.
    let port = free_port();
    let e = MonitorClient::connect(&format!("127.0.0.1:{port}"), Duration::from_millis(300))
        .unwrap_err();
    assert!(matches!(e, MonitorError::Unreachable { attempts, .. } if attempts >= 2));
    assert!(e.to_string().contains("unreachable"), "{e}");
}

/// The monitor on the coordination backend: allocate, restart, same map; a second
/// writer of the same map is detected.
fn restart_on_coord(spec: &blocklab::coord::CoordSpec) {
    use blocklab::coord::{connect, ConnectOptions};
    use blocklab::monitor::CoordStore;
    let path = format!("/blocklab-test/{}/map", Uuid::new_v4().simple());
    let open = || {
        let c = connect(spec, &ConnectOptions::default()).unwrap();
        Box::new(CoordStore::new(c, &path))
    };
    let start = |store| {
        Monitor::start(
            TcpListener::bind("127.0.0.1:0").unwrap(),
            store,
            ProposeConfig::with_interval(Duration::from_millis(10)),
            None,
        )
        .unwrap()
    };
    let m = start(open());
    let mut c = client(&m);
    let ids = c
        .alloc("n", &["/dev/a".to_string(), "/dev/b".to_string()])
        .unwrap();
    let u = c.map().unwrap().daemons[&ids[0]].uuid.unwrap();
    c.register(ids[0], u, "k").unwrap();
    c.report(ids[0], Outcome::Up).unwrap();
    let before = c.map().unwrap();
    drop(c);
    m.stop();
    let m = start(open());
    let mut c = client(&m);
    assert_eq!(c.map().unwrap(), before);
    assert_eq!(before.daemons[&0].state, DaemonState::Up);
    // Someone else rewrites the map behind the monitor's back: its next commit fails
    // (version check) and the monitor stops instead of overwriting.
    {
        use blocklab::monitor::MapStore;
        let mut other = CoordStore::new(
            blocklab::coord::connect(spec, &ConnectOptions::default()).unwrap(),
            &path,
        );
        let mut next = other.load().unwrap().unwrap();
        next.epoch += 1;
        other.commit(&next, &[]).unwrap();
    }
    let e = c.alloc("n", &["/dev/c".to_string()]).unwrap_err();
    assert!(e.to_string().contains("commit failed"), "{e}");
    let e = c.ping().unwrap_err();
    assert!(e.to_string().contains("stopped"), "{e}");
    // The monitor says why it stopped, and stops (drop) without hanging.
    let e = m.wait();
    assert!(matches!(e, MonitorError::Stopped(_)), "{e}");
    assert!(e.to_string().contains("commit failed"), "{e}");
    drop(m);
}

#[test]
fn restart_keeps_the_map_on_the_embedded_coord_backend() {
    let dir = scratch();
    // Embedded stores are owned by one process at a time; every session here lives in this
    // process (connect hands out sessions of the store already open), so a second writer
    // of the map can be tried too.
    let spec = blocklab::coord::CoordSpec::Embedded(dir.path().join("coord.store"));
    restart_on_coord(&spec);
}

#[test]
fn restart_keeps_the_map_on_zookeeper() {
    if !require_zookeeper() {
        return;
    }
    let zk = blocklab::coord::zk_server::ZkServer::start().unwrap();
    restart_on_coord(&zk.spec("/"));
}
