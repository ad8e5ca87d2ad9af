//! The built-in Sinch emulator, as strict as Sinch: the OAuth2 token endpoint (a token bucket: 30, refilled at
//! 10/s, 429 without `Retry-After`), `capability:query`, the Webhooks API and `GET …/apps/{app_id}`
//! ([`webhooks`]) under the project's 800 requests/s, validating requests and answering errors the way Sinch
//! does (with `details`). In-process when no credentials are configured; standalone with `capability-facade
//! sandbox`. After each accepted query it posts the CAPABILITY callbacks (see [`callbacks`] for the outcomes) to
//! every webhook of the app whose triggers include CAPABILITY, each signed with that webhook's secret, paced at
//! the app's `rate_limits.webhooks`. Its knobs ([`SandboxSettings`]) add faults: a fraction of queries answered
//! 429/500/501/503, latency, a token endpoint outage, silence for unreachable channels, duplicates and
//! reordering.

pub mod callbacks;
pub mod webhooks;

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
    routing::{get, post},
};
use base64::Engine;
use governor::{DefaultDirectRateLimiter, Quota};
use rand::Rng;
use serde_json::json;
use tokio::{net::TcpListener, sync::Semaphore, time::Instant};
use tokio_util::sync::CancellationToken;

use crate::{
    capability::Channel,
    config::{RetryHint, SandboxSettings},
    secret::Secret,
    upstream::wire::{ErrorBody, ErrorJson, QueryJson, RecipientJson, TokenJson},
};
use webhooks::{Destination, Registry};

/// The fixed credentials of every sandbox, so that commands and clients can reach it without set-up.
pub const PROJECT_ID: &str = "sandbox-project";
pub const KEY_ID: &str = "sandbox-key";
pub const KEY_SECRET: &str = "sandbox-secret";
/// How long a token is still told apart as expired after it expired: at the token bucket's 10 a second, at most
/// 36,000 expired tokens are remembered beside the live ones (as many again over the default hour's lifetime).
const EXPIRED_TOKENS_KNOWN: Duration = Duration::from_secs(3600);
/// The most callbacks held waiting to be sent (at the apps' pace); a query past it is refused 429.
pub const MAX_WAITING_CALLBACKS: usize = 10_000;
pub use webhooks::MAX_APPS;
/// How long a callback's post may take (Sinch's own limit is not documented).
const CALLBACK_TIMEOUT: Duration = Duration::from_secs(10);

/// What the sandbox accepts and how it behaves.
#[derive(Debug, Clone)]
pub struct SandboxConfig {
    pub project_id: String,
    pub key_id: String,
    pub key_secret: Secret,
    /// The `expires_in` of the tokens it issues.
    pub token_lifetime: Duration,
    pub knobs: SandboxSettings,
    /// Registered (trigger CAPABILITY) for every app when it comes to exist: the in-process service's own
    /// receiver, or `capability-facade sandbox --callback-url`.
    pub default_webhook: Option<Destination>,
    /// Accept the receivers' certificates whatever they are: only for the in-process sandbox posting to its own
    /// process's TLS listener on loopback, whose certificate need not name 127.0.0.1. The callbacks are signed.
    pub trust_own_listener: bool,
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

    /// A sandbox with the fixed credentials ([`PROJECT_ID`], [`KEY_ID`], [`KEY_SECRET`]) and these knobs.
    pub fn new(knobs: SandboxSettings, default_webhook: Option<Destination>) -> SandboxConfig {
        SandboxConfig {
            project_id: PROJECT_ID.to_owned(),
            key_id: KEY_ID.to_owned(),
            key_secret: Secret::new(KEY_SECRET),
            token_lifetime: Duration::from_secs(3600),
            knobs,
            default_webhook,
            trust_own_listener: false,
        }
    }
}

struct Sandbox {
    config: SandboxConfig,
    /// `Basic …` as a client must present it.
    basic: String,
    /// Issued tokens and when each expires (or expired, for [`EXPIRED_TOKENS_KNOWN`]).
    tokens: Mutex<HashMap<String, Instant>>,
    /// Sinch's token endpoint is a token bucket: capacity 30, refilled at 10/s.
    token_bucket: DefaultDirectRateLimiter,
    /// The project's requests per second across its APIs; none when unlimited.
    project_bucket: Option<DefaultDirectRateLimiter>,
    /// When it started: the token outage window counts from here.
    started: Instant,
    registry: Registry,
    /// Posts the callbacks.
    http: reqwest::Client,
    /// A permit per callback held waiting to be sent, [`MAX_WAITING_CALLBACKS`] in all.
    waiting: Arc<Semaphore>,
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
    let registry = Registry::new(
        &config.knobs.apps,
        config.default_webhook.clone(),
        config.knobs.webhook_rate,
    );
    let token_bucket = DefaultDirectRateLimiter::direct(
        Quota::per_second(std::num::NonZeroU32::new(10).expect("not 0"))
            .allow_burst(std::num::NonZeroU32::new(30).expect("not 0")),
    );
    let project_bucket = std::num::NonZeroU32::new(config.knobs.project_rate)
        .map(|rate| DefaultDirectRateLimiter::direct(Quota::per_second(rate)));
    let state = Arc::new(Sandbox {
        http: {
            crate::upstream::install_crypto_provider();
            reqwest::Client::builder()
                // A receiver that never answers would hold its callbacks among the waiting ones for good.
                .timeout(CALLBACK_TIMEOUT)
                .danger_accept_invalid_certs(config.trust_own_listener)
                .build()
                .expect("a client without custom roots always builds")
        },
        config,
        basic,
        tokens: Mutex::new(HashMap::new()),
        token_bucket,
        project_bucket,
        started: Instant::now(),
        registry,
        waiting: Arc::new(Semaphore::new(MAX_WAITING_CALLBACKS)),
    });
    let webhooks_api = Router::new()
        .route("/v1/projects/{project}/webhooks", post(webhooks::create))
        .route(
            "/v1/projects/{project}/webhooks/{webhook_id}",
            get(webhooks::get).patch(webhooks::update).delete(webhooks::delete),
        )
        .route("/v1/projects/{project}/apps/{app_id}", get(webhooks::app))
        .route("/v1/projects/{project}/apps/{app_id}/webhooks", get(webhooks::list))
        .route_layer(axum::middleware::from_fn_with_state(state.clone(), webhooks::admit));
    Router::new()
        .route("/oauth2/token", post(token))
        .route("/v1/projects/{project}/capability:query", post(query))
        .merge(webhooks_api)
        .with_state(state)
}

/// A Sinch-style error answer, its `details` carrying a `google.rpc.ErrorInfo`.
fn sinch_error(status: StatusCode, sinch_status: &str, message: impl Into<String>) -> Response {
    sinch_error_with(status, sinch_status, message, Vec::new())
}

/// The same, with more `details`.
fn sinch_error_with(
    status: StatusCode,
    sinch_status: &str,
    message: impl Into<String>,
    mut details: Vec<serde_json::Value>,
) -> Response {
    details.insert(
        0,
        json!({"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": sinch_status,
            "domain": "conversation.api.sinch.com"}),
    );
    let body = ErrorJson {
        error: ErrorBody {
            code: status.as_u16(),
            message: message.into(),
            status: sinch_status.to_owned(),
            details,
        },
    };
    (status, axum::Json(body)).into_response()
}

impl Sandbox {
    /// A 429, as an injected one, when the project's rate limit refuses one more request.
    fn over_project_rate(&self) -> Option<Response> {
        let bucket = self.project_bucket.as_ref()?;
        bucket.check().err().map(|_| {
            let refused = (StatusCode::TOO_MANY_REQUESTS, "RESOURCE_EXHAUSTED", "Too many requests");
            fault(&self.config.knobs, refused)
        })
    }
}

/// A fault drawn for one query by the configured fractions, as (HTTP status, Sinch status, message).
fn draw_fault(knobs: &SandboxSettings) -> Option<(StatusCode, &'static str, &'static str)> {
    let faults = [
        (
            knobs.error_429,
            StatusCode::TOO_MANY_REQUESTS,
            "RESOURCE_EXHAUSTED",
            "Too many requests",
        ),
        (
            knobs.error_500,
            StatusCode::INTERNAL_SERVER_ERROR,
            "INTERNAL",
            "Internal error",
        ),
        (
            knobs.error_501,
            StatusCode::NOT_IMPLEMENTED,
            "NOT_IMPLEMENTED",
            "Not implemented",
        ),
        (
            knobs.error_503,
            StatusCode::SERVICE_UNAVAILABLE,
            "UNAVAILABLE",
            "The service is unavailable",
        ),
    ];
    let mut draw = rand::rng().random::<f64>();
    for (fraction, status, sinch_status, message) in faults {
        if draw < fraction {
            return Some((status, sinch_status, message));
        }
        draw -= fraction;
    }
    None
}

/// The answer of an injected fault; a 429 says when to retry as configured.
fn fault(knobs: &SandboxSettings, (status, sinch_status, message): (StatusCode, &str, &str)) -> Response {
    if status != StatusCode::TOO_MANY_REQUESTS {
        return sinch_error(status, sinch_status, message);
    }
    let wait = knobs.retry_after;
    match knobs.retry_hint {
        RetryHint::Header => {
            let mut response = sinch_error(status, sinch_status, message);
            let seconds = wait.as_secs_f64().ceil() as u64;
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, header::HeaderValue::from(seconds));
            response
        }
        RetryHint::RetryInfo => {
            let info = json!({"@type": "type.googleapis.com/google.rpc.RetryInfo",
                "retryDelay": format!("{}s", wait.as_secs_f64())});
            sinch_error_with(status, sinch_status, message, vec![info])
        }
    }
}

async fn token(State(sandbox): State<Arc<Sandbox>>, headers: HeaderMap, body: Bytes) -> Response {
    let oauth_error = |status: StatusCode, error: &str, description: &str| {
        let body = serde_json::json!({"error": error, "error_description": description});
        (status, axum::Json(body)).into_response()
    };
    let knobs = &sandbox.config.knobs;
    let since_start = sandbox.started.elapsed();
    if !knobs.token_outage_for.is_zero()
        && since_start >= knobs.token_outage_after
        && since_start < knobs.token_outage_after + knobs.token_outage_for
    {
        return oauth_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "temporarily_unavailable",
            "The token service is unavailable",
        );
    }
    if sandbox.token_bucket.check().is_err() {
        return oauth_error(StatusCode::TOO_MANY_REQUESTS, "too_many_requests", "Too many requests");
    }
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
        // An expired token stays known for a while, to be refused as expired rather than unknown (a client
        // fetches a new one on hearing it expired); the token bucket bounds how many are remembered.
        tokens.retain(|_, expires| *expires + EXPIRED_TOKENS_KNOWN > now);
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
    // A zero sleep would still wait for the timer's next tick (about a millisecond): none at all by default.
    if !sandbox.config.knobs.latency.is_zero() {
        tokio::time::sleep(sandbox.config.knobs.latency).await;
    }
    if let Err(detail) = sandbox.authenticate(&headers) {
        return unauthenticated(detail);
    }
    if let Some(response) = sandbox.wrong_project(&project) {
        return response;
    }
    if let Some(refusal) = sandbox.over_project_rate() {
        return refusal;
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
    let Some((destinations, pacer)) = sandbox.registry.capability_destinations(&query.app_id) else {
        return webhooks::app_not_found(&query.app_id);
    };
    if let Some(drawn) = draw_fault(&sandbox.config.knobs) {
        return fault(&sandbox.config.knobs, drawn);
    }
    if query.request_id.is_empty() {
        query.request_id = ulid::Ulid::new().to_string();
    }
    let knobs = &sandbox.config.knobs;
    let bodies = callbacks::bodies(&sandbox.config.project_id, &query, knobs.silent_unreachable);
    if !destinations.is_empty() && !bodies.is_empty() {
        let waiting = u32::try_from(bodies.len())
            .ok()
            .and_then(|callbacks| sandbox.waiting.clone().try_acquire_many_owned(callbacks).ok());
        let Some(waiting) = waiting else {
            let refused = (
                StatusCode::TOO_MANY_REQUESTS,
                "RESOURCE_EXHAUSTED",
                "Too many callbacks waiting to be sent",
            );
            return fault(knobs, refused);
        };
        let deliver = callbacks::deliver(sandbox.http.clone(), destinations, bodies, knobs.clone(), pacer);
        tokio::spawn(async move {
            deliver.await;
            drop(waiting);
        });
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
    /// Sinch's 404 for a project other than the one served.
    fn wrong_project(&self, project: &str) -> Option<Response> {
        (project != self.config.project_id).then(|| {
            sinch_error(
                StatusCode::NOT_FOUND,
                "NOT_FOUND",
                format!("Project {project} not found"),
            )
        })
    }

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
