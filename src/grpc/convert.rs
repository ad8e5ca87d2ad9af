//! Protobuf ⇄ domain conversion, with the validation of what callers send. Every violation names its field by
//! its path in the request, as `google.rpc.BadRequest` expects.

use crate::{
    capability::{ChannelIdentity, MAX_REQUEST_ID_LEN, QueryAccepted, Recipient},
    grpc::pb,
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

fn violation(field: impl Into<String>, description: impl Into<String>) -> FieldViolation {
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
    let request_id = if request.request_id.is_empty() {
        None
    } else {
        let chars = request.request_id.chars().count();
        if chars > MAX_REQUEST_ID_LEN {
            violations.push(violation(
                "request_id",
                format!("at most {MAX_REQUEST_ID_LEN} characters, got {chars}"),
            ));
        } else if request.request_id.chars().any(char::is_control) {
            violations.push(violation("request_id", "must not contain control characters"));
        }
        Some(request.request_id)
    };
    match recipient {
        Some(recipient) if violations.is_empty() => Ok(QueryRequest {
            app_id: request.app_id,
            recipient,
            request_id,
        }),
        _ => Err(violations),
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
    if value.trim().is_empty() {
        if required {
            violations.push(violation(field, "required"));
        }
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
}
