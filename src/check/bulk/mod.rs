//! Bulk checks: jobs of up to 100,000 recipients, each checked as CheckCapability checks one, with the live
//! queries paced under the app's callback budget ([`pacer`]) after every interactive call.
//!
//! A job runs on one replica. Each recipient is recorded as sent *before* its query goes out and is never sent
//! again; identical recipients within a job are asked once. Without Redis a job lives in this process
//! ([`local`]). With Redis ([`crate::log::redis::jobs`]) the job, its progress and its results live there: the
//! replica running it holds a lease it renews, and when that replica dies another takes the job over — it waits
//! for the callbacks of the recipients already sent (they reach every replica through the log) until their wait
//! elapses, and sends the rest (nothing, when the job was cancelled).

pub mod local;
pub mod pacer;
pub mod stored;

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use futures::{FutureExt, StreamExt, future::BoxFuture};
use sha2::{Digest as _, Sha256};
use tokio::time::Instant;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use super::{CheckAnswer, CheckError, CheckRequest, Checker, Gate, Proceed, Source};
use crate::log::redis::jobs::Marked;
use crate::{
    capability::{ChannelOrder, Recipient, mask_digits},
    log::{EventLog, wall_clock_ms},
};
use local::LocalJobs;
use pacer::Pacer;

/// The most recipients one job takes.
pub const MAX_RECIPIENTS: usize = 100_000;
/// The most jobs running at once on one replica (a job past it is refused; with Redis, taken over by another).
pub const MAX_RUNNING: usize = 16;
/// How often a replica renews the lease of a job it runs, and looks for jobs nobody runs.
const LEASE_RENEWAL: Duration = Duration::from_secs(2);
/// How long a lease lasts without renewal: a job whose replica died is taken over after this.
const LEASE: Duration = Duration::from_secs(6);
/// How long a recipient's query may take to be sent (its wait comes after): with the wait and the time its turn
/// was queued, its check's deadline.
pub const SEND_DEADLINE: Duration = Duration::from_secs(30);
/// When a recipient whose query Sinch refused for a while (through every retry) is asked again, after its
/// first attempt: then it is answered with every identity pending.
const ASKED_AGAIN_AFTER: [Duration; 4] = [
    Duration::from_secs(1),
    Duration::from_secs(5),
    Duration::from_secs(25),
    Duration::from_secs(60),
];

/// A validated StartBulkCheck.
#[derive(Debug, Clone)]
pub struct JobSpec {
    pub app_id: String,
    pub recipients: Vec<Recipient>,
    pub max_age: Duration,
    pub wait: Duration,
    pub preference: Option<ChannelOrder>,
    pub request_id: Option<String>,
}

impl JobSpec {
    /// What makes two starts the same job: the app, the recipients and the options, hashed.
    pub fn fingerprint(&self) -> String {
        let bytes = stored::encode_spec(&JobSpec {
            request_id: None,
            ..self.clone()
        });
        Sha256::digest(&bytes)[..16]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }
}

/// Where a job stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobState {
    Running,
    Succeeded,
    Cancelled,
    Failed,
}

impl JobState {
    /// Counts a job that ended in this state, in `capability_bulk_jobs_ended_total{state}`.
    fn count_ended(self) {
        let state = match self {
            JobState::Running => return,
            JobState::Succeeded => "succeeded",
            JobState::Cancelled => "cancelled",
            JobState::Failed => "failed",
        };
        metrics::counter!("capability_bulk_jobs_ended_total", "state" => state).increment(1);
    }

    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Running => "RUNNING",
            JobState::Succeeded => "SUCCEEDED",
            JobState::Cancelled => "CANCELLED",
            JobState::Failed => "FAILED",
        }
    }

    pub fn parse(text: &str) -> JobState {
        match text {
            "RUNNING" => JobState::Running,
            "SUCCEEDED" => JobState::Succeeded,
            "CANCELLED" => JobState::Cancelled,
            _ => JobState::Failed,
        }
    }

    pub fn ended(self) -> bool {
        self != JobState::Running
    }
}

/// A job's state and counts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobStatus {
    pub job_id: String,
    pub state: JobState,
    pub total: u64,
    pub done: u64,
    pub from_cache: u64,
    pub reachable: u64,
    pub create_ms: u64,
    pub update_ms: u64,
    /// The request_id it was started with; empty without one.
    pub request_id: String,
    /// No result will come any more: the job ended and, if cancelled, its recipients already sent have their
    /// answers (or their wait is over).
    pub settled: bool,
}

impl JobStatus {
    /// How long the rest should take at the pace so far; `None` when unknown or ended.
    pub fn estimated_remaining(&self, now_ms: u64) -> Option<Duration> {
        if self.state.ended() || self.done == 0 {
            return None;
        }
        let elapsed = now_ms.saturating_sub(self.create_ms) as f64;
        let left = self.total.saturating_sub(self.done) as f64;
        Some(Duration::from_millis((elapsed * left / self.done as f64) as u64))
    }
}

/// One recipient's answer at its offset in the job's results.
#[derive(Debug, Clone)]
pub struct JobResult {
    pub offset: u64,
    pub index: u32,
    pub answer: CheckAnswer,
}

/// Why a bulk call failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum JobError {
    #[error("no bulk check job {0:?} (unknown, or expired after its retention)")]
    NotFound(String),
    #[error("request_id {0:?} was already used for a different bulk check; use a new request_id for a new job")]
    Conflict(String),
    #[error("this replica runs {MAX_RUNNING} bulk checks already; retry when one has ended")]
    TooMany,
    #[error("the job store is unavailable: {0}")]
    Unavailable(String),
    #[error("this replica is shutting down and keeps no bulk check past it; retry (another replica runs it)")]
    ShuttingDown,
}

fn unavailable(e: impl std::fmt::Display) -> JobError {
    JobError::Unavailable(e.to_string())
}

/// Where jobs live.
enum Store {
    Local(LocalJobs),
    Redis(Arc<EventLog>),
}

/// What a starting replica needs to resume a job.
pub struct Resumable {
    pub spec: JobSpec,
    /// Recipients whose query went out: index → (request_id, when, ms since the epoch).
    pub sent: HashMap<u32, (String, u64)>,
    /// Recipients with their answer.
    pub done: std::collections::HashSet<u32>,
    /// Cancelled already: only the recipients sent before are answered.
    pub cancelled: bool,
}

/// Runs and serves bulk checks on this replica.
pub struct Jobs {
    store: Store,
    checker: Arc<Checker>,
    pacer: Arc<Pacer>,
    /// The jobs this replica runs, with what stops them.
    running: Mutex<HashMap<String, CancellationToken>>,
    /// This replica's name in leases.
    owner: String,
    retention: Duration,
    tasks: TaskTracker,
    /// Cancelled when this replica begins to shut down: no recipient's turn comes any more.
    draining: CancellationToken,
    stop: CancellationToken,
}

impl Jobs {
    /// `draining` is cancelled when this replica begins to shut down (its recipients' turns stop coming), `stop`
    /// when it stops: its jobs are left to others (with Redis).
    pub fn new(
        log: &Arc<EventLog>,
        checker: Arc<Checker>,
        pacer: Arc<Pacer>,
        retention: Duration,
        draining: CancellationToken,
        stop: CancellationToken,
    ) -> Jobs {
        let store = match log.shared_jobs() {
            Some(_) => Store::Redis(log.clone()),
            None => Store::Local(LocalJobs::new(retention)),
        };
        Jobs {
            store,
            checker,
            pacer,
            running: Mutex::new(HashMap::new()),
            owner: ulid::Ulid::new().to_string(),
            retention,
            tasks: TaskTracker::new(),
            draining,
            stop,
        }
    }

    fn redis(log: &EventLog) -> &crate::log::redis::jobs::RedisJobs {
        log.shared_jobs().expect("a Redis store")
    }

    /// Starts a job, or finds the one its request_id started.
    pub async fn start(self: &Arc<Self>, spec: JobSpec) -> Result<JobStatus, JobError> {
        let job_id = ulid::Ulid::new().to_string();
        let fingerprint = spec.fingerprint();
        let now = wall_clock_ms();
        let (status, created) = match &self.store {
            Store::Local(local) => {
                // Its place among the running is taken under the lock, so that two starts at once cannot both
                // push an ended job out for one place. A job that lives in this process cannot outlive it: none
                // is started once it shuts down.
                let mut running = self.running.lock().expect("jobs lock poisoned");
                let room = if self.draining.is_cancelled() {
                    Err(JobError::ShuttingDown)
                } else if running.len() >= MAX_RUNNING {
                    Err(JobError::TooMany)
                } else {
                    Ok(())
                };
                let (status, created) = local.create(&job_id, &spec, &fingerprint, now, room)?;
                if created {
                    // Held until it is launched.
                    running.insert(job_id.clone(), CancellationToken::new());
                }
                (status, created)
            }
            Store::Redis(log) => Self::redis(log)
                .create(&job_id, &spec, &fingerprint, now, self.retention)
                .await
                .map_err(unavailable)??,
        };
        if created
            && matches!(self.store, Store::Redis(_))
            && self.running.lock().expect("jobs lock poisoned").len() >= MAX_RUNNING
        {
            // Another replica takes it over (a repeat of its request_id finds it meanwhile).
            tracing::info!(job_id = %status.job_id, "this replica runs {MAX_RUNNING} bulk checks: another takes this one");
            return Ok(status);
        }
        if created {
            if matches!(self.store, Store::Local(_)) {
                tracing::info!(job_id = %status.job_id, total = status.total,
                    "bulk check started; without Redis it lives in this process only");
            } else {
                tracing::info!(job_id = %status.job_id, total = status.total, "bulk check started");
            }
            let resumable = match &self.store {
                Store::Local(_) => Some(Resumable {
                    spec,
                    sent: HashMap::new(),
                    done: Default::default(),
                    cancelled: false,
                }),
                // The first lease, as a takeover takes it. Listed as running already: if this fails, another
                // replica takes it over (a repeat of its request_id finds it meanwhile).
                Store::Redis(log) => match Self::redis(log).claim(&status.job_id, &self.owner, LEASE).await {
                    Ok(resumable) => resumable,
                    Err(e) => {
                        tracing::warn!(job_id = %status.job_id, error = %e, "a bulk check's first lease could not be taken: another replica takes it over");
                        None
                    }
                },
            };
            if let Some(resumable) = resumable {
                self.launch(status.job_id.clone(), resumable);
            }
        }
        Ok(status)
    }

    pub async fn status(&self, job_id: &str) -> Result<JobStatus, JobError> {
        let status = match &self.store {
            Store::Local(local) => local.status(job_id),
            Store::Redis(log) => Self::redis(log).status(job_id).await.map_err(unavailable)?,
        };
        status.ok_or_else(|| JobError::NotFound(job_id.to_owned()))
    }

    /// Stops a job's new queries; an ended job is returned unchanged.
    pub async fn cancel(&self, job_id: &str) -> Result<JobStatus, JobError> {
        let status = match &self.store {
            Store::Local(local) => local.cancel(job_id, wall_clock_ms()),
            Store::Redis(log) => Self::redis(log)
                .cancel(job_id, wall_clock_ms())
                .await
                .map_err(unavailable)?,
        };
        if let Some(token) = self.running.lock().expect("jobs lock poisoned").get(job_id) {
            token.cancel();
        }
        status.ok_or_else(|| JobError::NotFound(job_id.to_owned()))
    }

    /// The results past `after`, at most `max`.
    pub async fn results_after(&self, job_id: &str, after: u64, max: usize) -> Result<Vec<JobResult>, JobError> {
        match &self.store {
            Store::Local(local) => Ok(local.results_after(job_id, after, max)),
            Store::Redis(log) => Self::redis(log)
                .results_after(job_id, after, max)
                .await
                .map_err(unavailable),
        }
    }

    /// Waits until `job_id` has results past `seen` or has ended, at most `longest`.
    pub async fn changed(&self, job_id: &str, seen: u64, longest: Duration) {
        match &self.store {
            Store::Local(local) => local.changed(job_id, seen, longest).await,
            // Redis is asked again shortly: results come at the callback rate, a few dozen a second.
            Store::Redis(_) => tokio::time::sleep(longest.min(Duration::from_millis(100))).await,
        }
    }

    /// Starts running a job on this replica.
    fn launch(self: &Arc<Self>, job_id: String, resumable: Resumable) {
        let token = CancellationToken::new();
        if resumable.cancelled {
            token.cancel();
        }
        self.running
            .lock()
            .expect("jobs lock poisoned")
            .insert(job_id.clone(), token.clone());
        metrics::gauge!("capability_bulk_jobs_running").increment(1.0);
        let jobs = self.clone();
        let request_id = resumable.spec.request_id.clone();
        self.tasks.spawn(async move {
            let request_id = request_id.as_deref();
            let keeper = jobs.keep_lease(&job_id, request_id, &token);
            let run = jobs.run(&job_id, resumable, &token);
            tokio::pin!(run);
            tokio::select! {
                ended = &mut run => match ended {
                    Some(state) => jobs.finish(&job_id, request_id, state).await,
                    None => jobs.leave(&job_id).await,
                },
                () = keeper => {
                    // Taken over (running or cancelled), the new runner waits for the recipients already sent.
                    tracing::warn!(job_id = %job_id, "the lease of a bulk check was lost: another replica runs it");
                }
                () = jobs.stop.cancelled() => jobs.leave(&job_id).await,
            }
            jobs.running.lock().expect("jobs lock poisoned").remove(&job_id);
            metrics::gauge!("capability_bulk_jobs_running").decrement(1.0);
        });
    }

    /// With Redis, renews the job's lease until it is lost (returns) or the job ends (never returns).
    async fn keep_lease(&self, job_id: &str, request_id: Option<&str>, token: &CancellationToken) {
        let Store::Redis(log) = &self.store else {
            return std::future::pending().await;
        };
        loop {
            tokio::time::sleep(LEASE_RENEWAL).await;
            match Self::redis(log)
                .renew(job_id, &self.owner, LEASE, self.retention, request_id)
                .await
            {
                Ok(Some(JobState::Cancelled)) => token.cancel(),
                Ok(Some(_)) => {}
                Ok(None) => return,
                Err(e) => tracing::debug!(error = %e, "the lease of a bulk check could not be renewed"),
            }
        }
    }

    /// This replica stops: with Redis, the job is left running for another replica to take over at once; in
    /// process, it ends with the process.
    async fn leave(&self, job_id: &str) {
        match &self.store {
            Store::Local(_) => {
                tracing::warn!(job_id = %job_id, "a bulk check held in this process stops with it (no Redis)");
            }
            Store::Redis(log) => {
                if let Err(e) = Self::redis(log).release(job_id, &self.owner).await {
                    tracing::debug!(job_id = %job_id, error = %e, "a bulk check's lease could not be given back; it lapses");
                }
                tracing::info!(job_id = %job_id, "a bulk check is left to another replica");
            }
        }
    }

    async fn finish(&self, job_id: &str, request_id: Option<&str>, state: JobState) {
        let now = wall_clock_ms();
        // Counted in the state it ended in (a cancel meanwhile keeps CANCELLED), once: by the one run that ends it.
        let result = match &self.store {
            Store::Local(local) => Ok(Some(local.finish(job_id, state, now, JobState::count_ended))),
            Store::Redis(log) => {
                let finished = Self::redis(log)
                    .finish(job_id, &self.owner, state, now, self.retention, request_id)
                    .await;
                if let Ok(Some(ended)) = finished {
                    ended.count_ended();
                }
                finished
            }
        };
        match result {
            Ok(Some(ended)) => tracing::info!(job_id = %job_id, state = ended.as_str(), "bulk check ended"),
            Ok(None) => tracing::warn!(job_id = %job_id,
                "a bulk check is left running for another replica: recipients are missing, or this replica lost it"),
            Err(e) => tracing::warn!(job_id = %job_id, error = %e, "the end of a bulk check could not be recorded"),
        }
    }

    /// Checks every recipient not answered yet; returns the state the job ends in, or `None` when it is left to
    /// another replica because this one shuts down.
    async fn run(self: &Arc<Self>, job_id: &str, resumable: Resumable, token: &CancellationToken) -> Option<JobState> {
        let Resumable { spec, sent, done, .. } = resumable;
        // Identical recipients are asked once: each group answers all its indexes.
        let mut groups: Vec<Vec<u32>> = Vec::new();
        let mut by_recipient: HashMap<String, usize> = HashMap::new();
        for (index, recipient) in spec.recipients.iter().enumerate() {
            let index = index as u32;
            if done.contains(&index) {
                continue;
            }
            match by_recipient.entry(recipient_key(recipient)) {
                std::collections::hash_map::Entry::Occupied(at) => groups[*at.get()].push(index),
                std::collections::hash_map::Entry::Vacant(slot) => {
                    slot.insert(groups.len());
                    groups.push(vec![index]);
                }
            }
        }
        let spec = Arc::new(spec);
        let sent = Arc::new(sent);
        let failed = AtomicBool::new(false);
        // Ends every recipient's wait for its turn: the job is cancelled, failed, or left.
        let halt = token.child_token();
        let leaving = AtomicBool::new(false);
        // Enough checks in flight to keep the budget busy while each waits for its callbacks.
        let concurrency = (self.pacer.limit() as usize * (spec.wait.as_secs() as usize + 2)).clamp(64, 10_000);
        futures::stream::iter(groups)
            .for_each_concurrent(concurrency, |group| {
                let (spec, sent, failed, halt, leaving) = (spec.clone(), sent.clone(), &failed, &halt, &leaving);
                async move {
                    // Cancelled, failed or left, no recipient's turn comes; one sent before (by the replica that ran
                    // the job until it was taken over) is still waited for, as long as this replica may wait (its
                    // drain ends the wait, and the job is left to another).
                    if halt.is_cancelled() && !sent.contains_key(&group[0]) {
                        return;
                    }
                    match self.check_one(job_id, &spec, &group, sent.get(&group[0]), halt).await {
                        Ok(()) | Err(CheckError::Cancelled) => {}
                        Err(CheckError::ShuttingDown) => {
                            // Not answered here: the replica that takes the job over waits for it.
                            leaving.store(true, Ordering::Relaxed);
                            halt.cancel();
                        }
                        Err(e) if job_wide(&e) => {
                            tracing::warn!(job_id = %job_id, error = %e, "a bulk check stops: Sinch refused the app's queries");
                            failed.store(true, Ordering::Relaxed);
                            halt.cancel();
                        }
                        Err(e) => {
                            // Sent or not, it is never sent again: answered with every identity pending.
                            tracing::warn!(job_id = %job_id, error = %e, "a recipient of a bulk check could not be checked");
                            let answer = CheckAnswer {
                                pending: match &spec.recipients[group[0] as usize] {
                                    Recipient::IdentifiedBy(ids) => ids.clone(),
                                    Recipient::ContactId(_) => Vec::new(),
                                },
                                ..CheckAnswer::default()
                            };
                            if let Err(e) = self.record(job_id, &group, &answer).await {
                                tracing::warn!(job_id = %job_id, error = %e, "a bulk check's answer could not be recorded");
                            }
                        }
                    }
                }
            })
            .await;
        if leaving.load(Ordering::Relaxed) {
            return None;
        }
        Some(if failed.load(Ordering::Relaxed) {
            JobState::Failed
        } else if token.is_cancelled() {
            JobState::Cancelled
        } else {
            JobState::Succeeded
        })
    }

    /// Checks the recipient of `group` (its indexes share one recipient) and records its answer for each.
    async fn check_one(
        &self,
        job_id: &str,
        spec: &JobSpec,
        group: &[u32],
        sent: Option<&(String, u64)>,
        token: &CancellationToken,
    ) -> Result<(), CheckError> {
        let index = group[0];
        let mut again = ASKED_AGAIN_AFTER.iter();
        // Asked again under the request_id Sinch refused, as the client's own retries are: had Sinch registered it
        // after all, it does not count a second request.
        let mut refused_as: Option<String> = None;
        let answer = loop {
            let now = wall_clock_ms();
            // A recipient sent before a takeover waits what is left of its wait, and is never sent again.
            let (wait, request_id) = match sent {
                Some((request_id, at)) => {
                    let waited = Duration::from_millis(now.saturating_sub(*at));
                    (spec.wait.saturating_sub(waited), Some(request_id.clone()))
                }
                None => (spec.wait, refused_as.clone()),
            };
            let request = CheckRequest {
                app_id: spec.app_id.clone(),
                recipient: spec.recipients[index as usize].clone(),
                max_age: spec.max_age,
                wait,
                preference: spec.preference.clone(),
                request_id,
            };
            let gate = JobGate {
                jobs: self,
                job_id,
                index,
                resumed: sent.map(|(request_id, _)| request_id.as_str()),
                token,
                marked: Mutex::new(None),
            };
            let deadline = Instant::now() + wait + crate::query::MAX_DEADLINE.min(SEND_DEADLINE);
            let error = match self.checker.check_gated(request, deadline, None, Some(&gate)).await {
                Ok(answer) => break answer,
                Err(e) => e,
            };
            // Refused by Sinch (it answered an error, or this replica's limit held it): not registered there, so
            // it may be sent again, a while later.
            let (Some(refused), Some(after)) = (refused_for_now(&error), again.next()) else {
                return Err(error);
            };
            let marked = gate.marked.lock().expect("marked lock poisoned").take();
            if let Some(request_id) = marked {
                self.unmark_sent(job_id, index, &request_id).await?;
                refused_as = Some(request_id);
            }
            tracing::info!(job_id = %job_id, index, error = %error, "Sinch refused a bulk check's query for now: asked again later");
            tokio::select! {
                () = tokio::time::sleep(refused.max(*after)) => {}
                () = token.cancelled() => return Err(CheckError::Cancelled),
            }
        };
        self.record(job_id, group, &answer).await
    }

    /// Forgets that `index` was sent under `request_id`: Sinch refused it.
    async fn unmark_sent(&self, job_id: &str, index: u32, request_id: &str) -> Result<(), CheckError> {
        match &self.store {
            Store::Local(local) => {
                local.unmark_sent(job_id, index);
                Ok(())
            }
            Store::Redis(log) => Self::redis(log)
                .unmark_sent(job_id, &self.owner, index, request_id)
                .await
                .map_err(|e| CheckError::Unavailable(e.to_string())),
        }
    }

    /// Records `answer` for every index of `group` not answered yet (another runner of the job may have answered
    /// it: one whose lease lapsed, until it sees that); only those count as done.
    async fn record(&self, job_id: &str, group: &[u32], answer: &CheckAnswer) -> Result<(), CheckError> {
        let from_cache = !answer.results.is_empty()
            && answer.pending.is_empty()
            && answer.results.iter().all(|r| r.source == Source::Cache);
        let reachable = !answer.recommended.is_empty();
        let recorded = match &self.store {
            Store::Local(local) => Ok(local.record(job_id, group, answer, from_cache, reachable, wall_clock_ms())),
            Store::Redis(log) => Self::redis(log)
                .record(
                    job_id,
                    group,
                    &stored::encode_answer(answer),
                    from_cache,
                    reachable,
                    wall_clock_ms(),
                )
                .await
                .map_err(|e| CheckError::Unavailable(e.to_string())),
        }?;
        metrics::counter!("capability_bulk_recipients_done_total").increment(recorded);
        Ok(())
    }

    /// Looks for jobs nobody runs (their replica died) and takes them over, until stopped.
    pub async fn take_over(self: Arc<Self>, stop: CancellationToken) {
        let Store::Redis(log) = &self.store else { return };
        let redis = Self::redis(log);
        loop {
            tokio::select! {
                () = tokio::time::sleep(LEASE_RENEWAL) => {}
                () = stop.cancelled() => return,
            }
            let running = match redis.running().await {
                Ok(running) => running,
                Err(e) => {
                    tracing::debug!(error = %e, "could not list the running bulk checks");
                    continue;
                }
            };
            for job_id in running {
                if stop.is_cancelled() || self.running.lock().expect("jobs lock poisoned").len() >= MAX_RUNNING {
                    break;
                }
                if self.running.lock().expect("jobs lock poisoned").contains_key(&job_id) {
                    continue;
                }
                match redis.claim(&job_id, &self.owner, LEASE).await {
                    Ok(Some(resumable)) => {
                        tracing::info!(job_id = %job_id, sent = resumable.sent.len(), done = resumable.done.len(),
                            "taking over a bulk check whose replica stopped renewing it");
                        metrics::counter!("capability_bulk_takeovers_total").increment(1);
                        self.launch(job_id, resumable);
                    }
                    Ok(None) => {}
                    Err(e) => tracing::warn!(job_id = %job_id, error = %e, "a bulk check could not be taken over"),
                }
            }
        }
    }

    /// The tasks running jobs: awaited at shutdown.
    pub fn tasks(&self) -> &TaskTracker {
        &self.tasks
    }
}

/// Whether an error stops the whole job: Sinch refused the app, the project, the credentials or the billing —
/// every other recipient would be refused the same.
fn job_wide(error: &CheckError) -> bool {
    use crate::{query::QueryError, upstream::Error};
    match error {
        CheckError::Query(QueryError::Upstream(e)) => match e {
            Error::Credentials(_) | Error::Billing(_) => true,
            Error::Api(api) => api.http_status == 404,
            _ => false,
        },
        _ => false,
    }
}

/// Whether Sinch refused a query for now (an error status worth retrying, after the client's own retries, or
/// this replica's rate limit), so that it was not registered there; the wait it asked for, if any.
fn refused_for_now(error: &CheckError) -> Option<Duration> {
    use crate::{query::QueryError, upstream::Error};
    match error {
        CheckError::Query(QueryError::Upstream(e)) => match e {
            Error::RateLimited { retry_after } => Some(*retry_after),
            Error::Api(_) if e.is_retryable() => Some(e.retry_after().unwrap_or_default()),
            _ => None,
        },
        _ => None,
    }
}

/// What identifies a recipient within a job.
fn recipient_key(recipient: &Recipient) -> String {
    match recipient {
        Recipient::ContactId(contact) => format!("c\u{0}{contact}"),
        Recipient::IdentifiedBy(ids) => {
            let mut parts: Vec<String> = ids
                .iter()
                .map(|id| format!("{}\u{0}{}\u{0}{}", id.channel, id.identity, id.app_id))
                .collect();
            parts.sort();
            parts.dedup();
            format!("i\u{0}{}", parts.join("\u{1}"))
        }
    }
}

/// A job's gate before each live query: the callback budget, then the record that the recipient was sent.
struct JobGate<'a> {
    jobs: &'a Jobs,
    job_id: &'a str,
    index: u32,
    /// Sent before a takeover, under this request_id: never again.
    resumed: Option<&'a str>,
    token: &'a CancellationToken,
    /// The request_id recorded as sent by this attempt.
    marked: Mutex<Option<String>>,
}

impl Gate for JobGate<'_> {
    fn turn(&self, identities: u32) -> BoxFuture<'_, Result<Proceed, CheckError>> {
        async move {
            if let Some(request_id) = self.resumed {
                return Ok(Proceed::Sent(request_id.into()));
            }
            tokio::select! {
                biased;
                () = self.jobs.draining.cancelled() => Err(CheckError::ShuttingDown),
                () = self.jobs.pacer.admit(identities) => Ok(Proceed::Send),
                () = self.token.cancelled() => Err(CheckError::Cancelled),
            }
        }
        .boxed()
    }

    fn sending<'a>(&'a self, request_id: &'a str) -> BoxFuture<'a, Result<Proceed, CheckError>> {
        async move {
            let marked = match &self.jobs.store {
                Store::Local(local) => match local.mark_sent(self.job_id, self.index) {
                    true => Marked::Marked,
                    false => Marked::Stopped,
                },
                Store::Redis(log) => Jobs::redis(log)
                    .mark_sent(self.job_id, &self.jobs.owner, self.index, request_id, wall_clock_ms())
                    .await
                    .map_err(|e| CheckError::Unavailable(e.to_string()))?,
            };
            match marked {
                Marked::Marked => *self.marked.lock().expect("marked lock poisoned") = Some(request_id.to_owned()),
                Marked::SentBefore(request_id) => return Ok(Proceed::Sent(request_id.into())),
                Marked::Stopped => return Err(CheckError::Cancelled),
            }
            metrics::counter!("capability_bulk_queries_sent_total").increment(1);
            tracing::debug!(job_id = %self.job_id, index = self.index, request_id = %mask_digits(request_id), "bulk query sent");
            Ok(Proceed::Send)
        }
        .boxed()
    }
}
