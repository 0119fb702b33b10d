//! `ferry-loadgen control-bench`: registry-svc's unary calls against the
//! same server's `grpc.health.v1.Health/Check`, the cheapest call a tonic
//! server answers: calls per second at a concurrency of 16 callers over
//! one channel (HTTP/2 multiplexed, as a service's client does), each for a
//! fixed time, min/median/max of 3 rounds, registry-svc as a process with
//! its callers authenticated.

use std::time::{Duration, Instant};

use anyhow::Result;
use ferry_proto::registry::v1 as reg;
use ferry_proto::registry::v1::registry_client::RegistryClient;
use ferry_testkit::insecure::TestChannel;
use ferry_testkit::{bin_path, Insecure, ServiceProcess};
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

use crate::compare_bench::spread;

const CONCURRENCY: usize = 16;

/// Calls per second of `call` from `CONCURRENCY` tasks for `secs`.
async fn rate<F, Fut>(secs: f64, call: F) -> Result<f64>
where
    F: Fn() -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = Result<()>> + Send,
{
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    let t = Instant::now();
    let tasks: Vec<_> = (0..CONCURRENCY)
        .map(|_| {
            let call = call.clone();
            tokio::spawn(async move {
                let mut n = 0u64;
                while Instant::now() < deadline {
                    call().await?;
                    n += 1;
                }
                Ok::<u64, anyhow::Error>(n)
            })
        })
        .collect();
    let mut total = 0;
    for t in tasks {
        total += t.await??;
    }
    Ok(total as f64 / t.elapsed().as_secs_f64())
}

pub async fn run(dir: &std::path::Path, secs: f64) -> Result<()> {
    let insecure = Insecure::new();
    let registry = ServiceProcess::start(
        &insecure,
        bin_path("registry-svc"),
        dir.join("registry"),
        &[],
    );
    let url = registry.url();
    ferry_testkit::wait_serving(&url).await;
    let channel: TestChannel = insecure.at(&url).admin();
    let mut admin = RegistryClient::new(channel.clone());
    admin
        .register_vm(reg::RegisterVmRequest {
            vm: Some(ferry_testkit::vm::vm_spec(
                "vm",
                &[("os", 1 << 30, &dir.join("vm-os.raw"))],
            )),
        })
        .await?;
    let health = HealthClient::new(channel.clone());
    let registry_client = RegistryClient::new(channel);
    let (mut checks, mut gets) = (Vec::new(), Vec::new());
    for _ in 0..3 {
        let h = health.clone();
        checks.push(
            rate(secs, move || {
                let mut h = h.clone();
                async move {
                    h.check(HealthCheckRequest {
                        service: String::new(),
                    })
                    .await?;
                    Ok(())
                }
            })
            .await?,
        );
        let r = registry_client.clone();
        gets.push(
            rate(secs, move || {
                let mut r = r.clone();
                async move {
                    r.get_vm(reg::GetVmRequest { name: "vm".into() }).await?;
                    Ok(())
                }
            })
            .await?,
        );
    }
    let (c, g) = (spread(&checks), spread(&gets));
    println!(
        "registry-svc as a process, {CONCURRENCY} concurrent callers on one channel, {secs} s \
         per round, median (min–max) of 3 rounds, calls/s:"
    );
    println!("| call | calls/s | vs health Check |");
    println!("|---|---|---|");
    println!(
        "| grpc.health.v1.Health/Check | {:.0} ({:.0}–{:.0}) | 1.00× |",
        c.1, c.0, c.2
    );
    println!(
        "| ferry.registry.v1.Registry/GetVm | {:.0} ({:.0}–{:.0}) | {:.2}× |",
        g.1,
        g.0,
        g.2,
        g.1 / c.1.max(f64::MIN_POSITIVE)
    );
    Ok(())
}
