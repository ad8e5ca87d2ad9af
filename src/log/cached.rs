//! What the capability cache keeps of a result, in process or in Redis, and how its entries are named.
//!
//! An entry is one result (a channel identity's) or a contact's results. Entries are named by a keyed hash
//! (HMAC-SHA-256, first 16 bytes) of the app and the identity or contact: no raw phone number is ever a key.

use std::time::Duration;

use hmac::{KeyInit, Mac};
use sha2::Sha256;

use super::codec;
use crate::capability::{CacheTtl, Channel, Notification};

/// A cached result: the notification as a hub sends it, and when it arrived and stops being trusted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CachedResult {
    /// When the result reached this service from Sinch, by the log's clock (its entry's time: with Redis, Redis's
    /// clock at its append), in milliseconds since the Unix epoch.
    pub checked_at_ms: u64,
    /// When the result stops being trusted (its status's time to live after `checked_at_ms`).
    pub expires_at_ms: u64,
    /// Its offset within the query that produced it.
    pub offset: u64,
    /// The query that produced it.
    pub request_id: String,
    /// The contract's `CapabilityNotification` without `offset` and `request_id`, `receive_time` included.
    pub body: Vec<u8>,
}

/// The fixed part of an encoded [`CachedResult`]: two times and the offset, 8 bytes each, big-endian (so that
/// comparing the first 8 bytes of two encodings compares their `checked_at_ms`), then the request_id's length.
const HEAD: usize = 26;

impl CachedResult {
    /// The newer of two results of one identity (this one when as new).
    pub fn or_newer(self, other: CachedResult) -> CachedResult {
        if other.checked_at_ms > self.checked_at_ms {
            other
        } else {
            self
        }
    }

    /// The cache's form of `notification`, appended to the log at `offset` and `time_ms` with `body` (as a hub
    /// keeps it, without receive time); `None` when results of its status are not cached.
    pub fn of(
        notification: &Notification,
        offset: u64,
        time_ms: u64,
        body: &[u8],
        ttl: &CacheTtl,
    ) -> Option<CachedResult> {
        let ttl = ttl.of(&notification.capability_status)?;
        let mut body = body.to_vec();
        codec::put_receive_time(time_ms, &mut body);
        Some(CachedResult {
            checked_at_ms: time_ms,
            expires_at_ms: time_ms.saturating_add(ttl.as_millis() as u64),
            offset,
            request_id: notification.request_id.clone(),
            body,
        })
    }

    /// Whether it may answer a check made at `now_ms` that accepts results up to `max_age` old.
    pub fn fresh(&self, now_ms: u64, max_age: Duration) -> bool {
        self.expires_at_ms > now_ms
            && !max_age.is_zero()
            && now_ms.saturating_sub(self.checked_at_ms) <= max_age.as_millis() as u64
    }

    /// Whether it is the answer of the query `request_id` and too old for a check accepting `max_age`: joining
    /// that query would serve it again.
    pub fn stale_answer_of(&self, request_id: &str, now_ms: u64, max_age: Duration) -> bool {
        self.request_id == request_id && !self.fresh(now_ms, max_age)
    }

    /// How long it is kept from `now_ms`; `None` once expired.
    pub fn remaining(&self, now_ms: u64) -> Option<Duration> {
        Some(Duration::from_millis(self.expires_at_ms.checked_sub(now_ms)?)).filter(|d| !d.is_zero())
    }

    /// The result as a domain notification (its channel, identity and status).
    pub fn notification(&self) -> Option<Notification> {
        codec::decode_body(self.request_id.clone(), &self.body).ok()
    }

    /// Its bytes in Redis.
    pub fn encode(&self) -> Vec<u8> {
        let id = self.request_id.as_bytes();
        let id_len = id.len().min(u16::MAX as usize);
        let mut bytes = Vec::with_capacity(HEAD + id_len + self.body.len());
        bytes.extend_from_slice(&self.checked_at_ms.to_be_bytes());
        bytes.extend_from_slice(&self.expires_at_ms.to_be_bytes());
        bytes.extend_from_slice(&self.offset.to_be_bytes());
        bytes.extend_from_slice(&(id_len as u16).to_be_bytes());
        bytes.extend_from_slice(&id[..id_len]);
        bytes.extend_from_slice(&self.body);
        bytes
    }

    /// Reads what [`CachedResult::encode`] wrote; `None` for bytes it did not write.
    pub fn decode(bytes: &[u8]) -> Option<CachedResult> {
        let number = |at: usize| u64::from_be_bytes(bytes[at..at + 8].try_into().expect("8 bytes"));
        if bytes.len() < HEAD {
            return None;
        }
        let id_len = u16::from_be_bytes([bytes[24], bytes[25]]) as usize;
        let id = bytes.get(HEAD..HEAD + id_len)?;
        Some(CachedResult {
            checked_at_ms: number(0),
            expires_at_ms: number(8),
            offset: number(16),
            request_id: String::from_utf8(id.to_vec()).ok()?,
            body: bytes[HEAD + id_len..].to_vec(),
        })
    }
}

/// How many lookups of a contact (contact_id queries) its cache entry remembers.
pub const MAX_CONTACT_LOOKUPS: usize = 4;

/// The lookup of the contact itself (one of its latest `lookups`) whose result is the newest among `held`, if any:
/// see [`ContactResults::lookup`].
pub fn latest_lookup<'a, L: AsRef<str>>(held: impl Iterator<Item = &'a CachedResult>, lookups: &[L]) -> Option<Lookup> {
    held.filter(|result| lookups.iter().any(|lookup| lookup.as_ref() == result.request_id))
        .max_by_key(|result| result.checked_at_ms)
        .map(|result| Lookup {
            request_id: result.request_id.clone(),
            last_result_ms: result.checked_at_ms,
        })
}

/// A lookup of a contact itself (a contact_id query), as its entry knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lookup {
    pub request_id: String,
    /// When its newest result in the entry came, in milliseconds since the Unix epoch (by the log's clock).
    pub last_result_ms: u64,
}

/// A contact's cached results.
#[derive(Debug, Clone, Default)]
pub struct ContactResults {
    pub results: Vec<CachedResult>,
    /// The lookup of the contact itself (one of its latest contact_id queries) whose result is the newest among
    /// them. Without one they are not the contact's answer: results of identity queries that name the contact are
    /// among them too, but are not alone the contact's channels. With one, they are once it has settled (no result
    /// for the checks' settle time): until then more of its channels may come.
    pub lookup: Option<Lookup>,
}

/// The name of a cache entry or lease: a keyed hash of what it is about.
pub type EntryKey = [u8; 16];

/// Names cache entries with a keyed hash.
#[derive(Clone)]
pub struct KeyHasher {
    mac: hmac::Hmac<Sha256>,
}

impl KeyHasher {
    /// A hasher keyed with `key`.
    pub fn new(key: &[u8]) -> KeyHasher {
        KeyHasher {
            mac: hmac::Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes keys of any length"),
        }
    }

    /// A hasher with a random key, for a cache only this process sees.
    pub fn random() -> KeyHasher {
        KeyHasher::new(&rand::random::<[u8; 32]>())
    }

    fn hash(&self, parts: &[&[u8]]) -> EntryKey {
        let mut mac = self.mac.clone();
        for part in parts {
            // Each part's length first, so that no two different lists of parts hash alike.
            mac.update(&(part.len() as u64).to_be_bytes());
            mac.update(part);
        }
        mac.finalize().into_bytes()[..16].try_into().expect("16 bytes")
    }

    /// The entry of a channel identity's result in `app_id`.
    pub fn identity(&self, app_id: &str, channel: &Channel, identity: &str) -> EntryKey {
        self.hash(&[
            b"i",
            app_id.as_bytes(),
            channel.as_sinch().as_bytes(),
            identity.as_bytes(),
        ])
    }

    /// The entry of a contact's results in `app_id`.
    pub fn contact(&self, app_id: &str, contact_id: &str) -> EntryKey {
        self.hash(&[b"c", app_id.as_bytes(), contact_id.as_bytes()])
    }
}

/// An entry key as text, for Redis keys.
pub fn hex(key: &EntryKey) -> String {
    key.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn result(checked_at_ms: u64) -> CachedResult {
        CachedResult {
            checked_at_ms,
            expires_at_ms: checked_at_ms + 1000,
            offset: 3,
            request_id: "01JREQ".into(),
            body: vec![1, 2, 3],
        }
    }

    #[test]
    fn an_encoded_result_reads_back_and_its_first_bytes_order_by_age() {
        let (older, newer) = (result(999).encode(), result(1_000).encode());
        assert_eq!(CachedResult::decode(&newer), Some(result(1_000)));
        assert!(older[..8] < newer[..8]);
        assert_eq!(CachedResult::decode(&newer[..10]), None);
    }

    #[test]
    fn freshness_needs_both_the_ttl_and_the_max_age() {
        let r = result(10_000);
        assert!(r.fresh(10_500, Duration::from_secs(1)));
        assert!(!r.fresh(10_500, Duration::from_millis(100)), "older than max_age");
        assert!(!r.fresh(11_000, Duration::from_secs(60)), "expired");
        assert!(!r.fresh(10_000, Duration::ZERO), "max_age 0 asks Sinch");
    }

    #[test]
    fn keys_depend_on_the_key_and_on_every_part() {
        let (a, b) = (KeyHasher::new(b"one"), KeyHasher::new(b"two"));
        let id = |h: &KeyHasher, app: &str, who: &str| h.identity(app, &Channel::Sms, who);
        assert_ne!(id(&a, "app", "46700000001"), id(&b, "app", "46700000001"));
        assert_ne!(id(&a, "app", "46700000001"), id(&a, "app2", "46700000001"));
        assert_ne!(id(&a, "ap", "p46700000001"), id(&a, "app", "46700000001"));
        assert_ne!(a.contact("app", "46700000001"), id(&a, "app", "46700000001"));
        assert_eq!(id(&a, "app", "46700000001"), id(&a.clone(), "app", "46700000001"));
    }
}
