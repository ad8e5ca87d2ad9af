//! The log's one encoder and decoder, and the notification digest.
//!
//! An encoded event is a version byte followed by a protobuf message of that version. A reader that meets a
//! version it does not know skips the entry and counts it (`capability_log_skipped_total`), so a rolling
//! upgrade can introduce version 2 while version-1 readers still run.
//!
//! A notification's fields are encoded with the field numbers and types of the contract's
//! `capability.v1.CapabilityNotification` (all but `offset` and `request_id`): the bytes a hub keeps for a
//! notification are, as they stand, a valid encoding of that message, ready to be completed with the two
//! fields the hub knows and sent. A log event carries every `…_raw` spelling, so that a build that does not know
//! an enum number another build wrote still reads the value; the hub's compact copy
//! ([`encode_compact_body`]) keeps them only where the number is 0, and the gRPC side spells the rest out.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prost::Message;
use sha2::{Digest as _, Sha256};

use crate::capability::{CapabilityStatus, Channel, Notification, Reason, RecipientIdentity};

/// The version this build writes.
pub const VERSION: u8 = 1;

/// What the log carries.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// A query went through this service: its expected channels, when they are known in advance.
    QueryRecorded(QueryRecorded),
    /// A verified CAPABILITY callback.
    NotificationReceived(Box<NotificationReceived>),
}

/// See [`Event::QueryRecorded`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueryRecorded {
    pub request_id: String,
    /// `None` for contact_id queries: their channels are not known in advance.
    pub expected: Option<Vec<Channel>>,
    /// For a `late` record, where its question stands among the request_id's others, in milliseconds since the
    /// Unix epoch, by the log's clock (one clock for a request_id's records, its stream's): its first append's time
    /// in the log, or, never appended before, when Redis refused it (Redis's clock when it is appended, less the
    /// time since, by this replica's steady clock). Set by the log; 0 from a build before.
    pub asked_ms: u64,
    /// Appended again (after an outage), or only once Redis took it after refusing it at first: its place in the
    /// log may follow a later question's, and `asked_ms` says where it stands. A record appended at once stands
    /// where the log holds it, whatever the replicas' clocks.
    pub late: bool,
}

/// See [`Event::NotificationReceived`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NotificationReceived {
    pub notification: Notification,
    /// What makes two notifications the same result (see [`Digest::of`]).
    pub digest: Digest,
}

/// Why bytes read from the log are not an event this build can use.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("an empty entry")]
    Empty,
    #[error("version {0}, which this build does not know")]
    UnknownVersion(u8),
    #[error("not a version-1 event: {0}")]
    Malformed(String),
}

/// The semantic identity of a notification: equal digests are the same result, whatever the bytes Sinch sent
/// (a redelivery, or the second registration of a retried query, differs only in times).
///
/// Digest version 1, fixed for every build: SHA-256 over, in this order, the request_id, the channel and the
/// identity, the capability_status (channel and status as Sinch spells them), and the reason's code, sub_code,
/// channel_code and description (empty when there is no reason), each as its length in bytes (u32, big
/// endian) followed by its UTF-8 bytes; the first 16 bytes of the hash.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Digest(pub [u8; 16]);

impl Digest {
    /// The digest of `n`.
    pub fn of(n: &Notification) -> Digest {
        let reason = n.reason.clone().unwrap_or_default();
        let mut hash = Sha256::new();
        for field in [
            n.request_id.as_str(),
            n.channel.as_sinch(),
            &n.identity,
            n.capability_status.as_sinch(),
            &reason.code,
            &reason.sub_code,
            &reason.channel_code,
            &reason.description,
        ] {
            hash.update((field.len() as u32).to_be_bytes());
            hash.update(field.as_bytes());
        }
        let mut digest = [0; 16];
        digest.copy_from_slice(&hash.finalize()[..16]);
        Digest(digest)
    }

    /// Lower-case hexadecimal, as it appears in Redis.
    pub fn hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }
}

impl std::fmt::Debug for Digest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.hex())
    }
}

/// Encodes `event` in this build's version.
pub fn encode(event: &Event) -> Vec<u8> {
    let message = match event {
        Event::QueryRecorded(q) => EventV1 {
            event: Some(event_v1::Event::Query(QueryV1 {
                request_id: q.request_id.clone(),
                expected_known: q.expected.is_some(),
                expected: q.expected.iter().flatten().map(|c| c.as_sinch().to_owned()).collect(),
                asked_ms: q.asked_ms,
                late: q.late,
            })),
        },
        Event::NotificationReceived(n) => EventV1 {
            event: Some(event_v1::Event::Notification(NotificationV1 {
                request_id: n.notification.request_id.clone(),
                digest: n.digest.0.to_vec(),
                body: encode_body(&n.notification),
            })),
        },
    };
    let mut bytes = Vec::with_capacity(1 + message.encoded_len());
    bytes.push(VERSION);
    message.encode(&mut bytes).expect("a Vec grows as needed");
    bytes
}

/// A decoded event, with the compact encoding of its notification (see [`encode_body`]) kept as it was read.
#[derive(Debug, Clone, PartialEq)]
pub struct Decoded {
    pub event: Event,
    /// For a notification: its fields without `offset` and `request_id`, as the contract encodes them.
    pub body: Option<Vec<u8>>,
}

/// Decodes an entry written by any build that wrote a version this build knows.
pub fn decode(bytes: &[u8]) -> Result<Decoded, DecodeError> {
    let (&version, rest) = bytes.split_first().ok_or(DecodeError::Empty)?;
    if version != VERSION {
        return Err(DecodeError::UnknownVersion(version));
    }
    let malformed = |e: &dyn std::fmt::Display| DecodeError::Malformed(e.to_string());
    let message = EventV1::decode(rest).map_err(|e| malformed(&e))?;
    match message.event {
        Some(event_v1::Event::Query(q)) => Ok(Decoded {
            event: Event::QueryRecorded(QueryRecorded {
                request_id: q.request_id,
                expected: q
                    .expected_known
                    .then(|| q.expected.iter().map(|c| Channel::from_sinch(c)).collect()),
                asked_ms: q.asked_ms,
                late: q.late,
            }),
            body: None,
        }),
        Some(event_v1::Event::Notification(n)) => {
            let digest: [u8; 16] = n
                .digest
                .as_slice()
                .try_into()
                .map_err(|_| malformed(&"a digest that is not 16 bytes"))?;
            let notification = decode_body(n.request_id, &n.body).map_err(|e| malformed(&e))?;
            Ok(Decoded {
                event: Event::NotificationReceived(Box::new(NotificationReceived {
                    notification,
                    digest: Digest(digest),
                })),
                body: Some(n.body),
            })
        }
        None => Err(malformed(&"no event")),
    }
}

/// A notification's fields but `request_id` and `received_time` (see [`put_receive_time`]), encoded as the
/// contract's `CapabilityNotification` encodes them.
pub fn encode_body(n: &Notification) -> Vec<u8> {
    body(n, false).encode_to_vec()
}

/// The same as a hub keeps it: without `app_id` and `project_id`, which [`encode_source`] encodes (the two,
/// concatenated, are one message: protobuf fields may come in any order), and without the `…_raw` spellings of
/// values the contract's enums name. A hub keeps each source once.
pub fn encode_compact_body(n: &Notification) -> Vec<u8> {
    body(n, true).encode_to_vec()
}

/// A notification's `app_id` and `project_id` as [`encode_body`] encodes them.
pub fn encode_source(n: &Notification) -> Vec<u8> {
    NotificationBody {
        app_id: n.app_id.clone(),
        project_id: n.project_id.clone(),
        ..NotificationBody::default()
    }
    .encode_to_vec()
}

fn body(n: &Notification, compact: bool) -> NotificationBody {
    let source = |value: &String| if compact { String::new() } else { value.clone() };
    let raw_unless_known = |number: i32, sinch: &str| {
        if compact && number != 0 {
            String::new()
        } else {
            sinch.to_owned()
        }
    };
    NotificationBody {
        contact_id: n.contact_id.clone(),
        channel: n.channel.number(),
        channel_raw: raw_unless_known(n.channel.number(), n.channel.as_sinch()),
        identity: n.identity.clone(),
        capability_status: n.capability_status.number(),
        capability_status_raw: raw_unless_known(n.capability_status.number(), n.capability_status.as_sinch()),
        channel_capabilities: n.channel_capabilities.clone(),
        reason: n.reason.as_ref().map(|r| ReasonV1 {
            code: r.code.clone(),
            description: r.description.clone(),
            sub_code: r.sub_code.clone(),
            channel_code: r.channel_code.clone(),
        }),
        channel_recipient_identities: n
            .channel_recipient_identities
            .iter()
            .map(|r| RecipientIdentityV1 {
                channel_identity: Some(ChannelIdentityV1 {
                    channel: r.channel.number(),
                    identity: r.identity.clone(),
                    app_id: r.app_id.clone(),
                    channel_raw: raw_unless_known(r.channel.number(), r.channel.as_sinch()),
                }),
                display_name: r.display_name.clone(),
            })
            .collect(),
        app_id: source(&n.app_id),
        project_id: source(&n.project_id),
        accepted_time: n.accepted_time.map(timestamp),
        event_time: n.event_time.map(timestamp),
        message_metadata: n.message_metadata.clone(),
        correlation_id: n.correlation_id.clone(),
        receive_time: None,
    }
}

/// Room to reserve for [`put_receive_time`]: its size for any time of this century.
pub const RECEIVE_TIME_LEN: usize = 16;

/// Appends to `body` the contract's `receive_time` of a notification the log recorded at `time_ms`, encoded as
/// [`encode_body`] would: the log's time is the receive time (to the millisecond, the same on every replica), so
/// a body does not carry it and a hub appends it when it sends one.
pub fn put_receive_time(time_ms: u64, body: &mut Vec<u8>) {
    // The one field alone, as the whole message's encoding would write it (without measuring every empty field).
    let time = prost_types::Timestamp {
        seconds: (time_ms / 1000) as i64,
        nanos: (time_ms % 1000) as i32 * 1_000_000,
    };
    prost::encoding::message::encode(RECEIVE_TIME_TAG, &time, body);
}

/// `receive_time`'s field number in [`NotificationBody`] (and in the contract's `CapabilityNotification`).
const RECEIVE_TIME_TAG: u32 = 18;

/// A log time (milliseconds since the Unix epoch) as a [`SystemTime`].
pub fn log_time(time_ms: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(time_ms)
}

/// Reads what [`encode_body`] wrote back into a notification of `request_id`.
pub fn decode_body(request_id: String, bytes: &[u8]) -> Result<Notification, prost::DecodeError> {
    let b = NotificationBody::decode(bytes)?;
    Ok(Notification {
        request_id,
        contact_id: b.contact_id,
        channel: Channel::from_number(b.channel).unwrap_or_else(|| Channel::from_sinch(&b.channel_raw)),
        identity: b.identity,
        capability_status: CapabilityStatus::from_number(b.capability_status)
            .unwrap_or_else(|| CapabilityStatus::from_sinch(&b.capability_status_raw)),
        channel_capabilities: b.channel_capabilities,
        reason: b.reason.map(|r| Reason {
            code: r.code,
            description: r.description,
            sub_code: r.sub_code,
            channel_code: r.channel_code,
        }),
        channel_recipient_identities: b
            .channel_recipient_identities
            .into_iter()
            .map(|r| {
                let id = r.channel_identity.unwrap_or_default();
                RecipientIdentity {
                    channel: Channel::from_number(id.channel).unwrap_or_else(|| Channel::from_sinch(&id.channel_raw)),
                    identity: id.identity,
                    app_id: id.app_id,
                    display_name: r.display_name,
                }
            })
            .collect(),
        app_id: b.app_id,
        project_id: b.project_id,
        accepted_time: b.accepted_time.map(system_time),
        event_time: b.event_time.map(system_time),
        message_metadata: b.message_metadata,
        correlation_id: b.correlation_id,
        received_time: b.receive_time.map(system_time).unwrap_or(UNIX_EPOCH),
    })
}

fn timestamp(time: SystemTime) -> prost_types::Timestamp {
    prost_types::Timestamp::from(time)
}

fn system_time(t: prost_types::Timestamp) -> SystemTime {
    SystemTime::try_from(t).unwrap_or_else(|_| UNIX_EPOCH + Duration::ZERO)
}

// === the version-1 messages ===

#[derive(Clone, PartialEq, Message)]
struct EventV1 {
    #[prost(oneof = "event_v1::Event", tags = "1, 2")]
    event: Option<event_v1::Event>,
}

mod event_v1 {
    #[derive(Clone, PartialEq, prost::Oneof)]
    pub(super) enum Event {
        #[prost(message, tag = "1")]
        Query(super::QueryV1),
        #[prost(message, tag = "2")]
        Notification(super::NotificationV1),
    }
}

#[derive(Clone, PartialEq, Message)]
struct QueryV1 {
    #[prost(string, tag = "1")]
    request_id: String,
    #[prost(bool, tag = "2")]
    expected_known: bool,
    /// Sinch's spellings.
    #[prost(string, repeated, tag = "3")]
    expected: Vec<String>,
    #[prost(uint64, tag = "4")]
    asked_ms: u64,
    #[prost(bool, tag = "5")]
    late: bool,
}

#[derive(Clone, PartialEq, Message)]
struct NotificationV1 {
    #[prost(string, tag = "1")]
    request_id: String,
    #[prost(bytes = "vec", tag = "2")]
    digest: Vec<u8>,
    /// A [`NotificationBody`].
    #[prost(bytes = "vec", tag = "3")]
    body: Vec<u8>,
}

/// `capability.v1.CapabilityNotification` without `offset` (1) and `request_id` (2): same numbers, same types.
#[derive(Clone, PartialEq, Message)]
struct NotificationBody {
    #[prost(string, tag = "3")]
    contact_id: String,
    #[prost(int32, tag = "4")]
    channel: i32,
    #[prost(string, tag = "5")]
    channel_raw: String,
    #[prost(string, tag = "6")]
    identity: String,
    #[prost(int32, tag = "7")]
    capability_status: i32,
    #[prost(string, tag = "8")]
    capability_status_raw: String,
    #[prost(string, repeated, tag = "9")]
    channel_capabilities: Vec<String>,
    #[prost(message, optional, tag = "10")]
    reason: Option<ReasonV1>,
    #[prost(message, repeated, tag = "11")]
    channel_recipient_identities: Vec<RecipientIdentityV1>,
    #[prost(string, tag = "12")]
    app_id: String,
    #[prost(string, tag = "13")]
    project_id: String,
    #[prost(message, optional, tag = "14")]
    accepted_time: Option<prost_types::Timestamp>,
    #[prost(message, optional, tag = "15")]
    event_time: Option<prost_types::Timestamp>,
    #[prost(string, tag = "16")]
    message_metadata: String,
    #[prost(string, tag = "17")]
    correlation_id: String,
    #[prost(message, optional, tag = "18")]
    receive_time: Option<prost_types::Timestamp>,
}

#[derive(Clone, PartialEq, Message)]
struct ReasonV1 {
    #[prost(string, tag = "1")]
    code: String,
    #[prost(string, tag = "2")]
    description: String,
    #[prost(string, tag = "3")]
    sub_code: String,
    #[prost(string, tag = "4")]
    channel_code: String,
}

#[derive(Clone, PartialEq, Message)]
struct RecipientIdentityV1 {
    #[prost(message, optional, tag = "1")]
    channel_identity: Option<ChannelIdentityV1>,
    #[prost(string, tag = "2")]
    display_name: String,
}

#[derive(Clone, PartialEq, Message)]
struct ChannelIdentityV1 {
    #[prost(int32, tag = "1")]
    channel: i32,
    #[prost(string, tag = "2")]
    identity: String,
    #[prost(string, tag = "3")]
    app_id: String,
    #[prost(string, tag = "4")]
    channel_raw: String,
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A notification with every field set.
    pub(crate) fn full_notification(request_id: &str) -> Notification {
        Notification {
            request_id: request_id.into(),
            contact_id: "contact".into(),
            channel: Channel::Whatsapp,
            identity: "46712312312".into(),
            capability_status: CapabilityStatus::Partial,
            channel_capabilities: vec!["TEXT".into()],
            reason: Some(Reason {
                code: "RECIPIENT_NOT_OPTED_IN".into(),
                description: "d".into(),
                sub_code: "UNSPECIFIED_SUB_CODE".into(),
                channel_code: "131047".into(),
            }),
            channel_recipient_identities: vec![RecipientIdentity {
                channel: Channel::from_sinch("NEWCHAN"),
                identity: "x".into(),
                app_id: "a".into(),
                display_name: "John".into(),
            }],
            app_id: "APP".into(),
            project_id: "PRJ".into(),
            accepted_time: Some(UNIX_EPOCH + Duration::from_micros(1_605_629_151_724_083)),
            event_time: Some(UNIX_EPOCH + Duration::from_secs(1_605_629_145)),
            message_metadata: "meta".into(),
            correlation_id: "corr".into(),
            // A body does not carry it: the log's time is the receive time (see `put_receive_time`).
            received_time: UNIX_EPOCH,
        }
    }

    #[test]
    fn every_event_reads_back_as_it_was_written() {
        let n = full_notification("r1");
        let event = Event::NotificationReceived(Box::new(NotificationReceived {
            digest: Digest::of(&n),
            notification: n,
        }));
        let decoded = decode(&encode(&event)).unwrap();
        assert_eq!(decoded.event, event);
        assert!(decoded.body.is_some());
        for expected in [None, Some(vec![Channel::Rcs, Channel::from_sinch("NEWCHAN")])] {
            let query = Event::QueryRecorded(QueryRecorded {
                request_id: "r2".into(),
                expected,
                asked_ms: 1_796_685_666_772,
                late: true,
            });
            assert_eq!(decode(&encode(&query)).unwrap().event, query);
        }
    }

    #[test]
    fn unknown_versions_and_garbage_are_errors_not_panics() {
        let mut bytes = encode(&Event::QueryRecorded(QueryRecorded {
            request_id: "r".into(),
            expected: None,
            asked_ms: 0,
            late: false,
        }));
        bytes[0] = 2;
        assert_eq!(decode(&bytes), Err(DecodeError::UnknownVersion(2)));
        assert_eq!(decode(&[]), Err(DecodeError::Empty));
        assert!(matches!(decode(&[1, 0xff, 0xff]), Err(DecodeError::Malformed(_))));
    }

    #[test]
    fn the_digest_is_the_outcome_not_the_bytes() {
        let n = full_notification("r");
        let mut resent = n.clone();
        resent.accepted_time = None;
        resent.received_time = SystemTime::now();
        resent.message_metadata = "other".into();
        assert_eq!(
            Digest::of(&n),
            Digest::of(&resent),
            "times and metadata are not the outcome"
        );
        let mut news = n.clone();
        news.capability_status = CapabilityStatus::Full;
        assert_ne!(Digest::of(&n), Digest::of(&news), "another status is news");
        let mut other_reason = n.clone();
        other_reason.reason.as_mut().unwrap().code = "RECIPIENT_NOT_REACHABLE".into();
        assert_ne!(Digest::of(&n), Digest::of(&other_reason));
    }

    /// Fixed forever: a build that computed another value would disagree with its predecessors on duplicates.
    #[test]
    fn the_digest_algorithm_is_pinned() {
        let n = Notification {
            request_id: "01EQBF91XWP9PW1J8EWRYZ1GK2".into(),
            channel: Channel::Whatsapp,
            identity: "12345678910".into(),
            capability_status: CapabilityStatus::Full,
            reason: None,
            ..full_notification("")
        };
        assert_eq!(Digest::of(&n).hex(), PINNED_DIGEST);
    }

    /// Computed independently: `python3 -c` over the same length-prefixed fields with hashlib.sha256.
    const PINNED_DIGEST: &str = "c2a1a76697ebe6efdcf1c799af035008";

    #[test]
    fn the_receive_time_is_put_as_the_bodys_encoding_writes_it() {
        for time_ms in [0, 999, 1_000, 1_700_000_000_123, 4_102_444_799_999] {
            let mut put = Vec::new();
            put_receive_time(time_ms, &mut put);
            let whole = NotificationBody {
                receive_time: Some(timestamp(log_time(time_ms))),
                ..NotificationBody::default()
            };
            assert_eq!(put, whole.encode_to_vec(), "at {time_ms} ms");
            assert!(put.len() <= RECEIVE_TIME_LEN, "at {time_ms} ms");
        }
    }

    #[test]
    fn a_compact_body_then_its_source_and_the_log_time_are_the_whole_notification() {
        let n = full_notification("r1");
        let mut joined = [encode_compact_body(&n), encode_source(&n)].concat();
        put_receive_time(1_700_000_000_123, &mut joined);
        let read = decode_body("r1".into(), &joined).unwrap();
        assert_eq!(
            read,
            Notification {
                received_time: log_time(1_700_000_000_123),
                ..n.clone()
            }
        );
        assert!(encode_compact_body(&n).len() + encode_source(&n).len() < encode_body(&n).len());
    }

    /// A newer build may name a value this one does not: the log must carry the spelling as well as the number.
    #[test]
    fn a_log_event_spells_every_value_out_for_builds_that_do_not_know_its_number() {
        let n = full_notification("r1");
        let body = NotificationBody::decode(&encode_body(&n)[..]).unwrap();
        assert_eq!(body.channel_raw, "WHATSAPP");
        assert_eq!(body.capability_status_raw, "CAPABILITY_PARTIAL");
        let newer = NotificationBody {
            channel: 99,
            channel_raw: "FUTURECHAN".into(),
            ..body
        };
        let read = decode_body("r1".into(), &newer.encode_to_vec()).unwrap();
        assert_eq!(read.channel, Channel::from_sinch("FUTURECHAN"));
    }
}
