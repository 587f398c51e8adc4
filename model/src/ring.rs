//! The encrypted networks' key ring: how many keys it holds, which one
//! senders use, and what a rotation may add. The leader's key manager
//! (`control::keys`) decides when to rotate.

use std::time::Duration;

use crate::NetworkKey;

/// Keys in the ring.
pub const RING: usize = 3;
/// Swarm's rotation period.
pub const DEFAULT_ROTATION: Duration = Duration::from_secs(12 * 3600);
/// AES-128 key + 4-byte salt (rfc4106).
pub const SECRET_LEN: usize = 20;

/// The key senders use: the second newest (the only one while the ring has
/// one key).
pub fn primary(keys: &[NetworkKey]) -> Option<&NetworkKey> {
    match keys.len() {
        0 => None,
        1 => keys.first(),
        n => keys.get(n - 2),
    }
}

/// What the state accepts: well-formed keys with ids that follow the ring.
pub fn validate(ring: &[NetworkKey], new: &[NetworkKey]) -> Result<(), String> {
    if new.is_empty() || new.len() > RING {
        return Err(format!(
            "a rotation adds 1 to {RING} keys, not {}",
            new.len()
        ));
    }
    let mut last = ring.last().map_or(0, |k| k.id);
    for k in new {
        if k.secret.len() != SECRET_LEN {
            return Err(format!(
                "network key {} has {} bytes; AES-128-GCM with its salt needs {SECRET_LEN}",
                k.id,
                k.secret.len()
            ));
        }
        if k.id != last + 1 {
            return Err(format!(
                "network key {} does not follow key {last} (a concurrent rotation?)",
                k.id
            ));
        }
        last = k.id;
    }
    Ok(())
}
