//! Who may talk to a manager: the cluster's [`pki`] (root CA, node
//! certificates, join tokens), mutual [`tls`] for every connection, and the
//! [`gate`] that bounds what an unauthenticated peer can cost.

pub mod gate;
pub mod pki;
pub mod tls;
