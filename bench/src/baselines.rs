//! The physical limits the facade is compared with: a tonic server whose QueryCapability echoes at once, a tonic
//! server whose QueryCapability forwards the query to the upstream with reqwest and nothing else (the bare proxy),
//! an HTTP server whose POST handler reads the body and answers 200, and the same that first checks the callback's
//! signature as Sinch signs it (the "bare verifying handler"). Each runs as its own process.

use std::net::SocketAddr;

use axum::{
    Router,
    body::Bytes,
    http::{HeaderMap, StatusCode},
    routing::post,
};
use capability_facade::{
    grpc::pb::{
        self,
        capability_service_server::{CapabilityService, CapabilityServiceServer},
    },
    webhook::signature,
};
use serde_json::json;
use tokio::net::TcpListener;
use tonic::{Request, Response, Status, transport::server::TcpIncoming};

struct Echo;

/// The bare proxy: QueryCapability as Sinch's JSON, POSTed to the upstream with reqwest (Basic credentials, no
/// token, no retries, no rate limit, no idempotency, no log), and Sinch's answer read back into the response.
struct Proxy {
    http: reqwest::Client,
    url: String,
    auth: String,
}

#[tonic::async_trait]
impl CapabilityService for Echo {
    async fn query_capability(
        &self,
        request: Request<pb::QueryCapabilityRequest>,
    ) -> Result<Response<pb::QueryCapabilityResponse>, Status> {
        let request = request.into_inner();
        Ok(Response::new(pb::QueryCapabilityResponse {
            app_id: request.app_id,
            recipient: request.recipient,
            request_id: "echo".into(),
        }))
    }

    async fn check_capability(
        &self,
        _request: Request<pb::CheckCapabilityRequest>,
    ) -> Result<Response<pb::CheckCapabilityResponse>, Status> {
        Err(Status::unimplemented("the echo baseline has no checks"))
    }

    async fn invalidate_capability(
        &self,
        _request: Request<pb::InvalidateCapabilityRequest>,
    ) -> Result<Response<pb::InvalidateCapabilityResponse>, Status> {
        Err(Status::unimplemented("the echo baseline has no cache"))
    }

    type WatchCapabilityStream = futures::stream::Empty<Result<pb::WatchCapabilityResponse, Status>>;

    async fn watch_capability(
        &self,
        _request: Request<pb::WatchCapabilityRequest>,
    ) -> Result<Response<Self::WatchCapabilityStream>, Status> {
        Err(Status::unimplemented("the echo baseline has no watches"))
    }

    async fn start_bulk_check(
        &self,
        _request: Request<pb::StartBulkCheckRequest>,
    ) -> Result<Response<pb::BulkCheck>, Status> {
        Err(Status::unimplemented("the echo baseline has no bulk checks"))
    }

    async fn get_bulk_check(
        &self,
        _request: Request<pb::GetBulkCheckRequest>,
    ) -> Result<Response<pb::BulkCheck>, Status> {
        Err(Status::unimplemented("the echo baseline has no bulk checks"))
    }

    type WatchBulkCheckStream = futures::stream::Empty<Result<pb::WatchBulkCheckResponse, Status>>;

    async fn watch_bulk_check(
        &self,
        _request: Request<pb::WatchBulkCheckRequest>,
    ) -> Result<Response<Self::WatchBulkCheckStream>, Status> {
        Err(Status::unimplemented("the echo baseline has no bulk checks"))
    }

    async fn cancel_bulk_check(
        &self,
        _request: Request<pb::CancelBulkCheckRequest>,
    ) -> Result<Response<pb::BulkCheck>, Status> {
        Err(Status::unimplemented("the echo baseline has no bulk checks"))
    }
}

#[tonic::async_trait]
impl CapabilityService for Proxy {
    async fn query_capability(
        &self,
        request: Request<pb::QueryCapabilityRequest>,
    ) -> Result<Response<pb::QueryCapabilityResponse>, Status> {
        let request = request.into_inner();
        let recipient = match request.recipient.and_then(|r| r.recipient) {
            Some(pb::recipient::Recipient::ContactId(id)) => json!({ "contact_id": id }),
            Some(pb::recipient::Recipient::IdentifiedBy(ids)) => {
                let ids: Vec<_> = ids
                    .channel_identities
                    .iter()
                    .map(|id| {
                        let channel = pb::Channel::try_from(id.channel).unwrap_or_default().as_str_name();
                        json!({"channel": channel.trim_start_matches("CHANNEL_"), "identity": id.identity})
                    })
                    .collect();
                json!({ "identified_by": { "channel_identities": ids } })
            }
            None => return Err(Status::invalid_argument("no recipient")),
        };
        let request_id = match request.request_id.is_empty() {
            true => ulid::Ulid::new().to_string(),
            false => request.request_id,
        };
        let body = json!({"app_id": request.app_id, "recipient": recipient, "request_id": request_id});
        let response = self
            .http
            .post(&self.url)
            .header("authorization", &self.auth)
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        if !response.status().is_success() {
            return Err(Status::unavailable(format!("upstream {}", response.status())));
        }
        let bytes = response.bytes().await.map_err(|e| Status::unavailable(e.to_string()))?;
        let answer: serde_json::Value = serde_json::from_slice(&bytes).map_err(|e| Status::internal(e.to_string()))?;
        let identities = answer["recipient"]["identified_by"]["channel_identities"]
            .as_array()
            .map(|ids| {
                ids.iter()
                    .map(|id| pb::ChannelIdentity {
                        channel: pb::Channel::from_str_name(&format!(
                            "CHANNEL_{}",
                            id["channel"].as_str().unwrap_or("")
                        ))
                        .unwrap_or_default()
                        .into(),
                        identity: id["identity"].as_str().unwrap_or_default().to_owned(),
                        ..Default::default()
                    })
                    .collect()
            });
        let recipient = match (identities, answer["recipient"]["contact_id"].as_str()) {
            (Some(channel_identities), _) => Some(pb::recipient::Recipient::IdentifiedBy(pb::IdentifiedBy {
                channel_identities,
            })),
            (None, Some(id)) => Some(pb::recipient::Recipient::ContactId(id.to_owned())),
            (None, None) => None,
        };
        Ok(Response::new(pb::QueryCapabilityResponse {
            app_id: answer["app_id"].as_str().unwrap_or_default().to_owned(),
            recipient: Some(pb::Recipient { recipient }),
            request_id: answer["request_id"].as_str().unwrap_or_default().to_owned(),
        }))
    }

    async fn check_capability(
        &self,
        _request: Request<pb::CheckCapabilityRequest>,
    ) -> Result<Response<pb::CheckCapabilityResponse>, Status> {
        Err(Status::unimplemented("the proxy baseline has no checks"))
    }

    async fn invalidate_capability(
        &self,
        _request: Request<pb::InvalidateCapabilityRequest>,
    ) -> Result<Response<pb::InvalidateCapabilityResponse>, Status> {
        Err(Status::unimplemented("the proxy baseline has no cache"))
    }

    type WatchCapabilityStream = futures::stream::Empty<Result<pb::WatchCapabilityResponse, Status>>;

    async fn watch_capability(
        &self,
        _request: Request<pb::WatchCapabilityRequest>,
    ) -> Result<Response<Self::WatchCapabilityStream>, Status> {
        Err(Status::unimplemented("the proxy baseline has no watches"))
    }

    async fn start_bulk_check(
        &self,
        _request: Request<pb::StartBulkCheckRequest>,
    ) -> Result<Response<pb::BulkCheck>, Status> {
        Err(Status::unimplemented("the proxy baseline has no bulk checks"))
    }

    async fn get_bulk_check(
        &self,
        _request: Request<pb::GetBulkCheckRequest>,
    ) -> Result<Response<pb::BulkCheck>, Status> {
        Err(Status::unimplemented("the proxy baseline has no bulk checks"))
    }

    type WatchBulkCheckStream = futures::stream::Empty<Result<pb::WatchBulkCheckResponse, Status>>;

    async fn watch_bulk_check(
        &self,
        _request: Request<pb::WatchBulkCheckRequest>,
    ) -> Result<Response<Self::WatchBulkCheckStream>, Status> {
        Err(Status::unimplemented("the proxy baseline has no bulk checks"))
    }

    async fn cancel_bulk_check(
        &self,
        _request: Request<pb::CancelBulkCheckRequest>,
    ) -> Result<Response<pb::BulkCheck>, Status> {
        Err(Status::unimplemented("the proxy baseline has no bulk checks"))
    }
}

async fn bind(listen: SocketAddr) -> TcpListener {
    let listener = TcpListener::bind(listen).await.expect("the baseline binds");
    println!("listening {}", listener.local_addr().unwrap());
    listener
}

/// A bare tonic unary server.
pub async fn echo(listen: SocketAddr) {
    let listener = bind(listen).await;
    tonic::transport::Server::builder()
        .add_service(CapabilityServiceServer::new(Echo))
        .serve_with_incoming(TcpIncoming::from(listener).with_nodelay(Some(true)))
        .await
        .expect("the echo baseline serves");
}

/// The bare proxy in front of the sandbox at `upstream` (`http://host:port`), with the sandbox's credentials.
pub async fn proxy(listen: SocketAddr, upstream: String) {
    let listener = bind(listen).await;
    let proxy = Proxy {
        http: crate::scenarios::http_client(256),
        url: format!("{upstream}/v1/projects/sandbox-project/capability:query"),
        auth: testkit::basic_auth("sandbox-key", "sandbox-secret"),
    };
    tonic::transport::Server::builder()
        .add_service(CapabilityServiceServer::new(proxy))
        .serve_with_incoming(TcpIncoming::from(listener).with_nodelay(Some(true)))
        .await
        .expect("the proxy baseline serves");
}

/// A bare HTTP POST handler; with `verify`, it answers 401 unless the body is signed with [`SECRET`] as Sinch
/// signs it (the facade's own check: nothing about the timestamp, the nonce or the body beyond that).
///
/// [`SECRET`]: crate::scenarios::SECRET
pub async fn bare_http(listen: SocketAddr, verify: bool) {
    let listener = bind(listen).await;
    let handler = move |headers: HeaderMap, body: Bytes| async move {
        let header = |name| headers.get(name).and_then(|v| v.to_str().ok()).unwrap_or_default();
        let (nonce, timestamp) = (header(signature::NONCE), header(signature::TIMESTAMP));
        let secrets = [crate::scenarios::SECRET];
        if verify && !signature::verify(secrets, &body, nonce, timestamp, header(signature::SIGNATURE)) {
            return (StatusCode::UNAUTHORIZED, String::new());
        }
        (StatusCode::OK, body.len().to_string())
    };
    let router = Router::new().route("/webhooks/sinch", post(handler));
    axum::serve(listener, router).await.expect("the HTTP baseline serves");
}
