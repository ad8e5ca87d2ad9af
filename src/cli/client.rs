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
    let identity = |id: &pb::ChannelIdentity| format!("{}:{}", id.channel_raw, id.identity);
    let pending: Vec<String> = answer.pending.iter().map(identity).collect();
    let recommended: Vec<String> = answer.recommended.iter().map(identity).collect();
    let lookups: Vec<(String, &str)> = answer
        .pending_lookups
        .iter()
        .filter_map(|l| Some((identity(l.identity.as_ref()?), l.request_id.as_str())))
        .collect();
    if json {
        let completion = if answer.complete {
            "ALL_CHANNELS_REPORTED"
        } else {
            "WAIT_ELAPSED"
        };
        let lookups: Vec<_> = lookups
            .iter()
            .map(|(identity, request_id)| serde_json::json!({"identity": identity, "request_id": request_id}))
            .collect();
        out!(
            "{}",
            serde_json::json!({"completion": completion, "complete": answer.complete, "pending": pending,
                "pending_lookups": lookups, "recommended": recommended})
        );
        return ExitCode::SUCCESS;
    }
    if answer.complete {
        out!("-- complete");
    } else if pending.is_empty() {
        out!("-- the results that came within the wait (a contact's channels are not known in advance)");
    } else {
        out!("-- wait elapsed; no answer yet from {}", pending.join(", "));
        for line in elsewhere(&lookups, &answer.request_id) {
            out!("{line}");
        }
    }
    match recommended.is_empty() {
        true => out!("-- no reachable channel"),
        false => out!("-- recommended: {}", recommended.join(", ")),
    }
    ExitCode::SUCCESS
}

/// Where the late results of pending identities will come when it is not under the check's own request_id (they
/// joined lookups other checks started): one line per request_id to watch, with its identities.
fn elsewhere(lookups: &[(String, &str)], own: &str) -> Vec<String> {
    let mut by_request: Vec<(&str, Vec<&str>)> = Vec::new();
    for (identity, request_id) in lookups.iter().filter(|(_, id)| *id != own) {
        match by_request.iter_mut().find(|(id, _)| id == request_id) {
            Some((_, identities)) => identities.push(identity),
            None => by_request.push((request_id, vec![identity])),
        }
    }
    by_request
        .into_iter()
        .map(|(request_id, identities)| format!("-- watch {request_id} for {}", identities.join(", ")))
        .collect()
}

/// The last line of a watch: complete, or what the wait ended without.
fn completion_line(reason: pb::CompletionReason, pending_channels: &[String]) -> String {
    match reason {
        pb::CompletionReason::AllChannelsReported => "-- complete (all channels reported)".to_owned(),
        _ if pending_channels.is_empty() => {
            "-- wait elapsed (the channels to expect are not known: these are the results that came)".to_owned()
        }
        _ => format!("-- wait elapsed; no answer yet from {}", pending_channels.join(", ")),
    }
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
                } else {
                    out!("{}", completion_line(c.reason(), &c.pending_channels));
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_watch_ended_by_its_wait_is_never_called_complete() {
        let reported = completion_line(pb::CompletionReason::AllChannelsReported, &[]);
        assert_eq!(reported, "-- complete (all channels reported)");
        let unknown = completion_line(pb::CompletionReason::WaitElapsed, &[]);
        assert!(
            unknown.starts_with("-- wait elapsed") && !unknown.contains("complete"),
            "{unknown}"
        );
        let pending = completion_line(pb::CompletionReason::WaitElapsed, &["SMS".into(), "RCS".into()]);
        assert_eq!(pending, "-- wait elapsed; no answer yet from SMS, RCS");
    }

    #[test]
    fn pending_identities_that_joined_another_lookup_say_which_request_to_watch() {
        let lookups = [
            ("SMS:1".to_owned(), "own"),
            ("RCS:1".to_owned(), "other"),
            ("WHATSAPP:1".to_owned(), "third"),
            ("VIBER:1".to_owned(), "other"),
        ];
        assert_eq!(
            elsewhere(&lookups, "own"),
            ["-- watch other for RCS:1, VIBER:1", "-- watch third for WHATSAPP:1"]
        );
        assert!(elsewhere(&lookups[..1], "own").is_empty());
    }
}
