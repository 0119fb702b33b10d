//! Recovery plans: a three-group plan (a VM, a replication group, a VM)
//! with a script after group 1, a manual step before group 2 and a script
//! after group 3 that fails until it is fixed. Its test failover goes group
//! by group, waits at the manual step until `ferry plan resume` (the CLI
//! binary), stops at the failing script naming it, goes on once it is fixed,
//! and the cleanup of the plan's test failover leaves nothing behind; then
//! its unplanned failover and commit. Bad
//! input (a VM in two groups, a group member added alone, a VM in another
//! running plan, a script outside the scripts directory) gets a precise
//! status and changes nothing.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use ferry_proto::failover::v1 as fo;
use ferry_testkit::group::{create_group, group_points, join_group};
use ferry_testkit::{bin_path, protect_vm_with, wait_for, Cluster, ClusterOptions};

use common::{image, DISK};

fn script(dir: &Path, name: &str, body: &str) {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join(name);
    // Written aside and renamed: never run half written.
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, format!("#!/bin/sh\n{body}\n")).unwrap();
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::rename(&tmp, &path).unwrap();
}

fn group(vms: &[&str], groups: &[&str]) -> fo::AddPlanGroupRequest {
    fo::AddPlanGroupRequest {
        plan: "shop".into(),
        vm_names: vms.iter().map(|v| v.to_string()).collect(),
        replication_groups: groups.iter().map(|g| g.to_string()).collect(),
    }
}

fn action(
    group: u32,
    when: fo::ActionWhen,
    name: &str,
    kind: fo::plan_action::Kind,
) -> fo::AddPlanActionRequest {
    fo::AddPlanActionRequest {
        plan: "shop".into(),
        group,
        when: when as i32,
        action: Some(fo::PlanAction {
            name: name.into(),
            kind: Some(kind),
        }),
    }
}

fn script_action(script: &str) -> fo::plan_action::Kind {
    fo::plan_action::Kind::Script(fo::ScriptAction {
        script: script.into(),
        timeout_seconds: 30,
    })
}

/// `ferry --failover URL plan ARGS`: (success, output).
fn ferry(url: &str, args: &[&str]) -> (bool, String) {
    let out = Command::new(bin_path("ferry"))
        .arg("--failover")
        .arg(url)
        .arg("plan")
        .args(args)
        .env_remove("FERRY_TOKEN")
        .output()
        .unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

async fn job(url: &str, id: &str) -> fo::Job {
    common::failover(url)
        .await
        .get_job(fo::GetJobRequest { id: id.into() })
        .await
        .unwrap()
        .into_inner()
}

/// The names of every VM failovers made (a test failover's end in -test).
async fn target_vm_names(url: &str) -> Vec<String> {
    let mut names: Vec<String> = common::target_vms(url)
        .await
        .into_iter()
        .map(|v| v.name)
        .collect();
    names.sort();
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_three_group_plan_waits_stops_resumes_and_cleans_up() {
    let dir = tempfile::tempdir().unwrap();
    let failover_dir = dir.path().join("failover");
    let mut cluster = Cluster::start_options(ClusterOptions {
        failover_dir: Some(failover_dir.clone()),
        ..Default::default()
    })
    .await;
    let registry = cluster.registry.url.clone();
    let mut url = cluster.failover.url.clone();
    let scripts = failover_dir.join("plan-scripts");
    std::fs::create_dir_all(&scripts).unwrap();
    let log = dir.path().join("actions.log");
    script(
        &scripts,
        "notify.sh",
        &format!(
            "echo \"$FERRY_PLAN $FERRY_PLAN_GROUP $FERRY_VMS $FERRY_DIRECTION $FERRY_WHEN $FERRY_ACTION\" >> {}",
            log.display()
        ),
    );
    script(
        &scripts,
        "check.sh",
        "echo 'web does not answer on :443' >&2; exit 3",
    );

    common::policy(&registry, "fast", Duration::from_secs(1)).await;
    create_group(&registry, "app", Duration::from_secs(1)).await;
    for vm in ["db", "web"] {
        let source = image(dir.path(), vm);
        protect_vm_with(&registry, vm, &[("os", DISK, &source)], "fast").await;
    }
    for vm in ["app1", "app2"] {
        let source = image(dir.path(), vm);
        join_group(&registry, vm, &[("os", DISK, &source)], "app").await;
    }
    let mut agents = Vec::new();
    for vm in ["db", "web", "app1", "app2"] {
        let state = dir.path().join(format!("{vm}-state"));
        agents.push(common::protected_agent(&registry, vm, &state).await.0);
    }
    wait_for(
        "a multi-VM point of app",
        Duration::from_secs(60),
        || async { (!group_points(&cluster.processor.url, "app").await.is_empty()).then_some(()) },
    )
    .await;
    common::isolated_network(url.as_str()).await;

    let mut f = common::failover(url.as_str()).await;
    f.create_plan(fo::CreatePlanRequest {
        name: "shop".into(),
    })
    .await
    .unwrap();
    f.add_plan_group(group(&["db"], &[])).await.unwrap();
    f.add_plan_group(group(&[], &["app"])).await.unwrap();
    f.add_plan_group(group(&["web"], &[])).await.unwrap();
    f.add_plan_action(action(
        1,
        fo::ActionWhen::Post,
        "notify",
        script_action("notify.sh"),
    ))
    .await
    .unwrap();
    f.add_plan_action(action(
        2,
        fo::ActionWhen::Pre,
        "confirm-db",
        fo::plan_action::Kind::Manual(fo::ManualAction {
            text: "check that db answers, then resume the plan".into(),
        }),
    ))
    .await
    .unwrap();
    f.add_plan_action(action(
        3,
        fo::ActionWhen::Post,
        "check",
        script_action("check.sh"),
    ))
    .await
    .unwrap();
    f.add_plan_action(action(
        3,
        fo::ActionWhen::Post,
        "notify",
        script_action("notify.sh"),
    ))
    .await
    .unwrap();

    // Bad input: a precise status, the plan unchanged.
    let before = f
        .get_plan(fo::GetPlanRequest {
            name: "shop".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let refused = [
        (
            f.add_plan_group(group(&["db"], &[])).await.unwrap_err(),
            tonic::Code::InvalidArgument,
            "already in group 1",
        ),
        (
            f.add_plan_group(group(&["app1"], &[])).await.unwrap_err(),
            tonic::Code::InvalidArgument,
            "add the group instead",
        ),
        (
            f.add_plan_group(group(&["nobody"], &[])).await.unwrap_err(),
            tonic::Code::NotFound,
            "nobody",
        ),
        (
            f.add_plan_action(action(
                1,
                fo::ActionWhen::Pre,
                "x",
                script_action("../bin/sh"),
            ))
            .await
            .unwrap_err(),
            tonic::Code::InvalidArgument,
            "no '/'",
        ),
        (
            f.add_plan_action(action(
                9,
                fo::ActionWhen::Pre,
                "x",
                script_action("notify.sh"),
            ))
            .await
            .unwrap_err(),
            tonic::Code::InvalidArgument,
            "group 9",
        ),
    ];
    for (err, code, says) in refused {
        assert_eq!(err.code(), code, "{err:?}");
        assert!(err.message().contains(says), "{err:?}");
    }
    let after = f
        .get_plan(fo::GetPlanRequest {
            name: "shop".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(before, after);

    // The test failover of the plan: group 1, then it waits.
    let started = f
        .start_plan(fo::StartPlanRequest {
            plan: "shop".into(),
            operation: fo::PlanOperation::Failover as i32,
            kind: fo::FailoverKind::Test as i32,
            test_network: "isolated".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let waiting = wait_for("the manual action", Duration::from_secs(90), || async {
        Some(job(&url, &started.id).await).filter(|j| !j.waiting_for.is_empty())
    })
    .await;
    assert!(
        waiting.waiting_for.contains("check that db answers"),
        "{waiting:#?}"
    );
    assert_eq!(target_vm_names(&url).await, vec!["db-test"]);
    assert_eq!(
        std::fs::read_to_string(&log).unwrap(),
        "shop 1 db test-failover post notify\n"
    );
    let (ok, shown) = ferry(&url, &["show", "shop"]);
    assert!(ok, "{shown}");
    assert!(shown.contains("group 2: group:app"), "{shown}");
    // `ferry jobs` shows what it waits for.
    let out = Command::new(bin_path("ferry"))
        .args(["--failover", url.as_str(), "jobs"])
        .env_remove("FERRY_TOKEN")
        .output()
        .unwrap();
    let jobs = String::from_utf8_lossy(&out.stdout);
    assert!(
        jobs.contains("waiting: confirm-db: check that db answers"),
        "{jobs}"
    );

    // A VM of this plan in another plan: refused while this one runs.
    f.create_plan(fo::CreatePlanRequest {
        name: "other".into(),
    })
    .await
    .unwrap();
    f.add_plan_group(fo::AddPlanGroupRequest {
        plan: "other".into(),
        vm_names: vec!["db".into()],
        replication_groups: Vec::new(),
    })
    .await
    .unwrap();
    let err = f
        .start_plan(fo::StartPlanRequest {
            plan: "other".into(),
            operation: fo::PlanOperation::Failover as i32,
            kind: fo::FailoverKind::Test as i32,
            test_network: "isolated".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("also in plan \"shop\""), "{err:?}");
    let err = f
        .delete_plan(fo::DeletePlanRequest {
            name: "shop".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");

    // failover-svc restarts: the plan's job resumes, waiting again.
    drop(f);
    cluster.restart_failover(Default::default()).await;
    url = cluster.failover.url.clone();
    let again = wait_for("the job waiting again", Duration::from_secs(30), || async {
        Some(job(&url, &started.id).await).filter(|j| !j.waiting_for.is_empty())
    })
    .await;
    assert_eq!(again.state, fo::JobState::Running as i32, "{again:#?}");
    assert_eq!(target_vm_names(&url).await, vec!["db-test"]);

    // Resumed from the CLI: groups 2 and 3 come up, group 3's check fails.
    let (ok, said) = ferry(&url, &["resume", "shop", "--no-wait"]);
    assert!(ok, "{said}");
    let failed = wait_for("the failing script", Duration::from_secs(120), || async {
        Some(job(&url, &started.id).await).filter(|j| j.state == fo::JobState::Failed as i32)
    })
    .await;
    assert!(
        failed.error.contains("group 3 post:check"),
        "{}",
        failed.error
    );
    assert!(
        failed.error.contains("web does not answer on :443"),
        "{}",
        failed.error
    );
    assert_eq!(
        target_vm_names(&url).await,
        vec!["app1-test", "app2-test", "db-test", "web-test"]
    );

    // Fixed, resumed: the check runs again and the plan ends.
    script(&scripts, "check.sh", "exit 0");
    let (ok, said) = ferry(&url, &["resume", "shop"]);
    assert!(ok, "{said}");
    let done = job(&url, &started.id).await;
    assert_eq!(done.state, fo::JobState::Succeeded as i32, "{done:#?}");
    assert_eq!(done.child_jobs.len(), 3, "{done:#?}");
    assert_eq!(
        std::fs::read_to_string(&log).unwrap(),
        "shop 1 db test-failover post notify\nshop 3 web test-failover post notify\n"
    );

    // The cleanup of the plan's test failover leaves nothing behind.
    let (ok, said) = ferry(&url, &["cleanup-test", "shop"]);
    assert!(ok, "{said}");
    assert!(target_vm_names(&url).await.is_empty());

    // The real thing: an unplanned failover of the plan (it waits at the
    // manual step again, the CLI returns saying so), resumed, committed.
    let (ok, said) = ferry(&url, &["failover", "shop", "--point", "latest"]);
    assert!(ok, "{said}");
    assert!(said.contains("waiting for: confirm-db"), "{said}");
    let (ok, said) = ferry(&url, &["resume", "shop"]);
    assert!(ok, "{said}");
    let (ok, said) = ferry(&url, &["commit", "shop"]);
    assert!(ok, "{said}");
    for vm in ["db", "app1", "app2", "web"] {
        let item = ferry_testkit::protected_item(&registry, vm).await.unwrap();
        assert_eq!(
            item.state(),
            ferry_proto::registry::v1::ReplicationState::Committed,
            "{vm}"
        );
    }
    assert_eq!(
        target_vm_names(&url).await,
        vec!["app1", "app2", "db", "web"]
    );
    // Replication groups are not re-protected: refused, nothing started.
    let (ok, said) = ferry(&url, &["reprotect", "shop"]);
    assert!(!ok, "{said}");
    assert!(said.contains("groups are not re-protected"), "{said}");
    let (ok, said) = ferry(&url, &["delete", "shop"]);
    assert!(ok, "{said}");

    for a in agents {
        a.stop(Duration::from_secs(5)).await.unwrap();
    }
    cluster.stop().await;
}
