//! Printing for people (aligned tables and key/value blocks) and for scripts
//! (`--output json`). JSON uses the .proto field names; enums appear as their
//! proto names without the type prefix ("PROTECTED", "OS"), timestamps as
//! RFC 3339, durations as seconds (a number), absent values as null.

use ferry_proto::registry::v1 as pb;
use serde_json::{json, Value};

/// Renders rows under headers with aligned columns.
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_string()
    };
    let mut out = line(headers.to_vec());
    for row in rows {
        out.push('\n');
        out.push_str(&line(row.iter().map(String::as_str).collect()));
    }
    out
}

/// An enum value's proto name without its prefix.
fn short(name: Option<&str>, prefix: &str) -> String {
    name.map(|n| n.trim_start_matches(prefix).to_string())
        .unwrap_or_else(|| "UNKNOWN".into())
}

pub fn state(v: i32) -> String {
    short(
        pb::ReplicationState::try_from(v)
            .ok()
            .map(|s| s.as_str_name()),
        "REPLICATION_STATE_",
    )
}

/// A health; "UNKNOWN" while nothing was reported.
pub fn health(v: i32) -> String {
    if v == pb::ReplicationHealth::Unspecified as i32 {
        return "UNKNOWN".into();
    }
    short(
        pb::ReplicationHealth::try_from(v)
            .ok()
            .map(|s| s.as_str_name()),
        "REPLICATION_HEALTH_",
    )
}

pub fn role(v: i32) -> String {
    short(
        pb::DiskRole::try_from(v).ok().map(|s| s.as_str_name()),
        "DISK_ROLE_",
    )
}

pub fn storage(v: i32) -> String {
    short(
        pb::DiskStorage::try_from(v).ok().map(|s| s.as_str_name()),
        "DISK_STORAGE_",
    )
}

pub fn event_kind(v: i32) -> String {
    short(
        pb::EventKind::try_from(v).ok().map(|s| s.as_str_name()),
        "EVENT_KIND_",
    )
}

/// RFC 3339, or "-".
pub fn time(t: &Option<prost_types::Timestamp>) -> String {
    t.as_ref()
        .and_then(ferry_runtime::time::from_timestamp)
        .map(|t| humantime::format_rfc3339_seconds(t).to_string())
        .unwrap_or_else(|| "-".into())
}

/// RFC 3339 with milliseconds (points a second apart stay apart), or null.
pub fn time_json(t: &Option<prost_types::Timestamp>) -> Value {
    t.as_ref()
        .and_then(ferry_runtime::time::from_timestamp)
        .map(|t| Value::String(humantime::format_rfc3339_millis(t).to_string()))
        .unwrap_or(Value::Null)
}

/// Seconds, or "-".
pub fn duration(d: &Option<prost_types::Duration>) -> String {
    d.as_ref()
        .and_then(ferry_runtime::time::from_duration)
        // Milliseconds are as fine as people need.
        .map(|d| std::time::Duration::from_millis(d.as_millis() as u64))
        .map(|d| humantime::format_duration(d).to_string())
        .unwrap_or_else(|| "-".into())
}

/// Seconds as a number, or null.
pub fn duration_json(d: &Option<prost_types::Duration>) -> Value {
    d.as_ref()
        .and_then(ferry_runtime::time::from_duration)
        .map(|d| json!(d.as_secs_f64()))
        .unwrap_or(Value::Null)
}

/// A byte count for people: "64 MiB".
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 && value.fract() == 0.0 {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value} {}", UNITS[unit])
}

pub fn disk_json(d: &pb::Disk) -> Value {
    json!({
        "id": d.id,
        "size_bytes": d.size_bytes,
        "role": role(d.role),
        "storage": storage(d.storage),
        "source_path": d.source_path,
    })
}

pub fn vm_json(v: &pb::Vm) -> Value {
    json!({
        "name": v.name,
        "source_region": v.source_region,
        "resource_group": v.resource_group,
        "virtual_network": v.virtual_network,
        "subnet": v.subnet,
        "availability_set": v.availability_set,
        "nics": v.nics.iter().map(|n| json!({"name": n.name, "private_ip": n.private_ip, "mac_address": n.mac_address})).collect::<Vec<_>>(),
        "disks": v.disks.iter().map(disk_json).collect::<Vec<_>>(),
        "registered_at": time_json(&v.registered_at),
        "shape": v.shape.as_ref().map(|s| json!({
            "vcpus": s.vcpus,
            "memory_mib": s.memory_mib,
            "firmware": match pb::Firmware::try_from(s.firmware) {
                Ok(pb::Firmware::Uefi) => "uefi",
                _ => "bios",
            },
            "kernel": s.kernel,
            "initrd": s.initrd,
            "cmdline": s.cmdline,
            "ready_marker": s.ready_marker,
        })),
    })
}

pub fn targets_json(t: &pb::TargetResources) -> Value {
    json!({
        "region": t.region,
        "resource_group": t.resource_group,
        "virtual_network": t.virtual_network,
        "subnet": t.subnet,
        "availability_set": t.availability_set,
        "cache_storage": t.cache_storage,
        "target_storage_account": t.target_storage_account,
        "replica_disks": t.replica_disks.iter().map(|r| json!({
            "disk_id": r.disk_id,
            "name": r.name,
            "storage": storage(r.storage),
            "storage_account": r.storage_account,
            "size_bytes": r.size_bytes,
        })).collect::<Vec<_>>(),
        "network_mapping": t.network_mapping,
        "reverse_network_mapping": t.reverse_network_mapping,
    })
}

pub fn item_json(i: &pb::ProtectedItem) -> Value {
    json!({
        "vm_name": i.vm_name,
        "source": i.source.as_ref().map(vm_json),
        "policy_name": i.policy_name,
        "replication_group": i.replication_group,
        "target": i.target.as_ref().map(targets_json),
        "state": state(i.state),
        "state_reason": i.state_reason,
        "initial_replication_percent": i.initial_replication_percent,
        "health": health(i.health),
        "health_reports": i.health_reports.iter().map(|r| json!({
            "component": r.component,
            "health": health(r.health),
            "message": r.message,
            "reported_at": time_json(&r.reported_at),
        })).collect::<Vec<_>>(),
        "rpo": duration_json(&i.rpo),
        "last_recovery_point_time": time_json(&i.last_recovery_point_time),
        "epoch": i.epoch,
        "backlog_bytes": i.backlog_bytes,
        "backlog_records": i.backlog_records,
        "revision": i.revision,
        "created_at": time_json(&i.created_at),
        "updated_at": time_json(&i.updated_at),
    })
}

pub fn policy_json(p: &pb::ReplicationPolicy) -> Value {
    json!({
        "name": p.name,
        "recovery_point_retention": duration_json(&p.recovery_point_retention),
        "crash_consistent_interval": duration_json(&p.crash_consistent_interval),
        "app_consistent_frequency": duration_json(&p.app_consistent_frequency),
        "multi_vm_consistency": p.multi_vm_consistency,
        "multi_vm_interval": duration_json(&p.multi_vm_interval),
        "keep_all_points_for": duration_json(&p.keep_all_points_for),
        "thinned_point_spacing": duration_json(&p.thinned_point_spacing),
        "created_at": time_json(&p.created_at),
    })
}

pub fn mapping_json(m: &pb::NetworkMapping) -> Value {
    json!({
        "id": m.id,
        "source_region": m.source_region,
        "source_network": m.source_network,
        "target_region": m.target_region,
        "target_network": m.target_network,
        "created_at": time_json(&m.created_at),
    })
}

pub fn group_json(g: &pb::ReplicationGroup) -> Value {
    json!({
        "name": g.name,
        "policy_name": g.policy_name,
        "target_region": g.target_region,
        "members": g.members,
        "coordinator": g.coordinator,
        "created_at": time_json(&g.created_at),
    })
}

/// An operator token's role: "READER", "OPERATOR", "ADMIN".
pub fn token_role(v: i32) -> String {
    short(pb::Role::try_from(v).ok().map(|s| s.as_str_name()), "ROLE_")
}

/// An operator token as listed (never its secret).
pub fn token_json(t: &pb::TokenInfo) -> Value {
    json!({
        "name": t.name,
        "role": token_role(t.role),
        "created_at": time_json(&t.created_at),
    })
}

/// "-" for an empty string.
pub fn or_dash(s: &str) -> String {
    if s.is_empty() {
        "-".into()
    } else {
        s.to_string()
    }
}

/// The block `ferry show` and `ferry enable` print for a protected item.
pub fn item_text(i: &pb::ProtectedItem) -> String {
    let mut out = Vec::new();
    let mut kv = |k: &str, v: String| out.push(format!("{k:<26}{v}"));
    kv("VM", i.vm_name.clone());
    kv("state", format!("{} ({})", state(i.state), i.state_reason));
    kv("progress", format!("{}%", i.initial_replication_percent));
    kv("health", health(i.health));
    kv("RPO", duration(&i.rpo));
    kv("last recovery point", time(&i.last_recovery_point_time));
    kv("policy", i.policy_name.clone());
    kv("replication group", or_dash(&i.replication_group));
    kv("epoch", i.epoch.to_string());
    kv(
        "backlog",
        format!(
            "{} in {} records",
            bytes(i.backlog_bytes),
            i.backlog_records
        ),
    );
    if let Some(v) = &i.source {
        kv(
            "source",
            format!(
                "{} / rg {} / vnet {} / subnet {} / avset {}",
                v.source_region,
                v.resource_group,
                v.virtual_network,
                v.subnet,
                or_dash(&v.availability_set)
            ),
        );
        for n in &v.nics {
            kv(
                "  NIC",
                format!("{} {} {}", n.name, n.private_ip, or_dash(&n.mac_address)),
            );
        }
        if let Some(s) = &v.shape {
            let boot = if s.kernel.is_empty() {
                "from its disk".to_string()
            } else {
                format!("kernel {}", s.kernel)
            };
            kv(
                "  shape",
                format!("{} vCPU, {} MiB, boots {boot}", s.vcpus, s.memory_mib),
            );
        }
        for d in &v.disks {
            kv(
                "  disk",
                format!(
                    "{} {} {} {} {}",
                    d.id,
                    bytes(d.size_bytes),
                    role(d.role),
                    storage(d.storage),
                    d.source_path
                ),
            );
        }
    }
    if let Some(t) = &i.target {
        kv("target region", t.region.clone());
        kv("target resource group", t.resource_group.clone());
        kv("target virtual network", t.virtual_network.clone());
        kv("target subnet", t.subnet.clone());
        kv("target availability set", or_dash(&t.availability_set));
        kv("cache storage", t.cache_storage.clone());
        kv("target storage account", or_dash(&t.target_storage_account));
        kv("network mapping", t.network_mapping.clone());
        kv("reverse network mapping", t.reverse_network_mapping.clone());
        for r in &t.replica_disks {
            let account = if r.storage_account.is_empty() {
                String::new()
            } else {
                format!(" in {}", r.storage_account)
            };
            kv(
                "  replica disk",
                format!(
                    "{} <- {} ({}{account})",
                    r.name,
                    r.disk_id,
                    storage(r.storage)
                ),
            );
        }
    }
    for r in &i.health_reports {
        kv(
            "  health report",
            format!("{} {} {}", r.component, health(r.health), r.message),
        );
    }
    out.join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align() {
        let t = table(
            &["A", "LONGER"],
            &[
                vec!["xyz".into(), "1".into()],
                vec!["q".into(), "22".into()],
            ],
        );
        assert_eq!(t, "A    LONGER\nxyz  1\nq    22");
    }

    #[test]
    fn sizes_read_well() {
        assert_eq!(bytes(64 << 20), "64 MiB");
        assert_eq!(bytes(1000), "1000 B");
        assert_eq!(bytes(1536), "1.5 KiB");
    }
}
