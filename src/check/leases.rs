//! Coalescing leases: a check that needs a live result for an identity (or a contact) takes its lease, naming its
//! request_id, for its wait — in this process, and in Redis when configured. A lease is *pending* until the query
//! is accepted by Sinch, then *sent*. A check that finds a sent lease waits for that request_id's results; one
//! that finds a pending lease waits for it to be sent or given back (then takes it itself). A lease is given
//! back when its query fails or was not sent, when its identity's result is in, and when the check that took it
//! returns; if that check's caller
//! goes away after the query was sent, the lease stays until the check's wait would have ended, or until an
//! invalidation of what it looks up (on any replica) forgets it. While pending, a
//! lease lasts until the caller's deadline, which bounds the sending, even for a check that does not wait; once
//! sent, it stays in Redis a moment ([`LINGER`]) after it is given back, for the checks that wait for it there.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::{sync::watch, time::Instant};

use crate::log::{EventLog, cached::EntryKey};

/// Where a lease stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum State {
    /// Taken; its query is not accepted yet.
    Pending,
    /// Its query went out under this request_id (this replica's or another's).
    Sent(Arc<str>),
    /// Given back after its query went out under this request_id: whoever waited since it was pending joins that
    /// query; a new check takes the lease.
    Done(Arc<str>),
    /// Given back before its query went out: whoever waited takes it.
    Gone,
}

/// A lease held in this process.
struct Flight {
    /// When it lapses while pending: the caller's deadline.
    deadline: Instant,
    /// When it lapses once sent: the end of the check's wait.
    until: Instant,
    state: watch::Sender<State>,
}

impl Flight {
    fn lapsed(&self, now: Instant) -> bool {
        match &*self.state.borrow() {
            State::Pending => self.deadline <= now,
            State::Sent(_) => self.until <= now,
            State::Done(_) | State::Gone => true,
        }
    }
}

/// This process's leases, by entry.
#[derive(Default)]
pub(super) struct Flights {
    held: Mutex<Held>,
}

#[derive(Default)]
struct Held {
    flights: HashMap<EntryKey, Arc<Flight>>,
    /// How many there were after the last sweep of lapsed ones: the next sweep comes at twice as many.
    swept: usize,
}

/// What a check does about one lease.
pub(super) enum Decided {
    /// It holds the lease: it sends the query.
    Started,
    /// It waits for the results of the query that went out under this request_id.
    Joined(Arc<str>),
    /// The caller's deadline came while another check held the lease, not sent.
    TimedOut,
}

/// What taking a lease found.
enum Taken {
    /// This check holds it: it sends the query.
    Started,
    /// Another check's query went out under this request_id: wait for its results.
    Sent(Arc<str>),
    /// Another check holds it and has not sent its query yet.
    Pending(Pending),
}

/// A lease another check holds, not sent yet.
enum Pending {
    Local(watch::Receiver<State>),
    Redis(EntryKey),
}

/// What became of a pending lease.
enum Resolved {
    Sent(Arc<str>),
    /// Given back, or lapsed: take it again.
    Retry,
    /// The check's time ran out first.
    TimedOut,
}

/// The longest pause between two looks at a lease another replica holds, not sent yet.
const POLL_MAX: Duration = Duration::from_millis(50);

/// How long a lease stays in Redis at least once sent, even when the check that took it returns at once (it does
/// not wait): longer than the pause between two looks, so that a check on another replica that found it pending
/// sees it sent and joins its query, rather than find it gone and ask Sinch again.
const LINGER: Duration = POLL_MAX.saturating_mul(2);

impl Flights {
    fn take(&self, key: EntryKey, deadline: Instant, until: Instant) -> Result<Arc<Flight>, watch::Receiver<State>> {
        let now = Instant::now();
        let mut held = self.held.lock().expect("flights lock poisoned");
        if let Some(flight) = held.flights.get(&key)
            && !flight.lapsed(now)
        {
            return Err(flight.state.subscribe());
        }
        let flight = Arc::new(Flight {
            deadline,
            until,
            state: watch::Sender::new(State::Pending),
        });
        held.flights.insert(key, flight.clone());
        if held.flights.len() > 2 * held.swept.max(512) {
            held.flights.retain(|_, f| !f.lapsed(now));
            held.swept = held.flights.len();
        }
        Ok(flight)
    }

    /// Whether this process holds the lease of `key`, pending or sent.
    fn holds(&self, key: &EntryKey) -> bool {
        let held = self.held.lock().expect("flights lock poisoned");
        held.flights
            .get(key)
            .is_some_and(|flight| !flight.lapsed(Instant::now()))
    }

    /// Forgets the lookups of `keys` (their cached results were invalidated): a later check asks Sinch rather
    /// than join one and be served what it got before. Their checks still hold them, and give back none but theirs.
    pub(super) fn forget(&self, keys: &[EntryKey]) {
        let mut held = self.held.lock().expect("flights lock poisoned");
        for key in keys {
            held.flights.remove(key);
        }
    }

    /// Forgets the lookup of `key` if it is the one sent under `request_id` (forgotten in Redis).
    fn forget_sent(&self, key: &EntryKey, request_id: &str) {
        let mut held = self.held.lock().expect("flights lock poisoned");
        if held
            .flights
            .get(key)
            .is_some_and(|f| matches!(&*f.state.borrow(), State::Sent(sent) if **sent == *request_id))
        {
            held.flights.remove(key);
        }
    }

    fn give_back(&self, key: &EntryKey, flight: &Arc<Flight>) {
        flight.state.send_modify(|state| {
            *state = match state {
                State::Sent(request_id) | State::Done(request_id) => State::Done(request_id.clone()),
                State::Pending | State::Gone => State::Gone,
            }
        });
        let mut held = self.held.lock().expect("flights lock poisoned");
        if held.flights.get(key).is_some_and(|f| Arc::ptr_eq(f, flight)) {
            held.flights.remove(key);
        }
    }
}

/// Whether a lookup of `key` is in flight — its lease held, pending or sent, by this process or, with Redis, by
/// another check on any replica (one left under `own`, the asking check's request_id, by a run before, is not) —
/// without taking it. A contact's entry fills while its lookup is in flight: it is not whole yet. Redis failing to
/// answer counts as no (the cache's own read says so in the log).
pub(super) async fn in_flight(flights: &Flights, redis: Option<&Arc<EventLog>>, key: &EntryKey, own: &str) -> bool {
    if flights.holds(key) {
        return true;
    }
    let Some(cache) = redis.and_then(|log| log.shared_cache()) else {
        return false;
    };
    match cache.holder(key).await {
        Ok(holder) => holder.is_some_and(|holder| holder.done().is_none() && !holder.is_ours(own)),
        Err(e) => {
            tracing::debug!(error = %e, "could not look whether a contact's lookup is in flight");
            false
        }
    }
}

/// Whether, and how, a lease is held in Redis too.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum InRedis {
    /// Only in this process.
    No,
    /// This check's call took it there.
    Taken,
    /// Found there pending under this check's own request_id (another call of it, or a run before that stopped):
    /// this check marks it sent if it sends it, and otherwise leaves it to its holder, whose value it cannot tell
    /// from its own.
    Adopted,
}

/// One lease this check holds.
struct Lease {
    key: EntryKey,
    flight: Arc<Flight>,
    in_redis: InRedis,
    sent: bool,
    /// Another replica's query, joined here: no task of this check's owns it.
    joined: bool,
}

/// The leases one check holds; see the module documentation for when each is given back.
pub(super) struct Leases<'a> {
    flights: &'a Flights,
    /// The Redis log, when leases are shared there.
    redis: Option<&'a Arc<EventLog>>,
    request_id: Arc<str>,
    /// The caller's deadline: a pending lease lasts until then.
    deadline: Instant,
    /// The end of the check's wait: a sent lease lasts until then.
    until: Instant,
    held: Vec<Lease>,
}

impl<'a> Leases<'a> {
    pub(super) fn new(
        flights: &'a Flights,
        redis: Option<&'a Arc<EventLog>>,
        request_id: Arc<str>,
        deadline: Instant,
        until: Instant,
    ) -> Leases<'a> {
        Leases {
            flights,
            redis,
            request_id,
            deadline,
            until,
            held: Vec::new(),
        }
    }

    /// [`Leases::decide`] for each of `keys` (tagged by the caller), in the order of the keys, as every check takes
    /// them: a check waits for a lease pending elsewhere holding only leases that come before it, so two checks
    /// never each wait for the other's. Once the deadline `by` came, the rest are not looked at.
    pub(super) async fn decide_in_order<T>(&mut self, mut keys: Vec<(T, EntryKey)>, by: Instant) -> Vec<(T, Decided)> {
        keys.sort_unstable_by_key(|(_, key)| *key);
        let mut decided = Vec::with_capacity(keys.len());
        for (tag, key) in keys {
            let decision = self.decide(key, by).await;
            let timed_out = matches!(decision, Decided::TimedOut);
            decided.push((tag, decision));
            if timed_out {
                break;
            }
        }
        decided
    }

    /// Takes the lease of `key`, or joins the query it was sent under; while another check holds it pending, waits
    /// (until `by`) for that query to be sent, or for the lease to be given back (then takes it).
    pub(super) async fn decide(&mut self, key: EntryKey, by: Instant) -> Decided {
        let mut taken = self.take(key).await;
        loop {
            let pending = match taken {
                Taken::Started => return Decided::Started,
                Taken::Sent(holder) => return Decided::Joined(holder),
                Taken::Pending(pending) => pending,
            };
            taken = match self.resolve(pending, by).await {
                Resolved::Sent(holder) => return Decided::Joined(holder),
                Resolved::Retry => self.take(key).await,
                Resolved::TimedOut => return Decided::TimedOut,
            };
        }
    }

    /// Takes the lease of `key`, or finds who holds it.
    async fn take(&mut self, key: EntryKey) -> Taken {
        let flight = loop {
            let state = match self.flights.take(key, self.deadline, self.until) {
                Ok(flight) => break flight,
                Err(state) => state,
            };
            let current = state.borrow().clone();
            match current {
                State::Sent(request_id) if self.forgotten_in_redis(&key, &request_id).await => {
                    self.flights.forget_sent(&key, &request_id);
                }
                State::Sent(request_id) => return Taken::Sent(request_id),
                _ => return Taken::Pending(Pending::Local(state)),
            }
        };
        let Some(cache) = self.redis.and_then(|log| log.shared_cache()) else {
            self.held.push(Lease {
                key,
                flight,
                in_redis: InRedis::No,
                sent: false,
                joined: false,
            });
            return Taken::Started;
        };
        let ttl = self.deadline.saturating_duration_since(Instant::now());
        // Held before Redis is asked: a check given up while it asks gives the lease back (here, and in Redis if
        // the script took it there) rather than leave a pending lookup nobody sends.
        self.held.push(Lease {
            key,
            flight: flight.clone(),
            in_redis: InRedis::Taken,
            sent: false,
            joined: false,
        });
        let taken = cache.lease(&key, &self.request_id, ttl).await;
        if !matches!(&taken, Ok(None)) {
            self.held.pop();
        }
        match taken {
            Ok(None) => Taken::Started,
            Ok(Some(holder)) if holder.sent().is_none() && holder.is_ours(&self.request_id) => {
                // Pending under this check's own request_id: a repeat's (or a run's before that stopped). This one
                // holds it too and asks under the same request_id, which sends nothing twice (that run gone, it
                // sends once the claim lapsed): whichever sends marks it sent; the other gives back only a lease
                // still pending.
                self.held.push(Lease {
                    key,
                    flight,
                    in_redis: InRedis::Adopted,
                    sent: false,
                    joined: false,
                });
                Taken::Started
            }
            Ok(Some(holder)) => match holder.sent() {
                Some(request_id) => {
                    // Another replica's query (or another call's of this request_id): this replica's checks join
                    // it here, without asking Redis, until this check returns (or, its caller gone, its wait ends),
                    // as with a query of its own.
                    let request_id: Arc<str> = request_id.into();
                    flight.state.send_replace(State::Sent(request_id.clone()));
                    self.held.push(Lease {
                        key,
                        flight,
                        in_redis: InRedis::No,
                        sent: true,
                        joined: true,
                    });
                    Taken::Sent(request_id)
                }
                None => {
                    // Another replica's, not sent yet: this replica's checks look at Redis too.
                    self.flights.give_back(&key, &flight);
                    Taken::Pending(Pending::Redis(key))
                }
            },
            Err(e) => {
                tracing::warn!(error = %e, "a lease could not be taken in Redis: this lookup is shared within this replica only");
                self.held.push(Lease {
                    key,
                    flight,
                    in_redis: InRedis::No,
                    sent: false,
                    joined: false,
                });
                Taken::Started
            }
        }
    }

    /// Whether the lookup sent under `request_id` that this process would join for `key` was forgotten in Redis
    /// (an invalidation on another replica deleted its lease, or another lookup took it since): its results may
    /// predate the invalidation. A Redis that does not answer forgets nothing.
    async fn forgotten_in_redis(&self, key: &EntryKey, request_id: &str) -> bool {
        let Some(cache) = self.redis.and_then(|log| log.shared_cache()) else {
            return false;
        };
        matches!(cache.holder(key).await, Ok(holder) if !holder.as_ref().is_some_and(|h| h.is_ours(request_id)))
    }

    /// Waits until a pending lease is sent or given back, at most until `by`: the caller's deadline, not its wait
    /// (learning which query to join is part of asking, as sending one's own query is, even for a check that does
    /// not wait for results).
    async fn resolve(&self, pending: Pending, by: Instant) -> Resolved {
        match pending {
            Pending::Local(mut state) => {
                let decided = tokio::time::timeout_at(by, state.wait_for(|s| *s != State::Pending)).await;
                match decided {
                    Err(_) => Resolved::TimedOut,
                    Ok(Err(_)) => Resolved::Retry,
                    Ok(Ok(state)) => match &*state {
                        State::Sent(request_id) | State::Done(request_id) => Resolved::Sent(request_id.clone()),
                        State::Pending | State::Gone => Resolved::Retry,
                    },
                }
            }
            Pending::Redis(key) => {
                let cache = self.redis.and_then(|log| log.shared_cache()).expect("a Redis lease");
                let mut pause = Duration::from_millis(5);
                loop {
                    if Instant::now() + pause >= by {
                        return Resolved::TimedOut;
                    }
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(POLL_MAX);
                    match cache.holder(&key).await {
                        Ok(None) => return Resolved::Retry,
                        Ok(Some(holder)) => {
                            if let Some(request_id) = holder.sent().or(holder.done()) {
                                return Resolved::Sent(request_id.into());
                            }
                        }
                        Err(e) => {
                            tracing::debug!(error = %e, "a lease in Redis could not be read");
                            return Resolved::Retry;
                        }
                    }
                }
            }
        }
    }

    /// The query of the leases of `keys` goes out: from now on they belong to it ([`InFlight`]), whatever
    /// becomes of this check's caller.
    pub(super) fn launch(&mut self, keys: &[EntryKey]) -> InFlight {
        let mut leases = Vec::new();
        // Not another replica's lookup joined here (a key asked again without its lease): it stays that one's.
        for lease in self.held.iter_mut().filter(|l| keys.contains(&l.key) && !l.joined) {
            lease.sent = true;
            leases.push((lease.key, lease.flight.clone(), lease.in_redis));
        }
        InFlight {
            leases,
            redis: self.redis.cloned(),
            request_id: self.request_id.clone(),
            until: self.until,
        }
    }

    /// Gives back the leases of `keys` now (not needed: the cache answered).
    pub(super) fn give_back(&mut self, keys: &[EntryKey]) {
        let (back, kept): (Vec<Lease>, Vec<Lease>) = self.held.drain(..).partition(|l| keys.contains(&l.key));
        self.held = kept;
        in_background(self.release(back));
    }

    /// The check returns (its results complete, or its wait over): every lease goes, in Redis too before it
    /// returns (so that no later check joins its finished lookup) unless that takes past `by`. In a task of its
    /// own: a caller that goes away meanwhile leaves no lease behind.
    pub(super) async fn finish(mut self, by: Instant) {
        let all = std::mem::take(&mut self.held);
        if let Some(release) = self.release(all) {
            let _ = tokio::time::timeout_at(by, tokio::spawn(release)).await;
        }
    }

    /// Gives `leases` back here; what gives them back in Redis, if any are held there.
    fn release(&self, leases: Vec<Lease>) -> Option<Release> {
        let mut shared = Vec::new();
        for lease in leases {
            // Sent under the request_id Sinch answered with, which may not be ours. Not sent by this check, a
            // lease it took goes only while still pending (another call of the same request_id may have sent it),
            // and one it adopted stays its holder's.
            let sent = match &*lease.flight.state.borrow() {
                State::Sent(accepted) | State::Done(accepted) => Some(accepted.clone()),
                State::Pending | State::Gone => None,
            };
            match (lease.in_redis, sent) {
                (InRedis::No, _) | (InRedis::Adopted, None) => {}
                (InRedis::Taken | InRedis::Adopted, Some(sent)) => shared.push((lease.key, sent)),
                (InRedis::Taken, None) => shared.push((lease.key, NOT_SENT.into())),
            }
            self.flights.give_back(&lease.key, &lease.flight);
        }
        release_shared(self.redis.cloned(), shared, self.request_id.clone())
    }
}

/// Leases whose query is going out, owned by the task that sends it.
pub(super) struct InFlight {
    leases: Vec<(EntryKey, Arc<Flight>, InRedis)>,
    redis: Option<Arc<EventLog>>,
    request_id: Arc<str>,
    until: Instant,
}

impl InFlight {
    /// The query was accepted under `accepted`: whoever waits joins it; the leases stay until the check that took
    /// them returns, or its wait would have ended.
    pub(super) async fn sent(self, accepted: &Arc<str>) {
        let ttl = self.until.saturating_duration_since(Instant::now()).max(LINGER);
        let cache = self.redis.as_ref().and_then(|log| log.shared_cache());
        for (key, flight, in_redis) in &self.leases {
            flight.state.send_replace(State::Sent(accepted.clone()));
            if *in_redis != InRedis::No
                && let Some(cache) = cache
                && let Err(e) = cache.lease_sent(key, &self.request_id, accepted, ttl).await
            {
                tracing::debug!(error = %e, "a lease in Redis could not be marked sent; others wait for it to lapse");
            }
        }
    }

    /// The query failed, or was not sent now: whoever waits takes the leases (in Redis, those this check took and
    /// still pending: a lease another call of the same request_id marked sent, or one adopted, stays its holder's).
    pub(super) fn give_back(self, flights: &Flights) {
        let mut shared = Vec::new();
        for (key, flight, in_redis) in &self.leases {
            flights.give_back(key, flight);
            if *in_redis == InRedis::Taken {
                shared.push((*key, NOT_SENT.into()));
            }
        }
        in_background(release_shared(self.redis, shared, self.request_id));
    }
}

/// What a lease given back was sent under when this check did not send it: no sent lease is named so, so only a
/// pending one goes.
const NOT_SENT: &str = "";

/// Giving leases back in Redis.
type Release = futures::future::BoxFuture<'static, ()>;

/// Gives leases back in Redis without waiting for it.
fn in_background(release: Option<Release>) {
    if let Some(release) = release {
        tokio::spawn(release);
    }
}

/// What gives back in Redis the leases `request_id` took of `keys`, each with the request_id it was sent under;
/// `None` when there are none.
fn release_shared(
    redis: Option<Arc<EventLog>>,
    keys: Vec<(EntryKey, Arc<str>)>,
    request_id: Arc<str>,
) -> Option<Release> {
    let log = redis.filter(|_| !keys.is_empty())?;
    Some(Box::pin(async move {
        let Some(cache) = log.shared_cache() else { return };
        // All at once: in a cluster each may live on another slot.
        let released = keys
            .iter()
            .map(|(key, sent)| cache.release(key, &request_id, sent, LINGER));
        for result in futures::future::join_all(released).await {
            if let Err(e) = result {
                tracing::debug!(error = %e, "a lease could not be given back; it lapses with the check's wait");
            }
        }
    }))
}

impl Drop for Leases<'_> {
    /// The caller went away (or the check failed): leases whose query never left go now, so that whoever waits
    /// asks Sinch itself, and so do those of another replica's query joined here; the others belong to their
    /// query's task, and stay joinable until this check's wait would have ended.
    fn drop(&mut self) {
        let (going, _launched): (Vec<Lease>, Vec<Lease>) = self.held.drain(..).partition(|l| !l.sent || l.joined);
        in_background(self.release(going));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: u8) -> EntryKey {
        [n; 16]
    }

    #[tokio::test]
    async fn a_lease_is_joined_once_sent_waited_for_while_pending_and_taken_again_when_given_back() {
        let flights = Flights::default();
        let until = Instant::now() + Duration::from_secs(10);
        let mut first = Leases::new(&flights, None, "first".into(), until, until);
        let mut second = Leases::new(&flights, None, "second".into(), until, until);
        assert!(matches!(first.take(key(1)).await, Taken::Started));
        let Taken::Pending(pending) = second.take(key(1)).await else {
            panic!("a lease not sent yet is pending")
        };
        let in_flight = first.launch(&[key(1)]);
        in_flight.sent(&"accepted".into()).await;
        assert!(matches!(second.resolve(pending, until).await, Resolved::Sent(id) if &*id == "accepted"));
        assert!(matches!(second.take(key(1)).await, Taken::Sent(id) if &*id == "accepted"));
        first.finish(until).await;
        assert!(
            matches!(second.take(key(1)).await, Taken::Started),
            "given back when its check returned"
        );
    }

    #[tokio::test]
    async fn a_failed_query_gives_its_leases_back_to_whoever_waits() {
        let flights = Flights::default();
        let until = Instant::now() + Duration::from_secs(10);
        let mut first = Leases::new(&flights, None, "first".into(), until, until);
        let second = Leases::new(&flights, None, "second".into(), until, until);
        first.take(key(2)).await;
        let mut waiter = Leases::new(&flights, None, "waiter".into(), until, until);
        let Taken::Pending(pending) = waiter.take(key(2)).await else {
            panic!("pending")
        };
        first.launch(&[key(2)]).give_back(&flights);
        assert!(matches!(second.resolve(pending, until).await, Resolved::Retry));
        assert!(matches!(waiter.take(key(2)).await, Taken::Started));
    }

    #[tokio::test(start_paused = true)]
    async fn a_caller_gone_before_sending_gives_back_after_sending_keeps_until_its_wait() {
        let flights = Flights::default();
        let until = Instant::now() + Duration::from_secs(10);
        {
            let mut gone = Leases::new(&flights, None, "gone".into(), until, until);
            gone.take(key(3)).await;
        }
        let mut next = Leases::new(&flights, None, "next".into(), until, until);
        assert!(
            matches!(next.take(key(3)).await, Taken::Started),
            "never sent: given back"
        );
        let in_flight = next.launch(&[key(3)]);
        drop(next);
        in_flight.sent(&"next".into()).await;
        let later_until = Instant::now() + Duration::from_secs(60);
        let mut later = Leases::new(&flights, None, "later".into(), later_until, later_until);
        assert!(
            matches!(later.take(key(3)).await, Taken::Sent(_)),
            "sent: joinable after its caller left"
        );
        tokio::time::advance(Duration::from_secs(11)).await;
        assert!(
            matches!(later.take(key(3)).await, Taken::Started),
            "lapsed with the wait"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_lease_not_sent_yet_lasts_until_the_callers_deadline_even_without_a_wait() {
        let flights = Flights::default();
        let now = Instant::now();
        let mut quick = Leases::new(&flights, None, "quick".into(), now + Duration::from_secs(10), now);
        assert!(matches!(quick.take(key(4)).await, Taken::Started));
        tokio::time::advance(Duration::from_secs(1)).await;
        let mut next = Leases::new(&flights, None, "next".into(), now + Duration::from_secs(30), now);
        assert!(
            matches!(next.take(key(4)).await, Taken::Pending(_)),
            "still being sent: joined, not asked again"
        );
        quick.launch(&[key(4)]).sent(&"quick".into()).await;
        drop(quick);
        assert!(
            matches!(next.take(key(4)).await, Taken::Started),
            "sent: lapsed with its (zero) wait"
        );
    }

    /// Y holds the lease of the first key, X needs both: X waits for the first holding nothing, so Y takes the
    /// second. (Taken in the order X names them, X held the second while it waited: each waited for the other.)
    #[tokio::test(start_paused = true)]
    async fn checks_needing_the_same_leases_never_wait_for_each_other() {
        let flights = Arc::new(Flights::default());
        let until = Instant::now() + Duration::from_secs(10);
        let mut y = Leases::new(&flights, None, "y".into(), until, until);
        assert!(matches!(y.decide(key(5), until).await, Decided::Started));
        let x = tokio::spawn({
            let flights = flights.clone();
            async move {
                let mut x = Leases::new(&flights, None, "x".into(), until, until);
                let decided = x.decide_in_order(vec![((), key(6)), ((), key(5))], until).await;
                decided
                    .into_iter()
                    .map(|(_, d)| matches!(d, Decided::Joined(_)))
                    .collect::<Vec<_>>()
            }
        });
        // X runs until it waits.
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        assert!(
            matches!(
                y.decide(key(6), Instant::now() + Duration::from_secs(1)).await,
                Decided::Started
            ),
            "X held the second lease while it waited for the first"
        );
        y.launch(&[key(5), key(6)]).sent(&"y".into()).await;
        assert_eq!(x.await.unwrap(), [true, true], "X joined Y's query for both");
    }
}
