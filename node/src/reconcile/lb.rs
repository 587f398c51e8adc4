//! The load balancer's part of an update: which overlay bridges it is
//! attached to (where replies and local tasks' flows to VIPs arrive), the
//! node's NAT address on each, and the frontends.

use std::{collections::BTreeMap, fs, net::Ipv4Addr};

use dataplane::{
    overlay,
    tables::{LbView, NodeView},
};
use model::{session::Update, tables::Tables};

use crate::{Dataplane, attach::lb_target, error::ApplyError};

impl Dataplane {
    /// Makes the load balancer match the tables. On a whole update:
    /// attaches it to the bridge of every network this node is on, gives
    /// each bridge its NAT address, and syncs every frontend; on a delta,
    /// only the services the delta touched. Either way only the difference
    /// is written.
    pub(crate) async fn sync_lb(
        &mut self,
        tables: &Tables,
        update: Update<'_>,
        view: &NodeView,
        underlay: Ipv4Addr,
    ) -> Result<(), ApplyError> {
        if matches!(update, Update::Whole) {
            self.lb_bridges = view
                .networks()
                .iter()
                .filter_map(|(net, addr)| {
                    let (_, n) = tables.networks().find(|(id, _)| id == net)?;
                    Some((overlay::bridge_name(n.vni), *addr))
                })
                .collect();
            self.refresh_bridges().await?;
        }
        if self.lb_node.as_deref() != Some(view.node()) {
            self.lb = LbView::for_node(view.node());
            self.lb_node = Some(view.node().to_owned());
        }
        let nat = self.nat_interfaces();
        let report = self.lb.sync(
            tables,
            update,
            view.networks(),
            vec![underlay],
            nat,
            &mut *lb_target(&mut self.datapath, &mut self.sync, &mut self.ipvs),
        )?;
        if report.total() > 0 {
            tracing::debug!(?report, revision = tables.revision, "load balancer synced");
        }
        Ok(())
    }

    /// A bridge the overlay's resync re-created has a new index: attach
    /// the load balancer there and move its NAT address.
    pub(crate) async fn resync_lb(&mut self) -> Result<(), ApplyError> {
        if !self.lb_from_tables {
            return Ok(());
        }
        let before = self.bridges.clone();
        self.refresh_bridges().await?;
        if self.bridges == before {
            return Ok(());
        }
        let nat = self.nat_interfaces();
        self.lb.set_nat_interfaces(
            nat,
            &mut *lb_target(&mut self.datapath, &mut self.sync, &mut self.ipvs),
        )?;
        Ok(())
    }

    /// NAT address per attached bridge index.
    fn nat_interfaces(&self) -> BTreeMap<u32, Ipv4Addr> {
        self.bridges
            .iter()
            .filter_map(|(name, index)| Some((*index, *self.lb_bridges.get(name)?)))
            .collect()
    }

    /// Attaches the load balancer to every bridge it should be on that has
    /// no link yet (new, or re-created with a new index).
    async fn refresh_bridges(&mut self) -> Result<(), ApplyError> {
        let mut bridges = BTreeMap::new();
        for name in self.lb_bridges.keys() {
            let link =
                self.overlay
                    .netlink()
                    .link(name)
                    .await
                    .map_err(|source| ApplyError::Bridge {
                        bridge: name.clone(),
                        source,
                    })?;
            // Not built (yet): the overlay reports why, and a retry follows.
            let Some(link) = link else { continue };
            bridges.insert(name.clone(), link.index);
        }
        for (name, index) in &bridges {
            if self.bridges.get(name) != Some(index) {
                self.attach_bridge(name, *index)?;
            }
        }
        self.bridges = bridges;
        Ok(())
    }

    /// Attaches the load balancer to a bridge, pinned by name and index: a
    /// restart reuses the link; a bridge that was re-created gets a new one.
    fn attach_bridge(&mut self, name: &str, index: u32) -> Result<(), ApplyError> {
        let prefix = format!("link_tc_{name}@");
        if let Ok(dir) = fs::read_dir(&self.pin_dir) {
            for e in dir.flatten() {
                let file = e.file_name().to_string_lossy().into_owned();
                if file.starts_with(&prefix) && file != format!("{prefix}{index}") {
                    let _ = fs::remove_file(e.path());
                }
            }
        }
        let pin = self.pin_dir.join(format!("{prefix}{index}"));
        self.datapath
            .attach_lb(name, Some(&pin))
            .map_err(|source| ApplyError::Attach {
                bridge: name.to_owned(),
                source,
            })
    }
}
