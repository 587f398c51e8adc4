//! Conntrack idle timeouts: Swarm's 900 s cut does not apply, closing TCP
//! and UDP expire sooner, a clock behind never expires.

use super::*;

const S: u64 = 1_000_000_000;

#[test]
fn idle_tcp_survives_swarms_900_seconds() {
    let t = Timeouts::default();
    assert!(!t.expired(6, false, 0, 901 * S), "cut at Swarm's 900 s");
    assert!(!t.expired(6, false, 0, 7200 * S));
    assert!(t.expired(6, false, 0, 7201 * S));
}

#[test]
fn closing_tcp_and_udp_expire_sooner() {
    let t = Timeouts::default();
    assert!(t.expired(6, true, 100 * S, 111 * S));
    assert!(!t.expired(17, false, 100 * S, 159 * S));
    assert!(t.expired(17, false, 100 * S, 161 * S));
    assert!(
        !t.expired(6, false, 500 * S, 100 * S),
        "a clock behind last_seen never expires"
    );
}
