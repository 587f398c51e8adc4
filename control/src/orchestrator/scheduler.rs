//! The scheduler: which node takes a task. Spread by task count (this
//! service's, then all), then the lowest node id, over the nodes that are
//! ready, active and meet the constraints.

use std::collections::BTreeMap;

use super::Plan;
use crate::state::{Availability, Command, Node, NodeStatus, Service, State};
use model::constraint::{Constraint, takes};

/// May `node` keep a task of a service with `constraints`?
pub(super) fn keeps(node: Option<&Node>, constraints: &[Constraint]) -> bool {
    node.is_some_and(|n| {
        n.status == NodeStatus::Ready
            && n.spec.availability != Availability::Drain
            && constraints.iter().all(|c| c.matches(n))
    })
}

/// Task counts per node, kept up to date as the plan places and removes.
/// Counted on first use: a look that places and stops nothing (the common
/// case) costs nothing here.
pub(super) struct Load<'s> {
    pub(super) state: &'s State,
    pub(super) counts: Option<Counts>,
}

#[derive(Default)]
pub(super) struct Counts {
    pub(super) total: BTreeMap<String, u32>,
    /// (service id, node id) -> tasks.
    pub(super) service: BTreeMap<(String, String), u32>,
}

impl Counts {
    pub(super) fn add(&mut self, service: &str, node: &str, n: i64) {
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
    pub(super) fn new(state: &'s State) -> Load<'s> {
        Load {
            state,
            counts: None,
        }
    }

    pub(super) fn counts(&mut self) -> &mut Counts {
        let state = self.state;
        self.counts.get_or_insert_with(|| {
            let mut c = Counts::default();
            for t in state.tasks.values().filter(|t| t.live() && t.managed()) {
                c.add(&t.service, &t.node, 1);
            }
            c
        })
    }

    pub(super) fn add(&mut self, service: &str, node: &str, n: i64) {
        self.counts().add(service, node, n);
    }

    /// The spread strategy's choice among `candidates`.
    pub(super) fn pick<'a>(
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
pub(super) fn no_node(state: &State, constraints: &[Constraint]) -> String {
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

#[allow(clippy::too_many_arguments)]
pub(super) fn place(
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
