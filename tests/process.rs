//! The process as operators and other languages see it: configuration errors, --help, health, reflection,
//! shutdown, and a Python client generated from the proto.

mod common;

use std::{path::PathBuf, process::Command, time::Duration};

use capability_facade::{
    config::{DRAIN_DELAY, SHUTDOWN_GRACE},
    grpc::pb::{self, capability_service_client::CapabilityServiceClient},
};
use common::{Binary, FakeSinch, Service, contact, query};
use tokio_stream::StreamExt;
use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient};

const SERVICE_NAME: &str = "capability.v1.CapabilityService";

fn binary() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_capability-facade"));
    command
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default());
    command
}

/// Without credentials (the in-process sandbox) a bad value is refused before the sandbox's port is bound: it was
/// bound first, and a taken port hid the bad value behind an exit 1.
#[test]
fn with_the_sandbox_a_bad_value_is_refused_before_its_port_is_bound() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let output = binary()
        .env("CAPABILITY_SANDBOX_ADDR", taken.local_addr().unwrap().to_string())
        .env("CAPABILITY_GRPC_ADDR", "127.0.0.1:0")
        .env("CAPABILITY_WEBHOOK_ADDR", "127.0.0.1:0")
        .env("CAPABILITY_ADMIN_ADDR", "127.0.0.1:0")
        .env("CAPABILITY_REDIS_URL", "redis://[::1")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("CAPABILITY_REDIS_URL"), "{stderr}");
}

/// A client command's secret refused for its form is named, never shown: clap's own message printed it.
#[test]
fn a_client_secret_refused_is_named_not_shown() {
    let cases = [
        (&["check", "--identity", "SMS:1"][..], "CAPABILITY_TOKEN", "--token"),
        (&["watch", "r"][..], "CAPABILITY_TOKEN", "--token"),
    ];
    for (args, variable, flag) in cases {
        let output = binary().env(variable, "TOP\u{1}SECRET").args(args).output().unwrap();
        assert_eq!(output.status.code(), Some(2), "{args:?}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(flag), "{args:?}: {stderr}");
        assert!(!stderr.contains("TOP"), "{args:?}: {stderr}");
    }
    let output = binary()
        .args([
            "sandbox",
            "--callback-url=http://127.0.0.1:1/",
            "--webhook-secret=TOP\u{1}SECRET",
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(!stderr.contains("TOP"), "{stderr}");
}

#[test]
fn a_bad_value_stops_the_process_before_it_binds_naming_the_variable() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let cases = [
        ("SINCH_REGION", "mars"),
        ("CAPABILITY_RETENTION", "a while"),
        ("SINCH_RATE_LIMIT", "-3"),
        ("CAPABILITY_GRPC_ADDR", "localhost"),
        ("CAPABILITY_WEBHOOK_ADDR", "not-an-address:80:80"),
        ("CAPABILITY_REDIS_URL", "redis://[::1"),
        ("SINCH_KEY_SECRET", "TOP\u{1}SECRET"),
        ("CAPABILITY_RETENTION", "10000000000h"),
        ("CAPABILITY_HEARTBEAT", "-5s"),
        // Fewer than a query's results: the rest would be dropped.
        ("CAPABILITY_MAX_NOTIFICATIONS_PER_REQUEST", "64"),
        // Set, but naming no token: calls would be taken without one.
        ("CAPABILITY_GRPC_TOKENS", ","),
        ("CAPABILITY_GRPC_TOKENS", " \n"),
        // Set but empty (a secret whose mount failed): calls would be taken without a token, the replicas would not
        // share their log, cache entries would be named with a key anyone can guess.
        ("CAPABILITY_GRPC_TOKENS", ""),
        ("CAPABILITY_REDIS_URL", ""),
        ("CAPABILITY_REDIS_URL", "\n"),
        ("CAPABILITY_CACHE_HASH_KEY", ""),
        // Shorter than 32 bytes: deploy/k8s/base/secret.example.yaml's placeholder, applied as it is.
        ("CAPABILITY_CACHE_HASH_KEY", "openssl-rand-hex-32"),
        // A CA for Redis's certificate, and a Redis reached without TLS, or a file that is not there.
        ("CAPABILITY_REDIS_CA_FILE", "Cargo.toml"),
        ("CAPABILITY_REDIS_CA_FILE", "/nonexistent/ca.pem"),
        // A misspelt level: the whole filter was dropped for `info` without a word.
        ("RUST_LOG", "warn,capability_facade=dbug"),
    ];
    for (variable, value) in cases {
        let output = binary()
            .env("SINCH_KEY_ID", "k")
            .env("SINCH_KEY_SECRET", "TOPSECRET")
            .env("SINCH_PROJECT_ID", "p")
            .env("SINCH_WEBHOOK_SECRETS", "w")
            .env("CAPABILITY_ADMIN_ADDR", taken.local_addr().unwrap().to_string())
            .env(variable, value)
            .output()
            .unwrap();
        assert_eq!(output.status.code(), Some(2), "{variable}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(variable), "{variable}: {stderr}");
        assert!(
            !stderr.contains("TOPSECRET") && !stderr.contains("TOP\u{1}"),
            "{stderr}"
        );
    }
}

/// The CA file for an https collector is read and checked at start: one missing, or holding no certificate, or
/// set without an https endpoint, stops the process naming it before it binds.
#[test]
fn a_bad_otlp_certificate_stops_the_process_before_it_binds_naming_it() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dir = std::env::temp_dir().join(format!("capability-otlp-{}", ulid::Ulid::new()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = |name: &str, text: &str| {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path
    };
    let garbage = file("garbage.pem", "not a certificate");
    let not_base64 = file(
        "not-base64.pem",
        "-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n",
    );
    // A block that decodes, but to no certificate: tonic would drop it unsaid and trust nothing.
    let not_der = file(
        "not-der.pem",
        "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
    );
    let missing = dir.join("missing.pem");
    let cases = [
        ("https://collector:4317", &missing),
        ("https://collector:4317", &garbage),
        ("https://collector:4317", &not_base64),
        ("https://collector:4317", &not_der),
        ("http://collector:4317", &garbage),
    ];
    for (endpoint, certificate) in cases {
        let output = binary()
            .env("CAPABILITY_ADMIN_ADDR", taken.local_addr().unwrap().to_string())
            .env("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint)
            .env("OTEL_EXPORTER_OTLP_CERTIFICATE", certificate)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{endpoint} {certificate:?}: {stderr}");
        assert!(stderr.contains("OTEL_EXPORTER_OTLP_CERTIFICATE"), "{stderr}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn help_lists_every_variable_and_no_secret() {
    let output = binary()
        .arg("--help")
        .env("SINCH_KEY_SECRET", "TOPSECRET")
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&output.stdout);
    for variable in [
        "CAPABILITY_GRPC_ADDR",
        "CAPABILITY_WEBHOOK_ADDR",
        "CAPABILITY_ADMIN_ADDR",
        "SINCH_PROJECT_ID",
        "SINCH_KEY_ID",
        "SINCH_KEY_SECRET",
        "SINCH_REGION",
        "SINCH_AUTH",
        "SINCH_API_URL",
        "SINCH_AUTH_URL",
        "SINCH_WEBHOOK_SECRETS",
        "CAPABILITY_INSECURE_WEBHOOKS",
        "SINCH_RATE_LIMIT",
        "CAPABILITY_REDIS_URL",
        "CAPABILITY_REDIS_PREFIX",
        "CAPABILITY_RETENTION",
        "CAPABILITY_SHUTDOWN_GRACE",
        "CAPABILITY_LOG_FORMAT",
    ] {
        assert!(help.contains(variable), "--help lists {variable}");
    }
    assert!(!help.contains("TOPSECRET"));
}

#[tokio::test]
async fn health_serves_both_names_and_reflection_lists_the_service_in_both_versions() {
    let fake = FakeSinch::start().await;
    let service = Service::against(&fake, &[]).await;
    let mut health = HealthClient::new(service.channel().await);
    for name in ["", SERVICE_NAME] {
        let status = health
            .check(HealthCheckRequest { service: name.into() })
            .await
            .unwrap()
            .into_inner()
            .status();
        assert_eq!(status, ServingStatus::Serving, "{name:?}");
    }

    use tonic_reflection::pb::{v1, v1alpha};
    let mut v1_client = v1::server_reflection_client::ServerReflectionClient::new(service.channel().await);
    let request = v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(v1::server_reflection_request::MessageRequest::ListServices(
            String::new(),
        )),
    };
    let mut answers = v1_client
        .server_reflection_info(tokio_stream::once(request))
        .await
        .unwrap()
        .into_inner();
    let Some(v1::server_reflection_response::MessageResponse::ListServicesResponse(list)) =
        answers.next().await.unwrap().unwrap().message_response
    else {
        panic!("a service list")
    };
    assert!(list.service.iter().any(|s| s.name == SERVICE_NAME), "{list:?}");

    let mut alpha = v1alpha::server_reflection_client::ServerReflectionClient::new(service.channel().await);
    let request = v1alpha::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(
            v1alpha::server_reflection_request::MessageRequest::FileContainingSymbol(SERVICE_NAME.into()),
        ),
    };
    let mut answers = alpha
        .server_reflection_info(tokio_stream::once(request))
        .await
        .unwrap()
        .into_inner();
    let response = answers.next().await.unwrap().unwrap().message_response.unwrap();
    assert!(
        matches!(response, v1alpha::server_reflection_response::MessageResponse::FileDescriptorResponse(ref f)
            if !f.file_descriptor_proto.is_empty()),
        "{response:?}"
    );
}

#[tokio::test]
async fn on_shutdown_health_turns_not_serving_and_in_flight_calls_finish() {
    let fake = FakeSinch::start().await;
    fake.set_echo_delay(Duration::from_millis(500));
    let service = Service::against(&fake, &[]).await;
    let mut health = HealthClient::new(service.channel().await);
    let mut watch = health
        .watch(HealthCheckRequest {
            service: SERVICE_NAME.into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(watch.next().await.unwrap().unwrap().status(), ServingStatus::Serving);

    let mut client = service.client().await;
    let in_flight = tokio::spawn(async move { client.query_capability(query(contact("C"), "in-flight")).await });
    while fake.queries().is_empty() {
        tokio::task::yield_now().await;
    }
    service.shutdown.cancel();
    assert_eq!(watch.next().await.unwrap().unwrap().status(), ServingStatus::NotServing);
    let answer = in_flight.await.unwrap().expect("the in-flight call finished");
    assert_eq!(answer.into_inner().request_id, "in-flight");
}

#[tokio::test]
async fn sigterm_drains_the_real_binary_and_exits_zero() {
    let fake = FakeSinch::start().await;
    fake.set_echo_delay(Duration::from_millis(500));
    let mut process = Binary::spawn(&common::binary_env(&fake)).await;
    let mut client = CapabilityServiceClient::connect(process.url()).await.unwrap();
    let in_flight = tokio::spawn(async move { client.query_capability(query(contact("C"), "drained")).await });
    while fake.queries().is_empty() {
        tokio::task::yield_now().await;
    }
    process.signal("TERM");
    let answer = in_flight.await.unwrap().expect("the in-flight call finished");
    assert_eq!(answer.into_inner().request_id, "drained");
    let status = process.wait_exit(Duration::from_secs(10)).await.expect("exited");
    assert!(status.success(), "{status:?}: {}", process.log_text());
}

/// An open Health/Watch stream (a mesh's or a load balancer's health checker watching, as gRPC's health protocol
/// offers) does not hold the drain: it is told NOT_SERVING, then ends, and the process exits without waiting out
/// the shutdown grace. Its connection stayed open until the grace ran out, so that every restart of a replica
/// watched that way took the whole grace, then cut the calls still in flight.
#[tokio::test]
async fn an_open_health_watch_ends_at_shutdown_rather_than_hold_the_drain() {
    let env = [(SHUTDOWN_GRACE, "20s".to_owned()), (DRAIN_DELAY, "0s".to_owned())];
    let mut process = Binary::spawn(&env).await;
    let channel = process.channel().await;
    let mut watches = Vec::new();
    for service in ["", SERVICE_NAME] {
        let mut health = HealthClient::new(channel.clone());
        let request = HealthCheckRequest {
            service: service.into(),
        };
        let mut watch = health.watch(request).await.unwrap().into_inner();
        assert_eq!(watch.next().await.unwrap().unwrap().status(), ServingStatus::Serving);
        watches.push(watch);
    }
    process.signal("TERM");
    for mut watch in watches {
        assert_eq!(watch.next().await.unwrap().unwrap().status(), ServingStatus::NotServing);
        let end = watch.next().await;
        assert!(end.is_none(), "the stream ended, rather than be cut: {end:?}");
    }
    let status = process.wait_exit(Duration::from_secs(30)).await.expect("exited");
    assert!(status.success(), "{status:?}");
    let log = process.log_text();
    assert!(!log.contains("longer than the shutdown grace"), "{log}");
}

/// A transparent huge page is zeroed whole (2 MiB) by the first write that touches it: while the service's memory
/// grows (retained notifications, new watches) a worker thread stalls for milliseconds in the kernel, and every
/// callback and notification queued on it waits (BENCHMARKS.md, "Delivery at the limit", fifth round).
#[cfg(target_os = "linux")]
#[tokio::test]
async fn the_service_runs_without_transparent_huge_pages() {
    let process = Binary::spawn(&[]).await;
    let status = std::fs::read_to_string(format!("/proc/{}/status", process.pid())).unwrap();
    let line = status.lines().find(|l| l.starts_with("THP_enabled:"));
    assert_eq!(line.and_then(|l| l.split_whitespace().nth(1)), Some("0"), "{line:?}");
}

/// The stand-alone sandbox refuses a `RUST_LOG` that does not parse too, naming it: it ran without a log.
#[tokio::test]
async fn the_sandbox_command_refuses_a_bad_rust_log() {
    let mut command = tokio::process::Command::from(binary());
    command
        .env("RUST_LOG", "warn,capability_facade=dbug")
        .args([
            "sandbox",
            "--callback-url=http://127.0.0.1:1/",
            "--webhook-secret=w",
            "--sandbox-addr=127.0.0.1:0",
        ])
        .kill_on_drop(true);
    let output = tokio::time::timeout(Duration::from_secs(30), command.output())
        .await
        .expect("it stops")
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("RUST_LOG"), "{stderr}");
}

/// `RUST_LOG` set but empty (a template's blank) logs at `info`, as unset does: it turned every line off, errors and
/// the sandbox's warning included, and the spans exported with them.
#[tokio::test]
async fn an_empty_rust_log_logs_at_info() {
    let process = Binary::spawn(&[("RUST_LOG", String::new())]).await;
    let first = process.log.lock().unwrap()[0].clone();
    assert!(first.contains("SANDBOX"), "{first}");
}

#[tokio::test]
async fn without_credentials_the_binary_serves_against_its_sandbox_and_says_so_first() {
    let process = Binary::spawn(&[]).await;
    let first = process.log.lock().unwrap()[0].clone();
    assert!(first.contains("SANDBOX"), "{first}");
    let mut client = CapabilityServiceClient::connect(process.url()).await.unwrap();
    let answer = client
        .query_capability(query(common::identities(&[(pb::Channel::Whatsapp, "46712312312")]), ""))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(answer.request_id.len(), 26);
    let status = client
        .query_capability(query(common::identities(&[(pb::Channel::Unspecified, "1")]), ""))
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
}

/// Runs `script` once per checkout in target/polyglot (a lock keeps parallel tests apart); returns the folder.
fn prepared(lock: &str, script: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/polyglot");
    std::fs::create_dir_all(&dir).unwrap();
    let status = Command::new("flock")
        .current_dir(&dir)
        .args([lock, "sh", "-c", script])
        .status()
        .expect("flock is installed");
    assert!(status.success(), "could not prepare {lock}");
    dir
}

/// A Python virtualenv with grpcio.
fn python() -> PathBuf {
    prepared(
        "venv.lock",
        "test -x venv/bin/python && venv/bin/python -c 'import grpc, grpc_tools' 2>/dev/null || \
         { python3 -m venv venv && venv/bin/pip install --quiet grpcio grpcio-tools; }",
    )
    .join("venv/bin/python")
}

/// node_modules with @grpc/grpc-js and @grpc/proto-loader.
fn node_modules() -> PathBuf {
    prepared(
        "node.lock",
        "test -d node/node_modules/@grpc/proto-loader || \
         npm install --silent --no-audit --no-fund --prefix node @grpc/grpc-js @grpc/proto-loader",
    )
    .join("node/node_modules")
}

async fn run_client(program: PathBuf, script: &str, env: &[(&str, PathBuf)]) {
    let process = Binary::spawn(&[]).await;
    let proto_root = concat!(env!("CARGO_MANIFEST_DIR"), "/proto");
    let output = tokio::process::Command::new(program)
        .args([script, proto_root, &process.grpc_addr.to_string()])
        .envs(env.iter().map(|(k, v)| (*k, v)))
        .output()
        .await
        .unwrap();
    assert!(
        output.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

#[tokio::test]
async fn a_python_client_generated_from_the_proto_checks_against_the_binary() {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/polyglot/query_client.py");
    run_client(python(), script, &[]).await;
}

#[tokio::test]
async fn a_node_client_loading_the_proto_at_run_time_checks_against_the_binary() {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/polyglot/check.js");
    run_client("node".into(), script, &[("NODE_PATH", node_modules())]).await;
}

#[tokio::test]
async fn with_tokens_configured_only_callers_presenting_one_are_served() {
    let fake = FakeSinch::start().await;
    let service = Service::against(&fake, &["--grpc-tokens=old-token, new-token"]).await;
    let channel = service.channel().await;
    let call = |authorization: Option<&str>| {
        let mut client = CapabilityServiceClient::new(channel.clone());
        let mut request = tonic::Request::new(query(contact("C"), ""));
        if let Some(authorization) = authorization {
            request
                .metadata_mut()
                .insert("authorization", authorization.parse().unwrap());
        }
        async move { client.query_capability(request).await.map(|_| ()).map_err(|s| s.code()) }
    };
    assert_eq!(call(None).await, Err(tonic::Code::Unauthenticated));
    assert_eq!(call(Some("Bearer guess")).await, Err(tonic::Code::Unauthenticated));
    assert_eq!(call(Some("Basic new-token")).await, Err(tonic::Code::Unauthenticated));
    assert_eq!(call(Some("Bearer new-token")).await, Ok(()));
    assert_eq!(call(Some("Bearer old-token")).await, Ok(()));
    // The scheme's name in any case (RFC 7235): `bearer` was refused.
    assert_eq!(call(Some("bearer new-token")).await, Ok(()));
    assert_eq!(fake.queries().len(), 3, "refused calls never reached Sinch");
    let health = HealthClient::new(channel)
        .check(HealthCheckRequest { service: String::new() })
        .await
        .expect("health stays open to probes");
    assert_eq!(health.into_inner().status(), ServingStatus::Serving);
}

/// A client command against a service that stopped answering (frozen, or a path that drops everything after the
/// connection) ends with an error instead of waiting for ever: it had no bound at all, and over TLS none for the
/// handshake (the keepalive starts after it).
#[tokio::test]
async fn a_client_command_ends_when_the_service_stops_answering() {
    for scheme in ["http", "https"] {
        commands_end_against_a_silent_service(scheme).await;
    }
}

async fn commands_end_against_a_silent_service(scheme: &str) {
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = &format!("{scheme}://{}", silent.local_addr().unwrap());
    // Accepts and holds every connection, reading nothing.
    let _held = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = silent.accept().await {
            held.push(socket);
        }
    });
    // Both at once: each waits out its keepalive's unanswered ping.
    let commands = [
        &["check", "--identity", "SMS:46700000001"][..],
        &["watch", "some-request"][..],
    ]
    .map(|args| async move {
        let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_capability-facade"))
            .env_clear()
            .args(args)
            .args(["--addr", addr])
            .kill_on_drop(true)
            .output();
        // A bound for a hang, not a timing target: the client gives up after its keepalive's ping goes unanswered.
        let output = tokio::time::timeout(Duration::from_secs(120), child)
            .await
            .unwrap_or_else(|_| panic!("{args:?} still waits on {addr}"))
            .unwrap();
        assert_ne!(output.status.code(), Some(0), "{args:?}");
    });
    futures::future::join_all(commands).await;
}

/// A SIGTERM as soon as the process says it listens (an orchestrator that stops a pod just started) drains and
/// exits 0: the signal's handler was installed only after, and the signal killed the process on the spot.
#[tokio::test]
async fn a_sigterm_right_after_listening_is_a_graceful_shutdown() {
    let fake = FakeSinch::start().await;
    for _ in 0..5 {
        let mut replica = Binary::spawn(&common::binary_env(&fake)).await;
        replica.signal("TERM");
        let status = replica.wait_exit(Duration::from_secs(30)).await.expect("it exits");
        assert_eq!(status.code(), Some(0), "{status:?}: {}", replica.log_text());
    }
}

/// The start-up check of the webhook registration needs both its variables: with one, the service says which is
/// missing, rather than leave an operator who set it to think the registration was checked.
#[tokio::test]
async fn half_of_the_registration_checks_settings_is_said() {
    for (set, value, missing) in [
        ("CAPABILITY_APP_IDS", "APP-1", "CAPABILITY_PUBLIC_WEBHOOK_URL"),
        (
            "CAPABILITY_PUBLIC_WEBHOOK_URL",
            "https://hooks.example.com/webhooks/sinch",
            "CAPABILITY_APP_IDS",
        ),
    ] {
        let replica = common::Binary::spawn(&[(set, value.to_owned())]).await;
        let said = replica.until_logged(1, |line| {
            line.contains("WARN") && line.contains(&format!("{missing} is not set"))
        });
        // A bound on the wait, not a timing target: the line comes at start or never.
        let said = tokio::time::timeout(Duration::from_secs(30), said).await;
        assert!(said.is_ok(), "{set} alone: nothing said of {missing}");
    }
}
