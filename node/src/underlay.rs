//! The node's underlay prefixes: what the cluster keeps every network out
//! of. Read from the interface that holds the node's address, and followed
//! so the agent can report a change.

use std::{net::Ipv4Addr, time::Duration};

use dataplane::netlink::{Netlink, NetlinkError};
use model::Subnet;

/// The IPv4 prefixes on the interface that holds `addr`. None when no
/// local interface holds it (an address advertised through NAT); `addr`
/// itself is still protected.
pub async fn prefixes(addr: Ipv4Addr) -> Result<Vec<Subnet>, NetlinkError> {
    let nl = Netlink::current()?;
    let Some(index) = nl.link_with_address(addr.into()).await? else {
        return Ok(Vec::new());
    };
    Ok(nl
        .addresses(index)
        .await?
        .into_iter()
        .filter_map(|(ip, prefix)| match ip {
            std::net::IpAddr::V4(v4) => Some(Subnet::containing(v4, prefix)),
            std::net::IpAddr::V6(_) => None,
        })
        .collect())
}

/// How often a node re-reads its underlay prefixes (a netlink dump).
const POLL: Duration = Duration::from_secs(5);

/// Follows the prefixes on the interface holding `addr`, re-read every
/// [`POLL`]; the agent reports each change to the cluster. Starts from
/// what the interface holds now, so a session never reports a placeholder.
/// The watcher ends when nobody follows it.
pub async fn watch(
    addr: Ipv4Addr,
) -> Result<tokio::sync::watch::Receiver<Vec<Subnet>>, NetlinkError> {
    let mut now = prefixes(addr).await?;
    now.sort();
    let (tx, rx) = tokio::sync::watch::channel(now);
    tokio::spawn(async move {
        loop {
            tokio::select! {
                () = tx.closed() => return,
                () = tokio::time::sleep(POLL) => {}
            }
            match prefixes(addr).await {
                Ok(mut p) => {
                    p.sort();
                    tx.send_if_modified(|old| {
                        let changed = *old != p;
                        if changed {
                            tracing::info!(?p, "the underlay interface's prefixes changed");
                            *old = p;
                        }
                        changed
                    });
                }
                Err(e) => tracing::debug!("reading the underlay prefixes: {e}"),
            }
        }
    });
    Ok(rx)
}
