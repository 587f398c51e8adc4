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

mod error;
mod keys;
mod nft;
mod spec;
mod xfrm;

pub use error::{IpsecError, XfrmError, XfrmOp};
pub use keys::{SentRecord, sa_secret, spi};
pub use nft::{block_plaintext, remove_rules};
pub use spec::{ENCRYPT_MARK, IpsecReport, IpsecSpec, IpsecSpecError, REQID, SaKey};
pub use xfrm::{Ipsec, probe};

#[cfg(test)]
mod tests;
