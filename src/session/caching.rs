//! The session's side of the query cache: answering a batch from the cache, recording an
//! answer while it streams to the client, noticing writes, and invalidating what they touched
//! before the client sees ReadyForQuery.

use std::sync::Arc;

use bytes::{Bytes, BytesMut};

use super::plan::Planner;
use super::statements::{Statement, StatementMap};
use super::Session;
use crate::cache::classify::{Catalog, Reason, Verdict, WriteScope};
use crate::cache::{
    catalog, key, CacheKey, DatabaseCache, Entry, Generations, KeyRef, KeyView, Lookup, MissGuard, QueryCache, Table,
};
use crate::origin::settings::Settings;
use crate::pool::Pool;
use crate::protocol::backend as be;
use crate::protocol::frontend::{self as fe, Bind, Named, Parse, Target};
use crate::protocol::{spare, Message};
use crate::sql::prepared::{self, PreparedCommand};

/// An answer being recorded for the cache while it streams to the client.
pub(super) struct Capture {
    guard: MissGuard,
    generations: Generations,
    bytes: BytesMut,
    /// Too large, or an error: do not store.
    failed: bool,
}

impl Capture {
    /// Appends whole messages of the answer, unless that takes it over the entry size cap.
    fn record(&mut self, cache: Option<&QueryCache>, messages: &[u8]) {
        if self.failed {
            return;
        }
        let limit = cache.map_or(0, |c| c.config.max_entry_size);
        if self.bytes.len() + messages.len() > limit {
            self.failed = true;
            if let Some(cache) = cache {
                cache.stats.uncacheable(Reason::TooLarge);
            }
            spare::give(std::mem::take(&mut self.bytes));
            return;
        }
        self.bytes.extend_from_slice(messages);
    }
}

/// What became of a batch at the cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum CacheAnswer {
    /// Answered from the cache.
    Served,
    /// A cacheable read (so it writes nothing) whose answer from the origin is being recorded.
    Recording,
    /// For the origin, unrecorded.
    Forward,
}

impl CacheAnswer {
    fn from_served(served: Option<bool>) -> CacheAnswer {
        if served == Some(true) {
            CacheAnswer::Served
        } else {
            CacheAnswer::Forward
        }
    }
}

/// How long a background refresh may take.
const REFRESH_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

impl Session {
    /// Answers the batch from the cache if it can. On a miss for a cacheable batch, starts
    /// recording the answer the origin will give.
    pub(super) async fn answer_from_cache(&mut self, batch: &[Message]) -> CacheAnswer {
        let (Some(cache), Some(db)) = (self.ctx.cache.clone(), self.cache_db.clone()) else {
            return CacheAnswer::Forward;
        };
        if !matches!(batch.last().map(Message::tag), Some(fe::SYNC | fe::QUERY)) {
            return CacheAnswer::Forward;
        }
        if self.status != b'I' || self.pinned {
            cache.stats.uncacheable(Reason::InTransaction);
            return CacheAnswer::Forward;
        }
        let prefix = match &self.key_prefix {
            Some((made_from, prefix)) if Arc::ptr_eq(made_from, &self.wanted) => prefix,
            _ => {
                let prefix = key::prefix(&self.database, &self.user, &self.wanted);
                &self.key_prefix.insert((self.wanted.clone(), prefix)).1
            }
        };
        // Built in the session's own buffer, and looked up borrowed from it: a hit allocates nothing.
        let mut scratch = std::mem::take(&mut self.key_scratch);
        if let Err(reason) = key::build(&mut scratch, prefix, batch, &self.statements) {
            self.key_scratch = scratch;
            cache.stats.uncacheable(reason);
            return CacheAnswer::Forward;
        }
        let key = cache.key_ref(&scratch);
        let found = cache.lookup(&key);
        let answer = if matches!(found, Lookup::Miss) {
            self.on_miss(&cache, &db, batch, &key).await
        } else {
            // An answer in the cache was classified cacheable when it was stored (and DDL through
            // pgwarp voids every entry of the database), so a hit needs no classification.
            CacheAnswer::from_served(self.serve_found(&cache, batch, &key, found))
        };
        self.key_scratch = scratch;
        answer
    }

    /// A miss for a batch of cacheable shape: classifies it, and if it reads only what may be
    /// cached, starts recording the origin's answer (or waits for the client already fetching it).
    async fn on_miss(
        &mut self,
        cache: &Arc<QueryCache>,
        db: &Arc<DatabaseCache>,
        batch: &[Message],
        key: &KeyRef<'_>,
    ) -> CacheAnswer {
        let Ok(sql) = key::texts(batch, &self.statements) else {
            cache.stats.uncacheable(Reason::Protocol);
            return CacheAnswer::Forward;
        };
        let Some(catalog) = self.catalog(db) else {
            cache.stats.uncacheable(Reason::CatalogLoading);
            return CacheAnswer::Forward;
        };
        let mut tables: Vec<Arc<Table>> = Vec::new();
        for sql in sql {
            let classified = self.recent_verdicts.classify(db, &catalog, sql);
            match &classified.verdict {
                Verdict::Read { .. } => tables.extend(classified.reads().iter().cloned()),
                Verdict::Uncacheable(reason) => {
                    cache.stats.uncacheable(*reason);
                    return CacheAnswer::Forward;
                }
                Verdict::Write(_) => {
                    cache.stats.uncacheable(Reason::Write);
                    return CacheAnswer::Forward;
                }
            }
        }
        if !cache.admits(&tables) {
            cache.stats.uncacheable(Reason::WriteHot);
            return CacheAnswer::Forward;
        }
        match cache.claim(key) {
            Ok(guard) => {
                cache.stats.misses.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let generations = db.generations(&tables);
                self.capture = Some(Box::new(Capture { guard, generations, bytes: spare::take(), failed: false }));
                CacheAnswer::Recording
            }
            // Another client is fetching the same answer: wait for it, then look again.
            Err(fetch) => {
                Box::pin(QueryCache::wait_for(fetch)).await;
                if let Some(served) = self.serve_if_cached(cache, batch, key) {
                    return CacheAnswer::from_served(Some(served));
                }
                cache.stats.misses.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                CacheAnswer::Forward
            }
        }
    }

    /// Serves a fresh or stale entry for `key` (starting the one refresh of a stale one);
    /// None when there is none.
    fn serve_if_cached(&mut self, cache: &Arc<QueryCache>, batch: &[Message], key: &KeyRef<'_>) -> Option<bool> {
        let found = cache.lookup(key);
        self.serve_found(cache, batch, key, found)
    }

    fn serve_found(
        &mut self,
        cache: &Arc<QueryCache>,
        batch: &[Message],
        key: &KeyRef<'_>,
        found: Lookup,
    ) -> Option<bool> {
        let (entry, counter) = match found {
            Lookup::Fresh(entry) => (entry, &cache.stats.hits),
            Lookup::Stale { entry, refresh } => {
                if refresh {
                    self.spawn_refresh(cache, batch, key.to_key(), entry.tables());
                }
                (entry, &cache.stats.stale)
            }
            Lookup::Miss => return None,
        };
        let served = self.serve_cached(batch, &entry);
        if served {
            counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        Some(served)
    }

    /// The catalog snapshot for this database, starting a load if there is none.
    fn catalog(&self, db: &Arc<DatabaseCache>) -> Option<Arc<Catalog>> {
        db.catalog(|| catalog::spawn_load(db.clone(), self.pool.clone()))
    }

    /// Sends a cached answer, after making the batch's effects on the client's statements.
    fn serve_cached(&mut self, batch: &[Message], entry: &Entry) -> bool {
        for msg in batch {
            match msg.tag() {
                fe::PARSE => {
                    let Ok(p) = Parse::decode(msg.body()) else { return false };
                    let stmt = Arc::new(Statement::new(!p.name.is_empty(), p.sql, &p.param_types));
                    if self.statements.insert(p.name, stmt).is_err() {
                        // Over the statement memory cap: let the origin path report it.
                        return false;
                    }
                }
                fe::QUERY => {
                    self.statements.remove("");
                }
                _ => {}
            }
        }
        self.to_client.extend_from_slice(&entry.response);
        true
    }

    /// Records bytes sent to the client as part of the answer being captured.
    pub(super) fn capture(&mut self, tag: u8, frame: &[u8]) {
        let Some(c) = self.capture.as_mut() else { return };
        if tag == be::ERROR_RESPONSE {
            c.failed = true;
        }
        // ParameterStatus from pgwarp's settings query is about the connection, not the answer.
        if tag != be::PARAMETER_STATUS {
            c.record(self.ctx.cache.as_deref(), frame);
        }
    }

    /// Records the output from `start` to `end`: answers forwarded as they came, which hold
    /// no error and no ParameterStatus (`forward_plain`).
    pub(super) fn capture_forwarded(&mut self, start: usize, end: usize) {
        if let Some(c) = self.capture.as_mut() {
            c.record(self.ctx.cache.as_deref(), &self.to_client[start..end]);
        }
    }

    /// Stores the captured answer once its ReadyForQuery went out.
    pub(super) fn finish_capture(&mut self, status: u8) {
        let Some(c) = self.capture.take() else { return };
        let Capture { guard, generations, bytes, failed } = *c;
        // The entry gets an exact-size copy; the recording buffer goes back for the next one.
        let response = (!failed && status == b'I').then(|| Bytes::copy_from_slice(&bytes));
        spare::give(bytes);
        let (Some(cache), Some(db)) = (&self.ctx.cache, &self.cache_db) else { return };
        if status != b'I' && !failed {
            cache.stats.uncacheable(Reason::InTransaction);
        }
        if let Some(response) = response {
            cache.store(guard.key.clone(), db, generations, response);
        }
        // Dropping the guard wakes the clients waiting for this answer.
    }

    /// Notes what the batch may write, to invalidate once it commits.
    pub(super) fn track_writes(&mut self, batch: &[Message]) {
        let Some(db) = self.cache_db.clone() else { return };
        let loaded = self.catalog(&db);
        let catalog_loaded = loaded.is_some();
        let catalog = loaded.unwrap_or_default();
        for msg in batch {
            // Borrowed, not copied: this runs for every batch while the cache is on.
            let lossy: String;
            let sql: Option<&str> = match msg.tag() {
                fe::QUERY => match fe::query_text(msg.body()) {
                    Ok(text) => Some(match prepared::parse(text) {
                        Some(PreparedCommand::Execute { name, .. }) => {
                            self.statements.get(&name).map_or(text, |s| &*s.sql)
                        }
                        _ => text,
                    }),
                    // Not UTF-8 (a LATIN1 client's): what it writes, as well as it reads.
                    Err(_) => {
                        lossy = fe::query_text_lossy(msg.body());
                        Some(&lossy)
                    }
                },
                fe::PARSE => Parse::decode(msg.body()).ok().map(|p| p.sql),
                fe::BIND => {
                    Bind::decode(msg.body()).ok().and_then(|b| self.statements.get(b.statement)).map(|s| &*s.sql)
                }
                // The fast-path call of a function by OID (libpq's large-object calls use it):
                // nothing says what it writes.
                fe::FUNCTION_CALL => {
                    self.pending_write = Some(WriteScope::merge(self.pending_write.take(), WriteScope::Code));
                    self.settings_dirty = true;
                    continue;
                }
                _ => None,
            };
            let Some(sql) = sql else { continue };
            let scope = match &self.recent_verdicts.classify(&db, &catalog, sql).verdict {
                Verdict::Write(scope) => scope.clone(),
                // Until the catalog has loaded no function is known, and any may be user code
                // that writes or sets settings.
                Verdict::Uncacheable(Reason::UnknownFunction) if !catalog_loaded => WriteScope::Code,
                _ => continue,
            };
            // User code (a VOLATILE function, or DDL, DO, CALL) may change settings with
            // set_config where pgwarp cannot see it: read them back after the transaction, so
            // they neither leak nor get lost.
            if matches!(scope, WriteScope::Code | WriteScope::Database) {
                self.settings_dirty = true;
            }
            self.pending_write = Some(WriteScope::merge(self.pending_write.take(), scope));
        }
    }

    /// At a ReadyForQuery for the client: once no transaction is open, what was written is
    /// committed (or rolled back), so cached reads of it go before the client hears back.
    pub(super) fn invalidate_written(&mut self, status: u8, nothing_outstanding: bool) {
        if status != b'I' {
            return;
        }
        let (Some(cache), Some(db)) = (&self.ctx.cache, &self.cache_db) else { return };
        if let Some(scope) = &self.pending_write {
            cache.invalidate(db, scope);
            if nothing_outstanding {
                self.pending_write = None;
            }
        }
    }

    /// Refreshes a stale entry in the background, on a connection of its own.
    fn spawn_refresh(&self, cache: &Arc<QueryCache>, batch: &[Message], key: CacheKey, tables: Vec<Arc<Table>>) {
        let Some(database) = self.cache_db.clone() else { return };
        // Statements the batch uses but does not parse itself.
        let parsed: Vec<&str> = batch
            .iter()
            .filter_map(|m| (m.tag() == fe::PARSE).then(|| Parse::decode(m.body()).ok()).flatten())
            .map(|p| p.name)
            .collect();
        let mut statements = StatementMap::new(usize::MAX);
        for msg in batch {
            let name = match msg.tag() {
                fe::BIND => Bind::decode(msg.body()).ok().map(|b| b.statement),
                fe::DESCRIBE => Named::decode(fe::DESCRIBE, msg.body())
                    .ok()
                    .filter(|d| d.target == Target::Statement)
                    .map(|d| d.name),
                _ => None,
            };
            if let Some(name) = name.filter(|n| !parsed.contains(n)) {
                if let Some(stmt) = self.statements.get(name) {
                    let _ = statements.insert(name, stmt.clone());
                }
            }
        }
        // Own copies: the batch's bytes share the client's read buffer.
        let batch: Vec<Message> =
            batch.iter().map(|m| Message::from_frame(bytes::Bytes::copy_from_slice(m.frame()))).collect();
        let refresh = Refresh {
            cache: cache.clone(),
            pool: self.pool.clone(),
            settings: self.wanted.clone(),
            database,
            key,
            tables,
        };
        tokio::spawn(async move {
            if tokio::time::timeout(REFRESH_TIMEOUT, refresh.run(batch, statements)).await.is_err() {
                tracing::debug!("cache refresh timed out");
            }
        });
    }
}

/// A background refresh of one stale cache entry.
struct Refresh {
    cache: Arc<QueryCache>,
    pool: Arc<Pool>,
    settings: Arc<Settings>,
    database: Arc<DatabaseCache>,
    key: CacheKey,
    tables: Vec<Arc<Table>>,
}

impl Refresh {
    /// Runs the batch as the client would have, and stores the answer.
    async fn run(self, batch: Vec<Message>, mut statements: StatementMap) {
        let generations = self.database.generations(&self.tables);
        // Client 0: pgwarp's own work (a background refresh).
        let Ok(mut conn) = self.pool.checkout(0).await else { return };
        if let Some(sql) = conn.settings_sql(&self.settings) {
            conn.statements.unnamed = None;
            match conn.simple_query(&sql).await {
                Ok(out) if out.error.is_none() => conn.set_applied_from(&self.settings),
                _ => return,
            }
        }
        let (mut skip, mut needs_sync) = (false, false);
        let conn_ref = &mut *conn;
        let planned = Planner {
            statements: &mut statements,
            server: &mut conn_ref.statements,
            queue: &mut conn_ref.queue,
            out: &mut conn_ref.out,
            skip_until_sync: &mut skip,
            needs_sync: &mut needs_sync,
            aborted: false,
            pinned: false,
        }
        .plan(&batch);
        if planned.is_err() {
            return;
        }
        let out = std::mem::take(&mut conn.out);
        if conn.write(&out).await.is_err() {
            return;
        }
        let mut response = BytesMut::new();
        conn.queue.drain_synthetic(&mut response);
        let mut failed = false;
        loop {
            let Ok(msg) = conn.read().await else { return };
            let Ok(d) = conn.queue.on_message(msg.tag(), msg.body()) else { return };
            match msg.tag() {
                be::ERROR_RESPONSE => failed = true,
                be::PARAMETER_STATUS => conn.note_parameter(msg.body()),
                _ if d.forward => response.extend_from_slice(msg.frame()),
                _ => {}
            }
            conn.queue.drain_synthetic(&mut response);
            if let Some(status) = d.ready.filter(|_| conn.queue.is_empty()) {
                if !failed && status == b'I' {
                    self.cache.store(self.key.clone(), &self.database, generations, response.freeze());
                }
                break;
            }
        }
        self.pool.checkin(conn);
    }
}
