//! The admin port, for the cluster only: `GET /metrics` (Prometheus text), `GET /healthz` (the process is alive)
//! and `GET /readyz` (it takes traffic: 503 once shutdown began).

use std::sync::Arc;

use axum::{
    Router,
    extract::State,
    http::{StatusCode, header},
    response::IntoResponse,
    routing::get,
};
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::{backplane::Backplane, hub::Hub};

/// What the admin port reports on.
pub struct Admin {
    pub metrics: PrometheusHandle,
    pub hub: Arc<Hub>,
    pub backplane: Arc<Backplane>,
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

/// Serves until `stop` (after the other listeners drained, so that the last scrape sees the drain).
pub async fn serve(listener: TcpListener, router: Router, stop: CancellationToken) -> std::io::Result<()> {
    axum::serve(listener, router)
        .with_graceful_shutdown(stop.cancelled_owned())
        .await
}

async fn metrics(State(admin): State<Arc<Admin>>) -> impl IntoResponse {
    metrics::gauge!("capability_retained_requests").set(admin.hub.len() as f64);
    if let Backplane::Redis(redis) = admin.backplane.as_ref() {
        metrics::gauge!("capability_backplane_up").set(if redis.is_up() { 1.0 } else { 0.0 });
    }
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        admin.metrics.render(),
    )
}

/// Ready unless shutting down. A Redis outage does not make a replica unready: queries still work, and taking
/// every replica out of the Service would only turn a partial outage into a full one.
async fn ready(State(admin): State<Arc<Admin>>) -> impl IntoResponse {
    let backplane = match admin.backplane.as_ref() {
        Backplane::Local { .. } => "local",
        Backplane::Redis(redis) if redis.is_up() => "redis: up",
        Backplane::Redis(_) => "redis: down",
    };
    if admin.shutdown.is_cancelled() {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("shutting down\nbackplane {backplane}\n"),
        )
    } else {
        (StatusCode::OK, format!("ready\nbackplane {backplane}\n"))
    }
}
