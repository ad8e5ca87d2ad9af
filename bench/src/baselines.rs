//! The physical limits the facade is compared with: a tonic server whose QueryCapability echoes at once, and an
//! HTTP server whose POST handler reads the body and answers 200. Each runs as its own process.

use std::net::SocketAddr;

use axum::{Router, body::Bytes, routing::post};
use capability_facade::grpc::pb::{
    self,
    capability_service_server::{CapabilityService, CapabilityServiceServer},
};
use tokio::net::TcpListener;
use tonic::{Request, Response, Status, transport::server::TcpIncoming};

struct Echo;

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

/// A bare HTTP POST handler.
pub async fn bare_http(listen: SocketAddr) {
    let listener = bind(listen).await;
    let router = Router::new().route(
        "/webhooks/sinch",
        post(|body: Bytes| async move { body.len().to_string() }),
    );
    axum::serve(listener, router).await.expect("the HTTP baseline serves");
}
