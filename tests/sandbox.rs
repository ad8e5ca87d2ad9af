//! The strict sandbox as a user meets it: known apps only, Sinch's Webhooks and Apps APIs, callbacks to every
//! CAPABILITY webhook signed with its own secret, silence for unreachable channels, and its fault knobs, seen
//! through the service (or, for the wire format, by HTTP).

mod common;

use std::{net::SocketAddr, time::Duration};

use capability_facade::{
    grpc::pb::{Channel, CompletionReason},
    sandbox,
};
use common::{Sandbox, Service, identities, query, query_and_drain};
use serde_json::{Value, json};
use tonic::Code;
use tonic_types::StatusExt;

fn receiver(addr: SocketAddr) -> String {
    format!("http://{addr}/webhooks/sinch")
}

#[tokio::test]
async fn only_known_apps_are_answered_and_errors_carry_details() {
    let sandbox = Sandbox::start(&["--sandbox-apps=APP-1,APP-2"], None).await;
    let service = sandbox.service(&["--sinch-webhook-secrets=s"]).await;
    let mut client = service.client().await;
    client
        .query_capability(query(identities(&[(Channel::Viber, "46700000001")]), ""))
        .await
        .expect("a known app, and VIBER is a channel Sinch offers");
    let mut unknown = query(identities(&[(Channel::Sms, "46700000001")]), "");
    unknown.app_id = "SOMEONE-ELSES".into();
    let status = client.query_capability(unknown).await.unwrap_err();
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
    assert!(status.message().contains("SOMEONE-ELSES"), "{}", status.message());

    let (code, body) = sandbox.call(reqwest::Method::GET, "/apps/NOPE", None).await;
    assert_eq!(code, 404);
    assert_eq!(body["error"]["status"], "NOT_FOUND");
    assert_eq!(
        body["error"]["details"][0]["@type"],
        "type.googleapis.com/google.rpc.ErrorInfo"
    );

    let token = common::reqwest_client()
        .post(format!("{}/oauth2/token", sandbox.url))
        .basic_auth(sandbox::KEY_ID, Some(sandbox::KEY_SECRET))
        .form(&[("grant_type", "client_credentials")])
        .send()
        .await
        .unwrap()
        .json::<Value>()
        .await
        .unwrap();
    assert_eq!(token["scope"], "", "Sinch's token answer has a scope");
}

#[tokio::test]
async fn the_webhooks_api_creates_lists_updates_and_deletes_at_most_five_per_app() {
    let sandbox = Sandbox::start(&["--sandbox-apps=APP-1,APP-2", "--sandbox-webhook-rate=40"], None).await;
    let (code, app) = sandbox.call(reqwest::Method::GET, "/apps/APP-1", None).await;
    assert_eq!(code, 200);
    assert_eq!(app["rate_limits"]["webhooks"], 40);
    let (_, empty) = sandbox.call(reqwest::Method::GET, "/apps/APP-1/webhooks", None).await;
    assert_eq!(empty, json!({"webhooks": []}));

    let create = |n: usize| {
        json!({"app_id": "APP-1", "target": format!("https://example.com/hook/{n}"), "target_type": "HTTP",
            "secret": format!("secret-{n}"), "triggers": ["CAPABILITY"]})
    };
    let (code, first) = sandbox.call(reqwest::Method::POST, "/webhooks", Some(create(0))).await;
    assert_eq!(code, 200, "{first}");
    assert_eq!(first["secret"], "secret-0", "the secret comes back in clear text");
    assert!(first["client_credentials"].is_null());
    let id = first["id"].as_str().unwrap().to_owned();
    for n in 1..5 {
        assert_eq!(
            sandbox
                .call(reqwest::Method::POST, "/webhooks", Some(create(n)))
                .await
                .0,
            200
        );
    }
    let (code, sixth) = sandbox.call(reqwest::Method::POST, "/webhooks", Some(create(5))).await;
    assert_eq!(
        (code, &sixth["error"]["status"]),
        (400, &json!("INVALID_ARGUMENT")),
        "{sixth}"
    );
    let (code, _) = sandbox.call(reqwest::Method::POST, "/webhooks", Some(create(1))).await;
    assert_eq!(code, 400, "a duplicate target");
    let (_, listed) = sandbox.call(reqwest::Method::GET, "/apps/APP-1/webhooks", None).await;
    assert_eq!(listed["webhooks"].as_array().unwrap().len(), 5);

    // Java 1.x repeats update_mask, Node and .NET join it with commas: only the masked fields change.
    let path = format!("/webhooks/{id}?update_mask=triggers&update_mask=secret");
    let patch = json!({"triggers": ["CAPABILITY", "MESSAGE_DELIVERY"], "secret": "rotated", "target": "https://x"});
    let (code, updated) = sandbox.call(reqwest::Method::PATCH, &path, Some(patch)).await;
    assert_eq!(code, 200, "{updated}");
    assert_eq!(updated["secret"], "rotated");
    assert_eq!(updated["triggers"], json!(["CAPABILITY", "MESSAGE_DELIVERY"]));
    assert_eq!(updated["target"], "https://example.com/hook/0", "not in the mask");
    let path = format!("/webhooks/{id}?update_mask=app_id");
    let (code, moved) = sandbox
        .call(reqwest::Method::PATCH, &path, Some(json!({"app_id": "APP-2"})))
        .await;
    assert_eq!((code, &moved["app_id"]), (200, &json!("APP-2")));
    let (_, got) = sandbox
        .call(reqwest::Method::GET, &format!("/webhooks/{id}"), None)
        .await;
    assert_eq!(got["app_id"], "APP-2");

    let (code, deleted) = sandbox
        .call(reqwest::Method::DELETE, &format!("/webhooks/{id}"), None)
        .await;
    assert_eq!((code, deleted), (200, json!({})));
    let (code, _) = sandbox
        .call(reqwest::Method::GET, &format!("/webhooks/{id}"), None)
        .await;
    assert_eq!(code, 404);
}

/// Every call of the Webhooks and Apps APIs checks the credentials, then the project, before anything else.
#[tokio::test]
async fn the_webhooks_api_refuses_strangers_and_other_projects() {
    let sandbox = Sandbox::start(&["--sandbox-apps=APP-1"], None).await;
    let http = common::reqwest_client();
    let paths = ["/apps/APP-1", "/apps/APP-1/webhooks", "/webhooks/W1"];
    for path in paths {
        let url = format!("{}/v1/projects/{}{path}", sandbox.url, sandbox::PROJECT_ID);
        let stranger = http.get(&url).send().await.unwrap().status();
        assert_eq!(stranger, 401, "{path} without credentials");
        let other = format!("{}/v1/projects/other-project{path}", sandbox.url);
        let elsewhere = http
            .get(&other)
            .basic_auth(sandbox::KEY_ID, Some(sandbox::KEY_SECRET))
            .send()
            .await
            .unwrap()
            .status();
        assert_eq!(elsewhere, 404, "{path} of another project");
    }
    let url = format!("{}/v1/projects/{}/webhooks", sandbox.url, sandbox::PROJECT_ID);
    let created = http.post(&url).json(&json!({"app_id": "APP-1"})).send().await.unwrap();
    assert_eq!(created.status(), 401, "a webhook created without credentials");
}

#[tokio::test]
async fn callbacks_go_to_every_capability_webhook_signed_with_its_own_secret() {
    let sandbox = Sandbox::start(&["--sandbox-apps=APP-1", "--sandbox-callback-delay=0s"], None).await;
    let first = sandbox.service(&["--sinch-webhook-secrets=first-secret"]).await;
    let second = sandbox.service(&["--sinch-webhook-secrets=second-secret"]).await;
    let ignored = sandbox.service(&["--sinch-webhook-secrets=third-secret"]).await;
    for (service, secret, trigger) in [
        (&first, "first-secret", "CAPABILITY"),
        (&second, "second-secret", "CAPABILITY"),
        (&ignored, "third-secret", "MESSAGE_DELIVERY"),
    ] {
        let webhook = json!({"app_id": "APP-1", "target": receiver(service.webhook_addr), "secret": secret,
            "triggers": [trigger]});
        assert_eq!(
            sandbox.call(reqwest::Method::POST, "/webhooks", Some(webhook)).await.0,
            200
        );
    }
    let mut client = first.client().await;
    client
        .query_capability(query(identities(&[(Channel::Sms, "46700000001")]), "to-both"))
        .await
        .unwrap();
    for service in [&first, &second] {
        let seen = common::until_marker(service, "to-both", 0, "SMS").await;
        assert_eq!(seen.len(), 1, "each CAPABILITY webhook got its copy and verified it");
    }
    assert!(
        common::held(&ignored, "to-both", 0).await.is_empty(),
        "no CAPABILITY trigger, no callback"
    );
}

#[tokio::test]
async fn with_silent_unreachable_a_watch_ends_at_its_wait_with_those_channels_pending() {
    let config = common::sandbox_config(&["--sandbox-silent-unreachable=true", "--sandbox-callback-delay=0s"]);
    let service = Service::start(config).await;
    let mut client = service.client().await;
    let (seen, end) = query_and_drain(
        &mut client,
        identities(&[(Channel::Sms, "46700000001"), (Channel::Rcs, "46700000006")]),
        Some(Duration::from_secs(2)),
    )
    .await;
    assert_eq!(seen.iter().map(|s| s.1.as_str()).collect::<Vec<_>>(), ["SMS"]);
    let completion = end.unwrap();
    assert_eq!(completion.reason(), CompletionReason::WaitElapsed);
    assert_eq!(
        completion.pending_channels,
        ["RCS"],
        "silence is pending, never a negative"
    );
}

#[tokio::test]
async fn injected_faults_reach_the_caller_as_sinchs_would() {
    let sandbox = Sandbox::start(&["--sandbox-error-501=1"], None).await;
    let service = sandbox.service(&["--sinch-webhook-secrets=s"]).await;
    let mut request = tonic::Request::new(query(identities(&[(Channel::Sms, "46700000001")]), ""));
    request.set_timeout(Duration::from_secs(10));
    let status = service.client().await.query_capability(request).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "501 after retries: {status:?}");
    assert!(status.message().contains("501"), "{}", status.message());

    let sandbox = Sandbox::start(
        &[
            "--sandbox-error-429=1",
            "--sandbox-retry-hint=retry-info",
            "--sandbox-retry-after=30s",
        ],
        None,
    )
    .await;
    let service = sandbox.service(&["--sinch-webhook-secrets=s"]).await;
    let status = service
        .client()
        .await
        .query_capability(query(identities(&[(Channel::Sms, "46700000001")]), ""))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    let retry = status.get_details_retry_info().expect("RetryInfo").retry_delay.unwrap();
    assert_eq!(
        retry,
        Duration::from_secs(30),
        "the sandbox's RetryInfo reached the caller"
    );

    let sandbox = Sandbox::start(
        &["--sandbox-token-outage-after=0s", "--sandbox-token-outage-for=1h"],
        None,
    )
    .await;
    let service = sandbox.service(&["--sinch-webhook-secrets=s"]).await;
    let mut request = tonic::Request::new(query(identities(&[(Channel::Sms, "46700000001")]), ""));
    request.set_timeout(Duration::from_secs(2));
    let status = service.client().await.query_capability(request).await.unwrap_err();
    assert!(
        matches!(status.code(), Code::Unavailable | Code::DeadlineExceeded),
        "{status:?}"
    );
}

#[tokio::test]
async fn the_in_process_sandbox_registers_the_services_own_webhook() {
    let config = common::sandbox_config(&["--sandbox-apps=APP-1"]);
    let service = Service::start(config).await;
    let mut client = service.client().await;
    let (seen, end) = query_and_drain(&mut client, identities(&[(Channel::Whatsapp, "46700000001")]), None).await;
    assert_eq!(seen.len(), 1);
    assert_eq!(end.unwrap().reason(), CompletionReason::AllChannelsReported);
}

#[tokio::test]
async fn the_token_endpoint_is_a_bucket_that_answers_429_without_retry_after() {
    let sandbox = Sandbox::start(&[], None).await;
    let http = common::reqwest_client();
    let asks = (0..60).map(|_| {
        http.post(format!("{}/oauth2/token", sandbox.url))
            .basic_auth(sandbox::KEY_ID, Some(sandbox::KEY_SECRET))
            .form(&[("grant_type", "client_credentials")])
            .send()
    });
    let answers = futures::future::join_all(asks).await;
    let refused: Vec<_> = answers
        .into_iter()
        .map(Result::unwrap)
        .filter(|r| r.status() == 429)
        .collect();
    assert!(!refused.is_empty(), "60 at once exceed a bucket of 30");
    assert!(refused.iter().all(|r| r.headers().get("retry-after").is_none()));
}

/// The project's rate limit (Sinch's 800/s across its APIs; lowered here) answers 429 as Sinch does, for the
/// query and the Webhooks API alike, counted together.
#[tokio::test]
async fn past_the_projects_rate_limit_calls_get_429() {
    let sandbox = Sandbox::start(&["--sandbox-project-rate=1"], None).await;
    let body = json!({"app_id": "APP-1", "recipient": {"contact_id": "C"}});
    // Eight queries and eight calls of the Webhooks API at once, against one a second: most are refused, of both.
    let queries = (0..8).map(|_| sandbox.call(reqwest::Method::POST, "/capability:query", Some(body.clone())));
    let lists = (0..8).map(|_| sandbox.call(reqwest::Method::GET, "/apps/APP-1/webhooks", None));
    let (queries, lists) =
        futures::future::join(futures::future::join_all(queries), futures::future::join_all(lists)).await;
    let refused = |answers: &[(u16, Value)]| answers.iter().filter(|(status, _)| *status == 429).count();
    assert!(refused(&queries) > 0 && refused(&lists) > 0, "{queries:?} {lists:?}");
    let (_, body) = queries.iter().find(|(status, _)| *status == 429).unwrap();
    assert_eq!(body["error"]["status"], "RESOURCE_EXHAUSTED", "{body}");
    assert!(
        queries
            .iter()
            .chain(&lists)
            .all(|(status, _)| [200, 429].contains(status))
    );
}

/// A token past its lifetime is refused as expired — what tells a client to fetch a new one — even after the
/// sandbox issued others (to another replica, say) meanwhile; one it never issued is refused as unknown.
#[tokio::test]
async fn an_expired_token_is_told_expired_after_others_were_issued() {
    let mut config = sandbox::SandboxConfig::new(Sandbox::knobs(&["--sandbox-apps=APP-1"]), None);
    config.token_lifetime = Duration::ZERO;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let stop = tokio_util::sync::CancellationToken::new();
    tokio::spawn(sandbox::serve(listener, config, stop.clone()));
    let _stop = stop.drop_guard();
    let http = common::reqwest_client();
    let token = || async {
        let answer = http
            .post(format!("{url}/oauth2/token"))
            .basic_auth(sandbox::KEY_ID, Some(sandbox::KEY_SECRET))
            .form(&[("grant_type", "client_credentials")])
            .send()
            .await
            .unwrap();
        answer.json::<Value>().await.unwrap()["access_token"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    let challenge = |token: String| {
        let http = http.clone();
        let url = format!("{url}/v1/projects/{}/apps/APP-1/webhooks", sandbox::PROJECT_ID);
        async move {
            let answer = http.get(url).bearer_auth(token).send().await.unwrap();
            assert_eq!(answer.status(), 401);
            answer.headers()["www-authenticate"].to_str().unwrap().to_owned()
        }
    };
    let first = token().await;
    let _second = token().await;
    let told = challenge(first).await;
    assert!(told.contains("expired"), "{told}");
    let told = challenge("never-issued".into()).await;
    assert!(!told.contains("expired"), "{told}");
}

/// The sandbox runs in the service's own process in sandbox mode, so what callers make it hold is bounded: queries
/// that outrun the callbacks' pace are refused 429 once so many callbacks wait to be sent (each was held until
/// sent), and a sandbox that takes any app id holds at most so many apps (each new id was kept for good).
#[tokio::test]
async fn what_callers_make_the_sandbox_hold_is_bounded() {
    // Takes connections and never answers: past the first callback, every other one waits.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let destination = sandbox::webhooks::Destination {
        target: receiver(silent.local_addr().unwrap()),
        secret: capability_facade::secret::Secret::new("s"),
    };
    let paced = Sandbox::start(&["--sandbox-webhook-rate=1"], Some(destination)).await;
    let identities: Vec<Value> = (0..100)
        .map(|i| json!({"channel": "SMS", "identity": format!("467000{i:05}")}))
        .collect();
    let body = json!({"app_id": "APP-1", "recipient": {"identified_by": {"channel_identities": identities}}});
    let queries = sandbox::MAX_WAITING_CALLBACKS / 100;
    for i in 0..queries {
        let (status, answer) = paced
            .call(reqwest::Method::POST, "/capability:query", Some(body.clone()))
            .await;
        assert_eq!(status, 200, "query {i}: {answer}");
    }
    let (status, answer) = paced.call(reqwest::Method::POST, "/capability:query", Some(body)).await;
    assert_eq!(status, 429, "{}", answer["request_id"]);
    assert_eq!(answer["error"]["status"], "RESOURCE_EXHAUSTED", "{answer}");

    let any_app = Sandbox::start(&["--sandbox-project-rate=0"], None).await;
    let query = |app: String| json!({"app_id": app, "recipient": {"contact_id": "C"}});
    for i in 0..sandbox::MAX_APPS {
        let (status, answer) = any_app
            .call(
                reqwest::Method::POST,
                "/capability:query",
                Some(query(format!("APP-{i}"))),
            )
            .await;
        assert_eq!(status, 200, "app {i}: {answer}");
    }
    let (status, answer) = any_app
        .call(
            reqwest::Method::POST,
            "/capability:query",
            Some(query("ONE-MORE".into())),
        )
        .await;
    assert_eq!(status, 404, "{answer}");
    let (status, _) = any_app
        .call(reqwest::Method::POST, "/capability:query", Some(query("APP-0".into())))
        .await;
    assert_eq!(status, 200, "an app it holds is still answered");
    // Nor does moving a webhook to a new app id make one past the bound.
    let webhook = json!({"app_id": "APP-0", "target": "https://example.com/hook", "triggers": ["CAPABILITY"]});
    let (status, created) = any_app.call(reqwest::Method::POST, "/webhooks", Some(webhook)).await;
    assert_eq!(status, 200, "{created}");
    let path = format!("/webhooks/{}?update_mask=app_id", created["id"].as_str().unwrap());
    let (status, moved) = any_app
        .call(reqwest::Method::PATCH, &path, Some(json!({"app_id": "MOVED-TO"})))
        .await;
    assert_eq!(status, 404, "{moved}");
}
