//! Statement bookkeeping flows, checked message by message without a database.

use bytes::{BufMut, BytesMut};

use super::*;
use crate::protocol::build::{frame, put_cstr};
use crate::protocol::MessageReader;

fn parse(name: &str, sql: &str) -> Message {
    let mut b = BytesMut::new();
    build::parse_into(&mut b, name, sql, &[]);
    Message::from_frame(b.freeze())
}

fn bind(stmt: &str) -> Message {
    Message::from_frame(frame(b'B', |b| {
        put_cstr(b, "");
        put_cstr(b, stmt);
        b.put_i16(0);
        b.put_i16(0);
        b.put_i16(0);
    }))
}

fn describe_stmt(name: &str) -> Message {
    Message::from_frame(frame(b'D', |b| {
        b.put_u8(b'S');
        put_cstr(b, name);
    }))
}

fn close_stmt(name: &str) -> Message {
    Message::from_frame(frame(b'C', |b| {
        b.put_u8(b'S');
        put_cstr(b, name);
    }))
}

fn execute() -> Message {
    Message::from_frame(frame(b'E', |b| {
        put_cstr(b, "");
        b.put_i32(0);
    }))
}

fn sync() -> Message {
    Message::from_frame(build::sync())
}

fn query(sql: &str) -> Message {
    Message::from_frame(build::query(sql))
}

struct World {
    statements: StatementMap,
    server: ServerStatements,
    queue: ResponseQueue,
    skip: bool,
    needs_sync: bool,
}

impl World {
    fn new(lru: usize) -> Self {
        World {
            statements: StatementMap::new(1 << 20),
            server: ServerStatements::new(lru),
            queue: ResponseQueue::new(),
            skip: false,
            needs_sync: false,
        }
    }

    /// Plans a batch; returns what went to the origin as (tag, first name field) pairs and
    /// what pgwarp answered itself.
    /// Plans a batch; returns what went to the origin (raw) and the planner's notes.
    fn plan(&mut self, batch: &[Message]) -> (BytesMut, PlanNotes) {
        let mut out = BytesMut::new();
        let notes = Planner {
            statements: &mut self.statements,
            server: &mut self.server,
            queue: &mut self.queue,
            out: &mut out,
            skip_until_sync: &mut self.skip,
            needs_sync: &mut self.needs_sync,
            aborted: false,
            pinned: false,
        }
        .plan(batch)
        .unwrap();
        (out, notes)
    }

    fn run(&mut self, batch: &[Message]) -> (Vec<(char, String)>, Vec<char>) {
        let (out, _) = self.plan(batch);
        let mut synthetic = BytesMut::new();
        self.queue.drain_synthetic(&mut synthetic);
        (decode_all(out), decode_all(synthetic).into_iter().map(|(t, _)| t).collect())
    }

    /// Feeds the origin's answers to the queue; returns the tags forwarded to the client,
    /// synthetic answers included in their place.
    fn answer(&mut self, tags: &[u8]) -> Vec<char> {
        let mut client = Vec::new();
        for &t in tags {
            let body: &[u8] = if t == b'Z' { b"I" } else { b"" };
            let d = self.queue.on_message(t, body).unwrap();
            for u in &d.undone {
                apply_undo(u, &mut self.statements, &mut self.server);
            }
            if d.forward {
                client.push(t as char);
            }
            let mut syn = BytesMut::new();
            self.queue.drain_synthetic(&mut syn);
            client.extend(decode_all(syn).into_iter().map(|(t, _)| t));
        }
        client
    }
}

fn decode_all(bytes: BytesMut) -> Vec<(char, String)> {
    let mut r = MessageReader::with_buffered(1 << 20, bytes);
    let mut out = Vec::new();
    while let Some(m) = r.try_next().unwrap() {
        let name = match m.tag() {
            b'P' => Parse::decode(m.body()).unwrap().name.to_owned(),
            b'B' => Bind::decode(m.body()).unwrap().statement.to_owned(),
            b'D' | b'C' if m.body().first() == Some(&b'S') => Named::decode(m.tag(), m.body()).unwrap().name.to_owned(),
            _ => String::new(),
        };
        out.push((m.tag() as char, name));
    }
    out
}

#[test]
fn named_parse_is_sent_under_content_name() {
    let mut w = World::new(10);
    let (sent, syn) = w.run(&[parse("s1", "select 1"), sync()]);
    let id = w.statements.get("s1").unwrap().id.to_string();
    assert_eq!(sent, vec![('P', id.clone()), ('S', String::new())]);
    assert!(syn.is_empty());
    assert_eq!(w.answer(b"1Z"), vec!['1', 'Z']);
    assert!(w.server.has(&id.into()));
}

#[test]
fn reuse_on_connection_that_has_it_sends_no_parse() {
    let mut w = World::new(10);
    w.run(&[parse("s1", "select 1"), sync()]);
    w.answer(b"1Z");
    let (sent, _) = w.run(&[bind("s1"), execute(), sync()]);
    assert_eq!(sent.iter().map(|s| s.0).collect::<String>(), "BES");
    assert!(sent[0].1.starts_with("pgwarp_"));
}

#[test]
fn reuse_after_pool_rotation_replays_parse_and_hides_its_answer() {
    let mut w = World::new(10);
    w.run(&[parse("s1", "select 1"), sync()]);
    w.answer(b"1Z");
    // Another origin connection: it has never seen the statement.
    w.server = ServerStatements::new(10);
    let (sent, _) = w.run(&[bind("s1"), execute(), sync()]);
    assert_eq!(sent.iter().map(|s| s.0).collect::<String>(), "PBES");
    assert_eq!(w.answer(b"12DCZ"), vec!['2', 'D', 'C', 'Z']);
}

#[test]
fn parse_of_statement_the_connection_has_is_answered_locally() {
    let mut w = World::new(10);
    w.run(&[parse("a", "select 1"), sync()]);
    w.answer(b"1Z");
    // Same SQL under another client name (or by another client): no second Parse.
    let (sent, syn) = w.run(&[parse("b", "select 1"), bind("b"), execute(), sync()]);
    assert_eq!(sent.iter().map(|s| s.0).collect::<String>(), "BES");
    assert_eq!(syn, vec!['1']);
}

#[test]
fn two_clients_same_name_different_sql_do_not_collide() {
    let mut a = World::new(10);
    let mut b = World::new(10);
    a.run(&[parse("s0", "select 1"), sync()]);
    b.run(&[parse("s0", "select 2"), sync()]);
    assert_ne!(a.statements.get("s0").unwrap().id, b.statements.get("s0").unwrap().id);
}

#[test]
fn unknown_statement_is_an_error_in_order_and_skips_to_sync() {
    let mut w = World::new(10);
    let (sent, syn) = w.run(&[bind("nope"), execute(), sync()]);
    // The origin fails there too (so a transaction aborts as it would), unseen by the client.
    assert_eq!(sent, vec![('D', ABSENT_STATEMENT.to_owned()), ('S', String::new())]);
    assert_eq!(syn, vec!['E']);
    assert!(!w.skip);
    assert_eq!(w.answer(b"EZ"), vec!['Z']);
}

#[test]
fn duplicate_parse_is_refused_like_postgres() {
    let mut w = World::new(10);
    w.run(&[parse("s1", "select 1"), sync()]);
    w.answer(b"1Z");
    let (sent, syn) = w.run(&[parse("s1", "select 2"), bind("s1"), sync()]);
    assert_eq!(sent.iter().map(|s| s.0).collect::<String>(), "DS");
    assert_eq!(syn, vec!['E']);
    assert_eq!(w.answer(b"EZ"), vec!['Z']);
    assert_eq!(&*w.statements.get("s1").unwrap().sql, "select 1");
}

#[test]
fn failed_parse_is_not_remembered() {
    let mut w = World::new(10);
    w.run(&[parse("bad", "selec 1"), sync()]);
    assert_eq!(w.answer(b"EZ"), vec!['E', 'Z']);
    assert!(!w.statements.contains("bad"));
    assert!(w.server.is_empty());
}

#[test]
fn statements_skipped_after_an_error_are_not_remembered() {
    let mut w = World::new(10);
    w.run(&[parse("s1", "select 1"), sync()]);
    w.answer(b"1Z");
    w.run(&[bind("s1"), execute(), parse("s2", "select 2"), sync()]);
    // Execute fails: Postgres skips the Parse of s2.
    assert_eq!(w.answer(b"2EZ"), vec!['2', 'E', 'Z']);
    assert!(!w.statements.contains("s2"));
    assert_eq!(w.server.len(), 1);
}

#[test]
fn close_forgets_the_name_but_keeps_the_shared_server_copy() {
    let mut w = World::new(10);
    w.run(&[parse("s1", "select 1"), sync()]);
    w.answer(b"1Z");
    let (sent, syn) = w.run(&[close_stmt("s1"), sync()]);
    assert_eq!(sent, vec![('S', String::new())]);
    assert_eq!(syn, vec!['3']);
    assert!(!w.statements.contains("s1"));
    assert_eq!(w.server.len(), 1);
}

#[test]
fn lru_eviction_closes_the_evicted_statement_on_the_connection() {
    let mut w = World::new(1);
    w.run(&[parse("a", "select 1"), sync()]);
    w.answer(b"1Z");
    let old = w.statements.get("a").unwrap().id.to_string();
    let (sent, _) = w.run(&[parse("b", "select 2"), sync()]);
    assert_eq!(sent[0], ('C', old));
    assert_eq!(sent[1].0, 'P');
    // The hidden CloseComplete is not forwarded.
    assert_eq!(w.answer(b"31Z"), vec!['1', 'Z']);
}

#[test]
fn unnamed_statement_survives_to_a_later_batch_on_another_connection() {
    let mut w = World::new(10);
    w.run(&[parse("", "select $1"), describe_stmt(""), sync()]);
    w.answer(b"1tTZ");
    w.server = ServerStatements::new(10);
    let (sent, _) = w.run(&[bind(""), execute(), sync()]);
    assert_eq!(sent.iter().map(|s| format!("{}{}", s.0, s.1)).collect::<Vec<_>>(), vec!["P", "B", "E", "S"]);
    assert_eq!(w.answer(b"12DCZ"), vec!['2', 'D', 'C', 'Z']);
    // Same connection again: no replay.
    let (sent, _) = w.run(&[bind(""), execute(), sync()]);
    assert_eq!(sent.iter().map(|s| s.0).collect::<String>(), "BES");
}

#[test]
fn simple_query_destroys_the_unnamed_statement() {
    let mut w = World::new(10);
    w.run(&[parse("", "select 1"), sync()]);
    w.answer(b"1Z");
    w.run(&[query("select 2")]);
    w.answer(b"TDCZ");
    let (_, syn) = w.run(&[bind(""), sync()]);
    assert_eq!(syn, vec!['E']);
}

#[test]
fn stale_statements_are_closed_before_the_next_batch() {
    let mut w = World::new(10);
    w.run(&[parse("s1", "select 1"), sync()]);
    w.answer(b"1Z");
    let id = w.statements.get("s1").unwrap().id.clone();
    w.server.invalidate(&id);
    let (sent, _) = w.run(&[bind("s1"), sync()]);
    assert_eq!(sent.iter().map(|s| s.0).collect::<String>(), "CPBS");
    assert_eq!(w.answer(b"312Z"), vec!['2', 'Z']);
}

#[test]
fn notes_session_features() {
    let mut w = World::new(10);
    let (_, notes) = w.plan(&[query("LISTEN x")]);
    assert_eq!(notes.session_feature, Some("LISTEN"));
}

#[test]
fn sql_prepare_is_sent_under_content_name_and_execute_is_rewritten() {
    let mut w = World::new(10);
    let (sent, _) = w.run(&[query("PREPARE q (int) AS SELECT $1")]);
    let id = w.statements.get("q").unwrap().id.to_string();
    assert_eq!(sent, vec![('Q', String::new())]);
    assert_eq!(w.answer(b"CZ"), vec!['C', 'Z']);
    let (out, _) = w.plan(&[query("EXECUTE q(5)")]);
    let m = MessageReader::with_buffered(1 << 20, out).try_next().unwrap().unwrap();
    assert_eq!(crate::protocol::frontend::query_text(m.body()).unwrap(), format!("EXECUTE {id}(5)"));
}

#[test]
fn sql_execute_on_a_new_connection_replays_prepare_hidden() {
    let mut w = World::new(10);
    w.run(&[query("PREPARE q AS SELECT 1")]);
    w.answer(b"CZ");
    w.server = ServerStatements::new(10);
    let (sent, _) = w.run(&[query("EXECUTE q")]);
    assert_eq!(sent.len(), 2, "PREPARE replayed, then EXECUTE");
    // The replayed PREPARE's CommandComplete and ReadyForQuery are hidden.
    assert_eq!(w.answer(b"CZTDCZ"), vec!['T', 'D', 'C', 'Z']);
}

#[test]
fn sql_prepare_the_connection_already_has_is_answered_locally() {
    let mut w = World::new(10);
    w.run(&[query("PREPARE a AS SELECT 1")]);
    w.answer(b"CZ");
    let (sent, syn) = w.run(&[query("PREPARE b AS SELECT 1")]);
    assert_eq!(sent, vec![('S', String::new())], "a Sync fetches the real transaction status");
    assert_eq!(syn, vec!['C']);
    assert_eq!(w.answer(b"Z"), vec!['Z']);
}

#[test]
fn failed_sql_prepare_is_not_remembered() {
    let mut w = World::new(10);
    w.run(&[query("PREPARE bad AS SELEC 1")]);
    assert_eq!(w.answer(b"EZ"), vec!['E', 'Z']);
    assert!(!w.statements.contains("bad"));
    assert!(w.server.is_empty());
}

#[test]
fn deallocate_is_answered_by_pgwarp() {
    let mut w = World::new(10);
    w.run(&[parse("s1", "select 1"), sync()]);
    w.answer(b"1Z");
    let (_, syn) = w.run(&[query("DEALLOCATE s1")]);
    assert_eq!(syn, vec!['C']);
    w.answer(b"Z");
    assert!(!w.statements.contains("s1"));
    let (sent, syn) = w.run(&[query("DEALLOCATE s1")]);
    assert_eq!(syn, vec!['E']);
    assert_eq!(sent, vec![('D', ABSENT_STATEMENT.to_owned()), ('S', String::new())]);
    assert_eq!(w.answer(b"EZ"), vec!['Z'], "one error for the client");
}

#[test]
fn an_error_before_pgwarps_own_leaves_only_the_first() {
    let mut w = World::new(10);
    w.run(&[parse("", "select 1/0"), bind(""), execute(), bind("nope"), sync()]);
    // Execute fails first: Postgres skips the rest, so pgwarp's error is never sent.
    assert_eq!(w.answer(b"12EZ"), vec!['1', '2', 'E', 'Z']);
    assert!(w.queue.is_empty());
}

#[test]
fn query_while_the_origin_skips_to_sync_is_dropped_and_keeps_the_sequence_open() {
    let mut w = World::new(10);
    w.run(&[parse("", "select 1/0"), bind(""), execute(), Message::from_frame(frame(b'H', |_| {}))]);
    assert_eq!(w.answer(b"1E"), vec!['1', 'E']);
    let (sent, syn) = w.run(&[query("select 2")]);
    assert!(sent.is_empty() && syn.is_empty(), "Postgres ignores it, so pgwarp sends nothing");
    assert!(w.needs_sync, "only a Sync ends the sequence");
    let (sent, _) = w.run(&[sync()]);
    assert_eq!(sent, vec![('S', String::new())]);
    assert_eq!(w.answer(b"Z"), vec!['Z']);
}

#[test]
fn replayed_sql_prepare_mid_batch_destroys_the_unnamed_statement() {
    let mut w = World::new(10);
    w.run(&[query("PREPARE q AS SELECT 1")]);
    w.answer(b"CZ");
    w.server = ServerStatements::new(10);
    w.run(&[parse("", "select 2"), sync()]);
    w.answer(b"1Z");
    // Binding q replays its PREPARE as a simple query, which drops the origin's unnamed
    // statement: the Bind of "" after it needs the Parse again.
    let (sent, _) = w.run(&[bind("q"), execute(), bind(""), execute(), sync()]);
    assert_eq!(sent.iter().map(|s| s.0).collect::<String>(), "QBEPBES");
}

#[test]
fn skipped_replay_of_sql_prepare_is_forgotten() {
    let mut w = World::new(10);
    w.run(&[query("PREPARE q AS SELECT 1")]);
    w.answer(b"CZ");
    let id = w.statements.get("q").unwrap().id.clone();
    w.server = ServerStatements::new(10);
    w.run(&[parse("", "select 1/0"), bind(""), execute(), bind("q"), execute(), sync()]);
    assert!(w.server.has(&id));
    assert_eq!(w.answer(b"12EZ"), vec!['1', '2', 'E', 'Z']);
    assert!(!w.server.has(&id), "Postgres skipped the PREPARE");
}

#[test]
fn reparse_of_a_name_pending_before_a_sync_waits_for_its_answer() {
    let mut w = World::new(10);
    let batch = [
        parse("", "select 1/0"),
        bind(""),
        execute(),
        parse("s1", "select 11"),
        sync(),
        parse("s1", "select 11"),
        bind("s1"),
        execute(),
        sync(),
    ];
    let (_, notes) = w.plan(&batch);
    assert_eq!(notes.wait_at, Some(5), "the first s1 may still be skipped");
    // It is: the error before it makes Postgres skip it, so the second one is a fresh Parse.
    assert_eq!(w.answer(b"12EZ"), vec!['1', '2', 'E', 'Z']);
    assert!(!w.statements.contains("s1"));
    let (sent, syn) = w.run(&batch[5..]);
    assert_eq!(sent.iter().map(|s| s.0).collect::<String>(), "PBES");
    assert!(syn.is_empty());
}

#[test]
fn reparse_in_the_same_segment_is_a_duplicate_at_once() {
    let mut w = World::new(10);
    let (_, notes) = w.plan(&[parse("s1", "select 1"), parse("s1", "select 1"), sync()]);
    assert_eq!(notes.wait_at, None);
    assert_eq!(w.answer(b"1EZ"), vec!['1', 'E', 'Z'], "pgwarp's error in place, the origin's hidden");
}

#[test]
fn a_repeated_unnamed_parse_reuses_the_saved_statement() {
    let mut w = World::new(8);
    w.run(&[parse("", "select 1"), bind(""), execute(), sync()]);
    let first = w.statements.get("").cloned().unwrap();
    w.answer(b"12DCZ");
    let (sent, synthetic) = w.run(&[parse("", "select 1"), bind(""), execute(), sync()]);
    assert_eq!(sent, vec![('P', String::new()), ('B', String::new()), ('E', String::new()), ('S', String::new())]);
    assert!(synthetic.is_empty());
    assert!(Arc::ptr_eq(&first, w.statements.get("").unwrap()), "the same statement, not a copy");
    assert_eq!(w.server.unnamed.as_ref(), Some(&first.id));

    // Other text, or other parameter types, is a new statement.
    w.answer(b"12DCZ");
    w.run(&[parse("", "select 2"), sync()]);
    assert_eq!(&*w.statements.get("").unwrap().sql, "select 2");
    w.answer(b"1Z");
    let mut typed = BytesMut::new();
    build::parse_into(&mut typed, "", "select 2", &[23]);
    w.run(&[Message::from_frame(typed.freeze()), sync()]);
    assert_eq!(&*w.statements.get("").unwrap().param_types, &[23]);
}

fn copy_data() -> Message {
    Message::from_frame(frame(b'd', |b| b.put_slice(b"1\n")))
}

#[test]
fn copy_input_waits_while_a_copy_may_start_and_is_ignored_otherwise() {
    let mut w = World::new(10);
    // Nothing sent could start a COPY: Postgres ignores copy input, and so does the planner.
    let (out, notes) = w.plan(&[copy_data()]);
    assert!(out.is_empty() && notes.wait_at.is_none());
    // Behind an unsynced Execute it waits, and a Flush makes the origin tell whether a COPY began.
    let (out, notes) = w.plan(&[parse("", "COPY t FROM STDIN"), bind(""), execute(), copy_data(), sync()]);
    assert_eq!(notes.wait_at, Some(3));
    let tags: Vec<char> = decode_all(out).into_iter().map(|(t, _)| t).collect();
    assert_eq!(tags, vec!['P', 'B', 'E', 'H']);
    // Behind a simple query no Flush is needed: the query's end flushes its answer.
    let mut w = World::new(10);
    let (out, notes) = w.plan(&[query("COPY t FROM STDIN"), copy_data()]);
    assert_eq!(notes.wait_at, Some(1));
    assert_eq!(decode_all(out).into_iter().map(|(t, _)| t).collect::<Vec<_>>(), vec!['Q']);
}
