//! Byte streams to clients and to the origin.
//!
//! Everything above this layer sees the origin as one `OriginStream` (anything AsyncRead +
//! AsyncWrite + Send + Sync + Unpin), whether it is plain TCP, the server's Unix-domain socket,
//! TLS or a WebSocket tunnel, and a client as a `ClientStream` (TCP, TLS or pgwarp's own
//! Unix-domain socket). Only this layer knows which.

pub mod listen;
pub mod tcp_options;
pub mod tls;
pub mod websocket;

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpStream, UnixStream};
use tokio_boring::SslStream;

use tcp_options::TcpOptions;
use tls::{OriginTls, TlsError};

/// A byte stream that can carry a Postgres connection.
pub trait ByteStream: AsyncRead + AsyncWrite + Send + Sync + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Sync + Unpin> ByteStream for T {}

/// A stream layered over an origin socket (TLS, a WebSocket, or both) whose socket can move to
/// the calling worker's reactor, as `OriginStream::rehome` moves a plain one.
pub trait Layer: ByteStream {
    /// Moves the socket under the layers; their buffered state stays as it is.
    fn rehome(&mut self) -> io::Result<()>;
}

impl<S: Layer> Layer for SslStream<S> {
    fn rehome(&mut self) -> io::Result<()> {
        self.get_mut().rehome()
    }
}

/// The origin connection's stream, whatever carries it. Plain sockets (TCP, Unix-domain) are
/// kept apart from the layered kinds (TLS, WebSocket), which hold buffers of their own and
/// are always worth a read to ask whether anything arrived (`maybe_readable`). Also the
/// stream under the tunnel's WebSocket.
pub enum OriginStream {
    Tcp(TcpStream),
    /// The server's Unix-domain socket, when the origin runs on this machine.
    Unix(UnixStream),
    Layered(Box<dyn Layer>),
    /// Between reactors inside `rehome`; never read or written.
    Moving,
}

impl OriginStream {
    /// Whether anything may have arrived since the last read drained the stream, asked without
    /// a system call: a TCP socket's readiness as the reactor last saw it. Layered streams (TLS,
    /// WebSocket) may hold bytes of their own, so for them the answer is always maybe.
    pub fn maybe_readable(&self) -> bool {
        match self {
            OriginStream::Tcp(s) => {
                let mut cx = Context::from_waker(std::task::Waker::noop());
                s.poll_read_ready(&mut cx).is_ready()
            }
            OriginStream::Unix(s) => {
                let mut cx = Context::from_waker(std::task::Waker::noop());
                s.poll_read_ready(&mut cx).is_ready()
            }
            OriginStream::Layered(_) | OriginStream::Moving => true,
        }
    }

    /// Re-registers the socket (under any layers) with the calling thread's runtime, so its
    /// readiness events wake tasks here without a cross-thread hop (see `workers`).
    /// Only for a connection nobody is waiting on. Readiness starts afresh: bytes already waiting
    /// are reported when the new reactor next polls, so right after this `maybe_readable` (and a
    /// read) may not see them yet.
    pub fn rehome(&mut self) -> io::Result<()> {
        match std::mem::replace(self, OriginStream::Moving) {
            OriginStream::Tcp(tcp) => *self = OriginStream::Tcp(TcpStream::from_std(tcp.into_std()?)?),
            OriginStream::Unix(unix) => *self = OriginStream::Unix(UnixStream::from_std(unix.into_std()?)?),
            OriginStream::Layered(mut layered) => {
                layered.rehome()?;
                *self = OriginStream::Layered(layered);
            }
            OriginStream::Moving => {}
        }
        Ok(())
    }

    /// Whether `rehome` moves this stream.
    pub fn can_rehome(&self) -> bool {
        !matches!(self, OriginStream::Moving)
    }
}

impl Layer for OriginStream {
    fn rehome(&mut self) -> io::Result<()> {
        OriginStream::rehome(self)
    }
}

fn moving() -> io::Error {
    io::Error::new(io::ErrorKind::NotConnected, "origin stream is moving between workers")
}

impl AsyncRead for OriginStream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            OriginStream::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            OriginStream::Unix(s) => Pin::new(s).poll_read(cx, buf),
            OriginStream::Layered(s) => Pin::new(s).poll_read(cx, buf),
            OriginStream::Moving => Poll::Ready(Err(moving())),
        }
    }
}

impl AsyncWrite for OriginStream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            OriginStream::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            OriginStream::Unix(s) => Pin::new(s).poll_write(cx, buf),
            OriginStream::Layered(s) => Pin::new(s).poll_write(cx, buf),
            OriginStream::Moving => Poll::Ready(Err(moving())),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            OriginStream::Tcp(s) => Pin::new(s).poll_flush(cx),
            OriginStream::Unix(s) => Pin::new(s).poll_flush(cx),
            OriginStream::Layered(s) => Pin::new(s).poll_flush(cx),
            OriginStream::Moving => Poll::Ready(Err(moving())),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            OriginStream::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            OriginStream::Unix(s) => Pin::new(s).poll_shutdown(cx),
            OriginStream::Layered(s) => Pin::new(s).poll_shutdown(cx),
            OriginStream::Moving => Poll::Ready(Err(moving())),
        }
    }
}

/// Where and how to reach the origin.
#[derive(Clone, Debug)]
pub struct OriginTarget {
    /// A host name or address, or (starting with `/`) the directory of the server's
    /// Unix-domain socket.
    pub host: String,
    pub port: u16,
    /// Postgres TLS per the origin URL's sslmode (inside the tunnel, if there is one).
    pub tls: Arc<OriginTls>,
    /// A WebSocket tunnel the origin is reached through, instead of TCP.
    pub tunnel: Option<Arc<TunnelRoute>>,
    /// Keepalive and user timeout for a TCP origin (the tunnel's are in its `WsConfig`).
    pub tcp: TcpOptions,
    /// The origin URL's other hosts, and what a server must be to be used (`origin::hosts`).
    pub choice: Arc<HostChoice>,
}

/// Which of several hosts a new origin connection goes to. The default: only `host`, any server.
#[derive(Debug, Default)]
pub struct HostChoice {
    /// The hosts after the first, in the URL's order.
    pub more_hosts: Vec<(String, u16)>,
    pub attrs: crate::config::SessionAttrs,
    /// The host that last took a connection (0: the first), tried first next time.
    pub last_good: std::sync::atomic::AtomicUsize,
}

impl HostChoice {
    /// Whether there is anything to choose: several hosts, or a server of some kind wanted.
    pub fn is_trivial(&self) -> bool {
        self.more_hosts.is_empty() && self.attrs == crate::config::SessionAttrs::Any
    }
}

/// How to reach the origin through a WebSocket tunnel.
#[derive(Clone)]
pub struct TunnelRoute {
    pub url: String,
    /// Extra upgrade-request headers: the service token.
    pub headers: Vec<(String, String)>,
    pub ws: websocket::WsConfig,
}

/// Never print the service token.
impl std::fmt::Debug for TunnelRoute {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TunnelRoute({})", self.url)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("the origin does not accept TLS, and sslmode={0} requires it")]
    TlsRefused(&'static str),
    #[error("the origin answered the TLS request with {0:?}")]
    TlsAnswer(char),
    #[error("tunnel: {0}")]
    Tunnel(#[from] websocket::WsError),
}

impl OriginTarget {
    /// Host `i` of the origin URL (0: the first), as the target a connection to it keeps:
    /// cancel requests for its backend go there.
    pub fn host(self: &Arc<Self>, i: usize) -> Arc<OriginTarget> {
        match self.choice.more_hosts.get(i.wrapping_sub(1)) {
            Some((host, port)) if i > 0 => {
                Arc::new(OriginTarget { host: host.clone(), port: *port, ..(**self).clone() })
            }
            _ => self.clone(),
        }
    }

    /// How many hosts the origin URL names.
    pub fn host_count(&self) -> usize {
        1 + self.choice.more_hosts.len()
    }

    /// Where the server is, for people: `host:port`, or its socket's path.
    pub fn place(&self) -> String {
        match crate::config::unix_socket_path(&self.host, self.port) {
            Some(path) => path.display().to_string(),
            None => format!("{}:{}", self.host, self.port),
        }
    }

    /// The server's Unix-domain socket, when the host is a directory. Never with a tunnel: the
    /// tunnel's far end decides how it reaches the server.
    fn unix_socket(&self) -> Option<std::path::PathBuf> {
        self.tunnel.is_none().then(|| crate::config::unix_socket_path(&self.host, self.port)).flatten()
    }
}

/// Opens a stream to the origin: TCP, a Unix-domain socket or the tunnel's WebSocket, then
/// Postgres TLS if sslmode asks for it (never on a Unix-domain socket, as in libpq).
pub async fn connect(target: &OriginTarget) -> Result<OriginStream, ConnectError> {
    connect_telling(target).await.map(|(stream, _)| stream)
}

/// Like `connect`, also saying what carries the stream: `tcp`, `tls`, `unix`, `websocket` or
/// `websocket+tls` (for `SHOW SERVERS`).
pub async fn connect_telling(target: &OriginTarget) -> Result<(OriginStream, &'static str), ConnectError> {
    if let Some(path) = target.unix_socket() {
        let unix = UnixStream::connect(&path)
            .await
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
        return Ok((OriginStream::Unix(unix), "unix"));
    }
    let raw: OriginStream = match &target.tunnel {
        Some(t) => OriginStream::Layered(Box::new(websocket::connect(&t.url, &t.headers, t.ws.clone()).await?)),
        None => {
            let tcp = TcpStream::connect((target.host.as_str(), target.port)).await?;
            tcp.set_nodelay(true)?;
            target.tcp.apply_or_warn(&tcp, "origin");
            OriginStream::Tcp(tcp)
        }
    };
    let (stream, tls) = negotiate_tls(target, raw).await?;
    let carrier = match (target.tunnel.is_some(), tls) {
        (false, false) => "tcp",
        (false, true) => "tls",
        (true, false) => "websocket",
        (true, true) => "websocket+tls",
    };
    Ok((stream, carrier))
}

/// SSLRequest, then the TLS handshake if the origin says 'S'; true when TLS is in use.
async fn negotiate_tls(target: &OriginTarget, mut stream: OriginStream) -> Result<(OriginStream, bool), ConnectError> {
    if !target.tls.wanted() {
        return Ok((stream, false));
    }
    let mut request = [0u8; 8];
    request[..4].copy_from_slice(&8i32.to_be_bytes());
    request[4..].copy_from_slice(&80_877_103i32.to_be_bytes());
    stream.write_all(&request).await?;
    stream.flush().await?;
    let mut answer = [0u8; 1];
    stream.read_exact(&mut answer).await?;
    match answer[0] {
        b'S' => Ok((OriginStream::Layered(Box::new(target.tls.connect(&target.host, stream).await?)), true)),
        b'N' if target.tls.required() => Err(ConnectError::TlsRefused(target.tls.mode.as_str())),
        b'N' => Ok((stream, false)),
        other => Err(ConnectError::TlsAnswer(other as char)),
    }
}

/// Where a client connected from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Peer {
    Tcp(std::net::SocketAddr),
    /// pgwarp's Unix-domain socket (`unix_socket_dir`).
    Unix,
}

impl Peer {
    /// The address as `SHOW CLIENTS` shows it: an IP address, or `unix` (PgBouncer's word).
    pub fn addr(&self) -> String {
        match self {
            Peer::Tcp(a) => a.ip().to_string(),
            Peer::Unix => "unix".to_owned(),
        }
    }

    /// The client's port; none on a Unix-domain socket.
    pub fn port(&self) -> Option<u16> {
        match self {
            Peer::Tcp(a) => Some(a.port()),
            Peer::Unix => None,
        }
    }
}

impl From<std::net::SocketAddr> for Peer {
    fn from(addr: std::net::SocketAddr) -> Peer {
        Peer::Tcp(addr)
    }
}

impl std::fmt::Display for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Peer::Tcp(a) => a.fmt(f),
            Peer::Unix => f.write_str("unix"),
        }
    }
}

/// A client's connection to pgwarp.
pub enum ClientStream {
    Tcp(TcpStream),
    Tls(Box<SslStream<TcpStream>>),
    /// On pgwarp's Unix-domain socket: never TLS, as Postgres offers none there.
    Unix(UnixStream),
    /// Taken apart for a TLS upgrade; never read or written.
    Detached,
}

fn detached() -> io::Error {
    io::Error::new(io::ErrorKind::NotConnected, "client stream is being upgraded")
}

impl ClientStream {
    /// Waits until a read would make progress, without holding a buffer while waiting: idle
    /// clients then cost no read-buffer memory.
    pub async fn readable(&self) -> io::Result<()> {
        // `poll_read_ready` parks in the socket's one reader slot, which the session's reads use
        // too: cheaper than `readable()`'s waiter list, and only this task ever waits on it.
        match self {
            ClientStream::Tcp(s) => std::future::poll_fn(|cx| s.poll_read_ready(cx)).await,
            ClientStream::Unix(s) => std::future::poll_fn(|cx| s.poll_read_ready(cx)).await,
            // Decrypted bytes may already be waiting inside the TLS layer.
            ClientStream::Tls(s) if s.ssl().pending() > 0 => Ok(()),
            ClientStream::Tls(s) => std::future::poll_fn(|cx| s.get_ref().poll_read_ready(cx)).await,
            ClientStream::Detached => Err(detached()),
        }
    }

    pub fn is_tls(&self) -> bool {
        matches!(self, ClientStream::Tls(_))
    }

    /// The common name of the certificate a TLS client presented (see `tls_client_ca_file`).
    pub fn peer_common_name(&self) -> Option<String> {
        match self {
            ClientStream::Tls(s) => tls::peer_common_name(s),
            _ => None,
        }
    }

    /// On pgwarp's Unix-domain socket: a client on this machine, for whom TLS is neither
    /// offered nor required.
    pub fn is_unix(&self) -> bool {
        matches!(self, ClientStream::Unix(_))
    }

    /// Runs the TLS handshake on a plain connection.
    pub async fn upgrade(&mut self, tls: &tls::ClientTls) -> Result<(), TlsError> {
        if !matches!(self, ClientStream::Tcp(_)) {
            return Err(TlsError::Handshake("connection is not plain TCP".into()));
        }
        let ClientStream::Tcp(tcp) = std::mem::replace(self, ClientStream::Detached) else {
            return Err(TlsError::Handshake("connection is not plain TCP".into()));
        };
        *self = ClientStream::Tls(Box::new(tls.accept(tcp).await?));
        Ok(())
    }
}

impl AsyncRead for ClientStream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ClientStream::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            ClientStream::Unix(s) => Pin::new(s).poll_read(cx, buf),
            ClientStream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            ClientStream::Detached => Poll::Ready(Err(detached())),
        }
    }
}

impl AsyncWrite for ClientStream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            ClientStream::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            ClientStream::Unix(s) => Pin::new(s).poll_write(cx, buf),
            ClientStream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            ClientStream::Detached => Poll::Ready(Err(detached())),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ClientStream::Tcp(s) => Pin::new(s).poll_flush(cx),
            ClientStream::Unix(s) => Pin::new(s).poll_flush(cx),
            ClientStream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
            ClientStream::Detached => Poll::Ready(Err(detached())),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ClientStream::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            ClientStream::Unix(s) => Pin::new(s).poll_shutdown(cx),
            ClientStream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            ClientStream::Detached => Poll::Ready(Err(detached())),
        }
    }
}
