//! The admin port, for the cluster only: `GET /metrics` (Prometheus text), `GET /healthz` (the process is alive)
//! and `GET /readyz` (it takes traffic: once the event log was read back, and until shutdown begins).

use std::{sync::Arc, time::Duration};

use axum::{
    Router,
    extract::State,
    http::{StatusCode, header},
    response::IntoResponse,
    routing::get,
};
use metrics_exporter_prometheus::PrometheusHandle;
use tokio_util::sync::CancellationToken;

use crate::{connection::GuardedListener, hub::Hub, log::EventLog};

/// What the admin port reports on.
pub struct Admin {
    pub metrics: PrometheusHandle,
    pub hub: Arc<Hub>,
    pub log: Arc<EventLog>,
    /// Cancelled when shutdown begins.
    pub shutdown: CancellationToken,
}

pub fn router(admin: Arc<Admin>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(ready))
        .with_state(admin)
}

/// Serves until `stop` (after the other listeners drained, so that the last scrape sees the drain), with the
/// webhook's connection handling: a request's headers must arrive within `header_timeout`.
pub async fn serve(
    listener: GuardedListener,
    router: Router,
    header_timeout: Duration,
    stop: CancellationToken,
) -> std::io::Result<()> {
    crate::webhook::serve(listener, router, None, header_timeout, stop).await
}

async fn metrics(State(admin): State<Arc<Admin>>) -> impl IntoResponse {
    metrics::gauge!("capability_retained_requests").set(admin.hub.len() as f64);
    let log = admin.log.health();
    if log.backend != "local" {
        metrics::gauge!("capability_backplane_up").set(if log.up { 1.0 } else { 0.0 });
    }
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        admin.metrics.render(),
    )
}

/// Ready once the event log was read back (so that replays are complete), until shutdown begins. A Redis
/// outage does not make a replica unready: queries still work, and taking every replica out of the Service would
/// only turn a partial outage into a full one; a replica that finds Redis down at start runs degraded.
async fn ready(State(admin): State<Arc<Admin>>) -> impl IntoResponse {
    let log = admin.log.health();
    let state = match (log.backend, log.up) {
        ("local", _) => "local".to_owned(),
        (backend, true) => format!("{backend}: up"),
        (backend, false) => format!("{backend}: down"),
    };
    let (status, verdict) = if admin.shutdown.is_cancelled() {
        (StatusCode::SERVICE_UNAVAILABLE, "shutting down")
    } else if !log.caught_up {
        (StatusCode::SERVICE_UNAVAILABLE, "reading back the event log")
    } else {
        (StatusCode::OK, "ready")
    };
    (status, format!("{verdict}\nevent log {state}\n"))
}
