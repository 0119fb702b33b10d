//! W3C trace context across gRPC calls.
//!
//! Servers: [`TraceContextLayer`] opens a span per request whose parent is the
//! caller's `traceparent`, and answers with a `traceresponse` header naming that
//! span (W3C Trace Context level 2), so a caller can tell which trace served it.
//! Clients: [`TraceInterceptor`] puts the current span's context into the
//! outgoing metadata.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use opentelemetry::propagation::{Extractor, Injector};
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// The response header every Ferry server answers with its version.
pub const VERSION_HEADER: &str = "ferry-version";

struct HeaderExtractor<'a>(&'a http::HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }
    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

struct MetadataInjector<'a>(&'a mut tonic::metadata::MetadataMap);

impl Injector for MetadataInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(key), Ok(value)) = (
            tonic::metadata::MetadataKey::from_bytes(key.as_bytes()),
            tonic::metadata::MetadataValue::try_from(value.as_str()),
        ) {
            self.0.insert(key, value);
        }
    }
}

/// Records the VM a request concerns on its request span, so that every log
/// line and exported span of the request carries it.
pub fn record_vm(vm: &str) {
    tracing::Span::current().record("vm", vm);
}

/// The `traceparent` value naming `span`, if it belongs to a sampled trace.
pub fn traceparent_of(span: &tracing::Span) -> Option<String> {
    let cx = span.context();
    let mut fields = HashMap::new();
    opentelemetry::global::get_text_map_propagator(|p| p.inject_context(&cx, &mut fields));
    fields.remove("traceparent")
}

/// Client side: injects the current span's trace context into each request.
#[derive(Clone, Copy, Debug, Default)]
pub struct TraceInterceptor;

impl tonic::service::Interceptor for TraceInterceptor {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        let cx = tracing::Span::current().context();
        opentelemetry::global::get_text_map_propagator(|p| {
            p.inject_context(&cx, &mut MetadataInjector(request.metadata_mut()))
        });
        Ok(request)
    }
}

/// Server side: a span per request, child of the caller's trace.
#[derive(Clone, Copy, Debug, Default)]
pub struct TraceContextLayer;

impl<S> tower::Layer<S> for TraceContextLayer {
    type Service = TraceContextService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        TraceContextService { inner }
    }
}

/// The service [`TraceContextLayer`] builds.
#[derive(Clone, Debug)]
pub struct TraceContextService<S> {
    inner: S,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, B, RB> tower::Service<http::Request<B>> for TraceContextService<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<RB>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let parent = opentelemetry::global::get_text_map_propagator(|p| {
            p.extract(&HeaderExtractor(request.headers()))
        });
        let span = tracing::info_span!(
            "grpc",
            rpc = %request.uri().path(),
            vm = tracing::field::Empty,
            disk = tracing::field::Empty,
            sequence = tracing::field::Empty,
        );
        // A span disabled by the filter has no context to join; that is fine.
        let _ = span.set_parent(parent);
        let traceresponse =
            traceparent_of(&span).and_then(|v| http::HeaderValue::from_str(&v).ok());
        // The ready service is the one to call; keep a fresh clone in its place.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let future = span.in_scope(|| inner.call(request));
        Box::pin(
            async move {
                let mut response = future.await?;
                if let Some(value) = traceresponse {
                    response.headers_mut().insert("traceresponse", value);
                }
                // Which release answers (`ferry status` shows it).
                response.headers_mut().insert(
                    VERSION_HEADER,
                    http::HeaderValue::from_static(env!("CARGO_PKG_VERSION")),
                );
                Ok(response)
            }
            .instrument(span),
        )
    }
}
