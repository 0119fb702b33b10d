//! Certificates that name Ferry principals.
//!
//! Every service reads a peer's certificate with [`principal_of_cert`] (or
//! [`principal_of_chain`] for the chain a TLS handshake presented): the
//! principal is the one Ferry identity URI in its subject alternative names
//! (`spiffe://ferry/...`, see [`Principal::uri`]).
//!
//! Issuing — a self-signed [`Authority`], leaves for services, agents and
//! operators, and the directory `ferry certs init` writes ([`init`],
//! [`issue_into`]) — is behind the cargo feature `pki-issue`, so services do
//! not link a certificate generator they never use.

use crate::security::Principal;
use x509_parser::extensions::GeneralName;

#[cfg(feature = "pki-issue")]
pub use issue::*;

/// Why a certificate could not be read, issued or written.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    /// The bytes are not one DER-encoded X.509 certificate.
    #[error("not an X.509 certificate: {0}")]
    Parse(String),
    /// The certificate carries more than one Ferry identity URI; which one
    /// it names is ambiguous, so it names none.
    #[error("the certificate names more than one Ferry principal: {0}")]
    Ambiguous(String),
    /// A chain with no certificate in it.
    #[error("the peer presented no certificate")]
    EmptyChain,
    /// A host for a certificate that is neither an IP address nor a DNS name.
    #[cfg(feature = "pki-issue")]
    #[error("{0:?} is not a DNS name or an IP address")]
    InvalidHost(String),
    /// A validity window that ends before it starts, or outlives the CA.
    #[cfg(feature = "pki-issue")]
    #[error("invalid validity: {0}")]
    InvalidValidity(String),
    /// A principal no certificate can name, or two certificates for one file.
    #[cfg(feature = "pki-issue")]
    #[error("{0}")]
    InvalidPrincipal(String),
    /// A CA certificate or key that cannot serve as an authority.
    #[cfg(feature = "pki-issue")]
    #[error("unusable certificate authority: {0}")]
    InvalidAuthority(String),
    /// Generating or signing failed.
    #[cfg(feature = "pki-issue")]
    #[error("generating a certificate: {0}")]
    Generate(#[from] rcgen::Error),
    /// A file Ferry would write exists already; nothing is overwritten.
    #[cfg(feature = "pki-issue")]
    #[error("{} exists already; refusing to overwrite it", .0.display())]
    Exists(std::path::PathBuf),
    /// Reading or writing a file.
    #[cfg(feature = "pki-issue")]
    #[error("{}: {source}", path.display())]
    Io {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
}

/// The Ferry principal a DER-encoded X.509 certificate names: the one
/// subject-alternative-name URI in Ferry's scheme. `None` when it carries no
/// such URI (URIs of other schemes or trust domains, and malformed Ferry
/// URIs, name nobody); an error when the bytes are not a certificate, or when
/// it names two different principals.
///
/// This reads names only: the TLS handshake has verified the chain.
pub fn principal_of_cert(der: &[u8]) -> Result<Option<Principal>, PkiError> {
    let (rest, cert) =
        x509_parser::parse_x509_certificate(der).map_err(|e| PkiError::Parse(e.to_string()))?;
    if !rest.is_empty() {
        return Err(PkiError::Parse(format!(
            "{} bytes follow the certificate",
            rest.len()
        )));
    }
    let san = cert
        .subject_alternative_name()
        .map_err(|e| PkiError::Parse(format!("subject alternative names: {e}")))?;
    let Some(san) = san else {
        return Ok(None);
    };
    let mut found: Option<Principal> = None;
    for name in &san.value.general_names {
        let GeneralName::URI(uri) = name else {
            continue;
        };
        let Some(principal) = Principal::from_uri(uri) else {
            continue;
        };
        match &found {
            Some(first) if *first != principal => {
                return Err(PkiError::Ambiguous(format!("{} and {}", first.uri(), uri)));
            }
            _ => found = Some(principal),
        }
    }
    Ok(found)
}

/// The principal the leaf (the first certificate) of a presented chain
/// names; the shape of `TlsConnectInfo::peer_certs()`.
pub fn principal_of_chain<C: AsRef<[u8]>>(certs: &[C]) -> Result<Option<Principal>, PkiError> {
    let leaf = certs.first().ok_or(PkiError::EmptyChain)?;
    principal_of_cert(leaf.as_ref())
}

#[cfg(feature = "pki-issue")]
mod issue {
    use std::fs::{self, File, OpenOptions};
    use std::io::Write;
    use std::net::IpAddr;
    use std::os::unix::fs::OpenOptionsExt;
    use std::path::{Path, PathBuf};
    use std::time::{Duration, SystemTime, UNIX_EPOCH};

    use ferry_proto::ids::{path_name, VmName};
    use rcgen::string::Ia5String;
    use rcgen::{
        BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose,
        IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
    };

    use super::PkiError;
    use crate::security::{OperatorRole, Principal, ServiceKind};

    /// Days a leaf certificate from `ferry certs` is valid unless `--days`
    /// says otherwise.
    pub const DEFAULT_LEAF_DAYS: u32 = 365;
    /// Days the CA `ferry certs init` creates is valid (ten years), or the
    /// leaves' days if that is longer.
    pub const DEFAULT_CA_DAYS: u32 = 3650;
    /// How far before "now" a certificate's validity starts, so that peers
    /// whose clocks run a little behind accept it at once.
    pub const BACKDATE: Duration = Duration::from_secs(3600);

    const DAY: Duration = Duration::from_secs(86_400);

    /// When a certificate is valid: `[not_before, not_after]`.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct Validity {
        pub not_before: SystemTime,
        pub not_after: SystemTime,
    }

    impl Validity {
        /// From [`BACKDATE`] ago until `days` days from now.
        pub fn days(days: u32) -> Result<Validity, PkiError> {
            if days == 0 {
                return Err(PkiError::InvalidValidity(
                    "a certificate must be valid for at least one day".into(),
                ));
            }
            let now = SystemTime::now();
            Ok(Validity {
                not_before: now.checked_sub(BACKDATE).unwrap_or(UNIX_EPOCH),
                not_after: now + DAY * days,
            })
        }

        fn check(&self) -> Result<(), PkiError> {
            if self.not_after <= self.not_before {
                return Err(PkiError::InvalidValidity(
                    "not_after must come after not_before".into(),
                ));
            }
            if self.not_before < UNIX_EPOCH {
                return Err(PkiError::InvalidValidity(
                    "not_before is before 1970".into(),
                ));
            }
            // X.509 times end with the year 9999.
            if self.not_after > UNIX_EPOCH + Duration::from_secs(253_402_300_799) {
                return Err(PkiError::InvalidValidity(
                    "not_after is past the year 9999; give fewer days".into(),
                ));
            }
            Ok(())
        }
    }

    /// A certificate and its private key, PEM-encoded (the key as PKCS#8).
    #[derive(Clone)]
    pub struct Issued {
        pub cert_pem: String,
        pub key_pem: String,
    }

    /// Shows the certificate, never the key.
    impl std::fmt::Debug for Issued {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("Issued")
                .field("cert_pem", &self.cert_pem)
                .field("key_pem", &"<redacted>")
                .finish()
        }
    }

    /// A certificate authority: a self-signed CA certificate and its key,
    /// issuing leaves that name Ferry principals. Keys are ECDSA P-256.
    pub struct Authority {
        issuer: Issuer<'static, KeyPair>,
        cert_pem: String,
        key_pem: String,
        not_after: SystemTime,
    }

    impl std::fmt::Debug for Authority {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("Authority")
                .field("cert_pem", &self.cert_pem)
                .finish_non_exhaustive()
        }
    }

    impl Authority {
        /// A new self-signed CA named `common_name`, may sign leaves only
        /// (path length 0).
        pub fn generate(common_name: &str, validity: Validity) -> Result<Authority, PkiError> {
            validity.check()?;
            let key = KeyPair::generate()?;
            let mut params = CertificateParams::default();
            params.distinguished_name = distinguished_name(common_name);
            params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
            params.key_usages = vec![
                KeyUsagePurpose::KeyCertSign,
                KeyUsagePurpose::CrlSign,
                KeyUsagePurpose::DigitalSignature,
            ];
            params.not_before = validity.not_before.into();
            params.not_after = validity.not_after.into();
            let cert = params.self_signed(&key)?;
            let key_pem = key.serialize_pem();
            Ok(Authority {
                cert_pem: cert.pem(),
                key_pem,
                not_after: validity.not_after,
                issuer: Issuer::new(params, key),
            })
        }

        /// An authority from its certificate and private key (PEM), as
        /// `ca.pem` and `ca-key.pem` hold them. The certificate must be a CA
        /// and the key its own.
        pub fn load(cert_pem: &str, key_pem: &str) -> Result<Authority, PkiError> {
            let (_, pem) = x509_parser::pem::parse_x509_pem(cert_pem.as_bytes())
                .map_err(|e| PkiError::InvalidAuthority(format!("CA certificate: {e}")))?;
            let cert = pem
                .parse_x509()
                .map_err(|e| PkiError::InvalidAuthority(format!("CA certificate: {e}")))?;
            if !cert.is_ca() {
                return Err(PkiError::InvalidAuthority(
                    "the certificate is not a CA (basicConstraints CA:TRUE)".into(),
                ));
            }
            let key = KeyPair::from_pem(key_pem)
                .map_err(|e| PkiError::InvalidAuthority(format!("CA key: {e}")))?;
            if cert.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
                return Err(PkiError::InvalidAuthority(
                    "the key is not the CA certificate's key".into(),
                ));
            }
            let not_after = cert.validity().not_after.timestamp();
            let not_after = UNIX_EPOCH + Duration::from_secs(u64::try_from(not_after).unwrap_or(0));
            let issuer = Issuer::from_ca_cert_pem(cert_pem, key)?;
            Ok(Authority {
                issuer,
                cert_pem: cert_pem.to_string(),
                key_pem: key_pem.to_string(),
                not_after,
            })
        }

        /// The CA certificate, PEM.
        pub fn cert_pem(&self) -> &str {
            &self.cert_pem
        }

        /// The CA's private key, PEM (PKCS#8).
        pub fn key_pem(&self) -> &str {
            &self.key_pem
        }

        /// A leaf naming `principal` (its URI SAN), valid for `hosts` (IP
        /// SANs for those that parse as IP addresses, DNS SANs for the
        /// rest), for TLS server and client authentication both: services
        /// and agents serve as well as call. Its own fresh key.
        pub fn issue(
            &self,
            principal: &Principal,
            hosts: &[String],
            validity: Validity,
        ) -> Result<Issued, PkiError> {
            validity.check()?;
            if validity.not_after > self.not_after {
                return Err(PkiError::InvalidValidity(format!(
                    "the certificate would outlive its CA (which expires at {} s after the epoch); issue it for fewer days",
                    self.not_after
                        .duration_since(UNIX_EPOCH)
                        .unwrap_or_default()
                        .as_secs()
                )));
            }
            let uri = principal.uri();
            let mut sans = vec![SanType::URI(Ia5String::try_from(uri.as_str())?)];
            for host in hosts {
                sans.push(host_san(host)?);
            }
            let mut params = CertificateParams::default();
            params.distinguished_name = distinguished_name(&common_name(principal));
            params.subject_alt_names = sans;
            params.is_ca = IsCa::ExplicitNoCa;
            params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
            params.extended_key_usages = vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ];
            params.use_authority_key_identifier_extension = true;
            params.not_before = validity.not_before.into();
            params.not_after = validity.not_after.into();
            let key = KeyPair::generate()?;
            let cert = params.signed_by(&key, &self.issuer)?;
            Ok(Issued {
                cert_pem: cert.pem(),
                key_pem: key.serialize_pem(),
            })
        }
    }

    fn distinguished_name(common_name: &str) -> DistinguishedName {
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "Ferry");
        dn.push(DnType::CommonName, common_name);
        dn
    }

    /// A short human name for the subject (at most 64 characters, the
    /// X.509 bound); the URI SAN is what identifies.
    fn common_name(principal: &Principal) -> String {
        let name = match principal {
            Principal::Service { service } => format!("ferry {service}"),
            Principal::Agent { vm } => format!("ferry agent {}", vm.as_str()),
            Principal::Operator { name, role } => format!("ferry {role} {name}"),
        };
        name.chars().take(64).collect()
    }

    fn host_san(host: &str) -> Result<SanType, PkiError> {
        if let Ok(ip) = host.parse::<IpAddr>() {
            return Ok(SanType::IpAddress(ip));
        }
        let name = host.strip_prefix("*.").unwrap_or(host);
        let valid = !name.is_empty()
            && host.len() <= 253
            && name.split('.').all(|label| {
                !label.is_empty()
                    && label.len() <= 63
                    && !label.starts_with('-')
                    && !label.ends_with('-')
                    && label
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-')
            });
        if !valid {
            return Err(PkiError::InvalidHost(host.to_string()));
        }
        Ok(SanType::DnsName(
            Ia5String::try_from(host).map_err(|_| PkiError::InvalidHost(host.to_string()))?,
        ))
    }

    /// The hosts a certificate for `principal` is valid for by default,
    /// then `extra`: for a service `localhost`, its name (`registry`), the
    /// names of its Kubernetes Service (`registry.ferry`,
    /// `registry.ferry.svc`, `registry.ferry.svc.cluster.local`, see
    /// deploy/k8s/ferry.yaml), its binary's name (`registry-svc`),
    /// 127.0.0.1 and ::1; for an agent `localhost`, 127.0.0.1 and ::1; for
    /// an operator (a client only) nothing.
    pub fn default_hosts(principal: &Principal, extra: &[String]) -> Vec<String> {
        let mut hosts: Vec<String> = match principal {
            Principal::Service { service } => vec![
                "localhost".into(),
                service.to_string(),
                format!("{service}-svc"),
                format!("{service}.ferry"),
                format!("{service}.ferry.svc"),
                format!("{service}.ferry.svc.cluster.local"),
                "127.0.0.1".into(),
                "::1".into(),
            ],
            Principal::Agent { .. } => {
                vec!["localhost".into(), "127.0.0.1".into(), "::1".into()]
            }
            Principal::Operator { .. } => Vec::new(),
        };
        for host in extra {
            if !hosts.contains(host) {
                hosts.push(host.clone());
            }
        }
        hosts
    }

    /// The file name (without `.pem` / `-key.pem`) of `principal`'s pair in
    /// a `ferry certs` directory: `registry`, `agent-<vm>`,
    /// `operator-<name>` (names escaped by `path_name`).
    pub fn file_stem(principal: &Principal) -> String {
        match principal {
            Principal::Service { service } => service.to_string(),
            Principal::Agent { vm } => format!("agent-{}", path_name(vm.as_str())),
            Principal::Operator { name, .. } => format!("operator-{}", path_name(name)),
        }
    }

    /// The CA certificate's file in a `ferry certs` directory.
    pub const CA_CERT: &str = "ca.pem";
    /// The CA key's file in a `ferry certs` directory.
    pub const CA_KEY: &str = "ca-key.pem";

    /// What [`init`] issues besides the CA and the four services.
    #[derive(Debug, Clone, Default)]
    pub struct InitOptions {
        /// Extra hosts (DNS names or IPs) for every service and agent
        /// certificate.
        pub hosts: Vec<String>,
        /// VMs whose agents get a certificate.
        pub agents: Vec<VmName>,
        /// Operators (name, role) who get a certificate.
        pub operators: Vec<(String, OperatorRole)>,
        /// Days the leaves are valid; `None` for [`DEFAULT_LEAF_DAYS`].
        pub days: Option<u32>,
    }

    /// Creates a PKI in `dir` (created if missing): a new CA (`ca.pem`,
    /// `ca-key.pem`), a pair for each service (`registry.pem`,
    /// `registry-key.pem`, ...), each agent (`agent-<vm>.pem`) and each
    /// operator (`operator-<name>.pem`). Refuses, writing nothing, when
    /// `ca.pem` or any other file it would write exists. Returns the files
    /// written, in order.
    pub fn init(dir: &Path, options: &InitOptions) -> Result<Vec<PathBuf>, PkiError> {
        let ca_cert = dir.join(CA_CERT);
        if ca_cert.exists() {
            return Err(PkiError::Exists(ca_cert));
        }
        let days = options.days.unwrap_or(DEFAULT_LEAF_DAYS);
        let leaf_validity = Validity::days(days)?;
        let ca = Authority::generate("Ferry CA", Validity::days(days.max(DEFAULT_CA_DAYS))?)?;

        let mut principals: Vec<Principal> = ServiceKind::ALL
            .into_iter()
            .map(|service| Principal::Service { service })
            .collect();
        principals.extend(
            options
                .agents
                .iter()
                .map(|vm| Principal::Agent { vm: vm.clone() }),
        );
        principals.extend(
            options
                .operators
                .iter()
                .map(|(name, role)| Principal::Operator {
                    name: name.clone(),
                    role: *role,
                }),
        );

        // (file, contents, secret), all checked before anything is written.
        let mut files = vec![
            (ca_cert, ca.cert_pem().to_string(), false),
            (dir.join(CA_KEY), ca.key_pem().to_string(), true),
        ];
        for principal in &principals {
            check_principal(principal)?;
            let issued = ca.issue(
                principal,
                &default_hosts(principal, &options.hosts),
                leaf_validity,
            )?;
            let stem = file_stem(principal);
            let cert = dir.join(format!("{stem}.pem"));
            if files.iter().any(|(path, _, _)| *path == cert) {
                return Err(PkiError::InvalidPrincipal(format!(
                    "two certificates would be written to {}; name each agent and operator once",
                    cert.display()
                )));
            }
            files.push((cert, issued.cert_pem, false));
            files.push((dir.join(format!("{stem}-key.pem")), issued.key_pem, true));
        }
        fs::create_dir_all(dir).map_err(|source| PkiError::Io {
            path: dir.to_path_buf(),
            source,
        })?;
        write_all_new(dir, &files)
    }

    /// Issues one more pair for `principal` from the CA in `dir` (as
    /// [`init`] wrote it) into `dir`, valid for `days` (`None`: the
    /// default). Refuses to overwrite an existing file. Returns the files
    /// written.
    pub fn issue_into(
        dir: &Path,
        principal: &Principal,
        hosts: &[String],
        days: Option<u32>,
    ) -> Result<Vec<PathBuf>, PkiError> {
        check_principal(principal)?;
        let ca = Authority::load(&read(&dir.join(CA_CERT))?, &read(&dir.join(CA_KEY))?)?;
        let validity = Validity::days(days.unwrap_or(DEFAULT_LEAF_DAYS))?;
        let issued = ca.issue(principal, &default_hosts(principal, hosts), validity)?;
        let stem = file_stem(principal);
        write_all_new(
            dir,
            &[
                (dir.join(format!("{stem}.pem")), issued.cert_pem, false),
                (dir.join(format!("{stem}-key.pem")), issued.key_pem, true),
            ],
        )
    }

    /// Operator names come from the command line, not through a checked
    /// id type: they must fit an identity URI.
    fn check_principal(principal: &Principal) -> Result<(), PkiError> {
        if Principal::from_uri(&principal.uri()).as_ref() != Some(principal) {
            return Err(PkiError::InvalidPrincipal(format!(
                "{principal} cannot be named by an identity URI ({})",
                principal.uri()
            )));
        }
        Ok(())
    }

    fn read(path: &Path) -> Result<String, PkiError> {
        fs::read_to_string(path).map_err(|source| PkiError::Io {
            path: path.to_path_buf(),
            source,
        })
    }

    /// Writes each file, refusing if any exists: first all are checked,
    /// then each is written to a temporary file, fsynced, and linked into
    /// place (a link never replaces a file), then the directory is fsynced.
    /// Secrets are mode 0600, certificates 0644.
    fn write_all_new(
        dir: &Path,
        files: &[(PathBuf, String, bool)],
    ) -> Result<Vec<PathBuf>, PkiError> {
        for (path, _, _) in files {
            if path.symlink_metadata().is_ok() {
                return Err(PkiError::Exists(path.clone()));
            }
        }
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| PkiError::Io { path, source }
        };
        let mut written = Vec::with_capacity(files.len());
        for (path, contents, secret) in files {
            let name = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let tmp = dir.join(format!(".{name}.tmp"));
            let _ = fs::remove_file(&tmp);
            let mut file = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(if *secret { 0o600 } else { 0o644 })
                .open(&tmp)
                .map_err(io(&tmp))?;
            file.write_all(contents.as_bytes()).map_err(io(&tmp))?;
            file.sync_all().map_err(io(&tmp))?;
            drop(file);
            let linked = fs::hard_link(&tmp, path);
            let _ = fs::remove_file(&tmp);
            match linked {
                Ok(()) => written.push(path.clone()),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    return Err(PkiError::Exists(path.clone()));
                }
                Err(source) => {
                    return Err(PkiError::Io {
                        path: path.clone(),
                        source,
                    })
                }
            }
        }
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io(dir))?;
        Ok(written)
    }
}

#[cfg(all(test, feature = "pki-issue"))]
#[allow(clippy::unwrap_used)] // test helpers may
mod tests {
    use std::os::unix::fs::PermissionsExt;
    use std::time::{Duration, SystemTime};

    use ferry_proto::ids::VmName;

    use super::*;
    use crate::security::{OperatorRole, ServiceKind};

    fn der(pem: &str) -> Vec<u8> {
        let (_, pem) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).unwrap();
        pem.contents
    }

    fn ca() -> Authority {
        Authority::generate("test CA", Validity::days(30).unwrap()).unwrap()
    }

    fn every_kind() -> Vec<Principal> {
        vec![
            Principal::Service {
                service: ServiceKind::Registry,
            },
            Principal::Service {
                service: ServiceKind::Failover,
            },
            Principal::Agent {
                vm: VmName::parse("web-1").unwrap(),
            },
            Principal::Operator {
                name: "alice".into(),
                role: OperatorRole::Admin,
            },
            Principal::Operator {
                name: "bob".into(),
                role: OperatorRole::Reader,
            },
        ]
    }

    #[test]
    fn issued_certificates_name_their_principal() {
        let ca = ca();
        for p in every_kind() {
            let issued = ca
                .issue(&p, &default_hosts(&p, &[]), Validity::days(1).unwrap())
                .unwrap();
            assert_eq!(
                principal_of_cert(&der(&issued.cert_pem)).unwrap(),
                Some(p.clone())
            );
            let chain = vec![der(&issued.cert_pem), der(ca.cert_pem())];
            assert_eq!(principal_of_chain(&chain).unwrap(), Some(p));
        }
    }

    #[test]
    fn leaves_carry_hosts_usages_and_validity() {
        let ca = ca();
        let p = Principal::Service {
            service: ServiceKind::Cache,
        };
        let not_before = SystemTime::now() - Duration::from_secs(7200);
        let not_after = not_before + Duration::from_secs(3600);
        let issued = ca
            .issue(
                &p,
                &["10.1.2.3".into(), "cache.example".into()],
                Validity {
                    not_before,
                    not_after,
                },
            )
            .unwrap();
        let der = der(&issued.cert_pem);
        let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
        let names: Vec<String> = cert
            .subject_alternative_name()
            .unwrap()
            .unwrap()
            .value
            .general_names
            .iter()
            .map(|n| n.to_string())
            .collect();
        assert!(
            names.iter().any(|n| n.contains("cache.example")),
            "{names:?}"
        );
        assert!(names.iter().any(|n| n.contains("0a:01:02:03")), "{names:?}");
        let eku = cert.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.server_auth && eku.client_auth);
        assert!(!cert.is_ca());
        assert!(!cert.validity().is_valid(), "expired on purpose");
        let secs = |t: SystemTime| t.duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
        assert_eq!(
            cert.validity().not_after.timestamp() as u64,
            secs(not_after)
        );
    }

    #[test]
    fn a_certificate_without_a_ferry_uri_names_nobody() {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(vec!["example.com".to_string()]).unwrap();
        params.subject_alt_names.push(rcgen::SanType::URI(
            "spiffe://elsewhere/service/registry".try_into().unwrap(),
        ));
        let cert = params.self_signed(&key).unwrap();
        assert_eq!(principal_of_cert(cert.der()).unwrap(), None);
        // No SAN extension at all.
        let cert = rcgen::CertificateParams::default()
            .self_signed(&key)
            .unwrap();
        assert_eq!(principal_of_cert(cert.der()).unwrap(), None);
    }

    #[test]
    fn two_ferry_uris_are_ambiguous() {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::default();
        for uri in [
            "spiffe://ferry/service/registry",
            "spiffe://ferry/agent/web-1",
        ] {
            params
                .subject_alt_names
                .push(rcgen::SanType::URI(uri.try_into().unwrap()));
        }
        let cert = params.self_signed(&key).unwrap();
        assert!(matches!(
            principal_of_cert(cert.der()),
            Err(PkiError::Ambiguous(_))
        ));
    }

    #[test]
    fn garbage_is_an_error() {
        assert!(matches!(
            principal_of_cert(b"not a certificate"),
            Err(PkiError::Parse(_))
        ));
        let issued = ca()
            .issue(&every_kind()[0], &[], Validity::days(1).unwrap())
            .unwrap();
        let mut trailing = der(&issued.cert_pem);
        trailing.push(0);
        assert!(matches!(
            principal_of_cert(&trailing),
            Err(PkiError::Parse(_))
        ));
        let empty: Vec<Vec<u8>> = Vec::new();
        assert!(matches!(
            principal_of_chain(&empty),
            Err(PkiError::EmptyChain)
        ));
    }

    #[test]
    fn bad_hosts_and_validities_are_refused() {
        let ca = ca();
        let p = &every_kind()[0];
        for host in ["", "a b", "-x.example", "x..example", "ünï"] {
            assert!(
                matches!(
                    ca.issue(p, &[host.to_string()], Validity::days(1).unwrap()),
                    Err(PkiError::InvalidHost(_))
                ),
                "{host:?}"
            );
        }
        assert!(Validity::days(0).is_err());
        assert!(matches!(
            Authority::generate("far", Validity::days(u32::MAX).unwrap()),
            Err(PkiError::InvalidValidity(m)) if m.contains("9999")
        ));
        let now = SystemTime::now();
        let backwards = Validity {
            not_before: now,
            not_after: now - Duration::from_secs(1),
        };
        assert!(ca.issue(p, &[], backwards).is_err());
        assert!(
            matches!(
                ca.issue(p, &[], Validity::days(31).unwrap()),
                Err(PkiError::InvalidValidity(m)) if m.contains("outlive")
            ),
            "a leaf may not outlive its CA"
        );
    }

    #[test]
    fn load_round_trips_and_checks_the_key() {
        let a = ca();
        let b = ca();
        let loaded = Authority::load(a.cert_pem(), a.key_pem()).unwrap();
        let p = &every_kind()[2];
        let issued = loaded.issue(p, &[], Validity::days(1).unwrap()).unwrap();
        // Signed by a's key under a's name.
        let leaf = der(&issued.cert_pem);
        let (_, leaf) = x509_parser::parse_x509_certificate(&leaf).unwrap();
        let ca_der = der(a.cert_pem());
        let (_, ca_cert) = x509_parser::parse_x509_certificate(&ca_der).unwrap();
        leaf.verify_signature(Some(ca_cert.public_key())).unwrap();
        assert_eq!(leaf.issuer(), ca_cert.subject());

        assert!(matches!(
            Authority::load(a.cert_pem(), b.key_pem()),
            Err(PkiError::InvalidAuthority(m)) if m.contains("not the CA certificate's key")
        ));
        assert!(matches!(
            Authority::load(&issued.cert_pem, &issued.key_pem),
            Err(PkiError::InvalidAuthority(m)) if m.contains("not a CA")
        ));
    }

    #[test]
    fn init_writes_the_directory_and_refuses_to_overwrite() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("pki");
        let options = InitOptions {
            hosts: vec!["ferry.example".into()],
            agents: vec![VmName::parse("web-1").unwrap()],
            operators: vec![("alice".into(), OperatorRole::Operator)],
            days: None,
        };
        let written = init(&dir, &options).unwrap();
        let names: Vec<String> = written
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            names,
            [
                "ca.pem",
                "ca-key.pem",
                "registry.pem",
                "registry-key.pem",
                "cache.pem",
                "cache-key.pem",
                "processor.pem",
                "processor-key.pem",
                "failover.pem",
                "failover-key.pem",
                "agent-web-1.pem",
                "agent-web-1-key.pem",
                "operator-alice.pem",
                "operator-alice-key.pem",
            ]
        );
        for path in &written {
            let mode = std::fs::metadata(path).unwrap().permissions().mode() & 0o777;
            let name = path.file_name().unwrap().to_string_lossy();
            if name.ends_with("-key.pem") {
                assert_eq!(mode, 0o600, "{name}");
            }
        }
        let cert = std::fs::read_to_string(dir.join("operator-alice.pem")).unwrap();
        assert_eq!(
            principal_of_cert(&der(&cert)).unwrap(),
            Some(Principal::Operator {
                name: "alice".into(),
                role: OperatorRole::Operator
            })
        );

        let before = std::fs::read(dir.join("ca.pem")).unwrap();
        let err = init(&dir, &options).unwrap_err();
        assert!(
            matches!(&err, PkiError::Exists(p) if p.ends_with("ca.pem")),
            "{err}"
        );
        assert!(err.to_string().contains("ca.pem"), "{err}");
        assert_eq!(std::fs::read(dir.join("ca.pem")).unwrap(), before);

        // One more agent from the same CA; never over an existing pair.
        let web2 = Principal::Agent {
            vm: VmName::parse("web-2").unwrap(),
        };
        let more = issue_into(&dir, &web2, &[], Some(7)).unwrap();
        assert_eq!(more.len(), 2);
        let mode = std::fs::metadata(&more[1]).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let err = issue_into(&dir, &web2, &[], None).unwrap_err();
        assert!(
            matches!(&err, PkiError::Exists(p) if p.ends_with("agent-web-2.pem")),
            "{err}"
        );
        // No temporary files left behind.
        let stray: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with('.'))
            .collect();
        assert!(stray.is_empty(), "{stray:?}");
    }

    #[test]
    fn init_writes_nothing_when_any_file_exists() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(tmp.path().join("cache-key.pem"), "mine").unwrap();
        let err = init(tmp.path(), &InitOptions::default()).unwrap_err();
        assert!(
            matches!(&err, PkiError::Exists(p) if p.ends_with("cache-key.pem")),
            "{err}"
        );
        assert!(!tmp.path().join("ca.pem").exists());
        assert_eq!(
            std::fs::read(tmp.path().join("cache-key.pem")).unwrap(),
            b"mine"
        );
    }

    #[test]
    fn init_refuses_two_certificates_for_one_file() {
        let tmp = tempfile::tempdir().unwrap();
        for options in [
            InitOptions {
                agents: vec![VmName::parse("web-1").unwrap(); 2],
                ..InitOptions::default()
            },
            InitOptions {
                operators: vec![
                    ("alice".into(), OperatorRole::Admin),
                    ("alice".into(), OperatorRole::Reader),
                ],
                ..InitOptions::default()
            },
        ] {
            let err = init(tmp.path(), &options).unwrap_err();
            assert!(
                matches!(&err, PkiError::InvalidPrincipal(m) if m.contains("two certificates")),
                "{err}"
            );
            assert!(!tmp.path().join("ca.pem").exists());
        }
    }

    #[test]
    fn operator_names_must_fit_a_uri() {
        let tmp = tempfile::tempdir().unwrap();
        let options = InitOptions {
            operators: vec![("a/b".into(), OperatorRole::Admin)],
            ..InitOptions::default()
        };
        assert!(init(tmp.path(), &options).is_err());
        assert!(!tmp.path().join("ca.pem").exists());
    }
}
