//! The block service over real sockets and files: epoch fencing (a holder with an older
//! epoch is refused without anything running — never two holders acting on one
//! operation), at-most-once per operation id, delivery to the VIP when the submitter is
//! gone, and clear errors for bad input.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

use blocklab::failover::dispatcher::Epoch;
use blocklab::failover::journal::{read_records, Record};
use blocklab::failover::service::{JournalSpec, Service, ServiceConfig};
use blocklab::failover::wire::{Conn, Msg, Op, OpResult};
use blocklab::testing::sparse_file;
use blocklab::volume::StoreConfig;

const MIB: u64 = 1 << 20;

struct Setup {
    dir: tempfile::TempDir,
    svc: Option<Service>,
    /// Stands in for the VIP: where the service delivers orphaned results.
    vip: TcpListener,
}

fn start() -> Setup {
    let dir = tempfile::Builder::new()
        .prefix("blocklab-svc-")
        .tempdir_in("/var/tmp")
        .unwrap();
    let dev = dir.path().join("d0.img");
    sparse_file(&dev, 64 * MIB);
    let vip = TcpListener::bind("127.0.0.1:0").unwrap();
    let svc = Service::start(ServiceConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        vip: vip.local_addr().unwrap(),
        state_dir: dir.path().join("state"),
        devices: vec![dev],
        store: StoreConfig::default(),
        force: false,
        deliver_for: Duration::from_secs(60),
        copy_rate: Some(8 * MIB),
        session_timeout: Duration::from_secs(5),
        journal: JournalSpec::File,
    })
    .unwrap();
    Setup {
        dir,
        svc: Some(svc),
        vip,
    }
}

impl Setup {
    fn addr(&self) -> SocketAddr {
        self.svc.as_ref().unwrap().addr
    }
    fn conn(&self) -> Conn {
        let s = TcpStream::connect(self.addr()).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        Conn::new(s).unwrap()
    }
    fn journal(&self) -> Vec<Record> {
        read_records(&self.dir.path().join("state/journal.jsonl")).unwrap()
    }
}

impl Drop for Setup {
    fn drop(&mut self) {
        if let Some(s) = self.svc.take() {
            s.stop();
        }
    }
}

fn epoch(counter: u64, node: u32) -> Epoch {
    Epoch { counter, node }
}

fn claim(s: &Setup, e: Epoch) -> Msg {
    let mut c = s.conn();
    c.send(&Msg::Claim {
        epoch: e,
        node: e.node,
    })
    .unwrap();
    c.recv().unwrap()
}

/// Submits and returns the final message (Reply or Fenced), skipping `Accepted`.
fn submit(s: &Setup, op_id: &str, op: Op, e: Epoch) -> Msg {
    let mut c = s.conn();
    c.send(&Msg::Submit {
        op_id: op_id.into(),
        op,
        epoch: e,
        node: e.node,
        session_bound: false,
        tag: None,
    })
    .unwrap();
    loop {
        match c.recv().unwrap() {
            Msg::Accepted { .. } => continue,
            m => return m,
        }
    }
}

fn create(name: &str) -> Op {
    Op::Create {
        name: name.into(),
        size: 4 * MIB,
    }
}

#[test]
fn an_older_holder_is_fenced_and_runs_nothing() {
    let s = start();
    let (e1, e2) = (epoch(1, 0), epoch(2, 1));
    assert!(matches!(claim(&s, e1), Msg::Ack { .. }));
    assert!(matches!(
        submit(&s, "a", create("a"), e1),
        Msg::Reply {
            result: OpResult::Created { .. },
            ..
        }
    ));
    // Node 1 takes over with a newer epoch; node 0 (cut off, still believing it holds)
    // tries to act: refused, nothing started.
    assert!(matches!(claim(&s, e2), Msg::Ack { .. }));
    assert_eq!(
        submit(&s, "b", create("b"), e1),
        Msg::Fenced {
            op_id: "b".into(),
            current: e2
        }
    );
    assert!(matches!(claim(&s, e1), Msg::Fenced { .. }), "no going back");
    // Even resubmitting an id the old holder started is answered only to the new holder.
    assert!(matches!(
        submit(&s, "a", create("a"), e1),
        Msg::Fenced { .. }
    ));
    assert!(matches!(
        submit(&s, "a", create("a"), e2),
        Msg::Reply {
            result: OpResult::Created { .. },
            ..
        }
    ));
    let started: Vec<String> = s
        .journal()
        .into_iter()
        .filter_map(|r| match r {
            Record::Started { op_id, .. } => Some(op_id),
            _ => None,
        })
        .collect();
    assert_eq!(started, vec!["a".to_string()], "b never ran, a ran once");
}

#[test]
fn a_result_whose_submitter_died_is_delivered_to_the_vip_and_kept() {
    let s = start();
    let e = epoch(1, 0);
    claim(&s, e);
    submit(&s, "c1", create("src"), e);
    // Submit a copy (slow: capped at 8 MiB/s) and drop the connection at once: the holder
    // "died" after submitting.
    {
        let mut c = s.conn();
        c.send(&Msg::Submit {
            op_id: "cp".into(),
            op: Op::Copy {
                src: "src".into(),
                dst: "dst".into(),
            },
            epoch: e,
            node: 0,
            session_bound: false,
            tag: None,
        })
        .unwrap();
        assert!(matches!(c.recv().unwrap(), Msg::Accepted { .. }));
    }
    // The VIP (whoever holds it now) receives the result and acknowledges it.
    s.vip.set_nonblocking(false).unwrap();
    let (v, _) = s.vip.accept().unwrap();
    v.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let mut vc = Conn::new(v).unwrap();
    match vc.recv().unwrap() {
        Msg::Deliver { op_id, result } => {
            assert_eq!(op_id, "cp");
            assert!(matches!(result, OpResult::Copied { bytes, .. } if bytes == 4 * MIB));
            vc.send(&Msg::Ack { op_id }).unwrap();
        }
        other => panic!("{other:?}"),
    }
    // A re-send of the same id gets the same result without running again.
    let again = submit(
        &s,
        "cp",
        Op::Copy {
            src: "src".into(),
            dst: "dst".into(),
        },
        e,
    );
    assert!(matches!(
        again,
        Msg::Reply {
            result: OpResult::Copied { .. },
            ..
        }
    ));
    let n = s
        .journal()
        .iter()
        .filter(|r| matches!(r, Record::Started { op_id, .. } if op_id == "cp"))
        .count();
    assert_eq!(n, 1);
}

#[test]
fn bad_input_gets_one_line_errors() {
    let s = start();
    let e = epoch(1, 0);
    claim(&s, e);
    submit(&s, "x", create("v"), e);
    let before = s.journal().len();
    let err = |m: Msg| match m {
        Msg::Reply {
            result: OpResult::Error { message },
            ..
        } => message,
        other => panic!("expected an error, got {other:?}"),
    };
    let m = err(submit(&s, "x", create("other"), e));
    assert!(m.contains("already used with different arguments"), "{m}");
    let m = err(submit(&s, "", create("w"), e));
    assert!(m.contains("operation id"), "{m}");
    // A malformed line.
    let mut raw = TcpStream::connect(s.addr()).unwrap();
    raw.write_all(b"{\"msg\":\"submit\",\"op_id\":3}\n")
        .unwrap();
    let mut line = String::new();
    BufReader::new(&raw).read_line(&mut line).unwrap();
    assert!(line.contains("malformed request"), "{line}");
    assert_eq!(s.journal().len(), before, "nothing was recorded");
}
