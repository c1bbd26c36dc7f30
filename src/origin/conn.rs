//! Connecting to the origin and logging in as a client; reading and writing framed messages on
//! an established connection; pgwarp's own small queries.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;
use bytes::BytesMut;
use futures_util::FutureExt;
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};
use tokio::io::AsyncWriteExt;

use super::queue::ResponseQueue;
use super::settings::{sync_sql, Settings};
use super::statements::ServerStatements;
use super::OriginError;
use crate::protocol::backend::{self as be, AuthRequest};
use crate::protocol::codec::{FrameError, HARD_MAX_MESSAGE};
use crate::protocol::error::ErrorFields;
use crate::protocol::scram::ScramKeys;
use crate::protocol::scram_client::KeyedScramClient;
use crate::protocol::{build, md5, poll_duplex, Duplex, Message, MessageReader, Run};
use crate::roster::{Listed, ServerEntry};
use crate::transport::{self, OriginStream, OriginTarget};

/// Who pgwarp logs in to the origin as.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Credentials {
    pub user: String,
    pub secret: OriginSecret,
    pub database: String,
}

impl Credentials {
    /// Credentials with a plain password (or none).
    pub fn with_password(user: String, password: Option<String>, database: String) -> Credentials {
        let secret = password.map_or(OriginSecret::None, OriginSecret::Password);
        Credentials { user, secret, database }
    }
}

/// How pgwarp proves itself to the origin.
#[derive(Clone, PartialEq, Eq, Hash)]
pub enum OriginSecret {
    /// None configured: only an origin that asks for none (trust) lets pgwarp in.
    None,
    /// A password: answers SCRAM, md5 and cleartext requests.
    Password(String),
    /// SCRAM keys a client's proof revealed (pass-through): answers SCRAM requests, and only
    /// while the role keeps the verifier they came from.
    ScramKeys(ScramKeys),
    /// The role's md5 hash, as pg_authid stores it (pass-through): answers md5 requests.
    Md5Hash(String),
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}@{}", self.user, self.database)
    }
}

/// The origin backend's cancel key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BackendKey {
    pub pid: i32,
    pub secret: i32,
}

/// The result of one of pgwarp's own simple queries.
#[derive(Debug, Default)]
pub struct QueryOutcome {
    pub rows: Vec<Vec<Option<String>>>,
    /// Rows past the caller's limit: counted, not kept.
    pub rows_left_out: usize,
    pub error: Option<ErrorFields>,
    pub status: u8,
}

/// A SCRAM exchange with the origin under way.
enum Scram {
    Password(ScramSha256),
    Keys(KeyedScramClient),
}

impl std::fmt::Debug for OriginSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.kind())
    }
}

impl OriginSecret {
    /// Whether a newer login may replace this secret in a pool: pass-through secrets, which a
    /// client proved against the role's own verifier. A configured password is part of the
    /// pool's identity instead, so one login's mistake never breaks another's pool.
    pub fn renewable(&self) -> bool {
        matches!(self, OriginSecret::ScramKeys(_) | OriginSecret::Md5Hash(_))
    }

    /// What kind of secret this is, for errors (never the secret).
    pub fn kind(&self) -> &'static str {
        match self {
            OriginSecret::None => "no password",
            OriginSecret::Password(_) => "a password",
            OriginSecret::ScramKeys(_) => "SCRAM keys from the client's login",
            OriginSecret::Md5Hash(_) => "an md5 hash",
        }
    }
}

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

pub struct OriginConn {
    /// A small number for logs.
    pub id: u64,
    stream: OriginStream,
    reader: MessageReader,
    pub key: BackendKey,
    /// The current value of every parameter the origin reports (startup, then ParameterStatus).
    pub params: BTreeMap<String, String>,
    /// Session settings pgwarp has applied on this connection (what `pg_settings` shows with
    /// source = 'session').
    applied: Settings,
    /// The shared settings `applied` was last copied from, if nothing changed it since: clients
    /// with the same startup settings share one `Arc`, so checking a connection out for one of
    /// them is a pointer comparison, not a map comparison.
    applied_from: Option<Arc<Settings>>,
    /// The statements prepared here.
    pub statements: ServerStatements,
    pub created: Instant,
    pub last_used: Instant,
    /// The worker whose reactor the socket is registered with (see `workers`): the pool hands
    /// the connection to that worker's clients first.
    home: usize,
    /// Set when the connection must not go back to the pool.
    pub broken: bool,
    /// The origin sent a FATAL error: it is going away.
    pub fatal: bool,
    /// What this connection still owes, message by message.
    pub queue: ResponseQueue,
    /// Bytes waiting to be written to the origin.
    pub out: BytesMut,
    /// Extended-protocol messages were sent since the last Sync.
    pub needs_sync: bool,
    /// What carries the stream: tcp, tls, websocket or websocket+tls.
    pub carrier: &'static str,
    /// Its entry in `SHOW SERVERS`, once the pool has listed it; unlisted when this drops.
    pub listing: Option<Listed<ServerEntry>>,
    /// Its share of the caps on open connections (`max_db_connections`,
    /// `max_user_connections`), given back when it goes.
    pub hold: Vec<tokio::sync::OwnedSemaphorePermit>,
    /// Its pool's generation (RECONNECT, a new origin): counted open until it goes.
    pub vintage: Option<crate::pool::Vintage>,
    /// Where it is connected: a cancel request for its backend goes there, even after the
    /// origin address changed.
    pub target: Arc<OriginTarget>,
}

impl std::fmt::Debug for OriginConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "OriginConn#{}(pid {})", self.id, self.key.pid)
    }
}

impl OriginConn {
    /// Connects and logs in, within `timeout`: to the target's host, or, when its URL names
    /// several hosts or a `target_session_attrs`, to the first that answers and suits
    /// (`hosts`), each within `timeout`.
    pub async fn connect(
        target: &Arc<OriginTarget>,
        creds: &Credentials,
        statement_cache: usize,
        timeout: Duration,
    ) -> Result<OriginConn, OriginError> {
        if target.choice.is_trivial() {
            return Self::connect_to(target, creds, statement_cache, timeout).await;
        }
        Box::pin(super::hosts::connect(target, creds, statement_cache, timeout)).await
    }

    /// Connects to the target's own host and logs in, within `timeout`.
    async fn connect_to(
        target: &Arc<OriginTarget>,
        creds: &Credentials,
        statement_cache: usize,
        timeout: Duration,
    ) -> Result<OriginConn, OriginError> {
        tokio::time::timeout(timeout, Self::connect_inner(target, creds, statement_cache))
            .await
            .map_err(|_| OriginError::ConnectTimeout)?
    }

    /// Connects and logs in, with no time limit of its own.
    pub(super) async fn connect_inner(
        target: &Arc<OriginTarget>,
        creds: &Credentials,
        statement_cache: usize,
    ) -> Result<OriginConn, OriginError> {
        let (mut stream, carrier) = transport::connect_telling(target).await.map_err(OriginError::Connect)?;
        let startup = build::startup(&[("user", &creds.user), ("database", &creds.database)]);
        stream.write_all(&startup).await?;
        stream.flush().await?;
        let mut conn = OriginConn {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            stream,
            reader: MessageReader::new(HARD_MAX_MESSAGE),
            key: BackendKey { pid: 0, secret: 0 },
            params: BTreeMap::new(),
            applied: Settings::new(),
            applied_from: None,
            statements: ServerStatements::new(statement_cache),
            created: Instant::now(),
            last_used: Instant::now(),
            home: crate::workers::current(),
            broken: false,
            fatal: false,
            queue: ResponseQueue::new(),
            out: BytesMut::new(),
            needs_sync: false,
            carrier,
            listing: None,
            hold: Vec::new(),
            vintage: None,
            target: target.clone(),
        };
        conn.authenticate(creds).await?;
        loop {
            let msg = conn.read().await?;
            match msg.tag() {
                be::PARAMETER_STATUS => conn.note_parameter(msg.body()),
                be::BACKEND_KEY_DATA => {
                    let (pid, secret) = be::backend_key_data(msg.body()).map_err(protocol)?;
                    conn.key = BackendKey { pid, secret };
                }
                be::READY_FOR_QUERY => return Ok(conn),
                be::ERROR_RESPONSE => return Err(refused(&msg)),
                be::NOTICE_RESPONSE | be::NEGOTIATE_PROTOCOL_VERSION => {}
                other => return Err(OriginError::Protocol(format!("unexpected {:?} during startup", other as char))),
            }
        }
    }

    /// Answers the origin's authentication requests until AuthenticationOk.
    async fn authenticate(&mut self, creds: &Credentials) -> Result<(), OriginError> {
        let mut scram: Option<Scram> = None;
        loop {
            let msg = self.read().await?;
            if msg.tag() == be::ERROR_RESPONSE {
                return Err(refused(&msg));
            }
            if msg.tag() != be::AUTHENTICATION {
                return Err(OriginError::Protocol(format!("expected authentication, got {:?}", msg.tag() as char)));
            }
            let request = be::auth_request(msg.body()).map_err(protocol)?;
            let cannot = |asked: &str| OriginError::CannotAnswer { asked: asked.to_owned(), held: creds.secret.kind() };
            match (request, &creds.secret) {
                // A SCRAM exchange ends with the origin's proof that it holds the verifier;
                // an origin that skips it may not be the origin.
                (AuthRequest::Ok, _) if scram.is_some() => {
                    return Err(OriginError::Scram("the origin ended SCRAM without proving itself".into()))
                }
                (AuthRequest::Ok, _) => return Ok(()),
                (AuthRequest::Cleartext, OriginSecret::Password(password)) => {
                    let mut data = password.as_bytes().to_vec();
                    data.push(0);
                    self.write(&build::password(&data)).await?;
                }
                (AuthRequest::Md5 { salt }, OriginSecret::Password(password)) => {
                    let hash =
                        postgres_protocol::authentication::md5_hash(creds.user.as_bytes(), password.as_bytes(), salt);
                    let mut data = hash.into_bytes();
                    data.push(0);
                    self.write(&build::password(&data)).await?;
                }
                (AuthRequest::Md5 { salt }, OriginSecret::Md5Hash(stored)) => {
                    let mut data = md5::answer(stored, salt).ok_or_else(|| cannot("md5"))?.into_bytes();
                    data.push(0);
                    self.write(&build::password(&data)).await?;
                }
                (AuthRequest::Sasl { mechanisms }, _) if !mechanisms.contains(&"SCRAM-SHA-256") => {
                    return Err(OriginError::UnsupportedAuth(mechanisms.join(", ")));
                }
                (AuthRequest::Sasl { .. }, OriginSecret::Password(password)) => {
                    let client = ScramSha256::new(password.as_bytes(), ChannelBinding::unsupported());
                    self.write(&build::sasl_initial_response("SCRAM-SHA-256", client.message())).await?;
                    scram = Some(Scram::Password(client));
                }
                (AuthRequest::Sasl { .. }, OriginSecret::ScramKeys(keys)) => {
                    let nonce = base64::engine::general_purpose::STANDARD.encode(crate::auth::random_bytes(18));
                    let (client, first) = KeyedScramClient::start(keys.clone(), nonce);
                    self.write(&build::sasl_initial_response("SCRAM-SHA-256", first.as_bytes())).await?;
                    scram = Some(Scram::Keys(client));
                }
                (AuthRequest::SaslContinue { data }, _) => {
                    let answer = match scram.take() {
                        Some(Scram::Password(mut client)) => {
                            let data = data.to_vec();
                            // The salted-password derivation is deliberately slow: keep it off
                            // the workers.
                            let client = tokio::task::spawn_blocking(move || client.update(&data).map(|()| client))
                                .await
                                .map_err(|e| OriginError::Scram(e.to_string()))?
                                .map_err(|e| OriginError::Scram(e.to_string()))?;
                            let answer = client.message().to_vec();
                            scram = Some(Scram::Password(client));
                            answer
                        }
                        Some(Scram::Keys(mut client)) => {
                            let answer = client.answer(data).map_err(|e| OriginError::Scram(e.to_string()))?;
                            scram = Some(Scram::Keys(client));
                            answer.into_bytes()
                        }
                        None => return Err(OriginError::Scram("unexpected SASL continue".into())),
                    };
                    self.write(&build::password(&answer)).await?;
                }
                (AuthRequest::SaslFinal { data }, _) => match scram.take() {
                    Some(Scram::Password(mut client)) => {
                        client.finish(data).map_err(|e| OriginError::Scram(e.to_string()))?
                    }
                    Some(Scram::Keys(client)) => client.finish(data).map_err(|e| OriginError::Scram(e.to_string()))?,
                    None => return Err(OriginError::Scram("unexpected SASL final".into())),
                },
                (AuthRequest::Other(code), _) => return Err(OriginError::UnsupportedAuth(format!("method {code}"))),
                (AuthRequest::Cleartext, _) => return Err(cannot("a cleartext password")),
                (AuthRequest::Md5 { .. }, _) => return Err(cannot("md5")),
                (AuthRequest::Sasl { .. }, _) => return Err(cannot("SCRAM-SHA-256")),
            }
        }
    }

    /// Reads one message. Cancel safe.
    pub async fn read(&mut self) -> Result<Message, OriginError> {
        match self.reader.read(&mut self.stream).await {
            Ok(Some(m)) => Ok(m),
            Ok(None) => Err(OriginError::Closed),
            Err(FrameError::Io(e)) => Err(OriginError::Io(e)),
            Err(e) => Err(OriginError::Protocol(e.to_string())),
        }
    }

    /// The next message if one is already buffered, without waiting.
    pub fn try_read(&mut self) -> Result<Option<Message>, OriginError> {
        self.reader.try_next().map_err(|e| OriginError::Protocol(e.to_string()))
    }

    /// Moves the run of buffered answers that `decide` lets through into `out` in one copy
    /// (`MessageReader::forward_run`); `decide` sees the response queue to move it along.
    pub fn forward_run(
        &mut self,
        out: &mut BytesMut,
        limit: usize,
        mut decide: impl FnMut(&mut ResponseQueue, u8, &[u8]) -> Run,
    ) -> Result<(), OriginError> {
        let queue = &mut self.queue;
        self.reader
            .forward_run(out, limit, |tag, body| decide(queue, tag, body))
            .map_err(|e| OriginError::Protocol(e.to_string()))
    }

    /// One step of full-duplex I/O: writes what it can of `self.out`, then reads if `want_read`
    /// until a whole message is buffered (`Duplex::Buffered`: take it with `forward_run` or
    /// `try_read`).
    pub fn poll_io(
        &mut self,
        cx: &mut std::task::Context<'_>,
        want_read: bool,
    ) -> std::task::Poll<Result<Duplex, OriginError>> {
        poll_duplex(cx, &mut self.stream, &mut self.reader, &mut self.out, want_read).map_err(|e| match e {
            FrameError::Io(e) => OriginError::Io(e),
            e => OriginError::Protocol(e.to_string()),
        })
    }

    /// Sends Sync and waits for ReadyForQuery, dropping anything before it; returns the status.
    /// Only for a connection that owes no answers: afterwards the origin has left any
    /// skip-until-Sync state, and so has the response queue.
    pub async fn sync(&mut self) -> Result<u8, OriginError> {
        self.write(&build::sync()).await?;
        loop {
            let msg = self.read().await?;
            match msg.tag() {
                be::READY_FOR_QUERY => {
                    self.queue.reset();
                    self.needs_sync = false;
                    return be::ready_status(msg.body()).map_err(protocol);
                }
                be::PARAMETER_STATUS => self.note_parameter(msg.body()),
                _ => {}
            }
        }
    }

    /// Writes and flushes (a TLS or WebSocket stream may hold bytes until flushed).
    pub async fn write(&mut self, bytes: &[u8]) -> Result<(), OriginError> {
        self.stream.write_all(bytes).await?;
        self.stream.flush().await?;
        Ok(())
    }

    /// Records a ParameterStatus the origin sent.
    pub fn note_parameter(&mut self, body: &[u8]) {
        if let Ok((name, value)) = be::parameter_status(body) {
            self.params.insert(name.to_owned(), value.to_owned());
        }
    }

    /// Whether nothing is owed or waiting to be sent, so the connection can serve someone else.
    /// (`queue.is_empty` also covers an origin still skipping to a Sync.)
    pub fn is_quiet(&self) -> bool {
        self.queue.is_empty() && self.out.is_empty() && !self.needs_sync
    }

    /// The worker whose reactor the socket is registered with.
    pub fn home(&self) -> usize {
        self.home
    }

    /// Moves the socket, under any TLS or WebSocket layers, to the calling worker's reactor.
    /// Only for an idle connection: nobody may be waiting on it. On failure the connection is
    /// marked broken.
    pub fn rehome(&mut self) {
        if !self.stream.can_rehome() {
            return;
        }
        // Layers keep what they buffered; only the socket under them moves.
        match self.stream.rehome() {
            Ok(()) => self.home = crate::workers::current(),
            Err(e) => {
                tracing::warn!(conn = self.id, error = %e, "cannot move origin connection between workers");
                self.broken = true;
            }
        }
    }

    /// Session settings pgwarp has applied here.
    pub fn applied(&self) -> &Settings {
        &self.applied
    }

    /// Records the settings now in force here.
    pub fn set_applied(&mut self, applied: Settings) {
        self.applied = applied;
        self.applied_from = None;
    }

    /// Records that `wanted` is now in force here.
    pub fn set_applied_from(&mut self, wanted: &Arc<Settings>) {
        self.applied = (**wanted).clone();
        self.applied_from = Some(wanted.clone());
    }

    /// The query that brings this connection's settings to `wanted`, or None if they match
    /// (then remembering that they match `wanted`, for the next time).
    pub fn settings_sql(&mut self, wanted: &Arc<Settings>) -> Option<String> {
        if self.applied_from.as_ref().is_some_and(|from| Arc::ptr_eq(from, wanted)) {
            return None;
        }
        let sql = sync_sql(&self.applied, wanted);
        if sql.is_none() {
            self.applied_from = Some(wanted.clone());
        }
        sql
    }

    /// Whether an idle connection still looks usable: nothing to read and not closed. An idle
    /// origin sends nothing unless it is going away (e.g. FATAL 57P01 on shutdown).
    pub fn is_alive(&mut self) -> bool {
        if self.broken || self.reader.has_bytes() {
            return false;
        }
        if !self.stream.maybe_readable() {
            // Nothing arrived: the common case, answered without touching buffers.
            return true;
        }
        match self.reader.read(&mut self.stream).now_or_never() {
            None => true,
            Some(_) => {
                self.broken = true;
                false
            }
        }
    }

    /// Runs one of pgwarp's own simple queries to completion, collecting rows as text.
    pub async fn simple_query(&mut self, sql: &str) -> Result<QueryOutcome, OriginError> {
        // A simple query destroys the origin's unnamed statement: a client that Parsed one in
        // an earlier batch gets it replayed at its Bind, as on a connection that never had it.
        self.statements.unnamed = None;
        self.write(&build::query(sql)).await?;
        self.collect_outcome(usize::MAX).await
    }

    /// Runs one of pgwarp's own queries with text parameters (`$1`, ...) through the unnamed
    /// statement, collecting rows as text; rows past `max_rows` are counted, not kept.
    /// Parameters never become SQL text.
    pub async fn query_with_params(
        &mut self,
        sql: &str,
        params: &[Option<&str>],
        max_rows: usize,
    ) -> Result<QueryOutcome, OriginError> {
        self.statements.unnamed = None;
        let mut out = BytesMut::new();
        build::parse_into(&mut out, "", sql, &[]);
        build::bind_text_into(&mut out, "", params);
        build::execute_into(&mut out);
        out.extend_from_slice(&build::sync());
        self.write(&out).await?;
        self.collect_outcome(max_rows).await
    }

    /// Reads the answer to one of pgwarp's own queries up to ReadyForQuery, keeping at most
    /// `max_rows` rows.
    async fn collect_outcome(&mut self, max_rows: usize) -> Result<QueryOutcome, OriginError> {
        let mut out = QueryOutcome::default();
        loop {
            let msg = self.read().await?;
            match msg.tag() {
                be::DATA_ROW if out.rows.len() >= max_rows => out.rows_left_out += 1,
                be::DATA_ROW => out.rows.push(be::data_row_text(msg.body()).map_err(protocol)?),
                be::PARAMETER_STATUS => self.note_parameter(msg.body()),
                be::ERROR_RESPONSE => {
                    let fields = ErrorFields::parse(msg.body()).map_err(protocol)?;
                    if fields.is_fatal() {
                        self.broken = true;
                        return Err(OriginError::Refused(fields));
                    }
                    out.error = Some(fields);
                }
                be::READY_FOR_QUERY => {
                    out.status = be::ready_status(msg.body()).map_err(protocol)?;
                    return Ok(out);
                }
                // COPY cannot start from pgwarp's own queries; anything else is informational.
                _ => {}
            }
        }
    }

    /// Sends Terminate and closes, best effort.
    pub async fn close(mut self) {
        let _ = tokio::time::timeout(Duration::from_secs(1), async {
            let _ = self.stream.write_all(&build::terminate()).await;
            let _ = self.stream.shutdown().await;
        })
        .await;
    }
}

fn protocol(e: crate::protocol::DecodeError) -> OriginError {
    OriginError::Protocol(e.to_string())
}

fn refused(msg: &Message) -> OriginError {
    match ErrorFields::parse(msg.body()) {
        Ok(fields) => OriginError::Refused(fields),
        Err(e) => protocol(e),
    }
}
