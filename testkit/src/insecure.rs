//! Credentials for tests that run service binaries in plaintext. A binary
//! serves plaintext only with `--insecure --cluster-secret-file F`, and
//! then checks every caller (docs/security.md), so a test makes one
//! [`Insecure`]: a tempdir holding a cluster secret (0600) and a bootstrap
//! admin token. [`ServiceProcess`](crate::ServiceProcess) passes its
//! [`args`](Insecure::args) to every service binary (registry-svc also
//! gets `--bootstrap-token-file`), [`agent_command`] starts ferry-agent with
//! an agent token, and the test's own clients connect with
//! [`Insecure::admin`], [`Insecure::service`] or [`Insecure::agent`]
//! through [`channel`].
//!
//! The testkit's helpers that take a URL (`protect_vm`, `protected_item`,
//! `points::*`, `group::*`, `replay::tail_all`) take an [`At`]: a plain
//! `&str` calls with no credentials (an in-process cluster, which checks
//! nobody), `insecure.at(url)` with the credentials the helper's calls
//! need.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;

use ferry_proto::ids::VmName;
use ferry_runtime::peers::{Credentials, PeerChannel};
use ferry_runtime::security::{ClusterSecret, Principal, ServiceKind};

use crate::bin_path;

/// A test's cluster secret and bootstrap admin token, on disk. Clones
/// share the directory, which goes when the last clone does.
#[derive(Clone)]
pub struct Insecure {
    dir: Arc<tempfile::TempDir>,
    secret: ClusterSecret,
    admin_token: String,
}

impl std::fmt::Debug for Insecure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Insecure")
            .field("dir", &self.dir.path())
            .finish_non_exhaustive()
    }
}

impl Default for Insecure {
    fn default() -> Self {
        Self::new()
    }
}

/// The cluster secret's file in an [`Insecure`]'s directory.
const SECRET_FILE: &str = "cluster-secret";
/// The bootstrap admin token's file.
const ADMIN_TOKEN_FILE: &str = "admin-token";

impl Insecure {
    /// A new tempdir with a fresh cluster secret and bootstrap token, both
    /// written mode 0600.
    pub fn new() -> Insecure {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let dir = tempfile::tempdir().unwrap();
        let (secret, made) = ClusterSecret::load_or_create(&dir.path().join(SECRET_FILE)).unwrap();
        assert!(made);
        let admin_token =
            registry_svc::generate_token(registry_svc::tokens::BOOTSTRAP_NAME).unwrap();
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(dir.path().join(ADMIN_TOKEN_FILE))
            .unwrap();
        file.write_all(admin_token.as_bytes()).unwrap();
        Insecure {
            dir: Arc::new(dir),
            secret,
            admin_token,
        }
    }

    /// The cluster secret.
    pub fn secret(&self) -> &ClusterSecret {
        &self.secret
    }

    /// The cluster secret's file (`--cluster-secret-file`).
    pub fn secret_file(&self) -> PathBuf {
        self.dir.path().join(SECRET_FILE)
    }

    /// The bootstrap admin token's file (registry-svc's
    /// `--bootstrap-token-file`).
    pub fn admin_token_file(&self) -> PathBuf {
        self.dir.path().join(ADMIN_TOKEN_FILE)
    }

    /// The bootstrap admin token (an operator token of role admin, once
    /// registry has installed it).
    pub fn admin_token(&self) -> &str {
        &self.admin_token
    }

    /// The arguments every service binary `binary` is started with:
    /// `--insecure --cluster-secret-file F`, and for registry-svc
    /// `--bootstrap-token-file T`.
    pub fn args(&self, binary: &Path) -> Vec<String> {
        let mut args = vec![
            "--insecure".to_string(),
            "--cluster-secret-file".to_string(),
            self.secret_file().display().to_string(),
        ];
        if binary.file_name().is_some_and(|n| n == "registry-svc") {
            args.push("--bootstrap-token-file".into());
            args.push(self.admin_token_file().display().to_string());
        }
        args
    }

    /// The bearer token of `principal` (a service or an agent).
    pub fn token(&self, principal: &Principal) -> String {
        self.secret
            .token_for(principal)
            .expect("services and agents have cluster tokens")
    }

    /// A service's token.
    pub fn service_token(&self, service: ServiceKind) -> String {
        self.token(&Principal::Service { service })
    }

    /// The token of `vm`'s agent.
    pub fn agent_token(&self, vm: &str) -> String {
        self.token(&Principal::Agent {
            vm: VmName::parse(vm).unwrap(),
        })
    }

    /// A file holding the token of `vm`'s agent (`ferry-agent
    /// --token-file`), written now if missing.
    pub fn agent_token_file(&self, vm: &str) -> PathBuf {
        let path = self
            .dir
            .path()
            .join(format!("agent-{}.token", ferry_proto::ids::path_name(vm)));
        if !path.exists() {
            std::fs::write(&path, self.agent_token(vm)).unwrap();
        }
        path
    }

    /// A one-time enrollment token for `vm`'s agent, issued now by registry
    /// at `registry` (as an admin; the VM must be protected), also written
    /// where [`agent_command`] passes it to ferry-agent
    /// (`--enrollment-token-file`). A new one replaces the one before.
    pub async fn enroll(&self, registry: &str, vm: &str) -> String {
        use ferry_proto::registry::v1 as reg;
        let mut client =
            reg::registry_client::RegistryClient::new(channel(registry, &self.admin()));
        let token = client
            .create_enrollment_token(reg::CreateEnrollmentTokenRequest {
                vm_name: vm.to_string(),
                ttl_seconds: 0,
            })
            .await
            .unwrap_or_else(|e| panic!("enrolling {vm}'s agent at {registry}: {e}"))
            .into_inner()
            .token;
        std::fs::write(self.enrollment_token_file(vm), &token).unwrap();
        token
    }

    /// Where [`Insecure::enroll`] keeps `vm`'s enrollment token.
    pub fn enrollment_token_file(&self, vm: &str) -> PathBuf {
        self.dir
            .path()
            .join(format!("agent-{}.enroll", ferry_proto::ids::path_name(vm)))
    }

    /// Plaintext with the bootstrap admin token: an admin operator (checked
    /// by registry; the other services ask it).
    pub fn admin(&self) -> Credentials {
        bearer(self.admin_token.clone())
    }

    /// Plaintext as `service`.
    pub fn service(&self, service: ServiceKind) -> Credentials {
        bearer(self.service_token(service))
    }

    /// Plaintext as the agent of `vm`.
    pub fn agent(&self, vm: &str) -> Credentials {
        bearer(self.agent_token(vm))
    }

    /// `url` with these credentials, for the testkit's helpers.
    pub fn at<'a>(&'a self, url: &'a str) -> At<'a> {
        At {
            url,
            insecure: Some(self),
        }
    }

    /// The security of a service embedded in the test that checks its
    /// callers as the binaries do: plaintext, with this secret.
    pub fn security(&self) -> ferry_runtime::config::Security {
        ferry_runtime::config::Security::plaintext_enforced(self.secret.clone())
    }

    /// grpcurl's `-H` value carrying `credentials`' bearer token.
    pub fn header(credentials: &Credentials) -> String {
        format!(
            "authorization: Bearer {}",
            credentials.bearer.as_deref().expect("a bearer token")
        )
    }
}

fn bearer(token: String) -> Credentials {
    Credentials {
        tls: None,
        bearer: Some(token),
    }
}

/// A lazily connecting channel to `url` presenting `credentials`.
pub fn channel(url: &str, credentials: &Credentials) -> PeerChannel {
    ferry_runtime::connect(url, credentials).unwrap()
}

/// Where a testkit helper calls, and whether with credentials: from a
/// plain URL (`&str`, `&String`: none, for in-process clusters that check
/// nobody) or [`Insecure::at`].
#[derive(Clone, Copy)]
pub struct At<'a> {
    pub url: &'a str,
    insecure: Option<&'a Insecure>,
}

impl<'a> From<&'a str> for At<'a> {
    fn from(url: &'a str) -> Self {
        At {
            url,
            insecure: None,
        }
    }
}

impl<'a> From<&'a String> for At<'a> {
    fn from(url: &'a String) -> Self {
        At::from(url.as_str())
    }
}

impl At<'_> {
    /// A channel presenting `credentials` (picked from the [`Insecure`]),
    /// or none; every call answered within
    /// [`CALL_DEADLINE`](crate::points::CALL_DEADLINE) or failed.
    pub fn channel(&self, credentials: impl FnOnce(&Insecure) -> Credentials) -> TestChannel {
        let credentials = self.insecure.map(credentials).unwrap_or_default();
        let endpoint = tonic::transport::Endpoint::from_shared(self.url.to_string())
            .unwrap_or_else(|e| panic!("{}: {e}", self.url))
            .timeout(crate::points::CALL_DEADLINE);
        let bearer = credentials
            .bearer
            .map(|token| format!("Bearer {token}").parse().unwrap());
        tonic::service::interceptor::InterceptedService::new(
            endpoint.connect_lazy(),
            Bearer(bearer),
        )
    }

    /// A channel as an admin operator.
    pub fn admin(&self) -> TestChannel {
        self.channel(Insecure::admin)
    }

    /// A channel as `service`.
    pub fn as_service(&self, service: ServiceKind) -> TestChannel {
        self.channel(|i| i.service(service))
    }
}

/// A plaintext channel of the testkit's helpers, with a bearer token if any.
pub type TestChannel =
    tonic::service::interceptor::InterceptedService<tonic::transport::Channel, Bearer>;

/// Adds `authorization: Bearer <token>` to each call.
#[derive(Clone)]
pub struct Bearer(Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>);

impl tonic::service::Interceptor for Bearer {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

/// How a ferry-agent started by [`agent_command`] proves who it is.
pub enum AgentAuth<'a> {
    /// The agent token of its VM from the cluster secret (`--token-file`),
    /// in plaintext.
    Token(&'a Insecure),
    /// Whatever the caller adds (certificate flags, environment, or
    /// nothing, to see it refused).
    Given,
}

/// The one way tests start ferry-agent: `ferry-agent --registry <registry>
/// --vm <vm>` with `auth`'s credentials (and the enrollment token of
/// [`Insecure::enroll`], if the test made one), `FERRY_LOG=warn` and no
/// stdin.
/// The caller adds the other flags and spawns it.
pub fn agent_command(registry: &str, vm: &str, auth: AgentAuth<'_>) -> Command {
    let mut command = Command::new(bin_path("ferry-agent"));
    command
        .args(["--registry", registry, "--vm", vm])
        .env("FERRY_LOG", "warn")
        .stdin(Stdio::null());
    match auth {
        AgentAuth::Token(insecure) => {
            command
                .arg("--token-file")
                .arg(insecure.agent_token_file(vm));
            // Enrolled by the test (Insecure::enroll): the first start
            // registers with the token, later ones with the credential the
            // agent kept.
            let enrollment = insecure.enrollment_token_file(vm);
            if enrollment.exists() {
                command.arg("--enrollment-token-file").arg(enrollment);
            }
        }
        AgentAuth::Given => {}
    }
    command
}
