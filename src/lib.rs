//! capability-facade: a gRPC service that asks Sinch's Conversation API on which channels a contact can be
//! reached, and streams the asynchronous answers back to callers.
//!
//! # Layout
//! - [`config`]: typed settings per part, parsed from the environment and flags, checked before any port is bound.
//! - [`secret`]: values never printed.
//! - [`capability`]: domain types (channels, statuses, queries, notifications); no transport crate.
//! - [`query`]: QueryCapability's behaviour: request_id, idempotency, forwarding.
//! - [`upstream`]: the Sinch client (auth, rate limit, retries; the Webhooks and Apps APIs).
//! - [`registration`]: the service's CAPABILITY webhook at Sinch, as the doctor and the start-up check see it.
//! - [`webhook`]: the callback receiver: verify, parse, append to the event log.
//! - [`log`]: the event log, in process or on Redis (one node or a cluster): the one road into every hub.
//! - [`hub`]: fed only by the log: per-request notifications at the log's offsets, retention, watches.
//! - [`grpc`]: the tonic service, proto ⇄ domain conversion, errors → statuses; the only user of tonic.
//! - [`sandbox`]: the built-in Sinch emulator, callbacks included.
//! - [`admin`]: metrics and probes on the admin port.
//! - [`connection`]: what every listener does to its connections: a cap, first-byte and idle timeouts.
//! - [`tls`]: optional TLS on the gRPC and webhook ports, and mutual TLS for callers.
//! - [`telemetry`]: logs, traces and the metrics recorder.
//!
//! [`Service::build`] is the composition root: typed configuration in, every component built and checked, no
//! port bound. [`Service::run`] serves on listeners the caller bound until a shutdown token is cancelled, with
//! every task it spawns tracked and awaited.
#![forbid(unsafe_code)]
#![deny(rust_2018_idioms)]

pub mod admin;
pub mod capability;
pub mod check;
pub mod config;
pub mod connection;
pub mod grpc;
pub mod hub;
pub mod log;
pub mod query;
pub mod registration;
pub mod sandbox;
pub mod secret;
pub mod telemetry;
pub mod tls;
pub mod upstream;
pub mod webhook;

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use futures::{FutureExt, future::FusedFuture};
use tokio::net::TcpListener;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use config::{Config, ConfigError, Upstream, invalid};
use hub::{Hub, HubConfig};
use log::{Consumer, EventLog, Limits, redis::RedisLog};
use secret::Secret;

/// A boxed error: nobody branches on why the service stopped.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Why the service cannot start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A setting cannot be used; the process exits 2 naming its variable.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// Something outside the configuration failed (the sandbox's loopback port could not be bound).
    #[error("{0}")]
    Other(String),
}

/// The sockets the service serves on, bound by the caller (`main`, or a test on port 0).
pub struct Listeners {
    pub grpc: TcpListener,
    pub webhook: TcpListener,
    pub admin: TcpListener,
}

/// Every component, built and checked; nothing listens yet.
pub struct Service {
    config: Config,
    hub: Arc<Hub>,
    log: Arc<EventLog>,
    queries: Arc<query::Queries>,
    checker: Arc<check::Checker>,
    jobs: Arc<check::bulk::Jobs>,
    /// The Sinch client (shared with `queries`), for the start-up check of the webhook registration.
    upstream: Arc<upstream::SinchClient>,
    tls: Option<tls::TlsFiles>,
    /// The secrets that verify callbacks (the sandbox's own, in sandbox mode).
    webhook_secrets: Vec<Secret>,
    /// The in-process sandbox, on its loopback port, when no credentials are configured.
    sandbox: Option<(TcpListener, sandbox::SandboxConfig, Secret)>,
    /// Cancelled once the servers drained: background tasks (log readers, purge, sandbox, admin) stop.
    background: CancellationToken,
    /// Cancelled when the replica starts shutting down (the caller's token, adopted by `run`).
    draining: CancellationToken,
}

impl Service {
    /// Builds every component from `config` and checks what can only be checked by building it: the TLS files,
    /// the Sinch client, the Redis URL (and, when Redis answers, its version). Binds no port of the service's.
    pub async fn build(config: Config) -> Result<Service, StartError> {
        config.check()?;
        // The recorder first: a gauge or counter set before it exists (by the log's read-back, by the start-up
        // registration check) would be lost.
        telemetry::metrics();
        telemetry::zero_alerted_series();
        for variable in config.trimmed_secrets() {
            tracing::info!("{variable}: a trailing line break was trimmed from the value");
        }
        let tls = tls::TlsFiles::read(&config.tls)?;
        // The event log before the sandbox's listener: its URL is checked before any port is bound.
        let retention = config.retention.retention;
        let hub = Arc::new(Hub::new(HubConfig {
            retention,
            max_requests: config.retention.max_requests as usize,
        }));
        let cache = Arc::new(check::local::LocalCache::new(
            config.check.ttl,
            config.check.max_entries,
        ));
        // The cache before the hub: a check that sees a result on the hub finds it cached for the next one. Only
        // the in-process log feeds the in-process cache; with Redis the cache lives in Redis.
        let mut consumers: Vec<Arc<dyn Consumer>> = Vec::new();
        if config.redis_url().is_none() {
            consumers.push(cache.clone());
        }
        consumers.push(hub.clone());
        let draining = CancellationToken::new();
        let log = Arc::new(match config.redis_url() {
            None => EventLog::local(
                Limits {
                    retention,
                    max_per_request: config.retention.max_notifications_per_request,
                },
                consumers,
                draining.clone(),
            ),
            Some(url) => {
                let settings = log::redis::RedisSettings {
                    url: url.clone(),
                    prefix: config.redis.prefix.clone(),
                    shards: config.redis.shards,
                    retention,
                    max_per_request: config.retention.max_notifications_per_request,
                    idempotency_window: config.query.idempotency_window,
                    longest_check: query::LONGEST_CHECK,
                    cache_ttl: config.check.ttl,
                    cache_hash_key: config.check.hash_key.as_ref().map(|v| v.secret.clone()),
                    ca: config.redis_ca()?,
                };
                let redis = RedisLog::prepare(settings, consumers)
                    .await
                    .map_err(|e| invalid(config::REDIS_URL, e.to_string()))?;
                EventLog::redis(redis)
            }
        });
        let mut webhook_secrets = config.webhook.secrets.secrets.clone();
        let (sinch, sandbox) = match config.upstream()? {
            Upstream::Sinch(sinch) => (sinch, None),
            Upstream::Sandbox => {
                let wanted = config.sandbox.addr;
                let listener = TcpListener::bind(wanted).await.map_err(|e| {
                    StartError::Other(format!(
                        "{}: the in-process sandbox cannot listen on {wanted}: {e} (set another address, or \
                         127.0.0.1:0 for a free port)",
                        config::SANDBOX_ADDR
                    ))
                })?;
                let addr = listener.local_addr().map_err(|e| StartError::Other(e.to_string()))?;
                let prepared = sandbox::SandboxConfig::new(config.sandbox.clone(), None);
                let sinch = prepared.client_config(&format!("http://{addr}"), config.sinch.rate_limit);
                // The in-process webhook is registered with the first configured secret, so that the doctor and
                // `webhook` commands can compare and restore it; without one, a generated secret.
                let secret = match webhook_secrets.first() {
                    Some(configured) => configured.clone(),
                    None => {
                        let generated = Secret::new(ulid::Ulid::new().to_string());
                        webhook_secrets.push(generated.clone());
                        generated
                    }
                };
                (sinch, Some((listener, prepared, secret)))
            }
        };
        let client = Arc::new(
            upstream::SinchClient::new(
                &sinch,
                upstream::RetryPolicy::default(),
                upstream::TokenRetry::default(),
            )
            .map_err(|e| invalid(config::KEY_ID, e.to_string()))?,
        );

        // A job sends at most one query per identity: under the smaller of the two budgets, Sinch sees neither
        // more callbacks nor more queries than it allows in any second (the query limiter allows bursts).
        let budget = config.sinch.callback_rate.min(config.sinch.rate_limit);
        let pacer = Arc::new(check::bulk::pacer::Pacer::new(budget, &log));
        let queries = Arc::new(query::Queries::new(
            client.clone(),
            config.query.idempotency_window,
            config.query.idempotency_max_entries,
            log.clone(),
            pacer.clone(),
        ));
        let checker = Arc::new(check::Checker::new(
            log.clone(),
            cache,
            queries.clone(),
            hub.clone(),
            check::CheckSettings {
                settle: config.check.settle,
                preference: config.check.channel_preference.clone(),
                max_waiting: config.query.max_inflight as usize,
                drain: config.shutdown.grace.saturating_sub(Duration::from_secs(1)),
            },
            pacer.clone(),
            draining.clone(),
        ));
        let background = CancellationToken::new();
        let jobs = Arc::new(check::bulk::Jobs::new(
            &log,
            checker.clone(),
            pacer,
            config.check.bulk_retention,
            draining.clone(),
            background.clone(),
        ));
        Ok(Service {
            config,
            hub,
            log,
            queries,
            checker,
            jobs,
            upstream: client,
            tls,
            webhook_secrets,
            sandbox,
            background,
            draining,
        })
    }

    /// Serves on `listeners` until `shutdown` is cancelled, then drains for at most the shutdown grace.
    pub async fn run(self, listeners: Listeners, shutdown: CancellationToken) -> Result<(), BoxError> {
        let Service {
            config,
            hub,
            log,
            queries,
            checker,
            jobs,
            upstream,
            tls,
            webhook_secrets,
            sandbox,
            background,
            draining,
        } = self;
        let tasks = TaskTracker::new();
        let _stop_background = background.clone().drop_guard();
        tasks.spawn({
            let (shutdown, draining, hub, checker) = (shutdown.clone(), draining.clone(), hub.clone(), checker.clone());
            async move {
                shutdown.cancelled().await;
                checker.begin_drain();
                draining.cancel();
                hub.close();
            }
        });
        tasks.spawn(hub.clone().run_purge(background.clone()));
        log.start(&tasks, background.clone());

        if let Some((listener, mut prepared, secret)) = sandbox {
            let scheme = if tls.is_some() { "https" } else { "http" };
            // The service's own webhook, registered for every app the sandbox comes to know, as an operator
            // registers it at Sinch.
            prepared.default_webhook = Some(sandbox::webhooks::Destination {
                target: format!(
                    "{scheme}://{}{}",
                    loopback(listeners.webhook.local_addr()?),
                    webhook::PATH
                ),
                secret,
            });
            prepared.trust_own_listener = tls.is_some();
            tracing::info!(addr = %listener.local_addr()?, project_id = sandbox::PROJECT_ID,
                key_id = sandbox::KEY_ID, "in-process Sinch sandbox listening");
            let stop = background.clone();
            tasks.spawn(async move {
                if let Err(e) = sandbox::serve(listener, prepared, stop).await {
                    tracing::error!(error = %e, "the in-process sandbox stopped");
                }
            });
        }
        if webhook_secrets.is_empty() {
            tracing::warn!("INSECURE: no webhook secret is set, so callbacks are accepted without a signature");
        }
        // Half of what the check needs is said, since the operator meant it to run.
        let apps = config.registration.apps();
        let missing = match (config.registration.public_webhook_url.clone(), apps.is_empty()) {
            (Some(target), false) => {
                let secrets = webhook_secrets.clone();
                let stop = background.clone();
                tasks.spawn(async move {
                    tokio::select! {
                        () = registration::check_at_start(&upstream, target.as_str(), &apps, &secrets) => {}
                        () = stop.cancelled() => {}
                    }
                });
                None
            }
            (Some(_), true) => Some(config::APP_IDS),
            (None, false) => Some(config::PUBLIC_WEBHOOK_URL),
            (None, true) => None,
        };
        if let Some(missing) = missing {
            tracing::warn!(
                "{missing} is not set: the webhook registration is not checked at start (it needs {} and {})",
                config::PUBLIC_WEBHOOK_URL,
                config::APP_IDS
            );
        }

        // Not once the replica drains: it would take back the jobs it leaves.
        tasks.spawn(jobs.clone().take_over(draining.clone()));
        let api = grpc::CapabilityApi::new(
            queries.clone(),
            checker,
            jobs.clone(),
            grpc::convert::CheckDefaults {
                max_age: config.check.max_age,
                wait: config.check.wait,
                max_wait: config.retention.retention,
            },
            config.query.max_inflight as usize,
            config.query.timeout,
            hub.clone(),
            grpc::WatchSettings {
                default_wait: config.watch.default_wait,
                // Nothing is replayable for longer than the retention.
                max_wait: config.retention.retention,
                heartbeat: config.watch.heartbeat,
                max_watches: config.watch.max_watches,
                max_per_connection: config.watch.per_connection(),
                max_per_caller: config.watch.per_caller(),
            },
            shutdown.clone(),
        );
        let transport = grpc::TransportSettings {
            tokens: config.grpc_tokens(),
            max_streams_per_connection: config.grpc.max_streams_per_connection,
            max_connection_age: Some(config.grpc.max_connection_age).filter(|age| !age.is_zero()),
            // A watch lasts at most the retention: open streams may finish on an aged connection.
            max_connection_age_grace: config.retention.retention,
            tls: tls.clone(),
        };
        let admin = Arc::new(admin::Admin {
            metrics: telemetry::metrics(),
            hub,
            log: log.clone(),
            shutdown: shutdown.clone(),
        });
        let connections = &config.connections;
        let limits = |max: u32| connection::ConnectionLimits {
            first_byte: connections.first_byte_timeout,
            idle: connections.idle_timeout,
            max_connections: max as usize,
        };
        let guarded = |listener, max, name| connection::GuardedListener::new(listener, limits(max), name);
        tasks.spawn(admin::serve(
            guarded(listeners.admin, connections.admin_max, "admin"),
            admin::router(admin),
            connections.first_byte_timeout,
            background.clone(),
        ));
        // Read back: the gRPC health the readiness probe asks turns SERVING then, as `/readyz` does.
        let caught_up = {
            let log = log.clone();
            async move {
                while !log.health().caught_up {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        };
        let receiver = Arc::new(webhook::Receiver::new(
            webhook::WebhookConfig {
                secrets: webhook_secrets,
                tolerance: config.webhook.tolerance,
                max_body: config.webhook.max_body as usize,
                request_timeout: config.webhook.timeout,
                max_pending: config.webhook.max_pending as usize,
            },
            log,
        ));

        // Shutdown in three steps: decide (`shutdown`: health, readiness and watches react at once), stop accepting
        // after the drain delay (`stop`), and wait at most the grace for what is in flight.
        let stop = CancellationToken::new();
        tasks.spawn({
            let (shutdown, stop, delay) = (shutdown.clone(), stop.clone(), config.shutdown.drain_delay);
            async move {
                shutdown.cancelled().await;
                tokio::time::sleep(delay).await;
                stop.cancel();
            }
        });
        let grpc = grpc::serve(
            guarded(listeners.grpc, connections.grpc_max, "grpc"),
            api,
            transport,
            caught_up,
            shutdown.clone(),
            stop.clone(),
        );
        let webhook = webhook::serve(
            guarded(listeners.webhook, connections.webhook_max, "webhook"),
            webhook::router(receiver),
            tls.as_ref().map(|tls| tls.webhook.clone()),
            config.webhook.timeout,
            stop.clone(),
        );
        let servers = async {
            let (grpc, webhook) = tokio::join!(grpc, webhook);
            grpc?;
            webhook?;
            Ok::<(), BoxError>(())
        };
        let grace = config.shutdown.grace;
        let mut hard_deadline = Box::pin(
            async {
                shutdown.cancelled().await;
                tokio::time::sleep(grace).await;
            }
            .fuse(),
        );
        let result = tokio::select! {
            result = servers => result,
            () = &mut hard_deadline => Ok(()),
        };
        // The servers are done: stop the background and wait for it, within what is left of the grace.
        background.cancel();
        tasks.close();
        jobs.tasks().close();
        queries.sends().close();
        if !hard_deadline.is_terminated() {
            tokio::select! {
                () = async { tokio::join!(tasks.wait(), jobs.tasks().wait(), queries.sends().wait()); } => {}
                () = &mut hard_deadline => {}
            }
        }
        if hard_deadline.is_terminated() {
            tracing::warn!(?grace, "the drain took longer than the shutdown grace; stopping now");
        }
        tracing::info!("stopped");
        result
    }
}

/// Builds and runs the service: [`Service::build`], then [`Service::run`].
pub async fn run(config: Config, listeners: Listeners, shutdown: CancellationToken) -> Result<(), BoxError> {
    Service::build(config).await?.run(listeners, shutdown).await
}

/// The address to reach a listener from this host: its own, or loopback when it listens on every address.
pub fn loopback(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => SocketAddr::new(Ipv4Addr::LOCALHOST.into(), addr.port()),
        IpAddr::V6(ip) if ip.is_unspecified() => SocketAddr::new(Ipv6Addr::LOCALHOST.into(), addr.port()),
        _ => addr,
    }
}
