//! Prometheus metrics: one registry per process, served over plain HTTP at
//! `/metrics` on `--metrics-listen` (off unless set), in the OpenMetrics
//! text format Prometheus scrapes.
//!
//! What every process has: its gRPC calls by method and code with their
//! latency ([`GrpcMetricsLayer`], on every server the runtime hosts), and
//! its process figures (CPU, resident memory, open files, threads, start
//! time; read from `/proc/self` at each scrape). Each service adds what it
//! knows with [`register_collector`]: a collector reads the service's state
//! at each scrape, so a series disappears with what it describes. Metric
//! names carry their unit (`_seconds`, `_bytes`, `_total`); labels hold only
//! bounded values (method names from Ferry's protos, VM names, states).

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::{Mutex, OnceLock};
use std::task::{Context, Poll};
use std::time::Instant;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Registry, Unit};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Labels of a gRPC call counted.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CallLabels {
    method: String,
    code: String,
}

/// Labels of a gRPC call timed.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MethodLabels {
    method: String,
}

/// The process's metrics.
struct Metrics {
    registry: Mutex<Registry>,
    calls: Family<CallLabels, Counter>,
    latency: Family<MethodLabels, Histogram, fn() -> Histogram>,
}

fn latency_histogram() -> Histogram {
    // 0.5 ms to about 16 s.
    Histogram::new(exponential_buckets(0.0005, 2.0, 16))
}

fn metrics() -> &'static Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    METRICS.get_or_init(|| {
        let mut registry = Registry::default();
        let calls = Family::<CallLabels, Counter>::default();
        let latency = Family::<MethodLabels, Histogram, fn() -> Histogram>::new_with_constructor(
            latency_histogram,
        );
        registry.register(
            "ferry_grpc_server_handled",
            "gRPC calls answered by this process, by method and status code (streams \
             count when they are answered, with the code they open with)",
            calls.clone(),
        );
        registry.register_with_unit(
            "ferry_grpc_server_handling",
            "Time to answer a gRPC call (for a stream: to its first response headers)",
            Unit::Seconds,
            latency.clone(),
        );
        registry.register_collector(Box::new(ProcessCollector));
        Metrics {
            registry: Mutex::new(registry),
            calls,
            latency,
        }
    })
}

/// Adds a service's collector to the process's metrics. It is asked at
/// every scrape; it should hold its service's state weakly, so that it
/// keeps nothing alive after the service stops.
pub fn register_collector(collector: Box<dyn Collector>) {
    if let Ok(mut registry) = metrics().registry.lock() {
        registry.register_collector(collector);
    }
}

/// The metrics in the OpenMetrics text format.
pub fn render() -> String {
    let mut text = String::new();
    let encoded = match metrics().registry.lock() {
        Ok(registry) => prometheus_client::encoding::text::encode(&mut text, &registry),
        Err(_) => Err(std::fmt::Error),
    };
    if encoded.is_err() {
        text.clear();
        let _ = writeln!(text, "# metrics could not be encoded\n# EOF");
    }
    text
}

/// A gauge with labels, as a collector encodes it: `name` (its unit added),
/// one sample per label set.
pub fn encode_gauges<L: EncodeLabelSet>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    samples: &[(L, f64)],
) -> Result<(), std::fmt::Error> {
    let mut family = encoder.encode_descriptor(name, help, unit, MetricType::Gauge)?;
    for (labels, value) in samples {
        ConstGauge::new(*value).encode(family.encode_family(labels)?)?;
    }
    Ok(())
}

/// A counter with labels, as a collector encodes it (`_total` added).
pub fn encode_counters<L: EncodeLabelSet>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    samples: &[(L, u64)],
) -> Result<(), std::fmt::Error> {
    let mut family = encoder.encode_descriptor(name, help, unit, MetricType::Counter)?;
    for (labels, value) in samples {
        ConstCounter::new(*value).encode(family.encode_family(labels)?)?;
    }
    Ok(())
}

/// Why the metrics port could not be served.
#[derive(Debug, thiserror::Error)]
#[error("cannot serve metrics on {addr}: {source}")]
pub struct MetricsPortError {
    pub addr: SocketAddr,
    pub source: std::io::Error,
}

/// Binds `addr` now (an unusable address stops start-up) and serves
/// `GET /metrics` there over HTTP/1.1 until `shutdown`.
pub async fn serve(
    addr: SocketAddr,
    shutdown: CancellationToken,
) -> Result<SocketAddr, MetricsPortError> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| MetricsPortError { addr, source })?;
    let bound = listener
        .local_addr()
        .map_err(|source| MetricsPortError { addr, source })?;
    // Process metrics exist from the start, whatever is scraped first.
    metrics();
    tracing::info!(addr = %bound, "metrics served at http://{bound}/metrics");
    tokio::spawn(async move {
        loop {
            let stream = tokio::select! {
                _ = shutdown.cancelled() => return,
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => stream,
                    Err(e) => {
                        tracing::warn!(error = %e, "metrics port: accept failed");
                        continue;
                    }
                },
            };
            let stopping = shutdown.clone();
            tokio::spawn(async move {
                let io = hyper_util::rt::TokioIo::new(stream);
                let connection = hyper::server::conn::http1::Builder::new()
                    .serve_connection(io, hyper::service::service_fn(answer));
                tokio::select! {
                    _ = stopping.cancelled() => {}
                    _ = connection => {}
                }
            });
        }
    });
    Ok(bound)
}

type Body = http_body_util::Full<bytes::Bytes>;

async fn answer<B>(
    request: http::Request<B>,
) -> Result<http::Response<Body>, std::convert::Infallible> {
    let response = |status: http::StatusCode, content_type: &str, body: String| {
        let mut response = http::Response::new(Body::from(body));
        *response.status_mut() = status;
        if let Ok(value) = http::HeaderValue::from_str(content_type) {
            response
                .headers_mut()
                .insert(http::header::CONTENT_TYPE, value);
        }
        response
    };
    Ok(match (request.method(), request.uri().path()) {
        (&http::Method::GET, "/metrics") => response(
            http::StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            render(),
        ),
        (_, "/metrics") => response(
            http::StatusCode::METHOD_NOT_ALLOWED,
            "text/plain; charset=utf-8",
            "only GET /metrics is served here\n".into(),
        ),
        _ => response(
            http::StatusCode::NOT_FOUND,
            "text/plain; charset=utf-8",
            "only /metrics is served here\n".into(),
        ),
    })
}

/// The method label of a request path: the path when it names an RPC in
/// Ferry's authorization table or a public service (health, reflection),
/// else "unknown", so a client cannot make up label values.
fn method_label(path: &str) -> String {
    match crate::security::policy::rule_for(path) {
        Some(_) => path.trim_start_matches('/').to_string(),
        None => "unknown".to_string(),
    }
}

/// A server layer counting and timing every gRPC call.
#[derive(Clone, Copy, Debug, Default)]
pub struct GrpcMetricsLayer;

impl<S> tower::Layer<S> for GrpcMetricsLayer {
    type Service = GrpcMetricsService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        GrpcMetricsService { inner }
    }
}

/// See [`GrpcMetricsLayer`].
#[derive(Clone, Debug)]
pub struct GrpcMetricsService<S> {
    inner: S,
}

impl<S, B, RB> tower::Service<http::Request<B>> for GrpcMetricsService<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<RB>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = crate::security::layer::BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let method = method_label(request.uri().path());
        let started = Instant::now();
        let future = self.inner.call(request);
        Box::pin(async move {
            let response = future.await;
            let code = match &response {
                // An error answered at once carries its status in the
                // headers; a success (or a stream) has it in the trailers.
                Ok(r) => tonic::Status::from_header_map(r.headers())
                    .map_or(tonic::Code::Ok, |s| s.code()),
                Err(_) => tonic::Code::Unavailable,
            };
            let m = metrics();
            m.latency
                .get_or_create(&MethodLabels {
                    method: method.clone(),
                })
                .observe(started.elapsed().as_secs_f64());
            m.calls
                .get_or_create(&CallLabels {
                    method,
                    code: format!("{code:?}"),
                })
                .inc();
            response
        })
    }
}

/// The process's own figures, read from `/proc/self` at each scrape.
#[derive(Debug)]
struct ProcessCollector;

/// Clock ticks per second of `/proc`'s times (USER_HZ).
fn ticks_per_second() -> f64 {
    // SAFETY: sysconf reads a constant of the system; no memory of ours.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 {
        ticks as f64
    } else {
        100.0
    }
}

/// (cpu seconds, threads, start time in Unix seconds, virtual bytes,
/// resident bytes) of this process.
fn process_figures() -> Option<(f64, f64, f64, f64, f64)> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // The command name may hold spaces: fields start after its ')'.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let field = |n: usize| fields.get(n - 3).and_then(|v| v.parse::<f64>().ok());
    let ticks = ticks_per_second();
    let cpu = (field(14)? + field(15)?) / ticks;
    let threads = field(20)?;
    let boot = std::fs::read_to_string("/proc/stat")
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("btime "))
        .and_then(|v| v.trim().parse::<f64>().ok())?;
    let start = boot + field(22)? / ticks;
    // SAFETY: sysconf reads a constant of the system; no memory of ours.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as f64;
    Some((cpu, threads, start, field(23)?, field(24)? * page))
}

/// One gauge without labels, as a collector encodes it.
pub fn encode_gauge(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    value: f64,
) -> Result<(), std::fmt::Error> {
    let metric = ConstGauge::new(value);
    metric.encode(encoder.encode_descriptor(name, help, unit, metric.metric_type())?)
}

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Some((cpu, threads, start, virt, rss)) = process_figures() else {
            return Ok(());
        };
        let counter = ConstCounter::new(cpu);
        counter.encode(encoder.encode_descriptor(
            "process_cpu",
            "User and system CPU time spent",
            Some(&Unit::Seconds),
            counter.metric_type(),
        )?)?;
        let bytes = Some(&Unit::Bytes);
        encode_gauge(
            &mut encoder,
            "process_resident_memory",
            "Resident memory size",
            bytes,
            rss,
        )?;
        encode_gauge(
            &mut encoder,
            "process_virtual_memory",
            "Virtual memory size",
            bytes,
            virt,
        )?;
        encode_gauge(
            &mut encoder,
            "process_start_time",
            "Start time of the process since the Unix epoch",
            Some(&Unit::Seconds),
            start,
        )?;
        encode_gauge(&mut encoder, "process_threads", "OS threads", None, threads)?;
        if let Ok(fds) = std::fs::read_dir("/proc/self/fd") {
            let open = fds.count() as f64;
            encode_gauge(
                &mut encoder,
                "process_open_fds",
                "Open file descriptors",
                None,
                open,
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_made_up_path_is_not_a_label_value() {
        assert_eq!(method_label("/evil/x-12345"), "unknown");
        assert_eq!(
            method_label("/ferry.registry.v1.Registry/GetVm"),
            "ferry.registry.v1.Registry/GetVm"
        );
        assert_eq!(
            method_label("/grpc.health.v1.Health/Check"),
            "grpc.health.v1.Health/Check"
        );
    }

    #[test]
    fn process_figures_are_read() {
        let (cpu, threads, start, virt, rss) = process_figures().unwrap();
        assert!(cpu >= 0.0 && threads >= 1.0 && virt > 0.0 && rss > 0.0);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        assert!(
            start <= now + 1.0 && start > now - 86400.0 * 365.0,
            "{start}"
        );
        let text = render();
        for name in [
            "process_cpu_seconds_total",
            "process_resident_memory_bytes",
            "process_open_fds",
        ] {
            assert!(text.contains(name), "{name} missing:\n{text}");
        }
        assert!(text.ends_with("# EOF\n"), "{text}");
    }
}
