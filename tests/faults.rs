//! Fault injection against the real binary under load, counting every notification: callbacks keep flowing
//! while Redis is SIGKILLed and restarted and a replica is sent SIGTERM; queries keep flowing while Sinch
//! throttles, fails, answers garbage and stalls. Each test states its fault sequence; each fault is triggered
//! by what the load has reached, not by the clock.
mod common;

use std::{
    collections::{HashMap, HashSet},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use capability_facade::grpc::pb::{
    Channel, capability_service_client::CapabilityServiceClient, watch_capability_response::Event,
};
use common::{Binary, Canned, FakeSinch, identities, query, redis::RedisServer, watch_request};
use tokio::sync::Notify;
use tonic::{Code, transport};

const CHANNELS: [&str; 3] = ["SMS", "RCS", "WHATSAPP"];

async fn connect(binary: &Binary) -> CapabilityServiceClient<transport::Channel> {
    CapabilityServiceClient::new(transport::Endpoint::from_shared(binary.url()).unwrap().connect_lazy())
}

/// Counters shared by the load and the fault driver; `changed` wakes the driver.
#[derive(Default)]
struct Counts {
    acked: AtomicU64,
    refused: AtomicU64,
    changed: Notify,
}

impl Counts {
    async fn reach(&self, counter: impl Fn(&Counts) -> u64, at_least: u64) {
        loop {
            let changed = self.changed.notified();
            if counter(self) >= at_least {
                return;
            }
            changed.await;
        }
    }
}

/// Posts one callback as Sinch does: to `first`, and on anything but 200 again (new nonce) to the other
/// replica, with back-off, until acknowledged.
async fn post_until_acked(webhooks: [std::net::SocketAddr; 2], first: usize, body: Vec<u8>, counts: &Counts) {
    let mut pause = Duration::from_millis(20);
    for attempt in 0..200 {
        let addr = webhooks[(first + attempt) % 2];
        let headers = common::signed_headers(common::WEBHOOK_SECRET, &body);
        let mut request = common::reqwest_client()
            .post(format!("http://{addr}/webhooks/sinch"))
            .timeout(Duration::from_secs(5))
            .body(body.clone());
        for (name, value) in headers {
            request = request.header(name, value);
        }
        let acked = matches!(request.send().await, Ok(r) if r.status() == 200);
        let counter = if acked { &counts.acked } else { &counts.refused };
        counter.fetch_add(1, Ordering::Relaxed);
        counts.changed.notify_waiters();
        if acked {
            return;
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(500));
    }
    panic!("a callback was never acknowledged by either replica");
}

/// A client that watches `request_id` until it has every channel, resuming on the other replica with
/// `after_offset` when its stream breaks. Returns (channel, offset) in the order received, and how many times
/// it resumed.
async fn resilient_watch(
    clients: [CapabilityServiceClient<transport::Channel>; 2],
    first: usize,
    request_id: String,
) -> (Vec<(String, u64)>, usize) {
    let mut seen: Vec<(String, u64)> = Vec::new();
    let mut replica = first;
    for resumes in 0..50 {
        let after = seen.last().map_or(0, |s| s.1);
        let opened = clients[replica]
            .clone()
            .watch_capability(watch_request(&request_id, after, Some(Duration::from_secs(60))))
            .await;
        if let Ok(stream) = opened {
            let mut stream = stream.into_inner();
            while let Ok(Some(message)) = stream.message().await {
                if let Some(Event::Notification(n)) = message.event {
                    seen.push((n.channel_raw, n.offset));
                    let distinct: HashSet<&str> = seen.iter().map(|s| s.0.as_str()).collect();
                    if distinct.len() == CHANNELS.len() {
                        return (seen, resumes);
                    }
                }
            }
        }
        replica = 1 - replica;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{request_id}: gave up resuming; had {seen:?}");
}

/// 150 requests × 3 channels posted by 12 concurrent Sinch-like senders to two replicas sharing a Redis that
/// keeps what it acknowledged; one watcher per request, half on each replica.
/// Sequence: at 90 acknowledged, Redis is SIGKILLed; after 20 refusals it is restarted; at 270 acknowledged,
/// replica A gets SIGTERM (its watchers resume on B, its senders move to B).
/// Counted: every callback acknowledged; every watcher receives its 3 channels, none twice, in offset order;
/// a replay on B afterwards holds exactly 3 per request.
#[tokio::test]
async fn callbacks_survive_a_redis_kill_and_a_sigterm_under_load_exactly_once() {
    const REQUESTS: usize = 150;
    let mut redis = RedisServer::start_durable().await;
    let fake = FakeSinch::start().await;
    let mut env = common::binary_env(&fake);
    env.extend([
        ("CAPABILITY_REDIS_URL", redis.url()),
        ("CAPABILITY_DRAIN_DELAY", "300ms".into()),
        ("CAPABILITY_SHUTDOWN_GRACE", "5s".into()),
    ]);
    let mut a = Binary::spawn(&env).await;
    let b = Binary::spawn(&env).await;
    let clients = [connect(&a).await, connect(&b).await];
    let webhooks = [a.webhook_addr, b.webhook_addr];

    let watchers: Vec<_> = (0..REQUESTS)
        .map(|i| tokio::spawn(resilient_watch(clients.clone(), i % 2, format!("fault-{i}"))))
        .collect();
    let counts = Arc::new(Counts::default());
    let callbacks: Vec<(usize, &str)> = CHANNELS
        .iter()
        .flat_map(|channel| (0..REQUESTS).map(move |i| (i, *channel)))
        .collect();
    let queue = Arc::new(Mutex::new(callbacks.into_iter()));
    let senders: Vec<_> = (0..12)
        .map(|s| {
            let (queue, counts) = (queue.clone(), counts.clone());
            tokio::spawn(async move {
                loop {
                    let Some((i, channel)) = queue.lock().unwrap().next() else {
                        return;
                    };
                    let body =
                        common::capability_body(&format!("fault-{i}"), channel, "46700000001", "CAPABILITY_FULL");
                    post_until_acked(webhooks, s % 2, body, &counts).await;
                }
            })
        })
        .collect();

    counts.reach(|c| c.acked.load(Ordering::Relaxed), 90).await;
    redis.kill().await;
    let refused_before = counts.refused.load(Ordering::Relaxed);
    counts
        .reach(|c| c.refused.load(Ordering::Relaxed), refused_before + 20)
        .await;
    redis.restart().await;
    counts.reach(|c| c.acked.load(Ordering::Relaxed), 270).await;
    a.signal("TERM");

    for sender in senders {
        sender.await.unwrap();
    }
    assert_eq!(counts.acked.load(Ordering::Relaxed), (REQUESTS * CHANNELS.len()) as u64);
    let (mut received, mut resumed) = (0, 0);
    for (i, watcher) in watchers.into_iter().enumerate() {
        let (seen, resumes) = tokio::time::timeout(Duration::from_secs(30), watcher)
            .await
            .unwrap_or_else(|_| panic!("fault-{i}: the watcher never got every channel"))
            .unwrap();
        let channels: HashSet<&str> = seen.iter().map(|s| s.0.as_str()).collect();
        assert_eq!(seen.len(), CHANNELS.len(), "fault-{i}: each channel once: {seen:?}");
        assert_eq!(channels.len(), CHANNELS.len(), "fault-{i}: {seen:?}");
        assert!(
            seen.windows(2).all(|w| w[0].1 < w[1].1),
            "fault-{i}: offsets in order: {seen:?}"
        );
        received += seen.len();
        resumed += resumes;
    }
    assert_eq!(received, REQUESTS * CHANNELS.len(), "delivered = acknowledged");
    assert!(resumed > 0, "the SIGTERM was felt: watchers on A resumed on B");
    eprintln!(
        "acknowledged {}, refused {} (retried), delivered {received}, watchers resumed {resumed} times",
        counts.acked.load(Ordering::Relaxed),
        counts.refused.load(Ordering::Relaxed)
    );

    for i in 0..REQUESTS {
        let stream = clients[1]
            .clone()
            .watch_capability(watch_request(&format!("fault-{i}"), 0, Some(Duration::ZERO)))
            .await
            .unwrap()
            .into_inner();
        let (replayed, _) = common::drain(stream).await;
        assert_eq!(replayed.len(), CHANNELS.len(), "fault-{i}: replay on B: {replayed:?}");
    }
    let exit = a
        .wait_exit(Duration::from_secs(10))
        .await
        .expect("A exits after SIGTERM");
    assert!(exit.success(), "A exits 0 after its drain: {exit:?}");
}

/// 240 queries from 16 concurrent callers, each with its own request_id and a 3 s deadline, through the real
/// binary while Sinch's token endpoint first fails 5 times (503) and its API answers, in this order: 40 × 429 (Retry-After: 0), 40 × 503, 10 × 500 with HTML,
/// 6 × a 200 of truncated JSON, 6 × a 200 of HTML, 6 answers slower than any deadline; then normally.
/// Counted: every call ends within its deadline with OK or a retryable code (never INTERNAL, never a hang);
/// every OK was sent to Sinch under the caller's request_id; no request_id reached Sinch more than the 5
/// attempts allowed; afterwards the service is SERVING and 50 further queries all succeed.
#[tokio::test]
async fn queries_through_throttling_errors_garbage_and_stalls_end_in_time_with_a_clear_code() {
    let fake = FakeSinch::start().await;
    let mut script = Vec::new();
    script.extend(
        (0..40).map(|_| Canned::sinch_error(429, "RESOURCE_EXHAUSTED", "slow down").header("retry-after", "0")),
    );
    script.extend((0..40).map(|_| Canned::sinch_error(503, "UNAVAILABLE", "try later")));
    script.extend(
        (0..10).map(|_| Canned::new(500, "<html>Internal Server Error</html>").header("content-type", "text/html")),
    );
    script.extend((0..6).map(|_| Canned::new(200, r#"{"app_id":"APP-1","recipient":{"contact_"#)));
    script.extend((0..6).map(|_| Canned::new(200, "<html>maintenance</html>").header("content-type", "text/html")));
    script.extend((0..6).map(|_| Canned::new(200, "{}").delayed(Duration::from_secs(30))));
    fake.script_queries(script);
    fake.script_tokens((0..5).map(|_| Canned::sinch_error(503, "UNAVAILABLE", "token service down")));
    let binary = Binary::spawn(&common::binary_env(&fake)).await;
    let client = connect(&binary).await;

    let outcomes = Arc::new(Mutex::new(HashMap::<String, Result<String, Code>>::new()));
    let next = Arc::new(AtomicU64::new(0));
    let callers: Vec<_> = (0..16)
        .map(|_| {
            let (client, outcomes, next) = (client.clone(), outcomes.clone(), next.clone());
            tokio::spawn(async move {
                loop {
                    let n = next.fetch_add(1, Ordering::Relaxed);
                    if n >= 240 {
                        return;
                    }
                    let request_id = format!("storm-{n}");
                    let mut request =
                        tonic::Request::new(query(identities(&[(Channel::Whatsapp, "46712312312")]), &request_id));
                    // The deadline goes to the service as `grpc-timeout` only, without a client-side timer:
                    // the answer must come from the service, in time (a second of slack for a loaded machine).
                    request.metadata_mut().insert("grpc-timeout", "3S".parse().unwrap());
                    let answered =
                        tokio::time::timeout(Duration::from_secs(4), client.clone().query_capability(request)).await;
                    let result = answered.unwrap_or_else(|_| panic!("{request_id}: no answer within its deadline"));
                    let outcome = result.map(|r| r.into_inner().request_id).map_err(|s| {
                        // The service answers DEADLINE_EXCEEDED 50 ms before the deadline; when a starved machine
                        // makes it later than that, tonic's server-side grpc-timeout layer (which wraps every
                        // service and layer of ours) answers first, as CANCELLED "Timeout expired". Either way
                        // the server ended the call at its deadline.
                        if s.code() == Code::Cancelled && s.message() == "Timeout expired" {
                            Code::DeadlineExceeded
                        } else {
                            s.code()
                        }
                    });
                    outcomes.lock().unwrap().insert(request_id, outcome);
                }
            })
        })
        .collect();
    for caller in callers {
        caller.await.unwrap();
    }

    let outcomes = outcomes.lock().unwrap().clone();
    assert_eq!(outcomes.len(), 240);
    let mut attempts = HashMap::<String, usize>::new();
    for sent in fake.queries() {
        *attempts
            .entry(sent.json()["request_id"].as_str().unwrap().to_owned())
            .or_default() += 1;
    }
    let mut by_code = HashMap::<Code, usize>::new();
    for (request_id, outcome) in &outcomes {
        match outcome {
            Ok(answered) => {
                assert_eq!(answered, request_id, "the caller's request_id is the one answered");
                assert!(
                    attempts.contains_key(request_id),
                    "{request_id} was answered but never sent"
                );
                *by_code.entry(Code::Ok).or_default() += 1;
            }
            Err(code) => {
                assert!(
                    matches!(
                        code,
                        Code::Unavailable | Code::ResourceExhausted | Code::DeadlineExceeded
                    ),
                    "{request_id}: {code:?} is not a retryable answer"
                );
                *by_code.entry(*code).or_default() += 1;
            }
        }
    }
    for (request_id, count) in &attempts {
        assert!(
            outcomes.contains_key(request_id),
            "Sinch saw {request_id}, which nobody asked"
        );
        assert!(*count <= 5, "{request_id} was sent {count} times");
    }
    assert!(
        by_code.get(&Code::Ok).copied().unwrap_or(0) > 0,
        "some queries got through: {by_code:?}"
    );
    assert!(by_code.len() > 1, "the faults were felt: {by_code:?}");
    assert!(fake.token_requests().len() > 5, "the token outage was felt");
    let sent: usize = attempts.values().sum();
    eprintln!(
        "outcomes {by_code:?}; {sent} attempts sent to Sinch for {} request_ids",
        attempts.len()
    );

    let mut health = tonic_health::pb::health_client::HealthClient::new(
        transport::Endpoint::from_shared(binary.url()).unwrap().connect_lazy(),
    );
    let serving = health
        .check(tonic_health::pb::HealthCheckRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        serving.status(),
        tonic_health::pb::health_check_response::ServingStatus::Serving
    );
    for n in 0..50 {
        let answer = client
            .clone()
            .query_capability(query(
                identities(&[(Channel::Sms, "46700000001")]),
                &format!("after-{n}"),
            ))
            .await;
        assert!(answer.is_ok(), "after the storm: {answer:?}");
    }
}
