//! The audit trail over mutual TLS: registry records an allowed RegisterVm
//! (with its target), a refused one, an unauthenticated one and one with a
//! wrong token (which the trail never holds), lists them to an admin only,
//! and does not record reads.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // tests may

use std::path::Path;
use std::time::{Duration, SystemTime};

use ferry_proto::audit::v1 as audit;
use ferry_proto::audit::v1::audit_client::AuditClient;
use ferry_proto::registry::v1 as reg;
use ferry_proto::registry::v1::registry_client::RegistryClient;
use ferry_runtime::peers::{connect, Credentials, PeerChannel};
use ferry_runtime::security::{ClientTls, OperatorRole, ServiceKind};
use ferry_runtime::{CancellationToken, ServiceConfig};
use ferry_testkit::pki::{CertFiles, TestPki};
use ferry_testkit::wait_for;
use tokio::net::TcpListener;
use tonic::Code;

/// registry-svc with mutual TLS from `pki` and every call checked,
/// in-process; its URL.
async fn registry(pki: &TestPki, dir: &Path, shutdown: &CancellationToken) -> String {
    let mut config = ServiceConfig::in_process(dir);
    config.security = pki.security(ServiceKind::Registry, None);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("https://{}", listener.local_addr().unwrap());
    let config = registry_svc::Config::new(config, registry_svc::Settings::default()).unwrap();
    tokio::spawn(registry_svc::serve(config, listener, shutdown.clone()));
    url
}

fn with_cert(pki: &TestPki, files: &CertFiles) -> Credentials {
    Credentials {
        tls: Some(ClientTls::load(&pki.ca(), Some(&files.cert), Some(&files.key)).unwrap()),
        bearer: None,
    }
}

fn anonymous(pki: &TestPki) -> Credentials {
    Credentials {
        tls: Some(ClientTls::load(&pki.ca(), None, None).unwrap()),
        bearer: None,
    }
}

fn registry_client(url: &str, credentials: &Credentials) -> RegistryClient<PeerChannel> {
    RegistryClient::new(connect(url, credentials).unwrap())
}

fn audit_client(url: &str, credentials: &Credentials) -> AuditClient<PeerChannel> {
    AuditClient::new(connect(url, credentials).unwrap())
}

async fn register(url: &str, credentials: &Credentials, name: &str) -> Code {
    let vm = ferry_testkit::vm::vm_spec(name, &[("os", 1 << 20, Path::new("/srv/images/os.img"))]);
    match registry_client(url, credentials)
        .register_vm(reg::RegisterVmRequest { vm: Some(vm) })
        .await
    {
        Ok(_) => Code::Ok,
        Err(status) => status.code(),
    }
}

async fn records(
    url: &str,
    credentials: &Credentials,
    request: audit::ListAuditRecordsRequest,
) -> Result<Vec<audit::AuditRecord>, tonic::Status> {
    audit_client(url, credentials)
        .list_audit_records(request)
        .await
        .map(|r| r.into_inner().records)
}

fn uri(role: OperatorRole) -> String {
    ferry_testkit::pki::operator(role).uri()
}

#[tokio::test]
async fn mutating_calls_allowed_or_refused_are_listed_to_admins_only() {
    let pki = TestPki::new();
    let dir = tempfile::tempdir().unwrap();
    let shutdown = CancellationToken::new();
    let url = registry(&pki, &dir.path().join("registry"), &shutdown).await;
    let admin = with_cert(&pki, &pki.operator(OperatorRole::Admin));
    let reader = with_cert(&pki, &pki.operator(OperatorRole::Reader));
    let nobody = anonymous(&pki);

    // Serving once a read answers; reads are not recorded.
    wait_for("registry to serve", Duration::from_secs(30), || async {
        registry_client(&url, &admin)
            .list_vms(reg::ListVmsRequest {})
            .await
            .ok()
    })
    .await;
    let started = SystemTime::now();

    assert_eq!(register(&url, &admin, "web-1").await, Code::Ok);
    assert_eq!(
        register(&url, &reader, "web-2").await,
        Code::PermissionDenied
    );
    assert_eq!(
        register(&url, &nobody, "web-3").await,
        Code::Unauthenticated
    );
    // A wrong bearer token: anonymous, and the record never holds it.
    let secret = "5e".repeat(32);
    let forged = Credentials {
        bearer: Some(format!("fy1.mallory.{secret}")),
        ..anonymous(&pki)
    };
    assert_eq!(
        register(&url, &forged, "web-4").await,
        Code::Unauthenticated
    );
    // A handler's refusal is recorded with its code and target.
    assert_eq!(register(&url, &admin, "web-1").await, Code::AlreadyExists);
    registry_client(&url, &reader)
        .list_vms(reg::ListVmsRequest {})
        .await
        .unwrap();

    // Only an admin may list.
    let everything = audit::ListAuditRecordsRequest::default();
    let refused = records(&url, &reader, everything.clone())
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");

    let listed = records(&url, &admin, everything.clone()).await.unwrap();
    let seen: Vec<(&str, &str, &str, &str)> = listed
        .iter()
        .map(|r| {
            (
                r.caller.as_str(),
                r.method.as_str(),
                r.target.as_str(),
                r.code.as_str(),
            )
        })
        .collect();
    let register_vm = "ferry.registry.v1.Registry/RegisterVm";
    let admin_uri = uri(OperatorRole::Admin);
    let reader_uri = uri(OperatorRole::Reader);
    assert_eq!(
        seen,
        vec![
            (admin_uri.as_str(), register_vm, "vm/web-1", "OK"),
            (reader_uri.as_str(), register_vm, "-", "PERMISSION_DENIED"),
            ("anonymous", register_vm, "-", "UNAUTHENTICATED"),
            ("anonymous", register_vm, "-", "UNAUTHENTICATED"),
            (
                admin_uri.as_str(),
                register_vm,
                "vm/web-1",
                "ALREADY_EXISTS"
            ),
        ],
        "reads (ListVms, ListAuditRecords) are not recorded; {listed:#?}"
    );
    assert!(listed[0].message.is_empty());
    assert!(
        listed[1].message.contains("may not call"),
        "{:?}",
        listed[1]
    );
    assert!(listed[3].message.contains("mallory"), "{:?}", listed[3]);
    assert!(!listed[4].message.is_empty());
    let first = ferry_runtime::time::from_timestamp(listed[0].time.as_ref().unwrap()).unwrap();
    assert!(first + Duration::from_secs(1) >= started, "{first:?}");

    // Filters: by VM, by time, by count.
    let web1 = records(
        &url,
        &admin,
        audit::ListAuditRecordsRequest {
            vm: "web-1".into(),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(web1.len(), 2, "{web1:#?}");
    let later = records(
        &url,
        &admin,
        audit::ListAuditRecordsRequest {
            since: Some(ferry_runtime::time::to_timestamp(
                SystemTime::now() + Duration::from_secs(3600),
            )),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert!(later.is_empty(), "{later:#?}");
    let last = records(
        &url,
        &admin,
        audit::ListAuditRecordsRequest {
            limit: 1,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(last, vec![listed[4].clone()]);

    // The trail is JSON lines in the data directory.
    let files: Vec<_> = std::fs::read_dir(dir.path().join("registry/audit"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(files.len(), 1, "{files:?}");
    assert!(
        files[0].starts_with("audit-") && files[0].ends_with(".jsonl"),
        "{files:?}"
    );
    let text = std::fs::read_to_string(dir.path().join("registry/audit").join(&files[0])).unwrap();
    assert_eq!(text.lines().count(), 5, "{text}");
    assert!(!text.contains(&secret), "a token reached the trail: {text}");
    shutdown.cancel();
}
