//! QueryCapability's behaviour apart from transport: the request_id is decided before anything is sent, a
//! caller-chosen request_id makes the call idempotent for a window, and the query is forwarded to Sinch.

use std::{
    collections::{HashMap, VecDeque},
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::{sync::OnceCell, time::Instant};

use crate::{
    backplane::{Backplane, IdempotencyClaim},
    capability::{Query, QueryAccepted, Recipient},
    hub::Hub,
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
    #[error(
        "request_id {request_id:?} was already used for a different query within the idempotency window; \
         use a new request_id for a new query"
    )]
    Conflict { request_id: String },
}

/// Forwards queries; shared by every call.
pub struct Queries {
    upstream: SinchClient,
    /// Concurrent repeats within this replica wait for one answer.
    idempotency: Idempotency,
    /// Told of each query before it is sent, so that callbacks racing the answer find its expected channels.
    hub: Arc<Hub>,
    /// Shares query records and request_ids with the other replicas.
    backplane: Arc<Backplane>,
}

/// The longest pause between two looks at a request_id another replica is sending.
const PENDING_POLL_MAX: Duration = Duration::from_millis(200);

impl Queries {
    pub fn new(
        upstream: SinchClient,
        idempotency_window: Duration,
        hub: Arc<Hub>,
        backplane: Arc<Backplane>,
    ) -> Queries {
        Queries {
            upstream,
            idempotency: Idempotency::new(idempotency_window),
            hub,
            backplane,
        }
    }

    async fn forward(
        &self,
        query: &Query,
        deadline: Instant,
        trace: Option<&TraceParent>,
    ) -> Result<QueryAccepted, upstream::Error> {
        let expected = query.expected_channels();
        self.backplane
            .record_query(&query.request_id, expected.as_deref())
            .await;
        self.hub.record_query(&query.request_id, expected);
        let traceparent = telemetry::outgoing_traceparent(trace);
        self.upstream.query(query, deadline, traceparent.as_deref()).await
    }

    /// Sends a query with a caller-chosen request_id unless another replica did or is doing so.
    async fn forward_once(
        &self,
        query: &Query,
        deadline: Instant,
        trace: Option<&TraceParent>,
    ) -> Result<QueryAccepted, QueryError> {
        let fingerprint = serde_json::to_string(&QueryJson::from(query)).expect("query JSON always serialises");
        let mut pause = Duration::from_millis(10);
        loop {
            match self.backplane.claim_request_id(&query.request_id, &fingerprint).await {
                IdempotencyClaim::Owner => {
                    let result = self.forward(query, deadline, trace).await;
                    self.backplane
                        .settle_request_id(&query.request_id, &fingerprint, result.as_ref().ok())
                        .await;
                    return Ok(result?);
                }
                IdempotencyClaim::Answered(answer) => return Ok(answer),
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
    pub async fn query(
        &self,
        request: QueryRequest,
        deadline: Instant,
        trace: Option<&TraceParent>,
    ) -> Result<QueryAccepted, QueryError> {
        let Some(request_id) = request.request_id else {
            let query = Query {
                app_id: request.app_id,
                recipient: request.recipient,
                request_id: ulid::Ulid::new().to_string(),
            };
            return Ok(self.forward(&query, deadline, trace).await?);
        };
        let query = Query {
            app_id: request.app_id,
            recipient: request.recipient,
            request_id,
        };
        let entry = self.idempotency.claim(&query)?;
        let answer = entry
            .answer
            .get_or_try_init(|| self.forward_once(&query, deadline, trace))
            .await?;
        Ok(answer.clone())
    }
}

/// Remembers caller-chosen request_ids for a window.
struct Idempotency {
    window: Duration,
    state: Mutex<IdempotencyState>,
}

struct IdempotencyState {
    entries: HashMap<String, Arc<Entry>>,
    /// Entries in the order they expire (all live for the same window).
    expiry: VecDeque<(Instant, String, Arc<Entry>)>,
}

struct Entry {
    /// The query first sent under this request_id.
    query: Query,
    /// Set once Sinch accepted it; concurrent repeats wait on it. A failed attempt leaves it empty, so that the
    /// next repeat tries again.
    answer: OnceCell<QueryAccepted>,
}

impl Idempotency {
    fn new(window: Duration) -> Idempotency {
        Idempotency {
            window,
            state: Mutex::new(IdempotencyState {
                entries: HashMap::new(),
                expiry: VecDeque::new(),
            }),
        }
    }

    /// The entry of `query.request_id`, created if new; a conflict if it was used for another question.
    fn claim(&self, query: &Query) -> Result<Arc<Entry>, QueryError> {
        let now = Instant::now();
        let mut state = self.state.lock().expect("idempotency lock poisoned");
        while let Some((expires, _, _)) = state.expiry.front()
            && *expires <= now
        {
            let (_, id, entry) = state.expiry.pop_front().expect("front exists");
            if state.entries.get(&id).is_some_and(|e| Arc::ptr_eq(e, &entry)) {
                state.entries.remove(&id);
            }
        }
        if let Some(entry) = state.entries.get(&query.request_id) {
            return if entry.query.same_question(query) {
                Ok(entry.clone())
            } else {
                Err(QueryError::Conflict {
                    request_id: query.request_id.clone(),
                })
            };
        }
        let entry = Arc::new(Entry {
            query: query.clone(),
            answer: OnceCell::new(),
        });
        state.entries.insert(query.request_id.clone(), entry.clone());
        state
            .expiry
            .push_back((now + self.window, query.request_id.clone(), entry.clone()));
        Ok(entry)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn query(id: &str, contact: &str) -> Query {
        Query {
            app_id: "app".into(),
            recipient: Recipient::ContactId(contact.into()),
            request_id: id.into(),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_id_is_remembered_for_the_window_then_forgotten() {
        let ids = Idempotency::new(Duration::from_secs(3600));
        let first = ids.claim(&query("r1", "c1")).unwrap();
        assert!(Arc::ptr_eq(&first, &ids.claim(&query("r1", "c1")).unwrap()));
        assert!(matches!(
            ids.claim(&query("r1", "c2")),
            Err(QueryError::Conflict { .. })
        ));
        tokio::time::advance(Duration::from_secs(3601)).await;
        let again = ids.claim(&query("r1", "c2")).unwrap();
        assert!(!Arc::ptr_eq(&first, &again));
        assert_eq!(ids.state.lock().unwrap().entries.len(), 1);
    }
}
