//! mesh's node identity and the client side of its mutual TLS: the
//! credentials a node keeps, what its certificate says (node id, role,
//! cluster), and a channel to a manager. Shared by the control plane and
//! `meshctl`; the CA that issues certificates and the TLS server with its
//! admission gate stay in `control`.

pub mod client;
pub mod identity;

pub use client::{Credentials, TlsError, Trust};
pub use identity::{CertError, Identity};
