//! Membership on a manager: voters added (as learners first) and removed,
//! membership brought back in line with the state's roles, and each
//! voter's MANAGER STATUS as this manager sees it.

use std::{
    collections::BTreeSet,
    time::{Duration, Instant},
};

use openraft::{
    BasicNode, ChangeMembers, ServerState,
    error::{ChangeMembershipError, ClientWriteError, RaftError},
};

use super::{
    manager::{Manager, ManagerStatus, WriteError, raft_id},
    store::NodeId,
};

/// A follower that has not matched what the leader applied this long ago
/// is behind. Under a steady write load a healthy follower trails by the
/// entries in flight (milliseconds' worth); one restarting, stuck or cut
/// off trails by seconds.
const BEHIND_AFTER: Duration = Duration::from_secs(2);

/// Another voter's status: unreachable unless heard from (or, on a
/// follower, while there is a leader); behind while its log (`matched`,
/// known on the leader) misses entries the leader applied
/// [`BEHIND_AFTER`] ago (`then`), by `applied - matched` entries.
fn peer_status(
    heard: bool,
    then: Option<u64>,
    applied: u64,
    matched: Option<u64>,
) -> ManagerStatus {
    if !heard {
        return ManagerStatus::Unreachable;
    }
    match (matched, then) {
        (Some(at), Some(then)) if at < then => ManagerStatus::Behind {
            entries: applied.saturating_sub(at),
        },
        _ => ManagerStatus::Reachable,
    }
}

impl Manager {
    /// Adds a manager as a voter: first as a learner that catches up, then
    /// into the voter set. Leader only.
    pub async fn add_voter(&self, id: NodeId, api_addr: &str) -> Result<(), WriteError> {
        self.lead().await?;
        let m = self.metrics();
        let membership = m.membership_config.membership();
        if membership.voter_ids().any(|v| v == id) {
            return Ok(());
        }
        let node = BasicNode {
            addr: api_addr.to_owned(),
        };
        let change = async {
            self.raft
                .add_learner(id, node, true)
                .await
                .map_err(|e| WriteError::Internal(format!("adding learner {id:016x}: {e}")))?;
            self.change_membership(
                ChangeMembers::AddVoterIds(BTreeSet::from([id])),
                &format!("adding voter {id:016x}"),
            )
            .await
        };
        tokio::time::timeout(Duration::from_secs(30), change)
            .await
            .map_err(|_| {
                WriteError::NoQuorum(format!(
                    "manager {id:016x} at {api_addr} did not catch up within 30 s"
                ))
            })??;
        Ok(())
    }

    /// One membership change; while another is still committing (say a
    /// promotion just before a demotion), waits for it, up to 5 s.
    async fn change_membership(
        &self,
        members: ChangeMembers<NodeId, BasicNode>,
        what: &str,
    ) -> Result<(), WriteError> {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match self.raft.change_membership(members.clone(), false).await {
                Ok(_) => return Ok(()),
                Err(RaftError::APIError(ClientWriteError::ChangeMembershipError(
                    ChangeMembershipError::InProgress(_),
                ))) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => return Err(WriteError::Internal(format!("{what}: {e}"))),
            }
        }
    }

    /// Removes a manager from the voters (demotion). Leader only.
    pub async fn remove_voter(&self, id: NodeId) -> Result<(), WriteError> {
        self.lead().await?;
        let m = self.metrics();
        let membership = m.membership_config.membership();
        if !membership.voter_ids().any(|v| v == id) && membership.get_node(&id).is_none() {
            return Ok(());
        }
        // retain=false: out of the voters and out of the membership (no
        // learner left behind) in one change.
        let change = async {
            self.change_membership(
                ChangeMembers::RemoveVoters(BTreeSet::from([id])),
                &format!("removing voter {id:016x}"),
            )
            .await
        };
        tokio::time::timeout(Duration::from_secs(10), change)
            .await
            .map_err(|_| WriteError::NoQuorum("the membership change did not commit".into()))??;
        Ok(())
    }

    /// Makes the Raft voters agree with the state (leader only): a voter
    /// the state calls a worker is removed. Demotion commits the role first
    /// and removes the voter after; if that step fails (the leader died,
    /// the change timed out), this brings membership and state together.
    /// Voters the state does not know yet (a manager between its Raft join
    /// and its `AddNode`) are left alone.
    pub async fn reconcile_voters(&self) {
        if !self.is_leader() {
            return;
        }
        let voters: Vec<NodeId> = self
            .metrics()
            .membership_config
            .membership()
            .voter_ids()
            .collect();
        let demoted: Vec<NodeId> = self.with_state(|s| {
            s.nodes
                .values()
                .filter(|n| n.spec.role == crate::state::Role::Worker)
                .filter_map(|n| raft_id(&n.id))
                .filter(|id| voters.contains(id))
                .collect()
        });
        for id in demoted {
            match self.remove_voter(id).await {
                Ok(()) => tracing::info!("removed demoted manager {id:016x} from the Raft voters"),
                Err(e) => tracing::warn!("demoted manager {id:016x} is still a voter: {e}"),
            }
        }
    }

    /// Records the applied index (the leader's liveness loop calls this
    /// every tick; leadership lost, the history is dropped).
    pub fn sample_applied(&self) {
        let mut h = self.applied_history.lock().expect("history lock");
        if !self.is_leader() {
            h.clear();
            return;
        }
        let applied = self.metrics().last_applied.map_or(0, |l| l.index);
        h.push_back((Instant::now(), applied));
        while h
            .front()
            .is_some_and(|(t, _)| t.elapsed() > BEHIND_AFTER * 4)
        {
            h.pop_front();
        }
    }

    /// MANAGER STATUS of a Raft member, as this manager sees it (see
    /// [`peer_status`]).
    pub fn manager_status(&self, id: NodeId) -> Option<ManagerStatus> {
        let m = self.metrics();
        let membership = m.membership_config.membership();
        if !membership.voter_ids().any(|v| v == id) {
            return None;
        }
        if m.current_leader == Some(id) {
            return Some(ManagerStatus::Leader);
        }
        if id == self.raft_id {
            return Some(if m.current_leader.is_some() {
                ManagerStatus::Reachable
            } else {
                ManagerStatus::Unreachable
            });
        }
        let fresh = self
            .peers
            .contacts
            .lock()
            .expect("contacts lock")
            .get(&id)
            .is_some_and(|t| t.elapsed() < Duration::from_secs(3));
        // Followers only talk to the leader: they report voters as
        // reachable while they have one, and leave liveness to its view.
        let follower_view = m.state != ServerState::Leader && m.current_leader.is_some();
        // The leader knows how far each follower's log matches its own.
        let matched = m
            .replication
            .as_ref()
            .and_then(|r| r.get(&id).copied())
            .map(|l| l.map_or(0, |l| l.index));
        let then = self
            .applied_history
            .lock()
            .expect("history lock")
            .iter()
            .rev()
            .find(|(t, _)| t.elapsed() >= BEHIND_AFTER)
            .map(|(_, i)| *i);
        Some(peer_status(
            fresh || follower_view,
            then,
            m.last_applied.map_or(0, |l| l.index),
            matched,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_voter_missing_applied_entries_is_behind_not_reachable() {
        assert_eq!(
            peer_status(false, Some(10), 10, Some(10)),
            ManagerStatus::Unreachable
        );
        assert_eq!(
            peer_status(true, Some(10), 10, Some(10)),
            ManagerStatus::Reachable
        );
        // Short of what was applied 2 s ago: behind, by all it misses now.
        assert_eq!(
            peer_status(true, Some(80), 100, Some(36)),
            ManagerStatus::Behind { entries: 64 }
        );
        // Nothing matched yet (a new or restarted follower).
        assert_eq!(
            peer_status(true, Some(400), 500, Some(0)),
            ManagerStatus::Behind { entries: 500 }
        );
        // Trailing by the entries in flight under load is not "behind".
        assert_eq!(
            peer_status(true, Some(80), 100, Some(90)),
            ManagerStatus::Reachable
        );
        // No history yet (a new leader), or a follower's view.
        assert_eq!(
            peer_status(true, None, 100, Some(0)),
            ManagerStatus::Reachable
        );
        assert_eq!(
            peer_status(true, Some(80), 100, None),
            ManagerStatus::Reachable
        );
    }
}
