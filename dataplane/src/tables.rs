//! From the control plane's tables to what this node's kernel should hold.
//!
//! The agent ([`control::agent`]) keeps a replica of the cluster's tables;
//! this module picks this node's share of it:
//! - the **overlay**: every network with a task on this node, its local
//!   endpoints (veths into the tasks' namespaces) and its remote endpoints
//!   (static FDB and neighbour entries toward the nodes they run on).
//!   Endpoints of a node that is down are not in the tables at all.

use std::{collections::BTreeMap, net::Ipv4Addr, path::PathBuf};

use control::{
    agent::Update,
    tables::{EndpointEntry, Key, Tables, Value},
};

use crate::{
    netlink::Mac,
    overlay::{Change, LocalEndpoint, NetworkSpec, OverlaySpec, RemoteEndpoint},
};

/// What the overlay needs after an update of the tables.
#[derive(Debug, PartialEq, Eq)]
pub enum OverlayUpdate {
    Unchanged,
    /// Endpoints came, went or moved on networks this node is already on:
    /// applied in constant time each.
    Changes(Vec<Change>),
    /// The set of networks this node is on changed, or one of them did:
    /// a whole table.
    Whole(OverlaySpec),
}

/// This node's share of the tables, followed delta by delta.
#[derive(Debug)]
pub struct NodeView {
    node: String,
    underlay: Ipv4Addr,
    /// Networks this node has a task on, with how many.
    local: BTreeMap<String, usize>,
}

fn endpoint(v: &Option<Value>) -> Option<&EndpointEntry> {
    match v {
        Some(Value::Endpoint(e)) => Some(e),
        _ => None,
    }
}

impl NodeView {
    pub fn new(node: &str, underlay: Ipv4Addr) -> NodeView {
        NodeView {
            node: node.to_owned(),
            underlay,
            local: BTreeMap::new(),
        }
    }

    fn is_local(&self, e: Option<&EndpointEntry>) -> bool {
        e.is_some_and(|e| e.node == self.node && e.netns.is_some())
    }

    /// The interface a local task has on `network`: eth0, eth1, ... in the
    /// order of its networks' ids (as [`overlay_spec`] names them).
    fn interface(&self, tables: &Tables, network: &str, task: &str) -> String {
        let n = self
            .local
            .keys()
            .filter(|net| net.as_str() < network)
            .filter(|net| {
                tables.entries.contains_key(&Key::Endpoint {
                    network: (*net).clone(),
                    task: task.to_owned(),
                })
            })
            .count();
        format!("eth{n}")
    }

    /// What the overlay must do now that `update` made `tables`.
    pub fn overlay(&mut self, tables: &Tables, update: Update<'_>) -> OverlayUpdate {
        let changes = match update {
            Update::Delta(changes) if !self.needs_whole(changes) => changes,
            _ => {
                let spec = overlay_spec(tables, &self.node, self.underlay);
                self.local = spec
                    .networks
                    .iter()
                    .map(|n| (n.id.clone(), n.local.len()))
                    .collect();
                return OverlayUpdate::Whole(spec);
            }
        };
        let mut out = Vec::new();
        for c in changes {
            let Key::Endpoint { network, task } = &c.key else {
                continue;
            };
            if !self.local.contains_key(network) {
                continue;
            }
            let (mut old, mut new) = (endpoint(&c.old), endpoint(&c.new));
            // This node's endpoints without a namespace are not served here
            // at all (as in overlay_spec): never remote entries to itself.
            let ours = |e: &Option<&EndpointEntry>| {
                e.is_some_and(|e| e.node == self.node && e.netns.is_none())
            };
            if ours(&old) {
                old = None;
            }
            if ours(&new) {
                new = None;
            }
            if let Some(o) = old {
                if self.is_local(old) {
                    *self.local.get_mut(network).expect("local") -= 1;
                    if !self.is_local(new) {
                        out.push(Change::RemoveLocal {
                            network: network.clone(),
                            id: task.clone(),
                        });
                    }
                } else if new.is_none_or(|n| n.addr != o.addr || self.is_local(Some(n))) {
                    out.push(Change::RemoveRemote {
                        network: network.clone(),
                        ip: o.addr,
                    });
                }
            }
            let Some(n) = new else { continue };
            if self.is_local(new) {
                *self.local.get_mut(network).expect("local") += 1;
                out.push(Change::UpsertLocal {
                    network: network.clone(),
                    endpoint: LocalEndpoint {
                        id: task.clone(),
                        netns: PathBuf::from(n.netns.as_deref().expect("local")),
                        ip: n.addr,
                        mac: Mac(n.mac),
                        interface: self.interface(tables, network, task),
                    },
                });
            } else {
                out.push(Change::UpsertRemote {
                    network: network.clone(),
                    endpoint: RemoteEndpoint {
                        ip: n.addr,
                        mac: Mac(n.mac),
                        node: n.node_addr,
                    },
                });
            }
        }
        if out.is_empty() {
            OverlayUpdate::Unchanged
        } else {
            OverlayUpdate::Changes(out)
        }
    }

    /// Whether `changes` change which networks this node is on, or one of
    /// them: then only a whole table is right.
    fn needs_whole(&self, changes: &[control::agent::Applied]) -> bool {
        let mut count: BTreeMap<&str, isize> = BTreeMap::new();
        for c in changes {
            match &c.key {
                Key::Network { id } if self.local.contains_key(id) => return true,
                Key::Endpoint { network, .. } => {
                    let d = isize::from(self.is_local(endpoint(&c.new)))
                        - isize::from(self.is_local(endpoint(&c.old)));
                    if d != 0 {
                        *count.entry(network).or_default() += d;
                    }
                }
                _ => {}
            }
        }
        count.into_iter().any(|(net, d)| {
            let now = self.local.get(net).copied().unwrap_or(0) as isize;
            (now == 0) != (now + d == 0)
        })
    }
}

/// The overlay this node should have: networks where it runs a task.
pub fn overlay_spec(tables: &Tables, node: &str, underlay: Ipv4Addr) -> OverlaySpec {
    // A task's interfaces are eth0, eth1, ... in network-id order.
    let mut next_if: BTreeMap<&str, usize> = BTreeMap::new();
    let mut local: BTreeMap<&str, Vec<LocalEndpoint>> = BTreeMap::new();
    for (network, task, e) in tables.endpoints() {
        if e.node != node {
            continue;
        }
        let Some(netns) = &e.netns else { continue };
        let n = next_if.entry(task).or_default();
        local.entry(network).or_default().push(LocalEndpoint {
            id: task.to_owned(),
            netns: PathBuf::from(netns),
            ip: e.addr,
            mac: Mac(e.mac),
            interface: format!("eth{n}"),
        });
        *n += 1;
    }
    let mut networks = Vec::new();
    for (id, n) in tables.networks() {
        let Some(local) = local.remove(id) else {
            continue;
        };
        let remote = tables
            .endpoints()
            .filter(|(net, _, e)| *net == id && e.node != node)
            .map(|(_, _, e)| RemoteEndpoint {
                ip: e.addr,
                mac: Mac(e.mac),
                node: e.node_addr,
            })
            .collect();
        networks.push(NetworkSpec {
            id: id.to_owned(),
            vni: n.vni,
            subnet: n.subnet,
            gateway: n.gateway,
            mtu: None,
            local,
            remote,
        });
    }
    OverlaySpec {
        underlay: (!networks.is_empty()).then_some(underlay),
        networks,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use control::tables::{EndpointEntry, Key, NetworkEntry, Value};

    fn table() -> Tables {
        let mut t = Tables::default();
        for (id, vni, subnet) in [("red", 4097, "10.0.1.0/24"), ("blue", 4098, "10.0.2.0/24")] {
            t.entries.insert(
                Key::Network { id: id.into() },
                Value::Network(NetworkEntry {
                    name: id.into(),
                    vni,
                    subnet: subnet.parse().unwrap(),
                    gateway: subnet.replace(".0/24", ".1").parse().unwrap(),
                    ingress: false,
                    internal: false,
                    encrypted: false,
                }),
            );
        }
        let ep = |net: &str, task: &str, node: &str, ip: &str| {
            let addr: Ipv4Addr = ip.parse().unwrap();
            (
                Key::Endpoint {
                    network: net.into(),
                    task: task.into(),
                },
                Value::Endpoint(EndpointEntry {
                    service: "s".into(),
                    task_name: format!("s.{task}"),
                    node: node.into(),
                    node_addr: if node == "a" {
                        "198.18.0.1".parse().unwrap()
                    } else {
                        "198.18.0.2".parse().unwrap()
                    },
                    addr,
                    mac: Mac::from_ipv4(addr).0,
                    netns: Some(format!("/run/netns/{task}")),
                }),
            )
        };
        t.entries.extend([
            ep("red", "t1", "a", "10.0.1.2"),
            ep("blue", "t1", "a", "10.0.2.2"),
            ep("red", "t2", "b", "10.0.1.3"),
            ep("blue", "t3", "b", "10.0.2.3"),
        ]);
        t
    }

    #[test]
    fn a_node_gets_the_networks_it_has_tasks_on() {
        let t = table();
        let a = overlay_spec(&t, "a", "198.18.0.1".parse().unwrap());
        assert_eq!(a.underlay, Some("198.18.0.1".parse().unwrap()));
        let names: Vec<&str> = a.networks.iter().map(|n| n.id.as_str()).collect();
        assert_eq!(names, ["blue", "red"]);
        let red = a.networks.iter().find(|n| n.id == "red").unwrap();
        assert_eq!(red.local.len(), 1);
        assert_eq!(red.remote.len(), 1);
        assert_eq!(red.remote[0].ip, "10.0.1.3".parse::<Ipv4Addr>().unwrap());
        assert_eq!(
            red.remote[0].node,
            "198.18.0.2".parse::<Ipv4Addr>().unwrap()
        );
        // One task on two networks: two interfaces.
        let blue = a.networks.iter().find(|n| n.id == "blue").unwrap();
        assert_ne!(blue.local[0].interface, red.local[0].interface);
        // A node with no task gets no overlay at all.
        let c = overlay_spec(&t, "c", "198.18.0.3".parse().unwrap());
        assert_eq!(c, OverlaySpec::default());
    }

    #[test]
    fn remote_changes_are_deltas_and_local_ones_a_whole_table() {
        use control::agent::Applied;
        let mut t = table();
        let mut view = NodeView::new("a", "198.18.0.1".parse().unwrap());
        assert!(matches!(
            view.overlay(&t, Update::Whole),
            OverlayUpdate::Whole(_)
        ));
        // A remote task on red moves to a new address: remove + upsert.
        let key = Key::Endpoint {
            network: "red".into(),
            task: "t2".into(),
        };
        let old = t.entries.get(&key).cloned();
        let Some(Value::Endpoint(mut e)) = old.clone() else {
            panic!()
        };
        e.addr = "10.0.1.9".parse().unwrap();
        t.entries.insert(key.clone(), Value::Endpoint(e));
        let changes = [Applied {
            key: key.clone(),
            old,
            new: t.entries.get(&key).cloned(),
        }];
        match view.overlay(&t, Update::Delta(&changes)) {
            OverlayUpdate::Changes(c) => {
                assert_eq!(c.len(), 2);
                assert!(
                    matches!(&c[0], Change::RemoveRemote { ip, .. } if ip.to_string() == "10.0.1.3")
                );
                assert!(
                    matches!(&c[1], Change::UpsertRemote { endpoint, .. } if endpoint.ip.to_string() == "10.0.1.9")
                );
            }
            other => panic!("expected changes, got {other:?}"),
        }
        // A service change touches no overlay.
        let svc = [Applied {
            key: Key::Service { id: "s".into() },
            old: None,
            new: None,
        }];
        assert_eq!(
            view.overlay(&t, Update::Delta(&svc)),
            OverlayUpdate::Unchanged
        );
        // A second local task on red: a local delta, on its own interface.
        let key = Key::Endpoint {
            network: "red".into(),
            task: "t9".into(),
        };
        let Some(Value::Endpoint(mut e9)) = t
            .entries
            .get(&Key::Endpoint {
                network: "red".into(),
                task: "t1".into(),
            })
            .cloned()
        else {
            panic!()
        };
        e9.addr = "10.0.1.20".parse().unwrap();
        e9.netns = Some("/run/netns/t9".into());
        t.entries.insert(key.clone(), Value::Endpoint(e9));
        let added = [Applied {
            key,
            old: None,
            new: t
                .entries
                .get(&Key::Endpoint {
                    network: "red".into(),
                    task: "t9".into(),
                })
                .cloned(),
        }];
        match view.overlay(&t, Update::Delta(&added)) {
            OverlayUpdate::Changes(c) => assert!(
                matches!(&c[..], [Change::UpsertLocal { endpoint, .. }] if endpoint.interface == "eth0"),
                "{c:?}"
            ),
            other => panic!("expected a local change, got {other:?}"),
        }
        // The last local task leaving a network: a whole table.
        let key = Key::Endpoint {
            network: "blue".into(),
            task: "t1".into(),
        };
        let old = t.entries.remove(&key);
        let gone = [Applied {
            key,
            old,
            new: None,
        }];
        match view.overlay(&t, Update::Delta(&gone)) {
            OverlayUpdate::Whole(spec) => assert_eq!(spec.networks.len(), 1),
            other => panic!("expected a whole table, got {other:?}"),
        }
    }
}
