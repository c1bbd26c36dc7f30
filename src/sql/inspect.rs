//! Questions the session asks of SQL text before sending it.

use super::lexer::{statements, tokenize, tokenize_backslash_escapes, Token};

/// What the session must know about SQL it forwards: the session-scoped feature it uses (for
/// the log) and whether it may change settings without a SET command tag.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SessionHints {
    pub feature: Option<&'static str>,
    pub may_change_settings: bool,
}

/// Both questions at once, for the hot path: one pass over the text, and the tokenizer only
/// for the rare statement that mentions a word of interest.
pub fn session_hints(sql: &str) -> SessionHints {
    let found = mentions(sql);
    SessionHints {
        feature: if found & SESSION_WORDS != 0 { session_feature_tokens(sql) } else { None },
        may_change_settings: found & SET_CONFIG != 0 && readings(sql).iter().any(|t| calls_any(t, &["set_config"])),
    }
}

/// Session-scoped state that outlives a transaction, which transaction pooling cannot share.
/// Returns what the SQL uses, for the log, or None.
pub fn session_feature(sql: &str) -> Option<&'static str> {
    session_hints(sql).feature
}

/// The SQL's tokens, and if it has a backslash also as a server with
/// standard_conforming_strings off reads them (a client may turn it off, and then
/// `select '\''; select set_config(...); --'` calls set_config).
fn readings(sql: &str) -> Vec<Vec<Token<'_>>> {
    let mut readings = vec![tokenize(sql)];
    if sql.as_bytes().contains(&b'\\') {
        readings.push(tokenize_backslash_escapes(sql));
    }
    readings
}

fn session_feature_tokens(sql: &str) -> Option<&'static str> {
    readings(sql).iter().find_map(|tokens| session_feature_in(tokens))
}

fn session_feature_in(tokens: &[Token<'_>]) -> Option<&'static str> {
    for stmt in statements(tokens) {
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
    session_hints(sql).may_change_settings
}

/// The words worth tokenizing for, lowercase; bit i of `mentions` stands for `WORDS[i]`.
const WORDS: [&[u8]; 5] = [b"listen", b"temp", b"hold", b"advisory", b"set_config"];
const SESSION_WORDS: u8 = 0b01111;
const SET_CONFIG: u8 = 0b10000;

/// For each byte: bit 7 if it is an ASCII letter, and bit i if `WORDS[i]` starts with it
/// (either case). One lookup answers both questions `mentions` asks of a byte.
static CLASS: [u8; 256] = {
    let mut table = [0u8; 256];
    let mut b = 0;
    while b < 256 {
        if (b as u8).is_ascii_alphabetic() {
            table[b] = LETTER;
        }
        b += 1;
    }
    let mut i = 0;
    while i < WORDS.len() {
        let b = WORDS[i][0];
        table[b as usize] |= 1 << i;
        table[b.to_ascii_uppercase() as usize] |= 1 << i;
        i += 1;
    }
    table
};
const LETTER: u8 = 0x80;

/// Which of `WORDS` occur in the text, case-insensitively, anywhere (comments and strings
/// included: this only decides whether the tokenizer needs to look). Runs on every query:
/// one table lookup per byte, comparing only where a word's first letter starts a word. A
/// letter before it would make it part of a longer name (`_`, `.` and digits do not: the words
/// may follow `pg_`, a schema, ...; anything else only means a needless look).
fn mentions(sql: &str) -> u8 {
    let h = sql.as_bytes();
    let mut found = 0u8;
    let mut i = 0;
    while i < h.len() {
        let class = CLASS[usize::from(h[i])];
        i += 1;
        if class & LETTER == 0 {
            continue;
        }
        // A run of letters starts here: only its start can begin a word of interest.
        let mut candidates = class & !LETTER & !found;
        while candidates != 0 {
            let w = candidates.trailing_zeros() as usize;
            candidates &= candidates - 1;
            let word = WORDS[w];
            // The second letter first: most candidates fail there, and cheaply.
            let second = h.get(i).is_some_and(|c| c.to_ascii_lowercase() == word[1]);
            if second && h.get(i - 1..i - 1 + word.len()).is_some_and(|s| s.eq_ignore_ascii_case(word)) {
                found |= 1 << w;
            }
        }
        while i < h.len() && CLASS[usize::from(h[i])] & LETTER != 0 {
            i += 1;
        }
    }
    found
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
    fn the_prefilter_finds_words_after_any_non_letter() {
        assert_eq!(session_feature("select 1;listen chan"), Some("LISTEN"));
        assert_eq!(session_feature("/*x*/LISTEN chan"), Some("LISTEN"));
        assert_eq!(session_feature("select pg_catalog.pg_advisory_lock(1)"), Some("session advisory locks"));
        assert_eq!(session_feature("create\ttemp table t (a int)"), Some("temporary objects"));
        assert!(may_change_settings("select \"set_config\"('a.b', 'x', false)"));
        assert!(may_change_settings("select 1,set_config('a.b', 'x', false)"));
        // Inside a longer name the words are not looked for at all.
        assert_eq!(mentions("select mylisten, attempt, threshold, unset_configured"), 0);
    }

    #[test]
    fn reads_sql_with_a_backslash_both_ways() {
        // With standard_conforming_strings off, the string ends early and set_config runs.
        let hidden = r"select '\''; select pg_catalog.set_config('statement_timeout', '1s', false); --'";
        assert!(may_change_settings(hidden));
        assert_eq!(session_feature(r"select '\''; listen foo; --'"), Some("LISTEN"));
        // Either way a plain string: nothing.
        assert!(!may_change_settings(r"select 'set_config(\x)'"));
    }

    #[test]
    fn spots_set_config_calls_only_in_code() {
        assert!(may_change_settings("select pg_catalog.set_config('a.b', 'x', false)"));
        assert!(!may_change_settings("select 'set_config(' "));
        assert!(!may_change_settings("select 1"));
    }

    #[test]
    fn prefilter_matches_any_case_at_word_starts() {
        assert_eq!(mentions("LISTEN x"), 0b00001);
        assert_eq!(mentions("create TeMp table"), 0b00010);
        assert_eq!(mentions("select SET_CONFIG"), 0b10000);
        assert_eq!(mentions("xx_temp.hold 1advisory"), 0b01110);
        assert_eq!(mentions("xxtempxxhold"), 0);
        assert_eq!(mentions("select tem, lis ten, tmp, set config, advisor"), 0);
        assert_eq!(mentions(""), 0);
        assert_eq!(mentions("é listen"), 0b00001);
        assert_eq!(session_hints("select 1"), SessionHints::default());
        assert_eq!(
            session_hints("select set_config('a.b', '1', false), pg_advisory_lock(1)"),
            SessionHints { feature: Some("session advisory locks"), may_change_settings: true }
        );
    }
}
