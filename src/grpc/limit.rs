//! Every request message's size, read from its length prefix as its bytes arrive: a message over its method's
//! limit is refused at once, before it is waited for, buffered and decoded. tonic's own limit is one per service
//! (StartBulkCheck's 24 MiB, so a QueryCapability could make the service buffer and decode 24 MiB), and a decoded
//! message's size leaves out the fields this service does not know.

use std::{
    pin::Pin,
    task::{Context, Poll, ready},
};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tonic::Status;

use super::{MAX_BULK_MESSAGE, MAX_MESSAGE, status};
use crate::telemetry::registered;

/// The one method that takes messages over [`MAX_MESSAGE`].
const START_BULK_CHECK: &str = "/capability.v1.CapabilityService/StartBulkCheck";

/// The largest message the method at `path` takes.
pub(super) fn limit_for(path: &str) -> usize {
    if path == START_BULK_CHECK {
        MAX_BULK_MESSAGE
    } else {
        MAX_MESSAGE
    }
}

/// Where a request body is in gRPC's framing: before each message, a compression flag and its length in 4 bytes,
/// big-endian.
#[derive(Debug)]
struct Framing {
    limit: usize,
    prefix: [u8; 5],
    /// How many bytes of the next prefix have arrived.
    seen: usize,
    /// How many bytes of the current message are still to come.
    rest: usize,
}

impl Framing {
    fn new(limit: usize) -> Self {
        Framing {
            limit,
            prefix: [0; 5],
            seen: 0,
            rest: 0,
        }
    }

    /// Follows the next bytes of the body; `Err` with the size a message announced over the limit.
    fn follow(&mut self, mut bytes: &[u8]) -> Result<(), usize> {
        while let Some((&first, after)) = bytes.split_first() {
            if self.rest > 0 {
                let taken = self.rest.min(bytes.len());
                self.rest -= taken;
                bytes = &bytes[taken..];
                continue;
            }
            self.prefix[self.seen] = first;
            self.seen += 1;
            bytes = after;
            if self.seen == self.prefix.len() {
                self.seen = 0;
                let [_, length @ ..] = self.prefix;
                let length = u32::from_be_bytes(length) as usize;
                if length > self.limit {
                    return Err(length);
                }
                self.rest = length;
            }
        }
        Ok(())
    }
}

/// A request body whose messages are held to a limit: the first announced over it ends the body with
/// RESOURCE_EXHAUSTED (`MESSAGE_TOO_LARGE`), the error tonic answers the call with (reflection's stream, which
/// ends quietly on a request's error, excepted), counted in `capability_grpc_messages_too_large_total`: such a
/// call never reaches its handler, nor the handler's own counters.
pub(super) struct Limited<B> {
    inner: B,
    framing: Framing,
    /// The size of the message refused, once one was.
    refused: Option<usize>,
}

impl<B> Limited<B> {
    pub(super) fn new(inner: B, limit: usize) -> Self {
        Limited {
            inner,
            framing: Framing::new(limit),
            refused: None,
        }
    }
}

impl<B: Body<Data = Bytes, Error = Status> + Unpin> Body for Limited<B> {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        if self.refused.is_none() {
            let frame = ready!(Pin::new(&mut self.inner).poll_frame(cx));
            let data = frame.as_ref().and_then(|f| f.as_ref().ok()).and_then(Frame::data_ref);
            match data.map(|data| self.framing.follow(data)) {
                Some(Err(size)) => {
                    registered!(Counter, "capability_grpc_messages_too_large_total").increment(1);
                    self.refused = Some(size);
                }
                _ => return Poll::Ready(frame),
            }
        }
        let size = self.refused.unwrap_or_default();
        Poll::Ready(Some(Err(status::too_large(size, self.framing.limit))))
    }

    fn is_end_stream(&self) -> bool {
        self.refused.is_none() && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(length: u32) -> Vec<u8> {
        let mut framed = vec![0];
        framed.extend_from_slice(&length.to_be_bytes());
        framed.resize(framed.len() + length as usize, 7);
        framed
    }

    /// Two messages within the limit, then one over it; split at every byte, the verdict is the same.
    #[test]
    fn a_message_over_the_limit_is_found_however_the_body_is_cut() {
        let mut body = message(10);
        body.extend(message(0));
        body.extend(message(10));
        body.extend_from_slice(&[0, 0, 0, 0, 11]);
        for cut in 0..=body.len() {
            let mut framing = Framing::new(10);
            let (first, second) = body.split_at(cut);
            let verdict = framing.follow(first).and_then(|()| framing.follow(second));
            assert_eq!(verdict, Err(11), "cut at {cut}");
        }
        let mut framing = Framing::new(10);
        assert_eq!(framing.follow(&body[..body.len() - 5]), Ok(()));
    }

    #[test]
    fn only_start_bulk_check_takes_the_larger_limit() {
        assert_eq!(limit_for(START_BULK_CHECK), MAX_BULK_MESSAGE);
        assert_eq!(
            limit_for("/capability.v1.CapabilityService/QueryCapability"),
            MAX_MESSAGE
        );
        assert_eq!(
            limit_for("/capability.v1.CapabilityService/StartBulkCheckX"),
            MAX_MESSAGE
        );
    }
}
