//! The peer scenario (issue 16): the delivery scenario's callback → stream fan-out, done by Pushpin, the GRIP proxy,
//! as the best peer that installs here (`apt-get install pushpin`). Pushpin runs as a child process on free loopback
//! ports, everything of it in a temporary directory, its cap on published messages lifted. A GRIP origin in this
//! process holds each reader's GET as a stream on a channel of its own; readers (HTTP/1.1: one connection each)
//! time each message; publishers POST one message per request to Pushpin's HTTP publish endpoint, each the body of
//! a callback as the delivery scenario posts it, with its send time — and then, for Pushpin at its best, 32 per
//! request. Skipped, with one line, without Pushpin.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Stdio,
    time::{Duration, Instant},
};

use axum::{Router, extract::Path as UrlPath, response::IntoResponse, routing::get};
use testkit::{free_port, process::signal};
use tokio::process::{Child, Command};

use crate::{
    Plan, Report,
    procs::{CpuSince, Served},
    scenarios::{self, Posting, Watchers},
};

/// Messages per POST when Pushpin is fed at its best.
pub const BATCH: usize = 32;

/// Flat out with `plan.peer_streams` streams (as many as one of the delivery scenario's runs has watchers), then
/// at the delivery scenario's fixed rate for latency.
pub async fn run(plan: &Plan, report: &mut Report) {
    if !on_path("pushpin") {
        eprintln!(
            "   peer: skipped, `pushpin` is not on PATH (Debian/Ubuntu: `apt-get install pushpin`, which brings condure and zurl)"
        );
        return;
    }
    let count = plan.peer_streams;
    // HTTP/1.1 streams take a connection each, at both ends: the readers' and Pushpin's (which inherits the limit).
    let files = rlimit::increase_nofile_limit(u64::MAX).unwrap_or(0);
    assert!(
        files >= 3 * count as u64 + 1_000,
        "{count} streams need more open files than the {files} allowed: raise `ulimit -n`"
    );
    let origin = origin().await;
    let pushpin = Pushpin::start(origin.addr).await;
    let readers = subscribed_readers(&pushpin, count).await;
    let flat_out = crate::flat_out(plan);
    let name = format!("peer pushpin {count} streams");
    let (started, cpu) = (Instant::now(), CpuSince::start(|| pushpin.cpu_ms()));
    let published = publish(&pushpin, count, 1, flat_out).await;
    let last = readers.wait_for(published.ok, Duration::from_secs(30)).await;
    report.deliveries(&name, &readers, published.ok, started, last);
    report.cpu_per_delivery(&name, cpu.used(), &readers);
    if published.errors > 0 {
        report.add(&format!("{name} publish errors"), published.errors as f64);
    }
    // Pushpin at its best: publishing one message per POST (a new connection each) bounds what it is given, so
    // the same streams are fed again with BATCH messages per POST.
    readers.reset();
    let name = format!("peer pushpin {count} streams, {BATCH} per publish");
    let (started, cpu) = (Instant::now(), CpuSince::start(|| pushpin.cpu_ms()));
    let published = publish(&pushpin, count, BATCH, flat_out).await;
    let sent = published.ok * BATCH as u64;
    let last = readers.wait_for(sent, Duration::from_secs(30)).await;
    report.deliveries(&name, &readers, sent, started, last);
    report.cpu_per_delivery(&name, cpu.used(), &readers);
    readers.reset();
    let paced = Posting {
        rate: Some(plan.latency_rate),
        ..flat_out
    };
    let published = publish(&pushpin, count, 1, paced).await;
    readers.wait_for(published.ok, Duration::from_secs(30)).await;
    let name = format!("peer pushpin at {}/s ({count} streams)", plan.latency_rate);
    report.latency(&name, &readers, published.ok);
    // Each publish is a connection of its own (Pushpin answers `Connection: close`): the publishers may not
    // keep up with the schedule on a small machine, and then the rate they reached is what the latency is at.
    if published.rate() < 0.95 * plan.latency_rate as f64 {
        report.add(&format!("{name} published/s"), published.rate());
    }
}

/// Whether `program` is an executable file in a folder of `PATH`.
fn on_path(program: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(program).is_file()))
}

/// The GRIP origin: `GET /w/{k}` answers with an instruction to hold the response open as a stream on channel
/// `w-{k}`, and a first line that tells the reader it is subscribed.
async fn origin() -> Served {
    let hold = |UrlPath(k): UrlPath<String>| async move {
        let channel = format!("w-{k}");
        (
            [("grip-hold", "stream".to_owned()), ("grip-channel", channel)],
            SUBSCRIBED,
        )
            .into_response()
    };
    Served::start(Router::new().route("/w/{k}", get(hold))).await
}

/// Pushpin (its runner and the condure, zurl, pushpin-proxy and pushpin-handler it starts), configured in a
/// temporary directory that holds its sockets, its routes and its output. Stopped, all of it, when dropped.
struct Pushpin {
    child: Child,
    /// Where readers connect (condure).
    http: SocketAddr,
    /// The HTTP publish endpoint (pushpin-handler).
    publish: String,
    dir: PathBuf,
}

impl Pushpin {
    /// Starts Pushpin routing every request to `origin`; returns once it is ready. An instance that is not ready
    /// within 15 s is stopped and another started, three times at most: now and then one starts with a hop that
    /// never passes a message on ("received message out of sequence").
    async fn start(origin: SocketAddr) -> Pushpin {
        let mut log = String::new();
        for _ in 0..3 {
            let pushpin = Pushpin::spawn(origin);
            match pushpin.until_ready(Duration::from_secs(15)).await {
                Ok(()) => return pushpin,
                Err(output) => log = output,
            }
        }
        panic!("Pushpin was not ready within 15 s, three times; the last one's output:\n{log}");
    }

    /// Starts Pushpin routing every request to `origin`.
    fn spawn(origin: SocketAddr) -> Pushpin {
        let dir = std::env::temp_dir().join(format!("bench-pushpin-{}", ulid::Ulid::new()));
        std::fs::create_dir_all(dir.join("run")).expect("Pushpin's directory can be made");
        let http = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let publish_port = free_port();
        let config = dir.join("pushpin.conf");
        std::fs::write(&config, config_text(&dir, http, publish_port)).expect("the config is written");
        std::fs::write(dir.join("routes"), format!("* {origin}\n")).expect("the routes are written");
        let output = std::fs::File::create(dir.join("pushpin.log")).expect("the log file can be made");
        let child = Command::new("pushpin")
            .arg("--config")
            .arg(&config)
            .arg("--merge-output")
            .stdin(Stdio::null())
            .stdout(output.try_clone().expect("the log file can be shared"))
            .stderr(output)
            .kill_on_drop(true)
            .spawn()
            .expect("pushpin starts");
        Pushpin {
            child,
            http,
            publish: format!("http://127.0.0.1:{publish_port}/publish/"),
            dir,
        }
    }

    /// Waits until a stream opened through Pushpin receives what is published to it: each hop (condure,
    /// pushpin-proxy, zurl, pushpin-handler) is a ZeroMQ socket that connects in its own time.
    async fn until_ready(&self, limit: Duration) -> Result<(), String> {
        let http = scenarios::http_client(1);
        let deadline = Instant::now() + limit;
        let round_trip = async || {
            let mut stream = http.get(format!("http://{}/w/ready", self.http)).send().await.ok()?;
            let mut buffer = Vec::new();
            (next_line(&mut stream, &mut buffer).await? == SUBSCRIBED.as_bytes()).then_some(())?;
            let published = publish_request(&http, &self.publish, vec![item("w-ready", "ready\n".into())])
                .send()
                .await;
            published.ok()?.status().is_success().then_some(())?;
            let line = tokio::time::timeout(Duration::from_secs(1), next_line(&mut stream, &mut buffer)).await;
            (line.ok()?? == b"ready\n").then_some(())
        };
        // A round trip that hangs (a hop that takes a request and never answers) counts as failed.
        while tokio::time::timeout(Duration::from_secs(3), round_trip())
            .await
            .ok()
            .flatten()
            .is_none()
        {
            if Instant::now() >= deadline {
                return Err(std::fs::read_to_string(self.dir.join("pushpin.log")).unwrap_or_default());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(())
    }

    /// CPU time used by all of Pushpin's processes (the runner and what it started), in milliseconds.
    fn cpu_ms(&self) -> u64 {
        let Some(pid) = self.child.id() else {
            return 0;
        };
        let mut all = descendants(pid);
        all.push(pid);
        all.into_iter().map(crate::procs::cpu_ms).sum()
    }
}

impl Drop for Pushpin {
    /// The runner stops the processes it started when asked to (SIGTERM); whatever is left after 5 s is killed.
    fn drop(&mut self) {
        if let Some(pid) = self.child.id() {
            let mut all = descendants(pid);
            all.push(pid);
            signal("TERM", &[pid]);
            for _ in 0..500 {
                if !matches!(self.child.try_wait(), Ok(None)) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            let left: Vec<u32> = all
                .into_iter()
                .filter(|p| Path::new(&format!("/proc/{p}")).exists())
                .collect();
            if !left.is_empty() {
                signal("KILL", &left);
                let _ = self.child.try_wait();
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The processes descended from `pid`, from /proc.
fn descendants(pid: u32) -> Vec<u32> {
    let (mut all, mut next) = (Vec::new(), vec![pid]);
    while let Some(parent) = next.pop() {
        let tasks = std::fs::read_dir(format!("/proc/{parent}/task"))
            .into_iter()
            .flatten()
            .flatten();
        for task in tasks {
            let children = std::fs::read_to_string(task.path().join("children")).unwrap_or_default();
            let children: Vec<u32> = children.split_whitespace().filter_map(|p| p.parse().ok()).collect();
            all.extend(&children);
            next.extend(children);
        }
    }
    all
}

/// Pushpin's configuration: the package's defaults where they do not matter, and where they do, each said why.
fn config_text(dir: &Path, http: SocketAddr, publish_port: u16) -> String {
    let dir = dir.display();
    format!(
        "# Generated by the benchmark harness (bench/src/peer.rs).
[global]
include={{libdir}}/internal.conf
# Every socket and pid file of this instance in its own directory, nothing under /var/run.
rundir={dir}/run
ipc_prefix=bench-
port_offset=0

[runner]
# Debian's Pushpin expects the system's zurl service (/var/run/zurl): this instance starts its own.
services=condure,zurl,pushpin-proxy,pushpin-handler
http_port={http}
logdir={dir}
# Warnings and errors only: info logs a line per request and per publish, which the facade does not.
log_level=1
client_maxconn=50000

[proxy]
routesfile=routes
updates_check=off
zurl_out_specs=ipc://{{rundir}}/{{ipc_prefix}}zurl-in
zurl_out_stream_specs=ipc://{{rundir}}/{{ipc_prefix}}zurl-in-stream
zurl_in_specs=ipc://{{rundir}}/{{ipc_prefix}}zurl-out

[handler]
push_in_spec=ipc://{{rundir}}/{{ipc_prefix}}push-in
push_in_sub_specs=ipc://{{rundir}}/{{ipc_prefix}}push-in-sub
push_in_http_addr=127.0.0.1
push_in_http_port={publish_port}
stats_spec=ipc://{{rundir}}/{{ipc_prefix}}stats
command_spec=ipc://{{rundir}}/{{ipc_prefix}}command
# No cap on published messages (the default is 2,500/s). Not a high one either: any rate puts publishes through a
# limiter whose 25 ms batch timer each publish restarts (Pushpin 1.36), so that under a steady load above 40/s they
# wait for a gap, ever longer (seconds at 500/s). -1 leaves the limiter out; the queue bound stays, far above the load.
message_rate=-1
message_hwm=1000000
"
    )
}

/// The first line the origin sends on each stream.
const SUBSCRIBED: &str = "subscribed\n";

/// Opens `count` streams through Pushpin and publishes one message to each: opens them all again (at most twice)
/// when one misses it, as Pushpin cancels a few streams of a burst of subscriptions now and then ("received message
/// out of sequence, canceling"). Returns them reset, each known to receive what is published to it.
async fn subscribed_readers(pushpin: &Pushpin, count: usize) -> Watchers {
    for _ in 0..3 {
        let readers = open_readers(pushpin.http, count).await;
        let one_each = Posting {
            posters: 32,
            rate: None,
            limit: Some(count as u64),
            duration: Duration::from_secs(60),
        };
        let published = publish(pushpin, count, 1, one_each).await;
        readers.wait_for(count as u64, Duration::from_secs(5)).await;
        let delivered = readers.delivered();
        if published.ok == count as u64 && delivered == count as u64 {
            readers.reset();
            return readers;
        }
        eprintln!(
            "   peer: {} of {count} streams missed the first message; opening them all again",
            count as u64 - delivered.min(count as u64)
        );
    }
    panic!("streams opened through Pushpin keep missing messages published to them");
}

/// Opens `count` streams through Pushpin, `GET /w/{k}` for k in 0..count, each on its own connection, 100 at a
/// time; returns once each has read its first line (it is subscribed) or failed. Each later line is a callback's
/// body: counted and timed.
async fn open_readers(http: SocketAddr, count: usize) -> Watchers {
    let client = reqwest::Client::builder()
        .tcp_nodelay(true)
        .build()
        .expect("a plain HTTP client builds");
    let mut readers = Watchers::new();
    for chunk in (0..count).collect::<Vec<_>>().chunks(100) {
        let subscribed = futures::future::join_all(chunk.iter().map(|k| {
            let request = client.get(format!("http://{http}/w/{k}"));
            async move {
                let mut stream = request.send().await.ok()?;
                let mut buffer = Vec::new();
                (next_line(&mut stream, &mut buffer).await? == SUBSCRIBED.as_bytes()).then_some((stream, buffer))
            }
        }))
        .await;
        for (mut stream, mut buffer) in subscribed.into_iter().flatten() {
            let record = readers.recorder();
            readers.keep(tokio::spawn(async move {
                while let Some(line) = next_line(&mut stream, &mut buffer).await {
                    if let Some(sent) = sent_at(&line) {
                        record(sent);
                    }
                }
            }));
        }
    }
    readers
}

/// The next line of `stream` (with its `\n`), `buffer` holding what was read past it; `None` at its end.
async fn next_line(stream: &mut reqwest::Response, buffer: &mut Vec<u8>) -> Option<Vec<u8>> {
    loop {
        if let Some(end) = buffer.iter().position(|&b| b == b'\n') {
            return Some(buffer.drain(..=end).collect());
        }
        buffer.extend_from_slice(&stream.chunk().await.ok()??);
    }
}

/// The send time (ns) a callback's body carries in its `correlation_id`.
fn sent_at(body: &[u8]) -> Option<u128> {
    let body: serde_json::Value = serde_json::from_slice(body).ok()?;
    body["correlation_id"].as_str()?.parse().ok()
}

/// Publishes callbacks' bodies, `batch` per POST, to channels `w-0` … `w-{count-1}` in turn, as `posting` says
/// (its load counts POSTs).
async fn publish(pushpin: &Pushpin, count: usize, batch: usize, posting: Posting) -> scenarios::Load {
    let http = scenarios::http_client(posting.posters);
    let url = pushpin.publish.clone();
    scenarios::post_loop(posting, move |n| {
        let items = (0..batch as u64)
            .map(|i| {
                let m = n * batch as u64 + i;
                let k = m as usize % count;
                let mut content =
                    String::from_utf8(scenarios::callback_body(&format!("w{k}"), m)).expect("JSON is UTF-8");
                content.push('\n');
                item(&format!("w-{k}"), content)
            })
            .collect();
        let request = publish_request(&http, &url, items);
        async move { matches!(request.send().await, Ok(r) if r.status().is_success()) }
    })
    .await
}

/// One message of a publish: `content`, for the HTTP streams on `channel`.
fn item(channel: &str, content: String) -> serde_json::Value {
    serde_json::json!({"channel": channel, "formats": {"http-stream": {"content": content}}})
}

/// A POST of `items` to Pushpin's publish endpoint `url`.
fn publish_request(http: &reqwest::Client, url: &str, items: Vec<serde_json::Value>) -> reqwest::RequestBuilder {
    http.post(url)
        .header("content-type", "application/json")
        .body(serde_json::json!({ "items": items }).to_string())
}
