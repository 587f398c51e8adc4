//! [`Ipsec`]: keeps this namespace's XFRM states and policies, and its
//! nftables table, equal to an [`IpsecSpec`], writing only differences;
//! [`probe`]: whether this kernel can run ESP at all.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr},
    path::{Path, PathBuf},
};

use netlink_packet_core::{Emitable, Parseable};
use netlink_packet_xfrm::{
    Address, AlgAead, IPPROTO_ESP, Id, LifetimeConfig, Mark, Selector, UserPolicyId,
    UserPolicyInfo, UserSaId, UserSaInfo, UserTemplate, XFRM_MODE_TRANSPORT, XFRM_MSG_DELPOLICY,
    XFRM_MSG_DELSA, XFRM_MSG_GETPOLICY, XFRM_MSG_GETSA, XFRM_MSG_NEWSA, XFRM_MSG_UPDPOLICY,
    XFRM_POLICY_ALLOW, XFRM_POLICY_OUT, XfrmAttrs,
    policy::{DelGetMessage as PolicyDel, ModifyMessage as PolicyModify},
    state::{DelGetMessage as SaDel, ModifyMessage as SaModify},
};

use super::{
    error::{IpsecError, XfrmError, XfrmOp},
    keys::{SentRecord, sa_secret, sending_key, spi},
    nft::{nft_ruleset, remove_rules},
    spec::{AEAD, ENCRYPT_MARK, IpsecReport, IpsecSpec, REQID, SaKey},
};
use crate::{
    netlink::VXLAN_PORT,
    nlsock::{NLM_F_DUMP, NlError, NlSocket},
};

const ICV_BITS: u32 = 128;
const REPLAY_WINDOW: u8 = 64;

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
        spec.validate()?;
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
