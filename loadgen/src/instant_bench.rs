//! `ferry-loadgen instant-bench`: how long until a failed-over VM runs, on
//! this machine's libvirtd (software emulation), for a disk half written
//! (every other MiB): a test failover that materializes the disks first,
//! then an instant one (overlays on the point served over NBD, hydration
//! after). "Running" is the guest's FERRY-READY on its serial console,
//! timed from the request. Each size in `--gib` is a run of its own, so
//! the instant figure can be seen flat in disk size. Prints figures and
//! ratios; asserts nothing.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use ferry_proto::failover::v1 as fo;
use ferry_proto::failover::v1::failover_client::FailoverClient;
use ferry_proto::registry::v1 as reg;
use ferry_testkit::libvirt::{build_guest, daemons, forget, URI};

use crate::failover_bench::{agent, half_written};

const PREFIX: &str = "ferry.westus.";

/// One size's figures, in seconds.
struct Figures {
    materialized_ready: f64,
    materialized_job: f64,
    instant_ready: f64,
    instant_job: f64,
}

pub async fn run(dir: &Path, sizes_gib: &[u64]) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    daemons();
    forget(PREFIX);
    let guest = dir.join("guest");
    build_guest(&guest).map_err(anyhow::Error::msg)?;
    // libvirt's QEMU user reads the overlays and the kernel here.
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))?;
    let mut figures = Vec::new();
    for &gib in sizes_gib {
        let run = dir.join(format!("{gib}g"));
        std::fs::create_dir_all(&run)?;
        std::fs::set_permissions(&run, std::fs::Permissions::from_mode(0o755))?;
        let f = one(&run, &guest, gib << 30).await;
        forget(PREFIX);
        figures.push((gib, f?));
    }
    println!("failover until the VM runs (FERRY-READY on its console), libvirt, QEMU TCG:");
    for (gib, f) in &figures {
        println!(
            "  {gib} GiB disk, {} MiB written: materialize-first ready in {:.2} s (job {:.2} s); \
             instant ready in {:.2} s ({:.1}x sooner), hydrated in {:.2} s",
            gib << 9,
            f.materialized_ready,
            f.materialized_job,
            f.instant_ready,
            f.materialized_ready / f.instant_ready,
            f.instant_job
        );
    }
    Ok(())
}

async fn one(dir: &Path, guest: &Path, size: u64) -> Result<Figures> {
    let source = dir.join("source.raw");
    half_written(&source, size)?;
    let nbd = std::net::TcpListener::bind("127.0.0.1:0")?;
    let cluster = ferry_testkit::Cluster::start_options(ferry_testkit::ClusterOptions {
        failover: failover_svc::Settings {
            libvirt: Some(failover_svc::libvirt::Settings {
                regions: [("westus".to_string(), vec![URI.to_string()])].into(),
                domain_type: "qemu".into(),
                nbd_listener: Some(Arc::new(nbd)),
                ..Default::default()
            }),
            ..Default::default()
        },
        failover_dir: Some(dir.join("failover")),
        ..Default::default()
    })
    .await;
    let registry = cluster.registry.url.clone();
    let day = Duration::from_secs(86400);
    ferry_testkit::create_policy(&registry, "bench", Duration::from_secs(1), day, day, day).await;
    let guest = std::fs::canonicalize(guest)?;
    let mut spec = ferry_testkit::vm_spec("vm", &[("os", size, &source)]);
    spec.shape = Some(reg::VmShape {
        vcpus: 1,
        memory_mib: 256,
        kernel: guest.join("vmlinuz").display().to_string(),
        initrd: guest.join("initrd.gz").display().to_string(),
        cmdline: "console=ttyS0 panic=-1 quiet ferry.stay=1".into(),
        ready_marker: "FERRY-READY".into(),
        ..Default::default()
    });
    ferry_testkit::protect_spec(&registry, spec, "bench").await;
    let agent = agent(&registry, dir).await?;
    ferry_testkit::wait_for("PROTECTED", Duration::from_secs(1800), || async {
        ferry_testkit::protected_item(&registry, "vm")
            .await
            .filter(|i| i.state() == reg::ReplicationState::Protected)
    })
    .await;
    agent.stream.flushed().await;
    let point = ferry_testkit::points::cut_latest(&cluster.processor.url, "vm")
        .await
        .map_err(|s| anyhow::anyhow!("cut: {s}"))?;
    let url = cluster.failover.url.clone();
    let mut f = FailoverClient::connect(url.clone()).await?;
    f.create_network(fo::CreateNetworkRequest {
        network: Some(fo::Network {
            region: "westus".into(),
            resource_group: "drill".into(),
            name: "drill".into(),
            subnets: vec![fo::Subnet {
                name: "default".into(),
                address_prefix: "10.213.13.0/24".into(),
            }],
        }),
    })
    .await?;
    let (materialized_ready, materialized_job) = drill(&mut f, &point.id, false).await?;
    let (instant_ready, instant_job) = drill(&mut f, &point.id, true).await?;
    let _ = agent.stop(Duration::from_secs(1)).await;
    cluster.stop().await;
    Ok(Figures {
        materialized_ready,
        materialized_job,
        instant_ready,
        instant_job,
    })
}

/// A test failover to `point` (instant or not), then its cleanup: seconds
/// from the request to FERRY-READY on the console, and to the job's end.
async fn drill(
    f: &mut FailoverClient<tonic::transport::Channel>,
    point: &str,
    instant: bool,
) -> Result<(f64, f64)> {
    let t = Instant::now();
    let job = f
        .start_failover(fo::StartFailoverRequest {
            target: Some(fo::start_failover_request::Target::VmName("vm".into())),
            kind: fo::FailoverKind::Test as i32,
            point: Some(fo::PointChoice {
                choice: Some(fo::point_choice::Choice::PointId(point.into())),
            }),
            test_network: "drill".into(),
            request_id: String::new(),
            instant,
            alternate_location: false,
        })
        .await?
        .into_inner();
    // The console's path is known once create-vm has recorded the VM.
    let mut ready = None;
    let mut jobs = f
        .watch_job(fo::WatchJobRequest { id: job.id.clone() })
        .await?
        .into_inner();
    let console = loop {
        let vms = f
            .list_target_vms(fo::ListTargetVmsRequest::default())
            .await?
            .into_inner()
            .vms;
        if let Some(vm) = vms.into_iter().find(|v| v.name == "vm-test") {
            break vm.console_path;
        }
        if t.elapsed() > Duration::from_secs(1800) {
            bail!("the VM was not created in 30 minutes");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let watch = tokio::spawn(async move {
        let mut last = None;
        while let Ok(Some(j)) = jobs.message().await {
            last = Some(j);
        }
        last
    });
    while ready.is_none() {
        let text = std::fs::read_to_string(&console).unwrap_or_default();
        if text.contains("FERRY-READY") {
            ready = Some(t.elapsed().as_secs_f64());
        } else if watch.is_finished() {
            bail!("the job ended before the guest was ready; console {console}");
        } else {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let job = watch.await?.context("the job sent nothing")?;
    let done = t.elapsed().as_secs_f64();
    if job.state != fo::JobState::Succeeded as i32 {
        bail!("failover failed: {}", job.error);
    }
    let cleanup = f
        .cleanup_test_failover(fo::CleanupTestFailoverRequest {
            target: Some(fo::cleanup_test_failover_request::Target::VmName(
                "vm".into(),
            )),
            request_id: String::new(),
        })
        .await?
        .into_inner();
    let mut stream = f
        .watch_job(fo::WatchJobRequest { id: cleanup.id })
        .await?
        .into_inner();
    while stream.message().await?.is_some() {}
    Ok((ready.unwrap_or_default(), done))
}
