//! A real redis-server for one test, on a free loopback port, that the test can kill and restart.

use std::process::Stdio;

use tokio::{
    io::{AsyncBufReadExt, BufReader},
    process::{Child, Command},
};

pub struct RedisServer {
    pub port: u16,
    child: Option<Child>,
    /// Where an append-only file keeps every acknowledged write across restarts; `None`: nothing is kept.
    durable: Option<std::path::PathBuf>,
}

impl RedisServer {
    pub async fn start() -> RedisServer {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut server = RedisServer {
            port,
            child: None,
            durable: None,
        };
        server.restart().await;
        server
    }

    /// A server configured as production runs it: every write on disk (AOF, fsync always) before it is
    /// acknowledged, so that a restart keeps what was acknowledged.
    pub async fn start_durable() -> RedisServer {
        let mut server = RedisServer::start().await;
        server.kill().await;
        let dir = std::env::temp_dir().join(format!("capability-redis-{}", server.port));
        std::fs::create_dir_all(&dir).unwrap();
        server.durable = Some(dir);
        server.restart().await;
        server
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Starts redis-server on the same port (nothing is kept from before unless durable) and waits until it
    /// accepts.
    pub async fn restart(&mut self) {
        let mut command = Command::new("redis-server");
        command.args(["--port", &self.port.to_string(), "--bind", "127.0.0.1", "--save", ""]);
        match &self.durable {
            None => command.args(["--appendonly", "no"]),
            Some(dir) => command
                .args(["--appendonly", "yes", "--appendfsync", "always", "--dir"])
                .arg(dir),
        };
        let mut child = command
            .args(["--loglevel", "notice", "--daemonize", "no"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("redis-server is installed (.ci/run installs it)");
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let ready = tokio::time::timeout(std::time::Duration::from_secs(10), async {
            while let Ok(Some(line)) = lines.next_line().await {
                if line.contains("Ready to accept connections") {
                    return true;
                }
            }
            false
        })
        .await;
        assert_eq!(ready, Ok(true), "redis-server did not start on port {}", self.port);
        // Keep reading its output so that it never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        self.child = Some(child);
    }

    /// SIGKILL: no goodbye to clients.
    pub async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().await.unwrap();
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        if let Some(dir) = &self.durable {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}
