//! The workload client: a process of its own (this one) writing to the primary over TCP.
//! Open loop (Poisson arrivals, bursts) pipelines writes on one connection; the closed
//! loop runs C connections, each with one write outstanding. Every write's send and
//! answer times are on CLOCK_MONOTONIC, like the replicas' timelines.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use blocklab::repl::client::Client;
use blocklab::repl::events::MonoClock;
use blocklab::repl::kv::put_payload;
use rand::{rngs::StdRng, Rng, SeedableRng};

/// What the client runs.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub enum Load {
    /// Open loop: `writes` Poisson arrivals at `rate` per second.
    Poisson { rate: f64, writes: u64 },
    /// `bursts` bursts of `size` writes sent back to back, `gap` apart.
    Bursty {
        bursts: u64,
        size: u64,
        gap: Duration,
    },
    /// Closed loop: `clients` connections, each writing again as soon as its write is
    /// answered, for `duration`.
    Closed { clients: usize, duration: Duration },
}

/// One answered write.
#[derive(Debug, Clone, Copy)]
pub struct Write {
    pub index: u64,
    pub sent_ns: i64,
    pub acked_ns: i64,
}

/// The answered measured writes and the carrier's send time.
#[derive(Debug)]
pub struct Outcome {
    pub writes: Vec<Write>,
    pub carrier: Write,
}

const TIMEOUT: Duration = Duration::from_secs(30);

/// Payload of write `n`: key `n mod keys`, `value_size` bytes.
fn payload(n: u64, keys: u64, value_size: usize) -> Vec<u8> {
    put_payload(n % keys, &vec![(n % 251) as u8; value_size])
}

/// Send times of an open-loop load, relative to its start.
fn schedule(load: &Load, seed: u64) -> Vec<Duration> {
    match *load {
        Load::Poisson { rate, writes } => {
            let mut rng = StdRng::seed_from_u64(seed);
            let mut t = 0.0;
            (0..writes)
                .map(|_| {
                    // Exponential gaps: -ln(U)/rate, U in (0, 1].
                    let u: f64 = 1.0 - rng.random::<f64>();
                    t += -u.ln() / rate;
                    Duration::from_secs_f64(t)
                })
                .collect()
        }
        Load::Bursty { bursts, size, gap } => (0..bursts)
            .flat_map(|b| (0..size).map(move |_| gap * b as u32))
            .collect(),
        Load::Closed { .. } => Vec::new(),
    }
}

/// Runs `load` against the primary at `addr`, then, `gap` after the last measured write
/// was answered, one unmeasured carrier write (a piggybacked commit needs a next write).
pub fn run(
    addr: SocketAddr,
    load: &Load,
    seed: u64,
    gap: Duration,
    keys: u64,
    value_size: usize,
) -> anyhow::Result<Outcome> {
    let clock = MonoClock::new();
    let mut writes = match *load {
        Load::Closed { clients, duration } => {
            closed(addr, clients, duration, &clock, keys, value_size)?
        }
        _ => open(addr, &schedule(load, seed), &clock, keys, value_size)?,
    };
    writes.sort_by_key(|w| w.index);
    std::thread::sleep(gap);
    let mut c = Client::connect(addr, TIMEOUT)?;
    let sent_ns = clock.now_ns();
    let index = c.write(payload(u64::MAX / 2, keys, value_size))?;
    let carrier = Write {
        index,
        sent_ns,
        acked_ns: clock.now_ns(),
    };
    Ok(Outcome { writes, carrier })
}

/// Open loop on one pipelined connection: a sender on schedule, answers read here.
fn open(
    addr: SocketAddr,
    at: &[Duration],
    clock: &MonoClock,
    keys: u64,
    value_size: usize,
) -> anyhow::Result<Vec<Write>> {
    let (mut tx, mut rx) = Client::connect(addr, TIMEOUT)?.pipeline();
    let sent: Arc<Mutex<HashMap<u64, i64>>> = Arc::default();
    let sent2 = sent.clone();
    let plan: Vec<(Duration, Vec<u8>)> = at
        .iter()
        .enumerate()
        .map(|(n, d)| (*d, payload(n as u64, keys, value_size)))
        .collect();
    let clock2 = *clock;
    let sender = std::thread::spawn(move || -> anyhow::Result<()> {
        let t0 = Instant::now();
        for (due, p) in plan {
            let now = t0.elapsed();
            if due > now {
                std::thread::sleep(due - now);
            }
            let t = clock2.now_ns();
            let id = tx.send(p)?;
            sent2.lock().expect("lock").insert(id, t);
        }
        Ok(())
    });
    let mut out = Vec::with_capacity(at.len());
    for _ in 0..at.len() {
        let (id, r) = rx.recv().context("waiting for a write's answer")?;
        let acked_ns = clock.now_ns();
        let index = r.map_err(|m| anyhow::anyhow!("write refused: {m}"))?;
        // The sender records the send time right after the send returns; the answer
        // cannot beat it by more than that instant, so wait for the entry.
        let sent_ns = loop {
            if let Some(t) = sent.lock().expect("lock").get(&id).copied() {
                break t;
            }
            std::thread::yield_now();
        };
        out.push(Write {
            index,
            sent_ns,
            acked_ns,
        });
    }
    sender
        .join()
        .map_err(|_| anyhow::anyhow!("sender panicked"))??;
    Ok(out)
}

/// Closed loop: `clients` connections, each with one write outstanding, for `duration`.
fn closed(
    addr: SocketAddr,
    clients: usize,
    duration: Duration,
    clock: &MonoClock,
    keys: u64,
    value_size: usize,
) -> anyhow::Result<Vec<Write>> {
    if clients == 0 {
        bail!("the closed loop needs at least one client");
    }
    let end = Instant::now() + duration;
    let threads: Vec<_> = (0..clients)
        .map(|c| {
            let clock = *clock;
            std::thread::spawn(move || -> anyhow::Result<Vec<Write>> {
                let mut cl = Client::connect(addr, TIMEOUT)?;
                let mut out = Vec::new();
                let mut n = c as u64;
                while Instant::now() < end {
                    let sent_ns = clock.now_ns();
                    let index = cl.write(payload(n, keys, value_size))?;
                    out.push(Write {
                        index,
                        sent_ns,
                        acked_ns: clock.now_ns(),
                    });
                    n += clients as u64;
                }
                Ok(out)
            })
        })
        .collect();
    let mut all = Vec::new();
    for t in threads {
        all.extend(t.join().map_err(|_| anyhow::anyhow!("client panicked"))??);
    }
    Ok(all)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedules_have_the_asked_writes_in_order() {
        let p = schedule(
            &Load::Poisson {
                rate: 100.0,
                writes: 1000,
            },
            1,
        );
        assert_eq!(p.len(), 1000);
        assert!(p.windows(2).all(|w| w[0] <= w[1]));
        // The same seed draws the same arrivals for every policy.
        assert_eq!(
            p,
            schedule(
                &Load::Poisson {
                    rate: 100.0,
                    writes: 1000
                },
                1
            )
        );
        let b = schedule(
            &Load::Bursty {
                bursts: 3,
                size: 2,
                gap: Duration::from_millis(10),
            },
            1,
        );
        assert_eq!(b.len(), 6);
        assert_eq!(b[5], Duration::from_millis(20));
    }
}
