//! The embedded default: all four services in this process, each on its own
//! listener and data directory, wired to one another.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use ferry_runtime::config::Security;
use ferry_runtime::security::ClusterSecret;
use ferry_runtime::{CancellationToken, ServiceConfig};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// Whether the embedded services check their callers.
pub enum Guard {
    /// Nothing checked: the program embedding them is their only caller
    /// (`ferry demo`, on loopback).
    InProcess,
    /// Every call checked: services prove who they are with tokens from
    /// `secret`; registry makes (or reads) the first admin token in
    /// `bootstrap_token_file`.
    Checked {
        secret: ClusterSecret,
        bootstrap_token_file: std::path::PathBuf,
    },
}

/// The four running services.
pub struct Embedded {
    pub registry: String,
    pub cache: String,
    pub processor: String,
    pub failover: String,
    shutdown: CancellationToken,
    tasks: Vec<(&'static str, JoinHandle<Result<(), String>>)>,
}

fn spawn<E: std::fmt::Display>(
    fut: impl std::future::Future<Output = Result<(), E>> + Send + 'static,
) -> JoinHandle<Result<(), String>> {
    tokio::spawn(async move { fut.await.map_err(|e| e.to_string()) })
}

async fn bind(host: &str, port: u16) -> Result<(TcpListener, String)> {
    let listener = TcpListener::bind((host, port))
        .await
        .with_context(|| format!("cannot listen on {host}:{port}"))?;
    let addr = listener.local_addr()?;
    Ok((listener, format!("http://{addr}")))
}

impl Embedded {
    /// Starts the services under `data_dir` on `host`, at `base_port` and the
    /// three ports after it (0: any free ports), and waits until each reports
    /// SERVING. `shutdown` stops them all.
    pub async fn start(
        data_dir: &Path,
        host: &str,
        base_port: u16,
        shutdown: CancellationToken,
        guard: Guard,
    ) -> Result<Embedded> {
        let port = |i: u16| if base_port == 0 { 0 } else { base_port + i };
        let (rl, registry) = bind(host, port(0)).await?;
        let (cl, cache) = bind(host, port(1)).await?;
        let (pl, processor) = bind(host, port(2)).await?;
        let (fl, failover) = bind(host, port(3)).await?;
        let (security, bootstrap) = match guard {
            Guard::InProcess => (Security::in_process(), None),
            Guard::Checked {
                secret,
                bootstrap_token_file,
            } => (
                Security::plaintext_enforced(secret),
                Some(bootstrap_token_file),
            ),
        };
        let config = |name: &str| {
            let mut config = ServiceConfig::in_process(data_dir.join(name));
            config.security = security.clone();
            config
        };

        let mut tasks = Vec::new();
        let mut rc = config("registry");
        rc.cache = Some(cache.clone());
        let settings = registry_svc::Settings {
            bootstrap_token_file: bootstrap,
            ..Default::default()
        };
        let rc = registry_svc::Config::new(rc, settings)?;
        tasks.push((
            "registry-svc",
            spawn(registry_svc::serve(rc, rl, shutdown.clone())),
        ));
        let mut cc = config("cache");
        cc.registry = Some(registry.clone());
        tasks.push((
            "cache-svc",
            spawn(cache_svc::run(cc, Default::default(), cl, shutdown.clone())),
        ));
        let mut pc = config("processor");
        pc.registry = Some(registry.clone());
        pc.cache = Some(cache.clone());
        tasks.push((
            "processor-svc",
            spawn(processor_svc::run(
                pc,
                Default::default(),
                pl,
                shutdown.clone(),
            )),
        ));
        let mut fc = config("failover");
        fc.registry = Some(registry.clone());
        fc.processor = Some(processor.clone());
        fc.cache = Some(cache.clone());
        tasks.push((
            "failover-svc",
            spawn(failover_svc::run(
                fc,
                Default::default(),
                fl,
                shutdown.clone(),
            )),
        ));

        let embedded = Embedded {
            registry,
            cache,
            processor,
            failover,
            shutdown,
            tasks,
        };
        embedded.wait_serving(Duration::from_secs(30)).await?;
        Ok(embedded)
    }

    /// The four (name, URL) pairs.
    pub fn urls(&self) -> [(&'static str, &str); 4] {
        [
            ("registry", &self.registry),
            ("cache", &self.cache),
            ("processor", &self.processor),
            ("failover", &self.failover),
        ]
    }

    async fn wait_serving(&self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        for (name, url) in self.urls() {
            loop {
                if serving(url).await {
                    break;
                }
                if let Some((svc, _)) = self.tasks.iter().find(|(_, t)| t.is_finished()) {
                    bail!("{svc} stopped while starting");
                }
                if Instant::now() >= deadline {
                    bail!("{name} at {url} did not report SERVING within {timeout:?}");
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        Ok(())
    }

    /// Stops every service and reports any that failed.
    pub async fn stop(self) -> Result<()> {
        self.shutdown.cancel();
        let mut failures = Vec::new();
        for (name, task) in self.tasks {
            match task.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => failures.push(format!("{name}: {e}")),
                Err(e) => failures.push(format!("{name}: {e}")),
            }
        }
        if failures.is_empty() {
            Ok(())
        } else {
            Err(anyhow!("{}", failures.join("; ")))
        }
    }
}

/// Whether the server at `url` reports SERVING.
pub async fn serving(url: &str) -> bool {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;
    let Ok(channel) = ferry_runtime::connect(url, &crate::credentials::get()) else {
        return false;
    };
    let request = tonic_health::pb::HealthCheckRequest {
        service: String::new(),
    };
    matches!(
        HealthClient::new(channel).check(request).await,
        Ok(r) if r.get_ref().status == ServingStatus::Serving as i32
    )
}
