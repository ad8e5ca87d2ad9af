//! The client commands for people: `query`, `watch` and `check`, printed as a table or as JSON lines.

use std::{process::ExitCode, time::Duration};

use capability_facade::grpc::{client::Client, pb};

use super::{CheckArgs, QueryArgs, WatchArgs};

/// `capability-facade query`: prints the request_id (or a JSON object with `--json`).
pub async fn query(args: QueryArgs) -> ExitCode {
    let result = async {
        let mut client = args.connect.connect().await?;
        client.query(args.request()).await
    }
    .await;
    match result {
        Ok(answer) if args.json => {
            out!(
                "{}",
                serde_json::json!({"request_id": answer.request_id, "app_id": answer.app_id})
            );
            ExitCode::SUCCESS
        }
        Ok(answer) => {
            out!("{}", answer.request_id);
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("query failed: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `capability-facade watch`: prints results as they arrive, until completion.
pub async fn watch(args: WatchArgs) -> ExitCode {
    let request = pb::WatchCapabilityRequest {
        request_id: args.request_id.clone(),
        after_offset: args.after_offset,
        wait: Some(prost_duration(args.wait)),
    };
    let mut client = match args.connect.connect().await {
        Ok(c) => c,
        Err(e) => {
            eprintln!("watch failed: {e}");
            return ExitCode::FAILURE;
        }
    };
    print_watch(&mut client, request, args.json).await
}

/// `capability-facade check`: one CheckCapability; each result with its source and age, then the recommendation.
pub async fn check(args: CheckArgs) -> ExitCode {
    let json = args.query.json;
    let result = async {
        let mut client = args.query.connect.connect().await?;
        client.check(args.request()).await
    }
    .await;
    let answer = match result {
        Ok(answer) => answer,
        Err(e) => {
            eprintln!("check failed: {e}");
            return ExitCode::FAILURE;
        }
    };
    let request_id = Some(answer.request_id.as_str()).filter(|id| !id.is_empty());
    if json {
        out!("{}", serde_json::json!({ "request_id": answer.request_id }));
    } else {
        out!("request_id {}", request_id.unwrap_or("- (every result from the cache)"));
        out!(
            "{:<12} {:<16} {:<20} {:<8} {:<8} DETAIL",
            "CHANNEL",
            "IDENTITY",
            "STATUS",
            "SOURCE",
            "AGE"
        );
    }
    let now = std::time::SystemTime::now();
    for result in &answer.results {
        let Some(n) = &result.notification else { continue };
        let source = result
            .source()
            .as_str_name()
            .trim_start_matches("RESULT_SOURCE_")
            .to_ascii_lowercase();
        let age = result
            .checked_at
            .and_then(|t| std::time::SystemTime::try_from(t).ok())
            .and_then(|t| now.duration_since(t).ok())
            .unwrap_or_default();
        print_result(n, &source, age, json);
    }
    let identities = |ids: &[pb::ChannelIdentity]| -> Vec<String> {
        ids.iter()
            .map(|id| format!("{}:{}", id.channel_raw, id.identity))
            .collect()
    };
    let (pending, recommended) = (identities(&answer.pending), identities(&answer.recommended));
    if json {
        let completion = if answer.complete {
            "ALL_CHANNELS_REPORTED"
        } else {
            "WAIT_ELAPSED"
        };
        out!(
            "{}",
            serde_json::json!({"completion": completion, "complete": answer.complete, "pending": pending,
                "recommended": recommended})
        );
        return ExitCode::SUCCESS;
    }
    if answer.complete {
        out!("-- complete");
    } else if pending.is_empty() {
        out!("-- the results that came within the wait (a contact's channels are not known in advance)");
    } else {
        out!("-- wait elapsed; no answer yet from {}", pending.join(", "));
    }
    match recommended.is_empty() {
        true => out!("-- no reachable channel"),
        false => out!("-- recommended: {}", recommended.join(", ")),
    }
    ExitCode::SUCCESS
}

/// One result of a check, with where it came from and how old it is.
fn print_result(n: &pb::CapabilityNotification, source: &str, age: Duration, json: bool) {
    if json {
        let mut line = notification_json(n);
        line["source"] = source.into();
        line["age_ms"] = (age.as_millis() as u64).into();
        out!("{line}");
        return;
    }
    let (status, detail) = status_and_detail(n);
    let age = humantime::format_duration(Duration::from_secs(age.as_secs())).to_string();
    out!(
        "{:<12} {:<16} {:<20} {:<8} {:<8} {}",
        n.channel_raw,
        n.identity,
        status,
        source,
        age,
        detail
    );
}

pub(super) fn prost_duration(d: Duration) -> prost_types::Duration {
    prost_types::Duration {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
    }
}

async fn print_watch(client: &mut Client, request: pb::WatchCapabilityRequest, json: bool) -> ExitCode {
    use futures::StreamExt;
    use pb::watch_capability_response::Event;
    let mut stream = match client.watch(request).await {
        Ok(s) => s,
        Err(e) => {
            eprintln!("watch failed: {e}");
            return ExitCode::FAILURE;
        }
    };
    if !json {
        out!("{:<12} {:<16} {:<20} DETAIL", "CHANNEL", "IDENTITY", "STATUS");
    }
    while let Some(item) = stream.next().await {
        match item {
            Ok(pb::WatchCapabilityResponse {
                event: Some(Event::Notification(n)),
            }) => print_notification(&n, json),
            Ok(pb::WatchCapabilityResponse {
                event: Some(Event::Completion(c)),
            }) => {
                let reason = c
                    .reason()
                    .as_str_name()
                    .trim_start_matches("COMPLETION_REASON_")
                    .to_owned();
                if json {
                    out!(
                        "{}",
                        serde_json::json!({"completion": reason, "last_offset": c.last_offset,
                            "pending_channels": c.pending_channels})
                    );
                } else if c.pending_channels.is_empty() {
                    out!("-- complete ({})", reason.to_ascii_lowercase().replace('_', " "));
                } else {
                    out!("-- wait elapsed; no answer yet from {}", c.pending_channels.join(", "));
                }
                return ExitCode::SUCCESS;
            }
            Ok(_) => {}
            Err(e) => {
                eprintln!("watch ended: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    ExitCode::SUCCESS
}

fn print_notification(n: &pb::CapabilityNotification, json: bool) {
    if json {
        out!("{}", notification_json(n));
        return;
    }
    let (status, detail) = status_and_detail(n);
    out!("{:<12} {:<16} {:<20} {}", n.channel_raw, n.identity, status, detail);
}

fn notification_json(n: &pb::CapabilityNotification) -> serde_json::Value {
    let reason = n.reason.as_ref().map(|r| r.code.as_str()).unwrap_or_default();
    serde_json::json!({"offset": n.offset, "request_id": n.request_id, "channel": n.channel_raw,
        "identity": n.identity, "contact_id": n.contact_id, "capability_status": n.capability_status_raw,
        "channel_capabilities": n.channel_capabilities, "reason": reason})
}

/// The status as a table shows it (`FULL`, `PARTIAL`, `NONE`, `UNKNOWN`) and its detail: the capabilities, else
/// the reason.
fn status_and_detail(n: &pb::CapabilityNotification) -> (String, String) {
    let status = n.capability_status_raw.as_str();
    let reason = n.reason.as_ref().map(|r| r.code.as_str()).unwrap_or_default();
    let detail = if n.channel_capabilities.is_empty() {
        reason.to_owned()
    } else {
        n.channel_capabilities.join(", ")
    };
    let status = status
        .strip_prefix("CAPABILITY_")
        .unwrap_or(status)
        .replace("NO_CAPABILITY", "NONE");
    (status, detail)
}
