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
//! the next head on keep-alive connections, and steps aside after an
//! upgrade or CONNECT, or when a head is too large (hyper then answers 431).

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

const REJECT: &[u8] = b"HTTP/1.1 400 Bad Request\r\ncontent-type: text/plain\r\ncontent-length: 18\r\nconnection: close\r\n\r\nmalformed request\n";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Collecting a request head (held back from hyper).
    Head,
    /// Passing `n` body bytes.
    Body(u64),
    /// In a chunked body: reading a chunk-size line.
    ChunkSize,
    /// Passing `n` chunk bytes, then the CRLF after them.
    ChunkData(u64),
    /// Reading trailer lines until an empty one.
    Trailers,
    /// No more checking (upgrade, CONNECT, oversized head, unparseable chunking).
    Passthrough,
    /// Rejected: the 400 is written (or being written), then EOF.
    Rejected,
}

/// What a complete head implies.
#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    Reject(&'static str),
    Body(u64),
    Chunked,
    Passthrough,
}

/// Checks one complete request head.
fn check_head(head: &[u8], max_headers: usize) -> Verdict {
    let mut headers = vec![httparse::EMPTY_HEADER; max_headers];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(head) {
        Ok(httparse::Status::Complete(_)) => {}
        // Let hyper answer what it answers best (400/431) for the rest.
        _ => return Verdict::Passthrough,
    }
    let (mut cls, mut te, mut upgrade) = (Vec::new(), None::<&[u8]>, false);
    for h in req.headers.iter() {
        if h.name.eq_ignore_ascii_case("content-length") {
            cls.push(h.value);
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            if te.is_some() {
                return Verdict::Reject("several Transfer-Encoding headers");
            }
            te = Some(h.value);
        } else if h.name.eq_ignore_ascii_case("upgrade") {
            upgrade = true;
        }
    }
    if te.is_some() && !cls.is_empty() {
        return Verdict::Reject("both Content-Length and Transfer-Encoding");
    }
    if cls.len() > 1 {
        return Verdict::Reject("several Content-Length headers");
    }
    if upgrade || req.method == Some("CONNECT") {
        return Verdict::Passthrough;
    }
    if let Some(te) = te {
        return if te.eq_ignore_ascii_case(b"chunked") {
            Verdict::Chunked
        } else {
            Verdict::Reject("unsupported Transfer-Encoding")
        };
    }
    match cls.first() {
        None => Verdict::Body(0),
        Some(v) => match std::str::from_utf8(v).ok().filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
        {
            Some(s) => s.parse().map(Verdict::Body).unwrap_or(Verdict::Reject("invalid Content-Length")),
            None => Verdict::Reject("invalid Content-Length"),
        },
    }
}

/// The guarded IO.
#[derive(Debug)]
pub struct H1Guard<T> {
    inner: T,
    state: State,
    /// Bytes read from the socket not yet released to hyper.
    pending: BytesMut,
    /// Bytes released to hyper but not yet consumed by it.
    ready: BytesMut,
    /// Partial line in chunk-size / trailer states.
    line: usize,
    max_head: usize,
    max_headers: usize,
    reject_written: usize,
}

impl<T> H1Guard<T> {
    pub fn new(inner: T, max_head: usize, max_headers: usize) -> Self {
        Self {
            inner,
            state: State::Head,
            pending: BytesMut::new(),
            ready: BytesMut::new(),
            line: 0,
            max_head,
            max_headers,
            reject_written: 0,
        }
    }

    /// Moves what the framing allows from `pending` to `ready`.
    fn advance(&mut self) {
        loop {
            match self.state {
                State::Passthrough => {
                    let all = self.pending.split();
                    self.ready.unsplit(all);
                    return;
                }
                State::Rejected => return,
                State::Head => {
                    // Blank lines between messages are allowed (RFC 9112 §2.2).
                    while self.pending.starts_with(b"\r\n") {
                        let crlf = self.pending.split_to(2);
                        self.ready.unsplit(crlf);
                    }
                    let Some(end) = find(&self.pending, b"\r\n\r\n") else {
                        if self.pending.len() > self.max_head {
                            self.state = State::Passthrough;
                            continue;
                        }
                        return;
                    };
                    let head = self.pending.split_to(end + 4);
                    match check_head(&head, self.max_headers) {
                        Verdict::Reject(why) => {
                            tracing::warn!(reason = why, "refused an HTTP/1 request with ambiguous framing");
                            self.state = State::Rejected;
                            return;
                        }
                        Verdict::Body(0) => self.state = State::Head,
                        Verdict::Body(n) => self.state = State::Body(n),
                        Verdict::Chunked => self.state = State::ChunkSize,
                        Verdict::Passthrough => self.state = State::Passthrough,
                    }
                    self.ready.unsplit(head);
                }
                State::Body(n) => {
                    if self.pending.is_empty() {
                        return;
                    }
                    let take = (n as usize).min(self.pending.len());
                    let part = self.pending.split_to(take);
                    self.ready.unsplit(part);
                    let left = n - take as u64;
                    self.state = if left == 0 { State::Head } else { State::Body(left) };
                }
                State::ChunkSize | State::Trailers => {
                    let Some(end) = find(&self.pending[self.line..], b"\r\n").map(|i| i + self.line) else {
                        self.line = self.pending.len();
                        if self.line > 4096 {
                            self.state = State::Passthrough;
                            continue;
                        }
                        return;
                    };
                    self.line = 0;
                    let line = self.pending.split_to(end + 2);
                    let text = &line[..end];
                    self.state = if self.state == State::Trailers {
                        if text.is_empty() { State::Head } else { State::Trailers }
                    } else {
                        let size = text.split(|b| *b == b';').next().unwrap_or_default();
                        match std::str::from_utf8(size).ok().and_then(|s| u64::from_str_radix(s.trim(), 16).ok()) {
                            Some(0) => State::Trailers,
                            Some(n) => State::ChunkData(n + 2),
                            // hyper will refuse the bad chunk; we stop following.
                            None => State::Passthrough,
                        }
                    };
                    self.ready.unsplit(line);
                }
                State::ChunkData(n) => {
                    if self.pending.is_empty() {
                        return;
                    }
                    let take = (n as usize).min(self.pending.len());
                    let part = self.pending.split_to(take);
                    self.ready.unsplit(part);
                    let left = n - take as u64;
                    self.state = if left == 0 { State::ChunkSize } else { State::ChunkData(left) };
                }
            }
        }
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
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
            if this.state == State::Rejected {
                // Answer 400 ourselves, then end the stream for hyper.
                while this.reject_written < REJECT.len() {
                    match Pin::new(&mut this.inner).poll_write(cx, &REJECT[this.reject_written..]) {
                        Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => break,
                        Poll::Ready(Ok(n)) => this.reject_written += n,
                        Poll::Pending => return Poll::Pending,
                    }
                }
                let _ = Pin::new(&mut this.inner).poll_flush(cx);
                let _ = Pin::new(&mut this.inner).poll_shutdown(cx);
                return Poll::Ready(Ok(()));
            }
            let mut tmp = [0u8; 8192];
            let mut rb = ReadBuf::new(&mut tmp);
            match Pin::new(&mut this.inner).poll_read(cx, &mut rb) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(())) if rb.filled().is_empty() => {
                    // EOF: release anything held (hyper reports the incomplete message).
                    let rest = this.pending.split();
                    if rest.is_empty() {
                        return Poll::Ready(Ok(()));
                    }
                    this.ready.unsplit(rest);
                    this.state = State::Passthrough;
                }
                Poll::Ready(Ok(())) => {
                    this.pending.extend_from_slice(rb.filled());
                    this.advance();
                }
            }
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for H1Guard<T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
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
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[test]
    fn verdicts() {
        let v = |h: &str| check_head(h.as_bytes(), 100);
        assert_eq!(v("GET / HTTP/1.1\r\nHost: x\r\n\r\n"), Verdict::Body(0));
        assert_eq!(v("POST / HTTP/1.1\r\nContent-Length: 5\r\n\r\n"), Verdict::Body(5));
        assert_eq!(v("POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"), Verdict::Chunked);
        assert!(matches!(
            v("POST / HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"),
            Verdict::Reject(_)
        ));
        assert!(matches!(
            v("POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n"),
            Verdict::Reject(_)
        ));
        assert!(matches!(v("POST / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n"), Verdict::Reject(_)));
        assert!(matches!(v("POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\n"), Verdict::Reject(_)));
        assert!(matches!(v("POST / HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"), Verdict::Reject(_)));
        assert_eq!(v("GET /ws HTTP/1.1\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n"), Verdict::Passthrough);
    }

    async fn through(input: &[u8]) -> (Vec<u8>, Vec<u8>) {
        let (client, server) = tokio::io::duplex(1 << 16);
        let (mut cr, mut cw) = tokio::io::split(client);
        cw.write_all(input).await.unwrap();
        cw.shutdown().await.unwrap();
        let mut guard = H1Guard::new(server, 65536, 100);
        let mut seen = Vec::new();
        guard.read_to_end(&mut seen).await.unwrap();
        drop(guard);
        let mut answered = Vec::new();
        cr.read_to_end(&mut answered).await.unwrap();
        (seen, answered)
    }

    #[tokio::test]
    async fn passes_keep_alive_requests_and_bodies_untouched() {
        let input = b"POST /a HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello\r\nPOST /b HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5;x=y\r\nhello\r\n0\r\nT: v\r\n\r\nGET /c HTTP/1.1\r\n\r\n";
        let (seen, answered) = through(input).await;
        assert_eq!(seen, input.to_vec());
        assert!(answered.is_empty());
    }

    #[tokio::test]
    async fn a_smuggling_attempt_after_a_good_request_is_cut_off() {
        let good = b"GET /a HTTP/1.1\r\n\r\n".to_vec();
        let mut input = good.clone();
        input.extend_from_slice(b"POST /b HTTP/1.1\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\n\r\n");
        let (seen, answered) = through(&input).await;
        assert_eq!(seen, good, "nothing of the bad request reaches the parser");
        assert!(answered.starts_with(b"HTTP/1.1 400"));
    }
}
