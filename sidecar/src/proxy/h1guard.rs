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
    let mut headers = [const { std::mem::MaybeUninit::<httparse::Header<'_>>::uninit() }; 128];
    let mut req = httparse::Request::new(&mut []);
    match req.parse_with_uninit_headers(head, &mut headers[..max_headers.min(128)]) {
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
                    let Some(end) = find(&self.pending, b"\r\n") else {
                        // Release the partial line; keep a copy to finish it on the fast path.
                        let part = self.pending.split();
                        self.ready.extend_from_slice(&part);
                        self.pending = part;
                        if self.pending.len() > 4096 {
                            self.pending.clear();
                            self.state = State::Passthrough;
                        }
                        return;
                    };
                    let line = self.pending.split_to(end + 2);
                    self.state = self.after_line(&line[..end]);
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

impl<T> H1Guard<T> {
    /// Fast path: scans bytes just read into hyper's own buffer, without
    /// copying. Returns how many of them may be released; the rest (a partial
    /// head, or a rejected request) is held back or dropped.
    fn scan(&mut self, data: &[u8]) -> usize {
        let mut i = 0;
        while i < data.len() {
            match self.state {
                State::Passthrough => return data.len(),
                State::Rejected => return i,
                State::Body(n) => {
                    let take = (n as usize).min(data.len() - i);
                    i += take;
                    let left = n - take as u64;
                    self.state = if left == 0 { State::Head } else { State::Body(left) };
                }
                State::ChunkData(n) => {
                    let take = (n as usize).min(data.len() - i);
                    i += take;
                    let left = n - take as u64;
                    self.state = if left == 0 { State::ChunkSize } else { State::ChunkData(left) };
                }
                State::Head => {
                    if data[i..].starts_with(b"\r\n") {
                        i += 2;
                        continue;
                    }
                    let Some(end) = find(&data[i..], b"\r\n\r\n") else {
                        // A partial head: hold it back until it is complete.
                        self.pending.extend_from_slice(&data[i..]);
                        return i;
                    };
                    let head = &data[i..i + end + 4];
                    match check_head(head, self.max_headers) {
                        Verdict::Reject(why) => {
                            tracing::warn!(reason = why, "refused an HTTP/1 request with ambiguous framing");
                            self.state = State::Rejected;
                            return i;
                        }
                        Verdict::Body(0) => self.state = State::Head,
                        Verdict::Body(n) => self.state = State::Body(n),
                        Verdict::Chunked => self.state = State::ChunkSize,
                        Verdict::Passthrough => self.state = State::Passthrough,
                    }
                    i += end + 4;
                }
                State::ChunkSize | State::Trailers => {
                    // Lines are short; keep a copy of a partial one in `pending`.
                    let Some(end) = find(&data[i..], b"\r\n") else {
                        // Chunk lines are released as they come, a copy kept to finish them.
                        self.pending.extend_from_slice(&data[i..]);
                        if self.pending.len() > 4096 {
                            self.pending.clear();
                            self.state = State::Passthrough;
                        }
                        return data.len();
                    };
                    let state = if self.pending.is_empty() {
                        self.after_line(&data[i..i + end])
                    } else {
                        let mut text = std::mem::take(&mut self.pending);
                        text.extend_from_slice(&data[i..i + end]);
                        self.after_line(&text)
                    };
                    self.state = state;
                    i += end + 2;
                }
            }
        }
        data.len()
    }

    fn after_line(&self, text: &[u8]) -> State {
        if self.state == State::Trailers {
            return if text.is_empty() { State::Head } else { State::Trailers };
        }
        let size = text.split(|b| *b == b';').next().unwrap_or_default();
        match std::str::from_utf8(size).ok().and_then(|s| u64::from_str_radix(s.trim(), 16).ok()) {
            Some(0) => State::Trailers,
            Some(n) => State::ChunkData(n + 2),
            // hyper will refuse the bad chunk; we stop following.
            None => State::Passthrough,
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
            let holding_head = this.state == State::Head && !this.pending.is_empty();
            let before = buf.filled().len();
            match Pin::new(&mut this.inner).poll_read(cx, buf) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(())) if buf.filled().len() == before => {
                    // EOF: release anything held (hyper reports the incomplete message).
                    if holding_head {
                        let rest = this.pending.split();
                        this.ready.unsplit(rest);
                        this.state = State::Passthrough;
                        continue;
                    }
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

super::delegate_async_write!(H1Guard);

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
        through_pipe(input, 1 << 16).await
    }

    /// `pipe` small forces every read to return a fragment.
    async fn through_pipe(input: &[u8], pipe: usize) -> (Vec<u8>, Vec<u8>) {
        let (client, server) = tokio::io::duplex(pipe);
        let (mut cr, mut cw) = tokio::io::split(client);
        let input = input.to_vec();
        tokio::spawn(async move {
            cw.write_all(&input).await.unwrap();
            cw.shutdown().await.unwrap();
        });
        // Read the answers concurrently: a small pipe would otherwise block the guard's 400.
        let answers = tokio::spawn(async move {
            let mut answered = Vec::new();
            let _ = cr.read_to_end(&mut answered).await;
            answered
        });
        let mut guard = H1Guard::new(server, 65536, 100);
        let mut seen = Vec::new();
        guard.read_to_end(&mut seen).await.unwrap();
        drop(guard);
        (seen, answers.await.unwrap())
    }

    #[tokio::test]
    async fn passes_keep_alive_requests_and_bodies_untouched() {
        let input = b"POST /a HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello\r\nPOST /b HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5;x=y\r\nhello\r\n0\r\nT: v\r\n\r\nGET /c HTTP/1.1\r\n\r\n";
        let (seen, answered) = through(input).await;
        assert_eq!(seen, input.to_vec());
        assert!(answered.is_empty());
    }

    #[tokio::test]
    async fn fragmented_reads_give_the_same_stream() {
        let input = b"POST /a HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello\r\nPOST /b HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5;x=y\r\nhello\r\n10\r\n0123456789abcdef\r\n0\r\nT: v\r\n\r\nGET /c HTTP/1.1\r\n\r\n";
        for pipe in [1, 2, 3, 7, 16] {
            let (seen, answered) = through_pipe(input, pipe).await;
            assert_eq!(String::from_utf8_lossy(&seen), String::from_utf8_lossy(input), "pipe {pipe}");
            assert!(answered.is_empty());
        }
        let bad = b"GET /a HTTP/1.1\r\n\r\nPOST /b HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\nx";
        for pipe in [1, 5] {
            let (seen, answered) = through_pipe(bad, pipe).await;
            assert_eq!(seen, b"GET /a HTTP/1.1\r\n\r\n".to_vec(), "pipe {pipe}");
            assert!(answered.starts_with(b"HTTP/1.1 400"));
        }
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
