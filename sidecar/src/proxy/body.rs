//! Body helpers: surfacing HTTP/1 chunked-framing errors before a request is
//! forwarded, so a malformed body is answered 400 and never reaches the app.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::{Body as _, Frame, Incoming, SizeHint};

use super::Body;

/// A body that yields one already-read frame, then the rest.
#[derive(Debug)]
struct Prepend {
    first: Option<Frame<Bytes>>,
    rest: Incoming,
}

impl hyper::body::Body for Prepend {
    type Data = Bytes;
    type Error = hyper::Error;
    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        if let Some(f) = self.first.take() {
            return Poll::Ready(Some(Ok(f)));
        }
        Pin::new(&mut self.rest).poll_frame(cx)
    }
    fn is_end_stream(&self) -> bool {
        self.first.is_none() && self.rest.is_end_stream()
    }
    fn size_hint(&self) -> SizeHint {
        let mut h = self.rest.size_hint();
        if let Some(d) = self.first.as_ref().and_then(|f| f.data_ref()) {
            h.set_lower(h.lower() + d.len() as u64);
            if let Some(u) = h.upper() {
                h.set_upper(u + d.len() as u64);
            }
        }
        h
    }
}

/// Waits up to `wait` for the first body frame. A framing error there (bad
/// chunk size...) is returned; a body that has not started yet (a client
/// streaming slowly) is passed through untouched.
pub async fn check_first_frame(mut body: Incoming, wait: Duration) -> Result<Body, hyper::Error> {
    if body.is_end_stream() {
        return Ok(body.boxed_unsync());
    }
    match tokio::time::timeout(wait, body.frame()).await {
        Err(_) => Ok(body.boxed_unsync()),
        Ok(None) => Ok(super::full(Bytes::new())),
        Ok(Some(Err(e))) => Err(e),
        Ok(Some(Ok(frame))) => Ok(Prepend { first: Some(frame), rest: body }.boxed_unsync()),
    }
}
