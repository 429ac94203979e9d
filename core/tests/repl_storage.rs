//! The replication log and the storage engine on real devices (a regular file with
//! O_DIRECT, and as root a loop device): append/flush/recover, truncation, a full log
//! region, in-order apply.

use blocklab::dev::{DevError, Device, UringEngine};
use blocklab::repl::apply::Applier;
use blocklab::repl::kv::{put_payload, slots_for, Invalid, KvError, KvStore, MAX_VALUE};
use blocklab::repl::log::{record_size, LogError, LogStore};
use blocklab::repl::Entry;
use blocklab::testing::{pattern, scratch, set_read_only, sparse_file, LoopDevices};

/// A sparse file of `size` bytes as the device, in a scratch directory.
fn file_dev(size: u64) -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = scratch();
    let p = sparse_file(&dir.path().join("dev.img"), size);
    (dir, p)
}

fn e(term: u64, index: u64, n: usize) -> Entry {
    Entry {
        term,
        index,
        payload: pattern(n, index).into(),
    }
}

/// An engine and a new log at `off` of `path`.
fn new_log(path: &std::path::Path, off: u64, len: u64) -> (UringEngine, LogStore) {
    let mut eng = UringEngine::with_queue_depth(64).unwrap();
    let log = LogStore::create(&mut eng, Device::open(path).unwrap(), off, len).unwrap();
    (eng, log)
}

fn log_round_trip(path: &std::path::Path) {
    let (off, len) = (1 << 20, 256 << 10);
    let (mut eng, mut log) = new_log(path, off, len);
    let mut all = Vec::new();
    // Entries of many sizes, some spanning blocks, appended in batches.
    let mut idx = 1;
    for batch in 0..20 {
        let b: Vec<Entry> = (0..(batch % 4 + 1))
            .map(|k| e(1, idx + k as u64, (batch * 397 + k * 1013) % 6000))
            .collect();
        idx += b.len() as u64;
        log.append(&mut eng, &b).unwrap();
        all.extend(b);
    }
    assert_eq!(log.flushes(), 20, "one flush per append");
    log.set_term(&mut eng, 7).unwrap();
    assert_eq!(log.flushes(), 20, "header writes are not log flushes");
    drop(log);
    let (mut log, got) = LogStore::open(&mut eng, Device::open(path).unwrap(), off, len).unwrap();
    assert_eq!(got, all);
    assert_eq!(log.term(), 7);
    // Truncate the suffix and append entries of a newer term: recovery sees the new ones,
    // never the stale records behind them.
    log.truncate(&mut eng, 10).unwrap();
    let newer: Vec<Entry> = (10..13).map(|i| e(2, i, 10)).collect();
    log.append(&mut eng, &newer).unwrap();
    drop(log);
    let (mut log, got) = LogStore::open(&mut eng, Device::open(path).unwrap(), off, len).unwrap();
    assert_eq!(&got[..9], &all[..9]);
    assert_eq!(&got[9..], &newer[..]);
    // Non-contiguous appends are refused.
    assert!(matches!(
        log.append(&mut eng, &[e(2, 20, 1)]),
        Err(LogError::NotContiguous { .. })
    ));
    // Fill the region: the append that does not fit is refused and nothing changes.
    let mut next = 13;
    loop {
        let x = e(2, next, 3000);
        if record_size(3000) > log.space_left() {
            let err = log.append(&mut eng, &[x]).unwrap_err();
            assert!(matches!(err, LogError::Full { .. }));
            assert!(err.to_string().starts_with("log region full"), "{err}");
            break;
        }
        log.append(&mut eng, &[x]).unwrap();
        next += 1;
    }
    drop(log);
    let (_, got) = LogStore::open(&mut eng, Device::open(path).unwrap(), off, len).unwrap();
    assert_eq!(
        got.len() as u64,
        next - 1,
        "the refused append left the log intact"
    );
    // A new incarnation ignores the old records.
    let log = LogStore::create(&mut eng, Device::open(path).unwrap(), off, len).unwrap();
    drop(log);
    let (_, got) = LogStore::open(&mut eng, Device::open(path).unwrap(), off, len).unwrap();
    assert!(got.is_empty());
}

/// One durable write per entry, all in flight at once, mixed with group commits: every
/// entry is recovered whatever order the writes landed in (neighbouring records share
/// blocks), one flush is counted per entry, and a batch that does not fit is refused whole.
fn log_per_entry_round_trip(path: &std::path::Path) {
    let (off, len) = (1 << 20, 128 << 10);
    let (mut eng, mut log) = new_log(path, off, len);
    let mut all = Vec::new();
    let mut want_flushes = 0;
    let mut idx = 1;
    for batch in 0..24u64 {
        // Runs of tiny records (many to a block) with now and then one spanning blocks.
        let b: Vec<Entry> = (0..(batch % 7 + 1))
            .map(|k| {
                let n = if (batch + k) % 5 == 4 {
                    5000
                } else {
                    (batch * 13 + k * 7) as usize % 90
                };
                e(1, idx + k, n)
            })
            .collect();
        idx += b.len() as u64;
        let (first, last) = (b[0].index, b[b.len() - 1].index);
        if batch % 3 == 2 {
            let writes = log.append(&mut eng, &b).unwrap();
            assert_eq!(writes, vec![first..=last], "one write covers the batch");
            want_flushes += 1;
        } else {
            let writes = log.append_each(&mut eng, &b).unwrap();
            let each: Vec<_> = (first..=last).map(|i| i..=i).collect();
            assert_eq!(writes, each, "one write per entry");
            want_flushes += b.len() as u64;
        }
        all.extend(b);
    }
    assert_eq!(
        log.flushes(),
        want_flushes,
        "one flush per entry of append_each"
    );
    let too_much: Vec<Entry> = (0..4).map(|k| e(1, idx + k, 12_000)).collect();
    assert!(4 * record_size(12_000) > log.space_left());
    let err = log.append_each(&mut eng, &too_much).unwrap_err();
    assert!(matches!(err, LogError::Full { .. }), "{err}");
    assert_eq!(
        log.flushes(),
        want_flushes,
        "nothing written for a refused batch"
    );
    drop(log);
    let (mut log, got) = LogStore::open(&mut eng, Device::open(path).unwrap(), off, len).unwrap();
    assert_eq!(got, all);
    // The recovered log appends on where it stopped.
    let more: Vec<Entry> = (0..3).map(|k| e(2, idx + k, 40)).collect();
    log.append_each(&mut eng, &more).unwrap();
    drop(log);
    let (_, got) = LogStore::open(&mut eng, Device::open(path).unwrap(), off, len).unwrap();
    assert_eq!(&got[..all.len()], &all[..]);
    assert_eq!(&got[all.len()..], &more[..]);
}

#[test]
fn log_on_a_regular_file() {
    let (_dir, p) = file_dev(4 << 20);
    log_round_trip(&p);
    log_per_entry_round_trip(&p);
    // Not a log / bad region: clear errors.
    let mut eng = UringEngine::with_queue_depth(1).unwrap();
    let err = LogStore::open(&mut eng, Device::open(&p).unwrap(), 2 << 20, 64 << 10).unwrap_err();
    assert!(matches!(err, LogError::NotALog { .. }), "{err}");
    let err = LogStore::create(&mut eng, Device::open(&p).unwrap(), 100, 64 << 10).unwrap_err();
    assert!(matches!(err, LogError::BadRegion { .. }), "{err}");
    assert!(LogStore::create(&mut eng, Device::open(&p).unwrap(), 4 << 20, 64 << 10).is_err());
    // The header alone tells a log from anything else.
    let dev = Device::open(&p).unwrap();
    assert!(LogStore::holds_log(&mut eng, &dev, 1 << 20).unwrap());
    assert!(!LogStore::holds_log(&mut eng, &dev, 2 << 20).unwrap());
}

#[test]
fn log_and_store_on_a_loop_device() {
    let Some(g) = LoopDevices::provision("repl-storage", 1, 16 << 20) else {
        return;
    };
    log_round_trip(&g.paths()[0]);
    log_per_entry_round_trip(&g.paths()[0]);
    kv_round_trip(&g.paths()[0]);
}

/// A put of `v{index}` to `key`.
fn put(index: u64, key: u64) -> Entry {
    Entry {
        term: 1,
        index,
        payload: put_payload(key, format!("v{index}").as_bytes()).into(),
    }
}

/// The storage engine's keys with the index and value that wrote them.
fn contents(kv: &KvStore) -> Vec<(u64, u64, Vec<u8>)> {
    kv.entries()
        .map(|(k, v)| (k, v.index, v.value().to_vec()))
        .collect()
}

/// The device starts refusing writes under the apply worker (the loop device is set
/// read-only, so the kernel fails the worker's writes): the worker reports the error once
/// (`done(None)`) and from `finish`, applies nothing handed over after it, and the device
/// holds exactly the batches applied before.
#[test]
fn the_apply_worker_stops_on_a_device_error_and_applies_nothing_after_it() {
    let Some(g) = LoopDevices::provision("repl-apply-err", 1, 16 << 20) else {
        return;
    };
    let path = &g.paths()[0];
    let mut eng = UringEngine::with_queue_depth(8).unwrap();
    let (off, len) = (8 << 20, 1 << 20);
    let kv = KvStore::create(&mut eng, Device::open(path).unwrap(), off, len).unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let applier = Applier::spawn(kv, move |a| {
        let _ = tx.send(a.map(|a| a.entries.iter().map(|e| e.index).collect::<Vec<_>>()));
    })
    .unwrap();
    applier.submit(vec![put(1, 1), put(2, 2)]);
    assert_eq!(rx.recv().unwrap(), Some(vec![1, 2]));

    set_read_only(path, true);
    applier.submit(vec![put(3, 3)]);
    applier.submit(vec![put(4, 1)]);
    let reported = rx.recv();
    let applied = applier.store().applied();
    let finished = applier.finish();
    set_read_only(path, false);
    assert_eq!(
        reported.unwrap(),
        None,
        "the error is reported through done"
    );
    assert!(rx.recv().is_err(), "nothing is reported after the error");
    assert_eq!(applied, 2, "the failed batch is not counted as applied");
    let err = finished.unwrap_err();
    assert!(
        matches!(err, KvError::Dev(DevError::Io { .. })),
        "the device's refusal comes back: {err:?}"
    );

    let kv = KvStore::open(&mut eng, Device::open(path).unwrap(), off, len).unwrap();
    assert_eq!(
        contents(&kv),
        vec![(1, 1, b"v1".to_vec()), (2, 2, b"v2".to_vec())]
    );
}

fn kv_round_trip(path: &std::path::Path) {
    let mut eng = UringEngine::with_queue_depth(8).unwrap();
    let (off, len) = (8 << 20, 1 << 20);
    let mut kv = KvStore::create(&mut eng, Device::open(path).unwrap(), off, len).unwrap();
    let slots = kv.slots();
    assert_eq!(slots, slots_for(len));
    assert!(kv
        .apply(&mut eng, &[put(1, 1), put(2, 2), put(3, 1)])
        .unwrap()
        .is_empty());
    assert_eq!(kv.get(1).unwrap().value(), b"v3");
    // Out of order and repeats are refused.
    assert!(matches!(
        kv.apply(&mut eng, &[put(5, 3)]),
        Err(KvError::OutOfOrder { got: 5, applied: 3 })
    ));
    assert!(matches!(
        kv.apply(&mut eng, &[put(3, 3)]),
        Err(KvError::OutOfOrder { .. })
    ));
    // Two keys with the same home slot: the second probes to the next free slot.
    assert!(kv.apply(&mut eng, &[put(4, 1 + slots)]).unwrap().is_empty());
    assert_eq!(kv.get(1 + slots).unwrap().value(), b"v4");
    assert_eq!(kv.get(1).unwrap().value(), b"v3");
    // Invalid entries are skipped with their reason, the same way everywhere; the applied
    // index moves on and the next entries apply.
    let short = Entry {
        term: 1,
        index: 5,
        payload: vec![1, 2, 3].into(),
    };
    let big = Entry {
        term: 1,
        index: 6,
        payload: put_payload(9, &vec![0u8; MAX_VALUE + 1]).into(),
    };
    let rejected = kv.apply(&mut eng, &[short, big, put(7, 4)]).unwrap();
    assert_eq!(
        rejected,
        vec![
            (5, Invalid::ShortPayload { len: 3 }),
            (6, Invalid::ValueTooLarge { len: MAX_VALUE + 1 })
        ]
    );
    assert_eq!(kv.applied(), 7);
    assert!(kv.get(9).is_none());
    drop(kv);
    let kv = KvStore::open(&mut eng, Device::open(path).unwrap(), off, len).unwrap();
    assert_eq!(
        contents(&kv),
        vec![
            (1, 3, b"v3".to_vec()),
            (2, 2, b"v2".to_vec()),
            (4, 7, b"v7".to_vec()),
            (1 + slots, 4, b"v4".to_vec()),
        ]
    );
    assert_eq!(
        kv.applied(),
        0,
        "a reopened store is re-applied from the log"
    );
}

#[test]
fn a_full_store_refuses_new_keys_up_front_and_skips_them_when_applied() {
    let (_dir, p) = file_dev(4 << 20);
    let mut eng = UringEngine::with_queue_depth(8).unwrap();
    // Three slots.
    let mut kv = KvStore::create(&mut eng, Device::open(&p).unwrap(), 1 << 20, 16 << 10).unwrap();
    assert_eq!(kv.slots(), 3);
    let put = |i: u64, k: u64| Entry {
        term: 1,
        index: i,
        payload: put_payload(k, b"v").into(),
    };
    // Admission counts keys reserved but not applied yet: all three map to slot 0.
    for k in [0, 3, 6] {
        let key = kv.check(&put(1, k).payload).unwrap();
        kv.reserve(key);
    }
    assert_eq!(
        kv.check(&put(1, 9).payload),
        Err(Invalid::Full { slots: 3 })
    );
    assert_eq!(kv.check(&put(1, 3).payload), Ok(3), "a known key is fine");
    assert_eq!(
        kv.check(&[1, 2]),
        Err(Invalid::ShortPayload { len: 2 }),
        "a short payload is refused up front"
    );
    // Applied in steps, as the apply worker does: while the plan's slots are written the
    // store is unchanged and still counts the keys as reserved.
    let batch = [put(1, 0), put(2, 3), put(3, 6)];
    let plan = kv.plan(&batch).unwrap();
    let stale = kv.plan(&batch).unwrap();
    plan.write(&mut eng).unwrap();
    assert_eq!(
        kv.check(&put(4, 9).payload),
        Err(Invalid::Full { slots: 3 })
    );
    assert_eq!(kv.applied(), 0);
    assert!(kv.get(0).is_none());
    assert!(kv.commit(plan).unwrap().is_empty());
    assert_eq!(kv.applied(), 3);
    assert_eq!(kv.get(6).unwrap().index, 3);
    // A plan made before that commit is refused and changes nothing.
    assert!(matches!(
        kv.commit(stale),
        Err(KvError::OutOfOrder { got: 1, applied: 3 })
    ));
    assert_eq!(kv.applied(), 3);
    // An entry admitted by another build (or with another region size) that no longer
    // fits: skipped, not an error.
    let rejected = kv.apply(&mut eng, &[put(4, 9), put(5, 0)]).unwrap();
    assert_eq!(rejected, vec![(4, Invalid::Full { slots: 3 })]);
    assert_eq!(kv.applied(), 5);
    assert_eq!(kv.get(0).unwrap().index, 5);
    drop(kv);
    let kv = KvStore::open(&mut eng, Device::open(&p).unwrap(), 1 << 20, 16 << 10).unwrap();
    let keys: Vec<u64> = kv.entries().map(|(k, _)| k).collect();
    assert_eq!(keys, [0, 3, 6]);
}

#[test]
fn store_on_a_regular_file() {
    let (_dir, p) = file_dev(16 << 20);
    kv_round_trip(&p);
}

#[test]
fn a_formatted_daemon_device_holds_the_log_in_its_log_region() {
    use blocklab::format::{Label, Layout, LayoutParams, LABEL_FLAG_READY};
    use blocklab::repl::replica::Regions;
    let (_dir, p) = file_dev(64 << 20);
    let layout = Layout::compute(64 << 20, LayoutParams::default()).unwrap();
    // Not formatted: the plain regions.
    let (r, formatted) = Regions::detect(&p, 8 << 20, 1 << 20).unwrap();
    assert!(!formatted);
    assert_eq!(r, Regions::plain(8 << 20, 1 << 20));
    // A ready label (as mkfs leaves it): the log region after its init record, and the
    // start of the data region.
    let label = Label {
        flags: LABEL_FLAG_READY,
        cluster_fsid: uuid::Uuid::new_v4(),
        daemon_id: 3,
        daemon_uuid: uuid::Uuid::new_v4(),
        birth_time_unix_ns: 1,
        layout: layout.clone(),
    };
    let mut eng = UringEngine::with_queue_depth(4).unwrap();
    let dev = Device::open(&p).unwrap();
    let mut b = blocklab::dev::AlignedBuf::new(4096);
    b.copy_from_slice(&label.encode());
    blocklab::dev::IoEngine::write_at(&mut eng, &dev, 0, &b).unwrap();
    let (r, formatted) = Regions::detect(&p, 8 << 20, 1 << 20).unwrap();
    assert!(formatted);
    assert_eq!(r.log_offset, layout.log_offset + 4096);
    assert_eq!(r.log_len, layout.log_len - 4096);
    assert_eq!((r.data_offset, r.data_len), (layout.data_offset, 1 << 20));
    let mut log =
        LogStore::create(&mut eng, Device::open(&p).unwrap(), r.log_offset, r.log_len).unwrap();
    log.append(&mut eng, &[e(1, 1, 100)]).unwrap();
    // The label and the log's init-record block are untouched.
    let mut back = blocklab::dev::AlignedBuf::new(4096);
    blocklab::dev::IoEngine::read_at(&mut eng, &dev, 0, &mut back).unwrap();
    assert!(Label::decode(&back).unwrap().is_ready());
}
