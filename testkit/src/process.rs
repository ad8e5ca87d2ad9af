//! Child processes: spawned with their output read line by line, awaited until a line says they are ready, and
//! killed when their handle is dropped. [`Binary`] is the service's own binary.

use std::{
    net::SocketAddr,
    path::Path,
    process::{ExitStatus, Stdio},
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::{
    io::{AsyncBufReadExt, BufReader},
    process::{Child, Command},
    sync::{Notify, oneshot, watch},
};

/// Every line a process wrote so far, stdout and stderr interleaved as they were read.
pub type Log = Arc<Mutex<Vec<String>>>;

/// How long a process may take to say that it is ready.
const READY_WITHIN: Duration = Duration::from_secs(30);

/// A free TCP port on 127.0.0.1 (free when asked: another process may take it before it is bound again).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

/// A process that said it is ready, and what it said.
pub struct Spawned<T> {
    /// The process; killed when dropped.
    pub child: Child,
    /// What the readiness check took from the line that said the process was ready.
    pub ready: T,
    /// Its output, kept up to date until it exits.
    pub log: Log,
    /// Notified each time a line is added to `log`.
    pub grew: Arc<Notify>,
    /// Turns true once both of its pipes reached their end: the log then holds every line.
    pub log_complete: watch::Receiver<bool>,
}

/// Spawns `command` (stdin closed, killed on drop) and reads its stdout and stderr until `ready` takes something
/// from a line; keeps reading them to the end, into the log, so that the process never blocks on a full pipe.
/// Panics, with the log, when the process ends or stays silent for 30 s before it is ready.
pub async fn spawn_until<T, F>(command: Command, ready: F) -> Spawned<T>
where
    T: Send + 'static,
    F: FnMut(&str) -> Option<T> + Send + 'static,
{
    let program = command.as_std().get_program().to_owned();
    try_spawn_until(command, ready)
        .await
        .unwrap_or_else(|log| panic!("{program:?} ended before it was ready: {log:?}"))
}

/// As [`spawn_until`], but a process that ends before it is ready is an error: its log.
pub async fn try_spawn_until<T, F>(mut command: Command, mut ready: F) -> Result<Spawned<T>, Vec<String>>
where
    T: Send + 'static,
    F: FnMut(&str) -> Option<T> + Send + 'static,
{
    command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let program = command.as_std().get_program().to_owned();
    let mut child = command
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {program:?}: {e}"));
    let mut out = BufReader::new(child.stdout.take().expect("stdout is piped")).lines();
    let mut err = BufReader::new(child.stderr.take().expect("stderr is piped")).lines();
    let log = Log::default();
    let grew = Arc::new(Notify::new());
    let (tx, rx) = oneshot::channel();
    let (lines, grown) = (log.clone(), grew.clone());
    let (complete_tx, log_complete) = watch::channel(false);
    tokio::spawn(async move {
        let mut tx = Some(tx);
        let (mut out_open, mut err_open) = (true, true);
        while out_open || err_open {
            let line = tokio::select! {
                line = out.next_line(), if out_open => line.ok().flatten().or_else(|| { out_open = false; None }),
                line = err.next_line(), if err_open => line.ok().flatten().or_else(|| { err_open = false; None }),
            };
            let Some(line) = line else { continue };
            if tx.is_some()
                && let Some(found) = ready(&line)
                && let Some(tx) = tx.take()
            {
                let _ = tx.send(found);
            }
            lines.lock().expect("the log lock").push(line);
            grown.notify_waiters();
        }
        let _ = complete_tx.send(true);
    });
    match tokio::time::timeout(READY_WITHIN, rx).await {
        Ok(Ok(ready)) => Ok(Spawned {
            child,
            ready,
            log,
            grew,
            log_complete,
        }),
        // Its output ended (the reader let the sender go): the log holds every line.
        Ok(Err(_)) => Err(log.lock().unwrap().clone()),
        Err(_) => panic!(
            "{program:?} was not ready within {READY_WITHIN:?}: {:?}",
            log.lock().unwrap()
        ),
    }
}

/// Sends the signal named `name` (`TERM`, `KILL`, `STOP`, …) to each of `pids`; whether every one was sent.
pub fn signal(name: &str, pids: &[u32]) -> bool {
    std::process::Command::new("kill")
        .arg(format!("-{name}"))
        .args(pids.iter().map(u32::to_string))
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success())
}

/// The service's real binary, on loopback listeners, its addresses read from its JSON log.
pub struct Binary {
    /// The process; killed when dropped.
    pub child: Child,
    /// Where it serves gRPC.
    pub grpc_addr: SocketAddr,
    /// Where it receives callbacks.
    pub webhook_addr: SocketAddr,
    /// Where it serves metrics and probes.
    pub admin_addr: SocketAddr,
    /// Every log line so far.
    pub log: Log,
    /// Notified each time a line is added to `log`.
    grew: Arc<Notify>,
    /// Turns true once the process closed its output and every line is in `log`.
    log_complete: watch::Receiver<bool>,
}

/// The environment that runs a process's wall clock `offset` ahead of (or, with a `-`, behind) this machine's, as
/// libfaketime reads it (`+60s`); its monotonic clock, which timers use, is left alone. Panics when libfaketime is
/// not installed (Debian's package `faketime`; found where Debian, Fedora or Arch put it).
pub fn clock_offset(offset: &str) -> Vec<(&'static str, String)> {
    let multiarch = std::fs::read_dir("/usr/lib")
        .into_iter()
        .flatten()
        .flatten()
        .map(|dir| dir.path());
    let library = multiarch
        .chain(["/usr/lib", "/usr/lib64"].map(std::path::PathBuf::from))
        .map(|dir| dir.join("faketime/libfaketime.so.1"))
        .find(|library| library.exists())
        .expect("libfaketime is not installed (Debian: apt-get install faketime)");
    vec![
        ("LD_PRELOAD", library.display().to_string()),
        ("FAKETIME", offset.to_owned()),
        ("FAKETIME_DONT_FAKE_MONOTONIC", "1".to_owned()),
    ]
}

impl Binary {
    /// Starts `program`, the service's binary, with an empty environment but for `PATH`, its three listeners on
    /// free ports of 127.0.0.1 and JSON logs, then `env` on top; returns once it logged where it listens.
    pub async fn spawn(program: impl AsRef<Path>, env: &[(&str, String)]) -> Binary {
        let mut command = Command::new(program.as_ref());
        command
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("CAPABILITY_GRPC_ADDR", "127.0.0.1:0")
            .env("CAPABILITY_WEBHOOK_ADDR", "127.0.0.1:0")
            .env("CAPABILITY_ADMIN_ADDR", "127.0.0.1:0")
            .env("CAPABILITY_SANDBOX_ADDR", "127.0.0.1:0")
            .env("CAPABILITY_LOG_FORMAT", "json");
        for (k, v) in env {
            command.env(k, v);
        }
        let spawned = spawn_until(command, |line| {
            let v: serde_json::Value = serde_json::from_str(line).ok()?;
            if v["message"] != "listening" {
                return None;
            }
            let addr = |name: &str| v[name].as_str()?.parse::<SocketAddr>().ok();
            Some((addr("grpc")?, addr("webhook")?, addr("admin")?))
        })
        .await;
        let (grpc_addr, webhook_addr, admin_addr) = spawned.ready;
        Binary {
            child: spawned.child,
            grpc_addr,
            webhook_addr,
            admin_addr,
            log: spawned.log,
            grew: spawned.grew,
            log_complete: spawned.log_complete,
        }
    }

    /// Waits until `count` lines of the log satisfy `matches`, and returns them.
    pub async fn until_logged(&self, count: usize, matches: impl Fn(&str) -> bool) -> Vec<String> {
        loop {
            let grew = self.grew.notified();
            let found: Vec<String> = self
                .log
                .lock()
                .expect("the log lock")
                .iter()
                .filter(|l| matches(l))
                .cloned()
                .collect();
            if found.len() >= count {
                return found;
            }
            grew.await;
        }
    }

    /// The gRPC address as a URL.
    pub fn url(&self) -> String {
        format!("http://{}", self.grpc_addr)
    }

    /// Its process id; panics once it has been reaped.
    pub fn pid(&self) -> u32 {
        self.child.id().expect("still running")
    }

    /// Sends it a signal by name (`TERM`, `STOP`, `CONT`, …).
    pub fn signal(&self, name: &str) {
        assert!(signal(name, &[self.pid()]), "kill -{name} failed");
    }

    /// Waits for the process to exit, at most `limit`.
    pub async fn wait_exit(&mut self, limit: Duration) -> Option<ExitStatus> {
        tokio::time::timeout(limit, self.child.wait())
            .await
            .ok()
            .map(|status| status.expect("the exit status can be read"))
    }

    /// Stops the process (SIGTERM), waits at most `limit` for it to exit and for its last line to be read; the
    /// whole log.
    pub async fn stop_and_read_log(&mut self, limit: Duration) -> String {
        self.signal("TERM");
        let mut complete = self.log_complete.clone();
        let ended = tokio::time::timeout(limit, async {
            self.child.wait().await.expect("the exit status can be read");
            complete
                .wait_for(|done| *done)
                .await
                .expect("the reader reports its end");
        })
        .await;
        assert!(ended.is_ok(), "the process did not stop within {limit:?}");
        self.log_text()
    }

    /// The log so far, one line after the other.
    pub fn log_text(&self) -> String {
        self.log.lock().expect("the log lock").join("\n")
    }
}

/// Kills `child` (SIGKILL) and reaps it, waiting at most 5 s; for `Drop`, where nothing can be awaited.
pub(crate) fn kill_now(child: &mut Child) {
    if child.start_kill().is_err() {
        return; // it has exited already
    }
    for _ in 0..500 {
        if !matches!(child.try_wait(), Ok(None)) {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}
