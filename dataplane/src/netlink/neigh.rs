//! The neighbour table: FDB entries of VXLAN devices (bridge family) and
//! ARP/ND entries, listed, set and deleted.

use std::net::{IpAddr, Ipv4Addr};

use futures::TryStreamExt;
use netlink_packet_route::{
    AddressFamily,
    neighbour::{
        NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState,
    },
    route::RouteType,
};

use super::{
    handle::{Netlink, Result},
    link::Link,
    names::Mac,
};

/// A bridge-family FDB entry on a VXLAN device: frames for `mac` go to `dst`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FdbEntry {
    pub mac: Mac,
    pub dst: Option<IpAddr>,
    pub permanent: bool,
    /// Added on the device itself (`self`), not learned by a bridge (`master`).
    pub on_device: bool,
}

/// An IPv4/IPv6 neighbour (ARP/ND) entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Neighbour {
    pub ip: IpAddr,
    pub mac: Option<Mac>,
    pub permanent: bool,
}

/// NDA_DST and NDA_LLADDR of a neighbour or FDB message.
fn neighbour_addresses(m: &NeighbourMessage) -> (Option<IpAddr>, Option<Mac>) {
    let mut dst = None;
    let mut mac = None;
    for a in &m.attributes {
        match a {
            NeighbourAttribute::LinkLayerAddress(l) => mac = Mac::try_from(l.as_slice()).ok(),
            NeighbourAttribute::Destination(NeighbourAddress::Inet(ip)) => {
                dst = Some(IpAddr::V4(*ip))
            }
            NeighbourAttribute::Destination(NeighbourAddress::Inet6(ip)) => {
                dst = Some(IpAddr::V6(*ip))
            }
            // Bridge-family messages carry a VXLAN remote as raw bytes.
            NeighbourAttribute::Destination(NeighbourAddress::Other(raw)) => {
                dst = match raw.len() {
                    4 => <[u8; 4]>::try_from(raw.as_slice()).ok().map(IpAddr::from),
                    16 => <[u8; 16]>::try_from(raw.as_slice()).ok().map(IpAddr::from),
                    _ => None,
                }
            }
            _ => {}
        }
    }
    (dst, mac)
}

impl Netlink {
    /// The neighbour-table messages of one family on device `index`.
    async fn neighbour_dump(
        &self,
        family: AddressFamily,
        index: u32,
        op: &'static str,
    ) -> Result<Vec<NeighbourMessage>> {
        let msgs: Vec<NeighbourMessage> = self
            .handle
            .neighbours()
            .get()
            .set_address_family(family)
            .execute()
            .try_collect()
            .await
            .map_err(self.fail(op, index))?;
        Ok(msgs
            .into_iter()
            .filter(|m| m.header.ifindex == index)
            .collect())
    }

    /// The FDB entries of device `index` (a VXLAN device or bridge port).
    pub async fn fdb(&self, index: u32) -> Result<Vec<FdbEntry>> {
        let msgs = self
            .neighbour_dump(AddressFamily::Bridge, index, "list fdb of link")
            .await?;
        Ok(msgs
            .into_iter()
            .filter_map(|m| {
                let (dst, mac) = neighbour_addresses(&m);
                Some(FdbEntry {
                    mac: mac?,
                    dst,
                    permanent: m.header.state == NeighbourState::Permanent,
                    on_device: m.header.flags.contains(NeighbourFlags::Own),
                })
            })
            .collect())
    }

    /// Adds or replaces the static entry sending frames for `mac` to `dst`
    /// (`bridge fdb replace MAC dev DEV dst DST self permanent`).
    pub async fn set_fdb(&self, link: &Link, mac: Mac, dst: Ipv4Addr) -> Result<()> {
        self.change(
            "set fdb",
            format!("{mac} dst {dst} on {}", link.name),
            self.handle
                .neighbours()
                .add_bridge(link.index, &mac.0)
                .destination(IpAddr::V4(dst))
                .flags(NeighbourFlags::Own)
                .state(NeighbourState::Permanent)
                .replace()
                .execute(),
        )
        .await
    }

    pub async fn del_fdb(&self, link: &Link, mac: Mac) -> Result<()> {
        let mut msg = NeighbourMessage::default();
        msg.header.family = AddressFamily::Bridge;
        msg.header.ifindex = link.index;
        msg.header.flags = NeighbourFlags::Own;
        msg.header.state = NeighbourState::Permanent;
        msg.header.kind = RouteType::Unspec;
        msg.attributes
            .push(NeighbourAttribute::LinkLayerAddress(mac.0.to_vec()));
        self.change(
            "delete fdb",
            format!("{mac} on {}", link.name),
            self.handle.neighbours().del(msg).execute(),
        )
        .await
    }

    /// The IPv4 neighbour entries on device `index`.
    pub async fn neighbours(&self, index: u32) -> Result<Vec<Neighbour>> {
        let msgs = self
            .neighbour_dump(AddressFamily::Inet, index, "list neighbours of link")
            .await?;
        Ok(msgs
            .into_iter()
            .filter_map(|m| {
                let (ip, mac) = neighbour_addresses(&m);
                Some(Neighbour {
                    ip: ip?,
                    mac,
                    permanent: m.header.state == NeighbourState::Permanent,
                })
            })
            .collect())
    }

    /// Adds or replaces a permanent neighbour entry `ip` -> `mac`.
    pub async fn set_neighbour(&self, link: &Link, ip: IpAddr, mac: Mac) -> Result<()> {
        self.change(
            "set neighbour",
            format!("{ip} lladdr {mac} on {}", link.name),
            self.handle
                .neighbours()
                .add(link.index, ip)
                .link_layer_address(&mac.0)
                .state(NeighbourState::Permanent)
                .replace()
                .execute(),
        )
        .await
    }

    pub async fn del_neighbour(&self, link: &Link, ip: IpAddr) -> Result<()> {
        let mut msg = NeighbourMessage::default();
        msg.header.family = match ip {
            IpAddr::V4(_) => AddressFamily::Inet,
            IpAddr::V6(_) => AddressFamily::Inet6,
        };
        msg.header.ifindex = link.index;
        msg.header.kind = RouteType::Unspec;
        msg.attributes
            .push(NeighbourAttribute::Destination(match ip {
                IpAddr::V4(v4) => NeighbourAddress::Inet(v4),
                IpAddr::V6(v6) => NeighbourAddress::Inet6(v6),
            }));
        self.change(
            "delete neighbour",
            format!("{ip} on {}", link.name),
            self.handle.neighbours().del(msg).execute(),
        )
        .await
    }
}
