//! The tables every node's data plane is built from, derived from the Raft
//! state and versioned by a cluster-wide revision.
//!
//! One keyed table holds three kinds of entry:
//! - a **network** (name, VNI, subnet, gateway, flags);
//! - a **service** (name, endpoint mode, a VIP per network, published
//!   ports, aliases per network);
//! - an **endpoint**: one task on one network (address, MAC, the node it
//!   runs on and that node's underlay address).
//!
//! Load-balancer frontends and backends and DNS records per network are
//! functions of these entries (a service's backends are its endpoints on a
//! network), computed on each node from its replica by the data plane
//! (`dataplane::tables`, `dataplane::dns`), incrementally from each delta.
//!
//! Every Raft log entry that changes an entry produces a [`Delta`] whose
//! revision is that entry's log index. Deriving a delta costs the entries
//! the command touched, never the table size: a command names what it may
//! change ([`Touched`]), and only those keys are recomputed and compared.
//! A node whose tasks are on a node that goes down loses those endpoints in
//! the same revision that records the node as down.
//!
//! A manager keeps no copy of the tables ([`Book`]): the touched keys'
//! values are derived before the command and after it, and a whole table
//! (for an agent too far behind) is derived from the state when asked.

use std::{
    collections::{BTreeMap, BTreeSet, VecDeque},
    net::Ipv4Addr,
    sync::Arc,
};

use crate::state::{Command, NodeStatus, State, Task, Touch};

pub use model::tables::*;

/// Deltas a manager keeps for agents that reconnect; an agent further
/// behind gets a snapshot.
pub const HISTORY: usize = 4096;

/// Changes (entries set or removed) the kept deltas may hold in all. A
/// bulk load makes deltas of hundreds of changes each, and 4096 of them
/// would be a second copy of the table: past this, an agent that far
/// behind is sent the table itself, which costs it no more.
pub const HISTORY_CHANGES: usize = 16_384;

/// The node address of a task that has an endpoint: it is meant to run, or
/// it was told to stop and still runs (draining: no new flows, open ones
/// finish), on a node that is up.
fn endpoint_live(state: &State, task: &Task) -> Option<Ipv4Addr> {
    if !task.live() && !draining(task) {
        return None;
    }
    let node = state.nodes.get(&task.node)?;
    (node.status == NodeStatus::Ready).then_some(node.addr)
}

/// Told to stop and still running: its node drains it before the stop.
fn draining(task: &Task) -> bool {
    task.desired > crate::state::TaskState::Running
        && task.observed == crate::state::TaskState::Running
}

/// The entry a key has in `state`, if any.
pub fn derive_key(state: &State, key: &Key) -> Option<Value> {
    match key {
        Key::Network { id } => state.networks.get(id).map(|n| {
            Value::Network(NetworkEntry {
                name: n.spec.name.clone(),
                vni: n.vni,
                subnet: n.subnet,
                gateway: n.gateway,
                ingress: n.ingress,
                internal: n.spec.internal,
                encrypted: n.spec.encrypted,
            })
        }),
        Key::NetworkKeys => model::ring::primary(&state.network_keys).map(|p| {
            Value::NetworkKeys(NetworkKeysEntry {
                keys: state.network_keys.clone(),
                primary: p.id,
            })
        }),
        Key::Service { id } => state.services.get(id).map(|s| {
            let mut aliases = model::by_network::ByNetwork::new();
            for a in &s.spec.task.networks {
                if let Some(n) = state.network_by_ref(&a.target)
                    && !a.aliases.is_empty()
                {
                    aliases.insert(n.id.clone(), a.aliases.clone());
                }
            }
            Value::Service(ServiceEntry {
                name: s.spec.name.clone(),
                endpoint_mode: s.spec.endpoint.mode,
                vips: s.vips.iter().map(|v| (v.network.clone(), v.addr)).collect(),
                ports: s.ports.clone(),
                aliases,
            })
        }),
        Key::Endpoint { network, task } => {
            let t = state.tasks.get(task)?;
            let node_addr = endpoint_live(state, t)?;
            let a = t.attachments.iter().find(|a| &a.network == network)?;
            let service = state.services.get(&t.service)?;
            Some(Value::Endpoint(EndpointEntry {
                service: t.service.clone(),
                task_name: t.name(&service.spec.name),
                node: t.node.clone(),
                node_addr,
                addr: a.addr,
                mac: a.mac,
                netns: t.netns.clone(),
                draining: draining(t),
            }))
        }
        Key::NodeEndpoint { network, node } => {
            let n = state.nodes.get(node)?;
            let addr = *n.lb_addrs.get(network)?;
            state.networks.get(network)?;
            Some(Value::NodeEndpoint(NodeEndpointEntry {
                node_addr: n.addr,
                addr,
                mac: mac_of(addr),
            }))
        }
    }
}

fn node_keys(state: &State, id: &str, out: &mut BTreeSet<Key>) {
    if let Some(n) = state.nodes.get(id) {
        for network in n.lb_addrs.keys() {
            out.insert(Key::NodeEndpoint {
                network: network.clone(),
                node: id.to_owned(),
            });
        }
    }
}

fn task_keys(task: &Task, out: &mut BTreeSet<Key>) {
    for a in &task.attachments {
        out.insert(Key::Endpoint {
            network: a.network.clone(),
            task: task.id.clone(),
        });
    }
}

/// Every entry of `state`, at `revision`.
pub fn derive(state: &State, revision: Revision) -> Tables {
    let mut keys = BTreeSet::new();
    for id in state.networks.keys() {
        keys.insert(Key::Network { id: id.clone() });
    }
    keys.insert(Key::NetworkKeys);
    for id in state.services.keys() {
        keys.insert(Key::Service { id: id.clone() });
    }
    for t in state.tasks.values() {
        task_keys(t, &mut keys);
    }
    for id in state.nodes.keys() {
        node_keys(state, id, &mut keys);
    }
    let entries = keys
        .into_iter()
        .filter_map(|k| derive_key(state, &k).map(|v| (k, v)))
        .collect();
    Tables { revision, entries }
}

/// The entities a command may change, resolved against the state before
/// it applies (a removal must know what it removes).
#[derive(Debug, Default)]
pub struct Touched {
    networks: bool,
    network_keys: bool,
    services: BTreeSet<String>,
    /// Keys of the state before the command.
    keys: BTreeSet<Key>,
    /// Their values before the command (the keys without one had none).
    olds: BTreeMap<Key, Value>,
    tasks: BTreeSet<String>,
    nodes: BTreeSet<String>,
    /// Nodes whose own network addresses may change (not their tasks).
    node_endpoints: BTreeSet<String>,
}

impl Touched {
    /// What `cmd` may change, seen in the state before it applies.
    pub fn before(state: &State, cmd: &Command) -> Touched {
        let mut t = Touched::default();
        t.add(state, cmd);
        t.collect(state);
        // Every key an entity touched has is listed, value or not: a key
        // listed only after the command had no value before it.
        t.olds = t
            .keys
            .iter()
            .filter_map(|k| Some((k.clone(), derive_key(state, k)?)))
            .collect();
        t
    }

    /// What `cmd` may change for the tables ([`Command::touches`]),
    /// resolved against `state` before it applies.
    fn add(&mut self, state: &State, cmd: &Command) {
        for t in cmd.touches() {
            match t {
                Touch::Networks => self.networks = true,
                Touch::NetworkKeys => self.network_keys = true,
                Touch::NewNode(id) => {
                    self.node_endpoints.insert(id.to_owned());
                }
                Touch::Node(id) => {
                    // By id, as the state resolves it (never by hostname).
                    if state.nodes.contains_key(id) {
                        self.nodes.insert(id.to_owned());
                        self.node_endpoints.insert(id.to_owned());
                    }
                }
                Touch::NewService(id) => {
                    self.services.insert(id.to_owned());
                }
                Touch::UpdateStatus(_) => {}
                Touch::Service(target) => {
                    if let Some(s) = state.service_by_ref(target) {
                        self.services.insert(s.id.clone());
                        // Removing a service removes its tasks; an update
                        // may rename it, which renames its tasks' DNS names.
                        self.tasks
                            .extend(state.tasks_of_service(&s.id).map(|t| t.id.clone()));
                    }
                }
                Touch::NewTask { id, node, .. } => {
                    self.tasks.insert(id.to_owned());
                    self.node_endpoints.insert(node.to_owned());
                }
                Touch::Task(id) => {
                    self.tasks.insert(id.to_owned());
                }
            }
        }
    }

    /// Adds the keys of the touched entities as they are in `state`.
    fn collect(&mut self, state: &State) {
        if self.network_keys {
            self.keys.insert(Key::NetworkKeys);
        }
        if self.networks {
            for id in state.networks.keys() {
                self.keys.insert(Key::Network { id: id.clone() });
            }
            for id in state.nodes.keys() {
                node_keys(state, id, &mut self.keys);
            }
        }
        for id in &self.node_endpoints {
            node_keys(state, id, &mut self.keys);
        }
        for id in &self.services {
            self.keys.insert(Key::Service { id: id.clone() });
        }
        for id in &self.tasks {
            if let Some(t) = state.tasks.get(id) {
                task_keys(t, &mut self.keys);
            }
        }
        for node in &self.nodes {
            for t in state.tasks_on(node) {
                task_keys(t, &mut self.keys);
            }
        }
    }

    pub fn is_empty(&self) -> bool {
        !self.networks
            && !self.network_keys
            && self.services.is_empty()
            && self.tasks.is_empty()
            && self.nodes.is_empty()
            && self.node_endpoints.is_empty()
    }
}

/// What a manager keeps: the tables' revision, the recent deltas, and what
/// to send an agent that last applied a given revision. The tables
/// themselves are a function of the state ([`derive`]), not kept twice.
#[derive(Debug, Clone, Default)]
pub struct Book {
    /// The revision of the last change to the tables.
    revision: Revision,
    /// The revision the history starts after.
    base: Revision,
    history: VecDeque<Arc<Delta>>,
    /// The changes in `history`, summed.
    history_changes: usize,
    /// At most this many deltas and changes are kept.
    limits: (usize, usize),
}

/// What an agent at some revision needs.
#[derive(Debug, Clone)]
pub enum Catchup {
    /// Nothing newer.
    UpToDate,
    /// These deltas, in order.
    Deltas(Vec<Arc<Delta>>),
    /// Too far behind (or ahead of a manager that restarted): everything.
    Snapshot(Tables),
}

impl Book {
    /// A book starting from the whole state at `revision` (after a restart
    /// or a Raft snapshot): no history, so agents behind it get a snapshot.
    pub fn new(revision: Revision) -> Book {
        Book {
            revision,
            base: revision,
            history: VecDeque::new(),
            history_changes: 0,
            limits: (HISTORY, HISTORY_CHANGES),
        }
    }

    /// The same book keeping at most `deltas` deltas and `changes` changes
    /// in its history (by default [`HISTORY`] and [`HISTORY_CHANGES`]).
    pub fn with_history_limits(mut self, deltas: usize, changes: usize) -> Book {
        self.limits = (deltas, changes);
        self
    }

    pub fn revision(&self) -> Revision {
        self.revision
    }

    /// The whole table, `state` being the state this book follows.
    pub fn tables(&self, state: &State) -> Tables {
        derive(state, self.revision)
    }

    /// One entry of the table, `state` being the state this book follows.
    pub fn entry(&self, state: &State, key: &Key) -> Option<Value> {
        derive_key(state, key)
    }

    /// After `touched`'s command applied at log index `revision`: recomputes
    /// the touched keys and records a delta if any entry changed.
    pub fn update(
        &mut self,
        state: &State,
        mut touched: Touched,
        revision: Revision,
    ) -> Option<Arc<Delta>> {
        if touched.is_empty() {
            return None;
        }
        touched.collect(state);
        let mut changes = Vec::new();
        for key in touched.keys {
            let new = derive_key(state, &key);
            if new.as_ref() == touched.olds.get(&key) {
                continue;
            }
            changes.push(Change { key, value: new });
        }
        if changes.is_empty() {
            return None;
        }
        self.revision = revision;
        let delta = Arc::new(Delta { revision, changes });
        self.history_changes += delta.changes.len();
        self.history.push_back(delta.clone());
        // The oldest go first; an agent behind what is left gets the
        // table. A delta bigger than the whole bound is not kept at all.
        let (max_deltas, max_changes) = self.limits;
        while self.history.len() > max_deltas || self.history_changes > max_changes {
            let Some(old) = self.history.pop_front() else {
                break;
            };
            self.history_changes -= old.changes.len();
            self.base = old.revision;
        }
        Some(delta)
    }

    /// What an agent that has applied `revision` needs next, `state` being
    /// the state this book follows.
    pub fn since(&self, state: &State, revision: Revision) -> Catchup {
        if revision == self.revision {
            return Catchup::UpToDate;
        }
        // Every delta after `base` is in the history, so an agent at or
        // after it needs exactly the deltas after its revision. An agent
        // ahead of this manager (which restarted or lags) gets a snapshot.
        if revision < self.base || revision > self.revision {
            return Catchup::Snapshot(self.tables(state));
        }
        let start = self.history.partition_point(|d| d.revision <= revision);
        Catchup::Deltas(self.history.range(start..).cloned().collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{ClusterSettings, NodeStatus, Role, ServiceSpec, TaskState};

    fn spec(json: serde_json::Value) -> ServiceSpec {
        serde_json::from_value(json).expect("service spec")
    }

    fn web() -> ServiceSpec {
        spec(serde_json::json!({
            "name": "web",
            "mode": {"replicated": {"replicas": 2}},
            "task": {"command": ["/bin/web"], "networks": [{"target": "red", "aliases": ["www"]}]},
            "endpoint": {"mode": "vip", "ports": [{"protocol": "tcp", "target": 80, "published": 8080}]}
        }))
    }

    fn db() -> ServiceSpec {
        spec(serde_json::json!({
            "name": "db",
            "mode": {"replicated": {"replicas": 1}},
            "task": {"command": ["/bin/db"], "networks": [{"target": "red"}]},
            "endpoint": {"mode": "dnsrr"}
        }))
    }

    fn task(id: &str, service: &str, node: &str) -> Command {
        Command::CreateTask {
            id: id.into(),
            service: service.into(),
            slot: 1,
            node: node.into(),
            netns: Some(format!("/run/netns/{id}")),
        }
    }

    fn status(id: &str, status: NodeStatus) -> Command {
        Command::SetNodeStatus {
            id: id.into(),
            status,
        }
    }

    fn script() -> Vec<Command> {
        let mut cmds = vec![Command::Init {
            cluster_id: "c".into(),
            ingress_id: "ingress".into(),
            settings: ClusterSettings::default(),
            secrets: None,
        }];
        for (id, addr) in [("a", "198.18.0.1"), ("b", "198.18.0.2")] {
            cmds.push(Command::AddNode {
                id: id.into(),
                hostname: format!("host-{id}"),
                addr: addr.parse().unwrap(),
                api_addr: None,
                role: Role::Worker,
                underlay: Vec::new(),
            });
        }
        cmds.extend([
            Command::CreateNetwork {
                id: "red".into(),
                spec: crate::state::NetworkSpec {
                    name: "red".into(),
                    ..Default::default()
                },
            },
            Command::CreateService {
                id: "web".into(),
                spec: web(),
            },
            Command::CreateService {
                id: "db".into(),
                spec: db(),
            },
            task("w1", "web", "a"),
            Command::Batch {
                commands: vec![task("w2", "web", "b"), task("d1", "db", "b")],
            },
            status("b", NodeStatus::Down),
            status("b", NodeStatus::Ready),
            Command::UpdateService {
                target: "web".into(),
                version: 1,
                spec: ServiceSpec {
                    name: "site".into(),
                    ..web()
                },
            },
            Command::RemoveTask { id: "w1".into() },
            // The node reports w2 running, then failed: its endpoints go,
            // and a backwards report is refused.
            Command::SetTaskStatus {
                id: "w2".into(),
                observed: TaskState::Running,
                netns: Some("/run/netns/w2-new".into()),
                exit_code: None,
                error: None,
                at_ms: 0,
            },
            task("w3", "web", "a"),
            Command::SetTaskStatus {
                id: "w2".into(),
                observed: TaskState::Failed,
                netns: None,
                exit_code: Some(137),
                error: None,
                at_ms: 0,
            },
            Command::SetTaskStatus {
                id: "w2".into(),
                observed: TaskState::Running,
                netns: None,
                exit_code: None,
                error: None,
                at_ms: 0,
            },
            Command::ShutdownTask { id: "w3".into() },
            // Refused (in use): changes nothing.
            Command::RemoveNetwork {
                target: "red".into(),
            },
            Command::RemoveService {
                target: "db".into(),
            },
            Command::RemoveNode {
                id: "b".into(),
                force: true,
            },
        ]);
        cmds
    }

    /// Runs the script as the store does; returns the state, the book and
    /// every delta.
    fn run(cmds: &[Command]) -> (State, Book, Vec<Arc<Delta>>) {
        let mut state = State::default();
        let mut book = Book::new(0);
        let mut replica = Tables::default();
        let mut deltas = Vec::new();
        for (i, cmd) in cmds.iter().enumerate() {
            let touched = Touched::before(&state, cmd);
            let ok = state.apply(cmd).is_ok();
            if ok && let Some(d) = book.update(&state, touched, i as u64 + 1) {
                replica.apply(&d).unwrap();
                deltas.push(d);
            }
            assert_eq!(
                replica.entries,
                derive(&state, 0).entries,
                "after {cmd:?}: the deltas' tables differ from a full derivation"
            );
        }
        (state, book, deltas)
    }

    #[test]
    fn incremental_tables_match_a_full_derivation_and_replicas_follow() {
        let (state, book, deltas) = run(&script());
        // The rename went through (its tasks' names changed with it).
        assert_eq!(state.services["web"].spec.name, "site");
        let mut replica = Tables::default();
        for d in &deltas {
            assert!(replica.apply(d).unwrap());
            // Applying the same delta again changes nothing.
            assert!(!replica.apply(d).unwrap());
        }
        assert_eq!(replica, book.tables(&state));
        // Through JSON (snapshots on the wire, the agent's saved copy).
        let json = serde_json::to_vec(&replica).unwrap();
        assert_eq!(serde_json::from_slice::<Tables>(&json).unwrap(), replica);
    }

    #[test]
    fn a_node_going_down_withdraws_its_endpoints_in_that_revision() {
        let cmds = script();
        let down_at = cmds
            .iter()
            .position(|c| {
                matches!(
                    c,
                    Command::SetNodeStatus {
                        status: NodeStatus::Down,
                        ..
                    }
                )
            })
            .unwrap() as u64
            + 1;
        let (_, _, deltas) = run(&cmds);
        let down = deltas.iter().find(|d| d.revision == down_at).unwrap();
        let mut removed: Vec<&str> = down
            .changes
            .iter()
            .map(|c| {
                assert!(c.value.is_none(), "only removals: {c:?}");
                match &c.key {
                    Key::Endpoint { task, .. } => task.as_str(),
                    k => panic!("unexpected key {k:?}"),
                }
            })
            .collect();
        removed.sort();
        // Task w2 is on red and ingress (web publishes a port); d1 on red.
        assert_eq!(removed, ["d1", "w2", "w2"]);
        // Back up: the same endpoints return in one revision.
        let up = deltas.iter().find(|d| d.revision == down_at + 1).unwrap();
        assert_eq!(up.changes.len(), 3);
        assert!(up.changes.iter().all(|c| c.value.is_some()));
    }

    #[test]
    fn refused_and_unrelated_commands_make_no_delta() {
        let (_, _, deltas) = run(&script());
        let revisions: Vec<u64> = deltas.iter().map(|d| d.revision).collect();
        // 2, 3: AddNode gives the node its ingress address, nothing else.
        for r in [2, 3] {
            let d = deltas.iter().find(|d| d.revision == r).unwrap();
            assert!(
                matches!(&d.changes[..], [Change { key: Key::NodeEndpoint { network, .. }, value: Some(_) }] if network == "ingress"),
                "{d:?}"
            );
        }
        // 16: the refused backwards task status; 18: the refused
        // RemoveNetwork. 17, the shutdown of a task, withdraws it.
        for r in [16, 18] {
            assert!(
                !revisions.contains(&r),
                "revision {r} made a delta: {revisions:?}"
            );
        }
        assert!(revisions.contains(&17));
    }

    #[test]
    fn catch_up_is_deltas_after_the_agents_revision_or_a_snapshot() {
        let cmds = script();
        let (state, book, deltas) = run(&cmds);
        let last = book.revision();
        assert!(matches!(book.since(&state, last), Catchup::UpToDate));
        let mid = deltas[3].revision;
        match book.since(&state, mid) {
            Catchup::Deltas(ds) => {
                assert_eq!(ds.first().unwrap().revision, deltas[4].revision);
                assert_eq!(ds.len(), deltas.len() - 4);
            }
            other => panic!("expected deltas, got {other:?}"),
        }
        // Ahead of this manager (it restarted): a snapshot, not silence.
        assert!(matches!(book.since(&state, last + 5), Catchup::Snapshot(_)));
        // A manager rebuilt from its state has no history: a snapshot for
        // anyone behind it, deltas for anyone after.
        let rebuilt = Book::new(last);
        match rebuilt.since(&state, mid) {
            Catchup::Snapshot(t) => assert_eq!(t.entries, book.tables(&state).entries),
            other => panic!("expected a snapshot, got {other:?}"),
        }
    }

    /// The history is bounded by the changes it holds as well as by the
    /// deltas: a bulk load does not keep a second copy of the table.
    #[test]
    fn history_keeps_at_most_its_changes_and_older_agents_get_the_table() {
        let cmds = script();
        let (full_state, full, deltas) = run(&cmds);
        // Replayed into a book that keeps at most 4 changes.
        let mut state = State::default();
        let mut book = Book::new(0).with_history_limits(HISTORY, 4);
        for (i, cmd) in cmds.iter().enumerate() {
            let touched = Touched::before(&state, cmd);
            if state.apply(cmd).is_ok() {
                book.update(&state, touched, i as u64 + 1);
            }
            assert!(book.history_changes <= 4, "after {cmd:?}");
            assert_eq!(
                book.history_changes,
                book.history.iter().map(|d| d.changes.len()).sum::<usize>()
            );
        }
        // The newest deltas that fit are still sent as deltas...
        let last = deltas.last().unwrap();
        let before_last = deltas[deltas.len() - 2].revision;
        assert!(last.changes.len() <= 4, "the script ends in a small delta");
        match book.since(&state, before_last) {
            Catchup::Deltas(ds) => assert_eq!(ds, vec![last.clone()]),
            other => panic!("expected the last delta, got {other:?}"),
        }
        // ...and an agent from before the kept ones gets the whole table.
        match book.since(&state, deltas[0].revision) {
            Catchup::Snapshot(t) => assert_eq!(t.entries, full.tables(&full_state).entries),
            other => panic!("expected a snapshot, got {other:?}"),
        }
        // One delta bigger than the bound is not kept: behind it, the table.
        let big = deltas.iter().max_by_key(|d| d.changes.len()).unwrap();
        assert!(big.changes.len() > 1, "the script has a multi-change delta");
        let mut state = State::default();
        let mut book = Book::new(0).with_history_limits(HISTORY, 1);
        for (i, cmd) in cmds.iter().enumerate() {
            let touched = Touched::before(&state, cmd);
            if state.apply(cmd).is_ok() {
                book.update(&state, touched, i as u64 + 1);
            }
            if i as u64 + 1 == big.revision {
                assert!(book.history.is_empty());
                assert!(matches!(
                    book.since(&state, big.revision - 1),
                    Catchup::Snapshot(_)
                ));
                assert!(matches!(
                    book.since(&state, big.revision),
                    Catchup::UpToDate
                ));
            }
        }
    }
}
