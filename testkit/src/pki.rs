//! A test PKI: a tempdir laid out as `ferry certs init` lays it out, with a
//! CA, the four services, the agents of `web-1` and `web-2`, an operator of
//! each role, plus what wrong-certificate tests need — a second, unrelated
//! CA ([`TestPki::other_ca`]) and expired leaves ([`TestPki::expired`]).
//!
//! Files are named by stem as in docs/security.md: `registry`,
//! `agent-web-1`, `operator-admin` → `<stem>.pem` and `<stem>-key.pem`.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use ferry_proto::ids::VmName;
use ferry_runtime::security::pki::{self, file_stem, Authority, InitOptions, Validity};
use ferry_runtime::security::{OperatorRole, Principal, ServiceKind};

/// The VMs whose agents [`TestPki::new`] issues certificates for.
pub const AGENTS: [&str; 2] = ["web-1", "web-2"];

/// A certificate and its key on disk, with their PEM.
#[derive(Debug, Clone)]
pub struct CertFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl CertFiles {
    /// The certificate, PEM.
    pub fn cert_pem(&self) -> String {
        std::fs::read_to_string(&self.cert).unwrap()
    }

    /// The private key, PEM.
    pub fn key_pem(&self) -> String {
        std::fs::read_to_string(&self.key).unwrap()
    }
}

/// The second, unrelated CA and the registry certificate it issued: a
/// well-formed leaf naming `spiffe://ferry/service/registry` that Ferry's
/// CA never signed.
#[derive(Debug, Clone)]
pub struct OtherCa {
    pub ca: PathBuf,
    pub registry: CertFiles,
}

/// A tempdir with a CA and certificates for every kind of principal.
pub struct TestPki {
    dir: tempfile::TempDir,
    ca: Mutex<Authority>,
    other: OtherCa,
}

impl std::fmt::Debug for TestPki {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestPki")
            .field("dir", &self.dir.path())
            .finish_non_exhaustive()
    }
}

impl Default for TestPki {
    fn default() -> Self {
        Self::new()
    }
}

impl TestPki {
    /// `ferry certs init` into a new tempdir with agents [`AGENTS`] and an
    /// operator of each role (named after the role: `operator-admin`),
    /// plus the other CA in `other/`.
    pub fn new() -> TestPki {
        let dir = tempfile::tempdir().unwrap();
        let options = InitOptions {
            hosts: Vec::new(),
            agents: AGENTS
                .iter()
                .map(|vm| VmName::parse(*vm).unwrap())
                .collect(),
            operators: OperatorRole::ALL
                .into_iter()
                .map(|role| (role.to_string(), role))
                .collect(),
            days: Some(30),
        };
        pki::init(dir.path(), &options).unwrap();
        let ca = Authority::load(
            &std::fs::read_to_string(dir.path().join(pki::CA_CERT)).unwrap(),
            &std::fs::read_to_string(dir.path().join(pki::CA_KEY)).unwrap(),
        )
        .unwrap();

        let other_dir = dir.path().join("other");
        pki::init(&other_dir, &InitOptions::default()).unwrap();
        let other = OtherCa {
            ca: other_dir.join(pki::CA_CERT),
            registry: CertFiles {
                cert: other_dir.join("registry.pem"),
                key: other_dir.join("registry-key.pem"),
            },
        };
        TestPki {
            dir,
            ca: Mutex::new(ca),
            other,
        }
    }

    /// The directory (as `ferry certs init` wrote it).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The CA certificate (`ca.pem`).
    pub fn ca(&self) -> PathBuf {
        self.dir.path().join(pki::CA_CERT)
    }

    /// The CA certificate, PEM.
    pub fn ca_pem(&self) -> String {
        std::fs::read_to_string(self.ca()).unwrap()
    }

    /// The certificate of stem `name` (`registry`, `agent-web-1`,
    /// `operator-admin`, `expired-registry`).
    pub fn cert(&self, name: &str) -> PathBuf {
        self.dir.path().join(format!("{name}.pem"))
    }

    /// The private key of stem `name`.
    pub fn key(&self, name: &str) -> PathBuf {
        self.dir.path().join(format!("{name}-key.pem"))
    }

    /// The certificate and key of stem `name`.
    pub fn files(&self, name: &str) -> CertFiles {
        CertFiles {
            cert: self.cert(name),
            key: self.key(name),
        }
    }

    /// A service's certificate and key.
    pub fn service(&self, service: ServiceKind) -> CertFiles {
        self.files(service.as_str())
    }

    /// An operator's certificate and key (named after the role).
    pub fn operator(&self, role: OperatorRole) -> CertFiles {
        self.files(&file_stem(&operator(role)))
    }

    /// The certificate and key of `vm`'s agent, issued now if this PKI has
    /// none yet.
    pub fn agent(&self, vm: &str) -> CertFiles {
        let principal = Principal::Agent {
            vm: VmName::parse(vm).unwrap(),
        };
        self.issued(
            &file_stem(&principal),
            &principal,
            Validity::days(30).unwrap(),
        )
    }

    /// A certificate for `principal` from this PKI's CA whose validity
    /// ended a day ago (`expired-<stem>`).
    pub fn expired(&self, principal: &Principal) -> CertFiles {
        let now = SystemTime::now();
        let day = Duration::from_secs(86_400);
        let validity = Validity {
            not_before: now - 2 * day,
            not_after: now - day,
        };
        self.issued(
            &format!("expired-{}", file_stem(principal)),
            principal,
            validity,
        )
    }

    /// A service's security with this PKI: mutual TLS, every call checked,
    /// and `secret` for agent tokens if given.
    pub fn security(
        &self,
        service: ServiceKind,
        secret: Option<&ferry_runtime::security::ClusterSecret>,
    ) -> ferry_runtime::config::Security {
        let files = self.service(service);
        ferry_runtime::config::Security {
            tls: Some(
                ferry_runtime::security::Tls::load(ferry_runtime::security::TlsFiles {
                    cert: files.cert,
                    key: files.key,
                    ca: self.ca(),
                })
                .unwrap(),
            ),
            cluster_secret: secret.cloned(),
            enforce: true,
        }
    }

    /// A client trusting this CA and presenting `files` (none: no
    /// certificate).
    pub fn presenting(&self, files: Option<&CertFiles>) -> ferry_runtime::peers::Credentials {
        ferry_runtime::peers::Credentials {
            tls: Some(
                ferry_runtime::security::ClientTls::load(
                    &self.ca(),
                    files.map(|f| f.cert.as_path()),
                    files.map(|f| f.key.as_path()),
                )
                .unwrap(),
            ),
            bearer: None,
        }
    }

    /// The second, unrelated CA and its registry certificate.
    pub fn other_ca(&self) -> &OtherCa {
        &self.other
    }

    fn issued(&self, stem: &str, principal: &Principal, validity: Validity) -> CertFiles {
        let files = self.files(stem);
        let ca = self.ca.lock().unwrap();
        if !files.cert.exists() {
            let hosts = pki::default_hosts(principal, &[]);
            let issued = ca.issue(principal, &hosts, validity).unwrap();
            std::fs::write(&files.key, issued.key_pem).unwrap();
            std::fs::write(&files.cert, issued.cert_pem).unwrap();
        }
        files
    }
}

/// The operator principal of `role` in a [`TestPki`] (named after it).
pub fn operator(role: OperatorRole) -> Principal {
    Principal::Operator {
        name: role.to_string(),
        role,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::run_tool;
    use std::process::Command;

    fn verifies(ca: &Path, cert: &Path) -> bool {
        Command::new("openssl")
            .arg("verify")
            .arg("-CAfile")
            .arg(ca)
            .arg(cert)
            .output()
            .unwrap()
            .status
            .success()
    }

    fn san(cert: &Path) -> String {
        run_tool(
            "openssl",
            &[
                "x509",
                "-noout",
                "-ext",
                "subjectAltName",
                "-in",
                cert.to_str().unwrap(),
            ],
        )
    }

    #[test]
    fn every_principal_has_a_certificate_the_ca_signed() {
        let pki = TestPki::new();
        for service in ServiceKind::ALL {
            let files = pki.service(service);
            assert!(verifies(&pki.ca(), &files.cert), "{service}");
            assert!(files.key_pem().contains("PRIVATE KEY"));
            assert!(san(&files.cert).contains(&format!("URI:spiffe://ferry/service/{service}")));
        }
        for role in OperatorRole::ALL {
            let files = pki.operator(role);
            assert!(verifies(&pki.ca(), &files.cert), "{role}");
            assert!(san(&files.cert).contains(&operator(role).uri()));
        }
        for vm in AGENTS {
            assert!(
                verifies(&pki.ca(), &pki.cert(&format!("agent-{vm}"))),
                "{vm}"
            );
        }
        // On demand, once.
        let db = pki.agent("db-1");
        assert!(verifies(&pki.ca(), &db.cert));
        assert!(san(&db.cert).contains("URI:spiffe://ferry/agent/db-1"));
        assert_eq!(pki.agent("db-1").cert_pem(), db.cert_pem());
    }

    #[test]
    fn wrong_ca_and_expired_certificates_are_wrong() {
        let pki = TestPki::new();
        let other = pki.other_ca();
        assert!(!verifies(&pki.ca(), &other.registry.cert));
        assert!(verifies(&other.ca, &other.registry.cert));
        assert!(san(&other.registry.cert).contains("URI:spiffe://ferry/service/registry"));

        let registry = Principal::Service {
            service: ServiceKind::Registry,
        };
        let expired = pki.expired(&registry);
        assert_eq!(expired.cert, pki.cert("expired-registry"));
        // Refused for its expiry, nothing else.
        let out = Command::new("openssl")
            .arg("verify")
            .arg("-CAfile")
            .arg(pki.ca())
            .arg(&expired.cert)
            .output()
            .unwrap();
        assert!(!out.status.success(), "expired yet verified");
        let err = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("certificate has expired"), "{err}");
        assert_eq!(pki.expired(&registry).cert_pem(), expired.cert_pem());
    }
}
