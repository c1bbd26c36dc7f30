//! The result cache: answers repeated cacheable reads without touching the origin, and never
//! shows a client stale data after a write that went through pgwarp.
//!
//! Freshness is kept with generation counters rather than by searching the cache: every
//! (database, table) pair has a counter, and so does every database. An entry remembers the
//! counters in force when its query *started*; a write that commits bumps the counters of the
//! tables it touched (or of the whole database) before the client sees the commit, so every
//! entry that depends on them stops matching at once. That also covers a read that was in flight
//! during the write: it started under the old counters, so what it stores is already stale.

pub mod catalog;
pub mod classify;
pub mod key;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::watch;

use classify::{Catalog, Reason, Verdict, WriteScope};

/// Cache settings (the `[cache]` section).
#[derive(Clone, Debug, PartialEq, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CacheConfig {
    /// Answer repeated reads from memory. Default on; `--no-cache` turns it off.
    pub enabled: bool,
    /// How long an entry is fresh. Default 60s, at most 1h.
    #[serde(deserialize_with = "crate::config::de_duration")]
    pub max_age: Duration,
    /// How much longer a stale entry is still served while one background refresh runs.
    /// Default 15s.
    #[serde(deserialize_with = "crate::config::de_duration")]
    pub stale_while_revalidate: Duration,
    /// Total size of cached results. Default 256MiB.
    #[serde(deserialize_with = "crate::config::de_byte_size")]
    pub max_size: usize,
    /// Largest single result kept; bigger results stream through uncached. Default 8MiB.
    #[serde(deserialize_with = "crate::config::de_byte_size")]
    pub max_entry_size: usize,
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            enabled: true,
            max_age: Duration::from_secs(60),
            stale_while_revalidate: Duration::from_secs(15),
            max_size: 256 << 20,
            max_entry_size: 8 << 20,
        }
    }
}

/// The generation counters an entry depends on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Generations {
    database: u64,
    tables: Vec<(String, u64)>,
}

/// One cached answer.
#[derive(Debug)]
pub struct Entry {
    /// The exact bytes the origin answered for the batch, ending in ReadyForQuery 'I'.
    pub response: Bytes,
    pub created: Instant,
    database: String,
    generations: Generations,
    refreshing: AtomicBool,
}

impl Entry {
    /// The tables this answer read.
    pub fn tables(&self) -> Vec<String> {
        self.generations.tables.iter().map(|(t, _)| t.clone()).collect()
    }
}

pub enum Lookup {
    Fresh(Arc<Entry>),
    /// Past max_age but within stale_while_revalidate; `refresh` is true for exactly one
    /// caller, which should refresh it.
    Stale {
        entry: Arc<Entry>,
        refresh: bool,
    },
    Miss,
}

/// Counters for the metrics endpoint.
#[derive(Debug, Default)]
pub struct CacheStats {
    pub hits: AtomicU64,
    pub misses: AtomicU64,
    pub stale: AtomicU64,
    pub stores: AtomicU64,
    pub invalidations: AtomicU64,
    uncacheable: [AtomicU64; Reason::ALL.len()],
}

impl CacheStats {
    pub fn uncacheable(&self, reason: Reason) {
        if let Some(i) = Reason::ALL.iter().position(|r| *r == reason) {
            self.uncacheable[i].fetch_add(1, Ordering::Relaxed);
        }
        tracing::debug!(reason = reason.label(), "batch not cached");
    }

    pub fn uncacheable_count(&self, reason: Reason) -> u64 {
        Reason::ALL.iter().position(|r| *r == reason).map_or(0, |i| self.uncacheable[i].load(Ordering::Relaxed))
    }
}

/// Per-database state: the catalog snapshot, counters and classified SQL.
#[derive(Debug, Default)]
struct Database {
    catalog: RwLock<Option<(Arc<Catalog>, Instant)>>,
    loading: AtomicBool,
    generation: AtomicU64,
    tables: Mutex<HashMap<String, u64>>,
    verdicts: Mutex<HashMap<String, Verdict>>,
}

/// How long a catalog snapshot is used before it is reloaded in the background.
const CATALOG_MAX_AGE: Duration = Duration::from_secs(60);
/// Classified SQL texts remembered per database.
const MAX_VERDICTS: usize = 10_000;
/// How long a concurrent miss waits for the first one to store its result.
const COALESCE_WAIT: Duration = Duration::from_secs(5);

pub struct QueryCache {
    pub config: CacheConfig,
    pub stats: CacheStats,
    entries: moka::sync::Cache<Arc<[u8]>, Arc<Entry>>,
    databases: Mutex<HashMap<String, Arc<Database>>>,
    in_flight: Mutex<HashMap<Arc<[u8]>, watch::Receiver<()>>>,
}

impl std::fmt::Debug for QueryCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "QueryCache({} entries)", self.entries.entry_count())
    }
}

impl QueryCache {
    pub fn new(config: CacheConfig) -> Arc<QueryCache> {
        let entries = moka::sync::Cache::builder()
            .max_capacity(config.max_size as u64)
            .weigher(|k: &Arc<[u8]>, v: &Arc<Entry>| (k.len() + v.response.len() + 128).min(u32::MAX as usize) as u32)
            .time_to_live(config.max_age + config.stale_while_revalidate)
            .build();
        Arc::new(QueryCache {
            config,
            stats: CacheStats::default(),
            entries,
            databases: Mutex::new(HashMap::new()),
            in_flight: Mutex::new(HashMap::new()),
        })
    }

    fn database(&self, name: &str) -> Arc<Database> {
        self.databases.lock().unwrap_or_else(|e| e.into_inner()).entry(name.to_owned()).or_default().clone()
    }

    /// The database's catalog snapshot, if one is loaded; `load` is called (once at a time)
    /// when there is none or it is old.
    pub fn catalog(&self, database: &str, load: impl FnOnce()) -> Option<Arc<Catalog>> {
        let db = self.database(database);
        let current = db.catalog.read().unwrap_or_else(|e| e.into_inner()).clone();
        let stale = current.as_ref().is_none_or(|(_, at)| at.elapsed() > CATALOG_MAX_AGE);
        if stale && !db.loading.swap(true, Ordering::AcqRel) {
            load();
        }
        current.map(|(c, _)| c)
    }

    /// Installs a freshly loaded catalog (or gives up the load on failure).
    pub fn set_catalog(&self, database: &str, catalog: Option<Catalog>) {
        let db = self.database(database);
        if let Some(c) = catalog {
            *db.catalog.write().unwrap_or_else(|e| e.into_inner()) = Some((Arc::new(c), Instant::now()));
            db.verdicts.lock().unwrap_or_else(|e| e.into_inner()).clear();
        }
        db.loading.store(false, Ordering::Release);
    }

    /// Classifies SQL against the catalog, remembering the answer per text.
    pub fn classify(&self, database: &str, catalog: &Catalog, sql: &str) -> Verdict {
        let db = self.database(database);
        if let Some(v) = db.verdicts.lock().unwrap_or_else(|e| e.into_inner()).get(sql) {
            return v.clone();
        }
        let verdict = classify::classify(sql, catalog);
        let mut verdicts = db.verdicts.lock().unwrap_or_else(|e| e.into_inner());
        if verdicts.len() >= MAX_VERDICTS {
            verdicts.clear();
        }
        verdicts.insert(sql.to_owned(), verdict.clone());
        verdict
    }

    /// The counters a read of `tables` depends on, taken before it is sent.
    pub fn generations(&self, database: &str, tables: &[String]) -> Generations {
        let db = self.database(database);
        let counters = db.tables.lock().unwrap_or_else(|e| e.into_inner());
        Generations {
            database: db.generation.load(Ordering::Acquire),
            tables: tables.iter().map(|t| (t.clone(), counters.get(t).copied().unwrap_or(0))).collect(),
        }
    }

    fn is_current(&self, database: &str, g: &Generations) -> bool {
        let db = self.database(database);
        if db.generation.load(Ordering::Acquire) != g.database {
            return false;
        }
        let counters = db.tables.lock().unwrap_or_else(|e| e.into_inner());
        g.tables.iter().all(|(t, n)| counters.get(t).copied().unwrap_or(0) == *n)
    }

    /// A write committed: nothing that read these tables (or this database) is served again.
    pub fn invalidate(&self, database: &str, scope: &WriteScope) {
        let db = self.database(database);
        self.stats.invalidations.fetch_add(1, Ordering::Relaxed);
        match scope {
            WriteScope::Database => {
                db.generation.fetch_add(1, Ordering::AcqRel);
                // DDL may have changed what names mean.
                *db.catalog.write().unwrap_or_else(|e| e.into_inner()) = None;
                db.verdicts.lock().unwrap_or_else(|e| e.into_inner()).clear();
            }
            WriteScope::Tables(tables) => {
                let mut counters = db.tables.lock().unwrap_or_else(|e| e.into_inner());
                for t in tables {
                    *counters.entry(t.clone()).or_insert(0) += 1;
                }
            }
        }
    }

    pub fn lookup(&self, key: &[u8]) -> Lookup {
        let Some(entry) = self.entries.get(key) else { return Lookup::Miss };
        if !self.is_current(&entry.database, &entry.generations) {
            self.entries.invalidate(key);
            return Lookup::Miss;
        }
        let age = entry.created.elapsed();
        if age <= self.config.max_age {
            Lookup::Fresh(entry)
        } else if age <= self.config.max_age + self.config.stale_while_revalidate {
            let refresh = !entry.refreshing.swap(true, Ordering::AcqRel);
            Lookup::Stale { entry, refresh }
        } else {
            Lookup::Miss
        }
    }

    /// Stores an answer, unless a write made it stale while it was being fetched.
    pub fn store(&self, key: Arc<[u8]>, database: &str, generations: Generations, response: Bytes) {
        if response.len() > self.config.max_entry_size || !self.is_current(database, &generations) {
            return;
        }
        let entry = Entry {
            response,
            created: Instant::now(),
            database: database.to_owned(),
            generations,
            refreshing: AtomicBool::new(false),
        };
        self.entries.insert(key, Arc::new(entry));
        self.stats.stores.fetch_add(1, Ordering::Relaxed);
    }

    /// Claims the right to fetch `key` from the origin. When another client is already
    /// fetching it, returns something to wait on instead.
    pub fn claim(self: &Arc<Self>, key: &Arc<[u8]>) -> Result<MissGuard, watch::Receiver<()>> {
        let mut in_flight = self.in_flight.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(rx) = in_flight.get(key) {
            return Err(rx.clone());
        }
        let (done, rx) = watch::channel(());
        in_flight.insert(key.clone(), rx);
        Ok(MissGuard { cache: self.clone(), key: key.clone(), _done: done })
    }

    /// Waits (bounded) for another client's fetch of the same key: its guard dropping closes
    /// the channel, which wakes every waiter, however late it started waiting.
    pub async fn wait_for(mut fetch: watch::Receiver<()>) {
        let _ = tokio::time::timeout(COALESCE_WAIT, fetch.changed()).await;
    }

    pub fn entry_count(&self) -> u64 {
        self.entries.run_pending_tasks();
        self.entries.entry_count()
    }
}

/// Held by the one client fetching a key; others wait until it is dropped.
pub struct MissGuard {
    cache: Arc<QueryCache>,
    pub key: Arc<[u8]>,
    _done: watch::Sender<()>,
}

impl std::fmt::Debug for MissGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "MissGuard")
    }
}

impl Drop for MissGuard {
    fn drop(&mut self) {
        self.cache.in_flight.lock().unwrap_or_else(|e| e.into_inner()).remove(&self.key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cache() -> Arc<QueryCache> {
        QueryCache::new(CacheConfig::default())
    }

    #[test]
    fn write_to_a_table_hides_entries_that_read_it() {
        let c = cache();
        let key: Arc<[u8]> = Arc::from(&b"k"[..]);
        let other: Arc<[u8]> = Arc::from(&b"o"[..]);
        c.store(key.clone(), "db", c.generations("db", &["users".into()]), Bytes::from_static(b"r"));
        c.store(other.clone(), "db", c.generations("db", &["orders".into()]), Bytes::from_static(b"r"));
        assert!(matches!(c.lookup(&key), Lookup::Fresh(_)));
        c.invalidate("db", &WriteScope::Tables(vec!["users".into()]));
        assert!(matches!(c.lookup(&key), Lookup::Miss));
        assert!(matches!(c.lookup(&other), Lookup::Fresh(_)));
        c.invalidate("db", &WriteScope::Database);
        assert!(matches!(c.lookup(&other), Lookup::Miss));
    }

    #[test]
    fn a_read_in_flight_during_a_write_is_not_stored() {
        let c = cache();
        let key: Arc<[u8]> = Arc::from(&b"k"[..]);
        let before = c.generations("db", &["users".into()]);
        c.invalidate("db", &WriteScope::Tables(vec!["users".into()]));
        c.store(key.clone(), "db", before, Bytes::from_static(b"old"));
        assert!(matches!(c.lookup(&key), Lookup::Miss));
    }

    #[test]
    fn other_databases_are_not_affected() {
        let c = cache();
        let key: Arc<[u8]> = Arc::from(&b"k"[..]);
        c.store(key.clone(), "a", c.generations("a", &["t".into()]), Bytes::from_static(b"r"));
        c.invalidate("b", &WriteScope::Database);
        assert!(matches!(c.lookup(&key), Lookup::Fresh(_)));
    }

    #[test]
    fn oversized_results_are_not_stored() {
        let c = QueryCache::new(CacheConfig { max_entry_size: 4, ..CacheConfig::default() });
        let key: Arc<[u8]> = Arc::from(&b"k"[..]);
        c.store(key.clone(), "db", c.generations("db", &[]), Bytes::from_static(b"12345"));
        assert!(matches!(c.lookup(&key), Lookup::Miss));
    }

    #[test]
    fn stale_entries_are_served_and_refreshed_once() {
        let c = QueryCache::new(CacheConfig {
            max_age: Duration::from_millis(0),
            stale_while_revalidate: Duration::from_secs(60),
            ..CacheConfig::default()
        });
        let key: Arc<[u8]> = Arc::from(&b"k"[..]);
        c.store(key.clone(), "db", c.generations("db", &[]), Bytes::from_static(b"r"));
        std::thread::sleep(Duration::from_millis(2));
        assert!(matches!(c.lookup(&key), Lookup::Stale { refresh: true, .. }));
        assert!(matches!(c.lookup(&key), Lookup::Stale { refresh: false, .. }));
    }

    #[tokio::test]
    async fn concurrent_misses_wait_for_the_first() {
        let c = cache();
        let key: Arc<[u8]> = Arc::from(&b"k"[..]);
        let guard = c.claim(&key).unwrap();
        let wait = c.claim(&key).unwrap_err();
        let waiter = tokio::spawn(QueryCache::wait_for(wait));
        c.store(key.clone(), "db", c.generations("db", &[]), Bytes::from_static(b"r"));
        drop(guard);
        tokio::time::timeout(Duration::from_secs(1), waiter).await.unwrap().unwrap();
        assert!(matches!(c.lookup(&key), Lookup::Fresh(_)));
        assert!(c.claim(&key).is_ok());
    }
}
