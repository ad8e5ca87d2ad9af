//! What operators see: trace context on the Sinch call, masked logs, and the shutdown drill on the real binary.
//! Metrics have a test binary of their own (tests/metrics.rs).

mod common;

use std::time::{Duration, Instant};

use capability_facade::grpc::pb::{Channel, capability_service_client::CapabilityServiceClient};
use common::{
    Binary, Collector, FakeSinch, KEY_SECRET, Service, WEBHOOK_SECRET, capability_body, deliver, drain, identities,
    query, watch_request,
};
use tonic::{Code, Request};
use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient};

#[tokio::test]
async fn the_callers_trace_context_reaches_sinch_in_the_same_trace() {
    let fake = FakeSinch::start().await;
    let service = Service::against(&fake, &[]).await;
    let mut client = service.client().await;
    let mut request = Request::new(query(identities(&[(Channel::Sms, "46700000001")]), ""));
    let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    request
        .metadata_mut()
        .insert("traceparent", traceparent.parse().unwrap());
    client.query_capability(request).await.unwrap();
    let sent = fake.queries()[0].header("traceparent").to_owned();
    assert!(sent.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"), "{sent:?}");
    assert!(sent.ends_with("-01"), "{sent:?}");
    assert_ne!(
        sent, traceparent,
        "the call to Sinch is a new span of the caller's trace"
    );

    client
        .query_capability(query(identities(&[(Channel::Sms, "46700000001")]), ""))
        .await
        .unwrap();
    assert_eq!(
        fake.queries()[1].header("traceparent"),
        "",
        "no trace context is invented"
    );
}

#[tokio::test]
async fn logs_mask_identities_and_never_show_secrets_or_tokens() {
    let fake = FakeSinch::start().await;
    let mut env = common::binary_env(&fake);
    env.push(("RUST_LOG", "info,capability_facade=debug".into()));
    let process = Binary::spawn(&env).await;
    let mut client = CapabilityServiceClient::connect(process.url()).await.unwrap();
    client
        .query_capability(query(identities(&[(Channel::Whatsapp, "46712312312")]), "masked"))
        .await
        .unwrap();
    let _ = client
        .query_capability(query(identities(&[(Channel::Whatsapp, "46712312312")]), "masked-2"))
        .await;
    let body = capability_body("masked", "WHATSAPP", "46712312312", "CAPABILITY_FULL");
    assert_eq!(deliver(process.webhook_addr, body).await, 200);
    let stream = client
        .watch_capability(watch_request("masked", 0, Some(Duration::ZERO)))
        .await
        .unwrap()
        .into_inner();
    let (seen, _) = drain(stream).await;
    assert_eq!(seen.len(), 1);
    let log = process.log_text();
    assert!(log.contains("4671*****12"), "identities appear masked:\n{log}");
    for secret in ["46712312312", KEY_SECRET, WEBHOOK_SECRET, "token-1"] {
        assert!(!log.contains(secret), "the log shows {secret:?}:\n{log}");
    }
}

#[tokio::test]
async fn sigterm_ends_watches_refuses_new_ones_and_exits_in_time_even_with_a_stuck_reader() {
    let fake = FakeSinch::start().await;
    let mut env = common::binary_env(&fake);
    env.push(("CAPABILITY_SHUTDOWN_GRACE", "3s".into()));
    env.push(("CAPABILITY_DRAIN_DELAY", "1s".into()));
    let mut process = Binary::spawn(&env).await;
    let channel = process.channel().await;
    let mut client = CapabilityServiceClient::new(channel.clone());

    // A stuck reader: its stream holds far more than HTTP/2 flow control lets through, and it never reads.
    let stuck_client = CapabilityServiceClient::connect(process.url()).await.unwrap();
    let big = "x".repeat(16 * 1024);
    for i in 0..16 {
        let body = serde_json::to_vec(
            &serde_json::json!({"app_id": "A", "project_id": "", "message_metadata": big,
            "capability_notification": {"request_id": "stuck", "channel": format!("C{i}"), "identity": "1"}}),
        )
        .unwrap();
        assert_eq!(deliver(process.webhook_addr, body).await, 200);
    }
    let stuck = stuck_client
        .clone()
        .watch_capability(watch_request("stuck", 0, None))
        .await
        .unwrap()
        .into_inner();

    // A reading watch, and the health service's view.
    assert_eq!(
        deliver(
            process.webhook_addr,
            capability_body("live", "SMS", "46700000001", "CAPABILITY_FULL")
        )
        .await,
        200
    );
    let mut live = client
        .watch_capability(watch_request("live", 0, None))
        .await
        .unwrap()
        .into_inner();
    assert!(live.message().await.unwrap().is_some());
    let mut health = HealthClient::new(channel.clone())
        .watch(HealthCheckRequest { service: String::new() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        health.message().await.unwrap().unwrap().status(),
        ServingStatus::Serving
    );

    let signalled = Instant::now();
    process.signal("TERM");
    assert_eq!(
        health.message().await.unwrap().unwrap().status(),
        ServingStatus::NotServing
    );
    let status = live.message().await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);
    assert!(status.message().contains("last_offset=1"), "{}", status.message());
    if let Err(status) = client.watch_capability(watch_request("late", 0, None)).await {
        assert_eq!(status.code(), Code::Unavailable, "a new watch is refused: {status:?}");
    } else {
        panic!("a watch opened after SIGTERM was accepted");
    }

    let exit = process
        .wait_exit(Duration::from_secs(10))
        .await
        .expect("the process exited");
    assert!(exit.success(), "{exit:?}");
    assert!(
        signalled.elapsed() < Duration::from_secs(6),
        "exited within the grace despite the stuck reader: {:?}",
        signalled.elapsed()
    );
    drop(stuck);
}

#[tokio::test]
async fn with_an_otlp_endpoint_spans_are_exported_in_the_callers_trace() {
    let collector = Collector::start(None).await;
    let fake = FakeSinch::start().await;
    let mut env = common::binary_env(&fake);
    env.push(("OTEL_EXPORTER_OTLP_ENDPOINT", format!("http://{}", collector.addr)));
    let mut process = Binary::spawn(&env).await;
    let mut client = CapabilityServiceClient::connect(process.url()).await.unwrap();
    let mut request = Request::new(query(identities(&[(Channel::Sms, "46700000001")]), ""));
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    request.metadata_mut().insert(
        "traceparent",
        format!("00-{trace_id}-00f067aa0ba902b7-01").parse().unwrap(),
    );
    client.query_capability(request).await.unwrap();
    drop(client);
    process.signal("TERM");
    assert!(process.wait_exit(Duration::from_secs(10)).await.unwrap().success());

    let sent = fake.queries()[0].header("traceparent").to_owned();
    assert!(sent.starts_with(&format!("00-{trace_id}-")), "{sent}");
    let exported = collector.exported();
    let raw_trace_id: Vec<u8> = (0..16)
        .map(|i| u8::from_str_radix(&trace_id[2 * i..2 * i + 2], 16).unwrap())
        .collect();
    assert!(
        exported
            .windows(raw_trace_id.len())
            .any(|w| w == raw_trace_id.as_slice()),
        "the exported spans belong to the caller's trace ({} bytes exported)",
        exported.len()
    );
    assert!(
        exported.windows(16).any(|w| w == b"query_capability"),
        "the RPC span was exported"
    );
}
