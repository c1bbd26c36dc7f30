//! Changing a running pool's settings (RELOAD): its timeouts at once (`live`), and its size by
//! adding or removing slots.
//!
//! Each shard keeps the share of the new size it would have had at creation (the number of
//! shards stays). Growing adds slots at once. Shrinking removes free slots at once and owes the
//! rest: a task takes each slot a finishing transaction gives back and retires it, until the
//! debt is paid, so no running transaction is disturbed. Idle connections beyond the new size
//! are closed.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::{share, Pool, PoolConfig, PoolSet};

impl Pool {
    /// Takes `config`: the size, the timeouts and the statement cache size of new connections.
    pub(super) fn reconfigure(self: &Arc<Self>, config: &PoolConfig) {
        self.live.set(config);
        let size = config.size.max(1);
        if self.size.swap(size, Ordering::AcqRel) == size {
            return;
        }
        let n = self.shards.len();
        for (i, shard) in self.shards.iter().enumerate() {
            let target = share(size, i, n);
            let old = shard.size.swap(target, Ordering::AcqRel);
            if target > old {
                self.grow(i, target - old);
            } else if target < old {
                self.shrink(i, old - target);
            }
        }
        self.close_idle_beyond_size();
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
        let paused = self.is_paused();
        for pool in pools {
            pool.reconfigure(&config);
            if paused {
                // New slots of a paused pool are held like the others.
                pool.hold_free_slots();
            }
        }
    }
}
