//! Deciding from SQL text whether a statement is a cacheable read, and which tables a write
//! touches. Pure: it reads tokens from the lexer and a catalog snapshot from the origin.
//!
//! The rules are conservative. A read is cacheable only when it is a plain SELECT, VALUES or
//! TABLE; has no locking clause and no INTO; runs only code that is IMMUTABLE (functions in
//! every overload per the origin's pg_proc, user-defined operators and casts, aggregates'
//! support functions); reads only ordinary tables the catalog knows; and uses no system
//! catalog, no now()-style SQL value function and no 'now'-style literal. Anything that might
//! write and cannot be pinned to tables counts as a write to every table of the database.

use std::collections::HashSet;

pub use super::catalog::{Catalog, FunctionFacts, Relation};
use crate::sql::lexer::{statements, tokenize, tokenize_backslash_escapes, Token};

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
    /// Could not be pinned to tables, but changes no catalog (a write through a view, to a
    /// table with triggers or rules, to a table the catalog does not know): every table of
    /// the database. The catalog snapshot stays, so writes to temporary tables do not keep it
    /// from ever loading.
    AllTables,
    /// Runs user code that may write (a VOLATILE function, operator or cast): every table, and
    /// the session's settings may have changed (`set_config` inside a "set tenant" function).
    /// The catalog snapshot stays: code that runs DDL is rare, and the snapshot is reloaded
    /// within a minute anyway, while reloading it at every such call would keep the cache
    /// from ever having one.
    Code,
    /// May change what names mean as well (DDL, procedures, two-phase commit): every table,
    /// and the catalog snapshot is reloaded.
    Database,
}

impl WriteScope {
    /// What two writes touch together.
    pub fn merge(a: Option<WriteScope>, b: WriteScope) -> WriteScope {
        match (a, b) {
            (Some(WriteScope::Database), _) | (_, WriteScope::Database) => WriteScope::Database,
            (Some(WriteScope::Code), _) | (_, WriteScope::Code) => WriteScope::Code,
            (Some(WriteScope::AllTables), _) | (_, WriteScope::AllTables) => WriteScope::AllTables,
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
            Token::UnicodeIdent(u) => put(out, b'U', u),
            Token::Punct(p) => put(out, b'o', p),
            // Whether a literal may spell a moving time is all classification reads of it.
            Token::Str(s) => {
                literals = true;
                out.push(if moving_time(s) { b't' } else { b's' });
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
    "analyse",
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
        "insert" | "merge" => write_target(stmt, &["into"], catalog),
        "update" => write_target(stmt, &["update"], catalog),
        "delete" => write_target(stmt, &["from"], catalog),
        "truncate" => truncate_targets(stmt, catalog),
        "copy" => {
            // COPY t FROM ... writes t; COPY ... TO reads and is not cached.
            if stmt.iter().any(|t| t.is_word("from")) && !stmt.get(1).is_some_and(|t| t.is_punct("(")) {
                write_target(stmt, &["copy"], catalog)
            } else {
                Verdict::Uncacheable(Reason::NotARead)
            }
        }
        "explain" => explain(stmt, catalog),
        "declare" => declare(stmt, catalog),
        // Two-phase commit: COMMIT PREPARED makes visible what a transaction did, DDL
        // included, long after its statements went by.
        "commit" | "rollback" if stmt.get(1).is_some_and(|t| t.is_word("prepared")) => {
            Verdict::Write(WriteScope::Database)
        }
        "prepare" if stmt.get(1).is_some_and(|t| t.is_word("transaction")) => Verdict::Write(WriteScope::Database),
        w if NEITHER.contains(&w) => Verdict::Uncacheable(Reason::NotARead),
        // DDL, CALL, DO, GRANT, VACUUM, REFRESH, anything unknown: assume it changes anything.
        _ => Verdict::Write(WriteScope::Database),
    }
}

/// EXPLAIN runs its statement only with ANALYZE (or ANALYSE, in any option form): then it
/// does what the statement does, and is never cached itself.
fn explain(stmt: &[Token<'_>], catalog: &Catalog) -> Verdict {
    if !stmt.iter().any(|t| t.is_word("analyze") || t.is_word("analyse")) {
        return Verdict::Uncacheable(Reason::NotARead);
    }
    let starts = ["select", "with", "values", "table", "insert", "update", "delete", "merge", "execute", "create"];
    match stmt.iter().position(|t| starts.iter().any(|w| t.is_word(w))) {
        Some(i) => not_cached(classify_statement(&stmt[i..], catalog)),
        None => Verdict::Write(WriteScope::Database),
    }
}

/// DECLARE ... CURSOR ... FOR query runs the query as it is fetched: it does what the query
/// does, and is never cached itself.
fn declare(stmt: &[Token<'_>], catalog: &Catalog) -> Verdict {
    let cursor = stmt.iter().position(|t| t.is_word("cursor")).unwrap_or(0);
    match stmt.iter().skip(cursor).position(|t| t.is_word("for")) {
        Some(i) if cursor + i + 1 < stmt.len() => not_cached(classify_statement(&stmt[cursor + i + 1..], catalog)),
        _ => Verdict::Write(WriteScope::Database),
    }
}

/// A verdict for a statement that runs another: its writes, but never a cacheable read.
fn not_cached(inner: Verdict) -> Verdict {
    match inner {
        Verdict::Write(scope) => Verdict::Write(scope),
        _ => Verdict::Uncacheable(Reason::NotARead),
    }
}

/// The relation named right after the first of `after` (skipping ONLY and a schema), with
/// every table a write to it may change, and whatever the code it runs may write.
fn write_target(stmt: &[Token<'_>], after: &[&str], catalog: &Catalog) -> Verdict {
    let target = stmt
        .iter()
        .position(|t| after.iter().any(|a| t.is_word(a)))
        .and_then(|pos| relation_at(stmt, pos + 1))
        .map(|(name, _)| vec![name]);
    // The view's rule calls set_config: `UPDATE pg_settings SET setting = ...` is a SET.
    if target.as_ref().is_some_and(|t| t[0] == "pg_settings") {
        return Verdict::Write(WriteScope::Code);
    }
    written(stmt, target, false, catalog)
}

/// What a write statement touches: `targets` and every table a write to them reaches, or
/// every table when that cannot be told (no target found, an unresolved U&"..." name, a
/// target that is a view or has triggers or rules); everything code may write when it calls
/// code that may write.
fn written(stmt: &[Token<'_>], targets: Option<Vec<String>>, truncate_cascade: bool, catalog: &Catalog) -> Verdict {
    if code_effects(stmt, catalog).writes {
        return Verdict::Write(WriteScope::Code);
    }
    let reach = targets.and_then(|t| catalog.write_reach(&t, truncate_cascade));
    Verdict::Write(reach.map_or(WriteScope::AllTables, WriteScope::Tables))
}

fn truncate_targets(stmt: &[Token<'_>], catalog: &Catalog) -> Verdict {
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
    let cascade = stmt.iter().skip(i).any(|t| t.is_word("cascade"));
    written(stmt, (!tables.is_empty()).then_some(tables), cascade, catalog)
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
    let code = code_effects(stmt, catalog);
    if code.writes {
        return Verdict::Write(WriteScope::Code);
    }
    if let Some(reason) = code.uncacheable {
        return Verdict::Uncacheable(reason);
    }
    match read_tables(stmt, catalog) {
        Ok(tables) => Verdict::Read { tables },
        Err(reason) => Verdict::Uncacheable(reason),
    }
}

/// What the code a statement runs may do, as far as its text shows.
#[derive(Debug, Default)]
struct CodeEffects {
    /// It calls something that may write: a user function, aggregate, operator or cast.
    writes: bool,
    /// Why its answer must not be cached (the first reason found), if it writes nothing.
    uncacheable: Option<Reason>,
}

impl CodeEffects {
    fn note(&mut self, facts: FunctionFacts) {
        self.writes |= facts.may_write;
        if !facts.immutable {
            self.uncacheable = self.uncacheable.or(Some(Reason::VolatileFunction));
        }
    }

    fn because(&mut self, reason: Reason) {
        self.uncacheable = self.uncacheable.or(Some(reason));
    }
}

/// Looks at every name, operator and literal: something that may write decides the verdict
/// wherever it stands, so a volatile or unknown one before it must not end the scan.
fn code_effects(stmt: &[Token<'_>], catalog: &Catalog) -> CodeEffects {
    let mut code = CodeEffects::default();
    if let Some(facts) = catalog.implicit_casts {
        code.note(facts);
    }
    for (i, t) in stmt.iter().enumerate() {
        let called = stmt.get(i + 1).is_some_and(|n| n.is_punct("("));
        match t {
            Token::Str(s) => {
                // A U&'...' UESCAPE '!' string may spell anything.
                let uescape = stmt.get(i + 1).is_some_and(|n| n.is_word("uescape"));
                if moving_time(s) || uescape {
                    code.because(Reason::VolatileFunction);
                }
            }
            Token::Punct(p) => {
                // The lexer keeps a run of operator characters whole (`=-`, `#+#-`), so any
                // operator within it may be the one that runs.
                for (_, facts) in catalog.operators.iter().filter(|(name, _)| p.contains(name.as_str())) {
                    code.note(*facts);
                }
            }
            // Unresolved: a call may reach any function, a name any relation.
            Token::UnicodeIdent(_) if called => code.writes = true,
            Token::UnicodeIdent(_) => code.because(Reason::UnknownRelation),
            _ => {}
        }
        let Some(name) = t.ident() else { continue };
        let bare = matches!(t, Token::Word(_));
        if bare && VALUE_FUNCTIONS.contains(&name.as_str()) {
            code.because(Reason::VolatileFunction);
        }
        if name.starts_with("pg_") || name == "information_schema" {
            code.because(Reason::SystemCatalog);
        }
        // Coarse: a name that is the target type of a non-immutable user cast counts as
        // running the cast wherever it stands (`x::t`, CAST(x AS t), t 'literal', or a column
        // that happens to share the name).
        if !catalog.casts.is_empty() {
            for facts in type_spellings(&name).filter_map(|t| catalog.casts.get(t)) {
                code.note(*facts);
            }
        }
        // Attribute notation: `row.f` and `(row).f` call f(row).
        if !called && i > 0 && stmt[i - 1].is_punct(".") {
            if let Some(facts) = catalog.attribute_functions.get(&name) {
                code.note(*facts);
            }
        }
        let after_cast = i > 0 && (stmt[i - 1].is_punct("::") || stmt[i - 1].is_word("as"));
        if called && !after_cast && is_call(stmt, i, &name, catalog) {
            match catalog.functions.get(&name) {
                None => code.because(Reason::UnknownFunction),
                Some(f) => code.note(*f),
            }
        }
    }
    code
}

/// Whether `name(` at `i` calls a function rather than being syntax such as `IN (` or
/// `FILTER (`. A keyword is still taken as a call when a function of that name is not
/// IMMUTABLE (a user's `filter(int)`), and a schema-qualified name always is.
fn is_call(stmt: &[Token<'_>], i: usize, name: &str, catalog: &Catalog) -> bool {
    let keyword = matches!(stmt[i], Token::Word(_)) && NOT_FUNCTIONS.contains(&name);
    let qualified = i > 0 && stmt[i - 1].is_punct(".");
    !keyword || qualified || catalog.functions.get(name).is_some_and(|f| !f.immutable)
}

/// The names a type may be written as, for the few built-in types with SQL spellings of
/// their own (a user cast to a built-in type is rare, but must not hide behind `integer`).
fn type_spellings(name: &str) -> impl Iterator<Item = &str> {
    const ALIASES: &[(&str, &str)] = &[
        ("int", "int4"),
        ("integer", "int4"),
        ("smallint", "int2"),
        ("bigint", "int8"),
        ("real", "float4"),
        ("double", "float8"),
        ("float", "float8"),
        ("boolean", "bool"),
        ("decimal", "numeric"),
        ("char", "bpchar"),
        ("character", "bpchar"),
        ("character", "varchar"),
        ("varying", "varchar"),
        ("timestamp", "timestamptz"),
        ("time", "timetz"),
    ];
    std::iter::once(name).chain(ALIASES.iter().filter(move |(alias, _)| *alias == name).map(|(_, t)| *t))
}

/// Whether a string literal (as written) may spell a moving time: now, today, tomorrow or
/// yesterday as a whole word anywhere in it ('today 12:00', '00:00 tomorrow', '"now"'; see
/// `key::reads_the_clock`). A backslash may be an escape (E'...', U&'...', or any string read
/// with standard_conforming_strings off): read both as written and with escapes undone, and a
/// numeric escape (`\\156`, `\\x6e`, `\\u006e`), which may spell anything, counts as one.
fn moving_time(literal: &str) -> bool {
    let body = literal_body(literal).as_bytes();
    if super::key::reads_the_clock(body) {
        return true;
    }
    if !body.contains(&b'\\') {
        return false;
    }
    let mut unescaped = Vec::with_capacity(body.len());
    let mut rest = body.iter();
    while let Some(&c) = rest.next() {
        if c != b'\\' {
            unescaped.push(c);
            continue;
        }
        match rest.next() {
            Some(d) if d.is_ascii_digit() || b"xXuU+".contains(d) => return true,
            // \t, \n and the like are white space: they end a word.
            Some(d) if b"tnrfbv".contains(d) => unescaped.push(b' '),
            Some(&d) => unescaped.push(d),
            None => {}
        }
    }
    super::key::reads_the_clock(&unescaped)
}

/// A string literal's content, without its prefix and quotes (escapes left as written).
fn literal_body(literal: &str) -> &str {
    if let Some(rest) = literal.strip_prefix('$') {
        let tag_len = rest.find('$').map_or(0, |i| i + 2);
        return literal.get(tag_len..literal.len().saturating_sub(tag_len)).unwrap_or("");
    }
    let open = literal.find('\'').map_or(0, |i| i + 1);
    literal.get(open..literal.len().saturating_sub(1)).unwrap_or("")
}

/// The tables a read depends on. Every identifier that names a relation the catalog knows
/// counts, wherever it stands (a column or alias that shares a table's name costs only an
/// extra invalidation): no form of FROM list can hide a table. What the catalog does not know
/// cannot be found that way, so the names where a relation must stand are checked as well,
/// and a FROM list that reads in a way not understood is taken to name something unknown.
fn read_tables(stmt: &[Token<'_>], catalog: &Catalog) -> Result<Vec<String>, Reason> {
    let ctes = cte_names(stmt);
    let mut tables = Vec::new();
    let mut names: Vec<String> = stmt.iter().filter_map(Token::ident).collect();
    let mut i = 0;
    while i < names.len() {
        let name = &names[i];
        match catalog.relations.get(name) {
            Some(r) if r.table => {
                // What the table's row-level security policies read is read too.
                let policy_reads = catalog.policy_reads.get(name).cloned().unwrap_or_default();
                tables.push(name.clone());
                for other in policy_reads {
                    if !names.contains(&other) {
                        names.push(other);
                    }
                }
            }
            Some(_) => return Err(Reason::NotATable),
            None => {}
        }
        i += 1;
    }
    for name in relation_positions(stmt).ok_or(Reason::UnknownRelation)? {
        if !ctes.contains(&name) && !catalog.relations.contains_key(&name) {
            return Err(Reason::UnknownRelation);
        }
    }
    Ok(tables)
}

/// One level of parentheses (or brackets) while reading FROM lists.
#[derive(Clone, Copy, Debug, Default)]
struct Level {
    /// It holds a query (its FROM starts a FROM list), not an argument list or expression.
    query: bool,
    /// Inside a FROM list: a comma or JOIN is followed by another item.
    from_list: bool,
    /// The next token starts a FROM item.
    expect_item: bool,
}

/// The names standing where a relation must: FROM items (after FROM, JOIN, a FROM list's
/// comma, `(` of a parenthesised join, ONLY, LATERAL), and TABLE's name. None when a FROM item
/// does not read as a name, a function call, or a parenthesis.
fn relation_positions(stmt: &[Token<'_>]) -> Option<Vec<String>> {
    let mut names = Vec::new();
    let mut levels = vec![Level { query: true, ..Level::default() }];
    let mut i = 0;
    while i < stmt.len() {
        let t = &stmt[i];
        let prev = i.checked_sub(1).map(|p| &stmt[p]);
        let level = levels.last_mut()?;
        if level.expect_item {
            level.expect_item = false;
            if t.is_word("only") || t.is_word("lateral") {
                level.expect_item = true;
            } else if t.is_word("rows") && stmt.get(i + 1).is_some_and(|n| n.is_word("from")) {
                // ROWS FROM (f(), g()): a list of function calls.
                i += 1;
                level.expect_item = true;
            } else if t.is_punct("(") {
                let query = starts_query(stmt.get(i + 1));
                levels.push(Level { query, from_list: !query, expect_item: !query });
            } else {
                let (name, next) = relation_at(stmt, i)?;
                if !stmt.get(next).is_some_and(|n| n.is_punct("(")) {
                    names.push(name);
                }
                i = next;
                continue;
            }
            i += 1;
            continue;
        }
        if t.is_punct("(") || t.is_punct("[") {
            levels.push(Level { query: t.is_punct("(") && starts_query(stmt.get(i + 1)), ..Level::default() });
        } else if t.is_punct(")") || t.is_punct("]") {
            if levels.len() > 1 {
                levels.pop();
            }
        } else if level.query && t.is_word("from") && !prev.is_some_and(|p| p.is_word("distinct")) {
            // IS [NOT] DISTINCT FROM compares; FROM in extract(...) is in an argument list.
            level.from_list = true;
            level.expect_item = true;
        } else if level.query && t.is_word("table") && prev.is_none_or(|p| starts_operand(p)) {
            level.from_list = false;
            level.expect_item = true;
        } else if level.from_list && (t.is_word("join") || t.is_punct(",")) {
            level.expect_item = true;
        } else if is_clause_word(t) || t.is_word("select") || t.is_word("values") {
            level.from_list = false;
        }
        i += 1;
    }
    Some(names)
}

/// Whether a parenthesis that `next` follows holds a query.
fn starts_query(next: Option<&Token<'_>>) -> bool {
    next.is_some_and(|n| ["select", "with", "values", "table"].iter().any(|w| n.is_word(w)))
}

/// Whether `TABLE` after this token is the TABLE command (a query of its own).
fn starts_operand(prev: &Token<'_>) -> bool {
    prev.is_punct("(") || ["union", "intersect", "except", "all", "distinct"].iter().any(|w| prev.is_word(w))
}

/// Words that end a FROM list.
fn is_clause_word(t: &Token<'_>) -> bool {
    [
        "where",
        "group",
        "having",
        "window",
        "order",
        "limit",
        "offset",
        "fetch",
        "for",
        "union",
        "intersect",
        "except",
        "returning",
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
            c.relations.insert(name.into(), Relation { table, opaque_writes: !table });
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
        assert_eq!(v("SELECT 'random()', 'nextval()' /* now( */ FROM users -- delete"), read(&["users"]));
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
        assert_eq!(v("TRUNCATE users, public.orders"), t(&["orders", "users"]));
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
        // User code that may write: every table, and the catalog stays.
        let code = Verdict::Write(WriteScope::Code);
        assert_eq!(v("SELECT my_volatile()"), code);
        assert_eq!(v("SELECT public.my_volatile('a')"), code);
        assert_eq!(v("SELECT \"public\".\"my_volatile\"('a')"), code);
        assert_eq!(v("UPDATE users SET a = my_volatile()"), code);
        assert_eq!(v("UPDATE pg_catalog.pg_settings SET setting = '8MB' WHERE name = 'work_mem'"), code);
        assert_eq!(v("EXPLAIN ANALYZE DELETE FROM users"), Verdict::Write(WriteScope::Tables(vec!["users".into()])));
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
            assert_eq!(v(sql), Verdict::Write(WriteScope::Code), "{sql}");
        }
        // Without one, the first reason found is the reason.
        assert_eq!(v("SELECT random(), mystery(1)"), Verdict::Uncacheable(Reason::VolatileFunction));
        assert_eq!(v("SELECT mystery(1), random()"), Verdict::Uncacheable(Reason::UnknownFunction));
    }

    fn holes_catalog() -> Catalog {
        let mut c = catalog();
        let writes = FunctionFacts { immutable: false, may_write: true };
        let stable = FunctionFacts { immutable: false, may_write: false };
        c.functions.insert("filter".into(), writes);
        c.functions.insert("logged_sum".into(), writes);
        c.functions.insert("like".into(), FunctionFacts { immutable: true, may_write: false });
        c.functions.insert("substring".into(), FunctionFacts { immutable: true, may_write: false });
        c.operators.insert("#+#".into(), writes);
        c.operators.insert("@@@".into(), stable);
        c.casts.insert("mytype".into(), stable);
        c.casts.insert("int4".into(), writes);
        for t in ["a", "b", "c", "m", "m_1", "parent", "child", "audited"] {
            c.relations.insert(t.into(), Relation { table: true, opaque_writes: t == "audited" });
        }
        c.relations.insert("clock".into(), Relation { table: false, opaque_writes: true });
        c.add_inheritance("m_1", "m");
        c.add_foreign_key("child", "parent", true);
        c
    }

    fn h(sql: &str) -> Verdict {
        classify(sql, &holes_catalog())
    }

    fn tables(names: &[&str]) -> Verdict {
        Verdict::Write(WriteScope::Tables(names.iter().map(|s| s.to_string()).collect()))
    }

    #[test]
    fn operators_casts_and_aggregates_run_their_functions() {
        let db = Verdict::Write(WriteScope::Code);
        assert_eq!(h("SELECT 1 #+# 2"), db);
        assert_eq!(h("SELECT 1 OPERATOR(public.#+#) 2"), db);
        // The lexer reads `#+#-` as one run of operator characters.
        assert_eq!(h("SELECT 1 #+#-2"), db);
        assert_eq!(h("SELECT a @@@ b FROM a"), Verdict::Uncacheable(Reason::VolatileFunction));
        assert_eq!(h("SELECT logged_sum(x) FROM a"), db);
        assert_eq!(h("SELECT x::mytype FROM a"), Verdict::Uncacheable(Reason::VolatileFunction));
        assert_eq!(h("SELECT CAST(x AS public.mytype) FROM a"), Verdict::Uncacheable(Reason::VolatileFunction));
        assert_eq!(h("SELECT x::integer FROM a"), db, "a built-in type under its SQL name");
        assert_eq!(h("SELECT x::text, 1 + 2 FROM a"), Verdict::Read { tables: vec!["a".into()] });
        // In a write, code that may write widens it to everything code may write.
        assert_eq!(h("INSERT INTO a VALUES (1 #+# 2)"), db);
        let mut implicit = holes_catalog();
        implicit.implicit_casts = Some(FunctionFacts { immutable: false, may_write: false });
        assert_eq!(classify("SELECT 1", &implicit), Verdict::Uncacheable(Reason::VolatileFunction));
    }

    #[test]
    fn a_function_named_like_a_keyword_is_a_call_when_it_is_not_immutable() {
        assert_eq!(h("SELECT filter(7)"), Verdict::Write(WriteScope::Code));
        assert_eq!(h("SELECT public.filter(7)"), Verdict::Write(WriteScope::Code));
        assert_eq!(v("SELECT count(*) FILTER (WHERE true) FROM users"), read(&["users"]), "no such function");
        // An immutable function of a keyword's name changes nothing.
        assert_eq!(h("SELECT 1 FROM a WHERE 'x' like ('y')"), Verdict::Read { tables: vec!["a".into()] });
    }

    #[test]
    fn literals_that_spell_a_moving_time_are_not_cached() {
        for sql in [
            "SELECT 'now'::timestamptz",
            "SELECT ' Today 12:00'::timestamp",
            "SELECT date 'tomorrow'",
            "SELECT * FROM users WHERE d > 'YESTERDAY'",
            "SELECT $$now$$::date",
            "SELECT E'\\156ow'::date",
            "SELECT E'no\\w'::date",
            "SELECT U&'now'::date",
            "SELECT U&'!006eow' UESCAPE '!'",
        ] {
            assert_eq!(v(sql), Verdict::Uncacheable(Reason::VolatileFunction), "{sql}");
        }
        for sql in ["SELECT '00:00 today'::timestamp", "SELECT '\"now\"'::timestamptz", "SELECT E'\\'now'"] {
            assert_eq!(v(sql), Verdict::Uncacheable(Reason::VolatileFunction), "{sql}");
        }
        for sql in ["SELECT 'nowhere' FROM users", "SELECT 'snow', 'a\\b', 'knowing' FROM users"] {
            assert_eq!(v(sql), read(&["users"]), "{sql}");
        }
        assert_ne!(shape_of("SELECT 'now'::date").0, shape_of("SELECT 'abc'::date").0);
    }

    #[test]
    fn writes_reach_relatives_and_cascades() {
        assert_eq!(h("UPDATE m_1 SET v = 1"), tables(&["m", "m_1"]));
        assert_eq!(h("UPDATE m SET v = 1"), tables(&["m", "m_1"]));
        assert_eq!(h("DELETE FROM parent WHERE id = 1"), tables(&["child", "parent"]));
        assert_eq!(h("TRUNCATE parent CASCADE"), tables(&["child", "parent"]));
        assert_eq!(h("TRUNCATE child"), tables(&["child"]));
        let all = Verdict::Write(WriteScope::AllTables);
        assert_eq!(h("INSERT INTO audited VALUES (1)"), all, "a trigger may write anywhere");
        assert_eq!(h("UPDATE clock SET t = 1"), all, "a view writes through its base tables");
        assert_eq!(h("DELETE FROM temp_stuff"), all, "not a table the catalog knows");
        assert_eq!(h(r#"UPDATE U&"\0063" SET v = 1"#), all, "a name that is not resolved");
        assert_eq!(h(r#"UPDATE U&"c" SET v = 1"#), tables(&["c"]), "nothing escaped: plainly c");
    }

    #[test]
    fn every_known_table_named_anywhere_is_read() {
        for (sql, names) in [
            ("SELECT c.v FROM a JOIN b ON a.id = b.id, c WHERE c.id = a.id", &["a", "b", "c"][..]),
            ("SELECT c.v FROM (c JOIN b ON c.id = b.id)", &["b", "c"]),
            ("SELECT c.v FROM a AS x(i), c", &["a", "c"]),
            ("SELECT 0, 'x' UNION ALL TABLE c ORDER BY 1 DESC LIMIT 1", &["c"]),
            ("SELECT v FROM ONLY (c)", &["c"]),
            ("SELECT c.v FROM generate_series(1, ARRAY[1]) g, c", &["c"]),
            ("SELECT c.v FROM (SELECT 1) s, c", &["c"]),
            ("SELECT * FROM a WHERE a.id IN (SELECT id FROM b) AND a.x IS DISTINCT FROM 1", &["a", "b"]),
            ("SELECT substring(a.t FROM 2) FROM a", &["a"]),
            ("SELECT * FROM ROWS FROM (generate_series(1, 2), generate_series(3, 4)) r, a", &["a"]),
        ] {
            let want = Verdict::Read { tables: names.iter().map(|s| s.to_string()).collect() };
            assert_eq!(h(sql), want, "{sql}");
        }
        assert_eq!(h("SELECT clock.t FROM a JOIN b ON a.id = b.id, clock"), Verdict::Uncacheable(Reason::NotATable));
    }

    #[test]
    fn an_unknown_relation_where_one_must_stand_is_not_cached() {
        for sql in [
            "SELECT * FROM a JOIN b ON a.id = b.id, tmp",
            "SELECT * FROM (SELECT 1) s, tmp",
            "SELECT * FROM generate_series(1, ARRAY[1]) g, tmp",
            "SELECT * FROM a AS x(i), tmp",
            "SELECT * FROM (tmp JOIN a ON true)",
            "SELECT * FROM ONLY (tmp)",
            "SELECT 1 UNION ALL TABLE tmp",
            "SELECT * FROM a, LATERAL (SELECT * FROM tmp) t",
            r#"SELECT * FROM U&"\0063""#,
            "SELECT * FROM 'a'",
        ] {
            assert_eq!(h(sql), Verdict::Uncacheable(Reason::UnknownRelation), "{sql}");
        }
        assert_eq!(h("WITH tmp AS (SELECT 1) SELECT * FROM a, tmp"), Verdict::Read { tables: vec!["a".into()] });
    }

    #[test]
    fn statements_that_run_others_or_finish_prepared_transactions() {
        let db = Verdict::Write(WriteScope::Database);
        assert_eq!(h("EXPLAIN ANALYSE UPDATE c SET v = 1"), tables(&["c"]));
        assert_eq!(h("EXPLAIN (ANALYZE, FORMAT JSON) DELETE FROM parent"), tables(&["child", "parent"]));
        assert_eq!(h("EXPLAIN ANALYZE SELECT * FROM a"), Verdict::Uncacheable(Reason::NotARead));
        assert_eq!(h("EXPLAIN UPDATE c SET v = 1"), Verdict::Uncacheable(Reason::NotARead), "not run");
        assert_eq!(h("ANALYSE a"), Verdict::Uncacheable(Reason::NotARead));
        assert_eq!(h("COMMIT PREPARED 'x'"), db);
        assert_eq!(h("ROLLBACK PREPARED 'x'"), db);
        assert_eq!(h("PREPARE TRANSACTION 'x'"), db);
        assert_eq!(h("COMMIT"), Verdict::Uncacheable(Reason::NotARead));
        assert_eq!(h("PREPARE s AS SELECT 1"), Verdict::Uncacheable(Reason::NotARead));
        assert_eq!(h("DECLARE k CURSOR FOR SELECT filter(1)"), Verdict::Write(WriteScope::Code));
        assert_eq!(
            h("DECLARE k NO SCROLL CURSOR WITH HOLD FOR SELECT * FROM a"),
            Verdict::Uncacheable(Reason::NotARead)
        );
    }

    #[test]
    fn write_scopes_merge_to_the_widest() {
        let t = WriteScope::Tables(vec!["a".into()]);
        assert_eq!(WriteScope::merge(Some(t.clone()), WriteScope::AllTables), WriteScope::AllTables);
        assert_eq!(WriteScope::merge(Some(WriteScope::AllTables), WriteScope::Database), WriteScope::Database);
        assert_eq!(WriteScope::merge(Some(WriteScope::Database), t.clone()), WriteScope::Database);
        assert_eq!(WriteScope::merge(Some(WriteScope::AllTables), WriteScope::Code), WriteScope::Code);
        assert_eq!(WriteScope::merge(Some(WriteScope::Code), WriteScope::Database), WriteScope::Database);
        assert_eq!(WriteScope::merge(None, t.clone()), t);
    }

    #[test]
    fn leading_comment_opts_out() {
        assert_eq!(v("/* pgwarp:nocache */ SELECT * FROM users"), Verdict::Uncacheable(Reason::OptOut));
        assert_eq!(v("SELECT * FROM users /* pgwarp:nocache */"), read(&["users"]));
    }
}
