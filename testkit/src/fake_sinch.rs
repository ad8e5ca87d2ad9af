//! A stand-in for Sinch's API and token endpoint on a loopback port: it records every request, answers queries
//! as Sinch does (echoing them) or as scripted, and issues tokens.

use std::{
    collections::VecDeque,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use axum::{
    Router,
    body::Bytes,
    extract::State,
    http::{HeaderMap, StatusCode, Uri},
    response::{IntoResponse, Response},
    routing::post,
};
use base64::Engine;
use tokio::net::TcpListener;
use tokio_util::sync::{CancellationToken, DropGuard};

/// The project the fake serves.
pub const PROJECT: &str = "proj-1";
/// The key id a service pointed at the fake is given.
pub const KEY_ID: &str = "key-id-1";
/// The key secret a service pointed at the fake is given.
pub const KEY_SECRET: &str = "key-secret-1";

/// The `authorization` header of HTTP Basic auth with these credentials, as Sinch expects it.
pub fn basic_auth(key_id: &str, key_secret: &str) -> String {
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{key_id}:{key_secret}"))
    )
}

/// One request the fake received.
#[derive(Debug, Clone)]
pub struct Recorded {
    /// The path it was sent to.
    pub path: String,
    /// Its headers.
    pub headers: HeaderMap,
    /// Its body, exactly as received.
    pub body: Bytes,
    /// When it arrived.
    pub at: Instant,
}

impl Recorded {
    /// The value of header `name`; empty when absent or not text.
    pub fn header(&self, name: &str) -> &str {
        self.headers.get(name).and_then(|v| v.to_str().ok()).unwrap_or_default()
    }

    /// The body as JSON; panics when it is not.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).expect("the body is JSON")
    }
}

/// A scripted answer.
#[derive(Debug, Clone)]
pub struct Canned {
    /// The HTTP status.
    pub status: u16,
    /// The headers (a JSON content type unless changed).
    pub headers: Vec<(&'static str, String)>,
    /// The body.
    pub body: String,
    /// How long to wait before answering.
    pub delay: Duration,
    /// The connection breaks after the body, before the answer is complete.
    pub cut_short: bool,
}

impl Canned {
    /// An answer with `status` and a JSON `body`, at once.
    pub fn new(status: u16, body: impl Into<String>) -> Canned {
        Canned {
            status,
            headers: vec![("content-type", "application/json".into())],
            body: body.into(),
            delay: Duration::ZERO,
            cut_short: false,
        }
    }

    /// A Sinch error body.
    pub fn sinch_error(status: u16, sinch_status: &str, message: &str) -> Canned {
        Canned::new(
            status,
            serde_json::json!({"error": {"code": status, "message": message, "status": sinch_status,
                "details": [{"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "X"}]}})
            .to_string(),
        )
    }

    /// The same, with one more header.
    pub fn header(mut self, name: &'static str, value: &str) -> Canned {
        self.headers.push((name, value.into()));
        self
    }

    /// The same, its connection broken after the body: the answer never completes.
    pub fn cut_short(mut self) -> Canned {
        self.cut_short = true;
        self
    }

    /// The same, given after `delay`.
    pub fn delayed(mut self, delay: Duration) -> Canned {
        self.delay = delay;
        self
    }
}

#[derive(Default)]
struct FakeState {
    /// Every request, in arrival order.
    requests: Mutex<Vec<Recorded>>,
    /// Answers to the next queries, in order; when empty, queries are echoed as Sinch does.
    query_script: Mutex<VecDeque<Canned>>,
    /// Answers to the next token requests; when empty, a new token is issued.
    token_script: Mutex<VecDeque<Canned>>,
    /// Answers to the next requests of its other APIs (apps, webhooks); when empty, 404.
    api_script: Mutex<VecDeque<Canned>>,
    /// A delay before every echoed query answer.
    echo_delay: Mutex<Duration>,
    /// The `expires_in` of the tokens it issues.
    token_lifetime_s: AtomicUsize,
    /// Numbers the tokens it issues: `token-1`, `token-2`, …
    tokens_issued: AtomicUsize,
    /// How many requests it recorded, for tests that wait for one.
    recorded: tokio::sync::watch::Sender<usize>,
}

/// An independent stand-in for Sinch's API and token endpoint.
pub struct FakeSinch {
    /// Where it listens, on 127.0.0.1.
    pub addr: SocketAddr,
    /// What it recorded and what it is scripted to answer.
    state: Arc<FakeState>,
    /// Stops the server when the fake is dropped.
    _stop: DropGuard,
}

impl FakeSinch {
    /// Starts it on a free port of 127.0.0.1, issuing tokens valid for an hour and echoing queries.
    pub async fn start() -> FakeSinch {
        let state = Arc::new(FakeState::default());
        state.token_lifetime_s.store(3600, Ordering::SeqCst);
        let router = Router::new()
            .route("/oauth2/token", post(fake_token))
            .route(&format!("/v1/projects/{PROJECT}/capability:query"), post(fake_query))
            .fallback(fake_other)
            .with_state(state.clone());
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = CancellationToken::new();
        let token = stop.clone();
        tokio::spawn(async move {
            axum::serve(listener, router)
                .with_graceful_shutdown(token.cancelled_owned())
                .await
                .unwrap()
        });
        FakeSinch {
            addr,
            state,
            _stop: stop.drop_guard(),
        }
    }

    /// Its base URL, for both the API and the token endpoint (`/oauth2/token`).
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Answers the next queries with these, in order.
    pub fn script_queries(&self, answers: impl IntoIterator<Item = Canned>) {
        self.state.query_script.lock().unwrap().extend(answers);
    }

    /// Answers the next token requests with these, in order.
    pub fn script_tokens(&self, answers: impl IntoIterator<Item = Canned>) {
        self.state.token_script.lock().unwrap().extend(answers);
    }

    /// Answers the next requests to any other path (Sinch's Apps and Webhooks APIs) with these, in order; past
    /// them, 404.
    pub fn script_api(&self, answers: impl IntoIterator<Item = Canned>) {
        self.state.api_script.lock().unwrap().extend(answers);
    }

    /// Forgets the token answers not given yet: the token endpoint is back.
    pub fn clear_token_script(&self) {
        self.state.token_script.lock().unwrap().clear();
    }

    /// Delays every echoed query answer by `delay`.
    pub fn set_echo_delay(&self, delay: Duration) {
        *self.state.echo_delay.lock().unwrap() = delay;
    }

    /// Issues the next tokens with this `expires_in`.
    pub fn set_token_lifetime(&self, seconds: usize) {
        self.state.token_lifetime_s.store(seconds, Ordering::SeqCst);
    }

    /// Every request so far, in arrival order.
    pub fn requests(&self) -> Vec<Recorded> {
        self.state.requests.lock().unwrap().clone()
    }

    /// The capability queries so far.
    pub fn queries(&self) -> Vec<Recorded> {
        self.requests()
            .into_iter()
            .filter(|r| r.path.ends_with("capability:query"))
            .collect()
    }

    /// Waits until it has recorded `n` capability queries, and returns them.
    pub async fn until_queries(&self, n: usize) -> Vec<Recorded> {
        let mut recorded = self.state.recorded.subscribe();
        loop {
            let queries = self.queries();
            if queries.len() >= n {
                return queries;
            }
            recorded.changed().await.expect("the fake lives as long as its state");
        }
    }

    /// The token requests so far.
    pub fn token_requests(&self) -> Vec<Recorded> {
        self.requests()
            .into_iter()
            .filter(|r| r.path == "/oauth2/token")
            .collect()
    }
}

fn record(state: &FakeState, path: &str, headers: HeaderMap, body: Bytes) {
    state.requests.lock().unwrap().push(Recorded {
        path: path.to_owned(),
        headers,
        body,
        at: Instant::now(),
    });
    state.recorded.send_modify(|n| *n += 1);
}

async fn answer(canned: Canned) -> Response {
    tokio::time::sleep(canned.delay).await;
    let status = StatusCode::from_u16(canned.status).unwrap();
    let mut response = match canned.cut_short {
        false => (status, canned.body).into_response(),
        true => {
            use futures::StreamExt;
            let start = futures::stream::iter([Ok(Bytes::from(canned.body))]);
            // A moment after the start, so that the status and the start leave first.
            let broken = futures::stream::once(async {
                tokio::time::sleep(Duration::from_millis(50)).await;
                Err(std::io::Error::new(std::io::ErrorKind::ConnectionReset, "cut short"))
            });
            let parts = start.chain(broken);
            (status, axum::body::Body::from_stream(parts)).into_response()
        }
    };
    for (name, value) in canned.headers {
        response.headers_mut().insert(name, value.parse().unwrap());
    }
    response
}

async fn fake_token(State(state): State<Arc<FakeState>>, headers: HeaderMap, body: Bytes) -> Response {
    record(&state, "/oauth2/token", headers, body);
    let scripted = state.token_script.lock().unwrap().pop_front();
    if let Some(canned) = scripted {
        return answer(canned).await;
    }
    let n = state.tokens_issued.fetch_add(1, Ordering::SeqCst) + 1;
    let lifetime = state.token_lifetime_s.load(Ordering::SeqCst);
    answer(Canned::new(
        200,
        serde_json::json!({"access_token": format!("token-{n}"), "token_type": "bearer",
            "expires_in": lifetime, "scope": ""})
        .to_string(),
    ))
    .await
}

async fn fake_query(State(state): State<Arc<FakeState>>, headers: HeaderMap, body: Bytes) -> Response {
    record(
        &state,
        &format!("/v1/projects/{PROJECT}/capability:query"),
        headers,
        body.clone(),
    );
    let scripted = state.query_script.lock().unwrap().pop_front();
    if let Some(canned) = scripted {
        return answer(canned).await;
    }
    let mut echo: serde_json::Value = serde_json::from_slice(&body).unwrap();
    if echo.get("request_id").is_none() {
        echo["request_id"] = "sinch-generated-id".into();
    }
    let delay = *state.echo_delay.lock().unwrap();
    answer(Canned::new(200, echo.to_string()).delayed(delay)).await
}

async fn fake_other(State(state): State<Arc<FakeState>>, uri: Uri, headers: HeaderMap, body: Bytes) -> Response {
    record(&state, uri.path(), headers, body);
    let scripted = state.api_script.lock().unwrap().pop_front();
    match scripted {
        Some(canned) => answer(canned).await,
        None => (StatusCode::NOT_FOUND, format!("the fake Sinch has no {uri}")).into_response(),
    }
}
