//! A real Redis Cluster for one test: N masters on free loopback ports, every slot assigned, no replicas; a node
//! can be killed and restarted with its cluster identity.

use std::{path::PathBuf, time::Duration};

use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::TcpStream,
    process::{Child, Command},
};

use crate::{
    process::{free_port, kill_now},
    redis::{on_a_free_port, ready},
};

/// How long the cluster may take to be formed, or to be whole again after a restart. A master that was marked
/// failed clears the mark only after twice the node timeout (15 s by default).
const OK_WITHIN: Duration = Duration::from_secs(60);

/// Redis Cluster's bus listens on the client port plus this.
const BUS_OFFSET: u16 = 10_000;

/// N redis-servers in cluster mode on 127.0.0.1, their slots spread by `redis-cli --cluster create`; every
/// process is killed and the directory of their cluster files removed when dropped.
pub struct RedisCluster {
    /// The node's ports, in creation order.
    ports: Vec<u16>,
    /// The running nodes; `None` while killed.
    nodes: Vec<Option<Child>>,
    /// Where each node keeps its cluster file (`nodes-PORT.conf`), which a restarted node rejoins with.
    dir: PathBuf,
}

impl RedisCluster {
    /// Starts `masters` nodes (at least 3, as Redis Cluster requires), joins them with every slot assigned and
    /// no replica, and returns once every node reports `cluster_state:ok`.
    pub async fn start(masters: usize) -> RedisCluster {
        assert!(masters >= 3, "a Redis Cluster needs at least 3 masters, not {masters}");
        let dir = std::env::temp_dir().join(format!("testkit-cluster-{}", ulid::Ulid::new()));
        std::fs::create_dir_all(&dir).expect("the cluster directory can be made");
        let mut cluster = RedisCluster {
            ports: vec![0; masters],
            nodes: (0..masters).map(|_| None).collect(),
            dir,
        };
        for i in 0..masters {
            let (port, node) = on_a_free_port(cluster_port, |port| cluster.node_command(port)).await;
            (cluster.ports[i], cluster.nodes[i]) = (port, Some(node));
        }
        let mut create = Command::new("redis-cli");
        create
            .arg("--cluster")
            .arg("create")
            .args(cluster.ports.iter().map(|p| format!("127.0.0.1:{p}")))
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .kill_on_drop(true);
        let output = tokio::time::timeout(OK_WITHIN, create.output())
            .await
            .expect("redis-cli --cluster create ends")
            .expect("redis-cli runs");
        assert!(
            output.status.success(),
            "redis-cli --cluster create failed: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        cluster.wait_ok().await;
        cluster
    }

    /// `redis://127.0.0.1:port` of every node, in creation order.
    pub fn urls(&self) -> Vec<String> {
        self.ports.iter().map(|p| format!("redis://127.0.0.1:{p}")).collect()
    }

    /// The port of every node, in creation order.
    pub fn ports(&self) -> Vec<u16> {
        self.ports.clone()
    }

    /// SIGKILLs node `i`: no goodbye to clients or to the other nodes.
    pub async fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.nodes[i].take() {
            child.kill().await.expect("a cluster node can be killed");
        }
    }

    /// Starts node `i` again on its port with its cluster file (its data is gone: nothing is persisted), and
    /// returns once every node reports `cluster_state:ok`.
    pub async fn restart(&mut self, i: usize) {
        self.kill(i).await;
        self.nodes[i] = Some(ready(self.node_command(self.ports[i])).await);
        self.wait_ok().await;
    }

    /// Runs one command on node `i` (`CLIENT PAUSE 3000 WRITE`, …) and returns its reply; fails if it fails.
    pub async fn command(&self, i: usize, args: &[&str]) -> String {
        command(self.ports[i], args)
            .await
            .unwrap_or_else(|e| panic!("{args:?} on node {i}: {e}"))
    }

    /// The node (in creation order) that serves `key`'s slot: the others answer a command on it with `MOVED`.
    pub async fn node_of(&self, key: &str) -> usize {
        for (i, &port) in self.ports.iter().enumerate() {
            match command(port, &["EXISTS", key]).await {
                Ok(_) => return i,
                Err(e) if e.to_string().starts_with("MOVED") => {}
                Err(e) => panic!("EXISTS {key} on node {i}: {e}"),
            }
        }
        panic!("no node serves {key}");
    }

    fn node_command(&self, port: u16) -> Command {
        let port = port.to_string();
        let mut command = Command::new("redis-server");
        command
            .args(["--port", &port, "--bind", "127.0.0.1", "--cluster-enabled", "yes"])
            .args(["--cluster-config-file", &format!("nodes-{port}.conf"), "--dir"])
            .arg(&self.dir)
            .args(["--save", "", "--appendonly", "no", "--daemonize", "no"]);
        command
    }

    /// Waits until every node reports `cluster_state:ok` and knows every other; panics after [`OK_WITHIN`].
    async fn wait_ok(&self) {
        let known = format!("cluster_known_nodes:{}", self.ports.len());
        let started = tokio::time::Instant::now();
        let mut last = Vec::new();
        while started.elapsed() < OK_WITHIN {
            last.clear();
            for &port in &self.ports {
                let info = tokio::time::timeout(Duration::from_secs(1), command(port, &["CLUSTER", "INFO"])).await;
                last.push(match info {
                    Ok(Ok(info)) => info,
                    Ok(Err(e)) => e.to_string(),
                    Err(_) => "no answer within 1 s".to_owned(),
                });
            }
            if last.iter().all(|info| {
                let lines: Vec<&str> = info.lines().map(str::trim).collect();
                lines.contains(&"cluster_state:ok") && lines.contains(&known.as_str())
            }) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!(
            "the cluster on {:?} was not ok within {OK_WITHIN:?}: {last:?}",
            self.ports
        );
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for child in self.nodes.iter_mut().flatten() {
            kill_now(child);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A free loopback port whose cluster bus port (plus 10,000) is free too.
fn cluster_port() -> u16 {
    for _ in 0..100 {
        let port = free_port();
        if let Some(bus) = port.checked_add(BUS_OFFSET)
            && std::net::TcpListener::bind(("127.0.0.1", bus)).is_ok()
        {
            return port;
        }
    }
    panic!("no free loopback port with a free cluster bus port");
}

/// Sends one command to the node on `port` in RESP and returns its reply: a simple string, an integer, or the
/// text of a bulk string; an error reply is an error.
async fn command(port: u16, args: &[&str]) -> std::io::Result<String> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).await?;
    let mut request = format!("*{}\r\n", args.len());
    for arg in args {
        request.push_str(&format!("${}\r\n{arg}\r\n", arg.len()));
    }
    stream.write_all(request.as_bytes()).await?;
    let mut reader = BufReader::new(stream);
    let mut first = String::new();
    reader.read_line(&mut first).await?;
    let first = first.trim_end();
    let (kind, rest) = first.split_at(first.len().min(1));
    match kind {
        "+" | ":" => Ok(rest.to_owned()),
        "-" => Err(std::io::Error::other(rest.to_owned())),
        "$" => {
            let Ok(len) = rest.parse::<usize>() else {
                return Ok(String::new()); // $-1: nil
            };
            let mut body = vec![0; len + 2];
            reader.read_exact(&mut body).await?;
            body.truncate(len);
            String::from_utf8(body).map_err(std::io::Error::other)
        }
        _ => Err(std::io::Error::other(format!("an unexpected reply: {first:?}"))),
    }
}
