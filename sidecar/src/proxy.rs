//! The data path: inbound (mTLS from peer sidecars, or plaintext in
//! PERMISSIVE mode) and outbound (plaintext from the local app) listeners,
//! protocol detection, HTTP/1.1, HTTP/2, gRPC and opaque TCP proxying.
//!
//! Between two sidecars every HTTP request travels as HTTP/2 over one pooled
//! mTLS connection per peer, whatever the app spoke; the app's own protocol
//! is carried in [`ORIG_PROTO`] and restored by the server sidecar. Opaque TCP
//! and HTTP/1.1 upgrades (WebSocket) get a dedicated mTLS connection, told
//! apart by ALPN.

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Response, StatusCode, header};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full};
use std::time::Duration;

use peer::PeerError;

pub mod access;
pub mod body;
pub use palisade_net::{detect, h1guard};
pub mod inbound;
pub mod outbound;
pub mod peer;
pub mod pool;
pub mod replay;
mod respond;
pub mod serve;
pub mod tcp;

/// Why a request could not be carried, on either side; mapped to what the
/// caller sees in one place ([`ProxyError::response`]).
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("no directory from the control plane yet")]
    NoDirectory,
    #[error("service {0} has no registered sidecar")]
    UnknownService(String),
    #[error(transparent)]
    Peer(#[from] PeerError),
    #[error("upstream: {0}")]
    Upstream(hyper::Error),
    #[error("upstream did not answer within {0:?}")]
    Timeout(Duration),
    #[error("request body exceeds {limit} bytes")]
    TooLarge { limit: u64 },
    #[error("malformed request body: {0}")]
    BadBody(hyper::Error),
    #[error("malformed request: {0}")]
    BadRequest(&'static str),
    #[error("app unreachable: {0}")]
    AppUnavailable(String),
    #[error("app failed: {0}")]
    AppFailed(String),
    #[error("app sent no response headers within {0:?}")]
    AppTimeout(Duration),
    #[error("request body refused by {}: {}", .0.policy, .0.reason())]
    InvalidBody(Box<palisade_policy::schema::Problem>),
}

impl ProxyError {
    pub fn response(&self, grpc: bool) -> Response<Body> {
        let (status, msg) = match self {
            Self::InvalidBody(p) if !grpc => {
                // RFC 9457: which field failed and why, never the input itself.
                let mut resp = Response::new(full(Bytes::from(p.to_json())));
                *resp.status_mut() = StatusCode::BAD_REQUEST;
                let h = resp.headers_mut();
                h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/problem+json"));
                h.insert("x-palisade-error", HeaderValue::from_static("1"));
                h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
                return resp;
            }
            Self::InvalidBody(_) => (StatusCode::BAD_REQUEST, "invalid request body"),
            Self::NoDirectory | Self::UnknownService(_) => {
                (StatusCode::SERVICE_UNAVAILABLE, "no endpoint for the service")
            }
            Self::Peer(PeerError::IdentityMismatch { .. }) => (StatusCode::BAD_GATEWAY, "upstream identity mismatch"),
            Self::Peer(PeerError::Connect { .. } | PeerError::Timeout { .. }) => {
                (StatusCode::SERVICE_UNAVAILABLE, "upstream unreachable")
            }
            Self::Peer(PeerError::NoCertificate) => (StatusCode::SERVICE_UNAVAILABLE, "sidecar has no identity yet"),
            Self::Peer(_) | Self::Upstream(_) => (StatusCode::BAD_GATEWAY, "upstream failed"),
            Self::Timeout(_) => (StatusCode::GATEWAY_TIMEOUT, "upstream timed out"),
            Self::TooLarge { .. } => (StatusCode::PAYLOAD_TOO_LARGE, "request body too large"),
            Self::BadBody(_) | Self::BadRequest(_) => (StatusCode::BAD_REQUEST, "malformed request"),
            Self::AppUnavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "app unavailable"),
            Self::AppFailed(_) => (StatusCode::BAD_GATEWAY, "app failed"),
            Self::AppTimeout(_) => (StatusCode::GATEWAY_TIMEOUT, "app timed out"),
        };
        error_response(grpc, status, msg)
    }
}

impl ProxyError {
    /// A short name of the failure, for the access log's `error` field.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::NoDirectory => "no_directory",
            Self::UnknownService(_) => "no_endpoint",
            Self::Peer(PeerError::IdentityMismatch { .. }) => "identity_mismatch",
            Self::Peer(PeerError::Connect { .. } | PeerError::Timeout { .. }) => "unreachable",
            Self::Peer(PeerError::NoCertificate) => "no_identity",
            Self::Peer(_) | Self::Upstream(_) => "upstream_failed",
            Self::Timeout(_) => "timeout",
            Self::TooLarge { .. } => "too_large",
            Self::BadBody(_) | Self::BadRequest(_) => "malformed",
            Self::AppUnavailable(_) => "app_unavailable",
            Self::AppFailed(_) => "app_failed",
            Self::AppTimeout(_) => "app_timeout",
            Self::InvalidBody(_) => "invalid_body",
        }
    }
}

/// What decided a request, for its span: the sidecar's own answer (it
/// carries `x-palisade-error`) by its status, else the app's (`allow`).
pub(crate) fn decision_of(status: u16, by_sidecar: bool) -> &'static str {
    if !by_sidecar {
        return "allow";
    }
    match status {
        401 => "unauthenticated",
        403 => "deny",
        429 => "rate_limited",
        400 | 405 | 413 | 414 | 415 | 431 => "invalid",
        503 => "unavailable",
        _ => "error",
    }
}

/// Span attributes of a response: the decision, and the gRPC status when
/// the response head carries one.
pub(crate) fn response_attributes<B>(resp: &Response<B>, decision: &'static str) -> Vec<opentelemetry::KeyValue> {
    let mut out = vec![opentelemetry::KeyValue::new("palisade.decision", decision)];
    if let Some(code) = resp.headers().get("grpc-status").and_then(|v| v.to_str().ok()?.parse::<i64>().ok()) {
        out.push(opentelemetry::KeyValue::new("rpc.grpc.status_code", code));
    }
    out
}

/// The body type of every request and response the proxy builds or forwards.
pub type Body = UnsyncBoxBody<Bytes, hyper::Error>;

/// The verified SPIFFE ID of the caller, set by the server sidecar for the app.
/// Any copy arriving from outside is removed first, so it cannot be spoofed.
pub const PEER_IDENTITY: HeaderName = HeaderName::from_static("x-palisade-peer-identity");

/// The verified request principal (`<iss>/<sub>` of a JWT, or an API key's
/// principal) the app receives; removed from every incoming request first.
pub const REQUEST_PRINCIPAL: HeaderName = HeaderName::from_static("x-palisade-request-principal");
/// The app's HTTP version, carried between sidecars (absent: HTTP/2).
pub const ORIG_PROTO: HeaderName = HeaderName::from_static("x-palisade-orig-proto");
/// ALPN between sidecars: multiplexed HTTP.
pub const ALPN_H2: &[u8] = b"h2";
/// ALPN between sidecars: one HTTP/1.1 exchange that upgrades (WebSocket...).
pub const ALPN_HTTP1: &[u8] = b"http/1.1";
/// What a connection that did not start as HTTP/1.1 or HTTP/2 is answered
/// before it is closed (the reason is in the audit log, not here).
pub const BAD_REQUEST_CLOSE: &[u8] =
    b"HTTP/1.1 400 Bad Request\r\ncontent-type: text/plain\r\ncontent-length: 17\r\nconnection: close\r\n\r\nmalformed request";
/// ALPN between sidecars: opaque TCP.
pub const ALPN_TCP: &[u8] = b"palisade.dev/tcp";

pub use crate::metrics::Direction;

/// An empty or small fixed body.
pub fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into()).map_err(|never| match never {}).boxed_unsync()
}

/// Whether a request is gRPC (answers then carry `grpc-status`).
pub fn is_grpc(headers: &HeaderMap) -> bool {
    headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).is_some_and(|ct| ct.starts_with("application/grpc"))
}

/// A refusal or failure answered by the sidecar itself: a short body for the
/// caller (the log carries the reason). For gRPC, HTTP 200 with `grpc-status`.
pub fn error_response(grpc: bool, status: StatusCode, message: &'static str) -> Response<Body> {
    let mut resp = Response::new(full(if grpc { Bytes::new() } else { Bytes::from(format!("{message}\n")) }));
    if !grpc {
        *resp.status_mut() = status;
    }
    let h = resp.headers_mut();
    if grpc {
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
        h.insert("grpc-status", HeaderValue::from_static(grpc_code(status)));
        h.insert("grpc-message", HeaderValue::from_static(message));
    } else {
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    }
    h.insert("x-palisade-error", HeaderValue::from_static("1"));
    // An answer about this request (refused, failed, not ready): never cached.
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

/// gRPC status codes for the HTTP statuses the proxy produces (gRPC's HTTP mapping).
fn grpc_code(status: StatusCode) -> &'static str {
    match status.as_u16() {
        400 | 413 | 414 | 431 => "13", // INTERNAL: the request could not be carried
        401 => "16",                   // UNAUTHENTICATED
        405 => "12",                   // UNIMPLEMENTED
        415 => "3",                    // INVALID_ARGUMENT
        403 => "7",                    // PERMISSION_DENIED
        429 => "8",                    // RESOURCE_EXHAUSTED
        504 => "4",                    // DEADLINE_EXCEEDED
        _ => "14",                     // UNAVAILABLE: 502, 503
    }
}

/// Removes connection-specific (hop-by-hop) headers, which must not cross a
/// proxy (RFC 9110 §7.6.1) and are illegal in HTTP/2.
fn is_hop_by_hop(n: &HeaderName) -> bool {
    *n == header::CONNECTION
        || *n == header::TRANSFER_ENCODING
        || *n == header::UPGRADE
        || *n == header::PROXY_AUTHENTICATE
        || *n == header::PROXY_AUTHORIZATION
        || *n == header::TE
        || n.as_str() == "keep-alive"
        || n.as_str() == "proxy-connection"
}

pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Most messages carry none: one pass over the names (standard ones
    // compare as enums) instead of a hashed removal per hop-by-hop name.
    if !headers.keys().any(is_hop_by_hop) {
        return;
    }
    // Headers named in Connection are hop-by-hop too.
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for n in named {
        headers.remove(n);
    }
    for n in [
        header::CONNECTION,
        HeaderName::from_static("keep-alive"),
        HeaderName::from_static("proxy-connection"),
        header::TRANSFER_ENCODING,
        header::UPGRADE,
        header::PROXY_AUTHENTICATE,
        header::PROXY_AUTHORIZATION,
    ] {
        headers.remove(n);
    }
    // TE may only carry "trailers" (gRPC relies on it).
    if let Some(te) = headers.get(header::TE)
        && !te.to_str().is_ok_and(|v| v.trim().eq_ignore_ascii_case("trailers"))
    {
        headers.remove(header::TE);
    }
}

/// The destination a connection had before an iptables REDIRECT (IPv4 or IPv6).
pub fn original_dst(tcp: &tokio::net::TcpStream) -> Option<std::net::SocketAddr> {
    let sock = socket2::SockRef::from(tcp);
    let addr = match tcp.local_addr().ok()? {
        std::net::SocketAddr::V4(_) => sock.original_dst_v4().ok()?,
        std::net::SocketAddr::V6(_) => sock.original_dst_v6().ok()?,
    };
    addr.as_socket()
}

/// Whether an HTTP/1.1 request asks to switch protocols (WebSocket, ...).
pub fn is_upgrade<B>(req: &http::Request<B>) -> bool {
    req.headers().contains_key(header::UPGRADE)
        && req
            .headers()
            .get_all(header::CONNECTION)
            .iter()
            .any(|v| v.to_str().is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case("upgrade"))))
}

/// An upgrade request that was not switched: the connection closes after
/// the answer. The framing guard stopped following the byte stream at the
/// upgrade request, so nothing after it may be read as another request.
pub fn no_upgrade<B>(resp: &mut Response<B>) {
    resp.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
}

/// A request's headers as the policy engine reads them: in place, no copy.
pub(crate) struct RequestHeaders<'a>(pub(crate) &'a http::HeaderMap);

impl palisade_policy::Headers for RequestHeaders<'_> {
    fn first(&self, name: &str) -> Option<&str> {
        self.0.get(name).and_then(|v| v.to_str().ok())
    }
    fn any(&self, name: &str, pred: &mut dyn FnMut(&str) -> bool) -> bool {
        self.0.get_all(name).iter().filter_map(|v| v.to_str().ok()).any(pred)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strips_hop_by_hop_headers() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("keep-alive, x-secret"));
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(header::TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        h.insert("x-keep", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h);
        let mut names: Vec<_> = h.keys().map(|k| k.as_str()).collect();
        names.sort();
        assert_eq!(names, vec!["te", "x-keep"]);
        h.insert(header::TE, HeaderValue::from_static("gzip"));
        strip_hop_by_hop(&mut h);
        assert!(!h.contains_key(header::TE));
    }

    #[test]
    fn grpc_errors_are_http_200_with_grpc_status() {
        let r = error_response(true, StatusCode::FORBIDDEN, "denied");
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(r.headers()["grpc-status"], "7");
        let r = error_response(false, StatusCode::BAD_GATEWAY, "bad gateway");
        assert_eq!(r.status(), StatusCode::BAD_GATEWAY);
    }
}
