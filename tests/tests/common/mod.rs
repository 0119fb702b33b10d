//! What the cross-service tests share: a fast policy and a protected VM
//! with its agent running in-process.

// Each test file uses a part of it.
#![allow(dead_code)]

pub mod guest;
pub mod libvirt;

use std::path::Path;
use std::time::Duration;

use ferry_agent::run::{Agent, AgentOptions};
use ferry_agent::stream::StreamLimits;
use ferry_proto::registry::v1 as reg;
use ferry_runtime::peers::Credentials;
use ferry_testkit::{create_policy, protected_item, wait_for, At};

/// A child process killed however the test ends.
pub struct Killed(pub std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A policy `name` with a point every `interval`, everything kept a day.
pub async fn policy(registry: &str, name: &str, interval: Duration) {
    let day = Duration::from_secs(86400);
    create_policy(registry, name, interval, day, day, day).await;
}

/// Protects "vm" (one `DISK` image under `dir`, a point every second) and
/// starts its agent in-process with `limits`; the agent once PROTECTED.
pub async fn fast_protected_vm(registry: &str, dir: &Path, limits: StreamLimits) -> Agent {
    let source = image(dir, "vm");
    policy(registry, "fast", Duration::from_secs(1)).await;
    ferry_testkit::protect_vm_with(registry, "vm", &[("os", DISK, &source)], "fast").await;
    protected_agent_limited(registry, "vm", &dir.join("agent"), None, limits)
        .await
        .0
}

/// Starts `vm`'s agent in-process with its NBD export on loopback and waits
/// until the VM is PROTECTED; the agent and `nbd://host:port`.
pub async fn protected_agent(registry: &str, vm: &str, state_dir: &Path) -> (Agent, String) {
    protected_agent_with(registry, vm, state_dir, None).await
}

/// As [`protected_agent`], presenting `credentials` (its agent token, for
/// services that check their callers).
pub async fn protected_agent_as(
    registry: &str,
    vm: &str,
    state_dir: &Path,
    credentials: Credentials,
) -> (Agent, String) {
    start_protected(
        registry,
        vm,
        state_dir,
        None,
        StreamLimits::default(),
        credentials,
    )
    .await
}

/// As [`protected_agent`], with pre and post scripts for app-consistent
/// points.
pub async fn protected_agent_with(
    registry: &str,
    vm: &str,
    state_dir: &Path,
    scripts: Option<ferry_agent::quiesce::Scripts>,
) -> (Agent, String) {
    protected_agent_limited(registry, vm, state_dir, scripts, StreamLimits::default()).await
}

/// As [`protected_agent_with`], with the stream's limits (a small buffer,
/// a short outage) of the test's own.
pub async fn protected_agent_limited(
    registry: &str,
    vm: &str,
    state_dir: &Path,
    scripts: Option<ferry_agent::quiesce::Scripts>,
    limits: StreamLimits,
) -> (Agent, String) {
    start_protected(
        registry,
        vm,
        state_dir,
        scripts,
        limits,
        Credentials::none(),
    )
    .await
}

/// Waits (a minute at most) until `vm` is PROTECTED.
pub async fn wait_protected(registry: &str, vm: &str) {
    wait_for("PROTECTED", Duration::from_secs(60), || async {
        protected_item(registry, vm)
            .await
            .filter(|i| i.state() == reg::ReplicationState::Protected)
    })
    .await;
}

async fn start_protected(
    registry: &str,
    vm: &str,
    state_dir: &Path,
    scripts: Option<ferry_agent::quiesce::Scripts>,
    limits: StreamLimits,
    credentials: Credentials,
) -> (Agent, String) {
    let nbd = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = nbd.local_addr().unwrap();
    // Used only if the VM is in a replication group.
    let group = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let agent = Agent::start(AgentOptions {
        registry: registry.to_string(),
        vm: vm.to_string(),
        nbd: nbd.into(),
        group: ferry_agent::run::GroupPort::Bound(group),
        group_tls: None,
        group_insecure: false,
        enrollment_token: None,
        group_address: String::new(),
        state_dir: state_dir.to_path_buf(),
        // The tests put the images beside the agent's state directory.
        disk_roots: state_dir
            .parent()
            .into_iter()
            .map(Path::to_path_buf)
            .collect(),
        limits,
        nbd_limits: Default::default(),
        attached: false,
        heartbeat: ferry_agent::health::HEARTBEAT,
        scripts,
        credentials,
    })
    .await
    .unwrap();
    wait_protected(registry, vm).await;
    (agent, format!("nbd://{addr}"))
}

// A chain of writes: iteration k writes k + 1 into slot k % SLOTS, so that
// an image shows exactly how many iterations it holds.

pub const DISK: u64 = 4 << 20;
pub const SLOT: u64 = 512;
pub const SLOTS: u64 = DISK / SLOT;

/// A sparse source image of `DISK` bytes for `vm` under `dir`.
pub fn image(dir: &Path, vm: &str) -> std::path::PathBuf {
    let path = dir.join(format!("{vm}.raw"));
    std::fs::File::create(&path).unwrap().set_len(DISK).unwrap();
    path
}

/// Iteration `k` of the causal chain writes `k + 1` into slot `k % SLOTS`.
pub fn slot_write(k: u64) -> (u64, Vec<u8>) {
    let value = (k + 1) as u32;
    let data: Vec<u8> = value.to_le_bytes().repeat((SLOT / 4) as usize);
    ((k % SLOTS) * SLOT, data)
}

/// The iteration count a disk image holds: the largest value in any slot.
/// Panics unless the image is exactly the chain's first `n` writes.
pub fn chain_prefix(image: &[u8]) -> u64 {
    let values: Vec<u32> = (0..SLOTS)
        .map(|s| {
            let at = (s * SLOT) as usize;
            let v = u32::from_le_bytes(image[at..at + 4].try_into().unwrap());
            assert!(
                image[at..at + SLOT as usize]
                    .chunks(4)
                    .all(|c| c == v.to_le_bytes()),
                "slot {s} is torn"
            );
            v
        })
        .collect();
    let n = u64::from(values.iter().copied().max().unwrap_or(0));
    for (s, v) in values.iter().enumerate() {
        // The newest iteration k < n with k % SLOTS == s, if any.
        let s = s as u64;
        let expected = if n > s {
            let k = s + (n - 1 - s) / SLOTS * SLOTS;
            k + 1
        } else {
            0
        };
        assert_eq!(u64::from(*v), expected, "slot {s} after {n} iterations");
    }
    n
}

// Failover jobs.

/// A failover-svc client, as an admin when `at` has credentials.
pub async fn failover<'a>(
    at: impl Into<At<'a>>,
) -> ferry_proto::failover::v1::failover_client::FailoverClient<ferry_testkit::insecure::TestChannel>
{
    ferry_proto::failover::v1::failover_client::FailoverClient::new(at.into().admin())
}

/// A failover of `vm` of `kind` to `point` (`network`: a test failover's).
pub fn failover_request(
    vm: &str,
    kind: ferry_proto::failover::v1::FailoverKind,
    point: ferry_proto::failover::v1::point_choice::Choice,
    network: &str,
) -> ferry_proto::failover::v1::StartFailoverRequest {
    use ferry_proto::failover::v1 as fo;
    fo::StartFailoverRequest {
        target: Some(fo::start_failover_request::Target::VmName(vm.into())),
        kind: kind as i32,
        point: Some(fo::PointChoice {
            choice: Some(point),
        }),
        test_network: network.into(),
        request_id: String::new(),
        instant: false,
        alternate_location: false,
    }
}

/// A test failover of `vm` to `point` into the network "isolated", followed
/// to its end; it must succeed.
pub async fn test_failover(
    url: &str,
    vm: &str,
    point: ferry_proto::failover::v1::point_choice::Choice,
) -> ferry_proto::failover::v1::Job {
    let request = failover_request(
        vm,
        ferry_proto::failover::v1::FailoverKind::Test,
        point,
        "isolated",
    );
    succeed(url, request).await.0
}

/// Creates the network "isolated" (westus, resource group "drill", subnet
/// "default" 10.9.0.0/24) that the tests' test failovers go into.
pub async fn isolated_network<'a>(at: impl Into<At<'a>>) {
    use ferry_proto::failover::v1 as fo;
    failover(at)
        .await
        .create_network(fo::CreateNetworkRequest {
            network: Some(fo::Network {
                region: "westus".into(),
                resource_group: "drill".into(),
                name: "isolated".into(),
                subnets: vec![fo::Subnet {
                    name: "default".into(),
                    address_prefix: "10.9.0.0/24".into(),
                }],
            }),
        })
        .await
        .unwrap();
}

/// Follows a job's stream to its end; the final job and how many distinct
/// progress values were seen.
pub async fn finish<'a>(
    at: impl Into<At<'a>>,
    job: &ferry_proto::failover::v1::Job,
) -> (ferry_proto::failover::v1::Job, usize) {
    let mut stream = failover(at)
        .await
        .watch_job(ferry_proto::failover::v1::WatchJobRequest { id: job.id.clone() })
        .await
        .unwrap()
        .into_inner();
    let mut last = None;
    let mut progress = std::collections::BTreeSet::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    while let Some(j) = tokio::time::timeout_at(deadline, stream.message())
        .await
        .expect("the job ends within 2 minutes")
        .unwrap()
    {
        progress.insert(j.bytes_done);
        last = Some(j);
    }
    let job = last.expect("at least the job itself");
    assert!(
        job.state == ferry_proto::failover::v1::JobState::Succeeded as i32
            || job.state == ferry_proto::failover::v1::JobState::Failed as i32,
        "the stream ends with the job: {job:?}"
    );
    (job, progress.len())
}

/// Starts a job and follows it; it must succeed.
pub async fn succeed(
    url: &str,
    request: ferry_proto::failover::v1::StartFailoverRequest,
) -> (ferry_proto::failover::v1::Job, usize) {
    let job = failover(url)
        .await
        .start_failover(request)
        .await
        .unwrap()
        .into_inner();
    let (job, progress) = finish(url, &job).await;
    assert_eq!(
        job.state,
        ferry_proto::failover::v1::JobState::Succeeded as i32,
        "{job:?}"
    );
    (job, progress)
}

/// Cleans up `vm`'s test failover; the ended job, which must have
/// succeeded.
pub async fn cleanup_test(url: &str, vm: &str) -> ferry_proto::failover::v1::Job {
    use ferry_proto::failover::v1 as fo;
    let job = failover(url)
        .await
        .cleanup_test_failover(fo::CleanupTestFailoverRequest {
            target: Some(fo::cleanup_test_failover_request::Target::VmName(vm.into())),
            request_id: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let (job, _) = finish(url, &job).await;
    assert_eq!(job.state, fo::JobState::Succeeded as i32, "{job:?}");
    job
}

/// Every VM failovers created, in every region.
pub async fn target_vms(url: &str) -> Vec<ferry_proto::failover::v1::TargetVm> {
    failover(url)
        .await
        .list_target_vms(ferry_proto::failover::v1::ListTargetVmsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .vms
}
