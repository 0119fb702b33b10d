//! The command line.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// Where the options every command that calls the services takes are shown
/// in each command's help, apart from the command's own.
const CLIENT: &str = "Options for calling the services (every command that calls them)";

/// Ferry: disaster recovery for your virtual machines.
#[derive(Parser)]
#[command(name = "ferry", version)]
pub struct Cli {
    /// URL of registry-svc.
    #[arg(
        long,
        global = true,
        help_heading = CLIENT,
        env = "FERRY_REGISTRY",
        default_value = "http://127.0.0.1:7101"
    )]
    pub registry: String,
    /// URL of processor-svc (recovery points).
    #[arg(
        long,
        global = true,
        help_heading = CLIENT,
        env = "FERRY_PROCESSOR",
        default_value = "http://127.0.0.1:7103"
    )]
    pub processor: String,
    /// URL of failover-svc (failover, jobs, target networks and VMs).
    #[arg(
        long,
        global = true,
        help_heading = CLIENT,
        env = "FERRY_FAILOVER",
        default_value = "http://127.0.0.1:7104"
    )]
    pub failover: String,
    /// Tables for people or JSON for scripts.
    #[arg(long, global = true,
        help_heading = CLIENT, value_enum, default_value_t = Output::Table)]
    pub output: Output,
    /// Bearer token to call the services with (an operator token from
    /// `ferry token create`). Prefer the environment variable: a flag shows
    /// in the process list.
    #[arg(long, global = true,
        help_heading = CLIENT, env = "FERRY_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// CA certificate (PEM) to verify the services with; needed for https://
    /// URLs.
    #[arg(long, global = true,
        help_heading = CLIENT, env = "FERRY_TLS_CA", value_name = "PEM")]
    pub tls_ca: Option<PathBuf>,
    /// Client certificate (PEM) to present, e.g. an operator certificate
    /// from `ferry certs`; instead of or beside --token.
    #[arg(long, global = true,
        help_heading = CLIENT, env = "FERRY_TLS_CERT", value_name = "PEM")]
    pub tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM).
    #[arg(long, global = true,
        help_heading = CLIENT, env = "FERRY_TLS_KEY", value_name = "PEM")]
    pub tls_key: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

/// How results are printed.
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Table,
    Json,
}

#[derive(Subcommand)]
pub enum Command {
    /// The regions the registry knows, with the services of those that
    /// have their own.
    Regions,
    /// Set the cache-svc and processor-svc serving a region (admin): items
    /// enabled afterwards are placed on them. Empty URLs: the defaults.
    RegionServices {
        /// The region.
        region: String,
        /// The cache-svc the agents of VMs in this region stream to.
        #[arg(long, default_value = "")]
        cache: String,
        /// The processor-svc applying the items replicating into it (its
        /// `[processor] endpoint`).
        #[arg(long, default_value = "")]
        processor: String,
    },
    /// Register a source VM.
    Register(RegisterArgs),
    /// The registered VMs.
    Vms,
    /// Forget a registered VM (its replication must be disabled).
    Unregister {
        /// The registered VM.
        name: String,
    },
    /// Enable replication of a VM into a target region.
    Enable(EnableArgs),
    /// At a glance: the services (reachable, health, version) and every
    /// protected item (state, health, RPO, backlog, newest point, jobs).
    Status(StatusArgs),
    /// The protected items: state, progress, health, RPO.
    List,
    /// Everything about one protected item.
    Show {
        /// The protected VM.
        vm: String,
    },
    /// Disable replication of a VM.
    Disable {
        /// The protected VM.
        vm: String,
    },
    /// Follow protected-item changes as they happen.
    Watch {
        /// Only this VM.
        vm: Option<String>,
    },
    /// Replication policies.
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// Network mappings between regions.
    #[command(subcommand)]
    Mapping(MappingCommand),
    /// Replication groups (multi-VM consistency).
    #[command(subcommand)]
    Group(GroupCommand),
    /// A VM's recovery points, newest first.
    Points(PointsArgs),
    /// Fail a VM over to a recovery point (unplanned by default, --test for a
    /// drill); `ferry failover commit VM`, `ferry failover cleanup-test VM`.
    Failover(FailoverArgs),
    /// Re-protect a committed VM: it replicates back from the failed-over VM
    /// to its original region (only the chunks that differ from the original
    /// disks cross). Fail back later with `ferry failover VM --planned`.
    Reprotect {
        /// The committed VM.
        vm: String,
        /// Return once the job is accepted instead of following it.
        #[arg(long)]
        no_wait: bool,
    },
    /// Failover, commit and cleanup jobs, newest first.
    Jobs(JobsArgs),
    /// Recovery plans: groups of VMs failed over in order, with scripts and
    /// manual steps before and after each group.
    #[command(subcommand)]
    Plan(crate::plan::PlanCommand),
    /// Virtual networks of the target regions (test failovers use them).
    #[command(subcommand)]
    Network(NetworkCommand),
    /// The VMs failovers created in target regions.
    TargetVms {
        /// Only those of this source VM.
        vm: Option<String>,
    },
    /// Certificates for TLS: a CA and certificates naming services, agents
    /// and operators.
    #[command(subcommand)]
    Certs(crate::certs::CertsCommand),
    /// Operator bearer tokens: create (shown once), list, revoke.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Agents: issue the one-time token an agent enrolls with.
    #[command(subcommand)]
    Agent(AgentCommand),
    /// The audit trail: mutating calls, allowed or refused, as registry,
    /// processor and failover recorded them (admins only).
    Audit(AuditArgs),
    /// Run all four services in this process (the embedded default).
    Serve(ServeArgs),
    /// Run the services in-process and walk through protecting a sample VM.
    Demo {
        /// Keep the demo's data here instead of a temporary directory.
        #[arg(long)]
        data_dir: Option<PathBuf>,
    },
}

#[derive(Args)]
pub struct RegisterArgs {
    /// The VM's name.
    pub name: String,
    /// Its source region.
    #[arg(long)]
    pub region: String,
    /// Its resource group.
    #[arg(long)]
    pub resource_group: String,
    /// Its virtual network.
    #[arg(long)]
    pub vnet: String,
    /// Its subnet in that network.
    #[arg(long)]
    pub subnet: String,
    /// Its availability set; none by default.
    #[arg(long, default_value = "")]
    pub availability_set: String,
    /// NAME=IP or NAME=IP,MAC (the MAC the failed-over NIC keeps; derived
    /// from the names when left out), repeatable.
    #[arg(long = "nic", required = true)]
    pub nics: Vec<String>,
    /// id=ID,size=SIZE,role=os|data,storage=managed|unmanaged,path=PATH; repeatable.
    #[arg(long = "disk", required = true)]
    pub disks: Vec<String>,
    /// Virtual CPUs the failed-over VM gets (1 by default).
    #[arg(long, default_value_t = 0, hide_default_value = true)]
    pub vcpus: u32,
    /// Its memory in MiB (512 by default).
    #[arg(long, default_value_t = 0, hide_default_value = true)]
    pub memory_mib: u64,
    /// Its firmware: bios or uefi.
    #[arg(long, default_value = "bios")]
    pub firmware: String,
    /// Direct kernel boot: the kernel's path on the target hypervisor host;
    /// without it the VM boots from its OS disk.
    #[arg(long, default_value = "")]
    pub kernel: String,
    /// The initrd's path on the target host (with --kernel).
    #[arg(long, default_value = "")]
    pub initrd: String,
    /// The kernel command line (with --kernel).
    #[arg(long, default_value = "")]
    pub cmdline: String,
    /// Text the guest prints on its serial console once ready; failover
    /// waits for it after starting the VM.
    #[arg(long, default_value = "")]
    pub ready_marker: String,
}

#[derive(Args)]
pub struct EnableArgs {
    /// The registered VM to protect.
    pub vm: String,
    /// The region it fails over to (not its own).
    #[arg(long)]
    pub target_region: String,
    /// The replication policy; the registry's "default" policy when unset.
    #[arg(long, default_value = "")]
    pub policy: String,
    /// A replication group to join (multi-VM consistent points); none by
    /// default.
    #[arg(long, default_value = "")]
    pub group: String,
    /// Default: the source's resource group with "-ferry" (docs/naming.md).
    #[arg(long, default_value = "")]
    pub target_resource_group: String,
    /// Default: the network a mapping of the source's names (`ferry
    /// mapping`), else the source's network with "-ferry".
    #[arg(long, default_value = "")]
    pub target_vnet: String,
    /// Default: the subnet of the source's name in the target network.
    #[arg(long, default_value = "")]
    pub target_subnet: String,
    /// Default: the source's with "-ferry", if the source has one.
    #[arg(long, default_value = "")]
    pub target_availability_set: String,
    /// The cache storage in the source region; default
    /// "<source region>-cache-ferry".
    #[arg(long, default_value = "")]
    pub cache_storage: String,
    /// For unmanaged disks: the target storage account; default
    /// "<resource group>-storage-ferry".
    #[arg(long, default_value = "")]
    pub target_storage_account: String,
    /// DISK=NAME, repeatable.
    #[arg(long = "replica-disk-name")]
    pub replica_disk_names: Vec<String>,
}

#[derive(Subcommand)]
pub enum PolicyCommand {
    /// Create a policy; unset durations take the registry's defaults.
    Create(PolicyArgs),
    /// Every policy.
    List,
    /// One policy.
    Show {
        /// The policy.
        name: String,
    },
    /// Delete a policy no protected item uses.
    Delete {
        /// The policy.
        name: String,
    },
}

#[derive(Args)]
pub struct PolicyArgs {
    /// The policy's name.
    pub name: String,
    /// How long points are kept, e.g. 24h (at most 15 days).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub retention: Option<Duration>,
    /// Time between crash-consistent points, e.g. 5s.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub crash_interval: Option<Duration>,
    /// Time between app-consistent points, e.g. 4h; 0s turns them off.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub app_frequency: Option<Duration>,
    /// Multi-VM consistency for the replication groups that use it.
    #[arg(long)]
    pub multi_vm: bool,
    /// Time between multi-VM points of a group, e.g. 5m.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub multi_vm_interval: Option<Duration>,
    /// Every point is kept this long, e.g. 2h; older ones are thinned.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub keep_all_for: Option<Duration>,
    /// Past --keep-all-for, one point is kept per this much time, e.g. 1h.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub thinned_spacing: Option<Duration>,
}

#[derive(Subcommand)]
pub enum MappingCommand {
    /// Map a network into another region (the reverse is created too).
    Create {
        /// The region of the network mapped.
        #[arg(long)]
        source_region: String,
        /// The network mapped.
        #[arg(long)]
        source_network: String,
        /// The region it maps into.
        #[arg(long)]
        target_region: String,
        /// The network failed-over VMs join there.
        #[arg(long)]
        target_network: String,
    },
    /// Every mapping.
    List,
    /// Delete a mapping (and its reverse).
    Delete {
        /// The mapping's id, as `ferry mapping list` shows it.
        id: String,
    },
}

#[derive(Subcommand)]
pub enum GroupCommand {
    /// Create a replication group; VMs join with `ferry enable --group`.
    Create {
        /// The group's name.
        name: String,
        /// Its policy (with multi-VM consistency for multi-VM points).
        #[arg(long)]
        policy: String,
    },
    /// Every group.
    List,
    /// One group and its members.
    Show {
        /// The group.
        name: String,
    },
    /// Delete a group without members.
    Delete {
        /// The group.
        name: String,
    },
}

#[derive(Args)]
pub struct StatusArgs {
    /// Redraw in place every --interval until Ctrl-C (with --output json:
    /// one object per line per refresh).
    #[arg(long)]
    pub watch: bool,
    /// How often --watch refreshes, e.g. 2s.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "2s")]
    pub interval: Duration,
    /// Also probe cache-svc at this URL (it serves the source region, so the
    /// CLI does not know it otherwise).
    #[arg(long, env = "FERRY_CACHE")]
    pub cache: Option<String>,
}

#[derive(Args)]
pub struct ServeArgs {
    /// Where the services keep their state, one directory each, beside the
    /// cluster secret and the admin token file.
    #[arg(long, default_value = "ferry-data")]
    pub data_dir: PathBuf,
    /// The address the four services listen on. Loopback unless --insecure:
    /// `ferry serve` speaks plaintext (every call is still checked).
    #[arg(long, default_value = "127.0.0.1")]
    pub listen_host: String,
    /// registry on this port, cache +1, processor +2, failover +3.
    #[arg(long, default_value_t = 7101)]
    pub base_port: u16,
    /// Listen beyond loopback in plaintext anyway (tokens then cross the
    /// network unencrypted; run the service binaries with TLS instead).
    #[arg(long)]
    pub insecure: bool,
}

#[derive(Args)]
pub struct PointsArgs {
    /// The VM whose points to list.
    #[arg(required_unless_present = "group")]
    pub vm: Option<String>,
    /// A replication group's multi-VM points instead.
    #[arg(long, conflicts_with = "vm")]
    pub group: Option<String>,
    /// Only this kind: crash, app or multi-vm.
    #[arg(long)]
    pub kind: Option<String>,
    /// At most this many.
    #[arg(long, default_value_t = 0)]
    pub limit: u32,
}

#[derive(Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct FailoverArgs {
    #[command(subcommand)]
    pub action: Option<FailoverAction>,
    /// The VM to fail over.
    pub vm: Option<String>,
    /// A whole replication group instead (to a multi-VM point).
    #[arg(long, conflicts_with = "vm")]
    pub group: Option<String>,
    /// latest, latest-processed, latest-app, latest-multi-vm, or a point id
    /// (for a group: latest-multi-vm or a bookmark id). Default:
    /// latest-processed, for a group latest-multi-vm.
    #[arg(long)]
    pub point: Option<String>,
    /// A test failover (a drill): replication goes on.
    #[arg(long)]
    pub test: bool,
    /// The isolated network of a test failover.
    #[arg(long)]
    pub network: Option<String>,
    /// A planned failover (the source is reachable).
    #[arg(long, conflicts_with = "test")]
    pub planned: bool,
    /// Instant failover (one VM, onto a libvirt region): the VM starts at
    /// once on local overlays of the point, served over NBD, and its disks
    /// hydrate in the background; the job ends when it runs from local
    /// images only.
    #[arg(long, conflicts_with = "group")]
    pub instant: bool,
    /// Failback of a re-protected VM: create a new VM in the original region
    /// instead of writing into the original disks (original-location
    /// recovery, the default while they exist).
    #[arg(long, conflicts_with_all = ["group", "test", "instant"])]
    pub alternate_location: bool,
    /// Return once the job is accepted instead of following it.
    #[arg(long)]
    pub no_wait: bool,
}

#[derive(Subcommand)]
pub enum FailoverAction {
    /// Commit a failed-over VM (or group): its points are released.
    Commit {
        /// The failed-over VM.
        #[arg(required_unless_present = "group")]
        vm: Option<String>,
        /// A whole replication group.
        #[arg(long, conflicts_with = "vm")]
        group: Option<String>,
    },
    /// Remove everything a test failover of a VM (or group) created.
    CleanupTest {
        /// The VM whose test failover to clean up.
        #[arg(required_unless_present = "group")]
        vm: Option<String>,
        /// A whole replication group.
        #[arg(long, conflicts_with = "vm")]
        group: Option<String>,
    },
}

#[derive(Args)]
pub struct JobsArgs {
    /// Only this VM's jobs.
    #[arg(long)]
    pub vm: Option<String>,
    /// At most this many.
    #[arg(long, default_value_t = 20)]
    pub limit: u32,
    /// Follow the unfinished ones until they end.
    #[arg(long)]
    pub watch: bool,
}

#[derive(Args)]
pub struct AuditArgs {
    /// Only calls acting on this VM.
    #[arg(long)]
    pub vm: Option<String>,
    /// Only calls since then: a duration back ("1h", "30m", "2d") or an
    /// RFC 3339 time.
    #[arg(long)]
    pub since: Option<String>,
    /// At most this many, the newest.
    #[arg(long, default_value_t = 100)]
    pub limit: u32,
}

#[derive(Subcommand)]
pub enum NetworkCommand {
    /// Create a network in a target region.
    Create {
        /// The network's name.
        name: String,
        /// Its target region.
        #[arg(long)]
        region: String,
        /// Its resource group there.
        #[arg(long)]
        resource_group: String,
        /// NAME=CIDR, repeatable.
        #[arg(long = "subnet", required = true)]
        subnets: Vec<String>,
    },
    /// List networks.
    List {
        /// Only this region's.
        #[arg(long)]
        region: Option<String>,
    },
    /// Delete a network no VM is in (and its libvirt networks).
    Delete {
        /// The network's name.
        name: String,
        /// Its target region.
        #[arg(long)]
        region: String,
    },
}

#[derive(Subcommand)]
pub enum AgentCommand {
    /// Issue a one-time enrollment token for the agent of a protected VM and
    /// print it (shown only this once). Give it to `ferry-agent
    /// --enrollment-token-file`; a new one replaces an unused earlier one.
    Enroll {
        /// The protected VM.
        vm: String,
        /// How long the token is accepted (at most 7 days).
        #[arg(long, value_parser = humantime::parse_duration, default_value = "24h")]
        valid_for: Duration,
    },
    /// Print the agent token of a VM (`fyagent.<VM>.<MAC>`), made here from
    /// the deployment's cluster secret, for `ferry-agent --token-file` where
    /// agents have no certificates (e.g. against `ferry serve`, whose secret
    /// is DATA_DIR/cluster-secret). Calls no service.
    Token {
        /// The VM whose agent presents the token.
        vm: String,
        /// The cluster secret file the services were given.
        #[arg(long, env = "FERRY_CLUSTER_SECRET_FILE", value_name = "FILE")]
        cluster_secret_file: PathBuf,
    },
}

#[derive(Subcommand)]
pub enum TokenCommand {
    /// Create an operator token and print it; it is shown only this once.
    Create {
        /// The token's name: who or what holds it (letters, digits, '-', '_',
        /// '.'; unique among tokens).
        name: String,
        /// What the token may do; each role includes the ones before it.
        #[arg(long, value_enum)]
        role: TokenRole,
    },
    /// The operator tokens: name, role, creation time (never a secret).
    List,
    /// Revoke an operator token: it no longer authenticates.
    Revoke {
        /// The token's name.
        name: String,
    },
}

/// An operator token's role.
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum TokenRole {
    /// Reads: list, show, points, jobs, watch.
    Reader,
    /// Also runs recovery: failover, test failover, cleanup, commit, enable,
    /// disable, resync.
    Operator,
    /// Also administers: policies, mappings, groups, tokens, unregister.
    Admin,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    /// Every argument of `command` and its subcommands without help text,
    /// as "ferry sub --flag".
    fn undocumented(command: &clap::Command, path: &str, out: &mut Vec<String>) {
        for arg in command.get_arguments() {
            let id = arg.get_id().as_str();
            if matches!(id, "help" | "version") || arg.is_hide_set() {
                continue;
            }
            if arg.get_help().is_none() && arg.get_long_help().is_none() {
                out.push(format!("{path} {id}"));
            }
        }
        for sub in command.get_subcommands() {
            if sub.get_name() == "help" {
                continue;
            }
            if sub.get_about().is_none() && sub.get_long_about().is_none() {
                out.push(format!("{path} {} (the command)", sub.get_name()));
            }
            undocumented(sub, &format!("{path} {}", sub.get_name()), out);
        }
    }

    #[test]
    fn the_client_options_are_shown_apart_from_a_commands_own() {
        let command = Cli::command();
        for arg in command.get_arguments().filter(|a| a.is_global_set()) {
            assert_eq!(arg.get_help_heading(), Some(CLIENT), "{}", arg.get_id());
        }
        let serve = command.find_subcommand("serve").unwrap();
        for own in ["data_dir", "listen_host", "base_port", "insecure"] {
            let arg = serve.get_arguments().find(|a| a.get_id() == own).unwrap();
            assert_eq!(arg.get_help_heading(), None, "{own}");
        }
    }

    #[test]
    fn every_command_and_flag_has_help_text() {
        let mut missing = Vec::new();
        undocumented(&Cli::command(), "ferry", &mut missing);
        assert!(missing.is_empty(), "no help text: {missing:#?}");
    }
}
