//! Open watches on the replica (`CAPABILITY_MAX_WATCHES`, WatchBulkCheck streams included), and per connection
//! and per caller, so that one greedy client cannot take the replica's whole watch budget. A caller is who
//! authenticated (its bearer token, else its client certificate), else its address. Health checks are another
//! service and never count.

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{Arc, Mutex},
};

use sha2::{Digest, Sha256};
use tokio::sync::Semaphore;
use tonic::{Request, Status, transport::server::TlsConnectInfo};

use super::{Peer, status};

/// Which bearer token a call presented (its place in `CAPABILITY_GRPC_TOKENS`), set by the authentication
/// interceptor.
#[derive(Debug, Clone, Copy)]
pub struct TokenIndex(pub usize);

/// Who holds watches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Holder {
    Connection(u64),
    Token(usize),
    /// The first half of the client certificate's SHA-256 (half of a holder's size, and collisions stay out of
    /// reach).
    Certificate([u8; 16]),
    Address(IpAddr),
}

/// The limits and what each holder holds.
pub struct WatchQuota {
    max_watches: u64,
    /// One permit per open watch of the replica, held by its ticket.
    open: Semaphore,
    per_connection: u64,
    per_caller: u64,
    held: Mutex<HashMap<Holder, u64>>,
}

impl WatchQuota {
    pub fn new(max_watches: u64, per_connection: u64, per_caller: u64) -> WatchQuota {
        let permits = usize::try_from(max_watches)
            .unwrap_or(usize::MAX)
            .min(Semaphore::MAX_PERMITS);
        WatchQuota {
            max_watches,
            open: Semaphore::new(permits),
            per_connection,
            per_caller,
            held: Mutex::new(HashMap::new()),
        }
    }

    /// A place for one more watch on the replica and, with `holders`, for its caller on its connection; or
    /// RESOURCE_EXHAUSTED naming the limit reached. Without `holders` (a call that did not come through a guarded
    /// listener) only the replica's limit applies.
    pub fn claim(self: &Arc<Self>, holders: Option<(u64, Holder)>) -> Result<QuotaTicket, Status> {
        let Some((connection_id, caller)) = holders else {
            self.take_open()?;
            return Ok(QuotaTicket {
                quota: self.clone(),
                holders: None,
            });
        };
        let connection = Holder::Connection(connection_id);
        let mut held = self.held.lock().expect("the quota lock");
        let count = |holder: &Holder| held.get(holder).copied().unwrap_or(0);
        if count(&connection) >= self.per_connection {
            return Err(status::too_many_watches_on_connection(self.per_connection));
        }
        if count(&caller) >= self.per_caller {
            return Err(status::too_many_watches_of_caller(self.per_caller));
        }
        self.take_open()?;
        for holder in [connection, caller] {
            *held.entry(holder).or_default() += 1;
        }
        Ok(QuotaTicket {
            quota: self.clone(),
            holders: Some((connection_id, caller)),
        })
    }

    /// Takes one of the replica's places, given back by the ticket made with it.
    fn take_open(&self) -> Result<(), Status> {
        self.open
            .try_acquire()
            .map(|permit| permit.forget())
            .map_err(|_| status::too_many_watches(self.max_watches))
    }
}

/// One watch's place under the limits; given back when dropped. Its connection is kept as its id alone, and its
/// place on the replica as the ticket itself: every open watch holds one, and an idle watch is counted in bytes.
pub struct QuotaTicket {
    quota: Arc<WatchQuota>,
    holders: Option<(u64, Holder)>,
}

impl Drop for QuotaTicket {
    fn drop(&mut self) {
        self.quota.open.add_permits(1);
        let Some((connection, caller)) = self.holders else {
            return;
        };
        let mut held = self.quota.held.lock().expect("the quota lock");
        for holder in [Holder::Connection(connection), caller] {
            if let Some(count) = held.get_mut(&holder) {
                *count -= 1;
                if *count == 0 {
                    held.remove(&holder);
                }
            }
        }
    }
}

/// The connection of `request` (its id) and its caller: the token it presented, else its client certificate, else
/// the peer's address.
pub fn holders<T>(request: &Request<T>) -> Option<(u64, Holder)> {
    let extensions = request.extensions();
    let tls = extensions.get::<TlsConnectInfo<Peer>>();
    let peer = Peer::of(extensions)?;
    let certificate = || {
        let certs = tls?.peer_certs()?;
        let leaf = certs.first()?;
        let digest = Sha256::digest(leaf.as_ref());
        Some(Holder::Certificate(
            digest[..16].try_into().expect("a SHA-256 is 32 bytes"),
        ))
    };
    let caller = extensions
        .get::<TokenIndex>()
        .map(|t| Holder::Token(t.0))
        .or_else(certificate)
        .unwrap_or(Holder::Address(peer.remote.ip()));
    Some((peer.activity.id(), caller))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refusal(result: Result<impl Sized, Status>) -> String {
        match result {
            Ok(_) => panic!("a place past the limit"),
            Err(status) => {
                assert_eq!(status.code(), tonic::Code::ResourceExhausted);
                status.message().to_owned()
            }
        }
    }

    #[test]
    fn the_replicas_limit_counts_every_stream_and_a_closed_one_gives_its_place_back() {
        let quota = Arc::new(WatchQuota::new(3, 10, 10));
        let caller = Some((1, Holder::Token(0)));
        let watch = quota.claim(caller).unwrap();
        let unguarded = quota.claim(None).unwrap();
        let second_unguarded = quota.claim(None).unwrap();
        assert!(refusal(quota.claim(caller)).contains("(CAPABILITY_MAX_WATCHES)"));
        assert!(refusal(quota.claim(None)).contains("(CAPABILITY_MAX_WATCHES)"));
        drop(watch);
        let again = quota.claim(caller).unwrap();
        drop((unguarded, second_unguarded));
        let _two_more = (
            quota.claim(Some((2, Holder::Token(1)))).unwrap(),
            quota.claim(None).unwrap(),
        );
        assert!(refusal(quota.claim(None)).contains("(CAPABILITY_MAX_WATCHES)"));
        drop(again);
        assert_eq!(*quota.held.lock().unwrap().get(&Holder::Connection(1)).unwrap_or(&0), 0);
    }

    #[test]
    fn a_refused_claim_takes_no_place() {
        let quota = Arc::new(WatchQuota::new(2, 1, 10));
        let _first = quota.claim(Some((1, Holder::Token(0)))).unwrap();
        assert!(refusal(quota.claim(Some((1, Holder::Token(0))))).contains("PER_CONNECTION"));
        let _second = quota.claim(Some((2, Holder::Token(0)))).unwrap();
        assert!(refusal(quota.claim(Some((3, Holder::Token(0))))).contains("(CAPABILITY_MAX_WATCHES)"));
        assert_eq!(quota.held.lock().unwrap().get(&Holder::Token(0)), Some(&2));
    }
}
