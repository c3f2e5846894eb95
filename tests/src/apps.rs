//! Small upstream apps for the tests and the benchmark, on 127.0.0.1:0:
//! an HTTP app (HTTP/1.1 and h2c on one port), a gRPC app, a TCP echo with
//! half-close, and a server-speaks-first TCP app.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_stream::Stream;

pub mod echo {
    tonic::include_proto!("palisade.test.v1");
}

type AppBody = http_body_util::combinators::BoxBody<Bytes, Infallible>;

fn body(b: impl Into<Bytes>) -> AppBody {
    Full::new(b.into()).boxed()
}

/// The HTTP test app.
#[derive(Debug, Clone)]
pub struct HttpApp {
    pub addr: SocketAddr,
    /// Requests received (any path).
    pub requests: Arc<AtomicUsize>,
    /// How it answers, changeable while it runs.
    pub behaviour: Arc<Behaviour>,
}

/// How an [`HttpApp`] answers, changed at run time by the tests: added
/// latency, a share of requests failed, or no answer at all; and what it
/// received, by method.
#[derive(Debug, Default)]
pub struct Behaviour {
    /// Milliseconds added before every answer.
    pub delay_ms: AtomicU64,
    /// Percent of requests answered `fail_status` (spread evenly, not at
    /// random: at 50 % the first request since [`fail`](Self::fail) fails,
    /// the next succeeds, and so on).
    fail_percent: AtomicU64,
    fail_status: AtomicU16,
    /// Requests since the failure share was last set.
    seq: AtomicU64,
    /// Never answer (the request hangs until the caller gives up).
    pub hang: AtomicBool,
    received: Mutex<std::collections::BTreeMap<String, usize>>,
}

impl Behaviour {
    /// Answers `percent`% of the requests from now on with `status`.
    pub fn fail(&self, percent: u64, status: u16) {
        self.fail_status.store(status, Ordering::SeqCst);
        self.seq.store(0, Ordering::SeqCst);
        self.fail_percent.store(percent.min(100), Ordering::SeqCst);
    }

    /// Requests received with `method` (`GET`, `POST`...).
    pub fn received(&self, method: &str) -> usize {
        self.received.lock().unwrap_or_else(|p| p.into_inner()).get(method).copied().unwrap_or(0)
    }

    /// What to do with one request: `Some(status)` to fail it.
    async fn apply(&self, method: &http::Method) -> Option<u16> {
        *self.received.lock().unwrap_or_else(|p| p.into_inner()).entry(method.to_string()).or_default() += 1;
        let n = self.seq.fetch_add(1, Ordering::SeqCst);
        let percent = self.fail_percent.load(Ordering::SeqCst);
        let fails = percent > 0 && (n * percent) % 100 < percent;
        if self.hang.load(Ordering::SeqCst) {
            std::future::pending::<()>().await;
        }
        let delay = self.delay_ms.load(Ordering::SeqCst);
        if delay > 0 {
            tokio::time::sleep(Duration::from_millis(delay)).await;
        }
        fails.then(|| self.fail_status.load(Ordering::SeqCst))
    }
}

impl HttpApp {
    pub async fn start() -> Self {
        Self::start_with(Arc::default()).await
    }

    /// An app that answers as `behaviour` says (see [`Behaviour`]).
    pub async fn start_with(behaviour: Arc<Behaviour>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("invariant: loopback bind");
        let addr = listener.local_addr().expect("invariant: bound");
        let requests = Arc::new(AtomicUsize::new(0));
        let counter = requests.clone();
        let b = behaviour.clone();
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else { continue };
                let _ = tcp.set_nodelay(true);
                let counter = counter.clone();
                let b = b.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                        counter.fetch_add(1, Ordering::SeqCst);
                        let b = b.clone();
                        async move {
                            match b.apply(req.method()).await {
                                Some(status) => {
                                    // Read what was sent, as a real app would before failing.
                                    let _ = req.into_body().collect().await;
                                    let mut r = Response::new(body("failing on purpose"));
                                    *r.status_mut() =
                                        StatusCode::from_u16(status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
                                    Ok(r)
                                }
                                None => handle(req).await,
                            }
                        }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection_with_upgrades(TokioIo::new(tcp), svc)
                        .await;
                });
            }
        });
        Self { addr, requests, behaviour }
    }
}

async fn handle(mut req: Request<Incoming>) -> Result<Response<AppBody>, Infallible> {
    let path = req.uri().path().to_string();
    let query = req.uri().query().unwrap_or_default().to_string();
    let resp = match path.as_str() {
        "/echo" | "/framing" => {
            let headers: serde_json::Map<String, serde_json::Value> =
                req.headers().iter().map(|(k, v)| (k.to_string(), v.to_str().unwrap_or_default().into())).collect();
            let version = format!("{:?}", req.version());
            let method = req.method().to_string();
            let uri = req.uri().to_string();
            let bytes = req.into_body().collect().await.map(|c| c.to_bytes()).unwrap_or_default();
            let v = serde_json::json!({
                "method": method,
                "uri": uri,
                "version": version,
                "headers": headers,
                "body": String::from_utf8_lossy(&bytes),
            });
            Response::new(body(v.to_string()))
        }
        "/slow" => {
            let ms: u64 = query.strip_prefix("ms=").and_then(|v| v.parse().ok()).unwrap_or(1000);
            tokio::time::sleep(Duration::from_millis(ms)).await;
            Response::new(body("slow done"))
        }
        "/stream" => {
            let chunks =
                tokio_stream::iter((0..3).map(|i| Ok::<_, Infallible>(Frame::data(Bytes::from(format!("chunk{i};"))))));
            let throttled = Box::pin(tokio_stream::StreamExt::throttle(chunks, Duration::from_millis(20)));
            Response::new(StreamBody::new(throttled).boxed())
        }
        "/ws" => {
            let on_upgrade = hyper::upgrade::on(&mut req);
            tokio::spawn(async move {
                if let Ok(up) = on_upgrade.await {
                    let mut io = TokioIo::new(up);
                    let mut buf = [0u8; 1024];
                    while let Ok(n) = io.read(&mut buf).await {
                        if n == 0 || io.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                }
            });
            let mut r = Response::new(body(Bytes::new()));
            *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
            r.headers_mut().insert("upgrade", "echo".parse().expect("invariant: valid header"));
            r.headers_mut().insert("connection", "upgrade".parse().expect("invariant: valid header"));
            r
        }
        "/hello" => Response::new(body("hello")),
        // An app failing (for success rates).
        "/fail" => {
            let mut r = Response::new(body("failed"));
            *r.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
            r
        }
        // An app that says too much about itself, and sets one security header its own way.
        p if p.ends_with("/leaky") => {
            let mut r = Response::new(body("leaky"));
            for (k, v) in [
                ("server", "Apache/2.2.3"),
                ("x-powered-by", "PHP/5.1"),
                ("x-frame-options", "ALLOWALL"),
                ("access-control-allow-origin", "*"),
            ] {
                r.headers_mut().insert(k, v.parse().expect("invariant: valid header"));
            }
            r
        }
        _ => {
            let mut r = Response::new(body("not found"));
            *r.status_mut() = StatusCode::NOT_FOUND;
            r
        }
    };
    Ok(resp)
}

/// A TCP app that reads until EOF (the client's half-close), then answers
/// `echo:<data>` and closes.
pub async fn tcp_echo() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("invariant: loopback bind");
    let addr = listener.local_addr().expect("invariant: bound");
    tokio::spawn(async move {
        loop {
            let Ok((mut tcp, _)) = listener.accept().await else { continue };
            tokio::spawn(async move {
                let mut data = Vec::new();
                if tcp.read_to_end(&mut data).await.is_ok() {
                    let _ = tcp.write_all(b"echo:").await;
                    let _ = tcp.write_all(&data).await;
                    let _ = tcp.shutdown().await;
                }
            });
        }
    });
    addr
}

/// A server-speaks-first TCP app: greets with `220 ready\r\n`, then echoes lines.
pub async fn tcp_greeter() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("invariant: loopback bind");
    let addr = listener.local_addr().expect("invariant: bound");
    tokio::spawn(async move {
        loop {
            let Ok((mut tcp, _)) = listener.accept().await else { continue };
            tokio::spawn(async move {
                let _ = tcp.write_all(b"220 ready\r\n").await;
                let mut buf = [0u8; 1024];
                while let Ok(n) = tcp.read(&mut buf).await {
                    if n == 0 || tcp.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    addr
}

/// The gRPC test app; `cancelled` counts server streams the client abandoned.
#[derive(Debug, Clone, Default)]
pub struct GrpcApp {
    pub cancelled: Arc<AtomicUsize>,
    /// Slow calls dropped before they finished (deadline or cancellation).
    pub slow_aborted: Arc<AtomicUsize>,
    /// The last `grpc-timeout` header the app received.
    pub last_grpc_timeout: Arc<std::sync::Mutex<Option<String>>>,
}

struct AbortGuard(Option<Arc<AtomicUsize>>);
impl Drop for AbortGuard {
    fn drop(&mut self) {
        if let Some(c) = self.0.take() {
            c.fetch_add(1, Ordering::SeqCst);
        }
    }
}

type ReplyStream = Pin<Box<dyn Stream<Item = Result<echo::EchoReply, tonic::Status>> + Send>>;

fn identity_of<T>(req: &tonic::Request<T>) -> String {
    req.metadata().get("x-palisade-peer-identity").and_then(|v| v.to_str().ok()).unwrap_or_default().to_string()
}

#[tonic::async_trait]
impl echo::echo_server::Echo for GrpcApp {
    async fn unary(
        &self,
        req: tonic::Request<echo::EchoRequest>,
    ) -> Result<tonic::Response<echo::EchoReply>, tonic::Status> {
        let peer_identity = identity_of(&req);
        let message = req.into_inner().message;
        if message == "fail" {
            return Err(tonic::Status::invalid_argument("asked to fail"));
        }
        Ok(tonic::Response::new(echo::EchoReply { message, peer_identity }))
    }

    type ServerStreamStream = ReplyStream;
    async fn server_stream(
        &self,
        req: tonic::Request<echo::StreamRequest>,
    ) -> Result<tonic::Response<ReplyStream>, tonic::Status> {
        let peer_identity = identity_of(&req);
        let r = req.into_inner();
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let cancelled = self.cancelled.clone();
        tokio::spawn(async move {
            for i in 0..r.count {
                let reply =
                    echo::EchoReply { message: format!("{}-{i}", r.message), peer_identity: peer_identity.clone() };
                if tx.send(Ok(reply)).await.is_err() {
                    cancelled.fetch_add(1, Ordering::SeqCst);
                    return;
                }
                tokio::time::sleep(Duration::from_millis(u64::from(r.interval_ms))).await;
            }
        });
        Ok(tonic::Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))))
    }

    type BidiStream = ReplyStream;
    async fn bidi(
        &self,
        req: tonic::Request<tonic::Streaming<echo::EchoRequest>>,
    ) -> Result<tonic::Response<ReplyStream>, tonic::Status> {
        let peer_identity = identity_of(&req);
        let mut inbound = req.into_inner();
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tokio::spawn(async move {
            while let Ok(Some(m)) = inbound.message().await {
                let reply = echo::EchoReply { message: m.message.to_uppercase(), peer_identity: peer_identity.clone() };
                if tx.send(Ok(reply)).await.is_err() {
                    return;
                }
            }
        });
        Ok(tonic::Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))))
    }

    async fn slow(
        &self,
        req: tonic::Request<echo::SlowRequest>,
    ) -> Result<tonic::Response<echo::EchoReply>, tonic::Status> {
        let peer_identity = identity_of(&req);
        *self.last_grpc_timeout.lock().unwrap_or_else(|p| p.into_inner()) =
            req.metadata().get("grpc-timeout").and_then(|v| v.to_str().ok()).map(String::from);
        let mut guard = AbortGuard(Some(self.slow_aborted.clone()));
        tokio::time::sleep(Duration::from_millis(u64::from(req.into_inner().millis))).await;
        guard.0 = None;
        Ok(tonic::Response::new(echo::EchoReply { message: "slow".into(), peer_identity }))
    }
}

impl GrpcApp {
    /// Serves the gRPC app over h2c on 127.0.0.1:0.
    pub async fn start(&self) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("invariant: loopback bind");
        let addr = listener.local_addr().expect("invariant: bound");
        let svc = echo::echo_server::EchoServer::new(self.clone());
        tokio::spawn(async move {
            let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
            let _ = tonic::transport::Server::builder().add_service(svc).serve_with_incoming(incoming).await;
        });
        addr
    }
}
