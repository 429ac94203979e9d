//! The operation journal in both places it can live: a file, and the coordination backend
//! (the embedded store and a private ZooKeeper server). Each: states and the epoch survive a
//! reopen; in the coordination backend a second writer cannot start an operation id that
//! another has started (at most once across writers).

use blocklab::coord::zk_server::ZkServer;
use blocklab::coord::{connect, ConnectOptions, CoordSpec};
use blocklab::failover::coord_journal::CoordJournal;
use blocklab::failover::dispatcher::Epoch;
use blocklab::failover::journal::{FileJournal, OpJournal, OpState, Record};
use blocklab::failover::wire::{Op, OpResult};
use blocklab::testing::{require_zookeeper, scratch};

fn started(id: &str, e: Epoch) -> Record {
    Record::Started {
        op_id: id.into(),
        op: Op::Create {
            name: format!("v-{id}"),
            size: 4096,
        },
        epoch: e,
        node: e.node,
        tag: Some(id.into()),
    }
}

/// Writes a few records through `open()`, reopens, and checks what came back.
fn exercise(open: &dyn Fn() -> Box<dyn OpJournal>) {
    let e1 = Epoch {
        counter: 1,
        node: 0,
    };
    let e2 = Epoch {
        counter: 2,
        node: 1,
    };
    {
        let mut j = open();
        j.append(Record::Epoch { epoch: e1 }).unwrap();
        j.append(started("a/1", e1)).unwrap(); // ids may hold any characters
        j.append(Record::Done {
            op_id: "a/1".into(),
            result: OpResult::Created {
                name: "v-a/1".into(),
                size: 4096,
            },
            bytes: 0,
        })
        .unwrap();
        j.append(Record::Epoch { epoch: e2 }).unwrap();
        j.append(started("b", e2)).unwrap();
        j.append(started("c", e2)).unwrap();
        j.append(Record::Aborted {
            op_id: "c".into(),
            bytes: 7,
        })
        .unwrap();
    }
    let j = open();
    assert_eq!(j.max_epoch(), e2);
    assert!(matches!(
        j.state("a/1"),
        Some(OpState::Done {
            result: OpResult::Created { .. },
            ..
        })
    ));
    assert!(matches!(j.state("b"), Some(OpState::Running { .. })));
    assert!(matches!(j.state("c"), Some(OpState::Aborted { .. })));
    assert_eq!(j.running(), vec!["b".to_string()]);
    assert!(j.state("zzz").is_none());
}

#[test]
fn file_journal_survives_reopen() {
    let dir = scratch();
    let p = dir.path().join("journal.jsonl");
    exercise(&|| Box::new(FileJournal::open(&p).unwrap()));
}

#[test]
fn coord_journal_on_the_embedded_store_survives_reopen() {
    let dir = scratch();
    let spec = CoordSpec::Embedded(dir.path().join("coord.store"));
    exercise(&|| {
        let c = connect(&spec, &ConnectOptions::default()).unwrap();
        Box::new(CoordJournal::open(c, "/blocklab/failover").unwrap())
    });
}

#[test]
fn coord_journal_on_zookeeper_survives_reopen_and_refuses_a_second_start() {
    if !require_zookeeper() {
        return;
    }
    let zk = match ZkServer::start() {
        Ok(z) => z,
        Err(e) => panic!("a private ZooKeeper server is needed for this test: {e}"),
    };
    let spec = zk.spec("/t");
    let open = || {
        let c = connect(&spec, &ConnectOptions::default()).unwrap();
        Box::new(CoordJournal::open(c, "/blocklab/failover").unwrap()) as Box<dyn OpJournal>
    };
    exercise(&open);
    // Two writers (two sessions): the one that did not start "x" cannot start it again.
    let mut a = open();
    let mut b = open();
    let e = Epoch {
        counter: 3,
        node: 2,
    };
    a.append(started("x", e)).unwrap();
    assert!(b.append(started("x", e)).is_err(), "started twice");
    // The records are readable by anyone with a session.
    let c = CoordJournal::open(
        connect(&spec, &ConnectOptions::default()).unwrap(),
        "/blocklab/failover",
    )
    .unwrap();
    let recs = c.all_records().unwrap();
    let starts = recs
        .iter()
        .filter(|r| matches!(r, Record::Started { op_id, .. } if op_id == "x"))
        .count();
    assert_eq!(starts, 1);
}
