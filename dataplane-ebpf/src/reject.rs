//! Answers for a frontend with no backend, as kube-proxy's REJECT gives
//! them: a TCP segment gets a RST, a UDP datagram an ICMP port unreachable
//! (type 3, code 3). The answer is built in place from the packet and sent
//! back out of the interface it arrived on, Ethernet addresses swapped.
//!
//! - A RST is never answered, nor a packet from a multicast, broadcast or
//!   zero source, nor one that came as an Ethernet group frame.
//! - The RST follows RFC 793: to a segment with ACK, `seq = its ack`;
//!   otherwise `RST|ACK` with `ack = seq + payload (+1 for SYN, FIN)`.
//! - The ICMP error quotes the IP header and the first 8 bytes of the
//!   datagram (RFC 792). A datagram whose IP header has options is dropped
//!   unanswered.
//! - Answers are limited per CPU, a GCRA of [`PER_SEC`] a second with a
//!   burst of [`BURST`] (the kernel limits its own ICMP errors the same
//!   way), so a node can't be used to reflect a flood; past the limit the
//!   packet is dropped.
//!
//! The caller counts what [`reject`] answered.

use aya_ebpf::{
    bindings::{BPF_CSUM_LEVEL_RESET, TC_ACT_SHOT},
    helpers::generated::{bpf_csum_level, bpf_redirect, bpf_skb_change_tail},
    macros::map,
    maps::PerCpuArray,
    programs::TcContext,
};

use crate::parse::{IPPROTO_TCP, IPPROTO_UDP, Parsed};

/// Answers a second, per CPU.
pub const PER_SEC: u64 = 1000;
/// Answers at once, per CPU.
pub const BURST: u64 = 100;
const INTERVAL_NS: u64 = 1_000_000_000 / PER_SEC;

/// Per CPU: the GCRA's theoretical arrival time, in ns.
#[map(name = "REJECT_BUDGET")]
static REJECT_BUDGET: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;
const IPPROTO_ICMP: u8 = 1;
const TTL: u8 = 64;

/// What became of a packet for a frontend with no backend.
pub enum Rejected {
    /// Answered: the verdict sends the answer back.
    Answered(i32),
    /// Dropped unanswered (not answerable, or over the limit).
    Dropped,
}

/// Turns the packet into its answer, or says why not. An error from a
/// helper leaves a half-written packet: the caller must drop it.
#[inline(always)]
pub fn reject(ctx: &TcContext, p: &Parsed, now: u64) -> Result<Rejected, i64> {
    let src = p.saddr[0].to_ne_bytes();
    // Never answer a group or unspecified source (RFC 1122 3.2.2).
    if src[0] >= 224 || src == [0; 4] {
        return Ok(Rejected::Dropped);
    }
    let eth_dst: u8 = ctx.load(0)?;
    if eth_dst & 1 != 0 {
        return Ok(Rejected::Dropped);
    }
    let answerable = match p.ip_proto {
        IPPROTO_TCP => p.tcp_flags & TCP_RST == 0,
        IPPROTO_UDP => p.l4_off - p.l3_off == 20,
        _ => false,
    };
    if !answerable || !allowed(now) {
        return Ok(Rejected::Dropped);
    }
    swap_macs(ctx)?;
    if p.ip_proto == IPPROTO_TCP {
        tcp_reset(ctx, p)?;
    } else {
        port_unreachable(ctx, p)?;
    }
    // Our checksums are whole. RESET turns a CHECKSUM_UNNECESSARY verdict
    // (the NIC's, for the packet we rewrote) into NONE, so the receiver
    // checks ours. It leaves COMPLETE and PARTIAL as they were: a stale
    // COMPLETE only makes the receiver verify in software (and may log a
    // csum fault); PARTIAL comes from a local socket through a veth, whose
    // peer trusts it. A NIC that finished a PARTIAL checksum in hardware
    // would spoil ours, but such packets are sent, not received, here.
    // SAFETY: the skb is the program's context.
    unsafe { bpf_csum_level(ctx.skb.skb, u64::from(BPF_CSUM_LEVEL_RESET)) };
    // SAFETY: as above.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    // SAFETY: a plain redirect to the device's egress.
    Ok(Rejected::Answered(
        unsafe { bpf_redirect(ifindex, 0) } as i32
    ))
}

/// The verdict for a packet whose answer failed half-way.
pub const FAILED: i32 = TC_ACT_SHOT;

#[inline(always)]
fn allowed(now: u64) -> bool {
    let Some(tat) = REJECT_BUDGET.get_ptr_mut(0) else {
        return false;
    };
    // SAFETY: a per-CPU slot, valid for the program's run.
    let tat = unsafe { &mut *tat };
    if *tat < now {
        *tat = now;
    }
    if *tat - now > (BURST - 1) * INTERVAL_NS {
        return false;
    }
    *tat += INTERVAL_NS;
    true
}

#[inline(always)]
fn swap_macs(ctx: &TcContext) -> Result<(), i64> {
    let macs: [u8; 12] = ctx.load(0)?;
    let mut out = [0u8; 12];
    let mut i = 0;
    while i < 6 {
        out[i] = macs[i + 6];
        out[i + 6] = macs[i];
        i += 1;
    }
    ctx.store(0, &out, 0)
}

/// The one's-complement sum of `bytes` (even length) added to `sum`.
#[inline(always)]
fn add(mut sum: u32, bytes: &[u8]) -> u32 {
    let mut i = 0;
    while i + 1 < bytes.len() {
        sum += u32::from(u16::from_be_bytes([bytes[i], bytes[i + 1]]));
        i += 2;
    }
    sum
}

#[inline(always)]
fn fold(mut sum: u32) -> [u8; 2] {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    (!(sum as u16)).to_be_bytes()
}

/// A 20-byte IPv4 header from `src` to `dst`, its checksum set.
#[inline(always)]
fn ipv4_header(proto: u8, total: u16, src: [u8; 4], dst: [u8; 4], df: bool) -> [u8; 20] {
    let mut ip = [0u8; 20];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&total.to_be_bytes());
    if df {
        ip[6] = 0x40;
    }
    ip[8] = TTL;
    ip[9] = proto;
    ip[12..16].copy_from_slice(&src);
    ip[16..20].copy_from_slice(&dst);
    let c = fold(add(0, &ip));
    ip[10..12].copy_from_slice(&c);
    ip
}

#[inline(always)]
fn tcp_reset(ctx: &TcContext, p: &Parsed) -> Result<(), i64> {
    let l3 = usize::from(p.l3_off);
    let l4 = usize::from(p.l4_off);
    let seq = u32::from_be(ctx.load::<u32>(l4 + 4)?);
    let ack = u32::from_be(ctx.load::<u32>(l4 + 8)?);
    let doff = u16::from(ctx.load::<u8>(l4 + 12)? >> 4) * 4;
    let payload = p.l3_end.saturating_sub(p.l4_off).saturating_sub(doff);
    let (rseq, rack, flags) = if p.tcp_flags & TCP_ACK != 0 {
        (ack, 0, TCP_RST)
    } else {
        let mut n = u32::from(payload);
        if p.tcp_flags & TCP_SYN != 0 {
            n += 1;
        }
        if p.tcp_flags & TCP_FIN != 0 {
            n += 1;
        }
        (0, seq.wrapping_add(n), TCP_RST | TCP_ACK)
    };
    // The answer's addresses: from the frontend, to the client.
    let (from, to) = (p.daddr[0].to_ne_bytes(), p.saddr[0].to_ne_bytes());
    let ip = ipv4_header(IPPROTO_TCP, 40, from, to, true);
    let mut tcp = [0u8; 20];
    tcp[0..2].copy_from_slice(&u16::from_be(p.dport_be).to_be_bytes());
    tcp[2..4].copy_from_slice(&u16::from_be(p.sport_be).to_be_bytes());
    tcp[4..8].copy_from_slice(&rseq.to_be_bytes());
    tcp[8..12].copy_from_slice(&rack.to_be_bytes());
    tcp[12] = 0x50;
    tcp[13] = flags;
    let mut sum = add(0, &from);
    sum = add(sum, &to);
    sum += u32::from(IPPROTO_TCP) + 20;
    let c = fold(add(sum, &tcp));
    tcp[16..18].copy_from_slice(&c);
    change_tail(ctx, l3 + 40)?;
    ctx.store(l3, &ip, 0)?;
    ctx.store(l3 + 20, &tcp, 0)
}

#[inline(always)]
fn port_unreachable(ctx: &TcContext, p: &Parsed) -> Result<(), i64> {
    let l3 = usize::from(p.l3_off);
    // The quote: the datagram's IP header (no options) and UDP header.
    let quote: [u8; 28] = ctx.load(l3)?;
    let (from, to) = (p.daddr[0].to_ne_bytes(), p.saddr[0].to_ne_bytes());
    let ip = ipv4_header(IPPROTO_ICMP, 56, from, to, false);
    let mut icmp = [0u8; 8];
    icmp[0] = 3;
    icmp[1] = 3;
    let c = fold(add(add(0, &icmp), &quote));
    icmp[2..4].copy_from_slice(&c);
    change_tail(ctx, l3 + 56)?;
    ctx.store(l3, &ip, 0)?;
    ctx.store(l3 + 20, &icmp, 0)?;
    ctx.store(l3 + 28, &quote, 0)
}

#[inline(always)]
fn change_tail(ctx: &TcContext, len: usize) -> Result<(), i64> {
    // SAFETY: the skb is the program's context.
    let rc = unsafe { bpf_skb_change_tail(ctx.skb.skb, len as u32, 0) };
    if rc < 0 { Err(rc) } else { Ok(()) }
}
