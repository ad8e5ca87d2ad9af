//! What every listener (gRPC, webhook, admin) does with the connections it accepts, before and beneath any
//! protocol:
//! - a cap on the connections open at once: past it a new connection is closed at once and counted
//!   (`capability_connections_refused_total{listener}`);
//! - a first-byte timeout: a connection that does not send its opening (the first [`OPENING`] bytes: an HTTP/2
//!   preface, a TLS hello, an HTTP/1.1 request head are all at least that long) in time is closed;
//! - an idle timeout: a connection with no request or stream in flight is closed (the protocol layer reports what
//!   is in flight through [`Activity::begin`]);
//! - on the HTTP ports, [`HeadCheck`] notices a request head carrying both `Content-Length` and
//!   `Transfer-Encoding` on the bytes as read (after TLS), because hyper drops the `Content-Length` before the
//!   request reaches a handler.
//!
//! A connection past its timeout reads as closed by the peer, so the server drops it as it would any closed one.

use std::{
    io,
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::{OwnedSemaphorePermit, Semaphore},
    time::{Instant, Sleep},
};

/// `AsyncWrite` for a wrapper of a stream, by writing to its `$field`: the wrappers here only watch what is read.
macro_rules! write_through {
    ($wrapper:ty, $field:ident $(, $param:ident)?) => {
        impl$(<$param: AsyncWrite + Unpin>)? AsyncWrite for $wrapper {
            fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
                Pin::new(&mut self.$field).poll_write(cx, buf)
            }

            fn poll_write_vectored(
                mut self: Pin<&mut Self>,
                cx: &mut Context<'_>,
                bufs: &[io::IoSlice<'_>],
            ) -> Poll<io::Result<usize>> {
                Pin::new(&mut self.$field).poll_write_vectored(cx, bufs)
            }

            fn is_write_vectored(&self) -> bool {
                self.$field.is_write_vectored()
            }

            fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
                Pin::new(&mut self.$field).poll_flush(cx)
            }

            fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
                Pin::new(&mut self.$field).poll_shutdown(cx)
            }
        }
    };
}

/// How many bytes a peer must send within the first-byte timeout: the length of the HTTP/2 client preface.
pub const OPENING: usize = 24;

/// How a listener treats its connections.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    /// A connection that sends nothing for this long is closed.
    pub first_byte: Duration,
    /// A connection with nothing in flight for this long is closed.
    pub idle: Duration,
    /// Connections open at once.
    pub max_connections: usize,
}

/// A listener that enforces [`ConnectionLimits`] on what it accepts.
pub struct GuardedListener {
    listener: TcpListener,
    permits: Arc<Semaphore>,
    limits: ConnectionLimits,
    /// The `listener` label of its metrics: `grpc`, `webhook` or `admin`.
    name: &'static str,
}

impl GuardedListener {
    pub fn new(listener: TcpListener, limits: ConnectionLimits, name: &'static str) -> GuardedListener {
        GuardedListener {
            listener,
            permits: Arc::new(Semaphore::new(limits.max_connections.min(Semaphore::MAX_PERMITS))),
            limits,
            name,
        }
    }

    /// The next connection within the cap; those beyond it are closed at once and counted.
    pub async fn accept(&self) -> Guarded {
        loop {
            let (stream, remote) = match self.listener.accept().await {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors, most likely: pause rather than spin.
                    tracing::warn!(listener = self.name, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let Ok(permit) = self.permits.clone().try_acquire_owned() else {
                metrics::counter!("capability_connections_refused_total", "listener" => self.name).increment(1);
                drop(stream);
                continue;
            };
            let _ = stream.set_nodelay(true);
            return Guarded::new(stream, remote, self.limits, permit, self.name);
        }
    }
}

/// What a connection has in flight, as its protocol layer reports it.
#[derive(Debug)]
pub struct Activity {
    /// Distinguishes the connection from every other of this process.
    id: u64,
    /// Requests or streams in flight.
    active: AtomicUsize,
    /// When the connection was accepted.
    opened: Instant,
    /// Since when nothing has been in flight, in nanoseconds after `opened` (an atomic: read on every poll).
    quiet_since: AtomicU64,
    /// Whether a request head with both `Content-Length` and `Transfer-Encoding` was read (HTTP/1.1).
    ambiguous_length: AtomicBool,
}

impl Activity {
    fn new() -> Activity {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        Activity {
            id: NEXT.fetch_add(1, Ordering::Relaxed),
            active: AtomicUsize::new(0),
            opened: Instant::now(),
            quiet_since: AtomicU64::new(0),
            ambiguous_length: AtomicBool::new(false),
        }
    }

    /// The connection's number, unique in this process.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// A request or stream begins; it ends when the returned guard is dropped.
    pub fn begin(self: &Arc<Self>) -> Busy {
        self.active.fetch_add(1, Ordering::SeqCst);
        Busy(self.clone())
    }

    /// Whether a request head read on this connection carried both `Content-Length` and `Transfer-Encoding`.
    pub fn ambiguous_length(&self) -> bool {
        self.ambiguous_length.load(Ordering::SeqCst)
    }

    /// When the connection is due to be closed for idleness; `None` while something is in flight.
    fn idle_deadline(&self, idle: Duration) -> Option<Instant> {
        (self.active.load(Ordering::SeqCst) == 0)
            .then(|| self.opened + Duration::from_nanos(self.quiet_since.load(Ordering::SeqCst)) + idle)
    }
}

/// One request or stream in flight on a connection.
#[derive(Debug)]
pub struct Busy(Arc<Activity>);

impl Drop for Busy {
    fn drop(&mut self) {
        // The time first, then the count: whoever sees nothing in flight also sees when that began.
        let quiet_since = u64::try_from(self.0.opened.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.0.quiet_since.fetch_max(quiet_since, Ordering::SeqCst);
        self.0.active.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A response body that keeps its request counted as in flight until it is sent or dropped.
pub struct BusyBody<B> {
    inner: B,
    _busy: Busy,
}

impl<B> BusyBody<B> {
    pub fn new(inner: B, busy: Busy) -> BusyBody<B> {
        BusyBody { inner, _busy: busy }
    }
}

impl<B: Body<Data = Bytes> + Unpin> Body for BusyBody<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// An accepted connection under its listener's limits; frees its place under the cap when dropped.
pub struct Guarded {
    stream: TcpStream,
    remote: SocketAddr,
    activity: Arc<Activity>,
    limits: ConnectionLimits,
    accepted: Instant,
    /// How many bytes the peer sent, counted up to [`OPENING`].
    received: usize,
    timer: Pin<Box<Sleep>>,
    listener: &'static str,
    _permit: OwnedSemaphorePermit,
}

impl Guarded {
    fn new(
        stream: TcpStream,
        remote: SocketAddr,
        limits: ConnectionLimits,
        permit: OwnedSemaphorePermit,
        listener: &'static str,
    ) -> Guarded {
        let accepted = Instant::now();
        Guarded {
            stream,
            remote,
            activity: Arc::new(Activity::new()),
            limits,
            accepted,
            received: 0,
            timer: Box::pin(tokio::time::sleep_until(accepted + limits.first_byte)),
            listener,
            _permit: permit,
        }
    }

    /// The peer's address.
    pub fn remote(&self) -> SocketAddr {
        self.remote
    }

    /// What is in flight on this connection.
    pub fn activity(&self) -> &Arc<Activity> {
        &self.activity
    }

    /// When the connection is due to be closed; `None` while a request or stream is in flight.
    fn deadline(&self) -> Option<Instant> {
        let idle = self.activity.idle_deadline(self.limits.idle)?;
        Some(if self.opened() {
            idle
        } else {
            self.accepted + self.limits.first_byte
        })
    }

    /// Whether the peer sent its opening.
    fn opened(&self) -> bool {
        self.received >= OPENING
    }
}

impl AsyncRead for Guarded {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let before = buf.filled().len();
        if let Poll::Ready(result) = Pin::new(&mut this.stream).poll_read(cx, buf) {
            this.received = (this.received + (buf.filled().len() - before)).min(OPENING);
            return Poll::Ready(result);
        }
        // Waiting for the peer: close the connection once it is past its deadline, else wake at the deadline (or,
        // while something is in flight, after an idle spell, to look again).
        loop {
            let now = Instant::now();
            let deadline = match this.deadline() {
                Some(deadline) if deadline <= now => {
                    let reason = if this.opened() { "idle" } else { "silent" };
                    metrics::counter!("capability_connections_timed_out_total", "listener" => this.listener,
                        "reason" => reason)
                    .increment(1);
                    return Poll::Ready(Ok(()));
                }
                Some(deadline) => deadline,
                // Something is in flight: look again at the timer's deadline, or after an idle spell.
                None if this.timer.deadline() > now => this.timer.deadline(),
                None => now + this.limits.idle,
            };
            if this.timer.deadline() != deadline {
                this.timer.as_mut().reset(deadline);
            }
            if this.timer.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
        }
    }
}

write_through!(Guarded, stream);

/// An HTTP connection's bytes, as read, checked for request heads with both `Content-Length` and
/// `Transfer-Encoding`: [`Activity::ambiguous_length`] then says so.
pub struct HeadCheck<I> {
    inner: I,
    activity: Arc<Activity>,
    head: HeadScan,
}

impl<I> HeadCheck<I> {
    pub fn new(inner: I, activity: Arc<Activity>) -> HeadCheck<I> {
        HeadCheck {
            inner,
            activity,
            head: HeadScan::default(),
        }
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for HeadCheck<I> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let before = buf.filled().len();
        let result = Pin::new(&mut this.inner).poll_read(cx, buf);
        if this.head.scan(&buf.filled()[before..]) {
            this.activity.ambiguous_length.store(true, Ordering::SeqCst);
        }
        result
    }
}

write_through!(HeadCheck<I>, inner, I);

/// Finds, in the bytes of an HTTP/1.1 connection, a header block (lines up to an empty line) holding both a
/// `Content-Length` and a `Transfer-Encoding` line. It looks only at the start of each line, so a body, which a
/// JSON endpoint's cannot hold raw line breaks, does not matter unless it imitates header lines itself. Every
/// byte a connection reads passes through it: lines are found with `memchr`, and only their first bytes are
/// looked at.
#[derive(Debug, Default)]
struct HeadScan {
    /// The first bytes of the current line read so far (up to the longer header's name), `\r` left out: empty
    /// while the line holds nothing else.
    line: Vec<u8>,
    content_length: bool,
    transfer_encoding: bool,
}

impl HeadScan {
    const CONTENT_LENGTH: &'static [u8] = b"content-length:";
    const TRANSFER_ENCODING: &'static [u8] = b"transfer-encoding:";

    /// Scans `bytes`; true when a header block with both headers ended in them.
    fn scan(&mut self, mut bytes: &[u8]) -> bool {
        let mut found = false;
        loop {
            let end = memchr::memchr(b'\n', bytes);
            let Some(end) = end else {
                self.extend_line(bytes);
                return found;
            };
            found |= match self.whole_line(&bytes[..end]) {
                Some(content) => self.end_content(content),
                None => {
                    self.extend_line(&bytes[..end]);
                    self.end_line()
                }
            };
            bytes = &bytes[end + 1..];
        }
    }

    /// A line read whole (its start in the same read as its end) without a `\r` but at its end, as it almost
    /// always is: its content, looked at where it lies instead of copied.
    fn whole_line<'b>(&self, line: &'b [u8]) -> Option<&'b [u8]> {
        if !self.line.is_empty() {
            return None;
        }
        let content = line.strip_suffix(b"\r").unwrap_or(line);
        memchr::memchr(b'\r', content).is_none().then_some(content)
    }

    /// Takes more of the current line.
    fn extend_line(&mut self, part: &[u8]) {
        let room = Self::TRANSFER_ENCODING.len().saturating_sub(self.line.len());
        self.line.extend(part.iter().filter(|&&byte| byte != b'\r').take(room));
    }

    /// Ends the current line, read in pieces.
    fn end_line(&mut self) -> bool {
        let line = std::mem::take(&mut self.line);
        let found = self.end_content(&line);
        self.line = line;
        self.line.clear();
        found
    }

    /// Ends a line whose content (or its start, up to the longer header's name) is `content`; true when it was
    /// the empty line that ends a header block with both headers.
    fn end_content(&mut self, content: &[u8]) -> bool {
        if content.is_empty() {
            let found = self.content_length && self.transfer_encoding;
            (self.content_length, self.transfer_encoding) = (false, false);
            return found;
        }
        let starts = |name: &[u8]| {
            content
                .get(..name.len())
                .is_some_and(|start| start.eq_ignore_ascii_case(name))
        };
        self.content_length |= starts(Self::CONTENT_LENGTH);
        self.transfer_encoding |= starts(Self::TRANSFER_ENCODING);
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_head_with_both_lengths_is_found_across_reads() {
        let mut scan = HeadScan::default();
        assert!(!scan.scan(b"POST / HTTP/1.1\r\nContent-Length: 5\r\nTransfer-"));
        assert!(scan.scan(b"Encoding: chunked\r\n\r\n0\r\n\r\n"));
        let mut scan = HeadScan::default();
        assert!(!scan.scan(b"POST / HTTP/1.1\r\ncontent-length: 2\r\n\r\n{}POST / HTTP/1.1\r\n"));
        assert!(!scan.scan(b"transfer-encoding: chunked\r\n\r\n0\r\n\r\n"));
        assert!(!scan.scan(b"GET / HTTP/1.1\r\nx-content-length: 1\r\ntransfer-encoding: chunked\r\n\r\n"));
    }

    #[test]
    fn a_head_split_anywhere_is_found_whatever_the_case_and_a_long_line_between() {
        let head = b"POST /webhooks/sinch HTTP/1.1\r\nX-Long: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\nCONTENT-LENGTH: 5\r\nTransfer-Encoding: chunked\r\n\r\n";
        for split in 0..=head.len() {
            let mut scan = HeadScan::default();
            let first = scan.scan(&head[..split]);
            assert!(first || scan.scan(&head[split..]), "split at {split}");
        }
        let mut scan = HeadScan::default();
        assert!(!scan.scan(b"POST / HTTP/1.1\r\nContent-Length: 5\r\n\r\nTransfer-Encoding: chunked\r\n\r\n"));
    }
}
