//! `palisadectl dashboard`: the mesh in a browser. A small HTTP server on
//! loopback serves a page built into this binary and JSON read from the
//! control plane's Admin API with the operator's credential; it changes
//! nothing in the mesh (the policy preview only evaluates). The page
//! (docs/dashboard.md) updates itself from server-sent events.

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde_json::{Value, json};
use tokio::sync::mpsc;

use crate::Online;

mod api;
mod guard;
mod live;

use guard::{Guard, Verdict};
use live::Live;

type Body = BoxBody<Bytes, Infallible>;

/// Connections served at once, at most (a page holds two or three).
const MAX_CONNECTIONS: usize = 64;
/// A request's head must arrive within this.
const HEAD_TIMEOUT: Duration = Duration::from_secs(10);
/// A preview's policy text, at most.
const MAX_BODY: usize = 256 * 1024;
/// How often the pages' event streams carry the mesh and the certificates.
const PUSH_EVERY: Duration = Duration::from_secs(5);

/// Flags of `palisadectl dashboard`.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct DashboardArgs {
    /// IP:PORT to serve on. Loopback by default (a free port); any other
    /// address needs --tls-cert and --tls-key.
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// Certificate chain (PEM) to serve HTTPS with.
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// Its private key (PEM).
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
}

struct Server {
    live: Arc<Live>,
    guard: Guard,
    conns: Conns,
    log_budget: LogBudget,
}

/// One open connection: whether a request on it has shown the token, and
/// how to close it to make room.
#[derive(Debug, Default)]
struct Conn {
    id: u64,
    authed: AtomicBool,
    evict: tokio::sync::Notify,
}

/// The open connections, oldest first. When all [`MAX_CONNECTIONS`] are
/// taken, a newcomer closes the oldest that has not shown the token yet
/// (holding connections without it locks no one out); when every one has,
/// the newcomer is refused.
#[derive(Debug, Default)]
struct Conns {
    next: AtomicU64,
    open: Mutex<VecDeque<Arc<Conn>>>,
}

impl Conns {
    fn admit(&self) -> Option<Arc<Conn>> {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        if open.len() >= MAX_CONNECTIONS {
            let i = open.iter().position(|c| !c.authed.load(Ordering::Relaxed))?;
            if let Some(old) = open.remove(i) {
                old.evict.notify_one();
            }
        }
        let c = Arc::new(Conn { id: self.next.fetch_add(1, Ordering::Relaxed), ..Default::default() });
        open.push_back(c.clone());
        Some(c)
    }

    fn close(&self, id: u64) {
        self.open.lock().unwrap_or_else(|p| p.into_inner()).retain(|c| c.id != id);
    }
}

/// At most 10 refusal lines a second in the log.
#[derive(Debug, Default)]
struct LogBudget {
    second: AtomicU64,
    lines: AtomicU64,
}

impl LogBudget {
    fn admit(&self) -> bool {
        let now = palisade_cmd::unix_now();
        if self.second.swap(now, Ordering::Relaxed) != now {
            self.lines.store(0, Ordering::Relaxed);
        }
        self.lines.fetch_add(1, Ordering::Relaxed) < 10
    }
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server").field("guard", &self.guard).finish_non_exhaustive()
    }
}

pub(crate) async fn run(online: &Online, args: &DashboardArgs) -> Result<()> {
    let acceptor = match (&args.tls_cert, &args.tls_key) {
        (Some(c), Some(k)) => Some(tls_acceptor(c, k)?),
        _ if !args.listen.ip().is_loopback() => {
            return Err(crate::usage(format!(
                "--listen {}: not a loopback address; serving the mesh's picture beyond this machine needs --tls-cert and --tls-key",
                args.listen
            )));
        }
        _ => None,
    };
    let admin = crate::client::admin(online).await?;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("--listen {}: cannot listen there", args.listen))?;
    let addr = listener.local_addr()?;
    let tls = acceptor.is_some();
    let live = Live::new(admin);
    live.start();
    let guard = Guard::new(guard::new_token()?, addr, tls);
    let server = Arc::new(Server { live, guard, conns: Conns::default(), log_budget: LogBudget::default() });
    palisade_cmd::outln!("Palisade dashboard: {}", server.guard.url(tls));
    eprintln!("(read-only; the token in this URL is the key to it: share it with no one. Ctrl-C to stop)");
    loop {
        let (tcp, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    // Out of file descriptors, say: wait instead of spinning.
                    if server.log_budget.admit() {
                        eprintln!("dashboard: cannot accept a connection: {e}");
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = tokio::signal::ctrl_c() => return Ok(()),
        };
        let Some(conn) = server.conns.admit() else {
            if server.log_budget.admit() {
                eprintln!("dashboard: {peer}: connection refused, {MAX_CONNECTIONS} open and each showed the token");
            }
            // Said, not only closed (over plaintext; a TLS client sees the close).
            if acceptor.is_none() {
                tokio::spawn(async move {
                    use tokio::io::AsyncWriteExt;
                    let mut tcp = tcp;
                    let busy = b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain\r\ncontent-length: 65\r\nconnection: close\r\n\r\ntoo many connections to the dashboard: close a tab and try again\n";
                    let _ = tokio::time::timeout(Duration::from_secs(1), tcp.write_all(busy)).await;
                });
            }
            continue;
        };
        let (server, acceptor) = (server.clone(), acceptor.clone());
        tokio::spawn(async move {
            let _ = tcp.set_nodelay(true);
            let serving = async {
                match acceptor {
                    None => serve(server.clone(), conn.clone(), tcp).await,
                    Some(a) => {
                        if let Ok(Ok(s)) = tokio::time::timeout(HEAD_TIMEOUT, a.accept(tcp)).await {
                            serve(server.clone(), conn.clone(), s).await;
                        }
                    }
                }
            };
            tokio::select! {
                () = serving => {}
                () = conn.evict.notified() => {}
            }
            server.conns.close(conn.id);
        });
    }
}

fn tls_acceptor(cert: &std::path::Path, key: &std::path::Path) -> Result<tokio_rustls::TlsAcceptor> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let certs = CertificateDer::pem_file_iter(cert)
        .and_then(Iterator::collect::<Result<Vec<_>, _>>)
        .map_err(|e| crate::usage(format!("--tls-cert {}: {e}", cert.display())))?;
    let key = PrivateKeyDer::from_pem_file(key)
        .map_err(|_| crate::usage(format!("--tls-key {}: not a PEM private key", key.display())))?;
    let config = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .context("--tls-cert and --tls-key do not make a certificate and its key")?;
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

async fn serve<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static>(
    server: Arc<Server>,
    conn: Arc<Conn>,
    io: S,
) {
    let svc = hyper::service::service_fn(move |req| {
        let (server, conn) = (server.clone(), conn.clone());
        async move { Ok::<_, Infallible>(server.handle(req, &conn).await) }
    });
    let _ = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEAD_TIMEOUT)
        .max_buf_size(64 * 1024)
        .serve_connection(TokioIo::new(io), svc)
        .await;
}

fn full(status: StatusCode, content_type: &'static str, body: impl Into<Bytes>) -> Response<Body> {
    let mut r = Response::new(Full::new(body.into()).boxed());
    *r.status_mut() = status;
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

fn json_response(status: StatusCode, v: &Value) -> Response<Body> {
    full(status, "application/json", serde_json::to_vec(v).unwrap_or_default())
}

fn text(status: StatusCode, msg: &str) -> Response<Body> {
    full(status, "text/plain; charset=utf-8", format!("{msg}\n"))
}

/// The page's files, built into the binary.
fn asset(path: &str) -> Option<(&'static str, &'static str)> {
    Some(match path {
        "/" | "/index.html" => ("text/html; charset=utf-8", include_str!("assets/index.html")),
        "/js/core.js" => ("text/javascript; charset=utf-8", include_str!("assets/js/core.js")),
        "/js/graph.js" => ("text/javascript; charset=utf-8", include_str!("assets/js/graph.js")),
        "/js/workload.js" => ("text/javascript; charset=utf-8", include_str!("assets/js/workload.js")),
        "/js/decisions.js" => ("text/javascript; charset=utf-8", include_str!("assets/js/decisions.js")),
        "/js/policies.js" => ("text/javascript; charset=utf-8", include_str!("assets/js/policies.js")),
        "/js/certs.js" => ("text/javascript; charset=utf-8", include_str!("assets/js/certs.js")),
        "/js/main.js" => ("text/javascript; charset=utf-8", include_str!("assets/js/main.js")),
        "/app.css" => ("text/css; charset=utf-8", include_str!("assets/app.css")),
        "/favicon.svg" => ("image/svg+xml", include_str!("assets/favicon.svg")),
        _ => return None,
    })
}

/// A query string's parameters, percent-decoded.
fn query(q: Option<&str>) -> HashMap<String, String> {
    let decode = |s: &str| percent_encoding::percent_decode_str(&s.replace('+', " ")).decode_utf8_lossy().into_owned();
    q.unwrap_or_default()
        .split('&')
        .filter(|kv| !kv.is_empty())
        .map(|kv| kv.split_once('=').unwrap_or((kv, "")))
        .map(|(k, v)| (decode(k), decode(v)))
        .collect()
}

impl Server {
    async fn handle(&self, req: Request<Incoming>, conn: &Conn) -> Response<Body> {
        let mut resp = match self.guard.check(&req) {
            Verdict::Refuse(status, msg, why) => {
                // Never the path: it may hold the token (with a foreign Host, say).
                if self.log_budget.admit() {
                    let method: String = req.method().as_str().chars().take(16).collect();
                    eprintln!("dashboard: refused a {method} request: {why}");
                }
                text(status, msg)
            }
            Verdict::Slash => {
                let mut r = text(StatusCode::PERMANENT_REDIRECT, "moved");
                r.headers_mut().insert(header::LOCATION, self.guard.slash());
                r
            }
            Verdict::Pass(path) => {
                let path = path.to_string();
                conn.authed.store(true, Ordering::Relaxed);
                let gzip = accepts_gzip(&req);
                let resp = self.route(req, &path, gzip).await;
                if gzip { compress(resp).await } else { resp }
            }
        };
        guard::secure(resp.headers_mut());
        resp
    }

    async fn route(&self, req: Request<Incoming>, path: &str, gzip: bool) -> Response<Body> {
        if let Some((ct, body)) = asset(path) {
            return full(StatusCode::OK, ct, body);
        }
        let q = query(req.uri().query());
        let mut c = self.live.admin.clone();
        let r: Result<Value> = match path {
            "/api/overview" => api::overview(&mut c).await,
            "/api/workload" => match api::workload(&mut c, q.get("id").map_or("", String::as_str)).await {
                Ok(None) => {
                    return json_response(StatusCode::NOT_FOUND, &json!({"error": "no such workload in the mesh"}));
                }
                r => r.map(|v| v.unwrap_or_default()),
            },
            "/api/decisions" => Ok(self.live.decisions.lock().unwrap_or_else(|p| p.into_inner()).json()),
            "/api/explain" => api::explain(&mut c, &q).await,
            "/api/policies" => api::policies(&mut c).await,
            "/api/certs" => api::certs(&mut c).await,
            "/api/preview" => return self.preview(req).await,
            "/api/events" => return self.events(gzip),
            "/api/tap" => return self.tap(&q, gzip),
            _ => return text(StatusCode::NOT_FOUND, "not found"),
        };
        self.live.note(&r);
        match r {
            Ok(v) => json_response(StatusCode::OK, &v),
            Err(e) if e.downcast_ref::<tonic::Status>().is_some_and(|s| s.code() == tonic::Code::InvalidArgument) => {
                let msg = e.downcast_ref::<tonic::Status>().map(|s| s.message().to_string()).unwrap_or_default();
                json_response(StatusCode::BAD_REQUEST, &json!({"error": msg}))
            }
            Err(e) => {
                eprintln!("dashboard: {path}: {e:#}");
                json_response(
                    StatusCode::BAD_GATEWAY,
                    &json!({"error": "the control plane did not answer; see the dashboard's log"}),
                )
            }
        }
    }

    async fn preview(&self, req: Request<Incoming>) -> Response<Body> {
        let body = tokio::time::timeout(HEAD_TIMEOUT, Limited::new(req.into_body(), MAX_BODY).collect()).await;
        let body = match body {
            Ok(Ok(b)) => b.to_bytes(),
            Ok(Err(_)) => {
                return json_response(StatusCode::PAYLOAD_TOO_LARGE, &json!({"error": "at most 256 KiB of policy"}));
            }
            Err(_) => {
                return json_response(
                    StatusCode::REQUEST_TIMEOUT,
                    &json!({"error": "the policy did not arrive within 10 s"}),
                );
            }
        };
        let Some(yaml) =
            serde_json::from_slice::<Value>(&body).ok().and_then(|v| v["yaml"].as_str().map(str::to_string))
        else {
            return json_response(StatusCode::BAD_REQUEST, &json!({"error": "send {\"yaml\": \"<policy>\"}"}));
        };
        let r = api::preview(&mut self.live.admin.clone(), &yaml).await;
        self.live.note(&r);
        match r {
            Ok(Ok(v)) => json_response(StatusCode::OK, &v),
            Ok(Err(msg)) => json_response(StatusCode::BAD_REQUEST, &json!({"error": msg})),
            Err(e) => {
                eprintln!("dashboard: preview: {e:#}");
                json_response(StatusCode::BAD_GATEWAY, &json!({"error": "the control plane did not answer"}))
            }
        }
    }

    /// The page's event stream: the connection's state as it changes, each
    /// refused request, and the mesh and its certificates every 5 s.
    fn events(&self, gzip: bool) -> Response<Body> {
        let (mut tx, resp) = sse(gzip);
        let live = self.live.clone();
        tokio::spawn(async move {
            let mut conn = live.conn.subscribe();
            let mut decided = live.decided.subscribe();
            // The page reads the mesh itself as it opens: the first push is one period later.
            let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + PUSH_EVERY, PUSH_EVERY);
            let status = conn.borrow_and_update().json();
            if !tx.send("status", &status).await {
                return;
            }
            loop {
                let ok = tokio::select! {
                    _ = tx.closed() => return,
                    r = conn.changed() => match r {
                        Ok(()) => { let s = conn.borrow_and_update().json(); tx.send("status", &s).await }
                        Err(_) => return,
                    },
                    r = decided.recv() => match r {
                        Ok(ev) => tx.send_raw("decision", &ev).await,
                        Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => true,
                        Err(_) => return,
                    },
                    _ = tick.tick() => {
                        let mut c = live.admin.clone();
                        let o = api::overview(&mut c).await;
                        live.note(&o);
                        let cs = api::certs(&mut c).await;
                        match (o, cs) {
                            (Ok(o), Ok(cs)) => tx.send("overview", &o).await && tx.send("certs", &cs).await,
                            _ => true,
                        }
                    }
                };
                if !ok {
                    return;
                }
            }
        });
        resp
    }

    /// A live tap of the requests a page selects.
    fn tap(&self, q: &HashMap<String, String>, gzip: bool) -> Response<Body> {
        let Ok(slot) = self.live.taps.clone().try_acquire_owned() else {
            return json_response(
                StatusCode::SERVICE_UNAVAILABLE,
                &json!({"error": format!("{} live taps already open: close one", live::MAX_PAGE_TAPS)}),
            );
        };
        let get = |k: &str| q.get(k).cloned().unwrap_or_default();
        let req = palisade_proto::v1::TapRequest {
            to: get("to"),
            from: get("from"),
            path: get("path"),
            decision: get("decision"),
            max: 0,
        };
        let (mut tx, resp) = sse(gzip);
        let live = self.live.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let r = live.admin.clone().tap(req).await;
            live.note(&r);
            let Ok(stream) = r else {
                let _ = tx.send("error", &json!({"error": "the control plane refused the tap"})).await;
                return;
            };
            let mut stream = stream.into_inner();
            let mut dropped = 0;
            loop {
                let ev = tokio::select! {
                    _ = tx.closed() => return,
                    ev = stream.message() => ev,
                };
                match ev {
                    Ok(Some(ev)) => {
                        let mut ok = true;
                        if ev.dropped > dropped {
                            dropped = ev.dropped;
                            ok = tx.send("dropped", &json!({"dropped": dropped})).await;
                        }
                        if !ev.json.is_empty() {
                            ok = ok && tx.send_raw("tap", &ev.json).await;
                        }
                        if !ok {
                            return;
                        }
                    }
                    _ => {
                        let _ = tx.send("error", &json!({"error": "the tap ended"})).await;
                        return;
                    }
                }
            }
        });
        resp
    }
}

/// The sending end of an event stream, gzip-compressed when the page
/// accepts it (each event flushed whole).
struct Events {
    tx: mpsc::Sender<Result<Frame<Bytes>, Infallible>>,
    gzip: Option<flate2::write::GzEncoder<Vec<u8>>>,
}

impl Events {
    async fn closed(&self) {
        self.tx.closed().await;
    }

    async fn send(&mut self, event: &str, v: &Value) -> bool {
        self.send_raw(event, &v.to_string()).await
    }

    /// One event; `data` is one line of JSON (serde_json writes no newline).
    async fn send_raw(&mut self, event: &str, data: &str) -> bool {
        use std::io::Write;
        let data = data.replace(['\n', '\r'], " ");
        let text = format!("event: {event}\ndata: {data}\n\n");
        let bytes = match &mut self.gzip {
            None => Bytes::from(text),
            Some(z) => {
                if z.write_all(text.as_bytes()).and_then(|()| z.flush()).is_err() {
                    return false;
                }
                Bytes::from(std::mem::take(z.get_mut()))
            }
        };
        self.tx.send(Ok(Frame::data(bytes))).await.is_ok()
    }
}

/// A `text/event-stream` answer and the sender of its events.
fn sse(gzip: bool) -> (Events, Response<Body>) {
    let (tx, rx) = mpsc::channel(64);
    let body = StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(rx)).boxed();
    let mut r = Response::new(body);
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    if gzip {
        r.headers_mut().insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
    }
    let gzip = gzip.then(|| flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast()));
    (Events { tx, gzip }, r)
}

fn accepts_gzip<B>(req: &Request<B>) -> bool {
    req.headers()
        .get_all(header::ACCEPT_ENCODING)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|e| e.split(';').next().is_some_and(|e| e.trim().eq_ignore_ascii_case("gzip")))
}

/// A whole answer gzip-compressed (event streams compress themselves).
/// Nothing the dashboard answers holds a secret, so compression tells an
/// attacker who sees sizes nothing (BREACH needs a secret in the body).
async fn compress(resp: Response<Body>) -> Response<Body> {
    use std::io::Write;
    if resp.headers().contains_key(header::CONTENT_ENCODING) {
        return resp;
    }
    let (mut parts, body) = resp.into_parts();
    let Ok(bytes) = body.collect().await.map(|b| b.to_bytes());
    if bytes.len() < 1024 {
        return Response::from_parts(parts, Full::new(bytes).boxed());
    }
    let mut z = flate2::write::GzEncoder::new(Vec::with_capacity(bytes.len() / 4), flate2::Compression::fast());
    let Ok(out) = z.write_all(&bytes).and_then(|()| z.finish()) else {
        return Response::from_parts(parts, Full::new(bytes).boxed());
    };
    parts.headers.insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
    parts.headers.insert(header::VARY, HeaderValue::from_static("accept-encoding"));
    parts.headers.remove(header::CONTENT_LENGTH);
    Response::from_parts(parts, Full::new(Bytes::from(out)).boxed())
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

    #[test]
    fn a_newcomer_closes_the_oldest_connection_without_the_token_or_is_refused() {
        let conns = super::Conns::default();
        let all: Vec<_> = (0..super::MAX_CONNECTIONS).map(|_| conns.admit().unwrap()).collect();
        for c in &all[..super::MAX_CONNECTIONS - 2] {
            c.authed.store(true, Ordering::Relaxed);
        }
        let (a, b) = (&all[super::MAX_CONNECTIONS - 2], &all[super::MAX_CONNECTIONS - 1]);
        let c = conns.admit().expect("room made");
        let open = |id: u64| conns.open.lock().unwrap().iter().any(|x| x.id == id);
        assert!(!open(a.id) && open(b.id) && open(c.id), "the oldest without the token went");
        b.authed.store(true, Ordering::Relaxed);
        c.authed.store(true, Ordering::Relaxed);
        assert!(conns.admit().is_none(), "every connection showed the token: the newcomer is refused");
        conns.close(c.id);
        assert!(conns.admit().is_some(), "a closed one makes room");
    }

    #[test]
    fn queries_are_decoded() {
        let q = super::query(Some("id=spiffe%3A%2F%2Ftd%2Fns%2Fa%2Fsa%2Fb&path=%2Fa+b&x"));
        assert_eq!(q["id"], "spiffe://td/ns/a/sa/b");
        assert_eq!(q["path"], "/a b");
        assert_eq!(q["x"], "");
    }
}
