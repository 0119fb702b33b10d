//! The contract works from another language: a Python client generated from
//! proto/ with grpcio-tools registers and protects a VM, and over mutual TLS
//! gets what its certificate's or token's role allows.

use std::path::Path;

use ferry_proto::registry::v1 as pb;
use ferry_proto::registry::v1::registry_client::RegistryClient;

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap()
}

/// The Python client generated from every .proto into `dir/generated`,
/// with grpc_tools' well-known types.
fn generate(dir: &Path) -> std::path::PathBuf {
    let generated = dir.join("generated");
    std::fs::create_dir_all(&generated).unwrap();

    // Generate the client from every .proto, with grpc_tools' well-known types.
    let well_known = ferry_testkit::python()
        .args([
            "-c",
            "import grpc_tools, os; print(os.path.join(os.path.dirname(grpc_tools.__file__), '_proto'))",
        ])
        .output()
        .unwrap();
    assert!(well_known.status.success());
    let well_known = String::from_utf8(well_known.stdout).unwrap();
    let proto = repo().join("proto");
    let mut protoc = ferry_testkit::python();
    protoc
        .args(["-m", "grpc_tools.protoc"])
        .arg(format!("-I{}", proto.display()))
        .arg(format!("-I{}", well_known.trim()))
        .arg(format!("--python_out={}", generated.display()))
        .arg(format!("--grpc_python_out={}", generated.display()));
    for package in ["registry", "cache", "processor", "failover"] {
        protoc.arg(proto.join(format!("ferry/{package}/v1/{package}.proto")));
    }
    let out = protoc.output().unwrap();
    assert!(
        out.status.success(),
        "grpc_tools.protoc: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(generated
        .join("ferry/registry/v1/registry_pb2_grpc.py")
        .exists());

    generated
}

/// Runs the Python client `python`; the JSON it prints, once it succeeded.
async fn answer_of(mut python: std::process::Command) -> serde_json::Value {
    let out = tokio::task::spawn_blocking(move || python.output().unwrap())
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "python client: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_generated_python_client_registers_and_enables() {
    let dir = tempfile::tempdir().unwrap();
    let generated = generate(dir.path());
    let registry = ferry_testkit::start_registry(dir.path().join("registry"), None).await;
    ferry_testkit::wait_serving(&registry.url).await;
    let addr = registry.url.trim_start_matches("http://").to_string();
    let script = repo().join("tests/python/register_and_enable.py");
    let mut python = ferry_testkit::python();
    python.arg(&script).arg(&generated).arg(&addr);
    let answer = answer_of(python).await;
    assert_eq!(answer["state"], "REPLICATION_STATE_ENABLING");
    assert_eq!(answer["target_region"], "westeurope");
    assert_eq!(answer["target_resource_group"], "py-rg-ferry");
    assert_eq!(
        answer["replica_disks"],
        serde_json::json!(["py-vm-os-ferry", "py-vm-data-ferry"])
    );
    assert_eq!(answer["same_region_refused_with"], "INVALID_ARGUMENT");

    // The Rust client sees what the Python client made.
    let mut client = RegistryClient::connect(registry.url.clone()).await.unwrap();
    let item = client
        .get_protected_item(pb::GetProtectedItemRequest {
            vm_name: "py-vm".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(item.state(), pb::ReplicationState::Enabling);
    assert_eq!(item.source.as_ref().unwrap().disks.len(), 2);
    let target = item.target.as_ref().unwrap();
    assert_eq!(target.region, "westeurope");
    assert_eq!(target.resource_group, "py-rg-ferry");
    let replicas: Vec<&str> = target
        .replica_disks
        .iter()
        .map(|d| d.name.as_str())
        .collect();
    assert_eq!(replicas, ["py-vm-os-ferry", "py-vm-data-ferry"]);
    // The refused request changed nothing: one item, the one above.
    let items = client
        .list_protected_items(pb::ListProtectedItemsRequest {})
        .await
        .unwrap()
        .into_inner()
        .items;
    assert_eq!(items.len(), 1);
    registry.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_generated_python_client_speaks_tls_with_certificates_and_tokens() {
    use ferry_runtime::security::{OperatorRole, ServiceKind};
    let dir = tempfile::tempdir().unwrap();
    let generated = generate(dir.path());
    let pki = ferry_testkit::pki::TestPki::new();
    let mut config = ferry_runtime::ServiceConfig::in_process(dir.path().join("registry"));
    config.security = pki.security(ServiceKind::Registry, None);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let shutdown = ferry_runtime::CancellationToken::new();
    let config = registry_svc::Config::new(config, registry_svc::Settings::default()).unwrap();
    tokio::spawn(registry_svc::serve(config, listener, shutdown.clone()));
    // An operator token, made by the admin's certificate.
    let admin = pki.operator(OperatorRole::Admin);
    let credentials = ferry_runtime::peers::Credentials {
        tls: Some(
            ferry_runtime::security::ClientTls::load(
                &pki.ca(),
                Some(&admin.cert),
                Some(&admin.key),
            )
            .unwrap(),
        ),
        bearer: None,
    };
    let mut client = RegistryClient::new(
        ferry_runtime::peers::connect(&format!("https://{addr}"), &credentials).unwrap(),
    );
    let token = ferry_testkit::wait_for(
        "registry over TLS",
        std::time::Duration::from_secs(30),
        || {
            let mut client = client.clone();
            async move {
                client
                    .create_token(pb::CreateTokenRequest {
                        name: "py".into(),
                        role: pb::Role::Operator as i32,
                    })
                    .await
                    .ok()
            }
        },
    )
    .await
    .into_inner()
    .token;

    let reader = pki.operator(OperatorRole::Reader);
    let script = repo().join("tests/python/tls_and_roles.py");
    let mut python = ferry_testkit::python();
    python
        .arg(&script)
        .arg(&generated)
        .arg(format!("localhost:{}", addr.port()))
        .arg(pki.ca())
        .arg(&reader.cert)
        .arg(&reader.key)
        .arg(&token);
    let answer = answer_of(python).await;
    assert_eq!(answer["anonymous_list"], "UNAUTHENTICATED", "{answer}");
    assert_eq!(answer["reader_list"], "OK", "{answer}");
    assert_eq!(answer["reader_register"], "PERMISSION_DENIED", "{answer}");
    assert_eq!(answer["operator_register"], "OK", "{answer}");
    assert_eq!(answer["plaintext_list"], "UNAVAILABLE", "{answer}");
    let vms = client
        .list_vms(pb::ListVmsRequest {})
        .await
        .unwrap()
        .into_inner()
        .vms;
    assert_eq!(vms.len(), 1, "only the operator's registration is stored");
    shutdown.cancel();
}
