//! capability-facade: a gRPC service that asks Sinch's Conversation API on which channels a contact can be
//! reached, and streams the asynchronous answers back to callers.
//!
//! # Layout
//! - [`config`]: environment and flags, validated before any port is bound.
//! - [`capability`]: domain types; no transport crate.
//! - [`query`]: QueryCapability's behaviour: request_id, idempotency, forwarding.
//! - [`upstream`]: the Sinch client (auth, rate limit, retries); the only user of reqwest.
//! - [`grpc`]: the tonic service, proto ⇄ domain conversion, errors → statuses; the only user of tonic.
//! - [`sandbox`]: the built-in Sinch emulator.
//! - [`cli`]: the command-line clients (`query`) and the `sandbox` command.
//!
//! [`run`] wires the parts on listeners the caller bound, until a shutdown token is cancelled.
#![forbid(unsafe_code)]
#![deny(rust_2018_idioms)]

pub mod capability;
pub mod cli;
pub mod config;
pub mod grpc;
pub mod query;
pub mod sandbox;
pub mod telemetry;
pub mod upstream;

use std::{net::SocketAddr, sync::Arc};

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use config::{Config, SinchConfig, Upstream};

/// A boxed error: nobody branches on why the service could not run.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The sockets the service serves on, bound by the caller (`main`, or a test on port 0).
pub struct Listeners {
    pub grpc: TcpListener,
}

/// Runs the service until `shutdown` is cancelled, then drains for at most `config.shutdown_grace`.
pub async fn run(config: Config, listeners: Listeners, shutdown: CancellationToken) -> Result<(), BoxError> {
    // Stopped only after the gRPC server drained, so that in-flight queries still reach it.
    let sandbox_shutdown = CancellationToken::new();
    let _stop_sandbox = sandbox_shutdown.clone().drop_guard();
    let sinch = match &config.upstream {
        Upstream::Sinch(sinch) => sinch.clone(),
        Upstream::Sandbox => start_sandbox(sandbox_shutdown.clone()).await?,
    };
    let client = upstream::SinchClient::new(&sinch, config.rate_limit, upstream::RetryPolicy::default())?;
    let queries = Arc::new(query::Queries::new(client, config.idempotency_window));
    let api = grpc::CapabilityApi::new(queries, config.query_timeout);
    let server = grpc::serve(listeners.grpc, api, shutdown.clone());
    let grace = config.shutdown_grace;
    let hard_deadline = async {
        shutdown.cancelled().await;
        tokio::time::sleep(grace).await;
    };
    tokio::select! {
        result = server => result?,
        () = hard_deadline => tracing::warn!(?grace, "the drain took longer than the shutdown grace; stopping now"),
    }
    tracing::info!("stopped");
    Ok(())
}

/// Starts the in-process sandbox on a loopback port and returns how to reach it.
async fn start_sandbox(shutdown: CancellationToken) -> Result<SinchConfig, BoxError> {
    let listener = TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0))).await?;
    let addr = listener.local_addr()?;
    let sandbox = sandbox::SandboxConfig::generated();
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
