//! The cache key of a batch: who asks (database, user, the settings that change result bytes)
//! and what exactly it asks (query text, parameter types, formats and values, Describe targets,
//! row limits), never a client's statement or portal name. Pure.

use std::collections::HashMap;

use crate::origin::settings::Settings;
use crate::protocol::frontend::{self as fe, Bind, Execute, Named, Parse, Target};
use crate::protocol::Message;
use crate::session::statements::StatementMap;

use super::classify::Reason;

/// Settings whose values change the bytes of a result.
const RESULT_SETTINGS: &[&str] = &[
    "client_encoding",
    "datestyle",
    "timezone",
    "intervalstyle",
    "extra_float_digits",
    "bytea_output",
    "search_path",
    "role",
    "lc_monetary",
    "lc_numeric",
    "lc_time",
    "standard_conforming_strings",
];

/// A batch the cache may answer: its key and the SQL it runs.
#[derive(Debug, PartialEq, Eq)]
pub struct CacheableBatch<'a> {
    pub key: Vec<u8>,
    pub sql: Vec<&'a str>,
}

fn put(key: &mut Vec<u8>, part: &[u8]) {
    key.extend_from_slice(&(part.len() as u32).to_be_bytes());
    key.extend_from_slice(part);
}

/// The part of every key that says who asks: database, user and the settings that change
/// result bytes. It changes only when the client's settings do, so sessions keep it.
pub fn prefix(database: &str, user: &str, settings: &Settings) -> Vec<u8> {
    let mut key = Vec::with_capacity(128);
    put(&mut key, database.as_bytes());
    put(&mut key, user.as_bytes());
    for (k, v) in settings {
        if RESULT_SETTINGS.iter().any(|r| r.eq_ignore_ascii_case(k)) {
            put(&mut key, k.to_ascii_lowercase().as_bytes());
            put(&mut key, v.as_bytes());
        }
    }
    key
}

/// Builds the key (after `prefix`), or says why the batch's shape cannot be cached.
pub fn build<'a>(
    prefix: &[u8],
    batch: &'a [Message],
    statements: &'a StatementMap,
) -> Result<CacheableBatch<'a>, Reason> {
    let mut key = Vec::with_capacity(prefix.len() + 192);
    key.extend_from_slice(prefix);
    let mut sql = Vec::new();
    // Statements parsed earlier in this same batch.
    let mut local: Local<'a> = HashMap::new();
    let last = batch.len().saturating_sub(1);
    for (i, msg) in batch.iter().enumerate() {
        let tag = msg.tag();
        key.push(tag);
        match tag {
            fe::QUERY if batch.len() == 1 => {
                let text = fe::query_text(msg.body()).map_err(|_| Reason::Protocol)?;
                put(&mut key, text.as_bytes());
                sql.push(text);
            }
            fe::PARSE => {
                let p = Parse::decode(msg.body()).map_err(|_| Reason::Protocol)?;
                if !p.name.is_empty() && statements.contains(p.name) {
                    return Err(Reason::Protocol); // "already exists": let the origin path say so
                }
                put_statement(&mut key, p.sql, &p.param_types);
                sql.push(p.sql);
                local.insert(p.name, (p.sql, p.param_types));
            }
            fe::BIND => {
                let b = Bind::decode(msg.body()).map_err(|_| Reason::Protocol)?;
                if !b.portal.is_empty() {
                    return Err(Reason::Protocol);
                }
                let (text, types) = content(&local, statements, b.statement).ok_or(Reason::Protocol)?;
                put_statement(&mut key, text, types);
                put(&mut key, b.rest);
                sql.push(text);
            }
            fe::DESCRIBE => {
                let d = Named::decode(fe::DESCRIBE, msg.body()).map_err(|_| Reason::Protocol)?;
                match d.target {
                    Target::Portal if d.name.is_empty() => key.push(b'P'),
                    Target::Statement => {
                        let (text, types) = content(&local, statements, d.name).ok_or(Reason::Protocol)?;
                        key.push(b'S');
                        put_statement(&mut key, text, types);
                    }
                    Target::Portal => return Err(Reason::Protocol),
                }
            }
            fe::EXECUTE => {
                let e = Execute::decode(msg.body()).map_err(|_| Reason::Protocol)?;
                if !e.portal.is_empty() {
                    return Err(Reason::Protocol);
                }
                key.extend_from_slice(&e.max_rows.to_be_bytes());
            }
            fe::SYNC if i == last => {}
            // Close, Flush, FunctionCall, a Sync mid-batch: not a shape the cache answers.
            _ => return Err(Reason::Protocol),
        }
    }
    if sql.is_empty() {
        return Err(Reason::NotARead);
    }
    Ok(CacheableBatch { key, sql })
}

/// Statements parsed earlier in the batch being keyed: name to text and parameter types.
type Local<'a> = HashMap<&'a str, (&'a str, Vec<u32>)>;

/// The text and parameter types of a statement the batch names.
fn content<'a, 'm>(local: &'m Local<'a>, statements: &'a StatementMap, name: &str) -> Option<(&'a str, &'m [u32])>
where
    'a: 'm,
{
    match local.get(name) {
        Some((sql, types)) => Some((sql, types)),
        None => statements.get(name).map(|s| (&*s.sql, &*s.param_types)),
    }
}

fn put_statement(key: &mut Vec<u8>, sql: &str, types: &[u32]) {
    key.extend_from_slice(&(types.len() as u32).to_be_bytes());
    for t in types {
        key.extend_from_slice(&t.to_be_bytes());
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
        build(&prefix("db", user, settings), batch, stmts).unwrap().key
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
    }

    #[test]
    fn shapes_the_cache_cannot_answer() {
        let stmts = StatementMap::new(1 << 20);
        let s = Settings::new();
        let flush = msg(build::frame(b'H', |_| {}));
        assert_eq!(build(&prefix("db", "u", &s), &[parse("", "select 1"), flush], &stmts), Err(Reason::Protocol));
        assert_eq!(
            build(&prefix("db", "u", &s), &[bind("missing", "1"), msg(build::sync())], &stmts),
            Err(Reason::Protocol)
        );
        let mut close = BytesMut::new();
        build::close_statement_into(&mut close, "x");
        assert_eq!(
            build(&prefix("db", "u", &s), &[msg(close.freeze()), msg(build::sync())], &stmts),
            Err(Reason::Protocol)
        );
    }
}
