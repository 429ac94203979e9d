//! A management node over real sockets (one-node cluster, loopback VIP, a real block
//! service): results delivered to the VIP are answered from the node's cache only for the
//! same operation (an operation id re-used with other arguments is refused), `List` is
//! forwarded, and malformed lines get one refusal.

use std::io::{BufRead, BufReader, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use blocklab::failover::client::Client;
use blocklab::failover::dispatcher::Timing;
use blocklab::failover::journal::{read_records, Record};
use blocklab::failover::node::{run_node, Mode, NodeConfig};
use blocklab::failover::service::{JournalSpec, Service, ServiceConfig};
use blocklab::failover::vip::VipBackend;
use blocklab::failover::wire::{Conn, Msg, Op, OpResult};
use blocklab::testing::{free_port, scratch_dir, sparse_file, wait_for};
use blocklab::volume::StoreConfig;

const MIB: u64 = 1 << 20;

#[test]
fn delivered_results_are_answered_only_for_the_same_operation() {
    let dir = scratch_dir("blocklab-node-");
    let dev = sparse_file(&dir.path().join("d0.img"), 64 * MIB);
    let vip_ip = IpAddr::V4(Ipv4Addr::new(127, 88, (std::process::id() % 200) as u8, 1));
    let vip = SocketAddr::new(vip_ip, free_port());
    let svc = Service::start(ServiceConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        vip,
        state_dir: dir.path().join("state"),
        devices: vec![dev],
        store: StoreConfig::default(),
        force: false,
        deliver_for: Duration::from_secs(10),
        copy_rate: None,
        session_timeout: Duration::from_secs(5),
        journal: JournalSpec::File,
        crash_after_commit: None,
    })
    .unwrap();
    let hb = UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let node = {
        let cfg = NodeConfig {
            id: 0,
            peers: vec![(0, hb)],
            service: svc.addr,
            vip: VipBackend::Loopback { vip: vip_ip },
            port: vip.port(),
            listen: vip,
            mode: Mode::VipHandoff,
            heartbeat: Duration::from_millis(20),
            timing: Timing::default(),
        };
        let stop = stop.clone();
        thread::spawn(move || run_node(cfg, stop))
    };
    wait_for("the node to take the VIP", Duration::from_secs(30), || {
        TcpStream::connect(vip).is_ok()
    });
    let create = |name: &str| Op::Create {
        name: name.into(),
        size: 4 * MIB,
    };
    // The service delivers a result for "d1" (its submitter died).
    let mut c = Conn::new(TcpStream::connect(vip).unwrap()).unwrap();
    c.send(&Msg::Deliver {
        op_id: "d1".into(),
        op: create("x"),
        result: OpResult::Created {
            name: "x".into(),
            size: 4 * MIB,
        },
    })
    .unwrap();
    assert_eq!(c.recv().unwrap(), Msg::Ack { op_id: "d1".into() });
    let mut cl = Client::new(vec![vip]);
    cl.give_up = Duration::from_secs(30);
    // The same id with other arguments: refused, not answered with x's result.
    let (r, _) = cl.call("d1", &create("other"), None).unwrap();
    match r {
        OpResult::Error { message } => {
            assert!(message.contains("different arguments"), "{message}")
        }
        other => panic!("answered from the cache for another operation: {other:?}"),
    }
    // The same operation: answered from the cache.
    let (r, _) = cl.call("d1", &create("x"), None).unwrap();
    assert_eq!(
        r,
        OpResult::Created {
            name: "x".into(),
            size: 4 * MIB
        }
    );
    let recs = read_records(&dir.path().join("state/journal.jsonl")).unwrap();
    assert!(
        !recs
            .iter()
            .any(|r| matches!(r, Record::Started { op_id, .. } if op_id == "d1")),
        "neither request reached the service"
    );
    // A real operation, then a list through the node.
    let (r, _) = cl.call("c1", &create("v"), None).unwrap();
    assert!(r.is_ok(), "{r:?}");
    let names: Vec<String> = cl.list().unwrap().into_iter().map(|v| v.name).collect();
    assert_eq!(names, vec!["v".to_string()]);
    // A malformed line: one refusal.
    let mut raw = TcpStream::connect(vip).unwrap();
    raw.write_all(b"{\"msg\":\"request\"}\n").unwrap();
    let mut line = String::new();
    BufReader::new(&raw).read_line(&mut line).unwrap();
    assert!(line.contains("malformed request"), "{line}");

    stop.store(true, Ordering::Relaxed);
    node.join().unwrap().unwrap();
    svc.stop();
}
