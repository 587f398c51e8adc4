//! Links: bridges, VXLAN devices and veth pairs as mesh creates them, links
//! as read back from the kernel, and the calls that list, add, set and
//! delete them.

use std::{fmt, fs::File, net::Ipv4Addr, os::fd::AsRawFd};

use futures::TryStreamExt;
use netlink_packet_route::link::{
    InfoData, InfoKind, InfoVeth, InfoVxlan, LinkAttribute, LinkFlags, LinkInfo, LinkMessage,
    VxlanDf,
};
use rtnetlink::{LinkBridge, LinkMessageBuilder, LinkUnspec, LinkVeth, LinkVxlan};

use super::{
    handle::{Netlink, Result},
    names::Mac,
};

/// The IANA VXLAN port.
pub const VXLAN_PORT: u16 = 4789;

/// The kinds of link mesh creates; anything else is `Other`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkKind {
    Bridge,
    Vxlan,
    Veth,
    Other(String),
    /// No IFLA_INFO_KIND: a physical device or loopback.
    None,
}

/// The VXLAN attributes mesh sets and checks.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct VxlanInfo {
    pub vni: u32,
    pub local: Option<Ipv4Addr>,
    pub port: u16,
    pub dev: Option<u32>,
    pub learning: bool,
    pub proxy: bool,
    pub df_set: bool,
}

/// A link as read back from the kernel.
#[derive(Debug, Clone)]
pub struct Link {
    pub index: u32,
    pub name: String,
    pub kind: LinkKind,
    pub mac: Option<Mac>,
    pub mtu: u32,
    pub up: bool,
    /// The bridge it is a port of (IFLA_MASTER).
    pub controller: Option<u32>,
    /// IFLA_LINK: for a veth, its peer's index (in the peer's namespace).
    pub link: Option<u32>,
    pub vxlan: Option<VxlanInfo>,
}

impl Link {
    fn from_message(msg: LinkMessage) -> Link {
        let mut link = Link {
            index: msg.header.index,
            name: String::new(),
            kind: LinkKind::None,
            mac: None,
            mtu: 0,
            up: msg.header.flags.contains(LinkFlags::Up),
            controller: None,
            link: None,
            vxlan: None,
        };
        for attr in msg.attributes {
            match attr {
                LinkAttribute::IfName(n) => link.name = n,
                LinkAttribute::Mtu(m) => link.mtu = m,
                LinkAttribute::Address(a) => link.mac = Mac::try_from(a.as_slice()).ok(),
                LinkAttribute::Controller(c) if c != 0 => link.controller = Some(c),
                LinkAttribute::Link(l) if l != 0 => link.link = Some(l),
                LinkAttribute::LinkInfo(infos) => {
                    for info in infos {
                        match info {
                            LinkInfo::Kind(k) => {
                                link.kind = match k {
                                    InfoKind::Bridge => LinkKind::Bridge,
                                    InfoKind::Vxlan => LinkKind::Vxlan,
                                    InfoKind::Veth => LinkKind::Veth,
                                    other => LinkKind::Other(other.to_string()),
                                }
                            }
                            LinkInfo::Data(InfoData::Vxlan(attrs)) => {
                                link.vxlan = Some(vxlan_info(attrs))
                            }
                            _ => {}
                        }
                    }
                }
                _ => {}
            }
        }
        link
    }
}

fn vxlan_info(attrs: Vec<InfoVxlan>) -> VxlanInfo {
    let mut v = VxlanInfo::default();
    for a in attrs {
        match a {
            InfoVxlan::Id(id) => v.vni = id,
            InfoVxlan::Local(l) => v.local = Some(l),
            InfoVxlan::Port(p) => v.port = p,
            InfoVxlan::Link(d) if d != 0 => v.dev = Some(d),
            InfoVxlan::Learning(l) => v.learning = l,
            InfoVxlan::Proxy(p) => v.proxy = p,
            InfoVxlan::Df(df) => v.df_set = df == VxlanDf::Set,
            _ => {}
        }
    }
    v
}

/// What to create for a VXLAN device.
#[derive(Debug, Clone)]
pub struct VxlanSpec<'a> {
    pub name: &'a str,
    pub vni: u32,
    /// Source address of the encapsulated packets (this node's underlay address).
    pub local: Ipv4Addr,
    /// The underlay interface.
    pub dev: u32,
    pub mtu: u32,
    /// Bridge to enslave it to.
    pub controller: u32,
}

impl VxlanSpec<'_> {
    /// The attributes the device must have to match this spec.
    pub fn info(&self) -> VxlanInfo {
        VxlanInfo {
            vni: self.vni,
            local: Some(self.local),
            port: VXLAN_PORT,
            dev: Some(self.dev),
            learning: false,
            proxy: true,
            df_set: true,
        }
    }
}

/// The task side of a veth pair created straight into another namespace.
#[derive(Debug)]
pub struct VethPeer<'a> {
    pub name: &'a str,
    pub netns: &'a File,
    pub mac: Mac,
    pub mtu: u32,
}

impl Netlink {
    /// Every link in the namespace.
    pub async fn links(&self) -> Result<Vec<Link>> {
        self.handle
            .link()
            .get()
            .execute()
            .map_ok(Link::from_message)
            .try_collect()
            .await
            .map_err(self.fail("list", "links"))
    }

    /// The link called `name`, if there is one.
    pub async fn link(&self, name: &str) -> Result<Option<Link>> {
        let req = self.handle.link().get().match_name(name.to_owned());
        self.one_link(req, name).await
    }

    /// The link with this index, if there is one.
    pub async fn link_by_index(&self, index: u32) -> Result<Option<Link>> {
        let req = self.handle.link().get().match_index(index);
        self.one_link(req, index).await
    }

    async fn one_link(
        &self,
        req: rtnetlink::LinkGetRequest,
        object: impl fmt::Display,
    ) -> Result<Option<Link>> {
        let r: Result<Vec<Link>> = req
            .execute()
            .map_ok(Link::from_message)
            .try_collect()
            .await
            .map_err(self.fail("get link", object));
        match r {
            Ok(mut v) => Ok(v.pop()),
            Err(e) if e.is_not_found() => Ok(None),
            Err(e) => Err(e),
        }
    }

    async fn add_link(&self, msg: LinkMessage, what: String) -> Result<()> {
        self.change("add", what, self.handle.link().add(msg).execute())
            .await
    }

    /// A bridge, up. It gets no address: the host has no L3 presence on an
    /// overlay, so it can never route between two of them.
    pub async fn add_bridge(&self, name: &str, mtu: u32) -> Result<()> {
        let msg = LinkBridge::new(name).mtu(mtu).up().build();
        self.add_link(msg, format!("bridge {name}")).await
    }

    /// A VXLAN device, up, enslaved to its bridge: no learning, ARP answered
    /// locally from the neighbour table (`proxy`), no L2/L3 miss upcalls, DF set
    /// on the outer header so an MTU mistake is an error, not fragmentation.
    pub async fn add_vxlan(&self, spec: &VxlanSpec<'_>) -> Result<()> {
        let msg = LinkVxlan::new(spec.name, spec.vni)
            .dev(spec.dev)
            .local(spec.local)
            .port(VXLAN_PORT)
            .learning(false)
            .proxy(true)
            .l2miss(false)
            .l3miss(false)
            .df(VxlanDf::Set)
            .mtu(spec.mtu)
            .controller(spec.controller)
            .up()
            .build();
        self.add_link(msg, format!("vxlan {} (vni {})", spec.name, spec.vni))
            .await
    }

    /// A veth pair whose host side `name` is up on bridge `controller`, and
    /// whose peer is created directly in `peer.netns` (down; the caller
    /// configures it there).
    pub async fn add_veth(
        &self,
        name: &str,
        mtu: u32,
        controller: u32,
        peer: &VethPeer<'_>,
    ) -> Result<()> {
        let peer_msg = LinkMessageBuilder::<LinkUnspec>::new()
            .name(peer.name.to_owned())
            .address(peer.mac.0.to_vec())
            .mtu(peer.mtu)
            .setns_by_fd(peer.netns.as_raw_fd())
            .build();
        let msg = LinkVeth::new(name, peer.name)
            .set_info_data(InfoData::Veth(InfoVeth::Peer(peer_msg)))
            .mtu(mtu)
            .controller(controller)
            .up()
            .build();
        self.add_link(msg, format!("veth {name} (peer {})", peer.name))
            .await
    }

    async fn set_link(&self, msg: LinkMessage, op: &'static str, what: &str) -> Result<()> {
        self.change(op, what, self.handle.link().set(msg).execute())
            .await
    }

    pub async fn set_up(&self, link: &Link) -> Result<()> {
        let msg = LinkUnspec::new_with_index(link.index).up().build();
        self.set_link(msg, "set up", &link.name).await
    }

    pub async fn set_mtu(&self, link: &Link, mtu: u32) -> Result<()> {
        let msg = LinkUnspec::new_with_index(link.index).mtu(mtu).build();
        self.set_link(msg, "set mtu", &link.name).await
    }

    pub async fn set_mac(&self, link: &Link, mac: Mac) -> Result<()> {
        let msg = LinkUnspec::new_with_index(link.index)
            .address(mac.0.to_vec())
            .build();
        self.set_link(msg, "set address", &link.name).await
    }

    /// Makes the link a port of bridge `controller`.
    pub async fn set_controller(&self, link: &Link, controller: u32) -> Result<()> {
        let msg = LinkUnspec::new_with_index(link.index)
            .controller(controller)
            .build();
        self.set_link(msg, "set master", &link.name).await
    }

    /// Moves the link into the namespace open as `netns`.
    pub async fn move_to_namespace(&self, link: &Link, netns: &File) -> Result<()> {
        let msg = LinkUnspec::new_with_index(link.index)
            .setns_by_fd(netns.as_raw_fd())
            .build();
        self.set_link(msg, "move to namespace", &link.name).await
    }

    pub async fn del_link(&self, link: &Link) -> Result<()> {
        self.change(
            "delete link",
            &link.name,
            self.handle.link().del(link.index).execute(),
        )
        .await
    }
}
