//! The engine's submit/complete path: a batch of 32 4 KiB writes through `execute`, and
//! 4 KiB random reads at QD 1 and 32 through `stream` with and without registered
//! buffers and file. Runs on an O_DIRECT file in /var/tmp. Set BLOCKLAB_BENCH_DEVICE to a
//! block device to bench that instead: it is overwritten, so it must be unused (not
//! mounted or held by another driver) and hold nothing (its first MiB all zeros) unless
//! BLOCKLAB_BENCH_FORCE=1.
//!
//! Only the I/O is timed: the requests, the stream's spec, and (kept in the engine from
//! call to call) the stream's buffers and their registration are set up before.

use std::time::Duration;

use blocklab::dev::{
    probe, AlignedBuf, Device, Found, IoEngine, IoRequest, Pattern, StreamLimit, StreamOp,
    StreamSpec, UringEngine,
};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

const SIZE: u64 = 64 << 20;

/// The bench's device given in BLOCKLAB_BENCH_DEVICE, after checking it may be overwritten.
fn given_device(p: &str) -> Device {
    let fail = |msg: String| -> ! {
        eprintln!("BLOCKLAB_BENCH_DEVICE={p}: {msg}");
        std::process::exit(2)
    };
    let dev = Device::open_exclusive(p).unwrap_or_else(|e| fail(e.to_string()));
    let mut eng = UringEngine::with_queue_depth(1).unwrap_or_else(|e| fail(e.to_string()));
    let found = probe(&mut eng, &dev).unwrap_or_else(|e| fail(e.to_string()));
    let force = std::env::var("BLOCKLAB_BENCH_FORCE").is_ok_and(|v| v == "1");
    if found != Found::Empty && !force {
        fail(format!(
            "refusing to overwrite it: it holds {found}; set BLOCKLAB_BENCH_FORCE=1 to overwrite it"
        ));
    }
    if dev.size() < SIZE {
        fail(format!("{} bytes, the bench needs {SIZE}", dev.size()));
    }
    dev
}

fn device() -> (Device, Option<tempfile::TempDir>) {
    if let Ok(p) = std::env::var("BLOCKLAB_BENCH_DEVICE") {
        return (given_device(&p), None);
    }
    let dir = blocklab::testing::scratch_dir("blocklab-bench-io-");
    let p = blocklab::testing::sparse_file(&dir.path().join("bench.img"), SIZE);
    let dev = Device::open(&p).expect("O_DIRECT on /var/tmp");
    // Fill it so reads hit allocated blocks.
    let buf = AlignedBuf::new(1 << 20);
    let mut eng = UringEngine::with_queue_depth(8).unwrap();
    let mut reqs: Vec<IoRequest<'_>> = (0..SIZE >> 20)
        .map(|i| IoRequest::write(&dev, i << 20, &buf))
        .collect();
    eng.execute(&mut reqs).unwrap();
    (dev, Some(dir))
}

fn bench(c: &mut Criterion) {
    let (dev, _dir) = device();
    let mut g = c.benchmark_group("execute");
    g.measurement_time(Duration::from_secs(3)).sample_size(20);
    let bufs: Vec<AlignedBuf> = (0..32).map(|_| AlignedBuf::new(4096)).collect();
    let mut eng = UringEngine::with_queue_depth(32).unwrap();
    let mut reqs: Vec<IoRequest<'_>> = bufs
        .iter()
        .enumerate()
        .map(|(i, buf)| IoRequest::write(&dev, i as u64 * 8192, buf))
        .collect();
    g.throughput(Throughput::Elements(32));
    g.bench_function("write_batch_32x4k", |b| {
        b.iter(|| eng.execute(&mut reqs).unwrap())
    });
    g.finish();

    let mut g = c.benchmark_group("stream_randread_4k");
    g.measurement_time(Duration::from_secs(3)).sample_size(10);
    for qd in [1u32, 32] {
        for fixed in [false, true] {
            let ops = 2000u64;
            g.throughput(Throughput::Elements(ops));
            let id = BenchmarkId::new(if fixed { "fixed" } else { "plain" }, format!("qd{qd}"));
            let mut eng = UringEngine::with_queue_depth(qd).unwrap();
            let spec = StreamSpec {
                op: StreamOp::Read,
                pattern: Pattern::Random { seed: 1 },
                block_size: 4096,
                queue_depth: qd,
                region_offset: 0,
                region_len: 0,
                limit: StreamLimit::Ops(ops),
                fixed_buffers: fixed,
                fixed_file: fixed,
            };
            // Warm-up outside the timing: allocates and registers the stream's buffers.
            eng.stream(&dev, &spec, &mut |_| {}).unwrap();
            g.bench_function(id, |b| {
                b.iter(|| eng.stream(&dev, &spec, &mut |_| {}).unwrap())
            });
        }
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
