//! [`NodeView`]: this node's overlay, whole ([`overlay_spec`]) or
//! followed delta by delta ([`OverlayUpdate`]).

use std::{collections::BTreeMap, net::Ipv4Addr, path::PathBuf};

use model::{
    session::Update,
    tables::{EndpointEntry, Key, NodeEndpointEntry, Tables},
};

use crate::{
    netlink::Mac,
    overlay::{Change, HostEndpoint, LocalEndpoint, NetworkSpec, OverlaySpec, RemoteEndpoint},
};

use super::{endpoint, node_endpoint, vips};

/// What the overlay needs after an update of the tables.
#[derive(Debug, PartialEq, Eq)]
pub enum OverlayUpdate {
    Unchanged,
    /// Endpoints came, went or moved on networks this node is already on:
    /// applied in constant time each.
    Changes(Vec<Change>),
    /// The set of networks this node is on changed, or one of them did
    /// (its entry, this node's address there, its VIPs): a whole table.
    Whole(OverlaySpec),
}

/// This node's share of the tables, followed delta by delta.
#[derive(Debug)]
pub struct NodeView {
    node: String,
    underlay: Ipv4Addr,
    /// Networks this node is on, with its own address there.
    local: BTreeMap<String, Ipv4Addr>,
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

    /// The networks this node is on, with its own address there.
    pub fn node(&self) -> &str {
        &self.node
    }

    pub fn networks(&self) -> &BTreeMap<String, Ipv4Addr> {
        &self.local
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
                    .filter_map(|n| Some((n.id.clone(), n.host?.ip)))
                    .collect();
                return OverlayUpdate::Whole(spec);
            }
        };
        let mut out = Vec::new();
        for c in changes {
            match &c.key {
                Key::Endpoint { network, task } if self.local.contains_key(network) => {
                    self.endpoint_change(tables, network, task, c, &mut out)
                }
                // Another node's own address (ours needs a whole table).
                Key::NodeEndpoint { network, .. } if self.local.contains_key(network) => {
                    let (old, new) = (node_endpoint(&c.old), node_endpoint(&c.new));
                    if let Some(o) = old
                        && new.is_none_or(|n| n.addr != o.addr)
                    {
                        out.push(Change::RemoveRemote {
                            network: network.clone(),
                            ip: o.addr,
                        });
                    }
                    if let Some(n) = new {
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
                _ => {}
            }
        }
        if out.is_empty() {
            OverlayUpdate::Unchanged
        } else {
            OverlayUpdate::Changes(out)
        }
    }

    fn endpoint_change(
        &self,
        tables: &Tables,
        network: &str,
        task: &str,
        c: &model::session::Applied,
        out: &mut Vec<Change>,
    ) {
        let (mut old, mut new) = (endpoint(&c.old), endpoint(&c.new));
        // This node's endpoints without a namespace are not served here at
        // all (as in overlay_spec): never remote entries to itself.
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
                if !self.is_local(new) {
                    out.push(Change::RemoveLocal {
                        network: network.to_owned(),
                        id: task.to_owned(),
                    });
                }
            } else if new.is_none_or(|n| n.addr != o.addr || self.is_local(Some(n))) {
                out.push(Change::RemoveRemote {
                    network: network.to_owned(),
                    ip: o.addr,
                });
            }
        }
        let Some(n) = new else { return };
        if self.is_local(new) {
            out.push(Change::UpsertLocal {
                network: network.to_owned(),
                endpoint: LocalEndpoint {
                    id: task.to_owned(),
                    netns: PathBuf::from(n.netns.as_deref().expect("local")),
                    ip: n.addr,
                    mac: Mac(n.mac),
                    interface: self.interface(tables, network, task),
                },
            });
        } else {
            out.push(Change::UpsertRemote {
                network: network.to_owned(),
                endpoint: RemoteEndpoint {
                    ip: n.addr,
                    mac: Mac(n.mac),
                    node: n.node_addr,
                },
            });
        }
    }

    /// Whether `changes` change which networks this node is on, or one of
    /// them: its entry, this node's address there, or the VIPs on it.
    fn needs_whole(&self, changes: &[model::session::Applied]) -> bool {
        changes.iter().any(|c| match &c.key {
            Key::Network { id } => self.local.contains_key(id),
            Key::NodeEndpoint { node, .. } => *node == self.node,
            Key::Service { .. } => {
                let (old, new) = (vips(&c.old), vips(&c.new));
                self.local
                    .keys()
                    .any(|net| old.and_then(|v| v.get(net)) != new.and_then(|v| v.get(net)))
            }
            Key::Endpoint { .. } | Key::NetworkKeys => false,
        })
    }
}

/// The overlay this node should have: the networks it has its own address on.
pub fn overlay_spec(tables: &Tables, node: &str, underlay: Ipv4Addr) -> OverlaySpec {
    let mine: BTreeMap<&str, &NodeEndpointEntry> = tables
        .node_endpoints()
        .filter(|(_, n, _)| *n == node)
        .map(|(net, _, e)| (net, e))
        .collect();
    // A task's interfaces are eth0, eth1, ... in network-id order.
    let mut next_if: BTreeMap<&str, usize> = BTreeMap::new();
    let mut local: BTreeMap<&str, Vec<LocalEndpoint>> = BTreeMap::new();
    let mut remote: BTreeMap<&str, Vec<RemoteEndpoint>> = BTreeMap::new();
    for (network, task, e) in tables.endpoints() {
        if !mine.contains_key(network) {
            continue;
        }
        if e.node != node {
            remote.entry(network).or_default().push(RemoteEndpoint {
                ip: e.addr,
                mac: Mac(e.mac),
                node: e.node_addr,
            });
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
    for (network, other, e) in tables.node_endpoints() {
        if other != node && mine.contains_key(network) {
            remote.entry(network).or_default().push(RemoteEndpoint {
                ip: e.addr,
                mac: Mac(e.mac),
                node: e.node_addr,
            });
        }
    }
    let mut vips: BTreeMap<&str, Vec<Ipv4Addr>> = BTreeMap::new();
    for (_, s) in tables.services() {
        for (net, vip) in &s.vips {
            if mine.contains_key(net.as_str()) {
                vips.entry(net).or_default().push(*vip);
            }
        }
    }
    let mut networks = Vec::new();
    for (id, n) in tables.networks() {
        let Some(host) = mine.get(id) else { continue };
        networks.push(NetworkSpec {
            id: id.to_owned(),
            vni: n.vni,
            subnet: n.subnet,
            gateway: n.gateway,
            mtu: None,
            encrypted: n.encrypted,
            local: local.remove(id).unwrap_or_default(),
            remote: remote.remove(id).unwrap_or_default(),
            host: Some(HostEndpoint {
                ip: host.addr,
                mac: Mac(host.mac),
            }),
            vips: vips.remove(id).unwrap_or_default(),
        });
    }
    OverlaySpec {
        underlay: (!networks.is_empty()).then_some(underlay),
        networks,
    }
}
