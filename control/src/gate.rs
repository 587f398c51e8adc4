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

/// The permits a connection holds while it is open.
pub struct Admission {
    handshakes: Arc<Semaphore>,
    connections: Arc<Semaphore>,
    anonymous: Arc<Semaphore>,
    pub limits: Limits,
}

impl Admission {
    pub fn new(limits: Limits) -> Admission {
        Admission {
            handshakes: Arc::new(Semaphore::new(limits.handshakes)),
            connections: Arc::new(Semaphore::new(limits.connections)),
            anonymous: Arc::new(Semaphore::new(limits.anonymous)),
            limits,
        }
    }

    /// A handshake slot, or None when [`Limits::handshakes`] are in flight.
    pub fn handshake(&self) -> Option<OwnedSemaphorePermit> {
        self.handshakes.clone().try_acquire_owned().ok()
    }

    /// Admits a connection whose handshake completed, or None past a cap.
    pub fn admit(&self, tls: TlsStream<TcpStream>) -> Option<Admitted> {
        let anonymous = tls
            .get_ref()
            .1
            .peer_certificates()
            .is_none_or(|c| c.is_empty());
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
#[derive(Debug, Clone, Copy, Default)]
pub struct AnonymousGate;

impl<S> tower::Layer<S> for AnonymousGate {
    type Service = Gated<S>;

    fn layer(&self, inner: S) -> Gated<S> {
        Gated { inner }
    }
}

#[derive(Debug, Clone)]
pub struct Gated<S> {
    inner: S,
}

/// Whether the request came over a connection with a client certificate.
fn authenticated<B>(req: &http::Request<B>) -> bool {
    req.extensions()
        .get::<TlsConnectInfo<TcpConnectInfo>>()
        .and_then(TlsConnectInfo::peer_certs)
        .is_some_and(|c| !c.is_empty())
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
        if authenticated(&req) || req.uri().path().starts_with(JOIN_PATH) {
            return Either::Right(self.inner.call(req));
        }
        // The body is dropped unread: h2 resets the stream.
        let status = tonic::Status::unauthenticated(
            "no client certificate: this call needs a mesh node certificate \
             (meshctl on a manager uses the one in its data dir; elsewhere pass --cert and --key)",
        );
        Either::Left(ready(Ok(status.into_http())))
    }
}
