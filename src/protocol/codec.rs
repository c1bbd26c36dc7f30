//! Framing: splits a byte stream into tagged messages, refusing over-long ones before allocating.
//!
//! A `Message` keeps the whole frame (tag, length and body) as one `Bytes` sliced out of the read
//! buffer, so forwarding a message unchanged costs a copy into the output buffer and nothing else.

use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite};

/// The hard ceiling on any message length, whatever the configuration says (Postgres' own limit).
pub const HARD_MAX_MESSAGE: usize = 1 << 30;

/// How much the reader asks the allocator for at a time, so a peer that announces a huge message
/// and then sends nothing holds little memory.
const READ_CHUNK: usize = 16 * 1024;

/// One framed protocol message: `bytes` is the whole frame including tag and length.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    bytes: Bytes,
}

impl Message {
    /// Wraps a complete frame. The caller guarantees it is well formed (tag + length + body).
    pub fn from_frame(bytes: Bytes) -> Self {
        debug_assert!(bytes.len() >= 5);
        Message { bytes }
    }

    pub fn tag(&self) -> u8 {
        self.bytes[0]
    }

    /// The message body, after the tag and the length.
    pub fn body(&self) -> &[u8] {
        &self.bytes[5..]
    }

    /// The whole frame, to forward as it is.
    pub fn frame(&self) -> &Bytes {
        &self.bytes
    }

    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.bytes.len() <= 5
    }
}

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("message of {len} bytes exceeds the limit of {max} bytes")]
    TooLong { len: usize, max: usize },
    #[error("message has an invalid length {len}")]
    BadLength { len: i64 },
    #[error("connection closed in the middle of a message")]
    Truncated,
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
}

/// Reads tagged messages from a stream into an owned buffer.
#[derive(Debug)]
pub struct MessageReader {
    buf: BytesMut,
    max_len: usize,
}

impl MessageReader {
    pub fn new(max_len: usize) -> Self {
        MessageReader { buf: BytesMut::new(), max_len: max_len.min(HARD_MAX_MESSAGE) }
    }

    /// Takes over bytes that were read past the end of a previous phase.
    pub fn with_buffered(max_len: usize, buffered: BytesMut) -> Self {
        MessageReader { buf: buffered, max_len: max_len.min(HARD_MAX_MESSAGE) }
    }

    /// Returns the next complete message already in the buffer, without any I/O.
    pub fn try_next(&mut self) -> Result<Option<Message>, FrameError> {
        let Some(len) = self.pending_len()? else {
            return Ok(None);
        };
        if self.buf.len() < len + 1 {
            return Ok(None);
        }
        let frame = self.buf.split_to(len + 1).freeze();
        Ok(Some(Message { bytes: frame }))
    }

    /// Moves the run of complete messages at the head of the buffer that `decide` lets through
    /// into `out` with one copy, without framing each as a `Message`: the fast path for answers
    /// forwarded unchanged. Stops before a message `decide` stops at, after one it marks
    /// `Last`, at an incomplete message, or before `out` would exceed `limit` bytes.
    pub fn forward_run(
        &mut self,
        out: &mut BytesMut,
        limit: usize,
        mut decide: impl FnMut(u8, &[u8]) -> Run,
    ) -> Result<(), FrameError> {
        let mut end = 0;
        let room = limit.saturating_sub(out.len());
        while let Some(len) = Self::frame_len(&self.buf[end..], self.max_len)? {
            let frame_end = end + 1 + len;
            if frame_end > self.buf.len() || frame_end > room {
                break;
            }
            let run = decide(self.buf[end], &self.buf[end + 5..frame_end]);
            if run == Run::Stop {
                break;
            }
            end = frame_end;
            if run == Run::Last {
                break;
            }
        }
        if end > 0 {
            out.extend_from_slice(&self.buf[..end]);
            self.buf.advance(end);
        }
        Ok(())
    }

    /// Whether a complete message is waiting in the buffer.
    pub fn has_message(&self) -> bool {
        matches!(self.pending_len(), Ok(Some(len)) if self.buf.len() > len)
    }

    /// Whether any byte is buffered (a partial message counts).
    pub fn has_bytes(&self) -> bool {
        !self.buf.is_empty()
    }

    /// Gives up the buffer's memory when nothing is in it, so idle connections stay small
    /// (to this thread's spares: the next reader to need one takes it back).
    pub fn shrink_if_empty(&mut self) {
        if self.buf.is_empty() && self.buf.capacity() > 0 {
            super::spare::give(std::mem::take(&mut self.buf));
        }
    }

    /// The length field of the message at the head of the buffer, once its header is complete,
    /// checked against the limit.
    fn pending_len(&self) -> Result<Option<usize>, FrameError> {
        Self::frame_len(&self.buf, self.max_len)
    }

    /// The checked length field of the frame `bytes` starts with, once its header is complete.
    fn frame_len(bytes: &[u8], max_len: usize) -> Result<Option<usize>, FrameError> {
        let Some(header) = bytes.get(..5) else {
            return Ok(None);
        };
        let raw = i32::from_be_bytes([header[1], header[2], header[3], header[4]]);
        if raw < 4 {
            return Err(FrameError::BadLength { len: raw.into() });
        }
        let len = raw as usize;
        if len > max_len {
            return Err(FrameError::TooLong { len, max: max_len });
        }
        Ok(Some(len))
    }

    /// Reads until one message is complete. `Ok(None)` is a clean end of stream between messages.
    ///
    /// Cancel safe: the only await is a read into `self.buf`, so dropping the future loses nothing.
    pub async fn read<R: AsyncRead + Unpin + ?Sized>(&mut self, stream: &mut R) -> Result<Option<Message>, FrameError> {
        std::future::poll_fn(|cx| self.poll_read_message(cx, stream)).await
    }

    /// Polls for one complete message; the building block of `read`.
    pub fn poll_read_message<R: AsyncRead + Unpin + ?Sized>(
        &mut self,
        cx: &mut Context<'_>,
        stream: &mut R,
    ) -> Poll<Result<Option<Message>, FrameError>> {
        match ready!(self.poll_fill(cx, stream))? {
            true => Poll::Ready(self.try_next()),
            false => Poll::Ready(Ok(None)),
        }
    }

    /// Polls until one complete message is buffered (true) or the stream ends cleanly between
    /// messages (false). Cancel safe, like `read`.
    pub fn poll_fill<R: AsyncRead + Unpin + ?Sized>(
        &mut self,
        cx: &mut Context<'_>,
        stream: &mut R,
    ) -> Poll<Result<bool, FrameError>> {
        loop {
            if self.has_message() {
                return Poll::Ready(Ok(true));
            }
            let want = match self.pending_len()? {
                Some(len) => (len + 1 - self.buf.len()).min(READ_CHUNK),
                None => READ_CHUNK,
            };
            if self.buf.capacity() == 0 {
                self.buf = super::spare::take();
            }
            self.buf.reserve(want.max(4096));
            let n = ready!(tokio_util::io::poll_read_buf(Pin::new(&mut *stream), cx, &mut self.buf))?;
            if n == 0 {
                return Poll::Ready(if self.buf.is_empty() { Ok(false) } else { Err(FrameError::Truncated) });
            }
        }
    }

    /// Consumes the buffer, for handing leftover bytes to another reader.
    pub fn into_buffer(self) -> BytesMut {
        self.buf
    }

    /// Drops `n` bytes from the head of the buffer (used by tests).
    #[cfg(test)]
    fn advance(&mut self, n: usize) {
        self.buf.advance(n);
    }
}

/// `MessageReader::forward_run`'s verdict on one message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Run {
    /// Forward it and go on.
    Take,
    /// Forward it, then stop.
    Last,
    /// Leave it (and everything after it) in the buffer.
    Stop,
}

/// What one step of full-duplex I/O produced.
#[derive(Debug)]
pub enum Duplex {
    /// A complete message is in the reader's buffer: take it with `MessageReader::try_next` or
    /// `forward_run`.
    Buffered,
    /// The peer closed the stream cleanly between messages.
    Eof,
    /// Everything pending was written.
    Flushed,
}

/// One step of full-duplex I/O on a stream: writes what it can of `out`, then, if `want_read`,
/// waits for the next message. Writing and reading in one poll means a peer that is busy
/// writing to us can never block our writes to it, and vice versa. Cancel safe.
///
/// Must not be polled with `want_read` false and `out` empty: it would report `Flushed` at once.
pub fn poll_duplex<S: AsyncRead + AsyncWrite + Unpin + ?Sized>(
    cx: &mut Context<'_>,
    stream: &mut S,
    reader: &mut MessageReader,
    out: &mut BytesMut,
    want_read: bool,
) -> Poll<Result<Duplex, FrameError>> {
    let mut wrote = false;
    while !out.is_empty() {
        match Pin::new(&mut *stream).poll_write(cx, out) {
            Poll::Ready(Ok(0)) => return Poll::Ready(Err(std::io::Error::from(std::io::ErrorKind::WriteZero).into())),
            Poll::Ready(Ok(n)) => {
                out.advance(n);
                wrote = true;
            }
            Poll::Ready(Err(e)) => return Poll::Ready(Err(e.into())),
            Poll::Pending => break,
        }
    }
    // Flushed on every turn once everything is written: free for TCP, and a TLS or WebSocket
    // stream may hold the last bytes until its flush completes (it may take several polls).
    let flushed = out.is_empty()
        && match Pin::new(&mut *stream).poll_flush(cx) {
            Poll::Ready(Ok(())) => true,
            Poll::Ready(Err(e)) => return Poll::Ready(Err(e.into())),
            Poll::Pending => false,
        };
    if wrote && flushed {
        // Report the flush before reading, so the caller can notice it has gone idle (and drop
        // its buffers) rather than wait in a read with a buffer reserved.
        return Poll::Ready(Ok(Duplex::Flushed));
    }
    if want_read {
        return reader.poll_fill(cx, stream).map(|r| r.map(|more| if more { Duplex::Buffered } else { Duplex::Eof }));
    }
    if flushed {
        Poll::Ready(Ok(Duplex::Flushed))
    } else {
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut v = vec![tag];
        v.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
        v.extend_from_slice(body);
        v
    }

    #[test]
    fn forward_run_copies_whole_messages_until_told_to_stop() {
        let mut data = frame(b'D', b"row1");
        data.extend(frame(b'D', b"row2"));
        data.extend(frame(b'C', b"SELECT 2\0"));
        data.extend(frame(b'Z', b"I"));
        let mut r = MessageReader::with_buffered(1024, BytesMut::from(&data[..]));
        let mut out = BytesMut::new();
        let mut seen = Vec::new();
        r.forward_run(&mut out, 1 << 20, |tag, body| {
            seen.push((tag, body.to_vec()));
            if tag == b'Z' {
                Run::Stop
            } else {
                Run::Take
            }
        })
        .unwrap();
        assert_eq!(seen.len(), 4);
        assert_eq!(seen[1], (b'D', b"row2".to_vec()));
        assert_eq!(&out[..], &data[..data.len() - 6]);
        assert_eq!(r.try_next().unwrap().unwrap().tag(), b'Z');
    }

    #[test]
    fn forward_run_stops_after_last_before_limit_and_at_a_partial_message() {
        let mut data = frame(b'1', b"");
        data.extend(frame(b'2', b""));
        let mut r = MessageReader::with_buffered(1024, BytesMut::from(&data[..]));
        let mut out = BytesMut::new();
        r.forward_run(&mut out, 1 << 20, |_, _| Run::Last).unwrap();
        assert_eq!(&out[..], &frame(b'1', b"")[..]);

        // The limit counts what `out` holds already: 4 + 5 bytes would exceed 8.
        let mut out = BytesMut::from(&b"xxxx"[..]);
        r.forward_run(&mut out, 8, |_, _| Run::Take).unwrap();
        assert_eq!(&out[..], b"xxxx");
        r.forward_run(&mut out, 9, |_, _| Run::Take).unwrap();
        assert_eq!(&out[4..], &frame(b'2', b"")[..]);

        let mut r = MessageReader::with_buffered(1024, BytesMut::from(&frame(b'D', b"abc")[..6]));
        let mut out = BytesMut::new();
        r.forward_run(&mut out, 1 << 20, |_, _| Run::Take).unwrap();
        assert!(out.is_empty() && r.has_bytes());
    }

    #[test]
    fn forward_run_refuses_an_over_long_message() {
        let mut data = frame(b'D', b"ok");
        data.extend(frame(b'D', &[0; 64]));
        let mut r = MessageReader::with_buffered(32, BytesMut::from(&data[..]));
        let mut out = BytesMut::new();
        assert!(matches!(r.forward_run(&mut out, 1 << 20, |_, _| Run::Take), Err(FrameError::TooLong { .. })));
    }

    #[tokio::test]
    async fn reads_messages_split_across_reads() {
        let mut data = frame(b'Q', b"select 1\0");
        data.extend(frame(b'S', b""));
        let (mut a, mut b) = tokio::io::duplex(3);
        let writer = tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            a.write_all(&data).await.unwrap();
        });
        let mut r = MessageReader::new(1024);
        let m1 = r.read(&mut b).await.unwrap().unwrap();
        assert_eq!(m1.tag(), b'Q');
        assert_eq!(m1.body(), b"select 1\0");
        let m2 = r.read(&mut b).await.unwrap().unwrap();
        assert_eq!(m2.tag(), b'S');
        assert!(m2.is_empty());
        writer.await.unwrap();
        assert!(r.read(&mut b).await.unwrap().is_none());
    }

    #[tokio::test]
    async fn refuses_over_long_message_before_reading_body() {
        let mut header = vec![b'Q'];
        header.extend_from_slice(&(1_000_000i32).to_be_bytes());
        let mut r = MessageReader::new(1024);
        let mut src: &[u8] = &header;
        match r.read(&mut src).await {
            Err(FrameError::TooLong { len, max }) => assert_eq!((len, max), (1_000_000, 1024)),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[tokio::test]
    async fn refuses_negative_and_tiny_lengths() {
        for raw in [-1i32, 0, 3] {
            let mut header = vec![b'Q'];
            header.extend_from_slice(&raw.to_be_bytes());
            let mut r = MessageReader::new(1024);
            let mut src: &[u8] = &header;
            assert!(matches!(r.read(&mut src).await, Err(FrameError::BadLength { .. })));
        }
    }

    #[tokio::test]
    async fn truncated_stream_is_an_error_not_a_clean_end() {
        let data = frame(b'Q', b"select 1\0");
        let mut src: &[u8] = &data[..7];
        let mut r = MessageReader::new(1024);
        assert!(matches!(r.read(&mut src).await, Err(FrameError::Truncated)));
    }

    #[tokio::test]
    async fn duplex_writes_while_waiting_to_read() {
        let (mut near, mut far) = tokio::io::duplex(64);
        let mut reader = MessageReader::new(1024);
        let mut out = BytesMut::from(&frame(b'Q', &[b'x'; 200])[..]);
        // The far side only reads after we have written everything; a write-then-read proxy
        // with a 64-byte pipe would still finish, but only because it writes first.
        let far_task = tokio::spawn(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            far.write_all(&frame(b'Z', b"I")).await.unwrap();
            let mut got = vec![0u8; 205];
            far.read_exact(&mut got).await.unwrap();
            got
        });
        let first = std::future::poll_fn(|cx| poll_duplex(cx, &mut near, &mut reader, &mut out, true)).await.unwrap();
        assert!(matches!(first, Duplex::Buffered));
        assert_eq!(reader.try_next().unwrap().unwrap().tag(), b'Z');
        while !out.is_empty() {
            let step =
                std::future::poll_fn(|cx| poll_duplex(cx, &mut near, &mut reader, &mut out, false)).await.unwrap();
            assert!(matches!(step, Duplex::Flushed));
        }
        assert_eq!(far_task.await.unwrap().len(), 205);
    }

    #[test]
    fn hard_ceiling_applies_over_configuration() {
        let r = MessageReader::new(usize::MAX);
        assert_eq!(r.max_len, HARD_MAX_MESSAGE);
    }

    #[test]
    fn try_next_leaves_partial_messages_buffered() {
        let data = frame(b'D', b"abcdef");
        let mut r = MessageReader::with_buffered(100, BytesMut::from(&data[..8]));
        assert!(r.try_next().unwrap().is_none());
        assert!(r.has_bytes());
        assert!(!r.has_message());
        r.advance(8);
        assert!(!r.has_bytes());
    }
}
