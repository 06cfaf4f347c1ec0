//! What every provider adapter answers with: one send envelope for Twilio, Meta, RBM, FCM and
//! APNs, and one rule for a send that got no answer ([`SendOutcome::unanswered`]), so the
//! adapters cannot drift apart on it.

/// Why a provider (or c2m before calling it) would not take a message: the code and message
/// recorded on the attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub code: String,
    pub message: String,
}

impl Refusal {
    pub fn new(code: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            code: code.into(),
            message: message.into(),
        }
    }
}

impl From<Refusal> for SendOutcome {
    fn from(r: Refusal) -> Self {
        SendOutcome::Failed {
            code: r.code,
            message: r.message,
        }
    }
}

/// What a provider answered to a send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SendOutcome {
    /// Accepted: the message SID (`SM…`).
    Accepted { sid: String },
    /// Refused or unreachable: Twilio's error code (e.g. `21610`) and message.
    Failed { code: String, message: String },
    /// No answer: the request may have reached the provider, which may have taken the message
    /// (what went wrong, for the log). Its status callbacks name our message id, and tell.
    Unconfirmed { why: String },
}

impl SendOutcome {
    /// What a send that got no answer from `provider` comes to: refused when the connection was
    /// never made (nothing reached the provider), unconfirmed otherwise (a timeout, or a connection
    /// that broke once the request was on its way), since then the provider may have the message,
    /// and a send on the next channel could reach the consumer twice.
    pub fn unanswered(provider: &str, error: &reqwest::Error) -> Self {
        if error.is_connect() || error.is_builder() {
            SendOutcome::Failed {
                code: "unreachable".into(),
                message: format!("{provider} unreachable: {error}"),
            }
        } else {
            SendOutcome::Unconfirmed {
                why: format!("{provider} did not answer: {error}"),
            }
        }
    }
}
