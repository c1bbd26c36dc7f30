//! The accept loop, the state every session shares, graceful shutdown, and (in `reload`)
//! RELOAD and SIGHUP.
//!
//! Shutdown has up to three phases (`ShutdownMode`). Close (console `SHUTDOWN
//! WAIT_FOR_CLIENTS`): stop accepting and serve the clients already connected until they leave,
//! however long that takes; with `so_reuseport`, a new pgwarp on the same port takes the new
//! ones meanwhile. Drain (SIGTERM/SIGINT, `SHUTDOWN WAIT_FOR_SERVERS`): also close idle clients
//! with 57P01 and let clients inside a transaction finish. Kill (after shutdown_timeout, a
//! second signal, or plain `SHUTDOWN`): close everyone that is left. Clients hear drain and
//! kill through their slot in the cancel registry (`cancel::Stop`), which costs them nothing
//! per transaction.

mod reload;

pub use reload::{reload, ReloadError};

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::{Duration, Instant};

use std::io::ErrorKind;

use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::admin::{AdminError, AdminListener};
use crate::auth::UserDirectory;
use crate::cache::QueryCache;
use crate::cancel::{CancelRegistry, Stop};
use crate::cli::ConfigSource;
use crate::config::{Config, ConfigError, OriginUrl, SslMode};
use crate::origin::Credentials;
use crate::pool::{PoolConfig, PoolSet};
use crate::roster::{ClientEntry, Roster};
use crate::session;
use crate::transport::listen::UnixSocket;
use crate::transport::tcp_options::TcpOptions;
use crate::transport::tls::{ClientTls, OriginTls, TlsError};
use crate::transport::websocket::WsConfig;
use crate::transport::{self, ClientStream, HostChoice, OriginTarget, Peer, TunnelRoute};
use crate::workers::{self, AwaitingOrigin, Workers};

/// What every session shares.
pub struct ServerContext {
    /// The settings in effect; RELOAD replaces them (see `config()`).
    config: RwLock<Arc<Config>>,
    /// Who may log in; RELOAD rebuilds it.
    users: RwLock<Arc<UserDirectory>>,
    pub pools: PoolSet,
    pub cancels: Arc<CancelRegistry>,
    pub client_slots: Arc<Semaphore>,
    /// Client slots still to retire as clients leave, after max_client_conn shrank.
    client_slots_owed: AtomicUsize,
    /// The query cache, when enabled.
    pub cache: Option<Arc<QueryCache>>,
    /// TLS for clients, when configured.
    pub tls: Option<ClientTls>,
    /// Stops the accept loop: shutdown began, in any mode.
    closing: CancellationToken,
    /// Cancelled once the listening socket is closed.
    closed: CancellationToken,
    /// Shutdown is draining clients (every mode but WAIT_FOR_CLIENTS).
    pub drain: CancellationToken,
    /// Shutdown closes every client now (`ShutdownMode::Now`).
    killing: CancellationToken,
    /// Logins and refusals so far.
    pub clients: ClientStats,
    /// When the server was bound.
    pub started: Instant,
    /// Logged-in clients and consoles, for `SHOW CLIENTS`.
    pub client_roster: Arc<Roster<ClientEntry>>,
    /// Clients whose origin is answering them now, over every worker.
    pub awaiting_origin: AwaitingOrigin,
    /// Where RELOAD re-reads the settings from: the flags and the --config file.
    source: OnceLock<ConfigSource>,
    /// One reload at a time.
    reloading: tokio::sync::Mutex<()>,
}

impl ServerContext {
    /// The settings in effect now. Read at login and in the admin paths, never per transaction.
    pub fn config(&self) -> Arc<Config> {
        self.config.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Who may log in, and how.
    pub fn users(&self) -> Arc<UserDirectory> {
        self.users.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn max_client_conn(&self) -> usize {
        self.config().max_client_conn
    }

    /// Clients logged in or logging in right now.
    pub fn connected_clients(&self) -> usize {
        let slots = self.max_client_conn() + self.client_slots_owed.load(Ordering::Acquire);
        slots.saturating_sub(self.client_slots.available_permits())
    }

    /// Whether new clients are accepted (no shutdown has begun).
    pub fn accepting(&self) -> bool {
        !self.closing.is_cancelled()
    }

    /// Resolves once shutdown has closed the listening socket: from then on, connections to
    /// the port go to another process listening there (`so_reuseport`), or are refused.
    pub async fn listener_closed(&self) {
        self.closed.cancelled().await;
    }

    /// Begins (or hastens) shutdown. A milder mode than one already under way changes nothing.
    pub fn shutdown(&self, mode: ShutdownMode) {
        self.closing.cancel();
        if mode >= ShutdownMode::Drain {
            self.drain.cancel();
            self.cancels.stop_all(Stop::Drain);
        }
        if mode >= ShutdownMode::Now {
            self.killing.cancel();
            self.cancels.stop_all(Stop::Kill);
        }
    }
}

/// How shutdown treats the clients still connected. Ordered: each mode is harsher than the last.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum ShutdownMode {
    /// Stop accepting; serve connected clients until they leave (`SHUTDOWN WAIT_FOR_CLIENTS`).
    WaitForClients,
    /// Stop accepting, close idle clients, let open transactions finish within
    /// `shutdown_timeout` (SIGTERM, SIGINT, `SHUTDOWN WAIT_FOR_SERVERS`).
    Drain,
    /// Close every client now (plain `SHUTDOWN`, or a second signal).
    Now,
}

/// Client logins and refusals, for the metrics endpoint.
#[derive(Debug, Default)]
pub struct ClientStats {
    logins: AtomicU64,
    /// Refused connections by the SQLSTATE they were sent (a handful of codes; rare events).
    refusals: Mutex<BTreeMap<String, u64>>,
}

impl ClientStats {
    pub fn logged_in(&self) {
        self.logins.fetch_add(1, Ordering::Relaxed);
    }

    pub fn refused(&self, sqlstate: &str) {
        *self.refusals.lock().unwrap_or_else(|e| e.into_inner()).entry(sqlstate.to_owned()).or_default() += 1;
    }

    pub fn logins(&self) -> u64 {
        self.logins.load(Ordering::Relaxed)
    }

    /// Refusals so far, by SQLSTATE.
    pub fn refusals(&self) -> Vec<(String, u64)> {
        self.refusals.lock().unwrap_or_else(|e| e.into_inner()).iter().map(|(k, v)| (k.clone(), *v)).collect()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("cannot listen on {addr}: {source}")]
    Listen { addr: String, source: std::io::Error },
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("cannot start the worker threads: {0}")]
    Workers(std::io::Error),
    #[error(transparent)]
    Admin(#[from] AdminError),
}

/// After shutdown closed every client: how long clients still leaving (and logins under way,
/// which do not hear the close) get before pgwarp exits.
const KILL_GRACE: Duration = Duration::from_secs(5);

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl AbortOnDrop {
    /// Aborts the task and waits until it is gone (and what it owned dropped).
    async fn stop(mut self) {
        self.0.abort();
        let _ = (&mut self.0).await;
    }
}

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Hands an accepted client to a worker as a plain socket (`into_std`), where `register`
/// registers it with that worker's own reactor, and serves it there.
fn hand_over<S: Send + 'static>(
    ctx: &Arc<ServerContext>,
    tracker: &TaskTracker,
    workers: &Workers,
    socket: std::io::Result<S>,
    peer: Peer,
    register: fn(S) -> std::io::Result<ClientStream>,
) {
    let socket = match socket {
        Ok(socket) => socket,
        Err(e) => return tracing::warn!(error = %e, "cannot hand an accepted client to a worker"),
    };
    let (ctx, token) = (ctx.clone(), tracker.token());
    workers.spawn(move || async move {
        let _token = token;
        match register(socket) {
            Ok(stream) => session::serve_client(ctx, stream, peer).await,
            Err(e) => tracing::warn!(error = %e, "cannot register an accepted client"),
        }
    });
}

/// Accepts on the Unix-domain socket; never resolves when there is none. Cancel-safe, as
/// `UnixListener::accept` is: the accept loop's select may drop it.
async fn accept_unix(unix: Option<&UnixSocket>) -> std::io::Result<tokio::net::UnixStream> {
    match unix {
        Some(u) => u.listener().accept().await.map(|(socket, _)| socket),
        None => std::future::pending().await,
    }
}

/// Out of file descriptors and the like: backs off instead of spinning.
async fn accept_failed(e: std::io::Error) {
    tracing::warn!(error = %e, "accept failed");
    tokio::time::sleep(Duration::from_millis(50)).await;
}

/// Where and how to reach the origin: its URL's address and sslmode (whose certificate files
/// are read here), and the tunnel settings. At start and on RELOAD.
pub(crate) fn origin_target(config: &Config, origin: &OriginUrl) -> Result<OriginTarget, TlsError> {
    // No TLS on a Unix-domain socket, whatever sslmode says, as in libpq.
    let sslmode = if origin.is_unix_socket() { SslMode::Disable } else { origin.sslmode };
    if origin.is_unix_socket() && origin.sslmode >= SslMode::Require {
        tracing::warn!(
            sslmode = origin.sslmode.as_str(),
            "the origin is a Unix-domain socket: sslmode is ignored there"
        );
    }
    let origin_tls = OriginTls::new(
        sslmode,
        origin.sslrootcert.as_deref().map(Path::new),
        origin.sslcert.as_deref().map(Path::new),
        origin.sslkey.as_deref().map(Path::new),
    )?;
    let tunnel = config.tunnel_url.as_ref().map(|url| {
        let mut headers = Vec::new();
        if let Some(id) = &config.tunnel_client_id {
            headers.push(("CF-Access-Client-Id".to_owned(), id.clone()));
        }
        if let Some(secret) = &config.tunnel_client_secret {
            headers.push(("CF-Access-Client-Secret".to_owned(), secret.clone()));
        }
        let ws = WsConfig {
            ca_file: config.tunnel_ca_file.clone(),
            tcp: TcpOptions::from(config),
            ping_interval: config.tunnel_ping_interval,
            ..WsConfig::default()
        };
        Arc::new(TunnelRoute { url: url.clone(), headers, ws })
    });
    Ok(OriginTarget {
        host: origin.host.clone(),
        port: origin.port,
        tls: Arc::new(origin_tls),
        tunnel,
        tcp: TcpOptions::from(config),
        choice: Arc::new(HostChoice {
            more_hosts: origin.more_hosts.clone(),
            attrs: origin.target_session_attrs,
            last_good: Default::default(),
        }),
    })
}

/// With `min_pool_size` set, makes the pool of the origin URL's own login at start, on a
/// worker, so its connections are open before the first client (other pools are made at their
/// first login).
fn warm_default_pool(ctx: &Arc<ServerContext>, workers: &Workers) {
    let config = ctx.config();
    let Ok(origin) = config.origin_url() else { return };
    if config.min_pool_size == 0 {
        return;
    }
    let creds = Credentials::with_password(origin.user, origin.password, origin.database);
    let ctx = ctx.clone();
    workers.spawn(move || async move {
        ctx.pools.get(&creds);
    });
}

/// Triggers shutdown from outside (signals, tests).
#[derive(Clone)]
pub struct ShutdownHandle {
    ctx: Arc<ServerContext>,
}

impl ShutdownHandle {
    pub fn shutdown(&self, mode: ShutdownMode) {
        self.ctx.shutdown(mode);
    }

    /// Whether shutdown is already draining clients (a signal, or the console's SHUTDOWN).
    pub fn draining(&self) -> bool {
        self.ctx.drain.is_cancelled()
    }
}

/// Reloads what can change without a restart (SIGHUP), as the console's RELOAD does.
#[derive(Clone)]
pub struct ReloadHandle {
    ctx: Arc<ServerContext>,
}

impl ReloadHandle {
    /// Re-reads the settings and applies them; what happened goes to the log.
    pub async fn reload(&self) {
        if let Err(e) = reload(&self.ctx).await {
            tracing::error!(error = %e, "reload failed; nothing was changed");
        }
    }
}

pub struct Server {
    ctx: Arc<ServerContext>,
    listener: TcpListener,
    /// The Unix-domain socket, when `unix_socket_dir` is set.
    unix: Option<UnixSocket>,
    workers: Workers,
    /// The admin endpoint, when `admin_listen` is set.
    admin: Option<AdminListener>,
}

impl Server {
    /// Validates the configuration, prepares the users, and binds the listener.
    pub async fn bind(config: Config) -> Result<Server, ServerError> {
        config.validate()?;
        crate::roster::clock::start();
        let origin = config.origin_url()?;
        let users = UserDirectory::build(&config, &origin).await?;
        let target = origin_target(&config, &origin)?;
        let tls = match (&config.tls_cert, &config.tls_key) {
            (Some(cert), Some(key)) => Some(ClientTls::load(cert, key, config.tls_client_ca_file.as_deref())?),
            _ => None,
        };
        let n = workers::resolve(config.workers);
        let workers =
            Workers::start(n, workers::resolve_busy_poll(config.busy_poll, n)).map_err(ServerError::Workers)?;
        let pools = PoolSet::new(target, PoolConfig::from(&config), workers.len());
        let listen_error = |source| ServerError::Listen { addr: config.listen.clone(), source };
        let addr = config.listen.parse().map_err(|e| listen_error(std::io::Error::new(ErrorKind::InvalidInput, e)))?;
        let listener = transport::listen::listen(addr, config.so_reuseport).map_err(listen_error)?;
        let admin = match &config.admin_listen {
            Some(addr) => Some(AdminListener::bind(addr, config.so_reuseport)?),
            None => None,
        };
        // Last: taking over another pgwarp's socket cannot be undone, so nothing may fail after.
        let unix = match config.unix_socket(listener.local_addr().map_err(listen_error)?.port()) {
            Some(path) => Some(
                transport::listen::listen_unix(&path, config.unix_socket_mode, config.so_reuseport)
                    .await
                    .map_err(|source| ServerError::Listen { addr: path.display().to_string(), source })?,
            ),
            None => None,
        };
        let ctx = Arc::new(ServerContext {
            users: RwLock::new(Arc::new(users)),
            client_slots_owed: AtomicUsize::new(0),
            source: OnceLock::new(),
            reloading: tokio::sync::Mutex::new(()),
            pools,
            cancels: Arc::new(CancelRegistry::default()),
            client_slots: Arc::new(Semaphore::new(config.max_client_conn)),
            cache: config.cache.enabled.then(|| QueryCache::new(config.cache.clone())),
            tls,
            closing: CancellationToken::new(),
            closed: CancellationToken::new(),
            drain: CancellationToken::new(),
            killing: CancellationToken::new(),
            clients: ClientStats::default(),
            started: Instant::now(),
            client_roster: Arc::new(Roster::default()),
            awaiting_origin: workers.awaiting_origin(),
            config: RwLock::new(Arc::new(config)),
        });
        Ok(Server { ctx, listener, unix, workers, admin })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Where the admin endpoint listens, when it is on.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().and_then(|a| a.local_addr().ok())
    }

    pub fn shutdown_handle(&self) -> ShutdownHandle {
        ShutdownHandle { ctx: self.ctx.clone() }
    }

    pub fn reload_handle(&self) -> ReloadHandle {
        ReloadHandle { ctx: self.ctx.clone() }
    }

    /// Where RELOAD (and SIGHUP) re-read the settings from. Without it, a reload re-reads only
    /// the TLS certificate.
    pub fn with_source(self, source: ConfigSource) -> Server {
        let _ = self.ctx.source.set(source);
        self
    }

    pub fn context(&self) -> &Arc<ServerContext> {
        &self.ctx
    }

    /// Accepts clients until shutdown, then drains them.
    pub async fn run(self) {
        let Server { ctx, listener, unix, workers, admin } = self;
        let tracker = TaskTracker::new();
        tracing::info!(
            listen = %ctx.config().listen,
            unix_socket = unix.as_ref().map(|u| u.path().display().to_string()),
            workers = workers.len(),
            busy_poll = %humantime::format_duration(workers.busy_poll()),
            "pgwarp accepting clients"
        );
        warm_default_pool(&ctx, &workers);
        // Serves until the end of shutdown, so health checks see the drain; aborted on drop.
        let mut admin = admin.map(|admin| {
            if let Ok(addr) = admin.local_addr() {
                tracing::info!(admin = %addr, "serving /metrics and /healthz");
            }
            AbortOnDrop(tokio::spawn(admin.run(ctx.clone())))
        });
        let _stats_log = AbortOnDrop(tokio::spawn(crate::admin::stats_log::run(ctx.clone())));
        // Restart-only settings: the running config's stay as they were at start.
        let tcp = TcpOptions::from(&*ctx.config());
        loop {
            tokio::select! {
                _ = ctx.closing.cancelled() => break,
                accepted = listener.accept() => match accepted {
                    Ok((socket, peer)) => {
                        let _ = socket.set_nodelay(true);
                        tcp.apply_or_warn(&socket, "client");
                        let register = |s| tokio::net::TcpStream::from_std(s).map(ClientStream::Tcp);
                        hand_over(&ctx, &tracker, &workers, socket.into_std(), peer.into(), register);
                    }
                    Err(e) => accept_failed(e).await,
                },
                accepted = accept_unix(unix.as_ref()) => match accepted {
                    Ok(socket) => {
                        let register = |s| tokio::net::UnixStream::from_std(s).map(ClientStream::Unix);
                        hand_over(&ctx, &tracker, &workers, socket.into_std(), Peer::Unix, register);
                    }
                    Err(e) => accept_failed(e).await,
                },
            }
        }
        drop(listener);
        // Removes the socket file, unless a pgwarp taking over has put its own there.
        drop(unix);
        if ctx.config().so_reuseport {
            // Another pgwarp may serve the admin port too: its health checks must not meet
            // this one's "draining" half the time.
            if let Some(admin) = admin.take() {
                admin.stop().await;
            }
        }
        ctx.closed.cancel();
        tracker.close();
        if !ctx.drain.is_cancelled() {
            tracing::info!(
                clients = tracker.len(),
                "no longer accepting clients: serving those connected until they leave"
            );
            tokio::select! {
                () = tracker.wait() => {}
                () = ctx.drain.cancelled() => {}
            }
        }
        tracing::info!(clients = tracker.len(), "shutting down: letting running transactions finish");
        tokio::select! {
            () = tracker.wait() => {}
            () = ctx.killing.cancelled() => {}
            () = tokio::time::sleep(ctx.config().shutdown_timeout) => {
                tracing::warn!(clients = tracker.len(), "shutdown timeout reached: closing remaining clients");
                ctx.cancels.stop_all(Stop::Kill);
            }
        }
        // Closed clients leave at once; a login under way is given a moment, then abandoned.
        let _ = tokio::time::timeout(KILL_GRACE, tracker.wait()).await;
        drop(admin);
        for pool in ctx.pools.all() {
            pool.close_idle();
        }
        // Let the Terminate messages go out.
        tokio::time::sleep(Duration::from_millis(50)).await;
        tracing::info!("pgwarp stopped");
    }
}
