//! Metrics and probes after real traffic. Alone in its test binary on purpose: the Prometheus recorder is global
//! to the process, so any other test here would write into the series this one reads.

mod common;

use capability_facade::grpc::pb::{self, Channel};
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
    // A registration with a mistyped path, and a probe with the wrong method: refused, and counted.
    let http = reqwest_client();
    let webhook = |path: &str| format!("http://{}{path}", service.webhook_addr);
    let misrouted = http.post(webhook("/webhooks/sinhc")).body("{}").send().await.unwrap();
    assert_eq!(misrouted.status(), 404);
    let stray = http.get(webhook("/favicon.ico")).send().await.unwrap();
    assert_eq!(stray.status(), 404);
    let wrong_method = http.get(webhook("/webhooks/sinch")).send().await.unwrap();
    assert_eq!(wrong_method.status(), 405);
    assert_eq!(wrong_method.headers()["allow"], "POST");

    // Checks: the callback above is cached; RCS is not, and two checks of WhatsApp at once share one lookup.
    let check = |channel: Channel, wait_ms: u64| pb::CheckCapabilityRequest {
        app_id: "APP-1".into(),
        recipient: Some(identities(&[(channel, "46700000001")])),
        wait: Some(prost_types::Duration::try_from(std::time::Duration::from_millis(wait_ms)).unwrap()),
        ..Default::default()
    };
    let hit = client
        .check_capability(check(Channel::Sms, 0))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(hit.results.len(), 1);
    client.check_capability(check(Channel::Rcs, 0)).await.unwrap();
    let mut other = client.clone();
    let first = tokio::spawn(async move { other.check_capability(check(Channel::Whatsapp, 10_000)).await });
    // The query of "metrics" was sent twice (the 503, then the retry), then RCS's: WhatsApp's is the fourth.
    fake.until_queries(4).await;
    // The second check waits too: until Sinch has accepted the first's query its lease is pending, and a check that
    // does not wait would give up on it rather than join. It is counted as coalesced once it joined.
    let mut other = client.clone();
    let second = tokio::spawn(async move { other.check_capability(check(Channel::Whatsapp, 10_000)).await });
    until_metric(&service, "capability_coalesced_total 1").await;
    let live_id = fake.queries()[3].json()["request_id"].as_str().unwrap().to_owned();
    deliver(
        service.webhook_addr,
        capability_body(&live_id, "WHATSAPP", "46700000001", "CAPABILITY_FULL"),
    )
    .await;
    first.await.unwrap().unwrap();
    let shared = second.await.unwrap().unwrap().into_inner();
    assert_eq!(shared.results[0].source, pb::ResultSource::Shared as i32);

    // A bulk job of two recipients: SMS is answered from the cache, Viber is asked (the fifth query) and answered.
    let job = client
        .start_bulk_check(pb::StartBulkCheckRequest {
            app_id: "APP-1".into(),
            recipients: vec![
                identities(&[(Channel::Sms, "46700000001")]),
                identities(&[(Channel::Viberbm, "46700000001")]),
            ],
            wait: Some(prost_types::Duration { seconds: 10, nanos: 0 }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let bulk_id = fake.until_queries(5).await[4].json()["request_id"]
        .as_str()
        .unwrap()
        .to_owned();
    deliver(
        service.webhook_addr,
        capability_body(&bulk_id, "VIBERBM", "46700000001", "CAPABILITY_FULL"),
    )
    .await;
    let request = pb::WatchBulkCheckRequest {
        job_id: job.job_id,
        after_offset: 0,
    };
    let mut progress = client.watch_bulk_check(request).await.unwrap().into_inner();
    let mut last = None;
    while let Some(message) = progress.message().await.unwrap() {
        last = Some(message);
    }
    let Some(pb::watch_bulk_check_response::Event::Progress(done)) = last.and_then(|m| m.event) else {
        panic!("the bulk stream ends with a progress")
    };
    assert_eq!(
        (done.state(), done.done, done.from_cache),
        (pb::BulkCheckState::Succeeded, 2, 1)
    );

    let admin = |path: &str| format!("http://{}{path}", service.admin_addr);
    let metrics = http.get(admin("/metrics")).send().await.unwrap().text().await.unwrap();
    // Nothing else in this process writes to the recorder, so every count is this test's traffic, exactly.
    for (series, count) in [
        (r#"capability_queries_total{outcome="ok"}"#, 1),
        (r#"capability_queries_total{outcome="invalid_argument"}"#, 1),
        ("capability_upstream_retries_total", 1),
        (r#"capability_token_refreshes_total{result="ok"}"#, 1),
        (r#"capability_webhooks_total{result="accepted"}"#, 3),
        (r#"capability_webhooks_total{result="missing_signature"}"#, 1),
        (r#"capability_webhooks_total{result="not_found"}"#, 1),
        (r#"capability_webhooks_total{result="stray"}"#, 1),
        (r#"capability_webhooks_total{result="method_not_allowed"}"#, 1),
        ("capability_notifications_delivered_total", 1),
        ("capability_delivery_latency_seconds_count", 1),
        ("capability_cache_hits_total", 2),
        ("capability_cache_misses_total", 4),
        ("capability_coalesced_total", 1),
        // The hit, the check that joined instead of asking, and the bulk recipient answered from the cache.
        ("capability_live_queries_saved_total", 3),
        (r#"capability_checks_total{outcome="ok"}"#, 4),
        ("capability_bulk_recipients_done_total", 2),
        ("capability_bulk_queries_sent_total", 1),
        ("capability_bulk_identities_paced_total", 1),
        ("capability_webhooks_pending", 0),
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
        // Its runner leaves a moment after the job's end is visible: present, whatever its value just now.
        "capability_bulk_jobs_running",
    ] {
        assert!(metrics.contains(series), "/metrics lacks {series}:\n{metrics}");
    }
    assert_eq!(http.get(admin("/healthz")).send().await.unwrap().status(), 200);
    assert_eq!(http.get(admin("/readyz")).send().await.unwrap().status(), 200);
    service.shutdown.cancel();
    let not_ready = http.get(admin("/readyz")).send().await.unwrap();
    assert_eq!(not_ready.status(), 503, "not ready once shutdown began");
}

/// Until the service's metrics carry this line: the only outward sign that a check joined another's lookup.
async fn until_metric(service: &common::Service, line: &str) {
    for _ in 0..1_000 {
        if common::metrics_text(service.admin_addr)
            .await
            .lines()
            .any(|l| l == line)
        {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    panic!("/metrics never carried {line:?}");
}

/// The series the alerts of docs/OPERATIONS.md watch with `increase()` or `rate()` are there at 0 from the start:
/// a series that first appears at 1 reads as no increase, so the first credentials refusal, bad signature, skipped
/// entry, eviction or refused connection of a replica would fire nothing.
#[tokio::test]
async fn the_series_alerts_count_on_are_there_at_zero_from_the_start() {
    let replica = common::Binary::spawn(&[]).await;
    let text = common::metrics_text(replica.admin_addr).await;
    for series in [
        "capability_queries_total{outcome=\"internal\"} 0",
        "capability_checks_total{outcome=\"internal\"} 0",
        "capability_webhooks_total{result=\"bad_signature\"} 0",
        "capability_webhooks_total{result=\"not_found\"} 0",
        "capability_webhooks_total{result=\"shed\"} 0",
        "capability_webhooks_total{result=\"unavailable\"} 0",
        "capability_log_skipped_total{reason=\"malformed\"} 0",
        "capability_log_skipped_total{reason=\"unknown_version\"} 0",
        "capability_requests_evicted_total 0",
        "capability_bulk_jobs_ended_total{state=\"failed\"} 0",
        "capability_connections_refused_total{listener=\"grpc\"} 0",
        "capability_connections_refused_total{listener=\"webhook\"} 0",
        "capability_connections_refused_total{listener=\"admin\"} 0",
    ] {
        assert!(text.lines().any(|line| line == series), "no {series:?} in\n{text}");
    }
}

/// The delivery latency counts a notification delivered as it arrives, not one a watch replays: a watch opened a
/// minute after its callbacks would record a minute, and the "slow delivery" alert would fire on normal use.
#[tokio::test]
async fn delivery_latency_counts_live_deliveries_not_replays() {
    let replica = common::Binary::spawn(&[
        ("SINCH_WEBHOOK_SECRETS", common::WEBHOOK_SECRET.into()),
        // A heartbeat says the live watch below has looked and found nothing held.
        ("CAPABILITY_HEARTBEAT", "10ms".into()),
    ])
    .await;
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", replica.grpc_addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = pb::capability_service_client::CapabilityServiceClient::new(channel);
    let recorded = || async {
        let text = common::metrics_text(replica.admin_addr).await;
        text.lines()
            .find_map(|line| line.strip_prefix("capability_delivery_latency_seconds_count "))
            .map_or(0, |count| count.parse::<u64>().unwrap())
    };
    let body = |request_id: &str| capability_body(request_id, "SMS", "46700000001", "CAPABILITY_FULL");

    assert_eq!(deliver(replica.webhook_addr, body("earlier")).await, 200);
    let replay = client
        .watch_capability(watch_request("earlier", 0, Some(std::time::Duration::ZERO)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(drain(replay).await.0.len(), 1, "the replay");
    assert_eq!(recorded().await, 0, "a replay's latency was recorded");

    let mut live = client
        .watch_capability(watch_request("later", 0, Some(std::time::Duration::from_secs(30))))
        .await
        .unwrap()
        .into_inner();
    let event = |message: Option<pb::WatchCapabilityResponse>| message.expect("the stream ended").event.unwrap();
    assert!(matches!(
        event(live.message().await.unwrap()),
        pb::watch_capability_response::Event::Heartbeat(_)
    ));
    assert_eq!(deliver(replica.webhook_addr, body("later")).await, 200);
    while !matches!(
        event(live.message().await.unwrap()),
        pb::watch_capability_response::Event::Notification(_)
    ) {}
    assert_eq!(recorded().await, 1, "the live delivery's latency");
}
