//! Postgres bytes over a WebSocket: the transport of the tunnel to a private database.
//!
//! `WsStream` turns a tokio-tungstenite `WebSocketStream` into an ordinary `AsyncRead +
//! AsyncWrite` byte stream, so everything above the transport layer treats a tunnelled origin like
//! a TCP one. The bytes travel in binary frames, the convention cloudflared, websockify and Neon's
//! wsproxy share: pings are answered, text frames are refused, a Close frame reads as end of file,
//! and incoming frames and messages are capped in size. Writes are buffered into one outgoing
//! frame only after the sink said it has room, so a slow peer slows the writer down instead of
//! growing a buffer. `connect` opens such a stream to a `pgwarp tunnel` (or any compatible
//! endpoint) over ws:// or wss:// (TLS by BoringSSL), with the service-token headers on the
//! upgrade request; the tunnel's own end wraps its accepted sockets in the same `WsStream`.
//!
//! Proxies and load balancers in front of a tunnel close a WebSocket that carries nothing for
//! a while (60 seconds is common), and an origin connection idle in the pool, or under a
//! client that is thinking inside a transaction, carries nothing for much longer. So the
//! connecting side sends a Ping once it has sent nothing for `ping_interval` (the Pong is
//! traffic back). Only what it sends counts: an idle connection reads what arrived only at
//! its next check, too late to tell when it arrived. The ping goes out while the stream is
//! read: by the session waiting on it, or, for an idle pooled connection, by the pool's
//! periodic liveness check.

use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use boring::ssl::{SslConnector, SslMethod};
use boring::x509::store::X509StoreBuilder;
use boring::x509::X509;
use bytes::{Buf, Bytes, BytesMut};
use futures_util::{Sink, Stream};
use http::header::{HeaderName, HeaderValue};
use http::StatusCode;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep};
use tokio_boring::SslStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::error::ProtocolError;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::WebSocketStream;

use crate::transport::tcp_options::TcpOptions;
use crate::transport::{Layer, OriginStream};

/// Header carrying the service token's id on the upgrade request (Cloudflare Access naming).
pub const ACCESS_CLIENT_ID_HEADER: &str = "CF-Access-Client-Id";
/// Header carrying the service token's secret on the upgrade request.
pub const ACCESS_CLIENT_SECRET_HEADER: &str = "CF-Access-Client-Secret";

/// Default cap on one incoming frame's payload.
pub const DEFAULT_MAX_FRAME_SIZE: usize = 1 << 20;
/// Default cap on one incoming message (all its frames together).
pub const DEFAULT_MAX_MESSAGE_SIZE: usize = 64 << 20;
/// Largest frame `WsStream` sends: big enough that framing costs little, small enough for any
/// peer's frame cap and to keep one frame's buffer cheap.
pub const MAX_OUTGOING_FRAME: usize = 64 << 10;

/// How much tungstenite reads from the socket at a time. Each read clears this much of its
/// buffer first and every connection keeps one, so it stays at the size of a socket read
/// elsewhere in pgwarp rather than tungstenite's 128 KiB default; a larger frame still gets the
/// room it needs.
const READ_BUFFER_SIZE: usize = 8 << 10;

/// Default quiet time after which the connecting side pings: within the 60 seconds idle limit
/// of common load balancers even when the ping waits for the pool's next liveness check (up to
/// 15 seconds later).
pub const DEFAULT_PING_INTERVAL: Duration = Duration::from_secs(30);

/// Body of a refusal kept in `WsError::Refused`, at most this many bytes of it.
const REFUSAL_BODY_LIMIT: usize = 256;

/// How a WebSocket connection is set up.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WsConfig {
    /// Largest incoming message accepted, in bytes; a bigger one fails the read.
    pub max_message_size: usize,
    /// Largest incoming frame payload accepted, in bytes; a bigger one fails the read.
    pub max_frame_size: usize,
    /// For wss://: trust only the CA certificates in this PEM file instead of the system roots
    /// (a private tunnel's own CA).
    pub ca_file: Option<PathBuf>,
    /// Keepalive and user timeout for the TCP connection under the WebSocket.
    pub tcp: TcpOptions,
    /// After sending nothing for this long, send a Ping (zero: never).
    pub ping_interval: Duration,
}

impl Default for WsConfig {
    fn default() -> Self {
        WsConfig {
            max_message_size: DEFAULT_MAX_MESSAGE_SIZE,
            max_frame_size: DEFAULT_MAX_FRAME_SIZE,
            ca_file: None,
            tcp: TcpOptions::default(),
            ping_interval: DEFAULT_PING_INTERVAL,
        }
    }
}

impl WsConfig {
    /// The tungstenite settings carrying this config's size caps.
    pub fn protocol_config(&self) -> WebSocketConfig {
        WebSocketConfig::default()
            .max_message_size(Some(self.max_message_size))
            .max_frame_size(Some(self.max_frame_size))
            .read_buffer_size(READ_BUFFER_SIZE)
    }
}

/// Why a WebSocket connection could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum WsError {
    #[error("invalid WebSocket URL {url:?}: {reason}")]
    InvalidUrl { url: String, reason: String },
    #[error("invalid header {name:?} for the WebSocket upgrade request")]
    InvalidHeader { name: String },
    #[error("cannot connect to {host}:{port}: {source}")]
    Connect { host: String, port: u16, source: io::Error },
    #[error("cannot read CA file {path}: {reason}")]
    CaFile { path: PathBuf, reason: String },
    #[error("TLS setup failed: {0}")]
    TlsSetup(#[from] boring::error::ErrorStack),
    #[error("TLS handshake with {host} failed: {reason}")]
    TlsHandshake { host: String, reason: String },
    #[error("the server refused the WebSocket upgrade: HTTP {status}")]
    Refused { status: StatusCode, body: String },
    /// Boxed: tungstenite's error is large, and this one travels up through every origin error.
    #[error("WebSocket handshake failed: {0}")]
    Handshake(#[source] Box<tungstenite::Error>),
}

/// The service-token headers for `connect`.
pub fn access_headers(client_id: &str, client_secret: &str) -> Vec<(String, String)> {
    vec![
        (ACCESS_CLIENT_ID_HEADER.to_string(), client_id.to_string()),
        (ACCESS_CLIENT_SECRET_HEADER.to_string(), client_secret.to_string()),
    ]
}

/// Opens a WebSocket to `url` (ws:// or wss://) with `headers` added to the upgrade request, and
/// returns it as a byte stream.
pub async fn connect(
    url: &str,
    headers: &[(String, String)],
    config: WsConfig,
) -> Result<WsStream<OriginStream>, WsError> {
    let invalid = |reason: &str| WsError::InvalidUrl { url: url.to_string(), reason: reason.to_string() };
    let mut request = url.into_client_request().map_err(|err| invalid(&err.to_string()))?;
    let secure = match request.uri().scheme_str() {
        Some("ws") => false,
        Some("wss") => true,
        _ => return Err(invalid("the scheme must be ws or wss")),
    };
    let host = request.uri().host().ok_or_else(|| invalid("no host"))?;
    // An IPv6 literal keeps its brackets in a URI; sockets and TLS want the bare address.
    let host = host.trim_start_matches('[').trim_end_matches(']').to_string();
    let port = request.uri().port_u16().unwrap_or(if secure { 443 } else { 80 });

    for (name, value) in headers {
        let invalid_header = || WsError::InvalidHeader { name: name.clone() };
        let header_name = HeaderName::from_bytes(name.as_bytes()).map_err(|_| invalid_header())?;
        let mut header_value = HeaderValue::from_str(value).map_err(|_| invalid_header())?;
        header_value.set_sensitive(true);
        request.headers_mut().insert(header_name, header_value);
    }

    let connect_error = |source| WsError::Connect { host: host.clone(), port, source };
    let tcp = TcpStream::connect((host.as_str(), port)).await.map_err(connect_error)?;
    tcp.set_nodelay(true).map_err(connect_error)?;
    config.tcp.apply_or_warn(&tcp, "tunnel");
    // An OriginStream, so the socket can move between workers under the layers (`rehome`).
    let tcp = OriginStream::Tcp(tcp);
    let stream = if secure {
        OriginStream::Layered(Box::new(tls_connect(&host, tcp, config.ca_file.as_deref()).await?))
    } else {
        tcp
    };

    let (ws, _response) = tokio_tungstenite::client_async_with_config(request, stream, Some(config.protocol_config()))
        .await
        .map_err(handshake_error)?;
    Ok(WsStream::new(ws).with_pings(config.ping_interval))
}

/// TLS to `host`, verifying its certificate against the system roots, or against `ca_file` alone
/// when given.
async fn tls_connect(
    host: &str,
    tcp: OriginStream,
    ca_file: Option<&Path>,
) -> Result<SslStream<OriginStream>, WsError> {
    let mut builder = SslConnector::builder(SslMethod::tls())?;
    if let Some(path) = ca_file {
        builder.set_cert_store_builder(ca_store(path)?);
    }
    // A WebSocket upgrade is an HTTP/1.1 request; say so to proxies that look at ALPN.
    builder.set_alpn_protos(b"\x08http/1.1")?;
    let tls_config = builder.build().configure()?;
    tokio_boring::connect(tls_config, host, tcp).await.map_err(|err| {
        let mut reason = err.to_string();
        if let Some(Err(verify)) = err.ssl().map(|ssl| ssl.verify_result()) {
            reason = format!("{reason} (certificate: {verify})");
        }
        WsError::TlsHandshake { host: host.to_string(), reason }
    })
}

/// A certificate store holding only the CA certificates of the PEM file at `path`.
fn ca_store(path: &Path) -> Result<X509StoreBuilder, WsError> {
    let ca_error = |reason: String| WsError::CaFile { path: path.to_path_buf(), reason };
    let pem = std::fs::read(path).map_err(|err| ca_error(err.to_string()))?;
    let certs = X509::stack_from_pem(&pem).map_err(|err| ca_error(err.to_string()))?;
    if certs.is_empty() {
        return Err(ca_error("no certificate in the file".to_string()));
    }
    let mut store = X509StoreBuilder::new()?;
    for cert in certs {
        store.add_cert(cert)?;
    }
    Ok(store)
}

/// A failed upgrade: an HTTP answer other than 101 names its status.
fn handshake_error(err: tungstenite::Error) -> WsError {
    match err {
        tungstenite::Error::Http(response) => {
            let body = response.body().as_deref().unwrap_or_default();
            let body = String::from_utf8_lossy(&body[..body.len().min(REFUSAL_BODY_LIMIT)]).trim().to_string();
            WsError::Refused { status: response.status(), body }
        }
        other => WsError::Handshake(Box::new(other)),
    }
}

/// What the read half has seen so far.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ReadState {
    Open,
    /// A Close frame arrived or the connection ended: every read returns end of file.
    Eof,
    /// The peer sent a text frame: every read fails.
    Refused,
}

/// A WebSocket carrying a byte stream in binary frames.
///
/// Shutting down sends a Close frame, and a Close frame from the peer reads as end of file. Either
/// ends both directions: WebSocket has no half-close, so a Postgres session (which never needs one)
/// is over once either side closes.
pub struct WsStream<S> {
    inner: WebSocketStream<S>,
    /// The rest of the binary message being read.
    incoming: Bytes,
    read_state: ReadState,
    /// The binary frame being filled by writes; sent when full or on flush. Its memory comes back
    /// for the next frame once tungstenite has copied the frame out.
    outgoing: BytesMut,
    max_outgoing_frame: usize,
    /// Pings after quiet spells, when asked for (`with_pings`).
    heartbeat: Option<Heartbeat>,
}

/// When the stream last sent something, and the timer that checks on it.
struct Heartbeat {
    every: Duration,
    /// When the last frame was sent.
    last: Instant,
    /// Armed at `last + every` as `last` was when it was set; moved on, not re-armed per frame,
    /// when it fires early.
    timer: Option<Pin<Box<Sleep>>>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> WsStream<S> {
    /// Wraps an established WebSocket. Its size caps are those it was created with (see
    /// `WsConfig::protocol_config`); outgoing frames stay within its frame cap too.
    pub fn new(inner: WebSocketStream<S>) -> Self {
        let max_outgoing_frame = inner.get_config().max_frame_size.unwrap_or(usize::MAX).clamp(1, MAX_OUTGOING_FRAME);
        WsStream {
            inner,
            incoming: Bytes::new(),
            read_state: ReadState::Open,
            outgoing: BytesMut::new(),
            max_outgoing_frame,
            heartbeat: None,
        }
    }

    /// Sends a Ping whenever it has sent nothing for `every` (zero: never). The ping goes out
    /// from a waiting read, with the reader's waker on the sink: use the stream from one task
    /// (as a session uses its origin connection), or a writer waiting on the sink in another
    /// may not be woken.
    pub fn with_pings(mut self, every: Duration) -> Self {
        self.heartbeat = (!every.is_zero()).then(|| Heartbeat { every, last: Instant::now(), timer: None });
        self
    }

    /// Notes a frame sent, for the heartbeat.
    fn sent(&mut self) {
        if let Some(hb) = &mut self.heartbeat {
            hb.last = Instant::now();
        }
    }

    /// While a read waits: sends a Ping if nothing was sent for a whole interval, and arms
    /// the timer that wakes this reader when one is next due.
    fn poll_heartbeat(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        let WsStream { inner, heartbeat, .. } = self;
        let Some(hb) = heartbeat else { return Ok(()) };
        loop {
            let due = hb.last + hb.every;
            let timer = hb.timer.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(due)));
            if timer.as_mut().poll(cx).is_pending() {
                return Ok(());
            }
            let now = Instant::now();
            if now < due {
                // Sent something since the timer was set: wait for the rest of the quiet spell.
                timer.as_mut().reset(due);
                continue;
            }
            match Pin::new(&mut *inner).poll_ready(cx) {
                // The sink is busy sending: that is traffic enough, and this reader is woken
                // when it has room.
                Poll::Pending => return Ok(()),
                Poll::Ready(ready) => ready.map_err(into_io_error)?,
            }
            Pin::new(&mut *inner).start_send(Message::Ping(Bytes::new())).map_err(into_io_error)?;
            // What the socket does not take now goes with the next write or read.
            if let Poll::Ready(Err(err)) = Pin::new(&mut *inner).poll_flush(cx) {
                return Err(into_io_error(err));
            }
            hb.last = now;
            timer.as_mut().reset(now + hb.every);
        }
    }

    /// The stream under the WebSocket.
    pub fn get_ref(&self) -> &S {
        self.inner.get_ref()
    }

    /// The stream under the WebSocket, to change how it is registered (not to read or write).
    pub fn get_mut(&mut self) -> &mut S {
        self.inner.get_mut()
    }

    /// Hands the filled frame to the sink. Call only after `poll_ready` returned ready.
    fn start_send_outgoing(&mut self) -> io::Result<()> {
        let frame = self.outgoing.split().freeze();
        self.sent();
        Pin::new(&mut self.inner).start_send(Message::Binary(frame)).map_err(into_io_error)
    }

    /// Sends the partly filled frame, if any, once the sink has room.
    fn poll_send_outgoing(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if !self.outgoing.is_empty() {
            ready!(Pin::new(&mut self.inner).poll_ready(cx)).map_err(into_io_error)?;
            self.start_send_outgoing()?;
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: Layer> Layer for WsStream<S> {
    fn rehome(&mut self) -> io::Result<()> {
        self.get_mut().rehome()
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for WsStream<S> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if buf.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        loop {
            if !this.incoming.is_empty() {
                let n = buf.remaining().min(this.incoming.len());
                buf.put_slice(&this.incoming[..n]);
                this.incoming.advance(n);
                if this.incoming.is_empty() {
                    // Let go of tungstenite's read buffer, so it can reuse it for the next frame.
                    this.incoming = Bytes::new();
                }
                return Poll::Ready(Ok(()));
            }
            match this.read_state {
                ReadState::Open => {}
                ReadState::Eof => return Poll::Ready(Ok(())),
                ReadState::Refused => return Poll::Ready(Err(text_frame_error())),
            }
            // Each poll of the stream also writes out any pong or close reply tungstenite queued
            // while reading, so pings are answered while the reader waits.
            let next = match Pin::new(&mut this.inner).poll_next(cx) {
                Poll::Ready(next) => next,
                Poll::Pending => {
                    this.poll_heartbeat(cx)?;
                    return Poll::Pending;
                }
            };
            match next {
                Some(Ok(Message::Binary(data))) => this.incoming = data,
                Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => {}
                Some(Ok(Message::Text(_))) => {
                    this.read_state = ReadState::Refused;
                    return Poll::Ready(Err(text_frame_error()));
                }
                Some(Ok(Message::Close(_))) => {
                    this.read_state = ReadState::Eof;
                    // Try to get the close reply out now; if the socket is busy, the next flush
                    // or shutdown sends it.
                    let _ = Pin::new(&mut this.inner).poll_flush(cx);
                }
                None => this.read_state = ReadState::Eof,
                Some(Err(err)) => return Poll::Ready(Err(into_io_error(err))),
            }
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for WsStream<S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        loop {
            // Take bytes only when the sink has room: that is the backpressure.
            ready!(Pin::new(&mut this.inner).poll_ready(cx)).map_err(into_io_error)?;
            if this.outgoing.len() < this.max_outgoing_frame {
                break;
            }
            this.start_send_outgoing()?;
        }
        let n = buf.len().min(this.max_outgoing_frame - this.outgoing.len());
        this.outgoing.extend_from_slice(&buf[..n]);
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_send_outgoing(cx))?;
        Pin::new(&mut this.inner).poll_flush(cx).map_err(into_io_error)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_send_outgoing(cx))?;
        match ready!(Pin::new(&mut this.inner).poll_close(cx)) {
            // The peer closed first and the close handshake is over: nothing left to send.
            Ok(()) | Err(tungstenite::Error::AlreadyClosed | tungstenite::Error::ConnectionClosed) => {
                Poll::Ready(Ok(()))
            }
            Err(err) => Poll::Ready(Err(into_io_error(err))),
        }
    }
}

fn text_frame_error() -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, "text frames are not allowed")
}

/// A WebSocket error as an I/O error of the matching kind.
fn into_io_error(err: tungstenite::Error) -> io::Error {
    match err {
        tungstenite::Error::Io(err) => err,
        tungstenite::Error::ConnectionClosed
        | tungstenite::Error::AlreadyClosed
        | tungstenite::Error::Protocol(ProtocolError::SendAfterClosing) => {
            io::Error::new(io::ErrorKind::BrokenPipe, "the WebSocket connection is closed")
        }
        tungstenite::Error::Protocol(ProtocolError::ResetWithoutClosingHandshake) => {
            io::Error::new(io::ErrorKind::ConnectionReset, "the WebSocket connection ended without a Close frame")
        }
        err @ (tungstenite::Error::Capacity(_) | tungstenite::Error::Protocol(_) | tungstenite::Error::Utf8(_)) => {
            io::Error::new(io::ErrorKind::InvalidData, err)
        }
        err => io::Error::other(err),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use futures_util::{SinkExt, StreamExt};
    use tokio::io::{duplex, AsyncReadExt, AsyncWriteExt, DuplexStream};
    use tokio::time::timeout;
    use tokio_tungstenite::tungstenite::protocol::Role;

    use super::*;
    use crate::transport::ByteStream;

    const STEP: Duration = Duration::from_secs(10);

    fn caps(max_frame_size: usize, max_message_size: usize) -> WebSocketConfig {
        WsConfig { max_frame_size, max_message_size, ..WsConfig::default() }.protocol_config()
    }

    /// A `WsStream` (client role) and a raw WebSocket peer (server role) over an in-memory pipe.
    async fn stream_and_peer(config: WebSocketConfig) -> (WsStream<DuplexStream>, WebSocketStream<DuplexStream>) {
        let (a, b) = duplex(64 << 10);
        let client = WebSocketStream::from_raw_socket(a, Role::Client, Some(config)).await;
        let peer = WebSocketStream::from_raw_socket(b, Role::Server, Some(config)).await;
        (WsStream::new(client), peer)
    }

    /// Deterministic bytes that make misordering or loss visible.
    fn pattern(len: usize, seed: u32) -> Vec<u8> {
        let mut state = seed.wrapping_mul(2_654_435_761).max(1);
        (0..len)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 17;
                state ^= state << 5;
                state as u8
            })
            .collect()
    }

    /// Writes `data` in chunks of varying size, flushing now and then and at the end.
    async fn write_in_chunks<W: AsyncWrite + Unpin>(writer: &mut W, data: &[u8]) {
        let mut offset = 0;
        let mut chunk = 1;
        while offset < data.len() {
            let end = (offset + chunk).min(data.len());
            writer.write_all(&data[offset..end]).await.expect("write");
            if chunk % 7 == 0 {
                writer.flush().await.expect("flush");
            }
            offset = end;
            chunk = chunk * 3 % 150_001 + 1;
        }
        writer.flush().await.expect("flush");
    }

    async fn read_len<R: AsyncRead + Unpin>(reader: &mut R, len: usize) -> Vec<u8> {
        let mut got = vec![0u8; len];
        reader.read_exact(&mut got).await.expect("read");
        got
    }

    #[test]
    fn ws_stream_is_a_byte_stream() {
        fn assert_byte_stream<T: ByteStream>() {}
        assert_byte_stream::<WsStream<DuplexStream>>();
        assert_byte_stream::<WsStream<Box<dyn ByteStream>>>();
    }

    #[tokio::test]
    async fn megabytes_cross_both_ways_byte_exact() {
        let (a, b) = duplex(16 << 10);
        let client =
            WsStream::new(WebSocketStream::from_raw_socket(a, Role::Client, Some(caps(1 << 20, 64 << 20))).await);
        let server =
            WsStream::new(WebSocketStream::from_raw_socket(b, Role::Server, Some(caps(1 << 20, 64 << 20))).await);
        let (mut client_read, mut client_write) = tokio::io::split(client);
        let (mut server_read, mut server_write) = tokio::io::split(server);
        let up = pattern(3 << 20, 1);
        let down = pattern((2 << 20) + 12_345, 2);

        // WebSocket has no half-close (a Close frame ends both directions), so both sides finish
        // their transfers before the client closes.
        let run = async {
            let ((), (), got_up, got_down) = tokio::join!(
                write_in_chunks(&mut client_write, &up),
                write_in_chunks(&mut server_write, &down),
                read_len(&mut server_read, up.len()),
                read_len(&mut client_read, down.len()),
            );
            client_write.shutdown().await.expect("shutdown");
            let mut rest = Vec::new();
            server_read.read_to_end(&mut rest).await.expect("read to end");
            (got_up, got_down, rest)
        };
        let (got_up, got_down, rest) = timeout(Duration::from_secs(60), run).await.expect("transfer finished");
        assert!(got_up == up, "client -> server bytes differ");
        assert!(got_down == down, "server -> client bytes differ");
        assert!(rest.is_empty(), "{} bytes after the end", rest.len());
    }

    #[tokio::test]
    async fn bytes_split_across_frames_read_as_one_stream() {
        let (mut stream, mut peer) = stream_and_peer(caps(1 << 20, 64 << 20)).await;
        for part in ["SEL", "", "ECT 1; -- ", "split", " frames"] {
            peer.send(Message::Binary(Bytes::from_static(part.as_bytes()))).await.expect("send");
        }
        // Small reads consume a frame partly; the rest is kept for the next read.
        let mut got = Vec::new();
        let mut buf = [0u8; 4];
        while got.len() < "SELECT 1; -- split frames".len() {
            let n = timeout(STEP, stream.read(&mut buf)).await.expect("read in time").expect("read");
            assert!(n > 0, "unexpected end of stream");
            got.extend_from_slice(&buf[..n]);
        }
        assert_eq!(got, b"SELECT 1; -- split frames");
    }

    #[tokio::test]
    async fn large_write_goes_out_as_several_capped_frames() {
        let (mut stream, mut peer) = stream_and_peer(caps(1 << 20, 64 << 20)).await;
        let data = pattern(200_000, 3);
        let send = async {
            stream.write_all(&data).await.expect("write");
            stream.flush().await.expect("flush");
        };
        let receive = async {
            let mut got = Vec::new();
            while got.len() < data.len() {
                match peer.next().await.expect("message").expect("no error") {
                    Message::Binary(frame) => {
                        assert!(frame.len() <= MAX_OUTGOING_FRAME, "frame of {} bytes", frame.len());
                        got.extend_from_slice(&frame);
                    }
                    other => panic!("unexpected message {other:?}"),
                }
            }
            got
        };
        let ((), got) = timeout(STEP, async { tokio::join!(send, receive) }).await.expect("in time");
        assert!(got == data, "bytes differ");
    }

    #[tokio::test]
    async fn outgoing_frames_respect_a_small_frame_cap() {
        let (mut stream, mut peer) = stream_and_peer(caps(1000, 64 << 20)).await;
        stream.write_all(&[7u8; 2500]).await.expect("write");
        stream.flush().await.expect("flush");
        let mut sizes = Vec::new();
        while sizes.iter().sum::<usize>() < 2500 {
            match timeout(STEP, peer.next()).await.expect("in time").expect("message").expect("no error") {
                Message::Binary(frame) => sizes.push(frame.len()),
                other => panic!("unexpected message {other:?}"),
            }
        }
        assert_eq!(sizes, vec![1000, 1000, 500]);
    }

    #[tokio::test]
    async fn ping_from_peer_is_answered_with_pong() {
        let (mut stream, mut peer) = stream_and_peer(caps(1 << 20, 64 << 20)).await;
        // The stream only reads; nobody flushes it. The pong must go out anyway.
        let reader = tokio::spawn(async move {
            let mut buf = [0u8; 5];
            stream.read_exact(&mut buf).await.map(|_| buf)
        });
        peer.send(Message::Ping(Bytes::from_static(b"are you there"))).await.expect("send ping");
        let answer = timeout(STEP, peer.next()).await.expect("pong in time").expect("message").expect("no error");
        assert_eq!(answer, Message::Pong(Bytes::from_static(b"are you there")));
        peer.send(Message::Binary(Bytes::from_static(b"hello"))).await.expect("send data");
        let got = timeout(STEP, reader).await.expect("in time").expect("join").expect("read");
        assert_eq!(&got, b"hello");
    }

    /// The next message the peer gets, and when (paused time: the runtime jumps to timers).
    async fn next_at(peer: &mut WebSocketStream<DuplexStream>) -> (Message, Instant) {
        let next = timeout(Duration::from_secs(3600), peer.next()).await.expect("a message within the hour");
        let msg = next.expect("a message").expect("no error");
        (msg, Instant::now())
    }

    #[tokio::test(start_paused = true)]
    async fn a_waiting_reader_pings_after_a_quiet_interval_and_writes_put_it_off() {
        let (stream, mut peer) = stream_and_peer(caps(1 << 20, 64 << 20)).await;
        let (mut reader, mut writer) = tokio::io::split(stream.with_pings(Duration::from_secs(30)));
        let start = Instant::now();
        let (got_tx, mut got_rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut buf = [0u8; 64];
            while let Ok(n @ 1..) = reader.read(&mut buf).await {
                let _ = got_tx.send(buf[..n].to_vec());
            }
        });

        let (msg, at) = next_at(&mut peer).await;
        assert_eq!(msg, Message::Ping(Bytes::new()));
        assert_eq!(at - start, Duration::from_secs(30), "the first ping, after 30s of nothing");

        // Data from the peer does not put the next ping off (it may only be seen later)...
        tokio::time::sleep(Duration::from_secs(10)).await;
        peer.send(Message::Binary(Bytes::from_static(b"row"))).await.unwrap();
        assert_eq!(got_rx.recv().await.unwrap(), b"row");
        let (msg, at) = next_at(&mut peer).await;
        assert_eq!(msg, Message::Ping(Bytes::new()));
        assert_eq!(at - start, Duration::from_secs(60));

        // ...data sent does.
        tokio::time::sleep(Duration::from_secs(10)).await;
        writer.write_all(b"query").await.unwrap();
        writer.flush().await.unwrap();
        assert_eq!(next_at(&mut peer).await.0, Message::Binary(Bytes::from_static(b"query")));
        let (msg, at) = next_at(&mut peer).await;
        assert_eq!(msg, Message::Ping(Bytes::new()));
        assert_eq!(at - start, Duration::from_secs(100));
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_stream_polled_now_and_then_pings_once_due_and_never_when_off() {
        use futures_util::FutureExt;
        for (every, pings) in [(Duration::from_secs(30), true), (Duration::ZERO, false)] {
            let (stream, mut peer) = stream_and_peer(caps(1 << 20, 64 << 20)).await;
            let mut stream = stream.with_pings(every);
            let mut buf = [0u8; 16];
            // As the pool's liveness check polls an idle connection: once, with no waker.
            tokio::time::advance(Duration::from_secs(20)).await;
            assert!(stream.read(&mut buf).now_or_never().is_none());
            assert!(peer.next().now_or_never().is_none(), "no ping before the interval");
            tokio::time::advance(Duration::from_secs(11)).await;
            assert!(stream.read(&mut buf).now_or_never().is_none());
            tokio::task::yield_now().await;
            let got = peer.next().now_or_never().flatten().map(|m| m.unwrap());
            assert_eq!(got, pings.then(|| Message::Ping(Bytes::new())), "every {every:?}");
        }
    }

    #[tokio::test]
    async fn text_frame_is_refused() {
        let (mut stream, mut peer) = stream_and_peer(caps(1 << 20, 64 << 20)).await;
        peer.send(Message::Text("SELECT 1".into())).await.expect("send");
        peer.send(Message::Binary(Bytes::from_static(b"after"))).await.expect("send");
        let mut buf = [0u8; 16];
        for _ in 0..2 {
            let err = timeout(STEP, stream.read(&mut buf)).await.expect("in time").expect_err("text must fail");
            assert_eq!(err.kind(), io::ErrorKind::InvalidData);
            assert!(err.to_string().contains("text frames are not allowed"), "{err}");
        }
    }

    #[tokio::test]
    async fn close_from_peer_reads_as_eof_and_is_answered() {
        let (mut stream, mut peer) = stream_and_peer(caps(1 << 20, 64 << 20)).await;
        peer.send(Message::Binary(Bytes::from_static(b"last words"))).await.expect("send");
        peer.close(None).await.expect("close");
        let mut got = Vec::new();
        timeout(STEP, stream.read_to_end(&mut got)).await.expect("in time").expect("read");
        assert_eq!(got, b"last words");
        assert_eq!(stream.read(&mut [0u8; 8]).await.expect("read after eof"), 0);
        // Our close reply reaches the peer without any flush from us.
        let end = timeout(STEP, peer.next()).await.expect("close reply in time");
        assert!(matches!(end, None | Some(Ok(Message::Close(_)))), "{end:?}");
    }

    #[tokio::test]
    async fn write_after_peer_closed_is_a_broken_pipe() {
        let (mut stream, mut peer) = stream_and_peer(caps(1 << 20, 64 << 20)).await;
        peer.close(None).await.expect("close");
        assert_eq!(timeout(STEP, stream.read(&mut [0u8; 8])).await.expect("in time").expect("read"), 0);
        stream.write_all(b"too late").await.expect("buffered");
        let err = timeout(STEP, stream.flush()).await.expect("in time").expect_err("must fail");
        assert_eq!(err.kind(), io::ErrorKind::BrokenPipe, "{err}");
    }

    #[tokio::test]
    async fn peer_vanishing_without_close_is_a_reset() {
        let (mut stream, peer) = stream_and_peer(caps(1 << 20, 64 << 20)).await;
        drop(peer);
        let err = timeout(STEP, stream.read(&mut [0u8; 8])).await.expect("in time").expect_err("must fail");
        assert_eq!(err.kind(), io::ErrorKind::ConnectionReset, "{err}");
    }

    #[tokio::test]
    async fn shutdown_sends_pending_bytes_then_close() {
        let (mut stream, mut peer) = stream_and_peer(caps(1 << 20, 64 << 20)).await;
        stream.write_all(b"Terminate").await.expect("write");
        let shutdown = tokio::spawn(async move {
            stream.shutdown().await.expect("shutdown");
            stream
        });
        let first = timeout(STEP, peer.next()).await.expect("in time").expect("message").expect("no error");
        assert_eq!(first, Message::Binary(Bytes::from_static(b"Terminate")));
        let second = timeout(STEP, peer.next()).await.expect("in time").expect("message").expect("no error");
        assert!(matches!(second, Message::Close(_)), "{second:?}");
        timeout(STEP, shutdown).await.expect("shutdown in time").expect("join");
    }

    #[tokio::test]
    async fn frame_over_the_cap_is_refused() {
        let (a, b) = duplex(64 << 10);
        let mut stream = WsStream::new(WebSocketStream::from_raw_socket(a, Role::Client, Some(caps(1024, 4096))).await);
        let mut peer = WebSocketStream::from_raw_socket(b, Role::Server, None).await;
        peer.send(Message::Binary(vec![1u8; 2048].into())).await.expect("send");
        let err = timeout(STEP, stream.read(&mut [0u8; 64])).await.expect("in time").expect_err("too big");
        assert_eq!(err.kind(), io::ErrorKind::InvalidData, "{err}");
    }

    #[tokio::test]
    async fn message_over_the_cap_is_refused() {
        let (a, b) = duplex(64 << 10);
        let mut stream = WsStream::new(WebSocketStream::from_raw_socket(a, Role::Client, Some(caps(8192, 4096))).await);
        let mut peer = WebSocketStream::from_raw_socket(b, Role::Server, None).await;
        peer.send(Message::Binary(vec![1u8; 6000].into())).await.expect("send");
        let err = timeout(STEP, stream.read(&mut [0u8; 64])).await.expect("in time").expect_err("too big");
        assert_eq!(err.kind(), io::ErrorKind::InvalidData, "{err}");
    }

    #[tokio::test]
    async fn writes_wait_for_a_peer_that_does_not_read() {
        let (a, _b) = duplex(4 << 10);
        let mut stream =
            WsStream::new(WebSocketStream::from_raw_socket(a, Role::Client, Some(caps(1 << 20, 64 << 20))).await);
        let data = vec![0u8; 4 << 20];
        let mut written = 0;
        let result = timeout(Duration::from_millis(300), async {
            while written < data.len() {
                written += stream.write(&data[written..]).await.expect("write");
            }
        })
        .await;
        assert!(result.is_err(), "4 MiB were accepted without a reader");
        // What was accepted is bounded by tungstenite's write buffer plus one frame, not 4 MiB.
        assert!(written < 1 << 20, "{written} bytes accepted without a reader");
    }

    #[tokio::test]
    async fn connect_rejects_other_schemes() {
        let err = connect("http://127.0.0.1:1/", &[], WsConfig::default()).await.err().expect("must fail");
        assert!(matches!(err, WsError::InvalidUrl { .. }), "{err}");
        let err = connect("not a url", &[], WsConfig::default()).await.err().expect("must fail");
        assert!(matches!(err, WsError::InvalidUrl { .. }), "{err}");
    }

    #[tokio::test]
    async fn connect_rejects_header_values_with_newlines() {
        let headers = vec![(ACCESS_CLIENT_SECRET_HEADER.to_string(), "a\r\nb".to_string())];
        let err = connect("ws://127.0.0.1:1/", &headers, WsConfig::default()).await.err().expect("must fail");
        assert!(matches!(err, WsError::InvalidHeader { .. }), "{err}");
        assert!(!err.to_string().contains("a\r\nb"), "the value must not be shown: {err}");
    }
}
