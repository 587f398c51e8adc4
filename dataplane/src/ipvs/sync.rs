//! [`IpvsSync`]: keeps IPVS equal to the load-balancer spec, writing only
//! differences and remembering what it owns across restarts; [`WithIpvs`]:
//! the load-balancer target that uses it.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use super::{
    delivery::{NFT_TABLE, local_route, nft_ruleset},
    error::IpvsError,
    genl::{Ipvs, probe_scheduler},
    key::{VIP_SLOT_MASK, VsKey},
};
use crate::{
    lb::{
        ApplyReport, Ebpf, FrontendSpec, LbChanges, LbMaps, LbSpec, LbTarget, ServiceSpec,
        SyncError,
    },
    nlsock::NlSocket,
};

/// Real servers of one virtual service: (address, port) -> weight.
type Dests = BTreeMap<(Ipv4Addr, u16), u32>;

/// The IPVS share of `services`: every frontend with a port, on its own
/// address or on each of `node_addresses`.
pub(super) fn desired_of<'a>(
    services: impl IntoIterator<Item = &'a ServiceSpec>,
    node_addresses: &[Ipv4Addr],
) -> BTreeMap<VsKey, Dests> {
    let mut want = BTreeMap::new();
    for s in services {
        let dests: Dests = s
            .backends
            .iter()
            .map(|b| ((b.address, b.port), b.weight))
            .collect();
        for f in &s.frontends {
            for key in frontend_keys(f, node_addresses) {
                want.insert(key, dests.clone());
            }
        }
    }
    want
}

/// The IPVS services a frontend is: one per node address for a published
/// port, one on its own address otherwise, and a fwmark service for a VIP
/// (port 0: every port, TCP and UDP; real servers at port 0 get the port
/// the client asked for).
fn frontend_keys(f: &FrontendSpec, node_addresses: &[Ipv4Addr]) -> Vec<VsKey> {
    match (f.address, f.port) {
        (Some(vip), 0) => vec![VsKey::vip(vip, 0)],
        (None, 0) => Vec::new(),
        (Some(a), port) => vec![VsKey::port(f.protocol, a, port)],
        (None, port) => node_addresses
            .iter()
            .map(|a| VsKey::port(f.protocol, *a, port))
            .collect(),
    }
}

/// IPVS for every frontend. The eBPF maps get neither frontends nor the
/// bridges' NAT addresses, so the TC program passes everything to the
/// stack (on a bridge it would drop what is not for the node's own
/// address, VIPs included). The nftables table keeps that isolation
/// instead: a new flow from a task may reach a VIP or the node's address
/// on its own bridge, and nothing else of (or through) the node.
pub struct WithIpvs<'a, M: LbMaps> {
    pub ebpf: Ebpf<'a, M>,
    pub ipvs: &'a mut IpvsSync,
}

impl<M: LbMaps> LbTarget for WithIpvs<'_, M> {
    fn apply(&mut self, spec: &LbSpec) -> Result<ApplyReport, SyncError> {
        let a = self.ebpf.apply(&ebpf_globals(spec))?;
        Ok(a.merged(self.ipvs.apply(spec)?))
    }

    fn apply_changes(
        &mut self,
        globals: &LbSpec,
        changes: &LbChanges,
    ) -> Result<ApplyReport, SyncError> {
        let a = self
            .ebpf
            .apply_changes(&ebpf_globals(globals), &LbChanges::default())?;
        Ok(a.merged(self.ipvs.apply_changes(globals, changes)?))
    }
}

fn ebpf_globals(spec: &LbSpec) -> LbSpec {
    LbSpec {
        services: Vec::new(),
        nat_interfaces: BTreeMap::new(),
        ..spec.clone()
    }
}

/// Keeps IPVS equal to the load-balancer spec, writing only differences.
pub struct IpvsSync {
    ipvs: Ipvs,
    /// For VIPs' local routes.
    routes: NlSocket,
    scheduler: &'static str,
    /// What we installed, as we believe the kernel has it.
    installed: BTreeMap<VsKey, Dests>,
    /// Where the set of services we own is kept across restarts.
    state_file: PathBuf,
    node_addresses: Vec<Ipv4Addr>,
    /// The services as last given (by name), for when node addresses move.
    specs: BTreeMap<String, ServiceSpec>,
    /// The published keys the nftables mark set holds (`None`: unknown).
    marked: Option<BTreeSet<VsKey>>,
}

impl IpvsSync {
    /// Opens IPVS and nftables in this namespace and reads back what an
    /// earlier meshd installed (listed in `state_file`), so a restart breaks
    /// no flow and removes what is no longer wanted. Fails clearly where the
    /// kernel has no IPVS or the host no `nft`.
    pub fn open(state_file: &Path) -> Result<IpvsSync, IpvsError> {
        let mut ipvs = Ipvs::open()?;
        // With br_netfilter calling iptables for bridged frames, the
        // isolation rule (forward from a bridge) would see every frame a
        // task sends to another on its network, and drop it.
        if std::fs::read_to_string("/proc/sys/net/bridge/bridge-nf-call-iptables")
            .is_ok_and(|v| v.trim() == "1")
        {
            return Err(IpvsError::Io(
                "net.bridge.bridge-nf-call-iptables=1 (br_netfilter) would pass every bridged \
                 frame of the overlays through the IPv4 forward hook, where --lb-backend ipvs \
                 keeps tasks from routing through their node; set it to 0 in this namespace, or \
                 use --lb-backend ebpf"
                    .into(),
            ));
        }
        // Conntrack for IPVS's flows, so the masquerade applies to them.
        std::fs::write("/proc/sys/net/ipv4/vs/conntrack", "1")
            .map_err(|e| IpvsError::Io(format!("set net.ipv4.vs.conntrack=1: {e}")))?;
        let state_file = state_file.to_owned();
        let owned: BTreeSet<VsKey> = std::fs::read(&state_file)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        let owned: BTreeMap<_, VsKey> = owned.into_iter().map(|k| (k.kernel_id(), k)).collect();
        let mut installed = BTreeMap::new();
        for vs in ipvs.services()? {
            if let Some(key) = owned.get(&vs.key.kernel_id()) {
                let dests = ipvs
                    .dests(key)?
                    .into_iter()
                    .map(|d| ((d.address, d.port), d.weight))
                    .collect();
                installed.insert(*key, dests);
            }
        }
        let mut routes = NlSocket::open(libc::NETLINK_ROUTE)
            .map_err(|e| IpvsError::Io(format!("open a route netlink socket: {e}")))?;
        for key in installed.keys().filter(|k| k.fwmark != 0) {
            local_route(&mut routes, key.address, true)?;
        }
        let scheduler = probe_scheduler(&mut ipvs)?;
        crate::nft::run("list tables").map_err(|e| {
            IpvsError::Io(format!(
                "--lb-backend ipvs needs nftables (`nft`) for the masquerade of balanced flows: {e}"
            ))
        })?;
        Ok(IpvsSync {
            ipvs,
            routes,
            scheduler,
            installed,
            state_file,
            node_addresses: Vec::new(),
            specs: BTreeMap::new(),
            marked: None,
        })
    }

    pub fn scheduler(&self) -> &'static str {
        self.scheduler
    }

    /// Makes IPVS match `spec` as a whole.
    pub fn apply(&mut self, spec: &LbSpec) -> Result<ApplyReport, SyncError> {
        self.node_addresses = spec.node_addresses.clone();
        self.specs = spec
            .services
            .iter()
            .map(|s| (s.name.clone(), s.clone()))
            .collect();
        self.converge_all()
    }

    /// Applies `changes`: the upserted services' frontends as they are now,
    /// the removed frontends gone. Only the keys they name are looked at,
    /// unless the node's addresses moved (then every key may differ).
    pub fn apply_changes(
        &mut self,
        globals: &LbSpec,
        changes: &LbChanges,
    ) -> Result<ApplyReport, SyncError> {
        for s in &changes.upsert {
            self.specs.insert(s.name.clone(), s.clone());
        }
        for spec in self.specs.values_mut() {
            spec.frontends.retain(|f| !changes.remove.contains(f));
        }
        self.specs.retain(|_, s| !s.frontends.is_empty());
        if globals.node_addresses != self.node_addresses {
            self.node_addresses = globals.node_addresses.clone();
            return self.converge_all();
        }
        let want = self.give_slots(desired_of(changes.upsert.iter(), &self.node_addresses))?;
        let mut keys: BTreeSet<VsKey> = want.keys().copied().collect();
        for f in &changes.remove {
            keys.extend(
                frontend_keys(f, &self.node_addresses)
                    .into_iter()
                    .filter_map(|k| self.slotted(k)),
            );
        }
        self.converge(&keys, &want)
    }

    /// `key` with its VIP slot, if it is a VIP that has one (others as
    /// they are).
    fn slotted(&self, key: VsKey) -> Option<VsKey> {
        if key.fwmark == 0 {
            return Some(key);
        }
        self.installed
            .keys()
            .find(|k| k.fwmark != 0 && k.address == key.address)
            .copied()
    }

    /// Gives every VIP of `want` its slot: the one it has, else the lowest
    /// free one. A VIP keeps its mark for as long as it is installed, so two
    /// VIPs never share one.
    fn give_slots(
        &self,
        want: BTreeMap<VsKey, Dests>,
    ) -> Result<BTreeMap<VsKey, Dests>, SyncError> {
        let mut used: BTreeSet<u32> = self
            .installed
            .keys()
            .filter(|k| k.fwmark != 0)
            .map(|k| k.fwmark & VIP_SLOT_MASK)
            .collect();
        let mut out = BTreeMap::new();
        for (key, dests) in want {
            let key =
                match self.slotted(key) {
                    Some(k) if k.fwmark & VIP_SLOT_MASK != 0 || k.fwmark == 0 => k,
                    _ => {
                        let slot = (1..=VIP_SLOT_MASK).find(|s| !used.contains(s)).ok_or_else(|| {
                        SyncError::Ipvs(format!(
                            "ipvs: no free VIP mark for {} ({VIP_SLOT_MASK} VIPs on this node)",
                            key.address
                        ))
                    })?;
                        used.insert(slot);
                        VsKey::vip(key.address, slot)
                    }
                };
            out.insert(key, dests);
        }
        Ok(out)
    }

    fn converge_all(&mut self) -> Result<ApplyReport, SyncError> {
        let want = self.give_slots(desired_of(self.specs.values(), &self.node_addresses))?;
        let keys: BTreeSet<VsKey> = want.keys().chain(self.installed.keys()).copied().collect();
        self.converge(&keys, &want)
    }

    /// Brings each of `keys` to `want` (absent: removed).
    fn converge(
        &mut self,
        keys: &BTreeSet<VsKey>,
        want: &BTreeMap<VsKey, Dests>,
    ) -> Result<ApplyReport, SyncError> {
        let mut report = ApplyReport::default();
        // Owned before they exist: a crash while creating them leaves
        // nothing the next meshd does not know to remove.
        let pending: Vec<VsKey> = keys
            .iter()
            .filter(|k| want.contains_key(k) && !self.installed.contains_key(k))
            .copied()
            .collect();
        if !pending.is_empty() {
            self.save_with(&pending)?;
        }
        for key in keys {
            let have = self.installed.get(key).cloned();
            match (have, want.get(key)) {
                (None, None) => {}
                (Some(_), None) => {
                    match self.ipvs.del_service(key) {
                        Ok(()) => {}
                        Err(IpvsError::Netlink(e)) if e.errno() == Some(libc::ESRCH) => {}
                        Err(e) => return Err(self.failed(e)),
                    }
                    if key.fwmark != 0 {
                        local_route(&mut self.routes, key.address, false)?;
                    }
                    self.installed.remove(key);
                    report.frontend_removals += 1;
                }
                (None, Some(dests)) => {
                    // A VIP is delivered locally (where IPVS looks), as
                    // kube-proxy's IPVS mode binds service IPs to a dummy.
                    let route = if key.fwmark != 0 {
                        local_route(&mut self.routes, key.address, true)
                    } else {
                        Ok(())
                    };
                    let created = route.and_then(|()| {
                        match self.ipvs.add_service(key, self.scheduler) {
                            // Already there (a crash before the state was
                            // saved): adopt it.
                            Err(IpvsError::Netlink(e)) if e.errno() == Some(libc::EEXIST) => Ok(()),
                            r => r,
                        }
                    });
                    if let Err(e) = created {
                        if key.fwmark != 0 {
                            let _ = local_route(&mut self.routes, key.address, false);
                        }
                        let _ = self.save();
                        return Err(self.failed(e));
                    }
                    let existing: Dests = self
                        .ipvs
                        .dests(key)
                        .map_err(|e| self.failed(e))?
                        .into_iter()
                        .map(|d| ((d.address, d.port), d.weight))
                        .collect();
                    self.installed.insert(*key, existing);
                    report.frontend_writes += 1;
                    self.sync_dests(key, dests, &mut report)?;
                }
                (Some(_), Some(dests)) => self.sync_dests(key, dests, &mut report)?,
            }
        }
        self.save()?;
        self.sync_marks(&mut report)?;
        Ok(report)
    }

    fn sync_dests(
        &mut self,
        key: &VsKey,
        want: &Dests,
        report: &mut ApplyReport,
    ) -> Result<(), SyncError> {
        let have = self.installed.get(key).cloned().unwrap_or_default();
        for (&(addr, port), &weight) in want {
            match have.get(&(addr, port)) {
                Some(&w) if w == weight => continue,
                Some(_) => self.ipvs.set_dest(key, addr, port, weight),
                None => self.ipvs.add_dest(key, addr, port, weight),
            }
            .map_err(|e| self.failed(e))?;
            report.backend_writes += 1;
            self.installed
                .entry(*key)
                .or_default()
                .insert((addr, port), weight);
        }
        for &(addr, port) in have.keys() {
            if want.contains_key(&(addr, port)) {
                continue;
            }
            // Open flows to it go on (IPVS keeps their connection entries);
            // it gets no new ones.
            match self.ipvs.del_dest(key, addr, port) {
                Ok(()) => {}
                Err(IpvsError::Netlink(e)) if e.errno() == Some(libc::ENOENT) => {}
                Err(e) => return Err(self.failed(e)),
            }
            report.backend_removals += 1;
            if let Some(d) = self.installed.get_mut(key) {
                d.remove(&(addr, port));
            }
        }
        Ok(())
    }

    /// Records what we own (so a later meshd removes it when unwanted).
    fn save(&self) -> Result<(), SyncError> {
        self.save_with(&[])
    }

    /// Records what we own, and `pending`: keys about to be created.
    fn save_with(&self, pending: &[VsKey]) -> Result<(), SyncError> {
        let keys: BTreeSet<&VsKey> = self.installed.keys().chain(pending).collect();
        let tmp = self.state_file.with_extension("tmp");
        std::fs::write(&tmp, serde_json::to_vec(&keys).expect("keys serialize"))
            .and_then(|()| std::fs::rename(&tmp, &self.state_file))
            .map_err(|e| SyncError::Ipvs(format!("save {}: {e}", self.state_file.display())))
    }

    fn failed(&mut self, e: IpvsError) -> SyncError {
        // What actually happened is unknown past this point: read it back.
        let keys: Vec<VsKey> = self.installed.keys().copied().collect();
        for k in keys {
            if let Ok(d) = self.ipvs.dests(&k) {
                self.installed.insert(
                    k,
                    d.into_iter()
                        .map(|d| ((d.address, d.port), d.weight))
                        .collect(),
                );
            }
        }
        e.into()
    }

    /// The nftables table: mark flows to published keys, masquerade them.
    /// Rewritten (atomically) only when the set of keys changes.
    fn sync_marks(&mut self, report: &mut ApplyReport) -> Result<(), SyncError> {
        let keys: BTreeSet<VsKey> = self.installed.keys().copied().collect();
        if self.marked.as_ref() == Some(&keys) {
            return Ok(());
        }
        crate::nft::run(&nft_ruleset(&keys))
            .map_err(|e| SyncError::Ipvs(format!("nftables {NFT_TABLE}: {e}")))?;
        self.marked = Some(keys);
        report.config_writes += 1;
        Ok(())
    }

    /// What `meshd down` does: every service we own and the nftables table go.
    pub fn teardown(&mut self) -> Result<usize, SyncError> {
        let keys: Vec<VsKey> = self.installed.keys().copied().collect();
        for k in &keys {
            match self.ipvs.del_service(k) {
                Ok(()) => {}
                Err(IpvsError::Netlink(e)) if e.errno() == Some(libc::ESRCH) => {}
                Err(e) => return Err(e.into()),
            }
            if k.fwmark != 0 {
                local_route(&mut self.routes, k.address, false)?;
            }
        }
        self.installed.clear();
        self.save()?;
        let _ = crate::nft::run(&format!("delete table ip {NFT_TABLE}"));
        self.marked = None;
        Ok(keys.len())
    }
}
