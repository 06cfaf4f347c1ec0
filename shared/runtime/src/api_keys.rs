//! API keys as the services that take them see them: Config vouches for a key (it keeps only
//! their hashes), and each service remembers the answer briefly, so a key costs a call to Config
//! once per TTL rather than once per request (and once for a burst of requests that all present
//! it at once), and a revoked key stops working within the TTL.

use std::{sync::Arc, time::Duration};

use c2m_proto::v1::{self as pb, ApiKeyScope};
use ring::digest;
use tonic::{Code, Status};

use crate::peers::Peers;

/// API keys start so; anything else presented as a bearer credential is a token.
pub use crate::auth::API_KEY_PREFIX as PREFIX;

/// Keys Config vouched for, by their SHA-256.
#[derive(Debug)]
pub struct ApiKeys {
    known: moka::future::Cache<[u8; 32], Arc<pb::AuthenticateApiKeyResponse>>,
}

impl ApiKeys {
    pub fn new(ttl: Duration) -> Self {
        Self {
            known: moka::future::Cache::builder()
                .max_capacity(100_000)
                .time_to_live(ttl)
                .build(),
        }
    }

    /// Forgets every key, for a service told that keys changed (one was revoked): the next
    /// request asks Config again.
    pub fn clear(&self) {
        self.known.invalidate_all();
    }

    /// The key `presented` if it is live, of `account_id` and has `scope`: UNAUTHENTICATED for
    /// an unknown or revoked key, PERMISSION_DENIED for another account's or a scope it lacks,
    /// UNAVAILABLE while Config cannot be asked.
    pub async fn authorize(
        &self,
        peers: &Peers,
        presented: &str,
        account_id: &str,
        scope: ApiKeyScope,
    ) -> Result<Arc<pb::AuthenticateApiKeyResponse>, Status> {
        let digest: [u8; 32] = digest::digest(&digest::SHA256, presented.as_bytes())
            .as_ref()
            .try_into()
            .expect("SHA-256 has 32 bytes");
        // One question to Config per key however many requests present it at once; an unknown
        // key is not remembered (it may be created in a moment).
        let ask = async {
            peers
                .config()
                .authenticate_api_key(pb::AuthenticateApiKeyRequest {
                    plaintext: presented.to_owned(),
                })
                .await
                .map(|answer| Arc::new(answer.into_inner()))
        };
        let key = self
            .known
            .try_get_with(digest, ask)
            .await
            .map_err(|s| match s.code() {
                Code::NotFound => Status::unauthenticated("unknown or revoked api key"),
                _ => {
                    tracing::warn!(status = %s, "config unavailable for an api key check");
                    Status::unavailable("cannot check the api key now, retry")
                }
            })?;
        if key.account_id != account_id {
            return Err(Status::permission_denied(format!(
                "this api key belongs to another account than {account_id}"
            )));
        }
        if !key.scopes.contains(&(scope as i32)) {
            return Err(Status::permission_denied(format!(
                "this api key lacks the scope {}",
                scope.as_str_name()
            )));
        }
        Ok(key)
    }
}
