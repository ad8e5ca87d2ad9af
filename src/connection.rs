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
        atomic::{AtomicU64, AtomicUsize, Ordering},
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
    /// The number (from 1) of the request whose head carried both `Content-Length` and `Transfer-Encoding`
    /// (HTTP/1.1); 0 while none has.
    ambiguous_head: AtomicU64,
    /// HTTP/1.1 requests handed to the service so far, numbered as the scan numbers their heads (one at a time:
    /// hyper serves a connection's requests in order).
    requests: AtomicU64,
}

impl Activity {
    fn new() -> Activity {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        Activity {
            id: NEXT.fetch_add(1, Ordering::Relaxed),
            active: AtomicUsize::new(0),
            opened: Instant::now(),
            quiet_since: AtomicU64::new(0),
            ambiguous_head: AtomicU64::new(0),
            requests: AtomicU64::new(0),
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

    /// Counts a request handed to the service; true when its own head carried both `Content-Length` and
    /// `Transfer-Encoding` (hyper closes the connection after it). The count lives here, with the connection: the
    /// service is cloned for every request.
    pub fn ambiguous_request(&self) -> bool {
        let number = self.requests.fetch_add(1, Ordering::SeqCst) + 1;
        self.ambiguous_head.load(Ordering::SeqCst) == number
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
/// `Transfer-Encoding`: [`Activity::ambiguous_request`] then says, for each request, whether it was that one.
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
        if let Some(request) = this.head.scan(&buf.filled()[before..]) {
            this.activity.ambiguous_head.store(request, Ordering::SeqCst);
        }
        result
    }
}

write_through!(HeadCheck<I>, inner, I);

/// Follows the requests of an HTTP/1.1 connection through its bytes — each head line by line, then its body by
/// its `Content-Length` or its chunks — and finds a head holding both a `Content-Length` and a
/// `Transfer-Encoding` line. A body is skipped, never read as lines: whatever it imitates, it is not the next
/// request's head. A line read whole is looked at where it lies; of a line split across reads only its first bytes
/// are kept, a length's without what pads it. A connection that opens with the HTTP/2 preface, or whose framing
/// hyper would refuse (and close it for), is not followed further.
#[derive(Debug, Default)]
struct HeadScan {
    at: Framing,
    /// The first bytes of the current line read so far, `\r` left out.
    line: Vec<u8>,
    /// Whether the current line, split across reads, had more than was kept.
    cut: bool,
    /// Whether the last byte of the current line read so far, split across reads, was a `\r`.
    cr_last: bool,
    /// In the trailers, whether a line ended with `\r\n` last: hyper ends a line of them only so, and the trailers
    /// at a `\r\n` that starts a line.
    trailers_line_start: bool,
    /// The current head's `Content-Length`, and whether it has a `Transfer-Encoding`.
    content_length: Length,
    transfer_encoding: bool,
    /// Heads read whole so far.
    heads: u64,
    /// Whether the current head's request line was read.
    request_line: bool,
}

/// A head's `Content-Length`, as far as the scan knows it.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum Length {
    #[default]
    Absent,
    Known(u64),
    /// Present, but not a number the scan read (not one, cut, or two that differ).
    Unknown,
}

/// Where a connection's bytes are.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum Framing {
    /// A head's lines.
    #[default]
    Head,
    /// So many bytes of a body left.
    Body(u64),
    /// A chunk's size line.
    ChunkSize,
    /// So many bytes of a chunk left.
    Chunk(u64),
    /// The line end after a chunk's bytes.
    ChunkEnd,
    /// The trailer lines after the last chunk, to the `\r\n` that starts a line.
    Trailers,
    /// Not followed: HTTP/2, or framing hyper refuses (it closes the connection).
    Off,
}

impl HeadScan {
    const CONTENT_LENGTH: &'static [u8] = b"content-length:";
    const TRANSFER_ENCODING: &'static [u8] = b"transfer-encoding:";
    /// The bytes kept of a line split across reads: a header's name, or a length as [`HeadScan::push_length`]
    /// keeps it (a length hyper takes is at most 20 digits).
    const KEPT: usize = 64;

    /// Scans `bytes`; the number (from 1) of the request whose head has both headers, when it ended in them.
    fn scan(&mut self, mut bytes: &[u8]) -> Option<u64> {
        let mut found = None;
        while !bytes.is_empty() {
            match self.at {
                Framing::Off => break,
                Framing::Body(left) | Framing::Chunk(left) => {
                    let skipped = (bytes.len() as u64).min(left);
                    bytes = &bytes[skipped as usize..];
                    self.at = match (self.at, left - skipped) {
                        (Framing::Body(_), 0) => Framing::Head,
                        (Framing::Body(_), left) => Framing::Body(left),
                        (_, 0) => Framing::ChunkEnd,
                        (_, left) => Framing::Chunk(left),
                    };
                }
                _ => {
                    let Some(end) = memchr::memchr(b'\n', bytes) else {
                        self.extend_line(bytes);
                        break;
                    };
                    let whole = self
                        .line
                        .is_empty()
                        .then(|| bytes[..end].strip_suffix(b"\r").unwrap_or(&bytes[..end]));
                    // A line read whole without a `\r` but at its end, as it almost always is, is looked at where
                    // it lies instead of copied.
                    let crlf = match end {
                        0 => self.cr_last,
                        _ => bytes[end - 1] == b'\r',
                    };
                    match whole.filter(|line| memchr::memchr(b'\r', line).is_none()) {
                        Some(content) => found = found.or(self.end_line(content, crlf)),
                        None => {
                            self.extend_line(&bytes[..end]);
                            let line = std::mem::take(&mut self.line);
                            found = found.or(self.end_line(&line, crlf));
                            self.line = line;
                            self.line.clear();
                        }
                    }
                    (self.cut, self.cr_last) = (false, false);
                    bytes = &bytes[end + 1..];
                }
            }
        }
        found
    }

    /// Takes more of the current line.
    fn extend_line(&mut self, part: &[u8]) {
        if let Some(&last) = part.last() {
            self.cr_last = last == b'\r';
        }
        for byte in part.iter().copied().filter(|&byte| byte != b'\r') {
            let length = match self.at {
                Framing::ChunkSize => Some(0),
                _ => Self::named(&self.line, Self::CONTENT_LENGTH).map(|_| Self::CONTENT_LENGTH.len()),
            };
            match length {
                // Nothing of a chunk's extension is kept (a length with a `;` is no number either way).
                Some(start) if memchr::memchr(b';', &self.line[start..]).is_some() => return,
                _ if self.line.len() >= Self::KEPT => {
                    self.cut = true;
                    return;
                }
                Some(start) => self.push_length(start, byte),
                None => self.line.push(byte),
            }
        }
    }

    /// Keeps `byte` of a length's line, whose length starts at `start`, in a few bytes however it is padded,
    /// read as hyper reads it: a run of spaces and tabs as one, the zeros before a length's first other digit
    /// left out.
    fn push_length(&mut self, start: usize, byte: u8) {
        let blank = |byte: u8| byte == b' ' || byte == b'\t';
        let length = &self.line[start..];
        if blank(byte) && length.last().is_some_and(|&last| blank(last)) {
            return;
        }
        if byte.is_ascii_hexdigit() && length.trim_ascii_start() == b"0" {
            self.line.pop();
        }
        self.line.push(byte);
    }

    /// What follows `name` in `line`, when `line` starts with it (in any case).
    fn named<'l>(line: &'l [u8], name: &[u8]) -> Option<&'l [u8]> {
        let start = line.get(..name.len())?;
        start.eq_ignore_ascii_case(name).then(|| &line[name.len()..])
    }

    /// A length as hyper reads one: digits (in `radix`) only, spaces and tabs around them left out.
    fn number(text: &[u8], radix: u32) -> Option<u64> {
        let text = text.trim_ascii();
        if text.is_empty() {
            return None;
        }
        text.iter().try_fold(0u64, |n, &b| {
            let digit = u64::from(char::from(b).to_digit(radix)?);
            n.checked_mul(u64::from(radix))?.checked_add(digit)
        })
    }

    /// Ends a line whose content (or its first bytes) is `content`, ended by `\r\n` when `crlf`, where the
    /// framing says a line is; the request's number when it was the empty line that ends a head with both headers.
    fn end_line(&mut self, content: &[u8], crlf: bool) -> Option<u64> {
        match self.at {
            Framing::Head => return self.end_head_line(content),
            Framing::ChunkSize => {
                // Only a size cut short is unknown: extensions after it may run long (hyper takes 16 KiB).
                let (size, extended) = match memchr::memchr(b';', content) {
                    Some(at) => (&content[..at], true),
                    None => (content, false),
                };
                self.at = match Self::number(size, 16).filter(|_| extended || !self.cut) {
                    Some(0) => {
                        self.trailers_line_start = true;
                        Framing::Trailers
                    }
                    Some(size) => Framing::Chunk(size),
                    None => Framing::Off,
                };
            }
            Framing::ChunkEnd => self.at = Framing::ChunkSize,
            Framing::Trailers if content.is_empty() && crlf && self.trailers_line_start => self.at = Framing::Head,
            Framing::Trailers => self.trailers_line_start = crlf,
            _ => {}
        }
        None
    }

    /// A line of a head.
    fn end_head_line(&mut self, content: &[u8]) -> Option<u64> {
        if !self.request_line {
            // Empty lines before a request line are ignored (RFC 9112, section 2.2), as hyper does.
            if !content.is_empty() {
                self.request_line = true;
                if self.heads == 0 && content == b"PRI * HTTP/2.0" {
                    self.at = Framing::Off;
                }
            }
            return None;
        }
        if content.is_empty() {
            self.heads += 1;
            self.request_line = false;
            let length = std::mem::take(&mut self.content_length);
            let chunked = std::mem::take(&mut self.transfer_encoding);
            self.at = match (length, chunked) {
                // hyper answers it and closes the connection: nothing after it is a request.
                (Length::Known(_) | Length::Unknown, true) => {
                    self.at = Framing::Off;
                    return Some(self.heads);
                }
                (Length::Absent, true) => Framing::ChunkSize,
                (Length::Known(0) | Length::Absent, false) => Framing::Head,
                (Length::Known(length), false) => Framing::Body(length),
                // Refused by hyper, which closes the connection; or padded past what was kept.
                (Length::Unknown, false) => Framing::Off,
            };
            return None;
        }
        if let Some(value) = Self::named(content, Self::CONTENT_LENGTH) {
            let read = Self::number(value, 10).filter(|_| !self.cut);
            self.content_length = match (self.content_length, read) {
                (Length::Absent, Some(length)) => Length::Known(length),
                (Length::Known(earlier), Some(length)) if earlier == length => Length::Known(length),
                _ => Length::Unknown,
            };
        }
        self.transfer_encoding |= Self::named(content, Self::TRANSFER_ENCODING).is_some();
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Asserts that the scan of `connection` finds request number `ambiguous` however its bytes are split between
    /// two reads.
    fn found_however_split(connection: &[u8], ambiguous: u64) {
        for split in 0..=connection.len() {
            let mut scan = HeadScan::default();
            let (a, b) = connection.split_at(split);
            let found = scan.scan(a).or_else(|| scan.scan(b));
            assert_eq!(
                found,
                Some(ambiguous),
                "split at {split}: {:?}",
                String::from_utf8_lossy(connection)
            );
        }
    }

    #[test]
    fn a_head_with_both_lengths_is_found_across_reads() {
        let mut scan = HeadScan::default();
        assert_eq!(scan.scan(b"POST / HTTP/1.1\r\nContent-Length: 5\r\nTransfer-"), None);
        assert_eq!(scan.scan(b"Encoding: chunked\r\n\r\n0\r\n\r\n"), Some(1));
        let mut scan = HeadScan::default();
        assert_eq!(
            scan.scan(b"POST / HTTP/1.1\r\ncontent-length: 2\r\n\r\n{}POST / HTTP/1.1\r\n"),
            None
        );
        assert_eq!(scan.scan(b"transfer-encoding: chunked\r\n\r\n0\r\n\r\n"), None);
        assert_eq!(
            scan.scan(b"GET / HTTP/1.1\r\nx-content-length: 1\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n"),
            None
        );
        assert_eq!(
            scan.scan(b"POST / HTTP/1.1\r\ncontent-length: 1\r\ntransfer-encoding: chunked\r\n\r\n"),
            Some(4)
        );
    }

    #[test]
    fn a_head_split_anywhere_is_found_whatever_the_case_and_a_long_line_between() {
        let head = b"POST /webhooks/sinch HTTP/1.1\r\nX-Long: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\nCONTENT-LENGTH: 5\r\nTransfer-Encoding: chunked\r\n\r\n";
        found_however_split(head, 1);
    }

    /// A body, by its length or its chunks, is skipped: what it imitates is not the next request's head.
    #[test]
    fn bodies_are_not_heads() {
        let imitation = "{}\ncontent-length: 1\ntransfer-encoding: chunked\n\n";
        let by_length = format!(
            "POST / HTTP/1.1\r\nContent-Length: {}\r\n\r\n{imitation}",
            imitation.len()
        );
        let chunked = format!(
            "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n{:x};ext=1\r\n{imitation}\r\n3\r\n\r\n\n\r\n0\r\nx-trailer: 1\r\n\r\n",
            imitation.len()
        );
        let next = "POST / HTTP/1.1\r\ncontent-length: 2\r\n\r\n{}";
        let both = "POST / HTTP/1.1\r\ncontent-length: 2\r\ntransfer-encoding: chunked\r\n\r\n";
        for first in [&by_length, &chunked] {
            found_however_split(format!("{first}{next}{both}").as_bytes(), 3);
        }
    }

    /// A length hyper reads whatever pads it (spaces, zeros), and a `Content-Length` that is not a number beside
    /// a `Transfer-Encoding`, leave the scan where hyper is, read whole or split anywhere.
    #[test]
    fn padded_and_unreadable_lengths_are_read_as_hyper_reads_them() {
        let spaces = " ".repeat(100);
        let zeros = "0".repeat(100);
        let connections = [
            // Padded with spaces, beside a Transfer-Encoding: the first request.
            (
                format!("POST / HTTP/1.1\r\nContent-Length:{spaces}5\r\nTransfer-Encoding: chunked\r\n\r\n"),
                1,
            ),
            // A Transfer-Encoding, then a Content-Length hyper skips without reading it.
            (
                "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: x\r\n\r\n".to_owned(),
                1,
            ),
            // Zeros before a length and a chunk size: the bodies end where hyper ends them.
            (
                format!(
                    "POST / HTTP/1.1\r\nContent-Length: {zeros}2\r\n\r\n{{}}\
                     POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n{zeros}2\r\n{{}}\r\n0\r\n\r\n\
                     POST / HTTP/1.1\r\ncontent-length: 1\r\ntransfer-encoding: chunked\r\n\r\n"
                ),
                3,
            ),
        ];
        for (connection, ambiguous) in connections {
            found_however_split(connection.as_bytes(), ambiguous);
        }
    }

    /// The end of a chunked body as hyper finds it: past a size's long extension, and at the `\r\n` that starts a
    /// line of the trailers (a bare `\n` there starts a trailer line, not the next request).
    #[test]
    fn a_chunked_body_ends_where_hyper_ends_it() {
        let extension = "x".repeat(9000);
        let both = "POST / HTTP/1.1\r\ncontent-length: 1\r\ntransfer-encoding: chunked\r\n\r\n";
        let connections = [
            format!("POST / HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n2;e={extension}\r\n{{}}\r\n0\r\n\r\n{both}"),
            format!(
                "GET / HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\nGET /x HTTP/1.1\r\nx-y: z\r\n\r\n{both}"
            ),
        ];
        for connection in connections {
            found_however_split(connection.as_bytes(), 2);
        }
    }

    /// Asserts that the scan of `connection` finds request number `ambiguous` when its bytes come in reads of
    /// `size` bytes, for each of `sizes`.
    fn found_in_reads_of(connection: &[u8], ambiguous: u64, sizes: &[usize]) {
        for &size in sizes {
            let mut scan = HeadScan::default();
            let found = connection
                .chunks(size)
                .fold(None, |found, read| found.or(scan.scan(read)));
            assert_eq!(found, Some(ambiguous), "reads of {size} bytes");
        }
    }

    /// A length padded far past any line the scan keeps (hyper takes 400 KiB of head, and any run of zeros or
    /// spaces around a chunk's size), its line split across reads, still leaves the scan where hyper is.
    #[test]
    fn lengths_padded_past_what_a_line_keeps_are_read_as_hyper_reads_them() {
        let spaces = " ".repeat(20_000);
        let zeros = "0".repeat(20_000);
        let both = "POST / HTTP/1.1\r\ncontent-length: 1\r\ntransfer-encoding: chunked\r\n\r\n";
        let connections = [
            format!("POST / HTTP/1.1\r\nContent-Length:{spaces}2\r\n\r\n{{}}{both}"),
            format!("POST / HTTP/1.1\r\nContent-Length: 2{spaces}\r\n\r\n{{}}{both}"),
            format!("POST / HTTP/1.1\r\nContent-Length: {zeros}2\r\n\r\n{{}}{both}"),
            format!("POST / HTTP/1.1\r\nContent-Length: {zeros}\r\n\r\n{both}"),
            format!("POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n{zeros}2{spaces}\r\n{{}}\r\n0\r\n\r\n{both}"),
            format!(
                "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n{zeros}2{spaces};e=1\r\n{{}}\r\n0\r\n\r\n{both}"
            ),
        ];
        for connection in connections {
            found_in_reads_of(connection.as_bytes(), 2, &[1, 2, 7, 64, 1000, 8191, 16_384]);
        }
    }

    #[test]
    fn an_http2_connection_is_not_followed() {
        let mut scan = HeadScan::default();
        let frames = "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\ncontent-length: 1\ntransfer-encoding: x\n\n";
        assert_eq!(scan.scan(frames.as_bytes()), None);
        assert_eq!(scan.at, Framing::Off);
    }
}
