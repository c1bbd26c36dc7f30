//! Caps on origin connections that several pools share, as PgBouncer's: `max_db_connections`
//! over all pools of one database (every user's), and `max_user_connections` over all pools of
//! one origin user (every database's). Each open connection, idle or lent, holds one permit of
//! each cap its pool is under, released when the connection goes. A pool that must open a
//! connection while a cap is reached first closes an idle connection of another pool under
//! that cap; failing that it waits, and pools that get a connection back while someone waits
//! close it instead of keeping it idle. So many logins (auth_query, `[users]`) cannot together
//! open more than the origin allows.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::{Pool, PoolError, Waiting};

pub struct SharedLimit {
    permits: Arc<Semaphore>,
    /// Pools waiting for a permit right now.
    waiting: AtomicUsize,
    /// The pools under this cap, to take idle connections from.
    pools: Mutex<Vec<Weak<Pool>>>,
}

impl SharedLimit {
    pub fn new(max: usize) -> Arc<SharedLimit> {
        Arc::new(SharedLimit {
            permits: Arc::new(Semaphore::new(max)),
            waiting: AtomicUsize::new(0),
            pools: Mutex::default(),
        })
    }

    pub fn register(&self, pool: &Arc<Pool>) {
        let mut pools = self.pools.lock().unwrap_or_else(|e| e.into_inner());
        pools.retain(|p| p.strong_count() > 0);
        pools.push(Arc::downgrade(pool));
    }

    /// A permit without waiting or closing anything (for connections opened ahead of need).
    pub fn try_admit(&self) -> Option<OwnedSemaphorePermit> {
        self.permits.clone().try_acquire_owned().ok()
    }

    /// A permit for one more connection: at once under the cap; else after closing an idle
    /// connection of one of the pools under the cap; else when one closes, within `timeout`.
    pub async fn admit(&self, timeout: Duration) -> Result<OwnedSemaphorePermit, PoolError> {
        if let Some(permit) = self.try_admit() {
            return Ok(permit);
        }
        // Counted before looking for an idle connection, so one checked in meanwhile is closed
        // for us rather than kept.
        let _waiting = Waiting::new(&self.waiting);
        self.close_one_idle();
        match tokio::time::timeout(timeout, self.permits.clone().acquire_owned()).await {
            Ok(Ok(permit)) => Ok(permit),
            Ok(Err(_)) => Err(PoolError::Closed),
            Err(_) => Err(PoolError::Timeout(timeout)),
        }
    }

    /// Whether a pool is waiting to open a connection.
    pub fn wanted(&self) -> bool {
        self.waiting.load(Ordering::Relaxed) > 0
    }

    /// Closes the least recently used idle connection of any of the pools under the cap.
    fn close_one_idle(&self) {
        let pools: Vec<Arc<Pool>> =
            self.pools.lock().unwrap_or_else(|e| e.into_inner()).iter().filter_map(Weak::upgrade).collect();
        let oldest = pools
            .iter()
            .filter_map(|p| p.oldest_idle_use().map(|used| (used, p)))
            .min_by_key(|(used, _)| *used)
            .map(|(_, p)| p);
        if let Some(pool) = oldest {
            pool.close_oldest_idle();
        }
    }
}
