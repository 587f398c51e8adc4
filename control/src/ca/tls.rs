//! Mutual TLS for every mesh connection (rustls, ring provider, TLS 1.3).
//!
//! Servers present their node certificate with the CA behind it, so a
//! joining node can pin the CA by the digest in its token before it trusts
//! anything. Clients verify the server against the cluster CA under the
//! name `mesh-manager`, a SAN only manager certificates carry. Client
//! certificates are optional at the handshake (joining needs none); each
//! RPC then checks the caller's certificate ([`crate::api`]).
//!
//! We run the TLS handshake ourselves (tokio-rustls) instead of tonic's
//! built-in TLS for two reasons: a renewed certificate must take effect
//! without restarting the server (a swappable resolver), and a joining
//! client needs a verifier that pins the CA by digest.

use std::{
    io,
    sync::{Arc, RwLock},
    time::Duration,
};

use rustls::{
    DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme,
    client::danger::HandshakeSignatureValid,
    pki_types::{CertificateDer, UnixTime},
    server::{
        ClientHello, ResolvesServerCert, WebPkiClientVerifier,
        danger::{ClientCertVerified, ClientCertVerifier},
    },
    sign::CertifiedKey,
};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

pub use mtls::client::{
    Credentials, PinnedCa, TlsError, Trust, chain, channel, client_config, node_channel, provider,
};

/// Serves the current certificate; [`SwappableCert::set`] replaces it for
/// new handshakes (renewal).
#[derive(Debug)]
pub struct SwappableCert(RwLock<Arc<CertifiedKey>>);

impl SwappableCert {
    pub fn set(&self, creds: &Credentials) -> Result<(), TlsError> {
        *self.0.write().expect("cert lock") = creds.certified_key()?;
        Ok(())
    }
}

impl ResolvesServerCert for SwappableCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.read().expect("cert lock").clone())
    }
}

/// The server side: a TLS acceptor whose certificate can be swapped.
pub struct Server {
    pub acceptor: TlsAcceptor,
    pub cert: Arc<SwappableCert>,
}

/// The server's client-certificate check: WebPKI against the cluster CA,
/// except that a certificate it refuses (expired, from another CA) still
/// completes the handshake, proof of its key included. In TLS 1.3 a
/// refusal in the handshake reaches the client only as "connection
/// closed"; let in, the connection is treated as having no certificate
/// ([`crate::ca::gate::CertCheck`] checks every certificate again), and its
/// calls are refused with the reason.
#[derive(Debug)]
struct Lenient(Arc<dyn ClientCertVerifier>);

impl ClientCertVerifier for Lenient {
    fn offer_client_auth(&self) -> bool {
        self.0.offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[rustls::DistinguishedName] {
        self.0.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        match self.0.verify_client_cert(end_entity, intermediates, now) {
            Err(rustls::Error::InvalidCertificate(e)) => {
                tracing::debug!("a client certificate fails WebPKI ({e:?}); its calls are refused");
                Ok(ClientCertVerified::assertion())
            }
            r => r,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

impl Server {
    pub fn new(creds: &Credentials) -> Result<Server, TlsError> {
        let provider = provider();
        let mut roots = RootCertStore::empty();
        roots.add(creds.ca_der()?)?;
        let verifier = Arc::new(Lenient(
            WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                .allow_unauthenticated()
                .build()
                .map_err(|e| TlsError::Verifier(e.to_string()))?,
        ));
        let cert = Arc::new(SwappableCert(RwLock::new(creds.certified_key()?)));
        let mut config = ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(verifier)
            .with_cert_resolver(cert.clone());
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Server {
            acceptor: TlsAcceptor::from(Arc::new(config)),
            cert,
        })
    }

    /// Accepts TCP connections on `listener` and yields those whose TLS
    /// handshake completes in time and that `admission` lets in (see
    /// [`crate::ca::gate`]). Refused and failed connections are logged and
    /// dropped; they never stop the server.
    pub fn incoming(
        &self,
        listener: TcpListener,
        admission: crate::ca::gate::Admission,
    ) -> tokio_stream::wrappers::ReceiverStream<Result<crate::ca::gate::Admitted, io::Error>> {
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        let acceptor = self.acceptor.clone();
        let admission = Arc::new(admission);
        tokio::spawn(async move {
            loop {
                // The listener closes as soon as the server stops reading.
                let accepted = tokio::select! {
                    r = listener.accept() => r,
                    () = tx.closed() => return,
                };
                let (tcp, peer) = match accepted {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::warn!("accept: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let Some(slot) = admission.handshake() else {
                    tracing::debug!("{peer}: too many TLS handshakes in flight; closed");
                    continue;
                };
                let _ = tcp.set_nodelay(true);
                let acceptor = acceptor.clone();
                let admission = admission.clone();
                let tx = tx.clone();
                tokio::spawn(async move {
                    let timeout = admission.limits.handshake_timeout;
                    let tls = match tokio::time::timeout(timeout, acceptor.accept(tcp)).await {
                        Ok(Ok(tls)) => tls,
                        Ok(Err(e)) => return tracing::debug!("TLS handshake from {peer}: {e}"),
                        Err(_) => return tracing::debug!("TLS handshake from {peer}: timed out"),
                    };
                    drop(slot);
                    match admission.admit(tls) {
                        Some(conn) => {
                            let _ = tx.send(Ok(conn)).await;
                        }
                        None => tracing::debug!("{peer}: connection cap reached; closed"),
                    }
                });
            }
        });
        tokio_stream::wrappers::ReceiverStream::new(rx)
    }
}
