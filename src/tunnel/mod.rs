//! `pgwarp tunnel`: the far end of the WebSocket tunnel, inside the database's private network.
//!
//! It accepts WebSocket connections (optionally over TLS), admits only upgrade requests that carry
//! the configured service token (`CF-Access-Client-Id` / `CF-Access-Client-Secret`), and for each
//! admitted one opens a connection to the Postgres server (TCP, or its Unix-domain socket) and pipes raw bytes both ways. It
//! does not look inside the Postgres protocol: Postgres authentication (and Postgres TLS, if the
//! origin wants it) runs end to end between pgwarp and the database. A semaphore caps concurrent
//! sessions; over the cap an upgrade is answered with HTTP 503. Cancelling the shutdown token stops
//! accepting, ends the running sessions, and returns from `run` once they are gone.

mod access;
mod session;

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use boring::ssl::{SslAcceptor, SslFiletype, SslMethod};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, info_span, warn, Instrument};

use crate::transport::websocket::WsConfig;
use crate::workers::Workers;
use access::ServiceToken;
use session::Shared;

/// Pause after a failed accept (out of file descriptors, ...), so the loop does not spin.
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(100);

/// How a tunnel runs.
#[derive(Clone)]
pub struct TunnelConfig {
    /// Address the WebSocket listener binds.
    pub listen: SocketAddr,
    /// The Postgres server, reached for each admitted session: host:port over TCP, or a path
    /// (starting with `/`) to its Unix-domain socket.
    pub target: String,
    /// The service token's id callers must send in `CF-Access-Client-Id`. Must not be empty.
    pub client_id: String,
    /// The service token's secret callers must send in `CF-Access-Client-Secret`. Must not be empty.
    pub client_secret: String,
    /// Certificate chain and private key (PEM files) to serve wss:// instead of ws://.
    pub tls: Option<(PathBuf, PathBuf)>,
    /// Most sessions at once; more upgrade requests are answered with HTTP 503.
    pub max_sessions: usize,
    /// Size caps for incoming frames and messages (`ca_file` is not used here).
    pub ws: WsConfig,
    /// Worker threads relaying sessions; 0 means one per CPU core.
    pub workers: usize,
    /// How long a worker polls for more I/O after work before it sleeps (see the server's
    /// `busy_poll`); zero turns it off, None is "auto".
    pub busy_poll: Option<std::time::Duration>,
}

impl fmt::Debug for TunnelConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TunnelConfig")
            .field("listen", &self.listen)
            .field("target", &self.target)
            .field("client_id", &self.client_id)
            .field("client_secret", &"<redacted>")
            .field("tls", &self.tls)
            .field("max_sessions", &self.max_sessions)
            .field("ws", &self.ws)
            .field("workers", &self.workers)
            .field("busy_poll", &self.busy_poll)
            .finish()
    }
}

/// Why a tunnel could not start.
#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    #[error("invalid tunnel configuration: {0}")]
    Config(&'static str),
    #[error("cannot use TLS certificate {cert} with key {key}: {source}")]
    Tls { cert: PathBuf, key: PathBuf, source: boring::error::ErrorStack },
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: SocketAddr, source: io::Error },
}

/// A bound tunnel, ready to `run`.
pub struct Tunnel {
    listener: TcpListener,
    local_addr: SocketAddr,
    shared: Arc<Shared>,
    /// Sessions run on these, one single-threaded runtime per core, as pgwarp's clients do.
    workers: Workers,
}

impl Tunnel {
    /// Checks the configuration, loads the TLS certificate if any, and binds the listener.
    pub async fn bind(config: TunnelConfig) -> Result<Tunnel, TunnelError> {
        if config.client_id.is_empty() || config.client_secret.is_empty() {
            return Err(TunnelError::Config("the service token id and secret must not be empty"));
        }
        if config.target.is_empty() {
            return Err(TunnelError::Config("the target (host:port of the database) must not be empty"));
        }
        if config.max_sessions == 0 || config.max_sessions > Semaphore::MAX_PERMITS {
            return Err(TunnelError::Config("max_sessions must be at least 1 and at most 2^61 - 1"));
        }
        let tls = match &config.tls {
            Some((cert, key)) => Some(tls_acceptor(cert, key).map_err(|source| TunnelError::Tls {
                cert: cert.clone(),
                key: key.clone(),
                source,
            })?),
            None => None,
        };
        let listener = TcpListener::bind(config.listen)
            .await
            .map_err(|source| TunnelError::Bind { addr: config.listen, source })?;
        let local_addr = listener.local_addr().map_err(|source| TunnelError::Bind { addr: config.listen, source })?;
        let shared = Shared {
            target: config.target,
            token: ServiceToken::new(&config.client_id, &config.client_secret),
            tls,
            sessions: Arc::new(Semaphore::new(config.max_sessions)),
            ws: config.ws.protocol_config(),
        };
        let n = crate::workers::resolve(config.workers);
        let workers = Workers::start(n, crate::workers::resolve_busy_poll(config.busy_poll, n))
            .map_err(|source| TunnelError::Bind { addr: config.listen, source })?;
        Ok(Tunnel { listener, local_addr, shared: Arc::new(shared), workers })
    }

    /// The address the listener is bound to (useful after binding port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Accepts connections until `shutdown` is cancelled, then waits for the sessions to end
    /// (they watch the same token).
    pub async fn run(self, shutdown: CancellationToken) {
        let tls = if self.shared.tls.is_some() { "wss" } else { "ws" };
        info!(listen = %self.local_addr, target = %self.shared.target, scheme = tls, "tunnel listening");
        let sessions = TaskTracker::new();
        loop {
            let accepted = tokio::select! {
                () = shutdown.cancelled() => break,
                accepted = self.listener.accept() => accepted,
            };
            match accepted {
                Ok((tcp, peer)) => {
                    // Handed over as a plain socket: it registers with the worker's own reactor.
                    let tcp = match tcp.into_std() {
                        Ok(tcp) => tcp,
                        Err(err) => {
                            warn!(error = %err, "cannot hand a connection to a worker");
                            continue;
                        }
                    };
                    let (shared, shutdown, token) = (Arc::clone(&self.shared), shutdown.clone(), sessions.token());
                    self.workers.spawn(move || {
                        async move {
                            let _token = token;
                            match TcpStream::from_std(tcp) {
                                Ok(tcp) => session::serve(shared, tcp, shutdown).await,
                                Err(err) => warn!(error = %err, "cannot register an accepted connection"),
                            }
                        }
                        .instrument(info_span!("tunnel_session", %peer))
                    });
                }
                Err(err) => {
                    warn!(error = %err, "accept failed");
                    tokio::select! {
                        () = shutdown.cancelled() => break,
                        () = tokio::time::sleep(ACCEPT_ERROR_BACKOFF) => {}
                    }
                }
            }
        }
        drop(self.listener);
        sessions.close();
        sessions.wait().await;
        info!("tunnel stopped");
    }
}

/// A TLS acceptor serving the certificate chain in `cert` with the private key in `key`.
fn tls_acceptor(cert: &Path, key: &Path) -> Result<SslAcceptor, boring::error::ErrorStack> {
    let mut builder = SslAcceptor::mozilla_intermediate_v5(SslMethod::tls())?;
    builder.set_certificate_chain_file(cert)?;
    builder.set_private_key_file(key, SslFiletype::PEM)?;
    builder.check_private_key()?;
    Ok(builder.build())
}
