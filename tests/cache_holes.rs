//! Holes a review found in the query cache, against a real Postgres: writes served as cached
//! reads (operators, aggregates, keyword-named functions, 'now' literals), writes that reach
//! tables other than their target (views, partitions, inheritance, foreign keys, triggers,
//! rules, TRUNCATE CASCADE, U&"..." names), FROM lists that hid a table, and statements not
//! recognised as writes (EXPLAIN ANALYSE, two-phase commit).

mod common;
mod support;

use std::time::Duration;

use support::*;

async fn cached(origin: &Origin) -> Pgwarp {
    Pgwarp::start(origin, |c| c.cache.enabled = true).await
}

async fn q(client: &tokio_postgres::Client, sql: &str) -> String {
    first(&client.simple_query(sql).await.unwrap_or_else(|e| panic!("{sql}: {e}")))
}

/// Sets up, warms the cache with `read`, checks `before`, runs `write` through pgwarp (from
/// the same client), and asserts `read` through pgwarp now gives what the origin gives.
async fn write_then_read(setup: &str, read: &str, before: &str, write: &str) {
    let origin = Origin::start();
    origin.sql(setup);
    let pgwarp = cached(&origin).await;
    let client = pgwarp.client().await;
    warm(&client, read).await;
    assert_eq!(q(&client, read).await, before);
    client.simple_query(write).await.unwrap();
    // `q` gives the first column, and psql all of them, separated by '|'.
    let direct = origin.sql(read).split('|').next().unwrap_or_default().to_owned();
    let via = q(&client, read).await;
    assert_eq!(via, direct, "after `{write}`, `{read}` through pgwarp is stale (origin says {direct:?})");
}

const ITEMS: &str = "CREATE TABLE items (id int primary key, name text); \
     INSERT INTO items VALUES (1, 'one'); GRANT ALL ON items TO app;";

#[tokio::test]
async fn write_through_updatable_view() {
    write_then_read(
        &format!("{ITEMS} CREATE VIEW items_v AS SELECT * FROM items; GRANT ALL ON items_v TO app;"),
        "SELECT name FROM items WHERE id = 1",
        "one",
        "UPDATE items_v SET name = 'via view' WHERE id = 1",
    )
    .await;
}

#[tokio::test]
async fn write_to_partition_read_parent() {
    write_then_read(
        "CREATE TABLE m (id int, v text) PARTITION BY RANGE (id); \
         CREATE TABLE m_1 PARTITION OF m FOR VALUES FROM (0) TO (100); \
         INSERT INTO m VALUES (1, 'old'); GRANT ALL ON m, m_1 TO app;",
        "SELECT v FROM m WHERE id = 1",
        "old",
        "UPDATE m_1 SET v = 'new' WHERE id = 1",
    )
    .await;
}

#[tokio::test]
async fn write_to_parent_read_partition() {
    write_then_read(
        "CREATE TABLE m (id int, v text) PARTITION BY RANGE (id); \
         CREATE TABLE m_1 PARTITION OF m FOR VALUES FROM (0) TO (100); \
         INSERT INTO m VALUES (1, 'old'); GRANT ALL ON m, m_1 TO app;",
        "SELECT v FROM m_1 WHERE id = 1",
        "old",
        "UPDATE m SET v = 'new' WHERE id = 1",
    )
    .await;
}

#[tokio::test]
async fn write_to_inheritance_child_read_parent() {
    write_then_read(
        "CREATE TABLE p (id int, v text); CREATE TABLE c () INHERITS (p); \
         INSERT INTO c VALUES (1, 'old'); GRANT ALL ON p, c TO app;",
        "SELECT v FROM p WHERE id = 1",
        "old",
        "UPDATE c SET v = 'new' WHERE id = 1",
    )
    .await;
}

#[tokio::test]
async fn fk_on_delete_cascade() {
    write_then_read(
        "CREATE TABLE parent (id int primary key); \
         CREATE TABLE child (id int, pid int REFERENCES parent ON DELETE CASCADE); \
         INSERT INTO parent VALUES (1); INSERT INTO child VALUES (10, 1); GRANT ALL ON parent, child TO app;",
        "SELECT count(*) FROM child",
        "1",
        "DELETE FROM parent WHERE id = 1",
    )
    .await;
}

#[tokio::test]
async fn trigger_writes_another_table() {
    write_then_read(
        "CREATE TABLE a (id int); CREATE TABLE audit (n int); INSERT INTO audit VALUES (0); \
         CREATE FUNCTION a_trg() RETURNS trigger LANGUAGE plpgsql AS \
           $$ BEGIN UPDATE audit SET n = n + 1; RETURN NEW; END $$; \
         CREATE TRIGGER t AFTER INSERT ON a FOR EACH ROW EXECUTE FUNCTION a_trg(); \
         GRANT ALL ON a, audit TO app;",
        "SELECT n FROM audit",
        "0",
        "INSERT INTO a VALUES (1)",
    )
    .await;
}

#[tokio::test]
async fn rule_redirects_write() {
    write_then_read(
        &format!(
            "{ITEMS} CREATE TABLE inbox (id int, name text); GRANT ALL ON inbox TO app; \
             CREATE RULE r AS ON INSERT TO inbox DO INSTEAD UPDATE items SET name = NEW.name WHERE id = NEW.id;"
        ),
        "SELECT name FROM items WHERE id = 1",
        "one",
        "INSERT INTO inbox VALUES (1, 'ruled')",
    )
    .await;
}

#[tokio::test]
async fn explain_analyse_british_spelling() {
    write_then_read(
        ITEMS,
        "SELECT name FROM items WHERE id = 1",
        "one",
        "EXPLAIN ANALYSE UPDATE items SET name = 'explained' WHERE id = 1",
    )
    .await;
}

#[tokio::test]
async fn operator_backed_by_writing_function_is_a_write() {
    let origin = Origin::start();
    origin.sql(
        "CREATE TABLE log (n int); GRANT ALL ON log TO app; \
         CREATE FUNCTION log_add(a int, b int) RETURNS int LANGUAGE sql VOLATILE AS \
           $$ INSERT INTO log VALUES (a + b) RETURNING a + b $$; \
         CREATE OPERATOR #+# (LEFTARG = int, RIGHTARG = int, FUNCTION = log_add);",
    );
    let pgwarp = cached(&origin).await;
    let client = pgwarp.client().await;
    warm(&client, "SELECT count(*) FROM log").await;
    let before: i64 = origin.sql("SELECT count(*) FROM log").parse().unwrap();
    for _ in 0..3 {
        assert_eq!(q(&client, "SELECT 1 #+# 2").await, "3");
    }
    let after: i64 = origin.sql("SELECT count(*) FROM log").parse().unwrap();
    assert_eq!(after - before, 3, "the write behind the operator ran only {} of 3 times", after - before);
}

#[tokio::test]
async fn function_named_like_a_keyword_is_checked() {
    let origin = Origin::start();
    origin.sql(
        "CREATE TABLE log (n int); GRANT ALL ON log TO app; \
         CREATE FUNCTION public.filter(a int) RETURNS int LANGUAGE sql VOLATILE AS \
           $$ INSERT INTO log VALUES (a) RETURNING a $$;",
    );
    let pgwarp = cached(&origin).await;
    let client = pgwarp.client().await;
    warm(&client, "SELECT count(*) FROM log").await;
    assert_eq!(q(&client, "SELECT count(*) FROM log").await, "0");
    for _ in 0..3 {
        assert_eq!(q(&client, "SELECT filter(7)").await, "7");
    }
    let n = origin.sql("SELECT count(*) FROM log");
    assert_eq!(n, "3", "the writing function ran {n} of 3 times");
    assert_eq!(q(&client, "SELECT count(*) FROM log").await, "3", "and reads of log are stale");
}

// ---- tables the FROM parser misses ----

const ABC: &str = "CREATE TABLE a (id int); CREATE TABLE b (id int); CREATE TABLE c (id int, v text); \
     INSERT INTO a VALUES (1); INSERT INTO b VALUES (1); INSERT INTO c VALUES (1, 'old'); \
     GRANT ALL ON a, b, c TO app;";

#[tokio::test]
async fn comma_after_join_hides_a_table() {
    write_then_read(
        ABC,
        "SELECT c.v FROM a JOIN b ON a.id = b.id, c WHERE c.id = a.id",
        "old",
        "UPDATE c SET v = 'new'",
    )
    .await;
}

#[tokio::test]
async fn parenthesised_join_hides_its_first_table() {
    write_then_read(ABC, "SELECT c.v FROM (c JOIN b ON c.id = b.id)", "old", "UPDATE c SET v = 'new'").await;
}

#[tokio::test]
async fn alias_column_list_hides_the_rest_of_the_from_list() {
    write_then_read(ABC, "SELECT c.v FROM a AS x(i), c", "old", "UPDATE c SET v = 'new'").await;
}

#[tokio::test]
async fn table_command_in_union_hides_a_table() {
    write_then_read(ABC, "SELECT 0, 'x' UNION ALL TABLE c ORDER BY 1 DESC LIMIT 1", "1", "UPDATE c SET id = 2").await;
}

#[tokio::test]
async fn view_hidden_behind_a_join_comma_is_cached() {
    // A view over a volatile function is served from the cache.
    let origin = Origin::start();
    origin.sql(&format!("{ABC} CREATE VIEW clock AS SELECT clock_timestamp()::text AS t; GRANT ALL ON clock TO app;"));
    let pgwarp = cached(&origin).await;
    let client = pgwarp.client().await;
    let read = "SELECT clock.t FROM a JOIN b ON a.id = b.id, clock";
    warm(&client, "SELECT id FROM a").await;
    let x = q(&client, read).await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    let y = q(&client, read).await;
    assert_ne!(x, y, "a view over clock_timestamp() was served from the cache");
}

#[tokio::test]
async fn now_as_a_literal_is_not_cached() {
    let origin = Origin::start();
    let pgwarp = cached(&origin).await;
    let client = pgwarp.client().await;
    warm(&client, "SELECT 1").await;
    let read = "SELECT 'now'::timestamptz::text";
    let x = q(&client, read).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    let y = q(&client, read).await;
    assert_ne!(x, y, "'now'::timestamptz was served from the cache");
}

#[tokio::test]
async fn two_phase_commit_prepared_is_a_write() {
    let cluster = common::PgCluster::start_with(common::PgOptions {
        extra_conf: vec!["max_prepared_transactions = 5".into()],
        ..common::PgOptions::default()
    });
    cluster.create_user(APP_USER, APP_PASSWORD);
    cluster.create_database(APP_DB, APP_USER);
    let origin = Origin { cluster };
    origin.sql(ITEMS);
    let pgwarp = cached(&origin).await;
    let client = pgwarp.client().await;
    let read = "SELECT name FROM items WHERE id = 1";
    warm(&client, read).await;
    client.batch_execute("BEGIN; UPDATE items SET name = '2pc' WHERE id = 1; PREPARE TRANSACTION 'x'").await.unwrap();
    // Not committed yet: the old value is read (and cached).
    assert_eq!(q(&client, read).await, "one");
    client.simple_query("COMMIT PREPARED 'x'").await.unwrap();
    assert_eq!(origin.sql(read), "2pc");
    assert_eq!(q(&client, read).await, "2pc", "stale after COMMIT PREPARED");
}

#[tokio::test]
async fn from_only_parenthesised_hides_a_table() {
    write_then_read(ABC, "SELECT v FROM ONLY (c)", "old", "UPDATE c SET v = 'new'").await;
}

#[tokio::test]
async fn function_in_from_list_hides_the_next_table() {
    write_then_read(ABC, "SELECT c.v FROM unnest(ARRAY[1]) g, c", "old", "UPDATE c SET v = 'new'").await;
}

#[tokio::test]
async fn subquery_in_from_list_hides_the_next_table() {
    write_then_read(ABC, "SELECT c.v FROM (SELECT 1) s, c", "old", "UPDATE c SET v = 'new'").await;
}

#[tokio::test]
async fn unicode_escaped_write_target() {
    write_then_read(ABC, "SELECT v FROM c", "old", r#"UPDATE U&"\0063" SET v = 'new'"#).await;
}

#[tokio::test]
async fn truncate_cascade_reaches_referencing_tables() {
    write_then_read(
        "CREATE TABLE parent (id int primary key); \
         CREATE TABLE child (id int, pid int REFERENCES parent); \
         INSERT INTO parent VALUES (1); INSERT INTO child VALUES (10, 1); GRANT ALL ON parent, child TO app;",
        "SELECT count(*) FROM child",
        "1",
        "TRUNCATE parent CASCADE",
    )
    .await;
}

#[tokio::test]
async fn user_aggregate_is_immutable_in_pg_proc_whatever_its_sfunc_does() {
    let origin = Origin::start();
    origin.sql(
        "CREATE TABLE log (n int); GRANT ALL ON log TO app; \
         CREATE FUNCTION log_sfunc(s int, x int) RETURNS int LANGUAGE sql VOLATILE AS \
           $$ INSERT INTO log VALUES (x) RETURNING coalesce(s, 0) + x $$; \
         CREATE AGGREGATE logged_sum(int) (SFUNC = log_sfunc, STYPE = int);",
    );
    assert_eq!(origin.sql("SELECT provolatile FROM pg_proc WHERE proname = 'logged_sum'"), "i");
    let pgwarp = cached(&origin).await;
    let client = pgwarp.client().await;
    warm(&client, "SELECT count(*) FROM log").await;
    for _ in 0..3 {
        assert_eq!(q(&client, "SELECT logged_sum(x) FROM (SELECT 1 AS x UNION ALL SELECT 2) v").await, "3");
    }
    let n = origin.sql("SELECT count(*) FROM log");
    assert_eq!(n, "6", "the aggregate's writes ran {n} of 6 times");
}

// ---- second review round ----

#[tokio::test]
async fn a_write_to_a_table_a_policy_reads_invalidates_the_protected_table() {
    let origin = Origin::start();
    origin.sql(
        "CREATE TABLE docs (id int, body text); INSERT INTO docs VALUES (1, 'secret'); \
         CREATE TABLE grants (doc_id int, who name); INSERT INTO grants VALUES (1, 'app'); \
         ALTER TABLE docs ENABLE ROW LEVEL SECURITY; \
         CREATE POLICY p ON docs USING (EXISTS (SELECT 1 FROM grants g WHERE g.doc_id = docs.id AND g.who = current_user)); \
         GRANT ALL ON docs, grants TO app;",
    );
    let pgwarp = Pgwarp::start(&origin, |c| c.cache.enabled = true).await;
    let client = pgwarp.client().await;
    let read = "SELECT count(*) FROM docs";
    warm(&client, read).await;
    assert_eq!(q(&client, read).await, "1");
    client.simple_query("DELETE FROM grants WHERE doc_id = 1").await.unwrap();
    let truth = q(&client, &format!("/* pgwarp:nocache */ {read}")).await;
    assert_eq!(truth, "0");
    assert_eq!(q(&client, read).await, truth, "access revoked, but the cached read still shows the row");
}
#[tokio::test]
async fn moving_time_words_anywhere_in_a_literal_are_not_cached() {
    let origin = Origin::start();
    let pgwarp = Pgwarp::start(&origin, |c| c.cache.enabled = true).await;
    let client = pgwarp.client().await;
    warm(&client, "SELECT 1").await;
    for read in ["SELECT '\"now\"'::timestamptz::text", "SELECT '(now)'::timestamptz::text"] {
        let x = q(&client, read).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        let y = q(&client, read).await;
        assert_ne!(x, y, "{read} was served from the cache");
    }
}
#[tokio::test]
async fn a_writing_function_called_by_attribute_notation_is_a_write() {
    let origin = Origin::start();
    origin.sql(
        "CREATE TABLE people (id int); INSERT INTO people VALUES (1); \
         CREATE TABLE counters (n int); INSERT INTO counters VALUES (0); \
         CREATE FUNCTION bump(people) RETURNS int LANGUAGE sql VOLATILE AS 'UPDATE counters SET n = n + 1 RETURNING n'; \
         GRANT ALL ON people, counters TO app;",
    );
    let pgwarp = Pgwarp::start(&origin, |c| c.cache.enabled = true).await;
    let client = pgwarp.client().await;
    warm(&client, "SELECT n FROM counters").await;
    assert_eq!(q(&client, "SELECT n FROM counters").await, "0");
    let mut got = Vec::new();
    for _ in 0..3 {
        got.push(q(&client, "SELECT p.bump FROM people p").await);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let truth = q(&client, "/* pgwarp:nocache */ SELECT n FROM counters").await;
    let via = q(&client, "SELECT n FROM counters").await;
    assert_eq!((got.join(","), via), ("1,2,3".to_string(), truth), "writes through attribute notation");
}

/// A setting changed inside a user function (the usual "set tenant" helper) does not reach the
/// next client: the cache's catalog knows the function may write, so it may set settings too,
/// and the connection is read back and reset before anyone else uses it. (The client itself
/// keeps it only on that connection: its name was never seen.)
#[tokio::test]
async fn a_setting_changed_inside_a_user_function_does_not_reach_the_next_client() {
    assert_eq!(tenant_seen_by_the_next_client(true).await, "");
}

/// The same before the cache's catalog has loaded, when no function is known yet: a call to
/// one may still be the "set tenant" helper, so the connection is read back and reset.
#[tokio::test]
async fn a_setting_changed_inside_a_user_function_before_the_catalog_loads_does_not_leak() {
    assert_eq!(tenant_seen_by_the_next_client(false).await, "");
}

/// One client calls a "set tenant" function, on a pool of one connection, as its first query
/// (or once the cache's catalog has loaded); what the next client sees as the tenant.
async fn tenant_seen_by_the_next_client(catalog_loaded: bool) -> String {
    let origin = Origin::start();
    origin.sql(
        "CREATE TABLE items (id int); GRANT ALL ON items TO app; \
         CREATE FUNCTION public.set_tenant(t text) RETURNS void LANGUAGE sql \
         AS $$ SELECT pg_catalog.set_config('app.tenant', t, false) $$",
    );
    let pgwarp = Pgwarp::start(&origin, |c| {
        c.cache.enabled = true;
        c.pool_size = 1;
    })
    .await;
    let a = pgwarp.client().await;
    if catalog_loaded {
        warm(&a, "SELECT count(*) FROM items").await;
    }
    a.simple_query("SELECT public.set_tenant('tenant_a')").await.unwrap();
    let b = pgwarp.client().await;
    q(&b, "SELECT coalesce(current_setting('app.tenant', true), '')").await
}

/// Calling a user function that may write invalidates every cached read, but keeps the cache's
/// catalog: the reads right after it are classified at once, not refused while a catalog
/// reloads (reloading it at every such call kept an application that calls one in each
/// transaction from ever using the cache, and ran the catalog query each time).
#[tokio::test]
async fn a_call_to_a_writing_function_keeps_the_catalog() {
    let origin = Origin::start();
    origin.sql(
        "CREATE TABLE counters (n int); INSERT INTO counters VALUES (1); GRANT ALL ON counters TO app; \
         CREATE FUNCTION public.bump() RETURNS void LANGUAGE sql AS $$ UPDATE counters SET n = n + 1 $$",
    );
    let pgwarp = Pgwarp::start(&origin, |c| {
        c.cache.enabled = true;
        c.admin_users = vec![APP_USER.to_string()];
    })
    .await;
    let client = pgwarp.client().await;
    let read = "SELECT n FROM counters";
    warm(&client, read).await;
    let console = common::connect(&format!("postgres://{APP_USER}:{APP_PASSWORD}@127.0.0.1:{}/pgwarp", pgwarp.port))
        .await
        .expect("admin console");
    let catalog_loading = || async {
        let rows = console.simple_query("SHOW CACHE").await.unwrap();
        rows.iter()
            .find_map(|m| match m {
                tokio_postgres::SimpleQueryMessage::Row(r) if r.get(0) == Some("uncacheable_catalog_loading") => {
                    r.get(1).map(str::to_owned)
                }
                _ => None,
            })
            .unwrap_or_default()
    };
    let before = catalog_loading().await;
    for i in 2..5 {
        client.simple_query("SELECT public.bump()").await.unwrap();
        assert_eq!(q(&client, read).await, i.to_string(), "the write is seen");
    }
    assert_eq!(catalog_loading().await, before, "no read waited for a catalog");
}
