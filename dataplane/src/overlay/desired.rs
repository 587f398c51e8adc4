//! The desired overlay table, indexed so that one change is checked and
//! applied in constant time: validation of a whole spec, staging and undo
//! of deltas.

use super::*;

/// Who holds an address in a network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Owner {
    Local(String),
    Remote,
}

/// The desired table, indexed so that one change is checked and applied in
/// constant time.
#[derive(Default)]
pub(super) struct Desired {
    pub(super) underlay: Option<Ipv4Addr>,
    pub(super) networks: BTreeMap<String, DesiredNetwork>,
}

pub(super) struct DesiredNetwork {
    /// id, VNI, subnet, gateway, MTU; its endpoint lists stay empty.
    pub(super) spec: NetworkSpec,
    pub(super) local: BTreeMap<String, LocalEndpoint>,
    pub(super) remote: HashMap<Ipv4Addr, RemoteEndpoint>,
    pub(super) owners: HashMap<Ipv4Addr, Owner>,
    pub(super) macs: HashMap<Mac, Ipv4Addr>,
}

/// An endpoint, named in messages (formatted only when there is a problem).
pub(super) enum What<'a> {
    Remote(&'a RemoteEndpoint),
    Local(&'a str),
}

impl fmt::Display for What<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            What::Remote(e) => write!(f, "remote endpoint {} on {}", e.ip, e.node),
            What::Local(id) => write!(f, "local endpoint {id}"),
        }
    }
}

/// How to take back one staged change.
pub(super) enum Undo {
    Remote(String, Ipv4Addr, Option<RemoteEndpoint>),
    Local(String, String, Option<LocalEndpoint>),
}

impl DesiredNetwork {
    pub(super) fn new(mut spec: NetworkSpec) -> DesiredNetwork {
        spec.local.clear();
        spec.remote.clear();
        DesiredNetwork {
            spec,
            local: BTreeMap::new(),
            remote: HashMap::new(),
            owners: HashMap::new(),
            macs: HashMap::new(),
        }
    }

    /// The neighbour entries that make the VIPs resolve to the bridge.
    pub(super) fn vips(&self) -> BTreeMap<Ipv4Addr, Mac> {
        match self.spec.host {
            Some(h) => self.spec.vips.iter().map(|ip| (*ip, h.mac)).collect(),
            None => BTreeMap::new(),
        }
    }

    pub(super) fn set_remote(
        &mut self,
        ip: Ipv4Addr,
        new: Option<RemoteEndpoint>,
    ) -> Option<RemoteEndpoint> {
        let old = match new {
            Some(e) => {
                self.owners.insert(ip, Owner::Remote);
                self.remote.insert(ip, e)
            }
            None => {
                let old = self.remote.remove(&ip);
                if old.is_some() {
                    self.owners.remove(&ip);
                }
                old
            }
        };
        if let Some(o) = &old {
            self.macs.remove(&o.mac);
        }
        if let Some(e) = self.remote.get(&ip) {
            self.macs.insert(e.mac, ip);
        }
        old
    }

    pub(super) fn set_local(
        &mut self,
        id: &str,
        new: Option<LocalEndpoint>,
    ) -> Option<LocalEndpoint> {
        let old = match new {
            Some(e) => self.local.insert(id.to_owned(), e),
            None => self.local.remove(id),
        };
        if let Some(o) = &old {
            self.owners.remove(&o.ip);
            self.macs.remove(&o.mac);
        }
        if let Some(e) = self.local.get(id) {
            self.owners.insert(e.ip, Owner::Local(id.to_owned()));
            self.macs.insert(e.mac, e.ip);
        }
        old
    }

    /// Problems with an endpoint's address and MAC, given who holds what now.
    pub(super) fn check_address(
        &self,
        what: &What<'_>,
        ip: Ipv4Addr,
        mac: Mac,
        me: &Owner,
        p: &mut Vec<String>,
    ) {
        let (n, net) = (&self.spec.id, &self.spec);
        if !net.subnet.is_host(ip) || ip == net.gateway {
            p.push(format!(
                "network {n}: {what}: {ip} is not a usable address in {} (gateway {})",
                net.subnet, net.gateway
            ));
        }
        if let Some(owner) = self.owners.get(&ip)
            && owner != me
        {
            let other = match owner {
                Owner::Local(id) => format!("local endpoint {id}"),
                Owner::Remote => "a remote endpoint".into(),
            };
            p.push(format!(
                "network {n}: {what}: address {ip} is already held by {other}"
            ));
        }
        if !mac.is_unicast() {
            p.push(format!("network {n}: {what}: {mac} is not a unicast MAC"));
        }
        if let Some(holder) = self.macs.get(&mac) {
            let same = match me {
                Owner::Remote => *holder == ip,
                Owner::Local(id) => self.local.get(id).is_some_and(|l| l.ip == *holder),
            };
            if !same {
                p.push(format!(
                    "network {n}: {what}: MAC {mac} is already held by {holder}"
                ));
            }
        }
    }
}

impl Desired {
    /// Checks a whole table and indexes it; every problem is reported.
    pub(super) fn build(spec: OverlaySpec) -> Result<Desired, OverlayError> {
        let mut p = Vec::new();
        if !spec.networks.is_empty() && spec.underlay.is_none() {
            p.push(
                "\"underlay\" (this node's underlay address) is required when there are networks"
                    .into(),
            );
        }
        let mut d = Desired {
            underlay: spec.underlay,
            networks: BTreeMap::new(),
        };
        let mut vnis = BTreeMap::new();
        let mut staged = Vec::new();
        for mut net in spec.networks {
            let n = net.id.clone();
            if n.is_empty() {
                p.push("a network has an empty id".into());
            }
            if !(1..(1 << 24)).contains(&net.vni) {
                p.push(format!(
                    "network {n}: VNI {} is outside 1..=16777215",
                    net.vni
                ));
            } else if let Some(other) = vnis.insert(net.vni, n.clone()) {
                p.push(format!("networks {other} and {n} both use VNI {}", net.vni));
            }
            if net.subnet.prefix() > 30 {
                p.push(format!(
                    "network {n}: subnet {} leaves no room for a gateway and endpoints; use /30 or larger",
                    net.subnet
                ));
            }
            if !net.subnet.is_host(net.gateway) {
                p.push(format!(
                    "network {n}: gateway {} is not a host address in {}",
                    net.gateway, net.subnet
                ));
            }
            match net.host {
                Some(h) if !net.subnet.is_host(h.ip) || h.ip == net.gateway => p.push(format!(
                    "network {n}: host address {} is not a usable address in {}",
                    h.ip, net.subnet
                )),
                Some(h) if !h.mac.is_unicast() => p.push(format!(
                    "network {n}: host MAC {} is not a unicast MAC",
                    h.mac
                )),
                None if !net.vips.is_empty() => p.push(format!(
                    "network {n}: VIPs need a host address for local tasks to reach them through"
                )),
                _ => {}
            }
            for vip in &net.vips {
                if !net.subnet.is_host(*vip) || Some(*vip) == net.host.map(|h| h.ip) {
                    p.push(format!(
                        "network {n}: VIP {vip} is not a usable address in {}",
                        net.subnet
                    ));
                }
            }
            if let Some(mtu) = net.mtu
                && !(MIN_MTU..=65535 - VXLAN_OVERHEAD).contains(&mtu)
            {
                p.push(format!(
                    "network {n}: MTU {mtu} is outside {MIN_MTU}..={}",
                    65535 - VXLAN_OVERHEAD
                ));
            }
            if d.networks.contains_key(&n) {
                p.push(format!("network {n} is listed twice"));
                continue;
            }
            let local = std::mem::take(&mut net.local);
            let remote = std::mem::take(&mut net.remote);
            d.networks.insert(n.clone(), DesiredNetwork::new(net));
            staged.extend(local.into_iter().map(|endpoint| Change::UpsertLocal {
                network: n.clone(),
                endpoint,
            }));
            staged.extend(remote.into_iter().map(|endpoint| Change::UpsertRemote {
                network: n.clone(),
                endpoint,
            }));
        }
        for c in &staged {
            match d.stage(c) {
                // In a whole table, an upsert that replaces is a duplicate.
                Ok(Undo::Remote(n, ip, Some(_))) => {
                    p.push(format!("network {n}: remote endpoint {ip} is listed twice"))
                }
                Ok(Undo::Local(n, id, Some(_))) => {
                    p.push(format!("network {n}: local endpoint {id} is listed twice"))
                }
                Ok(_) => {}
                Err(e) => p.extend(e),
            }
        }
        if p.is_empty() {
            Ok(d)
        } else {
            Err(OverlayError::Invalid(p))
        }
    }

    /// Checks one change against the table as it stands and makes it; the
    /// returned undo takes it back.
    pub(super) fn stage(&mut self, c: &Change) -> Result<Undo, Vec<String>> {
        let mut p = Vec::new();
        let name = c.network();
        if !self.networks.contains_key(name) {
            return Err(vec![format!(
                "network {name} is not in the table (networks are added with a whole table)"
            )]);
        }
        if let Change::UpsertLocal { endpoint: e, .. } = c {
            // The task interface and the host-side veth name are unique
            // across every network on the node.
            let veth = veth_name(name, &e.id);
            for (other_net, other) in self
                .networks
                .values()
                .flat_map(|n| n.local.values().map(move |l| (&n.spec.id, l)))
                .filter(|(n, l)| !(*n == name && l.id == e.id))
            {
                if other.netns == e.netns && other.interface == e.interface {
                    p.push(format!(
                        "network {name}: local endpoint {}: {} in {} is already used by {other_net}/{}",
                        e.id,
                        e.interface,
                        e.netns.display(),
                        other.id
                    ));
                }
                if veth_name(other_net, &other.id) == veth {
                    p.push(format!(
                        "network {name}: local endpoints {} and {other_net}/{} hash to the same interface name; rename one",
                        e.id, other.id
                    ));
                }
            }
        }
        let underlay = self.underlay;
        let net = self.networks.get_mut(name).expect("checked above");
        let n = name.to_owned();
        match c {
            Change::UpsertRemote { endpoint: e, .. } => {
                let what = What::Remote(e);
                net.check_address(&what, e.ip, e.mac, &Owner::Remote, &mut p);
                if Some(e.node) == underlay {
                    p.push(format!(
                        "network {n}: {what} is on this node; list it as local"
                    ));
                }
                if e.node.is_unspecified() || e.node.is_multicast() || e.node.is_broadcast() {
                    p.push(format!(
                        "network {n}: {what}: {} is not a node address",
                        e.node
                    ));
                }
                if p.is_empty() {
                    return Ok(Undo::Remote(n, e.ip, net.set_remote(e.ip, Some(e.clone()))));
                }
            }
            Change::RemoveRemote { ip, .. } => {
                return Ok(Undo::Remote(n, *ip, net.set_remote(*ip, None)));
            }
            Change::UpsertLocal { endpoint: e, .. } => {
                let what = What::Local(&e.id);
                if e.id.is_empty() {
                    p.push(format!("network {n}: a local endpoint has an empty id"));
                }
                net.check_address(&what, e.ip, e.mac, &Owner::Local(e.id.clone()), &mut p);
                if let Err(err) = check_ifname(&e.interface) {
                    p.push(format!("network {n}: {what}: {err}"));
                }
                if !e.netns.is_absolute() {
                    p.push(format!(
                        "network {n}: {what}: netns {} must be an absolute path",
                        e.netns.display()
                    ));
                }
                if p.is_empty() {
                    return Ok(Undo::Local(
                        n,
                        e.id.clone(),
                        net.set_local(&e.id, Some(e.clone())),
                    ));
                }
            }
            Change::RemoveLocal { id, .. } => {
                return Ok(Undo::Local(n, id.clone(), net.set_local(id, None)));
            }
        }
        Err(p)
    }

    pub(super) fn undo(&mut self, u: Undo) {
        match u {
            Undo::Remote(n, ip, old) => {
                if let Some(net) = self.networks.get_mut(&n) {
                    net.set_remote(ip, old);
                }
            }
            Undo::Local(n, id, old) => {
                if let Some(net) = self.networks.get_mut(&n) {
                    net.set_local(&id, old);
                }
            }
        }
    }

    pub(super) fn to_spec(&self) -> OverlaySpec {
        OverlaySpec {
            underlay: self.underlay,
            networks: self
                .networks
                .values()
                .map(|n| {
                    let mut spec = n.spec.clone();
                    spec.local = n.local.values().cloned().collect();
                    let mut remote: Vec<_> = n.remote.values().cloned().collect();
                    remote.sort_by_key(|r| r.ip);
                    spec.remote = remote;
                    spec
                })
                .collect(),
        }
    }
}
