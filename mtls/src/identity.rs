//! What a node certificate says: its node id (CN), role (OU) and cluster
//! (O), checked against the cluster CA and the clock. Issuing lives with
//! the CA (`control::ca::pki`).

use std::fmt;

use model::Role;
use ring::digest::{SHA256, digest};

/// Why a certificate is not a valid node certificate of this cluster now.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CertError {
    #[error("{0}")]
    Cert(String),
    #[error("certificate is not a mesh node certificate: {0}")]
    NotANode(String),
    #[error(
        "certificate expired at {at}. A running node renews its certificate in the last third \
         of its lifetime; this one was stopped for longer. Join the node again with a current \
         token (`meshctl swarm join-token worker|manager` on a manager, then `meshd join`)"
    )]
    Expired { at: String },
    #[error("certificate is not valid before {at}: check this host's clock")]
    NotYetValid { at: String },
    #[error(
        "certificate is not signed by this cluster's CA (expected the CA with digest {expected}): \
         it belongs to another cluster, or the CA was rotated since it was issued"
    )]
    ForeignCa { expected: String },
}

fn cert_err(e: impl fmt::Display) -> CertError {
    CertError::Cert(e.to_string())
}

pub const OU_MANAGER: &str = "mesh-manager";
pub const OU_WORKER: &str = "mesh-worker";

/// The name a role has in certificates (OU and a DNS SAN). TLS clients
/// connect to managers under [`MANAGER_SERVER_NAME`].
pub fn role_name(role: Role) -> &'static str {
    match role {
        Role::Manager => OU_MANAGER,
        Role::Worker => OU_WORKER,
    }
}

/// The server name clients verify a manager's certificate against.
pub const MANAGER_SERVER_NAME: &str = OU_MANAGER;

/// Lowercase hex.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// SHA-256 of a certificate's DER, in hex: what join tokens pin.
pub fn ca_digest(ca_cert_pem: &str) -> Result<String, CertError> {
    Ok(der_digest(&pem_to_der(ca_cert_pem)?))
}

/// SHA-256 of DER bytes, in hex (a certificate as TLS hands it over).
pub fn der_digest(der: &[u8]) -> String {
    hex(digest(&SHA256, der).as_ref())
}

/// Seconds since the epoch, as certificate validity is compared.
pub fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

pub fn pem_to_der(pem: &str) -> Result<Vec<u8>, CertError> {
    let (_, p) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).map_err(cert_err)?;
    Ok(p.contents)
}

/// Who a node certificate says it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub node_id: String,
    pub role: Role,
    pub cluster_id: String,
    /// Seconds since the epoch.
    pub not_after: i64,
}

/// Reads and checks a node certificate: signed by `ca_cert_pem`, within its
/// validity, with a mesh role.
pub fn identity(cert_pem: &str, ca_cert_pem: &str, now: i64) -> Result<Identity, CertError> {
    identity_der(&pem_to_der(cert_pem)?, &pem_to_der(ca_cert_pem)?, now)
}

/// [`identity`] for DER certificates (as TLS hands them over).
pub fn identity_der(der: &[u8], ca_der: &[u8], now: i64) -> Result<Identity, CertError> {
    let (_, cert) =
        x509_parser::parse_x509_certificate(der).map_err(|e| CertError::NotANode(e.to_string()))?;
    let (_, ca) = x509_parser::parse_x509_certificate(ca_der).map_err(cert_err)?;
    cert.verify_signature(Some(ca.public_key()))
        .map_err(|_| CertError::ForeignCa {
            expected: der_digest(ca_der),
        })?;
    let v = cert.validity();
    if now < v.not_before.timestamp() {
        return Err(CertError::NotYetValid {
            at: v.not_before.to_string(),
        });
    }
    if now > v.not_after.timestamp() {
        return Err(CertError::Expired {
            at: v.not_after.to_string(),
        });
    }
    let first = |it: &mut dyn Iterator<Item = &x509_parser::x509::AttributeTypeAndValue<'_>>| {
        it.next().and_then(|a| a.as_str().ok()).map(str::to_owned)
    };
    let subject = cert.subject();
    let node_id = first(&mut subject.iter_common_name())
        .ok_or_else(|| CertError::NotANode("no CN".into()))?;
    let role = match first(&mut subject.iter_organizational_unit()).as_deref() {
        Some(OU_MANAGER) => Role::Manager,
        Some(OU_WORKER) => Role::Worker,
        other => return Err(CertError::NotANode(format!("role {other:?}"))),
    };
    let cluster_id = first(&mut subject.iter_organization())
        .ok_or_else(|| CertError::NotANode("no O".into()))?;
    Ok(Identity {
        node_id,
        role,
        cluster_id,
        not_after: v.not_after.timestamp(),
    })
}
