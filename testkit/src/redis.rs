//! A real redis-server for one test or benchmark, on a free loopback port, that the caller can kill and restart.

use std::path::PathBuf;

use tokio::process::{Child, Command};

use crate::process::{free_port, kill_now, spawn_until, try_spawn_until};

/// One redis-server on 127.0.0.1; killed (and its directory removed) when dropped.
pub struct RedisServer {
    /// Its port, the same across restarts.
    pub port: u16,
    /// The running server; `None` while killed.
    child: Option<Child>,
    /// Where an append-only file keeps every acknowledged write across restarts; `None`: nothing is kept.
    durable: Option<PathBuf>,
}

impl RedisServer {
    /// A server that keeps nothing on disk: a restart empties it.
    pub async fn start() -> RedisServer {
        RedisServer::start_with(None).await
    }

    /// A server configured as production runs it: every write on disk (AOF, fsync always) before it is
    /// acknowledged, so that a restart keeps what was acknowledged.
    pub async fn start_durable() -> RedisServer {
        let dir = std::env::temp_dir().join(format!("testkit-redis-{}", ulid::Ulid::new()));
        std::fs::create_dir_all(&dir).expect("the AOF directory can be made");
        RedisServer::start_with(Some(dir)).await
    }

    async fn start_with(durable: Option<PathBuf>) -> RedisServer {
        let (port, child) = on_a_free_port(free_port, |port| server_command(port, durable.as_deref())).await;
        RedisServer {
            port,
            child: Some(child),
            durable,
        }
    }

    /// `redis://127.0.0.1:port`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// The keys matching `pattern`, as `redis-cli --scan` lists them.
    pub fn keys(&self, pattern: &str) -> Vec<String> {
        let out = std::process::Command::new("redis-cli")
            .args(["-p", &self.port.to_string(), "--scan", "--pattern", pattern])
            .output()
            .expect("redis-cli runs");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_owned)
            .collect()
    }

    /// Runs one command with redis-cli, as an operator would (`CLIENT PAUSE 1000 WRITE`, …); fails if it fails.
    /// Returns what it printed, trimmed.
    pub fn command(&self, args: &[&str]) -> String {
        let out = std::process::Command::new("redis-cli")
            .args(["-p", &self.port.to_string()])
            .args(args)
            .output()
            .expect("redis-cli runs");
        assert!(
            out.status.success() && !out.stdout.starts_with(b"ERR"),
            "{args:?}: {out:?}"
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// The value of string key `key` (empty when there is none), as `redis-cli GET` prints it.
    pub fn value(&self, key: &str) -> String {
        self.command(&["GET", key])
    }

    /// How many clients have a command held by a `CLIENT PAUSE` now. Clients blocked in `XREAD BLOCK`, as every
    /// replica's log reader always is between two entries, are not counted (`INFO`'s `blocked_clients` counts them).
    pub fn held(&self) -> usize {
        self.command(&["CLIENT", "LIST"])
            .lines()
            .filter(|line| {
                let field = |name: &str| line.split(' ').find_map(|f| f.strip_prefix(name)).unwrap_or_default();
                field("flags=").contains('b') && field("cmd=") != "xread"
            })
            .count()
    }

    /// Waits until `count` clients have a command held by a `CLIENT PAUSE` (see [`RedisServer::held`]): what a test
    /// holds still.
    pub async fn until_held(&self, count: usize) {
        for _ in 0..1_000 {
            if self.held() >= count {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        panic!("{count} clients never held");
    }

    /// Sets a configuration value at run time (`CONFIG SET name value`), as an operator would with redis-cli.
    pub fn config_set(&self, name: &str, value: &str) {
        self.command(&["CONFIG", "SET", name, value]);
    }

    /// Starts redis-server on the same port (nothing is kept from before unless durable) and waits until it
    /// accepts connections.
    pub async fn restart(&mut self) {
        self.child = Some(ready(server_command(self.port, self.durable.as_deref())).await);
    }

    /// SIGKILL: no goodbye to clients.
    pub async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().await.expect("redis-server can be killed");
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        if let Some(child) = &mut self.child {
            kill_now(child);
        }
        if let Some(dir) = &self.durable {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// A redis-server on `port`, keeping nothing (or, `durable`, an append-only file in that directory).
fn server_command(port: u16, durable: Option<&std::path::Path>) -> Command {
    let mut command = Command::new("redis-server");
    command.args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", ""]);
    match durable {
        None => command.args(["--appendonly", "no"]),
        Some(dir) => command
            .args(["--appendonly", "yes", "--appendfsync", "always", "--dir"])
            .arg(dir),
    };
    command.args(["--loglevel", "notice", "--daemonize", "no"]);
    command
}

/// Spawns a configured redis-server and waits until it accepts connections.
pub(crate) async fn ready(command: Command) -> Child {
    spawn_until(command, accepting).await.child
}

fn accepting(line: &str) -> Option<()> {
    line.contains("Ready to accept connections").then_some(())
}

/// Starts the redis-server `command(port)` makes on a port `pick` finds free, and waits until it accepts
/// connections: the port, and the server. A free port may be taken before redis-server binds it (by another
/// test's server, or as the ephemeral port of a connection): another is picked then, a few times.
pub async fn on_a_free_port(pick: fn() -> u16, command: impl Fn(u16) -> Command) -> (u16, Child) {
    let mut taken = Vec::new();
    for _ in 0..5 {
        let port = pick();
        match try_spawn_until(command(port), accepting).await {
            Ok(spawned) => return (port, spawned.child),
            Err(log) if log.iter().any(|line| line.contains("Address already in use")) => taken.push(port),
            Err(log) => panic!("redis-server ended before it was ready: {log:?}"),
        }
    }
    panic!("redis-server found each port it was given taken: {taken:?}");
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU16, Ordering};

    use super::*;

    /// A port taken between its pick and redis-server's bind is given up for another: a cluster test failed in CI
    /// when one of its nodes found its port taken so.
    #[tokio::test]
    async fn a_port_taken_before_redis_binds_it_is_given_up_for_another() {
        static TAKEN: AtomicU16 = AtomicU16::new(0);
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        TAKEN.store(taken.local_addr().unwrap().port(), Ordering::SeqCst);
        // The taken port first, then free ones.
        fn pick() -> u16 {
            match TAKEN.swap(0, Ordering::SeqCst) {
                0 => free_port(),
                port => port,
            }
        }
        let (port, mut child) = on_a_free_port(pick, |port| server_command(port, None)).await;
        assert_ne!(port, taken.local_addr().unwrap().port());
        assert!(
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok(),
            "redis-server listens on {port}"
        );
        kill_now(&mut child);
    }
}
