//! Turning one client batch into the bytes sent to an origin connection and the answers
//! expected back. Pure: it touches the client's statement map, the connection's statement
//! bookkeeping and the response queue, and does no I/O.
//!
//! Per message: a named Parse is saved in the client's map and sent under its content-derived
//! name unless the connection already has it (then pgwarp answers ParseComplete itself); a
//! Bind or Describe of a statement the connection lacks is preceded by the saved Parse, whose
//! ParseComplete is hidden; Close of a statement only updates the client's map. Errors pgwarp
//! detects itself (unknown or duplicate statement names) are answered in order, and the rest of
//! the batch until Sync is skipped, as Postgres would.

use std::borrow::Cow;
use std::sync::Arc;

use bytes::{BufMut, Bytes, BytesMut};

use super::statements::{Replay, Statement, StatementMap};
use crate::origin::{Expect, Owner, ResponseQueue, ServerStatements, Undo};
use crate::protocol::error::{Severity, SqlState};
use crate::protocol::frontend::{self as fe, Bind, Named, Parse, Target};
use crate::protocol::{build, DecodeError, Message};
use crate::sql::inspect;
use crate::sql::prepared::{self, PreparedCommand};

/// A statement name no origin connection has: content ids are `pgwarp_` and 24 hex digits.
const ABSENT_STATEMENT: &str = "pgwarp_absent";

/// What the session needs to know about a batch besides what was sent.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct PlanNotes {
    /// SQL in the batch uses session-scoped state (LISTEN, temp tables, ...).
    pub session_feature: Option<&'static str>,
    /// SQL in the batch may change settings without a SET tag.
    pub may_change_settings: bool,
    /// Planning stopped before this message of the batch: it prepares a name whose earlier
    /// Parse or PREPARE, before a Sync, is still unanswered, and Postgres decides between
    /// "already exists" and a fresh statement by whether that one was skipped after an error.
    /// The rest of the batch waits for that answer.
    pub wait_at: Option<usize>,
}

/// The state one batch is planned against.
pub struct Planner<'a> {
    pub statements: &'a mut StatementMap,
    pub server: &'a mut ServerStatements,
    pub queue: &'a mut ResponseQueue,
    /// Bytes for the origin.
    pub out: &'a mut BytesMut,
    /// pgwarp answered an error itself; drop messages until the client's Sync.
    pub skip_until_sync: &'a mut bool,
    /// Extended-protocol messages were sent since the last Sync.
    pub needs_sync: &'a mut bool,
    /// The client's transaction is aborted (ReadyForQuery `E`): Postgres refuses PREPARE,
    /// EXECUTE and DEALLOCATE with 25P02 before it looks at any name, and changes nothing.
    pub aborted: bool,
    /// The connection is the client's until it leaves (`Session::pinned`).
    pub pinned: bool,
}

impl Planner<'_> {
    pub fn plan(&mut self, batch: &[Message]) -> Result<PlanNotes, DecodeError> {
        let mut notes = PlanNotes::default();
        for stale in self.server.take_stale() {
            build::close_statement_into(self.out, &stale);
            self.push(Expect::CloseComplete { owner: Owner::Internal });
        }
        for (i, msg) in batch.iter().enumerate() {
            let tag = msg.tag();
            if *self.skip_until_sync && tag != fe::SYNC {
                continue;
            }
            match tag {
                fe::PARSE => match self.parse(msg, &mut notes) {
                    Ok(true) => {}
                    Ok(false) => {
                        notes.wait_at = Some(i);
                        return Ok(notes);
                    }
                    // pgwarp keeps statements by their SQL text, which must be UTF-8 for that.
                    Err(DecodeError::NotUtf8 { .. }) => {
                        let message = "pgwarp: the SQL of a Parse message must be valid UTF-8 \
                                       (use client_encoding UTF8, or the simple query protocol)";
                        self.fail(SqlState::CHARACTER_NOT_IN_REPERTOIRE, message);
                    }
                    Err(e) => return Err(e),
                },
                fe::BIND => self.bind(msg)?,
                fe::DESCRIBE => self.describe(msg)?,
                fe::CLOSE => self.close(msg)?,
                fe::EXECUTE => {
                    self.out.extend_from_slice(msg.frame());
                    self.push(Expect::Execute);
                }
                fe::SYNC => {
                    self.out.extend_from_slice(msg.frame());
                    *self.skip_until_sync = false;
                    *self.needs_sync = false;
                    self.push(Expect::Sync { owner: Owner::Client });
                }
                fe::FLUSH => self.out.extend_from_slice(msg.frame()),
                // After an extended-protocol error the origin ignores everything up to a Sync,
                // a simple query included, without a word: so does pgwarp, leaving the
                // unnamed statement and the open sequence (`needs_sync`) as they are.
                fe::QUERY | fe::FUNCTION_CALL if self.queue.is_skipping() => {}
                fe::QUERY => {
                    // Text that is not UTF-8 (a LATIN1 client's, or a stray byte Postgres will
                    // report) is looked at as well as it reads, and sent on exactly as it came.
                    let (sql, utf8) = match fe::query_text(msg.body()) {
                        Ok(sql) => (Cow::Borrowed(sql), true),
                        Err(DecodeError::NotUtf8 { .. }) => (Cow::Owned(fe::query_text_lossy(msg.body())), false),
                        Err(e) => return Err(e),
                    };
                    let command = if utf8 { prepared::parse(&sql) } else { None };
                    if let Some(PreparedCommand::Prepare { name, .. }) = &command {
                        if self.must_wait(name) {
                            notes.wait_at = Some(i);
                            return Ok(notes);
                        }
                    }
                    note_sql(&mut notes, &sql);
                    // A simple query destroys the unnamed statement, in Postgres and here, and
                    // leaves no extended-protocol sequence open.
                    self.statements.remove("");
                    self.server.unnamed = None;
                    *self.needs_sync = false;
                    // In an aborted transaction the origin refuses the command as it is, with
                    // the client's own names: nothing to look up, rename or record.
                    let planned = match command {
                        Some(command) if !self.aborted && !self.passes_through(&command) => {
                            self.prepared_command(command);
                            true
                        }
                        _ => false,
                    };
                    if !planned {
                        self.out.extend_from_slice(msg.frame());
                        self.push(Expect::query(Owner::Client));
                    }
                }
                fe::FUNCTION_CALL => {
                    self.out.extend_from_slice(msg.frame());
                    self.push(Expect::query(Owner::Client));
                }
                // Copy input sent ahead of the origin's CopyInResponse (pgx sends its rows right
                // behind the COPY): it waits until the origin says whether a COPY started. A
                // Flush makes it say so in an unfinished extended sequence; Postgres ignores a
                // Flush while copying in. Where no COPY can start, Postgres ignores copy input.
                t if fe::is_copy_input(t) && self.queue.may_start_copy() => {
                    if *self.needs_sync {
                        self.out.extend_from_slice(&build::flush());
                    }
                    notes.wait_at = Some(i);
                    return Ok(notes);
                }
                _ => {}
            }
            if matches!(tag, fe::PARSE | fe::BIND | fe::DESCRIBE | fe::EXECUTE | fe::CLOSE) {
                *self.needs_sync = true;
            }
        }
        Ok(notes)
    }

    fn push(&mut self, expect: Expect) {
        if let Some(undo) = self.queue.push(expect) {
            apply_undo(&undo, self.statements, self.server);
        }
    }

    /// Answers an error in order and skips the rest of the batch until Sync. The origin fails
    /// at the same point, so what Postgres would roll back is rolled back.
    fn fail(&mut self, code: SqlState, message: &str) {
        self.push(Expect::Synthetic { message: build::error(Severity::Error, code, message), undo: None });
        self.abort_origin();
        *self.skip_until_sync = true;
        *self.needs_sync = true;
    }

    /// Makes the origin raise an error here, unseen by the client, which has pgwarp's own: an
    /// error aborts the transaction block the client is in (ReadyForQuery `E`, and COMMIT rolls
    /// back), or the implicit transaction of its pipeline, exactly as on a direct connection.
    /// A Describe is used because it fails in every state (also in an aborted transaction) and
    /// touches nothing else.
    fn abort_origin(&mut self) {
        build::frame_into(self.out, fe::DESCRIBE, |b| {
            b.put_u8(b'S');
            build::put_cstr(b, ABSENT_STATEMENT);
        });
        self.push(Expect::Abort);
    }

    /// Whether a Parse or PREPARE of `name` must wait (see `PlanNotes::wait_at`). In the same
    /// segment as the earlier one it need not: whatever skips that one skips it too, and if
    /// that one runs, this one is a duplicate.
    fn must_wait(&self, name: &str) -> bool {
        self.statements.contains(name) && self.queue.pending_statement(name) == Some(true)
    }

    /// False: not planned, it must wait.
    fn parse(&mut self, msg: &Message, notes: &mut PlanNotes) -> Result<bool, DecodeError> {
        // The unnamed statement parsed again byte for byte, as drivers that do not prepare
        // send it for every query: nothing to decode.
        if let Some(stmt) = self.statements.get("").filter(|s| s.is_unnamed_parse(msg.frame())) {
            let stmt = stmt.clone();
            self.parse_unnamed(msg, stmt, notes);
            return Ok(true);
        }
        let p = Parse::decode(msg.body())?;
        if p.name.is_empty() {
            let stmt = match self.statements.get("") {
                Some(s) if s.same_content(p.sql, &p.param_types) => s.clone(),
                _ => Arc::new(Statement::new(false, p.sql, &p.param_types)),
            };
            self.parse_unnamed(msg, stmt, notes);
            return Ok(true);
        }
        if self.statements.contains(p.name) {
            if self.queue.pending_statement(p.name) == Some(true) {
                return Ok(false);
            }
            self.fail(
                SqlState::DUPLICATE_PREPARED_STATEMENT,
                &format!("prepared statement \"{}\" already exists", p.name),
            );
            return Ok(true);
        }
        let stmt = Arc::new(Statement::new(true, p.sql, &p.param_types));
        note_hints(notes, stmt.hints);
        if let Err(e) = self.statements.insert(p.name, stmt.clone()) {
            self.fail(SqlState::OUT_OF_MEMORY, &e.to_string());
            return Ok(true);
        }
        let client_statement = Some((p.name.to_owned(), stmt.id.clone()));
        if self.server.has(&stmt.id) {
            let undo = Undo { client_statement, ..Undo::default() };
            self.push(Expect::Synthetic { message: build::parse_complete(), undo: Some(undo) });
        } else {
            self.prepare_on_server(&stmt, Owner::Client, client_statement);
        }
        Ok(true)
    }

    /// Sends the client's Parse of the unnamed statement, which is `stmt`.
    fn parse_unnamed(&mut self, msg: &Message, stmt: Arc<Statement>, notes: &mut PlanNotes) {
        note_hints(notes, stmt.hints);
        if let Err(e) = self.statements.insert("", stmt.clone()) {
            return self.fail(SqlState::OUT_OF_MEMORY, &e.to_string());
        }
        self.out.extend_from_slice(msg.frame());
        self.server.unnamed = Some(stmt.id.clone());
        let undo = Undo { client_statement: Some((String::new(), stmt.id.clone())), unnamed: true, ..Undo::default() };
        self.push(Expect::ParseComplete { owner: Owner::Client, undo: Some(undo) });
    }

    /// Creates a named statement on the connection (its saved Parse, or its SQL PREPARE),
    /// closing whatever the LRU evicts for it.
    fn prepare_on_server(&mut self, stmt: &Statement, owner: Owner, client_statement: Option<(String, Arc<str>)>) {
        if let Some(evicted) = self.server.add(stmt.id.clone()) {
            build::close_statement_into(self.out, &evicted);
            self.push(Expect::CloseComplete { owner: Owner::Internal });
        }
        let undo = Some(Undo { client_statement, server_statement: Some(stmt.id.clone()), unnamed: false });
        match &stmt.replay {
            Replay::Parse(parse) => {
                self.out.extend_from_slice(parse);
                self.push(Expect::ParseComplete { owner, undo });
            }
            Replay::Prepare(sql) => {
                // A simple query, even mid-batch, destroys the unnamed statement: a later Bind
                // of it replays its Parse.
                self.server.unnamed = None;
                self.out.extend_from_slice(&build::query(sql));
                self.push(Expect::Query { owner, undo, executes: None });
            }
        }
    }

    /// SQL-level PREPARE / EXECUTE / DEALLOCATE, kept per client like protocol statements.
    fn prepared_command(&mut self, command: PreparedCommand<'_>) {
        match command {
            PreparedCommand::Prepare { name, types, body } => {
                if self.statements.contains(&name) {
                    let message = format!("prepared statement \"{name}\" already exists");
                    return self.refuse_query(SqlState::DUPLICATE_PREPARED_STATEMENT, &message);
                }
                let stmt = Arc::new(Statement::sql_prepared(types, body));
                if let Err(e) = self.statements.insert(&name, stmt.clone()) {
                    return self.refuse_query(SqlState::OUT_OF_MEMORY, &e.to_string());
                }
                if self.server.has(&stmt.id) {
                    self.answer_query(build::command_complete("PREPARE"));
                } else {
                    self.prepare_on_server(&stmt, Owner::Client, Some((name, stmt.id.clone())));
                }
            }
            PreparedCommand::Execute { name, rest } => {
                let Some(stmt) = self.statements.get(&name).cloned() else {
                    let message = format!("prepared statement \"{name}\" does not exist");
                    return self.refuse_query(SqlState::UNDEFINED_PREPARED_STATEMENT, &message);
                };
                if !self.server.has(&stmt.id) {
                    self.prepare_on_server(&stmt, Owner::Hidden, None);
                }
                let space = if rest.starts_with('(') || rest.is_empty() { "" } else { " " };
                self.out.extend_from_slice(&build::query(&format!("EXECUTE {}{space}{rest}", stmt.id)));
                self.push(Expect::Query { owner: Owner::Client, undo: None, executes: Some(stmt.id.clone()) });
            }
            PreparedCommand::Deallocate { name: Some(name) } => {
                if self.statements.remove(&name).is_some() {
                    self.answer_query(build::command_complete("DEALLOCATE"));
                } else {
                    let message = format!("prepared statement \"{name}\" does not exist");
                    self.refuse_query(SqlState::UNDEFINED_PREPARED_STATEMENT, &message);
                }
            }
            PreparedCommand::Deallocate { name: None } => {
                // Only this client's names go: the origin's statements may serve others.
                self.statements.clear();
                self.answer_query(build::command_complete("DEALLOCATE ALL"));
            }
        }
    }

    /// Whether a SQL-level command goes to the origin as it is: it names a statement pgwarp
    /// does not know, on a connection pinned to this client, which may hold it under that name
    /// (a PREPARE inside a larger query made it).
    fn passes_through(&self, command: &PreparedCommand<'_>) -> bool {
        match command {
            PreparedCommand::Execute { name, .. } | PreparedCommand::Deallocate { name: Some(name) } => {
                self.pinned && !self.statements.contains(name)
            }
            _ => false,
        }
    }

    /// Answers a simple query with `message`; a Sync to the origin supplies the ReadyForQuery,
    /// so it carries the real transaction status.
    fn answer_query(&mut self, message: Bytes) {
        self.push(Expect::Synthetic { message, undo: None });
        self.out.extend_from_slice(&build::sync());
        self.push(Expect::Sync { owner: Owner::Client });
    }

    /// Answers a simple query with an error, which the origin also raises (see `abort_origin`).
    fn refuse_query(&mut self, code: SqlState, message: &str) {
        self.push(Expect::Synthetic { message: build::error(Severity::Error, code, message), undo: None });
        self.abort_origin();
        self.out.extend_from_slice(&build::sync());
        self.push(Expect::Sync { owner: Owner::Client });
    }

    /// Makes sure the connection has the statement, replaying its Parse if not. Returns None
    /// (after answering the error) when the client never prepared it.
    fn resolve(&mut self, name: &str) -> Option<Arc<Statement>> {
        let Some(stmt) = self.statements.get(name).cloned() else {
            let message = if name.is_empty() {
                "unnamed prepared statement does not exist".to_owned()
            } else {
                format!("prepared statement \"{name}\" does not exist")
            };
            self.fail(SqlState::UNDEFINED_PREPARED_STATEMENT, &message);
            return None;
        };
        if name.is_empty() {
            if self.server.unnamed.as_ref() != Some(&stmt.id) {
                if let Replay::Parse(parse) = &stmt.replay {
                    self.out.extend_from_slice(parse);
                }
                self.server.unnamed = Some(stmt.id.clone());
                let undo = Undo { unnamed: true, ..Undo::default() };
                self.push(Expect::ParseComplete { owner: Owner::Hidden, undo: Some(undo) });
            }
        } else if !self.server.has(&stmt.id) {
            self.prepare_on_server(&stmt, Owner::Hidden, None);
        }
        Some(stmt)
    }

    fn bind(&mut self, msg: &Message) -> Result<(), DecodeError> {
        let bind = Bind::decode(msg.body())?;
        let Some(stmt) = self.resolve(bind.statement) else {
            return Ok(());
        };
        let statement = if bind.statement.is_empty() {
            self.out.extend_from_slice(msg.frame());
            None
        } else {
            bind.encode_renamed(self.out, &stmt.id);
            Some(stmt.id.clone())
        };
        self.push(Expect::BindComplete { statement });
        Ok(())
    }

    fn describe(&mut self, msg: &Message) -> Result<(), DecodeError> {
        let d = Named::decode(fe::DESCRIBE, msg.body())?;
        match d.target {
            Target::Portal => {
                self.out.extend_from_slice(msg.frame());
                self.push(Expect::DescribePortal);
            }
            Target::Statement => {
                let Some(stmt) = self.resolve(d.name) else {
                    return Ok(());
                };
                if d.name.is_empty() {
                    self.out.extend_from_slice(msg.frame());
                } else {
                    d.encode_renamed(self.out, fe::DESCRIBE, &stmt.id);
                }
                self.push(Expect::DescribeStatement);
            }
        }
        Ok(())
    }

    fn close(&mut self, msg: &Message) -> Result<(), DecodeError> {
        let c = Named::decode(fe::CLOSE, msg.body())?;
        match c.target {
            Target::Portal => {
                self.out.extend_from_slice(msg.frame());
                self.push(Expect::CloseComplete { owner: Owner::Client });
            }
            Target::Statement => {
                // The origin's copy may serve other clients; only this client's name goes.
                self.statements.remove(c.name);
                self.push(Expect::Synthetic { message: build::close_complete(), undo: None });
            }
        }
        Ok(())
    }
}

fn note_sql(notes: &mut PlanNotes, sql: &str) {
    note_hints(notes, inspect::session_hints(sql));
}

fn note_hints(notes: &mut PlanNotes, hints: inspect::SessionHints) {
    notes.session_feature = notes.session_feature.or(hints.feature);
    notes.may_change_settings |= hints.may_change_settings;
}

/// Forgets what a message that never took effect would have created.
pub fn apply_undo(undo: &Undo, statements: &mut StatementMap, server: &mut ServerStatements) {
    if let Some((name, id)) = &undo.client_statement {
        statements.remove_if(name, id);
    }
    if let Some(id) = &undo.server_statement {
        server.forget(id);
    }
    if undo.unnamed {
        server.unnamed = None;
    }
}

#[cfg(test)]
mod tests;
