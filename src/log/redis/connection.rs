//! Reaching Redis: one node or a Redis Cluster, from `CAPABILITY_REDIS_URL`, and the server version check.
//!
//! The URL names one node (`redis://host:port`, `rediss://` for TLS) or a cluster: several comma-separated
//! node URLs (`redis://a:6379,redis://b:6379`), or one seed node with the `redis+cluster://` (or
//! `rediss+cluster://`) scheme. A cluster client learns every other node from the seeds.

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use arc_swap::ArcSwap;
use redis::{
    AsyncConnectionConfig, Client, ConnectionInfo, ErrorKind, IntoConnectionInfo, RedisFuture, ServerErrorKind,
    TlsCertificates, Value,
    aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig, MultiplexedConnection},
    cluster::{ClusterClient, ClusterConfig},
    cluster_async::ClusterConnection,
};

/// The oldest Redis this service works with: `XADD … MINID` came with 6.2.
pub const MIN_VERSION: (u32, u32) = (6, 2);

/// Why `CAPABILITY_REDIS_URL` cannot be used. Messages never contain the URL (it may carry a password).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UrlError {
    #[error("empty")]
    Empty,
    #[error("entry {0} is not a redis://, rediss://, redis+cluster:// or rediss+cluster:// URL with a host")]
    Malformed(usize),
    #[error("entry {0}: {1}")]
    Unusable(usize, String),
}

/// Where Redis is.
#[derive(Debug, Clone)]
pub enum Target {
    Single(Box<ConnectionInfo>),
    Cluster(Vec<ConnectionInfo>),
}

impl Target {
    /// Reads `CAPABILITY_REDIS_URL`.
    pub fn parse(url: &str) -> Result<Target, UrlError> {
        let parts: Vec<&str> = url.split(',').map(str::trim).filter(|p| !p.is_empty()).collect();
        if parts.is_empty() {
            return Err(UrlError::Empty);
        }
        let mut cluster = parts.len() > 1;
        let mut nodes = Vec::with_capacity(parts.len());
        for (i, part) in parts.iter().enumerate() {
            let entry = i + 1;
            let (scheme, rest) = part.split_once("://").ok_or(UrlError::Malformed(entry))?;
            let scheme = match scheme {
                "redis" | "rediss" => scheme,
                "redis+cluster" => {
                    cluster = true;
                    "redis"
                }
                "rediss+cluster" => {
                    cluster = true;
                    "rediss"
                }
                _ => return Err(UrlError::Malformed(entry)),
            };
            let plain = format!("{scheme}://{rest}");
            if redis::parse_redis_url(&plain)
                .and_then(|u| u.host_str().map(str::len))
                .unwrap_or(0)
                == 0
            {
                return Err(UrlError::Malformed(entry));
            }
            let info = plain
                .as_str()
                .into_connection_info()
                .map_err(|e| UrlError::Unusable(entry, format!("{:?}", e.kind())))?;
            nodes.push(info);
        }
        Ok(if cluster {
            Target::Cluster(nodes)
        } else {
            Target::Single(Box::new(nodes.pop().expect("one node")))
        })
    }

    /// Every node named in the URL.
    fn nodes(&self) -> Vec<ConnectionInfo> {
        match self {
            Target::Single(node) => vec![(**node).clone()],
            Target::Cluster(nodes) => nodes.clone(),
        }
    }
}

/// A connection that sends any command to the right node: a connection manager for one node, a cluster
/// connection (which routes by key) for a cluster. Both reconnect by themselves.
#[derive(Clone)]
pub enum Connection {
    Single(Single),
    Cluster(ClusterConnection),
    /// A connection of its own, for a blocking reader.
    Dedicated(MultiplexedConnection),
}

/// The connection manager of one node, made anew after an error other than an I/O one: redis-rs's manager keeps
/// such an error, met while it connects (Redis refusing the credentials, `HELLO` or `SELECT`), as its connection,
/// and never connects again (<https://github.com/redis-rs/redis-rs/issues/984>), so that a replica whose
/// credentials were refused once (a password rotated, a user switched off a moment) stayed without Redis until
/// restarted. Which error came from connecting cannot be told from one a command met, hence any but a script
/// not loaded yet (which redis-rs loads, and the only one this service's commands meet in the ordinary course), at
/// most once per [`REMAKE_PAUSE`].
#[derive(Clone)]
pub struct Single(Arc<SingleNode>);

struct SingleNode {
    client: Client,
    manager: ArcSwap<ConnectionManager>,
    /// When the manager was last made anew: at most once per [`REMAKE_PAUSE`], whatever the commands failing.
    remade: Mutex<Instant>,
}

/// The least time between two managers made anew.
const REMAKE_PAUSE: Duration = Duration::from_secs(1);

impl Single {
    fn new(client: Client) -> Result<Single, redis::RedisError> {
        let manager = Single::manager(&client)?;
        Ok(Single(Arc::new(SingleNode {
            client,
            manager: ArcSwap::from_pointee(manager),
            remade: Mutex::new(Instant::now()),
        })))
    }

    fn manager(client: &Client) -> Result<ConnectionManager, redis::RedisError> {
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_response_timeout(Some(RESPONSE_TIMEOUT))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_secs(2));
        ConnectionManager::new_lazy_with_config(client.clone(), config)
    }

    /// The manager now.
    fn current(&self) -> ConnectionManager {
        ConnectionManager::clone(&self.0.manager.load())
    }

    /// `result`, the manager made anew first if it says so (see [`Single`]).
    fn checked<T>(&self, result: redis::RedisResult<T>) -> redis::RedisResult<T> {
        if let Err(e) = &result {
            self.after(e);
        }
        result
    }

    /// Makes the manager anew after `error`, unless it is an I/O one (the manager connects again by itself) or a
    /// script not loaded yet.
    fn after(&self, error: &redis::RedisError) {
        if error.is_io_error() || error.kind() == ErrorKind::Server(ServerErrorKind::NoScript) {
            return;
        }
        let mut remade = self.0.remade.lock().expect("remade lock poisoned");
        if remade.elapsed() < REMAKE_PAUSE {
            return;
        }
        if let Ok(manager) = Single::manager(&self.0.client) {
            self.0.manager.store(Arc::new(manager));
            *remade = Instant::now();
        }
    }
}

impl ConnectionLike for Connection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a redis::Cmd) -> RedisFuture<'a, Value> {
        match self {
            Connection::Single(single) => {
                let mut manager = single.current();
                Box::pin(async move { single.checked(manager.req_packed_command(cmd).await) })
            }
            Connection::Cluster(c) => c.req_packed_command(cmd),
            Connection::Dedicated(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Connection::Single(single) => {
                let mut manager = single.current();
                Box::pin(async move { single.checked(manager.req_packed_commands(pipeline, offset, count).await) })
            }
            Connection::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
            Connection::Dedicated(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Connection::Single(single) => single.0.manager.load().get_db(),
            Connection::Cluster(c) => c.get_db(),
            Connection::Dedicated(c) => c.get_db(),
        }
    }
}

/// How to open connections to the target.
pub struct Connector {
    target: Target,
    /// The CA certificates (PEM) that vouch for the nodes, rather than the system's roots.
    ca: Option<Vec<u8>>,
    single: Option<Client>,
    /// For commands, and for blocking reads (whose response timeout must outlast the block: a cluster client
    /// applies its own to every connection it makes).
    cluster: Option<(ClusterClient, ClusterClient)>,
}

/// How long a connection attempt may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// How long a command (not a blocking read) may take.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(2);

impl Connector {
    /// Prepares clients for `target`, whose blocking reads block up to `block`, trusting the CA certificates `ca`
    /// (PEM) rather than the system's roots when given; nothing is connected yet.
    pub fn new(target: Target, block: Duration, ca: Option<&[u8]>) -> Result<Connector, UrlError> {
        let unusable = |e: redis::RedisError| UrlError::Unusable(1, format!("{:?}", e.kind()));
        let cluster = |nodes: &[ConnectionInfo], response: Duration| {
            let builder = ClusterClient::builder(nodes.to_vec())
                .connection_timeout(CONNECT_TIMEOUT)
                .response_timeout(response)
                .retries(2);
            match ca {
                Some(pem) => builder.certs(certificates(pem)),
                None => builder,
            }
            .build()
            .map_err(unusable)
        };
        let (single, cluster) = match &target {
            Target::Single(info) => (Some(client(info, ca).map_err(unusable)?), None),
            Target::Cluster(nodes) => (
                None,
                Some((
                    cluster(nodes, RESPONSE_TIMEOUT)?,
                    cluster(nodes, block + RESPONSE_TIMEOUT)?,
                )),
            ),
        };
        Ok(Connector {
            target,
            ca: ca.map(<[u8]>::to_vec),
            single,
            cluster,
        })
    }

    /// The shared connection for commands; connects lazily, so a replica starts while Redis is down.
    pub fn commands(&self) -> Result<Connection, redis::RedisError> {
        if let Some(client) = &self.single {
            return Single::new(client.clone()).map(Connection::Single);
        }
        let (cluster, _) = self.cluster.as_ref().expect("single or cluster");
        let config = ClusterConfig::new()
            .set_connection_timeout(CONNECT_TIMEOUT)
            .set_response_timeout(RESPONSE_TIMEOUT);
        Ok(Connection::Cluster(
            cluster.get_pending_async_connection_with_config(config),
        ))
    }

    /// A new connection of its own, whose commands may block up to `block` (for `XREAD BLOCK`).
    pub async fn dedicated(&self, block: Duration) -> Result<Connection, redis::RedisError> {
        let response = block + RESPONSE_TIMEOUT;
        if let Some(client) = &self.single {
            let config = AsyncConnectionConfig::new()
                .set_connection_timeout(Some(CONNECT_TIMEOUT))
                .set_response_timeout(Some(response));
            return client
                .get_multiplexed_async_connection_with_config(&config)
                .await
                .map(Connection::Dedicated);
        }
        let (_, blocking) = self.cluster.as_ref().expect("single or cluster");
        let config = ClusterConfig::new()
            .set_connection_timeout(CONNECT_TIMEOUT)
            .set_response_timeout(response);
        blocking
            .get_async_connection_with_config(config)
            .await
            .map(Connection::Cluster)
    }

    /// The `maxmemory_policy` of the first node named in the URL that answers; `None` when none does.
    pub async fn eviction_policy(&self) -> Option<String> {
        for node in self.target.nodes() {
            let config = AsyncConnectionConfig::new()
                .set_connection_timeout(Some(CONNECT_TIMEOUT))
                .set_response_timeout(Some(RESPONSE_TIMEOUT));
            let Ok(mut conn) = client(&node, self.ca.as_deref())
                .ok()?
                .get_multiplexed_async_connection_with_config(&config)
                .await
            else {
                continue;
            };
            let info: String = redis::cmd("INFO").arg("memory").query_async(&mut conn).await.ok()?;
            return info
                .lines()
                .find_map(|l| l.strip_prefix("maxmemory_policy:"))
                .map(|policy| policy.trim().to_owned());
        }
        None
    }

    /// The lowest server version among the nodes named in the URL; `Ok(None)` when none answers (the service
    /// then starts degraded and connects later). A node that answers but refuses the connection (a wrong
    /// password, a TLS failure) is an error: waiting would not mend it.
    pub async fn server_version(&self) -> Result<Option<(u32, u32)>, redis::RedisError> {
        let mut lowest: Option<(u32, u32)> = None;
        for node in self.target.nodes() {
            let config = AsyncConnectionConfig::new()
                .set_connection_timeout(Some(CONNECT_TIMEOUT))
                .set_response_timeout(Some(RESPONSE_TIMEOUT));
            let mut conn = match client(&node, self.ca.as_deref())?
                .get_multiplexed_async_connection_with_config(&config)
                .await
            {
                Ok(conn) => conn,
                Err(e) if unreachable(&e) => continue,
                Err(e) => return Err(e),
            };
            let info: String = redis::cmd("INFO").arg("server").query_async(&mut conn).await?;
            let version = info
                .lines()
                .find_map(|l| l.strip_prefix("redis_version:"))
                .and_then(parse_version);
            if let Some(version) = version {
                lowest = Some(lowest.map_or(version, |l| l.min(version)));
            }
        }
        Ok(lowest)
    }
}

/// `major.minor[.patch]` → (major, minor).
fn parse_version(text: &str) -> Option<(u32, u32)> {
    let mut parts = text.trim().split('.');
    Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
}

/// A client of one node, trusting the CA certificates `ca` (PEM) rather than the system's roots when given.
fn client(node: &ConnectionInfo, ca: Option<&[u8]>) -> redis::RedisResult<Client> {
    match ca {
        Some(pem) => Client::build_with_tls(node.clone(), certificates(pem)),
        None => Client::open(node.clone()),
    }
}

fn certificates(ca: &[u8]) -> TlsCertificates {
    TlsCertificates {
        client_tls: None,
        root_cert: Some(ca.to_vec()),
    }
}

/// Whether no node could be reached: down, refusing connections, or not answering in time. A TLS handshake that
/// failed (nothing trusted vouches for the node's certificate, or it names another host) is not: the node
/// answered, and asking again would not mend it.
pub fn unreachable(e: &redis::RedisError) -> bool {
    // redis-rs keeps the I/O error behind an `Arc`; rustls's own error is the I/O error's payload.
    let untrusted = std::error::Error::source(e)
        .and_then(|cause| cause.downcast_ref::<std::sync::Arc<dyn std::error::Error + Send + Sync>>())
        .and_then(|cause| cause.downcast_ref::<std::io::Error>())
        .and_then(std::io::Error::get_ref)
        .is_some_and(|payload| payload.is::<rustls::Error>());
    !untrusted && (e.is_io_error() || e.is_connection_refusal() || e.is_timeout() || e.is_connection_dropped())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_url_is_one_node_and_several_or_a_cluster_scheme_are_a_cluster() {
        assert!(matches!(Target::parse("redis://127.0.0.1:6379"), Ok(Target::Single(_))));
        assert!(matches!(
            Target::parse("redis://:pw@127.0.0.1:6379/2"),
            Ok(Target::Single(_))
        ));
        assert!(matches!(
            Target::parse("redis://a:1, redis://b:2"),
            Ok(Target::Cluster(nodes)) if nodes.len() == 2
        ));
        assert!(matches!(
            Target::parse("redis+cluster://a:1"),
            Ok(Target::Cluster(nodes)) if nodes.len() == 1
        ));
    }

    #[test]
    fn unusable_urls_say_which_entry_without_repeating_it() {
        assert_eq!(Target::parse("").unwrap_err(), UrlError::Empty);
        assert_eq!(Target::parse("http://x").unwrap_err(), UrlError::Malformed(1));
        assert_eq!(Target::parse("redis://a:1,nohost").unwrap_err(), UrlError::Malformed(2));
        assert_eq!(Target::parse("redis://").unwrap_err(), UrlError::Malformed(1));
        let message = Target::parse("redis://:secretpw@a:1,postgres://:secretpw@b")
            .unwrap_err()
            .to_string();
        assert!(!message.contains("secretpw"), "{message}");
    }

    #[test]
    fn versions_compare_by_major_then_minor() {
        assert_eq!(parse_version("7.0.15"), Some((7, 0)));
        assert!(parse_version("6.0.9").unwrap() < MIN_VERSION);
        assert!(parse_version("6.2.0").unwrap() >= MIN_VERSION);
        assert_eq!(parse_version("x"), None);
    }
}
