//! Bounds what a reply carries back. A status message may quote what the
//! caller sent (a name, a spec field), and a gRPC client refuses response
//! headers past its limit (16 KiB in hyper) by closing the whole HTTP/2
//! connection, which fails every other call on it. [`BoundStatusLayer`]
//! cuts a `grpc-message` over [`STATUS_MAX`] bytes, whatever built it.
//! Errors of unary calls travel in the response headers (a trailers-only
//! response), which is where this looks; a stream's trailers are left as
//! they are (no stream echoes its input).

use std::{
    future::Future,
    pin::Pin,
    task::{Context, Poll},
};

use tonic::codegen::http;

/// The longest `grpc-message` sent, in bytes of its percent-encoded form.
pub const STATUS_MAX: usize = 1024;

#[derive(Debug, Clone, Copy, Default)]
pub struct BoundStatusLayer;

impl<S> tower::Layer<S> for BoundStatusLayer {
    type Service = BoundStatus<S>;

    fn layer(&self, inner: S) -> BoundStatus<S> {
        BoundStatus { inner }
    }
}

#[derive(Debug, Clone)]
pub struct BoundStatus<S> {
    inner: S,
}

impl<S, B, RB> tower::Service<http::Request<B>> for BoundStatus<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<RB>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let reply = self.inner.call(req);
        Box::pin(async move {
            let mut r = reply.await?;
            bound(r.headers_mut());
            Ok(r)
        })
    }
}

/// Cuts an overlong `grpc-message` at a character boundary of the
/// message, encoded again by tonic (so never inside a `%XX`), and marks
/// the cut.
fn bound(headers: &mut http::HeaderMap) {
    if headers
        .get("grpc-message")
        .is_none_or(|v| v.len() <= STATUS_MAX)
    {
        return;
    }
    let Some(status) = tonic::Status::from_header_map(headers) else {
        return;
    };
    let message = status.message();
    let mut keep = message.len().min(STATUS_MAX);
    loop {
        while !message.is_char_boundary(keep) {
            keep -= 1;
        }
        let cut = tonic::Status::new(status.code(), format!("{} (cut)", &message[..keep]));
        let encoded = cut.into_http::<()>().headers().get("grpc-message").cloned();
        match encoded {
            Some(v) if v.len() <= STATUS_MAX || keep == 0 => {
                headers.insert("grpc-message", v);
                return;
            }
            Some(_) => keep /= 2,
            None => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message_of(s: &str) -> String {
        let status = tonic::Status::not_found(s.to_owned());
        let mut h = status.into_http::<()>().headers().clone();
        bound(&mut h);
        let v = h.get("grpc-message").unwrap().as_bytes();
        assert!(v.len() <= STATUS_MAX, "{} bytes", v.len());
        // What a client reads back: valid percent-encoded UTF-8.
        let back = tonic::Status::from_header_map(&h).unwrap();
        back.message().to_owned()
    }

    #[test]
    fn long_messages_are_cut_and_stay_decodable() {
        assert_eq!(message_of("no service named web"), "no service named web");
        for long in ["x".repeat(70_000), "ö".repeat(5_000), "a%ö\n".repeat(3_000)] {
            let m = message_of(&format!("no service named {long}"));
            assert!(m.starts_with("no service named "), "{m}");
            assert!(m.ends_with(" (cut)"), "{m}");
        }
    }
}
