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
/// Longest method token we accept as HTTP/1 (e.g. "PROPPATCH" is 9).
const MAX_METHOD: usize = 16;

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

/// Classifies a prefix; `None` means more bytes are needed.
pub fn classify(buf: &[u8]) -> Option<Protocol> {
    if buf.is_empty() {
        return None;
    }
    let n = buf.len().min(H2_PREFACE.len());
    if buf[..n] == H2_PREFACE[..n] {
        return if n == H2_PREFACE.len() { Some(Protocol::Http2) } else { None };
    }
    for (i, b) in buf.iter().enumerate() {
        match b {
            b' ' if i > 0 => return Some(Protocol::Http1),
            b'A'..=b'Z' | b'-' if i < MAX_METHOD => {}
            _ => return Some(Protocol::Opaque),
        }
    }
    if buf.len() > MAX_METHOD { Some(Protocol::Opaque) } else { None }
}

/// Reads from `io` until the protocol is known, EOF, or `timeout` passes
/// (then: opaque). Returns the bytes read, to be replayed with [`Prefixed`].
pub async fn detect<T: AsyncRead + Unpin>(io: &mut T, timeout: Duration) -> io::Result<(Protocol, Bytes)> {
    let mut buf = BytesMut::with_capacity(64);
    let read = async {
        loop {
            if let Some(p) = classify(&buf) {
                return Ok::<_, io::Error>(p);
            }
            if io.read_buf(&mut buf).await? == 0 {
                return Ok(Protocol::Opaque);
            }
        }
    };
    let proto = match tokio::time::timeout(timeout, read).await {
        Ok(r) => r?,
        Err(_) => Protocol::Opaque,
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

super::delegate_async_write!(Prefixed);

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
        assert_eq!(classify(b"hello"), Some(Protocol::Opaque));
        assert_eq!(classify(b"get / HTTP/1.1"), Some(Protocol::Opaque));
        assert_eq!(classify(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ"), Some(Protocol::Opaque));
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
