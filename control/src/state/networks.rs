//! The state's network commands: create (subnet, VNI, gateway) and remove.

use super::*;

impl State {
    pub(super) fn create_network(
        &mut self,
        id: &str,
        spec: &NetworkSpec,
        ingress: bool,
    ) -> Result<Outcome, StateError> {
        check_name("network", &spec.name)?;
        if !ingress && spec.name == INGRESS {
            return Err(StateError::NameInUse {
                kind: "network",
                name: spec.name.clone(),
            });
        }
        if let Some(other) = self.network_by_ref(&spec.name) {
            // The same spec: a pool-picked subnet counts as the one it got.
            let same = NetworkSpec {
                subnet: spec.subnet.or(other.spec.subnet),
                ..spec.clone()
            } == other.spec;
            return Err(if same {
                StateError::SameSpec {
                    kind: "network",
                    name: spec.name.clone(),
                    id: other.id.clone(),
                }
            } else {
                StateError::NameInUse {
                    kind: "network",
                    name: spec.name.clone(),
                }
            });
        }
        if self.networks.contains_key(id) {
            return Err(invalid(format!("network id {id} is already in use")));
        }
        let underlay = self.underlay_prefixes();
        let subnet = match spec.subnet {
            Some(s) => {
                if let Some((node, prefix)) = underlay.iter().find(|(_, p)| p.overlaps(&s)) {
                    return Err(invalid(format!(
                        "subnet {s} for network {} overlaps the underlay of node {node} \
                         ({prefix}, where its VXLAN and its managers' traffic run): a task \
                         there would take a node's address and its traffic would go astray. \
                         Pick a subnet outside every node's underlay",
                        spec.name
                    )));
                }
                if s.prefix() > 29 {
                    return Err(invalid(format!(
                        "subnet {s} for network {} is too small; use /29 or larger",
                        spec.name
                    )));
                }
                self.alloc.subnets.reserve(&spec.name, s)?;
                s
            }
            None => {
                let avoid: Vec<Subnet> = underlay.iter().map(|(_, p)| *p).collect();
                self.alloc.subnets.allocate_avoiding(&spec.name, &avoid)?
            }
        };
        let vni = match self.alloc.vnis.allocate() {
            Ok(v) => v,
            Err(e) => {
                self.alloc.subnets.release(&subnet);
                return Err(e.into());
            }
        };
        let network = Network {
            id: id.to_owned(),
            spec: NetworkSpec {
                subnet: Some(subnet),
                ..spec.clone()
            },
            vni,
            subnet,
            gateway: subnet.gateway(),
            ingress,
        };
        self.alloc
            .addresses
            .insert(id.to_owned(), AddressPool::new(&spec.name, subnet));
        self.networks.insert(id.to_owned(), network.clone());
        Ok(Outcome::Network(network))
    }

    pub(super) fn remove_network(&mut self, target: &str) -> Result<Outcome, StateError> {
        let network = self
            .network_by_ref(target)
            .cloned()
            .ok_or_else(|| StateError::NotFound {
                kind: "network",
                name: target.to_owned(),
            })?;
        let users: Vec<&str> = self
            .services
            .values()
            .filter(|s| self.network_ids_of(s).contains(&network.id))
            .map(|s| s.spec.name.as_str())
            .collect();
        if !users.is_empty() {
            return Err(StateError::NetworkInUse {
                network: network.spec.name.clone(),
                services: users.join(", "),
            });
        }
        // A task keeps its addresses until it ends, whatever its service
        // says now: the subnet must not go back to the pool under it (the
        // next network would hand its address out again).
        let attached: Vec<String> = self
            .tasks
            .values()
            .filter(|t| !t.ended() && t.attachments.iter().any(|a| a.network == network.id))
            .map(|t| {
                let service = self
                    .services
                    .get(&t.service)
                    .map_or(t.service.as_str(), |s| s.spec.name.as_str());
                t.name(service)
            })
            .collect();
        if !attached.is_empty() {
            return Err(StateError::NetworkHasEndpoints {
                network: network.spec.name.clone(),
                tasks: attached.join(", "),
            });
        }
        self.networks.remove(&network.id);
        for n in self.nodes.values_mut() {
            n.lb_addrs.remove(&network.id);
        }
        self.alloc.addresses.remove(&network.id);
        self.alloc.subnets.release(&network.subnet);
        self.alloc.vnis.release(network.vni);
        Ok(Outcome::Done)
    }
}
