//! What can go wrong talking to Sinch, as specific causes. Mapping them to gRPC codes happens in `grpc/`.

use std::time::Duration;

/// An error answer from Sinch, with what Sinch said about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    /// The HTTP status.
    pub http_status: u16,
    /// Sinch's status name (`INVALID_ARGUMENT`, `UNAUTHENTICATED`, …); empty when the body did not say.
    pub status: String,
    /// Sinch's message, or the start of a body that was not Sinch's error JSON.
    pub message: String,
    /// How long Sinch asked us to wait: the `Retry-After` header, else a `google.rpc.RetryInfo` in `details`.
    pub retry_after: Option<Duration>,
}

/// Why a query did not reach an answer. Its text is logged: Sinch's message shows with its digits masked (it may
/// echo the number it refused; the caller finds it whole in the status's `sinch_message`).
#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    /// Sinch answered with an error status (after retries, for retryable ones).
    #[error("Sinch answered {} {}: {}", .0.http_status, .0.status, crate::capability::mask_digits(&.0.message))]
    Api(ApiError),
    /// Sinch refused this service's own credentials (401/403 on the API or the token endpoint).
    #[error("Sinch refused this service's credentials ({} {}): {}", .0.http_status, .0.status, crate::capability::mask_digits(&.0.message))]
    Credentials(ApiError),
    /// Sinch refused the query for the account's billing (403 `BILLING_CREDIT_LIMIT_BREACHED`): the credentials
    /// are right, the account is out of credit.
    #[error("Sinch refused the query for billing ({} {}): {}", .0.http_status, .0.status, crate::capability::mask_digits(&.0.message))]
    Billing(ApiError),
    /// Sinch could not be reached (connect, TLS, reset), after retries.
    #[error("Sinch could not be reached: {0}")]
    Connect(String),
    /// Sinch answered, but not with the documented JSON.
    #[error("Sinch answered {status} with a body that is not the documented JSON: {detail}")]
    Malformed { status: u16, detail: String },
    /// The caller's deadline passed before Sinch answered.
    #[error("the deadline passed before Sinch answered")]
    DeadlineExceeded,
    /// This replica's own rate limit (`SINCH_RATE_LIMIT`) would hold the query past the caller's deadline.
    #[error("over this replica's rate limit towards Sinch; retry in {:?}", .retry_after)]
    RateLimited { retry_after: Duration },
}

impl From<tokio::task::JoinError> for Error {
    /// The task that talked to Sinch ended without an answer: it panicked, or the service is shutting down.
    fn from(e: tokio::task::JoinError) -> Error {
        let why = if e.is_panic() {
            "it panicked"
        } else {
            "the service is shutting down"
        };
        Error::Connect(format!("the call to Sinch ended without an answer: {why}"))
    }
}

impl Error {
    /// Whether sending the same request again may succeed: 408 (a proxy's timeout), 429, 500 to 504 (Sinch's
    /// error table says to retry 500, 501 and 503 with back-off) and connection errors.
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::Api(e) => matches!(e.http_status, 408 | 429 | 500..=504),
            Error::Connect(_) => true,
            _ => false,
        }
    }

    /// The wait Sinch asked for, if any.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Error::Api(e) => e.retry_after,
            Error::RateLimited { retry_after } => Some(*retry_after),
            _ => None,
        }
    }
}
