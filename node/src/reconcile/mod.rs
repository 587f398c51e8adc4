//! How an update of the tables reaches the kernel, part by part, in this
//! order (see [`crate::Node`]):
//!
//! 1. **IPsec, widened**: the states and policies the update adds, none it
//!    removes yet. An encrypted network's VXLAN device never exists
//!    without its protection.
//! 2. **The overlay**: bridges, VXLAN devices, FDB and neighbour entries,
//!    task endpoints.
//! 3. **The load balancer**: attached to the bridges the overlay built,
//!    then every frontend the update touched.
//! 4. **IPsec, exact**: what the update took away goes, now that the
//!    overlay no longer uses it.
//! 5. **DNS**: after the overlay, so a new task's namespace has its `lo`
//!    up when its server binds 127.0.0.11.
//!
//! Each part writes only the difference, and re-reads the kernel on a
//! resync to repair drift.

mod ipsec;
mod lb;
mod parts;

use std::{future::Future, net::Ipv4Addr};

use dataplane::{
    ipsec::IpsecSpec,
    tables::{NodeView, OverlayUpdate},
};
use model::{session::Update, tables::Tables};

use crate::error::ApplyError;

/// The parts of a node an update reaches, each bringing itself to what it
/// is handed and writing only the difference. [`crate::Dataplane`] is the
/// real one; the tests use a fake that records the calls.
pub(crate) trait Parts: Send {
    /// Whether the parts can take what an update hands them, checked before
    /// any of them is touched: a spec one part would refuse must not leave
    /// the parts before it changed. (The load balancer's spec is built and
    /// validated inside [`Parts::lb`], which writes nothing it refuses.)
    fn validate(&self, ipsec: &IpsecSpec, overlay: &OverlayUpdate) -> Result<(), ApplyError>;
    /// The IPsec spec last handed to [`Parts::ipsec`].
    fn ipsec_applied(&self) -> &IpsecSpec;
    fn ipsec(&mut self, spec: IpsecSpec) -> Result<(), ApplyError>;
    /// Netlink changes made.
    fn overlay(
        &mut self,
        update: OverlayUpdate,
    ) -> impl Future<Output = Result<u64, ApplyError>> + Send;
    /// Whether the load balancer follows the tables (a node with a
    /// control plane), rather than a `--config` file.
    fn lb_follows_tables(&self) -> bool;
    fn lb(
        &mut self,
        tables: &Tables,
        update: Update<'_>,
        view: &NodeView,
        underlay: Ipv4Addr,
    ) -> impl Future<Output = Result<(), ApplyError>> + Send;
}

/// The specs' own checks (what the kernel would refuse partway): the IPsec
/// spec's keys, and a whole overlay's table.
pub(crate) fn validate_specs(ipsec: &IpsecSpec, overlay: &OverlayUpdate) -> Result<(), ApplyError> {
    ipsec.validate().map_err(|e| ApplyError::Ipsec(e.into()))?;
    if let OverlayUpdate::Whole(spec) = overlay {
        spec.validate()?;
    }
    Ok(())
}

/// Steps 1 to 4 of an update, in order, after every part validated what it
/// is handed; the first failure stops the rest (so nothing is taken away
/// while what replaces it is not in place). Returns the overlay's netlink
/// changes, if it had any to make.
pub(crate) async fn apply_in_order<P: Parts>(
    parts: &mut P,
    view: &mut NodeView,
    tables: &Tables,
    update: Update<'_>,
    node: &str,
    underlay: Ipv4Addr,
) -> Result<Option<u64>, ApplyError> {
    let exact = dataplane::tables::ipsec_spec(tables, node, underlay);
    let widened = exact.widened(parts.ipsec_applied());
    let overlay = view.overlay(tables, update);
    parts.validate(&widened, &overlay)?;
    parts.validate(&exact, &OverlayUpdate::Unchanged)?;
    parts.ipsec(widened)?;
    let whole = matches!(overlay, OverlayUpdate::Whole(_));
    let changes = match overlay {
        OverlayUpdate::Unchanged => None,
        other => Some(parts.overlay(other).await?),
    };
    if parts.lb_follows_tables() {
        // A whole overlay (the node's networks changed) needs a whole
        // load balancer.
        let update = if whole { Update::Whole } else { update };
        parts.lb(tables, update, view, underlay).await?;
    }
    parts.ipsec(exact)?;
    Ok(changes)
}

#[cfg(test)]
mod tests;
