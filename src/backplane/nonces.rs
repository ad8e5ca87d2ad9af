//! Nonces seen by this replica within the signature window, for a single replica: a nonce is accepted once.

use std::{
    collections::{HashSet, VecDeque},
    sync::Mutex,
    time::Duration,
};

use tokio::time::Instant;

/// The nonces of this replica's last `window`; a nonce older than that fails the timestamp check anyway.
pub struct Nonces {
    window: Duration,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    seen: HashSet<String>,
    /// Nonces in the order they were claimed, to forget them when the window passes.
    order: VecDeque<(Instant, String)>,
}

impl Nonces {
    pub fn new(window: Duration) -> Nonces {
        Nonces {
            window,
            state: Mutex::default(),
        }
    }

    /// Claims `nonce`: true the first time within the window, false after.
    pub fn claim(&self, nonce: &str) -> bool {
        let now = Instant::now();
        let mut state = self.state.lock().expect("nonce lock poisoned");
        while let Some((at, _)) = state.order.front()
            && now.duration_since(*at) > self.window
        {
            let (_, old) = state.order.pop_front().expect("front exists");
            state.seen.remove(&old);
        }
        if !state.seen.insert(nonce.to_owned()) {
            return false;
        }
        state.order.push_back((now, nonce.to_owned()));
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_nonce_is_accepted_once_within_the_window() {
        let nonces = Nonces::new(Duration::from_secs(600));
        assert!(nonces.claim("a"));
        assert!(!nonces.claim("a"));
        assert!(nonces.claim("b"));
        tokio::time::advance(Duration::from_secs(601)).await;
        assert!(nonces.claim("a"), "forgotten once the window passed");
        assert_eq!(nonces.state.lock().unwrap().seen.len(), 1);
    }
}
