//! The service's CAPABILITY webhook at Sinch: what an app's list of webhooks says about it, and the check the
//! service makes at start when `CAPABILITY_PUBLIC_WEBHOOK_URL` and `CAPABILITY_APP_IDS` are set.

use std::time::Duration;

use subtle::ConstantTimeEq;

use crate::{secret::Secret, upstream, upstream::SinchClient, upstream::wire::WebhookJson};

/// Sinch's limit of webhooks per app.
pub const MAX_WEBHOOKS_PER_APP: usize = 5;

/// The name of the warning logged at start when the webhook is not registered as it must be.
pub const NOT_REGISTERED: &str = "WEBHOOK_NOT_REGISTERED";

/// Where the webhook of `target` stands among an app's webhooks.
#[derive(Debug)]
pub enum Registration<'a> {
    /// One webhook targets it and receives CAPABILITY callbacks.
    Registered(&'a WebhookJson),
    /// Several webhooks target it and receive CAPABILITY callbacks: Sinch sends each callback to each of them.
    Several(Vec<&'a WebhookJson>),
    /// A webhook targets it but receives no CAPABILITY callbacks (the trigger is missing, or it is not `HTTP`).
    WithoutCapability(&'a WebhookJson),
    /// No webhook targets it; `full` when the app already has the most webhooks Sinch allows.
    Missing { full: bool },
}

/// Finds the webhooks of `target` among all the app's: each that targets the same URL (see [`same_url`]) is
/// judged, not only the first listed.
pub fn find<'a>(webhooks: &'a [WebhookJson], target: &str) -> Registration<'a> {
    let ours: Vec<&WebhookJson> = webhooks.iter().filter(|w| same_url(&w.target, target)).collect();
    let mut delivering: Vec<&WebhookJson> = ours.iter().copied().filter(|w| w.wants_capability()).collect();
    match (delivering.len(), ours.first()) {
        (0, Some(w)) => Registration::WithoutCapability(w),
        (0, None) => Registration::Missing {
            full: webhooks.len() >= MAX_WEBHOOKS_PER_APP,
        },
        (1, _) => Registration::Registered(delivering.remove(0)),
        _ => Registration::Several(delivering),
    }
}

/// Whether two webhook targets name the same URL: compared parsed (the scheme and host in any case, a port the
/// scheme has by default written or not), a trailing `/` not counting; as text when one does not parse.
pub fn same_url(a: &str, b: &str) -> bool {
    let (a, b) = (a.trim().trim_end_matches('/'), b.trim().trim_end_matches('/'));
    match (url::Url::parse(a), url::Url::parse(b)) {
        (Ok(a), Ok(b)) => {
            let path = |u: &url::Url| u.path().trim_end_matches('/').to_owned();
            (a.scheme(), a.host_str(), a.port_or_known_default(), path(&a), a.query())
                == (b.scheme(), b.host_str(), b.port_or_known_default(), path(&b), b.query())
        }
        _ => a == b,
    }
}

/// Whether the webhook's secret is one of `secrets`, compared in constant time.
pub fn secret_known(webhook: &WebhookJson, secrets: &[Secret]) -> bool {
    !webhook.secret.is_empty()
        && secrets
            .iter()
            .any(|s| bool::from(s.expose().as_bytes().ct_eq(webhook.secret.as_bytes())))
}

/// Checks each app's registration of `target`: logs [`NOT_REGISTERED`] for each app whose webhook is missing,
/// sends no CAPABILITY callbacks (no trigger, or a type other than HTTP), has a secret the service does not know
/// (when it knows any), or is one of several that send them, and sets the gauge
/// `capability_webhook_registered{app_id}` to 1 (registered as it must be) or 0. An app whose webhooks could not
/// be listed because Sinch was busy (past the client's retries) or unreachable counts 0 and is checked again 5 s
/// later, then at twice the interval each time, up to 5 min, until Sinch answers; a refusal (an unknown app,
/// credentials) is reported once.
pub async fn check_at_start(client: &SinchClient, target: &str, apps: &[String], secrets: &[Secret]) {
    const FIRST_AGAIN: Duration = Duration::from_secs(5);
    const LONGEST_AGAIN: Duration = Duration::from_secs(300);
    let mut unknown: Vec<&String> = apps.iter().collect();
    let mut again = FIRST_AGAIN;
    loop {
        let mut still = Vec::new();
        for app_id in unknown {
            let problem = match client.list_webhooks(app_id).await {
                Err(e) if busy(&e) => {
                    still.push(app_id);
                    Some(format!(
                        "its webhooks could not be listed: {e} (checked again in {}s)",
                        again.as_secs()
                    ))
                }
                // An answer that will not change by asking again (an unknown app, refused credentials).
                Err(e) => Some(format!("its webhooks could not be listed: {e}")),
                Ok(webhooks) => registration_problem(&webhooks, target, secrets),
            };
            report(app_id, target, problem);
        }
        if still.is_empty() {
            return;
        }
        unknown = still;
        tokio::time::sleep(again).await;
        again = (again * 2).min(LONGEST_AGAIN);
    }
}

/// Whether `error` may pass when asked again: Sinch busy or unreachable (any 5xx, a proxy's 52x too), or no answer
/// in time.
fn busy(error: &upstream::Error) -> bool {
    use upstream::Error as E;
    let server_side = matches!(error, E::Api(e) if e.http_status >= 500);
    server_side
        || error.is_retryable()
        || matches!(error, E::DeadlineExceeded | E::RateLimited { .. } | E::Malformed { .. })
}

/// What is wrong with the registration of `target` among `webhooks`, if anything.
fn registration_problem(webhooks: &[WebhookJson], target: &str, secrets: &[Secret]) -> Option<String> {
    match find(webhooks, target) {
        // Without a secret (CAPABILITY_INSECURE_WEBHOOKS), every callback is accepted.
        Registration::Registered(w) if secrets.is_empty() || secret_known(w, secrets) => None,
        Registration::Registered(w) => Some(format!(
            "webhook {} targets it, but its secret is not one of SINCH_WEBHOOK_SECRETS: callbacks will be \
             refused with 401",
            w.id
        )),
        Registration::Several(ws) => Some(several(&ws, "it")),
        Registration::WithoutCapability(w) => Some(format!(
            "webhook {} targets it {}: no capability callback will arrive",
            w.id,
            not_delivering(w)
        )),
        Registration::Missing { .. } => Some("no webhook targets it: no callback will arrive".to_owned()),
    }
}

/// What is wrong with several webhooks of `target` that all send CAPABILITY callbacks.
pub fn several(webhooks: &[&WebhookJson], target: &str) -> String {
    let ids: Vec<&str> = webhooks.iter().map(|w| w.id.as_str()).collect();
    format!(
        "webhooks {} all target {target} with the CAPABILITY trigger: Sinch sends each callback to each of them, \
         spending the app's callback rate as many times",
        ids.join(", ")
    )
}

/// Why a webhook sends no CAPABILITY callbacks: its trigger missing, or its type.
pub fn not_delivering(webhook: &WebhookJson) -> String {
    match webhook.triggers.iter().any(|t| t == "CAPABILITY") {
        false => "without the CAPABILITY trigger".to_owned(),
        true => format!(
            "with target_type {}, which sends nothing (HTTP does)",
            webhook.target_type
        ),
    }
}

/// Sets the app's gauge and logs what was found.
fn report(app_id: &str, target: &str, problem: Option<String>) {
    let registered = if problem.is_none() { 1.0 } else { 0.0 };
    metrics::gauge!("capability_webhook_registered", "app_id" => app_id.to_owned()).set(registered);
    // `webhook_url`, not `target`: the JSON log has a `target` of its own (the module).
    match problem {
        None => tracing::info!(%app_id, webhook_url = %target, "the CAPABILITY webhook is registered"),
        Some(problem) => tracing::warn!(
            warning = NOT_REGISTERED, %app_id, webhook_url = %target,
            "{NOT_REGISTERED}: app {app_id}: {problem}; run `capability-facade doctor --app-id {app_id} \
             --target {target}` for the fix"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn webhook(target: &str, triggers: &[&str], secret: &str) -> WebhookJson {
        WebhookJson {
            id: format!("id-{target}"),
            app_id: "APP".into(),
            target: target.into(),
            target_type: "HTTP".into(),
            secret: secret.into(),
            triggers: triggers.iter().map(|t| (*t).to_owned()).collect(),
            client_credentials: None,
        }
    }

    #[test]
    fn the_registration_of_a_target_is_told_apart() {
        let ours = "https://facade.example.com/webhooks/sinch";
        let list = [
            webhook("https://other.example.com", &["CAPABILITY"], "x"),
            webhook(&format!("{ours}/"), &["MESSAGE_DELIVERY", "CAPABILITY"], "s1"),
        ];
        assert!(matches!(find(&list, ours), Registration::Registered(w) if w.secret == "s1"));
        assert!(secret_known(&list[1], &[Secret::new("old"), Secret::new("s1")]));
        assert!(!secret_known(&list[1], &[Secret::new("s2")]));
        let wrong_trigger = [webhook(ours, &["MESSAGE_DELIVERY"], "s1")];
        assert!(matches!(find(&wrong_trigger, ours), Registration::WithoutCapability(_)));
        // Only `HTTP` is known to deliver (an older spec listed `GRPC`), or no type said (Sinch's default: the
        // sandbox's too): `webhook ensure` sets `HTTP`.
        let mut other_type = webhook(ours, &["CAPABILITY"], "s1");
        other_type.target_type = "GRPC".into();
        assert!(matches!(find(&[other_type], ours), Registration::WithoutCapability(_)));
        let mut no_type = webhook(ours, &["CAPABILITY"], "s1");
        no_type.target_type = String::new();
        assert!(matches!(find(&[no_type], ours), Registration::Registered(_)));
        let full: Vec<_> = (0..5)
            .map(|n| webhook(&format!("https://h/{n}"), &["CAPABILITY"], ""))
            .collect();
        assert!(matches!(find(&full, ours), Registration::Missing { full: true }));
        assert!(matches!(find(&full[..4], ours), Registration::Missing { full: false }));
    }
}
