//! The hub: what this replica knows of each `request_id` — the query's expected channels, its notifications
//! numbered by arrival (offsets 1, 2, 3 …) with exact duplicates dropped — and the watches reading them.
//!
//! Records live in shards, each behind a std mutex held only for map and vector operations, never across an
//! `.await`. A watch keeps no queue of its own: it holds a cursor (the last offset it sent) and reads what is past
//! it from the record when the record's `Notify` wakes it, so a slow or idle watch costs a few words of memory.
//! Records are removed by one purge task `retention` after their last activity (not while watched), and past
//! `max_requests` the oldest are evicted first.

mod watch;

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    hash::BuildHasher,
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::Duration,
};

use tokio::{sync::Notify, time::Instant};
use tokio_util::sync::CancellationToken;

use crate::capability::Notification;
pub use watch::{CompletionReason, Watch, WatchEvent, WatchLimits};

const SHARDS: usize = 64;

/// How much the hub keeps.
#[derive(Debug, Clone, Copy)]
pub struct HubConfig {
    /// How long a request is kept after its last activity.
    pub retention: Duration,
    /// The most requests tracked at once; past it the oldest are evicted.
    pub max_requests: usize,
}

/// Per-request fan-out with retention and replay.
pub struct Hub {
    shards: Box<[Mutex<Shard>]>,
    /// Picks a request's shard.
    hasher: std::hash::RandomState,
    /// Every record by creation order (its generation), to evict the oldest at the cap.
    order: Mutex<BTreeMap<u64, Arc<str>>>,
    next_generation: AtomicU64,
    /// How many records exist.
    count: AtomicUsize,
    config: HubConfig,
}

#[derive(Default)]
struct Shard {
    records: HashMap<Arc<str>, Record>,
}

struct Record {
    /// Tells a watch that the record it reads is the one it subscribed to (not a later one of the same id).
    generation: u64,
    /// The channels an identified_by query will report, sorted; `None` when unknown.
    expected: Option<Vec<String>>,
    /// Notification at offset `i + 1` is at index `i`.
    notifications: Vec<Arc<Notification>>,
    /// The digests of `notifications`, to drop exact duplicates in constant time.
    digests: HashSet<u64>,
    /// How many watches read this record; a watched record is never purged.
    watchers: usize,
    last_activity: Instant,
    /// Woken on every change (a notification, the query record, removal).
    changed: Arc<Notify>,
}

/// What publishing did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Published {
    /// Stored at this offset and visible to every watch.
    New { offset: u64 },
    /// An exact duplicate of a notification already held (Sinch redelivers); dropped.
    Duplicate,
}

impl Hub {
    pub fn new(config: HubConfig) -> Hub {
        Hub {
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            hasher: std::hash::RandomState::new(),
            order: Mutex::new(BTreeMap::new()),
            next_generation: AtomicU64::new(1),
            count: AtomicUsize::new(0),
            config,
        }
    }

    /// How many requests are tracked.
    pub fn len(&self) -> usize {
        self.count.load(Ordering::Relaxed)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn shard(&self, request_id: &str) -> MutexGuard<'_, Shard> {
        let index = self.hasher.hash_one(request_id) as usize % SHARDS;
        self.shards[index].lock().expect("hub shard poisoned")
    }

    /// Applies `change` to the record of `request_id`, creating it if needed, then wakes its watches.
    fn with_record<T>(&self, request_id: &str, change: impl FnOnce(&mut Record) -> T) -> T {
        let now = Instant::now();
        let (result, changed, created) = {
            let mut shard = self.shard(request_id);
            let mut created = false;
            let record = match shard.records.get_mut(request_id) {
                Some(record) => record,
                None => {
                    created = true;
                    let key: Arc<str> = Arc::from(request_id);
                    let generation = self.next_generation.fetch_add(1, Ordering::Relaxed);
                    self.order
                        .lock()
                        .expect("hub order poisoned")
                        .insert(generation, key.clone());
                    self.count.fetch_add(1, Ordering::Relaxed);
                    shard.records.entry(key).or_insert(Record {
                        generation,
                        expected: None,
                        notifications: Vec::new(),
                        digests: HashSet::new(),
                        watchers: 0,
                        last_activity: now,
                        changed: Arc::new(Notify::new()),
                    })
                }
            };
            record.last_activity = now;
            let result = change(record);
            (result, record.changed.clone(), created)
        };
        changed.notify_waiters();
        if created {
            self.evict_over_cap();
        }
        result
    }

    /// Records a query that went through this service: its expected channels, when known.
    pub fn record_query(&self, request_id: &str, expected: Option<Vec<String>>) {
        self.with_record(request_id, |record| {
            if expected.is_some() {
                record.expected = expected;
            }
        });
    }

    /// Stores a notification under its request_id at the next offset, unless it is an exact duplicate.
    pub fn publish(&self, notification: Arc<Notification>) -> Published {
        let key = notification.clone();
        let published = self.with_record(&key.request_id, |record| {
            if !record.digests.insert(notification.digest) {
                return Published::Duplicate;
            }
            record.notifications.push(notification);
            Published::New {
                offset: record.notifications.len() as u64,
            }
        });
        match published {
            Published::New { .. } => metrics::counter!("capability_notifications_published_total").increment(1),
            Published::Duplicate => metrics::counter!("capability_notifications_duplicate_total").increment(1),
        }
        published
    }

    /// Opens a watch of `request_id` that first replays what is past `after_offset`.
    pub fn watch(self: &Arc<Self>, request_id: &str, after_offset: u64, limits: WatchLimits) -> Watch {
        let (generation, changed) = self.with_record(request_id, |record| {
            record.watchers += 1;
            (record.generation, record.changed.clone())
        });
        Watch::new(
            Subscription {
                hub: self.clone(),
                key: request_id.into(),
                generation,
                changed,
                cursor: after_offset,
            },
            limits,
        )
    }

    /// Removes every record idle for longer than the retention and not watched; returns how many.
    pub fn purge(&self) -> usize {
        let now = Instant::now();
        let retention = self.config.retention;
        let mut removed = 0;
        for shard in self.shards.iter() {
            let mut shard = shard.lock().expect("hub shard poisoned");
            shard.records.retain(|_, record| {
                let keep = record.watchers > 0 || now.duration_since(record.last_activity) < retention;
                if !keep {
                    self.forget(record);
                    removed += 1;
                }
                keep
            });
        }
        if removed > 0 {
            metrics::counter!("capability_requests_expired_total").increment(removed as u64);
        }
        removed
    }

    /// Purges every `retention / 10` (at least each 50 ms, at most each second) until `shutdown`.
    pub async fn run_purge(self: Arc<Self>, shutdown: CancellationToken) {
        let period = (self.config.retention / 10).clamp(Duration::from_millis(50), Duration::from_secs(1));
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => { self.purge(); }
                () = shutdown.cancelled() => return,
            }
        }
    }

    /// Evicts the oldest records while there are more than `max_requests`.
    fn evict_over_cap(&self) {
        while self.count.load(Ordering::Relaxed) > self.config.max_requests {
            let Some((generation, key)) = self.order.lock().expect("hub order poisoned").pop_first() else {
                return;
            };
            let mut shard = self.shard(&key);
            if shard.records.get(&key).is_some_and(|r| r.generation == generation) {
                let record = shard.records.remove(&key).expect("present");
                self.count.fetch_sub(1, Ordering::Relaxed);
                record.changed.notify_waiters();
                metrics::counter!("capability_requests_evicted_total").increment(1);
                tracing::warn!(request_id = %key, "evicted: more requests than the configured maximum");
            }
        }
    }

    /// Bookkeeping for a record being removed from its shard (its shard lock is held).
    fn forget(&self, record: &Record) {
        self.order
            .lock()
            .expect("hub order poisoned")
            .remove(&record.generation);
        self.count.fetch_sub(1, Ordering::Relaxed);
        record.changed.notify_waiters();
    }
}

/// A watch's hold on a record: a cursor into its notifications. Dropping it releases the record.
pub(crate) struct Subscription {
    hub: Arc<Hub>,
    key: Arc<str>,
    generation: u64,
    changed: Arc<Notify>,
    /// The offset of the last notification taken.
    cursor: u64,
}

/// What a subscription found past its cursor.
pub(crate) struct Snapshot {
    pub notifications: Vec<Arc<Notification>>,
    /// The first offset in `notifications`.
    pub first_offset: u64,
    /// `Some(pending)` when the expected channels are known; complete when `pending` is empty.
    pub pending: Option<Vec<String>>,
    /// The record was evicted while watched.
    pub gone: bool,
}

impl Subscription {
    /// Takes every notification past the cursor, and says whether the answer is complete.
    fn take(&mut self) -> Snapshot {
        let shard = self.hub.shard(&self.key);
        let Some(record) = shard.records.get(&self.key).filter(|r| r.generation == self.generation) else {
            return Snapshot {
                notifications: Vec::new(),
                first_offset: self.cursor.saturating_add(1),
                pending: None,
                gone: true,
            };
        };
        let start = (self.cursor as usize).min(record.notifications.len());
        let notifications = record.notifications[start..].to_vec();
        let pending = record.expected.as_ref().map(|expected| {
            expected
                .iter()
                .filter(|channel| !record.notifications.iter().any(|n| &n.channel == *channel))
                .cloned()
                .collect()
        });
        let first_offset = self.cursor.saturating_add(1);
        self.cursor = self.cursor.max(record.notifications.len() as u64);
        Snapshot {
            notifications,
            first_offset,
            pending,
            gone: false,
        }
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let mut shard = self.hub.shard(&self.key);
        if let Some(record) = shard
            .records
            .get_mut(&self.key)
            .filter(|r| r.generation == self.generation)
        {
            record.watchers -= 1;
            record.last_activity = Instant::now();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use super::*;

    pub(super) fn notification(request_id: &str, channel: &str, digest: u64) -> Arc<Notification> {
        Arc::new(Notification {
            request_id: request_id.into(),
            contact_id: String::new(),
            channel: channel.into(),
            identity: "46712312312".into(),
            capability_status: "CAPABILITY_FULL".into(),
            channel_capabilities: Vec::new(),
            reason: None,
            channel_recipient_identities: Vec::new(),
            app_id: String::new(),
            project_id: String::new(),
            accepted_time: None,
            event_time: None,
            message_metadata: String::new(),
            correlation_id: String::new(),
            received_time: SystemTime::now(),
            digest,
        })
    }

    fn hub(retention_s: u64, max_requests: usize) -> Arc<Hub> {
        Arc::new(Hub::new(HubConfig {
            retention: Duration::from_secs(retention_s),
            max_requests,
        }))
    }

    #[test]
    fn offsets_follow_arrival_and_duplicates_are_dropped() {
        let hub = hub(600, 10);
        assert_eq!(hub.publish(notification("r", "SMS", 1)), Published::New { offset: 1 });
        assert_eq!(hub.publish(notification("r", "RCS", 2)), Published::New { offset: 2 });
        assert_eq!(hub.publish(notification("r", "SMS", 1)), Published::Duplicate);
        assert_eq!(
            hub.publish(notification("other", "SMS", 1)),
            Published::New { offset: 1 }
        );
        assert_eq!(hub.len(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn records_expire_after_their_last_activity_unless_watched() {
        let hub = hub(60, 10);
        hub.publish(notification("idle", "SMS", 1));
        hub.publish(notification("watched", "SMS", 1));
        let watch = hub.watch("watched", 0, WatchLimits::for_tests());
        tokio::time::advance(Duration::from_secs(59)).await;
        assert_eq!(hub.purge(), 0);
        tokio::time::advance(Duration::from_secs(2)).await;
        assert_eq!(hub.purge(), 1, "the idle record went, the watched one stayed");
        drop(watch);
        tokio::time::advance(Duration::from_secs(61)).await;
        assert_eq!(hub.purge(), 1);
        assert!(hub.is_empty());
        assert!(hub.order.lock().unwrap().is_empty());
    }

    #[test]
    fn past_the_cap_the_oldest_request_goes_first() {
        let hub = hub(600, 2);
        hub.publish(notification("first", "SMS", 1));
        hub.publish(notification("second", "SMS", 1));
        hub.publish(notification("first", "RCS", 2)); // activity does not change age
        hub.publish(notification("third", "SMS", 1));
        assert_eq!(hub.len(), 2);
        assert_eq!(
            hub.publish(notification("first", "SMS", 1)),
            Published::New { offset: 1 }
        );
        assert_eq!(hub.len(), 2, "first came back as new, second was evicted");
    }
}
