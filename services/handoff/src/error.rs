//! Everything a handoff can fail with, and the one mapping to a gRPC status (REST derives its
//! HTTP code from that status). Each refusal an IVR can act on carries a `google.rpc.ErrorInfo`
//! reason in the `c2m.dev` domain; bad input carries a `BadRequest` naming each field.

use std::{collections::HashMap, time::Duration};

use c2m_runtime::status::FieldViolations;
use c2m_storage::outbox::RelayError;
use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

/// Why a handoff (or an eligibility check) did not come to an answer.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The request is wrong: each field and why.
    #[error("{}", summary(.0))]
    Invalid(Vec<(String, String)>),
    /// The account turned deflection off.
    #[error("deflection is disabled for account {account_id}")]
    DeflectionDisabled { account_id: String },
    #[error("handoff {0} not found")]
    NotFound(String),
    /// The idempotency key was used for a handoff with other parameters.
    #[error(
        "idempotency_key: already used in the last 24 hours by handoff {handoff_id}: {differing} \
         from the first request"
    )]
    KeyReused {
        handoff_id: String,
        differing: String,
    },
    /// Over the account's handoffs per second until a slot frees.
    #[error("account {account_id} is over its limit of {limit} handoffs per second")]
    RateLimited {
        account_id: String,
        limit: u32,
        retry_after: Duration,
    },
    /// This replica runs as many handoffs as it may (`handoff.max_in_progress`); nothing was
    /// written or sent.
    #[error(
        "this Handoff replica is running its limit of {limit} handoffs at once \
         (handoff.max_in_progress); nothing was sent, retry shortly or keep the caller in the queue"
    )]
    Overloaded { limit: u32 },
    /// Another request with the same idempotency key is under way (its handoff, once known).
    #[error("{}", in_progress(.handoff_id))]
    InProgress {
        handoff_id: Option<String>,
        retry_after: Duration,
    },
    /// The handoff is written but not finished: the gateway could not say whether its message
    /// went. A retry with the same key finishes it.
    #[error(
        "handoff {handoff_id} is not finished: {} ({cause}); retry with the same idempotency key \
         to finish it (nothing is sent twice)",
        if *.at_provider { "its message is at the provider now" } else { "the channel gateway did not answer" }
    )]
    Unfinished {
        handoff_id: String,
        /// The message is at its provider (a sender at work), not a gateway away.
        at_provider: bool,
        cause: String,
    },
    /// A peer refused for a reason that is the caller's (an unknown configuration, a field it
    /// found wrong): its code and message are passed on.
    #[error("{message}")]
    Refused { code: Code, message: String },
    /// A peer did not answer: retryable.
    #[error("{0} unavailable, retry")]
    Unavailable(&'static str),
    /// A peer answered with something it should not have.
    #[error("{0}")]
    Internal(String),
    /// Handoff's own storage.
    #[error(transparent)]
    Store(#[from] sqlx::Error),
    /// The deflection relay to Routing, flushed before an Apple Messages check.
    #[error("Routing did not take the deflections waiting for it: {0}")]
    Relay(String),
}

fn summary(violations: &[(String, String)]) -> String {
    violations
        .iter()
        .map(|(field, why)| format!("{field}: {why}"))
        .collect::<Vec<_>>()
        .join("; ")
}

fn in_progress(handoff_id: &Option<String>) -> String {
    match handoff_id {
        Some(id) => format!("handoff {id} with this idempotency key is still in progress"),
        None => "a concurrent request with this idempotency key is in flight, retry".to_owned(),
    }
}

impl Error {
    /// One bad field.
    pub fn invalid(field: impl Into<String>, why: impl Into<String>) -> Self {
        Self::Invalid(vec![(field.into(), why.into())])
    }

    /// What a peer's refusal means for this request: the caller's mistakes keep their code and
    /// message, anything else is the peer being away.
    pub fn upstream(peer: &'static str, status: Status) -> Self {
        match status.code() {
            Code::NotFound
            | Code::InvalidArgument
            | Code::FailedPrecondition
            | Code::PermissionDenied => Self::Refused {
                code: status.code(),
                message: status.message().to_owned(),
            },
            _ => {
                tracing::warn!(%status, peer, "peer unavailable");
                Self::Unavailable(peer)
            }
        }
    }

    /// The stable, machine-readable reason an IVR can act on.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Invalid(_) => "INVALID_REQUEST",
            Self::DeflectionDisabled { .. } => "DEFLECTION_DISABLED",
            Self::NotFound(_) => "HANDOFF_NOT_FOUND",
            Self::KeyReused { .. } => "IDEMPOTENCY_KEY_REUSED",
            Self::RateLimited { .. } => "RATE_LIMITED",
            Self::Overloaded { .. } => "OVERLOADED",
            Self::InProgress { .. } => "HANDOFF_IN_PROGRESS",
            Self::Unfinished { .. } => "HANDOFF_UNFINISHED",
            Self::Refused { .. } => "REFUSED_UPSTREAM",
            Self::Unavailable(_) | Self::Relay(_) => "UPSTREAM_UNAVAILABLE",
            Self::Internal(_) => "INTERNAL",
            Self::Store(_) => "STORAGE",
        }
    }
}

impl From<FieldViolations> for Error {
    fn from(violations: FieldViolations) -> Self {
        Self::Invalid(violations.into_pairs())
    }
}

impl From<RelayError> for Error {
    fn from(error: RelayError) -> Self {
        match error {
            RelayError::Db(error) => Self::Store(error),
            RelayError::Decode(error) => {
                tracing::error!(%error, "deflection outbox holds an undecodable row");
                Self::Internal("a deflection waiting for Routing cannot be read".to_owned())
            }
            RelayError::Refused(status) => Self::Relay(status.message().to_owned()),
        }
    }
}

/// `code` with an ErrorInfo of `reason` and `metadata`, and a RetryInfo when given.
fn detailed(
    code: Code,
    message: String,
    reason: &str,
    metadata: &[(&str, &str)],
    retry_after: Option<Duration>,
) -> Status {
    let mut details = ErrorDetails::new();
    details.set_error_info(
        reason,
        "c2m.dev",
        metadata
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect::<HashMap<_, _>>(),
    );
    if let Some(delay) = retry_after {
        details.set_retry_info(Some(delay));
    }
    Status::with_error_details(code, message, details)
}

impl From<Error> for Status {
    fn from(error: Error) -> Self {
        let message = error.to_string();
        let reason = error.reason();
        match error {
            Error::Invalid(violations) => {
                let mut all = FieldViolations::new();
                for (field, why) in violations {
                    all.add(field, why);
                }
                all.into_result()
                    .err()
                    .unwrap_or_else(|| Status::invalid_argument(message))
            }
            Error::KeyReused { handoff_id, .. } => {
                let mut details = ErrorDetails::new();
                details.add_bad_request_violation(
                    "idempotency_key",
                    message.trim_start_matches("idempotency_key: "),
                );
                details.set_error_info(
                    reason,
                    "c2m.dev",
                    HashMap::from([("handoff_id".to_owned(), handoff_id)]),
                );
                Status::with_error_details(Code::InvalidArgument, message, details)
            }
            Error::DeflectionDisabled { account_id } => detailed(
                Code::FailedPrecondition,
                message,
                reason,
                &[("account_id", &account_id)],
                None,
            ),
            Error::NotFound(handoff_id) => detailed(
                Code::NotFound,
                message,
                reason,
                &[("handoff_id", &handoff_id)],
                None,
            ),
            Error::RateLimited {
                account_id,
                limit,
                retry_after,
            } => detailed(
                Code::ResourceExhausted,
                message,
                reason,
                &[("account_id", &account_id), ("limit", &limit.to_string())],
                Some(retry_after),
            ),
            Error::Overloaded { limit } => detailed(
                Code::ResourceExhausted,
                message,
                reason,
                &[("max_in_progress", &limit.to_string())],
                Some(Duration::from_secs(1)),
            ),
            Error::InProgress {
                handoff_id,
                retry_after,
            } => detailed(
                Code::Aborted,
                message,
                reason,
                &[("handoff_id", handoff_id.as_deref().unwrap_or(""))],
                Some(retry_after),
            ),
            Error::Unfinished {
                handoff_id,
                at_provider,
                ..
            } => detailed(
                // A message at its provider is a sender at work, not a service away.
                if at_provider {
                    Code::Aborted
                } else {
                    Code::Unavailable
                },
                message,
                reason,
                &[("handoff_id", &handoff_id)],
                Some(Duration::from_secs(1)),
            ),
            Error::Refused { code, .. } => Status::new(code, message),
            Error::Unavailable(_) | Error::Relay(_) => Status::unavailable(message),
            Error::Internal(_) => Status::internal(message),
            Error::Store(error) => c2m_storage::postgres::db_status("handoff", error),
        }
    }
}
