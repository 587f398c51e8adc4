//! mesh's node identity and the client side of its mutual TLS: the
//! credentials a node keeps, what its certificate says (node id, role,
//! cluster), a channel to a manager, the data dir's node file, and how a
//! gRPC status reads to a person. Shared by the control plane and
//! `meshctl`; the CA that issues certificates and the TLS server with its
//! admission gate stay in `control`.

pub mod client;
pub mod datadir;
pub mod grpc;
pub mod identity;
pub mod ids;

pub use client::{Credentials, TlsError, Trust};
pub use identity::{CertError, Identity};
