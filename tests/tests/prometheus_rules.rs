//! Ferry's Prometheus files, checked by Prometheus's own tool: the alert
//! rules parse, each alert fires on the series it is meant for and not on
//! its near misses (`deploy/prometheus/alerts_test.yml`), and the scrape
//! configuration is valid. promtool comes from Debian's prometheus package,
//! which scripts/test.sh installs.

use std::path::PathBuf;
use std::process::Command;

fn promtool(args: &[&str]) {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/prometheus");
    let out = Command::new("promtool")
        .args(args)
        .current_dir(&dir)
        .output()
        .expect("promtool (Debian package prometheus; scripts/test.sh installs it)");
    assert!(
        out.status.success(),
        "promtool {args:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn the_alert_rules_parse() {
    promtool(&["check", "rules", "alerts.yml"]);
}

#[test]
fn each_alert_fires_when_it_should_and_only_then() {
    promtool(&["test", "rules", "alerts_test.yml"]);
}

#[test]
fn the_scrape_configuration_is_valid() {
    promtool(&["check", "config", "prometheus.yml"]);
}
