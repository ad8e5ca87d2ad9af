//! What callers send to the gRPC port, from the bytes of the protobuf message on: decoding, then the
//! validation and conversion of QueryCapability and WatchCapability requests, then the JSON sent to Sinch.
//!
//! Beyond "no panic, no hang", every request the validation lets through must respect the documented limits,
//! and its Sinch JSON must read back as the same query.
#![no_main]

use std::time::Duration;

use capability_facade::{
    capability::{MAX_IDENTITIES, MAX_REQUEST_ID_LEN, Query, Recipient},
    grpc::{
        convert::{self, MAX_FIELD_LEN},
        pb,
    },
    upstream::wire::{QueryJson, RecipientJson},
};
use libfuzzer_sys::fuzz_target;
use prost::Message;

const DEFAULT_WAIT: Duration = Duration::from_secs(30);
const MAX_WAIT: Duration = Duration::from_secs(600);

fuzz_target!(|data: &[u8]| {
    // The first byte picks the message, as the two RPCs would receive it.
    let Some((&which, bytes)) = data.split_first() else {
        return;
    };
    if which % 2 == 0 {
        query(bytes);
    } else {
        watch(bytes);
    }
});

fn query(bytes: &[u8]) {
    let Ok(request) = pb::QueryCapabilityRequest::decode(bytes) else {
        return;
    };
    let Ok(accepted) = convert::query_request(request) else {
        return;
    };
    assert_clean(&accepted.app_id, false);
    if let Some(request_id) = &accepted.request_id {
        assert!(!request_id.trim().is_empty() && request_id.chars().count() <= MAX_REQUEST_ID_LEN);
        assert!(!request_id.chars().any(char::is_control));
    }
    match &accepted.recipient {
        Recipient::ContactId(id) => assert_clean(id, false),
        Recipient::IdentifiedBy(identities) => {
            assert!(!identities.is_empty() && identities.len() <= MAX_IDENTITIES);
            for identity in identities {
                assert_clean(&identity.identity, false);
                assert_clean(&identity.app_id, true);
                assert!(!identity.channel.as_sinch().is_empty());
            }
        }
    }
    let query = Query {
        app_id: accepted.app_id,
        recipient: accepted.recipient,
        request_id: accepted
            .request_id
            .unwrap_or_else(|| "01KAZZZZZZZZZZZZZZZZZZZZZZ".to_owned()),
    };
    let json = serde_json::to_vec(&QueryJson::from(&query)).expect("a valid query serialises");
    let read: QueryJson = serde_json::from_slice(&json).expect("our own JSON reads back");
    assert_eq!(read.app_id, query.app_id);
    assert_eq!(read.request_id, query.request_id);
    match (read.recipient, &query.recipient) {
        (RecipientJson::ContactId(read), Recipient::ContactId(sent)) => assert_eq!(&read, sent),
        (RecipientJson::IdentifiedBy { channel_identities }, Recipient::IdentifiedBy(sent)) => {
            assert_eq!(channel_identities.len(), sent.len());
            for (read, sent) in channel_identities.iter().zip(sent) {
                assert_eq!(
                    (read.channel.as_str(), &read.identity, &read.app_id),
                    (sent.channel.as_sinch(), &sent.identity, &sent.app_id)
                );
            }
        }
        _ => panic!("the recipient changed kind on the wire"),
    }
}

fn watch(bytes: &[u8]) {
    let Ok(request) = pb::WatchCapabilityRequest::decode(bytes) else {
        return;
    };
    if convert::check_request_id(&request.request_id, true).is_ok() {
        assert!(!request.request_id.trim().is_empty() && request.request_id.chars().count() <= MAX_REQUEST_ID_LEN);
    }
    if let Ok(wait) = convert::wait(request.wait, DEFAULT_WAIT, MAX_WAIT) {
        assert!(wait <= MAX_WAIT);
    }
}

/// A field that passed validation: within the byte limit, no control characters, not blank unless `optional`.
fn assert_clean(value: &str, optional: bool) {
    assert!(optional || !value.trim().is_empty(), "a required field passed blank");
    assert!(value.len() <= MAX_FIELD_LEN, "a field over the limit passed");
    assert!(!value.chars().any(char::is_control), "a control character passed");
}
