//! The key manager of encrypted overlay networks, after Swarm's: the leader
//! keeps a ring of [`RING`] keys and adds a new one every rotation period,
//! dropping the oldest. Agents accept all keys of the ring and send with the
//! [`primary`] one, the second newest. A rotation therefore only ever moves
//! senders to a key every receiver already accepted one rotation earlier,
//! and receivers keep accepting the previous primary: no node applying the
//! new ring before or after another loses a packet.
//!
//! The ring is part of the Raft state (sealed at rest with the rest of it)
//! and reaches agents as one entry of the tables, over their mTLS sessions.

use ring::rand::{SecureRandom as _, SystemRandom};

use crate::state::{NetworkKey, State};

pub use model::ring::{DEFAULT_ROTATION, RING, SECRET_LEN, primary, validate};

/// How many keys the leader should add now: the ring filled at once while
/// an encrypted network exists, then one per rotation period (`None`:
/// nothing to do).
pub fn due(state: &State, now_ms: u64) -> Option<usize> {
    if !state.networks.values().any(|n| n.spec.encrypted) {
        return None;
    }
    let keys = &state.network_keys;
    if keys.len() < RING {
        return Some(RING - keys.len());
    }
    let period = state
        .settings
        .as_ref()
        .map_or(DEFAULT_ROTATION.as_secs(), |s| s.network_key_rotation_secs)
        .saturating_mul(1000);
    let newest = keys.last().map_or(0, |k| k.created_ms);
    (now_ms >= newest.saturating_add(period)).then_some(1)
}

/// When the next rotation is due, if the ring is full.
pub fn next_rotation_ms(state: &State) -> Option<u64> {
    let newest = state.network_keys.last()?;
    let period = state.settings.as_ref()?.network_key_rotation_secs;
    state.networks.values().any(|n| n.spec.encrypted).then(|| {
        newest
            .created_ms
            .saturating_add(period.saturating_mul(1000))
    })
}

/// `n` fresh random keys following the ring's newest.
pub fn generate(state: &State, n: usize, now_ms: u64) -> Result<Vec<NetworkKey>, String> {
    let rng = SystemRandom::new();
    let first = state.network_keys.last().map_or(1, |k| k.id + 1);
    (0..n)
        .map(|i| {
            let mut secret = vec![0u8; SECRET_LEN];
            rng.fill(&mut secret)
                .map_err(|_| "the system random source failed".to_owned())?;
            Ok(NetworkKey {
                id: first + i as u32,
                secret,
                created_ms: now_ms,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{ClusterSettings, Command, NetworkSpec};

    fn init(s: &mut State) {
        s.apply(&Command::Init {
            cluster_id: "c1".into(),
            ingress_id: "ing".into(),
            settings: ClusterSettings::default(),
            secrets: None,
        })
        .unwrap();
    }

    fn state_with_encrypted() -> State {
        let mut s = State::default();
        init(&mut s);
        s.apply(&Command::CreateNetwork {
            id: "n1".into(),
            spec: NetworkSpec {
                name: "secret".into(),
                encrypted: true,
                ..NetworkSpec::default()
            },
        })
        .unwrap();
        s
    }

    #[test]
    fn the_ring_fills_rotates_and_keeps_three_with_the_second_newest_primary() {
        let mut s = State::default();
        init(&mut s);
        assert_eq!(due(&s, 0), None, "no encrypted network, no keys");
        let mut s = state_with_encrypted();
        assert_eq!(due(&s, 0), Some(3));
        let keys = generate(&s, 3, 1_000).unwrap();
        assert_ne!(keys[0].secret, keys[1].secret);
        s.apply(&Command::RotateNetworkKeys { keys }).unwrap();
        assert_eq!(primary(&s.network_keys).unwrap().id, 2);
        let period = DEFAULT_ROTATION.as_millis() as u64;
        assert_eq!(due(&s, 1_000 + period - 1), None);
        assert_eq!(next_rotation_ms(&s), Some(1_000 + period));
        assert_eq!(due(&s, 1_000 + period), Some(1));
        let next = generate(&s, 1, 1_000 + period).unwrap();
        s.apply(&Command::RotateNetworkKeys { keys: next }).unwrap();
        let ids: Vec<u32> = s.network_keys.iter().map(|k| k.id).collect();
        assert_eq!(ids, [2, 3, 4], "the oldest went");
        assert_eq!(primary(&s.network_keys).unwrap().id, 3);
    }

    #[test]
    fn malformed_or_stale_keys_are_refused_and_change_nothing() {
        let mut s = state_with_encrypted();
        let mut short = generate(&s, 1, 0).unwrap();
        short[0].secret.truncate(16);
        let e = s
            .apply(&Command::RotateNetworkKeys { keys: short })
            .unwrap_err()
            .to_string();
        assert!(e.contains("needs 20"), "{e}");
        let keys = generate(&s, 1, 0).unwrap();
        s.apply(&Command::RotateNetworkKeys { keys: keys.clone() })
            .unwrap();
        // The same rotation again (two leaders' worth): refused.
        let e = s
            .apply(&Command::RotateNetworkKeys { keys })
            .unwrap_err()
            .to_string();
        assert!(e.contains("does not follow"), "{e}");
        assert_eq!(s.network_keys.len(), 1);
    }
}
