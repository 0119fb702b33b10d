//! `ferry plan`: recovery plans (failover-svc's), and their jobs followed
//! until they end or wait at a manual action.

use anyhow::{anyhow, bail, Result};
use clap::Subcommand;
use ferry_proto::failover::v1 as fo;
use ferry_proto::failover::v1::failover_client::FailoverClient;
use ferry_runtime::PeerChannel;
use serde_json::{json, Value};

use crate::args::Output;
use crate::recovery::{choice, failover_client, job_json, job_text};

#[derive(Subcommand)]
pub enum PlanCommand {
    /// Create an empty plan.
    Create {
        /// The plan's name.
        name: String,
    },
    /// Show a plan: its groups in order, with their actions.
    Show {
        /// The plan.
        name: String,
    },
    /// Every plan.
    List,
    /// Delete a plan (not while its job runs).
    Delete {
        /// The plan.
        name: String,
    },
    /// Append a group: VMs and replication groups failed over together,
    /// after every earlier group.
    AddGroup {
        /// The plan.
        plan: String,
        /// A protected VM (not in a replication group); repeatable.
        #[arg(long = "vm")]
        vms: Vec<String>,
        /// A replication group, failed over as a whole; repeatable.
        #[arg(long = "replication-group")]
        groups: Vec<String>,
    },
    /// Add an action before (--pre) or after (--post) a group: a script of
    /// failover-svc's plan scripts directory, or a manual step the plan's
    /// job waits at until `ferry plan resume`.
    AddAction {
        /// The plan.
        plan: String,
        /// The group, 1-based.
        #[arg(long)]
        group: u32,
        /// The action's name.
        #[arg(long)]
        name: String,
        /// Before the group's VMs (the default).
        #[arg(long, conflicts_with = "post")]
        pre: bool,
        /// After every VM of the group is up.
        #[arg(long)]
        post: bool,
        /// A script's file name in failover-svc's plan scripts directory.
        #[arg(long, conflicts_with = "manual", required_unless_present = "manual")]
        script: Option<String>,
        /// Seconds the script may run (default 300).
        #[arg(long, requires = "script")]
        timeout: Option<u32>,
        /// A manual step: what a person does before the plan goes on.
        #[arg(long)]
        manual: Option<String>,
    },
    /// Fail the plan over, group by group (unplanned by default).
    Failover {
        /// The plan.
        plan: String,
        /// A test failover into an isolated network.
        #[arg(long)]
        test: bool,
        /// The isolated network of a test failover.
        #[arg(long)]
        network: Option<String>,
        /// A planned failover: every VM drained first.
        #[arg(long, conflicts_with = "test")]
        planned: bool,
        /// latest, latest-processed (default), latest-app or
        /// latest-multi-vm; replication groups always use their multi-VM
        /// points.
        #[arg(long)]
        point: Option<String>,
        /// Return once the job is accepted.
        #[arg(long)]
        no_wait: bool,
    },
    /// Commit the plan's failover.
    Commit {
        /// The plan.
        plan: String,
        /// Return once the job is accepted.
        #[arg(long)]
        no_wait: bool,
    },
    /// Remove everything the plan's test failover created.
    CleanupTest {
        /// The plan.
        plan: String,
        /// Return once the job is accepted.
        #[arg(long)]
        no_wait: bool,
    },
    /// Re-protect every VM of the plan after its committed failover.
    Reprotect {
        /// The plan.
        plan: String,
        /// Return once the job is accepted.
        #[arg(long)]
        no_wait: bool,
    },
    /// Go on past the manual action the plan's job waits at, or, after a
    /// failure is fixed, from the stage that failed.
    Resume {
        /// The plan.
        plan: String,
        /// Return once the job is accepted.
        #[arg(long)]
        no_wait: bool,
    },
}

fn plan_json(p: &fo::RecoveryPlan) -> Value {
    let action = |a: &fo::PlanAction| match &a.kind {
        Some(fo::plan_action::Kind::Script(s)) => {
            json!({"name": a.name, "script": s.script, "timeout_seconds": s.timeout_seconds})
        }
        Some(fo::plan_action::Kind::Manual(m)) => json!({"name": a.name, "manual": m.text}),
        None => json!({"name": a.name}),
    };
    json!({
        "name": p.name,
        "groups": p.groups.iter().map(|g| json!({
            "vms": g.vm_names,
            "replication_groups": g.replication_groups,
            "pre": g.pre.iter().map(action).collect::<Vec<_>>(),
            "post": g.post.iter().map(action).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
    })
}

fn plan_text(p: &fo::RecoveryPlan) -> String {
    let action = |a: &fo::PlanAction| match &a.kind {
        Some(fo::plan_action::Kind::Script(s)) => format!("{} (script {})", a.name, s.script),
        Some(fo::plan_action::Kind::Manual(m)) => format!("{} (manual: {})", a.name, m.text),
        None => a.name.clone(),
    };
    let mut out = format!("plan {}: {} group(s)\n", p.name, p.groups.len());
    for (i, g) in p.groups.iter().enumerate() {
        let mut members: Vec<String> = g.vm_names.clone();
        members.extend(g.replication_groups.iter().map(|r| format!("group:{r}")));
        out.push_str(&format!("  group {}: {}\n", i + 1, members.join(", ")));
        for a in &g.pre {
            out.push_str(&format!("    pre  {}\n", action(a)));
        }
        for a in &g.post {
            out.push_str(&format!("    post {}\n", action(a)));
        }
    }
    out
}

/// Follows a plan's job until it ends or waits at a manual action.
async fn follow(client: &mut FailoverClient<PeerChannel>, id: &str) -> Result<fo::Job> {
    let mut stream = client
        .watch_job(fo::WatchJobRequest { id: id.to_string() })
        .await
        .map_err(|s| anyhow!("watch job {id}: {}", s.message()))?
        .into_inner();
    let mut last = None;
    while let Some(job) = stream
        .message()
        .await
        .map_err(|s| anyhow!("watch job {id}: {}", s.message()))?
    {
        let stop = !job.waiting_for.is_empty();
        last = Some(job);
        if stop {
            break;
        }
    }
    last.ok_or_else(|| anyhow!("job {id} sent nothing"))
}

async fn show_job(
    client: &mut FailoverClient<PeerChannel>,
    out: Output,
    job: fo::Job,
    no_wait: bool,
) -> Result<()> {
    let job = if no_wait {
        job
    } else {
        follow(client, &job.id).await?
    };
    match out {
        Output::Json => println!("{:#}", job_json(&job)),
        Output::Table => print!("{}", job_text(&job)),
    }
    if job.state == fo::JobState::Failed as i32 {
        bail!("plan job {} failed: {}", job.id, job.error);
    }
    Ok(())
}

pub async fn run(url: &str, out: Output, cmd: PlanCommand) -> Result<()> {
    let mut c = failover_client(url)?;
    let err = crate::recovery::status("failover-svc", url);
    let plan = |p: fo::RecoveryPlan| -> Result<()> {
        match out {
            Output::Json => println!("{:#}", plan_json(&p)),
            Output::Table => print!("{}", plan_text(&p)),
        }
        Ok(())
    };
    let start = |plan: String, operation: fo::PlanOperation| fo::StartPlanRequest {
        plan,
        operation: operation as i32,
        ..Default::default()
    };
    match cmd {
        PlanCommand::Create { name } => plan(
            c.create_plan(fo::CreatePlanRequest { name })
                .await
                .map_err(&err)?
                .into_inner(),
        ),
        PlanCommand::Show { name } => plan(
            c.get_plan(fo::GetPlanRequest { name })
                .await
                .map_err(&err)?
                .into_inner(),
        ),
        PlanCommand::List => {
            let plans = c
                .list_plans(fo::ListPlansRequest {})
                .await
                .map_err(&err)?
                .into_inner()
                .plans;
            match out {
                Output::Json => {
                    println!("{:#}", Value::Array(plans.iter().map(plan_json).collect()))
                }
                Output::Table => plans.iter().for_each(|p| print!("{}", plan_text(p))),
            }
            Ok(())
        }
        PlanCommand::Delete { name } => {
            c.delete_plan(fo::DeletePlanRequest { name: name.clone() })
                .await
                .map_err(&err)?;
            println!("plan {name} deleted");
            Ok(())
        }
        PlanCommand::AddGroup {
            plan: p,
            vms,
            groups,
        } => plan(
            c.add_plan_group(fo::AddPlanGroupRequest {
                plan: p,
                vm_names: vms,
                replication_groups: groups,
            })
            .await
            .map_err(&err)?
            .into_inner(),
        ),
        PlanCommand::AddAction {
            plan: p,
            group,
            name,
            pre: _,
            post,
            script,
            timeout,
            manual,
        } => {
            let kind = match (script, manual) {
                (Some(script), _) => fo::plan_action::Kind::Script(fo::ScriptAction {
                    script,
                    timeout_seconds: timeout.unwrap_or(0),
                }),
                (None, Some(text)) => fo::plan_action::Kind::Manual(fo::ManualAction { text }),
                (None, None) => bail!("give --script FILE or --manual TEXT"),
            };
            plan(
                c.add_plan_action(fo::AddPlanActionRequest {
                    plan: p,
                    group,
                    when: if post {
                        fo::ActionWhen::Post
                    } else {
                        fo::ActionWhen::Pre
                    } as i32,
                    action: Some(fo::PlanAction {
                        name,
                        kind: Some(kind),
                    }),
                })
                .await
                .map_err(&err)?
                .into_inner(),
            )
        }
        PlanCommand::Failover {
            plan: p,
            test,
            network,
            planned,
            point,
            no_wait,
        } => {
            if test && network.is_none() {
                bail!("a test failover needs --network NAME (an isolated network)");
            }
            let kind = if test {
                fo::FailoverKind::Test
            } else if planned {
                fo::FailoverKind::Planned
            } else {
                fo::FailoverKind::Unplanned
            };
            let job = c
                .start_plan(fo::StartPlanRequest {
                    kind: kind as i32,
                    point: Some(fo::PointChoice {
                        choice: Some(choice(point.as_deref().unwrap_or("latest-processed"))),
                    }),
                    test_network: network.unwrap_or_default(),
                    ..start(p, fo::PlanOperation::Failover)
                })
                .await
                .map_err(&err)?
                .into_inner();
            show_job(&mut c, out, job, no_wait).await
        }
        PlanCommand::Commit { plan: p, no_wait } => {
            let job = c
                .start_plan(start(p, fo::PlanOperation::Commit))
                .await
                .map_err(&err)?
                .into_inner();
            show_job(&mut c, out, job, no_wait).await
        }
        PlanCommand::CleanupTest { plan: p, no_wait } => {
            let job = c
                .start_plan(start(p, fo::PlanOperation::CleanupTest))
                .await
                .map_err(&err)?
                .into_inner();
            show_job(&mut c, out, job, no_wait).await
        }
        PlanCommand::Reprotect { plan: p, no_wait } => {
            let job = c
                .start_plan(start(p, fo::PlanOperation::Reprotect))
                .await
                .map_err(&err)?
                .into_inner();
            show_job(&mut c, out, job, no_wait).await
        }
        PlanCommand::Resume { plan: p, no_wait } => {
            let job = c
                .resume_plan(fo::ResumePlanRequest { plan: p })
                .await
                .map_err(&err)?
                .into_inner();
            // The job may be past the action already: follow it afresh.
            show_job(
                &mut c,
                out,
                fo::Job {
                    waiting_for: String::new(),
                    ..job
                },
                no_wait,
            )
            .await
        }
    }
}
