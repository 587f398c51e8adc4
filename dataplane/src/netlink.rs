//! A typed layer over rtnetlink, in the style of netavark's wrapper: links
//! (bridge, vxlan, veth), addresses, routes, FDB and neighbour entries, each
//! call named by what it does, each error naming the operation and the object.
//!
//! A [`Netlink`] handle is bound to the network namespace its socket was opened
//! in and can be used from any thread or namespace afterwards; [`Netlink::enter`]
//! opens one inside another namespace (a task's), counting into the same
//! change counter, so a reconciler can report how many kernel changes a pass
//! made across every namespace it touched.

use std::{
    fmt,
    fs::File,
    io,
    net::{IpAddr, Ipv4Addr},
    os::fd::AsRawFd,
    path::Path,
    str::FromStr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
};

use futures::TryStreamExt;
use netlink_packet_route::{
    AddressFamily,
    address::{AddressAttribute, AddressMessage},
    link::{
        InfoData, InfoKind, InfoVeth, InfoVxlan, LinkAttribute, LinkFlags, LinkInfo, LinkMessage,
        VxlanDf,
    },
    neighbour::{
        NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState,
    },
    route::RouteType,
};
use rtnetlink::{
    Handle, LinkBridge, LinkMessageBuilder, LinkUnspec, LinkVeth, LinkVxlan, RouteMessageBuilder,
};
use serde::{Deserialize, Serialize};

/// The IANA VXLAN port.
pub const VXLAN_PORT: u16 = 4789;
/// Longest interface name the kernel accepts (IFNAMSIZ - 1).
pub const IFNAME_MAX: usize = 15;

/// A failed netlink operation: what was attempted, on what, in which namespace.
#[derive(Debug, thiserror::Error)]
#[error("{op} {object} (netns {ns}): {source}")]
pub struct NetlinkError {
    pub op: &'static str,
    pub object: String,
    pub ns: String,
    #[source]
    pub source: io::Error,
}

impl NetlinkError {
    /// The errno, when the kernel sent one.
    pub fn errno(&self) -> Option<i32> {
        self.source.raw_os_error()
    }

    /// The object does not exist (ENODEV, ENOENT, ESRCH).
    pub fn is_not_found(&self) -> bool {
        matches!(
            self.errno(),
            Some(libc::ENODEV | libc::ENOENT | libc::ESRCH)
        )
    }
}

pub type Result<T, E = NetlinkError> = std::result::Result<T, E>;

fn to_io(e: rtnetlink::Error) -> io::Error {
    match e {
        rtnetlink::Error::NetlinkError(m) => m.to_io(),
        other => io::Error::other(other.to_string()),
    }
}

/// An Ethernet address, written `02:42:0a:00:01:02`.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Mac(pub [u8; 6]);

impl Mac {
    /// Docker's derivation: `02:42` followed by the IPv4 address, locally
    /// administered and unicast, unique as long as the address is.
    pub fn from_ipv4(ip: Ipv4Addr) -> Mac {
        let [a, b, c, d] = ip.octets();
        Mac([0x02, 0x42, a, b, c, d])
    }

    /// A unicast address other than all zeros: the only kind an endpoint may have.
    pub fn is_unicast(&self) -> bool {
        self.0[0] & 1 == 0 && self.0 != [0; 6]
    }
}

impl fmt::Display for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

impl fmt::Debug for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl FromStr for Mac {
    type Err = String;

    fn from_str(s: &str) -> Result<Mac, String> {
        let bad = || format!("{s:?} is not a MAC address like 02:42:0a:00:01:02");
        let mut out = [0u8; 6];
        let mut parts = s.split(':');
        for byte in &mut out {
            let part = parts.next().ok_or_else(bad)?;
            if part.len() != 2 {
                return Err(bad());
            }
            *byte = u8::from_str_radix(part, 16).map_err(|_| bad())?;
        }
        if parts.next().is_some() {
            return Err(bad());
        }
        Ok(Mac(out))
    }
}

impl TryFrom<String> for Mac {
    type Error = String;

    fn try_from(s: String) -> Result<Mac, String> {
        s.parse()
    }
}

impl From<Mac> for String {
    fn from(mac: Mac) -> String {
        mac.to_string()
    }
}

impl TryFrom<&[u8]> for Mac {
    type Error = ();

    fn try_from(bytes: &[u8]) -> Result<Mac, ()> {
        <[u8; 6]>::try_from(bytes).map(Mac).map_err(|_| ())
    }
}

/// Checks a name against the kernel's rules for interface names.
pub fn check_ifname(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > IFNAME_MAX {
        return Err(format!(
            "interface name {name:?} must be 1 to {IFNAME_MAX} bytes"
        ));
    }
    if name == "."
        || name == ".."
        || name.contains(['/', ':'])
        || name.contains(char::is_whitespace)
    {
        return Err(format!(
            "interface name {name:?} may not contain '/', ':' or whitespace"
        ));
    }
    Ok(())
}

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

/// A route to add or delete.
#[derive(Debug, Clone, Copy)]
pub struct Route {
    pub dst: Ipv4Addr,
    pub prefix: u8,
    pub oif: u32,
    pub gateway: Option<Ipv4Addr>,
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

/// An rtnetlink handle bound to one network namespace, counting the changes
/// it makes.
#[derive(Clone)]
pub struct Netlink {
    handle: Handle,
    ns: Arc<str>,
    changes: Arc<AtomicU64>,
}

impl fmt::Debug for Netlink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Netlink").field("ns", &self.ns).finish()
    }
}

/// Runs `f` on a short-lived thread inside the network namespace at
/// `path` (setns() changes only the calling thread). Sockets `f` opens stay
/// in that namespace.
pub fn in_netns<T: Send>(path: &Path, f: impl FnOnce() -> io::Result<T> + Send) -> io::Result<T> {
    let context = |what: &str, e: io::Error| io::Error::new(e.kind(), format!("{what}: {e}"));
    let ns = File::open(path).map_err(|e| context("open namespace", e))?;
    std::thread::scope(|s| {
        s.spawn(|| {
            // SAFETY: an open namespace file; CLONE_NEWNET only affects this thread.
            if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(context("enter namespace", io::Error::last_os_error()));
            }
            f()
        })
        .join()
        .map_err(|_| io::Error::other("thread panicked"))?
    })
}

impl Netlink {
    /// A handle in the caller's namespace. Needs a tokio runtime, which drives
    /// the connection.
    pub fn current() -> Result<Netlink> {
        let (conn, handle, _) = rtnetlink::new_connection().map_err(|source| NetlinkError {
            op: "open netlink socket",
            object: String::new(),
            ns: "current".into(),
            source,
        })?;
        tokio::spawn(conn);
        Ok(Netlink {
            handle,
            ns: "current".into(),
            changes: Arc::default(),
        })
    }

    /// A handle whose socket is opened inside the namespace at `path`
    /// (`/run/netns/NAME`, `/proc/PID/ns/net`), usable from anywhere.
    pub fn open(path: &Path) -> Result<Netlink> {
        Self::open_in(path, Arc::default())
    }

    /// Like [`open`](Self::open), counting into this handle's change counter:
    /// for a reconciler that works in several namespaces.
    pub fn enter(&self, path: &Path) -> Result<Netlink> {
        Self::open_in(path, self.changes.clone())
    }

    fn open_in(path: &Path, changes: Arc<AtomicU64>) -> Result<Netlink> {
        let label: Arc<str> = path.display().to_string().into();
        let err = |op, source| NetlinkError {
            op,
            object: String::new(),
            ns: label.to_string(),
            source,
        };
        let rt = tokio::runtime::Handle::current();
        // The socket stays bound to the namespace it was opened in.
        let (conn, handle) = in_netns(path, || {
            let _rt = rt.enter();
            let (conn, handle, _) = rtnetlink::new_connection()?;
            Ok((conn, handle))
        })
        .map_err(|e| err("open netlink socket", e))?;
        rt.spawn(conn);
        Ok(Netlink {
            handle,
            ns: label,
            changes,
        })
    }

    /// The namespace this handle works in, for messages.
    pub fn namespace(&self) -> &str {
        &self.ns
    }

    /// How many changes (adds, sets, deletes) went through this handle and
    /// the ones [`enter`](Self::enter)ed from it.
    pub fn changes(&self) -> u64 {
        self.changes.load(Ordering::Relaxed)
    }

    fn fail(
        &self,
        op: &'static str,
        object: impl fmt::Display,
    ) -> impl FnOnce(rtnetlink::Error) -> NetlinkError {
        let ns = self.ns.to_string();
        let object = object.to_string();
        move |e| NetlinkError {
            op,
            object,
            ns,
            source: to_io(e),
        }
    }

    /// Runs one mutating request, counting it (and logging it at debug) if
    /// the kernel accepted it.
    async fn change(
        &self,
        op: &'static str,
        object: impl fmt::Display,
        request: impl Future<Output = Result<(), rtnetlink::Error>>,
    ) -> Result<()> {
        let object = object.to_string();
        match request.await {
            Ok(()) => {
                self.changes.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(ns = %self.ns, op, %object, "netlink change");
                Ok(())
            }
            Err(e) => Err(NetlinkError {
                op,
                object,
                ns: self.ns.to_string(),
                source: to_io(e),
            }),
        }
    }

    // ----- links -----

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

    // ----- addresses -----

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

    // ----- routes -----

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

    // ----- FDB (bridge family) -----

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

    // ----- neighbours (ARP/ND) -----

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs_parse_print_and_classify() {
        let m: Mac = "02:42:0a:00:01:02".parse().unwrap();
        assert_eq!(m, Mac::from_ipv4(Ipv4Addr::new(10, 0, 1, 2)));
        assert_eq!(m.to_string(), "02:42:0a:00:01:02");
        assert!(m.is_unicast());
        assert!(!"01:00:5e:00:00:01".parse::<Mac>().unwrap().is_unicast());
        assert!(!"00:00:00:00:00:00".parse::<Mac>().unwrap().is_unicast());
        for bad in [
            "02:42:0a:00:01",
            "02:42:0a:00:01:02:03",
            "2:42:0a:00:01:02",
            "zz:42:0a:00:01:02",
            "",
        ] {
            let err = bad.parse::<Mac>().unwrap_err();
            assert!(err.contains("is not a MAC address"), "{err}");
        }
        let json = serde_json::to_string(&m).unwrap();
        assert_eq!(json, "\"02:42:0a:00:01:02\"");
        assert_eq!(serde_json::from_str::<Mac>(&json).unwrap(), m);
    }

    #[test]
    fn interface_names_follow_the_kernel_rules() {
        assert!(check_ifname("eth0").is_ok());
        assert!(check_ifname("mve-0123456789").is_ok());
        for bad in ["", "a-very-long-name0", "a/b", "a:b", "a b", ".", ".."] {
            assert!(check_ifname(bad).is_err(), "{bad:?} accepted");
        }
    }
}
