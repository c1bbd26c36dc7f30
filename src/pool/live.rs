//! A pool's settings that RELOAD can change while it serves: plain atomics, read where they are
//! used (waiting, connecting, reaping, and by the pool's clients for how long they may sit
//! idle), so a change needs no lock and costs the common path nothing. The sizes (the pool's
//! and its reserve's) are not here: resizing moves slots (`resize`).

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use super::PoolConfig;

/// A duration readable and replaceable without a lock (to the microsecond).
#[derive(Debug, Default)]
struct AtomicDuration(AtomicU64);

impl AtomicDuration {
    fn set(&self, d: Duration) {
        self.0.store(u64::try_from(d.as_micros()).unwrap_or(u64::MAX), Ordering::Relaxed);
    }

    fn get(&self) -> Duration {
        Duration::from_micros(self.0.load(Ordering::Relaxed))
    }

    fn is_zero(&self) -> bool {
        self.0.load(Ordering::Relaxed) == 0
    }
}

#[derive(Debug, Default)]
pub(super) struct LiveSettings {
    pool_timeout: AtomicDuration,
    reserve_timeout: AtomicDuration,
    connect_timeout: AtomicDuration,
    idle_timeout: AtomicDuration,
    server_lifetime: AtomicDuration,
    min_size: AtomicUsize,
    statement_cache: AtomicUsize,
    idle_transaction_timeout: AtomicDuration,
    client_idle_timeout: AtomicDuration,
    query_timeout: AtomicDuration,
}

impl LiveSettings {
    pub fn new(config: &PoolConfig) -> LiveSettings {
        let live = LiveSettings::default();
        live.set(config);
        live
    }

    /// Takes every setting but the size from `config`.
    pub fn set(&self, config: &PoolConfig) {
        self.pool_timeout.set(config.pool_timeout);
        self.reserve_timeout.set(config.reserve_timeout);
        self.connect_timeout.set(config.connect_timeout);
        self.idle_timeout.set(config.idle_timeout);
        self.server_lifetime.set(config.server_lifetime);
        self.min_size.store(config.min_size, Ordering::Relaxed);
        self.statement_cache.store(config.statement_cache, Ordering::Relaxed);
        self.idle_transaction_timeout.set(config.idle_transaction_timeout);
        self.client_idle_timeout.set(config.client_idle_timeout);
        self.query_timeout.set(config.query_timeout);
    }

    pub fn pool_timeout(&self) -> Duration {
        self.pool_timeout.get()
    }

    pub fn reserve_timeout(&self) -> Duration {
        self.reserve_timeout.get()
    }

    pub fn connect_timeout(&self) -> Duration {
        self.connect_timeout.get()
    }

    pub fn idle_timeout(&self) -> Duration {
        self.idle_timeout.get()
    }

    pub fn server_lifetime(&self) -> Duration {
        self.server_lifetime.get()
    }

    pub fn min_size(&self) -> usize {
        self.min_size.load(Ordering::Relaxed)
    }

    pub fn statement_cache(&self) -> usize {
        self.statement_cache.load(Ordering::Relaxed)
    }

    /// Whether any limit on clients' time is set: on sitting idle, or on waiting for the
    /// origin (checked at every idle moment, so no conversion to a Duration).
    pub fn limits_client_time(&self) -> bool {
        !self.idle_transaction_timeout.is_zero() || !self.client_idle_timeout.is_zero() || !self.query_timeout.is_zero()
    }

    pub fn idle_transaction_timeout(&self) -> Duration {
        self.idle_transaction_timeout.get()
    }

    pub fn client_idle_timeout(&self) -> Duration {
        self.client_idle_timeout.get()
    }

    pub fn query_timeout(&self) -> Duration {
        self.query_timeout.get()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_round_trip_and_change() {
        let mut config = PoolConfig {
            size: 5,
            pool_timeout: Duration::from_millis(1500),
            connect_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(600),
            statement_cache: 200,
            ..PoolConfig::default()
        };
        let live = LiveSettings::new(&config);
        assert!(!live.limits_client_time());
        assert_eq!(live.pool_timeout(), Duration::from_millis(1500));
        assert_eq!(live.statement_cache(), 200);
        config.pool_timeout = Duration::from_secs(2);
        config.idle_timeout = Duration::from_secs(1);
        config.idle_transaction_timeout = Duration::from_secs(3);
        live.set(&config);
        assert_eq!((live.pool_timeout(), live.idle_timeout()), (Duration::from_secs(2), Duration::from_secs(1)));
        assert_eq!(live.idle_transaction_timeout(), Duration::from_secs(3));
        assert_eq!(live.connect_timeout(), Duration::from_secs(10));
        assert!(live.limits_client_time());
        config.idle_transaction_timeout = Duration::ZERO;
        config.query_timeout = Duration::from_secs(4);
        live.set(&config);
        assert!(live.limits_client_time(), "query_timeout alone is a limit on clients' time");
        assert_eq!(live.query_timeout(), Duration::from_secs(4));
    }
}
