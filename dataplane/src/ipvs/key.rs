//! [`VsKey`]: what identifies one virtual service (a port on an address,
//! or a VIP's firewall mark), and the marks mesh sets for IPVS.

use std::{fmt, net::Ipv4Addr};

use serde::{Deserialize, Serialize};

use crate::lb::Protocol;

/// Marks flows to a published port, for the masquerade in postrouting.
pub const MASQ_MARK: u32 = 0x0020_0000;

/// One IPVS virtual service: what a published port is on one address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct VsKey {
    pub protocol: Protocol,
    pub address: Ipv4Addr,
    pub port: u16,
    /// Non-zero: a VIP's any-port service, selected by this firewall mark
    /// (set on packets to `address`); protocol and port do not apply.
    #[serde(default)]
    pub fwmark: u32,
}

impl VsKey {
    /// A published port (or any frontend with a port).
    pub fn port(protocol: Protocol, address: Ipv4Addr, port: u16) -> VsKey {
        VsKey {
            protocol,
            address,
            port,
            fwmark: 0,
        }
    }

    /// A VIP: every port, TCP and UDP, through its firewall mark
    /// ([`VIP_MARK`] and a slot that [`IpvsSync`](super::IpvsSync) gives
    /// each VIP address; slot 0 means "not given yet").
    pub fn vip(address: Ipv4Addr, slot: u32) -> VsKey {
        VsKey {
            protocol: Protocol::Tcp,
            address,
            port: 0,
            fwmark: VIP_MARK | (slot & VIP_SLOT_MASK),
        }
    }

    /// What identifies it to the kernel (a fwmark service has no address).
    pub(super) fn kernel_id(&self) -> (u32, u8, Ipv4Addr, u16) {
        if self.fwmark != 0 {
            (self.fwmark, 0, Ipv4Addr::UNSPECIFIED, 0)
        } else {
            (0, self.protocol.number(), self.address, self.port)
        }
    }
}

/// Marks a VIP's packets for its fwmark service: this bit and the VIP's
/// slot in [`VIP_SLOT_MASK`] (given per address by
/// [`IpvsSync`](super::IpvsSync), kept in its state file). The other bits
/// stay free for [`MASQ_MARK`] and the IPsec mark.
pub const VIP_MARK: u32 = 0x8000_0000;
pub const VIP_SLOT_MASK: u32 = 0xffff;

impl fmt::Display for VsKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let p = match self.protocol {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
        };
        if self.fwmark != 0 {
            return write!(f, "FWM {:#x} (VIP {})", self.fwmark, self.address);
        }
        write!(f, "{p} {}:{}", self.address, self.port)
    }
}
