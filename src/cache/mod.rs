//! The result cache: answers repeated cacheable reads without touching the origin, and never
//! shows a client stale data after a write that went through pgwarp.
//!
//! Freshness is kept with generation counters rather than by searching the cache: every
//! (database, table) pair has a counter, and so does every database. An entry remembers the
//! counters in force when its query *started*; a write that commits bumps the counters of the
//! tables it touched (or of the whole database) before the client sees the commit, so every
//! entry that depends on them stops matching at once. That also covers a read that was in flight
//! during the write: it started under the old counters, so what it stores is already stale.
//!
//! The hot path takes no lock but the cache's own: a session holds its database's state, the
//! classification of each SQL text carries the counters of the tables it reads, and a key's hash
//! is computed once and reused by every map it goes into.

pub mod catalog;
pub mod classify;
pub mod key;

use std::collections::HashMap;
use std::hash::{BuildHasher, BuildHasherDefault, Hash, Hasher};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::Semaphore;

use crate::sql::lexer::tokenize;
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

/// A cache key: the bytes [`key::build`] made, with their hash computed once.
#[derive(Clone, Debug)]
pub struct CacheKey {
    hash: u64,
    bytes: Arc<[u8]>,
}

impl PartialEq for CacheKey {
    fn eq(&self, other: &Self) -> bool {
        self.hash == other.hash && self.bytes == other.bytes
    }
}

impl Eq for CacheKey {}

impl Hash for CacheKey {
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write_u64(self.hash);
    }
}

/// A key being looked up, borrowed from the session's scratch buffer: a hit allocates nothing.
#[derive(Clone, Copy, Debug)]
pub struct KeyRef<'a> {
    hash: u64,
    bytes: &'a [u8],
}

/// What the maps hash and compare, so an owned [`CacheKey`] is found by a borrowed [`KeyRef`].
pub trait KeyView {
    fn hash_value(&self) -> u64;
    fn bytes(&self) -> &[u8];
    fn to_key(&self) -> CacheKey;
}

impl KeyView for CacheKey {
    fn hash_value(&self) -> u64 {
        self.hash
    }
    fn bytes(&self) -> &[u8] {
        &self.bytes
    }
    fn to_key(&self) -> CacheKey {
        self.clone()
    }
}

impl KeyView for KeyRef<'_> {
    fn hash_value(&self) -> u64 {
        self.hash
    }
    fn bytes(&self) -> &[u8] {
        self.bytes
    }
    fn to_key(&self) -> CacheKey {
        CacheKey { hash: self.hash, bytes: self.bytes.into() }
    }
}

// Hashes and compares exactly as CacheKey does, as `Borrow` requires.
impl Hash for dyn KeyView + '_ {
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write_u64(self.hash_value());
    }
}

impl PartialEq for dyn KeyView + '_ {
    fn eq(&self, other: &Self) -> bool {
        self.hash_value() == other.hash_value() && self.bytes() == other.bytes()
    }
}

impl Eq for dyn KeyView + '_ {}

impl<'a> std::borrow::Borrow<dyn KeyView + 'a> for CacheKey {
    fn borrow(&self) -> &(dyn KeyView + 'a) {
        self
    }
}

/// Hands a [`CacheKey`]'s precomputed hash through to the maps that hold it.
#[derive(Default)]
struct KeyHasher(u64);

impl Hasher for KeyHasher {
    fn write(&mut self, bytes: &[u8]) {
        // Only reached if something other than a CacheKey is hashed: fold it in (FNV-1a).
        for b in bytes {
            self.0 = (self.0 ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 ^= n;
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

type KeyHash = BuildHasherDefault<KeyHasher>;

/// One table's generation counter, and how its cached answers have fared lately.
#[derive(Debug)]
pub struct Table {
    name: Box<str>,
    generation: AtomicU64,
    /// Answers stored that read this table (halved now and then, with the next two).
    stored: AtomicU32,
    /// Of those, how many were served at least once.
    served: AtomicU32,
    /// Writes to the table that went through pgwarp.
    writes: AtomicU32,
    /// Misses that asked whether to record their answer, for sampling a write-hot table.
    asked: AtomicU32,
}

/// Below this many stored answers a table's record says nothing yet.
const ADMISSION_MIN_STORED: u32 = 64;
/// When `stored` reaches this, it and the counts beside it are halved, so the record follows
/// the workload. `writes` stops counting here too: more says nothing more.
const ADMISSION_WINDOW: u32 = 1024;
/// A write-hot table still has one answer in this many recorded, to notice when writes stop.
const ADMISSION_SAMPLE: u32 = 16;

impl Table {
    fn new(name: &str) -> Table {
        Table {
            name: name.into(),
            generation: AtomicU64::new(0),
            stored: AtomicU32::new(0),
            served: AtomicU32::new(0),
            writes: AtomicU32::new(0),
            asked: AtomicU32::new(0),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether, lately, the table was written about as often as answers reading it were
    /// stored, and hardly any of those answers was served: then recording answers costs every
    /// miss and saves nothing.
    fn write_hot(&self) -> bool {
        let stored = u64::from(self.stored.load(Ordering::Relaxed));
        let served = u64::from(self.served.load(Ordering::Relaxed));
        let writes = u64::from(self.writes.load(Ordering::Relaxed));
        stored >= u64::from(ADMISSION_MIN_STORED) && writes * 8 >= stored && served * 8 < stored
    }

    fn note_stored(&self) {
        if self.stored.fetch_add(1, Ordering::Relaxed) + 1 >= ADMISSION_WINDOW {
            // Racy halving is fine: this is a rough record, not an account.
            self.stored.store(ADMISSION_WINDOW / 2, Ordering::Relaxed);
            for c in [&self.served, &self.writes] {
                c.store(c.load(Ordering::Relaxed) / 2, Ordering::Relaxed);
            }
        }
    }
}

/// The generation counters an entry depends on, as they were when its query started.
#[derive(Clone, Debug)]
pub struct Generations {
    database: u64,
    tables: Vec<(Arc<Table>, u64)>,
}

/// A classified SQL text, with the counters of the tables it reads.
#[derive(Debug)]
pub struct Classified {
    pub verdict: Verdict,
    reads: Vec<Arc<Table>>,
}

impl Classified {
    pub fn reads(&self) -> &[Arc<Table>] {
        &self.reads
    }
}

/// One cached answer.
#[derive(Debug)]
pub struct Entry {
    /// The exact bytes the origin answered for the batch, ending in ReadyForQuery 'I'.
    pub response: Bytes,
    pub created: Instant,
    database: Arc<DatabaseCache>,
    generations: Generations,
    refreshing: AtomicBool,
    /// Served to a client at least once.
    served: AtomicBool,
}

impl Entry {
    /// The tables this answer read.
    pub fn tables(&self) -> Vec<Arc<Table>> {
        self.generations.tables.iter().map(|(t, _)| t.clone()).collect()
    }

    fn is_current(&self) -> bool {
        self.database.is_current(&self.generations)
    }

    /// Counts the entry as served for its tables, once: the hot path only reads a flag.
    fn note_served(&self) {
        if !self.served.load(Ordering::Relaxed) && !self.served.swap(true, Ordering::Relaxed) {
            for (t, _) in &self.generations.tables {
                t.served.fetch_add(1, Ordering::Relaxed);
            }
        }
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

/// Per-database state: the catalog snapshot, generation counters and classified SQL. A
/// session looks it up once and keeps it.
#[derive(Debug, Default)]
pub struct DatabaseCache {
    name: Box<str>,
    catalog: RwLock<Option<(Arc<Catalog>, Instant)>>,
    loading: AtomicBool,
    /// Bumped whenever DDL voids the catalog: a load that began before is out of date.
    catalog_epoch: AtomicU64,
    generation: AtomicU64,
    tables: Mutex<HashMap<Box<str>, Arc<Table>>>,
    verdicts: Mutex<Verdicts>,
}

/// The verdicts a session reached lately, by exact text: a client repeats its statements (a
/// prepared statement is Bound again and again), and finding one here needs no hashing, no
/// lock and, for a text with literals, no tokenizing (the shared memory of
/// [`DatabaseCache::classify`] keeps those only by shape). Each names the catalog snapshot it
/// was made with and counts only while that snapshot is the one asked about. The name is a
/// `Weak`: an idle session does not keep old snapshots alive, and while the `Weak` exists the
/// snapshot's address cannot be reused by a newer one.
#[derive(Debug, Default)]
pub struct RecentVerdicts {
    entries: Vec<(Box<str>, std::sync::Weak<Catalog>, Arc<Classified>)>,
    next: usize,
}

/// Texts a session remembers; longer ones are not remembered (their classification dwarfs
/// the look-up anyway).
const RECENT_VERDICTS: usize = 8;
const RECENT_MAX_TEXT: usize = 2048;

impl RecentVerdicts {
    /// The verdict for `sql` under `catalog`, from this session's recent ones or from `db`.
    pub fn classify(&mut self, db: &DatabaseCache, catalog: &Arc<Catalog>, sql: &str) -> Arc<Classified> {
        if let Some((_, _, c)) =
            self.entries.iter().find(|(text, at, _)| std::ptr::eq(at.as_ptr(), Arc::as_ptr(catalog)) && **text == *sql)
        {
            return c.clone();
        }
        let classified = db.classify(catalog, sql);
        if sql.len() <= RECENT_MAX_TEXT {
            let entry = (sql.into(), Arc::downgrade(catalog), classified.clone());
            if self.entries.len() < RECENT_VERDICTS {
                self.entries.push(entry);
            } else {
                self.entries[self.next] = entry;
                self.next = (self.next + 1) % RECENT_VERDICTS;
            }
        }
        classified
    }
}

/// Classified SQL, remembered per text and per shape ([`classify::shape`]). A text with
/// literals is remembered only by its shape: its exact text rarely comes again, and remembering
/// each would evict the texts that do.
#[derive(Debug, Default)]
struct Verdicts {
    by_text: HashMap<Box<str>, Arc<Classified>>,
    by_shape: HashMap<Box<[u8]>, Arc<Classified>>,
}

impl Verdicts {
    fn clear(&mut self) {
        self.by_text.clear();
        self.by_shape.clear();
    }
}

/// How long a catalog snapshot is used before it is reloaded in the background.
const CATALOG_MAX_AGE: Duration = Duration::from_secs(60);
/// Classified SQL texts (and as many shapes) remembered per database.
const MAX_VERDICTS: usize = 10_000;
/// How long a concurrent miss waits for the first one to store its result.
const COALESCE_WAIT: Duration = Duration::from_secs(5);

impl DatabaseCache {
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The catalog snapshot, if one is loaded; `load` is called (once at a time) when there is
    /// none or it is old.
    pub fn catalog(&self, load: impl FnOnce()) -> Option<Arc<Catalog>> {
        let current = self.catalog.read().unwrap_or_else(|e| e.into_inner()).clone();
        let stale = current.as_ref().is_none_or(|(_, at)| at.elapsed() > CATALOG_MAX_AGE);
        if stale && !self.loading.swap(true, Ordering::AcqRel) {
            load();
        }
        current.map(|(c, _)| c)
    }

    /// Where catalog loads stand: taken when a load begins, handed back to `set_catalog`.
    pub fn catalog_epoch(&self) -> u64 {
        self.catalog_epoch.load(Ordering::Acquire)
    }

    /// Installs a freshly loaded catalog (or gives up the load on failure). A load that began
    /// before DDL voided the catalog (`epoch` is behind) may predate the DDL: it is dropped,
    /// and the next use starts another.
    pub fn set_catalog(&self, catalog: Option<Catalog>, epoch: u64) {
        if let Some(c) = catalog {
            // Under the verdicts lock, so no verdict made with the old catalog is remembered,
            // and no DDL can void the catalog between the epoch check and the install.
            let mut verdicts = self.verdicts.lock().unwrap_or_else(|e| e.into_inner());
            if self.catalog_epoch.load(Ordering::Acquire) == epoch {
                *self.catalog.write().unwrap_or_else(|e| e.into_inner()) = Some((Arc::new(c), Instant::now()));
                verdicts.clear();
            }
        }
        self.loading.store(false, Ordering::Release);
    }

    /// Classifies SQL against the catalog, remembering the answer per text and per shape when
    /// `catalog` is the snapshot in use (not one a reload or DDL has replaced, nor a stand-in).
    pub fn classify(&self, catalog: &Arc<Catalog>, sql: &str) -> Arc<Classified> {
        if let Some(c) = self.verdicts.lock().unwrap_or_else(|e| e.into_inner()).by_text.get(sql) {
            return c.clone();
        }
        if classify::may_read_two_ways(sql) {
            // Rare, and its shape does not say everything: classified each time, not remembered.
            return self.classified(classify::classify(sql, catalog));
        }
        let tokens = tokenize(sql);
        let opted_out = classify::opted_out(sql);
        let mut shape = Vec::with_capacity(sql.len().min(4096) + 64);
        let literals = classify::shape(&tokens, opted_out, &mut shape);
        let known = self.verdicts.lock().unwrap_or_else(|e| e.into_inner()).by_shape.get(&shape[..]).cloned();
        let (classified, new_shape) = match known {
            // A text with literals is remembered by shape only, and this shape is.
            Some(c) if literals => return c,
            Some(c) => (c, false),
            None => (self.classified(classify::classify_tokens(&tokens, opted_out, catalog)), true),
        };
        let mut verdicts = self.verdicts.lock().unwrap_or_else(|e| e.into_inner());
        let current = self.catalog.read().unwrap_or_else(|e| e.into_inner());
        if !current.as_ref().is_some_and(|(c, _)| Arc::ptr_eq(c, catalog)) {
            return classified;
        }
        drop(current);
        if verdicts.by_shape.len() >= MAX_VERDICTS || verdicts.by_text.len() >= MAX_VERDICTS {
            verdicts.clear();
        }
        if !literals {
            verdicts.by_text.insert(sql.into(), classified.clone());
        }
        if new_shape {
            verdicts.by_shape.insert(shape.into(), classified.clone());
        }
        classified
    }

    /// A verdict with the counters of the tables it reads.
    fn classified(&self, verdict: Verdict) -> Arc<Classified> {
        let reads = match &verdict {
            Verdict::Read { tables } => self.tables(tables),
            _ => Vec::new(),
        };
        Arc::new(Classified { verdict, reads })
    }

    /// The counters of these tables (created at 0 when new).
    pub fn tables(&self, names: &[String]) -> Vec<Arc<Table>> {
        let mut tables = self.tables.lock().unwrap_or_else(|e| e.into_inner());
        names
            .iter()
            .map(|n| tables.entry(n.as_str().into()).or_insert_with(|| Arc::new(Table::new(n))).clone())
            .collect()
    }

    /// The counters a read of `tables` depends on, taken before it is sent.
    pub fn generations(&self, tables: &[Arc<Table>]) -> Generations {
        Generations {
            database: self.generation.load(Ordering::Acquire),
            tables: tables.iter().map(|t| (t.clone(), t.generation.load(Ordering::Acquire))).collect(),
        }
    }

    fn is_current(&self, g: &Generations) -> bool {
        self.generation.load(Ordering::Acquire) == g.database
            && g.tables.iter().all(|(t, n)| t.generation.load(Ordering::Acquire) == *n)
    }

    /// A write committed: nothing that read these tables (or this database) is served again.
    fn invalidate(&self, scope: &WriteScope) {
        match scope {
            // Every entry of the database depends on this counter.
            WriteScope::AllTables | WriteScope::Code => {
                self.generation.fetch_add(1, Ordering::AcqRel);
            }
            WriteScope::Database => {
                self.generation.fetch_add(1, Ordering::AcqRel);
                // DDL may have changed what names mean.
                let mut verdicts = self.verdicts.lock().unwrap_or_else(|e| e.into_inner());
                self.catalog_epoch.fetch_add(1, Ordering::AcqRel);
                *self.catalog.write().unwrap_or_else(|e| e.into_inner()) = None;
                verdicts.clear();
            }
            WriteScope::Tables(names) => {
                // A table with no counter yet has never been read through the cache: nothing
                // can depend on it, and a read that creates the counter later (under this lock)
                // starts after this write committed. So writes never add counters, and writes
                // naming tables that do not exist cannot grow the map.
                let tables = self.tables.lock().unwrap_or_else(|e| e.into_inner());
                for t in names.iter().filter_map(|n| tables.get(n.as_str())) {
                    t.generation.fetch_add(1, Ordering::AcqRel);
                    if t.writes.load(Ordering::Relaxed) < ADMISSION_WINDOW {
                        t.writes.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }
    }
}

/// `max_age` and `stale_while_revalidate`, readable on every hit without a lock.
#[derive(Debug)]
struct Freshness {
    max_age_us: AtomicU64,
    stale_us: AtomicU64,
}

impl Freshness {
    fn new(max_age: Duration, stale: Duration) -> Freshness {
        let f = Freshness { max_age_us: AtomicU64::new(0), stale_us: AtomicU64::new(0) };
        f.set(max_age, stale);
        f
    }

    fn set(&self, max_age: Duration, stale: Duration) {
        let us = |d: Duration| u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        self.max_age_us.store(us(max_age), Ordering::Relaxed);
        self.stale_us.store(us(stale), Ordering::Relaxed);
    }

    fn get(&self) -> (Duration, Duration) {
        (
            Duration::from_micros(self.max_age_us.load(Ordering::Relaxed)),
            Duration::from_micros(self.stale_us.load(Ordering::Relaxed)),
        )
    }
}

pub struct QueryCache {
    /// As built; `max_age` and `stale_while_revalidate` here are the start-time values (RELOAD
    /// changes `freshness`).
    pub config: CacheConfig,
    /// How long entries are fresh, then served stale (RELOAD may change these).
    freshness: Freshness,
    pub stats: CacheStats,
    hasher: foldhash::quality::RandomState,
    entries: moka::sync::Cache<CacheKey, Arc<Entry>, KeyHash>,
    databases: Mutex<HashMap<Box<str>, Arc<DatabaseCache>>>,
    /// Fetches under way: each a semaphore with no permits, closed when the fetch ends.
    in_flight: Mutex<HashMap<CacheKey, Arc<Semaphore>, KeyHash>>,
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
            .weigher(|k: &CacheKey, v: &Arc<Entry>| {
                (k.bytes.len() + v.response.len() + 128).min(u32::MAX as usize) as u32
            })
            .time_to_live(config.max_age + config.stale_while_revalidate)
            .build_with_hasher(KeyHash::default());
        Arc::new(QueryCache {
            freshness: Freshness::new(config.max_age, config.stale_while_revalidate),
            config,
            stats: CacheStats::default(),
            hasher: foldhash::quality::RandomState::default(),
            entries,
            databases: Mutex::new(HashMap::new()),
            in_flight: Mutex::new(HashMap::default()),
        })
    }

    /// Changes how long entries are fresh and then served stale, for entries old and new.
    /// Entries still leave memory `max_age + stale_while_revalidate` as built after they were
    /// stored, so a longer sum than at start takes full effect only after a restart: false then.
    pub fn set_freshness(&self, max_age: Duration, stale_while_revalidate: Duration) -> bool {
        self.freshness.set(max_age, stale_while_revalidate);
        max_age + stale_while_revalidate <= self.config.max_age + self.config.stale_while_revalidate
    }

    /// The state of one database, created on first use.
    pub fn database(&self, name: &str) -> Arc<DatabaseCache> {
        let mut databases = self.databases.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(db) = databases.get(name) {
            return db.clone();
        }
        let db = Arc::new(DatabaseCache { name: name.into(), ..DatabaseCache::default() });
        databases.insert(name.into(), db.clone());
        db
    }

    /// Hashes key bytes once (with a per-process random seed: clients choose what goes in).
    pub fn key(&self, bytes: Vec<u8>) -> CacheKey {
        CacheKey { hash: self.hasher.hash_one(&bytes), bytes: bytes.into() }
    }

    /// The key for looking up `bytes`, without copying them.
    pub fn key_ref<'a>(&self, bytes: &'a [u8]) -> KeyRef<'a> {
        KeyRef { hash: self.hasher.hash_one(bytes), bytes }
    }

    /// The origin moved (RELOAD): nothing stored is served again, and every database's catalog
    /// is loaded anew from the new origin. Fetches already under way store nothing.
    pub fn forget_origin(&self) {
        let databases: Vec<_> = self.databases.lock().unwrap_or_else(|e| e.into_inner()).values().cloned().collect();
        for database in databases {
            self.invalidate(&database, &WriteScope::Database);
            // A load from the old origin may hang on it; the next use starts one from the new.
            // (The old one, if it ends, is dropped by the epoch check.)
            database.loading.store(false, Ordering::Release);
        }
        self.entries.invalidate_all();
    }

    /// A write committed: nothing that read these tables (or this database) is served again.
    pub fn invalidate(&self, database: &DatabaseCache, scope: &WriteScope) {
        self.stats.invalidations.fetch_add(1, Ordering::Relaxed);
        database.invalidate(scope);
    }

    pub fn lookup(&self, key: &dyn KeyView) -> Lookup {
        let Some(entry) = self.entries.get(key) else { return Lookup::Miss };
        if !entry.is_current() {
            // It stays until the fresh answer replaces it, the clock expires it, or eviction
            // takes it: removing it here would cost every miss after a write.
            return Lookup::Miss;
        }
        entry.note_served();
        let age = entry.created.elapsed();
        let (max_age, stale) = self.freshness.get();
        if age <= max_age {
            Lookup::Fresh(entry)
        } else if age <= max_age + stale {
            let refresh = !entry.refreshing.swap(true, Ordering::AcqRel);
            Lookup::Stale { entry, refresh }
        } else {
            Lookup::Miss
        }
    }

    /// Whether a miss that reads `tables` should record its answer: not when one of them is
    /// write-hot, except for a sample that tells when it cools down.
    pub fn admits(&self, tables: &[Arc<Table>]) -> bool {
        tables.iter().all(|t| !t.write_hot() || t.asked.fetch_add(1, Ordering::Relaxed) % ADMISSION_SAMPLE == 0)
    }

    /// Stores an answer, unless a write made it stale while it was being fetched.
    pub fn store(&self, key: CacheKey, database: &Arc<DatabaseCache>, generations: Generations, response: Bytes) {
        if response.len() > self.config.max_entry_size || !database.is_current(&generations) {
            return;
        }
        let entry = Entry {
            response,
            created: Instant::now(),
            database: database.clone(),
            generations,
            refreshing: AtomicBool::new(false),
            served: AtomicBool::new(false),
        };
        for (t, _) in &entry.generations.tables {
            t.note_stored();
        }
        self.entries.insert(key, Arc::new(entry));
        self.stats.stores.fetch_add(1, Ordering::Relaxed);
    }

    /// Claims the right to fetch `key` from the origin. When another client is already
    /// fetching it, returns something to wait on instead.
    pub fn claim(self: &Arc<Self>, key: &dyn KeyView) -> Result<MissGuard, Arc<Semaphore>> {
        let mut in_flight = self.in_flight.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(fetch) = in_flight.get(key) {
            return Err(fetch.clone());
        }
        let done = Arc::new(Semaphore::new(0));
        let key = key.to_key();
        in_flight.insert(key.clone(), done.clone());
        Ok(MissGuard { cache: self.clone(), key, done })
    }

    /// Waits (bounded) for another client's fetch of the same key: its guard dropping closes
    /// the semaphore, which wakes every waiter, however late it started waiting (it has no
    /// permits, so nothing else ends the wait).
    pub async fn wait_for(fetch: Arc<Semaphore>) {
        let _ = tokio::time::timeout(COALESCE_WAIT, fetch.acquire()).await;
    }

    pub fn entry_count(&self) -> u64 {
        self.entries.run_pending_tasks();
        self.entries.entry_count()
    }

    /// Entries and counters now, for the metrics endpoint and the admin console.
    pub fn snapshot(&self) -> CacheSnapshot {
        self.entries.run_pending_tasks();
        let s = &self.stats;
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        CacheSnapshot {
            entries: self.entries.entry_count(),
            bytes: self.entries.weighted_size(),
            max_bytes: self.config.max_size as u64,
            hits: load(&s.hits),
            misses: load(&s.misses),
            stale: load(&s.stale),
            stores: load(&s.stores),
            invalidations: load(&s.invalidations),
            uncacheable: Reason::ALL.iter().map(|&r| (r.label(), s.uncacheable_count(r))).collect(),
        }
    }
}

/// The cache's size and counters at one moment (see `QueryCache::snapshot`).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct CacheSnapshot {
    pub entries: u64,
    /// Bytes held, as the capacity counts them (keys, answers and a fixed overhead per entry).
    pub bytes: u64,
    pub max_bytes: u64,
    pub hits: u64,
    pub misses: u64,
    /// Stale answers served while a refresh ran.
    pub stale: u64,
    pub stores: u64,
    pub invalidations: u64,
    /// Batches sent to the origin uncached, by reason.
    pub uncacheable: Vec<(&'static str, u64)>,
}

/// Held by the one client fetching a key; others wait until it is dropped.
pub struct MissGuard {
    cache: Arc<QueryCache>,
    pub key: CacheKey,
    done: Arc<Semaphore>,
}

impl std::fmt::Debug for MissGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "MissGuard")
    }
}

impl Drop for MissGuard {
    fn drop(&mut self) {
        self.cache.in_flight.lock().unwrap_or_else(|e| e.into_inner()).remove(&self.key);
        self.done.close();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cache() -> Arc<QueryCache> {
        QueryCache::new(CacheConfig::default())
    }

    /// A database whose installed catalog knows one table, `t`.
    fn database_with_table_t(c: &QueryCache) -> (Arc<DatabaseCache>, Catalog, Arc<Catalog>) {
        let db = c.database("db");
        let mut installed = Catalog::default();
        installed.relations.insert("t".into(), classify::Relation { table: true, opaque_writes: false });
        db.set_catalog(Some(installed.clone()), db.catalog_epoch());
        let catalog = db.catalog(|| {}).unwrap();
        (db, installed, catalog)
    }

    fn reads(db: &DatabaseCache, tables: &[&str]) -> Generations {
        let names: Vec<String> = tables.iter().map(|t| t.to_string()).collect();
        db.generations(&db.tables(&names))
    }

    #[test]
    fn write_to_a_table_hides_entries_that_read_it() {
        let c = cache();
        let db = c.database("db");
        let key = c.key(b"k".to_vec());
        let other = c.key(b"o".to_vec());
        c.store(key.clone(), &db, reads(&db, &["users"]), Bytes::from_static(b"r"));
        c.store(other.clone(), &db, reads(&db, &["orders"]), Bytes::from_static(b"r"));
        assert!(matches!(c.lookup(&key), Lookup::Fresh(_)));
        c.invalidate(&db, &WriteScope::Tables(vec!["users".into()]));
        assert!(matches!(c.lookup(&key), Lookup::Miss));
        assert!(matches!(c.lookup(&other), Lookup::Fresh(_)));
        c.invalidate(&c.database("db"), &WriteScope::Database);
        assert!(matches!(c.lookup(&other), Lookup::Miss));
        // The fresh answer replaces the stale one.
        c.store(key.clone(), &db, reads(&db, &["users"]), Bytes::from_static(b"new"));
        assert!(matches!(c.lookup(&key), Lookup::Fresh(e) if e.response == "new"));
    }

    #[test]
    fn a_read_in_flight_during_a_write_is_not_stored() {
        let c = cache();
        let db = c.database("db");
        let key = c.key(b"k".to_vec());
        let before = reads(&db, &["users"]);
        c.invalidate(&db, &WriteScope::Tables(vec!["users".into()]));
        c.store(key.clone(), &db, before, Bytes::from_static(b"old"));
        assert!(matches!(c.lookup(&key), Lookup::Miss));
    }

    #[test]
    fn a_new_origin_forgets_every_answer_and_catalog_and_what_was_in_flight() {
        let c = cache();
        let (db, _, _) = database_with_table_t(&c);
        let other = c.database("other");
        let (key, second) = (c.key(b"k".to_vec()), c.key(b"o".to_vec()));
        c.store(key.clone(), &db, reads(&db, &["t"]), Bytes::from_static(b"old"));
        c.store(second.clone(), &other, reads(&other, &["t"]), Bytes::from_static(b"old"));
        let in_flight = reads(&db, &["t"]);
        // A catalog load from the old origin that never ends.
        assert!(db.catalog(|| {}).is_some());
        db.loading.store(true, Ordering::Release);
        let stuck = db.catalog_epoch();

        c.forget_origin();
        assert!(matches!(c.lookup(&key), Lookup::Miss));
        assert!(matches!(c.lookup(&second), Lookup::Miss));
        c.store(key.clone(), &db, in_flight, Bytes::from_static(b"old"));
        assert!(matches!(c.lookup(&key), Lookup::Miss), "a fetch from before the move stores nothing");
        let mut loads = 0;
        assert!(db.catalog(|| loads += 1).is_none(), "the old catalog is gone");
        assert_eq!(loads, 1, "and a load from the new origin starts, stuck old load or not");
        db.set_catalog(Some(Catalog::default()), stuck);
        assert!(db.catalog(|| {}).is_none(), "the old load, ending late, installs nothing");
    }

    #[test]
    fn other_databases_are_not_affected() {
        let c = cache();
        let a = c.database("a");
        let key = c.key(b"k".to_vec());
        c.store(key.clone(), &a, reads(&a, &["t"]), Bytes::from_static(b"r"));
        c.invalidate(&c.database("b"), &WriteScope::Database);
        c.invalidate(&c.database("b"), &WriteScope::Tables(vec!["t".into()]));
        assert!(matches!(c.lookup(&key), Lookup::Fresh(_)));
    }

    #[test]
    fn answers_for_a_write_hot_table_are_mostly_not_recorded_until_it_cools() {
        let c = cache();
        let db = c.database("db");
        let hot = db.tables(&["hot".to_string()]);
        let cool = db.tables(&["cool".to_string()]);
        // Every stored answer goes stale unread.
        for i in 0..ADMISSION_MIN_STORED {
            assert!(c.admits(&hot));
            let key = c.key(format!("k{i}").into_bytes());
            c.store(key.clone(), &db, db.generations(&hot), Bytes::from_static(b"r"));
            c.store(c.key(format!("c{i}").into_bytes()), &db, db.generations(&cool), Bytes::from_static(b"r"));
            c.invalidate(&db, &WriteScope::Tables(vec!["hot".into(), "cool".into()]));
            assert!(matches!(c.lookup(&key), Lookup::Miss));
        }
        let admitted = (0..ADMISSION_SAMPLE * 4).filter(|_| c.admits(&hot)).count();
        assert_eq!(admitted, 4, "one in {ADMISSION_SAMPLE} is still recorded");
        // A table written as often whose answers are read is not write-hot.
        for i in 0..ADMISSION_MIN_STORED {
            let key = c.key(format!("c{i}").into_bytes());
            c.store(key.clone(), &db, db.generations(&cool), Bytes::from_static(b"r"));
            assert!(matches!(c.lookup(&key), Lookup::Fresh(_)));
        }
        assert!((0..ADMISSION_SAMPLE).all(|_| c.admits(&cool)), "answers that are read keep being recorded");
        // Writes stop: the sampled answers are read, and the table is admitted again.
        for i in 0..ADMISSION_WINDOW {
            let key = c.key(format!("n{i}").into_bytes());
            c.store(key.clone(), &db, db.generations(&hot), Bytes::from_static(b"r"));
            assert!(matches!(c.lookup(&key), Lookup::Fresh(_)));
            if (0..ADMISSION_SAMPLE).all(|_| c.admits(&hot)) {
                return;
            }
        }
        panic!("the table never cooled down");
    }

    #[test]
    fn a_table_that_is_never_written_is_always_admitted() {
        let c = cache();
        let db = c.database("db");
        let t = db.tables(&["t".to_string()]);
        // Answers stored faster than they are read (a large working set warming up).
        for i in 0..ADMISSION_WINDOW * 2 {
            c.store(c.key(format!("k{i}").into_bytes()), &db, db.generations(&t), Bytes::from_static(b"r"));
        }
        assert!((0..ADMISSION_SAMPLE).all(|_| c.admits(&t)));
    }

    #[test]
    fn writes_to_tables_never_read_through_the_cache_add_no_counters() {
        let c = cache();
        let db = c.database("db");
        for i in 0..100 {
            c.invalidate(&db, &WriteScope::Tables(vec![format!("no_such_table_{i}")]));
        }
        assert_eq!(db.tables.lock().unwrap().len(), 0);
        // A counter made after a write starts at the current state and is bumped by the next.
        let key = c.key(b"k".to_vec());
        c.store(key.clone(), &db, reads(&db, &["no_such_table_1"]), Bytes::from_static(b"r"));
        assert!(matches!(c.lookup(&key), Lookup::Fresh(_)));
        c.invalidate(&db, &WriteScope::Tables(vec!["no_such_table_1".into()]));
        assert!(matches!(c.lookup(&key), Lookup::Miss));
    }

    #[test]
    fn keys_are_equal_by_their_bytes() {
        let c = cache();
        assert_eq!(c.key(b"abc".to_vec()), c.key(b"abc".to_vec()));
        assert_ne!(c.key(b"abc".to_vec()), c.key(b"abd".to_vec()));
    }

    #[test]
    fn texts_that_differ_only_in_literals_are_classified_once_and_not_remembered_by_text() {
        let c = cache();
        let (db, installed, catalog) = database_with_table_t(&c);
        let one = db.classify(&catalog, "select * from t where id = 1");
        let two = db.classify(&catalog, "select * from t where id = 2");
        assert!(Arc::ptr_eq(&one, &two));
        assert_eq!(one.verdict, Verdict::Read { tables: vec!["t".into()] });
        let write = db.classify(&catalog, "delete from t where id = 2");
        assert!(matches!(write.verdict, Verdict::Write(_)));
        let param = db.classify(&catalog, "select * from t where id = $1");
        assert!(Arc::ptr_eq(&param, &db.classify(&catalog, "select * from t where id = $1")));
        {
            let verdicts = db.verdicts.lock().unwrap();
            assert_eq!(verdicts.by_shape.len(), 3);
            assert_eq!(verdicts.by_text.len(), 1, "only the text without literals");
        }
        // A verdict made with a catalog that is no longer (or never was) the one in use is
        // not remembered: a reload that raced with it must not be undone.
        db.set_catalog(Some(installed.clone()), db.catalog_epoch());
        assert!(db.verdicts.lock().unwrap().by_shape.is_empty());
        db.classify(&catalog, "select * from t where id = 3");
        db.classify(&Arc::new(Catalog::default()), "select * from u where id = 3");
        assert!(db.verdicts.lock().unwrap().by_shape.is_empty());
        db.classify(&db.catalog(|| {}).unwrap(), "select * from t where id = 3");
        assert_eq!(db.verdicts.lock().unwrap().by_shape.len(), 1);
        // A load that began before DDL voided the catalog is not installed.
        let epoch = db.catalog_epoch();
        c.invalidate(&db, &WriteScope::Database);
        db.set_catalog(Some(installed), epoch);
        assert!(db.catalog(|| {}).is_none());
        db.set_catalog(Some(Catalog::default()), db.catalog_epoch());
        assert!(db.catalog(|| {}).is_some());
    }

    #[test]
    fn a_session_reuses_its_recent_verdicts_only_under_the_catalog_they_were_made_with() {
        let c = cache();
        let (db, installed, catalog) = database_with_table_t(&c);
        let mut recent = RecentVerdicts::default();
        let write = "update t set n = n + 1 where id = $1";
        let first = recent.classify(&db, &catalog, write);
        assert!(matches!(first.verdict, Verdict::Write(_)));
        assert!(Arc::ptr_eq(&first, &recent.classify(&db, &catalog, write)), "found by its text");
        // A text with literals, which the database remembers only by shape, is found by text.
        let read = recent.classify(&db, &catalog, "select * from t where id = 1");
        assert!(Arc::ptr_eq(&read, &recent.classify(&db, &catalog, "select * from t where id = 1")));
        // A newer snapshot (DDL, a reload) classifies again: the table may be a view by now.
        let mut changed = installed;
        changed.relations.insert("t".into(), classify::Relation { table: false, opaque_writes: true });
        db.set_catalog(Some(changed), db.catalog_epoch());
        let newer = db.catalog(|| {}).unwrap();
        assert!(!Arc::ptr_eq(&first, &recent.classify(&db, &newer, write)));
        // Only the latest few texts are kept.
        for i in 0..RECENT_VERDICTS * 2 {
            recent.classify(&db, &newer, &format!("select {i} from t"));
        }
        assert_eq!(recent.entries.len(), RECENT_VERDICTS);
        assert!(recent.entries.iter().all(|(text, _, _)| **text != *write));
    }

    #[test]
    fn a_borrowed_key_finds_what_an_owned_key_stored_and_claimed() {
        let c = cache();
        let db = c.database("db");
        c.store(c.key(b"k".to_vec()), &db, reads(&db, &["t"]), Bytes::from_static(b"r"));
        assert!(matches!(c.lookup(&c.key_ref(b"k")), Lookup::Fresh(_)));
        assert!(matches!(c.lookup(&c.key_ref(b"j")), Lookup::Miss));
        let guard = c.claim(&c.key_ref(b"m")).unwrap();
        assert_eq!(guard.key, c.key(b"m".to_vec()));
        assert!(c.claim(&c.key(b"m".to_vec())).is_err(), "one fetch per key, however it is named");
        drop(guard);
        assert!(c.claim(&c.key_ref(b"m")).is_ok());
    }

    #[test]
    fn oversized_results_are_not_stored() {
        let c = QueryCache::new(CacheConfig { max_entry_size: 4, ..CacheConfig::default() });
        let db = c.database("db");
        let key = c.key(b"k".to_vec());
        c.store(key.clone(), &db, reads(&db, &[]), Bytes::from_static(b"12345"));
        assert!(matches!(c.lookup(&key), Lookup::Miss));
    }

    #[test]
    fn stale_entries_are_served_and_refreshed_once() {
        let c = QueryCache::new(CacheConfig {
            max_age: Duration::from_millis(0),
            stale_while_revalidate: Duration::from_secs(60),
            ..CacheConfig::default()
        });
        let db = c.database("db");
        let key = c.key(b"k".to_vec());
        c.store(key.clone(), &db, reads(&db, &[]), Bytes::from_static(b"r"));
        std::thread::sleep(Duration::from_millis(2));
        assert!(matches!(c.lookup(&key), Lookup::Stale { refresh: true, .. }));
        assert!(matches!(c.lookup(&key), Lookup::Stale { refresh: false, .. }));
    }

    #[tokio::test]
    async fn concurrent_misses_wait_for_the_first() {
        let c = cache();
        let db = c.database("db");
        let key = c.key(b"k".to_vec());
        let guard = c.claim(&key).unwrap();
        let wait = c.claim(&key).unwrap_err();
        let late = c.claim(&key).unwrap_err();
        let waiter = tokio::spawn(QueryCache::wait_for(wait));
        c.store(key.clone(), &db, reads(&db, &[]), Bytes::from_static(b"r"));
        drop(guard);
        tokio::time::timeout(Duration::from_secs(1), waiter).await.unwrap().unwrap();
        // One that starts waiting only after the fetch ended does not wait at all.
        tokio::time::timeout(Duration::from_secs(1), QueryCache::wait_for(late)).await.unwrap();
        assert!(matches!(c.lookup(&key), Lookup::Fresh(_)));
        assert!(c.claim(&key).is_ok());
    }
}
