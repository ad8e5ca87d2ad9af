//! Nonces seen by this replica, for a single replica: a nonce is accepted once while its timestamp is valid.
//!
//! Each nonce is kept as a 128-bit fingerprint (SipHash under two keys drawn at start, so a sender cannot make
//! two nonces collide) with its expiry: about 60 bytes a nonce instead of two copies of the string. At 5,000
//! callbacks/s with the default 5-minute tolerance that is ≈ 90 MB, reached after one tolerance, then level.

use std::{
    cmp::Reverse,
    collections::{BinaryHeap, HashSet},
    hash::{BuildHasher, RandomState},
    sync::Mutex,
    time::Duration,
};

use tokio::time::Instant;

#[derive(Default)]
pub struct Nonces {
    keys: (RandomState, RandomState),
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    seen: HashSet<u128>,
    /// The fingerprints by expiry, soonest first, to forget them once their timestamps are out of tolerance.
    expiries: BinaryHeap<Reverse<(Instant, u128)>>,
}

impl Nonces {
    /// Claims `nonce` for `remember_for`: true the first time, false while it is remembered.
    pub fn claim(&self, nonce: &str, remember_for: Duration) -> bool {
        let now = Instant::now();
        let fingerprint = (u128::from(self.keys.0.hash_one(nonce)) << 64) | u128::from(self.keys.1.hash_one(nonce));
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
        state.expiries.push(Reverse((now + remember_for, fingerprint)));
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
