//! The sandbox's apps and their webhooks: Sinch's Webhooks API (create, list, get, update with `update_mask` in
//! every form the SDKs send, delete; at most 5 per app; secrets returned in clear text, as Sinch does) and
//! `GET …/apps/{app_id}` with `rate_limits`.

use std::{
    collections::{BTreeMap, HashMap},
    num::NonZeroU32,
    sync::{Arc, Mutex},
};

use axum::{
    body::Bytes,
    extract::{Path, RawQuery, Request, State},
    http::StatusCode,
    middleware::Next,
    response::{IntoResponse, Response},
};
use governor::{DefaultDirectRateLimiter, Quota};
use serde_json::{Value, json};

use super::{Sandbox, sinch_error, unauthenticated};
use crate::{registration::MAX_WEBHOOKS_PER_APP, secret::Secret, upstream::wire::WebhookJson as Webhook};

/// The longest target Sinch accepts.
const MAX_TARGET_LEN: usize = 742;
/// Every trigger Sinch's SDKs know and a webhook may name (not `UNSPECIFIED_TRIGGER`, which Sinch refuses).
const TRIGGERS: &[&str] = &[
    "MESSAGE_DELIVERY",
    "MESSAGE_SUBMIT",
    "EVENT_DELIVERY",
    "MESSAGE_INBOUND",
    "EVENT_INBOUND",
    "CONVERSATION_START",
    "CONVERSATION_STOP",
    "CONVERSATION_DELETE",
    "CONTACT_CREATE",
    "CONTACT_DELETE",
    "CONTACT_MERGE",
    "CONTACT_UPDATE",
    "CONTACT_IDENTITIES_DUPLICATION",
    "UNSUPPORTED",
    "OPT_IN",
    "OPT_OUT",
    "CAPABILITY",
    "CHANNEL_EVENT",
    "SMART_CONVERSATION",
    "MESSAGE_INBOUND_SMART_CONVERSATION_REDACTION",
    "RECORD_NOTIFICATION",
];

/// The most apps a sandbox that takes any app id holds; a new id past it is unknown (404).
pub const MAX_APPS: usize = 1_000;

/// Where one copy of a callback goes.
#[derive(Debug, Clone)]
pub struct Destination {
    pub target: String,
    /// Empty: the callback is sent unsigned, as Sinch does for a webhook without a secret.
    pub secret: Secret,
}

/// One app: its webhooks and the pace of its callbacks.
pub struct App {
    pub webhooks: Vec<Webhook>,
    /// `rate_limits.webhooks`: one permit per callback.
    pub pacer: Arc<DefaultDirectRateLimiter>,
}

/// Every app the sandbox knows.
pub struct Registry {
    apps: Mutex<BTreeMap<String, App>>,
    /// Unset: any app id is accepted and comes to exist when first used.
    known_only: bool,
    /// Registered for every app when it comes to exist (the in-process service's own webhook).
    default_webhook: Option<Destination>,
    rate: NonZeroU32,
}

impl Registry {
    pub fn new(known: &[String], default_webhook: Option<Destination>, rate: u32) -> Registry {
        let registry = Registry {
            apps: Mutex::new(BTreeMap::new()),
            known_only: !known.is_empty(),
            default_webhook,
            rate: NonZeroU32::new(rate).unwrap_or(NonZeroU32::MIN),
        };
        {
            let mut apps = registry.apps.lock().expect("sandbox lock poisoned");
            for id in known {
                apps.insert(id.clone(), registry.new_app(id));
            }
        }
        registry
    }

    fn new_app(&self, id: &str) -> App {
        let webhooks = self
            .default_webhook
            .iter()
            .map(|d| Webhook {
                id: ulid::Ulid::new().to_string(),
                app_id: id.to_owned(),
                target: d.target.clone(),
                target_type: "HTTP".to_owned(),
                secret: d.secret.expose().to_owned(),
                triggers: vec!["CAPABILITY".to_owned()],
                client_credentials: None,
            })
            .collect();
        App {
            webhooks,
            pacer: Arc::new(DefaultDirectRateLimiter::direct(
                Quota::per_second(self.rate).allow_burst(NonZeroU32::MIN),
            )),
        }
    }

    /// Runs `f` on app `id`, as [`Registry::app`] finds it.
    pub fn with_app<T>(&self, id: &str, f: impl FnOnce(&mut App) -> T) -> Option<T> {
        self.app(&mut self.apps.lock().expect("sandbox lock poisoned"), id)
            .map(f)
    }

    /// App `id` among `apps`, created when any app id is accepted (up to [`MAX_APPS`]); `None` when it is unknown.
    fn app<'a>(&self, apps: &'a mut BTreeMap<String, App>, id: &str) -> Option<&'a mut App> {
        if !apps.contains_key(id) {
            if self.known_only || apps.len() >= MAX_APPS {
                return None;
            }
            apps.insert(id.to_owned(), self.new_app(id));
        }
        apps.get_mut(id)
    }

    /// Where app `id`'s CAPABILITY callbacks go, and their pacer; `None` for an unknown app.
    pub fn capability_destinations(&self, id: &str) -> Option<(Vec<Destination>, Arc<DefaultDirectRateLimiter>)> {
        self.with_app(id, |app| {
            let destinations = app
                .webhooks
                .iter()
                .filter(|w| w.wants_capability())
                .map(|w| Destination {
                    target: w.target.clone(),
                    secret: Secret::new(w.secret.clone()),
                })
                .collect();
            (destinations, app.pacer.clone())
        })
    }
}

/// The checks Sinch makes of a webhook; `Err` is the message of a 400.
fn validate(webhook: &Webhook) -> Result<(), String> {
    if webhook.app_id.is_empty() {
        return Err("app_id is required".into());
    }
    if webhook.target.is_empty() {
        return Err("target is required".into());
    }
    if webhook.target.len() > MAX_TARGET_LEN {
        return Err(format!("target is longer than {MAX_TARGET_LEN} characters"));
    }
    let host = url::Url::parse(&webhook.target)
        .map_err(|e| format!("target is not a URL: {e}"))?
        .host_str()
        .unwrap_or_default()
        .to_owned();
    if host.starts_with("conversation-api.") && host.ends_with(".sinch.com") {
        return Err("target must not be a conversation-api.*.sinch.com address".into());
    }
    if !matches!(webhook.target_type.as_str(), "HTTP" | "DISMISS") {
        return Err(format!("Invalid value for target_type: {:?}", webhook.target_type));
    }
    for trigger in &webhook.triggers {
        if !TRIGGERS.contains(&trigger.as_str()) {
            return Err(format!("Invalid value for triggers: {trigger:?}"));
        }
    }
    match &webhook.client_credentials {
        None | Some(Value::Null) => Ok(()),
        Some(Value::Object(credentials)) => client_credentials(credentials),
        Some(_) => Err("client_credentials must be an object".into()),
    }
}

/// Checks a webhook's `client_credentials` as the spec describes them: `client_id`, `client_secret` and `endpoint`
/// required, `scope` at most 1,024 characters, `response_type` at most 64.
fn client_credentials(credentials: &serde_json::Map<String, Value>) -> Result<(), String> {
    let text = |field: &str| credentials.get(field).and_then(Value::as_str).unwrap_or_default();
    for required in ["client_id", "client_secret", "endpoint"] {
        if text(required).is_empty() {
            return Err(format!("client_credentials.{required} is required"));
        }
    }
    for (field, most) in [("scope", 1024), ("response_type", 64)] {
        if text(field).chars().count() > most {
            return Err(format!("client_credentials.{field} is longer than {most} characters"));
        }
    }
    Ok(())
}

/// The webhook's place in an app's list, when it is there.
fn room_for(app: &App, webhook: &Webhook) -> Result<(), String> {
    let others = app.webhooks.iter().filter(|w| w.id != webhook.id);
    if others.clone().any(|w| w.target == webhook.target) {
        return Err(format!(
            "A webhook with target {} already exists for this app",
            webhook.target
        ));
    }
    if others.count() >= MAX_WEBHOOKS_PER_APP {
        return Err(format!(
            "App {} already has {MAX_WEBHOOKS_PER_APP} webhooks, the most an app may have",
            webhook.app_id
        ));
    }
    Ok(())
}

/// Sinch's 404 for an app it does not know.
pub(super) fn app_not_found(app_id: &str) -> Response {
    sinch_error(StatusCode::NOT_FOUND, "NOT_FOUND", format!("App {app_id} not found"))
}

fn webhook_not_found(id: &str) -> Response {
    sinch_error(StatusCode::NOT_FOUND, "NOT_FOUND", format!("Webhook {id} not found"))
}

fn bad_request(message: String) -> Response {
    sinch_error(StatusCode::BAD_REQUEST, "INVALID_ARGUMENT", message)
}

/// The checks every call of these APIs passes first, credentials then the project (a layer on their routes).
pub(super) async fn admit(
    State(sandbox): State<Arc<Sandbox>>,
    Path(params): Path<HashMap<String, String>>,
    request: Request,
    next: Next,
) -> Response {
    if let Err(detail) = sandbox.authenticate(request.headers()) {
        return unauthenticated(detail);
    }
    let project = params.get("project").map_or("", String::as_str);
    match sandbox.wrong_project(project).or_else(|| sandbox.over_project_rate()) {
        Some(refusal) => refusal,
        None => next.run(request).await,
    }
}

/// `POST /v1/projects/{project}/webhooks`
pub(super) async fn create(State(sandbox): State<Arc<Sandbox>>, body: Bytes) -> Response {
    let mut webhook: Webhook = match serde_json::from_slice(&body) {
        Ok(w) => w,
        Err(e) => return bad_request(format!("Invalid JSON: {e}")),
    };
    webhook.id = ulid::Ulid::new().to_string();
    if webhook.target_type.is_empty() {
        webhook.target_type = "HTTP".to_owned();
    }
    if let Err(message) = validate(&webhook) {
        return bad_request(message);
    }
    let created = sandbox.registry.with_app(&webhook.app_id.clone(), |app| {
        room_for(app, &webhook)?;
        app.webhooks.push(webhook.clone());
        Ok::<_, String>(webhook.clone())
    });
    match created {
        None => app_not_found(&webhook.app_id),
        Some(Err(message)) => bad_request(message),
        Some(Ok(webhook)) => axum::Json(webhook).into_response(),
    }
}

/// `GET /v1/projects/{project}/apps/{app_id}/webhooks`
pub(super) async fn list(State(sandbox): State<Arc<Sandbox>>, Path((_, app_id)): Path<(String, String)>) -> Response {
    match sandbox.registry.with_app(&app_id, |app| app.webhooks.clone()) {
        None => app_not_found(&app_id),
        Some(webhooks) => axum::Json(json!({ "webhooks": webhooks })).into_response(),
    }
}

/// `GET /v1/projects/{project}/apps/{app_id}`
pub(super) async fn app(State(sandbox): State<Arc<Sandbox>>, Path((_, app_id)): Path<(String, String)>) -> Response {
    let rate = sandbox.config.knobs.webhook_rate;
    match sandbox.registry.with_app(&app_id, |_| ()) {
        None => app_not_found(&app_id),
        Some(()) => axum::Json(json!({
            "id": app_id,
            "display_name": format!("Sandbox app {app_id}"),
            "conversation_metadata_report_view": "NONE",
            "rate_limits": {"inbound": 25, "outbound": 25, "webhooks": rate},
            "queue_stats": {"outbound_size": 0, "outbound_limit": 500_000},
            "callback_settings": {"secret_for_overridden_callback_urls": ""},
            "delivery_report_based_fallback": null,
            "message_retry_settings": null,
        }))
        .into_response(),
    }
}

/// Finds webhook `id` in any app: (its app, its index).
fn locate(apps: &BTreeMap<String, App>, id: &str) -> Option<(String, usize)> {
    apps.iter().find_map(|(app_id, app)| {
        app.webhooks
            .iter()
            .position(|w| w.id == id)
            .map(|i| (app_id.clone(), i))
    })
}

/// `GET /v1/projects/{project}/webhooks/{webhook_id}`
pub(super) async fn get(State(sandbox): State<Arc<Sandbox>>, Path((_, id)): Path<(String, String)>) -> Response {
    let apps = sandbox.registry.apps.lock().expect("sandbox lock poisoned");
    match locate(&apps, &id) {
        Some((app, i)) => axum::Json(apps[&app].webhooks[i].clone()).into_response(),
        None => webhook_not_found(&id),
    }
}

/// `DELETE /v1/projects/{project}/webhooks/{webhook_id}`
pub(super) async fn delete(State(sandbox): State<Arc<Sandbox>>, Path((_, id)): Path<(String, String)>) -> Response {
    let mut apps = sandbox.registry.apps.lock().expect("sandbox lock poisoned");
    match locate(&apps, &id) {
        Some((app, i)) => {
            apps.get_mut(&app).expect("located").webhooks.remove(i);
            axum::Json(json!({})).into_response()
        }
        None => webhook_not_found(&id),
    }
}

/// The fields an update changes: from `update_mask` repeated (`?update_mask=a&update_mask=b`, Java 1.x),
/// comma-joined (`?update_mask=a,b`, Node and .NET) or in the body (Python v1: a string, a list or
/// `{"paths": […]}`); `None` without a mask (Java 2.x), when every field the body carries is changed.
fn update_mask(query: Option<&str>, body: &Value) -> Option<Vec<String>> {
    let mut fields: Vec<String> = query
        .map(|q| {
            url::form_urlencoded::parse(q.as_bytes())
                .filter(|(k, _)| k == "update_mask" || k == "update_mask.paths")
                .flat_map(|(_, v)| v.split(',').map(|f| f.trim().to_owned()).collect::<Vec<_>>())
                .collect()
        })
        .unwrap_or_default();
    match body.get("update_mask") {
        Some(Value::String(s)) => fields.extend(s.split(',').map(|f| f.trim().to_owned())),
        Some(Value::Array(a)) => fields.extend(a.iter().filter_map(Value::as_str).map(str::to_owned)),
        Some(Value::Object(o)) => {
            let paths = o.get("paths").and_then(Value::as_array).into_iter().flatten();
            fields.extend(paths.filter_map(Value::as_str).map(str::to_owned));
        }
        _ => {}
    }
    fields.retain(|f| !f.is_empty());
    (!fields.is_empty()).then_some(fields)
}

/// `PATCH /v1/projects/{project}/webhooks/{webhook_id}`
pub(super) async fn update(
    State(sandbox): State<Arc<Sandbox>>,
    Path((_, id)): Path<(String, String)>,
    RawQuery(query): RawQuery,
    body: Bytes,
) -> Response {
    let patch: Value = match serde_json::from_slice(&body) {
        Ok(v @ Value::Object(_)) => v,
        Ok(_) => return bad_request("Invalid JSON: expected an object".into()),
        Err(e) => return bad_request(format!("Invalid JSON: {e}")),
    };
    let fields = update_mask(query.as_deref(), &patch).unwrap_or_else(|| {
        let keys = patch.as_object().into_iter().flat_map(|o| o.keys());
        keys.filter(|k| *k != "update_mask" && *k != "id").cloned().collect()
    });
    let mut apps = sandbox.registry.apps.lock().expect("sandbox lock poisoned");
    let Some((app_id, index)) = locate(&apps, &id) else {
        return webhook_not_found(&id);
    };
    let mut updated = serde_json::to_value(&apps[&app_id].webhooks[index]).expect("a webhook serialises");
    for field in &fields {
        if !matches!(
            field.as_str(),
            "app_id" | "target" | "target_type" | "secret" | "triggers" | "client_credentials"
        ) {
            return bad_request(format!("Invalid update_mask field: {field:?}"));
        }
        updated[field.as_str()] = patch.get(field.as_str()).cloned().unwrap_or(Value::Null);
    }
    let updated: Webhook = match serde_json::from_value(updated) {
        Ok(w) => w,
        Err(e) => return bad_request(format!("Invalid webhook: {e}")),
    };
    if let Err(message) = validate(&updated) {
        return bad_request(message);
    }
    let Some(destination) = sandbox.registry.app(&mut apps, &updated.app_id) else {
        return app_not_found(&updated.app_id);
    };
    if let Err(message) = room_for(destination, &updated) {
        return bad_request(message);
    }
    apps.get_mut(&app_id).expect("located").webhooks.remove(index);
    let destination = &mut apps.get_mut(&updated.app_id).expect("present").webhooks;
    destination.insert(index.min(destination.len()), updated.clone());
    axum::Json(updated).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_sdks_form_of_update_mask_is_read() {
        let none = json!({});
        let mask = |q: Option<&str>, body: &Value| update_mask(q, body);
        let both = Some(vec!["triggers".to_owned(), "secret".to_owned()]);
        assert_eq!(mask(Some("update_mask=triggers&update_mask=secret"), &none), both);
        assert_eq!(mask(Some("update_mask=triggers%2Csecret"), &none), both);
        assert_eq!(mask(Some("update_mask=triggers,secret"), &none), both);
        assert_eq!(mask(None, &json!({"update_mask": "triggers,secret"})), both);
        assert_eq!(mask(None, &json!({"update_mask": ["triggers", "secret"]})), both);
        assert_eq!(
            mask(None, &json!({"update_mask": {"paths": ["triggers", "secret"]}})),
            both
        );
        assert_eq!(mask(None, &none), None);
    }

    #[test]
    fn a_webhook_is_checked_as_sinch_checks_it() {
        let good = Webhook {
            id: String::new(),
            app_id: "APP".into(),
            target: "https://example.com/webhooks/sinch".into(),
            target_type: "HTTP".into(),
            secret: String::new(),
            triggers: vec!["CAPABILITY".into()],
            client_credentials: None,
        };
        assert!(validate(&good).is_ok());
        let bad = |f: fn(&mut Webhook)| {
            let mut w = good.clone();
            f(&mut w);
            validate(&w).unwrap_err()
        };
        assert!(bad(|w| w.triggers = vec!["UNSPECIFIED_TRIGGER".into()]).contains("triggers"));
        assert!(bad(|w| w.triggers = vec!["NOPE".into()]).contains("triggers"));
        assert!(bad(|w| w.target = "https://conversation-api.eu.sinch.com/x".into()).contains("sinch.com"));
        assert!(bad(|w| w.target = format!("https://example.com/{}", "a".repeat(800))).contains("742"));
        assert!(bad(|w| w.app_id.clear()).contains("app_id"));
        let with = |credentials: Value| {
            let mut w = good.clone();
            w.client_credentials = Some(credentials);
            validate(&w)
        };
        let complete = json!({"client_id": "id", "client_secret": "s", "endpoint": "https://auth.example.com/token"});
        assert!(with(complete.clone()).is_ok());
        assert!(with(Value::Null).is_ok(), "null: not set");
        for missing in ["client_id", "client_secret", "endpoint"] {
            let mut partial = complete.clone();
            partial.as_object_mut().unwrap().remove(missing);
            assert!(with(partial).unwrap_err().contains(missing), "{missing}");
        }
        let mut long_scope = complete.clone();
        long_scope["scope"] = json!("s".repeat(1025));
        assert!(with(long_scope).unwrap_err().contains("scope"));
        let mut long_type = complete;
        long_type["response_type"] = json!("r".repeat(65));
        assert!(with(long_type).unwrap_err().contains("response_type"));
        assert!(with(json!("id:secret")).unwrap_err().contains("client_credentials"));
    }
}
