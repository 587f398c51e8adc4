#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::xdp_action,
    macros::{classifier, map, xdp},
    maps::PerCpuArray,
    programs::{TcContext, XdpContext},
};
use dataplane_common::{Counter, outcome, proto};
use dataplane_ebpf::parse;

/// Per-protocol packet/byte counts (indexed by `dataplane_common::proto`).
#[map(name = "PROTO_STATS")]
static PROTO_STATS: PerCpuArray<Counter> = PerCpuArray::with_max_entries(proto::COUNT, 0);

/// Per-outcome packet/byte counts (indexed by `dataplane_common::outcome`).
#[map(name = "OUTCOME_STATS")]
static OUTCOME_STATS: PerCpuArray<Counter> = PerCpuArray::with_max_entries(outcome::COUNT, 0);

#[inline(always)]
fn bump(map: &PerCpuArray<Counter>, index: u32, bytes: u64) {
    if let Some(slot) = map.get_ptr_mut(index) {
        // SAFETY: a per-CPU slot is only touched by this CPU, and the pointer is
        // valid for the duration of the program.
        unsafe {
            (*slot).packets += 1;
            (*slot).bytes += bytes;
        }
    }
}

/// Parses every packet, counts it per protocol and per outcome, and passes it.
#[xdp]
pub fn xdp_parse(ctx: XdpContext) -> u32 {
    let parsed = parse::parse(&ctx);
    let bytes = (ctx.data_end() - ctx.data()) as u64;
    bump(&PROTO_STATS, parsed.l3_class, bytes);
    if parsed.l4_class != parse::NO_CLASS {
        bump(&PROTO_STATS, parsed.l4_class, bytes);
    }
    if parsed.vlan_tags > 0 {
        bump(&PROTO_STATS, proto::VLAN, bytes);
    }
    bump(&OUTCOME_STATS, parsed.outcome, bytes);
    xdp_action::XDP_PASS
}

/// Does nothing: the baseline `cargo xtask bench` measures against.
#[xdp]
pub fn xdp_pass(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

/// The L4 load balancer; see `dataplane_ebpf::lb`. An internal error
/// drops the packet on an overlay bridge (fail closed) and passes it on
/// the underlay.
#[classifier]
pub fn tc_lb(ctx: TcContext) -> i32 {
    match dataplane_ebpf::lb::try_lb(&ctx) {
        Ok(verdict) => verdict,
        Err(_) => dataplane_ebpf::lb::on_error(&ctx),
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
