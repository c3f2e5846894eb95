//! A request body that keeps a copy of what it sends, up to a bound, so a
//! retried request is sent whole. The first try streams as it always did
//! (nothing waits for the whole body); a retry is possible only once the
//! body has ended within the bound.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use http::HeaderMap;
use http_body_util::BodyExt;
use hyper::body::{Frame, SizeHint};

use super::Body;

/// Bytes of request bodies kept, across every call in flight on this
/// sidecar, at most: past it a body is not kept (its call is not retried
/// once sent), so many large requests at once cannot exhaust memory.
pub const MAX_KEPT_TOTAL: u64 = 32 << 20;

static KEPT_TOTAL: AtomicU64 = AtomicU64::new(0);

/// Bytes kept now, across all calls.
pub fn kept_total() -> u64 {
    KEPT_TOTAL.load(Ordering::Relaxed)
}

/// Reserves `n` bytes of [`MAX_KEPT_TOTAL`].
fn reserve(n: u64) -> bool {
    KEPT_TOTAL
        .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |t| t.checked_add(n).filter(|t| *t <= MAX_KEPT_TOTAL))
        .is_ok()
}

#[derive(Debug, Default)]
struct Kept {
    chunks: Vec<Bytes>,
    trailers: Option<HeaderMap>,
    len: u64,
    /// Bytes of [`MAX_KEPT_TOTAL`] this body holds.
    reserved: u64,
    /// The body went past the bound (nothing kept) or failed.
    lost: bool,
    ended: bool,
}

impl Kept {
    fn lose(&mut self) {
        self.lost = true;
        self.chunks = Vec::new();
        KEPT_TOTAL.fetch_sub(std::mem::take(&mut self.reserved), Ordering::Relaxed);
    }
}

impl Drop for Kept {
    fn drop(&mut self) {
        KEPT_TOTAL.fetch_sub(self.reserved, Ordering::Relaxed);
    }
}

/// The body sent on the first try.
#[derive(Debug)]
pub struct Keeping {
    inner: Body,
    kept: Arc<Mutex<Kept>>,
    max: u64,
}

/// What can send the body again.
#[derive(Debug, Clone)]
pub struct Keeper(Arc<Mutex<Kept>>);

/// Wraps `body`, keeping up to `max` bytes of it.
pub fn keep(body: Body, max: u64) -> (Body, Keeper) {
    let mut kept = Kept::default();
    kept.ended = hyper::body::Body::is_end_stream(&body);
    let kept = Arc::new(Mutex::new(kept));
    (Keeping { inner: body, kept: kept.clone(), max }.boxed_unsync(), Keeper(kept))
}

impl Keeper {
    /// The whole body again, if it ended within the bound.
    pub fn replay(&self) -> Option<Body> {
        let k = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if !k.ended || k.lost {
            return None;
        }
        Some(Replayed { chunks: k.chunks.iter().cloned().collect(), trailers: k.trailers.clone() }.boxed_unsync())
    }
}

impl hyper::body::Body for Keeping {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let r = Pin::new(&mut self.inner).poll_frame(cx);
        let max = self.max;
        let mut k = self.kept.lock().unwrap_or_else(|p| p.into_inner());
        match &r {
            Poll::Ready(Some(Ok(frame))) if !k.lost => {
                if let Some(data) = frame.data_ref() {
                    let n = data.len() as u64;
                    k.len += n;
                    if k.len > max || !reserve(n) {
                        k.lose();
                    } else {
                        k.reserved += n;
                        k.chunks.push(data.clone());
                    }
                } else if let Some(t) = frame.trailers_ref() {
                    k.trailers = Some(t.clone());
                }
                // A body of declared length has ended with its last data:
                // the HTTP/2 client stops reading there, never seeing the end.
                if self.inner.is_end_stream() {
                    k.ended = true;
                }
            }
            Poll::Ready(Some(Err(_))) => k.lose(),
            Poll::Ready(None) => k.ended = true,
            _ => {}
        }
        drop(k);
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A kept body, sent again.
#[derive(Debug)]
struct Replayed {
    chunks: VecDeque<Bytes>,
    trailers: Option<HeaderMap>,
}

impl hyper::body::Body for Replayed {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        if let Some(c) = self.chunks.pop_front() {
            return Poll::Ready(Some(Ok(Frame::data(c))));
        }
        Poll::Ready(self.trailers.take().map(|t| Ok(Frame::trailers(t))))
    }

    fn is_end_stream(&self) -> bool {
        self.chunks.is_empty() && self.trailers.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        let n: u64 = self.chunks.iter().map(|c| c.len() as u64).sum();
        if self.trailers.is_none() { SizeHint::with_exact(n) } else { SizeHint::default() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stream(chunks: &[&'static str]) -> Body {
        let frames: Vec<Result<Frame<Bytes>, hyper::Error>> =
            chunks.iter().map(|c| Ok(Frame::data(Bytes::from_static(c.as_bytes())))).collect();
        http_body_util::StreamBody::new(tokio_stream::iter(frames)).boxed_unsync()
    }

    #[tokio::test]
    async fn a_body_sent_whole_within_the_bound_is_sent_again_whole() {
        let (body, keeper) = keep(stream(&["ab", "cd"]), 4);
        assert!(keeper.replay().is_none(), "not ended yet");
        assert_eq!(body.collect().await.unwrap().to_bytes(), "abcd");
        let again = keeper.replay().unwrap();
        assert_eq!(again.collect().await.unwrap().to_bytes(), "abcd");
        assert!(keeper.replay().is_some(), "as often as needed");
    }

    #[tokio::test]
    async fn kept_bytes_are_bounded_across_calls_and_given_back() {
        let big = Bytes::from(vec![b'x'; (MAX_KEPT_TOTAL / 2) as usize]);
        let body = |b: &Bytes| super::super::full(b.clone());
        let (a, ka) = keep(body(&big), u64::MAX);
        let (b, kb) = keep(body(&big), u64::MAX);
        let (c, kc) = keep(body(&big), u64::MAX);
        for b in [a, b, c] {
            let _ = b.collect().await.unwrap();
        }
        assert!(ka.replay().is_some() && kb.replay().is_some());
        assert!(kc.replay().is_none(), "past the sidecar's total, not kept");
        assert!(kept_total() >= MAX_KEPT_TOTAL);
        drop((ka, kb, kc));
        let (d, kd) = keep(body(&big), u64::MAX);
        let _ = d.collect().await.unwrap();
        assert!(kd.replay().is_some(), "what was kept is given back when the calls end");
    }

    #[tokio::test]
    async fn a_body_past_the_bound_or_unfinished_is_not() {
        let (body, keeper) = keep(stream(&["ab", "cde"]), 4);
        assert_eq!(body.collect().await.unwrap().to_bytes(), "abcde", "the first try is whole");
        assert!(keeper.replay().is_none());
        let (_body, keeper) = keep(stream(&["ab"]), 4);
        assert!(keeper.replay().is_none(), "never read");
        let (mut body, keeper) = keep(super::super::full(Bytes::from_static(b"abc")), 4);
        let frame = std::future::poll_fn(|cx| hyper::body::Body::poll_frame(Pin::new(&mut body), cx)).await;
        assert!(frame.is_some_and(|f| f.is_ok()));
        assert!(hyper::body::Body::is_end_stream(&body));
        assert_eq!(
            keeper.replay().unwrap().collect().await.unwrap().to_bytes(),
            "abc",
            "a body of known length has ended with its last data, read or not"
        );
        let (_body, keeper) = keep(super::super::full(Bytes::new()), 4);
        assert_eq!(keeper.replay().unwrap().collect().await.unwrap().to_bytes(), "", "an empty body ends at once");
    }
}
