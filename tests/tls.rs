//! Optional TLS on the gRPC and webhook ports, for deployments outside a mesh, and mutual TLS for gRPC callers.
//! Certificates come from a throw-away CA generated per test.
mod common;

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use rustls::pki_types::pem::PemObject;

use capability_facade::{
    config::{self, ConfigError},
    grpc::pb::{self, Channel, capability_service_client::CapabilityServiceClient},
};
use common::{FakeSinch, Service, identities, query, watch_request};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
use tonic::transport::{self, Certificate, ClientTlsConfig, Endpoint, Identity};

/// A CA, a server certificate for localhost and 127.0.0.1, two client certificates from the same CA, and one
/// from a stranger's CA; PEM files in a directory removed on drop.
struct Pki {
    dir: PathBuf,
    ca: String,
    client: (String, String),
    colleague: (String, String),
    stranger: (String, String),
}

impl Pki {
    fn new() -> Pki {
        let ca = ca("test CA");
        let server = leaf(&ca, &["localhost", "127.0.0.1"]);
        let client = leaf(&ca, &["caller.example"]);
        let colleague = leaf(&ca, &["colleague.example"]);
        let stranger = leaf(&self::ca("stranger CA"), &["caller.example"]);
        let dir = std::env::temp_dir().join(format!("capability-tls-{}", ulid::Ulid::new()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("server.pem"), &server.0).unwrap();
        std::fs::write(dir.join("server.key"), &server.1).unwrap();
        std::fs::write(dir.join("ca.pem"), ca.pem()).unwrap();
        std::fs::write(dir.join("client.pem"), &client.0).unwrap();
        std::fs::write(dir.join("client.key"), &client.1).unwrap();
        Pki {
            dir,
            ca: ca.pem(),
            client,
            colleague,
            stranger,
        }
    }

    fn path(&self, name: &str) -> String {
        self.dir.join(name).display().to_string()
    }

    /// The flags that turn TLS on, and mutual TLS when `mutual`.
    fn flags(&self, mutual: bool) -> Vec<String> {
        let mut flags = vec![
            format!("--tls-cert={}", self.path("server.pem")),
            format!("--tls-key={}", self.path("server.key")),
        ];
        if mutual {
            flags.push(format!("--tls-client-ca={}", self.path("ca.pem")));
        }
        flags
    }

    /// A gRPC client that trusts the CA, presenting `identity` when given.
    async fn client(
        &self,
        addr: SocketAddr,
        identity: Option<&(String, String)>,
    ) -> Result<CapabilityServiceClient<transport::Channel>, transport::Error> {
        let mut tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&self.ca))
            .domain_name("localhost");
        if let Some((cert, key)) = identity {
            tls = tls.identity(Identity::from_pem(cert, key));
        }
        let channel = Endpoint::from_shared(format!("https://{addr}"))?
            .tls_config(tls)?
            .connect()
            .await?;
        Ok(CapabilityServiceClient::new(channel))
    }

    /// A TLS server configuration with the server's certificate, as the service builds its webhook's.
    fn server_config(&self) -> rustls::ServerConfig {
        let key = capability_facade::secret::Secret::new(std::fs::read_to_string(self.dir.join("server.key")).unwrap());
        let files =
            capability_facade::tls::TlsFiles::load(std::fs::read(self.dir.join("server.pem")).unwrap(), key, None);
        (*files.unwrap().webhook).clone()
    }

    /// An HTTPS client that trusts the CA.
    fn https(&self) -> reqwest::Client {
        capability_facade::upstream::install_crypto_provider();
        reqwest::Client::builder()
            .add_root_certificate(reqwest::Certificate::from_pem(self.ca.as_bytes()).unwrap())
            .build()
            .unwrap()
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn ca(name: &str) -> CertifiedIssuer<'static, KeyPair> {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap()
}

/// A certificate for `names` issued by `ca`: (certificate PEM, key PEM).
fn leaf(ca: &CertifiedIssuer<'static, KeyPair>, names: &[&str]) -> (String, String) {
    let key = KeyPair::generate().unwrap();
    let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
    let cert = CertificateParams::new(names).unwrap().signed_by(&key, ca).unwrap();
    (cert.pem(), key.serialize_pem())
}

fn flags(owned: &[String]) -> Vec<&str> {
    owned.iter().map(String::as_str).collect()
}

/// One QueryCapability through `client`: its request_id, or the status.
async fn ask(client: &mut CapabilityServiceClient<transport::Channel>) -> Result<String, tonic::Status> {
    let answer = client
        .query_capability(query(identities(&[(Channel::Whatsapp, "46712312312")]), ""))
        .await?;
    Ok(answer.into_inner().request_id)
}

#[tokio::test]
async fn with_tls_both_ports_serve_tls_only_and_a_callback_reaches_its_watcher() {
    let pki = Pki::new();
    let fake = FakeSinch::start().await;
    let service = Service::against(&fake, &flags(&pki.flags(false))).await;

    let mut client = pki.client(service.grpc_addr, None).await.unwrap();
    let request_id = ask(&mut client).await.unwrap();
    let mut stream = client
        .watch_capability(watch_request(&request_id, 0, None))
        .await
        .unwrap()
        .into_inner();
    let body = common::capability_body(&request_id, "WHATSAPP", "46712312312", "CAPABILITY_FULL");
    let mut post = pki
        .https()
        .post(format!("https://{}/webhooks/sinch", service.webhook_addr))
        .body(body.clone());
    for (name, value) in common::signed_headers(common::WEBHOOK_SECRET, &body) {
        post = post.header(name, value);
    }
    assert_eq!(post.send().await.unwrap().status(), 200);
    match stream.message().await.unwrap().unwrap().event {
        Some(pb::watch_capability_response::Event::Notification(n)) => assert_eq!(n.channel_raw, "WHATSAPP"),
        other => panic!("expected the notification, got {other:?}"),
    }

    // Plaintext is refused on both ports.
    let plain_grpc = async {
        let channel = Endpoint::from_shared(format!("http://{}", service.grpc_addr))
            .unwrap()
            .connect()
            .await
            .map_err(|e| e.to_string())?;
        ask(&mut CapabilityServiceClient::new(channel))
            .await
            .map_err(|s| s.to_string())
    };
    assert!(plain_grpc.await.is_err(), "a plaintext gRPC call was served");
    let plain_webhook = common::reqwest_client()
        .post(format!("http://{}/webhooks/sinch", service.webhook_addr))
        .body(body)
        .send()
        .await;
    assert!(
        plain_webhook.is_err(),
        "a plaintext webhook was answered: {plain_webhook:?}"
    );
}

#[tokio::test]
async fn mutual_tls_admits_only_callers_with_a_certificate_from_the_client_ca() {
    let pki = Pki::new();
    let fake = FakeSinch::start().await;
    let service = Service::against(&fake, &flags(&pki.flags(true))).await;

    let mut trusted = pki.client(service.grpc_addr, Some(&pki.client)).await.unwrap();
    assert!(
        ask(&mut trusted).await.is_ok(),
        "a caller with a certificate from the client CA"
    );

    for (who, identity) in [
        ("no certificate", None),
        ("a stranger's certificate", Some(&pki.stranger)),
    ] {
        // The handshake fails at connect or, in TLS 1.3, with the first call; either way nothing is served.
        if let Ok(mut client) = pki.client(service.grpc_addr, identity).await {
            let refused = ask(&mut client).await.unwrap_err();
            assert!(format!("{refused:?}").contains("alert"), "{who}: {refused:?}");
        }
    }
    assert_eq!(fake.queries().len(), 1, "only the trusted caller's query reached Sinch");

    // Sinch presents no certificate: the webhook port asks for none.
    let health = pki
        .https()
        .get(format!("https://{}/healthz", service.webhook_addr))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), 200);
}

#[tokio::test]
async fn under_mutual_tls_each_client_certificate_is_its_own_caller_for_the_watch_limit() {
    let pki = Pki::new();
    let fake = FakeSinch::start().await;
    let mut owned = pki.flags(true);
    owned.extend(["--max-watches=10".to_owned(), "--max-watches-per-caller=1".to_owned()]);
    let service = Service::against(&fake, &flags(&owned)).await;
    let watch = || {
        watch_request(
            &ulid::Ulid::new().to_string(),
            0,
            Some(std::time::Duration::from_secs(60)),
        )
    };

    let mut first = pki.client(service.grpc_addr, Some(&pki.client)).await.unwrap();
    let _held = first.watch_capability(watch()).await.unwrap();
    // The same certificate on another connection is the same caller.
    let mut again = pki.client(service.grpc_addr, Some(&pki.client)).await.unwrap();
    let refused = again.watch_capability(watch()).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::ResourceExhausted, "{refused:?}");
    assert!(
        refused.message().contains(config::MAX_WATCHES_PER_CALLER),
        "{refused:?}"
    );
    // Another certificate from the same address is another caller.
    let mut colleague = pki.client(service.grpc_addr, Some(&pki.colleague)).await.unwrap();
    let _theirs = colleague.watch_capability(watch()).await.unwrap();
}

#[tokio::test]
async fn over_tls_a_request_with_content_length_and_transfer_encoding_gets_400() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let pki = Pki::new();
    let fake = FakeSinch::start().await;
    let service = Service::against(&fake, &flags(&pki.flags(false))).await;
    capability_facade::upstream::install_crypto_provider();
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(rustls::pki_types::CertificateDer::from_pem_slice(pki.ca.as_bytes()).unwrap())
        .unwrap();
    let mut config = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let tcp = tokio::net::TcpStream::connect(service.webhook_addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
        .connect(name, tcp)
        .await
        .unwrap();
    tls.write_all(
        b"POST /webhooks/sinch HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 7\r\n\
          transfer-encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n",
    )
    .await
    .unwrap();
    let mut head = [0; 12];
    tls.read_exact(&mut head).await.unwrap();
    assert_eq!(&head, b"HTTP/1.1 400");
}

#[tokio::test]
async fn the_in_process_sandbox_posts_its_callbacks_over_tls() {
    let pki = Pki::new();
    let service = Service::start(common::sandbox_config(&flags(&pki.flags(false)))).await;
    let mut client = pki.client(service.grpc_addr, None).await.unwrap();
    let request_id = ask(&mut client).await.unwrap();
    let stream = client
        .watch_capability(watch_request(&request_id, 0, None))
        .await
        .unwrap()
        .into_inner();
    let (seen, end) = common::drain(stream).await;
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert!(end.is_ok(), "{end:?}");
}

#[tokio::test]
async fn the_cli_checks_over_mutual_tls_with_a_token_against_the_real_binary() {
    let pki = Pki::new();
    let binary = common::Binary::spawn(&[
        ("CAPABILITY_TLS_CERT", pki.path("server.pem")),
        ("CAPABILITY_TLS_KEY", pki.path("server.key")),
        ("CAPABILITY_TLS_CLIENT_CA", pki.path("ca.pem")),
        ("CAPABILITY_GRPC_TOKENS", "s3cret-token".into()),
    ])
    .await;
    let addr = format!("https://{}", binary.grpc_addr);
    let check = |extra: &[String]| {
        let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_capability-facade"));
        command
            .env_clear()
            .args(["check", "--addr", &addr, "--identity", "WHATSAPP:46712312312"])
            .arg(format!("--tls-ca={}", pki.path("ca.pem")))
            .args(extra);
        async move { command.output().await.unwrap() }
    };
    let identity = [
        format!("--tls-cert={}", pki.path("client.pem")),
        format!("--tls-key={}", pki.path("client.key")),
    ];

    let output = check(&[identity.to_vec(), vec!["--token=s3cret-token".into()]].concat()).await;
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success() && stdout.contains("FULL"),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );

    let without_token = check(&identity).await;
    assert!(!without_token.status.success());
    assert!(
        String::from_utf8_lossy(&without_token.stderr).contains("Unauthenticated"),
        "{}",
        String::from_utf8_lossy(&without_token.stderr)
    );
    let without_certificate = check(&["--token=s3cret-token".into()]).await;
    assert!(
        !without_certificate.status.success(),
        "no client certificate, no answer"
    );
}

#[tokio::test]
async fn a_tls_misconfiguration_names_its_variable_before_anything_starts() {
    let pki = Pki::new();
    let (cert, key) = (pki.path("server.pem"), pki.path("server.key"));
    std::fs::write(pki.dir.join("other.key"), KeyPair::generate().unwrap().serialize_pem()).unwrap();
    std::fs::write(pki.dir.join("garbage.pem"), "not a certificate").unwrap();
    let rows: [(&str, Vec<String>, &str); 6] = [
        (
            "a certificate without key",
            vec![format!("--tls-cert={cert}")],
            config::TLS_KEY,
        ),
        (
            "a key without certificate",
            vec![format!("--tls-key={key}")],
            config::TLS_CERT,
        ),
        (
            "a client CA without TLS",
            vec![format!("--tls-client-ca={}", pki.path("ca.pem"))],
            config::TLS_CLIENT_CA,
        ),
        (
            "a missing certificate file",
            vec![
                format!("--tls-cert={}", pki.path("absent.pem")),
                format!("--tls-key={key}"),
            ],
            config::TLS_CERT,
        ),
        (
            "a file without a certificate",
            vec![
                format!("--tls-cert={}", pki.path("garbage.pem")),
                format!("--tls-key={key}"),
            ],
            config::TLS_CERT,
        ),
        (
            "a key of another certificate",
            vec![
                format!("--tls-cert={cert}"),
                format!("--tls-key={}", pki.path("other.key")),
            ],
            config::TLS_KEY,
        ),
    ];
    for (row, extra, variable) in rows {
        let error: ConfigError = common::start_error("http://127.0.0.1:9", &flags(&extra)).await;
        assert_eq!(error.variable, variable, "{row}: {}", error.problem);
    }
}

/// In sandbox mode a service serving TLS registers its webhook with the in-process sandbox as `https://`; the
/// doctor, run with the same configuration, checks that URL and finds it registered.
#[tokio::test]
async fn in_sandbox_mode_over_tls_the_doctor_checks_the_https_webhook() {
    let pki = Pki::new();
    let mut env = vec![
        ("CAPABILITY_SANDBOX_APPS", "APP-1".to_owned()),
        ("SINCH_WEBHOOK_SECRETS", common::WEBHOOK_SECRET.to_owned()),
        (config::TLS_CERT, pki.path("server.pem")),
        (config::TLS_KEY, pki.path("server.key")),
    ];
    let service = common::Binary::spawn(&env).await;
    // The doctor reads the same configuration: the ports the service bound.
    let said = |line: &str| line.contains("in-process Sinch sandbox listening");
    let line = service.until_logged(1, said).await.remove(0);
    let sandbox: serde_json::Value = serde_json::from_str(&line).unwrap();
    env.push(("CAPABILITY_SANDBOX_ADDR", sandbox["addr"].as_str().unwrap().to_owned()));
    env.push(("CAPABILITY_WEBHOOK_ADDR", service.webhook_addr.to_string()));
    let doctor = tokio::process::Command::new(env!("CARGO_BIN_EXE_capability-facade"))
        .env_clear()
        .envs(env.iter().map(|(k, v)| (k, v)))
        .args(["doctor", "--app-id", "APP-1"])
        .output()
        .await
        .unwrap();
    let out = String::from_utf8_lossy(&doctor.stdout);
    assert!(doctor.status.success(), "the doctor failed:\n{out}");
    assert!(out.contains("targets https://127.0.0.1:"), "{out}");
}

/// Spans go to an https collector whose certificate `OTEL_EXPORTER_OTLP_CERTIFICATE`'s CA signed; without that
/// file only the public CAs are trusted, and none goes to it. An https endpoint was refused at start (the exporter
/// had no TLS).
#[tokio::test]
async fn spans_are_exported_over_tls_to_a_collector_the_configured_ca_vouches_for() {
    let pki = Pki::new();
    let collector = common::Collector::start(Some(pki.server_config())).await;
    let endpoint = format!("https://localhost:{}", collector.addr.port());
    for trusted in [true, false] {
        let fake = FakeSinch::start().await;
        let mut env = common::binary_env(&fake);
        env.push(("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.clone()));
        if trusted {
            env.push(("OTEL_EXPORTER_OTLP_CERTIFICATE", pki.path("ca.pem")));
        }
        let before = collector.exported().len();
        let mut process = common::Binary::spawn(&env).await;
        let mut client = CapabilityServiceClient::connect(process.url()).await.unwrap();
        ask(&mut client).await.unwrap();
        drop(client);
        process.signal("TERM");
        assert!(process.wait_exit(Duration::from_secs(10)).await.unwrap().success());
        let exported = collector.exported()[before..].to_vec();
        let found = exported.windows(16).any(|w| w == b"query_capability");
        assert_eq!(
            found, trusted,
            "the RPC span reached the collector: {found}, its CA trusted: {trusted}"
        );
    }
}

/// A `rediss://` URL (a managed Redis over TLS, as deploy/k8s's example secret has it): the replica reaches Redis
/// over TLS, trusting the system's roots or, for a private CA, the file `CAPABILITY_REDIS_CA_FILE` names, and keeps
/// its log there. Every replica given one exited 2 at start (the Redis client was built without TLS).
#[tokio::test]
async fn a_rediss_url_keeps_the_log_in_a_redis_reached_over_tls() {
    let pki = Pki::new();
    let (port, _redis) = tls_redis(&pki).await;
    let fake = FakeSinch::start().await;
    let mut env = common::binary_env(&fake);
    env.push(("CAPABILITY_REDIS_URL", format!("rediss://localhost:{port}")));
    env.push(("CAPABILITY_REDIS_CA_FILE", pki.path("ca.pem")));
    let replica = common::Binary::spawn(&env).await;
    let mut client = CapabilityServiceClient::connect(replica.url()).await.unwrap();
    let request_id = ask(&mut client).await.unwrap();
    // The query's record, in Redis's stream of the request.
    let keys = || {
        let out = std::process::Command::new("redis-cli")
            .args([
                "--tls",
                "--cacert",
                &pki.path("ca.pem"),
                "-h",
                "localhost",
                "-p",
                &port.to_string(),
            ])
            .args(["--scan", "--pattern", "*"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).lines().count()
    };
    common::until(Duration::from_secs(10), async || keys() > 0).await;
    assert!(
        !replica.log_text().contains("degraded"),
        "{request_id}: {}",
        replica.log_text()
    );
}

/// A redis-server serving TLS only, with the certificate `pki` issued for localhost: its port, and the server.
async fn tls_redis(pki: &Pki) -> (u16, tokio::process::Child) {
    let tls_only = |port: u16| {
        let mut command = tokio::process::Command::new("redis-server");
        command.args(["--port", "0", "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]);
        command.args(["--tls-port", &port.to_string(), "--tls-auth-clients", "no"]);
        command.args(["--tls-cert-file", &pki.path("server.pem")]);
        command.args(["--tls-key-file", &pki.path("server.key")]);
        command
    };
    testkit::redis::on_a_free_port(testkit::free_port, tls_only).await
}

/// A Redis whose certificate nothing trusted vouches for (a private CA, `CAPABILITY_REDIS_CA_FILE` not set, or set
/// to another CA) is refused at start, naming the variable: waiting would not mend it. The replica started
/// degraded and tried again for ever.
#[tokio::test]
async fn a_redis_certificate_no_trusted_ca_vouches_for_is_refused_at_start() {
    let pki = Pki::new();
    let (port, _redis) = tls_redis(&pki).await;
    let fake = FakeSinch::start().await;
    let url = format!("--redis-url=rediss://localhost:{port}");
    let error = common::start_error(&fake.url(), &[&url]).await;
    assert_eq!(error.variable, "CAPABILITY_REDIS_URL");
    assert!(error.problem.contains("certificate"), "{}", error.problem);
    let stranger = ca("stranger CA").pem();
    let path = pki.dir.join("stranger.pem");
    std::fs::write(&path, stranger).unwrap();
    let ca_file = format!("--redis-ca-file={}", path.display());
    let error = common::start_error(&fake.url(), &[&url, &ca_file]).await;
    assert_eq!(error.variable, "CAPABILITY_REDIS_URL");
    assert!(error.problem.contains("certificate"), "{}", error.problem);
}
