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

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

const REJECT: &[u8] = b"HTTP/1.1 400 Bad Request\r\ncontent-type: text/plain\r\ncontent-length: 18\r\nconnection: close\r\n\r\nmalformed request\n";
const REJECT_431: &[u8] = b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: text/plain\r\ncontent-length: 24\r\nconnection: close\r\n\r\nrequest head too large\n";
/// Longest chunk-size line (size and extensions) followed.
const MAX_CHUNK_LINE: usize = 4096;

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
    /// No more checking: an upgrade request was released (the handler closes
    /// the connection after the answer unless the protocol switched).
    Passthrough,
    /// Rejected: the answer (if not left to hyper) is written, then EOF.
    Rejected(&'static [u8]),
}

/// What a complete head implies.
#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    Reject(&'static str),
    TooLarge,
    Body(u64),
    Chunked,
    Passthrough,
}

/// Whether `data` has a line feed not preceded by a carriage return.
fn has_bare_lf(data: &[u8]) -> bool {
    data.iter().enumerate().any(|(i, b)| *b == b'\n' && (i == 0 || data[i - 1] != b'\r'))
}

/// Checks one complete request head (ending in CRLF CRLF).
fn check_head(head: &[u8], max_headers: usize) -> Verdict {
    if has_bare_lf(head) {
        return Verdict::Reject("bare LF line ending");
    }
    let mut headers = [const { std::mem::MaybeUninit::<httparse::Header<'_>>::uninit() }; 128];
    let mut req = httparse::Request::new(&mut []);
    match req.parse_with_uninit_headers(head, &mut headers[..max_headers.min(128)]) {
        Ok(httparse::Status::Complete(_)) => {}
        Err(httparse::Error::TooManyHeaders) => return Verdict::TooLarge,
        _ => return Verdict::Reject("unparseable request head"),
    }
    let (mut cls, mut te, mut upgrade, mut connection_upgrade, mut hosts) =
        (Vec::new(), None::<&[u8]>, false, false, 0);
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
        } else if h.name.eq_ignore_ascii_case("connection") {
            connection_upgrade |=
                h.value.split(|b| *b == b',').any(|t| t.trim_ascii().eq_ignore_ascii_case(b"upgrade"));
        } else if h.name.eq_ignore_ascii_case("host") {
            hosts += 1;
        }
    }
    let http11 = req.version == Some(1);
    if http11 && hosts != 1 {
        return Verdict::Reject("HTTP/1.1 request without exactly one Host");
    }
    if hosts > 1 {
        return Verdict::Reject("several Host headers");
    }
    if req.method == Some("CONNECT") {
        return Verdict::Reject("CONNECT is not tunnelled by the mesh");
    }
    if te.is_some() && !cls.is_empty() {
        return Verdict::Reject("both Content-Length and Transfer-Encoding");
    }
    if te.is_some() && !http11 {
        return Verdict::Reject("Transfer-Encoding in an HTTP/1.0 request");
    }
    if cls.len() > 1 {
        return Verdict::Reject("several Content-Length headers");
    }
    let body = match (te, cls.first()) {
        (Some(te), _) if te.eq_ignore_ascii_case(b"chunked") => Verdict::Chunked,
        (Some(_), _) => return Verdict::Reject("unsupported Transfer-Encoding"),
        (None, None) => Verdict::Body(0),
        (None, Some(v)) => {
            match std::str::from_utf8(v).ok().filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit())) {
                Some(s) => match s.parse() {
                    Ok(n) => Verdict::Body(n),
                    Err(_) => return Verdict::Reject("invalid Content-Length"),
                },
                None => return Verdict::Reject("invalid Content-Length"),
            }
        }
    };
    // A real upgrade (both headers) hands the connection over once the app
    // switches; an Upgrade header alone is just a header.
    if upgrade && connection_upgrade {
        return match body {
            Verdict::Body(0) => Verdict::Passthrough,
            _ => Verdict::Reject("upgrade request with a body"),
        };
    }
    body
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

    fn reject(&mut self, why: &'static str, answer: &'static [u8]) {
        tracing::warn!(target: "audit", decision = "deny", reason = why, "refused a malformed HTTP/1 request (400/431, connection closed)");
        self.pending.clear();
        if self.state == State::Head {
            // Between requests: hyper may still be answering an earlier one,
            // so it must answer this one too, in order. It is handed a head it
            // refuses the same way (400, or 431 for one too large), then EOF.
            if answer == REJECT_431 {
                let size = self.max_head.max(8192) + 64;
                self.ready.extend_from_slice(b"GET / HTTP/1.1\r\nx: ");
                self.ready.resize(self.ready.len() + size, b'a');
            } else {
                self.ready.extend_from_slice(b"\x01 / HTTP/1.1\r\n\r\n");
            }
            self.state = State::Rejected(b"");
        } else {
            // Inside a request's body: nothing of its answer is written yet.
            self.state = State::Rejected(answer);
        }
    }

    /// The state after a complete head, or a rejection.
    fn after_head(&mut self, head: &[u8]) -> bool {
        if head.len() > self.max_head {
            self.reject("request head too large", REJECT_431);
            return false;
        }
        match check_head(head, self.max_headers) {
            Verdict::Reject(why) => {
                self.reject(why, REJECT);
                return false;
            }
            Verdict::TooLarge => {
                self.reject("too many header fields", REJECT_431);
                return false;
            }
            Verdict::Body(0) => self.state = State::Head,
            Verdict::Body(n) => self.state = State::Body(n),
            Verdict::Chunked => self.state = State::ChunkSize,
            Verdict::Passthrough => self.state = State::Passthrough,
        }
        true
    }

    /// A head still incomplete in `partial` (searched before up to `from`):
    /// whether to keep waiting.
    fn partial_head_ok(&mut self, partial: &[u8], from: usize) -> bool {
        let bare_lf = (from..partial.len()).any(|i| partial[i] == b'\n' && (i == 0 || partial[i - 1] != b'\r'));
        if bare_lf {
            self.reject("bare LF line ending", REJECT);
            false
        } else if partial.len() > self.max_head {
            self.reject("request head too large", REJECT_431);
            false
        } else {
            true
        }
    }

    /// A chunk-size or trailer line (without its CRLF): the next state.
    fn after_line(&mut self, text: &[u8]) -> bool {
        if text.contains(&b'\n') || text.contains(&b'\r') {
            self.reject("bare CR or LF in chunked framing", REJECT);
            return false;
        }
        if self.state == State::Trailers {
            self.state = if text.is_empty() { State::Head } else { State::Trailers };
            return true;
        }
        // chunk-size = 1*HEXDIG, then optional BWS ";" extensions.
        let size = text.split(|b| *b == b';').next().unwrap_or_default();
        let size = size.trim_ascii_end();
        let n = (!size.is_empty() && size.len() <= 16 && size.iter().all(u8::is_ascii_hexdigit))
            .then(|| std::str::from_utf8(size).ok().and_then(|s| u64::from_str_radix(s, 16).ok()))
            .flatten();
        match n {
            Some(0) => self.state = State::Trailers,
            // The chunk's bytes, then its CRLF.
            Some(n) => match n.checked_add(2) {
                Some(with_crlf) => self.state = State::ChunkData(with_crlf),
                None => {
                    self.reject("chunk size out of range", REJECT);
                    return false;
                }
            },
            None => {
                self.reject("invalid chunk size", REJECT);
                return false;
            }
        }
        true
    }

    /// Slow path: moves what the framing allows from `pending` to `ready`.
    fn advance(&mut self) {
        loop {
            match self.state {
                State::Passthrough => {
                    let all = self.pending.split();
                    self.ready.unsplit(all);
                    return;
                }
                State::Rejected(_) => return,
                State::Head => {
                    // Empty lines between messages are allowed (RFC 9112 section 2.2).
                    while self.pending.starts_with(b"\r\n") {
                        let crlf = self.pending.split_to(2);
                        self.ready.unsplit(crlf);
                        self.scanned = self.scanned.saturating_sub(2);
                    }
                    let from = self.scanned.saturating_sub(3).min(self.pending.len());
                    let Some(end) = find(&self.pending[from..], b"\r\n\r\n").map(|e| e + from) else {
                        let partial = std::mem::take(&mut self.pending);
                        let ok = self.partial_head_ok(&partial, from);
                        if ok {
                            self.scanned = partial.len();
                            self.pending = partial;
                        }
                        return;
                    };
                    self.scanned = 0;
                    let head = self.pending.split_to(end + 4);
                    if !self.after_head(&head) {
                        return;
                    }
                    self.ready.unsplit(head);
                }
                State::Body(n) | State::ChunkData(n) => {
                    if self.pending.is_empty() {
                        return;
                    }
                    let take = usize::try_from(n).unwrap_or(usize::MAX).min(self.pending.len());
                    let part = self.pending.split_to(take);
                    self.ready.unsplit(part);
                    self.state = self.state.consumed(take as u64);
                }
                State::ChunkSize | State::Trailers => {
                    let Some(end) = find(&self.pending, b"\r\n") else {
                        // Release the partial line; keep a copy to finish it on the fast path.
                        if self.pending.len() > MAX_CHUNK_LINE {
                            self.reject("chunk line too long", REJECT);
                            return;
                        }
                        let part = self.pending.split();
                        self.ready.extend_from_slice(&part);
                        self.pending = part;
                        return;
                    };
                    let line = self.pending.split_to(end + 2);
                    if !self.after_line(&line[..end]) {
                        return;
                    }
                    self.ready.unsplit(line);
                }
            }
        }
    }

    /// Fast path: scans bytes just read into hyper's own buffer, without
    /// copying. Returns how many of them may be released; the rest (a partial
    /// head, or a rejected request) is held back or dropped.
    fn scan(&mut self, data: &[u8]) -> usize {
        let mut i = 0;
        while i < data.len() {
            match self.state {
                State::Passthrough => return data.len(),
                State::Rejected(_) => return i,
                State::Body(n) | State::ChunkData(n) => {
                    let take = usize::try_from(n).unwrap_or(usize::MAX).min(data.len() - i);
                    i += take;
                    self.state = self.state.consumed(take as u64);
                }
                State::Head => {
                    if data[i..].starts_with(b"\r\n") {
                        i += 2;
                        continue;
                    }
                    let Some(end) = find(&data[i..], b"\r\n\r\n") else {
                        // A partial head: hold it back until it is complete.
                        if self.partial_head_ok(&data[i..], 0) {
                            self.pending.extend_from_slice(&data[i..]);
                        }
                        return i;
                    };
                    if !self.after_head(&data[i..i + end + 4]) {
                        return i;
                    }
                    i += end + 4;
                }
                State::ChunkSize | State::Trailers => {
                    // A CRLF split between two reads ends the line kept in `pending`.
                    if self.pending.last() == Some(&b'\r') && data[i] == b'\n' {
                        let mut text = std::mem::take(&mut self.pending);
                        text.truncate(text.len() - 1);
                        if !self.after_line(&text) {
                            return i;
                        }
                        i += 1;
                        continue;
                    }
                    let Some(end) = find(&data[i..], b"\r\n") else {
                        // Chunk lines are released as they come, a copy kept to finish them.
                        self.pending.extend_from_slice(&data[i..]);
                        if self.pending.len() > MAX_CHUNK_LINE {
                            self.reject("chunk line too long", REJECT);
                            return i;
                        }
                        return data.len();
                    };
                    let ok = if self.pending.is_empty() {
                        self.after_line(&data[i..i + end])
                    } else {
                        let mut text = std::mem::take(&mut self.pending);
                        text.extend_from_slice(&data[i..i + end]);
                        self.after_line(&text)
                    };
                    if !ok {
                        return i;
                    }
                    i += end + 2;
                }
            }
        }
        data.len()
    }
}

impl State {
    /// After `n` bytes of a body or chunk.
    fn consumed(self, n: u64) -> State {
        match self {
            State::Body(left) if left > n => State::Body(left - n),
            State::Body(_) => State::Head,
            State::ChunkData(left) if left > n => State::ChunkData(left - n),
            State::ChunkData(_) => State::ChunkSize,
            other => other,
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

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[test]
    fn verdicts() {
        let v = |h: &str| check_head(h.as_bytes(), 100);
        assert_eq!(v("GET / HTTP/1.1\r\nHost: x\r\n\r\n"), Verdict::Body(0));
        assert_eq!(v("GET / HTTP/1.0\r\n\r\n"), Verdict::Body(0));
        assert_eq!(v("POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\n"), Verdict::Body(5));
        assert_eq!(v("POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"), Verdict::Chunked);
        assert_eq!(
            v("GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: keep-alive, Upgrade\r\n\r\n"),
            Verdict::Passthrough
        );
        // An Upgrade header alone is no upgrade: the guard keeps following.
        assert_eq!(v("GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n\r\n"), Verdict::Body(0));
        for bad in [
            "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999999999999999999\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1,1\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
            "POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n",
            "GET / HTTP/1.1\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
            "CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n",
            "GET / HTTP/1.1\nHost: x\r\n\r\n",
            "GET / HTTP/1.1\r\nHost : x\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: x\r\n folded\r\n\r\n",
            "GET  / HTTP/1.1\r\nHost: x\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: x\r\nX: a\x00b\r\n\r\n",
            "GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: upgrade\r\nContent-Length: 3\r\n\r\n",
        ] {
            assert!(matches!(v(bad), Verdict::Reject(_)), "{bad:?}: {:?}", v(bad));
        }
        let many: String = (0..101).map(|i| format!("X-{i}: v\r\n")).collect();
        assert_eq!(v(&format!("GET / HTTP/1.1\r\nHost: x\r\n{many}\r\n")), Verdict::TooLarge);
    }

    /// Runs `input` through the guard into a real hyper server that records
    /// the requests it parsed (path, and whether its body read cleanly).
    /// Returns them and what the client got back. A small `pipe` forces
    /// every read to return a fragment.
    async fn through_pipe(input: &[u8], pipe: usize) -> (Vec<String>, String) {
        use http_body_util::BodyExt;
        let (client, server) = tokio::io::duplex(pipe);
        let (mut cr, mut cw) = tokio::io::split(client);
        let input = input.to_vec();
        tokio::spawn(async move {
            let _ = cw.write_all(&input).await;
            // Keep the write side open: EOF must not be what ends the exchange.
            tokio::time::sleep(std::time::Duration::from_secs(2)).await;
            let _ = cw.shutdown().await;
        });
        let answers = tokio::spawn(async move {
            let mut answered = Vec::new();
            let _ = cr.read_to_end(&mut answered).await;
            String::from_utf8_lossy(&answered).into_owned()
        });
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let record = seen.clone();
        let svc = hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
            let record = record.clone();
            async move {
                let path = req.uri().path().to_string();
                let ok = req.into_body().collect().await.is_ok();
                record.lock().unwrap().push(if ok { path } else { format!("{path} (body error)") });
                // As the proxy does: a body that fails to read is a bad request.
                let mut resp = http::Response::new(http_body_util::Full::new(bytes::Bytes::from("ok")));
                if !ok {
                    *resp.status_mut() = http::StatusCode::BAD_REQUEST;
                }
                Ok::<_, std::convert::Infallible>(resp)
            }
        });
        let guard = H1Guard::new(server, 65536, 100);
        let _ = hyper::server::conn::http1::Builder::new()
            .max_buf_size(65536)
            .serve_connection(hyper_util::rt::TokioIo::new(guard), svc)
            .await;
        let seen = seen.lock().unwrap().clone();
        (seen, answers.await.unwrap())
    }

    const KEEP_ALIVE: &[u8] = b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello\r\nPOST /b HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5;x=y\r\nhello\r\n10 ; a=b\r\n0123456789abcdef\r\n0\r\nT: v\r\n\r\nGET /c HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";

    fn answers(text: &str) -> Vec<&str> {
        text.match_indices("HTTP/1.1 ").map(|(i, _)| &text[i + 9..i + 12]).collect()
    }

    #[tokio::test]
    async fn passes_keep_alive_requests_and_bodies_untouched() {
        for pipe in [1 << 16, 1, 2, 3, 7, 16] {
            let (seen, answered) = through_pipe(KEEP_ALIVE, pipe).await;
            assert_eq!(seen, vec!["/a", "/b", "/c"], "pipe {pipe}");
            assert_eq!(answers(&answered), vec!["200", "200", "200"], "pipe {pipe}");
        }
    }

    /// What follows a good request never reaches the parser when it is
    /// refused, and the refusal comes after the good request's answer.
    async fn refused_after_good(rest: &[u8], answer: &str) {
        let mut input = b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n".to_vec();
        input.extend_from_slice(rest);
        for pipe in [1 << 16, 3] {
            let (seen, answered) = through_pipe(&input, pipe).await;
            let what = String::from_utf8_lossy(rest);
            assert_eq!(seen.first().map(String::as_str), Some("/a"), "{what:?}");
            assert!(!seen.iter().any(|p| p.contains("smuggled")), "{what:?}: {seen:?}");
            let statuses = answers(&answered);
            assert_eq!(statuses.first(), Some(&"200"), "{what:?}: {answered:?}");
            // hyper does not wait to flush an error answer into a full pipe.
            if pipe > 1024 {
                assert!(statuses.contains(&answer), "{what:?} -> {answered:?}");
            }
        }
    }

    #[tokio::test]
    async fn a_smuggling_attempt_after_a_good_request_is_cut_off() {
        refused_after_good(b"POST /b HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n", "400").await;
        refused_after_good(b"POST /b HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\nxGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n", "400").await;
        // Upgrade without Connection: upgrade no longer turns the guard off.
        refused_after_good(b"GET /b HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n\r\nPOST /c HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n", "400").await;
        refused_after_good(
            b"CONNECT x:443 HTTP/1.1\r\nHost: x:443\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n",
            "400",
        )
        .await;
        // Bare LF requests are answered, not left hanging.
        refused_after_good(b"GET /smuggled HTTP/1.1\nHost: x\n\n", "400").await;
        refused_after_good(b"\nGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n", "400").await;
        let huge = format!("GET /smuggled HTTP/1.1\r\nHost: x\r\nX: {}\r\n\r\n", "a".repeat(70_000));
        refused_after_good(huge.as_bytes(), "431").await;
    }

    #[tokio::test]
    async fn malformed_chunking_ends_the_request_with_400() {
        for bad in [
            // A chunk size that overflows u64 once its CRLF is counted.
            &b"ffffffffffffffff\r\nGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n"[..],
            b"10000000000000000\r\nx\r\n",
            b" 5\r\nhello\r\n0\r\n\r\n",
            b"5\nhello\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n",
            b"zz\r\nGET /smuggled HTTP/1.1\r\n\r\n",
        ] {
            let mut input = b"POST /b HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
            input.extend_from_slice(bad);
            for pipe in [1 << 16, 3] {
                let (seen, answered) = through_pipe(&input, pipe).await;
                let what = String::from_utf8_lossy(bad);
                assert!(seen.iter().all(|p| p == "/b (body error)"), "{what:?}: {seen:?}");
                assert!(answered.starts_with("HTTP/1.1 400"), "{what:?}: {answered:?}");
            }
        }
    }
}
