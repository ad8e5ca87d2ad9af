//! Hostile input, as a table: each row is an input and the status or code it must get. After every row the
//! service is still healthy and a genuine callback still reaches its watcher.

mod common;

use std::time::Duration;

use capability_facade::grpc::pb::{
    self, Channel, CompletionReason, capability_service_client::CapabilityServiceClient,
};
use common::{
    FakeSinch, Service, WEBHOOK_SECRET, capability_body, deliver, drain, identities, query, reqwest_client, sign,
    signed_headers, unix_now, watch_request,
};
use tonic::{Code, transport::Channel as GrpcChannel};
use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient};

type Headers = Vec<(&'static str, String)>;

/// One hostile HTTP request to the webhook port.
struct WebhookRow {
    name: &'static str,
    method: reqwest::Method,
    path: &'static str,
    body: Vec<u8>,
    headers: Headers,
    expect: u16,
}

fn post(name: &'static str, body: Vec<u8>, headers: Headers, expect: u16) -> WebhookRow {
    WebhookRow {
        name,
        method: reqwest::Method::POST,
        path: "/webhooks/sinch",
        body,
        headers,
        expect,
    }
}

/// A body signed correctly: only the body itself is hostile.
fn signed(name: &'static str, body: Vec<u8>, expect: u16) -> WebhookRow {
    let headers = signed_headers(WEBHOOK_SECRET, &body);
    post(name, body, headers, expect)
}

fn with(mut headers: Headers, name: &'static str, value: &str) -> Headers {
    headers.retain(|(n, _)| *n != name);
    headers.push((name, value.to_owned()));
    headers
}

fn at(body: &[u8], timestamp: &str) -> Headers {
    let nonce = ulid::Ulid::new().to_string();
    vec![
        ("content-type", "application/json".into()),
        (
            "x-sinch-webhook-signature",
            sign(WEBHOOK_SECRET, body, &nonce, timestamp),
        ),
        ("x-sinch-webhook-signature-timestamp", timestamp.into()),
        ("x-sinch-webhook-signature-nonce", nonce),
    ]
}

fn webhook_rows() -> Vec<WebhookRow> {
    let body = capability_body("hostile", "SMS", "46700000001", "CAPABILITY_FULL");
    let good = signed_headers(WEBHOOK_SECRET, &body);
    let now = unix_now();
    let nested = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000)).into_bytes();
    let many_headers: Headers = (0..200).map(|_| ("x-filler", "x".to_owned())).collect();
    let json = |v: serde_json::Value| serde_json::to_vec(&v).unwrap();
    vec![
        post(
            "no signature headers",
            body.clone(),
            vec![("content-type", "application/json".into())],
            401,
        ),
        post(
            "empty signature",
            body.clone(),
            with(good.clone(), "x-sinch-webhook-signature", ""),
            401,
        ),
        post(
            "signature not base64",
            body.clone(),
            with(good.clone(), "x-sinch-webhook-signature", "%%%"),
            401,
        ),
        post("another body's signature", b"{}".to_vec(), good.clone(), 401),
        post("wrong secret", body.clone(), signed_headers("guess", &body), 401),
        post(
            "timestamp 10 min old",
            body.clone(),
            at(&body, &(now - 600).to_string()),
            401,
        ),
        post(
            "timestamp 10 min ahead",
            body.clone(),
            at(&body, &(now + 600).to_string()),
            401,
        ),
        post("timestamp not a number", body.clone(), at(&body, "yesterday"), 401),
        post(
            "timestamp beyond i64",
            body.clone(),
            at(&body, "99999999999999999999999"),
            401,
        ),
        post("negative timestamp", body.clone(), at(&body, "-1"), 401),
        post(
            "algorithm HmacSHA1",
            body.clone(),
            with(good.clone(), "x-sinch-webhook-signature-algorithm", "HmacSHA1"),
            401,
        ),
        post(
            "content type text/plain",
            body.clone(),
            with(good.clone(), "content-type", "text/plain"),
            415,
        ),
        post(
            "content type missing",
            body.clone(),
            good.iter().filter(|(n, _)| *n != "content-type").cloned().collect(),
            415,
        ),
        post(
            "content type json-ish",
            body.clone(),
            with(good.clone(), "content-type", "application/jsonp"),
            415,
        ),
        signed("body of 2 MiB", vec![b' '; 2 << 20], 413),
        signed("empty body", Vec::new(), 400),
        signed("invalid UTF-8", b"{\"app_id\": \"\xc3\x28\"}".to_vec(), 400),
        signed(
            "truncated JSON",
            br#"{"capability_notification": {"request_id": "x""#.to_vec(),
            400,
        ),
        signed("JSON array at the top", b"[]".to_vec(), 400),
        signed("JSON nested 10,000 deep", nested, 400),
        signed(
            "request_id of the wrong type",
            json(serde_json::json!({"capability_notification": {"request_id": 7}})),
            400,
        ),
        signed(
            "notification of the wrong type",
            json(serde_json::json!({"capability_notification": "yes"})),
            400,
        ),
        signed(
            "channel_capabilities of the wrong type",
            json(serde_json::json!({"capability_notification":
            {"request_id": "x", "channel_capabilities": "TEXT"}})),
            400,
        ),
        signed("a number too large for JSON", b"{\"app_id\": 1e999999}".to_vec(), 400),
        signed(
            "unknown trigger (acknowledged, ignored)",
            json(serde_json::json!({"app_id": "a", "project_id": "",
            "sms_inbound_notification": {"x": 1}})),
            200,
        ),
        signed(
            "control characters in values (delivered as sent)",
            json(serde_json::json!({"app_id": "a\u{0}",
            "capability_notification": {"request_id": "ctl", "identity": "\u{1b}[31m\u{7}"}})),
            200,
        ),
        post("200 headers", body.clone(), [good.clone(), many_headers].concat(), 431),
        post(
            "a 1 MiB header",
            body.clone(),
            with(good.clone(), "x-filler", &"x".repeat(1 << 20)),
            431,
        ),
        WebhookRow {
            name: "GET on the webhook",
            method: reqwest::Method::GET,
            path: "/webhooks/sinch",
            body: Vec::new(),
            headers: Vec::new(),
            expect: 405,
        },
        WebhookRow {
            name: "PUT on the webhook",
            method: reqwest::Method::PUT,
            path: "/webhooks/sinch",
            body: body.clone(),
            headers: good.clone(),
            expect: 405,
        },
        WebhookRow {
            name: "a path below the webhook",
            method: reqwest::Method::POST,
            path: "/webhooks/sinch/../admin",
            body: body.clone(),
            headers: good.clone(),
            expect: 404,
        },
        WebhookRow {
            name: "metrics on the webhook port",
            method: reqwest::Method::GET,
            path: "/metrics",
            body: Vec::new(),
            headers: Vec::new(),
            expect: 404,
        },
    ]
}

/// After each row: health serves, and a genuine callback for a fresh request reaches a fresh watcher.
async fn still_serving(service: &Service, channel: &GrpcChannel, row: &str) {
    let status = HealthClient::new(channel.clone())
        .check(HealthCheckRequest { service: String::new() })
        .await
        .unwrap_or_else(|s| panic!("after {row:?}: health failed: {s:?}"))
        .into_inner()
        .status();
    assert_eq!(status, ServingStatus::Serving, "after {row:?}");
    let request_id = ulid::Ulid::new().to_string();
    let stream = CapabilityServiceClient::new(channel.clone())
        .watch_capability(watch_request(&request_id, 0, Some(Duration::from_secs(5))))
        .await
        .unwrap()
        .into_inner();
    let body = capability_body(&request_id, "SMS", "46700000001", "CAPABILITY_FULL");
    assert_eq!(deliver(service.webhook_addr, body).await, 200, "after {row:?}");
    let mut stream = stream;
    let first = stream.message().await.unwrap().unwrap().event;
    assert!(
        matches!(first, Some(pb::watch_capability_response::Event::Notification(_))),
        "after {row:?}: a genuine callback reached its watcher, got {first:?}"
    );
}

#[tokio::test]
async fn hostile_webhook_requests_get_their_status_and_harm_nothing() {
    let fake = FakeSinch::start().await;
    let service = Service::against(&fake, &[]).await;
    let channel = service.channel().await;
    let http = reqwest_client();
    let rows = webhook_rows();
    assert!(rows.len() >= 30, "the table has {} rows", rows.len());
    for row in rows {
        let mut request = http
            .request(
                row.method.clone(),
                format!("http://{}{}", service.webhook_addr, row.path),
            )
            .body(row.body);
        for (name, value) in &row.headers {
            request = request.header(*name, value);
        }
        let status = request.send().await.map(|r| r.status().as_u16()).unwrap_or(0);
        assert_eq!(status, row.expect, "{}", row.name);
        still_serving(&service, &channel, row.name).await;
    }
    // Nothing hostile was delivered under its request_id.
    let stream = service
        .client()
        .await
        .watch_capability(watch_request("hostile", 0, Some(Duration::ZERO)))
        .await
        .unwrap()
        .into_inner();
    assert!(drain(stream).await.0.is_empty());
}

/// One hostile gRPC call and the code it must get.
struct GrpcRow {
    name: &'static str,
    call: Call,
    expect: Code,
}

enum Call {
    Query(pb::QueryCapabilityRequest),
    Watch(pb::WatchCapabilityRequest),
}

fn identity(channel: i32, raw: &str, identity: &str) -> pb::ChannelIdentity {
    pb::ChannelIdentity {
        channel,
        identity: identity.into(),
        app_id: String::new(),
        channel_raw: raw.into(),
    }
}

fn by(ids: Vec<pb::ChannelIdentity>) -> pb::QueryCapabilityRequest {
    let mut q = query(identities(&[]), "");
    q.recipient = Some(pb::Recipient {
        recipient: Some(pb::recipient::Recipient::IdentifiedBy(pb::IdentifiedBy {
            channel_identities: ids,
        })),
    });
    q
}

fn grpc_rows() -> Vec<GrpcRow> {
    let sms = pb::Channel::Sms as i32;
    let row = |name, call, expect| GrpcRow { name, call, expect };
    let wait = |seconds: i64, nanos: i32| {
        let mut w = watch_request("w", 0, None);
        w.wait = Some(prost_types::Duration { seconds, nanos });
        Call::Watch(w)
    };
    let mut huge_app = query(identities(&[(Channel::Sms, "1")]), "");
    huge_app.app_id = "a".repeat(5 << 20);
    let mut long_app = query(identities(&[(Channel::Sms, "1")]), "");
    long_app.app_id = "a".repeat(10_000);
    vec![
        row(
            "an empty query",
            Call::Query(pb::QueryCapabilityRequest::default()),
            Code::InvalidArgument,
        ),
        row(
            "10,000 identities",
            Call::Query(by(vec![identity(sms, "", "1"); 10_000])),
            Code::InvalidArgument,
        ),
        row(
            "an identity with a NUL",
            Call::Query(by(vec![identity(sms, "", "467\u{0}01")])),
            Code::InvalidArgument,
        ),
        row(
            "an app_id of 10,000 bytes",
            Call::Query(long_app),
            Code::InvalidArgument,
        ),
        row("a 5 MiB message", Call::Query(huge_app), Code::OutOfRange),
        row(
            "channel value 999",
            Call::Query(by(vec![identity(999, "", "1")])),
            Code::InvalidArgument,
        ),
        row(
            "negative channel value",
            Call::Query(by(vec![identity(-5, "", "1")])),
            Code::InvalidArgument,
        ),
        row(
            "channel_raw in lower case",
            Call::Query(by(vec![identity(0, "whatsapp", "1")])),
            Code::InvalidArgument,
        ),
        row(
            "channel_raw of 1,000 letters",
            Call::Query(by(vec![identity(0, &"A".repeat(1000), "1")])),
            Code::InvalidArgument,
        ),
        row(
            "request_id of 129 characters",
            Call::Query(query(identities(&[(Channel::Sms, "1")]), &"r".repeat(129))),
            Code::InvalidArgument,
        ),
        row(
            "request_id with a newline",
            Call::Query(query(identities(&[(Channel::Sms, "1")]), "a\nb")),
            Code::InvalidArgument,
        ),
        row(
            "a blank contact_id",
            Call::Query(query(common::contact("   "), "")),
            Code::InvalidArgument,
        ),
        row(
            "a watch without request_id",
            Call::Watch(watch_request("", 0, None)),
            Code::InvalidArgument,
        ),
        row(
            "a watch with a control character",
            Call::Watch(watch_request("a\u{7}", 0, None)),
            Code::InvalidArgument,
        ),
        row(
            "a watch of a 10,000-character request_id",
            Call::Watch(watch_request(&"r".repeat(10_000), 0, None)),
            Code::InvalidArgument,
        ),
        row("a negative wait", wait(-1, 0), Code::InvalidArgument),
        row("negative nanos", wait(0, -1), Code::InvalidArgument),
        row("nanos of two seconds", wait(0, 2_000_000_000), Code::InvalidArgument),
        row(
            "a wait of 30,000 years (capped to the retention)",
            wait(1_000_000_000_000, 0),
            Code::Ok,
        ),
        row(
            "after_offset at u64::MAX",
            Call::Watch(watch_request("w", u64::MAX, Some(Duration::ZERO))),
            Code::Ok,
        ),
    ]
}

#[tokio::test]
async fn hostile_grpc_calls_get_their_code_and_harm_nothing() {
    let fake = FakeSinch::start().await;
    // The retention caps every watch's wait: a short one makes the watch of 30,000 years end within the test.
    let service = Service::against(&fake, &["--retention=2s"]).await;
    let channel = service.channel().await;
    for row in grpc_rows() {
        let mut client = CapabilityServiceClient::new(channel.clone());
        let code = match row.call {
            Call::Query(request) => client
                .query_capability(request)
                .await
                .err()
                .map_or(Code::Ok, |s| s.code()),
            Call::Watch(request) => match client.watch_capability(request).await {
                Err(status) => status.code(),
                Ok(response) => {
                    // An accepted watch of nothing must end: with a completion once its wait (capped by the
                    // retention) elapsed, then the end of the stream. 10 s is far above any such wait here.
                    let ended = tokio::time::timeout(Duration::from_secs(10), drain(response.into_inner())).await;
                    let (seen, end) = ended.unwrap_or_else(|_| panic!("{}: still open after 10 s", row.name));
                    assert!(seen.is_empty(), "{}: {seen:?}", row.name);
                    match end {
                        Ok(completion) => {
                            assert_eq!(completion.reason(), CompletionReason::WaitElapsed, "{}", row.name);
                            Code::Ok
                        }
                        Err(status) => status.code(),
                    }
                }
            },
        };
        assert_eq!(code, row.expect, "{}", row.name);
        still_serving(&service, &channel, row.name).await;
    }
    assert!(fake.queries().is_empty(), "nothing hostile reached Sinch");
}

#[tokio::test]
async fn a_client_that_never_finishes_its_headers_is_cut_off() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let fake = FakeSinch::start().await;
    let service = Service::against(&fake, &["--webhook-timeout=300ms"]).await;
    let mut slow = tokio::net::TcpStream::connect(service.webhook_addr).await.unwrap();
    slow.write_all(b"POST /webhooks/sinch HTTP/1.1\r\nhost: x\r\ncontent-type: appl")
        .await
        .unwrap();
    // The server closes the connection (after a 408 or at once); reading then ends.
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), slow.read_to_end(&mut answer)).await;
    assert!(read.is_ok(), "the connection was still open after 10 s");
    let channel = service.channel().await;
    still_serving(&service, &channel, "a slow client").await;
}
