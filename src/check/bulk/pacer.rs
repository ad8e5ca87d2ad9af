//! The app's callback budget: at most `SINCH_CALLBACK_RATE` channel identities queried in any one-second window,
//! counted on this replica, or on every replica through Redis.
//!
//! Interactive queries (QueryCapability, CheckCapability) are recorded and never wait: they go first. Bulk jobs
//! wait for what is left, one at a time in the order they asked (a fair queue), so that several jobs progress
//! together and none bursts past the window; their identities are also spread evenly over it (one every
//! 1.025 s / budget), not sent at once when a window opens.

use std::{
    collections::VecDeque,
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::time::Instant;

use crate::log::EventLog;

/// The window the budget is counted in: one second, and a guard of 25 ms so that the jitter between this
/// replica and Sinch does not let Sinch see more than the budget in any second (the pace is 97.5 % of it).
const WINDOW: Duration = Duration::from_millis(1025);

/// The most interactive counts on their way to Redis at once.
const MAX_RECORDING: usize = 1024;

/// How far ahead of its even place an identity may go (a timer's tick is a millisecond).
const SPREAD_SLACK: Duration = Duration::from_millis(5);

/// How long interactive calls may keep a job's query from fitting in the window: past it, the query goes anyway,
/// over the budget by what they took in that second (Sinch queues callbacks past the app's rate), so that they
/// slow the jobs down but never stop them.
const STARVED_AFTER: Duration = Duration::from_secs(3);

/// See the module documentation.
pub struct Pacer {
    limit: u32,
    window: Window,
    /// Bulk jobs wait here in turn; it holds when the next may go, so that a window's budget is spread over it
    /// rather than sent at its start (Sinch's callbacks, and the interactive calls behind them, queue less).
    queue: tokio::sync::Mutex<Instant>,
    /// Interactive counts on their way to Redis.
    recording: Arc<tokio::sync::Semaphore>,
}

enum Window {
    /// The identities sent in the last second, by when.
    Local(Mutex<VecDeque<Sent>>),
    Redis(Arc<EventLog>),
}

/// Identities counted in the window.
struct Sent {
    at: Instant,
    identities: u32,
    interactive: bool,
}

/// What the window answered a job's query.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Counted, within the budget.
    Counted,
    /// Counted beside the jobs' own identities alone: over the budget by what interactive calls took.
    Overran,
    /// Not counted: it may fit after this long.
    Wait(Duration),
}

/// Who asks the window for room, and how.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pace {
    /// An interactive call: counted, whether or not it fits.
    Interactive,
    /// A job's query: counted if it fits, else told how long until it would.
    Job,
    /// A job's query kept out for [`STARVED_AFTER`]: counted if it fits beside the jobs' own identities alone
    /// (with Redis, reserving room until it does, ahead of queries starved after it).
    Starved,
}

impl Pacer {
    /// A budget of `limit` identities per second, shared through `log` when it is Redis.
    pub fn new(limit: u32, log: &Arc<EventLog>) -> Pacer {
        let window = match log.shared_cache() {
            Some(_) => Window::Redis(log.clone()),
            None => Window::Local(Mutex::new(VecDeque::new())),
        };
        Pacer {
            limit: limit.max(1),
            window,
            queue: tokio::sync::Mutex::new(Instant::now()),
            recording: Arc::new(tokio::sync::Semaphore::new(MAX_RECORDING)),
        }
    }

    /// The budget: identities per second.
    pub fn limit(&self) -> u32 {
        self.limit
    }

    /// Records `identities` queried by an interactive call: counted, never delayed.
    pub fn record(&self, identities: u32) {
        match &self.window {
            Window::Local(window) => {
                let mut window = window.lock().expect("pacer lock poisoned");
                // What left the window goes now, whether or not a job asks.
                let now = expire(&mut window);
                window.push_back(Sent {
                    at: now,
                    identities,
                    interactive: true,
                });
            }
            Window::Redis(log) => {
                // At most so many counts in flight: while Redis is slow, the excess goes uncounted.
                let Ok(permit) = self.recording.clone().try_acquire_owned() else {
                    return;
                };
                let (log, limit) = (log.clone(), self.limit);
                tokio::spawn(async move {
                    let _permit = permit;
                    if let Some(jobs) = log.shared_jobs()
                        && let Err(e) = jobs
                            .pace(limit, identities, Pace::Interactive, &ulid::Ulid::new().to_string())
                            .await
                    {
                        tracing::debug!(error = %e, "an interactive query could not be counted in the shared callback budget");
                    }
                });
            }
        }
    }

    /// Waits until `identities` more fit in the window, then counts them. A job asking for more than the whole
    /// budget gets it once the window is empty, and the next waits as many windows as it asked for.
    pub async fn admit(&self, identities: u32) {
        let mut next = self.queue.lock().await;
        // What the window counts: all of a budget at most, the rest in the spacing that follows.
        let counted = identities.min(self.limit);
        // Timers tick by the millisecond: a budget of thousands a second goes out in small bursts, at most
        // `SPREAD_SLACK` early, never faster on average.
        if *next > Instant::now() + SPREAD_SLACK {
            tokio::time::sleep_until(*next - SPREAD_SLACK).await;
        }
        let earliest = Instant::now().checked_sub(SPREAD_SLACK).unwrap_or_else(Instant::now);
        let spacing = WINDOW.mul_f64(f64::from(identities) / f64::from(self.limit));
        *next = (*next).max(earliest) + spacing;
        let starved_at = Instant::now() + STARVED_AFTER;
        // With Redis, the same each time it asks: its reservation once starved is refreshed, not made again.
        let ticket = ulid::Ulid::new().to_string();
        loop {
            let pace = if Instant::now() >= starved_at {
                Pace::Starved
            } else {
                Pace::Job
            };
            let admission = match &self.window {
                Window::Local(window) => local_admit(
                    &mut window.lock().expect("pacer lock poisoned"),
                    self.limit,
                    counted,
                    pace,
                ),
                // Redis counts them all, in as many windows as they need: every replica is held back.
                Window::Redis(log) => match log
                    .shared_jobs()
                    .expect("a Redis log")
                    .pace(self.limit, identities, pace, &ticket)
                    .await
                {
                    Ok(admission) => admission,
                    Err(e) => {
                        // Without Redis nothing is sent anyway (the log refuses callbacks): ask again shortly.
                        tracing::debug!(error = %e, "the shared callback budget is unavailable");
                        Admission::Wait(Duration::from_millis(250))
                    }
                },
            };
            match admission {
                Admission::Counted | Admission::Overran => {
                    metrics::counter!("capability_bulk_identities_paced_total").increment(u64::from(identities));
                    if admission == Admission::Overran {
                        metrics::counter!("capability_bulk_pacing_overruns_total").increment(1);
                    }
                    return;
                }
                Admission::Wait(wait) => {
                    metrics::counter!("capability_bulk_pacing_waits_total").increment(1);
                    // Not past the moment it counts as starved, and asked again only when it may fit — once
                    // starved, within half a window: its reservation lasts one.
                    let until = match pace {
                        Pace::Job => (Instant::now() + wait).min(starved_at),
                        _ => Instant::now() + wait.min(WINDOW / 2),
                    };
                    tokio::time::sleep_until(until).await;
                    // The window held this one back: the next keeps its distance from it rather than catching up
                    // with the schedule in a burst (which Sinch, seeing the queries a little later, could count
                    // in one second).
                    *next = (*next).max(Instant::now() + spacing);
                }
            }
        }
    }
}

/// Drops from `window` what left it (it holds one second); now.
fn expire(window: &mut VecDeque<Sent>) -> Instant {
    let now = Instant::now();
    while window.front().is_some_and(|sent| now.duration_since(sent.at) >= WINDOW) {
        window.pop_front();
    }
    now
}

/// Counts a job's `n` in `window` if they fit under `limit` in the last second (a starved job's, beside the jobs'
/// own identities alone); else how long until they would.
fn local_admit(window: &mut VecDeque<Sent>, limit: u32, n: u32, pace: Pace) -> Admission {
    let now = expire(window);
    let all: u32 = window.iter().map(|sent| sent.identities).sum();
    let counted = |sent: &&Sent| pace != Pace::Starved || !sent.interactive;
    let used: u32 = window.iter().filter(counted).map(|sent| sent.identities).sum();
    if used + n <= limit {
        window.push_back(Sent {
            at: now,
            identities: n,
            interactive: false,
        });
        return match all + n <= limit {
            true => Admission::Counted,
            false => Admission::Overran,
        };
    }
    // The oldest entries must leave until `n` fit.
    let mut excess = used + n - limit;
    for sent in window.iter().filter(counted) {
        if sent.identities >= excess {
            return Admission::Wait(
                (sent.at + WINDOW)
                    .saturating_duration_since(now)
                    .max(Duration::from_millis(1)),
            );
        }
        excess -= sent.identities;
    }
    Admission::Wait(Duration::from_millis(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A pacer of `limit` on a replica without Redis.
    fn local_pacer(limit: u32) -> Pacer {
        let limits = crate::log::Limits {
            retention: Duration::from_secs(60),
            max_per_request: 64,
        };
        let log = EventLog::local(limits, Vec::new(), tokio_util::sync::CancellationToken::new());
        Pacer::new(limit, &Arc::new(log))
    }

    #[tokio::test(start_paused = true)]
    async fn interactive_counts_leave_the_window_without_a_job_asking() {
        let pacer = local_pacer(25);
        for _ in 0..10_000 {
            pacer.record(1);
        }
        tokio::time::advance(2 * WINDOW).await;
        pacer.record(1);
        let Window::Local(window) = &pacer.window else {
            unreachable!()
        };
        assert_eq!(window.lock().unwrap().len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn no_window_of_one_second_holds_more_than_the_limit() {
        let pacer = local_pacer(25);
        let start = Instant::now();
        let mut admitted = Vec::new();
        for _ in 0..100 {
            pacer.admit(1).await;
            admitted.push(start.elapsed());
        }
        for (i, at) in admitted.iter().enumerate() {
            let in_window = admitted[i..].iter().take_while(|t| **t < *at + WINDOW).count();
            assert!(in_window <= 25, "{in_window} admitted in the second from {at:?}");
        }
        // Spread: one every window / 25 (give or take the slack), not 25 at once.
        assert!(admitted[1] >= WINDOW / 25 - SPREAD_SLACK, "{:?}", admitted[1]);
        // 100 at 25 per window: the last one in the fourth window, not later.
        assert!(admitted[99] < 4 * WINDOW, "{:?}", admitted[99]);
        // Interactive queries are counted and go first: the next job query waits a whole window.
        pacer.record(25);
        let before = Instant::now();
        pacer.admit(1).await;
        assert!(before.elapsed() >= WINDOW);
    }

    #[tokio::test(start_paused = true)]
    async fn a_query_of_more_identities_than_the_budget_holds_the_next_back_as_many_windows() {
        let pacer = local_pacer(25);
        pacer.admit(100).await;
        let before = Instant::now();
        pacer.admit(1).await;
        assert!(
            before.elapsed() >= 4 * WINDOW - 2 * SPREAD_SLACK,
            "{:?}",
            before.elapsed()
        );
    }

    /// Interactive calls go first, but do not stop the jobs: a recipient of the whole budget never finds the
    /// window empty while they trickle in (one every 500 ms here), and neither do the jobs queued behind it. It
    /// waited for ever, and every job with it.
    #[tokio::test(start_paused = true)]
    async fn a_trickle_of_interactive_calls_does_not_stop_the_jobs() {
        let pacer = Arc::new(local_pacer(4));
        let trickle = tokio::spawn({
            let pacer = pacer.clone();
            async move {
                loop {
                    pacer.record(1);
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        });
        tokio::time::advance(Duration::from_millis(10)).await;
        let jobs = async {
            pacer.admit(4).await;
            pacer.admit(1).await;
        };
        let admitted = tokio::time::timeout(Duration::from_secs(600), jobs).await;
        trickle.abort();
        assert!(admitted.is_ok(), "the jobs waited for ever");
    }

    /// A starved query goes over the budget only by what interactive calls took, and says so (an overrun is
    /// counted in `capability_bulk_pacing_overruns_total`); the jobs' own identities still hold it back.
    #[tokio::test(start_paused = true)]
    async fn a_starved_query_overruns_only_by_what_interactive_calls_took() {
        let sent = |identities, interactive| Sent {
            at: Instant::now(),
            identities,
            interactive,
        };
        let mut window = VecDeque::from([sent(3, true)]);
        assert_eq!(local_admit(&mut window, 4, 1, Pace::Starved), Admission::Counted);
        assert_eq!(local_admit(&mut window, 4, 1, Pace::Starved), Admission::Overran);
        assert!(matches!(local_admit(&mut window, 4, 1, Pace::Job), Admission::Wait(_)));
        let mut window = VecDeque::from([sent(4, false)]);
        assert!(matches!(
            local_admit(&mut window, 4, 1, Pace::Starved),
            Admission::Wait(_)
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn a_query_the_window_held_back_is_not_followed_by_a_burst() {
        // 20 a second, 2 per query: a query every 102.5 ms, and the interactive one before them fills the window
        // so that the tenth waits until it leaves.
        let pacer = local_pacer(20);
        pacer.record(1);
        tokio::time::advance(Duration::from_millis(50)).await;
        let start = Instant::now();
        let mut admitted = Vec::new();
        for _ in 0..12 {
            pacer.admit(2).await;
            admitted.push(start.elapsed());
        }
        let spacing = WINDOW / 10;
        assert!(admitted[9] > admitted[8] + spacing, "the tenth waited: {admitted:?}");
        assert!(
            admitted[10] >= admitted[9] + spacing - SPREAD_SLACK,
            "the eleventh keeps its distance: {admitted:?}"
        );
    }
}
