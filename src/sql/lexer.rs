//! A SQL tokenizer faithful to Postgres' lexical rules where they matter for classification:
//! `--` and nested `/* */` comments, '...' strings (with '' and E'\'' escapes), "quoted"
//! identifiers (and U&"..." ones), $tag$ dollar quotes $tag$, positional parameters, and `;`
//! between statements. Text that does not lex (an unterminated string) yields an `Unterminated`
//! token, never a panic.

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Token<'a> {
    /// An unquoted identifier or keyword, as written (compare case-insensitively).
    Word(&'a str),
    /// A "quoted identifier", with doubled quotes undone.
    QuotedIdent(String),
    /// A U&"..." identifier with escapes in it, as written: its name is not worked out (that
    /// takes the UESCAPE character, which may come after a comment), so it names nothing known.
    UnicodeIdent(&'a str),
    /// A string literal of any kind, as written (prefix and quotes included): the lexer does not
    /// undo escapes, and only classification looks inside.
    Str(&'a str),
    Number,
    /// $1, $2, ...
    Param,
    /// Punctuation or an operator: ( ) , . ; = + etc.
    Punct(&'a str),
    /// A string, identifier or comment that never ends.
    Unterminated,
}

impl Token<'_> {
    /// Whether this is the unquoted word `kw`, case-insensitively.
    pub fn is_word(&self, kw: &str) -> bool {
        matches!(self, Token::Word(w) if w.eq_ignore_ascii_case(kw))
    }

    pub fn is_punct(&self, p: &str) -> bool {
        matches!(self, Token::Punct(x) if *x == p)
    }

    /// The identifier this token names, lowercased if unquoted (Postgres folds case).
    pub fn ident(&self) -> Option<String> {
        match self {
            Token::Word(w) => Some(w.to_ascii_lowercase()),
            Token::QuotedIdent(s) => Some(s.clone()),
            // Unresolved: it may name anything, so it names nothing in particular.
            _ => None,
        }
    }
}

/// Tokens reserved up front: enough for common statements, without reserving for a huge text
/// (a long literal is one token).
const MAX_RESERVED_TOKENS: usize = 256;

pub fn tokenize(sql: &str) -> Vec<Token<'_>> {
    tokenize_as(sql, false)
}

/// Tokens as a server with `standard_conforming_strings = off` reads them, where a backslash
/// escapes the next character in a plain '...' string too. A client may turn that setting off,
/// so SQL with a backslash in it can mean two things.
pub fn tokenize_backslash_escapes(sql: &str) -> Vec<Token<'_>> {
    tokenize_as(sql, true)
}

fn tokenize_as(sql: &str, plain_escapes: bool) -> Vec<Token<'_>> {
    let mut tokens = Vec::with_capacity((sql.len() / 4 + 4).min(MAX_RESERVED_TOKENS));
    lex(sql, &mut Spanned { push: |t, _| tokens.push(t), start: 0, plain_escapes });
    tokens
}

/// Tokens with the byte range each one covers in `sql`.
pub fn tokenize_with_spans(sql: &str) -> Vec<(Token<'_>, std::ops::Range<usize>)> {
    let mut tokens = Vec::with_capacity((sql.len() / 4 + 4).min(MAX_RESERVED_TOKENS));
    lex(sql, &mut Spanned { push: |t, span| tokens.push((t, span)), start: 0, plain_escapes: false });
    tokens
}

fn lex<'a, F: FnMut(Token<'a>, std::ops::Range<usize>)>(sql: &'a str, out: &mut Spanned<F>) {
    let b = sql.as_bytes();
    // Whether UESCAPE occurs anywhere: looked up once, at the first U&"..." (a scan per
    // identifier made many of them quadratic).
    let mut uescape: Option<bool> = None;
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        out.start = i;
        match c {
            c if c.is_ascii_whitespace() => i += 1,
            b'-' if b.get(i + 1) == Some(&b'-') => {
                while i < b.len() && b[i] != b'\n' {
                    i += 1;
                }
            }
            b'/' if b.get(i + 1) == Some(&b'*') => match skip_block_comment(b, i) {
                Some(end) => i = end,
                None => {
                    out.push_at(Token::Unterminated, b.len());
                    return;
                }
            },
            b'\'' => match skip_string(b, i + 1, out.plain_escapes) {
                Some(end) => {
                    i = end;
                    out.push_at(Token::Str(&sql[out.start..i]), i);
                }
                None => {
                    out.push_at(Token::Unterminated, b.len());
                    return;
                }
            },
            b'"' => match quoted_ident(sql, i + 1) {
                Some((s, end)) => {
                    i = end;
                    out.push_at(Token::QuotedIdent(s), i);
                }
                None => {
                    out.push_at(Token::Unterminated, b.len());
                    return;
                }
            },
            b'$' => {
                if b.get(i + 1).is_some_and(u8::is_ascii_digit) {
                    i += 1;
                    while i < b.len() && b[i].is_ascii_digit() {
                        i += 1;
                    }
                    out.push_at(Token::Param, i);
                } else if let Some(tag_end) = dollar_tag_end(b, i) {
                    let tag = &sql[i..tag_end];
                    match sql[tag_end..].find(tag) {
                        Some(pos) => {
                            i = tag_end + pos + tag.len();
                            out.push_at(Token::Str(&sql[out.start..i]), i);
                        }
                        None => {
                            out.push_at(Token::Unterminated, b.len());
                            return;
                        }
                    }
                } else {
                    i += 1;
                    out.push_at(Token::Punct(&sql[i - 1..i]), i);
                }
            }
            c if is_ident_start(c) => {
                // Prefixed strings: E'..', B'..', X'..', N'..', U&'..'
                let prefixed = match c {
                    b'e' | b'E' | b'b' | b'B' | b'x' | b'X' | b'n' | b'N' if b.get(i + 1) == Some(&b'\'') => {
                        Some(i + 2)
                    }
                    b'u' | b'U' if b.get(i + 1) == Some(&b'&') && b.get(i + 2) == Some(&b'\'') => Some(i + 3),
                    _ => None,
                };
                if let Some(start) = prefixed {
                    let escapes = matches!(c, b'e' | b'E');
                    match skip_string(b, start, escapes) {
                        Some(end) => {
                            i = end;
                            out.push_at(Token::Str(&sql[out.start..i]), i);
                        }
                        None => {
                            out.push_at(Token::Unterminated, b.len());
                            return;
                        }
                    }
                    continue;
                }
                if matches!(c, b'u' | b'U') && b.get(i + 1) == Some(&b'&') && b.get(i + 2) == Some(&b'"') {
                    match unicode_ident(sql, i, &mut uescape) {
                        Some((token, end)) => {
                            i = end;
                            out.push_at(token, i);
                        }
                        None => {
                            out.push_at(Token::Unterminated, b.len());
                            return;
                        }
                    }
                    continue;
                }
                let start = i;
                while i < b.len() && is_ident_char(b[i]) {
                    i += 1;
                }
                out.push_at(Token::Word(&sql[start..i]), i);
            }
            c if c.is_ascii_digit() || (c == b'.' && b.get(i + 1).is_some_and(u8::is_ascii_digit)) => {
                i = number_end(b, i);
                out.push_at(Token::Number, i);
            }
            _ => {
                // Multi-character operators are kept whole so `::` or `<=` read as one token.
                let start = i;
                let len = sql[i..].chars().next().map_or(1, char::len_utf8);
                i += len;
                if len == 1 && is_op_char(c) {
                    while i < b.len() && is_op_char(b[i]) && !(b[i] == b'-' && b.get(i + 1) == Some(&b'-')) {
                        i += 1;
                    }
                }
                out.push_at(Token::Punct(&sql[start..i]), i);
            }
        }
    }
}

/// Hands on tokens with their spans; `start` is where the token being read began.
struct Spanned<F> {
    push: F,
    start: usize,
    /// Whether a backslash escapes in plain strings (standard_conforming_strings off).
    plain_escapes: bool,
}

impl<F> Spanned<F> {
    fn push_at<'a>(&mut self, token: Token<'a>, end: usize)
    where
        F: FnMut(Token<'a>, std::ops::Range<usize>),
    {
        (self.push)(token, self.start..end);
    }
}

/// Splits tokens into statements at top-level semicolons, dropping empty statements.
pub fn statements<'t, 'a>(tokens: &'t [Token<'a>]) -> Vec<&'t [Token<'a>]> {
    tokens.split(|t| t.is_punct(";")).filter(|s| !s.is_empty()).collect()
}

fn is_ident_start(c: u8) -> bool {
    c.is_ascii_alphabetic() || c == b'_' || c >= 0x80
}

fn is_ident_char(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'_' || c == b'$' || c >= 0x80
}

fn is_op_char(c: u8) -> bool {
    b"+-*/<>=~!@#%^&|`?:".contains(&c)
}

fn skip_block_comment(b: &[u8], start: usize) -> Option<usize> {
    let mut depth = 0;
    let mut i = start;
    while i + 1 < b.len() {
        if b[i] == b'/' && b[i + 1] == b'*' {
            depth += 1;
            i += 2;
        } else if b[i] == b'*' && b[i + 1] == b'/' {
            depth -= 1;
            i += 2;
            if depth == 0 {
                return Some(i);
            }
        } else {
            i += 1;
        }
    }
    None
}

/// Where a numeric literal starting at `i` ends: digits with `_` separators, a fraction, an
/// exponent, or PostgreSQL 16's 0x/0o/0b forms. Letters right after a number are not part of
/// it: PostgreSQL 15 and later reject `1from`, and older versions read it as `1 from`, so it
/// must not hide a word.
fn number_end(b: &[u8], mut i: usize) -> usize {
    let digit_or_sep = |c: u8| c.is_ascii_digit() || c == b'_';
    if b[i] == b'0' && b.get(i + 1).is_some_and(|c| matches!(c, b'x' | b'X' | b'o' | b'O' | b'b' | b'B')) {
        i += 2;
        while i < b.len() && (b[i].is_ascii_hexdigit() || b[i] == b'_') {
            i += 1;
        }
        return i;
    }
    while i < b.len() && (digit_or_sep(b[i]) || b[i] == b'.') {
        i += 1;
    }
    if i < b.len() && matches!(b[i], b'e' | b'E') {
        let digits_at = if matches!(b.get(i + 1), Some(b'+' | b'-')) { i + 2 } else { i + 1 };
        if b.get(digits_at).is_some_and(u8::is_ascii_digit) {
            i = digits_at;
            while i < b.len() && digit_or_sep(b[i]) {
                i += 1;
            }
        }
    }
    i
}

/// Skips a single-quoted string body starting after the opening quote; returns the index after
/// the closing quote. Adjacent '' is an escaped quote; with `escapes`, so is \'.
fn skip_string(b: &[u8], mut i: usize, escapes: bool) -> Option<usize> {
    while i < b.len() {
        match b[i] {
            b'\\' if escapes => i += 2,
            b'\'' if b.get(i + 1) == Some(&b'\'') => i += 2,
            b'\'' => return Some(i + 1),
            _ => i += 1,
        }
    }
    None
}

fn quoted_ident(sql: &str, mut i: usize) -> Option<(String, usize)> {
    let b = sql.as_bytes();
    let mut out = String::new();
    let mut start = i;
    while i < b.len() {
        if b[i] == b'"' {
            out.push_str(&sql[start..i]);
            if b.get(i + 1) == Some(&b'"') {
                out.push('"');
                i += 2;
                start = i;
            } else {
                return Some((out, i + 1));
            }
        } else {
            i += 1;
        }
    }
    None
}

/// A U&"..." identifier starting at `start` (at the U), and the index after it. Without a
/// backslash in it, and with no UESCAPE anywhere in the text that could name another escape
/// character, it means just what "..." means; otherwise it is left unresolved.
fn unicode_ident<'a>(sql: &'a str, start: usize, uescape: &mut Option<bool>) -> Option<(Token<'a>, usize)> {
    let (name, end) = quoted_ident(sql, start + 3)?;
    let uescape = *uescape.get_or_insert_with(|| sql.as_bytes().windows(7).any(|w| w.eq_ignore_ascii_case(b"uescape")));
    if name.contains('\\') || uescape {
        Some((Token::UnicodeIdent(&sql[start..end]), end))
    } else {
        Some((Token::QuotedIdent(name), end))
    }
}

/// If a dollar-quote tag ($$ or $tag$) starts at `i`, the index just past it.
fn dollar_tag_end(b: &[u8], i: usize) -> Option<usize> {
    let mut j = i + 1;
    while j < b.len() && b[j] != b'$' {
        if !(b[j].is_ascii_alphanumeric() || b[j] == b'_' || b[j] >= 0x80) || (j == i + 1 && b[j].is_ascii_digit()) {
            return None;
        }
        j += 1;
    }
    (j < b.len()).then_some(j + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(sql: &str) -> Vec<String> {
        tokenize(sql).iter().filter_map(|t| t.ident()).collect()
    }

    #[test]
    fn comments_and_strings_hide_their_contents() {
        assert_eq!(words("SELECT /* now() */ 'random()' -- nextval(\n FROM t"), vec!["select", "from", "t"]);
        assert_eq!(words("select /* outer /* inner */ still */ 1"), vec!["select"]);
        assert_eq!(words("select 'it''s', E'a\\'b' x"), vec!["select", "x"]);
    }

    #[test]
    fn dollar_quotes_are_strings() {
        assert_eq!(words("select $$ delete from t $$, $fn$ x $y$ $fn$ z"), vec!["select", "z"]);
        assert_eq!(tokenize("select $1, $22")[1], Token::Param);
    }

    #[test]
    fn quoted_identifiers_keep_case_and_quotes() {
        let t = tokenize("select \"Now\"\"ish\" from \"T\"");
        assert_eq!(t[1], Token::QuotedIdent("Now\"ish".into()));
        assert_eq!(t[3].ident().unwrap(), "T");
    }

    #[test]
    fn unterminated_input_does_not_panic() {
        for sql in ["select 'abc", "select \"abc", "select /* abc", "select $x$ abc", "select E'\\"] {
            assert_eq!(tokenize(sql).last(), Some(&Token::Unterminated), "{sql}");
        }
    }

    #[test]
    fn splits_statements_at_top_level_semicolons() {
        let t = tokenize("set a = 1; select ';' ; ;select 2");
        let s = statements(&t);
        assert_eq!(s.len(), 3);
        assert!(s[1][0].is_word("select"));
    }

    #[test]
    fn spans_cover_each_token() {
        let sql = "EXECUTE \"My Stmt\" (1, 'a')";
        let t = tokenize_with_spans(sql);
        assert_eq!(&sql[t[0].1.clone()], "EXECUTE");
        assert_eq!(&sql[t[1].1.clone()], "\"My Stmt\"");
        assert_eq!(&sql[t[5].1.clone()], "'a'");
    }

    #[test]
    fn numbers_end_where_a_number_ends() {
        assert_eq!(
            tokenize("select 1from t"),
            [Token::Word("select"), Token::Number, Token::Word("from"), Token::Word("t")]
        );
        for n in ["1", "1.5", ".5", "1e10", "1.5E-3", "2e+7", "1_000", "0x1F", "0o17", "0b101"] {
            assert_eq!(tokenize(n), [Token::Number], "{n}");
        }
        assert_eq!(tokenize("1ex"), [Token::Number, Token::Word("ex")]);
    }

    #[test]
    fn backslashes_escape_in_plain_strings_only_when_asked() {
        let sql = r"select '\''; delete from t; --'";
        assert_eq!(tokenize(sql)[1..], [Token::Str(&sql[7..])], "one string, with a doubled quote in it");
        let off = tokenize_backslash_escapes(sql);
        assert!(off.iter().any(|t| t.is_word("delete")), "{off:?}");
        assert_eq!(tokenize_backslash_escapes(r"select 'a\b'"), [Token::Word("select"), Token::Str(r"'a\b'")]);
    }

    #[test]
    fn strings_keep_their_text_as_written() {
        let t = tokenize("select 'it''s', E'\\n', $q$ x $q$, U&'\\0041'");
        let strings: Vec<&Token<'_>> = t.iter().filter(|t| matches!(t, Token::Str(_))).collect();
        assert_eq!(
            strings,
            [&Token::Str("'it''s'"), &Token::Str("E'\\n'"), &Token::Str("$q$ x $q$"), &Token::Str("U&'\\0041'")]
        );
    }

    #[test]
    fn many_unicode_identifiers_lex_in_linear_time() {
        // 20,000 of them: a scan of the text per identifier took minutes (debug build).
        let sql = "select ".to_string() + &"U&\"a\", ".repeat(20_000) + "1";
        let started = std::time::Instant::now();
        assert_eq!(tokenize(&sql).len(), 2 + 2 * 20_000);
        assert!(started.elapsed() < std::time::Duration::from_secs(5), "{:?}", started.elapsed());
    }

    #[test]
    fn unicode_identifiers_are_resolved_only_when_nothing_is_escaped() {
        assert_eq!(tokenize(r#"update U&"c" set"#)[1], Token::QuotedIdent("c".into()));
        assert_eq!(tokenize(r#"update U&"\0063" set"#)[1], Token::UnicodeIdent(r#"U&"\0063""#));
        assert_eq!(tokenize(r#"update U&"!0063" UESCAPE '!' set"#)[1], Token::UnicodeIdent(r#"U&"!0063""#));
        assert_eq!(tokenize(r#"update U&"\0063" set"#)[1].ident(), None, "it names nothing known");
        assert_eq!(tokenize(r#"select U&"abc"#).last(), Some(&Token::Unterminated));
    }

    #[test]
    fn operators_and_casts() {
        let t = tokenize("select a::int<=b");
        assert!(t.contains(&Token::Punct("::")));
        assert!(t.contains(&Token::Punct("<=")));
    }
}
