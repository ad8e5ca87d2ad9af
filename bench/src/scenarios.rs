//! Load generators: gRPC queries (facade or echo), HTTP queries (the sandbox directly), signed callbacks (the
//! facade's webhook or the bare HTTP server), watchers that time each notification, and idle watches.

use std::{
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use capability_facade::grpc::pb::{self, capability_service_client::CapabilityServiceClient};
use hdrhistogram::Histogram;
use testkit::CapabilityCallback;
use tonic::transport::Channel;

/// The secret the facade under test is given, so that the generator can sign.
pub const SECRET: &str = "bench-webhook-secret";

/// What a load run measured; latencies in microseconds.
pub struct Load {
    pub ok: u64,
    pub errors: u64,
    pub seconds: f64,
    pub latency: Histogram<u64>,
}

impl Load {
    pub fn rate(&self) -> f64 {
        self.ok as f64 / self.seconds
    }

    pub fn p50_us(&self) -> u64 {
        self.latency.value_at_quantile(0.5)
    }

    pub fn p99_us(&self) -> u64 {
        self.latency.value_at_quantile(0.99)
    }
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid bounds")
}

/// Runs `workers` copies of `op` for `duration` (or until `op` says `None`), each timing its own calls, and
/// merges what they measured. At a `rate` (calls a second in all), each worker keeps its own schedule (a call
/// every workers/rate seconds, shifted by its share of one interval; the start 20 ms away, once the workers run),
/// and a call made late because the one before it was slow counts from when it was due, so that a server that
/// falls behind is charged for the wait it causes; without, the calls follow one another.
pub async fn closed_loop<F, Fut>(workers: usize, duration: Duration, rate: Option<u64>, op: F) -> Load
where
    F: Fn(usize) -> Option<Fut> + Clone + Send + 'static,
    Fut: std::future::Future<Output = bool> + Send,
{
    let interval = rate.map(|rate| Duration::from_secs_f64(workers as f64 / rate as f64));
    let started = Instant::now() + interval.map_or(Duration::ZERO, |_| Duration::from_millis(20));
    let end = started + duration;
    let tasks: Vec<_> = (0..workers)
        .map(|w| {
            let op = op.clone();
            tokio::spawn(async move {
                let (mut latency, mut ok, mut errors) = (histogram(), 0u64, 0u64);
                for k in 0u32.. {
                    let due =
                        interval.map_or_else(Instant::now, |i| started + i * k + i.mul_f64(w as f64 / workers as f64));
                    if due >= end {
                        break;
                    }
                    let Some(call) = op(w) else { break };
                    // Behind schedule (the last call ran past this one's time), a call is charged from when it was
                    // due; on time, from when the timer let it go, whose lateness (up to a millisecond: the
                    // timer's tick) is the generator's own.
                    let behind = Instant::now() > due;
                    if interval.is_some() {
                        tokio::time::sleep_until(due.into()).await;
                    }
                    let t = if behind { due } else { Instant::now() };
                    if call.await {
                        ok += 1;
                        latency.saturating_record(t.elapsed().as_micros() as u64);
                    } else {
                        errors += 1;
                    }
                }
                (latency, ok, errors)
            })
        })
        .collect();
    gather(tasks, started).await
}

/// The load of `tasks`, each a worker's (latencies, answers, errors), over the time since `started`.
async fn gather(tasks: Vec<tokio::task::JoinHandle<(Histogram<u64>, u64, u64)>>, started: Instant) -> Load {
    let mut load = Load {
        ok: 0,
        errors: 0,
        seconds: 0.0,
        latency: histogram(),
    };
    for task in tasks {
        let (latency, ok, errors) = task.await.expect("a worker panicked");
        load.latency.add(latency).expect("same bounds");
        load.ok += ok;
        load.errors += errors;
    }
    load.seconds = started.elapsed().as_secs_f64();
    load
}

pub async fn channels(addr: SocketAddr, count: usize) -> Vec<Channel> {
    let mut channels = Vec::with_capacity(count);
    for _ in 0..count {
        let channel = Channel::from_shared(format!("http://{addr}"))
            .unwrap()
            .tcp_nodelay(true)
            .connect()
            .await
            .expect("the gRPC server accepts");
        channels.push(channel);
    }
    channels
}

fn query_request() -> pb::QueryCapabilityRequest {
    pb::QueryCapabilityRequest {
        app_id: "bench-app".into(),
        recipient: Some(pb::Recipient {
            recipient: Some(pb::recipient::Recipient::IdentifiedBy(pb::IdentifiedBy {
                channel_identities: vec![pb::ChannelIdentity {
                    channel: pb::Channel::Sms.into(),
                    identity: "46700000001".into(),
                    ..Default::default()
                }],
            })),
        }),
        request_id: String::new(),
    }
}

/// QueryCapability in a closed loop against a gRPC server (the facade or the echo baseline).
pub async fn grpc_queries(addr: SocketAddr, workers: usize, connections: usize, duration: Duration) -> Load {
    let channels = channels(addr, connections).await;
    closed_loop(workers, duration, None, move |w| {
        let mut client = CapabilityServiceClient::new(channels[w % channels.len()].clone());
        Some(async move { client.query_capability(query_request()).await.is_ok() })
    })
    .await
}

/// An HTTP client keeping up to `connections` idle connections, without Nagle's delay.
pub fn http_client(connections: usize) -> reqwest::Client {
    capability_facade::upstream::install_crypto_provider();
    reqwest::Client::builder()
        .pool_max_idle_per_host(connections)
        .tcp_nodelay(true)
        .build()
        .expect("a plain HTTP client builds")
}

/// The URL of the webhook served at `addr`, parsed once for all the posts to it.
pub fn webhook_url(addr: SocketAddr) -> reqwest::Url {
    reqwest::Url::parse(&testkit::webhook_url(addr)).expect("a webhook URL parses")
}

/// Posts `body` to the webhook at `url`, signed as Sinch signs it with [`SECRET`]; whether it was acknowledged.
pub async fn post_signed(http: &reqwest::Client, url: &reqwest::Url, body: Vec<u8>) -> bool {
    matches!(testkit::post_signed(http, url.clone(), SECRET, body).await, Ok(status) if status.is_success())
}

/// The same query sent to the sandbox directly over HTTP, as the facade sends it.
pub async fn http_queries(sandbox: SocketAddr, workers: usize, duration: Duration) -> Load {
    let http = http_client(workers);
    let url = format!("http://{sandbox}/v1/projects/sandbox-project/capability:query");
    let auth = testkit::basic_auth("sandbox-key", "sandbox-secret");
    closed_loop(workers, duration, None, move |_| {
        let body = serde_json::json!({"app_id": "bench-app", "request_id": ulid::Ulid::new().to_string(),
            "recipient": {"identified_by": {"channel_identities": [{"channel": "SMS", "identity": "46700000001"}]}}});
        let request = http
            .post(&url)
            .header("authorization", &auth)
            .header("content-type", "application/json")
            .body(body.to_string());
        Some(async move { matches!(request.send().await, Ok(r) if r.status().is_success()) })
    })
    .await
}

fn now_nanos() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos()
}

/// Watches of distinct request_ids (`{prefix}{i}`) that time each notification from its send time.
pub struct Watchers {
    pub delivered: Arc<AtomicU64>,
    pub latency: Arc<Mutex<Histogram<u64>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for Watchers {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

impl Watchers {
    /// Waits until `expected` notifications were delivered, or `limit` passed; returns when the last arrived.
    pub async fn wait_for(&self, expected: u64, limit: Duration) -> Instant {
        let started = Instant::now();
        while self.delivered() < expected && started.elapsed() < limit {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        Instant::now()
    }

    /// How many notifications have arrived.
    pub fn delivered(&self) -> u64 {
        self.delivered.load(Ordering::Relaxed)
    }

    pub fn reset(&self) {
        self.delivered.store(0, Ordering::Relaxed);
        self.latency.lock().unwrap().reset();
    }

    /// No stream yet: readers count with a [`Watchers::recorder`] and are handed over with [`Watchers::keep`].
    pub fn new() -> Watchers {
        Watchers {
            delivered: Arc::default(),
            latency: Arc::new(Mutex::new(histogram())),
            tasks: Vec::new(),
        }
    }

    /// Keeps `reader` running until the watchers are dropped.
    pub fn keep(&mut self, reader: tokio::task::JoinHandle<()>) {
        self.tasks.push(reader);
    }

    /// For a reader: counts a notification sent at the time it is given (ns since the Unix epoch) and records how
    /// long it took to arrive.
    pub fn recorder(&self) -> impl Fn(u128) + Send + 'static {
        let (delivered, latency) = (self.delivered.clone(), self.latency.clone());
        move |sent| {
            let micros = (now_nanos().saturating_sub(sent) / 1000) as u64;
            latency.lock().unwrap().saturating_record(micros.max(1));
            delivered.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Opens `count` watches spread over the `grpc` servers (`connections` HTTP/2 connections to each).
pub async fn open_watchers(grpc: &[SocketAddr], prefix: &str, count: usize, connections: usize) -> Watchers {
    let mut all = Vec::new();
    for addr in grpc {
        all.extend(channels(*addr, connections).await);
    }
    let mut watchers = Watchers::new();
    for mut stream in open_streams(&all, prefix, count).await {
        let record = watchers.recorder();
        watchers.keep(tokio::spawn(async move {
            while let Ok(Some(message)) = stream.message().await {
                if let Some(pb::watch_capability_response::Event::Notification(n)) = message.event
                    && let Ok(sent) = n.correlation_id.parse::<u128>()
                {
                    record(sent);
                }
            }
        }));
    }
    watchers
}

/// How callbacks are posted.
#[derive(Debug, Clone, Copy)]
pub struct Posting {
    /// Concurrent connections.
    pub posters: usize,
    /// Callbacks per second in all; flat out when `None`.
    pub rate: Option<u64>,
    /// Stop after this many callbacks.
    pub limit: Option<u64>,
    pub duration: Duration,
}

/// The app and project of posted callbacks, as long as Sinch's (a ULID and a UUID), so that what a replica
/// keeps per notification is measured at its real size.
const CALLBACK_APP_ID: &str = "01KBQ3M8Z6T1V0R9C5XW2YHJ4N";
const CALLBACK_PROJECT_ID: &str = "5f1c0a6e-3b2d-4e8f-9a71-0c6d2e4b8f13";
/// The next identity a posted callback reports on.
static IDENTITIES: AtomicU64 = AtomicU64::new(0);

/// Posts signed CAPABILITY callbacks ([`callback_body`]) for request_ids `{prefix}{0..ids}` to `target`.
pub async fn post_callbacks(target: SocketAddr, prefix: &str, ids: usize, posting: Posting) -> Load {
    let http = http_client(posting.posters);
    let url = webhook_url(target);
    let prefix = prefix.to_owned();
    post_loop(posting, move |n| {
        let body = callback_body(&format!("{prefix}{}", n as usize % ids.max(1)), n);
        let (http, url) = (http.clone(), url.clone());
        async move { post_signed(&http, &url, body).await }
    })
    .await
}

/// The `n`-th CAPABILITY callback of this process, for `request_id`. It carries its send time (`correlation_id`,
/// ns) and an identity no other callback of this process has, so none is a duplicate.
pub fn callback_body(request_id: &str, n: u64) -> Vec<u8> {
    // A distinct identity for each, across calls too: every callback is a new result, never a duplicate of one
    // an earlier phase posted to the same request_id (the log would drop it).
    let identity = format!("46{:011}", IDENTITIES.fetch_add(1, Ordering::Relaxed));
    CapabilityCallback::new(request_id, "SMS", &identity, "CAPABILITY_FULL")
        .app_id(CALLBACK_APP_ID)
        .project_id(CALLBACK_PROJECT_ID)
        .correlation_id(&now_nanos().to_string())
        .message_metadata(&n.to_string())
        .body()
}

/// Makes calls `post(0)`, `post(1)`, … as `posting` says: from `posting.posters` workers, flat out or at a fixed
/// rate in all, until `posting.limit` calls or `posting.duration`; whether each call succeeded, and its latency.
pub async fn post_loop<F, Fut>(posting: Posting, post: F) -> Load
where
    F: Fn(u64) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = bool> + Send,
{
    let Posting {
        posters,
        rate,
        limit,
        duration,
    } = posting;
    let seq = Arc::new(AtomicU64::new(0));
    closed_loop(posters, duration, rate, move |_| {
        let n = seq.fetch_add(1, Ordering::Relaxed);
        if limit.is_some_and(|l| n >= l) {
            return None;
        }
        let post = post.clone();
        Some(async move { post(n).await })
    })
    .await
}

/// Opens `count` watches and keeps them open (quiet) until the returned streams are dropped.
pub async fn idle_watches(
    grpc: SocketAddr,
    count: usize,
    connections: usize,
) -> Vec<tonic::Streaming<pb::WatchCapabilityResponse>> {
    open_streams(&channels(grpc, connections).await, "idle", count).await
}

/// Opens watches of `{prefix}0` … `{prefix}{count-1}` spread over `channels`, 500 at a time.
async fn open_streams(
    channels: &[Channel],
    prefix: &str,
    count: usize,
) -> Vec<tonic::Streaming<pb::WatchCapabilityResponse>> {
    let mut streams = Vec::with_capacity(count);
    for chunk in (0..count).collect::<Vec<_>>().chunks(500) {
        let opened = futures::future::join_all(chunk.iter().map(|&i| {
            let mut client = CapabilityServiceClient::new(channels[i % channels.len()].clone());
            let request = pb::WatchCapabilityRequest {
                request_id: format!("{prefix}{i}"),
                after_offset: 0,
                wait: Some(prost_types::Duration { seconds: 600, nanos: 0 }),
            };
            async move {
                client
                    .watch_capability(request)
                    .await
                    .expect("the watch opens")
                    .into_inner()
            }
        }))
        .await;
        streams.extend(opened);
    }
    streams
}

/// The app every check of the benchmark goes through.
pub const CHECK_APP: &str = "bench-app";

/// The `i`-th identity of set `set`: ends in 1, so that the sandbox answers CAPABILITY_FULL (cached for 24 h).
pub fn check_identity(set: u32, i: usize) -> String {
    format!("46{set:02}{i:07}1")
}

/// A CheckCapability of one SMS identity, with the server's max_age and `wait`.
pub fn check_request(identity: &str, wait: Duration) -> pb::CheckCapabilityRequest {
    pb::CheckCapabilityRequest {
        app_id: CHECK_APP.into(),
        recipient: Some(pb::Recipient {
            recipient: Some(pb::recipient::Recipient::IdentifiedBy(pb::IdentifiedBy {
                channel_identities: vec![pb::ChannelIdentity {
                    channel: pb::Channel::Sms.into(),
                    identity: identity.to_owned(),
                    ..Default::default()
                }],
            })),
        }),
        wait: Some(prost_types::Duration {
            seconds: wait.as_secs() as i64,
            nanos: wait.subsec_nanos() as i32,
        }),
        ..Default::default()
    }
}

/// Whether a check's answer came whole from the cache.
fn from_cache(answer: &pb::CheckCapabilityResponse) -> bool {
    answer.complete
        && !answer.results.is_empty()
        && answer
            .results
            .iter()
            .all(|r| r.source == pb::ResultSource::Cache as i32)
}

/// CheckCapability from `workers` callers for `duration`, cycling through `identities` (cached ones): one call
/// after another, or at a fixed `rate` in all (an open loop: each caller keeps its own schedule; a call late
/// because the one before was slow counts from when it was due). An answer not whole from the cache counts as an
/// error.
pub async fn grpc_checks(
    addr: SocketAddr,
    workers: usize,
    connections: usize,
    rate: Option<u64>,
    duration: Duration,
    identities: Arc<Vec<String>>,
) -> Load {
    let channels = channels(addr, connections).await;
    let next = Arc::new(AtomicU64::new(0));
    closed_loop(workers, duration, rate, move |w| {
        let mut client = CapabilityServiceClient::new(channels[w % channels.len()].clone());
        let i = next.fetch_add(1, Ordering::Relaxed) as usize % identities.len();
        let request = check_request(&identities[i], Duration::from_secs(10));
        Some(
            async move { matches!(client.check_capability(request).await, Ok(answer) if from_cache(answer.get_ref())) },
        )
    })
    .await
}

/// How the answers of many checks of one identity were made.
#[derive(Debug, Default, Clone, Copy)]
pub struct Sources {
    /// Answered by the live query the check sent itself.
    pub live: u64,
    /// Answered by a live query another check sent.
    pub shared: u64,
    pub cache: u64,
    /// Answered without a result (pending), or failed.
    pub unanswered: u64,
    pub errors: u64,
    /// Distinct request_ids among the answers.
    pub request_ids: usize,
    /// From the first call to the last answer.
    pub seconds: f64,
}

/// `count` CheckCapability of `identity` at once, spread over `grpc` (round robin, `connections` to each): how
/// each was answered.
pub async fn concurrent_checks(grpc: &[SocketAddr], connections: usize, count: usize, identity: &str) -> Sources {
    let mut all = Vec::new();
    for addr in grpc {
        all.push(channels(*addr, connections).await);
    }
    let started = Instant::now();
    let calls = (0..count).map(|i| {
        let replica = &all[i % all.len()];
        let mut client = CapabilityServiceClient::new(replica[(i / all.len()) % replica.len()].clone());
        let request = check_request(identity, Duration::from_secs(10));
        tokio::spawn(async move { client.check_capability(request).await })
    });
    let answers = futures::future::join_all(calls).await;
    let mut sources = Sources {
        seconds: started.elapsed().as_secs_f64(),
        ..Sources::default()
    };
    let mut request_ids = std::collections::HashSet::new();
    for answer in answers {
        let Ok(Ok(answer)) = answer else {
            sources.errors += 1;
            continue;
        };
        let answer = answer.into_inner();
        if !answer.request_id.is_empty() {
            request_ids.insert(answer.request_id.clone());
        }
        match answer.results.first().map(|r| r.source) {
            Some(s) if s == pb::ResultSource::Live as i32 => sources.live += 1,
            Some(s) if s == pb::ResultSource::Shared as i32 => sources.shared += 1,
            Some(s) if s == pb::ResultSource::Cache as i32 => sources.cache += 1,
            _ => sources.unanswered += 1,
        }
    }
    sources.request_ids = request_ids.len();
    sources
}

/// Checks each of `identities` once, `concurrency` at a time, so that their results are cached; how many came back
/// complete.
pub async fn warm_checks(addr: SocketAddr, identities: &[String], concurrency: usize) -> usize {
    let channels = channels(addr, 4).await;
    let mut complete = 0;
    for (n, chunk) in identities.chunks(concurrency.max(1)).enumerate() {
        let answers = futures::future::join_all(chunk.iter().enumerate().map(|(i, identity)| {
            let mut client = CapabilityServiceClient::new(channels[(n + i) % channels.len()].clone());
            let request = check_request(identity, Duration::from_secs(10));
            async move { client.check_capability(request).await }
        }))
        .await;
        complete += answers
            .iter()
            .filter(|a| matches!(a, Ok(answer) if answer.get_ref().complete))
            .count();
    }
    complete
}
