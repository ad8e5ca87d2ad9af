//! The `check` scenario (CheckCapability, issue 13): cache hits against the bare tonic echo, cache hits with Redis
//! at a fixed rate, coalescing of identical checks (within a replica and across three sharing a Redis) counted at
//! an upstream that counts, and QueryCapability against the bare proxy baseline. Targets live here and in
//! BENCHMARKS.md only.

use std::{
    fmt::Write as _,
    net::SocketAddr,
    sync::{
        Arc, OnceLock,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use axum::{
    Router,
    body::Bytes,
    extract::State,
    http::{HeaderMap, Method, StatusCode, Uri, header},
    response::{IntoResponse, Response},
};
use testkit::{Binary, free_port};

use crate::{
    Plan, Report, procs,
    scenarios::{self, SECRET, Sources},
};

/// The sandbox's delay between a query and its callbacks: long enough that every check of a coalescing round is
/// in flight before the first result arrives (Sinch takes seconds).
const CALLBACK_DELAY: &str = "1s";

/// Targets (BENCHMARKS.md, issue 13).
const HIT_VS_ECHO_THROUGHPUT: f64 = 0.7;
const HIT_P50_ADDED_US: f64 = 50.0;
const REDIS_HIT_P99_US: f64 = 2_000.0;
const FACADE_VS_PROXY_THROUGHPUT: f64 = 0.8;

/// An HTTP upstream in this process that forwards everything to the sandbox and counts the capability queries
/// that reach it.
struct CountingUpstream {
    server: procs::Served,
    queries: Arc<AtomicU64>,
    target: Arc<OnceLock<String>>,
}

struct Forward {
    http: reqwest::Client,
    queries: Arc<AtomicU64>,
    target: Arc<OnceLock<String>>,
}

impl CountingUpstream {
    async fn start() -> CountingUpstream {
        let (queries, target) = (Arc::new(AtomicU64::new(0)), Arc::new(OnceLock::new()));
        let state = Arc::new(Forward {
            http: scenarios::http_client(64),
            queries: queries.clone(),
            target: target.clone(),
        });
        let router = Router::new().fallback(forward).with_state(state);
        CountingUpstream {
            server: procs::Served::start(router).await,
            queries,
            target,
        }
    }

    fn url(&self) -> String {
        format!("http://{}", self.server.addr)
    }

    fn queries(&self) -> u64 {
        self.queries.load(Ordering::SeqCst)
    }
}

async fn forward(
    State(up): State<Arc<Forward>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if method == Method::POST && uri.path().ends_with("/capability:query") {
        up.queries.fetch_add(1, Ordering::SeqCst);
    }
    let Some(target) = up.target.get() else {
        return StatusCode::SERVICE_UNAVAILABLE.into_response();
    };
    let path = uri.path_and_query().map_or("/", |p| p.as_str());
    let mut request = up.http.request(method, format!("{target}{path}")).body(body);
    for name in [header::AUTHORIZATION, header::CONTENT_TYPE, header::ACCEPT] {
        if let Some(value) = headers.get(&name) {
            request = request.header(name, value);
        }
    }
    match request.send().await {
        Ok(response) => {
            let status = response.status();
            let content_type = response.headers().get(header::CONTENT_TYPE).cloned();
            let body = response.bytes().await.unwrap_or_default();
            let mut answer = (status, body).into_response();
            if let Some(content_type) = content_type {
                answer.headers_mut().insert(header::CONTENT_TYPE, content_type);
            }
            answer
        }
        Err(_) => StatusCode::BAD_GATEWAY.into_response(),
    }
}

/// A facade whose Sinch is at `upstream` (the sandbox's credentials), that verifies the harness's callbacks.
fn facade_env(upstream: &str) -> Vec<(&'static str, String)> {
    vec![
        ("SINCH_PROJECT_ID", "sandbox-project".into()),
        ("SINCH_KEY_ID", "sandbox-key".into()),
        ("SINCH_KEY_SECRET", "sandbox-secret".into()),
        ("SINCH_API_URL", upstream.to_owned()),
        ("SINCH_AUTH_URL", format!("{upstream}/oauth2/token")),
        ("SINCH_WEBHOOK_SECRETS", SECRET.into()),
        ("SINCH_RATE_LIMIT", "1000000".into()),
    ]
}

/// Replicas behind a counting upstream in front of a sandbox that posts its callbacks (unpaced, after
/// [`CALLBACK_DELAY`]) to the first replica's webhook; with `redis`, the replicas share it.
struct Setup {
    upstream: CountingUpstream,
    replicas: Vec<Binary>,
    _sandbox: testkit::Spawned<SocketAddr>,
}

impl Setup {
    async fn start(replicas: usize, redis: Option<String>) -> Setup {
        let upstream = CountingUpstream::start().await;
        let mut env = facade_env(&upstream.url());
        env.extend(redis.map(|url| ("CAPABILITY_REDIS_URL", url)));
        let mut started = Vec::new();
        for _ in 0..replicas {
            started.push(procs::facade(&env).await);
        }
        let args = [
            "--callback-url".to_owned(),
            testkit::webhook_url(started[0].webhook_addr),
            "--webhook-secret".to_owned(),
            SECRET.to_owned(),
            "--sandbox-webhook-rate".to_owned(),
            "1000000".to_owned(),
            "--callback-delay".to_owned(),
            CALLBACK_DELAY.to_owned(),
        ];
        let sandbox = procs::sandbox_with(SocketAddr::from(([127, 0, 0, 1], free_port())), &args).await;
        let _ = upstream.target.set(format!("http://{}", sandbox.ready));
        Setup {
            upstream,
            replicas: started,
            _sandbox: sandbox,
        }
    }

    fn grpc(&self) -> Vec<SocketAddr> {
        self.replicas.iter().map(|r| r.grpc_addr).collect()
    }

    /// Upstream queries as the replicas count them (`capability_upstream_request_duration_seconds_count`).
    async fn counted_by_replicas(&self) -> u64 {
        let mut sum = 0.0;
        for replica in &self.replicas {
            let metrics = match reqwest::get(format!("http://{}/metrics", replica.admin_addr)).await {
                Ok(response) => response.text().await.unwrap_or_default(),
                Err(_) => String::new(),
            };
            sum += metrics
                .lines()
                .filter(|l| l.starts_with("capability_upstream_request_duration_seconds_count"))
                .filter_map(|l| l.rsplit(' ').next()?.trim().parse::<f64>().ok())
                .sum::<f64>();
        }
        sum as u64
    }

    /// Warms `identities` on the first replica; says so when some did not come back complete.
    async fn warm(&self, identities: &[String]) {
        let complete = scenarios::warm_checks(self.replicas[0].grpc_addr, identities, 500).await;
        if complete < identities.len() {
            eprintln!(
                "   warming: only {complete} of {} checks came back complete",
                identities.len()
            );
        }
    }

    /// `count` checks at once of a fresh identity, spread over every replica; reported under `name`.
    async fn coalesce(&self, report: &mut Report, name: &str, count: usize, identity: &str) {
        let (before, before_replicas) = (self.upstream.queries(), self.counted_by_replicas().await);
        let sources = scenarios::concurrent_checks(&self.grpc(), 4, count, identity).await;
        // The upstream has answered every query by now (the checks waited for its callbacks); a moment for the
        // replicas' metrics.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let queries = self.upstream.queries() - before;
        let by_replicas = self.counted_by_replicas().await - before_replicas;
        report.add(&format!("{name}: queries at the upstream"), queries as f64);
        report.add(&format!("{name}: queries the replicas sent"), by_replicas as f64);
        let Sources {
            live,
            shared,
            cache,
            unanswered,
            errors,
            request_ids,
            seconds,
        } = sources;
        report.add(&format!("{name}: answers live"), live as f64);
        report.add(&format!("{name}: answers shared"), shared as f64);
        report.add(&format!("{name}: answers from cache"), cache as f64);
        if unanswered + errors > 0 {
            report.add(&format!("{name}: answers pending"), unanswered as f64);
            report.add(&format!("{name}: errors"), errors as f64);
        }
        report.add(&format!("{name}: distinct request_ids"), request_ids as f64);
        report.add(&format!("{name}: ms until the last answer"), seconds * 1000.0);
    }
}

/// The whole scenario.
pub async fn run(plan: &Plan, report: &mut Report) {
    let warmup = plan.duration / 5;
    let workers = plan.query_workers;
    let identities: Arc<Vec<String>> = Arc::new(
        (0..plan.check_identities)
            .map(|i| scenarios::check_identity(1, i))
            .collect(),
    );
    let round = ulid::Ulid::new().0 as u32 % 90 + 10;

    // 1. Cache hits on one replica (in-process cache) against the bare echo, at the same client concurrency.
    {
        let setup = Setup::start(1, None).await;
        setup.warm(&identities).await;
        let facade = setup.replicas[0].grpc_addr;
        let echo = procs::baseline("echo").await;
        scenarios::grpc_queries(echo.ready, workers, 4, warmup).await;
        let load = scenarios::grpc_queries(echo.ready, workers, 4, plan.duration).await;
        report.load("check echo", &load);
        scenarios::grpc_checks(facade, workers, 4, None, warmup, identities.clone()).await;
        let load = scenarios::grpc_checks(facade, workers, 4, None, plan.duration, identities.clone()).await;
        report.load("check cache hit", &load);
        let load = scenarios::grpc_queries(echo.ready, 1, 1, plan.duration / 2).await;
        report.load("check echo, 1 worker", &load);
        let load = scenarios::grpc_checks(facade, 1, 1, None, plan.duration / 2, identities.clone()).await;
        report.load("check cache hit, 1 worker", &load);
        drop(echo);
        // 3a. Coalescing within the replica.
        let identity = scenarios::check_identity(round, 0);
        setup
            .coalesce(report, "coalescing, 1 replica", plan.coalesced_checks, &identity)
            .await;
    }

    // 2. and 3b. Three replicas sharing a Redis (the cache lives there).
    {
        let redis = testkit::RedisServer::start().await;
        let setup = Setup::start(3, Some(redis.url())).await;
        setup.warm(&identities).await;
        let facade = setup.replicas[0].grpc_addr;
        scenarios::grpc_checks(facade, workers, 4, None, warmup, identities.clone()).await;
        let load = scenarios::grpc_checks(
            facade,
            workers,
            4,
            Some(plan.check_rate),
            plan.duration,
            identities.clone(),
        )
        .await;
        report.load(&format!("check cache hit with Redis at {}/s", plan.check_rate), &load);
        let load = scenarios::grpc_checks(facade, 1, 1, None, plan.duration / 2, identities.clone()).await;
        report.load("check cache hit with Redis, 1 worker", &load);
        let identity = scenarios::check_identity(round, 1);
        setup
            .coalesce(
                report,
                "coalescing, 3 replicas + Redis",
                plan.coalesced_checks,
                &identity,
            )
            .await;
    }

    // 4. QueryCapability: the facade, the bare proxy and the sandbox directly (no callbacks).
    {
        let sandbox = procs::sandbox().await;
        let sinch = format!("http://{}", sandbox.ready);
        let facade = procs::facade(&facade_env(&sinch)).await;
        let proxy = procs::baseline_with("proxy", &["--upstream", &sinch]).await;
        scenarios::grpc_queries(facade.grpc_addr, workers, 4, warmup).await;
        let load = scenarios::grpc_queries(facade.grpc_addr, workers, 4, plan.duration).await;
        report.load("check query facade", &load);
        scenarios::grpc_queries(proxy.ready, workers, 4, warmup).await;
        let load = scenarios::grpc_queries(proxy.ready, workers, 4, plan.duration).await;
        report.load("check query proxy", &load);
        scenarios::http_queries(sandbox.ready, workers, warmup).await;
        let load = scenarios::http_queries(sandbox.ready, workers, plan.duration).await;
        report.load("check query direct", &load);
        let load = scenarios::grpc_queries(facade.grpc_addr, 1, 1, plan.duration / 2).await;
        report.load("check query facade, 1 worker", &load);
        let load = scenarios::grpc_queries(proxy.ready, 1, 1, plan.duration / 2).await;
        report.load("check query proxy, 1 worker", &load);
        let load = scenarios::http_queries(sandbox.ready, 1, plan.duration / 2).await;
        report.load("check query direct, 1 worker", &load);
    }
}

/// The scenario's ratios and targets, when it ran.
pub fn markdown(report: &Report, plan: &Plan, out: &mut String) {
    if report.values.iter().all(|(name, _)| name != "check cache hit ops/s") {
        return;
    }
    let m = |name: &str| report.median(name);
    let verdict = |met: bool| if met { "met" } else { "missed" };
    let _ = writeln!(
        out,
        "\n| CheckCapability (issue 13) | value | target | |\n|---|---:|---|---|"
    );
    let hit_ratio = m("check cache hit ops/s") / m("check echo ops/s");
    let _ = writeln!(
        out,
        "| cache hit / echo throughput ({} callers) | {hit_ratio:.2} ({:.0}/s vs {:.0}/s) | ≥ {HIT_VS_ECHO_THROUGHPUT} | {} |",
        plan.query_workers,
        m("check cache hit ops/s"),
        m("check echo ops/s"),
        verdict(hit_ratio >= HIT_VS_ECHO_THROUGHPUT)
    );
    for suffix in ["", ", 1 worker"] {
        let added = m(&format!("check cache hit{suffix} p50 µs")) - m(&format!("check echo{suffix} p50 µs"));
        let callers = if suffix.is_empty() {
            format!("{} callers", plan.query_workers)
        } else {
            "1 caller".to_owned()
        };
        let _ = writeln!(
            out,
            "| cache hit p50 − echo p50 ({callers}) | {added:.0} µs ({:.0} vs {:.0} µs) | ≤ {HIT_P50_ADDED_US} µs | {} |",
            m(&format!("check cache hit{suffix} p50 µs")),
            m(&format!("check echo{suffix} p50 µs")),
            verdict(added <= HIT_P50_ADDED_US)
        );
    }
    let paced = format!("check cache hit with Redis at {}/s", plan.check_rate);
    let p99 = m(&format!("{paced} p99 µs"));
    let _ = writeln!(
        out,
        "| cache hit with Redis at {}/s offered: p99 (p50; achieved) | {p99:.0} µs ({:.0} µs; {:.0}/s) | ≤ {REDIS_HIT_P99_US} µs | {} |",
        plan.check_rate,
        m(&format!("{paced} p50 µs")),
        m(&format!("{paced} ops/s")),
        verdict(p99 <= REDIS_HIT_P99_US)
    );
    let _ = writeln!(
        out,
        "| cache hit with Redis, 1 caller: p50 / p99 | {:.0} / {:.0} µs | | |",
        m("check cache hit with Redis, 1 worker p50 µs"),
        m("check cache hit with Redis, 1 worker p99 µs")
    );
    for name in ["coalescing, 1 replica", "coalescing, 3 replicas + Redis"] {
        let queries = m(&format!("{name}: queries at the upstream"));
        let _ = writeln!(
            out,
            "| {name}: {} checks of one identity → queries at the upstream (as the replicas count) | {queries:.0} ({:.0}) | 1 | {} |",
            plan.coalesced_checks,
            m(&format!("{name}: queries the replicas sent")),
            verdict(queries == 1.0)
        );
        let pending = m(&format!("{name}: answers pending"));
        if pending > 0.0 {
            let _ = writeln!(
                out,
                "| … of which answered without a result (pending at the check's wait), in {:.0} ms; distinct request_ids | {pending:.0}; {:.0} | 0; 1 | missed |",
                m(&format!("{name}: ms until the last answer")),
                m(&format!("{name}: distinct request_ids"))
            );
        }
    }
    let proxy_ratio = m("check query facade ops/s") / m("check query proxy ops/s");
    let _ = writeln!(
        out,
        "| QueryCapability facade / bare proxy throughput ({} callers) | {proxy_ratio:.2} ({:.0}/s vs {:.0}/s) | ≥ {FACADE_VS_PROXY_THROUGHPUT} | {} |",
        plan.query_workers,
        m("check query facade ops/s"),
        m("check query proxy ops/s"),
        verdict(proxy_ratio >= FACADE_VS_PROXY_THROUGHPUT)
    );
    let _ = writeln!(
        out,
        "| QueryCapability facade / direct throughput (same run) | {:.2} (direct {:.0}/s) | | |",
        m("check query facade ops/s") / m("check query direct ops/s"),
        m("check query direct ops/s")
    );
    let _ = writeln!(
        out,
        "| QueryCapability p50, 1 caller: facade − bare proxy | {:.0} µs ({:.0} vs {:.0} µs; direct {:.0} µs) | | |",
        m("check query facade, 1 worker p50 µs") - m("check query proxy, 1 worker p50 µs"),
        m("check query facade, 1 worker p50 µs"),
        m("check query proxy, 1 worker p50 µs"),
        m("check query direct, 1 worker p50 µs")
    );
}
