//! Placement: replicas spread one per node, scaling fills and empties the
//! highest slots, drain and down move tasks, global services, constraints.

use super::*;

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
