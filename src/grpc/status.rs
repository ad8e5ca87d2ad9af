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

/// UNAVAILABLE for a watch cut by this replica's shutdown: the caller resumes elsewhere after `last_offset`.
pub fn shutting_down(last_offset: u64) -> Status {
    Status::unavailable(format!(
        "the server is shutting down; last_offset={last_offset}: watch again (on any replica) with \
         after_offset={last_offset}"
    ))
}

/// ABORTED for a watch whose request left this replica while watched.
pub fn evicted(last_offset: u64) -> Status {
    Status::aborted(format!(
        "this request was evicted from the server (too many tracked requests, or it expired); \
         last_offset={last_offset}"
    ))
}

/// RESOURCE_EXHAUSTED for a watch beyond this replica's maximum.
pub fn too_many_watches(max: u64) -> Status {
    Status::resource_exhausted(format!(
        "this replica already serves {max} watches, its maximum (CAPABILITY_MAX_WATCHES); retry on another \
         replica or later"
    ))
}

/// UNAUTHENTICATED for a call without an accepted bearer token.
pub fn unauthenticated(presented: bool) -> Status {
    if presented {
        Status::unauthenticated("the bearer token is not one this service accepts")
    } else {
        Status::unauthenticated("this service requires authorization: Bearer <token>")
    }
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
            CheckError::ShuttingDown => Status::unavailable(error.to_string()),
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
        };
        let details = ErrorDetails::with_error_info(reason, DOMAIN, HashMap::new());
        Status::with_error_details(code, error.to_string(), details)
    }
}

/// RESOURCE_EXHAUSTED for a message larger than its method takes.
pub fn too_large(size: usize, max: usize) -> Status {
    Status::resource_exhausted(format!(
        "the request message is {size} bytes, over this method's limit of {max} bytes"
    ))
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
            if code == Code::ResourceExhausted {
                details.set_retry_info(Some(api.retry_after.unwrap_or(Duration::from_secs(1))));
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
