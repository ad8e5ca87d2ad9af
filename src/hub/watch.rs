//! One watch of one request: replay, then live notifications, heartbeats on a quiet stream, and the end —
//! completion, the caller's wait, shutdown or eviction.

use std::{collections::VecDeque, sync::Arc, time::Duration};

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::Subscription;
use crate::capability::Channel;

/// The bounds of one watch.
#[derive(Debug, Clone)]
pub struct WatchLimits {
    /// How long to wait for the answer to be complete.
    pub wait: Duration,
    /// The longest quiet spell before a heartbeat.
    pub heartbeat: Duration,
    /// Cancelled when the server shuts down.
    pub shutdown: CancellationToken,
}

#[cfg(test)]
impl WatchLimits {
    pub(crate) fn for_tests() -> WatchLimits {
        WatchLimits {
            wait: Duration::from_secs(60),
            heartbeat: Duration::from_secs(15),
            shutdown: CancellationToken::new(),
        }
    }
}

/// Why a watch completed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CompletionReason {
    AllChannelsReported,
    WaitElapsed,
}

/// What a watch hands its caller, in order.
#[derive(Debug, Clone)]
pub enum WatchEvent {
    /// A notification: the request it answers, its offset, and its compact encoding (the contract's
    /// `CapabilityNotification` without `offset` and `request_id`).
    Notification {
        offset: u64,
        request_id: Arc<str>,
        body: Vec<u8>,
    },
    Heartbeat {
        last_offset: u64,
    },
    /// The last event of a watch that ends well.
    Completed {
        reason: CompletionReason,
        last_offset: u64,
        /// The expected channels that had not reported (with `WaitElapsed`).
        pending: Vec<Channel>,
    },
    /// The server is shutting down: resume elsewhere after `last_offset`.
    ShuttingDown {
        last_offset: u64,
    },
    /// The request was evicted (too many tracked requests), or expired and started again, while watched.
    Evicted {
        last_offset: u64,
    },
}

/// A watch in progress. Dropping it releases its subscription at once.
pub struct Watch {
    subscription: Subscription,
    /// Notifications taken from the record but not yet handed out.
    buffered: VecDeque<(u64, Vec<u8>)>,
    /// The offset of the last notification handed out.
    last_offset: u64,
    wait_until: Instant,
    next_heartbeat: Instant,
    limits: WatchLimits,
    finished: bool,
}

impl Watch {
    pub(crate) fn new(subscription: Subscription, limits: WatchLimits) -> Watch {
        let now = Instant::now();
        Watch {
            last_offset: subscription.cursor,
            subscription,
            buffered: VecDeque::new(),
            wait_until: now + limits.wait,
            next_heartbeat: now + limits.heartbeat,
            limits,
            finished: false,
        }
    }

    /// The next event; `None` after the last one.
    pub async fn next(&mut self) -> Option<WatchEvent> {
        if self.finished {
            return None;
        }
        let changed = self.subscription.changed.clone();
        loop {
            if let Some((offset, body)) = self.buffered.pop_front() {
                self.last_offset = offset;
                self.next_heartbeat = Instant::now() + self.limits.heartbeat;
                return Some(WatchEvent::Notification {
                    offset,
                    request_id: self.subscription.request_id.clone(),
                    body,
                });
            }
            if self.limits.shutdown.is_cancelled() {
                return self.finish(WatchEvent::ShuttingDown {
                    last_offset: self.last_offset,
                });
            }
            // Registered before looking, so that a change made after the look still wakes us.
            let notified = changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let snapshot = self.subscription.take();
            if !snapshot.notifications.is_empty() {
                self.buffered.extend(snapshot.notifications);
                continue;
            }
            if snapshot.gone {
                return self.finish(WatchEvent::Evicted {
                    last_offset: self.last_offset,
                });
            }
            if snapshot.pending.as_ref().is_some_and(Vec::is_empty) {
                return self.finish(WatchEvent::Completed {
                    reason: CompletionReason::AllChannelsReported,
                    last_offset: self.last_offset,
                    pending: Vec::new(),
                });
            }
            // One timer per watch: the next heartbeat or the end of the wait, whichever comes first.
            let wakes_for_heartbeat = self.next_heartbeat < self.wait_until;
            let timer = if wakes_for_heartbeat {
                self.next_heartbeat
            } else {
                self.wait_until
            };
            tokio::select! {
                () = &mut notified => {}
                () = tokio::time::sleep_until(timer) => {
                    if wakes_for_heartbeat {
                        self.next_heartbeat = Instant::now() + self.limits.heartbeat;
                        return Some(WatchEvent::Heartbeat { last_offset: self.last_offset });
                    }
                    return self.finish(WatchEvent::Completed {
                        reason: CompletionReason::WaitElapsed,
                        last_offset: self.last_offset,
                        pending: snapshot.pending.unwrap_or_default(),
                    });
                }
                () = self.limits.shutdown.cancelled() => {}
            }
        }
    }

    fn finish(&mut self, event: WatchEvent) -> Option<WatchEvent> {
        self.finished = true;
        Some(event)
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{hub, notification, query};
    use super::*;
    use crate::log::Consumer;

    fn offset(event: Option<WatchEvent>) -> u64 {
        match event {
            Some(WatchEvent::Notification { offset, .. }) => offset,
            other => panic!("expected a notification, got {other:?}"),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn replays_then_delivers_live_then_completes_when_every_channel_reported() {
        let hub = hub(600, 100);
        hub.apply(&query("r", &[Channel::Rcs, Channel::Sms], 1));
        hub.apply(&notification("r", Channel::Sms, 1, 2));
        let mut watch = hub.watch("r", 0, WatchLimits::for_tests());
        assert_eq!(offset(watch.next().await), 1);
        let publisher = {
            let hub = hub.clone();
            tokio::spawn(async move { hub.apply(&notification("r", Channel::Rcs, 2, 3)) })
        };
        assert_eq!(offset(watch.next().await), 2);
        publisher.await.unwrap();
        assert!(matches!(
            watch.next().await,
            Some(WatchEvent::Completed {
                reason: CompletionReason::AllChannelsReported,
                last_offset: 2,
                ..
            })
        ));
        assert!(watch.next().await.is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn after_offset_skips_what_the_caller_has() {
        let hub = hub(600, 100);
        for (i, channel) in [Channel::Sms, Channel::Rcs, Channel::Mms].into_iter().enumerate() {
            hub.apply(&notification("r", channel, i as u64 + 1, 1));
        }
        let mut watch = hub.watch("r", 2, WatchLimits::for_tests());
        assert_eq!(offset(watch.next().await), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn a_quiet_watch_sends_heartbeats_then_ends_when_its_wait_elapses() {
        let hub = hub(600, 100);
        hub.apply(&query("r", &[Channel::Sms, Channel::Rcs], 1));
        hub.apply(&notification("r", Channel::Sms, 1, 2));
        let limits = WatchLimits {
            wait: Duration::from_secs(40),
            ..WatchLimits::for_tests()
        };
        let mut watch = hub.watch("r", 1, limits);
        let started = Instant::now();
        assert!(matches!(
            watch.next().await,
            Some(WatchEvent::Heartbeat { last_offset: 1 })
        ));
        assert_eq!(started.elapsed(), Duration::from_secs(15));
        assert!(matches!(watch.next().await, Some(WatchEvent::Heartbeat { .. })));
        let Some(WatchEvent::Completed { reason, pending, .. }) = watch.next().await else {
            panic!("completion")
        };
        assert_eq!(reason, CompletionReason::WaitElapsed);
        assert_eq!(pending, [Channel::Rcs]);
        assert_eq!(started.elapsed(), Duration::from_secs(40));
    }

    #[tokio::test(start_paused = true)]
    async fn an_after_offset_beyond_anything_waits_without_overflowing() {
        let hub = hub(600, 100);
        hub.apply(&notification("r", Channel::Sms, 1, 1));
        let limits = WatchLimits {
            wait: Duration::from_secs(1),
            ..WatchLimits::for_tests()
        };
        let mut watch = hub.watch("r", u64::MAX, limits);
        assert!(matches!(
            watch.next().await,
            Some(WatchEvent::Completed {
                reason: CompletionReason::WaitElapsed,
                last_offset: u64::MAX,
                ..
            })
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn shutdown_ends_a_watch_with_its_last_offset() {
        let hub = hub(600, 100);
        hub.apply(&notification("r", Channel::Sms, 1, 1));
        let limits = WatchLimits::for_tests();
        let shutdown = limits.shutdown.clone();
        let mut watch = hub.watch("r", 0, limits);
        assert_eq!(offset(watch.next().await), 1);
        shutdown.cancel();
        assert!(matches!(
            watch.next().await,
            Some(WatchEvent::ShuttingDown { last_offset: 1 })
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn a_watched_request_evicted_ends_its_watch() {
        let hub = hub(600, 1);
        hub.apply(&notification("r", Channel::Sms, 1, 1));
        let mut watch = hub.watch("r", 0, WatchLimits::for_tests());
        assert_eq!(offset(watch.next().await), 1);
        hub.apply(&notification("newer", Channel::Sms, 1, 2));
        assert!(matches!(
            watch.next().await,
            Some(WatchEvent::Evicted { last_offset: 1 })
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn dropping_a_watch_frees_its_subscription_at_once() {
        let hub = hub(600, 100);
        hub.apply(&notification("r", Channel::Sms, 1, 1));
        let watch = hub.watch("r", 0, WatchLimits::for_tests());
        let key = hub.key("r");
        assert_eq!(hub.shard(key).records[&key].watchers, 1);
        drop(watch);
        assert_eq!(hub.shard(key).records[&key].watchers, 0);
    }
}
