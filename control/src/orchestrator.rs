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
    Availability, Command, FailureAction, Node, NodeStatus, RestartCondition, RestartPolicy,
    Service, ServiceMode, State, Task, TaskState, Touched, UpdateOrder, UpdateState, UpdateStatus,
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

/// May `node` keep a task of a service with `constraints`?
fn keeps(node: Option<&Node>, constraints: &[Constraint]) -> bool {
    node.is_some_and(|n| {
        n.status == NodeStatus::Ready
            && n.spec.availability != Availability::Drain
            && constraints.iter().all(|c| c.matches(n))
    })
}

/// Task counts per node, kept up to date as the plan places and removes.
/// Counted on first use: a look that places and stops nothing (the common
/// case) costs nothing here.
struct Load<'s> {
    state: &'s State,
    counts: Option<Counts>,
}

#[derive(Default)]
struct Counts {
    total: BTreeMap<String, u32>,
    /// (service id, node id) -> tasks.
    service: BTreeMap<(String, String), u32>,
}

impl Counts {
    fn add(&mut self, service: &str, node: &str, n: i64) {
        let bump = |c: &mut u32| *c = (i64::from(*c) + n).max(0) as u32;
        bump(self.total.entry(node.to_owned()).or_default());
        bump(
            self.service
                .entry((service.to_owned(), node.to_owned()))
                .or_default(),
        );
    }
}

impl<'s> Load<'s> {
    fn new(state: &'s State) -> Load<'s> {
        Load {
            state,
            counts: None,
        }
    }

    fn counts(&mut self) -> &mut Counts {
        let state = self.state;
        self.counts.get_or_insert_with(|| {
            let mut c = Counts::default();
            for t in state.tasks.values().filter(|t| t.live() && t.managed()) {
                c.add(&t.service, &t.node, 1);
            }
            c
        })
    }

    fn add(&mut self, service: &str, node: &str, n: i64) {
        self.counts().add(service, node, n);
    }

    /// The spread strategy's choice among `candidates`.
    fn pick<'a>(
        &mut self,
        service: &str,
        candidates: impl Iterator<Item = &'a Node>,
    ) -> Option<&'a Node> {
        let c = self.counts();
        candidates.min_by_key(|n| {
            (
                c.service
                    .get(&(service.to_owned(), n.id.clone()))
                    .copied()
                    .unwrap_or(0),
                c.total.get(&n.id).copied().unwrap_or(0),
                n.id.clone(),
            )
        })
    }
}

/// Why no node takes a task of a service with `constraints`, in Swarm's
/// words.
fn no_node(state: &State, constraints: &[Constraint]) -> String {
    let ready = state
        .nodes
        .values()
        .filter(|n| n.status == NodeStatus::Ready)
        .count();
    let active = state
        .nodes
        .values()
        .filter(|n| n.status == NodeStatus::Ready && n.spec.availability == Availability::Active)
        .count();
    if active == 0 {
        format!("no suitable node ({} node(s) ready, none active)", ready)
    } else {
        let listed: Vec<String> = constraints.iter().map(ToString::to_string).collect();
        format!(
            "no suitable node (scheduling constraints not satisfied on {active} node(s): {})",
            listed.join(", ")
        )
    }
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

/// One service's rolling update, as [`reconcile`] carries it out.
struct Rollout<'a, 'p> {
    state: &'a State,
    svc: &'a Service,
    status: &'a UpdateStatus,
    now_ms: u64,
    constraints: &'p [Constraint],
    slots: &'p BTreeMap<(u32, &'a str), Vec<&'a Task>>,
    filled: &'p mut BTreeSet<(u32, &'a str)>,
    renewed: &'p mut BTreeSet<(u32, &'a str)>,
    load: &'p mut Load<'a>,
    creates: &'p mut Vec<Command>,
    plan: &'p mut Plan,
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
fn rolling_update(r: &mut Rollout<'_, '_>, new_id: &mut impl FnMut() -> String) {
    let svc = r.svc;
    let rollback = r.status.state.rollback();
    let config = if rollback {
        &svc.spec.rollback
    } else {
        &svc.spec.update
    };
    let current = &svc.spec.task;
    let ours = |t: &&&Task| t.seq > r.status.from_seq && t.spec == *current;
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
        .filter(|key| newest(key).is_some_and(|t| t.live() && t.spec != *current))
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

#[allow(clippy::too_many_arguments)]
fn place(
    state: &State,
    svc: &Service,
    slot: u32,
    constraints: &[Constraint],
    load: &mut Load<'_>,
    creates: &mut Vec<Command>,
    plan: &mut Plan,
    new_id: &mut impl FnMut() -> String,
) -> bool {
    let candidates = state.nodes.values().filter(|n| takes(n, constraints));
    match load.pick(&svc.id, candidates) {
        Some(node) => {
            load.add(&svc.id, &node.id, 1);
            creates.push(Command::CreateTask {
                id: new_id(),
                service: svc.id.clone(),
                slot,
                node: node.id.clone(),
                netns: None,
            });
            true
        }
        None => {
            plan.pending
                .push((svc.spec.name.clone(), slot, no_node(state, constraints)));
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{ClusterSettings, NodeSpec, Role, ServiceSpec};

    /// A cluster of `nodes` (hostname, role) and a counter for task ids.
    struct World {
        state: State,
        ids: u32,
        /// The leader's clock (ms).
        now: u64,
    }

    impl World {
        fn new(nodes: &[(&str, Role)]) -> World {
            let mut w = World {
                state: State::default(),
                ids: 0,
                now: 1_000_000,
            };
            w.run(Command::Init {
                cluster_id: "c".into(),
                ingress_id: "ingress".into(),
                settings: ClusterSettings::default(),
                secrets: None,
            });
            for (i, (host, role)) in nodes.iter().enumerate() {
                w.join(host, *role, i);
            }
            w
        }

        fn join(&mut self, host: &str, role: Role, i: usize) {
            self.run(Command::AddNode {
                id: format!("n-{host}"),
                hostname: (*host).into(),
                addr: std::net::Ipv4Addr::new(198, 18, 0, i as u8 + 1),
                api_addr: None,
                role,
                underlay: Vec::new(),
            });
        }

        fn run(&mut self, c: Command) {
            self.state
                .apply(&c)
                .unwrap_or_else(|e| panic!("{c:?} refused: {e}"));
        }

        fn service(&mut self, json: serde_json::Value) {
            let spec: ServiceSpec = serde_json::from_value(json).expect("spec");
            let id = format!("s-{}", spec.name);
            self.run(Command::CreateService { id, spec });
        }

        /// Reconciles until nothing is left to do; every command must apply.
        /// Returns the plans, and checks the last one is empty.
        fn settle(&mut self) -> Vec<Plan> {
            let mut plans = Vec::new();
            for _ in 0..5 {
                let mut ids = self.ids;
                let plan = reconcile(&self.state, self.now, || {
                    ids += 1;
                    format!("t{ids:04}")
                });
                self.ids = ids;
                let done = plan.commands.is_empty();
                for c in &plan.commands {
                    self.run(c.clone());
                }
                plans.push(plan);
                if done {
                    return plans;
                }
            }
            panic!("reconcile did not settle: {plans:?}");
        }

        /// The tasks of `service` meant to run (not its history).
        fn running(&self, service: &str) -> impl Iterator<Item = &Task> {
            let id = format!("s-{service}");
            self.state
                .tasks
                .values()
                .filter(move |t| t.service == id && t.live())
        }

        /// Hostname -> tasks of `service` there.
        fn spread(&self, service: &str) -> BTreeMap<String, u32> {
            let mut out = BTreeMap::new();
            for t in self.running(service) {
                *out.entry(self.state.nodes[&t.node].hostname.clone())
                    .or_default() += 1;
            }
            out
        }

        fn slots(&self, service: &str) -> Vec<u32> {
            let mut v: Vec<u32> = self.running(service).map(|t| t.slot).collect();
            v.sort();
            v
        }

        fn set_node(&mut self, host: &str, f: impl FnOnce(&mut NodeSpec)) {
            let n = &self.state.nodes[&format!("n-{host}")];
            let mut spec = n.spec.clone();
            f(&mut spec);
            self.run(Command::UpdateNode {
                id: n.id.clone(),
                version: n.version,
                spec,
            });
        }
    }

    fn web(replicas: u32) -> serde_json::Value {
        serde_json::json!({
            "name": "web",
            "mode": {"mode": "replicated", "replicas": replicas},
            "task": {"command": ["/bin/web"]},
            "endpoint": {"ports": [{"protocol": "tcp", "target": 80, "published": 8080}]}
        })
    }

    fn three() -> World {
        World::new(&[
            ("m1", Role::Manager),
            ("w1", Role::Worker),
            ("w2", Role::Worker),
        ])
    }

    fn hosts(pairs: &[(&str, u32)]) -> BTreeMap<String, u32> {
        pairs.iter().map(|(h, n)| ((*h).to_owned(), *n)).collect()
    }

    #[test]
    fn replicas_spread_one_per_node_and_a_settled_state_plans_nothing() {
        let mut w = three();
        w.service(web(3));
        let plans = w.settle();
        assert_eq!(plans.len(), 2, "one plan does it all: {plans:?}");
        assert_eq!(w.spread("web"), hosts(&[("m1", 1), ("w1", 1), ("w2", 1)]));
        assert_eq!(w.slots("web"), vec![1, 2, 3]);
        // Six on three nodes: two each, whatever else runs there.
        w.service(serde_json::json!({
            "name": "db", "mode": {"mode": "replicated", "replicas": 2},
            "task": {"command": ["/bin/db"]}
        }));
        w.settle();
        let total = |h: &str| {
            w.state
                .tasks
                .values()
                .filter(|t| w.state.nodes[&t.node].hostname == h)
                .count()
        };
        let mut totals: Vec<usize> = ["m1", "w1", "w2"].iter().map(|h| total(h)).collect();
        totals.sort();
        assert_eq!(totals, vec![1, 2, 2], "spread by total task count");
    }

    #[test]
    fn scaling_fills_and_empties_the_highest_slots() {
        let mut w = three();
        w.service(web(2));
        w.settle();
        let s = w.state.services["s-web"].clone();
        let mut spec = s.spec.clone();
        spec.mode = ServiceMode::Replicated { replicas: 5 };
        w.run(Command::UpdateService {
            target: "web".into(),
            version: s.version,
            spec: spec.clone(),
        });
        w.settle();
        assert_eq!(w.slots("web"), vec![1, 2, 3, 4, 5]);
        let counts: Vec<u32> = w.spread("web").values().copied().collect();
        assert!(counts.iter().all(|c| *c == 1 || *c == 2), "{counts:?}");
        let version = w.state.services["s-web"].version;
        spec.mode = ServiceMode::Replicated { replicas: 1 };
        w.run(Command::UpdateService {
            target: "web".into(),
            version,
            spec,
        });
        w.settle();
        assert_eq!(w.slots("web"), vec![1]);
    }

    fn scale(w: &mut World, name: &str, replicas: u32) {
        let s = w.state.services[&format!("s-{name}")].clone();
        let mut spec = s.spec.clone();
        spec.mode = ServiceMode::Replicated { replicas };
        w.run(Command::UpdateService {
            target: name.into(),
            version: s.version,
            spec,
        });
    }

    #[test]
    fn drain_and_down_move_tasks_and_pause_keeps_them() {
        let mut w = three();
        w.service(web(3));
        w.settle();
        w.set_node("w1", |s| s.availability = Availability::Drain);
        w.settle();
        let spread = w.spread("web");
        assert!(
            !spread.contains_key("w1"),
            "drained node keeps a task: {spread:?}"
        );
        assert_eq!(spread.values().sum::<u32>(), 3);
        assert_eq!(spread.len(), 2, "{spread:?}");
        assert_eq!(w.slots("web"), vec![1, 2, 3]);

        w.run(Command::SetNodeStatus {
            id: "n-w2".into(),
            status: NodeStatus::Down,
        });
        w.settle();
        assert_eq!(w.spread("web"), hosts(&[("m1", 3)]));

        // Active again: no task moves back by itself (as in Swarm); paused
        // m1 keeps its three but takes no new one.
        w.set_node("w1", |s| s.availability = Availability::Active);
        w.set_node("m1", |s| s.availability = Availability::Pause);
        let plans = w.settle();
        assert_eq!(plans.len(), 1, "nothing to do: {plans:?}");
        scale(&mut w, "web", 4);
        w.settle();
        assert_eq!(w.spread("web"), hosts(&[("m1", 3), ("w1", 1)]));
    }

    #[test]
    fn a_global_service_runs_once_per_eligible_node_and_a_joining_node_gets_its_task() {
        let mut w = three();
        w.service(serde_json::json!({
            "name": "agent", "mode": {"mode": "global"},
            "task": {"command": ["/bin/agent"], "constraints": ["node.role==worker"]}
        }));
        w.settle();
        assert_eq!(w.spread("agent"), hosts(&[("w1", 1), ("w2", 1)]));
        w.join("w3", Role::Worker, 7);
        w.join("m2", Role::Manager, 8);
        w.settle();
        assert_eq!(w.spread("agent"), hosts(&[("w1", 1), ("w2", 1), ("w3", 1)]));
        w.set_node("w2", |s| s.availability = Availability::Drain);
        w.settle();
        assert_eq!(w.spread("agent"), hosts(&[("w1", 1), ("w3", 1)]));
    }

    #[test]
    fn constraints_place_on_matching_nodes_and_report_what_cannot_be_placed() {
        let mut w = three();
        w.set_node("w2", |s| {
            s.labels.insert("zone".into(), "east".into());
        });
        w.service(serde_json::json!({
            "name": "east", "mode": {"mode": "replicated", "replicas": 2},
            "task": {"command": ["/bin/x"], "constraints": ["node.labels.zone==east"]}
        }));
        w.service(serde_json::json!({
            "name": "nowhere", "mode": {"mode": "replicated", "replicas": 1},
            "task": {"command": ["/bin/x"], "constraints": ["node.hostname==m1", "node.role==worker"]}
        }));
        let plans = w.settle();
        assert_eq!(w.spread("east"), hosts(&[("w2", 2)]));
        assert_eq!(w.spread("nowhere"), BTreeMap::new());
        assert_eq!(
            plans[0].pending,
            vec![(
                "nowhere".into(),
                1,
                "no suitable node (scheduling constraints not satisfied on 3 node(s): \
                 node.hostname==m1, node.role==worker)"
                    .into()
            )]
        );
        // The label goes: the tasks leave, and wait for a node.
        w.set_node("w2", |s| {
            s.labels.clear();
        });
        let plans = w.settle();
        assert_eq!(w.spread("east"), BTreeMap::new());
        assert_eq!(plans.last().unwrap().pending.len(), 3);
    }

    /// The node's report for the running task of `service` in `slot`.
    fn report(w: &mut World, service: &str, slot: u32, observed: TaskState, code: Option<i32>) {
        let id = w
            .running(service)
            .find(|t| t.slot == slot)
            .unwrap_or_else(|| panic!("no running task in slot {slot}"))
            .id
            .clone();
        for step in [TaskState::Running, observed] {
            w.run(Command::SetTaskStatus {
                id: id.clone(),
                observed: step,
                netns: None,
                exit_code: (step == observed).then_some(code).flatten(),
                error: None,
                at_ms: w.now,
            });
        }
    }

    fn with_restart(condition: &str, max_attempts: u32) -> serde_json::Value {
        serde_json::json!({
            "name": "job", "mode": {"mode": "replicated", "replicas": 1},
            "task": {"command": ["/bin/job"],
                     "restart": {"condition": condition, "max_attempts": max_attempts,
                                 "delay_ms": 0}}
        })
    }

    #[test]
    fn a_restart_waits_for_its_delay_and_says_when_to_look_again() {
        let mut w = three();
        // Swarm's default delay: 5 s.
        w.service(serde_json::json!({
            "name": "job", "mode": {"mode": "replicated", "replicas": 1},
            "task": {"command": ["/bin/job"]}
        }));
        w.settle();
        report(&mut w, "job", 1, TaskState::Failed, Some(2));
        let ended = w.now;
        let plans = w.settle();
        assert_eq!(
            w.slots("job"),
            Vec::<u32>::new(),
            "restarted before its delay"
        );
        assert_eq!(plans.last().unwrap().wake_at_ms, Some(ended + 5000));
        w.now = ended + 4999;
        w.settle();
        assert_eq!(w.slots("job"), Vec::<u32>::new());
        w.now = ended + 5000;
        let plans = w.settle();
        assert_eq!(w.slots("job"), vec![1]);
        assert_eq!(plans[0].wake_at_ms, None);
        // A task stopped on purpose is replaced at once, delay or not.
        let host = {
            let t = w.running("job").next().unwrap();
            w.state.nodes[&t.node].hostname.clone()
        };
        w.set_node(&host, |s| s.availability = Availability::Drain);
        w.settle();
        assert_eq!(w.slots("job"), vec![1]);
    }

    #[test]
    fn an_ended_task_is_replaced_as_its_restart_policy_says_and_kept_as_history() {
        // any: a clean exit is replaced too; history is kept, 5 per slot.
        let mut w = three();
        w.service(with_restart("any", 0));
        w.settle();
        for _ in 0..7 {
            report(&mut w, "job", 1, TaskState::Complete, Some(0));
            let plans = w.settle();
            assert_eq!(plans.len(), 2, "one plan does it all: {plans:?}");
            assert_eq!(w.slots("job"), vec![1]);
        }
        let all: Vec<&Task> = w.state.tasks.values().collect();
        assert_eq!(all.len(), TASK_HISTORY, "history is pruned to the newest");
        assert!(all.iter().all(|t| t.slot == 1));
        let newest = all.iter().max_by_key(|t| t.seq).unwrap();
        assert!(newest.live() && newest.attempt == 7, "{newest:?}");
        // The ended ones gave their addresses back and are no endpoints.
        assert!(
            all.iter()
                .filter(|t| t.ended())
                .all(|t| t.attachments.is_empty())
        );
        drop(all);
        // A manager that loads this state from a snapshot (indexes rebuilt)
        // counts the next restart the same way.
        let mut copy: State =
            serde_json::from_str(&serde_json::to_string(&w.state).unwrap()).unwrap();
        copy.reindex().unwrap();
        let mut twin = World {
            state: copy,
            ids: w.ids,
            now: w.now,
        };
        for world in [&mut w, &mut twin] {
            report(world, "job", 1, TaskState::Failed, Some(1));
            world.settle();
        }
        assert_eq!(twin.state, w.state);
        let newest = w.running("job").next().unwrap();
        assert_eq!(newest.attempt, 8);

        // on-failure with 2 attempts: a crash is retried twice, then the
        // slot stays empty; an exit 0 is not retried at all.
        let mut w = three();
        w.service(with_restart("on-failure", 2));
        w.settle();
        for round in 0..3 {
            report(&mut w, "job", 1, TaskState::Failed, Some(137));
            w.settle();
            let want: Vec<u32> = if round < 2 { vec![1] } else { vec![] };
            assert_eq!(w.slots("job"), want, "after failure {}", round + 1);
        }
        let mut w = three();
        w.service(with_restart("on-failure", 0));
        w.settle();
        report(&mut w, "job", 1, TaskState::Complete, Some(0));
        w.settle();
        assert_eq!(w.slots("job"), Vec::<u32>::new());

        // none: never replaced; but a task stopped by a drain is.
        let mut w = three();
        w.service(with_restart("none", 0));
        w.settle();
        let host = |w: &World| {
            let t = w.running("job").next().unwrap();
            w.state.nodes[&t.node].hostname.clone()
        };
        let h = host(&w);
        w.set_node(&h, |s| s.availability = Availability::Drain);
        w.settle();
        assert_ne!(host(&w), h, "a drained task is moved whatever the policy");
        report(&mut w, "job", 1, TaskState::Failed, Some(1));
        w.settle();
        assert_eq!(w.slots("job"), Vec::<u32>::new());
    }

    #[test]
    fn task_status_only_moves_forward_and_an_ended_task_frees_its_address() {
        let mut w = three();
        w.service(serde_json::json!({
            "name": "web", "mode": {"mode": "replicated", "replicas": 1},
            "task": {"command": ["/bin/web"]},
            "endpoint": {"ports": [{"protocol": "tcp", "target": 80, "published": 8080}]}
        }));
        w.settle();
        let id = w.running("web").next().unwrap().id.clone();
        let addr = w.state.tasks[&id].attachments[0].addr;
        let set = |w: &mut World, observed| {
            w.state.apply(&Command::SetTaskStatus {
                id: id.clone(),
                observed,
                netns: Some("/run/netns/x".into()),
                exit_code: None,
                error: None,
                at_ms: 5,
            })
        };
        set(&mut w, TaskState::Running).unwrap();
        let err = set(&mut w, TaskState::Starting).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!("task {id} is Running; a status cannot go back to Starting")
        );
        set(&mut w, TaskState::Failed).unwrap();
        let err = set(&mut w, TaskState::Running).unwrap_err();
        assert!(err.to_string().contains("already ended (Failed)"), "{err}");
        assert_eq!(w.state.tasks[&id].netns.as_deref(), Some("/run/netns/x"));
        w.settle();
        // The replacement may take the freed address: it is free.
        let new = w.running("web").next().unwrap();
        assert_eq!(new.attachments[0].addr, addr);
    }

    #[test]
    fn bad_constraints_are_refused_with_what_to_write() {
        for (text, want) in [
            ("node.role=manager", "expected FIELD==VALUE or FIELD!=VALUE"),
            (
                "node.rol==manager",
                "unknown field \"node.rol\"; use node.id, node.hostname",
            ),
            (
                "node.role==boss",
                "node.role is manager or worker, not \"boss\"",
            ),
            ("node.labels.==x", "unknown field"),
            ("node.hostname==", "the value is empty"),
        ] {
            let err = text.parse::<Constraint>().unwrap_err();
            assert!(err.contains(want), "{text}: {err}");
        }
        let c: Constraint = " node.labels.zone != east ".parse().unwrap();
        assert_eq!(c.to_string(), "node.labels.zone!=east");
        // The state refuses the spec, and nothing is created.
        let mut w = three();
        let spec: ServiceSpec = serde_json::from_value(serde_json::json!({
            "name": "bad", "mode": {"mode": "global"},
            "task": {"command": ["/bin/x"], "constraints": ["node.rol==manager"]}
        }))
        .unwrap();
        let err = w
            .state
            .apply(&Command::CreateService {
                id: "s-bad".into(),
                spec,
            })
            .unwrap_err();
        assert!(
            err.to_string().starts_with("service bad: constraint"),
            "{err}"
        );
        assert!(w.state.services.is_empty());
    }

    /// The node side, simulated: every task told to run that has not
    /// started reports running now; every task told to stop that still
    /// runs reports shut down (the executor stopped it).
    fn nodes_act(w: &mut World) {
        let todo: Vec<(String, TaskState)> = w
            .state
            .tasks
            .values()
            .filter(|t| !t.ended())
            .filter_map(|t| match (t.desired, t.observed) {
                (TaskState::Running, o) if o < TaskState::Running => {
                    Some((t.id.clone(), TaskState::Running))
                }
                (TaskState::Shutdown, _) => Some((t.id.clone(), TaskState::Shutdown)),
                _ => None,
            })
            .collect();
        for (id, observed) in todo {
            w.run(Command::SetTaskStatus {
                id,
                observed,
                netns: None,
                exit_code: None,
                error: None,
                at_ms: w.now,
            });
        }
    }

    /// Command of each task meant to run of `service`, by slot.
    fn commands(w: &World, service: &str) -> Vec<(u32, String)> {
        let mut v: Vec<(u32, String)> = w
            .running(service)
            .map(|t| (t.slot, t.spec.command.join(" ")))
            .collect();
        v.sort();
        v
    }

    fn update_to(w: &mut World, service: &str, f: impl FnOnce(&mut ServiceSpec)) {
        let svc = w.state.service_by_ref(service).unwrap().clone();
        let mut spec = svc.spec.clone();
        f(&mut spec);
        w.run(Command::UpdateService {
            target: svc.id,
            version: svc.version,
            spec,
        });
    }

    fn update_state(w: &World, service: &str) -> Option<UpdateState> {
        w.state
            .service_by_ref(service)
            .unwrap()
            .update_status
            .as_ref()
            .map(|u| u.state)
    }

    fn rolling(order: &str, failure_action: &str) -> serde_json::Value {
        serde_json::json!({
            "name": "web", "mode": {"mode": "replicated", "replicas": 3},
            "task": {"command": ["/bin/web", "v1"], "restart": {"delay_ms": 0}},
            "update": {"parallelism": 1, "delay_ms": 0, "monitor_ms": 1000,
                       "failure_action": failure_action, "order": order},
            "rollback": {"parallelism": 0, "delay_ms": 0, "monitor_ms": 1000,
                         "failure_action": "pause", "order": "stop-first"}
        })
    }

    #[test]
    fn a_rolling_update_replaces_one_task_per_monitor_period() {
        let mut w = three();
        w.service(rolling("stop-first", "pause"));
        w.settle();
        nodes_act(&mut w);
        // Replicas alone: no update.
        update_to(&mut w, "web", |s| {
            s.mode = ServiceMode::Replicated { replicas: 3 }
        });
        assert_eq!(update_state(&w, "web"), None);
        update_to(&mut w, "web", |s| s.task.command[1] = "v2".into());
        assert_eq!(update_state(&w, "web"), Some(UpdateState::Updating));
        let mut batches = Vec::new();
        for _ in 0..10 {
            w.settle();
            nodes_act(&mut w);
            let v2 = commands(&w, "web")
                .iter()
                .filter(|(_, c)| c.ends_with("v2"))
                .count();
            batches.push(v2);
            // Never more than one task down at a time (stop-first,
            // parallelism 1): three slots always have a task.
            assert_eq!(w.slots("web"), vec![1, 2, 3]);
            w.now += 600;
        }
        // One more every two looks (monitor 1 s, looks every 0.6 s).
        assert_eq!(batches[..6], [1, 1, 2, 2, 3, 3], "{batches:?}");
        assert_eq!(update_state(&w, "web"), Some(UpdateState::Completed));
        // The old tasks are history of their slots.
        assert_eq!(w.state.tasks.len(), 6);
    }

    /// Three running web tasks, then an update to a "broken" command
    /// (failure_action `action`) whose first new task is placed; its id.
    fn start_broken_update(w: &mut World, action: &str) -> String {
        w.service(rolling("stop-first", action));
        w.settle();
        nodes_act(w);
        update_to(w, "web", |s| s.task.command[1] = "broken".into());
        w.settle();
        w.running("web")
            .find(|t| t.spec.command[1] == "broken")
            .unwrap()
            .id
            .clone()
    }

    #[test]
    fn a_failing_update_rolls_back_to_the_previous_spec() {
        let mut w = three();
        // The first new task fails as it starts.
        let new = start_broken_update(&mut w, "rollback");
        for observed in [TaskState::Running, TaskState::Failed] {
            w.run(Command::SetTaskStatus {
                id: new.clone(),
                observed,
                netns: None,
                exit_code: Some(1),
                error: None,
                at_ms: w.now,
            });
        }
        for _ in 0..6 {
            w.settle();
            nodes_act(&mut w);
            w.now += 1100;
        }
        assert_eq!(
            update_state(&w, "web"),
            Some(UpdateState::RollbackCompleted)
        );
        let svc = w.state.service_by_ref("web").unwrap();
        assert_eq!(svc.spec.task.command, ["/bin/web", "v1"]);
        assert_eq!(
            svc.previous.as_ref().unwrap().task.command,
            ["/bin/web", "broken"]
        );
        assert_eq!(
            commands(&w, "web"),
            [1, 2, 3].map(|s| (s, "/bin/web v1".to_owned()))
        );
        // Only the one slot was touched before the failure.
        let broken = w
            .state
            .tasks
            .values()
            .filter(|t| t.spec.command[1] == "broken")
            .count();
        assert_eq!(broken, 1);
    }

    #[test]
    fn a_failing_update_with_pause_stops_replacing() {
        let mut w = three();
        let new = start_broken_update(&mut w, "pause");
        w.run(Command::SetTaskStatus {
            id: new.clone(),
            observed: TaskState::Failed,
            netns: None,
            exit_code: Some(1),
            error: None,
            at_ms: w.now,
        });
        for _ in 0..4 {
            w.settle();
            nodes_act(&mut w);
            w.now += 1100;
        }
        assert_eq!(update_state(&w, "web"), Some(UpdateState::Paused));
        let u = w
            .state
            .service_by_ref("web")
            .unwrap()
            .update_status
            .clone()
            .unwrap();
        assert!(u.message.contains(&new), "{u:?}");
        // Two slots still run v1.
        let v1 = commands(&w, "web")
            .iter()
            .filter(|(_, c)| c.ends_with("v1"))
            .count();
        assert_eq!(v1, 2);
    }

    #[test]
    fn start_first_keeps_the_old_task_until_the_new_one_runs() {
        let mut w = three();
        w.service(rolling("start-first", "pause"));
        w.settle();
        nodes_act(&mut w);
        update_to(&mut w, "web", |s| s.task.command[1] = "v2".into());
        w.settle();
        // Slot with two live tasks: the old one still serves.
        let live = w.running("web").count();
        assert_eq!(live, 4, "the new task is added, not swapped");
        let plans = w.settle();
        assert!(plans[0].commands.is_empty(), "{plans:?}");
        nodes_act(&mut w); // the new one runs
        w.settle();
        assert_eq!(
            w.running("web").count(),
            3,
            "the old one goes once the new runs"
        );
        for _ in 0..8 {
            nodes_act(&mut w);
            w.now += 1100;
            w.settle();
        }
        assert_eq!(update_state(&w, "web"), Some(UpdateState::Completed));
        assert_eq!(
            commands(&w, "web"),
            [1, 2, 3].map(|s| (s, "/bin/web v2".to_owned()))
        );
    }

    #[test]
    fn attached_tasks_are_left_alone() {
        let mut w = three();
        w.service(web(0));
        w.run(Command::CreateTask {
            id: "outside".into(),
            service: "s-web".into(),
            slot: 1,
            node: "n-w1".into(),
            netns: Some("/run/netns/x".into()),
        });
        let plans = w.settle();
        assert!(plans[0].commands.is_empty(), "{plans:?}");
        update_to(&mut w, "web", |s| {
            s.mode = ServiceMode::Replicated { replicas: 1 }
        });
        w.settle();
        // One task of its own, and the attached one untouched.
        assert_eq!(w.running("web").count(), 2);
        assert!(w.state.tasks["outside"].live());
    }

    #[test]
    fn max_attempts_within_a_window_reopen_when_the_window_passes() {
        let mut w = three();
        w.service(serde_json::json!({
            "name": "job", "mode": {"mode": "replicated", "replicas": 1},
            "task": {"command": ["/bin/job"],
                     "restart": {"condition": "any", "max_attempts": 2,
                                 "delay_ms": 0, "window_ms": 10000}}
        }));
        w.settle();
        let first_end = w.now;
        // The first task and two restarts fail, one second apart.
        for _ in 0..3 {
            assert_eq!(w.slots("job"), vec![1]);
            report(&mut w, "job", 1, TaskState::Failed, Some(1));
            w.settle();
            w.now += 1000;
        }
        let plans = w.settle();
        assert_eq!(
            w.slots("job"),
            Vec::<u32>::new(),
            "3 failures in 10 s with max 2"
        );
        // The slot reopens when the first failure leaves the window.
        assert_eq!(plans.last().unwrap().wake_at_ms, Some(first_end + 10_001));
        w.now = first_end + 10_001;
        w.settle();
        assert_eq!(w.slots("job"), vec![1], "the window passed");
    }

    #[test]
    fn looking_at_the_touched_services_plans_what_looking_at_all_does() {
        let mut w = three();
        w.service(web(2));
        w.service(with_restart("any", 0));
        w.settle();
        w.state.take_touched();
        update_to(&mut w, "web", |s| {
            s.mode = ServiceMode::Replicated { replicas: 3 }
        });
        let touched = w.state.take_touched();
        assert!(
            !touched.all && touched.has("s-web") && !touched.has("s-job"),
            "{touched:?}"
        );
        let ids = || {
            let mut n = 0;
            move || {
                n += 1;
                format!("x{n}")
            }
        };
        let some = reconcile_some(&w.state, w.now, &touched, ids());
        let all = reconcile(&w.state, w.now, ids());
        assert_eq!(some, all);
        assert_eq!(some.commands.len(), 1, "{some:?}");
        // A node change touches every service.
        w.set_node("w1", |n| n.availability = Availability::Drain);
        assert!(w.state.take_touched().all);
    }
}

/// Property tests of the constraint parser: no input panics it; whatever
/// it accepts is well formed; every well-formed constraint parses to what
/// it says.
#[cfg(test)]
mod constraint_props {
    use proptest::prelude::*;

    use super::{Constraint, Field};

    proptest! {
        #[test]
        fn no_text_panics_and_an_accepted_one_is_well_formed(text in ".{0,80}") {
            if let Ok(c) = text.parse::<Constraint>() {
                prop_assert!(!c.value.is_empty());
                prop_assert_eq!(c.value.trim(), c.value.as_str());
                let op = if c.equal { "==" } else { "!=" };
                prop_assert!(text.contains(op));
            }
        }

        #[test]
        fn a_well_formed_constraint_parses_to_what_it_says(
            field in prop_oneof![
                Just("node.id".to_owned()),
                Just("node.hostname".to_owned()),
                "[a-z][a-z0-9_.-]{0,15}".prop_map(|l| format!("node.labels.{l}")),
            ],
            equal in any::<bool>(),
            value in "[a-zA-Z0-9_.-]{1,20}",
            pad in " {0,2}",
        ) {
            let op = if equal { "==" } else { "!=" };
            let c: Constraint = format!("{pad}{field}{pad}{op}{pad}{value}{pad}").parse().unwrap();
            prop_assert_eq!(c.equal, equal);
            prop_assert_eq!(&c.value, &value);
            let want = match field.as_str() {
                "node.id" => Field::Id,
                "node.hostname" => Field::Hostname,
                l => Field::Label(l["node.labels.".len()..].to_owned()),
            };
            prop_assert_eq!(c.field, want);
        }
    }
}
