//! `ferry certs` writes a PKI that the real `openssl` accepts: leaves verify
//! against the CA for TLS server and client use, name their principal by
//! URI, and nothing is ever overwritten.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // tests may

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};

fn ferry(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(args)
        .output()
        .unwrap()
}

/// The real openssl CLI in `dir` (scripts/test.sh installs it).
fn openssl(dir: &Path, args: &[&str]) -> Output {
    Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .expect("openssl must be installed (scripts/test.sh installs it)")
}

fn ok(what: &str, out: Output) -> String {
    assert!(
        out.status.success(),
        "{what} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn verify(dir: &Path, ca: &str, cert: &str, extra: &[&str]) -> Output {
    let mut args = vec!["verify", "-CAfile", ca];
    args.extend_from_slice(extra);
    args.push(cert);
    openssl(dir, &args)
}

fn san(dir: &Path, cert: &str) -> String {
    ok(
        "openssl x509",
        openssl(
            dir,
            &["x509", "-noout", "-ext", "subjectAltName", "-in", cert],
        ),
    )
}

#[test]
fn init_then_issue_make_a_pki_openssl_accepts() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("pki");
    let d = dir.to_str().unwrap();

    let out = ok(
        "ferry certs init",
        ferry(&[
            "certs",
            "init",
            d,
            "--agent",
            "web-1",
            "--operator",
            "alice:admin",
            "--host",
            "ferry.example",
            "--host",
            "10.0.0.7",
        ]),
    );
    for file in [
        "ca.pem",
        "ca-key.pem",
        "registry.pem",
        "cache-key.pem",
        "processor.pem",
        "failover-key.pem",
        "agent-web-1.pem",
        "agent-web-1-key.pem",
        "operator-alice.pem",
        "operator-alice-key.pem",
    ] {
        assert!(
            out.contains(&dir.join(file).display().to_string()),
            "{file}: {out}"
        );
        let mode = std::fs::metadata(dir.join(file))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        if file.ends_with("-key.pem") {
            assert_eq!(mode, 0o600, "{file}");
        }
    }

    // Every service certificate verifies for TLS server and client use, on
    // its Kubernetes Service name, on loopback and on the extra hosts.
    for svc in ["registry", "cache", "processor", "failover"] {
        let cert = format!("{svc}.pem");
        let out = ok("openssl verify", verify(&dir, "ca.pem", &cert, &[]));
        assert_eq!(out.trim(), format!("{cert}: OK"));
        let k8s = format!("{svc}.ferry.svc.cluster.local");
        for extra in [
            ["-purpose", "sslserver", "-verify_hostname", &k8s],
            ["-purpose", "sslserver", "-verify_hostname", svc],
            ["-purpose", "sslserver", "-verify_hostname", "ferry.example"],
            ["-purpose", "sslserver", "-verify_ip", "127.0.0.1"],
            ["-purpose", "sslserver", "-verify_ip", "10.0.0.7"],
            ["-purpose", "sslclient", "-verify_ip", "::1"],
        ] {
            ok(
                &format!("openssl verify {cert} {extra:?}"),
                verify(&dir, "ca.pem", &cert, &extra),
            );
        }
        // ... and not for a name it was not issued for (openssl does check).
        let wrong = verify(
            &dir,
            "ca.pem",
            &cert,
            &["-verify_hostname", "elsewhere.example"],
        );
        assert!(
            !wrong.status.success(),
            "{cert} verified for elsewhere.example"
        );
    }

    let agent = san(&dir, "agent-web-1.pem");
    assert!(agent.contains("URI:spiffe://ferry/agent/web-1"), "{agent}");
    assert!(agent.contains("DNS:localhost"), "{agent}");
    let operator = san(&dir, "operator-alice.pem");
    assert!(
        operator.contains("URI:spiffe://ferry/operator/admin/alice"),
        "{operator}"
    );
    ok(
        "openssl verify operator",
        verify(
            &dir,
            "ca.pem",
            "operator-alice.pem",
            &["-purpose", "sslclient"],
        ),
    );

    // Each key is its certificate's.
    let cert_key = ok(
        "openssl x509 -pubkey",
        openssl(&dir, &["x509", "-noout", "-pubkey", "-in", "registry.pem"]),
    );
    let key = ok(
        "openssl pkey",
        openssl(&dir, &["pkey", "-pubout", "-in", "registry-key.pem"]),
    );
    assert_eq!(cert_key, key);

    // One more agent later, from the same CA.
    let out = ok(
        "ferry certs issue",
        ferry(&["certs", "issue", d, "--agent", "db-2", "--days", "30"]),
    );
    assert!(out.contains("agent-db-2.pem"), "{out}");
    assert!(out.contains("agent-db-2-key.pem"), "{out}");
    let out = ok(
        "openssl verify",
        verify(&dir, "ca.pem", "agent-db-2.pem", &["-purpose", "sslclient"]),
    );
    assert_eq!(out.trim(), "agent-db-2.pem: OK");
    let agent = san(&dir, "agent-db-2.pem");
    assert!(agent.contains("URI:spiffe://ferry/agent/db-2"), "{agent}");
    let mode = std::fs::metadata(dir.join("agent-db-2-key.pem"))
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600);

    // Issuing it again overwrites nothing.
    let before = std::fs::read(dir.join("agent-db-2-key.pem")).unwrap();
    let again = ferry(&["certs", "issue", d, "--agent", "db-2"]);
    assert!(!again.status.success());
    let err = String::from_utf8_lossy(&again.stderr);
    assert!(
        err.contains("agent-db-2.pem") && err.contains("exists"),
        "{err}"
    );
    assert_eq!(
        std::fs::read(dir.join("agent-db-2-key.pem")).unwrap(),
        before
    );

    // A second init into the same directory is refused, naming ca.pem.
    let ca_before = std::fs::read(dir.join("ca.pem")).unwrap();
    let again = ferry(&["certs", "init", d]);
    assert!(!again.status.success());
    let err = String::from_utf8_lossy(&again.stderr);
    assert!(err.contains("ca.pem"), "{err}");
    assert_eq!(std::fs::read(dir.join("ca.pem")).unwrap(), ca_before);

    // Another PKI's certificates do not verify against this CA.
    let other = tmp.path().join("other");
    ok(
        "ferry certs init (other)",
        ferry(&["certs", "init", other.to_str().unwrap()]),
    );
    let foreign = verify(
        &dir,
        "ca.pem",
        other.join("registry.pem").to_str().unwrap(),
        &[],
    );
    assert!(!foreign.status.success(), "a foreign CA's leaf verified");
}

#[test]
fn issue_needs_a_ca_and_exactly_one_principal() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path().to_str().unwrap();

    // Beyond what X.509 can say: an error, not a panic, and nothing written.
    let out = ferry(&["certs", "init", d, "--days", "4000000000"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("9999"), "{err}");
    assert!(!tmp.path().join("ca.pem").exists());

    let out = ferry(&["certs", "issue", d, "--service", "cache"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("ca.pem"), "{err}");

    ok("ferry certs init", ferry(&["certs", "init", d]));
    for bad in [
        vec!["--service", "cache", "--agent", "web-1"],
        vec![],
        vec!["--operator", "bob"],
        vec!["--operator", "bob:root"],
        vec!["--service", "nope"],
        vec!["--agent", "web-1", "--days", "0"],
        vec!["--agent", "web-1", "--days", "4000000000"],
        vec!["--agent", "web-1", "--host", "not a host"],
    ] {
        let mut args = vec!["certs", "issue", d];
        args.extend(&bad);
        let out = ferry(&args);
        let err = String::from_utf8_lossy(&out.stderr);
        // 1: ferry's error, 2: clap's usage error; never a panic (101).
        assert!(
            matches!(out.status.code(), Some(1 | 2)),
            "{bad:?}: {:?} {err}",
            out.status
        );
        assert!(
            err.contains("error") || err.contains("ferry:"),
            "{bad:?}: {err}"
        );
    }
    // Nothing but the init's files.
    assert!(!tmp.path().join("agent-web-1.pem").exists());
}

/// A reader that goes away before the output comes (`ferry ... | head`)
/// ends the command quietly, by SIGPIPE as it ends `ls`, not with a panic
/// about failing to print.
#[test]
fn a_closed_pipe_ends_the_command_quietly() {
    use std::os::unix::process::ExitStatusExt;
    let dir = tempfile::tempdir().unwrap();
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let out = Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(["certs", "init"])
        .arg(dir.path().join("pki"))
        .stdout(writer)
        .stderr(std::process::Stdio::piped())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    // SIGPIPE is 13 on Linux.
    assert_eq!(out.status.signal(), Some(13), "{:?} {stderr}", out.status);
}
