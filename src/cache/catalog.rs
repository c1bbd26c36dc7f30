//! Loading the catalog snapshot the classifier needs from the origin's own pg_proc and
//! pg_class, on one of the pool's connections.

use std::sync::Arc;

use super::classify::{Catalog, FunctionFacts};
use super::DatabaseCache;
use crate::pool::Pool;

/// Per function name: all overloads immutable? any user-defined volatile one?
const FUNCTIONS_SQL: &str = "SELECT p.proname, bool_and(p.provolatile = 'i'), \
     bool_or(p.provolatile = 'v' AND n.nspname <> 'pg_catalog') \
     FROM pg_catalog.pg_proc p JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace GROUP BY p.proname";

/// Per relation name outside system and temporary schemas: are all of them tables?
const RELATIONS_SQL: &str = "SELECT c.relname, bool_and(c.relkind IN ('r', 'p')) \
     FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
     WHERE c.relkind IN ('r', 'p', 'v', 'm', 'f') AND n.nspname <> 'pg_catalog' \
     AND n.nspname <> 'information_schema' AND n.nspname NOT LIKE 'pg_toast%' \
     AND n.nspname NOT LIKE 'pg_temp%' GROUP BY c.relname";

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

async fn load(pool: &Arc<Pool>) -> Result<Catalog, String> {
    let mut conn = pool.checkout().await.map_err(|e| e.to_string())?;
    let functions = conn.simple_query(FUNCTIONS_SQL).await.map_err(|e| e.to_string())?;
    let relations = conn.simple_query(RELATIONS_SQL).await.map_err(|e| e.to_string())?;
    pool.checkin(conn);
    if let Some(e) = functions.error.or(relations.error) {
        return Err(e.message);
    }
    let mut catalog = Catalog::default();
    for row in functions.rows {
        if let [Some(name), Some(immutable), Some(may_write)] = row.as_slice() {
            catalog
                .functions
                .insert(name.clone(), FunctionFacts { immutable: immutable == "t", may_write: may_write == "t" });
        }
    }
    for row in relations.rows {
        if let [Some(name), Some(table)] = row.as_slice() {
            catalog.relations.insert(name.clone(), table == "t");
        }
    }
    Ok(catalog)
}
