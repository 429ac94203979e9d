//! The safety check of exp-commit's kill runs, without I/O: from the replicas' timelines
//! ([`super::events`], all on one clock) and their final logs, what went wrong.
//!
//! * An entry applied by a secondary before the primary (any of its lives) had committed
//!   it is [`Violation::AppliedUncommitted`]: a secondary applied beyond the committed
//!   prefix.
//! * After the restarts and a final committed write, a replica whose last life did not
//!   apply everything committed is [`Violation::NotConverged`], and a replica whose log
//!   differs from the primary's in the committed prefix is [`Violation::Diverged`].

use super::events::Event;
use super::protocol::{Entry, NodeId};

/// One life of a replica: its timeline ([`Event`] and CLOCK_MONOTONIC ns).
pub type Life = Vec<(Event, i64)>;

/// What the check found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Violation {
    /// `replica` applied `index` at `applied_ns`; the primary had not committed it by then
    /// (`committed_ns`: when it did, if ever).
    AppliedUncommitted {
        replica: NodeId,
        index: u64,
        applied_ns: i64,
        committed_ns: Option<i64>,
    },
    /// `replica`'s last life applied up to `applied`, short of the final commit `commit`.
    NotConverged {
        replica: NodeId,
        applied: u64,
        commit: u64,
    },
    /// `replica`'s log differs from the primary's at `index` (within the committed prefix).
    Diverged { replica: NodeId, index: u64 },
}

/// When the primary first reported a commit covering each index (`[i]` for index `i`;
/// slot 0 unused), over all its lives.
fn commit_times(primary: &[Life]) -> Vec<Option<i64>> {
    let mut at: Vec<Option<i64>> = vec![None];
    for (e, t) in primary.iter().flatten() {
        if let Event::Commit { commit } = *e {
            let c = commit as usize;
            if at.len() <= c {
                at.resize(c + 1, None);
            }
            for slot in at.iter_mut().take(c + 1).skip(1) {
                if slot.is_none_or(|old| *t < old) {
                    *slot = Some(*t);
                }
            }
        }
    }
    at
}

/// Applies before commit: every entry a secondary applied must have been committed by the
/// primary no later than the apply.
pub fn applied_uncommitted(
    primary: &[Life],
    secondaries: &[(NodeId, Vec<Life>)],
) -> Vec<Violation> {
    let committed = commit_times(primary);
    let mut out = Vec::new();
    for (id, lives) in secondaries {
        for (e, t) in lives.iter().flatten() {
            let Event::Apply { first, last } = *e else {
                continue;
            };
            for index in first..=last {
                let c = committed.get(index as usize).copied().flatten();
                if c.is_none_or(|c| c > *t) {
                    out.push(Violation::AppliedUncommitted {
                        replica: *id,
                        index,
                        applied_ns: *t,
                        committed_ns: c,
                    });
                }
            }
        }
    }
    out
}

/// The highest index a life applied.
pub fn last_applied(life: &[(Event, i64)]) -> u64 {
    life.iter()
        .filter_map(|(e, _)| match e {
            Event::Apply { last, .. } => Some(*last),
            _ => None,
        })
        .max()
        .unwrap_or(0)
}

/// Convergence after the final write: every replica's last life applied up to `commit`,
/// and every log holds the primary's entries up to `commit`.
pub fn converged(
    commit: u64,
    logs: &[(NodeId, Vec<Entry>)],
    last_lives: &[(NodeId, u64)],
) -> Vec<Violation> {
    let mut out = Vec::new();
    for &(replica, applied) in last_lives {
        if applied < commit {
            out.push(Violation::NotConverged {
                replica,
                applied,
                commit,
            });
        }
    }
    let Some((_, reference)) = logs.first() else {
        return out;
    };
    for (replica, log) in &logs[1..] {
        if let Some(index) = (1..=commit).find(|&i| {
            let at = |l: &Vec<Entry>| l.get(i as usize - 1).cloned();
            at(log).is_none() || at(log) != at(reference)
        }) {
            out.push(Violation::Diverged {
                replica: *replica,
                index,
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_apply_after_the_commit_is_fine_and_one_before_it_is_not() {
        let primary = vec![vec![(Event::Commit { commit: 2 }, 100)]];
        let ok = vec![(1, vec![vec![(Event::Apply { first: 1, last: 2 }, 150)]])];
        assert!(applied_uncommitted(&primary, &ok).is_empty());
        let early = vec![(2, vec![vec![(Event::Apply { first: 2, last: 3 }, 90)]])];
        let v = applied_uncommitted(&primary, &early);
        assert_eq!(v.len(), 2, "{v:?}");
        assert!(matches!(
            v[1],
            Violation::AppliedUncommitted {
                index: 3,
                committed_ns: None,
                ..
            }
        ));
    }

    #[test]
    fn divergence_and_lagging_replicas_are_found() {
        let e = |index, term, p: &[u8]| Entry {
            index,
            term,
            payload: p.into(),
        };
        let a = vec![e(1, 1, b"a"), e(2, 1, b"b")];
        let b = vec![e(1, 1, b"a"), e(2, 2, b"b")];
        let v = converged(
            2,
            &[(0, a.clone()), (1, a.clone()), (2, b)],
            &[(1, 2), (2, 1)],
        );
        assert_eq!(
            v,
            vec![
                Violation::NotConverged {
                    replica: 2,
                    applied: 1,
                    commit: 2
                },
                Violation::Diverged {
                    replica: 2,
                    index: 2
                }
            ]
        );
        assert!(converged(2, &[(0, a.clone()), (1, a)], &[(1, 2)]).is_empty());
    }
}
