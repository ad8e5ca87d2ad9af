//! Sinch's JSON, exactly as documented: the query body, its answer, error bodies and the token answer.
//! Shared with the sandbox, which must speak the same wire format.

use std::time::Duration;

use base64::Engine;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::capability::{Channel, ChannelIdentity, Query, QueryAccepted, Recipient};

/// The body of `POST /v1/projects/{project}/capability:query`, and Sinch's answer to it.
#[derive(Debug, Serialize, Deserialize)]
pub struct QueryJson {
    pub app_id: String,
    pub recipient: RecipientJson,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub request_id: String,
}

/// `{"contact_id": …}` or `{"identified_by": {"channel_identities": […]}}`.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum RecipientJson {
    ContactId(String),
    IdentifiedBy { channel_identities: Vec<IdentityJson> },
}

#[derive(Debug, Serialize, Deserialize)]
pub struct IdentityJson {
    pub channel: String,
    pub identity: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub app_id: String,
}

/// The answer of the OAuth2 token endpoint.
#[derive(Debug, Serialize, Deserialize)]
pub struct TokenJson {
    pub access_token: String,
    pub token_type: String,
    pub expires_in: u64,
    /// Space-separated scopes; Sinch sends it, possibly empty.
    #[serde(default)]
    pub scope: String,
}

/// `{"error": {"code": 400, "message": …, "status": …, "details": […]}}`. `details` items come both as
/// `{"@type": …, …}` and as `{"type_url": …, "value": …}`, so they are kept as plain JSON.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct ErrorBody {
    pub code: u16,
    #[serde(default)]
    pub message: String,
    #[serde(default)]
    pub status: String,
    #[serde(default)]
    pub details: Vec<serde_json::Value>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct ErrorJson {
    pub error: ErrorBody,
}

/// A webhook of Sinch's Webhooks API. Sinch sends every key (`secret` and `client_credentials` may be empty or
/// null; any that is null is read as empty); the secret comes back in clear text, so a value of this type is never
/// logged.
#[derive(Clone, Serialize, Deserialize)]
pub struct WebhookJson {
    #[serde(default, deserialize_with = "null_as_default")]
    pub id: String,
    #[serde(default, deserialize_with = "null_as_default")]
    pub app_id: String,
    #[serde(default, deserialize_with = "null_as_default")]
    pub target: String,
    #[serde(default, deserialize_with = "null_as_default")]
    pub target_type: String,
    #[serde(default, deserialize_with = "null_as_default")]
    pub secret: String,
    #[serde(default, deserialize_with = "null_as_default")]
    pub triggers: Vec<String>,
    #[serde(default)]
    pub client_credentials: Option<Value>,
}

impl std::fmt::Debug for WebhookJson {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhookJson")
            .field("id", &self.id)
            .field("app_id", &self.app_id)
            .field("target", &self.target)
            .field("target_type", &self.target_type)
            .field("secret", &if self.secret.is_empty() { "(none)" } else { "(set)" })
            .field("triggers", &self.triggers)
            .finish_non_exhaustive()
    }
}

/// A key sent as `null` (Sinch's webhooks may carry one where there is no value): read as the type's default.
fn null_as_default<'de, D, T>(deserializer: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de> + Default,
{
    Ok(Option::<T>::deserialize(deserializer)?.unwrap_or_default())
}

impl WebhookJson {
    /// Whether this webhook receives CAPABILITY callbacks: it has the trigger and posts them over `HTTP`, or says
    /// no type (Sinch's default, as the sandbox takes it; `DISMISS` sends nothing, and another type is not known to
    /// deliver: `webhook ensure` sets `HTTP`).
    pub fn wants_capability(&self) -> bool {
        matches!(self.target_type.as_str(), "HTTP" | "") && self.triggers.iter().any(|t| t == "CAPABILITY")
    }
}

/// `{"webhooks": […]}`; an app without webhooks may answer `{}`.
#[derive(Debug, Default, Deserialize)]
pub struct WebhookListJson {
    #[serde(default)]
    pub webhooks: Vec<WebhookJson>,
}

/// The longest wait an error may ask for that is taken as it is.
const MAX_RETRY_DELAY: Duration = Duration::from_secs(3600);

/// The wait a `google.rpc.RetryInfo` among an error's `details` asks for, in either shape Sinch sends:
/// `{"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "2s"}`, or
/// `{"type_url": "type.googleapis.com/google.rpc.RetryInfo", "value": …}` whose value is that same object, the
/// delay itself, or the base64 of the protobuf message. At most an hour.
pub fn retry_info(details: &[Value]) -> Option<Duration> {
    details.iter().find_map(|item| {
        let kind = item.get("@type").or_else(|| item.get("type_url"))?.as_str()?;
        if !kind.ends_with("google.rpc.RetryInfo") {
            return None;
        }
        let delay = match item.get("value") {
            None => delay_field(item)?,
            Some(Value::Object(_)) => delay_field(&item["value"])?,
            Some(Value::String(text)) => json_duration(text).or_else(|| protobuf_retry_info(text))?,
            Some(_) => return None,
        };
        Some(delay.min(MAX_RETRY_DELAY))
    })
}

/// `retryDelay` (or `retry_delay`) of a RetryInfo object: `"1.5s"` or `{"seconds": 1, "nanos": 500000000}`.
fn delay_field(object: &Value) -> Option<Duration> {
    match object.get("retryDelay").or_else(|| object.get("retry_delay"))? {
        Value::String(text) => json_duration(text),
        Value::Object(parts) => {
            let seconds = parts
                .get("seconds")
                .and_then(|s| s.as_u64().or_else(|| s.as_str()?.parse().ok()));
            let nanos = parts.get("nanos").and_then(Value::as_u64).unwrap_or(0);
            Some(Duration::from_secs(seconds.unwrap_or(0)) + Duration::from_nanos(nanos.min(999_999_999)))
        }
        _ => None,
    }
}

/// A protobuf JSON duration: decimal seconds followed by `s`.
fn json_duration(text: &str) -> Option<Duration> {
    let seconds: f64 = text.trim().strip_suffix('s')?.parse().ok()?;
    (seconds.is_finite() && seconds >= 0.0).then(|| Duration::from_secs_f64(seconds.min(MAX_RETRY_DELAY.as_secs_f64())))
}

/// `google.rpc.RetryInfo` as protobuf bytes.
#[derive(Clone, PartialEq, prost::Message)]
struct RetryInfoProto {
    #[prost(message, optional, tag = "1")]
    retry_delay: Option<prost_types::Duration>,
}

fn protobuf_retry_info(base64_value: &str) -> Option<Duration> {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(base64_value.trim())
        .ok()?;
    let delay = <RetryInfoProto as prost::Message>::decode(bytes.as_slice())
        .ok()?
        .retry_delay?;
    let seconds = u64::try_from(delay.seconds).ok()?;
    let nanos = u64::try_from(delay.nanos).ok()?;
    Some(Duration::from_secs(seconds) + Duration::from_nanos(nanos.min(999_999_999)))
}

// === impl QueryJson ===

impl From<&Query> for QueryJson {
    fn from(q: &Query) -> Self {
        QueryJson {
            app_id: q.app_id.clone(),
            recipient: (&q.recipient).into(),
            request_id: q.request_id.clone(),
        }
    }
}

impl From<&QueryAccepted> for QueryJson {
    fn from(q: &QueryAccepted) -> Self {
        QueryJson {
            app_id: q.app_id.clone(),
            recipient: (&q.recipient).into(),
            request_id: q.request_id.clone(),
        }
    }
}

impl From<QueryJson> for QueryAccepted {
    fn from(q: QueryJson) -> Self {
        QueryAccepted {
            app_id: q.app_id,
            recipient: q.recipient.into(),
            request_id: q.request_id,
        }
    }
}

impl From<&Recipient> for RecipientJson {
    fn from(r: &Recipient) -> Self {
        match r {
            Recipient::ContactId(id) => RecipientJson::ContactId(id.clone()),
            Recipient::IdentifiedBy(ids) => RecipientJson::IdentifiedBy {
                channel_identities: ids
                    .iter()
                    .map(|id| IdentityJson {
                        channel: id.channel.as_sinch().to_owned(),
                        identity: id.identity.clone(),
                        app_id: id.app_id.clone(),
                    })
                    .collect(),
            },
        }
    }
}

impl From<RecipientJson> for Recipient {
    fn from(r: RecipientJson) -> Self {
        match r {
            RecipientJson::ContactId(id) => Recipient::ContactId(id),
            RecipientJson::IdentifiedBy { channel_identities } => Recipient::IdentifiedBy(
                channel_identities
                    .into_iter()
                    .map(|id| ChannelIdentity {
                        channel: Channel::from_sinch(&id.channel),
                        identity: id.identity,
                        app_id: id.app_id,
                    })
                    .collect(),
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_info_is_read_in_every_shape_sinch_sends() {
        let secs = Duration::from_secs;
        let at_type = serde_json::json!([{"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "X"},
            {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "2s"}]);
        assert_eq!(retry_info(at_type.as_array().unwrap()), Some(secs(2)));
        let nested = serde_json::json!([{"type_url": "type.googleapis.com/google.rpc.RetryInfo",
            "value": {"retry_delay": {"seconds": 1, "nanos": 500_000_000}}}]);
        assert_eq!(
            retry_info(nested.as_array().unwrap()),
            Some(Duration::from_millis(1500))
        );
        let plain = serde_json::json!([{"type_url": "type.googleapis.com/google.rpc.RetryInfo", "value": "0.25s"}]);
        assert_eq!(retry_info(plain.as_array().unwrap()), Some(Duration::from_millis(250)));
        let proto = RetryInfoProto {
            retry_delay: Some(prost_types::Duration { seconds: 3, nanos: 0 }),
        };
        let encoded = base64::engine::general_purpose::STANDARD.encode(prost::Message::encode_to_vec(&proto));
        let packed = serde_json::json!([{"type_url": "type.googleapis.com/google.rpc.RetryInfo", "value": encoded}]);
        assert_eq!(retry_info(packed.as_array().unwrap()), Some(secs(3)));
        let huge =
            serde_json::json!([{"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "99999999s"}]);
        assert_eq!(retry_info(huge.as_array().unwrap()), Some(MAX_RETRY_DELAY));
        let none = serde_json::json!([{"@type": "type.googleapis.com/google.rpc.ErrorInfo"}, {"value": "2s"}, 3]);
        assert_eq!(retry_info(none.as_array().unwrap()), None);
    }

    #[test]
    fn both_recipient_forms_serialise_as_sinch_documents() {
        let q = Query {
            app_id: "APP".into(),
            recipient: Recipient::ContactId("C1".into()),
            request_id: "R1".into(),
        };
        assert_eq!(
            serde_json::to_value(QueryJson::from(&q)).unwrap(),
            serde_json::json!({"app_id": "APP", "recipient": {"contact_id": "C1"}, "request_id": "R1"})
        );
        let q = Query {
            recipient: Recipient::IdentifiedBy(vec![ChannelIdentity {
                channel: Channel::Whatsapp,
                identity: "46712312312".into(),
                app_id: String::new(),
            }]),
            ..q
        };
        assert_eq!(
            serde_json::to_value(QueryJson::from(&q)).unwrap(),
            serde_json::json!({"app_id": "APP", "recipient": {"identified_by": {"channel_identities": [
                {"channel": "WHATSAPP", "identity": "46712312312"}]}}, "request_id": "R1"})
        );
    }
}
