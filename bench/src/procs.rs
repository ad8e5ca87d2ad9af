//! The processes a benchmark runs: the facade (release binary beside this one), the standalone sandbox, Redis,
//! and the two bare baselines (`bench echo`, `bench bare-http`).

use std::{
    net::SocketAddr,
    path::PathBuf,
    process::Stdio,
    time::{Duration, Instant},
};

use tokio::{
    io::{AsyncBufReadExt, BufReader},
    process::{Child, Command},
};

/// A child process, killed when dropped.
pub struct Proc {
    pub child: Child,
    /// The addresses it reported (facade: grpc, webhook, admin; others: one).
    pub addrs: Vec<SocketAddr>,
}

impl Proc {
    pub fn pid(&self) -> u32 {
        self.child.id().expect("running")
    }

    /// Resident memory, in bytes, from /proc.
    pub fn rss(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map_or(0, |kb| kb * 1024)
    }
}

fn sibling(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("the harness knows where it is");
    exe.with_file_name(name)
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

/// Spawns `command` and waits for a stderr/stdout line from which `parse` takes the addresses.
async fn spawn(mut command: Command, parse: impl Fn(&str) -> Option<Vec<SocketAddr>>) -> Proc {
    command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .stdin(Stdio::null())
        .kill_on_drop(true);
    let mut child = command.spawn().expect("the process starts");
    let mut out = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut err = BufReader::new(child.stderr.take().unwrap()).lines();
    let started = Instant::now();
    let addrs = loop {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the process did not report its address"
        );
        let line = tokio::select! {
            line = out.next_line() => line,
            line = err.next_line() => line,
        };
        match line {
            Ok(Some(line)) => {
                if let Some(addrs) = parse(&line) {
                    break addrs;
                }
            }
            _ => panic!("the process ended before reporting its address"),
        }
    };
    // Keep draining its output so that it never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = out.next_line().await {} });
    tokio::spawn(async move { while let Ok(Some(_)) = err.next_line().await {} });
    Proc { child, addrs }
}

/// The facade, with `env` on top of loopback listeners on free ports and JSON logs.
pub async fn facade(env: &[(&str, String)]) -> Proc {
    let mut command = Command::new(sibling("capability-facade"));
    command
        .env_clear()
        .env("CAPABILITY_GRPC_ADDR", "127.0.0.1:0")
        .env("CAPABILITY_WEBHOOK_ADDR", "127.0.0.1:0")
        .env("CAPABILITY_ADMIN_ADDR", "127.0.0.1:0")
        .env("CAPABILITY_LOG_FORMAT", "json")
        .env("RUST_LOG", "warn,capability_facade=info");
    for (k, v) in env {
        command.env(k, v);
    }
    spawn(command, |line| {
        let v: serde_json::Value = serde_json::from_str(line).ok()?;
        (v["message"] == "listening").then(|| {
            ["grpc", "webhook", "admin"]
                .iter()
                .map(|k| v[k].as_str().unwrap().parse().unwrap())
                .collect()
        })
    })
    .await
}

/// The standalone sandbox (no callbacks), as a Sinch for the query benchmark.
pub async fn sandbox() -> Proc {
    let port = free_port();
    let mut command = Command::new(sibling("capability-facade"));
    command
        .args(["sandbox", "--listen", &format!("127.0.0.1:{port}")])
        .env("RUST_LOG", "info");
    spawn(command, move |line| {
        line.contains("Sinch sandbox listening")
            .then(|| vec![SocketAddr::from(([127, 0, 0, 1], port))])
    })
    .await
}

/// One of this harness's own baseline servers (`echo` or `bare-http`).
pub async fn baseline(kind: &str) -> Proc {
    let mut command = Command::new(std::env::current_exe().unwrap());
    command.args([kind, "--listen", "127.0.0.1:0"]);
    spawn(command, |line| {
        line.strip_prefix("listening ").map(|a| vec![a.trim().parse().unwrap()])
    })
    .await
}

/// A redis-server on a free port, nothing kept on disk.
pub async fn redis() -> Proc {
    let port = free_port();
    let mut command = Command::new("redis-server");
    command.args([
        "--port",
        &port.to_string(),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
    ]);
    spawn(command, move |line| {
        line.contains("Ready to accept connections")
            .then(|| vec![SocketAddr::from(([127, 0, 0, 1], port))])
    })
    .await
}
