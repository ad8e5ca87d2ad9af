//! The capability cache and the coalescing leases in Redis, shared by every replica.
//!
//! | key | what |
//! |---|---|
//! | `prefix:cache-key` | the key of the keyed hash that names the others, when `CAPABILITY_CACHE_HASH_KEY` is unset |
//! | `prefix:c:<hash>` | a channel identity's latest result, expiring with its status's time to live; or, once invalidated, when (8 bytes) |
//! | `prefix:cc:<hash>` | a contact's results: field = the identity's `<hash>`, value = its result; expires with the last. Field `t`: when it was last invalidated. Field `a`: the request_ids of the latest lookups of the contact itself (16 zero bytes, then the request_ids, one per line): the entry is the contact's answer only while it holds a result of one |
//! | `prefix:lease:<hash>` | the request_id of the live query in flight for an identity or contact (`p:` pending, `s:` sent; `d:` given back after it was sent, a moment, for the checks that waited for it) |
//!
//! No key has a hash tag: entries spread over a cluster's slots, and every script touches one key.
//!
//! A result's time is its time in the log: the stream entry's, Redis's clock at its append (on a Cluster, its
//! shard's node's), whichever replica stores it — the one that appended it, or a check that received it from its
//! hub, maybe much later — so that replicas' clocks never order two results. An invalidation leaves its time in
//! the entries it names, held or not (a result's append-time store may have failed, be on its way still, or Redis
//! lost it): Redis's clock too (the entry's node's), or past the log's time as the invalidating replica last read
//! it, or past the time of what it removed, whichever is latest (a log running ahead of Redis's clock), for as long
//! as a result appended before it may still be stored by a replica: a retention (a hub replays it to a check) plus
//! the longest check, or the longest time to live of any status if shorter. Such a result is refused there. Its
//! first 8 bytes read as a result's time, so a replica that predates the mark refuses such results under an
//! identity too; a mark reads as no result. A mark costs about what a cached result does, for minutes.

use std::{
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, UNIX_EPOCH},
};

use redis::Script;

use super::{Connection, invoke, ttl_ms};
use crate::{
    capability::{CacheTtl, Notification},
    log::{
        cached::{CachedResult, ContactResults, EntryKey, KeyHasher, MAX_CONTACT_LOOKUPS, hex, latest_lookup},
        codec, wall_clock_ms,
    },
    secret::Secret,
};

/// How often the hash key kept in Redis is looked at again.
const KEY_REFRESH: Duration = Duration::from_secs(1);

/// The most results one contact entry holds (a contact has a few channel identities).
const MAX_CONTACT_RESULTS: u32 = 64;

/// Whether encoded result `a` is newer than `b`: their first 8 bytes (big-endian times) compared byte by byte,
/// whatever the server's collation.
const NEWER: &str = r"
local function newer(a, b)
  for i = 1, 8 do
    local x, y = string.byte(a, i), string.byte(b, i)
    if x ~= y then return x > y end
  end
  return false
end
";

/// Times in the scripts, in ms: Redis's clock (`now`); the 8 big-endian bytes of a value from a position
/// (`ms_at`: 1, a result's or mark's time; 9, a result's expiry); an invalidation's time: now, or just past the
/// log's time as the invalidating replica last read it (`invalidated_at`), or past the time of a result it removes
/// (or of a mark) (`past`), whichever is latest, so that a result appended before it is refused however far ahead
/// of Redis's clock the log ran, held in the entry or not; `as_mark` encodes it as the 8 bytes an entry holds.
const MARK: &str = r"
local function now()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function ms_at(value, from)
  local ms = 0
  for i = from, from + 7 do ms = ms * 256 + string.byte(value, i) end
  return ms
end
local function invalidated_at(log_ms)
  return math.max(now(), tonumber(log_ms) + 1)
end
local function past(at, held)
  if not held or #held < 8 then return at end
  return math.max(at, ms_at(held, 1) + 1)
end
local function as_mark(ms)
  local bytes = {}
  for i = 8, 1, -1 do
    bytes[i] = string.char(ms % 256)
    ms = math.floor(ms / 256)
  end
  return table.concat(bytes)
end
";

/// What a store script answers: stored, kept out by a newer result, or kept out by a later invalidation.
const STORED: i64 = 1;
const INVALIDATED: i64 = 2;

/// Stores a result unless the entry holds a newer one, or was invalidated after it, until it expires by Redis's
/// clock (the log's: a replica's own, ahead of it, would shorten every result's stay). KEYS: entry. ARGV: encoded
/// result. Returns 0 for a result expired already.
const STORE: &str = r"
local left = ms_at(ARGV[1], 9) - now()
if left <= 0 then return 0 end
local cur = redis.call('GET', KEYS[1])
if cur and newer(cur, ARGV[1]) then
  if #cur == 8 then return 2 end
  return 0
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', left)
return 1
";

/// Removes a result stored a moment ago, if it is still there. KEYS: entry. ARGV: encoded result.
const UNSTORE: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
";

/// Empties an identity's entry, leaving the invalidation's time (see [`MARK`]). KEYS: entry. ARGV: how long it is
/// kept (ms), the log's time as the invalidating replica last read it (ms). Returns 1 when a result went.
const INVALIDATE: &str = r"
local cur = redis.call('GET', KEYS[1])
redis.call('SET', KEYS[1], as_mark(past(invalidated_at(ARGV[2]), cur)), 'PX', ARGV[1])
if cur and #cur > 8 then return 1 end
return 0
";

/// Stores a result in a contact's entry unless it holds a newer one for the identity, or the contact was
/// invalidated after it; the entry lives as long as its longest-lived result. Results whose time to live has
/// passed go first, as their identities' own entries did: kept, they would empty every later answer of the
/// contact, Sinch's next answers not naming an identity the contact no longer has. KEYS: contact entry. ARGV:
/// field, encoded result, most results. Returns 0 for a result expired already (as [`STORE`]).
const STORE_CONTACT: &str = r"
local at = now()
local left = ms_at(ARGV[2], 9) - at
if left <= 0 then return 0 end
local held = redis.call('HGETALL', KEYS[1])
local results = 0
for i = 1, #held, 2 do
  local value = held[i + 1]
  if held[i] ~= 't' and held[i] ~= 'a' then
    if #value >= 16 and ms_at(value, 9) <= at then
      redis.call('HDEL', KEYS[1], held[i])
    else
      results = results + 1
    end
  end
end
local mark = redis.call('HGET', KEYS[1], 't')
if mark and newer(mark, ARGV[2]) then return 2 end
local cur = redis.call('HGET', KEYS[1], ARGV[1])
if cur and newer(cur, ARGV[2]) then return 0 end
if not cur and results >= tonumber(ARGV[3]) then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
if redis.call('PTTL', KEYS[1]) < left then redis.call('PEXPIRE', KEYS[1], left) end
return 1
";

/// Empties a contact's entry, leaving the invalidation's time (see [`MARK`]), and returns the identities it
/// listed, in one step: a result stored in it between a read of its fields and their deletion would be deleted
/// unlisted, its identity entry left behind. KEYS: contact entry. ARGV: how long the mark is kept (ms), the log's
/// time as the invalidating replica last read it (ms).
const TAKE_CONTACT: &str = r"
local held = redis.call('HGETALL', KEYS[1])
local at = invalidated_at(ARGV[2])
local listed = {}
for i = 1, #held, 2 do
  if held[i] ~= 'a' then at = past(at, held[i + 1]) end
  if held[i] ~= 't' and held[i] ~= 'a' then table.insert(listed, held[i]) end
end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 't', as_mark(at))
redis.call('PEXPIRE', KEYS[1], ARGV[1])
return listed
";

/// Notes a lookup of a contact itself in its entry (created if none, kept at least as long as a result would be),
/// with the latest others. Its value reads as a result of time and expiry zero to a replica that predates it, which
/// drops it when it stores the contact's next result. KEYS: contact entry. ARGV: request_id, how long the entry is
/// kept at least (ms), the most lookups kept.
const LOOKED_UP: &str = r"
local lookups = {}
local held = redis.call('HGET', KEYS[1], 'a')
if held then
  for lookup in string.gmatch(string.sub(held, 17), '[^\n]+') do
    if lookup == ARGV[1] then return 0 end
    table.insert(lookups, lookup)
  end
end
table.insert(lookups, ARGV[1])
while #lookups > tonumber(ARGV[3]) do table.remove(lookups, 1) end
redis.call('HSET', KEYS[1], 'a', string.rep('\0', 16) .. table.concat(lookups, '\n'))
if redis.call('PTTL', KEYS[1]) < tonumber(ARGV[2]) then redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 1
";

/// Takes a lease (pending: `p:<request_id>`) unless someone holds it (one given back, `d:`, is free). KEYS: lease.
/// ARGV: request_id, time to live (ms). Returns the holder's value, or nothing when taken.
const LEASE: &str = r"
local held = redis.call('GET', KEYS[1])
if held and string.sub(held, 1, 2) ~= 'd:' then return held end
redis.call('SET', KEYS[1], 'p:' .. ARGV[1], 'PX', ARGV[2])
return nil
";

/// Marks our pending lease sent (`s:<accepted request_id>`). KEYS: lease. ARGV: request_id, accepted, ttl (ms).
const LEASE_SENT: &str = r"
local held = redis.call('GET', KEYS[1])
if held == 'p:' .. ARGV[1] or not held then
  redis.call('SET', KEYS[1], 's:' .. ARGV[2], 'PX', ARGV[3])
  return 1
end
return 0
";

/// Gives a lease back if it is still ours: pending under our request_id, gone; sent (under the request_id Sinch
/// answered with), `d:<that request_id>` for `linger`, so that a check that found it pending and looks again joins
/// the query it became (a new check takes it). KEYS: lease. ARGV: our request_id, the sent one, linger (ms).
const RELEASE: &str = r"
local held = redis.call('GET', KEYS[1])
if held == 'p:' .. ARGV[1] then return redis.call('DEL', KEYS[1]) end
if held == 's:' .. ARGV[2] then
  redis.call('SET', KEYS[1], 'd:' .. ARGV[2], 'PX', ARGV[3])
  return 1
end
return 0
";

/// See the module documentation.
pub struct RedisCache {
    commands: Connection,
    prefix: String,
    ttl: CacheTtl,
    /// How long an invalidation's mark is kept (see the module documentation).
    marks_kept: Duration,
    /// The hasher of `CAPABILITY_CACHE_HASH_KEY`, when set.
    configured: Option<KeyHasher>,
    /// Whether a call is looking at the key kept in Redis again.
    refreshing: AtomicBool,
    /// The hasher of the key kept in Redis, when it was last looked at, and the key.
    hasher: std::sync::Mutex<Option<(KeyHasher, std::time::Instant, String)>>,
    store: Script,
    store_contact: Script,
    unstore: Script,
    invalidate: Script,
    take_contact: Script,
    looked_up: Script,
    lease: Script,
    lease_sent: Script,
    release: Script,
}

/// Who holds a lease in Redis.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder(String);

impl Holder {
    /// Whether it is `request_id`'s pending lease, or sent under it.
    pub fn is_ours(&self, request_id: &str) -> bool {
        self.0.get(2..) == Some(request_id)
    }

    /// The request_id its query went out under, once sent.
    pub fn sent(&self) -> Option<&str> {
        self.0.strip_prefix("s:")
    }

    /// The request_id its query went out under, once sent and given back (a moment ago).
    pub fn done(&self) -> Option<&str> {
        self.0.strip_prefix("d:")
    }
}

impl RedisCache {
    /// `stored_within`: how long after it arrived a replica may still store a result.
    pub(super) fn new(
        commands: Connection,
        prefix: String,
        ttl: CacheTtl,
        stored_within: Duration,
        key: Option<Secret>,
    ) -> RedisCache {
        RedisCache {
            commands,
            prefix,
            marks_kept: ttl.longest().min(stored_within),
            ttl,
            configured: key.map(|key| KeyHasher::new(key.expose().as_bytes())),
            refreshing: AtomicBool::new(false),
            hasher: std::sync::Mutex::new(None),
            store: Script::new(&format!("{NEWER}{MARK}{STORE}")),
            store_contact: Script::new(&format!("{NEWER}{MARK}{STORE_CONTACT}")),
            unstore: Script::new(UNSTORE),
            invalidate: Script::new(&format!("{MARK}{INVALIDATE}")),
            take_contact: Script::new(&format!("{MARK}{TAKE_CONTACT}")),
            looked_up: Script::new(LOOKED_UP),
            lease: Script::new(LEASE),
            lease_sent: Script::new(LEASE_SENT),
            release: Script::new(RELEASE),
        }
    }

    /// The hasher every replica names entries with: the configured key's, else the one kept in Redis (made by
    /// the first replica that needed it). The kept key is looked at again every [`KEY_REFRESH`], and put back if
    /// Redis lost it, so that replicas that started on either side of a data loss come to name entries alike.
    pub async fn hasher(&self) -> redis::RedisResult<KeyHasher> {
        if let Some(configured) = &self.configured {
            return Ok(configured.clone());
        }
        let current = self.hasher.lock().expect("hasher lock poisoned").clone();
        if let Some((hasher, at, _)) = &current
            && (at.elapsed() < KEY_REFRESH || self.refreshing.swap(true, Ordering::AcqRel))
        {
            // Fresh, or another call is looking again meanwhile: one call a second pays for the look.
            return Ok(hasher.clone());
        }
        // Let go however the look ends: a caller that gives up on it (a deadline) must not stop every later one.
        let _looking = Looking(&self.refreshing);
        self.look_at_key(current.map(|(_, _, key)| key)).await
    }

    /// Reads the key kept in Redis, putting `held` (or a new one) there first if Redis has none.
    async fn look_at_key(&self, held: Option<String>) -> redis::RedisResult<KeyHasher> {
        let name = format!("{}:cache-key", self.prefix);
        let mine = held.unwrap_or_else(|| hex(&rand::random::<EntryKey>()));
        let mut conn = self.commands.clone();
        let _: Option<String> = redis::cmd("SET")
            .arg(&name)
            .arg(&mine)
            .arg("NX")
            .query_async(&mut conn)
            .await?;
        let key: String = redis::cmd("GET")
            .arg(&name)
            .query_async::<Option<String>>(&mut conn)
            .await?
            .unwrap_or(mine);
        let hasher = KeyHasher::new(key.as_bytes());
        *self.hasher.lock().expect("hasher lock poisoned") = Some((hasher.clone(), std::time::Instant::now(), key));
        Ok(hasher)
    }

    fn entry(&self, key: &EntryKey) -> String {
        format!("{}:c:{}", self.prefix, hex(key))
    }

    fn contact_entry(&self, key: &EntryKey) -> String {
        format!("{}:cc:{}", self.prefix, hex(key))
    }

    fn lease_key(&self, key: &EntryKey) -> String {
        format!("{}:lease:{}", self.prefix, hex(key))
    }

    /// Whether results of `notification`'s status are cached at all.
    pub(super) fn keeps(&self, notification: &Notification) -> bool {
        self.ttl.of(&notification.capability_status).is_some()
    }

    /// Stores the result of `notification`, appended at `offset`, under its identity and, when it names one, its
    /// contact. The time of the result is its receive time: its time in the log (Redis's clock at its append),
    /// whichever replica stores it and whenever — the replica that appended it, or a check that received it —
    /// the clock invalidations are timed by too (now, when it has none). The identity's entry is written first, so
    /// that a contact's invalidation that lists the result finds it there; one that came before it refuses the
    /// result in the contact's entry, and the result goes from the identity's.
    pub async fn store(&self, notification: &Notification, offset: u64) -> redis::RedisResult<()> {
        let at = notification
            .received_time
            .duration_since(UNIX_EPOCH)
            .map_or(0, |since| since.as_millis() as u64);
        let at = if at == 0 { wall_clock_ms() } else { at };
        let Some(result) = CachedResult::of(notification, offset, at, &codec::encode_body(notification), &self.ttl)
        else {
            return Ok(());
        };
        let hasher = self.hasher().await?;
        let (app, channel) = (&notification.app_id, &notification.channel);
        let identity = hasher.identity(app, channel, &notification.identity);
        let value = result.encode();
        let mut invocation = self.store.prepare_invoke();
        invocation.key(self.entry(&identity)).arg(value.as_slice());
        let stored = invoke::<i64>(&invocation, &self.commands).await?;
        if stored == INVALIDATED || notification.contact_id.is_empty() {
            return Ok(());
        }
        let mut invocation = self.store_contact.prepare_invoke();
        invocation
            .key(self.contact_entry(&hasher.contact(app, &notification.contact_id)))
            .arg(hex(&identity))
            .arg(value.as_slice())
            .arg(MAX_CONTACT_RESULTS);
        if invoke::<i64>(&invocation, &self.commands).await? == INVALIDATED && stored == STORED {
            let mut invocation = self.unstore.prepare_invoke();
            invocation.key(self.entry(&identity)).arg(value.as_slice());
            invoke::<i64>(&invocation, &self.commands).await?;
        }
        Ok(())
    }

    /// The results held under identity entries `keys`, in their order.
    pub async fn get(&self, keys: &[EntryKey]) -> redis::RedisResult<Vec<Option<CachedResult>>> {
        self.read(keys.iter().map(|key| self.entry(key))).await
    }

    /// The results held under the entries `names`, in their order. One GET per entry, all at once: in a cluster
    /// each may live on another slot.
    async fn read(&self, names: impl Iterator<Item = String>) -> redis::RedisResult<Vec<Option<CachedResult>>> {
        let reads = names.map(|name| {
            let mut conn = self.commands.clone();
            async move {
                redis::cmd("GET")
                    .arg(name)
                    .query_async::<Option<Vec<u8>>>(&mut conn)
                    .await
            }
        });
        let values = futures::future::try_join_all(reads).await?;
        Ok(values
            .into_iter()
            .map(|v| v.as_deref().and_then(CachedResult::decode))
            .collect())
    }

    /// The results held under a contact's entry; none unless each identity's own entry holds a result too, and
    /// for each the newer of the two; and the latest lookup of the contact among them.
    pub async fn get_contact(&self, key: &EntryKey) -> redis::RedisResult<ContactResults> {
        let fields: Vec<(String, Vec<u8>)> = redis::cmd("HGETALL")
            .arg(self.contact_entry(key))
            .query_async(&mut self.commands.clone())
            .await?;
        let lookups: Vec<String> = fields
            .iter()
            .find(|(field, _)| field == "a")
            .map(|(_, value)| {
                String::from_utf8_lossy(value.get(16..).unwrap_or_default())
                    .lines()
                    .map(str::to_owned)
                    .collect()
            })
            .unwrap_or_default();
        let held: Vec<(String, CachedResult)> = fields
            .into_iter()
            .filter(|(field, _)| field != "a")
            .filter_map(|(field, value)| Some((field, CachedResult::decode(&value)?)))
            .collect();
        let lookup = latest_lookup(held.iter().map(|(_, copy)| copy), &lookups);
        let own = self
            .read(held.iter().map(|(field, _)| format!("{}:c:{field}", self.prefix)))
            .await?;
        let results = held
            .into_iter()
            .zip(own)
            .map(|((_, copy), own)| Some(copy.or_newer(own?)))
            .collect::<Option<Vec<_>>>()
            .unwrap_or_default();
        Ok(ContactResults { results, lookup })
    }

    /// Notes that `request_id` is a lookup of `contact` itself: its entry answers once it holds one of its results.
    pub async fn looked_up(&self, contact: &EntryKey, request_id: &str) -> redis::RedisResult<()> {
        let mut invocation = self.looked_up.prepare_invoke();
        invocation
            .key(self.contact_entry(contact))
            .arg(request_id)
            .arg(ttl_ms(self.ttl.longest()))
            .arg(MAX_CONTACT_LOOKUPS);
        invoke::<i64>(&invocation, &self.commands).await.map(drop)
    }

    /// Empties identity entries `keys` and contacts' entries `contacts` with the identity entries they list,
    /// leaving the invalidation's time in each (see the module documentation; `log_ms`: the log's time as this
    /// replica last read it). Returns how many entries went.
    pub async fn remove(&self, keys: &[EntryKey], contacts: &[EntryKey], log_ms: u64) -> redis::RedisResult<u64> {
        let kept = ttl_ms(self.marks_kept);
        let mut names: Vec<String> = keys.iter().map(|k| self.entry(k)).collect();
        let mut leases: Vec<String> = keys.iter().chain(contacts).map(|k| self.lease_key(k)).collect();
        let mut removed = 0;
        for contact in contacts {
            let mut invocation = self.take_contact.prepare_invoke();
            invocation.key(self.contact_entry(contact)).arg(kept).arg(log_ms);
            let listed: Vec<String> = invoke(&invocation, &self.commands).await?;
            removed += u64::from(!listed.is_empty());
            names.extend(listed.iter().map(|field| format!("{}:c:{field}", self.prefix)));
            leases.extend(listed.iter().map(|field| format!("{}:lease:{field}", self.prefix)));
        }
        names.sort();
        names.dedup();
        // One command per key, all at once: in a cluster each may live on another slot.
        let emptied = names.into_iter().map(|name| {
            let mut invocation = self.invalidate.prepare_invoke();
            invocation.key(name).arg(kept).arg(log_ms);
            async move { invoke::<u64>(&invocation, &self.commands).await }
        });
        // The lookups of what was invalidated are not joined again: a later check asks Sinch, rather than be
        // served what they got before (their checks give back none but their own leases).
        leases.sort();
        leases.dedup();
        let forgotten = leases.into_iter().map(|lease| async move {
            redis::cmd("DEL")
                .arg(lease)
                .query_async::<u64>(&mut self.commands.clone())
                .await
        });
        let (emptied, _) = futures::future::try_join(
            futures::future::try_join_all(emptied),
            futures::future::try_join_all(forgotten),
        )
        .await?;
        Ok(removed + emptied.iter().sum::<u64>())
    }

    /// Takes the lease of `key` for `request_id` for `ttl` unless someone holds it; returns the holder, none when
    /// this call took it. A holder under `request_id` is another call's (a repeat of the check's request_id, or a
    /// run of it before): taking it for this one's would let this one give it back while that one waits on it.
    pub async fn lease(&self, key: &EntryKey, request_id: &str, ttl: Duration) -> redis::RedisResult<Option<Holder>> {
        let mut invocation = self.lease.prepare_invoke();
        invocation.key(self.lease_key(key)).arg(request_id).arg(ttl_ms(ttl));
        let held: Option<String> = invocation.invoke_async(&mut self.commands.clone()).await?;
        Ok(held.map(Holder))
    }

    /// Who holds the lease of `key`, if anyone.
    pub async fn holder(&self, key: &EntryKey) -> redis::RedisResult<Option<Holder>> {
        let holder: Option<String> = redis::cmd("GET")
            .arg(self.lease_key(key))
            .query_async(&mut self.commands.clone())
            .await?;
        Ok(holder.map(Holder))
    }

    /// Marks `request_id`'s lease of `key` sent under `accepted`, for `ttl`.
    pub async fn lease_sent(
        &self,
        key: &EntryKey,
        request_id: &str,
        accepted: &str,
        ttl: Duration,
    ) -> redis::RedisResult<()> {
        let mut invocation = self.lease_sent.prepare_invoke();
        invocation
            .key(self.lease_key(key))
            .arg(request_id)
            .arg(accepted)
            .arg(ttl_ms(ttl));
        invocation
            .invoke_async::<i64>(&mut self.commands.clone())
            .await
            .map(drop)
    }

    /// Gives back the lease of `key` if `request_id` still holds it: at once while pending, within `linger` once
    /// sent (under `sent`, the request_id Sinch answered with).
    pub async fn release(
        &self,
        key: &EntryKey,
        request_id: &str,
        sent: &str,
        linger: Duration,
    ) -> redis::RedisResult<()> {
        let mut invocation = self.release.prepare_invoke();
        invocation
            .key(self.lease_key(key))
            .arg(request_id)
            .arg(sent)
            .arg(ttl_ms(linger));
        invocation
            .invoke_async::<i64>(&mut self.commands.clone())
            .await
            .map(drop)
    }
}

/// Clears the flag of a look at the cache's key in progress when dropped.
struct Looking<'a>(&'a AtomicBool);

impl Drop for Looking<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}
