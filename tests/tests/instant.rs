//! Instant failover onto libvirt: the failed-over domain boots at once on
//! qcow2 overlays whose backing is the recovery point, served by
//! failover-svc over NBD, and hydrates in the background (capped here at
//! 2 MiB/s, so that the guest does its work long before its 64 MiB disk is
//! copied). The guest reads every file of the point and writes new ones
//! while the job is still hydrating; once the job ends, the overlay has no
//! backing, the point is no longer served, and the disk equals, byte for
//! byte, what the guest saw before hydration ended (the point plus its
//! writes): fsck-clean, with every file of the point and every file written
//! during hydration. failover-svc restarts in the middle of hydration: the
//! job resumes and serves the point again.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use common::guest::{boot, drive, ext4_vm, files, guest};
use common::libvirt::{
    cluster, console_when_done, daemons, failover_settings, forget, guest_shape, names, virsh,
};
use ferry_proto::failover::v1 as fo;
use ferry_testkit::points::cut_latest;

const FILES: usize = 20;
/// Files the failed-over guest writes while its disk hydrates.
const MORE: usize = 5;
const PREFIX: &str = "ferry.westus.";

/// `qemu-img info -U` of `image`: its backing file, if any.
fn backing(image: &str) -> Option<String> {
    let out = Command::new("qemu-img")
        .args(["info", "-U", "--output=json", image])
        .output()
        .unwrap();
    assert!(out.status.success(), "qemu-img info {image}: {out:?}");
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    info.get("backing-filename")
        .and_then(|b| b.as_str())
        .map(str::to_string)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instant_failover_runs_before_its_disks_are_copied_and_keeps_its_writes() {
    let began = std::time::Instant::now();
    let phase = |what: &str| eprintln!("{:>6.1}s {what}", began.elapsed().as_secs_f64());
    daemons();
    forget(PREFIX);
    let guest = guest();
    // The same listener across failover-svc's restart, as a fixed
    // nbd_listen port would be.
    let nbd = Arc::new(std::net::TcpListener::bind("127.0.0.1:0").unwrap());
    let settings = failover_svc::libvirt::Settings {
        nbd_listener: Some(nbd),
        hydrate_mib_per_sec: 2,
        ..Default::default()
    };
    let (mut cluster, _root) = cluster(settings.clone()).await;
    let (registry, url) = (cluster.registry.url.clone(), cluster.failover.url.clone());
    let (dir, _) = ext4_vm(&cluster, |mut vm| {
        vm.shape = Some(guest_shape(
            &guest,
            &format!("ferry.mode=verify ferry.more={MORE} ferry.stay=1"),
        ));
        vm
    })
    .await;
    let (agent, export) = common::protected_agent(&registry, "vm", &dir.path().join("agent")).await;
    let written = boot(
        &guest,
        &drive(&format!("{export}/os")),
        &format!("ferry.mode=write ferry.files={FILES}"),
    )
    .await;
    assert_eq!(written.len(), FILES);
    agent.stream.flushed().await;
    let point = cut_latest(&cluster.processor.url, "vm").await.unwrap();
    common::isolated_network(url.as_str()).await;
    phase("protected; the source guest wrote its files");

    let mut request = common::failover_request(
        "vm",
        fo::FailoverKind::Test,
        fo::point_choice::Choice::PointId(point.id.clone()),
        "isolated",
    );
    request.instant = true;
    let job = common::failover(url.as_str())
        .await
        .start_failover(request)
        .await
        .unwrap()
        .into_inner();
    assert!(job.instant);
    let steps: Vec<&str> = job.steps.iter().map(|s| s.name.as_str()).collect();
    assert!(
        steps.contains(&"serve-disks")
            && steps.contains(&"hydrate")
            && !steps.contains(&"materialize-disks"),
        "{steps:?}"
    );

    // The guest boots, reads every file of the point and writes MORE new
    // ones while its disk is still on the point.
    let vm = ferry_testkit::wait_for(
        "the instant VM to be recorded",
        std::time::Duration::from_secs(60),
        || {
            let url = url.clone();
            async move {
                common::target_vms(&url)
                    .await
                    .into_iter()
                    .find(|v| v.name == "vm-test")
            }
        },
    )
    .await;
    let console = console_when_done(&vm).await;
    phase("the instant VM read the point and wrote its files");
    let overlay = vm.disks[0].path.clone();
    assert!(overlay.ends_with(".qcow2"), "{overlay}");
    let served = backing(&overlay).expect("the overlay is still on the point");
    assert!(served.starts_with("nbd://127.0.0.1:"), "{served}");
    // The export is read-only, and its name is a secret: not listed, and a
    // guessed one is refused.
    let write = Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write 0 512", &served])
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&write.stderr);
    assert!(
        !write.status.success()
            && (said.contains("read-only") || said.contains("Permission denied")),
        "a write into the served point: {write:?}"
    );
    let (server, name) = served.rsplit_once('/').unwrap();
    let list = Command::new("nbdinfo")
        .args(["--list", server])
        .output()
        .unwrap();
    assert!(
        !String::from_utf8_lossy(&list.stdout).contains(name),
        "{list:?}"
    );
    let (job_part, _) = name.rsplit_once('.').unwrap();
    let guessed = Command::new("qemu-img")
        .args(["info", &format!("{server}/{job_part}.0")])
        .output()
        .unwrap();
    assert!(!guessed.status.success(), "{guessed:?}");
    let now = common::failover(url.as_str())
        .await
        .get_job(fo::GetJobRequest { id: job.id.clone() })
        .await
        .unwrap()
        .into_inner();
    let hydrate = now.steps.iter().find(|s| s.name == "hydrate").unwrap();
    assert_eq!(
        (now.state, hydrate.state),
        (fo::JobState::Running as i32, fo::JobState::Running as i32),
        "the guest finished before hydration did: {now:?}"
    );
    let seen = files(&console);
    let mut want: BTreeMap<String, String> = written.clone();
    for (name, sum) in &seen {
        if name.starts_with('h') {
            want.insert(name.clone(), sum.clone());
        }
    }
    assert_eq!(seen.len(), FILES + MORE, "{console}");
    assert_eq!(seen, want, "the point's files as read through the overlay");
    // The point plus the guest's writes, as the idle guest (its filesystem
    // unmounted) sees its disk: the overlay over the served point, read
    // before hydration ends.
    let expected = dir.path().join("point-and-writes.raw");
    let expected = expected.to_str().unwrap();
    let seen_disk = Command::new("qemu-img")
        .args(["convert", "-U", "-O", "raw", &overlay, expected])
        .output()
        .unwrap();
    assert!(seen_disk.status.success(), "{seen_disk:?}");

    // failover-svc restarts mid-hydration: the job resumes at hydrate and
    // serves the point again under the same names.
    cluster.restart_failover(failover_settings(settings)).await;
    let url = cluster.failover.url.clone();
    assert!(
        backing(&overlay).is_some(),
        "hydration ended before the restart"
    );
    phase("failover-svc restarted while hydrating");

    // The job ends once the VM runs from local images only.
    let (job, _) = common::finish(url.as_str(), &job).await;
    assert_eq!(job.state, fo::JobState::Succeeded as i32, "{job:?}");
    phase("hydrated");
    assert_eq!(backing(&overlay), None);
    assert_eq!(virsh(&["domstate", &vm.domain]).trim(), "running");
    let xml = virsh(&["dumpxml", &vm.domain]);
    assert!(!xml.contains("protocol='nbd'"), "{xml}");
    // The point is no longer served.
    let gone = Command::new("qemu-img")
        .args(["info", &served])
        .output()
        .unwrap();
    assert!(!gone.status.success(), "{served} is still served");

    // The disk is the point plus the guest's writes: every file of each,
    // and a clean filesystem.
    virsh(&["destroy", &vm.domain]);
    let raw = dir.path().join("hydrated.raw");
    let raw = raw.to_str().unwrap();
    let converted = Command::new("qemu-img")
        .args(["convert", "-O", "raw", &overlay, raw])
        .status()
        .unwrap();
    assert!(converted.success());
    // Byte for byte: hydration added nothing and lost nothing.
    let compare = Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw", expected, raw])
        .output()
        .unwrap();
    assert!(compare.status.success(), "{compare:?}");
    let fsck = Command::new("e2fsck").args(["-fn", raw]).output().unwrap();
    assert!(fsck.status.success(), "e2fsck -fn: {fsck:?}");
    let after = boot(&guest, &drive(raw), "ferry.mode=verify").await;
    assert_eq!(after, want);
    phase("the hydrated disk holds the point and the writes");

    common::cleanup_test(&url, "vm").await;
    assert!(!names(&["list", "--all", "--name"]).contains(&vm.domain));
    for left in [overlay.as_str(), vm.console_path.as_str()] {
        assert!(!Path::new(left).exists(), "{left} is left behind");
    }
    agent.stop(std::time::Duration::from_secs(5)).await.unwrap();
    cluster.stop().await;
    forget(PREFIX);
}
