//! PAUSE and RESUME, as PgBouncer has them: stop lending origin connections for new
//! transactions (of every database, or of one), wait until every connection is back in its
//! pool, and later let the waiting clients go. And DISABLE and ENABLE, which refuse a database's
//! new logins while its connected clients carry on.
//!
//! A pause holds every slot of every shard itself: it takes the free ones at once (before PAUSE
//! returns) and queues for all the rest in one request, like a client asking for many, so each
//! slot that a finishing transaction gives back goes to the pause, ahead of any client that
//! asked after it. Clients that ask for a connection meanwhile find no free slot and wait in the
//! pool's queue behind it, with `pool_timeout` running as usual. Clients that were already
//! queued before the pause are served first (the queue is first come, first served), so their
//! transactions are among those the pause waits for. Checkout and checkin are unchanged: a
//! paused pool is, to them, a busy one.
//!
//! The slots are taken by tasks of their own, not by the console that asked: the pool stays
//! paused when that console disconnects, until a RESUME from any console.
//!
//! A pause of everything leaves the pauses of single databases in effect to their own holders
//! (and waits for them too); one RESUME ends it all. PAUSE and RESUME run one at a time, so a
//! RESUME never gives back slots a PAUSE being set up counts as held.

use std::collections::{BTreeSet, HashMap};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use futures_util::future::{FutureExt, Shared};

use tokio_util::sync::CancellationToken;

use super::{Pool, PoolSet};

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum PauseError {
    #[error("already paused: RESUME first")]
    AlreadyPaused,
    #[error("not paused")]
    NotPaused,
    #[error("every database is paused: RESUME without a database name ends that")]
    AllPaused,
}

/// Resolves once a pause's holders are done.
type Held = Shared<Pin<Box<dyn Future<Output = ()> + Send>>>;

/// One pause: the token its RESUME cancels, and its holders' completion.
struct Pause {
    resume: CancellationToken,
    held: Held,
}

/// What PAUSE holds back now: every pool, or the pools of some databases.
#[derive(Default)]
pub(super) struct Pauses {
    all: Option<Pause>,
    databases: HashMap<String, Pause>,
}

impl Pauses {
    /// Whether `database`'s pools are paused.
    pub(super) fn covers(&self, database: &str) -> bool {
        self.all.is_some() || self.databases.contains_key(database)
    }
}

impl Pool {
    /// Takes every slot of every shard, waiting for those in use, until all are held or
    /// `resume` is cancelled.
    pub(super) async fn hold_slots(self: Arc<Self>, resume: CancellationToken) {
        let shards = (0..self.shards.len()).map(|s| self.hold_shard(s, &resume));
        futures_util::future::join_all(shards).await;
    }

    async fn hold_shard(&self, shard: usize, resume: &CancellationToken) {
        let permits = self.shards[shard].permits.clone();
        loop {
            // Again after each request: the pool may have grown meanwhile (RELOAD).
            let missing = self.shards[shard].size().saturating_sub(self.held_in(shard));
            if missing == 0 {
                return;
            }
            // One request for all of them keeps the pause's place in the queue: the semaphore
            // gives each returning slot to it until it has them all.
            let wanted = u32::try_from(missing).unwrap_or(u32::MAX);
            let mut permit = tokio::select! {
                permit = permits.clone().acquire_many_owned(wanted) => match permit {
                    Ok(p) => p,
                    Err(_) => return,
                },
                () = resume.cancelled() => return,
            };
            let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
            // Checked under the lock RESUME empties `held` under, after cancelling: a slot
            // taken in between is given back here, not kept forever.
            if resume.is_cancelled() {
                return;
            }
            // One permit per slot, as a shrinking pool retires them one by one (`resize`).
            while let Some(one) = permit.split(1) {
                held[shard].push(one);
                if permit.num_permits() == 0 {
                    break;
                }
            }
        }
    }

    /// Takes the free slots now, without waiting (a pool created while paused).
    pub(super) fn hold_free_slots(&self) {
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        for (shard, s) in self.shards.iter().enumerate() {
            while held[shard].len() < s.size() {
                match s.permits.clone().try_acquire_owned() {
                    Ok(p) => held[shard].push(p),
                    Err(_) => break,
                }
            }
        }
    }

    /// Gives every held slot back: clients waiting for one go ahead.
    pub(super) fn release_held(&self) {
        let released: Vec<_> =
            self.held.lock().unwrap_or_else(|e| e.into_inner()).iter_mut().map(std::mem::take).collect();
        drop(released);
    }

    pub(super) fn held_in(&self, shard: usize) -> usize {
        self.held.lock().unwrap_or_else(|e| e.into_inner())[shard].len()
    }

    /// Slots a pause holds right now.
    pub(super) fn held_total(&self) -> usize {
        self.held.lock().unwrap_or_else(|e| e.into_inner()).iter().map(Vec::len).sum()
    }
}

impl PoolSet {
    /// Pauses the pools of `database` (every pool when `None`), present and future. The
    /// returned future resolves once each of their origin connections is back in its pool:
    /// true, or false if a RESUME came first.
    pub fn pause(&self, database: Option<&str>) -> Result<impl Future<Output = bool> + Send + 'static, PauseError> {
        let _one_at_a_time = self.pausing.lock().unwrap_or_else(|e| e.into_inner());
        let resume = CancellationToken::new();
        // Pauses of single databases already in effect keep their own holders: this one waits
        // for them instead of queueing a second holder on the same slots.
        let (paused_alone, others): (Vec<Held>, Vec<String>) = {
            let state = self.paused.lock().unwrap_or_else(|e| e.into_inner());
            if state.all.is_some() || database.is_some_and(|db| state.databases.contains_key(db)) {
                return Err(PauseError::AlreadyPaused);
            }
            match database {
                None => (
                    state.databases.values().map(|p| p.held.clone()).collect(),
                    state.databases.keys().cloned().collect(),
                ),
                Some(_) => (Vec::new(), Vec::new()),
            }
        };
        // Free slots are taken before this returns: nothing is lent from here on.
        let pools: Vec<Arc<Pool>> =
            self.of_database(database).into_iter().filter(|p| !others.iter().any(|d| *d == p.database)).collect();
        for pool in &pools {
            pool.hold_free_slots();
        }
        let holders: Vec<_> = pools.iter().map(|pool| tokio::spawn(pool.clone().hold_slots(resume.clone()))).collect();
        tracing::info!(
            database = database.unwrap_or("(all)"),
            pools = holders.len(),
            "PAUSE: no new transactions; waiting for running ones to finish"
        );
        let held: Held = async move {
            futures_util::future::join_all(holders).await;
            futures_util::future::join_all(paused_alone).await;
        }
        .boxed()
        .shared();
        // Recorded after the pools were listed: a pool created in between finds the pause in
        // `get` only if it is recorded, so it is taken here, under the pools lock, as a late
        // one would be.
        {
            let mut state = self.paused.lock().unwrap_or_else(|e| e.into_inner());
            let pause = Pause { resume: resume.clone(), held: held.clone() };
            match database {
                None => state.all = Some(pause),
                Some(db) => {
                    state.databases.insert(db.to_owned(), pause);
                }
            }
        }
        for pool in self.of_database(database) {
            if !pools.iter().any(|p| Arc::ptr_eq(p, &pool)) && !others.iter().any(|d| *d == pool.database) {
                pool.hold_free_slots();
                tokio::spawn(pool.hold_slots(resume.clone()));
            }
        }
        Ok(async move {
            held.await;
            !resume.is_cancelled()
        })
    }

    /// Ends the pause of `database`, or every pause when `None`: waiting clients go ahead.
    pub fn resume(&self, database: Option<&str>) -> Result<(), PauseError> {
        let _one_at_a_time = self.pausing.lock().unwrap_or_else(|e| e.into_inner());
        let ended: Vec<Pause> = {
            let mut state = self.paused.lock().unwrap_or_else(|e| e.into_inner());
            let state = &mut *state;
            match database {
                None => state.databases.drain().map(|(_, pause)| pause).chain(state.all.take()).collect(),
                // Its slots are the pause of everything's too.
                Some(_) if state.all.is_some() => return Err(PauseError::AllPaused),
                Some(db) => state.databases.remove(db).into_iter().collect(),
            }
        };
        if ended.is_empty() {
            return Err(PauseError::NotPaused);
        }
        for pause in ended {
            pause.resume.cancel();
        }
        for pool in self.of_database(database) {
            pool.release_held();
        }
        tracing::info!(database = database.unwrap_or("(all)"), "RESUME: origin connections are lent again");
        Ok(())
    }

    /// Whether PAUSE holds back every pool.
    pub fn is_paused(&self) -> bool {
        self.paused.lock().unwrap_or_else(|e| e.into_inner()).all.is_some()
    }

    /// Whether `database`'s pools are paused (all of them, or that database's).
    pub fn is_paused_database(&self, database: &str) -> bool {
        self.paused.lock().unwrap_or_else(|e| e.into_inner()).covers(database)
    }

    /// DISABLE: new logins to `database` are refused from now on. False if they already were.
    pub fn disable(&self, database: &str) -> bool {
        self.disabled.lock().unwrap_or_else(|e| e.into_inner()).insert(database.to_owned())
    }

    /// ENABLE: `database` takes logins again. False if it was not disabled.
    pub fn enable(&self, database: &str) -> bool {
        self.disabled.lock().unwrap_or_else(|e| e.into_inner()).remove(database)
    }

    /// Whether logins to `database` are refused. Asked once per login.
    pub fn is_disabled(&self, database: &str) -> bool {
        self.disabled.lock().unwrap_or_else(|e| e.into_inner()).contains(database)
    }

    /// The databases DISABLE refuses logins to.
    pub fn disabled(&self) -> BTreeSet<String> {
        self.disabled.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::pool::{test_creds, unreachable_pools, PoolError};

    #[tokio::test]
    async fn pause_waits_for_slots_in_use_and_holds_back_new_checkouts_until_resume() {
        let pools = unreachable_pools(2, 2, Duration::from_millis(100));
        let pool = pools.get(&test_creds());
        let in_use = pool.acquire_slot().await.unwrap();
        assert_eq!(pool.active_count(), 1);

        let done = tokio::spawn(pools.pause(None).unwrap());
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!done.is_finished(), "a slot is still in use");
        assert!(pools.is_paused());
        assert_eq!(pools.pause(None).err(), Some(PauseError::AlreadyPaused));
        assert_eq!(pools.pause(Some("shop")).err(), Some(PauseError::AlreadyPaused));
        assert_eq!(pools.resume(Some("shop")), Err(PauseError::AllPaused));
        // A new transaction finds no slot and times out as in a busy pool.
        assert!(matches!(pool.acquire_slot().await, Err(PoolError::Timeout(_))));

        drop(in_use);
        assert!(tokio::time::timeout(Duration::from_secs(5), done).await.unwrap().unwrap(), "PAUSE completes");
        assert_eq!((pool.active_count(), pool.held_total()), (0, 2), "held slots are not counted as active");

        // A pool created while paused starts paused.
        let other = pools.get(&crate::origin::Credentials { database: "other".into(), ..test_creds() });
        assert_eq!(other.held_total(), 2);

        let waiting = {
            let pool = pool.clone();
            tokio::spawn(async move { pool.acquire_slot().await.map(|_| ()) })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        pools.resume(None).unwrap();
        waiting.await.unwrap().expect("RESUME lets a waiting client go");
        assert_eq!((pool.held_total(), other.held_total()), (0, 0));
        assert_eq!(pools.resume(None), Err(PauseError::NotPaused));
    }

    #[tokio::test]
    async fn a_database_pauses_alone_and_a_pause_of_everything_takes_it_over() {
        let pools = unreachable_pools(2, 1, Duration::from_millis(100));
        let shop = pools.get(&test_creds());
        let stock = pools.get(&crate::origin::Credentials { database: "stock".into(), ..test_creds() });
        assert!(tokio::time::timeout(Duration::from_secs(5), pools.pause(Some("shop")).unwrap()).await.unwrap());
        assert_eq!((shop.held_total(), stock.held_total()), (2, 0), "only shop is held");
        assert!(!pools.is_paused() && pools.is_paused_database("shop") && !pools.is_paused_database("stock"));
        assert_eq!(pools.pause(Some("shop")).err(), Some(PauseError::AlreadyPaused));
        assert!(stock.acquire_slot().await.is_ok(), "another database lends as usual");
        assert!(matches!(shop.acquire_slot().await, Err(PoolError::Timeout(_))));
        // A pool of the paused database made later starts held.
        let late = pools.get(&crate::origin::Credentials { user: "other".into(), ..test_creds() });
        assert_eq!(late.held_total(), 2);
        assert_eq!(pools.resume(Some("stock")), Err(PauseError::NotPaused));

        // Everything paused: shop's slots stay held, stock's are taken, one RESUME frees both.
        assert!(tokio::time::timeout(Duration::from_secs(5), pools.pause(None).unwrap()).await.unwrap());
        assert_eq!((shop.held_total(), stock.held_total()), (2, 2));
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(shop.held_total(), 2, "the taken-over holder gave nothing back");
        pools.resume(None).unwrap();
        assert_eq!((shop.held_total(), stock.held_total(), late.held_total()), (0, 0, 0));
        assert!(!pools.is_paused_database("shop"));

        // RESUME of one database frees only its pools.
        assert!(tokio::time::timeout(Duration::from_secs(5), pools.pause(Some("stock")).unwrap()).await.unwrap());
        assert!(tokio::time::timeout(Duration::from_secs(5), pools.pause(Some("shop")).unwrap()).await.unwrap());
        pools.resume(Some("stock")).unwrap();
        assert_eq!((shop.held_total(), stock.held_total()), (2, 0));
        pools.resume(None).unwrap();
        assert_eq!(shop.held_total(), 0);
    }

    #[tokio::test]
    async fn every_slot_given_back_goes_to_the_pause_before_a_client_that_asked_after_it() {
        let pools = unreachable_pools(2, 1, Duration::from_millis(400));
        let pool = pools.get(&test_creds());
        let (a, b) = (pool.acquire_slot().await.unwrap(), pool.acquire_slot().await.unwrap());
        let done = tokio::spawn(pools.pause(None).unwrap());
        tokio::time::sleep(Duration::from_millis(20)).await;
        let late = {
            let pool = pool.clone();
            tokio::spawn(async move { pool.acquire_slot().await.map(|_| ()) })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        drop(a);
        tokio::time::sleep(Duration::from_millis(20)).await;
        drop(b);
        assert!(tokio::time::timeout(Duration::from_secs(5), done).await.unwrap().unwrap());
        assert!(matches!(late.await.unwrap(), Err(PoolError::Timeout(_))), "the client got nothing");
        assert_eq!(pool.held_total(), 2);
    }

    #[tokio::test]
    async fn a_pause_of_everything_waits_for_an_unfinished_pause_of_one_database_and_lends_nothing() {
        let pools = unreachable_pools(1, 1, Duration::from_millis(400));
        let shop = pools.get(&test_creds());
        let stock = pools.get(&crate::origin::Credentials { database: "stock".into(), ..test_creds() });
        let in_use = shop.acquire_slot().await.unwrap();
        let shop_done = tokio::spawn(pools.pause(Some("shop")).unwrap());
        tokio::time::sleep(Duration::from_millis(20)).await;
        let late = {
            let shop = shop.clone();
            tokio::spawn(async move { shop.acquire_slot().await.map(|_| ()) })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        let all_done = tokio::spawn(pools.pause(None).unwrap());
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!all_done.is_finished(), "shop's connection is still lent");
        assert_eq!(stock.held_total(), 1, "free slots are held at once");
        drop(in_use);
        assert!(tokio::time::timeout(Duration::from_secs(5), all_done).await.unwrap().unwrap());
        assert!(shop_done.await.unwrap(), "PAUSE shop was not cut short");
        assert!(matches!(late.await.unwrap(), Err(PoolError::Timeout(_))), "the client got nothing");
        assert_eq!(pools.resume(Some("shop")), Err(PauseError::AllPaused));
        pools.resume(None).unwrap();
        assert_eq!((shop.held_total(), stock.held_total()), (0, 0));
        assert!(shop.try_slot().is_some());
    }

    #[tokio::test]
    async fn disable_and_enable_say_whether_they_changed_anything() {
        let pools = unreachable_pools(1, 1, Duration::from_millis(100));
        assert!(!pools.is_disabled("shop"));
        assert!(pools.disable("shop"));
        assert!(!pools.disable("shop"));
        assert!(pools.is_disabled("shop") && !pools.is_disabled("stock"));
        assert_eq!(pools.disabled().into_iter().collect::<Vec<_>>(), vec!["shop".to_owned()]);
        assert!(pools.enable("shop"));
        assert!(!pools.enable("shop"));
        assert!(!pools.is_disabled("shop"));
    }

    #[tokio::test]
    async fn resume_before_every_slot_is_back_cancels_the_pause() {
        let pools = unreachable_pools(1, 1, Duration::from_secs(5));
        let pool = pools.get(&test_creds());
        let in_use = pool.acquire_slot().await.unwrap();
        let done = tokio::spawn(pools.pause(None).unwrap());
        tokio::time::sleep(Duration::from_millis(20)).await;
        pools.resume(None).unwrap();
        assert!(!tokio::time::timeout(Duration::from_secs(5), done).await.unwrap().unwrap());
        drop(in_use);
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(pool.held_total(), 0, "a slot given back after RESUME is not kept");
        assert!(pool.try_slot().is_some());
    }
}
