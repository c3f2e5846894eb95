//! Byte-level plumbing: counting accepted connections, and splicing two
//! streams both ways with half-close respected (EOF on one side becomes a
//! write shutdown on the other, the other direction keeps flowing).

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::metrics::Metrics;
use crate::proxy::Direction;

/// Counts an accepted connection as open until dropped.
#[derive(Debug)]
pub struct ConnGuard {
    metrics: Arc<Metrics>,
    dir: Direction,
}

impl ConnGuard {
    pub fn new(metrics: Arc<Metrics>, dir: Direction) -> Self {
        let m = metrics.dir(dir);
        m.conns_open.inc();
        m.conns_total.inc();
        Self { metrics, dir }
    }
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        self.metrics.dir(self.dir).conns_open.dec();
    }
}

/// An IO that adds the bytes it moves to the direction's counters.
#[derive(Debug)]
pub struct Counted<T> {
    inner: T,
    metrics: Arc<Metrics>,
    dir: Direction,
}

impl<T> Counted<T> {
    pub fn new(inner: T, metrics: Arc<Metrics>, dir: Direction) -> Self {
        Self { inner, metrics, dir }
    }
    pub fn get_ref(&self) -> &T {
        &self.inner
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Counted<T> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        if n > 0 {
            self.metrics.dir(self.dir).bytes_read.inc_by(n as u64);
        }
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Counted<T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = r {
            self.metrics.dir(self.dir).bytes_written.inc_by(n as u64);
        }
        r
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = r {
            self.metrics.dir(self.dir).bytes_written.inc_by(n as u64);
        }
        r
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Copies both ways until both directions reach EOF; returns (a->b, b->a) bytes.
pub async fn splice<A, B>(a: &mut A, b: &mut B) -> io::Result<(u64, u64)>
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    tokio::io::copy_bidirectional(a, b).await
}
