//! Credentials on every call: HTTP Basic, or an OAuth2 bearer token shared by all calls and refreshed before it
//! expires by a single refresh in a task of its own. The token endpoint is a token bucket (Sinch: capacity 30,
//! refill 10/s, 429 without `Retry-After`), so a refresh that is refused is retried with a back-off of its own,
//! as Sinch's SDKs do, and callers that waited on a refresh that failed get its failure instead of asking again.
//! No caller's deadline bounds a refresh (each request to the endpoint has its own timeout): a caller that gives
//! up leaves the refresh running for the next, and a token still valid is used while its successor is fetched.

use std::{
    sync::{Arc, Mutex, RwLock},
    time::Duration,
};

use futures::{
    FutureExt,
    future::{BoxFuture, Shared},
};
use rand::Rng;
use reqwest::header::{HeaderValue, InvalidHeaderValue};
use tokio::time::Instant;

use super::{Error, classify, read_capped, wire::TokenJson};
use crate::config::{AuthMode, SinchConfig};

/// The longest a token is used before its end: Sinch's SDKs refresh 60 s before expiry.
const REFRESH_MARGIN: Duration = Duration::from_secs(60);
/// The range a token's `expires_in` is clamped to: 0 would refresh on every call, a huge value overflows.
const MIN_LIFETIME: Duration = Duration::from_secs(10);
const MAX_LIFETIME: Duration = Duration::from_secs(24 * 3600);
/// How long one request to the token endpoint may take, its answer read.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// The most a token endpoint's answer may hold.
const MAX_ANSWER: usize = 64 * 1024;

/// How a refused token request is retried: at most `tries` requests in all, the pause before request `n + 1`
/// drawn uniformly from `[0, base·4^(n-1))` (full jitter; a `Retry-After` below that bound is kept). Sinch's SDKs use 3 tries from 1 s. After a refresh
/// that failed while the token was still valid, the next waits `base·4^(tries-1)`.
#[derive(Debug, Clone, Copy)]
pub struct TokenRetry {
    pub tries: u32,
    pub base: Duration,
}

impl Default for TokenRetry {
    fn default() -> Self {
        TokenRetry {
            tries: 3,
            base: Duration::from_secs(1),
        }
    }
}

impl TokenRetry {
    fn ceiling(&self, attempt: u32) -> Duration {
        self.base.saturating_mul(4u32.saturating_pow(attempt.saturating_sub(1)))
    }

    fn pause(&self, attempt: u32) -> Duration {
        self.ceiling(attempt).mul_f64(rand::rng().random::<f64>())
    }
}

/// Produces the `Authorization` header of each API call.
pub(super) enum Auth {
    /// `Authorization: Basic key_id:key_secret` on every call; no token is ever asked for.
    Basic(HeaderValue),
    OAuth2(Arc<TokenCache>),
}

/// A refresh in flight, awaited by whoever needs its token.
type Refresh = Shared<BoxFuture<'static, Result<Arc<HeaderValue>, Error>>>;

/// The one token this replica uses.
pub(super) struct TokenCache {
    url: String,
    /// The Basic credentials presented to the token endpoint.
    basic: HeaderValue,
    /// The current token; read by every call, written only by the refresh.
    current: RwLock<Option<Token>>,
    /// The refresh in flight, if any, and when the next may start after one failed while the token was valid.
    refresh: Mutex<Refreshing>,
    retry: TokenRetry,
    /// The last failure of the refresh in flight: a caller whose deadline comes first is told what went wrong.
    failure: RwLock<Option<Error>>,
}

/// Clears the refresh in flight however it ends (a panic included), so that the next caller can start another.
struct Ended {
    cache: Arc<TokenCache>,
    failed: bool,
}

impl Drop for Ended {
    fn drop(&mut self) {
        let Ok(mut refreshing) = self.cache.refresh.lock() else {
            return;
        };
        refreshing.in_flight = None;
        let retry = &self.cache.retry;
        refreshing.quiet_until = self.failed.then(|| Instant::now() + retry.ceiling(retry.tries));
    }
}

#[derive(Default)]
struct Refreshing {
    in_flight: Option<Refresh>,
    quiet_until: Option<Instant>,
}

#[derive(Clone)]
struct Token {
    header: Arc<HeaderValue>,
    /// When it stops being valid.
    expires: Instant,
    /// When to start refreshing it.
    refresh_at: Instant,
}

impl Auth {
    pub(super) fn new(config: &SinchConfig, retry: TokenRetry) -> Result<Auth, InvalidHeaderValue> {
        use base64::Engine;
        let credentials = base64::engine::general_purpose::STANDARD.encode(format!(
            "{}:{}",
            config.key_id,
            config.key_secret.expose()
        ));
        let mut basic = HeaderValue::from_str(&format!("Basic {credentials}"))?;
        basic.set_sensitive(true);
        Ok(match config.auth {
            AuthMode::Basic => Auth::Basic(basic),
            AuthMode::OAuth2 => Auth::OAuth2(Arc::new(TokenCache {
                url: config.auth_url.clone(),
                basic,
                current: RwLock::new(None),
                refresh: Mutex::new(Refreshing::default()),
                retry,
                failure: RwLock::new(None),
            })),
        })
    }

    /// The header for the next call: the current token, or one obtained (with retries) before `deadline`.
    pub(super) async fn header(&self, http: &reqwest::Client, deadline: Instant) -> Result<Arc<HeaderValue>, Error> {
        match self {
            Auth::Basic(h) => Ok(Arc::new(h.clone())),
            Auth::OAuth2(cache) => cache.header(http, deadline).await,
        }
    }

    /// Forgets `used` if it is still the current token (Sinch refused it).
    pub(super) fn expired(&self, used: &Arc<HeaderValue>) {
        if let Auth::OAuth2(cache) = self {
            let mut current = cache.current.write().expect("token lock poisoned");
            if current.as_ref().is_some_and(|t| Arc::ptr_eq(&t.header, used)) {
                *current = None;
            }
        }
    }
}

// === impl TokenCache ===

impl TokenCache {
    async fn header(self: &Arc<Self>, http: &reqwest::Client, deadline: Instant) -> Result<Arc<HeaderValue>, Error> {
        let now = Instant::now();
        match self.cached() {
            Some(t) if now < t.refresh_at => return Ok(t.header),
            Some(t) if now < t.expires => {
                // Still valid: its successor is fetched in the background, this call goes out with it.
                self.refresh(http, false);
                return Ok(t.header);
            }
            _ => {}
        }
        let refresh = self.refresh(http, true).expect("a needed refresh always starts");
        match tokio::time::timeout_at(deadline, refresh).await {
            Ok(result) => result,
            Err(_) => Err(self
                .failure
                .read()
                .expect("token lock poisoned")
                .clone()
                .unwrap_or(Error::DeadlineExceeded)),
        }
    }

    fn cached(&self) -> Option<Token> {
        self.current.read().expect("token lock poisoned").clone()
    }

    /// The refresh in flight, or a new one — unless the token is not `needed` yet and a refresh failed a moment
    /// ago.
    fn refresh(self: &Arc<Self>, http: &reqwest::Client, needed: bool) -> Option<Refresh> {
        let mut refreshing = self.refresh.lock().expect("token lock poisoned");
        if let Some(in_flight) = &refreshing.in_flight {
            return Some(in_flight.clone());
        }
        // A refresh that ended since this caller looked for a token stored it before it let go of the slot.
        if needed && let Some(token) = self.cached().filter(|t| Instant::now() < t.expires) {
            return Some(futures::future::ready(Ok(token.header)).boxed().shared());
        }
        if !needed && refreshing.quiet_until.is_some_and(|until| Instant::now() < until) {
            return None;
        }
        *self.failure.write().expect("token lock poisoned") = None;
        let (cache, http) = (self.clone(), http.clone());
        let task = tokio::spawn(async move {
            let mut ended = Ended { cache, failed: true };
            let result = ended.cache.fetch(&http).await;
            ended.failed = result.is_err();
            result
        });
        let refresh = async move { task.await.unwrap_or_else(|e| Err(e.into())) }
            .boxed()
            .shared();
        refreshing.in_flight = Some(refresh.clone());
        Some(refresh)
    }

    /// Asks the token endpoint, retrying what may pass on a later try.
    async fn fetch(&self, http: &reqwest::Client) -> Result<Arc<HeaderValue>, Error> {
        let mut attempt = 1;
        loop {
            let result = self.request_token(http).await;
            let label = if result.is_ok() { "ok" } else { "error" };
            metrics::counter!("capability_token_refreshes_total", "result" => label).increment(1);
            let error = match result {
                Err(e) if e.is_retryable() && attempt < self.retry.tries => e,
                done => return done,
            };
            *self.failure.write().expect("token lock poisoned") = Some(error.clone());
            // The token endpoint's own pause only within the policy's (every call without a token waits on this
            // one refresh, and the bucket behind the endpoint refills within a second); past it, drawn as without
            // one, so that replicas refused together do not retry in step.
            let pause = match error.retry_after() {
                Some(after) if after < self.retry.ceiling(attempt) => after,
                _ => self.retry.pause(attempt),
            };
            tracing::debug!(attempt, ?pause, error = %error, "retrying the token request");
            tokio::time::sleep(pause).await;
            attempt += 1;
        }
    }

    async fn request_token(&self, http: &reqwest::Client) -> Result<Arc<HeaderValue>, Error> {
        let started = Instant::now();
        let response = http
            .post(&self.url)
            .header(reqwest::header::AUTHORIZATION, self.basic.clone())
            .form(&[("grant_type", "client_credentials")])
            .timeout(REQUEST_TIMEOUT)
            .send()
            .await
            .map_err(|e| Error::Connect(format!("token endpoint: {}", super::error_chain(&e))))?;
        let status = response.status().as_u16();
        let retry_after = super::retry_after(response.headers());
        let body = read_capped(response, MAX_ANSWER)
            .await
            .map_err(|e| Error::Connect(format!("token endpoint: {e}")))?;
        if status != 200 {
            return Err(classify(status, &body, retry_after, true));
        }
        let token: TokenJson = serde_json::from_slice(&body).map_err(|e| Error::Malformed {
            status,
            detail: format!("token endpoint: {e}"),
        })?;
        if !token.token_type.eq_ignore_ascii_case("bearer") || token.access_token.is_empty() {
            return Err(Error::Malformed {
                status,
                detail: format!("token endpoint: unexpected token_type {:?}", token.token_type),
            });
        }
        let mut header =
            HeaderValue::from_str(&format!("Bearer {}", token.access_token)).map_err(|_| Error::Malformed {
                status,
                detail: "token endpoint: the token is not a valid header value".into(),
            })?;
        header.set_sensitive(true);
        let lifetime = Duration::from_secs(token.expires_in).clamp(MIN_LIFETIME, MAX_LIFETIME);
        let margin = REFRESH_MARGIN.min(lifetime / 2);
        let fresh = Token {
            header: Arc::new(header),
            expires: started + lifetime,
            refresh_at: started + lifetime - margin,
        };
        let result = fresh.header.clone();
        *self.current.write().expect("token lock poisoned") = Some(fresh);
        tracing::info!(expires_in_s = token.expires_in, "obtained a Sinch access token");
        Ok(result)
    }
}
