//! Nonces seen by this replica, for a single replica: a nonce is accepted once while its timestamp is valid.
//!
//! Each nonce is kept as a 128-bit fingerprint (SipHash under two keys drawn at start, so a sender cannot make
//! two nonces collide) with its expiry in whole seconds: about 45 bytes a nonce instead of two copies of the
//! string. At 5,000 callbacks/s with the default 5-minute tolerance that is ≈ 70 MB, reached after one
//! tolerance, then level.

use std::{
    cmp::Reverse,
    collections::{BinaryHeap, HashSet},
    hash::{BuildHasher, RandomState},
    sync::Mutex,
    time::Duration,
};

use tokio::time::Instant;

pub struct Nonces {
    keys: (RandomState, RandomState),
    /// Expiries count whole seconds from here.
    start: Instant,
    state: Mutex<State>,
}

/// A nonce's fingerprint: two 64-bit halves (8-byte aligned, where a `u128` would pad every entry to 16).
type Fingerprint = [u64; 2];

#[derive(Default)]
struct State {
    seen: HashSet<Fingerprint>,
    /// The fingerprints by expiry (seconds after `start`), soonest first, to forget them once their timestamps
    /// are out of tolerance.
    expiries: BinaryHeap<Reverse<(u32, Fingerprint)>>,
}

impl Default for Nonces {
    fn default() -> Nonces {
        Nonces {
            keys: (RandomState::new(), RandomState::new()),
            start: Instant::now(),
            state: Mutex::default(),
        }
    }
}

impl Nonces {
    /// Claims `nonce` for `remember_for` (rounded up to whole seconds): true the first time, false while it is
    /// remembered.
    pub fn claim(&self, nonce: &str, remember_for: Duration) -> bool {
        let elapsed = self.start.elapsed();
        let now = elapsed.as_secs() as u32;
        let fingerprint = [self.keys.0.hash_one(nonce), self.keys.1.hash_one(nonce)];
        let mut state = self.state.lock().expect("nonce lock poisoned");
        while let Some(Reverse((expiry, _))) = state.expiries.peek()
            && *expiry <= now
        {
            let Reverse((_, old)) = state.expiries.pop().expect("peeked");
            state.seen.remove(&old);
        }
        if !state.seen.insert(fingerprint) {
            return false;
        }
        let expiry = (elapsed + remember_for).as_secs_f64().ceil() as u32;
        state.expiries.push(Reverse((expiry, fingerprint)));
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
            nonces.claim("b", Duration::from_secs(1)),
            "forgotten once its time passed"
        );
        tokio::time::advance(Duration::from_secs(600)).await;
        assert!(
            nonces.claim("a", Duration::from_secs(600)),
            "forgotten once its time passed"
        );
        assert_eq!(
            nonces.state.lock().unwrap().seen.len(),
            1,
            "expired fingerprints are dropped"
        );
    }
}
