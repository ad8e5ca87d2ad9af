//! Bulk checks as a caller sees them, against an independent fake Sinch that records every query; a task plays
//! Sinch's side of the callbacks (one signed callback per identity asked about) to the webhook given.

mod common;

use std::{collections::HashMap, sync::Arc, time::Duration};

use capability_facade::check::bulk::pacer::{Admission, Pace};
use capability_facade::grpc::pb::{self, BulkCheckState, capability_service_client::CapabilityServiceClient};
use common::{
    FakeSinch, Service,
    bulk::{APP, cancel, get, play_sinch, play_sinch_after, recipient, start, watch},
    contact,
    redis::RedisServer,
};
use tonic::Code;

#[tokio::test]
async fn a_job_answers_each_recipient_once_reusing_the_cache_and_asking_duplicates_once() {
    let fake = Arc::new(FakeSinch::start().await);
    let service = Service::against(&fake, &["--sinch-callback-rate=1000"]).await;
    let _sinch = play_sinch(fake.clone(), service.webhook_addr, 1);
    let mut client = service.client().await;
    // Recipient 0 is known already.
    let warm = pb::CheckCapabilityRequest {
        app_id: APP.into(),
        recipient: Some(recipient(0)),
        ..Default::default()
    };
    client.check_capability(warm).await.unwrap();
    assert_eq!(fake.queries().len(), 1);

    // Ten recipients: 0 cached, 3 and 7 the same person.
    let mut recipients: Vec<pb::Recipient> = (0..10).map(recipient).collect();
    recipients[7] = recipient(3);
    let job = client
        .start_bulk_check(start(recipients, ""))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((job.total, job.state()), (10, BulkCheckState::Running));
    let (results, progress) = watch(&mut client, &job.job_id, 0).await;

    let offsets: Vec<u64> = results.iter().map(|r| r.offset).collect();
    assert_eq!(
        offsets,
        (1..=10).collect::<Vec<_>>(),
        "offsets 1..total in completion order"
    );
    let mut indexes: Vec<u32> = results.iter().map(|r| r.index).collect();
    indexes.sort();
    assert_eq!(indexes, (0..10).collect::<Vec<_>>(), "each recipient once");
    for result in &results {
        let answer = result.answer.as_ref().unwrap();
        assert!(answer.complete, "{answer:?}");
        assert_eq!(answer.recommended.len(), 1);
    }
    let last = progress.last().unwrap();
    assert_eq!(last.state(), BulkCheckState::Succeeded);
    assert_eq!((last.done, last.from_cache, last.reachable), (10, 1, 10));
    assert_eq!(
        fake.queries().len(),
        1 + 8,
        "the cached one and the duplicate were not asked"
    );
    let got = get(&mut client, &job.job_id).await;
    assert_eq!(got.state(), BulkCheckState::Succeeded);

    // Resumed after offset 6: the rest only, then the final progress.
    let (rest, progress) = watch(&mut client, &job.job_id, 6).await;
    assert_eq!(rest.iter().map(|r| r.offset).collect::<Vec<_>>(), [7, 8, 9, 10]);
    assert_eq!(progress.len(), 1);
}

#[tokio::test]
async fn a_cancelled_job_sends_nothing_more_and_its_stream_ends_with_ok() {
    let fake = Arc::new(FakeSinch::start().await);
    let service = Service::against(&fake, &["--sinch-callback-rate=2"]).await;
    let _sinch = play_sinch(fake.clone(), service.webhook_addr, 1);
    let mut client = service.client().await;
    let job = client
        .start_bulk_check(start((0..20).map(recipient).collect(), ""))
        .await
        .unwrap()
        .into_inner();
    fake.until_queries(1).await;
    let cancelled = cancel(&mut client, &job.job_id).await;
    assert_eq!(cancelled.state(), BulkCheckState::Cancelled);
    let sent = fake.queries().len();
    let (results, progress) = watch(&mut client, &job.job_id, 0).await;
    assert_eq!(progress.last().unwrap().state(), BulkCheckState::Cancelled);
    assert!(results.len() <= sent, "{} results from {sent} queries", results.len());
    assert_eq!(fake.queries().len(), sent, "no query after the cancel");
    // Cancelling an ended job returns it unchanged.
    let again = cancel(&mut client, &job.job_id).await;
    assert_eq!(again.state(), BulkCheckState::Cancelled);
}

#[tokio::test]
async fn a_repeated_request_id_is_the_same_job_and_bad_requests_are_refused() {
    let fake = Arc::new(FakeSinch::start().await);
    let service = Service::against(&fake, &["--sinch-callback-rate=1000"]).await;
    let _sinch = play_sinch(fake.clone(), service.webhook_addr, 1);
    let mut client = service.client().await;
    let first = client
        .start_bulk_check(start(vec![recipient(1), contact("C-1")], "job-req-1"))
        .await
        .unwrap()
        .into_inner();
    let again = client
        .start_bulk_check(start(vec![recipient(1), contact("C-1")], "job-req-1"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(first.job_id, again.job_id);
    assert_eq!(
        (first.request_id.as_str(), again.request_id.as_str()),
        ("job-req-1", "job-req-1")
    );
    let other = client
        .start_bulk_check(start(vec![recipient(2)], "job-req-1"))
        .await
        .unwrap_err();
    assert_eq!(other.code(), Code::AlreadyExists, "{other:?}");

    let too_many = client
        .start_bulk_check(start(vec![recipient(1); 100_001], ""))
        .await
        .unwrap_err();
    assert_eq!(too_many.code(), Code::InvalidArgument);
    assert!(too_many.message().contains("recipients"), "{}", too_many.message());
    let bad = client
        .start_bulk_check(start(vec![recipient(1), pb::Recipient::default()], ""))
        .await
        .unwrap_err();
    assert!(bad.message().contains("recipients[1]"), "{}", bad.message());
    for status in [
        client
            .get_bulk_check(pb::GetBulkCheckRequest { job_id: "nope".into() })
            .await
            .unwrap_err(),
        client
            .watch_bulk_check(pb::WatchBulkCheckRequest {
                job_id: "nope".into(),
                after_offset: 0,
            })
            .await
            .unwrap_err(),
    ] {
        assert_eq!(status.code(), Code::NotFound, "{status:?}");
    }
}

#[tokio::test]
async fn a_job_on_one_replica_is_watched_and_resumed_on_another() {
    let redis = RedisServer::start().await;
    let fake = Arc::new(FakeSinch::start().await);
    let url = format!("--redis-url={}", redis.url());
    let flags = [url.as_str(), "--sinch-callback-rate=1000"];
    let (a, b) = (
        Service::against(&fake, &flags).await,
        Service::against(&fake, &flags).await,
    );
    let _sinch = play_sinch(fake.clone(), a.webhook_addr, 1);
    let (mut on_a, mut on_b) = (a.client().await, b.client().await);
    let job = on_a
        .start_bulk_check(start((0..12).map(recipient).collect(), "shared-job"))
        .await
        .unwrap()
        .into_inner();
    let (results, progress) = watch(&mut on_b, &job.job_id, 0).await;
    assert_eq!(results.len(), 12);
    assert_eq!(progress.last().unwrap().state(), BulkCheckState::Succeeded);
    let (rest, _) = watch(&mut on_a, &job.job_id, 10).await;
    assert_eq!(rest.iter().map(|r| r.offset).collect::<Vec<_>>(), [11, 12]);
    // The same request_id on the other replica is the same job.
    let again = on_b
        .start_bulk_check(start((0..12).map(recipient).collect(), "shared-job"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.job_id, job.job_id);
    assert_eq!(get(&mut on_b, &job.job_id).await.request_id, "shared-job");
    assert_eq!(fake.queries().len(), 12);
}

#[tokio::test]
async fn a_job_whose_replica_is_killed_is_finished_by_another_without_asking_twice() {
    let redis = RedisServer::start().await;
    let fake = Arc::new(FakeSinch::start().await);
    let mut env = common::redis_binary_env(&fake, &redis);
    env.push(("SINCH_CALLBACK_RATE", "4".into()));
    let mut runner = common::Binary::spawn(&env).await;
    let survivor = common::Binary::spawn(&env).await;
    // Callbacks reach the survivor's webhook: the log carries them to whoever waits.
    let _sinch = play_sinch(fake.clone(), survivor.webhook_addr, 1);
    let mut client = CapabilityServiceClient::connect(runner.url()).await.unwrap();
    let job = client
        .start_bulk_check(start((0..12).map(recipient).collect(), ""))
        .await
        .unwrap()
        .into_inner();
    fake.until_queries(3).await;
    runner.signal("KILL");
    runner.wait_exit(Duration::from_secs(10)).await.expect("killed");

    let mut client = CapabilityServiceClient::connect(survivor.url()).await.unwrap();
    let (results, progress) = watch(&mut client, &job.job_id, 0).await;
    assert_eq!(progress.last().unwrap().state(), BulkCheckState::Succeeded);
    let mut indexes: Vec<u32> = results.iter().map(|r| r.index).collect();
    indexes.sort();
    assert_eq!(
        indexes,
        (0..12).collect::<Vec<_>>(),
        "none lost, none twice: {}",
        survivor.log_text()
    );
    let mut asked: HashMap<String, usize> = HashMap::new();
    for query in fake.queries() {
        let identity = query.json()["recipient"]["identified_by"]["channel_identities"][0]["identity"]
            .as_str()
            .unwrap()
            .to_owned();
        *asked.entry(identity).or_default() += 1;
    }
    assert_eq!(asked.len(), 12, "{}", survivor.log_text());
    assert!(
        asked.values().all(|n| *n == 1),
        "a recipient was asked twice: {asked:?}"
    );
}

/// With Redis, a recipient another runner of the job recorded first (a runner whose lease lapsed goes on recording
/// what it waits for until its next renewal finds the lease gone) is not counted again in the replica's
/// `capability_bulk_recipients_done_total`: the counters of every replica add up to the recipients answered. The
/// replica counted it: a dashboard showed more recipients done than jobs had.
#[tokio::test]
async fn with_redis_a_recipient_another_runner_recorded_first_is_not_counted_again() {
    let redis = RedisServer::start().await;
    let fake = Arc::new(FakeSinch::start().await);
    let replica = common::Binary::spawn(&common::redis_binary_env(&fake, &redis)).await;
    let mut client = CapabilityServiceClient::connect(replica.url()).await.unwrap();
    let job = client
        .start_bulk_check(start(vec![recipient(0)], ""))
        .await
        .unwrap()
        .into_inner();
    let sent = fake.until_queries(1).await[0].json()["request_id"]
        .as_str()
        .unwrap()
        .to_owned();
    // What the other runner's record leaves: index 0 (4 bytes, big-endian) answered, the job's `done` counting it.
    let meta = redis.keys("*:job:*}:meta").remove(0);
    let done = meta.replace("}:meta", "}:done");
    let recorded_elsewhere = "redis.call('HSET', KEYS[2], string.char(0, 0, 0, 0), 1) \
                              return redis.call('HINCRBY', KEYS[1], 'done', 1)";
    redis.command(&["EVAL", recorded_elsewhere, "2", &meta, &done]);
    let body = common::CapabilityCallback::new(&sent, "SMS", "46700000000", "CAPABILITY_FULL").body();
    assert_eq!(common::deliver(replica.webhook_addr, body).await, 200);
    // The job ends once its runner recorded (or not) the answer it waited for.
    let (_, progress) = watch(&mut client, &job.job_id, 0).await;
    assert_eq!(progress.last().unwrap().done, 1);
    assert_eq!(
        common::metric(replica.admin_addr, "capability_bulk_recipients_done_total").await,
        0.0,
        "counted again by the replica that found it answered"
    );
}

#[tokio::test]
async fn a_recipient_waits_its_whole_wait_after_its_turn_in_the_budget_came() {
    let fake = Arc::new(FakeSinch::start().await);
    let service = Service::against(&fake, &["--sinch-callback-rate=1"]).await;
    // Sinch answers 300 ms after each query: within the wait counted from the send, after one counted from the
    // job's start.
    let _sinch = play_sinch_after(fake.clone(), service.webhook_addr, 1, Duration::from_millis(300));
    let mut client = service.client().await;
    // Three recipients at one a second, each waiting at most one second once its query is out: the third is
    // sent two seconds in, and still gets its answer.
    let mut request = start((0..3).map(recipient).collect(), "");
    request.wait = Some(prost_types::Duration { seconds: 1, nanos: 0 });
    let job = client.start_bulk_check(request).await.unwrap().into_inner();
    let (results, _) = watch(&mut client, &job.job_id, 0).await;
    assert_eq!(results.len(), 3);
    for result in results {
        assert!(
            result.answer.unwrap().complete,
            "recipient {} timed out in the queue",
            result.index
        );
    }
}

#[tokio::test]
async fn a_job_runs_on_a_redis_cluster() {
    let cluster = testkit::RedisCluster::start(3).await;
    let fake = Arc::new(FakeSinch::start().await);
    let url = format!("--redis-url={}", cluster.urls().join(","));
    let service = Service::against(&fake, &[&url, "--sinch-callback-rate=1000"]).await;
    let _sinch = play_sinch(fake.clone(), service.webhook_addr, 1);
    let mut client = service.client().await;
    let job = client
        .start_bulk_check(start((0..12).map(recipient).collect(), "cluster-job"))
        .await
        .unwrap()
        .into_inner();
    let again = client
        .start_bulk_check(start((0..12).map(recipient).collect(), "cluster-job"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.job_id, job.job_id);
    let (results, progress) = watch(&mut client, &job.job_id, 0).await;
    assert_eq!(results.len(), 12);
    assert_eq!(progress.last().unwrap().state(), BulkCheckState::Succeeded);
    assert_eq!(fake.queries().len(), 12);
}

#[tokio::test]
async fn after_a_cancel_the_stream_carries_the_results_still_coming() {
    cancel_keeps_late_results(&[]).await;
}

#[tokio::test]
async fn after_a_cancel_the_stream_carries_the_results_still_coming_with_redis() {
    let redis = RedisServer::start().await;
    cancel_keeps_late_results(&[&format!("--redis-url={}", redis.url())]).await;
}

/// A job cancelled while its first recipient waits for Sinch: the stream ends only once that result is in.
async fn cancel_keeps_late_results(extra: &[&str]) {
    let fake = Arc::new(FakeSinch::start().await);
    let flags: Vec<&str> = extra.iter().copied().chain(["--sinch-callback-rate=2"]).collect();
    let service = Service::against(&fake, &flags).await;
    // Sinch answers 500 ms after each query: the first recipient's result comes after the cancel.
    let _sinch = play_sinch_after(fake.clone(), service.webhook_addr, 1, Duration::from_millis(500));
    let mut client = service.client().await;
    let job = client
        .start_bulk_check(start((0..20).map(recipient).collect(), ""))
        .await
        .unwrap()
        .into_inner();
    fake.until_queries(1).await;
    cancel(&mut client, &job.job_id).await;
    let (results, progress) = watch(&mut client, &job.job_id, 0).await;
    let last = progress.last().unwrap();
    assert_eq!(last.state(), BulkCheckState::Cancelled);
    assert!(
        !results.is_empty(),
        "the recipient sent before the cancel was answered on the stream"
    );
    assert_eq!(results.len() as u64, last.done);
    let now = get(&mut client, &job.job_id).await;
    assert_eq!(now.done, last.done, "nothing landed after the stream ended");
}

/// The cluster client sends a script again when its reply was lost: a recipient's "sent" record that finds the
/// very record its attempt writes is that attempt's own, and the query must still go out (not be waited for as if
/// a replica that held the job before had sent it).
#[tokio::test]
async fn a_sent_record_met_again_by_its_own_attempt_still_sends_the_query() {
    use capability_facade::log::redis::jobs::Marked;
    let redis = RedisServer::start().await;
    let log = common::redis_log(&redis, "resent", Some("resent-key")).await;
    let jobs = log.jobs();
    let spec = job_spec(None);
    let created = jobs
        .create("job", &spec, &spec.fingerprint(), 1_000, Duration::from_secs(60))
        .await;
    assert!(matches!(created, Ok(Ok((_, true)))));
    assert!(
        jobs.claim("job", "replica-a", Duration::from_secs(10))
            .await
            .unwrap()
            .is_some()
    );
    let attempt = || jobs.mark_sent("job", "replica-a", 0, "request-1", 2_000);
    assert!(matches!(attempt().await.unwrap(), Marked::Marked));
    assert!(
        matches!(attempt().await.unwrap(), Marked::Marked),
        "its own record, met again"
    );
    let later = jobs.mark_sent("job", "replica-a", 0, "request-2", 3_000).await.unwrap();
    assert!(
        matches!(&later, Marked::SentBefore(id) if id == "request-1"),
        "another attempt finds it sent"
    );
}

/// A recipient waiting its turn in the budget is answered from the cache when an interactive check asked about it
/// meanwhile, rather than asked again.
#[tokio::test]
async fn a_recipient_answered_while_it_waits_its_turn_is_not_asked_again() {
    a_recipient_cached_while_waiting(&[]).await;
}

#[tokio::test]
async fn a_recipient_answered_while_it_waits_its_turn_is_not_asked_again_with_redis() {
    let redis = RedisServer::start().await;
    a_recipient_cached_while_waiting(&[&format!("--redis-url={}", redis.url())]).await;
}

async fn a_recipient_cached_while_waiting(extra: &[&str]) {
    let fake = Arc::new(FakeSinch::start().await);
    let mut args = vec!["--sinch-callback-rate=1"];
    args.extend_from_slice(extra);
    let service = Service::against(&fake, &args).await;
    let _sinch = play_sinch(fake.clone(), service.webhook_addr, 1);
    let mut client = service.client().await;
    let job = client
        .start_bulk_check(start((0..2).map(recipient).collect(), ""))
        .await
        .unwrap()
        .into_inner();
    // The job's first query is out; its second waits a second for the budget, and an interactive check (which
    // goes first) asks about that recipient meanwhile.
    fake.until_queries(1).await;
    let check = pb::CheckCapabilityRequest {
        app_id: APP.into(),
        recipient: Some(recipient(1)),
        ..Default::default()
    };
    let answer = client.check_capability(check).await.unwrap().into_inner();
    assert!(answer.complete, "{answer:?}");

    let (results, progress) = watch(&mut client, &job.job_id, 0).await;
    assert_eq!(results.len(), 2);
    assert!(results.iter().all(|r| r.answer.as_ref().unwrap().complete));
    assert_eq!(progress.last().unwrap().state(), BulkCheckState::Succeeded);
    // The second from the cache (or, on a machine slow enough that its turn came first, joined by the check).
    assert_eq!(fake.queries().len(), 2, "one query per recipient: {:?}", fake.queries());
}

/// Sinch refusing the app stops the whole job at once: the recipients waiting their turn are not sent to be
/// refused the same, one by one at the budget's pace.
#[tokio::test]
async fn a_job_whose_app_sinch_refuses_fails_without_sending_the_rest() {
    let fake = Arc::new(FakeSinch::start().await);
    fake.script_queries((0..10).map(|_| common::Canned::sinch_error(404, "NOT_FOUND", "app not found")));
    let service = Service::against(&fake, &["--sinch-callback-rate=1"]).await;
    let mut client = service.client().await;
    let job = client
        .start_bulk_check(start((0..10).map(recipient).collect(), ""))
        .await
        .unwrap()
        .into_inner();
    let (results, progress) = watch(&mut client, &job.job_id, 0).await;
    assert_eq!(progress.last().unwrap().state(), BulkCheckState::Failed);
    assert!(results.is_empty(), "{results:?}");
    // Counted, for the alert on failing jobs (the recorder is this test binary's: other tests' jobs add to it).
    let failed = common::metrics_text(service.admin_addr)
        .await
        .lines()
        .find_map(|line| line.strip_prefix("capability_bulk_jobs_ended_total{state=\"failed\"} "))
        .map(|count| count.parse::<u64>().unwrap());
    assert!(failed.is_some_and(|count| count >= 1), "{failed:?}");
    // The first query, and at most one whose turn came while the first was refused.
    assert!(fake.queries().len() <= 2, "{} queries", fake.queries().len());
}

/// A replica that begins to shut down while its job's recipients wait for their callbacks still receives them,
/// through Redis, from the replica Sinch posts to: they are answered, not recorded as pending for good.
#[tokio::test]
async fn recipients_waiting_when_their_replica_shuts_down_get_their_answers() {
    let redis = RedisServer::start().await;
    let fake = Arc::new(FakeSinch::start().await);
    let url = format!("--redis-url={}", redis.url());
    let flags = [url.as_str(), "--sinch-callback-rate=1000"];
    let (leaving, staying) = (
        Service::against(&fake, &flags).await,
        Service::against(&fake, &flags).await,
    );
    let mut on_leaving = leaving.client().await;
    let job = on_leaving
        .start_bulk_check(start((0..3).map(recipient).collect(), ""))
        .await
        .unwrap()
        .into_inner();
    fake.until_queries(3).await;
    leaving.shutdown.cancel();
    // Its watches end: it is shutting down.
    let ended = match on_leaving
        .watch_bulk_check(pb::WatchBulkCheckRequest {
            job_id: job.job_id.clone(),
            after_offset: 0,
        })
        .await
    {
        Ok(stream) => {
            let mut stream = stream.into_inner();
            loop {
                match stream.message().await {
                    Ok(Some(_)) => continue,
                    Ok(None) => panic!("the job's stream ended well"),
                    Err(status) => break status,
                }
            }
        }
        Err(status) => status,
    };
    assert_eq!(ended.code(), Code::Unavailable, "{ended:?}");

    let _sinch = play_sinch(fake.clone(), staying.webhook_addr, 1);
    let (results, progress) = watch(&mut staying.client().await, &job.job_id, 0).await;
    assert_eq!(progress.last().unwrap().state(), BulkCheckState::Succeeded);
    assert_eq!(results.len(), 3);
    for result in results {
        assert!(
            result.answer.unwrap().complete,
            "recipient {} answered pending",
            result.index
        );
    }
    assert_eq!(fake.queries().len(), 3);
}

/// A job of one recipient, as StartBulkCheck makes it.
fn job_spec(request_id: Option<&str>) -> capability_facade::check::bulk::JobSpec {
    use capability_facade::capability::{Channel, ChannelIdentity, Recipient};
    capability_facade::check::bulk::JobSpec {
        app_id: "app".into(),
        recipients: vec![Recipient::IdentifiedBy(vec![ChannelIdentity {
            channel: Channel::Sms,
            identity: "46700000001".into(),
            app_id: String::new(),
        }])],
        max_age: Duration::ZERO,
        wait: Duration::from_secs(10),
        preference: None,
        request_id: request_id.map(str::to_owned),
    }
}

/// A start whose request_id was recorded but whose job was never written (the replica died, or Redis failed
/// between the two) does not block that request_id: it was answered NOT_FOUND for the retention, a day. A repeat
/// is told to retry while that start may still be writing the job, and starts the job itself 30 s after it.
#[tokio::test]
async fn a_request_id_whose_first_start_never_wrote_its_job_starts_one() {
    use capability_facade::check::bulk::JobError;
    let redis = RedisServer::start().await;
    let log = common::redis_log(&redis, "unwritten", Some("unwritten-key")).await;
    let jobs = log.jobs();
    let spec = job_spec(Some("the-same-file"));
    let day = Duration::from_secs(86_400);
    assert!(matches!(
        jobs.create("j1", &spec, &spec.fingerprint(), 1_000, day).await,
        Ok(Ok((_, true)))
    ));
    for key in redis.keys("*job:*") {
        redis.command(&["DEL", &key]);
    }
    // A while after the start: it may still be writing the job.
    let soon = jobs.create("j2", &spec, &spec.fingerprint(), 2_000, day).await.unwrap();
    assert!(matches!(soon, Err(JobError::Unavailable(_))), "{soon:?}");
    // Long after: it failed.
    let [record] = &redis.keys("*bulkreq*")[..] else {
        panic!("one record")
    };
    redis.command(&[
        "PEXPIRE",
        record,
        &(day - Duration::from_secs(31)).as_millis().to_string(),
    ]);
    let again = jobs.create("j2", &spec, &spec.fingerprint(), 2_000, day).await.unwrap();
    match again {
        Ok((status, created)) => assert_eq!((status.job_id.as_str(), created), ("j2", true)),
        Err(e) => panic!("{e}"),
    }
    assert!(jobs.running().await.unwrap().contains(&"j2".to_owned()));
}

/// A job written but not listed as running (Redis failed between the two) is listed by a repeat of its start,
/// so that a replica takes it over: nobody ran it, and it stayed RUNNING with nothing done.
#[tokio::test]
async fn a_job_not_listed_as_running_is_listed_by_a_repeat_of_its_start() {
    let redis = RedisServer::start().await;
    let log = common::redis_log(&redis, "unlisted", Some("unlisted-key")).await;
    let jobs = log.jobs();
    let spec = job_spec(Some("listed-later"));
    let day = Duration::from_secs(86_400);
    assert!(matches!(
        jobs.create("j1", &spec, &spec.fingerprint(), 1_000, day).await,
        Ok(Ok((_, true)))
    ));
    for key in redis.keys("*:jobs") {
        redis.command(&["DEL", &key]);
    }
    let again = jobs.create("j2", &spec, &spec.fingerprint(), 2_000, day).await.unwrap();
    assert!(
        matches!(again, Ok((ref status, false)) if status.job_id == "j1"),
        "{again:?}"
    );
    assert_eq!(jobs.running().await.unwrap(), ["j1"]);
}

/// A job that runs longer than the retention keeps its request_id: a repeat of its start (the same command
/// again) found no record and started a second job, asking every recipient again.
#[tokio::test]
async fn a_job_running_past_the_retention_keeps_its_request_id() {
    use capability_facade::check::bulk::JobState;
    let redis = RedisServer::start().await;
    let log = common::redis_log(&redis, "renewed", Some("renewed-key")).await;
    let jobs = log.jobs();
    let spec = job_spec(Some("a-long-job"));
    let retention = Duration::from_millis(300);
    assert!(matches!(
        jobs.create("j1", &spec, &spec.fingerprint(), 1_000, retention).await,
        Ok(Ok((_, true)))
    ));
    assert!(
        jobs.claim("j1", "replica-a", Duration::from_secs(10))
            .await
            .unwrap()
            .is_some()
    );
    // Three retentions, renewed as a running job's replica renews it (every 2 s against 6 s; here every 100 ms).
    for _ in 0..9 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let renewed = jobs.renew(
            "j1",
            "replica-a",
            Duration::from_secs(10),
            retention,
            spec.request_id.as_deref(),
        );
        assert_eq!(renewed.await.unwrap(), Some(JobState::Running));
    }
    let again = jobs
        .create("j2", &spec, &spec.fingerprint(), 2_000, retention)
        .await
        .unwrap();
    assert!(
        matches!(again, Ok((ref status, false)) if status.job_id == "j1"),
        "{again:?}"
    );
}

/// A recipient whose query Sinch refused for a while (503 through every retry) is asked again later: it was
/// answered "pending" for good, and the job said it succeeded.
#[tokio::test]
async fn a_recipient_sinch_refused_for_a_while_is_asked_again_later() {
    refused_for_a_while(&[]).await;
}

#[tokio::test]
async fn a_recipient_sinch_refused_for_a_while_is_asked_again_later_with_redis() {
    let redis = RedisServer::start().await;
    refused_for_a_while(&[&format!("--redis-url={}", redis.url())]).await;
}

async fn refused_for_a_while(extra: &[&str]) {
    let fake = Arc::new(FakeSinch::start().await);
    fake.script_queries((0..5).map(|_| common::Canned::sinch_error(503, "UNAVAILABLE", "down for a moment")));
    let mut args = vec!["--sinch-callback-rate=1000"];
    args.extend_from_slice(extra);
    let service = Service::against(&fake, &args).await;
    let _sinch = play_sinch(fake.clone(), service.webhook_addr, 6);
    let mut client = service.client().await;
    let job = client
        .start_bulk_check(start(vec![recipient(0)], ""))
        .await
        .unwrap()
        .into_inner();
    let (results, progress) = watch(&mut client, &job.job_id, 0).await;
    assert_eq!(progress.last().unwrap().state(), BulkCheckState::Succeeded);
    assert_eq!(results.len(), 1);
    assert!(results[0].answer.as_ref().unwrap().complete, "{results:?}");
    let request_ids: std::collections::HashSet<String> = fake
        .queries()
        .iter()
        .map(|q| q.json()["request_id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(fake.queries().len(), 6, "five refused, then the one answered");
    // Under one request_id, as the client's own retries: had Sinch registered a refused one after all, it would
    // not count a second request.
    assert_eq!(request_ids.len(), 1, "{request_ids:?}");
}

/// A recipient whose lookup another check has in flight joins it and is not recorded as sent: its record named a
/// query that never went out (a replica taking the job over would wait for it, and answer pending), and the
/// count of bulk queries sent counted it.
#[tokio::test]
async fn a_recipient_that_joins_a_lookup_in_flight_is_not_recorded_as_sent() {
    joins_in_flight(recipient(0), |request_id| {
        common::CapabilityCallback::new(request_id, "SMS", "46700000000", "CAPABILITY_FULL")
    })
    .await;
}

#[tokio::test]
async fn a_contact_that_joins_a_lookup_in_flight_is_not_recorded_as_sent() {
    joins_in_flight(contact("CONTACT-1"), |request_id| {
        common::CapabilityCallback::new(request_id, "SMS", "46700000000", "CAPABILITY_FULL").contact_id("CONTACT-1")
    })
    .await;
}

/// [`a_recipient_that_joins_a_lookup_in_flight_is_not_recorded_as_sent`] for `recipient`, whose lookup `callback`
/// answers.
async fn joins_in_flight(recipient: pb::Recipient, callback: impl Fn(&str) -> common::CapabilityCallback) {
    let fake = Arc::new(FakeSinch::start().await);
    let mut env = common::binary_env(&fake);
    env.push(("SINCH_CALLBACK_RATE", "1000".into()));
    let replica = common::Binary::spawn(&env).await;
    let mut client = CapabilityServiceClient::connect(replica.url()).await.unwrap();
    let interactive = {
        let (mut client, recipient) = (client.clone(), recipient.clone());
        tokio::spawn(async move {
            let check = pb::CheckCapabilityRequest {
                app_id: APP.into(),
                recipient: Some(recipient),
                ..Default::default()
            };
            client.check_capability(check).await.unwrap().into_inner()
        })
    };
    let body = fake.until_queries(1).await[0].json();
    let job = client
        .start_bulk_check(start(vec![recipient.clone()], ""))
        .await
        .unwrap()
        .into_inner();
    let metric = |name| common::metric(replica.admin_addr, name);
    // Until the job's recipient joined the interactive check's lookup.
    for _ in 0..500 {
        if metric("capability_coalesced_total").await >= 1.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(metric("capability_coalesced_total").await, 1.0);
    let request_id = body["request_id"].as_str().unwrap();
    assert_eq!(
        common::deliver(replica.webhook_addr, callback(request_id).body()).await,
        200
    );
    assert_eq!(interactive.await.unwrap().results.len(), 1);
    let (results, _) = watch(&mut client, &job.job_id, 0).await;
    assert_eq!(results[0].answer.as_ref().unwrap().results.len(), 1, "{results:?}");
    assert_eq!(fake.queries().len(), 1);
    assert_eq!(
        metric("capability_bulk_queries_sent_total").await,
        0.0,
        "no bulk query went out"
    );
}

/// A contact whose lookup another check has in flight is not answered from its cache entry while that entry fills:
/// the job took the channels in so far for the whole answer, for good (a channel answering a moment later was
/// missing from its results).
#[tokio::test]
async fn a_contact_whose_lookup_is_in_flight_is_not_answered_from_its_filling_entry() {
    filling_entry(None).await;
}

/// The same with Redis, the lookup in flight on another replica.
#[tokio::test]
async fn a_contact_whose_lookup_is_in_flight_elsewhere_is_not_answered_from_its_filling_entry() {
    let redis = RedisServer::start().await;
    filling_entry(Some(&redis)).await;
}

/// [`a_contact_whose_lookup_is_in_flight_is_not_answered_from_its_filling_entry`]; with `redis`, the job runs on
/// a second replica.
async fn filling_entry(redis: Option<&RedisServer>) {
    let fake = Arc::new(FakeSinch::start().await);
    let mut env = common::binary_env(&fake);
    env.push(("SINCH_CALLBACK_RATE", "1000".into()));
    // The interactive check holds its lookup until its wait (5 s), not 1.5 s after its first result: the job joins
    // it within that, however slow the machine.
    env.push(("CAPABILITY_CHECK_SETTLE", "30s".into()));
    if let Some(redis) = redis {
        env.push(("CAPABILITY_REDIS_URL", redis.url()));
    }
    let checking = common::Binary::spawn(&env).await;
    let second = match redis {
        Some(_) => Some(common::Binary::spawn(&env).await),
        None => None,
    };
    let replica = second.as_ref().unwrap_or(&checking);
    let mut client = CapabilityServiceClient::connect(replica.url()).await.unwrap();
    let seconds = |seconds| Some(prost_types::Duration { seconds, nanos: 0 });
    let interactive = {
        let mut client = CapabilityServiceClient::connect(checking.url()).await.unwrap();
        tokio::spawn(async move {
            let check = pb::CheckCapabilityRequest {
                app_id: APP.into(),
                recipient: Some(contact("CONTACT-1")),
                wait: seconds(5),
                ..Default::default()
            };
            client.check_capability(check).await.unwrap().into_inner()
        })
    };
    let body = fake.until_queries(1).await[0].json();
    let request_id = body["request_id"].as_str().unwrap();
    let answer = |channel| {
        common::CapabilityCallback::new(request_id, channel, "46700000000", "CAPABILITY_FULL")
            .contact_id("CONTACT-1")
            .body()
    };
    assert_eq!(common::deliver(replica.webhook_addr, answer("WHATSAPP")).await, 200);
    let mut request = start(vec![contact("CONTACT-1")], "");
    request.wait = seconds(3);
    let job = client.start_bulk_check(request).await.unwrap().into_inner();
    // Until the job's recipient joined the lookup in flight, or the job ended without it.
    for _ in 0..500 {
        let joined = common::metric(replica.admin_addr, "capability_coalesced_total").await >= 1.0;
        if joined || get(&mut client, &job.job_id).await.state() != BulkCheckState::Running {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(common::deliver(replica.webhook_addr, answer("SMS")).await, 200);
    let (results, _) = watch(&mut client, &job.job_id, 0).await;
    let channels = |results: &[pb::ChannelResult]| {
        let mut channels: Vec<String> = results
            .iter()
            .map(|r| r.notification.as_ref().unwrap().channel_raw.clone())
            .collect();
        channels.sort();
        channels
    };
    assert_eq!(
        channels(&results[0].answer.as_ref().unwrap().results),
        ["SMS", "WHATSAPP"],
        "{results:?}"
    );
    assert_eq!(channels(&interactive.await.unwrap().results), ["SMS", "WHATSAPP"]);
    assert_eq!(fake.queries().len(), 1, "the job asked Sinch nothing itself");
}

/// Without Redis a replica holds 64 jobs, running or ended; a start refused because 16 are running makes no room:
/// the ended job it would have pushed out keeps its results (it was answered NOT_FOUND, its results gone).
#[tokio::test]
async fn a_start_refused_for_too_many_running_jobs_pushes_no_ended_job_out() {
    let fake = Arc::new(FakeSinch::start().await);
    let service = Service::against(&fake, &[]).await;
    let mut client = service.client().await;
    // Cached, so that a job of it ends at once.
    let cached = common::CapabilityCallback::new("warm", "SMS", "46700000000", "CAPABILITY_FULL");
    assert_eq!(common::deliver(service.webhook_addr, cached.body()).await, 200);
    let mut ended = Vec::new();
    for _ in 0..48 {
        let job = client.start_bulk_check(start(vec![recipient(0)], "")).await.unwrap();
        let job_id = job.into_inner().job_id;
        let (_, progress) = watch(&mut client, &job_id, 0).await;
        assert_eq!(progress.last().unwrap().state(), BulkCheckState::Succeeded);
        ended.push(job_id);
    }
    // Sixteen that run on: Sinch accepts their queries and never calls back within their wait.
    for i in 1..=16 {
        client.start_bulk_check(start(vec![recipient(i)], "")).await.unwrap();
    }
    let refused = client
        .start_bulk_check(start(vec![recipient(17)], ""))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted);
    for job_id in &ended {
        let request = pb::GetBulkCheckRequest { job_id: job_id.clone() };
        let held = client.get_bulk_check(request).await;
        assert!(held.is_ok(), "job {job_id}: {held:?}");
    }
}

/// Without Redis a job lives in its replica's process: one started while that replica shuts down could never
/// run (its recipients' turns no longer come) and would be gone with it, so the start is refused, to be tried on
/// another replica. It was answered OK and RUNNING, and stayed so until the process ended.
#[tokio::test]
async fn without_redis_a_start_on_a_replica_shutting_down_is_told_to_retry() {
    let fake = Arc::new(FakeSinch::start().await);
    let service = Service::against(&fake, &["--drain-delay=1m", "--shutdown-grace=2m"]).await;
    let mut client = service.client().await;
    let callback = common::CapabilityCallback::new("leaving", "SMS", "46700000000", "CAPABILITY_FULL");
    assert_eq!(common::deliver(service.webhook_addr, callback.body()).await, 200);
    let mut watch = client
        .watch_capability(common::watch_request("leaving", 0, None))
        .await
        .unwrap()
        .into_inner();
    assert!(watch.message().await.unwrap().is_some());
    service.shutdown.cancel();
    // Its watches end once it drains.
    assert_eq!(watch.message().await.unwrap_err().code(), Code::Unavailable);
    let refused = client
        .start_bulk_check(start(vec![recipient(1)], ""))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
    use tonic_types::StatusExt;
    assert_eq!(refused.get_details_error_info().unwrap().reason, "SHUTTING_DOWN");
    assert!(fake.queries().is_empty());
}

/// A job of one recipient (its wait 1 s) on a replica with Redis, cancelled once that recipient's query reached
/// Sinch, which accepts it `accepted_after` it was sent.
struct CancelledWhileSinchIsSlow {
    redis: RedisServer,
    client: CapabilityServiceClient<tonic::transport::Channel>,
    job_id: String,
    fake: Arc<FakeSinch>,
    _service: Service,
}

impl CancelledWhileSinchIsSlow {
    async fn start(accepted_after: Duration) -> CancelledWhileSinchIsSlow {
        use common::Canned;
        let redis = RedisServer::start().await;
        let fake = Arc::new(FakeSinch::start().await);
        fake.script_queries([Canned::new(200, r#"{"request_id":"SLOW"}"#).delayed(accepted_after)]);
        let service = Service::against(&fake, &[&format!("--redis-url={}", redis.url())]).await;
        let mut client = service.client().await;
        let request = pb::StartBulkCheckRequest {
            wait: Some(prost_types::Duration { seconds: 1, nanos: 0 }),
            ..start(vec![recipient(0)], "")
        };
        let job_id = client.start_bulk_check(request).await.unwrap().into_inner().job_id;
        fake.until_queries(1).await;
        cancel(&mut client, &job_id).await;
        CancelledWhileSinchIsSlow {
            redis,
            client,
            job_id,
            fake,
            _service: service,
        }
    }
}

/// With Redis, a job cancelled while Sinch is slow to accept its first recipient's query: that recipient's check
/// may run until its query's deadline (30 s) and its wait after the cancel, and the stream ends only once its
/// result is in. It ended wait + 10 s after the cancel, before that result landed.
#[tokio::test]
async fn with_redis_a_cancel_while_sinch_is_slow_keeps_the_result_still_coming() {
    // Accepted 15 s after it is sent: well past the cancel, its wait (1 s) and 10 s more, however late the cancel.
    let mut job = CancelledWhileSinchIsSlow::start(Duration::from_secs(15)).await;
    let (results, progress) = watch(&mut job.client, &job.job_id, 0).await;
    assert_eq!(progress.last().unwrap().state(), BulkCheckState::Cancelled);
    assert_eq!(
        results.len(),
        1,
        "the recipient sent before the cancel was answered on the stream; the job as it ended: {:?}",
        progress.last()
    );
}

/// With Redis, a cancelled job whose lease lapses while a recipient's query is still in flight (its replica stalled
/// past the lease, or its clock stepped): that recipient is still answered on the stream (here with every identity
/// pending: no callback comes, and its wait is over when Sinch accepts). The run was dropped with the lease, and
/// nobody took a cancelled job over: no answer came, and the stream ended at the cancel's settling time without it.
#[tokio::test]
async fn with_redis_a_cancelled_job_that_loses_its_lease_still_answers_the_recipient_sent() {
    // Accepted well after the lease's next renewal (every 2 s) finds it gone.
    let mut job = CancelledWhileSinchIsSlow::start(Duration::from_secs(8)).await;
    let lease = job.redis.keys("*:job:*}:lease");
    assert_eq!(lease.len(), 1, "{lease:?}");
    job.redis.command(&["DEL", &lease[0]]);
    let request = pb::WatchBulkCheckRequest {
        job_id: job.job_id.clone(),
        after_offset: 0,
    };
    let mut stream = job.client.watch_bulk_check(request).await.unwrap().into_inner();
    let mut answered = false;
    while let Some(message) = stream.message().await.unwrap() {
        if let Some(pb::watch_bulk_check_response::Event::Result(_)) = message.event {
            answered = true;
            break;
        }
    }
    assert!(
        answered,
        "the recipient sent before the lease lapsed was never answered"
    );
    assert_eq!(
        job.fake.queries().len(),
        1,
        "the replica that took it over sent nothing"
    );
}

/// With Redis, a cancelled job past its settling time, which says it settled (its stream ended), is not taken over:
/// what a takeover recorded then would come after the stream's final progress. It was. Nor is one within 10 s of it:
/// replicas whose clocks run ahead of Redis's would say it settled before the takeover's answers land.
#[tokio::test]
async fn with_redis_a_cancelled_job_past_or_near_its_settling_time_is_not_taken_over() {
    let now_ms = || {
        let since = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap();
        since.as_millis() as u64
    };
    for (case, settle_in_ms) in [("past", None), ("5 s ahead", Some(5_000))] {
        // Accepted well after the lease's next renewal finds it gone and drops the run, which would record its answer.
        let mut job = CancelledWhileSinchIsSlow::start(Duration::from_secs(8)).await;
        let settle_by = settle_in_ms.map_or(1, |ms| now_ms() + ms);
        let meta = job.redis.keys("*:job:*}:meta");
        job.redis
            .command(&["HSET", &meta[0], "settle_by", &settle_by.to_string()]);
        job.redis.command(&["DEL", &job.redis.keys("*:job:*}:lease")[0]]);
        // A look for jobs to take over finds it and drops it from the running jobs (a takeover would too, once it
        // recorded the job's end); the look comes every 2 s.
        common::until(Duration::from_secs(20), async || job.redis.keys("*:jobs").is_empty()).await;
        let (results, progress) = watch(&mut job.client, &job.job_id, 0).await;
        assert_eq!(progress.last().unwrap().state(), BulkCheckState::Cancelled, "{case}");
        assert!(results.is_empty(), "{case}: answered by a takeover: {results:?}");
    }
}

/// With Redis, a job cancelled while a recipient waits for its callbacks, and then left by its replica (it shuts
/// down): another replica takes it over, waits for that recipient, is answered by the callback that comes, and ends
/// the job's stream then. A cancelled job was taken over by none: its stream ended at the cancel's settling time,
/// without that answer.
#[tokio::test]
async fn with_redis_a_cancelled_job_its_replica_leaves_is_taken_over_for_the_recipient_sent() {
    let redis = RedisServer::start().await;
    let fake = Arc::new(FakeSinch::start().await);
    let url = format!("--redis-url={}", redis.url());
    let mut leaving = Service::against(&fake, &[&url]).await;
    let staying = Service::against(&fake, &[&url]).await;
    let mut on_leaving = leaving.client().await;
    let request = pb::StartBulkCheckRequest {
        wait: Some(prost_types::Duration { seconds: 30, nanos: 0 }),
        ..start(vec![recipient(0)], "")
    };
    let job = on_leaving.start_bulk_check(request).await.unwrap().into_inner();
    let sent = fake.until_queries(1).await[0].json()["request_id"]
        .as_str()
        .unwrap()
        .to_owned();
    cancel(&mut on_leaving, &job.job_id).await;
    // Dropped from the running jobs, as a replica of an earlier version drops a cancelled job it looks at.
    for key in redis.keys("*:jobs") {
        redis.command(&["SREM", &key, &job.job_id]);
    }
    leaving.shutdown.cancel();
    (&mut leaving.task).await.unwrap().unwrap();
    let mut on_staying = staying.client().await;
    assert_eq!(
        get(&mut on_staying, &job.job_id).await.done,
        0,
        "answered before its replica left"
    );
    let body = common::CapabilityCallback::new(&sent, "SMS", "46700000000", "CAPABILITY_FULL").body();
    assert_eq!(common::deliver(staying.webhook_addr, body).await, 200);
    let (results, progress) = watch(&mut on_staying, &job.job_id, 0).await;
    assert_eq!(progress.last().unwrap().state(), BulkCheckState::Cancelled);
    assert_eq!(
        results.len(),
        1,
        "the recipient sent before the cancel was not answered"
    );
    assert!(results[0].answer.as_ref().unwrap().complete, "{results:?}");
    assert_eq!(fake.queries().len(), 1, "the replica that took it over sent nothing");
}

/// Interactive calls go first in the callback budget but do not stop the jobs: a recipient of the whole budget
/// (four identities at 4 a second) never found the window empty while a QueryCapability came every 500 ms (on any
/// replica: with Redis the budget is shared), and its job never ended.
#[tokio::test]
async fn with_redis_a_trickle_of_queries_does_not_stop_a_job() {
    use capability_facade::grpc::pb::Channel;
    let redis = RedisServer::start().await;
    let fake = Arc::new(FakeSinch::start().await);
    let url = format!("--redis-url={}", redis.url());
    let service = Service::against(&fake, &[&url, "--sinch-callback-rate=4"]).await;
    let _sinch = play_sinch(fake.clone(), service.webhook_addr, 1);
    let mut client = service.client().await;
    let trickle = tokio::spawn({
        let mut client = client.clone();
        async move {
            loop {
                let asked = common::query(common::identities(&[(Channel::Sms, "46711111111")]), "");
                client.query_capability(asked).await.unwrap();
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    });
    let number = "46722222222";
    let all = [Channel::Sms, Channel::Rcs, Channel::Whatsapp, Channel::Viberbm].map(|channel| (channel, number));
    let job = client
        .start_bulk_check(start(vec![common::identities(&all)], ""))
        .await
        .unwrap()
        .into_inner();
    let ended = tokio::time::timeout(Duration::from_secs(60), watch(&mut client, &job.job_id, 0)).await;
    trickle.abort();
    let (results, progress) = ended.expect("the job never ended");
    assert_eq!(progress.last().unwrap().state(), BulkCheckState::Succeeded);
    assert_eq!(results.len(), 1);
}

/// With Redis the callback budget is shared by every replica: a query of more identities than one window's budget
/// holds every replica's next query back for as many windows as it needs. It counted one window's worth, so other
/// replicas went on a second later while Sinch still called back the rest.
#[tokio::test]
async fn a_query_larger_than_the_budget_holds_every_replica_back() {
    let redis = RedisServer::start().await;
    let (log, _) = window_made_by(&redis, 25, 100, Pace::Job).await;
    let jobs = log.jobs();
    // Another replica's next query: 100 at 25 a window take four windows, the next goes in the fifth.
    let Admission::Wait(wait) = jobs.pace(25, 1, Pace::Job, "01B").await.unwrap() else {
        panic!("not held back")
    };
    assert!(wait > Duration::from_millis(2 * 1025), "{wait:?}");
}

/// A job's query kept out of the shared budget for 3 s, and still kept out by other replicas' jobs, asks Redis
/// again when the window says it may fit, not at once: it asked again and again without a pause (a busy loop of
/// round trips) until the other jobs' identities left.
#[tokio::test]
async fn a_starved_query_still_kept_out_by_other_jobs_waits_between_its_asks() {
    use capability_facade::{check::bulk::pacer::Pacer, log::EventLog};
    let redis = RedisServer::start().await;
    let other = common::redis_log(&redis, "starved", Some("starved-key")).await;
    let log = Arc::new(EventLog::redis(
        common::redis_log(&redis, "starved", Some("starved-key")).await,
    ));
    let pacer = Pacer::new(4, &log);
    // Another replica's query of 24 identities at 4 a window: six windows full of its job's identities.
    assert_eq!(
        other.jobs().pace(4, 24, Pace::Job, "01A").await.unwrap(),
        Admission::Counted
    );
    let scripts_run = || {
        let stats = redis.command(&["INFO", "commandstats"]);
        let calls = |line: &str| line.split("calls=").nth(1)?.split(',').next()?.parse::<u64>().ok();
        stats
            .lines()
            .filter(|l| l.starts_with("cmdstat_evalsha") || l.starts_with("cmdstat_eval:"))
            .filter_map(calls)
            .sum::<u64>()
    };
    let before = scripts_run();
    pacer.admit(1).await;
    let asked = scripts_run() - before;
    assert!(asked < 50, "the window was asked {asked} times");
}

/// With Redis one replica's job does not keep another's larger query out for good: a query of two identities never
/// found two places free while another replica's job of one-identity recipients took each place as it freed up.
/// Once starved it reserves room, and the other replica holds back until it fits.
#[tokio::test]
async fn with_redis_another_replicas_job_does_not_keep_a_larger_query_out() {
    use capability_facade::{check::bulk::pacer::Pacer, log::EventLog};
    let redis = RedisServer::start().await;
    let replica = || async {
        let log = common::redis_log(&redis, "fair", Some("fair-key")).await;
        Pacer::new(4, &Arc::new(EventLog::redis(log)))
    };
    let (larger, other) = (replica().await, replica().await);
    let (admitted, mut others) = tokio::sync::watch::channel(0);
    let others_job = async {
        loop {
            other.admit(1).await;
            admitted.send_modify(|n| *n += 1);
        }
    };
    let larger_query = async {
        // Once the other job fills the window.
        others.wait_for(|n| *n >= 4).await.unwrap();
        larger.admit(2).await;
    };
    let got_in = tokio::time::timeout(Duration::from_secs(30), async {
        tokio::select! {
            () = larger_query => {}
            () = others_job => {}
        }
    })
    .await;
    assert!(got_in.is_ok(), "the larger query never got in");
}

/// During a rolling upgrade, a replica of an earlier version writes the shared window's members unmarked, its
/// interactive calls among them: a starved query does not wait on them (it goes, as over interactive calls), or
/// it would reserve room — holding every replica's jobs back — for as long as that replica kept calling.
#[tokio::test]
async fn a_starved_query_is_not_held_by_an_earlier_versions_unmarked_calls() {
    let redis = RedisServer::start().await;
    // A call makes the window; its member is taken out.
    let (log, window) = window_made_by(&redis, 4, 1, Pace::Interactive).await;
    let jobs = log.jobs();
    // An earlier version's interactive call, still in the window (scored ahead, so that it stays there).
    redis.command(&["ZADD", &window, "99999999999999", "01OLDERVERSION:1"]);
    redis.command(&["ZREM", &window, "i:01A:1"]);
    assert_eq!(jobs.pace(4, 4, Pace::Starved, "01B").await.unwrap(), Admission::Overran);
}

/// During a rolling upgrade a replica of an earlier version sets the shared window's expiry back to 2 s at each of
/// its calls; a query of more identities than the budget has filled windows ahead, which the next call of this
/// version keeps: the window lasts until its last member leaves. They were forgotten once calls paused for 2 s.
#[tokio::test]
async fn the_windows_a_large_query_filled_ahead_outlast_an_earlier_versions_expiry() {
    let redis = RedisServer::start().await;
    // 24 identities at 4 a window: six windows, the last from 5,125 ms on.
    let (log, window) = window_made_by(&redis, 4, 24, Pace::Job).await;
    // An earlier version's call: `PEXPIRE window 2000`.
    redis.command(&["PEXPIRE", &window, "2000"]);
    log.jobs().pace(4, 1, Pace::Interactive, "01B").await.unwrap();
    let ttl: i64 = redis.command(&["PTTL", &window]).parse().unwrap();
    assert!(ttl > 5_125, "the window expires in {ttl} ms");
}

/// A replica's log on `redis`, and the key of the shared callback budget's window its first call made: `pace` of
/// `n` identities under `limit`, counted.
async fn window_made_by(
    redis: &RedisServer,
    limit: u32,
    n: u32,
    pace: Pace,
) -> (capability_facade::log::redis::RedisLog, String) {
    let log = common::redis_log(redis, "pace", Some("pace-key")).await;
    assert_eq!(
        log.jobs().pace(limit, n, pace, "01A").await.unwrap(),
        Admission::Counted
    );
    let [window] = &redis.keys("*pace*")[..] else {
        panic!("one window")
    };
    (log, window.clone())
}
