//! One run's figures from the replicas' timelines and the client's writes, all on
//! CLOCK_MONOTONIC.

use anyhow::{bail, Context};
use blocklab::repl::events::Event;
use harness::LatencyHist;

use crate::workload::Outcome;

use blocklab::repl::check::Life;

/// What one run measured.
#[derive(Default)]
pub struct Measured {
    /// From the primary's commit to each secondary's apply, over measured writes.
    pub apply: LatencyHist,
    /// From the primary's commit to each secondary learning it.
    pub learn: LatencyHist,
    /// From the client's send to its answer.
    pub write: LatencyHist,
    /// Empty appends the primary sent and empty appends the secondaries answered, between
    /// the first measured write and the carrier.
    pub empty_messages: u64,
    pub empty_responses: u64,
    /// Durable writes that wrote a measured entry, summed over replicas.
    pub log_flushes: u64,
    pub writes: u64,
    /// Achieved write rate (measured writes per second of the measured window).
    pub rate_per_s: f64,
    /// Entries a secondary applied before the primary committed them.
    pub violations: u64,
}

/// The first time a commit event covering `i` appears (`[i]`, slot 0 unused).
fn first_cover(
    life: &Life,
    upto: u64,
    pick: impl Fn(&Event) -> Option<(u64, u64)>,
) -> Vec<Option<i64>> {
    let mut at = vec![None; upto as usize + 1];
    for (e, t) in life {
        if let Some((first, last)) = pick(e) {
            for slot in at
                .iter_mut()
                .take(last.min(upto) as usize + 1)
                .skip(first.max(1) as usize)
            {
                slot.get_or_insert(*t);
            }
        }
    }
    at
}

fn commits(e: &Event) -> Option<(u64, u64)> {
    match *e {
        Event::Commit { commit } => Some((1, commit)),
        _ => None,
    }
}

fn applies(e: &Event) -> Option<(u64, u64)> {
    match *e {
        Event::Apply { first, last } => Some((first, last)),
        _ => None,
    }
}

/// The counters (a, b) of `life` at time `t` (the last `counters` record at or before it).
fn counters_at(life: &Life, t: i64) -> (u64, u64) {
    life.iter()
        .filter(|(_, at)| *at <= t)
        .filter_map(|(e, _)| match *e {
            Event::Counters {
                empty_appends,
                empty_responses,
                ..
            } => Some((empty_appends, empty_responses)),
            _ => None,
        })
        .next_back()
        .unwrap_or((0, 0))
}

/// Whether every secondary's timeline shows `index` applied.
pub fn all_applied(secondaries: &[Life], index: u64) -> bool {
    secondaries
        .iter()
        .all(|l| first_cover(l, index, applies)[index as usize].is_some())
}

/// Measures a run: `primary` and `secondaries` are each replica's one life.
pub fn measure(primary: &Life, secondaries: &[Life], out: &Outcome) -> anyhow::Result<Measured> {
    let Some(last) = out.writes.iter().map(|w| w.index).max() else {
        bail!("the run has no measured write");
    };
    let committed = first_cover(primary, last, commits);
    let learned: Vec<_> = secondaries
        .iter()
        .map(|l| first_cover(l, last, commits))
        .collect();
    let applied: Vec<_> = secondaries
        .iter()
        .map(|l| first_cover(l, last, applies))
        .collect();
    let mut m = Measured {
        writes: out.writes.len() as u64,
        ..Measured::default()
    };
    let ns = |d: i64| std::time::Duration::from_nanos(d.max(0) as u64);
    for w in &out.writes {
        let i = w.index as usize;
        let c = committed[i].with_context(|| format!("the primary never committed write {i}"))?;
        m.write.record_us(ns(w.acked_ns - w.sent_ns));
        for (s, (a, l)) in applied.iter().zip(&learned).enumerate() {
            let a = a[i].with_context(|| format!("secondary {} never applied write {i}", s + 1))?;
            let l = l[i].with_context(|| {
                format!("secondary {} never learned write {i} committed", s + 1)
            })?;
            m.apply.record_us(ns(a - c));
            m.learn.record_us(ns(l - c));
        }
    }
    let t0 = out
        .writes
        .iter()
        .map(|w| w.sent_ns)
        .min()
        .expect("non-empty")
        - 1;
    let t1 = out.carrier.sent_ns;
    let (p0, _) = counters_at(primary, t0);
    let (p1, _) = counters_at(primary, t1);
    m.empty_messages = p1 - p0;
    for l in secondaries {
        let (_, r0) = counters_at(l, t0);
        let (_, r1) = counters_at(l, t1);
        m.empty_responses += r1 - r0;
    }
    m.log_flushes = std::iter::once(primary)
        .chain(secondaries)
        .flat_map(|l| l.iter())
        .filter(|(e, _)| matches!(*e, Event::Persist { first, .. } if first <= last))
        .count() as u64;
    let end = out
        .writes
        .iter()
        .map(|w| w.acked_ns)
        .max()
        .expect("non-empty");
    let span = (end - t0) as f64 / 1e9;
    m.rate_per_s = if span > 0.0 {
        m.writes as f64 / span
    } else {
        0.0
    };
    Ok(m)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::workload::Write;

    #[test]
    fn lags_counters_and_flushes_come_from_the_timelines() {
        let primary = vec![
            (
                Event::Counters {
                    empty_appends: 2,
                    empty_responses: 0,
                    probes: 2,
                },
                5,
            ),
            (
                Event::Persist {
                    first: 1,
                    last: 1,
                    flushes: 1,
                },
                15,
            ),
            (Event::Commit { commit: 1 }, 20),
            (
                Event::Counters {
                    empty_appends: 4,
                    empty_responses: 0,
                    probes: 2,
                },
                21,
            ),
            (
                Event::Persist {
                    first: 2,
                    last: 2,
                    flushes: 2,
                },
                500,
            ),
        ];
        let sec = vec![
            (
                Event::Persist {
                    first: 1,
                    last: 1,
                    flushes: 1,
                },
                12,
            ),
            (
                Event::Counters {
                    empty_appends: 0,
                    empty_responses: 1,
                    probes: 0,
                },
                24,
            ),
            (Event::Commit { commit: 1 }, 25),
            (Event::Apply { first: 1, last: 1 }, 3020),
        ];
        let out = Outcome {
            writes: vec![Write {
                index: 1,
                sent_ns: 10,
                acked_ns: 1030,
            }],
            carrier: Write {
                index: 2,
                sent_ns: 400,
                acked_ns: 600,
            },
        };
        let m = measure(&primary, std::slice::from_ref(&sec), &out).unwrap();
        assert_eq!(m.apply.percentiles().max, 3);
        assert_eq!(m.write.percentiles().max, 1);
        // Two notifications sent after the first write, one answered: 3 extra messages.
        assert_eq!((m.empty_messages, m.empty_responses), (2, 1));
        // One flush of write 1 on each replica; write 2 is the carrier's.
        assert_eq!(m.log_flushes, 2);
        // A secondary that never applied is an error, not a zero.
        let partial: Vec<_> = sec
            .into_iter()
            .filter(|(e, _)| !matches!(e, Event::Apply { .. }))
            .collect();
        assert!(measure(&primary, &[partial], &out).is_err());
    }
}
