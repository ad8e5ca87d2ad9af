//! The event log: the one road by which events reach this replica's hub (and every other consumer), each
//! request's in log order, in every mode.
//!
//! The webhook appends each verified notification, QueryCapability appends each query's record; nothing else
//! feeds a hub. The log decides what a hub could not decide alike on every replica:
//! - **offsets**: a notification's offset within its request is assigned when it is appended, atomically with
//!   the dedupe check, and travels with the entry, so every replica numbers it the same whenever it reads it;
//! - **duplicates**: a notification with the same [`Digest`] as one its request already holds is acknowledged
//!   and dropped, whatever its bytes;
//! - **the cap**: past `CAPABILITY_MAX_NOTIFICATIONS_PER_REQUEST` notifications (128 by default) a request takes
//!   no more (acknowledged, dropped, counted);
//! - **time**: each entry carries the log's time (Redis's clock with Redis); retention counts from it.
//!
//! Two implementations: in process ([`local`]) for one replica, and Redis Streams ([`redis`]) for many, on a
//! single node or a Redis Cluster, optionally split into shards by a stable hash of request_id.

pub mod cached;
pub mod codec;
mod local;
pub mod redis;

use std::{
    collections::{HashMap, HashSet},
    convert::Infallible,
    hash::{BuildHasher, BuildHasherDefault, Hasher, RandomState},
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

pub use codec::{Digest, Event, NotificationReceived, QueryRecorded};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    capability::{Notification, mask_digits},
    telemetry::registered,
};
use local::LocalLog;
use redis::RedisLog;

/// An event at its place in the log, as every consumer sees it.
#[derive(Debug, Clone)]
pub enum Entry {
    /// A query went through this service.
    Query {
        /// The log's time of the entry, in milliseconds since the Unix epoch.
        time_ms: u64,
        query: QueryRecorded,
    },
    /// A notification, new to its request.
    Notification(NotificationEntry),
}

/// A notification as the log numbered it.
#[derive(Debug, Clone)]
pub struct NotificationEntry {
    /// The log's time of the entry, in milliseconds since the Unix epoch.
    pub time_ms: u64,
    /// Its position within its request: 1 for the first, then 2, 3 … — assigned by the log.
    pub offset: u64,
    pub notification: Arc<Notification>,
    /// Its compact encoding (the contract's `CapabilityNotification` without `offset`, `request_id` and
    /// `receive_time`).
    pub body: Arc<[u8]>,
}

impl Entry {
    /// The log's time of the entry, in milliseconds since the Unix epoch.
    pub fn time_ms(&self) -> u64 {
        match self {
            Entry::Query { time_ms, .. } => *time_ms,
            Entry::Notification(n) => n.time_ms,
        }
    }

    /// Builds the entry of a decoded event read at `time_ms`; `offset` is the one the log assigned.
    fn from_decoded(decoded: codec::Decoded, time_ms: u64, offset: u64) -> Entry {
        match decoded.event {
            Event::QueryRecorded(query) => Entry::Query { time_ms, query },
            Event::NotificationReceived(n) => Entry::Notification(NotificationEntry {
                time_ms,
                offset,
                body: decoded
                    .body
                    .unwrap_or_else(|| codec::encode_body(&n.notification))
                    .into(),
                notification: Arc::new(Notification {
                    received_time: codec::log_time(time_ms),
                    ..n.notification
                }),
            }),
        }
    }
}

/// What the log feeds: the hub, the cache.
pub trait Consumer: Send + Sync {
    /// Takes one entry. Entries of one request come in log order, each once.
    fn apply(&self, entry: &Entry);
    /// The log's clock reached `now_ms`: what is older than the retention before it may go.
    fn advance(&self, now_ms: u64);
    /// The log's clock read: it is `now_ms` (as [`Consumer::advance`], and not later: an entry's time is at most
    /// the log's, a reading of its clock is the time).
    fn read_clock(&self, now_ms: u64) {
        self.advance(now_ms);
    }
}

/// A keyed 128-bit hash of a string (a request_id, a nonce), as two halves: SipHash under two keys drawn at
/// start, so a sender cannot make two strings collide, and nothing need keep a copy of the string.
pub struct KeyedHash(RandomState, RandomState);

impl Default for KeyedHash {
    fn default() -> KeyedHash {
        KeyedHash(RandomState::new(), RandomState::new())
    }
}

impl KeyedHash {
    pub fn of(&self, text: &str) -> [u64; 2] {
        [self.0.hash_one(text), self.1.hash_one(text)]
    }
}

/// A map keyed by [`KeyedHash`]es that hashes a key by folding its bits: a key is already a hash under secret
/// keys, so hashing it again with SipHash (the default, on every lookup: several per callback) bought nothing.
pub type KeyedMap<V> = HashMap<[u64; 2], V, BuildHasherDefault<KeyFold>>;
/// A set of [`KeyedHash`]es, hashed as a [`KeyedMap`]'s keys are.
pub type KeyedSet = HashSet<[u64; 2], BuildHasherDefault<KeyFold>>;

/// Folds the bits it is given into one word: a hasher only for keys that are hashes under secret keys already
/// ([`KeyedHash`]es, HMACs); keys a sender can choose (a plain digest of what it sent) would collide at will.
#[derive(Default)]
pub struct KeyFold(u64);

impl Hasher for KeyFold {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut word = [0; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.0 = self.0.rotate_left(29) ^ u64::from_le_bytes(word);
        }
    }
}

/// A signed callback's nonce, and how long it must be remembered: as long as its timestamp would still pass the
/// tolerance check (after that a replay fails on its timestamp anyway).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Nonce<'a> {
    pub value: &'a str,
    pub remember_for: Duration,
}

/// What became of an accepted callback. Every variant but `Replayed` is acknowledged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accepted {
    /// Appended at this offset of its request: every replica will deliver it.
    Appended { offset: u64 },
    /// Its request already holds the same result: dropped.
    Duplicate,
    /// Its request holds as many notifications as it may already: dropped. `first` is true the
    /// first time this happens to the request.
    Capped { first: bool },
    /// Nothing to append (another trigger, or no request_id); the nonce was claimed.
    NothingToAppend,
    /// The nonce was used before: refused.
    Replayed,
}

/// The log could not take the event; the callback must not be acknowledged.
#[derive(Debug, Clone, thiserror::Error)]
#[error("the event log is unavailable: {0}")]
pub struct Unavailable(pub String);

/// The shared state of a caller-chosen request_id. The question (its fingerprint) and the answer are the
/// caller's text, kept as they were given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IdempotencyClaim {
    /// Nobody has sent this query: the caller sends it, then records the answer (or releases the claim).
    Owner(Claim),
    /// Another replica is sending it now.
    Pending,
    /// Already answered, with this answer.
    Answered(String),
    /// The request_id was used for a different query.
    Conflict,
}

/// A replica's own claim on a request_id: its token in Redis, so that it renews and settles its own claim and no
/// other replica's, even after its own lapsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claim(String);

/// How the log is doing, for probes and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Health {
    /// `local` or `redis`.
    pub backend: &'static str,
    /// Whether the log is reachable (always true in process).
    pub up: bool,
    /// Whether this replica has read back the retained log once since it started (or found Redis unreachable
    /// at its first attempt, and runs degraded).
    pub caught_up: bool,
}

/// What the log keeps.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// How long an event stays replayable after its time in the log.
    pub retention: Duration,
    /// The most notifications one request takes. Sinch sends one per channel identity: a handful in practice.
    pub max_per_request: u64,
}

/// The event log of this replica.
pub enum EventLog {
    Local(Box<LocalLog>),
    Redis(Arc<RedisLog>),
}

impl EventLog {
    /// An in-process log feeding `consumers`; it refuses callbacks once `draining` is cancelled.
    pub fn local(limits: Limits, consumers: Vec<Arc<dyn Consumer>>, draining: CancellationToken) -> EventLog {
        EventLog::Local(Box::new(LocalLog::new(limits, consumers, draining)))
    }

    /// A Redis log (see [`RedisLog::prepare`]).
    pub fn redis(redis: RedisLog) -> EventLog {
        EventLog::Redis(Arc::new(redis))
    }

    /// Starts what the log runs in the background (Redis: one reader per shard; in process: a clock tick)
    /// until `stop`.
    pub fn start(&self, tasks: &TaskTracker, stop: CancellationToken) {
        match self {
            EventLog::Local(local) => local.start(tasks, stop),
            EventLog::Redis(redis) => redis.clone().start(tasks, stop),
        }
    }

    /// Claims the callback's nonce (when signed) and appends its notification (when it has one), as one step.
    pub async fn accept(
        &self,
        nonce: Option<Nonce<'_>>,
        notification: Option<Notification>,
    ) -> Result<Accepted, Unavailable> {
        let notification = notification.map(|notification| NotificationReceived {
            digest: Digest::of(&notification),
            notification,
        });
        let accepted = match self {
            EventLog::Local(local) => local.accept(nonce, notification),
            EventLog::Redis(redis) => redis.accept(nonce, notification).await,
        }?;
        let counter = match accepted {
            Accepted::Appended { .. } => registered!(Counter, "capability_log_appends_total", "result" => "appended"),
            Accepted::Duplicate => registered!(Counter, "capability_log_appends_total", "result" => "duplicate"),
            Accepted::Capped { .. } => registered!(Counter, "capability_log_appends_total", "result" => "capped"),
            Accepted::NothingToAppend => return Ok(accepted),
            Accepted::Replayed => registered!(Counter, "capability_log_appends_total", "result" => "replayed"),
        };
        counter.increment(1);
        Ok(accepted)
    }

    /// Appends a query's record.
    pub async fn record_query(&self, query: QueryRecorded) -> Result<(), Unavailable> {
        match self {
            EventLog::Local(local) => local.record_query(query),
            EventLog::Redis(redis) => redis.record_query(query).await,
        }
    }

    /// Claims a caller-chosen request_id across replicas. In process, or when Redis is down, every claim is
    /// `Owner`: idempotency then holds within this replica only.
    pub async fn claim_request_id(&self, request_id: &str, fingerprint: &str) -> IdempotencyClaim {
        let claim = Claim(ulid::Ulid::new().to_string());
        let EventLog::Redis(redis) = self else {
            return IdempotencyClaim::Owner(claim);
        };
        match redis.claim_request_id(request_id, fingerprint, &claim).await {
            Ok(claimed) => claimed,
            Err(e) => {
                tracing::warn!(request_id = %mask_digits(request_id), error = %e, "idempotency holds within this replica only while Redis is down");
                IdempotencyClaim::Owner(claim)
            }
        }
    }

    /// What Redis holds for a caller-chosen request_id (`fingerprint`: its query), read without claiming it:
    /// `Answered`, `Conflict` or `Pending`; nothing when it is free, in process, or when Redis does not answer.
    pub async fn recorded_request_id(&self, request_id: &str, fingerprint: &str) -> Option<IdempotencyClaim> {
        let EventLog::Redis(redis) = self else {
            return None;
        };
        redis
            .recorded_request_id(request_id, fingerprint)
            .await
            .unwrap_or_else(|e| {
                tracing::debug!(request_id = %mask_digits(request_id), error = %e, "an idempotency record could not be read");
                None
            })
    }

    /// Keeps this replica's `claim` on `request_id` while the caller sends its query (`fingerprint`); never ends.
    /// A claim lapses a few seconds after its owner stops renewing it, so that a repeat after the owner stopped
    /// mid-send is sent by another replica rather than wait for an answer nobody will record.
    pub async fn hold_request_id(&self, request_id: &str, fingerprint: &str, claim: &Claim) -> Infallible {
        match self {
            EventLog::Local(_) => std::future::pending().await,
            EventLog::Redis(redis) => redis.hold_request_id(request_id, fingerprint, claim).await,
        }
    }

    /// Records the answer of a claimed request_id, or releases the claim when the query failed — this replica's
    /// `claim` only, not another's that took the request_id after this one lapsed.
    pub async fn settle_request_id(&self, request_id: &str, fingerprint: &str, claim: &Claim, answer: Option<&str>) {
        if let EventLog::Redis(redis) = self
            && let Err(e) = redis.settle_request_id(request_id, fingerprint, claim, answer).await
        {
            tracing::warn!(request_id = %mask_digits(request_id), error = %e, "could not record the idempotency answer in Redis");
        }
    }

    /// The capability cache shared through Redis; `None` in process.
    pub fn shared_cache(&self) -> Option<&redis::cache::RedisCache> {
        match self {
            EventLog::Local(_) => None,
            EventLog::Redis(redis) => Some(redis.cache()),
        }
    }

    /// Bulk check jobs shared through Redis; `None` in process.
    pub fn shared_jobs(&self) -> Option<&redis::jobs::RedisJobs> {
        match self {
            EventLog::Local(_) => None,
            EventLog::Redis(redis) => Some(redis.jobs()),
        }
    }

    /// How the log is doing.
    pub fn health(&self) -> Health {
        match self {
            EventLog::Local(_) => Health {
                backend: "local",
                up: true,
                caught_up: true,
            },
            EventLog::Redis(redis) => redis.health(),
        }
    }
}

/// Now, in milliseconds since the Unix epoch, by this replica's clock.
pub(crate) fn wall_clock_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as u64
}

/// Counts an entry a reader could not use, and says why once per reason and process (a rolling upgrade may
/// bring many).
fn skipped(error: &codec::DecodeError) {
    static SAID: [std::sync::Once; 2] = [std::sync::Once::new(), std::sync::Once::new()];
    let (reason, said) = match error {
        codec::DecodeError::Empty | codec::DecodeError::Malformed(_) => ("malformed", &SAID[0]),
        codec::DecodeError::UnknownVersion(_) => ("unknown_version", &SAID[1]),
    };
    metrics::counter!("capability_log_skipped_total", "reason" => reason).increment(1);
    said.call_once(|| tracing::warn!(%error, "a log entry this build cannot read was skipped (counted in capability_log_skipped_total)"));
}
