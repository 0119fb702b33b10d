//! `ferry-loadgen group-bench`: a replication group of 20 VMs, every agent,
//! cache-svc and processor-svc in-process on loopback. Bookmark rounds run
//! back to back over all members (rounds per second, and how long one
//! takes); then a writer on one member issues 4 KiB writes alone (the
//! baseline), and again with a round every 200 ms: the latency of the writes
//! begun while a round held them, beside the baseline of the same run.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use ferry_agent::capture::Capture;
use ferry_agent::group::{Peers, ROUND_DEADLINE};
use ferry_agent::run::{Agent, AgentOptions, GroupPort};
use ferry_proto::registry::v1 as reg;

const DISK: u64 = 64 << 20;
/// Spacing of the rounds measured beside the writer.
const ROUND_EVERY: Duration = Duration::from_millis(200);

fn percentile(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        return 0.0;
    }
    let i = ((p / 100.0) * (v.len() - 1) as f64).round() as usize;
    v[i.min(v.len() - 1)]
}

/// 4 KiB writes back to back on `capture` until `stop`: when each began
/// and its latency in microseconds.
async fn writer(capture: Arc<Capture>, stop: Arc<AtomicBool>) -> Result<Vec<(Instant, f64)>> {
    let data = vec![0x6bu8; 4096];
    let mut latencies = Vec::new();
    let mut i = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let offset = (i * 4096) % DISK;
        let t = Instant::now();
        capture.write("os", offset, data.clone()).await?;
        latencies.push((t, t.elapsed().as_secs_f64() * 1e6));
        i += 1;
        if capture.stream().pending_bytes().await > 64 << 20 {
            // Keep the stream well inside its buffer: measure rounds, not
            // an overflow.
            capture.stream().flushed().await;
        }
    }
    Ok(latencies)
}

/// p50, p99 and max of `v`.
fn summary(mut v: Vec<f64>) -> (usize, f64, f64, f64) {
    let n = v.len();
    (
        n,
        percentile(&mut v, 50.0),
        percentile(&mut v, 99.0),
        percentile(&mut v, 100.0),
    )
}

pub async fn run(dir: &Path, vms: usize, secs: u64) -> Result<()> {
    let cluster = ferry_testkit::Cluster::start().await;
    let registry = cluster.registry.url.clone();
    // Rounds an hour apart: the coordinator's own stay out of the way of
    // the ones measured here.
    ferry_testkit::group::create_group(&registry, "bench", Duration::from_secs(3600)).await;
    let names: Vec<String> = (0..vms).map(|i| format!("vm-{i:02}")).collect();
    for vm in &names {
        let source = dir.join(format!("{vm}.raw"));
        std::fs::File::create(&source)?.set_len(DISK)?;
        ferry_testkit::group::join_group(&registry, vm, &[("os", DISK, &source)], "bench").await;
    }
    let mut agents = Vec::new();
    for vm in &names {
        let nbd = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let group = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        agents.push(
            Agent::start(AgentOptions {
                group: GroupPort::Bound(group),
                ..AgentOptions::new(
                    registry.clone(),
                    vm.clone(),
                    nbd.into(),
                    dir.join(format!("{vm}-agent")),
                    vec![dir.to_path_buf()],
                )
            })
            .await?,
        );
    }
    for vm in &names {
        let registry = registry.clone();
        ferry_testkit::wait_for("PROTECTED", Duration::from_secs(120), || async {
            ferry_testkit::protected_item(&registry, vm)
                .await
                .filter(|i| i.state() == reg::ReplicationState::Protected)
        })
        .await;
    }
    let members: Vec<(String, String)> = agents
        .iter()
        .map(|a| (a.vm.clone(), a.group_address.clone()))
        .collect();
    let capture = agents[0].capture.clone();
    let span = Duration::from_secs(secs);

    // Rounds are signed with the group's secret, as its coordinator's are.
    let member = agents[0]
        .member
        .clone()
        .ok_or_else(|| anyhow::anyhow!("the first agent is not a group member"))?;
    let secret = ferry_testkit::wait_for("the group's secret", Duration::from_secs(30), || {
        let member = member.clone();
        async move { member.secret() }
    })
    .await;
    let mut peers = Peers::default();
    peers.set_secret(Some(secret));
    let coordinator = members[0].0.clone();

    // Capacity: rounds back to back, nothing else running.
    let (mut committed, mut failed) = (0u64, 0u64);
    let mut round_ms = Vec::new();
    let started = Instant::now();
    while started.elapsed() < span {
        match ferry_agent::group::round(&mut peers, "bench", &coordinator, &members, ROUND_DEADLINE)
            .await
        {
            Ok(r) => {
                committed += 1;
                round_ms.push(r.elapsed.as_secs_f64() * 1000.0);
            }
            Err(e) => {
                failed += 1;
                if failed > committed + 10 {
                    bail!("rounds keep failing: {e}");
                }
            }
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    let (_, r50, r99, _) = summary(round_ms);

    // The baseline: the writer alone.
    let stop = Arc::new(AtomicBool::new(false));
    let alone = tokio::spawn(writer(capture.clone(), stop.clone()));
    tokio::time::sleep(span).await;
    stop.store(true, Ordering::Relaxed);
    let alone = alone.await??;

    // The writer with a round every ROUND_EVERY: which writes began while a
    // round held writes, and what they waited.
    let stop = Arc::new(AtomicBool::new(false));
    let during = tokio::spawn(writer(capture.clone(), stop.clone()));
    let mut windows: Vec<(Instant, Instant)> = Vec::new();
    let mut loaded_ms = Vec::new();
    let started = Instant::now();
    let mut next = started;
    while started.elapsed() < span {
        tokio::time::sleep_until(next.into()).await;
        next += ROUND_EVERY;
        let t = Instant::now();
        if let Ok(r) =
            ferry_agent::group::round(&mut peers, "bench", &coordinator, &members, ROUND_DEADLINE)
                .await
        {
            windows.push((t, t + r.elapsed));
            loaded_ms.push(r.elapsed.as_secs_f64() * 1000.0);
        }
    }
    stop.store(true, Ordering::Relaxed);
    let during = during.await??;
    let in_round: Vec<f64> = during
        .iter()
        .filter(|(t, _)| windows.iter().any(|(a, b)| t >= a && t <= b))
        .map(|(_, l)| *l)
        .collect();
    let (ln, l50, l99, _) = summary(loaded_ms);

    println!("replication group of {vms} VMs, agents, cache-svc and processor-svc in-process on loopback; {secs} s per phase");
    println!(
        "rounds back to back, idle group: {:.0} rounds/s ({committed} committed, {failed} failed); a round takes p50 {r50:.2} ms, p99 {r99:.2} ms",
        committed as f64 / elapsed
    );
    println!(
        "a round every {} ms beside a writer: {ln} rounds, p50 {l50:.2} ms, p99 {l99:.2} ms",
        ROUND_EVERY.as_millis()
    );
    let alone = summary(alone.iter().map(|(_, l)| *l).collect());
    let all = summary(during.iter().map(|(_, l)| *l).collect());
    let held = summary(in_round);
    println!(
        "{:<44} {:>9} {:>9} {:>9} {:>9}",
        "4 KiB write latency on one member (µs)", "writes", "p50", "p99", "max"
    );
    for (name, (n, p50, p99, max)) in [
        ("no round (baseline)", alone),
        ("all writes, with rounds", all),
        ("writes begun during a round", held),
    ] {
        println!("{name:<44} {n:>9} {p50:>9.0} {p99:>9.0} {max:>9.0}");
    }
    println!(
        "added p99 during a round: +{:.0} µs ({:.2}x the baseline p99); over all writes: +{:.0} µs",
        held.2 - alone.2,
        held.2 / alone.2.max(1e-9),
        all.2 - alone.2
    );
    for a in agents {
        a.stop(Duration::from_secs(5)).await?;
    }
    Ok(())
}
