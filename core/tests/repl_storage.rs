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

/// Reads the block holding device byte `at` of `path`, lets `f` change the byte there,
/// and writes the block back (through O_DIRECT, as the log reads it).
fn poke(path: &std::path::Path, at: u64, f: impl FnOnce(&mut u8)) {
    let mut eng = UringEngine::with_queue_depth(1).unwrap();
    let dev = Device::open(path).unwrap();
    let block = at - at % 4096;
    let mut b = blocklab::dev::AlignedBuf::new(4096);
    blocklab::dev::IoEngine::read_at(&mut eng, &dev, block, &mut b).unwrap();
    f(&mut b[(at - block) as usize]);
    blocklab::dev::IoEngine::write_at(&mut eng, &dev, block, &b).unwrap();
}

/// Zeroes device bytes `lo..hi` of `path` (whole blocks around them are read back first).
fn zero(path: &std::path::Path, lo: u64, hi: u64) {
    for at in lo..hi {
        poke(path, at, |b| *b = 0);
    }
}

/// Device byte offset of record `index` (1-based) of a log at `off` whose records have the
/// payload sizes `sizes` (index i has `sizes[i - 1]`).
fn record_at(off: u64, sizes: &[usize], index: u64) -> u64 {
    off + 4096
        + sizes[..index as usize - 1]
            .iter()
            .map(|&n| record_size(n))
            .sum::<u64>()
}

fn open_log(path: &std::path::Path, off: u64, len: u64) -> Result<Vec<Entry>, LogError> {
    let mut eng = UringEngine::with_queue_depth(4).unwrap();
    LogStore::open(&mut eng, Device::open(path).unwrap(), off, len).map(|(_, got)| got)
}

/// A log of `n` entries of term 1 with payloads of `size` bytes, group-committed 10 at a
/// time; returns the entries.
fn filled_log(path: &std::path::Path, off: u64, len: u64, n: u64, size: usize) -> Vec<Entry> {
    let (mut eng, mut log) = new_log(path, off, len);
    let all: Vec<Entry> = (1..=n).map(|i| e(1, i, size)).collect();
    for b in all.chunks(10) {
        log.append(&mut eng, b).unwrap();
    }
    all
}

/// A record damaged in the middle of the log, with megabytes of intact records after it,
/// is refused with an error naming the record, its offset and the intact one after it —
/// whether its payload, its length or its header magic was hit; a damaged tail is not.
#[test]
fn a_damaged_record_in_the_middle_of_the_log_is_refused() {
    let (_dir, p) = file_dev(8 << 20);
    let (off, len) = (1 << 20, 4 << 20);
    let n = 600; // 600 × 4 KiB: 2.4 MiB of records
    let size = 4000;
    let all = filled_log(&p, off, len, n, size);
    let sizes = vec![size; n as usize];
    assert_eq!(open_log(&p, off, len).unwrap(), all);
    let at = record_at(off, &sizes, 5);
    for (what, byte) in [("payload", at + 100), ("length", at + 8), ("magic", at)] {
        poke(&p, byte, |b| *b ^= 0x20);
        let err = open_log(&p, off, len).unwrap_err();
        match &err {
            LogError::Corrupt {
                index,
                offset,
                later_index,
                later_offset,
                ..
            } => {
                assert_eq!((*index, *offset), (5, at), "{what}: {err}");
                assert!(*later_index > 5 && *later_offset > at, "{what}: {err}");
                assert_eq!(*later_offset, record_at(off, &sizes, *later_index));
            }
            other => panic!("{what}: not refused as corrupt: {other}"),
        }
        let msg = err.to_string();
        assert!(
            msg.contains(&format!("record 5 at byte {at} is damaged"))
                && msg.contains("corrupt in the middle")
                && msg.contains(&p.display().to_string()),
            "{what}: {msg}"
        );
        poke(&p, byte, |b| *b ^= 0x20);
        assert_eq!(open_log(&p, off, len).unwrap(), all, "{what} restored");
    }
    // The same damage in the last record, or in one followed by less than a megabyte of
    // records, is a torn tail: recovery keeps what precedes it.
    let last = record_at(off, &sizes, n);
    poke(&p, last + 100, |b| *b ^= 0x20);
    assert_eq!(open_log(&p, off, len).unwrap(), all[..n as usize - 1]);
    let near = record_at(off, &sizes, n - 100);
    poke(&p, near + 100, |b| *b ^= 0x20);
    assert_eq!(open_log(&p, off, len).unwrap(), all[..n as usize - 101]);
}

/// The tail cut short or zeroed (the last writes lost or torn): the prefix is recovered,
/// and the log appends on after it.
#[test]
fn a_torn_or_lost_tail_recovers_the_prefix() {
    let (_dir, p) = file_dev(8 << 20);
    let (off, len) = (1 << 20, 4 << 20);
    let (n, size) = (400, 3000);
    let all = filled_log(&p, off, len, n, size);
    let sizes = vec![size; n as usize];
    // The last three records zeroed.
    let end = record_at(off, &sizes, n) + record_size(size);
    zero(&p, record_at(off, &sizes, n - 2), end);
    assert_eq!(open_log(&p, off, len).unwrap(), all[..n as usize - 3]);
    // Only the first bytes of the next one survive (a write torn at a sector).
    zero(
        &p,
        record_at(off, &sizes, n - 3) + 512,
        record_at(off, &sizes, n - 2),
    );
    assert_eq!(open_log(&p, off, len).unwrap(), all[..n as usize - 4]);
    // It appends on from there, and recovers that.
    let mut eng = UringEngine::with_queue_depth(8).unwrap();
    let (mut log, got) = LogStore::open(&mut eng, Device::open(&p).unwrap(), off, len).unwrap();
    let more: Vec<Entry> = (got.len() as u64 + 1..)
        .take(5)
        .map(|i| e(2, i, 10))
        .collect();
    log.append(&mut eng, &more).unwrap();
    drop(log);
    let got = open_log(&p, off, len).unwrap();
    assert_eq!(&got[..all.len() - 4], &all[..all.len() - 4]);
    assert_eq!(&got[all.len() - 4..], &more[..]);
}

/// `append_each`'s writes complete in any order: after a crash record k may be missing
/// while later records of the same batch are durable. That is a torn tail, not
/// corruption: the prefix before k is recovered. A batch of more than a megabyte goes out
/// in parts, one after the other, so it is never more than that.
#[test]
fn a_record_lost_among_durable_ones_of_its_own_batch_is_a_torn_tail() {
    let (_dir, p) = file_dev(8 << 20);
    let (off, len) = (1 << 20, 4 << 20);
    let (mut eng, mut log) = new_log(&p, off, len);
    // 1.2 MiB of history, then one batch: small records, one spanning three blocks, more
    // small records after it.
    let mut sizes: Vec<usize> = vec![4000; 300];
    let mut all: Vec<Entry> = (1..=300).map(|i| e(1, i, 4000)).collect();
    for b in all.chunks(50) {
        log.append(&mut eng, b).unwrap();
    }
    let mut batch_sizes = vec![100; 5];
    batch_sizes.push(10_000);
    batch_sizes.extend(vec![700; 200]); // 140 KiB after it
    let batch: Vec<Entry> = batch_sizes
        .iter()
        .enumerate()
        .map(|(k, &n)| e(1, 301 + k as u64, n))
        .collect();
    let writes = log.append_each(&mut eng, &batch).unwrap();
    assert_eq!(writes.len(), batch.len());
    sizes.extend(&batch_sizes);
    all.extend(batch.iter().cloned());
    drop(log);
    assert_eq!(open_log(&p, off, len).unwrap(), all);
    // Record 306 (10 000 bytes) has a block to itself, written only by its own write:
    // lose that write, keep its neighbours'.
    let big = record_at(off, &sizes, 306);
    let own = (big / 4096 + 1) * 4096;
    assert!(own + 4096 <= big + record_size(10_000));
    zero(&p, own, own + 4096);
    assert_eq!(open_log(&p, off, len).unwrap(), all[..305]);
    // A batch larger than a megabyte is written in parts of at most a megabyte.
    let (mut eng, mut log) = new_log(&p, off, len);
    let big_batch: Vec<Entry> = (1..=700).map(|i| e(1, i, 3000)).collect();
    let parts = log.append(&mut eng, &big_batch).unwrap();
    assert_eq!(parts.len(), 3, "{parts:?}");
    assert_eq!(parts.first().map(|r| *r.start()), Some(1));
    assert_eq!(parts.last().map(|r| *r.end()), Some(700));
    for w in parts.windows(2) {
        assert_eq!(*w[0].end() + 1, *w[1].start());
        let bytes = (*w[0].end() - *w[0].start() + 1) * record_size(3000);
        assert!(bytes <= blocklab::repl::log::MAX_IN_FLIGHT);
    }
    assert_eq!(log.flushes(), 3);
    drop(log);
    assert_eq!(open_log(&p, off, len).unwrap(), big_batch);
}

/// A truncation zeroes the records it drops, and what a crash left past the tail: when
/// the first write after it is torn, the dropped records (still of this log, with later
/// indexes) are not taken for intact records after a damaged one.
#[test]
fn a_torn_write_after_a_truncation_is_a_torn_tail() {
    let (_dir, p) = file_dev(8 << 20);
    let (off, len) = (1 << 20, 4 << 20);
    let (n, size) = (500, 4000);
    let all = filled_log(&p, off, len, n, size);
    let sizes = vec![size; n as usize];
    // A crash tore record 450: 451..500 are left past the recovered tail.
    poke(&p, record_at(off, &sizes, 450) + 64, |b| *b ^= 1);
    let mut eng = UringEngine::with_queue_depth(8).unwrap();
    let (mut log, got) = LogStore::open(&mut eng, Device::open(&p).unwrap(), off, len).unwrap();
    assert_eq!(got, all[..449]);
    // A new primary's entry 3 replaces 3..449; its write is torn.
    log.truncate(&mut eng, 3).unwrap();
    log.append(&mut eng, &[e(2, 3, 50)]).unwrap();
    drop(log);
    assert_eq!(open_log(&p, off, len).unwrap().len(), 3);
    poke(&p, record_at(off, &sizes, 3) + 40, |b| *b ^= 1);
    assert_eq!(open_log(&p, off, len).unwrap(), all[..2]);
}

/// Options of an in-process replica on `device` with every member's address in `peers`.
fn replica_opts(
    id: u32,
    members: Vec<u32>,
    primary: u32,
    peers: Vec<(u32, std::net::SocketAddr)>,
    device: &std::path::Path,
) -> blocklab::repl::replica::ReplicaOptions {
    use blocklab::repl::replica::{PolicySpec, Regions, ReplicaOptions};
    use std::time::Duration;
    ReplicaOptions {
        id,
        members,
        primary,
        peers,
        listener: std::net::TcpListener::bind("127.0.0.1:0").unwrap(),
        device: device.to_path_buf(),
        regions: Regions::plain(8 << 20, 4 << 20),
        policy: PolicySpec::parse("idle_ack").unwrap(),
        tick: Duration::from_micros(100),
        retransmit: Duration::from_millis(100),
        fresh: false,
        force: false,
        group_commit: true,
    }
}

/// Runs primary `primary` with `secondaries` (all of `members`) on `devs[id]`, writes
/// `writes` keys through it, waits until every secondary applied them, stops everything
/// and returns the primary's term.
fn run_cluster(
    devs: &[std::path::PathBuf],
    members: &[u32],
    primary: u32,
    keys: std::ops::RangeInclusive<u64>,
) -> u64 {
    use blocklab::repl::client::Client;
    use blocklab::repl::replica::{self, NoHooks};
    use std::time::Duration;
    let secs: Vec<_> = members
        .iter()
        .filter(|&&m| m != primary)
        .map(|&m| {
            let o = replica_opts(m, members.to_vec(), primary, vec![], &devs[m as usize]);
            (m, replica::spawn(o, Box::new(NoHooks)).unwrap())
        })
        .collect();
    let peers = secs.iter().map(|(m, h)| (*m, h.addr())).collect();
    let o = replica_opts(
        primary,
        members.to_vec(),
        primary,
        peers,
        &devs[primary as usize],
    );
    let p = replica::spawn(o, Box::new(NoHooks)).unwrap();
    let mut c = Client::connect(p.addr(), Duration::from_secs(10)).unwrap();
    let mut last = 0;
    for k in keys {
        last = c.write(put_payload(k, b"v")).unwrap();
    }
    for (m, h) in &secs {
        blocklab::testing::wait_for(
            &format!("secondary {m} applied {last}"),
            Duration::from_secs(60),
            || {
                Client::connect(h.addr(), Duration::from_secs(5))
                    .and_then(|mut c| c.status())
                    .is_ok_and(|s| s.applied == last)
            },
        );
    }
    let term = p.stop().unwrap().term;
    for (_, h) in secs {
        h.stop().unwrap();
    }
    term
}

/// The log header's term, and the terms of the log's entries, on `dev`.
fn terms_on(dev: &std::path::Path) -> (u64, Vec<u64>) {
    let mut eng = UringEngine::with_queue_depth(4).unwrap();
    let (log, got) =
        LogStore::open(&mut eng, Device::open(dev).unwrap(), 1 << 20, 8 << 20).unwrap();
    (log.term(), got.iter().map(|e| e.term).collect())
}

/// A secondary keeps the term it adopts in its log header, so a former secondary started
/// as the primary takes a term above every term it accepted entries in, and never writes
/// an (index, term) pair another primary used.
#[test]
fn a_secondary_persists_its_term_and_a_promoted_one_starts_above_it() {
    let dir = scratch();
    let devs = blocklab::testing::sparse_files(dir.path(), 3, 16 << 20);
    assert_eq!(run_cluster(&devs, &[0, 1, 2], 0, 1..=3), 1);
    // The primary restarts: term 2.
    assert_eq!(run_cluster(&devs, &[0, 1, 2], 0, 4..=6), 2);
    for s in [1, 2] {
        assert_eq!(
            terms_on(&devs[s]),
            (2, vec![1, 1, 1, 2, 2, 2]),
            "secondary {s}: the adopted term is in its header"
        );
    }
    // Replica 1, a secondary so far, is started as the primary of 1 and 2.
    assert_eq!(run_cluster(&devs, &[1, 2], 1, 7..=8), 3);
    for s in [1, 2] {
        assert_eq!(
            terms_on(&devs[s]),
            (3, vec![1, 1, 1, 2, 2, 2, 3, 3]),
            "replica {s}"
        );
    }
}

/// The device is opened exclusively: a second replica on it is refused with a clear error
/// (after waiting a few seconds for the device to be released) while the first keeps
/// serving.
#[test]
fn a_second_replica_on_the_same_device_is_refused() {
    use blocklab::repl::client::Client;
    use blocklab::repl::replica::{self, NoHooks, ReplicaError};
    use std::time::Duration;
    let Some(g) = LoopDevices::provision("repl-excl", 1, 16 << 20) else {
        return;
    };
    let dev = &g.paths()[0];
    let first =
        replica::spawn(replica_opts(0, vec![0], 0, vec![], dev), Box::new(NoHooks)).unwrap();
    let err =
        replica::spawn(replica_opts(0, vec![0], 0, vec![], dev), Box::new(NoHooks)).unwrap_err();
    assert!(
        matches!(
            err,
            ReplicaError::Busy {
                cause: DevError::InUse { .. },
                ..
            }
        ),
        "{err:?}"
    );
    let msg = err.to_string();
    assert!(
        msg.contains(&dev.display().to_string()) && msg.contains("in use"),
        "{msg}"
    );
    let mut c = Client::connect(first.addr(), Duration::from_secs(10)).unwrap();
    assert_eq!(c.write(put_payload(1, b"v")).unwrap(), 1);
    assert_eq!(first.stop().unwrap().last_index, 1);
    // Released when the first stops.
    let again =
        replica::spawn(replica_opts(0, vec![0], 0, vec![], dev), Box::new(NoHooks)).unwrap();
    assert_eq!(again.stop().unwrap().last_index, 1);
}
