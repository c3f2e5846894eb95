//! Palisade's one accept loop, used by every listener of every process (the
//! sidecar's inbound, outbound and admin listeners, the control plane's gRPC
//! and webhook listeners): a connection limit, a task per connection tracked
//! for drain, accept errors (EMFILE...) that back off instead of spinning,
//! and an idle timeout for connections whose peer has stopped talking.
//!
//! Every listener anyone can reach needs the same three things, and they
//! live here so each listener only picks numbers: a per-address limit (one
//! client cannot take every place), a small reserve only the host itself
//! (127.0.0.1, ::1) can take (a local probe or operator always gets in), and
//! timeouts that a peer cannot extend without asking for something: a
//! deadline to the first byte, an absolute deadline for connections that
//! must finish quickly, and HTTP/2 PINGs that do not count as activity.
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
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
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

pub mod deadline;
pub mod detect;
mod evict;
pub mod h1guard;
mod h2watch;
pub mod traceparent;

/// How long accepting pauses after an accept error (out of descriptors...).
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);
/// How long a new connection waits for the place an evicted one frees.
const EVICT_WAIT: Duration = Duration::from_millis(100);

/// One open connection's place under its listener's limit; the place is
/// freed when this is dropped. Keep it as long as the connection lives
/// (move it into the IO when the IO is handed to another task).
#[derive(Debug)]
pub struct Slot {
    _permit: OwnedSemaphorePermit,
    _ip: Option<IpPlace>,
    evict: Option<evict::Entry>,
}

impl Slot {
    /// Resolves when the listener takes this place back for a newer
    /// connection (see [`Limit::evict_oldest`]); never, on other limits.
    /// Whoever holds the place lets the connection go then.
    pub async fn evicted(&self) {
        match &self.evict {
            Some(e) => e.token.cancelled().await,
            None => std::future::pending().await,
        }
    }

    /// The eviction signal, for an IO that holds this place.
    fn eviction(&self) -> Option<CancellationToken> {
        self.evict.as_ref().map(|e| e.token.clone())
    }
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

/// Why a connection found no place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// Its source address holds as many places as one address may.
    PerAddress,
    /// Every place is taken.
    Full,
    /// Not a refusal of the newcomer: the oldest holder's place was taken
    /// back for it ([`Limit::evict_oldest`]).
    Evicted,
}

impl Refused {
    /// A metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::PerAddress => "per_address",
            Self::Full => "full",
            Self::Evicted => "evicted",
        }
    }
}

/// Called on every refusal with the limit's name and why (to count it).
#[derive(Clone)]
pub struct OnRefused(Arc<dyn Fn(&'static str, Refused) + Send + Sync>);

impl std::fmt::Debug for OnRefused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("OnRefused")
    }
}

/// Whether `ip` is this host's own address as `localhost` names it
/// (127.0.0.1 or ::1). Not all of 127.0.0.0/8: a test or a local tool
/// binding 127.0.0.2 is "another address" like any other.
pub fn is_local_host(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4 == Ipv4Addr::LOCALHOST,
        IpAddr::V6(v6) => v6 == Ipv6Addr::LOCALHOST || v6.to_ipv4_mapped() == Some(Ipv4Addr::LOCALHOST),
    }
}

/// A bound on how many connections are open at once, in all and
/// (optionally) from one source address, with (optionally) a few places
/// beyond it that only the host itself may take.
#[derive(Debug, Clone)]
pub struct Limit {
    name: &'static str,
    max: usize,
    slots: Arc<Semaphore>,
    per_ip: Option<(usize, IpCounts)>,
    reserve: Option<(usize, Arc<Semaphore>)>,
    on_refused: Option<OnRefused>,
    evictable: Option<evict::Table>,
}

impl Limit {
    /// At most `max` at once; `name` says which listener in logs.
    pub fn new(name: &'static str, max: usize) -> Self {
        Self {
            name,
            max,
            slots: Arc::new(Semaphore::new(max)),
            per_ip: None,
            reserve: None,
            on_refused: None,
            evictable: None,
        }
    }

    /// When every place is taken, [`Limit::admit`] takes the oldest back
    /// (its holder sees [`Slot::evicted`]) for the newcomer, per-address
    /// shares still applying. For places that anyone can hold without
    /// proving anything (handshakes, anonymous calls): a flood then only
    /// pushes out the flood's own older connections.
    pub fn evict_oldest(mut self) -> Self {
        self.evictable = Some(Arc::default());
        self
    }

    /// Also `n` places beyond `max` that only 127.0.0.1 and ::1 may take,
    /// once the others are full (or the local host has its per-address
    /// share): a probe or an operator on the host always gets in, whoever
    /// else fills the listener.
    pub fn reserve_loopback(mut self, n: usize) -> Self {
        self.reserve = (n > 0).then(|| (n, Arc::new(Semaphore::new(n))));
        self
    }

    /// Calls `f` on every refusal (to count it in a metric).
    pub fn on_refused(mut self, f: impl Fn(&'static str, Refused) + Send + Sync + 'static) -> Self {
        self.on_refused = Some(OnRefused(Arc::new(f)));
        self
    }

    /// The listener's name, as in logs.
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// The most places, reserve excluded.
    pub fn max(&self) -> usize {
        self.max
    }

    /// Also at most `max` at once from any one source address, so one
    /// client cannot take every place.
    pub fn per_ip(mut self, max: usize) -> Self {
        self.per_ip = Some((max, Arc::default()));
        self
    }

    /// A place, if one is free (ignoring any per-address limit).
    pub fn try_take(&self) -> Option<Slot> {
        self.slots.clone().try_acquire_owned().ok().map(|p| self.slot(p, None))
    }

    fn slot(&self, permit: OwnedSemaphorePermit, ip: Option<IpPlace>) -> Slot {
        Slot { _permit: permit, _ip: ip, evict: self.evictable.as_ref().map(evict::Entry::new) }
    }

    /// A place for a connection from `ip`, taking the oldest back if every
    /// place is taken and this limit evicts; refusals are reported to
    /// [`Limit::on_refused`].
    pub async fn admit(&self, ip: IpAddr) -> Option<Slot> {
        let why = match self.take_for(ip) {
            Ok(slot) => return Some(slot),
            Err(Refused::Full) if self.evictable.as_ref().is_some_and(evict::evict_oldest) => {
                if let Some(f) = &self.on_refused {
                    (f.0)(self.name, Refused::Evicted);
                }
                match tokio::time::timeout(EVICT_WAIT, self.take_waiting(ip)).await {
                    Ok(Ok(slot)) => return Some(slot),
                    Ok(Err(why)) => why,
                    Err(_) => Refused::Full,
                }
            }
            Err(why) => why,
        };
        if let Some(f) = &self.on_refused {
            (f.0)(self.name, why);
        }
        None
    }

    /// Like [`Limit::take_for`], but waits for a place in all.
    async fn take_waiting(&self, ip: IpAddr) -> Result<Slot, Refused> {
        let place = self.ip_place(ip)?;
        let permit = self.slots.clone().acquire_owned().await.map_err(|_| Refused::Full)?;
        Ok(self.slot(permit, place))
    }

    /// A place for a connection from `ip`, if one is free (the reserve
    /// too, for the local host). A refusal is reported to [`Limit::on_refused`].
    pub fn try_take_for(&self, ip: IpAddr) -> Option<Slot> {
        match self.take_for(ip) {
            Ok(slot) => Some(slot),
            Err(why) => {
                if let Some(f) = &self.on_refused {
                    (f.0)(self.name, why);
                }
                None
            }
        }
    }

    /// A place for a connection from `ip`, or why there is none.
    pub fn take_for(&self, ip: IpAddr) -> Result<Slot, Refused> {
        let taken = self.take_shared(ip);
        match (taken, &self.reserve) {
            (Err(_), Some((_, reserve))) if is_local_host(ip) => {
                // The reserve ignores the per-address share: it is small, and
                // only the host itself can reach it.
                let permit = reserve.clone().try_acquire_owned().map_err(|_| Refused::Full)?;
                Ok(Slot { _permit: permit, _ip: None, evict: None })
            }
            (taken, _) => taken,
        }
    }

    fn take_shared(&self, ip: IpAddr) -> Result<Slot, Refused> {
        let place = self.ip_place(ip)?;
        let permit = self.slots.clone().try_acquire_owned().map_err(|_| Refused::Full)?;
        Ok(self.slot(permit, place))
    }

    /// The address's share, if this limit has per-address shares.
    fn ip_place(&self, ip: IpAddr) -> Result<Option<IpPlace>, Refused> {
        let Some((max, counts)) = &self.per_ip else {
            return Ok(None);
        };
        let mut all = counts.lock().unwrap_or_else(|p| p.into_inner());
        let n = all.entry(ip).or_default();
        if *n >= *max {
            return Err(Refused::PerAddress);
        }
        *n += 1;
        Ok(Some(IpPlace { ip, counts: counts.clone() }))
    }

    /// How many places are in use (the reserve's included).
    pub fn in_use(&self) -> usize {
        let reserved = self.reserve.as_ref().map_or(0, |(n, s)| n - s.available_permits());
        self.max - self.slots.available_permits() + reserved
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
        let Some(slot) = limit.admit(src.ip()).await else {
            if last_warning.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
                last_warning = Some(Instant::now());
                tracing::warn!(listener = limit.name, src.addr = %src, limit = limit.max, "connection limit reached (in all or for this address); closing new connections");
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
///
/// Options for connections anyone can open: a shorter wait for the first
/// byte ([`IdleTimeout::first_byte_within`]), an absolute deadline that no
/// traffic extends ([`IdleTimeout::deadline`]), HTTP/2 keepalive frames that
/// do not count as activity ([`IdleTimeout::requests_only`]) and a cap on
/// the requests (HTTP/2 streams) a connection may carry
/// ([`IdleTimeout::max_requests`]).
#[derive(Debug)]
pub struct IdleTimeout<T> {
    inner: T,
    idle: Duration,
    timer: Pin<Box<Sleep>>,
    deadline: Option<Pin<Box<Sleep>>>,
    h2: Option<h2watch::H2Watch>,
    /// The slot's eviction (see [`Limit::evict_oldest`]): the connection ends.
    evicted: Option<Pin<Box<tokio_util::sync::WaitForCancellationFutureOwned>>>,
    _slot: Option<Slot>,
}

impl<T> IdleTimeout<T> {
    /// Wraps `inner`; `slot` (if any) is held until this is dropped.
    pub fn new(inner: T, idle: Duration, slot: Option<Slot>) -> Self {
        let evicted = slot.as_ref().and_then(Slot::eviction).map(|t| Box::pin(t.cancelled_owned()));
        Self { inner, idle, timer: Box::pin(tokio::time::sleep(idle)), deadline: None, h2: None, evicted, _slot: slot }
    }

    /// The peer's first byte must come within `wait` (from now), not `idle`.
    pub fn first_byte_within(mut self, wait: Duration) -> Self {
        self.timer.as_mut().reset(Instant::now() + wait);
        self
    }

    /// Fails at `at` whatever the peer does.
    pub fn deadline(mut self, at: Instant) -> Self {
        self.deadline = Some(Box::pin(tokio::time::sleep_until(at)));
        self
    }

    /// On HTTP/2, only frames that carry requests (HEADERS, DATA) count as
    /// activity; PING, SETTINGS, WINDOW_UPDATE and PRIORITY do not, so a peer
    /// cannot hold the connection open by pinging. On HTTP/1 every byte
    /// counts, as without this.
    pub fn requests_only(mut self) -> Self {
        let max = self.h2.as_ref().and_then(h2watch::H2Watch::max_streams);
        self.h2 = Some(h2watch::H2Watch::new(max));
        self
    }

    /// On HTTP/2, fails when the peer opens stream `n + 1` (implies
    /// [`IdleTimeout::requests_only`]).
    pub fn max_requests(mut self, n: u32) -> Self {
        self.h2 = Some(h2watch::H2Watch::new(Some(n)));
        self
    }

    /// The wrapped IO.
    pub fn get_ref(&self) -> &T {
        &self.inner
    }

    /// Checked before every read too (not only when a read would wait): a
    /// peer that sends fast enough that a read is always ready (keepalive
    /// frames, or anything past a deadline) is not let off.
    fn timed_out(&self) -> Option<io::Error> {
        let now = Instant::now();
        if self._slot.as_ref().and_then(|s| s.evict.as_ref()).is_some_and(|e| e.token.is_cancelled()) {
            return Some(io::Error::new(io::ErrorKind::TimedOut, "place taken back for a newer connection"));
        }
        if self.deadline.as_ref().is_some_and(|d| d.deadline() <= now) {
            return Some(io::Error::new(io::ErrorKind::TimedOut, "connection deadline passed"));
        }
        if self.h2.is_some() && self.timer.deadline() <= now {
            return Some(io::Error::new(io::ErrorKind::TimedOut, "peer idle too long"));
        }
        None
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for IdleTimeout<T> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        if let Some(e) = self.timed_out() {
            return Poll::Ready(Err(e));
        }
        let before = buf.filled().len();
        match Pin::new(&mut self.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                let this = &mut *self;
                let read = &buf.filled()[before..];
                let active = match &mut this.h2 {
                    _ if read.is_empty() => false,
                    None => true,
                    Some(watch) => match watch.feed(read) {
                        Ok(active) => active,
                        Err(h2watch::TooManyStreams) => {
                            return Poll::Ready(Err(io::Error::new(
                                io::ErrorKind::PermissionDenied,
                                "more requests than this connection may carry",
                            )));
                        }
                    },
                };
                if active {
                    let deadline = Instant::now() + this.idle;
                    this.timer.as_mut().reset(deadline);
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => {
                if let Some(e) = self.evicted.as_mut()
                    && e.as_mut().poll(cx).is_ready()
                {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "place taken back for a newer connection",
                    )));
                }
                if let Some(d) = self.deadline.as_mut()
                    && d.as_mut().poll(cx).is_ready()
                {
                    return Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, "connection deadline passed")));
                }
                match self.timer.as_mut().poll(cx) {
                    Poll::Ready(()) => Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, "peer idle too long"))),
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }
}

delegate_async_write!(IdleTimeout);

#[cfg(test)]
mod tests;
