//! Rolling updates and rollbacks: which out-of-date tasks are replaced
//! now, as Swarm's updater decides.

use std::collections::{BTreeMap, BTreeSet};

use super::{Load, Plan, place};
use crate::state::*;
use model::constraint::Constraint;

/// One service's rolling update, as [`reconcile`] carries it out.
pub(super) struct Rollout<'a, 'p> {
    pub(super) state: &'a State,
    pub(super) svc: &'a Service,
    pub(super) status: &'a UpdateStatus,
    pub(super) now_ms: u64,
    pub(super) constraints: &'p [Constraint],
    pub(super) slots: &'p BTreeMap<(u32, &'a str), Vec<&'a Task>>,
    pub(super) filled: &'p mut BTreeSet<(u32, &'a str)>,
    pub(super) renewed: &'p mut BTreeSet<(u32, &'a str)>,
    pub(super) load: &'p mut Load<'a>,
    pub(super) creates: &'p mut Vec<Command>,
    pub(super) plan: &'p mut Plan,
}

/// Replaces the tasks whose template is out of date, `parallelism` at a
/// time (0: all at once), as Swarm's updater does:
/// - a batch starts when the tasks of the previous one have run for
///   `monitor` and then `delay` has passed;
/// - a task of this update that ends by itself before the update is done is
///   a failure, and `failure_action` says what follows: pause the update,
///   continue, or roll back to the previous spec;
/// - `stop-first` stops the old task and then places the new one;
///   `start-first` places the new one first, and the old one serves until
///   the new one runs;
/// - when no task is out of date and every new one has settled, the update
///   is completed.
pub(super) fn rolling_update(r: &mut Rollout<'_, '_>, new_id: &mut impl FnMut() -> String) {
    let svc = r.svc;
    let rollback = r.status.state.rollback();
    let config = if rollback {
        &svc.spec.rollback
    } else {
        &svc.spec.update
    };
    let current = &svc.spec.task;
    let ours = |t: &&&Task| t.seq > r.status.from_seq && *t.spec == *current;
    let newest = |key: &(u32, &str)| r.slots.get(key).and_then(|ts| ts.first()).copied();
    // Failures: a task of this update that ended by itself.
    let failed = r
        .slots
        .values()
        .flatten()
        .filter(ours)
        .find(|t| t.ended_by_itself());
    if let Some(t) = failed
        && config.failure_action != FailureAction::Continue
    {
        let message = format!(
            "{} due to failure or early termination of task {}",
            if rollback {
                "rollback paused"
            } else {
                match config.failure_action {
                    FailureAction::Rollback => "update rolled back",
                    _ => "update paused",
                }
            },
            t.id
        );
        r.plan
            .commands
            .push(match (rollback, config.failure_action) {
                (false, FailureAction::Rollback) => Command::RollbackService {
                    target: svc.id.clone(),
                    message,
                },
                _ => Command::SetUpdateStatus {
                    service: svc.id.clone(),
                    state: if rollback {
                        UpdateState::RollbackPaused
                    } else {
                        UpdateState::Paused
                    },
                    message,
                },
            });
        return;
    }
    // This update's tasks that have not settled yet.
    let settle_ms = config.monitor_ms.saturating_add(config.delay_ms);
    let mut busy = 0u32;
    let mut wake: Option<u64> = None;
    for t in r.slots.values().flatten().filter(ours).filter(|t| t.live()) {
        let settled_at = t.since_ms.saturating_add(settle_ms);
        if t.observed != TaskState::Running || r.now_ms < settled_at {
            busy += 1;
            if t.observed == TaskState::Running {
                wake = Some(wake.map_or(settled_at, |w: u64| w.min(settled_at)));
            }
        }
    }
    if let Some(w) = wake {
        r.plan.wake_at_ms = Some(r.plan.wake_at_ms.map_or(w, |p| p.min(w)));
    }
    // Out of date: a slot whose newest task is live with another template.
    let outdated: Vec<(u32, &str)> = r
        .filled
        .iter()
        .filter(|key| newest(key).is_some_and(|t| t.live() && *t.spec != *current))
        .copied()
        .collect();
    if outdated.is_empty() && busy == 0 {
        r.plan.commands.push(Command::SetUpdateStatus {
            service: svc.id.clone(),
            state: if rollback {
                UpdateState::RollbackCompleted
            } else {
                UpdateState::Completed
            },
            message: if rollback {
                r.status.message.clone()
            } else {
                "update completed".into()
            },
        });
        return;
    }
    let room = match config.parallelism {
        0 => u32::MAX,
        p => p.saturating_sub(busy),
    };
    for key in outdated.into_iter().take(room as usize) {
        let old = newest(&key).expect("outdated slots have a task");
        if config.order == UpdateOrder::StopFirst {
            r.load.add(&old.service, &old.node, -1);
            r.plan
                .commands
                .push(Command::ShutdownTask { id: old.id.clone() });
        }
        let placed = if key.0 == 0 {
            // A global service's slot is its node.
            r.load.add(&svc.id, key.1, 1);
            r.creates.push(Command::CreateTask {
                id: new_id(),
                service: svc.id.clone(),
                slot: 0,
                node: key.1.to_owned(),
                netns: None,
            });
            true
        } else {
            place(
                r.state,
                svc,
                key.0,
                r.constraints,
                r.load,
                r.creates,
                r.plan,
                new_id,
            )
        };
        if placed {
            r.renewed.insert(key);
        }
    }
}
