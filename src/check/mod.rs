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

pub mod bulk;
mod leases;
pub mod local;

use std::{
    collections::HashMap,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, SystemTime},
};

use futures::StreamExt;
use tokio::{
    sync::{OwnedSemaphorePermit, Semaphore},
    time::Instant,
};
use tokio_util::sync::CancellationToken;

use crate::{
    capability::{CapabilityStatus, Channel, ChannelIdentity, ChannelOrder, Notification, Recipient, mask_digits},
    hub::{Hub, WatchEvent, WatchLimits},
    log::{
        EventLog,
        cached::{CachedResult, ContactResults, EntryKey, KeyHasher},
        codec, wall_clock_ms,
    },
    query::{Queries, QueryError, QueryRequest},
    telemetry::TraceParent,
    upstream,
};
use leases::{Decided, Flights, InFlight, Leases};
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
    /// For each of `pending`, the request_id of the live query its result will come under.
    pub pending_lookups: Vec<(ChannelIdentity, Arc<str>)>,
    pub recommended: Vec<ChannelIdentity>,
    /// The live query's request_id; empty when every result came from the cache.
    pub request_id: String,
    /// Whether this check sent a query to Sinch.
    asked: bool,
}

/// What a contact's cache entry says to a check.
enum InCache {
    /// The contact's answer.
    Answer(CheckAnswer),
    /// The results of `lookup` of the contact are still coming (its latest came within the settle time); `cached`
    /// are the entry's fresh results meanwhile.
    Settling { lookup: Arc<str>, cached: Vec<CheckResult> },
    /// Nothing that answers the contact.
    Miss,
}

impl InCache {
    /// The entry's fresh results it holds, whether or not they answer the contact.
    fn results(self) -> Vec<CheckResult> {
        match self {
            InCache::Answer(answer) => answer.results,
            InCache::Settling { cached, .. } => cached,
            InCache::Miss => Vec::new(),
        }
    }
}

impl CheckAnswer {
    /// This answer with the `cached` results of identities it has none of, or an older one of.
    fn with_cached(mut self, cached: Vec<CheckResult>) -> CheckAnswer {
        for result in cached {
            let same = |r: &&mut CheckResult| r.channel == result.channel && r.identity == result.identity;
            match self.results.iter_mut().find(same) {
                Some(held) if held.checked_at < result.checked_at => *held = result,
                Some(_) => {}
                None => self.results.push(result),
            }
        }
        self
    }
}

/// Why a check failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CheckError {
    #[error(transparent)]
    Query(#[from] QueryError),
    /// The shared cache could not be reached.
    #[error("the shared cache is unavailable: {0}")]
    Unavailable(String),
    /// The check's gate refused to send its query (its bulk job was cancelled).
    #[error("cancelled")]
    Cancelled,
    /// This replica is shutting down and nothing more reaches its checks (it has no Redis).
    #[error("this replica is shutting down; retry the check (another replica answers)")]
    ShuttingDown,
    /// The caller's deadline came while another check's lookup of the same contact was still being sent: this
    /// one has neither results nor a lookup to name.
    #[error(
        "the deadline came while another check's lookup of this contact was still being sent to Sinch; retry: the retry joins it"
    )]
    NoLookupYet,
    /// Too many checks wait for live results on this replica.
    #[error("this replica has too many checks waiting for live results; retry shortly (another replica may answer)")]
    Overloaded,
}

/// What a gate decides for a live query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Proceed {
    /// Send it now.
    Send,
    /// It was sent before under this request_id (by a replica that stopped): wait for its results, do not send
    /// it again.
    Sent(Arc<str>),
}

impl Proceed {
    /// The request_id it went out under before, if it did.
    fn sent_before(self) -> Option<Arc<str>> {
        match self {
            Proceed::Send => None,
            Proceed::Sent(request_id) => Some(request_id),
        }
    }
}

/// Stands before a check's live query: a bulk job's pacing and record of what it sent.
pub trait Gate: Send + Sync {
    /// Waits the turn of a live query for `identities` channel identities; `Sent` at once when it went out before.
    fn turn(&self, identities: u32) -> futures::future::BoxFuture<'_, Result<Proceed, CheckError>>;
    /// Records that the query goes out now under `request_id`, once its turn came, the cache still lacked its
    /// answer and no lookup in flight could be joined for it; `Sent` when an earlier attempt sent it.
    fn sending<'a>(&'a self, request_id: &'a str) -> futures::future::BoxFuture<'a, Result<Proceed, CheckError>>;
}

/// How checks behave.
#[derive(Debug, Clone)]
pub struct CheckSettings {
    /// A contact_id check returns this long after its last result.
    pub settle: Duration,
    pub preference: ChannelOrder,
    /// The most checks waiting for live results at once on this replica.
    pub max_waiting: usize,
    /// How long a check may still wait once the replica begins to shut down (its shutdown grace, less a margin
    /// for the answer to leave).
    pub drain: Duration,
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
    /// Counts interactive checks' live queries in the app's callback budget.
    pacer: Arc<bulk::pacer::Pacer>,
    /// One permit per check waiting for live results: bounded work per replica, while cache hits need none.
    waiting: Arc<Semaphore>,
    /// Cancelled when the replica begins to shut down, at `drain_began`.
    draining: CancellationToken,
    drain_began: std::sync::OnceLock<Instant>,
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
        pacer: Arc<bulk::pacer::Pacer>,
        draining: CancellationToken,
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
            waiting: Arc::new(Semaphore::new(settings.max_waiting.min(Semaphore::MAX_PERMITS))),
            settings,
            pacer,
            draining,
            drain_began: std::sync::OnceLock::new(),
        }
    }

    /// Notes that the replica begins to shut down (before `draining` is cancelled): checks stop waiting a drain
    /// from now, whenever they began to wait.
    pub fn begin_drain(&self) {
        self.drain_began.get_or_init(Instant::now);
    }

    /// Ends when a check must stop waiting because the replica shuts down: its drain, after the shutdown began.
    async fn drained(&self) {
        self.draining.cancelled().await;
        let began = *self.drain_began.get_or_init(Instant::now);
        tokio::time::sleep_until(began + self.settings.drain).await;
    }

    fn redis(&self) -> Option<&Arc<EventLog>> {
        match &self.store {
            Store::Local(_) => None,
            Store::Redis(log) => Some(log),
        }
    }

    async fn hasher(&self) -> Result<KeyHasher, CheckError> {
        match &self.store {
            Store::Local(local) => Ok(local.hasher().clone()),
            Store::Redis(log) => {
                let cache = log.shared_cache().expect("a Redis store");
                cache.hasher().await.map_err(|e| CheckError::Unavailable(e.to_string()))
            }
        }
    }

    /// Now, for judging a result's age: the log's clock ([`Hub::log_now_ms`]; before the log's clock was read,
    /// the later of this replica's and the log's latest time). A result is timed by the log (with Redis, Redis's
    /// clock at its append): a log running ahead of this replica must not make results look younger than they
    /// are, nor one running behind make them look older.
    fn now_ms(&self) -> u64 {
        self.hub
            .log_now_ms()
            .unwrap_or_else(|| wall_clock_ms().max(self.hub.now_ms()))
    }

    /// The cached results of `keys` that may answer a check accepting results up to `max_age` old (none when
    /// `max_age` is zero: the check asks Sinch).
    async fn fresh(&self, keys: &[EntryKey], max_age: Duration) -> Vec<Option<CheckResult>> {
        if max_age.is_zero() {
            return vec![None; keys.len()];
        }
        let now = self.now_ms();
        self.cached(keys)
            .await
            .into_iter()
            .map(|cached| {
                cached
                    .filter(|c| c.fresh(now, max_age))
                    .and_then(|c| answered(Source::Cache, c.offset, c.request_id.clone(), c.body))
            })
            .collect()
    }

    /// Whether the lookup `holder` a check joins answered already, with a result older than `max_age` accepts,
    /// about what `about` picks: a lookup whose caller went away keeps its lease until its wait would have ended,
    /// and joining it would serve that result again, as SHARED. Read from the hub, which replays it to a check
    /// that joins (the cache may not hold it: a status not cached, an entry expired, or replaced by a newer
    /// one); from the `cached` results when the hub holds no record of the lookup (evicted, or not read from the
    /// log yet).
    async fn answered_too_long_ago(
        &self,
        holder: &str,
        max_age: Duration,
        about: impl Fn(&Notification) -> bool,
        cached: impl Future<Output = Vec<CachedResult>>,
    ) -> bool {
        let now = self.now_ms();
        let before_ms = match max_age.is_zero() {
            true => u64::MAX,
            false => now.saturating_sub(max_age.as_millis() as u64),
        };
        match self.hub.answered_before(holder, before_ms, about) {
            Some(answered) => answered,
            None => cached.await.iter().any(|c| c.stale_answer_of(holder, now, max_age)),
        }
    }

    /// Fills the empty `slots` at `at` whose entry (in `keys`) holds a fresh result now; returns those entries.
    async fn fill(
        &self,
        slots: &mut [Option<CheckResult>],
        keys: &[EntryKey],
        at: &[usize],
        max_age: Duration,
    ) -> Vec<EntryKey> {
        let looked: Vec<EntryKey> = at.iter().map(|i| keys[*i]).collect();
        let mut filled = Vec::new();
        for (&i, fresh) in at.iter().zip(self.fresh(&looked, max_age).await) {
            if fresh.is_some() {
                slots[i] = fresh;
                filled.push(keys[i]);
            }
        }
        filled
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

    /// A contact's cached results, none unless each identity's own entry still holds one, and for each the newer
    /// of the contact's copy and the identity's own: an invalidation of an identity empties its entry but may not
    /// find every contact entry that holds it (its latest result may name no contact, or another), and a result
    /// stored under the identity since is newer than the copy; and the latest lookup of the contact among them.
    async fn cached_contact(&self, key: &EntryKey) -> ContactResults {
        match &self.store {
            Store::Local(local) => match local.get(key).as_deref() {
                Some(Cached::Contact(entry)) => {
                    let results = entry
                        .results
                        .iter()
                        .map(|(identity, copy)| match local.get(identity).as_deref() {
                            Some(Cached::One(own)) => Some(copy.clone().or_newer(own.clone())),
                            _ => None,
                        })
                        .collect::<Option<Vec<_>>>()
                        .unwrap_or_default();
                    ContactResults {
                        results,
                        lookup: entry.lookup(),
                    }
                }
                _ => ContactResults::default(),
            },
            Store::Redis(log) => {
                let cache = log.shared_cache().expect("a Redis store");
                cache.get_contact(key).await.unwrap_or_else(|e| {
                    tracing::warn!(error = %e, "the shared cache could not be read: asking Sinch");
                    ContactResults::default()
                })
            }
        }
    }

    /// Notes that `request_id` is a lookup of contact `key` itself: the contact's entry answers the next checks
    /// once it holds one of its results. A Redis that fails to take the note costs a query to Sinch later.
    async fn contact_looked_up(&self, key: &EntryKey, request_id: &str) {
        match &self.store {
            Store::Local(local) => local.looked_up(key, request_id),
            Store::Redis(log) => {
                let cache = log.shared_cache().expect("a Redis store");
                if let Err(e) = cache.looked_up(key, request_id).await {
                    tracing::debug!(error = %e, "a lookup of a contact could not be noted in its cache entry");
                }
            }
        }
    }

    /// Answers a check before `deadline` (the caller's).
    pub async fn check(
        self: &Arc<Self>,
        request: CheckRequest,
        deadline: Instant,
        trace: Option<&TraceParent>,
    ) -> Result<CheckAnswer, CheckError> {
        self.check_gated(request, deadline, trace, None).await
    }

    /// [`Checker::check`], with `gate` deciding before the live query is sent.
    pub async fn check_gated(
        self: &Arc<Self>,
        request: CheckRequest,
        deadline: Instant,
        trace: Option<&TraceParent>,
        gate: Option<&dyn Gate>,
    ) -> Result<CheckAnswer, CheckError> {
        let until = deadline.min(Instant::now() + request.wait);
        let request_id: Arc<str> = match &request.request_id {
            Some(id) => id.as_str().into(),
            None => ulid::Ulid::new().to_string().into(),
        };
        let hasher = self.hasher().await?;
        let call = Call {
            request: &request,
            request_id,
            hasher: &hasher,
            start: Instant::now(),
            deadline,
            until,
            trace,
            gate,
        };
        let preference = request.preference.as_ref().unwrap_or(&self.settings.preference);
        let mut answer = match &request.recipient {
            Recipient::IdentifiedBy(ids) => self.check_identities(&call, ids).await?,
            Recipient::ContactId(contact) => self.check_contact(&call, contact).await?,
        };
        answer.recommended = recommend(&answer.results, preference);
        if let Recipient::IdentifiedBy(ids) = &request.recipient {
            // The identity as the caller named it, app included.
            for recommended in &mut answer.recommended {
                if let Some(id) = ids
                    .iter()
                    .find(|id| id.channel == recommended.channel && id.identity == recommended.identity)
                {
                    recommended.app_id.clone_from(&id.app_id);
                }
            }
        }
        let from_cache = answer.results.iter().filter(|r| r.source == Source::Cache).count();
        metrics::counter!("capability_cache_hits_total").increment(from_cache as u64);
        if !answer.asked {
            metrics::counter!("capability_live_queries_saved_total").increment(1);
        }
        Ok(answer)
    }

    /// A permit to wait for live results; RESOURCE_EXHAUSTED-worthy when this replica has too many waiting.
    /// Gated checks (bulk jobs) need none: a job bounds its own checks in flight.
    fn wait_permit(&self, call: &Call<'_>) -> Result<Option<OwnedSemaphorePermit>, CheckError> {
        // Without Redis a replica that is shutting down refuses callbacks: a live result could not reach it.
        if self.redis().is_none() && self.hub.is_closed() {
            return Err(CheckError::ShuttingDown);
        }
        if call.gate.is_some() {
            return Ok(None);
        }
        self.waiting
            .clone()
            .try_acquire_owned()
            .map(Some)
            .map_err(|_| CheckError::Overloaded)
    }

    async fn check_identities(
        self: &Arc<Self>,
        call: &Call<'_>,
        ids: &[ChannelIdentity],
    ) -> Result<CheckAnswer, CheckError> {
        let request = call.request;
        let mut ids: Vec<ChannelIdentity> = ids.to_vec();
        let mut seen = std::collections::HashSet::new();
        ids.retain(|id| seen.insert((id.channel.clone(), id.identity.clone())));
        let keys: Vec<EntryKey> = ids
            .iter()
            .map(|id| call.hasher.identity(&request.app_id, &id.channel, &id.identity))
            .collect();
        let mut slots = self.fresh(&keys, request.max_age).await;
        let unanswered = |slots: &[Option<CheckResult>]| -> Vec<usize> {
            (0..slots.len()).filter(|i| slots[*i].is_none()).collect()
        };
        let mut missing = unanswered(&slots);
        metrics::counter!("capability_cache_misses_total").increment(missing.len() as u64);
        let own = call.request_id.clone();
        let mut resumed = None;
        if let Some(gate) = call.gate.filter(|_| !missing.is_empty()) {
            resumed = gate.turn(missing.len() as u32).await?.sent_before();
            if resumed.is_none() {
                // Its turn came: what a check that went first answered meanwhile is not asked again.
                self.fill(&mut slots, &keys, &missing, request.max_age).await;
                missing = unanswered(&slots);
            }
        }
        if missing.is_empty() {
            return Ok(CheckAnswer {
                complete: true,
                results: slots.into_iter().flatten().collect(),
                ..CheckAnswer::default()
            });
        }
        // Shared with the live query's task: a check whose caller goes away counts until its query is sent.
        let place = self.wait_permit(call)?.map(Arc::new);
        let mut waiting = Waiting::new();
        let mut to_send = Vec::new();
        let call = &call.after_gate();
        let mut leases = Leases::new(&self.flights, self.redis(), own.clone(), call.deadline, call.until);
        if let Some(sent) = &resumed {
            // Sent before a takeover: its results are awaited, nothing is sent again.
            waiting.insert(sent.clone(), missing.clone());
        } else {
            // Until the caller's deadline, but once at least: a check that does not wait still starts or joins the
            // lookups it needs, and names them.
            let wanted: Vec<(usize, EntryKey)> = missing.iter().map(|&i| (i, keys[i])).collect();
            let mut timed_out = false;
            let mut joined = Vec::new();
            for (i, decided) in leases.decide_in_order(wanted, call.deadline).await {
                match decided {
                    Decided::Started => to_send.push(i),
                    Decided::Joined(holder) => joined.push((i, holder)),
                    Decided::TimedOut => timed_out = true,
                }
            }
            for (i, holder) in joined {
                let about = |n: &Notification| n.channel == ids[i].channel && n.identity == ids[i].identity;
                let cached = async { self.cached(&keys[i..=i]).await.into_iter().flatten().collect() };
                if self
                    .answered_too_long_ago(&holder, request.max_age, about, cached)
                    .await
                {
                    // Asked again, without its lease (the lookup keeps it).
                    to_send.push(i);
                } else {
                    metrics::counter!("capability_coalesced_total").increment(1);
                    waiting.entry(holder).or_default().push(i);
                }
            }
            if timed_out {
                // The deadline came while another check held a lease: nothing can be sent now, and the leases
                // taken before it go back; the answer is what the cache and the lookups joined have.
                let started: Vec<EntryKey> = to_send.drain(..).map(|i| keys[i]).collect();
                leases.give_back(&started);
            }
            // Asked about in the caller's order.
            to_send.sort_unstable();
        }
        if !to_send.is_empty() && call.gate.is_none() {
            // The lease first, then the cache again: a lease found free may have been given back, after this
            // check's first look, by a lookup whose results were cached before (a holder caches, then gives back).
            let hits = self.fill(&mut slots, &keys, &to_send, request.max_age).await;
            leases.give_back(&hits);
            to_send.retain(|i| slots[*i].is_none());
        }
        let mut live: Option<Arc<str>> = resumed;
        if let Some(gate) = call.gate.filter(|_| !to_send.is_empty()) {
            // Recorded as sent only when something goes out: what joined a lookup in flight was not.
            if let Some(sent) = gate.sending(&own).await?.sent_before() {
                let unsent: Vec<EntryKey> = to_send.iter().map(|i| keys[*i]).collect();
                leases.give_back(&unsent);
                waiting.entry(sent.clone()).or_default().append(&mut to_send);
                live = Some(sent);
            }
        }
        if !to_send.is_empty() {
            let sending: Vec<EntryKey> = to_send.iter().map(|i| keys[*i]).collect();
            let send = Recipient::IdentifiedBy(to_send.iter().map(|i| ids[*i].clone()).collect());
            let in_flight = leases.launch(&sending);
            // A repeat of the caller's request_id sends nothing: its first query answers what it asked, and its
            // leases went back so that nobody else waits on it for the rest.
            match self
                .send_live(call, &own, send, to_send.len() as u32, in_flight, place.clone())
                .await
            {
                Ok((accepted, _)) => {
                    waiting
                        .entry(accepted.clone())
                        .or_default()
                        .extend(to_send.iter().copied());
                    live = Some(accepted);
                }
                // Sinch had not accepted the query by the caller's deadline: what the cache and the lookups joined
                // have is the answer, the rest pending with no lookup to name — unless nothing else answers.
                Err(CheckError::Query(QueryError::Upstream(upstream::Error::DeadlineExceeded)))
                    if slots.iter().any(Option::is_some) || !waiting.is_empty() => {}
                Err(e) => return Err(e),
            }
        }
        let matches = |i: usize, n: &CheckResult| ids[i].channel == n.channel && ids[i].identity == n.identity;
        let received = Received {
            app_id: &request.app_id,
            keys: &keys,
            leases: &mut leases,
        };
        self.wait_for(&mut slots, &waiting, live.as_deref(), call.until, matches, received)
            .await?;
        leases.finish(call.tidy_until()).await;
        let pending: Vec<ChannelIdentity> = ids
            .iter()
            .zip(&slots)
            .filter(|(_, slot)| slot.is_none())
            .map(|(id, _)| id.clone())
            .collect();
        let pending_lookups = waiting
            .iter()
            .flat_map(|(request_id, at)| at.iter().map(move |&i| (i, request_id)))
            .filter(|&(i, _)| slots[i].is_none())
            .collect::<std::collections::BTreeMap<_, _>>()
            .into_iter()
            .map(|(i, request_id)| (ids[i].clone(), request_id.clone()))
            .collect();
        // The live query's request_id, else the one the first identity that needed a live result joined.
        let request_id = live.or_else(|| {
            missing
                .iter()
                .find_map(|i| waiting.iter().find(|(_, at)| at.contains(i)).map(|(id, _)| id.clone()))
        });
        Ok(CheckAnswer {
            complete: pending.is_empty(),
            pending,
            pending_lookups,
            results: slots.into_iter().flatten().collect(),
            request_id: request_id.map(|id| id.to_string()).unwrap_or_default(),
            recommended: Vec::new(),
            asked: !to_send.is_empty(),
        })
    }

    async fn check_contact(self: &Arc<Self>, call: &Call<'_>, contact: &str) -> Result<CheckAnswer, CheckError> {
        let request = call.request;
        let key = call.hasher.contact(&request.app_id, contact);
        let fresh = || {
            async {
                if request.max_age.is_zero() {
                    return InCache::Miss;
                }
                let now = self.now_ms();
                let cached = self.cached_contact(&key).await;
                // Every result the entry holds must be fresh: one expired means a channel would be missing.
                let fresh = !cached.results.is_empty() && cached.results.iter().all(|c| c.fresh(now, request.max_age));
                let Some(lookup) = cached.lookup.filter(|_| fresh) else {
                    return InCache::Miss;
                };
                let mut results: Vec<CheckResult> = cached
                    .results
                    .into_iter()
                    .filter_map(|c| answered(Source::Cache, c.offset, c.request_id, c.body))
                    .collect();
                results.sort_by(|a, b| (&a.channel, &a.identity).cmp(&(&b.channel, &b.identity)));
                let settle = self.settings.settle.as_millis() as u64;
                if now < lookup.last_result_ms.saturating_add(settle) {
                    return InCache::Settling {
                        lookup: lookup.request_id.into(),
                        cached: results,
                    };
                }
                InCache::Answer(CheckAnswer {
                    results,
                    ..CheckAnswer::default()
                })
            }
        };
        // The cache first, before a place among the waiting checks (a hit waits for nothing), but only while no
        // lookup of the contact is in flight, and the latest has settled: a contact's entry fills while its query
        // is in flight, and for the settle time after each result (a lookup no check waits for any more fills it
        // too). Then, gated (a bulk job), the budget and the cache again — a job's lease is never pending while it
        // waits for its turn; then the lease.
        let own = call.request_id.clone();
        // Whether the cache was passed over for a lookup in flight or settling: one that ends before this check
        // takes its lease leaves the entry whole; one still settling then is joined.
        let passed_over = AtomicBool::new(false);
        let whole = || async {
            if request.max_age.is_zero() {
                return InCache::Miss;
            }
            if leases::in_flight(&self.flights, self.redis(), &key, &own).await {
                passed_over.store(true, Ordering::Relaxed);
                return InCache::Miss;
            }
            let found = fresh().await;
            if matches!(found, InCache::Settling { .. }) {
                passed_over.store(true, Ordering::Relaxed);
            }
            found
        };
        // While its latest lookup settles, what the cache holds is what a check that finds no place to wait is told,
        // as it is: that lookup's results so far (with the request_id to watch for the rest), and the others.
        let settling = match whole().await {
            InCache::Answer(answer) => return Ok(answer),
            InCache::Settling { lookup, cached } => {
                let source = if *lookup == *own { Source::Live } else { Source::Shared };
                let results = cached
                    .into_iter()
                    .map(|result| {
                        if *result.request_id == *lookup {
                            CheckResult { source, ..result }
                        } else {
                            result
                        }
                    })
                    .collect();
                Some(CheckAnswer {
                    results,
                    request_id: lookup.to_string(),
                    ..CheckAnswer::default()
                })
            }
            InCache::Miss => None,
        };
        let place = match self.wait_permit(call) {
            Ok(place) => place.map(Arc::new),
            Err(e) => return settling.ok_or(e),
        };
        let resumed = match call.gate {
            Some(gate) => match gate.turn(1).await? {
                Proceed::Sent(request_id) => Some(request_id),
                Proceed::Send => {
                    // Its turn came: a contact a check that went first answered meanwhile is not asked again.
                    if let InCache::Answer(answer) = whole().await {
                        return Ok(answer);
                    }
                    None
                }
            },
            None => None,
        };
        let call = &call.after_gate();
        if let Some(sent) = resumed {
            return self.collect_contact(&sent, true, call.until).await;
        }
        let mut leases = Leases::new(&self.flights, self.redis(), own.clone(), call.deadline, call.until);
        match leases.decide(key, call.deadline).await {
            Decided::Started => {}
            // Its lookup answered it already, with results older than this check accepts (see
            // [`Checker::answered_too_long_ago`]): asked again, without the lease (the lookup keeps it).
            Decided::Joined(holder)
                if self
                    .answered_too_long_ago(&holder, request.max_age, |_| true, async {
                        self.cached_contact(&key).await.results
                    })
                    .await => {}
            Decided::Joined(holder) => {
                metrics::counter!("capability_coalesced_total").increment(1);
                let live = *holder == *own;
                let answer = self.collect_contact(&holder, live, call.until).await;
                // A lease joined from Redis is held here until now: let it go, as a query of its own is.
                leases.finish(call.tidy_until()).await;
                // The entry's other fresh results are still the contact's (see below).
                let answer = answer?;
                return Ok(answer.with_cached(fresh().await.results()));
            }
            Decided::TimedOut => return Err(CheckError::NoLookupYet),
        }
        if passed_over.load(Ordering::Relaxed) {
            match fresh().await {
                InCache::Answer(answer) => {
                    leases.give_back(&[key]);
                    return Ok(answer);
                }
                InCache::Settling { lookup, cached } => {
                    leases.give_back(&[key]);
                    metrics::counter!("capability_coalesced_total").increment(1);
                    let joined = self.collect_contact(&lookup, *lookup == *own, call.until).await?;
                    // The entry's other fresh results (of earlier lookups, of identity checks) are still the
                    // contact's: the lookup's own come first, and replace older ones.
                    return Ok(joined.with_cached(cached));
                }
                InCache::Miss => {}
            }
        }
        // Recorded as sent only when it goes out: a contact that joined a lookup in flight was not.
        if let Some(gate) = call.gate
            && let Some(sent) = gate.sending(&own).await?.sent_before()
        {
            leases.give_back(&[key]);
            return self.collect_contact(&sent, true, call.until).await;
        }
        metrics::counter!("capability_cache_misses_total").increment(1);
        let send = Recipient::ContactId(contact.to_owned());
        let in_flight = leases.launch(&[key]);
        let (accepted, sent) = self.send_live(call, &own, send, 1, in_flight, place.clone()).await?;
        // In a task of its own: a caller that goes away now does not take the note with it.
        let note = {
            let (checks, accepted) = (self.clone(), accepted.clone());
            async move { checks.contact_looked_up(&key, &accepted).await }
        };
        tokio::spawn(note);
        let answer = self.collect_contact(&accepted, true, call.until).await?;
        // In a task of its own, as the leases' giving back: a Redis holding writes does not hold the answer up.
        let remember = {
            let (checks, app_id, results) = (self.clone(), request.app_id.clone(), answer.results.clone());
            async move { checks.remember(&app_id, results.iter()).await }
        };
        let by = call.tidy_until();
        let _ = tokio::time::timeout_at(by, tokio::spawn(remember)).await;
        leases.finish(by).await;
        Ok(CheckAnswer { asked: sent, ..answer })
    }

    /// A contact query's results under `request_id` until `until`, or a settle after the last one.
    async fn collect_contact(
        &self,
        request_id: &Arc<str>,
        live: bool,
        until: Instant,
    ) -> Result<CheckAnswer, CheckError> {
        let source = if live { Source::Live } else { Source::Shared };
        let mut results: Vec<CheckResult> = Vec::new();
        let mut watch = std::pin::pin!(self.hub.watch(request_id, 0, self.limits(until)));
        let mut quiet_until = until;
        let mut drained = std::pin::pin!(self.drained());
        while let Some(event) = next_before(&mut watch, quiet_until, drained.as_mut()).await? {
            let Some((offset, body)) = notification(event)? else {
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
                None => {
                    // Its query was counted as one callback in the app's budget: each further channel that
                    // answers is one more.
                    if live && !results.is_empty() {
                        self.pacer.record(1);
                    }
                    results.push(result);
                }
            }
            quiet_until = until.min(Instant::now() + self.settings.settle);
        }
        Ok(CheckAnswer {
            results,
            request_id: request_id.to_string(),
            ..CheckAnswer::default()
        })
    }

    /// Sends the live query for `send` (part of the request's recipient, `identities` channel identities) under
    /// `request_id`, in a task of its own: if the caller goes away meanwhile, the query still completes, keeping
    /// the check's `place` among those waiting for Sinch until then, and its leases are marked sent (or given back
    /// if it failed, or if its attempt under the caller's request_id still waits for Sinch's answer at the
    /// deadline: that attempt goes on, and its results reach the cache as any callback's). Returns the request_id
    /// Sinch accepted, and whether it was sent now (not a repeat of the caller's request_id).
    async fn send_live(
        self: &Arc<Self>,
        call: &Call<'_>,
        request_id: &Arc<str>,
        send: Recipient,
        identities: u32,
        in_flight: InFlight,
        place: Option<Arc<OwnedSemaphorePermit>>,
    ) -> Result<(Arc<str>, bool), CheckError> {
        if call.gate.is_none() {
            self.pacer.record(identities);
        }
        let checker = self.clone();
        let request = call.request;
        let query = QueryRequest {
            app_id: request.app_id.clone(),
            recipient: request.recipient.clone(),
            request_id: Some(request_id.to_string()),
        };
        // Only a caller's request_id is remembered for idempotency: a generated one is never repeated.
        let remembered = request.request_id.is_some();
        let (deadline, trace) = (call.deadline, call.trace.cloned());
        let task = tokio::spawn(async move {
            let sent = match remembered {
                // The attempt under a caller's request_id keeps the place while it goes on, past the deadline too.
                true => {
                    let queries = &checker.queries;
                    queries.query_part(query, send, deadline, trace.as_ref(), place).await
                }
                false => {
                    let _place = place;
                    let sent = checker.queries.send(query, send, deadline, trace.as_ref()).await;
                    sent.map(|accepted| (accepted, true))
                }
            };
            match sent {
                Ok((accepted, true)) => {
                    let accepted: Arc<str> = accepted.request_id.into();
                    tracing::debug!(request_id = %mask_digits(&accepted), "live query sent for a check");
                    in_flight.sent(&accepted).await;
                    Ok((accepted, true))
                }
                Ok((accepted, false)) => {
                    in_flight.give_back(&checker.flights);
                    Ok((accepted.request_id.into(), false))
                }
                Err(e) => {
                    in_flight.give_back(&checker.flights);
                    Err(CheckError::Query(e))
                }
            }
        });
        task.await
            .map_err(|e| CheckError::Unavailable(format!("the live query's task failed: {e}")))?
    }

    /// With Redis, writes the live results a check received to the cache before their leases go, so that the next
    /// check finds them there (the replica that appended them writes them too, a moment later).
    async fn remember<'r>(&self, app_id: &str, results: impl Iterator<Item = &'r CheckResult>) {
        let Some(cache) = self.redis().and_then(|log| log.shared_cache()) else {
            return;
        };
        for result in results.filter(|r| r.source != Source::Cache) {
            let Ok(notification) = codec::decode_body(result.request_id.clone(), &result.body) else {
                continue;
            };
            if notification.app_id != app_id {
                continue;
            }
            if let Err(e) = cache.store(&notification, result.offset).await {
                tracing::debug!(error = %e, "a live result could not be cached");
            }
        }
    }

    /// Fills `slots` from the hub's notifications of the request_ids in `waiting`, until every awaited slot is
    /// filled, every request completed, or `until`. Results of `live` are this check's own. Each result is
    /// remembered, then its identity's lease goes (`received`): a later check finds the result in the cache, or
    /// asks Sinch again (after an invalidation, or accepting no cached result), rather than join a lookup still
    /// waiting for the rest and be served it. Fails when this replica shuts down and nothing more can reach it.
    async fn wait_for(
        &self,
        slots: &mut [Option<CheckResult>],
        waiting: &Waiting,
        live: Option<&str>,
        until: Instant,
        matches: impl Fn(usize, &CheckResult) -> bool,
        received: Received<'_, '_, '_>,
    ) -> Result<(), CheckError> {
        if waiting.is_empty() {
            return Ok(());
        }
        let mut awaited = waiting.values().map(Vec::len).sum::<usize>();
        let mut events = futures::stream::select_all(waiting.iter().map(|(request_id, positions)| {
            let watch = Box::pin(self.hub.watch(request_id, 0, self.limits(until)));
            let (request_id, positions) = (request_id.clone(), positions.clone());
            watch.map(move |event| (request_id.clone(), positions.clone(), event))
        }));
        let mut drained = std::pin::pin!(self.drained());
        while awaited > 0 {
            let Some((request_id, positions, event)) = next_before(&mut events, until, drained.as_mut()).await? else {
                return Ok(());
            };
            let Some((offset, body)) = notification(event)? else {
                continue;
            };
            let source = if Some(&*request_id) == live {
                Source::Live
            } else {
                Source::Shared
            };
            let Some(result) = answered(source, offset, request_id.to_string(), body) else {
                continue;
            };
            if let Some(&i) = positions.iter().find(|&&i| slots[i].is_none() && matches(i, &result)) {
                // A Redis holding writes does not hold the answer up (see [`TIDYING`]).
                let remember = self.remember(received.app_id, std::iter::once(&result));
                let _ = tokio::time::timeout_at(until.min(Instant::now() + TIDYING), remember).await;
                received.leases.give_back(&[received.keys[i]]);
                slots[i] = Some(result);
                awaited -= 1;
            }
        }
        Ok(())
    }

    fn limits(&self, until: Instant) -> WatchLimits {
        let wait = until.saturating_duration_since(Instant::now());
        WatchLimits {
            wait,
            // No heartbeats: nobody reads them.
            heartbeat: wait + Duration::from_secs(1),
            // With Redis, results still come from the replicas Sinch posts to while this one drains.
            ends_at_shutdown: self.redis().is_none(),
        }
    }

    /// Removes a recipient's cached results on every replica; returns how many entries went. An identity's entry
    /// goes with the entry of the contact its result named (the contact's answer would be missing it).
    pub async fn invalidate(&self, app_id: &str, recipient: &Recipient) -> Result<u64, CheckError> {
        let hasher = self.hasher().await?;
        let (keys, mut contacts): (Vec<EntryKey>, Vec<EntryKey>) = match recipient {
            Recipient::IdentifiedBy(ids) => (
                ids.iter()
                    .map(|id| hasher.identity(app_id, &id.channel, &id.identity))
                    .collect(),
                Vec::new(),
            ),
            Recipient::ContactId(contact) => (Vec::new(), vec![hasher.contact(app_id, contact)]),
        };
        for cached in self.cached(&keys).await.into_iter().flatten() {
            if let Some(n) = cached.notification()
                && !n.contact_id.is_empty()
            {
                contacts.push(hasher.contact(app_id, &n.contact_id));
            }
        }
        contacts.sort_unstable();
        contacts.dedup();
        // The lookups of what goes are not joined again: the next check asks Sinch. (With Redis, the removal
        // deletes their leases there, and a lookup of this replica's is looked up there before it is joined.)
        self.flights.forget(&contacts);
        match &self.store {
            Store::Local(local) => {
                // `keys` and the identities the contacts listed.
                let (removed, identities) = local.remove(&keys, &contacts);
                self.flights.forget(&identities);
                Ok(removed)
            }
            Store::Redis(log) => {
                self.flights.forget(&keys);
                log.shared_cache()
                    .expect("a Redis store")
                    .remove(&keys, &contacts, self.hub.now_ms())
                    .await
                    .map_err(|e| CheckError::Unavailable(e.to_string()))
            }
        }
    }
}

/// What a check's wait does with each result it receives: remember it under the app, then give back the lease of
/// its identity (by position in `keys`), if this check holds it.
struct Received<'r, 'k, 'l> {
    app_id: &'r str,
    keys: &'k [EntryKey],
    leases: &'r mut Leases<'l>,
}

/// One check's request and bounds, as its steps share them.
#[derive(Clone)]
struct Call<'a> {
    request: &'a CheckRequest,
    /// The live query's request_id: the caller's, or one made for this check.
    request_id: Arc<str>,
    hasher: &'a KeyHasher,
    start: Instant,
    /// The caller's deadline (with the margin kept for answering).
    deadline: Instant,
    /// When waiting for live results ends.
    until: Instant,
    trace: Option<&'a TraceParent>,
    gate: Option<&'a dyn Gate>,
}

/// The longest a check whose answer is ready spends caching its results and giving its leases back in Redis before
/// it answers: a Redis holding writes does not hold an answer up (the rest goes on in the background). The
/// caller's deadline alone was too late: the caller's clock started before the call reached this replica.
const TIDYING: Duration = Duration::from_millis(250);

impl Call<'_> {
    /// When a check whose answer is ready answers, whatever is left to tidy (see [`TIDYING`]).
    fn tidy_until(&self) -> Instant {
        self.deadline.min(Instant::now() + TIDYING)
    }

    /// The bounds once the gate let the query through: a bulk job's recipient waits in the budget's queue before
    /// its time starts; an interactive check's time is its caller's.
    fn after_gate(&self) -> Self {
        if self.gate.is_none() {
            return self.clone();
        }
        let queued = self.start.elapsed();
        let deadline = self.deadline + queued;
        Call {
            deadline,
            until: deadline.min(Instant::now() + self.request.wait),
            ..self.clone()
        }
    }
}

/// The next of `events` before `until` (`None` then, or when they end); fails once `drained` (the replica's drain
/// is over).
async fn next_before<S: futures::Stream + Unpin>(
    events: &mut S,
    until: Instant,
    drained: std::pin::Pin<&mut impl Future<Output = ()>>,
) -> Result<Option<S::Item>, CheckError> {
    tokio::select! {
        next = tokio::time::timeout_at(until, events.next()) => Ok(next.ok().flatten()),
        () = drained => Err(CheckError::ShuttingDown),
    }
}

/// A watch event's notification (offset and body), `None` for the others; fails when the server's shutdown ended
/// the watch.
fn notification(event: WatchEvent) -> Result<Option<(u64, Vec<u8>)>, CheckError> {
    match event {
        WatchEvent::Notification { offset, body, .. } => Ok(Some((offset, body))),
        WatchEvent::ShuttingDown { .. } => Err(CheckError::ShuttingDown),
        _ => Ok(None),
    }
}

/// A result from `body` (a hub's or the cache's encoding, receive time included); `None` if it does not decode.
pub(crate) fn answered(source: Source, offset: u64, request_id: String, body: Vec<u8>) -> Option<CheckResult> {
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
    // Ties (two identities on one channel) by identity: the same order whatever order the results came in.
    reachable.sort_by(|a, b| (a.0, &a.1, &a.3.identity, a.2).cmp(&(b.0, &b.1, &b.3.identity, b.2)));
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
}
