//! The processes a benchmark runs: the facade (the binary beside this one), the standalone sandbox, Redis, and the
//! bare baselines (`bench echo`, `bench proxy`, `bench bare-http`); and the harness's own HTTP servers.

use std::{net::SocketAddr, path::PathBuf};

use testkit::{Binary, Spawned, free_port, spawn_until};
use tokio::{process::Command, task::JoinHandle};

/// An HTTP server of the harness itself on a free loopback port, stopped when dropped.
pub struct Served {
    pub addr: SocketAddr,
    task: JoinHandle<()>,
}

impl Served {
    pub async fn start(router: axum::Router) -> Served {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("a loopback port");
        let addr = listener.local_addr().expect("a bound address");
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, router).await;
        });
        Served { addr, task }
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Resident memory of process `pid`, in bytes, from /proc.
pub fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// CPU time process `pid` has used (user and system, all its threads), in milliseconds, from /proc (which counts
/// in ticks of 10 ms on Linux).
pub fn cpu_ms(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // After the command's name, in parentheses: field 3 (state) first, so utime (14) and stime (15) at 11 and 12.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map_or_else(Vec::new, |(_, rest)| rest.split_whitespace().collect());
    let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok()).unwrap_or(0);
    (ticks(11) + ticks(12)) * 10
}

/// CPU time used, in milliseconds: a server's (all its processes) and the harness's own, the load generator's.
#[derive(Clone, Copy)]
pub struct Cpu {
    pub server: u64,
    pub generator: u64,
}

/// Measures the [`Cpu`] used from its start; `server` reads the server's CPU time so far.
pub struct CpuSince<F> {
    server: F,
    from: Cpu,
}

impl<F: Fn() -> u64> CpuSince<F> {
    pub fn start(server: F) -> CpuSince<F> {
        let from = Cpu {
            server: server(),
            generator: cpu_ms(std::process::id()),
        };
        CpuSince { server, from }
    }

    /// What was used since the start.
    pub fn used(&self) -> Cpu {
        Cpu {
            server: (self.server)().saturating_sub(self.from.server),
            generator: cpu_ms(std::process::id()).saturating_sub(self.from.generator),
        }
    }
}

/// The facade's binary: built into the same target directory as this one.
fn facade_binary() -> PathBuf {
    let exe = std::env::current_exe().expect("the harness knows where it is");
    exe.with_file_name("capability-facade")
}

/// The facade, with `env` on top of loopback listeners on free ports and JSON logs.
pub async fn facade(env: &[(&str, String)]) -> Binary {
    let mut all = vec![("RUST_LOG", "warn,capability_facade=info".to_owned())];
    all.extend_from_slice(env);
    Binary::spawn(facade_binary(), &all).await
}

/// The standalone sandbox (no callbacks), as a Sinch for the query benchmark; `ready` is its address.
pub async fn sandbox() -> Spawned<SocketAddr> {
    sandbox_with(SocketAddr::from(([127, 0, 0, 1], free_port())), &[]).await
}

/// The standalone sandbox on `addr` with more arguments (`--callback-url`, knobs); `ready` is its address.
/// Without Sinch's 800 requests/s per project: the harness measures the facade, not Sinch's limit.
pub async fn sandbox_with(addr: SocketAddr, args: &[String]) -> Spawned<SocketAddr> {
    let mut command = Command::new(facade_binary());
    command
        .args(["sandbox", "--listen", &addr.to_string(), "--sandbox-project-rate=0"])
        .args(args)
        .env("RUST_LOG", "info");
    spawn_until(command, move |line| {
        line.contains("Sinch sandbox listening").then_some(addr)
    })
    .await
}

/// One of this harness's own baseline servers (`echo` or `bare-http`); `ready` is its address.
pub async fn baseline(kind: &str) -> Spawned<SocketAddr> {
    baseline_with(kind, &[]).await
}

/// The same, with more arguments (`bench proxy --upstream URL`).
pub async fn baseline_with(kind: &str, args: &[&str]) -> Spawned<SocketAddr> {
    let mut command = Command::new(std::env::current_exe().expect("the harness knows where it is"));
    command.args([kind, "--listen", "127.0.0.1:0"]).args(args);
    spawn_until(command, |line| line.strip_prefix("listening ")?.trim().parse().ok()).await
}
