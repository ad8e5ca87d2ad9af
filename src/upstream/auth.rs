//! Credentials on every call: HTTP Basic, or an OAuth2 bearer token shared by all calls and refreshed before it
//! expires by a single in-flight refresh. The token endpoint is a token bucket (Sinch: capacity 30, refill
//! 10/s, 429 without `Retry-After`), so a refresh that is refused is retried with a back-off of its own, as
//! Sinch's SDKs do, and callers that waited on a refresh that failed get its failure instead of asking again.

use std::{
    sync::{
        Arc, RwLock,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use rand::Rng;
use reqwest::header::{HeaderValue, InvalidHeaderValue};
use tokio::time::Instant;

use super::{Error, classify, wire::TokenJson};
use crate::config::{AuthMode, SinchConfig};

/// The longest a token is used before its end: Sinch's SDKs refresh 60 s before expiry.
const REFRESH_MARGIN: Duration = Duration::from_secs(60);
/// The range a token's `expires_in` is clamped to: 0 would refresh on every call, a huge value overflows.
const MIN_LIFETIME: Duration = Duration::from_secs(10);
const MAX_LIFETIME: Duration = Duration::from_secs(24 * 3600);

/// How a refused token request is retried: at most `tries` requests in all, the pause before request `n + 1`
/// drawn uniformly from `[0, base·4^(n-1))` (full jitter), never past the caller's deadline. Sinch's SDKs use
/// 3 tries from 1 s.
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
    fn pause(&self, attempt: u32) -> Duration {
        let ceiling = self.base.saturating_mul(4u32.saturating_pow(attempt - 1));
        ceiling.mul_f64(rand::rng().random::<f64>())
    }
}

/// Produces the `Authorization` header of each API call.
pub(super) enum Auth {
    /// `Authorization: Basic key_id:key_secret` on every call; no token is ever asked for.
    Basic(HeaderValue),
    OAuth2(Box<TokenCache>),
}

/// The one token this replica uses.
pub(super) struct TokenCache {
    url: String,
    /// The Basic credentials presented to the token endpoint.
    basic: HeaderValue,
    /// The current token; read by every call, written only by the refresher.
    current: RwLock<Option<Token>>,
    /// Held while a refresh is in flight, so that only one caller asks the token endpoint at a time.
    refresh: tokio::sync::Mutex<()>,
    retry: TokenRetry,
    /// Counts finished refreshes; a caller that sees it move while it waited shares that refresh's outcome.
    refreshes: AtomicU64,
    /// The failure of the last refresh, when it failed.
    failure: RwLock<Option<Error>>,
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
            AuthMode::OAuth2 => Auth::OAuth2(Box::new(TokenCache {
                url: config.auth_url.clone(),
                basic,
                current: RwLock::new(None),
                refresh: tokio::sync::Mutex::new(()),
                retry,
                refreshes: AtomicU64::new(0),
                failure: RwLock::new(None),
            })),
        })
    }

    /// The header for the next call, obtained (with retries) before `deadline`.
    pub(super) async fn header(&self, http: &reqwest::Client, deadline: Instant) -> Result<Arc<HeaderValue>, Error> {
        match self {
            Auth::Basic(h) => Ok(Arc::new(h.clone())),
            Auth::OAuth2(cache) => cache.header(http, deadline).await,
        }
    }

    /// Forgets `used` if it is still the current token (Sinch said it expired).
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
    async fn header(&self, http: &reqwest::Client, deadline: Instant) -> Result<Arc<HeaderValue>, Error> {
        let now = Instant::now();
        let cached = self.cached();
        match cached {
            Some(t) if now < t.refresh_at => return Ok(t.header),
            Some(t) if now < t.expires => {
                // Still valid: one caller refreshes with a single try (a refused one waits for the next call),
                // everyone else keeps using it meanwhile.
                let Ok(_guard) = self.refresh.try_lock() else {
                    return Ok(t.header);
                };
                return match self.fetch(http, now).await {
                    Ok(fresh) => Ok(fresh),
                    Err(e) => {
                        tracing::warn!(error = %e, "token refresh failed; the current token is still valid");
                        Ok(t.header)
                    }
                };
            }
            _ => {}
        }
        let seen = self.refreshes.load(Ordering::Acquire);
        let _guard = self.refresh.lock().await;
        if let Some(t) = self.cached().filter(|t| Instant::now() < t.expires) {
            return Ok(t.header);
        }
        if self.refreshes.load(Ordering::Acquire) != seen
            && let Some(failure) = self.failure.read().expect("token lock poisoned").clone()
        {
            return Err(failure);
        }
        self.fetch(http, deadline).await
    }

    fn cached(&self) -> Option<Token> {
        self.current.read().expect("token lock poisoned").clone()
    }

    /// Asks the token endpoint, retrying what may pass on a later try; called with `refresh` held.
    async fn fetch(&self, http: &reqwest::Client, deadline: Instant) -> Result<Arc<HeaderValue>, Error> {
        let mut attempt = 1;
        let result = loop {
            let result = self.request_token(http).await;
            let label = if result.is_ok() { "ok" } else { "error" };
            metrics::counter!("capability_token_refreshes_total", "result" => label).increment(1);
            let error = match result {
                Err(e) if e.is_retryable() && attempt < self.retry.tries => e,
                done => break done,
            };
            let pause = error.retry_after().unwrap_or_else(|| self.retry.pause(attempt));
            if Instant::now() + pause >= deadline {
                break Err(error);
            }
            tracing::debug!(attempt, ?pause, error = %error, "retrying the token request");
            tokio::time::sleep(pause).await;
            attempt += 1;
        };
        *self.failure.write().expect("token lock poisoned") = result.as_ref().err().cloned();
        self.refreshes.fetch_add(1, Ordering::Release);
        result
    }

    async fn request_token(&self, http: &reqwest::Client) -> Result<Arc<HeaderValue>, Error> {
        let started = Instant::now();
        let response = http
            .post(&self.url)
            .header(reqwest::header::AUTHORIZATION, self.basic.clone())
            .form(&[("grant_type", "client_credentials")])
            .send()
            .await
            .map_err(|e| Error::Connect(format!("token endpoint: {e}")))?;
        let status = response.status().as_u16();
        let retry_after = super::retry_after(response.headers());
        let body = response
            .bytes()
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
