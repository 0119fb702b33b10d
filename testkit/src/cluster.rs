//! All four services in-process, each on its own `127.0.0.1:0` listener with
//! its own tempdir, wired to one another.

use std::future::Future;
use std::path::PathBuf;

use ferry_runtime::{CancellationToken, ServiceConfig};
use tempfile::TempDir;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::FaultProxy;

/// One service running in-process.
pub struct Running {
    pub url: String,
    pub data_dir: PathBuf,
    pub shutdown: CancellationToken,
    pub task: JoinHandle<()>,
}

impl Running {
    /// Cancels the service's token and waits for it to stop.
    pub async fn stop(self) {
        self.shutdown.cancel();
        let _ = self.task.await;
    }
}

async fn start<F, Fut, E>(name: &'static str, data_dir: PathBuf, serve: F) -> Running
where
    F: FnOnce(ServiceConfig, TcpListener, CancellationToken) -> Fut,
    Fut: Future<Output = Result<(), E>> + Send + 'static,
    E: std::fmt::Display,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    let shutdown = CancellationToken::new();
    let config = ServiceConfig::in_process(&data_dir);
    let future = serve(config, listener, shutdown.clone());
    let task = tokio::spawn(async move {
        if let Err(err) = future.await {
            panic!("{name} failed: {err}");
        }
    });
    Running {
        url,
        data_dir,
        shutdown,
        task,
    }
}

/// How a [`Cluster`] is set up beyond the defaults.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// registry-svc's settings (a bootstrap token for a test whose service
    /// binaries check operator tokens with it).
    pub registry: registry_svc::Settings,
    pub processor: processor_svc::Settings,
    pub cache: cache_svc::Settings,
    /// failover-svc's settings (a libvirt backend).
    pub failover: failover_svc::Settings,
    /// failover-svc's data directory, if the test has its own (one a
    /// hypervisor's QEMU user may enter); else one under the cluster's
    /// tempdir.
    pub failover_dir: Option<PathBuf>,
    /// cache-svc's data directory, if the test has its own (a [`crate::SmallFs`]
    /// for a full disk); else one under the cluster's tempdir.
    pub cache_dir: Option<PathBuf>,
    /// processor-svc's, likewise.
    pub processor_dir: Option<PathBuf>,
    /// Where processor-svc serves its Prometheus metrics, if anywhere.
    pub processor_metrics: Option<std::net::SocketAddr>,
    /// Where cache-svc serves its Prometheus metrics, if anywhere.
    pub cache_metrics: Option<std::net::SocketAddr>,
    /// Where failover-svc serves its Prometheus metrics, if anywhere.
    pub failover_metrics: Option<std::net::SocketAddr>,
    /// Where registry-svc serves its Prometheus metrics, if anywhere.
    pub registry_metrics: Option<std::net::SocketAddr>,
}

/// Every service, in-process.
pub struct Cluster {
    pub registry: Running,
    pub cache: Running,
    pub processor: Running,
    pub failover: Running,
    _dir: TempDir,
}

/// Starts registry-svc alone in-process on `data_dir`, handing out
/// `cache_url` to agents.
pub async fn start_registry(data_dir: PathBuf, cache_url: Option<String>) -> Running {
    start_registry_with(data_dir, cache_url, registry_svc::Settings::default()).await
}

/// As [`start_registry`], with `[registry]` settings of the test's own.
pub async fn start_registry_with(
    data_dir: PathBuf,
    cache_url: Option<String>,
    settings: registry_svc::Settings,
) -> Running {
    start_registry_metered(data_dir, cache_url, settings, None).await
}

/// As [`start_registry_with`], serving Prometheus metrics at `metrics`.
pub async fn start_registry_metered(
    data_dir: PathBuf,
    cache_url: Option<String>,
    settings: registry_svc::Settings,
    metrics: Option<std::net::SocketAddr>,
) -> Running {
    start(
        "registry-svc",
        data_dir,
        move |mut service, listener, shutdown| {
            service.cache = cache_url;
            service.metrics_listen = metrics;
            async move {
                let config = registry_svc::Config::new(service, settings)?;
                registry_svc::serve(config, listener, shutdown).await
            }
        },
    )
    .await
}

impl Cluster {
    /// Starts the four services and waits until each reports SERVING.
    pub async fn start() -> Cluster {
        Self::start_with(processor_svc::Settings::default()).await
    }

    /// As [`Cluster::start`], with processor-svc's settings.
    pub async fn start_with(processor_settings: processor_svc::Settings) -> Cluster {
        Self::start_options(Options {
            processor: processor_settings,
            ..Options::default()
        })
        .await
    }

    /// As [`Cluster::start`], set up by `options`.
    pub async fn start_options(options: Options) -> Cluster {
        Self::start_inner(options, false).await.0
    }

    /// As [`Cluster::start_with`], but registry hands agents the URL of a
    /// [`FaultProxy`] in front of the cache, so that a test can cut, stall
    /// or slow the agents' link alone (processor-svc and failover-svc reach
    /// the cache directly).
    pub async fn start_behind_proxy(
        processor_settings: processor_svc::Settings,
    ) -> (Cluster, FaultProxy) {
        let options = Options {
            processor: processor_settings,
            ..Options::default()
        };
        Self::start_behind_proxy_options(options).await
    }

    /// As [`Cluster::start_behind_proxy`], set up by `options`.
    pub async fn start_behind_proxy_options(options: Options) -> (Cluster, FaultProxy) {
        let (cluster, proxy) = Self::start_inner(options, true).await;
        (cluster, proxy.expect("a proxy was asked for"))
    }

    async fn start_inner(options: Options, proxied: bool) -> (Cluster, Option<FaultProxy>) {
        let processor_settings = options.processor;
        let processor_metrics = options.processor_metrics;
        let failover_metrics = options.failover_metrics;
        let failover_settings = options.failover;
        let dir = tempfile::tempdir().expect("tempdir");
        // The cache's address is needed by registry before cache starts.
        let cache_listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let cache_addr = cache_listener.local_addr().expect("addr");
        let cache_url = format!("http://{cache_addr}");
        let proxy = if proxied {
            Some(FaultProxy::start(cache_addr).await)
        } else {
            None
        };
        let agents_cache = proxy.as_ref().map_or(cache_url.clone(), FaultProxy::url);
        let registry = start_registry_metered(
            dir.path().join("registry"),
            Some(agents_cache),
            options.registry,
            options.registry_metrics,
        )
        .await;

        let registry_url = registry.url.clone();
        let cache_dir = options
            .cache_dir
            .unwrap_or_else(|| dir.path().join("cache"));
        let cache_shutdown = CancellationToken::new();
        let mut cache_config = ServiceConfig::in_process(&cache_dir);
        cache_config.registry = Some(registry_url.clone());
        cache_config.metrics_listen = options.cache_metrics;
        let future = cache_svc::run(
            cache_config,
            options.cache,
            cache_listener,
            cache_shutdown.clone(),
        );
        let cache = Running {
            url: cache_url.clone(),
            data_dir: cache_dir,
            shutdown: cache_shutdown,
            task: tokio::spawn(async move {
                if let Err(err) = future.await {
                    panic!("cache-svc failed: {err}");
                }
            }),
        };

        let (r, c) = (registry_url.clone(), cache_url.clone());
        let processor = start(
            "processor-svc",
            options
                .processor_dir
                .unwrap_or_else(|| dir.path().join("processor")),
            move |mut cfg, l, s| {
                cfg.registry = Some(r);
                cfg.cache = Some(c);
                cfg.metrics_listen = processor_metrics;
                processor_svc::run(cfg, processor_settings, l, s)
            },
        )
        .await;
        let (r, p, c) = (
            registry_url.clone(),
            processor.url.clone(),
            cache_url.clone(),
        );
        let failover = start(
            "failover-svc",
            options
                .failover_dir
                .unwrap_or_else(|| dir.path().join("failover")),
            move |mut cfg, l, s| {
                cfg.registry = Some(r);
                cfg.processor = Some(p);
                cfg.cache = Some(c);
                cfg.metrics_listen = failover_metrics;
                failover_svc::run(cfg, failover_settings, l, s)
            },
        )
        .await;
        for running in [&registry, &cache, &processor, &failover] {
            crate::wait_serving(&running.url).await;
        }
        let cluster = Cluster {
            registry,
            cache,
            processor,
            failover,
            _dir: dir,
        };
        (cluster, proxy)
    }

    /// Stops failover-svc and starts it again on its data directory with
    /// `settings` (at a new URL): its unfinished jobs resume.
    pub async fn restart_failover(&mut self, settings: failover_svc::Settings) {
        self.failover.shutdown.cancel();
        let _ = (&mut self.failover.task).await;
        let (r, p, c) = (
            self.registry.url.clone(),
            self.processor.url.clone(),
            self.cache.url.clone(),
        );
        self.failover = start(
            "failover-svc",
            self.failover.data_dir.clone(),
            move |mut cfg, l, s| {
                cfg.registry = Some(r);
                cfg.processor = Some(p);
                cfg.cache = Some(c);
                failover_svc::run(cfg, settings, l, s)
            },
        )
        .await;
        crate::wait_serving(&self.failover.url).await;
    }

    /// Stops every service.
    pub async fn stop(self) {
        self.failover.stop().await;
        self.processor.stop().await;
        self.cache.stop().await;
        self.registry.stop().await;
    }
}
