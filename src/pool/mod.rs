//! Origin connection pools, one per (origin user, database).
//!
//! A pool hands out at most `size` connections at once. Clients that find none free wait in
//! arrival order (tokio's semaphore is fair) for up to `pool_timeout`. Idle connections are
//! reused most-recently-used first, so a quiet pool shrinks through `idle_timeout`; each is
//! checked before reuse, so an origin restart costs no client a dead connection. A connection is
//! only ever returned by `checkin`; one that is dropped instead is closed, which is the safe
//! default for anything whose state pgwarp is unsure of.

use std::collections::{BTreeMap, HashMap};
use std::ops::{Deref, DerefMut};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::origin::settings::{sync_sql, Settings};
use crate::origin::{Credentials, OriginConn, OriginError};
use crate::protocol::error::ErrorFields;
use crate::transport::OriginTarget;

#[derive(Clone, Debug)]
pub struct PoolConfig {
    pub size: usize,
    pub pool_timeout: Duration,
    pub connect_timeout: Duration,
    pub idle_timeout: Duration,
    pub statement_cache: usize,
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

/// Caps the per-pool cache of startup parameter sets (one per distinct client settings).
const MAX_CACHED_PARAM_SETS: usize = 1024;

pub struct Pool {
    target: Arc<OriginTarget>,
    creds: Credentials,
    config: PoolConfig,
    // Boxed on purpose: checkout and checkin move a pointer, and a session holding a connection
    // stays small.
    #[allow(clippy::vec_box)]
    idle: Mutex<Vec<Box<OriginConn>>>,
    permits: Arc<Semaphore>,
    startup_params: Mutex<HashMap<Arc<Settings>, StartupParams>>,
    /// What a fresh connection reports, before any client settings.
    base_params: Mutex<Option<BTreeMap<String, String>>>,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Pool({:?})", self.creds)
    }
}

impl Pool {
    pub fn new(target: Arc<OriginTarget>, creds: Credentials, config: PoolConfig) -> Arc<Pool> {
        let pool = Arc::new(Pool {
            target,
            permits: Arc::new(Semaphore::new(config.size)),
            creds,
            config,
            idle: Mutex::new(Vec::new()),
            startup_params: Mutex::new(HashMap::new()),
            base_params: Mutex::new(None),
        });
        spawn_reaper(Arc::downgrade(&pool), pool.config.idle_timeout);
        pool
    }

    pub fn target(&self) -> &Arc<OriginTarget> {
        &self.target
    }

    /// Waits (FIFO, up to pool_timeout) for a slot, then reuses an idle connection or opens one.
    pub async fn checkout(self: &Arc<Self>) -> Result<PooledConn, PoolError> {
        let permit = self.acquire_permit().await?;
        self.checkout_with(permit).await
    }

    async fn acquire_permit(&self) -> Result<OwnedSemaphorePermit, PoolError> {
        // A free slot needs no timer: registering one per transaction is measurable.
        if let Ok(permit) = self.permits.clone().try_acquire_owned() {
            return Ok(permit);
        }
        tokio::time::timeout(self.config.pool_timeout, self.permits.clone().acquire_owned())
            .await
            .map_err(|_| PoolError::Timeout(self.config.pool_timeout))?
            .map_err(|_| PoolError::Closed)
    }

    async fn checkout_with(self: &Arc<Self>, permit: OwnedSemaphorePermit) -> Result<PooledConn, PoolError> {
        while let Some(mut conn) = self.pop_idle() {
            // One non-blocking read: cheap, and it catches an origin that restarted even a
            // moment ago (it sends FATAL 57P01 to idle connections and closes them).
            if conn.is_alive() {
                return Ok(PooledConn { conn: Some(conn), _permit: permit, pool: self.clone() });
            }
            tracing::debug!(conn = conn.id, "dropping dead idle origin connection");
        }
        let conn = Box::new(
            OriginConn::connect(&self.target, &self.creds, self.config.statement_cache, self.config.connect_timeout)
                .await?,
        );
        tracing::debug!(conn = conn.id, pid = conn.key.pid, "opened origin connection");
        *self.base_params.lock().unwrap_or_else(|e| e.into_inner()) = Some(conn.params.clone());
        Ok(PooledConn { conn: Some(conn), _permit: permit, pool: self.clone() })
    }

    fn pop_idle(&self) -> Option<Box<OriginConn>> {
        self.idle.lock().unwrap_or_else(|e| e.into_inner()).pop()
    }

    /// Returns a clean connection for reuse; a broken one is closed.
    pub fn checkin(&self, mut pooled: PooledConn) {
        let Some(mut conn) = pooled.conn.take() else {
            return;
        };
        if conn.broken || !conn.is_quiet() {
            tokio::spawn(conn.close());
            return;
        }
        if conn.out.capacity() > 64 * 1024 {
            conn.out = bytes::BytesMut::new();
        }
        conn.last_used = Instant::now();
        self.idle.lock().unwrap_or_else(|e| e.into_inner()).push(conn);
        // The permit drops with `pooled`, after the connection is idle again.
    }

    /// Idle connections right now (for tests and metrics).
    pub fn idle_count(&self) -> usize {
        self.idle.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Connections checked out right now.
    pub fn active_count(&self) -> usize {
        self.config.size - self.permits.available_permits()
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
        let permit = match (self.permits.clone().try_acquire_owned(), base) {
            (Ok(permit), _) => permit,
            (Err(_), Some(base)) => return Ok((Arc::new(overlay(&base, wanted)), false, Arc::new(wanted.clone()))),
            (Err(_), None) => self.acquire_permit().await?,
        };
        let mut pooled = self.checkout_with(permit).await?;
        if let Some(sql) = sync_sql(&pooled.applied, wanted) {
            let outcome = pooled.simple_query(&sql).await.map_err(PoolError::from)?;
            if let Some(err) = outcome.error {
                // The connection is fine, but what was applied is now unknown: RESET it all.
                pooled.applied = Settings::new();
                let reset = pooled.simple_query("RESET ALL").await.map_err(PoolError::from)?;
                if reset.error.is_some() {
                    pooled.broken = true;
                }
                self.checkin(pooled);
                return Err(StartupParamsError::Rejected(err));
            }
            pooled.applied = wanted.clone();
        }
        let params = self.remember_params(wanted, &pooled.params);
        self.checkin(pooled);
        let interned =
            self.startup_params.lock().unwrap_or_else(|e| e.into_inner()).get_key_value(wanted).map(|(k, _)| k.clone());
        Ok((params, true, interned.unwrap_or_else(|| Arc::new(wanted.clone()))))
    }

    /// Caches the parameters a connection reports after `wanted` was applied to it.
    pub fn remember_params(&self, wanted: &Settings, reported: &BTreeMap<String, String>) -> StartupParams {
        let params: StartupParams = Arc::new(reported.iter().map(|(k, v)| (k.clone(), v.clone())).collect());
        let mut cache = self.startup_params.lock().unwrap_or_else(|e| e.into_inner());
        if cache.len() >= MAX_CACHED_PARAM_SETS {
            cache.clear();
        }
        cache.insert(Arc::new(wanted.clone()), params.clone());
        params
    }

    fn reap_idle(&self) {
        let mut closing = Vec::new();
        {
            let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
            let now = Instant::now();
            let timeout = self.config.idle_timeout;
            let mut i = 0;
            while i < idle.len() {
                if now.duration_since(idle[i].last_used) >= timeout || !idle[i].is_alive() {
                    closing.push(idle.swap_remove(i));
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

    /// Closes every idle connection (shutdown).
    pub fn close_idle(&self) {
        let idle = std::mem::take(&mut *self.idle.lock().unwrap_or_else(|e| e.into_inner()));
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

fn spawn_reaper(pool: Weak<Pool>, idle_timeout: Duration) {
    let period = (idle_timeout / 4).clamp(Duration::from_millis(100), Duration::from_secs(15));
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            match pool.upgrade() {
                Some(p) => p.reap_idle(),
                None => return,
            }
        }
    });
}

/// A checked-out origin connection. Give it back with `Pool::checkin`; dropping it closes it.
pub struct PooledConn {
    conn: Option<Box<OriginConn>>,
    _permit: OwnedSemaphorePermit,
    pool: Arc<Pool>,
}

impl PooledConn {
    pub fn pool(&self) -> &Arc<Pool> {
        &self.pool
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

/// All pools, created on first use.
pub struct PoolSet {
    target: Arc<OriginTarget>,
    config: PoolConfig,
    pools: Mutex<HashMap<Credentials, Arc<Pool>>>,
}

impl PoolSet {
    pub fn new(target: OriginTarget, config: PoolConfig) -> PoolSet {
        PoolSet { target: Arc::new(target), config, pools: Mutex::new(HashMap::new()) }
    }

    pub fn get(&self, creds: &Credentials) -> Arc<Pool> {
        let mut pools = self.pools.lock().unwrap_or_else(|e| e.into_inner());
        pools
            .entry(creds.clone())
            .or_insert_with(|| Pool::new(self.target.clone(), creds.clone(), self.config.clone()))
            .clone()
    }

    pub fn all(&self) -> Vec<Arc<Pool>> {
        self.pools.lock().unwrap_or_else(|e| e.into_inner()).values().cloned().collect()
    }
}
