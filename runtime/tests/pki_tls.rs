//! Certificates from `security::pki` work for real mutual TLS (tonic with
//! rustls): a service certificate serves on localhost, an agent certificate
//! authenticates as a client, and the server reads the agent's principal
//! from the chain it presented; a leaf of another CA, or an expired one, is
//! refused in the handshake.
#![cfg(feature = "pki-issue")]
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // tests may

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use ferry_proto::ids::VmName;
use ferry_runtime::security::pki::{
    default_hosts, principal_of_chain, Authority, Issued, Validity,
};
use ferry_runtime::security::{Principal, ServiceKind};
use tokio_stream::wrappers::TcpListenerStream;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity, Server, ServerTlsConfig};
use tonic::{Request, Status};
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

fn web1() -> Principal {
    Principal::Agent {
        vm: VmName::parse("web-1").unwrap(),
    }
}

fn issue(ca: &Authority, p: &Principal, validity: Validity) -> Issued {
    ca.issue(p, &default_hosts(p, &[]), validity).unwrap()
}

/// A health service over mTLS trusting `ca`, serving as `server`; records
/// the principal of each caller.
async fn serve(ca: &Authority, server: &Issued) -> (String, Arc<Mutex<Vec<Principal>>>) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let record = seen.clone();
    let health = tonic_health::server::HealthService::from_health_reporter(
        tonic_health::server::HealthReporter::new(),
    );
    let health = tonic_health::pb::health_server::HealthServer::with_interceptor(
        health,
        move |req: Request<()>| {
            let certs = req
                .peer_certs()
                .ok_or_else(|| Status::unauthenticated("no client certificate"))?;
            let principal = principal_of_chain(&certs)
                .map_err(|e| Status::unauthenticated(e.to_string()))?
                .ok_or_else(|| Status::unauthenticated("no Ferry identity"))?;
            record.lock().unwrap().push(principal);
            Ok(req)
        },
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let tls = ServerTlsConfig::new()
        .identity(Identity::from_pem(&server.cert_pem, &server.key_pem))
        .client_ca_root(Certificate::from_pem(ca.cert_pem()));
    let router = Server::builder()
        .tls_config(tls)
        .unwrap()
        .add_service(health);
    tokio::spawn(router.serve_with_incoming(TcpListenerStream::new(listener)));
    (format!("https://localhost:{port}"), seen)
}

async fn check(url: &str, ca: &Authority, client: &Issued) -> Result<(), String> {
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca.cert_pem()))
        .identity(Identity::from_pem(&client.cert_pem, &client.key_pem))
        .domain_name("localhost");
    let channel = Channel::from_shared(url.to_string())
        .unwrap()
        .tls_config(tls)
        .map_err(|e| e.to_string())?
        .connect_timeout(Duration::from_secs(10))
        .connect()
        .await
        .map_err(|e| format!("{e:?}"))?;
    HealthClient::new(channel)
        .check(HealthCheckRequest::default())
        .await
        .map(|_| ())
        .map_err(|s| format!("{s:?}"))
}

#[tokio::test]
async fn issued_certificates_authenticate_both_ways() {
    let ca = Authority::generate("test CA", Validity::days(10).unwrap()).unwrap();
    let day = Validity::days(1).unwrap();
    let registry = issue(
        &ca,
        &Principal::Service {
            service: ServiceKind::Registry,
        },
        day,
    );
    let (url, seen) = serve(&ca, &registry).await;

    let agent = issue(&ca, &web1(), day);
    check(&url, &ca, &agent).await.unwrap();
    assert_eq!(*seen.lock().unwrap(), vec![web1()]);

    // A leaf of an unrelated CA naming the same agent: refused.
    let other = Authority::generate("other CA", Validity::days(10).unwrap()).unwrap();
    let forged = issue(&other, &web1(), day);
    assert!(
        check(&url, &ca, &forged).await.is_err(),
        "foreign CA accepted"
    );

    // An expired leaf of the right CA: refused.
    let now = SystemTime::now();
    let expired = issue(
        &ca,
        &web1(),
        Validity {
            not_before: now - Duration::from_secs(7200),
            not_after: now - Duration::from_secs(3600),
        },
    );
    assert!(
        check(&url, &ca, &expired).await.is_err(),
        "expired accepted"
    );
    assert_eq!(seen.lock().unwrap().len(), 1, "only the good call got in");
}
