//! Bulk check jobs of a replica without Redis: in this process, gone with it. Ended jobs are kept for the
//! retention; at most [`MAX_HELD`] jobs are held (the oldest ended one goes first).

use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::sync::Notify;

use super::{JobError, JobResult, JobSpec, JobState, JobStatus};
use crate::check::CheckAnswer;

/// The most jobs held at once, running or ended.
pub const MAX_HELD: usize = 64;

struct Job {
    fingerprint: String,
    request_id: Option<String>,
    status: JobStatus,
    /// Recipients whose query went out.
    sent: HashSet<u32>,
    /// Recipients with their answer.
    done: HashSet<u32>,
    results: Vec<JobResult>,
    changed: Arc<Notify>,
}

/// See the module documentation.
pub struct LocalJobs {
    jobs: Mutex<HashMap<String, Job>>,
    retention: Duration,
}

impl LocalJobs {
    pub fn new(retention: Duration) -> LocalJobs {
        LocalJobs {
            jobs: Mutex::new(HashMap::new()),
            retention,
        }
    }

    /// Creates the job, or returns the one `spec.request_id` created (`false`: nothing new to run). A new job
    /// that cannot run here (`room` says why) is refused before an ended one is pushed out for it.
    pub fn create(
        &self,
        job_id: &str,
        spec: &JobSpec,
        fingerprint: &str,
        now_ms: u64,
        room: Result<(), JobError>,
    ) -> Result<(JobStatus, bool), JobError> {
        let mut jobs = self.jobs.lock().expect("jobs lock poisoned");
        let retention_ms = self.retention.as_millis() as u64;
        jobs.retain(|_, job| !job.status.state.ended() || job.status.update_ms + retention_ms > now_ms);
        if let Some(request_id) = &spec.request_id
            && let Some(job) = jobs.values().find(|j| j.request_id.as_ref() == Some(request_id))
        {
            if job.fingerprint != fingerprint {
                return Err(JobError::Conflict(request_id.clone()));
            }
            return Ok((job.status.clone(), false));
        }
        room?;
        if jobs.len() >= MAX_HELD {
            let oldest = jobs
                .iter()
                .filter(|(_, j)| j.status.state.ended())
                .min_by_key(|(_, j)| j.status.update_ms)
                .map(|(id, _)| id.clone());
            match oldest {
                Some(id) => jobs.remove(&id),
                None => return Err(JobError::TooMany),
            };
        }
        let status = JobStatus {
            job_id: job_id.to_owned(),
            state: JobState::Running,
            total: spec.recipients.len() as u64,
            done: 0,
            from_cache: 0,
            reachable: 0,
            create_ms: now_ms,
            update_ms: now_ms,
            request_id: spec.request_id.clone().unwrap_or_default(),
            settled: false,
        };
        jobs.insert(
            job_id.to_owned(),
            Job {
                fingerprint: fingerprint.to_owned(),
                request_id: spec.request_id.clone(),
                status: status.clone(),
                sent: HashSet::new(),
                done: HashSet::new(),
                results: Vec::new(),
                changed: Arc::new(Notify::new()),
            },
        );
        Ok((status, true))
    }

    pub fn status(&self, job_id: &str) -> Option<JobStatus> {
        let jobs = self.jobs.lock().expect("jobs lock poisoned");
        jobs.get(job_id).map(|j| j.status.clone())
    }

    pub fn cancel(&self, job_id: &str, now_ms: u64) -> Option<JobStatus> {
        self.update(job_id, |job| {
            if job.status.state == JobState::Running {
                job.status.state = JobState::Cancelled;
                job.status.update_ms = now_ms;
            }
        })
    }

    /// Records that `index` was sent; `false` when the job no longer sends (cancelled, ended) or it was sent.
    pub fn mark_sent(&self, job_id: &str, index: u32) -> bool {
        let mut jobs = self.jobs.lock().expect("jobs lock poisoned");
        match jobs.get_mut(job_id) {
            Some(job) if job.status.state == JobState::Running => job.sent.insert(index),
            _ => false,
        }
    }

    /// Forgets that `index` was sent: Sinch refused its query.
    pub fn unmark_sent(&self, job_id: &str, index: u32) {
        if let Some(job) = self.jobs.lock().expect("jobs lock poisoned").get_mut(job_id) {
            job.sent.remove(&index);
        }
    }

    /// Records `answer` for each of `indexes` not answered yet, at the next offsets: how many that was.
    pub fn record(
        &self,
        job_id: &str,
        indexes: &[u32],
        answer: &CheckAnswer,
        from_cache: bool,
        reachable: bool,
        now_ms: u64,
    ) -> u64 {
        let mut recorded = 0;
        self.update(job_id, |job| {
            for &index in indexes {
                if !job.done.insert(index) {
                    continue;
                }
                job.results.push(JobResult {
                    offset: job.results.len() as u64 + 1,
                    index,
                    answer: answer.clone(),
                });
                job.status.done += 1;
                job.status.from_cache += u64::from(from_cache);
                job.status.reachable += u64::from(reachable);
                recorded += 1;
            }
            job.status.update_ms = now_ms;
        });
        recorded
    }

    /// Ends the job: its runner returned, every answer that will come is in.
    /// Ends a job in `state`, unless it was cancelled meanwhile: the state it ended in, which `ended` is told
    /// before anyone watching the job is.
    pub fn finish(&self, job_id: &str, state: JobState, now_ms: u64, ended: impl FnOnce(JobState)) -> JobState {
        self.update(job_id, |job| {
            if job.status.state == JobState::Running {
                job.status.state = state;
            }
            job.status.update_ms = now_ms;
            job.status.settled = true;
            ended(job.status.state);
        })
        .map_or(state, |status| status.state)
    }

    pub fn results_after(&self, job_id: &str, after: u64, max: usize) -> Vec<JobResult> {
        let jobs = self.jobs.lock().expect("jobs lock poisoned");
        jobs.get(job_id)
            .map(|job| {
                let from = (after as usize).min(job.results.len());
                job.results[from..].iter().take(max).cloned().collect()
            })
            .unwrap_or_default()
    }

    /// Waits until `job_id` has results past `seen` or has settled, at most `longest`.
    pub async fn changed(&self, job_id: &str, seen: u64, longest: Duration) {
        let changed = {
            let jobs = self.jobs.lock().expect("jobs lock poisoned");
            jobs.get(job_id).map(|j| j.changed.clone())
        };
        let Some(changed) = changed else { return };
        // Registered before looking, so that a change made after the look still wakes us.
        let notified = changed.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        let moved = {
            let jobs = self.jobs.lock().expect("jobs lock poisoned");
            jobs.get(job_id)
                .is_none_or(|j| j.results.len() as u64 > seen || j.status.settled)
        };
        if !moved {
            let _ = tokio::time::timeout(longest, notified).await;
        }
    }

    fn update(&self, job_id: &str, change: impl FnOnce(&mut Job)) -> Option<JobStatus> {
        let mut jobs = self.jobs.lock().expect("jobs lock poisoned");
        let job = jobs.get_mut(job_id)?;
        change(job);
        job.changed.notify_waiters();
        Some(job.status.clone())
    }
}
