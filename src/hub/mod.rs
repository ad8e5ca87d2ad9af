//! The hub: what this replica holds of each `request_id` — the query's expected channels and its notifications
//! at the offsets the log gave them — and the watches reading them. It is fed only by the event log
//! ([`crate::log`]), each request's events in log order, and decides nothing the log decides: offsets, duplicates
//! and the cap come with each entry, and time is the log's.
//!
//! Records live in shards, each behind a std mutex held only for map and vector operations, never across an
//! `.await`. A record is keyed by a 128-bit keyed hash of its request_id (two SipHash keys drawn at start: a
//! sender cannot make two request_ids collide), so that it stores no copy of the string; it holds about 100
//! bytes, and its notifications lie back to back in one buffer, with a 16-byte head each ([`held`]).
//!
//! What is kept, the same on every replica because it is decided by log time:
//! - a notification, until `retention` after its time in the log;
//! - a record, while any of its events is kept (or while it is watched);
//! - at most `max_requests` records with events: past that the record created first goes first (by the order
//!   the hub made them in: records of requests fed at once from different shards of the log are made in either
//!   order).
//!
//! A watch keeps no queue of its own: it holds a cursor (the last offset it sent) and reads what is past it when
//! the record wakes it, so a slow or idle watch costs a few words. A watch of a request nobody has heard of
//! waits in a shell that counts towards no cap but the watches' own, so watches of made-up request_ids cannot
//! push real results out.

mod channels;
mod held;
mod watch;

use std::{
    collections::{HashMap, VecDeque},
    num::NonZeroU32,
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicBool, AtomicI64, AtomicU32, AtomicU64, AtomicUsize, Ordering},
    },
    time::Duration,
};

use tokio::{sync::Notify, time::Instant};
use tokio_util::sync::CancellationToken;

use crate::{
    capability::{Channel, Notification, mask_digits},
    log::{Consumer, Digest, Entry, KeyedHash, KeyedMap, NotificationEntry, codec},
    telemetry::registered,
};
use channels::ChannelSet;
use held::{Held, HeldList};
pub use watch::{CompletionReason, Watch, WatchEvent, WatchLimits};

const SHARDS: usize = 64;
/// The most distinct (app, project) pairs kept once for all; past it (Sinch sends from a project's few apps),
/// notifications keep theirs inline.
const MAX_SOURCES: usize = 1024;
/// Entries of gone records the eviction order may hold beyond twice the live ones before it is compacted.
const ORDER_SLACK: usize = 1024;

/// How much the hub keeps.
#[derive(Debug, Clone, Copy)]
pub struct HubConfig {
    /// How long a notification is kept after its time in the log.
    pub retention: Duration,
    /// The most requests with events held at once; past it the oldest are evicted.
    pub max_requests: usize,
}

/// Per-request fan-out with retention and replay.
pub struct Hub {
    shards: Box<[Mutex<Shard>]>,
    /// The request-id hash.
    keys: KeyedHash,
    /// Records with events in the order the log created them (generation, key), to evict the oldest at the
    /// cap. Entries of records already gone are skipped when met.
    order: Mutex<VecDeque<(Generation, Key)>>,
    next_generation: AtomicU32,
    /// How many records with events exist.
    count: AtomicUsize,
    /// The log's clock: the latest time it reported, in milliseconds since the Unix epoch.
    now_ms: AtomicU64,
    /// The log's clock against this process's steady one, `time − ms since started`: of its latest reading
    /// ([`Consumer::read_clock`]; [`i64::MIN`] before the first), and of `now_ms` when it last rose. See
    /// [`Hub::log_now_ms`].
    read_offset: AtomicI64,
    rose_offset: AtomicI64,
    started: Instant,
    retention_ms: u64,
    max_requests: usize,
    /// The encoded (app_id, project_id) of the records' notifications, each kept once ([`codec::encode_source`]).
    sources: Mutex<HashMap<Box<[u8]>, Source>>,
    /// Set by [`Hub::close`]: every watch ends, shutting down.
    closed: AtomicBool,
}

/// An encoded (app_id, project_id) shared by the records whose notifications came from it: one pointer in a
/// record (an `Arc<[u8]>` would take two).
type Source = Arc<Box<[u8]>>;

/// A keyed 128-bit hash of a request_id, as two halves (8-byte aligned, where a `u128` would pad every record).
type Key = [u64; 2];

#[derive(Default)]
struct Shard {
    /// Boxed: a table is up to half empty after it doubles, and an empty slot then costs a key and a pointer
    /// rather than a whole record (BENCHMARKS.md, issue 16).
    records: KeyedMap<Box<Record>>,
}

/// Channels whose results all expired before their record (see [`Record::lost`]), each with the offset of its
/// last result.
struct Lost {
    channels: Vec<(Channel, u64)>,
}

/// Tells a watch that the record it reads is the one it subscribed to (not a later one of the same id), and the
/// eviction order that an entry is the record's. 32 bits, counted round: a record of the same id made 2³² records
/// later, within one watch's life or one record's, would be taken for the earlier.
type Generation = u32;

struct Record {
    generation: Generation,
    /// Whether the log has given this record an event (else it is a watch's shell).
    real: bool,
    /// The log time of its latest event.
    last_ms: u64,
    /// The channels its query will report; `None` when unknown.
    expected: Option<ChannelSet>,
    /// Where the question `expected` comes from stands (its time in the log, or for a late record the time it says:
    /// see [`crate::log::QueryRecorded::asked_ms`]), in milliseconds since the Unix epoch modulo 2³² (0 read as 1),
    /// compared as serial numbers (RFC 1982): two questions of one request_id are asked well within 24 days of each
    /// other. `None` before its first question.
    asked: Option<NonZeroU32>,
    /// The channels that reported.
    reported: ChannelSet,
    /// The channels that reported but whose results all expired, each with its last result's offset: a watch
    /// that did not read that offset counts the channel as pending again. Made only when a result expires before
    /// its record.
    lost: Option<Box<Lost>>,
    /// By offset, ascending; offsets may start above 1 (a replica that started after the first ones expired).
    notifications: HeldList,
    /// The app and project of its first notification, as the hub shares them: a notification from the same is
    /// kept without them.
    source: Option<Source>,
    /// How many watches read this record; a watched record stays (empty) when its events expire.
    watchers: u32,
    /// Woken on every change (a notification, the query record, removal); made when first watched.
    changed: Option<Arc<Notify>>,
}

impl Record {
    /// Its first notification past `cursor` as (offset, compact encoding), with its app and project again and its
    /// receive time, the log's.
    fn next_after(&self, cursor: u64) -> Option<(u64, Vec<u8>)> {
        let held = self.notifications.after(cursor).next()?;
        let mut body = self.body_of(&held, codec::RECEIVE_TIME_LEN);
        codec::put_receive_time(held.time_ms, &mut body);
        Some((held.offset, body))
    }

    /// A held notification's encoding with its app and project again, with room for `more` bytes.
    fn body_of(&self, held: &Held<'_>, more: usize) -> Vec<u8> {
        let source = self.source.as_deref().filter(|_| held.sourced);
        let source = source.map_or(&[][..], |s| &s[..]);
        let mut body = Vec::with_capacity(held.body.len() + source.len() + more);
        body.extend_from_slice(held.body);
        body.extend_from_slice(source);
        body
    }

    /// A held notification, decoded under `request_id`; `None` when it does not decode.
    fn decode(&self, request_id: String, held: &Held<'_>) -> Option<Notification> {
        codec::decode_body(request_id, &self.body_of(held, 0)).ok()
    }

    /// Drops its notifications received before `cutoff_ms`; a channel none of whose results is held any more is
    /// lost to the watches that had not read it.
    fn expire_until(&mut self, cutoff_ms: u64) {
        let channel_of = |record: &Record, held: &Held<'_>| {
            let notification = record.decode(String::new(), held)?;
            Some((notification.channel, held.offset))
        };
        let expiring: Vec<(Channel, u64)> = (self.notifications.after(0))
            .take_while(|held| held.time_ms <= cutoff_ms)
            .filter_map(|held| channel_of(self, &held))
            .collect();
        if !self.notifications.drop_until(cutoff_ms) {
            return;
        }
        let held: Vec<Channel> = (self.notifications.after(0))
            .filter_map(|held| channel_of(self, &held).map(|(channel, _)| channel))
            .collect();
        let mut lost = self.lost.take().map_or_else(Vec::new, |lost| lost.channels);
        for (channel, offset) in expiring.into_iter().filter(|(channel, _)| !held.contains(channel)) {
            match lost.iter_mut().find(|(known, _)| *known == channel) {
                Some((_, last)) => *last = (*last).max(offset),
                None => lost.push((channel, offset)),
            }
        }
        self.lost = (!lost.is_empty()).then(|| Box::new(Lost { channels: lost }));
    }

    /// Whether it holds `n`: a notification with the log's [`Digest`] of it (its channel, identity, status and
    /// reason). Looked for only when an offset comes again, after Redis lost its data.
    fn holds(&self, n: &Notification) -> bool {
        let digest = Digest::of(n);
        self.notifications.after(0).any(|held| {
            self.decode(n.request_id.clone(), &held)
                .is_some_and(|held| Digest::of(&held) == digest)
        })
    }
}

impl Hub {
    pub fn new(config: HubConfig) -> Hub {
        Hub {
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            keys: KeyedHash::default(),
            order: Mutex::new(VecDeque::new()),
            next_generation: AtomicU32::new(1),
            count: AtomicUsize::new(0),
            now_ms: AtomicU64::new(0),
            read_offset: AtomicI64::new(i64::MIN),
            rose_offset: AtomicI64::new(i64::MIN),
            started: Instant::now(),
            retention_ms: config.retention.as_millis() as u64,
            max_requests: config.max_requests,
            sources: Mutex::default(),
            closed: AtomicBool::new(false),
        }
    }

    /// Ends every watch, open or yet to open, with [`WatchEvent::ShuttingDown`]: the server is shutting down.
    /// A watch waits on its record's change alone, so each watched record is woken after the flag is set (a
    /// watch registers before it reads the flag: it sees the flag or is woken).
    pub fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
        for shard in self.shards.iter() {
            let woken: Vec<_> = shard
                .lock()
                .expect("hub shard poisoned")
                .records
                .values()
                .filter_map(|record| record.changed.clone())
                .collect();
            woken.iter().for_each(|notify| notify.notify_waiters());
        }
    }

    /// The log's clock as this replica last read it, in milliseconds since the Unix epoch (0 before any reading).
    pub fn now_ms(&self) -> u64 {
        self.now_ms.load(Ordering::Relaxed)
    }

    /// The log's clock now, in milliseconds since the Unix epoch, whether it runs ahead of this replica's or
    /// behind (`None` before the log's clock was first read): its latest reading plus the time since, on this
    /// process's steady clock — or the latest time the log gave an event plus the time since, when later (a
    /// stream whose entries run ahead of Redis's clock, which times them all at its last while Redis's clock
    /// catches up). The reader reads Redis's clock on connecting and whenever it is idle; a clock stepped back is
    /// followed from its next reading, and from the next event timed later.
    pub fn log_now_ms(&self) -> Option<u64> {
        let read = self.read_offset.load(Ordering::Relaxed);
        let offset = read.max(self.rose_offset.load(Ordering::Relaxed));
        (read != i64::MIN).then(|| offset.saturating_add(self.steady_ms()).max(0) as u64)
    }

    /// Raises the log's clock to `log_ms` (see [`Hub::now_ms`]).
    fn raise_clock(&self, log_ms: u64) {
        if self.now_ms.fetch_max(log_ms, Ordering::Relaxed) < log_ms {
            self.rose_offset.store(self.offset_of(log_ms), Ordering::Relaxed);
        }
    }

    /// `log_ms` against this process's steady clock now.
    fn offset_of(&self, log_ms: u64) -> i64 {
        (log_ms as i64).saturating_sub(self.steady_ms())
    }

    fn steady_ms(&self) -> i64 {
        self.started.elapsed().as_millis() as i64
    }

    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::SeqCst)
    }

    /// How many requests with events are held.
    pub fn len(&self) -> usize {
        self.count.load(Ordering::Relaxed)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn shard(&self, key: Key) -> MutexGuard<'_, Shard> {
        self.shards[(key[0] % SHARDS as u64) as usize]
            .lock()
            .expect("hub shard poisoned")
    }

    fn new_record(&self, real: bool, last_ms: u64) -> Box<Record> {
        Box::new(Record {
            generation: self.next_generation.fetch_add(1, Ordering::Relaxed),
            real,
            last_ms,
            expected: None,
            asked: None,
            reported: ChannelSet::default(),
            lost: None,
            notifications: HeldList::default(),
            source: None,
            watchers: 0,
            changed: None,
        })
    }

    /// Applies a log entry to the record of `request_id`, creating it (or making a shell real) as needed.
    fn apply_to(&self, request_id: &str, time_ms: u64, change: impl FnOnce(&mut Record)) {
        let key = self.keys.of(request_id);
        let mut became_real = None;
        let woken = {
            let mut shard = self.shard(key);
            let expired = shard
                .records
                .get(&key)
                .is_some_and(|r| r.real && r.last_ms.saturating_add(self.retention_ms) <= time_ms);
            if expired {
                // Every event of it expired by the log's clock before this one: the log started the request
                // again, and so does the hub (the purge had not come round yet).
                let old = shard.records.remove(&key).expect("present");
                self.forget(&old);
            }
            let record = shard
                .records
                .entry(key)
                .or_insert_with(|| self.new_record(false, time_ms));
            if !record.real {
                record.real = true;
                became_real = Some(record.generation);
            }
            record.last_ms = record.last_ms.max(time_ms);
            change(record);
            record.changed.clone()
        };
        if let Some(notify) = woken {
            notify.notify_waiters();
        }
        if let Some(generation) = became_real {
            self.order
                .lock()
                .expect("hub order poisoned")
                .push_back((generation, key));
            self.count.fetch_add(1, Ordering::Relaxed);
            self.evict_over_cap();
        }
    }

    /// The shared copy of `source`; `None` when [`MAX_SOURCES`] others are held.
    fn shared_source(&self, source: &[u8]) -> Option<Source> {
        let mut sources = self.sources.lock().expect("hub sources poisoned");
        if let Some(shared) = sources.get(source) {
            return Some(shared.clone());
        }
        if sources.len() >= MAX_SOURCES {
            return None;
        }
        let shared = Source::new(source.into());
        sources.insert(source.into(), shared.clone());
        Some(shared)
    }

    fn apply_notification(&self, n: &NotificationEntry) {
        let source = codec::encode_source(&n.notification);
        let mut duplicate = false;
        self.apply_to(&n.notification.request_id, n.time_ms, |record| {
            let mut offset = n.offset;
            if let Some(last) = record.notifications.last_offset().filter(|&last| last >= n.offset) {
                if record.holds(&n.notification) {
                    // Appended again after Redis lost its data, and already held.
                    duplicate = true;
                    return;
                }
                // Numbered again by a Redis that lost its data (or appended again out of order by replicas
                // recovering from that): acknowledged, so held after the last rather than lost to the watches.
                offset = last + 1;
                tracing::warn!(
                    request_id = %mask_digits(&n.notification.request_id),
                    logged = n.offset,
                    held = offset,
                    "a notification came at an offset this replica holds already (Redis lost data): held after the last"
                );
            }
            record.reported.insert(&n.notification.channel);
            if let Some(lost) = &mut record.lost {
                lost.channels.retain(|(channel, _)| *channel != n.notification.channel);
            }
            if record.source.is_none() {
                record.source = self.shared_source(&source);
            }
            let held = if record.source.as_deref().is_some_and(|shared| shared[..] == source[..]) {
                let stripped = codec::encode_compact_body(&n.notification);
                record.notifications.push(offset, n.time_ms, &stripped, true)
            } else {
                record.notifications.push(offset, n.time_ms, &n.body, false)
            };
            if let Err(unheld) = held {
                tracing::error!(offset, ?unheld, "a notification the hub cannot hold is dropped");
            }
        });
        if duplicate {
            registered!(Counter, "capability_notifications_duplicate_total").increment(1);
        } else {
            registered!(Counter, "capability_notifications_published_total").increment(1);
        }
    }

    /// Opens a watch of `request_id` that first replays what is past `after_offset`.
    pub fn watch(self: &Arc<Self>, request_id: &str, after_offset: u64, limits: WatchLimits) -> Watch {
        let key = self.keys.of(request_id);
        let (generation, changed) = {
            let mut shard = self.shard(key);
            let now = self.now_ms.load(Ordering::Relaxed);
            let record = shard.records.entry(key).or_insert_with(|| self.new_record(false, now));
            record.watchers += 1;
            let changed = record.changed.get_or_insert_with(|| Arc::new(Notify::new())).clone();
            (record.generation, changed)
        };
        Watch::new(
            Subscription {
                hub: self.clone(),
                key,
                request_id: request_id.into(),
                generation,
                changed,
                cursor: after_offset,
                gaps: None,
            },
            limits,
        )
    }

    /// Whether `request_id` holds a notification the log received before `before_ms` that `about` picks: what a
    /// check joining that request would be served again. `None` when the hub holds no record of it (never heard
    /// of here yet, or gone: expired or evicted).
    pub fn answered_before(
        &self,
        request_id: &str,
        before_ms: u64,
        about: impl Fn(&Notification) -> bool,
    ) -> Option<bool> {
        let key = self.keys.of(request_id);
        let shard = self.shard(key);
        let record = shard.records.get(&key).filter(|record| record.real)?;
        // Only the old ones are decoded (by offset, which follows the log's time but for one numbered again after
        // Redis lost its data).
        let answered = (record.notifications.after(0))
            .filter(|held| held.time_ms < before_ms)
            .any(|held| {
                record
                    .decode(request_id.to_owned(), &held)
                    .is_some_and(|notification| about(&notification))
            });
        Some(answered)
    }

    /// Removes what the log's clock says has expired: notifications older than the retention, and records with
    /// nothing left that nobody watches. Returns how many records went.
    pub fn purge(&self) -> usize {
        let now = self.now_ms.load(Ordering::Relaxed);
        let mut removed = 0;
        for shard in self.shards.iter() {
            let mut woken = Vec::new();
            let mut shard = shard.lock().expect("hub shard poisoned");
            shard.records.retain(|_, record| {
                let expired = record.last_ms.saturating_add(self.retention_ms) <= now;
                if !expired || record.watchers > 0 {
                    // Only a record that stays has its expired notifications looked at (decoded, under the
                    // shard's lock, which publishing takes too); one that goes takes them with it.
                    if let Some(cutoff) = now.checked_sub(self.retention_ms) {
                        record.expire_until(cutoff);
                    }
                    return true;
                }
                if record.real {
                    self.count.fetch_sub(1, Ordering::Relaxed);
                    removed += 1;
                }
                woken.extend(record.changed.clone());
                false
            });
            drop(shard);
            woken.iter().for_each(|notify| notify.notify_waiters());
        }
        self.trim_order();
        self.sources
            .lock()
            .expect("hub sources poisoned")
            .retain(|_, source| Arc::strong_count(source) > 1);
        if removed > 0 {
            metrics::counter!("capability_requests_expired_total").increment(removed as u64);
        }
        removed
    }

    /// Purges every `retention / 10` (at least each 50 ms, at most each second) until `stop`.
    pub async fn run_purge(self: Arc<Self>, stop: CancellationToken) {
        let period =
            (Duration::from_millis(self.retention_ms) / 10).clamp(Duration::from_millis(50), Duration::from_secs(1));
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => { self.purge(); }
                () = stop.cancelled() => return,
            }
        }
    }

    /// Evicts the records the log created first while more than `max_requests` have events.
    fn evict_over_cap(&self) {
        while self.count.load(Ordering::Relaxed) > self.max_requests {
            let Some((generation, key)) = self.order.lock().expect("hub order poisoned").pop_front() else {
                return;
            };
            let mut shard = self.shard(key);
            if shard.records.get(&key).is_some_and(|r| r.generation == generation) {
                let record = shard.records.remove(&key).expect("present");
                drop(shard);
                self.forget(&record);
                metrics::counter!("capability_requests_evicted_total").increment(1);
                tracing::warn!("a request was evicted: more requests than CAPABILITY_MAX_REQUESTS");
            }
        }
    }

    /// Bookkeeping for a record removed from its shard.
    fn forget(&self, record: &Record) {
        if record.real {
            self.count.fetch_sub(1, Ordering::Relaxed);
        }
        if let Some(notify) = &record.changed {
            notify.notify_waiters();
        }
    }

    /// Drops order entries of records already gone: from the front (the oldest go first, so they gather there),
    /// and all through once gone ones outnumber live ones (a watched record that outlives its events keeps the
    /// front live while later ones come and go).
    fn trim_order(&self) {
        let live = |&(generation, key): &(Generation, Key)| {
            self.shard(key)
                .records
                .get(&key)
                .is_some_and(|r| r.generation == generation)
        };
        let mut order = self.order.lock().expect("hub order poisoned");
        while order.front().is_some_and(|entry| !live(entry)) {
            order.pop_front();
        }
        if order.len() > 2 * self.len() + ORDER_SLACK {
            order.retain(live);
            order.shrink_to_fit();
        }
    }
}

impl Consumer for Hub {
    fn apply(&self, entry: &Entry) {
        match entry {
            // The latest question asked under the request_id says which channels will report, also when they are
            // not known in advance: a question Sinch refused may be asked again, corrected, under the same one.
            // Latest by its place in the log, but for a record appended late (again after an outage, or once Redis
            // took it after refusing it): by where it says it stands (see `QueryRecorded::asked_ms`), and only
            // past the question held (the same place is the same question).
            Entry::Query { time_ms, query } => {
                let late = query.late && query.asked_ms != 0;
                let asked = if late { query.asked_ms } else { *time_ms } as u32;
                let asked = NonZeroU32::new(asked).unwrap_or(NonZeroU32::MIN);
                self.apply_to(&query.request_id, *time_ms, |record| {
                    let later = |held: NonZeroU32| asked.get().wrapping_sub(held.get()) as i32 > 0;
                    if !late || record.asked.is_none_or(later) {
                        record.asked = Some(asked);
                        record.expected = query.expected.as_ref().map(|expected| expected.iter().collect());
                    }
                })
            }
            Entry::Notification(n) => self.apply_notification(n),
        }
        self.raise_clock(entry.time_ms());
    }

    fn advance(&self, now_ms: u64) {
        self.raise_clock(now_ms);
    }

    fn read_clock(&self, now_ms: u64) {
        self.advance(now_ms);
        self.read_offset.store(self.offset_of(now_ms), Ordering::Relaxed);
    }
}

/// A watch's hold on a record: a cursor into its notifications. Dropping it releases the record.
pub(crate) struct Subscription {
    hub: Arc<Hub>,
    key: Key,
    request_id: Arc<str>,
    generation: Generation,
    changed: Arc<Notify>,
    /// The offset of the last notification taken.
    cursor: u64,
    /// The offsets it passed without reading them (they had expired); made at the first such gap.
    gaps: Option<Box<Gaps>>,
}

/// The offsets a watch passed without reading them.
struct Gaps {
    /// The latest gap's first and last offsets.
    latest: (u64, u64),
    /// The channels lost in the gaps before it (their last result among the offsets passed), until the watch reads
    /// one of theirs: named, so that what the watch read between two gaps does not count as passed.
    before: ChannelSet,
}

impl Gaps {
    /// The watch passed the offsets `latest` too: the channels `lost` in the gap before, by name.
    fn passed(&mut self, latest: (u64, u64), lost: &[(Channel, u64)]) {
        let (first, last) = self.latest;
        for (channel, _) in lost.iter().filter(|(_, at)| (first..=last).contains(at)) {
            self.before.insert(channel);
        }
        self.latest = latest;
    }

    /// Whether the watch passed `channel`'s result at `offset` without reading it.
    fn passed_over(&self, channel: &Channel, offset: u64) -> bool {
        (self.latest.0..=self.latest.1).contains(&offset) || self.before.contains(channel)
    }
}

/// What a subscription found past its cursor.
pub(crate) enum Snapshot {
    /// The next notification, (offset, compact encoding): the cursor has moved to it.
    Notification(u64, Vec<u8>),
    /// Nothing past the cursor. `Some(pending)` when the expected channels are known; complete when `pending` is
    /// empty.
    Quiet { pending: Option<Vec<Channel>> },
    /// The record was evicted or expired while watched.
    Gone,
}

impl Subscription {
    /// Takes the next notification past the cursor, or says whether the answer is complete. One at a time, so
    /// that a watch keeps no queue of its own.
    fn take(&mut self) -> Snapshot {
        let shard = self.hub.shard(self.key);
        let Some(record) = shard.records.get(&self.key).filter(|r| r.generation == self.generation) else {
            return Snapshot::Gone;
        };
        if let Some((offset, body)) = record.next_after(self.cursor) {
            if offset > self.cursor + 1 {
                let latest = (self.cursor + 1, offset - 1);
                match &mut self.gaps {
                    Some(gaps) => gaps.passed(latest, record.lost.as_deref().map_or(&[], |lost| &lost.channels)),
                    None => {
                        self.gaps = Some(Box::new(Gaps {
                            latest,
                            before: ChannelSet::default(),
                        }))
                    }
                }
            }
            // A channel lost in an earlier gap and read now is read (decoded only then: rare).
            if let Some(gaps) = self.gaps.as_deref_mut()
                && !gaps.before.is_empty()
                && let Ok(read) = codec::decode_body(String::new(), &body)
            {
                gaps.before.remove(&read.channel);
            }
            self.cursor = offset;
            return Snapshot::Notification(offset, body);
        }
        // The channels whose last result expired before this watch read it: past its cursor, or passed by it.
        let passed = |channel: &Channel, offset: u64| {
            offset > self.cursor
                || self
                    .gaps
                    .as_deref()
                    .is_some_and(|gaps| gaps.passed_over(channel, offset))
        };
        let lost: Option<ChannelSet> = record.lost.as_deref().map(|lost| {
            let unread = lost
                .channels
                .iter()
                .filter(|(channel, offset)| passed(channel, *offset));
            unread.map(|(channel, _)| channel).collect()
        });
        Snapshot::Quiet {
            pending: record.expected.as_ref().map(|expected| match lost {
                // Results this watch did not read and cannot any more: reported, but not to it.
                Some(lost) => expected.without(&record.reported.minus(&lost)),
                None => expected.without(&record.reported),
            }),
        }
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let mut shard = self.hub.shard(self.key);
        if let Some(record) = shard
            .records
            .get_mut(&self.key)
            .filter(|r| r.generation == self.generation)
        {
            record.watchers -= 1;
            if record.watchers == 0 {
                record.changed = None;
                if !record.real {
                    shard.records.remove(&self.key);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        capability::{CapabilityStatus, Notification},
        log::QueryRecorded,
    };

    pub(super) fn notification(request_id: &str, channel: Channel, offset: u64, time_ms: u64) -> Entry {
        from_app(request_id, channel, offset, time_ms, "APP")
    }

    fn from_app(request_id: &str, channel: Channel, offset: u64, time_ms: u64, app_id: &str) -> Entry {
        let notification = Notification {
            channel,
            capability_status: CapabilityStatus::Full,
            app_id: app_id.into(),
            ..codec::tests::full_notification(request_id)
        };
        Entry::Notification(NotificationEntry {
            time_ms,
            offset,
            body: codec::encode_body(&notification).into(),
            notification: Arc::new(notification),
        })
    }

    pub(super) fn query(request_id: &str, expected: &[Channel], time_ms: u64) -> Entry {
        Entry::Query {
            time_ms,
            query: QueryRecorded {
                request_id: request_id.into(),
                expected: Some(expected.to_vec()),
                asked_ms: 0,
                late: false,
            },
        }
    }

    pub(super) fn hub(retention_s: u64, max_requests: usize) -> Arc<Hub> {
        Arc::new(Hub::new(HubConfig {
            retention: Duration::from_secs(retention_s),
            max_requests,
        }))
    }

    fn offsets(hub: &Arc<Hub>, request_id: &str) -> Vec<u64> {
        let key = hub.keys.of(request_id);
        hub.shard(key)
            .records
            .get(&key)
            .map(|r| r.notifications.offsets())
            .unwrap_or_default()
    }

    /// The log's clock runs on from its latest reading, and from its latest event when later: a stream whose
    /// entries run ahead of Redis's clock times them all at its last one until Redis's clock catches up, and a
    /// result timed then must age meanwhile (judged younger, it would be served past a caller's max_age).
    #[tokio::test(start_paused = true)]
    async fn the_logs_clock_runs_on_from_its_latest_event_ahead_of_its_reading() {
        let hub = hub(600, 10);
        assert_eq!(hub.log_now_ms(), None, "not read yet");
        hub.read_clock(1_000_000);
        hub.apply(&notification("r", Channel::Sms, 1, 1_500_000));
        tokio::time::advance(Duration::from_secs(30)).await;
        hub.read_clock(1_000_100);
        hub.apply(&notification("r", Channel::Rcs, 2, 1_500_000));
        assert_eq!(hub.log_now_ms(), Some(1_530_000));
    }

    #[test]
    fn offsets_are_the_logs_and_entries_seen_again_are_dropped() {
        let hub = hub(600, 10);
        hub.apply(&notification("r", Channel::Sms, 1, 1_000));
        hub.apply(&notification("r", Channel::Rcs, 2, 1_001));
        hub.apply(&notification("r", Channel::Rcs, 2, 1_002));
        hub.apply(&notification("late-start", Channel::Sms, 7, 1_003));
        assert_eq!(offsets(&hub, "r"), [1, 2]);
        assert_eq!(
            offsets(&hub, "late-start"),
            [7],
            "a replica that started late holds the log's offsets"
        );
        assert_eq!(hub.len(), 2);
    }

    #[test]
    fn what_a_request_answered_before_a_time_is_told() {
        let hub = hub(600, 10);
        hub.apply(&query("r", &[Channel::Sms, Channel::Rcs], 500));
        assert_eq!(hub.answered_before("r", u64::MAX, |_| true), Some(false), "nothing yet");
        hub.apply(&notification("r", Channel::Sms, 1, 1_000));
        // From another app than the record's first: kept with its own source, decoded the same.
        hub.apply(&from_app("r", Channel::Rcs, 2, 2_000, "OTHER"));
        let answered = |channel: Channel, before_ms: u64| hub.answered_before("r", before_ms, |n| n.channel == channel);
        assert_eq!(answered(Channel::Sms, 1_001), Some(true));
        assert_eq!(answered(Channel::Sms, 1_000), Some(false));
        assert_eq!(answered(Channel::Rcs, 2_001), Some(true));
        assert_eq!(answered(Channel::Whatsapp, u64::MAX), Some(false));
        assert_eq!(hub.answered_before("unknown", u64::MAX, |_| true), None);
        let _watch = hub.watch("shell", 0, WatchLimits::for_tests());
        assert_eq!(
            hub.answered_before("shell", u64::MAX, |_| true),
            None,
            "a watch's shell is no record"
        );
    }

    #[test]
    fn each_notification_expires_by_its_own_time_in_the_log_watched_or_not() {
        let hub = hub(60, 10);
        hub.apply(&notification("r", Channel::Sms, 1, 0));
        hub.apply(&notification("r", Channel::Rcs, 2, 30_000));
        let watch = hub.watch("r", 0, WatchLimits::for_tests());
        hub.advance(59_999);
        assert_eq!(hub.purge(), 0);
        assert_eq!(offsets(&hub, "r"), [1, 2]);
        hub.advance(60_000);
        hub.purge();
        assert_eq!(
            offsets(&hub, "r"),
            [2],
            "the first went at its own time, although watched"
        );
        hub.advance(90_000);
        hub.purge();
        assert!(offsets(&hub, "r").is_empty());
        assert_eq!(hub.len(), 1, "a watched record stays, empty");
        drop(watch);
        assert_eq!(hub.purge(), 1);
        assert!(hub.is_empty());
        assert!(hub.order.lock().unwrap().is_empty());
    }

    #[test]
    fn a_record_busy_for_ever_still_lets_its_old_notifications_go() {
        let hub = hub(60, 10);
        for second in 0..600 {
            hub.apply(&notification("busy", Channel::Sms, second + 1, second * 1_000));
            hub.purge();
        }
        assert_eq!(offsets(&hub, "busy").len(), 60, "one retention's worth, not ten");
    }

    #[test]
    fn past_the_cap_the_request_the_log_created_first_goes_first() {
        let hub = hub(600, 2);
        hub.apply(&notification("first", Channel::Sms, 1, 1));
        hub.apply(&notification("second", Channel::Sms, 1, 2));
        hub.apply(&notification("first", Channel::Rcs, 2, 3));
        hub.apply(&notification("third", Channel::Sms, 1, 4));
        assert_eq!(hub.len(), 2);
        assert!(offsets(&hub, "first").is_empty(), "activity does not change age");
        assert_eq!(offsets(&hub, "second"), [1]);
    }

    #[test]
    fn watches_of_unknown_requests_never_push_real_results_out() {
        let hub = hub(600, 2);
        hub.apply(&notification("real-1", Channel::Sms, 1, 1));
        hub.apply(&notification("real-2", Channel::Sms, 1, 2));
        let watches: Vec<Watch> = (0..1_000)
            .map(|i| hub.watch(&format!("made-up-{i}"), 0, WatchLimits::for_tests()))
            .collect();
        assert_eq!(hub.len(), 2);
        assert_eq!(offsets(&hub, "real-1"), [1]);
        assert_eq!(offsets(&hub, "real-2"), [1]);
        drop(watches);
        let shells: usize = hub.shards.iter().map(|s| s.lock().unwrap().records.len()).sum();
        assert_eq!(shells, 2, "a shell goes with its last watch");
    }

    #[test]
    fn an_entry_after_the_whole_record_expired_starts_it_again() {
        let hub = hub(60, 10);
        hub.apply(&notification("r", Channel::Sms, 1, 0));
        hub.apply(&notification("r", Channel::Sms, 2, 10_000));
        hub.apply(&notification("r", Channel::Rcs, 1, 70_000));
        assert_eq!(
            offsets(&hub, "r"),
            [1],
            "the log numbered it 1 again, and so does the hub"
        );
    }

    /// Redis restarted empty: the log numbers a request's next notification from 1 again, while the hub still
    /// holds the request's earlier ones. Acknowledged, it must reach the watches: held after the last.
    #[tokio::test(start_paused = true)]
    async fn a_notification_numbered_again_after_the_log_lost_its_data_is_held_after_the_last() {
        use futures::StreamExt;
        let hub = hub(600, 10);
        hub.apply(&notification("r", Channel::Sms, 1, 1_000));
        let mut watch = std::pin::pin!(hub.watch("r", 1, WatchLimits::for_tests()));
        hub.apply(&notification("r", Channel::Rcs, 1, 20_000));
        assert_eq!(offsets(&hub, "r"), [1, 2]);
        let Some(WatchEvent::Notification { offset, body, .. }) = watch.next().await else {
            panic!("the watch got nothing");
        };
        let sent = codec::decode_body("r".into(), &body).unwrap();
        assert_eq!((offset, sent.channel), (2, Channel::Rcs));
    }

    /// Re-appended after a loss, a notification the hub holds stays one, whatever offset the log gives it again.
    #[test]
    fn a_notification_held_already_is_dropped_at_whatever_offset_it_comes_back() {
        let hub = hub(600, 10);
        hub.apply(&notification("r", Channel::Sms, 1, 1_000));
        hub.apply(&notification("r", Channel::Rcs, 2, 1_001));
        hub.apply(&notification("r", Channel::Rcs, 1, 20_000));
        hub.apply(&notification("r", Channel::Sms, 2, 20_001));
        hub.apply(&notification("r", Channel::Viber, 3, 20_002));
        assert_eq!(offsets(&hub, "r"), [1, 2, 3]);
    }

    /// Two replicas append their recent events again after a loss, the later offset first: both are held.
    #[test]
    fn notifications_appended_again_out_of_order_are_all_held() {
        let hub = hub(600, 10);
        hub.apply(&notification("r", Channel::Rcs, 2, 1_000));
        hub.apply(&notification("r", Channel::Sms, 1, 1_001));
        assert_eq!(offsets(&hub, "r"), [2, 3]);
    }

    /// Each app and project is kept once, not in every notification; what a watch reads is what Sinch sent.
    #[test]
    fn notifications_read_back_with_their_own_app_whatever_the_records_first() {
        let hub = hub(600, 10);
        hub.apply(&from_app("r", Channel::Sms, 1, 1, "APP-A"));
        hub.apply(&from_app("r", Channel::Rcs, 2, 2, "APP-B"));
        hub.apply(&from_app("r", Channel::Viber, 3, 3, "APP-A"));
        hub.apply(&from_app("other", Channel::Sms, 1, 4, "APP-A"));
        let key = hub.keys.of("r");
        let bodies: Vec<_> = {
            let shard = hub.shard(key);
            let record = &shard.records[&key];
            std::iter::successors(record.next_after(0), |(offset, _)| record.next_after(*offset)).collect()
        };
        let apps: Vec<(u64, String, String)> = bodies
            .iter()
            .map(|(offset, body)| {
                let n = codec::decode_body("r".into(), body).unwrap();
                (*offset, n.app_id, n.project_id)
            })
            .collect();
        let app = |offset: u64, app: &str| (offset, app.to_owned(), "PRJ".to_owned());
        assert_eq!(apps, [app(1, "APP-A"), app(2, "APP-B"), app(3, "APP-A")]);
        assert_eq!(hub.sources.lock().unwrap().len(), 1, "APP-A once for both records");
        drop(bodies);
        hub.advance(2_000_000);
        hub.purge();
        assert!(
            hub.sources.lock().unwrap().is_empty(),
            "a source goes with its last record"
        );
    }

    /// One watch on an old request keeps its record (and the front of the eviction order) alive: the order
    /// must still not grow with every request that comes and goes after it.
    #[test]
    fn a_watched_old_request_does_not_make_the_eviction_order_grow_for_ever() {
        let hub = hub(60, 100_000);
        hub.apply(&notification("old", Channel::Sms, 1, 0));
        let _watch = hub.watch("old", 0, WatchLimits::for_tests());
        for i in 0..10_000u64 {
            let time = 61_000 + i * 100;
            hub.apply(&notification(&format!("r{i}"), Channel::Sms, 1, time));
            if i % 100 == 0 {
                hub.advance(time);
                hub.purge();
            }
        }
        let order = hub.order.lock().unwrap().len();
        assert!(
            order <= 2 * hub.len() + ORDER_SLACK,
            "{order} order entries for {} live requests",
            hub.len()
        );
    }

    /// What every held request costs before its notifications: a regression here costs a million records.
    #[test]
    fn a_record_stays_within_128_bytes() {
        assert!(
            size_of::<Record>() <= 128,
            "a record takes {} bytes",
            size_of::<Record>()
        );
    }
}
