//! Operator bearer tokens over real gRPC on loopback: create, list, revoke,
//! authenticate; every bad input; secrets never on disk nor listed; the
//! bootstrap token file (generated, installed, never revived after a revoke).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // tests may

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use ferry_proto::registry::v1 as pb;
use ferry_proto::registry::v1::registry_client::RegistryClient;
use ferry_runtime::peers::Credentials;
use ferry_runtime::security::OperatorRole;
use ferry_runtime::security::ServiceKind;
use ferry_runtime::PeerChannel;
use ferry_testkit::{channel, start_registry, start_registry_with, Insecure, Running};
use tonic::Code;

type Client = RegistryClient<PeerChannel>;

async fn client(r: &Running) -> Client {
    ferry_testkit::wait_serving(&r.url).await;
    RegistryClient::new(channel(&r.url, &Credentials::none()))
}

async fn with_bootstrap(data_dir: PathBuf, file: &Path) -> Running {
    start_registry_with(
        data_dir,
        None,
        registry_svc::Settings {
            bootstrap_token_file: Some(file.to_path_buf()),
            ..Default::default()
        },
    )
    .await
}

async fn create(
    c: &mut Client,
    name: &str,
    role: pb::Role,
) -> Result<pb::CreateTokenResponse, tonic::Status> {
    c.create_token(pb::CreateTokenRequest {
        name: name.into(),
        role: role as i32,
    })
    .await
    .map(|r| r.into_inner())
}

async fn authenticate(c: &mut Client, token: &str) -> Result<(String, pb::Role), tonic::Status> {
    c.authenticate_token(pb::AuthenticateTokenRequest {
        token: token.into(),
    })
    .await
    .map(|r| {
        let r = r.into_inner();
        (r.name.clone(), r.role())
    })
}

async fn list(c: &mut Client) -> Vec<pb::TokenInfo> {
    c.list_tokens(pb::ListTokensRequest {})
        .await
        .unwrap()
        .into_inner()
        .tokens
}

/// Asserts an UNAUTHENTICATED refusal whose message does not repeat `token`
/// (nor its secret part).
fn assert_unauthenticated(result: Result<(String, pb::Role), tonic::Status>, token: &str) {
    let status = result.expect_err("the token must be refused");
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    let secret = token.rsplit('.').next().unwrap_or_default();
    assert!(!status.message().is_empty());
    if !token.is_empty() {
        assert!(!status.message().contains(token), "{status:?}");
    }
    if secret.len() > 8 {
        assert!(!status.message().contains(secret), "{status:?}");
    }
}

/// Every byte of every file under `dir`.
fn all_bytes(dir: &Path) -> Vec<u8> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(all_bytes(&path));
        } else {
            out.extend(std::fs::read(&path).unwrap());
        }
    }
    out
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

fn secret_of(token: &str) -> &str {
    token.rsplit_once('.').unwrap().1
}

#[tokio::test]
async fn tokens_are_created_listed_authenticated_and_revoked() {
    let dir = tempfile::tempdir().unwrap();
    let registry = start_registry(dir.path().join("registry"), None).await;
    let mut c = client(&registry).await;

    let alice = create(&mut c, "alice", pb::Role::Reader).await.unwrap();
    let ops = create(&mut c, "ops.team_1", pb::Role::Operator)
        .await
        .unwrap();
    let root = create(&mut c, "root", pb::Role::Admin).await.unwrap();
    assert!(alice.token.starts_with("fy1.alice."), "{}", alice.token);
    assert_eq!(secret_of(&alice.token).len(), 64);
    let info = alice.info.clone().unwrap();
    assert_eq!(
        (info.name.as_str(), info.role()),
        ("alice", pb::Role::Reader)
    );
    assert!(info.created_at.is_some());

    assert_eq!(
        authenticate(&mut c, &alice.token).await.unwrap(),
        ("alice".into(), pb::Role::Reader)
    );
    assert_eq!(
        authenticate(&mut c, &ops.token).await.unwrap(),
        ("ops.team_1".into(), pb::Role::Operator)
    );
    assert_eq!(
        authenticate(&mut c, &root.token).await.unwrap(),
        ("root".into(), pb::Role::Admin)
    );

    let listed = list(&mut c).await;
    let names: Vec<(&str, pb::Role)> = listed.iter().map(|t| (t.name.as_str(), t.role())).collect();
    assert_eq!(
        names,
        [
            ("alice", pb::Role::Reader),
            ("ops.team_1", pb::Role::Operator),
            ("root", pb::Role::Admin)
        ]
    );
    let shown = format!("{listed:?}");
    for t in [&alice, &ops, &root] {
        assert!(!shown.contains(secret_of(&t.token)), "list shows a secret");
    }

    c.revoke_token(pb::RevokeTokenRequest {
        name: "alice".into(),
    })
    .await
    .unwrap();
    assert_unauthenticated(authenticate(&mut c, &alice.token).await, &alice.token);
    assert_eq!(list(&mut c).await.len(), 2);
    // Revoking is for good: a new token of that name has a new secret and
    // the old one stays refused.
    let again = create(&mut c, "alice", pb::Role::Admin).await.unwrap();
    assert_ne!(again.token, alice.token);
    assert_unauthenticated(authenticate(&mut c, &alice.token).await, &alice.token);
    assert_eq!(
        authenticate(&mut c, &again.token).await.unwrap(),
        ("alice".into(), pb::Role::Admin)
    );

    // Tokens outlive a restart.
    registry.stop().await;
    let registry = start_registry(dir.path().join("registry"), None).await;
    let mut c = client(&registry).await;
    assert_eq!(
        authenticate(&mut c, &root.token).await.unwrap(),
        ("root".into(), pb::Role::Admin)
    );
    assert_unauthenticated(authenticate(&mut c, &alice.token).await, &alice.token);
    registry.stop().await;
}

#[tokio::test]
async fn bad_requests_are_refused_precisely() {
    let dir = tempfile::tempdir().unwrap();
    let registry = start_registry(dir.path().join("registry"), None).await;
    let mut c = client(&registry).await;
    let bob = create(&mut c, "bob", pb::Role::Operator).await.unwrap();

    let dup = create(&mut c, "bob", pb::Role::Admin).await.unwrap_err();
    assert_eq!(dup.code(), Code::AlreadyExists, "{dup:?}");
    // The duplicate changed nothing.
    assert_eq!(
        authenticate(&mut c, &bob.token).await.unwrap(),
        ("bob".into(), pb::Role::Operator)
    );

    let unspecified = create(&mut c, "carol", pb::Role::Unspecified)
        .await
        .unwrap_err();
    assert_eq!(unspecified.code(), Code::InvalidArgument, "{unspecified:?}");
    assert!(unspecified.message().contains("role"), "{unspecified:?}");
    let unknown_role = c
        .create_token(pb::CreateTokenRequest {
            name: "carol".into(),
            role: 42,
        })
        .await
        .unwrap_err();
    assert_eq!(unknown_role.code(), Code::InvalidArgument);
    for bad in ["", "-x", "a b", "a/b", &"x".repeat(65)] {
        let err = create(&mut c, bad, pb::Role::Reader).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{bad:?}: {err:?}");
    }
    assert_eq!(
        list(&mut c).await.len(),
        1,
        "refused requests created nothing"
    );

    let missing = c
        .revoke_token(pb::RevokeTokenRequest {
            name: "nobody".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::NotFound, "{missing:?}");
    assert!(missing.message().contains("nobody"), "{missing:?}");
    let bad_name = c
        .revoke_token(pb::RevokeTokenRequest { name: "".into() })
        .await
        .unwrap_err();
    assert_eq!(bad_name.code(), Code::InvalidArgument);

    // Malformed, unknown, tampered or borrowed tokens: UNAUTHENTICATED, never
    // NOT_FOUND, never echoed.
    let secret = secret_of(&bob.token).to_string();
    let mut tampered = bob.token.clone();
    let last = tampered.pop().unwrap();
    tampered.push(if last == '0' { '1' } else { '0' });
    for token in [
        String::new(),
        "garbage".to_string(),
        format!("Bearer {}", bob.token),
        format!("{} ", bob.token),
        bob.token.to_uppercase(),
        format!("fy1.bob.{}", &secret[..63]),
        format!("fy2.bob.{secret}"),
        format!("fy1.nobody.{secret}"),
        format!("fy1.bob_{secret}"),
        tampered,
    ] {
        assert_unauthenticated(authenticate(&mut c, &token).await, &token);
    }
    registry.stop().await;
}

#[tokio::test]
async fn secrets_never_reach_the_disk() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("registry");
    let registry = start_registry(data.clone(), None).await;
    let mut c = client(&registry).await;
    let mut secrets = Vec::new();
    for (name, role) in [("d1", pb::Role::Reader), ("d2", pb::Role::Admin)] {
        secrets.push(create(&mut c, name, role).await.unwrap().token);
    }
    registry.stop().await;

    let bytes = all_bytes(&data);
    // The records are there (the scan reads the real data)...
    assert!(
        contains(&bytes, b"token/d1"),
        "the token records are not on disk"
    );
    for token in &secrets {
        let secret = secret_of(token);
        let hash = ferry_hash(secret);
        assert!(contains(&bytes, hash.as_bytes()), "the hash is not on disk");
        // ...but never a secret.
        assert!(!contains(&bytes, secret.as_bytes()), "a secret is on disk");
        assert!(
            !contains(&bytes, &hex_decode(secret)),
            "a raw secret is on disk"
        );
    }
}

fn ferry_hash(secret: &str) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(secret.as_bytes()))
}

fn hex_decode(s: &str) -> Vec<u8> {
    hex::decode(s).unwrap()
}

#[tokio::test]
async fn the_in_process_handle_authenticates() {
    let dir = tempfile::tempdir().unwrap();
    let registry = registry_svc::Registry::open(dir.path(), Default::default(), None)
        .await
        .unwrap();
    let tokens = registry.tokens();
    let (token, record) = tokens.create("eve", OperatorRole::Operator).await.unwrap();
    assert_eq!(record.role, OperatorRole::Operator);
    assert_eq!(
        tokens.authenticate(&token).unwrap(),
        ("eve".to_string(), OperatorRole::Operator)
    );
    // A clone sees what the other does.
    registry.tokens().revoke("eve").await.unwrap();
    match tokens.authenticate(&token) {
        Err(registry_svc::TokenError::Unauthenticated(message)) => {
            assert!(!message.contains(secret_of(&token)), "{message}")
        }
        other => panic!("expected Unauthenticated, got {other:?}"),
    }
    // generate_token is the same format and unique.
    let a = registry_svc::generate_token("bootstrap").unwrap();
    assert!(a.starts_with("fy1.bootstrap.") && a.len() == "fy1.bootstrap.".len() + 64);
    assert_ne!(a, registry_svc::generate_token("bootstrap").unwrap());
    assert!(registry_svc::generate_token("no good").is_err());
}

#[tokio::test]
async fn a_missing_bootstrap_file_is_generated_0600_and_installed() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("secrets/bootstrap-token");
    let registry = with_bootstrap(dir.path().join("registry"), &file).await;
    let mut c = client(&registry).await;

    let mode = std::fs::metadata(&file).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "mode {mode:o}");
    let text = std::fs::read_to_string(&file).unwrap();
    assert!(text.ends_with('\n'));
    let token = text.trim();
    assert!(token.starts_with("fy1.bootstrap."), "{token}");
    assert_eq!(
        authenticate(&mut c, token).await.unwrap(),
        ("bootstrap".into(), pb::Role::Admin)
    );
    let listed = list(&mut c).await;
    assert_eq!(listed.len(), 1);
    assert_eq!(
        (listed[0].name.as_str(), listed[0].role()),
        ("bootstrap", pb::Role::Admin)
    );

    // A restart keeps the same token and the file as it is.
    registry.stop().await;
    let registry = with_bootstrap(dir.path().join("registry"), &file).await;
    let mut c = client(&registry).await;
    assert_eq!(std::fs::read_to_string(&file).unwrap(), text);
    assert_eq!(
        authenticate(&mut c, token).await.unwrap(),
        ("bootstrap".into(), pb::Role::Admin)
    );
    registry.stop().await;
}

#[tokio::test]
async fn a_present_bootstrap_file_is_installed() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bootstrap-token");
    let token = registry_svc::generate_token("bootstrap").unwrap();
    std::fs::write(&file, format!("  {token}\n\n")).unwrap();
    let registry = with_bootstrap(dir.path().join("registry"), &file).await;
    let mut c = client(&registry).await;
    assert_eq!(
        authenticate(&mut c, &token).await.unwrap(),
        ("bootstrap".into(), pb::Role::Admin)
    );
    assert_eq!(
        std::fs::read_to_string(&file).unwrap(),
        format!("  {token}\n\n"),
        "registry does not rewrite a present file"
    );
    registry.stop().await;
}

#[tokio::test]
async fn a_revoked_bootstrap_token_is_not_revived_by_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("registry");
    let file = dir.path().join("bootstrap-token");
    let registry = with_bootstrap(data.clone(), &file).await;
    let mut c = client(&registry).await;
    let token = std::fs::read_to_string(&file).unwrap().trim().to_string();
    authenticate(&mut c, &token).await.unwrap();
    c.revoke_token(pb::RevokeTokenRequest {
        name: "bootstrap".into(),
    })
    .await
    .unwrap();
    assert_unauthenticated(authenticate(&mut c, &token).await, &token);
    registry.stop().await;

    // The file is still there: it is not installed again.
    let registry = with_bootstrap(data.clone(), &file).await;
    let mut c = client(&registry).await;
    assert_unauthenticated(authenticate(&mut c, &token).await, &token);
    assert!(list(&mut c).await.is_empty());
    registry.stop().await;

    // Nor is a new one generated when the file is gone.
    std::fs::remove_file(&file).unwrap();
    let registry = with_bootstrap(data, &file).await;
    let mut c = client(&registry).await;
    assert!(!file.exists(), "a new bootstrap file was written");
    assert!(list(&mut c).await.is_empty());
    registry.stop().await;
}

#[tokio::test]
async fn an_operator_made_bootstrap_token_blocks_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("registry");
    let registry = start_registry(data.clone(), None).await;
    let mut c = client(&registry).await;
    let made = create(&mut c, "bootstrap", pb::Role::Reader).await.unwrap();
    registry.stop().await;

    let file = dir.path().join("bootstrap-token");
    let from_file = registry_svc::generate_token("bootstrap").unwrap();
    std::fs::write(&file, &from_file).unwrap();
    let registry = with_bootstrap(data, &file).await;
    let mut c = client(&registry).await;
    assert_unauthenticated(authenticate(&mut c, &from_file).await, &from_file);
    assert_eq!(
        authenticate(&mut c, &made.token).await.unwrap(),
        ("bootstrap".into(), pb::Role::Reader)
    );
    registry.stop().await;
}

#[tokio::test]
async fn a_malformed_bootstrap_file_stops_the_start_without_showing_it() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bootstrap-token");
    let secret = "ab".repeat(32);
    for content in [
        format!("fy1.alice.{secret}"),
        format!("fy1.bootstrap.{}", &secret[..40]),
        format!("bootstrap {secret}"),
        String::new(),
    ] {
        std::fs::write(&file, &content).unwrap();
        let config = registry_svc::Config::new(
            ferry_runtime::ServiceConfig::in_process(dir.path().join("registry")),
            registry_svc::Settings {
                bootstrap_token_file: Some(file.clone()),
                ..Default::default()
            },
        )
        .unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let err = registry_svc::serve(config, listener, Default::default())
            .await
            .expect_err("a malformed bootstrap file must stop the start")
            .to_string();
        assert!(
            err.contains("bootstrap-token") && err.contains("fy1.bootstrap."),
            "{err}"
        );
        assert!(!err.contains(&secret[..40]), "{err}");
    }
}

/// The real binary: the flag, the file's mode, and a log naming the file but
/// never the token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_writes_the_bootstrap_file_and_never_logs_the_token() {
    let dir = tempfile::tempdir().unwrap();
    let insecure = Insecure::new();
    let file = dir.path().join("bootstrap-token");
    let addr = ferry_testkit::free_addr();
    let log = dir.path().join("log");
    let out = std::fs::File::create(&log).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_registry-svc"))
        .arg("--listen")
        .arg(addr.to_string())
        .arg("--data-dir")
        .arg(dir.path().join("registry"))
        .arg("--bootstrap-token-file")
        .arg(&file)
        .arg("--insecure")
        .arg("--cluster-secret-file")
        .arg(insecure.secret_file())
        .env("FERRY_LOG", "debug")
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .spawn()
        .unwrap();
    let url = format!("http://{addr}");
    ferry_testkit::wait_serving(&url).await;
    let token = std::fs::read_to_string(&file).unwrap().trim().to_string();
    assert_eq!(
        std::fs::metadata(&file).unwrap().permissions().mode() & 0o777,
        0o600
    );
    // Tokens are checked for services (cache, processor, failover); the
    // bootstrap token makes others.
    let mut service = RegistryClient::new(channel(&url, &insecure.service(ServiceKind::Cache)));
    let mut admin = RegistryClient::new(channel(
        &url,
        &Credentials {
            tls: None,
            bearer: Some(token.clone()),
        },
    ));
    assert_eq!(
        authenticate(&mut service, &token).await.unwrap(),
        ("bootstrap".into(), pb::Role::Admin)
    );
    let made = create(&mut admin, "frank", pb::Role::Reader).await.unwrap();
    authenticate(&mut service, &made.token).await.unwrap();
    let _ = authenticate(&mut service, &format!("{}0", made.token)).await;

    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(child.wait().unwrap().success());
    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(logged.contains(&file.display().to_string()), "{logged}");
    for secret in [secret_of(&token), secret_of(&made.token)] {
        assert!(!logged.contains(secret), "a secret was logged:\n{logged}");
    }
}

/// Starts the binary on `data` with `args` and `env`, waits until it serves,
/// then stops it with SIGTERM.
async fn run_binary(data: &Path, args: &[&str], env: &[(&str, &Path)]) {
    let insecure = Insecure::new();
    let addr = ferry_testkit::free_addr();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_registry-svc"));
    cmd.arg("--listen")
        .arg(addr.to_string())
        .arg("--data-dir")
        .arg(data)
        .arg("--insecure")
        .arg("--cluster-secret-file")
        .arg(insecure.secret_file())
        .args(args)
        .env_remove("FERRY_BOOTSTRAP_TOKEN_FILE");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().unwrap();
    ferry_testkit::wait_serving(&format!("http://{addr}")).await;
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(child.wait().unwrap().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_setting_comes_from_the_config_file_and_the_environment_wins() {
    let dir = tempfile::tempdir().unwrap();
    let from_config = dir.path().join("from-config");
    let from_env = dir.path().join("from-env");
    let config = dir.path().join("ferry.toml");
    std::fs::write(
        &config,
        format!(
            "[registry]\nbootstrap_token_file = {:?}\n",
            from_config.display().to_string()
        ),
    )
    .unwrap();
    let config = config.display().to_string();

    run_binary(&dir.path().join("one"), &["--config", &config], &[]).await;
    assert!(from_config.exists() && !from_env.exists());
    std::fs::remove_file(&from_config).unwrap();

    run_binary(
        &dir.path().join("two"),
        &["--config", &config],
        &[("FERRY_BOOTSTRAP_TOKEN_FILE", &from_env)],
    )
    .await;
    assert!(from_env.exists() && !from_config.exists());
}
