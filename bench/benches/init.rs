//! Format encode/decode and bitmap initialisation: the CPU part of mkfs and mount.

use blocklab::format::{Bitmap, Label, Layout, LayoutParams, LogInitRecord, Superblock};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use std::hint::black_box;

fn label(size: u64) -> Label {
    Label {
        flags: 1,
        cluster_fsid: uuid::Uuid::from_u128(1),
        daemon_id: 7,
        daemon_uuid: uuid::Uuid::from_u128(2),
        birth_time_unix_ns: 42,
        layout: Layout::compute(size, LayoutParams::default()).unwrap(),
    }
}

fn structures(c: &mut Criterion) {
    let l = label(16 << 30);
    let enc = l.encode();
    c.bench_function("label_encode", |b| b.iter(|| black_box(&l).encode()));
    c.bench_function("label_decode", |b| {
        b.iter(|| Label::decode(black_box(&enc)).unwrap())
    });
    let sb = Superblock {
        cluster_fsid: l.cluster_fsid,
        daemon_id: 7,
        alloc_unit: 4096,
        total_units: l.layout.total_units(),
        used_units: 1234,
        generation: 1,
    };
    let sbe = sb.encode();
    c.bench_function("superblock_encode", |b| b.iter(|| black_box(&sb).encode()));
    c.bench_function("superblock_decode", |b| {
        b.iter(|| Superblock::decode(black_box(&sbe)).unwrap())
    });
    let rec = LogInitRecord {
        daemon_uuid: l.daemon_uuid,
        log_len: 4 << 20,
        birth_time_unix_ns: 42,
    };
    c.bench_function("log_init_record_round_trip", |b| {
        b.iter(|| LogInitRecord::decode(&black_box(&rec).encode()).unwrap())
    });
}

fn bitmap(c: &mut Criterion) {
    let mut g = c.benchmark_group("bitmap");
    for gib in [1u64, 16, 100] {
        let layout = Layout::compute(gib << 30, LayoutParams::default()).unwrap();
        g.throughput(Throughput::Bytes(layout.bitmap_len));
        g.bench_with_input(
            BenchmarkId::new("initial", format!("{gib}GiB")),
            &layout,
            |b, l| b.iter(|| Bitmap::initial(black_box(l))),
        );
        let bytes = Bitmap::initial(&layout).as_bytes().to_vec();
        g.bench_with_input(
            BenchmarkId::new("decode", format!("{gib}GiB")),
            &bytes,
            |b, x| b.iter(|| Bitmap::decode(black_box(x), layout.total_units()).unwrap()),
        );
    }
    g.finish();
}

criterion_group!(benches, structures, bitmap);
criterion_main!(benches);
