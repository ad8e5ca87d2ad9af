//! Open watches per connection and per caller, so that one greedy client cannot take the replica's whole watch
//! budget (`CAPABILITY_MAX_WATCHES`). A caller is who authenticated (its bearer token, else its client
//! certificate), else its address. Health checks are another service and never count.

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{Arc, Mutex},
};

use sha2::{Digest, Sha256};
use tonic::{Request, Status, transport::server::TlsConnectInfo};

use super::Peer;

/// Which bearer token a call presented (its place in `CAPABILITY_GRPC_TOKENS`), set by the authentication
/// interceptor.
#[derive(Debug, Clone, Copy)]
pub struct TokenIndex(pub usize);

/// Who holds watches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Holder {
    Connection(u64),
    Token(usize),
    /// The SHA-256 of the client certificate.
    Certificate([u8; 32]),
    Address(IpAddr),
}

/// The limits and what each holder holds.
pub struct WatchQuota {
    per_connection: u64,
    per_caller: u64,
    held: Mutex<HashMap<Holder, u64>>,
}

impl WatchQuota {
    pub fn new(per_connection: u64, per_caller: u64) -> WatchQuota {
        WatchQuota {
            per_connection,
            per_caller,
            held: Mutex::new(HashMap::new()),
        }
    }

    /// A place for one more watch of the caller of `request` on its connection, or RESOURCE_EXHAUSTED naming
    /// the limit reached. A call that did not come through a guarded listener (none does) is not limited.
    pub fn claim(self: &Arc<Self>, holders: Option<(u64, Holder)>) -> Result<Option<QuotaTicket>, Status> {
        let Some((connection_id, caller)) = holders else {
            return Ok(None);
        };
        let connection = Holder::Connection(connection_id);
        let mut held = self.held.lock().expect("the quota lock");
        let count = |holder: &Holder| held.get(holder).copied().unwrap_or(0);
        if count(&connection) >= self.per_connection {
            return Err(Status::resource_exhausted(format!(
                "this connection already holds {} open watches, the most CAPABILITY_MAX_WATCHES_PER_CONNECTION \
                 allows; close some or open another connection",
                self.per_connection
            )));
        }
        if count(&caller) >= self.per_caller {
            return Err(Status::resource_exhausted(format!(
                "this caller already holds {} open watches, the most CAPABILITY_MAX_WATCHES_PER_CALLER allows; \
                 close some first",
                self.per_caller
            )));
        }
        for holder in [connection, caller] {
            *held.entry(holder).or_default() += 1;
        }
        Ok(Some(QuotaTicket {
            quota: self.clone(),
            connection: connection_id,
            caller,
        }))
    }
}

/// One watch's place under the limits; given back when dropped. Its connection is kept as its id alone: every
/// open watch holds a ticket.
pub struct QuotaTicket {
    quota: Arc<WatchQuota>,
    connection: u64,
    caller: Holder,
}

impl Drop for QuotaTicket {
    fn drop(&mut self) {
        let mut held = self.quota.held.lock().expect("the quota lock");
        for holder in [Holder::Connection(self.connection), self.caller] {
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
        Some(Holder::Certificate(Sha256::digest(leaf.as_ref()).into()))
    };
    let caller = extensions
        .get::<TokenIndex>()
        .map(|t| Holder::Token(t.0))
        .or_else(certificate)
        .unwrap_or(Holder::Address(peer.remote.ip()));
    Some((peer.activity.id(), caller))
}
