//! `ferry demo`: the four services in this process on loopback, a sample VM
//! with two disks written through its agent's NBD export, recovery points, a
//! test failover and its cleanup, an unplanned failover to an earlier point
//! checked byte for byte against the source at that point, commit,
//! re-protect back to the original region and failback into the original
//! disks, printed as it happens, with the figures at the end.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use ferry_proto::registry::v1 as pb;
use ferry_runtime::CancellationToken;
use tokio::sync::mpsc;

use ferry_agent::run::{Agent, AgentOptions};
use ferry_proto::failover::v1 as fo;
use ferry_proto::failover::v1::failover_client::FailoverClient;
use ferry_proto::processor::v1 as proc_pb;
use ferry_runtime::PeerChannel;

use crate::commands::{client, status};
use crate::embedded::{Embedded, Guard};
use crate::nbd_client::NbdClient;
use crate::output;
use crate::recovery::{failover_client, follow_job, processor_client};

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
        "Ferry demo: all four services in this process, plaintext on loopback (127.0.0.1) \
         with nothing checked, as this program is their only caller; data under {}",
        dir.display()
    );
    let t = steps.begin(
        1,
        "starting registry-svc, cache-svc, processor-svc, failover-svc",
    );
    let shutdown = CancellationToken::new();
    let services = Embedded::start(&dir, "127.0.0.1", 0, shutdown, Guard::InProcess).await?;
    for (name, url) in services.urls() {
        println!("    {name:<10} {url}  SERVING");
    }
    steps.end("start the services", t);

    let result = walk(&services, &dir, &mut steps).await;
    let stopped = services.stop().await;
    let figures = result?;
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
    println!("\nFigures");
    println!(
        "    RPO before the failover          {}",
        output::duration(&figures.rpo)
    );
    println!(
        "    unplanned failover                {:.2} s",
        figures.failover_secs
    );
    println!(
        "    disks materialized                {} at {:.0} MiB/s",
        output::bytes(figures.materialized),
        figures.materialized as f64 / (1 << 20) as f64 / figures.failover_secs.max(1e-9)
    );
    println!(
        "    re-protect: crossed regions        {} of {} of disks",
        mib(figures.reprotect_crossed),
        output::bytes(figures.disk_bytes)
    );
    println!(
        "    failback: written into originals  {}",
        mib(figures.failback_written)
    );
    for (round, mib_s) in ["A", "B"].iter().zip(&figures.ingest_mib_s) {
        println!("    round {round}: NBD write to durable in cache {mib_s:.0} MiB/s");
    }
    Ok(())
}

/// A measured byte count, for people.
fn mib(n: u64) -> String {
    format!("{:.2} MiB", n as f64 / (1u64 << 20) as f64)
}

/// The shadow copies of the source images at a moment.
struct Shadow {
    os: PathBuf,
    data: PathBuf,
}

fn shadow(images: &Path, tag: &str) -> Result<Shadow> {
    let copy = |id: &str| -> Result<PathBuf> {
        let to = images.join(format!("demo-web-{id}.{tag}.raw"));
        std::fs::copy(images.join(format!("demo-web-{id}.raw")), &to)
            .with_context(|| format!("copy the {id} image"))?;
        Ok(to)
    };
    Ok(Shadow {
        os: copy("os")?,
        data: copy("data")?,
    })
}

/// Whether two files hold the same bytes.
fn same_bytes(a: &Path, b: &Path) -> Result<bool> {
    use std::io::Read;
    let mut fa = std::fs::File::open(a).with_context(|| format!("open {}", a.display()))?;
    let mut fb = std::fs::File::open(b).with_context(|| format!("open {}", b.display()))?;
    if fa.metadata()?.len() != fb.metadata()?.len() {
        return Ok(false);
    }
    let (mut ba, mut bb) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
    loop {
        let n = fa.read(&mut ba)?;
        if n == 0 {
            return Ok(true);
        }
        fb.read_exact(&mut bb[..n])?;
        if ba[..n] != bb[..n] {
            return Ok(false);
        }
    }
}

/// Writes `len` bytes of `byte` at `offset` of `disk` through the agent's
/// NBD export, 1 MiB per request, and flushes.
async fn nbd_write(addr: &str, disk: &str, offset: u64, len: u64, byte: u8) -> Result<()> {
    let mut c = NbdClient::connect(addr, disk).await?;
    if offset + len > c.size {
        bail!(
            "{len} bytes at {offset} do not fit export {disk} ({} bytes)",
            c.size
        );
    }
    let block = vec![byte; 1 << 20];
    let mut at = offset;
    while at < offset + len {
        let n = (1u64 << 20).min(offset + len - at);
        c.write(at, &block[..n as usize]).await?;
        at += n;
    }
    c.flush().await?;
    c.disconnect().await
}

async fn walk(services: &Embedded, dir: &Path, steps: &mut Steps) -> Result<Figures> {
    let url = services.registry.as_str();
    let mut c = client(url)?;
    let err = status(url);
    let mut figures = Figures::default();

    let t = steps.begin(2, "registering VM demo-web (eastus) with two disks");
    let images = dir.join("source-images");
    std::fs::create_dir_all(&images)?;
    let os = images.join("demo-web-os.raw");
    let data = images.join("demo-web-data.raw");
    sparse_image(&os, 64 << 20)?;
    sparse_image(&data, 32 << 20)?;
    {
        // Something for initial replication to copy: 8 MiB at the start of os.
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&os)?;
        f.write_all_at(&vec![0x42u8; 8 << 20], 0)?;
    }
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
                    mac_address: String::new(),
                }],
                disks: vec![
                    disk("os", 64 << 20, pb::DiskRole::Os, &os),
                    disk("data", 32 << 20, pb::DiskRole::Data, &data),
                ],
                registered_at: None,
                shape: None,
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
        3,
        "policy demo-1s: a crash-consistent point every second, kept an hour",
    );
    let secs = |n| Some(ferry_runtime::time::to_duration(Duration::from_secs(n)));
    c.create_policy(pb::CreatePolicyRequest {
        policy: Some(pb::ReplicationPolicy {
            name: "demo-1s".into(),
            crash_consistent_interval: secs(1),
            recovery_point_retention: secs(3600),
            keep_all_points_for: secs(3600),
            ..Default::default()
        }),
    })
    .await
    .map_err(&err)?;
    steps.end("create the policy", t);

    let mut watch = c
        .watch_protected_items(pb::WatchProtectedItemsRequest {
            vm_name: "demo-web".into(),
        })
        .await
        .map_err(&err)?
        .into_inner();
    let (events_tx, mut events) = mpsc::channel(64);
    let watcher = tokio::spawn(async move {
        let mut last = None;
        while let Ok(Some(ev)) = watch.message().await {
            let state = ev.item.as_ref().map(|i| i.state());
            if state != last {
                println!("    [watch] {}", crate::watch::line(&ev));
                last = state;
            }
            if events_tx.send((ev.kind(), state)).await.is_err() {
                break;
            }
        }
    });
    wait_event(&mut events, pb::EventKind::Synced, None).await?;

    let t = steps.begin(4, "enabling replication of demo-web into westus");
    let item = c
        .enable_replication(pb::EnableReplicationRequest {
            vm_name: "demo-web".into(),
            target_region: "westus".into(),
            policy_name: "demo-1s".into(),
            ..Default::default()
        })
        .await
        .map_err(&err)?
        .into_inner();
    let target = item
        .target
        .clone()
        .ok_or_else(|| anyhow!("the item has no target"))?;
    println!(
        "    target {} / {} / {} / {}",
        target.resource_group, target.virtual_network, target.subnet, target.availability_set
    );
    for r in &target.replica_disks {
        println!("    replica disk {} <- {}", r.name, r.disk_id);
    }
    steps.end("enable replication", t);

    let t = steps.begin(
        5,
        "starting demo-web's agent: NBD export, initial replication",
    );
    let nbd = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let nbd_addr = nbd.local_addr()?.to_string();
    let agent = Agent::start(AgentOptions::new(
        url,
        "demo-web",
        nbd.into(),
        dir.join("agent"),
        vec![images.clone()],
    ))
    .await?;
    println!("    NBD exports nbd://{nbd_addr}/os and nbd://{nbd_addr}/data");
    wait_event_for(
        &mut events,
        pb::EventKind::Upserted,
        Some(pb::ReplicationState::Protected),
        120,
    )
    .await?;
    steps.end("initial replication", t);

    let processor = services.processor.clone();
    let mut points = Vec::new();
    for (round, (os_at, data_at, byte)) in [(16u64, 4u64, 0xa1u8), (16, 10, 0xb1)]
        .into_iter()
        .enumerate()
    {
        let name = if round == 0 { "A" } else { "B" };
        let t = steps.begin(
            6 + round,
            &format!("round {name}: writes through NBD, then a recovery point"),
        );
        let started = Instant::now();
        nbd_write(&nbd_addr, "os", os_at << 20, 4 << 20, byte).await?;
        nbd_write(
            &nbd_addr,
            "data",
            data_at << 20,
            2 << 20,
            byte.wrapping_add(1),
        )
        .await?;
        let last = agent.stream.flushed().await;
        figures
            .ingest_mib_s
            .push(6.0 / started.elapsed().as_secs_f64());
        println!("    6 MiB written at os+{os_at}M, data+{data_at}M; durable in the cache up to sequence {last}");
        let shadow = shadow(&images, name)?;
        let point = processor_client(&processor)?
            .cut_recovery_point(proc_pb::CutRecoveryPointRequest {
                vm_name: "demo-web".into(),
            })
            .await
            .map_err(|s| anyhow!("cut a point: {}", s.message()))?
            .into_inner();
        println!(
            "    point {} at sequence {} ({})",
            point.id,
            point.sequence_cut,
            output::time(&point.time)
        );
        points.push((point, shadow));
        steps.end(&format!("round {name}"), t);
    }
    let listed = processor_client(&processor)?
        .list_recovery_points(proc_pb::ListRecoveryPointsRequest {
            vm_name: "demo-web".into(),
            ..Default::default()
        })
        .await
        .map_err(|s| anyhow!("list points: {}", s.message()))?
        .into_inner()
        .points;
    println!(
        "\n    {} recovery points so far, newest first:",
        listed.len()
    );
    for p in listed.iter().take(5) {
        println!(
            "      {:<8} sequence {:>6}  {}",
            p.id,
            p.sequence_cut,
            output::time(&p.time)
        );
    }
    // The processor reports RPO to registry once a second.
    let deadline = Instant::now() + Duration::from_secs(5);
    while figures.rpo.is_none() && Instant::now() < deadline {
        figures.rpo = c
            .get_protected_item(pb::GetProtectedItemRequest {
                vm_name: "demo-web".into(),
            })
            .await
            .map_err(&err)?
            .into_inner()
            .rpo;
        if figures.rpo.is_none() {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    println!(
        "    RPO reported to registry: {}",
        output::duration(&figures.rpo)
    );

    let mut f = failover_client(&services.failover)?;
    let t = steps.begin(
        8,
        "test failover of demo-web into isolated network demo-drill",
    );
    f.create_network(fo::CreateNetworkRequest {
        network: Some(fo::Network {
            region: "westus".into(),
            resource_group: "demo-drill".into(),
            name: "demo-drill".into(),
            subnets: vec![fo::Subnet {
                name: "default".into(),
                address_prefix: "10.99.0.0/24".into(),
            }],
        }),
    })
    .await
    .map_err(|s| anyhow!("create the drill network: {}", s.message()))?;
    fail_over(
        &mut f,
        fo::FailoverKind::Test,
        fo::point_choice::Choice::LatestProcessed(true),
        "demo-drill".into(),
        String::new(),
        "test failover",
    )
    .await?;
    let vms = target_vms(&mut f).await?;
    let test_vm = vms
        .iter()
        .find(|v| v.test)
        .ok_or_else(|| anyhow!("the test VM is missing"))?;
    println!(
        "    {} up in {}/{} at {} with point {}",
        test_vm.name,
        test_vm.region,
        test_vm.virtual_network,
        test_vm
            .nics
            .first()
            .map(|n| n.private_ip.as_str())
            .unwrap_or("-"),
        test_vm.point_id
    );
    let newest = &points[1].1;
    for (d, shadow) in test_vm.disks.iter().zip([&newest.os, &newest.data]) {
        let same = same_bytes(Path::new(&d.path), shadow)?;
        println!(
            "    {} {} the source at round B",
            d.name,
            if same {
                "is byte-for-byte"
            } else {
                "DIFFERS from"
            }
        );
        if !same {
            bail!(
                "the test failover's disk {} differs from the source",
                d.name
            );
        }
    }
    steps.end("test failover", t);

    let t = steps.begin(9, "cleaning up the test failover");
    let job = f
        .cleanup_test_failover(fo::CleanupTestFailoverRequest {
            target: Some(fo::cleanup_test_failover_request::Target::VmName(
                "demo-web".into(),
            )),
            request_id: String::new(),
        })
        .await
        .map_err(|s| anyhow!("cleanup: {}", s.message()))?
        .into_inner();
    follow_job(&mut f, &job.id, false).await?;
    let left = target_vms(&mut f).await?;
    println!(
        "    target VMs left: {}; test disks removed: {}",
        left.len(),
        test_vm.disks.iter().all(|d| !Path::new(&d.path).exists())
    );
    steps.end("cleanup", t);

    let (older, older_shadow) = &points[0];
    let t = steps.begin(
        10,
        &format!(
            "unplanned failover of demo-web to the earlier point {}",
            older.id
        ),
    );
    let started = Instant::now();
    let job = fail_over(
        &mut f,
        fo::FailoverKind::Unplanned,
        fo::point_choice::Choice::PointId(older.id.clone()),
        String::new(),
        "demo-failover".into(),
        "failover",
    )
    .await?;
    figures.failover_secs = started.elapsed().as_secs_f64();
    figures.materialized = job.bytes_total;
    if let Some(used) = job.points.first() {
        println!(
            "    used point {} ({}), data-loss window {}",
            used.point_id,
            output::time(&used.time),
            output::duration(&used.data_loss_window)
        );
    }
    let vms = target_vms(&mut f).await?;
    let failed_over = vms
        .iter()
        .find(|v| !v.test)
        .ok_or_else(|| anyhow!("the failed-over VM is missing"))?;
    println!(
        "    {} up in {}/{} at {} (the source's address kept)",
        failed_over.name,
        failed_over.region,
        failed_over.resource_group,
        failed_over
            .nics
            .first()
            .map(|n| n.private_ip.as_str())
            .unwrap_or("-")
    );
    for (d, shadow) in failed_over
        .disks
        .iter()
        .zip([&older_shadow.os, &older_shadow.data])
    {
        let same = same_bytes(Path::new(&d.path), shadow)?;
        println!(
            "    {} {} the source at point {}",
            d.name,
            if same {
                "is byte-for-byte identical to"
            } else {
                "DIFFERS from"
            },
            older.id
        );
        if !same {
            bail!(
                "the failed-over disk {} differs from the source at the point",
                d.name
            );
        }
    }
    // The source is fenced: its agent's stream was stopped by the cache.
    let fenced = tokio::time::timeout(Duration::from_secs(10), agent.replication_stopped())
        .await
        .is_ok();
    println!("    the old agent was fenced: {fenced}");
    steps.end("failover", t);

    let t = steps.begin(11, "committing the failover");
    commit(&mut f, &mut events).await?;
    steps.end("commit", t);
    // The original VM is stopped: its agent lets go of the original disks.
    let _ = agent.stop(Duration::from_secs(1)).await;

    let t = steps.begin(
        12,
        "re-protecting demo-web: westus back to eastus, seeded from the original disks",
    );
    let job = f
        .reprotect(fo::ReprotectRequest {
            vm_name: "demo-web".into(),
            request_id: String::new(),
        })
        .await
        .map_err(|s| anyhow!("re-protect: {}", s.message()))?
        .into_inner();
    let job = follow_job(&mut f, &job.id, false).await?;
    if job.state != fo::JobState::Succeeded as i32 {
        bail!("the re-protect failed: {}", job.error);
    }
    if let Some(seed) = job.steps.iter().find(|s| s.name == "seed-replica") {
        println!("    {}", seed.message);
    }
    // Its agent runs beside the failed-over disks.
    let roots: Vec<PathBuf> = failed_over
        .disks
        .iter()
        .filter_map(|d| Path::new(&d.path).parent().map(Path::to_path_buf))
        .collect();
    let nbd = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let west_nbd = nbd.local_addr()?.to_string();
    let west = Agent::start(AgentOptions::new(
        url,
        "demo-web",
        nbd.into(),
        dir.join("agent-westus"),
        roots,
    ))
    .await?;
    wait_event_for(
        &mut events,
        pb::EventKind::Upserted,
        Some(pb::ReplicationState::Protected),
        120,
    )
    .await?;
    figures.reprotect_crossed = west.streamed_bytes();
    figures.disk_bytes = failed_over.disks.iter().map(|d| d.size_bytes).sum();
    println!(
        "    PROTECTED westus -> eastus: {} crossed regions for {} of disks (digests, and \
         round B's writes, which the failover to point {} left out)",
        mib(figures.reprotect_crossed),
        output::bytes(figures.disk_bytes),
        older.id
    );
    steps.end("re-protect", t);

    let t = steps.begin(
        13,
        "writes in westus, then failback: a planned failover into the original disks",
    );
    nbd_write(&west_nbd, "data", 20 << 20, 1 << 20, 0xc1).await?;
    west.stream.flushed().await;
    let job = fail_over(
        &mut f,
        fo::FailoverKind::Planned,
        fo::point_choice::Choice::Latest(true),
        String::new(),
        String::new(),
        "failback",
    )
    .await?;
    figures.failback_written = job.bytes_written;
    println!(
        "    {} written into the original disks (original location: {}), the blocks that differed",
        mib(job.bytes_written),
        job.original_location
    );
    for (d, original) in failed_over.disks.iter().zip([&os, &data]) {
        let same = same_bytes(Path::new(&d.path), original)?;
        println!(
            "    {} {} {}",
            original.display(),
            if same {
                "is byte-for-byte identical to"
            } else {
                "DIFFERS from"
            },
            d.name
        );
        if !same {
            bail!(
                "the original disk {} differs after failback",
                original.display()
            );
        }
    }
    commit(&mut f, &mut events).await?;
    println!("    demo-web runs in eastus on its original disks again; committed");
    steps.end("failback", t);
    let _ = west.stop(Duration::from_secs(1)).await;
    watcher.abort();
    Ok(figures)
}

/// Fails demo-web over (`what` names it in errors) and follows the job;
/// an error unless it succeeded.
async fn fail_over(
    f: &mut FailoverClient<PeerChannel>,
    kind: fo::FailoverKind,
    point: fo::point_choice::Choice,
    test_network: String,
    request_id: String,
    what: &str,
) -> Result<fo::Job> {
    let job = f
        .start_failover(fo::StartFailoverRequest {
            target: Some(fo::start_failover_request::Target::VmName(
                "demo-web".into(),
            )),
            kind: kind as i32,
            point: Some(fo::PointChoice {
                choice: Some(point),
            }),
            test_network,
            request_id,
            instant: false,
            alternate_location: false,
        })
        .await
        .map_err(|s| anyhow!("{what}: {}", s.message()))?
        .into_inner();
    let job = follow_job(f, &job.id, true).await?;
    if job.state != fo::JobState::Succeeded as i32 {
        bail!("the {what} failed: {}", job.error);
    }
    Ok(job)
}

/// Commits demo-web's failover and waits until registry says so.
async fn commit(
    f: &mut FailoverClient<PeerChannel>,
    events: &mut mpsc::Receiver<Seen>,
) -> Result<()> {
    let job = f
        .commit_failover(fo::CommitFailoverRequest {
            target: Some(fo::commit_failover_request::Target::VmName(
                "demo-web".into(),
            )),
            request_id: String::new(),
        })
        .await
        .map_err(|s| anyhow!("commit: {}", s.message()))?
        .into_inner();
    follow_job(f, &job.id, false).await?;
    wait_event(
        events,
        pb::EventKind::Upserted,
        Some(pb::ReplicationState::Committed),
    )
    .await
}

async fn target_vms(f: &mut FailoverClient<PeerChannel>) -> Result<Vec<fo::TargetVm>> {
    Ok(f.list_target_vms(fo::ListTargetVmsRequest {
        source_vm: "demo-web".into(),
    })
    .await
    .map_err(|s| anyhow!("list target VMs: {}", s.message()))?
    .into_inner()
    .vms)
}

/// What the demo measured.
#[derive(Default)]
struct Figures {
    rpo: Option<prost_types::Duration>,
    failover_secs: f64,
    materialized: u64,
    ingest_mib_s: Vec<f64>,
    /// Bytes the re-protected VM's agent sent, of `disk_bytes`.
    reprotect_crossed: u64,
    disk_bytes: u64,
    /// Bytes failback wrote into the original disks.
    failback_written: u64,
}

type Seen = (pb::EventKind, Option<pb::ReplicationState>);

/// Waits (up to 10 s) for the watch to report `kind` with `state`.
async fn wait_event(
    events: &mut mpsc::Receiver<Seen>,
    kind: pb::EventKind,
    state: Option<pb::ReplicationState>,
) -> Result<()> {
    wait_event_for(events, kind, state, 10).await
}

/// Waits up to `secs` for the watch to report `kind` with `state`.
async fn wait_event_for(
    events: &mut mpsc::Receiver<Seen>,
    kind: pb::EventKind,
    state: Option<pb::ReplicationState>,
    secs: u64,
) -> Result<()> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    loop {
        match tokio::time::timeout_at(deadline, events.recv()).await {
            Ok(Some(seen)) if seen == (kind, state) => return Ok(()),
            Ok(Some(_)) => {}
            Ok(None) => bail!("the watch stream ended early"),
            Err(_) => bail!("the watch did not report {kind:?} {state:?} within {secs} s"),
        }
    }
}
