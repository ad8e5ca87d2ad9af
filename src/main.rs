//! The process: reads configuration, sets up logging, binds the listeners and turns signals into a shutdown; the
//! other commands are in [`cli`].

mod cli;

use std::process::ExitCode;

use capability_facade::{
    Listeners, Service, StartError,
    config::{self, Config, Upstream},
    telemetry,
};
use clap::{CommandFactory, Parser};
use cli::{Cli, Command};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// mimalloc instead of glibc's malloc: allocation was the largest cost in profiles of the query path.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> ExitCode {
    let huge_pages = without_transparent_huge_pages();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            // A setting of the service: say which variable, never a secret's value, and exit 2 before binding.
            if let Some(problem) = config::describe(&Cli::command(), &e) {
                eprintln!("capability-facade: invalid configuration: {problem}");
                return ExitCode::from(2);
            }
            if let Some(problem) = config::describe_secret(&Cli::command(), &e) {
                eprintln!("capability-facade: {problem}");
                return ExitCode::from(2);
            }
            e.exit()
        }
    };
    match cli.command {
        None => serve(cli.serve, huge_pages).await,
        Some(Command::Query(args)) => cli::query(args).await,
        Some(Command::Watch(args)) => cli::watch(args).await,
        Some(Command::Check(args)) => cli::check(args).await,
        Some(Command::BulkCheck(args)) => cli::bulk_check(args).await,
        Some(Command::Doctor(args)) => cli::doctor(args).await,
        Some(Command::Webhook(args)) => cli::webhook(args).await,
        Some(Command::Sandbox(args)) => match telemetry::init(config::LogFormat::Text, None) {
            Ok(_telemetry) => cli::sandbox(args, shutdown_on_signal()).await,
            Err(e) => {
                eprintln!("capability-facade sandbox: {e}");
                ExitCode::from(2)
            }
        },
    }
}

/// `huge_pages`: why transparent huge pages could not be turned off, if they could not.
async fn serve(config: Config, huge_pages: Result<(), String>) -> ExitCode {
    let invalid = |problem: &dyn std::fmt::Display| {
        eprintln!("capability-facade: invalid configuration: {problem}");
        ExitCode::from(2)
    };
    if let Err(e) = config.check() {
        return invalid(&e);
    }
    let otlp = match telemetry::Otlp::from_settings(&config.telemetry) {
        Ok(otlp) => otlp,
        Err(e) => return invalid(&e),
    };
    let _telemetry = match telemetry::init(config.log_format(), otlp.as_ref()) {
        Ok(t) => t,
        Err(e) => return invalid(&e),
    };
    if let Err(e) = huge_pages {
        tracing::warn!(error = %e, "transparent huge pages stay on for this process: latency may spike while memory grows");
    }
    if config.upstream() == Ok(Upstream::Sandbox) {
        tracing::warn!(
            "SANDBOX MODE: {} is not set, so queries go to the built-in Sinch emulator and no real contact is \
             queried; set SINCH_PROJECT_ID, SINCH_KEY_ID and SINCH_KEY_SECRET for production",
            config::KEY_ID
        );
    }
    let listen = config.listen.clone();
    let tls = match (&config.tls.cert, &config.tls.client_ca) {
        (None, _) => "off",
        (Some(_), Some(_)) => "grpc+webhook, mutual on grpc",
        (Some(_), None) => "grpc+webhook",
    };
    let service = match Service::build(config).await {
        Ok(service) => service,
        Err(StartError::Config(e)) => return invalid(&e),
        Err(e) => {
            tracing::error!(error = %e, "the service cannot start");
            return ExitCode::FAILURE;
        }
    };
    let (grpc, webhook, admin) = match (
        bind(config::GRPC_ADDR, listen.grpc).await,
        bind(config::WEBHOOK_ADDR, listen.webhook).await,
        bind(config::ADMIN_ADDR, listen.admin).await,
    ) {
        (Some(grpc), Some(webhook), Some(admin)) => (grpc, webhook, admin),
        _ => return ExitCode::FAILURE,
    };
    // The signals' handlers before anyone is told it listens: a SIGTERM from then on is a graceful shutdown.
    let shutdown = shutdown_on_signal();
    let addr = |l: &TcpListener| l.local_addr().map(|a| a.to_string()).unwrap_or_default();
    tracing::info!(grpc = %addr(&grpc), webhook = %addr(&webhook), admin = %addr(&admin), tls, "listening");
    let listeners = Listeners { grpc, webhook, admin };
    match service.run(listeners, shutdown).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "the service failed");
            ExitCode::FAILURE
        }
    }
}

/// Turns transparent huge pages off for this process, first thing (the flag is the process's, for every thread).
/// mimalloc asks the kernel for them (`madvise`), and the kernel zeroes a whole 2 MiB page in the fault of the
/// first write to it: while the service's memory grows (retained notifications, the cache, new watches) a worker
/// thread stalls in the kernel for milliseconds, and every callback and notification queued on it waits. Without
/// them p99 under saturated ingestion went from 3.2–3.4× to 1.5–1.7× the bare handler's (BENCHMARKS.md,
/// "Delivery at the limit", fifth round).
fn without_transparent_huge_pages() -> Result<(), String> {
    #[cfg(target_os = "linux")]
    rustix::thread::disable_transparent_huge_pages(true).map_err(|e| e.to_string())?;
    Ok(())
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

/// A token cancelled on the first SIGTERM or SIGINT. The handlers are installed before it returns: a signal
/// that comes after is never the default action (the process killed on the spot).
fn shutdown_on_signal() -> CancellationToken {
    use tokio::signal::unix::{SignalKind, signal};
    let token = CancellationToken::new();
    let cancel = token.clone();
    let mut term = signal(SignalKind::terminate()).expect("cannot listen for SIGTERM");
    let mut interrupt = signal(SignalKind::interrupt()).expect("cannot listen for SIGINT");
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
            _ = interrupt.recv() => tracing::info!("SIGINT: shutting down"),
        }
        cancel.cancel();
    });
    token
}
