//! The authorization layer every Ferry server runs: it finds who is calling
//! (a bearer token, else the client certificate), looks the method up in
//! [`super::policy::TABLE`], refuses with UNAUTHENTICATED (no credentials)
//! or PERMISSION_DENIED (not allowed), and hands the handler a [`Caller`]
//! in the request's extensions, for the checks only the handler can make
//! (an agent's own VM). It also writes the audit trail ([`super::audit`]):
//! every mutating call, allowed or refused, with the code it ended with.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tonic::Status;

use crate::refusal::Refused;
use crate::security::audit::{AuditLog, AuditRecord, Slot};
use crate::security::cluster_secret::ClusterSecret;
use crate::security::policy::rule_for;
use crate::security::principal::Principal;

/// A boxed future, as [`TokenVerifier`] returns.
pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// Checks an operator's bearer token (registry's token store, directly or
/// through registry's AuthenticateToken).
pub trait TokenVerifier: Send + Sync + 'static {
    /// The operator the token belongs to, or UNAUTHENTICATED.
    fn verify(&self, token: String) -> BoxFuture<Result<Principal, Status>>;
}

/// A verifier that knows no operator tokens (services that take no
/// operator calls, and tests).
pub struct NoOperatorTokens;

impl TokenVerifier for NoOperatorTokens {
    fn verify(&self, _token: String) -> BoxFuture<Result<Principal, Status>> {
        Box::pin(async {
            Err(Status::unauthenticated(
                "operator tokens are not accepted by this server",
            ))
        })
    }
}

/// How a server checks its callers.
#[derive(Clone)]
pub enum Access {
    /// Every call is authenticated and authorized.
    Enforced(Arc<Checks>),
    /// Nothing is checked here: for a library embedding in-process, where
    /// every caller is the embedding program itself, and the agent's group
    /// port without TLS, whose handlers admit only calls signed with the
    /// group's secret (docs/security.md). No service binary runs with it:
    /// their configuration always enforces.
    Unchecked,
}

impl std::fmt::Debug for Access {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Access::Enforced(_) => f.write_str("Enforced"),
            Access::Unchecked => f.write_str("Unchecked"),
        }
    }
}

/// What an enforcing server checks credentials with.
pub struct Checks {
    /// Operator tokens.
    pub tokens: Arc<dyn TokenVerifier>,
    /// Service and agent tokens, in a deployment without TLS.
    pub secret: Option<ClusterSecret>,
}

/// Who made a request, as the handler sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// Authenticated and allowed this method.
    Known(Principal),
    /// The server does not check callers ([`Access::Unchecked`]), or the
    /// method is public.
    Unchecked,
}

impl Caller {
    /// The caller of `request` (Unchecked when no layer ran).
    pub fn of<T>(request: &tonic::Request<T>) -> Caller {
        request
            .extensions()
            .get::<Caller>()
            .cloned()
            .unwrap_or(Caller::Unchecked)
    }

    /// Refuses an agent acting for another VM than its own. Services and
    /// operators the table admitted may name any VM.
    pub fn check_vm(&self, vm: &str) -> Result<(), Refused> {
        match self {
            Caller::Known(Principal::Agent { vm: own }) if own.as_str() != vm => {
                Err(Refused::permission_denied(format!(
                    "the agent of VM {:?} may not act for VM {vm:?}",
                    own.as_str()
                )))
            }
            _ => Ok(()),
        }
    }

    /// The identity for audit records and logs.
    pub fn describe(&self) -> String {
        match self {
            Caller::Known(p) => p.uri(),
            Caller::Unchecked => "unchecked".to_string(),
        }
    }
}

/// The tower layer.
#[derive(Clone, Debug)]
pub struct AuthLayer {
    access: Access,
    audit: Option<AuditLog>,
}

impl AuthLayer {
    /// A layer checking callers as `access` says.
    pub fn new(access: Access) -> Self {
        AuthLayer {
            access,
            audit: None,
        }
    }

    /// The same, recording mutating calls in `audit`.
    pub fn with_audit(access: Access, audit: Option<AuditLog>) -> Self {
        AuthLayer { access, audit }
    }
}

impl<S> tower::Layer<S> for AuthLayer {
    type Service = AuthService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        AuthService {
            inner,
            access: self.access.clone(),
            audit: self.audit.clone(),
        }
    }
}

/// The service [`AuthLayer`] builds.
#[derive(Clone, Debug)]
pub struct AuthService<S> {
    inner: S,
    access: Access,
    audit: Option<AuditLog>,
}

/// The caller of a refused call, for the audit trail.
const ANONYMOUS: &str = "anonymous";

/// Records a refusal (when `audit` is set) and answers it.
fn refuse<RB: Default>(
    audit: Option<&AuditLog>,
    caller: &str,
    method: &str,
    status: Status,
) -> http::Response<RB> {
    if let Some(log) = audit {
        log.record(AuditRecord::now(
            caller,
            method,
            "-",
            status.code(),
            status.message(),
        ));
    }
    status.into_http()
}

/// Calls `inner`; with `audit`, hands the handler a target slot and records
/// how the call ended: the grpc-status of the response headers (a handler's
/// error is a trailers-only response), OK when there is none (a stream
/// failing later is recorded as opened).
async fn pass<S, B, RB>(
    inner: &mut S,
    mut request: http::Request<B>,
    audit: Option<(&AuditLog, String)>,
    method: &str,
) -> Result<http::Response<RB>, S::Error>
where
    S: tower::Service<http::Request<B>, Response = http::Response<RB>>,
{
    let Some((log, caller)) = audit else {
        return inner.call(request).await;
    };
    let slot = Slot::default();
    request.extensions_mut().insert(slot.clone());
    // Recorded CANCELLED if the call is dropped before it answers (the
    // client went away): the handler may have changed something by then.
    let mut pending = Pending {
        log,
        caller,
        method,
        slot,
        answered: false,
    };
    let response = inner.call(request).await;
    pending.answered = true;
    let (code, message) = match &response {
        Ok(response) => match Status::from_header_map(response.headers()) {
            Some(status) => (status.code(), status.message().to_string()),
            None => (tonic::Code::Ok, String::new()),
        },
        Err(_) => (
            tonic::Code::Unavailable,
            "the server failed the call before answering (overloaded or timed out)".to_string(),
        ),
    };
    pending.record(code, &message);
    response
}

/// A recorded call under way.
struct Pending<'a> {
    log: &'a AuditLog,
    caller: String,
    method: &'a str,
    slot: Slot,
    answered: bool,
}

impl Pending<'_> {
    fn record(&self, code: tonic::Code, message: &str) {
        self.log.record(AuditRecord::now(
            &self.caller,
            self.method,
            &self.slot.text(),
            code,
            message,
        ));
    }
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        if !self.answered {
            self.record(
                tonic::Code::Cancelled,
                "the call was abandoned (the client went away or the server stopped) before it answered",
            );
        }
    }
}

fn bearer<B>(request: &http::Request<B>) -> Result<Option<String>, Status> {
    let Some(value) = request.headers().get(http::header::AUTHORIZATION) else {
        return Ok(None);
    };
    let text = value
        .to_str()
        .map_err(|_| Status::unauthenticated("the authorization header is not ASCII"))?;
    match text.strip_prefix("Bearer ") {
        Some(token) if !token.trim().is_empty() => Ok(Some(token.trim().to_string())),
        _ => Err(Status::unauthenticated(
            "the authorization header must be \"Bearer <token>\"",
        )),
    }
}

fn certificate_principal<B>(request: &http::Request<B>) -> Result<Option<Principal>, Status> {
    use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
    let Some(certs) = request
        .extensions()
        .get::<TlsConnectInfo<TcpConnectInfo>>()
        .and_then(|info| info.peer_certs())
    else {
        return Ok(None);
    };
    let Some(leaf) = certs.first() else {
        return Ok(None);
    };
    crate::security::pki::principal_of_cert(leaf.as_ref())
        .map_err(|e| Status::unauthenticated(format!("the client certificate cannot be read: {e}")))
}

/// What a request presents, read before any await (the body need not be Sync).
enum Presented {
    Token(String),
    Certificate(Principal),
    Nothing,
}

fn presented<B>(request: &http::Request<B>) -> Result<Presented, Status> {
    if let Some(token) = bearer(request)? {
        return Ok(Presented::Token(token));
    }
    Ok(certificate_principal(request)?.map_or(Presented::Nothing, Presented::Certificate))
}

async fn authenticate(checks: &Checks, presented: Presented) -> Result<Option<Principal>, Status> {
    let token = match presented {
        Presented::Token(token) => token,
        Presented::Certificate(p) => return Ok(Some(p)),
        Presented::Nothing => return Ok(None),
    };
    if ClusterSecret::is_cluster_token(&token) {
        let secret = checks.secret.as_ref().ok_or_else(|| {
            Status::unauthenticated(
                "service and agent tokens are not accepted here: this deployment \
                 authenticates services and agents by certificate",
            )
        })?;
        return secret.verify(&token).map(Some).ok_or_else(|| {
            Status::unauthenticated(
                "the service or agent token is not valid for this deployment's cluster secret",
            )
        });
    }
    checks.tokens.verify(token).await.map(Some)
}

impl<S, B, RB> tower::Service<http::Request<B>> for AuthService<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<RB>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
    RB: Default + Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        // The ready service is the one to call; keep a fresh clone in its place.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let access = self.access.clone();
        let audit = self.audit.clone();
        let presented = presented(&request);
        Box::pin(async move {
            let path = request.uri().path().to_string();
            let method = path.trim_start_matches('/').to_string();
            let rule = rule_for(&path);
            // Refusals are recorded for every mutating method (and any
            // method not in the table); allowed calls unless frequent.
            let refusals = audit.as_ref().filter(|_| rule.is_none_or(|r| r.mutates));
            let allowed = audit
                .as_ref()
                .filter(|_| rule.is_some_and(|r| r.audited_when_allowed()));
            let checks = match access {
                Access::Unchecked => {
                    request.extensions_mut().insert(Caller::Unchecked);
                    let caller = Caller::Unchecked.describe();
                    let audit = allowed.map(|log| (log, caller));
                    return pass(&mut inner, request, audit, &method).await;
                }
                Access::Enforced(checks) => checks,
            };
            let Some(rule) = rule else {
                tracing::warn!(%method, "refused: method not in the authorization table");
                return Ok(refuse(
                    refusals,
                    ANONYMOUS,
                    &method,
                    Status::permission_denied(format!(
                        "{method} is not in Ferry's authorization table; no one may call it"
                    )),
                ));
            };
            if rule.public {
                request.extensions_mut().insert(Caller::Unchecked);
                return inner.call(request).await;
            }
            let principal = match async { authenticate(&checks, presented?).await }.await {
                Ok(Some(p)) => p,
                Ok(None) => {
                    tracing::info!(%method, "refused: no credentials");
                    return Ok(refuse(
                        refusals,
                        ANONYMOUS,
                        &method,
                        Status::unauthenticated(format!(
                            "{method} needs credentials: a bearer token (--token or FERRY_TOKEN) \
                             or a client certificate; it is for {}",
                            rule.describe()
                        )),
                    ));
                }
                Err(status) => {
                    tracing::info!(%method, message = status.message(), "refused: bad credentials");
                    return Ok(refuse(refusals, ANONYMOUS, &method, status));
                }
            };
            if !rule.admits(&principal) {
                tracing::info!(%method, caller = %principal.uri(), "refused: not allowed");
                let status = Status::permission_denied(format!(
                    "{principal} may not call {method}: it is for {}",
                    rule.describe()
                ));
                return Ok(refuse(refusals, &principal.uri(), &method, status));
            }
            let caller = principal.uri();
            request.extensions_mut().insert(Caller::Known(principal));
            pass(
                &mut inner,
                request,
                allowed.map(|log| (log, caller)),
                &method,
            )
            .await
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::security::audit::Filter;
    use std::time::Duration;
    use tower::Service;

    /// A call dropped before its handler answers is recorded CANCELLED,
    /// with the target the handler named.
    #[tokio::test]
    async fn an_abandoned_call_is_recorded_cancelled() {
        let dir = tempfile::tempdir().unwrap();
        let log = AuditLog::open(dir.path(), 30).unwrap();
        let handler = tower::service_fn(|request: http::Request<()>| async move {
            if let Some(slot) = request.extensions().get::<Slot>() {
                slot.set(crate::security::audit::Target::vm("web-1"));
            }
            std::future::pending::<Result<http::Response<String>, std::convert::Infallible>>().await
        });
        let mut service = tower::Layer::layer(
            &AuthLayer::with_audit(Access::Unchecked, Some(log.clone())),
            handler,
        );
        let request = http::Request::builder()
            .uri("/ferry.registry.v1.Registry/RegisterVm")
            .body(())
            .unwrap();
        let call = service.call(request);
        // The handler starts, then the client goes away.
        assert!(tokio::time::timeout(Duration::from_millis(50), call)
            .await
            .is_err());
        assert!(log.flush(Duration::from_secs(5)).await);
        let records = log.list(&Filter::default()).unwrap();
        assert_eq!(records.len(), 1, "{records:?}");
        assert_eq!(records[0].code, "CANCELLED");
        assert_eq!(records[0].target, "vm/web-1");
        assert_eq!(records[0].caller, "unchecked");
        assert_eq!(records[0].method, "ferry.registry.v1.Registry/RegisterVm");
    }
}
