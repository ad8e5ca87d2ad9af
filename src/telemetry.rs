//! Logging (text on a terminal, JSON lines otherwise; `RUST_LOG` filters, default `info`), OTLP trace export
//! (when `OTEL_EXPORTER_OTLP_ENDPOINT` is set), W3C trace context, and the Prometheus recorder behind every
//! `capability_*` metric.

use std::sync::OnceLock;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState, TracerProvider};
use opentelemetry_sdk::trace::SdkTracerProvider;
use std::fmt::Write;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use tracing::{
    field::{Field, Visit},
    span,
};
use tracing_subscriber::{
    EnvFilter, Layer,
    field::RecordFields,
    fmt::{self, FormatFields, FormattedFields, format::Writer},
    layer::SubscriberExt,
    util::SubscriberInitExt,
};

use crate::config::{ConfigError, LogFormat, OTLP_CERTIFICATE, OTLP_ENDPOINT, TelemetrySettings, invalid};

/// Flushes exported spans when dropped: keep it until the process ends.
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take()
            && let Err(e) = provider.shutdown()
        {
            eprintln!("capability-facade: flushing traces failed: {e}");
        }
    }
}

/// Where spans are exported: an OTLP/gRPC collector and, for an https one, the CA certificates (PEM) its
/// certificate is checked against instead of the public CAs.
pub struct Otlp {
    pub endpoint: url::Url,
    pub ca: Option<Vec<u8>>,
}

impl Otlp {
    /// From `settings`, its CA file read and checked; `None` when no endpoint is set.
    pub fn from_settings(settings: &TelemetrySettings) -> Result<Option<Otlp>, ConfigError> {
        let Some(endpoint) = &settings.otlp_endpoint else {
            return Ok(None);
        };
        let ca = match &settings.otlp_certificate {
            None => None,
            Some(path) => {
                let pem = std::fs::read(path)
                    .map_err(|e| invalid(OTLP_CERTIFICATE, format!("cannot read {}: {e}", path.display())))?;
                crate::tls::trust_anchors(&pem).map_err(|e| invalid(OTLP_CERTIFICATE, e))?;
                Some(pem)
            }
        };
        Ok(Some(Otlp {
            endpoint: endpoint.clone(),
            ca,
        }))
    }
}

/// `RUST_LOG`'s filter: `info` when it is unset or blank (a filter of nothing would turn every line off); one that
/// does not parse is refused, naming it, rather than dropped for `info` without a word.
fn log_filter() -> Result<EnvFilter, String> {
    let text = match std::env::var(EnvFilter::DEFAULT_ENV) {
        Ok(text) => text,
        Err(std::env::VarError::NotPresent) => String::new(),
        Err(std::env::VarError::NotUnicode(_)) => return Err(format!("{}: not UTF-8", EnvFilter::DEFAULT_ENV)),
    };
    if text.trim().is_empty() {
        return Ok(EnvFilter::new("info"));
    }
    EnvFilter::builder()
        .parse(&text)
        .map_err(|e| format!("{}: {e}", EnvFilter::DEFAULT_ENV))
}

/// Installs the global subscriber; call once, first thing in the process, inside the Tokio runtime.
/// With `otlp`, spans are also exported over OTLP/gRPC.
pub fn init(format: LogFormat, otlp: Option<&Otlp>) -> Result<Telemetry, String> {
    let filter = log_filter()?;
    let logs = match format {
        LogFormat::Text => fmt::layer().with_writer(std::io::stderr).boxed(),
        LogFormat::Json => fmt::layer()
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .fmt_fields(SpanFields)
            .with_writer(std::io::stderr)
            .boxed(),
    };
    let provider = otlp.map(exporting).transpose()?;
    let traces = provider
        .as_ref()
        .map(|p| tracing_opentelemetry::layer().with_tracer(p.tracer("capability-facade")));
    tracing_subscriber::registry()
        .with(filter)
        .with(logs)
        .with(traces)
        .init();
    Ok(Telemetry { provider })
}

/// A span's fields as the JSON log layer keeps them (a JSON object, read back when an event in the span is
/// logged), written straight out. tracing-subscriber's `JsonFields` gathers them in a map of JSON values first:
/// for the span every callback is handled in, that was about 5,800 instructions of the webhook's ~100,000
/// (docs/bench/profiles/ingest-instructions.txt). The same object: strings and `Debug` values as JSON strings,
/// numbers and booleans as themselves, a non-finite float as `null`, bytes as an array of numbers.
struct SpanFields;

impl<'writer> FormatFields<'writer> for SpanFields {
    fn format_fields<R: RecordFields>(&self, mut writer: Writer<'writer>, fields: R) -> std::fmt::Result {
        let mut object = JsonObject {
            out: &mut writer,
            empty: true,
            result: Ok(()),
        };
        fields.record(&mut object);
        object.close()
    }

    /// Fields recorded later join the object (a name given again is read back as its last value).
    fn add_fields(&self, current: &'writer mut FormattedFields<Self>, fields: &span::Record<'_>) -> std::fmt::Result {
        if current.fields.is_empty() {
            return self.format_fields(current.as_writer(), fields);
        }
        let mut added = String::new();
        self.format_fields(Writer::new(&mut added), fields)?;
        if added.len() > 2 {
            // The object loses its closing brace, and takes the added members after a comma if it had any.
            current.fields.pop();
            if current.fields.len() > 1 {
                current.fields.push(',');
            }
            current.fields.push_str(&added[1..]);
        }
        Ok(())
    }
}

/// Writes the fields it visits as the members of one JSON object.
struct JsonObject<'a, W: Write> {
    out: &'a mut W,
    empty: bool,
    result: std::fmt::Result,
}

impl<W: Write> JsonObject<'_, W> {
    /// Writes `"name":` and then the value `value` writes.
    fn member(&mut self, name: &str, value: impl FnOnce(&mut W) -> std::fmt::Result) {
        let name = name.strip_prefix("r#").unwrap_or(name);
        let opening = if std::mem::take(&mut self.empty) { "{" } else { "," };
        self.result = self.result.and_then(|()| {
            self.out.write_str(opening)?;
            json_str(self.out, name)?;
            self.out.write_char(':')?;
            value(self.out)
        });
    }

    fn close(self) -> std::fmt::Result {
        self.result?;
        self.out.write_str(if self.empty { "{}" } else { "}" })
    }
}

impl<W: Write> Visit for JsonObject<'_, W> {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if !field.name().starts_with("log.") {
            self.member(field.name(), |out| json_string(out, format_args!("{value:?}")));
        }
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        self.member(field.name(), |out| json_str(out, value));
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.member(field.name(), |out| write!(out, "{value}"));
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.member(field.name(), |out| write!(out, "{value}"));
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.member(field.name(), |out| write!(out, "{value}"));
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        self.member(field.name(), |out| match value.is_finite() {
            true => write!(out, "{}", serde_json::Value::from(value)),
            false => out.write_str("null"),
        });
    }

    fn record_bytes(&mut self, field: &Field, value: &[u8]) {
        self.member(field.name(), |out| write!(out, "{}", serde_json::Value::from(value)));
    }
}

/// Writes `text` as a JSON string: quoted, with `"`, `\\` and control characters escaped.
fn json_str(out: &mut impl Write, text: &str) -> std::fmt::Result {
    out.write_char('"')?;
    Escaping(out).write_str(text)?;
    out.write_char('"')
}

/// Writes what `text` formats as a JSON string.
fn json_string(out: &mut impl Write, text: std::fmt::Arguments<'_>) -> std::fmt::Result {
    out.write_char('"')?;
    Escaping(out).write_fmt(text)?;
    out.write_char('"')
}

/// Escapes what is written through it for the inside of a JSON string.
struct Escaping<'a, W: Write>(&'a mut W);

impl<W: Write> Write for Escaping<'_, W> {
    fn write_str(&mut self, text: &str) -> std::fmt::Result {
        let mut rest = text;
        while let Some(at) = rest.bytes().position(|c| c == b'"' || c == b'\\' || c < b' ') {
            self.0.write_str(&rest[..at])?;
            match rest.as_bytes()[at] {
                b'"' => self.0.write_str("\\\""),
                b'\\' => self.0.write_str("\\\\"),
                b'\n' => self.0.write_str("\\n"),
                b'\r' => self.0.write_str("\\r"),
                b'\t' => self.0.write_str("\\t"),
                c => write!(self.0, "\\u{c:04x}"),
            }?;
            rest = &rest[at + 1..];
        }
        self.0.write_str(rest)
    }
}

fn exporting(otlp: &Otlp) -> Result<SdkTracerProvider, String> {
    use opentelemetry_otlp::{
        WithExportConfig, WithTonicConfig,
        tonic_types::transport::{Certificate, ClientTlsConfig},
    };
    let endpoint = otlp.endpoint.as_str();
    let mut exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(endpoint);
    if otlp.endpoint.scheme() == "https" {
        let tls = match &otlp.ca {
            Some(ca) => ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca)),
            None => ClientTlsConfig::new().with_webpki_roots(),
        };
        exporter = exporter.with_tls_config(tls);
    }
    let exporter = exporter
        .build()
        .map_err(|e| format!("{OTLP_ENDPOINT}: cannot export to {endpoint}: {e}"))?;
    let resource = opentelemetry_sdk::Resource::builder()
        .with_service_name("capability-facade")
        .build();
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource)
        .build())
}

/// Latency buckets, in seconds: from 100 µs (a hub delivery) to 10 s (a slow upstream with retries).
const LATENCY_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// The process's Prometheus recorder, installed on first use; every service in the process shares it.
pub fn metrics() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)
                .expect("the buckets are not empty")
                .install_recorder()
                .expect("no other metrics recorder is installed")
        })
        .clone()
}

/// Makes at 0 the series that the alerts of docs/OPERATIONS.md watch with `increase()` or `rate()`: a series that
/// first appears at 1 reads as no increase, so a replica's first such event would fire nothing. Each with the
/// labels its counting site gives it.
pub fn zero_alerted_series() {
    for name in ["capability_queries_total", "capability_checks_total"] {
        metrics::counter!(name, "outcome" => "internal").increment(0);
    }
    for result in ["bad_signature", "not_found", "shed", "unavailable"] {
        metrics::counter!("capability_webhooks_total", "result" => result).increment(0);
    }
    for reason in ["malformed", "unknown_version"] {
        metrics::counter!("capability_log_skipped_total", "reason" => reason).increment(0);
    }
    metrics::counter!("capability_requests_evicted_total").increment(0);
    metrics::counter!("capability_bulk_jobs_ended_total", "state" => "failed").increment(0);
    for listener in ["grpc", "webhook", "admin"] {
        metrics::counter!("capability_connections_refused_total", "listener" => listener).increment(0);
    }
}

/// `metrics::counter!` (or `gauge!`, `histogram!`, as `$kind`) for a metric whose name and labels are literals,
/// its handle registered on first use and kept: the macro alone looks its key up in the recorder's registry
/// (hashing its name and labels) on every call, several times per callback. First used only once
/// [`metrics`] has installed the recorder (`Service::build` does that first), or it would keep a no-op handle.
macro_rules! registered {
    ($kind:ident, $($key:tt)+) => {{
        static HANDLE: std::sync::LazyLock<::metrics::$kind> =
            std::sync::LazyLock::new(|| registered!(@make $kind, $($key)+));
        &*HANDLE
    }};
    (@make Counter, $($key:tt)+) => { ::metrics::counter!($($key)+) };
    (@make Gauge, $($key:tt)+) => { ::metrics::gauge!($($key)+) };
    (@make Histogram, $($key:tt)+) => { ::metrics::histogram!($($key)+) };
}
pub(crate) use registered;

/// A W3C trace context received from a caller (`traceparent: 00-<trace id>-<parent id>-<flags>`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceParent {
    trace_id: String,
    parent_id: String,
    flags: String,
}

impl TraceParent {
    /// Reads a `traceparent` header; `None` when it is not a valid version-00 context.
    pub fn parse(header: &str) -> Option<TraceParent> {
        let mut parts = header.trim().split('-');
        let (version, trace_id, parent_id, flags) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        let hex = |s: &str, len: usize| s.len() == len && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
        let valid = version == "00"
            && parts.next().is_none()
            && hex(trace_id, 32)
            && hex(parent_id, 16)
            && hex(flags, 2)
            && trace_id.bytes().any(|b| b != b'0')
            && parent_id.bytes().any(|b| b != b'0');
        valid.then(|| TraceParent {
            trace_id: trace_id.to_owned(),
            parent_id: parent_id.to_owned(),
            flags: flags.to_owned(),
        })
    }

    pub fn trace_id(&self) -> &str {
        &self.trace_id
    }

    /// The header for a call made on the caller's behalf: the same trace, a new span id.
    pub fn child(&self) -> String {
        let span_id = rand::random::<u64>().max(1);
        format!("00-{}-{span_id:016x}-{}", self.trace_id, self.flags)
    }

    /// Makes this context the parent of `span` in exported traces.
    pub fn adopt(&self, span: &tracing::Span) {
        let (Ok(trace_id), Ok(span_id), Ok(flags)) = (
            TraceId::from_hex(&self.trace_id),
            SpanId::from_hex(&self.parent_id),
            u8::from_str_radix(&self.flags, 16),
        ) else {
            return;
        };
        let remote = SpanContext::new(trace_id, span_id, TraceFlags::new(flags), true, TraceState::NONE);
        let _ = span.set_parent(opentelemetry::Context::new().with_remote_span_context(remote));
    }
}

/// The `traceparent` of an outgoing call made in the current span: the span itself when traces are exported,
/// otherwise a new span of the caller's trace, if the caller sent one.
pub fn outgoing_traceparent(caller: Option<&TraceParent>) -> Option<String> {
    let context = tracing::Span::current().context();
    let span = context.span();
    let current = span.span_context();
    if current.is_valid() {
        return Some(format!(
            "00-{}-{}-{:02x}",
            current.trace_id(),
            current.span_id(),
            current.trace_flags().to_u8()
        ));
    }
    caller.map(TraceParent::child)
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use tracing_subscriber::fmt::format::JsonFields;

    use super::*;

    /// The JSON lines events log inside two spans, their fields kept by `fields`: one with fields of every kind,
    /// one of them recorded after the span was made; one made with no field but those recorded later.
    fn logged_in_a_span<N>(fields: N) -> Vec<serde_json::Value>
    where
        N: for<'w> FormatFields<'w> + Send + Sync + 'static,
    {
        let out = Arc::new(Mutex::new(Vec::new()));
        let writer = {
            let out = out.clone();
            move || Capture(out.clone())
        };
        let layer = fmt::layer()
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .fmt_fields(fields)
            .with_writer(writer);
        tracing::subscriber::with_default(tracing_subscriber::registry().with(layer), || {
            let span = tracing::info_span!(
                "receive",
                text = "say \"hi\"\n\\ \u{1} ünï",
                negative = -3i64,
                count = 7u64,
                flag = true,
                ratio = 1.5f64,
                nothing = f64::NAN,
                listed = ?[1, 2],
                r#type = "raw",
                bytes = &b"ab"[..],
                late = tracing::field::Empty,
            );
            span.record("late", 5);
            span.record("count", 8u64);
            span.in_scope(|| tracing::info!("inside"));
            let span = tracing::info_span!("later", first = tracing::field::Empty, second = tracing::field::Empty);
            span.record("first", "one");
            span.record("second", 2);
            span.in_scope(|| tracing::info!("inside"));
        });
        let lines = out.lock().unwrap().clone();
        serde_json::Deserializer::from_slice(&lines)
            .into_iter()
            .map(|line| line.expect("JSON lines"))
            .collect()
    }

    struct Capture(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Capture {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_spans_fields_are_logged_as_tracing_subscribers_json_logs_them() {
        let (ours, theirs) = (logged_in_a_span(SpanFields), logged_in_a_span(JsonFields::default()));
        assert_eq!(ours.len(), 2, "{ours:?}");
        for (ours, theirs) in ours.iter().zip(&theirs) {
            assert_eq!(ours["span"], theirs["span"], "{ours}");
        }
        let (full, later) = (&ours[0]["span"], &ours[1]["span"]);
        assert_eq!(full["text"], "say \"hi\"\n\\ \u{1} ünï", "{full}");
        assert_eq!(full["late"], 5, "{full}");
        assert_eq!(full["count"], 8, "{full}");
        assert_eq!(full["nothing"], serde_json::Value::Null, "{full}");
        assert_eq!(
            (&later["first"], &later["second"]),
            (&"one".into(), &2.into()),
            "{later}"
        );
    }

    #[test]
    fn a_valid_traceparent_gets_a_child_in_the_same_trace() {
        let header = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let parent = TraceParent::parse(header).unwrap();
        let child = parent.child();
        assert!(child.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"), "{child}");
        assert!(child.ends_with("-01"));
        assert_ne!(child, header);
        assert_eq!(TraceParent::parse(&child).unwrap().trace_id(), parent.trace_id());
    }

    #[test]
    fn invalid_traceparents_are_ignored() {
        for header in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ] {
            assert_eq!(TraceParent::parse(header), None, "{header}");
        }
    }
}
