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
/// A method token longer than this is still taken as HTTP/1 (hyper then
/// parses or refuses it): what an HTTP server would read as a request must
/// never be carried as opaque bytes, past the policy that names paths.
const MAX_METHOD: usize = 1024;

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
/// Deliberately lenient about HTTP/1: any token (any case, any length) then
/// a space, after optional empty lines, is HTTP, because that is what a
/// lenient HTTP server behind the sidecar would accept as a request.
pub fn classify(buf: &[u8]) -> Option<Protocol> {
    if buf.is_empty() {
        return None;
    }
    let n = buf.len().min(H2_PREFACE.len());
    if buf[..n] == H2_PREFACE[..n] {
        return if n == H2_PREFACE.len() { Some(Protocol::Http2) } else { None };
    }
    // Empty lines before a request line are allowed (RFC 9112 section 2.2).
    let start = buf.iter().position(|b| *b != b'\r' && *b != b'\n')?;
    if start > 0 && !buf[..start].iter().all(|b| *b == b'\n' || *b == b'\r') {
        return Some(Protocol::Opaque);
    }
    for (i, b) in buf[start..].iter().enumerate() {
        match b {
            b' ' if i > 0 => return Some(Protocol::Http1),
            b if is_tchar(*b) && i < MAX_METHOD => {}
            _ if i >= MAX_METHOD => return Some(Protocol::Http1),
            _ => return Some(Protocol::Opaque),
        }
    }
    None
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
            if buf.len() >= 2 * MAX_METHOD {
                return Ok(Detected::Known(Protocol::Opaque));
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
        assert_eq!(classify(b"M-SEARCH * HTTP/1.1"), Some(Protocol::Http1));
        assert_eq!(classify(b"GE"), None);
        assert_eq!(classify(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"), Some(Protocol::Http2));
        assert_eq!(classify(b"PRI * HT"), None);
        assert_eq!(classify(b"\x16\x03\x01"), Some(Protocol::Opaque));
        assert_eq!(classify(b"hello"), None);
        assert_eq!(classify(b"hello\r\n"), Some(Protocol::Opaque));
        // What a lenient server reads as a request is HTTP, whatever its case or length.
        assert_eq!(classify(b"get / HTTP/1.1"), Some(Protocol::Http1));
        assert_eq!(classify(b"\r\nGET / HTTP/1.1"), Some(Protocol::Http1));
        assert_eq!(classify(b"\r\n"), None);
        assert_eq!(classify(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ "), Some(Protocol::Http1));
        assert_eq!(classify(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ"), None);
        assert_eq!(classify(&[b'A'; 2000]), Some(Protocol::Http1));
        assert_eq!(classify(b"PING\r\n"), Some(Protocol::Opaque));
        assert_eq!(classify(b"*1\r\n$4\r\nPING"), Some(Protocol::Opaque));
        assert_eq!(classify(b"\x00\x00\x00\x08"), Some(Protocol::Opaque));
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
