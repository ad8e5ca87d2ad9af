//! The webhook receiver: `POST /webhooks/sinch` verifies Sinch's signature over the raw bytes, parses the
//! callback and appends the notification to the event log; it answers 200 only once the log has taken it.
//! `GET /healthz` answers 200. Nothing else is served here. At most `max_pending` callbacks are handled at once:
//! beyond that a flood is answered with fast 503s (Sinch redelivers) rather than queued. Bodies still arriving
//! hold no such place (a sender trickling its body would keep a genuine callback out), only their bytes so far,
//! within a budget of `max_pending` whole bodies.

pub mod parse;
pub mod signature;

use std::{
    convert::Infallible,
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use axum::{
    Router,
    body::{Body, Bytes},
    extract::State,
    http::{HeaderMap, HeaderName, Request, StatusCode, header},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use hyper::body::Incoming;
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::{
        conn::auto::Builder,
        graceful::{GracefulShutdown, Watcher},
    },
    service::TowerToHyperService,
};
use tokio::sync::{Semaphore, SemaphorePermit};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::{
    capability::{mask, mask_digits},
    connection::{Activity, BusyBody, GuardedListener, HeadCheck},
    log::{Accepted, EventLog, Nonce, Unavailable},
    secret::Secret,
    telemetry::registered,
};
use parse::Callback;

/// The only path Sinch posts to.
pub const PATH: &str = "/webhooks/sinch";

/// How the receiver checks callbacks.
#[derive(Debug, Clone)]
pub struct WebhookConfig {
    /// Any of these verifies a callback; empty only when unsigned callbacks were explicitly allowed.
    pub secrets: Vec<Secret>,
    /// How far a callback's timestamp may be from now, either way.
    pub tolerance: Duration,
    /// The largest body accepted.
    pub max_body: usize,
    /// The longest a request may take, body included.
    pub request_timeout: Duration,
    /// The most callbacks handled at once; the next is answered 503 at once.
    pub max_pending: usize,
}

/// The receiver's state, shared by every request.
pub struct Receiver {
    config: WebhookConfig,
    /// Where accepted notifications go (and where nonces are claimed).
    log: Arc<EventLog>,
    /// One permit per callback being handled.
    pending: Semaphore,
    /// One permit per byte of the bodies still arriving: `max_pending` whole bodies.
    arriving: Semaphore,
}

impl Receiver {
    pub fn new(config: WebhookConfig, log: Arc<EventLog>) -> Receiver {
        let pending = Semaphore::new(config.max_pending.min(Semaphore::MAX_PERMITS));
        let arriving = Semaphore::new(arriving_budget(&config));
        Receiver {
            config,
            log,
            pending,
            arriving,
        }
    }
}

/// The bytes of bodies that may be arriving at once: `max_pending` whole bodies.
fn arriving_budget(config: &WebhookConfig) -> usize {
    config
        .max_pending
        .saturating_mul(config.max_body)
        .min(Semaphore::MAX_PERMITS)
}

/// Why a callback was refused. Outward answers stay generic; the details go to the log.
#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    #[error("the content type is not application/json")]
    UnsupportedMediaType,
    #[error("the signature headers are missing: {0}")]
    MissingSignature(&'static str),
    #[error("the signature algorithm {0:?} is not HmacSHA256")]
    UnsupportedAlgorithm(String),
    #[error("the signature does not verify with any configured secret")]
    BadSignature,
    #[error("the timestamp is {} away from now, beyond the tolerance", skew_text(*.0))]
    Stale(i64),
    #[error("the timestamp is not Unix seconds")]
    BadTimestamp,
    #[error("the nonce was already used")]
    Replayed,
    #[error(transparent)]
    Malformed(#[from] parse::ParseError),
    #[error(transparent)]
    Unavailable(#[from] Unavailable),
    #[error("too many callbacks are being handled at once")]
    Busy,
    #[error("the bodies arriving at once exceed the budget of {0} bytes")]
    BodiesOverBudget(usize),
    #[error("the body is larger than {0} bytes")]
    TooLarge(usize),
    #[error("the body could not be read: {0}")]
    Unreadable(String),
    #[error("the body did not arrive within the webhook timeout")]
    BodyTooSlow,
    #[error("the event log did not take it within the webhook timeout")]
    HandOnTooSlow,
}

/// A timestamp's distance from now for the log: in seconds up to a day, beyond only "more than a day" (the header
/// is the sender's, and may carry any number).
fn skew_text(skew: i64) -> String {
    const DAY: u64 = 86_400;
    if skew.unsigned_abs() <= DAY {
        format!("{skew} s")
    } else {
        "more than a day".to_owned()
    }
}

impl WebhookError {
    /// The `result` label of the webhook counter, the HTTP status and the generic body text: the one place where
    /// a refusal becomes an answer.
    fn answer(&self) -> (&'static str, StatusCode, &'static str) {
        match self {
            WebhookError::UnsupportedMediaType => (
                "unsupported_media_type",
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "expected application/json",
            ),
            WebhookError::MissingSignature(_) => (
                "missing_signature",
                StatusCode::UNAUTHORIZED,
                "bad or missing signature",
            ),
            WebhookError::UnsupportedAlgorithm(_) => (
                "unsupported_algorithm",
                StatusCode::UNAUTHORIZED,
                "bad or missing signature",
            ),
            WebhookError::BadSignature => ("bad_signature", StatusCode::UNAUTHORIZED, "bad or missing signature"),
            WebhookError::Stale(_) => ("stale", StatusCode::UNAUTHORIZED, "stale or bad timestamp"),
            WebhookError::BadTimestamp => ("bad_timestamp", StatusCode::UNAUTHORIZED, "stale or bad timestamp"),
            WebhookError::Replayed => ("replayed", StatusCode::UNAUTHORIZED, "nonce already used"),
            WebhookError::Malformed(parse::ParseError::Utf8) => {
                ("malformed", StatusCode::BAD_REQUEST, "body is not UTF-8")
            }
            WebhookError::Malformed(parse::ParseError::Json { .. }) => {
                ("malformed", StatusCode::BAD_REQUEST, "body is not a Sinch callback")
            }
            WebhookError::Unavailable(_) | WebhookError::HandOnTooSlow => (
                "unavailable",
                StatusCode::SERVICE_UNAVAILABLE,
                "cannot hand on now; retry",
            ),
            WebhookError::Busy | WebhookError::BodiesOverBudget(_) => {
                ("shed", StatusCode::SERVICE_UNAVAILABLE, "busy; retry")
            }
            WebhookError::TooLarge(_) => ("too_large", StatusCode::PAYLOAD_TOO_LARGE, "body too large"),
            WebhookError::Unreadable(_) => ("unreadable", StatusCode::BAD_REQUEST, "body could not be read"),
            WebhookError::BodyTooSlow => ("timeout", StatusCode::REQUEST_TIMEOUT, "body not received in time"),
        }
    }
}

impl IntoResponse for WebhookError {
    /// The answer, counted under its `result` label.
    fn into_response(self) -> Response {
        let (result, status, message) = self.answer();
        let mut response = refused(result, status, message);
        if status == StatusCode::SERVICE_UNAVAILABLE {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
        }
        response
    }
}

/// The receiver's routes: `POST /webhooks/sinch` (with or without a trailing `/`: the registration takes both for
/// the service's) and `GET /healthz`; 404 elsewhere, 405 for a wrong method — counted, for a webhook registered
/// with a mistyped path is otherwise invisible.
pub fn router(receiver: Arc<Receiver>) -> Router {
    Router::new()
        .route(PATH, post(receive))
        .route(&format!("{PATH}/"), post(receive))
        .route("/healthz", get(|| async { "ok" }))
        .fallback(|method: axum::http::Method| async move {
            // A POST elsewhere is a callback to a mistyped target; anything else, a stray (a scanner, a probe).
            let result = if method == axum::http::Method::POST {
                "not_found"
            } else {
                "stray"
            };
            refused(result, StatusCode::NOT_FOUND, "no such path")
        })
        .method_not_allowed_fallback(|| async {
            refused(
                "method_not_allowed",
                StatusCode::METHOD_NOT_ALLOWED,
                "method not allowed",
            )
        })
        .with_state(receiver)
}

/// A refusal, as JSON `{"error": message}`, counted in `capability_webhooks_total` under `result`.
fn refused(result: &'static str, status: StatusCode, message: &'static str) -> Response {
    metrics::counter!("capability_webhooks_total", "result" => result).increment(1);
    (status, axum::Json(serde_json::json!({ "error": message }))).into_response()
}

/// The largest header block an HTTP/1.1 request may send (hyper's read buffer; 431 beyond). An HTTP/2 request's
/// stays at hyper's 16 KiB.
const MAX_HEADERS: usize = 64 * 1024;
/// Requests at once on one HTTP/2 connection to the webhook.
const MAX_STREAMS: u32 = 16;

/// Serves `router` on `listener` until `shutdown`, then lets requests in flight finish (the caller bounds that);
/// over TLS when `tls` is set (the handshake, too, must finish within `header_timeout`). The admin port is
/// served by it too, without TLS.
///
/// Served with hyper directly rather than `axum::serve`, which sets no timer: without one, hyper's header-read
/// timeout never applies and a client trickling its headers holds a connection for ever. Here a request's
/// headers must arrive within `header_timeout`, and a callback's body and hand-off within the webhook timeout
/// (the receiver's own); the listener's own limits (a cap, first-byte and idle timeouts) apply beneath.
pub async fn serve(
    listener: GuardedListener,
    router: Router,
    tls: Option<Arc<rustls::ServerConfig>>,
    header_timeout: Duration,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let mut builder = Builder::new(TokioExecutor::new());
    // A request's headers are held while its body is awaited, before it takes a place among the callbacks in hand
    // or a share of their bytes: bounded here, per connection (Sinch's are a few hundred bytes). At the connection
    // cap that is 64 MiB over HTTP/1.1 and 256 MiB over HTTP/2, where hyper's defaults allowed 400 MiB and 3 GiB.
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout)
        .max_buf_size(MAX_HEADERS);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(MAX_STREAMS);
    let builder = Arc::new(builder);
    let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
    let graceful = GracefulShutdown::new();
    loop {
        let stream = tokio::select! {
            stream = listener.accept() => stream,
            () = shutdown.cancelled() => break,
        };
        let (builder, router, watcher, acceptor) =
            (builder.clone(), router.clone(), graceful.watcher(), acceptor.clone());
        tokio::spawn(async move {
            let activity = stream.activity().clone();
            let Some(acceptor) = acceptor else {
                return serve_connection(&builder, stream, activity, router, watcher).await;
            };
            match tokio::time::timeout(header_timeout, acceptor.accept(stream)).await {
                Ok(Ok(stream)) => serve_connection(&builder, stream, activity, router, watcher).await,
                Ok(Err(e)) => tracing::debug!(error = %e, "webhook TLS handshake failed"),
                Err(_) => tracing::debug!("webhook TLS handshake timed out"),
            }
        });
    }
    graceful.shutdown().await;
    Ok(())
}

/// Serves one connection (plain or TLS) until it closes or the graceful shutdown it is watched by ends it. Each
/// request counts as in flight on the connection until its response is sent; a request whose own head carried
/// both `Content-Length` and `Transfer-Encoding` gets 400 and the connection is closed (RFC 9112, section 6.1).
async fn serve_connection<I>(
    builder: &Builder<TokioExecutor>,
    io: I,
    activity: Arc<Activity>,
    router: Router,
    watcher: Watcher,
) where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let io = TokioIo::new(HeadCheck::new(io, activity.clone()));
    let service = tower::service_fn(move |request: Request<Incoming>| {
        let busy = activity.begin();
        let ambiguous = activity.ambiguous_request();
        let mut router = router.clone();
        async move {
            if ambiguous {
                metrics::counter!("capability_http_requests_refused_total", "reason" => "ambiguous_length")
                    .increment(1);
                let refusal = (
                    StatusCode::BAD_REQUEST,
                    [(header::CONNECTION, "close")],
                    "Content-Length and Transfer-Encoding together",
                );
                return Ok::<_, Infallible>(refusal.into_response());
            }
            let response = tower::Service::call(&mut router, request).await?;
            Ok(response.map(|body| Body::new(BusyBody::new(body, busy))))
        }
    });
    let connection = builder.serve_connection_with_upgrades(io, TowerToHyperService::new(service));
    let _ = watcher.watch(connection.into_owned()).await;
}

/// Admission: a callback is handled only while fewer than `max_pending` are; otherwise it is answered 503 at
/// once, before its signature is checked, so that a flood costs little and queues nowhere.
fn admit(receiver: &Receiver) -> Result<Pending<'_>, WebhookError> {
    receiver.pending.try_acquire().map(Pending::new).map_err(|_| {
        tracing::debug!("callback shed: too many at once");
        WebhookError::Busy
    })
}

/// Reads a body as it arrives, the memory it holds taken from the budget of bytes arriving at once (a 503 past
/// it: what its buffer grows by, [`append_charged`]) and the whole within `max_body` (a 413 once past it:
/// answered earlier, a client still sending would see its connection reset rather than the answer); the budget's
/// share is given back when the returned guard is dropped.
async fn read_body(receiver: &Receiver, body: Body) -> Result<(Bytes, Option<SemaphorePermit<'_>>), WebhookError> {
    use futures::StreamExt;
    let max_body = receiver.config.max_body;
    let mut held: Option<SemaphorePermit<'_>> = None;
    let mut read = Vec::new();
    let mut chunks = body.into_data_stream();
    while let Some(chunk) = chunks.next().await {
        let chunk = chunk.map_err(|e| WebhookError::Unreadable(e.to_string()))?;
        if read.len() + chunk.len() > max_body {
            return Err(WebhookError::TooLarge(max_body));
        }
        append_charged(&mut read, &chunk, max_body, |grown| {
            let Ok(share) = receiver.arriving.try_acquire_many(grown as u32) else {
                tracing::debug!("callback shed: too many bytes arriving at once");
                return Err(WebhookError::BodiesOverBudget(arriving_budget(&receiver.config)));
            };
            match &mut held {
                Some(held) => held.merge(share),
                None => held = Some(share),
            }
            Ok(())
        })?;
    }
    Ok((read.into(), held))
}

/// Appends `chunk` to `read`, first charging `charge` what the buffer grows by: it grows to twice its capacity
/// (as a `Vec` does, so that a body in many chunks is not copied for each), at least what it needs and at most
/// `max_body`. Charged by capacity, the budget of bytes arriving bounds what the buffers hold, not only what they
/// were sent.
fn append_charged<E>(
    read: &mut Vec<u8>,
    chunk: &[u8],
    max_body: usize,
    charge: impl FnOnce(usize) -> Result<(), E>,
) -> Result<(), E> {
    let needed = read.len() + chunk.len();
    if needed > read.capacity() {
        let capacity = (read.capacity() * 2).clamp(needed, max_body.max(needed));
        charge(capacity - read.capacity())?;
        read.reserve_exact(capacity - read.len());
    }
    read.extend_from_slice(chunk);
    Ok(())
}

/// A callback being handled, counted in `capability_webhooks_pending` until its handling ends, however it ends
/// (answered, timed out, or its client gone).
struct Pending<'a> {
    _permit: SemaphorePermit<'a>,
}

impl<'a> Pending<'a> {
    fn new(permit: SemaphorePermit<'a>) -> Pending<'a> {
        registered!(Gauge, "capability_webhooks_pending").increment(1.0);
        Pending { _permit: permit }
    }
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        registered!(Gauge, "capability_webhooks_pending").decrement(1.0);
    }
}

/// Checks one callback, then hands it on in a span that carries its request_id and channel (masked). The span is
/// made with its fields once they are known: recording them into a span made earlier costs the JSON log layer a
/// re-serialisation of the span's fields for each.
async fn receive(State(receiver): State<Arc<Receiver>>, mut request: Request<Body>) -> Response {
    // The headers are taken, not cloned as the `HeaderMap` extractor does.
    let headers = std::mem::take(request.headers_mut());
    // The body must arrive in time (408: the sender was slow), and the log take it by the same time (503: we were
    // slow, and Sinch redelivers; a callback appended just as the time ran out comes again as a duplicate).
    let deadline = tokio::time::Instant::now() + receiver.config.request_timeout;
    let arrived = tokio::time::timeout_at(deadline, read_body(&receiver, request.into_body()))
        .await
        .unwrap_or(Err(WebhookError::BodyTooSlow));
    let pending = arrived.and_then(|arrived| Ok((arrived, admit(&receiver)?)));
    let ((body, _arriving), _pending) = match pending {
        Ok(admitted) => admitted,
        Err(refused) => return refused.into_response(),
    };
    let checked = check(&receiver.config, &headers, &body, SystemTime::now());
    let span = match &checked {
        Ok(Checked {
            callback: Callback::Capability(n),
            ..
        }) => tracing::info_span!(
            "receive",
            request_id = %mask_digits(&n.request_id),
            channel = %mask_digits(n.channel.as_sinch()),
        ),
        _ => tracing::info_span!("receive"),
    };
    async {
        let handed_on = match checked {
            Ok(checked) => tokio::time::timeout_at(deadline, hand_on(&receiver, checked))
                .await
                .unwrap_or(Err(WebhookError::HandOnTooSlow)),
            Err(error) => Err(error),
        };
        match handed_on {
            Ok(counted) => {
                counted.increment(1);
                StatusCode::OK.into_response()
            }
            Err(error) => {
                tracing::warn!(%error, "callback refused");
                error.into_response()
            }
        }
    }
    .instrument(span)
    .await
}

/// Hands on a checked callback; on success, the `capability_webhooks_total` it counts under (its `result`).
async fn hand_on(receiver: &Receiver, checked: Checked<'_>) -> Result<&'static metrics::Counter, WebhookError> {
    let Checked { nonce, callback } = checked;
    let accepted = registered!(Counter, "capability_webhooks_total", "result" => "accepted");
    let (notification, nothing_to_append) = match callback {
        Callback::Capability(notification) => (Some(*notification), accepted),
        Callback::OtherTrigger => (
            None,
            registered!(Counter, "capability_webhooks_total", "result" => "ignored"),
        ),
        Callback::WithoutRequestId => {
            tracing::warn!("a capability callback without request_id: acknowledged, not delivered");
            let without = registered!(Counter, "capability_webhooks_total", "result" => "without_request_id");
            (None, without)
        }
    };
    let request_id = notification.as_ref().map(|n| {
        tracing::debug!(identity = %mask(&n.identity), "callback verified");
        n.request_id.clone()
    });
    match receiver.log.accept(nonce, notification).await? {
        Accepted::Appended { .. } => Ok(accepted),
        Accepted::Duplicate => Ok(registered!(Counter, "capability_webhooks_total", "result" => "duplicate")),
        Accepted::Capped { first } => {
            if first {
                tracing::warn!(
                    request_id = %mask_digits(request_id.as_deref().unwrap_or_default()),
                    "a request received more notifications than it may hold: the excess is acknowledged and dropped"
                );
            }
            Ok(registered!(Counter, "capability_webhooks_total", "result" => "capped"))
        }
        Accepted::NothingToAppend => Ok(nothing_to_append),
        Accepted::Replayed => Err(WebhookError::Replayed),
    }
}

/// A callback that passed every check that needs nothing but the request itself.
#[derive(Debug)]
pub struct Checked<'h> {
    /// The nonce to claim when handing on (none when unsigned callbacks are allowed).
    pub nonce: Option<Nonce<'h>>,
    pub callback: Callback,
}

/// Checks the content type and the signature headers at `now`, then parses the body. What it accepts is
/// genuine; the nonce still has to be claimed.
pub fn check<'h>(
    config: &WebhookConfig,
    headers: &'h HeaderMap,
    body: &[u8],
    now: SystemTime,
) -> Result<Checked<'h>, WebhookError> {
    let json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("application/json"));
    if !json {
        return Err(WebhookError::UnsupportedMediaType);
    }
    let nonce = verify(config, headers, body, now)?;
    let callback = parse::parse(body, now)?;
    Ok(Checked { nonce, callback })
}

/// How far apart two replicas' clocks may be: a nonce is remembered this much longer than this replica's clock
/// alone would need, since a replica whose clock is behind still takes its timestamp that much later.
const CLOCK_SPREAD: Duration = Duration::from_secs(60);

/// Checks the signature headers; returns the nonce to claim (none when unsigned callbacks are allowed), to be
/// remembered while its timestamp stays within the tolerance on any replica ([`CLOCK_SPREAD`], and a second
/// more, for rounding).
fn verify<'h>(
    config: &WebhookConfig,
    headers: &'h HeaderMap,
    body: &[u8],
    now: SystemTime,
) -> Result<Option<Nonce<'h>>, WebhookError> {
    if config.secrets.is_empty() {
        return Ok(None);
    }
    // Looked up as header names: a name given as a string is parsed again on every look-up.
    static SIGNATURE: HeaderName = HeaderName::from_static(signature::SIGNATURE);
    static TIMESTAMP: HeaderName = HeaderName::from_static(signature::TIMESTAMP);
    static NONCE: HeaderName = HeaderName::from_static(signature::NONCE);
    static ALGORITHM: HeaderName = HeaderName::from_static(signature::ALGORITHM);
    // A header that is there but not text cannot verify: a bad signature, not a missing one.
    let get = |name: &'static HeaderName| match headers.get(name) {
        Some(value) => value.to_str().map_err(|_| WebhookError::BadSignature),
        None => Err(WebhookError::MissingSignature(name.as_str())),
    };
    let signature = get(&SIGNATURE)?;
    let timestamp = get(&TIMESTAMP)?;
    let nonce = get(&NONCE)?;
    if let Some(algorithm) = headers.get(&ALGORITHM) {
        let algorithm = algorithm.to_str().unwrap_or_default();
        if !algorithm.eq_ignore_ascii_case(signature::HMAC_SHA256) {
            // Shown in the log: bounded, and without a long number the sender may have put there.
            let shown: String = algorithm.chars().take(64).collect();
            return Err(WebhookError::UnsupportedAlgorithm(mask_digits(&shown).into_owned()));
        }
    }
    let secrets = config.secrets.iter().map(Secret::expose);
    if !signature::verify(secrets, body, nonce, timestamp, signature) {
        return Err(WebhookError::BadSignature);
    }
    let sent: i64 = timestamp.trim().parse().map_err(|_| WebhookError::BadTimestamp)?;
    let now = now.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs() as i64;
    let skew = now.saturating_sub(sent);
    let tolerance = config.tolerance.as_secs();
    if skew.unsigned_abs() > tolerance {
        return Err(WebhookError::Stale(skew));
    }
    Ok(Some(Nonce {
        value: nonce,
        remember_for: Duration::from_secs(tolerance.saturating_add_signed(-skew) + 1) + CLOCK_SPREAD,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    const BODY: &[u8] = br#"{"app_id": "A", "unsupported_callback": {}}"#;

    /// A receiver's configuration with the secret `s`.
    fn config() -> WebhookConfig {
        WebhookConfig {
            secrets: vec![Secret::new("s")],
            tolerance: Duration::from_secs(300),
            max_body: 1 << 20,
            request_timeout: Duration::from_secs(10),
            max_pending: 1,
        }
    }

    /// The headers of `body` signed now with `s`, as JSON.
    fn signed(body: &[u8]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(header::CONTENT_TYPE, "application/json".parse().unwrap());
        for (name, value) in signature::headers("s", body) {
            headers.insert(name, value.parse().unwrap());
        }
        headers
    }

    /// A replica whose clock is a minute behind this one's takes a callback's timestamp a minute longer: its
    /// nonce is remembered that long, so that a replay to that replica is refused.
    #[test]
    fn a_nonce_is_remembered_while_a_replica_a_minute_behind_takes_its_timestamp() {
        let (config, body) = (config(), BODY);
        let headers = signed(body);
        // Received here 30 s after it was signed (by this replica's clock).
        let now = SystemTime::now() + Duration::from_secs(30);
        let checked = check(&config, &headers, body, now).unwrap();
        let remembered = checked.nonce.unwrap().remember_for;
        // The other replica takes it until `sent + 300 s` by its clock: `sent + 360 s` by this one's.
        assert!(remembered >= Duration::from_secs(360 - 30), "{remembered:?}");
    }

    /// A body's buffer grows by doubling, but never past the largest body, and what it holds is what the budget
    /// of bytes arriving was charged.
    #[test]
    fn a_bodys_buffer_never_grows_past_the_largest_body_nor_past_its_charge() {
        let max_body = 1 << 20;
        let (mut read, mut charged) = (Vec::new(), 0);
        let chunk = [7; 1000];
        while read.len() + chunk.len() <= max_body {
            append_charged(&mut read, &chunk, max_body, |grown| {
                charged += grown;
                Ok::<_, ()>(())
            })
            .unwrap();
            assert!(
                read.capacity() <= max_body,
                "{} bytes held for {}",
                read.capacity(),
                read.len()
            );
            assert_eq!(read.capacity(), charged, "held beyond the charge");
        }
        assert_eq!(read.len(), max_body / 1000 * 1000);
    }

    /// A signature header that is there but not text is a bad signature, not a missing one: the operator reading
    /// `capability_webhooks_total` or the log looks for a forger, not for a sender that signs nothing.
    #[test]
    fn a_signature_header_that_is_not_text_is_a_bad_signature() {
        let (config, body) = (config(), BODY);
        for garbled in [signature::SIGNATURE, signature::TIMESTAMP, signature::NONCE] {
            let mut headers = signed(body);
            headers.insert(garbled, axum::http::HeaderValue::from_bytes(b"\xe9t\xe9").unwrap());
            let refused = check(&config, &headers, body, SystemTime::now()).err();
            assert!(
                matches!(refused, Some(WebhookError::BadSignature)),
                "{garbled}: {refused:?}"
            );
        }
    }
}
