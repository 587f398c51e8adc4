//! The tables every node's data plane is built from: networks, services,
//! endpoints, node endpoints and the key ring, keyed and versioned by a
//! cluster-wide revision, and the deltas between revisions. What derives
//! them from the state lives with the state machine (`control::tables`).

use std::{collections::BTreeMap, net::Ipv4Addr};

use serde::{Deserialize, Serialize};

use crate::{EndpointMode, PortConfig, Subnet, by_network::ByNetwork};

/// A cluster-wide revision: the Raft log index of the entry that produced
/// the change. 0 means "nothing yet".
pub type Revision = u64;

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Key {
    Network {
        id: String,
    },
    Service {
        id: String,
    },
    Endpoint {
        network: String,
        task: String,
    },
    /// The encrypted networks' key ring (one entry, when there is a ring).
    NetworkKeys,
    /// A node's own address on a network (its load-balancer endpoint).
    NodeEndpoint {
        network: String,
        node: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkEntry {
    pub name: String,
    pub vni: u32,
    pub subnet: Subnet,
    pub gateway: Ipv4Addr,
    pub ingress: bool,
    pub internal: bool,
    pub encrypted: bool,
}

/// The key ring agents program their IPsec with: every key is accepted,
/// `primary` is sent with (the leader's key manager).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkKeysEntry {
    pub keys: Vec<crate::NetworkKey>,
    pub primary: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceEntry {
    pub name: String,
    pub endpoint_mode: EndpointMode,
    /// Network id -> the service's virtual IP there (none in dnsrr mode).
    pub vips: ByNetwork<Ipv4Addr>,
    /// As published (`published` always set).
    pub ports: Vec<PortConfig>,
    /// Network id -> extra DNS names on that network.
    #[serde(default)]
    pub aliases: ByNetwork<Vec<String>>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointEntry {
    pub service: String,
    /// `service.slot`, as Swarm names tasks.
    pub task_name: String,
    pub node: String,
    /// The node's underlay address: where VXLAN frames for this endpoint go.
    pub node_addr: Ipv4Addr,
    pub addr: Ipv4Addr,
    pub mac: [u8; 6],
    /// The task's network namespace (set by whoever runs the task).
    #[serde(default)]
    pub netns: Option<String>,
    /// Told to stop, still running: load balancers keep its open flows
    /// and send it no new ones; DNS no longer names it.
    #[serde(default)]
    pub draining: bool,
}

/// A node's own address on a network: the source address of the flows its
/// load balancer sends to tasks there, and where their replies return.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeEndpointEntry {
    /// The node's underlay address.
    pub node_addr: Ipv4Addr,
    pub addr: Ipv4Addr,
    pub mac: [u8; 6],
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Value {
    Network(NetworkEntry),
    NetworkKeys(NetworkKeysEntry),
    Service(ServiceEntry),
    Endpoint(EndpointEntry),
    NodeEndpoint(NodeEndpointEntry),
}

/// One key set (`value: Some`) or removed (`None`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Change {
    pub key: Key,
    #[serde(default)]
    pub value: Option<Value>,
}

/// The changes one revision made.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Delta {
    pub revision: Revision,
    pub changes: Vec<Change>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TableError {
    #[error("delta for revision {got} does not follow revision {have}")]
    OutOfOrder { have: Revision, got: Revision },
}

/// The whole table at one revision: what a manager serves and what every
/// agent keeps as its replica.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tables {
    pub revision: Revision,
    /// As a list of `{key, value}` on the wire (JSON keys are strings).
    #[serde(with = "entry_list")]
    pub entries: BTreeMap<Key, Value>,
}

mod entry_list {
    use super::*;
    use serde::{Deserializer, Serializer, ser::SerializeSeq};

    #[derive(Serialize)]
    struct Ref<'a> {
        key: &'a Key,
        value: &'a Value,
    }

    #[derive(Deserialize)]
    struct Owned {
        key: Key,
        value: Value,
    }

    pub fn serialize<S: Serializer>(m: &BTreeMap<Key, Value>, s: S) -> Result<S::Ok, S::Error> {
        let mut seq = s.serialize_seq(Some(m.len()))?;
        for (key, value) in m {
            seq.serialize_element(&Ref { key, value })?;
        }
        seq.end()
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<BTreeMap<Key, Value>, D::Error> {
        let list = Vec::<Owned>::deserialize(d)?;
        Ok(list.into_iter().map(|e| (e.key, e.value)).collect())
    }
}

/// The MAC mesh gives an address it allocated (Docker's 02:42 prefix).
pub fn mac_of(addr: Ipv4Addr) -> [u8; 6] {
    let [a, b, c, d] = addr.octets();
    [0x02, 0x42, a, b, c, d]
}

impl Tables {
    /// Applies the next delta. A delta at or below the current revision is
    /// already in (ignored); none may be skipped, which the caller ensures
    /// by asking for deltas since its revision.
    pub fn apply(&mut self, delta: &Delta) -> Result<bool, TableError> {
        if delta.revision <= self.revision {
            return Ok(false);
        }
        for c in &delta.changes {
            match &c.value {
                Some(v) => {
                    self.entries.insert(c.key.clone(), v.clone());
                }
                None => {
                    self.entries.remove(&c.key);
                }
            }
        }
        self.revision = delta.revision;
        Ok(true)
    }

    pub fn endpoints(&self) -> impl Iterator<Item = (&str, &str, &EndpointEntry)> {
        self.entries.iter().filter_map(|(k, v)| match (k, v) {
            (Key::Endpoint { network, task }, Value::Endpoint(e)) => {
                Some((network.as_str(), task.as_str(), e))
            }
            _ => None,
        })
    }

    pub fn networks(&self) -> impl Iterator<Item = (&str, &NetworkEntry)> {
        self.entries.iter().filter_map(|(k, v)| match (k, v) {
            (Key::Network { id }, Value::Network(n)) => Some((id.as_str(), n)),
            _ => None,
        })
    }

    /// (network, node, entry) for every node's own address on a network.
    pub fn node_endpoints(&self) -> impl Iterator<Item = (&str, &str, &NodeEndpointEntry)> {
        self.entries.iter().filter_map(|(k, v)| match (k, v) {
            (Key::NodeEndpoint { network, node }, Value::NodeEndpoint(e)) => {
                Some((network.as_str(), node.as_str(), e))
            }
            _ => None,
        })
    }

    /// The key ring, when the cluster has one.
    pub fn network_keys(&self) -> Option<&NetworkKeysEntry> {
        match self.entries.get(&Key::NetworkKeys) {
            Some(Value::NetworkKeys(k)) => Some(k),
            _ => None,
        }
    }

    pub fn services(&self) -> impl Iterator<Item = (&str, &ServiceEntry)> {
        self.entries.iter().filter_map(|(k, v)| match (k, v) {
            (Key::Service { id }, Value::Service(s)) => Some((id.as_str(), s)),
            _ => None,
        })
    }
}
