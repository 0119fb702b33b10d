//! deploy/k8s/ferry.yaml, checked offline: against the Kubernetes 1.31
//! schemas (kubernetes-validate, strict) and against what the binaries
//! accept (tests/python/check_k8s.py: flags, ports, probes, peers, Secret
//! items, selectors). Each check is shown to catch a broken manifest.

use std::path::{Path, PathBuf};
use std::process::Output;

use ferry_testkit::bin_path;

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap()
}

fn manifest() -> PathBuf {
    repo().join("deploy/k8s/ferry.yaml")
}

fn validate(file: &Path) -> Output {
    std::process::Command::new(repo().join(".venv/bin/kubernetes-validate"))
        .args(["--strict", "--quiet", "--kubernetes-version", "1.31.0"])
        .arg(file)
        .output()
        .expect("kubernetes-validate is in .venv (scripts/test.sh installs it)")
}

fn check(file: &Path) -> Output {
    let bin_dir = bin_path("ferry").parent().unwrap().to_path_buf();
    for binary in ["registry-svc", "cache-svc", "processor-svc", "failover-svc"] {
        bin_path(binary);
    }
    ferry_testkit::python()
        .arg(repo().join("tests/python/check_k8s.py"))
        .arg(file)
        .arg(bin_dir)
        .output()
        .unwrap()
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The manifest with `from` replaced by `to` (which must occur).
fn broken(dir: &Path, name: &str, from: &str, to: &str) -> PathBuf {
    let good = std::fs::read_to_string(manifest()).unwrap();
    assert!(good.contains(from), "{from:?} is not in the manifest");
    let path = dir.join(name);
    std::fs::write(&path, good.replacen(from, to, 1)).unwrap();
    path
}

#[test]
fn the_manifest_passes_the_kubernetes_schemas_and_matches_the_binaries() {
    let out = validate(&manifest());
    assert!(out.status.success(), "{}", text(&out));
    let out = check(&manifest());
    assert!(out.status.success(), "{}", text(&out));
}

#[test]
fn a_broken_manifest_is_caught() {
    let dir = tempfile::tempdir().unwrap();
    // The schema: a field Kubernetes does not know.
    let schema = broken(
        dir.path(),
        "schema.yaml",
        "  serviceName: registry",
        "  serviceNam: registry",
    );
    assert!(!validate(&schema).status.success());
    // The binaries: a flag registry-svc does not have, a probe on the wrong
    // port, a peer on a port its Service does not serve, a Secret key that
    // `ferry certs init` does not write.
    for (from, to, says) in [
        (
            "--listen=0.0.0.0:7101",
            "--listen-address=0.0.0.0:7101",
            "registry-svc has no flag --listen-address",
        ),
        (
            "port: 7201\n              service: \"\"",
            "port: 7301\n              service: \"\"",
            "readinessProbe does not ask the health port",
        ),
        (
            "--registry=https://registry.ferry.svc.cluster.local:7101",
            "--registry=https://registry.ferry.svc.cluster.local:7109",
            "Service registry has no port 7109",
        ),
        (
            "- key: cache-key.pem",
            "- key: cache.key",
            "Secret key cache.key is not a file",
        ),
    ] {
        let file = broken(dir.path(), "broken.yaml", from, to);
        let out = check(&file);
        assert!(!out.status.success(), "{from} -> {to} passed");
        assert!(text(&out).contains(says), "{from} -> {to}: {}", text(&out));
    }
}
