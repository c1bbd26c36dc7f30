//! Changing a running pool's settings (RELOAD): its timeouts at once (`live`), and its size and
//! its reserve's by adding or removing slots.
//!
//! Each worker shard keeps the share of the new size it would have had at creation (the number
//! of shards stays); the reserve shard takes the new reserve size. Growing adds slots at once. Shrinking removes free slots at once and owes the
//! rest: a task takes each slot a finishing transaction gives back and retires it, until the
//! debt is paid, so no running transaction is disturbed. Idle connections beyond the new size
//! are closed.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::{share, Pool, PoolConfig, PoolSet};

impl Pool {
    /// Takes `config`: the size and the reserve's, the timeouts and the statement cache size
    /// of new connections.
    pub(super) fn reconfigure(self: &Arc<Self>, config: &PoolConfig) {
        self.live.set(config);
        let size = config.size.max(1);
        let resized = self.size.swap(size, Ordering::AcqRel) != size;
        let n = self.reserve;
        let targets = (0..n).map(|i| share(size, i, n)).chain([config.reserve_size]);
        let mut changed = false;
        for (i, target) in targets.enumerate() {
            if i < n && !resized {
                continue;
            }
            let old = self.shards[i].size.swap(target, Ordering::AcqRel);
            if target > old {
                self.grow(i, target - old);
            } else if target < old {
                self.shrink(i, old - target);
            }
            changed |= target != old;
        }
        if changed {
            self.close_idle_beyond_size();
        }
    }

    fn grow(&self, shard: usize, by: usize) {
        let s = &self.shards[shard];
        // Slots still owed from an earlier shrink simply stay.
        let paid = s.owed.fetch_update(Ordering::AcqRel, Ordering::Acquire, |owed| Some(owed.saturating_sub(by)));
        let kept = paid.map_or(0, |owed| owed.min(by));
        s.permits.add_permits(by - kept);
    }

    fn shrink(self: &Arc<Self>, shard: usize, by: usize) {
        let s = &self.shards[shard];
        let mut left = by;
        // Slots a pause holds beyond the new size go first: nobody is using them.
        {
            let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
            while left > 0 && held[shard].len() > s.size.load(Ordering::Acquire) {
                if let Some(permit) = held[shard].pop() {
                    permit.forget();
                    left -= 1;
                }
            }
        }
        left -= s.permits.forget_permits(left);
        if left == 0 {
            return;
        }
        s.owed.fetch_add(left, Ordering::AcqRel);
        let pool = self.clone();
        tokio::spawn(async move { pool.retire_owed(shard).await });
    }

    /// Retires slots given back to `shard` until none is owed.
    async fn retire_owed(self: Arc<Self>, shard: usize) {
        let s = &self.shards[shard];
        while s.owed.load(Ordering::Acquire) > 0 {
            let Ok(permit) = s.permits.clone().acquire_owned().await else { return };
            // A grow may have paid the debt while this waited: then the slot is given back.
            if s.owed.fetch_update(Ordering::AcqRel, Ordering::Acquire, |owed| owed.checked_sub(1)).is_ok() {
                permit.forget();
            }
        }
    }

    fn close_idle_beyond_size(&self) {
        let mut closing = Vec::new();
        for s in &self.shards {
            let mut idle = s.idle.lock().unwrap_or_else(|e| e.into_inner());
            let size = s.size.load(Ordering::Acquire);
            while idle.len() > size {
                // The least recently used go: the front of the list.
                closing.push(idle.remove(0));
            }
        }
        for conn in closing {
            tokio::spawn(conn.close());
        }
    }
}

impl PoolSet {
    /// Applies `config` to every pool, and to pools created from now on.
    pub fn reconfigure(&self, config: PoolConfig) {
        // Set before listing (and not held meanwhile: `get` takes these locks the other way
        // round), so a pool created in between is either listed or made with `config`.
        *self.config.lock().unwrap_or_else(|e| e.into_inner()) = config.clone();
        let pools = self.all();
        for pool in pools {
            pool.reconfigure(&config);
            if self.is_paused_database(&pool.database) {
                // New slots of a paused pool are held like the others.
                pool.hold_free_slots();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use crate::pool::{test_creds, unreachable_pools, PoolConfig, PoolError};

    fn config(size: usize) -> PoolConfig {
        PoolConfig {
            size,
            pool_timeout: Duration::from_millis(50),
            connect_timeout: Duration::from_secs(1),
            statement_cache: 10,
            ..PoolConfig::default()
        }
    }

    #[tokio::test]
    async fn growing_adds_slots_and_shrinking_retires_them_as_they_come_back() {
        let pools = unreachable_pools(2, 2, Duration::from_millis(50));
        let pool = pools.get(&test_creds());
        let a = pool.acquire_slot().await.unwrap();
        let b = pool.acquire_slot().await.unwrap();
        assert!(matches!(pool.acquire_slot().await, Err(PoolError::Timeout(_))));

        pools.reconfigure(config(3));
        assert_eq!(pool.snapshot().size, 3);
        let c = pool.acquire_slot().await.expect("a third slot");
        assert_eq!(pool.active_count(), 3);

        // Down to 1 with all three in use: nothing is taken away from anyone.
        pools.reconfigure(config(1));
        assert_eq!((pool.snapshot().size, pool.active_count()), (1, 3));
        drop((a, b));
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(pool.active_count(), 1, "two slots retired as they came back");
        assert!(matches!(pool.acquire_slot().await, Err(PoolError::Timeout(_))), "the one slot is in use");
        drop(c);
        let again = pool.acquire_slot().await.expect("the one slot");
        assert!(matches!(pool.acquire_slot().await, Err(PoolError::Timeout(_))));

        // Growing while a shrink is still owed pays the debt first.
        pools.reconfigure(config(3));
        let (x, y) = (pool.acquire_slot().await.unwrap(), pool.acquire_slot().await.unwrap());
        pools.reconfigure(config(1));
        pools.reconfigure(config(2));
        drop((again, x, y));
        tokio::time::sleep(Duration::from_millis(20)).await;
        let slots: Vec<_> = futures_util::future::join_all((0..2).map(|_| pool.acquire_slot())).await;
        assert!(slots.iter().all(Result::is_ok), "two slots");
        assert!(matches!(pool.acquire_slot().await, Err(PoolError::Timeout(_))), "no more than two");
        assert_eq!(pool.live.pool_timeout(), Duration::from_millis(50));
    }
}
