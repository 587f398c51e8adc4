//! Addresses on links and IPv4 routes: listed, added and deleted.

use std::net::{IpAddr, Ipv4Addr};

use futures::TryStreamExt;
use netlink_packet_route::{
    AddressFamily,
    address::{AddressAttribute, AddressMessage},
};
use rtnetlink::RouteMessageBuilder;

use super::{
    handle::{Netlink, Result},
    link::Link,
};

/// A route to add or delete.
#[derive(Debug, Clone, Copy)]
pub struct Route {
    pub dst: Ipv4Addr,
    pub prefix: u8,
    pub oif: u32,
    pub gateway: Option<Ipv4Addr>,
}

impl Netlink {
    /// The addresses on link `index`, with their prefix lengths.
    pub async fn addresses(&self, index: u32) -> Result<Vec<(IpAddr, u8)>> {
        let msgs: Vec<AddressMessage> = self
            .handle
            .address()
            .get()
            .set_link_index_filter(index)
            .execute()
            .try_collect()
            .await
            .map_err(self.fail("list addresses of link", index))?;
        Ok(msgs
            .into_iter()
            .filter(|m| m.header.index == index)
            .filter_map(|m| {
                // IPv4 reports the interface's own address as IFA_LOCAL; IPv6
                // has only IFA_ADDRESS.
                let prefix = m.header.prefix_len;
                let local = m.attributes.iter().find_map(|a| match a {
                    AddressAttribute::Local(ip) => Some(*ip),
                    _ => None,
                });
                let address = m.attributes.iter().find_map(|a| match a {
                    AddressAttribute::Address(ip) => Some(*ip),
                    _ => None,
                });
                local.or(address).map(|ip| (ip, prefix))
            })
            .collect())
    }

    /// The link holding `ip`, if any.
    pub async fn link_with_address(&self, ip: IpAddr) -> Result<Option<u32>> {
        let msgs: Vec<AddressMessage> = self
            .handle
            .address()
            .get()
            .set_address_filter(ip)
            .execute()
            .try_collect()
            .await
            .map_err(self.fail("find address", ip))?;
        Ok(msgs.first().map(|m| m.header.index))
    }

    pub async fn add_address(&self, link: &Link, ip: IpAddr, prefix: u8) -> Result<()> {
        self.change(
            "add address",
            format!("{ip}/{prefix} on {}", link.name),
            self.handle.address().add(link.index, ip, prefix).execute(),
        )
        .await
    }

    pub async fn del_address(&self, link: &Link, ip: IpAddr, prefix: u8) -> Result<()> {
        let mut msg = AddressMessage::default();
        msg.header.family = match ip {
            IpAddr::V4(_) => AddressFamily::Inet,
            IpAddr::V6(_) => AddressFamily::Inet6,
        };
        msg.header.index = link.index;
        msg.header.prefix_len = prefix;
        msg.attributes.push(AddressAttribute::Local(ip));
        msg.attributes.push(AddressAttribute::Address(ip));
        self.change(
            "delete address",
            format!("{ip}/{prefix} on {}", link.name),
            self.handle.address().del(msg).execute(),
        )
        .await
    }

    fn route_message(route: &Route) -> netlink_packet_route::route::RouteMessage {
        let b = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(route.dst, route.prefix)
            .output_interface(route.oif);
        match route.gateway {
            Some(gw) => b.gateway(gw).build(),
            None => b.build(),
        }
    }

    fn route_name(route: &Route) -> String {
        match route.gateway {
            Some(gw) => format!(
                "{}/{} via {gw} (oif {})",
                route.dst, route.prefix, route.oif
            ),
            None => format!("{}/{} (oif {})", route.dst, route.prefix, route.oif),
        }
    }

    pub async fn add_route(&self, route: &Route) -> Result<()> {
        self.change(
            "add route",
            Self::route_name(route),
            self.handle
                .route()
                .add(Self::route_message(route))
                .replace()
                .execute(),
        )
        .await
    }

    pub async fn del_route(&self, route: &Route) -> Result<()> {
        self.change(
            "delete route",
            Self::route_name(route),
            self.handle
                .route()
                .del(Self::route_message(route))
                .execute(),
        )
        .await
    }
}
