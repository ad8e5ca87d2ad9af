//! The `bulk` scenario (bulk checks, issue 14): one job of fresh identities (one each, so that the cache cannot
//! answer) against the sandbox at a raised callback rate — the sustained rate of live queries as a share of the
//! budget (`SINCH_CALLBACK_RATE`) over the middle of the job, the largest gap between progress messages on
//! WatchBulkCheck, the total time and the facade's RSS per recipient — and interactive CheckCapability latency
//! (cache hits and live checks of other identities at a modest rate) while the job runs, against the same load
//! without a job, in the same run. Targets live here and in BENCHMARKS.md only.

use std::{
    fmt::Write as _,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use capability_facade::grpc::pb::{
    self, capability_service_client::CapabilityServiceClient, watch_bulk_check_response::Event,
};
use testkit::free_port;
use tonic::transport::Channel;

use crate::{
    Plan, Report, procs,
    scenarios::{self, CHECK_APP, Load, SECRET},
};

/// Targets (BENCHMARKS.md, issue 14).
const RATE_VS_BUDGET: f64 = 0.95;
const PROGRESS_GAP_MS: f64 = 1_000.0;

/// The share of the job's sending time, at each end, left out of "the middle of the job".
const EDGE: f64 = 0.1;
/// How often the facade's counters and RSS are sampled while the job runs.
const SAMPLE_EVERY: Duration = Duration::from_millis(100);

/// Sets of identities (the digits after the country code), so that no two phases share one.
const WARM_SET: u32 = 20;
const LIVE_ALONE_SET: u32 = 21;
const LIVE_DURING_SET: u32 = 22;
const JOB_SET: u32 = 30;

/// How big the scenario is (part of [`Plan`]).
pub struct BulkPlan {
    /// Recipients of the job, one fresh SMS identity each.
    pub recipients: usize,
    /// `SINCH_CALLBACK_RATE` of the facade: identities (callbacks) per second.
    pub rate: u32,
    /// The sandbox's webhook rate (`CAPABILITY_SANDBOX_WEBHOOK_RATE`): callbacks per second per app; `None`: the
    /// same as `rate`.
    pub sandbox_rate: Option<u32>,
    /// Interactive cache hits per second, with and without the job.
    pub hit_rate: u64,
    /// Interactive live checks (fresh identities) per second, with and without the job.
    pub live_rate: u64,
    /// Identities cached before the interactive phases.
    pub warm: usize,
}

/// An SMS identity of `set`, unique by `i`, whose last digit is `last` (the sandbox's outcome: 0–3 FULL, 4–5
/// PARTIAL, 6–8 NO_CAPABILITY, 9 UNKNOWN).
fn identity(set: u32, i: usize, last: usize) -> String {
    format!("47{set:02}{i:07}{}", last % 10)
}

fn recipient(identity: String) -> pb::Recipient {
    pb::Recipient {
        recipient: Some(pb::recipient::Recipient::IdentifiedBy(pb::IdentifiedBy {
            channel_identities: vec![pb::ChannelIdentity {
                channel: pb::Channel::Sms.into(),
                identity,
                ..Default::default()
            }],
        })),
    }
}

/// A facade whose Sinch is the sandbox at `sinch`, with the callback budget `rate` and no query rate limit of its
/// own in the way (SINCH_RATE_LIMIT counts queries, and each query here is one identity).
fn facade_env(sinch: &str, rate: u32) -> Vec<(&'static str, String)> {
    vec![
        ("SINCH_PROJECT_ID", "sandbox-project".into()),
        ("SINCH_KEY_ID", "sandbox-key".into()),
        ("SINCH_KEY_SECRET", "sandbox-secret".into()),
        ("SINCH_API_URL", sinch.to_owned()),
        ("SINCH_AUTH_URL", format!("{sinch}/oauth2/token")),
        ("SINCH_WEBHOOK_SECRETS", SECRET.into()),
        ("SINCH_RATE_LIMIT", "1000000".into()),
        ("SINCH_CALLBACK_RATE", rate.to_string()),
    ]
}

/// The sum of every series of metric `name` (with or without labels) in a Prometheus text.
fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with(' ') || rest.starts_with('{'))
        })
        .filter_map(|l| l.rsplit(' ').next()?.trim().parse::<f64>().ok())
        .sum()
}

/// One reading of the facade while the job runs.
#[derive(Clone, Copy)]
struct Sample {
    at: Instant,
    /// `capability_bulk_queries_sent_total`: the job's live queries (one identity each).
    bulk: f64,
    /// `capability_upstream_request_duration_seconds_count`: every request to Sinch (the job's, the interactive
    /// checks', the token).
    upstream: f64,
    rss: u64,
}

/// Samples the facade every [`SAMPLE_EVERY`] until `stop`.
fn sample(admin: SocketAddr, pid: u32, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<Vec<Sample>> {
    tokio::spawn(async move {
        let http = scenarios::http_client(1);
        let mut samples = Vec::new();
        let mut tick = tokio::time::interval(SAMPLE_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        while !stop.load(Ordering::Relaxed) {
            tick.tick().await;
            let text = match http.get(format!("http://{admin}/metrics")).send().await {
                Ok(response) => response.text().await.unwrap_or_default(),
                Err(_) => continue,
            };
            samples.push(Sample {
                at: Instant::now(),
                bulk: metric(&text, "capability_bulk_queries_sent_total"),
                upstream: metric(&text, "capability_upstream_request_duration_seconds_count"),
                rss: procs::rss(pid),
            });
        }
        samples
    })
}

/// What the job's watch saw.
struct Watched {
    /// When each progress message arrived, with its `done`.
    progress: Vec<(Instant, u64)>,
    results: u64,
    /// Results with an identity still pending (no callback within the wait).
    pending: u64,
    last: Option<pb::BulkCheck>,
    opened: Instant,
    ended: Instant,
    error: Option<String>,
}

/// Reads the job's whole stream, keeping only counts and arrival times.
async fn watch(channel: Channel, job_id: String) -> Watched {
    let mut client = CapabilityServiceClient::new(channel);
    let opened = Instant::now();
    let mut watched = Watched {
        progress: Vec::new(),
        results: 0,
        pending: 0,
        last: None,
        opened,
        ended: opened,
        error: None,
    };
    let request = pb::WatchBulkCheckRequest {
        job_id,
        after_offset: 0,
    };
    let mut stream = match client.watch_bulk_check(request).await {
        Ok(response) => response.into_inner(),
        Err(e) => {
            watched.error = Some(e.to_string());
            return watched;
        }
    };
    loop {
        match stream.message().await {
            Ok(Some(message)) => match message.event {
                Some(Event::Result(result)) => {
                    watched.results += 1;
                    if result.answer.is_some_and(|a| !a.pending.is_empty()) {
                        watched.pending += 1;
                    }
                }
                Some(Event::Progress(progress)) => {
                    watched.progress.push((Instant::now(), progress.done));
                    watched.last = Some(progress);
                }
                None => {}
            },
            Ok(None) => break,
            Err(e) => {
                watched.error = Some(e.to_string());
                break;
            }
        }
    }
    watched.ended = Instant::now();
    watched
}

/// What an interactive phase measured.
struct Interactive {
    hits: Load,
    live: Load,
    /// Live checks answered by their own query (`RESULT_SOURCE_LIVE`): identities the budget counted.
    live_queries: u64,
    from: Instant,
    to: Instant,
}

/// Cache hits of `hits` at `plan.hit_rate` and live checks of fresh identities of `live_set` at
/// `plan.live_rate`, together, for `duration`; open loops, a call late because the one before was slow counted
/// from when it was due.
async fn interactive(
    channels: &[Channel],
    plan: &BulkPlan,
    hits: Arc<Vec<String>>,
    live_set: u32,
    duration: Duration,
) -> Interactive {
    let from = Instant::now();
    let hit_requests = move |k: usize| scenarios::check_request(&hits[k % hits.len()], Duration::from_secs(10));
    let live_requests = move |k: usize| scenarios::check_request(&identity(live_set, k, 1), Duration::from_secs(10));
    let ((hits, _), (live, live_queries)) = tokio::join!(
        paced(channels, 16, plan.hit_rate, duration, true, hit_requests),
        paced(channels, 16, plan.live_rate.max(1), duration, false, live_requests),
    );
    Interactive {
        hits,
        live,
        live_queries,
        from,
        to: Instant::now(),
    }
}

/// `rate` CheckCapability calls a second for `duration`, spread over `workers` with a schedule each (the harness's
/// paced loop: a call late because the one before was slow counts from when it was due); the k-th call asks
/// `request(k)`. A call counts when its answer is complete (and whole from the cache with `cached`); also returns
/// how many answers held a result of their own live query.
async fn paced<F>(
    channels: &[Channel],
    workers: usize,
    rate: u64,
    duration: Duration,
    cached: bool,
    request: F,
) -> (Load, u64)
where
    F: Fn(usize) -> pb::CheckCapabilityRequest + Clone + Send + Sync + 'static,
{
    let (next, live) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let counted = live.clone();
    let channels = channels.to_vec();
    let load = scenarios::closed_loop(workers, duration, Some(rate), move |w| {
        let mut client = CapabilityServiceClient::new(channels[w % channels.len()].clone());
        let asked = request(next.fetch_add(1, Ordering::Relaxed) as usize);
        let live = counted.clone();
        Some(async move {
            let Ok(answer) = client.check_capability(asked).await else {
                return false;
            };
            let answer = answer.into_inner();
            let own = |s: pb::ResultSource| answer.results.iter().any(|r| r.source == s as i32);
            live.fetch_add(u64::from(own(pb::ResultSource::Live)), Ordering::Relaxed);
            let whole_cache = !answer.results.is_empty()
                && answer
                    .results
                    .iter()
                    .all(|r| r.source == pb::ResultSource::Cache as i32);
            answer.complete && (!cached || whole_cache)
        })
    })
    .await;
    (load, live.load(Ordering::Relaxed))
}

/// The slope of `value` over time through `samples` (least squares), per second: the pacer admits its budget
/// in steps, one per window, so the difference between two samples would depend on where they fall in a step.
fn slope(samples: &[Sample], value: impl Fn(&Sample) -> f64) -> f64 {
    let Some(origin) = samples.first().map(|s| s.at) else {
        return f64::NAN;
    };
    let points: Vec<(f64, f64)> = samples
        .iter()
        .map(|s| (s.at.duration_since(origin).as_secs_f64(), value(s)))
        .collect();
    let n = points.len() as f64;
    let (mx, my) = (
        points.iter().map(|p| p.0).sum::<f64>() / n,
        points.iter().map(|p| p.1).sum::<f64>() / n,
    );
    let sxy: f64 = points.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum();
    let sxx: f64 = points.iter().map(|p| (p.0 - mx) * (p.0 - mx)).sum();
    sxy / sxx
}

/// The most of `value` counted between two samples at most one second apart: a lower bound of the most in any
/// one-second window (the budget's promise: at most the limit in any 1.025 s).
fn peak_second(samples: &[Sample], value: impl Fn(&Sample) -> f64) -> f64 {
    let mut peak = 0.0f64;
    for (i, a) in samples.iter().enumerate() {
        if let Some(b) = samples[i..]
            .iter()
            .take_while(|b| b.at.duration_since(a.at) <= Duration::from_secs(1))
            .last()
        {
            peak = peak.max(value(b) - value(a));
        }
    }
    peak
}

/// CPU time (user + system) process `pid` has used, in seconds, from /proc.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // After the command's name (in parentheses): state is field 3, utime 14 and stime 15.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map_or(Vec::new(), |(_, rest)| rest.split_whitespace().collect());
    let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<f64>().ok()).unwrap_or(0.0);
    // USER_HZ is 100 on Linux.
    (ticks(11) + ticks(12)) / 100.0
}

/// The whole scenario.
pub async fn run(plan: &Plan, report: &mut Report) {
    let bulk = &plan.bulk;
    let (rate, total) = (bulk.rate, bulk.recipients);
    let sandbox_addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let sinch = format!("http://{sandbox_addr}");
    let facade = procs::facade(&facade_env(&sinch, rate)).await;
    let args = [
        "--callback-url".to_owned(),
        testkit::webhook_url(facade.webhook_addr),
        "--webhook-secret".to_owned(),
        SECRET.to_owned(),
        "--sandbox-webhook-rate".to_owned(),
        bulk.sandbox_rate.unwrap_or(rate).to_string(),
    ];
    let sandbox = procs::sandbox_with(sandbox_addr, &args).await;
    let sandbox_pid = sandbox.child.id().unwrap_or(0);
    let channels = scenarios::channels(facade.grpc_addr, 2).await;
    let job_channel = scenarios::channels(facade.grpc_addr, 1).await.remove(0);

    // Interactive load without a job: cached identities, and fresh ones asked live.
    let hits: Arc<Vec<String>> = Arc::new((0..bulk.warm).map(|i| identity(WARM_SET, i, 1)).collect());
    let complete = scenarios::warm_checks(facade.grpc_addr, &hits, 200).await;
    if complete < hits.len() {
        eprintln!(
            "   warming: only {complete} of {} checks came back complete",
            hits.len()
        );
    }
    let alone = interactive(&channels, bulk, hits.clone(), LIVE_ALONE_SET, plan.duration).await;
    report.load(&format!("bulk: cache hits at {}/s, no job", bulk.hit_rate), &alone.hits);
    report.load(
        &format!("bulk: live checks at {}/s, no job", bulk.live_rate),
        &alone.live,
    );

    // The job.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_before = procs::rss(facade.pid());
    let request = pb::StartBulkCheckRequest {
        app_id: CHECK_APP.into(),
        recipients: (0..total).map(|i| recipient(identity(JOB_SET, i, i))).collect(),
        ..Default::default()
    };
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = sample(facade.admin_addr, facade.pid(), stop.clone());
    let mut client = CapabilityServiceClient::new(job_channel.clone());
    let started = Instant::now();
    let job = match client.start_bulk_check(request).await {
        Ok(job) => job.into_inner(),
        Err(e) => {
            eprintln!("   StartBulkCheck failed: {e}");
            stop.store(true, Ordering::Relaxed);
            let _ = sampler.await;
            report.add("bulk: StartBulkCheck failed", 1.0);
            return;
        }
    };
    let start_ms = started.elapsed().as_secs_f64() * 1000.0;
    let cpu_before = (cpu_seconds(facade.pid()), cpu_seconds(sandbox_pid));
    let rss_queued = procs::rss(facade.pid());
    let watcher = tokio::spawn(watch(job_channel, job.job_id.clone()));

    // Interactive load while the job runs: from a quarter of its expected time, ending before nine tenths of it
    // when it is long enough.
    let expected = total as f64 / (f64::from(rate) * 0.975);
    let lead = (expected * 0.25).min((expected * 0.9 - plan.duration.as_secs_f64()).max(0.0));
    tokio::time::sleep_until((started + Duration::from_secs_f64(lead)).into()).await;
    let during = interactive(&channels, bulk, hits.clone(), LIVE_DURING_SET, plan.duration).await;
    let watched = watcher.await.expect("the watch task ran");
    let cpu = (
        cpu_seconds(facade.pid()) - cpu_before.0,
        cpu_seconds(sandbox_pid) - cpu_before.1,
    );
    stop.store(true, Ordering::Relaxed);
    let samples = sampler.await.expect("the sampler ran");
    let rss_end = procs::rss(facade.pid());
    report.load(
        &format!("bulk: cache hits at {}/s, during the job", bulk.hit_rate),
        &during.hits,
    );
    report.load(
        &format!("bulk: live checks at {}/s, during the job", bulk.live_rate),
        &during.live,
    );

    // What the job did.
    if let Some(error) = &watched.error {
        eprintln!("   the job's watch failed: {error}");
        report.add("bulk: watch errors", 1.0);
    }
    let last = watched.last.clone().unwrap_or_default();
    report.add("bulk: recipients", total as f64);
    report.add("bulk: budget identities/s", f64::from(rate));
    report.add(
        "bulk: sandbox webhook rate/s",
        f64::from(bulk.sandbox_rate.unwrap_or(rate)),
    );
    let job_seconds = (watched.ended - started).as_secs_f64();
    report.add("bulk: facade CPU % during the job", 100.0 * cpu.0 / job_seconds);
    report.add("bulk: sandbox CPU % during the job", 100.0 * cpu.1 / job_seconds);
    report.add("bulk: StartBulkCheck ms", start_ms);
    report.add("bulk: results received", watched.results as f64);
    report.add("bulk: results with an identity pending", watched.pending as f64);
    report.add("bulk: final done", last.done as f64);
    report.add("bulk: final reachable", last.reachable as f64);
    report.add("bulk: final from cache", last.from_cache as f64);
    report.add(
        "bulk: final state succeeded",
        f64::from(u8::from(last.state() == pb::BulkCheckState::Succeeded)),
    );
    report.add(
        "bulk: total s (start → final progress)",
        (watched.ended - started).as_secs_f64(),
    );
    let progress_times: Vec<Instant> = std::iter::once(watched.opened)
        .chain(watched.progress.iter().map(|(at, _)| *at))
        .collect();
    let gap = progress_times.windows(2).map(|w| w[1] - w[0]).max().unwrap_or_default();
    report.add("bulk: progress messages", watched.progress.len() as f64);
    report.add("bulk: largest progress gap ms", gap.as_secs_f64() * 1000.0);

    // The rate of live queries over the middle of the job's sending.
    let first = samples.iter().find(|s| s.bulk > 0.0);
    let all_sent = samples.iter().find(|s| s.bulk >= total as f64);
    if let (Some(first), Some(all_sent)) = (first, all_sent) {
        let span = all_sent.at.duration_since(first.at);
        let (from, to) = (first.at + span.mul_f64(EDGE), all_sent.at - span.mul_f64(EDGE));
        let middle: Vec<Sample> = samples.iter().filter(|s| s.at >= from && s.at <= to).copied().collect();
        report.add("bulk: sending s (first → last query)", span.as_secs_f64());
        report.add("bulk: middle s", to.duration_since(from).as_secs_f64());
        report.add("bulk: middle job identities/s", slope(&middle, |s| s.bulk));
        report.add("bulk: middle all live identities/s", slope(&middle, |s| s.upstream));
        report.add(
            "bulk: most live identities in 1 s",
            peak_second(&samples, |s| s.upstream),
        );
    } else {
        eprintln!("   the samples do not show the whole job sent");
        report.add("bulk: job queries counted", samples.last().map_or(0.0, |s| s.bulk));
    }
    // Where the interactive phase fell in the job.
    report.add(
        "bulk: interactive phase starts at s",
        (during.from - started).as_secs_f64(),
    );
    report.add(
        "bulk: interactive phase overlap with the job %",
        100.0 * (watched.ended.min(during.to).saturating_duration_since(during.from)).as_secs_f64()
            / (during.to - during.from).as_secs_f64(),
    );
    report.add(
        "bulk: interactive live queries during the job",
        during.live_queries as f64,
    );

    // Memory.
    let peak = samples.iter().map(|s| s.rss).max().unwrap_or(0).max(rss_queued);
    let per = |rss: u64| rss.saturating_sub(rss_before) as f64 / total as f64;
    report.add("bulk: RSS before MiB", rss_before as f64 / 1048576.0);
    report.add("bulk: RSS after start MiB", rss_queued as f64 / 1048576.0);
    report.add("bulk: RSS peak MiB", peak as f64 / 1048576.0);
    report.add("bulk: RSS at the end MiB", rss_end as f64 / 1048576.0);
    report.add("bulk: RSS bytes per recipient after start", per(rss_queued));
    report.add("bulk: RSS bytes per recipient at peak", per(peak));
}

/// The scenario's figures and targets, when it ran.
pub fn markdown(report: &Report, plan: &Plan, out: &mut String) {
    if report.values.iter().all(|(name, _)| name != "bulk: recipients") {
        return;
    }
    let m = |name: &str| report.median(name);
    let verdict = |met: bool| if met { "met" } else { "missed" };
    // Errors are reported only when there were some.
    let errors = |name: &str| {
        let value = m(name);
        if value.is_nan() { 0.0 } else { value }
    };
    let bulk = &plan.bulk;
    let budget = m("bulk: budget identities/s");
    let _ = writeln!(
        out,
        "\n| Bulk checks (issue 14): {:.0} recipients at a budget of {budget:.0} identities/s, sandbox webhook rate {:.0}/s | value | target | |\n|---|---:|---|---|",
        m("bulk: recipients"),
        m("bulk: sandbox webhook rate/s")
    );
    let job = m("bulk: middle job identities/s");
    let all = m("bulk: middle all live identities/s");
    let _ = writeln!(
        out,
        "| live queries over the middle {:.0} % of the job's sending ({:.1} s; least-squares slope of the counts): job / all, identities/s; all / budget | {job:.0} / {all:.0}; **{:.3}** | ≥ {RATE_VS_BUDGET} | {} |",
        100.0 * (1.0 - 2.0 * EDGE),
        m("bulk: middle s"),
        all / budget,
        verdict(all / budget >= RATE_VS_BUDGET)
    );
    let _ = writeln!(
        out,
        "| … the job's queries alone / budget; the most in any 1 s (sampled every 100 ms) / budget | {:.3}; {:.3} | | |",
        job / budget,
        m("bulk: most live identities in 1 s") / budget
    );
    let gap = m("bulk: largest progress gap ms");
    let _ = writeln!(
        out,
        "| largest gap between progress messages ({:.0} messages) | {gap:.0} ms | ≤ {PROGRESS_GAP_MS:.0} ms | {} |",
        m("bulk: progress messages"),
        verdict(gap <= PROGRESS_GAP_MS)
    );
    let _ = writeln!(
        out,
        "| total time, StartBulkCheck → final progress (sending: first → last query) | {:.1} s ({:.1} s) | | |",
        m("bulk: total s (start → final progress)"),
        m("bulk: sending s (first → last query)")
    );
    let _ = writeln!(
        out,
        "| results / done / reachable / with an identity pending | {:.0} / {:.0} / {:.0} / {:.0} | | |",
        m("bulk: results received"),
        m("bulk: final done"),
        m("bulk: final reachable"),
        m("bulk: results with an identity pending")
    );
    let _ = writeln!(
        out,
        "| RSS per recipient: after StartBulkCheck returned / at the peak (before {:.1} MiB, peak {:.1} MiB, end {:.1} MiB) | {:.0} / {:.0} B | | |",
        m("bulk: RSS before MiB"),
        m("bulk: RSS peak MiB"),
        m("bulk: RSS at the end MiB"),
        m("bulk: RSS bytes per recipient after start"),
        m("bulk: RSS bytes per recipient at peak")
    );
    let _ = writeln!(
        out,
        "| CPU during the job (of one core): facade / sandbox | {:.0} % / {:.0} % | | |",
        m("bulk: facade CPU % during the job"),
        m("bulk: sandbox CPU % during the job")
    );
    for (what, rate) in [("cache hits", bulk.hit_rate), ("live checks", bulk.live_rate)] {
        let alone = format!("bulk: {what} at {rate}/s, no job");
        let during = format!("bulk: {what} at {rate}/s, during the job");
        let _ = writeln!(
            out,
            "| interactive {what} at {rate}/s: p99 during the job / without (p50s; achieved/s; incomplete or failed) | {:.0} / {:.0} µs ({:.0} / {:.0} µs; {:.1} / {:.1}; {:.0} / {:.0}) | | |",
            m(&format!("{during} p99 µs")),
            m(&format!("{alone} p99 µs")),
            m(&format!("{during} p50 µs")),
            m(&format!("{alone} p50 µs")),
            m(&format!("{during} ops/s")),
            m(&format!("{alone} ops/s")),
            errors(&format!("{during} errors")),
            errors(&format!("{alone} errors")),
        );
    }
}
