//! The callback budget as Sinch would see it: the times the queries of a bulk job reach an independent fake Sinch.
//! Alone in its test binary on purpose: it reads arrival times, and the other bulk tests (replicas killed, a Redis
//! Cluster made) would load the machine enough to shift them by more than the pacer's guard (25 ms a second).

mod common;

use std::{sync::Arc, time::Duration};

use capability_facade::grpc::pb::{self, Channel};
use common::{
    FakeSinch, Service,
    bulk::{APP, CONTACT_CHANNELS, play_sinch, recipient, start, watch},
    contact, identities,
};

// Several threads, as the service runs in production: on one, the fake's clock would read each query only when the
// thread is done with the callbacks and the job beside it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn live_queries_stay_within_the_callback_rate_in_every_second() {
    let fake = Arc::new(FakeSinch::start().await);
    let service = Service::against(&fake, &["--sinch-callback-rate=20"]).await;
    let _sinch = play_sinch(fake.clone(), service.webhook_addr, 1);
    let mut client = service.client().await;
    // An interactive check first: the connection to Sinch and its token are ready before the job.
    client
        .check_capability(pb::CheckCapabilityRequest {
            app_id: APP.into(),
            recipient: Some(recipient(99)),
            ..Default::default()
        })
        .await
        .unwrap();
    // 30 recipients of 2 identities: 60 identities at 20/s.
    let recipients = (0..30)
        .map(|i| {
            let number = format!("4671{i:07}");
            identities(&[(Channel::Sms, &number), (Channel::Rcs, &number)])
        })
        .collect();
    run_job(&mut client, recipients).await;
    let sent: Vec<std::time::Instant> = fake.queries().iter().skip(1).map(|q| q.at).collect();
    for (i, at) in sent.iter().enumerate() {
        let identities_in_window = 2 * sent[i..]
            .iter()
            .take_while(|t| **t < *at + Duration::from_secs(1))
            .count();
        assert!(
            identities_in_window <= 20,
            "{identities_in_window} identities in the second after query {i}"
        );
    }
}

/// A contact's query brings one callback per channel that answers: the job's pace counts each, not one per
/// contact (four contacts a second at a budget of four made sixteen callbacks a second).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_contact_counts_every_channel_that_answers_in_the_callback_budget() {
    let fake = Arc::new(FakeSinch::start().await);
    let budget = CONTACT_CHANNELS.len();
    let service = Service::against(&fake, &[&format!("--sinch-callback-rate={budget}")]).await;
    let _sinch = play_sinch(fake.clone(), service.webhook_addr, 1);
    let mut client = service.client().await;
    run_job(&mut client, (0..6).map(|i| contact(&format!("CONTACT-{i}"))).collect()).await;
    let sent: Vec<std::time::Instant> = fake.queries().iter().map(|q| q.at).collect();
    for (i, at) in sent.iter().enumerate() {
        let in_window = sent[i..]
            .iter()
            .take_while(|t| **t < *at + Duration::from_secs(1))
            .count();
        // One a second fills the budget; two allow for the callbacks of one arriving late.
        assert!(
            in_window <= 2,
            "{in_window} contacts ({} callbacks) in the second after query {i}",
            in_window * budget
        );
    }
}

/// Runs a job of `recipients` to its end, each answered.
async fn run_job(
    client: &mut capability_facade::grpc::pb::capability_service_client::CapabilityServiceClient<
        tonic::transport::Channel,
    >,
    recipients: Vec<pb::Recipient>,
) {
    let total = recipients.len();
    let job = client
        .start_bulk_check(start(recipients, ""))
        .await
        .unwrap()
        .into_inner();
    let (results, _) = watch(client, &job.job_id, 0).await;
    assert_eq!(results.len(), total);
}
