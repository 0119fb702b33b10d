//! The NBD export's TLS handshake byte by byte (NetworkBlockDevice/nbd
//! `doc/proto.md`, FORCEDTLS): before STARTTLS every option but ABORT is
//! refused with NBD_REP_ERR_TLS_REQD and nothing about the exports leaks;
//! EXPORT_NAME hangs up; STARTTLS with data is invalid; after the upgrade
//! the haggling goes on inside TLS, and a second STARTTLS is invalid.
//! (`binary.rs` runs real qemu-io against the same.)
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // tests may

use std::sync::Arc;

use ferry_agent::capture::{Capture, SourceDisk};
use ferry_agent::nbd::{NbdLimits, NbdListener, NbdTls};
use ferry_agent::stream::{Stream, StreamLimits};
use ferry_runtime::CancellationToken;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::rustls;

const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
const REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const OPT_EXPORT_NAME: u32 = 1;
const OPT_LIST: u32 = 3;
const OPT_STARTTLS: u32 = 5;
const OPT_GO: u32 = 7;
const REP_ACK: u32 = 1;
const REP_SERVER: u32 = 2;
const REP_ERR_INVALID: u32 = (1 << 31) + 3;
const REP_ERR_TLS_REQD: u32 = (1 << 31) + 5;

struct Served {
    _dir: tempfile::TempDir,
    port: u16,
    ca: rustls::pki_types::CertificateDer<'static>,
    shutdown: CancellationToken,
}

/// An export "os" on loopback that requires TLS (no client certificates).
async fn serve() -> Served {
    let dir = tempfile::tempdir().unwrap();
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()])
        .unwrap()
        .signed_by(&key, &issuer)
        .unwrap();
    let (cert_path, key_path) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert_path, cert.pem()).unwrap();
    std::fs::write(&key_path, key.serialize_pem()).unwrap();
    let tls = NbdTls::from_pem_files(&cert_path, &key_path, None).unwrap();

    let stream = Stream::new(1, StreamLimits::default());
    let capture = Arc::new(Capture::new(
        vec![SourceDisk::open("os", &dir.path().join("os.raw"), 1 << 20).unwrap()],
        stream,
    ));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let shutdown = CancellationToken::new();
    tokio::spawn(ferry_agent::nbd::serve_all(
        vec![(NbdListener::Tcp(listener), Some(tls))],
        capture,
        NbdLimits::default(),
        shutdown.clone(),
    ));
    Served {
        _dir: dir,
        port,
        ca: ca.der().clone(),
        shutdown,
    }
}

/// Connects and does the greeting; the handshake flags.
async fn greet(port: u16) -> (TcpStream, u16) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    assert_eq!(s.read_u64().await.unwrap(), 0x4e42_444d_4147_4943);
    assert_eq!(s.read_u64().await.unwrap(), IHAVEOPT);
    let flags = s.read_u16().await.unwrap();
    s.write_u32(1).await.unwrap(); // NBD_FLAG_C_FIXED_NEWSTYLE
    (s, flags)
}

async fn option(s: &mut (impl AsyncWrite + Unpin), option: u32, data: &[u8]) {
    let mut buf = IHAVEOPT.to_be_bytes().to_vec();
    buf.extend_from_slice(&option.to_be_bytes());
    buf.extend_from_slice(&(data.len() as u32).to_be_bytes());
    buf.extend_from_slice(data);
    s.write_all(&buf).await.unwrap();
}

/// One option reply: (option, type, data).
async fn reply(s: &mut (impl AsyncRead + Unpin)) -> (u32, u32, Vec<u8>) {
    assert_eq!(s.read_u64().await.unwrap(), REPLY_MAGIC);
    let option = s.read_u32().await.unwrap();
    let kind = s.read_u32().await.unwrap();
    let len = s.read_u32().await.unwrap();
    let mut data = vec![0; len as usize];
    s.read_exact(&mut data).await.unwrap();
    (option, kind, data)
}

#[tokio::test]
async fn before_starttls_every_option_is_refused_and_nothing_about_the_exports_leaks() {
    let served = serve().await;
    let (mut s, flags) = greet(served.port).await;
    assert_eq!(flags & 1, 1, "NBD_FLAG_FIXED_NEWSTYLE");
    for (opt, data) in [
        (OPT_LIST, Vec::new()),
        (OPT_GO, [&2u32.to_be_bytes()[..], b"os", &[0, 0]].concat()),
        (99, b"junk".to_vec()),
    ] {
        option(&mut s, opt, &data).await;
        let (o, kind, text) = reply(&mut s).await;
        assert_eq!((o, kind), (opt, REP_ERR_TLS_REQD), "option {opt}");
        assert!(
            String::from_utf8_lossy(&text).contains("requires TLS"),
            "{text:?}"
        );
        assert!(!text.windows(2).any(|w| w == b"os"), "no export name leaks");
    }
    option(&mut s, OPT_STARTTLS, b"x").await;
    assert_eq!(
        reply(&mut s).await.1,
        REP_ERR_INVALID,
        "STARTTLS takes no data"
    );
    // EXPORT_NAME cannot be refused with a reply: the server hangs up.
    option(&mut s, OPT_EXPORT_NAME, b"os").await;
    let mut rest = Vec::new();
    let read = tokio::time::timeout(std::time::Duration::from_secs(10), s.read_to_end(&mut rest))
        .await
        .expect("the server hangs up");
    assert!(
        read.is_ok_and(|n| n == 0),
        "nothing after EXPORT_NAME: {rest:?}"
    );
    served.shutdown.cancel();
}

#[tokio::test]
async fn after_starttls_the_haggling_goes_on_inside_tls() {
    let served = serve().await;
    let (mut s, _) = greet(served.port).await;
    option(&mut s, OPT_STARTTLS, &[]).await;
    assert_eq!(reply(&mut s).await, (OPT_STARTTLS, REP_ACK, Vec::new()));

    let mut roots = rustls::RootCertStore::empty();
    roots.add(served.ca.clone()).unwrap();
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, s)
        .await
        .unwrap();

    option(&mut tls, OPT_LIST, &[]).await;
    let (o, kind, data) = reply(&mut tls).await;
    assert_eq!((o, kind), (OPT_LIST, REP_SERVER));
    assert_eq!(data, [&2u32.to_be_bytes()[..], b"os"].concat());
    assert_eq!(reply(&mut tls).await.1, REP_ACK);
    option(&mut tls, OPT_STARTTLS, &[]).await;
    assert_eq!(
        reply(&mut tls).await.1,
        REP_ERR_INVALID,
        "TLS is on already"
    );
    served.shutdown.cancel();
}
