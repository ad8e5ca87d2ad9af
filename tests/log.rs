//! The event log as replicas share it: offsets decided by the log whatever each replica purged or when it
//! started, semantic dedupe, the per-request cap, watches of made-up request_ids, versions a build does not know,
//! a Redis Cluster, and what is refused at start.

mod common;

use std::{collections::HashMap, time::Duration};
use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient};

use capability_facade::grpc::pb;
use common::{FakeSinch, Service, deliver, held, post_webhook, ready, signed_headers, until_marker, watch_request};
use rand::Rng;
use testkit::{RedisCluster, RedisServer};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpListener,
    sync::mpsc,
};

/// A callback whose outcome is (request_id, channel, identity, status); `variant` changes only what is not the
/// outcome (times, metadata), as a redelivery or a second registration of the same query does.
fn callback(request_id: &str, channel: &str, status: &str, variant: u32) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "app_id": "APP-1",
        "accepted_time": format!("2026-11-22T10:00:{:02}.{variant:06}Z", variant % 60),
        "event_time": "2026-11-22T10:00:00Z",
        "project_id": "",
        "message_metadata": format!("delivery {variant}"),
        "capability_notification": {"request_id": request_id, "channel": channel, "identity": "46700000001",
            "capability_status": status}
    }))
    .unwrap()
}

fn full(request_id: &str, channel: &str) -> Vec<u8> {
    callback(request_id, channel, "CAPABILITY_FULL", 0)
}

async fn redis_replica(fake: &FakeSinch, url: &str, extra: &[&str]) -> Service {
    let mut flags = vec![format!("--redis-url={url}")];
    flags.extend(extra.iter().map(|s| s.to_string()));
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let service = Service::against(fake, &flags).await;
    ready(&service).await;
    service
}

#[tokio::test]
async fn offsets_are_the_logs_whatever_each_replica_purged_or_when_it_started() {
    let redis = RedisServer::start().await;
    let fake = FakeSinch::start().await;
    let retention = ["--retention=3s"];
    let a = redis_replica(&fake, &redis.url(), &retention).await;
    let b = redis_replica(&fake, &redis.url(), &retention).await;
    assert_eq!(deliver(a.webhook_addr, full("late", "SMS")).await, 200);
    assert_eq!(until_marker(&b, "late", 0, "SMS").await[0].0, 1);
    // Two seconds apart: the first expires a retention after its own time, the second a while later.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(deliver(b.webhook_addr, full("late", "RCS")).await, 200);
    assert_eq!(until_marker(&a, "late", 1, "RCS").await[0].0, 2);
    // A let the first notification go at its own time.
    common::until(Duration::from_secs(10), async || {
        held(&a, "late", 0).await.first().is_none_or(|n| n.0 != 1)
    })
    .await;
    // A replica started now reads back only the second, and numbers it as the others do.
    let c = redis_replica(&fake, &redis.url(), &retention).await;
    assert_eq!(held(&c, "late", 0).await.iter().map(|n| n.0).collect::<Vec<_>>(), [2]);
    assert_eq!(deliver(c.webhook_addr, full("late", "WHATSAPP")).await, 200);
    for replica in [&a, &b, &c] {
        let resumed = until_marker(replica, "late", 2, "WHATSAPP").await;
        assert_eq!(resumed, [(3, "WHATSAPP".into(), "CAPABILITY_FULL".into())]);
    }
}

/// A request lives as long as its last event, its query's records included, with Redis as without: a query
/// record appended after the request's results (here the same request_id asked again once the idempotency window
/// passed; also a replica's recent records appended again after a reconnect) kept the replicas' record of the
/// request, but not Redis's numbering, which started again at 1 once the results' time had passed — the next
/// result was held at the offset the first had had, and a watch past it ended complete without it.
#[tokio::test]
async fn a_query_recorded_after_the_results_keeps_the_requests_numbering_with_redis_as_without() {
    let redis = RedisServer::start().await;
    let fake = FakeSinch::start().await;
    let flags = ["--retention=6s", "--idempotency-window=1s"];
    let single = Service::against(&fake, &flags).await;
    let replica = redis_replica(&fake, &redis.url(), &flags).await;
    async fn asked_again(setup: &str, service: &Service) {
        let webhook = service.webhook_addr;
        let mut client = service.client().await;
        let asked = common::query(
            common::identities(&[(pb::Channel::Sms, "46700000001"), (pb::Channel::Rcs, "46700000001")]),
            "asked-again",
        );
        client.query_capability(asked.clone()).await.unwrap();
        assert_eq!(deliver(webhook, full("asked-again", "SMS")).await, 200);
        assert_eq!(until_marker(service, "asked-again", 0, "SMS").await[0].0, 1, "{setup}");
        // Past the idempotency window: sent again, and recorded again — late enough that the request then
        // outlives its first result by more than a replica's clock lags behind the log's (an idle read of
        // Redis returns every 2 s).
        tokio::time::sleep(Duration::from_secs(4)).await;
        client.query_capability(asked).await.unwrap();
        // The first result's time passes (a retention after it), and the replica lets it go.
        common::until(Duration::from_secs(10), async || {
            held(service, "asked-again", 0).await.is_empty()
        })
        .await;
        assert_eq!(deliver(webhook, full("asked-again", "RCS")).await, 200);
        assert_eq!(
            until_marker(service, "asked-again", 1, "RCS").await,
            [(2, "RCS".into(), "CAPABILITY_FULL".into())],
            "{setup}"
        );
    }
    tokio::join!(
        asked_again("without Redis", &single),
        asked_again("with Redis", &replica)
    );
}

#[tokio::test]
async fn the_same_outcome_in_other_bytes_is_delivered_once_and_a_new_outcome_is_news() {
    let redis = RedisServer::start().await;
    let fake = FakeSinch::start().await;
    let single = Service::against(&fake, &[]).await;
    let (a, b) = (
        redis_replica(&fake, &redis.url(), &[]).await,
        redis_replica(&fake, &redis.url(), &[]).await,
    );
    for (post_to, watch_on) in [(&single, &single), (&a, &b)] {
        for variant in 0..3 {
            // Sinch's second registration of a retried query: new accepted_time and metadata, same result.
            let target = if variant % 2 == 0 { post_to } else { watch_on };
            assert_eq!(
                deliver(
                    target.webhook_addr,
                    callback("twice", "SMS", "CAPABILITY_FULL", variant)
                )
                .await,
                200
            );
        }
        assert_eq!(
            deliver(post_to.webhook_addr, callback("twice", "SMS", "NO_CAPABILITY", 9)).await,
            200
        );
        assert_eq!(deliver(post_to.webhook_addr, full("twice", "MARKER")).await, 200);
        let seen = until_marker(watch_on, "twice", 0, "MARKER").await;
        assert_eq!(
            seen,
            [
                (1, "SMS".into(), "CAPABILITY_FULL".into()),
                (2, "SMS".into(), "NO_CAPABILITY".into()),
                (3, "MARKER".into(), "CAPABILITY_FULL".into()),
            ]
        );
    }
}

#[tokio::test]
async fn a_request_takes_at_most_its_cap_of_notifications_and_the_excess_is_acknowledged() {
    let fake = FakeSinch::start().await;
    let service = Service::against(&fake, &["--max-notifications-per-request=100"]).await;
    for i in 0..106 {
        let body = callback("flood", &format!("CHANNEL{i}"), "CAPABILITY_FULL", 0);
        assert_eq!(deliver(service.webhook_addr, body).await, 200, "notification {i}");
    }
    let kept = held(&service, "flood", 0).await;
    assert_eq!(kept.len(), 100);
    assert_eq!(
        kept.last().unwrap(),
        &(100, "CHANNEL99".into(), "CAPABILITY_FULL".into())
    );
}

#[tokio::test]
async fn watches_of_made_up_request_ids_never_push_real_results_out() {
    let fake = FakeSinch::start().await;
    let service = Service::against(&fake, &["--max-requests=3"]).await;
    let mut client = service.client().await;
    let mut made_up = Vec::new();
    for _ in 0..200 {
        let id = format!("made-up-{}", rand::rng().random::<u64>());
        let stream = client
            .watch_capability(watch_request(&id, 0, Some(Duration::from_secs(30))))
            .await
            .unwrap()
            .into_inner();
        made_up.push(stream);
    }
    for id in ["real-1", "real-2", "real-3"] {
        assert_eq!(deliver(service.webhook_addr, full(id, "SMS")).await, 200);
    }
    for _ in 0..200 {
        let id = format!("made-up-{}", rand::rng().random::<u64>());
        made_up.push(
            client
                .watch_capability(watch_request(&id, 0, Some(Duration::from_secs(30))))
                .await
                .unwrap()
                .into_inner(),
        );
    }
    for id in ["real-1", "real-2", "real-3"] {
        assert_eq!(
            held(&service, id, 0).await.len(),
            1,
            "{id} survived 400 made-up watches"
        );
    }
}

#[tokio::test]
async fn an_entry_of_a_version_this_build_does_not_know_is_skipped_and_counted() {
    let redis = RedisServer::start().await;
    let fake = FakeSinch::start().await;
    let service = redis_replica(&fake, &redis.url(), &["--redis-prefix=versions"]).await;
    let client = redis::Client::open(redis.url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let from_the_future = [2u8, 0x0a, 0x03, b'n', b'e', b'w'];
    let _: String = redis::cmd("XADD")
        .arg("{versions:0}:events")
        .arg("*")
        .arg("e")
        .arg(&from_the_future[..])
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(
        deliver(service.webhook_addr, full("after-the-future", "SMS")).await,
        200
    );
    assert_eq!(until_marker(&service, "after-the-future", 0, "SMS").await.len(), 1);
    let metrics = common::metrics_text(service.admin_addr).await;
    assert!(
        metrics.contains(r#"capability_log_skipped_total{reason="unknown_version"} 1"#),
        "{metrics}"
    );
}

/// Posts a genuine callback; its status, `Retry-After` and body.
async fn post_answer(addr: std::net::SocketAddr, body: Vec<u8>) -> (u16, Option<String>, String) {
    let mut request = common::reqwest_client()
        .post(common::webhook_url(addr))
        .body(body.clone());
    for (name, value) in signed_headers(common::WEBHOOK_SECRET, &body) {
        request = request.header(name, value);
    }
    let response = request.send().await.unwrap();
    let retry_after = response
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap().to_owned());
    (response.status().as_u16(), retry_after, response.text().await.unwrap())
}

#[tokio::test]
async fn past_its_pending_limit_a_callback_is_shed_at_once_and_sinchs_redelivery_loses_nothing() {
    let redis = RedisServer::start().await;
    let fake = FakeSinch::start().await;
    let service = redis_replica(&fake, &redis.url(), &["--webhook-max-pending=1"]).await;
    // Redis holds every write: the first callback admitted waits in the log's append, so the other is one too many.
    redis.command(&["CLIENT", "PAUSE", "60000", "WRITE"]);
    let post = |channel: &'static str| tokio::spawn(post_answer(service.webhook_addr, full("shed", channel)));
    let (mut sms, mut rcs) = (post("SMS"), post("RCS"));
    let (first, mut other, other_channel) = tokio::select! {
        answer = &mut sms => (answer.unwrap(), rcs, "RCS"),
        answer = &mut rcs => (answer.unwrap(), sms, "SMS"),
    };
    let shed_channel = if other_channel == "SMS" { "RCS" } else { "SMS" };
    assert_eq!(
        first.0, 503,
        "the one too many is answered while the other still waits: {first:?}"
    );
    assert_eq!(first.1.as_deref(), Some("1"), "with a Retry-After");
    assert!(first.2.contains("busy"), "{first:?}");
    assert!(
        tokio::time::timeout(Duration::ZERO, &mut other).await.is_err(),
        "the admitted callback is not answered before the log has it"
    );
    redis.command(&["CLIENT", "UNPAUSE"]);
    // Sinch redelivers whatever got a 503 (the admitted one too, had its append outlasted Redis's response timeout).
    let mut retry = vec![shed_channel];
    if other.await.unwrap().0 != 200 {
        retry.push(other_channel);
    }
    for channel in retry.into_iter().chain(["MARKER"]) {
        assert_eq!(deliver(service.webhook_addr, full("shed", channel)).await, 200);
    }
    let mut seen: Vec<String> = until_marker(&service, "shed", 0, "MARKER")
        .await
        .into_iter()
        .map(|(_, channel, _)| channel)
        .collect();
    seen.sort();
    assert_eq!(seen, ["MARKER", "RCS", "SMS"], "each callback delivered once");
}

/// A callback the log cannot take within the webhook timeout is answered 503, which Sinch redelivers, not 408,
/// which it may not: the time ran out on our side, not the sender's.
#[tokio::test]
async fn a_callback_the_log_takes_too_long_to_take_is_told_to_come_again() {
    let redis = RedisServer::start().await;
    let fake = FakeSinch::start().await;
    let service = redis_replica(&fake, &redis.url(), &["--webhook-timeout=1s"]).await;
    redis.command(&["CLIENT", "PAUSE", "60000", "WRITE"]);
    let (status, retry_after, text) = post_answer(service.webhook_addr, full("slow-log", "SMS")).await;
    assert_eq!((status, retry_after.as_deref()), (503, Some("1")), "{text}");
    redis.command(&["CLIENT", "UNPAUSE"]);
    for channel in ["SMS", "MARKER"] {
        assert_eq!(deliver(service.webhook_addr, full("slow-log", channel)).await, 200);
    }
    let seen = until_marker(&service, "slow-log", 0, "MARKER").await;
    assert_eq!(seen.len(), 2, "delivered once: {seen:?}");
}

#[tokio::test]
async fn a_replica_is_ready_only_once_it_read_the_log_back() {
    let redis = RedisServer::start().await;
    let fake = FakeSinch::start().await;
    let a = redis_replica(&fake, &redis.url(), &[]).await;
    for i in 0..500 {
        assert_eq!(
            deliver(a.webhook_addr, full(&format!("backlog-{}", i % 50), &format!("C{i}"))).await,
            200
        );
    }
    let b = redis_replica(&fake, &redis.url(), &[]).await;
    for i in 0..50 {
        assert_eq!(
            held(&b, &format!("backlog-{i}"), 0).await.len(),
            10,
            "backlog-{i} replayed in full"
        );
    }
}

/// While a Redis Cluster moves the slot of a shard's stream (a reshard), Redis refuses a script that touches several
/// of the slot's keys when one is missing (`TRYAGAIN`), and the Cluster client does not follow a pipeline (nor,
/// always, a command) on a missing key to the slot's new node (`ASK`): a query's record, which renews its request's
/// state (not there yet), must still be appended, once (or its watches do not learn the channels it expects; a
/// record appended again on every retry fills the stream).
#[tokio::test]
async fn a_querys_record_is_appended_while_its_shards_slot_moves() {
    let cluster = RedisCluster::start(3).await;
    let fake = FakeSinch::start().await;
    let replica = redis_replica(&fake, &cluster.urls().join(","), &[]).await;
    let stream = "{capability:0}:events";
    assert_eq!(deliver(replica.webhook_addr, full("before-moving", "SMS")).await, 200);
    let owner = cluster.node_of(stream).await;
    let target = (owner + 1) % 3;
    let slot = cluster.command(owner, &["CLUSTER", "KEYSLOT", stream]).await;
    let owner_id = cluster.command(owner, &["CLUSTER", "MYID"]).await;
    let target_id = cluster.command(target, &["CLUSTER", "MYID"]).await;
    cluster
        .command(target, &["CLUSTER", "SETSLOT", &slot, "IMPORTING", &owner_id])
        .await;
    cluster
        .command(owner, &["CLUSTER", "SETSLOT", &slot, "MIGRATING", &target_id])
        .await;
    let before = cluster.command(owner, &["XLEN", stream]).await;
    let recipient = common::identities(&[(pb::Channel::Sms, "46700000001")]);
    replica
        .client()
        .await
        .query_capability(common::query(recipient, "while-moving"))
        .await
        .unwrap();
    let appended = cluster.command(owner, &["XLEN", stream]).await;
    assert_eq!(
        appended.parse::<u64>().unwrap(),
        before.parse::<u64>().unwrap() + 1,
        "not appended"
    );
    // The slot stays: a record kept to be appended again would be, after the reader's next read.
    for node in [owner, target] {
        cluster.command(node, &["CLUSTER", "SETSLOT", &slot, "STABLE"]).await;
    }
    for marker in ["marker-1", "marker-2"] {
        assert_eq!(deliver(replica.webhook_addr, full(marker, "SMS")).await, 200);
        until_marker(&replica, marker, 0, "SMS").await;
    }
    let after = cluster.command(owner, &["XLEN", stream]).await;
    assert_eq!(
        after.parse::<u64>().unwrap(),
        before.parse::<u64>().unwrap() + 3,
        "appended again"
    );
}

#[tokio::test]
async fn replicas_share_one_log_on_a_redis_cluster_sharded_by_request_id() {
    let cluster = RedisCluster::start(3).await;
    let fake = FakeSinch::start().await;
    let urls = cluster.urls().join(",");
    let seed = format!("redis+cluster://{}", cluster.urls()[0].trim_start_matches("redis://"));
    let shards = ["--redis-shards=4"];
    let replicas = [
        redis_replica(&fake, &urls, &shards).await,
        redis_replica(&fake, &urls, &shards).await,
        redis_replica(&fake, &seed, &shards).await,
    ];
    let channels = ["SMS", "RCS", "WHATSAPP", "VIBERBM", "MMS"];
    let requests: Vec<String> = (0..12).map(|i| format!("cluster-{i}")).collect();
    let mut rng = rand::rng();
    for request in &requests {
        for channel in channels {
            let target = &replicas[rng.random_range(0..replicas.len())];
            assert_eq!(deliver(target.webhook_addr, full(request, channel)).await, 200);
            // A redelivery through another replica changes nothing.
            let other = &replicas[rng.random_range(0..replicas.len())];
            assert_eq!(deliver(other.webhook_addr, full(request, channel)).await, 200);
        }
        assert_eq!(deliver(replicas[0].webhook_addr, full(request, "MARKER")).await, 200);
    }
    let mut numbered: HashMap<&str, Vec<(u64, String, String)>> = HashMap::new();
    for request in &requests {
        for replica in &replicas {
            let seen = until_marker(replica, request, 0, "MARKER").await;
            assert_eq!(seen.len(), channels.len() + 1, "{request}: {seen:?}");
            let first = numbered.entry(request).or_insert_with(|| seen.clone());
            assert_eq!(first, &seen, "{request} is numbered alike on every replica");
        }
        // Resumed on another replica after offset 3: exactly the rest.
        let resumed = until_marker(&replicas[2], request, 3, "MARKER").await;
        assert_eq!(resumed, numbered[request.as_str()][3..]);
    }

    let body = full("cluster-nonce", "SMS");
    let headers = signed_headers(common::WEBHOOK_SECRET, &body);
    assert_eq!(
        post_webhook(replicas[0].webhook_addr, body.clone(), &headers).await,
        200
    );
    assert_eq!(
        post_webhook(replicas[1].webhook_addr, body, &headers).await,
        401,
        "a nonce holds across replicas"
    );

    let request = common::query(
        common::identities(&[(pb::Channel::Sms, "46700000001")]),
        "cluster-idempotent",
    );
    for replica in &replicas {
        let answer = replica.client().await.query_capability(request.clone()).await.unwrap();
        assert_eq!(answer.into_inner().request_id, "cluster-idempotent");
    }
    assert_eq!(fake.queries().len(), 1, "one query for three calls on three replicas");
}

/// Speaks just enough RESP to say it is an old Redis: every INFO answers `redis_version:<version>`.
async fn old_redis(version: &'static str) -> u16 {
    fake_redis(version, "+OK\r\n", mpsc::unbounded_channel().0).await
}

/// Speaks just enough RESP: INFO answers `redis_version:<version>`, every other command `answer`, each told to
/// `others`.
async fn fake_redis(version: &'static str, answer: &'static str, others: mpsc::UnboundedSender<()>) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            let others = others.clone();
            tokio::spawn(async move {
                let mut buffer = vec![0; 4096];
                while let Ok(n) = socket.read(&mut buffer).await {
                    if n == 0 {
                        return;
                    }
                    let request = String::from_utf8_lossy(&buffer[..n]).to_ascii_uppercase();
                    // One answer per command in what arrived (a pipeline sends several).
                    for command in request.split("\r\n*").filter(|c| !c.trim().is_empty()) {
                        let reply = if command.contains("INFO") {
                            let info = format!("# Server\r\nredis_version:{version}\r\n");
                            format!("${}\r\n{info}\r\n", info.len())
                        } else {
                            let _ = others.send(());
                            answer.to_owned()
                        };
                        if socket.write_all(reply.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                }
            });
        }
    });
    port
}

/// A Redis still loading its data answers every command with LOADING: the replica waits for it, unready,
/// rather than report ready with nothing read back.
#[tokio::test]
async fn a_replica_next_to_a_redis_still_loading_stays_unready() {
    let fake = FakeSinch::start().await;
    let (others, mut asked) = mpsc::unbounded_channel();
    let loading = "-LOADING Redis is loading the dataset in memory\r\n";
    let port = fake_redis("7.2.4", loading, others).await;
    let service = Service::against(&fake, &[&format!("--redis-url=redis://127.0.0.1:{port}")]).await;
    let readyz = format!("http://{}/readyz", service.admin_addr);
    let client = common::reqwest_client();
    // Past the first refusals and into retries: the reader has handled a LOADING answer at least once.
    let retried = tokio::time::timeout(Duration::from_secs(30), async {
        for _ in 0..4 {
            asked.recv().await.expect("the fake runs");
        }
    })
    .await;
    assert!(retried.is_ok(), "the replica never asked Redis again");
    let status = client.get(&readyz).send().await.unwrap().status();
    assert_eq!(status, 503, "ready although nothing could be read back");
    // The gRPC health the readiness probe asks says the same.
    let health = HealthClient::new(service.channel().await)
        .check(HealthCheckRequest {
            service: "capability.v1.CapabilityService".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(health.status(), ServingStatus::NotServing);
}

#[tokio::test]
async fn a_redis_too_old_or_an_unusable_url_is_refused_before_any_port_and_an_absent_one_starts_degraded() {
    let fake = FakeSinch::start().await;
    let port = old_redis("6.0.9").await;
    let error = common::start_error(&fake.url(), &[&format!("--redis-url=redis://127.0.0.1:{port}")]).await;
    assert_eq!(error.variable, "CAPABILITY_REDIS_URL");
    assert!(error.problem.contains("6.0 is too old"), "{}", error.problem);
    for url in ["http://127.0.0.1:6379", "redis://", "redis://a:1,nohost"] {
        let error = common::start_error(&fake.url(), &[&format!("--redis-url={url}")]).await;
        assert_eq!(error.variable, "CAPABILITY_REDIS_URL", "{url}");
    }
    // Bound, not listening: connections are refused, and no other test's server can take the port meanwhile (a
    // port only found free could become a Redis Cluster node's bus port, which the replica would wait for).
    let refusing = tokio::net::TcpSocket::new_v4().unwrap();
    refusing.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let nobody = refusing.local_addr().unwrap().port();
    let degraded = Service::against(&fake, &[&format!("--redis-url=redis://127.0.0.1:{nobody}")]).await;
    ready(&degraded).await;
    let answer = degraded
        .client()
        .await
        .query_capability(common::query(common::contact("c"), ""))
        .await;
    assert!(answer.is_ok(), "queries still work without Redis: {answer:?}");
}

/// A Redis allowed to evict keys under memory pressure could drop a request's state or a nonce: said at start.
#[tokio::test]
async fn a_redis_that_may_evict_keys_is_named_in_a_warning_at_start() {
    let fake = FakeSinch::start().await;
    let redis = RedisServer::start().await;
    redis.config_set("maxmemory-policy", "allkeys-lru");
    let env = common::redis_binary_env(&fake, &redis);
    let binary = common::Binary::spawn(&env).await;
    let warned = binary.until_logged(1, |l| l.contains("REDIS_MAY_EVICT"));
    let warnings = tokio::time::timeout(Duration::from_secs(30), warned)
        .await
        .expect("a warning at start");
    assert!(warnings[0].contains("allkeys-lru"), "{warnings:?}");
}

/// A Redis that answers but refuses the password will not accept it later either: refused at start, naming the
/// variable and not the password.
#[tokio::test]
async fn a_redis_that_refuses_the_password_is_refused_at_start() {
    let fake = FakeSinch::start().await;
    let redis = RedisServer::start().await;
    redis.config_set("requirepass", "right-one");
    let url = format!("--redis-url=redis://:wrong-one@127.0.0.1:{}", redis.port);
    let error = common::start_error(&fake.url(), &[&url]).await;
    assert_eq!(error.variable, "CAPABILITY_REDIS_URL");
    assert!(!error.problem.contains("wrong-one"), "{}", error.problem);
}

/// A claim that lapsed while its owner still sends (Redis out of reach for longer than a lease) is taken again by
/// the owner's next renewal when nobody took it since: a repeat elsewhere then waits for the owner's answer rather
/// than send the query a second time.
#[tokio::test]
async fn a_lapsed_claim_nobody_took_is_taken_again_by_its_owner() {
    use capability_facade::log::{EventLog, IdempotencyClaim};
    let redis = RedisServer::start().await;
    let replica = async || EventLog::Redis(std::sync::Arc::new(common::redis_log(&redis, "retaken", None).await));
    let (a, b) = (std::sync::Arc::new(replica().await), replica().await);
    let IdempotencyClaim::Owner(on_a) = a.claim_request_id("r", "q").await else {
        panic!("a claims it")
    };
    let claim = redis.keys("retaken:idem:*").pop().expect("a's claim");
    redis.command(&["DEL", &claim]);
    let holding = tokio::spawn({
        let (a, on_a) = (a.clone(), on_a.clone());
        async move { a.hold_request_id("r", "q", &on_a).await }
    });
    // The lapsed claim taken again (a renewal comes every 2.5 s).
    common::until(Duration::from_secs(20), async || {
        !redis.keys("retaken:idem:*").is_empty()
    })
    .await;
    assert_eq!(
        b.claim_request_id("r", "q").await,
        IdempotencyClaim::Pending,
        "a holds it again"
    );
    holding.abort();
    a.settle_request_id("r", "q", &on_a, Some("answer")).await;
    assert_eq!(
        b.claim_request_id("r", "q").await,
        IdempotencyClaim::Answered("answer".into())
    );
}

/// A replica whose claim on a request_id lapsed while it was sending (cut off from Redis longer than the claim's
/// lease), and that another replica claimed since, settles only its own claim: its failure does not free the
/// other's, and its renewal does not take it over.
#[tokio::test]
async fn a_lapsed_claim_on_a_request_id_settles_only_its_own() {
    use capability_facade::log::{EventLog, IdempotencyClaim};
    let redis = RedisServer::start().await;
    let replica = async || EventLog::Redis(std::sync::Arc::new(common::redis_log(&redis, "claims", None).await));
    let (a, b) = (replica().await, replica().await);
    let IdempotencyClaim::Owner(on_a) = a.claim_request_id("r", "q").await else {
        panic!("a claims it first")
    };
    let claim = redis.keys("claims:idem:*").pop().expect("a's claim");
    redis.command(&["DEL", &claim]);
    let IdempotencyClaim::Owner(on_b) = b.claim_request_id("r", "q").await else {
        panic!("b claims it once a's lapsed")
    };
    a.settle_request_id("r", "q", &on_a, None).await;
    assert_eq!(
        a.claim_request_id("r", "q").await,
        IdempotencyClaim::Pending,
        "b is sending it"
    );
    b.settle_request_id("r", "q", &on_b, Some("answer")).await;
    assert_eq!(
        a.claim_request_id("r", "q").await,
        IdempotencyClaim::Answered("answer".into())
    );
}
