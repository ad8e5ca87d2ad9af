//! A job's spec and answers as Redis keeps them: protobuf messages of their own (not the contract's), so that
//! the stored form changes only when this file does.

use std::time::Duration;

use prost::Message;

use super::JobSpec;
use crate::{
    capability::{Channel, ChannelIdentity, ChannelOrder, Recipient},
    check::{CheckAnswer, Source, answered},
};

#[derive(Clone, PartialEq, Message)]
pub struct StoredSpec {
    #[prost(string, tag = "1")]
    pub app_id: String,
    #[prost(message, repeated, tag = "2")]
    pub recipients: Vec<StoredRecipient>,
    #[prost(uint64, tag = "3")]
    pub max_age_ms: u64,
    #[prost(uint64, tag = "4")]
    pub wait_ms: u64,
    /// Channel spellings; empty: the server's order.
    #[prost(string, repeated, tag = "5")]
    pub preference: Vec<String>,
    #[prost(string, tag = "6")]
    pub request_id: String,
}

#[derive(Clone, PartialEq, Message)]
pub struct StoredRecipient {
    /// Set for a contact; else `identities`.
    #[prost(string, tag = "1")]
    pub contact_id: String,
    #[prost(message, repeated, tag = "2")]
    pub identities: Vec<StoredIdentity>,
}

#[derive(Clone, PartialEq, Message)]
pub struct StoredIdentity {
    #[prost(string, tag = "1")]
    pub channel: String,
    #[prost(string, tag = "2")]
    pub identity: String,
    #[prost(string, tag = "3")]
    pub app_id: String,
}

#[derive(Clone, PartialEq, Message)]
pub struct StoredAnswer {
    #[prost(message, repeated, tag = "1")]
    pub results: Vec<StoredResult>,
    #[prost(bool, tag = "2")]
    pub complete: bool,
    #[prost(message, repeated, tag = "3")]
    pub pending: Vec<StoredIdentity>,
    #[prost(message, repeated, tag = "4")]
    pub recommended: Vec<StoredIdentity>,
    #[prost(string, tag = "5")]
    pub request_id: String,
    #[prost(message, repeated, tag = "6")]
    pub pending_lookups: Vec<StoredLookup>,
}

/// A pending identity and the request_id its late result comes under.
#[derive(Clone, PartialEq, Message)]
pub struct StoredLookup {
    #[prost(message, optional, tag = "1")]
    pub identity: Option<StoredIdentity>,
    #[prost(string, tag = "2")]
    pub request_id: String,
}

#[derive(Clone, PartialEq, Message)]
pub struct StoredResult {
    /// 1 cache, 2 live, 3 shared.
    #[prost(uint32, tag = "1")]
    pub source: u32,
    #[prost(uint64, tag = "2")]
    pub offset: u64,
    #[prost(string, tag = "3")]
    pub request_id: String,
    #[prost(bytes = "vec", tag = "4")]
    pub body: Vec<u8>,
}

fn identity(id: &ChannelIdentity) -> StoredIdentity {
    StoredIdentity {
        channel: id.channel.as_sinch().to_owned(),
        identity: id.identity.clone(),
        app_id: id.app_id.clone(),
    }
}

fn channel_identity(id: StoredIdentity) -> ChannelIdentity {
    ChannelIdentity {
        channel: Channel::from_sinch(&id.channel),
        identity: id.identity,
        app_id: id.app_id,
    }
}

/// The bytes of `spec`.
pub fn encode_spec(spec: &JobSpec) -> Vec<u8> {
    StoredSpec {
        app_id: spec.app_id.clone(),
        recipients: spec
            .recipients
            .iter()
            .map(|r| match r {
                Recipient::ContactId(contact) => StoredRecipient {
                    contact_id: contact.clone(),
                    identities: Vec::new(),
                },
                Recipient::IdentifiedBy(ids) => StoredRecipient {
                    contact_id: String::new(),
                    identities: ids.iter().map(identity).collect(),
                },
            })
            .collect(),
        max_age_ms: spec.max_age.as_millis() as u64,
        wait_ms: spec.wait.as_millis() as u64,
        preference: spec
            .preference
            .iter()
            .flat_map(|order| order.0.iter().map(|c| c.as_sinch().to_owned()))
            .collect(),
        request_id: spec.request_id.clone().unwrap_or_default(),
    }
    .encode_to_vec()
}

/// Reads what [`encode_spec`] wrote.
pub fn decode_spec(bytes: &[u8]) -> Result<JobSpec, prost::DecodeError> {
    let stored = StoredSpec::decode(bytes)?;
    Ok(JobSpec {
        app_id: stored.app_id,
        recipients: stored
            .recipients
            .into_iter()
            .map(|r| match r.identities.is_empty() {
                true => Recipient::ContactId(r.contact_id),
                false => Recipient::IdentifiedBy(r.identities.into_iter().map(channel_identity).collect()),
            })
            .collect(),
        max_age: Duration::from_millis(stored.max_age_ms),
        wait: Duration::from_millis(stored.wait_ms),
        preference: (!stored.preference.is_empty())
            .then(|| ChannelOrder(stored.preference.iter().map(|c| Channel::from_sinch(c)).collect())),
        request_id: Some(stored.request_id).filter(|id| !id.is_empty()),
    })
}

/// The bytes of `answer`.
pub fn encode_answer(answer: &CheckAnswer) -> Vec<u8> {
    StoredAnswer {
        results: answer
            .results
            .iter()
            .map(|r| StoredResult {
                source: match r.source {
                    Source::Cache => 1,
                    Source::Live => 2,
                    Source::Shared => 3,
                },
                offset: r.offset,
                request_id: r.request_id.clone(),
                body: r.body.clone(),
            })
            .collect(),
        complete: answer.complete,
        pending: answer.pending.iter().map(identity).collect(),
        recommended: answer.recommended.iter().map(identity).collect(),
        request_id: answer.request_id.clone(),
        pending_lookups: answer
            .pending_lookups
            .iter()
            .map(|(id, request_id)| StoredLookup {
                identity: Some(identity(id)),
                request_id: request_id.to_string(),
            })
            .collect(),
    }
    .encode_to_vec()
}

/// Reads what [`encode_answer`] wrote.
pub fn decode_answer(bytes: &[u8]) -> Result<CheckAnswer, prost::DecodeError> {
    let stored = StoredAnswer::decode(bytes)?;
    Ok(CheckAnswer {
        results: stored
            .results
            .into_iter()
            .filter_map(|r| {
                let source = match r.source {
                    1 => Source::Cache,
                    3 => Source::Shared,
                    _ => Source::Live,
                };
                answered(source, r.offset, r.request_id, r.body)
            })
            .collect(),
        complete: stored.complete,
        pending: stored.pending.into_iter().map(channel_identity).collect(),
        recommended: stored.recommended.into_iter().map(channel_identity).collect(),
        request_id: stored.request_id,
        pending_lookups: stored
            .pending_lookups
            .into_iter()
            .filter_map(|l| Some((channel_identity(l.identity?), l.request_id.into())))
            .collect(),
        ..CheckAnswer::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_answer_reads_back_with_its_pending_identities_lookups() {
        let sms = ChannelIdentity {
            channel: Channel::Sms,
            identity: "46700000001".into(),
            app_id: String::new(),
        };
        let answer = CheckAnswer {
            pending: vec![sms.clone()],
            pending_lookups: vec![(sms, "joined".into())],
            request_id: "own".into(),
            ..CheckAnswer::default()
        };
        let read = decode_answer(&encode_answer(&answer)).unwrap();
        assert_eq!(read.pending, answer.pending);
        assert_eq!(read.pending_lookups, answer.pending_lookups);
    }
}
