//! The set of all pools, one per (origin user, database), created on first use.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
#[cfg(test)]
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::{Pool, PoolConfig};
use crate::origin::Credentials;
use crate::roster::{Roster, ServerEntry};
use crate::transport::OriginTarget;

/// All pools, created on first use.
pub struct PoolSet {
    target: Arc<OriginTarget>,
    /// What new pools are made with (RELOAD may change it).
    pub(super) config: Mutex<PoolConfig>,
    workers: usize,
    /// While paused: cancelled by RESUME.
    pub(super) paused: Mutex<Option<CancellationToken>>,
    /// By (origin user, database).
    pools: Mutex<HashMap<(String, String), Arc<Pool>>>,
    /// Every pool's open connections, for `SHOW SERVERS`.
    pub servers: Arc<Roster<ServerEntry>>,
}

impl PoolSet {
    /// Pools for clients running on `workers` worker threads.
    pub fn new(target: OriginTarget, config: PoolConfig, workers: usize) -> PoolSet {
        PoolSet {
            target: Arc::new(target),
            config: Mutex::new(config),
            workers,
            paused: Mutex::new(None),
            pools: Mutex::new(HashMap::new()),
            servers: Arc::new(Roster::default()),
        }
    }

    /// The pool of `creds`' user and database; the secret, if it changed, is used for the
    /// connections it opens from now on.
    pub fn get(&self, creds: &Credentials) -> Arc<Pool> {
        let mut pools = self.pools.lock().unwrap_or_else(|e| e.into_inner());
        let key = (creds.user.clone(), creds.database.clone());
        if let Some(pool) = pools.get(&key) {
            pool.renew_secret(&creds.secret);
            return pool.clone();
        }
        let config = self.config.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let pool = Pool::new(self.target.clone(), creds.clone(), config, self.workers, self.servers.clone());
        if self.is_paused() {
            // Under the pools lock, so PAUSE and RESUME see this pool either way round.
            pool.hold_free_slots();
        }
        pools.insert(key, pool.clone());
        pool
    }

    /// Where the origin is.
    pub fn target(&self) -> &Arc<OriginTarget> {
        &self.target
    }

    pub fn all(&self) -> Vec<Arc<Pool>> {
        self.pools.lock().unwrap_or_else(|e| e.into_inner()).values().cloned().collect()
    }
}

/// A pool set whose origin is never reached (for tests of slots, not connections).
#[cfg(test)]
pub(crate) fn unreachable_pools(size: usize, workers: usize, pool_timeout: Duration) -> PoolSet {
    use crate::config::SslMode;
    use crate::transport::tls::OriginTls;
    let target = OriginTarget {
        host: "127.0.0.1".into(),
        port: 1,
        tls: Arc::new(OriginTls::new(SslMode::Disable, None, None, None).unwrap_or_else(|e| panic!("{e}"))),
        tunnel: None,
    };
    let config = PoolConfig {
        size,
        pool_timeout,
        connect_timeout: Duration::from_secs(1),
        statement_cache: 10,
        ..PoolConfig::default()
    };
    PoolSet::new(target, config, workers)
}

#[cfg(test)]
pub(crate) fn test_creds() -> Credentials {
    Credentials::with_password("app".into(), None, "shop".into())
}
