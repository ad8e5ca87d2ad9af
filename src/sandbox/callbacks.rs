//! The sandbox's CAPABILITY callbacks: one per channel, signed as Sinch signs, with deterministic outcomes.
//!
//! Outcome by the identity's last digit: 0–3 `CAPABILITY_FULL`; 4–5 `CAPABILITY_PARTIAL` (with
//! `channel_capabilities`); 6–7 `NO_CAPABILITY` (`RECIPIENT_NOT_REACHABLE`); 8 `NO_CAPABILITY`
//! (`RECIPIENT_NOT_OPTED_IN`); 9 or no digit `CAPABILITY_UNKNOWN`. Contact queries use the [`DEMO_CONTACTS`];
//! any other contact gets one `NO_CAPABILITY` callback with reason `CONTACT_NOT_FOUND`. With
//! `silent_unreachable`, no callback at all is sent for a `NO_CAPABILITY` outcome.

use std::{
    sync::Arc,
    time::{Duration, SystemTime},
};

use governor::DefaultDirectRateLimiter;
use serde_json::{Value, json};

use crate::{
    config::SandboxSettings,
    sandbox::webhooks::Destination,
    upstream::wire::{QueryJson, RecipientJson},
    webhook::signature,
};

/// Demo contacts for contact_id queries: (contact id, [(channel, identity)]).
pub const DEMO_CONTACTS: &[(&str, &[(&str, &str)])] = &[
    (
        "demo-alice",
        &[
            ("WHATSAPP", "46700000001"),
            ("RCS", "46700000001"),
            ("SMS", "46700000001"),
        ],
    ),
    ("demo-bob", &[("WHATSAPP", "46700000006"), ("SMS", "46700000002")]),
    ("demo-carol", &[("RCS", "46700000009"), ("VIBERBM", "46700000008")]),
];

/// The `capability_notification` of one channel identity.
pub fn outcome(request_id: &str, contact_id: &str, channel: &str, identity: &str) -> Value {
    let mut n = json!({"request_id": request_id, "contact_id": contact_id, "channel": channel, "identity": identity});
    let digit = identity.chars().last().and_then(|c| c.to_digit(10));
    let (status, reason) = match digit {
        Some(0..=3) => ("CAPABILITY_FULL", None),
        Some(4 | 5) => {
            n["channel_capabilities"] = json!(["TEXT", "MEDIA"]);
            ("CAPABILITY_PARTIAL", None)
        }
        Some(6 | 7) => (
            "NO_CAPABILITY",
            Some(("RECIPIENT_NOT_REACHABLE", "The recipient is not reachable.")),
        ),
        Some(8) => (
            "NO_CAPABILITY",
            Some(("RECIPIENT_NOT_OPTED_IN", "The recipient has not opted in.")),
        ),
        _ => ("CAPABILITY_UNKNOWN", None),
    };
    n["capability_status"] = status.into();
    if let Some((code, description)) = reason {
        n["reason"] = json!({"code": code, "description": description, "sub_code": "UNSPECIFIED_SUB_CODE"});
    }
    n
}

/// Every callback body a query produces, in Sinch's order; without those of `NO_CAPABILITY` outcomes when
/// `silent_unreachable`.
pub fn bodies(project_id: &str, query: &QueryJson, silent_unreachable: bool) -> Vec<Vec<u8>> {
    let notifications: Vec<Value> = match &query.recipient {
        RecipientJson::IdentifiedBy { channel_identities } => channel_identities
            .iter()
            .map(|id| outcome(&query.request_id, "", &id.channel, &id.identity))
            .collect(),
        RecipientJson::ContactId(contact) => match DEMO_CONTACTS.iter().find(|(id, _)| id == contact) {
            Some((_, identities)) => identities
                .iter()
                .map(|(channel, identity)| outcome(&query.request_id, contact, channel, identity))
                .collect(),
            None => vec![json!({"request_id": query.request_id, "contact_id": contact,
                "capability_status": "NO_CAPABILITY",
                "reason": {"code": "CONTACT_NOT_FOUND", "description": "The contact does not exist.",
                           "sub_code": "UNSPECIFIED_SUB_CODE"}})],
        },
    };
    let now = humantime::format_rfc3339_micros(SystemTime::now()).to_string();
    notifications
        .into_iter()
        .filter(|n| !(silent_unreachable && n["capability_status"] == "NO_CAPABILITY"))
        .map(|n| {
            let body = json!({"app_id": query.app_id, "accepted_time": now, "event_time": now,
                "project_id": project_id, "message_metadata": "", "capability_notification": n});
            serde_json::to_vec(&body).expect("JSON serialises")
        })
        .collect()
}

/// Posts `bodies` to every destination after the configured delay, in order (or reversed), each once (or
/// twice), one callback per permit of the app's `pacer` (its `rate_limits.webhooks`; each destination gets its
/// copy), retrying a refused delivery a few times with back-off, as Sinch does.
pub async fn deliver(
    http: reqwest::Client,
    destinations: Vec<Destination>,
    mut bodies: Vec<Vec<u8>>,
    knobs: SandboxSettings,
    pacer: Arc<DefaultDirectRateLimiter>,
) {
    tokio::time::sleep(knobs.callback_delay).await;
    if knobs.reorder {
        bodies.reverse();
    }
    let copies = if knobs.duplicates { 2 } else { 1 };
    for body in &bodies {
        for _ in 0..copies {
            pacer.until_ready().await;
            futures::future::join_all(destinations.iter().map(|d| post(&http, d, body))).await;
        }
    }
}

async fn post(http: &reqwest::Client, target: &Destination, body: &[u8]) {
    let mut pause = Duration::from_millis(100);
    for attempt in 1..=6 {
        let mut request = http
            .post(&target.target)
            .header("content-type", "application/json")
            .body(body.to_vec());
        if !target.secret.is_empty() {
            for (name, value) in signature::headers(target.secret.expose(), body) {
                request = request.header(name, value);
            }
        }
        let sent = request.send().await;
        match sent {
            Ok(r) if r.status().is_success() => return,
            Ok(r) => tracing::warn!(status = %r.status(), attempt, "the receiver refused a sandbox callback"),
            Err(e) => tracing::warn!(error = %e, attempt, "a sandbox callback could not be delivered"),
        }
        tokio::time::sleep(pause).await;
        pause *= 2;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn silent_unreachable_drops_only_the_no_capability_callbacks() {
        let query: QueryJson = serde_json::from_value(json!({"app_id": "A", "request_id": "R", "recipient":
            {"identified_by": {"channel_identities": [{"channel": "SMS", "identity": "46700000001"},
                {"channel": "VIBER", "identity": "46700000006"}, {"channel": "RCS", "identity": "46700000008"}]}}}))
        .unwrap();
        assert_eq!(bodies("P", &query, false).len(), 3);
        let quiet = bodies("P", &query, true);
        assert_eq!(quiet.len(), 1);
        let only: Value = serde_json::from_slice(&quiet[0]).unwrap();
        assert_eq!(only["capability_notification"]["channel"], "SMS");
    }

    #[test]
    fn outcomes_follow_the_last_digit() {
        let status = |identity: &str| outcome("r", "", "SMS", identity)["capability_status"].clone();
        assert_eq!(status("46712312312"), "CAPABILITY_FULL");
        assert_eq!(status("46700000004"), "CAPABILITY_PARTIAL");
        assert_eq!(status("46700000006"), "NO_CAPABILITY");
        assert_eq!(status("46700000009"), "CAPABILITY_UNKNOWN");
        assert_eq!(status("someone"), "CAPABILITY_UNKNOWN");
        assert_eq!(
            outcome("r", "", "SMS", "46700000008")["reason"]["code"],
            "RECIPIENT_NOT_OPTED_IN"
        );
        assert_eq!(
            outcome("r", "", "SMS", "46700000005")["channel_capabilities"],
            json!(["TEXT", "MEDIA"])
        );
    }
}
