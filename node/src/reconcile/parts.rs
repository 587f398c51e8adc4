//! [`Dataplane`] as the [`Parts`] an update reaches.

use std::net::Ipv4Addr;

use dataplane::{
    ipsec::IpsecSpec,
    tables::{NodeView, OverlayUpdate},
};
use model::{session::Update, tables::Tables};

use super::Parts;
use crate::{Dataplane, error::ApplyError};

impl Parts for Dataplane {
    fn validate(&self, ipsec: &IpsecSpec, overlay: &OverlayUpdate) -> Result<(), ApplyError> {
        super::validate_specs(ipsec, overlay)
    }

    fn ipsec_applied(&self) -> &IpsecSpec {
        &self.ipsec_spec
    }

    fn ipsec(&mut self, spec: IpsecSpec) -> Result<(), ApplyError> {
        self.sync_ipsec(spec)
    }

    async fn overlay(&mut self, update: OverlayUpdate) -> Result<u64, ApplyError> {
        let report = match update {
            OverlayUpdate::Unchanged => return Ok(0),
            OverlayUpdate::Changes(c) => self.overlay.apply_changes(&c).await?,
            OverlayUpdate::Whole(spec) => self.overlay.apply(spec).await?,
        };
        Ok(report.changes)
    }

    fn lb_follows_tables(&self) -> bool {
        self.lb_from_tables
    }

    async fn lb(
        &mut self,
        tables: &Tables,
        update: Update<'_>,
        view: &NodeView,
        underlay: Ipv4Addr,
    ) -> Result<(), ApplyError> {
        self.sync_lb(tables, update, view, underlay).await
    }
}
