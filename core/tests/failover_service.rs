//! The block service over real sockets and files: epoch fencing (a holder with an older
//! epoch is refused without anything running — never two holders acting on one
//! operation), at-most-once per operation id, delivery to the VIP when the submitter is
//! gone or superseded by a newer holder, recovery of an execution cut short between the
//! catalog commit and the journal's `Done`, lists that do not wait behind copies, and
//! clear errors for bad input.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

use blocklab::failover::dispatcher::Epoch;
use blocklab::failover::journal::{read_records, FileJournal, OpJournal, Record};
use blocklab::failover::service::{JournalSpec, Service, ServiceConfig};
use blocklab::failover::wire::{Conn, Msg, Op, OpResult};
use blocklab::testing::{require_zookeeper, scratch_dir, sparse_file, wait_for_some};
use blocklab::volume::{StoreConfig, VolumeStore};

const MIB: u64 = 1 << 20;

struct Setup {
    dir: tempfile::TempDir,
    svc: Option<Service>,
    /// Stands in for the VIP: where the service delivers orphaned results.
    vip: TcpListener,
}

/// A scratch directory with the service's one device, `d0.img`.
fn with_device() -> tempfile::TempDir {
    let dir = scratch_dir("blocklab-svc-");
    sparse_file(&dir.path().join("d0.img"), 64 * MIB);
    dir
}

fn start() -> Setup {
    start_in(with_device())
}

fn start_in(dir: tempfile::TempDir) -> Setup {
    start_with(dir, JournalSpec::File)
}

fn start_with(dir: tempfile::TempDir, journal: JournalSpec) -> Setup {
    let dev = dir.path().join("d0.img");
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
        journal,
        crash_after_commit: None,
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
    /// The connection on which the service delivers a result to the VIP (fails, rather
    /// than hangs, if nothing is delivered).
    fn delivery(&self) -> Conn {
        self.vip.set_nonblocking(true).unwrap();
        let (v, _) = wait_for_some("a delivery to the VIP", Duration::from_secs(60), || {
            self.vip.accept().ok()
        });
        v.set_nonblocking(false).unwrap();
        v.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        Conn::new(v).unwrap()
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
    submit_on(&mut c, op_id, op, e);
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
    let mut vc = s.delivery();
    match vc.recv().unwrap() {
        Msg::Deliver { op_id, op, result } => {
            assert_eq!(op_id, "cp");
            assert!(matches!(op, Op::Copy { .. }));
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

fn copy(src: &str, dst: &str) -> Op {
    Op::Copy {
        src: src.into(),
        dst: dst.into(),
    }
}

fn submit_on(c: &mut Conn, op_id: &str, op: Op, e: Epoch) {
    c.send(&Msg::Submit {
        op_id: op_id.into(),
        op,
        epoch: e,
        node: e.node,
        session_bound: false,
        tag: None,
    })
    .unwrap();
}

/// The holder's host dies mid-copy without closing its connection (no FIN, no RST: the
/// connection stays open and silent). When a newer holder claims the VIP, the service
/// orphans the old submission and delivers the result to the VIP by itself — nobody
/// re-sends the operation here, so the `Deliver` can only come from that orphaning.
#[test]
fn a_newer_claim_orphans_a_silent_submitter_and_the_result_goes_to_the_vip() {
    let s = start();
    let (e1, e2) = (epoch(1, 0), epoch(2, 1));
    claim(&s, e1);
    submit(&s, "c1", create("src"), e1);
    let mut dead_host = s.conn();
    submit_on(&mut dead_host, "cp", copy("src", "dst"), e1);
    assert!(matches!(dead_host.recv().unwrap(), Msg::Accepted { .. }));
    // `dead_host` is neither read nor closed from now on.
    assert!(matches!(claim(&s, e2), Msg::Ack { .. }));
    let mut vc = s.delivery();
    match vc.recv().unwrap() {
        Msg::Deliver { op_id, op, result } => {
            assert_eq!(op_id, "cp");
            assert_eq!(op, copy("src", "dst"));
            assert!(matches!(result, OpResult::Copied { bytes, .. } if bytes == 4 * MIB));
            vc.send(&Msg::Ack { op_id }).unwrap();
        }
        other => panic!("{other:?}"),
    }
    let started = s
        .journal()
        .iter()
        .filter(|r| matches!(r, Record::Started { op_id, .. } if op_id == "cp"))
        .count();
    assert_eq!(started, 1, "delivered, not re-run");
    drop(dead_host);
}

/// The service dies after the catalog commit of an operation and before the journal's
/// `Done` (the state such a crash leaves is built here directly: the store commits the
/// volume with its operation id, the journal has only `Started`). On restart the result
/// comes from the catalog: delivered, not re-run, and not reported as a failure.
#[test]
fn an_execution_cut_short_after_the_catalog_commit_is_done_not_rerun() {
    let dir = with_device();
    let state = dir.path().join("state");
    let e = epoch(3, 1);
    {
        let mut st = VolumeStore::open(
            &state,
            &[dir.path().join("d0.img")],
            StoreConfig::default(),
            false,
        )
        .unwrap();
        let mut j = FileJournal::open(&state.join("journal.jsonl")).unwrap();
        j.append(Record::Epoch { epoch: e }).unwrap();
        j.append(Record::Started {
            op_id: "mk".into(),
            op: create("v"),
            epoch: e,
            node: 1,
            tag: None,
        })
        .unwrap();
        st.create("v", 4 * MIB, Some("mk")).unwrap();
        // (crash: no Done record)
    }
    let s = start_in(dir);
    assert_eq!(
        submit(&s, "mk", create("v"), e),
        Msg::Reply {
            op_id: "mk".into(),
            result: OpResult::Created {
                name: "v".into(),
                size: 4 * MIB
            }
        }
    );
    let recs = s.journal();
    let n = |f: &dyn Fn(&Record) -> bool| recs.iter().filter(|r| f(r)).count();
    assert_eq!(
        n(&|r| matches!(r, Record::Started { op_id, .. } if op_id == "mk")),
        1
    );
    assert_eq!(
        n(&|r| matches!(r, Record::Done { op_id, .. } if op_id == "mk")),
        1
    );
    assert_eq!(n(&|r| matches!(r, Record::Aborted { .. })), 0);
}

/// A list is answered from the service's snapshot while a copy runs (it does not wait for
/// the copy), and the submitter of the copy hears `Accepted` again while it runs.
#[test]
fn list_does_not_wait_behind_a_copy_and_the_copy_sends_keepalives() {
    let s = start();
    let e = epoch(1, 0);
    claim(&s, e);
    let size = 16 * MIB; // 2 s at the test's 8 MiB/s copy cap
    submit(
        &s,
        "c1",
        Op::Create {
            name: "src".into(),
            size,
        },
        e,
    );
    let mut c = s.conn();
    submit_on(&mut c, "cp", copy("src", "dst"), e);
    assert!(matches!(c.recv().unwrap(), Msg::Accepted { .. }));
    let mut l = s.conn();
    l.send(&Msg::List).unwrap();
    match l.recv().unwrap() {
        Msg::Listed { volumes } => {
            let names: Vec<_> = volumes.iter().map(|v| v.name.as_str()).collect();
            assert_eq!(names, vec!["src"], "the copy has not finished");
        }
        other => panic!("{other:?}"),
    }
    assert!(
        !s.journal()
            .iter()
            .any(|r| matches!(r, Record::Done { op_id, .. } if op_id == "cp")),
        "the list was answered while the copy was still running"
    );
    let mut keepalives = 0;
    let result = loop {
        match c.recv().unwrap() {
            Msg::Accepted { .. } => keepalives += 1,
            Msg::Reply { result, .. } => break result,
            other => panic!("{other:?}"),
        }
    };
    assert!(matches!(result, OpResult::Copied { .. }), "{result:?}");
    assert!(keepalives >= 1, "Accepted repeated while the copy ran");
}

#[test]
fn an_over_long_request_gets_one_refusal_line() {
    let s = start();
    let mut raw = TcpStream::connect(s.addr()).unwrap();
    let mut big = vec![b' '; blocklab::failover::wire::MAX_LINE + 100];
    big.push(b'\n');
    let _ = raw.write_all(&big);
    let mut line = String::new();
    BufReader::new(&raw).read_line(&mut line).unwrap();
    assert!(line.contains("malformed request"), "{line}");
    assert!(line.contains("longer than"), "{line}");
}

/// The journal becomes unwritable (its ZooKeeper server stops) while a copy runs: the copy's
/// outcome cannot be recorded, so the submitter gets no answer at all (not the unrecorded
/// result, and not an error, which would be final although the copy was committed): its
/// connection closes, so its client sends again. The service stops with an error instead of
/// leaving the operation running forever.
#[test]
fn a_journal_write_failure_after_execution_stops_the_service_with_an_error() {
    if !require_zookeeper() {
        return;
    }
    use blocklab::coord::zk_server::ZkServer;
    let mut zk = ZkServer::start().expect("a private ZooKeeper server");
    let mut s = start_with(
        with_device(),
        JournalSpec::Coord {
            spec: zk.spec("/svc"),
            root: "/fo".into(),
        },
    );
    let e = epoch(1, 0);
    assert!(matches!(claim(&s, e), Msg::Ack { .. }));
    submit(
        &s,
        "c1",
        Op::Create {
            name: "src".into(),
            size: 8 * MIB,
        },
        e,
    );
    let mut c = s.conn();
    submit_on(&mut c, "cp", copy("src", "dst"), e);
    assert!(matches!(c.recv().unwrap(), Msg::Accepted { .. }));
    zk.stop();
    loop {
        match c.recv() {
            Ok(Msg::Accepted { .. }) => continue,
            Ok(other) => panic!("a final answer for an unrecorded outcome: {other:?}"),
            Err(_) => break, // closed without an answer
        }
    }
    let svc = s.svc.take().unwrap();
    let err = svc
        .wait(&std::sync::atomic::AtomicBool::new(false))
        .unwrap_err();
    assert!(err.to_string().contains("journal"), "{err}");
}
