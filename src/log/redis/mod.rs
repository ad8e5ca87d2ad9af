//! The Redis log: Redis Streams on one node or a Redis Cluster, shared by every replica.
//!
//! The log is split into `CAPABILITY_REDIS_SHARDS` streams by a stable hash of request_id (SHA-256, first 8
//! bytes, modulo the shard count). Every key of one shard shares its hash tag, `{prefix:N}`, so that a cluster
//! keeps a shard on one slot and one Lua script may touch them together:
//!
//! | key | what |
//! |---|---|
//! | `{prefix:N}:events` | the stream; entries `e` (an encoded event) and `o` (a notification's offset) |
//! | `{prefix:N}:r:<hash of request_id>` | a request's state: `n` its last offset, `x` how many were capped, `d:<digest>` → offset |
//! | `{prefix:N}:n:<hash of nonce>` | a claimed nonce, for as long as its timestamp would pass |
//! | `{prefix:N}:epoch` | a value set once per dataset: another value means Redis lost its data |
//! | `prefix:idem:<hash of request_id>` | a caller-chosen request_id's claim and answer (no tag: spread over slots) |
//! | `prefix:c:…`, `prefix:cc:…`, `prefix:lease:…` | the capability cache and coalescing leases ([`cache`]) |
//! | `{prefix:job:…}:…`, `prefix:jobs`, `prefix:bulkreq:…`, `prefix:pace` | bulk check jobs and the callback budget ([`jobs`]) |
//!
//! Appending a notification is one script: it checks the epoch, claims the nonce, drops a duplicate digest or
//! a request over the cap, assigns the next offset and `XADD`s (trimmed by `MINID`, by Redis's clock) — one
//! round trip. Each replica runs one reader per shard (`XREAD BLOCK` on a connection of its own) that feeds its
//! consumers in stream order; a starting or reconnecting reader reads back the retained stream.

pub mod cache;
mod connection;
pub mod jobs;

use std::{
    collections::VecDeque,
    convert::Infallible,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU8, Ordering},
    },
    time::{Duration, Instant},
};

use rand::Rng;
use redis::{ErrorKind, Script, ServerErrorKind, streams::StreamReadReply};
use sha2::{Digest as _, Sha256};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::Instrument;

use super::{
    Accepted, Claim, Consumer, Entry, Health, IdempotencyClaim, Nonce, NotificationReceived, QueryRecorded,
    Unavailable, codec, skipped,
};
use crate::{
    capability::{CacheTtl, Notification, mask_digits},
    secret::Secret,
};
use cache::RedisCache;
use connection::{Connection, Connector, Target};
pub use connection::{MIN_VERSION, UrlError};

/// How long one `XREAD` blocks before it asks again.
const BLOCK: Duration = Duration::from_secs(2);
/// The most entries one `XREAD` returns.
const BATCH: usize = 1024;
/// How long this replica keeps the events it appended, to append them again should Redis come back empty: far
/// longer than any reader lags behind a live Redis.
const RECENT: Duration = Duration::from_secs(10);
/// The most events kept for that, per shard, whatever the rate.
const MAX_RECENT: usize = 100_000;
/// The longest an appended callback's acknowledgement waits for its result's caching, which goes on in the
/// background past it (its few commands whole): a cache that stalls (on a Cluster, a node other than the
/// stream's) delays the 200 of a callback the log took by this much, where it was answered 503 at the webhook
/// timeout (Sinch's redelivery then a duplicate, the result never cached).
const CACHING: Duration = Duration::from_millis(250);
/// The most cache writes of appended results on their way at once (a few in normal running: each takes a round
/// trip or three). Past it a result is not cached (a later check asks Sinch) and its callback is acknowledged at
/// once: a stalled cache neither grows the tasks without bound nor holds every callback for [`CACHING`].
const MAX_CACHING: usize = 1024;
/// The most query records kept per shard while Redis cannot take them (a minute of queries at Sinch's rate).
const MAX_UNRECORDED: usize = 50_000;
/// How many of them go to Redis in one round trip once it answers again.
const UNRECORDED_BATCH: usize = 256;
/// How many such round trips the reader makes between two reads.
const UNRECORDED_BATCHES: usize = 16;

/// Lua: `minid(retention)`, the stream id below which an entry is older than `retention` (ms) by Redis's clock,
/// the log's one clock: a replica's own, ahead of it, would trim entries other replicas have yet to read.
const MINID: &str = r"
local function minid(retention)
  local t = redis.call('TIME')
  return string.format('%.0f', tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) - tonumber(retention))
end
";

/// Appends a notification. KEYS: epoch, stream, request state, [nonce]. ARGV: the epoch this replica knows,
/// this attempt's token, the nonce's time to live (ms), the retention (ms), the cap, the digest (hex), the
/// encoded event. Returns {1, offset, time} appended at that time (the entry's, in ms: Redis's clock), {0,
/// offset} a duplicate of the result at that offset, {2, n} over the cap for the n-th time, {-1} the nonce was
/// used by another callback, {-3} the epoch differs.
/// A retry of an attempt whose answer was lost finds its own token on the nonce and its digest: it answers
/// {1, offset} without the time, as the first run did when it appended (when the first run found a copy instead,
/// the replica then keeps among its recent events a result Redis holds already: harmless).
const APPEND: &str = r"
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return {-3} end
local again = false
if KEYS[4] then
  if not redis.call('SET', KEYS[4], ARGV[2], 'NX', 'PX', ARGV[3]) then
    if redis.call('GET', KEYS[4]) ~= ARGV[2] then return {-1} end
    again = true
  end
end
local field = 'd:' .. ARGV[6]
local known = redis.call('HGET', KEYS[3], field)
if known then return {again and 1 or 0, tonumber(known)} end
local n = tonumber(redis.call('HGET', KEYS[3], 'n') or '0')
if n >= tonumber(ARGV[5]) then
  local x = redis.call('HINCRBY', KEYS[3], 'x', 1)
  redis.call('PEXPIRE', KEYS[3], ARGV[4])
  return {2, x}
end
n = n + 1
redis.call('HSET', KEYS[3], 'n', n, field, n)
redis.call('PEXPIRE', KEYS[3], ARGV[4])
local id = redis.call('XADD', KEYS[2], 'MINID', '~', minid(ARGV[4]), '*', 'e', ARGV[7], 'o', n)
return {1, n, tonumber(string.match(id, '^%d+'))}
";

/// Claims a nonce alone (a callback with nothing to append). KEYS: nonce. ARGV: token, time to live (ms).
/// Returns 1 when claimed (or claimed before by this same attempt), 0 when another callback used it.
const CLAIM_NONCE: &str = r"
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return 1 end
if redis.call('GET', KEYS[1]) == ARGV[1] then return 1 end
return 0
";

/// Renews our claim on a request_id (its pending record) for a lease, or takes it again if it lapsed and nobody
/// took it since. KEYS: claim. ARGV: our pending record, lease (ms). Returns 1 when renewed, 2 when taken again,
/// 0 when it is another's (or answered).
const RENEW_CLAIM: &str = r"
local held = redis.call('GET', KEYS[1])
if held == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
if held then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 2
";

/// Settles our claim on a request_id: records the answer (ARGV[2], for ARGV[3] ms; none: releases the claim) if
/// the claim is ours (ARGV[1], our pending record) or lapsed with nobody's since. KEYS: claim.
const SETTLE_CLAIM: &str = r"
local held = redis.call('GET', KEYS[1])
if held and held ~= ARGV[1] then return 0 end
if ARGV[2] == '' then redis.call('DEL', KEYS[1]) else redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3]) end
return 1
";

/// How long a claim on a request_id lasts unless its owner renews it: a replica that stops while sending frees
/// the request_id this long after its last renewal.
const CLAIM_LEASE: Duration = Duration::from_secs(10);

/// How often the owner of a claim renews it: a lease outlives a few missed renewals.
const CLAIM_RENEWAL: Duration = Duration::from_millis(2_500);

/// Appends again, at its original offset, a notification that Redis lost. KEYS: stream, request state.
/// ARGV: retention (ms), offset, digest (hex), encoded event. Returns 1 when appended, 0 when Redis has it.
const RESTORE: &str = r"
local field = 'd:' .. ARGV[3]
if redis.call('HEXISTS', KEYS[2], field) == 1 then return 0 end
redis.call('HSET', KEYS[2], field, ARGV[2])
if tonumber(ARGV[2]) > tonumber(redis.call('HGET', KEYS[2], 'n') or '0') then
  redis.call('HSET', KEYS[2], 'n', ARGV[2])
end
redis.call('PEXPIRE', KEYS[2], ARGV[1])
redis.call('XADD', KEYS[1], 'MINID', '~', minid(ARGV[1]), '*', 'e', ARGV[4], 'o', ARGV[2])
return 1
";

/// Appends query records to a stream. KEYS: stream. ARGV: retention (ms), each record's encoded event. Returns
/// their entries' ids. Run again (its answer lost), it appends the records again: harmless, the same questions.
/// One key only: a script touching several keys of a slot, one of them missing, is refused while a Redis Cluster
/// moves the slot (`TRYAGAIN`), and the requests' states are renewed by commands of their own, which may fail then
/// (`ASK`, which the Cluster client does not follow) without the records being appended again.
const RECORD_QUERIES: &str = r"
local from = minid(ARGV[1])
local ids = {}
for i = 2, #ARGV do
  ids[#ids + 1] = redis.call('XADD', KEYS[1], 'MINID', '~', from, '*', 'e', ARGV[i])
end
return ids
";

/// What a bulk check may run past its wait (its live query's time).
const CHECK_MARGIN: Duration = Duration::from_secs(60);

/// How to reach Redis and what to keep there.
#[derive(Debug, Clone)]
pub struct RedisSettings {
    pub url: Secret,
    /// Prefix of every key; no braces (it becomes part of hash tags).
    pub prefix: String,
    /// How many streams the log is split into.
    pub shards: u16,
    /// How long events stay in the streams and replayable.
    pub retention: Duration,
    /// The most notifications one request takes.
    pub max_per_request: u64,
    /// How long a request_id is remembered once answered.
    pub idempotency_window: Duration,
    /// The longest a query or a check runs (a check's results are kept for its readers this long and more).
    pub longest_check: Duration,
    /// How long cached results of each status live.
    pub cache_ttl: CacheTtl,
    /// The key that names cache entries; `None`: one kept in Redis.
    pub cache_hash_key: Option<Secret>,
    /// The CA certificates (PEM) that vouch for a `rediss://` Redis; `None`: the system's roots.
    pub ca: Option<Vec<u8>>,
}

/// Why Redis cannot be used; found before any port is bound.
#[derive(Debug, thiserror::Error)]
pub enum PrepareError {
    #[error("{0}")]
    Url(#[from] UrlError),
    #[error("Redis {found_major}.{found_minor} is too old: this service needs {}.{} or later (XADD … MINID)", MIN_VERSION.0, MIN_VERSION.1)]
    TooOld { found_major: u32, found_minor: u32 },
    #[error("Redis answered the version check with an error: {0}")]
    Check(String),
}

/// One stream of the log and what this replica knows of it.
struct Shard {
    stream: String,
    epoch_key: String,
    /// `{prefix:N}`, the hash tag of every key of the shard.
    tag: String,
    /// The epoch this replica last saw; `None` before the first look.
    epoch: Mutex<Option<String>>,
    /// Held while this replica checks the epoch (and appends its recent events again after a loss).
    recovering: tokio::sync::Mutex<()>,
    /// The events this replica appended lately, oldest first.
    recent: Mutex<VecDeque<(Instant, Recent)>>,
    /// Whether this shard's reader has read back the retained stream (or found Redis down at first).
    caught_up: AtomicBool,
    /// Query records Redis could not take, oldest first, appended by the reader when it answers again.
    unrecorded: Mutex<VecDeque<Unrecorded>>,
}

/// A query record Redis could not take.
struct Unrecorded {
    /// Its place among those of its shard, to take it from the queue once appended.
    seq: u64,
    at: Instant,
    record: QueryRecord,
}

/// A query record as it is appended: the encoded event, and the key of its request's state, which the append
/// renews.
#[derive(Clone)]
struct QueryRecord {
    query: QueryRecorded,
    request_key: String,
}

impl QueryRecord {
    /// Its encoded event; `late` when it is appended again, or only after Redis refused it at first (see
    /// [`QueryRecorded::late`]).
    fn event(&self, late: bool) -> Vec<u8> {
        codec::encode(&codec::Event::QueryRecorded(QueryRecorded {
            late,
            ..self.query.clone()
        }))
    }
}

/// An event this replica appended, as it must be appended again after a loss.
#[derive(Clone)]
enum Recent {
    Query(QueryRecord),
    Notification {
        event: Vec<u8>,
        offset: u64,
        digest: String,
        request_key: String,
    },
}

/// The Redis side of the log.
pub struct RedisLog {
    connector: Connector,
    /// Commands (scripts, XADD, SET, GET); reconnects by itself.
    commands: Connection,
    settings: RedisSettings,
    shards: Vec<Shard>,
    consumers: Vec<Arc<dyn Consumer>>,
    append: Script,
    claim_nonce: Script,
    renew_claim: Script,
    settle_claim: Script,
    restore: Script,
    record_queries: Script,
    /// The capability cache and coalescing leases.
    cache: Arc<RedisCache>,
    /// One permit per cache write of an appended result on its way ([`MAX_CACHING`]).
    caching: Arc<tokio::sync::Semaphore>,
    /// Bulk check jobs and the callback budget.
    jobs: jobs::RedisJobs,
    /// The readers' last view of Redis, for logs, probes and the `capability_backplane_up` gauge: 0 not yet
    /// known, 1 up, 2 down.
    up: AtomicU8,
}

/// The warning logged at start when Redis may evict the log's keys.
pub const EVICTION_WARNING: &str = "REDIS_MAY_EVICT";
/// The warning logged at start when cache entries are named with a key kept in Redis.
pub const HASH_KEY_WARNING: &str = "CACHE_HASH_KEY_UNSET";

impl RedisLog {
    /// Checks the URL and, when Redis answers, its version; connects lazily, so an unreachable Redis still
    /// starts (degraded) and is connected to when it comes.
    pub async fn prepare(settings: RedisSettings, consumers: Vec<Arc<dyn Consumer>>) -> Result<RedisLog, PrepareError> {
        let target = Target::parse(settings.url.expose())?;
        let connector = Connector::new(target, BLOCK, settings.ca.as_deref())?;
        match connector.server_version().await {
            Ok(Some((major, minor))) if (major, minor) < MIN_VERSION => {
                return Err(PrepareError::TooOld {
                    found_major: major,
                    found_minor: minor,
                });
            }
            Ok(Some(_)) => {
                if let Some(policy) = connector.eviction_policy().await.filter(|p| p != "noeviction") {
                    tracing::warn!(
                        warning = EVICTION_WARNING, %policy,
                        "{EVICTION_WARNING}: Redis may evict keys under memory pressure (maxmemory-policy {policy}); \
                         an evicted request state or nonce would let a request restart its offsets or a replay \
                         through: set maxmemory-policy noeviction and size maxmemory for the retention"
                    );
                }
            }
            Ok(None) => tracing::warn!("Redis does not answer: starting degraded, connecting when it comes"),
            Err(e) => return Err(PrepareError::Check(e.to_string())),
        }
        let commands = connector
            .commands()
            .map_err(|e| PrepareError::Url(UrlError::Unusable(1, e.to_string())))?;
        let shards = (0..settings.shards.max(1))
            .map(|i| {
                let tag = format!("{{{}:{i}}}", settings.prefix);
                Shard {
                    stream: format!("{tag}:events"),
                    epoch_key: format!("{tag}:epoch"),
                    tag,
                    epoch: Mutex::new(None),
                    recovering: tokio::sync::Mutex::new(()),
                    recent: Mutex::new(VecDeque::new()),
                    caught_up: AtomicBool::new(false),
                    unrecorded: Mutex::new(VecDeque::new()),
                }
            })
            .collect();
        // A hub replays a result for a retention, to a check that runs at most `longest_check`, or (a bulk
        // job's, whose wait may be as long as the retention) a retention more.
        let cache = RedisCache::new(
            commands.clone(),
            settings.prefix.clone(),
            settings.cache_ttl,
            settings.retention + settings.longest_check.max(settings.retention + CHECK_MARGIN),
            settings.cache_hash_key.clone(),
        );
        if settings.cache_hash_key.is_none() {
            tracing::warn!(
                warning = HASH_KEY_WARNING,
                "{HASH_KEY_WARNING}: CAPABILITY_CACHE_HASH_KEY is unset, so the key that names cache entries is kept in \
                 Redis beside them: whoever can read Redis can tell which phone numbers are cached; set it (a secret, \
                 the same on every replica)"
            );
        }
        let jobs = jobs::RedisJobs::new(commands.clone(), settings.prefix.clone());
        Ok(RedisLog {
            cache: Arc::new(cache),
            caching: Arc::new(tokio::sync::Semaphore::new(MAX_CACHING)),
            jobs,
            connector,
            commands,
            settings,
            shards,
            consumers,
            append: Script::new(&format!("{MINID}{APPEND}")),
            claim_nonce: Script::new(CLAIM_NONCE),
            renew_claim: Script::new(RENEW_CLAIM),
            settle_claim: Script::new(SETTLE_CLAIM),
            restore: Script::new(&format!("{MINID}{RESTORE}")),
            record_queries: Script::new(&format!("{MINID}{RECORD_QUERIES}")),
            up: AtomicU8::new(0),
        })
    }

    /// Starts one reader per shard, feeding the consumers, until `stop`.
    pub fn start(self: Arc<Self>, tasks: &TaskTracker, stop: CancellationToken) {
        for shard in 0..self.shards.len() {
            tasks.spawn(self.clone().read(shard, stop.clone()));
        }
    }

    /// The capability cache and coalescing leases in this Redis.
    pub fn cache(&self) -> &RedisCache {
        &self.cache
    }

    /// Bulk check jobs and the callback budget in this Redis.
    pub fn jobs(&self) -> &jobs::RedisJobs {
        &self.jobs
    }

    fn shard_of(&self, key: &str) -> usize {
        let hash = Sha256::digest(key.as_bytes());
        let n = u64::from_be_bytes(hash[..8].try_into().expect("8 bytes"));
        (n % self.shards.len() as u64) as usize
    }

    pub(super) async fn accept(
        &self,
        nonce: Option<Nonce<'_>>,
        notification: Option<NotificationReceived>,
    ) -> Result<Accepted, Unavailable> {
        let token = ulid::Ulid::new().to_string();
        let Some(received) = notification else {
            let Some(nonce) = nonce else {
                return Ok(Accepted::NothingToAppend);
            };
            let shard = &self.shards[self.shard_of(nonce.value)];
            let mut invocation = self.claim_nonce.prepare_invoke();
            invocation
                .key(format!("{}:n:{}", shard.tag, hashed(nonce.value)))
                .arg(&token)
                .arg(ttl_ms(nonce.remember_for));
            let claimed: i64 = invoke(&invocation, &self.commands)
                .await
                .map_err(|e| Unavailable(e.to_string()))?;
            return Ok(if claimed == 1 {
                Accepted::NothingToAppend
            } else {
                Accepted::Replayed
            });
        };
        let index = self.shard_of(&received.notification.request_id);
        let shard = &self.shards[index];
        let request_key = shard.request_key(&received.notification.request_id);
        let digest = received.digest.hex();
        let cached = self
            .cache
            .keeps(&received.notification)
            .then(|| received.notification.clone());
        let event = codec::encode(&codec::Event::NotificationReceived(Box::new(received)));
        for attempt in 0..2 {
            let epoch = match self.known_epoch(index) {
                Some(epoch) => epoch,
                None => self
                    .recover(index, false)
                    .await
                    .map_err(|e| Unavailable(e.to_string()))?,
            };
            let mut invocation = self.append.prepare_invoke();
            invocation.key(&shard.epoch_key).key(&shard.stream).key(&request_key);
            if let Some(nonce) = nonce {
                invocation.key(format!("{}:n:{}", shard.tag, hashed(nonce.value)));
            }
            invocation
                .arg(&epoch)
                .arg(&token)
                .arg(nonce.map_or(1, |n| ttl_ms(n.remember_for)))
                .arg(self.settings.retention.as_millis() as u64)
                .arg(self.settings.max_per_request)
                .arg(&digest)
                .arg(event.as_slice());
            let answer: Vec<i64> = invoke(&invocation, &self.commands)
                .await
                .map_err(|e| Unavailable(e.to_string()))?;
            match answer.as_slice() {
                [1, offset, time @ ..] => {
                    let offset = *offset as u64;
                    shard.remember(Recent::Notification {
                        event,
                        offset,
                        digest,
                        request_key,
                    });
                    // Cached at its time in the log, as every replica's hub hands it out (a retry whose first answer
                    // was lost does not know it, and leaves the result to the checks that receive it).
                    if let (Some(mut notification), [time]) = (cached, time) {
                        notification.received_time = codec::log_time(*time as u64);
                        self.cache_appended(notification, offset).await;
                    }
                    return Ok(Accepted::Appended { offset });
                }
                // Redis holds it (appended by another replica, or by an attempt of this callback's whose answer
                // was lost): acknowledged, it counts among this replica's recent events as an appended one does.
                [0, offset] => {
                    shard.remember(Recent::Notification {
                        event,
                        offset: *offset as u64,
                        digest,
                        request_key,
                    });
                    return Ok(Accepted::Duplicate);
                }
                [2, n] => return Ok(Accepted::Capped { first: *n == 1 }),
                [-1] => return Ok(Accepted::Replayed),
                [-3] if attempt == 0 => {
                    self.recover(index, false)
                        .await
                        .map_err(|e| Unavailable(e.to_string()))?;
                }
                other => {
                    return Err(Unavailable(format!(
                        "unexpected answer from the append script: {other:?}"
                    )));
                }
            }
        }
        Err(Unavailable("Redis changed its dataset twice during one append".into()))
    }

    /// Caches an appended result (see [`CACHING`] and [`MAX_CACHING`]). The callback is in the log: a result
    /// missing from the cache only costs a query.
    async fn cache_appended(&self, notification: Notification, offset: u64) {
        let Ok(permit) = self.caching.clone().try_acquire_owned() else {
            metrics::counter!("capability_cache_writes_failed_total", "reason" => "busy").increment(1);
            tracing::debug!("a result was not cached: {MAX_CACHING} cache writes are on their way already");
            return;
        };
        let cache = self.cache.clone();
        // Written here while it is quick (no task of its own: a hop between threads costs the acknowledgement
        // tens of microseconds); past [`CACHING`] the rest goes on in a task.
        let mut caching = Box::pin(
            async move {
                let _permit = permit;
                if let Err(e) = cache.store(&notification, offset).await {
                    metrics::counter!("capability_cache_writes_failed_total", "reason" => "error").increment(1);
                    tracing::warn!(error = %e, "a result could not be cached in Redis");
                }
            }
            .in_current_span(),
        );
        if tokio::time::timeout(CACHING, &mut caching).await.is_err() {
            tracing::warn!("a result's caching took Redis over {CACHING:?}: acknowledged meanwhile");
            tokio::spawn(caching);
        }
    }

    /// Appends a query's record; when Redis cannot take it, keeps it for the shard's reader to append once Redis
    /// answers again, so that its watches learn the channels it expects.
    pub(super) async fn record_query(&self, query: QueryRecorded) -> Result<(), Unavailable> {
        let shard = &self.shards[self.shard_of(&query.request_id)];
        let record = QueryRecord {
            request_key: shard.request_key(&query.request_id),
            query,
        };
        if let Err(e) = self.append_queries(shard, std::slice::from_ref(&record), false).await {
            shard.keep_unrecorded(record);
            return Err(Unavailable(format!("{e}; it is appended when Redis answers again")));
        }
        Ok(())
    }

    /// Appends some of the query records Redis could not take before (at most [`UNRECORDED_BATCHES`] batches),
    /// oldest first, each taken from the shard's queue only once appended (a task that stops meanwhile loses
    /// none). Those past the retention are dropped: nothing would replay them.
    async fn append_unrecorded(&self, shard: &Shard) {
        let mut appended = 0;
        // A few batches at a time: the reader calls it between two reads, which must go on.
        for _ in 0..UNRECORDED_BATCHES {
            let batch: Vec<(u64, Instant, QueryRecord)> = {
                let mut unrecorded = shard.unrecorded.lock().expect("unrecorded lock poisoned");
                while unrecorded
                    .front()
                    .is_some_and(|u| u.at.elapsed() >= self.settings.retention)
                {
                    unrecorded.pop_front();
                }
                unrecorded
                    .iter()
                    .take(UNRECORDED_BATCH)
                    .map(|u| (u.seq, u.at, u.record.clone()))
                    .collect()
            };
            let Some(&(last, _, _)) = batch.last() else { break };
            // Where each stands among its request_id's records, by the log's clock (see `QueryRecorded::asked_ms`):
            // Redis's clock now, less the time since Redis refused it.
            let now = match redis_time_ms(&mut self.commands.clone()).await {
                Ok(now) => now,
                Err(e) => {
                    tracing::debug!(error = %e, "query records kept while Redis was down are still not appended");
                    break;
                }
            };
            let records: Vec<QueryRecord> = batch
                .into_iter()
                .map(|(_, refused, mut record)| {
                    record.query.asked_ms = now.saturating_sub(refused.elapsed().as_millis() as u64);
                    record
                })
                .collect();
            if let Err(e) = self.append_queries(shard, &records, true).await {
                tracing::debug!(error = %e, "query records kept while Redis was down are still not appended");
                break;
            }
            let mut unrecorded = shard.unrecorded.lock().expect("unrecorded lock poisoned");
            while unrecorded.front().is_some_and(|u| u.seq <= last) {
                unrecorded.pop_front();
            }
            appended += records.len();
        }
        if appended > 0 {
            tracing::info!(appended, "query records kept while Redis was down were appended");
        }
    }

    /// Appends query records to `shard`'s stream ([`RedisLog::write_queries`]), and keeps them among the shard's
    /// recent events.
    async fn append_queries(&self, shard: &Shard, records: &[QueryRecord], late: bool) -> redis::RedisResult<()> {
        let placed = self.write_queries(shard, records, late).await?;
        for (record, at_ms) in records.iter().zip(placed) {
            let mut record = record.clone();
            // Appended again after an outage, it says where it was placed first (see `QueryRecorded::asked_ms`).
            if !late {
                record.query.asked_ms = at_ms;
            }
            shard.remember(Recent::Query(record));
        }
        Ok(())
    }

    /// Appends query records to `shard`'s stream ([`RECORD_QUERIES`]) and renews each one's request state for the
    /// retention, each by a command of its own, all at once: a request's numbering lives as long as its last
    /// event, query records included, as the replicas' records of the request do (without, a query recorded after
    /// the results let the numbering start again at 1 while the replicas still held the request). A renewal that
    /// failed fails them (they are appended again later, renewals included: a record twice is harmless), but for
    /// one refused while a Redis Cluster moves the slot, which would fail again on every try: its request keeps
    /// its state's own expiry.
    async fn write_queries(&self, shard: &Shard, records: &[QueryRecord], late: bool) -> redis::RedisResult<Vec<u64>> {
        let retention = self.settings.retention.as_millis() as u64;
        let mut append = self.record_queries.prepare_invoke();
        append.key(&shard.stream).arg(retention);
        let mut renewals = Vec::with_capacity(records.len());
        for record in records {
            append.arg(record.event(late));
            renewals.push(redis::cmd("PEXPIRE").arg(&record.request_key).arg(retention).take());
        }
        let renewed = renewals.iter().map(|renew| {
            retried(
                move |mut conn| async move { renew.query_async::<()>(&mut conn).await },
                &self.commands,
            )
        });
        let (appended, renewed) = tokio::join!(
            invoke::<Vec<String>>(&append, &self.commands),
            futures::future::join_all(renewed)
        );
        let appended = appended?;
        let (moving, failed): (Vec<_>, Vec<_>) = renewed.into_iter().filter_map(Result::err).partition(slot_moving);
        if let Some(e) = failed.into_iter().next() {
            return Err(e);
        }
        if !moving.is_empty() {
            tracing::debug!(
                count = moving.len(),
                "query records' request states not renewed: their slot is moving"
            );
        }
        Ok(appended.iter().map(|id| entry_ms(id)).collect())
    }

    fn known_epoch(&self, shard: usize) -> Option<String> {
        self.shards[shard].epoch.lock().expect("epoch lock poisoned").clone()
    }

    /// Looks at the shard's epoch (setting one when there is none). When it changed since this replica last
    /// looked, Redis lost its data: this replica appends its recent events of the shard again, each
    /// notification at its original offset, so that readers that missed them catch up and the request's next
    /// offset follows on. It does so too when the epoch is the same but the connection was lost (`outage`):
    /// Redis may have come back without its last writes (a failover to a replica that lagged, an append-only
    /// file that lost its tail); a notification Redis still holds is not appended twice. Returns the epoch.
    async fn recover(&self, index: usize, outage: bool) -> redis::RedisResult<String> {
        let shard = &self.shards[index];
        let _one_at_a_time = shard.recovering.lock().await;
        let mut conn = self.commands.clone();
        let _: Option<String> = redis::cmd("SET")
            .arg(&shard.epoch_key)
            .arg(ulid::Ulid::new().to_string())
            .arg("NX")
            .query_async(&mut conn)
            .await?;
        let current: String = redis::cmd("GET").arg(&shard.epoch_key).query_async(&mut conn).await?;
        let known = self.known_epoch(index);
        let same = known.as_ref() == Some(&current);
        if same && !outage {
            return Ok(current);
        }
        if known.is_some() {
            let count = self.republish(shard, &mut conn).await?;
            if same {
                tracing::info!(
                    shard = index,
                    count,
                    "Redis came back: appended this replica's recent events again, in case it lost its last writes"
                );
            } else {
                tracing::warn!(
                    shard = index,
                    count,
                    "Redis came back without its data: appended this replica's recent events again"
                );
            }
        }
        *shard.epoch.lock().expect("epoch lock poisoned") = Some(current.clone());
        Ok(current)
    }

    async fn republish(&self, shard: &Shard, conn: &mut Connection) -> redis::RedisResult<usize> {
        // Not what has expired since (the list is pruned only when this replica appends): appended again with a
        // new time, it would live a whole retention more.
        let events: Vec<Recent> = shard
            .recent
            .lock()
            .expect("recent lock poisoned")
            .iter()
            .filter(|(at, _)| at.elapsed() < self.settings.retention)
            .map(|(_, e)| e.clone())
            .collect();
        let retention = self.settings.retention.as_millis() as u64;
        for event in &events {
            match event {
                Recent::Query(record) => {
                    self.write_queries(shard, std::slice::from_ref(record), true).await?;
                }
                Recent::Notification {
                    event,
                    offset,
                    digest,
                    request_key,
                } => {
                    self.restore
                        .key(&shard.stream)
                        .key(request_key)
                        .arg(retention)
                        .arg(*offset)
                        .arg(digest)
                        .arg(event.as_slice())
                        .invoke_async::<i64>(conn)
                        .await?;
                }
            }
        }
        Ok(events.len())
    }

    /// Feeds the consumers with every entry of one shard, from `now − retention` on, until `stop`. Reconnects
    /// with jittered back-off after an outage and resumes after the last entry it saw: no gap, no repeat; after a
    /// Redis that came back without its data, from `now − retention` again (the hub drops what it holds already).
    async fn read(self: Arc<Self>, index: usize, stop: CancellationToken) {
        let shard = &self.shards[index];
        let mut last_id: Option<String> = None;
        // The epoch of the stream `last_id` is in: a Redis that came back without its data holds another stream,
        // whose entries may be timed before `last_id` (its clock behind the log's): read it from the start.
        let mut read_epoch: Option<String> = None;
        let mut pause = Duration::from_millis(50);
        // Whether this connection follows a lost one: Redis may have lost its last writes meanwhile.
        let mut outage = false;
        loop {
            let connected = async {
                let mut conn = self.connector.dedicated(BLOCK).await?;
                let epoch = self.recover(index, outage).await?;
                if read_epoch.replace(epoch.clone()).is_some_and(|read| read != epoch) {
                    last_id = None;
                }
                self.append_unrecorded(shard).await;
                // The log's clock, read before its events (a replica's checks judge results' ages by it).
                let now = redis_time_ms(&mut conn).await?;
                self.consumers.iter().for_each(|c| c.read_clock(now));
                if last_id.is_none() {
                    let start = now.saturating_sub(self.settings.retention.as_millis() as u64);
                    last_id = Some(format!("{start}-0"));
                }
                Ok::<_, redis::RedisError>(conn)
            };
            let connected = tokio::select! {
                connected = connected => connected,
                () = stop.cancelled() => return,
            };
            let error = match connected {
                Ok(mut conn) => loop {
                    let from = last_id.clone().expect("set on connecting");
                    let read = async {
                        let reply: Option<StreamReadReply> = redis::cmd("XREAD")
                            .arg("COUNT")
                            .arg(BATCH)
                            .arg("BLOCK")
                            .arg(BLOCK.as_millis() as u64)
                            .arg("STREAMS")
                            .arg(&shard.stream)
                            .arg(&from)
                            .query_async(&mut conn)
                            .await?;
                        let ids: Vec<_> = reply.into_iter().flat_map(|r| r.keys).flat_map(|k| k.ids).collect();
                        let now = if ids.is_empty() {
                            Some(redis_time_ms(&mut conn).await?)
                        } else {
                            None
                        };
                        Ok::<_, redis::RedisError>((ids, now))
                    };
                    let reply = tokio::select! {
                        reply = read => reply,
                        () = stop.cancelled() => return,
                    };
                    match reply {
                        Ok((ids, now)) => {
                            self.set_up(true, None);
                            pause = Duration::from_millis(50);
                            let full = ids.len() >= BATCH;
                            let mut latest = None;
                            for id in ids {
                                latest = Some(self.apply(&id));
                                last_id = Some(id.id);
                            }
                            if let Some(at) = latest {
                                self.consumers.iter().for_each(|c| c.advance(at));
                            }
                            if let Some(now) = now {
                                self.consumers.iter().for_each(|c| c.read_clock(now));
                            }
                            if !full {
                                shard.caught_up.store(true, Ordering::Relaxed);
                            }
                            // Query records Redis could not take before, still there (it failed again meanwhile,
                            // or only the commands' connection was lost).
                            self.append_unrecorded(shard).await;
                        }
                        Err(e) => break e,
                    }
                },
                Err(e) => {
                    // Found Redis unreachable at start: run degraded rather than stay unready. A Redis that
                    // answers with an error (still loading its data, a cluster without quorum) is waited for.
                    if connection::unreachable(&e) {
                        shard.caught_up.store(true, Ordering::Relaxed);
                    }
                    e
                }
            };
            self.set_up(false, Some(&error));
            outage = true;
            let jittered = pause.mul_f64(0.5 + rand::rng().random::<f64>() * 0.5);
            tokio::select! {
                () = tokio::time::sleep(jittered) => {}
                () = stop.cancelled() => return,
            }
            pause = (pause * 2).min(Duration::from_secs(5));
        }
    }

    /// Decodes one stream entry and feeds it to the consumers; returns its time.
    fn apply(&self, id: &redis::streams::StreamId) -> u64 {
        let time_ms = entry_ms(&id.id);
        let decoded = id
            .get::<Vec<u8>>("e")
            .ok_or(codec::DecodeError::Empty)
            .and_then(|bytes| codec::decode(&bytes));
        match decoded {
            Ok(decoded) => {
                let offset = id.get::<u64>("o").unwrap_or_default();
                let entry = Entry::from_decoded(decoded, time_ms, offset);
                if matches!(&entry, Entry::Notification(n) if n.offset == 0) {
                    skipped(&codec::DecodeError::Malformed("a notification without offset".into()));
                } else {
                    self.consumers.iter().for_each(|c| c.apply(&entry));
                }
            }
            Err(e) => skipped(&e),
        }
        time_ms
    }

    fn set_up(&self, up: bool, error: Option<&redis::RedisError>) {
        let state = if up { 1 } else { 2 };
        if self.up.swap(state, Ordering::Relaxed) != state {
            metrics::gauge!("capability_backplane_up").set(if up { 1.0 } else { 0.0 });
            match error {
                None => tracing::info!(
                    shards = self.shards.len(),
                    "event log connected: reading the Redis streams"
                ),
                Some(e) => tracing::error!(error = %e, "event log lost: Redis unreachable; reconnecting"),
            }
        }
    }

    pub(super) fn health(&self) -> Health {
        Health {
            backend: "redis",
            up: self.up.load(Ordering::Relaxed) == 1,
            caught_up: self.shards.iter().all(|s| s.caught_up.load(Ordering::Relaxed)),
        }
    }

    fn idempotency_key(&self, request_id: &str) -> String {
        format!("{}:idem:{}", self.settings.prefix, hashed(request_id))
    }

    pub(super) async fn claim_request_id(
        &self,
        request_id: &str,
        fingerprint: &str,
        claim: &Claim,
    ) -> redis::RedisResult<IdempotencyClaim> {
        let set: Option<String> = redis::cmd("SET")
            .arg(self.idempotency_key(request_id))
            .arg(pending_record(fingerprint, claim))
            .arg("NX")
            .arg("PX")
            .arg(ttl_ms(CLAIM_LEASE))
            .query_async(&mut self.commands.clone())
            .await?;
        if set.is_some() {
            return Ok(IdempotencyClaim::Owner(claim.clone()));
        }
        // None: the other claim was released between our SET and GET; ask again.
        Ok(self
            .recorded_request_id(request_id, fingerprint)
            .await?
            .unwrap_or(IdempotencyClaim::Pending))
    }

    /// What the record of `request_id` says, if there is one: answered, pending, or another question's.
    pub(super) async fn recorded_request_id(
        &self,
        request_id: &str,
        fingerprint: &str,
    ) -> redis::RedisResult<Option<IdempotencyClaim>> {
        let Some(stored) = redis::cmd("GET")
            .arg(self.idempotency_key(request_id))
            .query_async::<Option<String>>(&mut self.commands.clone())
            .await?
        else {
            return Ok(None);
        };
        let stored: serde_json::Value = serde_json::from_str(&stored).unwrap_or_default();
        if stored["q"] != fingerprint {
            return Ok(Some(IdempotencyClaim::Conflict));
        }
        Ok(Some(match stored["a"].as_str() {
            Some(answer) => IdempotencyClaim::Answered(answer.to_owned()),
            None => IdempotencyClaim::Pending,
        }))
    }

    /// Renews this replica's `claim` on `request_id` (for the query `fingerprint`) every few seconds, taking it
    /// again if it lapsed and nobody took it since; never ends.
    pub(super) async fn hold_request_id(&self, request_id: &str, fingerprint: &str, claim: &Claim) -> Infallible {
        let mut invocation = self.renew_claim.prepare_invoke();
        invocation
            .key(self.idempotency_key(request_id))
            .arg(pending_record(fingerprint, claim))
            .arg(ttl_ms(CLAIM_LEASE));
        let mut renewals = tokio::time::interval_at(tokio::time::Instant::now() + CLAIM_RENEWAL, CLAIM_RENEWAL);
        renewals.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            renewals.tick().await;
            match invoke::<i64>(&invocation, &self.commands).await {
                Ok(1) => {}
                Ok(2) => tracing::warn!(request_id = %mask_digits(request_id), "the claim on a request_id whose \
                    query is being sent had lapsed (Redis unreachable for longer than its lease?): taken again"),
                Ok(_) => {
                    tracing::warn!(request_id = %mask_digits(request_id), "the claim on a request_id lapsed while \
                        its query was being sent (Redis unreachable for longer than its lease?), and another replica \
                        took it: that one sends the query too");
                    return std::future::pending().await;
                }
                Err(e) => tracing::warn!(request_id = %mask_digits(request_id), error = %e, "could not renew the \
                    claim on a request_id whose query is being sent; trying again"),
            }
        }
    }

    pub(super) async fn settle_request_id(
        &self,
        request_id: &str,
        fingerprint: &str,
        claim: &Claim,
        answer: Option<&str>,
    ) -> redis::RedisResult<()> {
        let answered = answer.map(|answer| serde_json::json!({ "q": fingerprint, "a": answer }).to_string());
        let mut invocation = self.settle_claim.prepare_invoke();
        invocation
            .key(self.idempotency_key(request_id))
            .arg(pending_record(fingerprint, claim))
            .arg(answered.unwrap_or_default())
            .arg(ttl_ms(self.settings.idempotency_window));
        invoke::<i64>(&invocation, &self.commands).await.map(drop)
    }
}

/// What `claim` on a request_id holds while its query (`fingerprint`) is being sent. Replicas of earlier
/// versions read `q` (and `a`, the answer) alone.
fn pending_record(fingerprint: &str, claim: &Claim) -> String {
    serde_json::json!({ "q": fingerprint, "o": claim.0 }).to_string()
}

impl Shard {
    /// The key of a request's state: its offsets and digests.
    fn request_key(&self, request_id: &str) -> String {
        format!("{}:r:{}", self.tag, hashed(request_id))
    }

    /// Keeps a query record Redis could not take, forgetting the oldest past [`MAX_UNRECORDED`].
    fn keep_unrecorded(&self, record: QueryRecord) {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let mut unrecorded = self.unrecorded.lock().expect("unrecorded lock poisoned");
        unrecorded.push_back(Unrecorded {
            seq: NEXT.fetch_add(1, Ordering::Relaxed),
            at: Instant::now(),
            record,
        });
        while unrecorded.len() > MAX_UNRECORDED {
            unrecorded.pop_front();
            metrics::counter!("capability_backplane_query_records_dropped_total").increment(1);
        }
    }

    /// Keeps `event` among the recent events, forgetting those past [`RECENT`].
    fn remember(&self, event: Recent) {
        let now = Instant::now();
        let mut recent = self.recent.lock().expect("recent lock poisoned");
        while recent
            .front()
            .is_some_and(|(at, _)| now.duration_since(*at) > RECENT || recent.len() >= MAX_RECENT)
        {
            recent.pop_front();
        }
        recent.push_back((now, event));
    }
}

/// Runs `command` on the shared connection; when the connection was found broken (Redis restarted), once more
/// on the one the manager replaced it with. Every command sent this way is safe to repeat.
async fn retried<T, F, Fut>(command: F, connection: &Connection) -> redis::RedisResult<T>
where
    F: Fn(Connection) -> Fut,
    Fut: Future<Output = redis::RedisResult<T>>,
{
    match command(connection.clone()).await {
        Err(e) if e.is_io_error() || e.is_connection_dropped() => command(connection.clone()).await,
        result => result,
    }
}

/// Whether `e` refused a command on a slot a Redis Cluster is moving (`ASK`, `MOVED`, `TRYAGAIN`).
fn slot_moving(e: &redis::RedisError) -> bool {
    e.redirect_node().is_some() || e.kind() == ErrorKind::Server(ServerErrorKind::TryAgain)
}

/// Runs a script invocation on the shared connection, [`retried`] once on a connection found broken (every
/// script of this module may run again: each checks what it already did).
async fn invoke<T: redis::FromRedisValue>(
    invocation: &redis::ScriptInvocation<'_>,
    connection: &Connection,
) -> redis::RedisResult<T> {
    retried(
        |mut conn| async move { invocation.invoke_async(&mut conn).await },
        connection,
    )
    .await
}

/// The time of a stream entry: its id's first part, in milliseconds since the Unix epoch (0 for no id).
fn entry_ms(id: &str) -> u64 {
    id.split_once('-')
        .and_then(|(ms, _)| ms.parse().ok())
        .unwrap_or_default()
}

/// Redis's clock, in milliseconds since the Unix epoch.
async fn redis_time_ms(conn: &mut Connection) -> redis::RedisResult<u64> {
    let (seconds, micros): (u64, u64) = redis::cmd("TIME").query_async(conn).await?;
    Ok(seconds * 1000 + micros / 1000)
}

/// A fixed-size, stable stand-in for a caller- or Sinch-chosen string in a key: no raw value in Redis keys,
/// and no key longer than it needs to be.
fn hashed(value: &str) -> String {
    Sha256::digest(value.as_bytes())[..16]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A positive number of milliseconds.
fn ttl_ms(duration: Duration) -> u64 {
    (duration.as_millis() as u64).max(1)
}
