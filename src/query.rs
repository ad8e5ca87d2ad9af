//! QueryCapability's behaviour apart from transport: the request_id is decided before anything is sent, a
//! caller-chosen request_id makes the call idempotent for a window, the query's record is appended to the event
//! log, and the query is forwarded to Sinch.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::Duration,
};

use tokio::{
    sync::{OnceCell, OwnedSemaphorePermit},
    time::Instant,
};
use tokio_util::task::TaskTracker;

use crate::{
    capability::{Query, QueryAccepted, Recipient, mask_digits},
    check::bulk::pacer::Pacer,
    log::{EventLog, IdempotencyClaim, QueryRecorded},
    telemetry::{self, TraceParent},
    upstream::{self, SinchClient, wire::QueryJson},
};

/// A validated query as the caller asked it; `request_id` is `None` when the caller left it to us.
#[derive(Debug, Clone)]
pub struct QueryRequest {
    pub app_id: String,
    pub recipient: Recipient,
    pub request_id: Option<String>,
}

/// Why QueryCapability failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum QueryError {
    #[error(transparent)]
    Upstream(#[from] upstream::Error),
    /// The request_id was used within the idempotency window for a different request.
    /// The request_id shows with its digits masked: the error is logged, and a caller's id may carry a number.
    #[error(
        "request_id {:?} was already used for a different query within the idempotency window; \
         use a new request_id for a new query",
        mask_digits(.request_id)
    )]
    Conflict { request_id: String },
}

/// Forwards queries; shared by every call.
pub struct Queries {
    upstream: Arc<SinchClient>,
    /// Concurrent repeats within this replica wait for one answer.
    idempotency: Idempotency,
    /// Takes each query's record before it is sent, so that callbacks racing the answer find its expected
    /// channels; shares request_ids with the other replicas.
    log: Arc<EventLog>,
    /// Counts what QueryCapability sends in the app's callback budget, before any bulk check's.
    pacer: Arc<Pacer>,
    /// The tasks sending queries (not the repeats waiting for them), which may outlive their callers: the drain
    /// waits for them.
    sends: TaskTracker,
}

/// The longest deadline a QueryCapability gets, whatever the caller asks for (the longest
/// `CAPABILITY_QUERY_TIMEOUT` too).
pub const MAX_DEADLINE: Duration = Duration::from_secs(600);

/// The longest a query (a check's live query too) runs, with a margin: what it may still read back is kept this
/// long.
pub const LONGEST_CHECK: Duration = MAX_DEADLINE.saturating_add(Duration::from_secs(30));

/// How long a query sent under a caller-chosen request_id may wait for Sinch's answer past its caller's deadline:
/// the caller is told DEADLINE_EXCEEDED at the deadline, and its retry gets the answer rather than ask Sinch again
/// (a second query to Sinch, whose callbacks the app's budget pays for again). Within [`LONGEST_CHECK`]'s margin.
const LATE_ANSWER: Duration = Duration::from_secs(10);

/// The longest pause between two looks at a request_id another replica is sending.
const PENDING_POLL_MAX: Duration = Duration::from_millis(200);

impl Queries {
    /// `idempotency_window` and `max_entries` bound what this replica remembers of caller-chosen request_ids.
    pub fn new(
        upstream: Arc<SinchClient>,
        idempotency_window: Duration,
        max_entries: u64,
        log: Arc<EventLog>,
        pacer: Arc<Pacer>,
    ) -> Queries {
        Queries {
            upstream,
            idempotency: Idempotency::new(idempotency_window, max_entries),
            log,
            pacer,
            sends: TaskTracker::new(),
        }
    }

    /// The tasks sending queries (an attempt waits for Sinch's answer up to [`LATE_ANSWER`] past its caller's
    /// deadline): at shutdown, the drain waits for them, so that their request_ids' claims are settled.
    pub fn sends(&self) -> &TaskTracker {
        &self.sends
    }

    /// Sends `query` (see [`SinchClient::query`] for `deadline` and `answer_by`) with its record.
    async fn forward(
        &self,
        query: &Query,
        deadline: Instant,
        answer_by: Instant,
        trace: Option<&TraceParent>,
    ) -> Result<QueryAccepted, upstream::Error> {
        let record = QueryRecorded {
            request_id: query.request_id.clone(),
            expected: query.expected_channels(),
            asked_ms: 0,
            late: false,
        };
        if let Err(e) = self.log.record_query(record).await {
            tracing::warn!(request_id = %mask_digits(&query.request_id), error = %e, "the query's record could not be logged: \
                until it is, its watches do not know its expected channels");
        }
        let traceparent = telemetry::outgoing_traceparent(trace);
        let accepted = self
            .upstream
            .query(query, deadline, answer_by, traceparent.as_deref())
            .await?;
        if accepted.request_id != query.request_id {
            // Sinch's callbacks will carry its request_id: the caller gets it, and the record follows it.
            tracing::warn!(sent = %mask_digits(&query.request_id), answered = %mask_digits(&accepted.request_id),
                "Sinch answered with another request_id than the one sent; returning Sinch's");
            let record = QueryRecorded {
                request_id: accepted.request_id.clone(),
                expected: query.expected_channels(),
                asked_ms: 0,
                late: false,
            };
            if let Err(e) = self.log.record_query(record).await {
                tracing::warn!(request_id = %mask_digits(&accepted.request_id), error = %e, "the query's record could not be logged \
                    under Sinch's request_id: until it is, its watches do not know its expected channels");
            }
        }
        Ok(accepted)
    }

    /// Sends `sent` (the part of `query` to ask Sinch about) with a caller-chosen request_id unless another
    /// replica did or is doing so for the same `query`.
    async fn forward_once(
        &self,
        query: &Query,
        sent: &Query,
        deadline: Instant,
        trace: Option<&TraceParent>,
    ) -> Result<(QueryAccepted, bool), QueryError> {
        let fingerprint = recorded_json(query);
        let mut pause = Duration::from_millis(10);
        loop {
            match self.log.claim_request_id(&query.request_id, &fingerprint).await {
                IdempotencyClaim::Owner(claim) => {
                    let result = tokio::select! {
                        result = self.forward(sent, deadline, deadline + LATE_ANSWER, trace) => result,
                        never = self.log.hold_request_id(&query.request_id, &fingerprint, &claim) => match never {},
                    };
                    let answer = result.as_ref().ok().map(recorded_json);
                    self.log
                        .settle_request_id(&query.request_id, &fingerprint, &claim, answer.as_deref())
                        .await;
                    return Ok((result?, true));
                }
                IdempotencyClaim::Answered(answer) => match serde_json::from_str::<QueryJson>(&answer) {
                    Ok(answer) => return Ok((answer.into(), false)),
                    Err(e) => {
                        // serde's message may quote the record's values: only where it broke is logged.
                        tracing::warn!(request_id = %mask_digits(&query.request_id), category = ?e.classify(),
                            line = e.line(), column = e.column(), "an unreadable idempotency record in Redis: sending the query");
                        return Ok((self.forward(sent, deadline, deadline, trace).await?, true));
                    }
                },
                IdempotencyClaim::Conflict => {
                    return Err(QueryError::Conflict {
                        request_id: query.request_id.clone(),
                    });
                }
                IdempotencyClaim::Pending => {
                    if Instant::now() + pause >= deadline {
                        return Err(upstream::Error::DeadlineExceeded.into());
                    }
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(PENDING_POLL_MAX);
                }
            }
        }
    }

    /// Sends the query to Sinch unless the same request_id already did (or is doing) so. `trace` is the caller's
    /// trace context, continued on the call to Sinch.
    ///
    /// `in_flight` (the caller's place among the queries in flight) is held until the query is sent (an attempt
    /// under a caller-chosen request_id: until Sinch answers it, up to [`LATE_ANSWER`] past the deadline), even when
    /// the caller goes away first: the sending goes on, and still counts.
    pub async fn query(
        self: &Arc<Self>,
        request: QueryRequest,
        deadline: Instant,
        trace: Option<&TraceParent>,
        in_flight: OwnedSemaphorePermit,
    ) -> Result<QueryAccepted, QueryError> {
        let send = request.recipient.clone();
        self.pacer.record(send.identities());
        Ok(self
            .query_once(request, send, deadline, trace, Some(Arc::new(in_flight)))
            .await?
            .0)
    }

    /// As [`Queries::query`], but asks Sinch only about `send`, a part of the request's recipient (the rest is
    /// known already); a caller-chosen request_id stands for the whole request, so that a repeat sends nothing
    /// whatever part it would have sent. Also says whether the query was sent now (`false`: the answer of an
    /// earlier call with the same request_id). `place`, the caller's among the calls waiting for Sinch, is kept
    /// as long as the attempt goes on, past the deadline too.
    pub async fn query_part(
        self: &Arc<Self>,
        request: QueryRequest,
        send: Recipient,
        deadline: Instant,
        trace: Option<&TraceParent>,
        place: Option<Arc<OwnedSemaphorePermit>>,
    ) -> Result<(QueryAccepted, bool), QueryError> {
        self.query_once(request, send, deadline, trace, place).await
    }

    /// Sends `send` under the request's request_id (one this service made: nobody repeats it), with the
    /// request's record, without an idempotency record.
    pub async fn send(
        &self,
        request: QueryRequest,
        send: Recipient,
        deadline: Instant,
        trace: Option<&TraceParent>,
    ) -> Result<QueryAccepted, QueryError> {
        self.upstream.admit(deadline).await?;
        let query = Query {
            app_id: request.app_id,
            recipient: send,
            request_id: request.request_id.unwrap_or_else(|| ulid::Ulid::new().to_string()),
        };
        Ok(self.forward(&query, deadline, deadline, trace).await?)
    }

    /// The answer recorded in Redis for `query`'s request_id (by any replica), without claiming it; a conflict if the
    /// request_id was used for another question.
    async fn recorded(&self, query: &Query) -> Result<Option<QueryAccepted>, QueryError> {
        let fingerprint = recorded_json(query);
        match self.log.recorded_request_id(&query.request_id, &fingerprint).await {
            Some(IdempotencyClaim::Conflict) => Err(QueryError::Conflict {
                request_id: query.request_id.clone(),
            }),
            Some(IdempotencyClaim::Answered(answer)) => {
                Ok(serde_json::from_str::<QueryJson>(&answer).ok().map(Into::into))
            }
            _ => Ok(None),
        }
    }

    /// Sends (or finds the answer of) a query; says whether it was sent now. `in_flight`, if any, is held until
    /// the sending ends, whatever becomes of the caller.
    async fn query_once(
        self: &Arc<Self>,
        request: QueryRequest,
        send: Recipient,
        deadline: Instant,
        trace: Option<&TraceParent>,
        in_flight: Option<Arc<OwnedSemaphorePermit>>,
    ) -> Result<(QueryAccepted, bool), QueryError> {
        let Some(request_id) = request.request_id else {
            self.upstream.admit(deadline).await?;
            let query = Query {
                app_id: request.app_id,
                recipient: send,
                request_id: ulid::Ulid::new().to_string(),
            };
            return Ok((self.forward(&query, deadline, deadline, trace).await?, true));
        };
        let sent = Query {
            app_id: request.app_id.clone(),
            recipient: send,
            request_id: request_id.clone(),
        };
        let query = Query {
            app_id: request.app_id,
            recipient: request.recipient,
            request_id,
        };
        // The rate limit first: a caller cannot fill the idempotency records faster than it may query. But a
        // repeat sends nothing: one of a request_id this replica answered, or is asking Sinch about, spends none of
        // the budget (one that takes over from a failed attempt passes the limit then), and one the limit would
        // make wait is given the answer recorded (one read, no claim) at once; or ALREADY_EXISTS.
        let admitted = match self.idempotency.held(&query)? {
            Held::Answered(answer) => return Ok((answer, false)),
            Held::Asking => false,
            Held::Nothing => {
                if !self.upstream.admits_now() {
                    if let Some(answer) = self.recorded(&query).await? {
                        return Ok((answer, false));
                    }
                    self.upstream.admit(deadline).await?;
                }
                true
            }
        };
        let entry = self.idempotency.claim(&query)?;
        // Counted at once, before anything is awaited: a failed attempt ending meanwhile sees this call.
        entry.callers.fetch_add(1, Ordering::SeqCst);
        // In a task of its own: a caller that goes away while its query is being sent does not take the sending
        // (and the claim's settling) with it, so that its retry finds the answer rather than ask Sinch again.
        let (queries, trace) = (self.clone(), trace.cloned());
        let task = tokio::spawn(tracing::Instrument::in_current_span(async move {
            let _in_flight = in_flight;
            let mut sent_now = false;
            let sending = AtomicBool::new(false);
            // A repeat waits for the attempt in progress within its own deadline; the attempt itself ends by its
            // own deadline, or [`LATE_ANSWER`] after it while Sinch answers what was sent, and settles its claim.
            let answer = {
                let answer = entry.answer.get_or_try_init(|| async {
                    // A repeat taking over from a failed attempt passes the rate limit it skipped.
                    if !admitted {
                        queries.upstream.admit(deadline).await?;
                    }
                    // Once the drain waits for the sends, none starts (a repeat whose caller went away, taking
                    // over from a failed attempt): nothing would wait for it.
                    if queries.sends.is_closed() {
                        return Err(upstream::Error::Connect("not sent: this replica is shutting down".into()).into());
                    }
                    sending.store(true, Ordering::Relaxed);
                    // Tracked, unlike the repeats' waiting: the drain waits for a query being sent.
                    let send = {
                        let (sender, query, sent, trace) =
                            (queries.clone(), query.clone(), sent.clone(), trace.clone());
                        let send = async move { sender.forward_once(&query, &sent, deadline, trace.as_ref()).await };
                        queries.sends.spawn(tracing::Instrument::in_current_span(send))
                    };
                    let (answer, sent) = send.await.unwrap_or_else(|e| Err(upstream::Error::from(e).into()))?;
                    sent_now = sent;
                    Ok::<_, QueryError>(answer)
                });
                tokio::pin!(answer);
                tokio::select! {
                    // An answer ready at the deadline is taken (by a repeat waiting on it; the caller is told
                    // DEADLINE_EXCEEDED at its deadline whatever the task does then).
                    biased;
                    answer = &mut answer => answer,
                    () = tokio::time::sleep_until(deadline) => if sending.load(Ordering::Relaxed) {
                        answer.await
                    } else {
                        Err(upstream::Error::DeadlineExceeded.into())
                    },
                }
            };
            let others = entry.callers.fetch_sub(1, Ordering::SeqCst) - 1;
            match answer {
                Ok(answer) => Ok((answer.clone(), sent_now)),
                Err(e) => {
                    // Released only when no repeat waits on it (one that does tries again itself, and its answer
                    // must stay the request_id's), and not when another attempt answered it meanwhile.
                    if others == 0 && !entry.answer.initialized() {
                        queries.idempotency.release(&entry);
                    }
                    Err(e)
                }
            }
        }));
        // The caller is answered at its deadline; an attempt still waiting for Sinch goes on in the task.
        match tokio::time::timeout_at(deadline, task).await {
            Ok(joined) => joined.unwrap_or_else(|e| Err(upstream::Error::from(e).into())),
            Err(_) => Err(upstream::Error::DeadlineExceeded.into()),
        }
    }
}

/// The JSON a query, or Sinch's answer to it, is recorded as for idempotency (in Redis: its fingerprint, its answer).
fn recorded_json<'a, T>(value: &'a T) -> String
where
    QueryJson: From<&'a T>,
{
    serde_json::to_string(&QueryJson::from(value)).expect("query JSON always serialises")
}

/// Remembers caller-chosen request_ids for a window, at most `max_entries` of them (the least recently used go
/// first past that).
struct Idempotency {
    entries: moka::sync::Cache<String, Arc<Entry>>,
}

/// What this process holds for a request_id.
enum Held {
    Nothing,
    /// An attempt is asking Sinch (or failed, and a repeat waiting on it will try again).
    Asking,
    Answered(QueryAccepted),
}

struct Entry {
    /// The query first sent under this request_id.
    query: Query,
    /// Set once Sinch accepted it; concurrent repeats wait on it. A failed attempt leaves it empty, so that a
    /// repeat waiting on it tries again, and releases the request_id (for another question too) when none does.
    answer: OnceCell<QueryAccepted>,
    /// The calls attempting or waiting on it now.
    callers: AtomicUsize,
}

impl Idempotency {
    fn new(window: Duration, max_entries: u64) -> Idempotency {
        Idempotency {
            entries: moka::sync::Cache::builder()
                .max_capacity(max_entries)
                .time_to_live(window)
                .build(),
        }
    }

    /// The entry of `query.request_id`, created if new; a conflict if it was used for another question.
    fn claim(&self, query: &Query) -> Result<Arc<Entry>, QueryError> {
        let entry = self.entries.get_with_by_ref(&query.request_id, || {
            Arc::new(Entry {
                query: query.clone(),
                answer: OnceCell::new(),
                callers: AtomicUsize::new(0),
            })
        });
        if entry.query.same_question(query) {
            Ok(entry)
        } else {
            Err(QueryError::Conflict {
                request_id: query.request_id.clone(),
            })
        }
    }

    /// What this process holds for `query`'s request_id; a conflict if it was used for another question.
    fn held(&self, query: &Query) -> Result<Held, QueryError> {
        match self.entries.get(&query.request_id) {
            Some(entry) if !entry.query.same_question(query) => Err(QueryError::Conflict {
                request_id: query.request_id.clone(),
            }),
            Some(entry) => Ok(entry.answer.get().cloned().map_or(Held::Asking, Held::Answered)),
            None => Ok(Held::Nothing),
        }
    }

    /// Frees `entry`'s request_id after its attempt failed, unless it already names another entry.
    fn release(&self, entry: &Arc<Entry>) {
        let id = &entry.query.request_id;
        if self.entries.get(id).is_some_and(|held| Arc::ptr_eq(&held, entry)) {
            self.entries.invalidate(id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_released_request_id_takes_another_question_and_a_stale_release_frees_nothing() {
        let ids = Idempotency::new(Duration::from_secs(3600), 100);
        let failed = ids.claim(&query("r1", "c1")).unwrap();
        ids.release(&failed);
        let next = ids.claim(&query("r1", "c2")).unwrap();
        ids.release(&failed);
        assert!(Arc::ptr_eq(&next, &ids.claim(&query("r1", "c2")).unwrap()));
    }

    fn query(id: &str, contact: &str) -> Query {
        Query {
            app_id: "app".into(),
            recipient: Recipient::ContactId(contact.into()),
            request_id: id.into(),
        }
    }

    #[test]
    fn a_request_id_is_one_question_until_forgotten() {
        let ids = Idempotency::new(Duration::from_secs(3600), 100);
        let first = ids.claim(&query("r1", "c1")).unwrap();
        assert!(Arc::ptr_eq(&first, &ids.claim(&query("r1", "c1")).unwrap()));
        assert!(matches!(
            ids.claim(&query("r1", "c2")),
            Err(QueryError::Conflict { .. })
        ));
        assert_eq!(ids.entries.policy().time_to_live(), Some(Duration::from_secs(3600)));
    }

    #[test]
    fn the_records_are_bounded_whatever_callers_send() {
        let ids = Idempotency::new(Duration::from_secs(3600), 1_000);
        for i in 0..20_000 {
            ids.claim(&query(&format!("r{i}"), "c")).unwrap();
        }
        ids.entries.run_pending_tasks();
        assert!(ids.entries.entry_count() <= 1_000, "{}", ids.entries.entry_count());
    }
}
