//! The one place where errors become gRPC statuses: canonical codes, a message that says what went wrong, and
//! `ErrorInfo` / `BadRequest` / `RetryInfo` details (AIP-193).

use std::{collections::HashMap, time::Duration};

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

use crate::{
    check::{CheckError, bulk::JobError},
    grpc::convert::FieldViolation,
    query::QueryError,
    upstream,
};

/// The `ErrorInfo.domain` of every error this service raises.
pub const DOMAIN: &str = "capability-facade";

/// The most violations an answer lists: a status travels in HTTP/2 headers, which clients cap (a few KiB).
pub const LISTED_VIOLATIONS: usize = 10;

/// INVALID_ARGUMENT for a request that failed validation; the first [`LISTED_VIOLATIONS`] violations are listed,
/// and how many more there were.
pub fn invalid_request(mut violations: Vec<FieldViolation>) -> Status {
    let more = violations.len().saturating_sub(LISTED_VIOLATIONS);
    violations.truncate(LISTED_VIOLATIONS);
    let mut message = violations
        .iter()
        .map(|v| format!("{}: {}", v.field, v.description))
        .collect::<Vec<_>>()
        .join("; ");
    if more > 0 {
        message.push_str(&format!("; and {more} more"));
    }
    let mut details = ErrorDetails::new();
    for v in violations {
        details.add_bad_request_violation(v.field, v.description);
    }
    details.set_error_info("INVALID_REQUEST", DOMAIN, HashMap::new());
    Status::with_error_details(Code::InvalidArgument, format!("invalid request: {message}"), details)
}

/// A status with `code`, `message` and an `ErrorInfo` of `reason` (and `metadata`): every status this service
/// raises names its reason for a program, in any language.
fn with_reason(code: Code, message: impl Into<String>, reason: &str, metadata: &[(&str, String)]) -> Status {
    let metadata: HashMap<String, String> = metadata.iter().map(|(k, v)| ((*k).to_owned(), v.clone())).collect();
    let details = ErrorDetails::with_error_info(reason, DOMAIN, metadata);
    Status::with_error_details(code, message, details)
}

/// UNAVAILABLE for a watch cut by this replica's shutdown: the caller resumes elsewhere after `last_offset` (in
/// the message, and in the `ErrorInfo`'s metadata).
pub fn shutting_down(last_offset: u64) -> Status {
    let message = format!(
        "the server is shutting down; last_offset={last_offset}: watch again (on any replica) with \
         after_offset={last_offset}"
    );
    with_reason(
        Code::Unavailable,
        message,
        "SHUTTING_DOWN",
        &[("last_offset", last_offset.to_string())],
    )
}

/// ABORTED for a watch whose request left this replica while watched.
pub fn evicted(last_offset: u64) -> Status {
    let message = format!(
        "this request was evicted from the server (too many tracked requests, or it expired); \
         last_offset={last_offset}"
    );
    with_reason(
        Code::Aborted,
        message,
        "REQUEST_EVICTED",
        &[("last_offset", last_offset.to_string())],
    )
}

/// RESOURCE_EXHAUSTED for a watch beyond this replica's maximum.
pub fn too_many_watches(max: u64) -> Status {
    let message = format!(
        "this replica already serves {max} watches, its maximum (CAPABILITY_MAX_WATCHES); retry on another \
         replica or later"
    );
    with_reason(Code::ResourceExhausted, message, "TOO_MANY_WATCHES", &[])
}

/// RESOURCE_EXHAUSTED for a watch beyond what one connection may hold.
pub fn too_many_watches_on_connection(max: u64) -> Status {
    let message = format!(
        "this connection already holds {max} open watches, the most CAPABILITY_MAX_WATCHES_PER_CONNECTION allows; \
         close some or open another connection"
    );
    with_reason(Code::ResourceExhausted, message, "TOO_MANY_WATCHES_ON_CONNECTION", &[])
}

/// RESOURCE_EXHAUSTED for a watch beyond what one caller may hold.
pub fn too_many_watches_of_caller(max: u64) -> Status {
    let message = format!(
        "this caller already holds {max} open watches, the most CAPABILITY_MAX_WATCHES_PER_CALLER allows; close \
         some first"
    );
    with_reason(Code::ResourceExhausted, message, "TOO_MANY_WATCHES_OF_CALLER", &[])
}

/// UNAUTHENTICATED for a call without an accepted bearer token.
pub fn unauthenticated(presented: bool) -> Status {
    let message = if presented {
        "the bearer token is not one this service accepts"
    } else {
        "this service requires authorization: Bearer <token>"
    };
    with_reason(Code::Unauthenticated, message, "UNAUTHENTICATED", &[])
}

/// RESOURCE_EXHAUSTED for a call shed because this replica has too many in flight.
pub fn overloaded() -> Status {
    let mut details = ErrorDetails::new();
    details.set_retry_info(Some(Duration::from_millis(100)));
    details.set_error_info("OVERLOADED", DOMAIN, HashMap::new());
    Status::with_error_details(
        Code::ResourceExhausted,
        "this replica has too many queries in flight; retry shortly (another replica may answer)",
        details,
    )
}

impl From<QueryError> for Status {
    fn from(error: QueryError) -> Status {
        match error {
            QueryError::Conflict { .. } => {
                let details = ErrorDetails::with_error_info("REQUEST_ID_REUSED", DOMAIN, HashMap::new());
                Status::with_error_details(Code::AlreadyExists, error.to_string(), details)
            }
            QueryError::Upstream(e) => upstream_status(e),
        }
    }
}

impl From<CheckError> for Status {
    fn from(error: CheckError) -> Status {
        match error {
            CheckError::Query(e) => e.into(),
            CheckError::Cancelled => Status::cancelled(error.to_string()),
            CheckError::Overloaded => overloaded(),
            CheckError::NoLookupYet => Status::deadline_exceeded(error.to_string()),
            CheckError::ShuttingDown => with_reason(Code::Unavailable, error.to_string(), "SHUTTING_DOWN", &[]),
            CheckError::Unavailable(_) => {
                let mut details = ErrorDetails::new();
                details.set_retry_info(Some(Duration::from_secs(1)));
                details.set_error_info("CACHE_UNAVAILABLE", DOMAIN, HashMap::new());
                Status::with_error_details(Code::Unavailable, error.to_string(), details)
            }
        }
    }
}

impl From<JobError> for Status {
    fn from(error: JobError) -> Status {
        let (code, reason) = match &error {
            JobError::NotFound(_) => (Code::NotFound, "BULK_CHECK_NOT_FOUND"),
            JobError::Conflict(_) => (Code::AlreadyExists, "REQUEST_ID_REUSED"),
            JobError::TooMany => (Code::ResourceExhausted, "TOO_MANY_BULK_CHECKS"),
            JobError::Unavailable(_) => (Code::Unavailable, "JOB_STORE_UNAVAILABLE"),
            JobError::ShuttingDown => (Code::Unavailable, "SHUTTING_DOWN"),
        };
        let details = ErrorDetails::with_error_info(reason, DOMAIN, HashMap::new());
        Status::with_error_details(code, error.to_string(), details)
    }
}

/// RESOURCE_EXHAUSTED for a message larger than its method takes.
pub fn too_large(size: usize, max: usize) -> Status {
    let message = format!("the request message is {size} bytes, over this method's limit of {max} bytes");
    with_reason(Code::ResourceExhausted, message, "MESSAGE_TOO_LARGE", &[])
}

fn upstream_status(error: upstream::Error) -> Status {
    use upstream::Error as E;
    let message = error.to_string();
    let mut details = ErrorDetails::new();
    let (code, reason) = match &error {
        E::Api(api) => {
            let code = match api.http_status {
                400 | 422 => Code::InvalidArgument,
                404 => Code::NotFound,
                409 => Code::Aborted,
                429 => Code::ResourceExhausted,
                408 | 500..=599 => Code::Unavailable,
                _ => Code::FailedPrecondition,
            };
            // Sinch's wait when it gave one (a 429's, or a 5xx's that came past the deadline, not waited for),
            // and a second on a 429 without.
            let wait = match code {
                Code::ResourceExhausted => Some(api.retry_after.unwrap_or(Duration::from_secs(1))),
                _ => api.retry_after,
            };
            if let Some(wait) = wait {
                details.set_retry_info(Some(wait));
            }
            (code, "UPSTREAM_ERROR")
        }
        E::Credentials(_) => (Code::Internal, "UPSTREAM_CREDENTIALS_REJECTED"),
        // Not the caller's request and not our credentials: the Sinch account must be topped up first.
        E::Billing(_) => (Code::FailedPrecondition, "UPSTREAM_BILLING_REFUSED"),
        E::Connect(_) => (Code::Unavailable, "UPSTREAM_UNREACHABLE"),
        E::Malformed { .. } => (Code::Unavailable, "UPSTREAM_MALFORMED_RESPONSE"),
        E::DeadlineExceeded => (Code::DeadlineExceeded, "DEADLINE_EXCEEDED"),
        E::RateLimited { retry_after } => {
            details.set_retry_info(Some(*retry_after));
            (Code::ResourceExhausted, "RATE_LIMITED")
        }
    };
    let mut metadata = HashMap::new();
    if let E::Api(api) | E::Credentials(api) | E::Billing(api) = &error {
        metadata.insert("http_status".to_owned(), api.http_status.to_string());
        metadata.insert("sinch_status".to_owned(), api.status.clone());
        metadata.insert("sinch_message".to_owned(), api.message.clone());
    }
    details.set_error_info(reason, DOMAIN, metadata);
    let message = match code {
        Code::Internal => {
            format!("{message} (this service's Sinch credentials are misconfigured; not the caller's fault)")
        }
        _ => message,
    };
    Status::with_error_details(code, message, details)
}

/// A metrics label for a status code.
pub fn code_label(code: Code) -> &'static str {
    match code {
        Code::Ok => "ok",
        Code::Cancelled => "cancelled",
        Code::Unknown => "unknown",
        Code::InvalidArgument => "invalid_argument",
        Code::DeadlineExceeded => "deadline_exceeded",
        Code::NotFound => "not_found",
        Code::AlreadyExists => "already_exists",
        Code::PermissionDenied => "permission_denied",
        Code::ResourceExhausted => "resource_exhausted",
        Code::FailedPrecondition => "failed_precondition",
        Code::Aborted => "aborted",
        Code::OutOfRange => "out_of_range",
        Code::Unimplemented => "unimplemented",
        Code::Internal => "internal",
        Code::Unavailable => "unavailable",
        Code::DataLoss => "data_loss",
        Code::Unauthenticated => "unauthenticated",
    }
}
