//! The query cache against a real Postgres: repeated reads do not reach the origin, volatile
//! SQL is never cached, a client's own writes are visible at once, users never share entries,
//! stale-while-revalidate, and results over the entry cap stream through.

mod common;
mod support;

use std::time::Duration;

use futures_util::future::join_all;
use support::*;
use tokio_postgres::types::ToSql;

/// How many times the origin has run `tick()`: the proof that a read reached it. `tick` is
/// declared IMMUTABLE (a lie, for the test) so the cache will keep what it returns.
fn ticks(origin: &Origin) -> i64 {
    origin.sql("SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM ticks").trim().parse().unwrap()
}

async fn cached(origin: &Origin, tweak: impl FnOnce(&mut pgwarp::config::Config)) -> Pgwarp {
    Pgwarp::start(origin, |c| {
        c.cache.enabled = true;
        tweak(c);
    })
    .await
}

fn setup(origin: &Origin) {
    origin.sql(
        "CREATE TABLE items (id int primary key, name text); \
         INSERT INTO items SELECT g, 'item ' || g FROM generate_series(1, 100) g; \
         GRANT ALL ON items TO app; \
         CREATE SEQUENCE ticks; GRANT ALL ON ticks TO app; \
         CREATE FUNCTION tick(i int) RETURNS int LANGUAGE plpgsql IMMUTABLE AS \
           $$ BEGIN PERFORM nextval('ticks'); RETURN i; END $$; \
         CREATE FUNCTION slow_tick(i int) RETURNS int LANGUAGE plpgsql IMMUTABLE AS \
           $$ BEGIN PERFORM pg_sleep(0.3); PERFORM nextval('ticks'); RETURN i; END $$",
    );
}

#[tokio::test]
async fn repeated_reads_are_answered_without_the_origin() {
    let origin = Origin::start();
    setup(&origin);
    let pgwarp = cached(&origin, |_| {}).await;
    let client = pgwarp.client().await;
    warm(&client, "SELECT name FROM items WHERE id = 1").await;
    let before = ticks(&origin);
    let stmt = client.prepare("SELECT name FROM items WHERE id = tick($1)").await.unwrap();
    for _ in 0..200 {
        assert_eq!(first(&client.simple_query("SELECT name FROM items WHERE id = tick(7)").await.unwrap()), "item 7");
        // The extended protocol, with a named statement reused.
        let row = client.query_one(&stmt, &[&8i32]).await.unwrap();
        assert_eq!(row.get::<_, String>(0), "item 8");
    }
    let ran = ticks(&origin) - before;
    assert!(ran <= 2, "the origin ran {ran} of 400 repeated reads");
}

#[tokio::test]
async fn volatile_sql_is_never_cached() {
    let origin = Origin::start();
    setup(&origin);
    origin.sql(
        "CREATE SEQUENCE seq; GRANT ALL ON seq TO app; \
         CREATE FUNCTION bump() RETURNS int LANGUAGE sql VOLATILE AS 'SELECT 1'; \
         CREATE FUNCTION counter() RETURNS bigint LANGUAGE sql VOLATILE AS $$SELECT nextval('seq')$$",
    );
    let pgwarp = cached(&origin, |_| {}).await;
    let client = pgwarp.client().await;
    warm(&client, "SELECT name FROM items WHERE id = 1").await;
    for sql in ["SELECT random()::text", "SELECT now()::text", "SELECT clock_timestamp()::text"] {
        let a = first(&client.simple_query(sql).await.unwrap());
        tokio::time::sleep(Duration::from_millis(5)).await;
        let b = first(&client.simple_query(sql).await.unwrap());
        assert_ne!(a, b, "{sql} was served from the cache");
    }
    let a = first(&client.simple_query("SELECT nextval('seq')").await.unwrap());
    let b = first(&client.simple_query("SELECT nextval('seq')").await.unwrap());
    assert_ne!(a, b);
    let a = first(&client.simple_query("SELECT counter()").await.unwrap());
    let b = first(&client.simple_query("SELECT counter()").await.unwrap());
    assert_ne!(a, b, "a user-defined VOLATILE function must run every time");
    // In a comment or a string, the same words change nothing.
    let v = first(&client.simple_query("SELECT 'random()' /* now() */ || name FROM items WHERE id = 2").await.unwrap());
    assert_eq!(v, "random()item 2");
}

#[tokio::test]
async fn own_and_other_clients_see_a_write_through_pgwarp_at_once() {
    let origin = Origin::start();
    setup(&origin);
    let pgwarp = cached(&origin, |_| {}).await;
    let writer = pgwarp.client().await;
    let reader = pgwarp.client().await;
    let read = "SELECT name FROM items WHERE id = 3";
    warm(&writer, read).await;
    assert_eq!(first(&reader.simple_query(read).await.unwrap()), "item 3");
    // Implicit transaction, simple protocol.
    writer.simple_query("UPDATE items SET name = 'renamed' WHERE id = 3").await.unwrap();
    assert_eq!(first(&writer.simple_query(read).await.unwrap()), "renamed");
    assert_eq!(first(&reader.simple_query(read).await.unwrap()), "renamed");
    // Explicit transaction, extended protocol: visible once it commits.
    writer.batch_execute("BEGIN").await.unwrap();
    writer.execute("UPDATE items SET name = $1 WHERE id = 3", &[&"again"]).await.unwrap();
    assert_eq!(first(&reader.simple_query(read).await.unwrap()), "renamed");
    writer.batch_execute("COMMIT").await.unwrap();
    assert_eq!(first(&reader.simple_query(read).await.unwrap()), "again");
    // DDL and TRUNCATE too.
    writer.simple_query("TRUNCATE items").await.unwrap();
    assert_eq!(first(&reader.simple_query(read).await.unwrap()), "");
    // COPY FROM.
    let sink = writer.copy_in("COPY items FROM STDIN").await.unwrap();
    futures_util::pin_mut!(sink);
    futures_util::SinkExt::send(&mut sink, bytes::Bytes::from_static(b"3\tcopied\n")).await.unwrap();
    sink.finish().await.unwrap();
    assert_eq!(first(&reader.simple_query(read).await.unwrap()), "copied");
}

#[tokio::test]
async fn a_write_hidden_by_standard_conforming_strings_off_is_not_taken_for_a_read() {
    let origin = Origin::start();
    setup(&origin);
    let pgwarp = cached(&origin, |_| {}).await;
    let client = pgwarp.client().await;
    let read = "SELECT name FROM items WHERE id = 5";
    warm(&client, read).await;
    assert_eq!(first(&client.simple_query(read).await.unwrap()), "item 5");
    client.simple_query("SET standard_conforming_strings = off").await.unwrap();
    client.simple_query("SET escape_string_warning = off").await.unwrap();
    // Read with the setting on, this is one string; with it off, it is a string and a DELETE.
    let hidden = r"SELECT '\''; DELETE FROM items WHERE id = 5; --'";
    for _ in 0..3 {
        client.simple_query(hidden).await.unwrap();
    }
    assert_eq!(origin.sql("SELECT count(*) FROM items WHERE id = 5").trim(), "0", "the DELETE ran at the origin");
    assert_eq!(first(&client.simple_query(read).await.unwrap()), "", "and the cached read saw it");
    let other = pgwarp.client().await;
    assert_eq!(first(&other.simple_query(read).await.unwrap()), "");
}

#[tokio::test]
async fn a_write_pipelined_behind_a_recorded_read_still_invalidates() {
    let origin = Origin::start();
    setup(&origin);
    let pgwarp = cached(&origin, |_| {}).await;
    let writer = pgwarp.client().await;
    let reader = pgwarp.client().await;
    warm(&writer, "SELECT name FROM items WHERE id = 1").await;
    let sql = "SELECT name FROM items WHERE id = $1";
    let (read, reread) = (writer.prepare(sql).await.unwrap(), reader.prepare(sql).await.unwrap());
    let update = writer.prepare("UPDATE items SET name = $2 WHERE id = $1").await.unwrap();
    for id in 10..40i32 {
        let new = format!("new {id}");
        // Sent back to back on one connection: the read's answer is being recorded while the
        // write is already on its way, on the same origin connection.
        let (read_params, update_params): (&[&(dyn ToSql + Sync)], &[&(dyn ToSql + Sync)]) = (&[&id], &[&id, &new]);
        let (r, w) = tokio::join!(writer.query_one(&read, read_params), writer.execute(&update, update_params));
        assert_eq!(r.unwrap().get::<_, String>(0), format!("item {id}"));
        assert_eq!(w.unwrap(), 1);
        assert_eq!(writer.query_one(&read, &[&id]).await.unwrap().get::<_, String>(0), new);
        assert_eq!(reader.query_one(&reread, &[&id]).await.unwrap().get::<_, String>(0), new);
    }
}

#[tokio::test]
async fn users_never_see_each_others_cached_rows() {
    let origin = Origin::start();
    origin.sql(
        "CREATE TABLE notes (owner text, body text); \
         INSERT INTO notes VALUES ('alice', 'alice secret'), ('bob', 'bob secret'); \
         ALTER TABLE notes ENABLE ROW LEVEL SECURITY; \
         CREATE POLICY own ON notes USING (owner = current_user); \
         CREATE ROLE alice LOGIN PASSWORD 'a'; CREATE ROLE bob LOGIN PASSWORD 'b'; \
         GRANT SELECT ON notes TO alice, bob; GRANT CONNECT ON DATABASE app TO alice, bob",
    );
    let pgwarp = cached(&origin, |c| {
        for (name, pw) in [("alice", "a"), ("bob", "b")] {
            c.users.insert(
                name.into(),
                pgwarp::config::UserConfig { password: pw.into(), origin_user: None, origin_password: None },
            );
        }
    })
    .await;
    let alice = common::connect(&pgwarp.url_as("alice", "a")).await.unwrap();
    let bob = common::connect(&pgwarp.url_as("bob", "b")).await.unwrap();
    let sql = "SELECT string_agg(body, ',') FROM notes";
    warm(&alice, sql).await;
    warm(&bob, sql).await;
    for _ in 0..5 {
        assert_eq!(first(&alice.simple_query(sql).await.unwrap()), "alice secret");
        assert_eq!(first(&bob.simple_query(sql).await.unwrap()), "bob secret");
    }
}

#[tokio::test]
async fn stale_entries_are_served_then_refreshed() {
    let origin = Origin::start();
    setup(&origin);
    let pgwarp = cached(&origin, |c| {
        c.cache.max_age = Duration::from_millis(300);
        c.cache.stale_while_revalidate = Duration::from_secs(30);
    })
    .await;
    let client = pgwarp.client().await;
    let read = "SELECT name FROM items WHERE id = 5";
    warm(&client, read).await;
    assert_eq!(first(&client.simple_query(read).await.unwrap()), "item 5");
    // A write behind pgwarp's back: only freshness limits how long it is unseen.
    origin.sql("UPDATE items SET name = 'changed' WHERE id = 5");
    tokio::time::sleep(Duration::from_millis(400)).await;
    // Stale: served as is, while one refresh runs in the background.
    assert_eq!(first(&client.simple_query(read).await.unwrap()), "item 5");
    let mut seen = String::new();
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(20)).await;
        seen = first(&client.simple_query(read).await.unwrap());
        if seen == "changed" {
            break;
        }
    }
    assert_eq!(seen, "changed", "the background refresh should have replaced the stale entry");
}

#[tokio::test]
async fn results_over_the_entry_cap_stream_through_uncached() {
    let origin = Origin::start();
    setup(&origin);
    let pgwarp = cached(&origin, |c| c.cache.max_entry_size = 16 * 1024).await;
    let client = pgwarp.client().await;
    let sql = "SELECT repeat(name, 100 + 0 * tick(id)) FROM items";
    warm(&client, "SELECT name FROM items WHERE id = 1").await;
    let before = ticks(&origin);
    for _ in 0..3 {
        let rows = client.query(sql, &[]).await.unwrap();
        assert_eq!(rows.len(), 100);
        assert_eq!(rows[9].get::<_, String>(0), "item 10".repeat(100));
    }
    assert_eq!(ticks(&origin) - before, 300, "a result over the cap must come from the origin every time");
}

#[tokio::test]
async fn concurrent_misses_make_one_origin_query() {
    let origin = Origin::start();
    setup(&origin);
    let pgwarp = cached(&origin, |c| c.pool_size = 10).await;
    let first_client = pgwarp.client().await;
    warm(&first_client, "SELECT name FROM items WHERE id = 1").await;
    let before = ticks(&origin);
    let clients = join_all((0..8).map(|_| pgwarp.client())).await;
    let answers =
        join_all(clients.iter().map(|c| c.simple_query("SELECT slow_tick(id), name FROM items WHERE id = 42"))).await;
    for a in answers {
        assert_eq!(first(&a.unwrap()), "42");
    }
    assert_eq!(ticks(&origin) - before, 1, "eight concurrent identical misses should reach the origin once");
}

#[tokio::test]
async fn nothing_is_cached_inside_a_transaction_or_with_the_opt_out() {
    let origin = Origin::start();
    setup(&origin);
    let pgwarp = cached(&origin, |_| {}).await;
    let client = pgwarp.client().await;
    warm(&client, "SELECT name FROM items WHERE id = 9").await;
    let before = ticks(&origin);
    client.batch_execute("BEGIN").await.unwrap();
    for _ in 0..3 {
        client.simple_query("SELECT name FROM items WHERE id = tick(9)").await.unwrap();
    }
    client.batch_execute("COMMIT").await.unwrap();
    for _ in 0..3 {
        client.simple_query("/* pgwarp:nocache */ SELECT name FROM items WHERE id = tick(9)").await.unwrap();
    }
    assert_eq!(ticks(&origin) - before, 6);
}

#[tokio::test]
async fn no_cache_flag_turns_it_off() {
    let origin = Origin::start();
    setup(&origin);
    let pgwarp = Pgwarp::start(&origin, |_| {}).await; // the harness default is off
    let client = pgwarp.client().await;
    for _ in 0..5 {
        client.simple_query("SELECT name FROM items WHERE id = tick(1)").await.unwrap();
    }
    assert_eq!(ticks(&origin), 5);
}

#[tokio::test]
async fn settings_that_change_rows_keep_clients_apart() {
    let origin = Origin::start();
    origin.sql(
        "CREATE TABLE docs (tenant text, body text); \
         INSERT INTO docs VALUES ('a', 'secret of a'), ('b', 'secret of b'); \
         ALTER TABLE docs ENABLE ROW LEVEL SECURITY; \
         CREATE POLICY tenant ON docs USING (tenant = current_setting('app.tenant', true)); \
         GRANT SELECT ON docs TO app; \
         CREATE TABLE n (v int); INSERT INTO n VALUES (NULL), (NULL); GRANT ALL ON n TO app;",
    );
    let pgwarp = cached(&origin, |_| {}).await;
    let a = pgwarp.client().await;
    let b = pgwarp.client().await;
    // Multi-tenant row-level security keyed by a custom setting, on one login user.
    let read = "SELECT string_agg(body, ',') FROM docs";
    a.simple_query("SET app.tenant = 'a'").await.unwrap();
    b.simple_query("SET app.tenant = 'b'").await.unwrap();
    warm(&a, read).await;
    assert_eq!(first(&a.simple_query(read).await.unwrap()), "secret of a");
    assert_eq!(first(&b.simple_query(read).await.unwrap()), "secret of b", "tenant b was served a's rows");
    // A setting that changes which rows match.
    let nulls = "SELECT count(*) FROM n WHERE v = NULL";
    warm(&a, nulls).await;
    assert_eq!(first(&a.simple_query(nulls).await.unwrap()), "0");
    b.simple_query("SET transform_null_equals = on").await.unwrap();
    assert_eq!(first(&b.simple_query(nulls).await.unwrap()), "2");
}

#[tokio::test]
async fn set_role_is_part_of_the_key() {
    let origin = Origin::start();
    origin.sql(
        "CREATE TABLE notes (owner text, body text); \
         INSERT INTO notes VALUES ('app', 'app secret'), ('alice', 'alice secret'), ('bob', 'bob secret'); \
         ALTER TABLE notes ENABLE ROW LEVEL SECURITY; \
         CREATE POLICY own ON notes USING (owner = current_user); \
         CREATE ROLE alice; CREATE ROLE bob; GRANT alice, bob TO app; \
         GRANT SELECT ON notes TO alice, bob, app;",
    );
    let pgwarp = cached(&origin, |_| {}).await;
    let a = pgwarp.client().await;
    let b = pgwarp.client().await;
    let read = "SELECT string_agg(body, ',') FROM notes";
    warm(&a, read).await;
    assert_eq!(first(&a.simple_query(read).await.unwrap()), "app secret");
    a.simple_query("SET ROLE alice").await.unwrap();
    warm(&a, read).await;
    assert_eq!(first(&a.simple_query(read).await.unwrap()), "alice secret", "served app's rows after SET ROLE");
    b.simple_query("SET ROLE bob").await.unwrap();
    assert_eq!(first(&b.simple_query(read).await.unwrap()), "bob secret", "bob was served alice's rows");
}

#[tokio::test]
async fn a_clock_word_bound_as_a_parameter_is_not_cached() {
    let origin = Origin::start();
    setup(&origin);
    let pgwarp = cached(&origin, |_| {}).await;
    let client = pgwarp.client().await;
    warm(&client, "SELECT name FROM items WHERE id = 1").await;
    let read = "SELECT tick(1), $1::text::timestamptz";
    let before = ticks(&origin);
    for _ in 0..3 {
        client.query_one(read, &[&"now"]).await.unwrap();
    }
    assert_eq!(ticks(&origin) - before, 3, "'now' bound to a timestamp was answered from the cache");
}

#[tokio::test]
async fn built_in_stable_functions_of_keyed_settings_are_cached_per_setting() {
    let origin = Origin::start();
    setup(&origin);
    origin.sql(
        "CREATE TABLE events (id int, at timestamptz); \
         INSERT INTO events VALUES (1, '2024-03-10 01:30:00+00'), (2, '2024-07-01 12:00:00+00'); \
         GRANT SELECT ON events TO app",
    );
    let pgwarp = cached(&origin, |_| {}).await;
    let utc = pgwarp.client().await;
    let tokyo = pgwarp.client().await;
    utc.simple_query("SET TimeZone = 'UTC'").await.unwrap();
    tokyo.simple_query("SET TimeZone = 'Asia/Tokyo'").await.unwrap();
    // to_char and json_agg are STABLE only because they follow TimeZone, DateStyle and the
    // like, which the key holds: each client gets its own zone's answer, from the cache.
    let read = "SELECT to_char(date_trunc('day', at), 'YYYY-MM-DD HH24:MI TZ'), \
                json_agg(json_build_object('id', id, 'at', at))::text \
                FROM events WHERE id = tick(1) GROUP BY at";
    warm(&utc, read).await;
    warm(&tokyo, read).await;
    let before = ticks(&origin);
    for _ in 0..50 {
        let rows = utc.simple_query(read).await.unwrap();
        assert_eq!(first(&rows), "2024-03-10 00:00 UTC");
        assert!(cell(&rows, 1).contains("2024-03-10T01:30:00+00:00"), "{}", cell(&rows, 1));
        let rows = tokyo.simple_query(read).await.unwrap();
        assert_eq!(first(&rows), "2024-03-10 00:00 JST");
        assert!(cell(&rows, 1).contains("2024-03-10T10:30:00+09:00"), "{}", cell(&rows, 1));
    }
    let ran = ticks(&origin) - before;
    assert!(ran <= 2, "the origin ran {ran} of 100 repeated reads");
    // What reads the clock stays uncached, STABLE or not: age() with one argument counts from
    // today, timezone() resolves daylight saving time by today's date.
    for sql in [
        "SELECT to_char(now(), 'HH24:MI:SS.US') FROM events WHERE id = tick(1)",
        "SELECT age(at)::text FROM events WHERE id = tick(1)",
        "SELECT timezone('Europe/Paris', '12:00+00'::timetz)::text FROM events WHERE id = tick(1)",
    ] {
        let before = ticks(&origin);
        for _ in 0..3 {
            utc.simple_query(sql).await.unwrap();
        }
        assert_eq!(ticks(&origin) - before, 3, "{sql} was served from the cache");
    }
}

/// Column `i` of the first row.
fn cell(msgs: &[tokio_postgres::SimpleQueryMessage], i: usize) -> String {
    msgs.iter()
        .find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => Some(r.get(i).unwrap_or("").to_string()),
            _ => None,
        })
        .unwrap()
}
