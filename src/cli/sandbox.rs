//! The `sandbox` command: the Sinch emulator on its own, as an upstream for load tests.

use std::process::ExitCode;

use capability_facade::{
    config::SandboxSettings,
    sandbox::{self, SandboxConfig, callbacks::CallbackTarget},
};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::SandboxArgs;

/// `capability-facade sandbox`: serves the emulator until SIGINT/SIGTERM.
pub async fn sandbox(args: SandboxArgs, shutdown: CancellationToken) -> ExitCode {
    let listener = match TcpListener::bind(args.listen).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("cannot listen on {}: {e}", args.listen);
            return ExitCode::FAILURE;
        }
    };
    let addr = listener.local_addr().map(|a| a.to_string()).unwrap_or_default();
    tracing::info!(%addr, project_id = %args.project_id, key_id = %args.key_id, "Sinch sandbox listening");
    let callbacks = args
        .callback_url
        .zip(args.webhook_secret)
        .map(|(url, secret)| CallbackTarget {
            url,
            secret,
            knobs: SandboxSettings {
                callback_delay: args.callback_delay,
                duplicates: args.duplicates,
                reorder: args.reorder,
            },
            trust_own_listener: false,
        });
    let config = SandboxConfig {
        project_id: args.project_id,
        key_id: args.key_id,
        key_secret: args.key_secret,
        callbacks,
        ..SandboxConfig::generated()
    };
    match sandbox::serve(listener, config, shutdown).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sandbox failed: {e}");
            ExitCode::FAILURE
        }
    }
}
