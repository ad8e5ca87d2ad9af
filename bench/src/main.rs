//! The benchmark harness: measures the facade against the physical limits on this machine, in one run, and
//! writes `docs/bench/results.md` and the curves beside it. `bench --smoke` is a ≤ 60 s version that CI runs so
//! that the harness cannot rot. See BENCHMARKS.md for how to read and reproduce the figures.
#![forbid(unsafe_code)]

mod baselines;
mod bulk;
mod check;
mod peer;
mod procs;
mod scenarios;
mod sinch;
mod soak;

use std::{
    fmt::Write as _,
    net::SocketAddr,
    path::PathBuf,
    time::{Duration, Instant},
};

use clap::{Parser, Subcommand};
use scenarios::{Load, Posting, SECRET};

/// The facade's allocator, for the load generator and the bare baselines too: the generator shares the cores with
/// the server it measures, and glibc's malloc was a twentieth of its CPU time.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "bench", about = "Benchmarks capability-facade against bare baselines")]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// A short run (≤ 60 s) that only proves the harness works.
    #[arg(long)]
    smoke: bool,
    /// How many times each measurement runs; the report gives medians.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Where results.md and the curves go.
    #[arg(long, default_value = "docs/bench")]
    out: PathBuf,
    /// Run only these scenarios, comma-separated (queries, delivery, ingest, peer, idle, replicas,
    /// memory, check, bulk); delivery includes ingest, whose bare baselines its ratios need.
    #[arg(long)]
    only: Option<String>,
    /// How long each measurement runs (default 10s, 1.5s with --smoke); warm-ups take a fifth of it.
    #[arg(long, value_parser = humantime::parse_duration)]
    duration: Option<Duration>,
    /// Recipients of the bulk scenario's job (default 100,000, 200 with --smoke).
    #[arg(long)]
    bulk_recipients: Option<usize>,
    /// The bulk scenario's callback budget, identities/s (default 2,000, 100 with --smoke).
    #[arg(long)]
    bulk_rate: Option<u32>,
    /// The sandbox's webhook rate in the bulk scenario, callbacks/s (default: the same as --bulk-rate).
    #[arg(long)]
    bulk_sandbox_rate: Option<u32>,
    /// The fixed rate of the delivery and peer scenarios' latency runs, callbacks/s (default 5,000, 500 with
    /// --smoke).
    #[arg(long)]
    latency_rate: Option<u64>,
    /// Watches of the idle scenario (default 100,000, 2,000 with --smoke).
    #[arg(long)]
    idle_watches: Option<usize>,
    /// HTTP/2 connections they are spread over (default 100, 10 with --smoke).
    #[arg(long)]
    idle_connections: Option<usize>,
}

#[derive(Subcommand)]
enum Command {
    /// The bare tonic unary baseline (started by the harness).
    Echo {
        #[arg(long)]
        listen: SocketAddr,
    },
    /// The bare proxy baseline: QueryCapability forwarded to `upstream` with reqwest (started by the harness).
    Proxy {
        #[arg(long)]
        listen: SocketAddr,
        /// The sandbox, `http://host:port`.
        #[arg(long)]
        upstream: String,
    },
    /// The bare HTTP POST baseline (started by the harness).
    BareHttp {
        #[arg(long)]
        listen: SocketAddr,
        /// Answer 401 unless the callback is signed as Sinch signs it.
        #[arg(long)]
        verify: bool,
    },
    /// Posts `count` signed callbacks (the delivery scenarios' kind, each a new identity, over 1,000 request_ids)
    /// one after another to a facade's webhook signed with the harness's secret; for a profile of a fixed amount
    /// of work (docs/bench/profiles/ingest-instructions.txt). Exits 1 unless every one was acknowledged (and, with
    /// `--grpc`, delivered).
    Post {
        /// The facade's webhook, `host:port`.
        #[arg(long)]
        webhook: SocketAddr,
        #[arg(long)]
        count: u64,
        /// The facade's gRPC port, `host:port`: first open a watch of each of the 1,000 request_ids (over 100
        /// connections, as the delivery scenario does), so that each callback is also delivered.
        #[arg(long)]
        grpc: Option<SocketAddr>,
    },
    /// The soak (docs/RELIABILITY.md): steady callbacks and open watches for a long time; exits 1 when a
    /// callback acknowledged 200 was lost or duplicated, or the hub kept anything past the retention.
    Soak {
        #[command(flatten)]
        plan: soak::SoakPlan,
        /// Where the report goes (markdown).
        #[arg(long, default_value = "target/soak.md")]
        out: PathBuf,
    },
    /// Callback pacing and the token cold-start herd, each against a baseline of the same run (BENCHMARKS.md).
    Sinch {
        #[command(flatten)]
        plan: sinch::SinchPlan,
    },
}

/// How big a run is.
struct Plan {
    duration: Duration,
    runs: usize,
    query_workers: usize,
    watcher_counts: Vec<usize>,
    /// Streams through Pushpin in the peer scenario (an HTTP/1.1 connection each): one of `watcher_counts`.
    peer_streams: usize,
    idle_watches: usize,
    idle_connections: usize,
    cross_watchers: usize,
    cross_rate: u64,
    latency_rate: u64,
    retained_steps: Vec<u64>,
    /// Identities cached before the cache-hit measurements.
    check_identities: usize,
    /// Offered CheckCapability cache hits per second with Redis.
    check_rate: u64,
    /// Checks of one identity sent at once (coalescing).
    coalesced_checks: usize,
    /// The bulk check job and the interactive load beside it.
    bulk: bulk::BulkPlan,
}

impl Plan {
    fn new(smoke: bool, runs: usize) -> Plan {
        if smoke {
            Plan {
                duration: Duration::from_millis(1500),
                runs: 1,
                query_workers: 16,
                watcher_counts: vec![1, 100],
                peer_streams: 100,
                idle_watches: 2_000,
                idle_connections: 10,
                cross_watchers: 100,
                cross_rate: 500,
                latency_rate: 500,
                retained_steps: vec![1_500, 3_000],
                check_identities: 100,
                check_rate: 500,
                coalesced_checks: 100,
                bulk: bulk::BulkPlan {
                    recipients: 200,
                    rate: 100,
                    sandbox_rate: None,
                    hit_rate: 50,
                    live_rate: 5,
                    warm: 100,
                },
            }
        } else {
            Plan {
                duration: Duration::from_secs(10),
                runs: runs.max(1),
                query_workers: 64,
                watcher_counts: vec![1, 1_000, 10_000],
                peer_streams: 1_000,
                idle_watches: 100_000,
                idle_connections: 100,
                cross_watchers: 1_000,
                cross_rate: 5_000,
                latency_rate: 5_000,
                retained_steps: vec![250_000, 500_000, 750_000, 1_000_000],
                check_identities: 1_000,
                check_rate: 5_000,
                coalesced_checks: 1_000,
                bulk: bulk::BulkPlan {
                    recipients: 100_000,
                    rate: 2_000,
                    sandbox_rate: None,
                    hit_rate: 200,
                    live_rate: 20,
                    warm: 1_000,
                },
            }
        }
    }
}

#[tokio::main]
async fn main() {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Echo { listen }) => return baselines::echo(listen).await,
        Some(Command::Proxy { listen, upstream }) => return baselines::proxy(listen, upstream).await,
        Some(Command::BareHttp { listen, verify }) => return baselines::bare_http(listen, verify).await,
        Some(Command::Post { webhook, count, grpc }) => {
            let one_by_one = Posting {
                posters: 1,
                rate: None,
                limit: Some(count),
                duration: Duration::from_secs(3600),
            };
            let watchers = match grpc {
                Some(grpc) => Some(scenarios::open_watchers(&[grpc], "i", 1_000, 100).await),
                None => None,
            };
            let load = scenarios::post_callbacks(webhook, "i", 1_000, one_by_one).await;
            println!("{} acknowledged, {} refused or failed", load.ok, load.errors);
            let delivered = match &watchers {
                Some(watchers) => {
                    watchers.wait_for(load.ok, Duration::from_secs(60)).await;
                    let delivered = watchers.delivered();
                    println!("{delivered} delivered");
                    delivered
                }
                None => load.ok,
            };
            if load.ok != count || delivered != count {
                std::process::exit(1);
            }
            return;
        }
        Some(Command::Soak { plan, out }) => {
            let (report, kept) = soak::run(&plan).await;
            std::fs::write(&out, &report).expect("the soak report is written");
            println!("{report}");
            if !kept {
                eprintln!("the soak lost, duplicated or retained something: see above");
                std::process::exit(1);
            }
            return;
        }
        Some(Command::Sinch { plan }) => {
            println!("{}", sinch::run(&plan).await);
            return;
        }
        None => {}
    }
    let mut plan = Plan::new(cli.smoke, cli.runs);
    if let Some(duration) = cli.duration {
        plan.duration = duration;
    }
    if let Some(recipients) = cli.bulk_recipients {
        plan.bulk.recipients = recipients.max(1);
    }
    if let Some(rate) = cli.bulk_rate {
        plan.bulk.rate = rate.max(1);
    }
    if let Some(rate) = cli.bulk_sandbox_rate {
        plan.bulk.sandbox_rate = Some(rate.max(1));
    }
    if let Some(rate) = cli.latency_rate {
        plan.latency_rate = rate.max(1);
    }
    if let Some(watches) = cli.idle_watches {
        plan.idle_watches = watches.max(1);
    }
    if let Some(connections) = cli.idle_connections {
        plan.idle_connections = connections.max(1);
    }
    let started = Instant::now();
    let mut report = Report::default();
    let wanted = |name: &str| {
        cli.only
            .as_deref()
            .is_none_or(|only| only.split(',').any(|o| o == name))
    };
    for run in 1..=plan.runs {
        eprintln!("== run {run} of {}", plan.runs);
        if wanted("queries") {
            queries(&plan, &mut report).await;
        }
        if wanted("delivery") {
            delivery(&plan, &mut report).await;
        }
        if wanted("delivery") || wanted("ingest") {
            ingestion(&plan, &mut report).await;
        }
        if wanted("peer") {
            peer::run(&plan, &mut report).await;
        }
        if wanted("idle") {
            idle(&plan, &mut report).await;
        }
        if wanted("replicas") {
            // The baseline (one replica with Redis: the same log round trip, no second process), the issue's
            // scenario (watches on one other replica), then watches spread over two others.
            cross_replica(&plan, &mut report, 1).await;
            cross_replica(&plan, &mut report, 2).await;
            cross_replica(&plan, &mut report, 3).await;
        }
        if wanted("check") {
            check::run(&plan, &mut report).await;
        }
        if wanted("bulk") {
            bulk::run(&plan, &mut report).await;
        }
        if run == 1 && wanted("memory") {
            let alone = memory_vs_retained(&plan, &[]).await;
            report.memory.push(("a single replica", alone));
            // What the event log and the hub hold without the capability cache's copy of each result.
            let one_entry = [("CAPABILITY_CACHE_MAX_ENTRIES", "1".to_owned())];
            let log_alone = memory_vs_retained(&plan, &one_entry).await;
            report
                .memory
                .push(("a single replica, its cache held to one entry", log_alone));
            let redis = testkit::RedisServer::start().await;
            let series = memory_vs_retained(&plan, &[("CAPABILITY_REDIS_URL", redis.url())]).await;
            report.memory.push(("a replica with Redis", series));
        }
    }
    std::fs::create_dir_all(&cli.out).expect("the output folder can be made");
    let markdown = report.markdown(&plan, started.elapsed());
    std::fs::write(cli.out.join("results.md"), &markdown).expect("results.md is written");
    report.plot(&cli.out);
    println!("{markdown}");
}

/// Every measurement, by name, one value per run.
#[derive(Default)]
struct Report {
    values: Vec<(String, Vec<f64>)>,
    /// By setting: (retained notifications, RSS bytes), from the first run.
    memory: Vec<(&'static str, Vec<(u64, u64)>)>,
}

impl Report {
    fn add(&mut self, name: &str, value: f64) {
        eprintln!("   {name}: {value:.1}");
        match self.values.iter_mut().find(|(n, _)| n == name) {
            Some((_, values)) => values.push(value),
            None => self.values.push((name.to_owned(), vec![value])),
        }
    }

    /// `{name} deliveries/s`, what `watchers` received over the time from `started` to the `last` delivery, and
    /// `{name} missing` when fewer than the `sent` arrived.
    fn deliveries(&mut self, name: &str, watchers: &scenarios::Watchers, sent: u64, started: Instant, last: Instant) {
        let delivered = self.missing(name, watchers, sent);
        self.add(
            &format!("{name} deliveries/s"),
            delivered as f64 / (last - started).as_secs_f64(),
        );
    }

    /// `{name} p50 µs` and `{name} p99 µs` of what `watchers` timed, and `{name} missing` when fewer than the
    /// `sent` arrived.
    fn latency(&mut self, name: &str, watchers: &scenarios::Watchers, sent: u64) {
        let latency = watchers.latency.lock().unwrap().clone();
        self.add(&format!("{name} p50 µs"), latency.value_at_quantile(0.5) as f64);
        self.add(&format!("{name} p99 µs"), latency.value_at_quantile(0.99) as f64);
        self.missing(name, watchers, sent);
    }

    /// Adds `{name} missing` when `watchers` received fewer than `sent`; returns how many they received.
    fn missing(&mut self, name: &str, watchers: &scenarios::Watchers, sent: u64) -> u64 {
        let delivered = watchers.delivered();
        if delivered != sent {
            self.add(&format!("{name} missing"), sent.saturating_sub(delivered) as f64);
        }
        delivered
    }

    fn load(&mut self, name: &str, load: &Load) {
        self.add(&format!("{name} ops/s"), load.rate());
        self.add(&format!("{name} p50 µs"), load.p50_us() as f64);
        self.add(&format!("{name} p99 µs"), load.p99_us() as f64);
        if load.errors > 0 {
            self.add(&format!("{name} errors"), load.errors as f64);
        }
    }

    /// `{name} CPU µs per call`: the server's CPU time (`used.server`) over the calls `load` made that succeeded.
    /// Less noisy than throughput where the load generator shares the machine's cores with the server. And the
    /// same of the harness's own (`{name} generator CPU µs per call`).
    fn cpu_per_call(&mut self, name: &str, used: procs::Cpu, load: &Load) {
        self.cpu_per(&format!("{name} CPU µs per call"), used.server, load.ok);
        self.cpu_per(&format!("{name} generator CPU µs per call"), used.generator, load.ok);
    }

    /// `{name} CPU µs per delivery`: the server's CPU time (`used.server`) over what `watchers` received; and
    /// the same of the harness's own (`{name} generator CPU µs per delivery`), which shares the cores with it.
    pub fn cpu_per_delivery(&mut self, name: &str, used: procs::Cpu, watchers: &scenarios::Watchers) {
        let delivered = watchers.delivered();
        self.cpu_per(&format!("{name} CPU µs per delivery"), used.server, delivered);
        self.cpu_per(
            &format!("{name} generator CPU µs per delivery"),
            used.generator,
            delivered,
        );
    }

    /// `cpu_ms` over `count` things done, in µs, as `name`.
    fn cpu_per(&mut self, name: &str, cpu_ms: u64, count: u64) {
        self.add(name, cpu_ms as f64 * 1000.0 / count.max(1) as f64);
    }

    fn median(&self, name: &str) -> f64 {
        let Some((_, values)) = self.values.iter().find(|(n, _)| n == name) else {
            return f64::NAN;
        };
        let mut sorted = values.clone();
        sorted.sort_by(f64::total_cmp);
        sorted[sorted.len() / 2]
    }

    fn markdown(&self, plan: &Plan, took: Duration) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "Medians of {} run(s), {} s per measurement, {} CPUs; the whole run took {:.0} s.\n",
            plan.runs,
            plan.duration.as_secs_f64(),
            std::thread::available_parallelism().map_or(0, |n| n.get()),
            took.as_secs_f64()
        );
        let _ = writeln!(out, "| measurement | median | runs |\n|---|---:|---|");
        for (name, values) in &self.values {
            let runs: Vec<String> = values.iter().map(|v| format!("{v:.0}")).collect();
            let _ = writeln!(out, "| {name} | {:.0} | {} |", self.median(name), runs.join(", "));
        }
        let ratio = |a: &str, b: &str| self.median(a) / self.median(b);
        let _ = writeln!(out, "\n| ratio | value |\n|---|---:|");
        let _ = writeln!(
            out,
            "| facade / direct query throughput | {:.2} |",
            ratio("query facade ops/s", "query direct ops/s")
        );
        let _ = writeln!(
            out,
            "| facade / echo query throughput | {:.2} |",
            ratio("query facade ops/s", "query echo ops/s")
        );
        let _ = writeln!(
            out,
            "| query p50 added over direct, one caller at a time (µs) | {:.0} |",
            self.median("query facade, 1 worker p50 µs") - self.median("query direct, 1 worker p50 µs")
        );
        let most = plan.watcher_counts.last().copied().unwrap_or(1);
        for watchers in [1, most] {
            let _ = writeln!(
                out,
                "| delivery ({watchers} watchers) / bare HTTP throughput | {:.2} |",
                ratio(&format!("delivery {watchers} watchers deliveries/s"), "bare http ops/s")
            );
        }
        let streams = plan.peer_streams;
        let batch = peer::BATCH;
        for (feed, pushpin) in [
            (
                "one per publish".to_owned(),
                format!("peer pushpin {streams} streams deliveries/s"),
            ),
            (
                format!("its best, {batch} per publish"),
                format!("peer pushpin {streams} streams, {batch} per publish deliveries/s"),
            ),
        ] {
            if self.values.iter().any(|(name, _)| *name == pushpin) {
                let _ = writeln!(
                    out,
                    "| delivery ({streams} watchers) / Pushpin ({feed}) deliveries/s | {:.2} |",
                    ratio(&format!("delivery {streams} watchers deliveries/s"), &pushpin)
                );
                let cpu = pushpin.replace("deliveries/s", "CPU µs per delivery");
                let _ = writeln!(
                    out,
                    "| delivery ({streams} watchers) / Pushpin ({feed}): CPU per delivery | {:.2} |",
                    ratio(&format!("delivery {streams} watchers CPU µs per delivery"), &cpu)
                );
            }
        }
        let _ = writeln!(
            out,
            "| saturated ingestion / bare HTTP: throughput | {:.2} |\n| saturated ingestion / bare HTTP: p99 | {:.2} |",
            ratio("ingest, no watcher ops/s", "bare http ops/s"),
            ratio("ingest, no watcher p99 µs", "bare http p99 µs")
        );
        let _ = writeln!(
            out,
            "| saturated ingestion / bare verifying HTTP: throughput | {:.2} |\n| saturated ingestion / bare verifying \
             HTTP: p99 | {:.2} |",
            ratio("ingest, no watcher ops/s", "bare verifying http ops/s"),
            ratio("ingest, no watcher p99 µs", "bare verifying http p99 µs")
        );
        let _ = writeln!(
            out,
            "| saturated ingestion / bare verifying HTTP: CPU per callback | {:.2} |",
            ratio(
                "ingest, no watcher CPU µs per call",
                "bare verifying http CPU µs per call"
            )
        );
        let alone = cross_replica_name(plan, 1);
        for count in [2, 3] {
            let _ = writeln!(
                out,
                "| cross-replica ({count} replicas) / one replica with Redis: p99 | {:.2} |",
                ratio(
                    &format!("{} p99 µs", cross_replica_name(plan, count)),
                    &format!("{alone} p99 µs")
                )
            );
        }
        check::markdown(self, plan, &mut out);
        bulk::markdown(self, plan, &mut out);
        for (setting, points) in &self.memory {
            let Some(&(_, empty)) = points.first() else {
                continue;
            };
            let _ = writeln!(
                out,
                "\n| {setting}: retained notifications (3 per request) | RSS MiB | bytes per notification above an empty replica |\n|---:|---:|---:|"
            );
            for (retained, rss) in points {
                let per = if *retained == 0 {
                    "".to_owned()
                } else {
                    format!("{:.0}", rss.saturating_sub(empty) as f64 / *retained as f64)
                };
                let _ = writeln!(out, "| {retained} | {:.1} | {per} |", *rss as f64 / 1048576.0);
            }
        }
        out
    }

    fn plot(&self, out: &std::path::Path) {
        let throughput: Vec<(f64, f64)> = self
            .values
            .iter()
            .filter_map(|(name, _)| {
                let watchers = name.strip_prefix("delivery ")?.strip_suffix(" watchers deliveries/s")?;
                Some((watchers.parse().ok()?, self.median(name)))
            })
            .collect();
        chart(
            &out.join("throughput-vs-watchers.svg"),
            (
                "Callback → stream deliveries/s vs watchers",
                "watchers (one request_id each)",
                "deliveries/s",
            ),
            &throughput,
            true,
        );
        let memory: Vec<(f64, f64)> = self
            .memory
            .first()
            .into_iter()
            .flat_map(|(_, points)| points)
            .map(|(r, rss)| (*r as f64, *rss as f64 / 1048576.0))
            .collect();
        chart(
            &out.join("memory-vs-retained.svg"),
            (
                "Facade RSS vs retained notifications (a single replica)",
                "retained notifications (three per request)",
                "RSS (MiB)",
            ),
            &memory,
            false,
        );
    }
}

/// Draws `points` as a line with markers into an SVG; `log_x` for a logarithmic x axis.
fn chart(path: &std::path::Path, (caption, x_desc, y_desc): (&str, &str, &str), points: &[(f64, f64)], log_x: bool) {
    use plotters::{coord::types::RangedCoordf64, prelude::*};
    fn draw<X>(
        root: &DrawingArea<SVGBackend<'_>, plotters::coord::Shift>,
        (caption, x_desc, y_desc): (&str, &str, &str),
        x: X,
        y: RangedCoordf64,
        points: &[(f64, f64)],
    ) where
        X: Ranged<ValueType = f64> + plotters::coord::ranged1d::ValueFormatter<f64>,
    {
        let mut chart = ChartBuilder::on(root)
            .caption(caption, ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(64)
            .build_cartesian_2d(x, y)
            .expect("draws");
        chart
            .configure_mesh()
            .x_desc(x_desc)
            .y_desc(y_desc)
            .draw()
            .expect("draws");
        chart
            .draw_series(LineSeries::new(points.iter().copied(), &BLUE))
            .expect("draws");
        chart
            .draw_series(points.iter().map(|p| Circle::new(*p, 4, BLUE.filled())))
            .expect("draws");
    }
    let root = SVGBackend::new(path, (640, 400)).into_drawing_area();
    root.fill(&WHITE).expect("draws");
    let top = points.iter().map(|p| p.1).fold(1.0, f64::max) * 1.2;
    let right = points.iter().map(|p| p.0).fold(1.0, f64::max) * 1.05;
    let y: RangedCoordf64 = (0f64..top).into();
    if log_x {
        let x: LogCoord<f64> = (0.5f64..right * 2.0).log_scale().into();
        draw(&root, (caption, x_desc, y_desc), x, y, points);
    } else {
        draw(
            &root,
            (caption, x_desc, y_desc),
            RangedCoordf64::from(0f64..right),
            y,
            points,
        );
    }
    root.present().expect("writes the SVG");
}

/// QueryCapability through the facade, the same query to the sandbox directly, and a bare tonic echo.
async fn queries(plan: &Plan, report: &mut Report) {
    let sandbox = procs::sandbox().await;
    let sinch = format!("http://{}", sandbox.ready);
    let facade = procs::facade(&[
        ("SINCH_PROJECT_ID", "sandbox-project".into()),
        ("SINCH_KEY_ID", "sandbox-key".into()),
        ("SINCH_KEY_SECRET", "sandbox-secret".into()),
        ("SINCH_API_URL", sinch.clone()),
        ("SINCH_AUTH_URL", format!("{sinch}/oauth2/token")),
        ("SINCH_WEBHOOK_SECRETS", SECRET.into()),
        ("SINCH_RATE_LIMIT", "1000000".into()),
    ])
    .await;
    let echo = procs::baseline("echo").await;
    let warmup = plan.duration / 5;
    let workers = plan.query_workers;
    scenarios::grpc_queries(facade.grpc_addr, workers, 4, warmup).await;
    let load = scenarios::grpc_queries(facade.grpc_addr, workers, 4, plan.duration).await;
    report.load("query facade", &load);
    scenarios::http_queries(sandbox.ready, workers, warmup).await;
    let load = scenarios::http_queries(sandbox.ready, workers, plan.duration).await;
    report.load("query direct", &load);
    scenarios::grpc_queries(echo.ready, workers, 4, warmup).await;
    let load = scenarios::grpc_queries(echo.ready, workers, 4, plan.duration).await;
    report.load("query echo", &load);
    // Added latency is what one call costs more, not queueing on a saturated machine: one caller at a time.
    let load = scenarios::grpc_queries(facade.grpc_addr, 1, 1, plan.duration / 2).await;
    report.load("query facade, 1 worker", &load);
    let load = scenarios::http_queries(sandbox.ready, 1, plan.duration / 2).await;
    report.load("query direct, 1 worker", &load);
    let load = scenarios::grpc_queries(echo.ready, 1, 1, plan.duration / 2).await;
    report.load("query echo, 1 worker", &load);
}

/// Env of a facade in sandbox mode whose webhook the harness can sign for.
/// The facade as the delivery scenarios run it: each watched request takes every notification posted to it
/// (a real request takes one per channel; the scenarios push many through each watch).
fn delivery_env() -> Vec<(&'static str, String)> {
    vec![
        ("SINCH_WEBHOOK_SECRETS", SECRET.into()),
        ("CAPABILITY_MAX_NOTIFICATIONS_PER_REQUEST", "1000000".into()),
    ]
}

/// 32 posters as fast as they are answered, for the run's duration.
fn flat_out(plan: &Plan) -> Posting {
    Posting {
        posters: 32,
        rate: None,
        limit: None,
        duration: plan.duration,
    }
}

/// Callback → stream, flat out with 1 … N watchers, and at a fixed rate for latency.
async fn delivery(plan: &Plan, report: &mut Report) {
    let flat_out = flat_out(plan);
    for &count in &plan.watcher_counts {
        let facade = procs::facade(&delivery_env()).await;
        let watchers = scenarios::open_watchers(&[facade.grpc_addr], "w", count, count.min(100)).await;
        let (started, cpu) = (Instant::now(), procs::CpuSince::start(|| procs::cpu_ms(facade.pid())));
        let posted = scenarios::post_callbacks(facade.webhook_addr, "w", count, flat_out).await;
        let last = watchers.wait_for(posted.ok, Duration::from_secs(30)).await;
        let name = format!("delivery {count} watchers");
        report.deliveries(&name, &watchers, posted.ok, started, last);
        report.cpu_per_delivery(&name, cpu.used(), &watchers);
        if Some(&count) == plan.watcher_counts.last() {
            watchers.reset();
            let paced = Posting {
                rate: Some(plan.latency_rate),
                ..flat_out
            };
            let posted = scenarios::post_callbacks(facade.webhook_addr, "w", count, paced).await;
            watchers.wait_for(posted.ok, Duration::from_secs(30)).await;
            let name = format!("delivery at {}/s ({count} watchers)", plan.latency_rate);
            report.latency(&name, &watchers, posted.ok);
        }
    }
}

/// The bare HTTP baselines (plain and verifying), then saturated ingestion: the same posters flat out at a facade
/// nobody watches.
async fn ingestion(plan: &Plan, report: &mut Report) {
    for (name, args) in [("bare http", &[][..]), ("bare verifying http", &["--verify"])] {
        let bare = procs::baseline_with("bare-http", args).await;
        let pid = bare.child.id().expect("the baseline runs");
        saturate(plan, report, name, pid, bare.ready, 1).await;
    }
    let facade = procs::facade(&delivery_env()).await;
    saturate(
        plan,
        report,
        "ingest, no watcher",
        facade.pid(),
        facade.webhook_addr,
        1_000,
    )
    .await;
}

/// Posts callbacks over `requests` request_ids flat out at `target`, served by process `pid`: its load and its
/// CPU per call, as `name`.
async fn saturate(plan: &Plan, report: &mut Report, name: &str, pid: u32, target: SocketAddr, requests: usize) {
    let cpu = procs::CpuSince::start(|| procs::cpu_ms(pid));
    let load = scenarios::post_callbacks(target, "i", requests, flat_out(plan)).await;
    report.load(name, &load);
    report.cpu_per_call(name, cpu.used(), &load);
}

/// Many idle watches on one replica: resident memory per stream.
async fn idle(plan: &Plan, report: &mut Report) {
    // The replica's watch limits, raised to what the run opens (one caller, a share per connection; a caller's
    // limit must stay below the replica's).
    let room = plan.idle_watches + 10_000;
    let mut env = delivery_env();
    env.extend([
        ("CAPABILITY_MAX_WATCHES", (2 * room).to_string()),
        ("CAPABILITY_MAX_WATCHES_PER_CALLER", room.to_string()),
        (
            "CAPABILITY_MAX_WATCHES_PER_CONNECTION",
            (room / plan.idle_connections + 1_000).to_string(),
        ),
    ]);
    let facade = procs::facade(&env).await;
    // Warm the allocator and the runtime with a first batch, then measure from there.
    drop(scenarios::idle_watches(facade.grpc_addr, 1_000, plan.idle_connections).await);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = procs::rss(facade.pid());
    let streams = scenarios::idle_watches(facade.grpc_addr, plan.idle_watches, plan.idle_connections).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = procs::rss(facade.pid());
    report.add(
        &format!("idle watches ({}) RSS bytes per stream", plan.idle_watches),
        after.saturating_sub(before) as f64 / streams.len() as f64,
    );
    report.add("idle watches total RSS MiB", after as f64 / 1048576.0);
}

/// `count` replicas sharing a Redis: callbacks into the first, watchers on the others (on the first when it is
/// alone: the baseline, every notification still read back from Redis). Also how long the posts took to be
/// acknowledged.
async fn cross_replica(plan: &Plan, report: &mut Report, count: usize) {
    let redis = testkit::RedisServer::start().await;
    let mut env = delivery_env();
    env.push(("CAPABILITY_REDIS_URL", redis.url()));
    let mut replicas = Vec::with_capacity(count);
    for _ in 0..count {
        replicas.push(procs::facade(&env).await);
    }
    let others: Vec<_> = replicas[1.min(count - 1)..].iter().map(|r| r.grpc_addr).collect();
    let watchers = scenarios::open_watchers(&others, "x", plan.cross_watchers, 10).await;
    let paced = Posting {
        rate: Some(plan.cross_rate),
        ..flat_out(plan)
    };
    let posted = scenarios::post_callbacks(replicas[0].webhook_addr, "x", plan.cross_watchers, paced).await;
    watchers.wait_for(posted.ok, Duration::from_secs(30)).await;
    let name = cross_replica_name(plan, count);
    report.latency(&name, &watchers, posted.ok);
    report.add(&format!("{name} acknowledged p50 µs"), posted.p50_us() as f64);
    report.add(&format!("{name} acknowledged p99 µs"), posted.p99_us() as f64);
}

fn cross_replica_name(plan: &Plan, count: usize) -> String {
    match count {
        1 => format!("one replica with Redis at {}/s", plan.cross_rate),
        _ => format!("cross-replica at {}/s ({count} replicas)", plan.cross_rate),
    }
}

/// RSS of a fresh replica (`env` on top of the delivery scenario's) as it retains more and more notifications,
/// three per request (one per channel identity, as Sinch sends them), each a signed callback whose nonce is
/// remembered too. Alone, the replica also keeps the log's state (offsets, digests), the nonces and, in its
/// capability cache, each result (every identity here is new); with Redis, those live in Redis and the replica
/// holds only its hub.
async fn memory_vs_retained(plan: &Plan, env: &[(&str, String)]) -> Vec<(u64, u64)> {
    let env = [delivery_env(), env.to_vec()].concat();
    let facade = procs::facade(&env).await;
    let mut points = vec![(0, procs::rss(facade.pid()))];
    let mut retained = 0;
    for (step, &target) in plan.retained_steps.iter().enumerate() {
        let count = target - retained;
        let posting = Posting {
            limit: Some(count),
            duration: Duration::from_secs(600),
            ..flat_out(plan)
        };
        let prefix = format!("m{step}-");
        let requests = (count as usize).div_ceil(3);
        let posted = scenarios::post_callbacks(facade.webhook_addr, &prefix, requests, posting).await;
        retained += posted.ok;
        held(facade.admin_addr, retained).await;
        points.push((retained, procs::rss(facade.pid())));
    }
    points
}

/// Waits (at most a minute) until the replica's hub has taken `count` notifications from the log.
async fn held(admin: std::net::SocketAddr, count: u64) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while tokio::time::Instant::now() < deadline {
        let metrics = match reqwest::get(format!("http://{admin}/metrics")).await {
            Ok(response) => response.text().await.unwrap_or_default(),
            Err(_) => String::new(),
        };
        let published = metrics.lines().find_map(|l| {
            l.strip_prefix("capability_notifications_published_total ")?
                .trim()
                .parse::<f64>()
                .ok()
        });
        if published.is_some_and(|p| p as u64 >= count) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!("   the hub did not report {count} notifications within a minute; measuring anyway");
}
