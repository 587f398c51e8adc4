//! Encrypted overlay networks: ESP transport mode (rfc4106 AES-GCM) for the
//! VXLAN traffic of `--opt encrypted` networks between every pair of nodes,
//! as Swarm does it:
//!
//! - **XFRM states**, per peer and per key of the ring: one out (us → peer)
//!   and one in (peer → us). SPIs are derived from the pair, the direction
//!   and the key id ([`spi`]), so both ends agree without talking.
//! - **XFRM policy**, one per peer: VXLAN (UDP 4789) from us to the peer
//!   carrying [`ENCRYPT_MARK`] must go through ESP with the *primary* key's
//!   SPI. A rotation adds the new key's states first, then moves the policy
//!   to the new SPI, then drops the states of keys that left the ring.
//! - **Sequence numbers never restart under a peer's replay window.** A
//!   peer keeps the highest sequence number it saw per SA; an out SA made
//!   again (drift repair, a reboot, `meshd down`) starts at 1 and would be
//!   dropped as replays until it passed that number. So every out SA this
//!   node has sent with is recorded ([`SentRecord`], in the data dir:
//!   reboots too). One made again is *spent*: its pair sends with the next
//!   newer key of the ring instead, whose SAs no one has sent with (the
//!   peer accepts every key of the ring). When the ring turns, the pair
//!   moves on as the others do. Only two re-creations within one rotation
//!   period leave no fresh key (logged; the pair then waits out the window).
//! - **nftables** (`ip mesh_ipsec`): marks VXLAN packets of encrypted VNIs
//!   in output (the reroute applies the policy), drops such packets that
//!   would leave without IPsec (`rt ipsec missing`: a missing key or policy
//!   never means plaintext), and drops such packets that arrive without
//!   having been decrypted (`meta secpath missing`).
//!
//! Programmed through XFRM netlink with netlink-packet-xfrm's message
//! types over our small socket ([`crate::nlsock`]).

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr},
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

use netlink_packet_core::{Emitable, Parseable};
use netlink_packet_xfrm::{
    Address, AlgAead, IPPROTO_ESP, Id, LifetimeConfig, Mark, Selector, UserPolicyId,
    UserPolicyInfo, UserSaId, UserSaInfo, UserTemplate, XFRM_MODE_TRANSPORT, XFRM_MSG_DELPOLICY,
    XFRM_MSG_DELSA, XFRM_MSG_GETPOLICY, XFRM_MSG_GETSA, XFRM_MSG_NEWSA, XFRM_MSG_UPDPOLICY,
    XFRM_POLICY_ALLOW, XFRM_POLICY_OUT, XfrmAttrs,
    policy::{DelGetMessage as PolicyDel, ModifyMessage as PolicyModify},
    state::{DelGetMessage as SaDel, ModifyMessage as SaModify},
};

use crate::{
    netlink::VXLAN_PORT,
    nlsock::{NLM_F_DUMP, NlError, NlSocket},
};

/// Set on an encrypted network's VXLAN packets; the policies match it.
pub const ENCRYPT_MARK: u32 = 0x0040_0000;
/// Marks our states and policies' templates (ASCII "mesh").
pub const REQID: u32 = 0x6d65_7368;
const AEAD: &str = "rfc4106(gcm(aes))";
const ICV_BITS: u32 = 128;
const REPLAY_WINDOW: u8 = 64;
const NFT_TABLE: &str = "mesh_ipsec";

/// What this node's IPsec should be.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IpsecSpec {
    /// This node's underlay address.
    pub local: Option<Ipv4Addr>,
    /// Nodes it shares an encrypted network with.
    pub peers: BTreeSet<Ipv4Addr>,
    /// The encrypted networks' VNIs this node is on.
    pub vnis: BTreeSet<u32>,
    /// Key id -> secret (key + salt), and the id senders use.
    pub keys: BTreeMap<u32, Vec<u8>>,
    pub primary: Option<u32>,
}

impl IpsecSpec {
    /// Nothing to protect and nothing to drop.
    pub fn is_empty(&self) -> bool {
        self.vnis.is_empty()
    }

    /// This spec, still covering the VNIs and peers of `before` (applied
    /// while the overlay may still carry them).
    pub fn widened(&self, before: &IpsecSpec) -> IpsecSpec {
        let mut w = self.clone();
        if w.local.is_none() {
            w.local = before.local;
        }
        w.vnis.extend(before.vnis.iter().copied());
        if w.local == before.local {
            w.peers.extend(before.peers.iter().copied());
        }
        w
    }
}

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

/// An XFRM operation, with the peer and SPI it concerns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum XfrmOp {
    ListStates,
    ListPolicies,
    AddState(SaKey),
    DeleteState(SaKey),
    SetPolicy {
        local: Ipv4Addr,
        peer: Ipv4Addr,
        spi: u32,
    },
    DeletePolicy {
        local: Ipv4Addr,
        peer: Ipv4Addr,
    },
}

impl std::fmt::Display for XfrmOp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            XfrmOp::ListStates => write!(f, "list XFRM states"),
            XfrmOp::ListPolicies => write!(f, "list XFRM policies"),
            XfrmOp::AddState(k) => write!(
                f,
                "add ESP state {} -> {} spi {:#010x}",
                k.src, k.dst, k.spi
            ),
            XfrmOp::DeleteState(k) => {
                write!(
                    f,
                    "delete ESP state {} -> {} spi {:#010x}",
                    k.src, k.dst, k.spi
                )
            }
            XfrmOp::SetPolicy { local, peer, spi } => {
                write!(f, "set the ESP policy {local} -> {peer} (spi {spi:#010x})")
            }
            XfrmOp::DeletePolicy { local, peer } => {
                write!(f, "delete the ESP policy {local} -> {peer}")
            }
        }
    }
}

/// The kernel refused an XFRM request: what was asked, and why, with what
/// a missing kernel feature would explain.
#[derive(Debug, thiserror::Error)]
#[error("{op}: {source}{}", hint(source.raw_os_error()))]
pub struct XfrmError {
    pub op: XfrmOp,
    #[source]
    pub source: std::io::Error,
}

impl XfrmError {
    pub fn errno(&self) -> Option<i32> {
        self.source.raw_os_error()
    }
}

fn hint(errno: Option<i32>) -> String {
    match errno {
        Some(libc::EPROTONOSUPPORT) | Some(libc::ENOPROTOOPT) => {
            " (this kernel has no ESP or no XFRM netlink: CONFIG_INET_ESP, CONFIG_XFRM_USER)".into()
        }
        Some(libc::ENOENT) | Some(libc::ENOSYS) => {
            format!(" (this kernel has no {AEAD} for ESP: CONFIG_CRYPTO_GCM, CONFIG_INET_ESP)")
        }
        _ => String::new(),
    }
}

/// Why IPsec is not as asked. What was applied before the failure stays,
/// and the next apply retries the rest.
#[derive(Debug, thiserror::Error)]
pub enum IpsecError {
    #[error("opening an XFRM netlink socket: {0} (this kernel has no CONFIG_XFRM_USER)")]
    Socket(#[source] std::io::Error),
    #[error(transparent)]
    Xfrm(#[from] XfrmError),
    #[error("nftables {NFT_TABLE}: {0}")]
    Nft(#[source] crate::nft::NftError),
    #[error("saving {path}: {source}")]
    Record {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot make a namespace to test ESP in: {0}")]
    ProbeNamespace(#[source] std::io::Error),
    #[error("the ESP probe panicked")]
    ProbePanicked,
}

/// One SA we keep: its endpoints and SPI (the key is its identity's part).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct SaKey {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub spi: u32,
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
    fn load(path: &Path) -> SentRecord {
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
    fn save(&self, path: &Path) -> Result<(), IpsecError> {
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
fn sending_key(
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

/// Counts of what one apply changed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IpsecReport {
    pub states_added: usize,
    pub states_updated: usize,
    pub states_removed: usize,
    pub policies_set: usize,
    pub policies_removed: usize,
    pub nft_writes: usize,
    /// Out states made again after they were sent with (see the module doc).
    pub states_spent: usize,
}

impl IpsecReport {
    pub fn total(&self) -> usize {
        self.states_added
            + self.states_updated
            + self.states_removed
            + self.policies_set
            + self.policies_removed
            + self.nft_writes
    }
}

/// Keeps this namespace's XFRM and nftables equal to an [`IpsecSpec`],
/// writing only differences.
pub struct Ipsec {
    sock: NlSocket,
    /// Our states as the kernel has them: SA -> secret.
    states: BTreeMap<SaKey, Vec<u8>>,
    /// Our policies: peer -> (local, the SPI its template names).
    policies: BTreeMap<Ipv4Addr, (Ipv4Addr, u32)>,
    /// The VNIs the nftables table is written for (`None`: unknown).
    vnis: Option<BTreeSet<u32>>,
    /// The spec the last apply fully wrote: the same one again writes
    /// nothing and derives no key (every table update asks).
    applied: Option<IpsecSpec>,
    record: SentRecord,
    /// Where `record` is saved (none: kept in memory).
    record_path: Option<PathBuf>,
}

fn addr(a: Ipv4Addr) -> Address {
    Address::from_ipv4(&a)
}

/// The kernel's refusal of `op`.
fn refused(op: XfrmOp) -> impl FnOnce(NlError) -> XfrmError {
    move |e| XfrmError {
        op,
        source: e.source,
    }
}

fn selector(local: Ipv4Addr, peer: Ipv4Addr) -> Selector {
    let mut sel = Selector::default();
    sel.source_prefix(&IpAddr::V4(local), 32);
    sel.destination_prefix(&IpAddr::V4(peer), 32);
    sel.proto = libc::IPPROTO_UDP as u8;
    sel.dport = VXLAN_PORT;
    sel.dport_mask = 0xffff;
    sel
}

fn mark() -> XfrmAttrs {
    XfrmAttrs::Mark(Mark {
        value: ENCRYPT_MARK,
        mask: ENCRYPT_MARK,
    })
}

fn emit(msg: &impl Emitable) -> Vec<u8> {
    let mut buf = vec![0u8; msg.buffer_len()];
    msg.emit(&mut buf);
    buf
}

impl Ipsec {
    /// Opens XFRM in this namespace and reads back what an earlier meshd
    /// installed (our reqid, our mark), so a restart rewrites nothing.
    /// `record`: where the SAs sent with are kept (see the module doc).
    pub fn open(record: Option<&Path>) -> Result<Ipsec, IpsecError> {
        let sock = NlSocket::open(libc::NETLINK_XFRM).map_err(IpsecError::Socket)?;
        let mut me = Ipsec {
            sock,
            states: BTreeMap::new(),
            policies: BTreeMap::new(),
            vnis: None,
            applied: None,
            record: record.map(SentRecord::load).unwrap_or_default(),
            record_path: record.map(Path::to_owned),
        };
        me.read_back()?;
        Ok(me)
    }

    /// Reads our states and policies from the kernel; on failure, what was
    /// known before is kept.
    fn read_back(&mut self) -> Result<(), XfrmError> {
        let mut states = BTreeMap::new();
        let mut found = BTreeMap::new();
        let sas = self
            .sock
            .request(XFRM_MSG_GETSA, NLM_F_DUMP, &[], || {
                XfrmOp::ListStates.to_string()
            })
            .map_err(refused(XfrmOp::ListStates))?;
        for body in sas {
            let Ok(m) = SaModify::parse(&body) else {
                continue;
            };
            let i = &m.user_sa_info;
            if i.reqid != REQID || i.family != libc::AF_INET as u16 {
                continue;
            }
            let secret = m
                .nlas
                .iter()
                .find_map(|a| match a {
                    XfrmAttrs::EncryptionAlgAead(k) => Some(k.alg_key.clone()),
                    _ => None,
                })
                .unwrap_or_default();
            states.insert(
                SaKey {
                    src: i.saddr.to_ipv4(),
                    dst: i.id.daddr.to_ipv4(),
                    spi: i.id.spi,
                },
                secret,
            );
        }
        let policies = self
            .sock
            .request(XFRM_MSG_GETPOLICY, NLM_F_DUMP, &[], || {
                XfrmOp::ListPolicies.to_string()
            })
            .map_err(refused(XfrmOp::ListPolicies))?;
        for body in policies {
            let Ok(m) = PolicyModify::parse(&body) else {
                continue;
            };
            let ours_mark = m.nlas.iter().any(|a| {
                matches!(a, XfrmAttrs::Mark(k) if k.value == ENCRYPT_MARK && k.mask == ENCRYPT_MARK)
            });
            let tmpl = m.nlas.iter().find_map(|a| match a {
                XfrmAttrs::Template(t) => t.first().cloned(),
                _ => None,
            });
            if let (true, Some(t)) = (ours_mark, tmpl)
                && t.reqid == REQID
                && m.user_policy_info.direction == XFRM_POLICY_OUT
            {
                let sel = &m.user_policy_info.selector;
                found.insert(sel.daddr.to_ipv4(), (sel.saddr.to_ipv4(), t.id.spi));
            }
        }
        self.states = states;
        self.policies = found;
        Ok(())
    }

    /// The states and policies installed now (for tests and `inspect`).
    pub fn installed(&self) -> (Vec<SaKey>, Vec<(Ipv4Addr, u32)>) {
        (
            self.states.keys().copied().collect(),
            self.policies.iter().map(|(p, (_, s))| (*p, *s)).collect(),
        )
    }

    /// Makes the kernel match `spec`: new keys' states first, then the
    /// policies (to the primary key), then old states go; nftables when the
    /// encrypted VNIs change. Errors name the object; what was applied
    /// stays, and the next apply retries the rest.
    pub fn apply(&mut self, spec: &IpsecSpec) -> Result<IpsecReport, IpsecError> {
        if self.applied.as_ref() == Some(spec) {
            return Ok(IpsecReport::default());
        }
        let applied = self.write(spec)?;
        self.applied = Some(spec.clone());
        Ok(applied)
    }

    fn write(&mut self, spec: &IpsecSpec) -> Result<IpsecReport, IpsecError> {
        self.applied = None;
        let mut report = IpsecReport::default();
        // The drop rules come first: from here on no plaintext VXLAN of an
        // encrypted VNI enters or leaves, whatever else fails.
        if self.vnis.as_ref() != Some(&spec.vnis) {
            crate::nft::run(&nft_ruleset(&spec.vnis)).map_err(IpsecError::Nft)?;
            self.vnis = Some(spec.vnis.clone());
            report.nft_writes += 1;
        }
        let mut want: BTreeMap<SaKey, Vec<u8>> = BTreeMap::new();
        let mut policies: BTreeMap<Ipv4Addr, (Ipv4Addr, u32)> = BTreeMap::new();
        if let (Some(local), false) = (spec.local, spec.vnis.is_empty()) {
            for &peer in &spec.peers {
                for (&id, secret) in &spec.keys {
                    for (src, dst) in [(local, peer), (peer, local)] {
                        want.insert(
                            SaKey {
                                src,
                                dst,
                                spi: spi(src, dst, id),
                            },
                            sa_secret(secret, src, dst, id),
                        );
                    }
                }
            }
        }
        // The record is durable before the kernel acts on it: a state sent
        // with before is marked spent before it is made again, and a pair's
        // out SA is marked sent before the policy points traffic at it. A
        // crash between the two steps then costs at most a fresh key, never
        // a sequence restarted under a peer's replay window.
        let mut record = self.record.clone();
        for (k, secret) in &want {
            if self.states.get(k) != Some(secret)
                && record.sent.contains(k)
                && record.spent.insert(*k)
            {
                tracing::info!(src = %k.src, dst = %k.dst, spi = format_args!("{:#x}", k.spi),
                    "an ESP state sent with before is made again; its pair moves to a newer key");
                report.states_spent += 1;
            }
        }
        self.keep_record(record.clone())?;
        for (k, secret) in &want {
            match self.states.get(k) {
                Some(s) if s == secret => continue,
                Some(_) => {
                    // XFRM cannot change a state's key in place
                    // (XFRM_MSG_UPDSA keeps it): replace the state.
                    self.del_state(k)?;
                    self.states.remove(k);
                    self.set_state(k, secret)?;
                    report.states_updated += 1;
                }
                None => {
                    self.set_state(k, secret)?;
                    report.states_added += 1;
                }
            }
            self.states.insert(*k, secret.clone());
        }
        if let (Some(local), false) = (spec.local, spec.vnis.is_empty()) {
            for &peer in &spec.peers {
                if let Some((id, stale)) = sending_key(spec, local, peer, &record.spent) {
                    if stale {
                        tracing::warn!(%peer, key = id,
                            "every key to this peer was sent with and made again: its replay \
                             window drops packets until the sequence passes it (the next \
                             rotation ends this)");
                    }
                    policies.insert(peer, (local, spi(local, peer, id)));
                }
            }
        }
        for (&peer, &(local, spi)) in &policies {
            record.sent.insert(SaKey {
                src: local,
                dst: peer,
                spi,
            });
        }
        self.keep_record(record.clone())?;
        for (&peer, &(local, spi)) in &policies {
            if self.policies.get(&peer) == Some(&(local, spi)) {
                continue;
            }
            self.set_policy(local, peer, spi)?;
            self.policies.insert(peer, (local, spi));
            report.policies_set += 1;
        }
        // Entries go with their key: once no key of the ring makes an SA's
        // SPI, that SA can never be made again. Not with an empty ring (the
        // keys are not known yet, as after a reboot): forgetting then would
        // restart sequences the peers remember. A peer that left keeps its
        // entries until their keys leave the ring, as its SAs may return.
        if !spec.keys.is_empty() {
            let live = |k: &SaKey| spec.keys.keys().any(|&id| spi(k.src, k.dst, id) == k.spi);
            record.sent.retain(live);
            record.spent.retain(live);
        }
        self.keep_record(record)?;
        let stale: Vec<(Ipv4Addr, Ipv4Addr)> = self
            .policies
            .iter()
            .filter(|(p, v)| policies.get(p) != Some(v))
            .map(|(p, (l, _))| (*p, *l))
            .collect();
        for (peer, local) in stale {
            self.del_policy(local, peer)?;
            self.policies.remove(&peer);
            report.policies_removed += 1;
        }
        let old: Vec<SaKey> = self
            .states
            .keys()
            .filter(|k| !want.contains_key(k))
            .copied()
            .collect();
        for k in old {
            self.del_state(&k)?;
            self.states.remove(&k);
            report.states_removed += 1;
        }
        Ok(report)
    }

    fn keep_record(&mut self, record: SentRecord) -> Result<(), IpsecError> {
        if record == self.record {
            return Ok(());
        }
        if let Some(path) = &self.record_path {
            record.save(path)?;
        }
        self.record = record;
        Ok(())
    }

    /// The SAs sent with, and those spent (for tests and `inspect`).
    pub fn record(&self) -> &SentRecord {
        &self.record
    }

    /// Whether the drop rules for `vnis` are in place (then a failed apply
    /// blackholes those networks instead of leaking plaintext).
    pub fn blocks(&self, vnis: &BTreeSet<u32>) -> bool {
        self.vnis.as_ref() == Some(vnis)
    }

    /// Re-reads the kernel, then applies `spec` (drift repaired).
    pub fn reconcile(&mut self, spec: &IpsecSpec) -> Result<IpsecReport, IpsecError> {
        self.read_back()?;
        self.vnis = None;
        self.applied = None;
        self.apply(spec)
    }

    /// Everything of ours goes (`meshd down`).
    pub fn teardown(&mut self) -> Result<usize, XfrmError> {
        let policies: Vec<(Ipv4Addr, Ipv4Addr)> =
            self.policies.iter().map(|(p, (l, _))| (*p, *l)).collect();
        for (peer, local) in &policies {
            self.del_policy(*local, *peer)?;
        }
        let states: Vec<SaKey> = self.states.keys().copied().collect();
        for k in &states {
            self.del_state(k)?;
        }
        self.policies.clear();
        self.states.clear();
        remove_rules();
        self.vnis = None;
        self.applied = None;
        Ok(policies.len() + states.len())
    }

    fn set_state(&mut self, k: &SaKey, secret: &[u8]) -> Result<(), XfrmError> {
        let mut name = [0u8; 64];
        name[..AEAD.len()].copy_from_slice(AEAD.as_bytes());
        let info = UserSaInfo {
            selector: Selector {
                family: libc::AF_INET as u16,
                ..Selector::default()
            },
            id: Id {
                daddr: addr(k.dst),
                spi: k.spi,
                proto: IPPROTO_ESP,
            },
            saddr: addr(k.src),
            lifetime_cfg: LifetimeConfig::default(),
            reqid: REQID,
            family: libc::AF_INET as u16,
            mode: XFRM_MODE_TRANSPORT,
            replay_window: REPLAY_WINDOW,
            ..UserSaInfo::default()
        };
        let msg = SaModify {
            user_sa_info: info,
            nlas: vec![XfrmAttrs::EncryptionAlgAead(AlgAead {
                alg_name: name,
                alg_key_len: (secret.len() * 8) as u32,
                alg_icv_len: ICV_BITS,
                alg_key: secret.to_vec(),
            })],
        };
        let flags = crate::nlsock::NLM_F_CREATE | crate::nlsock::NLM_F_EXCL;
        let bytes = emit(&msg);
        let op = XfrmOp::AddState(*k);
        match self
            .sock
            .request(XFRM_MSG_NEWSA, flags, &bytes, || op.to_string())
        {
            Ok(_) => return Ok(()),
            // One we did not know of (an unreadable dump, another writer):
            // replaced, since its key cannot be changed in place.
            Err(e) if e.errno() == Some(libc::EEXIST) => self.del_state(k)?,
            Err(e) => return Err(refused(op)(e)),
        }
        self.sock
            .request(XFRM_MSG_NEWSA, flags, &bytes, || op.to_string())
            .map(drop)
            .map_err(refused(op))
    }

    fn del_state(&mut self, k: &SaKey) -> Result<(), XfrmError> {
        let msg = SaDel {
            user_sa_id: UserSaId {
                daddr: addr(k.dst),
                spi: k.spi,
                family: libc::AF_INET as u16,
                proto: IPPROTO_ESP,
            },
            nlas: vec![XfrmAttrs::SrcAddr(addr(k.src))],
        };
        let op = XfrmOp::DeleteState(*k);
        match self
            .sock
            .request(XFRM_MSG_DELSA, 0, &emit(&msg), || op.to_string())
        {
            Ok(_) => Ok(()),
            Err(e) if e.errno() == Some(libc::ESRCH) => Ok(()),
            Err(e) => Err(refused(op)(e)),
        }
    }

    fn set_policy(&mut self, local: Ipv4Addr, peer: Ipv4Addr, spi: u32) -> Result<(), XfrmError> {
        let msg = PolicyModify {
            user_policy_info: UserPolicyInfo {
                selector: selector(local, peer),
                lifetime_cfg: LifetimeConfig::default(),
                direction: XFRM_POLICY_OUT,
                action: XFRM_POLICY_ALLOW,
                ..UserPolicyInfo::default()
            },
            nlas: vec![
                XfrmAttrs::Template(vec![UserTemplate {
                    id: Id {
                        daddr: addr(peer),
                        spi,
                        proto: IPPROTO_ESP,
                    },
                    family: libc::AF_INET as u16,
                    saddr: addr(local),
                    reqid: REQID,
                    mode: XFRM_MODE_TRANSPORT,
                    ..UserTemplate::default()
                }]),
                mark(),
            ],
        };
        let op = XfrmOp::SetPolicy { local, peer, spi };
        self.sock
            .request(XFRM_MSG_UPDPOLICY, 0, &emit(&msg), || op.to_string())
            .map(drop)
            .map_err(refused(op))
    }

    fn del_policy(&mut self, local: Ipv4Addr, peer: Ipv4Addr) -> Result<(), XfrmError> {
        let msg = PolicyDel {
            user_policy_id: UserPolicyId {
                selector: selector(local, peer),
                index: 0,
                direction: XFRM_POLICY_OUT,
            },
            nlas: vec![mark()],
        };
        let op = XfrmOp::DeletePolicy { local, peer };
        match self
            .sock
            .request(XFRM_MSG_DELPOLICY, 0, &emit(&msg), || op.to_string())
        {
            Ok(_) => Ok(()),
            Err(e) if e.errno() == Some(libc::ENOENT) => Ok(()),
            Err(e) => Err(refused(op)(e)),
        }
    }
}

/// Whether this kernel can run encrypted networks: adds an rfc4106 ESP
/// state in a throwaway network namespace (nothing of the host's is
/// touched) and says why not.
pub fn probe() -> Result<(), IpsecError> {
    std::thread::spawn(|| {
        // SAFETY: unshare only affects this (short-lived) thread.
        if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
            return Err(IpsecError::ProbeNamespace(std::io::Error::last_os_error()));
        }
        let mut x = Ipsec::open(None)?;
        let k = SaKey {
            src: Ipv4Addr::new(192, 0, 2, 1),
            dst: Ipv4Addr::new(192, 0, 2, 2),
            spi: 0x1000,
        };
        Ok(x.set_state(&k, &[7u8; 20])?)
    })
    .join()
    .unwrap_or(Err(IpsecError::ProbePanicked))
}

/// Only the nftables part: no VXLAN of `vnis` in or out without IPsec. For
/// a kernel where XFRM itself is missing: the encrypted networks then carry
/// nothing, never plaintext.
pub fn block_plaintext(vnis: &BTreeSet<u32>) -> Result<(), IpsecError> {
    crate::nft::run(&nft_ruleset(vnis)).map_err(IpsecError::Nft)
}

/// Removes the nftables table (`meshd down` where XFRM is missing).
pub fn remove_rules() {
    let _ = crate::nft::run(&format!("delete table ip {NFT_TABLE}"));
}

fn nft_ruleset(vnis: &BTreeSet<u32>) -> String {
    let mut s = format!("table ip {NFT_TABLE}\ndelete table ip {NFT_TABLE}\n");
    if vnis.is_empty() {
        return s;
    }
    let set = vnis
        .iter()
        .map(u32::to_string)
        .collect::<Vec<_>>()
        .join(", ");
    let vxlan = format!("udp dport {VXLAN_PORT} @th,96,24 {{ {set} }}");
    s.push_str(&format!(
        "table ip {NFT_TABLE} {{\n\
         \tchain output {{ type route hook output priority mangle; policy accept; \
         {vxlan} meta mark set meta mark | {ENCRYPT_MARK:#x}; }}\n\
         \tchain postrouting {{ type filter hook postrouting priority filter; policy accept; \
         {vxlan} rt ipsec missing counter drop; }}\n\
         \tchain input {{ type filter hook input priority filter; policy accept; \
         {vxlan} meta secpath missing counter drop; }}\n\
         }}\n"
    ));
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spis_differ_per_direction_pair_and_key_and_avoid_the_reserved_range() {
        let (a, b, c) = (
            Ipv4Addr::new(10, 0, 0, 1),
            Ipv4Addr::new(10, 0, 0, 2),
            Ipv4Addr::new(10, 0, 0, 3),
        );
        let all = [
            spi(a, b, 1),
            spi(b, a, 1),
            spi(a, b, 2),
            spi(a, c, 1),
            spi(c, a, 1),
        ];
        let distinct: BTreeSet<u32> = all.iter().copied().collect();
        assert_eq!(distinct.len(), all.len(), "{all:x?}");
        assert!(all.iter().all(|s| *s >= 0x100));
        assert_eq!(spi(a, b, 1), spi(a, b, 1), "both ends derive the same");
    }

    #[test]
    fn each_sa_gets_its_own_key_both_ends_derive() {
        let ring = [9u8; 20];
        let (a, b) = (Ipv4Addr::new(10, 0, 0, 1), Ipv4Addr::new(10, 0, 0, 2));
        let ab = sa_secret(&ring, a, b, 1);
        assert_eq!(ab.len(), 20);
        assert_eq!(ab, sa_secret(&ring, a, b, 1), "deterministic");
        assert_ne!(ab, sa_secret(&ring, b, a, 1), "per direction");
        assert_ne!(ab, sa_secret(&ring, a, b, 2), "per key id");
        assert_ne!(ab, sa_secret(&[8u8; 20], a, b, 1), "per ring secret");
        assert_ne!(ab.as_slice(), ring.as_slice());
    }

    #[test]
    fn a_pair_whose_state_was_made_again_sends_with_the_next_fresh_key() {
        let (a, b, c) = (
            Ipv4Addr::new(10, 0, 0, 1),
            Ipv4Addr::new(10, 0, 0, 2),
            Ipv4Addr::new(10, 0, 0, 3),
        );
        let spec = IpsecSpec {
            local: Some(a),
            peers: BTreeSet::from([b, c]),
            vnis: BTreeSet::from([4097]),
            keys: BTreeMap::from([(4, vec![1; 20]), (5, vec![2; 20]), (6, vec![3; 20])]),
            primary: Some(5),
        };
        let out = |peer, id| SaKey {
            src: a,
            dst: peer,
            spi: spi(a, peer, id),
        };
        let mut spent = BTreeSet::new();
        assert_eq!(
            sending_key(&spec, a, b, &spent),
            Some((5, false)),
            "the primary"
        );
        // The older key never comes back, even unspent.
        spent.insert(out(b, 5));
        assert_eq!(
            sending_key(&spec, a, b, &spent),
            Some((6, false)),
            "the newer key"
        );
        assert_eq!(
            sending_key(&spec, a, c, &spent),
            Some((5, false)),
            "per pair"
        );
        spent.insert(out(b, 6));
        assert_eq!(
            sending_key(&spec, a, b, &spent),
            Some((5, true)),
            "nothing fresh: the primary, flagged"
        );
        let none = IpsecSpec {
            primary: Some(9),
            ..spec.clone()
        };
        assert_eq!(
            sending_key(&none, a, b, &spent),
            None,
            "a primary not in the ring"
        );
    }

    #[test]
    fn the_sent_record_survives_a_round_trip_and_ignores_garbage() {
        let dir = std::env::temp_dir().join(format!("mesh-ipsec-record-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("ipsec-sent.json");
        let k = SaKey {
            src: Ipv4Addr::new(10, 0, 0, 1),
            dst: Ipv4Addr::new(10, 0, 0, 2),
            spi: 0x1234,
        };
        let r = SentRecord {
            sent: BTreeSet::from([k]),
            spent: BTreeSet::from([k]),
        };
        r.save(&path).unwrap();
        assert_eq!(SentRecord::load(&path), r);
        std::fs::write(&path, b"{not json").unwrap();
        assert_eq!(SentRecord::load(&path), SentRecord::default());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_nft_table_marks_and_drops_exactly_the_encrypted_vnis() {
        let r = nft_ruleset(&BTreeSet::from([4097, 4099]));
        assert!(r.contains("@th,96,24 { 4097, 4099 }"), "{r}");
        assert!(r.contains("rt ipsec missing counter drop"));
        assert!(r.contains("meta secpath missing counter drop"));
        assert!(r.contains(&format!("{ENCRYPT_MARK:#x}")));
        assert!(!nft_ruleset(&BTreeSet::new()).contains("chain"));
    }
}
