//! QueryCapability end to end: the real service against a fake Sinch, both on loopback ports.

mod common;

use std::time::Duration;

use capability_facade::grpc::pb::{self, Channel};
use common::{Canned, FakeSinch, KEY_ID, KEY_SECRET, PROJECT, Service, basic_auth, contact, identities, query};
use tonic::{Code, Request};
use tonic_types::StatusExt;

fn basic() -> String {
    basic_auth(KEY_ID, KEY_SECRET)
}

/// A query about contact C whose caller waits at most `timeout`.
fn query_within(timeout: Duration) -> Request<pb::QueryCapabilityRequest> {
    let mut request = Request::new(query(contact("C"), ""));
    request.set_timeout(timeout);
    request
}

/// Starts a service against a fake Sinch scripted with `script` and returns the status of one query.
async fn failing_query(script: impl IntoIterator<Item = Canned>) -> (FakeSinch, tonic::Status) {
    let fake = FakeSinch::start().await;
    fake.script_queries(script);
    let service = Service::against(&fake, &[]).await;
    let mut client = service.client().await;
    let status = client.query_capability(query(contact("C"), "")).await.unwrap_err();
    (fake, status)
}

#[tokio::test]
async fn both_recipient_forms_go_on_the_wire_as_sinch_documents() {
    let fake = FakeSinch::start().await;
    let service = Service::against(&fake, &[]).await;
    let mut client = service.client().await;

    let by_contact = client
        .query_capability(query(contact("CONTACT-1"), "req-contact"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(by_contact.request_id, "req-contact");
    assert_eq!(by_contact.recipient, Some(contact("CONTACT-1")));

    let by_identity = client
        .query_capability(query(
            identities(&[(Channel::Whatsapp, "46712312312"), (Channel::Rcs, "46712312312")]),
            "",
        ))
        .await
        .unwrap()
        .into_inner();

    let sent = fake.queries();
    assert_eq!(sent.len(), 2);
    assert_eq!(sent[0].path, format!("/v1/projects/{PROJECT}/capability:query"));
    assert_eq!(sent[0].header("content-type"), "application/json");
    assert_eq!(sent[0].header("accept"), "application/json");
    assert_eq!(sent[0].header("authorization"), "Bearer token-1");
    assert_eq!(
        sent[0].json(),
        serde_json::json!({"app_id": "APP-1", "recipient": {"contact_id": "CONTACT-1"}, "request_id": "req-contact"})
    );
    let generated = sent[1].json()["request_id"].as_str().unwrap().to_owned();
    assert!(ulid::Ulid::from_string(&generated).is_ok(), "{generated} is a ULID");
    assert_eq!(
        by_identity.request_id, generated,
        "the generated id is the one sent to Sinch"
    );
    assert_eq!(
        sent[1].json(),
        serde_json::json!({"app_id": "APP-1", "request_id": generated, "recipient": {"identified_by": {
            "channel_identities": [{"channel": "WHATSAPP", "identity": "46712312312"},
                                   {"channel": "RCS", "identity": "46712312312"}]}}})
    );
    let echoed = by_identity.recipient.unwrap();
    let Some(pb::recipient::Recipient::IdentifiedBy(by)) = echoed.recipient else {
        panic!("identified_by echoed")
    };
    assert_eq!(by.channel_identities[0].channel(), Channel::Whatsapp);
    assert_eq!(by.channel_identities[0].channel_raw, "WHATSAPP");
}

#[tokio::test]
async fn invalid_requests_fail_with_the_field_named_and_nothing_reaches_sinch() {
    let fake = FakeSinch::start().await;
    let service = Service::against(&fake, &[]).await;
    let mut client = service.client().await;
    let mut no_app = query(contact("C"), "");
    no_app.app_id.clear();
    let cases: Vec<(pb::QueryCapabilityRequest, &str)> = vec![
        (no_app, "app_id"),
        (
            pb::QueryCapabilityRequest {
                recipient: None,
                ..query(contact("C"), "")
            },
            "recipient",
        ),
        (query(contact(""), ""), "recipient.contact_id"),
        (query(identities(&[]), ""), "recipient.identified_by.channel_identities"),
        (
            query(identities(&[(Channel::Unspecified, "1")]), ""),
            "recipient.identified_by.channel_identities[0].channel",
        ),
        (
            query(identities(&[(Channel::Sms, "1"), (Channel::Sms, "")]), ""),
            "recipient.identified_by.channel_identities[1].identity",
        ),
        (query(contact("C"), &"r".repeat(129)), "request_id"),
    ];
    for (request, field) in cases {
        let status = client.query_capability(request).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{field}: {status:?}");
        assert!(status.message().contains(field), "{field}: {}", status.message());
        let violations = status
            .get_details_bad_request()
            .expect("BadRequest details")
            .field_violations;
        assert!(violations.iter().any(|v| v.field == field), "{field}: {violations:?}");
    }
    assert!(fake.requests().is_empty(), "nothing was sent: {:?}", fake.requests());
}

#[tokio::test]
async fn a_repeated_request_id_returns_the_first_answer_without_a_second_query() {
    let fake = FakeSinch::start().await;
    let service = Service::against(&fake, &[]).await;
    let mut client = service.client().await;
    let request = query(identities(&[(Channel::Sms, "46700000001")]), "idem-1");
    let first = client.query_capability(request.clone()).await.unwrap().into_inner();
    let second = client.query_capability(request).await.unwrap().into_inner();
    assert_eq!(first, second);
    assert_eq!(fake.queries().len(), 1);

    let status = client
        .query_capability(query(identities(&[(Channel::Sms, "46700000002")]), "idem-1"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::AlreadyExists);
    assert!(status.message().contains("idem-1") && status.message().contains("different query"));
    assert_eq!(fake.queries().len(), 1);
}

#[tokio::test]
async fn concurrent_repeats_of_a_request_id_send_one_query() {
    let fake = FakeSinch::start().await;
    fake.set_echo_delay(Duration::from_millis(300));
    let service = Service::against(&fake, &[]).await;
    let client = service.client().await;
    let request = query(contact("CONTACT-9"), "idem-concurrent");
    let calls = (0..16).map(|_| {
        let mut client = client.clone();
        let request = request.clone();
        tokio::spawn(async move { client.query_capability(request).await.map(|r| r.into_inner()) })
    });
    let answers: Vec<_> = futures::future::join_all(calls).await;
    for answer in &answers {
        assert_eq!(answer.as_ref().unwrap().as_ref().unwrap().request_id, "idem-concurrent");
    }
    assert_eq!(fake.queries().len(), 1);
}

/// A caller that goes away while its query is being sent (a cancel, a mesh's per-try timeout) does not take the
/// query with it: it completes, and the caller's retry gets its answer without a second query — in process, and
/// with Redis, where the retry found the request_id claimed by nobody for the claim's 10.5 minutes.
#[tokio::test]
async fn a_query_whose_caller_went_away_completes_and_its_retry_gets_the_answer() {
    let redis = common::redis::RedisServer::start().await;
    let url = format!("--redis-url={}", redis.url());
    for (n, args) in [&[][..], &[url.as_str()][..]].into_iter().enumerate() {
        let fake = FakeSinch::start().await;
        fake.set_echo_delay(Duration::from_millis(500));
        let service = Service::against(&fake, args).await;
        let request = query(contact("C"), &format!("went-away-{n}"));
        let mut gone = service.client().await;
        let first = tokio::spawn({
            let request = request.clone();
            async move { gone.query_capability(request).await }
        });
        fake.until_queries(1).await;
        first.abort();
        let _ = first.await;
        let mut retry = Request::new(request);
        retry.set_timeout(Duration::from_secs(5));
        let answer = service.client().await.query_capability(retry).await;
        assert_eq!(answer.unwrap().into_inner().request_id, format!("went-away-{n}"));
        assert_eq!(fake.queries().len(), 1, "round {n}: sent once");
    }
}

/// A repeat of a request_id whose first attempt is still being sent waits for it within its own deadline, not
/// the first attempt's, and gives back its place among the queries in flight when it gives up: repeats of a stuck
/// request_id do not fill the replica. They waited for the first attempt whatever their deadline, each holding a
/// place, so that a new query was refused OVERLOADED.
#[tokio::test]
async fn a_repeat_waits_for_the_first_attempt_within_its_own_deadline() {
    let fake = FakeSinch::start().await;
    fake.set_echo_delay(Duration::from_secs(30));
    let service = Service::against(&fake, &["--query-timeout=500ms", "--max-inflight-queries=2"]).await;
    let client = service.client().await;
    let first = tokio::spawn({
        let mut client = client.clone();
        let mut request = Request::new(query(contact("C"), "stuck"));
        request.set_timeout(Duration::from_secs(60));
        async move { client.query_capability(request).await }
    });
    fake.until_queries(1).await;
    for _ in 0..3 {
        // No grpc-timeout: the service's own budget, 500 ms, is the repeat's deadline.
        let status = client
            .clone()
            .query_capability(query(contact("C"), "stuck"))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    }
    assert!(!first.is_finished(), "the first attempt is still being sent");
    fake.set_echo_delay(Duration::ZERO);
    let other = client.clone().query_capability(query(contact("C"), "other")).await;
    assert_eq!(other.unwrap().into_inner().request_id, "other");
    assert_eq!(fake.queries().len(), 2, "the repeats sent nothing");
    first.abort();
}

/// A query whose caller's deadline passes while Sinch is still answering it goes on (for a while) holding its
/// request_id: the caller's retry gets Sinch's answer instead of asking a second time, which Sinch would take as a
/// second query (its callbacks paid for again from the app's budget) — in process, and with Redis on another
/// replica. The send was cut at the deadline and the request_id freed, so the retry sent the query again.
#[tokio::test]
async fn a_retry_after_a_send_cut_by_its_deadline_gets_its_answer_without_asking_again() {
    let redis = common::redis::RedisServer::start().await;
    let url = format!("--redis-url={}", redis.url());
    for (n, args) in [&[][..], &[url.as_str()][..]].into_iter().enumerate() {
        let fake = FakeSinch::start().await;
        fake.set_echo_delay(Duration::from_secs(3));
        let args = [args, &["--query-timeout=1s"]].concat();
        let first = Service::against(&fake, &args).await;
        let other = Service::against(&fake, &args).await;
        // In process the retry comes to the same replica; with Redis, to another.
        let retried = if n == 0 { &first } else { &other };
        let request_id = format!("late-{n}");
        // No grpc-timeout: the service's own budget, 1 s, is its deadline.
        let cut = query(contact("C"), &request_id);
        let status = first.client().await.query_capability(cut).await.unwrap_err();
        assert_eq!(status.code(), Code::DeadlineExceeded, "round {n}: {status:?}");
        assert_eq!(fake.queries().len(), 1, "round {n}: sent before its deadline");
        let mut retry = Request::new(query(contact("C"), &request_id));
        retry.set_timeout(Duration::from_secs(30));
        let answer = retried.client().await.query_capability(retry).await;
        assert_eq!(answer.unwrap().into_inner().request_id, request_id);
        assert_eq!(fake.queries().len(), 1, "round {n}: the retry sent nothing");
    }
}

#[tokio::test]
async fn a_failed_attempt_is_not_remembered_so_a_retry_reaches_sinch() {
    let fake = FakeSinch::start().await;
    fake.script_queries([Canned::sinch_error(400, "INVALID_ARGUMENT", "no such channel")]);
    let service = Service::against(&fake, &[]).await;
    let mut client = service.client().await;
    let request = query(contact("C"), "idem-retry");
    assert!(client.query_capability(request.clone()).await.is_err());
    assert!(client.query_capability(request).await.is_ok());
    assert_eq!(fake.queries().len(), 2);
}

/// A request_id whose query Sinch refused is free again, for the corrected question too — as it is with Redis,
/// where the failed attempt's claim is released: the answer does not depend on the replica reached.
#[tokio::test]
async fn a_request_id_whose_query_failed_can_be_used_for_the_corrected_question() {
    let fake = FakeSinch::start().await;
    fake.script_queries([Canned::sinch_error(400, "INVALID_ARGUMENT", "no such contact")]);
    let service = Service::against(&fake, &[]).await;
    let mut client = service.client().await;
    assert!(
        client
            .query_capability(query(contact("wrong"), "idem-fixed"))
            .await
            .is_err()
    );
    let fixed = client.query_capability(query(contact("right"), "idem-fixed")).await;
    assert!(fixed.is_ok(), "{fixed:?}");
    assert_eq!(fake.queries().len(), 2);
}

#[tokio::test]
async fn one_token_serves_every_call_and_is_asked_for_as_oauth2_requires() {
    let fake = FakeSinch::start().await;
    let service = Service::against(&fake, &[]).await;
    let client = service.client().await;
    let calls = (0..20).map(|i| {
        let mut client = client.clone();
        tokio::spawn(async move { client.query_capability(query(contact(&format!("C{i}")), "")).await })
    });
    for r in futures::future::join_all(calls).await {
        r.unwrap().unwrap();
    }
    let tokens = fake.token_requests();
    assert_eq!(tokens.len(), 1, "one token for 20 concurrent calls");
    assert_eq!(tokens[0].header("authorization"), basic());
    assert_eq!(tokens[0].header("content-type"), "application/x-www-form-urlencoded");
    assert_eq!(&tokens[0].body[..], b"grant_type=client_credentials");
    assert!(
        fake.queries()
            .iter()
            .all(|q| q.header("authorization") == "Bearer token-1")
    );
}

/// The token is refreshed before it expires, in the background: a query meanwhile goes out with the current token
/// however slow the token endpoint is, and later ones with the new token.
#[tokio::test]
async fn the_token_is_refreshed_before_it_expires_without_holding_up_a_query() {
    let fake = FakeSinch::start().await;
    fake.set_token_lifetime(10); // the shortest lifetime taken as it is: refreshed after half of it, 5 s
    let service = Service::against(&fake, &[]).await;
    let mut client = service.client().await;
    client.query_capability(query(contact("C"), "")).await.unwrap();
    let slow = r#"{"access_token":"token-slow","token_type":"bearer","expires_in":3600}"#;
    fake.script_tokens([Canned::new(200, slow).delayed(Duration::from_secs(2))]);
    tokio::time::sleep(Duration::from_millis(5100)).await; // let the token reach its refresh time
    let quick = query_within(Duration::from_millis(500));
    client
        .query_capability(quick)
        .await
        .expect("sent with the current token");
    assert_eq!(fake.queries()[1].header("authorization"), "Bearer token-1");
    // The refresh lands a moment later (bounded: 100 looks 50 ms apart).
    for _ in 0..100 {
        client.query_capability(query(contact("C"), "")).await.unwrap();
        if fake.queries().last().unwrap().header("authorization") == "Bearer token-slow" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        fake.queries().last().unwrap().header("authorization"),
        "Bearer token-slow"
    );
    assert_eq!(fake.token_requests().len(), 2);
}

/// A token endpoint slower than every caller's deadline: the first caller gives up, the token it started to
/// fetch still arrives, and the next caller uses it (each caller asking anew never got one).
#[tokio::test]
async fn a_token_endpoint_slower_than_the_callers_still_yields_a_token() {
    let fake = FakeSinch::start().await;
    let slow = r#"{"access_token":"token-slow","token_type":"bearer","expires_in":3600}"#;
    fake.script_tokens(std::iter::repeat_n(
        Canned::new(200, slow).delayed(Duration::from_millis(800)),
        10,
    ));
    let service = Service::against(&fake, &[]).await;
    let mut client = service.client().await;
    let mut answered = Vec::new();
    for _ in 0..3 {
        let request = query_within(Duration::from_millis(500));
        answered.push(client.query_capability(request).await.is_ok());
    }
    assert_eq!(answered, [false, true, true]);
    assert_eq!(fake.token_requests().len(), 1);
}

/// The token each query went out with, in order.
fn tokens_used(fake: &FakeSinch) -> Vec<String> {
    fake.queries()
        .iter()
        .map(|q| q.header("authorization").to_owned())
        .collect()
}

/// Sinch's 401 for a bearer token it refused, in `description`'s words.
fn token_refused(description: &str) -> Canned {
    Canned::sinch_error(401, "UNAUTHENTICATED", "Request had invalid credentials.").header(
        "www-authenticate",
        &format!("Bearer error=\"invalid_token\", error_description=\"{description}\""),
    )
}

#[tokio::test]
async fn an_expired_token_is_dropped_and_the_query_sent_once_more() {
    let fake = FakeSinch::start().await;
    fake.script_queries([token_refused("The access token expired")]);
    let service = Service::against(&fake, &[]).await;
    let mut client = service.client().await;
    client.query_capability(query(contact("C"), "r-expired")).await.unwrap();
    assert_eq!(tokens_used(&fake), ["Bearer token-1", "Bearer token-2"]);
    assert_eq!(fake.queries()[0].body, fake.queries()[1].body);
}

/// A token Sinch refused in other words than "expired" (revoked, unknown after a restart of its side) is not
/// used again: the next query asks for a new one, rather than every query failing until the token's hour is up.
#[tokio::test]
async fn a_token_refused_in_any_words_is_not_used_again() {
    let fake = FakeSinch::start().await;
    fake.script_queries([token_refused("unknown token")]);
    let service = Service::against(&fake, &[]).await;
    let mut client = service.client().await;
    let refused = client
        .query_capability(query(contact("C"), "r-revoked"))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Internal, "not retried: {refused:?}");
    client.query_capability(query(contact("C"), "r-after")).await.unwrap();
    assert_eq!(tokens_used(&fake), ["Bearer token-1", "Bearer token-2"]);
}

/// The query sent again after an expired token is one more request under this replica's rate limit.
#[tokio::test]
async fn the_query_sent_again_after_an_expired_token_waits_for_the_rate_limit() {
    let fake = FakeSinch::start().await;
    fake.script_queries([token_refused("The access token expired")]);
    let service = Service::against(&fake, &["--sinch-rate-limit=1"]).await;
    let mut client = service.client().await;
    let mut request = Request::new(query(contact("C"), "r-expired-paced"));
    request.set_timeout(Duration::from_millis(500));
    let status = client.query_capability(request).await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert_eq!(fake.queries().len(), 1, "the second send would pass the rate limit");
}

#[tokio::test]
async fn refused_credentials_are_reported_as_ours_not_the_callers() {
    let (fake, status) = failing_query([Canned::sinch_error(
        401,
        "UNAUTHENTICATED",
        "Request had invalid credentials.",
    )])
    .await;
    assert_eq!(status.code(), Code::Internal);
    assert!(status.message().contains("credentials"), "{}", status.message());
    assert_eq!(fake.queries().len(), 1, "a plain 401 is not retried");

    fake.script_tokens([Canned::new(
        401,
        r#"{"error":"invalid_client","error_description":"Bad client credentials"}"#,
    )]);
    let service = Service::against(&fake, &[]).await;
    let mut client = service.client().await;
    let status = client.query_capability(query(contact("C"), "")).await.unwrap_err();
    assert_eq!(status.code(), Code::Internal);
    assert!(
        status.message().contains("Bad client credentials"),
        "{}",
        status.message()
    );
}

/// A token endpoint asking for an hour's pause does not hold the one refresh every call waits on for that hour:
/// the pause is at most the retry policy's, and the next try's token serves the call (which waited out its
/// deadline, every later call too, until the hour was over).
#[tokio::test]
async fn a_token_endpoints_long_retry_after_does_not_hold_the_refresh_for_as_long() {
    let fake = FakeSinch::start().await;
    fake.script_tokens([Canned::new(429, r#"{"error":"slow_down"}"#).header("retry-after", "3600")]);
    let service = Service::against(&fake, &[]).await;
    let mut request = Request::new(query(contact("C"), ""));
    request.set_timeout(Duration::from_secs(20));
    let answer = service.client().await.query_capability(request).await;
    assert!(answer.is_ok(), "{answer:?}");
    assert_eq!(fake.queries().len(), 1);
}

#[tokio::test]
async fn basic_mode_sends_the_key_on_every_call_and_never_asks_for_a_token() {
    let fake = FakeSinch::start().await;
    let service = Service::against(&fake, &["--sinch-auth=basic"]).await;
    let mut client = service.client().await;
    for _ in 0..2 {
        client.query_capability(query(contact("C"), "")).await.unwrap();
    }
    assert!(fake.token_requests().is_empty());
    assert!(fake.queries().iter().all(|q| q.header("authorization") == basic()));
}

/// A 200 whose body breaks off: Sinch accepted the query, under the request_id sent (as it answers in every
/// documented case), so the caller gets that, and neither the service nor the caller's retry sends it again
/// (Sinch does not tell a repeat from a new query: each costs a query and its callbacks).
#[tokio::test]
async fn a_200_whose_body_breaks_off_is_taken_as_accepted_and_not_sent_again() {
    let fake = FakeSinch::start().await;
    fake.script_queries([Canned::new(200, r#"{"request_id":"#).cut_short()]);
    let service = Service::against(&fake, &[]).await;
    let mut client = service.client().await;
    let request = query(contact("C"), "cut-1");
    let answer = client.query_capability(request.clone()).await;
    assert_eq!(fake.queries().len(), 1, "{answer:?}");
    assert_eq!(answer.unwrap().into_inner().request_id, "cut-1");
    let again = client.query_capability(request).await.unwrap().into_inner();
    assert_eq!(again.request_id, "cut-1");
    assert_eq!(fake.queries().len(), 1, "the retry got the first answer");
}

#[tokio::test]
async fn a_503_is_retried_with_the_same_request_id() {
    let fake = FakeSinch::start().await;
    fake.script_queries([
        Canned::sinch_error(503, "UNAVAILABLE", "try later"),
        Canned::new(502, "<html>bad gateway</html>"),
    ]);
    let service = Service::against(&fake, &[]).await;
    let mut client = service.client().await;
    let answer = client
        .query_capability(query(contact("C"), ""))
        .await
        .unwrap()
        .into_inner();
    let sent = fake.queries();
    assert_eq!(sent.len(), 3);
    assert!(
        sent.iter()
            .all(|q| q.json()["request_id"] == answer.request_id.as_str())
    );
}

/// In seconds (Sinch's) and as an HTTP date (HTTP's other form, which was ignored: the back-off's 250 ms or so).
#[tokio::test]
async fn a_429_is_retried_after_the_time_sinch_asks_for() {
    for as_date in [false, true] {
        // A date in whole seconds, made as the refusal is scripted: at least 2 s from then.
        let retry_after = match as_date {
            false => "1".to_owned(),
            true => httpdate::fmt_http_date(std::time::SystemTime::now() + Duration::from_secs(3)),
        };
        let retry_after = retry_after.as_str();
        let fake = FakeSinch::start().await;
        let refused = Canned::sinch_error(429, "RESOURCE_EXHAUSTED", "slow down").header("retry-after", retry_after);
        fake.script_queries([refused]);
        let service = Service::against(&fake, &[]).await;
        let mut client = service.client().await;
        client.query_capability(query(contact("C"), "")).await.unwrap();
        let sent = fake.queries();
        assert_eq!(sent.len(), 2, "{retry_after}");
        // A lower bound on the pause the service made, measured where it shows: between the two arrivals at Sinch.
        // A slow machine only lengthens it; it is short only if Retry-After was not honoured.
        let pause = sent[1].at - sent[0].at;
        assert!(
            pause >= Duration::from_secs(1),
            "Retry-After {retry_after} was honoured: {pause:?}"
        );
    }
}

#[tokio::test]
async fn a_400_is_not_retried_and_carries_sinchs_words() {
    let (fake, status) = failing_query([Canned::sinch_error(
        400,
        "INVALID_ARGUMENT",
        "Invalid value for channel",
    )])
    .await;
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("Invalid value for channel"));
    let info = status.get_details_error_info().expect("ErrorInfo");
    assert_eq!(info.metadata["http_status"], "400");
    assert_eq!(info.metadata["sinch_status"], "INVALID_ARGUMENT");
    assert_eq!(info.metadata["sinch_message"], "Invalid value for channel");
    assert_eq!(fake.queries().len(), 1);
}

/// Sinch's words are passed on, but not without a bound: a 64 KiB message (Sinch's, or a proxy's before it) went
/// whole into the status message and its details, a trailer far past what gRPC clients take (a few KiB).
#[tokio::test]
async fn sinchs_words_are_passed_on_within_a_bound() {
    let long = format!("Invalid value for channel {}", "x".repeat(64 * 1024));
    let (_fake, status) = failing_query([Canned::sinch_error(400, "INVALID_ARGUMENT", &long)]).await;
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status.message().contains("Invalid value for channel"),
        "{}",
        status.message()
    );
    assert!(
        status.message().len() <= 1024,
        "{} bytes of message",
        status.message().len()
    );
    let info = status.get_details_error_info().expect("ErrorInfo");
    let passed = &info.metadata["sinch_message"];
    assert!(passed.starts_with("Invalid value for channel xxx"), "{passed}");
    assert!(passed.len() <= 1024, "{} bytes of Sinch's message", passed.len());
}

#[tokio::test]
async fn each_upstream_failure_maps_to_its_code() {
    let retry_forever = |canned: Canned| std::iter::repeat_n(canned, 10);
    let cases: Vec<(Vec<Canned>, Code, &str)> = vec![
        (
            vec![Canned::sinch_error(404, "NOT_FOUND", "App not found")],
            Code::NotFound,
            "App not found",
        ),
        (
            retry_forever(Canned::sinch_error(429, "RESOURCE_EXHAUSTED", "quota").header("retry-after", "0")).collect(),
            Code::ResourceExhausted,
            "quota",
        ),
        (
            retry_forever(Canned::sinch_error(500, "INTERNAL", "boom")).collect(),
            Code::Unavailable,
            "boom",
        ),
        (
            retry_forever(Canned::new(408, "<html>request timeout</html>")).collect(),
            Code::Unavailable,
            "408",
        ),
        (
            vec![Canned::sinch_error(
                403,
                "PERMISSION_DENIED",
                "BILLING_CREDIT_LIMIT_BREACHED",
            )],
            Code::FailedPrecondition,
            "billing",
        ),
        (
            vec![Canned::new(200, r#"{"app_id":"APP-1","recipient":{"contact_id":"C"}}"#)],
            Code::Unavailable,
            "no request_id",
        ),
        (
            vec![Canned::new(200, "<html><body>proxy login</body></html>")],
            Code::Unavailable,
            "not the documented JSON",
        ),
        (
            vec![Canned::new(200, r#"{"app_id":"APP-1","recipient":{"conta"#)],
            Code::Unavailable,
            "not the documented JSON",
        ),
    ];
    for (script, code, words) in cases {
        let (_fake, status) = failing_query(script).await;
        assert_eq!(status.code(), code, "{status:?}");
        assert!(status.message().contains(words), "{code:?}: {}", status.message());
        if code == Code::ResourceExhausted {
            assert!(
                status.get_details_retry_info().is_some(),
                "RetryInfo on RESOURCE_EXHAUSTED"
            );
        }
    }
}

/// A 503 whose `Retry-After` is past the caller's deadline is not waited for: the caller is told Sinch's wait in a
/// `RetryInfo`, as on a 429. It got UNAVAILABLE without it, and a retry policy came back at once.
#[tokio::test]
async fn sinchs_wait_on_an_unavailable_answer_is_passed_on() {
    let (fake, status) =
        failing_query([Canned::sinch_error(503, "UNAVAILABLE", "busy").header("retry-after", "30")]).await;
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    let retry = status.get_details_retry_info().expect("RetryInfo").retry_delay.unwrap();
    assert_eq!(retry, Duration::from_secs(30));
    assert_eq!(fake.queries().len(), 1, "not retried before the wait Sinch asked for");
}

/// A retry this replica's rate limit cannot admit before the deadline fails with what Sinch answered, the cause,
/// not with the rate limit: RESOURCE_EXHAUSTED `RATE_LIMITED` hid Sinch's 503.
#[tokio::test]
async fn a_retry_kept_out_by_the_rate_limit_fails_with_sinchs_answer() {
    let fake = FakeSinch::start().await;
    fake.script_queries([Canned::sinch_error(503, "UNAVAILABLE", "down")]);
    let service = Service::against(&fake, &["--sinch-rate-limit=1"]).await;
    let mut client = service.client().await;
    let status = client
        .query_capability(query_within(Duration::from_millis(500)))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    let info = status.get_details_error_info().expect("ErrorInfo");
    assert_eq!(info.metadata["http_status"], "503", "{status:?}");
    // When the limit would have let the retry go, not a wait Sinch asked for (it gave none).
    let retry = status.get_details_retry_info().expect("RetryInfo").retry_delay.unwrap();
    assert!(retry > Duration::ZERO && retry <= Duration::from_secs(1), "{retry:?}");
    assert_eq!(fake.queries().len(), 1, "the retry was not admitted");
}

#[tokio::test]
async fn an_unreachable_sinch_is_unavailable() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);
    let service = Service::start(common::config(&url, &[])).await;
    let mut client = service.client().await;
    let status = client.query_capability(query(contact("C"), "")).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
}

#[tokio::test]
async fn the_callers_deadline_bounds_the_call_and_its_retries() {
    let fake = FakeSinch::start().await;
    fake.set_echo_delay(Duration::from_secs(5));
    let service = Service::against(&fake, &[]).await;
    let mut client = service.client().await;
    // tonic's client ends a call at its deadline on its own, as CANCELLED "Timeout expired"; so the status the
    // service sends is what proves that it, not the caller's timer, ended the call in time.
    let request = query_within(Duration::from_millis(300));
    let status = client.query_capability(request).await.unwrap_err();
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");

    let fake = FakeSinch::start().await;
    fake.script_queries(std::iter::repeat_n(
        Canned::sinch_error(503, "UNAVAILABLE", "down"),
        100,
    ));
    let service = Service::against(&fake, &[]).await;
    let mut client = service.client().await;
    let request = query_within(Duration::from_millis(400));
    let status = client.query_capability(request).await.unwrap_err();
    // Sinch's own error, not the caller's timer: the service stopped retrying and answered before the deadline.
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(status.message().contains("down"), "{}", status.message());
    assert!(fake.queries().len() >= 2, "retried while time remained");
}

#[tokio::test]
async fn over_the_rate_limit_callers_wait_within_their_deadline_then_are_told_to_retry() {
    let fake = FakeSinch::start().await;
    let service = Service::against(&fake, &["--sinch-rate-limit=1"]).await;
    let mut client = service.client().await;
    client.query_capability(query(contact("C"), "")).await.unwrap();
    let request = query_within(Duration::from_millis(200));
    let status = client.query_capability(request).await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    let retry = status.get_details_retry_info().expect("RetryInfo").retry_delay.unwrap();
    assert!(retry > Duration::ZERO && retry <= Duration::from_secs(1), "{retry:?}");
    // A caller with time to spare waits its turn instead.
    let request = query_within(Duration::from_secs(3));
    client.query_capability(request).await.unwrap();
    assert_eq!(fake.queries().len(), 2);
}

#[tokio::test]
async fn a_token_endpoint_down_at_start_is_retried_within_the_deadline() {
    let fake = FakeSinch::start().await;
    fake.script_tokens(std::iter::repeat_n(Canned::new(503, "<html>maintenance</html>"), 2));
    let service = Service::against(&fake, &[]).await;
    let mut client = service.client().await;
    // The token endpoint's back-off pauses at most 1 s, then at most 4 s: within the deadline.
    let request = query_within(Duration::from_secs(10));
    client
        .query_capability(request)
        .await
        .expect("answered once the token came");
    assert_eq!(fake.token_requests().len(), 3);
    assert_eq!(fake.queries().len(), 1, "nothing was sent without a token");
}

#[tokio::test]
async fn a_token_endpoint_down_mid_run_costs_nothing_until_the_token_expires_then_recovers() {
    let fake = FakeSinch::start().await;
    fake.set_token_lifetime(10); // refreshed from 5 s, expired at 10 s
    let service = Service::against(&fake, &[]).await;
    let mut client = service.client().await;
    client.query_capability(query(contact("C"), "")).await.unwrap();
    fake.script_tokens(std::iter::repeat_n(Canned::new(503, "down"), 1000));
    tokio::time::sleep(Duration::from_millis(5100)).await; // past the refresh time, before expiry
    client
        .query_capability(query(contact("C"), ""))
        .await
        .expect("the current token is still valid");
    assert_eq!(fake.queries()[1].header("authorization"), "Bearer token-1");
    for _ in 0..40 {
        client.query_capability(query(contact("C"), "")).await.unwrap();
    }
    assert!(
        fake.token_requests().len() <= 4,
        "one refresh of three tries, not one per query: {}",
        fake.token_requests().len()
    );
    tokio::time::sleep(Duration::from_millis(5000)).await; // past expiry
    let request = query_within(Duration::from_millis(500));
    let status = client.query_capability(request).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(status.message().contains("503"), "{}", status.message());
    fake.clear_token_script();
    client
        .query_capability(query(contact("C"), ""))
        .await
        .expect("recovered once the token endpoint is back");
    assert_eq!(fake.queries().last().unwrap().header("authorization"), "Bearer token-2");
}

#[tokio::test]
async fn a_200_with_only_a_request_id_is_an_accepted_query() {
    let fake = FakeSinch::start().await;
    fake.script_queries([
        Canned::new(200, r#"{"request_id":"R-LEAN"}"#),
        Canned::new(
            200,
            r#"{"app_id":"APP-1","recipient":{"contact_id":"C","new_key":true},"request_id":"R-EXTRA","more":1}"#,
        ),
    ]);
    let service = Service::against(&fake, &[]).await;
    let mut client = service.client().await;
    for expected in ["R-LEAN", "R-EXTRA"] {
        let answer = client
            .query_capability(query(contact("C"), expected))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(answer.request_id, expected);
        assert_eq!(answer.app_id, "APP-1");
        assert_eq!(answer.recipient, Some(contact("C")));
    }
}

#[tokio::test]
async fn sinchs_own_request_id_is_returned_and_the_query_record_follows_it() {
    let fake = FakeSinch::start().await;
    fake.script_queries([Canned::new(200, r#"{"request_id":"SINCH-CHOSE"}"#)]);
    let service = Service::against(&fake, &[]).await;
    let mut client = service.client().await;
    let answer = client
        .query_capability(query(identities(&[(Channel::Sms, "46700000001")]), "WE-SENT"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(answer.request_id, "SINCH-CHOSE");
    let body = common::capability_body("SINCH-CHOSE", "SMS", "46700000001", "CAPABILITY_FULL");
    assert_eq!(common::deliver(service.webhook_addr, body).await, 200);
    let stream = client
        .watch_capability(common::watch_request("SINCH-CHOSE", 0, Some(Duration::from_secs(60))))
        .await
        .unwrap()
        .into_inner();
    let (seen, end) = common::drain(stream).await;
    assert_eq!(seen.len(), 1);
    assert_eq!(
        end.unwrap().reason(),
        pb::CompletionReason::AllChannelsReported,
        "the expected channels were recorded under Sinch's request_id"
    );
}

#[tokio::test]
async fn a_501_is_retried_and_a_retry_info_in_details_is_honoured_in_both_shapes() {
    let retry_info = |shape: &str| {
        let detail = match shape {
            "@type" => serde_json::json!({"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "1s"}),
            _ => serde_json::json!({"type_url": "type.googleapis.com/google.rpc.RetryInfo",
                "value": {"retryDelay": "1s"}}),
        };
        let body = serde_json::json!({"error": {"code": 429, "message": "slow down", "status": "RESOURCE_EXHAUSTED",
            "details": [detail]}});
        Canned::new(429, body.to_string())
    };
    let fake = FakeSinch::start().await;
    fake.script_queries([
        Canned::sinch_error(501, "NOT_IMPLEMENTED", "not now"),
        retry_info("@type"),
        retry_info("type_url"),
    ]);
    let service = Service::against(&fake, &[]).await;
    let mut client = service.client().await;
    let request = query_within(Duration::from_secs(20));
    client
        .query_capability(request)
        .await
        .expect("answered after the retries");
    let sent = fake.queries();
    assert_eq!(sent.len(), 4, "501 and both 429s were retried");
    // Lower bounds on the pauses the service made, seen where they show: a slow machine only lengthens them.
    for (before, after) in [(1, 2), (2, 3)] {
        let pause = sent[after].at - sent[before].at;
        assert!(pause >= Duration::from_secs(1), "RetryInfo honoured: {pause:?}");
    }
}

#[tokio::test]
async fn a_throttled_token_endpoint_is_tried_three_times_for_all_callers_together() {
    let fake = FakeSinch::start().await;
    let throttled = || Canned::new(429, r#"{"error":"too_many_requests","error_description":"slow down"}"#);
    // The first answer is slow so that every caller is waiting on that one refresh.
    fake.script_tokens([throttled().delayed(Duration::from_secs(2)), throttled(), throttled()]);
    let service = Service::against(&fake, &[]).await;
    let mut clients = Vec::new();
    for _ in 0..8 {
        clients.push(service.client().await);
    }
    let calls = clients.into_iter().map(|mut client| async move {
        let request = query_within(Duration::from_secs(30));
        client.query_capability(request).await
    });
    for result in futures::future::join_all(calls).await {
        let status = result.unwrap_err();
        assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    }
    assert_eq!(
        fake.token_requests().len(),
        3,
        "one refresh of three tries, shared by every caller"
    );
    assert!(fake.queries().is_empty());
    // The endpoint is back: the next call gets a token.
    service
        .client()
        .await
        .query_capability(query(contact("C"), ""))
        .await
        .unwrap();
}

#[tokio::test]
async fn a_tokens_lifetime_is_clamped_to_a_sane_range() {
    for lifetime in [0, usize::MAX] {
        let fake = FakeSinch::start().await;
        fake.set_token_lifetime(lifetime);
        let service = Service::against(&fake, &[]).await;
        let mut client = service.client().await;
        for _ in 0..3 {
            client.query_capability(query(contact("C"), "")).await.unwrap();
        }
        assert_eq!(
            fake.token_requests().len(),
            1,
            "expires_in {lifetime}: one token serves every call"
        );
    }
}

/// A Sinch that accepts connections and never answers, or answers without end: the calls of the doctor and of the
/// start-up check end at their 10 s (paused time here), the token's included, and an endless answer is refused
/// once past 1 MiB rather than read into memory.
#[tokio::test(start_paused = true)]
async fn the_webhooks_api_calls_end_however_sinch_answers() {
    use capability_facade::{config::AuthMode, secret::Secret, upstream};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let silent_url = format!("http://{}", silent.local_addr().unwrap());
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((connection, _)) = silent.accept().await {
            held.push(connection);
        }
    });
    let endless = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endless_url = format!("http://{}", endless.local_addr().unwrap());
    tokio::spawn(async move {
        while let Ok((mut connection, _)) = endless.accept().await {
            tokio::spawn(async move {
                let mut request = [0; 4096];
                let _ = connection.read(&mut request).await;
                let head = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n";
                connection.write_all(head).await?;
                let chunk = format!("{:x}\r\n{}\r\n", 64 * 1024, " ".repeat(64 * 1024));
                loop {
                    connection.write_all(chunk.as_bytes()).await?;
                }
                #[allow(unreachable_code)]
                Ok::<_, std::io::Error>(())
            });
        }
    });
    let client = |api_url: &str, auth_url: &str, auth: AuthMode| {
        let config = capability_facade::config::SinchConfig {
            project_id: "p".into(),
            key_id: "k".into(),
            key_secret: Secret::new("s"),
            auth,
            api_url: api_url.into(),
            auth_url: auth_url.into(),
            rate_limit: std::num::NonZeroU32::new(10).unwrap(),
        };
        upstream::SinchClient::new(
            &config,
            upstream::RetryPolicy::default(),
            upstream::TokenRetry::default(),
        )
        .unwrap()
    };
    let silent_token = client(&endless_url, &format!("{silent_url}/oauth2/token"), AuthMode::OAuth2);
    let obtained = silent_token.obtain_token().await.unwrap_err().to_string();
    let listed = silent_token.list_webhooks("APP").await.unwrap_err().to_string();
    for error in [obtained, listed] {
        assert!(error.contains("deadline") || error.contains("timed out"), "{error}");
    }
    let silent_api = client(&silent_url, &silent_url, AuthMode::Basic);
    assert!(matches!(
        silent_api.list_webhooks("APP").await,
        Err(upstream::Error::DeadlineExceeded)
    ));
    let endless_api = client(&endless_url, &endless_url, AuthMode::Basic);
    let error = endless_api.list_webhooks("APP").await.unwrap_err().to_string();
    assert!(error.contains("longer than"), "{error}");
}

/// A malformed query is told what is wrong even when the replica is full: shedding is for what could be sent, not
/// a reason to retry a request that will never pass.
#[tokio::test]
async fn a_malformed_query_is_refused_as_such_even_when_the_replica_is_full() {
    let fake = FakeSinch::start().await;
    fake.set_echo_delay(Duration::from_secs(2));
    let service = Service::against(&fake, &["--max-inflight-queries=1"]).await;
    let mut client = service.client().await;
    let held = {
        let mut client = client.clone();
        tokio::spawn(async move { client.query_capability(query(contact("C"), "")).await })
    };
    fake.until_queries(1).await;
    let mut malformed = query(contact("C"), "");
    malformed.app_id.clear();
    let status = client.query_capability(malformed).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    held.await.unwrap().unwrap();
}

/// A repeat that was waiting on a first attempt Sinch refused sends the query itself, and its answer is the
/// request_id's from then on: a third repeat gets it without a third query.
#[tokio::test]
async fn a_repeat_that_succeeded_after_a_failed_first_attempt_answers_the_next_repeats() {
    let fake = FakeSinch::start().await;
    fake.script_queries([Canned::sinch_error(400, "INVALID_ARGUMENT", "refused").delayed(Duration::from_millis(500))]);
    let service = Service::against(&fake, &[]).await;
    let client = service.client().await;
    let send = || {
        let mut client = client.clone();
        tokio::spawn(async move { client.query_capability(query(contact("C"), "idem-race")).await })
    };
    let first = send();
    fake.until_queries(1).await;
    let second = send();
    assert!(first.await.unwrap().is_err());
    second.await.unwrap().unwrap();
    send().await.unwrap().unwrap();
    assert_eq!(fake.queries().len(), 2, "the third repeat found the second's answer");
}

/// A caller that goes away while its query is being sent does not free its place among the queries in flight:
/// the sending goes on (so that a retry finds its answer), and counts until it ends.
#[tokio::test]
async fn a_query_whose_caller_went_away_still_counts_in_flight_until_it_is_sent() {
    let fake = FakeSinch::start().await;
    fake.set_echo_delay(Duration::from_secs(2));
    let service = Service::against(&fake, &["--max-inflight-queries=1"]).await;
    let client = service.client().await;
    let gone = {
        let mut client = client.clone();
        tokio::spawn(async move { client.query_capability(query(contact("C"), "gone")).await })
    };
    fake.until_queries(1).await;
    gone.abort();
    let _ = gone.await;
    let status = client
        .clone()
        .query_capability(query(contact("D"), "next"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert_eq!(fake.queries().len(), 1);
}

/// A repeat of a request_id whose first call is still waiting for Sinch on this replica waits for that answer: it
/// sends nothing, so the rate limit does not keep it out. It was refused RESOURCE_EXHAUSTED when the budget was
/// spent, to retry what was being done.
#[tokio::test]
async fn a_repeat_of_a_request_id_being_asked_waits_for_its_answer_whatever_the_rate_limit() {
    let fake = FakeSinch::start().await;
    let service = Service::against(&fake, &["--sinch-rate-limit=1"]).await;
    fake.set_echo_delay(Duration::from_millis(200));
    let first = tokio::spawn({
        let mut client = service.client().await;
        async move { client.query_capability(query(contact("C"), "asking")).await }
    });
    fake.until_queries(1).await;
    let mut repeat = Request::new(query(contact("C"), "asking"));
    // Well within the wait for the budget's next query (a second after the first), longer than Sinch's answer.
    repeat.set_timeout(Duration::from_millis(400));
    let repeated = service.client().await.query_capability(repeat).await;
    let answer = first.await.unwrap().unwrap().into_inner();
    assert_eq!(repeated.unwrap().into_inner(), answer);
    assert_eq!(fake.queries().len(), 1);
}

/// Nor does a repeat of an answered request_id spend the budget: a client's retry after a lost answer took the
/// token a new query then lacked (and waited for one, when the budget was spent, for an answer already there).
#[tokio::test]
async fn a_repeat_of_an_answered_request_id_leaves_the_rate_budget_to_new_queries() {
    let redis = common::redis::RedisServer::start().await;
    let url = format!("--redis-url={}", redis.url());
    for (n, args) in [&[][..], &[url.as_str()][..]].into_iter().enumerate() {
        let fake = FakeSinch::start().await;
        let mut args = args.to_vec();
        // Two queries at once, then one every half second.
        args.push("--sinch-rate-limit=2");
        let service = Service::against(&fake, &args).await;
        let mut client = service.client().await;
        let request_id = format!("budget-{n}");
        let answer = client
            .query_capability(query(contact("C"), &request_id))
            .await
            .unwrap()
            .into_inner();
        let repeated = client.query_capability(query(contact("C"), &request_id)).await.unwrap();
        assert_eq!(repeated.into_inner(), answer, "round {n}");
        let mut new = Request::new(query(contact("D"), ""));
        new.set_timeout(Duration::from_millis(100));
        let admitted = client.query_capability(new).await;
        assert!(admitted.is_ok(), "round {n}: {admitted:?}");
        assert_eq!(fake.queries().len(), 2, "round {n}");
    }
}

/// A repeat of an answered request_id sends nothing, so the rate limit does not keep it out: it gets the stored
/// answer (or ALREADY_EXISTS for another question) at once, on the replica that answered and on another one, even
/// when that replica has used its budget. It was told RESOURCE_EXHAUSTED, to retry what was already done.
#[tokio::test]
async fn a_repeat_of_an_answered_request_id_is_answered_whatever_the_rate_limit() {
    let redis = common::redis::RedisServer::start().await;
    let url = format!("--redis-url={}", redis.url());
    for (n, args) in [&[][..], &[url.as_str()][..]].into_iter().enumerate() {
        let fake = FakeSinch::start().await;
        let mut args = args.to_vec();
        args.push("--sinch-rate-limit=1");
        let first = Service::against(&fake, &args).await;
        let request_id = format!("rate-{n}");
        let answer = first
            .client()
            .await
            .query_capability(query(contact("C"), &request_id))
            .await
            .unwrap()
            .into_inner();
        // In process, the repeat comes to the same replica; with Redis, to another one whose budget is spent too.
        let other;
        let repeat_to = if n == 0 {
            &first
        } else {
            other = Service::against(&fake, &args).await;
            other
                .client()
                .await
                .query_capability(query(contact("D"), ""))
                .await
                .unwrap();
            &other
        };
        let mut client = repeat_to.client().await;
        let mut repeat = Request::new(query(contact("C"), &request_id));
        repeat.set_timeout(Duration::from_millis(200));
        let repeated = client.query_capability(repeat).await;
        assert_eq!(repeated.unwrap().into_inner(), answer, "round {n}");
        let mut changed = Request::new(query(contact("E"), &request_id));
        changed.set_timeout(Duration::from_millis(200));
        let status = client.query_capability(changed).await.unwrap_err();
        assert_eq!(status.code(), Code::AlreadyExists, "round {n}: {status:?}");
        assert_eq!(fake.queries().len(), n + 1, "round {n}: nothing sent again");
    }
}
