//! A typed layer over rtnetlink, in the style of netavark's wrapper: links
//! (bridge, vxlan, veth), addresses, routes, FDB and neighbour entries, each
//! call named by what it does, each error naming the operation and the object.
//!
//! A [`Netlink`] handle is bound to the network namespace its socket was opened
//! in and can be used from any thread or namespace afterwards; [`Netlink::enter`]
//! opens one inside another namespace (a task's), counting into the same
//! change counter, so a reconciler can report how many kernel changes a pass
//! made across every namespace it touched.

mod addr;
mod handle;
mod link;
mod names;
mod neigh;

pub use addr::Route;
pub use handle::{Netlink, NetlinkError, Result, in_netns};
pub use link::{Link, LinkKind, VXLAN_PORT, VethPeer, VxlanInfo, VxlanSpec};
pub use names::{IFNAME_MAX, Mac, check_ifname};
pub use neigh::{FdbEntry, Neighbour};

#[cfg(test)]
mod tests;
