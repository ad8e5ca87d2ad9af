//! Sinch's JSON, exactly as documented: the query body, its answer, error bodies and the token answer.
//! Shared with the sandbox, which must speak the same wire format.

use serde::{Deserialize, Serialize};

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
}

/// `{"error": {"code": 400, "message": …, "status": …}}`; `details` is ignored.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct ErrorBody {
    pub code: u16,
    #[serde(default)]
    pub message: String,
    #[serde(default)]
    pub status: String,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct ErrorJson {
    pub error: ErrorBody,
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
