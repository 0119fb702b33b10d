//! The host's request limits over real gRPC: past the concurrency limit a call
//! is shed with RESOURCE_EXHAUSTED at once (no queueing), and a call that
//! overruns the request timeout is cancelled.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // tests may

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use ferry_runtime::{CancellationToken, Host, Limits};
use http::uri::PathAndQuery;
use tokio::sync::Semaphore;
use tonic::body::Body;
use tonic::{Code, Request, Response, Status};
use tonic_prost::ProstCodec;

/// A gRPC service `test.Gate/Pass` whose calls wait for a permit.
#[derive(Clone)]
struct Gate {
    permits: Arc<Semaphore>,
    entered: Arc<std::sync::atomic::AtomicUsize>,
}

impl Gate {
    fn closed() -> Gate {
        Gate {
            permits: Arc::new(Semaphore::new(0)),
            entered: Arc::default(),
        }
    }
}

impl tonic::server::NamedService for Gate {
    const NAME: &'static str = "test.Gate";
}

impl tower::Service<http::Request<Body>> for Gate {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let permits = self.permits.clone();
        let entered = self.entered.clone();
        Box::pin(async move {
            let handler = move |_: Request<()>| {
                let permits = permits.clone();
                entered.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                async move {
                    let _permit = permits
                        .acquire()
                        .await
                        .map_err(|_| Status::internal("closed"))?;
                    Ok::<_, Status>(Response::new(()))
                }
            };
            let mut grpc = tonic::server::Grpc::new(ProstCodec::<(), ()>::default());
            Ok(grpc.unary(tower::service_fn(handler), request).await)
        })
    }
}

async fn start(limits: Limits, gate: Gate) -> (String, CancellationToken) {
    let (url, shutdown, _, _) = start_host(limits, gate).await;
    (url, shutdown)
}

type Served = tokio::task::JoinHandle<Result<(), ferry_runtime::HostError>>;

async fn start_host(
    limits: Limits,
    gate: Gate,
) -> (String, CancellationToken, ferry_runtime::Health, Served) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let mut host = Host::new(&["test.Gate"]).await.unwrap();
    host.routes().add_service(gate);
    let health = host.health();
    let shutdown = CancellationToken::new();
    let token = shutdown.clone();
    let served = tokio::spawn(async move {
        host.serve(
            listener,
            &limits,
            None,
            ferry_runtime::security::Access::Unchecked,
            token,
        )
        .await
    });
    (url, shutdown, health, served)
}

async fn pass(url: &str) -> Result<(), Status> {
    let channel = tonic::transport::Endpoint::from_shared(url.to_string())
        .unwrap()
        .connect()
        .await
        .map_err(|e| Status::unavailable(e.to_string()))?;
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready()
        .await
        .map_err(|e| Status::unavailable(e.to_string()))?;
    grpc.unary(
        Request::new(()),
        PathAndQuery::from_static("/test.Gate/Pass"),
        ProstCodec::<(), ()>::default(),
    )
    .await
    .map(|_| ())
}

#[tokio::test]
async fn calls_past_the_concurrency_limit_are_shed() {
    let gate = Gate::closed();
    let limits = Limits {
        concurrency_limit: 1,
        ..Limits::default()
    };
    let (url, shutdown) = start(limits, gate.clone()).await;

    // The first call holds the only slot until the gate opens.
    let first = tokio::spawn({
        let url = url.clone();
        async move { pass(&url).await }
    });
    // Once the first call is inside the handler, holding the slot, a second
    // call is shed at once.
    let entered = gate.entered.clone();
    eventually(|| {
        let n = entered.load(std::sync::atomic::Ordering::SeqCst);
        async move { (n == 1).then_some(()) }
    })
    .await;
    let shed = tokio::time::timeout(Duration::from_secs(5), pass(&url))
        .await
        .expect("shed without waiting")
        .unwrap_err();
    assert_eq!(shed.code(), Code::ResourceExhausted, "{shed:?}");
    assert_eq!(
        gate.entered.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "a shed call never reaches the handler"
    );

    gate.permits.add_permits(100);
    first
        .await
        .unwrap()
        .expect("the first call completes once released");
    // With the slot free again, calls pass.
    pass(&url).await.unwrap();
    shutdown.cancel();
}

#[tokio::test]
async fn calls_past_the_timeout_are_cancelled() {
    let gate = Gate::closed();
    let limits = Limits {
        request_timeout_secs: 1,
        ..Limits::default()
    };
    let (url, shutdown) = start(limits, gate).await;
    let err = tokio::time::timeout(Duration::from_secs(20), pass(&url))
        .await
        .expect("the server answers within its timeout")
        .unwrap_err();
    assert_eq!(err.code(), Code::Cancelled, "{err:?}");
    shutdown.cancel();
}

#[tokio::test]
async fn shutdown_reports_not_serving_and_does_not_wait_forever_on_open_streams() {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::HealthCheckRequest;

    let limits = Limits {
        shutdown_grace_secs: 1,
        ..Limits::default()
    };
    let (url, shutdown, health, served) = start_host(limits, Gate::closed()).await;
    health.serving().await;
    let channel = tonic::transport::Endpoint::from_shared(url.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = HealthClient::new(channel);
    // An open Watch stream: it never ends by itself.
    let mut watch = client
        .watch(HealthCheckRequest {
            service: "test.Gate".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let first = watch.message().await.unwrap().unwrap();
    assert_eq!(first.status(), ServingStatus::Serving);
    // And a call stuck in a handler.
    let stuck = tokio::spawn({
        let url = url.clone();
        async move { pass(&url).await }
    });

    shutdown.cancel();
    let next = tokio::time::timeout(Duration::from_secs(5), watch.message())
        .await
        .expect("health changes on shutdown")
        .unwrap()
        .unwrap();
    assert_eq!(next.status(), ServingStatus::NotServing);
    tokio::time::timeout(Duration::from_secs(10), served)
        .await
        .expect("the server stops after its grace period despite open calls")
        .unwrap()
        .unwrap();
    assert!(stuck.await.unwrap().is_err());
}

/// Polls `check` every 10 ms for up to 10 s.
async fn eventually<T, F, Fut>(mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "condition not met in 10 s"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
