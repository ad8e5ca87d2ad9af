//! Many replicas sharing a real Redis: any replica serves any watch, with the same offsets, through outages.

mod common;

use std::time::Duration;

use capability_facade::grpc::pb::{Channel, CompletionReason};
use common::{
    FakeSinch, Service, WEBHOOK_SECRET, capability_body, deliver, drain, held, identities, post_webhook, query, ready,
    redis::RedisServer, signed_headers, until_marker, watch_request,
};
use tonic::Code;

async fn replica(fake: &FakeSinch, redis: &RedisServer) -> Service {
    Service::against(fake, &[&format!("--redis-url={}", redis.url())]).await
}

fn body(request_id: &str, channel: &str) -> Vec<u8> {
    capability_body(request_id, channel, "46700000001", "CAPABILITY_FULL")
}

/// Queries `request_id` (SMS and RCS) through `service` and opens a watch of it there.
async fn query_and_watch(
    service: &Service,
    request_id: &str,
    wait: Option<Duration>,
) -> tonic::Streaming<capability_facade::grpc::pb::WatchCapabilityResponse> {
    let mut client = service.client().await;
    client
        .query_capability(query(
            identities(&[(Channel::Sms, "46700000001"), (Channel::Rcs, "46700000001")]),
            request_id,
        ))
        .await
        .unwrap();
    client
        .watch_capability(watch_request(request_id, 0, wait))
        .await
        .unwrap()
        .into_inner()
}

/// Watches `request_id` on `service` until the wait elapses or the answer completes.
async fn watch_all(service: &Service, request_id: &str, after: u64, wait: Duration) -> Vec<(u64, String, String)> {
    let mut client = service.client().await;
    let stream = client
        .watch_capability(watch_request(request_id, after, Some(wait)))
        .await
        .unwrap()
        .into_inner();
    drain(stream).await.0
}

#[tokio::test]
async fn a_callback_on_one_replica_reaches_a_watch_on_another_live_and_replayed() {
    let redis = RedisServer::start().await;
    let fake = FakeSinch::start().await;
    let (a, b) = (replica(&fake, &redis).await, replica(&fake, &redis).await);
    let live = query_and_watch(&b, "cross", None).await;
    assert_eq!(deliver(a.webhook_addr, body("cross", "SMS")).await, 200);
    assert_eq!(deliver(a.webhook_addr, body("cross", "RCS")).await, 200);
    let (seen, end) = drain(live).await;
    assert_eq!(seen.iter().map(|s| s.0).collect::<Vec<_>>(), [1, 2]);
    assert_eq!(
        end.unwrap().reason(),
        CompletionReason::AllChannelsReported,
        "the query went through B, the callbacks through A"
    );
    // A later watch on either replica replays the same.
    for replica in [&a, &b] {
        let replayed = watch_all(replica, "cross", 0, Duration::from_secs(5)).await;
        assert_eq!(replayed, seen);
    }
}

#[tokio::test]
async fn every_replica_numbers_the_notifications_alike_and_resumes_for_the_other() {
    let redis = RedisServer::start().await;
    let fake = FakeSinch::start().await;
    let (a, b) = (replica(&fake, &redis).await, replica(&fake, &redis).await);
    let channels = ["SMS", "RCS", "WHATSAPP", "VIBERBM", "MMS", "TELEGRAM"];
    for (i, channel) in channels.iter().enumerate() {
        let target = if i % 2 == 0 { &a } else { &b };
        assert_eq!(deliver(target.webhook_addr, body("same", channel)).await, 200);
        // A redelivery through the other replica changes nothing.
        let other = if i % 2 == 0 { &b } else { &a };
        assert_eq!(deliver(other.webhook_addr, body("same", channel)).await, 200);
    }
    // Each replica has read everything once it has read the last one.
    let last = channels[channels.len() - 1];
    let on_a = until_marker(&a, "same", 0, last).await;
    let on_b = until_marker(&b, "same", 0, last).await;
    assert_eq!(on_a.len(), channels.len(), "{on_a:?}");
    assert_eq!(on_a, on_b);
    let resumed = until_marker(&b, "same", 4, last).await;
    assert_eq!(resumed, on_a[4..]);
}

#[tokio::test]
async fn request_ids_and_nonces_hold_across_replicas() {
    let redis = RedisServer::start().await;
    let fake = FakeSinch::start().await;
    fake.set_echo_delay(Duration::from_millis(200));
    let (a, b) = (replica(&fake, &redis).await, replica(&fake, &redis).await);
    let request = query(identities(&[(Channel::Sms, "46700000001")]), "shared-id");
    let (mut on_a, mut on_b) = (a.client().await, b.client().await);
    let (first, second) = tokio::join!(
        on_a.query_capability(request.clone()),
        on_b.query_capability(request.clone())
    );
    assert_eq!(first.unwrap().into_inner(), second.unwrap().into_inner());
    assert_eq!(
        on_b.query_capability(request).await.unwrap().into_inner().request_id,
        "shared-id"
    );
    assert_eq!(
        fake.queries().len(),
        1,
        "one query reached Sinch for three calls on two replicas"
    );
    let status = on_b
        .query_capability(query(identities(&[(Channel::Sms, "46700000002")]), "shared-id"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::AlreadyExists);

    let callback = body("nonce", "SMS");
    let headers = signed_headers(WEBHOOK_SECRET, &callback);
    assert_eq!(post_webhook(a.webhook_addr, callback.clone(), &headers).await, 200);
    assert_eq!(post_webhook(b.webhook_addr, callback, &headers).await, 401);
}

#[tokio::test]
async fn through_a_redis_outage_callbacks_are_refused_then_redelivered_exactly_once() {
    let mut redis = RedisServer::start().await;
    let fake = FakeSinch::start().await;
    let (a, b) = (replica(&fake, &redis).await, replica(&fake, &redis).await);
    let watch = query_and_watch(&b, "outage", Some(Duration::from_secs(20))).await;

    redis.kill().await;
    assert_eq!(
        deliver(a.webhook_addr, body("outage", "SMS")).await,
        503,
        "not acknowledged while Redis is down"
    );
    let mut client_a = a.client().await;
    client_a
        .query_capability(query(identities(&[(Channel::Mms, "46700000001")]), ""))
        .await
        .expect("queries keep working without Redis");

    redis.restart().await;
    // Sinch redelivers until acknowledged; the connection manager reconnects on its own.
    deliver_until_acknowledged(a.webhook_addr, body("outage", "SMS")).await;
    assert_eq!(deliver(b.webhook_addr, body("outage", "RCS")).await, 200);
    let (seen, end) = drain(watch).await;
    assert_eq!(
        seen.into_iter().map(|s| (s.0, s.1)).collect::<Vec<_>>(),
        [(1, "SMS".to_owned()), (2, "RCS".to_owned())],
        "the open watch got each notification exactly once"
    );
    assert_eq!(end.unwrap().reason(), CompletionReason::AllChannelsReported);
}

#[tokio::test]
async fn a_new_replica_rebuilds_the_retained_events_from_redis() {
    let redis = RedisServer::start().await;
    let fake = FakeSinch::start().await;
    let a = replica(&fake, &redis).await;
    for channel in ["SMS", "RCS", "WHATSAPP"] {
        assert_eq!(deliver(a.webhook_addr, body("rebuild", channel)).await, 200);
    }
    let before = until_marker(&a, "rebuild", 0, "WHATSAPP").await;
    drop(a);
    let c = replica(&fake, &redis).await;
    // Ready means read back: what it holds then is the whole retained log.
    ready(&c).await;
    let after = held(&c, "rebuild", 0).await;
    assert_eq!(before.len(), 3);
    assert_eq!(after, before);
}

#[tokio::test]
async fn a_watcher_whose_replica_is_sigkilled_resumes_on_another_and_misses_nothing() {
    let redis = RedisServer::start().await;
    let fake = FakeSinch::start().await;
    let env = common::redis_binary_env(&fake, &redis);
    let mut a = common::Binary::spawn(&env).await;
    let b = common::Binary::spawn(&env).await;
    let mut on_b = tonic_client(&b.url()).await;
    on_b.query_capability(query(
        identities(&[
            (Channel::Sms, "46700000001"),
            (Channel::Rcs, "46700000001"),
            (Channel::Whatsapp, "46700000001"),
        ]),
        "killed",
    ))
    .await
    .unwrap();

    let mut watch = tonic_client(&a.url())
        .await
        .watch_capability(watch_request("killed", 0, None))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(deliver(b.webhook_addr, body("killed", "SMS")).await, 200);
    let mut last_offset = 0;
    while last_offset == 0 {
        if let Some(capability_facade::grpc::pb::watch_capability_response::Event::Notification(n)) =
            watch.message().await.unwrap().unwrap().event
        {
            last_offset = n.offset;
        }
    }
    assert_eq!(last_offset, 1);

    a.child.kill().await.unwrap();
    assert!(
        watch.message().await.is_err(),
        "the stream of the killed replica breaks"
    );
    for channel in ["RCS", "WHATSAPP"] {
        assert_eq!(deliver(b.webhook_addr, body("killed", channel)).await, 200);
    }
    let resumed = tonic_client(&b.url())
        .await
        .watch_capability(watch_request("killed", last_offset, None))
        .await
        .unwrap()
        .into_inner();
    let (seen, end) = drain(resumed).await;
    assert_eq!(
        seen.into_iter().map(|s| (s.0, s.1)).collect::<Vec<_>>(),
        [(2, "RCS".to_owned()), (3, "WHATSAPP".to_owned())],
        "the rest, each once"
    );
    assert_eq!(end.unwrap().reason(), CompletionReason::AllChannelsReported);
}

async fn tonic_client(
    url: &str,
) -> capability_facade::grpc::pb::capability_service_client::CapabilityServiceClient<tonic::transport::Channel> {
    capability_facade::grpc::pb::capability_service_client::CapabilityServiceClient::connect(url.to_owned())
        .await
        .unwrap()
}

/// Redis without persistence, SIGKILLed and restarted empty while replica B had not yet read what replica A
/// acknowledged (B is stopped with SIGSTOP to hold that moment open): A appends its recent events again once
/// it sees Redis came back without its data, so B's watcher still gets each of them once, and A holds no copies.
#[tokio::test]
async fn events_lost_by_a_redis_restarted_empty_are_appended_again_by_the_replica_that_accepted_them() {
    let mut redis = RedisServer::start().await;
    let fake = FakeSinch::start().await;
    let (_, a, b) = two_binaries(&fake, &redis).await;

    b.signal("STOP");
    for channel in ["SMS", "RCS", "WHATSAPP"] {
        assert_eq!(deliver(a.webhook_addr, body("emptied", channel)).await, 200);
    }
    assert_eq!(
        first_notifications(&a, "emptied", 3).await.len(),
        3,
        "A's own reader had them"
    );
    redis.kill().await;
    redis.restart().await;
    b.signal("CONT");

    let on_b = first_notifications(&b, "emptied", 3).await;
    let mut channels: Vec<&str> = on_b.iter().map(|(_, channel, _)| channel.as_str()).collect();
    channels.sort_unstable();
    assert_eq!(channels, ["RCS", "SMS", "WHATSAPP"], "each once on B: {on_b:?}");
    assert!(
        a.log_text().contains("appended this replica's recent events again"),
        "{}",
        a.log_text()
    );
    // A marker after the copies in stream order: once both replicas delivered it, they applied the copies.
    assert_eq!(deliver(a.webhook_addr, body("marker", "SMS")).await, 200);
    for (name, replica) in [("A", &a), ("B", &b)] {
        assert_eq!(first_notifications(replica, "marker", 1).await.len(), 1);
        assert_eq!(replayed(replica, "emptied").await.len(), 3, "{name} dropped the copies");
    }
}

/// Posts `body` to `webhook` as Sinch redelivers it, until acknowledged (503 while a replica reconnects).
async fn deliver_until_acknowledged(webhook: std::net::SocketAddr, body: Vec<u8>) {
    let mut status = 503;
    for _ in 0..200 {
        status = deliver(webhook, body.clone()).await;
        if status == 200 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("never acknowledged: {status}");
}

/// Redis restarted empty: a request whose notifications the replica accepted more than 10 s before is not among
/// the events it appends again, so Redis numbers its next notification 1 again. The replica holds offset 1 already
/// (a different notification): the acknowledged one must still reach its watches, after the last.
#[tokio::test]
async fn a_notification_numbered_again_by_a_redis_restarted_empty_still_reaches_the_watches() {
    let mut redis = RedisServer::start().await;
    let fake = FakeSinch::start().await;
    let a = replica(&fake, &redis).await;
    assert_eq!(deliver(a.webhook_addr, body("old", "SMS")).await, 200);
    assert_eq!(until_marker(&a, "old", 0, "SMS").await.len(), 1);
    // Real time, not a synchronisation: the replica appends again what it accepted in its last 10 s, and the
    // request must be older than that when Redis loses it.
    tokio::time::sleep(Duration::from_secs(11)).await;
    assert_eq!(deliver(a.webhook_addr, body("later", "SMS")).await, 200);
    assert_eq!(until_marker(&a, "later", 0, "SMS").await.len(), 1);
    redis.kill().await;
    redis.restart().await;
    deliver_until_acknowledged(a.webhook_addr, body("old", "RCS")).await;
    let seen = until_marker(&a, "old", 0, "RCS").await;
    assert_eq!(
        seen.into_iter().map(|s| (s.0, s.1)).collect::<Vec<_>>(),
        [(1, "SMS".to_owned()), (2, "RCS".to_owned())],
        "each acknowledged notification once, the second after the first"
    );
}

/// Redis came back with older data (the unsynced tail of its append-only file lost, or a failover to a lagging
/// replica): its epoch survived, so nothing is appended again, and a request's next notification takes an offset
/// the replicas already hold. The replica that holds it must still deliver the acknowledged one.
#[tokio::test]
async fn a_notification_numbered_again_by_a_redis_that_lost_its_last_writes_still_reaches_the_watches() {
    let (_redis, _fake, a) = rolled_back().await;
    deliver_until_acknowledged(a.webhook_addr, body("rolled-back", "WHATSAPP")).await;
    let seen = until_marker(&a, "rolled-back", 0, "WHATSAPP").await;
    assert_eq!(
        seen.into_iter().map(|s| (s.0, s.1)).collect::<Vec<_>>(),
        [(1, "SMS".to_owned()), (2, "RCS".to_owned()), (3, "WHATSAPP".to_owned())]
    );
}

/// Two replicas append their recent events again after Redis restarted empty, each its own and in the order
/// they reconnect: here the later offset of a request first. A replica started afterwards reads both.
#[tokio::test]
async fn events_appended_again_out_of_order_by_two_replicas_all_reach_a_new_replica() {
    let mut redis = RedisServer::start().await;
    let fake = FakeSinch::start().await;
    let (env, a, b) = two_binaries(&fake, &redis).await;
    assert_eq!(deliver(a.webhook_addr, body("reordered", "SMS")).await, 200);
    assert_eq!(deliver(b.webhook_addr, body("reordered", "RCS")).await, 200);
    assert_eq!(first_notifications(&b, "reordered", 2).await.len(), 2);

    a.signal("STOP");
    redis.kill().await;
    redis.restart().await;
    let appended_again = |line: &str| line.contains("appended this replica's recent events again");
    b.until_logged(1, appended_again).await;
    a.signal("CONT");
    a.until_logged(1, appended_again).await;

    let c = common::Binary::spawn(&env).await;
    let on_c = first_notifications(&c, "reordered", 2).await;
    let mut channels: Vec<&str> = on_c.iter().map(|(_, channel, _)| channel.as_str()).collect();
    channels.sort_unstable();
    assert_eq!(channels, ["RCS", "SMS"], "both, once each: {on_c:?}");
}

/// Redis paused writes past the replica's 2-s response timeout: the append script ran, its answer was lost and
/// its retry found the result already there. The replica must still count it among the events it accepted, and
/// append it again when Redis comes back empty.
#[tokio::test]
async fn an_append_whose_answer_timed_out_is_appended_again_after_redis_restarts_empty() {
    let (mut redis, fake, a) = warmed_up().await;
    redis.command(&["CLIENT", "PAUSE", "3000", "WRITE"]);
    assert_eq!(deliver(a.webhook_addr, body("timed-out", "SMS")).await, 200);
    read_back_after_an_empty_restart(&mut redis, &fake, &a, "timed-out").await;
}

/// Redis paused writes past both tries of an append (the callback answered 503): the script ran once Redis went
/// on, and Sinch's redelivery found the result there (a duplicate, acknowledged). The replica that acknowledged it
/// must count it among the events it accepted, and append it again when Redis comes back empty.
#[tokio::test]
async fn a_redelivery_acknowledged_as_a_duplicate_is_appended_again_after_redis_restarts_empty() {
    let (mut redis, fake, a) = warmed_up().await;
    // Past both tries of 2 s, with room to spare for a slow start of the first.
    redis.command(&["CLIENT", "PAUSE", "7000", "WRITE"]);
    assert_eq!(deliver(a.webhook_addr, body("timed-out", "SMS")).await, 503);
    deliver_until_acknowledged(a.webhook_addr, body("timed-out", "SMS")).await;
    read_back_after_an_empty_restart(&mut redis, &fake, &a, "timed-out").await;
}

/// Redis, the fake Sinch and a replica on them that has appended a first callback.
async fn warmed_up() -> (RedisServer, FakeSinch, Service) {
    let redis = RedisServer::start().await;
    let fake = FakeSinch::start().await;
    let a = replica(&fake, &redis).await;
    assert_eq!(deliver(a.webhook_addr, body("warm-up", "SMS")).await, 200);
    (redis, fake, a)
}

/// Restarts `redis` empty; a replica started afterwards must read `request_id`'s one notification back, which
/// replica `a` accepted and appended again.
async fn read_back_after_an_empty_restart(redis: &mut RedisServer, fake: &FakeSinch, a: &Service, request_id: &str) {
    redis.kill().await;
    redis.restart().await;
    // Acknowledged once the replica found Redis empty and appended its recent events again.
    deliver_until_acknowledged(a.webhook_addr, body("marker", "SMS")).await;
    let c = replica(fake, redis).await;
    ready(&c).await;
    let on_c = held(&c, request_id, 0).await;
    assert_eq!(on_c.len(), 1, "a new replica reads it back: {on_c:?}");
}

/// What a replica appended longer ago than the retention has expired: a Redis restarted empty must not bring it
/// back (appended again with a new time, it would live a whole retention more).
#[tokio::test]
async fn events_past_the_retention_are_not_appended_again_after_redis_restarts_empty() {
    let mut redis = RedisServer::start().await;
    let fake = FakeSinch::start().await;
    let args = [format!("--redis-url={}", redis.url()), "--retention=3s".to_owned()];
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let a = Service::against(&fake, &args).await;
    assert_eq!(deliver(a.webhook_addr, body("expired", "SMS")).await, 200);
    // Real time, not a synchronisation: the notification's retention passes.
    tokio::time::sleep(Duration::from_millis(3_500)).await;
    redis.kill().await;
    redis.restart().await;
    // Acknowledged once the replica found Redis empty and appended its recent events again.
    deliver_until_acknowledged(a.webhook_addr, body("marker", "SMS")).await;
    let c = Service::against(&fake, &args).await;
    ready(&c).await;
    assert_eq!(
        held(&c, "marker", 0).await.len(),
        1,
        "the new replica read the log back"
    );
    assert!(
        held(&c, "expired", 0).await.is_empty(),
        "an expired notification came back"
    );
}

/// The log ran ahead of the clock of the Redis that came back empty (a stream entry ten minutes ahead here; a
/// Redis started again on a host whose clock is behind does the same): every entry appended afterwards is timed
/// before the last one the replicas read. Each replica must read them all the same, its own callbacks and another's.
#[tokio::test]
async fn after_redis_restarts_empty_with_an_earlier_clock_every_replica_reads_what_is_appended() {
    let mut redis = RedisServer::start().await;
    let fake = FakeSinch::start().await;
    let ahead = std::time::SystemTime::now() + Duration::from_secs(600);
    let ahead_ms = ahead.duration_since(std::time::UNIX_EPOCH).unwrap().as_millis();
    // An entry no replica can read (skipped), which makes Redis time every later entry of the stream at it.
    redis.command(&["XADD", "{capability:0}:events", &format!("{ahead_ms}-0"), "e", "x"]);
    let (a, b) = (replica(&fake, &redis).await, replica(&fake, &redis).await);
    assert_eq!(deliver(a.webhook_addr, body("before", "SMS")).await, 200);
    for replica in [&a, &b] {
        assert_eq!(until_marker(replica, "before", 0, "SMS").await.len(), 1);
    }
    redis.kill().await;
    redis.restart().await;
    deliver_until_acknowledged(a.webhook_addr, body("after", "SMS")).await;
    for replica in [&a, &b] {
        assert_eq!(until_marker(replica, "after", 0, "SMS").await.len(), 1);
    }
}

/// The log is trimmed by Redis's clock: a replica whose own runs ahead must not trim what is still within the
/// retention, which a replica started later reads back (and others may not have read yet). Here B's clock runs ten
/// minutes ahead with a retention of two: by its clock, its query record's trim took every entry Redis held.
#[tokio::test]
async fn a_replica_whose_clock_runs_ahead_trims_nothing_within_the_retention() {
    let redis = RedisServer::start().await;
    // One entry per node of the stream: trimmed exactly (with `~` Redis trims whole nodes only).
    redis.command(&["CONFIG", "SET", "stream-node-max-entries", "1"]);
    let fake = FakeSinch::start().await;
    let mut env = common::redis_binary_env(&fake, &redis);
    env.push(("CAPABILITY_RETENTION", "2m".to_owned()));
    let a = common::Binary::spawn(&env).await;
    assert_eq!(deliver(a.webhook_addr, body("kept", "SMS")).await, 200);
    let ahead = [env.clone(), testkit::clock_offset("+600s")].concat();
    let b = common::Binary::spawn(&ahead).await;
    tonic_client(&b.url())
        .await
        .query_capability(query(identities(&[(Channel::Sms, "46700000001")]), "asked-ahead"))
        .await
        .unwrap();
    assert_eq!(deliver(a.webhook_addr, body("marker", "SMS")).await, 200);
    let c = common::Binary::spawn(&env).await;
    assert_eq!(first_notifications(&c, "marker", 1).await.len(), 1);
    assert_eq!(
        replayed(&c, "kept").await.len(),
        1,
        "a replica started later does not read it back"
    );
}

/// Two replica processes sharing `redis`, with the environment they were started with: both readers have
/// connected (and learnt the epoch) once each delivers what the other accepted.
async fn two_binaries(
    fake: &FakeSinch,
    redis: &RedisServer,
) -> (Vec<(&'static str, String)>, common::Binary, common::Binary) {
    let mut env = common::binary_env(fake);
    env.push(("CAPABILITY_REDIS_URL", redis.url()));
    let a = common::Binary::spawn(&env).await;
    let b = common::Binary::spawn(&env).await;
    assert_eq!(deliver(a.webhook_addr, body("warm-up", "SMS")).await, 200);
    for replica in [&a, &b] {
        assert_eq!(first_notifications(replica, "warm-up", 1).await.len(), 1);
    }
    (env, a, b)
}

/// Every notification of `request_id` `binary` holds now (a watch that replays and ends at once).
async fn replayed(binary: &common::Binary, request_id: &str) -> Vec<(u64, String, String)> {
    let replay = tonic_client(&binary.url())
        .await
        .watch_capability(watch_request(request_id, 0, Some(Duration::ZERO)))
        .await
        .unwrap()
        .into_inner();
    drain(replay).await.0
}

/// Watches `request_id` on `binary` until `count` notifications arrived (or a 20 s wait ended); returns them.
async fn first_notifications(binary: &common::Binary, request_id: &str, count: usize) -> Vec<(u64, String, String)> {
    use capability_facade::grpc::pb::watch_capability_response::Event;
    let mut stream = tonic_client(&binary.url())
        .await
        .watch_capability(watch_request(request_id, 0, Some(Duration::from_secs(20))))
        .await
        .unwrap()
        .into_inner();
    let mut seen = Vec::new();
    while seen.len() < count {
        match stream.message().await {
            Ok(Some(message)) => match message.event {
                Some(Event::Notification(n)) => seen.push((n.offset, n.channel_raw, n.capability_status_raw)),
                Some(Event::Heartbeat(_)) => {}
                _ => break,
            },
            _ => break,
        }
    }
    seen
}

/// A query forwarded while Redis was down is recorded once Redis answers again: its watches, on any replica, know
/// the channels it expects and complete when they have reported. They waited out their whole wait, ending as if a
/// channel might still come.
#[tokio::test]
async fn a_query_forwarded_while_redis_was_down_is_recorded_once_it_is_back() {
    let mut redis = RedisServer::start().await;
    let fake = FakeSinch::start().await;
    let (a, b) = (replica(&fake, &redis).await, replica(&fake, &redis).await);
    redis.kill().await;
    let watch = query_and_watch(&a, "blip", Some(Duration::from_secs(10))).await;
    redis.restart().await;
    deliver_until_acknowledged(a.webhook_addr, body("blip", "SMS")).await;
    assert_eq!(deliver(b.webhook_addr, body("blip", "RCS")).await, 200);
    let (seen, end) = drain(watch).await;
    assert_eq!(seen.len(), 2);
    assert_eq!(end.unwrap().reason(), CompletionReason::AllChannelsReported);
    let on_b = b
        .client()
        .await
        .watch_capability(watch_request("blip", 0, Some(Duration::from_secs(10))))
        .await
        .unwrap()
        .into_inner();
    let (seen, end) = drain(on_b).await;
    assert_eq!(seen.len(), 2);
    assert_eq!(end.unwrap().reason(), CompletionReason::AllChannelsReported);
}

/// Redis came back without its last writes but with its epoch (a failover to a replica that lagged, an
/// append-only file that lost its tail): the replica that accepted them appends its recent events again, so that a
/// replica that had not read them yet (here, one started afterwards) still gets them. They were lost for it.
#[tokio::test]
async fn events_lost_by_a_redis_that_kept_its_epoch_are_appended_again_for_the_other_replicas() {
    let (redis, fake, a) = rolled_back().await;
    deliver_until_acknowledged(a.webhook_addr, body("after", "SMS")).await;

    let c = replica(&fake, &redis).await;
    ready(&c).await;
    let seen = until_marker(&c, "rolled-back", 0, "RCS").await;
    assert_eq!(
        seen.into_iter().map(|s| (s.0, s.1)).collect::<Vec<_>>(),
        [(1, "SMS".to_owned()), (2, "RCS".to_owned())]
    );
}

/// A replica that accepted SMS then RCS for "rolled-back", and the Redis it shares, restarted with the first only
/// (its append-only file stopped before the second) and its epoch.
async fn rolled_back() -> (RedisServer, FakeSinch, Service) {
    let mut redis = RedisServer::start_durable().await;
    let fake = FakeSinch::start().await;
    let a = replica(&fake, &redis).await;
    assert_eq!(deliver(a.webhook_addr, body("rolled-back", "SMS")).await, 200);
    redis.config_set("appendonly", "no");
    assert_eq!(deliver(a.webhook_addr, body("rolled-back", "RCS")).await, 200);
    assert_eq!(until_marker(&a, "rolled-back", 0, "RCS").await.len(), 2);
    redis.kill().await;
    redis.restart().await;
    (redis, fake, a)
}

/// A caller-chosen request_id is claimed for as long as its query is being sent, however long that is, and no
/// longer: a repeat on another replica meanwhile waits for the first attempt's answer (the query is sent once),
/// and a repeat after the first attempt's replica was killed mid-send sends the query itself — where it waited
/// 10½ minutes for a claim nobody would settle, and got DEADLINE_EXCEEDED.
#[tokio::test]
async fn a_request_id_is_claimed_while_its_query_is_sent_and_freed_when_the_sender_dies() {
    let redis = RedisServer::start().await;
    let fake = FakeSinch::start().await;
    let env = common::redis_binary_env(&fake, &redis);
    let mut a = common::Binary::spawn(&env).await;
    let b = replica(&fake, &redis).await;
    let with_deadline = |request_id: &str| {
        let mut request = tonic::Request::new(query(identities(&[(Channel::Sms, "46700000001")]), request_id));
        request.set_timeout(Duration::from_secs(60));
        request
    };

    // Longer than a claim's lease lasts unrenewed.
    fake.set_echo_delay(Duration::from_secs(15));
    let slow = tokio::spawn({
        let (url, request) = (a.url(), with_deadline("slow"));
        async move { tonic_client(&url).await.query_capability(request).await }
    });
    fake.until_queries(1).await;
    let repeat = b.client().await.query_capability(with_deadline("slow")).await;
    assert_eq!(repeat.unwrap().into_inner().request_id, "slow");
    assert_eq!(slow.await.unwrap().unwrap().into_inner().request_id, "slow");
    assert_eq!(
        fake.queries().len(),
        1,
        "the repeat waited for the slow attempt's answer"
    );

    fake.set_echo_delay(Duration::from_secs(3600));
    let orphaned = tokio::spawn({
        let (url, request) = (a.url(), with_deadline("orphaned"));
        async move { tonic_client(&url).await.query_capability(request).await }
    });
    fake.until_queries(2).await;
    a.child.kill().await.unwrap();
    assert!(
        orphaned.await.unwrap().is_err(),
        "the killed replica's caller gets no answer"
    );
    fake.set_echo_delay(Duration::ZERO);
    let repeat = b.client().await.query_capability(with_deadline("orphaned")).await;
    assert_eq!(repeat.unwrap().into_inner().request_id, "orphaned");
    assert_eq!(
        fake.queries().len(),
        3,
        "the repeat sent the query the killed replica could not finish"
    );
}

/// The question a request_id was asked last says which channels its watches wait for, whatever order the log
/// holds the records in and whatever the replicas' clocks. A replica that lost its connection to Redis appends its
/// recent events again: a question Sinch refused there, corrected under the same request_id on another replica,
/// came after the correction, and every hub then expected the refused question's channels — a watch completed on
/// SMS alone. (Placed by the refusing replica's clock, ten minutes ahead here, it still won.)
#[tokio::test]
async fn an_earlier_question_appended_again_does_not_replace_its_correction() {
    let (redis, fake) = (RedisServer::start().await, FakeSinch::start().await);
    let a = replica_of_its_own(&fake, &redis, "+600s", 0).await;
    let b = replica(&fake, &redis).await;
    ask_refused(&fake, &a).await;
    let both = [(Channel::Sms, "46700000001"), (Channel::Rcs, "46700000001")];
    b.client()
        .await
        .query_capability(query(identities(&both), "corrected"))
        .await
        .unwrap();

    redis.command(&["CLIENT", "KILL", "USER", "replica-a"]);
    // Until A appended its refused question again.
    until_records_of_corrected(&redis, 3).await;
    expects_rcs_still(&fake, &[a.url(), format!("http://{}", b.grpc_addr)], &b).await;
}

/// A correction that Redis could not take at first (the replica's connection was down) is placed where it was
/// asked, by the log's clock: it came after the question it corrected, but was placed by its replica's clock, a
/// minute behind here, and every hub kept the refused question's channels.
#[tokio::test]
async fn a_correction_recorded_only_once_redis_answers_again_replaces_the_question() {
    let (redis, fake) = (RedisServer::start().await, FakeSinch::start().await);
    let a = replica_of_its_own(&fake, &redis, "-60s", 0).await;
    let b = replica(&fake, &redis).await;
    ready(&b).await;
    ask_refused(&fake, &a).await;
    // A's commands refused (its connections stay up), its reader's connection cut.
    redis.command(&["ACL", "SETUSER", "replica-a", "-@all"]);
    redis.command(&["CLIENT", "KILL", "USER", "replica-a"]);
    let both = [(Channel::Sms, "46700000001"), (Channel::Rcs, "46700000001")];
    tonic_client(&a.url())
        .await
        .query_capability(query(identities(&both), "corrected"))
        .await
        .unwrap();
    redis.command(&["ACL", "SETUSER", "replica-a", "+@all"]);
    // Until A appended the correction, and its refused question again.
    until_records_of_corrected(&redis, 3).await;
    expects_rcs_still(&fake, &[a.url(), format!("http://{}", b.grpc_addr)], &b).await;
}

/// A replica whose Redis refused it for a moment as it connected — its credentials (a password rotated, its user
/// switched off), or its `SELECT` of a database other than 0 (its user's commands revoked) — connects again once
/// it is accepted: its shared connection kept the refusal and never tried again, so that every callback it took was
/// answered 503 and its watches heard nothing until it was restarted.
#[tokio::test]
async fn a_replica_refused_for_a_moment_as_it_connected_connects_again() {
    for (refuse, accept, database) in [("off", "on", 0), ("-@all", "+@all", 1)] {
        let (redis, fake) = (RedisServer::start().await, FakeSinch::start().await);
        let a = replica_of_its_own(&fake, &redis, "+0s", database).await;
        assert_eq!(deliver(a.webhook_addr, body("before", "SMS")).await, 200);
        redis.command(&["ACL", "SETUSER", "replica-a", refuse]);
        redis.command(&["CLIENT", "KILL", "USER", "replica-a"]);
        // Refused meanwhile: until it tried to connect again.
        common::until(Duration::from_secs(5), async || {
            deliver(a.webhook_addr, body("refused", "SMS")).await == 503
        })
        .await;
        redis.command(&["ACL", "SETUSER", "replica-a", accept]);
        deliver_until_acknowledged(a.webhook_addr, body("after", "SMS")).await;
        assert_eq!(
            first_notifications(&a, "after", 1).await.len(),
            1,
            "{refuse}: its watches hear of it"
        );
    }
}

/// A replica process connecting to `redis` as a Redis user of its own (`replica-a`), so that its connections alone
/// can be cut, its clock `offset` from this machine's, on `database`.
async fn replica_of_its_own(fake: &FakeSinch, redis: &RedisServer, offset: &str, database: u8) -> common::Binary {
    redis.command(&["ACL", "SETUSER", "replica-a", "on", ">a-password", "~*", "&*", "+@all"]);
    let url = format!("redis://replica-a:a-password@127.0.0.1:{}/{database}", redis.port);
    let env = [
        common::binary_env(fake),
        vec![("CAPABILITY_REDIS_URL", url)],
        testkit::clock_offset(offset),
    ]
    .concat();
    common::Binary::spawn(&env).await
}

/// Asks `a` about SMS under "corrected", which Sinch refuses.
async fn ask_refused(fake: &FakeSinch, a: &common::Binary) {
    fake.script_queries([common::Canned::sinch_error(400, "INVALID_ARGUMENT", "refused")]);
    let sms = [(Channel::Sms, "46700000001")];
    let refused = tonic_client(&a.url())
        .await
        .query_capability(query(identities(&sms), "corrected"))
        .await;
    assert_eq!(refused.unwrap_err().code(), Code::InvalidArgument);
}

/// Waits until the log's stream holds `count` records of "corrected".
async fn until_records_of_corrected(redis: &RedisServer, count: usize) {
    let stream = redis.keys("*:events").pop().expect("the log's stream");
    let records = || {
        redis
            .command(&["XRANGE", &stream, "-", "+"])
            .matches("corrected")
            .count()
    };
    common::until(Duration::from_secs(30), async || records() >= count).await;
    assert_eq!(records(), count);
}

/// Delivers SMS for "corrected" through `b`: a watch on each of `urls` gets it, and waits for RCS until its wait
/// ends rather than complete.
async fn expects_rcs_still(fake: &FakeSinch, urls: &[String], b: &Service) {
    assert_eq!(fake.queries().len(), 2, "the refused question and its correction");
    assert_eq!(deliver(b.webhook_addr, body("corrected", "SMS")).await, 200);
    for url in urls {
        let watch = tonic_client(url)
            .await
            .watch_capability(watch_request("corrected", 0, Some(Duration::from_secs(2))))
            .await
            .unwrap()
            .into_inner();
        let (seen, end) = drain(watch).await;
        assert_eq!(seen.len(), 1, "{url}");
        assert_eq!(
            end.unwrap().reason(),
            CompletionReason::WaitElapsed,
            "{url}: RCS is still to come"
        );
    }
}
