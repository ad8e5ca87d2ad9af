//! Configuration: environment variables, with flags of the same meaning, parsed by clap into one typed settings
//! struct per part ([`values`] holds the parsers: bounded durations, URLs, secrets). [`Config::check`] adds
//! the rules that span settings. Everything here is checked before any port is bound; what can only be
//! checked by building a component (a Redis that answers, TLS files) is checked by the composition root, also
//! before binding. Every error names its environment variable ([`variable_of`]).

pub mod values;

use std::{net::SocketAddr, num::NonZeroU32, path::PathBuf, time::Duration};

use clap::{Args, ValueEnum};

use crate::{
    capability::{CacheTtl, ChannelOrder, MAX_IDENTITIES},
    secret::Secret,
};
use values::{
    CacheTtlParser, ChannelListParser, DAY, HOUR, HttpUrl, MINUTE, MS, PathSegment, SECOND, SecretList,
    SecretListParser, SecretParser, SecretValue, Text, ZERO, duration,
};

/// The serving process's whole configuration.
#[derive(Debug, Clone, Args)]
pub struct Config {
    #[command(flatten)]
    pub listen: ListenSettings,
    #[command(flatten)]
    pub sinch: SinchSettings,
    #[command(flatten)]
    pub webhook: WebhookSettings,
    #[command(flatten)]
    pub redis: RedisSettings,
    #[command(flatten)]
    pub retention: RetentionSettings,
    #[command(flatten)]
    pub watch: WatchSettings,
    #[command(flatten)]
    pub query: QuerySettings,
    #[command(flatten)]
    pub check: CheckSettings,
    #[command(flatten)]
    pub grpc: GrpcSettings,
    #[command(flatten)]
    pub connections: ConnectionSettings,
    #[command(flatten)]
    pub tls: TlsSettings,
    #[command(flatten)]
    pub telemetry: TelemetrySettings,
    #[command(flatten)]
    pub shutdown: ShutdownSettings,
    #[command(flatten)]
    pub registration: RegistrationSettings,
    #[command(flatten)]
    pub sandbox: SandboxSettings,
}

/// What the service checks of its own webhook registration at start (optional).
#[derive(Debug, Clone, Args)]
pub struct RegistrationSettings {
    /// The URL Sinch posts callbacks to (this service's public `/webhooks/sinch`, behind the ingress). With
    /// CAPABILITY_APP_IDS, the service checks at start that each app has a webhook with the CAPABILITY trigger
    /// there, and warns when not.
    #[arg(id = "public-webhook-url", long = "public-webhook-url", env = PUBLIC_WEBHOOK_URL, value_parser = HttpUrl::ANY)]
    pub public_webhook_url: Option<url::Url>,
    /// Comma-separated Sinch app ids this service queries for: the apps whose webhook is checked at start.
    #[arg(id = "app-ids", long = "app-ids", env = APP_IDS, value_delimiter = ',', value_parser = Text)]
    pub app_ids: Vec<String>,
}

impl RegistrationSettings {
    /// The apps named: a stray comma (`A,,B,`) names none.
    pub fn apps(&self) -> Vec<String> {
        self.app_ids.iter().filter(|id| !id.is_empty()).cloned().collect()
    }
}

/// Where the three listeners listen.
#[derive(Debug, Clone, Args)]
pub struct ListenSettings {
    /// gRPC listen address (CapabilityService, health, reflection). Port 0 picks a free port.
    #[arg(id = "grpc-addr", long = "grpc-addr", env = GRPC_ADDR, default_value = "0.0.0.0:50051")]
    pub grpc: SocketAddr,
    /// Webhook listen address (POST /webhooks/sinch, GET /healthz).
    #[arg(id = "webhook-addr", long = "webhook-addr", env = WEBHOOK_ADDR, default_value = "0.0.0.0:8080")]
    pub webhook: SocketAddr,
    /// Admin listen address (metrics and probes); never expose it outside the cluster.
    #[arg(id = "admin-addr", long = "admin-addr", env = ADMIN_ADDR, default_value = "0.0.0.0:9090")]
    pub admin: SocketAddr,
}

/// Whether two listen addresses cannot both be bound: one port (not 0, which picks a free one) on one address, or
/// on every address and one of them.
fn clash(a: SocketAddr, b: SocketAddr) -> bool {
    a.port() != 0 && a.port() == b.port() && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified())
}

/// Sinch's regions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Region {
    Us,
    Eu,
    Br,
}

/// How to authenticate to Sinch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum AuthMode {
    /// A cached OAuth2 bearer token.
    #[value(name = "oauth2")]
    OAuth2,
    /// HTTP Basic with the key on every call (tests and prototypes).
    Basic,
}

/// How to reach Sinch.
#[derive(Debug, Clone, Args)]
pub struct SinchSettings {
    /// Sinch project id. Required with SINCH_KEY_ID.
    #[arg(id = "sinch-project-id", long = "sinch-project-id", env = PROJECT_ID, value_parser = PathSegment)]
    pub project_id: Option<String>,
    /// Sinch access key id. When unset, the service runs against the built-in sandbox.
    #[arg(id = "sinch-key-id", long = "sinch-key-id", env = KEY_ID, value_parser = Text)]
    pub key_id: Option<String>,
    /// Sinch access key secret. Required with SINCH_KEY_ID.
    #[arg(id = "sinch-key-secret", long = "sinch-key-secret", env = KEY_SECRET, hide_env_values = true, value_parser = SecretParser)]
    pub key_secret: Option<SecretValue>,
    /// Sinch region. Must match the app's region.
    #[arg(id = "sinch-region", long = "sinch-region", env = REGION, value_enum, default_value = "us")]
    pub region: Region,
    /// How to authenticate to Sinch.
    #[arg(id = "sinch-auth", long = "sinch-auth", env = AUTH, value_enum, default_value = "oauth2")]
    pub auth: AuthMode,
    /// Overrides the regional API base URL (tests, proxies).
    #[arg(id = "sinch-api-url", long = "sinch-api-url", env = API_URL, value_parser = HttpUrl::BASE)]
    pub api_url: Option<url::Url>,
    /// Overrides the OAuth2 token URL.
    #[arg(id = "sinch-auth-url", long = "sinch-auth-url", env = AUTH_URL, value_parser = HttpUrl::ANY)]
    pub auth_url: Option<url::Url>,
    /// Queries per second this replica may send to Sinch (Sinch allows 800 per project).
    #[arg(id = "sinch-rate-limit", long = "sinch-rate-limit", env = RATE_LIMIT, default_value = "800",
          value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub rate_limit: u32,
    /// The app's callback rate at Sinch (its `rate_limits.webhooks`, 25/s by default), in channel identities per
    /// second: bulk checks query no faster than the callbacks can come back, after interactive calls (shared by
    /// every replica through Redis).
    #[arg(id = "sinch-callback-rate", long = "sinch-callback-rate", env = CALLBACK_RATE, default_value = "25",
          value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub callback_rate: u32,
}

/// How callbacks are checked.
#[derive(Debug, Clone, Args)]
pub struct WebhookSettings {
    /// Comma-separated webhook secrets; any one verifies a callback (rotation).
    #[arg(id = "sinch-webhook-secrets", long = "sinch-webhook-secrets", env = WEBHOOK_SECRETS, hide_env_values = true,
          value_parser = SecretListParser, default_value = "")]
    pub secrets: SecretList,
    /// Accept unsigned callbacks when no webhook secret is set (never in production).
    #[arg(id = "insecure-webhooks", long = "insecure-webhooks", env = INSECURE_WEBHOOKS, default_value = "false",
          action = clap::ArgAction::Set, value_parser = clap::builder::BoolishValueParser::new())]
    pub insecure: bool,
    /// How far a callback's signature timestamp may be from now, either way (1s to 1h).
    #[arg(id = "webhook-tolerance", long = "webhook-tolerance", env = WEBHOOK_TOLERANCE, default_value = "5m",
          value_parser = duration(SECOND, HOUR))]
    pub tolerance: Duration,
    /// The largest callback body accepted, in bytes (1 KiB to 64 MiB).
    #[arg(id = "webhook-max-body", long = "webhook-max-body", env = WEBHOOK_MAX_BODY, default_value = "1048576",
          value_parser = clap::value_parser!(u64).range(1024..=64 * 1024 * 1024))]
    pub max_body: u64,
    /// The longest a webhook request may take after its head (100ms to 10m): its body (408 past it) and its
    /// hand-off to the event log (503 past it, so that Sinch redelivers).
    #[arg(id = "webhook-timeout", long = "webhook-timeout", env = WEBHOOK_TIMEOUT, default_value = "10s",
          value_parser = duration(100 * MS, 10 * MINUTE))]
    pub timeout: Duration,
    /// The most callbacks handled at once on this replica (1 to 65536); the next is answered 503 with
    /// `Retry-After: 1` at once, before its signature is checked, and Sinch redelivers it. A body still arriving
    /// holds no place, only its bytes so far, within a budget of this many whole bodies.
    #[arg(id = "webhook-max-pending", long = "webhook-max-pending", env = WEBHOOK_MAX_PENDING, default_value = "256",
          value_parser = clap::value_parser!(u32).range(1..=65_536))]
    pub max_pending: u32,
}

/// Where replicas share events and state.
#[derive(Debug, Clone, Args)]
pub struct RedisSettings {
    /// Redis: `redis://host:port` (or `rediss://`), or a Redis Cluster: several comma-separated node URLs, or
    /// one `redis+cluster://host:port` seed. When set, replicas share events, idempotency keys and nonces.
    #[arg(id = "redis-url", long = "redis-url", env = REDIS_URL, hide_env_values = true, value_parser = SecretParser)]
    pub url: Option<SecretValue>,
    /// Prefix of every key this service keeps in Redis (letters, digits, `_`, `-`, `.`, `:`).
    #[arg(id = "redis-prefix", long = "redis-prefix", env = REDIS_PREFIX, default_value = "capability", value_parser = Text)]
    pub prefix: String,
    /// How many streams the event log is split into (by a stable hash of request_id), so that a Redis Cluster
    /// spreads them over its nodes (1 to 1024).
    #[arg(id = "redis-shards", long = "redis-shards", env = REDIS_SHARDS, default_value = "1",
          value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub shards: u16,
    /// A PEM file of the CA certificates that vouch for a `rediss://` Redis (a private CA); without it, the
    /// system's roots.
    #[arg(id = "redis-ca-file", long = "redis-ca-file", env = REDIS_CA_FILE)]
    pub ca_file: Option<PathBuf>,
}

/// How long results are kept, and how many.
#[derive(Debug, Clone, Args)]
pub struct RetentionSettings {
    /// How long a result stays replayable after it arrived (1s to 7d).
    #[arg(id = "retention", long = "retention", env = RETENTION, default_value = "10m", value_parser = duration(SECOND, 7 * DAY))]
    pub retention: Duration,
    /// The most requests with results held at once; past it the oldest are evicted.
    #[arg(id = "max-requests", long = "max-requests", env = MAX_REQUESTS, default_value = "500000",
          value_parser = clap::value_parser!(u64).range(1..=100_000_000))]
    pub max_requests: u64,
    /// The most notifications one request takes (Sinch sends one per channel identity, and a query carries up to
    /// 100: no fewer); the excess is acknowledged, dropped and counted.
    #[arg(id = "max-notifications-per-request", long = "max-notifications-per-request",
          env = MAX_NOTIFICATIONS_PER_REQUEST, default_value = "128",
          value_parser = clap::value_parser!(u64).range(MAX_IDENTITIES as u64..=1_000_000))]
    pub max_notifications_per_request: u64,
}

/// How WatchCapability streams behave.
#[derive(Debug, Clone, Args)]
pub struct WatchSettings {
    /// The longest quiet spell on a WatchCapability stream before a heartbeat (10ms to 1h).
    #[arg(id = "heartbeat", long = "heartbeat", env = HEARTBEAT, default_value = "15s", value_parser = duration(10 * MS, HOUR))]
    pub heartbeat: Duration,
    /// The wait of a WatchCapability request that sets none (capped by the retention).
    #[arg(id = "watch-wait", long = "watch-wait", env = WATCH_WAIT, default_value = "60s", value_parser = duration(ZERO, 7 * DAY))]
    pub default_wait: Duration,
    /// The most WatchCapability streams open at once on this replica.
    #[arg(id = "max-watches", long = "max-watches", env = MAX_WATCHES, default_value = "250000",
          value_parser = clap::value_parser!(u64).range(1..=10_000_000))]
    pub max_watches: u64,
    /// The most WatchCapability streams one gRPC connection may hold open; below CAPABILITY_MAX_WATCHES
    /// (default: half of it).
    #[arg(id = "max-watches-per-connection", long = "max-watches-per-connection", env = MAX_WATCHES_PER_CONNECTION,
          value_parser = clap::value_parser!(u64).range(1..=10_000_000))]
    pub max_per_connection: Option<u64>,
    /// The most WatchCapability streams one caller may hold open: the caller's token or client certificate when
    /// callers are authenticated, else its address; below CAPABILITY_MAX_WATCHES (default: half of it).
    #[arg(id = "max-watches-per-caller", long = "max-watches-per-caller", env = MAX_WATCHES_PER_CALLER,
          value_parser = clap::value_parser!(u64).range(1..=10_000_000))]
    pub max_per_caller: Option<u64>,
}

impl WatchSettings {
    /// The per-connection limit: the configured one, else half of the replica's.
    pub fn per_connection(&self) -> u64 {
        self.max_per_connection.unwrap_or(self.max_watches / 2).max(1)
    }

    /// The per-caller limit: the configured one, else half of the replica's.
    pub fn per_caller(&self) -> u64 {
        self.max_per_caller.unwrap_or(self.max_watches / 2).max(1)
    }
}

/// How QueryCapability behaves.
#[derive(Debug, Clone, Args)]
pub struct QuerySettings {
    /// How long a caller-chosen request_id makes QueryCapability idempotent (1s to 7d).
    #[arg(id = "idempotency-window", long = "idempotency-window", env = IDEMPOTENCY_WINDOW, default_value = "1h",
          value_parser = duration(SECOND, 7 * DAY))]
    pub idempotency_window: Duration,
    /// The most caller-chosen request_ids this replica remembers; past it the least recently used go first
    /// (with Redis, every request_id is also remembered there for the whole window).
    #[arg(id = "idempotency-max-entries", long = "idempotency-max-entries", env = IDEMPOTENCY_MAX_ENTRIES, default_value = "100000",
          value_parser = clap::value_parser!(u64).range(1..=10_000_000))]
    pub idempotency_max_entries: u64,
    /// Time budget of a QueryCapability whose caller set no deadline, retries included (10ms to 10m).
    #[arg(id = "query-timeout", long = "query-timeout", env = QUERY_TIMEOUT, default_value = "10s", value_parser = duration(10 * MS, 10 * MINUTE))]
    pub timeout: Duration,
    /// QueryCapability calls in flight at once on this replica; beyond, RESOURCE_EXHAUSTED at once.
    #[arg(id = "max-inflight-queries", long = "max-inflight-queries", env = MAX_INFLIGHT_QUERIES, default_value = "2048",
          value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub max_inflight: u64,
}

/// How CheckCapability answers: the cache, waits, the recommendation's order.
#[derive(Debug, Clone, Args)]
pub struct CheckSettings {
    /// How long a cached result is trusted, per status: comma-separated `STATUS=duration` (0s to 30d); a status not
    /// named keeps its default. Results of statuses this version does not know are never cached.
    #[arg(id = "cache-ttl", long = "cache-ttl", env = CACHE_TTL,
          default_value = "CAPABILITY_FULL=24h,CAPABILITY_PARTIAL=24h,NO_CAPABILITY=6h,CAPABILITY_UNKNOWN=0s",
          value_parser = CacheTtlParser)]
    pub ttl: CacheTtl,
    /// The oldest cached result a CheckCapability accepts when it sets no max_age (0s to 30d).
    #[arg(id = "cache-max-age", long = "cache-max-age", env = CACHE_MAX_AGE, default_value = "24h", value_parser = duration(ZERO, 30 * DAY))]
    pub max_age: Duration,
    /// The most cached entries this replica holds without Redis (with Redis the cache lives there, with expiry).
    #[arg(id = "cache-max-entries", long = "cache-max-entries", env = CACHE_MAX_ENTRIES, default_value = "1000000",
          value_parser = clap::value_parser!(u64).range(1..=100_000_000))]
    pub max_entries: u64,
    /// How long a CheckCapability waits for live results when it sets no wait (0s to 10m).
    #[arg(id = "check-wait", long = "check-wait", env = CHECK_WAIT, default_value = "10s", value_parser = duration(ZERO, 10 * MINUTE))]
    pub wait: Duration,
    /// A contact_id check returns this long after its last result arrived (10ms to 10m).
    #[arg(id = "check-settle", long = "check-settle", env = CHECK_SETTLE, default_value = "1500ms", value_parser = duration(10 * MS, 10 * MINUTE))]
    pub settle: Duration,
    /// The order in which reachable channels are recommended: comma-separated channel names as Sinch spells them.
    /// Channels not listed come after, in the contract's enum order.
    #[arg(id = "channel-preference", long = "channel-preference", env = CHANNEL_PREFERENCE,
          default_value = "RCS,WHATSAPP,APPLEBC,VIBERBM,VIBER,MESSENGER,INSTAGRAM,TELEGRAM,LINE,WECHAT,KAKAOTALK,KAKAOTALKCHAT,MMS,SMS",
          value_parser = ChannelListParser)]
    pub channel_preference: ChannelOrder,
    /// How long a bulk check's job and results are kept after it started or ended (1m to 30d).
    #[arg(id = "bulk-retention", long = "bulk-retention", env = BULK_RETENTION, default_value = "24h", value_parser = duration(MINUTE, 30 * DAY))]
    pub bulk_retention: Duration,
    /// The key of the keyed hash that names cache entries and leases in Redis (no raw phone number is a key). When
    /// unset, a random key is generated once and kept in Redis for every replica.
    #[arg(id = "cache-hash-key", long = "cache-hash-key", env = CACHE_HASH_KEY, hide_env_values = true, value_parser = SecretParser)]
    pub hash_key: Option<SecretValue>,
}

/// How the gRPC server treats connections and callers.
#[derive(Debug, Clone, Args)]
pub struct GrpcSettings {
    /// Comma-separated bearer tokens; when set, CapabilityService calls must carry `authorization: Bearer <one
    /// of them>` (health and reflection stay open). Off by default: in a mesh, mTLS identifies callers.
    #[arg(id = "grpc-tokens", long = "grpc-tokens", env = GRPC_TOKENS, hide_env_values = true, value_parser = SecretListParser)]
    pub tokens: Option<SecretList>,
    /// HTTP/2 streams one connection may carry at once (a mesh sidecar multiplexes many callers on few).
    #[arg(id = "max-streams-per-connection", long = "max-streams-per-connection", env = MAX_STREAMS_PER_CONNECTION, default_value = "10000",
          value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub max_streams_per_connection: u32,
    /// Close gRPC connections older than this (GOAWAY, open streams may finish); 0 = never (at most 30d).
    #[arg(id = "max-connection-age", long = "max-connection-age", env = MAX_CONNECTION_AGE, default_value = "0s",
          value_parser = duration(ZERO, 30 * DAY))]
    pub max_connection_age: Duration,
}

/// What every listener (gRPC, webhook, admin) does with the connections it accepts.
#[derive(Debug, Clone, Args)]
pub struct ConnectionSettings {
    /// A new connection that has not sent its first 24 bytes (an HTTP/2 preface, a TLS hello, a request head)
    /// by then is closed (100ms to 10m).
    #[arg(id = "first-byte-timeout", long = "first-byte-timeout", env = FIRST_BYTE_TIMEOUT, default_value = "10s",
          value_parser = duration(100 * MS, 10 * MINUTE))]
    pub first_byte_timeout: Duration,
    /// A connection with no request or stream in flight for this long is closed (1s to 1d).
    #[arg(id = "idle-timeout", long = "idle-timeout", env = IDLE_TIMEOUT, default_value = "2m",
          value_parser = duration(SECOND, DAY))]
    pub idle_timeout: Duration,
    /// Connections open at once on the gRPC port; past it, new ones are closed at once and counted.
    #[arg(id = "grpc-max-connections", long = "grpc-max-connections", env = GRPC_MAX_CONNECTIONS, default_value = "1024",
          value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub grpc_max: u32,
    /// Connections open at once on the webhook port; past it, new ones are closed at once and counted.
    #[arg(id = "webhook-max-connections", long = "webhook-max-connections", env = WEBHOOK_MAX_CONNECTIONS,
          default_value = "1024", value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub webhook_max: u32,
    /// Connections open at once on the admin port; past it, new ones are closed at once and counted.
    #[arg(id = "admin-max-connections", long = "admin-max-connections", env = ADMIN_MAX_CONNECTIONS, default_value = "64",
          value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub admin_max: u32,
}

/// Optional TLS on the gRPC and webhook ports.
#[derive(Debug, Clone, Args)]
pub struct TlsSettings {
    /// A PEM certificate chain: when set (with CAPABILITY_TLS_KEY), the gRPC and webhook ports serve TLS only.
    /// Leave unset inside a mesh, whose sidecars encrypt.
    #[arg(id = "tls-cert", long = "tls-cert", env = TLS_CERT)]
    pub cert: Option<PathBuf>,
    /// The PEM private key of CAPABILITY_TLS_CERT.
    #[arg(id = "tls-key", long = "tls-key", env = TLS_KEY)]
    pub key: Option<PathBuf>,
    /// A PEM file of CA certificates: when set, gRPC callers must present a certificate issued by one (mutual TLS).
    #[arg(id = "tls-client-ca", long = "tls-client-ca", env = TLS_CLIENT_CA)]
    pub client_ca: Option<PathBuf>,
}

/// Log lines as text or JSON.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Logs and traces.
#[derive(Debug, Clone, Args)]
pub struct TelemetrySettings {
    /// Export traces over OTLP/gRPC to this collector (for example http://otel-collector:4317); off when unset.
    #[arg(id = "otlp-endpoint", long = "otlp-endpoint", env = OTLP_ENDPOINT, value_parser = HttpUrl::ANY)]
    pub otlp_endpoint: Option<url::Url>,
    /// For an https OTLP endpoint: a PEM file of the CA certificates its certificate is checked against, instead
    /// of the public CAs.
    #[arg(id = "otlp-certificate", long = "otlp-certificate", env = OTLP_CERTIFICATE)]
    pub otlp_certificate: Option<PathBuf>,
    /// Log format. Default: text on a terminal, json otherwise.
    #[arg(id = "log-format", long = "log-format", env = LOG_FORMAT, value_enum)]
    pub log_format: Option<LogFormat>,
}

/// The drain after SIGTERM.
#[derive(Debug, Clone, Args)]
pub struct ShutdownSettings {
    /// Hard bound on the drain after SIGTERM; checks waiting for live results end a second before it (at most 10m).
    #[arg(id = "shutdown-grace", long = "shutdown-grace", env = SHUTDOWN_GRACE, default_value = "20s", value_parser = duration(ZERO, 10 * MINUTE))]
    pub grace: Duration,
    /// After SIGTERM, how long the listeners keep accepting (answering UNAVAILABLE to new watches, serving
    /// queries, and callbacks with Redis — 503 without) before they stop; part of the shutdown grace (at most 5m).
    #[arg(id = "drain-delay", long = "drain-delay", env = DRAIN_DELAY, default_value = "1s", value_parser = duration(ZERO, 5 * MINUTE))]
    pub drain_delay: Duration,
}

/// How a sandbox 429 says when to retry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum RetryHint {
    /// A `Retry-After` header (seconds).
    Header,
    /// A `google.rpc.RetryInfo` in the error's `details`, no header.
    RetryInfo,
}

/// The sandbox's knobs: the in-process sandbox's (sandbox mode only) and `capability-facade sandbox`'s.
#[derive(Debug, Clone, PartialEq, Args)]
pub struct SandboxSettings {
    /// Sandbox: where it listens (the in-process one on loopback); port 0 picks a free port.
    #[arg(id = "sandbox-addr", long = "sandbox-addr", alias = "listen", env = SANDBOX_ADDR, default_value = "127.0.0.1:9000")]
    pub addr: SocketAddr,
    /// Sandbox: the delay between a query and its callbacks (at most 1h).
    #[arg(id = "sandbox-callback-delay", long = "sandbox-callback-delay", alias = "callback-delay", env = SANDBOX_CALLBACK_DELAY,
          default_value = "150ms", value_parser = duration(ZERO, HOUR))]
    pub callback_delay: Duration,
    /// Sandbox: send every callback twice, as Sinch's redelivery may.
    #[arg(id = "sandbox-duplicates", long = "sandbox-duplicates", env = SANDBOX_DUPLICATES, default_value = "false",
          action = clap::ArgAction::Set, value_parser = clap::builder::BoolishValueParser::new())]
    pub duplicates: bool,
    /// Sandbox: send a query's callbacks in reverse order.
    #[arg(id = "sandbox-reorder", long = "sandbox-reorder", env = SANDBOX_REORDER, default_value = "false",
          action = clap::ArgAction::Set, value_parser = clap::builder::BoolishValueParser::new())]
    pub reorder: bool,
    /// Sandbox: comma-separated app ids it knows; any other app id gets 404, as at Sinch. Unset: every app id is
    /// accepted (an app comes to exist when first used).
    #[arg(id = "sandbox-apps", long = "sandbox-apps", env = SANDBOX_APPS, value_delimiter = ',', value_parser = Text)]
    pub apps: Vec<String>,
    /// Sandbox: the apps' `rate_limits.webhooks`, the callbacks per second sent for one app (Sinch's default 25).
    #[arg(id = "sandbox-webhook-rate", long = "sandbox-webhook-rate", env = SANDBOX_WEBHOOK_RATE, default_value = "25",
          value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub webhook_rate: u32,
    /// Sandbox: the project's requests per second across its APIs (queries and the Webhooks and Apps APIs
    /// together; Sinch's 800), past which it answers 429 as a fault does; 0: no limit.
    #[arg(id = "sandbox-project-rate", long = "sandbox-project-rate", env = SANDBOX_PROJECT_RATE, default_value = "800",
          value_parser = clap::value_parser!(u32).range(0..=1_000_000))]
    pub project_rate: u32,
    /// Sandbox: no callback at all for a channel without capability (Sinch's docs promise a callback only "for
    /// every reachable channel").
    #[arg(id = "sandbox-silent-unreachable", long = "sandbox-silent-unreachable", env = SANDBOX_SILENT_UNREACHABLE,
          default_value = "false", action = clap::ArgAction::Set, value_parser = clap::builder::BoolishValueParser::new())]
    pub silent_unreachable: bool,
    /// Sandbox: the fraction of queries answered 429 (0 to 1).
    #[arg(id = "sandbox-error-429", long = "sandbox-error-429", env = SANDBOX_ERROR_429, default_value = "0", value_parser = fraction)]
    pub error_429: f64,
    /// Sandbox: the fraction of queries answered 500 (0 to 1).
    #[arg(id = "sandbox-error-500", long = "sandbox-error-500", env = SANDBOX_ERROR_500, default_value = "0", value_parser = fraction)]
    pub error_500: f64,
    /// Sandbox: the fraction of queries answered 501 (0 to 1).
    #[arg(id = "sandbox-error-501", long = "sandbox-error-501", env = SANDBOX_ERROR_501, default_value = "0", value_parser = fraction)]
    pub error_501: f64,
    /// Sandbox: the fraction of queries answered 503 (0 to 1).
    #[arg(id = "sandbox-error-503", long = "sandbox-error-503", env = SANDBOX_ERROR_503, default_value = "0", value_parser = fraction)]
    pub error_503: f64,
    /// Sandbox: how its 429s say when to retry.
    #[arg(id = "sandbox-retry-hint", long = "sandbox-retry-hint", env = SANDBOX_RETRY_HINT, value_enum, default_value = "header")]
    pub retry_hint: RetryHint,
    /// Sandbox: the wait its 429s ask for (at most 1h).
    #[arg(id = "sandbox-retry-after", long = "sandbox-retry-after", env = SANDBOX_RETRY_AFTER, default_value = "1s",
          value_parser = duration(ZERO, HOUR))]
    pub retry_after: Duration,
    /// Sandbox: added latency before every query answer (at most 1m).
    #[arg(id = "sandbox-latency", long = "sandbox-latency", env = SANDBOX_LATENCY, default_value = "0s",
          value_parser = duration(ZERO, MINUTE))]
    pub latency: Duration,
    /// Sandbox: when, after it starts, its token endpoint goes down (answering 503) for CAPABILITY_SANDBOX_TOKEN_OUTAGE_FOR.
    #[arg(id = "sandbox-token-outage-after", long = "sandbox-token-outage-after", env = SANDBOX_TOKEN_OUTAGE_AFTER,
          default_value = "0s", value_parser = duration(ZERO, 7 * DAY))]
    pub token_outage_after: Duration,
    /// Sandbox: how long the token endpoint stays down; 0 = never down.
    #[arg(id = "sandbox-token-outage-for", long = "sandbox-token-outage-for", env = SANDBOX_TOKEN_OUTAGE_FOR,
          default_value = "0s", value_parser = duration(ZERO, 7 * DAY))]
    pub token_outage_for: Duration,
}

/// A fraction: a number from 0 to 1.
fn fraction(text: &str) -> Result<f64, String> {
    match text.trim().parse::<f64>() {
        Ok(f) if (0.0..=1.0).contains(&f) => Ok(f),
        _ => Err(format!(
            "expected a fraction from 0 to 1 (for example 0.05), got {text:?}"
        )),
    }
}

impl SandboxSettings {
    /// The rules between knobs; shared by the service and `capability-facade sandbox`.
    pub fn check(&self) -> Result<(), ConfigError> {
        let errors = self.error_429 + self.error_500 + self.error_501 + self.error_503;
        if errors > 1.0 {
            return Err(invalid(
                SANDBOX_ERROR_503,
                format!(
                    "the error fractions add up to {errors}: {SANDBOX_ERROR_429}, {SANDBOX_ERROR_500}, \
                     {SANDBOX_ERROR_501} and {SANDBOX_ERROR_503} together must not exceed 1"
                ),
            ));
        }
        Ok(())
    }
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
pub const REDIS_SHARDS: &str = "CAPABILITY_REDIS_SHARDS";
pub const REDIS_CA_FILE: &str = "CAPABILITY_REDIS_CA_FILE";
pub const RETENTION: &str = "CAPABILITY_RETENTION";
pub const SHUTDOWN_GRACE: &str = "CAPABILITY_SHUTDOWN_GRACE";
pub const LOG_FORMAT: &str = "CAPABILITY_LOG_FORMAT";
pub const DRAIN_DELAY: &str = "CAPABILITY_DRAIN_DELAY";
pub const OTLP_ENDPOINT: &str = "OTEL_EXPORTER_OTLP_ENDPOINT";
pub const OTLP_CERTIFICATE: &str = "OTEL_EXPORTER_OTLP_CERTIFICATE";
pub const GRPC_TOKENS: &str = "CAPABILITY_GRPC_TOKENS";
pub const TLS_CERT: &str = "CAPABILITY_TLS_CERT";
pub const TLS_KEY: &str = "CAPABILITY_TLS_KEY";
pub const TLS_CLIENT_CA: &str = "CAPABILITY_TLS_CLIENT_CA";
pub const IDEMPOTENCY_WINDOW: &str = "CAPABILITY_IDEMPOTENCY_WINDOW";
pub const IDEMPOTENCY_MAX_ENTRIES: &str = "CAPABILITY_IDEMPOTENCY_MAX_ENTRIES";
pub const QUERY_TIMEOUT: &str = "CAPABILITY_QUERY_TIMEOUT";
pub const WEBHOOK_TOLERANCE: &str = "CAPABILITY_WEBHOOK_TOLERANCE";
pub const WEBHOOK_MAX_BODY: &str = "CAPABILITY_WEBHOOK_MAX_BODY";
pub const WEBHOOK_TIMEOUT: &str = "CAPABILITY_WEBHOOK_TIMEOUT";
pub const WEBHOOK_MAX_PENDING: &str = "CAPABILITY_WEBHOOK_MAX_PENDING";
pub const HEARTBEAT: &str = "CAPABILITY_HEARTBEAT";
pub const WATCH_WAIT: &str = "CAPABILITY_WATCH_WAIT";
pub const MAX_WATCHES: &str = "CAPABILITY_MAX_WATCHES";
pub const MAX_REQUESTS: &str = "CAPABILITY_MAX_REQUESTS";
pub const MAX_NOTIFICATIONS_PER_REQUEST: &str = "CAPABILITY_MAX_NOTIFICATIONS_PER_REQUEST";
pub const MAX_INFLIGHT_QUERIES: &str = "CAPABILITY_MAX_INFLIGHT_QUERIES";
pub const MAX_STREAMS_PER_CONNECTION: &str = "CAPABILITY_MAX_STREAMS_PER_CONNECTION";
pub const MAX_CONNECTION_AGE: &str = "CAPABILITY_MAX_CONNECTION_AGE";
pub const MAX_WATCHES_PER_CONNECTION: &str = "CAPABILITY_MAX_WATCHES_PER_CONNECTION";
pub const MAX_WATCHES_PER_CALLER: &str = "CAPABILITY_MAX_WATCHES_PER_CALLER";
pub const FIRST_BYTE_TIMEOUT: &str = "CAPABILITY_FIRST_BYTE_TIMEOUT";
pub const IDLE_TIMEOUT: &str = "CAPABILITY_IDLE_TIMEOUT";
pub const GRPC_MAX_CONNECTIONS: &str = "CAPABILITY_GRPC_MAX_CONNECTIONS";
pub const WEBHOOK_MAX_CONNECTIONS: &str = "CAPABILITY_WEBHOOK_MAX_CONNECTIONS";
pub const ADMIN_MAX_CONNECTIONS: &str = "CAPABILITY_ADMIN_MAX_CONNECTIONS";
pub const SANDBOX_CALLBACK_DELAY: &str = "CAPABILITY_SANDBOX_CALLBACK_DELAY";
pub const SANDBOX_DUPLICATES: &str = "CAPABILITY_SANDBOX_DUPLICATES";
pub const SANDBOX_REORDER: &str = "CAPABILITY_SANDBOX_REORDER";
pub const SANDBOX_ADDR: &str = "CAPABILITY_SANDBOX_ADDR";
pub const SANDBOX_APPS: &str = "CAPABILITY_SANDBOX_APPS";
pub const SANDBOX_WEBHOOK_RATE: &str = "CAPABILITY_SANDBOX_WEBHOOK_RATE";
pub const SANDBOX_PROJECT_RATE: &str = "CAPABILITY_SANDBOX_PROJECT_RATE";
pub const SANDBOX_SILENT_UNREACHABLE: &str = "CAPABILITY_SANDBOX_SILENT_UNREACHABLE";
pub const SANDBOX_ERROR_429: &str = "CAPABILITY_SANDBOX_ERROR_429";
pub const SANDBOX_ERROR_500: &str = "CAPABILITY_SANDBOX_ERROR_500";
pub const SANDBOX_ERROR_501: &str = "CAPABILITY_SANDBOX_ERROR_501";
pub const SANDBOX_ERROR_503: &str = "CAPABILITY_SANDBOX_ERROR_503";
pub const SANDBOX_RETRY_HINT: &str = "CAPABILITY_SANDBOX_RETRY_HINT";
pub const SANDBOX_RETRY_AFTER: &str = "CAPABILITY_SANDBOX_RETRY_AFTER";
pub const SANDBOX_LATENCY: &str = "CAPABILITY_SANDBOX_LATENCY";
pub const SANDBOX_TOKEN_OUTAGE_AFTER: &str = "CAPABILITY_SANDBOX_TOKEN_OUTAGE_AFTER";
pub const SANDBOX_TOKEN_OUTAGE_FOR: &str = "CAPABILITY_SANDBOX_TOKEN_OUTAGE_FOR";
pub const PUBLIC_WEBHOOK_URL: &str = "CAPABILITY_PUBLIC_WEBHOOK_URL";
pub const APP_IDS: &str = "CAPABILITY_APP_IDS";
pub const CACHE_TTL: &str = "CAPABILITY_CACHE_TTL";
pub const CACHE_MAX_AGE: &str = "CAPABILITY_CACHE_MAX_AGE";
pub const CACHE_MAX_ENTRIES: &str = "CAPABILITY_CACHE_MAX_ENTRIES";
pub const CHECK_WAIT: &str = "CAPABILITY_CHECK_WAIT";
pub const CHECK_SETTLE: &str = "CAPABILITY_CHECK_SETTLE";
pub const CHANNEL_PREFERENCE: &str = "CAPABILITY_CHANNEL_PREFERENCE";
pub const CACHE_HASH_KEY: &str = "CAPABILITY_CACHE_HASH_KEY";
/// The fewest bytes `CAPABILITY_CACHE_HASH_KEY` may hold (HMAC-SHA-256's own size).
pub const MIN_CACHE_HASH_KEY: usize = 32;
pub const CALLBACK_RATE: &str = "SINCH_CALLBACK_RATE";
pub const BULK_RETENTION: &str = "CAPABILITY_BULK_RETENTION";

const DEFAULT_AUTH_URL: &str = "https://auth.sinch.com/oauth2/token";

/// A configuration value that cannot be used, named by its variable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{variable}: {problem}")]
pub struct ConfigError {
    pub variable: &'static str,
    pub problem: String,
}

/// A [`ConfigError`].
pub fn invalid(variable: &'static str, problem: impl Into<String>) -> ConfigError {
    ConfigError {
        variable,
        problem: problem.into(),
    }
}

/// Where queries are sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Upstream {
    /// The built-in sandbox, started in-process (no credentials were configured).
    Sandbox,
    /// A Sinch deployment (or anything that speaks its API at the configured URLs).
    Sinch(SinchConfig),
}

/// How to reach and authenticate to Sinch, resolved from [`SinchSettings`].
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
    pub rate_limit: NonZeroU32,
}

impl Config {
    /// The rules that span settings; the first one broken is the error.
    pub fn check(&self) -> Result<(), ConfigError> {
        let upstream = self.upstream()?;
        let mut listeners = vec![
            (GRPC_ADDR, self.listen.grpc),
            (WEBHOOK_ADDR, self.listen.webhook),
            (ADMIN_ADDR, self.listen.admin),
        ];
        if upstream == Upstream::Sandbox {
            listeners.push((SANDBOX_ADDR, self.sandbox.addr));
        }
        for (at, &(variable, addr)) in listeners.iter().enumerate() {
            if let Some((other, _)) = listeners[..at].iter().find(|(_, earlier)| clash(addr, *earlier)) {
                return Err(invalid(
                    variable,
                    format!("{addr} clashes with {other}: each listener needs a port of its own"),
                ));
            }
        }
        if self.webhook.secrets.secrets.is_empty() && !self.webhook.insecure && upstream != Upstream::Sandbox {
            return Err(invalid(
                WEBHOOK_SECRETS,
                format!(
                    "no webhook secret is set, so callbacks could not be verified; set the secret registered with \
                     Sinch, or {INSECURE_WEBHOOKS}=true to accept unsigned callbacks (never in production)"
                ),
            ));
        }
        // Set to nothing, as a secret whose mount failed is: each would turn something off without a word.
        for (variable, empty, what) in [
            (
                GRPC_TOKENS,
                self.grpc.tokens.as_ref().is_some_and(|t| t.secrets.is_empty()),
                "calls would be taken without a token",
            ),
            (
                REDIS_URL,
                self.redis.url.as_ref().is_some_and(|u| u.secret.is_empty()),
                "the replicas would not share their log",
            ),
        ] {
            if empty {
                return Err(invalid(
                    variable,
                    format!("set but empty: {what} (unset it if that is meant)"),
                ));
            }
        }
        if let Some(key) = &self.check.hash_key
            && key.secret.expose().len() < MIN_CACHE_HASH_KEY
        {
            return Err(invalid(
                CACHE_HASH_KEY,
                format!(
                    "{} bytes: set {MIN_CACHE_HASH_KEY} or more random bytes (cache entries' names in Redis are keyed \
                     hashes of phone numbers: a short key lets whoever reads Redis find the numbers), or unset it",
                    key.secret.expose().len()
                ),
            ));
        }
        let prefix = &self.redis.prefix;
        if prefix.is_empty()
            || !prefix
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | ':'))
        {
            return Err(invalid(
                REDIS_PREFIX,
                format!(
                    "expected letters, digits, '_', '-', '.' or ':' (no braces: the prefix goes into hash tags), got {prefix:?}"
                ),
            ));
        }
        self.sandbox.check()?;
        let max = self.watch.max_watches;
        for (variable, limit) in [
            (MAX_WATCHES_PER_CONNECTION, self.watch.max_per_connection),
            (MAX_WATCHES_PER_CALLER, self.watch.max_per_caller),
        ] {
            if limit.is_some_and(|limit| limit >= max) {
                return Err(invalid(
                    variable,
                    format!("must be below {MAX_WATCHES} ({max}), so that no one takes every watch"),
                ));
            }
        }
        // As long as the grace, the listeners would take new work until the hard stop, and cut all of it there.
        let (delay, grace) = (self.shutdown.drain_delay, self.shutdown.grace);
        if delay > grace || (delay == grace && !grace.is_zero()) {
            return Err(invalid(
                DRAIN_DELAY,
                format!(
                    "must be shorter than {SHUTDOWN_GRACE} (the drain is part of it, and what is in flight ends in the rest)"
                ),
            ));
        }
        // The CA vouches for Redis's certificate: every node the URL names is reached over TLS.
        let tls = |url: &Secret| {
            url.expose()
                .split(',')
                .map(str::trim)
                .filter(|node| !node.is_empty())
                .all(|node| node.starts_with("rediss://") || node.starts_with("rediss+cluster://"))
        };
        if self.redis.ca_file.is_some() && !self.redis_url().is_some_and(tls) {
            return Err(invalid(
                REDIS_CA_FILE,
                format!("vouches for Redis over TLS: set {REDIS_URL} to rediss:// node URLs"),
            ));
        }
        let https = |url: &url::Url| url.scheme() == "https";
        if self.telemetry.otlp_certificate.is_some() && !self.telemetry.otlp_endpoint.as_ref().is_some_and(https) {
            return Err(invalid(
                OTLP_CERTIFICATE,
                format!("checks an https collector's certificate: set an https {OTLP_ENDPOINT}"),
            ));
        }
        match (&self.tls.cert, &self.tls.key, &self.tls.client_ca) {
            (None, None, Some(_)) => Err(invalid(
                TLS_CLIENT_CA,
                format!("mutual TLS needs TLS: set {TLS_CERT} and {TLS_KEY} too"),
            )),
            (Some(_), None, _) => Err(invalid(TLS_KEY, format!("required when {TLS_CERT} is set"))),
            (None, Some(_), _) => Err(invalid(TLS_CERT, format!("required when {TLS_KEY} is set"))),
            _ => Ok(()),
        }
    }

    /// Where queries go: the sandbox when no credential is set, else Sinch with complete credentials (part of
    /// them is a mistake, such as a secret mount that failed, not a wish for the sandbox).
    pub fn upstream(&self) -> Result<Upstream, ConfigError> {
        let s = &self.sinch;
        let Some(key_id) = s.key_id.clone().filter(|k| !k.is_empty()) else {
            let project_id = s.project_id.as_ref().filter(|p| !p.is_empty()).map(|_| PROJECT_ID);
            let key_secret = s
                .key_secret
                .as_ref()
                .filter(|v| !v.secret.is_empty())
                .map(|_| KEY_SECRET);
            return match project_id.or(key_secret) {
                Some(set) => Err(invalid(KEY_ID, format!("required when {set} is set"))),
                None => Ok(Upstream::Sandbox),
            };
        };
        let project_id = s
            .project_id
            .clone()
            .filter(|p| !p.is_empty())
            .ok_or_else(|| invalid(PROJECT_ID, format!("required when {KEY_ID} is set")))?;
        let key_secret = s
            .key_secret
            .as_ref()
            .map(|v| v.secret.clone())
            .filter(|s| !s.is_empty())
            .ok_or_else(|| invalid(KEY_SECRET, format!("required when {KEY_ID} is set")))?;
        let region = match s.region {
            Region::Us => "us",
            Region::Eu => "eu",
            Region::Br => "br",
        };
        let trimmed = |url: &url::Url| url.as_str().trim_end_matches('/').to_owned();
        Ok(Upstream::Sinch(SinchConfig {
            project_id,
            key_id,
            key_secret,
            auth: s.auth,
            api_url: s
                .api_url
                .as_ref()
                .map(trimmed)
                .unwrap_or_else(|| format!("https://{region}.conversation.api.sinch.com")),
            auth_url: s
                .auth_url
                .as_ref()
                .map(trimmed)
                .unwrap_or_else(|| DEFAULT_AUTH_URL.to_owned()),
            rate_limit: NonZeroU32::new(s.rate_limit).expect("the parser refuses 0"),
        }))
    }

    /// The variables whose secret had a trailing line break trimmed, to be said once in the log.
    pub fn trimmed_secrets(&self) -> Vec<&'static str> {
        [
            (KEY_SECRET, self.sinch.key_secret.as_ref().is_some_and(|v| v.trimmed)),
            (WEBHOOK_SECRETS, self.webhook.secrets.trimmed),
            (REDIS_URL, self.redis.url.as_ref().is_some_and(|v| v.trimmed)),
            (GRPC_TOKENS, self.grpc.tokens.as_ref().is_some_and(|v| v.trimmed)),
            (CACHE_HASH_KEY, self.check.hash_key.as_ref().is_some_and(|v| v.trimmed)),
        ]
        .into_iter()
        .filter_map(|(variable, trimmed)| trimmed.then_some(variable))
        .collect()
    }

    /// The Redis URL, when one is set.
    pub fn redis_url(&self) -> Option<&Secret> {
        self.redis.url.as_ref().map(|v| &v.secret)
    }

    /// The CA certificates `CAPABILITY_REDIS_CA_FILE` holds (PEM), read and checked (at start, before any port
    /// is bound); [`Config::check`] saw that they go with a Redis reached over TLS.
    pub fn redis_ca(&self) -> Result<Option<Vec<u8>>, ConfigError> {
        let Some(path) = &self.redis.ca_file else {
            return Ok(None);
        };
        let pem =
            std::fs::read(path).map_err(|e| invalid(REDIS_CA_FILE, format!("cannot read {}: {e}", path.display())))?;
        crate::tls::trust_anchors(&pem).map_err(|e| invalid(REDIS_CA_FILE, e))?;
        Ok(Some(pem))
    }

    /// The bearer tokens calls must carry one of; none when unset.
    pub fn grpc_tokens(&self) -> Vec<Secret> {
        self.grpc.tokens.as_ref().map(|t| t.secrets.clone()).unwrap_or_default()
    }

    /// The log format: the configured one, else text on a terminal and JSON otherwise.
    pub fn log_format(&self) -> LogFormat {
        self.telemetry.log_format.unwrap_or_else(|| {
            if std::io::IsTerminal::is_terminal(&std::io::stderr()) {
                LogFormat::Text
            } else {
                LogFormat::Json
            }
        })
    }
}

/// The environment variable of the argument a clap error is about, looked up in `command`'s definitions (the
/// one table from setting to variable is the `env` of each argument).
pub fn variable_of(command: &clap::Command, error: &clap::Error) -> Option<(&'static str, bool)> {
    let arg = invalid_arg(command, error)?;
    let env = arg.get_env()?.to_str()?;
    let variable = ALL_VARIABLES.iter().find(|v| **v == env)?;
    Some((variable, arg.is_hide_env_values_set()))
}

/// The argument whose value `error` refused, in `command` or a subcommand.
fn invalid_arg(command: &clap::Command, error: &clap::Error) -> Option<clap::Arg> {
    let clap::error::ContextValue::String(invalid) = error.get(clap::error::ContextKind::InvalidArg)? else {
        return None;
    };
    fn find<'c>(command: &'c clap::Command, invalid: &str) -> Option<&'c clap::Arg> {
        command
            .get_arguments()
            .find(|a| a.to_string() == invalid)
            .or_else(|| command.get_subcommands().find_map(|sub| find(sub, invalid)))
    }
    // Arguments print as the error printed them only once the command is built.
    let mut command = command.clone();
    command.build();
    find(&command, invalid).cloned()
}

/// What was wrong with a secret argument outside the serving configuration (a client's token, a webhook's
/// secret), without its value: clap's own message shows the value refused.
pub fn describe_secret(command: &clap::Command, error: &clap::Error) -> Option<String> {
    let arg = invalid_arg(command, error)?;
    arg.is_hide_env_values_set().then(|| {
        let source = std::error::Error::source(error)
            .map(|e| format!(": {e}"))
            .unwrap_or_default();
        format!("invalid value for '{arg}'{source}")
    })
}

/// Every variable of the serving configuration.
pub const ALL_VARIABLES: &[&str] = &[
    GRPC_ADDR,
    WEBHOOK_ADDR,
    ADMIN_ADDR,
    PROJECT_ID,
    KEY_ID,
    KEY_SECRET,
    REGION,
    AUTH,
    API_URL,
    AUTH_URL,
    WEBHOOK_SECRETS,
    INSECURE_WEBHOOKS,
    RATE_LIMIT,
    REDIS_URL,
    REDIS_PREFIX,
    REDIS_SHARDS,
    REDIS_CA_FILE,
    RETENTION,
    SHUTDOWN_GRACE,
    LOG_FORMAT,
    DRAIN_DELAY,
    OTLP_ENDPOINT,
    OTLP_CERTIFICATE,
    GRPC_TOKENS,
    TLS_CERT,
    TLS_KEY,
    TLS_CLIENT_CA,
    IDEMPOTENCY_WINDOW,
    IDEMPOTENCY_MAX_ENTRIES,
    QUERY_TIMEOUT,
    WEBHOOK_TOLERANCE,
    WEBHOOK_MAX_BODY,
    WEBHOOK_TIMEOUT,
    WEBHOOK_MAX_PENDING,
    HEARTBEAT,
    WATCH_WAIT,
    MAX_WATCHES,
    MAX_REQUESTS,
    MAX_NOTIFICATIONS_PER_REQUEST,
    MAX_INFLIGHT_QUERIES,
    MAX_STREAMS_PER_CONNECTION,
    MAX_CONNECTION_AGE,
    MAX_WATCHES_PER_CONNECTION,
    MAX_WATCHES_PER_CALLER,
    FIRST_BYTE_TIMEOUT,
    IDLE_TIMEOUT,
    GRPC_MAX_CONNECTIONS,
    WEBHOOK_MAX_CONNECTIONS,
    ADMIN_MAX_CONNECTIONS,
    SANDBOX_CALLBACK_DELAY,
    SANDBOX_DUPLICATES,
    SANDBOX_REORDER,
    SANDBOX_ADDR,
    SANDBOX_APPS,
    SANDBOX_WEBHOOK_RATE,
    SANDBOX_PROJECT_RATE,
    SANDBOX_SILENT_UNREACHABLE,
    SANDBOX_ERROR_429,
    SANDBOX_ERROR_500,
    SANDBOX_ERROR_501,
    SANDBOX_ERROR_503,
    SANDBOX_RETRY_HINT,
    SANDBOX_RETRY_AFTER,
    SANDBOX_LATENCY,
    SANDBOX_TOKEN_OUTAGE_AFTER,
    SANDBOX_TOKEN_OUTAGE_FOR,
    PUBLIC_WEBHOOK_URL,
    APP_IDS,
    CACHE_TTL,
    CACHE_MAX_AGE,
    CACHE_MAX_ENTRIES,
    CHECK_WAIT,
    CHECK_SETTLE,
    CHANNEL_PREFERENCE,
    CACHE_HASH_KEY,
    CALLBACK_RATE,
    BULK_RETENTION,
];

/// A clap error about the serving configuration as one line naming the variable, never a secret's value.
pub fn describe(command: &clap::Command, error: &clap::Error) -> Option<ConfigError> {
    let (variable, secret) = variable_of(command, error)?;
    let problem = match (error.get(clap::error::ContextKind::InvalidValue), secret) {
        (_, true) => std::error::Error::source(error)
            .map(ToString::to_string)
            .unwrap_or_else(|| first_line(error)),
        (Some(clap::error::ContextValue::String(value)), false) => {
            let valid = match error.get(clap::error::ContextKind::ValidValue) {
                Some(clap::error::ContextValue::Strings(valid)) => format!(" (expected one of {})", valid.join(", ")),
                _ => String::new(),
            };
            match std::error::Error::source(error) {
                Some(source) => format!("{value:?}: {source}"),
                None => format!("{value:?} is not a valid value{valid}"),
            }
        }
        _ => first_line(error),
    };
    Some(invalid(variable, problem))
}

/// The first line of clap's rendering of `error`, without its `error: ` prefix.
fn first_line(error: &clap::Error) -> String {
    let rendered = error.to_string();
    let line = rendered.lines().next().unwrap_or_default();
    line.strip_prefix("error: ").unwrap_or(line).to_owned()
}

#[cfg(test)]
mod tests {
    use clap::{CommandFactory, Parser};

    use super::*;
    use crate::capability::CapabilityStatus;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        config: Config,
    }

    fn parse(flags: &[&str]) -> Result<Config, ConfigError> {
        let args = std::iter::once("test").chain(flags.iter().copied());
        let config = Cli::try_parse_from(args)
            .map_err(|e| describe(&Cli::command(), &e).unwrap_or_else(|| panic!("no variable in {e}")))?
            .config;
        config.check()?;
        Ok(config)
    }

    const CREDS: [&str; 4] = [
        "--sinch-key-id=k",
        "--sinch-key-secret=s",
        "--sinch-project-id=p",
        "--sinch-webhook-secrets=w",
    ];

    fn with_creds(flag: &str) -> Result<Config, ConfigError> {
        let mut flags = CREDS.to_vec();
        flags.push(flag);
        parse(&flags)
    }

    #[test]
    fn no_credentials_means_sandbox() {
        assert_eq!(parse(&[]).unwrap().upstream().unwrap(), Upstream::Sandbox);
    }

    #[test]
    fn credentials_build_the_regional_urls() {
        let c = with_creds("--sinch-region=eu").unwrap();
        let Upstream::Sinch(s) = c.upstream().unwrap() else {
            panic!("not sinch")
        };
        assert_eq!(s.api_url, "https://eu.conversation.api.sinch.com");
        assert_eq!(s.auth_url, DEFAULT_AUTH_URL);
        assert_eq!(s.auth, AuthMode::OAuth2);
        let c = with_creds("--sinch-api-url=http://127.0.0.1:9/").unwrap();
        let Upstream::Sinch(s) = c.upstream().unwrap() else {
            panic!("not sinch")
        };
        assert_eq!(s.api_url, "http://127.0.0.1:9");
    }

    #[test]
    fn each_bad_value_names_its_variable() {
        let cases: &[(&str, &str)] = &[
            ("--grpc-addr=nowhere", GRPC_ADDR),
            ("--admin-addr=localhost", ADMIN_ADDR),
            ("--sinch-region=mars", REGION),
            ("--sinch-auth=magic", AUTH),
            ("--sinch-api-url=ftp://x", API_URL),
            ("--sinch-api-url=https://h.example/#x", API_URL),
            ("--sinch-api-url=https://h.example/?a=b", API_URL),
            ("--sinch-project-id=a/b", PROJECT_ID),
            ("--sinch-project-id=a?b", PROJECT_ID),
            ("--sinch-rate-limit=0", RATE_LIMIT),
            ("--sinch-rate-limit=-3", RATE_LIMIT),
            ("--retention=forever", RETENTION),
            ("--retention=10000000000h", RETENTION),
            ("--retention=0s", RETENTION),
            ("--shutdown-grace=-1s", SHUTDOWN_GRACE),
            ("--heartbeat=-5s", HEARTBEAT),
            ("--heartbeat=0s", HEARTBEAT),
            ("--log-format=xml", LOG_FORMAT),
            ("--insecure-webhooks=perhaps", INSECURE_WEBHOOKS),
            ("--max-watches=none", MAX_WATCHES),
            ("--webhook-max-body=0", WEBHOOK_MAX_BODY),
            ("--webhook-max-pending=0", WEBHOOK_MAX_PENDING),
            ("--sandbox-reorder=sometimes", SANDBOX_REORDER),
            ("--redis-shards=0", REDIS_SHARDS),
            ("--redis-prefix={x}", REDIS_PREFIX),
            ("--drain-delay=1m", DRAIN_DELAY),
            ("--drain-delay=20s", DRAIN_DELAY),
            ("--max-connection-age=100000d", MAX_CONNECTION_AGE),
            ("--sandbox-error-429=1.5", SANDBOX_ERROR_429),
            ("--sandbox-retry-hint=maybe", SANDBOX_RETRY_HINT),
            ("--sandbox-webhook-rate=0", SANDBOX_WEBHOOK_RATE),
            ("--sandbox-addr=nowhere", SANDBOX_ADDR),
            ("--public-webhook-url=ftp://x", PUBLIC_WEBHOOK_URL),
            ("--max-watches-per-connection=0", MAX_WATCHES_PER_CONNECTION),
            ("--max-watches-per-caller=many", MAX_WATCHES_PER_CALLER),
            ("--first-byte-timeout=0s", FIRST_BYTE_TIMEOUT),
            ("--idle-timeout=forever", IDLE_TIMEOUT),
            ("--grpc-max-connections=0", GRPC_MAX_CONNECTIONS),
            ("--webhook-max-connections=-1", WEBHOOK_MAX_CONNECTIONS),
            ("--admin-max-connections=lots", ADMIN_MAX_CONNECTIONS),
            ("--cache-ttl=CAPABILITY_GREAT=1h", CACHE_TTL),
            ("--cache-ttl=CAPABILITY_FULL", CACHE_TTL),
            ("--cache-ttl=CAPABILITY_FULL=31d", CACHE_TTL),
            ("--cache-max-age=-1s", CACHE_MAX_AGE),
            ("--cache-max-entries=0", CACHE_MAX_ENTRIES),
            ("--check-wait=1h", CHECK_WAIT),
            ("--check-settle=0s", CHECK_SETTLE),
            ("--channel-preference=RCS,PIGEON", CHANNEL_PREFERENCE),
            ("--channel-preference=RCS,RCS", CHANNEL_PREFERENCE),
            ("--cache-hash-key=k\u{1}", CACHE_HASH_KEY),
            ("--sinch-callback-rate=0", CALLBACK_RATE),
            ("--bulk-retention=1s", BULK_RETENTION),
        ];
        for (flag, variable) in cases {
            assert_eq!(with_creds(flag).unwrap_err().variable, *variable, "{flag}");
        }
    }

    #[test]
    fn a_partial_cache_ttl_overrides_only_the_statuses_it_names() {
        let defaults = parse(&[]).unwrap().check;
        assert_eq!(defaults.ttl, CacheTtl::default());
        assert_eq!(
            defaults.ttl.of(&CapabilityStatus::Unknown),
            None,
            "UNKNOWN is not cached by default"
        );
        let ttl = parse(&["--cache-ttl=NO_CAPABILITY=1h, CAPABILITY_UNKNOWN=5m"])
            .unwrap()
            .check
            .ttl;
        assert_eq!(ttl.of(&CapabilityStatus::NoCapability), Some(Duration::from_secs(3600)));
        assert_eq!(ttl.of(&CapabilityStatus::Unknown), Some(Duration::from_secs(300)));
        assert_eq!(ttl.of(&CapabilityStatus::Full), Some(Duration::from_secs(86_400)));
        assert_eq!(
            ttl.of(&CapabilityStatus::Other("NEW".into())),
            None,
            "an unknown status is never cached"
        );
        assert_eq!(
            defaults.channel_preference.0.last(),
            Some(&crate::capability::Channel::Sms),
            "SMS last"
        );
    }

    #[test]
    fn sandbox_error_fractions_must_not_add_up_past_one() {
        let error = parse(&["--sandbox-error-429=0.6", "--sandbox-error-503=0.6"]).unwrap_err();
        assert_eq!(error.variable, SANDBOX_ERROR_503);
        assert!(parse(&["--sandbox-error-429=0.5", "--sandbox-error-503=0.5"]).is_ok());
    }

    #[test]
    fn a_secret_with_a_control_character_is_refused_without_showing_it() {
        let error = with_creds("--sinch-key-secret=TOP\u{7}SECRET").unwrap_err();
        assert_eq!(error.variable, KEY_SECRET);
        assert!(!error.to_string().contains("TOP"), "{error}");
        let error = parse(&["--grpc-tokens=a,b\u{1}c"]).unwrap_err();
        assert_eq!(error.variable, GRPC_TOKENS);
        let trimmed = parse(&[&CREDS[..3], &["--sinch-webhook-secrets=w\n"]].concat()).unwrap();
        assert_eq!(trimmed.webhook.secrets.secrets, [Secret::new("w")]);
        assert_eq!(trimmed.trimmed_secrets(), [WEBHOOK_SECRETS]);
    }

    #[test]
    fn watch_limits_stay_below_the_replica_s() {
        let limits = |flags: &[&str]| parse(flags).map(|c| (c.watch.per_connection(), c.watch.per_caller()));
        assert_eq!(limits(&["--max-watches=1000"]), Ok((500, 500)));
        assert_eq!(
            limits(&[
                "--max-watches=1000",
                "--max-watches-per-connection=10",
                "--max-watches-per-caller=999"
            ]),
            Ok((10, 999))
        );
        for (flag, variable) in [
            ("--max-watches-per-connection=1000", MAX_WATCHES_PER_CONNECTION),
            ("--max-watches-per-caller=5000", MAX_WATCHES_PER_CALLER),
        ] {
            assert_eq!(parse(&["--max-watches=1000", flag]).unwrap_err().variable, variable);
        }
    }

    #[test]
    fn two_listeners_on_one_port_are_refused_before_any_is_bound() {
        for (flags, variable) in [
            (&["--webhook-addr=0.0.0.0:50051"][..], WEBHOOK_ADDR),
            (&["--admin-addr=127.0.0.1:8080"], ADMIN_ADDR),
            (
                &["--admin-addr=127.0.0.1:7000", "--webhook-addr=127.0.0.1:7000"],
                ADMIN_ADDR,
            ),
            (&["--sandbox-addr=127.0.0.1:9090"], SANDBOX_ADDR),
        ] {
            assert_eq!(parse(flags).unwrap_err().variable, variable, "{flags:?}");
        }
        let free = [
            "--grpc-addr=127.0.0.1:0",
            "--webhook-addr=127.0.0.1:0",
            "--admin-addr=127.0.0.1:0",
        ];
        assert!(parse(&free).is_ok(), "port 0 picks a free port for each");
        assert!(parse(&["--webhook-addr=127.0.0.1:50051", "--grpc-addr=127.0.0.2:50051"]).is_ok());
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
        // Part of the credentials without a key id is a failed secret mount, not a wish for the sandbox.
        for partial in [
            &["--sinch-project-id=p", "--sinch-key-secret=s"][..],
            &["--sinch-project-id=p", "--sinch-key-id=", "--sinch-key-secret=s"],
            &["--sinch-key-secret=s"],
            &["--sinch-project-id=p"],
        ] {
            assert_eq!(parse(partial).unwrap_err().variable, KEY_ID, "{partial:?}");
        }
    }

    #[test]
    fn real_sinch_needs_a_webhook_secret_or_an_explicit_opt_out() {
        let creds = &CREDS[..3];
        assert_eq!(parse(creds).unwrap_err().variable, WEBHOOK_SECRETS);
        let mut insecure = creds.to_vec();
        insecure.push("--insecure-webhooks=true");
        assert!(parse(&insecure).unwrap().webhook.secrets.secrets.is_empty());
    }

    #[test]
    fn tls_files_come_in_pairs() {
        assert_eq!(parse(&["--tls-cert=c.pem"]).unwrap_err().variable, TLS_KEY);
        assert_eq!(parse(&["--tls-key=k.pem"]).unwrap_err().variable, TLS_CERT);
        assert_eq!(parse(&["--tls-client-ca=ca.pem"]).unwrap_err().variable, TLS_CLIENT_CA);
    }

    #[test]
    fn a_redis_ca_file_goes_with_rediss_urls_and_holds_a_certificate() {
        for flags in [
            &["--redis-ca-file=Cargo.toml"][..],
            &["--redis-url=redis://h:6379", "--redis-ca-file=Cargo.toml"],
            &[
                "--redis-url=rediss://a:6379,redis://b:6379",
                "--redis-ca-file=Cargo.toml",
            ],
        ] {
            let error = parse(flags).unwrap_err();
            assert_eq!(error.variable, REDIS_CA_FILE, "{flags:?}");
            assert!(error.problem.contains("rediss://"), "{flags:?}: {}", error.problem);
        }
        let ca = |file: &str| {
            let flags = ["--redis-url=rediss://h:6380", file];
            parse(&flags).expect("a TLS Redis").redis_ca().unwrap_err()
        };
        let error = ca("--redis-ca-file=Cargo.toml");
        assert_eq!(error.variable, REDIS_CA_FILE);
        assert!(error.problem.contains("CERTIFICATE"), "{}", error.problem);
        let error = ca("--redis-ca-file=/nonexistent/ca.pem");
        assert_eq!(error.variable, REDIS_CA_FILE);
        assert!(error.problem.contains("cannot read"), "{}", error.problem);
    }

    #[test]
    fn an_otlp_certificate_goes_with_an_https_endpoint() {
        let certificate = "--otlp-certificate=ca.pem";
        for endpoint in [None, Some("--otlp-endpoint=http://collector:4317")] {
            let flags: Vec<&str> = endpoint.into_iter().chain([certificate]).collect();
            assert_eq!(parse(&flags).unwrap_err().variable, OTLP_CERTIFICATE, "{flags:?}");
        }
        assert!(parse(&["--otlp-endpoint=https://collector:4317", certificate]).is_ok());
    }

    #[test]
    fn webhook_secrets_split_on_commas() {
        let c = parse(&["--sinch-webhook-secrets=a, b,,c"]).unwrap();
        let secrets: Vec<&str> = c.webhook.secrets.secrets.iter().map(Secret::expose).collect();
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
            "--grpc-tokens=TOPSECRET4",
        ])
        .unwrap();
        let shown = format!("{c:?}");
        assert!(!shown.contains("TOPSECRET"), "{shown}");
    }

    #[test]
    fn every_variable_is_in_the_table() {
        let command = Cli::command();
        for arg in command.get_arguments() {
            if let Some(env) = arg.get_env() {
                assert!(ALL_VARIABLES.contains(&env.to_str().unwrap()), "{env:?}");
            }
        }
    }
}
