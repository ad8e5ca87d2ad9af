//! The sandbox's CAPABILITY callbacks: one per channel, signed as Sinch signs, with deterministic outcomes.
//!
//! Outcome by the identity's last digit: 0–3 `CAPABILITY_FULL`; 4–5 `CAPABILITY_PARTIAL` (with
//! `channel_capabilities`); 6–7 `NO_CAPABILITY` (`RECIPIENT_NOT_REACHABLE`); 8 `NO_CAPABILITY`
//! (`RECIPIENT_NOT_OPTED_IN`); 9 or no digit `CAPABILITY_UNKNOWN`. Contact queries use the [`DEMO_CONTACTS`];
//! any other contact gets one `NO_CAPABILITY` callback with reason `CONTACT_NOT_FOUND`.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};

use crate::{
    config::SandboxSettings,
    secret::Secret,
    upstream::wire::{QueryJson, RecipientJson},
    webhook::signature,
};

/// Where and how the sandbox posts callbacks.
#[derive(Debug, Clone)]
pub struct CallbackTarget {
    /// The receiver's URL (`http://host:port/webhooks/sinch`).
    pub url: String,
    /// The secret the callbacks are signed with.
    pub secret: Secret,
    pub knobs: SandboxSettings,
    /// Accept the receiver's certificate whatever it is: only for the in-process sandbox posting to its own
    /// process's TLS listener on loopback, whose certificate need not name 127.0.0.1. The callbacks are signed.
    pub trust_own_listener: bool,
}

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

/// Every callback body a query produces, in Sinch's order.
pub fn bodies(project_id: &str, query: &QueryJson) -> Vec<Vec<u8>> {
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
        .map(|n| {
            let body = json!({"app_id": query.app_id, "accepted_time": now, "event_time": now,
                "project_id": project_id, "message_metadata": "", "capability_notification": n});
            serde_json::to_vec(&body).expect("JSON serialises")
        })
        .collect()
}

/// Posts `bodies` to the target after the configured delay, in order (or reversed), each once (or twice),
/// retrying a refused delivery a few times with back-off, as Sinch does.
pub async fn deliver(http: reqwest::Client, target: CallbackTarget, mut bodies: Vec<Vec<u8>>) {
    tokio::time::sleep(target.knobs.callback_delay).await;
    if target.knobs.reorder {
        bodies.reverse();
    }
    let copies = if target.knobs.duplicates { 2 } else { 1 };
    for body in &bodies {
        for _ in 0..copies {
            post(&http, &target, body).await;
        }
    }
}

async fn post(http: &reqwest::Client, target: &CallbackTarget, body: &[u8]) {
    let mut pause = Duration::from_millis(100);
    for attempt in 1..=6 {
        let nonce = ulid::Ulid::new().to_string();
        let timestamp = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs()
            .to_string();
        let signed = signature::sign(target.secret.expose(), body, &nonce, &timestamp);
        let sent = http
            .post(&target.url)
            .header("content-type", "application/json")
            .header(signature::SIGNATURE, signed)
            .header(signature::TIMESTAMP, timestamp)
            .header(signature::NONCE, nonce)
            .header(signature::ALGORITHM, signature::HMAC_SHA256)
            .body(body.to_vec())
            .send()
            .await;
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
