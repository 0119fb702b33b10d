//! Regions with services of their own: registry places an item on its
//! source region's cache and its target region's processor
//! (SetRegionServices); its agent streams to that cache, and only that
//! processor applies it, tailing that cache. A second cache serves eastus
//! and a second processor naming itself (`[processor] endpoint`) westus; a
//! VM enabled before keeps the defaults, one enabled after goes to
//! eastus's cache and westus's processor: each has its log and points on
//! its own services and none on the others; failover-svc reads each from
//! its own processor.

mod common;

use std::time::Duration;

use ferry_proto::cache::v1 as cache;
use ferry_proto::cache::v1::cache_client::CacheClient;
use ferry_proto::registry::v1 as reg;
use ferry_proto::registry::v1::registry_client::RegistryClient;
use ferry_runtime::{CancellationToken, ServiceConfig};
use ferry_testkit::points::cut_latest;
use ferry_testkit::{protect_vm_with, protected_item, run_tool, wait_for, wait_serving, Cluster};

const SIZE: u64 = 4 << 20;

/// A source image with data, under `dir`.
fn image(dir: &std::path::Path, name: &str) -> std::path::PathBuf {
    let path = dir.join(format!("{name}.raw"));
    let p = path.to_str().unwrap();
    run_tool("qemu-img", &["create", "-f", "raw", p, &SIZE.to_string()]);
    run_tool("qemu-io", &["-f", "raw", "-c", "write -P 0x5a 0 1M", p]);
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_processor_applies_only_the_items_placed_on_it() {
    let cluster = Cluster::start().await;
    let registry = cluster.registry.url.clone();
    let dir = tempfile::tempdir().unwrap();

    // eastus's own cache.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let east = format!("http://{}", listener.local_addr().unwrap());
    let mut config = ServiceConfig::in_process(dir.path().join("east"));
    config.registry = Some(registry.clone());
    let stop_cache = CancellationToken::new();
    let cache = tokio::spawn(cache_svc::run(
        config,
        cache_svc::Settings {
            endpoint: east.clone(),
            ..Default::default()
        },
        listener,
        stop_cache.clone(),
    ));
    wait_serving(&east).await;

    // westus's own processor.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let west = format!("http://{}", listener.local_addr().unwrap());
    let mut config = ServiceConfig::in_process(dir.path().join("west"));
    config.registry = Some(registry.clone());
    config.cache = Some(cluster.cache.url.clone());
    let stop = CancellationToken::new();
    let running = tokio::spawn(processor_svc::run(
        config,
        processor_svc::Settings {
            endpoint: west.clone(),
            ..Default::default()
        },
        listener,
        stop.clone(),
    ));
    wait_serving(&west).await;

    common::policy(&registry, "fast", Duration::from_secs(1)).await;
    let before = image(dir.path(), "before");
    protect_vm_with(&registry, "before", &[("os", SIZE, &before)], "fast").await;
    RegistryClient::connect(registry.clone())
        .await
        .unwrap()
        .set_region_services(reg::SetRegionServicesRequest {
            services: Some(reg::RegionServices {
                region: "westus".into(),
                cache_endpoint: String::new(),
                processor_endpoint: west.clone(),
            }),
        })
        .await
        .unwrap();
    RegistryClient::connect(registry.clone())
        .await
        .unwrap()
        .set_region_services(reg::SetRegionServicesRequest {
            services: Some(reg::RegionServices {
                region: "eastus".into(),
                cache_endpoint: east.clone(),
                processor_endpoint: String::new(),
            }),
        })
        .await
        .unwrap();
    let placed = image(dir.path(), "placed");
    let item = protect_vm_with(&registry, "placed", &[("os", SIZE, &placed)], "fast").await;
    assert_eq!(item.processor_endpoint, west);
    assert_eq!(item.cache_endpoint, east);

    let (a, _) = common::protected_agent(&registry, "before", &dir.path().join("a")).await;
    let (b, _) = common::protected_agent(&registry, "placed", &dir.path().join("b")).await;
    for vm in ["before", "placed"] {
        wait_for(
            &format!("{vm} PROTECTED"),
            Duration::from_secs(60),
            || async {
                protected_item(&registry, vm)
                    .await
                    .filter(|i| i.state() == reg::ReplicationState::Protected)
            },
        )
        .await;
    }
    // Each on its own processor, and not on the other.
    let default = cluster.processor.url.clone();
    cut_latest(&default, "before").await.unwrap();
    cut_latest(&west, "placed").await.unwrap();
    for (processor, vm) in [(&default, "placed"), (&west, "before")] {
        let err = cut_latest(processor, vm).await.unwrap_err();
        assert_eq!(
            err.code(),
            tonic::Code::NotFound,
            "{vm} on {processor}: {err:?}"
        );
    }
    // Each log on its own cache only.
    let log = |url: String, vm: &'static str| async move {
        CacheClient::connect(url)
            .await
            .unwrap()
            .get_log_info(cache::GetLogInfoRequest { vm_name: vm.into() })
            .await
    };
    assert!(log(cluster.cache.url.clone(), "before").await.is_ok());
    assert!(log(east.clone(), "placed").await.is_ok());
    for (url, vm) in [
        (cluster.cache.url.clone(), "placed"),
        (east.clone(), "before"),
    ] {
        let err = log(url.clone(), vm).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::NotFound, "{vm} on {url}: {err:?}");
    }

    // failover-svc, configured with the default processor, reads each VM's
    // points from the processor its item is placed on.
    common::isolated_network(cluster.failover.url.as_str()).await;
    for vm in ["before", "placed"] {
        let job = common::test_failover(
            &cluster.failover.url,
            vm,
            ferry_proto::failover::v1::point_choice::Choice::Latest(true),
        )
        .await;
        assert_eq!(job.verified_disks.len(), 1, "{job:?}");
    }

    a.stop(Duration::from_secs(5)).await.unwrap();
    b.stop(Duration::from_secs(5)).await.unwrap();
    stop.cancel();
    let _ = running.await;
    stop_cache.cancel();
    let _ = cache.await;
    cluster.stop().await;
}
