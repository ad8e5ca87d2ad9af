//! The capability cache of a single replica: a bounded moka cache fed by the event log, each entry expiring with
//! its status's time to live.

use std::{
    hash::BuildHasherDefault,
    sync::{Arc, Mutex, MutexGuard},
    time::{Duration, Instant},
};

use moka::{Expiry, notification::RemovalCause, sync::Cache};

use crate::{
    capability::CacheTtl,
    log::{
        Consumer, Entry, KeyFold,
        cached::{CachedResult, EntryKey, KeyHasher, Lookup, MAX_CONTACT_LOOKUPS, latest_lookup},
    },
};

/// The most results one contact entry holds (a contact has a few channel identities).
const MAX_CONTACT_RESULTS: usize = 64;

/// A cache entry: one identity's result, or a contact's results.
#[derive(Debug, Clone)]
pub enum Cached {
    One(CachedResult),
    Contact(ContactEntry),
}

/// A contact's results: those of every query that named the contact, by identity.
#[derive(Debug, Clone, Default)]
pub struct ContactEntry {
    pub results: Vec<(EntryKey, CachedResult)>,
    /// The request_ids of the latest lookups of the contact itself (contact_id queries), at most
    /// [`MAX_CONTACT_LOOKUPS`]: the entry is the contact's answer only while it holds a result of one. Results of
    /// identity queries that name the contact join the entry, but are not alone the contact's channels.
    pub lookups: Vec<Arc<str>>,
    /// Until when the entry is kept for its lookups while it holds no result, in milliseconds since the Unix epoch.
    kept_until_ms: u64,
}

impl ContactEntry {
    /// The latest lookup of the contact among its results (see [`crate::log::cached::ContactResults::lookup`]).
    pub fn lookup(&self) -> Option<Lookup> {
        latest_lookup(self.results.iter().map(|(_, held)| held), &self.lookups)
    }
}

impl Cached {
    /// When the entry's last result expires, in milliseconds since the Unix epoch.
    fn expires_at_ms(&self) -> u64 {
        match self {
            Cached::One(r) => r.expires_at_ms,
            Cached::Contact(contact) => contact
                .results
                .iter()
                .map(|(_, r)| r.expires_at_ms)
                .max()
                .unwrap_or(contact.kept_until_ms),
        }
    }
}

/// Each entry lives until its last result expires.
struct UntilExpired;

impl Expiry<EntryKey, Arc<Cached>> for UntilExpired {
    fn expire_after_create(&self, _: &EntryKey, value: &Arc<Cached>, _: Instant) -> Option<Duration> {
        Some(until(value))
    }

    fn expire_after_update(
        &self,
        _: &EntryKey,
        value: &Arc<Cached>,
        _: Instant,
        _: Option<Duration>,
    ) -> Option<Duration> {
        Some(until(value))
    }
}

fn until(value: &Cached) -> Duration {
    Duration::from_millis(value.expires_at_ms().saturating_sub(crate::log::wall_clock_ms()))
}

/// How many locks an entry's read-then-write (and a contact's removal) is taken under, by its key.
const STRIPES: usize = 64;

/// See the module documentation.
pub struct LocalCache {
    /// Its keys are keyed hashes already: folded, not hashed again ([`KeyFold`]).
    entries: Cache<EntryKey, Arc<Cached>, BuildHasherDefault<KeyFold>>,
    /// Held while an entry is read then written, or a contact's removed: the log feeds the cache from several
    /// shards at once, and an invalidation may come meanwhile.
    stripes: [Mutex<()>; STRIPES],
    hasher: KeyHasher,
    ttl: CacheTtl,
}

impl LocalCache {
    /// Holds at most `max_entries` results (a contact's entry weighs as many as it holds; the least recently
    /// used go first past that).
    pub fn new(ttl: CacheTtl, max_entries: u64) -> LocalCache {
        LocalCache {
            entries: Cache::builder()
                .max_capacity(max_entries)
                .weigher(|_, value: &Arc<Cached>| match &**value {
                    Cached::One(_) => 1,
                    Cached::Contact(contact) => contact.results.len().max(1) as u32,
                })
                .expire_after(UntilExpired)
                .eviction_listener(|_, _, cause| {
                    if cause == RemovalCause::Size {
                        metrics::counter!("capability_cache_evictions_total").increment(1);
                    }
                })
                .build_with_hasher(BuildHasherDefault::default()),
            stripes: std::array::from_fn(|_| Mutex::new(())),
            hasher: KeyHasher::random(),
            ttl,
        }
    }

    pub fn hasher(&self) -> &KeyHasher {
        &self.hasher
    }

    /// The entry under `key`, if any.
    pub fn get(&self, key: &EntryKey) -> Option<Arc<Cached>> {
        self.entries.get(key)
    }

    /// Removes identity entries `keys` and contacts' entries `contacts` with the identity entries they list.
    /// Returns how many entries went, and every identity whose entry was to go. A contact's entry goes under its
    /// stripe's lock, so that a result arriving for the contact meanwhile cannot put the entry's older results
    /// back.
    pub fn remove(&self, keys: &[EntryKey], contacts: &[EntryKey]) -> (u64, Vec<EntryKey>) {
        let mut gone: Vec<EntryKey> = keys.to_vec();
        let mut removed = 0;
        for contact in contacts {
            let _stripe = self.stripe(contact);
            if let Some(entry) = self.entries.remove(contact) {
                removed += 1;
                if let Cached::Contact(contact) = &*entry {
                    gone.extend(contact.results.iter().map(|(key, _)| *key));
                }
            }
        }
        gone.sort_unstable();
        gone.dedup();
        let removed = removed + gone.iter().filter(|key| self.entries.remove(*key).is_some()).count() as u64;
        (removed, gone)
    }

    /// The lock an entry is read then written under.
    fn stripe(&self, key: &EntryKey) -> MutexGuard<'_, ()> {
        self.stripes[usize::from(key[0]) % STRIPES]
            .lock()
            .expect("cache stripe lock poisoned")
    }

    /// How many entries it holds (approximately: expired ones go lazily).
    pub fn len(&self) -> u64 {
        self.entries.entry_count()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Keeps `result` under its identity and, with `contact`, in its contact's entry, unless what is held there is
    /// newer. Each entry is read then written under its stripe's lock (cheaper than moka's per-key compute). An
    /// identity's entry may be removed between the two — what lands just after is newer than what went; a
    /// contact's entry, which merges the results it held, is removed under the lock too ([`LocalCache::remove`]).
    /// The identity's entry is written first: a contact's removal that lists the result then finds it there.
    fn store(&self, result: CachedResult, identity: EntryKey, contact: Option<EntryKey>) {
        let at = result.checked_at_ms;
        let newer = move |held: &CachedResult| held.checked_at_ms <= at;
        match contact {
            None => self.store_one(result, identity, newer),
            Some(contact) => {
                self.store_one(result.clone(), identity, newer);
                self.store_in_contact(result, identity, contact, newer);
            }
        }
    }

    fn store_one(&self, result: CachedResult, identity: EntryKey, newer: impl Fn(&CachedResult) -> bool) {
        let _stripe = self.stripe(&identity);
        let held = self.entries.get(&identity);
        if let Some(Cached::One(held)) = held.as_deref()
            && !newer(held)
        {
            return;
        }
        self.entries.insert(identity, Arc::new(Cached::One(result)));
    }

    fn store_in_contact(
        &self,
        result: CachedResult,
        identity: EntryKey,
        contact: EntryKey,
        newer: impl Fn(&CachedResult) -> bool,
    ) {
        let _stripe = self.stripe(&contact);
        let mut entry = self.contact_entry(&contact);
        // An expired result goes, as its identity's own entry did: kept, it would empty every later answer of the
        // contact, Sinch's next answers not naming an identity the contact no longer has.
        let now = crate::log::wall_clock_ms();
        entry.results.retain(|(_, held)| held.expires_at_ms > now);
        let full = entry.results.len() >= MAX_CONTACT_RESULTS;
        match entry.results.iter_mut().find(|(key, _)| *key == identity) {
            Some((_, held)) if newer(held) => *held = result,
            Some(_) => return,
            None if full => return,
            None => entry.results.push((identity, result)),
        }
        self.entries.insert(contact, Arc::new(Cached::Contact(entry)));
    }

    /// A copy of `contact`'s entry to change (an empty one if there is none), under its stripe's lock.
    fn contact_entry(&self, contact: &EntryKey) -> ContactEntry {
        match self.entries.get(contact).as_deref() {
            Some(Cached::Contact(entry)) => entry.clone(),
            _ => ContactEntry::default(),
        }
    }

    /// Notes that `request_id` is a lookup of `contact` itself: the contact's entry answers once it holds one of
    /// its results (until then, a check of the contact asks Sinch, or joins the lookup while it is in flight).
    pub fn looked_up(&self, contact: &EntryKey, request_id: &str) {
        let _stripe = self.stripe(contact);
        let mut entry = self.contact_entry(contact);
        if entry.lookups.iter().any(|lookup| **lookup == *request_id) {
            return;
        }
        if entry.lookups.len() >= MAX_CONTACT_LOOKUPS {
            entry.lookups.remove(0);
        }
        entry.lookups.push(request_id.into());
        entry.kept_until_ms = crate::log::wall_clock_ms() + self.ttl.longest().as_millis() as u64;
        self.entries.insert(*contact, Arc::new(Cached::Contact(entry)));
    }
}

impl Consumer for LocalCache {
    fn apply(&self, entry: &Entry) {
        let Entry::Notification(n) = entry else { return };
        let notification = &n.notification;
        let Some(result) = CachedResult::of(notification, n.offset, n.time_ms, &n.body, &self.ttl) else {
            return;
        };
        let app = &notification.app_id;
        let identity = self.hasher.identity(app, &notification.channel, &notification.identity);
        let contact = Some(&notification.contact_id)
            .filter(|c| !c.is_empty())
            .map(|c| self.hasher.contact(app, c));
        self.store(result, identity, contact);
    }

    fn advance(&self, _now_ms: u64) {
        metrics::gauge!("capability_cache_entries").set(self.len() as f64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        capability::{CapabilityStatus, Channel, Notification},
        log::{NotificationEntry, codec},
    };

    fn entry(identity: &str, contact: &str, status: CapabilityStatus, time_ms: u64) -> Entry {
        let notification = Notification {
            request_id: format!("r{time_ms}"),
            contact_id: contact.into(),
            channel: Channel::Sms,
            identity: identity.into(),
            capability_status: status,
            channel_capabilities: Vec::new(),
            reason: None,
            channel_recipient_identities: Vec::new(),
            app_id: "app".into(),
            project_id: String::new(),
            accepted_time: None,
            event_time: None,
            message_metadata: String::new(),
            correlation_id: String::new(),
            received_time: codec::log_time(time_ms),
        };
        Entry::Notification(NotificationEntry {
            time_ms,
            offset: 1,
            body: codec::encode_body(&notification).into(),
            notification: Arc::new(notification),
        })
    }

    /// Runs `a` and `b` on two threads released at the same moment.
    fn at_once(a: impl FnOnce() + Send, b: impl FnOnce() + Send) {
        let start = std::sync::Barrier::new(2);
        std::thread::scope(|scope| {
            scope.spawn(|| {
                start.wait();
                a();
            });
            start.wait();
            b();
        });
    }

    fn held(cache: &LocalCache, identity: &str) -> Option<CachedResult> {
        match cache
            .get(&cache.hasher().identity("app", &Channel::Sms, identity))
            .as_deref()
        {
            Some(Cached::One(result)) => Some(result.clone()),
            _ => None,
        }
    }

    #[test]
    fn a_late_older_result_does_not_replace_a_newer_one() {
        let cache = LocalCache::new(CacheTtl::default(), 100);
        let now = crate::log::wall_clock_ms();
        cache.apply(&entry("46700000001", "", CapabilityStatus::Full, now));
        cache.apply(&entry("46700000001", "", CapabilityStatus::NoCapability, now - 1_000));
        assert_eq!(held(&cache, "46700000001").unwrap().request_id, format!("r{now}"));
        cache.apply(&entry("46700000001", "", CapabilityStatus::Partial, now + 1));
        assert_eq!(held(&cache, "46700000001").unwrap().request_id, format!("r{}", now + 1));
    }

    /// The log feeds the cache from as many threads as it has shards: two results for one identity fed at the
    /// same moment leave the newer one held, whichever lands last.
    #[test]
    fn of_two_results_fed_at_once_the_newer_is_held() {
        let cache = LocalCache::new(CacheTtl::default(), 10_000);
        let now = crate::log::wall_clock_ms();
        for round in 0..2_000u64 {
            let identity = format!("467{round:08}");
            let feed = |time_ms| cache.apply(&entry(&identity, "", CapabilityStatus::Full, time_ms));
            at_once(|| feed(now + 2 * round), || feed(now + 2 * round + 1));
            let held = held(&cache, &identity).expect("a result is held");
            assert_eq!(held.checked_at_ms, now + 2 * round + 1, "round {round}");
        }
    }

    #[test]
    fn statuses_without_a_ttl_are_not_cached() {
        let cache = LocalCache::new(CacheTtl::default(), 100);
        let now = crate::log::wall_clock_ms();
        cache.apply(&entry("46700000001", "", CapabilityStatus::Unknown, now));
        cache.apply(&entry("46700000002", "", CapabilityStatus::Other("NEW".into()), now));
        assert!(held(&cache, "46700000001").is_none() && held(&cache, "46700000002").is_none());
    }

    #[test]
    fn a_contact_entry_gathers_its_identities_and_goes_with_them() {
        let cache = LocalCache::new(CacheTtl::default(), 100);
        let now = crate::log::wall_clock_ms();
        cache.apply(&entry("46700000001", "C1", CapabilityStatus::Full, now));
        cache.apply(&entry("46700000002", "C1", CapabilityStatus::Full, now));
        let contact = cache.hasher().contact("app", "C1");
        let Some(Cached::Contact(held_then)) = cache.get(&contact).as_deref().cloned() else {
            panic!("no contact entry")
        };
        assert_eq!(held_then.results.len(), 2);
        assert_eq!(cache.remove(&[], &[contact]).0, 3);
        assert!(held(&cache, "46700000001").is_none());
    }

    /// A contact's entry answers once it holds a result of a lookup of the contact itself, whichever came first:
    /// the note of the lookup, or its result; results of identity queries naming the contact do not make it so.
    #[test]
    fn a_contact_entry_answers_once_it_holds_a_result_of_a_lookup_of_the_contact() {
        let cache = LocalCache::new(CacheTtl::default(), 100);
        let now = crate::log::wall_clock_ms();
        let whole = |contact: &EntryKey| matches!(cache.get(contact).as_deref(), Some(Cached::Contact(c)) if c.lookup().is_some());
        // entry() names its result's request_id r<time>.
        cache.apply(&entry("46700000001", "C1", CapabilityStatus::Full, now));
        let c1 = cache.hasher().contact("app", "C1");
        assert!(!whole(&c1), "an identity query's result");
        cache.looked_up(&c1, &format!("r{}", now + 1));
        assert!(!whole(&c1), "the lookup's result has not come");
        cache.apply(&entry("46700000002", "C1", CapabilityStatus::Full, now + 1));
        assert!(whole(&c1));

        let c2 = cache.hasher().contact("app", "C2");
        cache.looked_up(&c2, &format!("r{}", now + 2));
        assert!(cache.get(&c2).is_some(), "kept for its lookup, with no result yet");
        cache.apply(&entry("46700000003", "C2", CapabilityStatus::Full, now + 2));
        assert!(whole(&c2));
        for n in 0..MAX_CONTACT_LOOKUPS {
            cache.looked_up(&c2, &format!("later-{n}"));
        }
        assert!(!whole(&c2), "only the latest lookups are remembered");
        assert_eq!(cache.remove(&[], &[c1]).0, 3);
        assert!(held(&cache, "46700000001").is_none());
    }

    /// An invalidation of a contact while a result for another of its identities arrives: what the contact's
    /// entry held before the invalidation does not come back with the newcomer, and the newcomer, if it stays
    /// cached under its identity, stays listed in the contact's entry (so that the next invalidation reaches it).
    #[test]
    fn a_contact_invalidated_while_a_result_arrives_keeps_nothing_from_before() {
        let cache = LocalCache::new(CacheTtl::default(), 100_000);
        let now = crate::log::wall_clock_ms();
        for round in 0..2_000u64 {
            let contact_id = format!("C{round}");
            let before = format!("466{round:08}");
            cache.apply(&entry(&before, &contact_id, CapabilityStatus::Full, now));
            let contact = cache.hasher().contact("app", &contact_id);
            let newcomer_id = format!("467{round:08}");
            let newcomer = entry(&newcomer_id, &contact_id, CapabilityStatus::Full, now + 1);
            at_once(
                || cache.apply(&newcomer),
                || {
                    cache.remove(&[], &[contact]);
                },
            );
            let key = |identity: &str| cache.hasher().identity("app", &Channel::Sms, identity);
            let listed = match cache.get(&contact).as_deref() {
                Some(Cached::Contact(held)) => held.results.iter().map(|(k, _)| *k).collect(),
                _ => Vec::new(),
            };
            assert!(
                !listed.contains(&key(&before)),
                "round {round}: an invalidated result came back"
            );
            if held(&cache, &newcomer_id).is_some() {
                assert!(
                    listed.contains(&key(&newcomer_id)),
                    "round {round}: the newcomer is cached but its contact's entry does not list it"
                );
            }
        }
    }

    #[test]
    fn the_cache_holds_no_more_than_its_bound_whatever_arrives() {
        let cache = LocalCache::new(CacheTtl::default(), 1_000);
        let now = crate::log::wall_clock_ms();
        for i in 0..20_000 {
            cache.apply(&entry(&format!("467{i:08}"), "", CapabilityStatus::Full, now));
        }
        cache.entries.run_pending_tasks();
        assert!(cache.len() <= 1_000, "{}", cache.len());
    }
}
