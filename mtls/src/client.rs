//! The client side of mesh's mutual TLS (rustls, ring provider, TLS 1.3),
//! and the credentials a node keeps. Clients verify a manager against the
//! cluster CA under the name `mesh-manager`, a SAN only manager
//! certificates carry; a joining client pins the CA by the digest in its
//! token instead. We run the handshake ourselves (tokio-rustls) rather than
//! tonic's built-in TLS, so that a joining client can pin the CA.

use std::{
    fmt, io,
    net::SocketAddr,
    path::Path,
    sync::{Arc, Mutex, RwLock},
    time::Duration,
};

use hyper_util::rt::TokioIo;
use rustls::{
    ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    crypto::{CryptoProvider, WebPkiSupportedAlgorithms},
    pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime, pem::PemObject},
    sign::CertifiedKey,
};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tonic::transport::{Channel, Endpoint, Uri};

use crate::identity::MANAGER_SERVER_NAME;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{what}: {source}")]
    Pem {
        what: &'static str,
        source: rustls::pki_types::pem::Error,
    },
    #[error("TLS setup: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("TLS client verifier: {0}")]
    Verifier(String),
    #[error("{path}: {source}")]
    Io { path: String, source: io::Error },
    #[error("bad address {0:?}: {1}")]
    Address(String, String),
}

/// The ring provider, named explicitly so that no process-wide default is
/// needed (and no other provider can be picked up by accident).
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A node's TLS material, PEM-encoded.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub ca: String,
    pub cert: String,
    pub key: String,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Credentials(..)")
    }
}

const CA_FILE: &str = "ca.crt";
const CERT_FILE: &str = "node.crt";
const KEY_FILE: &str = "node.key";

impl Credentials {
    /// Reads `ca.crt`, `node.crt` and `node.key` from `dir`.
    pub fn load(dir: &Path) -> Result<Credentials, TlsError> {
        let read = |name: &str| {
            let path = dir.join(name);
            std::fs::read_to_string(&path).map_err(|source| TlsError::Io {
                path: path.display().to_string(),
                source,
            })
        };
        Ok(Credentials {
            ca: read(CA_FILE)?,
            cert: read(CERT_FILE)?,
            key: read(KEY_FILE)?,
        })
    }

    /// Writes the three files (the key 0600), each atomically.
    pub fn save(&self, dir: &Path) -> Result<(), TlsError> {
        use std::os::unix::fs::OpenOptionsExt;
        let io_err = |path: &Path| {
            let path = path.display().to_string();
            move |source| TlsError::Io {
                path: path.clone(),
                source,
            }
        };
        std::fs::create_dir_all(dir).map_err(io_err(dir))?;
        for (name, body, mode) in [
            (CA_FILE, &self.ca, 0o644),
            (CERT_FILE, &self.cert, 0o644),
            (KEY_FILE, &self.key, 0o600),
        ] {
            let path = dir.join(name);
            let tmp = dir.join(format!(".{name}.tmp"));
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(mode)
                .open(&tmp)
                .map_err(io_err(&tmp))?;
            io::Write::write_all(&mut f, body.as_bytes()).map_err(io_err(&tmp))?;
            f.sync_all().map_err(io_err(&tmp))?;
            std::fs::rename(&tmp, &path).map_err(io_err(&path))?;
        }
        Ok(())
    }

    pub fn ca_der(&self) -> Result<CertificateDer<'static>, TlsError> {
        CertificateDer::from_pem_slice(self.ca.as_bytes()).map_err(|source| TlsError::Pem {
            what: "CA certificate",
            source,
        })
    }

    pub fn cert_der(&self) -> Result<CertificateDer<'static>, TlsError> {
        CertificateDer::from_pem_slice(self.cert.as_bytes()).map_err(|source| TlsError::Pem {
            what: "node certificate",
            source,
        })
    }

    pub fn key_der(&self) -> Result<PrivateKeyDer<'static>, TlsError> {
        PrivateKeyDer::from_pem_slice(self.key.as_bytes()).map_err(|source| TlsError::Pem {
            what: "node key",
            source,
        })
    }

    /// The CA certificate in DER.
    pub fn ca_bytes(&self) -> Result<Vec<u8>, TlsError> {
        Ok(self.ca_der()?.to_vec())
    }

    /// The node certificate and the CA behind it, with the node's key.
    pub fn certified_key(&self) -> Result<Arc<CertifiedKey>, TlsError> {
        let key = provider().key_provider.load_private_key(self.key_der()?)?;
        Ok(Arc::new(CertifiedKey::new(
            vec![self.cert_der()?, self.ca_der()?],
            key,
        )))
    }
}

/// How a client decides to trust a manager.
#[derive(Clone)]
pub enum Trust {
    /// The cluster CA (PEM), with this node's certificate as the client's.
    Node(Arc<RwLock<Credentials>>),
    /// The CA (PEM), and no client certificate.
    Anonymous(String),
    /// A joining node: the CA is whatever the server presents behind its
    /// certificate, provided its SHA-256 is `digest`. What was presented is
    /// recorded in `seen` for the error message.
    Pinned {
        digest: String,
        seen: Arc<Mutex<Option<PinnedCa>>>,
    },
}

/// The CA a manager presented to a joining client.
#[derive(Debug, Clone)]
pub struct PinnedCa {
    pub digest: String,
    pub der: Vec<u8>,
}

pub fn client_config(trust: &Trust) -> Result<ClientConfig, TlsError> {
    let provider = provider();
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?;
    let roots_for = |ca: &CertificateDer<'static>| -> Result<Arc<RootCertStore>, TlsError> {
        let mut roots = RootCertStore::empty();
        roots.add(ca.clone())?;
        Ok(Arc::new(roots))
    };
    let mut config = match trust {
        Trust::Node(creds) => {
            let creds = creds.read().expect("creds lock").clone();
            builder
                .with_root_certificates(roots_for(&creds.ca_der()?)?)
                .with_client_auth_cert(vec![creds.cert_der()?], creds.key_der()?)?
        }
        Trust::Anonymous(ca) => {
            let ca =
                CertificateDer::from_pem_slice(ca.as_bytes()).map_err(|source| TlsError::Pem {
                    what: "CA certificate",
                    source,
                })?;
            builder
                .with_root_certificates(roots_for(&ca)?)
                .with_no_client_auth()
        }
        Trust::Pinned { digest, seen } => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(PinnedVerifier {
                digest: digest.clone(),
                seen: seen.clone(),
                algorithms: provider.signature_verification_algorithms,
                provider: provider.clone(),
            }))
            .with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

/// A lazily connecting gRPC channel to `addr` (host:port). Each new
/// connection builds its TLS config from the current credentials, so a
/// renewed certificate is used from the next connection on.
pub fn channel(addr: &str, trust: Trust, timeout: Duration) -> Result<Channel, TlsError> {
    channel_to(addr, trust, MANAGER_SERVER_NAME, timeout)
}

/// A channel to the node `node_id` (any role): its certificate must be the
/// cluster's and name that node (every node certificate carries its id as
/// a DNS name).
pub fn node_channel(
    addr: &str,
    creds: Arc<RwLock<Credentials>>,
    node_id: &str,
    timeout: Duration,
) -> Result<Channel, TlsError> {
    channel_to(addr, Trust::Node(creds), node_id, timeout)
}

fn channel_to(
    addr: &str,
    trust: Trust,
    server_name: &str,
    timeout: Duration,
) -> Result<Channel, TlsError> {
    ServerName::try_from(server_name.to_owned())
        .map_err(|e| TlsError::Address(addr.to_owned(), format!("{server_name:?}: {e}")))?;
    let server_name = server_name.to_owned();
    let uri: Uri =
        format!("http://{addr}")
            .parse()
            .map_err(|e: tonic::codegen::http::uri::InvalidUri| {
                TlsError::Address(addr.to_owned(), e.to_string())
            })?;
    let target = addr.to_owned();
    let connector = tower::service_fn(move |_: Uri| {
        let trust = trust.clone();
        let target = target.clone();
        let server_name = server_name.clone();
        async move {
            let config = client_config(&trust).map_err(io::Error::other)?;
            let tcp = TcpStream::connect(resolve(&target)?).await?;
            let _ = tcp.set_nodelay(true);
            let name = ServerName::try_from(server_name.clone()).map_err(io::Error::other)?;
            let tls = TlsConnector::from(Arc::new(config))
                .connect(name, tcp)
                .await?;
            Ok::<_, io::Error>(TokioIo::new(tls))
        }
    });
    Ok(Endpoint::from(uri)
        .connect_timeout(timeout)
        .timeout(timeout)
        .tcp_nodelay(true)
        .connect_with_connector_lazy(connector))
}

fn resolve(addr: &str) -> io::Result<SocketAddr> {
    use std::net::ToSocketAddrs;
    addr.to_socket_addrs()?
        .next()
        .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, format!("{addr}: no address")))
}

#[derive(Debug)]
struct PinnedVerifier {
    digest: String,
    seen: Arc<Mutex<Option<PinnedCa>>>,
    algorithms: WebPkiSupportedAlgorithms,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for PinnedVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let ca = intermediates.last().ok_or_else(|| {
            rustls::Error::General("the manager presented no CA certificate".into())
        })?;
        let presented = crate::identity::der_digest(ca);
        *self.seen.lock().expect("seen lock") = Some(PinnedCa {
            digest: presented.clone(),
            der: ca.to_vec(),
        });
        if presented != self.digest {
            return Err(rustls::Error::General(format!(
                "the manager's CA (digest {presented}) is not the one in the token ({})",
                self.digest
            )));
        }
        let mut roots = RootCertStore::empty();
        roots.add(ca.clone().into_owned())?;
        let inner = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            self.provider.clone(),
        )
        .build()
        .map_err(|e| rustls::Error::General(e.to_string()))?;
        inner.verify_server_cert(end_entity, &[], server_name, ocsp, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// The whole chain of an error, "a: b: c", as users should see it.
pub fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        let msg = s.to_string();
        if !out.contains(&msg) {
            out.push_str(": ");
            out.push_str(&msg);
        }
        cur = s.source();
    }
    out
}
