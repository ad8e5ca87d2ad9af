//! `grpc.health.v1` as tonic-health serves it, except that a Watch ends when the server stops accepting (the drain
//! delay after shutdown began, when every status turned NOT_SERVING): it says NOT_SERVING and ends, so that a
//! health checker's open stream does not hold the drain (the server waits for every stream before it stops, up to
//! the shutdown grace). Not before: a checker that watches again at once (grpc-go's does) would find the replica
//! still accepting, and watch and end in a loop for the whole drain delay; after, it finds the replica gone.

use std::{
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicI32, Ordering},
    },
};

use futures::{Stream, StreamExt};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};
use tonic_health::{
    pb::{HealthCheckRequest, HealthCheckResponse, health_check_response::ServingStatus, health_server},
    server::{HealthReporter, HealthService},
};

/// See the module documentation.
pub(super) struct Health {
    inner: HealthService,
    stop: CancellationToken,
}

impl Health {
    /// The health service of `reporter`'s statuses; its watches end once `stop` is cancelled.
    pub(super) fn new(reporter: HealthReporter, stop: CancellationToken) -> health_server::HealthServer<Health> {
        health_server::HealthServer::new(Health {
            inner: HealthService::from_health_reporter(reporter),
            stop,
        })
    }
}

#[tonic::async_trait]
impl health_server::Health for Health {
    async fn check(&self, request: Request<HealthCheckRequest>) -> Result<Response<HealthCheckResponse>, Status> {
        self.inner.check(request).await
    }

    type WatchStream = Pin<Box<dyn Stream<Item = Result<HealthCheckResponse, Status>> + Send>>;

    async fn watch(&self, request: Request<HealthCheckRequest>) -> Result<Response<Self::WatchStream>, Status> {
        let statuses = self.inner.watch(request).await?.into_inner();
        // Every service is NOT_SERVING by then (the reporter was told when shutdown began): said last, unless it
        // was the last thing said.
        let not_serving = i32::from(ServingStatus::NotServing);
        let said = Arc::new(AtomicI32::new(-1));
        let last = said.clone();
        let statuses = statuses
            .take_until(self.stop.clone().cancelled_owned())
            .inspect(move |status| {
                if let Ok(status) = status {
                    said.store(status.status, Ordering::Relaxed);
                }
            })
            .chain(futures::stream::iter(std::iter::from_fn(move || {
                let unsaid = last.swap(not_serving, Ordering::Relaxed) != not_serving;
                unsaid.then_some(Ok(HealthCheckResponse { status: not_serving }))
            })));
        Ok(Response::new(Box::pin(statuses)))
    }
}
