//! Bulk check jobs and the shared callback budget in Redis.
//!
//! Every key of one job shares the hash tag `{prefix:job:<id>}`, so that one script may touch them on a cluster;
//! the running set and the request_ids' records are touched by commands of their own:
//!
//! | key | what |
//! |---|---|
//! | `{…}:meta` | hash: `state`, `total`, `done`, `from_cache`, `reachable`, `create`, `update` (ms), `wait` (a recipient's, ms), `request_id` (the one it was started with, or empty), `settle_by` (a cancelled job's settling time, ms), `settled` (1 once its end is recorded) |
//! | `{…}:spec` | the job's request ([`crate::check::bulk::stored`]) |
//! | `{…}:sent` | hash: recipient index → `<ms sent>:<request_id>`, written before the query goes out, taken back if Sinch refuses it |
//! | `{…}:done` | hash: recipient index → its offset |
//! | `{…}:results` | list: offset − 1 → 4-byte index and the encoded answer |
//! | `{…}:lease` | the replica running the job; expires unless renewed |
//! | `prefix:jobs` | set of the running jobs, scanned for jobs whose lease lapsed |
//! | `prefix:bulkreq:<hash>` | a caller-chosen request_id → `<fingerprint>:<job_id>` |
//! | `prefix:pace` | sorted set: one member per channel identity sent in the last second, for the callback budget |
//!
//! Every key of a job expires with the retention, counted again from its end.

use std::{
    collections::{HashMap, HashSet},
    time::Duration,
};

use redis::Script;

use super::{Connection, hashed, ttl_ms};
use crate::check::bulk::{
    JobError, JobResult, JobSpec, JobState, JobStatus, Resumable, SEND_DEADLINE,
    pacer::{Admission, Pace},
    stored,
};

/// How old a request_id's record naming a job never written must be before a repeat starts the job itself: the
/// start that wrote it may still be writing the job until then.
const ABANDONED_AFTER: Duration = Duration::from_secs(30);

/// How long a running job's record of sent and done recipients lives before its end sets the retention: longer
/// than any job runs.
const PROGRESS_TTL: Duration = Duration::from_secs(7 * 86_400);

/// Creates a job. KEYS: meta, spec. ARGV: total, now, retention (ms), spec bytes, a recipient's wait (ms), the
/// request_id it was started with (empty without one).
const CREATE: &str = r"
redis.call('HSET', KEYS[1], 'state', 'RUNNING', 'total', ARGV[1], 'done', 0, 'from_cache', 0, 'reachable', 0,
  'create', ARGV[2], 'update', ARGV[2], 'wait', ARGV[5], 'request_id', ARGV[6])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
redis.call('SET', KEYS[2], ARGV[4], 'PX', ARGV[3])
return 1
";

/// Records a recipient as sent, only while the job runs, only by the replica holding its lease, and only once.
/// KEYS: meta, sent, lease. ARGV: index, value, retention (ms), owner. Returns {1} recorded, {0} the job does not
/// send any more (or this replica lost it), {2, value} the recipient was sent already (by a replica that held the
/// job before). The same value again (this attempt's script sent again after its reply was lost) is {1}.
const MARK_SENT: &str = r"
if redis.call('HGET', KEYS[1], 'state') ~= 'RUNNING' then return {0} end
if redis.call('GET', KEYS[3]) ~= ARGV[4] then return {0} end
local held = redis.call('HGET', KEYS[2], ARGV[1])
if held == ARGV[2] then return {1} end
if held then return {2, held} end
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
redis.call('PEXPIRE', KEYS[2], ARGV[3])
return {1}
";

/// Forgets that a recipient was sent under a request_id Sinch refused, if `owner` holds the lease.
/// KEYS: sent, lease. ARGV: index, request_id, owner.
const UNMARK_SENT: &str = r"
if redis.call('GET', KEYS[2]) ~= ARGV[3] then return 0 end
local held = redis.call('HGET', KEYS[1], ARGV[1])
if not held then return 0 end
local at = string.find(held, ':', 1, true)
if at and string.sub(held, at + 1) == ARGV[2] then return redis.call('HDEL', KEYS[1], ARGV[1]) end
return 0
";

/// Records an answer for the indexes not answered yet. KEYS: meta, done, results. ARGV: answer bytes, from
/// cache (1/0), reachable (1/0), now, retention (ms), then the indexes (each as 4 big-endian bytes).
const RECORD: &str = r"
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local n = 0
for i = 6, #ARGV do
  if redis.call('HEXISTS', KEYS[2], ARGV[i]) == 0 then
    local offset = redis.call('RPUSH', KEYS[3], ARGV[i] .. ARGV[1])
    redis.call('HSET', KEYS[2], ARGV[i], offset)
    n = n + 1
  end
end
redis.call('HINCRBY', KEYS[1], 'done', n)
redis.call('HINCRBY', KEYS[1], 'from_cache', n * tonumber(ARGV[2]))
redis.call('HINCRBY', KEYS[1], 'reachable', n * tonumber(ARGV[3]))
redis.call('HSET', KEYS[1], 'update', ARGV[4])
redis.call('PEXPIRE', KEYS[2], ARGV[5])
redis.call('PEXPIRE', KEYS[3], ARGV[5])
return n
";

/// Cancels a running job; its recipients already sent may answer until their sending's deadline, a wait and a
/// lease's lapse from now (`settle_by`: a job whose runner died says so then).
/// KEYS: meta. ARGV: now, the sending's deadline and a lease's lapse (ms).
const CANCEL: &str = r"
if redis.call('HGET', KEYS[1], 'state') == 'RUNNING' then
  local wait = tonumber(redis.call('HGET', KEYS[1], 'wait') or '0')
  redis.call('HSET', KEYS[1], 'state', 'CANCELLED', 'update', ARGV[1], 'settle_by', tonumber(ARGV[1]) + wait + tonumber(ARGV[2]))
end
return 1
";

/// Ends a job run by the replica holding its lease: its state (unless cancelled meanwhile; `SUCCEEDED` only when
/// every recipient has its answer), its keys' expiry from now, its request (no longer needed) gone.
/// KEYS: meta, spec, sent, done, results, lease. ARGV: state, now, retention (ms), owner.
/// Returns 1 ended in ARGV's state, 2 ended cancelled (it was, meanwhile), 0 this replica does not hold the job, -1
/// recipients are missing (left running, for a takeover).
const FINISH: &str = r"
if redis.call('GET', KEYS[6]) ~= ARGV[4] then return 0 end
local state = redis.call('HGET', KEYS[1], 'state')
if state == 'RUNNING' and ARGV[1] == 'SUCCEEDED'
  and tonumber(redis.call('HGET', KEYS[1], 'done') or '0') < tonumber(redis.call('HGET', KEYS[1], 'total') or '0') then
  redis.call('DEL', KEYS[6])
  return -1
end
if state == 'RUNNING' then redis.call('HSET', KEYS[1], 'state', ARGV[1]) end
redis.call('HSET', KEYS[1], 'update', ARGV[2], 'settled', 1)
redis.call('DEL', KEYS[2], KEYS[6])
for i = 3, 5 do redis.call('PEXPIRE', KEYS[i], ARGV[3]) end
redis.call('PEXPIRE', KEYS[1], ARGV[3])
if state == 'RUNNING' then return 1 end
return 2
";

/// Renews the lease if this replica holds it, and the job's keys with it (a job may outlive the retention).
/// KEYS: lease, meta, spec. ARGV: owner, ttl (ms), retention (ms).
/// Returns the job's state, or false when the lease is another's (or gone).
const RENEW: &str = r"
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return false end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
redis.call('PEXPIRE', KEYS[2], ARGV[3])
redis.call('PEXPIRE', KEYS[3], ARGV[3])
return redis.call('HGET', KEYS[2], 'state') or 'FAILED'
";

/// Takes a job whose lease lapsed: one running, or one cancelled whose end was not recorded (its recipients sent
/// before the cancel are still to be answered). KEYS: lease, meta. ARGV: owner, ttl (ms).
/// Returns 1 taken, 2 taken cancelled, 0 another replica runs it, -1 the job ended or expired (to drop from the
/// running set).
const CLAIM: &str = r"
local state = redis.call('HGET', KEYS[2], 'state')
local cancelled = false
if state == 'CANCELLED' and redis.call('HGET', KEYS[2], 'settled') ~= '1' then
  -- Past its settling time the job says it settled (`status`): its stream has ended. Not taken over in the last 10 s
  -- before it either, so that what the takeover records lands before (whatever the replicas' clocks against Redis's).
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  cancelled = now + 10000 <= tonumber(redis.call('HGET', KEYS[2], 'settle_by') or '0')
end
if state ~= 'RUNNING' and not cancelled then return -1 end
if not redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return 0 end
if cancelled then return 2 end
return 1
";

/// Points a request_id's record at a new job, if it still names `old`. KEYS: record. ARGV: old, new, ttl (ms).
const RECLAIM: &str = r"
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
return 1
";

/// Gives a lease back if `owner` holds it. KEYS: lease. ARGV: owner.
const RELEASE: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
";

/// Counts `n` identities in the window (a second and a 25 ms guard, as the in-process pacer's) if they fit; else how
/// long until they would, in ms (0: counted; -1: counted over the budget, by what interactive calls took). An
/// interactive call's are counted whether or not (members `i:…`). A job's (`j:…`) fit if the window has room; a
/// starved job's, beside the jobs' own identities alone, the reservations of queries starved before it included:
/// until they fit, it reserves room (members `r:<ticket>:…`, refreshed at each ask, gone a window after the last),
/// so that other replicas' jobs hold back rather than take each place as it frees up. More than `limit` need the
/// window empty, and fill the windows after it too (`limit` in each, scored ahead), holding every replica back. A
/// replica of an earlier version wrote its members unmarked: counted as a job's, but not by a starved query (they may
/// be interactive calls, which would keep it reserving for as long as that replica runs).
/// KEYS: window. ARGV: limit, n, ticket (a ULID, unique to the query), pace (1 interactive, 0 a job's, 2 starved).
const PACE: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - 1025)
-- The window is kept until its last member leaves (a replica of an earlier version sets 2 s at each call).
local function keep()
  local last = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')
  local ttl = math.max(2000, tonumber(last[2]) - now + 2000)
  if redis.call('PTTL', KEYS[1]) < ttl then redis.call('PEXPIRE', KEYS[1], ttl) end
end
local used = redis.call('ZCARD', KEYS[1])
local limit, n, ticket, pace = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3], ARGV[4]
local first = math.min(n, limit)
local fits = pace == '1' or used + first <= limit
local over = false
local held
if not fits and pace == '2' then
  held = {}
  local all = 0
  local members = redis.call('ZRANGE', KEYS[1], 0, -1, 'WITHSCORES')
  for i = 1, #members, 2 do
    local member = members[i]
    local kind = string.sub(member, 1, 2)
    -- Its own reservation, and those of queries starved after it, do not hold it back.
    if kind ~= 'r:' or string.sub(member, 3, 2 + #ticket) < ticket then
      all = all + 1
      -- A replica of an earlier version marked none: its interactive calls must not hold a reservation for ever.
      if kind == 'j:' or kind == 'r:' then held[#held + 1] = tonumber(members[i + 1]) end
    end
  end
  fits = #held + first <= limit
  over = all + first > limit
  if not fits then
    for i = 1, first do redis.call('ZADD', KEYS[1], now, 'r:' .. ticket .. ':' .. i) end
    keep()
  end
end
if fits then
  if pace == '2' then
    for i = 1, first do redis.call('ZREM', KEYS[1], 'r:' .. ticket .. ':' .. i) end
  end
  local kind = pace == '1' and 'i:' or 'j:'
  for i = 1, n do
    redis.call('ZADD', KEYS[1], now + math.floor((i - 1) / limit) * 1025, kind .. ticket .. ':' .. i)
  end
  keep()
  if over then return -1 end
  return 0
end
if held then return math.max(1, held[#held + first - limit] + 1025 - now) end
local oldest = redis.call('ZRANGE', KEYS[1], used + first - limit - 1, used + first - limit - 1, 'WITHSCORES')
return math.max(1, tonumber(oldest[2]) + 1025 - now)
";

/// A recipient's record of being sent, `<ms sent>:<request_id>`, as (request_id, ms).
fn sent_record(value: &str) -> Option<(String, u64)> {
    let (at, request_id) = value.split_once(':')?;
    Some((request_id.to_owned(), at.parse().ok()?))
}

/// What recording a recipient as sent found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Marked {
    /// Recorded: send it.
    Marked,
    /// Sent before, under this request_id (by a replica that held the job before): wait for its results.
    SentBefore(String),
    /// The job sends no more (cancelled, ended), or this replica no longer holds it.
    Stopped,
}

/// See the module documentation.
pub struct RedisJobs {
    commands: Connection,
    prefix: String,
    create: Script,
    mark_sent: Script,
    unmark_sent: Script,
    record: Script,
    cancel: Script,
    finish: Script,
    renew: Script,
    claim: Script,
    release: Script,
    reclaim: Script,
    pace: Script,
}

fn decode_error(what: &str, e: impl std::fmt::Display) -> redis::RedisError {
    redis::RedisError::from((
        redis::ErrorKind::UnexpectedReturnType,
        "a stored bulk check does not decode",
        format!("{what}: {e}"),
    ))
}

impl RedisJobs {
    pub(super) fn new(commands: Connection, prefix: String) -> RedisJobs {
        RedisJobs {
            commands,
            prefix,
            create: Script::new(CREATE),
            mark_sent: Script::new(MARK_SENT),
            unmark_sent: Script::new(UNMARK_SENT),
            record: Script::new(RECORD),
            cancel: Script::new(CANCEL),
            finish: Script::new(FINISH),
            renew: Script::new(RENEW),
            claim: Script::new(CLAIM),
            release: Script::new(RELEASE),
            reclaim: Script::new(RECLAIM),
            pace: Script::new(PACE),
        }
    }

    fn key(&self, job_id: &str, part: &str) -> String {
        format!("{{{}:job:{}}}:{part}", self.prefix, hashed(job_id))
    }

    /// The record of a caller-chosen request_id.
    fn request_key(&self, request_id: &str) -> String {
        format!("{}:bulkreq:{}", self.prefix, hashed(request_id))
    }

    fn running_set(&self) -> String {
        format!("{}:jobs", self.prefix)
    }

    /// Creates a job, or finds the one its request_id created; `true` when created. The request_id's record,
    /// the job and the running set are separate steps (in a cluster they live on different slots): the record
    /// first, so that a repeat finds the job even while it is being written. A repeat mends what a failed start
    /// left: a record naming a job never written is pointed at a new one, a job not listed as running is listed.
    pub async fn create(
        &self,
        job_id: &str,
        spec: &JobSpec,
        fingerprint: &str,
        now_ms: u64,
        retention: Duration,
    ) -> redis::RedisResult<Result<(JobStatus, bool), JobError>> {
        let mut conn = self.commands.clone();
        if let Some(request_id) = &spec.request_id {
            let key = self.request_key(request_id);
            let record = format!("{fingerprint}:{job_id}");
            let claimed: Option<String> = redis::cmd("SET")
                .arg(&key)
                .arg(&record)
                .arg("NX")
                .arg("PX")
                .arg(ttl_ms(retention))
                .query_async(&mut conn)
                .await?;
            if claimed.is_none() {
                let known: Option<String> = redis::cmd("GET").arg(&key).query_async(&mut conn).await?;
                let Some((known_fingerprint, known_job)) = known.as_deref().and_then(|k| k.split_once(':')) else {
                    return Err(decode_error("request_id", "lapsed while read; retry"));
                };
                if known_fingerprint != fingerprint {
                    return Ok(Err(JobError::Conflict(request_id.clone())));
                }
                // The first start may still be writing the job: a short wait for it.
                for _ in 0..100 {
                    if let Some(status) = self.status(known_job).await? {
                        if status.state == JobState::Running {
                            redis::cmd("SADD")
                                .arg(self.running_set())
                                .arg(known_job)
                                .query_async::<i64>(&mut conn)
                                .await?;
                        }
                        return Ok(Ok((status, false)));
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                // Not written yet: the start that recorded it is slow, or failed. Past a while it failed, and this one
                // starts the job.
                let left: i64 = redis::cmd("PTTL").arg(&key).query_async(&mut conn).await?;
                let age = ttl_ms(retention).saturating_sub(u64::try_from(left).unwrap_or(0));
                if age < ABANDONED_AFTER.as_millis() as u64 {
                    return Ok(Err(JobError::Unavailable(
                        "the first start of this request_id is still being written; retry in a few seconds".into(),
                    )));
                }
                let mut reclaim = self.reclaim.prepare_invoke();
                reclaim
                    .key(&key)
                    .arg(known.as_deref().unwrap_or_default())
                    .arg(&record)
                    .arg(ttl_ms(retention));
                if reclaim.invoke_async::<i64>(&mut conn).await? == 0 {
                    return Err(decode_error("request_id", "started again meanwhile; retry"));
                }
                tracing::warn!(
                    "a bulk check's request_id named a job never written (its start failed): starting it now"
                );
            }
        }
        let mut invocation = self.create.prepare_invoke();
        invocation
            .key(self.key(job_id, "meta"))
            .key(self.key(job_id, "spec"))
            .arg(spec.recipients.len())
            .arg(now_ms)
            .arg(ttl_ms(retention))
            .arg(stored::encode_spec(spec))
            .arg(spec.wait.as_millis() as u64)
            .arg(spec.request_id.as_deref().unwrap_or_default());
        invocation.invoke_async::<i64>(&mut conn).await?;
        if let Some(request_id) = &spec.request_id {
            // A start this slow may have been taken for failed by a repeat, which started the job itself.
            let record: Option<String> = redis::cmd("GET")
                .arg(self.request_key(request_id))
                .query_async(&mut conn)
                .await?;
            if let Some((_, other)) = record.as_deref().and_then(|r| r.split_once(':'))
                && other != job_id
            {
                redis::cmd("DEL")
                    .arg(self.key(job_id, "meta"))
                    .arg(self.key(job_id, "spec"))
                    .query_async::<i64>(&mut conn)
                    .await?;
                return Ok(self.status(other).await?.map(|status| (status, false)).ok_or_else(|| {
                    JobError::Unavailable("this request_id's job was started again meanwhile; retry".into())
                }));
            }
        }
        redis::cmd("SADD")
            .arg(self.running_set())
            .arg(job_id)
            .query_async::<i64>(&mut conn)
            .await?;
        match self.status(job_id).await? {
            Some(status) => Ok(Ok((status, true))),
            None => Ok(Err(JobError::NotFound(job_id.to_owned()))),
        }
    }

    pub async fn status(&self, job_id: &str) -> redis::RedisResult<Option<JobStatus>> {
        let fields: HashMap<String, String> = redis::cmd("HGETALL")
            .arg(self.key(job_id, "meta"))
            .query_async(&mut self.commands.clone())
            .await?;
        if fields.is_empty() {
            return Ok(None);
        }
        let number = |name: &str| fields.get(name).and_then(|v| v.parse().ok()).unwrap_or(0);
        let state = JobState::parse(fields.get("state").map_or("", String::as_str));
        // A cancelled job that no replica runs any more (none left to take it over) never says it settled: its
        // sent recipients' wait tells.
        let settled = state.ended()
            && (number("settled") == 1
                || state != JobState::Cancelled
                || crate::log::wall_clock_ms() > number("settle_by"));
        Ok(Some(JobStatus {
            job_id: job_id.to_owned(),
            state,
            settled,
            total: number("total"),
            done: number("done"),
            from_cache: number("from_cache"),
            reachable: number("reachable"),
            create_ms: number("create"),
            update_ms: number("update"),
            request_id: fields.get("request_id").cloned().unwrap_or_default(),
        }))
    }

    pub async fn cancel(&self, job_id: &str, now_ms: u64) -> redis::RedisResult<Option<JobStatus>> {
        let mut invocation = self.cancel.prepare_invoke();
        let settling = SEND_DEADLINE + Duration::from_secs(10);
        invocation
            .key(self.key(job_id, "meta"))
            .arg(now_ms)
            .arg(settling.as_millis() as u64);
        invocation.invoke_async::<i64>(&mut self.commands.clone()).await?;
        self.status(job_id).await
    }

    /// Records that `index` was sent under `request_id` by `owner`.
    pub async fn mark_sent(
        &self,
        job_id: &str,
        owner: &str,
        index: u32,
        request_id: &str,
        now_ms: u64,
    ) -> redis::RedisResult<Marked> {
        let mut invocation = self.mark_sent.prepare_invoke();
        invocation
            .key(self.key(job_id, "meta"))
            .key(self.key(job_id, "sent"))
            .key(self.key(job_id, "lease"))
            .arg(index)
            .arg(format!("{now_ms}:{request_id}"))
            .arg(ttl_ms(PROGRESS_TTL))
            .arg(owner);
        let answer: Vec<redis::Value> = invocation.invoke_async(&mut self.commands.clone()).await?;
        Ok(match answer.as_slice() {
            [code] if redis::from_redis_value::<i64>(code.clone())? == 1 => Marked::Marked,
            [_, held] => {
                let held: String = redis::from_redis_value(held.clone())?;
                match sent_record(&held) {
                    Some((request_id, _)) => Marked::SentBefore(request_id),
                    None => Marked::Stopped,
                }
            }
            _ => Marked::Stopped,
        })
    }

    /// Forgets that `index` was sent under `request_id` (Sinch refused it), if `owner` runs the job.
    pub async fn unmark_sent(&self, job_id: &str, owner: &str, index: u32, request_id: &str) -> redis::RedisResult<()> {
        let mut invocation = self.unmark_sent.prepare_invoke();
        invocation
            .key(self.key(job_id, "sent"))
            .key(self.key(job_id, "lease"))
            .arg(index)
            .arg(request_id)
            .arg(owner);
        invocation
            .invoke_async::<i64>(&mut self.commands.clone())
            .await
            .map(drop)
    }

    /// Records `answer` (encoded) for each of `indexes` not answered yet, at the next offsets: how many that was.
    pub async fn record(
        &self,
        job_id: &str,
        indexes: &[u32],
        answer: &[u8],
        from_cache: bool,
        reachable: bool,
        now_ms: u64,
    ) -> redis::RedisResult<u64> {
        let mut invocation = self.record.prepare_invoke();
        invocation
            .key(self.key(job_id, "meta"))
            .key(self.key(job_id, "done"))
            .key(self.key(job_id, "results"))
            .arg(answer)
            .arg(u8::from(from_cache))
            .arg(u8::from(reachable))
            .arg(now_ms)
            .arg(ttl_ms(PROGRESS_TTL));
        for index in indexes {
            invocation.arg(&index.to_be_bytes()[..]);
        }
        invocation.invoke_async(&mut self.commands.clone()).await
    }

    pub async fn results_after(&self, job_id: &str, after: u64, max: usize) -> redis::RedisResult<Vec<JobResult>> {
        let entries: Vec<Vec<u8>> = redis::cmd("LRANGE")
            .arg(self.key(job_id, "results"))
            .arg(after.min(i64::MAX as u64))
            .arg(after.saturating_add(max as u64 - 1).min(i64::MAX as u64))
            .query_async(&mut self.commands.clone())
            .await?;
        entries
            .iter()
            .zip(after.saturating_add(1)..)
            .map(|(entry, offset)| {
                if entry.len() < 4 {
                    return Err(decode_error("result", "too short"));
                }
                let index = u32::from_be_bytes(entry[..4].try_into().expect("4 bytes"));
                let answer = stored::decode_answer(&entry[4..]).map_err(|e| decode_error("result", e))?;
                Ok(JobResult { offset, index, answer })
            })
            .collect()
    }

    /// Ends a job run by `owner`; its keys live `retention` from now. `false` when the job was left running
    /// (recipients missing, or this replica no longer holds it): a takeover finishes it.
    pub async fn finish(
        &self,
        job_id: &str,
        owner: &str,
        state: JobState,
        now_ms: u64,
        retention: Duration,
        request_id: Option<&str>,
    ) -> redis::RedisResult<Option<JobState>> {
        let mut invocation = self.finish.prepare_invoke();
        for part in ["meta", "spec", "sent", "done", "results", "lease"] {
            invocation.key(self.key(job_id, part));
        }
        invocation
            .arg(state.as_str())
            .arg(now_ms)
            .arg(ttl_ms(retention))
            .arg(owner);
        let ended = match invocation.invoke_async::<i64>(&mut self.commands.clone()).await? {
            1 => Some(state),
            2 => Some(JobState::Cancelled),
            _ => None,
        };
        if ended.is_some() {
            // The job has ended whatever comes of this: its request's record and the set of running jobs are
            // housekeeping (a takeover skips an ended job still in the set).
            let kept = async {
                self.keep_request(request_id, retention).await?;
                redis::cmd("SREM")
                    .arg(self.running_set())
                    .arg(job_id)
                    .query_async::<i64>(&mut self.commands.clone())
                    .await
            };
            if let Err(e) = kept.await {
                tracing::warn!(job_id = %job_id, error = %e, "an ended bulk check's request and place could not be tidied");
            }
        }
        Ok(ended)
    }

    /// Renews `owner`'s lease, and the job's keys and its request_id's record for a retention; the job's state,
    /// or `None` when the lease is not `owner`'s any more.
    pub async fn renew(
        &self,
        job_id: &str,
        owner: &str,
        ttl: Duration,
        retention: Duration,
        request_id: Option<&str>,
    ) -> redis::RedisResult<Option<JobState>> {
        let mut invocation = self.renew.prepare_invoke();
        invocation
            .key(self.key(job_id, "lease"))
            .key(self.key(job_id, "meta"))
            .key(self.key(job_id, "spec"))
            .arg(owner)
            .arg(ttl_ms(ttl))
            .arg(ttl_ms(retention));
        let state: Option<String> = invocation.invoke_async(&mut self.commands.clone()).await?;
        if state.is_some() {
            self.keep_request(request_id, retention).await?;
        }
        Ok(state.map(|s| JobState::parse(&s)))
    }

    /// Keeps a request_id's record a retention from now, as long as its job.
    async fn keep_request(&self, request_id: Option<&str>, retention: Duration) -> redis::RedisResult<()> {
        let Some(request_id) = request_id else { return Ok(()) };
        redis::cmd("PEXPIRE")
            .arg(self.request_key(request_id))
            .arg(ttl_ms(retention))
            .query_async::<i64>(&mut self.commands.clone())
            .await
            .map(drop)
    }

    /// Gives `owner`'s lease back, so that another replica takes the job over at once.
    pub async fn release(&self, job_id: &str, owner: &str) -> redis::RedisResult<()> {
        // Listed again first: a replica of an earlier version drops a cancelled job from the set, which it never
        // takes over.
        redis::cmd("SADD")
            .arg(self.running_set())
            .arg(job_id)
            .query_async::<i64>(&mut self.commands.clone())
            .await?;
        let mut invocation = self.release.prepare_invoke();
        invocation.key(self.key(job_id, "lease")).arg(owner);
        invocation
            .invoke_async::<i64>(&mut self.commands.clone())
            .await
            .map(drop)
    }

    /// The jobs running on some replica.
    pub async fn running(&self) -> redis::RedisResult<Vec<String>> {
        redis::cmd("SMEMBERS")
            .arg(self.running_set())
            .query_async(&mut self.commands.clone())
            .await
    }

    /// Takes a job whose lease lapsed (or a new job's first lease) and loads what resuming it needs; `None` when
    /// another replica runs it or it ended.
    pub async fn claim(&self, job_id: &str, owner: &str, ttl: Duration) -> redis::RedisResult<Option<Resumable>> {
        let mut invocation = self.claim.prepare_invoke();
        invocation
            .key(self.key(job_id, "lease"))
            .key(self.key(job_id, "meta"))
            .arg(owner)
            .arg(ttl_ms(ttl));
        let cancelled = match invocation.invoke_async::<i64>(&mut self.commands.clone()).await? {
            1 => false,
            2 => true,
            -1 => {
                // Ended, or expired: nothing to take over.
                redis::cmd("SREM")
                    .arg(self.running_set())
                    .arg(job_id)
                    .query_async::<i64>(&mut self.commands.clone())
                    .await?;
                return Ok(None);
            }
            _ => return Ok(None),
        };
        let mut conn = self.commands.clone();
        let spec: Option<Vec<u8>> = redis::cmd("GET")
            .arg(self.key(job_id, "spec"))
            .query_async(&mut conn)
            .await?;
        let Some(spec) = spec else { return Ok(None) };
        let spec = stored::decode_spec(&spec).map_err(|e| decode_error("spec", e))?;
        let sent: HashMap<u32, String> = redis::cmd("HGETALL")
            .arg(self.key(job_id, "sent"))
            .query_async(&mut conn)
            .await?;
        let done: Vec<Vec<u8>> = redis::cmd("HKEYS")
            .arg(self.key(job_id, "done"))
            .query_async(&mut conn)
            .await?;
        let sent = sent
            .into_iter()
            .filter_map(|(index, value)| Some((index, sent_record(&value)?)))
            .collect();
        let done: HashSet<u32> = done
            .iter()
            .filter_map(|d| Some(u32::from_be_bytes(d.as_slice().try_into().ok()?)))
            .collect();
        Ok(Some(Resumable {
            spec,
            sent,
            done,
            cancelled,
        }))
    }

    /// The shared callback budget: counts `n` identities as `pace` says (see [`PACE`]) in the window of `limit`;
    /// else how long until they would. `ticket` is unique to the query, the same each time it asks.
    pub async fn pace(&self, limit: u32, n: u32, pace: Pace, ticket: &str) -> redis::RedisResult<Admission> {
        let mut invocation = self.pace.prepare_invoke();
        invocation
            .key(format!("{}:pace", self.prefix))
            .arg(limit)
            .arg(n)
            .arg(ticket)
            .arg(match pace {
                Pace::Job => "0",
                Pace::Interactive => "1",
                Pace::Starved => "2",
            });
        let answer: i64 = invocation.invoke_async(&mut self.commands.clone()).await?;
        Ok(match answer {
            0 => Admission::Counted,
            wait if wait > 0 => Admission::Wait(Duration::from_millis(wait as u64)),
            _ => Admission::Overran,
        })
    }
}
