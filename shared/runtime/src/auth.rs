//! Who is calling: signed tokens (HS256 JWTs) for console users, operators and c2m's own services,
//! and the role checks every RPC makes.
//!
//! Roles: `viewer` < `editor` < `admin` act within their own account; `agent` answers the
//! account's conversations (optionally only some skills') and nothing else; `operator` acts on
//! every account (account managers acting for brands); `service` is c2m calling itself. IVR API
//! keys are not tokens: Handoff resolves them through Config.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tonic::{Status, metadata::MetadataMap};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Answers conversations; ranks below a viewer, so it reads no configuration or report.
    Agent,
    Viewer,
    Editor,
    Admin,
    Operator,
    Service,
}

impl Role {
    /// As tokens spell it: `admin`, `operator`, …
    pub fn name(self) -> &'static str {
        match self {
            Role::Agent => "agent",
            Role::Viewer => "viewer",
            Role::Editor => "editor",
            Role::Admin => "admin",
            Role::Operator => "operator",
            Role::Service => "service",
        }
    }

    /// "an admin", "a viewer": the role in a sentence.
    fn with_article(self) -> String {
        let article = if matches!(self, Role::Viewer | Role::Service) {
            "a"
        } else {
            "an"
        };
        format!("{article} {}", self.name())
    }
}

/// How an account's API key begins (`c2m_…`), which no token does.
pub const API_KEY_PREFIX: &str = "c2m_";

/// What a token says about its bearer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// The user, or the service, e.g. `svc:handoff`.
    pub sub: String,
    pub role: Role,
    /// The account a viewer, editor or admin belongs to; absent for operators and services.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub account_id: Option<String>,
    /// Expiry, Unix seconds.
    pub exp: u64,
    /// An agent's skills: the conversations it may see and answer. Empty: every skill.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub skills: Vec<String>,
}

/// What a caller may do with an account's conversations.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConversationAccess {
    /// Who acts, as transcripts and assignments name them (the token's subject).
    pub actor: String,
    /// The skills whose conversations it may see; `None`: every skill.
    pub skills: Option<Vec<String>>,
    /// It may answer, claim, transfer and close, not only read.
    pub act: bool,
    /// It may act for others (assign to someone else, release another's conversation).
    pub supervise: bool,
}

impl ConversationAccess {
    /// Whether a conversation of `skill_id` is within the caller's skills.
    pub fn sees(&self, skill_id: &str) -> bool {
        self.skills
            .as_ref()
            .is_none_or(|skills| skills.iter().any(|s| s == skill_id))
    }
}

impl Claims {
    /// Whether the bearer may act on `account_id` with at least `min` (an account role).
    /// Operators may do anything on every account; c2m's own services may read every account
    /// (`min` viewer) and change none.
    pub fn authorize(&self, account_id: &str, min: Role) -> Result<(), Status> {
        match self.role {
            Role::Operator => Ok(()),
            Role::Service if min == Role::Viewer => Ok(()),
            Role::Service => Err(Status::permission_denied(
                "c2m services may read account data, not change it",
            )),
            role if self.account_id.as_deref() != Some(account_id) => {
                Err(Status::permission_denied(format!(
                    "{} of another account cannot act on account {account_id}",
                    role.with_article()
                )))
            }
            role if role < min => Err(Status::permission_denied(format!(
                "this needs the {} role; the caller is {}",
                min.name(),
                role.with_article()
            ))),
            _ => Ok(()),
        }
    }

    /// What the bearer may do with `account_id`'s conversations: agents of the account act on
    /// their skills', editors and admins on all and for others, viewers and c2m's services read,
    /// operators do anything. Anyone else is PERMISSION_DENIED.
    pub fn conversations(&self, account_id: &str) -> Result<ConversationAccess, Status> {
        let access = |act, supervise, skills| ConversationAccess {
            actor: self.sub.clone(),
            skills,
            act,
            supervise,
        };
        match self.role {
            Role::Operator => Ok(access(true, true, None)),
            Role::Service => Ok(access(false, false, None)),
            role if self.account_id.as_deref() != Some(account_id) => {
                Err(Status::permission_denied(format!(
                    "{} of another account cannot act on account {account_id}",
                    role.with_article()
                )))
            }
            Role::Agent if self.skills.is_empty() => Ok(access(true, false, None)),
            Role::Agent => Ok(access(true, false, Some(self.skills.clone()))),
            Role::Viewer => Ok(access(false, false, None)),
            Role::Editor | Role::Admin => Ok(access(true, true, None)),
        }
    }

    /// Only c2m's own services (and operators) may call internal RPCs.
    pub fn require_internal(&self) -> Result<(), Status> {
        match self.role {
            Role::Service | Role::Operator => Ok(()),
            _ => Err(Status::permission_denied(
                "internal rpc: only c2m services may call it",
            )),
        }
    }

    pub fn require_operator(&self) -> Result<(), Status> {
        match self.role {
            Role::Operator => Ok(()),
            _ => Err(Status::permission_denied("only operators may do this")),
        }
    }
}

/// The HS256 key that signs and verifies tokens, and the key of consumers' opaque ids (both from
/// `auth.token_secret`).
#[derive(Clone)]
pub struct TokenKey {
    encoding: jsonwebtoken::EncodingKey,
    decoding: jsonwebtoken::DecodingKey,
    consumers: ring::hmac::Key,
}

impl std::fmt::Debug for TokenKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenKey(*****)")
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokenError {
    #[error("malformed token")]
    Malformed,
    #[error("unsupported token algorithm")]
    Algorithm,
    #[error("bad token signature")]
    Signature,
    #[error("token expired")]
    Expired,
}

impl TokenKey {
    pub fn new(secret: &[u8]) -> Self {
        // A key of its own for consumer ids, derived from the secret: a consumer id says nothing
        // about a token, and the other way round.
        let derived = ring::hmac::sign(
            &ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret),
            b"c2m consumer ids v1",
        );
        Self {
            encoding: jsonwebtoken::EncodingKey::from_secret(secret),
            decoding: jsonwebtoken::DecodingKey::from_secret(secret),
            consumers: ring::hmac::Key::new(ring::hmac::HMAC_SHA256, derived.as_ref()),
        }
    }

    /// An opaque id of a consumer of an account, for reports that count the same consumer
    /// twice (repeat deflections) without knowing who they are: a keyed digest of the account
    /// and the phone, which nobody without `auth.token_secret` can turn back into the number.
    pub fn consumer_id(&self, account_id: &str, phone: &str) -> String {
        use base64::Engine as _;
        let tag = ring::hmac::sign(&self.consumers, format!("{account_id}\0{phone}").as_bytes());
        format!(
            "cns_{}",
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&tag.as_ref()[..16])
        )
    }

    pub fn sign(&self, claims: &Claims) -> String {
        jsonwebtoken::encode(
            &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
            claims,
            &self.encoding,
        )
        .expect("HS256 signs any claims that serialize")
    }

    /// Checks the signature (in constant time), the algorithm (HS256 only) and the expiry at
    /// `now`.
    pub fn verify(&self, token: &str, now: SystemTime) -> Result<Claims, TokenError> {
        use jsonwebtoken::errors::ErrorKind;

        let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::HS256);
        // The expiry is checked below against `now`, with no leeway.
        validation.validate_exp = false;
        validation.required_spec_claims.clear();
        let claims = jsonwebtoken::decode::<Claims>(token, &self.decoding, &validation)
            .map_err(|error| match error.kind() {
                ErrorKind::InvalidSignature => TokenError::Signature,
                ErrorKind::InvalidAlgorithm | ErrorKind::InvalidAlgorithmName => {
                    TokenError::Algorithm
                }
                _ => TokenError::Malformed,
            })?
            .claims;
        if claims.exp <= unix(now) {
            return Err(TokenError::Expired);
        }
        Ok(claims)
    }

    /// A short-lived token for c2m's own service `name` calling another service.
    pub fn service_token(&self, name: &str) -> String {
        self.sign(&Claims {
            sub: format!("svc:{name}"),
            role: Role::Service,
            account_id: None,
            exp: unix(SystemTime::now()) + 300,
            skills: Vec::new(),
        })
    }

    /// A token for a person, valid for `ttl`.
    pub fn user_token(
        &self,
        sub: &str,
        role: Role,
        account_id: Option<&str>,
        ttl: Duration,
    ) -> String {
        self.sign(&Claims {
            sub: sub.to_owned(),
            role,
            account_id: account_id.map(str::to_owned),
            exp: unix(SystemTime::now()) + ttl.as_secs(),
            skills: Vec::new(),
        })
    }

    /// A token for an agent (a person or a bot) of `account_id`, limited to `skills` unless
    /// that is empty, valid for `ttl`.
    pub fn agent_token(
        &self,
        sub: &str,
        account_id: &str,
        skills: &[String],
        ttl: Duration,
    ) -> String {
        self.sign(&Claims {
            sub: sub.to_owned(),
            role: Role::Agent,
            account_id: Some(account_id.to_owned()),
            exp: unix(SystemTime::now()) + ttl.as_secs(),
            skills: skills.to_vec(),
        })
    }

    /// The caller of a request, from its `authorization: Bearer <token>` metadata.
    pub fn caller(&self, metadata: &MetadataMap) -> Result<Claims, Status> {
        let token = bearer(metadata)?;
        if token.starts_with(API_KEY_PREFIX) {
            return Err(Status::unauthenticated(
                "an API key answers for Handoff's calls and the conversations API only; this call takes a token (c2m token)",
            ));
        }
        self.verify(token, SystemTime::now())
            .map_err(|e| Status::unauthenticated(e.to_string()))
    }
}

/// The bearer credential of a request: UNAUTHENTICATED when there is none.
pub fn bearer(metadata: &MetadataMap) -> Result<&str, Status> {
    let value = metadata
        .get("authorization")
        .ok_or_else(|| Status::unauthenticated("missing `authorization: Bearer …` metadata"))?;
    value
        .to_str()
        .ok()
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .ok_or_else(|| Status::unauthenticated("`authorization` must be `Bearer <credential>`"))
}

fn unix(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};

    use super::*;

    fn claims(role: Role, account: Option<&str>) -> Claims {
        Claims {
            sub: "u1".into(),
            role,
            account_id: account.map(Into::into),
            exp: unix(SystemTime::now()) + 60,
            skills: Vec::new(),
        }
    }

    #[test]
    fn refusals_say_who_the_caller_is_in_plain_words() {
        let admin = claims(Role::Admin, Some("acme"));
        let other = admin
            .authorize("globex", Role::Viewer)
            .expect_err("another account");
        assert_eq!(
            other.message(),
            "an admin of another account cannot act on account globex"
        );
        let viewer = claims(Role::Viewer, Some("acme"));
        let low = viewer.authorize("acme", Role::Editor).expect_err("too low");
        assert_eq!(
            low.message(),
            "this needs the editor role; the caller is a viewer"
        );
        let mut metadata = MetadataMap::new();
        metadata.insert("authorization", "Bearer c2m_abc".parse().expect("ascii"));
        let key = TokenKey::new(b"secret")
            .caller(&metadata)
            .expect_err("a key");
        assert_eq!(key.code(), tonic::Code::Unauthenticated);
        assert!(key.message().contains("API key"), "{}", key.message());
    }

    #[test]
    fn a_signed_token_verifies_and_a_tampered_one_does_not() {
        let key = TokenKey::new(b"secret");
        let token = key.sign(&claims(Role::Admin, Some("acme")));
        assert_eq!(
            key.verify(&token, SystemTime::now()),
            Ok(claims(Role::Admin, Some("acme")))
        );
        assert_eq!(
            TokenKey::new(b"other").verify(&token, SystemTime::now()),
            Err(TokenError::Signature)
        );
        // Swap in a payload that claims operator, keep the admin's signature.
        let parts: Vec<&str> = token.split('.').collect();
        let forged_payload =
            URL_SAFE_NO_PAD.encode(serde_json::to_vec(&claims(Role::Operator, None)).unwrap());
        let forged = format!("{}.{}.{}", parts[0], forged_payload, parts[2]);
        assert_eq!(
            key.verify(&forged, SystemTime::now()),
            Err(TokenError::Signature)
        );
        assert_eq!(
            key.verify("a.b", SystemTime::now()),
            Err(TokenError::Malformed)
        );
    }

    #[test]
    fn an_expired_token_is_refused() {
        let key = TokenKey::new(b"secret");
        let token = key.sign(&claims(Role::Viewer, Some("acme")));
        let later = SystemTime::now() + Duration::from_secs(61);
        assert_eq!(key.verify(&token, later), Err(TokenError::Expired));
    }

    #[test]
    fn roles_act_within_their_account_and_rank() {
        let admin = claims(Role::Admin, Some("acme"));
        assert!(admin.authorize("acme", Role::Editor).is_ok());
        assert!(admin.authorize("globex", Role::Viewer).is_err());
        let viewer = claims(Role::Viewer, Some("acme"));
        assert!(viewer.authorize("acme", Role::Viewer).is_ok());
        assert!(viewer.authorize("acme", Role::Editor).is_err());
        assert!(
            claims(Role::Operator, None)
                .authorize("globex", Role::Admin)
                .is_ok()
        );
        assert!(admin.require_internal().is_err());
        assert!(claims(Role::Service, None).require_internal().is_ok());
        assert!(
            claims(Role::Service, None)
                .authorize("acme", Role::Viewer)
                .is_ok()
        );
        assert!(
            claims(Role::Service, None)
                .authorize("acme", Role::Editor)
                .is_err()
        );
        // An agent answers conversations and reads nothing else.
        let agent = claims(Role::Agent, Some("acme"));
        assert!(agent.authorize("acme", Role::Viewer).is_err());
    }

    #[test]
    fn conversation_access_follows_role_account_and_skills() {
        let agent = Claims {
            skills: vec!["billing".into()],
            ..claims(Role::Agent, Some("acme"))
        };
        let access = agent.conversations("acme").expect("its own account");
        assert!(access.act && !access.supervise);
        assert!(access.sees("billing") && !access.sees("sales"));
        assert!(agent.conversations("globex").is_err());
        let unlimited = claims(Role::Agent, Some("acme")).conversations("acme");
        assert!(unlimited.expect("own account").sees("sales"));
        let viewer = claims(Role::Viewer, Some("acme")).conversations("acme");
        assert!(!viewer.expect("reads").act);
        let editor = claims(Role::Editor, Some("acme")).conversations("acme");
        assert!(editor.expect("acts").supervise);
        assert!(
            claims(Role::Admin, Some("acme"))
                .conversations("globex")
                .is_err()
        );
        assert!(
            claims(Role::Operator, None)
                .conversations("globex")
                .expect("all")
                .act
        );
        assert!(
            !claims(Role::Service, None)
                .conversations("acme")
                .expect("reads")
                .act
        );
    }
}
