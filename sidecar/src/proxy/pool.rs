//! Connections from the sidecar to its local app: a small pool of HTTP/1.1
//! keep-alive connections (a connection returns to the pool when its response
//! body has been read to the end) and one multiplexed HTTP/2 connection.
//! Written for the one thing it does, without a general client's per-request
//! background tasks.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::BodyExt;
use hyper::body::{Frame, Incoming, SizeHint};
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;

use super::Body;

/// Most idle HTTP/1.1 connections kept to the app.
const MAX_IDLE: usize = 256;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Why the app could not be reached or answered badly.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("connect to the app at {addr}: {reason}")]
    Connect { addr: SocketAddr, reason: String },
    #[error("app connection: {0}")]
    Http(#[from] hyper::Error),
}

/// The pool.
#[derive(Debug)]
pub struct AppPool {
    addr: SocketAddr,
    idle: Arc<Mutex<Vec<http1::SendRequest<Body>>>>,
    h2: Mutex<Option<http2::SendRequest<Body>>>,
    h2_connect: tokio::sync::Mutex<()>,
}

async fn tcp(addr: SocketAddr) -> Result<TcpStream, AppError> {
    let connect = |reason: String| AppError::Connect { addr, reason };
    let tcp = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr))
        .await
        .map_err(|_| connect("timed out".into()))?
        .map_err(|e| connect(e.to_string()))?;
    let _ = tcp.set_nodelay(true);
    Ok(tcp)
}

impl AppPool {
    pub fn new(addr: SocketAddr) -> Self {
        Self { addr, idle: Arc::default(), h2: Mutex::new(None), h2_connect: tokio::sync::Mutex::new(()) }
    }

    /// Sends an HTTP/1.1 request on an idle or new connection.
    ///
    /// A kept-alive connection can be closed by the app just as a request
    /// goes out on it (its keep-alive timeout racing the request). Then:
    /// a request that was not sent is sent again on a new connection; one
    /// that was sent and got no response is sent again once, on a new
    /// connection, only if it is idempotent and has no body (what nginx
    /// does); anything else is the app's failure (502).
    pub async fn send_h1(&self, req: Request<Body>) -> Result<Response<Body>, AppError> {
        let (mut sender, reused) = loop {
            let idle = self.idle.lock().unwrap_or_else(|p| p.into_inner()).pop();
            match idle {
                Some(mut s) if !s.is_closed() => {
                    if s.ready().await.is_ok() {
                        break (s, true);
                    }
                }
                Some(_) => continue,
                // The connect is boxed: a request on a pooled connection
                // must not carry (and move) the connect's state.
                None => break (Box::pin(self.connect_h1()).await?, false),
            }
        };
        let replay = if reused { replayable(&req) } else { None };
        let resp = match sender.try_send_request(req).await {
            Ok(resp) => resp,
            Err(mut e) => {
                let again = match (e.take_message(), replay) {
                    (Some(req), _) => req,
                    (None, Some(req)) if closed_before_response(e.error()) => req,
                    _ => return Err(e.into_error().into()),
                };
                tracing::debug!(error = %e.error(), "app closed a reused connection without answering; sending again on a new one");
                sender = Box::pin(self.connect_h1()).await?;
                sender.send_request(again).await?
            }
        };
        let pool = self.idle.clone();
        Ok(resp.map(|body| ReturnOnEnd { body, sender: Some(sender), pool }.boxed_unsync()))
    }

    async fn connect_h1(&self) -> Result<http1::SendRequest<Body>, AppError> {
        let (s, conn) = http1::handshake(TokioIo::new(tcp(self.addr).await?)).await?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "app connection ended");
            }
        });
        Ok(s)
    }

    /// Sends an HTTP/2 request on the shared connection (opened on demand,
    /// reopened once if it died before the request left).
    pub async fn send_h2(&self, req: Request<Body>) -> Result<Response<Body>, AppError> {
        let mut sender = match self.cached_h2() {
            Some(s) => s,
            None => Box::pin(self.h2_sender()).await?,
        };
        let _ = sender.ready().await;
        let resp = match sender.try_send_request(req).await {
            Ok(r) => r,
            Err(mut e) => match e.take_message() {
                Some(req) => {
                    *self.h2.lock().unwrap_or_else(|p| p.into_inner()) = None;
                    Box::pin(self.h2_sender()).await?.send_request(req).await?
                }
                None => return Err(e.into_error().into()),
            },
        };
        Ok(resp.map(|b| b.boxed_unsync()))
    }

    fn cached_h2(&self) -> Option<http2::SendRequest<Body>> {
        self.h2.lock().unwrap_or_else(|p| p.into_inner()).clone().filter(|s| !s.is_closed())
    }

    async fn h2_sender(&self) -> Result<http2::SendRequest<Body>, AppError> {
        let cached = || self.cached_h2();
        if let Some(s) = cached() {
            return Ok(s);
        }
        // One connect at a time; the others reuse its result.
        let _connecting = self.h2_connect.lock().await;
        if let Some(s) = cached() {
            return Ok(s);
        }
        let (sender, conn) = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .initial_stream_window_size(1 << 20)
            .initial_connection_window_size(4 << 20)
            .handshake(TokioIo::new(tcp(self.addr).await?))
            .await?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "app HTTP/2 connection ended");
            }
        });
        *self.h2.lock().unwrap_or_else(|p| p.into_inner()) = Some(sender.clone());
        Ok(sender)
    }
}

/// A copy of `req` to send again, if it may be: an idempotent method and no
/// body (extensions are not copied; nothing below the pool reads them).
fn replayable(req: &Request<Body>) -> Option<Request<Body>> {
    if !req.method().is_idempotent() || !hyper::body::Body::is_end_stream(req.body()) {
        return None;
    }
    let mut copy = Request::new(super::full(Bytes::new()));
    *copy.method_mut() = req.method().clone();
    *copy.uri_mut() = req.uri().clone();
    *copy.version_mut() = req.version();
    *copy.headers_mut() = req.headers().clone();
    Some(copy)
}

/// The connection ended (closed or reset) before any response came.
fn closed_before_response(e: &hyper::Error) -> bool {
    if e.is_incomplete_message() || e.is_canceled() || e.is_closed() {
        return true;
    }
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            return matches!(
                io.kind(),
                std::io::ErrorKind::ConnectionReset
                    | std::io::ErrorKind::BrokenPipe
                    | std::io::ErrorKind::UnexpectedEof
            );
        }
        source = s.source();
    }
    false
}

/// A response body that gives its HTTP/1.1 connection back to the pool once
/// read to the end (a body dropped early takes its connection with it).
struct ReturnOnEnd {
    body: Incoming,
    sender: Option<http1::SendRequest<Body>>,
    pool: Arc<Mutex<Vec<http1::SendRequest<Body>>>>,
}

impl ReturnOnEnd {
    fn give_back(&mut self) {
        if let Some(s) = self.sender.take() {
            let mut idle = self.pool.lock().unwrap_or_else(|p| p.into_inner());
            if idle.len() < MAX_IDLE {
                idle.push(s);
            }
        }
    }
}

impl hyper::body::Body for ReturnOnEnd {
    type Data = Bytes;
    type Error = hyper::Error;
    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let r = Pin::new(&mut self.body).poll_frame(cx);
        match &r {
            Poll::Ready(None) => self.give_back(),
            Poll::Ready(Some(Err(_))) => self.sender = None,
            _ => {}
        }
        r
    }
    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }
    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

impl Drop for ReturnOnEnd {
    fn drop(&mut self) {
        // An empty body may never be polled: it ended all the same.
        if hyper::body::Body::is_end_stream(&self.body) {
            self.give_back();
        }
    }
}
