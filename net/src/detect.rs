//! Protocol detection on plaintext connections: HTTP/2 prior knowledge (the
//! connection preface), HTTP/1.x (a well-formed request line), or anything
//! else, which is *not HTTP*. The classifier is strict on purpose: a client
//! that speaks first must speak valid HTTP/1.1 or HTTP/2, because a lenient
//! app parser (Python's `http.server` splits on any whitespace) reads as a
//! request what a lenient classifier would carry as opaque bytes, past the
//! policy. What is not HTTP is refused by the server sidecar unless its port
//! is declared opaque; only a client that stays silent (a server-speaks-first
//! protocol) is carried opaque without a declaration.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, ReadBuf};

/// The HTTP/2 connection preface.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// A well-formed first line longer than this without a line end is taken as
/// HTTP/1 (hyper then refuses it as too long): the decision is made on the
/// first `MAX_LINE` bytes, so more bytes never change it.
const MAX_LINE: usize = 8192;

/// What a connection speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Http1,
    Http2,
    /// Not a valid HTTP/1.1 or HTTP/2 start (or, where declared or
    /// server-first, bytes carried as they are).
    Opaque,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Http1 => "http1",
            Self::Http2 => "http2",
            Self::Opaque => "tcp",
        }
    }
}

/// RFC 9110 `tchar`: what a method token is made of.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// Where a request line stands after some of its bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Line {
    /// Every byte so far can start a valid request line.
    Partial,
    /// A whole, valid request line.
    Valid,
    /// A byte no valid request line has there.
    Invalid,
}

/// Checks `line` against RFC 9112's `request-line`, strictly: a method token,
/// one SP, a target of visible ASCII, one SP, `HTTP/1.0` or `HTTP/1.1`, then
/// CRLF or LF. No other whitespace anywhere (no tab, VT, FF, 0x1C-0x1F,
/// 0x85, 0xA0), no leading space, no HTTP/0.9.
fn request_line(line: &[u8]) -> Line {
    const VERSION: &[u8] = b"HTTP/1.";
    let mut i = 0;
    let method = line.iter().take_while(|b| is_tchar(**b)).count();
    i += method;
    if i == line.len() {
        return Line::Partial;
    }
    if method == 0 || line[i] != b' ' {
        return Line::Invalid;
    }
    i += 1;
    let target = line[i..].iter().take_while(|b| (0x21..=0x7e).contains(*b)).count();
    i += target;
    if i == line.len() {
        return Line::Partial;
    }
    if target == 0 || line[i] != b' ' {
        return Line::Invalid;
    }
    i += 1;
    for want in VERSION {
        match line.get(i) {
            None => return Line::Partial,
            Some(b) if b == want => i += 1,
            Some(_) => return Line::Invalid,
        }
    }
    match line.get(i) {
        None => return Line::Partial,
        Some(b'0' | b'1') => i += 1,
        Some(_) => return Line::Invalid,
    }
    match (line.get(i), line.get(i + 1)) {
        (None, _) | (Some(b'\r'), None) => Line::Partial,
        (Some(b'\n'), _) | (Some(b'\r'), Some(b'\n')) => Line::Valid,
        _ => Line::Invalid,
    }
}

/// Classifies a prefix; `None` means more bytes are needed.
///
/// `Http2` for the connection preface; `Http1` for a well-formed request
/// line (after optional empty lines, RFC 9112 section 2.2); `Opaque` for
/// anything else, as soon as one byte shows it. What any HTTP/1 server
/// could read as a request is therefore either `Http1` (and served by hyper,
/// which strips identity headers and enforces policy) or `Opaque`, which a
/// server sidecar refuses on every port not declared opaque.
pub fn classify(buf: &[u8]) -> Option<Protocol> {
    if buf.is_empty() {
        return None;
    }
    let n = buf.len().min(H2_PREFACE.len());
    if buf[..n] == H2_PREFACE[..n] {
        return if n == H2_PREFACE.len() { Some(Protocol::Http2) } else { None };
    }
    // Empty lines before a request line are allowed (RFC 9112 section 2.2).
    let Some(start) = buf.iter().position(|b| *b != b'\r' && *b != b'\n') else {
        // Endless empty lines: hyper skips or refuses them, bounded.
        return (buf.len() > MAX_LINE).then_some(Protocol::Http1);
    };
    if start > MAX_LINE {
        return Some(Protocol::Http1);
    }
    let line = &buf[start..];
    let head = &line[..line.len().min(MAX_LINE)];
    match request_line(head) {
        Line::Valid => Some(Protocol::Http1),
        Line::Invalid => Some(Protocol::Opaque),
        // Well-formed so far and too long: hyper refuses it (414/431).
        Line::Partial if line.len() > MAX_LINE => Some(Protocol::Http1),
        Line::Partial => None,
    }
}

/// How detection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Detected {
    /// The first bytes said what the connection speaks.
    Known(Protocol),
    /// The peer closed before anything could be told (opaque).
    Eof,
    /// Nothing conclusive arrived in time; `buf` may hold a partial prefix.
    TimedOut,
}

/// Reads from `io` until the protocol is known, EOF, or `timeout` passes.
/// Returns the bytes read, to be replayed with [`Prefixed`].
pub async fn detect_with<T: AsyncRead + Unpin>(
    io: &mut T,
    buf: &mut BytesMut,
    timeout: Duration,
) -> io::Result<Detected> {
    let read = async {
        loop {
            if let Some(p) = classify(buf) {
                return Ok::<_, io::Error>(Detected::Known(p));
            }
            if io.read_buf(buf).await? == 0 {
                return Ok(Detected::Eof);
            }
        }
    };
    match tokio::time::timeout(timeout, read).await {
        Ok(r) => r,
        Err(_) => Ok(Detected::TimedOut),
    }
}

/// Client-side detection: reads until the protocol is known, EOF, or
/// `timeout` passes (then: opaque, so server-speaks-first protocols work).
pub async fn detect<T: AsyncRead + Unpin>(io: &mut T, timeout: Duration) -> io::Result<(Protocol, Bytes)> {
    let mut buf = BytesMut::with_capacity(64);
    let proto = match detect_with(io, &mut buf, timeout).await? {
        Detected::Known(p) => p,
        Detected::Eof | Detected::TimedOut => Protocol::Opaque,
    };
    Ok((proto, buf.freeze()))
}

/// An IO that first yields `prefix`, then reads from `inner`.
#[derive(Debug)]
pub struct Prefixed<T> {
    prefix: Bytes,
    inner: T,
}

impl<T> Prefixed<T> {
    pub fn new(prefix: Bytes, inner: T) -> Self {
        Self { prefix, inner }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Prefixed<T> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix[..n]);
            self.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

delegate_async_write!(Prefixed);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_prefixes() {
        assert_eq!(classify(b"GET / HTTP/1.1\r\n"), Some(Protocol::Http1));
        assert_eq!(classify(b"GET / HTTP/1.0\n"), Some(Protocol::Http1));
        assert_eq!(classify(b"M-SEARCH * HTTP/1.1\r\n"), Some(Protocol::Http1));
        assert_eq!(classify(b"OPTIONS http://x/a?b HTTP/1.1\r\n"), Some(Protocol::Http1));
        assert_eq!(classify(b"GE"), None);
        assert_eq!(classify(b"GET / HTTP/1.1"), None, "the line has not ended");
        assert_eq!(classify(b"GET / HTTP/1.1\r"), None);
        assert_eq!(classify(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"), Some(Protocol::Http2));
        assert_eq!(classify(b"PRI * HT"), None);
        assert_eq!(classify(b"\x16\x03\x01"), Some(Protocol::Opaque));
        // Any case of method is a token; hyper decides what it serves.
        assert_eq!(classify(b"get / HTTP/1.1\r\n"), Some(Protocol::Http1));
        assert_eq!(classify(b"\r\nGET / HTTP/1.1\r\n"), Some(Protocol::Http1));
        assert_eq!(classify(b"\r\n"), None);
        let long = [&b"GET".repeat(50)[..], b" /admin HTTP/1.1\r\n"].concat();
        assert_eq!(classify(&long), Some(Protocol::Http1));
        // Not a valid start: refused by the server sidecar, never carried.
        for bad in [
            &b"GET\t/x\tHTTP/1.1\r\n"[..],
            b" GET /x HTTP/1.1\r\n",
            b"\tGET /x HTTP/1.1\r\n",
            b"GET\x0b/x\x0bHTTP/1.1\r\n",
            b"GET\x0c/x HTTP/1.1\r\n",
            b"GET\x1c/x HTTP/1.1\r\n",
            b"GET /x\x85HTTP/1.1\r\n",
            b"GET /x\xa0HTTP/1.1\r\n",
            b"GET  /x HTTP/1.1\r\n",
            b"GET /x  HTTP/1.1\r\n",
            b"GET /x HTTP/1.1 junk\r\n",
            b"GET /x hTtP/1.1\r\n",
            b"GET /x HTTP/2.0\r\n",
            b"GET /x HTTP/1.1\rX",
            b"GET /admin\r\n",
            b"GET /admin\n",
            b"raw tcp bytes\n",
            b"get key\r\n",
            b"HELO x\r\n",
            b"PING\r\n",
            b"*1\r\n$4\r\nPING",
            b"\x00\x00\x00\x08",
        ] {
            assert_eq!(classify(bad), Some(Protocol::Opaque), "{:?}", String::from_utf8_lossy(bad));
        }
        // Decided at the first bad byte: a slow client cannot hold a place.
        assert_eq!(classify(b"GET\t"), Some(Protocol::Opaque));
        assert_eq!(classify(b"hello"), None);
        // Bounded: endless empty lines or an endless first line are decided.
        assert_eq!(classify(&[b'A'; 9000]), Some(Protocol::Http1));
        assert_eq!(classify(&[&b"GET /"[..], &[b'a'; 9000]].concat()), Some(Protocol::Http1));
        assert_eq!(classify(&b"\r\n".repeat(5000)), Some(Protocol::Http1));
        let endless = [&[b'A'; 9000][..], b" \n"].concat();
        assert_eq!(classify(&endless[..8300]), classify(&endless), "more bytes never change the answer");
    }

    /// Every prefix of a byte string is undecided or decided the same way as
    /// the whole: a classification never changes as bytes arrive.
    #[test]
    fn a_decision_never_changes_as_bytes_arrive() {
        for s in [&b"GET /x HTTP/1.1\r\nhost: a\r\n\r\n"[..], b"GET\t/x HTTP/1.1\r\n", b"\r\nPOST /a HTTP/1.0\n"] {
            let whole = classify(s);
            for i in 1..=s.len() {
                if let Some(p) = classify(&s[..i]) {
                    assert_eq!(Some(p), whole, "prefix {i} of {:?}", String::from_utf8_lossy(s));
                }
            }
        }
    }

    #[tokio::test]
    async fn silent_clients_are_opaque_after_the_timeout() {
        let (mut a, _b) = tokio::io::duplex(64);
        let (p, prefix) = detect(&mut a, Duration::from_millis(20)).await.unwrap();
        assert_eq!(p, Protocol::Opaque);
        assert!(prefix.is_empty());
    }

    #[tokio::test]
    async fn prefix_is_replayed() {
        let (mut a, mut b) = tokio::io::duplex(64);
        tokio::io::AsyncWriteExt::write_all(&mut b, b"GET / HTTP/1.1\r\n").await.unwrap();
        let (p, prefix) = detect(&mut a, Duration::from_secs(1)).await.unwrap();
        assert_eq!(p, Protocol::Http1);
        let mut io = Prefixed::new(prefix, a);
        let mut out = vec![0u8; 16];
        io.read_exact(&mut out).await.unwrap();
        assert_eq!(&out, b"GET / HTTP/1.1\r\n");
    }
}
