//! The doctor and the `webhook` commands of the real binary against a sandbox, and the service's start-up
//! check: a correct, a missing, a wrong-trigger, a wrong-secret and a full registration, each named with its fix.

mod common;

use std::process::Output;

use capability_facade::sandbox;
use common::Sandbox;
use serde_json::{Value, json};

const SECRET: &str = "doctor-secret";

/// Runs the binary with `args`, configured (by environment only) for `sandbox` and the service's secret.
async fn run(sandbox: &Sandbox, args: &[&str]) -> (Option<i32>, String) {
    run_with(sandbox, &[], args).await
}

/// [`run`], with `changed` variables set otherwise.
async fn run_with(sandbox: &Sandbox, changed: &[(&str, &str)], args: &[&str]) -> (Option<i32>, String) {
    let Output { status, stdout, stderr } = tokio::process::Command::new(env!("CARGO_BIN_EXE_capability-facade"))
        .env_clear()
        .env("SINCH_PROJECT_ID", sandbox::PROJECT_ID)
        .env("SINCH_KEY_ID", sandbox::KEY_ID)
        .env("SINCH_KEY_SECRET", sandbox::KEY_SECRET)
        .env("SINCH_API_URL", &sandbox.url)
        .env("SINCH_AUTH_URL", format!("{}/oauth2/token", sandbox.url))
        .env("SINCH_WEBHOOK_SECRETS", SECRET)
        .env("SINCH_APP_ID", "APP-1")
        .envs(changed.iter().copied())
        .args(args)
        .output()
        .await
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&stdout),
        String::from_utf8_lossy(&stderr)
    );
    (status.code(), text)
}

async fn webhooks(sandbox: &Sandbox) -> Vec<Value> {
    let (_, list) = sandbox.call(reqwest::Method::GET, "/apps/APP-1/webhooks", None).await;
    list["webhooks"].as_array().unwrap().clone()
}

#[tokio::test]
async fn the_doctor_names_each_broken_registration_and_ensure_mends_it() {
    let sandbox = Sandbox::start(&["--sandbox-apps=APP-1"], None).await;
    let service = sandbox.service(&[&format!("--sinch-webhook-secrets={SECRET}")]).await;
    let target = format!("http://{}/webhooks/sinch", service.webhook_addr);
    let doctor = ["doctor", "--target", target.as_str()];
    let ensure = ["webhook", "ensure", "--target", target.as_str()];

    let (code, out) = run(&sandbox, &doctor).await;
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains("✓ credentials") && out.contains("✓ app APP-1 exists"),
        "{out}"
    );
    assert!(out.contains("✗ no webhook of app APP-1 targets"), "{out}");
    assert!(out.contains("fix: capability-facade webhook ensure"), "{out}");

    let (code, out) = run(&sandbox, &ensure).await;
    assert_eq!(code, Some(0), "{out}");
    let (code, out) = run(&sandbox, &ensure).await;
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("already targets"), "idempotent: {out}");
    assert_eq!(webhooks(&sandbox).await.len(), 1);
    let (code, out) = run(&sandbox, &doctor).await;
    assert_eq!(code, Some(0), "{out}");
    assert!(!out.contains('✗'), "{out}");
    assert!(
        out.contains("a signed test callback") && out.contains("was accepted"),
        "{out}"
    );
    assert!(out.contains("25/s"), "the callback rate: {out}");
    let (code, out) = run(&sandbox, &["webhook", "list"]).await;
    assert_eq!(code, Some(0));
    assert!(
        out.contains("ours") && !out.contains(SECRET),
        "secrets are never printed: {out}"
    );

    let id = webhooks(&sandbox).await[0]["id"].as_str().unwrap().to_owned();
    let (code, _) = run(
        &sandbox,
        &["webhook", "update", "--id", &id, "--triggers", "MESSAGE_DELIVERY"],
    )
    .await;
    assert_eq!(code, Some(0));
    let (code, out) = run(&sandbox, &doctor).await;
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("receives no CAPABILITY callbacks"), "wrong trigger: {out}");

    assert_eq!(run(&sandbox, &ensure).await.0, Some(0));
    let (code, _) = run(
        &sandbox,
        &["webhook", "update", "--id", &id, "--secret", "not-the-services"],
    )
    .await;
    assert_eq!(code, Some(0));
    let (code, out) = run(&sandbox, &doctor).await;
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains("✗ its secret is not one of SINCH_WEBHOOK_SECRETS"),
        "wrong secret: {out}"
    );
    assert!(out.contains("refused (401)"), "the test callback shows it: {out}");

    assert_eq!(run(&sandbox, &["webhook", "delete", "--id", &id]).await.0, Some(0));
    for n in 0..5 {
        let other = json!({"app_id": "APP-1", "target": format!("https://elsewhere.example.com/{n}"),
            "triggers": ["MESSAGE_DELIVERY"]});
        assert_eq!(
            sandbox.call(reqwest::Method::POST, "/webhooks", Some(other)).await.0,
            200
        );
    }
    let (code, out) = run(&sandbox, &doctor).await;
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("the most Sinch allows"), "full: {out}");
    let (code, out) = run(&sandbox, &ensure).await;
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("already has 5 webhooks"), "ensure refuses: {out}");
    assert_eq!(webhooks(&sandbox).await.len(), 5, "nothing was changed");
}

#[tokio::test]
async fn the_service_warns_at_start_when_its_public_url_is_not_registered() {
    let sandbox = Sandbox::start(&["--sandbox-apps=APP-1,APP-2"], None).await;
    let registered = json!({"app_id": "APP-2", "target": "https://facade.example.com/webhooks/sinch",
        "secret": SECRET, "triggers": ["CAPABILITY"]});
    assert_eq!(
        sandbox
            .call(reqwest::Method::POST, "/webhooks", Some(registered))
            .await
            .0,
        200
    );
    let env = vec![
        ("SINCH_PROJECT_ID", sandbox::PROJECT_ID.to_owned()),
        ("SINCH_KEY_ID", sandbox::KEY_ID.to_owned()),
        ("SINCH_KEY_SECRET", sandbox::KEY_SECRET.to_owned()),
        ("SINCH_API_URL", sandbox.url.clone()),
        ("SINCH_AUTH_URL", format!("{}/oauth2/token", sandbox.url)),
        ("SINCH_WEBHOOK_SECRETS", SECRET.to_owned()),
    ];
    // Stray commas name no app: each made an app "" whose gauge said 0, and a warning, for as long as it ran.
    // One line per app: a warning for APP-1, whose URL is not registered; APP-2 is registered as it must be.
    let (binary, outcomes) = checked_in(env, "APP-1,,APP-2,", 2).await;
    let warnings: Vec<&String> = outcomes
        .iter()
        .filter(|l| l.contains("WEBHOOK_NOT_REGISTERED"))
        .collect();
    assert_eq!(warnings.len(), 1, "{outcomes:?}");
    assert!(
        warnings[0].contains("APP-1") && warnings[0].contains("no webhook targets it"),
        "{outcomes:?}"
    );
    let metrics = common::metrics_text(binary.admin_addr).await;
    assert!(
        metrics.contains(r#"capability_webhook_registered{app_id="APP-1"} 0"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"capability_webhook_registered{app_id="APP-2"} 1"#),
        "{metrics}"
    );
    assert!(!metrics.contains(r#"app_id="""#), "{metrics}");
}

/// The URL the start-up check tests look for.
const PUBLIC_URL: &str = "https://facade.example.com/webhooks/sinch";

/// Sinch busy, as a webhook list may be answered.
fn busy() -> common::Canned {
    common::Canned::sinch_error(503, "UNAVAILABLE", "The service is currently unavailable.")
}

/// APP-1's webhooks: one targeting [`PUBLIC_URL`] as it must.
fn listing() -> common::Canned {
    let listed = json!({"webhooks": [{"id": "W1", "app_id": "APP-1", "target": PUBLIC_URL, "target_type": "HTTP",
        "secret": common::WEBHOOK_SECRET, "triggers": ["CAPABILITY"]}]});
    common::Canned::new(200, listed.to_string())
}

/// The service against `fake`, checking at start that `app` registered [`PUBLIC_URL`]; the first `n` outcomes of
/// that check it logged.
async fn checked_at_start(fake: &common::FakeSinch, app: &str, n: usize) -> (common::Binary, Vec<String>) {
    checked_in(common::binary_env(fake), app, n).await
}

/// [`checked_at_start`], the service run with `env`.
async fn checked_in(mut env: Vec<(&str, String)>, app: &str, n: usize) -> (common::Binary, Vec<String>) {
    env.push(("CAPABILITY_PUBLIC_WEBHOOK_URL", PUBLIC_URL.into()));
    env.push(("CAPABILITY_APP_IDS", app.into()));
    let binary = common::Binary::spawn(&env).await;
    let outcomes = binary
        .until_logged(n, |l| {
            l.contains("WEBHOOK_NOT_REGISTERED") || l.contains("webhook is registered")
        })
        .await;
    (binary, outcomes)
}

/// The service against `fake` finds APP-1's webhook registered at start, and its gauge says so.
async fn registered_at_start(fake: &common::FakeSinch) {
    let (binary, outcome) = checked_at_start(fake, "APP-1", 1).await;
    assert!(outcome[0].contains("webhook is registered"), "{outcome:?}");
    assert_registered(&binary).await;
}

/// APP-1's gauge says registered.
async fn assert_registered(binary: &common::Binary) {
    let metrics = common::metrics_text(binary.admin_addr).await;
    assert!(
        metrics.contains(r#"capability_webhook_registered{app_id="APP-1"} 1"#),
        "{metrics}"
    );
}

/// Sinch busy when the service starts (a 503 on the webhook list) does not leave the service saying its webhook is
/// not registered until its next restart: the list is asked for again.
#[tokio::test]
async fn the_start_up_check_outlasts_a_busy_sinch() {
    let fake = common::FakeSinch::start().await;
    fake.script_api([busy(), listing()]);
    registered_at_start(&fake).await;
}

/// Sinch busy past the client's retries at start: the app counts as not registered, and is checked again until
/// Sinch answers.
#[tokio::test]
async fn the_start_up_check_is_repeated_until_sinch_answers() {
    let fake = common::FakeSinch::start().await;
    fake.script_api(std::iter::repeat_n(busy(), 5).chain([listing()]));
    let (binary, outcomes) = checked_at_start(&fake, "APP-1", 2).await;
    assert!(outcomes[0].contains("could not be listed"), "{outcomes:?}");
    assert!(outcomes[1].contains("webhook is registered"), "{outcomes:?}");
    assert_registered(&binary).await;
}

/// Sinch may send a key it has no value for as `null` (its SDKs read `secret`, `target_type` and
/// `client_credentials` without checking them): one other webhook listed so made the whole list unreadable, and
/// the app counted as not registered, checked again every 5 minutes for ever.
#[tokio::test]
async fn a_webhook_listed_with_nulls_is_read_as_empty() {
    let fake = common::FakeSinch::start().await;
    let listed = json!({"webhooks": [
        {"id": "W0", "app_id": "APP-1", "target": "https://other.example.com/hook", "target_type": null,
            "secret": null, "triggers": null, "client_credentials": null},
        {"id": "W1", "app_id": "APP-1", "target": PUBLIC_URL, "target_type": "HTTP",
            "secret": common::WEBHOOK_SECRET, "triggers": ["CAPABILITY"], "client_credentials": null}]});
    fake.script_api([common::Canned::new(200, listed.to_string())]);
    registered_at_start(&fake).await;
}

/// Run with `CAPABILITY_INSECURE_WEBHOOKS` and no secret, the service accepts every callback: a webhook with the
/// CAPABILITY trigger is registered as it must be, whatever its secret. The start-up check warned that its
/// callbacks would be refused with 401, and its gauge said 0 for as long as the replica ran.
#[tokio::test]
async fn without_secrets_in_insecure_mode_a_webhook_with_any_secret_is_registered() {
    let fake = common::FakeSinch::start().await;
    fake.script_api([listing()]);
    let mut env: Vec<(&str, String)> = common::binary_env(&fake)
        .into_iter()
        .filter(|(name, _)| *name != "SINCH_WEBHOOK_SECRETS")
        .collect();
    env.push(("CAPABILITY_INSECURE_WEBHOOKS", "true".into()));
    let (binary, outcome) = checked_in(env, "APP-1", 1).await;
    assert!(outcome[0].contains("webhook is registered"), "{outcome:?}");
    assert_registered(&binary).await;
}

/// Run in insecure mode (no secret, `CAPABILITY_INSECURE_WEBHOOKS=true`) the service accepts every callback, so a
/// webhook with the CAPABILITY trigger works whatever its secret, and with none. The doctor failed it ("its secret
/// cannot be compared"), and for a webhook without a secret had no secret to sign its test callback with.
#[tokio::test]
async fn in_insecure_mode_the_doctor_passes_a_webhook_whatever_its_secret() {
    let sandbox = Sandbox::start(&["--sandbox-apps=APP-1"], None).await;
    let service = sandbox
        .service(&["--sinch-webhook-secrets=", "--insecure-webhooks=true"])
        .await;
    let target = format!("http://{}/webhooks/sinch", service.webhook_addr);
    let insecure = [("SINCH_WEBHOOK_SECRETS", ""), ("CAPABILITY_INSECURE_WEBHOOKS", "true")];
    for secret in ["any-secret", ""] {
        let id = register(&sandbox, &target, &["CAPABILITY"], secret).await;
        let (code, out) = run_with(&sandbox, &insecure, &["doctor", "--target", &target]).await;
        assert_eq!(code, Some(0), "secret {secret:?}: {out}");
        assert!(out.contains("✓ its secret is not checked"), "{out}");
        assert!(out.contains("was accepted"), "{out}");
        assert_eq!(run(&sandbox, &["webhook", "delete", "--id", &id]).await.0, Some(0));
    }

    // Without the insecure flag the service would not start: the doctor says so rather than pass.
    register(&sandbox, &target, &["CAPABILITY"], "any-secret").await;
    let (code, out) = run_with(&sandbox, &insecure[..1], &["doctor", "--target", &target]).await;
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("SINCH_WEBHOOK_SECRETS is not set"), "{out}");
}

/// An answer that will not change (Sinch does not know the app) is reported once, not asked again for ever.
#[tokio::test]
async fn the_start_up_check_asks_again_only_when_sinch_was_busy() {
    let fake = common::FakeSinch::start().await;
    fake.script_api([common::Canned::sinch_error(404, "NOT_FOUND", "App not found")]);
    let (_binary, outcome) = checked_at_start(&fake, "APP-X", 1).await;
    assert!(outcome[0].contains("404"), "{outcome:?}");
    assert!(!outcome[0].contains("checked again"), "{outcome:?}");
}

/// A deletion Sinch answers without a body (204) succeeded: the command says so.
#[tokio::test]
async fn a_deletion_answered_without_a_body_succeeded() {
    let (code, text) = delete_answered([common::Canned::new(204, "")]).await;
    assert_eq!(code, Some(0), "{text}");
}

/// A deletion tried again after Sinch was busy, which then says the webhook is not there, succeeded: the first try
/// may have been taken, its answer lost. A first 404 is still a failure (the id is wrong).
#[tokio::test]
async fn a_deletion_found_gone_when_tried_again_succeeded() {
    let gone = || common::Canned::sinch_error(404, "NOT_FOUND", "Webhook not found");
    let (code, text) = delete_answered([busy(), gone()]).await;
    assert_eq!(code, Some(0), "{text}");
    let (code, text) = delete_answered([gone()]).await;
    assert_eq!(code, Some(1), "{text}");
    assert!(text.contains("404"), "{text}");
    // A 429 says the first try was not taken: the id was wrong.
    let (code, text) = delete_answered([
        common::Canned::sinch_error(429, "RESOURCE_EXHAUSTED", "slow down"),
        gone(),
    ])
    .await;
    assert_eq!(code, Some(1), "{text}");
}

/// Runs `webhook delete --id W1` against a fake Sinch that gives the API's `answers`; its exit code and output.
async fn delete_answered(answers: impl IntoIterator<Item = common::Canned>) -> (Option<i32>, String) {
    let fake = common::FakeSinch::start().await;
    fake.script_api(answers);
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_capability-facade"))
        .env_clear()
        .envs(common::binary_env(&fake))
        .args(["webhook", "delete", "--id", "W1"])
        .output()
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&output.stderr).into_owned() + &String::from_utf8_lossy(&output.stdout);
    assert_eq!(
        fake.requests().last().unwrap().path,
        format!("/v1/projects/{}/webhooks/W1", common::PROJECT)
    );
    (output.status.code(), text)
}

/// With HTTP Basic there is no token to obtain: the doctor proves the credentials with its first call, and a wrong
/// secret is a ✗ on the credentials with their fix, not a ✓ followed by an app "not found in this region".
#[tokio::test]
async fn with_basic_credentials_the_doctor_proves_them_with_a_call() {
    let sandbox = Sandbox::start(&["--sandbox-apps=APP-1"], None).await;
    let doctor = ["doctor", "--target", "http://127.0.0.1:9/webhooks/sinch"];
    let wrong = [("SINCH_AUTH", "basic"), ("SINCH_KEY_SECRET", "WRONG")];
    let (code, out) = run_with(&sandbox, &wrong, &doctor).await;
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("✗ credentials") && !out.contains("✓ credentials"), "{out}");
    assert!(
        out.contains("fix: check SINCH_PROJECT_ID, SINCH_KEY_ID, SINCH_KEY_SECRET"),
        "{out}"
    );
    let (_, out) = run_with(&sandbox, &[("SINCH_AUTH", "basic")], &doctor).await;
    assert!(
        out.contains("✓ credentials") && out.contains("✓ app APP-1 exists"),
        "{out}"
    );
}

/// Sinch's token endpoint down (503): the credentials' ✗ says Sinch did not answer, and its fix is to try again,
/// not to check the credentials, which may well be right.
#[tokio::test]
async fn a_token_endpoint_outage_is_not_told_as_wrong_credentials() {
    let sandbox = Sandbox::start(&["--sandbox-apps=APP-1", "--sandbox-token-outage-for=1h"], None).await;
    let (code, out) = run(&sandbox, &["doctor", "--target", "http://127.0.0.1:9/webhooks/sinch"]).await;
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("✗ credentials"), "{out}");
    assert!(!out.contains("fix: check SINCH_PROJECT_ID"), "{out}");
    assert!(out.contains("fix: run the doctor again"), "{out}");

    // Nothing listening where the tokens are asked for (a wrong address, a network that does not reach it): the
    // address and the network are the fix, and trying again alone would not help.
    // A port held bound and not listening: refused for the test's length.
    let held = tokio::net::TcpSocket::new_v4().unwrap();
    held.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let closed = held.local_addr().unwrap();
    let nowhere = format!("http://{closed}/oauth2/token");
    let (code, out) = run_with(
        &sandbox,
        &[("SINCH_AUTH_URL", &nowhere)],
        &["doctor", "--target", "http://127.0.0.1:9/webhooks/sinch"],
    )
    .await;
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains("✗ credentials") && out.contains("could not be reached"),
        "{out}"
    );
    assert!(out.contains("fix: check the URL above"), "{out}");
}

/// The `webhook` commands and the doctor need only what they use: listing, updating or deleting webhooks works
/// with no webhook secret set, and with the service's listeners on one port (they bind none). They refused both
/// as the server does.
#[tokio::test]
async fn the_webhook_commands_ask_only_for_the_settings_they_use() {
    let sandbox = Sandbox::start(&["--sandbox-apps=APP-1"], None).await;
    let unused = [
        ("SINCH_WEBHOOK_SECRETS", ""),
        ("CAPABILITY_GRPC_ADDR", "127.0.0.1:7000"),
        ("CAPABILITY_WEBHOOK_ADDR", "127.0.0.1:7000"),
    ];
    let (code, out) = run_with(&sandbox, &unused, &["webhook", "list", "--app-id", "APP-1"]).await;
    assert_eq!(code, Some(0), "{out}");
    // Ensure needs the secret it registers, and says so.
    let (code, out) = run_with(
        &sandbox,
        &unused,
        &[
            "webhook",
            "ensure",
            "--app-id",
            "APP-1",
            "--target",
            "https://x.example/webhooks/sinch",
        ],
    )
    .await;
    assert_eq!(code, Some(2), "{out}");
    assert!(out.contains("SINCH_WEBHOOK_SECRETS"), "{out}");
}

/// Registers a webhook of APP-1 in `sandbox` by Sinch's API: its id.
async fn register(sandbox: &Sandbox, target: &str, triggers: &[&str], secret: &str) -> String {
    let webhook = json!({"app_id": "APP-1", "target": target, "target_type": "HTTP", "secret": secret,
        "triggers": triggers});
    let (status, created) = sandbox.call(reqwest::Method::POST, "/webhooks", Some(webhook)).await;
    assert_eq!(status, 200, "{created}");
    created["id"].as_str().unwrap().to_owned()
}

/// How many of APP-1's webhooks send CAPABILITY callbacks.
async fn capability_webhooks(sandbox: &Sandbox) -> usize {
    let wants = |w: &&Value| w["triggers"].as_array().unwrap().iter().any(|t| t == "CAPABILITY");
    webhooks(sandbox).await.iter().filter(wants).count()
}

/// Every webhook of the app that targets the service is judged, not the first listed: with one (`…/sinch/`) for
/// delivery reports and one (`…/sinch`) for CAPABILITY with the service's secret, the doctor said the first
/// received no CAPABILITY callbacks, and `ensure` added the trigger to it, so that Sinch sent every callback
/// twice. Two that both send CAPABILITY are named, and `ensure` adds none.
#[tokio::test]
async fn every_webhook_targeting_the_service_is_judged_and_ensure_never_makes_a_second_one_deliver() {
    let sandbox = Sandbox::start(&["--sandbox-apps=APP-1"], None).await;
    let service = sandbox.service(&[&format!("--sinch-webhook-secrets={SECRET}")]).await;
    let target = format!("http://{}/webhooks/sinch", service.webhook_addr);
    let reports = register(&sandbox, &format!("{target}/"), &["MESSAGE_DELIVERY"], "").await;
    register(&sandbox, &target, &["CAPABILITY"], SECRET).await;
    let (code, out) = run(&sandbox, &["doctor", "--target", &target]).await;
    assert_eq!(code, Some(0), "{out}");
    let (code, out) = run(&sandbox, &["webhook", "ensure", "--target", &target]).await;
    assert_eq!(code, Some(0), "{out}");
    assert_eq!(capability_webhooks(&sandbox).await, 1, "{out}");

    let (code, _) = run(
        &sandbox,
        &["webhook", "update", "--id", &reports, "--triggers", "CAPABILITY"],
    )
    .await;
    assert_eq!(code, Some(0));
    let (code, out) = run(&sandbox, &["doctor", "--target", &target]).await;
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains(&reports) && out.contains("each callback"), "{out}");
    let (code, out) = run(&sandbox, &["webhook", "ensure", "--target", &target]).await;
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("webhook delete --id"), "{out}");
}

/// A webhook's target is compared as a URL: a host written in capitals, or a port the scheme has by default, is
/// the same target. The doctor said none targeted the service, and `ensure` registered a second one.
#[tokio::test]
async fn a_target_written_otherwise_is_the_same_url() {
    let sandbox = Sandbox::start(&["--sandbox-apps=APP-1"], None).await;
    let service = sandbox.service(&[&format!("--sinch-webhook-secrets={SECRET}")]).await;
    let port = service.webhook_addr.port();
    register(
        &sandbox,
        &format!("HTTP://LOCALHOST:{port}/webhooks/sinch"),
        &["CAPABILITY"],
        SECRET,
    )
    .await;
    let target = format!("http://localhost:{port}/webhooks/sinch");
    let (code, out) = run(&sandbox, &["doctor", "--target", &target]).await;
    assert_eq!(code, Some(0), "{out}");
    let (code, out) = run(&sandbox, &["webhook", "ensure", "--target", &target]).await;
    assert_eq!(code, Some(0), "{out}");
    assert_eq!(webhooks(&sandbox).await.len(), 1, "{out}");
}

/// The test callback goes where Sinch would post, and no further: a target that redirects (an ingress sending
/// plain HTTP on to HTTPS) is named with where it redirects to, since Sinch is not known to follow redirects (and
/// a 301 or 302 turns a POST into a GET). The doctor followed it and said the callback was accepted.
#[tokio::test]
async fn a_target_that_redirects_is_named_with_where_it_redirects_to() {
    let sandbox = Sandbox::start(&["--sandbox-apps=APP-1"], None).await;
    let service = sandbox.service(&[&format!("--sinch-webhook-secrets={SECRET}")]).await;
    let onward = format!("http://{}/webhooks/sinch", service.webhook_addr);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let redirecting = format!("http://{}/webhooks/sinch", listener.local_addr().unwrap());
    let redirect = axum::Router::new().fallback({
        let onward = onward.clone();
        async move || axum::response::Redirect::permanent(&onward)
    });
    let server = tokio::spawn(async move { axum::serve(listener, redirect).await });
    register(&sandbox, &redirecting, &["CAPABILITY"], SECRET).await;
    let (code, out) = run(&sandbox, &["doctor", "--target", &redirecting]).await;
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("308") && out.contains(&onward), "{out}");
    server.abort();

    // A redirect written relative to the target is named whole.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let relative = format!("http://{}/webhooks/sinch", listener.local_addr().unwrap());
    let moved = format!("http://{}/moved/sinch", listener.local_addr().unwrap());
    let redirect = axum::Router::new().fallback(async || axum::response::Redirect::permanent("/moved/sinch"));
    let server = tokio::spawn(async move { axum::serve(listener, redirect).await });
    register(&sandbox, &relative, &["CAPABILITY"], SECRET).await;
    let (code, out) = run(&sandbox, &["doctor", "--target", &relative]).await;
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains(&format!("to {moved}")), "{out}");
    server.abort();
}
