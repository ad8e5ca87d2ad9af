//! A small client of the service, for the command line: connects and turns statuses into readable errors.

use std::time::Duration;

use tonic::transport::{Channel, Endpoint};

use super::pb::{self, capability_service_client::CapabilityServiceClient};

/// A connected client.
pub struct Client(CapabilityServiceClient<Channel>);

impl Client {
    /// Connects to `addr` (`http://host:port`).
    pub async fn connect(addr: &str) -> Result<Client, String> {
        let endpoint = Endpoint::from_shared(addr.to_owned())
            .map_err(|e| format!("{addr:?} is not a valid address: {e}"))?
            .connect_timeout(Duration::from_secs(5));
        let channel = endpoint
            .connect()
            .await
            .map_err(|e| format!("cannot connect to {addr}: {e}"))?;
        Ok(Client(CapabilityServiceClient::new(channel)))
    }

    pub async fn query(&mut self, request: pb::QueryCapabilityRequest) -> Result<pb::QueryCapabilityResponse, String> {
        self.0
            .query_capability(request)
            .await
            .map(tonic::Response::into_inner)
            .map_err(describe)
    }
}

/// The messages of a watch, with statuses as readable errors.
pub type Watching = futures::stream::BoxStream<'static, Result<pb::WatchCapabilityResponse, String>>;

impl Client {
    pub async fn watch(&mut self, request: pb::WatchCapabilityRequest) -> Result<Watching, String> {
        use futures::StreamExt;
        let stream = self.0.watch_capability(request).await.map_err(describe)?.into_inner();
        Ok(stream.map(|item| item.map_err(describe)).boxed())
    }
}

fn describe(status: tonic::Status) -> String {
    format!("{:?}: {}", status.code(), status.message())
}
