//! Making the kernel match the desired table: a full pass that reads the
//! links back and repairs drift, an incremental pass per delta, teardown.

use super::*;

impl Overlay {
    /// A reconciler working through `nl` (a handle in the node's namespace).
    pub fn new(nl: Netlink) -> Overlay {
        Overlay {
            nl,
            desired: Desired::default(),
            applied: None,
        }
    }

    /// The table as last given, with the changes applied since.
    /// The namespace this overlay lives in.
    pub fn netlink(&self) -> &Netlink {
        &self.nl
    }

    pub fn table(&self) -> OverlaySpec {
        self.desired.to_spec()
    }

    /// Makes the kernel match a whole table. Only what differs from the last
    /// applied table is written (the first time, the kernel is read). An
    /// invalid table changes nothing.
    pub async fn apply(&mut self, spec: OverlaySpec) -> Result<Report, OverlayError> {
        self.desired = Desired::build(spec)?;
        let full = self.applied.is_none();
        self.sync(full).await
    }

    /// Applies endpoint changes in order: each is checked against the table
    /// as the earlier ones leave it and, if all are valid, written with a
    /// few netlink calls each, whatever the table's size. If any is invalid,
    /// none is applied.
    pub async fn apply_changes(&mut self, changes: &[Change]) -> Result<Report, OverlayError> {
        let mut undo = Vec::with_capacity(changes.len());
        let mut problems = Vec::new();
        for (i, c) in changes.iter().enumerate() {
            match self.desired.stage(c) {
                Ok(u) => undo.push(u),
                Err(p) => problems.extend(p.into_iter().map(|p| format!("change {}: {p}", i + 1))),
            }
        }
        if !problems.is_empty() {
            for u in undo.into_iter().rev() {
                self.desired.undo(u);
            }
            return Err(OverlayError::Invalid(problems));
        }
        let Some(mut applied) = self.applied.take() else {
            // The kernel state is unknown: a full pass brings it to the table.
            return self.sync(true).await;
        };
        let start = self.nl.changes();
        let mut problems = Problems::default();
        for (c, u) in changes.iter().zip(&undo) {
            let Some(a) = applied.get_mut(c.network()) else {
                continue; // the network failed to build; the next full pass retries it
            };
            let ctx = format!("network {}", c.network());
            match (c, u) {
                (Change::UpsertRemote { endpoint, .. }, Undo::Remote(_, _, old)) => {
                    a.remotes.insert(endpoint.ip, endpoint.clone());
                    self.change_remote(&a.vxlan, old.as_ref(), Some(endpoint), &ctx, &mut problems)
                        .await;
                }
                (Change::RemoveRemote { ip, .. }, Undo::Remote(_, _, old)) => {
                    a.remotes.remove(ip);
                    self.change_remote(&a.vxlan, old.as_ref(), None, &ctx, &mut problems)
                        .await;
                }
                (Change::UpsertLocal { endpoint, .. }, _) => {
                    if a.locals
                        .get(&endpoint.id)
                        .is_some_and(|(e, _)| e == endpoint)
                    {
                        continue; // unchanged: leave the task's interface alone
                    }
                    if let Some((_, host)) = a.locals.remove(&endpoint.id) {
                        self.remove_local(&host, &ctx, &mut problems).await;
                    }
                    let spec = &self.desired.networks[c.network()].spec;
                    let ctx = format!("network {} endpoint {}", c.network(), endpoint.id);
                    let r = self
                        .ensure_local(spec, endpoint, &a.bridge, a.header.mtu, &Links::Lookup)
                        .await;
                    if let Some(host) = problems.check(ctx, r) {
                        a.locals
                            .insert(endpoint.id.clone(), (endpoint.clone(), host));
                    }
                }
                (Change::RemoveLocal { id, .. }, _) => {
                    if let Some((_, host)) = a.locals.remove(id) {
                        self.remove_local(&host, &ctx, &mut problems).await;
                    }
                }
                _ => unreachable!("stage() pairs each change with its own kind of undo"),
            }
        }
        self.finish(start, false, applied, problems)
    }

    /// Records the outcome of a pass: on success the applied state is kept
    /// for the next incremental pass; on any error it is dropped, so the
    /// next pass re-reads the kernel.
    fn finish(
        &mut self,
        start: u64,
        full: bool,
        applied: BTreeMap<String, AppliedNetwork>,
        problems: Problems,
    ) -> Result<Report, OverlayError> {
        let changes = self.nl.changes() - start;
        if problems.0.is_empty() {
            self.applied = Some(applied);
            Ok(Report { changes, full })
        } else {
            self.applied = None;
            Err(OverlayError::Kernel {
                changes,
                errors: problems.0,
            })
        }
    }

    /// Re-reads the kernel and repairs any drift from the last applied table.
    pub async fn reconcile(&mut self) -> Result<Report, OverlayError> {
        self.sync(true).await
    }

    /// Removes every link mesh created in this namespace (and with them their
    /// FDB and neighbour entries and the peers in task namespaces), including
    /// ones left by an earlier run. Goes on past errors and reports them all.
    pub async fn teardown(&mut self) -> Result<Report, OverlayError> {
        self.desired = Desired::default();
        self.sync(true).await
    }

    async fn sync(&mut self, full: bool) -> Result<Report, OverlayError> {
        let start = self.nl.changes();
        let mut problems = Problems::default();
        let mut prev = if full {
            BTreeMap::new()
        } else {
            self.applied.take().unwrap_or_default()
        };
        let links = if full {
            match self.nl.links().await {
                Ok(all) => Links::Dump(all.into_iter().map(|l| (l.name.clone(), l)).collect()),
                Err(e) => {
                    self.applied = None;
                    return Err(OverlayError::Kernel {
                        changes: 0,
                        errors: vec![e.to_string()],
                    });
                }
            }
        } else {
            Links::Lookup
        };

        let mut applied = BTreeMap::new();
        let underlay = match self.desired.underlay {
            Some(addr) if !self.desired.networks.is_empty() => {
                match self.underlay(addr, &prev, &links).await {
                    Ok(u) => Some(u),
                    Err(e) => {
                        problems.push(format!("underlay {addr}"), e);
                        None
                    }
                }
            }
            _ => None,
        };

        // Phase 1: take away what is no longer wanted before building
        // anything, so that a VNI, or a task interface moving from one
        // network to another, is free by the time it is needed.
        let mut kept = BTreeMap::new();
        for (id, mut p) in std::mem::take(&mut prev) {
            match self.desired.networks.get(&id) {
                Some(net) if net.spec.vni == p.header.vni => {
                    let stale: Vec<String> = p
                        .locals
                        .iter()
                        .filter(|(ep, (old, _))| net.local.get(*ep) != Some(old))
                        .map(|(ep, _)| ep.clone())
                        .collect();
                    for ep in stale {
                        if let Some((_, host)) = p.locals.remove(&ep) {
                            let ctx = format!("network {id} endpoint {ep}");
                            self.remove_local(&host, &ctx, &mut problems).await;
                        }
                    }
                    kept.insert(id, p);
                }
                // Gone, or under a new VNI (new link names): its links go.
                _ => self.remove_network(&p, &mut problems).await,
            }
        }
        let mut prev = kept;
        if let Links::Dump(all) = &links {
            self.collect_strays(all, &mut problems).await;
        }

        // Phase 2: build or update every wanted network. One that cannot be
        // built now (no underlay address, an MTU that does not fit) keeps its
        // links as they are and is retried by the next pass.
        for net in self.desired.networks.values() {
            let Some(underlay) = underlay else { break };
            let (id, vni) = (&net.spec.id, net.spec.vni);
            let esp = if net.spec.encrypted { ESP_OVERHEAD } else { 0 };
            let mtu = net
                .spec
                .mtu
                .unwrap_or(underlay.mtu.saturating_sub(VXLAN_OVERHEAD + esp));
            if mtu + VXLAN_OVERHEAD + esp > underlay.mtu || mtu < MIN_MTU {
                problems.push(
                    format!("network {id}"),
                    format_args!(
                        "MTU {mtu} does not fit the underlay: at most {} - {VXLAN_OVERHEAD} = {} (and at least {MIN_MTU})",
                        underlay.mtu,
                        underlay.mtu.saturating_sub(VXLAN_OVERHEAD)
                    ),
                );
                continue;
            }
            let header = Header {
                vni,
                mtu,
                underlay,
                host: net.spec.host,
            };
            let result = match prev.remove(id) {
                Some(p) if p.header == header => {
                    Some(self.update_network(net, p, &mut problems).await)
                }
                // New, or its MTU or underlay changed: links are created or
                // fixed in place (task interfaces included).
                _ => self.build_network(net, header, &links, &mut problems).await,
            };
            if let Some(a) = result {
                applied.insert(id.clone(), a);
            }
        }
        self.finish(start, full, applied, problems)
    }

    async fn underlay(
        &self,
        addr: Ipv4Addr,
        prev: &BTreeMap<String, AppliedNetwork>,
        links: &Links,
    ) -> Result<Underlay, String> {
        if matches!(links, Links::Lookup)
            && let Some(p) = prev.values().next()
            && p.header.underlay.addr == addr
        {
            return Ok(p.header.underlay);
        }
        let index = self
            .nl
            .link_with_address(IpAddr::V4(addr))
            .await
            .map_err(|e| e.to_string())?
            .ok_or_else(|| {
                format!(
                    "no interface in netns {} has this address; give the node's underlay address",
                    self.nl.namespace()
                )
            })?;
        let link = self
            .nl
            .link_by_index(index)
            .await
            .map_err(|e| e.to_string())?
            .ok_or_else(|| format!("interface {index} vanished"))?;
        Ok(Underlay {
            addr,
            index,
            mtu: link.mtu,
        })
    }

    /// Creates or repairs a network's links and entries from what the kernel has.
    async fn build_network(
        &self,
        net: &DesiredNetwork,
        header: Header,
        links: &Links,
        problems: &mut Problems,
    ) -> Option<AppliedNetwork> {
        let (id, vni) = (&net.spec.id, net.spec.vni);
        let ctx = format!("network {id}");
        let bridge = problems.check(
            &ctx,
            self.ensure_bridge(&bridge_name(vni), header.mtu, links)
                .await,
        )?;
        let bridge = problems.check(
            &ctx,
            self.ensure_host(bridge, net.spec.subnet, header.host).await,
        )?;
        let vx_name = vxlan_name(vni);
        let spec = VxlanSpec {
            name: &vx_name,
            vni,
            local: header.underlay.addr,
            dev: header.underlay.index,
            mtu: header.mtu,
            controller: bridge.index,
        };
        let vxlan = problems.check(&ctx, self.ensure_vxlan(&spec, links).await)?;

        // Remote endpoints: compare with the entries the kernel has.
        let observed = async {
            let fdb = self.nl.fdb(vxlan.index).await?;
            let neigh = self.nl.neighbours(vxlan.index).await?;
            Ok::<_, NetlinkError>(Observed {
                fdb: fdb
                    .into_iter()
                    .filter(|e| e.on_device)
                    .map(|e| {
                        let dst = match (e.permanent, e.dst) {
                            (true, Some(IpAddr::V4(d))) => d,
                            // Not ours to keep as is: replace or delete it.
                            _ => Ipv4Addr::UNSPECIFIED,
                        };
                        (e.mac, dst)
                    })
                    .collect(),
                neigh: neigh
                    .into_iter()
                    .filter_map(|n| match (n.ip, n.permanent, n.mac) {
                        (IpAddr::V4(ip), true, Some(mac)) => Some((ip, mac)),
                        _ => None,
                    })
                    .collect(),
            })
        }
        .await;
        let observed = problems.check(&ctx, observed)?;
        let vips = net.vips();
        self.sync_remotes(&vxlan, &net.remote, &vips, observed, &ctx, problems)
            .await;

        let mut locals = BTreeMap::new();
        for ep in net.local.values() {
            let ctx = format!("network {id} endpoint {}", ep.id);
            let r = self
                .ensure_local(&net.spec, ep, &bridge, header.mtu, links)
                .await;
            if let Some(host) = problems.check(ctx, r) {
                locals.insert(ep.id.clone(), (ep.clone(), host));
            }
        }
        Some(AppliedNetwork {
            header,
            bridge,
            vxlan,
            remotes: net.remote.clone(),
            vips,
            locals,
        })
    }

    /// Applies only the difference from what the last pass left.
    async fn update_network(
        &self,
        net: &DesiredNetwork,
        mut prev: AppliedNetwork,
        problems: &mut Problems,
    ) -> AppliedNetwork {
        let id = &net.spec.id;
        let ctx = format!("network {id}");
        let vips = net.vips();
        if prev.remotes != net.remote || prev.vips != vips {
            let observed = Observed {
                fdb: prev.remotes.values().map(|r| (r.mac, r.node)).collect(),
                neigh: prev
                    .remotes
                    .values()
                    .map(|r| (r.ip, r.mac))
                    .chain(prev.vips.iter().map(|(ip, mac)| (*ip, *mac)))
                    .collect(),
            };
            self.sync_remotes(&prev.vxlan, &net.remote, &vips, observed, &ctx, problems)
                .await;
            prev.remotes = net.remote.clone();
            prev.vips = vips;
        }

        // Stale endpoints went in phase 1; add the missing ones.
        let mut locals = std::mem::take(&mut prev.locals);
        for ep in net.local.values() {
            if locals.contains_key(&ep.id) {
                continue;
            }
            let ctx = format!("network {id} endpoint {}", ep.id);
            let r = self
                .ensure_local(&net.spec, ep, &prev.bridge, prev.header.mtu, &Links::Lookup)
                .await;
            if let Some(host) = problems.check(ctx, r) {
                locals.insert(ep.id.clone(), (ep.clone(), host));
            }
        }
        prev.locals = locals;
        prev
    }

    /// Deletes a local endpoint's veth (its peer in the task goes with it).
    async fn remove_local(&self, host: &Link, ctx: &str, problems: &mut Problems) {
        if let Err(e) = self.nl.del_link(host).await
            && !e.is_not_found()
        {
            problems.push(ctx, e);
        }
    }

    /// One remote endpoint changes from `old` to `new`: at most one FDB and
    /// one neighbour write, plus deleting the old MAC's entry if it changed.
    async fn change_remote(
        &self,
        vxlan: &Link,
        old: Option<&RemoteEndpoint>,
        new: Option<&RemoteEndpoint>,
        ctx: &str,
        problems: &mut Problems,
    ) {
        let ignore_missing = |r: Result<(), NetlinkError>| match r {
            Err(e) if e.is_not_found() => Ok(()),
            r => r,
        };
        match (old, new) {
            (None, None) => {}
            (Some(o), None) => {
                let r = self.nl.del_neighbour(vxlan, IpAddr::V4(o.ip)).await;
                problems.check(ctx, ignore_missing(r));
                let r = self.nl.del_fdb(vxlan, o.mac).await;
                problems.check(ctx, ignore_missing(r));
            }
            (o, Some(n)) => {
                if o.is_none_or(|o| (o.mac, o.node) != (n.mac, n.node)) {
                    let r = self.nl.set_fdb(vxlan, n.mac, n.node).await;
                    problems.check(ctx, r);
                }
                if o.is_none_or(|o| o.mac != n.mac) {
                    let r = self.nl.set_neighbour(vxlan, IpAddr::V4(n.ip), n.mac).await;
                    problems.check(ctx, r);
                }
                if let Some(o) = o
                    && o.mac != n.mac
                {
                    let r = self.nl.del_fdb(vxlan, o.mac).await;
                    problems.check(ctx, ignore_missing(r));
                }
            }
        }
    }

    /// Deletes a network's links: veths, then the VXLAN device, then the bridge.
    async fn remove_network(&self, p: &AppliedNetwork, problems: &mut Problems) {
        for link in p.links() {
            if let Err(e) = self.nl.del_link(link).await
                && !e.is_not_found()
            {
                problems.push("removing network", e);
            }
        }
    }

    /// In a full pass: deletes links with mesh's prefixes that no desired
    /// network owns (left by a crash, or by an earlier table).
    async fn collect_strays(&self, all: &HashMap<String, Link>, problems: &mut Problems) {
        // Keep whatever a desired network would use, even if building it
        // failed this pass (underlay address missing, MTU out of range):
        // a transient problem must not tear down working task networking.
        let mut keep = BTreeSet::new();
        for net in self.desired.networks.values() {
            keep.insert(bridge_name(net.spec.vni));
            keep.insert(vxlan_name(net.spec.vni));
            keep.extend(net.local.keys().map(|ep| veth_name(&net.spec.id, ep)));
        }
        let mut strays: Vec<&Link> = all
            .values()
            .filter(|l| is_owned(&l.name) && !keep.contains(&l.name))
            .collect();
        // Veths first, bridges last: a port goes before its bridge.
        strays.sort_by_key(|l| {
            (
                match l.kind {
                    LinkKind::Veth => 0,
                    LinkKind::Vxlan => 1,
                    _ => 2,
                },
                l.name.clone(),
            )
        });
        for link in strays {
            if let Err(e) = self.nl.del_link(link).await
                && !e.is_not_found()
            {
                problems.push("removing stray link", e);
            }
        }
    }

    async fn ensure_bridge(
        &self,
        name: &str,
        mtu: u32,
        links: &Links,
    ) -> Result<Link, NetlinkError> {
        if let Some(l) = links.get(&self.nl, name).await? {
            if l.kind == LinkKind::Bridge {
                if l.mtu != mtu {
                    self.nl.set_mtu(&l, mtu).await?;
                }
                if !l.up {
                    self.nl.set_up(&l).await?;
                }
                return Ok(l);
            }
            self.nl.del_link(&l).await?;
        }
        self.nl.add_bridge(name, mtu).await?;
        self.created(name).await
    }

    /// Gives the bridge this node's address and MAC on the network (and no
    /// other address), or takes them away.
    async fn ensure_host(
        &self,
        bridge: Link,
        subnet: Subnet,
        host: Option<HostEndpoint>,
    ) -> Result<Link, NetlinkError> {
        let want = host.map(|h| (IpAddr::V4(h.ip), subnet.prefix()));
        let have = self.nl.addresses(bridge.index).await?;
        for &(ip, prefix) in &have {
            if Some((ip, prefix)) != want {
                self.nl.del_address(&bridge, ip, prefix).await?;
            }
        }
        let (Some(h), Some((ip, prefix))) = (host, want) else {
            return Ok(bridge);
        };
        if bridge.mac != Some(h.mac) {
            self.nl.set_mac(&bridge, h.mac).await?;
        }
        if !have.contains(&(ip, prefix)) {
            self.nl.add_address(&bridge, ip, prefix).await?;
        }
        Ok(bridge)
    }

    async fn ensure_vxlan(
        &self,
        spec: &VxlanSpec<'_>,
        links: &Links,
    ) -> Result<Link, NetlinkError> {
        if let Some(l) = links.get(&self.nl, spec.name).await? {
            if l.kind == LinkKind::Vxlan && l.vxlan.as_ref() == Some(&spec.info()) {
                if l.mtu != spec.mtu {
                    self.nl.set_mtu(&l, spec.mtu).await?;
                }
                if l.controller != Some(spec.controller) {
                    self.nl.set_controller(&l, spec.controller).await?;
                }
                if !l.up {
                    self.nl.set_up(&l).await?;
                }
                return Ok(l);
            }
            // VNI, address, port or flags differ: these need a new device.
            self.nl.del_link(&l).await?;
        }
        self.nl.add_vxlan(spec).await?;
        self.created(spec.name).await
    }

    async fn created(&self, name: &str) -> Result<Link, NetlinkError> {
        self.nl.link(name).await?.ok_or_else(|| NetlinkError {
            op: "find new link",
            object: name.into(),
            ns: self.nl.namespace().into(),
            source: std::io::Error::from_raw_os_error(libc::ENODEV),
        })
    }

    /// Writes FDB and neighbour entries so that the VXLAN device holds
    /// exactly `desired`, given what it holds now.
    async fn sync_remotes(
        &self,
        vxlan: &Link,
        desired: &HashMap<Ipv4Addr, RemoteEndpoint>,
        vips: &BTreeMap<Ipv4Addr, Mac>,
        observed: Observed,
        ctx: &str,
        problems: &mut Problems,
    ) {
        let want_fdb: BTreeMap<Mac, Ipv4Addr> = desired.values().map(|r| (r.mac, r.node)).collect();
        let want_neigh: BTreeMap<Ipv4Addr, Mac> = desired
            .values()
            .map(|r| (r.ip, r.mac))
            .chain(vips.iter().map(|(ip, mac)| (*ip, *mac)))
            .collect();
        // Withdraw first, neighbour before FDB: a removed endpoint stops
        // resolving before its forwarding entry goes.
        for ip in observed
            .neigh
            .keys()
            .filter(|ip| !want_neigh.contains_key(ip))
        {
            let r = self.nl.del_neighbour(vxlan, IpAddr::V4(*ip)).await;
            if let Err(e) = r
                && !e.is_not_found()
            {
                problems.push(ctx, e);
            }
        }
        for mac in observed.fdb.keys().filter(|m| !want_fdb.contains_key(m)) {
            let r = self.nl.del_fdb(vxlan, *mac).await;
            if let Err(e) = r
                && !e.is_not_found()
            {
                problems.push(ctx, e);
            }
        }
        // Then add, FDB before neighbour: an address resolves only once its
        // MAC is reachable.
        for (mac, node) in &want_fdb {
            if observed.fdb.get(mac) != Some(node) {
                let r = self.nl.set_fdb(vxlan, *mac, *node).await;
                problems.check(ctx, r);
            }
        }
        for (ip, mac) in &want_neigh {
            if observed.neigh.get(ip) != Some(mac) {
                let r = self.nl.set_neighbour(vxlan, IpAddr::V4(*ip), *mac).await;
                problems.check(ctx, r);
            }
        }
    }

    /// Creates or repairs one local endpoint: the veth pair, the task side's
    /// name, MAC, MTU, address and state, and the task's loopback. Returns
    /// the host side.
    async fn ensure_local(
        &self,
        net: &NetworkSpec,
        ep: &LocalEndpoint,
        bridge: &Link,
        mtu: u32,
        links: &Links,
    ) -> Result<Link, NetlinkError> {
        let name = veth_name(&net.id, &ep.id);
        let host = links.get(&self.nl, &name).await?;
        let task = self.nl.enter(&ep.netns)?;
        let peer = task.link(&ep.interface).await?;
        let paired = match (&host, &peer) {
            (Some(h), Some(p)) => {
                // Each side names the other (indexes are per namespace, so
                // one direction alone could match a stranger's veth).
                h.kind == LinkKind::Veth
                    && p.kind == LinkKind::Veth
                    && p.link == Some(h.index)
                    && h.link == Some(p.index)
            }
            _ => false,
        };
        let (host, peer) = if paired {
            let (h, p) = (host.expect("paired"), peer.expect("paired"));
            if h.controller != Some(bridge.index) {
                self.nl.set_controller(&h, bridge.index).await?;
            }
            if h.mtu != mtu {
                self.nl.set_mtu(&h, mtu).await?;
            }
            if !h.up {
                self.nl.set_up(&h).await?;
            }
            if p.mac != Some(ep.mac) {
                task.set_mac(&p, ep.mac).await?;
            }
            if p.mtu != mtu {
                task.set_mtu(&p, mtu).await?;
            }
            (h, p)
        } else {
            if let Some(p) = peer {
                return Err(NetlinkError {
                    op: "create endpoint",
                    object: format!("{} ({})", ep.interface, p.index),
                    ns: task.namespace().into(),
                    source: std::io::Error::new(
                        std::io::ErrorKind::AlreadyExists,
                        "the task namespace already has an interface of that name that mesh did not create for this endpoint",
                    ),
                });
            }
            if let Some(h) = host {
                self.nl.del_link(&h).await?;
            }
            let netns = File::open(&ep.netns).map_err(|source| NetlinkError {
                op: "open namespace",
                object: ep.netns.display().to_string(),
                ns: self.nl.namespace().into(),
                source,
            })?;
            self.nl
                .add_veth(
                    &name,
                    mtu,
                    bridge.index,
                    &VethPeer {
                        name: &ep.interface,
                        netns: &netns,
                        mac: ep.mac,
                        mtu,
                    },
                )
                .await?;
            let h = self.created(&name).await?;
            let p = task
                .link(&ep.interface)
                .await?
                .ok_or_else(|| NetlinkError {
                    op: "find new link",
                    object: ep.interface.clone(),
                    ns: task.namespace().into(),
                    source: std::io::Error::from_raw_os_error(libc::ENODEV),
                })?;
            (h, p)
        };

        // The address: exactly ours among the IPv4 ones (IPv6 link-local stays).
        let want = (IpAddr::V4(ep.ip), net.subnet.prefix());
        let have = task.addresses(peer.index).await?;
        for (ip, prefix) in have.iter().filter(|(ip, _)| ip.is_ipv4()) {
            if (*ip, *prefix) != want {
                task.del_address(&peer, *ip, *prefix).await?;
            }
        }
        if !have.contains(&want) {
            task.add_address(&peer, want.0, want.1).await?;
        }
        if !peer.up {
            task.set_up(&peer).await?;
        }
        if let Some(lo) = task.link("lo").await?
            && !lo.up
        {
            task.set_up(&lo).await?;
        }
        Ok(host)
    }
}
