//! The catalog snapshot the classifier reads, and loading it from the origin's own catalogs on
//! one of the pool's connections, in one round trip.
//!
//! Names are kept without their schema and folded over every schema: what one relation or
//! function of a name could do, the name is taken to do. That errs only towards invalidating
//! more, or caching less.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use super::DatabaseCache;
use crate::origin::OriginError;
use crate::pool::{Pool, PoolError};

/// What the origin's catalogs say about names, loaded by [`spawn_load`].
#[derive(Debug, Default, Clone)]
pub struct Catalog {
    /// Function name -> facts over all its overloads.
    pub functions: HashMap<String, FunctionFacts>,
    /// Operators defined outside pg_catalog whose function is not immutable: name -> facts
    /// over all of them. Built-in operators are as Postgres marks their functions.
    pub operators: HashMap<String, FunctionFacts>,
    /// Type name -> facts over the non-immutable user-defined casts to it.
    pub casts: HashMap<String, FunctionFacts>,
    /// Facts over the non-immutable user-defined casts that are implicit: they may run where
    /// no type is named, so every statement is taken to use them.
    pub implicit_casts: Option<FunctionFacts>,
    /// Functions outside pg_catalog, not immutable, taking one row (composite) argument: the
    /// ones `row.name` and `(row).name` call (attribute notation), name -> facts.
    pub attribute_functions: HashMap<String, FunctionFacts>,
    /// Relation name (any schema) -> facts over every relation of that name.
    pub relations: HashMap<String, Relation>,
    /// Table -> the other relations its row-level security policies read: reading the table
    /// reads them too, so a write to them changes what it returns (a revoked grant).
    pub policy_reads: HashMap<String, Vec<String>>,
    /// Inheritance and partitioning, child -> parents and parent -> children.
    parents: HashMap<String, Vec<String>>,
    children: HashMap<String, Vec<String>>,
    /// Referenced table -> the tables whose foreign keys reference it, each with whether the
    /// key's ON DELETE or ON UPDATE action (CASCADE, SET NULL, SET DEFAULT) changes it.
    referencing: HashMap<String, Vec<(String, bool)>>,
}

/// Built-in STABLE functions whose result depends only on their arguments and on settings the
/// cache key holds (TimeZone, DateStyle, IntervalStyle, lc_time, lc_numeric,
/// default_text_search_config, extra_float_digits, ...), so a cached answer is as right as for
/// an IMMUTABLE one. Postgres marks them STABLE for those settings alone: they format or parse
/// dates and numbers, build JSON from values whose text form follows the settings, or use the
/// default text search configuration. A plain `SELECT created_at` depends on TimeZone just as
/// much, and is cached keyed on it. Left out on purpose: `now()` and the other clocks, `age()`
/// (its one-argument form reads the current date), `timezone()` and `timetz()` (for a time
/// with zone they resolve daylight saving time by the current date), and everything that
/// reads the connection, the snapshot, statistics or arbitrary settings (`pg_backend_pid()`,
/// `pg_stat_*`, `current_setting()`, ...). A name qualifies only when no overload of it, in
/// any schema, is worse than a built-in STABLE one.
pub const KEYED_STABLE: &[&str] = &[
    "array_to_json",
    "array_to_string",
    "concat",
    "concat_ws",
    "date",
    "date_add",
    "date_part",
    "date_subtract",
    "date_trunc",
    "extract",
    "format",
    "generate_series",
    "json_agg",
    "json_agg_strict",
    "json_build_array",
    "json_build_object",
    "json_object_agg",
    "json_object_agg_strict",
    "json_object_agg_unique",
    "json_object_agg_unique_strict",
    "json_populate_record",
    "json_populate_recordset",
    "json_to_record",
    "json_to_recordset",
    "jsonb_agg",
    "jsonb_agg_strict",
    "jsonb_build_array",
    "jsonb_build_object",
    "jsonb_object_agg",
    "jsonb_object_agg_strict",
    "jsonb_object_agg_unique",
    "jsonb_object_agg_unique_strict",
    "jsonb_path_exists_tz",
    "jsonb_path_match_tz",
    "jsonb_path_query_array_tz",
    "jsonb_path_query_first_tz",
    "jsonb_path_query_tz",
    "jsonb_populate_record",
    "jsonb_populate_recordset",
    "jsonb_to_record",
    "jsonb_to_recordset",
    "make_timestamptz",
    "phraseto_tsquery",
    "plainto_tsquery",
    "quote_literal",
    "quote_nullable",
    "row_to_json",
    "time",
    "timestamp",
    "timestamptz",
    "to_char",
    "to_date",
    "to_json",
    "to_jsonb",
    "to_number",
    "to_timestamp",
    "to_tsquery",
    "to_tsvector",
    "ts_headline",
    "websearch_to_tsquery",
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FunctionFacts {
    /// Safe to cache a call of: every overload is IMMUTABLE (an aggregate outside pg_catalog
    /// counts as no better than its support functions: Postgres marks aggregates IMMUTABLE
    /// whatever those do), or the name is in `KEYED_STABLE` and no overload is worse than a
    /// built-in STABLE function.
    pub immutable: bool,
    /// Some overload is VOLATILE and user-defined (outside pg_catalog): it may write.
    pub may_write: bool,
}

impl FunctionFacts {
    /// Facts true of everything both describe.
    fn or(self, other: FunctionFacts) -> FunctionFacts {
        FunctionFacts { immutable: self.immutable && other.immutable, may_write: self.may_write || other.may_write }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Relation {
    /// Every relation of that name is an ordinary or partitioned table.
    pub table: bool,
    /// What a write to it changes is not only its rows and what the catalog's keys and
    /// inheritance say: it is not a table (a view writes through whatever it is defined over),
    /// or has a user trigger or rule, which may act on any table.
    pub opaque_writes: bool,
}

impl Catalog {
    /// Records that `child` inherits from (or is a partition of) `parent`.
    pub fn add_inheritance(&mut self, child: &str, parent: &str) {
        self.parents.entry(child.into()).or_default().push(parent.into());
        self.children.entry(parent.into()).or_default().push(child.into());
    }

    /// Records a foreign key of `referencing` to `referenced`; `changes` says whether its
    /// ON DELETE or ON UPDATE action changes the referencing table.
    pub fn add_foreign_key(&mut self, referencing: &str, referenced: &str, changes: bool) {
        self.referencing.entry(referenced.into()).or_default().push((referencing.into(), changes));
    }

    /// The tables whose reads a write to `targets` may change, or None when that cannot be
    /// told (a target or a table it reaches is unknown, not a table, or runs triggers or rules).
    ///
    /// Rows change in the targets, their inheritance descendants (a write to a parent reaches
    /// them) and, transitively, in tables whose foreign keys act on a change there, with their
    /// descendants; with `truncate_cascade` in every table referencing one of those, as
    /// TRUNCATE ... CASCADE empties them whatever their keys' actions. Reads of the inheritance
    /// ancestors of all of these include the changed rows.
    pub fn write_reach(&self, targets: &[String], truncate_cascade: bool) -> Option<Vec<String>> {
        let mut changed: HashSet<&str> = HashSet::new();
        let mut todo: Vec<&str> = targets.iter().map(String::as_str).collect();
        while let Some(t) = todo.pop() {
            if !changed.insert(t) {
                continue;
            }
            if self.relations.get(t).is_none_or(|r| r.opaque_writes) {
                return None;
            }
            todo.extend(self.children.get(t).into_iter().flatten().map(String::as_str));
            let keys = self.referencing.get(t).into_iter().flatten();
            todo.extend(keys.filter(|(_, changes)| *changes || truncate_cascade).map(|(r, _)| r.as_str()));
        }
        let mut seen = changed.clone();
        let mut todo: Vec<&str> = changed.into_iter().collect();
        while let Some(t) = todo.pop() {
            for parent in self.parents.get(t).into_iter().flatten() {
                if seen.insert(parent) {
                    todo.push(parent);
                }
            }
        }
        let mut reach: Vec<String> = seen.into_iter().map(str::to_owned).collect();
        reach.sort();
        Some(reach)
    }
}

/// Why the catalog could not be loaded (logged; the cache waits for the next try).
#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error(transparent)]
    Pool(#[from] PoolError),
    #[error(transparent)]
    Origin(#[from] OriginError),
    #[error("the origin refused the catalog query: {0}")]
    Query(String),
}

/// Everything in one simple query; each row starts with what it describes.
///
/// `f` function name, all overloads immutable, some user-defined one volatile, no overload worse
/// than a built-in STABLE one. An aggregate outside pg_catalog ranks as the worst of itself and
/// its support functions (pg_aggregate), as Postgres marks every aggregate immutable. Built-in
/// aggregates are taken as marked.
///
/// `o` operator name (outside pg_catalog, function not immutable): immutable, may write.
///
/// `c` type name a non-immutable user-defined cast (castfunc outside pg_catalog) converts to:
/// some such cast is implicit, some such cast's function is volatile.
///
/// `r` relation name outside system and temporary schemas: all tables, some not a table or
/// with a user trigger (NOT tgisinternal) or a rule (other than a view's _RETURN).
///
/// `i` child, parent (inheritance and partitions); `k`/`K` referencing, referenced table of a
/// foreign key whose action changes the referencing table (`k`) or not (`K`).
///
/// `a` function name (outside pg_catalog, not immutable, one composite argument, so callable
/// as `row.name`): all immutable (never, as listed), some volatile.
///
/// `p` table, another relation its row-level security policies depend on (pg_depend).
const CATALOG_SQL: &str = "\
SELECT 'f', p.proname, bool_and(greatest(r.own, r.support) = 0), \
 bool_or(greatest(r.own, r.support) = 2 AND n.nspname <> 'pg_catalog'), \
 bool_and(greatest(r.own, r.support) = 0 OR (r.own = 1 AND n.nspname = 'pg_catalog')) \
 FROM pg_catalog.pg_proc p JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace \
 CROSS JOIN LATERAL (SELECT CASE p.provolatile WHEN 'v' THEN 2 WHEN 's' THEN 1 ELSE 0 END AS own, \
  (SELECT max(CASE s.provolatile WHEN 'v' THEN 2 WHEN 's' THEN 1 ELSE 0 END) \
   FROM pg_catalog.pg_aggregate a JOIN pg_catalog.pg_proc s ON s.oid IN (a.aggtransfn, a.aggfinalfn, \
    a.aggcombinefn, a.aggserialfn, a.aggdeserialfn, a.aggmtransfn, a.aggminvtransfn, a.aggmfinalfn) \
   WHERE a.aggfnoid = p.oid AND p.prokind = 'a' AND n.nspname <> 'pg_catalog') AS support) r \
 GROUP BY p.proname; \
SELECT 'o', o.oprname, bool_and(f.provolatile = 'i'), bool_or(f.provolatile = 'v' AND fn.nspname <> 'pg_catalog') \
 FROM pg_catalog.pg_operator o JOIN pg_catalog.pg_namespace n ON n.oid = o.oprnamespace \
 JOIN pg_catalog.pg_proc f ON f.oid = o.oprcode JOIN pg_catalog.pg_namespace fn ON fn.oid = f.pronamespace \
 WHERE n.nspname <> 'pg_catalog' AND f.provolatile <> 'i' GROUP BY o.oprname; \
SELECT 'c', t.typname, bool_or(k.castcontext = 'i'), bool_or(f.provolatile = 'v') \
 FROM pg_catalog.pg_cast k JOIN pg_catalog.pg_proc f ON f.oid = k.castfunc \
 JOIN pg_catalog.pg_namespace fn ON fn.oid = f.pronamespace JOIN pg_catalog.pg_type t ON t.oid = k.casttarget \
 WHERE fn.nspname <> 'pg_catalog' AND f.provolatile <> 'i' GROUP BY t.typname; \
SELECT 'r', c.relname, bool_and(c.relkind IN ('r', 'p')), bool_or(c.relkind NOT IN ('r', 'p') \
  OR EXISTS (SELECT FROM pg_catalog.pg_trigger t WHERE t.tgrelid = c.oid AND NOT t.tgisinternal) \
  OR EXISTS (SELECT FROM pg_catalog.pg_rewrite w WHERE w.ev_class = c.oid AND w.rulename <> '_RETURN')) \
 FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
 WHERE c.relkind IN ('r', 'p', 'v', 'm', 'f') AND n.nspname <> 'pg_catalog' \
 AND n.nspname <> 'information_schema' AND n.nspname NOT LIKE 'pg_toast%' \
 AND n.nspname NOT LIKE 'pg_temp%' GROUP BY c.relname; \
SELECT 'i', c.relname, p.relname FROM pg_catalog.pg_inherits i \
 JOIN pg_catalog.pg_class c ON c.oid = i.inhrelid JOIN pg_catalog.pg_class p ON p.oid = i.inhparent \
 WHERE c.relkind IN ('r', 'p', 'f'); \
SELECT CASE WHEN k.confdeltype IN ('c', 'n', 'd') OR k.confupdtype IN ('c', 'n', 'd') THEN 'k' ELSE 'K' END, \
 r.relname, f.relname FROM pg_catalog.pg_constraint k \
 JOIN pg_catalog.pg_class r ON r.oid = k.conrelid JOIN pg_catalog.pg_class f ON f.oid = k.confrelid \
 WHERE k.contype = 'f'; \
SELECT 'a', p.proname, bool_and(p.provolatile = 'i'), bool_or(p.provolatile = 'v') \
 FROM pg_catalog.pg_proc p JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace \
 JOIN pg_catalog.pg_type t ON t.oid = p.proargtypes[0] \
 WHERE p.pronargs = 1 AND t.typtype = 'c' AND p.provolatile <> 'i' AND n.nspname <> 'pg_catalog' \
 GROUP BY p.proname; \
SELECT DISTINCT 'p', c.relname, r.relname FROM pg_catalog.pg_policy pol \
 JOIN pg_catalog.pg_class c ON c.oid = pol.polrelid \
 JOIN pg_catalog.pg_depend d ON d.classid = 'pg_catalog.pg_policy'::pg_catalog.regclass AND d.objid = pol.oid \
  AND d.refclassid = 'pg_catalog.pg_class'::pg_catalog.regclass \
 JOIN pg_catalog.pg_class r ON r.oid = d.refobjid WHERE r.oid <> c.oid";

/// Loads the catalog in the background and installs it in the cache.
pub fn spawn_load(database: Arc<DatabaseCache>, pool: Arc<Pool>) {
    let epoch = database.catalog_epoch();
    tokio::spawn(async move {
        let loaded = load(&pool).await;
        if let Err(e) = &loaded {
            tracing::warn!(error = %e, database = database.name(), "could not load the catalog for the cache");
        }
        database.set_catalog(loaded.ok(), epoch);
    });
}

async fn load(pool: &Arc<Pool>) -> Result<Catalog, CatalogError> {
    // Client 0: pgwarp's own work.
    let mut conn = pool.checkout(0).await?;
    let out = conn.simple_query(CATALOG_SQL).await?;
    pool.checkin(conn);
    if let Some(e) = out.error {
        return Err(CatalogError::Query(e.message));
    }
    Ok(from_rows(&out.rows))
}

/// The catalog the rows of [`CATALOG_SQL`] describe; rows of another form are skipped.
fn from_rows(rows: &[Vec<Option<String>>]) -> Catalog {
    let mut catalog = Catalog::default();
    for row in rows {
        if let [Some(kind), Some(name), Some(immutable), Some(may_write), Some(builtin_stable)] = row.as_slice() {
            if kind == "f" {
                let keyed = builtin_stable == "t" && KEYED_STABLE.contains(&name.as_str());
                let facts = FunctionFacts { immutable: immutable == "t" || keyed, may_write: may_write == "t" };
                catalog.functions.insert(name.clone(), facts);
            }
            continue;
        }
        let [Some(kind), Some(name), Some(a), Some(b)] = row.as_slice() else {
            if let [Some(kind), Some(from), Some(to)] = row.as_slice() {
                match kind.as_str() {
                    "i" => catalog.add_inheritance(from, to),
                    "k" | "K" => catalog.add_foreign_key(from, to, kind == "k"),
                    "p" => catalog.policy_reads.entry(from.clone()).or_default().push(to.clone()),
                    _ => {}
                }
            }
            continue;
        };
        let (a, b) = (a == "t", b == "t");
        match kind.as_str() {
            "f" => {
                catalog.functions.insert(name.clone(), FunctionFacts { immutable: a, may_write: b });
            }
            "o" => {
                catalog.operators.insert(name.clone(), FunctionFacts { immutable: a, may_write: b });
            }
            "c" => {
                // Only non-immutable casts are listed.
                let facts = FunctionFacts { immutable: false, may_write: b };
                catalog.casts.insert(name.clone(), facts);
                if a {
                    catalog.implicit_casts = Some(catalog.implicit_casts.map_or(facts, |f| f.or(facts)));
                }
            }
            "r" => {
                catalog.relations.insert(name.clone(), Relation { table: a, opaque_writes: b });
            }
            "a" => {
                catalog.attribute_functions.insert(name.clone(), FunctionFacts { immutable: a, may_write: b });
            }
            _ => {}
        }
    }
    catalog
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(cells: &[&str]) -> Vec<Option<String>> {
        cells.iter().map(|c| Some(c.to_string())).collect()
    }

    fn table() -> Relation {
        Relation { table: true, opaque_writes: false }
    }

    #[test]
    fn rows_become_facts() {
        let c = from_rows(&[
            row(&["f", "lower", "t", "f", "t"]),
            row(&["f", "logged_sum", "f", "t", "f"]),
            row(&["f", "to_char", "f", "f", "t"]),
            row(&["f", "now", "f", "f", "t"]),
            // A user-defined STABLE overload: the name no longer qualifies.
            row(&["f", "format", "f", "f", "f"]),
            row(&["o", "#+#", "f", "t"]),
            row(&["c", "mytype", "f", "f"]),
            row(&["c", "other", "t", "t"]),
            row(&["r", "items", "t", "f"]),
            row(&["r", "items_v", "f", "t"]),
            row(&["i", "m_1", "m"]),
            row(&["k", "child", "parent"]),
            row(&["a", "bump", "f", "t"]),
            row(&["p", "docs", "grants"]),
            vec![None, None, None, None],
        ]);
        assert_eq!(c.attribute_functions["bump"], FunctionFacts { immutable: false, may_write: true });
        assert_eq!(c.policy_reads["docs"], ["grants"]);
        assert_eq!(c.functions["lower"], FunctionFacts { immutable: true, may_write: false });
        assert_eq!(c.functions["logged_sum"], FunctionFacts { immutable: false, may_write: true });
        assert_eq!(c.functions["to_char"], FunctionFacts { immutable: true, may_write: false });
        assert_eq!(c.functions["now"], FunctionFacts { immutable: false, may_write: false });
        assert_eq!(c.functions["format"], FunctionFacts { immutable: false, may_write: false });
        assert_eq!(c.operators["#+#"], FunctionFacts { immutable: false, may_write: true });
        assert_eq!(c.casts["mytype"], FunctionFacts { immutable: false, may_write: false });
        assert_eq!(c.implicit_casts, Some(FunctionFacts { immutable: false, may_write: true }));
        assert_eq!(c.relations["items_v"], Relation { table: false, opaque_writes: true });
        assert_eq!(c.parents["m_1"], ["m"]);
        assert_eq!(c.referencing["parent"], [("child".to_string(), true)]);
    }

    fn reach(c: &Catalog, t: &str, truncate_cascade: bool) -> Option<Vec<String>> {
        c.write_reach(&[t.to_string()], truncate_cascade)
    }

    fn names(n: &[&str]) -> Option<Vec<String>> {
        Some(n.iter().map(|s| s.to_string()).collect())
    }

    #[test]
    fn a_write_reaches_inheritance_relatives_both_ways() {
        let mut c = Catalog::default();
        for t in ["m", "m_1", "m_2", "m_1_a", "other_parent"] {
            c.relations.insert(t.into(), table());
        }
        c.add_inheritance("m_1", "m");
        c.add_inheritance("m_2", "m");
        c.add_inheritance("m_1_a", "m_1");
        c.add_inheritance("m_1_a", "other_parent");
        // A partition's parents see its rows; its siblings do not.
        assert_eq!(reach(&c, "m_1_a", false), names(&["m", "m_1", "m_1_a", "other_parent"]));
        // A write to a parent may change any descendant, and what their other parents read.
        assert_eq!(reach(&c, "m", false), names(&["m", "m_1", "m_1_a", "m_2", "other_parent"]));
    }

    #[test]
    fn a_write_reaches_tables_whose_foreign_keys_act_on_it() {
        let mut c = Catalog::default();
        for t in ["parent", "child", "grandchild", "plain_ref", "audit"] {
            c.relations.insert(t.into(), table());
        }
        c.add_foreign_key("child", "parent", true);
        c.add_foreign_key("grandchild", "child", true);
        c.add_foreign_key("plain_ref", "parent", false);
        assert_eq!(reach(&c, "parent", false), names(&["child", "grandchild", "parent"]));
        // TRUNCATE ... CASCADE empties every referencing table, whatever its key's action.
        assert_eq!(reach(&c, "parent", true), names(&["child", "grandchild", "parent", "plain_ref"]));
        // A cascade into a table with a trigger runs the trigger: the write cannot be pinned.
        c.relations.insert("grandchild".into(), Relation { table: true, opaque_writes: true });
        assert_eq!(reach(&c, "parent", false), None);
        assert_eq!(reach(&c, "plain_ref", false), names(&["plain_ref"]));
    }

    #[test]
    fn unknown_views_and_triggered_targets_cannot_be_pinned() {
        let mut c = Catalog::default();
        c.relations.insert("v".into(), Relation { table: false, opaque_writes: true });
        c.relations.insert("t".into(), table());
        assert_eq!(reach(&c, "v", false), None);
        assert_eq!(reach(&c, "temp_table", false), None);
        assert_eq!(reach(&c, "t", false), names(&["t"]));
    }
}
