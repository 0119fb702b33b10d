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
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            request_timeout_secs: 30,
            concurrency_limit: 1024,
            max_message_bytes: 16 * 1024 * 1024,
            shutdown_grace_secs: 10,
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
    limits: Option<Limits>,
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
    /// Request limits.
    pub limits: Limits,
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
            limits: Limits::default(),
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
        let peer = |setting: &'static str, flag: &Option<String>, file: Option<String>| {
            flag.clone()
                .or(file)
                .map(|url| validate_url(setting, &url))
                .transpose()
        };
        Ok((
            ServiceConfig {
                listen,
                data_dir,
                registry: peer("registry", &self.registry, file.peers.registry)?,
                cache: peer("cache", &self.cache, file.peers.cache)?,
                processor: peer("processor", &self.processor, file.peers.processor)?,
                otlp_endpoint: peer("otlp_endpoint", &self.otlp_endpoint, file.otlp_endpoint)?,
                log: self
                    .log
                    .clone()
                    .or(file.log)
                    .unwrap_or_else(|| "info".into()),
                limits: file.limits.unwrap_or_default(),
            },
            own,
        ))
    }
}

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
        let args = CommonArgs {
            listen: Some("127.0.0.1:9001".into()),
            config: Some(path),
            ..Default::default()
        };
        let (cfg, own): (ServiceConfig, Own) = args.resolve("registry", 7101).unwrap();
        assert_eq!(cfg.listen, "127.0.0.1:9001".parse().unwrap());
        assert_eq!(cfg.data_dir, PathBuf::from("/var/x"));
        assert_eq!(cfg.registry.as_deref(), Some("http://r:1"));
        assert_eq!(cfg.limits.concurrency_limit, 7);
        assert_eq!(cfg.limits.request_timeout_secs, 30);
        assert_eq!(own.regions, vec!["a", "b"]);

        let (cfg, own): (ServiceConfig, Own) =
            CommonArgs::default().resolve("registry", 7101).unwrap();
        assert_eq!(cfg.listen, "127.0.0.1:7101".parse().unwrap());
        assert_eq!(cfg.data_dir, PathBuf::from("ferry-data/registry"));
        assert!(own.regions.is_empty());
    }

    #[test]
    fn bad_values_are_named() {
        let args = CommonArgs {
            listen: Some("nowhere".into()),
            ..Default::default()
        };
        let err = args.resolve::<Own>("registry", 1).unwrap_err().to_string();
        assert!(err.contains("listen"), "{err}");
        let args = CommonArgs {
            cache: Some("ftp://x".into()),
            ..Default::default()
        };
        let err = args.resolve::<Own>("registry", 1).unwrap_err().to_string();
        assert!(err.contains("cache") && err.contains("scheme"), "{err}");

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ferry.toml");
        std::fs::write(&path, "[registry]\nregionz = []\n").unwrap();
        let args = CommonArgs {
            config: Some(path),
            ..Default::default()
        };
        let err = args.resolve::<Own>("registry", 1).unwrap_err().to_string();
        assert!(err.contains("regionz"), "{err}");
    }
}
