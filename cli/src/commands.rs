//! The commands that talk to registry-svc.

use std::collections::HashMap;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use ferry_proto::registry::v1 as pb;
use ferry_proto::registry::v1::registry_client::RegistryClient;
use ferry_runtime::PeerChannel;
use serde_json::Value;

use crate::args::{
    Command, EnableArgs, GroupCommand, MappingCommand, Output, PolicyArgs, PolicyCommand,
    RegisterArgs,
};
use crate::output::{self, table};

pub type Client = RegistryClient<PeerChannel>;

/// A client for the registry at `url`.
pub fn client(url: &str) -> Result<Client> {
    let channel = ferry_runtime::connect(url, &crate::credentials::get())
        .with_context(|| format!("registry URL {url:?}"))?;
    Ok(RegistryClient::new(channel))
}

/// Turns a failed call into an error a person can act on.
pub fn status(url: &str) -> impl Fn(tonic::Status) -> anyhow::Error + '_ {
    move |s| {
        if s.code() == tonic::Code::Unavailable {
            anyhow!(
                "registry at {url} is unreachable ({}); start it (`ferry serve`) or pass --registry URL",
                s.message()
            )
        } else {
            anyhow!("{:?}: {}", s.code(), s.message())
        }
    }
}

/// Prints many items: a JSON array, or a table.
fn print_all<T>(
    out: Output,
    items: &[T],
    json: fn(&T) -> Value,
    headers: &[&str],
    row: fn(&T) -> Vec<String>,
) {
    let rows: Vec<_> = items.iter().map(row).collect();
    print(
        out,
        Value::Array(items.iter().map(json).collect()),
        table(headers, &rows),
    );
}

/// Prints one item: a JSON object, or a one-row table.
fn print_one<T>(
    out: Output,
    item: &T,
    json: fn(&T) -> Value,
    headers: &[&str],
    row: fn(&T) -> Vec<String>,
) {
    print(out, json(item), table(headers, &[row(item)]));
}

pub(crate) fn print(output: Output, json: Value, text: String) {
    match output {
        Output::Json => println!("{json:#}"),
        Output::Table => println!("{text}"),
    }
}

/// A size: bytes, or with K, M, G, T (powers of 1024), e.g. "64M", "1G".
pub fn parse_size(text: &str) -> Result<u64> {
    let t = text.trim();
    let (digits, shift) = match t.chars().last().map(|c| c.to_ascii_uppercase()) {
        Some('K') => (&t[..t.len() - 1], 10),
        Some('M') => (&t[..t.len() - 1], 20),
        Some('G') => (&t[..t.len() - 1], 30),
        Some('T') => (&t[..t.len() - 1], 40),
        _ => (t, 0),
    };
    let n: u64 = digits.parse().map_err(|_| {
        anyhow!("size {text:?} is not a number of bytes (suffixes K, M, G, T allowed)")
    })?;
    n.checked_mul(1u64 << shift)
        .ok_or_else(|| anyhow!("size {text:?} is too large"))
}

/// `id=ID,size=SIZE,role=os|data,storage=managed|unmanaged,path=PATH`.
pub fn parse_disk(spec: &str) -> Result<pb::Disk> {
    let mut fields: HashMap<&str, &str> = HashMap::new();
    for part in spec.split(',') {
        let (k, v) = part
            .split_once('=')
            .ok_or_else(|| anyhow!("disk {spec:?}: {part:?} is not key=value"))?;
        if fields.insert(k.trim(), v.trim()).is_some() {
            bail!("disk {spec:?}: {k} given twice");
        }
    }
    let get = |k: &str| fields.get(k).copied();
    for k in fields.keys() {
        if !["id", "size", "role", "storage", "path"].contains(k) {
            bail!("disk {spec:?}: unknown key {k:?} (id, size, role, storage, path)");
        }
    }
    let role = match get("role").unwrap_or("data") {
        "os" => pb::DiskRole::Os,
        "data" => pb::DiskRole::Data,
        other => bail!("disk {spec:?}: role {other:?} is not os or data"),
    };
    let storage = match get("storage").unwrap_or("managed") {
        "managed" => pb::DiskStorage::Managed,
        "unmanaged" => pb::DiskStorage::Unmanaged,
        other => bail!("disk {spec:?}: storage {other:?} is not managed or unmanaged"),
    };
    Ok(pb::Disk {
        id: get("id")
            .ok_or_else(|| anyhow!("disk {spec:?} needs id="))?
            .to_string(),
        size_bytes: parse_size(get("size").ok_or_else(|| anyhow!("disk {spec:?} needs size="))?)?,
        role: role as i32,
        storage: storage as i32,
        source_path: get("path")
            .ok_or_else(|| anyhow!("disk {spec:?} needs path="))?
            .to_string(),
    })
}

fn pair<'a>(what: &str, spec: &'a str) -> Result<(&'a str, &'a str)> {
    spec.split_once('=')
        .ok_or_else(|| anyhow!("{what} {spec:?} is not NAME=VALUE"))
}

fn vm_row(v: &pb::Vm) -> Vec<String> {
    vec![
        v.name.clone(),
        v.source_region.clone(),
        v.resource_group.clone(),
        format!("{}/{}", v.virtual_network, v.subnet),
        v.nics.len().to_string(),
        v.disks
            .iter()
            .map(|d| format!("{}:{}", d.id, output::bytes(d.size_bytes)))
            .collect::<Vec<_>>()
            .join(" "),
    ]
}

fn item_row(i: &pb::ProtectedItem) -> Vec<String> {
    let source = i
        .source
        .as_ref()
        .map(|s| s.source_region.clone())
        .unwrap_or_default();
    let target = i
        .target
        .as_ref()
        .map(|t| t.region.clone())
        .unwrap_or_default();
    vec![
        i.vm_name.clone(),
        format!("{source}->{target}"),
        output::state(i.state),
        format!("{}%", i.initial_replication_percent),
        output::health(i.health),
        output::duration(&i.rpo),
        output::time(&i.last_recovery_point_time),
    ]
}

fn policy_row(p: &pb::ReplicationPolicy) -> Vec<String> {
    vec![
        p.name.clone(),
        output::duration(&p.recovery_point_retention),
        output::duration(&p.crash_consistent_interval),
        output::duration(&p.app_consistent_frequency),
        if p.multi_vm_consistency { "on" } else { "off" }.into(),
        format!(
            "all {}, then 1/{}",
            output::duration(&p.keep_all_points_for),
            output::duration(&p.thinned_point_spacing)
        ),
    ]
}

const POLICY_HEADERS: [&str; 6] = [
    "POLICY",
    "RETENTION",
    "CRASH",
    "APP",
    "MULTI-VM",
    "THINNING",
];

fn mapping_row(m: &pb::NetworkMapping) -> Vec<String> {
    vec![
        m.id.clone(),
        format!("{}/{}", m.source_region, m.source_network),
        format!("{}/{}", m.target_region, m.target_network),
    ]
}

fn group_row(g: &pb::ReplicationGroup) -> Vec<String> {
    vec![
        g.name.clone(),
        g.policy_name.clone(),
        output::or_dash(&g.target_region),
        output::or_dash(&g.coordinator),
        g.members.join(" "),
    ]
}

const GROUP_HEADERS: [&str; 5] = ["GROUP", "POLICY", "TARGET", "COORDINATOR", "MEMBERS"];

fn d(v: Option<Duration>) -> Option<prost_types::Duration> {
    v.map(ferry_runtime::time::to_duration)
}

/// A region's service URL, or what stands in for it.
fn or_default(url: &str) -> &str {
    if url.is_empty() {
        "(default)"
    } else {
        url
    }
}

/// Runs one registry command.
pub async fn run(url: &str, out: Output, command: Command) -> Result<()> {
    let mut c = client(url)?;
    let err = status(url);
    match command {
        Command::Regions => {
            let r = c
                .list_regions(pb::ListRegionsRequest {})
                .await
                .map_err(&err)?
                .into_inner();
            let text: Vec<String> = r
                .regions
                .iter()
                .map(
                    |region| match r.services.iter().find(|s| &s.region == region) {
                        Some(s) => format!(
                            "{region}  cache={} processor={}",
                            or_default(&s.cache_endpoint),
                            or_default(&s.processor_endpoint)
                        ),
                        None => region.clone(),
                    },
                )
                .collect();
            print(out, serde_json::json!(r.regions), text.join("\n"));
        }
        Command::RegionServices {
            region,
            cache,
            processor,
        } => {
            let s = c
                .set_region_services(pb::SetRegionServicesRequest {
                    services: Some(pb::RegionServices {
                        region,
                        cache_endpoint: cache,
                        processor_endpoint: processor,
                    }),
                })
                .await
                .map_err(&err)?
                .into_inner();
            print(
                out,
                serde_json::json!({
                    "region": s.region,
                    "cache_endpoint": s.cache_endpoint,
                    "processor_endpoint": s.processor_endpoint,
                }),
                format!(
                    "region {}: cache {}, processor {}",
                    s.region,
                    or_default(&s.cache_endpoint),
                    or_default(&s.processor_endpoint)
                ),
            );
        }
        Command::Register(a) => {
            let v = register_request(a)?;
            let vm = c
                .register_vm(pb::RegisterVmRequest { vm: Some(v) })
                .await
                .map_err(&err)?
                .into_inner();
            let text = format!(
                "registered VM {}\n{}",
                vm.name,
                table(&VM_HEADERS, &[vm_row(&vm)])
            );
            print(out, output::vm_json(&vm), text);
        }
        Command::Vms => {
            let vms = c
                .list_vms(pb::ListVmsRequest {})
                .await
                .map_err(&err)?
                .into_inner()
                .vms;
            print_all(out, &vms, output::vm_json, &VM_HEADERS, vm_row);
        }
        Command::Unregister { name } => {
            c.unregister_vm(pb::UnregisterVmRequest { name: name.clone() })
                .await
                .map_err(&err)?;
            print(
                out,
                serde_json::json!({"unregistered": name}),
                format!("unregistered VM {name}"),
            );
        }
        Command::Enable(a) => {
            let item = c
                .enable_replication(enable_request(a)?)
                .await
                .map_err(&err)?
                .into_inner();
            // The agent's first registration needs a one-time token; an
            // operator who may enable may issue it. Replication is enabled
            // whether or not this works.
            let token =
                crate::enroll::issue(&mut c, &item.vm_name, crate::enroll::DEFAULT_VALID_FOR).await;
            let mut json = output::item_json(&item);
            let mut text = output::item_text(&item);
            match &token {
                Ok(t) => {
                    json["enrollment"] = crate::enroll::token_json(t);
                    text = format!("{text}\n{}\n{}", crate::enroll::introduce(t), t.token);
                }
                Err(e) => eprintln!(
                    "Replication is enabled, but no enrollment token was issued for its agent \
                     ({:?}: {}); issue one with `ferry agent enroll {}`.",
                    e.code(),
                    e.message(),
                    item.vm_name
                ),
            }
            print(out, json, text);
        }
        Command::List => {
            let items = c
                .list_protected_items(pb::ListProtectedItemsRequest {})
                .await
                .map_err(&err)?
                .into_inner()
                .items;
            print_all(out, &items, output::item_json, &ITEM_HEADERS, item_row);
        }
        Command::Show { vm } => {
            let item = c
                .get_protected_item(pb::GetProtectedItemRequest { vm_name: vm })
                .await
                .map_err(&err)?
                .into_inner();
            print(out, output::item_json(&item), output::item_text(&item));
        }
        Command::Disable { vm } => {
            let item = c
                .disable_replication(pb::DisableReplicationRequest {
                    vm_name: vm.clone(),
                })
                .await
                .map_err(&err)?
                .into_inner();
            print(
                out,
                output::item_json(&item),
                format!("replication of {vm} disabled"),
            );
        }
        Command::Watch { vm } => {
            crate::watch::run(&mut c, url, out, vm.unwrap_or_default()).await?
        }
        Command::Policy(p) => policy(&mut c, &err, out, p).await?,
        Command::Mapping(m) => mapping(&mut c, &err, out, m).await?,
        Command::Group(g) => group(&mut c, &err, out, g).await?,
        Command::Serve(_)
        | Command::Certs(_)
        | Command::Demo { .. }
        | Command::Points(_)
        | Command::Status(_)
        | Command::Failover(_)
        | Command::Reprotect { .. }
        | Command::Plan(_)
        | Command::Jobs(_)
        | Command::Network(_)
        | Command::TargetVms { .. }
        | Command::Token(_)
        | Command::Agent(_)
        | Command::Audit(_) => bail!("not a registry command"),
    }
    Ok(())
}

const ITEM_HEADERS: [&str; 7] = [
    "VM",
    "REGIONS",
    "STATE",
    "PROGRESS",
    "HEALTH",
    "RPO",
    "LAST POINT",
];

const VM_HEADERS: [&str; 6] = ["VM", "REGION", "RESOURCE GROUP", "NETWORK", "NICS", "DISKS"];

fn register_request(a: RegisterArgs) -> Result<pb::Vm> {
    let nics = a
        .nics
        .iter()
        .map(|spec| {
            let (name, address) = pair("NIC", spec)?;
            let (ip, mac) = address.split_once(',').unwrap_or((address, ""));
            Ok(pb::Nic {
                name: name.to_string(),
                private_ip: ip.to_string(),
                mac_address: mac.to_string(),
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let disks = a
        .disks
        .iter()
        .map(|s| parse_disk(s))
        .collect::<Result<Vec<_>>>()?;
    Ok(pb::Vm {
        name: a.name,
        source_region: a.region,
        resource_group: a.resource_group,
        virtual_network: a.vnet,
        subnet: a.subnet,
        availability_set: a.availability_set,
        nics,
        disks,
        registered_at: None,
        shape: Some(pb::VmShape {
            vcpus: a.vcpus,
            memory_mib: a.memory_mib,
            firmware: match a.firmware.as_str() {
                "bios" => pb::Firmware::Bios,
                "uefi" => pb::Firmware::Uefi,
                other => bail!("--firmware {other:?}: give bios or uefi"),
            } as i32,
            kernel: a.kernel,
            initrd: a.initrd,
            cmdline: a.cmdline,
            ready_marker: a.ready_marker,
        }),
    })
}

fn enable_request(a: EnableArgs) -> Result<pb::EnableReplicationRequest> {
    let mut replica_disk_names = HashMap::new();
    for spec in &a.replica_disk_names {
        let (disk, name) = pair("--replica-disk-name", spec)?;
        replica_disk_names.insert(disk.to_string(), name.to_string());
    }
    Ok(pb::EnableReplicationRequest {
        vm_name: a.vm,
        target_region: a.target_region,
        policy_name: a.policy,
        replication_group: a.group,
        overrides: Some(pb::TargetOverrides {
            resource_group: a.target_resource_group,
            virtual_network: a.target_vnet,
            subnet: a.target_subnet,
            availability_set: a.target_availability_set,
            cache_storage: a.cache_storage,
            target_storage_account: a.target_storage_account,
            replica_disk_names,
        }),
    })
}

async fn policy(
    c: &mut Client,
    err: &impl Fn(tonic::Status) -> anyhow::Error,
    out: Output,
    command: PolicyCommand,
) -> Result<()> {
    match command {
        PolicyCommand::Create(PolicyArgs {
            name,
            retention,
            crash_interval,
            app_frequency,
            multi_vm,
            multi_vm_interval,
            keep_all_for,
            thinned_spacing,
        }) => {
            let p = c
                .create_policy(pb::CreatePolicyRequest {
                    policy: Some(pb::ReplicationPolicy {
                        name,
                        recovery_point_retention: d(retention),
                        crash_consistent_interval: d(crash_interval),
                        app_consistent_frequency: d(app_frequency),
                        multi_vm_consistency: multi_vm,
                        multi_vm_interval: d(multi_vm_interval),
                        keep_all_points_for: d(keep_all_for),
                        thinned_point_spacing: d(thinned_spacing),
                        created_at: None,
                    }),
                })
                .await
                .map_err(err)?
                .into_inner();
            print_one(out, &p, output::policy_json, &POLICY_HEADERS, policy_row);
        }
        PolicyCommand::List => {
            let r = c
                .list_policies(pb::ListPoliciesRequest {})
                .await
                .map_err(err)?
                .into_inner();
            let rows: Vec<_> = r.policies.iter().map(policy_row).collect();
            print(
                out,
                Value::Array(r.policies.iter().map(output::policy_json).collect()),
                format!(
                    "{}\n(default: {})",
                    table(&POLICY_HEADERS, &rows),
                    r.default_policy
                ),
            );
        }
        PolicyCommand::Show { name } => {
            let p = c
                .get_policy(pb::GetPolicyRequest { name })
                .await
                .map_err(err)?
                .into_inner();
            print_one(out, &p, output::policy_json, &POLICY_HEADERS, policy_row);
        }
        PolicyCommand::Delete { name } => {
            c.delete_policy(pb::DeletePolicyRequest { name: name.clone() })
                .await
                .map_err(err)?;
            print(
                out,
                serde_json::json!({"deleted": name}),
                format!("deleted policy {name}"),
            );
        }
    }
    Ok(())
}

async fn mapping(
    c: &mut Client,
    err: &impl Fn(tonic::Status) -> anyhow::Error,
    out: Output,
    command: MappingCommand,
) -> Result<()> {
    const HEADERS: [&str; 3] = ["MAPPING", "FROM", "TO"];
    match command {
        MappingCommand::Create {
            source_region,
            source_network,
            target_region,
            target_network,
        } => {
            let r = c
                .create_network_mapping(pb::CreateNetworkMappingRequest {
                    source_region,
                    source_network,
                    target_region,
                    target_network,
                })
                .await
                .map_err(err)?
                .into_inner();
            let both: Vec<_> = [r.mapping, r.reverse].into_iter().flatten().collect();
            print_all(out, &both, output::mapping_json, &HEADERS, mapping_row);
        }
        MappingCommand::List => {
            let all = c
                .list_network_mappings(pb::ListNetworkMappingsRequest {})
                .await
                .map_err(err)?
                .into_inner()
                .mappings;
            print_all(out, &all, output::mapping_json, &HEADERS, mapping_row);
        }
        MappingCommand::Delete { id } => {
            c.delete_network_mapping(pb::DeleteNetworkMappingRequest { id: id.clone() })
                .await
                .map_err(err)?;
            print(
                out,
                serde_json::json!({"deleted": id}),
                format!("deleted mapping {id} and its reverse"),
            );
        }
    }
    Ok(())
}

async fn group(
    c: &mut Client,
    err: &impl Fn(tonic::Status) -> anyhow::Error,
    out: Output,
    command: GroupCommand,
) -> Result<()> {
    match command {
        GroupCommand::Create { name, policy } => {
            let g = c
                .create_replication_group(pb::CreateReplicationGroupRequest {
                    name,
                    policy_name: policy,
                })
                .await
                .map_err(err)?
                .into_inner();
            print_one(out, &g, output::group_json, &GROUP_HEADERS, group_row);
        }
        GroupCommand::List => {
            let all = c
                .list_replication_groups(pb::ListReplicationGroupsRequest {})
                .await
                .map_err(err)?
                .into_inner()
                .groups;
            print_all(out, &all, output::group_json, &GROUP_HEADERS, group_row);
        }
        GroupCommand::Show { name } => {
            let g = c
                .get_replication_group(pb::GetReplicationGroupRequest { name })
                .await
                .map_err(err)?
                .into_inner();
            print_one(out, &g, output::group_json, &GROUP_HEADERS, group_row);
        }
        GroupCommand::Delete { name } => {
            c.delete_replication_group(pb::DeleteReplicationGroupRequest { name: name.clone() })
                .await
                .map_err(err)?;
            print(
                out,
                serde_json::json!({"deleted": name}),
                format!("deleted group {name}"),
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_disks_parse() {
        assert_eq!(parse_size("512").unwrap(), 512);
        assert_eq!(parse_size("64M").unwrap(), 64 << 20);
        assert_eq!(parse_size("2g").unwrap(), 2 << 30);
        assert!(parse_size("x").is_err());
        let d = parse_disk("id=os,size=1G,role=os,path=/a.raw").unwrap();
        assert_eq!((d.id.as_str(), d.size_bytes), ("os", 1 << 30));
        assert_eq!(d.role(), pb::DiskRole::Os);
        assert_eq!(d.storage(), pb::DiskStorage::Managed);
        assert!(parse_disk("id=os,size=1G").is_err());
        assert!(parse_disk("id=os,size=1G,path=/a,color=red").is_err());
        assert!(parse_disk("id=os,size=1G,path=/a,role=swap").is_err());
    }
}
