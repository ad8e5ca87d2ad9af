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
            println!(
                "{}",
                serde_json::json!({"request_id": answer.request_id, "app_id": answer.app_id})
            );
            ExitCode::SUCCESS
        }
        Ok(answer) => {
            println!("{}", answer.request_id);
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

/// `capability-facade check`: query, then watch.
pub async fn check(args: CheckArgs) -> ExitCode {
    let json = args.query.json;
    let mut client = match args.query.connect.connect().await {
        Ok(c) => c,
        Err(e) => {
            eprintln!("check failed: {e}");
            return ExitCode::FAILURE;
        }
    };
    let answer = match client.query(args.query.request()).await {
        Ok(answer) => answer,
        Err(e) => {
            eprintln!("query failed: {e}");
            return ExitCode::FAILURE;
        }
    };
    if json {
        println!("{}", serde_json::json!({"request_id": answer.request_id}));
    } else {
        println!("request_id {}", answer.request_id);
    }
    let request = pb::WatchCapabilityRequest {
        request_id: answer.request_id,
        after_offset: 0,
        wait: Some(prost_duration(args.wait)),
    };
    print_watch(&mut client, request, json).await
}

fn prost_duration(d: Duration) -> prost_types::Duration {
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
        println!("{:<12} {:<16} {:<20} DETAIL", "CHANNEL", "IDENTITY", "STATUS");
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
                    println!(
                        "{}",
                        serde_json::json!({"completion": reason, "last_offset": c.last_offset,
                            "pending_channels": c.pending_channels})
                    );
                } else if c.pending_channels.is_empty() {
                    println!("-- complete ({})", reason.to_ascii_lowercase().replace('_', " "));
                } else {
                    println!("-- wait elapsed; no answer yet from {}", c.pending_channels.join(", "));
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
    let status = n.capability_status_raw.as_str();
    let reason = n.reason.as_ref().map(|r| r.code.as_str()).unwrap_or_default();
    if json {
        println!(
            "{}",
            serde_json::json!({"offset": n.offset, "request_id": n.request_id, "channel": n.channel_raw,
                "identity": n.identity, "contact_id": n.contact_id, "capability_status": status,
                "channel_capabilities": n.channel_capabilities, "reason": reason})
        );
        return;
    }
    let detail = if n.channel_capabilities.is_empty() {
        reason.to_owned()
    } else {
        n.channel_capabilities.join(", ")
    };
    let status = status
        .strip_prefix("CAPABILITY_")
        .unwrap_or(status)
        .replace("NO_CAPABILITY", "NONE");
    println!("{:<12} {:<16} {:<20} {}", n.channel_raw, n.identity, status, detail);
}
