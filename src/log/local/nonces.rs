//! Nonces seen by this replica, for a single replica: a nonce is accepted once while its timestamp is valid.
//!
//! Each nonce is kept as a 128-bit fingerprint (SipHash under two keys drawn at start, so a sender cannot make
//! two nonces collide), in a set of those that expire in the same [`BUCKET`]-second slot; a slot's set is dropped
//! whole once its time has passed, so a nonce costs its 16 bytes and the set's slack (about 25 bytes in all)
//! instead of two copies of the string and an expiry index. At 5,000 callbacks/s with the default 5-minute
//! tolerance that is ≈ 75 MB, reached after one tolerance, then level. A nonce is remembered up to one slot
//! longer than asked, which only makes a replay wait longer to be accepted (by then its timestamp is refused).

use std::{collections::VecDeque, sync::Mutex, time::Duration};

use tokio::time::Instant;

use crate::log::{KeyedHash, KeyedSet};

/// The width of an expiry slot, in seconds.
const BUCKET: u32 = 30;

pub struct Nonces {
    keys: KeyedHash,
    /// Expiries count whole seconds from here.
    start: Instant,
    /// By the end of their slot (seconds after `start`), ascending.
    slots: Mutex<VecDeque<Slot>>,
}

/// The nonces whose memory ends at `until`.
struct Slot {
    until: u32,
    seen: KeyedSet,
}

impl Default for Nonces {
    fn default() -> Nonces {
        Nonces {
            keys: KeyedHash::default(),
            start: Instant::now(),
            slots: Mutex::default(),
        }
    }
}

impl Nonces {
    /// Claims `nonce` for at least `remember_for`: true the first time, false while it is remembered.
    pub fn claim(&self, nonce: &str, remember_for: Duration) -> bool {
        let elapsed = self.start.elapsed();
        let now = elapsed.as_secs() as u32;
        let fingerprint = self.keys.of(nonce);
        let mut slots = self.slots.lock().expect("nonce lock poisoned");
        while slots.front().is_some_and(|slot| slot.until <= now) {
            slots.pop_front();
        }
        if slots.iter().any(|slot| slot.seen.contains(&fingerprint)) {
            return false;
        }
        let expiry = (elapsed + remember_for).as_secs_f64().ceil() as u32;
        let until = expiry.div_ceil(BUCKET).saturating_mul(BUCKET).max(now + 1);
        let at = slots.partition_point(|slot| slot.until < until);
        if slots.get(at).is_none_or(|slot| slot.until != until) {
            slots.insert(
                at,
                Slot {
                    until,
                    seen: KeyedSet::default(),
                },
            );
        }
        slots[at].seen.insert(fingerprint);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_nonce_is_accepted_once_while_it_is_remembered() {
        let nonces = Nonces::default();
        assert!(nonces.claim("a", Duration::from_secs(600)));
        assert!(!nonces.claim("a", Duration::from_secs(600)));
        assert!(nonces.claim("b", Duration::from_secs(1)));
        tokio::time::advance(Duration::from_secs(2)).await;
        assert!(!nonces.claim("a", Duration::from_secs(600)), "still remembered");
        assert!(
            !nonces.claim("b", Duration::from_secs(1)),
            "remembered to the end of its slot"
        );
        tokio::time::advance(Duration::from_secs(u64::from(BUCKET))).await;
        assert!(
            nonces.claim("b", Duration::from_secs(1)),
            "forgotten once its slot passed"
        );
        tokio::time::advance(Duration::from_secs(600)).await;
        assert!(
            nonces.claim("a", Duration::from_secs(600)),
            "forgotten once its time passed"
        );
        let held: usize = nonces.slots.lock().unwrap().iter().map(|slot| slot.seen.len()).sum();
        assert_eq!(held, 1, "expired fingerprints are dropped");
    }
}
