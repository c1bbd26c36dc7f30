//! Origin connection pools, one per (origin user, database).
//!
//! A pool hands out at most `size` connections at once. Clients that find none free wait in
//! arrival order (tokio's semaphore is fair) for up to `pool_timeout`. Idle connections are
//! reused most-recently-used first, so a quiet pool shrinks through `idle_timeout`; each is
//! checked before reuse, so an origin restart costs no client a dead connection. A connection
//! older than `server_lifetime` is closed when it comes back, or by the reaper when idle. The
//! reaper also keeps `min_pool_size` connections open, opening them ahead of need.
//! `max_db_connections` caps the connections of all pools of one database, and
//! `max_user_connections` those of one origin user (`shared_limit`).
//! `RECONNECT` and a new origin address replace connections as they come back (`reconnect`).
//!
//! The pool is split into one shard per worker thread (`workers`), each with its share of
//! `size`: a client takes a slot and a connection of its own worker's shard, so the socket's
//! readiness events arrive on the thread that runs the client and a transaction never crosses
//! threads. When its shard has no free slot, a client takes another shard's free slot if there
//! is one (that connection then costs a cross-thread wake-up per round trip), so a connection
//! pinned by one client, or an uneven spread of clients, never leaves a client waiting while a
//! connection is free. Only when every shard is busy does it wait, in its own shard's queue.
//! One more shard, after the workers', is the reserve (`reserve_pool_size`, PgBouncer's): a
//! client that has waited `reserve_pool_timeout` also queues there, so a burst opens a few
//! more connections instead of waiting out `pool_timeout`. Reserve connections come back to the
//! reserve's own idle list and close after `idle_timeout` like any other. A connection is
//! only ever returned by `checkin`; one that is dropped instead is closed, which is the safe
//! default for anything whose state pgwarp is unsure of.

mod live;
mod pause;
mod reconnect;
mod resize;
mod set;
mod shared_limit;

pub use pause::PauseError;
pub use reconnect::{Destination, Vintage};
pub use set::PoolSet;

#[cfg(test)]
pub(crate) use set::{test_creds, unreachable_pools, unreachable_pools_with};

use std::collections::{BTreeMap, HashMap};
use std::ops::{Deref, DerefMut};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use live::LiveSettings;
use reconnect::Generation;
use shared_limit::SharedLimit;

use crate::config::Config;
use crate::origin::settings::{sync_sql, Settings};
use crate::origin::{Credentials, OriginConn, OriginError, OriginSecret};
use crate::protocol::error::ErrorFields;
use crate::roster::{Roster, ServerEntry, ServerFacts};
use crate::transport::OriginTarget;

/// A pool's settings, as the config gives them (see `Config` for each).
#[derive(Clone, Debug)]
pub struct PoolConfig {
    pub size: usize,
    pub pool_timeout: Duration,
    /// Extra connections for clients that waited `reserve_timeout` (zero: none).
    pub reserve_size: usize,
    pub reserve_timeout: Duration,
    pub connect_timeout: Duration,
    pub idle_timeout: Duration,
    /// Connections kept open when idle (capped at `size`).
    pub min_size: usize,
    /// Connections older than this are closed when they come back (zero: no limit).
    pub server_lifetime: Duration,
    pub statement_cache: usize,
    /// Limits on clients of this pool that hold still (zero: none).
    pub idle_transaction_timeout: Duration,
    pub client_idle_timeout: Duration,
    /// How long a client's request may wait for the origin's answer (zero: no limit).
    pub query_timeout: Duration,
    /// Connections to one database over all its pools (zero: no limit).
    pub max_db_connections: usize,
    /// Connections of one origin user over all its pools (zero: no limit).
    pub max_user_connections: usize,
}

impl From<&Config> for PoolConfig {
    fn from(c: &Config) -> PoolConfig {
        PoolConfig {
            size: c.pool_size,
            pool_timeout: c.pool_timeout,
            reserve_size: c.reserve_pool_size,
            reserve_timeout: c.reserve_pool_timeout,
            connect_timeout: c.connect_timeout,
            idle_timeout: c.idle_timeout,
            min_size: c.min_pool_size,
            server_lifetime: c.server_lifetime,
            statement_cache: c.statement_cache_size,
            idle_transaction_timeout: c.idle_transaction_timeout,
            client_idle_timeout: c.client_idle_timeout,
            query_timeout: c.query_timeout,
            max_db_connections: c.max_db_connections,
            max_user_connections: c.max_user_connections,
        }
    }
}

impl Default for PoolConfig {
    fn default() -> PoolConfig {
        PoolConfig::from(&Config::default())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("timed out after {0:?} waiting for an origin connection")]
    Timeout(Duration),
    #[error(transparent)]
    Origin(#[from] OriginError),
    #[error("the pool is shutting down")]
    Closed,
}

/// The ParameterStatus values a client with given settings sees at startup.
pub type StartupParams = Arc<Vec<(String, String)>>;

/// Why a client's startup settings could not be applied.
#[derive(Debug, thiserror::Error)]
pub enum StartupParamsError {
    #[error(transparent)]
    Pool(#[from] PoolError),
    #[error("{}", .0.message)]
    Rejected(ErrorFields),
}

/// How long a client waits for a slot of its own worker's shard before taking any shard's.
const OWN_SHARD_GRACE: Duration = Duration::from_millis(10);

/// Caps the per-pool cache of startup parameter sets (one per distinct client settings).
const MAX_CACHED_PARAM_SETS: usize = 1024;

/// One worker's part of a pool. Aligned to a cache line, so that counting one worker's
/// checkouts does not slow down another's.
#[repr(align(64))]
struct Shard {
    // Boxed on purpose: checkout and checkin move a pointer, and a session holding a
    // connection stays small.
    #[allow(clippy::vec_box)]
    idle: Mutex<Vec<Box<OriginConn>>>,
    permits: Arc<Semaphore>,
    /// This shard's share of the pool size.
    size: AtomicUsize,
    /// Slots to retire as they are given back, after the size shrank (`resize`).
    owed: AtomicUsize,
    /// Connections handed out from this shard.
    checkouts: AtomicU64,
    /// Time its connections spent lent, in microseconds.
    lent_micros: AtomicU64,
    /// What the clients of this shard's worker did (see `Traffic`).
    queries: AtomicU64,
    query_micros: AtomicU64,
    received: AtomicU64,
    sent: AtomicU64,
}

impl Shard {
    fn size(&self) -> usize {
        self.size.load(Ordering::Acquire)
    }
}

/// What happened in a pool besides checkouts, for the metrics endpoint (rare events: shared
/// counters are fine).
#[derive(Debug, Default)]
struct PoolCounters {
    /// Clients waiting for a slot right now.
    waiting: AtomicUsize,
    /// Checkouts that had to wait for a slot, and how long they waited in all.
    waits: AtomicU64,
    wait_micros: AtomicU64,
    /// Clients that gave up after pool_timeout.
    timeouts: AtomicU64,
    /// Origin connections opened, and attempts that failed.
    connects: AtomicU64,
    connect_failures: AtomicU64,
}

/// One client counted as waiting, for as long as this lives.
struct Waiting<'a>(&'a AtomicUsize);

impl<'a> Waiting<'a> {
    fn new(gauge: &'a AtomicUsize) -> Waiting<'a> {
        gauge.fetch_add(1, Ordering::Relaxed);
        Waiting(gauge)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A pool's state and counters at one moment (see `Pool::snapshot`).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PoolSnapshot {
    /// The origin role and database this pool's connections log in as.
    pub user: String,
    pub database: String,
    pub size: usize,
    pub active: usize,
    pub idle: usize,
    pub waiting: usize,
    /// Open connections a RECONNECT or a new origin replaced, not closed yet.
    pub replaced: usize,
    /// PAUSE holds the pool back (its database's, or everything's). Filled in by the caller:
    /// the pool does not know.
    pub paused: bool,
    pub checkouts: u64,
    /// Checkouts on a reserve slot (`reserve_pool_size`), counted in `checkouts` too.
    pub reserve_checkouts: u64,
    /// Time connections spent lent to clients (transactions, and pinned sessions).
    pub transaction_seconds: f64,
    /// What its clients did (`Traffic`), query time in seconds.
    pub queries: u64,
    pub query_seconds: f64,
    pub received_bytes: u64,
    pub sent_bytes: u64,
    pub waits: u64,
    pub wait_seconds: f64,
    pub timeouts: u64,
    pub connects: u64,
    pub connect_failures: u64,
}

/// What a client did through pgwarp, counted by its session and added to its pool's totals
/// now and then (`Pool::add_traffic`), as PgBouncer's `SHOW STATS` counts it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Traffic {
    /// Requests answered by the origin: a simple query, or an extended-protocol sequence up to
    /// its Sync (each ends with ReadyForQuery).
    pub queries: u64,
    /// Time from sending each of those to its ReadyForQuery, in microseconds.
    pub query_micros: u64,
    /// Bytes received from the client, and sent to it (answers from the cache included).
    pub received: u64,
    pub sent: u64,
}

/// A right to one connection of shard `shard`.
struct Slot {
    shard: usize,
    permit: OwnedSemaphorePermit,
}

pub struct Pool {
    /// Where new connections go (RELOAD may change it; see `reconnect`).
    destination: Arc<Destination>,
    /// The current generation's number (`reconnect`): read on every checkin.
    generation: AtomicU64,
    /// The current generation (last) and ended ones that still have connections open.
    generations: Mutex<Vec<Arc<Generation>>>,
    /// Who its connections log in as. The secret is the latest a login brought (a changed
    /// password, new pass-through keys): connections opened from then on use it.
    creds: Mutex<Credentials>,
    /// The role and database, which never change.
    user: String,
    database: String,
    /// Most connections lent at once.
    size: AtomicUsize,
    live: LiveSettings,
    /// One shard per worker (or fewer), then the reserve's, at index `reserve`.
    shards: Vec<Shard>,
    /// The reserve shard's index: the number of worker shards.
    reserve: usize,
    /// Slots a PAUSE holds, by shard (`pause`).
    held: Mutex<Vec<Vec<OwnedSemaphorePermit>>>,
    counters: PoolCounters,
    startup_params: Mutex<HashMap<Arc<Settings>, StartupParams>>,
    /// What a fresh connection reports, before any client settings.
    base_params: Mutex<Option<BTreeMap<String, String>>>,
    /// Notified when a reconnect replaces connections, for sessions pinned to one.
    replaced: Arc<tokio::sync::Notify>,
    /// Where its connections are listed for `SHOW SERVERS`.
    servers: Arc<Roster<ServerEntry>>,
    /// The caps it shares with other pools: its database's connections, its user's (when set).
    limits: Vec<Arc<SharedLimit>>,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Pool({}@{})", self.user, self.database)
    }
}

impl Pool {
    /// A pool for clients running on `workers` worker threads: one shard per worker, or fewer
    /// when `size` is smaller (workers then share shards).
    pub fn new(
        destination: Arc<Destination>,
        creds: Credentials,
        config: PoolConfig,
        workers: usize,
        servers: Arc<Roster<ServerEntry>>,
        limits: Vec<Arc<SharedLimit>>,
    ) -> Arc<Pool> {
        let n = workers.clamp(1, config.size.max(1));
        let sizes = (0..n).map(|i| share(config.size, i, n)).chain([config.reserve_size]);
        let shards = sizes
            .map(|size| Shard {
                idle: Mutex::new(Vec::new()),
                permits: Arc::new(Semaphore::new(size)),
                size: AtomicUsize::new(size),
                owed: AtomicUsize::new(0),
                checkouts: AtomicU64::new(0),
                lent_micros: AtomicU64::new(0),
                queries: AtomicU64::new(0),
                query_micros: AtomicU64::new(0),
                received: AtomicU64::new(0),
                sent: AtomicU64::new(0),
            })
            .collect();
        let pool = Arc::new(Pool {
            destination,
            generation: AtomicU64::new(0),
            generations: Mutex::new(vec![Generation::first()]),
            user: creds.user.clone(),
            database: creds.database.clone(),
            creds: Mutex::new(creds),
            size: AtomicUsize::new(config.size),
            live: LiveSettings::new(&config),
            held: Mutex::new((0..=n).map(|_| Vec::new()).collect()),
            shards,
            reserve: n,
            counters: PoolCounters::default(),
            startup_params: Mutex::new(HashMap::new()),
            base_params: Mutex::new(None),
            replaced: Arc::new(tokio::sync::Notify::new()),
            servers,
            limits,
        });
        spawn_reaper(Arc::downgrade(&pool));
        pool
    }

    /// The origin database its connections log in to.
    pub fn database(&self) -> &str {
        &self.database
    }

    /// Where new connections go now.
    pub fn target(&self) -> Arc<OriginTarget> {
        self.destination.get()
    }

    /// Takes the secret a login brought, if it differs from the one in use.
    fn renew_secret(&self, latest: &OriginSecret) {
        let mut creds = self.creds.lock().unwrap_or_else(|e| e.into_inner());
        if creds.secret != *latest {
            creds.secret = latest.clone();
        }
    }

    /// Waits (FIFO, up to pool_timeout) for a slot, then reuses an idle connection or opens one,
    /// lent to `client` (its `SHOW CLIENTS` id).
    pub async fn checkout(self: &Arc<Self>, client: u64) -> Result<PooledConn, PoolError> {
        let slot = self.acquire_slot().await?;
        self.checkout_with(slot, client).await
    }

    fn own_shard(&self) -> usize {
        crate::workers::current() % self.reserve
    }

    /// A free slot of this worker's shard, without waiting. Other shards' free slots are left
    /// alone here: under load a slot is often free for a moment between a client's transactions,
    /// and taking it would move that work across threads (measured: ~10% fewer transactions).
    fn try_slot(&self) -> Option<Slot> {
        let shard = self.own_shard();
        let permit = self.shards[shard].permits.clone().try_acquire_owned().ok()?;
        Some(Slot { shard, permit })
    }

    async fn acquire_slot(&self) -> Result<Slot, PoolError> {
        // A free slot needs no timer: registering one per transaction is measurable.
        if let Some(slot) = self.try_slot() {
            return Ok(slot);
        }
        // Boxed, like connecting: kept out of the common path's future.
        Box::pin(self.wait_for_slot()).await
    }

    /// Waits for a slot, counted in the pool's metrics.
    async fn wait_for_slot(&self) -> Result<Slot, PoolError> {
        let counters = &self.counters;
        let started = Instant::now();
        let result = {
            // Counted until the wait ends, also when the client leaves while waiting.
            let _waiting = Waiting::new(&counters.waiting);
            self.wait_in_queues(started).await
        };
        match &result {
            Ok(_) => {
                counters.waits.fetch_add(1, Ordering::Relaxed);
                let waited = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
                counters.wait_micros.fetch_add(waited, Ordering::Relaxed);
            }
            Err(PoolError::Timeout(_)) => {
                counters.timeouts.fetch_add(1, Ordering::Relaxed);
            }
            Err(_) => {}
        }
        result
    }

    async fn wait_in_queues(&self, started: Instant) -> Result<Slot, PoolError> {
        let shard = self.own_shard();
        let timeout = self.live.pool_timeout();
        let give_up = started + timeout;
        // First in this worker's own queue: when every shard is busy, its clients are served by
        // its connections, without crossing threads. A shard left with no slots (RELOAD made
        // the pool smaller than the number of shards) has nothing to wait for.
        let mut widen_at = match (self.reserve, self.shards[shard].size()) {
            (1, _) => None,
            (_, 0) => Some(started),
            _ => Some(started + OWN_SHARD_GRACE),
        };
        // The reserve: never ahead of the other shards; at once when one of its connections
        // is open and idle (a burst opened it, and opening is what the timeout holds back);
        // else after reserve_pool_timeout (zero turns the reserve off, as in PgBouncer).
        let reserve_timeout = self.live.reserve_timeout();
        let mut reserve_at = (self.shards[self.reserve].size() > 0 && !reserve_timeout.is_zero()).then(|| {
            let opened = !self.shards[self.reserve].idle.lock().unwrap_or_else(|e| e.into_inner()).is_empty();
            let at = if opened { started } else { started + reserve_timeout.min(timeout) };
            widen_at.map_or(at, |widen| at.max(widen))
        });
        let mut shards = vec![shard];
        let mut queues = vec![Box::pin(self.shards[shard].permits.clone().acquire_owned())];
        loop {
            let until = [widen_at, reserve_at].into_iter().flatten().fold(give_up, Instant::min);
            let any = futures_util::future::select_all(queues.iter_mut());
            match tokio::time::timeout_at(until.into(), any).await.map(|(permit, i, _)| (permit, i)) {
                Ok((Ok(permit), i)) => return Ok(Slot { shard: shards[i], permit }),
                Ok((Err(_), _)) => return Err(PoolError::Closed),
                Err(_) if until >= give_up => return Err(PoolError::Timeout(timeout)),
                Err(_) => {}
            }
            let now = Instant::now();
            // Then in every shard's queue at once, taking the first slot any of them frees: a
            // shard held by pinned clients must not keep its worker's clients waiting. The
            // client keeps its place in its own queue, so those waiting there are still served
            // in arrival order.
            if widen_at.is_some_and(|at| at <= now) {
                widen_at = None;
                for other in (0..self.reserve).filter(|&s| s != shard) {
                    shards.push(other);
                    queues.push(Box::pin(self.shards[other].permits.clone().acquire_owned()));
                }
            }
            // And, having waited reserve_pool_timeout, in the reserve's.
            if reserve_at.is_some_and(|at| at <= now) {
                reserve_at = None;
                shards.push(self.reserve);
                queues.push(Box::pin(self.shards[self.reserve].permits.clone().acquire_owned()));
            }
        }
    }

    async fn checkout_with(self: &Arc<Self>, slot: Slot, client: u64) -> Result<PooledConn, PoolError> {
        self.shards[slot.shard].checkouts.fetch_add(1, Ordering::Relaxed);
        while let Some(mut conn) = self.pop_idle(slot.shard) {
            // One non-blocking read: cheap, and it catches an origin that restarted even a
            // moment ago (it sends FATAL 57P01 to idle connections and closes them). One a
            // reconnect has superseded is closed here if it was still idle.
            if self.superseded(conn.vintage.as_ref()) {
                tokio::spawn(conn.close());
                continue;
            }
            if conn.is_alive() {
                if let Some(listing) = &conn.listing {
                    listing.lend(client);
                }
                return Ok(PooledConn {
                    conn: Some(conn),
                    shard: slot.shard,
                    lent_at: Instant::now(),
                    _permit: slot.permit,
                    pool: self.clone(),
                });
            }
            tracing::debug!(conn = conn.id, "dropping dead idle origin connection");
        }
        let hold = if self.limits.is_empty() { Vec::new() } else { Box::pin(self.admit()).await? };
        self.connect_new(slot, client, hold).await
    }

    /// A permit of every shared cap for one more connection, within `pool_timeout` in all: the
    /// database's first, then the user's, always in that order.
    async fn admit(&self) -> Result<Vec<OwnedSemaphorePermit>, PoolError> {
        let timeout = self.live.pool_timeout();
        let started = Instant::now();
        let mut hold = Vec::with_capacity(self.limits.len());
        for limit in &self.limits {
            match limit.admit(timeout.saturating_sub(started.elapsed())).await {
                Ok(permit) => hold.push(permit),
                // What the whole wait took, not just its last part.
                Err(PoolError::Timeout(_)) => return Err(PoolError::Timeout(timeout)),
                Err(e) => return Err(e),
            }
        }
        Ok(hold)
    }

    /// A permit of every shared cap without waiting or closing anything, or none.
    fn try_admit(&self) -> Option<Vec<OwnedSemaphorePermit>> {
        self.limits.iter().map(|limit| limit.try_admit()).collect()
    }

    /// Opens a new connection in `slot`, lent to `client`, holding `hold` (its share of
    /// `max_db_connections` and `max_user_connections`) for as long as it is open.
    async fn connect_new(
        self: &Arc<Self>,
        slot: Slot,
        client: u64,
        hold: Vec<OwnedSemaphorePermit>,
    ) -> Result<PooledConn, PoolError> {
        // Boxed: connecting (TLS, tunnel, authentication) is a large future, and inline it would
        // make every session's per-burst future that large.
        let mut conn = Box::pin(self.connect_current()).await?;
        conn.hold = hold;
        tracing::debug!(conn = conn.id, pid = conn.key.pid, "opened origin connection");
        let listing = self.servers.add(ServerEntry::new(ServerFacts {
            id: conn.id,
            user: self.user.clone(),
            database: self.database.clone(),
            pid: conn.key.pid,
            transport: conn.carrier,
        }));
        listing.lend(client);
        conn.listing = Some(listing);
        self.note_base_params(&conn);
        Ok(PooledConn {
            conn: Some(conn),
            shard: slot.shard,
            lent_at: Instant::now(),
            _permit: slot.permit,
            pool: self.clone(),
        })
    }

    /// The shard's most recently used idle connection. One its own worker did not open (its
    /// shard is shared, or it was opened by a client borrowing the slot) moves to the calling
    /// worker (TLS and WebSocket ones too), so connections end up where they are used; so does a
    /// reserve connection, which any worker may use.
    fn pop_idle(&self, shard: usize) -> Option<Box<OriginConn>> {
        let mut conn = self.shards[shard].idle.lock().unwrap_or_else(|e| e.into_inner()).pop()?;
        let used_here = shard == self.own_shard() || shard == self.reserve;
        if used_here && conn.home() != crate::workers::current() {
            conn.rehome();
        }
        Some(conn)
    }

    /// Returns a clean connection for reuse; a broken one is closed.
    pub fn checkin(&self, mut pooled: PooledConn) {
        let Some(mut conn) = pooled.conn.take() else {
            return;
        };
        let lent = u64::try_from(pooled.lent_at.elapsed().as_micros()).unwrap_or(u64::MAX);
        self.shards[pooled.shard].lent_micros.fetch_add(lent, Ordering::Relaxed);
        if conn.broken || !conn.is_quiet() {
            tokio::spawn(conn.close());
            return;
        }
        // Another pool under one of its caps waits to open a connection and nobody here waits
        // for this one: it is worth more there.
        if self.limits.iter().any(|l| l.wanted()) && self.counters.waiting.load(Ordering::Relaxed) == 0 {
            tracing::debug!(conn = conn.id, "closing origin connection: a shared cap, wanted by another pool");
            tokio::spawn(conn.close());
            return;
        }
        let now = Instant::now();
        if self.outlived(&conn, now) {
            tracing::debug!(conn = conn.id, "closing origin connection: server_lifetime reached");
            tokio::spawn(conn.close());
            return;
        }
        if conn.out.capacity() > 64 * 1024 {
            conn.out = bytes::BytesMut::new();
        }
        conn.last_used = now;
        let mut idle = self.shards[pooled.shard].idle.lock().unwrap_or_else(|e| e.into_inner());
        // Under the idle lock, which a reconnect takes after starting a new generation: either
        // this sees the new generation, or the reconnect finds the connection idle and closes it.
        if self.superseded(conn.vintage.as_ref()) {
            drop(idle);
            tracing::debug!(conn = conn.id, "closing origin connection: RECONNECT, or the origin changed");
            tokio::spawn(conn.close());
            return;
        }
        if let Some(listing) = &conn.listing {
            listing.returned(conn.statements.len());
        }
        idle.push(conn);
        // The permit drops with `pooled`, after the connection is idle again.
    }

    /// Whether the connection has been open longer than `server_lifetime`.
    fn outlived(&self, conn: &OriginConn, now: Instant) -> bool {
        let lifetime = self.live.server_lifetime();
        !lifetime.is_zero() && now.duration_since(conn.created) >= lifetime
    }

    /// Whether its clients have a limit on sitting idle (inside a transaction or outside) or on
    /// waiting for the origin.
    pub fn limits_client_time(&self) -> bool {
        self.live.limits_client_time()
    }

    /// How long a request of a client of this pool may wait for the origin (zero: no limit).
    pub fn query_timeout(&self) -> Duration {
        self.live.query_timeout()
    }

    /// How long a client of this pool may sit idle (zero: no limit): `idle_transaction_timeout`
    /// inside a transaction, `client_idle_timeout` outside one.
    pub fn holding_still_limit(&self, in_transaction: bool) -> Duration {
        if in_transaction {
            self.live.idle_transaction_timeout()
        } else {
            self.live.client_idle_timeout()
        }
    }

    /// Adds what a client of this pool did to the pool's totals (on the calling worker's
    /// shard, so workers do not share the counters' cache line).
    pub fn add_traffic(&self, t: &Traffic) {
        let shard = &self.shards[self.own_shard()];
        for (counter, n) in [
            (&shard.queries, t.queries),
            (&shard.query_micros, t.query_micros),
            (&shard.received, t.received),
            (&shard.sent, t.sent),
        ] {
            if n != 0 {
                counter.fetch_add(n, Ordering::Relaxed);
            }
        }
    }

    /// Idle connections right now (for tests and metrics).
    pub fn idle_count(&self) -> usize {
        self.shards.iter().map(|s| s.idle.lock().unwrap_or_else(|e| e.into_inner()).len()).sum()
    }

    /// Connections checked out right now: slots neither free, nor held by a PAUSE, nor owed
    /// after a shrink.
    pub fn active_count(&self) -> usize {
        let taken: usize = self
            .shards
            .iter()
            .map(|s| (s.size() + s.owed.load(Ordering::Acquire)).saturating_sub(s.permits.available_permits()))
            .sum();
        taken.saturating_sub(self.held_total())
    }

    /// The pool's state and counters now, for the metrics endpoint and the admin console.
    pub fn snapshot(&self) -> PoolSnapshot {
        let c = &self.counters;
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let sum = |f: fn(&Shard) -> &AtomicU64| self.shards.iter().map(|s| load(f(s))).sum::<u64>();
        PoolSnapshot {
            user: self.user.clone(),
            database: self.database.clone(),
            size: self.size.load(Ordering::Acquire),
            active: self.active_count(),
            idle: self.idle_count(),
            waiting: c.waiting.load(Ordering::Relaxed),
            replaced: self.superseded_open(),
            paused: false,
            checkouts: self.shards.iter().map(|s| load(&s.checkouts)).sum(),
            reserve_checkouts: load(&self.shards[self.reserve].checkouts),
            transaction_seconds: sum(|s| &s.lent_micros) as f64 / 1e6,
            queries: sum(|s| &s.queries),
            query_seconds: sum(|s| &s.query_micros) as f64 / 1e6,
            received_bytes: sum(|s| &s.received),
            sent_bytes: sum(|s| &s.sent),
            waits: load(&c.waits),
            wait_seconds: load(&c.wait_micros) as f64 / 1e6,
            timeouts: load(&c.timeouts),
            connects: load(&c.connects),
            connect_failures: load(&c.connect_failures),
        }
    }

    /// The ParameterStatus values for a client with these settings, and whether the origin has
    /// accepted the settings. Known sets come from the cache. Otherwise, when a connection is
    /// free, the settings are applied and validated now (an invalid value is the origin's own
    /// error); when none is free, the login does not wait: the answer is the origin's values
    /// overlaid with the client's, and the session validates them on first use.
    /// The settings come back interned: clients with equal settings share one copy.
    pub async fn startup_params(
        self: &Arc<Self>,
        wanted: Settings,
    ) -> Result<(StartupParams, bool, Arc<Settings>), StartupParamsError> {
        if let Some((k, p)) = self.startup_params.lock().unwrap_or_else(|e| e.into_inner()).get_key_value(&wanted) {
            return Ok((p.clone(), true, k.clone()));
        }
        let wanted = &wanted;
        let base = self.base_params.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let slot = match (self.try_slot(), base) {
            (Some(slot), _) => slot,
            (None, Some(base)) => return Ok((Arc::new(overlay(&base, wanted)), false, Arc::new(wanted.clone()))),
            (None, None) => self.acquire_slot().await?,
        };
        // Client 0: pgwarp's own work (this login's check), not yet a listed client.
        let mut pooled = self.checkout_with(slot, 0).await?;
        if let Some(sql) = sync_sql(pooled.applied(), wanted) {
            let outcome = pooled.simple_query(&sql).await.map_err(PoolError::from)?;
            if let Some(err) = outcome.error {
                // The connection is fine, but what was applied is now unknown: RESET it all.
                pooled.set_applied(Settings::new());
                let reset = pooled.simple_query("RESET ALL").await.map_err(PoolError::from)?;
                if reset.error.is_some() {
                    pooled.broken = true;
                }
                self.checkin(pooled);
                return Err(StartupParamsError::Rejected(err));
            }
            pooled.set_applied(wanted.clone());
        }
        let params = self.remember_params(wanted, &pooled);
        self.checkin(pooled);
        let interned =
            self.startup_params.lock().unwrap_or_else(|e| e.into_inner()).get_key_value(wanted).map(|(k, _)| k.clone());
        Ok((params, true, interned.unwrap_or_else(|| Arc::new(wanted.clone()))))
    }

    /// Caches the parameters `conn` reports after `wanted` was applied to it. Not from a
    /// connection a reconnect replaced: the next origin may report others.
    pub fn remember_params(&self, wanted: &Settings, conn: &OriginConn) -> StartupParams {
        let params: StartupParams = Arc::new(conn.params.iter().map(|(k, v)| (k.clone(), v.clone())).collect());
        let mut cache = self.startup_params.lock().unwrap_or_else(|e| e.into_inner());
        // Under the lock a reconnect clears the cache under, after starting a new generation.
        if self.superseded(conn.vintage.as_ref()) {
            return params;
        }
        if cache.len() >= MAX_CACHED_PARAM_SETS {
            cache.clear();
        }
        cache.insert(Arc::new(wanted.clone()), params.clone());
        params
    }

    /// Connections open now: lent out (or being opened) and idle.
    fn open_count(&self) -> usize {
        self.active_count() + self.idle_count()
    }

    /// Open connections that count towards `min_pool_size`: all but the reserve's idle ones,
    /// which are for bursts and close after `idle_timeout` whatever the minimum.
    fn kept_count(&self) -> usize {
        let reserve_idle = self.shards[self.reserve].idle.lock().unwrap_or_else(|e| e.into_inner()).len();
        self.open_count().saturating_sub(reserve_idle)
    }

    /// `min_pool_size`, capped at the pool's size.
    fn min_open(&self) -> usize {
        self.live.min_size().min(self.size.load(Ordering::Acquire))
    }

    /// Closes idle connections that died, outlived `server_lifetime`, or sat idle past
    /// `idle_timeout` (those of worker shards only down to `min_pool_size`).
    fn reap_idle(&self) {
        let mut closing = Vec::new();
        let mut kept = self.kept_count();
        let min = self.min_open();
        for (index, shard) in self.shards.iter().enumerate() {
            let reserve = index == self.reserve;
            let mut idle = shard.idle.lock().unwrap_or_else(|e| e.into_inner());
            let now = Instant::now();
            let timeout = self.live.idle_timeout();
            let mut i = 0;
            while i < idle.len() {
                let unused = now.duration_since(idle[i].last_used) >= timeout && (reserve || kept > min);
                let superseded = self.superseded(idle[i].vintage.as_ref());
                if unused || superseded || self.outlived(&idle[i], now) || !idle[i].is_alive() {
                    closing.push(idle.swap_remove(i));
                    if !reserve {
                        kept = kept.saturating_sub(1);
                    }
                } else {
                    i += 1;
                }
            }
        }
        for conn in closing {
            tracing::debug!(conn = conn.id, "closing idle origin connection");
            tokio::spawn(conn.close());
        }
    }

    /// Opens connections until `min_pool_size` are open, one at a time (a warm-up, not a burst
    /// at the origin), each in the free slot of the shard with the fewest idle ones, so every
    /// worker has some. Stops at the first failure, to try again at the reaper's next turn.
    async fn refill(self: &Arc<Self>) {
        while self.kept_count() < self.min_open() {
            let Some(slot) = self.emptiest_free_slot() else { return };
            // Never past a shared cap, nor at another pool's expense.
            let Some(hold) = self.try_admit() else { return };
            match self.connect_new(slot, 0, hold).await {
                Ok(pooled) => self.checkin(pooled),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot open the connections min_pool_size keeps");
                    return;
                }
            }
        }
    }

    /// A free slot of the worker shard with the fewest idle connections (never the reserve's).
    fn emptiest_free_slot(&self) -> Option<Slot> {
        let mut shards: Vec<(usize, usize)> = (0..self.reserve)
            .map(|s| (self.shards[s].idle.lock().unwrap_or_else(|e| e.into_inner()).len(), s))
            .collect();
        shards.sort_unstable();
        shards.into_iter().find_map(|(_, shard)| {
            let permit = self.shards[shard].permits.clone().try_acquire_owned().ok()?;
            Some(Slot { shard, permit })
        })
    }

    /// When the least recently used idle connection was last used.
    fn oldest_idle_use(&self) -> Option<Instant> {
        self.shards
            .iter()
            .filter_map(|s| s.idle.lock().unwrap_or_else(|e| e.into_inner()).first().map(|c| c.last_used))
            .min()
    }

    /// Closes the least recently used idle connection, if any.
    fn close_oldest_idle(&self) {
        let oldest = self
            .shards
            .iter()
            .enumerate()
            .filter_map(|(i, s)| s.idle.lock().unwrap_or_else(|e| e.into_inner()).first().map(|c| (c.last_used, i)))
            .min();
        let Some((_, shard)) = oldest else { return };
        let mut idle = self.shards[shard].idle.lock().unwrap_or_else(|e| e.into_inner());
        if !idle.is_empty() {
            let conn = idle.remove(0);
            tracing::debug!(conn = conn.id, "closing idle origin connection for another pool (a shared cap)");
            tokio::spawn(conn.close());
        }
    }

    /// Closes every idle connection (shutdown, RECONNECT).
    pub fn close_idle(&self) {
        let idle: Vec<_> = self
            .shards
            .iter()
            .flat_map(|s| std::mem::take(&mut *s.idle.lock().unwrap_or_else(|e| e.into_inner())))
            .collect();
        for conn in idle {
            tokio::spawn(conn.close());
        }
    }
}

/// The origin's values with the client's settings in place of those it reports
/// (Postgres matches setting names case-insensitively).
fn overlay(base: &BTreeMap<String, String>, wanted: &Settings) -> Vec<(String, String)> {
    base.iter()
        .map(|(k, v)| {
            let mine = wanted.iter().find(|(w, _)| w.eq_ignore_ascii_case(k)).map(|(_, v)| v);
            (k.clone(), mine.unwrap_or(v).clone())
        })
        .collect()
}

fn spawn_reaper(pool: Weak<Pool>) {
    // A quarter of the shorter limit, so a connection outlives neither by much.
    let period = |p: &Pool| {
        let limits = [p.live.idle_timeout(), p.live.server_lifetime()];
        let shortest = limits.into_iter().filter(|d| !d.is_zero()).min().unwrap_or(Duration::MAX);
        (shortest / 4).clamp(Duration::from_millis(100), Duration::from_secs(15))
    };
    tokio::spawn(async move {
        // At once (a new pool opens its min_pool_size connections), then every period, which
        // follows the limits RELOAD may change. The pool is held only while working on it.
        while let Some(p) = pool.upgrade() {
            p.reap_idle();
            p.refill().await;
            let wait = period(&p);
            drop(p);
            tokio::time::sleep(wait).await;
        }
    });
}

/// A checked-out origin connection. Give it back with `Pool::checkin`; dropping it closes it.
pub struct PooledConn {
    conn: Option<Box<OriginConn>>,
    shard: usize,
    /// When it was handed out (for the pool's `transaction_seconds`).
    lent_at: Instant,
    _permit: OwnedSemaphorePermit,
    pool: Arc<Pool>,
}

impl PooledConn {
    pub fn pool(&self) -> &Arc<Pool> {
        &self.pool
    }

    /// Whether a RECONNECT or a new origin replaced this connection: it closes when given back.
    pub fn is_replaced(&self) -> bool {
        self.pool.superseded(self.vintage.as_ref())
    }
}

impl std::fmt::Debug for PooledConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PooledConn({:?})", self.conn)
    }
}

impl Deref for PooledConn {
    type Target = OriginConn;
    fn deref(&self) -> &OriginConn {
        // Only `checkin` and `Drop` take the connection out, and both consume the PooledConn.
        self.conn.as_ref().unwrap_or_else(|| unreachable!())
    }
}

impl DerefMut for PooledConn {
    fn deref_mut(&mut self) -> &mut OriginConn {
        self.conn.as_mut().unwrap_or_else(|| unreachable!())
    }
}

impl Drop for PooledConn {
    fn drop(&mut self) {
        if let Some(conn) = self.conn.take() {
            tracing::debug!(conn = conn.id, "closing origin connection that was not checked in");
            if let Ok(handle) = tokio::runtime::Handle::try_current() {
                handle.spawn(conn.close());
            }
        }
    }
}

/// Shard `shard`'s part of `total` connections split `shards` ways (the first ones get the
/// remainder).
fn share(total: usize, shard: usize, shards: usize) -> usize {
    total / shards + usize::from(shard < total % shards)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pool::{test_creds, unreachable_pools_with};

    fn with_reserve(size: usize, reserve: usize, workers: usize) -> PoolSet {
        with_reserve_after(size, reserve, workers, Duration::from_millis(150))
    }

    fn with_reserve_after(size: usize, reserve: usize, workers: usize, after: Duration) -> PoolSet {
        let config = PoolConfig {
            size,
            pool_timeout: Duration::from_millis(600),
            reserve_size: reserve,
            reserve_timeout: after,
            connect_timeout: Duration::from_secs(1),
            statement_cache: 10,
            ..PoolConfig::default()
        };
        unreachable_pools_with(config, workers)
    }

    #[tokio::test]
    async fn a_client_that_waited_reserve_pool_timeout_gets_a_reserve_slot_and_no_more_than_the_reserve() {
        for workers in [1, 2] {
            let pools = with_reserve(2, 1, workers);
            let pool = pools.get(&test_creds());
            let (a, b) = (pool.acquire_slot().await.unwrap(), pool.acquire_slot().await.unwrap());
            assert_ne!(a.shard, pool.reserve, "free slots first: {workers} workers");

            let started = Instant::now();
            let extra = pool.acquire_slot().await.expect("a reserve slot");
            let waited = started.elapsed();
            assert_eq!(extra.shard, pool.reserve);
            assert!(waited >= Duration::from_millis(140) && waited < Duration::from_millis(550), "{waited:?}");
            assert_eq!(pool.active_count(), 3);

            // Pool and reserve both in use: the next one waits out pool_timeout.
            let started = Instant::now();
            assert!(matches!(pool.acquire_slot().await, Err(PoolError::Timeout(_))));
            assert!(started.elapsed() >= Duration::from_millis(590));

            // A slot given back goes to the next waiter, reserve or not.
            let waiter = {
                let pool = pool.clone();
                tokio::spawn(async move { pool.acquire_slot().await })
            };
            tokio::time::sleep(Duration::from_millis(20)).await;
            drop(a);
            let next = waiter.await.unwrap().unwrap();
            assert_ne!(next.shard, pool.reserve);
            drop((b, next, extra));
        }
    }

    #[tokio::test]
    async fn without_a_reserve_a_client_waits_out_pool_timeout() {
        // No reserve slots, or (as in PgBouncer) a zero reserve_pool_timeout.
        for pools in [with_reserve(1, 0, 1), with_reserve_after(1, 2, 1, Duration::ZERO)] {
            let pool = pools.get(&test_creds());
            let _a = pool.acquire_slot().await.unwrap();
            let started = Instant::now();
            assert!(matches!(pool.acquire_slot().await, Err(PoolError::Timeout(_))));
            assert!(started.elapsed() >= Duration::from_millis(590));
        }
    }

    #[tokio::test]
    async fn a_short_reserve_timeout_never_takes_the_reserve_ahead_of_another_workers_free_slot() {
        let pools = with_reserve_after(2, 1, 2, Duration::from_millis(1));
        let pool = pools.get(&test_creds());
        let a = pool.acquire_slot().await.unwrap();
        let b = pool.acquire_slot().await.unwrap();
        assert_ne!(b.shard, pool.reserve, "the other worker's slot was free");
        assert_ne!(a.shard, b.shard);
        assert_eq!(pool.acquire_slot().await.unwrap().shard, pool.reserve);
    }

    #[tokio::test]
    async fn pause_holds_the_reserve_and_reload_resizes_it() {
        let pools = with_reserve(1, 1, 1);
        let pool = pools.get(&test_creds());
        assert!(tokio::time::timeout(Duration::from_secs(5), pools.pause(None).unwrap()).await.unwrap());
        assert_eq!(pool.held_total(), 2, "the pool's slot and the reserve's");
        assert!(matches!(pool.acquire_slot().await, Err(PoolError::Timeout(_))), "nothing is lent while paused");
        pools.resume(None).unwrap();

        let _a = pool.acquire_slot().await.unwrap();
        let config = |reserve| PoolConfig { reserve_size: reserve, ..pool_config(&pools) };
        pools.reconfigure(config(2));
        let (x, y) = (pool.acquire_slot().await.unwrap(), pool.acquire_slot().await.unwrap());
        assert_eq!((x.shard, y.shard), (pool.reserve, pool.reserve), "two reserve slots after RELOAD");
        pools.reconfigure(config(0));
        drop((x, y));
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(matches!(pool.acquire_slot().await, Err(PoolError::Timeout(_))), "the reserve is gone");
    }

    fn pool_config(pools: &PoolSet) -> PoolConfig {
        pools.config.lock().unwrap().clone()
    }

    #[test]
    fn shares_add_up_to_the_pool_size() {
        for total in 1..40 {
            for shards in 1..=total.min(8) {
                let parts: Vec<usize> = (0..shards).map(|s| share(total, s, shards)).collect();
                assert_eq!(parts.iter().sum::<usize>(), total, "{total} split {shards} ways");
                assert!(parts.iter().all(|&p| p >= 1));
            }
        }
        assert_eq!(share(20, 0, 2), 10);
        assert_eq!((share(3, 0, 2), share(3, 1, 2)), (2, 1));
    }
}
