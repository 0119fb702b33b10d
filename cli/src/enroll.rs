//! `ferry agent enroll VM` (and the token `ferry enable` prints): the
//! one-time token an agent shows at its first registration for a VM.
//! Printed once, alone on its stdout line in table output so that scripts
//! can capture it; registry keeps only its hash. And `ferry agent token VM`:
//! the agent's bearer token, made offline from the cluster secret.

use std::time::Duration;

use anyhow::{anyhow, Result};
use ferry_proto::ids::VmName;
use ferry_proto::registry::v1 as pb;
use ferry_runtime::security::{ClusterSecret, Principal};
use serde_json::{json, Value};

use crate::args::{AgentCommand, Output};
use crate::commands::{client, status, Client};
use crate::output;

/// How long the token `ferry enable` prints is accepted.
pub const DEFAULT_VALID_FOR: Duration = Duration::from_secs(24 * 3600);

/// Issues an enrollment token for `vm`, valid for `valid_for`.
pub async fn issue(
    c: &mut Client,
    vm: &str,
    valid_for: Duration,
) -> Result<pb::EnrollmentToken, tonic::Status> {
    let ttl_seconds = u32::try_from(valid_for.as_secs()).unwrap_or(u32::MAX);
    if valid_for.is_zero() || ttl_seconds == 0 {
        return Err(tonic::Status::invalid_argument(
            "--valid-for must be at least one second",
        ));
    }
    Ok(c.create_enrollment_token(pb::CreateEnrollmentTokenRequest {
        vm_name: vm.to_string(),
        ttl_seconds,
    })
    .await?
    .into_inner())
}

/// The token as `--output json` shows it.
pub fn token_json(t: &pb::EnrollmentToken) -> Value {
    json!({
        "vm": t.vm_name,
        "token": t.token,
        "expires_at": output::time_json(&t.expires_at),
    })
}

/// The line that introduces the token in table output (to stderr).
pub fn introduce(t: &pb::EnrollmentToken) -> String {
    format!(
        "Enrollment token for the agent of VM {:?}: one use, valid until {}; give it to \
         `ferry-agent --enrollment-token-file`. It is not shown again.",
        t.vm_name,
        output::time(&t.expires_at)
    )
}

pub async fn run(url: &str, out: Output, command: AgentCommand) -> Result<()> {
    match command {
        AgentCommand::Enroll { vm, valid_for } => {
            let mut c = client(url)?;
            let err = status(url);
            let token = issue(&mut c, &vm, valid_for).await.map_err(&err)?;
            match out {
                Output::Json => println!("{:#}", token_json(&token)),
                Output::Table => {
                    eprintln!("{}", introduce(&token));
                    println!("{}", token.token);
                }
            }
        }
        AgentCommand::Token {
            vm,
            cluster_secret_file,
        } => {
            let vm = VmName::parse(&vm).map_err(|e| anyhow!("VM name {vm:?}: {e}"))?;
            let secret = ClusterSecret::load(&cluster_secret_file)?;
            let token = secret
                .token_for(&Principal::Agent { vm: vm.clone() })
                .ok_or_else(|| anyhow!("cannot make an agent token from this secret"))?;
            match out {
                Output::Json => println!("{:#}", json!({ "vm": vm.as_str(), "token": token })),
                Output::Table => println!("{token}"),
            }
        }
    }
    Ok(())
}
