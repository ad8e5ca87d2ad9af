//! Configuration: environment variables with flags of the same meaning, validated into a [`Config`] before any
//! port is bound. An invalid value is reported with the name of its variable.

use std::{fmt, net::SocketAddr, num::NonZeroU32, str::FromStr, time::Duration};

use clap::Args;

use crate::tls::{TlsError, TlsFiles};

/// A value that must never be printed: its `Debug` and `Display` show `***`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    /// The secret itself, for the one place that must use it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl FromStr for Secret {
    type Err = std::convert::Infallible;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Secret(s.to_owned()))
    }
}

/// The serving options, as given on the command line or in the environment. Values are kept as text here and
/// checked by [`Config::from_args`], so that an error names the variable.
#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// gRPC listen address (CapabilityService, health, reflection). Port 0 picks a free port.
    #[arg(long, env = GRPC_ADDR, default_value = "0.0.0.0:50051")]
    pub grpc_addr: String,
    /// Webhook listen address (POST /webhooks/sinch, GET /healthz).
    #[arg(long, env = WEBHOOK_ADDR, default_value = "0.0.0.0:8080")]
    pub webhook_addr: String,
    /// Admin listen address (metrics and probes); never expose it outside the cluster.
    #[arg(long, env = ADMIN_ADDR, default_value = "0.0.0.0:9090")]
    pub admin_addr: String,
    /// Sinch project id. Required with SINCH_KEY_ID.
    #[arg(long, env = PROJECT_ID)]
    pub sinch_project_id: Option<String>,
    /// Sinch access key id. When unset, the service runs against the built-in sandbox.
    #[arg(long, env = KEY_ID)]
    pub sinch_key_id: Option<String>,
    /// Sinch access key secret. Required with SINCH_KEY_ID.
    #[arg(long, env = KEY_SECRET, hide_env_values = true)]
    pub sinch_key_secret: Option<Secret>,
    /// Sinch region: us, eu or br. Must match the app's region.
    #[arg(long, env = REGION, default_value = "us")]
    pub sinch_region: String,
    /// How to authenticate to Sinch: oauth2 (a cached bearer token) or basic (for tests and prototypes).
    #[arg(long, env = AUTH, default_value = "oauth2")]
    pub sinch_auth: String,
    /// Overrides the regional API base URL (tests, proxies).
    #[arg(long, env = API_URL)]
    pub sinch_api_url: Option<String>,
    /// Overrides the OAuth2 token URL.
    #[arg(long, env = AUTH_URL)]
    pub sinch_auth_url: Option<String>,
    /// Comma-separated webhook secrets; any one verifies a callback (rotation).
    #[arg(long, env = WEBHOOK_SECRETS, hide_env_values = true)]
    pub sinch_webhook_secrets: Option<Secret>,
    /// Accept unsigned callbacks when no webhook secret is set (never in production).
    #[arg(long, env = INSECURE_WEBHOOKS, default_value = "false")]
    pub insecure_webhooks: String,
    /// Queries per second this replica may send to Sinch.
    #[arg(long, env = RATE_LIMIT, default_value = "800")]
    pub sinch_rate_limit: String,
    /// Redis URL; when set, replicas share events, idempotency keys and nonces through Redis.
    #[arg(long, env = REDIS_URL, hide_env_values = true)]
    pub redis_url: Option<Secret>,
    /// Key prefix for everything this service keeps in Redis.
    #[arg(long, env = REDIS_PREFIX, default_value = "capability")]
    pub redis_prefix: String,
    /// How long results stay replayable after their last activity.
    #[arg(long, env = RETENTION, default_value = "10m")]
    pub retention: String,
    /// Hard bound on the drain after SIGTERM.
    #[arg(long, env = SHUTDOWN_GRACE, default_value = "20s")]
    pub shutdown_grace: String,
    /// After SIGTERM, how long the listeners keep accepting (answering UNAVAILABLE to new watches, serving
    /// queries and callbacks) before they stop; part of the shutdown grace.
    #[arg(long, env = DRAIN_DELAY, default_value = "1s")]
    pub drain_delay: String,
    /// Comma-separated bearer tokens; when set, CapabilityService calls must carry `authorization: Bearer <one
    /// of them>` (health and reflection stay open). Off by default: in a mesh, mTLS identifies callers.
    #[arg(long, env = GRPC_TOKENS, hide_env_values = true)]
    pub grpc_tokens: Option<Secret>,
    /// A PEM certificate chain: when set (with CAPABILITY_TLS_KEY), the gRPC and webhook ports serve TLS only.
    /// Leave unset inside a mesh, whose sidecars encrypt.
    #[arg(long, env = TLS_CERT)]
    pub tls_cert: Option<String>,
    /// The PEM private key of CAPABILITY_TLS_CERT.
    #[arg(long, env = TLS_KEY)]
    pub tls_key: Option<String>,
    /// A PEM file of CA certificates: when set, gRPC callers must present a certificate issued by one (mutual TLS).
    #[arg(long, env = TLS_CLIENT_CA)]
    pub tls_client_ca: Option<String>,
    /// Export traces over OTLP/gRPC to this collector (for example http://otel-collector:4317); off when unset.
    #[arg(long, env = OTLP_ENDPOINT)]
    pub otlp_endpoint: Option<String>,
    /// Log format: text or json. Default: text on a terminal, json otherwise.
    #[arg(long, env = LOG_FORMAT)]
    pub log_format: Option<String>,
    /// How long a caller-chosen request_id makes QueryCapability idempotent.
    #[arg(long, env = IDEMPOTENCY_WINDOW, default_value = "1h")]
    pub idempotency_window: String,
    /// Time budget of a QueryCapability whose caller set no deadline (retries included).
    #[arg(long, env = QUERY_TIMEOUT, default_value = "10s")]
    pub query_timeout: String,
    /// How far a callback's signature timestamp may be from now, either way.
    #[arg(long, env = WEBHOOK_TOLERANCE, default_value = "5m")]
    pub webhook_tolerance: String,
    /// The largest callback body accepted, in bytes.
    #[arg(long, env = WEBHOOK_MAX_BODY, default_value = "1048576")]
    pub webhook_max_body: String,
    /// The longest a webhook request may take, body included.
    #[arg(long, env = WEBHOOK_TIMEOUT, default_value = "10s")]
    pub webhook_timeout: String,
    /// The longest quiet spell on a WatchCapability stream before a heartbeat.
    #[arg(long, env = HEARTBEAT, default_value = "15s")]
    pub heartbeat: String,
    /// The wait of a WatchCapability request that sets none (capped by the retention).
    #[arg(long, env = WATCH_WAIT, default_value = "60s")]
    pub watch_wait: String,
    /// The most WatchCapability streams open at once on this replica.
    #[arg(long, env = MAX_WATCHES, default_value = "250000")]
    pub max_watches: String,
    /// QueryCapability calls in flight at once on this replica; beyond, RESOURCE_EXHAUSTED at once (load shedding).
    #[arg(long, env = MAX_INFLIGHT_QUERIES, default_value = "2048")]
    pub max_inflight_queries: String,
    /// HTTP/2 streams one connection may carry at once (a mesh sidecar multiplexes many callers on few).
    #[arg(long, env = MAX_STREAMS_PER_CONNECTION, default_value = "10000")]
    pub max_streams_per_connection: String,
    /// Close gRPC connections older than this (GOAWAY, open streams may finish); 0 = never.
    #[arg(long, env = MAX_CONNECTION_AGE, default_value = "0s")]
    pub max_connection_age: String,
    /// The most requests tracked at once; past it the oldest are evicted.
    #[arg(long, env = MAX_REQUESTS, default_value = "500000")]
    pub max_requests: String,
    /// Sandbox: the delay between a query and its callbacks.
    #[arg(long, env = SANDBOX_CALLBACK_DELAY, default_value = "150ms")]
    pub sandbox_callback_delay: String,
    /// Sandbox: send every callback twice, as Sinch's redelivery may.
    #[arg(long, env = SANDBOX_DUPLICATES, default_value = "false")]
    pub sandbox_duplicates: String,
    /// Sandbox: send a query's callbacks in reverse order.
    #[arg(long, env = SANDBOX_REORDER, default_value = "false")]
    pub sandbox_reorder: String,
}

pub const GRPC_ADDR: &str = "CAPABILITY_GRPC_ADDR";
pub const WEBHOOK_ADDR: &str = "CAPABILITY_WEBHOOK_ADDR";
pub const ADMIN_ADDR: &str = "CAPABILITY_ADMIN_ADDR";
pub const PROJECT_ID: &str = "SINCH_PROJECT_ID";
pub const KEY_ID: &str = "SINCH_KEY_ID";
pub const KEY_SECRET: &str = "SINCH_KEY_SECRET";
pub const REGION: &str = "SINCH_REGION";
pub const AUTH: &str = "SINCH_AUTH";
pub const API_URL: &str = "SINCH_API_URL";
pub const AUTH_URL: &str = "SINCH_AUTH_URL";
pub const WEBHOOK_SECRETS: &str = "SINCH_WEBHOOK_SECRETS";
pub const INSECURE_WEBHOOKS: &str = "CAPABILITY_INSECURE_WEBHOOKS";
pub const RATE_LIMIT: &str = "SINCH_RATE_LIMIT";
pub const REDIS_URL: &str = "CAPABILITY_REDIS_URL";
pub const REDIS_PREFIX: &str = "CAPABILITY_REDIS_PREFIX";
pub const RETENTION: &str = "CAPABILITY_RETENTION";
pub const SHUTDOWN_GRACE: &str = "CAPABILITY_SHUTDOWN_GRACE";
pub const LOG_FORMAT: &str = "CAPABILITY_LOG_FORMAT";
pub const DRAIN_DELAY: &str = "CAPABILITY_DRAIN_DELAY";
pub const OTLP_ENDPOINT: &str = "OTEL_EXPORTER_OTLP_ENDPOINT";
pub const GRPC_TOKENS: &str = "CAPABILITY_GRPC_TOKENS";
pub const TLS_CERT: &str = "CAPABILITY_TLS_CERT";
pub const TLS_KEY: &str = "CAPABILITY_TLS_KEY";
pub const TLS_CLIENT_CA: &str = "CAPABILITY_TLS_CLIENT_CA";
pub const IDEMPOTENCY_WINDOW: &str = "CAPABILITY_IDEMPOTENCY_WINDOW";
pub const QUERY_TIMEOUT: &str = "CAPABILITY_QUERY_TIMEOUT";
pub const WEBHOOK_TOLERANCE: &str = "CAPABILITY_WEBHOOK_TOLERANCE";
pub const WEBHOOK_MAX_BODY: &str = "CAPABILITY_WEBHOOK_MAX_BODY";
pub const WEBHOOK_TIMEOUT: &str = "CAPABILITY_WEBHOOK_TIMEOUT";
pub const HEARTBEAT: &str = "CAPABILITY_HEARTBEAT";
pub const WATCH_WAIT: &str = "CAPABILITY_WATCH_WAIT";
pub const MAX_WATCHES: &str = "CAPABILITY_MAX_WATCHES";
pub const MAX_REQUESTS: &str = "CAPABILITY_MAX_REQUESTS";
pub const MAX_INFLIGHT_QUERIES: &str = "CAPABILITY_MAX_INFLIGHT_QUERIES";
pub const MAX_STREAMS_PER_CONNECTION: &str = "CAPABILITY_MAX_STREAMS_PER_CONNECTION";
pub const MAX_CONNECTION_AGE: &str = "CAPABILITY_MAX_CONNECTION_AGE";
pub const SANDBOX_CALLBACK_DELAY: &str = "CAPABILITY_SANDBOX_CALLBACK_DELAY";
pub const SANDBOX_DUPLICATES: &str = "CAPABILITY_SANDBOX_DUPLICATES";
pub const SANDBOX_REORDER: &str = "CAPABILITY_SANDBOX_REORDER";

const DEFAULT_AUTH_URL: &str = "https://auth.sinch.com/oauth2/token";

/// A configuration value that cannot be used, named by its variable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{variable}: {problem}")]
pub struct ConfigError {
    pub variable: &'static str,
    pub problem: String,
}

fn invalid(variable: &'static str, problem: impl Into<String>) -> ConfigError {
    ConfigError {
        variable,
        problem: problem.into(),
    }
}

/// The validated configuration of a serving process.
#[derive(Debug, Clone)]
pub struct Config {
    pub grpc_addr: SocketAddr,
    pub webhook_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    /// Where queries go: the real Sinch, or the built-in sandbox.
    pub upstream: Upstream,
    /// Secrets that verify callbacks; empty only when insecure webhooks were asked for, or in sandbox mode
    /// (which generates its own).
    pub webhook_secrets: Vec<Secret>,
    pub insecure_webhooks: bool,
    pub rate_limit: NonZeroU32,
    pub redis_url: Option<Secret>,
    pub redis_prefix: String,
    pub retention: Duration,
    pub shutdown_grace: Duration,
    pub drain_delay: Duration,
    pub log_format: LogFormat,
    /// Where to export traces, when set.
    pub otlp_endpoint: Option<String>,
    /// Bearer tokens callers must present; empty when caller authentication is off.
    pub grpc_tokens: Vec<Secret>,
    /// TLS on the gRPC and webhook ports (and mutual TLS on gRPC), when configured.
    pub tls: Option<TlsFiles>,
    pub idempotency_window: Duration,
    pub query_timeout: Duration,
    pub webhook_tolerance: Duration,
    pub webhook_max_body: usize,
    pub webhook_timeout: Duration,
    pub heartbeat: Duration,
    pub watch_wait: Duration,
    pub max_watches: usize,
    pub max_requests: usize,
    pub max_inflight_queries: usize,
    pub max_streams_per_connection: u32,
    /// `None`: connections live as long as their peers keep them.
    pub max_connection_age: Option<Duration>,
    /// How the in-process sandbox sends callbacks (sandbox mode only).
    pub sandbox: SandboxKnobs,
}

/// The sandbox's fault knobs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SandboxKnobs {
    pub callback_delay: Duration,
    pub duplicates: bool,
    pub reorder: bool,
}

/// Where queries are sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Upstream {
    /// The built-in sandbox, started in-process (no credentials were configured).
    Sandbox,
    /// A Sinch deployment (or anything that speaks its API at the configured URLs).
    Sinch(SinchConfig),
}

/// How to reach and authenticate to Sinch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SinchConfig {
    pub project_id: String,
    pub key_id: String,
    pub key_secret: Secret,
    pub auth: AuthMode,
    /// The API base URL, without a trailing slash.
    pub api_url: String,
    /// The OAuth2 token endpoint.
    pub auth_url: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthMode {
    OAuth2,
    Basic,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

impl Config {
    /// Checks every value; the first one that cannot be used is the error.
    pub fn from_args(args: &ServeArgs) -> Result<Config, ConfigError> {
        let upstream = upstream(args)?;
        let webhook_secrets = split_secrets(args.sinch_webhook_secrets.as_ref());
        let insecure_webhooks = parse_bool(INSECURE_WEBHOOKS, &args.insecure_webhooks)?;
        if webhook_secrets.is_empty() && !insecure_webhooks && upstream != Upstream::Sandbox {
            return Err(invalid(
                WEBHOOK_SECRETS,
                format!(
                    "no webhook secret is set, so callbacks could not be verified; set the secret registered with \
                     Sinch, or {INSECURE_WEBHOOKS}=true to accept unsigned callbacks (never in production)"
                ),
            ));
        }
        let rate_limit = args.sinch_rate_limit.parse::<NonZeroU32>().map_err(|_| {
            invalid(
                RATE_LIMIT,
                format!(
                    "expected a whole number of queries per second above 0, got {:?}",
                    args.sinch_rate_limit
                ),
            )
        })?;
        let redis_url = args.redis_url.clone().filter(|u| !u.expose().is_empty());
        if let Some(url) = &redis_url
            && !(url.expose().starts_with("redis://") || url.expose().starts_with("rediss://"))
        {
            return Err(invalid(REDIS_URL, "expected a redis:// or rediss:// URL"));
        }
        let log_format = match args.log_format.as_deref() {
            None | Some("") => {
                if std::io::IsTerminal::is_terminal(&std::io::stderr()) {
                    LogFormat::Text
                } else {
                    LogFormat::Json
                }
            }
            Some("text") => LogFormat::Text,
            Some("json") => LogFormat::Json,
            Some(other) => return Err(invalid(LOG_FORMAT, format!("expected text or json, got {other:?}"))),
        };
        Ok(Config {
            grpc_addr: parse_addr(GRPC_ADDR, &args.grpc_addr)?,
            webhook_addr: parse_addr(WEBHOOK_ADDR, &args.webhook_addr)?,
            admin_addr: parse_addr(ADMIN_ADDR, &args.admin_addr)?,
            upstream,
            webhook_secrets,
            insecure_webhooks,
            rate_limit,
            redis_url,
            redis_prefix: args.redis_prefix.clone(),
            retention: parse_duration(RETENTION, &args.retention)?,
            shutdown_grace: parse_duration(SHUTDOWN_GRACE, &args.shutdown_grace)?,
            drain_delay: parse_duration(DRAIN_DELAY, &args.drain_delay)?,
            grpc_tokens: split_secrets(args.grpc_tokens.as_ref()),
            tls: tls(args)?,
            otlp_endpoint: match args.otlp_endpoint.as_deref() {
                None | Some("") => None,
                Some(url) => Some(parse_url(OTLP_ENDPOINT, url)?),
            },
            log_format,
            idempotency_window: parse_duration(IDEMPOTENCY_WINDOW, &args.idempotency_window)?,
            query_timeout: parse_duration(QUERY_TIMEOUT, &args.query_timeout)?,
            webhook_tolerance: parse_duration(WEBHOOK_TOLERANCE, &args.webhook_tolerance)?,
            webhook_max_body: parse_count(WEBHOOK_MAX_BODY, &args.webhook_max_body)?,
            webhook_timeout: parse_duration(WEBHOOK_TIMEOUT, &args.webhook_timeout)?,
            heartbeat: parse_positive_duration(HEARTBEAT, &args.heartbeat)?,
            watch_wait: parse_duration(WATCH_WAIT, &args.watch_wait)?,
            max_watches: parse_count(MAX_WATCHES, &args.max_watches)?,
            max_requests: parse_count(MAX_REQUESTS, &args.max_requests)?,
            max_inflight_queries: parse_count(MAX_INFLIGHT_QUERIES, &args.max_inflight_queries)?,
            max_streams_per_connection: u32::try_from(parse_count(
                MAX_STREAMS_PER_CONNECTION,
                &args.max_streams_per_connection,
            )?)
            .map_err(|_| invalid(MAX_STREAMS_PER_CONNECTION, "too large"))?,
            max_connection_age: Some(parse_duration(MAX_CONNECTION_AGE, &args.max_connection_age)?)
                .filter(|age| !age.is_zero()),
            sandbox: SandboxKnobs {
                callback_delay: parse_duration(SANDBOX_CALLBACK_DELAY, &args.sandbox_callback_delay)?,
                duplicates: parse_bool(SANDBOX_DUPLICATES, &args.sandbox_duplicates)?,
                reorder: parse_bool(SANDBOX_REORDER, &args.sandbox_reorder)?,
            },
        })
    }
}

/// The non-empty entries of a comma-separated secret.
fn split_secrets(value: Option<&Secret>) -> Vec<Secret> {
    value
        .iter()
        .flat_map(|s| s.expose().split(','))
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(Secret::new)
        .collect()
}

/// Reads and checks the TLS files, when TLS is asked for.
fn tls(args: &ServeArgs) -> Result<Option<TlsFiles>, ConfigError> {
    let set = |value: &Option<String>| value.clone().filter(|v| !v.is_empty());
    let (cert, key, client_ca) = (set(&args.tls_cert), set(&args.tls_key), set(&args.tls_client_ca));
    let (cert, key) = match (cert, key) {
        (None, None) => {
            return match client_ca {
                Some(_) => Err(invalid(
                    TLS_CLIENT_CA,
                    format!("mutual TLS needs TLS: set {TLS_CERT} and {TLS_KEY} too"),
                )),
                None => Ok(None),
            };
        }
        (Some(_), None) => return Err(invalid(TLS_KEY, format!("required when {TLS_CERT} is set"))),
        (None, Some(_)) => return Err(invalid(TLS_CERT, format!("required when {TLS_KEY} is set"))),
        (Some(cert), Some(key)) => (cert, key),
    };
    let read = |variable: &'static str, path: &str| {
        std::fs::read(path).map_err(|e| invalid(variable, format!("cannot read {path:?}: {e}")))
    };
    let cert = read(TLS_CERT, &cert)?;
    let key = String::from_utf8(read(TLS_KEY, &key)?).map_err(|_| invalid(TLS_KEY, "not a PEM file"))?;
    let client_ca = client_ca.map(|path| read(TLS_CLIENT_CA, &path)).transpose()?;
    let files = TlsFiles::load(cert, Secret::new(key), client_ca).map_err(|e| {
        let variable = match e {
            TlsError::Certificate(_) => TLS_CERT,
            TlsError::Key(_) => TLS_KEY,
            TlsError::ClientCa(_) => TLS_CLIENT_CA,
        };
        invalid(variable, e.to_string())
    })?;
    Ok(Some(files))
}

fn upstream(args: &ServeArgs) -> Result<Upstream, ConfigError> {
    let Some(key_id) = args.sinch_key_id.clone().filter(|k| !k.is_empty()) else {
        return Ok(Upstream::Sandbox);
    };
    let project_id = args
        .sinch_project_id
        .clone()
        .filter(|p| !p.is_empty())
        .ok_or_else(|| invalid(PROJECT_ID, format!("required when {KEY_ID} is set")))?;
    let key_secret = args
        .sinch_key_secret
        .clone()
        .filter(|s| !s.expose().is_empty())
        .ok_or_else(|| invalid(KEY_SECRET, format!("required when {KEY_ID} is set")))?;
    let auth = match args.sinch_auth.as_str() {
        "oauth2" => AuthMode::OAuth2,
        "basic" => AuthMode::Basic,
        other => return Err(invalid(AUTH, format!("expected oauth2 or basic, got {other:?}"))),
    };
    let region = match args.sinch_region.as_str() {
        r @ ("us" | "eu" | "br") => r,
        other => return Err(invalid(REGION, format!("expected us, eu or br, got {other:?}"))),
    };
    let api_url = match &args.sinch_api_url {
        Some(url) => parse_url(API_URL, url)?,
        None => format!("https://{region}.conversation.api.sinch.com"),
    };
    let auth_url = match &args.sinch_auth_url {
        Some(url) => parse_url(AUTH_URL, url)?,
        None => DEFAULT_AUTH_URL.to_owned(),
    };
    Ok(Upstream::Sinch(SinchConfig {
        project_id,
        key_id,
        key_secret,
        auth,
        api_url,
        auth_url,
    }))
}

fn parse_addr(variable: &'static str, value: &str) -> Result<SocketAddr, ConfigError> {
    value.parse().map_err(|_| {
        invalid(
            variable,
            format!("expected an address such as 0.0.0.0:50051, got {value:?}"),
        )
    })
}

fn parse_url(variable: &'static str, value: &str) -> Result<String, ConfigError> {
    let trimmed = value.trim_end_matches('/');
    let rest = trimmed
        .strip_prefix("https://")
        .or_else(|| trimmed.strip_prefix("http://"))
        .ok_or_else(|| invalid(variable, format!("expected an http:// or https:// URL, got {value:?}")))?;
    if rest.is_empty() {
        return Err(invalid(variable, format!("the URL {value:?} has no host")));
    }
    Ok(trimmed.to_owned())
}

/// Parses a duration written the human way (`250ms`, `20s`, `10m`, `1h`).
pub fn parse_duration(variable: &'static str, value: &str) -> Result<Duration, ConfigError> {
    humantime::parse_duration(value).map_err(|e| {
        invalid(
            variable,
            format!("expected a duration such as 250ms, 20s or 10m, got {value:?} ({e})"),
        )
    })
}

fn parse_positive_duration(variable: &'static str, value: &str) -> Result<Duration, ConfigError> {
    let duration = parse_duration(variable, value)?;
    if duration.is_zero() {
        return Err(invalid(variable, "must be above zero"));
    }
    Ok(duration)
}

fn parse_count(variable: &'static str, value: &str) -> Result<usize, ConfigError> {
    match value.trim().parse::<usize>() {
        Ok(n) if n > 0 => Ok(n),
        _ => Err(invalid(
            variable,
            format!("expected a whole number above 0, got {value:?}"),
        )),
    }
}

fn parse_bool(variable: &'static str, value: &str) -> Result<bool, ConfigError> {
    match value.to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" => Ok(true),
        "false" | "0" | "no" | "" => Ok(false),
        _ => Err(invalid(variable, format!("expected true or false, got {value:?}"))),
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        serve: ServeArgs,
    }

    fn parse(flags: &[&str]) -> Result<Config, ConfigError> {
        let cli = Cli::try_parse_from(std::iter::once("test").chain(flags.iter().copied())).unwrap();
        Config::from_args(&cli.serve)
    }

    #[test]
    fn no_credentials_means_sandbox() {
        assert_eq!(parse(&[]).unwrap().upstream, Upstream::Sandbox);
    }

    #[test]
    fn credentials_build_the_regional_urls() {
        let c = parse(&[
            "--sinch-key-id=k",
            "--sinch-key-secret=s",
            "--sinch-project-id=p",
            "--sinch-region=eu",
            "--sinch-webhook-secrets=w",
        ])
        .unwrap();
        let Upstream::Sinch(s) = c.upstream else {
            panic!("not sinch")
        };
        assert_eq!(s.api_url, "https://eu.conversation.api.sinch.com");
        assert_eq!(s.auth_url, DEFAULT_AUTH_URL);
        assert_eq!(s.auth, AuthMode::OAuth2);
    }

    #[test]
    fn each_bad_value_names_its_variable() {
        let creds = [
            "--sinch-key-id=k",
            "--sinch-key-secret=s",
            "--sinch-project-id=p",
            "--sinch-webhook-secrets=w",
        ];
        let cases: &[(&str, &str)] = &[
            ("--grpc-addr=nowhere", GRPC_ADDR),
            ("--sinch-region=mars", REGION),
            ("--sinch-auth=magic", AUTH),
            ("--sinch-api-url=ftp://x", API_URL),
            ("--sinch-rate-limit=0", RATE_LIMIT),
            ("--retention=forever", RETENTION),
            ("--shutdown-grace=-1s", SHUTDOWN_GRACE),
            ("--log-format=xml", LOG_FORMAT),
            ("--redis-url=http://x", REDIS_URL),
            ("--insecure-webhooks=perhaps", INSECURE_WEBHOOKS),
            ("--heartbeat=0s", HEARTBEAT),
            ("--max-watches=none", MAX_WATCHES),
            ("--webhook-max-body=0", WEBHOOK_MAX_BODY),
            ("--sandbox-reorder=sometimes", SANDBOX_REORDER),
        ];
        for (flag, variable) in cases {
            let mut flags = creds.to_vec();
            flags.push(flag);
            assert_eq!(parse(&flags).unwrap_err().variable, *variable, "{flag}");
        }
    }

    #[test]
    fn credentials_must_be_complete() {
        assert_eq!(parse(&["--sinch-key-id=k"]).unwrap_err().variable, PROJECT_ID);
        assert_eq!(
            parse(&["--sinch-key-id=k", "--sinch-project-id=p"])
                .unwrap_err()
                .variable,
            KEY_SECRET
        );
    }

    #[test]
    fn real_sinch_needs_a_webhook_secret_or_an_explicit_opt_out() {
        let creds = ["--sinch-key-id=k", "--sinch-key-secret=s", "--sinch-project-id=p"];
        assert_eq!(parse(&creds).unwrap_err().variable, WEBHOOK_SECRETS);
        let mut insecure = creds.to_vec();
        insecure.push("--insecure-webhooks=true");
        assert!(parse(&insecure).unwrap().webhook_secrets.is_empty());
    }

    #[test]
    fn webhook_secrets_split_on_commas() {
        let c = parse(&["--sinch-webhook-secrets=a, b,,c"]).unwrap();
        let secrets: Vec<&str> = c.webhook_secrets.iter().map(Secret::expose).collect();
        assert_eq!(secrets, ["a", "b", "c"]);
    }

    #[test]
    fn debug_output_hides_every_secret() {
        let c = parse(&[
            "--sinch-key-id=k",
            "--sinch-key-secret=TOPSECRET1",
            "--sinch-project-id=p",
            "--sinch-webhook-secrets=TOPSECRET2",
            "--redis-url=redis://:TOPSECRET3@localhost",
        ])
        .unwrap();
        let shown = format!("{c:?}");
        assert!(!shown.contains("TOPSECRET"), "{shown}");
    }
}
