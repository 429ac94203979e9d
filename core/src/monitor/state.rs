//! The monitor's logic apart from I/O and clocks: requests are validated against the
//! working map (committed map plus pending changes) and staged; [`MonitorState::take_proposal`]
//! batches every staged change into one proposal once the propose interval allows; after
//! the caller has made the proposal durable, [`MonitorState::committed`] makes it the
//! committed map and the waiting clients get their answers.
//!
//! Timing follows Ceph's `PaxosService::should_propose`: a proposal happens no earlier
//! than `propose_interval` after the previous commit, and no earlier than `min_wait`
//! after the first staged change (to gather a batch when the monitor was idle).
//!
//! An id allocation for a (node, device) whose daemon is in the committed map but not
//! `up` (an init that failed or was interrupted) answers with that daemon's id, so that
//! running init again resumes instead of being refused or stranding the old id.

use std::time::{Duration, Instant};

use super::error::MonitorError;
use super::map::{Change, ClusterMap, DaemonState};
#[cfg(test)]
use super::proto::Slot;
use super::proto::{Outcome, Request, Response};
use uuid::Uuid;

/// Proposal timing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProposeConfig {
    /// Least time between two commits (Ceph: `paxos_propose_interval`, 1 s).
    pub propose_interval: Duration,
    /// Least time a change waits for company when the monitor was idle (Ceph:
    /// `paxos_min_wait`, 50 ms). Capped at `propose_interval`.
    pub min_wait: Duration,
}

impl ProposeConfig {
    /// `min_wait` = 0: an idle monitor proposes a lone change at once.
    pub fn with_interval(propose_interval: Duration) -> ProposeConfig {
        ProposeConfig {
            propose_interval,
            min_wait: Duration::ZERO,
        }
    }
}

/// The answer a staged request gets once its proposal is committed.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Reply {
    Ids(Vec<u32>),
    Committed,
}

/// A batch of changes to make durable, with the clients waiting for it.
#[derive(Debug)]
pub struct Proposal<W> {
    pub epoch: u64,
    /// The map once the proposal is committed (epoch `epoch`).
    pub next: ClusterMap,
    pub changes: Vec<Change>,
    /// Each waiting client and its answer (sent after the commit).
    pub replies: Vec<(W, Response)>,
}

/// The monitor's state. `W` identifies a waiting client (a channel in the server, a
/// number in tests).
#[derive(Debug)]
pub struct MonitorState<W> {
    config: ProposeConfig,
    committed: ClusterMap,
    working: ClusterMap,
    pending: Vec<Change>,
    waiting: Vec<(W, Reply)>,
    first_pending: Option<Instant>,
    last_commit: Option<Instant>,
    in_flight: Option<ClusterMap>,
}

impl<W> MonitorState<W> {
    pub fn new(map: ClusterMap, config: ProposeConfig) -> MonitorState<W> {
        MonitorState {
            config,
            working: map.clone(),
            committed: map,
            pending: Vec::new(),
            waiting: Vec::new(),
            first_pending: None,
            last_commit: None,
            in_flight: None,
        }
    }

    pub fn committed_map(&self) -> &ClusterMap {
        &self.committed
    }

    /// Clients whose changes are staged and wait for a proposal.
    pub fn waiting(&self) -> usize {
        self.waiting.len()
    }

    /// Handles a request. Reads are answered at once (`Ok(Some)`); valid changes are
    /// staged and `waiter` waits for the proposal (`Ok(None)`); invalid ones are refused.
    pub fn submit(
        &mut self,
        req: Request,
        waiter: W,
        now: Instant,
    ) -> Result<Option<Response>, MonitorError> {
        let (changes, reply) = match req {
            Request::Ping => {
                return Ok(Some(Response::Pong {
                    epoch: self.committed.epoch,
                }))
            }
            Request::GetMap => {
                return Ok(Some(Response::Map {
                    map: self.committed.clone(),
                }))
            }
            Request::Alloc { slots } => {
                if slots.is_empty() {
                    return Err(MonitorError::BadRequest(
                        "alloc needs at least one device".into(),
                    ));
                }
                let mut seen = std::collections::HashSet::new();
                for s in &slots {
                    if !seen.insert((&s.node, &s.device)) {
                        return Err(MonitorError::BadRequest(format!(
                            "device {} of node {} listed twice in one alloc request",
                            s.device, s.node
                        )));
                    }
                }
                // The id of the slot's daemon if the committed map has it, not up, and no
                // change of it is staged or being committed (a rerun; a concurrent
                // request for the same device is refused below instead); else the
                // smallest free ids.
                let reuse: Vec<Option<u32>> = slots
                    .iter()
                    .map(|s| {
                        self.committed
                            .daemon_of(&s.node, &s.device)
                            .filter(|e| e.state != DaemonState::Up)
                            .filter(|e| self.working.daemons.get(&e.id) == Some(e))
                            .map(|e| e.id)
                    })
                    .collect();
                let mut fresh = self
                    .working
                    .smallest_free(reuse.iter().filter(|r| r.is_none()).count())
                    .into_iter();
                let mut ids = Vec::with_capacity(slots.len());
                for r in reuse {
                    match r.or_else(|| fresh.next()) {
                        Some(id) => ids.push(id),
                        None => return Err(MonitorError::BadRequest("no free daemon id".into())),
                    }
                }
                // A daemon allocated again (not up) keeps its uuid, so a device it formatted
                // is its own; a fresh id gets a fresh uuid, so a device formatted for an
                // earlier daemon of that id (removed since) is not taken for its.
                let changes: Vec<Change> = ids
                    .iter()
                    .zip(slots)
                    .map(|(&id, s)| Change::Alloc {
                        id,
                        node: s.node,
                        device: s.device,
                        host: s.host,
                        uuid: Some(
                            self.working
                                .daemons
                                .get(&id)
                                .and_then(|e| e.uuid)
                                .unwrap_or_else(Uuid::new_v4),
                        ),
                    })
                    .collect();
                (changes, Reply::Ids(ids))
            }
            Request::Register { id, uuid, key } => {
                (vec![Change::Register { id, uuid, key }], Reply::Committed)
            }
            Request::Report { id, outcome } => {
                let c = match outcome {
                    Outcome::Up => Change::Up { id },
                    Outcome::Failed { reason } => Change::Failed { id, reason },
                };
                (vec![c], Reply::Committed)
            }
            Request::Remove { id } => (vec![Change::Remove { id }], Reply::Committed),
        };
        // All or nothing: check on a scratch copy when there are several changes.
        if changes.len() == 1 {
            self.working.apply(&changes[0])?;
        } else {
            let mut scratch = self.working.clone();
            for c in &changes {
                scratch.apply(c)?;
            }
            self.working = scratch;
        }
        self.pending.extend(changes);
        self.waiting.push((waiter, reply));
        self.first_pending.get_or_insert(now);
        Ok(None)
    }

    /// When the next proposal may happen (`None`: nothing staged, or one in flight).
    pub fn deadline(&self) -> Option<Instant> {
        if self.in_flight.is_some() {
            return None;
        }
        let first = self.first_pending?;
        let gathered = first + self.config.min_wait.min(self.config.propose_interval);
        Some(match self.last_commit {
            Some(t) => gathered.max(t + self.config.propose_interval),
            None => gathered,
        })
    }

    /// Takes every staged change as the next proposal if its time has come.
    pub fn take_proposal(&mut self, now: Instant) -> Option<Proposal<W>> {
        if now < self.deadline()? {
            return None;
        }
        let epoch = self.committed.epoch + 1;
        let mut next = self.working.clone();
        next.epoch = epoch;
        self.in_flight = Some(next);
        self.first_pending = None;
        let replies = self
            .waiting
            .drain(..)
            .map(|(w, r)| {
                let resp = match r {
                    Reply::Ids(ids) => Response::Ids { ids, epoch },
                    Reply::Committed => Response::Committed { epoch },
                };
                (w, resp)
            })
            .collect();
        Some(Proposal {
            epoch,
            next: self.in_flight.clone()?,
            changes: std::mem::take(&mut self.pending),
            replies,
        })
    }

    /// The monitor stops: every staged change is dropped and the clients that waited for
    /// them are handed back, to be told that nothing was committed. A proposal already
    /// taken is not affected (its commit decides).
    pub fn abort(&mut self) -> Vec<W> {
        self.pending.clear();
        self.first_pending = None;
        self.working = self
            .in_flight
            .clone()
            .unwrap_or_else(|| self.committed.clone());
        self.waiting.drain(..).map(|(w, _)| w).collect()
    }

    /// The proposal taken last is durable: it becomes the committed map.
    pub fn committed(&mut self, now: Instant) {
        if let Some(m) = self.in_flight.take() {
            self.working.epoch = m.epoch;
            self.committed = m;
            self.last_commit = Some(now);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use uuid::Uuid;

    const MS: Duration = Duration::from_millis(1);

    fn alloc(node: &str, devs: &[&str]) -> Request {
        Request::Alloc {
            slots: devs
                .iter()
                .map(|d| Slot {
                    node: node.into(),
                    device: d.to_string(),
                    host: String::new(),
                })
                .collect(),
        }
    }

    fn state(interval_ms: u64) -> MonitorState<u32> {
        MonitorState::new(
            ClusterMap::new(Uuid::new_v4()),
            ProposeConfig::with_interval(Duration::from_millis(interval_ms)),
        )
    }

    fn register(id: u32, uuid: Uuid, key: &str) -> Request {
        Request::Register {
            id,
            uuid,
            key: key.into(),
        }
    }

    fn up(id: u32) -> Request {
        Request::Report {
            id,
            outcome: Outcome::Up,
        }
    }

    fn failed(id: u32, reason: &str) -> Request {
        Request::Report {
            id,
            outcome: Outcome::Failed {
                reason: reason.into(),
            },
        }
    }

    /// Proposes what is staged and commits it, both at `t`.
    fn propose_and_commit(s: &mut MonitorState<u32>, t: Instant) {
        s.take_proposal(t).unwrap();
        s.committed(t);
    }

    #[test]
    fn changes_batch_into_one_proposal_per_interval() {
        let t0 = Instant::now();
        let mut s = state(50);
        assert!(s.submit(alloc("a", &["/d0"]), 1, t0).unwrap().is_none());
        // Idle monitor, min_wait 0: propose at once.
        let p = s.take_proposal(t0).unwrap();
        assert_eq!(p.epoch, 1);
        assert_eq!(
            p.replies,
            vec![(
                1,
                Response::Ids {
                    ids: vec![0],
                    epoch: 1
                }
            )]
        );
        s.committed(t0 + MS);
        // Three more requests within the interval: one proposal, not before t0+1+50 ms.
        s.submit(alloc("a", &["/d1", "/d2"]), 2, t0 + 2 * MS)
            .unwrap();
        s.submit(alloc("b", &["/d0"]), 3, t0 + 3 * MS).unwrap();
        s.submit(Request::Remove { id: 0 }, 4, t0 + 4 * MS).unwrap();
        assert!(s.take_proposal(t0 + 50 * MS).is_none());
        assert_eq!(s.deadline(), Some(t0 + 51 * MS));
        let p = s.take_proposal(t0 + 51 * MS).unwrap();
        assert_eq!(p.epoch, 2);
        assert_eq!(p.changes.len(), 4);
        assert_eq!(
            p.replies,
            vec![
                (
                    2,
                    Response::Ids {
                        ids: vec![1, 2],
                        epoch: 2
                    }
                ),
                (
                    3,
                    Response::Ids {
                        ids: vec![3],
                        epoch: 2
                    }
                ),
                (4, Response::Committed { epoch: 2 }),
            ]
        );
        // Until committed, reads see epoch 1.
        assert_eq!(s.committed_map().epoch, 1);
        s.committed(t0 + 52 * MS);
        assert_eq!(s.committed_map().epoch, 2);
        assert_eq!(
            s.committed_map()
                .daemons
                .keys()
                .copied()
                .collect::<Vec<_>>(),
            vec![1, 2, 3]
        );
        // Id 0 is free again: smallest-free allocation reuses it.
        s.submit(alloc("c", &["/x", "/y"]), 5, t0 + 60 * MS)
            .unwrap();
        let p = s.take_proposal(t0 + 200 * MS).unwrap();
        assert_eq!(
            p.replies[0].1,
            Response::Ids {
                ids: vec![0, 4],
                epoch: 3
            }
        );
    }

    #[test]
    fn no_second_proposal_while_one_is_in_flight() {
        let t0 = Instant::now();
        let mut s = state(0);
        s.submit(alloc("a", &["/d0"]), 1, t0).unwrap();
        let _p = s.take_proposal(t0).unwrap();
        s.submit(alloc("a", &["/d1"]), 2, t0).unwrap();
        assert!(s.take_proposal(t0 + 10 * MS).is_none());
        s.committed(t0 + 10 * MS);
        let p = s.take_proposal(t0 + 10 * MS).unwrap();
        assert_eq!(
            p.replies,
            vec![(
                2,
                Response::Ids {
                    ids: vec![1],
                    epoch: 2
                }
            )]
        );
    }

    #[test]
    fn invalid_requests_are_refused_and_stage_nothing() {
        let t0 = Instant::now();
        let mut s = state(10);
        let e = s
            .submit(register(9, Uuid::new_v4(), "k"), 1, t0)
            .unwrap_err();
        assert!(matches!(e, MonitorError::UnknownDaemon { id: 9 }));
        assert!(s.submit(alloc("a", &["/d", "/d"]), 2, t0).is_err());
        assert!(s.submit(alloc("a", &[]), 2, t0).is_err());
        assert_eq!(s.deadline(), None);
        // A batch whose second device is taken allocates nothing.
        s.submit(alloc("a", &["/d"]), 3, t0).unwrap();
        assert!(s.submit(alloc("a", &["/e", "/d"]), 4, t0).is_err());
        let p = s.take_proposal(t0).unwrap();
        assert_eq!(p.changes.len(), 1);
    }

    #[test]
    fn lifecycle_through_proposals() {
        let t0 = Instant::now();
        let mut s = state(0);
        s.submit(alloc("a", &["/d0", "/d1"]), 1, t0).unwrap();
        propose_and_commit(&mut s, t0);
        let u = s.committed_map().daemons[&0]
            .uuid
            .expect("allocation gives a uuid");
        s.submit(register(0, u, "k0"), 2, t0).unwrap();
        s.submit(up(0), 3, t0).unwrap();
        s.submit(failed(1, "refused"), 4, t0).unwrap();
        propose_and_commit(&mut s, t0);
        let m = s.committed_map();
        assert_eq!(m.daemons[&0].state, DaemonState::Up);
        assert_eq!(m.daemons[&0].uuid, Some(u));
        assert_eq!(m.daemons[&1].state, DaemonState::Failed);
        assert_eq!(m.daemons[&1].reason.as_deref(), Some("refused"));
    }

    #[test]
    fn min_wait_gathers_a_batch_on_an_idle_monitor() {
        let t0 = Instant::now();
        let mut s: MonitorState<u32> = MonitorState::new(
            ClusterMap::new(Uuid::new_v4()),
            ProposeConfig {
                propose_interval: 100 * MS,
                min_wait: 20 * MS,
            },
        );
        s.submit(alloc("a", &["/d0"]), 1, t0).unwrap();
        assert!(s.take_proposal(t0 + 19 * MS).is_none());
        s.submit(alloc("b", &["/d0"]), 2, t0 + 5 * MS).unwrap();
        let p = s.take_proposal(t0 + 20 * MS).unwrap();
        assert_eq!(p.replies.len(), 2);
        s.committed(t0 + 21 * MS);
        // Not idle any more: the interval after the commit rules.
        s.submit(alloc("c", &["/d0"]), 3, t0 + 200 * MS).unwrap();
        assert_eq!(s.deadline(), Some(t0 + 220 * MS));
    }

    #[test]
    fn abort_hands_back_the_waiting_clients_and_drops_their_changes() {
        let t0 = Instant::now();
        let mut s = state(50);
        s.submit(alloc("a", &["/d0"]), 1, t0).unwrap();
        let p = s.take_proposal(t0).unwrap();
        assert_eq!(p.next.epoch, 1);
        assert_eq!(p.next.daemons.len(), 1);
        // Staged behind the proposal in flight.
        s.submit(alloc("a", &["/d1"]), 2, t0).unwrap();
        s.submit(alloc("a", &["/d2"]), 3, t0).unwrap();
        assert_eq!(s.waiting(), 2);
        assert_eq!(s.abort(), vec![2, 3]);
        assert_eq!(s.waiting(), 0);
        // The proposal in flight still commits; the aborted changes are gone.
        s.committed(t0 + MS);
        assert_eq!(s.deadline(), None);
        assert_eq!(s.committed_map().daemons.len(), 1);
        s.submit(alloc("a", &["/d1"]), 4, t0 + 100 * MS).unwrap();
        let p = s.take_proposal(t0 + 100 * MS).unwrap();
        assert_eq!(
            p.replies[0].1,
            Response::Ids {
                ids: vec![1],
                epoch: 2
            }
        );
    }

    #[test]
    fn a_rerun_gets_the_ids_of_daemons_that_are_not_up() {
        let t0 = Instant::now();
        let mut s = state(0);
        s.submit(alloc("a", &["/d0", "/d1", "/d2"]), 1, t0).unwrap();
        propose_and_commit(&mut s, t0);
        // d0 up, d1 failed, d2 left `new` by an interrupted run.
        let u = s.committed_map().daemons[&0].uuid.unwrap();
        s.submit(register(0, u, "k"), 2, t0).unwrap();
        s.submit(failed(1, "refused"), 3, t0).unwrap();
        propose_and_commit(&mut s, t0);
        s.submit(up(0), 4, t0).unwrap();
        propose_and_commit(&mut s, t0);
        // Running init again for d1, d2 and a new device: ids 1 and 2 again, 3 new.
        s.submit(alloc("a", &["/d1", "/d2", "/d3"]), 5, t0).unwrap();
        let p = s.take_proposal(t0).unwrap();
        assert_eq!(
            p.replies[0].1,
            Response::Ids {
                ids: vec![1, 2, 3],
                epoch: 4
            }
        );
        s.committed(t0);
        let m = s.committed_map();
        assert!((1..4).all(|i| m.daemons[&i].state == DaemonState::New));
        // d0 is up: refused, with the reason.
        let e = s.submit(alloc("a", &["/d0"]), 6, t0).unwrap_err();
        assert!(
            e.to_string().contains("already belongs to daemon 0 (up)"),
            "{e}"
        );
    }
}
