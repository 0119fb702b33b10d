//! Security over real sockets: TLS refuses a wrong CA, an expired
//! certificate, a server certificate for another name and plaintext; every
//! mutating registry RPC refuses a caller without credentials
//! (UNAUTHENTICATED) and one with too weak a role (PERMISSION_DENIED) and
//! changes nothing then; operator tokens work across services and stop
//! working when revoked; an agent acts only for its own VM; the `ferry` CLI
//! and grpcurl reach a registry-svc binary over mutual TLS.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // tests may

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use ferry_proto::cache::v1 as cache;
use ferry_proto::cache::v1::cache_client::CacheClient;
use ferry_proto::registry::v1 as reg;
use ferry_proto::registry::v1::registry_client::RegistryClient;
use ferry_runtime::peers::{connect, Credentials, PeerChannel};
use ferry_runtime::security::{ClientTls, OperatorRole, ServiceKind};
use ferry_runtime::{CancellationToken, ServiceConfig};
use ferry_testkit::pki::{CertFiles, TestPki};
use ferry_testkit::{bin_path, wait_for, ServiceProcess};
use tempfile::TempDir;
use tokio::net::TcpListener;
use tonic::Code;

/// A service's config with mutual TLS from `pki` and every call checked.
fn secured(pki: &TestPki, dir: &Path, service: ServiceKind) -> ServiceConfig {
    let mut config = ServiceConfig::in_process(dir);
    config.security = pki.security(service, None);
    config
}

async fn listener() -> (TcpListener, String) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("https://{}", listener.local_addr().unwrap());
    (listener, url)
}

/// registry-svc with TLS, in-process.
async fn registry(pki: &TestPki, dir: &TempDir, shutdown: &CancellationToken) -> String {
    let (listener, url) = listener().await;
    let config = secured(pki, &dir.path().join("registry"), ServiceKind::Registry);
    let config = registry_svc::Config::new(config, registry_svc::Settings::default()).unwrap();
    tokio::spawn(registry_svc::serve(config, listener, shutdown.clone()));
    url
}

/// cache-svc with TLS, in-process, using `registry`.
async fn cache_svc(
    pki: &TestPki,
    dir: &TempDir,
    registry: &str,
    shutdown: &CancellationToken,
) -> String {
    let (listener, url) = listener().await;
    let mut config = secured(pki, &dir.path().join("cache"), ServiceKind::Cache);
    config.registry = Some(registry.to_string());
    tokio::spawn(cache_svc::run(
        config,
        cache_svc::Settings::default(),
        listener,
        shutdown.clone(),
    ));
    url
}

/// registry-svc and cache-svc with TLS, in-process, both serving.
async fn registry_and_cache(
    pki: &TestPki,
    dir: &TempDir,
    shutdown: &CancellationToken,
) -> (String, String) {
    let registry_url = registry(pki, dir, shutdown).await;
    serving(&registry_url, &anonymous(pki)).await;
    let cache_url = cache_svc(pki, dir, &registry_url, shutdown).await;
    serving(&cache_url, &anonymous(pki)).await;
    (registry_url, cache_url)
}

fn with_cert(pki: &TestPki, files: &CertFiles) -> Credentials {
    pki.presenting(Some(files))
}

fn anonymous(pki: &TestPki) -> Credentials {
    pki.presenting(None)
}

fn with_token(pki: &TestPki, token: &str) -> Credentials {
    Credentials {
        bearer: Some(token.to_string()),
        ..anonymous(pki)
    }
}

fn registry_client(url: &str, credentials: &Credentials) -> RegistryClient<PeerChannel> {
    RegistryClient::new(connect(url, credentials).unwrap())
}

async fn serving(url: &str, credentials: &Credentials) {
    let health = tonic_health_check(url, credentials);
    wait_for("the service to serve", Duration::from_secs(30), || {
        let health = health.clone();
        async move { health().await.then_some(()) }
    })
    .await;
}

/// A probe of grpc.health.v1 (public) over `credentials`' TLS.
fn tonic_health_check(
    url: &str,
    credentials: &Credentials,
) -> std::sync::Arc<
    dyn Fn() -> std::pin::Pin<Box<dyn std::future::Future<Output = bool> + Send>> + Send + Sync,
> {
    let channel = connect(url, credentials).unwrap();
    std::sync::Arc::new(move || {
        let channel = channel.clone();
        Box::pin(async move {
            let mut client = tonic_health::pb::health_client::HealthClient::new(channel);
            matches!(
                client
                    .check(tonic_health::pb::HealthCheckRequest { service: String::new() })
                    .await,
                Ok(r) if r.get_ref().status == 1
            )
        })
    })
}

fn vm(name: &str) -> reg::Vm {
    ferry_testkit::vm::vm_spec(name, &[("os", 1 << 20, Path::new("/srv/images/os.img"))])
}

fn policy(name: &str) -> reg::ReplicationPolicy {
    use ferry_runtime::time::to_duration;
    reg::ReplicationPolicy {
        name: name.into(),
        crash_consistent_interval: Some(to_duration(Duration::from_secs(5))),
        keep_all_points_for: Some(to_duration(Duration::from_secs(60))),
        thinned_point_spacing: Some(to_duration(Duration::from_secs(60))),
        recovery_point_retention: Some(to_duration(Duration::from_secs(3600))),
        ..Default::default()
    }
}

/// The code of a call's outcome (Ok for success).
fn code<T>(result: Result<tonic::Response<T>, tonic::Status>) -> Code {
    match result {
        Ok(_) => Code::Ok,
        Err(status) => status.code(),
    }
}

#[tokio::test]
async fn tls_refuses_a_wrong_ca_an_expired_certificate_another_name_and_plaintext() {
    let pki = TestPki::new();
    let dir = tempfile::tempdir().unwrap();
    let shutdown = CancellationToken::new();
    let url = registry(&pki, &dir, &shutdown).await;
    let admin = with_cert(&pki, &pki.operator(OperatorRole::Admin));
    serving(&url, &admin).await;
    let mut ok = registry_client(&url, &admin);
    ok.list_regions(reg::ListRegionsRequest {}).await.unwrap();

    // A client that trusts another CA does not trust the server.
    let other = pki.other_ca();
    let wrong_ca = Credentials {
        tls: Some(ClientTls::load(&other.ca, None, None).unwrap()),
        bearer: None,
    };
    let err = registry_client(&url, &wrong_ca)
        .list_regions(reg::ListRegionsRequest {})
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    let why = format!("{err:?}");
    assert!(
        why.contains("certificate") || why.contains("UnknownIssuer"),
        "{why}"
    );

    // A client certificate from another CA, or an expired one, is refused
    // in the handshake: no call gets through.
    let foreign = Credentials {
        tls: Some(
            ClientTls::load(
                &pki.ca(),
                Some(&other.registry.cert),
                Some(&other.registry.key),
            )
            .unwrap(),
        ),
        bearer: None,
    };
    let expired = with_cert(
        &pki,
        &pki.expired(&ferry_testkit::pki::operator(OperatorRole::Admin)),
    );
    for (what, credentials) in [("foreign", foreign), ("expired", expired)] {
        let result = registry_client(&url, &credentials)
            .list_regions(reg::ListRegionsRequest {})
            .await;
        let err = result.expect_err(what);
        assert!(
            matches!(
                err.code(),
                Code::Unavailable | Code::Unknown | Code::Internal
            ),
            "{what}: {err:?}"
        );
    }

    // The server's certificate does not name the host the client expects.
    let channel = tonic::transport::Endpoint::from_shared(url.clone())
        .unwrap()
        .tls_config(
            tonic::transport::ClientTlsConfig::new()
                .ca_certificate(tonic::transport::Certificate::from_pem(pki.ca_pem()))
                .domain_name("registry.elsewhere.example"),
        )
        .unwrap()
        .connect_lazy();
    let err = RegistryClient::new(channel)
        .list_regions(reg::ListRegionsRequest {})
        .await
        .unwrap_err();
    let why = format!("{err:?}");
    assert!(
        why.contains("NotValidForName") || why.contains("certificate"),
        "{why}"
    );

    // Plaintext to a TLS port.
    let plain = url.replacen("https://", "http://", 1);
    let err = registry_client(&plain, &Credentials::none())
        .list_regions(reg::ListRegionsRequest {})
        .await
        .unwrap_err();
    assert_ne!(err.code(), Code::Ok);
    shutdown.cancel();
}

#[tokio::test]
async fn each_mutating_registry_call_needs_credentials_and_the_right_role() {
    let pki = TestPki::new();
    let dir = tempfile::tempdir().unwrap();
    let shutdown = CancellationToken::new();
    let url = registry(&pki, &dir, &shutdown).await;
    let nobody = anonymous(&pki);
    let reader = with_cert(&pki, &pki.operator(OperatorRole::Reader));
    let operator = with_cert(&pki, &pki.operator(OperatorRole::Operator));
    let admin = with_cert(&pki, &pki.operator(OperatorRole::Admin));
    serving(&url, &admin).await;

    // Operator-level: RegisterVm. Without credentials, then as a reader:
    // refused, and nothing is stored.
    let register = |c: &Credentials, name: &str| {
        let mut client = registry_client(&url, c);
        let request = reg::RegisterVmRequest { vm: Some(vm(name)) };
        async move { code(client.register_vm(request).await) }
    };
    assert_eq!(register(&nobody, "web-1").await, Code::Unauthenticated);
    assert_eq!(register(&reader, "web-1").await, Code::PermissionDenied);
    let vms = registry_client(&url, &reader)
        .list_vms(reg::ListVmsRequest {})
        .await
        .unwrap()
        .into_inner()
        .vms;
    assert!(vms.is_empty(), "a refused call stored {vms:?}");
    assert_eq!(register(&operator, "web-1").await, Code::Ok);
    assert_eq!(register(&admin, "web-2").await, Code::Ok);

    // Admin-level: policies, tokens, unregister.
    let create_policy = |c: &Credentials, name: &str| {
        let mut client = registry_client(&url, c);
        let request = reg::CreatePolicyRequest {
            policy: Some(policy(name)),
        };
        async move { code(client.create_policy(request).await) }
    };
    assert_eq!(create_policy(&nobody, "p").await, Code::Unauthenticated);
    assert_eq!(create_policy(&reader, "p").await, Code::PermissionDenied);
    assert_eq!(create_policy(&operator, "p").await, Code::PermissionDenied);
    let policies = registry_client(&url, &reader)
        .list_policies(reg::ListPoliciesRequest {})
        .await
        .unwrap()
        .into_inner()
        .policies;
    assert!(policies.iter().all(|p| p.name != "p"), "{policies:?}");
    assert_eq!(create_policy(&admin, "p").await, Code::Ok);

    let unregister = |c: &Credentials| {
        let mut client = registry_client(&url, c);
        let request = reg::UnregisterVmRequest {
            name: "web-2".into(),
        };
        async move { code(client.unregister_vm(request).await) }
    };
    assert_eq!(unregister(&operator).await, Code::PermissionDenied);
    assert_eq!(unregister(&admin).await, Code::Ok);

    let create_token = |c: &Credentials| {
        let mut client = registry_client(&url, c);
        let request = reg::CreateTokenRequest {
            name: "bob".into(),
            role: reg::Role::Reader as i32,
        };
        async move { code(client.create_token(request).await) }
    };
    assert_eq!(create_token(&nobody).await, Code::Unauthenticated);
    assert_eq!(create_token(&operator).await, Code::PermissionDenied);
    assert_eq!(create_token(&admin).await, Code::Ok);

    // Calls only services make: refused to every operator role, taken from
    // the service named in the table.
    let verify = |c: &Credentials| {
        let mut client = registry_client(&url, c);
        let request = reg::VerifyAgentRequest {
            vm_name: "web-1".into(),
            credential: "x".into(),
            epoch: 1,
        };
        async move { code(client.verify_agent(request).await) }
    };
    assert_eq!(verify(&admin).await, Code::PermissionDenied);
    let processor = with_cert(&pki, &pki.service(ServiceKind::Processor));
    assert_eq!(verify(&processor).await, Code::PermissionDenied);
    let cache = with_cert(&pki, &pki.service(ServiceKind::Cache));
    let by_cache = verify(&cache).await;
    assert!(
        !matches!(by_cache, Code::PermissionDenied | Code::Unauthenticated),
        "cache may verify agents: {by_cache:?}"
    );
    shutdown.cancel();
}

#[tokio::test]
async fn operator_tokens_work_across_services_and_stop_when_revoked() {
    let pki = TestPki::new();
    let dir = tempfile::tempdir().unwrap();
    let shutdown = CancellationToken::new();
    let (registry_url, cache_url) = registry_and_cache(&pki, &dir, &shutdown).await;
    let admin = with_cert(&pki, &pki.operator(OperatorRole::Admin));

    let token = registry_client(&registry_url, &admin)
        .create_token(reg::CreateTokenRequest {
            name: "carol".into(),
            role: reg::Role::Reader as i32,
        })
        .await
        .unwrap()
        .into_inner()
        .token;
    let carol = with_token(&pki, &token);
    // Registry checks it itself; cache asks registry.
    registry_client(&registry_url, &carol)
        .list_vms(reg::ListVmsRequest {})
        .await
        .unwrap();
    let log_info = |c: &Credentials| {
        let mut client = CacheClient::new(connect(&cache_url, c).unwrap());
        async move {
            client
                .get_log_info(cache::GetLogInfoRequest {
                    vm_name: "web-1".into(),
                })
                .await
        }
    };
    let first = log_info(&carol).await;
    assert!(
        !matches!(
            first.as_ref().map_err(|s| s.code()),
            Err(Code::Unauthenticated | Code::PermissionDenied)
        ),
        "a reader may read log info: {first:?}"
    );
    // A reader may not do an operator's or a service's part.
    let register = registry_client(&registry_url, &carol)
        .register_vm(reg::RegisterVmRequest { vm: Some(vm("x")) })
        .await;
    assert_eq!(code(register), Code::PermissionDenied);
    // The last hex digit changed (to one it is not: a token ending in 0
    // "forged" by writing 0 was itself, one run in 16).
    let last = if token.ends_with('0') { '1' } else { '0' };
    let forged = with_token(&pki, &format!("{}{last}", &token[..token.len() - 1]));
    assert_eq!(
        code(
            registry_client(&registry_url, &forged)
                .list_vms(reg::ListVmsRequest {})
                .await
        ),
        Code::Unauthenticated
    );

    registry_client(&registry_url, &admin)
        .revoke_token(reg::RevokeTokenRequest {
            name: "carol".into(),
        })
        .await
        .unwrap();
    // Registry refuses at once; cache once its memory of the answer lapses.
    assert_eq!(
        code(
            registry_client(&registry_url, &carol)
                .list_vms(reg::ListVmsRequest {})
                .await
        ),
        Code::Unauthenticated
    );
    wait_for(
        "cache to refuse the revoked token",
        ferry_runtime::security::remote_tokens::REMEMBER + Duration::from_secs(10),
        || {
            let call = log_info(&carol);
            async move {
                matches!(call.await, Err(s) if s.code() == Code::Unauthenticated).then_some(())
            }
        },
    )
    .await;
    shutdown.cancel();
}

#[tokio::test]
async fn an_agent_acts_only_for_its_own_vm() {
    let pki = TestPki::new();
    let dir = tempfile::tempdir().unwrap();
    let shutdown = CancellationToken::new();
    let (registry_url, cache_url) = registry_and_cache(&pki, &dir, &shutdown).await;
    let web1 = with_cert(&pki, &pki.agent("web-1"));
    let web2 = with_cert(&pki, &pki.agent("web-2"));

    let health = |c: &Credentials, vm: &str| {
        let mut client = registry_client(&registry_url, c);
        let request = reg::ReportHealthRequest {
            vm_name: vm.into(),
            component: "agent".into(),
            health: reg::ReplicationHealth::Normal as i32,
            message: String::new(),
            ..Default::default()
        };
        async move { client.report_health(request).await }
    };
    let err = health(&web2, "web-1").await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert!(
        err.message().contains("web-2") && err.message().contains("web-1"),
        "{err:?}"
    );
    // Its own VM passes the check (and meets registry's own rules).
    let own = health(&web1, "web-1").await;
    assert!(
        !matches!(
            own.as_ref().map_err(|s| s.code()),
            Err(Code::PermissionDenied | Code::Unauthenticated)
        ),
        "{own:?}"
    );
    // Agents may not do an operator's part.
    let enable = registry_client(&registry_url, &web1)
        .register_vm(reg::RegisterVmRequest {
            vm: Some(vm("web-1")),
        })
        .await;
    assert_eq!(code(enable), Code::PermissionDenied);

    // Ingest for another VM is refused before anything is opened.
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(cache::IngestRequest {
        msg: Some(cache::ingest_request::Msg::Open(cache::IngestOpen {
            vm_name: "web-1".into(),
            credential: "whatever".into(),
            epoch: 1,
        })),
    })
    .await
    .unwrap();
    let mut client = CacheClient::new(connect(&cache_url, &web2).unwrap());
    let outcome = match client
        .ingest(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
    {
        Err(status) => status,
        Ok(response) => {
            let mut stream = response.into_inner();
            loop {
                match stream.message().await {
                    Err(status) => break status,
                    Ok(Some(_)) => continue,
                    Ok(None) => panic!("the stream ended without refusing"),
                }
            }
        }
    };
    assert_eq!(outcome.code(), Code::PermissionDenied, "{outcome:?}");
    assert!(!dir.path().join("cache").join("vms").join("web-1").exists());
    drop(tx);
    shutdown.cancel();
}

/// `ferry` with `args` after the global TLS flags; (success, stdout+stderr).
fn ferry(
    pki: &TestPki,
    url: &str,
    cert: Option<&CertFiles>,
    env_token: Option<&str>,
    args: &[&str],
) -> (bool, String) {
    let mut command = Command::new(bin_path("ferry"));
    command
        .arg("--registry")
        .arg(url)
        .arg("--tls-ca")
        .arg(pki.ca())
        .env_remove("FERRY_TOKEN");
    if let Some(files) = cert {
        command
            .arg("--tls-cert")
            .arg(&files.cert)
            .arg("--tls-key")
            .arg(&files.key);
    }
    if let Some(token) = env_token {
        command.env("FERRY_TOKEN", token);
    }
    let out = command.args(args).output().unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[tokio::test]
async fn the_cli_and_grpcurl_reach_a_registry_binary_over_mutual_tls() {
    let pki = TestPki::new();
    let dir = tempfile::tempdir().unwrap();
    let files = pki.service(ServiceKind::Registry);
    let bootstrap = dir.path().join("bootstrap-token");
    let cert = files.cert.to_str().unwrap().to_string();
    let key = files.key.to_str().unwrap().to_string();
    let ca = pki.ca().to_str().unwrap().to_string();
    let boot = bootstrap.to_str().unwrap().to_string();
    let registry = ServiceProcess::start_tls(
        bin_path("registry-svc"),
        dir.path().join("registry"),
        &[
            "--tls-cert",
            &cert,
            "--tls-key",
            &key,
            "--tls-ca",
            &ca,
            "--bootstrap-token-file",
            &boot,
        ],
    );
    let url = format!("https://{}", registry.addr);
    let admin = pki.operator(OperatorRole::Admin);
    serving(&url, &with_cert(&pki, &admin)).await;

    // With the admin certificate: allowed.
    let (ok, out) = ferry(&pki, &url, Some(&admin), None, &["regions"]);
    assert!(ok, "{out}");
    // No credentials: the message says what is needed.
    let (ok, out) = ferry(&pki, &url, None, None, &["vms"]);
    assert!(
        !ok && out.contains("Unauthenticated") && out.contains("credentials"),
        "{out}"
    );
    // A reader certificate may list but not register.
    let reader = pki.operator(OperatorRole::Reader);
    let (ok, out) = ferry(&pki, &url, Some(&reader), None, &["vms"]);
    assert!(ok, "{out}");

    // The bootstrap admin token (written by registry, 0600) makes tokens.
    let token = wait_for("the bootstrap token file", Duration::from_secs(10), || {
        let path = bootstrap.clone();
        async move {
            std::fs::read_to_string(path)
                .ok()
                .map(|t| t.trim().to_string())
        }
    })
    .await;
    let (ok, out) = ferry(
        &pki,
        &url,
        None,
        Some(&token),
        &["token", "create", "dave", "--role", "operator"],
    );
    assert!(ok, "{out}");
    let dave = out
        .lines()
        .find(|l| l.starts_with("fy1."))
        .expect("the new token")
        .trim()
        .to_string();
    let (ok, out) = ferry(&pki, &url, None, Some(&dave), &["token", "list"]);
    assert!(
        !ok && out.contains("PermissionDenied"),
        "an operator may not list tokens: {out}"
    );

    // grpcurl over mutual TLS, as another language's client would.
    let out = ferry_testkit::grpcurl()
        .args(["-cacert", &ca, "-cert"])
        .arg(&admin.cert)
        .arg("-key")
        .arg(&admin.key)
        .arg(registry.addr.to_string())
        .arg("ferry.registry.v1.Registry/ListRegions")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = ferry_testkit::grpcurl()
        .args(["-cacert", &ca])
        .arg(registry.addr.to_string())
        .arg("ferry.registry.v1.Registry/ListVms")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Unauthenticated"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = ferry_testkit::grpcurl()
        .args(["-plaintext"])
        .arg(registry.addr.to_string())
        .arg("list")
        .output()
        .unwrap();
    assert!(!out.status.success(), "plaintext to a TLS port must fail");
}

#[tokio::test]
async fn a_group_coordinator_reports_group_health_only_on_its_own_group() {
    let pki = TestPki::new();
    let dir = tempfile::tempdir().unwrap();
    let shutdown = CancellationToken::new();
    let url = registry(&pki, &dir, &shutdown).await;
    let admin = with_cert(&pki, &pki.operator(OperatorRole::Admin));
    serving(&url, &admin).await;
    let mut c = registry_client(&url, &admin);
    c.create_policy(reg::CreatePolicyRequest {
        policy: Some(reg::ReplicationPolicy {
            multi_vm_consistency: true,
            ..policy("multi")
        }),
    })
    .await
    .unwrap();
    c.create_replication_group(reg::CreateReplicationGroupRequest {
        name: "erp".into(),
        policy_name: "multi".into(),
    })
    .await
    .unwrap();
    for (i, (name, group)) in [("web-1", "erp"), ("web-2", "erp"), ("web-3", "")]
        .into_iter()
        .enumerate()
    {
        let mut spec = vm(name);
        spec.nics[0].private_ip = format!("10.1.0.{}", 20 + i);
        c.register_vm(reg::RegisterVmRequest { vm: Some(spec) })
            .await
            .unwrap();
        c.enable_replication(reg::EnableReplicationRequest {
            vm_name: name.into(),
            target_region: "westus".into(),
            replication_group: group.into(),
            ..Default::default()
        })
        .await
        .unwrap();
    }
    let coordinator = with_cert(&pki, &pki.agent("web-1"));
    let report = |vm: &str, component: &str| {
        let mut client = registry_client(&url, &coordinator);
        let request = reg::ReportHealthRequest {
            vm_name: vm.into(),
            component: component.into(),
            health: reg::ReplicationHealth::Warning as i32,
            message: "no multi-VM points".into(),
            ..Default::default()
        };
        async move { code(client.report_health(request).await) }
    };
    assert_eq!(
        report("web-2", "group").await,
        Code::Ok,
        "a member of its group"
    );
    assert_eq!(
        report("web-2", "agent").await,
        Code::PermissionDenied,
        "only the group's health"
    );
    assert_eq!(
        report("web-3", "group").await,
        Code::PermissionDenied,
        "not in its group"
    );
    shutdown.cancel();
}

#[tokio::test]
async fn a_health_port_answers_plaintext_probes_and_nothing_else() {
    let pki = TestPki::new();
    let dir = tempfile::tempdir().unwrap();
    let shutdown = CancellationToken::new();
    let (listener, url) = listener().await;
    let health_addr = ferry_testkit::free_addr();
    let mut config = secured(&pki, &dir.path().join("registry"), ServiceKind::Registry);
    config.health_listen = Some(health_addr);
    let config = registry_svc::Config::new(config, registry_svc::Settings::default()).unwrap();
    tokio::spawn(registry_svc::serve(config, listener, shutdown.clone()));
    serving(&url, &anonymous(&pki)).await;
    // The probe a Kubernetes gRPC probe makes: plaintext, no credentials.
    let plain = format!("http://{health_addr}");
    assert!(ferry_testkit::is_serving(&plain, "").await);
    assert!(ferry_testkit::is_serving(&plain, "ferry.registry.v1.Registry").await);
    // Nothing else is served there.
    let err = registry_client(&plain, &Credentials::none())
        .list_vms(reg::ListVmsRequest {})
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unimplemented, "{err:?}");
    // It follows the main port: NOT_SERVING once shutdown begins.
    shutdown.cancel();
    wait_for(
        "the health port to stop reporting SERVING",
        Duration::from_secs(15),
        || {
            let plain = plain.clone();
            async move { (!ferry_testkit::is_serving(&plain, "").await).then_some(()) }
        },
    )
    .await;
}

/// The code and message of a call's outcome (Ok once the server answers
/// with headers, whatever a stream then holds).
fn outcome<T>(result: Result<tonic::Response<T>, tonic::Status>) -> (Code, String) {
    match result {
        Ok(_) => (Code::Ok, String::new()),
        Err(status) => (status.code(), status.message().to_string()),
    }
}

/// Calls `method` (`package.Service/Method`) at `url` with an empty request,
/// unary or streaming as the proto says.
async fn call_empty(
    url: &str,
    credentials: &Credentials,
    method: &str,
    client_streaming: bool,
    server_streaming: bool,
) -> (Code, String) {
    let channel = connect(url, credentials).unwrap();
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    let path: http::uri::PathAndQuery = format!("/{method}").parse().unwrap();
    let codec = tonic_prost::ProstCodec::<(), ()>::default();
    let empty = || tonic::Request::new(tokio_stream::empty::<()>());
    let call = async {
        match (client_streaming, server_streaming) {
            (false, false) => outcome(grpc.unary(tonic::Request::new(()), path, codec).await),
            (false, true) => outcome(
                grpc.server_streaming(tonic::Request::new(()), path, codec)
                    .await,
            ),
            (true, false) => outcome(grpc.client_streaming(empty(), path, codec).await),
            (true, true) => outcome(grpc.streaming(empty(), path, codec).await),
        }
    };
    tokio::time::timeout(Duration::from_secs(20), call)
        .await
        .unwrap_or_else(|_| panic!("{method} did not answer within 20 s"))
}

/// Whether the authorization layer (not the handler) refused the call: its
/// messages say so.
fn refused_by_layer((code, message): &(Code, String)) -> bool {
    (*code == Code::Unauthenticated && message.contains("needs credentials"))
        || (*code == Code::PermissionDenied && message.contains("may not call"))
}

/// Every RPC of the four services, straight from the table and the protos:
/// no credentials → UNAUTHENTICATED; a principal the table does not admit
/// (the role just below, an admin for a service-only method) →
/// PERMISSION_DENIED; one it admits → past the layer (whatever the handler
/// then says of an empty request).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_rpc_refuses_the_callers_the_table_does_not_admit() {
    use ferry_runtime::security::policy::TABLE;
    use ferry_runtime::security::Principal;
    use prost::Message;

    let pki = TestPki::new();
    let dir = tempfile::tempdir().unwrap();
    let shutdown = CancellationToken::new();
    let registry_url = registry(&pki, &dir, &shutdown).await;
    let cache_url = cache_svc(&pki, &dir, &registry_url, &shutdown).await;
    let (processor_listener, processor_url) = listener().await;
    let mut config = secured(&pki, &dir.path().join("processor"), ServiceKind::Processor);
    config.registry = Some(registry_url.clone());
    config.cache = Some(cache_url.clone());
    tokio::spawn(processor_svc::run(
        config,
        Default::default(),
        processor_listener,
        shutdown.clone(),
    ));
    let (failover_listener, failover_url) = listener().await;
    let mut config = secured(&pki, &dir.path().join("failover"), ServiceKind::Failover);
    config.registry = Some(registry_url.clone());
    config.processor = Some(processor_url.clone());
    tokio::spawn(failover_svc::run(
        config,
        Default::default(),
        failover_listener,
        shutdown.clone(),
    ));
    let anyone = anonymous(&pki);
    for url in [&registry_url, &cache_url, &processor_url, &failover_url] {
        serving(url, &anyone).await;
    }

    let set = prost_types::FileDescriptorSet::decode(ferry_proto::FILE_DESCRIPTOR_SET).unwrap();
    let mut checked = 0;
    for file in &set.file {
        for service in &file.service {
            let url = match file.package() {
                "ferry.registry.v1" | "ferry.audit.v1" => &registry_url,
                "ferry.cache.v1" => &cache_url,
                "ferry.processor.v1" => &processor_url,
                "ferry.failover.v1" => &failover_url,
                // The agent's group port: tests in agent/tests/group_port.rs.
                _ => continue,
            };
            for method in &service.method {
                let name = format!("{}.{}/{}", file.package(), service.name(), method.name());
                let (_, allow) = TABLE
                    .iter()
                    .find(|(n, _)| *n == name)
                    .expect("in the table");
                let call = |c: Credentials| {
                    let name = name.clone();
                    let url = url.clone();
                    let (cs, ss) = (method.client_streaming(), method.server_streaming());
                    async move { call_empty(&url, &c, &name, cs, ss).await }
                };
                let got = call(anonymous(&pki)).await;
                assert_eq!(got.0, Code::Unauthenticated, "{name} anonymous: {got:?}");
                assert!(refused_by_layer(&got), "{name}: {got:?}");

                let operator = |role| with_cert(&pki, &pki.operator(role));
                let below = match allow.role {
                    Some(OperatorRole::Admin) => Some(OperatorRole::Operator),
                    Some(OperatorRole::Operator) => Some(OperatorRole::Reader),
                    Some(OperatorRole::Reader) => None,
                    None => Some(OperatorRole::Admin),
                };
                if let Some(role) = below {
                    let got = call(operator(role)).await;
                    assert_eq!(got.0, Code::PermissionDenied, "{name} as {role}: {got:?}");
                }
                if let Some(service) = ServiceKind::ALL
                    .iter()
                    .find(|s| !allow.admits(&Principal::Service { service: **s }))
                {
                    let got = call(with_cert(&pki, &pki.service(*service))).await;
                    assert_eq!(
                        got.0,
                        Code::PermissionDenied,
                        "{name} as {service}: {got:?}"
                    );
                }
                let admitted = match (allow.role, allow.services.first()) {
                    (Some(role), _) => Some(operator(role)),
                    (None, Some(service)) => Some(with_cert(&pki, &pki.service(*service))),
                    // Agent-only methods check the VM in the body: covered above.
                    (None, None) => None,
                };
                if let Some(credentials) = admitted {
                    let got = call(credentials).await;
                    assert!(
                        !refused_by_layer(&got),
                        "{name} by a caller the table admits: {got:?}"
                    );
                }
                checked += 1;
            }
        }
    }
    let group_port = TABLE
        .iter()
        .filter(|(n, _)| n.starts_with("ferry.agent."))
        .count();
    assert_eq!(
        checked,
        TABLE.len() - group_port,
        "every RPC but the group port's"
    );
    shutdown.cancel();
}

/// RegisterAgent, where callers are checked, needs more than the VM's agent
/// certificate: a one-time enrollment token an operator issued, or the
/// credential of the VM's current registration (the same agent restarting).
/// Every refusal leaves the epoch, and so the running agent's stream, as it
/// was; a new enrollment retires the old credential everywhere (VerifyAgent,
/// which cache-svc asks before taking a stream).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_registers_only_with_an_enrollment_token_or_its_own_credential() {
    let pki = TestPki::new();
    let dir = tempfile::tempdir().unwrap();
    let shutdown = CancellationToken::new();
    // Registry hands agents a cache URL; no cache needs to run here.
    let (listener, url) = listener().await;
    let mut config = secured(&pki, &dir.path().join("registry"), ServiceKind::Registry);
    config.cache = Some("https://127.0.0.1:9".into());
    let config = registry_svc::Config::new(config, registry_svc::Settings::default()).unwrap();
    tokio::spawn(registry_svc::serve(config, listener, shutdown.clone()));
    let reader = with_cert(&pki, &pki.operator(OperatorRole::Reader));
    let operator = with_cert(&pki, &pki.operator(OperatorRole::Operator));
    let cache = with_cert(&pki, &pki.service(ServiceKind::Cache));
    let web1 = with_cert(&pki, &pki.agent("web-1"));
    let web2 = with_cert(&pki, &pki.agent("web-2"));
    serving(&url, &operator).await;
    let mut op = registry_client(&url, &operator);
    for name in ["web-1", "web-2"] {
        op.register_vm(reg::RegisterVmRequest { vm: Some(vm(name)) })
            .await
            .unwrap();
        op.enable_replication(reg::EnableReplicationRequest {
            vm_name: name.into(),
            target_region: "westus".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    }
    let enroll = |c: &Credentials, vm: &str| {
        let mut client = registry_client(&url, c);
        let request = reg::CreateEnrollmentTokenRequest {
            vm_name: vm.into(),
            ttl_seconds: 0,
        };
        async move { client.create_enrollment_token(request).await }
    };
    let register = |vm: &str, token: &str, credential: &str| {
        let mut client = registry_client(&url, &web1);
        let request = reg::RegisterAgentRequest {
            vm_name: vm.into(),
            enrollment_token: token.into(),
            credential: credential.into(),
            ..Default::default()
        };
        async move { client.register_agent(request).await }
    };
    let epoch = || {
        let mut client = registry_client(&url, &reader);
        async move {
            client
                .get_protected_item(reg::GetProtectedItemRequest {
                    vm_name: "web-1".into(),
                })
                .await
                .unwrap()
                .into_inner()
                .epoch
        }
    };
    let verify = |credential: &str, epoch: u64| {
        let mut client = registry_client(&url, &cache);
        let request = reg::VerifyAgentRequest {
            vm_name: "web-1".into(),
            credential: credential.into(),
            epoch,
        };
        async move { code(client.verify_agent(request).await) }
    };

    // Who may issue one: operators, not readers, not the agent itself.
    for who in [&reader, &web1] {
        let err = enroll(who, "web-1").await.unwrap_err();
        assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    }
    assert_eq!(
        enroll(&operator, "nosuch").await.unwrap_err().code(),
        Code::NotFound
    );
    // web-1's certificate alone: refused, nothing changes.
    let err = register("web-1", "", "").await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert!(
        err.message().contains("ferry agent enroll web-1"),
        "{err:?}"
    );
    assert_eq!(epoch().await, 0);
    // A token made for web-2: refused for web-1.
    let other = enroll(&operator, "web-2").await.unwrap().into_inner();
    assert_eq!(other.vm_name, "web-2");
    let err = register("web-1", &other.token, "").await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert_eq!(epoch().await, 0);
    // A token replaced by a newer one: refused; the newer one enrolls.
    let replaced = enroll(&operator, "web-1").await.unwrap().into_inner();
    let token = enroll(&operator, "web-1").await.unwrap().into_inner();
    assert!(token.token.starts_with("fye1.") && token.expires_at.is_some());
    let err = register("web-1", &replaced.token, "").await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    let first = register("web-1", &token.token, "")
        .await
        .unwrap()
        .into_inner();
    assert_eq!(first.epoch, 1);
    assert_eq!(verify(&first.credential, 1).await, Code::Ok);

    // The token is spent: a second agent with it (web-1's certificate, no
    // credential) is refused and the first keeps its epoch and stream.
    let err = register("web-1", &token.token, "").await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert!(err.message().contains("used already"), "{err:?}");
    assert_eq!(epoch().await, 1);
    assert_eq!(verify(&first.credential, 1).await, Code::Ok);

    // The agent restarting shows its credential: admitted, same credential,
    // a higher epoch (its old stream is fenced by the epoch).
    let renewed = register("web-1", "", &first.credential)
        .await
        .unwrap()
        .into_inner();
    assert_eq!(renewed.credential, first.credential);
    assert_eq!(renewed.epoch, 2);
    assert_eq!(verify(&first.credential, 1).await, Code::FailedPrecondition);
    assert_eq!(verify(&renewed.credential, 2).await, Code::Ok);

    // An operator re-enrolls the VM (a new host): a new credential; the
    // old one is refused by VerifyAgent and can no longer re-register.
    let token = enroll(&operator, "web-1").await.unwrap().into_inner();
    let moved = register("web-1", &token.token, "")
        .await
        .unwrap()
        .into_inner();
    assert_ne!(moved.credential, first.credential);
    assert_eq!(verify(&first.credential, 3).await, Code::PermissionDenied);
    let err = register("web-1", "", &first.credential).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert!(err.message().contains("another agent enrolled"), "{err:?}");
    assert_eq!(epoch().await, 3);
    // And web-2's agent cannot use a web-1 token for web-1.
    let token = enroll(&operator, "web-1").await.unwrap().into_inner();
    let err = registry_client(&url, &web2)
        .register_agent(reg::RegisterAgentRequest {
            vm_name: "web-1".into(),
            enrollment_token: token.token,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert_eq!(epoch().await, 3);
    shutdown.cancel();
}
