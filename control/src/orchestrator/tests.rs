//! The orchestrator's unit tests: small clusters, commands applied as
//! the leader would, and what the plan says.

use super::*;
use crate::state::*;
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
        "mode": {"replicated": {"replicas": replicas}},
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
        "name": "db", "mode": {"replicated": {"replicas": 2}},
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
        "name": "agent", "mode": "global",
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
        "name": "east", "mode": {"replicated": {"replicas": 2}},
        "task": {"command": ["/bin/x"], "constraints": ["node.labels.zone==east"]}
    }));
    w.service(serde_json::json!({
        "name": "nowhere", "mode": {"replicated": {"replicas": 1}},
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
        "name": "job", "mode": {"replicated": {"replicas": 1}},
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
        "name": "job", "mode": {"replicated": {"replicas": 1}},
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
    let mut copy: State = serde_json::from_str(&serde_json::to_string(&w.state).unwrap()).unwrap();
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
        "name": "web", "mode": {"replicated": {"replicas": 1}},
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
        "name": "bad", "mode": "global",
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
        "name": "web", "mode": {"replicated": {"replicas": 3}},
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
        "name": "job", "mode": {"replicated": {"replicas": 1}},
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
