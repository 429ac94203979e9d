//! The production reference: a 3-member etcd cluster (Debian's etcd-server, each member its
//! own process, peer traffic through delay proxies of RTT/2 each way) under sparse puts.
//! A follower's apply lag is the time from the leader's answer to a put until the event of
//! a watch served by that follower; it can be negative (the follower applied before the
//! answer reached the client) and is recorded as 0 then, so only the tail is comparable.

use std::time::Duration;

use anyhow::Context;
use harness::etcd::{self, EtcdCluster, EtcdOptions, SparseWorkload};

use crate::measure::Measured;

/// Fails unless etcd is installed.
pub fn check_installed() -> anyhow::Result<String> {
    let p = etcd::program();
    etcd::version(&p).with_context(|| {
        format!(
            "{}: etcd is not installed (Debian: apt-get install etcd-server); --etcd-rtt none skips the etcd reference",
            p.display()
        )
    })
}

/// One run on a fresh cluster: `writes` puts `1/rate` apart.
pub fn run(
    rtt: Duration,
    jitter: f64,
    writes: u64,
    rate: f64,
    seed: u64,
) -> anyhow::Result<Measured> {
    let mut c = EtcdCluster::start(EtcdOptions {
        jitter,
        seed,
        ..EtcdOptions::with_rtt(rtt)
    })?;
    let w = SparseWorkload::new(writes as usize, Duration::from_secs_f64(1.0 / rate));
    let samples = c.run_sparse(&w)?;
    let mut m = Measured {
        writes: samples.len() as u64,
        rate_per_s: rate,
        ..Measured::default()
    };
    for s in &samples {
        m.write.record_us(Duration::from_nanos(s.put_latency_ns));
        for l in &s.lags {
            m.apply
                .record_us(Duration::from_nanos(l.lag_ns.max(0) as u64));
        }
    }
    drop(c);
    Ok(m)
}
