//! Credentials on every call: HTTP Basic, or an OAuth2 bearer token shared by all calls and refreshed before it
//! expires by a single in-flight refresh.

use std::{
    sync::{Arc, RwLock},
    time::Duration,
};

use reqwest::header::{HeaderValue, InvalidHeaderValue};
use tokio::time::Instant;

use super::{Error, classify, wire::TokenJson};
use crate::config::{AuthMode, SinchConfig};

/// The longest a token is used before its end: Sinch's SDKs refresh 60 s before expiry.
const REFRESH_MARGIN: Duration = Duration::from_secs(60);

/// Produces the `Authorization` header of each API call.
pub(super) enum Auth {
    /// `Authorization: Basic key_id:key_secret` on every call; no token is ever asked for.
    Basic(HeaderValue),
    OAuth2(TokenCache),
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
    pub(super) fn new(config: &SinchConfig) -> Result<Auth, InvalidHeaderValue> {
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
            AuthMode::OAuth2 => Auth::OAuth2(TokenCache {
                url: config.auth_url.clone(),
                basic,
                current: RwLock::new(None),
                refresh: tokio::sync::Mutex::new(()),
            }),
        })
    }

    /// The header for the next call.
    pub(super) async fn header(&self, http: &reqwest::Client) -> Result<Arc<HeaderValue>, Error> {
        match self {
            Auth::Basic(h) => Ok(Arc::new(h.clone())),
            Auth::OAuth2(cache) => cache.header(http).await,
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
    async fn header(&self, http: &reqwest::Client) -> Result<Arc<HeaderValue>, Error> {
        let now = Instant::now();
        let cached = self.cached();
        match cached {
            Some(t) if now < t.refresh_at => return Ok(t.header),
            Some(t) if now < t.expires => {
                // Still valid: one caller refreshes, everyone else keeps using it meanwhile.
                let Ok(_guard) = self.refresh.try_lock() else {
                    return Ok(t.header);
                };
                return match self.fetch(http).await {
                    Ok(fresh) => Ok(fresh),
                    Err(e) => {
                        tracing::warn!(error = %e, "token refresh failed; the current token is still valid");
                        Ok(t.header)
                    }
                };
            }
            _ => {}
        }
        let _guard = self.refresh.lock().await;
        if let Some(t) = self.cached().filter(|t| Instant::now() < t.expires) {
            return Ok(t.header);
        }
        self.fetch(http).await
    }

    fn cached(&self) -> Option<Token> {
        self.current.read().expect("token lock poisoned").clone()
    }

    /// Asks the token endpoint; called with `refresh` held.
    async fn fetch(&self, http: &reqwest::Client) -> Result<Arc<HeaderValue>, Error> {
        let result = self.request_token(http).await;
        let label = if result.is_ok() { "ok" } else { "error" };
        metrics::counter!("capability_token_refreshes_total", "result" => label).increment(1);
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
        let lifetime = Duration::from_secs(token.expires_in);
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
