//! A guard in front of hyper's HTTP/1 server that refuses ambiguous message
//! framing before any of the request reaches the parser, and so the app.
//!
//! hyper resolves `Content-Length` + `Transfer-Encoding` as RFC 9112 allows
//! (chunked wins, Content-Length dropped, connection closed) and silently
//! merges identical duplicate Content-Length values. A mesh proxy should not
//! forward either: they are the raw material of request smuggling. The guard
//! holds back each request head until it is complete, checks it with
//! httparse, and either releases it or answers `400` itself and ends the
//! connection. It follows body framing (Content-Length or chunked) to find
//! the next head on keep-alive connections, and steps aside only after an
//! upgrade request (the handler then closes the connection unless the app
//! switched protocols).
//!
//! Refused with 400 and the connection closed, before any byte reaches the
//! app (RFC 9112 sections 2-7, RFC 9110 field rules): unparseable heads,
//! bare LF line endings, Content-Length with Transfer-Encoding, several or
//! invalid Content-Length values, a Transfer-Encoding other than `chunked`
//! (or in HTTP/1.0), a missing or repeated Host in HTTP/1.1, CONNECT (the
//! mesh tunnels nothing), and malformed or oversized chunk-size lines.
//! A head larger than the limit is refused with 431.
//!
//! The request head parser and its verdict are in `head`; the framing state
//! machine that holds heads back and follows bodies is in `framing`.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

mod framing;
mod head;
#[cfg(test)]
mod tests;

use framing::State;

/// The guarded IO.
#[derive(Debug)]
pub struct H1Guard<T> {
    inner: T,
    state: State,
    /// Bytes read from the socket not yet released to hyper.
    pending: BytesMut,
    /// Bytes released to hyper but not yet consumed by it.
    ready: BytesMut,
    max_head: usize,
    max_headers: usize,
    reject_written: usize,
    /// How much of a held-back head was already searched (a head sent a byte
    /// at a time must not be rescanned from its start on every read).
    scanned: usize,
}

impl<T> H1Guard<T> {
    pub fn new(inner: T, max_head: usize, max_headers: usize) -> Self {
        Self {
            inner,
            state: State::Head,
            pending: BytesMut::new(),
            ready: BytesMut::new(),
            max_head,
            max_headers,
            reject_written: 0,
            scanned: 0,
        }
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> AsyncRead for H1Guard<T> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            // Whatever was released before a rejection still goes to hyper first.
            if !this.ready.is_empty() {
                let n = this.ready.len().min(buf.remaining());
                buf.put_slice(&this.ready[..n]);
                this.ready.advance(n);
                return Poll::Ready(Ok(()));
            }
            if let State::Rejected(answer) = this.state {
                // Answer ourselves, then end the stream for hyper.
                while this.reject_written < answer.len() {
                    match Pin::new(&mut this.inner).poll_write(cx, &answer[this.reject_written..]) {
                        Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => break,
                        Poll::Ready(Ok(n)) => this.reject_written += n,
                        Poll::Pending => return Poll::Pending,
                    }
                }
                let _ = Pin::new(&mut this.inner).poll_flush(cx);
                let _ = Pin::new(&mut this.inner).poll_shutdown(cx);
                return Poll::Ready(Ok(()));
            }
            let holding_head = this.state == State::Head && !this.pending.is_empty();
            let before = buf.filled().len();
            match Pin::new(&mut this.inner).poll_read(cx, buf) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(())) if buf.filled().len() == before => {
                    // EOF: an incomplete head is dropped (nothing of it reaches the app).
                    this.pending.clear();
                    return Poll::Ready(Ok(()));
                }
                Poll::Ready(Ok(())) => {
                    if holding_head {
                        // Slow path: a head spread over several reads.
                        this.pending.extend_from_slice(&buf.filled()[before..]);
                        buf.set_filled(before);
                        this.advance();
                        continue;
                    }
                    let keep = this.scan(&buf.filled()[before..]);
                    buf.set_filled(before + keep);
                    if keep > 0 {
                        return Poll::Ready(Ok(()));
                    }
                }
            }
        }
    }
}

delegate_async_write!(H1Guard);
