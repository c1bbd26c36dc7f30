//! Byte streams to clients and to the origin.
//!
//! Everything above this layer sees the origin as one `OriginStream` (anything AsyncRead +
//! AsyncWrite + Send + Sync + Unpin), whether it is plain TCP, TLS or a WebSocket tunnel, and a
//! client as a `ClientStream`. Only this layer knows which.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// A byte stream that can carry a Postgres connection.
pub trait ByteStream: AsyncRead + AsyncWrite + Send + Sync + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Sync + Unpin> ByteStream for T {}

/// The origin connection's stream, whatever carries it.
pub type OriginStream = Box<dyn ByteStream>;

/// Where and how to reach the origin.
#[derive(Clone, Debug)]
pub struct OriginTarget {
    pub host: String,
    pub port: u16,
}

/// Opens a stream to the origin.
pub async fn connect(target: &OriginTarget) -> io::Result<OriginStream> {
    let tcp = TcpStream::connect((target.host.as_str(), target.port)).await?;
    tcp.set_nodelay(true)?;
    Ok(Box::new(tcp))
}

/// A client's connection to pgwarp.
pub enum ClientStream {
    Tcp(TcpStream),
}

impl ClientStream {
    /// Waits until a read would make progress, without holding a buffer while waiting: idle
    /// clients then cost no read-buffer memory.
    pub async fn readable(&self) -> io::Result<()> {
        match self {
            ClientStream::Tcp(s) => s.readable().await,
        }
    }

    pub fn peer_addr(&self) -> io::Result<std::net::SocketAddr> {
        match self {
            ClientStream::Tcp(s) => s.peer_addr(),
        }
    }
}

impl AsyncRead for ClientStream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ClientStream::Tcp(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for ClientStream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            ClientStream::Tcp(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ClientStream::Tcp(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ClientStream::Tcp(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}
