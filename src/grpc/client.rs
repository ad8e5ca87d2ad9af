//! A small client of the service, for the command line: connects and turns statuses into readable errors.

use std::time::Duration;

use tonic::{
    Request,
    metadata::MetadataValue,
    transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity},
};

use super::pb::{self, capability_service_client::CapabilityServiceClient};
use crate::secret::Secret;

/// How often a client pings the service, and how long it waits for the answer.
const KEEPALIVE: Duration = Duration::from_secs(5);
/// How long a TLS handshake may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Where the service is and how to present ourselves to it.
pub struct Connection {
    /// `http://host:port`, or `https://host:port` for a service that serves TLS.
    pub addr: String,
    /// Sent as `authorization: Bearer <token>` on every call.
    pub token: Option<Secret>,
    /// PEM CA certificates to trust over https (the public web roots when `None`).
    pub ca: Option<Vec<u8>>,
    /// A PEM client certificate and key, for mutual TLS.
    pub identity: Option<(Vec<u8>, Vec<u8>)>,
}

/// A connected client.
pub struct Client {
    inner: CapabilityServiceClient<Channel>,
    token: Option<Secret>,
}

impl Client {
    pub async fn connect(connection: Connection) -> Result<Client, String> {
        let addr = &connection.addr;
        let mut endpoint = Endpoint::from_shared(addr.clone())
            .map_err(|e| format!("{addr:?} is not a valid address: {e}"))?
            .connect_timeout(Duration::from_secs(5))
            // A service that stops answering (frozen, or a path that drops everything) ends the call with an
            // error once a ping goes unanswered, rather than leaving the command waiting for ever.
            .http2_keep_alive_interval(KEEPALIVE)
            .keep_alive_timeout(KEEPALIVE)
            .keep_alive_while_idle(true);
        if addr.starts_with("https://") {
            let tls = match &connection.ca {
                Some(ca) => ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca)),
                None => ClientTlsConfig::new().with_webpki_roots(),
            };
            // The keepalive starts after the handshake: a service that accepts and answers nothing holds it.
            let mut tls = tls.timeout(HANDSHAKE_TIMEOUT);
            if let Some((cert, key)) = &connection.identity {
                tls = tls.identity(Identity::from_pem(cert, key));
            }
            endpoint = endpoint
                .tls_config(tls)
                .map_err(|e| format!("cannot use these TLS settings: {e}"))?;
        }
        let channel = endpoint
            .connect()
            .await
            .map_err(|e| format!("cannot connect to {addr}: {e}"))?;
        Ok(Client {
            inner: CapabilityServiceClient::new(channel),
            token: connection.token,
        })
    }

    /// `message` as a request, with the bearer token when there is one.
    fn request<T>(&self, message: T) -> Result<Request<T>, String> {
        let mut request = Request::new(message);
        if let Some(token) = &self.token {
            let value = MetadataValue::try_from(format!("Bearer {}", token.expose()))
                .map_err(|_| "the token is not a valid header value".to_owned())?;
            request.metadata_mut().insert("authorization", value);
        }
        Ok(request)
    }

    pub async fn query(&mut self, request: pb::QueryCapabilityRequest) -> Result<pb::QueryCapabilityResponse, String> {
        let request = self.request(request)?;
        self.inner
            .query_capability(request)
            .await
            .map(tonic::Response::into_inner)
            .map_err(describe)
    }
}

impl Client {
    pub async fn check(&mut self, request: pb::CheckCapabilityRequest) -> Result<pb::CheckCapabilityResponse, String> {
        let request = self.request(request)?;
        self.inner
            .check_capability(request)
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
        let request = self.request(request)?;
        let stream = self
            .inner
            .watch_capability(request)
            .await
            .map_err(describe)?
            .into_inner();
        Ok(stream.map(|item| item.map_err(describe)).boxed())
    }
}

fn describe(status: tonic::Status) -> String {
    format!("{:?}: {}", status.code(), status.message())
}

/// The messages of a bulk check's watch, with statuses as readable errors.
pub type WatchingBulk = futures::stream::BoxStream<'static, Result<pb::WatchBulkCheckResponse, BulkError>>;

/// A bulk call's failure: its code (to tell a stream cut by a shutdown, worth resuming, from the rest) and a
/// readable message.
#[derive(Debug, Clone)]
pub struct BulkError {
    pub code: tonic::Code,
    pub message: String,
}

impl std::fmt::Display for BulkError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl BulkError {
    fn new(status: tonic::Status) -> BulkError {
        BulkError {
            code: status.code(),
            message: describe(status),
        }
    }

    fn local(message: String) -> BulkError {
        BulkError {
            code: tonic::Code::InvalidArgument,
            message,
        }
    }
}

impl Client {
    /// StartBulkCheck: the job (a repeat of the same request_id returns the same one).
    pub async fn start_bulk_check(&mut self, request: pb::StartBulkCheckRequest) -> Result<pb::BulkCheck, BulkError> {
        let request = self.request(request).map_err(BulkError::local)?;
        self.inner
            .start_bulk_check(request)
            .await
            .map(tonic::Response::into_inner)
            .map_err(BulkError::new)
    }

    /// GetBulkCheck: the job's state and counts now.
    pub async fn get_bulk_check(&mut self, job_id: &str) -> Result<pb::BulkCheck, BulkError> {
        let request = self
            .request(pb::GetBulkCheckRequest { job_id: job_id.into() })
            .map_err(BulkError::local)?;
        self.inner
            .get_bulk_check(request)
            .await
            .map(tonic::Response::into_inner)
            .map_err(BulkError::new)
    }

    /// CancelBulkCheck: stops the job's new queries; returns it.
    pub async fn cancel_bulk_check(&mut self, job_id: &str) -> Result<pb::BulkCheck, BulkError> {
        let request = self
            .request(pb::CancelBulkCheckRequest { job_id: job_id.into() })
            .map_err(BulkError::local)?;
        self.inner
            .cancel_bulk_check(request)
            .await
            .map(tonic::Response::into_inner)
            .map_err(BulkError::new)
    }

    /// WatchBulkCheck: the job's results past `after_offset`, with its progress, until it has ended.
    pub async fn watch_bulk_check(&mut self, job_id: &str, after_offset: u64) -> Result<WatchingBulk, BulkError> {
        use futures::StreamExt;
        let request = self
            .request(pb::WatchBulkCheckRequest {
                job_id: job_id.into(),
                after_offset,
            })
            .map_err(BulkError::local)?;
        let stream = self
            .inner
            .watch_bulk_check(request)
            .await
            .map_err(BulkError::new)?
            .into_inner();
        Ok(stream.map(|item| item.map_err(BulkError::new)).boxed())
    }
}
