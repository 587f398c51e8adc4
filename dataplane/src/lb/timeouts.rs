//! [`Timeouts`]: how long an idle flow keeps its conntrack entry, per
//! protocol and state, for the userspace sweeper.

use serde::{Deserialize, Serialize};

use super::spec::Protocol;

/// Idle timeouts for the userspace conntrack sweeper.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Timeouts {
    /// Established TCP. Swarm's IPVS cut idle flows at 900 s (moby #31208);
    /// we default to 2 h, like the kernel's own conntrack.
    #[serde(default = "default_tcp_idle")]
    pub tcp_idle_s: u64,
    /// TCP after a FIN or RST was seen.
    #[serde(default = "default_tcp_closing")]
    pub tcp_closing_s: u64,
    #[serde(default = "default_udp_idle")]
    pub udp_idle_s: u64,
}

fn default_tcp_idle() -> u64 {
    7200
}
fn default_tcp_closing() -> u64 {
    10
}
fn default_udp_idle() -> u64 {
    60
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            tcp_idle_s: default_tcp_idle(),
            tcp_closing_s: default_tcp_closing(),
            udp_idle_s: default_udp_idle(),
        }
    }
}

impl Timeouts {
    /// Whether a flow last seen at `last_seen_ns` (CLOCK_MONOTONIC, as
    /// bpf_ktime_get_ns) is idle past its timeout at `now_ns`.
    pub fn expired(&self, proto: u8, closing: bool, last_seen_ns: u64, now_ns: u64) -> bool {
        let timeout_s = match (Protocol::from_number(proto), closing) {
            (Some(Protocol::Tcp), false) => self.tcp_idle_s,
            (Some(Protocol::Tcp), true) => self.tcp_closing_s,
            _ => self.udp_idle_s,
        };
        now_ns.saturating_sub(last_seen_ns) > timeout_s.saturating_mul(1_000_000_000)
    }
}
