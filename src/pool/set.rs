//! The set of all pools, one per (origin user, database), created on first use.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
#[cfg(test)]
use std::time::Duration;

use super::pause::Pauses;
use super::reconnect::Destination;
use super::shared_limit::SharedLimit;
use super::{Pool, PoolConfig};
use crate::origin::{Credentials, OriginSecret};
use crate::roster::{Roster, ServerEntry};
use crate::transport::OriginTarget;

/// All pools, created on first use.
pub struct PoolSet {
    pub(super) destination: Arc<Destination>,
    /// What new pools are made with (RELOAD may change it).
    pub(super) config: Mutex<PoolConfig>,
    workers: usize,
    /// What PAUSE holds back (`pause`).
    pub(super) paused: Mutex<Pauses>,
    /// Held while a PAUSE or RESUME is being carried out: one at a time.
    pub(super) pausing: Mutex<()>,
    /// Databases whose new logins DISABLE refuses.
    pub(super) disabled: Mutex<BTreeSet<String>>,
    pools: Mutex<HashMap<PoolKey, Arc<Pool>>>,
    /// `max_db_connections`, by database (when set).
    db_limits: Mutex<HashMap<String, Arc<SharedLimit>>>,
    /// `max_user_connections`, by origin user (when set).
    user_limits: Mutex<HashMap<String, Arc<SharedLimit>>>,
    /// Every pool's open connections, for `SHOW SERVERS`.
    pub servers: Arc<Roster<ServerEntry>>,
}

impl PoolSet {
    /// Pools for clients running on `workers` worker threads.
    pub fn new(target: OriginTarget, config: PoolConfig, workers: usize) -> PoolSet {
        PoolSet {
            destination: Destination::new(target),
            config: Mutex::new(config),
            workers,
            paused: Mutex::new(Pauses::default()),
            pausing: Mutex::new(()),
            disabled: Mutex::new(BTreeSet::new()),
            pools: Mutex::new(HashMap::new()),
            db_limits: Mutex::new(HashMap::new()),
            user_limits: Mutex::new(HashMap::new()),
            servers: Arc::new(Roster::default()),
        }
    }

    /// The pool of `creds`. A pass-through secret newer than the pool's is used for the
    /// connections it opens from now on.
    pub fn get(&self, creds: &Credentials) -> Arc<Pool> {
        let mut pools = self.pools.lock().unwrap_or_else(|e| e.into_inner());
        let key = PoolKey::of(creds);
        if let Some(pool) = pools.get(&key) {
            if creds.secret.renewable() {
                pool.renew_secret(&creds.secret);
            }
            return pool.clone();
        }
        let config = self.config.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let shared = |limits: &Mutex<HashMap<String, Arc<SharedLimit>>>, key: &str, max: usize| {
            let mut limits = limits.lock().unwrap_or_else(|e| e.into_inner());
            limits.entry(key.to_owned()).or_insert_with(|| SharedLimit::new(max)).clone()
        };
        // The database's cap first: pools always take permits in this order.
        let mut limits = Vec::new();
        if config.max_db_connections > 0 {
            limits.push(shared(&self.db_limits, &creds.database, config.max_db_connections));
        }
        if config.max_user_connections > 0 {
            limits.push(shared(&self.user_limits, &creds.user, config.max_user_connections));
        }
        let pool = Pool::new(
            self.destination.clone(),
            creds.clone(),
            config,
            self.workers,
            self.servers.clone(),
            limits.clone(),
        );
        for limit in limits {
            limit.register(&pool);
        }
        if self.is_paused_database(&creds.database) {
            // Under the pools lock, so PAUSE and RESUME see this pool either way round.
            pool.hold_free_slots();
        }
        pools.insert(key, pool.clone());
        pool
    }

    /// Where the origin is now.
    pub fn target(&self) -> Arc<OriginTarget> {
        self.destination.get()
    }

    /// A configured origin password changed (RELOAD): the pools that logged in as `user` with
    /// `old` use `new` for the connections they open from now on, and keep their clients and
    /// open connections. When a login with `new` already made a pool of its own (between the
    /// new logins and this call), the old pool keeps its key but still takes `new`.
    pub fn rotate_password(&self, user: &str, old: &OriginSecret, new: &OriginSecret) -> usize {
        let mut pools = self.pools.lock().unwrap_or_else(|e| e.into_inner());
        let moving: Vec<PoolKey> =
            pools.keys().filter(|k| k.user == user && k.fixed.as_ref() == Some(old)).cloned().collect();
        let mut moved = 0;
        for key in moving {
            let to = PoolKey { fixed: Some(new.clone()), ..key.clone() };
            if let Some(pool) = pools.get(&key) {
                pool.creds.lock().unwrap_or_else(|e| e.into_inner()).secret = new.clone();
                moved += 1;
            }
            if !pools.contains_key(&to) {
                if let Some(pool) = pools.remove(&key) {
                    pools.insert(to, pool);
                }
            }
        }
        moved
    }

    /// Whether any pool serves `database` (someone has logged in to it).
    pub fn serves(&self, database: &str) -> bool {
        self.pools.lock().unwrap_or_else(|e| e.into_inner()).keys().any(|k| k.database == database)
    }

    pub fn all(&self) -> Vec<Arc<Pool>> {
        self.pools.lock().unwrap_or_else(|e| e.into_inner()).values().cloned().collect()
    }
}

/// What tells pools apart: the origin user and database, and a configured password (logins
/// mapped to one role with different passwords get pools of their own, as before pass-through
/// secrets existed); pass-through secrets of one role share a pool, which takes the newest.
#[derive(Clone, PartialEq, Eq, Hash)]
struct PoolKey {
    user: String,
    database: String,
    fixed: Option<OriginSecret>,
}

impl PoolKey {
    fn of(creds: &Credentials) -> PoolKey {
        PoolKey {
            user: creds.user.clone(),
            database: creds.database.clone(),
            fixed: (!creds.secret.renewable()).then(|| creds.secret.clone()),
        }
    }
}

/// A pool set whose origin is never reached (for tests of slots, not connections).
#[cfg(test)]
pub(crate) fn unreachable_pools(size: usize, workers: usize, pool_timeout: Duration) -> PoolSet {
    let config = PoolConfig {
        size,
        pool_timeout,
        connect_timeout: Duration::from_secs(1),
        statement_cache: 10,
        ..PoolConfig::default()
    };
    unreachable_pools_with(config, workers)
}

/// Like `unreachable_pools`, with the whole pool config given.
#[cfg(test)]
pub(crate) fn unreachable_pools_with(config: PoolConfig, workers: usize) -> PoolSet {
    use crate::config::SslMode;
    use crate::transport::tls::OriginTls;
    let target = OriginTarget {
        host: "127.0.0.1".into(),
        port: 1,
        tls: Arc::new(OriginTls::new(SslMode::Disable, None, None, None).unwrap_or_else(|e| panic!("{e}"))),
        tunnel: None,
        tcp: Default::default(),
        choice: Default::default(),
    };
    PoolSet::new(target, config, workers)
}

#[cfg(test)]
pub(crate) fn test_creds() -> Credentials {
    Credentials::with_password("app".into(), None, "shop".into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::scram::ScramKeys;

    #[tokio::test]
    async fn configured_passwords_keep_pools_apart_and_pass_through_keys_renew_one() {
        let pools = unreachable_pools(2, 1, Duration::from_millis(50));
        let with = |secret: OriginSecret| Credentials { secret, ..test_creds() };
        let app = pools.get(&with(OriginSecret::Password("secret".into())));
        // Another login mapped to the same role with another password: its own pool, and the
        // first pool's secret is untouched.
        let other = pools.get(&with(OriginSecret::Password("pw".into())));
        assert!(!Arc::ptr_eq(&app, &other));
        assert!(Arc::ptr_eq(&app, &pools.get(&with(OriginSecret::Password("secret".into())))));
        assert_eq!(app.creds.lock().unwrap().secret, OriginSecret::Password("secret".into()));

        let keys = |k: u8| {
            OriginSecret::ScramKeys(ScramKeys { iterations: 1, salt: vec![], client_key: [k; 32], server_key: [k; 32] })
        };
        let first = pools.get(&with(keys(1)));
        assert!(!Arc::ptr_eq(&first, &app));
        let second = pools.get(&with(keys(2)));
        assert!(Arc::ptr_eq(&first, &second));
        assert_eq!(first.creds.lock().unwrap().secret, keys(2));
    }

    #[tokio::test]
    async fn a_rotated_password_moves_its_pools_and_no_others() {
        let pools = unreachable_pools(2, 1, Duration::from_millis(50));
        let password = |p: &str| OriginSecret::Password(p.into());
        let with = |p: &str, db: &str| Credentials { secret: password(p), database: db.into(), ..test_creds() };
        let shop = pools.get(&with("old", "shop"));
        let stock = pools.get(&with("old", "stock"));
        let other = pools.get(&with("other", "shop"));

        assert_eq!(pools.rotate_password("someone", &password("old"), &password("new")), 0);
        assert_eq!(pools.rotate_password("app", &password("old"), &password("new")), 2);
        assert!(Arc::ptr_eq(&shop, &pools.get(&with("new", "shop"))), "the login with the new password finds the pool");
        assert!(Arc::ptr_eq(&stock, &pools.get(&with("new", "stock"))));
        assert_eq!(shop.creds.lock().unwrap().secret, password("new"));
        assert_eq!(other.creds.lock().unwrap().secret, password("other"));
        assert!(!Arc::ptr_eq(&shop, &pools.get(&with("old", "shop"))), "the old password is no key any more");

        // A login with the newest password came first: its pool stays, and the old one still
        // takes the password.
        let early = pools.get(&with("newest", "shop"));
        let old = pools.get(&with("new", "shop"));
        assert_eq!(pools.rotate_password("app", &password("new"), &password("newest")), 2, "shop and stock");
        assert!(Arc::ptr_eq(&early, &pools.get(&with("newest", "shop"))));
        assert_eq!(old.creds.lock().unwrap().secret, password("newest"));
    }
}
