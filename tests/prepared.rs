//! Named prepared statements through transaction pooling, against a real Postgres, with pools
//! much smaller than the number of clients so statements keep landing on connections that
//! lack them.

mod common;
mod support;

use std::time::Duration;

use futures_util::future::join_all;
use support::*;
use tokio_postgres::SimpleQueryMessage;

fn rows(msgs: &[SimpleQueryMessage]) -> Vec<String> {
    msgs.iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(r) => Some(r.get(0).unwrap_or("NULL").to_owned()),
            _ => None,
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statements_survive_rotation_for_many_clients_on_a_tiny_pool() {
    let origin = Origin::start();
    let pgwarp = Pgwarp::start(&origin, |c| c.pool_size = 3).await;
    let tasks = (0..24).map(|i: i32| {
        let url = pgwarp.url();
        tokio::spawn(async move {
            let client = common::connect(&url).await.unwrap();
            // Every client's first statement is "s0" in tokio-postgres, with different SQL each.
            let mine = client.prepare(&format!("SELECT $1::int + {i}")).await.unwrap();
            let shared = client.prepare("SELECT $1::text || '!'").await.unwrap();
            let two = client.prepare("SELECT $1::int * $2::int").await.unwrap();
            for j in 0..30i32 {
                assert_eq!(client.query_one(&mine, &[&j]).await.unwrap().get::<_, i32>(0), j + i);
                let s: String = client.query_one(&shared, &[&format!("c{i}")]).await.unwrap().get(0);
                assert_eq!(s, format!("c{i}!"));
                assert_eq!(client.query_one(&two, &[&i, &j]).await.unwrap().get::<_, i32>(0), i * j);
            }
        })
    });
    for t in join_all(tasks).await {
        t.unwrap();
    }
    // Shared SQL is one statement per origin connection, not one per client.
    let prepared = origin.sql("SELECT count(*) FROM pg_stat_activity WHERE usename = 'app'");
    assert!(prepared.parse::<i32>().unwrap() <= 3);
}

#[tokio::test]
async fn sql_prepare_execute_deallocate_work_across_connections() {
    let origin = Origin::start();
    let pgwarp = Pgwarp::start(&origin, |c| c.pool_size = 2).await;
    let a = pgwarp.client().await;
    let other = pgwarp.client().await;
    assert!(a.simple_query("PREPARE double (int) AS SELECT $1 * 2").await.is_ok());
    assert_eq!(rows(&a.simple_query("EXECUTE double(21)").await.unwrap()), vec!["42"]);
    // Keep the connection a just used busy, so a's next EXECUTE lands on the other one.
    other.batch_execute("BEGIN").await.unwrap();
    for k in 0..5 {
        assert_eq!(rows(&a.simple_query(&format!("EXECUTE double({k})")).await.unwrap()), vec![(k * 2).to_string()]);
    }
    other.batch_execute("COMMIT").await.unwrap();
    let err = a.simple_query("PREPARE double AS SELECT 1").await.unwrap_err();
    assert_eq!(code(&err), "42P05");
    a.simple_query("DEALLOCATE double").await.unwrap();
    let err = a.simple_query("EXECUTE double(1)").await.unwrap_err();
    assert_eq!(code(&err), "26000");
    let err = a.simple_query("DEALLOCATE double").await.unwrap_err();
    assert_eq!(code(&err), "26000");
    // The name is free again, and another client's same name is its own.
    a.simple_query("PREPARE double AS SELECT 'again'").await.unwrap();
    other.simple_query("PREPARE double AS SELECT 'other'").await.unwrap();
    assert_eq!(rows(&a.simple_query("EXECUTE double").await.unwrap()), vec!["again"]);
    assert_eq!(rows(&other.simple_query("EXECUTE double").await.unwrap()), vec!["other"]);
    a.simple_query("DEALLOCATE ALL").await.unwrap();
    assert_eq!(code(&a.simple_query("EXECUTE double").await.unwrap_err()), "26000");
    // A PREPARE that fails leaves no name behind.
    assert!(a.simple_query("PREPARE broken AS SELEC 1").await.is_err());
    a.simple_query("PREPARE broken AS SELECT 'fixed'").await.unwrap();
    assert_eq!(rows(&a.simple_query("EXECUTE broken").await.unwrap()), vec!["fixed"]);
}

#[tokio::test]
async fn protocol_statement_can_be_deallocated_by_sql_and_closed() {
    let origin = Origin::start();
    let pgwarp = Pgwarp::start(&origin, |c| c.pool_size = 1).await;
    let mut raw = pgwarp.raw().await;
    raw.send(&batch(&[parse("s1", "SELECT 1", &[]), sync()])).await;
    assert_eq!(tags(&raw.until_ready().await), "1Z");
    raw.send(&query("DEALLOCATE s1")).await;
    let msgs = raw.until_ready().await;
    assert_eq!(tags(&msgs), "CZ");
    raw.send(&batch(&[bind("", "s1", &[]), execute("", 0), sync()])).await;
    let msgs = raw.until_ready().await;
    assert_eq!(error_code(&msgs).as_deref(), Some("26000"));
    // Close of a statement answers CloseComplete; closing an unknown one is fine, as in Postgres.
    raw.send(&batch(&[parse("s2", "SELECT 2", &[]), close(b'S', "s2"), close(b'S', "nope"), sync()])).await;
    assert_eq!(tags(&raw.until_ready().await), "133Z");
    raw.send(&batch(&[describe(b'S', "s2"), sync()])).await;
    assert_eq!(error_code(&raw.until_ready().await).as_deref(), Some("26000"));
}

#[tokio::test]
async fn discard_all_forgets_statements_like_postgres() {
    let origin = Origin::start();
    let pgwarp = Pgwarp::start(&origin, |c| c.pool_size = 1).await;
    let mut raw = pgwarp.raw().await;
    raw.send(&batch(&[parse("keep", "SELECT 1", &[]), sync()])).await;
    raw.until_ready().await;
    raw.send(&query("DISCARD ALL")).await;
    assert_eq!(tags(&raw.until_ready().await), "CZ");
    raw.send(&batch(&[bind("", "keep", &[]), execute("", 0), sync()])).await;
    assert_eq!(error_code(&raw.until_ready().await).as_deref(), Some("26000"));
    // And the origin connection, which lost its statements too, still serves new ones.
    raw.send(&batch(&[parse("keep", "SELECT 7", &[]), bind("", "keep", &[]), execute("", 0), sync()])).await;
    assert_eq!(first_column(&raw.until_ready().await), vec![Some("7".into())]);
}

#[tokio::test]
async fn duplicate_and_unknown_names_fail_in_order_without_desync() {
    let origin = Origin::start();
    let pgwarp = Pgwarp::start(&origin, |c| c.pool_size = 1).await;
    let mut raw = pgwarp.raw().await;
    raw.send(&batch(&[parse("s", "SELECT 1", &[]), sync()])).await;
    raw.until_ready().await;
    raw.send(&batch(&[parse("s", "SELECT 2", &[]), bind("", "s", &[]), execute("", 0), sync()])).await;
    let msgs = raw.until_ready().await;
    assert_eq!(tags(&msgs), "EZ");
    assert_eq!(error_code(&msgs).as_deref(), Some("42P05"));
    raw.send(&batch(&[bind("", "s", &[]), execute("", 0), sync()])).await;
    assert_eq!(first_column(&raw.until_ready().await), vec![Some("1".into())]);
}

#[tokio::test]
async fn describe_then_wait_flow_with_named_statement() {
    // asyncpg / postgres.js: Parse + Describe + Flush, wait, then Bind/Execute/Sync.
    let origin = Origin::start();
    let pgwarp = Pgwarp::start(&origin, |c| c.pool_size = 1).await;
    let mut raw = pgwarp.raw().await;
    raw.send(&batch(&[parse("stmt_1", "SELECT $1::int + 1 AS n", &[]), describe(b'S', "stmt_1"), flush()])).await;
    let mut got = Vec::new();
    for _ in 0..3 {
        got.push(raw.recv().await);
    }
    assert_eq!(tags(&got), "1tT");
    raw.send(&batch(&[bind("", "stmt_1", &["1"]), execute("", 0), sync()])).await;
    assert_eq!(first_column(&raw.until_ready().await), vec![Some("2".into())]);
    // Later, on whatever connection: Bind only.
    raw.send(&batch(&[bind("", "stmt_1", &["41"]), execute("", 0), sync()])).await;
    assert_eq!(first_column(&raw.until_ready().await), vec![Some("42".into())]);
}

#[tokio::test]
async fn changed_result_type_is_reprepared_the_way_drivers_expect() {
    let origin = Origin::start();
    origin.sql("CREATE TABLE shape (a int); INSERT INTO shape VALUES (1); GRANT ALL ON shape TO app");
    let pgwarp = Pgwarp::start(&origin, |c| c.pool_size = 1).await;
    let client = pgwarp.client().await;
    let stmt = client.prepare("SELECT * FROM shape").await.unwrap();
    assert_eq!(client.query(&stmt, &[]).await.unwrap().len(), 1);
    origin.sql("ALTER TABLE shape ADD COLUMN b int");
    // Postgres itself refuses the old plan once ...
    let err = client.query(&stmt, &[]).await.unwrap_err();
    assert_eq!(code(&err), "0A000", "{err}");
    // ... and a driver that prepares again gets the new shape, although the SQL is the same.
    let again = client.prepare("SELECT * FROM shape").await.unwrap();
    let rows = client.query(&again, &[]).await.unwrap();
    assert_eq!(rows[0].len(), 2);
    // The same through SQL PREPARE/EXECUTE.
    client.simple_query("PREPARE p AS SELECT * FROM shape").await.unwrap();
    client.simple_query("EXECUTE p").await.unwrap();
    origin.sql("ALTER TABLE shape ADD COLUMN c int");
    assert_eq!(code(&client.simple_query("EXECUTE p").await.unwrap_err()), "0A000");
    client.simple_query("DEALLOCATE p").await.unwrap();
    client.simple_query("PREPARE p AS SELECT * FROM shape").await.unwrap();
    let msgs = client.simple_query("EXECUTE p").await.unwrap();
    let SimpleQueryMessage::Row(row) = &msgs[1] else { panic!("{msgs:?}") };
    assert_eq!(row.len(), 3);
}

#[tokio::test]
async fn small_statement_cache_evicts_and_replays() {
    let origin = Origin::start();
    let pgwarp = Pgwarp::start(&origin, |c| {
        c.pool_size = 1;
        c.statement_cache_size = 2;
    })
    .await;
    let client = pgwarp.client().await;
    let mut stmts = Vec::new();
    for k in 0..5 {
        stmts.push(client.prepare(&format!("SELECT $1::int + {k}")).await);
    }
    for round in 0..3i32 {
        for (k, stmt) in stmts.iter().enumerate() {
            let v: i32 = client.query_one(stmt.as_ref().unwrap(), &[&round]).await.unwrap().get(0);
            assert_eq!(v, round + k as i32);
        }
    }
}

#[tokio::test]
async fn per_client_statement_memory_is_capped_with_a_clear_error() {
    let origin = Origin::start();
    let pgwarp = Pgwarp::start(&origin, |c| c.max_client_statement_bytes = 4096).await;
    let client = pgwarp.client().await;
    // tokio-postgres closes a statement when its handle drops: keep them all.
    let mut kept = Vec::new();
    let mut failed = None;
    for k in 0..100 {
        let sql = format!("SELECT {k} AS {}", "x".repeat(200));
        match client.prepare(&sql).await {
            Ok(stmt) => kept.push(stmt),
            Err(e) => {
                failed = Some(e);
                break;
            }
        }
    }
    assert!(kept.len() >= 5, "the cap allows a reasonable number of statements");
    let err = failed.expect("the cap must stop unbounded growth");
    assert_eq!(code(&err), "53200", "{err}");
    let message = err.as_db_error().map(|e| e.message().to_owned()).unwrap_or_default();
    assert!(message.contains("prepared statements") && message.contains("4096"), "{message}");
    assert_eq!(client.query_one("SELECT 1", &[]).await.unwrap().get::<_, i32>(0), 1);
}

#[tokio::test]
async fn pgbench_prepared_mode_runs_clean_through_a_small_pool() {
    let origin = Origin::start();
    let pgwarp = Pgwarp::start(&origin, |c| c.pool_size = 3).await;
    let bench = origin.cluster.bin("pgbench");
    let url = pgwarp.url();
    let out = tokio::task::spawn_blocking(move || {
        let init = std::process::Command::new(&bench).args(["-i", "-s", "1", "-q", &url]).output().unwrap();
        assert!(init.status.success(), "{}", String::from_utf8_lossy(&init.stderr));
        std::process::Command::new(&bench)
            .args(["-n", "-M", "prepared", "-c", "12", "-j", "12", "-T", "3", &url])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("number of failed transactions: 0"), "{stdout}");
    assert!(!stderr.contains("does not exist") && !stderr.contains("already exists"), "{stderr}");
    tokio::time::sleep(Duration::from_millis(10)).await;
}
