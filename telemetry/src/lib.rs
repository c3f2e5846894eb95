//! Distributed tracing, shared by the sidecar and the control plane: a span
//! per request (a client span on the caller's sidecar, a server span on the
//! callee's and on the control plane's gRPC calls), W3C `traceparent` /
//! `tracestate` propagated, exported over OTLP/gRPC to `--otlp-endpoint`.
//!
//! The data path never waits for tracing: a finished span goes into a
//! bounded queue (`try_send`); a background task sends batches to the
//! collector with a timeout. A full queue or a failed export drops spans,
//! counted in `palisade_trace_spans_total{result}`. Without an endpoint
//! nothing is set up and a request costs one `Option` check.

use std::sync::Arc;
use std::time::Duration;

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{SpanKind, Status, TraceContextExt, Tracer as _, TracerProvider as _};
use opentelemetry::{Context, KeyValue};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{Sampler, SdkTracer, SdkTracerProvider, SpanData, SpanExporter, SpanProcessor};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;

/// Spans held waiting for export, at most.
const QUEUE: usize = 4096;
/// Spans per export call, at most.
const BATCH: usize = 512;
/// How long spans wait to fill a batch.
const BATCH_DELAY: Duration = Duration::from_millis(500);
/// Longest one export may take (then its spans count as failed).
const EXPORT_TIMEOUT: Duration = Duration::from_secs(5);
/// Pause before a failed export is tried again (doubled each time).
const RETRY_AFTER: Duration = Duration::from_secs(1);
/// How many more times a failed export is tried.
const RETRIES: u32 = 2;

/// Span counters, by `result`: exported, dropped (queue full), failed (the
/// collector refused, was unreachable or too slow).
#[derive(Debug, Clone, Default)]
pub struct SpanCounts(pub Family<ResultLabel, Counter>);

#[derive(Debug, Clone, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
pub struct ResultLabel {
    pub result: &'static str,
}

impl SpanCounts {
    fn add(&self, result: &'static str, n: usize) {
        self.0.get_or_create(&ResultLabel { result }).inc_by(n as u64);
    }
}

/// A span processor that never blocks: finished spans go into a bounded
/// queue that a task drains to the exporter.
#[derive(Debug)]
struct Queue {
    tx: tokio::sync::mpsc::Sender<SpanData>,
    counts: SpanCounts,
}

impl SpanProcessor for Queue {
    fn on_start(&self, _span: &mut opentelemetry_sdk::trace::Span, _cx: &Context) {}
    fn on_end(&self, span: SpanData) {
        if !span.span_context.is_sampled() {
            return;
        }
        if self.tx.try_send(span).is_err() {
            self.counts.add("dropped", 1);
        }
    }
    fn force_flush(&self) -> opentelemetry_sdk::error::OTelSdkResult {
        Ok(())
    }
    fn shutdown_with_timeout(&self, _timeout: Duration) -> opentelemetry_sdk::error::OTelSdkResult {
        Ok(())
    }
}

async fn drain<E: SpanExporter>(exporter: E, mut rx: tokio::sync::mpsc::Receiver<SpanData>, counts: SpanCounts) {
    let mut batch = Vec::with_capacity(BATCH);
    loop {
        let Some(first) = rx.recv().await else { break };
        batch.push(first);
        let deadline = tokio::time::Instant::now() + BATCH_DELAY;
        while batch.len() < BATCH {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(s)) => batch.push(s),
                _ => break,
            }
        }
        let n = batch.len();
        // A failed export is tried again after a pause, twice (a collector
        // restarting, a connection being made under load), unless spans are
        // piling up behind it: then they come first, and the batch is lost.
        let mut spans = std::mem::take(&mut batch);
        let (mut retries, mut pause) = (RETRIES, RETRY_AFTER);
        loop {
            let again = (retries > 0).then(|| spans.clone());
            let why = match tokio::time::timeout(EXPORT_TIMEOUT, exporter.export(spans)).await {
                Ok(Ok(())) => {
                    counts.add("exported", n);
                    break;
                }
                Ok(Err(e)) => e.to_string(),
                Err(_) => "timed out".to_string(),
            };
            match again.filter(|_| rx.len() < QUEUE / 2) {
                Some(retry) => {
                    tracing::debug!(error = %why, spans = n, "span export failed; trying again");
                    tokio::time::sleep(pause).await;
                    (retries, pause, spans) = (retries - 1, pause * 2, retry);
                }
                None => {
                    counts.add("failed", n);
                    tracing::debug!(error = %why, spans = n, "span export failed");
                    break;
                }
            }
        }
    }
}

/// Tracing, when configured.
#[derive(Debug, Clone, Default)]
pub struct Tracing(Option<Arc<Inner>>);

#[derive(Debug)]
struct Inner {
    tracer: SdkTracer,
    provider: SdkTracerProvider,
    propagator: TraceContextPropagator,
    /// `--trace-sampling`.
    ratio: f64,
    /// Draws and ids for traces this sidecar starts (splitmix64 over a
    /// randomly seeded counter: unique, well spread, lock-free).
    next: std::sync::atomic::AtomicU64,
}

impl Inner {
    fn random(&self) -> u64 {
        let mut z = self.next.fetch_add(0x9E37_79B9_7F4A_7C15, std::sync::atomic::Ordering::Relaxed);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn sample(&self) -> bool {
        ((self.random() >> 11) as f64) / ((1u64 << 53) as f64) < self.ratio
    }
}

/// What tracing needs from the command line.
#[derive(Debug, Clone)]
pub struct Options {
    pub endpoint: String,
    pub ca_file: Option<std::path::PathBuf>,
    pub sampling: f64,
    pub service_name: String,
}

impl Tracing {
    /// Sets up the exporter (inside a tokio runtime). The collector is not
    /// contacted yet: a collector that is down costs failed exports only.
    pub fn start(opts: &Options, counts: SpanCounts) -> anyhow::Result<Self> {
        use opentelemetry_otlp::{WithExportConfig, WithTonicConfig};
        // The endpoint is shown in /config and the start-up log: no credentials in it.
        if opts.endpoint.contains('@') {
            anyhow::bail!("--otlp-endpoint: a URL with credentials (user@host) is not accepted; it would be logged");
        }
        let mut builder = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(opts.endpoint.clone())
            .with_timeout(EXPORT_TIMEOUT);
        if opts.endpoint.starts_with("https://") {
            let Some(ca) = &opts.ca_file else {
                anyhow::bail!("--otlp-endpoint {}: an https:// collector needs --otlp-ca-file", opts.endpoint);
            };
            let pem = std::fs::read(ca).map_err(|e| anyhow::anyhow!("--otlp-ca-file {}: {e}", ca.display()))?;
            let tls =
                tonic::transport::ClientTlsConfig::new().ca_certificate(tonic::transport::Certificate::from_pem(pem));
            builder = builder.with_tls_config(tls);
        } else if !opts.endpoint.starts_with("http://") {
            anyhow::bail!("--otlp-endpoint {}: expected http://HOST:PORT or https://HOST:PORT", opts.endpoint);
        }
        let mut exporter = builder.build().map_err(|e| anyhow::anyhow!("--otlp-endpoint {}: {e}", opts.endpoint))?;
        let resource = opentelemetry_sdk::Resource::builder_empty()
            .with_attributes([
                KeyValue::new("service.name", opts.service_name.clone()),
                KeyValue::new("telemetry.sdk.language", "rust"),
            ])
            .build();
        exporter.set_resource(&resource);
        let (tx, rx) = tokio::sync::mpsc::channel(QUEUE);
        tokio::spawn(drain(exporter, rx, counts.clone()));
        let provider = SdkTracerProvider::builder()
            .with_resource(resource)
            // New traces are sampled (or not) by `start_request` before the SDK sees them.
            .with_sampler(Sampler::ParentBased(Box::new(Sampler::AlwaysOn)))
            .with_span_processor(Queue { tx, counts })
            .build();
        let tracer = provider.tracer(opts.service_name.clone());
        let mut seed = [0u8; 8];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut seed)
            .map_err(|_| anyhow::anyhow!("no system randomness for trace ids"))?;
        Ok(Self(Some(Arc::new(Inner {
            tracer,
            provider,
            propagator: TraceContextPropagator::new(),
            ratio: opts.sampling,
            next: std::sync::atomic::AtomicU64::new(u64::from_le_bytes(seed)),
        }))))
    }

    /// Whether spans are recorded at all.
    pub fn enabled(&self) -> bool {
        self.0.is_some()
    }

    /// Starts the span of a request: a child of the `traceparent` it
    /// carries (the caller's sampled flag decides), or a new trace (the
    /// sampling ratio decides). The request's `traceparent`/`tracestate`
    /// are then replaced by this span's, for the next hop.
    pub fn start_request(
        &self,
        kind: SpanKind,
        method: &str,
        headers: &mut http::HeaderMap,
        attrs: impl FnOnce() -> Vec<KeyValue>,
    ) -> ReqSpan {
        let Some(inner) = &self.0 else { return ReqSpan(None) };
        // Requests that are not recorded (most, at a low ratio) never reach
        // the SDK: a caller's unsampled context passes on as it is, and a new
        // trace that is not sampled gets a traceparent with the flag unset,
        // so every hop makes the same decision.
        match headers.get("traceparent").and_then(|v| palisade_net::traceparent::sampled(v.as_bytes())) {
            Some(false) => return ReqSpan(None),
            Some(true) => {}
            None => {
                headers.remove("traceparent");
                headers.remove("tracestate");
                if !inner.sample() {
                    let (hi, lo, span) = (inner.random(), inner.random(), inner.random() | 1);
                    let tp = format!("00-{hi:016x}{lo:016x}-{span:016x}-00");
                    if let Ok(v) = http::HeaderValue::from_str(&tp) {
                        headers.insert("traceparent", v);
                    }
                    return ReqSpan(None);
                }
            }
        }
        let parent = inner.propagator.extract(&HeaderExtractor(headers));
        let mut span =
            inner.tracer.span_builder(method.to_string()).with_kind(kind).start_with_context(&inner.tracer, &parent);
        // Attributes only for spans that are recorded (sampled).
        if opentelemetry::trace::Span::is_recording(&span) {
            opentelemetry::trace::Span::set_attributes(&mut span, attrs());
        }
        let cx = parent.with_span(span);
        headers.remove("traceparent");
        headers.remove("tracestate");
        inner.propagator.inject_context(&cx, &mut HeaderInjector(headers));
        ReqSpan(Some(cx))
    }

    /// Sends what is queued (shutdown).
    pub fn shutdown(&self) {
        if let Some(inner) = &self.0 {
            let _ = inner.provider.shutdown();
        }
    }
}

/// A request's span; ended by [`ReqSpan::end`] (or when dropped).
#[derive(Debug)]
pub struct ReqSpan(Option<Context>);

impl ReqSpan {
    /// Whether this span records (sampled).
    pub fn recording(&self) -> bool {
        self.0.as_ref().is_some_and(|cx| cx.span().is_recording())
    }

    /// The trace id (hex), when the span is recorded.
    pub fn trace_id(&self) -> Option<String> {
        let cx = self.0.as_ref()?;
        let sc = cx.span().span_context().clone();
        sc.is_sampled().then(|| sc.trace_id().to_string())
    }

    /// Adds attributes.
    pub fn set(&self, attrs: impl IntoIterator<Item = KeyValue>) {
        if let Some(cx) = &self.0 {
            let span = cx.span();
            if span.is_recording() {
                for kv in attrs {
                    span.set_attribute(kv);
                }
            }
        }
    }

    /// Ends the span with the response's status (5xx is an error; 4xx is an
    /// error on the client span only, per the HTTP semantic conventions).
    pub fn end(self, status: u16, client: bool) {
        let Some(cx) = self.0 else { return };
        let span = cx.span();
        span.set_attribute(KeyValue::new("http.response.status_code", i64::from(status)));
        if status >= 500 || (client && status >= 400) {
            span.set_status(Status::error(""));
        }
        span.end();
    }

    /// Ends the span of a gRPC call with its status code (server errors,
    /// per the RPC semantic conventions, mark the span an error).
    pub fn end_grpc(self, code: i64) {
        let Some(cx) = self.0 else { return };
        let span = cx.span();
        span.set_attribute(KeyValue::new("rpc.grpc.status_code", code));
        // UNKNOWN, DEADLINE_EXCEEDED, UNIMPLEMENTED, INTERNAL, UNAVAILABLE, DATA_LOSS.
        if [2, 4, 12, 13, 14, 15].contains(&code) {
            span.set_status(Status::error(""));
        }
        span.end();
    }
}

struct HeaderExtractor<'a>(&'a http::HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }
    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

struct HeaderInjector<'a>(&'a mut http::HeaderMap);

impl Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        // An empty tracestate says nothing: send none.
        if value.is_empty() {
            return;
        }
        if let (Ok(name), Ok(v)) = (http::HeaderName::from_bytes(key.as_bytes()), http::HeaderValue::from_str(&value)) {
            self.0.insert(name, v);
        }
    }
}

/// A value that came from outside (a peer, a request, a sidecar's report),
/// for a log field: `tracing::warn!(error = %Untrusted(&m.error), ..)`.
///
/// Written quoted, with `"`, `\`, control characters and Unicode line
/// separators escaped, and cut after [`Untrusted::MAX_CHARS`] characters:
/// whatever it holds stays inside its own field of its own line, so it can
/// neither start a forged line (the audit log is evidence) nor pass for
/// another field (`x event="admin_authorized"`), nor flood the log.
/// `%value` (Display) would write newlines as they are.
#[derive(Debug, Clone, Copy)]
pub struct Untrusted<T>(pub T);

impl<T> Untrusted<T> {
    /// Characters written at most; the rest is replaced by a count.
    pub const MAX_CHARS: usize = 4096;
}

impl<T: std::fmt::Display> std::fmt::Display for Untrusted<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        use std::fmt::Write;
        let mut w = Escape { out: f, left: Self::MAX_CHARS, cut: 0 };
        w.out.write_char('"')?;
        write!(w, "{}", self.0)?;
        let cut = w.cut;
        f.write_char('"')?;
        if cut > 0 {
            write!(f, "...({cut} more characters)")?;
        }
        Ok(())
    }
}

/// Escapes what passes through it, up to a budget of characters.
struct Escape<'a, 'b> {
    out: &'a mut std::fmt::Formatter<'b>,
    left: usize,
    cut: usize,
}

impl std::fmt::Write for Escape<'_, '_> {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        for c in s.chars() {
            if self.left == 0 {
                self.cut += 1;
                continue;
            }
            self.left -= 1;
            match c {
                '"' => self.out.write_str("\\\"")?,
                '\\' => self.out.write_str("\\\\")?,
                '\n' => self.out.write_str("\\n")?,
                '\r' => self.out.write_str("\\r")?,
                '\t' => self.out.write_str("\\t")?,
                c if c.is_control() || matches!(c, '\u{2028}' | '\u{2029}') => {
                    write!(self.out, "\\u{{{:x}}}", c as u32)?
                }
                c => self.out.write_char(c)?,
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::Untrusted;

    #[test]
    fn untrusted_values_stay_inside_their_field() {
        let forged = "v1\n2025-01-01T00:00:00Z  INFO audit: event=\"admin_authorized\"\r\x1b[2K\u{2028}\\";
        let out = Untrusted(forged).to_string();
        assert_eq!(
            out,
            "\"v1\\n2025-01-01T00:00:00Z  INFO audit: event=\\\"admin_authorized\\\"\\r\\u{1b}[2K\\u{2028}\\\\\""
        );
        assert!(!out.chars().any(|c| c.is_control()), "{out}");
        // Any Display value, not only strings.
        assert_eq!(Untrusted(42).to_string(), "\"42\"");
        let long = "x".repeat(Untrusted::<&str>::MAX_CHARS + 10);
        let out = Untrusted(long.as_str()).to_string();
        assert!(out.ends_with("\"...(10 more characters)"), "{}", &out[out.len() - 40..]);
        assert_eq!(out.len(), Untrusted::<&str>::MAX_CHARS + 2 + "...(10 more characters)".len());
    }
}
