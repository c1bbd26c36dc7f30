//! Session settings follow the client, not the origin connection.
//!
//! Each client has the settings it asked for (startup parameters, then whatever its own SETs
//! left in place); each origin connection has the settings pgwarp last applied to it. When a
//! client's work lands on a connection whose settings differ, pgwarp prepends one query that
//! makes them equal, in the same round trip. After a client changes settings itself, pgwarp reads
//! back what is in force (`pg_settings` rows with source 'session') before the connection is
//! shared again, so the next client never sees them.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;

/// Setting name -> value, as `current_setting()` prints it.
pub type Settings = BTreeMap<String, String>;

/// Reads back every setting changed in this session (by SET, set_config, or pgwarp itself).
/// `role` is hidden from pg_settings (like SHOW ALL, it skips GUC_NO_SHOW_ALL settings), so it
/// is asked for by name: without it a `SET ROLE` would stay on the connection for the next
/// client, and the client itself would lose it on its next transaction.
const CAPTURE_BASE: &str = "SELECT name, pg_catalog.current_setting(name) FROM pg_catalog.pg_settings \
     WHERE source = 'session' \
     UNION ALL SELECT 'role', pg_catalog.current_setting('role') \
     WHERE pg_catalog.current_setting('role') <> 'none' \
     UNION ALL SELECT 'pgwarp.capture', pg_catalog.pg_backend_pid()::text || ' ' || pg_catalog.clock_timestamp()::text";

/// A pseudo-setting every capture records, with a value no other capture has. Custom settings
/// (`SET app.tenant = ...`, the usual key of row-level security policies) are invisible to
/// pg_settings, so a capture reads back only those whose names pgwarp has seen (see
/// [`remember_custom`]); one set where pgwarp cannot see its name (inside a function or a DO
/// block, or by a set_config whose name is a parameter) would otherwise stay on the connection
/// for the next client. A connection whose settings came from a capture is therefore reset
/// completely (`RESET ALL`) before it serves any client but the one captured. Never sent to the
/// origin and never part of a cache key.
pub const CAPTURE_MARK: &str = "pgwarp.capture";

/// Custom setting names seen in clients' SQL, lowercase; read back by every capture.
static CUSTOM_NAMES: Mutex<BTreeSet<String>> = Mutex::new(BTreeSet::new());
/// Enough for any application's own settings; past it, names are no longer remembered and
/// settings under them are lost when a client moves to another connection (never leaked).
const MAX_CUSTOM_NAMES: usize = 256;
const MAX_CUSTOM_NAME_LEN: usize = 128;

/// Remembers a custom (dotted) setting name a client set, so captures read it back.
pub fn remember_custom(name: &str) {
    let valid = name.len() <= MAX_CUSTOM_NAME_LEN
        && name.contains('.')
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'$'));
    if !valid {
        return;
    }
    let name = name.to_ascii_lowercase();
    let Ok(mut names) = CUSTOM_NAMES.lock() else { return };
    if names.len() < MAX_CUSTOM_NAMES {
        names.insert(name);
    }
}

/// The query that reads back every setting changed in this session: see [`CAPTURE_MARK`].
pub fn capture_sql() -> String {
    let names = CUSTOM_NAMES.lock().map(|n| n.iter().map(|n| format!("({})", quote_literal(n))).collect::<Vec<_>>());
    match names {
        Ok(names) if !names.is_empty() => format!(
            "{CAPTURE_BASE} UNION ALL SELECT n, pg_catalog.current_setting(n, true) FROM (VALUES {}) AS v(n) \
             WHERE pg_catalog.current_setting(n, true) <> ''",
            names.join(", ")
        ),
        _ => CAPTURE_BASE.to_string(),
    }
}

/// The query that turns a connection's `applied` settings into `wanted`, or None if they match.
pub fn sync_sql(applied: &Settings, wanted: &Settings) -> Option<String> {
    if applied == wanted {
        return None;
    }
    let real = |k: &String| k.as_str() != CAPTURE_MARK;
    // Captured from another client's session, which may hold settings no capture can see.
    let reset_all = applied.get(CAPTURE_MARK).is_some_and(|mark| wanted.get(CAPTURE_MARK) != Some(mark));
    let mut statements: Vec<String> = Vec::new();
    if reset_all {
        statements.push("RESET ALL".to_string());
    }
    // After RESET ALL, still: role is not reset by it. The role goes first when it is reset
    // and last when it is set, so the other settings are applied with the login user's
    // privileges (a role may lack the right to set what its login set).
    let mut resets: Vec<&String> = applied.keys().filter(|k| real(k) && !wanted.contains_key(*k)).collect();
    resets.sort_by_key(|k| !is_role(k));
    statements.extend(resets.into_iter().map(|k| format!("RESET {}", quote_ident(k))));
    let mut changed: Vec<(&String, &String)> =
        wanted.iter().filter(|(k, v)| real(k) && (reset_all || applied.get(*k) != Some(*v))).collect();
    changed.sort_by_key(|(k, _)| is_role(k));
    let sets: Vec<String> = changed
        .into_iter()
        .map(|(k, v)| format!("pg_catalog.set_config({}, {}, false)", quote_literal(k), quote_literal(v)))
        .collect();
    if !sets.is_empty() {
        statements.push(format!("SELECT {}", sets.join(", ")));
    }
    if statements.is_empty() {
        None
    } else {
        Some(statements.join("; "))
    }
}

fn is_role(name: &str) -> bool {
    name.eq_ignore_ascii_case("role")
}

/// A string literal that means the same whatever standard_conforming_strings says.
pub fn quote_literal(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 3);
    out.push_str("E'");
    for c in s.chars() {
        match c {
            '\'' => out.push_str("''"),
            '\\' => out.push_str("\\\\"),
            c => out.push(c),
        }
    }
    out.push('\'');
    out
}

pub fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// Setting names a client must not change through pgwarp, because they would change who the
/// session is or how pgwarp talks to the origin.
pub fn is_reserved(name: &str) -> bool {
    matches!(name.to_ascii_lowercase().as_str(), "session_authorization" | "replication")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(pairs: &[(&str, &str)]) -> Settings {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn equal_settings_need_no_query() {
        let a = s(&[("TimeZone", "UTC")]);
        assert_eq!(sync_sql(&a, &a.clone()), None);
        assert_eq!(sync_sql(&Settings::new(), &Settings::new()), None);
    }

    #[test]
    fn resets_what_the_client_does_not_want_and_sets_what_differs() {
        let applied = s(&[("search_path", "a"), ("statement_timeout", "5s"), ("TimeZone", "UTC")]);
        let wanted = s(&[("TimeZone", "UTC"), ("application_name", "it's")]);
        assert_eq!(
            sync_sql(&applied, &wanted).unwrap(),
            "RESET \"search_path\"; RESET \"statement_timeout\"; \
             SELECT pg_catalog.set_config(E'application_name', E'it''s', false)"
        );
    }

    #[test]
    fn a_connection_captured_for_another_client_is_reset_completely() {
        let applied = s(&[("app.tenant", "a"), (CAPTURE_MARK, "7 t1"), ("TimeZone", "UTC")]);
        let wanted = s(&[("TimeZone", "UTC")]);
        assert_eq!(
            sync_sql(&applied, &wanted).unwrap(),
            "RESET ALL; RESET \"app.tenant\"; SELECT pg_catalog.set_config(E'TimeZone', E'UTC', false)"
        );
        // The client it was captured for gets it back as it left it.
        let mut own = applied.clone();
        assert_eq!(sync_sql(&applied, &own), None);
        own.insert("search_path".into(), "x".into());
        assert_eq!(sync_sql(&applied, &own).unwrap(), "SELECT pg_catalog.set_config(E'search_path', E'x', false)");
        // Another capture's mark is another session.
        let other = s(&[(CAPTURE_MARK, "8 t2")]);
        assert!(sync_sql(&applied, &other).unwrap().starts_with("RESET ALL; RESET \"TimeZone\"; RESET \"app.tenant\""));
    }

    #[test]
    fn the_role_is_reset_first_and_set_last() {
        let applied = s(&[("role", "reader"), ("search_path", "a"), ("TimeZone", "UTC")]);
        let wanted = s(&[("TimeZone", "UTC"), ("session_replication_role", "replica")]);
        assert_eq!(
            sync_sql(&applied, &wanted).unwrap(),
            "RESET \"role\"; RESET \"search_path\"; \
             SELECT pg_catalog.set_config(E'session_replication_role', E'replica', false)"
        );
        let wanted = s(&[("role", "reader"), ("session_replication_role", "replica"), ("a.b", "1")]);
        assert_eq!(
            sync_sql(&Settings::new(), &wanted).unwrap(),
            "SELECT pg_catalog.set_config(E'a.b', E'1', false), \
             pg_catalog.set_config(E'session_replication_role', E'replica', false), \
             pg_catalog.set_config(E'role', E'reader', false)"
        );
    }

    #[test]
    fn captures_read_back_custom_settings_by_name() {
        remember_custom("myapp.tenant_id");
        remember_custom("not_custom");
        remember_custom("bad.name'; drop table x");
        let sql = capture_sql();
        assert!(sql.contains("(E'myapp.tenant_id')"), "{sql}");
        assert!(!sql.contains("not_custom") && !sql.contains("drop table"), "{sql}");
    }

    #[test]
    fn literals_survive_backslashes_and_quotes() {
        assert_eq!(quote_literal(r"a\b'c"), r"E'a\\b''c'");
        assert_eq!(quote_ident("we\"ird"), "\"we\"\"ird\"");
    }
}
