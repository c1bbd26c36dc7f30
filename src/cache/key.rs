//! The cache key of a batch: who asks (database, user, the settings that change result bytes)
//! and what exactly it asks (query text, parameter types, formats and values, Describe targets,
//! row limits), never a client's statement or portal name. Pure.

use crate::origin::settings::Settings;
use crate::protocol::frontend::{self as fe, Bind, Execute, Named, Parse, Target};
use crate::protocol::Message;
use crate::session::statements::StatementMap;

use super::classify::Reason;

/// Settings that cannot change what a query returns: every other setting is part of the key.
/// Keying on all the rest is the safe side: besides the obvious ones (DateStyle, TimeZone,
/// search_path, role, extra_float_digits, bytea_output, ...), custom settings read by
/// `current_setting()` in row-level security policies and views (`app.tenant`), and settings
/// such as transform_null_equals or default_text_search_config, change rows, not just bytes.
const NEVER_CHANGE_RESULTS: &[&str] = &[
    "application_name",
    "client_min_messages",
    "idle_in_transaction_session_timeout",
    "idle_session_timeout",
    "lock_timeout",
    "log_duration",
    "log_min_duration_statement",
    "log_min_error_statement",
    "log_min_messages",
    "log_parameter_max_length",
    "log_parameter_max_length_on_error",
    "log_statement",
    "log_statement_sample_rate",
    "log_transaction_sample_rate",
    // Unique to each capture of a session's settings: see settings::CAPTURE_MARK.
    "pgwarp.capture",
    "statement_timeout",
    "tcp_keepalives_count",
    "tcp_keepalives_idle",
    "tcp_keepalives_interval",
    "tcp_user_timeout",
    "transaction_timeout",
];

/// Whether a setting is part of the key.
fn changes_results(name: &str) -> bool {
    !NEVER_CHANGE_RESULTS.iter().any(|n| n.eq_ignore_ascii_case(name))
}

fn put(key: &mut impl KeyOut, part: &[u8]) {
    key.bytes(&(part.len() as u32).to_be_bytes());
    key.bytes(part);
}

/// The part of every key that says who asks: database, user and the settings that may change
/// results. It changes only when the client's settings do, so sessions keep it.
pub fn prefix(database: &str, user: &str, settings: &Settings) -> Vec<u8> {
    let mut key = Vec::with_capacity(128);
    put(&mut key, database.as_bytes());
    put(&mut key, user.as_bytes());
    for (k, v) in settings {
        if changes_results(k) {
            put(&mut key, k.to_ascii_lowercase().as_bytes());
            put(&mut key, v.as_bytes());
        }
    }
    key
}

/// Builds the key into `key` (cleared first; the caller keeps the buffer), or says why the
/// batch's shape cannot be cached.
pub fn build(key: &mut Vec<u8>, prefix: &[u8], batch: &[Message], statements: &StatementMap) -> Result<(), Reason> {
    key.clear();
    key.extend_from_slice(prefix);
    walk(batch, statements, key, |_| {})
}

/// The SQL texts a batch [`build`] accepted runs, in order: what a miss classifies.
pub fn texts<'a>(batch: &'a [Message], statements: &'a StatementMap) -> Result<Vec<&'a str>, Reason> {
    let mut sql = Vec::new();
    walk(batch, statements, &mut Discard, |text| sql.push(text))?;
    Ok(sql)
}

/// Where [`walk`] writes key bytes: a buffer, or nowhere when only the texts are wanted.
trait KeyOut {
    fn byte(&mut self, b: u8);
    fn bytes(&mut self, b: &[u8]);
}

impl KeyOut for Vec<u8> {
    fn byte(&mut self, b: u8) {
        self.push(b);
    }
    fn bytes(&mut self, b: &[u8]) {
        self.extend_from_slice(b);
    }
}

struct Discard;

impl KeyOut for Discard {
    fn byte(&mut self, _: u8) {}
    fn bytes(&mut self, _: &[u8]) {}
}

/// Whether a text value may mean a different time each time it is read: it has one of the
/// date/time input words 'now', 'today', 'tomorrow' or 'yesterday' as a whole word anywhere
/// ('now', 'today 12:00', '00:00 tomorrow', '"now"'), which Postgres turns into a time when the
/// value is read. Bound to a timestamp parameter, or as text cast to one, such a value makes an
/// answer that must not be reused. Binary values are checked too (text sent in binary is the
/// same bytes); ordinary text that happens to hold one of the words only costs a miss.
pub fn reads_the_clock(value: &[u8]) -> bool {
    const WORDS: [&[u8]; 4] = [b"now", b"today", b"tomorrow", b"yesterday"];
    let mut i = 0;
    while i < value.len() {
        if !value[i].is_ascii_alphanumeric() {
            i += 1;
            continue;
        }
        let len = value[i..].iter().take_while(|c| c.is_ascii_alphanumeric()).count();
        let word = &value[i..i + len];
        if WORDS.iter().any(|w| word.eq_ignore_ascii_case(w)) {
            return true;
        }
        i += len;
    }
    false
}

/// The most messages a batch the cache answers may have. Reads come a few messages at a time;
/// a longer pipeline goes to the origin, and keying it (a look through the batch's own Parses
/// at every Bind) stays cheap.
const MAX_MESSAGES: usize = 64;

/// Statements parsed earlier in the batch being keyed: name, text and parameter types. A batch
/// parses few statements, so a list beats a map.
type Local<'a> = Vec<(&'a str, &'a str, Vec<u32>)>;

fn walk<'a>(
    batch: &'a [Message],
    statements: &'a StatementMap,
    key: &mut impl KeyOut,
    mut on_sql: impl FnMut(&'a str),
) -> Result<(), Reason> {
    if batch.len() > MAX_MESSAGES {
        return Err(Reason::Protocol);
    }
    let mut local: Local<'a> = Vec::new();
    let mut reads = false;
    let last = batch.len().saturating_sub(1);
    for (i, msg) in batch.iter().enumerate() {
        let tag = msg.tag();
        key.byte(tag);
        match tag {
            fe::QUERY if batch.len() == 1 => {
                let text = fe::query_text(msg.body()).map_err(|_| Reason::Protocol)?;
                put(key, text.as_bytes());
                on_sql(text);
                reads = true;
            }
            fe::PARSE => {
                let p = Parse::decode(msg.body()).map_err(|_| Reason::Protocol)?;
                if !p.name.is_empty() && statements.contains(p.name) {
                    return Err(Reason::Protocol); // "already exists": let the origin path say so
                }
                put_statement(key, p.sql, &p.param_types);
                on_sql(p.sql);
                reads = true;
                local.retain(|(name, _, _)| *name != p.name);
                local.push((p.name, p.sql, p.param_types));
            }
            fe::BIND => {
                let b = Bind::decode(msg.body()).map_err(|_| Reason::Protocol)?;
                if !b.portal.is_empty() {
                    return Err(Reason::Protocol);
                }
                let (text, types) = content(&local, statements, b.statement).ok_or(Reason::Protocol)?;
                if b.any_value(reads_the_clock) {
                    return Err(Reason::VolatileFunction);
                }
                put_statement(key, text, types);
                put(key, b.rest);
                on_sql(text);
                reads = true;
            }
            fe::DESCRIBE => {
                let d = Named::decode(fe::DESCRIBE, msg.body()).map_err(|_| Reason::Protocol)?;
                match d.target {
                    Target::Portal if d.name.is_empty() => key.byte(b'P'),
                    Target::Statement => {
                        let (text, types) = content(&local, statements, d.name).ok_or(Reason::Protocol)?;
                        key.byte(b'S');
                        put_statement(key, text, types);
                    }
                    Target::Portal => return Err(Reason::Protocol),
                }
            }
            fe::EXECUTE => {
                let e = Execute::decode(msg.body()).map_err(|_| Reason::Protocol)?;
                if !e.portal.is_empty() {
                    return Err(Reason::Protocol);
                }
                key.bytes(&e.max_rows.to_be_bytes());
            }
            fe::SYNC if i == last => {}
            // Close, Flush, FunctionCall, a Sync mid-batch: not a shape the cache answers.
            _ => return Err(Reason::Protocol),
        }
    }
    if !reads {
        return Err(Reason::NotARead);
    }
    Ok(())
}

/// The text and parameter types of a statement the batch names.
fn content<'a, 'm>(local: &'m Local<'a>, statements: &'a StatementMap, name: &str) -> Option<(&'a str, &'m [u32])>
where
    'a: 'm,
{
    match local.iter().rev().find(|(n, _, _)| *n == name) {
        Some((_, sql, types)) => Some((sql, types)),
        None => statements.get(name).map(|s| (&*s.sql, &*s.param_types)),
    }
}

fn put_statement(key: &mut impl KeyOut, sql: &str, types: &[u32]) {
    key.bytes(&(types.len() as u32).to_be_bytes());
    for t in types {
        key.bytes(&t.to_be_bytes());
    }
    put(key, sql.as_bytes());
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use bytes::{BufMut, BytesMut};

    use super::*;
    use crate::protocol::build;
    use crate::session::statements::Statement;

    fn msg(b: bytes::Bytes) -> Message {
        Message::from_frame(b)
    }

    fn parse(name: &str, sql: &str) -> Message {
        let mut b = BytesMut::new();
        build::parse_into(&mut b, name, sql, &[]);
        msg(b.freeze())
    }

    fn bind(stmt: &str, value: &str) -> Message {
        msg(build::frame(b'B', |b| {
            build::put_cstr(b, "");
            build::put_cstr(b, stmt);
            b.put_i16(0);
            b.put_i16(1);
            b.put_i32(value.len() as i32);
            b.put_slice(value.as_bytes());
            b.put_i16(0);
        }))
    }

    fn execute() -> Message {
        msg(build::frame(b'E', |b| {
            build::put_cstr(b, "");
            b.put_i32(0);
        }))
    }

    fn key(user: &str, settings: &Settings, batch: &[Message], stmts: &StatementMap) -> Vec<u8> {
        let mut key = b"reused: build clears it".to_vec();
        build(&mut key, &prefix("db", user, settings), batch, stmts).unwrap();
        key
    }

    fn shape(batch: &[Message], stmts: &StatementMap) -> Result<(), Reason> {
        build(&mut Vec::new(), &prefix("db", "u", &Settings::new()), batch, stmts)
    }

    #[test]
    fn statement_names_do_not_matter_but_content_and_values_do() {
        let mut a = StatementMap::new(1 << 20);
        let mut b = StatementMap::new(1 << 20);
        a.insert("s1", Arc::new(Statement::new(true, "select $1", &[]))).unwrap();
        b.insert("other", Arc::new(Statement::new(true, "select $1", &[]))).unwrap();
        let s = Settings::new();
        let sync = msg(build::sync());
        let ka = key("u", &s, &[bind("s1", "1"), execute(), sync.clone()], &a);
        let kb = key("u", &s, &[bind("other", "1"), execute(), sync.clone()], &b);
        assert_eq!(ka, kb);
        assert_ne!(ka, key("u", &s, &[bind("s1", "2"), execute(), sync.clone()], &a));
        assert_ne!(ka, key("v", &s, &[bind("s1", "1"), execute(), sync.clone()], &a), "users never share");
        // A batch that parses as well as binds has a different answer (ParseComplete).
        let with_parse = key("u", &s, &[parse("", "select $1"), bind("", "1"), execute(), sync], &a);
        assert_ne!(ka, with_parse);
    }

    #[test]
    fn result_settings_are_part_of_the_key_others_are_not() {
        let stmts = StatementMap::new(1 << 20);
        let q = [msg(build::query("select 1"))];
        let plain = key("u", &Settings::new(), &q, &stmts);
        let tz: Settings = [("TimeZone".to_string(), "UTC".to_string())].into_iter().collect();
        let app: Settings = [("application_name".to_string(), "x".to_string())].into_iter().collect();
        assert_ne!(plain, key("u", &tz, &q, &stmts));
        assert_eq!(plain, key("u", &app, &q, &stmts));
        // Custom settings (read by row-level security policies), role and the like: in the key.
        for name in ["app.tenant", "role", "transform_null_equals", "default_text_search_config"] {
            let set: Settings = [(name.to_string(), "x".to_string())].into_iter().collect();
            assert_ne!(plain, key("u", &set, &q, &stmts), "{name}");
        }
        let timeout: Settings = [("Statement_Timeout".to_string(), "5s".to_string())].into_iter().collect();
        assert_eq!(plain, key("u", &timeout, &q, &stmts));
    }

    #[test]
    fn long_pipelines_are_not_keyed() {
        let stmts = StatementMap::new(1 << 20);
        let pipeline = |n: usize| {
            let mut batch = Vec::new();
            for i in 0..n {
                batch.extend([parse(&format!("s{i}"), "select 1"), bind(&format!("s{i}"), "1"), execute()]);
            }
            batch.push(msg(build::sync()));
            batch
        };
        assert!(shape(&pipeline(5), &stmts).is_ok());
        assert_eq!(shape(&pipeline(40), &stmts), Err(Reason::Protocol));
    }

    #[test]
    fn clock_words_in_text_parameters_are_not_cached() {
        for v in ["now", " NOW", "today 12:00", "Tomorrow", "yesterday", "now()", "00:00 today", "\"now\"", "(now)"] {
            assert!(reads_the_clock(v.as_bytes()), "{v}");
        }
        for v in ["nowhere", "2024-01-01", "", "know", "todays", "allballs"] {
            assert!(!reads_the_clock(v.as_bytes()), "{v}");
        }
        let stmts = StatementMap::new(1 << 20);
        let batch = |value: &str| [parse("", "select $1::timestamptz"), bind("", value), msg(build::sync())];
        assert_eq!(shape(&batch("now"), &stmts), Err(Reason::VolatileFunction));
        assert!(shape(&batch("2024-01-01"), &stmts).is_ok());
    }

    #[test]
    fn shapes_the_cache_cannot_answer() {
        let stmts = StatementMap::new(1 << 20);
        let flush = msg(build::frame(b'H', |_| {}));
        assert_eq!(shape(&[parse("", "select 1"), flush], &stmts), Err(Reason::Protocol));
        assert_eq!(shape(&[bind("missing", "1"), msg(build::sync())], &stmts), Err(Reason::Protocol));
        let mut close = BytesMut::new();
        build::close_statement_into(&mut close, "x");
        assert_eq!(shape(&[msg(close.freeze()), msg(build::sync())], &stmts), Err(Reason::Protocol));
        assert_eq!(shape(&[msg(build::sync())], &stmts), Err(Reason::NotARead));
    }

    #[test]
    fn texts_follow_the_batch_through_parsed_and_saved_statements() {
        let mut stmts = StatementMap::new(1 << 20);
        stmts.insert("saved", Arc::new(Statement::new(true, "select 2", &[]))).unwrap();
        let sync = msg(build::sync());
        let batch = [
            parse("", "select 1"),
            bind("", "1"),
            execute(),
            bind("saved", "1"),
            execute(),
            parse("", "select 3"),
            bind("", "1"),
            execute(),
            sync,
        ];
        assert_eq!(shape(&batch, &stmts), Ok(()));
        assert_eq!(texts(&batch, &stmts), Ok(vec!["select 1", "select 1", "select 2", "select 3", "select 3"]));
        assert_eq!(texts(&[msg(build::query("select 4"))], &stmts), Ok(vec!["select 4"]));
    }
}
