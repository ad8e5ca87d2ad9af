//! The built-in Sinch emulator: the OAuth2 token endpoint and `capability:query`, validating requests and
//! answering errors the way Sinch does. In-process when no credentials are configured; standalone with
//! `capability-facade sandbox` as an upstream for load tests. After each accepted query it posts one signed
//! CAPABILITY callback per channel to the configured receiver (see [`callbacks`] for the outcomes).

pub mod callbacks;

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use axum::{
    Router,
    body::Bytes,
    extract::{Path, State},
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Response},
    routing::post,
};
use base64::Engine;
use tokio::{net::TcpListener, time::Instant};
use tokio_util::sync::CancellationToken;

use crate::{
    capability::Channel,
    sandbox::callbacks::CallbackTarget,
    secret::Secret,
    upstream::wire::{ErrorBody, ErrorJson, QueryJson, RecipientJson, TokenJson},
};

/// What the sandbox accepts and how it behaves.
#[derive(Debug, Clone)]
pub struct SandboxConfig {
    pub project_id: String,
    pub key_id: String,
    pub key_secret: Secret,
    /// The `expires_in` of the tokens it issues.
    pub token_lifetime: Duration,
    /// Where callbacks go; none are sent without one.
    pub callbacks: Option<CallbackTarget>,
}

impl SandboxConfig {
    /// How a client reaches this sandbox at `url` (`http://host:port`) with its credentials.
    pub fn client_config(&self, url: &str, rate_limit: u32) -> crate::config::SinchConfig {
        crate::config::SinchConfig {
            project_id: self.project_id.clone(),
            key_id: self.key_id.clone(),
            key_secret: self.key_secret.clone(),
            auth: crate::config::AuthMode::OAuth2,
            api_url: url.to_owned(),
            auth_url: format!("{url}/oauth2/token"),
            rate_limit: std::num::NonZeroU32::new(rate_limit).unwrap_or(std::num::NonZeroU32::MIN),
        }
    }

    /// A sandbox with freshly generated credentials, for in-process use.
    pub fn generated() -> SandboxConfig {
        SandboxConfig {
            project_id: "sandbox-project".to_owned(),
            key_id: format!("sandbox-key-{}", ulid::Ulid::new()),
            key_secret: Secret::new(ulid::Ulid::new().to_string()),
            token_lifetime: Duration::from_secs(3600),
            callbacks: None,
        }
    }
}

struct Sandbox {
    config: SandboxConfig,
    /// `Basic …` as a client must present it.
    basic: String,
    /// Issued tokens and when each expires.
    tokens: Mutex<HashMap<String, Instant>>,
    /// Posts the callbacks.
    http: reqwest::Client,
}

/// Serves the sandbox on `listener` until `shutdown` is cancelled.
pub async fn serve(listener: TcpListener, config: SandboxConfig, shutdown: CancellationToken) -> std::io::Result<()> {
    axum::serve(listener, router(config))
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
}

/// The sandbox's routes, for tests that call it without a socket.
pub fn router(config: SandboxConfig) -> Router {
    let credentials = format!("{}:{}", config.key_id, config.key_secret.expose());
    let basic = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(credentials)
    );
    let trust_own_listener = config.callbacks.as_ref().is_some_and(|t| t.trust_own_listener);
    let state = Arc::new(Sandbox {
        config,
        basic,
        tokens: Mutex::new(HashMap::new()),
        http: {
            crate::upstream::install_crypto_provider();
            reqwest::Client::builder()
                .danger_accept_invalid_certs(trust_own_listener)
                .build()
                .expect("a client without custom roots always builds")
        },
    });
    Router::new()
        .route("/oauth2/token", post(token))
        .route("/v1/projects/{project}/capability:query", post(query))
        .with_state(state)
}

/// A Sinch-style error answer.
fn sinch_error(status: StatusCode, sinch_status: &str, message: impl Into<String>) -> Response {
    let body = ErrorJson {
        error: ErrorBody {
            code: status.as_u16(),
            message: message.into(),
            status: sinch_status.to_owned(),
            details: Vec::new(),
        },
    };
    (status, axum::Json(body)).into_response()
}

async fn token(State(sandbox): State<Arc<Sandbox>>, headers: HeaderMap, body: Bytes) -> Response {
    let oauth_error = |status: StatusCode, error: &str, description: &str| {
        let body = serde_json::json!({"error": error, "error_description": description});
        (status, axum::Json(body)).into_response()
    };
    if headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()) != Some(sandbox.basic.as_str()) {
        return oauth_error(StatusCode::UNAUTHORIZED, "invalid_client", "Bad client credentials");
    }
    let form_ok = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/x-www-form-urlencoded"));
    if !form_ok || body.as_ref() != b"grant_type=client_credentials" {
        return oauth_error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "expected a form body grant_type=client_credentials",
        );
    }
    let token = ulid::Ulid::new().to_string();
    let lifetime = sandbox.config.token_lifetime;
    {
        let mut tokens = sandbox.tokens.lock().expect("sandbox lock poisoned");
        let now = Instant::now();
        tokens.retain(|_, expires| *expires > now);
        tokens.insert(token.clone(), now + lifetime);
    }
    axum::Json(TokenJson {
        access_token: token,
        token_type: "bearer".to_owned(),
        expires_in: lifetime.as_secs(),
        scope: String::new(),
    })
    .into_response()
}

async fn query(
    State(sandbox): State<Arc<Sandbox>>,
    Path(project): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Err(detail) = sandbox.authenticate(&headers) {
        return unauthenticated(detail);
    }
    if project != sandbox.config.project_id {
        return sinch_error(
            StatusCode::NOT_FOUND,
            "NOT_FOUND",
            format!("Project {project} not found"),
        );
    }
    let mut query: QueryJson = match serde_json::from_slice(&body) {
        Ok(q) => q,
        Err(e) => {
            return sinch_error(
                StatusCode::BAD_REQUEST,
                "INVALID_ARGUMENT",
                format!("Invalid JSON: {e}"),
            );
        }
    };
    if let Err(message) = validate(&query) {
        return sinch_error(StatusCode::BAD_REQUEST, "INVALID_ARGUMENT", message);
    }
    if query.request_id.is_empty() {
        query.request_id = ulid::Ulid::new().to_string();
    }
    if let Some(target) = &sandbox.config.callbacks {
        let bodies = callbacks::bodies(&sandbox.config.project_id, &query);
        tokio::spawn(callbacks::deliver(sandbox.http.clone(), target.clone(), bodies));
    }
    axum::Json(query).into_response()
}

/// Sinch's own checks of a query body.
fn validate(query: &QueryJson) -> Result<(), String> {
    if query.app_id.is_empty() {
        return Err("app_id is required".into());
    }
    match &query.recipient {
        RecipientJson::ContactId(id) if id.is_empty() => Err("recipient.contact_id must not be empty".into()),
        RecipientJson::ContactId(_) => Ok(()),
        RecipientJson::IdentifiedBy { channel_identities } if channel_identities.is_empty() => {
            Err("recipient.identified_by.channel_identities must not be empty".into())
        }
        RecipientJson::IdentifiedBy { channel_identities } => {
            for (i, id) in channel_identities.iter().enumerate() {
                // The channels Sinch knows are the ones the contract lists; anything else is a 400, as at Sinch.
                if matches!(Channel::from_sinch(&id.channel), Channel::Other(_)) {
                    return Err(format!(
                        "Invalid value for channel_identities[{i}].channel: {:?}",
                        id.channel
                    ));
                }
                if id.identity.is_empty() {
                    return Err(format!("channel_identities[{i}].identity is required"));
                }
            }
            Ok(())
        }
    }
}

// === impl Sandbox ===

impl Sandbox {
    /// Accepts a bearer token it issued and has not expired, or the Basic credentials; otherwise says why not.
    fn authenticate(&self, headers: &HeaderMap) -> Result<(), &'static str> {
        let presented = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default();
        if presented == self.basic {
            return Ok(());
        }
        let Some(token) = presented.strip_prefix("Bearer ") else {
            return Err("missing credentials");
        };
        let expires = self.tokens.lock().expect("sandbox lock poisoned").get(token).copied();
        match expires {
            Some(expires) if expires > Instant::now() => Ok(()),
            Some(_) => Err("The access token expired"),
            None => Err("unknown token"),
        }
    }
}

/// Sinch's 401, with the `www-authenticate` challenge saying why.
fn unauthenticated(detail: &str) -> Response {
    let mut response = sinch_error(
        StatusCode::UNAUTHORIZED,
        "UNAUTHENTICATED",
        "Request had invalid credentials.",
    );
    let challenge = format!("Bearer error=\"invalid_token\", error_description=\"{detail}\"");
    if let Ok(value) = challenge.parse() {
        response.headers_mut().insert(header::WWW_AUTHENTICATE, value);
    }
    response
}
