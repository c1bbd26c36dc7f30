//! One connection to the tunnel, from TLS to the end of its Postgres session.
//!
//! The order matters for what a caller without the token can reach: TLS (if configured), then the
//! WebSocket upgrade request, whose headers must carry the service token (else HTTP 403) and which
//! must find a free session slot (else HTTP 503). Only an admitted upgrade opens a connection
//! to the database; then bytes are piped both ways until either side closes. Unauthenticated
//! connections never hold a session slot, and every step before admission has a deadline.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant};

use boring::ssl::SslAcceptor;
use http::header::{HeaderValue, CONNECTION, CONTENT_LENGTH, CONTENT_TYPE};
use http::StatusCode;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpStream, UnixStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::timeout;
use tokio_tungstenite::tungstenite::handshake::server::{Callback, ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::{self};
use tokio_tungstenite::WebSocketStream;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::access::ServiceToken;
use crate::transport::tcp_options::TcpOptions;
use crate::transport::websocket::WsStream;

/// Deadline for the TLS handshake and, separately, for the WebSocket upgrade request.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Deadline for connecting to the database.
const TARGET_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// What every session of one tunnel shares.
pub(super) struct Shared {
    /// The database, host:port.
    pub(super) target: String,
    pub(super) token: ServiceToken,
    pub(super) tls: Option<SslAcceptor>,
    /// One permit per running session.
    pub(super) sessions: Arc<Semaphore>,
    pub(super) ws: WebSocketConfig,
}

/// Why an upgrade request was answered with an HTTP error.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Refusal {
    /// Missing or wrong service token: 403.
    Forbidden,
    /// Every session slot taken: 503.
    Busy,
}

#[derive(Debug, thiserror::Error)]
enum SessionError {
    #[error("handshake timed out")]
    HandshakeTimeout,
    #[error("TLS handshake failed: {0}")]
    Tls(String),
    #[error("WebSocket upgrade failed: {0}")]
    Upgrade(tungstenite::Error),
    #[error("upgrade refused: {0:?}")]
    Refused(Refusal),
    #[error("cannot reach the database at {target}: {source}")]
    Target { target: String, source: io::Error },
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("ended by shutdown")]
    Shutdown,
}

/// Bytes piped so far, each way.
#[derive(Default)]
struct Traffic {
    from_client: AtomicU64,
    to_client: AtomicU64,
}

/// Serves one accepted connection and logs how it ended. Runs inside the connection's span.
pub(super) async fn serve(shared: Arc<Shared>, tcp: TcpStream, shutdown: CancellationToken) {
    let started = Instant::now();
    let traffic = Traffic::default();
    let result = tokio::select! {
        result = run(&shared, tcp, &traffic) => result,
        () = shutdown.cancelled() => Err(SessionError::Shutdown),
    };
    let from_client = traffic.from_client.load(Ordering::Relaxed);
    let to_client = traffic.to_client.load(Ordering::Relaxed);
    let elapsed_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
    match result {
        Ok(()) => info!(from_client, to_client, elapsed_ms, "tunnel session ended"),
        Err(SessionError::Refused(Refusal::Forbidden)) => {
            warn!("upgrade refused (403): missing or wrong service token")
        }
        Err(SessionError::Refused(Refusal::Busy)) => warn!("upgrade refused (503): every session slot is taken"),
        Err(err @ (SessionError::HandshakeTimeout | SessionError::Tls(_) | SessionError::Upgrade(_))) => {
            debug!(error = %err, elapsed_ms, "connection ended before a session")
        }
        Err(err) => info!(error = %err, from_client, to_client, elapsed_ms, "tunnel session failed"),
    }
}

async fn run(shared: &Shared, tcp: TcpStream, traffic: &Traffic) -> Result<(), SessionError> {
    tcp.set_nodelay(true)?;
    // Keepalive with the system's timings, as pgwarp's own connections have by default: a
    // pgwarp that vanished does not hold its database connection here for ever.
    TcpOptions::default().apply_or_warn(&tcp, "tunnel client");
    match &shared.tls {
        Some(acceptor) => {
            let tls = timeout(HANDSHAKE_TIMEOUT, tokio_boring::accept(acceptor, tcp))
                .await
                .map_err(|_| SessionError::HandshakeTimeout)?
                .map_err(|err| SessionError::Tls(err.to_string()))?;
            upgrade_and_pipe(shared, tls, traffic).await
        }
        None => upgrade_and_pipe(shared, tcp, traffic).await,
    }
}

async fn upgrade_and_pipe<S>(shared: &Shared, stream: S, traffic: &Traffic) -> Result<(), SessionError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut gate = Gate { shared, permit: None, refusal: None };
    let upgraded =
        timeout(HANDSHAKE_TIMEOUT, tokio_tungstenite::accept_hdr_async_with_config(stream, &mut gate, Some(shared.ws)))
            .await;
    let ws = match upgraded {
        Err(_) => return Err(SessionError::HandshakeTimeout),
        Ok(Ok(ws)) => ws,
        Ok(Err(err)) => return Err(gate.refusal.map_or(SessionError::Upgrade(err), SessionError::Refused)),
    };
    // The gate completes the upgrade only after taking a permit; it is held until the end.
    let Some(_permit) = gate.permit else {
        return Err(SessionError::Refused(Refusal::Busy));
    };
    debug!("upgrade admitted");

    let db = match connect_target(&shared.target).await {
        Ok(db) => db,
        Err(source) => {
            close_with_error(ws).await;
            return Err(SessionError::Target { target: shared.target.clone(), source });
        }
    };
    let client = Metered { inner: WsStream::new(ws), bytes_read: &traffic.from_client };
    match db {
        Database::Tcp(db) => pipe(client, Metered { inner: db, bytes_read: &traffic.to_client }).await,
        Database::Unix(db) => pipe(client, Metered { inner: db, bytes_read: &traffic.to_client }).await,
    }
}

/// Copies bytes both ways until either side closes.
async fn pipe<C, D>(mut client: C, mut db: D) -> Result<(), SessionError>
where
    C: AsyncRead + AsyncWrite + Unpin,
    D: AsyncRead + AsyncWrite + Unpin,
{
    tokio::io::copy_bidirectional(&mut client, &mut db).await?;
    Ok(())
}

/// Decides on the upgrade request and keeps what it decided: the session's permit, or why the
/// request was refused.
struct Gate<'a> {
    shared: &'a Shared,
    permit: Option<OwnedSemaphorePermit>,
    refusal: Option<Refusal>,
}

impl Callback for &mut Gate<'_> {
    fn on_request(self, request: &Request, response: Response) -> Result<Response, ErrorResponse> {
        match admit(self.shared, request) {
            Ok(permit) => {
                self.permit = Some(permit);
                Ok(response)
            }
            Err(refusal) => {
                self.refusal = Some(refusal);
                Err(refusal_response(refusal))
            }
        }
    }
}

/// The admission decision for an upgrade request: the token first, then a session slot.
fn admit(shared: &Shared, request: &Request) -> Result<OwnedSemaphorePermit, Refusal> {
    if !shared.token.admits(request.headers()) {
        return Err(Refusal::Forbidden);
    }
    Arc::clone(&shared.sessions).try_acquire_owned().map_err(|_| Refusal::Busy)
}

/// The short HTTP answer to a refused upgrade; the connection closes after it.
fn refusal_response(refusal: Refusal) -> ErrorResponse {
    let (status, body) = match refusal {
        Refusal::Forbidden => (StatusCode::FORBIDDEN, "forbidden: missing or wrong service token\n"),
        Refusal::Busy => (StatusCode::SERVICE_UNAVAILABLE, "too many tunnel sessions, try again later\n"),
    };
    let mut response = ErrorResponse::new(Some(body.to_string()));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    headers.insert(CONTENT_LENGTH, HeaderValue::from(body.len()));
    headers.insert(CONNECTION, HeaderValue::from_static("close"));
    response
}

/// The connection to the database: TCP, or the server's Unix-domain socket when the tunnel runs
/// on the database's own host.
enum Database {
    Tcp(TcpStream),
    Unix(UnixStream),
}

/// Connects to `target`: a path (starting with `/`) is a Unix-domain socket, anything else host:port.
async fn connect_target(target: &str) -> io::Result<Database> {
    let timed_out = |_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out");
    if target.starts_with('/') {
        let db = timeout(TARGET_CONNECT_TIMEOUT, UnixStream::connect(target)).await.map_err(timed_out)??;
        return Ok(Database::Unix(db));
    }
    let db = timeout(TARGET_CONNECT_TIMEOUT, TcpStream::connect(target)).await.map_err(timed_out)??;
    db.set_nodelay(true)?;
    Ok(Database::Tcp(db))
}

/// Tells the client the session cannot start (close code 1011), without waiting long for it.
async fn close_with_error<S: AsyncRead + AsyncWrite + Unpin>(mut ws: WebSocketStream<S>) {
    let frame = CloseFrame { code: CloseCode::Error, reason: "cannot reach the database".into() };
    let _ = timeout(HANDSHAKE_TIMEOUT, ws.close(Some(frame))).await;
}

/// A stream that counts the bytes read from it.
struct Metered<'a, S> {
    inner: S,
    bytes_read: &'a AtomicU64,
}

impl<S: AsyncRead + Unpin> AsyncRead for Metered<'_, S> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        ready!(Pin::new(&mut this.inner).poll_read(cx, buf))?;
        this.bytes_read.fetch_add((buf.filled().len() - before) as u64, Ordering::Relaxed);
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Metered<'_, S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}
