//! The capability cache and the coalescing leases in Redis, shared by every replica.
//!
//! | key | what |
//! |---|---|
//! | `prefix:cache-key` | the key of the keyed hash that names the others, when `CAPABILITY_CACHE_HASH_KEY` is unset |
//! | `prefix:c:<hash>` | a channel identity's latest result, expiring with its status's time to live |
//! | `prefix:cc:<hash>` | a contact's results: field = the identity's `<hash>`, value = its result; expires with the last |
//! | `prefix:lease:<hash>` | the request_id of the live query in flight for an identity or contact |
//!
//! No key has a hash tag: entries spread over a cluster's slots, and every script touches one key.

use std::time::Duration;

use redis::Script;
use tokio::sync::OnceCell;

use super::{Connection, retried, ttl_ms};
use crate::{
    capability::{CacheTtl, Notification},
    log::{
        cached::{CachedResult, EntryKey, KeyHasher, hex},
        codec, wall_clock_ms,
    },
    secret::Secret,
};

/// The most results one contact entry holds (a contact has a few channel identities).
const MAX_CONTACT_RESULTS: u32 = 64;

/// Stores a result unless the entry holds a newer one. KEYS: entry. ARGV: encoded result, time to live (ms).
const STORE: &str = r"
local cur = redis.call('GET', KEYS[1])
if cur and string.sub(cur, 1, 8) > string.sub(ARGV[1], 1, 8) then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
";

/// Stores a result in a contact's entry unless it holds a newer one for the identity; the entry lives as long
/// as its longest-lived result. KEYS: contact entry. ARGV: field, encoded result, time to live (ms), most fields.
const STORE_CONTACT: &str = r"
local cur = redis.call('HGET', KEYS[1], ARGV[1])
if cur and string.sub(cur, 1, 8) > string.sub(ARGV[2], 1, 8) then return 0 end
if not cur and redis.call('HLEN', KEYS[1]) >= tonumber(ARGV[4]) then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
if redis.call('PTTL', KEYS[1]) < tonumber(ARGV[3]) then redis.call('PEXPIRE', KEYS[1], ARGV[3]) end
return 1
";

/// Takes a lease unless someone holds it. KEYS: lease. ARGV: request_id, time to live (ms). Returns the holder.
const LEASE: &str = r"
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return ARGV[1] end
return redis.call('GET', KEYS[1]) or ARGV[1]
";

/// Gives a lease back if it is still ours. KEYS: lease. ARGV: request_id.
const RELEASE: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
";

/// See the module documentation.
pub struct RedisCache {
    commands: Connection,
    prefix: String,
    ttl: CacheTtl,
    configured_key: Option<Secret>,
    hasher: OnceCell<KeyHasher>,
    store: Script,
    store_contact: Script,
    lease: Script,
    release: Script,
}

impl RedisCache {
    pub(super) fn new(commands: Connection, prefix: String, ttl: CacheTtl, key: Option<Secret>) -> RedisCache {
        RedisCache {
            commands,
            prefix,
            ttl,
            configured_key: key,
            hasher: OnceCell::new(),
            store: Script::new(STORE),
            store_contact: Script::new(STORE_CONTACT),
            lease: Script::new(LEASE),
            release: Script::new(RELEASE),
        }
    }

    /// The hasher every replica names entries with: the configured key's, else the one kept in Redis (made by
    /// the first replica that needed it).
    pub async fn hasher(&self) -> redis::RedisResult<&KeyHasher> {
        self.hasher
            .get_or_try_init(|| async {
                if let Some(key) = &self.configured_key {
                    return Ok(KeyHasher::new(key.expose().as_bytes()));
                }
                let name = format!("{}:cache-key", self.prefix);
                let fresh = hex(&rand::random::<EntryKey>());
                let mut conn = self.commands.clone();
                let _: Option<String> = redis::cmd("SET")
                    .arg(&name)
                    .arg(&fresh)
                    .arg("NX")
                    .query_async(&mut conn)
                    .await?;
                let key: Option<String> = redis::cmd("GET").arg(&name).query_async(&mut conn).await?;
                Ok(KeyHasher::new(key.unwrap_or(fresh).as_bytes()))
            })
            .await
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
    /// contact. The time of the result is this replica's.
    pub(super) async fn store(&self, notification: &Notification, offset: u64) -> redis::RedisResult<()> {
        let now = wall_clock_ms();
        let Some(result) = CachedResult::of(notification, offset, now, &codec::encode_body(notification), &self.ttl)
        else {
            return Ok(());
        };
        let ttl = ttl_ms(Duration::from_millis(result.expires_at_ms - now));
        let hasher = self.hasher().await?;
        let (app, channel) = (&notification.app_id, &notification.channel);
        let identity = hasher.identity(app, channel, &notification.identity);
        let value = result.encode();
        let mut invocation = self.store.prepare_invoke();
        invocation.key(self.entry(&identity)).arg(value.as_slice()).arg(ttl);
        retried(
            |mut conn| {
                let invocation = &invocation;
                async move { invocation.invoke_async::<i64>(&mut conn).await }
            },
            &self.commands,
        )
        .await?;
        if !notification.contact_id.is_empty() {
            let mut invocation = self.store_contact.prepare_invoke();
            invocation
                .key(self.contact_entry(&hasher.contact(app, &notification.contact_id)))
                .arg(hex(&identity))
                .arg(value.as_slice())
                .arg(ttl)
                .arg(MAX_CONTACT_RESULTS);
            retried(
                |mut conn| {
                    let invocation = &invocation;
                    async move { invocation.invoke_async::<i64>(&mut conn).await }
                },
                &self.commands,
            )
            .await?;
        }
        Ok(())
    }

    /// The results held under identity entries `keys`, in their order.
    pub async fn get(&self, keys: &[EntryKey]) -> redis::RedisResult<Vec<Option<CachedResult>>> {
        let mut pipe = redis::pipe();
        for key in keys {
            pipe.cmd("GET").arg(self.entry(key));
        }
        let values: Vec<Option<Vec<u8>>> = pipe.query_async(&mut self.commands.clone()).await?;
        Ok(values
            .into_iter()
            .map(|v| v.as_deref().and_then(CachedResult::decode))
            .collect())
    }

    /// The results held under a contact's entry.
    pub async fn get_contact(&self, key: &EntryKey) -> redis::RedisResult<Vec<CachedResult>> {
        let values: Vec<Vec<u8>> = redis::cmd("HVALS")
            .arg(self.contact_entry(key))
            .query_async(&mut self.commands.clone())
            .await?;
        Ok(values.iter().filter_map(|v| CachedResult::decode(v)).collect())
    }

    /// Removes identity entries `keys` and, when given, a contact's entry with the identity entries it lists.
    /// Returns how many entries went.
    pub async fn remove(&self, keys: &[EntryKey], contact: Option<&EntryKey>) -> redis::RedisResult<u64> {
        let mut conn = self.commands.clone();
        let mut names: Vec<String> = keys.iter().map(|k| self.entry(k)).collect();
        if let Some(contact) = contact {
            let entry = self.contact_entry(contact);
            let listed: Vec<String> = redis::cmd("HKEYS").arg(&entry).query_async(&mut conn).await?;
            names.extend(listed.iter().map(|field| format!("{}:c:{field}", self.prefix)));
            names.push(entry);
        }
        names.sort();
        names.dedup();
        // One DEL per key: in a cluster each may live on another slot.
        let mut pipe = redis::pipe();
        for name in &names {
            pipe.cmd("DEL").arg(name);
        }
        let removed: Vec<u64> = pipe.query_async(&mut conn).await?;
        Ok(removed.iter().sum())
    }

    /// Takes the lease of `key` for `request_id` for `ttl` unless another request_id holds it; returns the
    /// holder.
    pub async fn lease(&self, key: &EntryKey, request_id: &str, ttl: Duration) -> redis::RedisResult<String> {
        let mut invocation = self.lease.prepare_invoke();
        invocation.key(self.lease_key(key)).arg(request_id).arg(ttl_ms(ttl));
        invocation.invoke_async(&mut self.commands.clone()).await
    }

    /// Gives back the lease of `key` if `request_id` still holds it.
    pub async fn release(&self, key: &EntryKey, request_id: &str) -> redis::RedisResult<()> {
        let mut invocation = self.release.prepare_invoke();
        invocation.key(self.lease_key(key)).arg(request_id);
        invocation
            .invoke_async::<i64>(&mut self.commands.clone())
            .await
            .map(drop)
    }
}
