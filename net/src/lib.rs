//! Palisade's one accept loop, used by every listener of every process (the
//! sidecar's inbound, outbound and admin listeners, the control plane's gRPC
//! and webhook listeners): a connection limit, a task per connection tracked
//! for drain, accept errors (EMFILE...) that back off instead of spinning,
//! and an idle timeout for connections whose peer has stopped talking.
//!
//! It also holds the byte-level guards every data path puts in front of a
//! parser: [`detect`] (what a connection speaks) and [`h1guard`] (HTTP/1
//! framing that could smuggle a request), and [`traceparent`] (the trace
//! context a request brings). They depend on nothing heavier
//! than `httparse`, so they are fuzzed on their own (see `fuzz/`).
//!
//! It knows nothing of TLS: handshake and request timeouts belong to the
//! code that speaks those protocols.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::{Instant, Sleep};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Implements `AsyncWrite` for a wrapper by delegating to its `inner` field.
macro_rules! delegate_async_write {
    ($ty:ident) => {
        impl<T: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for $ty<T> {
            fn poll_write(
                mut self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
                buf: &[u8],
            ) -> std::task::Poll<std::io::Result<usize>> {
                std::pin::Pin::new(&mut self.inner).poll_write(cx, buf)
            }
            fn poll_write_vectored(
                mut self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
                bufs: &[std::io::IoSlice<'_>],
            ) -> std::task::Poll<std::io::Result<usize>> {
                std::pin::Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
            }
            fn is_write_vectored(&self) -> bool {
                self.inner.is_write_vectored()
            }
            fn poll_flush(
                mut self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
            ) -> std::task::Poll<std::io::Result<()>> {
                std::pin::Pin::new(&mut self.inner).poll_flush(cx)
            }
            fn poll_shutdown(
                mut self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
            ) -> std::task::Poll<std::io::Result<()>> {
                std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
            }
        }
    };
}

pub mod detect;
pub mod h1guard;
pub mod traceparent;

/// How long accepting pauses after an accept error (out of descriptors...).
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// One open connection's place under its listener's limit; the place is
/// freed when this is dropped. Keep it as long as the connection lives
/// (move it into the IO when the IO is handed to another task).
#[derive(Debug)]
pub struct Slot {
    _permit: OwnedSemaphorePermit,
    _ip: Option<IpPlace>,
}

/// Open connections per source address.
type IpCounts = Arc<Mutex<HashMap<IpAddr, usize>>>;

/// A place under a per-source-address limit.
#[derive(Debug)]
struct IpPlace {
    ip: IpAddr,
    counts: IpCounts,
}

impl Drop for IpPlace {
    fn drop(&mut self) {
        let mut counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = counts.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                counts.remove(&self.ip);
            }
        }
    }
}

/// A bound on how many connections are open at once, in all and
/// (optionally) from one source address.
#[derive(Debug, Clone)]
pub struct Limit {
    name: &'static str,
    max: usize,
    slots: Arc<Semaphore>,
    per_ip: Option<(usize, IpCounts)>,
}

impl Limit {
    /// At most `max` at once; `name` says which listener in logs.
    pub fn new(name: &'static str, max: usize) -> Self {
        Self { name, max, slots: Arc::new(Semaphore::new(max)), per_ip: None }
    }

    /// Also at most `max` at once from any one source address, so one
    /// client cannot take every place.
    pub fn per_ip(mut self, max: usize) -> Self {
        self.per_ip = Some((max, Arc::default()));
        self
    }

    /// A place, if one is free (ignoring any per-address limit).
    pub fn try_take(&self) -> Option<Slot> {
        self.slots.clone().try_acquire_owned().ok().map(|p| Slot { _permit: p, _ip: None })
    }

    /// A place for a connection from `ip`, if one is free.
    pub fn try_take_for(&self, ip: IpAddr) -> Option<Slot> {
        let Some((max, counts)) = &self.per_ip else {
            return self.try_take();
        };
        let place = {
            let mut all = counts.lock().unwrap_or_else(|p| p.into_inner());
            let n = all.entry(ip).or_default();
            if *n >= *max {
                return None;
            }
            *n += 1;
            IpPlace { ip, counts: counts.clone() }
        };
        let permit = self.slots.clone().try_acquire_owned().ok()?;
        Some(Slot { _permit: permit, _ip: Some(place) })
    }

    /// How many places are in use.
    pub fn in_use(&self) -> usize {
        self.max - self.slots.available_permits()
    }
}

/// Accepts on `listener` until `cancel`, running `handle` for each connection
/// as a task under `tracker` (so draining can wait for it), with at most
/// `limit` connections open at once: beyond that, new connections are closed
/// at once (and logged, at most once a second). A per-address limit, if
/// set, applies too.
pub async fn serve<F, Fut>(
    listener: TcpListener,
    limit: Limit,
    cancel: CancellationToken,
    tracker: TaskTracker,
    handle: F,
) where
    F: Fn(TcpStream, SocketAddr, Slot) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let mut last_warning: Option<Instant> = None;
    loop {
        let (tcp, src) = tokio::select! {
            _ = cancel.cancelled() => return,
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(listener = limit.name, error = %e, "accept failed; backing off");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            },
        };
        let Some(slot) = limit.try_take_for(src.ip()) else {
            if last_warning.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
                last_warning = Some(Instant::now());
                tracing::warn!(listener = limit.name, src.addr = %src, limit = limit.max, "connection limit reached; closing new connections");
            }
            drop(tcp);
            continue;
        };
        tracker.spawn(handle(tcp, src, slot));
    }
}

/// An IO that fails with `TimedOut` once nothing has been read from the peer
/// for `idle`. Writes do not count: a peer that has stopped talking (or never
/// started) is let go however much we send it. Protocols that stay open
/// while quiet must ping (HTTP/2 keepalive does), or not use this.
#[derive(Debug)]
pub struct IdleTimeout<T> {
    inner: T,
    idle: Duration,
    timer: Pin<Box<Sleep>>,
    _slot: Option<Slot>,
}

impl<T> IdleTimeout<T> {
    /// Wraps `inner`; `slot` (if any) is held until this is dropped.
    pub fn new(inner: T, idle: Duration, slot: Option<Slot>) -> Self {
        Self { inner, idle, timer: Box::pin(tokio::time::sleep(idle)), _slot: slot }
    }

    /// The wrapped IO.
    pub fn get_ref(&self) -> &T {
        &self.inner
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for IdleTimeout<T> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        match Pin::new(&mut self.inner).poll_read(cx, buf) {
            Poll::Ready(r) => {
                if buf.filled().len() > before {
                    let deadline = Instant::now() + self.idle;
                    self.timer.as_mut().reset(deadline);
                }
                Poll::Ready(r)
            }
            Poll::Pending => match self.timer.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, "peer idle too long"))),
                Poll::Pending => Poll::Pending,
            },
        }
    }
}

delegate_async_write!(IdleTimeout);

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn the_limit_closes_connections_beyond_it_and_frees_places() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let limit = Limit::new("test", 2);
        let (cancel, tracker) = (CancellationToken::new(), TaskTracker::new());
        let release = CancellationToken::new();
        let r = release.clone();
        tokio::spawn(serve(listener, limit.clone(), cancel.clone(), tracker.clone(), move |mut tcp, _, slot| {
            let r = r.clone();
            async move {
                let _slot = slot;
                let _ = tcp.write_all(b"hi").await;
                r.cancelled().await;
            }
        }));
        let mut held = Vec::new();
        for _ in 0..2 {
            let mut c = TcpStream::connect(addr).await.unwrap();
            let mut b = [0u8; 2];
            c.read_exact(&mut b).await.unwrap();
            held.push(c);
        }
        assert_eq!(limit.in_use(), 2);
        let mut third = TcpStream::connect(addr).await.unwrap();
        let mut b = [0u8; 2];
        assert_eq!(third.read(&mut b).await.unwrap_or(0), 0, "closed without an answer");
        release.cancel();
        tokio::time::timeout(Duration::from_secs(5), async {
            while limit.in_use() > 0 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .unwrap();
        cancel.cancel();
    }

    #[test]
    fn one_address_cannot_take_every_place() {
        let limit = Limit::new("test", 10).per_ip(3);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let held: Vec<Slot> = (0..3).map(|_| limit.try_take_for(a).unwrap()).collect();
        assert!(limit.try_take_for(a).is_none());
        let other = limit.try_take_for(b).unwrap();
        assert_eq!(limit.in_use(), 4);
        drop(held);
        assert!(limit.try_take_for(a).is_some());
        drop(other);
    }

    #[tokio::test]
    async fn a_silent_peer_times_out_a_talking_one_does_not() {
        let (a, mut b) = tokio::io::duplex(64);
        let idle = Duration::from_millis(300);
        let mut io = IdleTimeout::new(a, idle, None);
        let mut buf = [0u8; 1];
        let start = Instant::now();
        // Talking every 100 ms for 1 s keeps it open.
        for _ in 0..10 {
            b.write_all(b"x").await.unwrap();
            io.read_exact(&mut buf).await.unwrap();
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let e = io.read_exact(&mut buf).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        assert!(start.elapsed() >= Duration::from_secs(1) + idle - Duration::from_millis(100));
    }
}
