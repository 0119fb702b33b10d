//! `ferry certs`: the certificates a TLS deployment of Ferry runs on — a CA
//! and a certificate naming each service, agent and operator (see
//! docs/security.md, "Certificates").

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use ferry_proto::ids::VmName;
use ferry_runtime::security::pki::{self, InitOptions, DEFAULT_LEAF_DAYS};
use ferry_runtime::security::{OperatorRole, Principal, ServiceKind};

#[derive(Subcommand)]
pub enum CertsCommand {
    /// Create a new CA in DIR and a certificate for each of the four
    /// services, plus the agents and operators named; refuses if DIR holds
    /// a ca.pem already.
    Init(InitArgs),
    /// Issue one more certificate from the CA in DIR (as `init` wrote it);
    /// refuses to overwrite an existing file.
    Issue(IssueArgs),
}

#[derive(Args)]
pub struct InitArgs {
    /// The directory to write into (created if missing).
    pub dir: PathBuf,
    /// An extra DNS name or IP address for every service and agent
    /// certificate (they always have localhost, 127.0.0.1 and ::1, services
    /// also their Kubernetes Service names); repeatable.
    #[arg(long = "host", value_name = "H")]
    pub hosts: Vec<String>,
    /// A VM whose agent gets a certificate (agent-VM.pem); repeatable.
    #[arg(long = "agent", value_name = "VM", value_parser = parse_vm)]
    pub agents: Vec<VmName>,
    /// An operator who gets a certificate (operator-NAME.pem), ROLE reader,
    /// operator or admin; repeatable.
    #[arg(long = "operator", value_name = "NAME:ROLE", value_parser = parse_operator)]
    pub operators: Vec<(String, OperatorRole)>,
    /// Days the service, agent and operator certificates are valid (the CA:
    /// ten years, or this if longer).
    #[arg(long, value_name = "N", default_value_t = DEFAULT_LEAF_DAYS)]
    pub days: u32,
}

#[derive(Args)]
#[command(group(clap::ArgGroup::new("principal").required(true).args(["service", "agent", "operator"])))]
pub struct IssueArgs {
    /// The directory holding ca.pem and ca-key.pem; the new pair is written
    /// there too.
    pub dir: PathBuf,
    /// A service's certificate: registry, cache, processor or failover.
    #[arg(long, value_name = "S")]
    pub service: Option<ServiceKind>,
    /// The certificate of the agent protecting VM.
    #[arg(long, value_name = "VM", value_parser = parse_vm)]
    pub agent: Option<VmName>,
    /// An operator's certificate, ROLE reader, operator or admin.
    #[arg(long, value_name = "NAME:ROLE", value_parser = parse_operator)]
    pub operator: Option<(String, OperatorRole)>,
    /// An extra DNS name or IP address the certificate is valid for;
    /// repeatable.
    #[arg(long = "host", value_name = "H")]
    pub hosts: Vec<String>,
    /// Days the certificate is valid.
    #[arg(long, value_name = "N", default_value_t = DEFAULT_LEAF_DAYS)]
    pub days: u32,
}

fn parse_vm(s: &str) -> Result<VmName, String> {
    VmName::parse(s).map_err(|e| e.to_string())
}

fn parse_operator(s: &str) -> Result<(String, OperatorRole), String> {
    let (name, role) = s
        .rsplit_once(':')
        .ok_or_else(|| format!("{s:?} is not NAME:ROLE (e.g. alice:admin)"))?;
    ferry_proto::ids::check_name("operator name", name).map_err(|e| e.to_string())?;
    Ok((name.to_string(), role.parse()?))
}

/// Runs one `ferry certs` command, printing each file written.
pub fn run(command: CertsCommand) -> Result<()> {
    let (dir, written) = match command {
        CertsCommand::Init(a) => {
            let options = InitOptions {
                hosts: a.hosts,
                agents: a.agents,
                operators: a.operators,
                days: Some(a.days),
            };
            let written = pki::init(&a.dir, &options)
                .with_context(|| format!("creating a PKI in {}", a.dir.display()))?;
            (a.dir, written)
        }
        CertsCommand::Issue(a) => {
            let principal = match (a.service, a.agent, a.operator) {
                (Some(service), None, None) => Principal::Service { service },
                (None, Some(vm), None) => Principal::Agent { vm },
                (None, None, Some((name, role))) => Principal::Operator { name, role },
                // clap's "principal" group admits exactly one.
                _ => anyhow::bail!("give exactly one of --service, --agent and --operator"),
            };
            let written = pki::issue_into(&a.dir, &principal, &a.hosts, Some(a.days))
                .with_context(|| {
                    format!(
                        "issuing a certificate for {principal} from {}",
                        a.dir.display()
                    )
                })?;
            (a.dir, written)
        }
    };
    print_written(&dir, &written);
    Ok(())
}

fn print_written(dir: &Path, written: &[PathBuf]) {
    println!("wrote into {}:", dir.display());
    for path in written {
        println!("  {}", path.display());
    }
}
