//! Deciding from SQL text whether a statement is a cacheable read, and which tables a write
//! touches. Pure: it reads tokens from the lexer and a catalog snapshot from the origin.
//!
//! The rules are conservative. A read is cacheable only when it is a plain SELECT, VALUES or
//! TABLE; has no locking clause and no INTO; calls only functions that are IMMUTABLE in every
//! overload (per the origin's pg_proc); reads only ordinary tables the catalog knows; and uses
//! no system catalog and no now()-style SQL value function. Anything that might write and cannot
//! be pinned to tables counts as a write to the whole database.

use std::collections::{HashMap, HashSet};

use crate::sql::lexer::{statements, tokenize, tokenize_backslash_escapes, Token};

/// What the origin's catalogs say about names, loaded by `catalog`.
#[derive(Debug, Default, Clone)]
pub struct Catalog {
    /// Function name -> facts over all its overloads.
    pub functions: HashMap<String, FunctionFacts>,
    /// Relation name (any schema) -> whether every relation of that name is an ordinary or
    /// partitioned table.
    pub relations: HashMap<String, bool>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FunctionFacts {
    /// Every overload is IMMUTABLE.
    pub immutable: bool,
    /// Some overload is VOLATILE and user-defined (outside pg_catalog): it may write.
    pub may_write: bool,
}

/// Why a batch was not cached; doubles as a metric label.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Reason {
    Write,
    VolatileFunction,
    UnknownFunction,
    SystemCatalog,
    LockingClause,
    NotATable,
    UnknownRelation,
    NotARead,
    OptOut,
    InTransaction,
    CatalogLoading,
    Protocol,
    TooLarge,
    Error,
    /// Its tables are written so often that answers die before anyone reads them.
    WriteHot,
}

impl Reason {
    pub const ALL: [Reason; 15] = [
        Reason::Write,
        Reason::VolatileFunction,
        Reason::UnknownFunction,
        Reason::SystemCatalog,
        Reason::LockingClause,
        Reason::NotATable,
        Reason::UnknownRelation,
        Reason::NotARead,
        Reason::OptOut,
        Reason::InTransaction,
        Reason::CatalogLoading,
        Reason::Protocol,
        Reason::TooLarge,
        Reason::Error,
        Reason::WriteHot,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Reason::Write => "write",
            Reason::VolatileFunction => "volatile_function",
            Reason::UnknownFunction => "unknown_function",
            Reason::SystemCatalog => "system_catalog",
            Reason::LockingClause => "locking_clause",
            Reason::NotATable => "not_a_table",
            Reason::UnknownRelation => "unknown_relation",
            Reason::NotARead => "not_a_read",
            Reason::OptOut => "opt_out",
            Reason::InTransaction => "in_transaction",
            Reason::CatalogLoading => "catalog_loading",
            Reason::Protocol => "protocol",
            Reason::TooLarge => "too_large",
            Reason::Error => "error",
            Reason::WriteHot => "write_hot",
        }
    }
}

/// Tables a write touches.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WriteScope {
    Tables(Vec<String>),
    /// Could not be pinned to tables (DDL, procedures, user functions): everything in the
    /// database.
    Database,
}

impl WriteScope {
    /// What two writes touch together.
    pub fn merge(a: Option<WriteScope>, b: WriteScope) -> WriteScope {
        match (a, b) {
            (Some(WriteScope::Database), _) | (_, WriteScope::Database) => WriteScope::Database,
            (Some(WriteScope::Tables(mut a)), WriteScope::Tables(b)) => {
                a.extend(b);
                WriteScope::Tables(a)
            }
            (None, b) => b,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// A plain read of these tables (names lowercased unless quoted).
    Read {
        tables: Vec<String>,
    },
    /// Not cacheable, but writes nothing.
    Uncacheable(Reason),
    Write(WriteScope),
}

/// The leading comment that opts a query out of the cache.
pub const OPT_OUT: &str = "/* pgwarp:nocache */";

pub fn classify(sql: &str, catalog: &Catalog) -> Verdict {
    let verdict = classify_tokens(&tokenize(sql), opted_out(sql), catalog);
    if !may_read_two_ways(sql) {
        return verdict;
    }
    // With standard_conforming_strings off, a backslash escapes in plain strings too, and
    // `select '\''; delete from t; --'` hides a DELETE. The client may have turned it off, so
    // the SQL is taken to do whatever either reading does.
    let other = classify_tokens(&tokenize_backslash_escapes(sql), opted_out(sql), catalog);
    either(verdict, other)
}

/// Whether the SQL may tokenize differently under standard_conforming_strings off: it has a
/// backslash. [`shape`] does not capture that difference, so such SQL is classified by its text.
pub fn may_read_two_ways(sql: &str) -> bool {
    sql.as_bytes().contains(&b'\\')
}

/// What SQL does when it may be either of two things: a write if either writes, else not
/// cacheable if either is not, else a read of both sets of tables.
fn either(a: Verdict, b: Verdict) -> Verdict {
    if a == b {
        return a;
    }
    match (a, b) {
        (Verdict::Write(x), Verdict::Write(y)) => Verdict::Write(WriteScope::merge(Some(x), y)),
        (Verdict::Write(x), _) | (_, Verdict::Write(x)) => Verdict::Write(x),
        (Verdict::Uncacheable(r), _) | (_, Verdict::Uncacheable(r)) => Verdict::Uncacheable(r),
        (Verdict::Read { tables: mut a }, Verdict::Read { tables: b }) => {
            a.extend(b);
            a.sort();
            a.dedup();
            Verdict::Read { tables: a }
        }
    }
}

/// Whether the SQL opts out of the cache with a leading `/* pgwarp:nocache */`.
pub fn opted_out(sql: &str) -> bool {
    sql.trim_start().starts_with(OPT_OUT)
}

/// [`classify`] for SQL already tokenized. It depends on nothing else: not on the text between
/// tokens (comments, spacing) and not on the values of literals, which is what [`shape`] keeps.
pub fn classify_tokens(tokens: &[Token<'_>], opted_out: bool, catalog: &Catalog) -> Verdict {
    if tokens.contains(&Token::Unterminated) {
        return Verdict::Uncacheable(Reason::NotARead);
    }
    let mut tables: Vec<String> = Vec::new();
    let mut uncacheable = None;
    let mut write: Option<WriteScope> = None;
    for stmt in statements(tokens) {
        match classify_statement(stmt, catalog) {
            Verdict::Read { tables: t } => tables.extend(t),
            Verdict::Uncacheable(r) => uncacheable = uncacheable.or(Some(r)),
            Verdict::Write(scope) => write = Some(WriteScope::merge(write, scope)),
        }
    }
    if let Some(scope) = write {
        return Verdict::Write(scope);
    }
    if opted_out {
        return Verdict::Uncacheable(Reason::OptOut);
    }
    if let Some(r) = uncacheable {
        return Verdict::Uncacheable(r);
    }
    tables.sort();
    tables.dedup();
    Verdict::Read { tables }
}

/// Writes into `out` everything [`classify_tokens`] looks at: each token, with string and number
/// literals reduced to their kind, and whether the SQL opted out. Texts that differ only in
/// literal values, comments or spacing (`... WHERE id = 1`, `... WHERE id = 2`) have one shape
/// and so one verdict. Says whether there were literals. Unambiguous: contents are
/// length-prefixed.
pub fn shape(tokens: &[Token<'_>], opted_out: bool, out: &mut Vec<u8>) -> bool {
    fn put(out: &mut Vec<u8>, kind: u8, text: &str) {
        out.push(kind);
        out.extend_from_slice(&(text.len() as u32).to_le_bytes());
        out.extend_from_slice(text.as_bytes());
    }
    out.push(u8::from(opted_out));
    let mut literals = false;
    for t in tokens {
        match t {
            Token::Word(w) => put(out, b'w', w),
            Token::QuotedIdent(q) => put(out, b'q', q),
            Token::Punct(p) => put(out, b'o', p),
            Token::Str => {
                literals = true;
                out.push(b's');
            }
            Token::Number => {
                literals = true;
                out.push(b'n');
            }
            Token::Param => out.push(b'p'),
            Token::Unterminated => out.push(b'u'),
        }
    }
    literals
}

/// Words followed by "(" that are syntax, not function calls.
const NOT_FUNCTIONS: &[&str] = &[
    "in",
    "exists",
    "any",
    "all",
    "some",
    "values",
    "over",
    "filter",
    "within",
    "as",
    "from",
    "join",
    "on",
    "using",
    "where",
    "and",
    "or",
    "not",
    "select",
    "cast",
    "coalesce",
    "nullif",
    "greatest",
    "least",
    "row",
    "array",
    "lateral",
    "case",
    "when",
    "then",
    "else",
    "is",
    "distinct",
    "having",
    "by",
    "group",
    "order",
    "limit",
    "offset",
    "union",
    "intersect",
    "except",
    "with",
    "recursive",
    "like",
    "ilike",
    "similar",
    "between",
    "set",
    "table",
    "partition",
    "rows",
    "range",
    "groups",
    "window",
    "grouping",
    "cube",
    "rollup",
    "sets",
    "materialized",
    "only",
    "trim",
    "into",
    "returning",
    "fetch",
    "for",
    "of",
    "if",
];

/// SQL value functions and friends: not in pg_proc under these names, and never cacheable.
const VALUE_FUNCTIONS: &[&str] = &[
    "now",
    "current_date",
    "current_time",
    "current_timestamp",
    "localtime",
    "localtimestamp",
    "current_user",
    "session_user",
    "user",
    "current_role",
    "current_catalog",
    "current_schema",
    "system_user",
];

/// Commands that neither read table data nor write it.
const NEITHER: &[&str] = &[
    "begin",
    "start",
    "commit",
    "end",
    "rollback",
    "abort",
    "savepoint",
    "release",
    "set",
    "reset",
    "show",
    "listen",
    "unlisten",
    "notify",
    "discard",
    "deallocate",
    "prepare",
    "declare",
    "fetch",
    "move",
    "close",
    "checkpoint",
    "lock",
    "analyze",
    "explain",
    "load",
];

fn word(t: &Token<'_>) -> Option<String> {
    match t {
        Token::Word(w) => Some(w.to_ascii_lowercase()),
        _ => None,
    }
}

fn classify_statement(stmt: &[Token<'_>], catalog: &Catalog) -> Verdict {
    let start = stmt.iter().position(|t| !t.is_punct("(")).unwrap_or(0);
    let Some(first) = stmt.get(start).and_then(word) else {
        return Verdict::Uncacheable(Reason::NotARead);
    };
    match first.as_str() {
        "select" | "with" | "values" | "table" => classify_read(&stmt[start..], catalog, first == "with"),
        "insert" | "merge" => write_target(stmt, &["into"]),
        "update" => write_target(stmt, &["update"]),
        "delete" => write_target(stmt, &["from"]),
        "truncate" => truncate_targets(stmt),
        "copy" => {
            // COPY t FROM ... writes t; COPY ... TO reads and is not cached.
            if stmt.iter().any(|t| t.is_word("from")) && !stmt.get(1).is_some_and(|t| t.is_punct("(")) {
                write_target(stmt, &["copy"])
            } else {
                Verdict::Uncacheable(Reason::NotARead)
            }
        }
        "explain" if stmt.iter().any(|t| t.is_word("analyze")) => Verdict::Write(WriteScope::Database),
        w if NEITHER.contains(&w) => Verdict::Uncacheable(Reason::NotARead),
        // DDL, CALL, DO, GRANT, VACUUM, REFRESH, anything unknown: assume it changes anything.
        _ => Verdict::Write(WriteScope::Database),
    }
}

/// The relation named right after the first of `after` (skipping ONLY and a schema).
fn write_target(stmt: &[Token<'_>], after: &[&str]) -> Verdict {
    let Some(pos) = stmt.iter().position(|t| after.iter().any(|a| t.is_word(a))) else {
        return Verdict::Write(WriteScope::Database);
    };
    match relation_at(stmt, pos + 1) {
        Some((name, _)) => Verdict::Write(WriteScope::Tables(vec![name])),
        None => Verdict::Write(WriteScope::Database),
    }
}

fn truncate_targets(stmt: &[Token<'_>]) -> Verdict {
    let mut i = 1;
    if stmt.get(i).is_some_and(|t| t.is_word("table")) {
        i += 1;
    }
    let mut tables = Vec::new();
    while let Some((name, next)) = relation_at(stmt, i) {
        tables.push(name);
        i = next;
        if stmt.get(i).is_some_and(|t| t.is_punct("*")) {
            i += 1;
        }
        if !stmt.get(i).is_some_and(|t| t.is_punct(",")) {
            break;
        }
        i += 1;
    }
    if tables.is_empty() {
        Verdict::Write(WriteScope::Database)
    } else {
        Verdict::Write(WriteScope::Tables(tables))
    }
}

/// A possibly schema-qualified relation name starting at `i` (after an optional ONLY):
/// returns the unqualified name and the index after it.
fn relation_at(stmt: &[Token<'_>], mut i: usize) -> Option<(String, usize)> {
    if stmt.get(i).is_some_and(|t| t.is_word("only")) {
        i += 1;
    }
    let mut name = stmt.get(i)?.ident()?;
    i += 1;
    while stmt.get(i).is_some_and(|t| t.is_punct(".")) {
        name = stmt.get(i + 1)?.ident()?;
        i += 2;
    }
    Some((name, i))
}

fn classify_read(stmt: &[Token<'_>], catalog: &Catalog, with: bool) -> Verdict {
    // Data-modifying statements can only hide in WITH; elsewhere these words are columns or
    // locking clauses, which are not cached either.
    let dml = stmt.iter().any(|t| ["insert", "update", "delete", "merge"].iter().any(|k| t.is_word(k)));
    if with && dml {
        return Verdict::Write(WriteScope::Database);
    }
    if stmt.iter().any(|t| t.is_word("into")) {
        // SELECT ... INTO creates a table.
        return Verdict::Write(WriteScope::Database);
    }
    if dml || stmt.windows(2).any(|w| w[0].is_word("for") && ["share", "no", "key"].iter().any(|k| w[1].is_word(k))) {
        return Verdict::Uncacheable(Reason::LockingClause);
    }
    let ctes = cte_names(stmt);
    let mut tables = Vec::new();
    // Every name is looked at before answering: a function that may write decides the verdict
    // wherever it stands, so a volatile or unknown one before it must not end the scan.
    let mut uncacheable = None;
    for (i, t) in stmt.iter().enumerate() {
        let Some(name) = t.ident() else { continue };
        if matches!(t, Token::Word(_)) && VALUE_FUNCTIONS.contains(&name.as_str()) {
            uncacheable = uncacheable.or(Some(Reason::VolatileFunction));
        }
        if name.starts_with("pg_") || name == "information_schema" {
            uncacheable = uncacheable.or(Some(Reason::SystemCatalog));
        }
        let called = stmt.get(i + 1).is_some_and(|n| n.is_punct("("));
        let after_cast = i > 0 && (stmt[i - 1].is_punct("::") || stmt[i - 1].is_word("as"));
        if called && !after_cast && !(matches!(t, Token::Word(_)) && NOT_FUNCTIONS.contains(&name.as_str())) {
            match catalog.functions.get(&name) {
                None => uncacheable = uncacheable.or(Some(Reason::UnknownFunction)),
                Some(f) if f.may_write => return Verdict::Write(WriteScope::Database),
                Some(f) if !f.immutable => uncacheable = uncacheable.or(Some(Reason::VolatileFunction)),
                Some(_) => {}
            }
        }
    }
    if let Some(reason) = uncacheable {
        return Verdict::Uncacheable(reason);
    }
    // Relations: what follows FROM or JOIN (and commas in a FROM list), and TABLE t.
    let mut i = 0;
    while i < stmt.len() {
        let t = &stmt[i];
        if t.is_word("from") || t.is_word("join") || (i == 0 && t.is_word("table")) {
            let mut j = i + 1;
            loop {
                while stmt.get(j).is_some_and(|t| t.is_word("lateral")) {
                    j += 1;
                }
                if stmt.get(j).is_some_and(|t| t.is_punct("(")) {
                    break; // a subquery: its own FROM is seen in turn
                }
                let Some((name, next)) = relation_at(stmt, j) else { break };
                if stmt.get(next).is_some_and(|t| t.is_punct("(")) {
                    break; // a function in FROM, checked above
                }
                if !ctes.contains(&name) {
                    match catalog.relations.get(&name) {
                        Some(true) => tables.push(name),
                        Some(false) => return Verdict::Uncacheable(Reason::NotATable),
                        None => return Verdict::Uncacheable(Reason::UnknownRelation),
                    }
                }
                j = next;
                // An optional alias, then a comma continues the FROM list.
                if stmt.get(j).is_some_and(|t| t.is_word("as")) {
                    j += 1;
                }
                if stmt.get(j).is_some_and(|t| t.ident().is_some() && !is_clause_word(t)) {
                    j += 1;
                }
                if !t.is_word("from") || !stmt.get(j).is_some_and(|t| t.is_punct(",")) {
                    break;
                }
                j += 1;
            }
        }
        i += 1;
    }
    Verdict::Read { tables }
}

fn is_clause_word(t: &Token<'_>) -> bool {
    [
        "where",
        "join",
        "left",
        "right",
        "inner",
        "outer",
        "full",
        "cross",
        "natural",
        "on",
        "using",
        "group",
        "order",
        "limit",
        "offset",
        "union",
        "intersect",
        "except",
        "having",
        "window",
        "fetch",
        "for",
    ]
    .iter()
    .any(|k| t.is_word(k))
}

/// Names defined by WITH name AS (...) at any depth.
fn cte_names(stmt: &[Token<'_>]) -> HashSet<String> {
    let mut out = HashSet::new();
    for w in stmt.windows(3) {
        if w[1].is_word("as") && (w[2].is_punct("(") || w[2].is_word("materialized") || w[2].is_word("not")) {
            if let Some(name) = w[0].ident() {
                out.insert(name);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn catalog() -> Catalog {
        let mut c = Catalog::default();
        for (name, immutable, may_write) in [
            ("lower", true, false),
            ("abs", true, false),
            ("count", true, false),
            ("random", false, false),
            ("nextval", false, false),
            ("clock_timestamp", false, false),
            ("my_volatile", false, true),
            ("my_stable", false, false),
            ("extract", false, false),
            ("generate_series", true, false),
        ] {
            c.functions.insert(name.into(), FunctionFacts { immutable, may_write });
        }
        for (name, table) in [("users", true), ("orders", true), ("Mixed", true), ("user_view", false)] {
            c.relations.insert(name.into(), table);
        }
        c
    }

    fn v(sql: &str) -> Verdict {
        classify(sql, &catalog())
    }

    fn shape_of(sql: &str) -> (Vec<u8>, bool) {
        let mut out = Vec::new();
        let literals = shape(&tokenize(sql), opted_out(sql), &mut out);
        (out, literals)
    }

    #[test]
    fn shapes_ignore_literal_values_comments_and_spacing_only() {
        let base = shape_of("select * from users where id = 1 and name = 'a'");
        assert!(base.1, "it has literals");
        for same in [
            "select * from users where id = 22 and name = 'bob'",
            "select  *  from users /* note */ where id = 3.5 and name = E'x\\'y' -- end",
            "select * from users where id = 1e3 and name = $q$it's$q$",
        ] {
            assert_eq!(shape_of(same), base, "{same}");
        }
        for different in [
            "select * from orders where id = 1 and name = 'a'",
            "select * from users where id = $1 and name = 'a'",
            "select * from users where id = 1 and \"name\" = 'a'",
            "select * from users where id = random() and name = 'a'",
            "/* pgwarp:nocache */ select * from users where id = 1 and name = 'a'",
            "select * from users where id = 1 and name = 'a'; delete from users",
            "select * from users where id = 1 and name = 'a; delete from users'x",
        ] {
            assert_ne!(shape_of(different).0, base.0, "{different}");
        }
        assert!(!shape_of("select * from users where id = $1").1, "parameters are not literals");
    }

    #[test]
    fn texts_of_one_shape_have_one_verdict() {
        // What the shape memo relies on: classification reads nothing the shape leaves out.
        for (a, b) in [
            ("select * from users where id = 1", "select * from users where id = 2 -- x"),
            ("update users set name = 'a' where id = 1", "update users set name = 'zz' where id = 9"),
            ("select lower('A') from users", "select lower('B')   from users"),
            ("select * from users where id = 1 for update", "select * from users where id = 7 for update"),
        ] {
            assert_eq!(shape_of(a).0, shape_of(b).0);
            assert_eq!(v(a), v(b), "{a} / {b}");
        }
    }

    fn read(tables: &[&str]) -> Verdict {
        Verdict::Read { tables: tables.iter().map(|s| s.to_string()).collect() }
    }

    #[test]
    fn plain_reads_are_cacheable_with_their_tables() {
        assert_eq!(v("SELECT * FROM users WHERE id = $1"), read(&["users"]));
        assert_eq!(v("select u.name from public.users u join orders o on o.uid = u.id"), read(&["orders", "users"]));
        assert_eq!(v("SELECT a FROM users, orders AS o WHERE true"), read(&["orders", "users"]));
        assert_eq!(v("SELECT lower(name), count(*) FROM users GROUP BY 1"), read(&["users"]));
        assert_eq!(v("SELECT 1"), read(&[]));
        assert_eq!(v("VALUES (1), (2)"), read(&[]));
        assert_eq!(v("TABLE users"), read(&["users"]));
        assert_eq!(v("SELECT * FROM \"Mixed\""), read(&["Mixed"]));
        assert_eq!(v("WITH x AS (SELECT * FROM users) SELECT * FROM x"), read(&["users"]));
        assert_eq!(v("SELECT * FROM (SELECT id FROM orders) s"), read(&["orders"]));
        assert_eq!(v("SELECT $1::numeric(10, 2), CAST(1 AS varchar(3))"), read(&[]));
        assert_eq!(v("SELECT * FROM generate_series(1, 3)"), read(&[]));
    }

    #[test]
    fn comments_and_strings_neither_hide_nor_trigger_anything() {
        assert_eq!(v("SELECT 'random()', 'now()' /* nextval( */ FROM users -- delete"), read(&["users"]));
        assert_eq!(v("SELECT $$ update users set x = 1 $$"), read(&[]));
        assert_eq!(v("SELECT /* harmless */ random()"), Verdict::Uncacheable(Reason::VolatileFunction));
        assert_eq!(v("SELECT \"random\"() "), Verdict::Uncacheable(Reason::VolatileFunction));
    }

    #[test]
    fn volatile_unknown_and_value_functions_are_not_cached() {
        assert_eq!(v("SELECT random()"), Verdict::Uncacheable(Reason::VolatileFunction));
        assert_eq!(v("SELECT now()"), Verdict::Uncacheable(Reason::VolatileFunction));
        assert_eq!(v("SELECT current_timestamp"), Verdict::Uncacheable(Reason::VolatileFunction));
        assert_eq!(v("SELECT nextval('s')"), Verdict::Uncacheable(Reason::VolatileFunction));
        assert_eq!(v("SELECT my_stable(1) FROM users"), Verdict::Uncacheable(Reason::VolatileFunction));
        assert_eq!(v("SELECT extract(epoch from now())"), Verdict::Uncacheable(Reason::VolatileFunction));
        assert_eq!(v("SELECT mystery(1)"), Verdict::Uncacheable(Reason::UnknownFunction));
        assert_eq!(v("SELECT 1 WHERE abs(random()) > 0"), Verdict::Uncacheable(Reason::VolatileFunction));
    }

    #[test]
    fn locking_into_catalogs_views_and_unknown_relations_are_not_cached() {
        assert_eq!(v("SELECT * FROM users FOR UPDATE"), Verdict::Uncacheable(Reason::LockingClause));
        assert_eq!(v("SELECT * FROM users FOR NO KEY UPDATE"), Verdict::Uncacheable(Reason::LockingClause));
        assert_eq!(v("SELECT * FROM users FOR SHARE"), Verdict::Uncacheable(Reason::LockingClause));
        assert_eq!(v("SELECT * INTO copy FROM users"), Verdict::Write(WriteScope::Database));
        assert_eq!(v("SELECT * FROM pg_class"), Verdict::Uncacheable(Reason::SystemCatalog));
        assert_eq!(v("SELECT * FROM information_schema.tables"), Verdict::Uncacheable(Reason::SystemCatalog));
        assert_eq!(v("SELECT * FROM user_view"), Verdict::Uncacheable(Reason::NotATable));
        assert_eq!(v("SELECT * FROM temp_stuff"), Verdict::Uncacheable(Reason::UnknownRelation));
    }

    #[test]
    fn writes_name_their_tables() {
        let t = |names: &[&str]| Verdict::Write(WriteScope::Tables(names.iter().map(|s| s.to_string()).collect()));
        assert_eq!(v("INSERT INTO users VALUES (1)"), t(&["users"]));
        assert_eq!(v("insert into public.orders (a) select 1"), t(&["orders"]));
        assert_eq!(v("UPDATE ONLY users SET a = 1"), t(&["users"]));
        assert_eq!(v("DELETE FROM orders WHERE id = 1"), t(&["orders"]));
        assert_eq!(v("MERGE INTO users u USING orders o ON true WHEN MATCHED THEN DELETE"), t(&["users"]));
        assert_eq!(v("TRUNCATE users, public.orders"), t(&["users", "orders"]));
        assert_eq!(v("COPY users FROM STDIN"), t(&["users"]));
        assert_eq!(v("COPY users TO STDOUT"), Verdict::Uncacheable(Reason::NotARead));
        assert_eq!(v("SELECT 1; UPDATE users SET a = 1"), t(&["users"]));
    }

    #[test]
    fn writes_that_cannot_be_attributed_hit_the_whole_database() {
        let db = Verdict::Write(WriteScope::Database);
        assert_eq!(v("WITH d AS (DELETE FROM users RETURNING *) SELECT * FROM d"), db);
        assert_eq!(v("ALTER TABLE users ADD COLUMN b int"), db);
        assert_eq!(v("CREATE TABLE t (a int)"), db);
        assert_eq!(v("CALL do_things()"), db);
        assert_eq!(v("SELECT my_volatile()"), db);
        assert_eq!(v("EXPLAIN ANALYZE DELETE FROM users"), db);
    }

    #[test]
    fn commands_that_neither_read_nor_write() {
        for sql in ["BEGIN", "COMMIT", "SET search_path = x", "SHOW TimeZone", "LISTEN c", "EXPLAIN SELECT 1"] {
            assert_eq!(v(sql), Verdict::Uncacheable(Reason::NotARead), "{sql}");
        }
    }

    #[test]
    fn sql_that_reads_two_ways_does_what_either_reading_does() {
        // With standard_conforming_strings off this deletes; with it on it reads two strings.
        assert!(matches!(v(r"select '\''; delete from users; --'"), Verdict::Write(_)));
        // Reads either way: it depends on the tables of both.
        assert_eq!(v(r"select '\''; select * from orders; --' from users"), read(&["orders", "users"]));
        assert_eq!(v(r"select 'a\b' from users"), read(&["users"]));
        assert_eq!(v(r"select E'a\'b' from users"), read(&["users"]));
    }

    #[test]
    fn a_number_does_not_hide_the_word_after_it() {
        // PostgreSQL 14 and older run `select 1from users` as `select 1 from users`.
        assert_eq!(v("select 1from users"), read(&["users"]));
    }

    #[test]
    fn a_writing_function_counts_wherever_it_stands() {
        for sql in [
            "SELECT random(), my_volatile(1) FROM users",
            "SELECT mystery(1), my_volatile(2)",
            "SELECT now(), my_volatile(3)",
            "SELECT pg_sleep(0), my_volatile(4)",
            "SELECT my_volatile(5), random()",
        ] {
            assert_eq!(v(sql), Verdict::Write(WriteScope::Database), "{sql}");
        }
        // Without one, the first reason found is the reason.
        assert_eq!(v("SELECT random(), mystery(1)"), Verdict::Uncacheable(Reason::VolatileFunction));
        assert_eq!(v("SELECT mystery(1), random()"), Verdict::Uncacheable(Reason::UnknownFunction));
    }

    #[test]
    fn leading_comment_opts_out() {
        assert_eq!(v("/* pgwarp:nocache */ SELECT * FROM users"), Verdict::Uncacheable(Reason::OptOut));
        assert_eq!(v("SELECT * FROM users /* pgwarp:nocache */"), read(&["users"]));
    }
}
