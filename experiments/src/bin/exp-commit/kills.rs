//! Failures in the idle window: SIGKILL the primary after a commit and before its idle
//! notification arrives, or after it arrived, or a secondary in the idle window; restart
//! it, write once more, and check ([`blocklab::repl::check`]) that no secondary applied an
//! entry the primary had not committed and that every replica converged to the same log
//! and applied state.
//!
//! The links are slowed to a one-way delay of [`ONE_WAY`] so the window is wide: the
//! client's answer comes at the commit, and a notification sent then is still inside the
//! link proxy when the kill lands. Killing the primary "before the notification" also
//! kills the proxies (what was in flight from the dead node is lost).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use blocklab::dev::{Device, UringEngine};
use blocklab::repl::check::{self, Life, Violation};
use blocklab::repl::client::Client;
use blocklab::repl::events::{Event, MonoClock};
use blocklab::repl::kv::put_payload;
use blocklab::repl::log::LogStore;
use blocklab::repl::replica::{PolicySpec, Regions};
use blocklab::repl::{Entry, NodeId};
use harness::repl_cluster::{Cluster, ClusterSpec};

use crate::measure::all_applied;

/// One-way delay of every link during kill runs.
pub const ONE_WAY: Duration = Duration::from_millis(25);

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "snake_case")]
#[value(rename_all = "snake_case")]
pub enum Scenario {
    /// SIGKILL the primary (and the links) once a write is committed, before the idle
    /// notification reaches the secondaries.
    PrimaryBeforeNotify,
    /// SIGKILL the primary once every secondary applied the write.
    PrimaryAfterNotify,
    /// SIGKILL a secondary once the write is committed, before its notification.
    SecondaryInIdle,
}

impl Scenario {
    pub fn name(self) -> &'static str {
        match self {
            Scenario::PrimaryBeforeNotify => "primary_before_notify",
            Scenario::PrimaryAfterNotify => "primary_after_notify",
            Scenario::SecondaryInIdle => "secondary_in_idle",
        }
    }
    pub const ALL: [Scenario; 3] = [
        Scenario::PrimaryBeforeNotify,
        Scenario::PrimaryAfterNotify,
        Scenario::SecondaryInIdle,
    ];
}

/// One kill run, as a row of exp-commit-kills.csv.
#[derive(Debug, serde::Serialize)]
pub struct KillRow {
    pub scenario: &'static str,
    pub policy: &'static str,
    pub replicas: usize,
    pub repetition: u32,
    /// Whether the kill landed where the scenario says (checked from the timelines).
    pub window_hit: bool,
    pub applied_uncommitted: u64,
    pub not_converged: u64,
    pub diverged: u64,
    /// The sum of the three: must be 0.
    pub violations: u64,
}

const WAIT: Duration = Duration::from_secs(20);

/// Waits until every secondary's current life applied `index`.
fn await_applied(c: &Cluster, index: u64) -> anyhow::Result<()> {
    let deadline = Instant::now() + WAIT;
    loop {
        let lives: Vec<_> = (1..c.replicas() as NodeId)
            .map(|id| c.current_events(id))
            .collect::<anyhow::Result<_>>()?;
        if all_applied(&lives, index) {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("the secondaries did not all apply index {index} within {WAIT:?}");
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// When the current life of `id` applied `index`, if it did.
fn applied_at(c: &Cluster, id: NodeId, index: u64) -> anyhow::Result<Option<i64>> {
    Ok(c.current_events(id)?.iter().find_map(|(e, t)| match *e {
        Event::Apply { first, last } if first <= index && index <= last => Some(*t),
        _ => None,
    }))
}

fn write(c: &Cluster, n: u64) -> anyhow::Result<u64> {
    let mut cl = Client::connect(c.addr(0)?, WAIT)?;
    Ok(cl.write(put_payload(n, format!("value {n}").as_bytes()))?)
}

/// The log on `path` (read after its replica stopped).
fn read_log(path: &PathBuf, log_len: u64, data_len: u64) -> anyhow::Result<Vec<Entry>> {
    let (r, _) = Regions::detect(path, log_len, data_len)?;
    let mut eng = UringEngine::with_queue_depth(4)?;
    let dev = Device::open(path).with_context(|| format!("opening {}", path.display()))?;
    let (_, entries) = LogStore::open(&mut eng, dev, r.log_offset, r.log_len)
        .with_context(|| format!("recovering the log on {}", path.display()))?;
    Ok(entries)
}

/// Runs one scenario on a fresh cluster from `spec` (its delay is set to [`ONE_WAY`]).
pub fn run(
    mut spec: ClusterSpec,
    scenario: Scenario,
    repetition: u32,
    regions: (u64, u64),
) -> anyhow::Result<KillRow> {
    spec.one_way = ONE_WAY;
    spec.jitter = 0.0;
    let policy: PolicySpec = spec.policy;
    let devices = spec.devices.clone();
    let n = devices.len();
    let mut c = Cluster::start(spec)?;
    c.await_connected(WAIT)?;
    for k in 0..3 {
        write(&c, k)?;
    }
    let before = write(&c, 3)?;
    await_applied(&c, before)?;
    let clock = MonoClock::new();
    let w = write(&c, 4)?;
    let (victim, window_hit) = match scenario {
        Scenario::PrimaryBeforeNotify => {
            c.kill(0);
            c.kill_links();
            let t = clock.now_ns();
            let mut hit = true;
            for id in 1..n as NodeId {
                hit &= applied_at(&c, id, w)?.is_none_or(|a| a > t);
            }
            (0, hit)
        }
        Scenario::PrimaryAfterNotify => {
            await_applied(&c, w)?;
            c.kill(0);
            (0, true)
        }
        Scenario::SecondaryInIdle => {
            let victim = n as NodeId - 1;
            c.kill(victim);
            let t = clock.now_ns();
            (victim, applied_at(&c, victim, w)?.is_none_or(|a| a > t))
        }
    };
    if victim == 0 {
        c.restart_links()?;
    }
    c.restart(victim)?;
    c.await_connected(WAIT)?;
    let last = write(&c, 5)?;
    await_applied(&c, last)?;
    let primary = c.events(0)?;
    let secondaries: Vec<(NodeId, Vec<Life>)> = (1..n as NodeId)
        .map(|id| Ok((id, c.events(id)?)))
        .collect::<anyhow::Result<_>>()?;
    let last_lives: Vec<(NodeId, u64)> = secondaries
        .iter()
        .map(|(id, lives)| (*id, lives.last().map_or(0, |l| check::last_applied(l))))
        .collect();
    c.stop()?;
    let logs: Vec<(NodeId, Vec<Entry>)> = devices
        .iter()
        .enumerate()
        .map(|(id, p)| Ok((id as NodeId, read_log(p, regions.0, regions.1)?)))
        .collect::<anyhow::Result<_>>()?;
    let mut v = check::applied_uncommitted(&primary, &secondaries);
    v.extend(check::converged(last, &logs, &last_lives));
    let count = |f: fn(&Violation) -> bool| v.iter().filter(|x| f(x)).count() as u64;
    let row = KillRow {
        scenario: scenario.name(),
        policy: policy.name(),
        replicas: n,
        repetition,
        window_hit,
        applied_uncommitted: count(|x| matches!(x, Violation::AppliedUncommitted { .. })),
        not_converged: count(|x| matches!(x, Violation::NotConverged { .. })),
        diverged: count(|x| matches!(x, Violation::Diverged { .. })),
        violations: v.len() as u64,
    };
    if !v.is_empty() {
        eprintln!(
            "exp-commit: {} / {}: violations: {v:?}",
            scenario.name(),
            policy
        );
    }
    Ok(row)
}
