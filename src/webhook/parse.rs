//! A verified callback body → a [`Notification`]. Unknown fields are ignored, unknown enumeration values kept as
//! Sinch spelled them, `null` treated as absent.

use std::time::SystemTime;

use serde::Deserialize;

use crate::capability::{CapabilityStatus, Channel, Notification, Reason, RecipientIdentity};

/// What a verified callback turned out to be.
#[derive(Debug)]
pub enum Callback {
    /// A CAPABILITY notification to deliver.
    Capability(Box<Notification>),
    /// A CAPABILITY notification without a request_id: nobody can be waiting for it.
    WithoutRequestId,
    /// A callback of another trigger (message_delivery_report, contact_create_notification, …).
    OtherTrigger,
}

/// Why a body could not be read. It says where, never what: serde's own messages quote the offending value,
/// which may be a phone number.
#[derive(Debug, thiserror::Error)]
pub enum ParseError {
    #[error("the body is not valid UTF-8")]
    Utf8,
    #[error("the body is not the JSON of a Sinch callback ({category} at line {line}, column {column})")]
    Json {
        /// `syntax`, `data` (a field of the wrong type) or `eof`.
        category: &'static str,
        line: usize,
        column: usize,
    },
}

impl From<serde_json::Error> for ParseError {
    fn from(e: serde_json::Error) -> ParseError {
        let category = match e.classify() {
            serde_json::error::Category::Io => "io",
            serde_json::error::Category::Syntax => "syntax",
            serde_json::error::Category::Data => "data",
            serde_json::error::Category::Eof => "eof",
        };
        ParseError::Json {
            category,
            line: e.line(),
            column: e.column(),
        }
    }
}

#[derive(Deserialize)]
struct CallbackJson {
    app_id: Option<String>,
    project_id: Option<String>,
    accepted_time: Option<String>,
    event_time: Option<String>,
    message_metadata: Option<String>,
    correlation_id: Option<String>,
    capability_notification: Option<CapabilityJson>,
}

#[derive(Deserialize)]
struct CapabilityJson {
    request_id: Option<String>,
    contact_id: Option<String>,
    channel: Option<String>,
    identity: Option<String>,
    capability_status: Option<String>,
    channel_capabilities: Option<Vec<String>>,
    reason: Option<ReasonJson>,
    channel_recipient_identities: Option<Vec<RecipientIdentityJson>>,
}

#[derive(Deserialize)]
struct ReasonJson {
    code: Option<String>,
    description: Option<String>,
    sub_code: Option<String>,
    channel_code: Option<String>,
}

#[derive(Deserialize)]
struct RecipientIdentityJson {
    channel_identity: Option<ChannelIdentityJson>,
    display_name: Option<String>,
}

#[derive(Deserialize)]
struct ChannelIdentityJson {
    channel: Option<String>,
    identity: Option<String>,
    app_id: Option<String>,
}

/// Reads a verified body.
pub fn parse(body: &[u8], received_time: SystemTime) -> Result<Callback, ParseError> {
    let text = std::str::from_utf8(body).map_err(|_| ParseError::Utf8)?;
    let json: CallbackJson = serde_json::from_str(text)?;
    let Some(capability) = json.capability_notification else {
        return Ok(Callback::OtherTrigger);
    };
    let request_id = capability.request_id.unwrap_or_default();
    if request_id.is_empty() {
        return Ok(Callback::WithoutRequestId);
    }
    Ok(Callback::Capability(Box::new(Notification {
        request_id,
        contact_id: capability.contact_id.unwrap_or_default(),
        channel: Channel::from_sinch(&capability.channel.unwrap_or_default()),
        identity: capability.identity.unwrap_or_default(),
        capability_status: CapabilityStatus::from_sinch(&capability.capability_status.unwrap_or_default()),
        channel_capabilities: capability.channel_capabilities.unwrap_or_default(),
        reason: capability.reason.map(|r| Reason {
            code: r.code.unwrap_or_default(),
            description: r.description.unwrap_or_default(),
            sub_code: r.sub_code.unwrap_or_default(),
            channel_code: r.channel_code.unwrap_or_default(),
        }),
        channel_recipient_identities: capability
            .channel_recipient_identities
            .unwrap_or_default()
            .into_iter()
            .map(|r| {
                let id = r.channel_identity;
                RecipientIdentity {
                    channel: Channel::from_sinch(id.as_ref().and_then(|i| i.channel.as_deref()).unwrap_or_default()),
                    identity: id.as_ref().and_then(|i| i.identity.clone()).unwrap_or_default(),
                    app_id: id.and_then(|i| i.app_id).unwrap_or_default(),
                    display_name: r.display_name.unwrap_or_default(),
                }
            })
            .collect(),
        app_id: json.app_id.unwrap_or_default(),
        project_id: json.project_id.unwrap_or_default(),
        accepted_time: json.accepted_time.as_deref().and_then(timestamp),
        event_time: json.event_time.as_deref().and_then(timestamp),
        message_metadata: json.message_metadata.unwrap_or_default(),
        correlation_id: json.correlation_id.unwrap_or_default(),
        received_time,
    })))
}

fn timestamp(text: &str) -> Option<SystemTime> {
    humantime::parse_rfc3339_weak(text).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    const SPEC_EXAMPLE: &str = r#"{
      "app_id": "01EB37KMH2M6SV18ASNS3G135H",
      "accepted_time": "2020-11-17T16:05:51.724083Z",
      "event_time": "2020-11-17T16:05:45Z",
      "project_id": "",
      "message_metadata": "meta",
      "correlation_id": "corr",
      "unknown_top_level": {"ignored": true},
      "capability_notification": {
        "request_id": "01EQBF91XWP9PW1J8EWRYZ1GK2",
        "contact_id": "01EKA07N79THJ20ZSN6AS30TMW",
        "channel": "WHATSAPP",
        "identity": "12345678910",
        "capability_status": "CAPABILITY_PARTIAL",
        "channel_capabilities": ["TEXT", "MEDIA"],
        "reason": {"code": "RECIPIENT_NOT_OPTED_IN", "description": "d", "sub_code": "UNSPECIFIED_SUB_CODE",
                   "channel_code": "131047"},
        "channel_recipient_identities": [
          {"channel_identity": {"channel": "WHATSAPP", "identity": "12345678910"}, "display_name": "John Doe"}]
      }
    }"#;

    #[test]
    fn every_field_of_the_spec_example_is_read() {
        let Callback::Capability(n) = parse(SPEC_EXAMPLE.as_bytes(), SystemTime::UNIX_EPOCH).unwrap() else {
            panic!("a capability notification")
        };
        assert_eq!(n.request_id, "01EQBF91XWP9PW1J8EWRYZ1GK2");
        assert_eq!(n.contact_id, "01EKA07N79THJ20ZSN6AS30TMW");
        assert_eq!((&n.channel, n.identity.as_str()), (&Channel::Whatsapp, "12345678910"));
        assert_eq!(n.capability_status, CapabilityStatus::Partial);
        assert_eq!(n.channel_capabilities, ["TEXT", "MEDIA"]);
        let reason = n.reason.as_ref().unwrap();
        assert_eq!(
            (
                reason.code.as_str(),
                reason.description.as_str(),
                reason.sub_code.as_str(),
                reason.channel_code.as_str()
            ),
            ("RECIPIENT_NOT_OPTED_IN", "d", "UNSPECIFIED_SUB_CODE", "131047")
        );
        assert_eq!(n.channel_recipient_identities[0].display_name, "John Doe");
        assert_eq!(n.channel_recipient_identities[0].identity, "12345678910");
        assert_eq!(n.app_id, "01EB37KMH2M6SV18ASNS3G135H");
        assert_eq!(
            (n.message_metadata.as_str(), n.correlation_id.as_str()),
            ("meta", "corr")
        );
        let accepted = n.accepted_time.unwrap().duration_since(SystemTime::UNIX_EPOCH).unwrap();
        assert_eq!(accepted.as_micros(), 1_605_629_151_724_083);
        assert!(n.event_time.is_some());
    }

    #[test]
    fn other_triggers_and_missing_request_ids_are_told_apart() {
        let other = br#"{"app_id":"","project_id":"p","message_delivery_report":{"status":"DELIVERED"}}"#;
        assert!(matches!(
            parse(other, SystemTime::now()).unwrap(),
            Callback::OtherTrigger
        ));
        let no_id = br#"{"app_id":"a","project_id":"","capability_notification":{"channel":"SMS"}}"#;
        assert!(matches!(
            parse(no_id, SystemTime::now()).unwrap(),
            Callback::WithoutRequestId
        ));
    }

    #[test]
    fn nulls_are_absent_and_wrong_types_or_bytes_are_errors() {
        let nulls = br#"{"app_id":null,"capability_notification":{"request_id":"r","channel":null,"reason":null}}"#;
        assert!(matches!(
            parse(nulls, SystemTime::now()).unwrap(),
            Callback::Capability(_)
        ));
        let wrong = br#"{"app_id":"a","capability_notification":{"request_id":42}}"#;
        assert!(matches!(
            parse(wrong, SystemTime::now()),
            Err(ParseError::Json { category: "data", .. })
        ));
        assert!(matches!(
            parse(b"{\"app_id\":\"\xff\"}", SystemTime::now()),
            Err(ParseError::Utf8)
        ));
        assert!(matches!(
            parse(b"{\"app_id\":", SystemTime::now()),
            Err(ParseError::Json { category: "eof", .. })
        ));
    }

    #[test]
    fn a_parse_error_names_where_never_the_value() {
        let body =
            br#"{"app_id":"a","capability_notification":{"request_id":"r","channel_capabilities":"46788888888"}}"#;
        let message = parse(body, SystemTime::now()).unwrap_err().to_string();
        assert!(!message.contains("46788888888"), "{message}");
        assert!(message.contains("line 1"), "{message}");
    }
}
