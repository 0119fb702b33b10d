//! Operator tokens checked by asking registry (AuthenticateToken), for the
//! services that do not hold the token store. An answer is kept for
//! [`REMEMBER`], so a revoked token keeps working here for at most that
//! long; a refusal is never kept.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ferry_proto::registry::v1 as pb;
use ferry_proto::registry::v1::registry_client::RegistryClient;
use sha2::{Digest, Sha256};
use tonic::{Code, Status};

use crate::peers::PeerChannel;
use crate::security::layer::{BoxFuture, TokenVerifier};
use crate::security::principal::{OperatorRole, Principal};

/// How long a confirmed token is trusted without asking again.
pub const REMEMBER: Duration = Duration::from_secs(10);
/// Tokens remembered at most; the memory is cleared when full.
const CAPACITY: usize = 1024;

type Remembered = HashMap<[u8; 32], (Principal, Instant)>;

/// Asks registry, remembering answers briefly.
pub struct RemoteTokens {
    registry: RegistryClient<PeerChannel>,
    remembered: Arc<Mutex<Remembered>>,
}

impl RemoteTokens {
    /// Checks tokens with the registry behind `registry` (a channel carrying
    /// this service's own credentials).
    pub fn new(registry: RegistryClient<PeerChannel>) -> Self {
        RemoteTokens {
            registry,
            remembered: Arc::new(Mutex::new(HashMap::new())),
        }
    }
}

fn role_of(role: i32) -> Option<OperatorRole> {
    match pb::Role::try_from(role).ok()? {
        pb::Role::Reader => Some(OperatorRole::Reader),
        pb::Role::Operator => Some(OperatorRole::Operator),
        pb::Role::Admin => Some(OperatorRole::Admin),
        pb::Role::Unspecified => None,
    }
}

impl TokenVerifier for RemoteTokens {
    fn verify(&self, token: String) -> BoxFuture<Result<Principal, Status>> {
        // Keyed by the token's hash: the memory never holds a secret.
        let key: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let remembered = self.remembered.clone();
        let mut registry = self.registry.clone();
        Box::pin(async move {
            if let Ok(memory) = remembered.lock() {
                if let Some((principal, at)) = memory.get(&key) {
                    if at.elapsed() < REMEMBER {
                        return Ok(principal.clone());
                    }
                }
            }
            let answer = registry
                .authenticate_token(pb::AuthenticateTokenRequest { token })
                .await
                .map_err(|status| match status.code() {
                    Code::Unauthenticated => status,
                    // Registry could not answer: the caller may retry.
                    _ => Status::unavailable(format!(
                        "cannot check the bearer token with registry: {}",
                        status.message()
                    )),
                })?
                .into_inner();
            let role = role_of(answer.role).ok_or_else(|| {
                Status::unavailable("registry answered a token check without a role")
            })?;
            let principal = Principal::Operator {
                name: answer.name,
                role,
            };
            if let Ok(mut memory) = remembered.lock() {
                if memory.len() >= CAPACITY {
                    memory.clear();
                }
                memory.insert(key, (principal.clone(), Instant::now()));
            }
            Ok(principal)
        })
    }
}
