//! Where verified events go, and the state replicas share.
//!
//! With one replica ([`Backplane::Local`]) a notification goes straight into the hub and nonces are remembered
//! in memory. With Redis ([`Backplane::Redis`]) every event — query records and notifications — is `XADD`ed to
//! one stream, and each replica's reader feeds its own hub in stream order, so every replica holds every
//! retained event with the same offsets; nonces and idempotency records live in Redis too.

mod nonces;
mod redis_stream;

use std::{sync::Arc, time::Duration};

use tokio_util::sync::CancellationToken;

use crate::{
    capability::{Notification, QueryAccepted},
    hub::Hub,
};
use nonces::Nonces;
pub use redis_stream::{RedisBackplane, RedisConfig};

/// A signed callback's nonce, and how long it must be remembered: as long as its timestamp would still pass the
/// tolerance check (after that a replay fails on its timestamp anyway).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Nonce<'a> {
    pub value: &'a str,
    pub remember_for: Duration,
}

/// What became of an accepted callback.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accepted {
    /// Handed on: visible to every replica.
    Published,
    /// The nonce was used before: refused.
    Replayed,
}

/// The backplane could not take the event; the callback must not be acknowledged.
#[derive(Debug, Clone, thiserror::Error)]
#[error("the backplane is unavailable: {0}")]
pub struct Unavailable(pub String);

/// The shared state of a caller-chosen request_id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IdempotencyClaim {
    /// Nobody has sent this query: the caller sends it, then records the answer (or releases the claim).
    Owner,
    /// Another replica is sending it now.
    Pending,
    /// Already answered.
    Answered(QueryAccepted),
    /// The request_id was used for a different query.
    Conflict,
}

/// Where events go.
pub enum Backplane {
    /// One replica: straight into the hub.
    Local {
        hub: Arc<Hub>,
        nonces: Nonces,
        /// Cancelled when the replica starts shutting down: its watches end, and what it holds dies with it.
        draining: CancellationToken,
    },
    /// Many replicas sharing a Redis stream.
    Redis(Arc<RedisBackplane>),
}

impl Backplane {
    /// A single-replica backplane; it refuses callbacks once `draining` is cancelled.
    pub fn local(hub: Arc<Hub>, draining: CancellationToken) -> Backplane {
        Backplane::Local {
            hub,
            nonces: Nonces::default(),
            draining,
        }
    }

    /// Claims the callback's nonce (when signed) and hands its notification on (when it has one), as one step.
    pub async fn accept(
        &self,
        nonce: Option<Nonce<'_>>,
        notification: Option<(Arc<Notification>, &[u8])>,
    ) -> Result<Accepted, Unavailable> {
        match self {
            Backplane::Local { hub, nonces, draining } => {
                // Nobody could receive it here any more and nothing outlives this process: let Sinch redeliver
                // it to the replica that replaces this one.
                if draining.is_cancelled() {
                    return Err(Unavailable(
                        "this replica is shutting down and keeps events in memory only".into(),
                    ));
                }
                if nonce.is_some_and(|n| !nonces.claim(n.value, n.remember_for)) {
                    return Ok(Accepted::Replayed);
                }
                if let Some((notification, _)) = notification {
                    hub.publish(notification);
                }
                Ok(Accepted::Published)
            }
            Backplane::Redis(redis) => redis.accept(nonce, notification).await,
        }
    }

    /// Shares a query's expected channels with the other replicas (the local hub is told directly).
    pub async fn record_query(&self, request_id: &str, expected: Option<&[String]>) {
        if let Backplane::Redis(redis) = self
            && let Err(e) = redis.record_query(request_id, expected).await
        {
            tracing::warn!(%request_id, error = %e, "could not share the query record; other replicas will not \
                know its expected channels");
        }
    }

    /// Claims a caller-chosen request_id across replicas. Without Redis, or when Redis is down, every claim is
    /// `Owner`: idempotency then holds within this replica only.
    pub async fn claim_request_id(&self, request_id: &str, fingerprint: &str) -> IdempotencyClaim {
        let Backplane::Redis(redis) = self else {
            return IdempotencyClaim::Owner;
        };
        match redis.claim_request_id(request_id, fingerprint).await {
            Ok(claim) => claim,
            Err(e) => {
                tracing::warn!(%request_id, error = %e, "idempotency holds within this replica only while Redis is down");
                IdempotencyClaim::Owner
            }
        }
    }

    /// Records the answer of a claimed request_id, or releases the claim when the query failed.
    pub async fn settle_request_id(&self, request_id: &str, fingerprint: &str, answer: Option<&QueryAccepted>) {
        if let Backplane::Redis(redis) = self
            && let Err(e) = redis.settle_request_id(request_id, fingerprint, answer).await
        {
            tracing::warn!(%request_id, error = %e, "could not record the idempotency answer in Redis");
        }
    }
}
