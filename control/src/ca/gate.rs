//! The gRPC server's front door: what holds before a caller is known.
//!
//! Port 2377 answers anyone, since a joining node has no certificate yet.
//! So that an unauthenticated peer can cost only a little:
//! - TLS handshakes: at most [`Limits::handshakes`] in flight, each with
//!   [`Limits::handshake_timeout`]; past the cap a new connection is closed
//!   at once.
//! - Connections: at most [`Limits::connections`] in all, and at most
//!   [`Limits::anonymous`] without a client certificate; past a cap the
//!   connection is closed right after its handshake.
//! - Calls: an anonymous connection may call only `mesh.v1.Join` (whose
//!   messages are capped at [`JOIN_MESSAGE`] by its server). Any other
//!   call is answered `unauthenticated` from its headers, before a byte of
//!   its body is read ([`AnonymousGate`]); the large message limit of the
//!   authenticated services never applies to a stranger.
//!
//! - Certificates: a client certificate the cluster CA did not sign, or
//!   one that expired, completes the handshake (see `tls::Server`) but
//!   counts as none: [`CertCheck`] checks every certificate at admission
//!   and on every call, and such a connection's calls are refused with the
//!   reason ("certificate expired at …", "not signed by this cluster's
//!   CA …") instead of a bare "connection closed".
//!
//! Authenticated calls are then checked per RPC by [`crate::api`].

use std::{
    io,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use futures::future::{Either, Ready, ready};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
    sync::{OwnedSemaphorePermit, Semaphore},
};
use tokio_rustls::server::TlsStream;
use tonic::{
    body::Body,
    codegen::http,
    transport::server::{Connected, TcpConnectInfo, TlsConnectInfo},
};

/// The largest message of the Join service (a CSR, a token, addresses and
/// the reply's certificates fit in a few KiB).
pub const JOIN_MESSAGE: usize = 64 << 10;

/// The gRPC path prefix an anonymous connection may call.
const JOIN_PATH: &str = "/mesh.v1.Join/";

/// Connection and handshake caps for one server.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub handshakes: usize,
    pub handshake_timeout: Duration,
    pub connections: usize,
    pub anonymous: usize,
    /// HTTP/2 streams at once on one connection.
    pub streams: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            handshakes: 64,
            handshake_timeout: Duration::from_secs(5),
            connections: 1024,
            anonymous: 32,
            streams: 64,
        }
    }
}

/// Checks client certificates against the cluster CA (signature,
/// validity, a mesh role), remembering the good ones by digest.
///
/// Only acceptances are cached, keyed by the certificate's SHA-256: a
/// refusal is worked out again each time, so a client can't pin memory
/// with made-up certificates (up to 64 KiB each), and a refusal that time
/// can heal (not valid yet, under clock skew) is not kept.
#[derive(Debug)]
pub struct CertCheck {
    ca_der: Vec<u8>,
    /// Certificate digest -> its expiry.
    seen: std::sync::Mutex<std::collections::HashMap<[u8; 32], i64>>,
}

/// A client certificate this cluster does not accept, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("client certificate refused")]
pub struct Refused(#[source] pub mtls::CertError);

/// How many accepted certificates are remembered (32 bytes + 8 each).
const SEEN_MAX: usize = 4096;

impl CertCheck {
    pub fn new(ca_der: Vec<u8>) -> CertCheck {
        CertCheck {
            ca_der,
            seen: Default::default(),
        }
    }

    /// Ok for a certificate of this cluster, valid now; else why not.
    pub fn check(&self, der: &[u8]) -> Result<(), Refused> {
        let now = crate::ca::pki::now();
        let digest: [u8; 32] = ring::digest::digest(&ring::digest::SHA256, der)
            .as_ref()
            .try_into()
            .expect("SHA-256 is 32 bytes");
        let cached = self.seen.lock().expect("seen lock").get(&digest).copied();
        if cached.is_some_and(|not_after| not_after >= now) {
            return Ok(());
        }
        let not_after = crate::ca::pki::identity_der(der, &self.ca_der, now)
            .map(|id| id.not_after)
            .map_err(Refused)?;
        let mut seen = self.seen.lock().expect("seen lock");
        if seen.len() >= SEEN_MAX {
            seen.clear();
        }
        seen.insert(digest, not_after);
        Ok(())
    }

    /// The connection's certificate, checked: Ok(true) verified, Ok(false)
    /// none, Err(why) refused.
    fn verdict(
        &self,
        certs: Option<&[rustls::pki_types::CertificateDer<'_>]>,
    ) -> Result<bool, Refused> {
        match certs.and_then(|c| c.first()) {
            None => Ok(false),
            Some(c) => self.check(c.as_ref()).map(|()| true),
        }
    }
}

/// The permits a connection holds while it is open.
pub struct Admission {
    handshakes: Arc<Semaphore>,
    connections: Arc<Semaphore>,
    anonymous: Arc<Semaphore>,
    certs: Arc<CertCheck>,
    pub limits: Limits,
}

impl Admission {
    pub fn new(limits: Limits, certs: Arc<CertCheck>) -> Admission {
        Admission {
            handshakes: Arc::new(Semaphore::new(limits.handshakes)),
            connections: Arc::new(Semaphore::new(limits.connections)),
            anonymous: Arc::new(Semaphore::new(limits.anonymous)),
            certs,
            limits,
        }
    }

    /// A handshake slot, or None when [`Limits::handshakes`] are in flight.
    pub fn handshake(&self) -> Option<OwnedSemaphorePermit> {
        self.handshakes.clone().try_acquire_owned().ok()
    }

    /// Admits a connection whose handshake completed, or None past a cap.
    pub fn admit(&self, tls: TlsStream<TcpStream>) -> Option<Admitted> {
        // A refused certificate counts as none.
        let anonymous = self.certs.verdict(tls.get_ref().1.peer_certificates()) != Ok(true);
        let total = self.connections.clone().try_acquire_owned().ok()?;
        let anon = if anonymous {
            Some(self.anonymous.clone().try_acquire_owned().ok()?)
        } else {
            None
        };
        Some(Admitted {
            inner: tls,
            _permits: (total, anon),
        })
    }
}

/// An admitted connection: the TLS stream, holding its permits until it
/// closes.
pub struct Admitted {
    inner: TlsStream<TcpStream>,
    _permits: (OwnedSemaphorePermit, Option<OwnedSemaphorePermit>),
}

impl Connected for Admitted {
    type ConnectInfo = TlsConnectInfo<TcpConnectInfo>;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

impl AsyncRead for Admitted {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Admitted {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// The layer that refuses every call but Join from a connection without a
/// client certificate, from the request's headers alone.
#[derive(Debug, Clone)]
pub struct AnonymousGate(pub Arc<CertCheck>);

impl<S> tower::Layer<S> for AnonymousGate {
    type Service = Gated<S>;

    fn layer(&self, inner: S) -> Gated<S> {
        Gated {
            inner,
            certs: self.0.clone(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Gated<S> {
    inner: S,
    certs: Arc<CertCheck>,
}

/// Whether the request came with a client certificate of this cluster
/// (Ok(false): none; Err: one that is refused, and why).
fn authenticated<B>(certs: &CertCheck, req: &http::Request<B>) -> Result<bool, Refused> {
    let peer = req
        .extensions()
        .get::<TlsConnectInfo<TcpConnectInfo>>()
        .and_then(TlsConnectInfo::peer_certs);
    certs.verdict(peer.as_deref().map(|c| c.as_slice()))
}

impl<S, B> tower::Service<http::Request<B>> for Gated<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<Body>>,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = Either<Ready<Result<http::Response<Body>, S::Error>>, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let verdict = authenticated(&self.certs, &req);
        if verdict == Ok(true) || req.uri().path().starts_with(JOIN_PATH) {
            return Either::Right(self.inner.call(req));
        }
        // The body is dropped unread: h2 resets the stream.
        let status = match verdict {
            Err(why) => tonic::Status::unauthenticated(mtls::client::chain(&why)),
            Ok(_) => tonic::Status::unauthenticated(
                "no client certificate: this call needs a mesh node certificate \
                 (meshctl on a manager uses the one in its data dir; elsewhere pass --cert and --key)",
            ),
        };
        Either::Left(ready(Ok(status.into_http())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ca::pki::{Ca, DEFAULT_CERT_LIFETIME, node_key_and_csr, pem_to_der};
    use crate::state::Role;

    /// Only acceptances are remembered: made-up or foreign certificates
    /// leave nothing behind, however many are tried.
    #[test]
    fn refusals_are_not_cached_and_acceptances_are() {
        let ca = Ca::create("c1").unwrap();
        let check = CertCheck::new(pem_to_der(&ca.cert_pem).unwrap());
        let other = Ca::create("c1").unwrap();
        let (_key, csr) = node_key_and_csr().unwrap();
        let foreign = other
            .issue(&csr, "c1", "node-x", Role::Worker, DEFAULT_CERT_LIFETIME)
            .unwrap();
        let foreign = pem_to_der(&foreign).unwrap();
        for i in 0..100u32 {
            let mut junk = vec![0x30u8; 1024];
            junk.extend_from_slice(&i.to_be_bytes());
            assert!(check.check(&junk).is_err());
            let e = mtls::client::chain(&check.check(&foreign).unwrap_err());
            assert!(e.contains("not signed by this cluster's CA"), "{e}");
        }
        assert_eq!(check.seen.lock().unwrap().len(), 0);
        let ours = ca
            .issue(&csr, "c1", "node-y", Role::Worker, DEFAULT_CERT_LIFETIME)
            .unwrap();
        let ours = pem_to_der(&ours).unwrap();
        check.check(&ours).unwrap();
        check.check(&ours).unwrap();
        assert_eq!(check.seen.lock().unwrap().len(), 1);
    }
}
