//! capability-facade: a gRPC service that asks Sinch's Conversation API on which channels a contact can be
//! reached, and streams the asynchronous answers back to callers.
//!
//! # Layout
//! - [`config`]: environment and flags, validated before any port is bound.
//! - [`capability`]: domain types; no transport crate.
//! - [`query`]: QueryCapability's behaviour: request_id, idempotency, forwarding.
//! - [`upstream`]: the Sinch client (auth, rate limit, retries).
//! - [`webhook`]: the callback receiver: verify, parse, hand on to the hub.
//! - [`hub`]: per-request notifications, offsets, dedupe, retention, watches.
//! - [`backplane`]: where events go: the hub directly, or a Redis stream every replica reads.
//! - [`grpc`]: the tonic service, proto ⇄ domain conversion, errors → statuses; the only user of tonic.
//! - [`sandbox`]: the built-in Sinch emulator, callbacks included.
//! - [`admin`]: metrics and probes on the admin port.
//! - [`tls`]: optional TLS on the gRPC and webhook ports, and mutual TLS for callers.
//!
//! [`run`] wires the parts on listeners the caller bound, until a shutdown token is cancelled. The command line
//! (serving, the client commands, the standalone sandbox) belongs to the binary, `src/main.rs` and `src/cli/`.
#![forbid(unsafe_code)]
#![deny(rust_2018_idioms)]

pub mod admin;
pub mod backplane;
pub mod capability;
pub mod config;
pub mod grpc;
pub mod hub;
pub mod query;
pub mod sandbox;
pub mod telemetry;
pub mod tls;
pub mod upstream;
pub mod webhook;

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::Arc,
};

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use backplane::{Backplane, RedisBackplane, RedisConfig};
use config::{Config, Secret, SinchConfig, Upstream};
use hub::{Hub, HubConfig};
use sandbox::callbacks::CallbackTarget;

/// A boxed error: nobody branches on why the service could not run.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The sockets the service serves on, bound by the caller (`main`, or a test on port 0).
pub struct Listeners {
    pub grpc: TcpListener,
    pub webhook: TcpListener,
    pub admin: TcpListener,
}

/// Runs the service until `shutdown` is cancelled, then drains for at most `config.shutdown_grace`.
pub async fn run(config: Config, listeners: Listeners, shutdown: CancellationToken) -> Result<(), BoxError> {
    // Stopped once the servers drained, so that in-flight queries still reach the sandbox and the hub.
    let background = CancellationToken::new();
    let _stop_background = background.clone().drop_guard();
    let hub = Arc::new(Hub::new(HubConfig {
        retention: config.retention,
        max_requests: config.max_requests,
    }));
    tokio::spawn(hub.clone().run_purge(background.clone()));

    let mut secrets = config.webhook_secrets.clone();
    let sinch = match &config.upstream {
        Upstream::Sinch(sinch) => sinch.clone(),
        Upstream::Sandbox => {
            let secret = Secret::new(ulid::Ulid::new().to_string());
            secrets.push(secret.clone());
            let target = CallbackTarget {
                url: format!(
                    "{}://{}{}",
                    if config.tls.is_some() { "https" } else { "http" },
                    loopback(listeners.webhook.local_addr()?),
                    webhook::PATH
                ),
                secret,
                knobs: config.sandbox,
                trust_own_listener: config.tls.is_some(),
            };
            start_sandbox(target, background.clone()).await?
        }
    };
    if secrets.is_empty() {
        tracing::warn!("INSECURE: no webhook secret is set, so callbacks are accepted without a signature");
    }

    let backplane = Arc::new(match &config.redis_url {
        None => Backplane::local(hub.clone(), shutdown.clone()),
        Some(url) => {
            let redis = Arc::new(RedisBackplane::new(RedisConfig {
                url: url.clone(),
                prefix: config.redis_prefix.clone(),
                retention: config.retention,
                idempotency_window: config.idempotency_window,
            })?);
            tokio::spawn(redis.clone().run_reader(hub.clone(), background.clone()));
            Backplane::Redis(redis)
        }
    });

    let client = upstream::SinchClient::new(&sinch, config.rate_limit, upstream::RetryPolicy::default())?;
    let queries = Arc::new(query::Queries::new(
        client,
        config.idempotency_window,
        hub.clone(),
        backplane.clone(),
    ));
    let watch = grpc::WatchSettings {
        default_wait: config.watch_wait,
        max_wait: config.retention,
        heartbeat: config.heartbeat,
        max_watches: config.max_watches,
    };
    let api = grpc::CapabilityApi::new(
        queries,
        config.max_inflight_queries,
        config.query_timeout,
        hub.clone(),
        watch,
        shutdown.clone(),
    );
    let transport = grpc::TransportSettings {
        tokens: config.grpc_tokens.clone(),
        max_streams_per_connection: config.max_streams_per_connection,
        max_connection_age: config.max_connection_age,
        max_connection_age_grace: config.retention,
        tls: config.tls.clone(),
    };
    let admin = Arc::new(admin::Admin {
        metrics: telemetry::metrics(),
        hub: hub.clone(),
        backplane: backplane.clone(),
        shutdown: shutdown.clone(),
    });
    tokio::spawn(admin::serve(listeners.admin, admin::router(admin), background.clone()));
    let receiver = Arc::new(webhook::Receiver::new(
        webhook::WebhookConfig {
            secrets,
            tolerance: config.webhook_tolerance,
            max_body: config.webhook_max_body,
            request_timeout: config.webhook_timeout,
        },
        backplane,
    ));

    // Shutdown in three steps: decide (`shutdown`: health, readiness and watches react at once), stop accepting
    // after the drain delay (`stop`), and wait at most the grace for what is in flight.
    let stop = CancellationToken::new();
    tokio::spawn({
        let (shutdown, stop, delay) = (shutdown.clone(), stop.clone(), config.drain_delay);
        async move {
            shutdown.cancelled().await;
            tokio::time::sleep(delay).await;
            stop.cancel();
        }
    });
    let grpc = grpc::serve(listeners.grpc, api, transport, shutdown.clone(), stop.clone());
    let webhook = webhook::serve(
        listeners.webhook,
        webhook::router(receiver),
        config.tls.as_ref().map(|tls| tls.webhook.clone()),
        config.webhook_timeout,
        stop,
    );
    let servers = async {
        let (grpc, webhook) = tokio::join!(grpc, webhook);
        grpc?;
        webhook?;
        Ok::<(), BoxError>(())
    };
    let grace = config.shutdown_grace;
    let hard_deadline = async {
        shutdown.cancelled().await;
        tokio::time::sleep(grace).await;
    };
    tokio::select! {
        result = servers => result?,
        () = hard_deadline => tracing::warn!(?grace, "the drain took longer than the shutdown grace; stopping now"),
    }
    tracing::info!("stopped");
    Ok(())
}

/// The address to reach a listener from this host: its own, or loopback when it listens on every address.
fn loopback(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => SocketAddr::new(Ipv4Addr::LOCALHOST.into(), addr.port()),
        IpAddr::V6(ip) if ip.is_unspecified() => SocketAddr::new(Ipv6Addr::LOCALHOST.into(), addr.port()),
        _ => addr,
    }
}

/// Starts the in-process sandbox on a loopback port, posting callbacks to `target`; returns how to reach it.
async fn start_sandbox(target: CallbackTarget, shutdown: CancellationToken) -> Result<SinchConfig, BoxError> {
    let listener = TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0))).await?;
    let addr = listener.local_addr()?;
    let sandbox = sandbox::SandboxConfig {
        callbacks: Some(target),
        ..sandbox::SandboxConfig::generated()
    };
    let sinch = SinchConfig {
        project_id: sandbox.project_id.clone(),
        key_id: sandbox.key_id.clone(),
        key_secret: sandbox.key_secret.clone(),
        auth: config::AuthMode::OAuth2,
        api_url: format!("http://{addr}"),
        auth_url: format!("http://{addr}/oauth2/token"),
    };
    tokio::spawn(async move {
        if let Err(e) = sandbox::serve(listener, sandbox, shutdown).await {
            tracing::error!(error = %e, "the in-process sandbox stopped");
        }
    });
    tracing::info!(%addr, "in-process Sinch sandbox listening");
    Ok(sinch)
}
