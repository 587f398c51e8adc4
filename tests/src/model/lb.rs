//! What `tc_lb` must do to an IPv4 packet, given its maps: the contract of
//! `dataplane_ebpf::lb`, restated.
//!
//! - Non-IPv4 passes. On an overlay bridge (`here`: the node's address on
//!   the ingress device) anything the balancer does not take is dropped
//!   unless it is for `here`; elsewhere it passes unchanged.
//! - Only fully parsed TCP and UDP are balanced.
//! - A reply (to the SNAT address or `here`, a port in the SNAT range,
//!   with a reverse entry) is reverse-NATed to frontend -> client.
//! - Otherwise a frontend is looked up: (address, port, protocol), then
//!   the address's any-port entry (a VIP), then a published port on a node
//!   address. A tracked flow keeps its backend and SNAT port; a new one
//!   (or a bare SYN on a closed flow, or one whose backend went) gets the
//!   Maglev pick `table[flow_hash % size]` and a fresh SNAT port. No
//!   backend at all: the [`super::reject`] answer.
//! - Rewrites fix checksums incrementally (RFC 1624): a wrong checksum
//!   stays as wrong; a UDP checksum of 0 stays 0 and none becomes 0.

use std::collections::{BTreeMap, BTreeSet};

use super::{
    csum,
    parse::{PARSED, Parsed, parse},
};

const FIN: u8 = 0x01;
const SYN: u8 = 0x02;
const RST: u8 = 0x04;
const ACK: u8 = 0x10;

pub type Addr = [u8; 4];

/// A frontend's key: address (0: every node address), port (0 with
/// protocol 0: any), protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct FrontKey {
    pub addr: Addr,
    pub port: u16,
    pub proto: u8,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Front {
    pub id: u32,
    pub backend_count: u32,
    pub table_size: u32,
}

/// A flow as the maps key it (addresses and ports as on the wire).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Flow {
    pub saddr: Addr,
    pub daddr: Addr,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ct {
    pub backend: u32,
    pub frontend: u32,
    pub nat_addr: Addr,
    pub nat_port: u16,
    pub closing: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rev {
    pub client: Addr,
    pub client_port: u16,
    pub front: Addr,
    pub front_port: u16,
    pub closing: bool,
}

/// The maps, and the flows the model has seen.
#[derive(Clone, Debug, Default)]
pub struct Model {
    pub node_addrs: BTreeSet<Addr>,
    pub nat_addr: Addr,
    pub nat_port_min: u16,
    pub nat_port_count: u16,
    /// The node's address on the ingress device (an overlay bridge).
    pub here: Option<Addr>,
    /// The node's address on the device backends are routed out of.
    pub out_nat: Option<Addr>,
    /// The prefixes the namespace has a route to (a packet to anywhere
    /// else is dropped after its rewrite: the program cannot send it).
    pub routes: Vec<(Addr, u8)>,
    pub frontends: BTreeMap<FrontKey, Front>,
    /// id -> (address, port; 0: the client's).
    pub backends: BTreeMap<u32, (Addr, u16)>,
    pub maglev: BTreeMap<u32, Vec<u32>>,
    pub conntrack: BTreeMap<Flow, Ct>,
    pub revnat: BTreeMap<Flow, Rev>,
    /// Per frontend and per backend: packets, bytes, new flows, rejected.
    pub front_stats: BTreeMap<u32, [u64; 4]>,
    pub back_stats: BTreeMap<u32, [u64; 4]>,
}

/// What the program must do with one packet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// TC_ACT_OK, the bytes unchanged.
    Pass,
    /// TC_ACT_SHOT.
    Drop,
    /// Redirected, DNATed to `to` and SNATed to `nat_addr`; `nat_port`:
    /// the flow's (a tracked flow), or `None` for a fresh one the program
    /// picks.
    Forward {
        flow: Flow,
        frontend: u32,
        backend: u32,
        to: (Addr, u16),
        nat_addr: Addr,
        nat_port: Option<u16>,
        new_flow: bool,
    },
    /// Dropped for want of a route to the backend; counted.
    Unroutable { frontend: u32 },
    /// A reply (its reverse entry touched) with no route to its client:
    /// dropped.
    ReplyUnroutable,
    /// Redirected after reverse NAT: these bytes.
    Reply(Vec<u8>),
    /// A frontend with no backend: redirected with this answer, or (none
    /// due, or the rate limit spent) dropped; counted either way.
    Reject {
        frontend: u32,
        answer: Option<Vec<u8>>,
    },
}

/// The flow hash every node computes alike (the program's contract: the
/// words as the CPU loads them from the wire, mixed, then murmur3's fmix32).
pub fn flow_hash(f: &Flow) -> u32 {
    fn mix(h: u32, v: u32) -> u32 {
        (h ^ v).wrapping_mul(0x0100_0193).rotate_left(13)
    }
    let mut h: u32 = 0x9e37_79b9;
    h = mix(h, u32::from_ne_bytes(f.saddr));
    for _ in 0..3 {
        h = mix(h, 0);
    }
    h = mix(h, u32::from_ne_bytes(f.daddr));
    for _ in 0..3 {
        h = mix(h, 0);
    }
    let sport = u32::from(u16::from_ne_bytes(f.sport.to_be_bytes()));
    let dport = u32::from(u16::from_ne_bytes(f.dport.to_be_bytes()));
    h = mix(h, (sport << 16) | dport);
    h = mix(h, u32::from(f.proto));
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

/// `frame` with its IPv4 endpoints rewritten and checksums updated as a
/// NAT must (see the module doc).
pub fn rewrite(frame: &[u8], p: &Parsed, src: (Addr, u16), dst: (Addr, u16)) -> Vec<u8> {
    let mut out = frame.to_vec();
    let (l3, l4) = (p.l3_off, p.l4_off);
    let tcp = p.ip_proto == 6;
    let csum_off = if tcp { l4 + 16 } else { l4 + 6 };
    let fields: [(usize, Vec<u8>, bool); 4] = [
        (l3 + 12, src.0.to_vec(), true),
        (l3 + 16, dst.0.to_vec(), true),
        (l4, src.1.to_be_bytes().to_vec(), false),
        (l4 + 2, dst.1.to_be_bytes().to_vec(), false),
    ];
    for (off, new, in_ip) in fields {
        let old = out[off..off + new.len()].to_vec();
        if old == new {
            continue;
        }
        let check = u16::from_be_bytes([out[csum_off], out[csum_off + 1]]);
        if tcp || check != 0 {
            let mut c = csum::update(check, &old, &new);
            if !tcp && c == 0 {
                c = 0xffff;
            }
            out[csum_off..csum_off + 2].copy_from_slice(&c.to_be_bytes());
        }
        if in_ip {
            let check = u16::from_be_bytes([out[l3 + 10], out[l3 + 11]]);
            let c = csum::update(check, &old, &new);
            out[l3 + 10..l3 + 12].copy_from_slice(&c.to_be_bytes());
        }
        out[off..off + new.len()].copy_from_slice(&new);
    }
    out
}

impl Model {
    fn in_nat_range(&self, port: u16) -> bool {
        port >= self.nat_port_min
            && u32::from(port) < u32::from(self.nat_port_min) + u32::from(self.nat_port_count)
    }

    fn routable(&self, to: Addr) -> bool {
        self.routes.iter().any(|&(net, len)| {
            let mask = u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0);
            u32::from_be_bytes(net) & mask == u32::from_be_bytes(to) & mask
        })
    }

    fn frontend(&self, p: &Parsed) -> Option<Front> {
        let key = |addr, port, proto| FrontKey { addr, port, proto };
        if let Some(f) = self.frontends.get(&key(p.daddr, p.dport, p.ip_proto)) {
            return Some(*f);
        }
        if let Some(f) = self.frontends.get(&key(p.daddr, 0, 0)) {
            return Some(*f);
        }
        if !self.node_addrs.contains(&p.daddr) {
            return None;
        }
        self.frontends
            .get(&key([0; 4], p.dport, p.ip_proto))
            .copied()
    }

    /// What the program must do with `frame`; the model's state is not
    /// changed (see [`Model::commit`]).
    pub fn decide(&self, frame: &[u8]) -> Verdict {
        let p = parse(frame);
        if p.ethertype != 0x0800 {
            return Verdict::Pass;
        }
        let other = match self.here {
            Some(here) if p.daddr != here => Verdict::Drop,
            _ => Verdict::Pass,
        };
        if p.outcome != PARSED || (p.ip_proto != 6 && p.ip_proto != 17) {
            return other;
        }
        if self.nat_addr == [0; 4] {
            return other;
        }
        let flow = Flow {
            saddr: p.saddr,
            daddr: p.daddr,
            sport: p.sport,
            dport: p.dport,
            proto: p.ip_proto,
        };
        if self.in_nat_range(p.dport)
            && (p.daddr == self.nat_addr || self.here == Some(p.daddr))
            && let Some(rev) = self.revnat.get(&flow)
        {
            if !self.routable(rev.client) {
                return Verdict::ReplyUnroutable;
            }
            return Verdict::Reply(rewrite(
                frame,
                &p,
                (rev.front, rev.front_port),
                (rev.client, rev.client_port),
            ));
        }
        let Some(front) = self.frontend(&p) else {
            return other;
        };
        let ct = self.conntrack.get(&flow);
        let tcp = p.ip_proto == 6;
        let reopened = tcp && p.tcp_flags & (SYN | ACK) == SYN && ct.is_some_and(|c| c.closing);
        let tracked = ct.filter(|_| !reopened);
        let mut backend =
            tracked.and_then(|c| self.backends.get(&c.backend).map(|b| (c.backend, *b)));
        let new_flow = backend.is_none();
        if new_flow {
            if front.backend_count == 0 || front.table_size == 0 {
                return Verdict::Reject {
                    frontend: front.id,
                    answer: super::reject(frame, p.l3_off),
                };
            }
            let slot = (flow_hash(&flow) % front.table_size) as usize;
            let Some(&id) = self.maglev.get(&front.id).and_then(|t| t.get(slot)) else {
                return Verdict::Drop;
            };
            backend = self.backends.get(&id).map(|b| (id, *b));
        }
        let Some((id, (addr, port))) = backend else {
            return Verdict::Drop;
        };
        let port = if port == 0 { p.dport } else { port };
        if !self.routable(addr) {
            return Verdict::Unroutable { frontend: front.id };
        }
        let nat = self.out_nat.unwrap_or(self.nat_addr);
        let nat_port = match ct {
            Some(c) if !new_flow && c.nat_addr == nat => Some(c.nat_port),
            _ => None,
        };
        Verdict::Forward {
            flow,
            frontend: front.id,
            backend: id,
            to: (addr, port),
            nat_addr: nat,
            nat_port,
            new_flow,
        }
    }

    /// The bytes a forward must produce, once the SNAT port is known.
    pub fn forwarded(frame: &[u8], v: &Verdict, nat_port: u16) -> Vec<u8> {
        let Verdict::Forward { to, nat_addr, .. } = v else {
            panic!("not a forward: {v:?}");
        };
        rewrite(frame, &parse(frame), (*nat_addr, nat_port), *to)
    }

    /// Records what the program did with `frame` (`nat_port`: the port a
    /// fresh forward got; `answered`: a reject was sent, not rate-limited).
    pub fn commit(&mut self, frame: &[u8], v: &Verdict, nat_port: Option<u16>, answered: bool) {
        let p = parse(frame);
        let bytes = frame.len() as u64;
        let closing = p.ip_proto == 6 && p.tcp_flags & (FIN | RST) != 0;
        match v {
            Verdict::Pass | Verdict::Drop => {}
            Verdict::Reply(_) | Verdict::ReplyUnroutable => {
                let flow = Flow {
                    saddr: p.saddr,
                    daddr: p.daddr,
                    sport: p.sport,
                    dport: p.dport,
                    proto: p.ip_proto,
                };
                if let Some(r) = self.revnat.get_mut(&flow) {
                    r.closing |= closing;
                }
            }
            Verdict::Unroutable { frontend } => {
                let s = self.front_stats.entry(*frontend).or_default();
                s[0] += 1;
                s[1] += bytes;
            }
            Verdict::Reject { frontend, .. } => {
                let s = self.front_stats.entry(*frontend).or_default();
                s[0] += 1;
                s[1] += bytes;
                if answered {
                    s[3] += 1;
                }
            }
            Verdict::Forward {
                flow,
                frontend,
                backend,
                to,
                nat_addr,
                nat_port: kept,
                new_flow,
            } => {
                for (map, id) in [
                    (&mut self.front_stats, *frontend),
                    (&mut self.back_stats, *backend),
                ] {
                    let s = map.entry(id).or_default();
                    s[0] += 1;
                    s[1] += bytes;
                    s[2] += u64::from(*new_flow);
                }
                match kept {
                    Some(_) => {
                        let c = self.conntrack.get_mut(flow).expect("a tracked flow");
                        c.closing |= closing;
                    }
                    None => {
                        let port = nat_port.expect("the fresh SNAT port");
                        self.conntrack.insert(
                            *flow,
                            Ct {
                                backend: *backend,
                                frontend: *frontend,
                                nat_addr: *nat_addr,
                                nat_port: port,
                                closing,
                            },
                        );
                        self.revnat.insert(
                            Flow {
                                saddr: to.0,
                                daddr: *nat_addr,
                                sport: to.1,
                                dport: port,
                                proto: flow.proto,
                            },
                            Rev {
                                client: flow.saddr,
                                client_port: flow.sport,
                                front: flow.daddr,
                                front_port: flow.dport,
                                closing: false,
                            },
                        );
                    }
                }
            }
        }
    }

    /// How full the SNAT ports of this forward's backend are (reverse
    /// entries over the range; a closed flow's port is taken too until it
    /// has been quiet a second): near full, the program's random tries may
    /// all miss a free port, and the packet is dropped.
    pub fn nat_occupancy(&self, v: &Verdict) -> f64 {
        let Verdict::Forward {
            flow, to, nat_addr, ..
        } = v
        else {
            return 0.0;
        };
        let at = |dport, proto| Flow {
            saddr: to.0,
            daddr: *nat_addr,
            sport: to.1,
            dport,
            proto,
        };
        let live = self
            .revnat
            .range(at(0, 0)..=at(u16::MAX, u8::MAX))
            .filter(|(k, _)| k.proto == flow.proto)
            .count();
        live as f64 / f64::from(self.nat_port_count.max(1))
    }

    /// Whether a fresh SNAT port may be `port` for this forward: no live
    /// flow of another client holds it (one that closed may be reused).
    pub fn port_free(&self, v: &Verdict, port: u16) -> bool {
        let Verdict::Forward {
            flow, to, nat_addr, ..
        } = v
        else {
            return false;
        };
        let key = Flow {
            saddr: to.0,
            daddr: *nat_addr,
            sport: to.1,
            dport: port,
            proto: flow.proto,
        };
        self.in_nat_range(port)
            && self.revnat.get(&key).is_none_or(|r| {
                r.closing
                    || (r.client, r.client_port, r.front, r.front_port)
                        == (flow.saddr, flow.sport, flow.daddr, flow.dport)
            })
    }
}
