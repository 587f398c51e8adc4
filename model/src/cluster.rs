//! Cluster-wide settings and secrets: the join-token records and the
//! encrypted networks' key ring.

use std::{fmt, time::Duration};

use serde::{Deserialize, Serialize};

use crate::{Role, Subnet};

/// A node certificate's lifetime by default (Swarm: 90 days).
pub const DEFAULT_CERT_LIFETIME: Duration = Duration::from_secs(90 * 24 * 3600);

/// Cluster-wide settings fixed at init.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterSettings {
    /// Pool for network subnets and the size each network gets.
    pub address_pool: Subnet,
    pub subnet_size: u8,
    /// The ingress network's subnet.
    pub ingress_subnet: Subnet,
    /// Lifetime of node certificates; they renew in the last third.
    #[serde(default = "default_cert_lifetime")]
    pub cert_lifetime_secs: u64,
    /// Whether managers' data keys are wrapped by an operator-held key.
    #[serde(default)]
    pub autolock: bool,
    /// How often agents send a heartbeat to the dispatcher.
    #[serde(default = "default_heartbeat_period")]
    pub heartbeat_period_ms: u64,
    /// Missed heartbeats after which the leader commits a node as down.
    #[serde(default = "default_heartbeat_misses")]
    pub heartbeat_misses: u32,
    /// How often the leader adds a new key to the encrypted networks' ring
    /// (Swarm: 12 h).
    #[serde(default = "default_network_key_rotation")]
    pub network_key_rotation_secs: u64,
}

fn default_network_key_rotation() -> u64 {
    crate::ring::DEFAULT_ROTATION.as_secs()
}

fn default_heartbeat_period() -> u64 {
    1000
}

fn default_heartbeat_misses() -> u32 {
    3
}

fn default_cert_lifetime() -> u64 {
    DEFAULT_CERT_LIFETIME.as_secs()
}

/// The cluster's secrets. They live only in the Raft state, which is
/// sealed at rest and replicated to managers only; no read API returns
/// them except the token and unlock-key calls, to managers.
#[derive(Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ClusterSecrets {
    pub ca_cert: String,
    pub ca_key: String,
    /// The join tokens, as records: never their secrets (see
    /// the CA). `None` in a state from before tokens were kept
    /// this way: `join-token --rotate` makes one.
    #[serde(default)]
    pub worker_join: Option<TokenRecord>,
    #[serde(default)]
    pub manager_join: Option<TokenRecord>,
    /// Set with autolock: the key that wraps every manager's data key.
    #[serde(default)]
    pub unlock_key: Option<String>,
}

impl fmt::Debug for ClusterSecrets {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ClusterSecrets(..)")
    }
}

impl ClusterSecrets {
    /// The record of `role`'s join token.
    pub fn join(&self, role: Role) -> Option<&TokenRecord> {
        match role {
            Role::Manager => self.manager_join.as_ref(),
            Role::Worker => self.worker_join.as_ref(),
        }
    }
}

/// What the state keeps of a join token: the nonce its secret is derived
/// from (with the CA key), and a salted SHA-256 of the secret to check a
/// presented one against. Hex strings.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRecord {
    pub nonce: String,
    pub salt: String,
    pub hash: String,
}
impl Default for ClusterSettings {
    fn default() -> Self {
        ClusterSettings {
            address_pool: "10.0.0.0/8".parse().expect("valid"),
            subnet_size: 24,
            // Swarm's ingress default.
            ingress_subnet: "10.0.0.0/24".parse().expect("valid"),
            cert_lifetime_secs: default_cert_lifetime(),
            autolock: false,
            heartbeat_period_ms: default_heartbeat_period(),
            heartbeat_misses: default_heartbeat_misses(),
            network_key_rotation_secs: default_network_key_rotation(),
        }
    }
}

/// One key of the encrypted networks' ring: AES-128-GCM key and 4-byte
/// salt, as rfc4106 takes them.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkKey {
    /// Increases by one per key; part of every SPI made with it.
    pub id: u32,
    #[serde(with = "hex_bytes")]
    pub secret: Vec<u8>,
    pub created_ms: u64,
}

impl fmt::Debug for NetworkKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NetworkKey({}, created {})", self.id, self.created_ms)
    }
}

/// Hex in human-readable formats (JSON: `meshctl`, the node file), raw
/// bytes in binary ones (the Raft log and snapshots).
mod hex_bytes {
    use serde::{Deserialize, Deserializer, Serialize, Serializer, de::Error as _};

    pub fn serialize<S: Serializer>(b: &[u8], s: S) -> Result<S::Ok, S::Error> {
        if !s.is_human_readable() {
            return b.serialize(s);
        }
        s.serialize_str(&b.iter().map(|x| format!("{x:02x}")).collect::<String>())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        if !d.is_human_readable() {
            return Vec::<u8>::deserialize(d);
        }
        let s = String::deserialize(d)?;
        if s.len() % 2 != 0 {
            return Err(D::Error::custom("odd-length hex"));
        }
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).map_err(D::Error::custom))
            .collect()
    }
}
