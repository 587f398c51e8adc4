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
