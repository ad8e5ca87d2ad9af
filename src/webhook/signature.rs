//! Sinch's callback signature: `base64(HMAC-SHA256(secret, body + "." + nonce + "." + timestamp))`, computed
//! over the exact bytes received. Shared with the sandbox, which signs as Sinch does.

use base64::{Engine, engine::general_purpose::STANDARD};
use hmac::{KeyInit, Mac};
use sha2::Sha256;

type HmacSha256 = hmac::Hmac<Sha256>;

pub const SIGNATURE: &str = "x-sinch-webhook-signature";
pub const TIMESTAMP: &str = "x-sinch-webhook-signature-timestamp";
pub const NONCE: &str = "x-sinch-webhook-signature-nonce";
pub const ALGORITHM: &str = "x-sinch-webhook-signature-algorithm";
/// The only algorithm Sinch uses, as its header spells it.
pub const HMAC_SHA256: &str = "HmacSHA256";

fn mac(secret: &str, body: &[u8], nonce: &str, timestamp: &str) -> HmacSha256 {
    let mut mac = HmacSha256::new_from_slice(secret.as_bytes()).expect("HMAC takes keys of any length");
    mac.update(body);
    mac.update(b".");
    mac.update(nonce.as_bytes());
    mac.update(b".");
    mac.update(timestamp.as_bytes());
    mac
}

/// The signature Sinch sends for `body` with this nonce and timestamp.
pub fn sign(secret: &str, body: &[u8], nonce: &str, timestamp: &str) -> String {
    STANDARD.encode(mac(secret, body, nonce, timestamp).finalize().into_bytes())
}

/// The four headers Sinch sends with `body` signed under `secret` now, with a fresh nonce.
pub fn headers(secret: &str, body: &[u8]) -> [(&'static str, String); 4] {
    let nonce = ulid::Ulid::new().to_string();
    let timestamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
        .to_string();
    [
        (SIGNATURE, sign(secret, body, &nonce, &timestamp)),
        (TIMESTAMP, timestamp),
        (NONCE, nonce),
        (ALGORITHM, HMAC_SHA256.to_owned()),
    ]
}

/// Whether `signature` (base64) is the signature of `body` under any of `secrets`, compared in constant time.
pub fn verify<'a>(
    secrets: impl IntoIterator<Item = &'a str>,
    body: &[u8],
    nonce: &str,
    timestamp: &str,
    signature: &str,
) -> bool {
    let Ok(expected) = STANDARD.decode(signature.trim()) else {
        return false;
    };
    secrets
        .into_iter()
        .any(|secret| mac(secret, body, nonce, timestamp).verify_slice(&expected).is_ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The test vector shared by the tests of Sinch's four official SDKs.
    const BODY: &str = r#"{"app_id":"","accepted_time":"2021-10-18T17:49:13.813615Z","project_id":"e2df3a34-a71b-4448-9db5-a8d2baad28e4","contact_create_notification":{"contact":{"id":"01FJA8B466Y0R2GNXD78MD9SM1","channel_identities":[{"channel":"SMS","identity":"48123456789","app_id":""}],"display_name":"New Test Contact","email":"new.contact@email.com","external_id":"","metadata":"","language":"EN_US"}},"message_metadata":""}"#;
    const SECRET: &str = "foo_secret1234";
    const NONCE_: &str = "01FJA8B4A7BM43YGWSG9GBV067";
    const TIMESTAMP_: &str = "1634579353";
    const EXPECTED: &str = "6bpJoRmFoXVjfJIVglMoJzYXxnoxRujzR4k2GOXewOE=";

    #[test]
    fn the_sdk_test_vector_signs_and_verifies() {
        assert_eq!(sign(SECRET, BODY.as_bytes(), NONCE_, TIMESTAMP_), EXPECTED);
        assert!(verify([SECRET], BODY.as_bytes(), NONCE_, TIMESTAMP_, EXPECTED));
    }

    /// The .NET SDK's second vector (`WebhooksAuthValidation.json`): a multi-line body ending with a line feed,
    /// signed over its raw bytes; the same body without the trailing line feed does not verify.
    #[test]
    fn the_dotnet_multi_line_vector_signs_the_raw_bytes() {
        const MULTI_LINE: &[u8] = include_bytes!("testdata/dotnet-webhooks-auth-validation.json");
        const DOTNET_EXPECTED: &str = "wKmZBGo4Cf+y9cZoPHhiVw6ziKeubLGqN4OdG8jlaPo=";
        assert_eq!(MULTI_LINE.last(), Some(&b'\n'));
        assert_eq!(sign(SECRET, MULTI_LINE, NONCE_, TIMESTAMP_), DOTNET_EXPECTED);
        assert!(verify([SECRET], MULTI_LINE, NONCE_, TIMESTAMP_, DOTNET_EXPECTED));
        let stripped = &MULTI_LINE[..MULTI_LINE.len() - 1];
        assert!(!verify([SECRET], stripped, NONCE_, TIMESTAMP_, DOTNET_EXPECTED));
    }

    #[test]
    fn the_headers_a_signer_sends_verify_and_carry_a_fresh_nonce() {
        let first = headers(SECRET, BODY.as_bytes());
        let value = |name: &str| first.iter().find(|(n, _)| *n == name).map(|(_, v)| v.as_str()).unwrap();
        assert_eq!(value(ALGORITHM), HMAC_SHA256);
        assert!(verify(
            [SECRET],
            BODY.as_bytes(),
            value(NONCE),
            value(TIMESTAMP),
            value(SIGNATURE)
        ));
        let second = headers(SECRET, BODY.as_bytes());
        assert_ne!(first[2], second[2], "each signing draws a new nonce");
    }

    #[test]
    fn any_configured_secret_verifies_and_nothing_else_does() {
        assert!(verify(["old", SECRET], BODY.as_bytes(), NONCE_, TIMESTAMP_, EXPECTED));
        assert!(!verify(["old", "new"], BODY.as_bytes(), NONCE_, TIMESTAMP_, EXPECTED));
        let tampered = BODY.replace("New Test", "Evil Test");
        assert!(!verify([SECRET], tampered.as_bytes(), NONCE_, TIMESTAMP_, EXPECTED));
        assert!(!verify([SECRET], BODY.as_bytes(), "other-nonce", TIMESTAMP_, EXPECTED));
        assert!(!verify([SECRET], BODY.as_bytes(), NONCE_, "1634579354", EXPECTED));
        assert!(!verify([SECRET], BODY.as_bytes(), NONCE_, TIMESTAMP_, "not base64!"));
        assert!(!verify(
            Vec::<&str>::new(),
            BODY.as_bytes(),
            NONCE_,
            TIMESTAMP_,
            EXPECTED
        ));
    }
}
