//! Building precise gRPC errors: INVALID_ARGUMENT with a `google.rpc.BadRequest` naming each field,
//! RESOURCE_EXHAUSTED with `RetryInfo`.

use std::time::Duration;

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

/// Collects field violations; `into_result` is `Ok` when there are none.
#[derive(Debug, Default)]
pub struct FieldViolations {
    violations: Vec<(String, String)>,
}

impl FieldViolations {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn add(&mut self, field: impl Into<String>, description: impl Into<String>) {
        self.violations.push((field.into(), description.into()));
    }

    pub fn is_empty(&self) -> bool {
        self.violations.is_empty()
    }

    /// Each field and why, for a service's own error type.
    pub fn into_pairs(self) -> Vec<(String, String)> {
        self.violations
    }

    pub fn into_result(self) -> Result<(), Status> {
        if self.violations.is_empty() {
            return Ok(());
        }
        let summary = self
            .violations
            .iter()
            .map(|(field, why)| format!("{field}: {why}"))
            .collect::<Vec<_>>()
            .join("; ");
        let mut details = ErrorDetails::new();
        for (field, description) in self.violations {
            details.add_bad_request_violation(field, description);
        }
        Err(Status::with_error_details(
            Code::InvalidArgument,
            summary,
            details,
        ))
    }
}

/// The most media URLs one message carries, and the longest one.
pub const MAX_MEDIA_URLS: usize = 10;
pub const MAX_MEDIA_URL: usize = 2048;

/// Checks a message's media URLs (`field`): at most [`MAX_MEDIA_URLS`], each an https URL of at
/// most [`MAX_MEDIA_URL`] characters, which the provider fetches.
pub fn media_urls(violations: &mut FieldViolations, field: &str, urls: &[String]) {
    if urls.len() > MAX_MEDIA_URLS {
        violations.add(field, format!("at most {MAX_MEDIA_URLS}"));
    }
    for (i, url) in urls.iter().enumerate() {
        let https = url
            .strip_prefix("https://")
            .is_some_and(|rest| !rest.is_empty() && !rest.contains(char::is_whitespace));
        if !https || url.len() > MAX_MEDIA_URL {
            violations.add(
                format!("{field}[{i}]"),
                format!("an https URL of at most {MAX_MEDIA_URL} characters"),
            );
        }
    }
}

/// INVALID_ARGUMENT for one field.
pub fn invalid_field(field: impl Into<String>, description: impl Into<String>) -> Status {
    let mut violations = FieldViolations::new();
    violations.add(field, description);
    violations
        .into_result()
        .expect_err("one violation was added")
}

/// RESOURCE_EXHAUSTED telling the caller when to retry.
pub fn rate_limited(message: impl Into<String>, retry_after: Duration) -> Status {
    let mut details = ErrorDetails::new();
    details.set_retry_info(Some(retry_after));
    Status::with_error_details(Code::ResourceExhausted, message, details)
}

/// ABORTED (a concurrency conflict) telling the caller when to retry.
pub fn aborted_retry(message: impl Into<String>, retry_after: Duration) -> Status {
    let mut details = ErrorDetails::new();
    details.set_retry_info(Some(retry_after));
    Status::with_error_details(Code::Aborted, message, details)
}

/// `code` with a `google.rpc.ErrorInfo`: a machine-readable `reason` (UPPER_SNAKE_CASE) in the
/// `c2m.dev` domain and the values it concerns, for clients that act on errors without parsing
/// messages.
pub fn with_reason<'a>(
    code: Code,
    message: impl Into<String>,
    reason: &str,
    metadata: impl IntoIterator<Item = (&'a str, String)>,
) -> Status {
    let mut details = ErrorDetails::new();
    details.set_error_info(
        reason,
        "c2m.dev",
        metadata
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v))
            .collect::<std::collections::HashMap<_, _>>(),
    );
    Status::with_error_details(code, message, details)
}
