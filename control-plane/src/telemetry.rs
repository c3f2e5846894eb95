//! Tracing of the control plane's own gRPC calls (`--otlp-endpoint`): a
//! server span per call, named `service/method` with the RPC semantic
//! conventions' attributes, a child of the caller's `traceparent` when it
//! sends one. The same exporter as the sidecars' (`palisade-telemetry`).

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use opentelemetry::KeyValue;
use palisade_telemetry::Tracing;

/// Wraps every gRPC service.
#[derive(Debug, Clone)]
pub(crate) struct TraceLayer(pub(crate) Tracing);

impl<S> tower::Layer<S> for TraceLayer {
    type Service = Traced<S>;
    fn layer(&self, inner: S) -> Traced<S> {
        Traced { inner, tracing: self.0.clone() }
    }
}

/// A gRPC service whose calls are traced.
#[derive(Debug, Clone)]
pub(crate) struct Traced<S> {
    inner: S,
    tracing: Tracing,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, B, RB> tower::Service<http::Request<B>> for Traced<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<RB>> + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<Result<S::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        if !self.tracing.enabled() {
            return Box::pin(self.inner.call(req));
        }
        let path = req.uri().path().trim_start_matches('/');
        let name: String = path.chars().take(128).collect();
        let (service, method) = name.split_once('/').map(|(s, m)| (s.to_string(), m.to_string())).unwrap_or_default();
        let span = self.tracing.start_request(opentelemetry::trace::SpanKind::Server, &name, req.headers_mut(), || {
            vec![
                KeyValue::new("rpc.system", "grpc"),
                KeyValue::new("rpc.service", service),
                KeyValue::new("rpc.method", method),
            ]
        });
        let fut = self.inner.call(req);
        Box::pin(async move {
            let resp = fut.await?;
            // Trailers-only answers (errors) carry the status in the head; others end OK.
            let code = resp.headers().get("grpc-status").and_then(|v| v.to_str().ok()?.parse().ok()).unwrap_or(0);
            span.end_grpc(code);
            Ok(resp)
        })
    }
}
