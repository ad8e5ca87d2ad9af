//! The webhook's checks on what arrives over the network: content type, signature headers, timestamp window
//! and the callback's JSON, as `webhook::check` sees them.
//!
//! The input is an 8-byte header choosing how the request is dressed, then the body: a seed is eight zero bytes
//! and a JSON callback, which arrives genuinely signed, so that the parser behind the signature is explored
//! too. Beyond "no panic, no hang", each input asserts what a caller would notice: nothing forged, stale or
//! mislabelled gets through, and a genuine, timely callback is never refused for anything but its body.
#![no_main]

use std::time::{Duration, UNIX_EPOCH};

use capability_facade::{
    secret::Secret,
    webhook::{WebhookConfig, WebhookError, check, parse::Callback, signature},
};
use http::{HeaderMap, HeaderValue, header};
use libfuzzer_sys::fuzz_target;

const SECRET: &str = "fuzz-secret";
const NOW: u64 = 1_800_000_000;
const TOLERANCE: Duration = Duration::from_secs(300);

fuzz_target!(|data: &[u8]| {
    let Some((dress, body)) = data.split_first_chunk::<8>() else {
        return;
    };
    let [signing, content_type, algorithm, nonce, skew @ ..] = *dress;
    let skew = i32::from_le_bytes(skew);
    let nonce: &[u8] = match nonce % 4 {
        0 => b"01KB0000000000000000000000",
        1 => b"",
        2 => b"nonce\x7f",
        _ => body.get(..body.len().min(64)).unwrap_or_default(),
    };
    let timestamp = if skew == i32::MIN {
        "soon".to_owned()
    } else {
        (NOW as i64 + i64::from(skew)).to_string()
    };
    let (content_type, json): (Option<&[u8]>, bool) = match content_type % 5 {
        0 => (Some(b"application/json"), true),
        1 => (Some(b"Application/JSON; charset=utf-8"), true),
        2 => (Some(b"text/plain"), false),
        3 => (None, false),
        _ => (Some(b"application/json\xff"), false),
    };
    let (algorithm, algorithm_ok): (Option<&[u8]>, bool) = match algorithm % 5 {
        0 => (None, true),
        1 => (Some(b"HmacSHA256"), true),
        2 => (Some(b"hmacsha256"), true),
        3 => (Some(b"HmacSHA1"), false),
        _ => (Some(b"\xffHmacSHA256"), false),
    };

    let mut headers = HeaderMap::new();
    let mut put = |name: &'static str, value: &[u8]| {
        if let Ok(value) = HeaderValue::from_bytes(value) {
            headers.insert(name, value);
        }
    };
    if let Some(content_type) = content_type {
        put(header::CONTENT_TYPE.as_str(), content_type);
    }
    if let Some(algorithm) = algorithm {
        put(signature::ALGORITHM, algorithm);
    }
    put(signature::NONCE, nonce);
    put(signature::TIMESTAMP, timestamp.as_bytes());
    // The receiver reads headers as text: only visible ASCII ones can carry a nonce.
    let nonce_text = std::str::from_utf8(nonce)
        .ok()
        .filter(|n| n.bytes().all(|b| b == b'\t' || (b' '..=b'~').contains(&b)));
    let genuine = match (signing % 4, nonce_text) {
        (0, Some(nonce)) => {
            put(
                signature::SIGNATURE,
                signature::sign(SECRET, body, nonce, &timestamp).as_bytes(),
            );
            true
        }
        (1, Some(nonce)) => {
            put(
                signature::SIGNATURE,
                signature::sign("not-the-secret", body, nonce, &timestamp).as_bytes(),
            );
            false
        }
        (2, Some(nonce)) => {
            // The genuine signature of another body: the one-byte-longer body.
            let other = [body, b" "].concat();
            put(
                signature::SIGNATURE,
                signature::sign(SECRET, &other, nonce, &timestamp).as_bytes(),
            );
            false
        }
        _ => false,
    };
    let timely = skew != i32::MIN && i64::from(skew).unsigned_abs() <= TOLERANCE.as_secs();

    let config = WebhookConfig {
        secrets: vec![Secret::new(SECRET.to_owned())],
        tolerance: TOLERANCE,
        max_body: 1 << 20,
        request_timeout: Duration::from_secs(10),
        max_pending: 256,
    };
    let now = UNIX_EPOCH + Duration::from_secs(NOW);
    match check(&config, &headers, body, now) {
        Ok(checked) => {
            assert!(json, "accepted without application/json");
            assert!(genuine, "accepted a callback not signed with the secret over this body");
            assert!(algorithm_ok, "accepted another algorithm");
            assert!(timely, "accepted a stale or unreadable timestamp");
            assert_eq!(
                checked.nonce.map(|n| n.value),
                nonce_text,
                "the nonce claimed is not the one sent"
            );
            // Remembered at least while a replay's timestamp would pass (on a replica whose clock is up to a minute
            // behind: a minute more), and not much longer.
            let remember_for = checked.nonce.map_or(Duration::ZERO, |n| n.remember_for);
            // The timestamp is `skew` seconds from now: a replay passes for another tolerance + skew seconds.
            let valid_for = TOLERANCE.as_secs() as i64 + i64::from(skew);
            assert!(
                remember_for.as_secs() as i64 > valid_for,
                "forgotten while still replayable"
            );
            assert!(
                remember_for.as_secs() as i64 > valid_for + 60,
                "forgotten while a replica a minute behind would take it"
            );
            assert!(
                remember_for <= TOLERANCE * 2 + Duration::from_secs(61),
                "kept far too long"
            );
            if let Callback::Capability(notification) = &checked.callback {
                assert!(!notification.request_id.is_empty(), "a notification without request_id");
                assert_eq!(notification.received_time, now);
            }
        }
        Err(error) => {
            if genuine && json && algorithm_ok && timely {
                assert!(
                    matches!(error, WebhookError::Malformed(_)),
                    "a genuine callback was refused: {error}"
                );
            }
        }
    }
});
