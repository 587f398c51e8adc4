//! The L4 load balancer (TC ingress): published ports and frontends, Maglev
//! backend choice, conntrack, DNAT + SNAT, and reverse NAT of replies.
//!
//! Forward path (client -> frontend):
//!   frontend: (address, port), else (address, any port and protocol: a
//!   VIP), else a
//!   published port (any node address, port);
//!   conntrack hit with a live backend -> reuse it; otherwise Maglev picks;
//!   a backend port 0 means the port the client asked for.
//!   DNAT to backend:port, SNAT to (the node's address on the device the
//!   backend is routed out of, from NAT_IFACES, else LB_CONFIG.nat_addr; a
//!   port from the SNAT range), record CONNTRACK and REVNAT, redirect to
//!   that device.
//! Reverse path (backend -> nat_addr:nat_port, arriving on any device for
//!   LB_CONFIG.nat_addr, or on the device that NAT_IFACES gives that address):
//!   REVNAT hit -> source becomes the frontend, destination the client.
//! A frontend with no backend answers a new flow with a TCP RST or an ICMP
//!   port unreachable (see [`crate::reject`]), counted as `rejected`.
//! Anything else, and every packet the parser did not fully parse
//! (truncated, malformed, fragments), passes through untouched; except on
//! an overlay bridge (an interface in NAT_IFACES), where an IPv4 packet not
//! for the node's own address there is dropped: the node routes nothing for
//! tasks but load-balanced flows.

use aya_ebpf::{
    bindings::{
        BPF_F_PSEUDO_HDR, BPF_NOEXIST, TC_ACT_OK, TC_ACT_SHOT, bpf_fib_lookup as FibParams,
    },
    btf_maps::{Array, ArrayOfMaps},
    helpers::{
        bpf_get_prandom_u32, bpf_ktime_get_ns,
        generated::{bpf_fib_lookup, bpf_redirect_neigh},
    },
    macros::{btf_map, map},
    maps::{Array as LegacyArray, HashMap, LruHashMap, PerCpuArray},
    programs::TcContext,
};
use dataplane_common::{
    Backend, CT_F_CLOSING, CtEntry, FAMILY_V4, FlowKey, Frontend, FrontendKey, LbConfig, LbCounter,
    RevNat, limits, outcome,
};

use crate::{
    parse::{self, IPPROTO_TCP, IPPROTO_UDP, Parsed},
    reject,
};

#[map(name = "FRONTENDS")]
static FRONTENDS: HashMap<FrontendKey, Frontend> =
    HashMap::with_max_entries(limits::MAX_FRONTENDS, 0);

#[map(name = "BACKENDS")]
static BACKENDS: HashMap<u32, Backend> = HashMap::with_max_entries(limits::BACKENDS_DEFAULT, 0);

/// BPF_F_INNER_MAP: inner tables may be smaller than the template.
const BPF_F_INNER_MAP: usize = 1 << 12;

#[btf_map]
static MAGLEV: ArrayOfMaps<
    Array<u32, { limits::MAGLEV_MAX as usize }, BPF_F_INNER_MAP>,
    { limits::MAX_FRONTENDS as usize },
> = ArrayOfMaps::new();

#[map(name = "CONNTRACK")]
static CONNTRACK: LruHashMap<FlowKey, CtEntry> =
    LruHashMap::with_max_entries(limits::CONNTRACK_MAX, 0);

#[map(name = "REVNAT")]
static REVNAT: LruHashMap<FlowKey, RevNat> = LruHashMap::with_max_entries(limits::CONNTRACK_MAX, 0);

#[map(name = "NODE_ADDRS")]
static NODE_ADDRS: HashMap<[u32; 4], u32> = HashMap::with_max_entries(limits::NODE_ADDRS_MAX, 0);

#[map(name = "LB_CONFIG")]
static LB_CONFIG: LegacyArray<LbConfig> = LegacyArray::with_max_entries(1, 0);

#[map(name = "NAT_IFACES")]
static NAT_IFACES: HashMap<u32, [u32; 4]> = HashMap::with_max_entries(limits::NAT_IFACES_MAX, 0);

#[map(name = "FRONTEND_STATS")]
static FRONTEND_STATS: PerCpuArray<LbCounter> =
    PerCpuArray::with_max_entries(limits::MAX_FRONTENDS, 0);

#[map(name = "BACKEND_STATS")]
static BACKEND_STATS: PerCpuArray<LbCounter> =
    PerCpuArray::with_max_entries(limits::BACKENDS_DEFAULT, 0);

const TCP_FIN: u8 = 0x01;
const TCP_RST: u8 = 0x04;
const TCP_SYN: u8 = 0x02;
const TCP_ACK: u8 = 0x10;
const AF_INET: u8 = 2;
/// Tries at finding a free SNAT port before giving up on a new flow.
const NAT_PORT_TRIES: u32 = 32;
/// How long a closed flow's SNAT port stays reserved (late FINs/ACKs).
const CLOSED_REUSE_NS: u64 = 1_000_000_000;
const BPF_F_MARK_MANGLED_0: u64 = 1 << 5;
const BPF_FIB_LKUP_RET_SUCCESS: i64 = 0;
const BPF_FIB_LKUP_RET_NO_NEIGH: i64 = 7;

#[inline(always)]
fn bump(map: &PerCpuArray<LbCounter>, index: u32, bytes: u64, new_flow: bool) {
    if let Some(c) = map.get_ptr_mut(index) {
        // SAFETY: per-CPU slot, valid for the program's run.
        unsafe {
            (*c).packets += 1;
            (*c).bytes += bytes;
            if new_flow {
                (*c).new_flows += 1;
            }
        }
    }
}

/// A flow hash that is the same on every node and in every process.
#[inline(always)]
fn flow_hash(k: &FlowKey) -> u32 {
    let mut h: u32 = 0x9e37_79b9;
    h = mix(h, k.saddr_be[0]);
    h = mix(h, k.saddr_be[1]);
    h = mix(h, k.saddr_be[2]);
    h = mix(h, k.saddr_be[3]);
    h = mix(h, k.daddr_be[0]);
    h = mix(h, k.daddr_be[1]);
    h = mix(h, k.daddr_be[2]);
    h = mix(h, k.daddr_be[3]);
    h = mix(h, (u32::from(k.sport_be) << 16) | u32::from(k.dport_be));
    h = mix(h, u32::from(k.proto));
    // murmur3 fmix32
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

#[inline(always)]
fn mix(h: u32, v: u32) -> u32 {
    (h ^ v).wrapping_mul(0x0100_0193).rotate_left(13)
}

/// Bytes of headers the parser may need in the linear area (Ethernet, two
/// VLAN tags, IPv4 with options, TCP with options).
const HEADERS_MAX: u32 = 14 + 8 + 60 + 60;

pub fn try_lb(ctx: &TcContext) -> Result<i32, i64> {
    // Locally generated and GRO'd skbs carry their payload in page fragments;
    // make sure the headers are linear before parsing.
    let want = if ctx.len() < HEADERS_MAX {
        ctx.len()
    } else {
        HEADERS_MAX
    };
    if ((ctx.data_end() - ctx.data()) as u32) < want {
        ctx.pull_data(want)?;
    }
    let p = parse::parse(ctx);
    if p.ethertype != parse::ETH_P_IP {
        return Ok(TC_ACT_OK);
    }
    // On an overlay bridge (it has the node's own address) the node is no
    // router: an IPv4 packet from a task that the load balancer does not
    // take is for that address, or it is dropped. Otherwise a task could
    // route through its node into another network or onto the underlay.
    let here = nat_here(ctx);
    let other = if here != 0 && p.daddr[0] != here {
        TC_ACT_SHOT
    } else {
        TC_ACT_OK
    };
    if p.outcome != outcome::PARSED || (p.ip_proto != IPPROTO_TCP && p.ip_proto != IPPROTO_UDP) {
        return Ok(other);
    }
    // Not configured yet: no frontend to take, so the bridge's verdict
    // (never a plain pass on an overlay bridge: that bypassed isolation).
    let Some(cfg) = LB_CONFIG.get(0) else {
        return Ok(other);
    };
    if cfg.nat_addr_be[0] == 0 {
        return Ok(other);
    }
    let flow = FlowKey {
        saddr_be: [p.saddr[0], 0, 0, 0],
        daddr_be: [p.daddr[0], 0, 0, 0],
        sport_be: p.sport_be,
        dport_be: p.dport_be,
        proto: p.ip_proto,
        family: FAMILY_V4,
        _pad: [0; 2],
    };
    let bytes = u64::from(ctx.len());
    let closing = p.ip_proto == IPPROTO_TCP && p.tcp_flags & (TCP_FIN | TCP_RST) != 0;
    let now = unsafe { bpf_ktime_get_ns() };

    // Replies to our SNAT address from a backend: the node-wide one, or
    // the one this interface has (the node's own address on an overlay).
    let dport = u16::from_be(p.dport_be);
    if dport >= cfg.nat_port_min
        && u32::from(dport) < u32::from(cfg.nat_port_min) + u32::from(cfg.nat_port_count)
        && (p.daddr[0] == cfg.nat_addr_be[0] || (here != 0 && p.daddr[0] == here))
        && let Some(rev) = REVNAT.get_ptr_mut(flow)
    {
        // SAFETY: map value pointer, valid for the program's run.
        let rev = unsafe { &mut *rev };
        rev.last_seen_ns = now;
        if closing {
            rev.flags |= CT_F_CLOSING;
        }
        let (client, client_port) = (rev.client_addr_be[0], rev.client_port_be);
        let (front, front_port) = (rev.frontend_addr_be[0], rev.frontend_port_be);
        rewrite_v4(ctx, &p, front, front_port, client, client_port)?;
        return Ok(match route(ctx, front, client) {
            Some(out) => redirect(out),
            None => TC_ACT_SHOT,
        });
    }

    // Client -> frontend.
    let mut key = FrontendKey {
        addr_be: [p.daddr[0], 0, 0, 0],
        port_be: p.dport_be,
        proto: p.ip_proto,
        family: FAMILY_V4,
    };
    let frontend = match unsafe { FRONTENDS.get(key) } {
        Some(f) => *f,
        None => {
            // A VIP answers every port of TCP and UDP (port 0, protocol 0:
            // any), as Swarm's does.
            key.port_be = 0;
            key.proto = 0;
            if let Some(f) = unsafe { FRONTENDS.get(key) } {
                *f
            } else {
                if unsafe { NODE_ADDRS.get(key.addr_be) }.is_none() {
                    return Ok(other);
                }
                key.port_be = p.dport_be;
                key.proto = p.ip_proto;
                key.addr_be = [0; 4];
                match unsafe { FRONTENDS.get(key) } {
                    Some(f) => *f,
                    None => return Ok(other),
                }
            }
        }
    };

    let ct_ptr = CONNTRACK.get_ptr_mut(flow);
    // SAFETY: map value pointer, valid for the program's run.
    let mut ct = ct_ptr.map_or(CtEntry::default(), |c| unsafe { *c });
    // A bare SYN on a closed flow's entry is a new connection reusing the
    // client port (TIME_WAIT reuse): it gets a fresh pick and SNAT port.
    let reopened = p.ip_proto == IPPROTO_TCP
        && p.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN
        && ct.flags & CT_F_CLOSING != 0;
    let tracked = ct_ptr.is_some() && !reopened;
    let mut backend = if tracked {
        unsafe { BACKENDS.get(ct.backend_id) }.copied()
    } else {
        None
    };
    // No entry, or its backend was removed: (re-)steer with Maglev at once.
    let new_flow = backend.is_none();
    if new_flow {
        if frontend.backend_count == 0 || frontend.table_size == 0 {
            // No backend: answer as a closed port does, rather than let the
            // client wait out its timeouts.
            bump(&FRONTEND_STATS, frontend.id, bytes, false);
            return Ok(match reject::reject(ctx, &p, now) {
                Ok(reject::Rejected::Answered(verdict)) => {
                    if let Some(c) = FRONTEND_STATS.get_ptr_mut(frontend.id) {
                        // SAFETY: per-CPU slot, valid for the program's run.
                        unsafe { (*c).rejected += 1 };
                    }
                    verdict
                }
                Ok(reject::Rejected::Dropped) | Err(_) => reject::FAILED,
            });
        }
        let slot = flow_hash(&flow) % frontend.table_size;
        let Some(backend_id) = MAGLEV.get_value(frontend.id, &slot) else {
            return Ok(TC_ACT_SHOT);
        };
        ct.backend_id = *backend_id;
        ct.frontend_id = frontend.id;
        backend = unsafe { BACKENDS.get(ct.backend_id) }.copied();
    }
    let Some(mut backend) = backend else {
        return Ok(TC_ACT_SHOT);
    };
    // Port 0: the port the client asked for (a VIP's any-port frontend).
    if backend.port_be == 0 {
        backend.port_be = p.dport_be;
    }
    // The source is the node's address on the interface the backend is
    // routed out of (so replies come back here), else the node-wide one.
    let Some(out) = route(ctx, 0, backend.addr_be[0]) else {
        bump(&FRONTEND_STATS, frontend.id, bytes, false);
        return Ok(TC_ACT_SHOT);
    };
    let nat = match unsafe { NAT_IFACES.get(out) } {
        Some(a) if a[0] != 0 => *a,
        _ => cfg.nat_addr_be,
    };
    match ct_ptr {
        // The hot path: an established flow, same NAT address; touch it in place.
        Some(entry) if !new_flow && ct.nat_addr_be[0] == nat[0] => {
            // SAFETY: map value pointer, valid for the program's run.
            unsafe {
                (*entry).last_seen_ns = now;
                if closing {
                    (*entry).flags |= CT_F_CLOSING;
                }
            }
        }
        _ => {
            ct.nat_addr_be = nat;
            let Some(port) = claim_nat_port(&p, &backend, cfg, nat, now) else {
                bump(&FRONTEND_STATS, frontend.id, bytes, false);
                return Ok(TC_ACT_SHOT);
            };
            ct.nat_port_be = port;
            ct.flags = if closing { CT_F_CLOSING } else { 0 };
            ct.last_seen_ns = now;
            CONNTRACK.insert(flow, ct, 0)?;
        }
    }
    bump(&FRONTEND_STATS, frontend.id, bytes, new_flow);
    bump(&BACKEND_STATS, ct.backend_id, bytes, new_flow);
    rewrite_v4(
        ctx,
        &p,
        ct.nat_addr_be[0],
        ct.nat_port_be,
        backend.addr_be[0],
        backend.port_be,
    )?;
    Ok(redirect(out))
}

/// The verdict for a packet the program failed on: dropped on an overlay
/// bridge (fail closed: a pass there would route a task's packet past
/// network isolation), passed elsewhere (the underlay must keep working).
pub fn on_error(ctx: &TcContext) -> i32 {
    if nat_here(ctx) != 0 {
        TC_ACT_SHOT
    } else {
        TC_ACT_OK
    }
}

/// The node's own address on the interface the packet arrived on (0: none).
#[inline(always)]
fn nat_here(ctx: &TcContext) -> u32 {
    // SAFETY: the skb pointer is the program's context.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    unsafe { NAT_IFACES.get(ifindex) }.map_or(0, |a| a[0])
}

/// Reserves a SNAT port for this client flow towards `backend` and records the
/// reverse mapping. A port already mapped to this same client flow, or one
/// whose flow closed and went quiet, may be taken.
#[inline(always)]
fn claim_nat_port(
    p: &Parsed,
    backend: &Backend,
    cfg: &LbConfig,
    nat: [u32; 4],
    now: u64,
) -> Option<u16> {
    let count = u32::from(cfg.nat_port_count);
    if count == 0 {
        return None;
    }
    let rev = RevNat {
        client_addr_be: [p.saddr[0], 0, 0, 0],
        frontend_addr_be: [p.daddr[0], 0, 0, 0],
        client_port_be: p.sport_be,
        frontend_port_be: p.dport_be,
        flags: 0,
        last_seen_ns: now,
    };
    // Random start: a client reusing its port (TIME_WAIT reuse) must not land
    // on the 4-tuple its previous connection left in the backend's stack.
    let seed = unsafe { bpf_get_prandom_u32() };
    let mut key = FlowKey {
        saddr_be: backend.addr_be,
        daddr_be: nat,
        sport_be: backend.port_be,
        dport_be: 0,
        proto: p.ip_proto,
        family: FAMILY_V4,
        _pad: [0; 2],
    };
    let mut i = 0;
    while i < NAT_PORT_TRIES {
        let port = (u32::from(cfg.nat_port_min) + (seed.wrapping_add(i.wrapping_mul(7919)) % count))
            as u16;
        key.dport_be = port.to_be();
        if REVNAT.insert(key, rev, u64::from(BPF_NOEXIST)).is_ok() {
            return Some(key.dport_be);
        }
        if let Some(existing) = REVNAT.get_ptr_mut(key) {
            // SAFETY: map value pointer, valid for the program's run.
            let existing = unsafe { &mut *existing };
            let same_flow = existing.client_addr_be[0] == rev.client_addr_be[0]
                && existing.client_port_be == rev.client_port_be
                && existing.frontend_addr_be[0] == rev.frontend_addr_be[0]
                && existing.frontend_port_be == rev.frontend_port_be;
            // A port whose flow closed (FIN/RST seen) and went quiet may be
            // reused before the sweeper collects it.
            let reusable = existing.flags & CT_F_CLOSING != 0
                && now.saturating_sub(existing.last_seen_ns) > CLOSED_REUSE_NS;
            if same_flow || reusable {
                *existing = rev;
                return Some(key.dport_be);
            }
        }
        i += 1;
    }
    None
}

/// Rewrites source and destination of an IPv4 TCP/UDP packet, fixing the IP
/// and L4 checksums incrementally.
#[inline(always)]
fn rewrite_v4(
    ctx: &TcContext,
    p: &Parsed,
    saddr: u32,
    sport: u16,
    daddr: u32,
    dport: u16,
) -> Result<(), i64> {
    let l3 = p.l3_off as usize;
    let l4 = p.l4_off as usize;
    let (csum_off, mangle) = if p.ip_proto == IPPROTO_TCP {
        (l4 + 16, 0)
    } else {
        // A zero UDP checksum means "none": leave it so; never produce 0.
        (l4 + 6, BPF_F_MARK_MANGLED_0)
    };
    let pseudo = u64::from(BPF_F_PSEUDO_HDR);
    // (old, new, offset in the frame, size, part of the pseudo header)
    let fields: [(u32, u32, usize, u64, bool); 4] = [
        (p.saddr[0], saddr, l3 + 12, 4, true),
        (p.daddr[0], daddr, l3 + 16, 4, true),
        (u32::from(p.sport_be), u32::from(sport), l4, 2, false),
        (u32::from(p.dport_be), u32::from(dport), l4 + 2, 2, false),
    ];
    for (old, new, off, size, in_pseudo) in fields {
        if old == new {
            continue;
        }
        let flags = mangle | size | if in_pseudo { pseudo } else { 0 };
        ctx.l4_csum_replace(csum_off, u64::from(old), u64::from(new), flags)?;
        if in_pseudo {
            ctx.l3_csum_replace(l3 + 10, u64::from(old), u64::from(new), 4)?;
            ctx.store(off, &new, 0)?;
        } else {
            ctx.store(off, &(new as u16), 0)?;
        }
    }
    Ok(())
}

/// The device the route from `saddr` (0: any) to `daddr` leaves by.
#[inline(always)]
fn route(ctx: &TcContext, saddr: u32, daddr: u32) -> Option<u32> {
    // SAFETY: a zeroed bpf_fib_lookup is a valid request skeleton.
    let mut fib: FibParams = unsafe { core::mem::zeroed() };
    fib.family = AF_INET;
    // SAFETY: the skb pointer is the program's context.
    fib.ifindex = unsafe { (*ctx.skb.skb).ifindex };
    fib.__bindgen_anon_3.ipv4_src = saddr;
    fib.__bindgen_anon_4.ipv4_dst = daddr;
    // SAFETY: fib lives on our stack for the helper call.
    let rc = unsafe {
        bpf_fib_lookup(
            ctx.skb.skb as *mut _,
            &mut fib,
            core::mem::size_of::<FibParams>() as i32,
            0,
        )
    };
    if rc != BPF_FIB_LKUP_RET_SUCCESS && rc != BPF_FIB_LKUP_RET_NO_NEIGH {
        return None;
    }
    Some(fib.ifindex)
}

/// Sends the rewritten packet out of `ifindex`, resolving the next hop's
/// MAC in the kernel (bpf_redirect_neigh).
#[inline(always)]
fn redirect(ifindex: u32) -> i32 {
    // SAFETY: NULL params: the kernel resolves the neighbour on that device.
    unsafe { bpf_redirect_neigh(ifindex, core::ptr::null_mut(), 0, 0) as i32 }
}
