//! The monitor end to end over real TCP sockets: restart keeps the map, concurrent batch
//! allocation returns distinct smallest-free ids, bad input gets clear errors.

use std::net::TcpListener;
use std::time::Duration;

use blocklab::monitor::{
    DaemonState, FileJournal, Monitor, MonitorClient, MonitorError, Outcome, ProposeConfig,
};
use uuid::Uuid;

fn start(journal: &std::path::Path, interval_ms: u64) -> Monitor {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    Monitor::start(
        l,
        Box::new(FileJournal::new(journal)),
        ProposeConfig::with_interval(Duration::from_millis(interval_ms)),
        None,
    )
    .unwrap()
}

fn client(m: &Monitor) -> MonitorClient {
    MonitorClient::connect(&m.addr().to_string(), Duration::from_secs(30)).unwrap()
}

#[test]
fn restart_keeps_the_map() {
    let dir = tempfile::tempdir().unwrap();
    let j = dir.path().join("mon.journal");
    let m = start(&j, 20);
    let mut c = client(&m);
    let devs: Vec<String> = (0..3).map(|i| format!("/dev/fake{i}")).collect();
    let ids = c.alloc("node-a", &devs).unwrap();
    assert_eq!(ids, vec![0, 1, 2]);
    let u = Uuid::new_v4();
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
    let dir = tempfile::tempdir().unwrap();
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
    let dir = tempfile::tempdir().unwrap();
    let m = start(&dir.path().join("j"), 0);
    let mut c = client(&m);
    let e = c.register(42, Uuid::new_v4(), "k").unwrap_err();
    assert!(e.to_string().contains("unknown daemon id 42"), "{e}");
    let e = c.report(7, Outcome::Up).unwrap_err();
    assert!(e.to_string().contains("unknown daemon id 7"), "{e}");
    c.alloc("a", &["/d".into()]).unwrap();
    let e = c.alloc("a", &["/d".into()]).unwrap_err();
    assert!(e.to_string().contains("already belongs to daemon 0"), "{e}");
    let e = c.report(0, Outcome::Up).unwrap_err();
    assert!(e.to_string().contains("must be formatted"), "{e}");
    // Nothing of the refused requests reached the map.
    let map = c.map().unwrap();
    assert_eq!(map.daemons.len(), 1);
    assert_eq!(map.daemons[&0].state, DaemonState::New);
}

#[test]
fn unreachable_monitor_fails_after_a_bounded_retry() {
    // A port nobody listens on: bind, note it, close.
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let e = MonitorClient::connect(&format!("127.0.0.1:{port}"), Duration::from_millis(300))
        .unwrap_err();
    assert!(matches!(e, MonitorError::Unreachable { attempts, .. } if attempts >= 2));
    assert!(e.to_string().contains("unreachable"), "{e}");
}
