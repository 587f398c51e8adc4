//! The ids and timestamps a proposer puts in commands (the state machine
//! itself never draws randomness or reads the clock: replicas must agree).

/// A new random id: 25 characters of [0-9a-z], like Swarm's.
pub fn new_id() -> String {
    use ring::rand::{SecureRandom, SystemRandom};
    let mut raw = [0u8; 25];
    SystemRandom::new().fill(&mut raw).expect("system random");
    raw.iter()
        .map(|b| char::from(b"0123456789abcdefghijklmnopqrstuvwxyz"[(*b % 36) as usize]))
        .collect()
}

/// A new node id: 16 hex digits, which are also its Raft id.
pub fn new_node_id() -> String {
    use ring::rand::{SecureRandom, SystemRandom};
    loop {
        let mut raw = [0u8; 8];
        SystemRandom::new().fill(&mut raw).expect("system random");
        let n = u64::from_be_bytes(raw);
        if n != 0 {
            return format!("{n:016x}");
        }
    }
}

/// The leader's clock, as the state records it (ms since the Unix epoch).
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
