//! SQL-level prepared statements: `PREPARE name [(types)] AS statement`, `EXECUTE name
//! [(args)]` and `DEALLOCATE [PREPARE] name | ALL`, recognised only when they are the whole
//! query, so pgwarp can keep them per client like protocol-level statements.

use super::lexer::{statements, tokenize_with_spans, Token};

#[derive(Debug, PartialEq, Eq)]
pub enum PreparedCommand<'a> {
    /// `types` is the parenthesised type list as written ("" when absent); `body` the statement.
    Prepare { name: String, types: &'a str, body: &'a str },
    /// `rest` is everything after the statement name (the argument list).
    Execute { name: String, rest: &'a str },
    /// `None` is DEALLOCATE ALL.
    Deallocate { name: Option<String> },
}

/// Recognises a query that is exactly one PREPARE, EXECUTE or DEALLOCATE.
pub fn parse(sql: &str) -> Option<PreparedCommand<'_>> {
    // Cheap pre-check before lexing.
    let head = sql.trim_start().as_bytes();
    let starts = |word: &str| head.get(..word.len()).is_some_and(|h| h.eq_ignore_ascii_case(word.as_bytes()));
    if !(starts("prepare") || starts("execute") || starts("deallocate")) {
        return None;
    }
    let spanned = tokenize_with_spans(sql);
    let tokens: Vec<Token<'_>> = spanned.iter().map(|(t, _)| t.clone()).collect();
    if statements(&tokens).len() != 1 || tokens.contains(&Token::Unterminated) {
        return None;
    }
    // Drop a trailing semicolon.
    let end = match spanned.last() {
        Some((t, r)) if t.is_punct(";") => r.start,
        _ => sql.len(),
    };
    let t = &spanned;
    if t[0].0.is_word("prepare") {
        let name = t.get(1)?.0.ident()?;
        let mut i = 2;
        let mut types = "";
        if t.get(i)?.0.is_punct("(") {
            let open = t[i].1.start;
            let mut depth = 0;
            loop {
                let tok = &t.get(i)?.0;
                if tok.is_punct("(") {
                    depth += 1;
                } else if tok.is_punct(")") {
                    depth -= 1;
                    if depth == 0 {
                        break;
                    }
                }
                i += 1;
            }
            types = &sql[open..t[i].1.end];
            i += 1;
        }
        if !t.get(i)?.0.is_word("as") {
            return None;
        }
        let body_start = t.get(i + 1)?.1.start;
        return Some(PreparedCommand::Prepare { name, types, body: sql[body_start..end].trim_end() });
    }
    if t[0].0.is_word("execute") {
        let (tok, span) = t.get(1)?;
        let name = tok.ident()?;
        return Some(PreparedCommand::Execute { name, rest: sql[span.end..end].trim_end() });
    }
    if t[0].0.is_word("deallocate") {
        let mut i = 1;
        if t.get(i).is_some_and(|(tok, _)| tok.is_word("prepare")) {
            i += 1;
        }
        let (tok, _) = t.get(i)?;
        if t.len() > i + 1 && !t[i + 1].0.is_punct(";") {
            return None;
        }
        if tok.is_word("all") {
            return Some(PreparedCommand::Deallocate { name: None });
        }
        return Some(PreparedCommand::Deallocate { name: Some(tok.ident()?) });
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prepare_with_and_without_types() {
        assert_eq!(
            parse("PREPARE q1 (int, text) AS SELECT $1, $2;"),
            Some(PreparedCommand::Prepare { name: "q1".into(), types: "(int, text)", body: "SELECT $1, $2" })
        );
        assert_eq!(
            parse("prepare \"Q\" as select 1 /* ; */"),
            Some(PreparedCommand::Prepare { name: "Q".into(), types: "", body: "select 1 /* ; */" })
        );
        assert_eq!(
            parse("PREPARE q (numeric(10, 2)) AS SELECT $1"),
            Some(PreparedCommand::Prepare { name: "q".into(), types: "(numeric(10, 2))", body: "SELECT $1" })
        );
    }

    #[test]
    fn execute_keeps_its_arguments() {
        assert_eq!(
            parse("EXECUTE Q1(1, 'a;b')"),
            Some(PreparedCommand::Execute { name: "q1".into(), rest: "(1, 'a;b')" })
        );
        assert_eq!(parse("execute q1"), Some(PreparedCommand::Execute { name: "q1".into(), rest: "" }));
    }

    #[test]
    fn deallocate_forms() {
        assert_eq!(parse("DEALLOCATE q1"), Some(PreparedCommand::Deallocate { name: Some("q1".into()) }));
        assert_eq!(parse("deallocate prepare q1;"), Some(PreparedCommand::Deallocate { name: Some("q1".into()) }));
        assert_eq!(parse("DEALLOCATE ALL"), Some(PreparedCommand::Deallocate { name: None }));
        assert_eq!(parse("DEALLOCATE PREPARE ALL"), Some(PreparedCommand::Deallocate { name: None }));
    }

    #[test]
    fn anything_else_is_left_alone() {
        assert_eq!(parse("SELECT 1"), None);
        assert_eq!(parse("PREPARE q AS SELECT 1; SELECT 2"), None);
        assert_eq!(parse("EXECUTE"), None);
        assert_eq!(parse("PREPARE q SELECT 1"), None);
        assert_eq!(parse("PREPARE q AS SELECT 'unterminated"), None);
        assert_eq!(parse("prepared_statements_table"), None);
    }
}
