//! The authorization layer every Ferry server runs: it finds who is calling
//! (a bearer token, else the client certificate), looks the method up in
//! [`super::policy::TABLE`], refuses with UNAUTHENTICATED (no credentials)
//! or PERMISSION_DENIED (not allowed), and hands the handler a [`Caller`]
//! in the request's extensions, for the checks only the handler can make
//! (an agent's own VM).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tonic::Status;

use crate::refusal::Refused;
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
    /// Nothing is checked: only for a library embedding in-process, where
    /// every caller is the embedding program itself. No flag of any binary
    /// selects it.
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
}

impl AuthLayer {
    /// A layer checking callers as `access` says.
    pub fn new(access: Access) -> Self {
        AuthLayer { access }
    }
}

impl<S> tower::Layer<S> for AuthLayer {
    type Service = AuthService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        AuthService {
            inner,
            access: self.access.clone(),
        }
    }
}

/// The service [`AuthLayer`] builds.
#[derive(Clone, Debug)]
pub struct AuthService<S> {
    inner: S,
    access: Access,
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
        let presented = presented(&request);
        Box::pin(async move {
            let checks = match access {
                Access::Unchecked => {
                    request.extensions_mut().insert(Caller::Unchecked);
                    return inner.call(request).await;
                }
                Access::Enforced(checks) => checks,
            };
            let path = request.uri().path().to_string();
            let method = path.trim_start_matches('/').to_string();
            let Some(rule) = rule_for(&path) else {
                tracing::warn!(%method, "refused: method not in the authorization table");
                return Ok(Status::permission_denied(format!(
                    "{method} is not in Ferry's authorization table; no one may call it"
                ))
                .into_http());
            };
            if rule.public {
                request.extensions_mut().insert(Caller::Unchecked);
                return inner.call(request).await;
            }
            let principal = match async { authenticate(&checks, presented?).await }.await {
                Ok(Some(p)) => p,
                Ok(None) => {
                    tracing::info!(%method, "refused: no credentials");
                    return Ok(Status::unauthenticated(format!(
                        "{method} needs credentials: a bearer token (--token or FERRY_TOKEN) \
                         or a client certificate; it is for {}",
                        rule.describe()
                    ))
                    .into_http());
                }
                Err(status) => {
                    tracing::info!(%method, message = status.message(), "refused: bad credentials");
                    return Ok(status.into_http());
                }
            };
            if !rule.admits(&principal) {
                tracing::info!(%method, caller = %principal.uri(), "refused: not allowed");
                return Ok(Status::permission_denied(format!(
                    "{principal} may not call {method}: it is for {}",
                    rule.describe()
                ))
                .into_http());
            }
            request.extensions_mut().insert(Caller::Known(principal));
            inner.call(request).await
        })
    }
}
