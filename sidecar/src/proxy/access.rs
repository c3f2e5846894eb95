//! Access logs (`--access-log`): one JSON line per request, and per opaque
//! TCP connection, on stderr (the `access` target), written when the
//! response body (or the connection) ends (the same line goes to the taps
//! that want it), so it holds the bytes both ways
//! and the whole duration. Fields are documented in docs/observability.md ("Access
//! logs"); no header value is ever logged, so no credential can be.

use std::io::Write as _;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Instant, SystemTime};

use bytes::Bytes;
use http_body::{Frame, SizeHint};
use serde::Serialize;

use super::Body;

/// The policy (and rule) that decided a request, as the request goes: the
/// last to set it is the one that refused it (validation, authorization,
/// rate limit) or, for a request that went through, the ALLOW rule or route.
/// Also who the request's verified credential says the client is.
#[derive(Debug, Default)]
pub struct Decided(Mutex<DecidedBy>);

#[derive(Debug, Default, Clone)]
struct DecidedBy {
    rule: Option<(Arc<str>, Option<usize>)>,
    /// The request principal (`<iss>/<sub>`, or an API key's principal).
    principal: Option<String>,
    /// The name of the API key the request was made with (never the key).
    api_key: Option<Arc<str>>,
}

impl Decided {
    pub fn set(&self, policy: Arc<str>, rule: Option<usize>) {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).rule = Some((policy, rule));
    }

    /// Who the verified credential names.
    pub fn set_client(&self, principal: Option<String>, api_key: Option<Arc<str>>) {
        let mut d = self.0.lock().unwrap_or_else(|p| p.into_inner());
        d.principal = principal;
        d.api_key = api_key;
    }
}

/// One request's line, filled in as it goes.
#[derive(Debug)]
pub struct Entry {
    start: Instant,
    time: SystemTime,
    pub direction: &'static str,
    pub src: SocketAddr,
    pub caller: Option<String>,
    pub callee: Option<String>,
    pub method: String,
    pub authority: Option<String>,
    pub path: String,
    pub trace_id: Option<String>,
    pub decided: Arc<Decided>,
    pub bytes_in: Arc<AtomicU64>,
    /// Written to stderr (`--access-log`, sampled).
    pub log: bool,
    /// Offered to the taps running.
    pub tap: Option<Arc<crate::observe::Observe>>,
    /// Inbound: which try of its call this request is, as the peer sidecar
    /// said (over mTLS only; `None` for the first).
    pub attempt: Option<u32>,
    /// Outbound: the tries the call took (`None` for one).
    pub attempts: Option<u32>,
    /// Outbound: why the sidecar answered the app itself (e.g. `timeout`).
    pub error: Option<&'static str>,
}

/// What the outbound side attaches to the response it gives the app, for
/// the log line: the tries the call took, and why the sidecar answered
/// itself, if it did ([`crate::proxy::ProxyError::reason`]).
#[derive(Debug, Clone, Copy)]
pub struct CallNote {
    pub attempts: u32,
    pub error: Option<&'static str>,
}

#[derive(Serialize)]
struct Line<'a> {
    time: String,
    direction: &'a str,
    src: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    caller: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    callee: Option<&'a str>,
    #[serde(skip_serializing_if = "str::is_empty")]
    method: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    authority: Option<&'a str>,
    #[serde(skip_serializing_if = "str::is_empty")]
    path: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    status: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    grpc_status: Option<&'a str>,
    decision: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    policy: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    rule: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    principal: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    api_key: Option<&'a str>,
    duration_ms: f64,
    bytes_in: u64,
    bytes_out: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    trace_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    attempt: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    attempts: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<&'a str>,
}

impl Entry {
    pub fn new(direction: &'static str, src: SocketAddr) -> Self {
        Self::started(direction, src, Instant::now(), SystemTime::now())
    }

    /// A line for a request that arrived at `start` (`time` on the wall clock).
    pub fn started(direction: &'static str, src: SocketAddr, start: Instant, time: SystemTime) -> Self {
        Self {
            start,
            time,
            direction,
            src,
            caller: None,
            callee: None,
            method: String::new(),
            authority: None,
            path: String::new(),
            trace_id: None,
            decided: Arc::default(),
            bytes_in: Arc::default(),
            log: true,
            tap: None,
            attempt: None,
            attempts: None,
            error: None,
        }
    }

    /// Writes the line.
    pub fn write(&self, status: Option<u16>, grpc_status: Option<&str>, decision: &str, bytes_out: u64) {
        let by = self.decided.0.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let decided = by.rule.as_ref();
        let time = time::OffsetDateTime::from(self.time)
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default();
        let line = Line {
            time,
            direction: self.direction,
            src: self.src.to_string(),
            caller: self.caller.as_deref(),
            callee: self.callee.as_deref(),
            method: &self.method,
            authority: self.authority.as_deref(),
            path: &self.path,
            status,
            grpc_status,
            decision,
            policy: decided.map(|d| &*d.0),
            rule: decided.and_then(|d| d.1),
            principal: by.principal.as_deref(),
            api_key: by.api_key.as_deref(),
            duration_ms: (self.start.elapsed().as_secs_f64() * 1e3 * 1e3).round() / 1e3,
            bytes_in: self.bytes_in.load(Ordering::Relaxed),
            bytes_out,
            trace_id: self.trace_id.as_deref(),
            attempt: self.attempt.filter(|n| *n > 1),
            attempts: self.attempts.filter(|n| *n > 1),
            error: self.error,
        };
        if self.log
            && let Ok(mut text) = serde_json::to_vec(&line)
        {
            text.push(b'\n');
            // One write per line: lines from concurrent requests never interleave.
            let _ = std::io::stderr().lock().write_all(&text);
        }
        if let Some(o) = &self.tap {
            let path = (!line.path.is_empty()).then_some(line.path);
            let filter = crate::observe::Line { caller: line.caller, path, decision };
            o.offer(filter, || serde_json::to_string(&line).unwrap_or_default());
        }
    }
}

/// The request's byte counter, carried in its extensions to where its body is forwarded.
#[derive(Debug, Clone)]
pub struct BytesIn(pub Arc<AtomicU64>);

/// A body that counts its bytes into a shared counter (the request's).
pub struct CountIn {
    inner: Body,
    count: Arc<AtomicU64>,
}

impl std::fmt::Debug for CountIn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CountIn").field("count", &self.count).finish_non_exhaustive()
    }
}

impl CountIn {
    pub fn wrap(inner: Body, count: Arc<AtomicU64>) -> Body {
        http_body_util::BodyExt::boxed_unsync(Self { inner, count })
    }
}

impl hyper::body::Body for CountIn {
    type Data = Bytes;
    type Error = hyper::Error;
    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let poll = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(f))) = &poll
            && let Some(d) = f.data_ref()
        {
            self.count.fetch_add(d.len() as u64, Ordering::Relaxed);
        }
        poll
    }
    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }
    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A response body that writes the access line when it ends (or is dropped:
/// a client that went away still gets its line).
pub struct Logged {
    inner: Body,
    entry: Entry,
    status: u16,
    grpc_status: Option<String>,
    decision: &'static str,
    bytes: u64,
}

impl std::fmt::Debug for Logged {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Logged").field("entry", &self.entry).field("bytes", &self.bytes).finish_non_exhaustive()
    }
}

impl Logged {
    pub fn wrap(inner: Body, entry: Entry, status: u16, grpc_status: Option<String>, decision: &'static str) -> Body {
        http_body_util::BodyExt::boxed_unsync(Self { inner, entry, status, grpc_status, decision, bytes: 0 })
    }
}

impl hyper::body::Body for Logged {
    type Data = Bytes;
    type Error = hyper::Error;
    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let poll = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(f))) = &poll {
            if let Some(d) = f.data_ref() {
                self.bytes += d.len() as u64;
            } else if let Some(t) = f.trailers_ref()
                && let Some(s) = t.get("grpc-status").and_then(|v| v.to_str().ok())
            {
                self.grpc_status = Some(s.to_string());
            }
        }
        poll
    }
    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }
    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Logged {
    fn drop(&mut self) {
        self.entry.write(Some(self.status), self.grpc_status.as_deref(), self.decision, self.bytes);
    }
}

/// Whether this request is logged (`--access-log-sampling`).
pub fn sampled(ratio: f64) -> bool {
    if ratio >= 1.0 {
        return true;
    }
    let mut b = [0u8; 4];
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b);
    f64::from(u32::from_le_bytes(b)) / f64::from(u32::MAX) < ratio
}

/// The end of a request in either direction, in one place: the decision
/// its answer shows, the span's last attributes and end, and the access-log
/// entry written once the body has been sent.
pub(crate) fn finish(
    resp: http::Response<Body>,
    span: palisade_telemetry::ReqSpan,
    entry: Option<Entry>,
    client: bool,
) -> http::Response<Body> {
    let status = resp.status().as_u16();
    let decision = super::decision_of(status, resp.headers().contains_key("x-palisade-error"));
    if span.recording() {
        span.set(super::response_attributes(&resp, decision));
    }
    span.end(status, client);
    match entry {
        Some(mut e) => {
            if let Some(note) = resp.extensions().get::<CallNote>() {
                e.attempts = Some(note.attempts);
                e.error = note.error;
            }
            let grpc = resp.headers().get("grpc-status").and_then(|v| v.to_str().ok()).map(str::to_string);
            resp.map(|b| Logged::wrap(b, e, status, grpc, decision))
        }
        None => resp,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The line a tap receives for `entry` (the same as the log's).
    fn tapped(mut e: Entry, status: u16, decision: &str) -> serde_json::Value {
        let o = Arc::new(crate::observe::Observe::new(0));
        let spec = palisade_proto::v1::TapSpec { id: 1, ..Default::default() };
        o.set_taps(&[spec]);
        e.log = false;
        e.tap = Some(o.clone());
        e.write(Some(status), None, decision, 0);
        let events = o.take_events();
        assert_eq!(events.len(), 1);
        serde_json::from_str(&events[0].json).expect("a JSON line")
    }

    #[test]
    fn the_line_names_the_client_its_credential_verified_and_the_deciding_rule() {
        let src: SocketAddr = "127.0.0.1:5000".parse().expect("addr");
        let e = Entry::new("inbound", src);
        e.decided.set(Arc::from("shop/orders-allow"), Some(2));
        e.decided.set_client(Some("https://idp/alice".into()), Some(Arc::from("ci-bot")));
        let line = tapped(e, 403, "deny");
        assert_eq!((line["policy"].as_str(), line["rule"].as_u64()), (Some("shop/orders-allow"), Some(2)));
        assert_eq!((line["principal"].as_str(), line["api_key"].as_str()), (Some("https://idp/alice"), Some("ci-bot")));
        let line = tapped(Entry::new("inbound", src), 200, "allow");
        assert!(line.get("principal").is_none() && line.get("api_key").is_none(), "{line}");
    }

    #[test]
    fn tries_show_only_beyond_the_first() {
        let src: SocketAddr = "127.0.0.1:5000".parse().expect("addr");
        let mut e = Entry::new("inbound", src);
        e.attempt = Some(3);
        assert_eq!(tapped(e, 200, "allow")["attempt"], 3);
        let mut e = Entry::new("inbound", src);
        e.attempt = Some(1);
        let line = tapped(e, 200, "allow");
        assert!(line.get("attempt").is_none(), "a first try says nothing: {line}");

        let mut e = Entry::new("outbound", src);
        e.attempts = Some(2);
        e.error = Some("timeout");
        let line = tapped(e, 504, "error");
        assert_eq!((line["attempts"].as_u64(), line["error"].as_str()), (Some(2), Some("timeout")));
        let mut e = Entry::new("outbound", src);
        e.attempts = Some(1);
        let line = tapped(e, 200, "allow");
        assert!(line.get("attempts").is_none() && line.get("error").is_none(), "{line}");
    }

    #[test]
    fn an_outbound_answer_carries_its_tries_to_the_line() {
        let mut resp = http::Response::new(super::super::full(Bytes::new()));
        resp.extensions_mut().insert(CallNote { attempts: 2, error: Some("timeout") });
        let span = palisade_telemetry::Tracing::default().start_request(
            opentelemetry::trace::SpanKind::Client,
            "GET",
            &mut http::HeaderMap::new(),
            Vec::new,
        );
        let e = Entry::new("outbound", "127.0.0.1:5000".parse().expect("addr"));
        let o = Arc::new(crate::observe::Observe::new(0));
        o.set_taps(&[palisade_proto::v1::TapSpec { id: 1, ..Default::default() }]);
        let e = Entry { log: false, tap: Some(o.clone()), ..e };
        drop(finish(resp, span, Some(e), true));
        let events = o.take_events();
        let line: serde_json::Value = serde_json::from_str(&events[0].json).expect("a JSON line");
        assert_eq!((line["attempts"].as_u64(), line["error"].as_str()), (Some(2), Some("timeout")));
    }
}
