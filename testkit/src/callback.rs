//! Sinch's side of a webhook callback: the signature, written here independently of the service's own code, the
//! headers that carry it, the body of a CAPABILITY callback, and posting one.

use std::net::SocketAddr;

use base64::Engine;
use hmac::{KeyInit, Mac};
use reqwest::StatusCode;

/// Signs as Sinch does: base64(HMAC-SHA256(secret, body + "." + nonce + "." + timestamp)).
pub fn sign(secret: &str, body: &[u8], nonce: &str, timestamp: &str) -> String {
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC takes any key");
    mac.update(body);
    mac.update(format!(".{nonce}.{timestamp}").as_bytes());
    base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
}

/// Now, in whole seconds since the Unix epoch, as Sinch's timestamps are.
pub fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("the clock is after 1970")
        .as_secs() as i64
}

/// The headers of a genuine callback: its content type, and a signature with `secret` over a fresh nonce and
/// the current time.
pub fn signed_headers(secret: &str, body: &[u8]) -> Vec<(&'static str, String)> {
    let nonce = ulid::Ulid::new().to_string();
    let timestamp = unix_now().to_string();
    vec![
        ("content-type", "application/json".into()),
        ("x-sinch-webhook-signature", sign(secret, body, &nonce, &timestamp)),
        ("x-sinch-webhook-signature-timestamp", timestamp),
        ("x-sinch-webhook-signature-nonce", nonce),
        ("x-sinch-webhook-signature-algorithm", "HmacSHA256".into()),
    ]
}

/// The URL of the webhook served at `addr`.
pub fn webhook_url(addr: SocketAddr) -> String {
    format!("http://{addr}/webhooks/sinch")
}

/// Posts `body` with `headers` to `url`; the status of the answer.
pub async fn post_webhook(
    http: &reqwest::Client,
    url: impl reqwest::IntoUrl,
    body: Vec<u8>,
    headers: &[(&str, String)],
) -> reqwest::Result<StatusCode> {
    let mut request = http.post(url).body(body);
    for (name, value) in headers {
        request = request.header(*name, value);
    }
    Ok(request.send().await?.status())
}

/// Posts `body` to `url` as a genuine callback signed with `secret` (fresh nonce, current time).
pub async fn post_signed(
    http: &reqwest::Client,
    url: impl reqwest::IntoUrl,
    secret: &str,
    body: Vec<u8>,
) -> reqwest::Result<StatusCode> {
    let headers = signed_headers(secret, &body);
    post_webhook(http, url, body, &headers).await
}

/// A CAPABILITY callback as Sinch sends it, one field at a time; [`CapabilityCallback::body`] gives its JSON.
#[derive(Debug, Clone)]
pub struct CapabilityCallback {
    /// The query's request_id.
    pub request_id: String,
    /// The channel, as Sinch names it (`WHATSAPP`, `SMS`, …).
    pub channel: String,
    /// The identity on that channel.
    pub identity: String,
    /// `CAPABILITY_FULL`, `CAPABILITY_PARTIAL`, `NO_CAPABILITY`, …
    pub status: String,
    /// The app the query went through; `APP-1` unless set.
    pub app_id: String,
    /// The project; empty unless set, as in Sinch's own examples.
    pub project_id: String,
    /// Free text a sender may use; empty unless set.
    pub message_metadata: String,
    /// Sent only when set.
    pub correlation_id: Option<String>,
    /// The contact the result is about; sent only when set.
    pub contact_id: Option<String>,
}

impl CapabilityCallback {
    /// A callback saying `status` for `identity` on `channel`, for `request_id`.
    pub fn new(request_id: &str, channel: &str, identity: &str, status: &str) -> CapabilityCallback {
        CapabilityCallback {
            request_id: request_id.into(),
            channel: channel.into(),
            identity: identity.into(),
            status: status.into(),
            app_id: "APP-1".into(),
            project_id: String::new(),
            message_metadata: String::new(),
            correlation_id: None,
            contact_id: None,
        }
    }

    /// The same, about a contact (as the callbacks of a contact_id query are).
    pub fn contact_id(mut self, contact_id: &str) -> CapabilityCallback {
        self.contact_id = Some(contact_id.into());
        self
    }

    /// The same, through another app.
    pub fn app_id(mut self, app_id: &str) -> CapabilityCallback {
        self.app_id = app_id.into();
        self
    }

    /// The same, of another project.
    pub fn project_id(mut self, project_id: &str) -> CapabilityCallback {
        self.project_id = project_id.into();
        self
    }

    /// The same, carrying `metadata` (which makes otherwise equal callbacks distinct).
    pub fn message_metadata(mut self, metadata: &str) -> CapabilityCallback {
        self.message_metadata = metadata.into();
        self
    }

    /// The same, with a `correlation_id`.
    pub fn correlation_id(mut self, correlation_id: &str) -> CapabilityCallback {
        self.correlation_id = Some(correlation_id.into());
        self
    }

    /// The JSON body, with the times Sinch always sends; its fields in alphabetical order.
    pub fn body(&self) -> Vec<u8> {
        serde_json::to_vec(&Body {
            accepted_time: "2026-11-22T10:00:00.123456Z",
            app_id: &self.app_id,
            capability_notification: Notification {
                capability_status: &self.status,
                channel: &self.channel,
                contact_id: self.contact_id.as_deref(),
                identity: &self.identity,
                request_id: &self.request_id,
            },
            correlation_id: self.correlation_id.as_deref(),
            event_time: "2026-11-22T10:00:00Z",
            message_metadata: &self.message_metadata,
            project_id: &self.project_id,
        })
        .expect("JSON serialises")
    }
}

/// A callback's JSON, serialised without building a map of values first (the load generator makes one per post).
#[derive(serde::Serialize)]
struct Body<'a> {
    accepted_time: &'a str,
    app_id: &'a str,
    capability_notification: Notification<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    correlation_id: Option<&'a str>,
    event_time: &'a str,
    message_metadata: &'a str,
    project_id: &'a str,
}

#[derive(serde::Serialize)]
struct Notification<'a> {
    capability_status: &'a str,
    channel: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    contact_id: Option<&'a str>,
    identity: &'a str,
    request_id: &'a str,
}

/// The body of a CAPABILITY callback with the defaults of [`CapabilityCallback::new`].
pub fn capability_body(request_id: &str, channel: &str, identity: &str, status: &str) -> Vec<u8> {
    CapabilityCallback::new(request_id, channel, identity, status).body()
}
