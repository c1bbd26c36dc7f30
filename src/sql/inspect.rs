//! Questions the session asks of SQL text before sending it.

use super::lexer::{statements, tokenize, Token};

/// Session-scoped state that outlives a transaction, which transaction pooling cannot share.
/// Returns what the SQL uses, for the log, or None.
pub fn session_feature(sql: &str) -> Option<&'static str> {
    // Almost no statement mentions any of these words: skip the tokenizer for the rest.
    if !contains_any_ignore_case(sql, &["listen", "temp", "hold", "advisory"]) {
        return None;
    }
    let tokens = tokenize(sql);
    for stmt in statements(&tokens) {
        if stmt[0].is_word("listen") {
            return Some("LISTEN");
        }
        let object_kind = |t: &Token<'_>| ["table", "sequence", "view", "recursive"].iter().any(|k| t.is_word(k));
        if stmt[0].is_word("create")
            && stmt.iter().skip(1).take_while(|t| !object_kind(t)).any(|t| t.is_word("temp") || t.is_word("temporary"))
        {
            return Some("temporary objects");
        }
        if stmt[0].is_word("declare") && stmt.windows(2).any(|w| w[0].is_word("with") && w[1].is_word("hold")) {
            return Some("WITH HOLD cursors");
        }
        if calls_any(
            stmt,
            &["pg_advisory_lock", "pg_advisory_lock_shared", "pg_try_advisory_lock", "pg_try_advisory_lock_shared"],
        ) {
            return Some("session advisory locks");
        }
    }
    None
}

/// Whether the SQL may change session settings without a SET command tag (set_config()).
pub fn may_change_settings(sql: &str) -> bool {
    // Cheap pre-check: most statements never mention it.
    if !contains_ignore_case(sql, "set_config") {
        return false;
    }
    calls_any(&tokenize(sql), &["set_config"])
}

/// ASCII case-insensitive substring search; `needle` must be lowercase.
fn contains_ignore_case(haystack: &str, needle: &str) -> bool {
    contains_any_ignore_case(haystack, &[needle])
}

/// Whether any of the lowercase `needles` occurs, case-insensitively, in one pass that only
/// compares where a needle's first letter appears.
fn contains_any_ignore_case(haystack: &str, needles: &[&str]) -> bool {
    let h = haystack.as_bytes();
    h.iter().enumerate().any(|(i, c)| {
        let c = c.to_ascii_lowercase();
        needles.iter().any(|n| {
            let n = n.as_bytes();
            n[0] == c
                && h.len() - i >= n.len()
                && h[i..i + n.len()].iter().zip(n).all(|(a, b)| a.to_ascii_lowercase() == *b)
        })
    })
}

/// Whether the tokens call one of `names` (a word followed by an opening parenthesis).
fn calls_any(tokens: &[Token<'_>], names: &[&str]) -> bool {
    tokens
        .windows(2)
        .any(|w| w[1].is_punct("(") && names.iter().any(|n| w[0].is_word(n) || w[0] == Token::QuotedIdent((*n).into())))
}

/// Whether a CommandComplete tag means session settings may have changed.
pub fn tag_changes_settings(tag: &str) -> bool {
    tag == "SET" || tag == "RESET" || tag.starts_with("DISCARD")
}

/// Whether a CommandComplete tag means every prepared statement on the connection is gone.
pub fn tag_drops_all_statements(tag: &str) -> bool {
    tag == "DISCARD ALL" || tag == "DEALLOCATE ALL"
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_session_scoped_features() {
        assert_eq!(session_feature("LISTEN chan"), Some("LISTEN"));
        assert_eq!(session_feature("create temp table t (a int)"), Some("temporary objects"));
        assert_eq!(session_feature("CREATE GLOBAL TEMPORARY TABLE t (a int)"), Some("temporary objects"));
        assert_eq!(session_feature("declare c cursor with hold for select 1"), Some("WITH HOLD cursors"));
        assert_eq!(session_feature("select pg_advisory_lock(1)"), Some("session advisory locks"));
        assert_eq!(session_feature("select 1; select pg_try_advisory_lock(1)"), Some("session advisory locks"));
    }

    #[test]
    fn ignores_lookalikes() {
        assert_eq!(session_feature("select pg_advisory_xact_lock(1)"), None);
        assert_eq!(session_feature("select 'listen' ; -- listen x"), None);
        assert_eq!(session_feature("select 1 /* pg_advisory_lock(1) */"), None);
        assert_eq!(session_feature("create table temp (a int)"), None);
        assert_eq!(session_feature("declare c cursor without hold for select 1"), None);
    }

    #[test]
    fn spots_set_config_calls_only_in_code() {
        assert!(may_change_settings("select pg_catalog.set_config('a.b', 'x', false)"));
        assert!(!may_change_settings("select 'set_config(' "));
        assert!(!may_change_settings("select 1"));
    }
}
