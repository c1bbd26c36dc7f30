//! A pool's settings that RELOAD can change while it serves: plain atomics, read where they are
//! used (waiting, connecting, reaping), so a change needs no lock and costs the common path
//! nothing. The size is not here: resizing moves slots (`resize`).

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
}

#[derive(Debug, Default)]
pub(super) struct LiveSettings {
    pool_timeout: AtomicDuration,
    connect_timeout: AtomicDuration,
    idle_timeout: AtomicDuration,
    statement_cache: AtomicUsize,
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
        self.connect_timeout.set(config.connect_timeout);
        self.idle_timeout.set(config.idle_timeout);
        self.statement_cache.store(config.statement_cache, Ordering::Relaxed);
    }

    pub fn pool_timeout(&self) -> Duration {
        self.pool_timeout.get()
    }

    pub fn connect_timeout(&self) -> Duration {
        self.connect_timeout.get()
    }

    pub fn idle_timeout(&self) -> Duration {
        self.idle_timeout.get()
    }

    pub fn statement_cache(&self) -> usize {
        self.statement_cache.load(Ordering::Relaxed)
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
        };
        let live = LiveSettings::new(&config);
        assert_eq!(live.pool_timeout(), Duration::from_millis(1500));
        assert_eq!(live.statement_cache(), 200);
        config.pool_timeout = Duration::from_secs(2);
        config.idle_timeout = Duration::from_secs(1);
        live.set(&config);
        assert_eq!((live.pool_timeout(), live.idle_timeout()), (Duration::from_secs(2), Duration::from_secs(1)));
        assert_eq!(live.connect_timeout(), Duration::from_secs(10));
    }
}
