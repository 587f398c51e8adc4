//! IPv4 subnets: parsed, printed and compared, serialized as `10.0.1.0/24`.

use std::{fmt, net::Ipv4Addr, str::FromStr};

use serde::{Deserialize, Serialize};

/// Text that is not an IPv4 subnet with its host bits zero.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not an IPv4 subnet like 10.0.1.0/24")]
pub struct SubnetError(pub String);

/// An IPv4 network: address (host bits zero) and prefix length. Serialized
/// as its text form, `10.0.1.0/24`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Subnet {
    network: u32,
    prefix: u8,
}

impl Subnet {
    /// The subnet of `prefix` bits that holds `addr` (host bits cleared).
    pub fn containing(addr: Ipv4Addr, prefix: u8) -> Subnet {
        let prefix = prefix.min(32);
        Subnet {
            network: u32::from(addr) & mask(prefix),
            prefix,
        }
    }

    /// A subnet from an address (host bits must be zero) and a prefix length.
    pub fn new(addr: Ipv4Addr, prefix: u8) -> Result<Subnet, SubnetError> {
        let bad = || SubnetError(format!("{addr}/{prefix}"));
        if prefix > 32 {
            return Err(bad());
        }
        let network = u32::from(addr);
        if network & !mask(prefix) != 0 {
            return Err(bad());
        }
        Ok(Subnet { network, prefix })
    }

    pub fn network(&self) -> Ipv4Addr {
        Ipv4Addr::from(self.network)
    }

    /// Its first address, as a number.
    pub fn first(&self) -> u32 {
        self.network
    }

    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    /// How many addresses it spans.
    pub fn size(&self) -> u64 {
        1u64 << (32 - u32::from(self.prefix))
    }

    /// Its last address, as a number.
    pub fn last(&self) -> u32 {
        (u64::from(self.network) + self.size() - 1) as u32
    }

    pub fn contains(&self, addr: Ipv4Addr) -> bool {
        u32::from(addr) & mask(self.prefix) == self.network
    }

    /// Whether `addr` is a host address of this subnet: inside it, and neither
    /// the network nor (for prefixes up to /30) the broadcast address.
    pub fn is_host(&self, addr: Ipv4Addr) -> bool {
        let a = u32::from(addr);
        self.contains(addr) && (self.prefix >= 31 || (a != self.network && a != self.last()))
    }

    pub fn overlaps(&self, other: &Subnet) -> bool {
        self.network <= other.last() && other.network <= self.last()
    }

    /// The gateway: the first host address, as in Docker.
    pub fn gateway(&self) -> Ipv4Addr {
        Ipv4Addr::from(self.network + 1)
    }

    /// The enclosing subnet `bits` prefix lengths shorter (at least /0).
    pub fn widened(&self, bits: u8) -> Subnet {
        let prefix = self.prefix.saturating_sub(bits);
        Subnet {
            network: self.network & mask(prefix),
            prefix,
        }
    }
}

fn mask(prefix: u8) -> u32 {
    if prefix == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(prefix))
    }
}

impl fmt::Display for Subnet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network(), self.prefix)
    }
}

impl From<Subnet> for String {
    fn from(subnet: Subnet) -> String {
        subnet.to_string()
    }
}

impl TryFrom<String> for Subnet {
    type Error = SubnetError;

    fn try_from(text: String) -> Result<Subnet, SubnetError> {
        text.parse()
    }
}

impl FromStr for Subnet {
    type Err = SubnetError;

    fn from_str(s: &str) -> Result<Subnet, SubnetError> {
        let bad = || SubnetError(s.to_owned());
        let (addr, prefix) = s.split_once('/').ok_or_else(bad)?;
        let addr: Ipv4Addr = addr.parse().map_err(|_| bad())?;
        let prefix: u8 = prefix.parse().map_err(|_| bad())?;
        Subnet::new(addr, prefix).map_err(|_| bad())
    }
}
