//! The one configuration scheme of every Ferry service binary.
//!
//! Each setting comes from, in order of precedence: a command-line flag, an
//! environment variable, the TOML config file (`--config`), a default. The
//! service-specific part of the file lives in a table named after the service
//! (`[registry]`, `[cache]`, ...). See docs/configuration.md.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Deserialize;

use crate::peers::Credentials;
use crate::security::{ClientTls, ClusterSecret, Principal, ServiceKind, Tls, TlsFiles};

/// Flags shared by every service binary; each has an environment variable.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct CommonArgs {
    /// Address to serve gRPC on (HOST:PORT).
    #[arg(long, env = "FERRY_LISTEN", value_name = "HOST:PORT")]
    pub listen: Option<String>,
    /// Directory for the service's durable state.
    #[arg(long, env = "FERRY_DATA_DIR", value_name = "PATH")]
    pub data_dir: Option<PathBuf>,
    /// TOML config file; flags and environment variables override it.
    #[arg(long, env = "FERRY_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// URL of registry-svc (http://HOST:PORT).
    #[arg(long, env = "FERRY_REGISTRY", value_name = "URL")]
    pub registry: Option<String>,
    /// URL of cache-svc.
    #[arg(long, env = "FERRY_CACHE", value_name = "URL")]
    pub cache: Option<String>,
    /// URL of processor-svc.
    #[arg(long, env = "FERRY_PROCESSOR", value_name = "URL")]
    pub processor: Option<String>,
    /// OTLP/gRPC endpoint to export traces to; none by default.
    #[arg(long, env = "FERRY_OTLP_ENDPOINT", value_name = "URL")]
    pub otlp_endpoint: Option<String>,
    /// Log filter in tracing's env-filter syntax (default "info").
    #[arg(long, env = "FERRY_LOG", value_name = "FILTER")]
    pub log: Option<String>,
    /// Log lines as text (coloured only on a terminal) or one JSON object
    /// per line for log shippers (default text).
    #[arg(long, env = "FERRY_LOG_FORMAT", value_name = "FORMAT")]
    pub log_format: Option<crate::telemetry::LogFormat>,
    /// This service's certificate (PEM), served to clients and presented to
    /// peers; `ferry certs init` makes one per service.
    #[arg(long, env = "FERRY_TLS_CERT", value_name = "PEM")]
    pub tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM).
    #[arg(long, env = "FERRY_TLS_KEY", value_name = "PEM")]
    pub tls_key: Option<PathBuf>,
    /// The CA that every peer's and client's certificate must chain to (PEM).
    #[arg(long, env = "FERRY_TLS_CA", value_name = "PEM")]
    pub tls_ca: Option<PathBuf>,
    /// Serve and call peers in plaintext, without TLS. Needs
    /// --cluster-secret-file so that services still prove who they are.
    #[arg(long, env = "FERRY_INSECURE")]
    pub insecure: bool,
    /// Also answer grpc.health.v1, and nothing else, in plaintext on this
    /// address (HOST:PORT): for probes that cannot speak TLS, such as
    /// Kubernetes' gRPC probes.
    #[arg(long, env = "FERRY_HEALTH_LISTEN", value_name = "HOST:PORT")]
    pub health_listen: Option<String>,
    /// Serve Prometheus metrics over plain HTTP at http://HOST:PORT/metrics;
    /// off unless set (docs/operations.md lists every metric).
    #[arg(long, env = "FERRY_METRICS_LISTEN", value_name = "HOST:PORT")]
    pub metrics_listen: Option<String>,
    /// A file of at least 32 secret bytes shared by every service of the
    /// deployment: services without TLS authenticate to each other with
    /// tokens derived from it.
    #[arg(long, env = "FERRY_CLUSTER_SECRET_FILE", value_name = "FILE")]
    pub cluster_secret_file: Option<PathBuf>,
}

/// Why a configuration could not be resolved.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The config file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The config file is not valid TOML or has unknown or mistyped keys.
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    /// The service would run without TLS and was not asked to: plaintext
    /// needs `--insecure` and a cluster secret (docs/security.md).
    #[error("{0}")]
    Plaintext(String),
    /// A setting has a value that cannot be used.
    #[error("invalid {setting} {value:?}: {reason}")]
    Invalid {
        setting: &'static str,
        value: String,
        reason: String,
    },
}

/// Request limits every service enforces (tower layers around all RPCs).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// A unary call (or a stream's set-up) taking longer is cancelled.
    pub request_timeout_secs: u64,
    /// Requests in flight at once, across all connections; more are shed with
    /// RESOURCE_EXHAUSTED instead of queueing.
    pub concurrency_limit: usize,
    /// Largest gRPC message accepted or sent, in bytes.
    pub max_message_bytes: usize,
    /// After a shutdown signal, calls in flight get this long to finish
    /// before the server stops regardless (a client's open stream, such as a
    /// health Watch, must not hold shutdown forever).
    pub shutdown_grace_secs: u64,
    /// Days of audit trail kept (today counts as one); older day files are
    /// deleted (docs/security.md, "Audit trail").
    pub audit_retention_days: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            request_timeout_secs: 30,
            concurrency_limit: 1024,
            max_message_bytes: 16 * 1024 * 1024,
            shutdown_grace_secs: 10,
            audit_retention_days: 30,
        }
    }
}

impl Limits {
    /// The request timeout as a duration.
    pub fn request_timeout(&self) -> Duration {
        Duration::from_secs(self.request_timeout_secs.max(1))
    }
}

/// The common part of the config file.
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct FileCommon {
    listen: Option<String>,
    data_dir: Option<PathBuf>,
    peers: FilePeers,
    otlp_endpoint: Option<String>,
    log: Option<String>,
    log_format: Option<crate::telemetry::LogFormat>,
    limits: Option<Limits>,
    tls: FileTls,
    health_listen: Option<String>,
    metrics_listen: Option<String>,
    insecure: Option<bool>,
    cluster_secret_file: Option<PathBuf>,
}

/// The `[tls]` table.
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct FileTls {
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    ca: Option<PathBuf>,
}

/// The `[peers]` table: peer URLs (a top-level `registry = ...` would clash
/// with the `[registry]` table).
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct FilePeers {
    registry: Option<String>,
    cache: Option<String>,
    processor: Option<String>,
}

/// A service's resolved common configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct ServiceConfig {
    /// Where to listen.
    pub listen: SocketAddr,
    /// Where durable state goes.
    pub data_dir: PathBuf,
    /// registry-svc URL, if given.
    pub registry: Option<String>,
    /// cache-svc URL, if given.
    pub cache: Option<String>,
    /// processor-svc URL, if given.
    pub processor: Option<String>,
    /// OTLP endpoint, if given.
    pub otlp_endpoint: Option<String>,
    /// Log filter.
    pub log: String,
    /// How log lines are written.
    pub log_format: crate::telemetry::LogFormat,
    /// Request limits.
    pub limits: Limits,
    /// TLS and caller checks.
    pub security: Security,
    /// A plaintext port for health checks only, if any.
    pub health_listen: Option<SocketAddr>,
    /// Where Prometheus metrics are served over HTTP, if anywhere.
    pub metrics_listen: Option<SocketAddr>,
}

/// How a service secures its server and its calls to peers.
#[derive(Debug, Clone, PartialEq)]
pub struct Security {
    /// TLS material; `None`: plaintext.
    pub tls: Option<Tls>,
    /// The deployment's shared secret for service tokens, if any.
    pub cluster_secret: Option<ClusterSecret>,
    /// Whether callers are authenticated and authorized: always for a
    /// service configured by [`CommonArgs`]; nothing is checked only in an
    /// in-process embedding ([`Security::in_process`]) whose program is the
    /// services' only caller.
    pub enforce: bool,
}

impl Security {
    /// No TLS, nothing checked: a service embedded in a test or a program
    /// that is its only caller.
    pub fn in_process() -> Security {
        Security {
            tls: None,
            cluster_secret: None,
            enforce: false,
        }
    }

    /// Plaintext, every call checked, services proving who they are with
    /// tokens from `secret` (`ferry serve` on loopback).
    pub fn plaintext_enforced(secret: ClusterSecret) -> Security {
        Security {
            tls: None,
            cluster_secret: Some(secret),
            enforce: true,
        }
    }

    /// The credentials `service` presents to its peers: its certificate,
    /// else a service token.
    pub fn credentials(&self, service: ServiceKind) -> Credentials {
        let principal = Principal::Service { service };
        Credentials {
            tls: self.tls.as_ref().map(ClientTls::from),
            bearer: match (&self.tls, &self.cluster_secret) {
                (None, Some(secret)) => secret.token_for(&principal),
                _ => None,
            },
        }
    }
}

impl ServiceConfig {
    /// A configuration for running a service in-process (tests, `ferry demo`).
    pub fn in_process(data_dir: impl Into<PathBuf>) -> Self {
        ServiceConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            data_dir: data_dir.into(),
            registry: None,
            cache: None,
            processor: None,
            otlp_endpoint: None,
            log: "info".into(),
            log_format: crate::telemetry::LogFormat::Text,
            limits: Limits::default(),
            security: Security::in_process(),
            health_listen: None,
            metrics_listen: None,
        }
    }
}

/// Checks that a peer URL is an absolute http(s) URL with a host.
pub fn validate_url(setting: &'static str, url: &str) -> Result<String, ConfigError> {
    let invalid = |reason: &str| ConfigError::Invalid {
        setting,
        value: url.to_string(),
        reason: reason.to_string(),
    };
    let uri: http::Uri = url
        .parse()
        .map_err(|_| invalid("not a URL; expected http://HOST:PORT"))?;
    match uri.scheme_str() {
        Some("http") | Some("https") => {}
        _ => return Err(invalid("the scheme must be http or https")),
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err(invalid("the URL has no host"));
    }
    Ok(url.trim_end_matches('/').to_string())
}

impl CommonArgs {
    /// Resolves flags, environment, the config file and defaults into the
    /// common configuration and the service's own table `[<service>]`.
    pub fn resolve<S>(
        &self,
        service: &str,
        default_port: u16,
    ) -> Result<(ServiceConfig, S), ConfigError>
    where
        S: DeserializeOwned + Default,
    {
        let (file, own) = match &self.config {
            Some(path) => read_file::<S>(path, service)?,
            None => (FileCommon::default(), S::default()),
        };
        let security = self.security(&file)?;
        let address = |setting: &'static str, text: Option<String>, example: &str| {
            text.map(|text| {
                text.parse::<SocketAddr>()
                    .map_err(|_| ConfigError::Invalid {
                        setting,
                        value: text.clone(),
                        reason: format!("expected HOST:PORT with an IP address, e.g. {example}"),
                    })
            })
            .transpose()
        };
        let health_listen = address(
            "health_listen",
            self.health_listen.clone().or(file.health_listen.clone()),
            "0.0.0.0:7201",
        )?;
        let metrics_listen = address(
            "metrics_listen",
            self.metrics_listen.clone().or(file.metrics_listen.clone()),
            "0.0.0.0:9101",
        )?;
        let listen_text = self
            .listen
            .clone()
            .or(file.listen)
            .unwrap_or_else(|| format!("127.0.0.1:{default_port}"));
        let listen = listen_text.parse().map_err(|_| ConfigError::Invalid {
            setting: "listen",
            value: listen_text.clone(),
            reason: "expected HOST:PORT with an IP address, e.g. 127.0.0.1:7101".into(),
        })?;
        let data_dir = self
            .data_dir
            .clone()
            .or(file.data_dir)
            .unwrap_or_else(|| PathBuf::from("ferry-data").join(service));
        let scheme = if security.tls.is_some() {
            "https"
        } else {
            "http"
        };
        let peer = |setting: &'static str, flag: &Option<String>, file: Option<String>| {
            flag.clone()
                .or(file)
                .map(|url| {
                    let url = validate_url(setting, &url)?;
                    if !url.starts_with(&format!("{scheme}://")) {
                        return Err(ConfigError::Invalid {
                            setting,
                            value: url,
                            reason: if scheme == "https" {
                                "TLS is configured: peers are reached at https:// URLs".into()
                            } else {
                                "without TLS (--insecure) peers are reached at http:// URLs".into()
                            },
                        });
                    }
                    Ok(url)
                })
                .transpose()
        };
        Ok((
            ServiceConfig {
                listen,
                data_dir,
                registry: peer("registry", &self.registry, file.peers.registry)?,
                cache: peer("cache", &self.cache, file.peers.cache)?,
                processor: peer("processor", &self.processor, file.peers.processor)?,
                otlp_endpoint: self
                    .otlp_endpoint
                    .clone()
                    .or(file.otlp_endpoint)
                    .map(|url| validate_url("otlp_endpoint", &url))
                    .transpose()?,
                log: self
                    .log
                    .clone()
                    .or(file.log)
                    .unwrap_or_else(|| "info".into()),
                log_format: self.log_format.or(file.log_format).unwrap_or_default(),
                limits: file.limits.unwrap_or_default(),
                security,
                health_listen,
                metrics_listen,
            },
            own,
        ))
    }

    /// TLS from flags or the `[tls]` table, all three files or none; without
    /// them, plaintext only when asked for (`--insecure`), and then with a
    /// cluster secret so services can still prove who they are. Every call
    /// is checked either way.
    fn security(&self, file: &FileCommon) -> Result<Security, ConfigError> {
        let cert = self.tls_cert.clone().or(file.tls.cert.clone());
        let key = self.tls_key.clone().or(file.tls.key.clone());
        let ca = self.tls_ca.clone().or(file.tls.ca.clone());
        let insecure = self.insecure || file.insecure.unwrap_or(false);
        let cluster_secret = self
            .cluster_secret_file
            .clone()
            .or(file.cluster_secret_file.clone())
            .map(|path| ClusterSecret::load(&path))
            .transpose()?;
        let invalid = |setting, reason: &str| ConfigError::Invalid {
            setting,
            value: String::new(),
            reason: reason.to_string(),
        };
        let tls = match (cert, key, ca) {
            (Some(cert), Some(key), Some(ca)) => {
                if insecure {
                    return Err(invalid(
                        "insecure",
                        "TLS files are given and --insecure asks for plaintext; choose one",
                    ));
                }
                Some(Tls::load(TlsFiles { cert, key, ca })?)
            }
            (None, None, None) => None,
            _ => {
                return Err(invalid(
                    "tls",
                    "--tls-cert, --tls-key and --tls-ca go together; give all three",
                ))
            }
        };
        if tls.is_none() && !(insecure && cluster_secret.is_some()) {
            return Err(ConfigError::Plaintext(format!(
                "{} {PLAINTEXT_NEEDS}",
                plaintext_refusal(insecure, cluster_secret.is_some())
            )));
        }
        Ok(Security {
            tls,
            cluster_secret,
            enforce: true,
        })
    }
}

/// Why a service without TLS is refused: `--insecure` without a secret, or
/// no `--insecure` (with a secret or not).
fn plaintext_refusal(insecure: bool, secret: bool) -> &'static str {
    match (insecure, secret) {
        (true, _) => {
            "--insecure needs --cluster-secret-file: without TLS, services prove who they \
             are to each other with tokens derived from that shared secret."
        }
        (false, true) => {
            "refusing to start without TLS: a cluster secret alone does not turn plaintext \
             on; a service serves plaintext only when asked to with --insecure."
        }
        (false, false) => {
            "refusing to start without TLS: a service serves plaintext only when asked to, \
             and every caller is authenticated either way."
        }
    }
}

/// The ways out of a refused plaintext start, named in the error.
const PLAINTEXT_NEEDS: &str = "Give --tls-cert, --tls-key and --tls-ca for TLS (`ferry certs \
     init DIR` makes them), or, for plaintext on a network you trust, --insecure \
     --cluster-secret-file FILE (a file of at least 32 secret bytes, mode 0600, shared by every \
     service); see docs/security.md";

fn read_file<S: DeserializeOwned + Default>(
    path: &Path,
    service: &str,
) -> Result<(FileCommon, S), ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let parse_err = |e: toml::de::Error| ConfigError::Parse {
        path: path.to_path_buf(),
        message: e.to_string(),
    };
    let mut table: toml::Table = toml::from_str(&text).map_err(parse_err)?;
    // Tables of the other services may sit in the same file; only ours matters.
    let own = match table.remove(service) {
        Some(value) => value.try_into().map_err(parse_err)?,
        None => S::default(),
    };
    for other in ["registry", "cache", "processor", "failover", "agent"] {
        table.remove(other);
    }
    let common: FileCommon = toml::Value::Table(table).try_into().map_err(parse_err)?;
    Ok((common, own))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Default, Deserialize, PartialEq)]
    #[serde(default, deny_unknown_fields)]
    struct Own {
        regions: Vec<String>,
    }

    /// Plaintext with a cluster secret, as the tests of other settings need.
    fn plain(dir: &Path, args: CommonArgs) -> CommonArgs {
        let secret = dir.join("cluster-secret");
        std::fs::write(&secret, "ab".repeat(32)).unwrap();
        CommonArgs {
            insecure: true,
            cluster_secret_file: Some(secret),
            ..args
        }
    }

    /// The refusal names both ways out: TLS (and how to make it) or
    /// --insecure with a cluster secret.
    fn names_both_ways_out(err: &str) {
        for way in [
            "--tls-cert",
            "--tls-key",
            "--tls-ca",
            "ferry certs init DIR",
            "--insecure --cluster-secret-file FILE",
        ] {
            assert!(err.contains(way), "{way} missing from: {err}");
        }
    }

    #[test]
    fn no_tls_and_no_insecure_is_refused() {
        let err = CommonArgs::default()
            .resolve::<Own>("registry", 1)
            .unwrap_err();
        assert!(matches!(err, ConfigError::Plaintext(_)), "{err:?}");
        let err = err.to_string();
        assert!(err.contains("without TLS"), "{err}");
        names_both_ways_out(&err);
    }

    #[test]
    fn a_cluster_secret_without_tls_needs_insecure_too() {
        let dir = tempfile::tempdir().unwrap();
        let mut args = plain(dir.path(), CommonArgs::default());
        args.insecure = false;
        let err = args.resolve::<Own>("registry", 1).unwrap_err().to_string();
        assert!(err.contains("does not turn plaintext on"), "{err}");
        names_both_ways_out(&err);
        // Nor from the config file alone.
        let path = dir.path().join("ferry.toml");
        std::fs::write(
            &path,
            format!(
                "cluster_secret_file = {:?}\n",
                dir.path().join("cluster-secret")
            ),
        )
        .unwrap();
        let args = CommonArgs {
            config: Some(path),
            ..Default::default()
        };
        let err = args.resolve::<Own>("registry", 1).unwrap_err().to_string();
        assert!(err.contains("--insecure"), "{err}");
    }

    #[test]
    fn insecure_without_a_cluster_secret_is_refused() {
        let args = CommonArgs {
            insecure: true,
            ..Default::default()
        };
        let err = args.resolve::<Own>("registry", 1).unwrap_err().to_string();
        assert!(
            err.contains("--insecure needs --cluster-secret-file"),
            "{err}"
        );
        names_both_ways_out(&err);
    }

    #[test]
    fn insecure_with_a_cluster_secret_is_plaintext_and_enforced() {
        let dir = tempfile::tempdir().unwrap();
        let (cfg, _) = plain(dir.path(), CommonArgs::default())
            .resolve::<Own>("registry", 1)
            .unwrap();
        assert!(cfg.security.enforce, "every call is checked");
        assert!(cfg.security.tls.is_none() && cfg.security.cluster_secret.is_some());
        // The same from the config file: `insecure = true`.
        let path = dir.path().join("ferry.toml");
        std::fs::write(
            &path,
            format!(
                "insecure = true\ncluster_secret_file = {:?}\n",
                dir.path().join("cluster-secret")
            ),
        )
        .unwrap();
        let args = CommonArgs {
            config: Some(path),
            ..Default::default()
        };
        let (cfg, _) = args.resolve::<Own>("registry", 1).unwrap();
        assert!(cfg.security.enforce && cfg.security.tls.is_none());
        // A token must never travel in the clear by mistake, nor TLS be
        // skipped: the peer URL's scheme follows the transport.
        let args = plain(
            dir.path(),
            CommonArgs {
                registry: Some("https://r:1".into()),
                ..Default::default()
            },
        );
        let err = args.resolve::<Own>("cache", 1).unwrap_err().to_string();
        assert!(err.contains("http://"), "{err}");
    }

    #[test]
    fn tls_needs_all_three_files_and_excludes_insecure() {
        let dir = tempfile::tempdir().unwrap();
        let args = CommonArgs {
            tls_cert: Some(dir.path().join("c.pem")),
            ..Default::default()
        };
        let err = args.resolve::<Own>("registry", 1).unwrap_err().to_string();
        assert!(err.contains("go together"), "{err}");
        let args = CommonArgs {
            tls_cert: Some(dir.path().join("c.pem")),
            tls_key: Some(dir.path().join("k.pem")),
            tls_ca: Some(dir.path().join("ca.pem")),
            insecure: true,
            ..Default::default()
        };
        let err = args.resolve::<Own>("registry", 1).unwrap_err().to_string();
        assert!(err.contains("choose one"), "{err}");
    }

    #[cfg(feature = "pki-issue")]
    #[test]
    fn tls_is_enforced_with_or_without_a_cluster_secret() {
        use crate::security::pki::{init, InitOptions};
        let dir = tempfile::tempdir().unwrap();
        let pki = dir.path().join("pki");
        init(&pki, &InitOptions::default()).unwrap();
        let tls = CommonArgs {
            tls_cert: Some(pki.join("registry.pem")),
            tls_key: Some(pki.join("registry-key.pem")),
            tls_ca: Some(pki.join("ca.pem")),
            ..Default::default()
        };
        let (cfg, _) = tls.resolve::<Own>("registry", 1).unwrap();
        assert!(cfg.security.enforce && cfg.security.tls.is_some());
        assert!(cfg.security.cluster_secret.is_none());
        let mut with_secret = plain(dir.path(), tls);
        with_secret.insecure = false;
        let (cfg, _) = with_secret.resolve::<Own>("registry", 1).unwrap();
        assert!(cfg.security.enforce && cfg.security.tls.is_some());
        assert!(cfg.security.cluster_secret.is_some());
    }

    #[test]
    fn flags_win_over_file_and_file_over_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ferry.toml");
        std::fs::write(
            &path,
            "listen = \"127.0.0.1:9000\"\ndata_dir = \"/var/x\"\n[peers]\nregistry = \"http://r:1\"\n\
             [limits]\nconcurrency_limit = 7\n[registry]\nregions = [\"a\", \"b\"]\n\
             [cache]\nanything = 1\n",
        )
        .unwrap();
        let args = plain(
            dir.path(),
            CommonArgs {
                listen: Some("127.0.0.1:9001".into()),
                config: Some(path),
                ..Default::default()
            },
        );
        let (cfg, own): (ServiceConfig, Own) = args.resolve("registry", 7101).unwrap();
        assert_eq!(cfg.listen, "127.0.0.1:9001".parse().unwrap());
        assert_eq!(cfg.data_dir, PathBuf::from("/var/x"));
        assert_eq!(cfg.registry.as_deref(), Some("http://r:1"));
        assert_eq!(cfg.limits.concurrency_limit, 7);
        assert_eq!(cfg.limits.request_timeout_secs, 30);
        assert_eq!(own.regions, vec!["a", "b"]);

        let (cfg, own): (ServiceConfig, Own) = plain(dir.path(), CommonArgs::default())
            .resolve("registry", 7101)
            .unwrap();
        assert_eq!(cfg.listen, "127.0.0.1:7101".parse().unwrap());
        assert_eq!(cfg.data_dir, PathBuf::from("ferry-data/registry"));
        assert!(own.regions.is_empty());
    }

    #[test]
    fn bad_values_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let args = plain(
            dir.path(),
            CommonArgs {
                listen: Some("nowhere".into()),
                ..Default::default()
            },
        );
        let err = args.resolve::<Own>("registry", 1).unwrap_err().to_string();
        assert!(err.contains("listen"), "{err}");
        let args = plain(
            dir.path(),
            CommonArgs {
                cache: Some("ftp://x".into()),
                ..Default::default()
            },
        );
        let err = args.resolve::<Own>("registry", 1).unwrap_err().to_string();
        assert!(err.contains("cache") && err.contains("scheme"), "{err}");

        let path = dir.path().join("ferry.toml");
        std::fs::write(&path, "[registry]\nregionz = []\n").unwrap();
        let args = plain(
            dir.path(),
            CommonArgs {
                config: Some(path),
                ..Default::default()
            },
        );
        let err = args.resolve::<Own>("registry", 1).unwrap_err().to_string();
        assert!(err.contains("regionz"), "{err}");
    }
}
