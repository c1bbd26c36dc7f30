//! Replacing origin connections without cutting anyone off: PgBouncer's `RECONNECT` and
//! `WAIT_CLOSE`, and a new origin address taken on RELOAD.
//!
//! Every connection belongs to the generation of its pool that was current when it was opened.
//! `reconnect` starts a new generation: idle connections of older ones are closed at once, and
//! the ones lent out are closed when they come back (never in the middle of a transaction), so
//! every transaction that starts afterwards runs on a connection opened afterwards. A new origin
//! address is a `Destination` swap followed by a reconnect of every pool. A connection opened
//! while that happens reads its generation before the address, so none of the new generation
//! can have the old address.
//!
//! Each generation counts its open connections, so `WAIT_CLOSE` can tell when the old ones are
//! all gone (say, before the old origin is shut down).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use super::{Pool, PoolSet};
use crate::origin::{OriginConn, OriginError};
use crate::transport::OriginTarget;

/// Where new origin connections go. Shared by every pool; RELOAD may replace it.
#[derive(Debug)]
pub struct Destination(RwLock<Arc<OriginTarget>>);

impl Destination {
    pub fn new(target: OriginTarget) -> Arc<Destination> {
        Arc::new(Destination(RwLock::new(Arc::new(target))))
    }

    pub fn get(&self) -> Arc<OriginTarget> {
        self.0.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn set(&self, target: OriginTarget) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(target);
    }
}

/// The connections a pool opened between two reconnects.
#[derive(Debug)]
pub(super) struct Generation {
    number: u64,
    open: AtomicUsize,
}

impl Generation {
    pub(super) fn first() -> Arc<Generation> {
        Arc::new(Generation { number: 0, open: AtomicUsize::new(0) })
    }
}

/// A connection's place in its pool's generation: counted as open until it drops.
#[derive(Debug)]
pub struct Vintage(Arc<Generation>);

impl Vintage {
    pub fn number(&self) -> u64 {
        self.0.number
    }
}

impl Drop for Vintage {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::AcqRel);
    }
}

/// How often `wait_close` looks again.
const WAIT_CLOSE_POLL: Duration = Duration::from_millis(50);
/// Connections opened in a row that a reconnect replaced before they were ready, before a
/// checkout gives up on the generation race and takes the last one.
const CONNECT_ATTEMPTS: usize = 3;

impl Pool {
    /// Enrols a connection about to be opened in the current generation. Taken before the
    /// destination is read (see the module comment).
    pub(super) fn enlist(&self) -> Vintage {
        let generations = self.generations.lock().unwrap_or_else(|e| e.into_inner());
        let current = generations.last().cloned().unwrap_or_else(Generation::first);
        current.open.fetch_add(1, Ordering::AcqRel);
        Vintage(current)
    }

    /// Opens a connection to where connections go now, in the current generation. One that a
    /// reconnect replaced while it was being opened is closed and opened again, so nothing
    /// handed out after a RELOAD goes to the old origin.
    pub(super) async fn connect_current(&self) -> Result<Box<OriginConn>, OriginError> {
        let mut attempt = 1;
        loop {
            let creds = self.creds.lock().unwrap_or_else(|e| e.into_inner()).clone();
            // The generation before the destination (see the module comment).
            let vintage = self.enlist();
            let target = self.destination.get();
            let connected =
                OriginConn::connect(&target, &creds, self.live.statement_cache(), self.live.connect_timeout()).await;
            let counter = if connected.is_ok() { &self.counters.connects } else { &self.counters.connect_failures };
            counter.fetch_add(1, Ordering::Relaxed);
            let mut conn = Box::new(connected?);
            conn.vintage = Some(vintage);
            if !self.superseded(conn.vintage.as_ref()) || attempt == CONNECT_ATTEMPTS {
                return Ok(conn);
            }
            tracing::debug!(conn = conn.id, "closing origin connection replaced while it was opened");
            tokio::spawn(conn.close());
            attempt += 1;
        }
    }

    /// What a fresh connection reports, for logins while no connection is free. Not from a
    /// replaced connection (see `remember_params`).
    pub(super) fn note_base_params(&self, conn: &OriginConn) {
        let mut base = self.base_params.lock().unwrap_or_else(|e| e.into_inner());
        if !self.superseded(conn.vintage.as_ref()) {
            *base = Some(conn.params.clone());
        }
    }

    /// Resolves when a reconnect replaces this pool's connections: a session pinned to one
    /// waits on it (enable it before checking, so none is missed).
    pub fn replacement(&self) -> tokio::sync::futures::OwnedNotified {
        self.replaced.clone().notified_owned()
    }

    /// Whether a connection belongs to a generation a reconnect has ended.
    #[inline]
    pub(super) fn superseded(&self, vintage: Option<&Vintage>) -> bool {
        vintage.is_some_and(|v| v.number() != self.generation.load(Ordering::Acquire))
    }

    /// Starts a new generation (`supersede`), and forgets the parameters cached for logins,
    /// since a new origin may report others (a new server_version).
    pub fn reconnect(&self) {
        self.supersede();
        self.startup_params.lock().unwrap_or_else(|e| e.into_inner()).clear();
        *self.base_params.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    /// Starts a new generation: idle connections are closed now, lent ones when they come
    /// back.
    fn supersede(&self) {
        {
            let mut generations = self.generations.lock().unwrap_or_else(|e| e.into_inner());
            generations.retain(|g| g.open.load(Ordering::Acquire) > 0);
            let number = self.generation.load(Ordering::Acquire) + 1;
            generations.push(Arc::new(Generation { number, open: AtomicUsize::new(0) }));
            self.generation.store(number, Ordering::Release);
        }
        self.close_idle();
        // Sessions pinned to a connection (LISTEN, temporary tables) would hold it until they
        // leave: they are told, and end at their next idle moment (`session`).
        self.replaced.notify_waiters();
    }

    /// Connections still open from generations before the current one.
    pub fn superseded_open(&self) -> usize {
        let current = self.generation.load(Ordering::Acquire);
        let generations = self.generations.lock().unwrap_or_else(|e| e.into_inner());
        generations.iter().filter(|g| g.number != current).map(|g| g.open.load(Ordering::Acquire)).sum()
    }
}

impl PoolSet {
    /// The pools of `database`, or all of them.
    pub(super) fn of_database(&self, database: Option<&str>) -> Vec<Arc<Pool>> {
        self.all().into_iter().filter(|p| database.is_none_or(|d| p.database == d)).collect()
    }

    /// RECONNECT: replaces the connections of `database`'s pools (all pools when `None`) as
    /// they come back. The number of pools it applies to.
    pub fn reconnect(&self, database: Option<&str>) -> usize {
        let pools = self.of_database(database);
        for pool in &pools {
            pool.reconnect();
        }
        pools.len()
    }

    /// KILL: closes the connections of `database`'s pools (all pools when `None`), idle ones now
    /// and lent ones as they come back. Unlike RECONNECT it keeps what logins learnt from them:
    /// the origin is the same, and a login to a paused pool need not wait for a connection.
    pub fn close_connections(&self, database: Option<&str>) {
        for pool in self.of_database(database) {
            pool.supersede();
        }
    }

    /// Sends new connections to `target` from now on, and replaces every open one as it comes
    /// back.
    pub fn retarget(&self, target: OriginTarget) {
        self.destination.set(target);
        self.reconnect(None);
    }

    /// WAIT_CLOSE: resolves once no connection of an ended generation is open in `database`'s
    /// pools (all pools when `None`).
    pub async fn wait_close(&self, database: Option<&str>) {
        while self.of_database(database).iter().any(|p| p.superseded_open() > 0) {
            tokio::time::sleep(WAIT_CLOSE_POLL).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pool::{test_creds, unreachable_pools};

    #[tokio::test]
    async fn a_reconnect_supersedes_open_connections_until_they_close() {
        let pools = unreachable_pools(2, 1, Duration::from_millis(50));
        let pool = pools.get(&test_creds());
        let old = pool.enlist();
        assert!(!pool.superseded(Some(&old)));
        assert_eq!(pool.superseded_open(), 0);

        assert_eq!(pools.reconnect(Some("elsewhere")), 0);
        assert!(!pool.superseded(Some(&old)), "another database's RECONNECT leaves this pool alone");

        assert_eq!(pools.reconnect(None), 1);
        let new = pool.enlist();
        assert!(pool.superseded(Some(&old)));
        assert!(!pool.superseded(Some(&new)));
        assert_eq!(pool.superseded_open(), 1);

        let waiting = tokio::spawn({
            let pools = Arc::new(pools);
            async move { tokio::time::timeout(Duration::from_secs(5), pools.wait_close(None)).await.is_ok() }
        });
        tokio::time::sleep(Duration::from_millis(120)).await;
        assert!(!waiting.is_finished(), "WAIT_CLOSE waits while an old connection is open");
        drop(old);
        assert_eq!(pool.superseded_open(), 0);
        assert!(waiting.await.unwrap());
        drop(new);
    }

    #[tokio::test]
    async fn ended_generations_with_nothing_open_are_forgotten() {
        let pools = unreachable_pools(2, 1, Duration::from_millis(50));
        let pool = pools.get(&test_creds());
        for _ in 0..100 {
            pool.reconnect();
        }
        assert!(pool.generations.lock().unwrap().len() <= 2);
    }
}
