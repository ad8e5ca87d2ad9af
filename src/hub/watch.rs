//! One watch of one request: replay, then live notifications, heartbeats on a quiet stream, and the end —
//! completion, the caller's wait, shutdown or eviction.

use std::{
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use futures::Stream;
use pin_project_lite::pin_project;
use tokio::{
    sync::futures::OwnedNotified,
    time::{Instant, Sleep},
};

use super::{Snapshot, Subscription};
use crate::capability::Channel;

/// The bounds of one watch.
#[derive(Debug, Clone)]
pub struct WatchLimits {
    /// How long to wait for the answer to be complete.
    pub wait: Duration,
    /// The longest quiet spell before a heartbeat.
    pub heartbeat: Duration,
    /// Whether the server's shutdown ends it ([`WatchEvent::ShuttingDown`]); a check's own wait outlasts it when
    /// results still come through Redis.
    pub ends_at_shutdown: bool,
}

#[cfg(test)]
impl WatchLimits {
    pub(crate) fn for_tests() -> WatchLimits {
        WatchLimits {
            wait: Duration::from_secs(60),
            heartbeat: Duration::from_secs(15),
            ends_at_shutdown: true,
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
        /// Handed out before the watch first caught up with what its request held: a replay, rather than a
        /// notification delivered as it arrived.
        replayed: bool,
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

pin_project! {
    /// A watch in progress, as a stream of [`WatchEvent`]s that ends after the last. Dropping it releases its
    /// subscription at once.
    ///
    /// Polled by hand rather than written as an `async fn` so that a waiting watch holds its one notification
    /// and its timer in place, with no step future's locals beside them: an idle watch is this struct alone
    /// (BENCHMARKS.md, issue 16). It waits on its record's change alone: shutdown comes that way too
    /// ([`Hub::close`](super::Hub::close)).
    pub struct Watch {
        // Its cursor is the offset of the last notification handed out.
        subscription: Subscription,
        // Its times, as milliseconds after `opened` (an `Instant` takes 16 bytes): the end of its wait, its next
        // heartbeat, and the heartbeat's period.
        opened: Instant,
        wait_until: u32,
        next_heartbeat: u32,
        heartbeat: u32,
        finished: bool,
        ends_at_shutdown: bool,
        // Whether it found nothing past its cursor once: what it hands out before is a replay.
        caught_up: bool,
        // Whether `changed` is registered and has not fired since: it must be before the record is read.
        armed: bool,
        #[pin]
        changed: OwnedNotified,
        // Set to the next heartbeat or the end of the wait, whichever comes first, when the watch first waits.
        #[pin]
        timer: Option<Sleep>,
    }
}

impl Watch {
    pub(crate) fn new(subscription: Subscription, limits: WatchLimits) -> Watch {
        let heartbeat = millis(limits.heartbeat).max(1);
        Watch {
            changed: subscription.changed.clone().notified_owned(),
            subscription,
            opened: Instant::now(),
            wait_until: millis(limits.wait),
            next_heartbeat: heartbeat,
            heartbeat,
            finished: false,
            ends_at_shutdown: limits.ends_at_shutdown,
            caught_up: false,
            armed: false,
            timer: None,
        }
    }
}

impl Stream for Watch {
    type Item = WatchEvent;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<WatchEvent>> {
        let mut this = self.project();
        if *this.finished {
            return Poll::Ready(None);
        }
        let (opened, heartbeat) = (*this.opened, *this.heartbeat);
        let heartbeat_from_now = || millis(opened.elapsed()).saturating_add(heartbeat);
        let mut finish = |event| {
            *this.finished = true;
            Poll::Ready(Some(event))
        };
        loop {
            // Registered before looking, so that a change (or the hub's closing) after the look still wakes us.
            if !*this.armed {
                this.changed.set(this.subscription.changed.clone().notified_owned());
                this.changed.as_mut().enable();
                *this.armed = true;
            }
            let last_offset = this.subscription.cursor;
            if *this.ends_at_shutdown && this.subscription.hub.is_closed() {
                return finish(WatchEvent::ShuttingDown { last_offset });
            }
            let pending = match this.subscription.take() {
                Snapshot::Notification(offset, body) => {
                    *this.next_heartbeat = heartbeat_from_now();
                    return Poll::Ready(Some(WatchEvent::Notification {
                        offset,
                        request_id: this.subscription.request_id.clone(),
                        body,
                        replayed: !*this.caught_up,
                    }));
                }
                Snapshot::Gone => return finish(WatchEvent::Evicted { last_offset }),
                Snapshot::Quiet { pending } => {
                    *this.caught_up = true;
                    pending
                }
            };
            if pending.as_ref().is_some_and(Vec::is_empty) {
                return finish(WatchEvent::Completed {
                    reason: CompletionReason::AllChannelsReported,
                    last_offset,
                    pending: Vec::new(),
                });
            }
            if this.changed.as_mut().poll(cx).is_ready() {
                *this.armed = false;
                continue;
            }
            // One timer per watch: the next heartbeat or the end of the wait, whichever comes first.
            let wakes_for_heartbeat = *this.next_heartbeat < *this.wait_until;
            let due = opened + Duration::from_millis((*this.next_heartbeat).min(*this.wait_until).into());
            match this.timer.as_mut().as_pin_mut() {
                Some(timer) if timer.deadline() == due => {}
                Some(timer) => timer.reset(due),
                None => this.timer.set(Some(tokio::time::sleep_until(due))),
            }
            let timer = this.timer.as_mut().as_pin_mut().expect("set just above");
            if timer.poll(cx).is_pending() {
                return Poll::Pending;
            }
            if wakes_for_heartbeat {
                *this.next_heartbeat = heartbeat_from_now();
                return Poll::Ready(Some(WatchEvent::Heartbeat { last_offset }));
            }
            return finish(WatchEvent::Completed {
                reason: CompletionReason::WaitElapsed,
                last_offset,
                pending: pending.unwrap_or_default(),
            });
        }
    }
}

/// `duration` in whole milliseconds, saturating: a watch's times fit (a wait is at most days).
fn millis(duration: Duration) -> u32 {
    u32::try_from(duration.as_millis()).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::super::tests::{hub, notification, query};
    use std::pin::pin;

    use futures::StreamExt;

    use super::*;
    use crate::log::{Consumer, Entry, QueryRecorded};

    /// The test limits with a wait of `wait`.
    fn waiting(wait: Duration) -> WatchLimits {
        WatchLimits {
            wait,
            ..WatchLimits::for_tests()
        }
    }

    /// How `watch` ends, past its heartbeats: its completion's reason and pending channels.
    async fn ending(mut watch: Pin<&mut Watch>) -> (CompletionReason, Vec<Channel>) {
        let ended = loop {
            match watch.next().await {
                Some(WatchEvent::Heartbeat { .. }) => continue,
                other => break other,
            }
        };
        let Some(WatchEvent::Completed { reason, pending, .. }) = ended else {
            panic!("completion, got {ended:?}")
        };
        (reason, pending)
    }

    /// A watch of "r" (SMS and MMS expected; SMS, MMS, WHATSAPP and `fourth` at 0, 30, 40 and 50 s, a retention of
    /// 60 s) that read offset 2 once the first result had expired, and offset 4 once the next two had.
    async fn past_two_gaps(hub: &Arc<super::super::Hub>, fourth: Channel) -> Pin<Box<Watch>> {
        hub.apply(&query("r", &[Channel::Sms, Channel::Mms], 0));
        hub.apply(&notification("r", Channel::Sms, 1, 0));
        hub.apply(&notification("r", Channel::Mms, 2, 30_000));
        hub.apply(&notification("r", Channel::Whatsapp, 3, 40_000));
        hub.apply(&notification("r", fourth, 4, 50_000));
        hub.advance(61_000);
        hub.purge();
        let mut watch = Box::pin(hub.watch("r", 0, waiting(Duration::from_secs(20))));
        assert_eq!(offset(watch.next().await), 2);
        hub.advance(101_000);
        hub.purge();
        assert_eq!(offset(watch.next().await), 4);
        watch
    }

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
        let mut watch = pin!(hub.watch("r", 0, WatchLimits::for_tests()));
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

    /// A question asked again under the same request_id (Sinch refused the first) replaces the channels the watch
    /// waits for, also by "not known in advance": a channel listed with two identities may report twice.
    #[tokio::test(start_paused = true)]
    async fn a_corrected_question_whose_channels_are_not_known_does_not_complete_at_the_first_result() {
        let hub = hub(600, 100);
        hub.apply(&query("r", &[Channel::Sms], 1));
        hub.apply(&Entry::Query {
            time_ms: 2,
            query: QueryRecorded {
                request_id: "r".into(),
                expected: None,
                asked_ms: 0,
                late: false,
            },
        });
        hub.apply(&notification("r", Channel::Sms, 1, 3));
        let mut watch = pin!(hub.watch("r", 0, waiting(Duration::from_secs(1))));
        assert_eq!(offset(watch.next().await), 1);
        let Some(WatchEvent::Completed { reason, .. }) = watch.next().await else {
            panic!("completion")
        };
        assert_eq!(reason, CompletionReason::WaitElapsed);
    }

    /// Of two questions of a request_id, the one asked later says its channels: the one the log holds last, but
    /// for a copy appended late (again after an outage, or once Redis took it after refusing it), which stands where
    /// it says — also where the hub's 32-bit copy of the time wraps round. The replicas' clocks never decide.
    #[tokio::test(start_paused = true)]
    async fn the_question_asked_last_says_the_channels() {
        let (sms, both) = (&[Channel::Sms][..], &[Channel::Sms, Channel::Rcs][..]);
        let question = |time_ms: u64, asked_ms: u64, late: bool, expected: &[Channel]| Entry::Query {
            time_ms,
            query: QueryRecorded {
                request_id: "r".into(),
                expected: Some(expected.to_vec()),
                asked_ms,
                late,
            },
        };
        for t in [1_796_685_666_772, (418 << 32) - 1] {
            let ahead = t + 600_000;
            for (case, questions) in [
                // The refused question, then its correction asked on a replica whose clock is behind.
                (
                    "in order",
                    vec![question(t, ahead, false, sms), question(t + 1, t - 1_000, false, both)],
                ),
                // The correction, then the refused question appended again, saying where it stood first.
                (
                    "appended again",
                    vec![question(t, t - 1, false, both), question(t + 1, t - 1, true, sms)],
                ),
                (
                    "both, then one again",
                    vec![
                        question(t, ahead, false, sms),
                        question(t + 1, t - 1_000, false, both),
                        question(t + 2, t, true, sms),
                    ],
                ),
                // Both appended again after Redis lost them, the later first.
                (
                    "lost",
                    vec![question(t + 5, t + 1, true, both), question(t + 6, t, true, sms)],
                ),
            ] {
                let hub = hub(600, 100);
                questions.iter().for_each(|q| hub.apply(q));
                hub.apply(&notification("r", Channel::Sms, 1, t + 7));
                let mut watch = pin!(hub.watch("r", 0, waiting(Duration::from_secs(1))));
                assert_eq!(offset(watch.next().await), 1);
                let Some(WatchEvent::Completed { reason, .. }) = watch.next().await else {
                    panic!("completion")
                };
                assert_eq!(
                    reason,
                    CompletionReason::WaitElapsed,
                    "{case} ({t}): RCS is still to come"
                );
            }
        }
    }

    /// A result gone with the retention is no longer reported: a watch that replays the rest is not told the
    /// answer is complete without it (a replica started after it went, which never read it, says the same).
    #[tokio::test(start_paused = true)]
    async fn a_channel_whose_result_expired_is_pending_again() {
        let hub = hub(60, 100);
        hub.apply(&query("r", &[Channel::Sms, Channel::Rcs], 0));
        hub.apply(&notification("r", Channel::Sms, 1, 0));
        hub.apply(&notification("r", Channel::Rcs, 2, 30_000));
        hub.advance(61_000);
        hub.purge();
        let mut watch = pin!(hub.watch("r", 0, waiting(Duration::from_secs(1))));
        assert_eq!(offset(watch.next().await), 2);
        let Some(WatchEvent::Completed { reason, pending, .. }) = watch.next().await else {
            panic!("completion")
        };
        assert_eq!((reason, pending), (CompletionReason::WaitElapsed, vec![Channel::Sms]));
    }

    /// A watch that passed expired results twice, reading one between, does not count the channel it read as
    /// lost when that result expires too: its two gaps were kept as one range, over the offset it read.
    #[tokio::test(start_paused = true)]
    async fn a_watch_that_passed_two_gaps_counts_what_it_read_between_as_read() {
        let hub = hub(60, 100);
        let mut watch = past_two_gaps(&hub, Channel::Sms).await;
        assert_eq!(
            ending(watch.as_mut()).await,
            (CompletionReason::AllChannelsReported, vec![])
        );
    }

    /// A channel lost in a watch's earlier gap, reported again and read by the watch, is read: it does not count as
    /// passed when that result expires too.
    #[tokio::test(start_paused = true)]
    async fn a_channel_lost_in_an_earlier_gap_and_read_since_is_read() {
        let hub = hub(60, 100);
        let mut watch = past_two_gaps(&hub, Channel::Rcs).await;
        hub.apply(&notification("r", Channel::Sms, 5, 102_000));
        assert_eq!(offset(watch.next().await), 5);
        hub.advance(163_000);
        hub.purge();
        assert_eq!(
            ending(watch.as_mut()).await,
            (CompletionReason::AllChannelsReported, vec![])
        );
    }

    /// A watch that passed an expired result but read the next one counts only the first as pending when the
    /// second expires too.
    #[tokio::test(start_paused = true)]
    async fn a_watch_counts_as_lost_only_the_results_it_did_not_read() {
        let hub = hub(60, 100);
        hub.apply(&query("r", &[Channel::Sms, Channel::Mms, Channel::Rcs], 0));
        hub.apply(&notification("r", Channel::Sms, 1, 0));
        hub.apply(&notification("r", Channel::Mms, 2, 30_000));
        hub.apply(&notification("r", Channel::Whatsapp, 3, 50_000));
        hub.advance(31_000);
        hub.purge();
        hub.advance(61_000);
        hub.purge();
        let mut watch = pin!(hub.watch("r", 0, waiting(Duration::from_secs(20))));
        assert_eq!(offset(watch.next().await), 2);
        assert_eq!(offset(watch.next().await), 3);
        hub.advance(91_000);
        hub.purge();
        assert_eq!(
            ending(watch).await,
            (CompletionReason::WaitElapsed, vec![Channel::Rcs, Channel::Sms])
        );
    }

    /// A watch that read a result before it expired still counts its channel.
    #[tokio::test(start_paused = true)]
    async fn a_channel_read_before_its_result_expired_stays_reported_to_its_watch() {
        let hub = hub(60, 100);
        hub.apply(&query("r", &[Channel::Sms, Channel::Mms, Channel::Rcs], 0));
        hub.apply(&notification("r", Channel::Sms, 1, 0));
        hub.apply(&notification("r", Channel::Mms, 2, 30_000));
        let mut watch = pin!(hub.watch("r", 0, waiting(Duration::from_secs(60))));
        assert_eq!(offset(watch.next().await), 1);
        assert_eq!(offset(watch.next().await), 2);
        hub.advance(61_000);
        hub.purge();
        hub.apply(&notification("r", Channel::Rcs, 3, 61_000));
        assert_eq!(offset(watch.next().await), 3);
        assert!(matches!(
            watch.next().await,
            Some(WatchEvent::Completed {
                reason: CompletionReason::AllChannelsReported,
                ..
            })
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn after_offset_skips_what_the_caller_has() {
        let hub = hub(600, 100);
        for (i, channel) in [Channel::Sms, Channel::Rcs, Channel::Mms].into_iter().enumerate() {
            hub.apply(&notification("r", channel, i as u64 + 1, 1));
        }
        let mut watch = pin!(hub.watch("r", 2, WatchLimits::for_tests()));
        assert_eq!(offset(watch.next().await), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn a_quiet_watch_sends_heartbeats_then_ends_when_its_wait_elapses() {
        let hub = hub(600, 100);
        hub.apply(&query("r", &[Channel::Sms, Channel::Rcs], 1));
        hub.apply(&notification("r", Channel::Sms, 1, 2));
        let mut watch = pin!(hub.watch("r", 1, waiting(Duration::from_secs(40))));
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
    async fn a_notification_puts_the_next_heartbeat_a_whole_period_after_it() {
        let hub = hub(600, 100);
        hub.apply(&query("r", &[Channel::Sms, Channel::Rcs], 1));
        let mut watch = pin!(hub.watch("r", 0, WatchLimits::for_tests()));
        let started = Instant::now();
        // Waiting, its timer set for the first heartbeat (15 s), when a notification comes at 10 s.
        assert!(
            tokio::time::timeout(Duration::from_secs(10), watch.next())
                .await
                .is_err()
        );
        hub.apply(&notification("r", Channel::Sms, 1, 2));
        assert_eq!(offset(watch.next().await), 1);
        assert!(matches!(
            watch.next().await,
            Some(WatchEvent::Heartbeat { last_offset: 1 })
        ));
        assert_eq!(started.elapsed(), Duration::from_secs(25));
    }

    #[tokio::test(start_paused = true)]
    async fn a_wait_of_zero_hands_out_what_is_held_then_ends_at_once() {
        let hub = hub(600, 100);
        hub.apply(&query("r", &[Channel::Sms, Channel::Rcs], 1));
        hub.apply(&notification("r", Channel::Sms, 1, 2));
        let mut watch = pin!(hub.watch("r", 0, waiting(Duration::ZERO)));
        let started = Instant::now();
        assert_eq!(offset(watch.next().await), 1);
        let Some(WatchEvent::Completed { reason, pending, .. }) = watch.next().await else {
            panic!("completion")
        };
        assert_eq!((reason, pending), (CompletionReason::WaitElapsed, vec![Channel::Rcs]));
        assert_eq!(started.elapsed(), Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn an_after_offset_beyond_anything_waits_without_overflowing() {
        let hub = hub(600, 100);
        hub.apply(&notification("r", Channel::Sms, 1, 1));
        let mut watch = pin!(hub.watch("r", u64::MAX, waiting(Duration::from_secs(1))));
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
    async fn closing_the_hub_ends_a_waiting_watch_and_later_ones_with_their_last_offset() {
        let hub = hub(600, 100);
        hub.apply(&notification("r", Channel::Sms, 1, 1));
        let mut watch = pin!(hub.watch("r", 0, WatchLimits::for_tests()));
        assert_eq!(offset(watch.next().await), 1);
        let closer = {
            let hub = hub.clone();
            tokio::spawn(async move { hub.close() })
        };
        assert!(matches!(
            watch.next().await,
            Some(WatchEvent::ShuttingDown { last_offset: 1 })
        ));
        closer.await.unwrap();
        let mut later = pin!(hub.watch("r", 1, WatchLimits::for_tests()));
        assert!(matches!(
            later.next().await,
            Some(WatchEvent::ShuttingDown { last_offset: 1 })
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn a_watched_request_evicted_ends_its_watch() {
        let hub = hub(600, 1);
        hub.apply(&notification("r", Channel::Sms, 1, 1));
        let mut watch = pin!(hub.watch("r", 0, WatchLimits::for_tests()));
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
        let key = hub.keys.of("r");
        assert_eq!(hub.shard(key).records[&key].watchers, 1);
        drop(watch);
        assert_eq!(hub.shard(key).records[&key].watchers, 0);
    }
}
