//! The process: reads configuration, sets up logging, binds the listeners and turns signals into a shutdown; the
//! other commands are in [`cli`].

mod cli;

use std::process::ExitCode;

use capability_facade::{
    Listeners,
    config::{self, Config, ServeArgs, Upstream},
    telemetry,
};
use clap::Parser;
use cli::{Cli, Command};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// mimalloc instead of glibc's malloc: allocation was the largest cost in profiles of the query path.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        None => serve(cli.serve).await,
        Some(Command::Query(args)) => cli::query(args).await,
        Some(Command::Watch(args)) => cli::watch(args).await,
        Some(Command::Check(args)) => cli::check(args).await,
        Some(Command::Sandbox(args)) => {
            let _telemetry = telemetry::init(config::LogFormat::Text, None);
            cli::sandbox(args, shutdown_on_signal()).await
        }
    }
}

async fn serve(args: ServeArgs) -> ExitCode {
    let config = match Config::from_args(&args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("capability-facade: invalid configuration: {e}");
            return ExitCode::from(2);
        }
    };
    let _telemetry = match telemetry::init(config.log_format, config.otlp_endpoint.as_deref()) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("capability-facade: {e}");
            return ExitCode::from(2);
        }
    };
    if config.upstream == Upstream::Sandbox {
        tracing::warn!(
            "SANDBOX MODE: {} is not set, so queries go to the built-in Sinch emulator and no real contact is \
             queried; set SINCH_PROJECT_ID, SINCH_KEY_ID and SINCH_KEY_SECRET for production",
            config::KEY_ID
        );
    }
    let (grpc, webhook, admin) = match (
        bind(config::GRPC_ADDR, config.grpc_addr).await,
        bind(config::WEBHOOK_ADDR, config.webhook_addr).await,
        bind(config::ADMIN_ADDR, config.admin_addr).await,
    ) {
        (Some(grpc), Some(webhook), Some(admin)) => (grpc, webhook, admin),
        _ => return ExitCode::FAILURE,
    };
    let addr = |l: &TcpListener| l.local_addr().map(|a| a.to_string()).unwrap_or_default();
    let tls = match &config.tls {
        None => "off",
        Some(tls) if tls.client_ca.is_some() => "grpc+webhook, mutual on grpc",
        Some(_) => "grpc+webhook",
    };
    tracing::info!(grpc = %addr(&grpc), webhook = %addr(&webhook), admin = %addr(&admin), tls, "listening");
    let listeners = Listeners { grpc, webhook, admin };
    match capability_facade::run(config, listeners, shutdown_on_signal()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "the service failed");
            ExitCode::FAILURE
        }
    }
}

async fn bind(variable: &str, addr: std::net::SocketAddr) -> Option<TcpListener> {
    match TcpListener::bind(addr).await {
        Ok(listener) => Some(listener),
        Err(e) => {
            tracing::error!("{variable}: cannot listen on {addr}: {e}");
            None
        }
    }
}

/// A token cancelled on the first SIGTERM or SIGINT.
fn shutdown_on_signal() -> CancellationToken {
    let token = CancellationToken::new();
    let cancel = token.clone();
    tokio::spawn(async move {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("cannot listen for SIGTERM");
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
            _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: shutting down"),
        }
        cancel.cancel();
    });
    token
}
