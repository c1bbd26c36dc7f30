//! One client, from login to goodbye.
//!
//! The session reads the client's messages into a batch until a boundary (Sync, Flush, Query,
//! FunctionCall), takes an origin connection for it if it has none, plans the batch against
//! that connection (`plan`), and routes every answer through the response queue. The connection
//! goes back to the pool the moment the client is idle (ReadyForQuery `I`, nothing outstanding);
//! a transaction, an unfinished extended-protocol sequence (Flush), a COPY, or session-scoped
//! state keeps it. Reading and writing on both sockets run in one loop, full duplex, with
//! high-water marks so that neither side can buffer without bound.

mod caching;
mod limits;
pub(crate) mod plan;
pub mod startup;
pub mod statements;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use tokio::io::AsyncWriteExt;
use tokio::sync::futures::OwnedNotified;
use tokio::sync::OwnedSemaphorePermit;
use tracing::Instrument;

use crate::cancel::{self, CancelHandle, CancelSlot, Stop};
use crate::origin::settings::{capture_sql, Settings};
use crate::origin::{Expect, OriginError, Owner};
use crate::pool::{Pool, PoolError, PooledConn, Traffic};
use crate::protocol::backend as be;
use crate::protocol::codec::FrameError;
use crate::protocol::error::{ErrorFields, Severity, SqlState};
use crate::protocol::frontend as fe;
use crate::protocol::{build, poll_duplex, spare, Duplex, Message, MessageReader, Run};
use crate::roster::{ClientEntry, ClientState, Listed};
use crate::server::ServerContext;
use crate::sql::inspect;
use crate::transport::ClientStream;
use crate::workers::mark_awaiting_origin;
use limits::Stretch;
use plan::{apply_undo, Planner};
use startup::Established;
use statements::StatementMap;

/// Past this many bytes waiting for one side, stop reading from the other.
const HIGH_WATER: usize = 256 * 1024;
/// A batch this large is sent on before its Sync arrives (the connection stays pinned).
const MAX_BATCH_BYTES: usize = 1 << 20;
/// How long clean-up after a vanished client may take before the connection is dropped.
const CLEANUP_TIMEOUT: Duration = Duration::from_secs(5);

/// Accepts one client connection: handshake, then the session, inside a tracing span.
pub async fn serve_client(ctx: Arc<ServerContext>, stream: ClientStream, peer: crate::transport::Peer) {
    let span = tracing::info_span!("client", %peer);
    async move {
        // Boxed so the handshake's state is freed once it is done: idle clients stay small.
        match Box::pin(startup::handshake(ctx, stream, peer)).await {
            Some(startup::Admitted::Session(session)) => session.run().await,
            // The console is listed in SHOW CLIENTS for as long as `_listing` lives.
            Some(startup::Admitted::Console { ctx, mut stream, reader, listing: _listing, _permit }) => {
                Box::pin(crate::admin::console::serve(&ctx, &mut stream, reader)).await
            }
            None => {}
        }
    }
    .instrument(span)
    .await
}

/// Why a session ended.
#[derive(Debug)]
enum End {
    /// The client sent Terminate.
    Terminate,
    /// The client's socket closed or failed.
    ClientGone,
    /// The client broke the protocol.
    Protocol(String),
    /// The origin connection died under the client.
    OriginLost { already_told: bool },
    /// pgwarp is shutting down.
    Shutdown,
    /// An operator ended this client (`KILL`, `KILL_CLIENT`).
    Killed,
    /// The origin did not answer a request within `query_timeout`.
    QueryTimeout,
    /// The client is pinned to an origin connection that a RECONNECT or a new origin replaced.
    Replaced,
    /// The origin refused the client's startup settings.
    Refused { code: String, message: String },
    /// The client sat idle longer than its limit: inside a transaction
    /// (`idle_transaction_timeout`) or not (`client_idle_timeout`).
    HeldStill { in_transaction: bool },
}

impl End {
    /// How a client whose stretch ran past its limit ends.
    fn out_of_time(stretch: Stretch) -> End {
        match stretch {
            Stretch::Still { in_transaction } => End::HeldStill { in_transaction },
            Stretch::Query { .. } => End::QueryTimeout,
        }
    }

    /// Why, in a few words (for the log).
    fn reason(&self) -> &'static str {
        match self {
            End::Terminate => "client close request",
            End::ClientGone => "client connection closed",
            End::Protocol(_) => "protocol violation",
            End::OriginLost { .. } => "origin connection lost",
            End::Shutdown => "shutdown",
            End::Killed => "killed from the console",
            End::QueryTimeout => "query_timeout",
            End::Replaced => "pinned origin connection replaced",
            End::Refused { .. } => "startup settings refused by the origin",
            End::HeldStill { in_transaction: true } => "idle_transaction_timeout",
            End::HeldStill { in_transaction: false } => "client_idle_timeout",
        }
    }
}

/// How reading back a client's settings went.
enum Capture {
    Done,
    /// The read-back failed, the connection is fine: the settings are known only there.
    Unreadable,
    /// The connection is not reusable.
    Failed,
}

#[derive(Debug, thiserror::Error)]
enum AttachError {
    #[error(transparent)]
    Pool(#[from] PoolError),
    #[error("origin refused the client's settings: {}", .0.message)]
    Rejected(ErrorFields),
    /// Told to leave (shutdown's kill stage, or an operator's KILL) while waiting for a
    /// connection.
    #[error("stopped while waiting for an origin connection")]
    Stopped,
    /// The origin did not answer pgwarp's own settings query within `query_timeout`.
    #[error("the origin did not answer within query_timeout")]
    TimedOut,
}

pub struct Session {
    ctx: Arc<ServerContext>,
    client: ClientStream,
    reader: MessageReader,
    to_client: BytesMut,
    pool: Arc<Pool>,
    /// Settings from the startup packet (what RESET returns to).
    startup_settings: Arc<Settings>,
    /// Settings this client's work must run under.
    wanted: Arc<Settings>,
    /// The client's transaction status, as its last ReadyForQuery said.
    status: u8,
    statements: StatementMap,
    batch: Vec<Message>,
    batch_bytes: usize,
    origin: Option<PooledConn>,
    copy_in: bool,
    /// pgwarp answered an error itself; drop messages until the client's Sync.
    skip_until_sync: bool,
    /// `batch` starts with messages that wait for the origin's answer to an earlier one.
    waiting: bool,
    /// The client may have changed settings: read them back before releasing the connection.
    settings_dirty: bool,
    /// Session-scoped state in use: keep the origin connection until the client leaves (or a
    /// reconnect replaces it).
    pinned: bool,
    /// The origin has accepted `wanted` (startup settings are checked on first use when the
    /// login did not wait for a connection).
    settings_validated: bool,
    draining: bool,
    /// Who is asking, for cache keys.
    user: Box<str>,
    database: Box<str>,
    /// The cache's state for this database, when the cache is on.
    cache_db: Option<Arc<crate::cache::DatabaseCache>>,
    /// The start of this client's cache keys, and the settings it was made from.
    key_prefix: Option<(Arc<Settings>, Vec<u8>)>,
    /// Where batch keys are built, reused from batch to batch (about 100 bytes, kept while idle).
    key_scratch: Vec<u8>,
    /// Verdicts on SQL this client sent lately (empty, and unallocated, until the cache is used).
    recent_verdicts: crate::cache::RecentVerdicts,
    /// The answer being recorded for the cache, on a cacheable miss.
    capture: Option<Box<caching::Capture>>,
    /// What the client's uncommitted work wrote, to invalidate in the cache once it ends.
    pending_write: Option<crate::cache::classify::WriteScope>,
    cancel: CancelHandle,
    /// While pinned: resolves when a reconnect replaces the pool's connections.
    replaced: Option<Pin<Box<OwnedNotified>>>,
    /// This client in `SHOW CLIENTS`.
    listing: Listed<ClientEntry>,
    /// What it did since its pool's totals last took it (when it goes idle, at the end of a
    /// pinned client's transaction, and at the end).
    traffic: Traffic,
    /// When the oldest request still waiting for its ReadyForQuery went to the origin.
    query_started: Option<Instant>,
    /// Whether the origin owes this client an answer, for the worker's busy polling.
    awaiting: bool,
    _slot: OwnedSemaphorePermit,
}

impl Drop for Session {
    fn drop(&mut self) {
        mark_awaiting_origin(&mut self.awaiting, false);
    }
}

impl Session {
    fn new(
        ctx: Arc<ServerContext>,
        client: ClientStream,
        e: Established,
        listing: Listed<ClientEntry>,
        cancel: CancelHandle,
    ) -> Session {
        let statements = StatementMap::new(ctx.config().max_client_statement_bytes);
        Session {
            client,
            reader: e.reader,
            to_client: BytesMut::new(),
            pool: e.pool,
            wanted: e.settings.clone(),
            startup_settings: e.settings,
            status: b'I',
            statements,
            batch: Vec::new(),
            batch_bytes: 0,
            origin: None,
            copy_in: false,
            skip_until_sync: false,
            waiting: false,
            settings_dirty: false,
            pinned: false,
            settings_validated: e.settings_validated,
            draining: false,
            cache_db: ctx.cache.as_ref().map(|c| c.database(&e.database)),
            user: e.user.into(),
            database: e.database.into(),
            key_prefix: None,
            key_scratch: Vec::new(),
            recent_verdicts: Default::default(),
            capture: None,
            pending_write: None,
            cancel,
            replaced: None,
            listing,
            traffic: Traffic::default(),
            query_started: None,
            awaiting: false,
            _slot: e.permit,
            ctx,
        }
    }

    async fn run(mut self: Box<Self>) {
        self.to_client.extend_from_slice(&build::backend_key_data(self.cancel.pid, self.cancel.secret));
        self.to_client.extend_from_slice(&build::ready_for_query(b'I'));
        let end = self.serve().await;
        Box::pin(self.finish(end)).await;
    }

    async fn serve(&mut self) -> End {
        loop {
            if self.origin.is_none() && !self.reader.has_bytes() && self.to_client.is_empty() {
                if self.draining || self.cancel.slot.stop() >= Stop::Drain {
                    return self.stopped();
                }
                // Idle: the pool's totals take what this client did, and no buffers are held
                // while waiting.
                if self.traffic != Traffic::default() {
                    self.pool.add_traffic(&std::mem::take(&mut self.traffic));
                }
                self.reader.shrink_if_empty();
                spare::give(std::mem::take(&mut self.to_client));
                mark_awaiting_origin(&mut self.awaiting, false);
                // Holding no connection, and outside a transaction.
                let mut watch = limits::Watch::default();
                if self.pool.limits_client_time() {
                    let pool = &self.pool;
                    watch.observe(Some(Stretch::Still { in_transaction: false }), |s| time_limit(pool, s));
                }
                let mut drain = std::pin::pin!(self.cancel.slot.stopped(Stop::Drain));
                // Shutdown or a time limit first: a query that arrives as the drain reaches
                // this client does not start a new transaction.
                tokio::select! {
                    biased;
                    r = std::future::poll_fn(|cx| watch.poll_stop_or_expired(drain.as_mut(), cx)) => {
                        return r.map_or_else(|| self.stopped(), End::out_of_time);
                    }
                    r = self.client.readable() => if r.is_err() { return End::ClientGone },
                }
            }
            if let Err(end) = Box::pin(self.until_idle()).await {
                return end;
            }
        }
    }

    /// Serves until nothing is outstanding in either direction. Entered when the client is
    /// readable or something is buffered, so it always polls before checking for idleness.
    async fn until_idle(&mut self) -> Result<(), End> {
        if self.to_client.capacity() == 0 {
            self.to_client = spare::take();
        }
        let slot = self.cancel.slot.clone();
        let kill = slot.stopped(Stop::Kill);
        tokio::pin!(kill);
        let mut watch = limits::Watch::default();
        loop {
            // Checked at every turn, so a RELOAD that sets a limit reaches a client pinned for
            // its whole session too.
            if self.pool.limits_client_time() {
                let pool = &self.pool;
                watch.observe(self.stretch(), |s| time_limit(pool, s));
            } else {
                watch.off();
            }
            let owed = self.origin.as_ref().is_some_and(|a| a.queue.has_entries());
            mark_awaiting_origin(&mut self.awaiting, owed);
            let origin_backlog = self.origin.as_ref().map_or(0, |a| a.out.len());
            // Input queued behind a wait counts as backlog too: the client is not read
            // without bound while the origin has not answered.
            let queued = if self.waiting { self.batch_bytes } else { 0 };
            let read_client = origin_backlog.max(queued) < HIGH_WATER;
            let read_origin = self.to_client.len() < HIGH_WATER;
            let client_active = read_client || !self.to_client.is_empty();
            let origin_active = self.origin.as_ref().is_some_and(|a| read_origin || !a.out.is_empty());
            tokio::select! {
                biased;
                r = std::future::poll_fn(|cx| watch.poll_stop_or_expired(kill.as_mut(), cx)) => {
                    return Err(r.map_or_else(|| self.stopped(), End::out_of_time));
                }
                r = std::future::poll_fn(|cx| match self.origin.as_mut() {
                    Some(a) => a.poll_io(cx, read_origin),
                    None => std::task::Poll::Pending,
                }), if origin_active => match r {
                    Ok(Duplex::Buffered) => self.on_origin().await?,
                    // The last bytes for the origin went out: if they were all it was waiting
                    // for (a Flush with no answer due), the connection may be free now.
                    Ok(Duplex::Flushed) => {
                        if self.origin.as_ref().is_some_and(|a| a.queue.is_empty()) {
                            self.maybe_release().await?;
                        }
                    }
                    Ok(Duplex::Eof) => return Err(self.origin_lost(&OriginError::Closed)),
                    Err(e) => return Err(self.origin_lost(&e)),
                },
                () = std::future::poll_fn(|cx| poll_replaced(&mut self.replaced, cx)), if self.replaced.is_some() => {
                    self.replaced = None;
                    self.on_replaced()?;
                }
                r = std::future::poll_fn(|cx| {
                    let unsent = self.to_client.len();
                    let r = poll_duplex(cx, &mut self.client, &mut self.reader, &mut self.to_client, read_client);
                    self.traffic.sent += unsent.saturating_sub(self.to_client.len()) as u64;
                    r
                }), if client_active => match r {
                    Ok(Duplex::Buffered) => self.on_client().await?,
                    Ok(Duplex::Flushed) => {}
                    Ok(Duplex::Eof) => return Err(End::ClientGone),
                    Err(FrameError::Io(_)) | Err(FrameError::Truncated) => return Err(End::ClientGone),
                    Err(e) => return Err(End::Protocol(e.to_string())),
                },
            }
            // Draining matters only once the client is idle, so a flag check per turn suffices.
            self.draining |= slot.stop() >= Stop::Drain;
            if self.origin.is_none() && self.to_client.is_empty() && !self.reader.has_bytes() {
                return if self.draining { Err(self.stopped()) } else { Ok(()) };
            }
        }
    }

    /// Why the session ends once its stop signal has fired: shutdown, or an operator's KILL.
    fn stopped(&self) -> End {
        if self.cancel.slot.stop() == Stop::Killed {
            End::Killed
        } else {
            End::Shutdown
        }
    }

    /// Pins the client to its origin connection for the rest of its session, watching for a
    /// reconnect that replaces that connection.
    fn pin(&mut self) {
        self.pinned = true;
        // A reconnect before this is seen by the check at the end of this batch (`maybe_release`).
        self.replaced = Some(watch_replacement(&self.pool));
    }

    /// A reconnect replaced the pool's connections. A pinned client quiet outside a transaction
    /// ends now; one in the middle of something ends when it is done (`maybe_release`).
    fn on_replaced(&mut self) -> Result<(), End> {
        if !self.pinned {
            return Ok(());
        }
        let watch = watch_replacement(&self.pool);
        let Some(att) = self.origin.as_ref() else { return Ok(()) };
        if !att.is_replaced() {
            // Its connection was opened after that reconnect: wait for the next one.
            self.replaced = Some(watch);
            return Ok(());
        }
        if self.holding_still() == Some(false) {
            return Err(End::Replaced);
        }
        Ok(())
    }

    /// Whether the client holds an origin connection while nothing is under way in either
    /// direction (the client is thinking, or gone quiet), and if so whether inside a transaction.
    fn holding_still(&self) -> Option<bool> {
        let att = self.origin.as_ref()?;
        let quiet = att.queue.is_empty() && att.out.is_empty() && self.to_client.is_empty();
        if !quiet || !self.batch.is_empty() || self.copy_in || self.reader.has_bytes() {
            return None;
        }
        Some(self.status != b'I')
    }

    /// The stretch a client is in, for its time limits: holding still, or waiting for the
    /// origin to answer a request of its own.
    fn stretch(&self) -> Option<Stretch> {
        if let Some(in_transaction) = self.holding_still() {
            return Some(Stretch::Still { in_transaction });
        }
        let since = self.query_started?;
        self.origin.as_ref().is_some_and(|a| a.queue.has_entries()).then_some(Stretch::Query { since })
    }

    fn origin_lost(&self, e: &OriginError) -> End {
        tracing::warn!(error = %e, "origin connection lost while in use");
        End::OriginLost { already_told: self.origin.as_ref().is_some_and(|a| a.fatal) }
    }

    // ---- client -> origin ----

    async fn on_client(&mut self) -> Result<(), End> {
        while let Some(msg) = self.reader.try_next().map_err(|e| End::Protocol(e.to_string()))? {
            self.intake(msg).await?;
            if self.origin.as_ref().is_some_and(|a| a.out.len() >= HIGH_WATER) {
                break;
            }
        }
        Ok(())
    }

    async fn intake(&mut self, msg: Message) -> Result<(), End> {
        let tag = msg.tag();
        self.traffic.received += msg.frame().len() as u64;
        if self.copy_in {
            if matches!(tag, fe::COPY_DATA | fe::COPY_DONE | fe::COPY_FAIL | fe::FLUSH | fe::SYNC) {
                // Straight through: Postgres consumes these itself while copying in.
                if let Some(a) = self.origin.as_mut() {
                    a.out.extend_from_slice(msg.frame());
                }
                if matches!(tag, fe::COPY_DONE | fe::COPY_FAIL) {
                    self.copy_in = false;
                }
                return Ok(());
            }
            // Anything else ends the copy with an error at the origin; plan it normally.
            self.copy_in = false;
        }
        match tag {
            fe::TERMINATE => Err(End::Terminate),
            t if !fe::is_known(t) => Err(End::Protocol(format!("invalid frontend message type {t}"))),
            // Behind input that waits for an answer (`PlanNotes::wait_at`): queued as it is and
            // planned with it once the answer comes (`on_origin`), not re-planned per message.
            _ if self.waiting => {
                self.batch_bytes += msg.len();
                self.batch.push(msg);
                Ok(())
            }
            // Copy input before the origin said a COPY started. With nothing sent or to send,
            // no COPY can start: Postgres ignores these too (a failed COPY leaves some in
            // flight). Otherwise the planner holds it until the origin says (`on_origin`).
            t if fe::is_copy_input(t) => {
                if self.origin.is_none() && self.batch.is_empty() {
                    return Ok(());
                }
                self.batch_bytes += msg.len();
                self.batch.push(msg);
                self.dispatch().await
            }
            fe::SYNC | fe::FLUSH | fe::QUERY | fe::FUNCTION_CALL => {
                self.batch.push(msg);
                self.dispatch().await
            }
            _ => {
                self.batch_bytes += msg.len();
                self.batch.push(msg);
                if self.batch_bytes >= MAX_BATCH_BYTES {
                    self.dispatch().await
                } else {
                    Ok(())
                }
            }
        }
    }

    /// Sends the batch to an origin connection, checking one out if needed.
    async fn dispatch(&mut self) -> Result<(), End> {
        // Taken out while planning, then handed back emptied, so its allocation is reused.
        let mut batch = std::mem::take(&mut self.batch);
        self.batch_bytes = 0;
        let result = self.dispatch_batch(&batch).await;
        batch.clear();
        if self.batch.is_empty() {
            self.batch = batch;
        }
        result
    }

    async fn dispatch_batch(&mut self, batch: &[Message]) -> Result<(), End> {
        let mut answer = caching::CacheAnswer::Forward;
        if self.origin.is_none() {
            if self.skip_until_sync {
                // Finishing an error pgwarp already answered: no origin needed.
                if batch.iter().any(|m| m.tag() == fe::SYNC) {
                    self.skip_until_sync = false;
                    self.to_client.extend_from_slice(&build::ready_for_query(self.status));
                }
                return Ok(());
            }
            if matches!(batch, [m] if m.tag() == fe::FLUSH) {
                // A Flush with nothing pending gets no answer from Postgres: no connection needed
                // (taking one would pin it while the client sits idle).
                return Ok(());
            }
            answer = self.answer_from_cache(batch).await;
            if answer == caching::CacheAnswer::Served {
                return Ok(());
            }
            match self.attach().await {
                Ok(conn) => self.origin = Some(conn),
                Err(AttachError::Pool(e)) => {
                    self.capture = None;
                    self.fail_batch(batch, &e);
                    return Ok(());
                }
                Err(AttachError::Rejected(f)) => return Err(End::Refused { code: f.code, message: f.message }),
                Err(AttachError::Stopped) => return Err(self.stopped()),
                Err(AttachError::TimedOut) => return Err(End::QueryTimeout),
            }
        }
        // A batch being recorded for the cache was classified as reads only: it writes nothing.
        if answer != caching::CacheAnswer::Recording {
            self.track_writes(batch);
        }
        let Some(conn) = self.origin.as_mut() else {
            return Ok(());
        };
        let conn = &mut **conn;
        // The status the client last saw is the transaction's only when nothing it sent before
        // is still unanswered (a pipelined ROLLBACK may be on its way).
        let aborted = self.status == b'E' && conn.queue.is_empty();
        let owed_before = conn.queue.has_entries();
        let notes = Planner {
            statements: &mut self.statements,
            server: &mut conn.statements,
            queue: &mut conn.queue,
            out: &mut conn.out,
            skip_until_sync: &mut self.skip_until_sync,
            needs_sync: &mut conn.needs_sync,
            aborted,
            pinned: self.pinned,
        }
        .plan(batch)
        .map_err(|e| End::Protocol(e.to_string()))?;
        if let Some(at) = notes.wait_at {
            // The rest goes back in front of whatever the client sends next, and is planned
            // again once the origin has answered more (see `on_origin`).
            self.batch = batch[at..].to_vec();
            self.batch_bytes = self.batch.iter().map(Message::len).sum();
            self.waiting = true;
        }
        let start = self.to_client.len();
        conn.queue.drain_synthetic(&mut self.to_client);
        // A request starts when the origin comes to owe answers; answers pgwarp made itself do
        // not count, nor does an earlier stretch that ended without a ReadyForQuery (a Flush).
        if !owed_before && conn.queue.has_entries() {
            self.query_started = Some(Instant::now());
        }
        self.capture_synthetic(start);
        if let Some(feature) = notes.session_feature {
            if !self.pinned {
                tracing::info!(
                    feature,
                    "client uses session-scoped state: origin connection pinned until it disconnects"
                );
                self.pin();
            }
        }
        self.settings_dirty |= notes.may_change_settings;
        self.maybe_release().await
    }

    /// Checks out a connection and brings its settings in line with this client's, in the same
    /// round trip as the client's first message.
    async fn attach(&mut self) -> Result<PooledConn, AttachError> {
        self.listing.set_state(ClientState::Waiting);
        // A client left waiting (a busy or paused pool) still hears a kill. Checked only when
        // the checkout has to wait.
        let checkout = tokio::select! {
            biased;
            checkout = self.pool.checkout(self.listing.id) => checkout.map_err(AttachError::from),
            () = self.cancel.slot.stopped(Stop::Kill) => Err(AttachError::Stopped),
        };
        let mut att = match checkout {
            Ok(att) => att,
            Err(e) => {
                self.listing.set_state(ClientState::Idle);
                return Err(e);
            }
        };
        self.listing.set_state(ClientState::Active);
        if let Some(sql) = att.settings_sql(&self.wanted) {
            // A simple query destroys the unnamed statement.
            att.statements.unnamed = None;
            if self.settings_validated {
                att.set_applied_from(&self.wanted);
                att.out.extend_from_slice(&build::query(&sql));
                att.queue.push(Expect::query(Owner::Internal));
            } else {
                // The client's request waits on this round trip: query_timeout covers it.
                let limit = self.pool.query_timeout();
                let validated = Box::pin(self.validate_settings(&mut att, &sql));
                if limit.is_zero() {
                    validated.await?;
                } else if let Ok(validated) = tokio::time::timeout(limit, validated).await {
                    validated?;
                } else {
                    att.broken = true;
                    return Err(AttachError::TimedOut);
                }
            }
        }
        self.cancel.slot.attach(att.key, &att.target);
        Ok(att)
    }

    /// Applies settings the origin has not seen yet in a round trip of their own, so an invalid
    /// value ends the session (as it would have ended the login) before any of the client's
    /// work runs; then tells the client the values the origin actually uses.
    async fn validate_settings(&mut self, att: &mut PooledConn, sql: &str) -> Result<(), AttachError> {
        let outcome = att.simple_query(sql).await.map_err(PoolError::from)?;
        if let Some(err) = outcome.error {
            att.set_applied(Settings::new());
            att.broken = true;
            return Err(AttachError::Rejected(err));
        }
        att.set_applied_from(&self.wanted);
        self.settings_validated = true;
        self.pool.remember_params(&self.wanted, att);
        for (name, value) in &att.params {
            if self.wanted.keys().any(|k| k.eq_ignore_ascii_case(name)) {
                self.to_client.extend_from_slice(&build::parameter_status(name, value));
            }
        }
        Ok(())
    }

    /// Answers a batch pgwarp could not run (no origin connection).
    fn fail_batch(&mut self, batch: &[Message], err: &PoolError) {
        let (code, message) = match err {
            PoolError::Timeout(t) => (
                SqlState::TOO_MANY_CONNECTIONS.code().to_owned(),
                format!("pgwarp: no origin connection became free within {t:?}"),
            ),
            PoolError::Origin(e) => {
                tracing::warn!(error = %e, "could not get an origin connection");
                e.client_facing()
            }
            PoolError::Closed => (SqlState::ADMIN_SHUTDOWN.code().to_owned(), "pgwarp is shutting down".to_owned()),
        };
        self.to_client.extend_from_slice(&build::error_with_code(Severity::Error, &code, &message));
        match batch.last().map(Message::tag) {
            Some(fe::SYNC | fe::QUERY | fe::FUNCTION_CALL) => {
                self.to_client.extend_from_slice(&build::ready_for_query(self.status));
            }
            _ => self.skip_until_sync = true,
        }
    }

    // ---- origin -> client ----

    async fn on_origin(&mut self) -> Result<(), End> {
        loop {
            self.forward_plain()?;
            if self.to_client.len() >= HIGH_WATER {
                break;
            }
            let Some(att) = self.origin.as_mut() else {
                break;
            };
            match att.try_read() {
                Ok(Some(msg)) => self.route(msg)?,
                Ok(None) => break,
                Err(e) => return Err(self.origin_lost(&e)),
            }
        }
        if self.waiting {
            if self.batch.first().is_some_and(|m| fe::is_copy_input(m.tag())) {
                return self.resume_copy_input().await;
            }
            // Part of the client's input waits for an answer (`PlanNotes::wait_at`): try it
            // again now; it may have to wait more.
            self.waiting = false;
            return self.dispatch().await;
        }
        self.maybe_release().await
    }

    /// Copy input held until the origin said whether a COPY started: once it has (a
    /// CopyInResponse, or no command left that could start one), the held input goes through
    /// as if it arrived now: into the COPY, or ignored as Postgres ignores it outside one.
    async fn resume_copy_input(&mut self) -> Result<(), End> {
        let undecided = !self.copy_in && self.origin.as_ref().is_some_and(|a| a.queue.may_start_copy());
        if undecided {
            return Ok(());
        }
        self.waiting = false;
        self.batch_bytes = 0;
        for msg in std::mem::take(&mut self.batch) {
            self.intake(msg).await?;
        }
        self.maybe_release().await
    }

    /// Forwards the buffered answers that need nothing from `route` (`ResponseQueue::pass`) in
    /// one copy: most of a response, such as a result's rows. Not past a command that changes
    /// settings or statements.
    fn forward_plain(&mut self) -> Result<(), End> {
        let Some(att) = self.origin.as_mut() else {
            return Ok(());
        };
        let start = self.to_client.len();
        let run = att.forward_run(&mut self.to_client, HIGH_WATER, |queue, tag, body| {
            if tag == be::COMMAND_COMPLETE && !be::command_tag(body).is_ok_and(inspect::tag_is_plain) {
                return Run::Stop;
            }
            match queue.pass(tag) {
                false => Run::Stop,
                // pgwarp's own answer goes next, before any further origin message.
                true if queue.synthetic_due() => Run::Last,
                true => Run::Take,
            }
        });
        let forwarded = self.to_client.len();
        att.queue.drain_synthetic(&mut self.to_client);
        if self.capture.is_some() {
            self.capture_forwarded(start, forwarded);
            self.capture_synthetic(forwarded);
        }
        run.map_err(|e| self.origin_lost(&e))
    }

    /// Carries out the response queue's decision for one origin message.
    fn route(&mut self, msg: Message) -> Result<(), End> {
        let Some(att) = self.origin.as_mut() else {
            return Ok(());
        };
        let tag = msg.tag();
        let d = att.queue.on_message(tag, msg.body()).map_err(|e| {
            tracing::error!(error = %e, "origin and pgwarp fell out of step; closing the client");
            End::OriginLost { already_told: false }
        })?;
        match tag {
            be::PARAMETER_STATUS => {
                att.note_parameter(msg.body());
                self.settings_dirty |= !d.internal;
            }
            be::COMMAND_COMPLETE if !d.internal => {
                if let Ok(command) = be::command_tag(msg.body()) {
                    self.settings_dirty |= inspect::tag_changes_settings(command);
                    if inspect::tag_drops_all_statements(command) {
                        att.statements.clear();
                        self.statements.clear();
                    } else if d.client_sql && command == "PREPARE" && !self.pinned {
                        // A statement under the client's own name, which pgwarp does not
                        // track: it stays with this client's connection, and leaves with it.
                        let feature = "PREPARE inside a larger query";
                        tracing::info!(feature, "origin connection pinned until the client disconnects");
                        // `att` is borrowed: `pin`, field by field.
                        self.pinned = true;
                        self.replaced = Some(watch_replacement(&self.pool));
                    } else if d.client_sql && command == "DEALLOCATE" {
                        // It may have dropped one of pgwarp's statements: re-prepare on use.
                        att.statements.invalidate_all();
                    }
                }
            }
            be::ERROR_RESPONSE => {
                let fields = ErrorFields::parse(msg.body()).unwrap_or_default();
                if fields.is_fatal() {
                    att.fatal = true;
                    att.broken = true;
                }
                if d.internal {
                    tracing::warn!(code = %fields.code, "pgwarp's own query failed on the origin: {}", fields.message);
                    att.broken = true;
                }
                if let Some(id) = &d.failed_bind {
                    // "cached plan must not change result type", or the statement is gone from
                    // the origin (dropped by SQL pgwarp did not see): re-prepare on next use.
                    if fields.code == "0A000" || fields.code == "26000" {
                        att.statements.invalidate(id);
                    }
                }
            }
            _ => {}
        }
        for undo in &d.undone {
            apply_undo(undo, &mut self.statements, &mut att.statements);
        }
        if d.copy_in {
            self.copy_in = true;
        }
        let client_ready = d.ready.filter(|_| !d.internal);
        let nothing_outstanding = att.queue.is_empty();
        if let Some(status) = client_ready {
            self.status = status;
            if let Some(started) = self.query_started.take() {
                let now = Instant::now();
                self.traffic.queries += 1;
                self.traffic.query_micros += u64::try_from(now.duration_since(started).as_micros()).unwrap_or(u64::MAX);
                // The next request of a pipeline was waiting behind this one.
                if !nothing_outstanding {
                    self.query_started = Some(now);
                }
            }
            // Before the client can see its commit.
            self.invalidate_written(status, nothing_outstanding);
        }
        // ParameterStatus from pgwarp's settings query describes this client's session too.
        if d.forward || tag == be::PARAMETER_STATUS {
            self.to_client.extend_from_slice(msg.frame());
            self.capture(tag, msg.frame());
        }
        if let Some(status) = client_ready {
            self.finish_capture(status);
        }
        if let Some(att) = self.origin.as_mut() {
            let start = self.to_client.len();
            att.queue.drain_synthetic(&mut self.to_client);
            self.capture_synthetic(start);
        }
        Ok(())
    }

    /// Adds answers pgwarp made itself (from `start` in the output) to the capture.
    fn capture_synthetic(&mut self, start: usize) {
        if self.capture.is_some() && self.to_client.len() > start {
            let synthetic = self.to_client.split_off(start);
            // Message by message, so a synthetic error marks the capture as failed.
            let mut rest = &synthetic[..];
            while rest.len() >= 5 {
                let len = 1 + u32::from_be_bytes([rest[1], rest[2], rest[3], rest[4]]) as usize;
                let (frame, tail) = rest.split_at(len.min(rest.len()));
                self.capture(frame[0], frame);
                rest = tail;
            }
            self.to_client.unsplit(synthetic);
        }
    }

    /// Returns the connection to the pool if the client no longer needs it.
    async fn maybe_release(&mut self) -> Result<(), End> {
        let Some(att) = self.origin.as_ref() else {
            return Ok(());
        };
        let idle = att.queue.is_empty() && !att.needs_sync && att.out.is_empty() && self.batch.is_empty();
        if !idle || self.copy_in || self.status != b'I' {
            return Ok(());
        }
        if self.pinned && !att.broken {
            // A pinned client never goes idle without its connection: its totals are taken
            // at the end of each transaction instead.
            if self.traffic != Traffic::default() {
                self.pool.add_traffic(&std::mem::take(&mut self.traffic));
            }
            return if att.is_replaced() { Err(End::Replaced) } else { Ok(()) };
        }
        let Some(mut att) = self.origin.take() else {
            return Ok(());
        };
        self.listing.idle(self.statements.named_len());
        let cancel_in_flight = self.cancel.slot.detach();
        if att.broken {
            // Dropping closes it; the client carries on with the next connection.
            self.pinned = false;
            self.replaced = None;
            return Ok(());
        }
        if cancel_in_flight {
            // A cancel of this client's may still be on its way to this connection: it serves
            // nobody else until the origin has taken it. Rare; the client has its answer.
            self.flush_client().await?;
            Box::pin(self.cancel.slot.cancels_settled()).await;
        }
        if self.settings_dirty {
            self.settings_dirty = false;
            // Boxed: a rare round trip, kept out of the common path's future.
            match Box::pin(self.capture_settings(&mut att)).await? {
                Capture::Done => {}
                Capture::Failed => return Ok(()),
                Capture::Unreadable => {
                    // The client's settings are on this connection and nowhere else (its own
                    // statement_timeout of 1ms cancels the read-back): it keeps the connection.
                    let feature = "settings pgwarp could not read back";
                    tracing::warn!(feature, "origin connection pinned until the client disconnects");
                    self.pin();
                    self.cancel.slot.attach(att.key, &att.target);
                    self.listing.set_state(ClientState::Active);
                    self.origin = Some(att);
                    return Ok(());
                }
            }
        }
        self.pool.checkin(att);
        Ok(())
    }

    /// Reads back the client's settings from the connection it just used, before anyone else
    /// can get it (the client has its answer already).
    async fn capture_settings(&mut self, att: &mut PooledConn) -> Result<Capture, End> {
        self.flush_client().await?;
        let limit = self.pool.query_timeout();
        let read = if limit.is_zero() {
            att.simple_query(&capture_sql()).await
        } else {
            // A silent origin costs this connection, not the client, who has its answer.
            tokio::time::timeout(limit, att.simple_query(&capture_sql())).await.unwrap_or(Err(OriginError::Closed))
        };
        match read {
            Ok(out) if out.error.is_some() && out.status == b'I' => Ok(Capture::Unreadable),
            Ok(out) if out.status == b'I' => {
                let captured: Settings = out
                    .rows
                    .into_iter()
                    .filter_map(|r| match r.as_slice() {
                        [Some(k), Some(v)] => Some((k.clone(), v.clone())),
                        _ => None,
                    })
                    .collect();
                let mut wanted = (*self.startup_settings).clone();
                wanted.extend(captured.clone());
                if let Some(name) = wanted.get("application_name") {
                    self.listing.set_application_name(name);
                }
                self.wanted = Arc::new(wanted);
                att.set_applied(captured);
                Ok(Capture::Done)
            }
            Ok(_) | Err(_) => Ok(Capture::Failed),
        }
    }

    async fn flush_client(&mut self) -> Result<(), End> {
        if !self.to_client.is_empty() {
            self.client.write_all(&self.to_client).await.map_err(|_| End::ClientGone)?;
            self.traffic.sent += self.to_client.len() as u64;
            self.client.flush().await.map_err(|_| End::ClientGone)?;
            self.to_client.clear();
        }
        Ok(())
    }

    // ---- the end ----

    async fn finish(mut self: Box<Self>, end: End) {
        let fatal = match &end {
            End::Terminate | End::ClientGone => None,
            End::Refused { code, message } => {
                self.to_client.extend_from_slice(&build::error_with_code(Severity::Fatal, code, message));
                None
            }
            End::Shutdown => {
                Some((SqlState::ADMIN_SHUTDOWN, "terminating connection due to administrator command".to_owned()))
            }
            End::Killed => Some((
                SqlState::ADMIN_SHUTDOWN,
                "terminating connection due to administrator command (KILL in pgwarp's console)".to_owned(),
            )),
            End::QueryTimeout => Some((
                SqlState::QUERY_CANCELED,
                format!(
                    "terminating connection: the origin did not answer within query_timeout ({}); the query is being cancelled",
                    humantime::format_duration(self.pool.query_timeout())
                ),
            )),
            End::Replaced => Some((
                SqlState::ADMIN_SHUTDOWN,
                "terminating connection: its origin connection was replaced (RECONNECT, or the origin moved), and the session state it holds (LISTEN, advisory locks, temporary tables) cannot move with it; connect again".to_owned(),
            )),
            End::Protocol(m) => Some((SqlState::PROTOCOL_VIOLATION, m.clone())),
            End::HeldStill { in_transaction: true } => Some((
                SqlState::IDLE_IN_TRANSACTION_TIMEOUT,
                "terminating connection due to idle-in-transaction timeout (idle_transaction_timeout)".to_owned(),
            )),
            End::HeldStill { in_transaction: false } => Some((
                SqlState::IDLE_SESSION_TIMEOUT,
                "terminating connection due to idle-session timeout (client_idle_timeout)".to_owned(),
            )),
            End::OriginLost { already_told: true } => None,
            End::OriginLost { already_told: false } => {
                Some((SqlState::CONNECTION_FAILURE, "the connection to the origin database was lost".to_owned()))
            }
        };
        // What a killed or timed-out client ran is cancelled now, and its connection goes too
        // (nobody gets it back half-used), not after its FATAL is written: a client that does
        // not read could hold that up for seconds.
        if matches!(end, End::Killed | End::QueryTimeout) {
            if let Some(att) = self.origin.take() {
                tokio::spawn(close_killed(att));
            }
        }
        if let Some((code, message)) = &fatal {
            tracing::info!(code = code.code(), "closing client: {message}");
            self.to_client.extend_from_slice(&build::error(Severity::Fatal, *code, message));
        }
        if !matches!(end, End::ClientGone) {
            let _ = tokio::time::timeout(Duration::from_secs(2), async {
                let _ = self.client.write_all(&self.to_client).await;
                let _ = self.client.shutdown().await;
            })
            .await;
        }
        self.pool.add_traffic(&self.traffic);
        if self.ctx.config().log_disconnections {
            let age = self.listing.connected_at.elapsed().unwrap_or_default();
            tracing::info!(
                user = %self.user,
                database = %self.database,
                age = %humantime::format_duration(Duration::from_secs(age.as_secs())),
                "client disconnected: {}",
                end.reason()
            );
        }
        let cancel_in_flight = self.cancel.slot.detach();
        if let Some(att) = self.origin.take() {
            let (pool, status) = (self.pool.clone(), self.status);
            // Session state pgwarp has not read back (a SET in the transaction left open, or
            // anything a pinned client did) is discarded before anyone else gets the connection.
            let reset = self.pinned || self.settings_dirty;
            match end {
                // A killed or timed-out client's connection was closed above, before its FATAL.
                End::OriginLost { .. } | End::Killed | End::QueryTimeout => {}
                _ => {
                    let cancel = cancel_in_flight.then(|| self.cancel.slot.clone());
                    tokio::spawn(release_after_client(pool, att, status, reset, cancel));
                }
            }
        }
    }
}

/// After a client leaves while holding a connection: cancel what is running, or roll back and
/// reset, so the next client gets a clean connection; if that cannot be done quickly, close it.
/// `cancel`: the client's cancel slot, when a cancel of its may still be on its way here.
async fn release_after_client(
    pool: Arc<Pool>,
    mut conn: PooledConn,
    status: u8,
    reset: bool,
    cancel: Option<Arc<CancelSlot>>,
) {
    if let Some(slot) = cancel {
        // The clean-up below must not be what that cancel hits, nor the next client's work.
        slot.cancels_settled().await;
    }
    if conn.queue.has_entries() || !conn.out.is_empty() || conn.broken {
        cancel::send_cancel(conn.target.clone(), conn.key).await;
        return; // dropping closes it; Postgres rolls back when it notices
    }
    let cleaned = tokio::time::timeout(CLEANUP_TIMEOUT, async {
        let mut status = status;
        // An extended-protocol sequence left open, or an error the origin is still skipping
        // past: only a Sync brings it back.
        if conn.needs_sync || conn.queue.is_skipping() {
            status = conn.sync().await?;
        }
        if status != b'I' {
            let out = conn.simple_query("ROLLBACK").await?;
            status = out.status;
        }
        if reset && status == b'I' {
            let out = conn.simple_query("DISCARD ALL").await?;
            conn.set_applied(Settings::new());
            conn.statements.clear();
            status = if out.error.is_some() { b'E' } else { out.status };
        }
        Ok::<u8, OriginError>(status)
    })
    .await;
    match cleaned {
        Ok(Ok(b'I')) => pool.checkin(conn),
        Ok(Ok(_)) | Ok(Err(_)) | Err(_) => {
            tracing::debug!("closing origin connection left unclean by a client")
        }
    }
}

/// Closes the connection a killed client held. What runs on it is cancelled first: closing the
/// socket alone does not stop a running query (Postgres notices only when it next writes).
async fn close_killed(conn: PooledConn) {
    if conn.queue.has_entries() || !conn.out.is_empty() {
        cancel::send_cancel(conn.target.clone(), conn.key).await;
    }
    drop(conn);
}

/// The limit of a stretch of a client of `pool` (zero: none), as the pool's settings are now.
fn time_limit(pool: &Pool, stretch: Stretch) -> Duration {
    match stretch {
        Stretch::Still { in_transaction } => pool.holding_still_limit(in_transaction),
        Stretch::Query { .. } => pool.query_timeout(),
    }
}

/// Polls the watch a pinned session keeps for reconnects, if it has one.
fn poll_replaced(replaced: &mut Option<Pin<Box<OwnedNotified>>>, cx: &mut Context<'_>) -> Poll<()> {
    match replaced {
        Some(r) => r.as_mut().poll(cx),
        None => Poll::Pending,
    }
}

/// Resolves at `pool`'s next reconnect: registered at once, so a reconnect right after this
/// call is not missed.
fn watch_replacement(pool: &Pool) -> Pin<Box<OwnedNotified>> {
    let mut replaced = Box::pin(pool.replacement());
    replaced.as_mut().enable();
    replaced
}

#[cfg(test)]
mod tests {
    /// Every idle client costs its task's future plus its boxed Session: keep both small
    /// (the bench's target is 4 KiB per idle client in all).
    #[tokio::test]
    async fn idle_client_state_stays_small() {
        fn size_of_future<F: std::future::Future>(_: &F) -> usize {
            std::mem::size_of::<F>()
        }
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let _client = tokio::net::TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let (socket, peer) = listener.accept().await.unwrap();
        let config = crate::config::Config {
            origin: Some("postgres://a:b@127.0.0.1:1/d".into()),
            listen: "127.0.0.1:0".into(),
            ..Default::default()
        };
        let server = crate::server::Server::bind(config).await.unwrap();
        let fut = super::serve_client(server.context().clone(), super::ClientStream::Tcp(socket), peer.into());
        let task = size_of_future(&fut);
        let session = std::mem::size_of::<super::Session>();
        assert!(task <= 768, "a client's task future grew to {task} bytes");
        // 512 until the traffic counters (48 bytes) came, 576 until the busy-poll flag (a ninth
        // one-byte field); the target for an idle client is 4 KiB in all.
        assert!(session <= 584, "Session grew to {session} bytes");
    }
}
