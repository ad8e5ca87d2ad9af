//! The Sinch client: sends `capability:query` with credentials, this replica's rate limit, and retries bounded by
//! the caller's deadline.

mod apps;
mod auth;
mod error;
pub mod wire;

use std::{sync::Arc, time::Duration};

use bytes::Bytes;
use governor::{DefaultDirectRateLimiter, Quota, clock::Clock};
use rand::Rng;
use reqwest::header::{ACCEPT, CONTENT_TYPE, HeaderMap, RETRY_AFTER, WWW_AUTHENTICATE};
use tokio::time::Instant;

pub use auth::TokenRetry;
pub use error::{ApiError, Error};

use crate::{
    capability::{Query, QueryAccepted, mask_digits},
    config::SinchConfig,
};
use auth::Auth;
use wire::{ErrorJson, QueryJson, RecipientJson};

/// How retryable failures are retried: jittered exponential back-off, at most `max_attempts` sends in all, never
/// past the caller's deadline.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    pub max_attempts: u32,
    pub base: Duration,
    pub cap: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 5,
            base: Duration::from_millis(50),
            cap: Duration::from_secs(2),
        }
    }
}

impl RetryPolicy {
    /// The pause before send number `attempt + 1` (`attempt` ≥ 1): half of `base·2^(attempt-1)` (capped), plus a
    /// random part of the other half, so that replicas retrying together spread out.
    fn backoff(&self, attempt: u32) -> Duration {
        let exp = self.base.saturating_mul(1 << (attempt - 1).min(16)).min(self.cap);
        let half = exp / 2;
        half + half.mul_f64(rand::rng().random::<f64>())
    }
}

/// A client of one Sinch project. Cheap to share: one connection pool, one token, one rate limiter.
pub struct SinchClient {
    http: reqwest::Client,
    /// `{api_url}/v1/projects/{project}/capability:query`, parsed once (parsing it per call showed in profiles).
    query_url: reqwest::Url,
    /// `{api_url}/v1/projects/{project}`, the root of the Webhooks and Apps APIs.
    project_url: reqwest::Url,
    auth: Auth,
    /// At most `SINCH_RATE_LIMIT` sends per second leave this replica, retries included.
    limiter: DefaultDirectRateLimiter,
    retry: RetryPolicy,
}

/// How one send ended.
enum Attempt {
    Done(QueryAccepted),
    /// Sinch refused our token: it is dropped whatever the words, and the query sent once more when they say
    /// it expired (any other 401 says the credentials are wrong, which a new token may not mend).
    TokenRefused {
        used: Arc<reqwest::header::HeaderValue>,
        error: Error,
        expired: bool,
    },
    /// No token could be had, after the token endpoint's own retries: not retried again here.
    NoToken(Error),
    Failed(Error),
}

/// Why a client cannot be built from its configuration.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BuildError {
    #[error("the HTTP client cannot be built: {0}")]
    Http(String),
    #[error("the key id or secret cannot be sent in an HTTP header")]
    Credentials,
    #[error("the project id does not make a valid URL with the API URL: {0}")]
    Url(String),
}

/// How this service names itself to Sinch (and to the targets the doctor posts a test callback to).
const USER_AGENT: &str = concat!("capability-facade/", env!("CARGO_PKG_VERSION"));
/// How long a connection to Sinch (or a test callback's target) may take to open.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

impl SinchClient {
    /// `retry` paces retried queries; `token_retry` paces retried token requests (Sinch's token endpoint is a
    /// token bucket that wants a slower back-off than queries).
    pub fn new(config: &SinchConfig, retry: RetryPolicy, token_retry: TokenRetry) -> Result<SinchClient, BuildError> {
        install_crypto_provider();
        let http = reqwest::Client::builder()
            .user_agent(USER_AGENT)
            .connect_timeout(CONNECT_TIMEOUT)
            .pool_idle_timeout(Duration::from_secs(90))
            .pool_max_idle_per_host(256)
            .tcp_nodelay(true)
            .build()
            .map_err(|e| BuildError::Http(e.to_string()))?;
        let auth = Auth::new(config, token_retry).map_err(|_| BuildError::Credentials)?;
        let query_url = format!("{}/v1/projects/{}/capability:query", config.api_url, config.project_id);
        let query_url = reqwest::Url::parse(&query_url).map_err(|e| BuildError::Url(e.to_string()))?;
        let project_url = format!("{}/v1/projects/{}", config.api_url, config.project_id);
        let project_url = reqwest::Url::parse(&project_url).map_err(|e| BuildError::Url(e.to_string()))?;
        Ok(SinchClient {
            http,
            query_url,
            project_url,
            auth,
            limiter: DefaultDirectRateLimiter::direct(Quota::per_second(config.rate_limit)),
            retry,
        })
    }

    /// Sends `query` to Sinch, retrying what may succeed on a second try, and gives up at `deadline`, except that
    /// an attempt sent by then may wait for Sinch's answer until `answer_by` (from `deadline` on, no attempt
    /// starts). The caller has [`admit`](Self::admit)ted the first send; each retry is admitted here.
    /// `traceparent`, when given, is sent with every attempt (W3C trace context).
    pub async fn query(
        &self,
        query: &Query,
        deadline: Instant,
        answer_by: Instant,
        traceparent: Option<&str>,
    ) -> Result<QueryAccepted, Error> {
        let body = Bytes::from(serde_json::to_vec(&QueryJson::from(query)).expect("query JSON always serialises"));
        let mut attempt = 0;
        let mut token_retried = false;
        // What Sinch answered the last attempt, when it is retried: told rather than this replica's rate limit,
        // should the retry not be admitted in time (the cause is Sinch's answer), with the limit's wait (Sinch's
        // own was waited already).
        let mut retried: Option<Error> = None;
        loop {
            // No attempt starts from the deadline on (the one sent by then may be answered until `answer_by`).
            if Instant::now() >= deadline {
                return Err(Error::DeadlineExceeded);
            }
            // The caller admitted the first send; a retry, or a resend with a new token, is admitted here.
            if (attempt > 0 || token_retried)
                && let Err(limited) = self.admit(deadline).await
            {
                return Err(match (retried.take(), limited) {
                    (Some(Error::Api(api)), Error::RateLimited { retry_after }) => Error::Api(ApiError {
                        retry_after: Some(retry_after),
                        ..api
                    }),
                    (Some(error), _) => error,
                    (None, limited) => limited,
                });
            }
            attempt += 1;
            // The token is waited for until `deadline` at most (`send` gives up then).
            let outcome = self.send(query, body.clone(), traceparent, deadline);
            let outcome = tokio::time::timeout_at(answer_by.max(deadline), outcome)
                .await
                .map_err(|_| Error::DeadlineExceeded)?;
            let error = match outcome {
                Attempt::Done(accepted) => return Ok(accepted),
                Attempt::TokenRefused { used, error, expired } => {
                    self.auth.expired(&used);
                    if !expired || token_retried {
                        return Err(error);
                    }
                    token_retried = true;
                    // Sinch's last answer is not why the resend waits.
                    retried = None;
                    // Not counted as an attempt, but sent as any: under the rate limit.
                    attempt -= 1;
                    continue;
                }
                Attempt::NoToken(error) => return Err(error),
                Attempt::Failed(error) => error,
            };
            if !error.is_retryable() || !self.pause_before_retry(&error, attempt, deadline).await {
                return Err(error);
            }
            retried = Some(error);
            metrics::counter!("capability_upstream_retries_total").increment(1);
        }
    }

    /// Waits before try `attempt + 1` after `error` (Sinch's `Retry-After`, else the back-off); false, at once,
    /// when no try is left or the wait would pass `deadline`.
    async fn pause_before_retry(&self, error: &Error, attempt: u32, deadline: Instant) -> bool {
        if attempt >= self.retry.max_attempts {
            return false;
        }
        let pause = error.retry_after().unwrap_or_else(|| self.retry.backoff(attempt));
        if Instant::now() + pause >= deadline {
            return false;
        }
        tracing::debug!(attempt, ?pause, error = %error, "retrying a call to Sinch");
        tokio::time::sleep(pause).await;
        true
    }

    /// Whether this replica's rate limit admits one more send now (then it counts as sent), without waiting.
    pub fn admits_now(&self) -> bool {
        self.limiter.check().is_ok()
    }

    /// Waits for this replica's rate limit to admit one more send, or fails at once if that wait would pass the
    /// deadline.
    pub async fn admit(&self, deadline: Instant) -> Result<(), Error> {
        loop {
            let Err(not_until) = self.limiter.check() else {
                return Ok(());
            };
            let wait = not_until.wait_time_from(governor::clock::DefaultClock::default().now());
            if Instant::now() + wait > deadline {
                return Err(Error::RateLimited { retry_after: wait });
            }
            tokio::time::sleep(wait).await;
        }
    }

    async fn send(&self, query: &Query, body: Bytes, traceparent: Option<&str>, deadline: Instant) -> Attempt {
        let auth = match self.auth.header(&self.http, deadline).await {
            Ok(auth) => auth,
            Err(e) => return Attempt::NoToken(e),
        };
        let mut request = self
            .http
            .post(self.query_url.clone())
            .header(reqwest::header::AUTHORIZATION, auth.as_ref().clone())
            .header(CONTENT_TYPE, "application/json")
            .header(ACCEPT, "application/json")
            .body(body);
        if let Some(traceparent) = traceparent {
            request = request.header("traceparent", traceparent);
        }
        let started = Instant::now();
        let response = match request.send().await {
            Ok(r) => r,
            Err(e) => {
                metrics::histogram!("capability_upstream_request_duration_seconds", "status" => "error")
                    .record(started.elapsed());
                return Attempt::Failed(Error::Connect(error_chain(&e)));
            }
        };
        let status = response.status().as_u16();
        metrics::histogram!("capability_upstream_request_duration_seconds", "status" => status_label(status))
            .record(started.elapsed());
        let headers = response.headers().clone();
        let body = match read_capped(response, MAX_ANSWER).await {
            Ok(b) => b,
            // Accepted, under the request_id sent as far as anyone can tell: sending it again would be a second
            // query to Sinch, which does not tell repeats apart.
            Err(e) if status == 200 => {
                tracing::warn!(request_id = %mask_digits(&query.request_id), error = %e,
                    "Sinch accepted the query but its answer broke off; taking it as accepted under the request_id sent");
                return Attempt::Done(QueryAccepted {
                    app_id: query.app_id.clone(),
                    recipient: query.recipient.clone(),
                    request_id: query.request_id.clone(),
                });
            }
            // Refused: the status says whether a retry may pass.
            Err(_) => Bytes::new(),
        };
        if status == 200 {
            return match accepted(query, &body) {
                Ok(answer) => Attempt::Done(answer),
                Err(detail) => Attempt::Failed(Error::Malformed { status, detail }),
            };
        }
        let error = classify(status, &body, retry_after(&headers), false);
        if status != 401 || !matches!(self.auth, Auth::OAuth2(_)) {
            return Attempt::Failed(error);
        }
        let expired = headers
            .get(WWW_AUTHENTICATE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.to_ascii_lowercase().contains("expired"));
        Attempt::TokenRefused {
            used: auth,
            error,
            expired,
        }
    }
}

/// The most an answer of Sinch's may hold: a query's is a few hundred bytes, a list of webhooks a few KiB.
const MAX_ANSWER: usize = 1024 * 1024;

/// Reads an answer's body, or says why not: it broke off, or it is longer than `max` bytes.
async fn read_capped(mut response: reqwest::Response, max: usize) -> Result<Bytes, String> {
    let too_long = || format!("the answer is longer than {max} bytes");
    if response.content_length().is_some_and(|length| length > max as u64) {
        return Err(too_long());
    }
    let mut body = bytes::BytesMut::new();
    while let Some(chunk) = response.chunk().await.map_err(|e| error_chain(&e))? {
        if body.len() + chunk.len() > max {
            return Err(too_long());
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body.freeze())
}

/// reqwest is built without a default TLS provider so that ring is used: install it (once per process) before
/// building any client.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Reads Sinch's 200 as the SDKs do, every field optional but `request_id`: Sinch accepted the query whatever
/// else the body says, so a missing or unreadable `app_id` or `recipient` is taken from what was sent.
fn accepted(sent: &Query, body: &[u8]) -> Result<QueryAccepted, String> {
    let mut answer: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| format!("{e} (body starts {:?})", preview(body)))?;
    let recipient = answer
        .get_mut("recipient")
        .map(serde_json::Value::take)
        .and_then(|r| serde_json::from_value::<RecipientJson>(r).ok())
        .map_or_else(|| sent.recipient.clone(), Into::into);
    let request_id = answer
        .get("request_id")
        .and_then(serde_json::Value::as_str)
        .filter(|id| !id.is_empty())
        .ok_or_else(|| format!("the answer has no request_id (body starts {:?})", preview(body)))?;
    let app_id = answer
        .get("app_id")
        .and_then(serde_json::Value::as_str)
        .filter(|id| !id.is_empty())
        .unwrap_or(&sent.app_id);
    Ok(QueryAccepted {
        app_id: app_id.to_owned(),
        recipient,
        request_id: request_id.to_owned(),
    })
}

/// The reason Sinch gives when an account is out of credit.
const BILLING_REFUSAL: &str = "BILLING_CREDIT_LIMIT_BREACHED";

/// Turns an error answer into an [`Error`]. 401 and 403 mean our credentials, except a 403 for billing; so does
/// any refusal of the token endpoint but 408, 429 and 5xx (OAuth2 reports `invalid_client` as a 400; a 404 is a wrong
/// `SINCH_AUTH_URL`, ours to fix, not a caller's NOT_FOUND). The wait asked for is the
/// `Retry-After` header, else a `RetryInfo` in the body's `details`.
fn classify(status: u16, body: &[u8], retry_after: Option<Duration>, token_endpoint: bool) -> Error {
    let (sinch_status, message, details) = match serde_json::from_slice::<ErrorJson>(body) {
        Ok(e) => (e.error.status, e.error.message, e.error.details),
        Err(_) => match serde_json::from_slice::<serde_json::Value>(body) {
            // OAuth2 style: {"error": "invalid_client", "error_description": "…"}
            Ok(v) if v.get("error").is_some_and(serde_json::Value::is_string) => (
                v["error"].as_str().unwrap_or_default().to_owned(),
                v.get("error_description")
                    .and_then(|d| d.as_str())
                    .unwrap_or_default()
                    .to_owned(),
                Vec::new(),
            ),
            _ => (String::new(), format!("body starts {:?}", preview(body)), Vec::new()),
        },
    };
    let billing = sinch_status == BILLING_REFUSAL
        || message.contains(BILLING_REFUSAL)
        || details
            .iter()
            .any(|d| d.get("reason").and_then(serde_json::Value::as_str) == Some(BILLING_REFUSAL));
    let (sinch_status, message) = (bounded(sinch_status), bounded(message));
    let api = ApiError {
        http_status: status,
        status: sinch_status,
        message,
        retry_after: retry_after.or_else(|| wire::retry_info(&details)),
    };
    match status {
        403 if billing => Error::Billing(api),
        401 | 403 => Error::Credentials(api),
        408 | 429 | 500..=599 => Error::Api(api),
        _ if token_endpoint => Error::Credentials(api),
        _ => Error::Api(api),
    }
}

/// A bounded label for an HTTP status.
fn status_label(status: u16) -> &'static str {
    match status {
        200 => "200",
        400 => "400",
        401 => "401",
        403 => "403",
        404 => "404",
        429 => "429",
        402 | 405..=428 | 430..=499 => "4xx",
        500..=599 => "5xx",
        _ => "other",
    }
}

/// `Retry-After` in seconds (what Sinch sends) or as an HTTP date (one past, or now, says nothing: the back-off and
/// its jitter apply, not a retry at once by every replica); an hour at most.
fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    const LONGEST: Duration = Duration::from_secs(3600);
    let value = headers.get(RETRY_AFTER)?.to_str().ok()?.trim();
    let wait = match value.parse::<f64>() {
        Ok(seconds) if seconds.is_finite() && seconds >= 0.0 => {
            Duration::from_secs_f64(seconds.min(LONGEST.as_secs_f64()))
        }
        Ok(_) => return None,
        Err(_) => httpdate::parse_http_date(value)
            .ok()?
            .duration_since(std::time::SystemTime::now())
            .ok()
            .filter(|wait| !wait.is_zero())?,
    };
    Some(wait.min(LONGEST))
}

/// The most of Sinch's words (an error's status or message) passed on: a caller gets them in a status, whose
/// trailers gRPC clients take only up to a few KiB.
const MOST_WORDS: usize = 512;

/// `text`, cut to [`MOST_WORDS`] bytes (at a character's boundary, marked with "…") when longer.
fn bounded(mut text: String) -> String {
    if text.len() > MOST_WORDS {
        let cut = (0..=MOST_WORDS).rev().find(|&i| text.is_char_boundary(i)).unwrap_or(0);
        text.truncate(cut);
        text.push('…');
    }
    text
}

/// The start of a body, for an error that is logged: its digits masked (Sinch may echo the recipient's number).
fn preview(body: &[u8]) -> String {
    mask_digits(&String::from_utf8_lossy(&body[..body.len().min(120)])).into_owned()
}

/// An error and its causes on one line: reqwest's own message rarely says what failed.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sinchs_long_words_are_cut_between_characters() {
        let short = "Invalid value for channel".to_owned();
        assert_eq!(bounded(short.clone()), short);
        // Three bytes a character: the bound falls inside one.
        let cut = bounded("€".repeat(300));
        assert_eq!(cut, format!("{}…", "€".repeat(MOST_WORDS / 3)));
    }

    #[test]
    fn retry_after_is_read_in_seconds_or_as_an_http_date() {
        let read = |value: &str| {
            let mut headers = HeaderMap::new();
            headers.insert(RETRY_AFTER, value.parse().unwrap());
            retry_after(&headers)
        };
        let date_in = |seconds| httpdate::fmt_http_date(std::time::SystemTime::now() + Duration::from_secs(seconds));
        assert_eq!(read("2"), Some(Duration::from_secs(2)));
        assert_eq!(read(" 0.5 "), Some(Duration::from_millis(500)));
        assert_eq!(read("Wed, 21 Oct 2015 07:28:00 GMT"), None, "a date past");
        let ahead = read(&date_in(120)).unwrap();
        assert!(
            ahead > Duration::from_secs(100) && ahead <= Duration::from_secs(120),
            "{ahead:?}"
        );
        assert_eq!(
            read(&date_in(86_400)),
            Some(Duration::from_secs(3600)),
            "an hour at most"
        );
        assert_eq!(read("1e9"), Some(Duration::from_secs(3600)), "an hour at most");
        assert_eq!(read("-1"), None);
        assert_eq!(read("soon"), None);
    }

    #[test]
    fn backoff_grows_and_stays_within_its_cap() {
        let policy = RetryPolicy::default();
        for attempt in 1..20 {
            let exp = policy.base.saturating_mul(1 << (attempt - 1).min(16)).min(policy.cap);
            let pause = policy.backoff(attempt);
            assert!(pause >= exp / 2 && pause <= exp, "attempt {attempt}: {pause:?}");
        }
    }

    #[test]
    fn a_200_needs_only_a_request_id() {
        let sent = Query {
            app_id: "APP".into(),
            recipient: crate::capability::Recipient::ContactId("C1".into()),
            request_id: "R1".into(),
        };
        let answer = accepted(&sent, br#"{"request_id":"R1"}"#).unwrap();
        assert_eq!((answer.app_id.as_str(), &answer.recipient), ("APP", &sent.recipient));
        let extra = br#"{"app_id":"APP","recipient":{"contact_id":"C1","extra":1},"request_id":"OTHER","x":2}"#;
        let answer = accepted(&sent, extra).unwrap();
        assert_eq!(
            (answer.request_id.as_str(), &answer.recipient),
            ("OTHER", &sent.recipient)
        );
        let echoed = accepted(&sent, br#"{"recipient":{"contact_id":"C2"},"request_id":"R1"}"#).unwrap();
        assert_eq!(
            echoed.recipient,
            crate::capability::Recipient::ContactId("C2".into()),
            "the recipient Sinch echoes, when it reads"
        );
        assert!(
            accepted(&sent, br#"{"app_id":"APP"}"#)
                .unwrap_err()
                .contains("no request_id")
        );
        assert!(accepted(&sent, b"<html>").is_err());
        let unreadable = accepted(
            &sent,
            br#"{"recipient":{"identified_by":{"channel_identities":[{"identity":"46712345678"}]}}}"#,
        );
        let logged = unreadable.unwrap_err();
        assert!(!logged.contains("46712345678"), "the error is logged: {logged}");
    }

    #[test]
    fn errors_are_classified_from_sinch_bodies_and_oauth_bodies() {
        let sinch = br#"{"error":{"code":400,"message":"Invalid argument","status":"INVALID_ARGUMENT","details":[]}}"#;
        let Error::Api(e) = classify(400, sinch, None, false) else {
            panic!()
        };
        assert_eq!(
            (e.status.as_str(), e.message.as_str()),
            ("INVALID_ARGUMENT", "Invalid argument")
        );
        let oauth = br#"{"error":"invalid_client","error_description":"bad key"}"#;
        assert!(matches!(classify(400, oauth, None, true), Error::Credentials(e) if e.status == "invalid_client"));
        assert!(matches!(classify(403, b"<html>", None, false), Error::Credentials(_)));
        // A token endpoint that is not there (a wrong SINCH_AUTH_URL) is ours to fix, not a caller's NOT_FOUND.
        assert!(matches!(classify(404, b"<html>", None, true), Error::Credentials(_)));
        assert!(classify(503, b"", None, true).is_retryable());
        assert!(
            classify(408, b"", None, true).is_retryable(),
            "a timeout is not a refusal: tried again"
        );
        let billing = br#"{"error":{"code":403,"message":"Forbidden","status":"PERMISSION_DENIED","details":[
            {"@type":"type.googleapis.com/google.rpc.ErrorInfo","reason":"BILLING_CREDIT_LIMIT_BREACHED"}]}}"#;
        assert!(matches!(classify(403, billing, None, false), Error::Billing(_)));
        // Told late in a long message: seen before the message is cut.
        let late = format!(
            r#"{{"error":{{"code":403,"message":"{} BILLING_CREDIT_LIMIT_BREACHED","status":"PERMISSION_DENIED"}}}}"#,
            "x".repeat(MOST_WORDS)
        );
        assert!(matches!(classify(403, late.as_bytes(), None, false), Error::Billing(_)));
        assert!(classify(503, b"<html>", None, false).is_retryable());
        assert!(classify(501, b"", None, false).is_retryable());
        let throttled = br#"{"error":{"code":429,"message":"slow","status":"RESOURCE_EXHAUSTED","details":[
            {"@type":"type.googleapis.com/google.rpc.RetryInfo","retryDelay":"3s"}]}}"#;
        assert_eq!(
            classify(429, throttled, None, false).retry_after(),
            Some(Duration::from_secs(3))
        );
        let header_first = Some(Duration::from_secs(1));
        assert_eq!(
            classify(429, throttled, header_first, false).retry_after(),
            header_first
        );
        assert!(!classify(404, b"", None, false).is_retryable());
    }
}
