//! The gRPC face of the service: `capability.v1.CapabilityService`, `grpc.health.v1` and server reflection.

pub mod client;
pub mod codec;
pub mod convert;
mod health;
mod limit;
mod quota;
mod status;

use std::{
    pin::Pin,
    sync::Arc,
    time::{Duration, SystemTime},
};

use futures::Stream;
use tokio::{sync::Semaphore, time::Instant};
use tokio_util::sync::CancellationToken;
use tonic::{
    Request, Response, Status,
    body::Body,
    metadata::MetadataMap,
    transport::{Certificate, Identity, Server, ServerTlsConfig, server::Connected},
};
use tonic_health::ServingStatus;
use tracing::Instrument;

use subtle::{ConditionallySelectable, ConstantTimeEq};

use crate::{
    capability::mask_digits,
    check::{Checker, bulk::Jobs},
    connection::{Activity, BusyBody, Guarded, GuardedListener},
    hub::{Hub, Watch, WatchEvent, WatchLimits},
    log::wall_clock_ms,
    query::Queries,
    secret::Secret,
    telemetry::{TraceParent, registered},
    tls::TlsFiles,
};
use pb::capability_service_server::{CapabilityService, CapabilityServiceServer};
use quota::{QuotaTicket, TokenIndex, WatchQuota};

/// The generated protobuf types and the encoded descriptor set served by reflection.
#[allow(clippy::large_enum_variant)] // generated code: a oneof's variants differ in size by nature
pub mod pb {
    tonic::include_proto!("capability.v1");

    /// The contract's descriptors, for server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/capability_descriptor.bin"));
}

/// HTTP/2 pings on an idle connection: below the idle timeouts of common proxies and load balancers (60 s and
/// more), so that a connection carrying only quiet watches is not cut; a peer that does not answer within
/// `KEEPALIVE_TIMEOUT` is gone.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);
/// The longest a TLS handshake may take: a client that stalls in it is cut off.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The part of a call's deadline kept for answering in time (a tenth of it, at most this): the status must reach
/// the caller before its own timer fires, or it sees a bare timeout instead of what went wrong.
const DEADLINE_MARGIN: Duration = Duration::from_millis(50);

/// How watches behave on this replica.
#[derive(Debug, Clone, Copy)]
pub struct WatchSettings {
    /// The wait of a request that sets none.
    pub default_wait: Duration,
    /// The longest wait granted (the retention: nothing is replayable for longer).
    pub max_wait: Duration,
    /// The longest quiet spell on a stream before a heartbeat.
    pub heartbeat: Duration,
    /// The most watches open at once on this replica.
    pub max_watches: u64,
    /// The most watches one connection may hold open.
    pub max_per_connection: u64,
    /// The most watches one caller may hold open.
    pub max_per_caller: u64,
}

/// How the gRPC server treats connections and callers.
#[derive(Debug, Clone)]
pub struct TransportSettings {
    /// When not empty, CapabilityService calls must carry `authorization: Bearer <one of these>`.
    pub tokens: Vec<Secret>,
    /// HTTP/2 streams one connection may carry at once.
    pub max_streams_per_connection: u32,
    /// Connections older than this get a GOAWAY; open streams then have `max_connection_age_grace`.
    pub max_connection_age: Option<Duration>,
    pub max_connection_age_grace: Duration,
    /// TLS, and mutual TLS when a client CA is set; plain HTTP/2 when `None`.
    pub tls: Option<TlsFiles>,
}

/// tonic's default decoding limit, kept for every method but StartBulkCheck (held from each message's length
/// prefix: `limit`; tonic's own limit is StartBulkCheck's, for the whole service).
const MAX_MESSAGE: usize = 4 << 20;
/// StartBulkCheck's limit: 100,000 recipients of a few identities each (the CLI's too).
pub const MAX_BULK_MESSAGE: usize = 24 << 20;
/// How many results one read of a job's results takes.
const RESULTS_BATCH: usize = 256;
/// A running job's progress is sent this often: the contract says at least once a second, and a busy replica may
/// be late by a few milliseconds.
const PROGRESS_EVERY: Duration = Duration::from_millis(750);

/// `capability.v1.CapabilityService`.
pub struct CapabilityApi {
    queries: Arc<Queries>,
    checker: Arc<Checker>,
    jobs: Arc<Jobs>,
    check: convert::CheckDefaults,
    /// One permit per QueryCapability in flight: beyond, calls are shed at once instead of queueing.
    query_permits: Arc<Semaphore>,
    /// The budget of a QueryCapability whose caller set no deadline.
    query_timeout: Duration,
    hub: Arc<Hub>,
    watch: WatchSettings,
    /// Open watches per connection and per caller.
    quota: Arc<WatchQuota>,
    /// Cancelled when the server begins to shut down: watches end, new ones are refused.
    shutdown: CancellationToken,
}

impl CapabilityApi {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        queries: Arc<Queries>,
        checker: Arc<Checker>,
        jobs: Arc<Jobs>,
        check: convert::CheckDefaults,
        max_inflight_queries: usize,
        query_timeout: Duration,
        hub: Arc<Hub>,
        watch: WatchSettings,
        shutdown: CancellationToken,
    ) -> CapabilityApi {
        CapabilityApi {
            queries,
            checker,
            jobs,
            check,
            query_permits: Arc::new(Semaphore::new(max_inflight_queries.min(Semaphore::MAX_PERMITS))),
            query_timeout,
            hub,
            quota: Arc::new(WatchQuota::new(
                watch.max_watches,
                watch.max_per_connection,
                watch.max_per_caller,
            )),
            watch,
            shutdown,
        }
    }

    async fn query(
        &self,
        request: Request<pb::QueryCapabilityRequest>,
        trace: Option<&TraceParent>,
    ) -> Result<Response<pb::QueryCapabilityResponse>, Status> {
        let deadline = deadline(request.metadata(), self.query_timeout);
        let query = convert::query_request(request.into_inner()).map_err(status::invalid_request)?;
        // Valid first: a malformed request is told so, not told to retry.
        let Ok(permit) = self.query_permits.clone().try_acquire_owned() else {
            return Err(status::overloaded());
        };
        // Per-query lines are debug: at Sinch's 800/s per project an info line each would be most of the log.
        tracing::debug!(recipient = ?query.recipient, "query");
        match self.queries.query(query, deadline, trace, permit).await {
            Ok(accepted) => {
                tracing::Span::current().record("request_id", mask_digits(&accepted.request_id).as_ref());
                tracing::debug!("query accepted by Sinch");
                Ok(Response::new(convert::query_response(accepted)))
            }
            Err(e) => {
                tracing::warn!(error = %e, "query failed");
                Err(e.into())
            }
        }
    }
}

impl CapabilityApi {
    async fn check(
        &self,
        request: Request<pb::CheckCapabilityRequest>,
        trace: Option<&TraceParent>,
    ) -> Result<Response<pb::CheckCapabilityResponse>, Status> {
        let timeout = caller_timeout(request.metadata());
        let check = convert::check_request(request.into_inner(), &self.check).map_err(status::invalid_request)?;
        let budget = timeout.unwrap_or(self.query_timeout + check.wait);
        let deadline = Instant::now() + budget.min(crate::query::MAX_DEADLINE);
        tracing::debug!(recipient = ?check.recipient, "check");
        match self.checker.check(check, deadline, trace).await {
            Ok(answer) => {
                tracing::Span::current().record("request_id", mask_digits(&answer.request_id).as_ref());
                Ok(Response::new(convert::check_response(answer)))
            }
            Err(e) => {
                tracing::warn!(error = %e, "check failed");
                Err(e.into())
            }
        }
    }
}

/// One WatchBulkCheck stream: the results past its cursor, a progress at least every second, a final progress.
struct BulkWatch {
    jobs: Arc<Jobs>,
    job_id: String,
    /// The offset of the last result read.
    cursor: u64,
    buffered: std::collections::VecDeque<pb::WatchBulkCheckResponse>,
    next_progress: Instant,
    shutdown: CancellationToken,
    ended: bool,
    _place: QuotaTicket,
}

impl BulkWatch {
    /// The next message; `None` after the final progress.
    async fn next(&mut self) -> Option<Result<pb::WatchBulkCheckResponse, Status>> {
        use pb::watch_bulk_check_response::Event;
        loop {
            if let Some(message) = self.buffered.pop_front() {
                return Some(Ok(message));
            }
            if self.ended {
                return None;
            }
            if self.shutdown.is_cancelled() {
                self.ended = true;
                return Some(Err(status::shutting_down(self.cursor)));
            }
            // The status before the results: a job seen settled has every result in already.
            let job = match self.jobs.status(&self.job_id).await {
                Ok(job) => job,
                Err(e) => {
                    self.ended = true;
                    return Some(Err(e.into()));
                }
            };
            let results = match self.jobs.results_after(&self.job_id, self.cursor, RESULTS_BATCH).await {
                Ok(results) => results,
                Err(e) => {
                    self.ended = true;
                    return Some(Err(e.into()));
                }
            };
            let caught_up = results.len() < RESULTS_BATCH;
            for result in results {
                self.cursor = result.offset;
                self.buffered.push_back(pb::WatchBulkCheckResponse {
                    event: Some(Event::Result(pb::BulkCheckResult {
                        offset: result.offset,
                        index: result.index,
                        answer: Some(convert::check_response(result.answer)),
                    })),
                });
            }
            let now = Instant::now();
            if (job.settled && caught_up) || now >= self.next_progress {
                self.ended = job.settled && caught_up;
                self.next_progress = now + PROGRESS_EVERY;
                self.buffered.push_back(pb::WatchBulkCheckResponse {
                    event: Some(Event::Progress(convert::bulk_check(&job, wall_clock_ms()))),
                });
            }
            if self.buffered.is_empty() {
                let longest = self.next_progress.saturating_duration_since(Instant::now());
                tokio::select! {
                    () = self.jobs.changed(&self.job_id, self.cursor, longest) => {}
                    () = self.shutdown.cancelled() => {}
                }
            }
        }
    }
}

pin_project_lite::pin_project! {
    /// A watch and its place among this replica's open watches (counted in `capability_active_watches`), its
    /// connection's and its caller's: the stream of one WatchCapability call, its messages as the contract
    /// carries them.
    struct OpenWatch {
        #[pin]
        watch: Watch,
        ticket: QuotaTicket,
    }

    impl PinnedDrop for OpenWatch {
        fn drop(this: Pin<&mut Self>) {
            metrics::gauge!("capability_active_watches").decrement(1.0);
        }
    }
}

impl OpenWatch {
    fn new(watch: Watch, ticket: QuotaTicket) -> OpenWatch {
        metrics::gauge!("capability_active_watches").increment(1.0);
        OpenWatch { watch, ticket }
    }
}

impl Stream for OpenWatch {
    type Item = Result<pb::WatchCapabilityResponse, Status>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<Option<Self::Item>> {
        self.project().watch.poll_next(cx).map(|event| event.map(watch_message))
    }
}

/// The messages of one WatchCapability stream; owns the watch, so dropping the stream frees its subscription.
pub type WatchStream = Pin<Box<dyn Stream<Item = Result<pb::WatchCapabilityResponse, Status>> + Send>>;

#[tonic::async_trait]
impl CapabilityService for CapabilityApi {
    async fn query_capability(
        &self,
        request: Request<pb::QueryCapabilityRequest>,
    ) -> Result<Response<pb::QueryCapabilityResponse>, Status> {
        // Made here rather than by `#[instrument]`: the caller's context must be its parent before it is entered.
        let span = tracing::info_span!(
            "query_capability",
            request_id = tracing::field::Empty,
            trace_id = tracing::field::Empty
        );
        let trace = continue_trace(request.metadata(), &span);
        let result = self.query(request, trace.as_ref()).instrument(span).await;
        metrics::counter!("capability_queries_total", "outcome" => outcome(&result)).increment(1);
        result
    }

    async fn check_capability(
        &self,
        request: Request<pb::CheckCapabilityRequest>,
    ) -> Result<Response<pb::CheckCapabilityResponse>, Status> {
        let span = tracing::info_span!(
            "check_capability",
            request_id = tracing::field::Empty,
            trace_id = tracing::field::Empty
        );
        let trace = continue_trace(request.metadata(), &span);
        let result = self.check(request, trace.as_ref()).instrument(span).await;
        metrics::counter!("capability_checks_total", "outcome" => outcome(&result)).increment(1);
        result
    }

    #[tracing::instrument(skip_all)]
    async fn invalidate_capability(
        &self,
        request: Request<pb::InvalidateCapabilityRequest>,
    ) -> Result<Response<pb::InvalidateCapabilityResponse>, Status> {
        let (app_id, recipient) = convert::invalidate_request(request.into_inner()).map_err(status::invalid_request)?;
        let removed = self.checker.invalidate(&app_id, &recipient).await?;
        tracing::debug!(?recipient, removed, "cached results invalidated");
        Ok(Response::new(pb::InvalidateCapabilityResponse { removed }))
    }

    #[tracing::instrument(skip_all)]
    async fn start_bulk_check(
        &self,
        request: Request<pb::StartBulkCheckRequest>,
    ) -> Result<Response<pb::BulkCheck>, Status> {
        let spec = convert::start_bulk_request(request.into_inner(), &self.check).map_err(status::invalid_request)?;
        let job = self.jobs.start(spec).await?;
        Ok(Response::new(convert::bulk_check(&job, wall_clock_ms())))
    }

    #[tracing::instrument(skip_all)]
    async fn get_bulk_check(
        &self,
        request: Request<pb::GetBulkCheckRequest>,
    ) -> Result<Response<pb::BulkCheck>, Status> {
        let job_id = request.into_inner().job_id;
        convert::job_id(&job_id).map_err(status::invalid_request)?;
        let job = self.jobs.status(&job_id).await?;
        Ok(Response::new(convert::bulk_check(&job, wall_clock_ms())))
    }

    #[tracing::instrument(skip_all)]
    async fn cancel_bulk_check(
        &self,
        request: Request<pb::CancelBulkCheckRequest>,
    ) -> Result<Response<pb::BulkCheck>, Status> {
        let job_id = request.into_inner().job_id;
        convert::job_id(&job_id).map_err(status::invalid_request)?;
        let job = self.jobs.cancel(&job_id).await?;
        Ok(Response::new(convert::bulk_check(&job, wall_clock_ms())))
    }

    type WatchBulkCheckStream = Pin<Box<dyn Stream<Item = Result<pb::WatchBulkCheckResponse, Status>> + Send>>;

    #[tracing::instrument(skip_all)]
    async fn watch_bulk_check(
        &self,
        request: Request<pb::WatchBulkCheckRequest>,
    ) -> Result<Response<Self::WatchBulkCheckStream>, Status> {
        let holders = quota::holders(&request);
        let request = request.into_inner();
        convert::job_id(&request.job_id).map_err(status::invalid_request)?;
        // An unknown job is NOT_FOUND now, not a stream that never ends.
        self.jobs.status(&request.job_id).await?;
        let place = self.quota.claim(holders)?;
        let watch = BulkWatch {
            jobs: self.jobs.clone(),
            job_id: request.job_id,
            cursor: request.after_offset,
            buffered: std::collections::VecDeque::new(),
            next_progress: Instant::now(),
            shutdown: self.shutdown.clone(),
            ended: false,
            _place: place,
        };
        let stream = futures::stream::unfold(watch, |mut watch| async move {
            let message = watch.next().await?;
            Some((message, watch))
        });
        Ok(Response::new(Box::pin(stream)))
    }

    type WatchCapabilityStream = WatchStream;

    #[tracing::instrument(skip_all, fields(request_id))]
    async fn watch_capability(
        &self,
        request: Request<pb::WatchCapabilityRequest>,
    ) -> Result<Response<Self::WatchCapabilityStream>, Status> {
        let holders = quota::holders(&request);
        let request = request.into_inner();
        tracing::Span::current().record("request_id", mask_digits(&request.request_id).as_ref());
        convert::check_request_id(&request.request_id, true).map_err(|v| status::invalid_request(vec![v]))?;
        let wait = convert::wait(request.wait, self.watch.default_wait, self.watch.max_wait)
            .map_err(|v| status::invalid_request(vec![v]))?;
        if self.shutdown.is_cancelled() {
            return Err(status::shutting_down(request.after_offset));
        }
        let ticket = self.quota.claim(holders)?;
        let limits = WatchLimits {
            wait,
            heartbeat: self.watch.heartbeat,
            ends_at_shutdown: true,
        };
        let watch = OpenWatch::new(
            self.hub.watch(&request.request_id, request.after_offset, limits),
            ticket,
        );
        tracing::debug!(after_offset = request.after_offset, ?wait, "watch opened");
        Ok(Response::new(Box::pin(watch)))
    }
}

/// A watch event as a stream message, or the status that ends the stream.
fn watch_message(event: WatchEvent) -> Result<pb::WatchCapabilityResponse, Status> {
    use pb::watch_capability_response::Event;
    let event = match event {
        WatchEvent::Notification {
            offset,
            request_id,
            body,
            replayed,
        } => {
            let n = convert::notification(offset, &request_id, &body);
            registered!(Counter, "capability_notifications_delivered_total").increment(1);
            // A replay's age is how late the watch came, not how slow the delivery was.
            if !replayed && let Some(received) = n.receive_time.and_then(|t| SystemTime::try_from(t).ok()) {
                let latency = SystemTime::now().duration_since(received).unwrap_or_default();
                registered!(Histogram, "capability_delivery_latency_seconds").record(latency);
            }
            Event::Notification(n)
        }
        WatchEvent::Heartbeat { last_offset } => Event::Heartbeat(pb::Heartbeat { last_offset }),
        WatchEvent::Completed {
            reason,
            last_offset,
            pending,
        } => Event::Completion(convert::completion(reason, last_offset, pending)),
        WatchEvent::ShuttingDown { last_offset } => return Err(status::shutting_down(last_offset)),
        WatchEvent::Evicted { last_offset } => return Err(status::evicted(last_offset)),
    };
    Ok(pb::WatchCapabilityResponse { event: Some(event) })
}

/// When the call must be answered: the caller's `grpc-timeout` less a margin, or the default budget; never
/// later than [`MAX_DEADLINE`](crate::query::MAX_DEADLINE) from now (request_id claims outlive that).
/// The caller's trace context (`traceparent`), made the parent of `span` and named in its `trace_id`.
fn continue_trace(metadata: &MetadataMap, span: &tracing::Span) -> Option<TraceParent> {
    let trace = metadata
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
        .and_then(TraceParent::parse)?;
    span.record("trace_id", trace.trace_id());
    trace.adopt(span);
    Some(trace)
}

/// A call's outcome as a metrics label.
fn outcome<T>(result: &Result<T, Status>) -> &'static str {
    result.as_ref().map_or_else(|s| status::code_label(s.code()), |_| "ok")
}

fn deadline(metadata: &MetadataMap, default: Duration) -> Instant {
    let timeout = caller_timeout(metadata).unwrap_or(default);
    Instant::now() + timeout.min(crate::query::MAX_DEADLINE)
}

/// The caller's `grpc-timeout`, less the margin kept for answering in time.
fn caller_timeout(metadata: &MetadataMap) -> Option<Duration> {
    metadata
        .get("grpc-timeout")
        .and_then(|v| v.to_str().ok())
        .and_then(parse_grpc_timeout)
        .map(|t| t.saturating_sub(DEADLINE_MARGIN.min(t / 10)))
}

/// Parses the `grpc-timeout` header: at most 8 digits and a unit (H, M, S, m, u, n).
fn parse_grpc_timeout(value: &str) -> Option<Duration> {
    if value.len() < 2 || value.len() > 9 {
        return None;
    }
    let (digits, unit) = value.split_at(value.len() - 1);
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.checked_mul(3600)?),
        "M" => Duration::from_secs(n.checked_mul(60)?),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// Serves gRPC on `listener`. The service's health turns SERVING once `ready` (the event log was read back, as
/// `/readyz` says) and NOT_SERVING at once when `shutdown` is cancelled; the server's own (`""`) serves from the
/// start, for a startup probe. When `stop` is cancelled the server stops accepting and lets in-flight calls finish
/// (the caller bounds that wait).
pub async fn serve(
    listener: GuardedListener,
    api: CapabilityApi,
    transport: TransportSettings,
    ready: impl Future<Output = ()> + Send + 'static,
    shutdown: CancellationToken,
    stop: CancellationToken,
) -> Result<(), tonic::transport::Error> {
    let health = tonic_health::server::HealthReporter::new();
    let health_service = health::Health::new(health.clone(), stop.clone());
    health.set_not_serving::<CapabilityServiceServer<CapabilityApi>>().await;
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_types::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection_v1 = reflection().build_v1().expect("the embedded descriptor set is valid");
    let reflection_v1alpha = reflection()
        .build_v1alpha()
        .expect("the embedded descriptor set is valid");
    tokio::spawn(async move {
        tokio::select! {
            () = ready => health.set_serving::<CapabilityServiceServer<CapabilityApi>>().await,
            () = shutdown.cancelled() => {}
        }
        shutdown.cancelled().await;
        health.set_not_serving::<CapabilityServiceServer<CapabilityApi>>().await;
        health.set_service_status("", ServingStatus::NotServing).await;
        tracing::info!("gRPC health is NOT_SERVING; draining");
    });
    let signal = stop.cancelled_owned();
    let mut builder = Server::builder()
        .http2_keepalive_interval(Some(KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT))
        .max_concurrent_streams(transport.max_streams_per_connection);
    if let Some(tls) = &transport.tls {
        let mut config = ServerTlsConfig::new()
            .identity(Identity::from_pem(&tls.cert_chain, tls.key.expose()))
            .timeout(TLS_HANDSHAKE_TIMEOUT);
        if let Some(ca) = &tls.client_ca {
            config = config.client_ca_root(Certificate::from_pem(ca));
        }
        builder = builder.tls_config(config)?;
    }
    if let Some(age) = transport.max_connection_age {
        builder = builder
            .max_connection_age(age)
            .max_connection_age_grace(transport.max_connection_age_grace);
    }
    let tokens = transport.tokens;
    let incoming = futures::stream::unfold(listener, |listener| async move {
        let connection = listener.accept().await;
        Some((Ok::<_, std::io::Error>(connection), listener))
    });
    builder
        .layer(tower::layer::layer_fn(|inner| Tracked { inner }))
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(tonic::service::interceptor::InterceptedService::new(
            // No compressed requests: a message is held to its method's limit by its length as sent (`limit`), so
            // a small gzip message could inflate up to tonic's limit, the service's (StartBulkCheck's 24 MiB).
            CapabilityServiceServer::new(api).max_decoding_message_size(MAX_BULK_MESSAGE),
            move |request| authenticate(&tokens, request),
        ))
        .serve_with_incoming_shutdown(incoming, signal)
        .await
}

/// What a call knows of its connection (a request extension, inside `TlsConnectInfo` over TLS).
#[derive(Debug, Clone)]
pub struct Peer {
    remote: std::net::SocketAddr,
    activity: Arc<Activity>,
}

impl Peer {
    /// The peer a request's extensions carry, over plain TCP or TLS.
    fn of(extensions: &http::Extensions) -> Option<&Peer> {
        extensions.get::<Peer>().or_else(|| {
            extensions
                .get::<tonic::transport::server::TlsConnectInfo<Peer>>()
                .map(|info| info.get_ref())
        })
    }
}

impl Connected for Guarded {
    type ConnectInfo = Peer;

    fn connect_info(&self) -> Peer {
        Peer {
            remote: self.remote(),
            activity: self.activity().clone(),
        }
    }
}

/// Counts every call as in flight on its connection until its response ends (an idle connection is one without
/// calls), and holds each request message to its method's size limit from its length prefix: over it, the call
/// is answered RESOURCE_EXHAUSTED, the gRPC spec's code for it (tonic's own limit, the same as StartBulkCheck's,
/// is never reached; its codec would say OUT_OF_RANGE).
#[derive(Debug, Clone)]
struct Tracked<S> {
    inner: S,
}

impl<S> tower::Service<http::Request<Body>> for Tracked<S>
where
    S: tower::Service<http::Request<Body>, Response = http::Response<Body>>,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = Pin<Box<dyn std::future::Future<Output = Result<http::Response<Body>, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let busy = Peer::of(request.extensions()).map(|peer| peer.activity.begin());
        let limit = limit::limit_for(request.uri().path());
        let request = request.map(|body| Body::new(limit::Limited::new(body, limit)));
        let response = self.inner.call(request);
        Box::pin(async move {
            let response = response.await?;
            Ok(match busy {
                Some(busy) => response.map(|body| Body::new(BusyBody::new(body, busy))),
                None => response,
            })
        })
    }
}

/// The token of an `authorization` value `Bearer <token>`, the scheme's name in any case (RFC 7235).
fn bearer(value: &str) -> Option<&str> {
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then_some(token)
}

/// Lets a call through when caller authentication is off, or when it carries one of the tokens (compared in
/// constant time).
fn authenticate(tokens: &[Secret], request: Request<()>) -> Result<Request<()>, Status> {
    if tokens.is_empty() {
        return Ok(request);
    }
    let presented = request
        .metadata()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(bearer)
        .ok_or_else(|| status::unauthenticated(false))?;
    // Every token is compared, without a branch, so that the time taken does not tell which one matched; `found`
    // is one past the index of the match, 0 for none.
    let mut found = 0u64;
    for (index, token) in tokens.iter().enumerate() {
        found.conditional_assign(
            &(index as u64 + 1),
            token.expose().as_bytes().ct_eq(presented.as_bytes()),
        );
    }
    let Some(index) = found.checked_sub(1) else {
        return Err(status::unauthenticated(true));
    };
    let mut request = request;
    request.extensions_mut().insert(TokenIndex(index as usize));
    Ok(request)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What an idle watch holds on the heap of its own, beside h2's stream and its request's record (issue 16): at
    /// most 320 bytes, the allocator's size class under 384. A regression here costs a million watches.
    #[test]
    fn an_open_watch_stays_within_320_bytes() {
        assert!(
            size_of::<OpenWatch>() <= 320,
            "an open watch takes {} bytes",
            size_of::<OpenWatch>()
        );
    }

    #[test]
    fn grpc_timeouts_parse_in_every_unit() {
        assert_eq!(parse_grpc_timeout("2S"), Some(Duration::from_secs(2)));
        assert_eq!(parse_grpc_timeout("100m"), Some(Duration::from_millis(100)));
        assert_eq!(parse_grpc_timeout("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_grpc_timeout("99999999u"), Some(Duration::from_micros(99_999_999)));
        assert_eq!(parse_grpc_timeout("123456789S"), None);
        assert_eq!(parse_grpc_timeout("5x"), None);
        assert_eq!(parse_grpc_timeout("S"), None);
    }

    #[tokio::test(start_paused = true)]
    async fn a_query_deadline_never_outlives_what_is_kept_for_its_check() {
        let mut metadata = MetadataMap::new();
        metadata.insert("grpc-timeout", "2H".parse().unwrap());
        let longest = deadline(&metadata, Duration::from_secs(10)) - Instant::now();
        assert_eq!(longest, crate::query::MAX_DEADLINE);
        assert!(crate::query::LONGEST_CHECK >= longest + Duration::from_secs(30));
    }
}
