//! `ferry audit [--vm V] [--since 1h|RFC3339] [--limit N]`: the audit trails
//! of registry, processor and failover (each keeps its own), merged by
//! time. Admins only (docs/security.md, "Audit trail").

use std::time::SystemTime;

use anyhow::{anyhow, bail, Context, Result};
use ferry_proto::audit::v1 as pb;
use ferry_proto::audit::v1::audit_client::AuditClient;
use serde_json::{json, Value};

use crate::args::{AuditArgs, Output};
use crate::commands::print;
use crate::output::table;

/// `--since`: a duration back from now ("90m", "1h", "2d") or an RFC 3339
/// time.
pub fn parse_since(text: &str, now: SystemTime) -> Result<SystemTime> {
    if let Ok(ago) = humantime::parse_duration(text) {
        return now
            .checked_sub(ago)
            .ok_or_else(|| anyhow!("--since {text:?} reaches before 1970"));
    }
    humantime::parse_rfc3339_weak(text).map_err(|_| {
        anyhow!("--since {text:?} is neither a duration (\"1h\", \"30m\", \"2d\") nor an RFC 3339 time (\"2026-01-31T12:00:00Z\")")
    })
}

async fn list(url: &str, request: pb::ListAuditRecordsRequest) -> Result<Vec<pb::AuditRecord>> {
    let channel = ferry_runtime::connect(url, &crate::credentials::get())
        .with_context(|| format!("URL {url:?}"))?;
    let records = AuditClient::new(channel)
        .list_audit_records(request)
        .await
        .map_err(|s| anyhow!("{:?}: {}", s.code(), s.message()))?
        .into_inner()
        .records;
    Ok(records)
}

fn time_of(r: &pb::AuditRecord) -> SystemTime {
    r.time
        .as_ref()
        .and_then(ferry_runtime::time::from_timestamp)
        .unwrap_or(SystemTime::UNIX_EPOCH)
}

fn record_json(service: &str, r: &pb::AuditRecord) -> Value {
    json!({
        "service": service,
        "time": humantime::format_rfc3339_millis(time_of(r)).to_string(),
        "caller": r.caller,
        "method": r.method,
        "target": r.target,
        "code": r.code,
        "message": r.message,
    })
}

/// Registry, processor and failover's records, merged oldest first; the
/// newest `--limit` overall.
pub async fn run(servers: &[(&str, &str)], out: Output, args: AuditArgs) -> Result<()> {
    let since = args
        .since
        .as_deref()
        .map(|s| parse_since(s, SystemTime::now()))
        .transpose()?;
    let request = pb::ListAuditRecordsRequest {
        vm: args.vm.unwrap_or_default(),
        since: since.map(ferry_runtime::time::to_timestamp),
        limit: args.limit,
    };
    let mut merged: Vec<(&str, pb::AuditRecord)> = Vec::new();
    let mut failures = Vec::new();
    for (name, url) in servers {
        match list(url, request.clone()).await {
            Ok(records) => merged.extend(records.into_iter().map(|r| (*name, r))),
            Err(e) => failures.push(format!("{name} at {url}: {e:#}")),
        }
    }
    if failures.len() == servers.len() {
        bail!("no audit trail could be read:\n  {}", failures.join("\n  "));
    }
    for failure in &failures {
        eprintln!("ferry: skipped {failure}");
    }
    merged.sort_by_key(|(_, r)| time_of(r));
    let limit = usize::try_from(args.limit).unwrap_or(usize::MAX);
    if limit > 0 && merged.len() > limit {
        merged.drain(..merged.len() - limit);
    }
    let rows: Vec<Vec<String>> = merged
        .iter()
        .map(|(service, r)| {
            vec![
                humantime::format_rfc3339_millis(time_of(r)).to_string(),
                service.to_string(),
                r.caller.clone(),
                r.method.rsplit('.').next().unwrap_or(&r.method).to_string(),
                r.target.clone(),
                r.code.clone(),
            ]
        })
        .collect();
    print(
        out,
        Value::Array(merged.iter().map(|(s, r)| record_json(s, r)).collect()),
        table(
            &["TIME", "SERVICE", "CALLER", "METHOD", "TARGET", "CODE"],
            &rows,
        ),
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn since_is_a_duration_back_or_a_time() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(100_000);
        assert_eq!(
            parse_since("1h", now).unwrap(),
            now - Duration::from_secs(3600)
        );
        assert_eq!(
            parse_since("1970-01-01T00:01:00Z", now).unwrap(),
            SystemTime::UNIX_EPOCH + Duration::from_secs(60)
        );
        let err = parse_since("yesterday", now).unwrap_err().to_string();
        assert!(err.contains("RFC 3339"), "{err}");
    }
}
