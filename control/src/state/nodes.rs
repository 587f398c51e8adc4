//! The state's node commands: init, join, updates, status, underlay, removal.

use super::*;

impl State {
    pub(super) fn init(
        &mut self,
        cluster_id: &str,
        ingress_id: &str,
        settings: &ClusterSettings,
    ) -> Result<Outcome, StateError> {
        if self.settings.is_some() {
            return Err(invalid("the cluster is already initialized"));
        }
        self.alloc.subnets = SubnetPool::new(settings.address_pool, settings.subnet_size)?;
        self.settings = Some(settings.clone());
        self.cluster_id = Some(cluster_id.to_owned());
        let spec = NetworkSpec {
            name: INGRESS.into(),
            subnet: Some(settings.ingress_subnet),
            ..NetworkSpec::default()
        };
        self.create_network(ingress_id, &spec, true)
    }

    /// The node with this id. Commands address nodes by id only: names
    /// are resolved to ids by the API, which refuses an ambiguous one.
    pub(super) fn node_mut(&mut self, id: &str) -> Result<&mut Node, StateError> {
        self.nodes.get_mut(id).ok_or_else(|| StateError::NotFound {
            kind: "node",
            name: id.to_owned(),
        })
    }

    pub(super) fn add_node(
        &mut self,
        id: &str,
        hostname: &str,
        addr: Ipv4Addr,
        api_addr: Option<String>,
        role: Role,
        underlay: &[Subnet],
    ) -> Result<Outcome, StateError> {
        if self.nodes.contains_key(id) || self.removed.contains(id) {
            return Err(StateError::NameInUse {
                kind: "node id",
                name: id.to_owned(),
            });
        }
        check_hostname(hostname)?;
        if looks_like_node_id(hostname) {
            return Err(invalid(format!(
                "hostname {hostname:?} looks like a node id (16 hex digits); node ids and \
                 hostnames must never be confused: use another hostname"
            )));
        }
        if let Some(other) = self.nodes.values().find(|n| n.hostname == id) {
            return Err(invalid(format!(
                "node id {id} is already the hostname of node {}",
                other.id
            )));
        }
        if underlay.len() > MAX_UNDERLAY_PREFIXES {
            return Err(invalid(format!(
                "a node reports at most {MAX_UNDERLAY_PREFIXES} underlay prefixes, not {}",
                underlay.len()
            )));
        }
        let mut prefixes = underlay.to_vec();
        prefixes.push(Subnet::containing(addr, 32));
        if let Some(clash) = self.underlay_clash(id, &prefixes) {
            return Err(invalid(format!("node {hostname} can't join: {clash}")));
        }
        if let Some(other) = self.nodes.values().find(|n| n.addr == addr) {
            return Err(invalid(format!(
                "node address {addr} is already used by node {}",
                other.hostname
            )));
        }
        let mut lb_addrs = BTreeMap::new();
        if let Some(ingress) = self.ingress().map(|n| n.id.clone()) {
            let pool = self.alloc.addresses.get_mut(&ingress).expect("indexed");
            lb_addrs.insert(ingress, pool.allocate()?);
        }
        let node = Node {
            id: id.to_owned(),
            version: 1,
            hostname: hostname.to_owned(),
            addr,
            underlay: underlay.to_vec(),
            api_addr,
            spec: NodeSpec {
                role,
                availability: Availability::Active,
                labels: BTreeMap::new(),
            },
            status: NodeStatus::Ready,
            lb_addrs,
        };
        self.nodes.insert(id.to_owned(), node.clone());
        Ok(Outcome::Node(node))
    }

    /// Every node's underlay prefixes and address (as a /32), with the
    /// node's hostname.
    pub(super) fn underlay_prefixes(&self) -> Vec<(String, Subnet)> {
        self.nodes
            .values()
            .flat_map(|n| {
                n.underlay
                    .iter()
                    .copied()
                    .chain([Subnet::containing(n.addr, 32)])
                    .map(|p| (n.hostname.clone(), p))
            })
            .collect()
    }

    /// Records what node `id`'s underlay holds now. This is a fact about
    /// the host, not a request: it is recorded even when a network already
    /// overlaps it (refusing it would only let the next `network create`
    /// land on it too); the dispatcher warns with [`State::underlay_clash`].
    pub(super) fn set_node_underlay(
        &mut self,
        id: &str,
        underlay: &[Subnet],
    ) -> Result<Outcome, StateError> {
        if underlay.len() > MAX_UNDERLAY_PREFIXES {
            return Err(invalid(format!(
                "a node reports at most {MAX_UNDERLAY_PREFIXES} underlay prefixes, not {}",
                underlay.len()
            )));
        }
        let node = self.node_mut(id)?;
        let mut sorted = underlay.to_vec();
        sorted.sort();
        sorted.dedup();
        if node.underlay != sorted {
            node.underlay = sorted;
            node.version += 1;
        }
        Ok(Outcome::Node(node.clone()))
    }

    /// Why node `id` may not have `prefixes` on its underlay: a network
    /// overlaps one of them.
    pub fn underlay_clash(&self, id: &str, prefixes: &[Subnet]) -> Option<String> {
        self.networks.values().find_map(|net| {
            let p = prefixes.iter().find(|p| p.overlaps(&net.subnet))?;
            Some(format!(
                "its underlay {p} overlaps network {} ({}); its tasks' addresses would shadow \
                 the node addresses there. Move the node to an underlay outside every \
                 network, or remove network {} (node {id})",
                net.spec.name, net.subnet, net.spec.name
            ))
        })
    }

    pub(super) fn managers(&self) -> usize {
        self.nodes
            .values()
            .filter(|n| n.spec.role == Role::Manager)
            .count()
    }

    pub(super) fn update_node(
        &mut self,
        id: &str,
        version: u64,
        spec: &NodeSpec,
    ) -> Result<Outcome, StateError> {
        let managers = self.managers();
        let node = self.node_mut(id)?;
        if node.version != version {
            return Err(StateError::Conflict {
                kind: "node",
                name: node.hostname.clone(),
                current: node.version,
                given: version,
            });
        }
        if node.spec.role == Role::Manager && spec.role == Role::Worker && managers == 1 {
            return Err(invalid(format!(
                "node {} is the last manager; promote another node before demoting it",
                node.hostname
            )));
        }
        for key in spec.labels.keys() {
            if key.is_empty() || key.contains(char::is_whitespace) {
                return Err(invalid(format!(
                    "node label {key:?} must be a non-empty word"
                )));
            }
        }
        node.spec = spec.clone();
        node.version += 1;
        Ok(Outcome::Node(node.clone()))
    }

    pub(super) fn remove_node(&mut self, id: &str, force: bool) -> Result<Outcome, StateError> {
        let node = self.node_mut(id)?.clone();
        if node.spec.role == Role::Manager {
            return Err(invalid(format!(
                "node {} is a manager; demote it before removing it",
                node.hostname
            )));
        }
        if node.status == NodeStatus::Ready && !force {
            return Err(invalid(format!(
                "node {} is not down and can't be removed; stop it, or use --force",
                node.hostname
            )));
        }
        self.remove_tasks_where(|t| t.node == node.id);
        for (net, addr) in &node.lb_addrs {
            if let Some(pool) = self.alloc.addresses.get_mut(net) {
                pool.release(*addr);
            }
        }
        self.nodes.remove(&node.id);
        self.removed.insert(node.id);
        Ok(Outcome::Done)
    }
}
