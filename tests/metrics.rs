//! Metrics and probes after real traffic. Alone in its test binary on purpose: the Prometheus recorder is global
//! to the process, so any other test here would write into the series this one reads.

mod common;

use capability_facade::grpc::pb::Channel;
use common::{
    Canned, FakeSinch, Service, capability_body, deliver, drain, identities, post_webhook, query, reqwest_client,
    watch_request,
};

#[tokio::test]
async fn metrics_after_real_traffic_carry_every_series() {
    let fake = FakeSinch::start().await;
    fake.script_queries([Canned::sinch_error(503, "UNAVAILABLE", "blip")]);
    let service = Service::against(&fake, &[]).await;
    let mut client = service.client().await;
    client
        .query_capability(query(identities(&[(Channel::Sms, "46700000001")]), "metrics"))
        .await
        .unwrap();
    let _ = client.query_capability(query(identities(&[]), "")).await;
    let stream = client
        .watch_capability(watch_request("metrics", 0, None))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        deliver(
            service.webhook_addr,
            capability_body("metrics", "SMS", "46700000001", "CAPABILITY_FULL")
        )
        .await,
        200
    );
    let (seen, _) = drain(stream).await;
    assert_eq!(seen.len(), 1);
    let bad = capability_body("metrics", "SMS", "46700000001", "CAPABILITY_FULL");
    let headers = [("content-type", "application/json".to_owned())];
    assert_eq!(post_webhook(service.webhook_addr, bad, &headers).await, 401);

    let http = reqwest_client();
    let admin = |path: &str| format!("http://{}{path}", service.admin_addr);
    let metrics = http.get(admin("/metrics")).send().await.unwrap().text().await.unwrap();
    // Nothing else in this process writes to the recorder, so every count is this test's traffic, exactly.
    for (series, count) in [
        (r#"capability_queries_total{outcome="ok"}"#, 1),
        (r#"capability_queries_total{outcome="invalid_argument"}"#, 1),
        ("capability_upstream_retries_total", 1),
        (r#"capability_token_refreshes_total{result="ok"}"#, 1),
        (r#"capability_webhooks_total{result="accepted"}"#, 1),
        (r#"capability_webhooks_total{result="missing_signature"}"#, 1),
        ("capability_notifications_delivered_total", 1),
        ("capability_delivery_latency_seconds_count", 1),
    ] {
        let line = format!("{series} {count}");
        assert!(
            metrics.lines().any(|l| l == line),
            "/metrics lacks {line:?}:\n{metrics}"
        );
    }
    for series in [
        "capability_upstream_request_duration_seconds_bucket",
        "capability_delivery_latency_seconds_bucket",
        "capability_active_watches",
        "capability_retained_requests",
    ] {
        assert!(metrics.contains(series), "/metrics lacks {series}:\n{metrics}");
    }
    assert_eq!(http.get(admin("/healthz")).send().await.unwrap().status(), 200);
    assert_eq!(http.get(admin("/readyz")).send().await.unwrap().status(), 200);
    service.shutdown.cancel();
    let not_ready = http.get(admin("/readyz")).send().await.unwrap();
    assert_eq!(not_ready.status(), 503, "not ready once shutdown began");
}
