//! The HTTP/1 framing guard: arbitrary bytes, delivered in arbitrary
//! fragments. It must never panic, never hang, and only ever release to the
//! parser a prefix of what it was given (plus, on a refusal, the one head it
//! hands hyper to answer with).
#![no_main]

use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use libfuzzer_sys::fuzz_target;
use palisade_net::h1guard::H1Guard;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// An in-memory peer that hands out `data` in the given fragment sizes.
struct Chunks<'a> {
    data: &'a [u8],
    sizes: &'a [u8],
    next: usize,
}

impl AsyncRead for Chunks<'_> {
    fn poll_read(mut self: Pin<&mut Self>, _: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let size = self.sizes.get(self.next % self.sizes.len().max(1)).copied().unwrap_or(255).max(1) as usize;
        self.next += 1;
        let n = size.min(self.data.len()).min(buf.remaining());
        buf.put_slice(&self.data[..n]);
        self.data = &self.data[n..];
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Chunks<'_> {
    fn poll_write(self: Pin<&mut Self>, _: &mut Context<'_>, b: &[u8]) -> Poll<std::io::Result<usize>> {
        Poll::Ready(Ok(b.len()))
    }
    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

fuzz_target!(|input: &[u8]| {
    // First byte: how many fragment sizes follow.
    let Some((&k, rest)) = input.split_first() else { return };
    let k = (k as usize % 8).min(rest.len());
    let (sizes, data) = rest.split_at(k);
    let mut guard = H1Guard::new(Chunks { data, sizes, next: 0 }, 1024, 32);
    let mut cx = Context::from_waker(Waker::noop());
    let mut out = Vec::new();
    let mut buf = [0u8; 97];
    // Every read makes progress or ends: bounded by the input's length.
    for _ in 0..(data.len() * 2 + 16) {
        let mut rb = ReadBuf::new(&mut buf);
        match Pin::new(&mut guard).poll_read(&mut cx, &mut rb) {
            Poll::Ready(Ok(())) if rb.filled().is_empty() => return,
            Poll::Ready(Ok(())) => out.extend_from_slice(rb.filled()),
            Poll::Ready(Err(_)) => return,
            Poll::Pending => panic!("an in-memory peer never blocks"),
        }
        // What was released is the input's own bytes, up to any refusal head.
        let ours = out.iter().zip(data).take_while(|(a, b)| a == b).count();
        let refusal = |t: &[u8]| {
            t.is_empty()
                || b"\x01 / HTTP/1.1\r\n\r\n".starts_with(t)
                || t.starts_with(b"\x01 / HTTP/1.1\r\n\r\n")
                || t.starts_with(b"GET / HTTP/1.1\r\nx: ")
                || b"GET / HTTP/1.1\r\nx: ".starts_with(t)
        };
        assert!((0..=ours).any(|p| refusal(&out[p..])), "released bytes that were never sent");
    }
    panic!("the guard did not finish");
});
