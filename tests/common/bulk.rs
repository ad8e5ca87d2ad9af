//! Bulk checks as a caller drives them: a task playing Sinch's side of the callbacks, request builders, and the
//! job's get, cancel and stream.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use capability_facade::grpc::pb::{
    self, Channel, capability_service_client::CapabilityServiceClient, watch_bulk_check_response::Event,
};
use tonic::transport::Channel as Transport;

use super::{CapabilityCallback, FakeSinch, deliver, identities};

pub const APP: &str = "APP-1";

/// The channels a contact of [`play_sinch`] is reachable on: one callback each.
pub const CONTACT_CHANNELS: [&str; 4] = ["SMS", "RCS", "WHATSAPP", "VIBER"];

/// Answers every query the fake receives, from the `from`-th on (1-based), with one FULL callback per identity
/// (per channel of [`CONTACT_CHANNELS`] for a contact), posted to `webhook`, until dropped.
pub fn play_sinch(fake: Arc<FakeSinch>, webhook: SocketAddr, from: usize) -> tokio::task::JoinHandle<()> {
    play_sinch_after(fake, webhook, from, Duration::ZERO)
}

/// [`play_sinch`], each callback `delay` after its query.
pub fn play_sinch_after(
    fake: Arc<FakeSinch>,
    webhook: SocketAddr,
    from: usize,
    delay: Duration,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        for n in from.. {
            let body = fake.until_queries(n).await[n - 1].json();
            tokio::time::sleep(delay).await;
            let request_id = body["request_id"].as_str().unwrap().to_owned();
            let callbacks: Vec<CapabilityCallback> = match body["recipient"]["contact_id"].as_str() {
                Some(contact) => CONTACT_CHANNELS
                    .iter()
                    .map(|channel| {
                        CapabilityCallback::new(&request_id, channel, "46700000000", "CAPABILITY_FULL")
                            .contact_id(contact)
                    })
                    .collect(),
                None => body["recipient"]["identified_by"]["channel_identities"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|id| {
                        CapabilityCallback::new(
                            &request_id,
                            id["channel"].as_str().unwrap(),
                            id["identity"].as_str().unwrap(),
                            "CAPABILITY_FULL",
                        )
                    })
                    .collect(),
            };
            for callback in callbacks {
                assert_eq!(deliver(webhook, callback.body()).await, 200);
            }
        }
    })
}

pub fn recipient(i: usize) -> pb::Recipient {
    identities(&[(Channel::Sms, &format!("4670{i:07}"))])
}

pub fn start(recipients: Vec<pb::Recipient>, request_id: &str) -> pb::StartBulkCheckRequest {
    pb::StartBulkCheckRequest {
        app_id: APP.into(),
        recipients,
        wait: Some(prost_types::Duration { seconds: 10, nanos: 0 }),
        request_id: request_id.into(),
        ..Default::default()
    }
}

/// The job, as GetBulkCheck gives it.
pub async fn get(client: &mut CapabilityServiceClient<Transport>, job_id: &str) -> pb::BulkCheck {
    let request = pb::GetBulkCheckRequest { job_id: job_id.into() };
    client.get_bulk_check(request).await.unwrap().into_inner()
}

/// Cancels the job; the job as CancelBulkCheck returns it.
pub async fn cancel(client: &mut CapabilityServiceClient<Transport>, job_id: &str) -> pb::BulkCheck {
    let request = pb::CancelBulkCheckRequest { job_id: job_id.into() };
    client.cancel_bulk_check(request).await.unwrap().into_inner()
}

/// Every message of the job's stream from `after`: the results, and the progresses.
pub async fn watch(
    client: &mut CapabilityServiceClient<Transport>,
    job_id: &str,
    after: u64,
) -> (Vec<pb::BulkCheckResult>, Vec<pb::BulkCheck>) {
    let mut stream = client
        .watch_bulk_check(pb::WatchBulkCheckRequest {
            job_id: job_id.into(),
            after_offset: after,
        })
        .await
        .unwrap()
        .into_inner();
    let (mut results, mut progress) = (Vec::new(), Vec::new());
    while let Some(message) = stream.message().await.unwrap() {
        match message.event.unwrap() {
            Event::Result(result) => results.push(result),
            Event::Progress(p) => progress.push(p),
        }
    }
    (results, progress)
}
