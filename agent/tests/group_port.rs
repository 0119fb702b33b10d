//! The replication group port with TLS: it admits only the agents of the
//! group's current members (by certificate); without TLS, only calls signed
//! with the group's secret by a current member. An outsider's Prepare — another
//! VM's agent, an operator, a client without a certificate — is refused and
//! the member's writes are not held; a member's round commits; a Commit whose
//! time lies far from the member's clock, or before its last bookmark, is
//! refused and places no bookmark.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // tests may

use std::sync::Arc;
use std::time::Duration;

use ferry_agent::capture::{Capture, SourceDisk};
use ferry_agent::group::{round, serve, Member, Peers, MAX_SKEW, ROUND_DEADLINE};
use ferry_agent::group_signature::{GroupSecret, Signed, HEADER as SIGNATURE_HEADER};
use ferry_agent::stream::{Stream, StreamLimits};
use ferry_proto::agent::v1 as pb;
use ferry_proto::agent::v1::agent_group_client::AgentGroupClient;
use ferry_runtime::peers::Credentials;
use ferry_runtime::security::{ClientTls, OperatorRole, Tls, TlsFiles};
use ferry_runtime::{CancellationToken, PeerChannel};
use ferry_testkit::pki::CertFiles;
use ferry_testkit::TestPki;
use tokio::net::TcpListener;

/// web-1's agent serving its group port ("g": web-1 and web-2) with TLS.
struct Port {
    pki: TestPki,
    member: Arc<Member>,
    capture: Arc<Capture>,
    url: String,
    stop: CancellationToken,
    _dir: tempfile::TempDir,
}

impl Drop for Port {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn port() -> Port {
    port_knowing(Some(&["web-1", "web-2"])).await
}

/// With `members` known (None: before registry's first heartbeat answer).
async fn port_knowing(members: Option<&[&str]>) -> Port {
    let pki = TestPki::new();
    let dir = tempfile::tempdir().unwrap();
    let capture = Arc::new(Capture::new(
        vec![SourceDisk::open("os", &dir.path().join("os.raw"), 1 << 20).unwrap()],
        Stream::new(1, StreamLimits::default()),
    ));
    let member = Member::new("web-1", "g", capture.clone());
    if let Some(members) = members {
        member.set_members(members.iter().copied());
    }
    let own = pki.agent("web-1");
    let tls = Tls::load(TlsFiles {
        cert: own.cert,
        key: own.key,
        ca: pki.ca(),
    })
    .unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!(
        "https://127.0.0.1:{}",
        listener.local_addr().unwrap().port()
    );
    let stop = CancellationToken::new();
    serve(member.clone(), listener, Some(tls), stop.clone())
        .await
        .unwrap();
    Port {
        pki,
        member,
        capture,
        url,
        stop,
        _dir: dir,
    }
}

/// Trusting the test CA, presenting `files` (or no certificate).
fn presenting(pki: &TestPki, files: Option<&CertFiles>) -> Credentials {
    Credentials {
        tls: Some(
            ClientTls::load(
                &pki.ca(),
                files.map(|f| f.cert.as_path()),
                files.map(|f| f.key.as_path()),
            )
            .unwrap(),
        ),
        bearer: None,
    }
}

fn client(p: &Port, files: Option<&CertFiles>) -> AgentGroupClient<PeerChannel> {
    AgentGroupClient::new(ferry_runtime::connect(&p.url, &presenting(&p.pki, files)).unwrap())
}

fn prepare(round_id: &str) -> pb::PrepareRequest {
    pb::PrepareRequest {
        replication_group: "g".into(),
        round_id: round_id.into(),
        coordinator: "web-2".into(),
        // As long as a member holds at all: a held write would wait this long.
        hold: Some(ferry_runtime::time::to_duration(Duration::from_secs(2))),
    }
}

fn commit(round_id: &str, time_unix_nanos: u64) -> pb::CommitRequest {
    pb::CommitRequest {
        replication_group: "g".into(),
        round_id: round_id.into(),
        time_unix_nanos,
    }
}

/// A write through the member completes well within the hold a Prepare
/// would have taken (2 s): its writes are not held.
async fn writes_flow(capture: &Capture, k: u64) {
    tokio::time::timeout(
        Duration::from_millis(800),
        capture.write("os", k * 4096, vec![k as u8; 4096]),
    )
    .await
    .expect("the member's writes are held")
    .unwrap();
}

fn now() -> u64 {
    ferry_runtime::time::unix_nanos_now()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outsiders_prepare_is_refused_and_the_members_writes_are_not_held() {
    let p = port().await;
    let last = p.capture.stream().last().await;

    // Another VM's agent, with a valid certificate from the same CA.
    let outsider = p.pki.agent("db-9");
    let answer = client(&p, Some(&outsider)).prepare(prepare("g-1")).await;
    writes_flow(&p.capture, 1).await;
    let refused = answer.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");
    assert!(
        refused.message().contains("db-9") && refused.message().contains("\"g\""),
        "{refused:?}"
    );
    // Nor can it commit or abort a round.
    let refused = client(&p, Some(&outsider))
        .commit(commit("g-1", now()))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");
    let refused = client(&p, Some(&outsider))
        .abort(pb::AbortRequest {
            replication_group: "g".into(),
            round_id: "g-1".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");

    // No certificate at all.
    let refused = client(&p, None).prepare(prepare("g-2")).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unauthenticated, "{refused:?}");
    writes_flow(&p.capture, 2).await;

    // An operator, even an admin: the port is for agents.
    let admin = p.pki.operator(OperatorRole::Admin);
    let refused = client(&p, Some(&admin))
        .prepare(prepare("g-3"))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");
    writes_flow(&p.capture, 3).await;

    // Plaintext does not reach the port at all.
    let plain = format!("http://{}", p.url.trim_start_matches("https://"));
    let mut plain =
        AgentGroupClient::new(ferry_runtime::connect(&plain, &Credentials::none()).unwrap());
    assert!(plain.prepare(prepare("g-4")).await.is_err());
    writes_flow(&p.capture, 4).await;

    // A VM registry no longer lists as a member is an outsider.
    p.member.set_members(["web-1"]);
    let refused = client(&p, Some(&p.pki.agent("web-2")))
        .prepare(prepare("g-5"))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");
    writes_flow(&p.capture, 5).await;

    // Only the five writes: no bookmark.
    assert_eq!(p.capture.stream().last().await, last + 5);
    assert_eq!(p.member.expired_holds(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_holds_and_commits_a_round() {
    let p = port().await;
    let web2 = p.pki.agent("web-2");
    let mut member = client(&p, Some(&web2));
    let prepared = member.prepare(prepare("g-1")).await.unwrap().into_inner();
    assert_eq!(prepared.vm_name, "web-1");
    // Held: a write waits for the Commit.
    let capture = p.capture.clone();
    let write = tokio::spawn(async move { capture.write("os", 0, vec![7; 4096]).await });
    let committed = member
        .commit(commit("g-1", now()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(committed.sequence, prepared.sequence + 1);
    let written = tokio::time::timeout(Duration::from_secs(1), write)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(written > committed.sequence, "{written} {committed:?}");

    // The coordinator's code path: a whole round over https with web-2's
    // certificate.
    let mut peers = Peers::new(presenting(&p.pki, Some(&web2)));
    let members = [("web-1".to_string(), p.url.clone())];
    let done = round(&mut peers, "g", "web-2", &members, ROUND_DEADLINE)
        .await
        .unwrap();
    assert_eq!(done.sequences.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_far_from_the_members_clock_or_before_its_last_bookmark_is_refused() {
    let p = port().await;
    let mut member = client(&p, Some(&p.pki.agent("web-2")));
    let skew = u64::try_from(MAX_SKEW.as_nanos()).unwrap();
    let minute = 60_000_000_000u64;
    for (round_id, time, what) in [
        ("g-past", now() - minute, "before"),
        ("g-future", now() + minute, "after"),
        ("g-just-beyond", now() + skew + minute / 6, "after"),
    ] {
        let last = p.capture.stream().last().await;
        member.prepare(prepare(round_id)).await.unwrap();
        let refused = member.commit(commit(round_id, time)).await.unwrap_err();
        assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused:?}");
        assert!(refused.message().contains(what), "{refused:?}");
        // No bookmark, and the writes go on at once.
        assert_eq!(p.capture.stream().last().await, last);
        writes_flow(&p.capture, 1).await;
    }

    // A point at the member's time commits; one before it, even within
    // the skew, would be backdated.
    let at = now();
    member.prepare(prepare("g-1")).await.unwrap();
    member.commit(commit("g-1", at)).await.unwrap();
    let last = p.capture.stream().last().await;
    member.prepare(prepare("g-2")).await.unwrap();
    let refused = member
        .commit(commit("g-2", at - 1_000_000_000))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused:?}");
    assert!(refused.message().contains("backdated"), "{refused:?}");
    assert_eq!(p.capture.stream().last().await, last);
    writes_flow(&p.capture, 2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn before_registry_names_the_members_every_caller_is_refused() {
    let p = port_knowing(None).await;
    let answer = client(&p, Some(&p.pki.agent("web-2")))
        .prepare(prepare("g-1"))
        .await;
    writes_flow(&p.capture, 1).await;
    let refused = answer.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");
    assert!(refused.message().contains("members yet"), "{refused:?}");
}

/// web-1's agent serving its group port ("g": web-1 and web-2) without TLS,
/// knowing the group's secret `secret`; its address.
async fn plain_port(secret: &[u8]) -> (Port, String) {
    let dir = tempfile::tempdir().unwrap();
    let capture = Arc::new(Capture::new(
        vec![SourceDisk::open("os", &dir.path().join("os.raw"), 1 << 20).unwrap()],
        Stream::new(1, StreamLimits::default()),
    ));
    let member = Member::new("web-1", "g", capture.clone());
    member.set_members(["web-1", "web-2"]);
    member.set_secret(GroupSecret::new(secret.to_vec()));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap().to_string();
    let stop = CancellationToken::new();
    serve(member.clone(), listener, None, stop.clone())
        .await
        .unwrap();
    let port = Port {
        pki: TestPki::new(),
        member,
        capture,
        url: format!("http://{address}"),
        stop,
        _dir: dir,
    };
    (port, address)
}

/// `request` carrying `signature`.
fn signed<T>(request: T, signature: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(request);
    request
        .metadata_mut()
        .insert(SIGNATURE_HEADER, signature.parse().unwrap());
    request
}

fn prepare_signature(secret: &GroupSecret, round_id: &str, signer: &str, at: u64) -> String {
    let hold = Duration::from_secs(2).as_nanos();
    let message = Signed::Prepare {
        group: "g",
        round_id,
        coordinator: "web-2",
        hold_nanos: hold,
    };
    secret.sign(&message, signer, at).unwrap()
}

/// Without TLS the port admits only calls signed with the group's secret by
/// a member: unsigned, signed with another secret, signed by a VM outside the
/// group, signed long ago, or replayed, a Prepare is refused and the member's
/// writes are not held; the group's own coordinator's rounds commit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plaintext_port_admits_only_rounds_signed_with_the_groups_secret() {
    let secret = [0x5au8; 32];
    let (p, address) = plain_port(&secret).await;
    let group_secret = GroupSecret::new(secret.to_vec()).unwrap();
    let other_secret = GroupSecret::new(vec![0xa5; 32]).unwrap();
    let mut plain =
        AgentGroupClient::new(ferry_runtime::connect(&p.url, &Credentials::none()).unwrap());
    let last = p.capture.stream().last().await;
    let mut k = 0;
    let refused = |answer: Result<tonic::Response<pb::PrepareResponse>, tonic::Status>,
                   code: tonic::Code,
                   says: &str| {
        let status = answer.unwrap_err();
        assert_eq!(status.code(), code, "{status:?}");
        assert!(status.message().contains(says), "{says}: {status:?}");
    };

    // Unsigned.
    refused(
        plain.prepare(prepare("g-1")).await,
        tonic::Code::Unauthenticated,
        "signed",
    );
    k += 1;
    writes_flow(&p.capture, k).await;
    // Signed with another secret, by a member.
    let forged = prepare_signature(&other_secret, "g-2", "web-2", now());
    refused(
        plain.prepare(signed(prepare("g-2"), &forged)).await,
        tonic::Code::Unauthenticated,
        "does not match",
    );
    k += 1;
    writes_flow(&p.capture, k).await;
    // Signed with the secret by a VM registry does not list in the group
    // (it left, and kept the old secret).
    let outsider = prepare_signature(&group_secret, "g-3", "db-9", now());
    refused(
        plain.prepare(signed(prepare("g-3"), &outsider)).await,
        tonic::Code::PermissionDenied,
        "not a member",
    );
    k += 1;
    writes_flow(&p.capture, k).await;
    // Signed 10 s ago.
    let stale = prepare_signature(&group_secret, "g-4", "web-2", now() - 10_000_000_000);
    refused(
        plain.prepare(signed(prepare("g-4"), &stale)).await,
        tonic::Code::Unauthenticated,
        "away from this member's clock",
    );
    k += 1;
    writes_flow(&p.capture, k).await;

    // A member's signed Prepare holds; its signed Abort releases; the same
    // Prepare sent again (a replay) is refused.
    let good = prepare_signature(&group_secret, "g-5", "web-2", now());
    plain
        .prepare(signed(prepare("g-5"), &good))
        .await
        .expect("a member's signed Prepare is admitted");
    let abort = pb::AbortRequest {
        replication_group: "g".into(),
        round_id: "g-5".into(),
    };
    let abort_signature = group_secret
        .sign(
            &Signed::Abort {
                group: "g",
                round_id: "g-5",
            },
            "web-2",
            now(),
        )
        .unwrap();
    plain.abort(signed(abort, &abort_signature)).await.unwrap();
    refused(
        plain.prepare(signed(prepare("g-5"), &good)).await,
        tonic::Code::Unauthenticated,
        "replay",
    );
    k += 1;
    writes_flow(&p.capture, k).await;
    assert_eq!(p.capture.stream().last().await, last + k);

    // The coordinator's rounds, signed by round(): committed, a bookmark.
    let mut peers = Peers::new(Credentials::none());
    let members = [("web-1".to_string(), address)];
    let err = round(&mut peers, "g", "web-2", &members, ROUND_DEADLINE)
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("signed"),
        "without the secret: {err}"
    );
    peers.set_secret(Some(group_secret));
    let done = round(&mut peers, "g", "web-2", &members, ROUND_DEADLINE)
        .await
        .unwrap();
    assert_eq!(done.sequences.len(), 1);
    assert_eq!(
        done.sequences[0].1,
        last + k + 1,
        "the bookmark follows the writes"
    );
}
