//! `grpc.health.v1` as tonic-health serves it, except that a Watch ends at shutdown: it says NOT_SERVING and ends,
//! so that a health checker's open stream does not hold the drain (the server waits for every stream before it
//! stops, up to the shutdown grace). The checker watches again, and finds the replica gone.

use std::pin::Pin;

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
    shutdown: CancellationToken,
}

impl Health {
    /// The health service of `reporter`'s statuses; its watches end once `shutdown` is cancelled.
    pub(super) fn new(reporter: HealthReporter, shutdown: CancellationToken) -> health_server::HealthServer<Health> {
        health_server::HealthServer::new(Health {
            inner: HealthService::from_health_reporter(reporter),
            shutdown,
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
        // At shutdown every service is NOT_SERVING (the reporter is told at once too): said last, whatever the
        // stream had said of it.
        let last = HealthCheckResponse {
            status: ServingStatus::NotServing.into(),
        };
        let statuses = statuses
            .take_until(self.shutdown.clone().cancelled_owned())
            .chain(futures::stream::once(async move { Ok(last) }));
        Ok(Response::new(Box::pin(statuses)))
    }
}
