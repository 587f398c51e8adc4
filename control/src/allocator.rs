//! Allocation of overlay identifiers: subnets from a pool, VNIs, and task
//! addresses within a network. Pure code: the leader calls it while committing
//! state, so it never touches the kernel and never blocks.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
};

/// First VNI handed out; lower ones are left for the operator (Swarm starts at 4096 too).
pub const VNI_MIN: u32 = 4096;
/// Largest 24-bit VNI.
pub const VNI_MAX: u32 = (1 << 24) - 1;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AllocError {
    #[error("{0:?} is not an IPv4 subnet like 10.0.1.0/24")]
    BadSubnet(String),
    #[error("subnet {subnet} for network {network} overlaps {existing}, used by network {owner}")]
    Overlap {
        network: String,
        subnet: Subnet,
        existing: Subnet,
        owner: String,
    },
    #[error("subnet {subnet} for network {network} is outside the address pool {pool}")]
    OutsidePool {
        network: String,
        subnet: Subnet,
        pool: Subnet,
    },
    #[error(
        "the address pool {pool} has no free /{size} left for network {network}; configure a larger pool"
    )]
    PoolExhausted {
        network: String,
        pool: Subnet,
        size: u8,
    },
    #[error(
        "network {network} ({subnet}) has no free address: {in_use} of {usable} in use; \
         recreate it with a larger subnet, e.g. --subnet {suggestion}"
    )]
    SubnetExhausted {
        network: String,
        subnet: Subnet,
        in_use: usize,
        usable: usize,
        suggestion: Subnet,
    },
    #[error("address {address} is not a usable host address in network {network} ({subnet})")]
    NotInSubnet {
        network: String,
        subnet: Subnet,
        address: Ipv4Addr,
    },
    #[error("address {address} in network {network} is already in use")]
    AddressInUse { network: String, address: Ipv4Addr },
    #[error("published port {port}/{protocol} is already used by service {owner}")]
    PortInUse {
        port: u16,
        protocol: String,
        owner: String,
    },
    #[error(
        "no free port left in {PORT_AUTO_MIN}..={PORT_AUTO_MAX} for {protocol} (service {service}); publish an explicit port"
    )]
    PortsExhausted { protocol: String, service: String },
    #[error("VNI {0} is outside {VNI_MIN}..={VNI_MAX}")]
    VniOutOfRange(u32),
    #[error("VNI {0} is already in use")]
    VniInUse(u32),
    #[error("all VNIs in {VNI_MIN}..={VNI_MAX} are in use")]
    VniExhausted,
}

pub use model::{Subnet, SubnetError};

impl From<SubnetError> for AllocError {
    fn from(e: SubnetError) -> AllocError {
        AllocError::BadSubnet(e.0)
    }
}

/// Hands out per-network subnets from a pool (default 10.0.0.0/8 in /24s) and
/// accepts user-given ones, refusing overlaps.
#[derive(Debug, Clone)]
pub struct SubnetPool {
    pool: Subnet,
    size: u8,
    /// Allocated subnets (by network start) and the network that owns each.
    taken: BTreeMap<Subnet, String>,
}

impl Default for SubnetPool {
    fn default() -> Self {
        SubnetPool::new(
            Subnet::new(Ipv4Addr::new(10, 0, 0, 0), 8).expect("valid"),
            24,
        )
        .expect("valid")
    }
}

impl SubnetPool {
    /// A pool handing out /`size` subnets of `pool`.
    pub fn new(pool: Subnet, size: u8) -> Result<SubnetPool, AllocError> {
        if size < pool.prefix() || size > 30 {
            return Err(AllocError::BadSubnet(format!("{pool} split into /{size}")));
        }
        Ok(SubnetPool {
            pool,
            size,
            taken: BTreeMap::new(),
        })
    }

    /// The first free /size in the pool for `network`.
    pub fn allocate(&mut self, network: &str) -> Result<Subnet, AllocError> {
        self.allocate_avoiding(network, &[])
    }

    /// The first free /size in the pool for `network` that overlaps none
    /// of `avoid` (the nodes' underlay prefixes).
    pub fn allocate_avoiding(
        &mut self,
        network: &str,
        avoid: &[Subnet],
    ) -> Result<Subnet, AllocError> {
        let step = 1u64 << (32 - u32::from(self.size));
        let mut candidate = u64::from(self.pool.first());
        let end = u64::from(self.pool.first()) + self.pool.size();
        while candidate < end {
            // Aligned to the step, so its host bits are zero.
            let subnet = Subnet::containing(Ipv4Addr::from(candidate as u32), self.size);
            match self
                .taken
                .keys()
                .chain(avoid)
                .filter(|t| t.overlaps(&subnet))
                .max_by_key(|t| t.last())
            {
                // Jump past whatever is in the way.
                Some(t) => candidate = (u64::from(t.last()) + 1).div_ceil(step) * step,
                None => {
                    self.taken.insert(subnet, network.to_owned());
                    return Ok(subnet);
                }
            }
        }
        Err(AllocError::PoolExhausted {
            network: network.to_owned(),
            pool: self.pool,
            size: self.size,
        })
    }

    /// Takes a user-given subnet (which may lie outside the pool) for `network`.
    pub fn reserve(&mut self, network: &str, subnet: Subnet) -> Result<(), AllocError> {
        if let Some((existing, owner)) = self.taken.iter().find(|(t, _)| t.overlaps(&subnet)) {
            return Err(AllocError::Overlap {
                network: network.to_owned(),
                subnet,
                existing: *existing,
                owner: owner.clone(),
            });
        }
        self.taken.insert(subnet, network.to_owned());
        Ok(())
    }

    pub fn release(&mut self, subnet: &Subnet) {
        self.taken.remove(subnet);
    }
}

/// First port handed out when a service publishes without a number (Swarm's range).
pub const PORT_AUTO_MIN: u16 = 30000;
/// Last auto-assigned port.
pub const PORT_AUTO_MAX: u16 = 32767;

/// Published ports, cluster-wide: a port published in ingress mode answers on
/// every node, so it can belong to one service only (per protocol).
#[derive(Debug, Clone, Default)]
pub struct PortAllocator {
    /// (protocol, port) -> owning service name.
    used: BTreeMap<(String, u16), String>,
}

impl PortAllocator {
    /// Takes an explicit port for `service`.
    pub fn reserve(&mut self, protocol: &str, port: u16, service: &str) -> Result<(), AllocError> {
        let key = (protocol.to_owned(), port);
        match self.used.get(&key) {
            Some(owner) if owner != service => Err(AllocError::PortInUse {
                port,
                protocol: protocol.to_owned(),
                owner: owner.clone(),
            }),
            _ => {
                self.used.insert(key, service.to_owned());
                Ok(())
            }
        }
    }

    /// The lowest free port in the auto range for `service`.
    pub fn allocate(&mut self, protocol: &str, service: &str) -> Result<u16, AllocError> {
        let free = (PORT_AUTO_MIN..=PORT_AUTO_MAX)
            .find(|p| !self.used.contains_key(&(protocol.to_owned(), *p)));
        match free {
            Some(port) => {
                self.used
                    .insert((protocol.to_owned(), port), service.to_owned());
                Ok(port)
            }
            None => Err(AllocError::PortsExhausted {
                protocol: protocol.to_owned(),
                service: service.to_owned(),
            }),
        }
    }

    pub fn release(&mut self, protocol: &str, port: u16) {
        self.used.remove(&(protocol.to_owned(), port));
    }
}

/// Hands out VNIs in `VNI_MIN..=VNI_MAX`.
#[derive(Debug, Clone, Default)]
pub struct VniAllocator {
    used: BTreeSet<u32>,
}

impl VniAllocator {
    /// The lowest free VNI.
    pub fn allocate(&mut self) -> Result<u32, AllocError> {
        let mut candidate = VNI_MIN;
        for used in self.used.range(VNI_MIN..) {
            if *used != candidate {
                break;
            }
            candidate += 1;
        }
        if candidate > VNI_MAX {
            return Err(AllocError::VniExhausted);
        }
        self.used.insert(candidate);
        Ok(candidate)
    }

    /// Takes a specific VNI (a user-given one, or one recovered from state).
    pub fn reserve(&mut self, vni: u32) -> Result<(), AllocError> {
        if !(VNI_MIN..=VNI_MAX).contains(&vni) {
            return Err(AllocError::VniOutOfRange(vni));
        }
        if !self.used.insert(vni) {
            return Err(AllocError::VniInUse(vni));
        }
        Ok(())
    }

    pub fn release(&mut self, vni: u32) {
        self.used.remove(&vni);
    }
}

/// Task addresses within one network. The network address, the gateway and
/// the broadcast address are never handed out; released addresses are reused,
/// lowest first.
#[derive(Debug, Clone)]
pub struct AddressPool {
    network: String,
    subnet: Subnet,
    used: BTreeSet<u32>,
    /// Every usable address below `next` that is not used: allocation
    /// takes the lowest of these, else the first unused one from `next`,
    /// in O(log n) however full the subnet is.
    free: BTreeSet<u32>,
    next: u32,
}

impl AddressPool {
    pub fn new(network: &str, subnet: Subnet) -> AddressPool {
        let mut pool = AddressPool {
            network: network.to_owned(),
            subnet,
            used: BTreeSet::new(),
            free: BTreeSet::new(),
            next: 0,
        };
        pool.next = *pool.usable().start();
        pool
    }

    fn usable(&self) -> std::ops::RangeInclusive<u32> {
        // network, gateway (first host) and broadcast are reserved.
        (self.subnet.first() + 2)..=(self.subnet.last().saturating_sub(1))
    }

    pub fn allocate(&mut self) -> Result<Ipv4Addr, AllocError> {
        let free = self.free.pop_first().or_else(|| {
            let end = *self.usable().end();
            while self.next <= end && self.used.contains(&self.next) {
                self.next += 1;
            }
            (self.next <= end).then(|| {
                self.next += 1;
                self.next - 1
            })
        });
        match free {
            Some(a) => {
                self.used.insert(a);
                Ok(Ipv4Addr::from(a))
            }
            None => Err(AllocError::SubnetExhausted {
                network: self.network.clone(),
                subnet: self.subnet,
                in_use: self.used.len(),
                usable: self.usable().count(),
                suggestion: self.subnet.widened(2),
            }),
        }
    }

    /// Takes a specific address (static, or recovered from state).
    pub fn reserve(&mut self, address: Ipv4Addr) -> Result<(), AllocError> {
        if !self.usable().contains(&u32::from(address)) {
            return Err(AllocError::NotInSubnet {
                network: self.network.clone(),
                subnet: self.subnet,
                address,
            });
        }
        if !self.used.insert(u32::from(address)) {
            return Err(AllocError::AddressInUse {
                network: self.network.clone(),
                address,
            });
        }
        self.free.remove(&u32::from(address));
        Ok(())
    }

    pub fn release(&mut self, address: Ipv4Addr) {
        let a = u32::from(address);
        if self.used.remove(&a) && a < self.next {
            self.free.insert(a);
        }
    }

    pub fn gateway(&self) -> Ipv4Addr {
        self.subnet.gateway()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(text: &str) -> Subnet {
        text.parse().unwrap()
    }

    #[test]
    fn host_addresses_exclude_network_and_broadcast_and_subnets_are_json_strings() {
        let net = s("10.0.1.0/24");
        assert!(net.is_host("10.0.1.1".parse().unwrap()));
        assert!(net.is_host("10.0.1.254".parse().unwrap()));
        for not_host in ["10.0.1.0", "10.0.1.255", "10.0.2.1"] {
            assert!(!net.is_host(not_host.parse().unwrap()), "{not_host}");
        }
        let json = serde_json::to_string(&net).unwrap();
        assert_eq!(json, "\"10.0.1.0/24\"");
        assert_eq!(serde_json::from_str::<Subnet>(&json).unwrap(), net);
        let err = serde_json::from_str::<Subnet>("\"10.0.1.7/24\"").unwrap_err();
        assert!(err.to_string().contains("is not an IPv4 subnet"), "{err}");
    }

    #[test]
    fn subnets_parse_and_refuse_host_bits() {
        assert_eq!(s("10.0.1.0/24").to_string(), "10.0.1.0/24");
        for bad in [
            "10.0.1.5/24",
            "10.0.1.0",
            "10.0.1.0/33",
            "ten/8",
            "10.0.0.0/x",
        ] {
            assert!(bad.parse::<Subnet>().is_err(), "{bad} accepted");
        }
        assert!(s("10.0.0.0/16").overlaps(&s("10.0.3.0/24")));
        assert!(!s("10.0.0.0/24").overlaps(&s("10.0.1.0/24")));
    }

    #[test]
    fn the_default_pool_hands_out_consecutive_slash_24s_and_reuses_released_ones() {
        let mut pool = SubnetPool::default();
        assert_eq!(pool.allocate("a").unwrap(), s("10.0.0.0/24"));
        assert_eq!(pool.allocate("b").unwrap(), s("10.0.1.0/24"));
        pool.release(&s("10.0.0.0/24"));
        assert_eq!(pool.allocate("c").unwrap(), s("10.0.0.0/24"));
    }

    #[test]
    fn user_subnets_are_accepted_and_overlaps_refused_with_the_owner_named() {
        let mut pool = SubnetPool::default();
        pool.reserve("db", s("10.0.0.0/22")).unwrap();
        pool.reserve("outside", s("192.168.50.0/24")).unwrap();
        let err = pool.reserve("web", s("10.0.2.0/24")).unwrap_err();
        assert_eq!(
            err.to_string(),
            "subnet 10.0.2.0/24 for network web overlaps 10.0.0.0/22, used by network db"
        );
        // Allocation skips the user's /22.
        assert_eq!(pool.allocate("web").unwrap(), s("10.0.4.0/24"));
    }

    #[test]
    fn pool_and_size_are_configurable_and_exhaustion_says_so() {
        let mut pool = SubnetPool::new(s("172.30.0.0/23"), 24).unwrap();
        pool.allocate("a").unwrap();
        pool.allocate("b").unwrap();
        let err = pool.allocate("c").unwrap_err();
        assert!(matches!(err, AllocError::PoolExhausted { .. }));
        assert!(err.to_string().contains("network c"), "{err}");
        assert!(SubnetPool::new(s("10.0.0.0/16"), 8).is_err());
    }

    #[test]
    fn ports_are_explicit_or_auto_and_never_shared() {
        let mut ports = PortAllocator::default();
        ports.reserve("tcp", 8080, "web").unwrap();
        ports.reserve("tcp", 8080, "web").unwrap(); // the owner may re-reserve
        ports.reserve("udp", 8080, "dns").unwrap(); // other protocol, other port
        let err = ports.reserve("tcp", 8080, "api").unwrap_err();
        assert_eq!(
            err.to_string(),
            "published port 8080/tcp is already used by service web"
        );
        assert_eq!(ports.allocate("tcp", "api").unwrap(), PORT_AUTO_MIN);
        ports.reserve("tcp", PORT_AUTO_MIN + 1, "x").unwrap();
        assert_eq!(ports.allocate("tcp", "api").unwrap(), PORT_AUTO_MIN + 2);
        ports.release("tcp", PORT_AUTO_MIN);
        assert_eq!(ports.allocate("tcp", "b").unwrap(), PORT_AUTO_MIN);
        for p in PORT_AUTO_MIN..=PORT_AUTO_MAX {
            let _ = ports.reserve("sctp", p, "all");
        }
        let err = ports.allocate("sctp", "late").unwrap_err().to_string();
        assert!(err.contains("publish an explicit port"), "{err}");
    }

    #[test]
    fn vnis_start_at_4096_and_are_reused() {
        let mut vnis = VniAllocator::default();
        assert_eq!(vnis.allocate().unwrap(), 4096);
        assert_eq!(vnis.allocate().unwrap(), 4097);
        vnis.reserve(4098).unwrap();
        assert_eq!(vnis.allocate().unwrap(), 4099);
        vnis.release(4096);
        assert_eq!(vnis.allocate().unwrap(), 4096);
        assert_eq!(vnis.reserve(4097), Err(AllocError::VniInUse(4097)));
        assert_eq!(vnis.reserve(10), Err(AllocError::VniOutOfRange(10)));
        assert_eq!(
            vnis.reserve(1 << 24),
            Err(AllocError::VniOutOfRange(1 << 24))
        );
        vnis.reserve(VNI_MAX).unwrap();
    }

    #[test]
    fn addresses_skip_the_gateway_and_released_ones_come_back() {
        let mut pool = AddressPool::new("web", s("10.0.9.0/24"));
        assert_eq!(pool.gateway(), Ipv4Addr::new(10, 0, 9, 1));
        assert_eq!(pool.allocate().unwrap(), Ipv4Addr::new(10, 0, 9, 2));
        assert_eq!(pool.allocate().unwrap(), Ipv4Addr::new(10, 0, 9, 3));
        pool.release(Ipv4Addr::new(10, 0, 9, 2));
        assert_eq!(pool.allocate().unwrap(), Ipv4Addr::new(10, 0, 9, 2));
        assert!(matches!(
            pool.reserve(Ipv4Addr::new(10, 0, 9, 1)),
            Err(AllocError::NotInSubnet { .. })
        ));
        assert!(matches!(
            pool.reserve(Ipv4Addr::new(10, 0, 9, 255)),
            Err(AllocError::NotInSubnet { .. })
        ));
        assert!(matches!(
            pool.reserve(Ipv4Addr::new(10, 0, 9, 3)),
            Err(AllocError::AddressInUse { .. })
        ));
    }

    /// Allocation is O(log n) but hands out exactly what a scan would: the
    /// lowest usable address not in use, through any mix of reserve,
    /// release and allocate (a /26, so it fills up and drains often).
    #[test]
    fn addresses_are_always_the_lowest_free_one() {
        let subnet = s("10.0.9.0/26");
        let mut pool = AddressPool::new("web", subnet);
        let usable: Vec<u32> = (u32::from(Ipv4Addr::new(10, 0, 9, 2))
            ..=u32::from(Ipv4Addr::new(10, 0, 9, 62)))
            .collect();
        let mut model = BTreeSet::new();
        let mut x: u32 = 12345;
        for step in 0..5000 {
            x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
            let a = usable[(x >> 8) as usize % usable.len()];
            match (x >> 24) % 3 {
                0 => {
                    let want = usable.iter().find(|u| !model.contains(*u)).copied();
                    match pool.allocate() {
                        Ok(got) => {
                            assert_eq!(Some(u32::from(got)), want, "step {step}");
                            model.insert(u32::from(got));
                        }
                        Err(e) => assert!(want.is_none(), "step {step}: {e}"),
                    }
                }
                1 => {
                    let r = pool.reserve(Ipv4Addr::from(a));
                    assert_eq!(r.is_ok(), model.insert(a), "step {step}");
                }
                _ => {
                    pool.release(Ipv4Addr::from(a));
                    model.remove(&a);
                }
            }
        }
    }

    /// Swarm's moby #43052: a /24 ran out at ~100 services with an obscure
    /// error. Ours names the network and suggests a larger subnet.
    #[test]
    fn an_exhausted_subnet_names_the_network_and_suggests_a_larger_one() {
        let mut pool = AddressPool::new("web", s("10.0.9.0/24"));
        for _ in 0..253 {
            pool.allocate().unwrap();
        }
        let err = pool.allocate().unwrap_err();
        assert_eq!(
            err.to_string(),
            "network web (10.0.9.0/24) has no free address: 253 of 253 in use; \
             recreate it with a larger subnet, e.g. --subnet 10.0.8.0/22"
        );
    }
}
