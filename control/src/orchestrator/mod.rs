//! The orchestrator and its scheduler: which tasks the services want, and
//! on which nodes.
//!
//! [`reconcile`] is a pure function of the state: the commands that bring
//! the tasks to what the services declare. It is idempotent (once its
//! commands are applied, it returns nothing), so the leader can run it after
//! every change, and a leader that fails halfway leaves the next one only
//! the rest of the work.
//!
//! - **Replicated** services get slots `1..=replicas`, one task each; a
//!   task in a slot above `replicas` is removed (scale down), an empty slot
//!   is filled.
//! - **Global** services get one task on every eligible node; a node that
//!   joins gets its task on the next run.
//! - A node that is down, drained, or no longer meets the service's
//!   constraints loses its tasks, and they are placed again elsewhere. A
//!   paused node keeps its tasks but gets no new ones (Swarm's `pause`).
//! - **Scheduling** spreads by task count, as Swarm's spread strategy
//!   does: the eligible node with the fewest tasks of this service, then
//!   the fewest tasks in all, then the lowest node id (so every manager
//!   computes the same placement).
//!
//! Task exits and the restart policy need the executor's reports; they
//! arrive with it.

use std::collections::{BTreeMap, BTreeSet};

use crate::state::{
    Command, RestartCondition, RestartPolicy, Service, ServiceMode, State, Task, TaskState, Touched,
};

pub use model::constraint::{Constraint, Field, parse_constraints, takes};

/// The commands [`reconcile`] wants, and the slots it could not place.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// Removals first, then creations: a task leaves a drained node before
    /// its replacement starts (stop-first).
    pub commands: Vec<Command>,
    /// `(service name, slot, why)`: no node can take it now.
    pub pending: Vec<(String, u32, String)>,
    /// The earliest time a restart delay ends: run again then (ms since
    /// the Unix epoch).
    pub wake_at_ms: Option<u64>,
}

/// Tasks kept per slot, the current one included (Swarm's
/// `--task-history-limit` default).
pub const TASK_HISTORY: usize = 5;

/// Does a slot whose newest task is `last` (not running) get a new task?
/// Yes when that task was stopped on purpose (drain, node down, update);
/// when it ended by itself, as the restart policy says.
fn restart_wanted(policy: &RestartPolicy, last: &Task) -> bool {
    // With a window, the attempts are counted in it (see `reconcile`).
    let counted = policy.window_ms == 0;
    if !last.ended_by_itself() {
        return true;
    }
    let failed = last.observed != TaskState::Complete || last.exit_code.is_some_and(|c| c != 0);
    let condition = match policy.condition {
        RestartCondition::Any => true,
        RestartCondition::OnFailure => failed,
        RestartCondition::None => false,
    };
    condition && (policy.max_attempts == 0 || !counted || last.attempt < policy.max_attempts)
}

/// The commands that bring every service's tasks to its spec. `new_id`
/// names each new task (the proposer picks ids, so the log is
/// deterministic).
///
/// A task that must go is told to stop (`ShutdownTask`) and stays as
/// history; a task that ended by itself is marked so too, and its slot
/// gets a new one if the restart policy says so. Each slot keeps its
/// newest [`TASK_HISTORY`] tasks.
pub fn reconcile(state: &State, now_ms: u64, new_id: impl FnMut() -> String) -> Plan {
    reconcile_some(
        state,
        now_ms,
        &Touched {
            all: true,
            ..Touched::default()
        },
        new_id,
    )
}

/// [`reconcile`] for the services in `only` (what changed since the last
/// run); the others are as their last run left them.
pub fn reconcile_some(
    state: &State,
    now_ms: u64,
    only: &Touched,
    mut new_id: impl FnMut() -> String,
) -> Plan {
    let mut plan = Plan::default();
    let mut creates = Vec::new();
    let mut load = Load::new(state);
    let mut tasks_of: BTreeMap<&str, Vec<&Task>> = BTreeMap::new();
    // The services to look at: all of them, or only those touched (found
    // by id, their tasks through the slot index: O(what changed)).
    let services: Vec<&Service> = if only.all {
        state.services.values().collect()
    } else {
        only.services
            .iter()
            .filter_map(|id| state.services.get(id))
            .collect()
    };
    // Attached tasks are run from outside: not the orchestrator's.
    if only.all {
        for t in state.tasks.values().filter(|t| t.managed()) {
            tasks_of.entry(t.service.as_str()).or_default().push(t);
        }
    } else {
        for svc in &services {
            tasks_of.insert(
                svc.id.as_str(),
                state
                    .tasks_of_service(&svc.id)
                    .filter(|t| t.managed())
                    .collect(),
            );
        }
    }
    let stop = |plan: &mut Plan, load: &mut Load<'_>, t: &Task| {
        load.add(&t.service, &t.node, -1);
        plan.commands
            .push(Command::ShutdownTask { id: t.id.clone() });
    };
    for svc in services {
        // Refused at create and update; a spec that does not parse places
        // nothing rather than everywhere.
        let Ok(constraints) = parse_constraints(&svc.spec.task.constraints) else {
            continue;
        };
        let all = tasks_of.remove(svc.id.as_str()).unwrap_or_default();
        // Slot -> its tasks, newest first. A global service's slot is its
        // node.
        let mut slots: BTreeMap<(u32, &str), Vec<&Task>> = BTreeMap::new();
        for t in &all {
            slots.entry(t.slot()).or_default().push(t);
        }
        for tasks in slots.values_mut() {
            tasks.sort_by_key(|t| std::cmp::Reverse(t.seq));
        }
        // Ended by itself while meant to run: into the history.
        for t in all
            .iter()
            .filter(|t| t.desired <= TaskState::Running && t.ended())
        {
            plan.commands
                .push(Command::ShutdownTask { id: t.id.clone() });
        }
        let wanted = |&(slot, node): &(u32, &str)| match svc.spec.mode {
            ServiceMode::Replicated { replicas } => slot >= 1 && slot <= replicas,
            ServiceMode::Global => state
                .nodes
                .get(node)
                .is_some_and(|n| keeps(Some(n), &constraints)),
        };
        let mut filled = BTreeSet::new();
        for (key, tasks) in &slots {
            // Newest first. A start-first replacement that does not run yet
            // leaves the task it replaces serving.
            let live: Vec<&Task> = tasks.iter().copied().filter(|t| t.live()).collect();
            for (i, t) in live.iter().enumerate() {
                let here = wanted(key) && keeps(state.nodes.get(&t.node), &constraints);
                let covering = i == 1
                    && filled.contains(key)
                    && live[0].observed < TaskState::Running
                    && t.observed == TaskState::Running;
                if here && (!filled.contains(key) || covering) {
                    filled.insert(*key);
                } else {
                    stop(&mut plan, &mut load, t);
                }
            }
        }
        let mut renewed = BTreeSet::new();
        if let Some(u) = svc.update_status.as_ref().filter(|u| u.state.active()) {
            rolling_update(
                &mut Rollout {
                    state,
                    svc,
                    status: u,
                    now_ms,
                    constraints: &constraints,
                    slots: &slots,
                    filled: &mut filled,
                    renewed: &mut renewed,
                    load: &mut load,
                    creates: &mut creates,
                    plan: &mut plan,
                },
                &mut new_id,
            );
        }
        // Empty slots: new tasks, unless the restart policy says the slot
        // is done, or its delay has not passed yet.
        let policy = &svc.spec.task.restart;
        let mut wake: Option<u64> = None;
        let mut done = |key: &(u32, &str)| {
            let Some(last) = slots.get(key).and_then(|ts| ts.first()) else {
                return false;
            };
            if !restart_wanted(policy, last) {
                return true;
            }
            // With a window, max_attempts counts the restarts whose task
            // ended within the last `window` (the slot's history); once the
            // oldest of them leaves the window, the slot may restart again.
            if last.ended_by_itself() && policy.window_ms > 0 && policy.max_attempts > 0 {
                let since = now_ms.saturating_sub(policy.window_ms);
                let recent: Vec<u64> = slots
                    .get(key)
                    .into_iter()
                    .flatten()
                    .filter(|t| t.ended_by_itself() && t.since_ms >= since)
                    .map(|t| t.since_ms)
                    .collect();
                if recent.len() as u32 > policy.max_attempts {
                    let reopen = recent.iter().min().map_or(now_ms, |t| {
                        t.saturating_add(policy.window_ms).saturating_add(1)
                    });
                    wake = Some(wake.map_or(reopen, |w| w.min(reopen)));
                    return true;
                }
            }
            let due = last.since_ms.saturating_add(policy.delay_ms);
            if last.ended_by_itself() && now_ms < due {
                wake = Some(wake.map_or(due, |w| w.min(due)));
                return true;
            }
            false
        };
        // Slots that get a new task here: their history keeps one less.
        match svc.spec.mode {
            ServiceMode::Replicated { replicas } => {
                for slot in 1..=replicas {
                    let key = (slot, "");
                    if !filled.contains(&key)
                        && !done(&key)
                        && place(
                            state,
                            svc,
                            slot,
                            &constraints,
                            &mut load,
                            &mut creates,
                            &mut plan,
                            &mut new_id,
                        )
                    {
                        renewed.insert(key);
                    }
                }
            }
            ServiceMode::Global => {
                for node in state.nodes.values() {
                    let key = (0, node.id.as_str());
                    if !filled.contains(&key) && !done(&key) && takes(node, &constraints) {
                        renewed.insert(key);
                        load.add(&svc.id, &node.id, 1);
                        creates.push(Command::CreateTask {
                            id: new_id(),
                            service: svc.id.clone(),
                            slot: 0,
                            node: node.id.clone(),
                            netns: None,
                        });
                    }
                }
            }
        }
        if let Some(w) = wake {
            plan.wake_at_ms = Some(plan.wake_at_ms.map_or(w, |p| p.min(w)));
        }
        // History: the newest TASK_HISTORY of a slot stay; a slot no longer
        // wanted keeps none once its tasks ended.
        for (key, tasks) in &slots {
            let keep = match (wanted(key), renewed.contains(key)) {
                (false, _) => 0,
                (true, false) => TASK_HISTORY,
                (true, true) => TASK_HISTORY - 1,
            };
            for t in tasks.iter().skip(keep).filter(|t| t.ended()) {
                plan.commands.push(Command::RemoveTask { id: t.id.clone() });
            }
        }
    }
    plan.commands.extend(creates);
    plan
}

#[cfg(test)]
mod constraint_props;
mod scheduler;
#[cfg(test)]
mod tests;
mod update;

use scheduler::{Load, keeps, place};
use update::{Rollout, rolling_update};
