//! Keys both ends derive without talking (SPIs, per-SA secrets), the record
//! of out SAs sent with ([`SentRecord`]), and the key a pair sends with.

use std::{collections::BTreeSet, net::Ipv4Addr, path::Path};

use serde::{Deserialize, Serialize};

use super::{
    error::IpsecError,
    spec::{IpsecSpec, SaKey},
};

/// The SPI of the SA from `src` to `dst` with key `key`: the same on both
/// ends, different per direction and pair, never in the reserved 0..256.
pub fn spi(src: Ipv4Addr, dst: Ipv4Addr, key: u32) -> u32 {
    let mut input = Vec::with_capacity(20);
    input.extend_from_slice(b"mesh-esp");
    input.extend_from_slice(&src.octets());
    input.extend_from_slice(&dst.octets());
    input.extend_from_slice(&key.to_be_bytes());
    let d = ring::digest::digest(&ring::digest::SHA256, &input);
    let v = u32::from_be_bytes(d.as_ref()[..4].try_into().expect("4 bytes"));
    if v < 0x100 { v + 0x100 } else { v }
}

/// The key (and salt) of the SA from `src` to `dst` with ring key `id`:
/// HKDF-SHA256 of the ring's secret, bound to the pair, the direction and
/// the key id. Both ends derive the same; no two SAs share a key, so the
/// GCM nonces (the ESP sequence number under one salt) never repeat under
/// one key across SAs.
pub fn sa_secret(ring_secret: &[u8], src: Ipv4Addr, dst: Ipv4Addr, id: u32) -> Vec<u8> {
    struct Len(usize);
    impl ring::hkdf::KeyType for Len {
        fn len(&self) -> usize {
            self.0
        }
    }
    let mut info = Vec::with_capacity(20);
    info.extend_from_slice(b"mesh-esp-sa");
    info.extend_from_slice(&src.octets());
    info.extend_from_slice(&dst.octets());
    info.extend_from_slice(&id.to_be_bytes());
    let prk = ring::hkdf::Salt::new(ring::hkdf::HKDF_SHA256, b"mesh").extract(ring_secret);
    let mut out = vec![0u8; ring_secret.len()];
    let info = [info.as_slice()];
    prk.expand(&info, Len(out.len()))
        .and_then(|okm| okm.fill(&mut out))
        .expect("HKDF-SHA256 expands 20 bytes");
    out
}

/// The out SAs this node has sent with, and those of them made again
/// since (spent: a peer's replay window is past their new sequence
/// numbers). Saved as JSON when given a path; entries go with their key.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SentRecord {
    pub sent: BTreeSet<SaKey>,
    pub spent: BTreeSet<SaKey>,
}

impl SentRecord {
    pub(super) fn load(path: &Path) -> SentRecord {
        match std::fs::read(path) {
            Ok(b) => serde_json::from_slice(&b).unwrap_or_else(|e| {
                // Unreadable: every SA looks unsent. A pair may then wait
                // out its peer's window once; nothing worse.
                tracing::warn!(path = %path.display(), "ignoring an unreadable IPsec record: {e}");
                SentRecord::default()
            }),
            Err(_) => SentRecord::default(),
        }
    }

    /// Durable when it returns: the file and its directory are synced,
    /// as a record lost to a power cut would let sequences restart.
    pub(super) fn save(&self, path: &Path) -> Result<(), IpsecError> {
        use std::io::Write;
        let tmp = path.with_extension("tmp");
        let bytes = serde_json::to_vec(self).expect("a record of addresses and numbers serializes");
        let dir = path.parent().unwrap_or(Path::new("."));
        std::fs::File::create(&tmp)
            .and_then(|mut f| {
                f.write_all(&bytes)?;
                f.sync_all()
            })
            .and_then(|()| std::fs::rename(&tmp, path))
            .and_then(|()| std::fs::File::open(dir)?.sync_all())
            .map_err(|source| IpsecError::Record {
                path: path.to_owned(),
                source,
            })
    }
}

/// The key a pair sends with: the primary, unless its out SA was made
/// again after being sent with; then the next newer key not spent. `None`
/// with no usable key; `(id, true)` when every candidate is spent.
pub(super) fn sending_key(
    spec: &IpsecSpec,
    local: Ipv4Addr,
    peer: Ipv4Addr,
    spent: &BTreeSet<SaKey>,
) -> Option<(u32, bool)> {
    let primary = spec.primary.filter(|p| spec.keys.contains_key(p))?;
    let fresh = spec
        .keys
        .keys()
        .copied()
        .filter(|&id| id >= primary)
        .find(|&id| {
            !spent.contains(&SaKey {
                src: local,
                dst: peer,
                spi: spi(local, peer, id),
            })
        });
    Some(fresh.map_or((primary, true), |id| (id, false)))
}
