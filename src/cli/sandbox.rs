//! The `sandbox` command: the Sinch emulator on its own, as an upstream for load tests and for trying the
//! doctor and the `webhook` commands.

use std::process::ExitCode;

use capability_facade::sandbox::{self, SandboxConfig, webhooks::Destination};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::SandboxArgs;

/// `capability-facade sandbox`: serves the emulator until SIGINT/SIGTERM.
pub async fn sandbox(args: SandboxArgs, shutdown: CancellationToken) -> ExitCode {
    if let Err(e) = args.knobs.check() {
        eprintln!("capability-facade: invalid configuration: {e}");
        return ExitCode::from(2);
    }
    let listener = match TcpListener::bind(args.knobs.addr).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("cannot listen on {}: {e}", args.knobs.addr);
            return ExitCode::FAILURE;
        }
    };
    let addr = listener.local_addr().map(|a| a.to_string()).unwrap_or_default();
    tracing::info!(%addr, project_id = sandbox::PROJECT_ID, key_id = sandbox::KEY_ID, "Sinch sandbox listening");
    let default_webhook = args
        .callback_url
        .zip(args.webhook_secret)
        .map(|(target, secret)| Destination { target, secret });
    let config = SandboxConfig::new(args.knobs, default_webhook);
    match sandbox::serve(listener, config, shutdown).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sandbox failed: {e}");
            ExitCode::FAILURE
        }
    }
}
