//! Domain types of a capability query and its results. No transport crate appears here.

use std::{fmt, time::SystemTime};

/// The longest `request_id` a caller may choose (AIP-155 allows any string; we bound it).
pub const MAX_REQUEST_ID_LEN: usize = 128;

/// A capability query, validated, with its `request_id` decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Query {
    pub app_id: String,
    pub recipient: Recipient,
    pub request_id: String,
}

impl Query {
    /// Whether `other` asks the same thing; the request_id is not part of the question.
    pub fn same_question(&self, other: &Query) -> bool {
        self.app_id == other.app_id && self.recipient == other.recipient
    }

    /// The channels that will report, when they are known in advance (identified_by queries), as Sinch spells
    /// them, each once.
    pub fn expected_channels(&self) -> Option<Vec<String>> {
        match &self.recipient {
            Recipient::ContactId(_) => None,
            Recipient::IdentifiedBy(ids) => {
                let mut channels: Vec<String> = ids.iter().map(|id| id.channel.clone()).collect();
                channels.sort();
                channels.dedup();
                Some(channels)
            }
        }
    }
}

/// Who a query is about.
#[derive(Clone, PartialEq, Eq)]
pub enum Recipient {
    ContactId(String),
    IdentifiedBy(Vec<ChannelIdentity>),
}

impl fmt::Debug for Recipient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Recipient::ContactId(id) => write!(f, "ContactId({})", mask(id)),
            Recipient::IdentifiedBy(ids) => f.debug_tuple("IdentifiedBy").field(ids).finish(),
        }
    }
}

/// One identity of a recipient on one channel. `channel` is spelled as Sinch spells it ("WHATSAPP").
#[derive(Clone, PartialEq, Eq)]
pub struct ChannelIdentity {
    pub channel: String,
    pub identity: String,
    /// For app-scoped identities; empty when not set.
    pub app_id: String,
}

impl fmt::Debug for ChannelIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.channel, mask(&self.identity))
    }
}

/// Sinch's acknowledgement of a query: the query echoed with its request_id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueryAccepted {
    pub app_id: String,
    pub recipient: Recipient,
    pub request_id: String,
}

/// One capability result, as Sinch reported it in a CAPABILITY callback. Every field is optional at Sinch;
/// missing text is empty here. Enumerated values are kept as Sinch spelled them.
#[derive(Clone, PartialEq, Eq)]
pub struct Notification {
    pub request_id: String,
    pub contact_id: String,
    pub channel: String,
    pub identity: String,
    pub capability_status: String,
    pub channel_capabilities: Vec<String>,
    pub reason: Option<Reason>,
    pub channel_recipient_identities: Vec<RecipientIdentity>,
    pub app_id: String,
    pub project_id: String,
    pub accepted_time: Option<SystemTime>,
    pub event_time: Option<SystemTime>,
    pub message_metadata: String,
    pub correlation_id: String,
    /// When a replica of this service first received the callback.
    pub received_time: SystemTime,
    /// A digest of the callback's body: two deliveries of the same callback have the same digest.
    pub digest: u64,
}

impl fmt::Debug for Notification {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Notification")
            .field("request_id", &self.request_id)
            .field("channel", &self.channel)
            .field("identity", &mask(&self.identity))
            .field("capability_status", &self.capability_status)
            .finish_non_exhaustive()
    }
}

/// Why a recipient is not (fully) reachable on a channel.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Reason {
    pub code: String,
    pub description: String,
    pub sub_code: String,
    pub channel_code: String,
}

/// A recipient's identity on a channel, as a notification reports it.
#[derive(Clone, PartialEq, Eq)]
pub struct RecipientIdentity {
    pub channel: String,
    pub identity: String,
    pub app_id: String,
    pub display_name: String,
}

impl fmt::Debug for RecipientIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.channel, mask(&self.identity))
    }
}

/// Masks an identity or phone number for logs: the first four and last two characters stay, the rest become
/// `*` (`46712312312` → `4671*****12`). Short values are masked whole.
pub fn mask(value: &str) -> String {
    let chars: Vec<char> = value.chars().collect();
    if chars.len() <= 6 {
        return "*".repeat(chars.len());
    }
    let hidden = chars.len() - 6;
    chars[..4]
        .iter()
        .chain(std::iter::repeat_n(&'*', hidden))
        .chain(&chars[chars.len() - 2..])
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mask_keeps_only_the_ends_of_a_phone_number() {
        assert_eq!(mask("46712312312"), "4671*****12");
        assert_eq!(mask("123456"), "******");
        assert_eq!(mask(""), "");
    }

    #[test]
    fn debug_output_never_shows_an_identity() {
        let r = Recipient::IdentifiedBy(vec![ChannelIdentity {
            channel: "WHATSAPP".into(),
            identity: "46712312312".into(),
            app_id: String::new(),
        }]);
        let shown = format!("{r:?}");
        assert!(!shown.contains("46712312312"), "{shown}");
        assert!(shown.contains("WHATSAPP:4671*****12"), "{shown}");
    }

    #[test]
    fn expected_channels_are_known_only_for_identities() {
        let id = |channel: &str| ChannelIdentity {
            channel: channel.into(),
            identity: "1".into(),
            app_id: String::new(),
        };
        let q = Query {
            app_id: "a".into(),
            recipient: Recipient::IdentifiedBy(vec![id("RCS"), id("WHATSAPP"), id("RCS")]),
            request_id: "r".into(),
        };
        assert_eq!(q.expected_channels(), Some(vec!["RCS".into(), "WHATSAPP".into()]));
        let q = Query {
            recipient: Recipient::ContactId("c".into()),
            ..q
        };
        assert_eq!(q.expected_channels(), None);
    }
}
