//! The Redis backplane: one stream of events, one reader per replica, nonces and idempotency records with
//! expiry. Commands go through a connection manager (it reconnects by itself); the blocking reader has a
//! connection of its own.

use std::{
    collections::VecDeque,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use rand::Rng;
use redis::{
    AsyncConnectionConfig, Client, Script,
    aio::{ConnectionManager, ConnectionManagerConfig},
    streams::{StreamId, StreamReadReply},
};
use tokio_util::sync::CancellationToken;

use super::{Accepted, IdempotencyClaim, Nonce, Unavailable};
use crate::{
    capability::{Notification, QueryAccepted},
    config::Secret,
    hub::Hub,
    upstream::wire::QueryJson,
    webhook::parse::{self, Callback},
};

/// How long one `XREAD` blocks before it asks again.
const BLOCK: Duration = Duration::from_secs(2);
/// The most entries one `XREAD` returns.
const BATCH: usize = 1024;
/// How long this replica keeps the events it appended, to append them again should Redis come back empty: far
/// longer than any reader lags behind a live Redis.
const RECENT: Duration = Duration::from_secs(10);
/// The most events kept for that, whatever the rate.
const MAX_RECENT: usize = 100_000;
/// How long a claim on a request_id lasts while its query is in flight: a replica that dies (or a caller that
/// cancels) mid-query blocks the request_id no longer than this. Once answered, the record lasts the window.
const PENDING_CLAIM: Duration = Duration::from_secs(30);

/// Claims the nonce (when given) and appends the event (when given), atomically, in one round trip.
/// KEYS: nonce key ("" when unsigned), stream. ARGV: nonce ttl (ms), MINID, this attempt's token, then the
/// entry's field/value pairs. Returns 1 when done — also when this same token did it before (a retry after a
/// lost answer) — and 0 when another callback used the nonce.
const ACCEPT: &str = r"
if KEYS[1] ~= '' then
  if not redis.call('SET', KEYS[1], ARGV[3], 'NX', 'PX', ARGV[1]) then
    if redis.call('GET', KEYS[1]) == ARGV[3] then return 1 end
    return 0
  end
end
if #ARGV > 3 then
  local args = {'XADD', KEYS[2], 'MINID', '~', ARGV[2], '*'}
  for i = 4, #ARGV do args[#args + 1] = ARGV[i] end
  redis.call(unpack(args))
end
return 1
";

/// How to reach Redis and what to keep there.
#[derive(Debug, Clone)]
pub struct RedisConfig {
    pub url: Secret,
    pub prefix: String,
    /// Events older than this are trimmed, and a starting replica reads back this far.
    pub retention: Duration,
    /// How long a request_id is remembered.
    pub idempotency_window: Duration,
}

/// The events stream and shared records of all replicas.
pub struct RedisBackplane {
    client: Client,
    /// Commands (XADD, SET, GET); reconnects by itself.
    commands: ConnectionManager,
    /// `{prefix}:events`.
    stream: String,
    config: RedisConfig,
    accept: Script,
    /// The reader's last view of Redis, for logs and the `capability_backplane_up` gauge.
    up: AtomicBool,
    /// `{prefix}:epoch`: a value set once per Redis dataset; a different value means Redis lost its data.
    epoch_key: String,
    /// The epoch this replica last saw.
    epoch: Mutex<Option<String>>,
    /// The events this replica appended lately, oldest first, as their stream fields.
    recent: Mutex<VecDeque<(Instant, Fields)>>,
}

/// A stream entry's field/value pairs.
type Fields = Vec<(&'static str, Vec<u8>)>;

impl RedisBackplane {
    /// Prepares the backplane; connections are made lazily, so a replica starts while Redis is down.
    pub fn new(config: RedisConfig) -> Result<RedisBackplane, String> {
        let client =
            Client::open(config.url.expose()).map_err(|e| format!("CAPABILITY_REDIS_URL is not usable: {e}"))?;
        let manager = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(1)))
            .set_response_timeout(Some(Duration::from_secs(2)))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_secs(2));
        let commands = ConnectionManager::new_lazy_with_config(client.clone(), manager)
            .map_err(|e| format!("cannot prepare the Redis connection: {e}"))?;
        Ok(RedisBackplane {
            client,
            commands,
            stream: format!("{}:events", config.prefix),
            epoch_key: format!("{}:epoch", config.prefix),
            config,
            accept: Script::new(ACCEPT),
            up: AtomicBool::new(false),
            epoch: Mutex::new(None),
            recent: Mutex::new(VecDeque::new()),
        })
    }

    /// Keeps `fields` among the recent events, forgetting those past [`RECENT`].
    fn remember(&self, fields: Fields) {
        let now = Instant::now();
        let mut recent = self.recent.lock().expect("recent lock poisoned");
        while recent
            .front()
            .is_some_and(|(at, _)| now.duration_since(*at) > RECENT || recent.len() >= MAX_RECENT)
        {
            recent.pop_front();
        }
        recent.push_back((now, fields));
    }

    /// Whether Redis lost its data since this replica last looked (its epoch changed or vanished); sets one
    /// when there is none.
    async fn lost_data(&self, conn: &mut redis::aio::MultiplexedConnection) -> redis::RedisResult<bool> {
        let _: Option<String> = redis::cmd("SET")
            .arg(&self.epoch_key)
            .arg(ulid::Ulid::new().to_string())
            .arg("NX")
            .query_async(conn)
            .await?;
        let current: Option<String> = redis::cmd("GET").arg(&self.epoch_key).query_async(conn).await?;
        let mut known = self.epoch.lock().expect("epoch lock poisoned");
        let lost = known.is_some() && *known != current;
        *known = current;
        Ok(lost)
    }

    /// Appends this replica's recent events again, after Redis lost them: readers that had them drop the
    /// copies (the hub ignores a body it holds), readers that missed them catch up.
    async fn republish(&self, conn: &mut redis::aio::MultiplexedConnection) -> redis::RedisResult<usize> {
        let events: Vec<Fields> = {
            let recent = self.recent.lock().expect("recent lock poisoned");
            recent.iter().map(|(_, fields)| fields.clone()).collect()
        };
        if events.is_empty() {
            return Ok(0);
        }
        let mut pipe = redis::pipe();
        for fields in &events {
            let command = pipe
                .cmd("XADD")
                .arg(&self.stream)
                .arg("MINID")
                .arg("~")
                .arg(self.minid())
                .arg("*");
            for (name, value) in fields {
                command.arg(*name).arg(value.as_slice());
            }
            command.ignore();
        }
        pipe.query_async::<()>(conn).await?;
        Ok(events.len())
    }

    fn minid(&self) -> String {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
        now.saturating_sub(self.config.retention).as_millis().to_string()
    }

    pub(super) async fn accept(
        &self,
        nonce: Option<Nonce<'_>>,
        notification: Option<(Arc<Notification>, &[u8])>,
    ) -> Result<Accepted, Unavailable> {
        let mut invocation = self.accept.prepare_invoke();
        invocation
            .key(
                nonce
                    .map(|n| format!("{}:nonce:{}", self.config.prefix, n.value))
                    .unwrap_or_default(),
            )
            .key(&self.stream)
            .arg(nonce.map_or(1, |n| n.remember_for.as_millis().max(1) as u64))
            .arg(self.minid())
            .arg(ulid::Ulid::new().to_string());
        let fields: Option<Fields> = notification.map(|(notification, body)| {
            let received = notification
                .received_time
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default();
            vec![
                ("k", b"n".to_vec()),
                ("b", body.to_vec()),
                ("t", (received.as_micros() as u64).to_string().into_bytes()),
            ]
        });
        for (name, value) in fields.iter().flatten() {
            invocation.arg(*name).arg(value.as_slice());
        }
        // A connection found broken (Redis restarted) is replaced by the manager: try once more on it. The token
        // makes the second try harmless if the first one ran but its answer was lost.
        let mut conn = self.commands.clone();
        let mut result = invocation.invoke_async::<i64>(&mut conn).await;
        if let Err(e) = &result
            && (e.is_io_error() || e.is_connection_dropped())
        {
            result = invocation.invoke_async::<i64>(&mut conn).await;
        }
        match result {
            Ok(1) => {
                if let Some(fields) = fields {
                    self.remember(fields);
                }
                Ok(Accepted::Published)
            }
            Ok(_) => Ok(Accepted::Replayed),
            Err(e) => Err(Unavailable(e.to_string())),
        }
    }

    pub(super) async fn record_query(&self, request_id: &str, expected: Option<&[String]>) -> redis::RedisResult<()> {
        let fields: Fields = vec![
            ("k", b"q".to_vec()),
            ("r", request_id.as_bytes().to_vec()),
            (
                "e",
                if expected.is_some() {
                    b"1".to_vec()
                } else {
                    b"0".to_vec()
                },
            ),
            ("c", expected.map(|c| c.join(",")).unwrap_or_default().into_bytes()),
        ];
        let mut command = redis::cmd("XADD");
        command
            .arg(&self.stream)
            .arg("MINID")
            .arg("~")
            .arg(self.minid())
            .arg("*");
        for (name, value) in &fields {
            command.arg(*name).arg(value.as_slice());
        }
        command.query_async::<String>(&mut self.commands.clone()).await?;
        self.remember(fields);
        Ok(())
    }

    fn idempotency_key(&self, request_id: &str) -> String {
        format!("{}:idem:{request_id}", self.config.prefix)
    }

    pub(super) async fn claim_request_id(
        &self,
        request_id: &str,
        fingerprint: &str,
    ) -> redis::RedisResult<IdempotencyClaim> {
        let key = self.idempotency_key(request_id);
        let mut conn = self.commands.clone();
        let pending = serde_json::json!({ "q": fingerprint }).to_string();
        let set: Option<String> = redis::cmd("SET")
            .arg(&key)
            .arg(&pending)
            .arg("NX")
            .arg("PX")
            .arg(PENDING_CLAIM.as_millis() as u64)
            .query_async(&mut conn)
            .await?;
        if set.is_some() {
            return Ok(IdempotencyClaim::Owner);
        }
        let Some(stored) = redis::cmd("GET")
            .arg(&key)
            .query_async::<Option<String>>(&mut conn)
            .await?
        else {
            // The other claim was released between our SET and GET: ask again.
            return Ok(IdempotencyClaim::Pending);
        };
        let stored: serde_json::Value = serde_json::from_str(&stored).unwrap_or_default();
        if stored["q"] != fingerprint {
            return Ok(IdempotencyClaim::Conflict);
        }
        Ok(match serde_json::from_value::<QueryJson>(stored["a"].clone()) {
            Ok(answer) => IdempotencyClaim::Answered(answer.into()),
            Err(_) => IdempotencyClaim::Pending,
        })
    }

    pub(super) async fn settle_request_id(
        &self,
        request_id: &str,
        fingerprint: &str,
        answer: Option<&QueryAccepted>,
    ) -> redis::RedisResult<()> {
        let key = self.idempotency_key(request_id);
        let mut conn = self.commands.clone();
        match answer {
            Some(answer) => {
                let stored = serde_json::json!({ "q": fingerprint, "a": QueryJson::from(answer) }).to_string();
                redis::cmd("SET")
                    .arg(&key)
                    .arg(stored)
                    .arg("XX")
                    .arg("PX")
                    .arg(self.config.idempotency_window.as_millis() as u64)
                    .query_async::<Option<String>>(&mut conn)
                    .await
                    .map(drop)
            }
            None => redis::cmd("DEL")
                .arg(&key)
                .query_async::<i64>(&mut conn)
                .await
                .map(drop),
        }
    }

    /// Feeds `hub` with every event of the stream, from `now − retention` on, until `shutdown`. Reconnects with
    /// jittered back-off after an outage and resumes after the last entry it saw: no gap, no repeat.
    pub async fn run_reader(self: Arc<Self>, hub: Arc<Hub>, shutdown: CancellationToken) {
        let mut last_id = format!("{}-0", self.minid());
        let mut pause = Duration::from_millis(50);
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(1)))
            .set_response_timeout(Some(BLOCK + Duration::from_secs(3)));
        loop {
            let connected = match self.client.get_multiplexed_async_connection_with_config(&config).await {
                Ok(mut conn) => self.recover(&mut conn).await.map(|()| conn),
                Err(e) => Err(e),
            };
            let error = match connected {
                Ok(mut conn) => loop {
                    let mut command = redis::cmd("XREAD");
                    command
                        .arg("COUNT")
                        .arg(BATCH)
                        .arg("BLOCK")
                        .arg(BLOCK.as_millis() as u64)
                        .arg("STREAMS")
                        .arg(&self.stream)
                        .arg(&last_id);
                    let read = command.query_async::<Option<StreamReadReply>>(&mut conn);
                    let reply = tokio::select! {
                        reply = read => reply,
                        () = shutdown.cancelled() => return,
                    };
                    match reply {
                        Ok(reply) => {
                            self.set_up(true, None);
                            pause = Duration::from_millis(50);
                            for entry in reply.into_iter().flat_map(|r| r.keys).flat_map(|k| k.ids) {
                                apply(&hub, &entry);
                                last_id = entry.id;
                            }
                        }
                        Err(e) => break e,
                    }
                },
                Err(e) => e,
            };
            self.set_up(false, Some(&error));
            let jittered = pause.mul_f64(0.5 + rand::rng().random::<f64>() * 0.5);
            tokio::select! {
                () = tokio::time::sleep(jittered) => {}
                () = shutdown.cancelled() => return,
            }
            pause = (pause * 2).min(Duration::from_secs(5));
        }
    }

    /// On (re)connecting: when Redis came back without its data, appends this replica's recent events again.
    async fn recover(&self, conn: &mut redis::aio::MultiplexedConnection) -> redis::RedisResult<()> {
        if self.lost_data(conn).await? {
            let count = self.republish(conn).await?;
            tracing::warn!(
                count,
                "Redis came back without its data: appended this replica's recent events again"
            );
        }
        Ok(())
    }

    fn set_up(&self, up: bool, error: Option<&redis::RedisError>) {
        if self.up.swap(up, Ordering::Relaxed) != up {
            metrics::gauge!("capability_backplane_up").set(if up { 1.0 } else { 0.0 });
            match error {
                None => tracing::info!(stream = %self.stream, "backplane connected: reading the Redis stream"),
                Some(e) => tracing::error!(error = %e, "backplane lost: Redis unreachable; reconnecting"),
            }
        }
    }

    /// Whether the reader is connected.
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }
}

/// Applies one stream entry to the hub.
fn apply(hub: &Hub, entry: &StreamId) {
    match entry.get::<String>("k").as_deref() {
        Some("n") => {
            let (Some(body), Some(micros)) = (entry.get::<Vec<u8>>("b"), entry.get::<u64>("t")) else {
                tracing::warn!(id = %entry.id, "a notification entry without body or time; skipped");
                return;
            };
            let received = UNIX_EPOCH + Duration::from_micros(micros);
            match parse::parse(&body, received) {
                Ok(Callback::Capability(notification)) => {
                    hub.publish(Arc::from(notification));
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(id = %entry.id, error = %e, "an unreadable notification entry; skipped"),
            }
        }
        Some("q") => {
            let Some(request_id) = entry.get::<String>("r") else {
                return;
            };
            let expected = (entry.get::<String>("e").as_deref() == Some("1")).then(|| {
                entry
                    .get::<String>("c")
                    .unwrap_or_default()
                    .split(',')
                    .filter(|c| !c.is_empty())
                    .map(str::to_owned)
                    .collect()
            });
            hub.record_query(&request_id, expected);
        }
        _ => tracing::warn!(id = %entry.id, "an entry of unknown kind; skipped"),
    }
}
