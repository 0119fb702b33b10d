//! `ferry demo`: the four services in this process on loopback, and a walk
//! through protecting a sample VM, printed as it happens.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use ferry_proto::registry::v1 as pb;
use ferry_runtime::CancellationToken;
use tokio::sync::mpsc;

use crate::commands::{client, status};
use crate::embedded::Embedded;
use crate::output;

struct Steps {
    timings: Vec<(String, Duration)>,
}

impl Steps {
    fn begin(&self, n: usize, what: &str) -> Instant {
        println!("\n[{n}] {what}");
        Instant::now()
    }
    fn end(&mut self, what: &str, started: Instant) {
        let took = started.elapsed();
        println!("    done in {} ms", took.as_millis());
        self.timings.push((what.to_string(), took));
    }
}

fn sparse_image(path: &Path, size: u64) -> Result<()> {
    let file = std::fs::File::create(path).with_context(|| format!("create {}", path.display()))?;
    file.set_len(size)
        .with_context(|| format!("size {}", path.display()))?;
    Ok(())
}

/// Runs the demo; with `data_dir` None, in a temporary directory removed after.
pub async fn run(data_dir: Option<PathBuf>) -> Result<()> {
    let temp;
    let dir = match data_dir {
        Some(d) => {
            std::fs::create_dir_all(&d).with_context(|| format!("create {}", d.display()))?;
            d
        }
        None => {
            temp = tempfile::tempdir().context("create a temporary directory")?;
            temp.path().to_path_buf()
        }
    };
    let total = Instant::now();
    let mut steps = Steps {
        timings: Vec::new(),
    };

    println!(
        "Ferry demo: all four services in this process, data under {}",
        dir.display()
    );
    let t = steps.begin(
        1,
        "starting registry-svc, cache-svc, processor-svc, failover-svc",
    );
    let shutdown = CancellationToken::new();
    let services = Embedded::start(&dir, "127.0.0.1", 0, shutdown).await?;
    for (name, url) in services.urls() {
        println!("    {name:<10} {url}  SERVING");
    }
    steps.end("start the services", t);

    let result = walk(&services, &dir, &mut steps).await;
    let stopped = services.stop().await;
    result?;
    stopped?;

    println!("\nSummary");
    for (what, took) in &steps.timings {
        println!("    {:<44} {:>6} ms", what, took.as_millis());
    }
    println!(
        "    {:<44} {:>6} ms",
        "whole demo",
        total.elapsed().as_millis()
    );
    println!(
        "\nThe data path (write capture by the agent, the cache, recovery points, failover) \
         arrives with later releases; this demo shows the control plane."
    );
    Ok(())
}

async fn walk(services: &Embedded, dir: &Path, steps: &mut Steps) -> Result<()> {
    let url = services.registry.as_str();
    let mut c = client(url)?;
    let err = status(url);

    let t = steps.begin(2, "regions the registry knows");
    let regions = c
        .list_regions(pb::ListRegionsRequest {})
        .await
        .map_err(&err)?
        .into_inner();
    println!("    {}", regions.regions.join(" "));
    steps.end("list regions", t);

    let t = steps.begin(3, "registering VM demo-web (eastus) with two sparse disks");
    let images = dir.join("source-images");
    std::fs::create_dir_all(&images)?;
    let os = images.join("demo-web-os.raw");
    let data = images.join("demo-web-data.raw");
    sparse_image(&os, 64 << 20)?;
    sparse_image(&data, 32 << 20)?;
    let disk = |id: &str, size: u64, role: pb::DiskRole, path: &Path| pb::Disk {
        id: id.into(),
        size_bytes: size,
        role: role as i32,
        storage: pb::DiskStorage::Managed as i32,
        source_path: path.display().to_string(),
    };
    let vm = c
        .register_vm(pb::RegisterVmRequest {
            vm: Some(pb::Vm {
                name: "demo-web".into(),
                source_region: "eastus".into(),
                resource_group: "demo-rg".into(),
                virtual_network: "demo-vnet".into(),
                subnet: "default".into(),
                availability_set: "demo-avset".into(),
                nics: vec![pb::Nic {
                    name: "nic0".into(),
                    private_ip: "10.0.0.4".into(),
                }],
                disks: vec![
                    disk("os", 64 << 20, pb::DiskRole::Os, &os),
                    disk("data", 32 << 20, pb::DiskRole::Data, &data),
                ],
                registered_at: None,
            }),
        })
        .await
        .map_err(&err)?
        .into_inner();
    for d in &vm.disks {
        println!(
            "    disk {:<5} {:>8} {:<4} {}",
            d.id,
            output::bytes(d.size_bytes),
            output::role(d.role),
            d.source_path
        );
    }
    steps.end("register the VM", t);

    let t = steps.begin(
        4,
        "creating policy demo-5s (a crash-consistent point every 5 s, 1 h retention)",
    );
    c.create_policy(pb::CreatePolicyRequest {
        policy: Some(pb::ReplicationPolicy {
            name: "demo-5s".into(),
            crash_consistent_interval: Some(ferry_runtime::time::to_duration(Duration::from_secs(
                5,
            ))),
            recovery_point_retention: Some(ferry_runtime::time::to_duration(Duration::from_secs(
                3600,
            ))),
            ..Default::default()
        }),
    })
    .await
    .map_err(&err)?;
    steps.end("create the policy", t);

    let t = steps.begin(5, "watching demo-web's protected item");
    let mut watch = c
        .watch_protected_items(pb::WatchProtectedItemsRequest {
            vm_name: "demo-web".into(),
        })
        .await
        .map_err(&err)?
        .into_inner();
    let (events_tx, mut events) = mpsc::channel(64);
    let watcher = tokio::spawn(async move {
        while let Ok(Some(ev)) = watch.message().await {
            println!("    [watch] {}", crate::watch::line(&ev));
            let seen = (ev.kind(), ev.item.as_ref().map(|i| i.state()));
            if events_tx.send(seen).await.is_err() {
                break;
            }
        }
    });
    wait_event(&mut events, pb::EventKind::Synced, None).await?;
    steps.end("open the watch", t);

    let t = steps.begin(6, "enabling replication of demo-web into westus");
    let item = c
        .enable_replication(pb::EnableReplicationRequest {
            vm_name: "demo-web".into(),
            target_region: "westus".into(),
            policy_name: "demo-5s".into(),
            ..Default::default()
        })
        .await
        .map_err(&err)?
        .into_inner();
    let target = item
        .target
        .clone()
        .ok_or_else(|| anyhow!("the item has no target"))?;
    println!("    target resource group    {}", target.resource_group);
    println!("    target virtual network   {}", target.virtual_network);
    println!("    target subnet            {}", target.subnet);
    println!("    target availability set  {}", target.availability_set);
    println!("    cache storage (eastus)   {}", target.cache_storage);
    for r in &target.replica_disks {
        println!("    replica managed disk     {} <- {}", r.name, r.disk_id);
    }
    println!("    network mapping          {}", target.network_mapping);
    println!(
        "    reverse network mapping  {}",
        target.reverse_network_mapping
    );
    wait_event(
        &mut events,
        pb::EventKind::Upserted,
        Some(pb::ReplicationState::Enabling),
    )
    .await?;
    steps.end("enable replication", t);

    let t = steps.begin(7, "the agent of demo-web registers");
    let grant = c
        .register_agent(pb::RegisterAgentRequest {
            vm_name: "demo-web".into(),
            hostname: "demo-web".into(),
            group_address: "127.0.0.1:20004".into(),
        })
        .await
        .map_err(&err)?
        .into_inner();
    println!("    cache endpoint {}", grant.cache_endpoint);
    println!("    epoch {}, {} disks", grant.epoch, grant.disks.len());
    println!("    a credential scoped to demo-web was issued (registry keeps only its hash)");
    steps.end("register the agent", t);

    let t = steps.begin(8, "the protected item");
    let item = c
        .get_protected_item(pb::GetProtectedItemRequest {
            vm_name: "demo-web".into(),
        })
        .await
        .map_err(&err)?
        .into_inner();
    for line in output::item_text(&item).lines() {
        println!("    {line}");
    }
    steps.end("show the item", t);

    let t = steps.begin(9, "disabling replication of demo-web");
    c.disable_replication(pb::DisableReplicationRequest {
        vm_name: "demo-web".into(),
    })
    .await
    .map_err(&err)?;
    wait_event(
        &mut events,
        pb::EventKind::Upserted,
        Some(pb::ReplicationState::Disabling),
    )
    .await?;
    wait_event(
        &mut events,
        pb::EventKind::Removed,
        Some(pb::ReplicationState::Disabling),
    )
    .await?;
    println!("    the watch saw DISABLING, then REMOVED");
    steps.end("disable replication", t);
    watcher.abort();
    Ok(())
}

type Seen = (pb::EventKind, Option<pb::ReplicationState>);

/// Waits (up to 10 s) for the watch to report `kind` with `state`.
async fn wait_event(
    events: &mut mpsc::Receiver<Seen>,
    kind: pb::EventKind,
    state: Option<pb::ReplicationState>,
) -> Result<()> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match tokio::time::timeout_at(deadline, events.recv()).await {
            Ok(Some(seen)) if seen == (kind, state) => return Ok(()),
            Ok(Some(_)) => {}
            Ok(None) => bail!("the watch stream ended early"),
            Err(_) => bail!("the watch did not report {kind:?} {state:?} within 10 s"),
        }
    }
}
