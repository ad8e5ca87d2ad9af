//! The in-process log of a single replica: appends are numbered, deduplicated and capped under the lock of their
//! request's shard, and handed to every consumer before that lock is released, so consumers see each request's
//! entries in log order and an acknowledged callback is already visible to every watch. Callbacks of requests in
//! different shards do not wait for one another.

mod nonces;

use std::{
    collections::HashSet,
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use tokio_util::{sync::CancellationToken, task::TaskTracker};

use super::{
    Accepted, Consumer, Digest, Entry, KeyedHash, KeyedMap, Limits, Nonce, NotificationEntry, NotificationReceived,
    QueryRecorded, Unavailable, codec, wall_clock_ms,
};
use crate::capability::Notification;
use nonces::Nonces;

/// How often the consumers' clocks advance when nothing is appended.
const TICK: Duration = Duration::from_secs(1);

/// How many shards the requests' state is split into, each under its own lock.
const SHARDS: usize = 16;

/// See the module documentation.
pub struct LocalLog {
    /// The request-id hash (a request's state stores no copy of the string).
    keys: KeyedHash,
    /// The requests' state, by the hash's first half.
    shards: Box<[Mutex<State>]>,
    /// The log's time of the last entry, one clock for every shard: never goes back, even when the wall clock
    /// does.
    last_ms: AtomicU64,
    consumers: Vec<Arc<dyn Consumer>>,
    nonces: Nonces,
    retention_ms: u64,
    max_per_request: u64,
    /// Cancelled when the replica starts shutting down: its watches end, and what it holds dies with it.
    draining: CancellationToken,
    /// The log's clock; replaced in tests.
    clock: fn() -> u64,
}

#[derive(Default)]
struct State {
    /// What each request holds, by a keyed 128-bit hash of its request_id: its offsets and digests, until
    /// `retention` after its last event.
    requests: KeyedMap<RequestState>,
    /// When the shard's expired requests are next swept out.
    next_sweep_ms: u64,
}

#[derive(Default)]
struct RequestState {
    /// Notifications dropped because of the cap.
    capped: u32,
    /// The log time of its last event.
    last_ms: u64,
    /// The digests of its notifications: as many as its last offset.
    digests: Digests,
}

/// A request's digests: a slice exactly as long as needed while it holds a handful (nearly every request), a set
/// past [`FEW`] (so that many notifications for one request cost O(1) each, not a scan).
enum Digests {
    Few(Box<[Digest]>),
    #[expect(
        clippy::box_collection,
        reason = "a set is 48 bytes inline; boxed, every request's state stays small for the rare large one"
    )]
    Many(Box<HashSet<Digest>>),
}

/// The most digests kept as a slice.
const FEW: usize = 16;

impl Default for Digests {
    fn default() -> Digests {
        Digests::Few(Box::default())
    }
}

impl Digests {
    fn contains(&self, digest: Digest) -> bool {
        match self {
            Digests::Few(few) => few.contains(&digest),
            Digests::Many(many) => many.contains(&digest),
        }
    }

    fn len(&self) -> usize {
        match self {
            Digests::Few(few) => few.len(),
            Digests::Many(many) => many.len(),
        }
    }

    /// Adds a digest not yet held.
    fn insert(&mut self, digest: Digest) {
        *self = match std::mem::take(self) {
            Digests::Few(few) if few.len() < FEW => Digests::Few(few.iter().copied().chain([digest]).collect()),
            Digests::Few(few) => Digests::Many(Box::new(few.iter().copied().chain([digest]).collect())),
            Digests::Many(mut many) => {
                many.insert(digest);
                Digests::Many(many)
            }
        };
    }
}

impl LocalLog {
    pub fn new(limits: Limits, consumers: Vec<Arc<dyn Consumer>>, draining: CancellationToken) -> LocalLog {
        LocalLog {
            keys: KeyedHash::default(),
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            last_ms: AtomicU64::new(0),
            consumers,
            nonces: Nonces::default(),
            retention_ms: limits.retention.as_millis() as u64,
            max_per_request: limits.max_per_request,
            draining,
            clock: wall_clock_ms,
        }
    }

    /// Advances the consumers' clocks every [`TICK`] until `stop`.
    pub fn start(&self, tasks: &TaskTracker, stop: CancellationToken) {
        let consumers = self.consumers.clone();
        let clock = self.clock;
        tasks.spawn(async move {
            let mut tick = tokio::time::interval(TICK);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = tick.tick() => {
                        let now = clock();
                        consumers.iter().for_each(|c| c.read_clock(now));
                    }
                    () = stop.cancelled() => return,
                }
            }
        });
    }

    pub fn accept(
        &self,
        nonce: Option<Nonce<'_>>,
        notification: Option<NotificationReceived>,
    ) -> Result<Accepted, Unavailable> {
        // Nobody could receive it here any more and nothing outlives this process: let Sinch redeliver it to
        // the replica that replaces this one.
        if self.draining.is_cancelled() {
            return Err(Unavailable(
                "this replica is shutting down and keeps events in memory only".into(),
            ));
        }
        if nonce.is_some_and(|n| !self.nonces.claim(n.value, n.remember_for)) {
            return Ok(Accepted::Replayed);
        }
        let Some(received) = notification else {
            return Ok(Accepted::NothingToAppend);
        };
        // Encoded before the lock, which every callback of the shard's requests waits for.
        let body = codec::encode_body(&received.notification).into();
        let (mut state, key, now) = self.lock(&received.notification.request_id);
        let request = state.request(key, now, self.retention_ms);
        if request.digests.contains(received.digest) {
            // Not an event of the request's (the hub never sees it): its time stays its last append's, as in Redis.
            return Ok(Accepted::Duplicate);
        }
        request.last_ms = now;
        if request.digests.len() as u64 >= self.max_per_request {
            request.capped = request.capped.saturating_add(1);
            return Ok(Accepted::Capped {
                first: request.capped == 1,
            });
        }
        request.digests.insert(received.digest);
        let offset = request.digests.len() as u64;
        let entry = Entry::Notification(NotificationEntry {
            time_ms: now,
            offset,
            body,
            notification: Arc::new(Notification {
                received_time: codec::log_time(now),
                ..received.notification
            }),
        });
        self.consumers.iter().for_each(|c| c.apply(&entry));
        Ok(Accepted::Appended { offset })
    }

    pub fn record_query(&self, query: QueryRecorded) -> Result<(), Unavailable> {
        let (mut state, key, now) = self.lock(&query.request_id);
        state.request(key, now, self.retention_ms).last_ms = now;
        let entry = Entry::Query { time_ms: now, query };
        self.consumers.iter().for_each(|c| c.apply(&entry));
        Ok(())
    }

    /// Moves the log's clock to the wall clock's time (never back) and returns it.
    fn now(&self) -> u64 {
        let wall = (self.clock)();
        self.last_ms.fetch_max(wall, Ordering::Relaxed).max(wall)
    }

    /// Locks the shard that holds `request_id` and reads the log's clock under that lock (so a request's entries
    /// never go back in time), sweeping the shard: its state, the request's key, and the log's time.
    fn lock(&self, request_id: &str) -> (MutexGuard<'_, State>, [u64; 2], u64) {
        let key = self.keys.of(request_id);
        let mut state = self.shards[key[0] as usize % SHARDS].lock().expect("log lock poisoned");
        let now = self.now();
        state.sweep(now, self.retention_ms);
        (state, key, now)
    }
}

impl State {
    /// Forgets, about ten times per retention, the shard's requests whose last event is older than the
    /// retention at the log's time `now` (a sweep rather than an index: an index would cost more memory per
    /// request than the sweep costs time).
    fn sweep(&mut self, now: u64, retention_ms: u64) {
        if now >= self.next_sweep_ms {
            self.requests
                .retain(|_, r| r.last_ms.saturating_add(retention_ms) > now);
            self.next_sweep_ms = now + (retention_ms / 10).clamp(1_000, 60_000);
        }
    }

    /// The state of request `key` at `now`, created if new or expired (swept or not).
    fn request(&mut self, key: [u64; 2], now: u64, retention_ms: u64) -> &mut RequestState {
        let request = self.requests.entry(key).or_default();
        if request.last_ms.saturating_add(retention_ms) <= now {
            *request = RequestState::default();
        }
        request
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        capability::{CapabilityStatus, Channel},
        log::codec::tests::full_notification,
    };

    /// Records what it was fed.
    #[derive(Default)]
    struct Recorder(Mutex<Vec<(u64, String, u64)>>);

    impl Consumer for Recorder {
        fn apply(&self, entry: &Entry) {
            let seen = match entry {
                Entry::Query { query, .. } => (0, query.request_id.clone(), entry.time_ms()),
                Entry::Notification(n) => (n.offset, n.notification.request_id.clone(), n.time_ms),
            };
            self.0.lock().unwrap().push(seen);
        }
        fn advance(&self, _: u64) {}
    }

    static NOW: AtomicU64 = AtomicU64::new(1_000_000);
    const CAP: u64 = 64;

    fn log(consumer: Arc<Recorder>) -> LocalLog {
        LocalLog {
            clock: || NOW.load(Ordering::SeqCst),
            ..LocalLog::new(
                Limits {
                    retention: Duration::from_secs(60),
                    max_per_request: CAP,
                },
                vec![consumer],
                CancellationToken::new(),
            )
        }
    }

    fn received(request_id: &str, status: CapabilityStatus) -> Option<NotificationReceived> {
        let notification = crate::capability::Notification {
            capability_status: status,
            channel: Channel::Sms,
            ..full_notification(request_id)
        };
        Some(NotificationReceived {
            digest: Digest::of(&notification),
            notification,
        })
    }

    #[test]
    fn offsets_dedupe_the_cap_and_expiry_are_decided_at_append() {
        let recorder = Arc::new(Recorder::default());
        let log = log(recorder.clone());
        let full = || received("r", CapabilityStatus::Full);
        assert_eq!(log.accept(None, full()).unwrap(), Accepted::Appended { offset: 1 });
        assert_eq!(log.accept(None, full()).unwrap(), Accepted::Duplicate);
        assert_eq!(
            log.accept(None, received("r", CapabilityStatus::NoCapability)).unwrap(),
            Accepted::Appended { offset: 2 },
            "another outcome is news"
        );
        for status in 3..=CAP {
            let mut n = received("r", CapabilityStatus::Full).unwrap();
            n.notification.identity = status.to_string();
            n.digest = Digest::of(&n.notification);
            assert_eq!(
                log.accept(None, Some(n)).unwrap(),
                Accepted::Appended { offset: status }
            );
        }
        let mut over = received("r", CapabilityStatus::Full).unwrap();
        over.notification.identity = "over".into();
        over.digest = Digest::of(&over.notification);
        assert_eq!(
            log.accept(None, Some(over.clone())).unwrap(),
            Accepted::Capped { first: true }
        );
        assert_eq!(log.accept(None, Some(over)).unwrap(), Accepted::Capped { first: false });
        assert_eq!(recorder.0.lock().unwrap().len(), CAP as usize);

        NOW.fetch_add(60_000, Ordering::SeqCst);
        assert_eq!(
            log.accept(None, full()).unwrap(),
            Accepted::Appended { offset: 1 },
            "a request idle for the retention starts again"
        );
    }

    /// A duplicate is no event of its request's (the hub never sees one, and Redis's script does not refresh the
    /// request for one): the request is idle from its last append, and starts again a retention after it.
    #[test]
    fn a_duplicate_does_not_keep_its_request_alive() {
        static CLOCK: AtomicU64 = AtomicU64::new(1_000_000);
        let log = LocalLog {
            clock: || CLOCK.load(Ordering::SeqCst),
            ..log(Arc::new(Recorder::default()))
        };
        let sms = || received("r", CapabilityStatus::Full);
        assert_eq!(log.accept(None, sms()).unwrap(), Accepted::Appended { offset: 1 });
        CLOCK.fetch_add(40_000, Ordering::SeqCst);
        assert_eq!(log.accept(None, sms()).unwrap(), Accepted::Duplicate);
        CLOCK.fetch_add(30_000, Ordering::SeqCst);
        assert_eq!(
            log.accept(None, received("r", CapabilityStatus::NoCapability)).unwrap(),
            Accepted::Appended { offset: 1 },
            "idle for the retention since its last append"
        );
    }

    /// The log's time is one clock for every request, whatever shard holds it: after the wall clock steps back, a
    /// later entry of any request is not older than an earlier one (the cache keeps the newer result by it).
    #[test]
    fn the_log_time_never_goes_back_across_requests() {
        static STEPPED: AtomicU64 = AtomicU64::new(5_000_000);
        let recorder = Arc::new(Recorder::default());
        let log = LocalLog {
            clock: || STEPPED.load(Ordering::SeqCst),
            ..log(recorder.clone())
        };
        log.accept(None, received("first", CapabilityStatus::Full)).unwrap();
        STEPPED.store(4_990_000, Ordering::SeqCst);
        for i in 0..64 {
            log.accept(None, received(&format!("later-{i}"), CapabilityStatus::Full))
                .unwrap();
        }
        let times: Vec<u64> = recorder
            .0
            .lock()
            .unwrap()
            .iter()
            .map(|(_, _, time_ms)| *time_ms)
            .collect();
        assert!(times.iter().all(|&t| t == 5_000_000), "{times:?}");
    }

    /// Callbacks of many requests handed on at once from several threads (the webhook's workers): each request's
    /// entries reach the consumers in offset order, none lost or doubled, whichever shard holds it.
    #[test]
    fn entries_handed_on_at_once_reach_the_consumers_in_each_requests_order() {
        let recorder = Arc::new(Recorder::default());
        let log = LocalLog {
            clock: || 1_000_000,
            ..log(recorder.clone())
        };
        let (threads, per_thread, requests) = (8, 112, 16);
        std::thread::scope(|scope| {
            for t in 0..threads {
                let log = &log;
                scope.spawn(move || {
                    for i in 0..per_thread {
                        let mut n = received(&format!("r{}", i % requests), CapabilityStatus::Full).unwrap();
                        n.notification.identity = format!("{t}-{i}");
                        n.digest = Digest::of(&n.notification);
                        log.accept(None, Some(n)).unwrap();
                    }
                });
            }
        });
        let seen = recorder.0.lock().unwrap();
        for r in 0..requests {
            let offsets: Vec<u64> = seen
                .iter()
                .filter(|(_, request_id, _)| *request_id == format!("r{r}"))
                .map(|(offset, _, _)| *offset)
                .collect();
            let expected: Vec<u64> = (1..=(threads * per_thread / requests) as u64).collect();
            assert_eq!(offsets, expected, "r{r}");
        }
    }

    #[test]
    fn a_replica_shutting_down_refuses_to_take_callbacks() {
        let log = log(Arc::new(Recorder::default()));
        log.draining.cancel();
        assert!(log.accept(None, received("r", CapabilityStatus::Full)).is_err());
    }

    /// Past a handful, a request's digests become a set: duplicates are still found, offsets still count on.
    #[test]
    fn many_notifications_for_one_request_are_numbered_and_deduplicated_alike() {
        // A clock of its own: the other test moves the shared one past the retention.
        let log = LocalLog {
            clock: || 1_000_000,
            ..log(Arc::new(Recorder::default()))
        };
        let nth = |i: u64| {
            let mut n = received("many", CapabilityStatus::Full).unwrap();
            n.notification.identity = i.to_string();
            n.digest = Digest::of(&n.notification);
            Some(n)
        };
        for i in 1..=CAP {
            assert_eq!(log.accept(None, nth(i)).unwrap(), Accepted::Appended { offset: i });
        }
        for i in [1, FEW as u64, FEW as u64 + 1, CAP] {
            assert_eq!(
                log.accept(None, nth(i)).unwrap(),
                Accepted::Duplicate,
                "the {i}th again"
            );
        }
    }
}
