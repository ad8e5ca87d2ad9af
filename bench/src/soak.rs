//! The soak: a steady stream of signed callbacks into one replica with a constant number of open watches, for
//! a long time, sampling the process's resident memory and file descriptors; then, once the retention has
//! passed, checks that the hub let everything go.
//!
//! Each request (`soak-{k}`, k increasing) gets three callbacks (SMS, RCS, WHATSAPP), as a real query would.
//! Watcher slot j watches requests j, j + W, j + 2W, … in turn: it opens a watch (before or after the callbacks
//! arrive: live or replayed), reads the three notifications, lets the stream go and opens the next, so W watches
//! are open at all times. Every callback acknowledged 200 must reach its watcher exactly once.

use std::{
    fmt::Write as _,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use capability_facade::grpc::pb::{self, capability_service_client::CapabilityServiceClient};
use tokio_util::sync::CancellationToken;

use testkit::{Binary, CapabilityCallback};

use crate::{
    procs,
    scenarios::{self, SECRET},
};

const CHANNELS: [&str; 3] = ["SMS", "RCS", "WHATSAPP"];

/// How long and how hard.
#[derive(Debug, clap::Args)]
pub struct SoakPlan {
    #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// Callbacks per second.
    #[arg(long, default_value_t = 5_000)]
    pub rate: u64,
    /// Watches open at all times.
    #[arg(long, default_value_t = 1_000)]
    pub watches: usize,
    /// The service's CAPABILITY_RETENTION.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    pub retention: Duration,
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub sample_every: Duration,
    /// From when RSS must be level: the hub fills for one retention, the nonces for one webhook tolerance
    /// (5 minutes by default).
    #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
    pub warm_up: Duration,
}

/// One sample of the process.
struct Sample {
    at: Duration,
    rss: u64,
    fds: usize,
    retained: f64,
    watches: f64,
}

/// Runs the soak; returns its report (markdown) and whether it kept its promises: nothing acknowledged lost,
/// nothing duplicated, every watcher done, nothing retained once the retention passed.
pub async fn run(plan: &SoakPlan) -> (String, bool) {
    capability_facade::upstream::install_crypto_provider();
    let facade = procs::facade(&[
        ("SINCH_WEBHOOK_SECRETS", SECRET.into()),
        (
            "CAPABILITY_RETENTION",
            humantime::format_duration(plan.retention).to_string(),
        ),
        ("CAPABILITY_WATCH_WAIT", "30s".into()),
    ])
    .await;
    let (grpc, webhook, admin) = (facade.grpc_addr, facade.webhook_addr, facade.admin_addr);
    let stop = CancellationToken::new();
    let posted = Arc::new(AtomicU64::new(0));
    let acked = Arc::new(AtomicU64::new(0));
    let refused = Arc::new(AtomicU64::new(0));
    let delivered = Arc::new(AtomicU64::new(0));
    let duplicated = Arc::new(AtomicU64::new(0));
    let next = Arc::new(AtomicU64::new(0));

    let channels = scenarios::channels(grpc, 8).await;
    let watchers: Vec<_> = (0..plan.watches)
        .map(|slot| {
            let client = CapabilityServiceClient::new(channels[slot % channels.len()].clone());
            let (stop, next, delivered, duplicated) =
                (stop.clone(), next.clone(), delivered.clone(), duplicated.clone());
            let stride = plan.watches as u64;
            tokio::spawn(async move {
                let mut k = slot as u64;
                // Watch until told to stop and every request this slot owns that was posted is read.
                while !stop.is_cancelled() || k < next.load(Ordering::Relaxed) {
                    watch_one(client.clone(), k, &delivered, &duplicated).await;
                    k += stride;
                }
            })
        })
        .collect();

    let started = Instant::now();
    let poster = tokio::spawn(post(
        webhook,
        plan.rate,
        plan.duration,
        next.clone(),
        [posted.clone(), acked.clone(), refused.clone()],
    ));
    let mut samples = Vec::new();
    let mut tick = tokio::time::interval(plan.sample_every);
    while started.elapsed() < plan.duration {
        tick.tick().await;
        samples.push(sample(&facade, admin, started.elapsed()).await);
    }
    poster.await.expect("the poster ends");
    stop.cancel();
    let drained = Instant::now();
    let settled = async {
        for watcher in watchers {
            watcher.await.expect("a watcher ends");
        }
    };
    let settled = tokio::time::timeout(Duration::from_secs(120), settled).await.is_ok();
    let drain_took = drained.elapsed();
    let end_of_load = sample(&facade, admin, started.elapsed()).await;
    // Everything idle now: after the retention (and a purge tick) nothing may be retained.
    tokio::time::sleep(plan.retention + Duration::from_secs(5)).await;
    let after_retention = sample(&facade, admin, started.elapsed()).await;

    let (posted, acked, refused) = (
        posted.load(Ordering::Relaxed),
        acked.load(Ordering::Relaxed),
        refused.load(Ordering::Relaxed),
    );
    let (delivered, duplicated) = (delivered.load(Ordering::Relaxed), duplicated.load(Ordering::Relaxed));
    let kept = acked == delivered && duplicated == 0 && settled && after_retention.retained == 0.0;
    let report = report(
        plan,
        &samples,
        &end_of_load,
        &after_retention,
        [posted, acked, refused, delivered, duplicated],
        settled.then_some(drain_took),
    );
    (report, kept)
}

/// Watches request `k` until its three notifications arrived (or the watch ended); counts them.
async fn watch_one(
    mut client: CapabilityServiceClient<tonic::transport::Channel>,
    k: u64,
    delivered: &AtomicU64,
    duplicated: &AtomicU64,
) {
    let request = pb::WatchCapabilityRequest {
        request_id: format!("soak-{k}"),
        after_offset: 0,
        wait: Some(prost_types::Duration { seconds: 30, nanos: 0 }),
    };
    let Ok(stream) = client.watch_capability(request).await else {
        return;
    };
    let mut stream = stream.into_inner();
    let mut seen = [false; CHANNELS.len()];
    while seen.iter().any(|s| !s) {
        let Ok(Some(message)) = stream.message().await else {
            return;
        };
        if let Some(pb::watch_capability_response::Event::Notification(n)) = message.event
            && let Some(i) = CHANNELS.iter().position(|c| *c == n.channel_raw)
        {
            if seen[i] {
                duplicated.fetch_add(1, Ordering::Relaxed);
            } else {
                seen[i] = true;
                delivered.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// Posts three callbacks per request at `rate` callbacks per second in all, for `duration`; `next` is the
/// first request not yet started. Counters: [posted, acknowledged 200, refused].
async fn post(webhook: SocketAddr, rate: u64, duration: Duration, next: Arc<AtomicU64>, counters: [Arc<AtomicU64>; 3]) {
    let posters = 32usize;
    let http = scenarios::http_client(posters);
    let url = scenarios::webhook_url(webhook);
    let per_request = CHANNELS.len() as u64;
    let requests_per_second = rate as f64 / per_request as f64;
    let started = Instant::now();
    let tasks: Vec<_> = (0..posters)
        .map(|_| {
            let (http, url, next, counters) = (http.clone(), url.clone(), next.clone(), counters.clone());
            tokio::spawn(async move {
                loop {
                    let k = next.fetch_add(1, Ordering::Relaxed);
                    let due = started + Duration::from_secs_f64(k as f64 / requests_per_second);
                    if due - started >= duration {
                        next.fetch_sub(1, Ordering::Relaxed);
                        return;
                    }
                    tokio::time::sleep_until(due.into()).await;
                    for channel in CHANNELS {
                        counters[0].fetch_add(1, Ordering::Relaxed);
                        let ok = deliver(&http, &url, k, channel).await;
                        counters[if ok { 1 } else { 2 }].fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.expect("a poster ends");
    }
}

/// Posts one callback, retrying as Sinch does (up to five times) while it is refused; whether it was acked.
async fn deliver(http: &reqwest::Client, url: &reqwest::Url, k: u64, channel: &str) -> bool {
    let body = CapabilityCallback::new(&format!("soak-{k}"), channel, "46700000001", "CAPABILITY_FULL")
        .app_id("soak-app")
        .project_id("soak")
        .body();
    for _ in 0..5 {
        if scenarios::post_signed(http, url, body.clone()).await {
            return true;
        }
    }
    false
}

async fn sample(facade: &Binary, admin: SocketAddr, at: Duration) -> Sample {
    let fds = std::fs::read_dir(format!("/proc/{}/fd", facade.pid())).map_or(0, Iterator::count);
    let metrics = reqwest::get(format!("http://{admin}/metrics"))
        .await
        .ok()
        .map(reqwest::Response::text);
    let metrics = match metrics {
        Some(text) => text.await.unwrap_or_default(),
        None => String::new(),
    };
    let gauge = |name: &str| {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse::<f64>().ok())
            .unwrap_or(f64::NAN)
    };
    Sample {
        at,
        rss: procs::rss(facade.pid()),
        fds,
        retained: gauge("capability_retained_requests"),
        watches: gauge("capability_active_watches"),
    }
}

fn report(
    plan: &SoakPlan,
    samples: &[Sample],
    end_of_load: &Sample,
    after_retention: &Sample,
    [posted, acked, refused, delivered, duplicated]: [u64; 5],
    drain: Option<Duration>,
) -> String {
    let mib = |b: u64| b as f64 / 1048576.0;
    let warm: Vec<&Sample> = samples.iter().filter(|s| s.at >= plan.warm_up).collect();
    let (first, last) = (warm.first(), warm.last());
    let max = warm.iter().map(|s| s.rss).max().unwrap_or(0);
    let min = warm.iter().map(|s| s.rss).min().unwrap_or(0);
    let mut out = String::new();
    let _ = writeln!(
        out,
        "Soak: {} callbacks/s for {}, {} watches open, retention {}.\n",
        plan.rate,
        humantime::format_duration(plan.duration),
        plan.watches,
        humantime::format_duration(plan.retention)
    );
    let _ = writeln!(out, "| count | value |\n|---|---|");
    let seconds = plan.duration.as_secs_f64();
    let _ = writeln!(
        out,
        "| callbacks posted | {posted} ({:.0}/s) |",
        posted as f64 / seconds
    );
    let _ = writeln!(out, "| acknowledged 200 | {acked} |");
    let _ = writeln!(out, "| refused after 5 tries | {refused} |");
    let _ = writeln!(out, "| delivered to a watcher | {delivered} |");
    let _ = writeln!(
        out,
        "| lost (acked − delivered) | {} |",
        acked as i64 - delivered as i64
    );
    let _ = writeln!(out, "| duplicated | {duplicated} |");
    let _ = writeln!(
        out,
        "| watchers done after the load | {} |",
        drain.map_or("no (timed out after 120 s)".into(), |d| format!("in {d:.1?}"))
    );
    let _ = writeln!(
        out,
        "| RSS after warm-up ({}): first / last / min / max MiB | {:.1} / {:.1} / {:.1} / {:.1} |",
        humantime::format_duration(plan.warm_up),
        first.map_or(0.0, |s| mib(s.rss)),
        last.map_or(0.0, |s| mib(s.rss)),
        mib(min),
        mib(max)
    );
    let _ = writeln!(
        out,
        "| file descriptors after warm-up: first / last / max | {} / {} / {} |",
        first.map_or(0, |s| s.fds),
        last.map_or(0, |s| s.fds),
        warm.iter().map(|s| s.fds).max().unwrap_or(0)
    );
    let _ = writeln!(
        out,
        "| retained requests: end of load / one retention later | {} / {} |",
        end_of_load.retained, after_retention.retained
    );
    let _ = writeln!(
        out,
        "| RSS and fds one retention later | {:.1} MiB, {} fds |",
        mib(after_retention.rss),
        after_retention.fds
    );
    let _ = writeln!(
        out,
        "\n| t (s) | RSS MiB | fds | retained requests | open watches |\n|---|---|---|---|---|"
    );
    for s in samples.iter().chain([end_of_load, after_retention]) {
        let _ = writeln!(
            out,
            "| {:.0} | {:.1} | {} | {} | {} |",
            s.at.as_secs_f64(),
            mib(s.rss),
            s.fds,
            s.retained,
            s.watches
        );
    }
    out
}
