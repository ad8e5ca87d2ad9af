//! Test harness: a fake Sinch on a loopback port, the real service in-process on port 0, and the real binary.
#![allow(dead_code)] // each test crate uses its own part of the harness

pub mod redis;

use std::{
    collections::VecDeque,
    net::SocketAddr,
    process::Stdio,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use axum::{
    Router,
    body::Bytes,
    extract::State,
    http::{HeaderMap, StatusCode},
    response::{IntoResponse, Response},
    routing::post,
};
use capability_facade::{
    Listeners,
    config::{Config, ConfigError, ServeArgs},
    grpc::pb::{self, capability_service_client::CapabilityServiceClient},
};
use clap::Parser;
use tokio::{
    io::{AsyncBufReadExt, BufReader},
    net::TcpListener,
    task::JoinHandle,
};
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

pub const PROJECT: &str = "proj-1";
pub const KEY_ID: &str = "key-id-1";
pub const KEY_SECRET: &str = "key-secret-1";
pub const WEBHOOK_SECRET: &str = "whsec-1";

/// One request the fake received.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub path: String,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Recorded {
    pub fn header(&self, name: &str) -> &str {
        self.headers.get(name).and_then(|v| v.to_str().ok()).unwrap_or_default()
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).expect("the body is JSON")
    }
}

/// A scripted answer.
#[derive(Debug, Clone)]
pub struct Canned {
    pub status: u16,
    pub headers: Vec<(&'static str, String)>,
    pub body: String,
    pub delay: Duration,
}

impl Canned {
    pub fn new(status: u16, body: impl Into<String>) -> Canned {
        Canned {
            status,
            headers: vec![("content-type", "application/json".into())],
            body: body.into(),
            delay: Duration::ZERO,
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

    pub fn header(mut self, name: &'static str, value: &str) -> Canned {
        self.headers.push((name, value.into()));
        self
    }

    pub fn delayed(mut self, delay: Duration) -> Canned {
        self.delay = delay;
        self
    }
}

#[derive(Default)]
struct FakeState {
    requests: Mutex<Vec<Recorded>>,
    /// Answers to the next queries, in order; when empty, queries are echoed as Sinch does.
    query_script: Mutex<VecDeque<Canned>>,
    /// Answers to the next token requests; when empty, a new token is issued.
    token_script: Mutex<VecDeque<Canned>>,
    /// A delay before every echoed query answer.
    echo_delay: Mutex<Duration>,
    token_lifetime_s: AtomicUsize,
    tokens_issued: AtomicUsize,
}

/// An independent stand-in for Sinch's API and token endpoint.
pub struct FakeSinch {
    pub addr: SocketAddr,
    state: Arc<FakeState>,
    _stop: tokio_util::sync::DropGuard,
}

impl FakeSinch {
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

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Answers the next queries with these, in order.
    pub fn script_queries(&self, answers: impl IntoIterator<Item = Canned>) {
        self.state.query_script.lock().unwrap().extend(answers);
    }

    pub fn script_tokens(&self, answers: impl IntoIterator<Item = Canned>) {
        self.state.token_script.lock().unwrap().extend(answers);
    }

    /// Forgets the token answers not given yet: the token endpoint is back.
    pub fn clear_token_script(&self) {
        self.state.token_script.lock().unwrap().clear();
    }

    pub fn set_echo_delay(&self, delay: Duration) {
        *self.state.echo_delay.lock().unwrap() = delay;
    }

    pub fn set_token_lifetime(&self, seconds: usize) {
        self.state.token_lifetime_s.store(seconds, Ordering::SeqCst);
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.state.requests.lock().unwrap().clone()
    }

    pub fn queries(&self) -> Vec<Recorded> {
        self.requests()
            .into_iter()
            .filter(|r| r.path.ends_with("capability:query"))
            .collect()
    }

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
    });
}

async fn answer(canned: Canned) -> Response {
    tokio::time::sleep(canned.delay).await;
    let mut response = (StatusCode::from_u16(canned.status).unwrap(), canned.body).into_response();
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

async fn fake_other(headers: HeaderMap, uri: axum::http::Uri) -> Response {
    let _ = headers;
    (StatusCode::NOT_FOUND, format!("the fake Sinch has no {uri}")).into_response()
}

#[derive(Parser)]
struct TestCli {
    #[command(flatten)]
    serve: ServeArgs,
}

/// A configuration pointing at `fake`, with extra flags.
pub fn config(fake_url: &str, extra: &[&str]) -> Config {
    try_config(fake_url, extra).expect("valid test configuration")
}

/// [`config`], or why it is refused.
pub fn try_config(fake_url: &str, extra: &[&str]) -> Result<Config, ConfigError> {
    let mut flags = vec![
        "test".to_owned(),
        "--grpc-addr=127.0.0.1:0".to_owned(),
        format!("--sinch-project-id={PROJECT}"),
        format!("--sinch-key-id={KEY_ID}"),
        format!("--sinch-key-secret={KEY_SECRET}"),
        format!("--sinch-api-url={fake_url}"),
        format!("--sinch-auth-url={fake_url}/oauth2/token"),
        format!("--sinch-webhook-secrets={WEBHOOK_SECRET}"),
        "--log-format=text".to_owned(),
    ];
    // A flag given in `extra` replaces the default of the same name.
    let name = |flag: &str| flag.split('=').next().unwrap_or_default().to_owned();
    flags.retain(|f| !extra.iter().any(|e| name(e) == name(f)));
    flags.extend(extra.iter().map(|s| s.to_string()));
    Config::from_args(&TestCli::parse_from(flags).serve)
}

/// The real service, in-process, on loopback ports.
pub struct Service {
    pub grpc_addr: SocketAddr,
    pub webhook_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub shutdown: CancellationToken,
    pub task: JoinHandle<Result<(), capability_facade::BoxError>>,
}

impl Service {
    pub async fn start(config: Config) -> Service {
        let grpc = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let grpc_addr = grpc.local_addr().unwrap();
        let webhook = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let webhook_addr = webhook.local_addr().unwrap();
        let admin = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let admin_addr = admin.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let listeners = Listeners { grpc, webhook, admin };
        let task = tokio::spawn(capability_facade::run(config, listeners, shutdown.clone()));
        Service {
            grpc_addr,
            webhook_addr,
            admin_addr,
            shutdown,
            task,
        }
    }

    /// Starts the service against `fake` with extra flags.
    pub async fn against(fake: &FakeSinch, extra: &[&str]) -> Service {
        Service::start(config(&fake.url(), extra)).await
    }

    pub async fn channel(&self) -> Channel {
        Channel::from_shared(format!("http://{}", self.grpc_addr))
            .unwrap()
            .connect()
            .await
            .unwrap()
    }

    pub async fn client(&self) -> CapabilityServiceClient<Channel> {
        CapabilityServiceClient::new(self.channel().await)
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

pub fn identities(pairs: &[(pb::Channel, &str)]) -> pb::Recipient {
    pb::Recipient {
        recipient: Some(pb::recipient::Recipient::IdentifiedBy(pb::IdentifiedBy {
            channel_identities: pairs
                .iter()
                .map(|(channel, identity)| pb::ChannelIdentity {
                    channel: (*channel).into(),
                    identity: identity.to_string(),
                    ..Default::default()
                })
                .collect(),
        })),
    }
}

pub fn contact(id: &str) -> pb::Recipient {
    pb::Recipient {
        recipient: Some(pb::recipient::Recipient::ContactId(id.into())),
    }
}

pub fn query(recipient: pb::Recipient, request_id: &str) -> pb::QueryCapabilityRequest {
    pb::QueryCapabilityRequest {
        app_id: "APP-1".into(),
        recipient: Some(recipient),
        request_id: request_id.into(),
    }
}

/// The real binary, started with `env`, its listening addresses read from its JSON log.
pub struct Binary {
    pub child: tokio::process::Child,
    pub grpc_addr: SocketAddr,
    pub webhook_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    /// Every log line so far.
    pub log: Arc<Mutex<Vec<String>>>,
}

impl Binary {
    pub async fn spawn(env: &[(&str, String)]) -> Binary {
        let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_capability-facade"));
        command
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("CAPABILITY_GRPC_ADDR", "127.0.0.1:0")
            .env("CAPABILITY_WEBHOOK_ADDR", "127.0.0.1:0")
            .env("CAPABILITY_ADMIN_ADDR", "127.0.0.1:0")
            .env("CAPABILITY_LOG_FORMAT", "json")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        for (k, v) in env {
            command.env(k, v);
        }
        let mut child = command.spawn().expect("the binary starts");
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = tokio::sync::oneshot::channel();
        let lines = log.clone();
        tokio::spawn(async move {
            let mut tx = Some(tx);
            let mut reader = BufReader::new(stderr).lines();
            while let Ok(Some(line)) = reader.next_line().await {
                if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line)
                    && v["message"] == "listening"
                    && let Some(tx) = tx.take()
                {
                    let addr = |name: &str| v[name].as_str().unwrap().parse::<SocketAddr>().unwrap();
                    let _ = tx.send((addr("grpc"), addr("webhook"), addr("admin")));
                }
                lines.lock().unwrap().push(line);
            }
        });
        let (grpc_addr, webhook_addr, admin_addr) = tokio::time::timeout(Duration::from_secs(30), rx)
            .await
            .ok()
            .and_then(Result::ok)
            .unwrap_or_else(|| panic!("the binary did not report its address: {:?}", log.lock().unwrap()));
        Binary {
            child,
            grpc_addr,
            webhook_addr,
            admin_addr,
            log,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.grpc_addr)
    }

    pub fn signal(&self, signal: &str) {
        let pid = self.child.id().expect("still running").to_string();
        let status = std::process::Command::new("kill")
            .args([&format!("-{signal}"), &pid])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Waits for the process to exit, at most `limit`.
    pub async fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        tokio::time::timeout(limit, self.child.wait())
            .await
            .ok()
            .map(Result::unwrap)
    }

    pub fn log_text(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }
}

/// A configuration with no credentials: the in-process sandbox, with extra flags.
pub fn sandbox_config(extra: &[&str]) -> Config {
    let mut flags = vec![
        "test".to_owned(),
        "--grpc-addr=127.0.0.1:0".to_owned(),
        "--log-format=text".to_owned(),
    ];
    flags.extend(extra.iter().map(|s| s.to_string()));
    Config::from_args(&TestCli::parse_from(flags).serve).expect("valid test configuration")
}

/// Signs as Sinch does, independently of the service's own code.
pub fn sign(secret: &str, body: &[u8], nonce: &str, timestamp: &str) -> String {
    use base64::Engine;
    use hmac::{KeyInit, Mac};
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(body);
    mac.update(format!(".{nonce}.{timestamp}").as_bytes());
    base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
}

pub fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// The headers of a genuine callback: fresh nonce, current timestamp, signed with `secret`.
pub fn signed_headers(secret: &str, body: &[u8]) -> Vec<(&'static str, String)> {
    let nonce = ulid::Ulid::new().to_string();
    let timestamp = unix_now().to_string();
    vec![
        ("content-type", "application/json".into()),
        ("x-sinch-webhook-signature", sign(secret, body, &nonce, &timestamp)),
        ("x-sinch-webhook-signature-timestamp", timestamp),
        ("x-sinch-webhook-signature-nonce", nonce),
        ("x-sinch-webhook-signature-algorithm", "HmacSHA256".into()),
    ]
}

/// A CAPABILITY callback body, as Sinch sends it.
pub fn capability_body(request_id: &str, channel: &str, identity: &str, status: &str) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "app_id": "APP-1", "accepted_time": "2026-11-22T10:00:00.123456Z", "event_time": "2026-11-22T10:00:00Z",
        "project_id": "", "message_metadata": "",
        "capability_notification": {"request_id": request_id, "channel": channel, "identity": identity,
            "capability_status": status}
    }))
    .unwrap()
}

/// Posts a body with these headers to the webhook; returns the status.
pub async fn post_webhook(addr: SocketAddr, body: Vec<u8>, headers: &[(&str, String)]) -> u16 {
    let mut request = reqwest_client()
        .post(format!("http://{addr}/webhooks/sinch"))
        .body(body);
    for (name, value) in headers {
        request = request.header(*name, value);
    }
    request.send().await.unwrap().status().as_u16()
}

/// Posts a genuine callback (signed with the test secret).
pub async fn deliver(addr: SocketAddr, body: Vec<u8>) -> u16 {
    let headers = signed_headers(WEBHOOK_SECRET, &body);
    post_webhook(addr, body, &headers).await
}

pub fn reqwest_client() -> reqwest::Client {
    capability_facade::upstream::install_crypto_provider();
    reqwest::Client::new()
}

pub fn watch_request(request_id: &str, after_offset: u64, wait: Option<Duration>) -> pb::WatchCapabilityRequest {
    pb::WatchCapabilityRequest {
        request_id: request_id.into(),
        after_offset,
        wait: wait.map(|w| prost_types::Duration {
            seconds: w.as_secs() as i64,
            nanos: w.subsec_nanos() as i32,
        }),
    }
}

/// Reads a watch to its end: the notifications (offset, channel, raw status), then how it ended.
pub async fn drain(
    mut stream: tonic::Streaming<pb::WatchCapabilityResponse>,
) -> (Vec<(u64, String, String)>, Result<pb::Completion, tonic::Status>) {
    use pb::watch_capability_response::Event;
    let mut seen = Vec::new();
    loop {
        match stream.message().await {
            Ok(Some(pb::WatchCapabilityResponse {
                event: Some(Event::Notification(n)),
            })) => seen.push((n.offset, n.channel_raw, n.capability_status_raw)),
            Ok(Some(pb::WatchCapabilityResponse {
                event: Some(Event::Completion(c)),
            })) => {
                assert!(
                    stream.message().await.unwrap().is_none(),
                    "the stream ends after its completion"
                );
                return (seen, Ok(c));
            }
            Ok(Some(_)) => {}
            Ok(None) => panic!("the stream ended without a completion"),
            Err(status) => return (seen, Err(status)),
        }
    }
}

/// The environment that points the real binary at `fake`.
pub fn binary_env(fake: &FakeSinch) -> Vec<(&'static str, String)> {
    vec![
        ("SINCH_PROJECT_ID", PROJECT.into()),
        ("SINCH_KEY_ID", KEY_ID.into()),
        ("SINCH_KEY_SECRET", KEY_SECRET.into()),
        ("SINCH_API_URL", fake.url()),
        ("SINCH_AUTH_URL", format!("{}/oauth2/token", fake.url())),
        ("SINCH_WEBHOOK_SECRETS", WEBHOOK_SECRET.into()),
    ]
}

/// Watches `request_id` and returns the first notification.
pub async fn first_notification(service: &Service, request_id: &str) -> pb::CapabilityNotification {
    let mut client = service.client().await;
    let mut stream = client
        .watch_capability(watch_request(request_id, 0, None))
        .await
        .unwrap()
        .into_inner();
    match stream.message().await.unwrap().unwrap().event {
        Some(pb::watch_capability_response::Event::Notification(n)) => n,
        other => panic!("expected a notification, got {other:?}"),
    }
}
