//! Transaction pooling against a real Postgres: correctness under concurrency, pinning, state
//! isolation between clients, cancel, limits and faults.

mod common;
mod support;

use std::time::{Duration, Instant};

use futures_util::future::join_all;
use support::*;
use tokio_postgres::NoTls;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_clients_share_a_pool_of_three_with_correct_results() {
    let origin = Origin::start();
    let pgwarp = Pgwarp::start(&origin, |c| c.pool_size = 3).await;
    let tasks = (0..50).map(|i| {
        let url = pgwarp.url();
        tokio::spawn(async move {
            let client = common::connect(&url).await.unwrap();
            for j in 0..20i32 {
                let row = client.query_one("SELECT $1::int * 1000 + $2::int", &[&i, &j]).await.unwrap();
                assert_eq!(row.get::<_, i32>(0), i * 1000 + j);
                let rows = client.simple_query(&format!("SELECT {i} + {j}")).await.unwrap();
                let tokio_postgres::SimpleQueryMessage::Row(r) = &rows[1] else { panic!("no row") };
                assert_eq!(r.get(0).unwrap(), (i + j).to_string());
            }
        })
    });
    for t in join_all(tasks).await {
        t.unwrap();
    }
    let backends = origin.sql("SELECT count(*) FROM pg_stat_activity WHERE usename = 'app'");
    assert!(backends.parse::<i32>().unwrap() <= 3, "pool of 3 used {backends} origin connections");
}

#[tokio::test]
async fn clients_on_every_worker_share_one_pool_of_its_configured_size() {
    let origin = Origin::start();
    // More worker threads than connections: a worker with none of its own borrows another's,
    // and the pool's size holds across all of them.
    let pgwarp = Pgwarp::start(&origin, |c| {
        c.pool_size = 1;
        c.workers = 4;
    })
    .await;
    let clients: Vec<_> = join_all((0..8).map(|_| pgwarp.client())).await;
    let pids = join_all(clients.iter().enumerate().map(|(i, c)| async move {
        let mut pids = std::collections::BTreeSet::new();
        for j in 0..25i32 {
            let row =
                c.query_one("SELECT $1::int * 100 + $2::int, pg_backend_pid()", &[&(i as i32), &j]).await.unwrap();
            assert_eq!(row.get::<_, i32>(0), i as i32 * 100 + j);
            pids.insert(row.get::<_, i32>(1));
        }
        pids
    }))
    .await;
    let all: std::collections::BTreeSet<i32> = pids.into_iter().flatten().collect();
    assert_eq!(all.len(), 1, "a pool of 1 used origin backends {all:?}");
}

#[tokio::test]
async fn transaction_stays_on_one_connection_and_other_clients_still_run() {
    let origin = Origin::start();
    let pgwarp = Pgwarp::start(&origin, |c| c.pool_size = 2).await;
    let a = pgwarp.client().await;
    let b = pgwarp.client().await;
    a.batch_execute("BEGIN").await.unwrap();
    let pid1: i32 = a.query_one("SELECT pg_backend_pid()", &[]).await.unwrap().get(0);
    for _ in 0..10 {
        b.query_one("SELECT 1", &[]).await.unwrap();
    }
    let pid2: i32 = a.query_one("SELECT pg_backend_pid()", &[]).await.unwrap().get(0);
    assert_eq!(pid1, pid2, "a transaction must stay on its origin connection");
    a.batch_execute("COMMIT").await.unwrap();
}

#[tokio::test]
async fn disconnect_mid_transaction_rolls_back_and_frees_row_locks() {
    let origin = Origin::start();
    origin.sql("CREATE TABLE accounts (id int primary key, balance int); INSERT INTO accounts VALUES (1, 100)");
    origin.sql("GRANT ALL ON accounts TO app");
    let pgwarp = Pgwarp::start(&origin, |c| c.pool_size = 1).await;
    {
        let a = pgwarp.client().await;
        a.batch_execute("BEGIN; UPDATE accounts SET balance = 0 WHERE id = 1").await.unwrap();
        a.query_one("SELECT * FROM accounts WHERE id = 1 FOR UPDATE", &[]).await.unwrap();
        // Dropped here without COMMIT: the client vanishes.
    }
    let b = pgwarp.client().await;
    let start = Instant::now();
    b.batch_execute("SET lock_timeout = '2s'").await.unwrap();
    let row = b.query_one("SELECT balance FROM accounts WHERE id = 1 FOR UPDATE", &[]).await.unwrap();
    assert_eq!(row.get::<_, i32>(0), 100, "the vanished client's update must be rolled back");
    assert!(start.elapsed() < Duration::from_secs(2), "the row lock was held after the client left");
    assert_eq!(origin.sql("SELECT count(*) FROM pg_stat_activity WHERE state LIKE 'idle in transaction%'"), "0");
}

#[tokio::test]
async fn settings_of_a_client_that_vanishes_mid_transaction_do_not_reach_the_next() {
    let origin = Origin::start();
    let pgwarp = Pgwarp::start(&origin, |c| c.pool_size = 1).await;
    {
        let a = pgwarp.client().await;
        // The SET commits (a multi-statement query is one implicit transaction, hence the
        // COMMIT); the BEGIN then holds the connection until a vanishes.
        a.batch_execute("SET statement_timeout = '1234ms'; COMMIT; BEGIN").await.unwrap();
    }
    let b = pgwarp.client().await;
    let timeout: String = b.query_one("SHOW statement_timeout", &[]).await.unwrap().get(0);
    assert_eq!(timeout, "0");
}

#[tokio::test]
async fn session_settings_follow_the_client_not_the_connection() {
    let origin = Origin::start();
    origin.sql("CREATE SCHEMA other AUTHORIZATION app");
    let pgwarp = Pgwarp::start(&origin, |c| c.pool_size = 1).await;
    let a = pgwarp.client().await;
    let b = pgwarp.client().await;
    a.batch_execute("SET search_path = other; SET statement_timeout = '1234ms'").await.unwrap();
    // b gets the same (only) origin connection and must not see a's settings.
    let b_path: String = b.query_one("SHOW search_path", &[]).await.unwrap().get(0);
    let b_timeout: String = b.query_one("SHOW statement_timeout", &[]).await.unwrap().get(0);
    assert_eq!((b_path.as_str(), b_timeout.as_str()), ("\"$user\", public", "0"));
    b.batch_execute("SET statement_timeout = '5s'").await.unwrap();
    // a still has its own, after b used the connection.
    let a_path: String = a.query_one("SHOW search_path", &[]).await.unwrap().get(0);
    let a_timeout: String = a.query_one("SHOW statement_timeout", &[]).await.unwrap().get(0);
    assert_eq!((a_path.as_str(), a_timeout.as_str()), ("other", "1234ms"));
    let b_timeout: String = b.query_one("SHOW statement_timeout", &[]).await.unwrap().get(0);
    assert_eq!(b_timeout, "5s");
    // RESET returns to the default, as in Postgres.
    a.batch_execute("RESET statement_timeout").await.unwrap();
    let a_timeout: String = a.query_one("SHOW statement_timeout", &[]).await.unwrap().get(0);
    assert_eq!(a_timeout, "0");
    // A SET rolled back with its transaction does not stick.
    a.batch_execute("BEGIN; SET search_path = public; ROLLBACK").await.unwrap();
    let a_path: String = a.query_one("SHOW search_path", &[]).await.unwrap().get(0);
    assert_eq!(a_path, "other");
}

#[tokio::test]
async fn set_role_follows_the_client_not_the_connection() {
    let origin = Origin::start();
    origin.sql("CREATE ROLE alice; GRANT alice TO app");
    let pgwarp = Pgwarp::start(&origin, |c| c.pool_size = 1).await;
    let a = pgwarp.client().await;
    let b = pgwarp.client().await;
    a.batch_execute("SET ROLE alice").await.unwrap();
    // b gets the same (only) connection and must run as itself, not with a's privileges.
    let b_user: String = b.query_one("SELECT current_user::text", &[]).await.unwrap().get(0);
    assert_eq!(b_user, APP_USER);
    let a_user: String = a.query_one("SELECT current_user::text", &[]).await.unwrap().get(0);
    assert_eq!(a_user, "alice", "the client lost its own SET ROLE");
    a.batch_execute("RESET ROLE").await.unwrap();
    let a_user: String = a.query_one("SELECT current_user::text", &[]).await.unwrap().get(0);
    assert_eq!(a_user, APP_USER);
}

async fn get(c: &tokio_postgres::Client, sql: &str) -> String {
    c.query_one(sql, &[]).await.unwrap().get::<_, Option<String>>(0).unwrap_or_default()
}

#[tokio::test]
async fn custom_settings_and_settings_changed_in_code_stay_with_their_client() {
    let origin = Origin::start();
    let pgwarp = Pgwarp::start(&origin, |c| c.pool_size = 1).await;
    let a = pgwarp.client().await;
    let b = pgwarp.client().await;
    // The usual key of row-level security policies: a custom setting, invisible to pg_settings.
    a.batch_execute("SET app.tenant = 'a'").await.unwrap();
    assert_eq!(get(&b, "SELECT current_setting('app.tenant', true)").await, "");
    assert_eq!(get(&a, "SELECT current_setting('app.tenant', true)").await, "a");
    // Set inside code pgwarp cannot read: a DO block.
    a.batch_execute("DO $$ BEGIN PERFORM set_config('statement_timeout', '1234', false); END $$").await.unwrap();
    assert_eq!(get(&b, "SHOW statement_timeout").await, "0");
    assert_eq!(get(&a, "SHOW statement_timeout").await, "1234ms");
    // A custom setting whose name pgwarp never saw: the connection is reset before b gets it.
    a.batch_execute("DO $$ BEGIN PERFORM set_config('hidden.' || 'name', 'x', false); END $$").await.unwrap();
    assert_eq!(get(&b, "SELECT current_setting('hidden.name', true)").await, "");
    assert_eq!(get(&a, "SELECT current_setting('app.tenant', true)").await, "a");
}

#[tokio::test]
async fn a_temp_table_made_by_select_into_never_reaches_another_client() {
    let origin = Origin::start();
    origin
        .sql("CREATE TABLE items (id int, name text); INSERT INTO items VALUES (1, 'one'); GRANT ALL ON items TO app");
    let pgwarp = Pgwarp::start(&origin, |c| c.pool_size = 1).await;
    let a = pgwarp.client().await;
    // A temp table shadows the real one for the rest of the origin session.
    a.batch_execute("SELECT 1 AS id, 'fake'::text AS name INTO TEMP items").await.unwrap();
    let a_name: String = a.query_one("SELECT name FROM items", &[]).await.unwrap().get(0);
    assert_eq!(a_name, "fake");
    drop(a);
    // The connection was pinned to a and reset before anyone else got it.
    let b = pgwarp.client().await;
    let b_name: String = b.query_one("SELECT name FROM items", &[]).await.unwrap().get(0);
    assert_eq!(b_name, "one");
}

#[tokio::test]
async fn startup_parameters_apply_to_every_query_of_that_client() {
    let origin = Origin::start();
    origin.sql("CREATE SCHEMA s2 AUTHORIZATION app");
    let pgwarp = Pgwarp::start(&origin, |c| c.pool_size = 1).await;
    let url = format!(
        "{}?application_name=reporter&options=-c%20search_path%3Ds2%20-c%20TimeZone%3DAsia/Tokyo",
        pgwarp.url()
    );
    let a = common::connect(&url).await.unwrap();
    let plain = pgwarp.client().await;
    for _ in 0..3 {
        let row = a
            .query_one("SELECT current_setting('application_name'), current_setting('search_path'), current_setting('TimeZone')", &[])
            .await
            .unwrap();
        assert_eq!(
            (row.get::<_, String>(0), row.get::<_, String>(1), row.get::<_, String>(2)),
            ("reporter".into(), "s2".into(), "Asia/Tokyo".into())
        );
        let tz: String = plain.query_one("SHOW TimeZone", &[]).await.unwrap().get(0);
        assert_ne!(tz, "Asia/Tokyo");
    }
}

#[tokio::test]
async fn cancel_stops_the_clients_own_query_only() {
    let origin = Origin::start();
    let pgwarp = Pgwarp::start(&origin, |c| c.pool_size = 2).await;
    let a = pgwarp.client().await;
    let b = pgwarp.client().await;
    let token = a.cancel_token();
    let slow = tokio::spawn(async move { a.query("SELECT pg_sleep(20)", &[]).await });
    let other = tokio::spawn(async move { b.query_one("SELECT pg_sleep(1.5), 7", &[]).await });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let start = Instant::now();
    token.cancel_query(NoTls).await.unwrap();
    let err = slow.await.unwrap().unwrap_err();
    assert_eq!(code(&err), "57014", "{err}");
    assert!(start.elapsed() < Duration::from_secs(5));
    let row = other.await.unwrap().expect("the other client's query is not cancelled");
    assert_eq!(row.get::<_, i32>(1), 7);
}

#[tokio::test]
async fn wrong_password_and_unknown_user_get_28p01() {
    let origin = Origin::start();
    let pgwarp = Pgwarp::start(&origin, |_| {}).await;
    for (user, password) in [("app", "wrong"), ("nobody", "secret")] {
        let err = common::connect(&pgwarp.url_as(user, password)).await.unwrap_err();
        assert_eq!(code(&err), "28P01", "{user}: {err}");
    }
    pgwarp.client().await.query_one("SELECT 1", &[]).await.unwrap();
}

#[tokio::test]
async fn md5_client_auth_works_when_configured() {
    let origin = Origin::start();
    let pgwarp = Pgwarp::start(&origin, |c| c.auth_method = pgwarp::config::AuthMethod::Md5).await;
    let mut raw = RawClient::open(pgwarp.port).await;
    raw.send(&pgwarp::protocol::build::startup(&[("user", APP_USER), ("database", APP_DB)])).await;
    raw.login(APP_USER, APP_PASSWORD).await.expect("md5 login");
    let mut bad = RawClient::open(pgwarp.port).await;
    bad.send(&pgwarp::protocol::build::startup(&[("user", APP_USER), ("database", APP_DB)])).await;
    assert_eq!(bad.login(APP_USER, "nope").await.unwrap_err().code, "28P01");
}

#[tokio::test]
async fn users_table_adds_logins_mapped_to_origin_roles() {
    let origin = Origin::start();
    let pgwarp = Pgwarp::start(&origin, |c| {
        c.users.insert(
            "reporting".into(),
            pgwarp::config::UserConfig {
                password: "r3port".into(),
                origin_user: Some(APP_USER.into()),
                origin_password: Some(APP_PASSWORD.into()),
            },
        );
    })
    .await;
    let client = common::connect(&pgwarp.url_as("reporting", "r3port")).await.unwrap();
    let user: String = client.query_one("SELECT current_user::text", &[]).await.unwrap().get(0);
    assert_eq!(user, APP_USER);
}

#[tokio::test]
async fn pool_timeout_gives_53300_and_the_client_keeps_its_connection() {
    let origin = Origin::start();
    let pgwarp = Pgwarp::start(&origin, |c| {
        c.pool_size = 1;
        c.pool_timeout = Duration::from_millis(300);
    })
    .await;
    let holder = pgwarp.client().await;
    let waiter = pgwarp.client().await;
    holder.batch_execute("BEGIN").await.unwrap();
    let err = waiter.query_one("SELECT 1", &[]).await.unwrap_err();
    assert_eq!(code(&err), "53300", "{err}");
    holder.batch_execute("COMMIT").await.unwrap();
    let row = waiter.query_one("SELECT 2", &[]).await.expect("same client connection works again");
    assert_eq!(row.get::<_, i32>(0), 2);
}

#[tokio::test]
async fn a_burst_that_waited_reserve_pool_timeout_runs_on_reserve_connections() {
    let origin = Origin::start();
    let pgwarp = Pgwarp::start(&origin, |c| {
        c.pool_size = 1;
        c.reserve_pool_size = 1;
        c.reserve_pool_timeout = Duration::from_millis(300);
        c.pool_timeout = Duration::from_secs(2);
    })
    .await;
    let holder = pgwarp.client().await;
    holder.batch_execute("BEGIN").await.unwrap();
    let held = first(&holder.simple_query("SELECT pg_backend_pid()").await.unwrap());

    // The pool's one connection is in a transaction: after reserve_pool_timeout the next client
    // runs on a second connection, while the pool's is still held.
    let burst = pgwarp.client().await;
    let started = Instant::now();
    let reserve = first(&burst.simple_query("SELECT pg_backend_pid()").await.unwrap());
    let waited = started.elapsed();
    assert_ne!(reserve, held);
    assert!(waited >= Duration::from_millis(290) && waited < Duration::from_millis(1900), "{waited:?}");

    // Pool and reserve both busy: a third waits out pool_timeout and gets 53300.
    burst.batch_execute("BEGIN").await.unwrap();
    let third = pgwarp.client().await;
    let err = third.simple_query("SELECT 1").await.unwrap_err();
    assert_eq!(code(&err), "53300", "{err}");

    // Once the burst is over, the reserve connection stays open for the next one, which runs
    // on it at once: only opening one waits for reserve_pool_timeout.
    burst.batch_execute("COMMIT").await.unwrap();
    holder.batch_execute("COMMIT").await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let open = origin.sql(&format!("SELECT count(*) FROM pg_stat_activity WHERE pid IN ({held}, {reserve})"));
    assert_eq!(open.trim(), "2");
    holder.batch_execute("BEGIN").await.unwrap();
    assert_eq!(first(&holder.simple_query("SELECT pg_backend_pid()").await.unwrap()), held);
    let started = Instant::now();
    assert_eq!(first(&burst.simple_query("SELECT pg_backend_pid()").await.unwrap()), reserve);
    assert!(
        started.elapsed() < Duration::from_millis(250),
        "waited {:?} for an open reserve connection",
        started.elapsed()
    );
    holder.batch_execute("COMMIT").await.unwrap();
    assert_eq!(first(&third.simple_query("SELECT 3").await.unwrap()), "3");
}

#[tokio::test]
async fn waiting_clients_are_served_in_arrival_order() {
    let origin = Origin::start();
    // The order is taken at the origin: when the answers reach this test, two that arrive
    // together may be handled in either order.
    origin.sql("CREATE SEQUENCE served; GRANT ALL ON served TO app");
    let pgwarp = Pgwarp::start(&origin, |c| c.pool_size = 1).await;
    let holder = pgwarp.client().await;
    holder.batch_execute("BEGIN").await.unwrap();
    let mut tasks = Vec::new();
    for _ in 0..5 {
        let client = pgwarp.client().await;
        tasks.push(tokio::spawn(async move {
            // One round trip (the extended protocol would queue twice: prepare, then execute).
            let msgs = client.simple_query("SELECT nextval('served')").await.unwrap();
            msgs.iter()
                .find_map(|m| match m {
                    tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(|v| v.parse::<i64>().unwrap()),
                    _ => None,
                })
                .unwrap()
        }));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    holder.batch_execute("COMMIT").await.unwrap();
    let served: Vec<i64> = join_all(tasks).await.into_iter().map(|r| r.unwrap()).collect();
    assert_eq!(served, vec![1, 2, 3, 4, 5], "client i (in arrival order) was served i-th");
}

#[tokio::test]
async fn max_client_conn_refuses_extra_clients_with_53300() {
    let origin = Origin::start();
    let pgwarp = Pgwarp::start(&origin, |c| c.max_client_conn = 2).await;
    let _a = pgwarp.client().await;
    let _b = pgwarp.client().await;
    let err = common::connect(&pgwarp.url()).await.unwrap_err();
    assert_eq!(code(&err), "53300", "{err}");
    drop(_a);
    tokio::time::sleep(Duration::from_millis(200)).await;
    pgwarp.client().await.query_one("SELECT 1", &[]).await.unwrap();
}

#[tokio::test]
async fn origin_restart_is_survived_without_restarting_pgwarp() {
    let origin = Origin::start();
    let pgwarp = Pgwarp::start(&origin, |c| c.pool_size = 2).await;
    let client = pgwarp.client().await;
    client.query_one("SELECT 1", &[]).await.unwrap();
    origin.cluster.restart();
    // The pooled connection died with the restart; pgwarp notices before reusing it.
    let row = client.query_one("SELECT 2", &[]).await.expect("served after origin restart");
    assert_eq!(row.get::<_, i32>(0), 2);

    origin.cluster.stop();
    let err = client.query_one("SELECT 3", &[]).await.unwrap_err();
    assert_eq!(code(&err), "08006", "{err}");
    origin.cluster.start_again();
    let row = client.query_one("SELECT 4", &[]).await.expect("served again once the origin is back");
    assert_eq!(row.get::<_, i32>(0), 4);
}

#[tokio::test]
async fn copy_in_and_out_pass_through() {
    use futures_util::{SinkExt, StreamExt};
    let origin = Origin::start();
    origin.sql("CREATE TABLE items (id int, name text); GRANT ALL ON items TO app");
    let pgwarp = Pgwarp::start(&origin, |c| c.pool_size = 1).await;
    let client = pgwarp.client().await;
    let sink = client.copy_in("COPY items FROM STDIN").await.unwrap();
    futures_util::pin_mut!(sink);
    let mut data = String::new();
    for i in 0..5000 {
        data.push_str(&format!("{i}\tname {i}\n"));
    }
    sink.send(bytes::Bytes::from(data.clone())).await.unwrap();
    assert_eq!(sink.finish().await.unwrap(), 5000);
    let stream = client.copy_out("COPY (SELECT * FROM items ORDER BY id) TO STDOUT").await.unwrap();
    let chunks: Vec<_> = stream.collect().await;
    let out: Vec<u8> = chunks.into_iter().flat_map(|c| c.unwrap().to_vec()).collect();
    assert_eq!(String::from_utf8(out).unwrap(), data);
    // The connection went back to the pool and is clean.
    let other = pgwarp.client().await;
    assert_eq!(other.query_one("SELECT count(*) FROM items", &[]).await.unwrap().get::<_, i64>(0), 5000);
    // A failing COPY leaves everything in step.
    let sink = client.copy_in("COPY items FROM STDIN").await.unwrap();
    futures_util::pin_mut!(sink);
    sink.send(bytes::Bytes::from_static(b"not-a-number\tx\n")).await.unwrap();
    assert!(sink.finish().await.is_err());
    assert_eq!(client.query_one("SELECT 5", &[]).await.unwrap().get::<_, i32>(0), 5);
}

#[tokio::test]
async fn psql_copy_and_scripts_work() {
    let origin = Origin::start();
    let pgwarp = Pgwarp::start(&origin, |c| c.pool_size = 1).await;
    let out = psql(
        &origin,
        vec![
            "-v".into(),
            "ON_ERROR_STOP=1".into(),
            pgwarp.url(),
            "-c".into(),
            "CREATE TABLE p (a int)".into(),
            "-c".into(),
            "\\copy p FROM PROGRAM 'seq 1 100'".into(),
            "-c".into(),
            "SELECT sum(a) FROM p".into(),
        ],
    )
    .await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).trim().ends_with("5050"));
}

#[tokio::test]
async fn unnamed_statement_is_bound_on_a_rotated_connection() {
    let origin = Origin::start();
    let pgwarp = Pgwarp::start(&origin, |c| c.pool_size = 2).await;
    let mut raw = pgwarp.raw().await;
    raw.send(&batch(&[parse("", "SELECT $1::int + 1, pg_backend_pid()", &[]), sync()])).await;
    assert_eq!(tags(&raw.until_ready().await), "1Z");
    // Another client takes the connection raw just used (most recently used first) and keeps it.
    let holder = pgwarp.client().await;
    holder.batch_execute("BEGIN").await.unwrap();
    let held_pid: i32 = holder.query_one("SELECT pg_backend_pid()", &[]).await.unwrap().get(0);
    raw.send(&batch(&[bind("", "", &["41"]), execute("", 0), sync()])).await;
    let msgs = raw.until_ready().await;
    assert_eq!(tags(&msgs), "2DCZ", "the replayed Parse's ParseComplete must be hidden");
    let row = pgwarp::protocol::backend::data_row_text(msgs[1].body()).unwrap();
    assert_eq!(row[0].as_deref(), Some("42"));
    assert_ne!(row[1].as_deref(), Some(held_pid.to_string().as_str()), "should have run on the other connection");
    holder.batch_execute("COMMIT").await.unwrap();
}

#[tokio::test]
async fn pipelined_batches_with_an_error_in_the_middle_stay_in_step() {
    let origin = Origin::start();
    let pgwarp = Pgwarp::start(&origin, |c| c.pool_size = 1).await;
    let mut raw = pgwarp.raw().await;
    raw.send(&batch(&[
        parse("", "SELECT 1", &[]),
        bind("", "", &[]),
        execute("", 0),
        sync(),
        parse("", "SELECT 1/0", &[]),
        bind("", "", &[]),
        execute("", 0),
        parse("", "SELECT 3", &[]),
        bind("", "", &[]),
        execute("", 0),
        sync(),
        parse("", "SELECT 4", &[]),
        bind("", "", &[]),
        execute("", 0),
        sync(),
    ]))
    .await;
    let first = raw.until_ready().await;
    assert_eq!(tags(&first), "12DCZ");
    let second = raw.until_ready().await;
    // 1/0 is folded when the statement is planned, at Bind: Postgres answers 1 E Z and skips
    // the rest until Sync.
    assert_eq!(tags(&second), "1EZ", "after the error everything until Sync is skipped");
    assert_eq!(error_code(&second).as_deref(), Some("22012"));
    let third = raw.until_ready().await;
    assert_eq!(first_column(&third), vec![Some("4".into())]);
    // And tokio-postgres, which pipelines concurrent queries on one connection.
    let client = pgwarp.client().await;
    let futures = (0..20).map(|i: i32| {
        let client = &client;
        async move {
            if i == 7 {
                assert!(client.query_one("SELECT 1/0", &[]).await.is_err());
            } else {
                let row = client.query_one("SELECT $1::int", &[&i]).await.unwrap();
                assert_eq!(row.get::<_, i32>(0), i);
            }
        }
    });
    join_all(futures).await;
}

#[tokio::test]
async fn flush_pins_until_sync_for_describe_then_wait_drivers() {
    let origin = Origin::start();
    let pgwarp = Pgwarp::start(&origin, |c| c.pool_size = 1).await;
    let mut raw = pgwarp.raw().await;
    raw.send(&batch(&[parse("", "SELECT $1::text AS t", &[]), describe(b'S', ""), flush()])).await;
    let mut got = Vec::new();
    for _ in 0..3 {
        got.push(raw.recv().await);
    }
    assert_eq!(tags(&got), "1tT");
    // Another client's work waits: the connection is pinned until raw's Sync.
    let other = pgwarp.client().await;
    let other_task = tokio::spawn(async move { other.query_one("SELECT 9", &[]).await.unwrap().get::<_, i32>(0) });
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!other_task.is_finished());
    raw.send(&batch(&[bind("", "", &["hi"]), execute("", 0), sync()])).await;
    assert_eq!(first_column(&raw.until_ready().await), vec![Some("hi".into())]);
    assert_eq!(other_task.await.unwrap(), 9);
}

#[tokio::test]
async fn oversized_and_garbage_messages_are_refused_and_others_keep_working() {
    let origin = Origin::start();
    let pgwarp = Pgwarp::start(&origin, |c| c.max_message_size = 64 * 1024).await;
    let good = pgwarp.client().await;

    // A message announcing 100 MB.
    let mut raw = pgwarp.raw().await;
    let mut msg = vec![b'Q'];
    msg.extend_from_slice(&(100_000_000i32).to_be_bytes());
    raw.send(&msg).await;
    let err = raw.recv().await;
    assert_eq!(error_code(&[err]).as_deref(), Some("08P01"));
    assert!(raw.recv_or_eof().await.is_none(), "connection closed after the error");

    // An unknown message type.
    let mut raw = pgwarp.raw().await;
    raw.send(&[b'@', 0, 0, 0, 4]).await;
    assert_eq!(error_code(&[raw.recv().await]).as_deref(), Some("08P01"));

    // A negative length.
    let mut raw = pgwarp.raw().await;
    raw.send(&[b'Q', 0xff, 0xff, 0xff, 0xff]).await;
    assert_eq!(error_code(&[raw.recv().await]).as_deref(), Some("08P01"));

    // A Bind whose fields lie about their lengths.
    let mut raw = pgwarp.raw().await;
    raw.send(&[b'B', 0, 0, 0, 6, b'x', b'y']).await;
    raw.send(&sync()).await;
    assert_eq!(error_code(&[raw.recv().await]).as_deref(), Some("08P01"));

    // Garbage instead of a startup packet.
    let mut raw = RawClient::open(pgwarp.port).await;
    raw.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
    let reply = raw.recv_or_eof().await;
    assert!(reply.is_none_or(|m| m.tag() == b'E'));

    // An old protocol version.
    let mut raw = RawClient::open(pgwarp.port).await;
    let mut v2 = 8i32.to_be_bytes().to_vec();
    v2.extend_from_slice(&(2i32 << 16).to_be_bytes());
    raw.send(&v2).await;
    assert_eq!(error_code(&[raw.recv().await]).as_deref(), Some("0A000"));

    assert_eq!(good.query_one("SELECT 11", &[]).await.unwrap().get::<_, i32>(0), 11);
}

#[tokio::test]
async fn ssl_and_gssenc_requests_are_declined_and_startup_continues() {
    let origin = Origin::start();
    let pgwarp = Pgwarp::start(&origin, |_| {}).await;
    let mut raw = RawClient::open(pgwarp.port).await;
    for code in [80_877_103i32, 80_877_104] {
        let mut req = 8i32.to_be_bytes().to_vec();
        req.extend_from_slice(&code.to_be_bytes());
        raw.send(&req).await;
        let mut answer = [0u8; 1];
        tokio::io::AsyncReadExt::read_exact(&mut raw.stream, &mut answer).await.unwrap();
        assert_eq!(answer[0], b'N');
    }
    raw.send(&pgwarp::protocol::build::startup(&[("user", APP_USER), ("database", APP_DB)])).await;
    raw.login(APP_USER, APP_PASSWORD).await.unwrap();
    // libpq's sslmode=prefer falls back to plain text the same way.
    let out = psql(&origin, vec![format!("{}?sslmode=prefer", pgwarp.url()), "-c".into(), "SELECT 1".into()]).await;
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "1", "{}", String::from_utf8_lossy(&out.stderr));
}

#[tokio::test]
async fn session_scoped_features_pin_the_connection_until_disconnect() {
    let origin = Origin::start();
    let pgwarp = Pgwarp::start(&origin, |c| c.pool_size = 2).await;
    let a = pgwarp.client().await;
    a.batch_execute("CREATE TEMP TABLE scratch (v int)").await.unwrap();
    let others: Vec<_> = join_all((0..3).map(|_| pgwarp.client())).await;
    for o in &others {
        o.query_one("SELECT 1", &[]).await.unwrap();
    }
    a.batch_execute("INSERT INTO scratch VALUES (1)").await.unwrap();
    assert_eq!(a.query_one("SELECT count(*) FROM scratch", &[]).await.unwrap().get::<_, i64>(0), 1);
    drop(a);
    tokio::time::sleep(Duration::from_millis(300)).await;
    // The connection was reset (DISCARD ALL) before going back: nobody else sees the table.
    for o in &others {
        assert!(o.query_one("SELECT count(*) FROM scratch", &[]).await.is_err());
    }
}

#[tokio::test]
async fn parameter_status_and_backend_key_reach_the_client() {
    let origin = Origin::start();
    let pgwarp = Pgwarp::start(&origin, |_| {}).await;
    let mut raw = RawClient::open(pgwarp.port).await;
    raw.send(&pgwarp::protocol::build::startup(&[("user", APP_USER), ("database", APP_DB), ("DateStyle", "German")]))
        .await;
    let mut seen = std::collections::BTreeMap::new();
    let mut key = None;
    let mut scram: Option<postgres_protocol::authentication::sasl::ScramSha256> = None;
    loop {
        let m = raw.recv().await;
        match m.tag() {
            b'R' => match pgwarp::protocol::backend::auth_request(m.body()).unwrap() {
                pgwarp::protocol::backend::AuthRequest::Sasl { .. } => {
                    let s = postgres_protocol::authentication::sasl::ScramSha256::new(
                        APP_PASSWORD.as_bytes(),
                        postgres_protocol::authentication::sasl::ChannelBinding::unsupported(),
                    );
                    raw.send(&pgwarp::protocol::build::sasl_initial_response("SCRAM-SHA-256", s.message())).await;
                    scram = Some(s);
                }
                pgwarp::protocol::backend::AuthRequest::SaslContinue { data } => {
                    let s = scram.as_mut().unwrap();
                    s.update(data).unwrap();
                    let reply = pgwarp::protocol::build::password(s.message());
                    raw.send(&reply).await;
                }
                _ => {}
            },
            b'S' => {
                let (k, v) = pgwarp::protocol::backend::parameter_status(m.body()).unwrap();
                seen.insert(k.to_owned(), v.to_owned());
            }
            b'K' => key = Some(pgwarp::protocol::backend::backend_key_data(m.body()).unwrap()),
            b'Z' => break,
            _ => {}
        }
    }
    for name in [
        "server_version",
        "server_encoding",
        "client_encoding",
        "TimeZone",
        "integer_datetimes",
        "standard_conforming_strings",
    ] {
        assert!(seen.contains_key(name), "missing {name}: {seen:?}");
    }
    assert!(seen["DateStyle"].starts_with("German"), "{seen:?}");
    assert!(key.is_some());
}
