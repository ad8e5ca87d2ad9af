//! Protobuf ⇄ domain conversion, with the validation of what callers send. Every violation names its field by
//! its path in the request, as `google.rpc.BadRequest` expects.

use std::time::Duration;

use crate::{
    capability::{ChannelIdentity, MAX_REQUEST_ID_LEN, Notification, QueryAccepted, Recipient},
    grpc::pb,
    hub::{CompletionReason, WatchEvent},
    query::QueryRequest,
};

/// The most channel identities one query may carry.
pub const MAX_IDENTITIES: usize = 100;
/// The longest app id, contact id or identity accepted.
pub const MAX_FIELD_LEN: usize = 256;

/// One thing wrong with a request: the field's path and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldViolation {
    pub field: String,
    pub description: String,
}

pub fn violation(field: impl Into<String>, description: impl Into<String>) -> FieldViolation {
    FieldViolation {
        field: field.into(),
        description: description.into(),
    }
}

/// Checks a QueryCapability request and turns it into the domain's; every violation found is reported.
pub fn query_request(request: pb::QueryCapabilityRequest) -> Result<QueryRequest, Vec<FieldViolation>> {
    let mut violations = Vec::new();
    check_text(&mut violations, "app_id", &request.app_id, true);
    let recipient = match request.recipient.and_then(|r| r.recipient) {
        None => {
            violations.push(violation(
                "recipient",
                "required: set exactly one of recipient.contact_id or recipient.identified_by",
            ));
            None
        }
        Some(pb::recipient::Recipient::ContactId(id)) => {
            check_text(&mut violations, "recipient.contact_id", &id, true);
            Some(Recipient::ContactId(id))
        }
        Some(pb::recipient::Recipient::IdentifiedBy(by)) => {
            identities(&mut violations, by.channel_identities).map(Recipient::IdentifiedBy)
        }
    };
    violations.extend(check_request_id(&request.request_id, false).err());
    let request_id = (!request.request_id.is_empty()).then_some(request.request_id);
    match recipient {
        Some(recipient) if violations.is_empty() => Ok(QueryRequest {
            app_id: request.app_id,
            recipient,
            request_id,
        }),
        _ => Err(violations),
    }
}

/// A WatchCapability's wait: `default` when absent, never above `max`; negative or malformed durations refused.
pub fn wait(wait: Option<prost_types::Duration>, default: Duration, max: Duration) -> Result<Duration, FieldViolation> {
    let Some(wait) = wait else {
        return Ok(default.min(max));
    };
    if wait.seconds < 0 || wait.nanos < 0 {
        return Err(violation("wait", "must not be negative"));
    }
    if wait.nanos >= 1_000_000_000 {
        return Err(violation("wait", "nanos must be below one second"));
    }
    Ok(Duration::new(wait.seconds as u64, wait.nanos as u32).min(max))
}

/// Checks a request_id: at most 128 characters, no control characters, and present when `required`.
pub fn check_request_id(request_id: &str, required: bool) -> Result<(), FieldViolation> {
    let chars = request_id.chars().count();
    if chars == 0 && required {
        Err(violation(
            "request_id",
            "required: the request_id returned by QueryCapability",
        ))
    } else if chars > MAX_REQUEST_ID_LEN {
        Err(violation(
            "request_id",
            format!("at most {MAX_REQUEST_ID_LEN} characters, got {chars}"),
        ))
    } else if request_id.chars().any(char::is_control) {
        Err(violation("request_id", "must not contain control characters"))
    } else {
        Ok(())
    }
}

fn identities(violations: &mut Vec<FieldViolation>, ids: Vec<pb::ChannelIdentity>) -> Option<Vec<ChannelIdentity>> {
    const FIELD: &str = "recipient.identified_by.channel_identities";
    if ids.is_empty() {
        violations.push(violation(FIELD, "at least one channel identity is required"));
        return None;
    }
    if ids.len() > MAX_IDENTITIES {
        violations.push(violation(
            FIELD,
            format!("at most {MAX_IDENTITIES} channel identities, got {}", ids.len()),
        ));
        return None;
    }
    let before = violations.len();
    let converted: Vec<ChannelIdentity> = ids
        .into_iter()
        .enumerate()
        .map(|(i, id)| {
            let channel = channel_name(violations, &format!("{FIELD}[{i}]"), id.channel, &id.channel_raw);
            check_text(violations, &format!("{FIELD}[{i}].identity"), &id.identity, true);
            check_text(violations, &format!("{FIELD}[{i}].app_id"), &id.app_id, false);
            ChannelIdentity {
                channel: channel.unwrap_or_default(),
                identity: id.identity,
                app_id: id.app_id,
            }
        })
        .collect();
    (violations.len() == before).then_some(converted)
}

/// The channel as Sinch spells it, from the typed value or the raw one.
fn channel_name(violations: &mut Vec<FieldViolation>, path: &str, channel: i32, raw: &str) -> Option<String> {
    let typed = match pb::Channel::try_from(channel) {
        Ok(pb::Channel::Unspecified) => None,
        Ok(c) => Some(sinch_channel(c)),
        Err(_) => {
            violations.push(violation(
                format!("{path}.channel"),
                format!("{channel} is not a Channel value; use channel_raw for channels this contract does not list"),
            ));
            return None;
        }
    };
    match (typed, raw) {
        (None, "") => {
            violations.push(violation(
                format!("{path}.channel"),
                "required: set channel (or channel_raw)",
            ));
            None
        }
        (Some(t), "") => Some(t.to_owned()),
        (typed, raw) => {
            if raw.is_empty()
                || raw.len() > 64
                || !raw
                    .bytes()
                    .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_')
            {
                violations.push(violation(
                    format!("{path}.channel_raw"),
                    "must be a channel name as Sinch spells it: upper-case letters, digits and '_', at most 64",
                ));
                return None;
            }
            if typed.is_some_and(|t| t != raw) {
                violations.push(violation(
                    format!("{path}.channel_raw"),
                    "names a different channel than channel; set one of them, or both alike",
                ));
                return None;
            }
            Some(raw.to_owned())
        }
    }
}

fn check_text(violations: &mut Vec<FieldViolation>, field: &str, value: &str, required: bool) {
    if value.is_empty() {
        if required {
            violations.push(violation(field, "required"));
        }
    } else if value.trim().is_empty() {
        violations.push(violation(field, "must not be blank (leave it empty to omit it)"));
    } else if value.len() > MAX_FIELD_LEN {
        violations.push(violation(
            field,
            format!("at most {MAX_FIELD_LEN} bytes, got {}", value.len()),
        ));
    } else if value.chars().any(char::is_control) {
        violations.push(violation(field, "must not contain control characters"));
    }
}

/// Sinch's spelling of a typed channel: the enum name without its `CHANNEL_` prefix.
pub fn sinch_channel(channel: pb::Channel) -> &'static str {
    channel
        .as_str_name()
        .strip_prefix("CHANNEL_")
        .expect("every Channel value is prefixed")
}

/// The typed channel for Sinch's spelling; `Unspecified` for one this contract does not list.
pub fn typed_channel(sinch: &str) -> pb::Channel {
    if sinch.is_empty() || sinch.len() > 64 {
        return pb::Channel::Unspecified;
    }
    pb::Channel::from_str_name(&format!("CHANNEL_{sinch}")).unwrap_or(pb::Channel::Unspecified)
}

pub fn recipient(recipient: Recipient) -> pb::Recipient {
    pb::Recipient {
        recipient: Some(match recipient {
            Recipient::ContactId(id) => pb::recipient::Recipient::ContactId(id),
            Recipient::IdentifiedBy(ids) => pb::recipient::Recipient::IdentifiedBy(pb::IdentifiedBy {
                channel_identities: ids.into_iter().map(channel_identity).collect(),
            }),
        }),
    }
}

pub fn channel_identity(id: ChannelIdentity) -> pb::ChannelIdentity {
    pb::ChannelIdentity {
        channel: typed_channel(&id.channel).into(),
        identity: id.identity,
        app_id: id.app_id,
        channel_raw: id.channel,
    }
}

pub fn query_response(accepted: QueryAccepted) -> pb::QueryCapabilityResponse {
    pb::QueryCapabilityResponse {
        app_id: accepted.app_id,
        recipient: Some(recipient(accepted.recipient)),
        request_id: accepted.request_id,
    }
}

/// The typed status for Sinch's spelling; `Unspecified` for one this contract does not list.
pub fn typed_status(sinch: &str) -> pb::CapabilityStatus {
    match sinch {
        "CAPABILITY_UNKNOWN" => pb::CapabilityStatus::Unknown,
        "CAPABILITY_FULL" => pb::CapabilityStatus::Full,
        "CAPABILITY_PARTIAL" => pb::CapabilityStatus::Partial,
        "NO_CAPABILITY" => pb::CapabilityStatus::NoCapability,
        _ => pb::CapabilityStatus::Unspecified,
    }
}

/// A notification as the contract carries it, at its offset.
pub fn notification(offset: u64, n: &Notification) -> pb::CapabilityNotification {
    pb::CapabilityNotification {
        offset,
        request_id: n.request_id.clone(),
        contact_id: n.contact_id.clone(),
        channel: typed_channel(&n.channel).into(),
        channel_raw: n.channel.clone(),
        identity: n.identity.clone(),
        capability_status: typed_status(&n.capability_status).into(),
        capability_status_raw: n.capability_status.clone(),
        channel_capabilities: n.channel_capabilities.clone(),
        reason: n.reason.as_ref().map(|r| pb::Reason {
            code: r.code.clone(),
            description: r.description.clone(),
            sub_code: r.sub_code.clone(),
            channel_code: r.channel_code.clone(),
        }),
        channel_recipient_identities: n
            .channel_recipient_identities
            .iter()
            .map(|r| pb::ChannelRecipientIdentity {
                channel_identity: Some(channel_identity(ChannelIdentity {
                    channel: r.channel.clone(),
                    identity: r.identity.clone(),
                    app_id: r.app_id.clone(),
                })),
                display_name: r.display_name.clone(),
            })
            .collect(),
        app_id: n.app_id.clone(),
        project_id: n.project_id.clone(),
        accepted_time: n.accepted_time.map(Into::into),
        event_time: n.event_time.map(Into::into),
        message_metadata: n.message_metadata.clone(),
        correlation_id: n.correlation_id.clone(),
        receive_time: Some(n.received_time.into()),
    }
}

/// A watch event as a stream message, or the status that ends the stream.
pub fn watch_event(event: WatchEvent) -> Result<pb::WatchCapabilityResponse, tonic::Status> {
    use pb::watch_capability_response::Event;
    let event = match event {
        WatchEvent::Notification {
            offset,
            notification: n,
        } => Event::Notification(notification(offset, &n)),
        WatchEvent::Heartbeat { last_offset } => Event::Heartbeat(pb::Heartbeat { last_offset }),
        WatchEvent::Completed {
            reason,
            last_offset,
            pending,
        } => Event::Completion(pb::Completion {
            reason: match reason {
                CompletionReason::AllChannelsReported => pb::CompletionReason::AllChannelsReported,
                CompletionReason::WaitElapsed => pb::CompletionReason::WaitElapsed,
            }
            .into(),
            last_offset,
            pending_channels: pending,
        }),
        WatchEvent::ShuttingDown { last_offset } => {
            return Err(tonic::Status::unavailable(format!(
                "the server is shutting down; last_offset={last_offset}: watch again (on any replica) with \
                 after_offset={last_offset}"
            )));
        }
        WatchEvent::Evicted { last_offset } => {
            return Err(tonic::Status::aborted(format!(
                "this request was evicted from the server (too many tracked requests); last_offset={last_offset}"
            )));
        }
    };
    Ok(pb::WatchCapabilityResponse { event: Some(event) })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity(channel: pb::Channel, raw: &str, identity: &str) -> pb::ChannelIdentity {
        pb::ChannelIdentity {
            channel: channel.into(),
            identity: identity.into(),
            app_id: String::new(),
            channel_raw: raw.into(),
        }
    }

    fn by(ids: Vec<pb::ChannelIdentity>) -> pb::QueryCapabilityRequest {
        pb::QueryCapabilityRequest {
            app_id: "APP".into(),
            recipient: Some(pb::Recipient {
                recipient: Some(pb::recipient::Recipient::IdentifiedBy(pb::IdentifiedBy {
                    channel_identities: ids,
                })),
            }),
            request_id: String::new(),
        }
    }

    fn fields(request: pb::QueryCapabilityRequest) -> Vec<String> {
        query_request(request)
            .unwrap_err()
            .into_iter()
            .map(|v| v.field)
            .collect()
    }

    #[test]
    fn channels_map_both_ways_by_name() {
        assert_eq!(sinch_channel(pb::Channel::Whatsapp), "WHATSAPP");
        assert_eq!(typed_channel("KAKAOTALKCHAT"), pb::Channel::Kakaotalkchat);
        assert_eq!(typed_channel("CARRIER_PIGEON"), pb::Channel::Unspecified);
    }

    #[test]
    fn a_raw_channel_travels_when_the_enum_does_not_know_it() {
        let q = query_request(by(vec![identity(pb::Channel::Unspecified, "NEWCHAN", "1")])).unwrap();
        let Recipient::IdentifiedBy(ids) = q.recipient else {
            panic!()
        };
        assert_eq!(ids[0].channel, "NEWCHAN");
    }

    #[test]
    fn violations_name_their_fields() {
        assert_eq!(fields(pb::QueryCapabilityRequest::default()), ["app_id", "recipient"]);
        assert_eq!(fields(by(vec![])), ["recipient.identified_by.channel_identities"]);
        assert_eq!(
            fields(by(vec![
                identity(pb::Channel::Sms, "", "1"),
                identity(pb::Channel::Unspecified, "", ""),
                identity(pb::Channel::Rcs, "SMS", "1"),
            ])),
            [
                "recipient.identified_by.channel_identities[1].channel",
                "recipient.identified_by.channel_identities[1].identity",
                "recipient.identified_by.channel_identities[2].channel_raw",
            ]
        );
        let mut long_id = by(vec![identity(pb::Channel::Sms, "", "1")]);
        long_id.request_id = "x".repeat(129);
        assert_eq!(fields(long_id), ["request_id"]);
    }

    #[test]
    fn a_request_id_of_128_characters_is_accepted() {
        let mut request = by(vec![identity(pb::Channel::Sms, "", "1")]);
        request.request_id = "é".repeat(128);
        assert!(query_request(request).is_ok());
    }

    /// Found by the fuzzer: a whitespace-only optional field skipped every check, so a lone newline travelled
    /// to Sinch as an identity's app_id.
    #[test]
    fn a_blank_optional_field_is_refused_rather_than_forwarded() {
        let mut newline = identity(pb::Channel::Sms, "", "1");
        newline.app_id = "\n".into();
        assert_eq!(
            fields(by(vec![newline])),
            ["recipient.identified_by.channel_identities[0].app_id"]
        );
    }
}
