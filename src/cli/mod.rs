//! The command line: serving (the default), the client commands for people, and the standalone sandbox. A part of
//! the binary, not of the library: the library exports what these commands use (`config::Config`, the gRPC
//! client, the sandbox).

/// `println!` for the commands' output: when stdout's reader went away (`| head -1`), the command ends quietly with
/// the status of a process killed by SIGPIPE (141), as Unix tools do, rather than panic as `println!` does; any
/// other failure to write (a full disk) is said on stderr, status 1.
macro_rules! out {
    ($($arg:tt)*) => { $crate::cli::print_line(format_args!($($arg)*)) };
}

mod bulk;
mod client;
mod doctor;
mod sandbox;

use std::{path::PathBuf, time::Duration};

use capability_facade::{
    capability::Channel,
    config::{Config, SandboxSettings},
    grpc::{
        client::{Client, Connection},
        pb,
    },
    secret::Secret,
};
use clap::{Args, Parser, Subcommand};

pub use bulk::bulk_check;
pub use client::{check, query, watch};
pub use doctor::{doctor, webhook};
pub use sandbox::sandbox;

/// See [`out!`].
fn print_line(line: std::fmt::Arguments<'_>) {
    use std::io::Write;
    if let Err(e) = writeln!(std::io::stdout().lock(), "{line}") {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(141);
        }
        eprintln!("capability-facade: cannot write to stdout: {e}");
        std::process::exit(1);
    }
}

/// capability-facade: ask Sinch on which channels a contact can be reached, over gRPC.
///
/// With no command it serves. Every option is also read from the environment variable shown beside it.
#[derive(Debug, Parser)]
#[command(name = "capability-facade", version, args_conflicts_with_subcommands = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub serve: Config,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Send a capability query through a running service and print its request_id.
    Query(QueryArgs),
    /// Stream the results of a query by request_id until the answer is complete.
    Watch(WatchArgs),
    /// Ask in one call (CheckCapability): a table of channel → status, where each result came from and its age,
    /// and the recommended channels.
    Check(CheckArgs),
    /// Check many recipients from a CSV or JSON lines file in one bulk job, with a progress bar; results as CSV or
    /// JSON lines. Ctrl-C leaves the job running: resume it with --job, or stop it with --job ID --cancel.
    BulkCheck(BulkCheckArgs),
    /// Run the Sinch sandbox on its own, as an upstream for load tests.
    Sandbox(SandboxArgs),
    /// Check the app's CAPABILITY webhook at Sinch end to end: ✓ or ✗ with the fix for each step.
    Doctor(DoctorArgs),
    /// List, register or change the app's webhooks through Sinch's Webhooks API.
    Webhook(WebhookArgs),
}

/// Which app and which webhook URL, with the service's configuration (credentials, region, secrets).
#[derive(Debug, Clone, Args)]
pub struct RegistrationArgs {
    #[command(flatten)]
    pub serve: Config,
    /// The Sinch app.
    #[arg(long, env = "SINCH_APP_ID", default_value = "sandbox-app")]
    pub app_id: String,
    /// The URL Sinch posts callbacks to (this service's /webhooks/sinch, as seen from the internet). Default:
    /// CAPABILITY_PUBLIC_WEBHOOK_URL; in sandbox mode, this machine's webhook port.
    #[arg(long)]
    pub target: Option<String>,
}

#[derive(Debug, Clone, Args)]
pub struct DoctorArgs {
    #[command(flatten)]
    pub registration: RegistrationArgs,
}

#[derive(Debug, Args)]
pub struct WebhookArgs {
    #[command(subcommand)]
    pub command: WebhookCommand,
}

#[derive(Debug, Subcommand)]
pub enum WebhookCommand {
    /// The app's webhooks (secrets shown only as ours, other or none).
    List(RegistrationArgs),
    /// Creates or updates the webhook of --target: trigger CAPABILITY, the first of SINCH_WEBHOOK_SECRETS;
    /// idempotent.
    Ensure(RegistrationArgs),
    /// Changes one webhook's target, triggers or secret.
    Update(UpdateArgs),
    /// Deletes one webhook.
    Delete(DeleteArgs),
}

#[derive(Debug, Clone, Args)]
pub struct UpdateArgs {
    #[command(flatten)]
    pub serve: Config,
    /// The webhook's id (see `webhook list`).
    #[arg(long)]
    pub id: String,
    /// A new target URL.
    #[arg(long)]
    pub target: Option<String>,
    /// New triggers, comma-separated (for example CAPABILITY,MESSAGE_DELIVERY).
    #[arg(long, value_delimiter = ',')]
    pub triggers: Vec<String>,
    /// A new secret.
    #[arg(long, hide_env_values = true)]
    pub secret: Option<Secret>,
}

#[derive(Debug, Clone, Args)]
pub struct DeleteArgs {
    #[command(flatten)]
    pub serve: Config,
    /// The webhook's id (see `webhook list`).
    #[arg(long)]
    pub id: String,
}

/// Where the service is, and how to present ourselves to it.
#[derive(Debug, Clone, Args)]
pub struct ConnectArgs {
    /// The service's gRPC address: http://host:port, or https://host:port when it serves TLS.
    #[arg(long, env = "CAPABILITY_ADDR", default_value = "http://127.0.0.1:50051")]
    pub addr: String,
    /// A bearer token, when the service requires one (CAPABILITY_GRPC_TOKENS).
    #[arg(long, env = "CAPABILITY_TOKEN", hide_env_values = true)]
    pub token: Option<Secret>,
    /// A PEM file of CA certificates to trust for an https address (default: the public web roots).
    #[arg(long, env = "CAPABILITY_TLS_CA")]
    pub tls_ca: Option<String>,
    /// A PEM client certificate, when the service requires mutual TLS (with --tls-key).
    #[arg(long, env = "CAPABILITY_TLS_CLIENT_CERT", requires = "tls_key")]
    pub tls_cert: Option<String>,
    /// The PEM key of --tls-cert.
    #[arg(long, env = "CAPABILITY_TLS_CLIENT_KEY", requires = "tls_cert")]
    pub tls_key: Option<String>,
}

impl ConnectArgs {
    async fn connect(&self) -> Result<Client, String> {
        let read = |path: &str| std::fs::read(path).map_err(|e| format!("cannot read {path:?}: {e}"));
        let identity = match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => Some((read(cert)?, read(key)?)),
            _ => None,
        };
        Client::connect(Connection {
            addr: self.addr.clone(),
            token: self.token.clone(),
            ca: self.tls_ca.as_deref().map(read).transpose()?,
            identity,
        })
        .await
    }
}

/// Who and what to ask.
#[derive(Debug, Clone, Args)]
pub struct QueryArgs {
    #[command(flatten)]
    pub connect: ConnectArgs,
    /// The Sinch app to query through (any value works against the sandbox).
    #[arg(long, env = "SINCH_APP_ID", default_value = "sandbox-app")]
    pub app_id: String,
    /// A Sinch contact id.
    #[arg(long, conflicts_with = "identity", required_unless_present = "identity")]
    pub contact_id: Option<String>,
    /// A channel identity, CHANNEL:IDENTITY (for example WHATSAPP:46712312312); repeat for several.
    #[arg(long, value_parser = parse_identity)]
    pub identity: Vec<pb::ChannelIdentity>,
    /// Makes the query idempotent; generated by the service when absent.
    #[arg(long)]
    pub request_id: Option<String>,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Clone, Args)]
pub struct WatchArgs {
    #[command(flatten)]
    pub connect: ConnectArgs,
    /// The request_id returned by `query`.
    pub request_id: String,
    /// Only results after this offset.
    #[arg(long, default_value_t = 0)]
    pub after_offset: u64,
    /// How long to wait for the answer to be complete (the server caps it at its retention).
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    pub wait: Duration,
    /// Print one JSON object per line instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Clone, Args)]
pub struct CheckArgs {
    #[command(flatten)]
    pub query: QueryArgs,
    /// How long to wait for live results (a contact_id check returns earlier once its results stop coming).
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub wait: Duration,
    /// The oldest cached result accepted (the server's default when absent).
    #[arg(long, value_parser = humantime::parse_duration, conflicts_with = "refresh")]
    pub max_age: Option<Duration>,
    /// Ask Sinch whatever is cached (max_age 0s).
    #[arg(long)]
    pub refresh: bool,
}

/// `bulk-check`: a file of recipients in one StartBulkCheck, its results into a file as they come.
#[derive(Debug, Clone, Args)]
pub struct BulkCheckArgs {
    #[command(flatten)]
    pub connect: ConnectArgs,
    /// The Sinch app to query through (any value works against the sandbox).
    #[arg(long, env = "SINCH_APP_ID", default_value = "sandbox-app")]
    pub app_id: String,
    /// The recipients, by extension: .csv (a header naming contact_id, or channel and identity, or channel
    /// columns such as WHATSAPP,RCS,SMS), or JSON lines (.jsonl, .ndjson, .json: one object a line,
    /// {"contact_id": …}, {"channel": …, "identity": …} or {"identities": [{"channel": …, "identity": …}]}).
    #[arg(long = "in", value_name = "FILE", required_unless_present = "cancel")]
    pub input: Option<PathBuf>,
    /// Where the results go, by extension: .csv, or JSON lines (.jsonl, .ndjson, .json). Default: JSON lines on
    /// stdout. Replaced, unless --job resumes into it.
    #[arg(long = "out", value_name = "FILE")]
    pub output: Option<PathBuf>,
    /// Resume this job instead of starting one: only the results not yet in --out are appended to it.
    #[arg(long = "job", value_name = "JOB_ID")]
    pub job: Option<String>,
    /// Cancel the job given with --job (its results so far are kept) and print its counts.
    #[arg(long, requires = "job", conflicts_with_all = ["input", "output"])]
    pub cancel: bool,
    /// How long each recipient waits for its live results (the server's default when absent).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub wait: Option<Duration>,
    /// The oldest cached result accepted (the server's default when absent).
    #[arg(long, value_parser = humantime::parse_duration, conflicts_with = "refresh")]
    pub max_age: Option<Duration>,
    /// Ask Sinch whatever is cached (max_age 0s).
    #[arg(long)]
    pub refresh: bool,
    /// Names the job (AIP-155). Default: a hash of the app, these options and the file's contents, so that the
    /// same command run again finds the same job; give another to start a new job on the same file.
    #[arg(long, conflicts_with = "job")]
    pub request_id: Option<String>,
}

#[derive(Debug, Clone, Args)]
pub struct SandboxArgs {
    #[command(flatten)]
    pub knobs: SandboxSettings,
    /// Where to post the callbacks of each query (the service's `/webhooks/sinch`): registered as a webhook
    /// (trigger CAPABILITY) of every app when it comes to exist. Without it, only webhooks created through the
    /// Webhooks API receive callbacks.
    #[arg(long, requires = "webhook_secret")]
    pub callback_url: Option<String>,
    /// The secret of that webhook, which signs its callbacks (the service's SINCH_WEBHOOK_SECRETS).
    #[arg(long, hide_env_values = true)]
    pub webhook_secret: Option<Secret>,
}

fn parse_identity(value: &str) -> Result<pb::ChannelIdentity, String> {
    let (channel, identity) = value
        .split_once(':')
        .ok_or_else(|| format!("expected CHANNEL:IDENTITY, got {value:?}"))?;
    let channel = Channel::from_sinch(&channel.trim().to_ascii_uppercase());
    Ok(pb::ChannelIdentity {
        channel: channel.number(),
        identity: identity.trim().to_owned(),
        app_id: String::new(),
        channel_raw: match channel {
            Channel::Other(raw) => raw.into(),
            _ => String::new(),
        },
    })
}

impl CheckArgs {
    fn request(&self) -> pb::CheckCapabilityRequest {
        let query = self.query.request();
        let max_age = if self.refresh {
            Some(Duration::ZERO)
        } else {
            self.max_age
        };
        pb::CheckCapabilityRequest {
            app_id: query.app_id,
            recipient: query.recipient,
            max_age: max_age.map(client::prost_duration),
            wait: Some(client::prost_duration(self.wait)),
            channel_preference: Vec::new(),
            request_id: query.request_id,
        }
    }
}

impl QueryArgs {
    fn request(&self) -> pb::QueryCapabilityRequest {
        let recipient = match &self.contact_id {
            Some(id) => pb::recipient::Recipient::ContactId(id.clone()),
            None => pb::recipient::Recipient::IdentifiedBy(pb::IdentifiedBy {
                channel_identities: self.identity.clone(),
            }),
        };
        pb::QueryCapabilityRequest {
            app_id: self.app_id.clone(),
            recipient: Some(pb::Recipient {
                recipient: Some(recipient),
            }),
            request_id: self.request_id.clone().unwrap_or_default(),
        }
    }
}
