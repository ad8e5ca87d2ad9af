//! The webhook receiver from Sinch's side: genuine and hostile callbacks, and what watchers then see.

mod common;

use std::time::Duration;

use capability_facade::grpc::pb::{self, Channel};
use common::{
    Sandbox, Service, WEBHOOK_SECRET, capability_body, deliver, drain, post_webhook, reqwest_client, sign,
    signed_headers, unix_now, watch_request,
};

type Headers = Vec<(&'static str, String)>;

/// Headers signed with `secret` at `timestamp` with `nonce`.
fn headers_at(secret: &str, body: &[u8], nonce: &str, timestamp: i64) -> Headers {
    let timestamp = timestamp.to_string();
    vec![
        ("content-type", "application/json".into()),
        ("x-sinch-webhook-signature", sign(secret, body, nonce, &timestamp)),
        ("x-sinch-webhook-signature-timestamp", timestamp),
        ("x-sinch-webhook-signature-nonce", nonce.into()),
    ]
}

fn replace(headers: &mut [(&'static str, String)], name: &str, value: &str) {
    headers.iter_mut().find(|(n, _)| *n == name).unwrap().1 = value.into();
}

/// Asserts that a genuine callback for a new request still reaches a watcher.
async fn still_delivers(service: &Service) {
    let request_id = ulid::Ulid::new().to_string();
    let mut client = service.client().await;
    let stream = client
        .watch_capability(watch_request(&request_id, 0, Some(Duration::from_millis(300))))
        .await
        .unwrap()
        .into_inner();
    let status = deliver(
        service.webhook_addr,
        capability_body(&request_id, "SMS", "46700000001", "CAPABILITY_FULL"),
    )
    .await;
    assert_eq!(status, 200);
    let (seen, _) = drain(stream).await;
    assert_eq!(seen, [(1, "SMS".to_owned(), "CAPABILITY_FULL".to_owned())]);
}

#[tokio::test]
async fn hostile_callbacks_are_refused_with_the_right_status_and_nothing_is_delivered() {
    let sandbox = Sandbox::start(&[], None).await;
    let service = sandbox.service(&["--webhook-max-body=4096"]).await;
    let addr = service.webhook_addr;
    let body = capability_body("hostile", "SMS", "46700000001", "CAPABILITY_FULL");
    let now = unix_now();

    let mut cases: Vec<(&str, Vec<u8>, Headers, u16)> = vec![(
        "no headers",
        body.clone(),
        vec![("content-type", "application/json".into())],
        401,
    )];
    let mut wrong = signed_headers(WEBHOOK_SECRET, &body);
    replace(
        &mut wrong,
        "x-sinch-webhook-signature",
        "6bpJoRmFoXVjfJIVglMoJzYXxnoxRujzR4k2GOXewOE=",
    );
    cases.push(("wrong signature", body.clone(), wrong, 401));
    cases.push((
        "wrong secret",
        body.clone(),
        signed_headers("not-the-secret", &body),
        401,
    ));
    let tampered = capability_body("hostile", "SMS", "46700000001", "NO_CAPABILITY");
    cases.push(("tampered body", tampered, signed_headers(WEBHOOK_SECRET, &body), 401));
    cases.push((
        "stale",
        body.clone(),
        headers_at(WEBHOOK_SECRET, &body, "n-stale", now - 400),
        401,
    ));
    cases.push((
        "future",
        body.clone(),
        headers_at(WEBHOOK_SECRET, &body, "n-future", now + 400),
        401,
    ));
    let mut sha1 = signed_headers(WEBHOOK_SECRET, &body);
    sha1.push(("x-sinch-webhook-signature-algorithm", "HmacSHA1".into()));
    sha1.retain(|(n, v)| *n != "x-sinch-webhook-signature-algorithm" || v == "HmacSHA1");
    cases.push(("another algorithm", body.clone(), sha1, 401));
    let mut not_a_number = headers_at(WEBHOOK_SECRET, &body, "n-nan", now);
    replace(&mut not_a_number, "x-sinch-webhook-signature-timestamp", "yesterday");
    cases.push(("timestamp not a number", body.clone(), not_a_number, 401));
    let malformed = b"{\"capability_notification\": {\"request_id\": ".to_vec();
    cases.push((
        "malformed JSON",
        malformed.clone(),
        signed_headers(WEBHOOK_SECRET, &malformed),
        400,
    ));
    let not_utf8 = b"{\"app_id\": \"\xff\xfe\"}".to_vec();
    cases.push((
        "invalid UTF-8",
        not_utf8.clone(),
        signed_headers(WEBHOOK_SECRET, &not_utf8),
        400,
    ));
    cases.push(("empty body", Vec::new(), signed_headers(WEBHOOK_SECRET, b""), 400));
    let wrong_type = br#"{"capability_notification": {"request_id": ["a"]}}"#.to_vec();
    cases.push((
        "wrong types",
        wrong_type.clone(),
        signed_headers(WEBHOOK_SECRET, &wrong_type),
        400,
    ));
    let mut text = signed_headers(WEBHOOK_SECRET, &body);
    replace(&mut text, "content-type", "text/plain");
    cases.push(("wrong content type", body.clone(), text, 415));
    let mut none = signed_headers(WEBHOOK_SECRET, &body);
    none.retain(|(n, _)| *n != "content-type");
    cases.push(("no content type", body.clone(), none, 415));
    let oversized = vec![b' '; 5000];
    cases.push((
        "oversized",
        oversized.clone(),
        signed_headers(WEBHOOK_SECRET, &oversized),
        413,
    ));

    for (name, body, headers, expected) in cases {
        assert_eq!(post_webhook(addr, body, &headers).await, expected, "{name}");
    }

    let mut client = service.client().await;
    let stream = client
        .watch_capability(watch_request("hostile", 0, Some(Duration::ZERO)))
        .await
        .unwrap()
        .into_inner();
    let (seen, _) = drain(stream).await;
    assert!(seen.is_empty(), "nothing hostile was delivered: {seen:?}");
    still_delivers(&service).await;
}

#[tokio::test]
async fn a_nonce_is_accepted_once() {
    let sandbox = Sandbox::start(&[], None).await;
    let service = sandbox.service(&[]).await;
    let body = capability_body("nonce", "SMS", "46700000001", "CAPABILITY_FULL");
    let headers = signed_headers(WEBHOOK_SECRET, &body);
    assert_eq!(post_webhook(service.webhook_addr, body.clone(), &headers).await, 200);
    assert_eq!(post_webhook(service.webhook_addr, body, &headers).await, 401);
}

#[tokio::test]
async fn any_configured_secret_verifies_so_secrets_rotate_without_downtime() {
    let sandbox = Sandbox::start(&[], None).await;
    let service = sandbox
        .service(&["--sinch-webhook-secrets=old-secret,new-secret"])
        .await;
    for secret in ["old-secret", "new-secret"] {
        let body = capability_body(secret, "SMS", "46700000001", "CAPABILITY_FULL");
        let headers = signed_headers(secret, &body);
        assert_eq!(
            post_webhook(service.webhook_addr, body, &headers).await,
            200,
            "{secret}"
        );
    }
    let body = capability_body("r", "SMS", "46700000001", "CAPABILITY_FULL");
    let headers = signed_headers(WEBHOOK_SECRET, &body);
    assert_eq!(post_webhook(service.webhook_addr, body, &headers).await, 401);
}

#[tokio::test]
async fn other_triggers_and_callbacks_without_request_id_are_acknowledged_not_delivered() {
    let sandbox = Sandbox::start(&[], None).await;
    let service = sandbox.service(&[]).await;
    let other = br#"{"app_id":"","project_id":"p","message_delivery_report":{"message_id":"m","status":"DELIVERED"}}"#;
    assert_eq!(deliver(service.webhook_addr, other.to_vec()).await, 200);
    let no_id = br#"{"app_id":"a","project_id":"","capability_notification":{"channel":"SMS","identity":"1"}}"#;
    assert_eq!(deliver(service.webhook_addr, no_id.to_vec()).await, 200);
    still_delivers(&service).await;
}

#[tokio::test]
async fn unknown_enumeration_values_are_delivered_with_their_raw_strings() {
    let sandbox = Sandbox::start(&[], None).await;
    let service = sandbox.service(&[]).await;
    let body = serde_json::to_vec(&serde_json::json!({
        "app_id": "A", "project_id": "", "future_top_level_field": 42,
        "capability_notification": {"request_id": "unknown-values", "channel": "CARRIER_PIGEON",
            "identity": "46700000001", "capability_status": "CAPABILITY_MAYBE",
            "reason": {"code": "BRAND_NEW_REASON", "sub_code": "NEW_SUB", "description": "d"},
            "future_field": {"nested": true}}
    }))
    .unwrap();
    assert_eq!(deliver(service.webhook_addr, body).await, 200);
    let n = common::first_notification(&service, "unknown-values").await;
    assert_eq!(
        (n.channel(), n.channel_raw.as_str()),
        (Channel::Unspecified, "CARRIER_PIGEON")
    );
    assert_eq!(
        (n.capability_status(), n.capability_status_raw.as_str()),
        (pb::CapabilityStatus::Unspecified, "CAPABILITY_MAYBE")
    );
    let reason = n.reason.unwrap();
    assert_eq!(
        (reason.code.as_str(), reason.sub_code.as_str()),
        ("BRAND_NEW_REASON", "NEW_SUB")
    );
}

#[tokio::test]
async fn every_field_of_a_callback_reaches_the_watcher() {
    let sandbox = Sandbox::start(&[], None).await;
    let service = sandbox.service(&[]).await;
    let body = serde_json::to_vec(&serde_json::json!({
        "app_id": "01EB37KMH2M6SV18ASNS3G135H", "accepted_time": "2020-11-17T16:05:51.724083Z",
        "event_time": "2020-11-17T16:05:45Z", "project_id": "proj", "message_metadata": "meta",
        "correlation_id": "corr",
        "capability_notification": {"request_id": "all-fields", "contact_id": "CONTACT", "channel": "WHATSAPP",
            "identity": "12345678910", "capability_status": "CAPABILITY_PARTIAL",
            "channel_capabilities": ["TEXT"],
            "reason": {"code": "RECIPIENT_NOT_OPTED_IN", "description": "desc", "sub_code": "UNSPECIFIED_SUB_CODE",
                       "channel_code": "131047"},
            "channel_recipient_identities": [{"channel_identity": {"channel": "WHATSAPP", "identity": "12345678910"},
                                              "display_name": "John Doe"}]}
    }))
    .unwrap();
    assert_eq!(deliver(service.webhook_addr, body).await, 200);
    let n = common::first_notification(&service, "all-fields").await;
    assert_eq!(n.offset, 1);
    assert_eq!(n.contact_id, "CONTACT");
    assert_eq!((n.channel(), n.identity.as_str()), (Channel::Whatsapp, "12345678910"));
    assert_eq!(n.capability_status(), pb::CapabilityStatus::Partial);
    assert_eq!(n.channel_capabilities, ["TEXT"]);
    let reason = n.reason.unwrap();
    assert_eq!(
        (reason.description.as_str(), reason.channel_code.as_str()),
        ("desc", "131047")
    );
    assert_eq!(n.channel_recipient_identities[0].display_name, "John Doe");
    assert_eq!(
        (n.app_id.as_str(), n.project_id.as_str()),
        ("01EB37KMH2M6SV18ASNS3G135H", "proj")
    );
    assert_eq!(
        (n.message_metadata.as_str(), n.correlation_id.as_str()),
        ("meta", "corr")
    );
    let accepted = n.accepted_time.unwrap();
    assert_eq!((accepted.seconds, accepted.nanos), (1_605_629_151, 724_083_000));
    assert_eq!(n.event_time.unwrap().seconds, 1_605_629_145);
    assert!(n.receive_time.is_some());
}

#[tokio::test]
async fn the_webhook_port_serves_only_its_two_routes() {
    let sandbox = Sandbox::start(&[], None).await;
    let service = sandbox.service(&[]).await;
    let http = reqwest_client();
    let url = |path: &str| format!("http://{}{path}", service.webhook_addr);
    assert_eq!(http.get(url("/healthz")).send().await.unwrap().status(), 200);
    assert_eq!(http.get(url("/webhooks/sinch")).send().await.unwrap().status(), 405);
    assert_eq!(http.post(url("/webhooks/other")).send().await.unwrap().status(), 404);
    assert_eq!(http.get(url("/metrics")).send().await.unwrap().status(), 404);
}

/// A webhook registered with a trailing `/` (which `webhook ensure`, the doctor and the start-up check take for the
/// service's) reaches the receiver: Sinch posts to the registered URL as it is.
#[tokio::test]
async fn a_callback_to_the_path_with_a_trailing_slash_is_received() {
    let sandbox = Sandbox::start(&[], None).await;
    let service = sandbox.service(&[]).await;
    let url = format!("http://{}/webhooks/sinch/", service.webhook_addr);
    let body = capability_body("slash", "SMS", "46700000001", "CAPABILITY_FULL");
    let headers = signed_headers(WEBHOOK_SECRET, &body);
    let status = testkit::post_webhook(&reqwest_client(), &url, body, &headers)
        .await
        .unwrap();
    assert_eq!(status, 200);
}

#[tokio::test]
async fn without_a_secret_unsigned_callbacks_are_accepted_only_when_asked_for() {
    let sandbox = Sandbox::start(&[], None).await;
    let config = sandbox.config(&["--sinch-webhook-secrets=", "--insecure-webhooks=true"]);
    let service = Service::start(config).await;
    let body = capability_body("unsigned", "SMS", "46700000001", "CAPABILITY_FULL");
    let headers = [("content-type", "application/json".to_owned())];
    assert_eq!(post_webhook(service.webhook_addr, body, &headers).await, 200);
}

/// One replica without Redis keeps events in memory only: once it starts shutting down (its watches have ended)
/// a callback is refused with 503, so that Sinch redelivers it to the replica that replaces this one rather
/// than it being acknowledged and lost with the process.
#[tokio::test]
async fn a_single_replica_refuses_callbacks_once_it_is_shutting_down() {
    let sandbox = Sandbox::start(&[], None).await;
    let service = sandbox.service(&["--drain-delay=10s"]).await;
    let body = |channel: &str| capability_body("draining", channel, "46700000001", "CAPABILITY_FULL");
    assert_eq!(deliver(service.webhook_addr, body("SMS")).await, 200);
    service.shutdown.cancel();
    assert_eq!(
        deliver(service.webhook_addr, body("RCS")).await,
        503,
        "still listening, no longer accepting"
    );
}

/// An operator finds a refused callback's line by its request_id: a callback refused once parsed (here a replay)
/// is logged in the span of its handling, which names its request_id and channel.
#[tokio::test]
async fn a_callback_refused_once_parsed_is_logged_with_its_request_id_and_channel() {
    let fake = common::FakeSinch::start().await;
    let mut binary = common::Binary::spawn(&common::binary_env(&fake)).await;
    let body = capability_body("logged-request", "SMS", "46700000001", "CAPABILITY_FULL");
    let headers = signed_headers(WEBHOOK_SECRET, &body);
    assert_eq!(post_webhook(binary.webhook_addr, body.clone(), &headers).await, 200);
    assert_eq!(post_webhook(binary.webhook_addr, body, &headers).await, 401);
    let log = binary.stop_and_read_log(Duration::from_secs(30)).await;
    let refused = log
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .find(|line| line["message"] == "callback refused")
        .unwrap_or_else(|| panic!("no refusal in the log:\n{log}"));
    assert_eq!(refused["span"]["request_id"], "logged-request", "{refused}");
    assert_eq!(refused["span"]["channel"], "SMS", "{refused}");
}
