//! WatchCapability from a caller's side: every order of query, callbacks and watch; replay; duplicates;
//! completion; wait; heartbeats; limits; shutdown; and the sandbox loop.

mod common;

use std::time::Duration;

use capability_facade::grpc::pb::{self, Channel, CompletionReason};
use common::{
    FakeSinch, Sandbox, Service, capability_body, deliver, drain, identities, query, query_and_drain, watch_request,
};
use tonic::Code;

fn full(channel: &str) -> (String, String) {
    (channel.to_owned(), "CAPABILITY_FULL".to_owned())
}

fn strip(seen: Vec<(u64, String, String)>) -> Vec<(String, String)> {
    seen.into_iter().map(|(_, c, s)| (c, s)).collect()
}

#[tokio::test]
async fn a_watch_opened_before_the_query_misses_nothing_and_completes() {
    let sandbox = Sandbox::start(&[], None).await;
    let service = sandbox.service(&[]).await;
    let mut client = service.client().await;
    let stream = client
        .watch_capability(watch_request("before", 0, None))
        .await
        .unwrap()
        .into_inner();
    client
        .query_capability(query(
            identities(&[(Channel::Whatsapp, "46700000001"), (Channel::Rcs, "46700000001")]),
            "before",
        ))
        .await
        .unwrap();
    for channel in ["WHATSAPP", "RCS"] {
        let body = capability_body("before", channel, "46700000001", "CAPABILITY_FULL");
        assert_eq!(deliver(service.webhook_addr, body).await, 200);
    }
    let (seen, end) = drain(stream).await;
    assert_eq!(seen.iter().map(|s| s.0).collect::<Vec<_>>(), [1, 2]);
    let completion = end.unwrap();
    assert_eq!(completion.reason(), CompletionReason::AllChannelsReported);
    assert_eq!(completion.last_offset, 2);
}

/// A query that lists one channel with two identities: each may report, so the first result must not complete
/// the watch (it ends at its wait instead, with every result delivered).
#[tokio::test]
async fn a_channel_listed_with_two_identities_does_not_complete_the_watch_at_its_first_result() {
    let fake = FakeSinch::start().await;
    let service = Service::against(&fake, &[]).await;
    let mut client = service.client().await;
    let numbers = ["46700000001", "46700000002"];
    client
        .query_capability(query(
            identities(&[(Channel::Sms, numbers[0]), (Channel::Sms, numbers[1])]),
            "two-numbers",
        ))
        .await
        .unwrap();
    let mut stream = client
        .watch_capability(watch_request("two-numbers", 0, Some(Duration::from_secs(30))))
        .await
        .unwrap()
        .into_inner();
    for number in numbers {
        let body = capability_body("two-numbers", "SMS", number, "CAPABILITY_FULL");
        assert_eq!(deliver(service.webhook_addr, body).await, 200);
        let message = stream.message().await.unwrap().expect("the stream ended early");
        let Some(pb::watch_capability_response::Event::Notification(n)) = message.event else {
            panic!("expected {number}'s result, got {:?}", message.event);
        };
        assert_eq!(n.identity, number);
    }
}

/// A query of as many identities as QueryCapability takes: each one's result is kept and delivered (with the
/// default settings).
#[tokio::test]
async fn a_query_of_the_most_identities_gets_every_result() {
    use capability_facade::capability::MAX_IDENTITIES;
    let fake = FakeSinch::start().await;
    let service = Service::against(&fake, &[]).await;
    let mut client = service.client().await;
    let numbers: Vec<String> = (0..MAX_IDENTITIES).map(|i| format!("467000{i:05}")).collect();
    let pairs: Vec<(Channel, &str)> = numbers.iter().map(|n| (Channel::Sms, n.as_str())).collect();
    client
        .query_capability(query(identities(&pairs), "most"))
        .await
        .unwrap();
    for number in &numbers {
        let body = capability_body("most", "SMS", number, "CAPABILITY_FULL");
        assert_eq!(deliver(service.webhook_addr, body).await, 200);
    }
    let delivered: Vec<String> = common::held(&service, "most", 0)
        .await
        .into_iter()
        .map(|(_, _, status)| status)
        .collect();
    assert_eq!(delivered, vec!["CAPABILITY_FULL"; MAX_IDENTITIES]);
}

#[tokio::test]
async fn callbacks_that_arrive_before_the_query_answer_are_replayed_to_a_later_watch() {
    let sandbox = Sandbox::start(&[], None).await;
    let service = sandbox.service(&[]).await;
    // The callbacks race ahead of everything: they arrive before the query and before any watch.
    for channel in ["SMS", "RCS"] {
        let body = capability_body("after", channel, "46700000001", "CAPABILITY_FULL");
        assert_eq!(deliver(service.webhook_addr, body).await, 200);
    }
    let mut client = service.client().await;
    client
        .query_capability(query(
            identities(&[(Channel::Sms, "46700000001"), (Channel::Rcs, "46700000001")]),
            "after",
        ))
        .await
        .unwrap();
    let stream = client
        .watch_capability(watch_request("after", 0, None))
        .await
        .unwrap()
        .into_inner();
    let (seen, end) = drain(stream).await;
    assert_eq!(strip(seen), [full("SMS"), full("RCS")]);
    assert_eq!(end.unwrap().reason(), CompletionReason::AllChannelsReported);
}

#[tokio::test]
async fn after_offset_resumes_without_duplicates() {
    let sandbox = Sandbox::start(&[], None).await;
    let service = sandbox.service(&[]).await;
    for channel in ["SMS", "RCS", "WHATSAPP"] {
        let body = capability_body("resume", channel, "46700000001", "CAPABILITY_FULL");
        assert_eq!(deliver(service.webhook_addr, body).await, 200);
    }
    let mut client = service.client().await;
    let stream = client
        .watch_capability(watch_request("resume", 2, Some(Duration::ZERO)))
        .await
        .unwrap()
        .into_inner();
    let (seen, end) = drain(stream).await;
    assert_eq!(seen, [(3, "WHATSAPP".to_owned(), "CAPABILITY_FULL".to_owned())]);
    let completion = end.unwrap();
    assert_eq!(completion.reason(), CompletionReason::WaitElapsed);
    assert_eq!(completion.last_offset, 3);
}

#[tokio::test]
async fn a_redelivered_callback_reaches_the_watcher_once() {
    let sandbox = Sandbox::start(&[], None).await;
    let service = sandbox.service(&[]).await;
    let mut client = service.client().await;
    let stream = client
        .watch_capability(watch_request("dup", 0, Some(Duration::from_millis(500))))
        .await
        .unwrap()
        .into_inner();
    let first = capability_body("dup", "SMS", "46700000001", "CAPABILITY_FULL");
    for body in [
        first.clone(),
        first,
        capability_body("dup", "RCS", "46700000001", "CAPABILITY_FULL"),
    ] {
        assert_eq!(
            deliver(service.webhook_addr, body).await,
            200,
            "a redelivery is acknowledged too"
        );
    }
    let (seen, _) = drain(stream).await;
    assert_eq!(seen.iter().map(|s| s.0).collect::<Vec<_>>(), [1, 2]);
    assert_eq!(strip(seen), [full("SMS"), full("RCS")]);
}

#[tokio::test]
async fn an_unknown_request_waits_then_completes_when_its_wait_elapses() {
    let sandbox = Sandbox::start(&[], None).await;
    let service = sandbox.service(&[]).await;
    let mut client = service.client().await;
    client
        .query_capability(query(
            identities(&[(Channel::Sms, "46700000001"), (Channel::Rcs, "46700000001")]),
            "partial",
        ))
        .await
        .unwrap();
    assert_eq!(
        deliver(
            service.webhook_addr,
            capability_body("partial", "SMS", "46700000001", "CAPABILITY_FULL")
        )
        .await,
        200
    );
    let stream = client
        .watch_capability(watch_request("partial", 0, Some(Duration::from_millis(200))))
        .await
        .unwrap()
        .into_inner();
    let (seen, end) = drain(stream).await;
    assert_eq!(seen.len(), 1);
    let completion = end.unwrap();
    assert_eq!(completion.reason(), CompletionReason::WaitElapsed);
    assert_eq!(completion.pending_channels, ["RCS"]);

    common::waits_out(&mut client, "nobody-asked", Duration::from_millis(100)).await;
}

#[tokio::test]
async fn a_quiet_stream_gets_heartbeats() {
    let sandbox = Sandbox::start(&[], None).await;
    let service = sandbox.service(&["--heartbeat=50ms"]).await;
    let mut client = service.client().await;
    let mut stream = client
        .watch_capability(watch_request("quiet", 0, None))
        .await
        .unwrap()
        .into_inner();
    for _ in 0..2 {
        let event = stream.message().await.unwrap().unwrap().event;
        assert!(
            matches!(
                event,
                Some(pb::watch_capability_response::Event::Heartbeat(pb::Heartbeat {
                    last_offset: 0
                }))
            ),
            "{event:?}"
        );
    }
}

#[tokio::test]
async fn bad_watch_requests_are_invalid_arguments() {
    let sandbox = Sandbox::start(&[], None).await;
    let service = sandbox.service(&[]).await;
    let mut client = service.client().await;
    let status = client.watch_capability(watch_request("", 0, None)).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("request_id"), "{}", status.message());
    let mut negative = watch_request("r", 0, None);
    negative.wait = Some(prost_types::Duration { seconds: -1, nanos: 0 });
    let status = client.watch_capability(negative).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("wait"), "{}", status.message());
    let status = client
        .watch_capability(watch_request(&"x".repeat(129), 0, None))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
}

#[tokio::test]
async fn watches_beyond_the_cap_are_refused_and_a_cancelled_watch_frees_its_place() {
    let sandbox = Sandbox::start(&[], None).await;
    let service = sandbox.service(&["--max-watches=1"]).await;
    let mut client = service.client().await;
    let first = client
        .watch_capability(watch_request("a", 0, None))
        .await
        .unwrap()
        .into_inner();
    let status = client.watch_capability(watch_request("b", 0, None)).await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted);
    drop(first);
    // The server learns of the cancellation asynchronously (RST_STREAM): the place frees within moments.
    let mut attempts = 0;
    loop {
        match client.watch_capability(watch_request("b", 0, None)).await {
            Ok(_) => break,
            Err(s) if s.code() == Code::ResourceExhausted && attempts < 200 => {
                attempts += 1;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Err(s) => panic!("the cancelled watch's place was not freed: {s:?}"),
        }
    }
}

#[tokio::test]
async fn on_shutdown_watches_end_unavailable_with_their_last_offset() {
    let sandbox = Sandbox::start(&[], None).await;
    let mut service = sandbox.service(&[]).await;
    let mut client = service.client().await;
    assert_eq!(
        deliver(
            service.webhook_addr,
            capability_body("drain", "SMS", "46700000001", "CAPABILITY_FULL")
        )
        .await,
        200
    );
    let mut stream = client
        .watch_capability(watch_request("drain", 0, None))
        .await
        .unwrap()
        .into_inner();
    assert!(stream.message().await.unwrap().is_some());
    service.shutdown.cancel();
    let status = stream.message().await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);
    assert!(status.message().contains("last_offset=1"), "{}", status.message());
    // A caller in any language reads where to resume from the details, not the message.
    use tonic_types::StatusExt;
    let info = status.get_details_error_info().expect("ErrorInfo");
    assert_eq!(info.reason, "SHUTTING_DOWN");
    assert_eq!(info.metadata.get("last_offset").map(String::as_str), Some("1"));
    (&mut service.task).await.unwrap().unwrap();
}

#[tokio::test]
async fn the_sandbox_answers_every_channel_even_duplicated_and_out_of_order() {
    let config = common::sandbox_config(&[
        "--sandbox-callback-delay=20ms",
        "--sandbox-duplicates=true",
        "--sandbox-reorder=true",
    ]);
    let service = Service::start(config).await;
    let mut client = service.client().await;
    let (seen, end) = query_and_drain(
        &mut client,
        identities(&[
            (Channel::Whatsapp, "46712312312"),
            (Channel::Rcs, "46700000004"),
            (Channel::Sms, "46700000008"),
        ]),
        None,
    )
    .await;
    assert_eq!(
        strip(seen),
        [
            ("SMS".to_owned(), "NO_CAPABILITY".to_owned()),
            ("RCS".to_owned(), "CAPABILITY_PARTIAL".to_owned()),
            full("WHATSAPP"),
        ],
        "reversed, each once"
    );
    assert_eq!(end.unwrap().reason(), CompletionReason::AllChannelsReported);
}

#[tokio::test]
async fn the_readme_check_shows_both_results_from_the_real_binary() {
    let process = common::Binary::spawn(&[]).await;
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_capability-facade"))
        .args([
            "check",
            "--addr",
            &process.url(),
            "--identity",
            "WHATSAPP:46712312312",
            "--identity",
            "RCS:46712312312",
        ])
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let rows: Vec<&str> = stdout
        .lines()
        .filter(|l| l.contains("46712312312") && !l.starts_with("--"))
        .collect();
    assert_eq!(rows.len(), 2, "{stdout}");
    assert!(
        rows.iter().all(|r| r.contains("FULL") && r.contains("live")),
        "{stdout}"
    );
    assert!(stdout.contains("-- complete"), "{stdout}");
    assert!(
        stdout.contains("-- recommended: RCS:46712312312, WHATSAPP:46712312312"),
        "rich channels in the default order: {stdout}"
    );

    // Asked again: from the cache, without a request_id.
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_capability-facade"))
        .args(["check", "--addr", &process.url(), "--identity", "RCS:46712312312"])
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("every result from the cache"), "{stdout}");
    assert!(
        stdout.lines().any(|l| l.starts_with("RCS") && l.contains("cache")),
        "{stdout}"
    );

    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_capability-facade"))
        .args([
            "check",
            "--json",
            "--addr",
            &process.url(),
            "--identity",
            "SMS:46700000006",
        ])
        .output()
        .await
        .unwrap();
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines[1]["reason"], "RECIPIENT_NOT_REACHABLE");
    assert_eq!(lines[1]["source"], "live");
    assert_eq!(lines[2]["completion"], "ALL_CHANNELS_REPORTED");
    assert_eq!(
        lines[2]["recommended"],
        serde_json::json!([]),
        "NO_CAPABILITY is never recommended"
    );
}

#[tokio::test]
async fn many_watchers_of_one_request_each_get_every_notification_once() {
    let sandbox = Sandbox::start(&[], None).await;
    let service = sandbox.service(&[]).await;
    let client = service.client().await;
    let mut streams = Vec::new();
    for _ in 0..20 {
        let mut client = client.clone();
        streams.push(
            client
                .watch_capability(watch_request("fanout", 0, Some(Duration::from_millis(500))))
                .await
                .unwrap()
                .into_inner(),
        );
    }
    for channel in ["SMS", "RCS", "WHATSAPP"] {
        let body = capability_body("fanout", channel, "46700000001", "CAPABILITY_FULL");
        assert_eq!(deliver(service.webhook_addr, body).await, 200);
    }
    let results = futures::future::join_all(streams.into_iter().map(drain)).await;
    for (seen, _) in results {
        assert_eq!(seen.iter().map(|s| s.0).collect::<Vec<_>>(), [1, 2, 3]);
    }
}

/// The client commands piped into a reader that stops reading (`| head -1`, a closed pager) end quietly with the
/// status of a process killed by SIGPIPE, 141, as Unix tools do. They panicked: "failed printing to stdout".
#[tokio::test]
async fn the_client_commands_end_quietly_when_their_reader_goes_away() {
    let process = common::Binary::spawn(&[]).await;
    let addr = process.url();
    let request_id = "closed-pipe";
    for args in [
        &["query", "--identity", "SMS:46700000006", "--request-id", request_id][..],
        &["watch", "--json", "--wait", "5s", request_id],
        &["watch", "--wait", "5s", request_id],
        &["check", "--identity", "SMS:46700000006"],
    ] {
        let (reader, writer) = std::io::pipe().unwrap();
        drop(reader);
        let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_capability-facade"))
            .args(args)
            .args(["--addr", &addr])
            .stdout(writer)
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
            .wait_with_output()
            .await
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(141), "{args:?}: {stderr}");
        assert!(stderr.is_empty(), "{args:?}: {stderr}");
    }
}
