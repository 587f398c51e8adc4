//! [`Ipvs`]: our generic-netlink client for IPVS (services and their real
//! servers, listed, added, changed, deleted), and the scheduler probe.

use std::net::Ipv4Addr;

use super::{error::IpvsError, key::VsKey};
use crate::{
    lb::Protocol,
    nlsock::{self, Attrs, NLM_F_DUMP, NlSocket},
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

/// `mh` (Maglev hashing, as the eBPF path) where the kernel has it, else `rr`.
pub(super) fn probe_scheduler(ipvs: &mut Ipvs) -> Result<&'static str, IpvsError> {
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
