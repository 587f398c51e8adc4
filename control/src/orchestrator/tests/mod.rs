//! The orchestrator's unit tests: small clusters, commands applied as
//! the leader would, and what the plan says.

use super::*;
use crate::state::*;
use crate::state::{ClusterSettings, NodeSpec, Role, ServiceSpec};

mod placement;
mod restart;
mod update;

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

fn with_restart(condition: &str, max_attempts: u32) -> serde_json::Value {
    serde_json::json!({
        "name": "job", "mode": {"replicated": {"replicas": 1}},
        "task": {"command": ["/bin/job"],
                 "restart": {"condition": condition, "max_attempts": max_attempts,
                             "delay_ms": 0}}
    })
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
