//! Protocol detection on plaintext connections: HTTP/2 prior knowledge (the
//! connection preface), HTTP/1.x (a method token then a space), or opaque TCP.
//! Detection reads at most a few bytes and gives up after a short timeout, so
//! server-speaks-first protocols (SMTP, MySQL...) are not stalled for long;
//! ports can also be declared opaque to skip it entirely.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, ReadBuf};

/// The HTTP/2 connection preface.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// A first line longer than this without a line end is taken as HTTP/1
/// (hyper then parses or refuses it): what an HTTP server would read as a
/// request must never be carried as opaque bytes, past the policy.
const MAX_LINE: usize = 8192;

/// What a connection speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Http1,
    Http2,
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

/// Classifies a prefix; `None` means more bytes are needed.
///
/// HTTP/1 is recognised by its first line, leniently, as a lenient server
/// behind the sidecar would read it: optional empty lines, then a method
/// token of any case and length, a space, and either a rest that names an
/// HTTP version anywhere (`HTTP/`, any case) or a lone target (`/...`, `*`,
/// `scheme://...`, an HTTP/0.9 request). Anything else (`get key`, `HELO x`,
/// binary) is opaque. A first line that has not ended is waited for: until
/// it ends nobody, the app included, can tell it is not a request.
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
    let line = &buf[start..];
    let end = line.iter().position(|b| *b == b'\n');
    // Decided on the first MAX_LINE bytes alone, so more bytes never change it.
    if end.unwrap_or(line.len()) > MAX_LINE {
        let head = &line[..MAX_LINE];
        let method = head.iter().take_while(|b| is_tchar(**b)).count();
        let opaque = method == 0 || (method < head.len() && head[method] != b' ');
        return Some(if opaque { Protocol::Opaque } else { Protocol::Http1 });
    }
    let method = line.iter().take_while(|b| is_tchar(**b)).count();
    if method == line.len() {
        return None;
    }
    if method == 0 || line[method] != b' ' {
        return Some(Protocol::Opaque);
    }
    let end = end?;
    let rest = &line[method + 1..end];
    let rest = rest.strip_suffix(b"\r").unwrap_or(rest);
    let names_version = rest.windows(5).any(|w| w.eq_ignore_ascii_case(b"HTTP/"));
    let lone_target = !rest.is_empty()
        && !rest.contains(&b' ')
        && (rest[0] == b'/' || rest == b"*" || rest.windows(3).any(|w| w == b"://"));
    Some(if names_version || lone_target { Protocol::Http1 } else { Protocol::Opaque })
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
        assert_eq!(classify(b"M-SEARCH * HTTP/1.1\r\n"), Some(Protocol::Http1));
        assert_eq!(classify(b"GE"), None);
        assert_eq!(classify(b"GET / HTTP/1.1"), None, "the line has not ended");
        assert_eq!(classify(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"), Some(Protocol::Http2));
        assert_eq!(classify(b"PRI * HT"), None);
        assert_eq!(classify(b"\x16\x03\x01"), Some(Protocol::Opaque));
        assert_eq!(classify(b"hello"), None);
        assert_eq!(classify(b"hello\r\n"), Some(Protocol::Opaque));
        // What a lenient server reads as a request is HTTP, whatever its case or length.
        assert_eq!(classify(b"get / HTTP/1.1\r\n"), Some(Protocol::Http1));
        assert_eq!(classify(b"\r\nGET / HTTP/1.1\r\n"), Some(Protocol::Http1));
        assert_eq!(classify(b"\r\n"), None);
        assert_eq!(classify(b"GET /admin\r\n"), Some(Protocol::Http1), "HTTP/0.9");
        assert_eq!(classify(b"GET http://x/admin\n"), Some(Protocol::Http1));
        assert_eq!(classify(b"GET /a HTTP/1.1 junk\r\n"), Some(Protocol::Http1));
        let long = [&b"GET".repeat(50)[..], b" /admin hTtP/1.1\r\n"].concat();
        assert_eq!(classify(&long), Some(Protocol::Http1));
        assert_eq!(classify(&[b'A'; 9000]), Some(Protocol::Http1));
        assert_eq!(classify(&[&b"GET /"[..], &[b'a'; 9000]].concat()), Some(Protocol::Http1));
        // Text protocols that are not HTTP stay opaque.
        assert_eq!(classify(b"raw tcp bytes"), None);
        assert_eq!(classify(b"raw tcp bytes\n"), Some(Protocol::Opaque));
        assert_eq!(classify(b"get key\r\n"), Some(Protocol::Opaque), "memcached");
        assert_eq!(classify(b"HELO x\r\n"), Some(Protocol::Opaque));
        assert_eq!(classify(b"PING\r\n"), Some(Protocol::Opaque));
        assert_eq!(classify(b"*1\r\n$4\r\nPING"), Some(Protocol::Opaque));
        assert_eq!(classify(b"\x00\x00\x00\x08"), Some(Protocol::Opaque));
        // Bounded: endless empty lines or an endless first line are decided.
        assert_eq!(classify(&b"\r\n".repeat(5000)), Some(Protocol::Http1));
        let endless = [&[b'A'; 9000][..], b" \n"].concat();
        assert_eq!(classify(&endless[..8300]), classify(&endless), "more bytes never change the answer");
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
