//! `blocklab proxy`: a forwarding TCP proxy that delays every chunk by a one-way delay
//! (with jitter), one process per link ([`blocklab::delayproxy`]).

use std::io::Write;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use blocklab::delayproxy::{DelayProxy, DelaySpec, ProxyStats};
use clap::Args;

use crate::args::{parse_duration, parse_percent};

/// How often the main thread looks whether a signal asked it to stop.
const POLL: Duration = Duration::from_millis(20);

#[derive(Debug, Args)]
pub struct ProxyArgs {
    /// Address to listen on (port 0: any free port).
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// Where every accepted connection is forwarded to, HOST:PORT.
    #[arg(long)]
    to: SocketAddr,
    /// One-way delay of each direction, e.g. 500us (0s: forward at once).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    delay: Duration,
    /// Each chunk's delay is drawn uniformly from delay·(1 ± jitter), a percentage in
    /// [0%, 100%), e.g. 10%.
    #[arg(long, value_name = "PERCENT", value_parser = parse_percent, default_value = "0%", allow_hyphen_values = true)]
    jitter: f64,
    /// Seed of the jitter's draws.
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

/// Runs the proxy until SIGTERM/SIGINT; prints `listening on ADDR` once bound, and what it
/// forwarded on stderr when it stops.
pub fn run(a: ProxyArgs) -> anyhow::Result<()> {
    let spec = DelaySpec::new(a.delay, a.jitter, a.seed)?;
    let stop = Arc::new(AtomicBool::new(false));
    let s2 = stop.clone();
    ctrlc::set_handler(move || s2.store(true, Ordering::SeqCst))
        .context("installing the SIGTERM/SIGINT handler")?;
    let proxy = DelayProxy::bind(a.listen, a.to, spec)?;
    println!("listening on {}", proxy.addr());
    std::io::stdout().flush()?;
    while !stop.load(Ordering::SeqCst) {
        std::thread::sleep(POLL);
    }
    let stats = proxy.stats();
    proxy.stop();
    print_stats(a.to, &stats);
    Ok(())
}

fn print_stats(to: SocketAddr, s: &ProxyStats) {
    eprintln!(
        "proxy to {to} stopped: connections {} failed_connects {} \
         to_target_bytes {} to_target_chunks {} to_client_bytes {} to_client_chunks {}",
        s.connections,
        s.failed_connects,
        s.to_target.bytes,
        s.to_target.chunks,
        s.to_client.bytes,
        s.to_client.chunks
    );
}
