//! CheckCapability's and InvalidateCapability's behaviour apart from transport: answers from the cache, asks
//! Sinch only about what is not fresh, shares identical lookups in flight, waits for live results on the hub.
//!
//! - **Cache** ([`local`] in process; [`crate::log::redis::cache`] with Redis): filled from every appended
//!   result, whoever asked; an entry per (app, channel, identity), and per (app, contact) for results that name a
//!   contact.
//! - **Coalescing**: a check that needs a live result for an identity (or a contact) takes its lease — in this
//!   process, and in Redis when configured — naming its request_id, for its wait. A check that finds a lease
//!   held joins that request_id instead of asking Sinch. Leases go when the check that took them returns.
//! - **Waiting**: on the hub, by request_id, as WatchCapability does: results that arrived before the check
//!   looked are replayed.

pub mod local;

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use futures::StreamExt;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::{
    capability::{CapabilityStatus, Channel, ChannelIdentity, ChannelOrder, Recipient, mask_digits},
    hub::{Hub, WatchEvent, WatchLimits},
    log::{
        EventLog,
        cached::{CachedResult, EntryKey, KeyHasher},
        codec, wall_clock_ms,
    },
    query::{Queries, QueryError, QueryRequest},
    telemetry::TraceParent,
};
use local::{Cached, LocalCache};

/// A validated CheckCapability.
#[derive(Debug, Clone)]
pub struct CheckRequest {
    pub app_id: String,
    pub recipient: Recipient,
    /// The oldest cached result accepted; zero asks Sinch.
    pub max_age: Duration,
    /// How long to wait for live results.
    pub wait: Duration,
    /// The recommendation's order; `None`: the server's.
    pub preference: Option<ChannelOrder>,
    /// The live query's request_id, when the caller chose one.
    pub request_id: Option<String>,
}

/// Where a result came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Cache,
    /// The live query this check sent.
    Live,
    /// A live query another check sent.
    Shared,
}

/// One result of a check.
#[derive(Debug, Clone)]
pub struct CheckResult {
    pub source: Source,
    pub offset: u64,
    pub request_id: String,
    /// The contract's `CapabilityNotification` without `offset` and `request_id`.
    pub body: Vec<u8>,
    pub checked_at: SystemTime,
    pub channel: Channel,
    pub identity: String,
    pub status: CapabilityStatus,
}

/// The answer of a check.
#[derive(Debug, Clone, Default)]
pub struct CheckAnswer {
    pub results: Vec<CheckResult>,
    pub complete: bool,
    pub pending: Vec<ChannelIdentity>,
    pub recommended: Vec<ChannelIdentity>,
    /// The live query's request_id; empty when every result came from the cache.
    pub request_id: String,
    /// Whether this check sent a query to Sinch.
    asked: bool,
}

/// Why a check failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CheckError {
    #[error(transparent)]
    Query(#[from] QueryError),
    /// The shared cache could not be reached.
    #[error("the shared cache is unavailable: {0}")]
    Unavailable(String),
}

/// How checks behave.
#[derive(Debug, Clone)]
pub struct CheckSettings {
    /// A contact_id check returns this long after its last result.
    pub settle: Duration,
    pub preference: ChannelOrder,
    /// Cancelled when the server shuts down: waiting checks answer with what they have.
    pub shutdown: CancellationToken,
}

/// Where cached results live.
enum Store {
    Local(Arc<LocalCache>),
    Redis(Arc<EventLog>),
}

/// Answers checks; shared by every call.
pub struct Checker {
    store: Store,
    queries: Arc<Queries>,
    hub: Arc<Hub>,
    flights: Flights,
    settings: CheckSettings,
}

/// The leases this replica holds, by entry: the request_id in flight and until when it may be joined.
#[derive(Default)]
struct Flights {
    held: Mutex<HashMap<EntryKey, (Arc<str>, Instant)>>,
}

enum Flight {
    /// This check took the lease: it asks Sinch.
    Started,
    /// Another check's query is in flight under this request_id.
    Joined(Arc<str>),
}

impl Flights {
    fn take(&self, key: EntryKey, request_id: &Arc<str>, until: Instant) -> Flight {
        let now = Instant::now();
        let mut held = self.held.lock().expect("flights lock poisoned");
        if let Some((holder, until)) = held.get(&key)
            && *until > now
        {
            return Flight::Joined(holder.clone());
        }
        held.insert(key, (request_id.clone(), until));
        Flight::Started
    }

    fn release(&self, keys: &[EntryKey], request_id: &str) {
        let mut held = self.held.lock().expect("flights lock poisoned");
        for key in keys {
            if held.get(key).is_some_and(|(holder, _)| &**holder == request_id) {
                held.remove(key);
            }
        }
    }
}

/// The leases one check took; given back when it returns, or when its caller goes away.
struct Leases<'a> {
    checker: &'a Checker,
    request_id: Arc<str>,
    /// Taken in this process (and, with Redis, there too).
    local: Vec<EntryKey>,
    /// Taken in Redis.
    shared: Vec<EntryKey>,
}

impl Drop for Leases<'_> {
    fn drop(&mut self) {
        self.checker.flights.release(&self.local, &self.request_id);
        if self.shared.is_empty() {
            return;
        }
        if let Store::Redis(log) = &self.checker.store {
            let (log, keys, request_id) = (log.clone(), std::mem::take(&mut self.shared), self.request_id.clone());
            tokio::spawn(async move {
                let Some(cache) = log.shared_cache() else { return };
                for key in keys {
                    if let Err(e) = cache.release(&key, &request_id).await {
                        tracing::debug!(error = %e, "a lease could not be given back; it expires with the check's wait");
                    }
                }
            });
        }
    }
}

/// What one check waits for: by request_id, the positions of the results it expects from it.
type Waiting = HashMap<Arc<str>, Vec<usize>>;

impl Checker {
    /// With an in-process log the cache is `local` (fed by the log); with Redis it is the log's.
    pub fn new(
        log: Arc<EventLog>,
        local: Arc<LocalCache>,
        queries: Arc<Queries>,
        hub: Arc<Hub>,
        settings: CheckSettings,
    ) -> Checker {
        let store = match log.shared_cache() {
            Some(_) => Store::Redis(log),
            None => Store::Local(local),
        };
        Checker {
            store,
            queries,
            hub,
            flights: Flights::default(),
            settings,
        }
    }

    async fn hasher(&self) -> Result<KeyHasher, CheckError> {
        match &self.store {
            Store::Local(local) => Ok(local.hasher().clone()),
            Store::Redis(log) => {
                let cache = log.shared_cache().expect("a Redis store");
                cache
                    .hasher()
                    .await
                    .cloned()
                    .map_err(|e| CheckError::Unavailable(e.to_string()))
            }
        }
    }

    /// The cached results of identity entries `keys`; a cache that cannot be read is a miss.
    async fn cached(&self, keys: &[EntryKey]) -> Vec<Option<CachedResult>> {
        match &self.store {
            Store::Local(local) => keys
                .iter()
                .map(|key| match local.get(key).as_deref() {
                    Some(Cached::One(result)) => Some(result.clone()),
                    _ => None,
                })
                .collect(),
            Store::Redis(log) => {
                let cache = log.shared_cache().expect("a Redis store");
                cache.get(keys).await.unwrap_or_else(|e| {
                    tracing::warn!(error = %e, "the shared cache could not be read: asking Sinch");
                    vec![None; keys.len()]
                })
            }
        }
    }

    async fn cached_contact(&self, key: &EntryKey) -> Vec<CachedResult> {
        match &self.store {
            Store::Local(local) => match local.get(key).as_deref() {
                Some(Cached::Contact(results)) => results.iter().map(|(_, r)| r.clone()).collect(),
                _ => Vec::new(),
            },
            Store::Redis(log) => {
                let cache = log.shared_cache().expect("a Redis store");
                cache.get_contact(key).await.unwrap_or_else(|e| {
                    tracing::warn!(error = %e, "the shared cache could not be read: asking Sinch");
                    Vec::new()
                })
            }
        }
    }

    /// Takes the lease of `key` for this check, or finds the request_id that holds it.
    async fn lease(&self, key: EntryKey, leases: &mut Leases<'_>, until: Instant) -> Flight {
        match self.flights.take(key, &leases.request_id, until) {
            Flight::Joined(holder) => return Flight::Joined(holder),
            Flight::Started => leases.local.push(key),
        }
        let Store::Redis(log) = &self.store else {
            return Flight::Started;
        };
        let cache = log.shared_cache().expect("a Redis store");
        let ttl = until.saturating_duration_since(Instant::now());
        match cache.lease(&key, &leases.request_id, ttl).await {
            Ok(holder) if *holder == *leases.request_id => {
                leases.shared.push(key);
                Flight::Started
            }
            Ok(holder) => {
                // Another replica's query: the checks of this one find it in Redis too.
                self.flights.release(&[key], &leases.request_id);
                leases.local.retain(|k| *k != key);
                Flight::Joined(holder.into())
            }
            Err(e) => {
                tracing::warn!(error = %e, "a lease could not be taken in Redis: this lookup is shared within this replica only");
                Flight::Started
            }
        }
    }

    /// Answers a check before `deadline` (the caller's).
    pub async fn check(
        &self,
        request: CheckRequest,
        deadline: Instant,
        trace: Option<&TraceParent>,
    ) -> Result<CheckAnswer, CheckError> {
        let until = deadline.min(Instant::now() + request.wait);
        let request_id: Arc<str> = match &request.request_id {
            Some(id) => id.as_str().into(),
            None => ulid::Ulid::new().to_string().into(),
        };
        let hasher = self.hasher().await?;
        let mut leases = Leases {
            checker: self,
            request_id: request_id.clone(),
            local: Vec::new(),
            shared: Vec::new(),
        };
        let preference = request.preference.as_ref().unwrap_or(&self.settings.preference);
        let mut answer = match &request.recipient {
            Recipient::IdentifiedBy(ids) => {
                self.check_identities(&request, ids, &hasher, &mut leases, deadline, until, trace)
                    .await?
            }
            Recipient::ContactId(contact) => {
                self.check_contact(&request, contact, &hasher, &mut leases, deadline, until, trace)
                    .await?
            }
        };
        drop(leases);
        answer.recommended = recommend(&answer.results, preference);
        let from_cache = answer.results.iter().filter(|r| r.source == Source::Cache).count();
        metrics::counter!("capability_cache_hits_total").increment(from_cache as u64);
        if !answer.asked {
            metrics::counter!("capability_live_queries_saved_total").increment(1);
        }
        Ok(answer)
    }

    #[allow(clippy::too_many_arguments)]
    async fn check_identities(
        &self,
        request: &CheckRequest,
        ids: &[ChannelIdentity],
        hasher: &KeyHasher,
        leases: &mut Leases<'_>,
        deadline: Instant,
        until: Instant,
        trace: Option<&TraceParent>,
    ) -> Result<CheckAnswer, CheckError> {
        let mut ids: Vec<ChannelIdentity> = ids.to_vec();
        let mut seen = std::collections::HashSet::new();
        ids.retain(|id| seen.insert((id.channel.clone(), id.identity.clone())));
        let keys: Vec<EntryKey> = ids
            .iter()
            .map(|id| hasher.identity(&request.app_id, &id.channel, &id.identity))
            .collect();
        let mut slots: Vec<Option<CheckResult>> = vec![None; ids.len()];
        if !request.max_age.is_zero() {
            let now = wall_clock_ms();
            for (slot, cached) in slots.iter_mut().zip(self.cached(&keys).await) {
                *slot = cached
                    .filter(|c| c.fresh(now, request.max_age))
                    .and_then(|c| answered(Source::Cache, c.offset, c.request_id.clone(), c.body));
            }
        }
        let missing = slots.iter().filter(|s| s.is_none()).count();
        metrics::counter!("capability_cache_misses_total").increment(missing as u64);
        let mut waiting = Waiting::new();
        let mut to_send = Vec::new();
        for i in (0..ids.len()).filter(|i| slots[*i].is_none()) {
            match self.lease(keys[i], leases, until).await {
                Flight::Started => to_send.push(i),
                Flight::Joined(holder) => {
                    metrics::counter!("capability_coalesced_total").increment(1);
                    waiting.entry(holder).or_default().push(i);
                }
            }
        }
        let mut live_id = String::new();
        if !to_send.is_empty() {
            let send = Recipient::IdentifiedBy(to_send.iter().map(|i| ids[*i].clone()).collect());
            let accepted = self.ask(request, &leases.request_id, send, deadline, trace).await?;
            live_id = accepted.clone();
            waiting
                .entry(accepted.into())
                .or_default()
                .extend(to_send.iter().copied());
        }
        let request_id = match live_id.is_empty() {
            false => live_id,
            true => waiting.keys().next().map(|id| id.to_string()).unwrap_or_default(),
        };
        let matches = |i: usize, n: &CheckResult| ids[i].channel == n.channel && ids[i].identity == n.identity;
        self.wait_for(&mut slots, waiting, &leases.request_id, until, matches)
            .await;
        let pending: Vec<ChannelIdentity> = ids
            .iter()
            .zip(&slots)
            .filter(|(_, slot)| slot.is_none())
            .map(|(id, _)| id.clone())
            .collect();
        Ok(CheckAnswer {
            complete: pending.is_empty(),
            pending,
            results: slots.into_iter().flatten().collect(),
            request_id,
            recommended: Vec::new(),
            asked: !to_send.is_empty(),
        })
    }

    #[allow(clippy::too_many_arguments)]
    async fn check_contact(
        &self,
        request: &CheckRequest,
        contact: &str,
        hasher: &KeyHasher,
        leases: &mut Leases<'_>,
        deadline: Instant,
        until: Instant,
        trace: Option<&TraceParent>,
    ) -> Result<CheckAnswer, CheckError> {
        let key = hasher.contact(&request.app_id, contact);
        // The lease first: a contact's entry fills while its query is in flight, and is whole only after.
        let (holder, asked) = match self.lease(key, leases, until).await {
            Flight::Joined(holder) => {
                metrics::counter!("capability_coalesced_total").increment(1);
                (holder, false)
            }
            Flight::Started => {
                if !request.max_age.is_zero() {
                    let now = wall_clock_ms();
                    let cached: Vec<CachedResult> = self
                        .cached_contact(&key)
                        .await
                        .into_iter()
                        .filter(|c| c.expires_at_ms > now)
                        .collect();
                    if !cached.is_empty() && cached.iter().all(|c| c.fresh(now, request.max_age)) {
                        let results = cached
                            .into_iter()
                            .filter_map(|c| answered(Source::Cache, c.offset, c.request_id, c.body))
                            .collect();
                        return Ok(CheckAnswer {
                            results,
                            ..CheckAnswer::default()
                        });
                    }
                }
                metrics::counter!("capability_cache_misses_total").increment(1);
                let send = Recipient::ContactId(contact.to_owned());
                let accepted = self.ask(request, &leases.request_id, send, deadline, trace).await?;
                (accepted.into(), true)
            }
        };
        let mut results = Vec::new();
        self.wait_contact(&mut results, &holder, &leases.request_id, until)
            .await;
        Ok(CheckAnswer {
            results,
            request_id: holder.to_string(),
            asked,
            ..CheckAnswer::default()
        })
    }

    /// Sends the live query for `send` (part of the request's recipient) under `request_id`.
    async fn ask(
        &self,
        request: &CheckRequest,
        request_id: &str,
        send: Recipient,
        deadline: Instant,
        trace: Option<&TraceParent>,
    ) -> Result<String, CheckError> {
        let query = QueryRequest {
            app_id: request.app_id.clone(),
            recipient: request.recipient.clone(),
            request_id: Some(request_id.to_owned()),
        };
        let accepted = self.queries.query_part(query, send, deadline, trace).await?;
        tracing::debug!(request_id = %mask_digits(&accepted.request_id), "live query sent for a check");
        Ok(accepted.request_id)
    }

    /// Fills `slots` from the hub's notifications of the request_ids in `waiting`, until every awaited slot is
    /// filled, every request completed, or `until`.
    async fn wait_for(
        &self,
        slots: &mut [Option<CheckResult>],
        waiting: Waiting,
        own: &str,
        until: Instant,
        matches: impl Fn(usize, &CheckResult) -> bool,
    ) {
        if waiting.is_empty() {
            return;
        }
        let mut awaited = waiting.values().map(Vec::len).sum::<usize>();
        let mut events = futures::stream::select_all(waiting.into_iter().map(|(request_id, positions)| {
            let watch = self.hub.watch(&request_id, 0, self.limits(until));
            Box::pin(futures::stream::unfold(watch, |mut watch| async move {
                let event = watch.next().await?;
                Some((event, watch))
            }))
            .map(move |event| (request_id.clone(), positions.clone(), event))
        }));
        while awaited > 0 {
            let Ok(Some((request_id, positions, event))) = tokio::time::timeout_at(until, events.next()).await else {
                return;
            };
            let WatchEvent::Notification { offset, body, .. } = event else {
                continue;
            };
            let source = if *request_id == *own {
                Source::Live
            } else {
                Source::Shared
            };
            let Some(result) = answered(source, offset, request_id.to_string(), body) else {
                continue;
            };
            if let Some(&i) = positions.iter().find(|&&i| slots[i].is_none() && matches(i, &result)) {
                slots[i] = Some(result);
                awaited -= 1;
            }
        }
    }

    /// Collects a contact query's results until `until`, or a settle after the last one.
    async fn wait_contact(&self, results: &mut Vec<CheckResult>, request_id: &Arc<str>, own: &str, until: Instant) {
        let mut watch = self.hub.watch(request_id, 0, self.limits(until));
        let source = if **request_id == *own {
            Source::Live
        } else {
            Source::Shared
        };
        let mut quiet_until = until;
        loop {
            let Ok(Some(event)) = tokio::time::timeout_at(quiet_until, watch.next()).await else {
                return;
            };
            let WatchEvent::Notification { offset, body, .. } = event else {
                continue;
            };
            let Some(result) = answered(source, offset, request_id.to_string(), body) else {
                continue;
            };
            match results
                .iter_mut()
                .find(|r| r.channel == result.channel && r.identity == result.identity)
            {
                Some(held) => *held = result,
                None => results.push(result),
            }
            quiet_until = until.min(Instant::now() + self.settings.settle);
        }
    }

    fn limits(&self, until: Instant) -> WatchLimits {
        let wait = until.saturating_duration_since(Instant::now());
        WatchLimits {
            wait,
            // No heartbeats: nobody reads them.
            heartbeat: wait + Duration::from_secs(1),
            shutdown: self.settings.shutdown.clone(),
        }
    }

    /// Removes a recipient's cached results on every replica; returns how many entries went.
    pub async fn invalidate(&self, app_id: &str, recipient: &Recipient) -> Result<u64, CheckError> {
        let hasher = self.hasher().await?;
        let (keys, contact): (Vec<EntryKey>, Option<EntryKey>) = match recipient {
            Recipient::IdentifiedBy(ids) => (
                ids.iter()
                    .map(|id| hasher.identity(app_id, &id.channel, &id.identity))
                    .collect(),
                None,
            ),
            Recipient::ContactId(contact) => (Vec::new(), Some(hasher.contact(app_id, contact))),
        };
        match &self.store {
            Store::Local(local) => Ok(local.remove(&keys, contact.as_ref())),
            Store::Redis(log) => log
                .shared_cache()
                .expect("a Redis store")
                .remove(&keys, contact.as_ref())
                .await
                .map_err(|e| CheckError::Unavailable(e.to_string())),
        }
    }
}

/// A result from `body` (a hub's or the cache's encoding, receive time included); `None` if it does not decode.
fn answered(source: Source, offset: u64, request_id: String, body: Vec<u8>) -> Option<CheckResult> {
    let n = codec::decode_body(String::new(), &body).ok()?;
    Some(CheckResult {
        source,
        offset,
        request_id,
        checked_at: n.received_time,
        channel: n.channel,
        identity: n.identity,
        status: n.capability_status,
        body,
    })
}

/// The reachable identities among `results`, best first: FULL before PARTIAL, then by `preference`, then in the
/// order of the results.
pub fn recommend(results: &[CheckResult], preference: &ChannelOrder) -> Vec<ChannelIdentity> {
    let mut reachable: Vec<(u8, _, usize, &CheckResult)> = results
        .iter()
        .enumerate()
        .filter_map(|(at, r)| {
            let group = match r.status {
                CapabilityStatus::Full => 0,
                CapabilityStatus::Partial => 1,
                _ => return None,
            };
            Some((group, preference.rank(&r.channel), at, r))
        })
        .collect();
    reachable.sort_by(|a, b| (a.0, &a.1, a.2).cmp(&(b.0, &b.1, b.2)));
    reachable
        .into_iter()
        .map(|(.., r)| ChannelIdentity {
            channel: r.channel.clone(),
            identity: r.identity.clone(),
            app_id: String::new(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn result(channel: Channel, status: CapabilityStatus) -> CheckResult {
        CheckResult {
            source: Source::Cache,
            offset: 1,
            request_id: "r".into(),
            body: Vec::new(),
            checked_at: SystemTime::UNIX_EPOCH,
            channel,
            identity: "46700000001".into(),
            status,
        }
    }

    #[test]
    fn full_comes_before_partial_each_in_the_preferred_order_and_the_unreachable_never() {
        use CapabilityStatus::*;
        let results = [
            result(Channel::Sms, Full),
            result(Channel::Whatsapp, Partial),
            result(Channel::Rcs, NoCapability),
            result(Channel::Telegram, Full),
            result(Channel::Viberbm, Partial),
            result(Channel::Mms, Unknown),
            result(Channel::Rcs, Full),
        ];
        let order = ChannelOrder(vec![Channel::Rcs, Channel::Whatsapp, Channel::Sms]);
        let channels: Vec<Channel> = recommend(&results, &order).into_iter().map(|id| id.channel).collect();
        // Telegram and Viber BM are not listed: after the listed ones, in the contract's enum order.
        assert_eq!(
            channels,
            [
                Channel::Rcs,
                Channel::Sms,
                Channel::Telegram,
                Channel::Whatsapp,
                Channel::Viberbm
            ]
        );
    }

    #[test]
    fn a_lease_is_joinable_until_it_lapses_or_is_given_back() {
        let flights = Flights::default();
        let (mine, theirs): (Arc<str>, Arc<str>) = ("mine".into(), "theirs".into());
        let later = Instant::now() + Duration::from_secs(10);
        assert!(matches!(flights.take([1; 16], &mine, later), Flight::Started));
        assert!(matches!(flights.take([1; 16], &theirs, later), Flight::Joined(id) if *id == *"mine"));
        flights.release(&[[1; 16]], "theirs");
        assert!(
            matches!(flights.take([1; 16], &theirs, later), Flight::Joined(_)),
            "only the holder gives it back"
        );
        flights.release(&[[1; 16]], "mine");
        assert!(matches!(
            flights.take([1; 16], &theirs, Instant::now()),
            Flight::Started
        ));
        assert!(
            matches!(flights.take([1; 16], &mine, later), Flight::Started),
            "a lapsed lease is taken over"
        );
    }
}
