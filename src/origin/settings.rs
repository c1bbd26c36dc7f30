//! Session settings follow the client, not the origin connection.
//!
//! Each client has the settings it asked for (startup parameters, then whatever its own SETs
//! left in place); each origin connection has the settings pgwarp last applied to it. When a
//! client's work lands on a connection whose settings differ, pgwarp prepends one query that
//! makes them equal, in the same round trip. After a client changes settings itself, pgwarp reads
//! back what is in force (`pg_settings` rows with source 'session') before the connection is
//! shared again, so the next client never sees them.

use std::collections::BTreeMap;

/// Setting name -> value, as `current_setting()` prints it.
pub type Settings = BTreeMap<String, String>;

/// Reads back every setting changed in this session (by SET, set_config, or pgwarp itself).
pub const CAPTURE_SQL: &str =
    "SELECT name, pg_catalog.current_setting(name) FROM pg_catalog.pg_settings WHERE source = 'session'";

/// The query that turns a connection's `applied` settings into `wanted`, or None if they match.
pub fn sync_sql(applied: &Settings, wanted: &Settings) -> Option<String> {
    if applied == wanted {
        return None;
    }
    let mut statements: Vec<String> =
        applied.keys().filter(|k| !wanted.contains_key(*k)).map(|k| format!("RESET {}", quote_ident(k))).collect();
    let sets: Vec<String> = wanted
        .iter()
        .filter(|(k, v)| applied.get(*k) != Some(*v))
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
    fn literals_survive_backslashes_and_quotes() {
        assert_eq!(quote_literal(r"a\b'c"), r"E'a\\b''c'");
        assert_eq!(quote_ident("we\"ird"), "\"we\"\"ird\"");
    }
}
