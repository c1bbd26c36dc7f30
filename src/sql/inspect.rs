//! Questions the session asks of SQL text before sending it.

use super::lexer::{statements, tokenize, tokenize_backslash_escapes, Token};
use crate::origin::settings;

/// What the session must know about SQL it forwards: the session-scoped feature it uses (for
/// the log) and whether it may change settings without a SET command tag.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SessionHints {
    pub feature: Option<&'static str>,
    pub may_change_settings: bool,
}

/// Both questions at once, for the hot path: one pass over the text, and the tokenizer only
/// for the rare statement that mentions a word of interest. Not quite pure: custom setting
/// names it sees in SET, RESET and set_config are remembered (`settings::remember_custom`, a
/// capped, process-wide list) so that read-backs of settings ask for them.
pub fn session_hints(sql: &str) -> SessionHints {
    let found = mentions(sql);
    let calls_set_config = (found & SET_CONFIG != 0 && readings(sql).iter().any(|t| calls_any(t, &["set_config"])))
        || (found & UNICODE_NAME != 0 && readings(sql).iter().any(|t| calls_unicode_ident(t)));
    if calls_set_config {
        remember_set_config_names(sql);
    }
    let may_change_settings = calls_set_config || runs_code_or_sets(sql);
    let mut feature = if found & SESSION_WORDS != 0 { session_feature_tokens(sql) } else { None };
    // set_config('session_authorization', ...) changes who the session is, as SET SESSION
    // AUTHORIZATION does; the name is a string, so the text is all there is to look at.
    if feature.is_none() && may_change_settings && found & AUTHORIZATION != 0 && mentions_session_authorization(sql) {
        feature = Some("SET SESSION AUTHORIZATION");
    }
    SessionHints { feature, may_change_settings }
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
        if creates_temporary_objects(stmt) {
            return Some("temporary objects");
        }
        if stmt[0].is_word("set") && stmt.windows(2).any(|w| w[0].is_word("session") && w[1].is_word("authorization")) {
            return Some("SET SESSION AUTHORIZATION");
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

/// Whether the SQL starts with a command that runs code pgwarp cannot see into (DO, CALL),
/// which may change settings with set_config, or with SET/RESET, whose custom setting name
/// (`SET app.tenant = ...`) is remembered for the capture that follows (see
/// `settings::remember_custom`). A SET is known to change settings from its command tag; this
/// only looks at the first word, so it costs nothing on ordinary queries.
fn runs_code_or_sets(sql: &str) -> bool {
    let start = sql.trim_start().as_bytes();
    if start.starts_with(b"/*") || start.starts_with(b"--") {
        // A leading comment (an ORM's or a tracer's tag): rare enough to lex.
        return leads_with_code_or_sets(sql);
    }
    let word_len = start.iter().take_while(|b| b.is_ascii_alphabetic()).count();
    let word = &start[..word_len];
    if word.eq_ignore_ascii_case(b"set") || word.eq_ignore_ascii_case(b"reset") {
        remember_set_names(sql);
        return false;
    }
    // `UPDATE pg_settings SET setting = ...` is a SET: the view's rule calls set_config.
    let updates_settings = word.eq_ignore_ascii_case(b"update") && mentions_pg_settings(sql);
    word.eq_ignore_ascii_case(b"do") || word.eq_ignore_ascii_case(b"call") || updates_settings
}

fn mentions_pg_settings(sql: &str) -> bool {
    const NAME: &[u8] = b"pg_settings";
    sql.as_bytes().windows(NAME.len()).any(|w| w.eq_ignore_ascii_case(NAME))
}

/// `runs_code_or_sets` for SQL that starts with a comment: the first word of each statement.
fn leads_with_code_or_sets(sql: &str) -> bool {
    remember_set_names(sql);
    readings(sql)
        .iter()
        .any(|tokens| statements(tokens).iter().any(|stmt| stmt[0].is_word("do") || stmt[0].is_word("call")))
}

/// The dotted names after `SET [SESSION | LOCAL]` and `RESET` in each statement.
fn remember_set_names(sql: &str) {
    for tokens in readings(sql) {
        for stmt in statements(&tokens) {
            if !(stmt[0].is_word("set") || stmt[0].is_word("reset")) {
                continue;
            }
            let rest = &stmt[1..];
            let rest = match rest.first() {
                Some(t) if t.is_word("session") || t.is_word("local") => &rest[1..],
                _ => rest,
            };
            let mut name = String::new();
            for (i, t) in rest.iter().enumerate() {
                match (i % 2, t) {
                    (0, t) => match t.ident() {
                        Some(part) => name.push_str(&part),
                        None => break,
                    },
                    (_, t) if t.is_punct(".") => name.push('.'),
                    _ => break,
                }
            }
            settings::remember_custom(&name);
        }
    }
}

/// The names in `set_config('name', ...)` calls, read from the text (string contents are not
/// kept by the lexer); a name that is a parameter is not seen, which `CAPTURE_MARK` covers.
fn remember_set_config_names(sql: &str) {
    let lower = sql.to_ascii_lowercase();
    for (at, _) in lower.match_indices("set_config") {
        let rest = lower[at + "set_config".len()..].trim_start();
        let Some(rest) = rest.strip_prefix('(') else { continue };
        let Some(rest) = rest.trim_start().strip_prefix('\'') else { continue };
        if let Some(end) = rest.find('\'') {
            settings::remember_custom(&rest[..end]);
        }
    }
}

/// CREATE TEMP ..., SELECT ... INTO TEMP ..., or a CREATE naming the pg_temp schema: objects
/// that live as long as the origin connection's session, and would shadow tables of the same
/// name for whichever client the connection serves next.
fn creates_temporary_objects(stmt: &[Token<'_>]) -> bool {
    let temp = |t: &Token<'_>| t.is_word("temp") || t.is_word("temporary");
    let object_kind = |t: &Token<'_>| ["table", "sequence", "view", "recursive"].iter().any(|k| t.is_word(k));
    let pg_temp = |t: &Token<'_>| t.is_word("pg_temp") || *t == Token::QuotedIdent("pg_temp".into());
    if stmt[0].is_word("create")
        && (stmt.iter().skip(1).take_while(|t| !object_kind(t)).any(temp) || stmt.iter().any(pg_temp))
    {
        return true;
    }
    // SELECT ... INTO [TEMP | TEMPORARY] [TABLE] name, also after WITH or inside EXPLAIN ANALYZE;
    // not INSERT or MERGE INTO a table called temp, where a clause, `(` or `.` follows.
    let not_a_name = ["values", "select", "default", "overriding", "as", "using", "with"];
    stmt.windows(3).any(|w| {
        w[0].is_word("into")
            && temp(&w[1])
            && match &w[2] {
                Token::Word(word) => !not_a_name.iter().any(|k| word.eq_ignore_ascii_case(k)),
                Token::QuotedIdent(_) => true,
                _ => false,
            }
    })
}

/// Whether the SQL may change session settings without a SET command tag (set_config()).
pub fn may_change_settings(sql: &str) -> bool {
    session_hints(sql).may_change_settings
}

/// The words worth tokenizing for, lowercase; bit i of `mentions` stands for `WORDS[i]`.
const WORDS: [&[u8]; 6] = [b"listen", b"temp", b"hold", b"advisory", b"set_config", b"authorization"];
const SESSION_WORDS: u8 = 0b10_1111;
const SET_CONFIG: u8 = 0b01_0000;
const AUTHORIZATION: u8 = 0b10_0000;
/// Not a word: `&"`, the start of a U&"..." identifier, found by the same scan.
const UNICODE_NAME: u8 = 0b100_0000;

fn mentions_session_authorization(sql: &str) -> bool {
    const NAME: &[u8] = b"session_authorization";
    sql.as_bytes().windows(NAME.len()).any(|w| w.eq_ignore_ascii_case(NAME))
}

/// For each byte: bit 7 if it is an ASCII letter, bit i if `WORDS[i]` starts with it (either
/// case), and `UNICODE_NAME` for `&`. One lookup answers every question `mentions` asks of a
/// byte.
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
    table[b'&' as usize] = UNICODE_NAME;
    table
};
const LETTER: u8 = 0x80;

/// Which of `WORDS` (and `&"`) occur in the text, case-insensitively, anywhere (comments and strings
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
        if class & (LETTER | UNICODE_NAME) == 0 {
            continue; // the common case costs one test, as if `&` were not looked for
        }
        if class == UNICODE_NAME {
            if h.get(i) == Some(&b'"') {
                found |= UNICODE_NAME;
            }
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

/// Whether the tokens call a function named by a U&"..." identifier with escapes, whose name
/// the lexer does not work out: it may spell set_config.
fn calls_unicode_ident(tokens: &[Token<'_>]) -> bool {
    tokens.windows(2).any(|w| matches!(w[0], Token::UnicodeIdent(_)) && w[1].is_punct("("))
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

/// Whether a CommandComplete tag needs no bookkeeping: it neither changes settings nor drops
/// prepared statements.
pub fn tag_is_plain(tag: &str) -> bool {
    !tag_changes_settings(tag) && !tag_drops_all_statements(tag) && !tag_names_statement(tag)
}

/// Whether a CommandComplete tag reports a prepared statement made or dropped by name in SQL.
/// pgwarp answers a PREPARE or DEALLOCATE sent as a query of its own itself; one the origin
/// ran came inside a larger query or through Parse.
pub fn tag_names_statement(tag: &str) -> bool {
    tag == "PREPARE" || tag == "DEALLOCATE"
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
        assert_eq!(session_feature("SELECT 1 AS id INTO TEMP items"), Some("temporary objects"));
        assert_eq!(session_feature("select * into temporary table t from x"), Some("temporary objects"));
        assert_eq!(session_feature("create table pg_temp.t (a int)"), Some("temporary objects"));
        assert_eq!(session_feature("CREATE VIEW \"pg_temp\".v AS SELECT 1"), Some("temporary objects"));
        assert_eq!(session_feature("SET SESSION AUTHORIZATION bob"), Some("SET SESSION AUTHORIZATION"));
        assert_eq!(
            session_feature("select set_config('SESSION_AUTHORIZATION', 'bob', false)"),
            Some("SET SESSION AUTHORIZATION")
        );
    }

    #[test]
    fn ignores_lookalikes() {
        assert_eq!(session_feature("select pg_advisory_xact_lock(1)"), None);
        assert_eq!(session_feature("select 'listen' ; -- listen x"), None);
        assert_eq!(session_feature("select 1 /* pg_advisory_lock(1) */"), None);
        assert_eq!(session_feature("create table temp (a int)"), None);
        assert_eq!(session_feature("declare c cursor without hold for select 1"), None);
        assert_eq!(session_feature("select * into items_copy from items"), None);
        assert_eq!(session_feature("insert into temps values (1)"), None);
        assert_eq!(session_feature("insert into temp values (1)"), None);
        assert_eq!(session_feature("INSERT INTO temp (a) SELECT 1"), None);
        assert_eq!(session_feature("merge into temp using src on true when matched then delete"), None);
        assert_eq!(session_feature("select 'session authorization'"), None);
        assert_eq!(session_feature("SET LOCAL ROLE alice"), None);
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
    fn code_pgwarp_cannot_see_into_may_change_settings() {
        assert!(may_change_settings("DO $$ BEGIN PERFORM set_config('x.y', '1', false); END $$"));
        assert!(may_change_settings("  call my_proc()"));
        assert!(may_change_settings("UPDATE pg_settings SET setting = '77MB' WHERE name = 'work_mem'"));
        assert!(!may_change_settings("UPDATE accounts SET balance = 0"));
        assert!(!may_change_settings("select docall, dox from t"));
        assert!(!may_change_settings("SET app.x = 1"), "SET is seen from its command tag");
        assert!(may_change_settings("/* job 7 */ DO $$ BEGIN NULL; END $$"));
        assert!(may_change_settings("-- tag\n call p()"));
        assert!(!may_change_settings("/* tag */ select 1"));
    }

    #[test]
    fn custom_setting_names_are_remembered_for_the_capture() {
        session_hints("SET SESSION Inspect_Test.Tenant = 'a'");
        session_hints("reset inspect_test.other");
        session_hints("select set_config( 'inspect_test.viaconfig', $1, false)");
        session_hints("SET search_path = x");
        session_hints("/* app */ SET inspect_test.after_comment = 'a'");
        let sql = settings::capture_sql();
        for name in
            ["inspect_test.tenant", "inspect_test.other", "inspect_test.viaconfig", "inspect_test.after_comment"]
        {
            assert!(sql.contains(&format!("E'{name}'")), "{name}: {sql}");
        }
    }

    #[test]
    fn a_call_through_an_escaped_unicode_name_may_be_set_config() {
        assert!(may_change_settings(r#"select U&"set_\0063onfig"('search_path', 'x', false)"#));
        assert!(!may_change_settings(r#"select U&"d\0061ta" from t"#));
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
