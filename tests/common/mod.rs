//! Test harness: what needs the service crate (the real service in-process on port 0, its configuration, request
//! builders, reading a watch, the strict sandbox as Sinch) here; the rest (the fake Sinch, signed callbacks, real
//! redis-servers, the real binary) comes from `testkit` and is re-exported. The sandbox ([`Sandbox`]) is the
//! upstream wherever it serves; the independent fake only where independence is the point (what goes on the
//! wire, scripted answers).
#![allow(dead_code, unused_imports)] // each test crate uses its own part of the harness and of its re-exports

use std::{net::SocketAddr, time::Duration};

use capability_facade::sandbox::{self, SandboxConfig, webhooks::Destination};
use capability_facade::{
    Listeners,
    config::{Config, ConfigError},
    grpc::pb::watch_capability_response::Event,
    grpc::pb::{self, capability_service_client::CapabilityServiceClient},
};
use clap::Parser;
use serde_json::Value;
pub use testkit::{
    Canned, CapabilityCallback, FakeSinch, KEY_ID, KEY_SECRET, PROJECT, basic_auth, capability_body, sign,
    signed_headers, unix_now, webhook_url,
};
use tokio::{net::TcpListener, task::JoinHandle};
use tokio_util::sync::CancellationToken;
use tokio_util::sync::DropGuard;
use tonic::transport::Channel;

pub mod bulk;

/// A real redis-server, as `common::redis::RedisServer`.
pub mod redis {
    pub use testkit::RedisServer;
}

/// The webhook secret the service under test is given.
pub const WEBHOOK_SECRET: &str = "whsec-1";

#[derive(Parser)]
struct TestCli {
    #[command(flatten)]
    serve: Config,
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
    let config = TestCli::parse_from(flags).serve;
    config.check().map(|()| config)
}

/// Why the service configured with `extra` (against a fake Sinch at `fake_url`) refuses to start: a setting
/// refused when parsed or checked, or one found unusable when its component is built — before any port.
pub async fn start_error(fake_url: &str, extra: &[&str]) -> ConfigError {
    let config = match try_config(fake_url, extra) {
        Ok(config) => config,
        Err(e) => return e,
    };
    match capability_facade::Service::build(config).await {
        Err(capability_facade::StartError::Config(e)) => e,
        Err(e) => panic!("refused, but not for a setting: {e}"),
        Ok(_) => panic!("the service was built"),
    }
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

/// The real binary of this package, started with `env` (see [`testkit::Binary`]).
pub struct Binary(testkit::Binary);

impl Binary {
    pub async fn spawn(env: &[(&str, String)]) -> Binary {
        Binary(testkit::Binary::spawn(env!("CARGO_BIN_EXE_capability-facade"), env).await)
    }

    /// A connection to its gRPC port.
    pub async fn channel(&self) -> Channel {
        Channel::from_shared(self.url()).unwrap().connect().await.unwrap()
    }
}

// Only this package's tests know where its binary is (`CARGO_BIN_EXE_…`), so they wrap the kit's `Binary`, whose
// fields and methods they use as their own.
impl std::ops::Deref for Binary {
    type Target = testkit::Binary;

    fn deref(&self) -> &testkit::Binary {
        &self.0
    }
}

impl std::ops::DerefMut for Binary {
    fn deref_mut(&mut self) -> &mut testkit::Binary {
        &mut self.0
    }
}

/// A configuration with no credentials: the in-process sandbox, with extra flags.
pub fn sandbox_config(extra: &[&str]) -> Config {
    let mut flags = vec![
        "test".to_owned(),
        "--grpc-addr=127.0.0.1:0".to_owned(),
        "--sandbox-addr=127.0.0.1:0".to_owned(),
        "--log-format=text".to_owned(),
    ];
    flags.extend(extra.iter().map(|s| s.to_string()));
    let config = TestCli::parse_from(flags).serve;
    config.check().expect("valid test configuration");
    config
}

/// Posts a body with these headers to the webhook; returns the status.
pub async fn post_webhook(addr: SocketAddr, body: Vec<u8>, headers: &[(&str, String)]) -> u16 {
    testkit::post_webhook(&reqwest_client(), &webhook_url(addr), body, headers)
        .await
        .unwrap()
        .as_u16()
}

/// Posts a genuine callback (signed with the test secret).
pub async fn deliver(addr: SocketAddr, body: Vec<u8>) -> u16 {
    testkit::post_signed(&reqwest_client(), &webhook_url(addr), WEBHOOK_SECRET, body)
        .await
        .unwrap()
        .as_u16()
}

/// The Prometheus text a replica's admin port at `admin` serves.
pub async fn metrics_text(admin: SocketAddr) -> String {
    reqwest_client()
        .get(format!("http://{admin}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// The value of the unlabelled series `name` on the replica whose admin port is `admin` (0 before it exists).
pub async fn metric(admin: SocketAddr, name: &str) -> f64 {
    metrics_text(admin)
        .await
        .lines()
        .find_map(|line| line.strip_prefix(name)?.trim().parse::<f64>().ok())
        .unwrap_or(0.0)
}

pub fn reqwest_client() -> reqwest::Client {
    capability_facade::upstream::install_crypto_provider();
    // Plain HTTP to loopback: no roots to load (the platform's verifier takes some 30 ms to build in a debug build,
    // and a client is made per call: a thousand calls took 28 s).
    reqwest::Client::builder().tls_certs_only([]).build().unwrap()
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

/// Queries `recipient` (a request_id of the service's choosing), then watches the answer from its first
/// notification to its end, waiting at most `wait` (the default when `None`); [`drain`]'s result.
pub async fn query_and_drain(
    client: &mut CapabilityServiceClient<Channel>,
    recipient: pb::Recipient,
    wait: Option<Duration>,
) -> (Vec<(u64, String, String)>, Result<pb::Completion, tonic::Status>) {
    let answer = client
        .query_capability(query(recipient, ""))
        .await
        .unwrap()
        .into_inner();
    let stream = client
        .watch_capability(watch_request(&answer.request_id, 0, wait))
        .await
        .unwrap()
        .into_inner();
    drain(stream).await
}

/// Watches `request_id` for `wait` through `client` and asserts that nothing arrives before the wait elapses.
pub async fn waits_out(client: &mut CapabilityServiceClient<Channel>, request_id: &str, wait: Duration) {
    let stream = client
        .watch_capability(watch_request(request_id, 0, Some(wait)))
        .await
        .unwrap()
        .into_inner();
    let (seen, end) = drain(stream).await;
    assert!(seen.is_empty(), "{request_id}: {seen:?}");
    assert_eq!(end.unwrap().reason(), pb::CompletionReason::WaitElapsed, "{request_id}");
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

/// [`binary_env`] with the replica on `redis`.
pub fn redis_binary_env(fake: &FakeSinch, redis: &redis::RedisServer) -> Vec<(&'static str, String)> {
    let mut env = binary_env(fake);
    env.push(("CAPABILITY_REDIS_URL", redis.url()));
    env
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

/// Every notification of `request_id` held by `service` now (a watch that replays and ends at once).
pub async fn held(service: &Service, request_id: &str, after: u64) -> Vec<(u64, String, String)> {
    let mut client = service.client().await;
    let stream = client
        .watch_capability(watch_request(request_id, after, Some(Duration::ZERO)))
        .await
        .unwrap()
        .into_inner();
    drain(stream).await.0
}

/// Reads a watch of `request_id` on `service` after `after` until the notification on `marker` (posted last)
/// arrives; fails when it has not within 10 s.
pub async fn until_marker(service: &Service, request_id: &str, after: u64, marker: &str) -> Vec<(u64, String, String)> {
    let mut client = service.client().await;
    let mut stream = client
        .watch_capability(watch_request(request_id, after, Some(Duration::from_secs(30))))
        .await
        .unwrap()
        .into_inner();
    let read = async {
        let mut seen = Vec::new();
        loop {
            let message = stream
                .message()
                .await
                .unwrap()
                .expect("the stream ended before the marker");
            if let Some(Event::Notification(n)) = message.event {
                let done = n.channel_raw == marker;
                seen.push((n.offset, n.channel_raw, n.capability_status_raw));
                if done {
                    return seen;
                }
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), read)
        .await
        .expect("the marker did not arrive within 10 s")
}

/// Waits until `holds` — a state no event announces (what Redis shows, what a replica holds; looked at every
/// 20 ms); fails after `within`.
pub async fn until(within: Duration, holds: impl AsyncFn() -> bool) {
    let polls = within.as_millis().div_ceil(20);
    for _ in 0..polls {
        if holds().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(holds().await, "never came to hold within {within:?}");
}

/// Waits until `/readyz` says the replica has read the log back.
pub async fn ready(service: &Service) {
    let http = reqwest_client();
    let url = format!("http://{}/readyz", service.admin_addr);
    let poll = async {
        loop {
            if let Ok(r) = http.get(&url).send().await
                && r.status() == 200
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(10), poll)
        .await
        .expect("the replica became ready within 10 s");
}

#[derive(Parser)]
struct SandboxKnobs {
    #[command(flatten)]
    knobs: capability_facade::config::SandboxSettings,
}

/// A standalone sandbox on a free port with these knob flags; stopped when dropped.
pub struct Sandbox {
    pub url: String,
    _stop: DropGuard,
}

impl Sandbox {
    /// The knobs these flags set.
    pub fn knobs(flags: &[&str]) -> capability_facade::config::SandboxSettings {
        let knobs = SandboxKnobs::parse_from(std::iter::once("sandbox").chain(flags.iter().copied())).knobs;
        knobs.check().expect("valid knobs");
        knobs
    }

    pub async fn start(flags: &[&str], default_webhook: Option<Destination>) -> Sandbox {
        let knobs = Sandbox::knobs(flags);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let stop = CancellationToken::new();
        tokio::spawn(sandbox::serve(
            listener,
            SandboxConfig::new(knobs, default_webhook),
            stop.clone(),
        ));
        Sandbox {
            url,
            _stop: stop.drop_guard(),
        }
    }

    /// The configuration of a service against this sandbox (the test webhook secret unless `extra` sets
    /// another).
    pub fn config(&self, extra: &[&str]) -> Config {
        let mut flags = vec![
            format!("--sinch-project-id={}", sandbox::PROJECT_ID),
            format!("--sinch-key-id={}", sandbox::KEY_ID),
            format!("--sinch-key-secret={}", sandbox::KEY_SECRET),
        ];
        flags.extend(extra.iter().map(|s| s.to_string()));
        let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
        config(&self.url, &flags)
    }

    /// A service against this sandbox, configured by [`Sandbox::config`].
    pub async fn service(&self, extra: &[&str]) -> Service {
        Service::start(self.config(extra)).await
    }

    /// Calls the sandbox's API as an SDK does (HTTP Basic); returns the status and the JSON body.
    pub async fn call(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> (u16, Value) {
        let url = format!("{}/v1/projects/{}{path}", self.url, sandbox::PROJECT_ID);
        let mut request = reqwest_client()
            .request(method, url)
            .basic_auth(sandbox::KEY_ID, Some(sandbox::KEY_SECRET));
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }
}

/// The Redis side of the log on its own (no replica), its cache's entries named with `cache_hash_key` (else a
/// key kept in Redis).
pub async fn redis_log(
    redis: &redis::RedisServer,
    prefix: &str,
    cache_hash_key: Option<&str>,
) -> capability_facade::log::redis::RedisLog {
    use capability_facade::{capability::CacheTtl, log::redis::RedisSettings, secret::Secret};
    let settings = RedisSettings {
        url: Secret::new(redis.url()),
        prefix: prefix.into(),
        shards: 1,
        retention: Duration::from_secs(60),
        max_per_request: 64,
        idempotency_window: Duration::from_secs(60),
        longest_check: Duration::from_secs(60),
        cache_ttl: CacheTtl::default(),
        cache_hash_key: cache_hash_key.map(Secret::new),
        ca: None,
    };
    capability_facade::log::redis::RedisLog::prepare(settings, Vec::new())
        .await
        .unwrap()
}

/// An OTLP/gRPC collector stand-in: records the body of every trace export and answers OK; over TLS (HTTP/2 by
/// ALPN) when given a server configuration.
pub struct Collector {
    pub addr: SocketAddr,
    exports: std::sync::Arc<std::sync::Mutex<Vec<axum::body::Bytes>>>,
    _serving: DropGuard,
}

impl Collector {
    pub async fn start(tls: Option<rustls::ServerConfig>) -> Collector {
        use axum::{Router, body::Bytes, routing::post};
        let exports: std::sync::Arc<std::sync::Mutex<Vec<Bytes>>> = Default::default();
        let recorded = exports.clone();
        let router = Router::new().route(
            "/opentelemetry.proto.collector.trace.v1.TraceService/Export",
            post(move |body: Bytes| async move {
                recorded.lock().unwrap().push(body);
                (
                    [("content-type", "application/grpc"), ("grpc-status", "0")],
                    vec![0u8; 5],
                )
            }),
        );
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = CancellationToken::new();
        let stopped = stop.clone();
        match tls {
            None => {
                tokio::spawn(async move {
                    let serving = axum::serve(listener, router).with_graceful_shutdown(stopped.cancelled_owned());
                    serving.await.unwrap()
                });
            }
            Some(mut config) => {
                config.alpn_protocols = vec![b"h2".to_vec()];
                let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config));
                tokio::spawn(async move {
                    loop {
                        let (tcp, _) = tokio::select! {
                            accepted = listener.accept() => accepted.unwrap(),
                            () = stopped.cancelled() => return,
                        };
                        let (acceptor, router) = (acceptor.clone(), router.clone());
                        tokio::spawn(async move {
                            let Ok(tls) = acceptor.accept(tcp).await else { return };
                            let service = hyper_util::service::TowerToHyperService::new(router);
                            let _ = hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new())
                                .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                                .await;
                        });
                    }
                });
            }
        }
        Collector {
            addr,
            exports,
            _serving: stop.drop_guard(),
        }
    }

    /// Every export's body so far, one after the other.
    pub fn exported(&self) -> Vec<u8> {
        self.exports.lock().unwrap().concat()
    }
}
