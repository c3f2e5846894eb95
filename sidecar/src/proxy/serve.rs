//! Serving HTTP on an accepted connection with the configured limits and
//! graceful shutdown: when draining starts, HTTP/1 connections finish their
//! current request and close, HTTP/2 connections send GOAWAY and finish
//! in-flight streams.

use std::convert::Infallible;
use std::future::Future;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::rt::{Read, Write};
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tokio_util::sync::CancellationToken;

use super::Body;
use crate::config::Limits;

/// Serves HTTP/1.1 (with upgrades) until the client closes or draining ends it.
pub async fn http1<I, F, Fut>(io: I, limits: &Limits, cancel: CancellationToken, handler: F) -> Result<(), hyper::Error>
where
    I: Read + Write + Unpin + Send + 'static,
    F: Fn(Request<Incoming>) -> Fut + Send + 'static,
    Fut: Future<Output = Response<Body>> + Send + 'static,
{
    let svc = hyper::service::service_fn(move |req| {
        let fut = handler(req);
        async move { Ok::<_, Infallible>(fut.await) }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(Some(limits.header_read_timeout))
        .max_buf_size(limits.max_header_bytes.max(8192))
        .max_headers(limits.max_headers)
        .serve_connection(io, svc)
        .with_upgrades();
    tokio::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => r,
        _ = cancel.cancelled() => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    }
}

/// Serves HTTP/2 until the client closes or draining ends it.
pub async fn http2<I, F, Fut>(io: I, limits: &Limits, cancel: CancellationToken, handler: F) -> Result<(), hyper::Error>
where
    I: Read + Write + Unpin + Send + 'static,
    F: Fn(Request<Incoming>) -> Fut + Send + 'static + Clone,
    Fut: Future<Output = Response<Body>> + Send + 'static,
{
    // Each stream is a task; its future is boxed so spawning it moves a
    // pointer, not the whole request state.
    let svc = hyper::service::service_fn(move |req| {
        let fut = Box::pin(handler(req));
        async move { Ok::<_, Infallible>(fut.await) }
    });
    let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .max_concurrent_streams(limits.max_concurrent_streams)
        .max_header_list_size(limits.max_header_bytes as u32)
        .initial_stream_window_size(1 << 20)
        .initial_connection_window_size(4 << 20)
        .keep_alive_interval(Some(std::time::Duration::from_secs(30)))
        .serve_connection(io, svc);
    tokio::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => r,
        _ = cancel.cancelled() => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    }
}
