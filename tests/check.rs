//! CheckCapability and InvalidateCapability as a caller sees them, against an independent fake Sinch that counts
//! queries: callbacks are delivered by the test, signed, as Sinch would send them.

mod common;

use std::time::Duration;

use capability_facade::grpc::pb::{
    self, CapabilityStatus, Channel, ResultSource, capability_service_client::CapabilityServiceClient,
};
use common::{Canned, CapabilityCallback, FakeSinch, Service, contact, deliver, identities, redis::RedisServer};
use tonic::{Code, transport::Channel as Transport};

const NUMBER: &str = "46700000001";
/// How long a state in Redis is waited for.
const FIVE_SECONDS: Duration = Duration::from_secs(5);

fn check(recipient: pb::Recipient) -> pb::CheckCapabilityRequest {
    pb::CheckCapabilityRequest {
        app_id: "APP-1".into(),
        recipient: Some(recipient),
        wait: Some(prost_types::Duration { seconds: 10, nanos: 0 }),
        ..Default::default()
    }
}

fn duration(d: Duration) -> Option<prost_types::Duration> {
    Some(prost_types::Duration::try_from(d).unwrap())
}

fn callback(request_id: &str, channel: &str, status: &str) -> Vec<u8> {
    CapabilityCallback::new(request_id, channel, NUMBER, status).body()
}

/// The request_id and the (channel, identity) pairs of the `n`-th query the fake received (1-based).
async fn nth_query(fake: &FakeSinch, n: usize) -> (String, Vec<String>) {
    let body = fake.until_queries(n).await[n - 1].json();
    let channels = body["recipient"]["identified_by"]["channel_identities"]
        .as_array()
        .map(|ids| {
            ids.iter()
                .map(|id| id["channel"].as_str().unwrap().to_owned())
                .collect()
        })
        .unwrap_or_default();
    (body["request_id"].as_str().unwrap().to_owned(), channels)
}

/// (channel, status, source) of each result, in order.
fn summary(answer: &pb::CheckCapabilityResponse) -> Vec<(Channel, CapabilityStatus, ResultSource)> {
    answer
        .results
        .iter()
        .map(|r| {
            let n = r.notification.as_ref().unwrap();
            (n.channel(), n.capability_status(), r.source())
        })
        .collect()
}

/// Invalidates `recipient`'s cached results in APP-1; returns how many entries went.
async fn invalidate(client: &mut CapabilityServiceClient<Transport>, recipient: pb::Recipient) -> u64 {
    let request = pb::InvalidateCapabilityRequest {
        app_id: "APP-1".into(),
        recipient: Some(recipient),
    };
    client
        .invalidate_capability(request)
        .await
        .unwrap()
        .into_inner()
        .removed
}

/// Checks SMS `NUMBER` through `client`, answered FULL by a callback to `webhook` for the `n`-th query `fake` gets, so
/// that its result is cached.
async fn cache_sms(
    client: CapabilityServiceClient<Transport>,
    webhook: std::net::SocketAddr,
    fake: &FakeSinch,
    n: usize,
) {
    let first = spawn_check(client, check(identities(&[(Channel::Sms, NUMBER)]))).await;
    let (live_id, _) = nth_query(fake, n).await;
    deliver(webhook, callback(&live_id, "SMS", "CAPABILITY_FULL")).await;
    first.await.unwrap().unwrap();
}

/// Checks contact C-1 on `service`, answered by one callback (WHATSAPP FULL) to the `n`-th query `fake` gets, so
/// that the contact's entry and its identity's are cached.
async fn cache_contact(service: &Service, fake: &FakeSinch, n: usize) {
    let first = spawn_check(service.client().await, check(contact("C-1"))).await;
    let (live_id, _) = nth_query(fake, n).await;
    let body = CapabilityCallback::new(&live_id, "WHATSAPP", NUMBER, "CAPABILITY_FULL").contact_id("C-1");
    deliver(service.webhook_addr, body.body()).await;
    first.await.unwrap().unwrap();
}

/// Starts a check of `recipient` on `starts` (a 60 s wait), lets its caller go once its query is sent, then
/// delivers that query's result for `number`'s SMS (naming `contact_id`, if any) with `status`: a lookup that
/// keeps its lease, its answer in. Returns its request_id.
async fn abandoned_lookup(
    fake: &FakeSinch,
    starts: &Service,
    recipient: pb::Recipient,
    (number, contact_id): (&str, Option<&str>),
    status: &str,
) -> String {
    let asked = fake.queries().len();
    let mut request = check(recipient);
    request.wait = duration(Duration::from_secs(60));
    let starter = spawn_check(starts.client().await, request).await;
    let (live_id, _) = nth_query(fake, asked + 1).await;
    starter.abort();
    let _ = starter.await;
    let mut body = CapabilityCallback::new(&live_id, "SMS", number, status);
    if let Some(contact_id) = contact_id {
        body = body.contact_id(contact_id);
    }
    assert_eq!(deliver(starts.webhook_addr, body.body()).await, 200);
    live_id
}

async fn answer(service: &Service, request: pb::CheckCapabilityRequest) -> pb::CheckCapabilityResponse {
    service
        .client()
        .await
        .check_capability(request)
        .await
        .unwrap()
        .into_inner()
}

async fn spawn_check(
    mut client: CapabilityServiceClient<Transport>,
    request: pb::CheckCapabilityRequest,
) -> tokio::task::JoinHandle<Result<pb::CheckCapabilityResponse, tonic::Status>> {
    tokio::spawn(async move { client.check_capability(request).await.map(|r| r.into_inner()) })
}

#[tokio::test]
async fn a_live_answer_is_cached_and_a_partial_hit_asks_only_about_the_rest() {
    let fake = FakeSinch::start().await;
    let service = Service::against(&fake, &[]).await;
    let mut client = service.client().await;

    let first = spawn_check(
        client.clone(),
        check(identities(&[(Channel::Sms, NUMBER), (Channel::Rcs, NUMBER)])),
    )
    .await;
    let (live_id, asked) = nth_query(&fake, 1).await;
    assert_eq!(asked, ["SMS", "RCS"]);
    assert_eq!(
        deliver(service.webhook_addr, callback(&live_id, "RCS", "CAPABILITY_FULL")).await,
        200
    );
    assert_eq!(
        deliver(service.webhook_addr, callback(&live_id, "SMS", "CAPABILITY_FULL")).await,
        200
    );
    let answer = first.await.unwrap().unwrap();
    assert!(answer.complete && answer.pending.is_empty(), "{answer:?}");
    assert_eq!(answer.request_id, live_id);
    use CapabilityStatus::Full;
    assert_eq!(
        summary(&answer),
        [
            (Channel::Sms, Full, ResultSource::Live),
            (Channel::Rcs, Full, ResultSource::Live)
        ],
        "results come in the request's order"
    );
    assert!(answer.results.iter().all(|r| r.checked_at.is_some()));

    // Two identities known, one not: only the third is asked about.
    let partial = spawn_check(
        client.clone(),
        check(identities(&[
            (Channel::Sms, NUMBER),
            (Channel::Whatsapp, NUMBER),
            (Channel::Rcs, NUMBER),
        ])),
    )
    .await;
    let (second_id, asked) = nth_query(&fake, 2).await;
    assert_eq!(asked, ["WHATSAPP"]);
    deliver(service.webhook_addr, callback(&second_id, "WHATSAPP", "NO_CAPABILITY")).await;
    let answer = partial.await.unwrap().unwrap();
    assert_eq!(
        summary(&answer),
        [
            (Channel::Sms, Full, ResultSource::Cache),
            (Channel::Whatsapp, CapabilityStatus::NoCapability, ResultSource::Live),
            (Channel::Rcs, Full, ResultSource::Cache),
        ]
    );
    let cached = &answer.results[0].notification.as_ref().unwrap();
    assert_eq!(
        (cached.request_id.as_str(), cached.identity.as_str()),
        (live_id.as_str(), NUMBER)
    );

    // Everything fresh: answered without Sinch, and no request_id.
    let hit = client
        .check_capability(check(identities(&[
            (Channel::Rcs, NUMBER),
            (Channel::Whatsapp, NUMBER),
        ])))
        .await
        .unwrap()
        .into_inner();
    assert!(hit.complete && hit.request_id.is_empty(), "{hit:?}");
    assert!(hit.results.iter().all(|r| r.source() == ResultSource::Cache));
    assert_eq!(fake.queries().len(), 2);

    // max_age 0 asks Sinch whatever is cached.
    let mut refresh = check(identities(&[(Channel::Rcs, NUMBER)]));
    refresh.max_age = duration(Duration::ZERO);
    let refreshed = spawn_check(client.clone(), refresh).await;
    let (third_id, asked) = nth_query(&fake, 3).await;
    assert_eq!(asked, ["RCS"]);
    deliver(service.webhook_addr, callback(&third_id, "RCS", "CAPABILITY_PARTIAL")).await;
    let answer = refreshed.await.unwrap().unwrap();
    assert_eq!(
        summary(&answer),
        [(Channel::Rcs, CapabilityStatus::Partial, ResultSource::Live)]
    );
}

#[tokio::test]
async fn concurrent_checks_of_one_identity_share_one_query() {
    let fake = FakeSinch::start().await;
    let service = Service::against(&fake, &[]).await;
    let client = service.client().await;
    let mut checks = Vec::new();
    for _ in 0..50 {
        checks.push(spawn_check(client.clone(), check(identities(&[(Channel::Whatsapp, NUMBER)]))).await);
    }
    let (live_id, _) = nth_query(&fake, 1).await;
    deliver(service.webhook_addr, callback(&live_id, "WHATSAPP", "CAPABILITY_FULL")).await;
    let mut sources = Vec::new();
    for check in checks {
        let answer = check.await.unwrap().unwrap();
        assert!(answer.complete);
        assert_eq!(answer.request_id, live_id, "every check names the shared query");
        sources.push(answer.results[0].source());
    }
    assert_eq!(fake.queries().len(), 1, "one query reached Sinch");
    let live = sources.iter().filter(|s| **s == ResultSource::Live).count();
    assert_eq!(
        live, 1,
        "the check that started the query sees LIVE, the others SHARED: {sources:?}"
    );
}

#[tokio::test]
async fn a_silent_channel_is_pending_never_cached_and_asked_again() {
    let fake = FakeSinch::start().await;
    let service = Service::against(&fake, &[]).await;
    let mut client = service.client().await;
    let mut request = check(identities(&[(Channel::Sms, NUMBER), (Channel::Rcs, NUMBER)]));
    request.wait = duration(Duration::from_millis(300));
    let first = spawn_check(client.clone(), request.clone()).await;
    let (live_id, _) = nth_query(&fake, 1).await;
    deliver(service.webhook_addr, callback(&live_id, "SMS", "CAPABILITY_FULL")).await;
    let answer = first.await.unwrap().unwrap();
    assert!(!answer.complete);
    assert_eq!(answer.pending.len(), 1);
    assert_eq!(answer.pending[0].channel(), Channel::Rcs);
    assert_eq!(answer.recommended.len(), 1);
    assert_eq!(answer.recommended[0].channel(), Channel::Sms);

    // The lookup was joinable only for the first check's wait: RCS is asked about again, SMS is cached.
    let again = spawn_check(client.clone(), request).await;
    let (_, asked) = nth_query(&fake, 2).await;
    assert_eq!(asked, ["RCS"]);
    let answer = again.await.unwrap().unwrap();
    assert_eq!(answer.pending.len(), 1);
    assert_eq!(answer.results[0].source(), ResultSource::Cache);

    // An UNKNOWN result is an answer, but not cached by default.
    let mut unknown = check(identities(&[(Channel::Viberbm, NUMBER)]));
    let first = spawn_check(client.clone(), unknown.clone()).await;
    let (live_id, _) = nth_query(&fake, 3).await;
    deliver(
        service.webhook_addr,
        callback(&live_id, "VIBERBM", "CAPABILITY_UNKNOWN"),
    )
    .await;
    assert!(first.await.unwrap().unwrap().complete);
    unknown.wait = duration(Duration::from_millis(50));
    let answer = client.check_capability(unknown).await.unwrap().into_inner();
    assert_eq!(answer.pending.len(), 1);
    assert_eq!(fake.queries().len(), 4, "an UNKNOWN result was asked about again");
}

#[tokio::test]
async fn a_contact_check_settles_after_its_last_result_and_is_then_answered_from_the_cache() {
    let fake = FakeSinch::start().await;
    let service = Service::against(&fake, &["--check-settle=200ms"]).await;
    let mut client = service.client().await;
    let first = spawn_check(client.clone(), check(contact("CONTACT-1"))).await;
    let (live_id, _) = nth_query(&fake, 1).await;
    for channel in ["WHATSAPP", "SMS"] {
        let body = CapabilityCallback::new(&live_id, channel, NUMBER, "CAPABILITY_FULL")
            .contact_id("CONTACT-1")
            .body();
        deliver(service.webhook_addr, body).await;
    }
    let answer = first.await.unwrap().unwrap();
    assert!(!answer.complete, "a contact's channels are not known in advance");
    assert_eq!(answer.results.len(), 2);
    assert_eq!(
        answer.recommended.iter().map(|id| id.channel()).collect::<Vec<_>>(),
        [Channel::Whatsapp, Channel::Sms],
        "the default preference puts rich channels first and SMS last"
    );

    let cached = client
        .check_capability(check(contact("CONTACT-1")))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(cached.results.len(), 2);
    assert!(cached.results.iter().all(|r| r.source() == ResultSource::Cache));
    assert_eq!(fake.queries().len(), 1);

    // The caller's preference orders the recommendation.
    let mut preferred = check(contact("CONTACT-1"));
    preferred.channel_preference = vec![Channel::Sms.into()];
    let answer = client.check_capability(preferred).await.unwrap().into_inner();
    assert_eq!(answer.recommended[0].channel(), Channel::Sms);

    // Invalidating the contact removes its entry and its identities' entries.
    let removed = invalidate(&mut client, contact("CONTACT-1")).await;
    assert_eq!(removed, 3);
    let mut short = check(identities(&[(Channel::Sms, NUMBER)]));
    short.wait = duration(Duration::from_millis(50));
    let answer = client.check_capability(short).await.unwrap().into_inner();
    assert_eq!(answer.pending.len(), 1, "asked again after the invalidation");
    assert_eq!(fake.queries().len(), 2);
}

/// A contact's entry that only identity checks filled (Sinch's results for an identity may name its contact) is
/// not the contact's answer: a contact check asks Sinch, which knows the contact's other channels, in process and
/// with Redis. It was answered from the cache with the one channel an identity check had asked about, as if that
/// were all the contact had.
#[tokio::test]
async fn a_contact_named_only_by_identity_checks_results_is_asked_about() {
    let redis = RedisServer::start().await;
    let url = format!("--redis-url={}", redis.url());
    for (n, args) in [&[][..], &[url.as_str()][..]].into_iter().enumerate() {
        let fake = FakeSinch::start().await;
        let service = Service::against(&fake, args).await;
        let contact_id = format!("C-named-{n}");
        let asking = spawn_check(service.client().await, check(identities(&[(Channel::Sms, NUMBER)]))).await;
        let (live_id, _) = nth_query(&fake, 1).await;
        let body = CapabilityCallback::new(&live_id, "SMS", NUMBER, "CAPABILITY_FULL").contact_id(&contact_id);
        assert_eq!(deliver(service.webhook_addr, body.body()).await, 200);
        asking.await.unwrap().unwrap();
        let again = answer(&service, check(identities(&[(Channel::Sms, NUMBER)]))).await;
        assert_eq!(
            summary(&again)[0].2,
            ResultSource::Cache,
            "round {n}: the identity's result is cached"
        );

        let mut contact_check = check(contact(&contact_id));
        contact_check.wait = duration(Duration::from_millis(100));
        let answered = answer(&service, contact_check).await;
        assert!(
            answered.results.iter().all(|r| r.source() != ResultSource::Cache),
            "round {n}: {answered:?}"
        );
        assert_eq!(fake.queries().len(), 2, "round {n}: the contact was asked about");
    }
}

/// A contact's entry filling from a lookup that no check waits for any more is not the contact's answer until the
/// lookup settles (no result for the settle time): a check meanwhile joins the lookup, in process and with Redis.
/// One that does not wait is told the results come so far and the lookup's request_id, to watch for the rest; one
/// that waits gets every channel that comes within its wait. Both were answered from the cache with the channels
/// come so far, as if they were all the contact had.
#[tokio::test]
async fn a_contact_check_during_a_lookup_nobody_waits_for_joins_it() {
    let redis = RedisServer::start().await;
    let url = format!("--redis-url={}", redis.url());
    for (n, args) in [&[][..], &[url.as_str()][..]].into_iter().enumerate() {
        let fake = FakeSinch::start().await;
        // A settle longer than any step here takes, however loaded the machine.
        let service = Service::against(&fake, &[args, &["--check-settle=10s"]].concat()).await;
        let contact_id = format!("C-settling-{n}");
        let now_only = |mut request: pb::CheckCapabilityRequest| {
            request.wait = duration(Duration::ZERO);
            request
        };
        let started = answer(&service, now_only(check(contact(&contact_id)))).await;
        let live_id = started.request_id.clone();
        assert_eq!(nth_query(&fake, 1).await.0, live_id, "round {n}");
        let result =
            |channel| CapabilityCallback::new(&live_id, channel, NUMBER, "CAPABILITY_FULL").contact_id(&contact_id);
        assert_eq!(deliver(service.webhook_addr, result("SMS").body()).await, 200);
        // The result is in the cache once its identity is answered from it.
        let sms = answer(&service, check(identities(&[(Channel::Sms, NUMBER)]))).await;
        assert_eq!(summary(&sms)[0].2, ResultSource::Cache, "round {n}");

        let so_far = answer(&service, now_only(check(contact(&contact_id)))).await;
        assert_eq!(so_far.request_id, live_id, "round {n}: {so_far:?}");
        assert_eq!(
            summary(&so_far),
            [(Channel::Sms, CapabilityStatus::Full, ResultSource::Shared)],
            "round {n}"
        );
        let mut waits = check(contact(&contact_id));
        waits.wait = duration(Duration::from_secs(2));
        let waiting = spawn_check(service.client().await, waits).await;
        assert_eq!(deliver(service.webhook_addr, result("RCS").body()).await, 200);
        let every = waiting.await.unwrap().unwrap();
        let mut channels: Vec<Channel> = summary(&every).into_iter().map(|(channel, ..)| channel).collect();
        channels.sort();
        assert_eq!(channels, [Channel::Rcs, Channel::Sms], "round {n}: {every:?}");
        assert_eq!(fake.queries().len(), 1, "round {n}: nothing asked again");
    }
}

/// A check that joins a contact's lookup, in flight (its check still waits) or settling, is answered with the
/// entry's other fresh results too: a channel an earlier lookup reported, which this one has not (yet), was left
/// out, where the cache had it.
#[tokio::test]
async fn a_contact_check_joining_a_lookup_keeps_the_channels_cached_before() {
    let redis = RedisServer::start().await;
    let url = format!("--redis-url={}", redis.url());
    let with_redis = [url.as_str()];
    let rounds = [&[][..], &with_redis[..]]
        .into_iter()
        .flat_map(|args| [(args, false), (args, true)]);
    for (n, (args, in_flight)) in rounds.enumerate() {
        let fake = FakeSinch::start().await;
        let service = Service::against(&fake, &[args, &["--check-settle=10s"]].concat()).await;
        let contact_id = format!("C-before-{n}");
        let results = |live_id: &str, channels: &[&str]| {
            let bodies: Vec<Vec<u8>> = channels
                .iter()
                .map(|channel| {
                    CapabilityCallback::new(live_id, channel, NUMBER, "CAPABILITY_FULL")
                        .contact_id(&contact_id)
                        .body()
                })
                .collect();
            let webhook = service.webhook_addr;
            async move {
                for body in bodies {
                    assert_eq!(deliver(webhook, body).await, 200);
                }
            }
        };
        let mut first = check(contact(&contact_id));
        first.wait = duration(Duration::from_secs(1));
        let first = spawn_check(service.client().await, first).await;
        let (earlier, _) = nth_query(&fake, 1).await;
        results(&earlier, &["SMS", "RCS", "WHATSAPP"]).await;
        assert_eq!(first.await.unwrap().unwrap().results.len(), 3, "round {n}");

        // Asked again, its cached results refused, by a check that waits (its lookup in flight) or does not (its
        // lookup settling): WHATSAPP has not come again yet.
        let mut again = check(contact(&contact_id));
        again.max_age = duration(Duration::ZERO);
        again.wait = duration(if in_flight {
            Duration::from_secs(5)
        } else {
            Duration::ZERO
        });
        let again = spawn_check(service.client().await, again).await;
        let (latest, _) = nth_query(&fake, 2).await;
        if !in_flight {
            again.await.unwrap().unwrap();
        }
        results(&latest, &["SMS", "RCS"]).await;
        let rcs = answer(&service, check(identities(&[(Channel::Rcs, NUMBER)]))).await;
        assert_eq!(summary(&rcs)[0].2, ResultSource::Cache, "round {n}");

        let mut now_only = check(contact(&contact_id));
        now_only.wait = duration(Duration::ZERO);
        let answered = answer(&service, now_only).await;
        assert_eq!(answered.request_id, latest, "round {n}: {answered:?}");
        use CapabilityStatus::Full;
        assert_eq!(
            summary(&answered),
            [
                (Channel::Sms, Full, ResultSource::Shared),
                (Channel::Rcs, Full, ResultSource::Shared),
                (Channel::Whatsapp, Full, ResultSource::Cache)
            ],
            "round {n}"
        );
        assert_eq!(fake.queries().len(), 2, "round {n}");
    }
}

/// A contact check that finds its contact's lookup settling, and no place among the checks waiting for Sinch, is
/// answered with what the cache holds, as it is: the lookup's results so far, and its request_id to watch for the
/// rest. It was refused RESOURCE_EXHAUSTED.
#[tokio::test]
async fn a_contact_check_with_no_place_to_wait_for_a_settling_lookup_is_answered_from_the_cache() {
    let fake = FakeSinch::start().await;
    let service = Service::against(&fake, &["--check-settle=10s", "--max-inflight-queries=1"]).await;
    let mut started = check(contact("C-no-place"));
    started.wait = duration(Duration::ZERO);
    let live_id = answer(&service, started).await.request_id;
    let sms = CapabilityCallback::new(&live_id, "SMS", NUMBER, "CAPABILITY_FULL").contact_id("C-no-place");
    assert_eq!(deliver(service.webhook_addr, sms.body()).await, 200);
    let cached = answer(&service, check(identities(&[(Channel::Sms, NUMBER)]))).await;
    assert_eq!(summary(&cached)[0].2, ResultSource::Cache);
    // The one place taken by a check waiting for another number.
    let parked = spawn_check(
        service.client().await,
        check(identities(&[(Channel::Sms, "46700000002")])),
    )
    .await;
    fake.until_queries(2).await;

    let answered = answer(&service, check(contact("C-no-place"))).await;
    assert_eq!(
        summary(&answered),
        [(Channel::Sms, CapabilityStatus::Full, ResultSource::Shared)]
    );
    assert_eq!(answered.request_id, live_id);
    parked.abort();
}

/// A contact check whose deadline comes while another check's lookup of the contact is still being sent (Sinch
/// slow to accept it) is told DEADLINE_EXCEEDED, naming why: it had no lookup to wait on, nor results. It answered
/// OK with no results and no request_id, as if nothing had come for the contact within the wait.
#[tokio::test]
async fn a_contact_check_that_could_not_join_a_lookup_before_its_deadline_says_so() {
    let fake = FakeSinch::start().await;
    fake.set_echo_delay(Duration::from_secs(3));
    let service = Service::against(&fake, &[]).await;
    let first = spawn_check(service.client().await, check(contact("C-slow"))).await;
    fake.until_queries(1).await;
    let mut second = tonic::Request::new(check(contact("C-slow")));
    second.set_timeout(Duration::from_secs(1));
    let status = service.client().await.check_capability(second).await.unwrap_err();
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert!(status.message().contains("another check"), "{status:?}");
    assert_eq!(fake.queries().len(), 1);
    first.abort();
}

/// A check some of whose identities the cache answers is answered with them, the rest pending, when Sinch has not
/// accepted the query about the rest by the caller's deadline. It failed DEADLINE_EXCEEDED, the cached results
/// thrown away.
#[tokio::test]
async fn a_sinch_slow_to_accept_leaves_the_cached_results_answered() {
    let fake = FakeSinch::start().await;
    let service = Service::against(&fake, &[]).await;
    let mut client = service.client().await;
    cache_sms(client.clone(), service.webhook_addr, &fake, 1).await;
    fake.set_echo_delay(Duration::from_secs(3));
    let mut both = tonic::Request::new(check(identities(&[(Channel::Sms, NUMBER), (Channel::Rcs, NUMBER)])));
    both.set_timeout(Duration::from_secs(2));
    let answer = client.check_capability(both).await.unwrap().into_inner();
    use CapabilityStatus::Full;
    assert_eq!(summary(&answer), [(Channel::Sms, Full, ResultSource::Cache)]);
    assert_eq!(
        answer.pending.iter().map(|p| p.channel()).collect::<Vec<_>>(),
        [Channel::Rcs]
    );
    assert!(
        answer.pending_lookups.is_empty(),
        "no lookup was accepted to watch: {answer:?}"
    );
    assert_eq!(fake.queries().len(), 2);
    // Nothing answers at all: the deadline is said as it is.
    let mut alone = tonic::Request::new(check(identities(&[(Channel::Viber, NUMBER)])));
    alone.set_timeout(Duration::from_secs(2));
    let status = client.check_capability(alone).await.unwrap_err();
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
}

/// A contact one of whose identities Sinch no longer answers for is answered from the cache again once Sinch has
/// answered for the others: the identity's result, expired, is not kept in the contact's entry, in process or with
/// Redis. It was kept, its own entry gone, and every later check of the contact asked Sinch.
#[tokio::test]
async fn a_contacts_expired_result_leaves_its_entry_when_sinch_answers_again() {
    let fake = FakeSinch::start().await;
    let redis = RedisServer::start().await;
    let url = format!("--redis-url={}", redis.url());
    let short = ["--check-settle=100ms", "--cache-ttl=NO_CAPABILITY=1s"];
    for (n, with) in [&[][..], &[url.as_str()][..]].into_iter().enumerate() {
        let service = Service::against(&fake, &[&short[..], with].concat()).await;
        let mut client = service.client().await;
        let contact_id = format!("C-{n}");
        let answered = |channels: &'static [(&'static str, &'static str)]| {
            let (service, fake, contact_id) = (&service, &fake, contact_id.clone());
            async move {
                let asked = fake.queries().len();
                let checking = spawn_check(service.client().await, check(contact(&contact_id))).await;
                let (live_id, _) = nth_query(fake, asked + 1).await;
                for (channel, status) in channels {
                    let body = CapabilityCallback::new(&live_id, channel, NUMBER, status).contact_id(&contact_id);
                    deliver(service.webhook_addr, body.body()).await;
                }
                checking.await.unwrap().unwrap()
            }
        };
        answered(&[("WHATSAPP", "CAPABILITY_FULL"), ("SMS", "NO_CAPABILITY")]).await;
        // Waits out SMS's time to live (a second, on the wall clock the cache's expiry reads).
        tokio::time::sleep(Duration::from_millis(1_200)).await;
        let again = answered(&[("WHATSAPP", "CAPABILITY_FULL")]).await;
        assert_eq!(again.results.len(), 1, "round {n}: {again:?}");
        let cached = client
            .check_capability(check(contact(&contact_id)))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            summary(&cached),
            [(Channel::Whatsapp, CapabilityStatus::Full, ResultSource::Cache)],
            "round {n}"
        );
        assert_eq!(fake.queries().len(), 2 * n + 2, "round {n}");
    }
}

#[tokio::test]
async fn bad_checks_and_invalidations_are_refused_naming_the_field() {
    let fake = FakeSinch::start().await;
    let service = Service::against(&fake, &[]).await;
    let mut client = service.client().await;
    let negative = prost_types::Duration { seconds: -1, nanos: 0 };
    let cases: Vec<(pb::CheckCapabilityRequest, &str)> = vec![
        (
            pb::CheckCapabilityRequest {
                max_age: Some(negative),
                ..check(contact("C"))
            },
            "max_age",
        ),
        (
            pb::CheckCapabilityRequest {
                wait: Some(negative),
                ..check(contact("C"))
            },
            "wait",
        ),
        (
            pb::CheckCapabilityRequest {
                channel_preference: vec![0],
                ..check(contact("C"))
            },
            "channel_preference[0]",
        ),
        (
            pb::CheckCapabilityRequest {
                recipient: None,
                ..check(contact("C"))
            },
            "recipient",
        ),
    ];
    for (request, field) in cases {
        let status = client.check_capability(request).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{field}: {status:?}");
        assert!(status.message().contains(field), "{field}: {}", status.message());
    }
    let status = client
        .invalidate_capability(pb::InvalidateCapabilityRequest {
            app_id: "APP-1".into(),
            recipient: None,
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("recipient"), "{}", status.message());
    assert!(fake.queries().is_empty(), "nothing reached Sinch");
}

#[tokio::test]
async fn replicas_share_the_cache_the_coalescing_and_the_invalidation() {
    let redis = RedisServer::start().await;
    replicas_share(&redis.url()).await;
    for key in redis.keys("*") {
        assert!(!key.contains(NUMBER), "a raw number in a Redis key: {key}");
    }
}

#[tokio::test]
async fn replicas_share_the_cache_on_a_redis_cluster() {
    let cluster = testkit::RedisCluster::start(3).await;
    replicas_share(&cluster.urls().join(",")).await;
    // Entries of several identities live on several slots: read and removed one by one.
    let fake = FakeSinch::start().await;
    let service = Service::against(&fake, &[&format!("--redis-url={}", cluster.urls().join(","))]).await;
    let mut client = service.client().await;
    let ids = identities(&[
        (Channel::Sms, NUMBER),
        (Channel::Rcs, NUMBER),
        (Channel::Whatsapp, NUMBER),
    ]);
    let first = spawn_check(client.clone(), check(ids.clone())).await;
    let (live_id, _) = nth_query(&fake, 1).await;
    for channel in ["SMS", "RCS", "WHATSAPP"] {
        deliver(service.webhook_addr, callback(&live_id, channel, "CAPABILITY_FULL")).await;
    }
    assert!(first.await.unwrap().unwrap().complete);
    let hit = client.check_capability(check(ids.clone())).await.unwrap().into_inner();
    assert!(hit.results.iter().all(|r| r.source() == ResultSource::Cache), "{hit:?}");
    let removed = invalidate(&mut client, ids).await;
    assert_eq!(removed, 3);
    assert_eq!(fake.queries().len(), 1);
}

/// On a Redis Cluster, a stalled node that holds a result's cache entry does not hold up the acknowledgement of
/// the callback once the stream's node has taken it: 200, and the result is delivered. It was answered 503 at
/// the webhook timeout (Sinch's redelivery then a duplicate, the result never cached).
#[tokio::test]
async fn a_stalled_cache_node_does_not_hold_up_a_callback_the_log_took() {
    use capability_facade::log::cached::{KeyHasher, hex};
    let cluster = testkit::RedisCluster::start(3).await;
    let fake = FakeSinch::start().await;
    let url = format!("--redis-url={}", cluster.urls().join(","));
    let key = "a cache key of thirty-two bytes or more";
    let service = Service::against(
        &fake,
        &[&url, &format!("--cache-hash-key={key}"), "--webhook-timeout=1s"],
    )
    .await;
    let hasher = KeyHasher::new(key.as_bytes());
    let stream = cluster.node_of("{capability:0}:events").await;
    let mut numbers = (1..100).map(|n| format!("467{n:08}"));
    let (number, entry, cache_node) = loop {
        let number = numbers
            .next()
            .expect("a number cached on another node than the stream's");
        let entry = format!(
            "capability:c:{}",
            hex(&hasher.identity("APP-1", &capability_facade::capability::Channel::Sms, &number))
        );
        let node = cluster.node_of(&entry).await;
        if node != stream {
            break (number, entry, node);
        }
    };
    let mut client = service.client().await;
    let watch = pb::WatchCapabilityRequest {
        request_id: "R-STALL".into(),
        ..Default::default()
    };
    let mut watching = client.watch_capability(watch).await.unwrap().into_inner();
    cluster.command(cache_node, &["CLIENT", "PAUSE", "3000", "WRITE"]).await;
    let body = CapabilityCallback::new("R-STALL", "SMS", &number, "CAPABILITY_FULL").body();
    assert_eq!(deliver(service.webhook_addr, body).await, 200);
    let delivered = watching.message().await.unwrap().unwrap();
    assert!(format!("{delivered:?}").contains("CAPABILITY_FULL"), "{delivered:?}");
    // The write went on, and lands once the node answers again.
    common::until(FIVE_SECONDS, async || {
        cluster.command(cache_node, &["EXISTS", &entry]).await == "1"
    })
    .await;
}

/// Two replicas on the Redis at `redis_url`: a check on one joins the other's query, both read the result one of
/// them cached, and an invalidation on one is seen by the other.
async fn replicas_share(redis_url: &str) {
    let fake = FakeSinch::start().await;
    let (a, b) = two_replicas_on(&fake, redis_url, &[]).await;
    let (mut on_a, mut on_b) = (a.client().await, b.client().await);

    // A check on A sends the query; a check on B meanwhile joins it instead of asking again.
    let request = check(identities(&[(Channel::Rcs, NUMBER)]));
    let first = spawn_check(on_a.clone(), request.clone()).await;
    let (live_id, _) = nth_query(&fake, 1).await;
    let mut joining = request.clone();
    joining.wait = duration(Duration::from_millis(300));
    let joined = on_b.check_capability(joining).await.unwrap().into_inner();
    assert_eq!(joined.request_id, live_id, "{joined:?}");
    assert_eq!(joined.pending.len(), 1);
    assert_eq!(fake.queries().len(), 1, "B joined A's query");
    // The callback reaches replica B; A's check answers.
    deliver(b.webhook_addr, callback(&live_id, "RCS", "CAPABILITY_FULL")).await;
    let first = first.await.unwrap().unwrap();
    assert_eq!(first.results[0].source(), ResultSource::Live);

    // The result is cached for both.
    for client in [&mut on_a, &mut on_b] {
        let hit = client.check_capability(request.clone()).await.unwrap().into_inner();
        assert_eq!(hit.results[0].source(), ResultSource::Cache);
    }
    // Invalidated on A, gone on B.
    let removed = invalidate(&mut on_a, identities(&[(Channel::Rcs, NUMBER)])).await;
    assert_eq!(removed, 1);
    let mut short = request;
    short.wait = duration(Duration::from_millis(50));
    let answer = on_b.check_capability(short).await.unwrap().into_inner();
    assert_eq!(answer.pending.len(), 1);
    assert_eq!(fake.queries().len(), 2);
}

#[tokio::test]
async fn a_check_answers_before_the_callers_deadline_with_what_it_has() {
    let fake = FakeSinch::start().await;
    let service = Service::against(&fake, &[]).await;
    let mut client = service.client().await;
    // The server's wait (10 s) is longer than the caller's deadline: the answer comes before the deadline.
    let mut request = tonic::Request::new(pb::CheckCapabilityRequest {
        wait: None,
        ..check(identities(&[(Channel::Sms, NUMBER)]))
    });
    request.set_timeout(Duration::from_millis(500));
    let answer = client.check_capability(request).await.unwrap().into_inner();
    assert!(!answer.complete);
    assert_eq!(answer.pending.len(), 1);
    assert_eq!(
        answer.request_id,
        fake.queries()[0].json()["request_id"].as_str().unwrap()
    );
}

/// A check whose deadline comes while it waits for a lease another check is still sending answers with what it
/// has, everything else pending, and sends nothing: the leases it took before are given back, not sent past the
/// deadline (which failed the whole check, cache hits and all, with DEADLINE_EXCEEDED).
#[tokio::test]
async fn a_check_whose_deadline_comes_while_it_waits_for_a_lease_answers_and_sends_nothing() {
    let fake = FakeSinch::start().await;
    fake.script_queries([Canned::new(200, r#"{"request_id":"SLOW"}"#).delayed(Duration::from_secs(3))]);
    let service = Service::against(&fake, &[]).await;
    let mut client = service.client().await;
    let slow = spawn_check(client.clone(), check(identities(&[(Channel::Sms, NUMBER)]))).await;
    fake.until_queries(1).await;
    // Twenty more identities beside it: their leases come before SMS's in key order but for one chance in
    // twenty-one (the keys are a keyed hash, its key drawn at start).
    let others: Vec<String> = (0..20).map(|i| format!("467000001{i:02}")).collect();
    let mut asked: Vec<(Channel, &str)> = others.iter().map(|n| (Channel::Rcs, n.as_str())).collect();
    asked.push((Channel::Sms, NUMBER));
    let mut request = tonic::Request::new(check(identities(&asked)));
    request.set_timeout(Duration::from_millis(800));
    let answer = client.check_capability(request).await.unwrap().into_inner();
    assert!(!answer.complete);
    assert_eq!(answer.pending.len(), 21, "{answer:?}");
    assert_eq!(fake.queries().len(), 1, "nothing sent past the deadline");
    slow.await.unwrap().unwrap();
}

#[tokio::test]
async fn a_check_that_does_not_wait_joins_a_lookup_still_being_sent_and_names_it() {
    let fake = FakeSinch::start().await;
    // Sinch takes its time accepting the first query: its lease is pending while the second check arrives.
    fake.set_echo_delay(Duration::from_millis(300));
    let service = Service::against(&fake, &[]).await;
    let mut client = service.client().await;
    let starter = spawn_check(client.clone(), check(identities(&[(Channel::Sms, NUMBER)]))).await;
    let (live_id, _) = nth_query(&fake, 1).await;
    let quick = pb::CheckCapabilityRequest {
        wait: duration(Duration::ZERO),
        ..check(identities(&[(Channel::Sms, NUMBER)]))
    };
    let answer = client.check_capability(quick).await.unwrap().into_inner();
    assert_eq!(
        answer.request_id, live_id,
        "the lookup to watch for the late result: {answer:?}"
    );
    assert_eq!(answer.pending.len(), 1);
    deliver(service.webhook_addr, callback(&live_id, "SMS", "CAPABILITY_FULL")).await;
    assert!(starter.await.unwrap().unwrap().complete);
    assert_eq!(fake.queries().len(), 1, "one lookup for both");
}

/// A check that does not wait still starts a lookup: while Sinch has not accepted it yet, an identical check
/// (here or on another replica) joins it rather than asking again.
#[tokio::test]
async fn a_lookup_started_by_a_check_that_does_not_wait_is_joined_while_it_is_being_sent() {
    let fake = FakeSinch::start().await;
    // Sinch takes its time accepting the first query.
    fake.set_echo_delay(Duration::from_millis(300));
    let redis = RedisServer::start().await;
    let (a, b) = two_replicas(&fake, &redis).await;
    let alone = Service::against(&fake, &[]).await;
    let quick = pb::CheckCapabilityRequest {
        wait: duration(Duration::ZERO),
        ..check(identities(&[(Channel::Sms, NUMBER)]))
    };
    for (n, (starts, joins)) in [(&alone, &alone), (&a, &b)].into_iter().enumerate() {
        let starter = spawn_check(starts.client().await, quick.clone()).await;
        let (live_id, _) = nth_query(&fake, n + 1).await;
        let joined = joins
            .client()
            .await
            .check_capability(quick.clone())
            .await
            .unwrap()
            .into_inner();
        assert_eq!(joined.request_id, live_id, "round {n}: {joined:?}");
        assert_eq!(starter.await.unwrap().unwrap().request_id, live_id);
        assert_eq!(fake.queries().len(), n + 1, "round {n}: one lookup for both");
    }
}

#[tokio::test]
async fn checks_that_joined_a_query_sinch_refused_do_not_wait_for_it() {
    let fake = FakeSinch::start().await;
    fake.script_queries([Canned::sinch_error(400, "INVALID_ARGUMENT", "bad").delayed(Duration::from_millis(300))]);
    let service = Service::against(&fake, &[]).await;
    let client = service.client().await;
    let request = check(identities(&[(Channel::Sms, NUMBER)]));
    let starter = spawn_check(client.clone(), request.clone()).await;
    fake.until_queries(1).await;
    // Joins the pending lease; when the first query fails it asks Sinch itself.
    let joiner = spawn_check(client.clone(), request).await;
    let (live_id, _) = nth_query(&fake, 2).await;
    deliver(service.webhook_addr, callback(&live_id, "SMS", "CAPABILITY_FULL")).await;
    assert_eq!(starter.await.unwrap().unwrap_err().code(), Code::InvalidArgument);
    let joined = joiner.await.unwrap().unwrap();
    assert!(joined.complete, "{joined:?}");
    assert_eq!(joined.results[0].source(), ResultSource::Live);
}

#[tokio::test]
async fn a_lookup_stays_joinable_when_the_caller_that_started_it_goes_away() {
    let fake = FakeSinch::start().await;
    let service = Service::against(&fake, &[]).await;
    let mut client = service.client().await;
    let request = check(identities(&[(Channel::Sms, NUMBER)]));
    let starter = spawn_check(client.clone(), request.clone()).await;
    let (live_id, _) = nth_query(&fake, 1).await;
    starter.abort();
    let _ = starter.await;
    let joiner = spawn_check(client.clone(), request.clone()).await;
    deliver(service.webhook_addr, callback(&live_id, "SMS", "CAPABILITY_FULL")).await;
    let joined = joiner.await.unwrap().unwrap();
    assert_eq!(joined.request_id, live_id);
    assert_eq!(
        fake.queries().len(),
        1,
        "the lookup in flight was joined, not asked again"
    );
    let hit = client.check_capability(request).await.unwrap().into_inner();
    assert_eq!(hit.results[0].source(), ResultSource::Cache);
}

/// An invalidated identity is asked again, even while a lookup whose caller went away still holds its lease: the
/// lookup's result, in before the invalidation, is not served again as SHARED — in process, across replicas, and
/// on the replica that started the lookup when another one took the invalidation.
#[tokio::test]
async fn an_invalidated_identity_is_asked_again_not_joined_to_the_lookup_that_answered_it() {
    let s = &Setups::start().await;
    let rounds = [
        (&s.alone, &s.service, &s.service, &s.service, "46700000011"),
        (&s.shared, &s.a, &s.b, &s.b, "46700000012"),
        (&s.shared, &s.a, &s.b, &s.a, "46700000013"),
    ];
    for (round, (fake, starts, invalidates, checks, number)) in rounds.into_iter().enumerate() {
        let asked = fake.queries().len();
        let recipient = identities(&[(Channel::Sms, number)]);
        abandoned_lookup(fake, starts, recipient, (number, None), "CAPABILITY_FULL").await;
        let removed = invalidate(&mut invalidates.client().await, identities(&[(Channel::Sms, number)])).await;
        assert_eq!(removed, 1, "round {round}");
        let mut again = check(identities(&[(Channel::Sms, number)]));
        again.wait = duration(Duration::from_millis(200));
        let again = answer(checks, again).await;
        assert!(
            again.results.is_empty(),
            "round {round}: the invalidated result was served: {again:?}"
        );
        assert_eq!(
            nth_query(fake, asked + 2).await.1,
            ["SMS"],
            "round {round}: asked again"
        );
    }
}

/// A check that accepts no cached result (`max_age` 0: "ask Sinch whatever is cached") is not served, as SHARED,
/// the result a lookup whose caller went away already had before it came: that lookup keeps its lease until its
/// wait would have ended, and joining it served its old result — in process and across replicas, by identity and
/// by contact, whether or not that result is cached (`CAPABILITY_UNKNOWN` is not, by default: the guard read the
/// cache, and served it).
#[tokio::test]
async fn a_check_accepting_no_cached_result_asks_sinch_rather_than_join_a_lookup_already_answered() {
    let s = &Setups::start().await;
    let rounds = [
        (&s.alone, &s.service, &s.service, "4670000002"),
        (&s.shared, &s.a, &s.b, "4670000003"),
    ];
    for (round, (fake, starts, checks, prefix)) in rounds.into_iter().enumerate() {
        for (variant, (by_contact, status)) in [false, true]
            .into_iter()
            .flat_map(|by_contact| [(by_contact, "CAPABILITY_FULL"), (by_contact, "CAPABILITY_UNKNOWN")])
            .enumerate()
        {
            let number = format!("{prefix}{variant}");
            let contact_id = format!("C-{number}");
            let recipient = || match by_contact {
                true => contact(&contact_id),
                false => identities(&[(Channel::Sms, &number)]),
            };
            let asked = fake.queries().len();
            let named = by_contact.then_some(contact_id.as_str());
            let live_id = abandoned_lookup(fake, starts, recipient(), (&number, named), status).await;
            // With Redis, the log brought it from the replica it was delivered to.
            common::first_notification(checks, &live_id).await;
            let case = format!("round {round}, by contact {by_contact}, {status}");
            if status == "CAPABILITY_UNKNOWN" {
                // Not cached: a check that accepts it is served it by joining the lookup, which is there to join.
                let mut older = check(recipient());
                older.wait = duration(Duration::from_millis(200));
                let older = answer(checks, older).await;
                let sources: Vec<_> = older.results.iter().map(|r| r.source()).collect();
                assert_eq!(sources, [ResultSource::Shared], "{case}: {older:?}");
            }
            let mut fresh = check(recipient());
            fresh.max_age = duration(Duration::ZERO);
            fresh.wait = duration(Duration::from_millis(200));
            let fresh = answer(checks, fresh).await;
            assert!(
                fresh.results.is_empty(),
                "{case}: the lookup's earlier result was served: {fresh:?}"
            );
            let (again, _) = nth_query(fake, asked + 2).await;
            assert_ne!(again, live_id, "{case}: asked again");
        }
    }
}

/// The same when the replica the check comes to no longer holds the lookup's record (pushed out of its hub by
/// newer requests, past `CAPABILITY_MAX_REQUESTS`): the cache tells what the lookup answered. Joined, the check
/// waited for a result that would not come, and was answered nothing.
#[tokio::test]
async fn a_check_accepting_no_cached_result_asks_sinch_when_the_lookup_left_this_replicas_hub() {
    let redis = RedisServer::start().await;
    let fake = FakeSinch::start().await;
    let url = format!("--redis-url={}", redis.url());
    let a = Service::against(&fake, &[&url]).await;
    let b = Service::against(&fake, &[&url, "--max-requests=1"]).await;
    let recipient = || identities(&[(Channel::Sms, NUMBER)]);
    let live_id = abandoned_lookup(&fake, &a, recipient(), (NUMBER, None), "CAPABILITY_FULL").await;
    common::first_notification(&b, &live_id).await;
    let newer = CapabilityCallback::new("newer", "SMS", "46700000099", "CAPABILITY_FULL");
    assert_eq!(deliver(a.webhook_addr, newer.body()).await, 200);
    common::first_notification(&b, "newer").await;
    let held = common::held(&b, &live_id, 0).await;
    assert!(held.is_empty(), "B still holds the lookup: {held:?}");
    let mut fresh = check(recipient());
    fresh.max_age = duration(Duration::ZERO);
    fresh.wait = duration(Duration::from_millis(200));
    answer(&b, fresh).await;
    let asked = tokio::time::timeout(Duration::from_secs(10), nth_query(&fake, 2)).await;
    assert_ne!(asked.expect("not asked again").0, live_id, "asked again");
}

/// Invalidating an identity takes it out of the contact answers that hold it even when its latest result names no
/// contact (an `identified_by` check asked about it since): the contact is asked again, not served from the cache
/// with the invalidated channel — in process and with Redis.
#[tokio::test]
async fn an_invalidated_identity_is_not_served_in_a_contact_answer_its_latest_result_does_not_name() {
    let redis = RedisServer::start().await;
    let url = format!("--redis-url={}", redis.url());
    for flags in [&["--check-settle=100ms"][..], &["--check-settle=100ms", &url][..]] {
        let fake = FakeSinch::start().await;
        let service = Service::against(&fake, flags).await;
        let mut client = service.client().await;
        cache_contact(&service, &fake, 1).await;
        let mut by_identity = check(identities(&[(Channel::Whatsapp, NUMBER)]));
        by_identity.max_age = duration(Duration::ZERO);
        let second = spawn_check(client.clone(), by_identity).await;
        let (live_id, _) = nth_query(&fake, 2).await;
        deliver(service.webhook_addr, callback(&live_id, "WHATSAPP", "CAPABILITY_FULL")).await;
        second.await.unwrap().unwrap();
        invalidate(&mut client, identities(&[(Channel::Whatsapp, NUMBER)])).await;
        let mut again = check(contact("C-1"));
        again.wait = duration(Duration::from_millis(50));
        let again = client.check_capability(again).await.unwrap().into_inner();
        assert!(
            again.results.is_empty(),
            "{flags:?}: served with the invalidated channel: {again:?}"
        );
        assert_eq!(fake.until_queries(3).await.len(), 3, "{flags:?}: asked again");
        // Asked about again by identity (PARTIAL now): the contact's answer has the new result, not its old copy.
        let mut by_identity = check(identities(&[(Channel::Whatsapp, NUMBER)]));
        by_identity.max_age = duration(Duration::ZERO);
        let fourth = spawn_check(client.clone(), by_identity).await;
        let (live_id, _) = nth_query(&fake, 4).await;
        deliver(
            service.webhook_addr,
            callback(&live_id, "WHATSAPP", "CAPABILITY_PARTIAL"),
        )
        .await;
        fourth.await.unwrap().unwrap();
        let again = client
            .check_capability(check(contact("C-1")))
            .await
            .unwrap()
            .into_inner();
        let statuses: Vec<_> = again
            .results
            .iter()
            .map(|r| r.notification.as_ref().unwrap().capability_status())
            .collect();
        assert_eq!(statuses, [CapabilityStatus::Partial], "{flags:?}: {again:?}");
        assert_eq!(again.results[0].source(), ResultSource::Cache, "{flags:?}");
    }
}

/// A check whose identities wait on different lookups (one it joined, one it started) says under which request_id
/// each pending identity's late result will come: watching only its own request_id missed the joined one's.
#[tokio::test]
async fn each_pending_identity_is_named_with_the_lookup_its_late_result_comes_under() {
    let fake = FakeSinch::start().await;
    let service = Service::against(&fake, &[]).await;
    let client = service.client().await;
    let mut first = check(identities(&[(Channel::Sms, NUMBER)]));
    first.wait = duration(Duration::from_secs(30));
    let first = spawn_check(client.clone(), first).await;
    let (joined_id, _) = nth_query(&fake, 1).await;
    let mut both = check(identities(&[(Channel::Sms, NUMBER), (Channel::Rcs, NUMBER)]));
    both.wait = duration(Duration::from_millis(100));
    let both = client.clone().check_capability(both).await.unwrap().into_inner();
    let (own_id, _) = nth_query(&fake, 2).await;
    let lookups: Vec<(i32, String)> = both
        .pending_lookups
        .iter()
        .map(|p| (p.identity.as_ref().unwrap().channel, p.request_id.clone()))
        .collect();
    assert_eq!(
        lookups,
        [
            (Channel::Sms as i32, joined_id.clone()),
            (Channel::Rcs as i32, own_id.clone())
        ]
    );
    assert_eq!(both.request_id, own_id);
    deliver(service.webhook_addr, callback(&joined_id, "SMS", "CAPABILITY_FULL")).await;
    assert_eq!(
        common::held(&service, &joined_id, 0).await.len(),
        1,
        "SMS's late result, under the joined lookup"
    );
    first.await.unwrap().unwrap();
}

#[tokio::test]
async fn a_repeated_request_id_sends_nothing_and_leaves_nobody_waiting_on_it() {
    let fake = FakeSinch::start().await;
    let service = Service::against(&fake, &[]).await;
    let mut client = service.client().await;
    // SMS is known; R asks about SMS (cached) and RCS (sent).
    cache_sms(client.clone(), service.webhook_addr, &fake, 1).await;
    let mut repeated = check(identities(&[(Channel::Sms, NUMBER), (Channel::Rcs, NUMBER)]));
    repeated.request_id = "R-1".into();
    repeated.wait = duration(Duration::from_millis(100));
    client.check_capability(repeated.clone()).await.unwrap();
    assert_eq!(nth_query(&fake, 2).await.1, ["RCS"]);
    // SMS forgotten: the repeat of R needs it, but R's query never asked about it and is not sent again.
    invalidate(&mut client, identities(&[(Channel::Sms, NUMBER)])).await;
    let again = client.check_capability(repeated).await.unwrap().into_inner();
    assert_eq!(again.request_id, "R-1");
    assert_eq!(again.pending.len(), 2, "{again:?}");
    assert_eq!(fake.queries().len(), 2, "a repeated request_id sends nothing");
    // Another caller's check of SMS is not left waiting on R: it asks Sinch.
    let other = spawn_check(client.clone(), check(identities(&[(Channel::Sms, NUMBER)]))).await;
    let (other_id, asked) = nth_query(&fake, 3).await;
    assert_eq!(asked, ["SMS"]);
    deliver(service.webhook_addr, callback(&other_id, "SMS", "CAPABILITY_FULL")).await;
    assert!(other.await.unwrap().unwrap().complete);
}

/// A result received before an invalidation is not served after it, even when a check that waited for it stores
/// it again as it returns (with Redis, so that the next check on any replica finds it).
#[tokio::test]
async fn an_invalidation_made_while_a_check_waits_is_not_undone_when_the_check_returns() {
    let fake = FakeSinch::start().await;
    let redis = RedisServer::start().await;
    let url = format!("--redis-url={}", redis.url());
    for (n, args) in [&[][..], &[url.as_str()][..]].into_iter().enumerate() {
        let service = Service::against(&fake, args).await;
        let mut client = service.client().await;
        let both = spawn_check(
            client.clone(),
            check(identities(&[(Channel::Sms, NUMBER), (Channel::Rcs, NUMBER)])),
        )
        .await;
        let (live_id, _) = nth_query(&fake, 2 * n + 1).await;
        deliver(service.webhook_addr, callback(&live_id, "SMS", "CAPABILITY_FULL")).await;
        invalidate(&mut client, identities(&[(Channel::Sms, NUMBER)])).await;
        deliver(service.webhook_addr, callback(&live_id, "RCS", "CAPABILITY_FULL")).await;
        assert!(both.await.unwrap().unwrap().complete);
        let quick = pb::CheckCapabilityRequest {
            wait: duration(Duration::ZERO),
            ..check(identities(&[(Channel::Sms, NUMBER), (Channel::Rcs, NUMBER)]))
        };
        let again = client.check_capability(quick).await.unwrap().into_inner();
        assert_eq!(
            summary(&again),
            [(Channel::Rcs, CapabilityStatus::Full, ResultSource::Cache)],
            "round {n}: SMS was invalidated after it arrived"
        );
        assert_eq!(nth_query(&fake, 2 * n + 2).await.1, ["SMS"]);
    }
}

/// `after` from now, in milliseconds since the Unix epoch.
fn ms_from_now(after: Duration) -> u64 {
    let at = std::time::SystemTime::now() + after;
    at.duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64
}

/// Makes the log of `prefix` (its shard 0) run at `at_ms` at least: a stream entry then (one no replica can read,
/// skipped) makes Redis time every later entry of the stream at it.
fn log_at(redis: &RedisServer, prefix: &str, at_ms: u64) {
    redis.command(&[
        "XADD",
        &format!("{{{prefix}:0}}:events"),
        &format!("{at_ms}-0"),
        "e",
        "x",
    ]);
}

/// A result received before an invalidation and replayed afterwards to a check that repeats its request_id is
/// not cached again, in process or with Redis — also when the log's clock runs ahead of Redis's own (a stream entry
/// ten minutes ahead makes Redis time every later entry so), and when the cache had lost the result by the time
/// of the invalidation (its write failed or was still on its way, or Redis lost it).
#[tokio::test]
async fn a_result_replayed_after_an_invalidation_is_not_cached_again() {
    let fake = FakeSinch::start().await;
    let redis = RedisServer::start().await;
    let url = format!("--redis-url={}", redis.url());
    let ahead = ms_from_now(Duration::from_secs(600));
    for prefix in ["ahead", "lost"] {
        log_at(&redis, prefix, ahead);
    }
    let rounds = [
        &[][..],
        &[url.as_str()][..],
        &[url.as_str(), "--redis-prefix=ahead"][..],
        &[url.as_str(), "--redis-prefix=lost"][..],
    ];
    for (n, args) in rounds.into_iter().enumerate() {
        let service = Service::against(&fake, args).await;
        let mut client = service.client().await;
        let mut repeated = check(identities(&[(Channel::Sms, NUMBER), (Channel::Rcs, NUMBER)]));
        repeated.request_id = format!("R-{n}");
        repeated.wait = duration(Duration::from_millis(300));
        let first = spawn_check(client.clone(), repeated.clone()).await;
        nth_query(&fake, 2 * n + 1).await;
        deliver(
            service.webhook_addr,
            callback(&repeated.request_id, "SMS", "CAPABILITY_FULL"),
        )
        .await;
        first.await.unwrap().unwrap();
        for lost in redis.keys("lost:c:*") {
            redis.command(&["DEL", &lost]);
        }
        invalidate(&mut client, identities(&[(Channel::Sms, NUMBER)])).await;
        // The repeat sends nothing and is answered with what its request received, SMS replayed.
        let again = client.check_capability(repeated).await.unwrap().into_inner();
        assert_eq!(again.results.len(), 1, "round {n}: {again:?}");
        let quick = pb::CheckCapabilityRequest {
            wait: duration(Duration::ZERO),
            ..check(identities(&[(Channel::Sms, NUMBER)]))
        };
        let after = client.check_capability(quick).await.unwrap().into_inner();
        assert!(after.results.is_empty(), "round {n}: SMS was invalidated: {after:?}");
        assert_eq!(nth_query(&fake, 2 * n + 2).await.1, ["SMS"], "round {n}");
    }
}

/// A result's age is judged by the log's clock when it runs ahead of the replica's: a result the log timed two
/// minutes ago is not served to a check accepting results up to a minute old, though by the replica's own clock
/// it is not yet (a stream entry ten minutes ahead makes Redis time every later entry so).
#[tokio::test]
async fn with_the_log_ahead_a_results_age_is_the_logs() {
    let fake = FakeSinch::start().await;
    let redis = RedisServer::start().await;
    let ahead = ms_from_now(Duration::from_secs(600));
    log_at(&redis, "aged", ahead);
    let url = format!("--redis-url={}", redis.url());
    let service = Service::against(&fake, &[&url, "--redis-prefix=aged"]).await;
    let mut client = service.client().await;
    cache_sms(client.clone(), service.webhook_addr, &fake, 1).await;
    // Two minutes pass by the log: an entry then, and after it a result of another request, watched until here.
    log_at(&redis, "aged", ahead + 120_000);
    let later = pb::WatchCapabilityRequest {
        request_id: "LATER".into(),
        ..Default::default()
    };
    let mut watching = client.watch_capability(later).await.unwrap().into_inner();
    deliver(service.webhook_addr, callback("LATER", "RCS", "CAPABILITY_FULL")).await;
    watching.message().await.unwrap().unwrap();
    let mut within_a_minute = check(identities(&[(Channel::Sms, NUMBER)]));
    within_a_minute.max_age = duration(Duration::from_secs(60));
    within_a_minute.wait = duration(Duration::ZERO);
    let answer = client.check_capability(within_a_minute).await.unwrap().into_inner();
    assert!(answer.results.is_empty(), "served as a minute old at most: {answer:?}");
    assert_eq!(nth_query(&fake, 2).await.1, ["SMS"]);
}

/// A result's age and its time to live are counted by the log's clock when it runs behind the replica's too: on a
/// replica whose clock runs a minute ahead of Redis's, a result Sinch gave a moment ago, cached for 61 s, answers a
/// check accepting results up to 30 s old two seconds later (by the replica's clock it was a minute old, and Redis
/// kept it one second).
#[tokio::test]
async fn on_a_replica_whose_clock_runs_ahead_of_the_logs_a_result_just_received_is_fresh() {
    let fake = FakeSinch::start().await;
    let redis = RedisServer::start().await;
    let mut env = common::redis_binary_env(&fake, &redis);
    env.push(("CAPABILITY_CACHE_TTL", "CAPABILITY_FULL=61s".to_owned()));
    env.extend(testkit::clock_offset("+60s"));
    let replica = common::Binary::spawn(&env).await;
    let mut client = CapabilityServiceClient::connect(replica.url()).await.unwrap();
    cache_sms(client.clone(), replica.webhook_addr, &fake, 1).await;
    // Real time, not a synchronisation: Redis expires the entry by its own clock.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut within_30_s = check(identities(&[(Channel::Sms, NUMBER)]));
    within_30_s.max_age = duration(Duration::from_secs(30));
    within_30_s.wait = duration(Duration::ZERO);
    let answer = client.check_capability(within_30_s).await.unwrap().into_inner();
    let sources: Vec<ResultSource> = answer.results.iter().map(|r| r.source()).collect();
    assert_eq!(sources, [ResultSource::Cache], "{answer:?}");
    assert_eq!(fake.queries().len(), 1, "asked Sinch again");
}

#[tokio::test]
async fn invalidating_an_identity_also_drops_the_contact_answer_that_held_it() {
    let fake = FakeSinch::start().await;
    let service = Service::against(&fake, &["--check-settle=100ms"]).await;
    let mut client = service.client().await;
    cache_contact(&service, &fake, 1).await;
    let removed = invalidate(&mut client, identities(&[(Channel::Whatsapp, NUMBER)])).await;
    assert_eq!(removed, 2, "the identity's entry and the contact's");
    let mut again = check(contact("C-1"));
    again.wait = duration(Duration::from_millis(50));
    let again = client.check_capability(again).await.unwrap().into_inner();
    assert!(again.results.is_empty(), "{again:?}");
    assert_eq!(fake.queries().len(), 2);
}

#[tokio::test]
async fn checks_waiting_for_sinch_do_not_keep_cache_hits_out() {
    let fake = FakeSinch::start().await;
    let service = Service::against(&fake, &["--max-inflight-queries=2", "--check-settle=100ms"]).await;
    let mut client = service.client().await;
    cache_sms(client.clone(), service.webhook_addr, &fake, 1).await;
    cache_contact(&service, &fake, 2).await;
    let waiting = [
        spawn_check(client.clone(), check(identities(&[(Channel::Rcs, NUMBER)]))).await,
        spawn_check(client.clone(), check(identities(&[(Channel::Viber, NUMBER)]))).await,
    ];
    fake.until_queries(4).await;
    let hit = client
        .check_capability(check(identities(&[(Channel::Sms, NUMBER)])))
        .await;
    assert!(hit.is_ok(), "{hit:?}");
    // A contact's, too: it was refused OVERLOADED.
    let hit = client
        .check_capability(check(contact("C-1")))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(hit.results.len(), 1, "{hit:?}");
    assert_eq!(hit.results[0].source(), ResultSource::Cache, "{hit:?}");
    // A third check that must wait is shed at once.
    let shed = client
        .check_capability(check(identities(&[(Channel::Viberbm, NUMBER)])))
        .await
        .unwrap_err();
    assert_eq!(shed.code(), Code::ResourceExhausted);
    for check in waiting {
        check.abort();
    }
}

/// A replica with one place for checks waiting for Sinch, and a Sinch that answers a query 5 s after it comes.
async fn one_place_and_a_slow_sinch() -> (FakeSinch, Service, CapabilityServiceClient<Transport>) {
    let fake = FakeSinch::start().await;
    fake.set_echo_delay(Duration::from_secs(5));
    let service = Service::against(&fake, &["--max-inflight-queries=1"]).await;
    let client = service.client().await;
    (fake, service, client)
}

/// The one place is taken while the first query is still being sent: a check that must wait is shed, unsent.
async fn the_place_is_still_taken(fake: &FakeSinch, mut client: CapabilityServiceClient<Transport>) {
    assert_eq!(fake.queries().len(), 1);
    let status = client
        .check_capability(check(identities(&[(Channel::Rcs, NUMBER)])))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert_eq!(fake.queries().len(), 1);
}

/// A check whose caller goes away while its query is being sent keeps its place among the checks waiting for Sinch
/// until the sending ends (it goes on, so that its result reaches the cache), as a QueryCapability does: the place
/// went with the caller, and a replica whose callers gave up on a slow Sinch sent more queries at once than
/// `CAPABILITY_MAX_INFLIGHT_QUERIES`.
#[tokio::test]
async fn a_check_whose_caller_went_away_still_counts_until_its_query_is_sent() {
    let (fake, _service, client) = one_place_and_a_slow_sinch().await;
    let gone = spawn_check(client.clone(), check(identities(&[(Channel::Sms, NUMBER)]))).await;
    fake.until_queries(1).await;
    gone.abort();
    let _ = gone.await;
    the_place_is_still_taken(&fake, client).await;
}

/// The same for a check under a caller-chosen request_id whose deadline comes while Sinch has not answered: its
/// attempt goes on waiting for Sinch's answer past the deadline (a repeat finds it), and keeps the check's place
/// meanwhile, as a QueryCapability's does. It gave the place back at the deadline.
#[tokio::test]
async fn a_check_past_its_deadline_still_counts_while_its_attempt_waits_for_sinch() {
    let (fake, _service, mut client) = one_place_and_a_slow_sinch().await;
    let mut chosen = check(identities(&[(Channel::Sms, NUMBER)]));
    chosen.request_id = "CHOSEN-1".into();
    let mut request = tonic::Request::new(chosen);
    request.set_timeout(Duration::from_millis(300));
    // Whatever the caller is told at its deadline, Sinch has not answered yet.
    let _ = client.check_capability(request).await;
    the_place_is_still_taken(&fake, client).await;
}

#[tokio::test]
async fn replicas_started_on_either_side_of_a_redis_data_loss_name_entries_alike() {
    let mut redis = RedisServer::start().await;
    let fake = FakeSinch::start().await;
    let url = format!("--redis-url={}", redis.url());
    let a = Service::against(&fake, &[&url]).await;
    let mut on_a = a.client().await;
    let invalidate = pb::InvalidateCapabilityRequest {
        app_id: "APP-1".into(),
        recipient: Some(identities(&[(Channel::Rcs, NUMBER)])),
    };
    on_a.invalidate_capability(invalidate.clone()).await.unwrap(); // A learns the key
    redis.kill().await;
    redis.restart().await;
    let b = Service::against(&fake, &[&url]).await;
    let on_b = b.client().await;
    let cached = spawn_check(on_b.clone(), check(identities(&[(Channel::Rcs, NUMBER)]))).await;
    let (live_id, _) = nth_query(&fake, 1).await;
    deliver(b.webhook_addr, callback(&live_id, "RCS", "CAPABILITY_FULL")).await;
    assert!(cached.await.unwrap().unwrap().complete);
    // A looks at the kept key again within a second, and then names the entry as B does.
    let mut removed = 0;
    for _ in 0..30 {
        removed = on_a
            .invalidate_capability(invalidate.clone())
            .await
            .unwrap()
            .into_inner()
            .removed;
        if removed == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(removed, 1, "A never named B's entry");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_of_checks_while_the_answer_arrives_asks_sinch_once() {
    let redis = RedisServer::start().await;
    let fake = FakeSinch::start().await;
    let service = Service::against(&fake, &[&format!("--redis-url={}", redis.url())]).await;
    let client = service.client().await;
    let request = check(identities(&[(Channel::Whatsapp, NUMBER)]));
    let mut checks = vec![spawn_check(client.clone(), request.clone()).await];
    let (live_id, _) = nth_query(&fake, 1).await;
    let addr = service.webhook_addr;
    let delivering =
        tokio::spawn(async move { deliver(addr, callback(&live_id, "WHATSAPP", "CAPABILITY_FULL")).await });
    // Checks keep coming before, while and after the callback lands.
    for _ in 0..300 {
        checks.push(spawn_check(client.clone(), request.clone()).await);
        tokio::task::yield_now().await;
    }
    delivering.await.unwrap();
    for check in checks {
        assert!(check.await.unwrap().unwrap().complete);
    }
    assert_eq!(fake.queries().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_on_a_second_replica_joins_the_first_replicas_query() {
    burst_on_a_second_replica(Duration::ZERO).await;
}

/// The first replica's query is answered late, so the second replica's burst polls its lease while it is pending;
/// the lease is marked sent, its results cached and the lease given back within milliseconds, between two polls.
/// A check that then finds the lease free must look at the cache again before it starts a query of its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_that_finds_the_lease_given_back_between_two_polls_answers_from_the_cache() {
    burst_on_a_second_replica(Duration::from_millis(300)).await;
}

/// A check on replica A, Sinch answering its query after `echo_delay`; then 200 identical checks on replica B,
/// then the callback: every check answers with A's result, and Sinch was asked once.
async fn burst_on_a_second_replica(echo_delay: Duration) {
    let redis = RedisServer::start().await;
    let fake = FakeSinch::start().await;
    let (a, b) = two_replicas(&fake, &redis).await;
    let (on_a, on_b) = (a.client().await, b.client().await);
    let request = check(identities(&[(Channel::Rcs, NUMBER)]));
    fake.set_echo_delay(echo_delay);
    let first = spawn_check(on_a.clone(), request.clone()).await;
    let (live_id, _) = nth_query(&fake, 1).await;
    let mut burst = Vec::new();
    for _ in 0..200 {
        burst.push(spawn_check(on_b.clone(), request.clone()).await);
    }
    deliver(a.webhook_addr, callback(&live_id, "RCS", "CAPABILITY_FULL")).await;
    first.await.unwrap().unwrap();
    for check in burst {
        let answer = check.await.unwrap().unwrap();
        assert!(answer.complete, "{answer:?}");
        assert!(
            answer.request_id.is_empty() || answer.request_id == live_id,
            "{answer:?}"
        );
    }
    assert_eq!(fake.queries().len(), 1);
}

#[tokio::test]
async fn a_result_is_trusted_for_its_statuss_time_to_live_and_the_callers_max_age() {
    let fake = FakeSinch::start().await;
    let service = Service::against(&fake, &["--cache-ttl=CAPABILITY_FULL=400ms"]).await;
    let mut client = service.client().await;
    let request = check(identities(&[(Channel::Sms, NUMBER)]));
    let first = spawn_check(client.clone(), request.clone()).await;
    let (live_id, _) = nth_query(&fake, 1).await;
    deliver(service.webhook_addr, callback(&live_id, "SMS", "CAPABILITY_FULL")).await;
    first.await.unwrap().unwrap();
    let hit = client.check_capability(request.clone()).await.unwrap().into_inner();
    assert_eq!(hit.results[0].source(), ResultSource::Cache);
    // Older than the caller's max_age: asked again, whatever the status's time to live.
    let mut fussy = request.clone();
    fussy.max_age = duration(Duration::from_millis(1));
    fussy.wait = duration(Duration::ZERO);
    // The cache's clock is the wall clock: a timer of the server's, not an event a test could await.
    tokio::time::sleep(Duration::from_millis(5)).await;
    client.check_capability(fussy).await.unwrap();
    nth_query(&fake, 2).await;
    // Past the status's time to live: gone for every caller.
    tokio::time::sleep(Duration::from_millis(450)).await;
    let mut late = request;
    late.wait = duration(Duration::ZERO);
    let answer = client.check_capability(late).await.unwrap().into_inner();
    assert!(answer.results.is_empty(), "{answer:?}");
    nth_query(&fake, 3).await;
}

/// A look at the cache's naming key kept in Redis that its caller gave up on midway (a deadline, while Redis held
/// writes) must not stop the later looks: after Redis loses the key, replicas must come to name entries alike.
#[tokio::test]
async fn a_look_at_the_cache_key_given_up_midway_does_not_stop_later_ones() {
    let redis = RedisServer::start().await;
    let log = common::redis_log(&redis, "abandoned", None).await;
    let cache = log.cache();
    let named = |hasher: capability_facade::log::cached::KeyHasher| {
        hasher.identity("app", &capability_facade::capability::Channel::Sms, "46700000001")
    };
    let before = named(cache.hasher().await.unwrap());
    // Real time, not a synchronisation: the key is looked at again once a second has passed.
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    redis.command(&["CLIENT", "PAUSE", "500", "WRITE"]);
    let given_up = tokio::time::timeout(Duration::from_millis(100), cache.hasher()).await;
    assert!(given_up.is_err(), "the look waits for Redis");
    // Redis lost the key and another replica put a new one (held until the pause ends).
    redis.command(&["SET", "abandoned:cache-key", "00112233445566778899aabbccddeeff"]);
    let after = named(cache.hasher().await.unwrap());
    assert_ne!(after, before, "the key kept in Redis is looked at again");
}

/// With Redis, a check stores the results it received once more before it returns: at the time they reached the
/// service, not the time the check returns, or a result would look younger than it is to the next caller.
#[tokio::test]
async fn a_result_a_check_stores_again_keeps_its_own_age() {
    let redis = RedisServer::start().await;
    let fake = FakeSinch::start().await;
    let service = Service::against(&fake, &[&format!("--redis-url={}", redis.url())]).await;
    let mut client = service.client().await;
    let mut both = check(identities(&[(Channel::Sms, NUMBER), (Channel::Rcs, NUMBER)]));
    both.wait = duration(Duration::from_secs(1));
    let first = spawn_check(client.clone(), both).await;
    let (live_id, _) = nth_query(&fake, 1).await;
    deliver(service.webhook_addr, callback(&live_id, "SMS", "CAPABILITY_FULL")).await;
    // RCS never answers: the check returns at its wait, a second after SMS arrived.
    let answer = first.await.unwrap().unwrap();
    assert_eq!(answer.pending.len(), 1, "{answer:?}");
    let mut fussy = check(identities(&[(Channel::Sms, NUMBER)]));
    fussy.max_age = duration(Duration::from_millis(500));
    fussy.wait = duration(Duration::ZERO);
    client.check_capability(fussy).await.unwrap();
    assert_eq!(
        fake.queries().len(),
        2,
        "a result a second old served for a max_age of 500 ms"
    );
}

/// A repeat of a check's request_id on another replica (the caller's retry, or a poll with no wait) while the first
/// check still waits for Sinch's answer joins that lookup and leaves it its lease: a third check of the identity
/// joins it too. The repeat took the lease for its own (same request_id), and gave it back as it returned, so that
/// the third check asked Sinch again — and so would every check after each poll.
#[tokio::test]
async fn a_repeat_of_a_checks_request_id_on_another_replica_leaves_the_lookup_its_lease() {
    let redis = RedisServer::start().await;
    let fake = FakeSinch::start().await;
    let (a, b) = two_replicas(&fake, &redis).await;
    let mut request = check(identities(&[(Channel::Sms, NUMBER)]));
    request.request_id = "polled".into();
    let first = spawn_check(a.client().await, request.clone()).await;
    nth_query(&fake, 1).await;
    until_a_lease(&redis, |lease| lease == "s:polled").await;
    let mut poll = request;
    poll.wait = duration(Duration::ZERO);
    let polled = answer(&b, poll).await;
    assert_eq!(polled.pending.len(), 1, "{polled:?}");
    joined_on_another_replica(&fake, (&a, &b), "polled", first).await;
}

/// Two calls of one request_id at once on two replicas (a hedged or retried call): the second, given up before the
/// first sent its query, leaves the first its lease, which it cannot tell from its own; a third check joins the
/// first's lookup. The second deleted the lease, and the third asked Sinch again.
#[tokio::test]
async fn a_second_call_of_a_request_id_given_up_leaves_the_first_its_lease() {
    let redis = RedisServer::start().await;
    let fake = FakeSinch::start().await;
    fake.set_echo_delay(Duration::from_secs(1));
    let (a, b) = two_replicas(&fake, &redis).await;
    let mut request = check(identities(&[(Channel::Sms, NUMBER)]));
    request.request_id = "hedged".into();
    let first = spawn_check(a.client().await, request.clone()).await;
    until_a_lease(&redis, |lease| lease == "p:hedged").await;
    let mut second = tonic::Request::new(request);
    second.set_timeout(Duration::from_millis(300));
    let second = b.client().await.check_capability(second).await;
    assert_eq!(second.unwrap_err().code(), Code::DeadlineExceeded);
    joined_on_another_replica(&fake, (&a, &b), "hedged", first).await;
}

/// A check of the identity on `b` that does not wait joins lookup `request_id`, which `first` started on `a`, the
/// only query Sinch got; then its result comes, live to `first`.
async fn joined_on_another_replica(
    fake: &FakeSinch,
    (a, b): (&Service, &Service),
    request_id: &str,
    first: tokio::task::JoinHandle<Result<pb::CheckCapabilityResponse, tonic::Status>>,
) {
    let mut other = check(identities(&[(Channel::Sms, NUMBER)]));
    other.wait = duration(Duration::ZERO);
    let other = answer(b, other).await;
    assert_eq!(other.pending_lookups[0].request_id, request_id, "{other:?}");
    assert_eq!(fake.queries().len(), 1, "one lookup, joined");
    deliver(a.webhook_addr, callback(request_id, "SMS", "CAPABILITY_FULL")).await;
    assert_eq!(summary(&first.await.unwrap().unwrap())[0].2, ResultSource::Live);
}

/// A check whose request_id names a lease left pending in Redis (its first run's replica stopped while Sinch was
/// accepting the query) asks under that request_id at once rather than wait for the lease to lapse (the first
/// caller's deadline, which left the retry nothing but its own deadline), and marks it sent, so that checks on
/// every replica join its lookup rather than wait for the lease too.
#[tokio::test]
async fn a_retry_after_its_first_run_stopped_mid_send_asks_at_once_and_is_joined() {
    use capability_facade::{
        capability::Channel::Sms,
        log::cached::{KeyHasher, hex},
    };
    const HASH_KEY: &str = "a-key-of-thirty-two-bytes-or-more";
    let redis = RedisServer::start().await;
    let fake = FakeSinch::start().await;
    let hash_key = format!("--cache-hash-key={HASH_KEY}");
    let (a, b) = two_replicas_on(&fake, &redis.url(), &[&hash_key]).await;
    let key = KeyHasher::new(HASH_KEY.as_bytes()).identity("APP-1", &Sms, NUMBER);
    redis.command(&[
        "SET",
        &format!("capability:lease:{}", hex(&key)),
        "p:left-pending",
        "PX",
        "60000",
    ]);
    let mut retry = check(identities(&[(Channel::Sms, NUMBER)]));
    retry.request_id = "left-pending".into();
    let retry = spawn_check(a.client().await, retry).await;
    nth_query(&fake, 1).await;
    until_a_lease(&redis, |lease| lease == "s:left-pending").await;
    joined_on_another_replica(&fake, (&a, &b), "left-pending", retry).await;
}

/// A replica whose check joined another replica's query lets it go when that check returns: a later check there
/// that accepts no cached result (`max_age` 0) asks Sinch again instead of joining the finished query.
#[tokio::test]
async fn a_joined_query_is_not_joined_again_after_the_check_that_joined_it_returned() {
    let sms = |live_id: &str| callback(live_id, "SMS", "CAPABILITY_FULL");
    let_go_after_joining(check(identities(&[(Channel::Sms, NUMBER)])), sms, &[]).await;
}

/// Replica B's check joins replica A's lookup of `request` (answered by the callback `answer` makes of its
/// request_id); once both returned, a check on B accepting no cached result asks Sinch again.
async fn let_go_after_joining(request: pb::CheckCapabilityRequest, answer: impl Fn(&str) -> Vec<u8>, flags: &[&str]) {
    let redis = RedisServer::start().await;
    let fake = FakeSinch::start().await;
    let (a, b) = two_replicas_on(&fake, &redis.url(), flags).await;
    let (on_a, mut on_b) = (a.client().await, b.client().await);
    let first = spawn_check(on_a, request.clone()).await;
    let (live_id, _) = nth_query(&fake, 1).await;
    // B's check must find A's lease marked sent, and join it.
    until_a_lease(&redis, |lease| lease.starts_with("s:")).await;
    let joined = spawn_check(on_b.clone(), request.clone()).await;
    deliver(a.webhook_addr, answer(&live_id)).await;
    first.await.unwrap().unwrap();
    let joined = joined.await.unwrap().unwrap();
    assert_eq!(joined.request_id, live_id, "{joined:?}");
    // A gives its lease back in Redis in the background: what is left to join then is only what B kept.
    common::until(FIVE_SECONDS, async || redis.keys("*lease*").is_empty()).await;
    let mut fresh_only = request;
    fresh_only.max_age = duration(Duration::ZERO);
    fresh_only.wait = duration(Duration::ZERO);
    on_b.check_capability(fresh_only).await.unwrap();
    assert_eq!(
        fake.queries().len(),
        2,
        "a check accepting no cached result joined a finished query"
    );
}

/// A lookup lets each identity go once its result is in, not when its last one is: a check after an
/// invalidation (or accepting no cached result) asks Sinch again rather than join the lookup still waiting for the
/// rest, and be served the result it invalidated.
#[tokio::test]
async fn an_identity_whose_result_is_in_is_let_go_while_its_lookup_waits_for_the_rest() {
    let redis = RedisServer::start().await;
    let fake = FakeSinch::start().await;
    let (a, b) = two_replicas(&fake, &redis).await;
    let (on_a, mut on_b) = (a.client().await, b.client().await);
    let both = spawn_check(
        on_a,
        check(identities(&[(Channel::Sms, NUMBER), (Channel::Rcs, NUMBER)])),
    )
    .await;
    let (live_id, _) = nth_query(&fake, 1).await;
    until_a_lease(&redis, |lease| lease.starts_with("s:")).await;
    deliver(a.webhook_addr, callback(&live_id, "SMS", "CAPABILITY_FULL")).await;
    // SMS's lease goes; RCS's stays while A waits for it.
    common::until(FIVE_SECONDS, async || {
        let leases = redis.keys("*lease*");
        leases.iter().filter(|key| redis.value(key).starts_with("s:")).count() == 1
    })
    .await;
    invalidate(&mut on_b, identities(&[(Channel::Sms, NUMBER)])).await;
    let mut after = check(identities(&[(Channel::Sms, NUMBER)]));
    after.wait = duration(Duration::ZERO);
    let after = on_b.check_capability(after).await.unwrap().into_inner();
    assert_ne!(
        after.request_id, live_id,
        "joined the lookup whose SMS result was invalidated: {after:?}"
    );
    assert_eq!(nth_query(&fake, 2).await.1, ["SMS"]);
    deliver(a.webhook_addr, callback(&live_id, "RCS", "CAPABILITY_FULL")).await;
    assert!(both.await.unwrap().unwrap().complete);
}

/// The same for a contact: a replica whose check joined another's query lets it go when that check returns.
#[tokio::test]
async fn a_joined_contact_query_is_not_joined_again_after_the_check_that_joined_it_returned() {
    let whatsapp = |live_id: &str| {
        let body = CapabilityCallback::new(live_id, "WHATSAPP", NUMBER, "CAPABILITY_FULL").contact_id("C-1");
        body.body()
    };
    // B's check must join while A's waits: A's settles 2 s after its result (the default, 1.5 s, would do; 100 ms
    // was a window a loaded machine could miss).
    let_go_after_joining(check(contact("C-1")), whatsapp, &["--check-settle=2s"]).await;
}

/// A check given up (its caller gone) while Redis held its lease script leaves no lease behind: the next identical
/// check asks Sinch itself rather than wait for a lookup nobody sends.
/// When Sinch answers with a request_id of its own, the lease marked sent under it is still given back when the
/// check returns: a later check accepting no cached result asks Sinch, on any replica.
#[tokio::test]
async fn a_lookup_sinch_renamed_is_let_go_when_its_check_returns() {
    let redis = RedisServer::start().await;
    let fake = FakeSinch::start().await;
    fake.script_queries([Canned::new(200, r#"{"request_id":"SINCH-CHOSE"}"#)]);
    let (a, b) = two_replicas(&fake, &redis).await;
    // A long wait: its lease would outlast the test if it were left to lapse.
    let mut request = check(identities(&[(Channel::Sms, NUMBER)]));
    request.wait = duration(Duration::from_secs(120));
    let first = spawn_check(a.client().await, request.clone()).await;
    fake.until_queries(1).await;
    until_a_lease(&redis, |lease| lease == "s:SINCH-CHOSE").await;
    deliver(a.webhook_addr, callback("SINCH-CHOSE", "SMS", "CAPABILITY_FULL")).await;
    let answer = first.await.unwrap().unwrap();
    assert!(answer.complete, "{answer:?}");
    assert_eq!(answer.request_id, "SINCH-CHOSE");
    common::until(FIVE_SECONDS, async || {
        redis
            .keys("*lease*")
            .iter()
            .all(|key| !redis.value(key).starts_with("s:"))
    })
    .await;
    let mut fresh_only = request;
    fresh_only.max_age = duration(Duration::ZERO);
    fresh_only.wait = duration(Duration::ZERO);
    b.client().await.check_capability(fresh_only).await.unwrap();
    assert_eq!(fake.queries().len(), 2, "a finished lookup was joined");
}

/// A Redis that holds writes when a check returns does not cost the caller its answer: the check gives its lease
/// back there within a moment, or leaves it to lapse. (Giving it until the caller's deadline, as seen here, was
/// too late: the caller's clock started before the call reached the service.)
#[tokio::test]
async fn a_check_answers_in_time_while_redis_holds_the_giving_back_of_its_lease() {
    let redis = RedisServer::start().await;
    let fake = FakeSinch::start().await;
    let service = Service::against(&fake, &[&format!("--redis-url={}", redis.url())]).await;
    // Its log reader's first writes done: the only writes held below are the check's.
    common::ready(&service).await;
    let mut request = tonic::Request::new(pb::CheckCapabilityRequest {
        wait: duration(Duration::from_secs(1)),
        ..check(identities(&[(Channel::Sms, NUMBER)]))
    });
    request.set_timeout(Duration::from_secs(3));
    let mut client = service.client().await;
    let silent = tokio::spawn(async move { client.check_capability(request).await });
    until_a_lease(&redis, |lease| lease.starts_with("s:")).await;
    // Sinch stays silent; the check's wait ends while Redis holds writes for longer than its deadline.
    redis.command(&["CLIENT", "PAUSE", "6000", "WRITE"]);
    let answer = silent.await.unwrap().expect("an answer, not DEADLINE_EXCEEDED");
    assert_eq!(answer.into_inner().pending.len(), 1);
    assert!(
        redis.held() >= 1,
        "the giving back of the lease was not held: nothing was tested"
    );
}

/// A contact's check too: its results are in, and a Redis holding writes while it caches them does not keep them
/// past its caller's deadline (the caller got DEADLINE_EXCEEDED).
#[tokio::test]
async fn a_contact_check_answers_in_time_while_redis_holds_the_caching_of_its_results() {
    let redis = RedisServer::start().await;
    let fake = FakeSinch::start().await;
    let url = format!("--redis-url={}", redis.url());
    let flags = [
        &url,
        "--cache-hash-key=a-key-held-up-by-redis-at-least-32-bytes",
        "--check-settle=500ms",
    ];
    let service = Service::against(&fake, &flags).await;
    // Its log reader's first writes done: the only writes held below are the check's.
    common::ready(&service).await;
    let mut request = tonic::Request::new(pb::CheckCapabilityRequest {
        wait: duration(Duration::from_secs(1)),
        ..check(contact("C-1"))
    });
    request.set_timeout(Duration::from_secs(3));
    let mut client = service.client().await;
    let answered = tokio::spawn(async move { client.check_capability(request).await });
    let (live_id, _) = nth_query(&fake, 1).await;
    let body = CapabilityCallback::new(&live_id, "WHATSAPP", NUMBER, "CAPABILITY_FULL").contact_id("C-1");
    assert_eq!(deliver(service.webhook_addr, body.body()).await, 200);
    // Before the check's settle ends and it caches what it got.
    redis.command(&["CLIENT", "PAUSE", "8000", "WRITE"]);
    let answer = answered.await.unwrap().expect("an answer, not DEADLINE_EXCEEDED");
    assert_eq!(answer.into_inner().results.len(), 1);
    assert!(
        redis.held() >= 1,
        "the caching of the results was not held: nothing was tested"
    );
}

#[tokio::test]
async fn a_check_given_up_while_taking_its_lease_leaves_no_lease_behind() {
    let redis = RedisServer::start().await;
    let fake = FakeSinch::start().await;
    let url = format!("--redis-url={}", redis.url());
    let service = Service::against(&fake, &[&url, "--cache-hash-key=a-key-given-up-on-at-least-32-bytes"]).await;
    let client = service.client().await;
    // Its log reader's first writes done: the only write held below is the check's lease.
    common::ready(&service).await;
    redis.command(&["CLIENT", "PAUSE", "1000", "WRITE"]);
    let given_up = spawn_check(client.clone(), check(identities(&[(Channel::Sms, NUMBER)]))).await;
    redis.until_held(1).await;
    given_up.abort();
    assert!(given_up.await.unwrap_err().is_cancelled());
    // Returns once the pause is over.
    redis.command(&["SET", "pause-over", "1"]);
    let mut next = check(identities(&[(Channel::Sms, NUMBER)]));
    next.wait = duration(Duration::from_secs(2));
    let next = spawn_check(client, next).await;
    let asked = tokio::time::timeout(Duration::from_secs(2), fake.until_queries(1)).await;
    next.abort();
    assert!(asked.is_ok(), "nobody asked Sinch: a lease was left behind");
}

/// A replica on its own, and two sharing a Redis, each with its fake Sinch.
struct Setups {
    alone: FakeSinch,
    service: Service,
    shared: FakeSinch,
    a: Service,
    b: Service,
    _redis: RedisServer,
}

impl Setups {
    async fn start() -> Setups {
        let redis = RedisServer::start().await;
        let alone = FakeSinch::start().await;
        let service = Service::against(&alone, &[]).await;
        let shared = FakeSinch::start().await;
        let (a, b) = two_replicas(&shared, &redis).await;
        Setups {
            alone,
            service,
            shared,
            a,
            b,
            _redis: redis,
        }
    }
}

/// Two replicas against `fake` sharing the Redis at `redis_url`, each with `extra` flags too.
async fn two_replicas_on(fake: &FakeSinch, redis_url: &str, extra: &[&str]) -> (Service, Service) {
    let url = format!("--redis-url={redis_url}");
    let flags: Vec<&str> = std::iter::once(url.as_str()).chain(extra.iter().copied()).collect();
    (
        Service::against(fake, &flags).await,
        Service::against(fake, &flags).await,
    )
}

/// Two replicas sharing `redis`, both asking `fake`.
async fn two_replicas(fake: &FakeSinch, redis: &RedisServer) -> (Service, Service) {
    two_replicas_on(fake, &redis.url(), &[]).await
}

/// Waits until a lease in Redis reads as `holds` wants.
async fn until_a_lease(redis: &RedisServer, holds: impl Fn(&str) -> bool) {
    common::until(FIVE_SECONDS, async || {
        redis.keys("*lease*").iter().any(|key| holds(&redis.value(key)))
    })
    .await;
}

/// A result of SMS for `identity` in app `app`, naming `contact_id`, as the webhook reads Sinch's callback
/// received at `received`.
fn sms_result(
    request_id: &str,
    identity: &str,
    contact_id: &str,
    received: std::time::SystemTime,
) -> capability_facade::capability::Notification {
    use capability_facade::webhook::parse::{Callback, parse};
    let body = CapabilityCallback::new(request_id, "SMS", identity, "CAPABILITY_FULL")
        .contact_id(contact_id)
        .app_id("app")
        .body();
    match parse(&body, received) {
        Ok(Callback::Capability(notification)) => *notification,
        _ => panic!("a capability callback"),
    }
}

/// In Redis, a contact's entry is its answer once it holds a result of a lookup of the contact itself (noted before
/// or after the result came), not for results of identity queries naming the contact; an invalidation forgets the
/// lookups, and only the latest few are remembered.
#[tokio::test]
async fn in_redis_a_contacts_entry_answers_once_it_holds_a_result_of_a_lookup_of_the_contact() {
    let redis = RedisServer::start().await;
    let log = common::redis_log(&redis, "whole", Some("whole-key")).await;
    let cache = log.cache();
    let hasher = cache.hasher().await.unwrap();
    let contact = hasher.contact("app", "C-whole");
    let now = std::time::SystemTime::now;
    let held = || async {
        let held = cache.get_contact(&contact).await.unwrap();
        (held.results.len(), held.lookup.is_some())
    };
    // sms_result's first argument is the result's request_id.
    cache
        .store(&sms_result("identity-query", "46700000021", "C-whole", now()), 1)
        .await
        .unwrap();
    assert_eq!(held().await, (1, false), "named by an identity query's result");
    cache.looked_up(&contact, "contact-lookup").await.unwrap();
    assert_eq!(held().await, (1, false), "the lookup's result has not come");
    cache
        .store(&sms_result("contact-lookup", "46700000022", "C-whole", now()), 2)
        .await
        .unwrap();
    assert_eq!(held().await, (2, true));
    for n in 0..4 {
        cache.looked_up(&contact, &format!("later-{n}")).await.unwrap();
    }
    assert_eq!(held().await, (2, false), "only the latest lookups are remembered");
    cache.looked_up(&contact, "contact-lookup").await.unwrap();
    assert_eq!(held().await, (2, true));

    assert_eq!(
        cache.remove(&[], &[contact], 0).await.unwrap(),
        3,
        "the contact's entry and its two identities'"
    );
    assert_eq!(held().await, (0, false));
    let later = now() + Duration::from_secs(1);
    cache
        .store(&sms_result("contact-lookup", "46700000022", "C-whole", later), 3)
        .await
        .unwrap();
    assert_eq!(held().await, (1, false), "the invalidation forgot the lookups");

    let noted_first = hasher.contact("app", "C-noted-first");
    cache.looked_up(&noted_first, "early").await.unwrap();
    let entry = format!("whole:cc:{}", capability_facade::log::cached::hex(&noted_first));
    let ttl: i64 = redis.command(&["PTTL", &entry]).parse().unwrap();
    assert!(ttl > 0, "an entry made for a lookup expires: {ttl}");
    cache
        .store(&sms_result("early", "46700000023", "C-noted-first", now()), 4)
        .await
        .unwrap();
    assert!(cache.get_contact(&noted_first).await.unwrap().lookup.is_some());
}

/// In Redis, a contact's entry holds at most 64 results, its lookups' note and an invalidation's mark not counted
/// among them.
#[tokio::test]
async fn in_redis_a_contacts_entry_holds_at_most_64_results() {
    let redis = RedisServer::start().await;
    let log = common::redis_log(&redis, "many", Some("many-key")).await;
    let cache = log.cache();
    let contact = cache.hasher().await.unwrap().contact("app", "C-many");
    cache.remove(&[], &[contact], 0).await.unwrap();
    cache.looked_up(&contact, "lookup").await.unwrap();
    let later = std::time::SystemTime::now() + Duration::from_secs(1);
    for n in 0..65 {
        let identity = format!("4670000{n:04}");
        cache
            .store(&sms_result("lookup", &identity, "C-many", later), n + 1)
            .await
            .unwrap();
    }
    let held = cache.get_contact(&contact).await.unwrap();
    assert_eq!((held.results.len(), held.lookup.is_some()), (64, true));
}

/// The Redis cache, as the in-process one (src/check/local.rs): a contact invalidated while a result for another
/// of its identities is stored keeps nothing from before, and the newcomer, if it stays cached under its identity,
/// stays listed in the contact's entry, so that the next invalidation reaches it.
#[tokio::test]
async fn in_redis_a_contact_invalidated_while_a_result_is_stored_leaves_no_result_unlisted() {
    let redis = RedisServer::start().await;
    let log = common::redis_log(&redis, "race", Some("race-key")).await;
    let cache = log.cache();
    let hasher = cache.hasher().await.unwrap();
    let result = |identity: &str, contact_id: &str| {
        sms_result(
            &format!("r-{identity}"),
            identity,
            contact_id,
            std::time::SystemTime::now(),
        )
    };
    for round in 0..300 {
        let contact_id = format!("C{round}");
        let (before, newcomer) = (format!("466{round:08}"), format!("467{round:08}"));
        cache.store(&result(&before, &contact_id), 1).await.unwrap();
        let contact = [hasher.contact("app", &contact_id)];
        let arriving = result(&newcomer, &contact_id);
        // The removal starts a little later round by round, to fall at every point of the store.
        let later = async {
            for _ in 0..round % 16 {
                tokio::task::yield_now().await;
            }
            cache.remove(&[], &contact, 0).await
        };
        let (stored, removed) = tokio::join!(cache.store(&arriving, 1), later);
        stored.unwrap();
        removed.unwrap();
        let listed: Vec<String> = cache
            .get_contact(&contact[0])
            .await
            .unwrap()
            .results
            .into_iter()
            .map(|r| r.request_id)
            .collect();
        assert!(
            !listed.contains(&format!("r-{before}")),
            "round {round}: an invalidated result came back"
        );
        let held = cache
            .get(&[hasher.identity("app", &capability_facade::capability::Channel::Sms, &newcomer)])
            .await
            .unwrap();
        if held[0].is_some() {
            assert!(
                listed.contains(&format!("r-{newcomer}")),
                "round {round}: the newcomer is cached but its contact's entry does not list it"
            );
        }
    }
}

/// In Redis, a result received before an invalidation is refused after it, under its identity and in its
/// contact's entry, whichever of the two was invalidated (a replica may store a result some time after it
/// arrived: a check that waited for it stores it again as it returns); one received after it is kept.
#[tokio::test]
async fn in_redis_a_result_from_before_an_invalidation_is_not_stored_after_it() {
    let redis = RedisServer::start().await;
    let log = common::redis_log(&redis, "tomb", Some("tomb-key")).await;
    let cache = log.cache();
    let hasher = cache.hasher().await.unwrap();
    let result = |identity: &str, received: std::time::SystemTime| {
        sms_result("r-1", identity, &format!("C-{identity}"), received)
    };
    for (identity, by_contact) in [("46700000002", false), ("46700000003", true)] {
        let keys = [hasher.identity("app", &capability_facade::capability::Channel::Sms, identity)];
        let contact = [hasher.contact("app", &format!("C-{identity}"))];
        let held = || async {
            let one = cache.get(&keys).await.unwrap()[0].is_some();
            let in_contact = cache.get_contact(&contact[0]).await.unwrap().results.len();
            (one, in_contact)
        };
        let early = result(identity, std::time::SystemTime::now() - Duration::from_secs(1));
        cache.store(&early, 1).await.unwrap();
        assert_eq!(held().await, (true, 1));
        // By identity, InvalidateCapability names the contact the cached result names too.
        let removed = match by_contact {
            true => cache.remove(&[], &contact, 0).await.unwrap(),
            false => cache.remove(&keys, &contact, 0).await.unwrap(),
        };
        assert_eq!(
            removed, 2,
            "by contact: {by_contact}: the identity's entry and the contact's"
        );
        cache.store(&early, 1).await.unwrap();
        assert_eq!(held().await, (false, 0), "by contact: {by_contact}: stored again");
        cache
            .store(&result(identity, std::time::SystemTime::now()), 2)
            .await
            .unwrap();
        assert_eq!(held().await, (true, 1), "by contact: {by_contact}");
    }
    // What was not cached when invalidated (its append-time store failed, or Redis lost it) is refused too: a
    // check that waited for it would otherwise store it afterwards.
    let late = "46700000009";
    let (never, nobody) = (
        [hasher.identity("app", &capability_facade::capability::Channel::Sms, late)],
        [hasher.contact("app", &format!("C-{late}"))],
    );
    let before = result(late, std::time::SystemTime::now() - Duration::from_secs(1));
    assert_eq!(cache.remove(&never, &nobody, 0).await.unwrap(), 0, "nothing was cached");
    cache.store(&before, 1).await.unwrap();
    assert!(cache.get(&never).await.unwrap()[0].is_none());
    assert!(cache.get_contact(&nobody[0]).await.unwrap().results.is_empty());
}

/// In Redis, a result is cached at its time in the log whichever replica stores it, and whenever: a check that
/// received an older result and stores it again late does not replace a newer one — also when the log's clock runs
/// ahead of the replicas' (stream entries in the future make Redis time every later entry so).
#[tokio::test]
async fn in_redis_a_late_store_of_an_older_result_does_not_replace_a_newer_one() {
    use capability_facade::log::{Accepted, EventLog, codec::log_time};
    let redis = RedisServer::start().await;
    let log = EventLog::redis(common::redis_log(&redis, "late", Some("late-key")).await);
    let cache = log.shared_cache().unwrap();
    let key = [cache
        .hasher()
        .await
        .unwrap()
        .identity("app", &capability_facade::capability::Channel::Sms, NUMBER)];
    let now = std::time::SystemTime::now();
    let ahead = ms_from_now(Duration::from_secs(600));
    log_at(&redis, "late", ahead);
    let older = sms_result("r-1", NUMBER, "C-1", now);
    assert!(matches!(
        log.accept(None, Some(older.clone())).await,
        Ok(Accepted::Appended { .. })
    ));
    log_at(&redis, "late", ahead + 60_000);
    let newer = sms_result("r-2", NUMBER, "C-1", now);
    assert!(matches!(
        log.accept(None, Some(newer)).await,
        Ok(Accepted::Appended { .. })
    ));
    let held = async || cache.get(&key).await.unwrap().remove(0).map(|r| r.request_id);
    // The appending replica's write may go on past the acknowledgement.
    common::until(FIVE_SECONDS, async || held().await.as_deref() == Some("r-2")).await;
    // The older result as every replica's hub hands it out: at its time in the log.
    let handed_out = capability_facade::capability::Notification {
        received_time: log_time(ahead),
        ..older
    };
    cache.store(&handed_out, 1).await.unwrap();
    assert_eq!(
        held().await.as_deref(),
        Some("r-2"),
        "the older result replaced the newer"
    );
}

/// A check waiting for live results when its replica begins to shut down is told to retry elsewhere: without
/// Redis nothing more can reach it (the replica refuses callbacks while it drains). It was answered OK with every
/// channel pending, as if Sinch had been silent.
#[tokio::test]
async fn a_check_waiting_when_its_replica_shuts_down_is_told_to_retry() {
    let fake = FakeSinch::start().await;
    let service = Service::against(&fake, &[]).await;
    let waiting = spawn_check(service.client().await, check(identities(&[(Channel::Sms, NUMBER)]))).await;
    nth_query(&fake, 1).await;
    service.shutdown.cancel();
    let status = waiting.await.unwrap().unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(status.message().contains("shutting down"), "{}", status.message());
}

/// With Redis the results reach a replica that is shutting down through the log, from the replica Sinch posts to:
/// a check waiting there gets its answer while the replica drains.
#[tokio::test]
async fn with_redis_a_check_waiting_when_its_replica_shuts_down_gets_its_answer() {
    let fake = FakeSinch::start().await;
    let redis = RedisServer::start().await;
    let (leaving, staying) = two_replicas(&fake, &redis).await;
    let waiting = spawn_check(leaving.client().await, check(identities(&[(Channel::Sms, NUMBER)]))).await;
    let (request_id, _) = nth_query(&fake, 1).await;
    let mut watcher = leaving.client().await;
    leaving.shutdown.cancel();
    // Its watches end: it is shutting down.
    let watch = pb::WatchCapabilityRequest {
        request_id: request_id.clone(),
        ..Default::default()
    };
    let ended = match watcher.watch_capability(watch).await {
        Ok(stream) => stream.into_inner().message().await.unwrap_err(),
        Err(status) => status,
    };
    assert_eq!(ended.code(), Code::Unavailable, "{ended:?}");

    assert_eq!(
        deliver(staying.webhook_addr, callback(&request_id, "SMS", "CAPABILITY_FULL")).await,
        200
    );
    let answer = waiting.await.unwrap().unwrap();
    assert!(answer.complete, "{answer:?}");
    assert_eq!(
        summary(&answer),
        [(Channel::Sms, CapabilityStatus::Full, ResultSource::Live)]
    );
}

/// With Redis a check waiting when its replica begins to shut down still ends within the shutdown grace, told to
/// retry: its wait may be minutes, and the replica stops at the grace whatever is in flight (the caller got a
/// broken connection).
#[tokio::test]
async fn with_redis_a_check_waiting_at_shutdown_ends_within_the_grace() {
    let fake = FakeSinch::start().await;
    let redis = RedisServer::start().await;
    let url = format!("--redis-url={}", redis.url());
    let leaving = Service::against(&fake, &[&url, "--shutdown-grace=3s", "--drain-delay=0s"]).await;
    let mut request = check(identities(&[(Channel::Sms, NUMBER)]));
    request.wait = duration(Duration::from_secs(60));
    let waiting = spawn_check(leaving.client().await, request).await;
    nth_query(&fake, 1).await;
    leaving.shutdown.cancel();
    let status = waiting.await.unwrap().unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(status.message().contains("shutting down"), "{}", status.message());
}

/// A check that begins to wait after its replica's shutdown began (it came in during the drain delay) still ends
/// within the grace: its drain counted from when it began to wait, so the process exited first and the caller got
/// a broken connection.
#[tokio::test]
async fn with_redis_a_check_that_comes_during_the_drain_delay_ends_within_the_grace() {
    let fake = FakeSinch::start().await;
    let redis = RedisServer::start().await;
    let mut env = common::binary_env(&fake);
    env.extend([
        ("CAPABILITY_REDIS_URL", redis.url()),
        ("CAPABILITY_SHUTDOWN_GRACE", "3s".into()),
        ("CAPABILITY_DRAIN_DELAY", "2900ms".into()),
    ]);
    let replica = common::Binary::spawn(&env).await;
    let client = CapabilityServiceClient::connect(replica.url()).await.unwrap();
    replica.signal("TERM");
    // Into the drain delay, while calls are still taken: a drain (the grace less a second) from now ends after the
    // grace.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let mut request = check(identities(&[(Channel::Sms, NUMBER)]));
    request.wait = duration(Duration::from_secs(60));
    let status = spawn_check(client, request).await.await.unwrap().unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}: {}", replica.log_text());
    assert!(
        status.message().contains("shutting down"),
        "{}: {}",
        status.message(),
        replica.log_text()
    );
}
