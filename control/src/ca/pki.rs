//! The cluster PKI, as in Swarm: a P-256 root CA created at init, node
//! certificates carrying the node id (CN), its role (OU) and the cluster id
//! (O), and join tokens `MESH-1-<CA digest>-<secret>`.
//!
//! The digest in a token pins the CA: a joining node checks the CA
//! certificate the manager presents against it before sending anything, so
//! a token is useless against a different (impostor) cluster.
//!
//! The state never holds a token's secret: it keeps a [`TokenRecord`] (a
//! nonce and a salted SHA-256 of the secret), and a presented secret is
//! compared with it in constant time. The secret is an HMAC of the nonce
//! under the CA key, so `join-token` can show it again to whoever holds the
//! CA key (a manager), and a rotation (a new nonce) makes the old one fail.

use std::{fmt, str::FromStr, time::Duration};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
};
use ring::{
    digest::{SHA256, digest},
    rand::{SecureRandom, SystemRandom},
};
use time::OffsetDateTime;

use crate::state::{Role, TokenRecord};

pub use mtls::identity::{
    Identity, MANAGER_SERVER_NAME, ca_digest, der_digest, identity, identity_der, now, pem_to_der,
    role_name,
};

/// Default certificate lifetime (Swarm's is 90 days too).
pub use model::DEFAULT_CERT_LIFETIME;
const TOKEN_PREFIX: &str = "MESH-1-";
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("{0}")]
    Cert(String),
    #[error("{0:?} is not a join token: it looks like MESH-1-<64 hex digits>-<secret>")]
    BadToken(String),
    #[error(
        "the manager's CA (digest {presented}) is not the one in the token ({expected}): wrong token, wrong address, or someone in between"
    )]
    CaMismatch { expected: String, presented: String },
    #[error("the join token is not valid for this cluster (wrong or rotated)")]
    TokenRefused,
    #[error("the system random source failed")]
    Random,
    #[error(transparent)]
    Identity(#[from] mtls::CertError),
}

fn cert_err(e: impl fmt::Display) -> PkiError {
    PkiError::Cert(e.to_string())
}

/// SHA-256 of salt and secret, in hex: what a [`TokenRecord`] keeps.
fn salted_hash(salt: &str, secret: &str) -> String {
    let mut input = Vec::with_capacity(salt.len() + secret.len());
    input.extend(salt.as_bytes());
    input.extend(secret.as_bytes());
    hex(digest(&SHA256, &input).as_ref())
}

use mtls::identity::hex;

/// The cluster's root CA.
#[derive(Clone)]
pub struct Ca {
    pub cert_pem: String,
    key_pem: String,
}

impl fmt::Debug for Ca {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ca").finish_non_exhaustive()
    }
}

impl Ca {
    /// A new self-signed P-256 root for `cluster_id`, valid 20 years.
    pub fn create(cluster_id: &str) -> Result<Ca, PkiError> {
        let key = KeyPair::generate().map_err(cert_err)?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, "mesh root CA");
        dn.push(DnType::OrganizationName, cluster_id);
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::hours(1);
        params.not_after = now + time::Duration::days(20 * 365);
        let cert = params.self_signed(&key).map_err(cert_err)?;
        Ok(Ca {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// A CA from its stored certificate and key.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Ca {
        Ca {
            cert_pem: cert_pem.to_owned(),
            key_pem: key_pem.to_owned(),
        }
    }

    pub fn key_pem(&self) -> &str {
        &self.key_pem
    }

    pub fn digest(&self) -> Result<String, PkiError> {
        Ok(ca_digest(&self.cert_pem)?)
    }

    /// Signs a node's CSR: the certificate names `node_id`, its role and
    /// the cluster, whatever the CSR asked for.
    pub fn issue(
        &self,
        csr_pem: &str,
        cluster_id: &str,
        node_id: &str,
        role: Role,
        lifetime: Duration,
    ) -> Result<String, PkiError> {
        let key = KeyPair::from_pem(&self.key_pem).map_err(cert_err)?;
        let issuer = Issuer::from_ca_cert_pem(&self.cert_pem, key).map_err(cert_err)?;
        let mut csr = CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|e| PkiError::Cert(format!("bad certificate request: {e}")))?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, node_id);
        dn.push(DnType::OrganizationalUnitName, role_name(role));
        dn.push(DnType::OrganizationName, cluster_id);
        let p = &mut csr.params;
        p.distinguished_name = dn;
        p.is_ca = IsCa::ExplicitNoCa;
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        // SANs: the node id, and the role name, which is what TLS clients
        // verify a server by ("mesh-manager"): a worker's certificate can
        // never pass as a manager's.
        p.subject_alt_names = vec![
            rcgen::SanType::DnsName(node_id.try_into().map_err(cert_err)?),
            rcgen::SanType::DnsName(role_name(role).try_into().map_err(cert_err)?),
        ];
        let now = OffsetDateTime::now_utc();
        p.not_before = now - time::Duration::minutes(5);
        p.not_after = time::Duration::try_from(lifetime)
            .ok()
            .and_then(|d| now.checked_add(d))
            .filter(|t| t.year() <= 9999)
            .ok_or_else(|| {
                PkiError::Cert(format!(
                    "a certificate lifetime of {} s ends past the year 9999; use a shorter one",
                    lifetime.as_secs()
                ))
            })?;
        let cert = csr.signed_by(&issuer).map_err(cert_err)?;
        Ok(cert.pem())
    }
}

/// A node's new key and its certificate request.
pub fn node_key_and_csr() -> Result<(String, String), PkiError> {
    let key = KeyPair::generate().map_err(cert_err)?;
    let csr = CertificateParams::default()
        .serialize_request(&key)
        .map_err(cert_err)?;
    Ok((key.serialize_pem(), csr.pem().map_err(cert_err)?))
}

/// Whether a certificate should be renewed: in the last third of its life.
pub fn needs_renewal(not_after: i64, now: i64, lifetime: Duration) -> bool {
    not_after - now < (lifetime.as_secs() / 3) as i64
}

/// A join token as the operator handles it.
#[derive(Clone, PartialEq, Eq)]
pub struct JoinToken {
    pub ca_digest: String,
    pub secret: String,
}

impl JoinToken {
    /// The token of `role` whose record has `nonce`, under the CA key.
    pub fn derive(ca_digest: &str, ca_key_pem: &str, role: Role, nonce: &str) -> JoinToken {
        use ring::hmac;
        let key = hmac::Key::new(hmac::HMAC_SHA256, ca_key_pem.as_bytes());
        let msg = format!("mesh join token/{}/{nonce}", role_name(role));
        let tag = hmac::sign(&key, msg.as_bytes());
        JoinToken {
            ca_digest: ca_digest.to_owned(),
            secret: hex(&tag.as_ref()[..16]),
        }
    }

    /// A new token of `role` (a new nonce) and the record the state keeps
    /// of it.
    pub fn issue(
        ca_digest: &str,
        ca_key_pem: &str,
        role: Role,
    ) -> Result<(JoinToken, TokenRecord), PkiError> {
        let rng = SystemRandom::new();
        let mut nonce = [0u8; 16];
        let mut salt = [0u8; 16];
        rng.fill(&mut nonce).map_err(|_| PkiError::Random)?;
        rng.fill(&mut salt).map_err(|_| PkiError::Random)?;
        let nonce = hex(&nonce);
        let token = JoinToken::derive(ca_digest, ca_key_pem, role, &nonce);
        let salt = hex(&salt);
        let hash = salted_hash(&salt, &token.secret);
        Ok((token, TokenRecord { nonce, salt, hash }))
    }

    /// Checks the secret against a record, in constant time.
    pub fn check(&self, record: &TokenRecord) -> Result<(), PkiError> {
        let ours = salted_hash(&record.salt, &self.secret);
        let same = ours.len() == record.hash.len()
            && ours
                .bytes()
                .zip(record.hash.bytes())
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0;
        if same {
            Ok(())
        } else {
            Err(PkiError::TokenRefused)
        }
    }

    /// Checks the CA a manager presented against the token's digest.
    pub fn check_ca(&self, ca_cert_pem: &str) -> Result<(), PkiError> {
        let presented = ca_digest(ca_cert_pem)?;
        if presented == self.ca_digest {
            Ok(())
        } else {
            Err(PkiError::CaMismatch {
                expected: self.ca_digest.clone(),
                presented,
            })
        }
    }
}

impl fmt::Display for JoinToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{TOKEN_PREFIX}{}-{}", self.ca_digest, self.secret)
    }
}

impl fmt::Debug for JoinToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "JoinToken({TOKEN_PREFIX}{}-…)", self.ca_digest)
    }
}

impl FromStr for JoinToken {
    type Err = PkiError;

    fn from_str(s: &str) -> Result<JoinToken, PkiError> {
        let bad = || PkiError::BadToken(s.to_owned());
        let rest = s.trim().strip_prefix(TOKEN_PREFIX).ok_or_else(bad)?;
        let (digest, secret) = rest.split_once('-').ok_or_else(bad)?;
        let is_hex = |t: &str| t.bytes().all(|b| b.is_ascii_hexdigit());
        if digest.len() != 64 || !is_hex(digest) || secret.len() < 16 || !is_hex(secret) {
            return Err(bad());
        }
        Ok(JoinToken {
            ca_digest: digest.to_ascii_lowercase(),
            secret: secret.to_ascii_lowercase(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn now() -> i64 {
        OffsetDateTime::now_utc().unix_timestamp()
    }

    #[test]
    fn a_node_certificate_carries_id_role_and_cluster() {
        let ca = Ca::create("cluster-1").unwrap();
        let (_key, csr) = node_key_and_csr().unwrap();
        let cert = ca
            .issue(
                &csr,
                "cluster-1",
                "node-abc",
                Role::Worker,
                DEFAULT_CERT_LIFETIME,
            )
            .unwrap();
        let id = identity(&cert, &ca.cert_pem, now()).unwrap();
        assert_eq!(
            (id.node_id.as_str(), id.role, id.cluster_id.as_str()),
            ("node-abc", Role::Worker, "cluster-1")
        );
        let days = (id.not_after - now()) / 86400;
        assert!((89..=90).contains(&days), "{days} days");
        assert!(!needs_renewal(id.not_after, now(), DEFAULT_CERT_LIFETIME));
        assert!(needs_renewal(
            id.not_after,
            now() + 61 * 86400,
            DEFAULT_CERT_LIFETIME
        ));
        // Another cluster's CA does not vouch for it; nor is it valid after expiry.
        let other = Ca::create("cluster-2").unwrap();
        let err = identity(&cert, &other.cert_pem, now())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("not signed by this cluster's CA (expected the CA with digest "),
            "{err}"
        );
        let err = identity(&cert, &ca.cert_pem, now() + 91 * 86400)
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("certificate expired at "), "{err}");
        assert!(err.contains("Join the node again"), "{err}");
        let err = ca
            .issue("garbage", "c", "n", Role::Worker, DEFAULT_CERT_LIFETIME)
            .unwrap_err();
        assert!(err.to_string().contains("bad certificate request"), "{err}");
    }

    #[test]
    fn tokens_pin_the_ca_and_only_their_secret_passes() {
        let ca = Ca::create("c").unwrap();
        let digest = ca.digest().unwrap();
        let (token, record) = JoinToken::issue(&digest, ca.key_pem(), Role::Worker).unwrap();
        let text = token.to_string();
        assert!(
            text.starts_with("MESH-1-") && text.len() == 7 + 64 + 1 + 32,
            "{text}"
        );
        let parsed: JoinToken = text.parse().unwrap();
        assert_eq!(parsed, token);
        assert!(
            !format!("{token:?}").contains(&token.secret),
            "Debug leaks the secret"
        );
        parsed.check_ca(&ca.cert_pem).unwrap();
        parsed.check(&record).unwrap();
        // The record keeps neither the secret nor its plain hash.
        let kept = format!("{record:?}");
        assert!(!kept.contains(&token.secret), "the record holds the secret");
        assert!(!kept.contains(&salted_hash("", &token.secret)));
        // The CA key and the nonce give the same token again (join-token).
        assert_eq!(
            JoinToken::derive(&digest, ca.key_pem(), Role::Worker, &record.nonce),
            token
        );
        // The other role, another CA key: other secrets.
        assert_ne!(
            JoinToken::derive(&digest, ca.key_pem(), Role::Manager, &record.nonce),
            token
        );
        let other = Ca::create("c").unwrap();
        assert_ne!(
            JoinToken::derive(&digest, other.key_pem(), Role::Worker, &record.nonce),
            token
        );
        // A rotated token: new nonce and salt; each fails the other's record.
        let (rotated, new_record) = JoinToken::issue(&digest, ca.key_pem(), Role::Worker).unwrap();
        assert_ne!(rotated, token);
        assert!(matches!(
            token.check(&new_record),
            Err(PkiError::TokenRefused)
        ));
        assert!(matches!(
            rotated.check(&record),
            Err(PkiError::TokenRefused)
        ));
        rotated.check(&new_record).unwrap();
        // An impostor CA.
        let impostor = Ca::create("c").unwrap();
        let err = parsed.check_ca(&impostor.cert_pem).unwrap_err().to_string();
        assert!(err.contains("is not the one in the token"), "{err}");
        for bad in [
            "",
            "MESH-1-abc-def",
            "SWMTKN-1-x-y",
            &format!("MESH-1-{}-short", "a".repeat(64)),
        ] {
            let err = bad.parse::<JoinToken>().unwrap_err().to_string();
            assert!(err.contains("is not a join token"), "{err}");
        }
    }
}
