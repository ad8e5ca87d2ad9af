//! `doctor` and `webhook`: the service's CAPABILITY webhook at Sinch, checked and put right through Sinch's
//! Webhooks and Apps APIs, with the service's own configuration (credentials, region, secrets; in sandbox mode,
//! the in-process sandbox at CAPABILITY_SANDBOX_ADDR).

use std::process::ExitCode;

use capability_facade::{
    config::{self, Config, Upstream},
    loopback,
    registration::{self, MAX_WEBHOOKS_PER_APP, Registration},
    sandbox::SandboxConfig,
    secret::Secret,
    upstream::{self, SinchClient, wire::WebhookJson},
    webhook,
};

use super::{DoctorArgs, RegistrationArgs, WebhookArgs, WebhookCommand};

/// What the commands work with: a client of the configured Sinch (or sandbox), and the configuration.
struct Context {
    client: SinchClient,
    project_id: String,
    api_url: String,
    secrets: Vec<Secret>,
    /// No secret is set and CAPABILITY_INSECURE_WEBHOOKS is: the service accepts unsigned callbacks.
    unsigned_accepted: bool,
}

impl Context {
    /// Builds the client from the serving configuration; `Err` is the exit code after saying why. Only what
    /// talking to Sinch needs is checked: these commands bind no port and verify no callback (`webhook ensure`
    /// asks for the secret it registers).
    fn new(config: &Config) -> Result<Context, ExitCode> {
        let invalid = |problem: &dyn std::fmt::Display| {
            eprintln!("capability-facade: invalid configuration: {problem}");
            ExitCode::from(2)
        };
        let sinch = match config.upstream().map_err(|e| invalid(&e))? {
            Upstream::Sinch(sinch) => sinch,
            Upstream::Sandbox => SandboxConfig::new(config.sandbox.clone(), None).client_config(
                &format!("http://{}", loopback(config.sandbox.addr)),
                config.sinch.rate_limit,
            ),
        };
        let client = SinchClient::new(
            &sinch,
            upstream::RetryPolicy::default(),
            upstream::TokenRetry::default(),
        )
        .map_err(|e| invalid(&config::invalid(config::KEY_ID, e.to_string())))?;
        Ok(Context {
            client,
            project_id: sinch.project_id,
            api_url: sinch.api_url,
            secrets: config.webhook.secrets.secrets.clone(),
            unsigned_accepted: config.webhook.secrets.secrets.is_empty() && config.webhook.insecure,
        })
    }
}

/// The URL the commands check: `--target`, else CAPABILITY_PUBLIC_WEBHOOK_URL, else (sandbox mode) this
/// machine's webhook port, where the in-process sandbox registered the service.
fn target(args: &RegistrationArgs) -> Result<String, ExitCode> {
    if let Some(target) = &args.target {
        return Ok(target.clone());
    }
    if let Some(url) = &args.serve.registration.public_webhook_url {
        return Ok(url.as_str().to_owned());
    }
    if args.serve.upstream() == Ok(Upstream::Sandbox) {
        let scheme = if own_tls_listener(args) { "https" } else { "http" };
        return Ok(format!(
            "{scheme}://{}{}",
            loopback(args.serve.listen.webhook),
            webhook::PATH
        ));
    }
    eprintln!(
        "say which URL Sinch posts callbacks to: --target URL (or {})",
        config::PUBLIC_WEBHOOK_URL
    );
    Err(ExitCode::from(2))
}

/// Whether the URL checked is this machine's own webhook port in sandbox mode, serving TLS: the in-process
/// sandbox registered it as `https://`, and posts to it whatever its certificate.
fn own_tls_listener(args: &RegistrationArgs) -> bool {
    args.target.is_none()
        && args.serve.registration.public_webhook_url.is_none()
        && args.serve.upstream() == Ok(Upstream::Sandbox)
        && args.serve.tls.cert.is_some()
}

/// Prints one check as ✓ or ✗ (with its fix); returns whether it passed.
fn report(passed: bool, what: &str, fix: &str) -> bool {
    if passed {
        out!("✓ {what}");
    } else {
        out!("✗ {what}");
        out!("    fix: {fix}");
    }
    passed
}

/// The fix for an error that says nothing of the credentials or the app: Sinch busy or slow (try again), or not
/// reached (the address, the network); `None` for an answer about them.
fn not_settings(error: &upstream::Error) -> Option<&'static str> {
    use upstream::Error as E;
    match error {
        E::Api(e) if e.http_status >= 500 || matches!(e.http_status, 408 | 429) => Some(AGAIN),
        E::DeadlineExceeded | E::RateLimited { .. } => Some(AGAIN),
        E::Connect(_) | E::Malformed { .. } => Some(
            "check the URL above (SINCH_REGION, or SINCH_API_URL and SINCH_AUTH_URL), DNS, and that the network \
             (a cluster's egress, a proxy) reaches it",
        ),
        _ => None,
    }
}

/// The fix when Sinch was busy or did not answer in time.
const AGAIN: &str = "run the doctor again in a while: Sinch was busy or did not answer in time";

/// `capability-facade doctor`: every check, ✓ or ✗ with the fix; exits 0 only when all pass.
pub async fn doctor(args: DoctorArgs) -> ExitCode {
    let (ctx, target) = match (Context::new(&args.registration.serve), target(&args.registration)) {
        (Ok(ctx), Ok(target)) => (ctx, target),
        (Err(code), _) | (_, Err(code)) => return code,
    };
    let app = &args.registration.app_id;
    out!("Checking app {app} and webhook {target} at {}", ctx.api_url);
    let ensure = format!("capability-facade webhook ensure --app-id {app} --target {target}");
    let mut all = true;

    // With OAuth2 a token proves the credentials; with HTTP Basic (nothing to obtain) the app's call does.
    let mut app_call = None;
    let mut credentials = ctx.client.obtain_token().await;
    if credentials.is_ok() {
        let called = ctx.client.app_webhook_rate(app).await;
        if let Err(e @ upstream::Error::Credentials(_)) = &called {
            credentials = Err(e.clone());
        }
        app_call = Some(called);
    }
    let what = match &credentials {
        Ok(()) => "credentials: Sinch accepts them".to_owned(),
        Err(e) => format!("credentials: {e}"),
    };
    let fix = match &credentials {
        Err(e) => not_settings(e).unwrap_or("check SINCH_PROJECT_ID, SINCH_KEY_ID, SINCH_KEY_SECRET and SINCH_AUTH"),
        Ok(()) => "",
    };
    let (true, Some(app_call)) = (report(credentials.is_ok(), &what, fix), app_call) else {
        return ExitCode::FAILURE;
    };
    let rate = match app_call {
        Ok(rate) => {
            report(true, &format!("app {app} exists in this region"), "");
            rate
        }
        Err(e) => {
            let fix = not_settings(&e)
                .unwrap_or("check the app id, and SINCH_REGION: the app must be in the region of the API URL above");
            report(false, &format!("app {app}: {e}"), fix);
            return ExitCode::FAILURE;
        }
    };
    let rate = rate.map_or("not given (Sinch's default is 25/s)".to_owned(), |r| format!("{r}/s"));
    report(true, &format!("callback rate (rate_limits.webhooks): {rate}"), "");

    let webhooks = match ctx.client.list_webhooks(app).await {
        Ok(w) => w,
        Err(e) => {
            report(
                false,
                &format!("the webhooks of app {app} cannot be listed: {e}"),
                "see the error",
            );
            return ExitCode::FAILURE;
        }
    };
    let ours = match registration::find(&webhooks, &target) {
        Registration::Registered(w) => {
            report(
                true,
                &format!("webhook {} targets {target} with trigger CAPABILITY", w.id),
                "",
            );
            Some(w)
        }
        Registration::Several(ws) => {
            all &= report(
                false,
                &registration::several(&ws, &target),
                "delete all but one (capability-facade webhook delete --id ID)",
            );
            Some(ws[0])
        }
        Registration::WithoutCapability(w) => {
            all &= report(
                false,
                &format!(
                    "webhook {} targets {target} {}: it receives no CAPABILITY callbacks",
                    w.id,
                    registration::not_delivering(w)
                ),
                &ensure,
            );
            Some(w)
        }
        Registration::Missing { full: true } => {
            all &= report(
                false,
                &format!(
                    "no webhook of app {app} targets {target}, and the app has {MAX_WEBHOOKS_PER_APP}, the most Sinch allows"
                ),
                &format!(
                    "delete one (capability-facade webhook list --app-id {app}; webhook delete --id ID), then {ensure}"
                ),
            );
            None
        }
        Registration::Missing { full: false } => {
            all &= report(false, &format!("no webhook of app {app} targets {target}"), &ensure);
            None
        }
    };
    if ours.is_some() && ctx.unsigned_accepted {
        report(
            true,
            &format!(
                "its secret is not checked: with {} and no SINCH_WEBHOOK_SECRETS the service accepts unsigned \
                 callbacks (never in production)",
                config::INSECURE_WEBHOOKS
            ),
            "",
        );
    } else if let Some(w) = ours {
        let known = registration::secret_known(w, &ctx.secrets);
        let what = if ctx.secrets.is_empty() {
            "its secret cannot be compared: SINCH_WEBHOOK_SECRETS is not set".to_owned()
        } else if known {
            "its secret is one of SINCH_WEBHOOK_SECRETS".to_owned()
        } else {
            "its secret is not one of SINCH_WEBHOOK_SECRETS: the service will refuse its callbacks (401)".to_owned()
        };
        all &= report(
            known,
            &what,
            &format!(
                "{ensure} (sets the first of SINCH_WEBHOOK_SECRETS), or add the webhook's secret to SINCH_WEBHOOK_SECRETS"
            ),
        );
    }

    // Signed as Sinch would sign it: with the registered secret, else with the service's; unsigned when the
    // service accepts that.
    let secret = ours
        .map(|w| w.secret.clone())
        .filter(|s| !s.is_empty())
        .or_else(|| ctx.secrets.first().map(|s| s.expose().to_owned()));
    if secret.is_none() && !ctx.unsigned_accepted {
        report(
            false,
            "no secret to sign a test callback with",
            "set SINCH_WEBHOOK_SECRETS",
        );
        return ExitCode::FAILURE;
    }
    let now = humantime::format_rfc3339_micros(std::time::SystemTime::now()).to_string();
    let body = serde_json::json!({"app_id": app, "accepted_time": now, "event_time": now,
        "project_id": ctx.project_id, "message_metadata": "", "correlation_id": "",
        "capability_notification": {"request_id": format!("doctor-{}", ulid::Ulid::new()), "channel": "SMS",
            "identity": "0", "capability_status": "CAPABILITY_UNKNOWN"}});
    let body = serde_json::to_vec(&body).expect("JSON serialises");
    // To the URL Sinch will post to: the registered one, when there is one.
    let target = ours.map_or(target.as_str(), |w| w.target.as_str());
    let own_listener = own_tls_listener(&args.registration);
    // What the callback is, and why and what to do when the receiver refuses it (401).
    let (callback, refused, fix_refused) = match secret {
        Some(_) => (
            "a signed test callback",
            "does not know the secret",
            "the SINCH_WEBHOOK_SECRETS of the service at the target must include the webhook's secret",
        ),
        None => (
            "an unsigned test callback",
            "checks signatures",
            "the service at the target checks signatures: register the webhook with its secret (webhook ensure, with \
             its SINCH_WEBHOOK_SECRETS)",
        ),
    };
    let passed = match ctx
        .client
        .post_signed_callback(target, secret.as_deref(), body, own_listener)
        .await
    {
        Ok((200, _)) => report(true, &format!("{callback} to {target} was accepted"), ""),
        Ok((status @ 300..=399, location)) => report(
            false,
            &format!(
                "{callback} to {target} was redirected ({status}) to {}",
                location.as_deref().unwrap_or("nowhere said")
            ),
            "register the URL it redirects to: Sinch posts to the registered URL and is not known to follow redirects",
        ),
        Ok((401, _)) => report(
            false,
            &format!("{callback} to {target} was refused (401): the receiver {refused}"),
            fix_refused,
        ),
        Ok((status, _)) => report(
            false,
            &format!("{callback} to {target} was answered {status}"),
            "check that the target is this service's /webhooks/sinch, through the ingress",
        ),
        Err(e) => report(
            false,
            &format!("a test callback could not be posted to {target}: {e}"),
            "check the URL, the ingress and DNS from where Sinch posts",
        ),
    };
    all &= passed;
    if all { ExitCode::SUCCESS } else { ExitCode::FAILURE }
}

/// `capability-facade webhook …`
pub async fn webhook(args: WebhookArgs) -> ExitCode {
    match args.command {
        WebhookCommand::List(args) => list(args).await,
        WebhookCommand::Ensure(args) => ensure(args).await,
        WebhookCommand::Update(args) => update(args).await,
        WebhookCommand::Delete(args) => delete(args).await,
    }
}

fn failed(what: &str, e: &upstream::Error) -> ExitCode {
    eprintln!("{what}: {e}");
    ExitCode::FAILURE
}

async fn list(args: RegistrationArgs) -> ExitCode {
    let ctx = match Context::new(&args.serve) {
        Ok(ctx) => ctx,
        Err(code) => return code,
    };
    match ctx.client.list_webhooks(&args.app_id).await {
        Ok(webhooks) => {
            out!("{:<28} {:<10} {:<8} {:<40} TARGET", "ID", "TYPE", "SECRET", "TRIGGERS");
            for w in &webhooks {
                let secret = match (w.secret.is_empty(), registration::secret_known(w, &ctx.secrets)) {
                    (true, _) => "none",
                    (false, true) => "ours",
                    (false, false) => "other",
                };
                out!(
                    "{:<28} {:<10} {:<8} {:<40} {}",
                    w.id,
                    w.target_type,
                    secret,
                    w.triggers.join(","),
                    w.target
                );
            }
            ExitCode::SUCCESS
        }
        Err(e) => failed(&format!("the webhooks of app {} cannot be listed", args.app_id), &e),
    }
}

async fn ensure(args: RegistrationArgs) -> ExitCode {
    let (ctx, target) = match (Context::new(&args.serve), target(&args)) {
        (Ok(ctx), Ok(target)) => (ctx, target),
        (Err(code), _) | (_, Err(code)) => return code,
    };
    let Some(secret) = ctx.secrets.first() else {
        eprintln!(
            "{}: set the service's webhook secret; the webhook is registered with the first",
            config::WEBHOOK_SECRETS
        );
        return ExitCode::from(2);
    };
    let app = &args.app_id;
    let webhooks = match ctx.client.list_webhooks(app).await {
        Ok(w) => w,
        Err(e) => return failed(&format!("the webhooks of app {app} cannot be listed"), &e),
    };
    let existing = match registration::find(&webhooks, &target) {
        Registration::Registered(w) if registration::secret_known(w, &ctx.secrets) => {
            out!(
                "webhook {} already targets {target} with trigger CAPABILITY and the service's secret",
                w.id
            );
            return ExitCode::SUCCESS;
        }
        Registration::Registered(w) | Registration::WithoutCapability(w) => Some(w.clone()),
        Registration::Several(ws) => {
            eprintln!(
                "app {app}: {}: delete all but one (capability-facade webhook delete --id ID), then run this again",
                registration::several(&ws, &target)
            );
            return ExitCode::FAILURE;
        }
        Registration::Missing { full: true } => {
            eprintln!(
                "app {app} already has {MAX_WEBHOOKS_PER_APP} webhooks, the most Sinch allows, and none targets {target}: \
                 delete one (capability-facade webhook delete --id ID) or point one at {target} \
                 (capability-facade webhook update --id ID --target {target}), then run this again"
            );
            return ExitCode::FAILURE;
        }
        Registration::Missing { full: false } => None,
    };
    match existing {
        Some(mut w) => {
            if !w.triggers.iter().any(|t| t == "CAPABILITY") {
                w.triggers.push("CAPABILITY".to_owned());
            }
            w.secret = secret.expose().to_owned();
            w.target_type = "HTTP".to_owned();
            match ctx
                .client
                .update_webhook(&w.id, &w, &["triggers", "secret", "target_type"])
                .await
            {
                Ok(w) => {
                    out!(
                        "updated webhook {}: trigger CAPABILITY, the service's secret, target {target}",
                        w.id
                    );
                    ExitCode::SUCCESS
                }
                Err(e) => failed(&format!("webhook {} cannot be updated", w.id), &e),
            }
        }
        None => {
            let webhook = WebhookJson {
                id: String::new(),
                app_id: app.clone(),
                target: target.clone(),
                target_type: "HTTP".to_owned(),
                secret: secret.expose().to_owned(),
                triggers: vec!["CAPABILITY".to_owned()],
                client_credentials: None,
            };
            match ctx.client.create_webhook(&webhook).await {
                Ok(w) => {
                    out!(
                        "created webhook {}: trigger CAPABILITY, the service's secret, target {target}",
                        w.id
                    );
                    ExitCode::SUCCESS
                }
                Err(e) => failed(&format!("a webhook of app {app} cannot be created"), &e),
            }
        }
    }
}

async fn update(args: super::UpdateArgs) -> ExitCode {
    let ctx = match Context::new(&args.serve) {
        Ok(ctx) => ctx,
        Err(code) => return code,
    };
    let mut webhook = WebhookJson {
        id: args.id.clone(),
        app_id: String::new(),
        target: String::new(),
        target_type: String::new(),
        secret: String::new(),
        triggers: Vec::new(),
        client_credentials: None,
    };
    let mut fields = Vec::new();
    if let Some(target) = args.target {
        webhook.target = target;
        fields.push("target");
    }
    if !args.triggers.is_empty() {
        webhook.triggers = args.triggers;
        fields.push("triggers");
    }
    if let Some(secret) = args.secret {
        webhook.secret = secret.expose().to_owned();
        fields.push("secret");
    }
    if fields.is_empty() {
        eprintln!("nothing to change: give --target, --triggers or --secret");
        return ExitCode::from(2);
    }
    match ctx.client.update_webhook(&args.id, &webhook, &fields).await {
        Ok(w) => {
            out!("updated webhook {}: {}", w.id, fields.join(", "));
            ExitCode::SUCCESS
        }
        Err(e) => failed(&format!("webhook {} cannot be updated", args.id), &e),
    }
}

async fn delete(args: super::DeleteArgs) -> ExitCode {
    let ctx = match Context::new(&args.serve) {
        Ok(ctx) => ctx,
        Err(code) => return code,
    };
    match ctx.client.delete_webhook(&args.id).await {
        Ok(()) => {
            out!("deleted webhook {}", args.id);
            ExitCode::SUCCESS
        }
        Err(e) => failed(&format!("webhook {} cannot be deleted", args.id), &e),
    }
}
