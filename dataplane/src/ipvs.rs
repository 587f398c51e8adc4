//! The IPVS load-balancer backend (`meshd --lb-backend ipvs`): every
//! frontend as an IPVS virtual service with NAT ("masq") forwarding to the
//! tasks, through our own small generic-netlink module (no maintained crate
//! speaks IPVS's netlink family).
//!
//! It keeps the eBPF path's contract: [`IpvsSync`] is handed the same
//! [`LbSpec`] (or [`LbChanges`]) and writes only the difference to the
//! kernel.
//! - A published port is a TCP or UDP service on each node address.
//! - A VIP (any port, TCP and UDP) is a fwmark service, as Swarm's own
//!   IPVS VIPs are: nftables marks packets to the VIP, and a local route
//!   delivers them where IPVS looks. Real servers at port 0 get the port
//!   the client asked for.
//! - Replies must come back through the node that balanced the flow, so
//!   both kinds are masqueraded in postrouting (nftables table
//!   `ip mesh_ipvs`, as Swarm's ingress sandbox SNATs with iptables);
//!   `net.ipv4.vs.conntrack=1` lets netfilter NAT see IPVS's flows.
//!
//! The eBPF program stays attached with no frontend, passing everything.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

use crate::{
    lb::{
        ApplyReport, Ebpf, FrontendSpec, LbChanges, LbMaps, LbSpec, LbTarget, Protocol,
        ServiceSpec, SyncError,
    },
    nlsock::{self, Attrs, NLM_F_DUMP, NlError, NlSocket},
};

const GENL_ID_CTRL: u16 = 0x10;
const CTRL_CMD_GETFAMILY: u8 = 3;
const CTRL_ATTR_FAMILY_ID: u16 = 1;
const CTRL_ATTR_FAMILY_NAME: u16 = 2;

const IPVS_GENL_NAME: &str = "IPVS";
const IPVS_GENL_VERSION: u8 = 1;
const CMD_NEW_SERVICE: u8 = 1;
const CMD_DEL_SERVICE: u8 = 3;
const CMD_GET_SERVICE: u8 = 4;
const CMD_NEW_DEST: u8 = 5;
const CMD_SET_DEST: u8 = 6;
const CMD_DEL_DEST: u8 = 7;
const CMD_GET_DEST: u8 = 8;
const CMD_ATTR_SERVICE: u16 = 1;
const CMD_ATTR_DEST: u16 = 2;
const SVC_ATTR_AF: u16 = 1;
const SVC_ATTR_PROTOCOL: u16 = 2;
const SVC_ATTR_ADDR: u16 = 3;
const SVC_ATTR_PORT: u16 = 4;
const SVC_ATTR_FWMARK: u16 = 5;
const SVC_ATTR_SCHED_NAME: u16 = 6;
const SVC_ATTR_FLAGS: u16 = 7;
const SVC_ATTR_TIMEOUT: u16 = 8;
const SVC_ATTR_NETMASK: u16 = 9;
const DEST_ATTR_ADDR: u16 = 1;
const DEST_ATTR_PORT: u16 = 2;
const DEST_ATTR_FWD_METHOD: u16 = 3;
const DEST_ATTR_WEIGHT: u16 = 4;
const DEST_ATTR_U_THRESH: u16 = 5;
const DEST_ATTR_L_THRESH: u16 = 6;
const DEST_ATTR_ACTIVE_CONNS: u16 = 7;
const DEST_ATTR_INACT_CONNS: u16 = 8;
const DEST_ATTR_ADDR_FAMILY: u16 = 11;
/// IP_VS_CONN_F_MASQ: NAT forwarding.
const FWD_MASQ: u32 = 0;
/// IP_VS_SVC_F_SCHED1 / SCHED2: for `mh`, fall back past weight-0 (draining)
/// servers, and hash the source port too (else one client sticks to one task).
const SVC_F_SCHED_MH_FALLBACK: u32 = 0x8;
const SVC_F_SCHED_MH_PORT: u32 = 0x10;

/// Marks flows to a published port, for the masquerade in postrouting.
pub const MASQ_MARK: u32 = 0x0020_0000;
const NFT_TABLE: &str = "mesh_ipvs";

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
    /// ([`VIP_MARK`] and a slot that [`IpvsSync`] gives each VIP address;
    /// slot 0 means "not given yet").
    pub fn vip(address: Ipv4Addr, slot: u32) -> VsKey {
        VsKey {
            protocol: Protocol::Tcp,
            address,
            port: 0,
            fwmark: VIP_MARK | (slot & VIP_SLOT_MASK),
        }
    }

    /// What identifies it to the kernel (a fwmark service has no address).
    fn kernel_id(&self) -> (u32, u8, Ipv4Addr, u16) {
        if self.fwmark != 0 {
            (self.fwmark, 0, Ipv4Addr::UNSPECIFIED, 0)
        } else {
            (0, self.protocol.number(), self.address, self.port)
        }
    }
}

/// Marks a VIP's packets for its fwmark service: this bit and the VIP's
/// slot in [`VIP_SLOT_MASK`] (given per address by [`IpvsSync`], kept in its
/// state file). The other bits stay free for [`MASQ_MARK`] and the IPsec
/// mark.
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

/// A real server of one virtual service, as the kernel reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RealServer {
    pub address: Ipv4Addr,
    pub port: u16,
    pub weight: u32,
    pub active: u32,
    pub inactive: u32,
}

/// A virtual service as the kernel reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VirtualService {
    pub key: VsKey,
    pub scheduler: String,
}

/// Errors of the IPVS backend, each naming what it tried.
#[derive(Debug, thiserror::Error)]
pub enum IpvsError {
    #[error(
        "IPVS is not available in this kernel: the generic-netlink family \"IPVS\" does not exist \
         (the kernel lacks CONFIG_IP_VS or the ip_vs module cannot load). \
         Use --lb-backend ebpf, the default"
    )]
    Unavailable,
    #[error(transparent)]
    Netlink(#[from] NlError),
    #[error("{0}")]
    Io(String),
}

impl From<IpvsError> for SyncError {
    fn from(e: IpvsError) -> SyncError {
        SyncError::Ipvs(format!("ipvs: {e}"))
    }
}

/// A generic-netlink socket bound to IPVS in the caller's namespace.
pub struct Ipvs {
    sock: NlSocket,
    family: u16,
}

fn genl(cmd: u8, version: u8, attrs: &Attrs) -> Vec<u8> {
    let mut p = vec![cmd, version, 0, 0];
    p.extend_from_slice(&attrs.0);
    p
}

fn addr16(a: Ipv4Addr) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[..4].copy_from_slice(&a.octets());
    b
}

fn service_id(key: &VsKey) -> Attrs {
    let mut a = Attrs::new();
    if key.fwmark != 0 {
        a.u16(SVC_ATTR_AF, libc::AF_INET as u16)
            .u32(SVC_ATTR_FWMARK, key.fwmark);
        return a;
    }
    a.u16(SVC_ATTR_AF, libc::AF_INET as u16)
        .u16(SVC_ATTR_PROTOCOL, u16::from(key.protocol.number()))
        .put(SVC_ATTR_ADDR, &addr16(key.address))
        .put(SVC_ATTR_PORT, &key.port.to_be_bytes());
    a
}

impl Ipvs {
    /// Opens IPVS in the current namespace, or [`IpvsError::Unavailable`].
    pub fn open() -> Result<Ipvs, IpvsError> {
        let mut sock = NlSocket::open(libc::NETLINK_GENERIC)
            .map_err(|e| IpvsError::Io(format!("open a generic-netlink socket: {e}")))?;
        let mut attrs = Attrs::new();
        attrs.str(CTRL_ATTR_FAMILY_NAME, IPVS_GENL_NAME);
        let replies = match sock.request(
            GENL_ID_CTRL,
            0,
            &genl(CTRL_CMD_GETFAMILY, 1, &attrs),
            || "resolve the generic-netlink family IPVS".to_owned(),
        ) {
            Ok(r) => r,
            Err(e) if e.errno() == Some(libc::ENOENT) => return Err(IpvsError::Unavailable),
            Err(e) => return Err(e.into()),
        };
        let family = replies
            .iter()
            .flat_map(|r| nlsock::parse_attrs(r.get(4..).unwrap_or_default()))
            .find(|(k, _)| *k == CTRL_ATTR_FAMILY_ID)
            .and_then(|(_, v)| nlsock::get_u16(v))
            .ok_or(IpvsError::Unavailable)?;
        Ok(Ipvs { sock, family })
    }

    fn call(
        &mut self,
        cmd: u8,
        flags: u16,
        attrs: &Attrs,
        op: impl FnOnce() -> String,
    ) -> Result<Vec<Vec<u8>>, IpvsError> {
        Ok(self
            .sock
            .request(self.family, flags, &genl(cmd, IPVS_GENL_VERSION, attrs), op)?)
    }

    /// Every IPv4 virtual service: TCP/UDP ones by address and port,
    /// fwmark ones by mark (their address reads 0.0.0.0).
    pub fn services(&mut self) -> Result<Vec<VirtualService>, IpvsError> {
        let replies = self.call(CMD_GET_SERVICE, NLM_F_DUMP, &Attrs::new(), || {
            "list IPVS services".to_owned()
        })?;
        let mut out = Vec::new();
        for r in &replies {
            for (k, v) in nlsock::parse_attrs(r.get(4..).unwrap_or_default()) {
                if k != CMD_ATTR_SERVICE {
                    continue;
                }
                let (mut af, mut proto, mut addr, mut port, mut sched, mut fwmark) =
                    (0, 0, None, 0, String::new(), 0);
                for (k, v) in nlsock::parse_attrs(v) {
                    match k {
                        SVC_ATTR_AF => af = nlsock::get_u16(v).unwrap_or(0),
                        SVC_ATTR_PROTOCOL => proto = nlsock::get_u16(v).unwrap_or(0),
                        SVC_ATTR_ADDR if v.len() >= 4 => {
                            addr = Some(Ipv4Addr::new(v[0], v[1], v[2], v[3]));
                        }
                        SVC_ATTR_PORT if v.len() >= 2 => port = u16::from_be_bytes([v[0], v[1]]),
                        SVC_ATTR_FWMARK => fwmark = nlsock::get_u32(v).unwrap_or(0),
                        SVC_ATTR_SCHED_NAME => {
                            sched = String::from_utf8_lossy(v).trim_end_matches('\0').to_owned();
                        }
                        _ => {}
                    }
                }
                if af != libc::AF_INET as u16 {
                    continue;
                }
                let key = if fwmark != 0 {
                    VsKey {
                        protocol: Protocol::Tcp,
                        address: Ipv4Addr::UNSPECIFIED,
                        port: 0,
                        fwmark,
                    }
                } else {
                    let protocol = u8::try_from(proto).ok().and_then(Protocol::from_number);
                    let (Some(protocol), Some(address)) = (protocol, addr) else {
                        continue;
                    };
                    VsKey::port(protocol, address, port)
                };
                out.push(VirtualService {
                    key,
                    scheduler: sched,
                });
            }
        }
        Ok(out)
    }

    /// The real servers of `key`.
    pub fn dests(&mut self, key: &VsKey) -> Result<Vec<RealServer>, IpvsError> {
        let mut attrs = Attrs::new();
        attrs.nested(CMD_ATTR_SERVICE, &service_id(key));
        let replies = self.call(CMD_GET_DEST, NLM_F_DUMP, &attrs, || {
            format!("list the real servers of IPVS service {key}")
        })?;
        let mut out = Vec::new();
        for r in &replies {
            for (k, v) in nlsock::parse_attrs(r.get(4..).unwrap_or_default()) {
                if k != CMD_ATTR_DEST {
                    continue;
                }
                let mut rs = RealServer {
                    address: Ipv4Addr::UNSPECIFIED,
                    port: 0,
                    weight: 0,
                    active: 0,
                    inactive: 0,
                };
                for (k, v) in nlsock::parse_attrs(v) {
                    match k {
                        DEST_ATTR_ADDR if v.len() >= 4 => {
                            rs.address = Ipv4Addr::new(v[0], v[1], v[2], v[3]);
                        }
                        DEST_ATTR_PORT if v.len() >= 2 => {
                            rs.port = u16::from_be_bytes([v[0], v[1]])
                        }
                        DEST_ATTR_WEIGHT => rs.weight = nlsock::get_u32(v).unwrap_or(0),
                        DEST_ATTR_ACTIVE_CONNS => rs.active = nlsock::get_u32(v).unwrap_or(0),
                        DEST_ATTR_INACT_CONNS => rs.inactive = nlsock::get_u32(v).unwrap_or(0),
                        _ => {}
                    }
                }
                out.push(rs);
            }
        }
        out.sort_by_key(|d| (d.address, d.port));
        Ok(out)
    }

    /// Adds virtual service `key` with `scheduler`.
    pub fn add_service(&mut self, key: &VsKey, scheduler: &str) -> Result<(), IpvsError> {
        let mut svc = service_id(key);
        let flags = if scheduler == "mh" {
            SVC_F_SCHED_MH_FALLBACK | SVC_F_SCHED_MH_PORT
        } else {
            0
        };
        let mut f = flags.to_ne_bytes().to_vec();
        f.extend_from_slice(&u32::MAX.to_ne_bytes());
        svc.str(SVC_ATTR_SCHED_NAME, scheduler)
            .put(SVC_ATTR_FLAGS, &f)
            .u32(SVC_ATTR_TIMEOUT, 0)
            .u32(SVC_ATTR_NETMASK, u32::MAX);
        let mut attrs = Attrs::new();
        attrs.nested(CMD_ATTR_SERVICE, &svc);
        self.call(CMD_NEW_SERVICE, 0, &attrs, || {
            format!("add IPVS service {key} (scheduler {scheduler})")
        })?;
        Ok(())
    }

    pub fn del_service(&mut self, key: &VsKey) -> Result<(), IpvsError> {
        let mut attrs = Attrs::new();
        attrs.nested(CMD_ATTR_SERVICE, &service_id(key));
        self.call(CMD_DEL_SERVICE, 0, &attrs, || {
            format!("delete IPVS service {key}")
        })?;
        Ok(())
    }

    fn dest_cmd(
        &mut self,
        cmd: u8,
        key: &VsKey,
        addr: Ipv4Addr,
        port: u16,
        weight: u32,
    ) -> Result<(), IpvsError> {
        let mut dest = Attrs::new();
        dest.put(DEST_ATTR_ADDR, &addr16(addr))
            .put(DEST_ATTR_PORT, &port.to_be_bytes())
            .u16(DEST_ATTR_ADDR_FAMILY, libc::AF_INET as u16);
        if cmd != CMD_DEL_DEST {
            dest.u32(DEST_ATTR_FWD_METHOD, FWD_MASQ)
                .u32(DEST_ATTR_WEIGHT, weight)
                .u32(DEST_ATTR_U_THRESH, 0)
                .u32(DEST_ATTR_L_THRESH, 0);
        }
        let mut attrs = Attrs::new();
        attrs
            .nested(CMD_ATTR_SERVICE, &service_id(key))
            .nested(CMD_ATTR_DEST, &dest);
        let verb = match cmd {
            CMD_NEW_DEST => "add",
            CMD_SET_DEST => "set the weight of",
            _ => "delete",
        };
        self.call(cmd, 0, &attrs, || {
            format!("{verb} real server {addr}:{port} of IPVS service {key}")
        })?;
        Ok(())
    }

    pub fn add_dest(
        &mut self,
        key: &VsKey,
        addr: Ipv4Addr,
        port: u16,
        weight: u32,
    ) -> Result<(), IpvsError> {
        self.dest_cmd(CMD_NEW_DEST, key, addr, port, weight)
    }

    pub fn set_dest(
        &mut self,
        key: &VsKey,
        addr: Ipv4Addr,
        port: u16,
        weight: u32,
    ) -> Result<(), IpvsError> {
        self.dest_cmd(CMD_SET_DEST, key, addr, port, weight)
    }

    pub fn del_dest(&mut self, key: &VsKey, addr: Ipv4Addr, port: u16) -> Result<(), IpvsError> {
        self.dest_cmd(CMD_DEL_DEST, key, addr, port, 0)
    }
}

/// Real servers of one virtual service: (address, port) -> weight.
type Dests = BTreeMap<(Ipv4Addr, u16), u32>;

/// The IPVS share of `services`: every frontend with a port, on its own
/// address or on each of `node_addresses`.
fn desired_of<'a>(
    services: impl IntoIterator<Item = &'a ServiceSpec>,
    node_addresses: &[Ipv4Addr],
) -> BTreeMap<VsKey, Dests> {
    let mut want = BTreeMap::new();
    for s in services {
        let dests: Dests = s
            .backends
            .iter()
            .map(|b| ((b.address, b.port), b.weight))
            .collect();
        for f in &s.frontends {
            for key in frontend_keys(f, node_addresses) {
                want.insert(key, dests.clone());
            }
        }
    }
    want
}

/// The IPVS services a frontend is: one per node address for a published
/// port, one on its own address otherwise, and a fwmark service for a VIP
/// (port 0: every port, TCP and UDP; real servers at port 0 get the port
/// the client asked for).
fn frontend_keys(f: &FrontendSpec, node_addresses: &[Ipv4Addr]) -> Vec<VsKey> {
    match (f.address, f.port) {
        (Some(vip), 0) => vec![VsKey::vip(vip, 0)],
        (None, 0) => Vec::new(),
        (Some(a), port) => vec![VsKey::port(f.protocol, a, port)],
        (None, port) => node_addresses
            .iter()
            .map(|a| VsKey::port(f.protocol, *a, port))
            .collect(),
    }
}

/// IPVS for every frontend. The eBPF maps get neither frontends nor the
/// bridges' NAT addresses, so the TC program passes everything to the
/// stack (on a bridge it would drop what is not for the node's own
/// address, VIPs included). The nftables table keeps that isolation
/// instead: a new flow from a task may reach a VIP or the node's address
/// on its own bridge, and nothing else of (or through) the node.
pub struct WithIpvs<'a, M: LbMaps> {
    pub ebpf: Ebpf<'a, M>,
    pub ipvs: &'a mut IpvsSync,
}

impl<M: LbMaps> LbTarget for WithIpvs<'_, M> {
    fn apply(&mut self, spec: &LbSpec) -> Result<ApplyReport, SyncError> {
        let a = self.ebpf.apply(&ebpf_globals(spec))?;
        Ok(a.merged(self.ipvs.apply(spec)?))
    }

    fn apply_changes(
        &mut self,
        globals: &LbSpec,
        changes: &LbChanges,
    ) -> Result<ApplyReport, SyncError> {
        let a = self
            .ebpf
            .apply_changes(&ebpf_globals(globals), &LbChanges::default())?;
        Ok(a.merged(self.ipvs.apply_changes(globals, changes)?))
    }
}

fn ebpf_globals(spec: &LbSpec) -> LbSpec {
    LbSpec {
        services: Vec::new(),
        nat_interfaces: BTreeMap::new(),
        ..spec.clone()
    }
}

/// Keeps IPVS equal to the load-balancer spec, writing only differences.
pub struct IpvsSync {
    ipvs: Ipvs,
    /// For VIPs' local routes.
    routes: NlSocket,
    scheduler: &'static str,
    /// What we installed, as we believe the kernel has it.
    installed: BTreeMap<VsKey, Dests>,
    /// Where the set of services we own is kept across restarts.
    state_file: PathBuf,
    node_addresses: Vec<Ipv4Addr>,
    /// The services as last given (by name), for when node addresses move.
    specs: BTreeMap<String, ServiceSpec>,
    /// The published keys the nftables mark set holds (`None`: unknown).
    marked: Option<BTreeSet<VsKey>>,
}

impl IpvsSync {
    /// Opens IPVS and nftables in this namespace and reads back what an
    /// earlier meshd installed (listed in `state_file`), so a restart breaks
    /// no flow and removes what is no longer wanted. Fails clearly where the
    /// kernel has no IPVS or the host no `nft`.
    pub fn open(state_file: &Path) -> Result<IpvsSync, IpvsError> {
        let mut ipvs = Ipvs::open()?;
        // With br_netfilter calling iptables for bridged frames, the
        // isolation rule (forward from a bridge) would see every frame a
        // task sends to another on its network, and drop it.
        if std::fs::read_to_string("/proc/sys/net/bridge/bridge-nf-call-iptables")
            .is_ok_and(|v| v.trim() == "1")
        {
            return Err(IpvsError::Io(
                "net.bridge.bridge-nf-call-iptables=1 (br_netfilter) would pass every bridged \
                 frame of the overlays through the IPv4 forward hook, where --lb-backend ipvs \
                 keeps tasks from routing through their node; set it to 0 in this namespace, or \
                 use --lb-backend ebpf"
                    .into(),
            ));
        }
        // Conntrack for IPVS's flows, so the masquerade applies to them.
        std::fs::write("/proc/sys/net/ipv4/vs/conntrack", "1")
            .map_err(|e| IpvsError::Io(format!("set net.ipv4.vs.conntrack=1: {e}")))?;
        let state_file = state_file.to_owned();
        let owned: BTreeSet<VsKey> = std::fs::read(&state_file)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        let owned: BTreeMap<_, VsKey> = owned.into_iter().map(|k| (k.kernel_id(), k)).collect();
        let mut installed = BTreeMap::new();
        for vs in ipvs.services()? {
            if let Some(key) = owned.get(&vs.key.kernel_id()) {
                let dests = ipvs
                    .dests(key)?
                    .into_iter()
                    .map(|d| ((d.address, d.port), d.weight))
                    .collect();
                installed.insert(*key, dests);
            }
        }
        let mut routes = NlSocket::open(libc::NETLINK_ROUTE)
            .map_err(|e| IpvsError::Io(format!("open a route netlink socket: {e}")))?;
        for key in installed.keys().filter(|k| k.fwmark != 0) {
            local_route(&mut routes, key.address, true)?;
        }
        let scheduler = probe_scheduler(&mut ipvs)?;
        crate::nft::run("list tables").map_err(|e| {
            IpvsError::Io(format!(
                "--lb-backend ipvs needs nftables (`nft`) for the masquerade of balanced flows: {e}"
            ))
        })?;
        Ok(IpvsSync {
            ipvs,
            routes,
            scheduler,
            installed,
            state_file,
            node_addresses: Vec::new(),
            specs: BTreeMap::new(),
            marked: None,
        })
    }

    pub fn scheduler(&self) -> &'static str {
        self.scheduler
    }

    /// Makes IPVS match `spec` as a whole.
    pub fn apply(&mut self, spec: &LbSpec) -> Result<ApplyReport, SyncError> {
        self.node_addresses = spec.node_addresses.clone();
        self.specs = spec
            .services
            .iter()
            .map(|s| (s.name.clone(), s.clone()))
            .collect();
        self.converge_all()
    }

    /// Applies `changes`: the upserted services' frontends as they are now,
    /// the removed frontends gone. Only the keys they name are looked at,
    /// unless the node's addresses moved (then every key may differ).
    pub fn apply_changes(
        &mut self,
        globals: &LbSpec,
        changes: &LbChanges,
    ) -> Result<ApplyReport, SyncError> {
        for s in &changes.upsert {
            self.specs.insert(s.name.clone(), s.clone());
        }
        for spec in self.specs.values_mut() {
            spec.frontends.retain(|f| !changes.remove.contains(f));
        }
        self.specs.retain(|_, s| !s.frontends.is_empty());
        if globals.node_addresses != self.node_addresses {
            self.node_addresses = globals.node_addresses.clone();
            return self.converge_all();
        }
        let want = self.give_slots(desired_of(changes.upsert.iter(), &self.node_addresses))?;
        let mut keys: BTreeSet<VsKey> = want.keys().copied().collect();
        for f in &changes.remove {
            keys.extend(
                frontend_keys(f, &self.node_addresses)
                    .into_iter()
                    .filter_map(|k| self.slotted(k)),
            );
        }
        self.converge(&keys, &want)
    }

    /// `key` with its VIP slot, if it is a VIP that has one (others as
    /// they are).
    fn slotted(&self, key: VsKey) -> Option<VsKey> {
        if key.fwmark == 0 {
            return Some(key);
        }
        self.installed
            .keys()
            .find(|k| k.fwmark != 0 && k.address == key.address)
            .copied()
    }

    /// Gives every VIP of `want` its slot: the one it has, else the lowest
    /// free one. A VIP keeps its mark for as long as it is installed, so two
    /// VIPs never share one.
    fn give_slots(
        &self,
        want: BTreeMap<VsKey, Dests>,
    ) -> Result<BTreeMap<VsKey, Dests>, SyncError> {
        let mut used: BTreeSet<u32> = self
            .installed
            .keys()
            .filter(|k| k.fwmark != 0)
            .map(|k| k.fwmark & VIP_SLOT_MASK)
            .collect();
        let mut out = BTreeMap::new();
        for (key, dests) in want {
            let key =
                match self.slotted(key) {
                    Some(k) if k.fwmark & VIP_SLOT_MASK != 0 || k.fwmark == 0 => k,
                    _ => {
                        let slot = (1..=VIP_SLOT_MASK).find(|s| !used.contains(s)).ok_or_else(|| {
                        SyncError::Ipvs(format!(
                            "ipvs: no free VIP mark for {} ({VIP_SLOT_MASK} VIPs on this node)",
                            key.address
                        ))
                    })?;
                        used.insert(slot);
                        VsKey::vip(key.address, slot)
                    }
                };
            out.insert(key, dests);
        }
        Ok(out)
    }

    fn converge_all(&mut self) -> Result<ApplyReport, SyncError> {
        let want = self.give_slots(desired_of(self.specs.values(), &self.node_addresses))?;
        let keys: BTreeSet<VsKey> = want.keys().chain(self.installed.keys()).copied().collect();
        self.converge(&keys, &want)
    }

    /// Brings each of `keys` to `want` (absent: removed).
    fn converge(
        &mut self,
        keys: &BTreeSet<VsKey>,
        want: &BTreeMap<VsKey, Dests>,
    ) -> Result<ApplyReport, SyncError> {
        let mut report = ApplyReport::default();
        // Owned before they exist: a crash while creating them leaves
        // nothing the next meshd does not know to remove.
        let pending: Vec<VsKey> = keys
            .iter()
            .filter(|k| want.contains_key(k) && !self.installed.contains_key(k))
            .copied()
            .collect();
        if !pending.is_empty() {
            self.save_with(&pending)?;
        }
        for key in keys {
            let have = self.installed.get(key).cloned();
            match (have, want.get(key)) {
                (None, None) => {}
                (Some(_), None) => {
                    match self.ipvs.del_service(key) {
                        Ok(()) => {}
                        Err(IpvsError::Netlink(e)) if e.errno() == Some(libc::ESRCH) => {}
                        Err(e) => return Err(self.failed(e)),
                    }
                    if key.fwmark != 0 {
                        local_route(&mut self.routes, key.address, false)?;
                    }
                    self.installed.remove(key);
                    report.frontend_removals += 1;
                }
                (None, Some(dests)) => {
                    // A VIP is delivered locally (where IPVS looks), as
                    // kube-proxy's IPVS mode binds service IPs to a dummy.
                    let route = if key.fwmark != 0 {
                        local_route(&mut self.routes, key.address, true)
                    } else {
                        Ok(())
                    };
                    let created = route.and_then(|()| {
                        match self.ipvs.add_service(key, self.scheduler) {
                            // Already there (a crash before the state was
                            // saved): adopt it.
                            Err(IpvsError::Netlink(e)) if e.errno() == Some(libc::EEXIST) => Ok(()),
                            r => r,
                        }
                    });
                    if let Err(e) = created {
                        if key.fwmark != 0 {
                            let _ = local_route(&mut self.routes, key.address, false);
                        }
                        let _ = self.save();
                        return Err(self.failed(e));
                    }
                    let existing: Dests = self
                        .ipvs
                        .dests(key)
                        .map_err(|e| self.failed(e))?
                        .into_iter()
                        .map(|d| ((d.address, d.port), d.weight))
                        .collect();
                    self.installed.insert(*key, existing);
                    report.frontend_writes += 1;
                    self.sync_dests(key, dests, &mut report)?;
                }
                (Some(_), Some(dests)) => self.sync_dests(key, dests, &mut report)?,
            }
        }
        self.save()?;
        self.sync_marks(&mut report)?;
        Ok(report)
    }

    fn sync_dests(
        &mut self,
        key: &VsKey,
        want: &Dests,
        report: &mut ApplyReport,
    ) -> Result<(), SyncError> {
        let have = self.installed.get(key).cloned().unwrap_or_default();
        for (&(addr, port), &weight) in want {
            match have.get(&(addr, port)) {
                Some(&w) if w == weight => continue,
                Some(_) => self.ipvs.set_dest(key, addr, port, weight),
                None => self.ipvs.add_dest(key, addr, port, weight),
            }
            .map_err(|e| self.failed(e))?;
            report.backend_writes += 1;
            self.installed
                .entry(*key)
                .or_default()
                .insert((addr, port), weight);
        }
        for &(addr, port) in have.keys() {
            if want.contains_key(&(addr, port)) {
                continue;
            }
            // Open flows to it go on (IPVS keeps their connection entries);
            // it gets no new ones.
            match self.ipvs.del_dest(key, addr, port) {
                Ok(()) => {}
                Err(IpvsError::Netlink(e)) if e.errno() == Some(libc::ENOENT) => {}
                Err(e) => return Err(self.failed(e)),
            }
            report.backend_removals += 1;
            if let Some(d) = self.installed.get_mut(key) {
                d.remove(&(addr, port));
            }
        }
        Ok(())
    }

    /// Records what we own (so a later meshd removes it when unwanted).
    fn save(&self) -> Result<(), SyncError> {
        self.save_with(&[])
    }

    /// Records what we own, and `pending`: keys about to be created.
    fn save_with(&self, pending: &[VsKey]) -> Result<(), SyncError> {
        let keys: BTreeSet<&VsKey> = self.installed.keys().chain(pending).collect();
        let tmp = self.state_file.with_extension("tmp");
        std::fs::write(&tmp, serde_json::to_vec(&keys).expect("keys serialize"))
            .and_then(|()| std::fs::rename(&tmp, &self.state_file))
            .map_err(|e| SyncError::Ipvs(format!("save {}: {e}", self.state_file.display())))
    }

    fn failed(&mut self, e: IpvsError) -> SyncError {
        // What actually happened is unknown past this point: read it back.
        let keys: Vec<VsKey> = self.installed.keys().copied().collect();
        for k in keys {
            if let Ok(d) = self.ipvs.dests(&k) {
                self.installed.insert(
                    k,
                    d.into_iter()
                        .map(|d| ((d.address, d.port), d.weight))
                        .collect(),
                );
            }
        }
        e.into()
    }

    /// The nftables table: mark flows to published keys, masquerade them.
    /// Rewritten (atomically) only when the set of keys changes.
    fn sync_marks(&mut self, report: &mut ApplyReport) -> Result<(), SyncError> {
        let keys: BTreeSet<VsKey> = self.installed.keys().copied().collect();
        if self.marked.as_ref() == Some(&keys) {
            return Ok(());
        }
        crate::nft::run(&nft_ruleset(&keys))
            .map_err(|e| SyncError::Ipvs(format!("nftables {NFT_TABLE}: {e}")))?;
        self.marked = Some(keys);
        report.config_writes += 1;
        Ok(())
    }

    /// What `meshd down` does: every service we own and the nftables table go.
    pub fn teardown(&mut self) -> Result<usize, SyncError> {
        let keys: Vec<VsKey> = self.installed.keys().copied().collect();
        for k in &keys {
            match self.ipvs.del_service(k) {
                Ok(()) => {}
                Err(IpvsError::Netlink(e)) if e.errno() == Some(libc::ESRCH) => {}
                Err(e) => return Err(e.into()),
            }
            if k.fwmark != 0 {
                local_route(&mut self.routes, k.address, false)?;
            }
        }
        self.installed.clear();
        self.save()?;
        let _ = crate::nft::run(&format!("delete table ip {NFT_TABLE}"));
        self.marked = None;
        Ok(keys.len())
    }
}

/// `mh` (Maglev hashing, as the eBPF path) where the kernel has it, else `rr`.
fn probe_scheduler(ipvs: &mut Ipvs) -> Result<&'static str, IpvsError> {
    // A throwaway service on an address nobody uses (TEST-NET-1, port 9).
    let probe = VsKey::port(Protocol::Tcp, Ipv4Addr::new(192, 0, 2, 254), 9);
    // Left behind by a crash mid-probe: gone first.
    let _ = ipvs.del_service(&probe);
    for sched in ["mh", "rr"] {
        match ipvs.add_service(&probe, sched) {
            Ok(()) => {
                ipvs.del_service(&probe)?;
                return Ok(sched);
            }
            // "Scheduler module ip_vs_<name> not found".
            Err(IpvsError::Netlink(e)) if e.errno() == Some(libc::ENOENT) => continue,
            Err(e) => return Err(e),
        }
    }
    Err(IpvsError::Io(
        "IPVS has neither the mh nor the rr scheduler (ip_vs_mh / ip_vs_rr)".into(),
    ))
}

/// Marks our routes (`proto 0xb5` in `ip route`).
const RTPROT_MESH: u8 = 0xb5;

/// Adds (replacing) or deletes `local VIP dev lo table local`.
fn local_route(sock: &mut NlSocket, vip: Ipv4Addr, add: bool) -> Result<(), IpvsError> {
    const RTM_NEWROUTE: u16 = 24;
    const RTM_DELROUTE: u16 = 25;
    const NLM_F_REPLACE: u16 = 0x100;
    const RT_TABLE_LOCAL: u8 = 255;
    const RT_SCOPE_HOST: u8 = 254;
    const RTN_LOCAL: u8 = 2;
    const RTA_DST: u16 = 1;
    const RTA_OIF: u16 = 4;
    let mut p = vec![
        libc::AF_INET as u8,
        32,
        0,
        0,
        RT_TABLE_LOCAL,
        RTPROT_MESH,
        RT_SCOPE_HOST,
        RTN_LOCAL,
    ];
    p.extend_from_slice(&0u32.to_ne_bytes());
    let mut attrs = Attrs::new();
    // SAFETY: a NUL-terminated literal.
    let lo = unsafe { libc::if_nametoindex(c"lo".as_ptr()) };
    attrs.put(RTA_DST, &vip.octets()).u32(RTA_OIF, lo);
    p.extend_from_slice(&attrs.0);
    let (kind, flags) = if add {
        (RTM_NEWROUTE, crate::nlsock::NLM_F_CREATE | NLM_F_REPLACE)
    } else {
        (RTM_DELROUTE, 0)
    };
    let verb = if add { "add" } else { "delete" };
    match sock.request(kind, flags, &p, || {
        format!("{verb} the local route for VIP {vip}")
    }) {
        Ok(_) => Ok(()),
        Err(e) if !add && e.errno() == Some(libc::ESRCH) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

fn nft_ruleset(keys: &BTreeSet<VsKey>) -> String {
    let vips: Vec<String> = keys
        .iter()
        .filter(|k| k.fwmark != 0)
        .map(|k| format!("{} : {:#x}", k.address, k.fwmark))
        .collect();
    let vip_addrs: Vec<String> = keys
        .iter()
        .filter(|k| k.fwmark != 0)
        .map(|k| k.address.to_string())
        .collect();
    let elements_of = |v: &[String]| {
        if v.is_empty() {
            String::new()
        } else {
            format!("elements = {{ {} }}", v.join(", "))
        }
    };
    let (vips, vip_addrs) = (elements_of(&vips), elements_of(&vip_addrs));
    let elements: Vec<String> = keys
        .iter()
        .filter(|k| k.fwmark == 0)
        .map(|k| {
            let p = match k.protocol {
                Protocol::Tcp => "tcp",
                Protocol::Udp => "udp",
            };
            format!("{p} . {} . {}", k.address, k.port)
        })
        .collect();
    let elements = if elements.is_empty() {
        String::new()
    } else {
        format!("elements = {{ {} }}", elements.join(", "))
    };
    let mark = format!(
        "meta l4proto . ip daddr . th dport @published meta mark set meta mark | {MASQ_MARK:#x}; \
         meta mark set ip daddr map @vips"
    );
    let bridges = crate::overlay::BRIDGE_PREFIX;
    // A VXLAN packet keeps the mark of the frame it carries: without its
    // VIP bits, or IPVS would take the tunnel packet for the VIP again.
    // Only the IPsec mark may stay (set by `ip mesh_ipsec`'s own output
    // chain, before or after this one): a masquerade mark on a tunnel
    // packet would NAT it after the IPsec checks.
    let (vxlan, keep) = (crate::netlink::VXLAN_PORT, crate::ipsec::ENCRYPT_MARK);
    format!(
        "table ip {NFT_TABLE}\n\
         delete table ip {NFT_TABLE}\n\
         table ip {NFT_TABLE} {{\n\
         \tset published {{ type inet_proto . ipv4_addr . inet_service; {elements} }}\n\
         \tmap vips {{ type ipv4_addr : mark; {vips} }}\n\
         \tset vip_addrs {{ type ipv4_addr; {vip_addrs} }}\n\
         \tchain prerouting {{ type filter hook prerouting priority mangle; policy accept; {mark}; }}\n\
         \tchain output {{ type route hook output priority mangle; policy accept; \
         udp dport {vxlan} meta mark set meta mark & {keep:#x}; {mark}; }}\n\
         \tchain postrouting {{ type nat hook postrouting priority srcnat; policy accept; \
         udp dport {vxlan} accept; \
         meta mark & {MASQ_MARK:#x} == {MASQ_MARK:#x} masquerade; \
         meta mark & {VIP_MARK:#x} == {VIP_MARK:#x} masquerade; }}\n\
         \tchain forward {{ type filter hook forward priority filter; policy accept; \
         iifname \"{bridges}*\" ct direction original drop; }}\n\
         \tchain input {{ type filter hook input priority filter; policy accept; \
         iifname \"{bridges}*\" ip daddr @vip_addrs accept; \
         iifname \"{bridges}*\" ct direction original fib daddr . iif type != local drop; }}\n\
         }}\n"
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lb::BackendSpec;

    fn svc(port: u16, backends: &[(u8, u32)]) -> ServiceSpec {
        ServiceSpec {
            id: 1,
            name: "web".into(),
            frontends: vec![
                FrontendSpec {
                    address: None,
                    port,
                    protocol: Protocol::Tcp,
                },
                FrontendSpec {
                    address: Some(Ipv4Addr::new(10, 0, 0, 2)),
                    port: 0,
                    protocol: Protocol::Tcp,
                },
            ],
            backends: backends
                .iter()
                .map(|&(last, weight)| BackendSpec {
                    address: Ipv4Addr::new(10, 0, 0, last),
                    port: 80,
                    weight,
                })
                .collect(),
            table_size: 251,
        }
    }

    #[test]
    fn published_ports_become_a_service_per_node_address_and_vips_a_fwmark_service() {
        let nodes = [Ipv4Addr::new(192, 168, 0, 1), Ipv4Addr::new(192, 168, 0, 2)];
        let want = desired_of(&[svc(8080, &[(5, 1), (6, 0)])], &nodes);
        assert_eq!(want.len(), 3, "{want:?}");
        let vip = VsKey::vip(Ipv4Addr::new(10, 0, 0, 2), 0);
        assert_eq!(vip.fwmark, VIP_MARK, "no slot until the sync gives one");
        assert!(want.contains_key(&vip), "{want:?}");
        for (k, dests) in &want {
            if k.fwmark == 0 {
                assert_eq!(k.port, 8080);
                assert!(nodes.contains(&k.address));
            }
            assert_eq!(
                dests.get(&(Ipv4Addr::new(10, 0, 0, 6), 80)),
                Some(&0),
                "draining = weight 0"
            );
        }
        // The kernel knows a fwmark service by its mark alone.
        let vip = VsKey::vip(Ipv4Addr::new(10, 0, 0, 2), 1);
        assert_eq!(vip.kernel_id(), (0x8000_0001, 0, Ipv4Addr::UNSPECIFIED, 0));
    }

    #[test]
    fn the_nft_table_marks_exactly_the_published_keys_and_vips() {
        let keys = BTreeSet::from([
            VsKey::vip(Ipv4Addr::new(10, 0, 0, 2), 7),
            VsKey {
                fwmark: 0,
                protocol: Protocol::Udp,
                address: Ipv4Addr::new(192, 168, 0, 1),
                port: 5353,
            },
        ]);
        let r = nft_ruleset(&keys);
        assert!(r.contains("elements = { udp . 192.168.0.1 . 5353 }"), "{r}");
        assert!(r.contains("elements = { 10.0.0.2 : 0x80000007 }"), "{r}");
        assert!(
            r.contains("udp dport 4789 meta mark set meta mark & 0x400000")
                && r.contains("udp dport 4789 accept"),
            "{r}"
        );
        assert!(
            r.contains("meta mark & 0x80000000 == 0x80000000 masquerade"),
            "{r}"
        );
        assert!(!nft_ruleset(&BTreeSet::new()).contains("elements"));
    }
}
