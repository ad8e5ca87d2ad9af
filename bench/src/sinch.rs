//! `bench sinch`: how the client and the sandbox behave towards Sinch's limits, each against a baseline measured
//! in the same run.
//! - Pacing: the sandbox paces an app's callbacks at its `rate_limits.webhooks` (25/s): the mean gap between
//!   callbacks arriving at a receiver, paced and unpaced (the baseline: a rate no query load reaches).
//! - Token cold start: N replicas start at once against a token endpoint that is a token bucket like Sinch's
//!   (capacity 30, refill 10/s, 429 without `Retry-After`); each obtains its token with the client's token
//!   back-off (3 tries, 1 s × 4ⁿ full jitter) or with the baseline (5 tries from 50 ms, the query back-off's
//!   pace): requests sent per token obtained, and how many replicas have a token within 10 s.

use std::{
    net::SocketAddr,
    num::NonZeroU32,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use axum::{Router, extract::State, http::StatusCode, response::IntoResponse, routing::post};
use capability_facade::{
    config::{AuthMode, SandboxSettings, SinchConfig},
    sandbox::{self, SandboxConfig, webhooks::Destination},
    secret::Secret,
    upstream::{RetryPolicy, SinchClient, TokenRetry},
};
use clap::Parser;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// The sizes of one run.
#[derive(Debug, Clone, clap::Args)]
pub struct SinchPlan {
    /// Callbacks per pacing measurement.
    #[arg(long, default_value_t = 100)]
    pub callbacks: usize,
    /// Replicas starting cold at once.
    #[arg(long, default_value_t = 100)]
    pub replicas: usize,
}

/// Serves `router` on a free loopback port until `stop`; returns its address.
async fn serve(router: Router, stop: CancellationToken) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("a loopback port");
    let addr = listener.local_addr().expect("bound");
    tokio::spawn(async move {
        axum::serve(listener, router)
            .with_graceful_shutdown(stop.cancelled_owned())
            .await
    });
    addr
}

#[derive(Parser)]
struct Knobs {
    #[command(flatten)]
    knobs: SandboxSettings,
}

/// The mean gap between `callbacks` callbacks (20 queries of 5 channels each), received at a bare receiver
/// from a sandbox whose apps' webhook rate is `rate`.
async fn mean_callback_gap(rate: u32, callbacks: usize) -> Duration {
    let stop = CancellationToken::new();
    let arrivals = Arc::new(Mutex::new(Vec::<Instant>::new()));
    let receiver = Router::new()
        .route(
            "/webhooks/sinch",
            post(|State(arrivals): State<Arc<Mutex<Vec<Instant>>>>| async move {
                arrivals.lock().expect("arrivals").push(Instant::now());
                StatusCode::OK
            }),
        )
        .with_state(arrivals.clone());
    let receiver = serve(receiver, stop.clone()).await;
    let flags = ["sandbox", "--sandbox-callback-delay=0s"];
    let mut knobs = Knobs::parse_from(flags).knobs;
    knobs.webhook_rate = rate;
    let default_webhook = Destination {
        target: format!("http://{receiver}/webhooks/sinch"),
        secret: Secret::new("bench"),
    };
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("a loopback port");
    let url = format!("http://{}", listener.local_addr().expect("bound"));
    tokio::spawn(sandbox::serve(
        listener,
        SandboxConfig::new(knobs, Some(default_webhook)),
        stop.clone(),
    ));
    capability_facade::upstream::install_crypto_provider();
    let http = reqwest::Client::new();
    let queries = callbacks.div_ceil(5);
    for q in 0..queries {
        let identities: Vec<_> = ["SMS", "RCS", "WHATSAPP", "VIBERBM", "MESSENGER"]
            .iter()
            .map(|c| serde_json::json!({"channel": c, "identity": format!("4670000{q:04}1")}))
            .collect();
        let body = serde_json::json!({"app_id": "bench-app", "recipient": {"identified_by": {"channel_identities": identities}}});
        let status = http
            .post(format!("{url}/v1/projects/{}/capability:query", sandbox::PROJECT_ID))
            .basic_auth(sandbox::KEY_ID, Some(sandbox::KEY_SECRET))
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
            .await
            .expect("the sandbox answers")
            .status();
        assert!(status.is_success(), "the sandbox refused a query: {status}");
    }
    let expected = queries * 5;
    let deadline = Instant::now() + Duration::from_secs(60);
    while arrivals.lock().expect("arrivals").len() < expected && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.cancel();
    let arrivals = arrivals.lock().expect("arrivals").clone();
    assert_eq!(arrivals.len(), expected, "every callback arrived");
    (arrivals[expected - 1] - arrivals[0]) / (expected as u32 - 1)
}

/// A token bucket like Sinch's token endpoint: capacity 30, refill 10/s, 429 without `Retry-After`.
struct Bucket {
    state: Mutex<(f64, Instant)>,
    requests: AtomicU64,
}

async fn token(State(bucket): State<Arc<Bucket>>) -> axum::response::Response {
    bucket.requests.fetch_add(1, Ordering::Relaxed);
    let granted = {
        let mut state = bucket.state.lock().expect("bucket");
        let now = Instant::now();
        state.0 = (state.0 + now.duration_since(state.1).as_secs_f64() * 10.0).min(30.0);
        state.1 = now;
        let granted = state.0 >= 1.0;
        if granted {
            state.0 -= 1.0;
        }
        granted
    };
    let body = if granted {
        serde_json::json!({"access_token": ulid::Ulid::new().to_string(), "token_type": "bearer",
            "expires_in": 3600, "scope": ""})
    } else {
        serde_json::json!({"error": "too_many_requests", "error_description": "rate limited"})
    };
    let status = if granted {
        StatusCode::OK
    } else {
        StatusCode::TOO_MANY_REQUESTS
    };
    (status, [("content-type", "application/json")], body.to_string()).into_response()
}

/// The herd: `replicas` cold clients at once; returns (requests sent, tokens obtained within 10 s).
async fn herd(replicas: usize, retry: TokenRetry) -> (u64, usize) {
    let stop = CancellationToken::new();
    let bucket = Arc::new(Bucket {
        state: Mutex::new((30.0, Instant::now())),
        requests: AtomicU64::new(0),
    });
    let router = Router::new()
        .route("/oauth2/token", post(token))
        .with_state(bucket.clone());
    let addr = serve(router, stop.clone()).await;
    let config = SinchConfig {
        project_id: "bench".into(),
        key_id: "bench".into(),
        key_secret: Secret::new("bench"),
        auth: AuthMode::OAuth2,
        api_url: format!("http://{addr}"),
        auth_url: format!("http://{addr}/oauth2/token"),
        rate_limit: NonZeroU32::new(800).expect("not 0"),
    };
    let clients: Vec<SinchClient> = (0..replicas)
        .map(|_| SinchClient::new(&config, RetryPolicy::default(), retry).expect("a client"))
        .collect();
    let outcomes = futures::future::join_all(clients.iter().map(SinchClient::obtain_token)).await;
    stop.cancel();
    let obtained = outcomes.iter().filter(|o| o.is_ok()).count();
    (bucket.requests.load(Ordering::Relaxed), obtained)
}

/// Runs both measurements and returns the report (markdown).
pub async fn run(plan: &SinchPlan) -> String {
    let paced = mean_callback_gap(25, plan.callbacks).await;
    let unpaced = mean_callback_gap(1_000_000, plan.callbacks).await;
    let ours = TokenRetry::default();
    let baseline = TokenRetry {
        tries: 5,
        base: Duration::from_millis(50),
    };
    let (ours_requests, ours_obtained) = herd(plan.replicas, ours).await;
    let (base_requests, base_obtained) = herd(plan.replicas, baseline).await;
    let per_token = |requests: u64, obtained: usize| requests as f64 / obtained.max(1) as f64;
    let (ours_per, base_per) = (
        per_token(ours_requests, ours_obtained),
        per_token(base_requests, base_obtained),
    );
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    format!(
        "| what | measured | baseline (same run) | ratio |\n|---|---:|---:|---:|\n\
         | mean gap between callbacks, webhook rate 25/s ({n} callbacks) | {:.1} ms | unpaced {:.2} ms | {:.0}× the baseline; {:.2}× the expected 40 ms |\n\
         | token cold start, {r} replicas: requests per token obtained | {:.2} ({ours_requests} requests) | {:.2} ({base_requests} requests) | {:.2} |\n\
         | … replicas holding a token after their tries | {ours_obtained} of {r} | {base_obtained} of {r} | {:.2} |\n",
        ms(paced),
        ms(unpaced),
        paced.as_secs_f64() / unpaced.as_secs_f64().max(1e-9),
        ms(paced) / 40.0,
        ours_per,
        base_per,
        ours_per / base_per,
        ours_obtained as f64 / base_obtained.max(1) as f64,
        n = plan.callbacks,
        r = plan.replicas,
    )
}
