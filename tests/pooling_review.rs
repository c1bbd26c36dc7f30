//! Pooling and protocol faults found in review, each reproduced against a real Postgres: what
//! one client leaves behind on an origin connection must never reach the next client, and
//! errors, cancels and statements must behave as they do on a direct connection.

mod common;
mod support;

use std::time::Duration;

use bytes::{BufMut, BytesMut};
use pgwarp::protocol::build;

use support::*;

/// A client that gets an extended-protocol error after Flush and leaves before its Sync: the
/// origin is still skipping to a Sync, and the next client must not inherit that.
#[tokio::test]
async fn error_after_flush_then_disconnect_leaves_a_clean_connection() {
    let origin = Origin::start();
    let pgwarp = Pgwarp::start(&origin, |c| c.pool_size = 1).await;
    {
        let mut raw = pgwarp.raw().await;
        raw.send(&batch(&[parse("", "SELECT 1/0", &[]), bind("", "", &[]), execute("", 0), flush()])).await;
        let mut got = Vec::new();
        loop {
            let m = raw.recv().await;
            let t = m.tag();
            got.push(m);
            if t == b'E' {
                break;
            }
        }
        assert_eq!(tags(&got), "1E");
        // The client vanishes without Sync.
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let b = pgwarp.client().await;
    let r = tokio::time::timeout(Duration::from_secs(5), b.simple_query("SELECT 42")).await;
    let r = r.expect("answer within 5s");
    assert!(r.is_ok(), "next client broken: {:?}", r.err());
}

/// After an extended-protocol error and Flush, a simple Query (which Postgres ignores until
/// Sync) must not let pgwarp release the connection as if the sequence were over.
#[tokio::test]
async fn query_after_flushed_error_keeps_the_connection_until_sync() {
    let origin = Origin::start();
    let pgwarp = Pgwarp::start(&origin, |c| c.pool_size = 1).await;
    let mut raw = pgwarp.raw().await;
    raw.send(&batch(&[parse("", "SELECT 1/0", &[]), bind("", "", &[]), execute("", 0), flush()])).await;
    assert_eq!(raw.recv().await.tag(), b'1');
    assert_eq!(raw.recv().await.tag(), b'E');
    raw.send(&query("SELECT 1")).await; // Postgres ignores this (waiting for Sync)
    tokio::time::sleep(Duration::from_millis(300)).await;
    drop(raw); // the misbehaving client leaves
    let b = pgwarp.client().await;
    let r = tokio::time::timeout(Duration::from_secs(5), b.query_one("SELECT 42", &[])).await;
    let r = r.expect("answer within 5s");
    assert_eq!(r.expect("other client works").get::<_, i32>(0), 42);
}

/// The same client goes on after its ignored Query: its Sync ends the sequence as on a direct
/// connection, and the Query is never answered.
#[tokio::test]
async fn query_after_flushed_error_is_ignored_like_postgres() {
    let origin = Origin::start();
    let pgwarp = Pgwarp::start(&origin, |c| c.pool_size = 1).await;
    let mut results = Vec::new();
    for port in [origin.cluster.port(), pgwarp.port] {
        let mut raw = RawClient::connect(port, APP_USER, APP_PASSWORD, APP_DB).await;
        raw.send(&batch(&[parse("", "SELECT 1/0", &[]), bind("", "", &[]), execute("", 0), flush()])).await;
        assert_eq!(raw.recv().await.tag(), b'1');
        assert_eq!(raw.recv().await.tag(), b'E');
        raw.send(&query("SELECT 1")).await;
        raw.send(&sync()).await;
        let a = raw.until_ready().await;
        raw.send(&query("SELECT 2")).await;
        let b = raw.until_ready().await;
        results.push((tags(&a), tags(&b), first_column(&b)));
    }
    assert_eq!(results[0], results[1], "direct vs pgwarp");
}

/// pgwarp's read-back of a client's settings (a simple query) destroys the origin's unnamed
/// statement; the client's Bind of it in a later batch must get its Parse replayed.
#[tokio::test]
async fn unnamed_statement_is_replayed_after_the_settings_read_back() {
    let origin = Origin::start();
    let pgwarp = Pgwarp::start(&origin, |c| c.pool_size = 1).await;
    let mut raw = pgwarp.raw().await;
    raw.send(&batch(&[parse("", "SELECT set_config('app.tenant', $1, false)", &[]), describe(b'S', ""), sync()])).await;
    assert_eq!(tags(&raw.until_ready().await), "1tTZ");
    raw.send(&batch(&[bind("", "", &["7"]), execute("", 0), sync()])).await;
    let msgs = raw.until_ready().await;
    assert_eq!(tags(&msgs), "2DCZ", "error: {:?}", error_code(&msgs));
}

/// Another client's login check of its startup settings (a simple query on a pooled
/// connection) destroys the unnamed statement behind this client's back.
#[tokio::test]
async fn unnamed_statement_is_replayed_after_another_clients_login_check() {
    let origin = Origin::start();
    let pgwarp = Pgwarp::start(&origin, |c| c.pool_size = 1).await;
    let mut raw = pgwarp.raw().await;
    raw.send(&batch(&[parse("", "SELECT $1::int + 1", &[]), describe(b'S', ""), sync()])).await;
    assert_eq!(tags(&raw.until_ready().await), "1tTZ");
    // Someone tries to log in with a startup setting the origin rejects.
    let url = format!("{}?options=-c%20statement_timeout%3Dbogus", pgwarp.url());
    assert!(common::connect(&url).await.is_err());
    raw.send(&batch(&[bind("", "", &["41"]), execute("", 0), sync()])).await;
    let msgs = raw.until_ready().await;
    assert_eq!(tags(&msgs), "2DCZ", "error: {:?}", error_code(&msgs));
}

/// A client that leaves mid-transaction has its connection rolled back with a simple query,
/// which destroys the unnamed statement: another client running the same SQL (same content
/// id) must not find that connection believed to hold it.
#[tokio::test]
async fn unnamed_statement_is_replayed_after_rollback_of_a_vanished_client() {
    let origin = Origin::start();
    let pgwarp = Pgwarp::start(&origin, |c| {
        c.pool_size = 2;
        c.workers = 1;
    })
    .await;
    const SQL: &str = "SELECT $1::int + 1";
    // Client A: unnamed Parse inside a transaction, then vanishes -> ROLLBACK via simple query.
    {
        let mut a = pgwarp.raw().await;
        a.send(&query("BEGIN")).await;
        a.until_ready().await;
        a.send(&batch(&[parse("", SQL, &[]), bind("", "", &["1"]), execute("", 0), sync()])).await;
        assert_eq!(tags(&a.until_ready().await), "12DCZ");
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Client B: Parse on the other connection while A's old one is held, then Bind on A's old one.
    let mut b = pgwarp.raw().await;
    // Same (empty) startup settings as B, so no settings query. Holders use named statements
    // only, so they leave the unnamed slot alone.
    let mut holder = pgwarp.raw().await;
    let begin = batch(&[
        parse("b", "BEGIN", &[]),
        bind("", "b", &[]),
        execute("", 0),
        parse("p", "SELECT pg_backend_pid()", &[]),
        bind("", "p", &[]),
        execute("", 0),
        sync(),
    ]);
    holder.send(&begin).await; // takes the most recently used connection (A's)
    let held = first_column(&holder.until_ready().await);
    b.send(&batch(&[parse("", SQL, &[]), describe(b'S', ""), sync()])).await;
    assert_eq!(tags(&b.until_ready().await), "1tTZ");
    let mut holder2 = pgwarp.raw().await;
    holder2.send(&begin).await; // takes the connection B parsed on
    let held2 = first_column(&holder2.until_ready().await);
    assert_ne!(held, held2);
    holder.send(&batch(&[parse("c", "COMMIT", &[]), bind("", "c", &[]), execute("", 0), sync()])).await;
    holder.until_ready().await; // A's old connection is free again
    b.send(&batch(&[bind("", "", &["41"]), execute("", 0), sync()])).await;
    let msgs = b.until_ready().await;
    assert_eq!(tags(&msgs), "2DCZ", "error: {:?}", error_code(&msgs));
}

/// A replayed SQL-level PREPARE (a simple Query inside an extended batch) that Postgres skips
/// after an earlier error must not stay recorded as prepared on that connection.
#[tokio::test]
async fn skipped_replay_of_sql_prepare_is_not_remembered() {
    let origin = Origin::start();
    let pgwarp = Pgwarp::start(&origin, |c| {
        c.pool_size = 2;
        c.workers = 1;
    })
    .await;
    let mut raw = pgwarp.raw().await;
    let holder = pgwarp.client().await;
    // PREPARE lands on connection X (held afterwards by `holder`).
    raw.send(&query("PREPARE q AS SELECT 7")).await;
    assert_eq!(tags(&raw.until_ready().await), "CZ");
    holder.batch_execute("BEGIN").await.unwrap();
    // On connection Y: an error, then a Bind of q (whose PREPARE is replayed and skipped).
    raw.send(&batch(&[
        parse("", "SELECT 1/0", &[]),
        bind("", "", &[]),
        execute("", 0),
        bind("", "q", &[]),
        execute("", 0),
        sync(),
    ]))
    .await;
    let first = raw.until_ready().await;
    assert_eq!(error_code(&first).as_deref(), Some("22012"));
    // Still on Y: q must work.
    raw.send(&query("EXECUTE q")).await;
    let msgs = raw.until_ready().await;
    assert_eq!(first_column(&msgs), vec![Some("7".into())], "error: {:?}", error_code(&msgs));
    holder.batch_execute("COMMIT").await.unwrap();
}

/// A lone Flush (nothing to flush) must not take a connection and keep it while the client
/// sits idle.
#[tokio::test]
async fn lone_flush_does_not_pin_a_connection() {
    let origin = Origin::start();
    let pgwarp = Pgwarp::start(&origin, |c| {
        c.pool_size = 1;
        c.pool_timeout = Duration::from_secs(2);
    })
    .await;
    let mut raw = pgwarp.raw().await;
    raw.send(&flush()).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let b = pgwarp.client().await;
    let r = b.query_one("SELECT 1", &[]).await;
    assert!(r.is_ok(), "{:?}", r.err());
    // The Flushing client carries on normally.
    raw.send(&query("SELECT 2")).await;
    assert_eq!(first_column(&raw.until_ready().await), vec![Some("2".into())]);
}

/// Errors pgwarp answers itself (unknown or duplicate statement names) abort the client's
/// transaction as Postgres does: ReadyForQuery says `E`, and a later COMMIT rolls back.
#[tokio::test]
async fn pgwarps_own_errors_abort_the_transaction_like_postgres() {
    let origin = Origin::start();
    origin.sql("CREATE TABLE t (a int); GRANT ALL ON t TO app");
    let pgwarp = Pgwarp::start(&origin, |c| c.pool_size = 1).await;
    let mut results = Vec::new();
    for port in [origin.cluster.port(), pgwarp.port] {
        let mut raw = RawClient::connect(port, APP_USER, APP_PASSWORD, APP_DB).await;
        raw.send(&query("BEGIN; INSERT INTO t VALUES (1)")).await;
        raw.until_ready().await;
        raw.send(&query("EXECUTE nosuch")).await;
        let msgs = raw.until_ready().await;
        let status = msgs.last().unwrap().body()[0] as char;
        raw.send(&batch(&[bind("", "nosuch", &[]), execute("", 0), sync()])).await;
        let msgs = raw.until_ready().await;
        let status2 = msgs.last().unwrap().body()[0] as char;
        raw.send(&query("COMMIT")).await;
        raw.until_ready().await;
        let rows = origin.sql("SELECT count(*) FROM t");
        origin.sql("TRUNCATE t");
        results.push((status, status2, rows));
    }
    assert_eq!(results[0], results[1], "direct vs pgwarp (status after EXECUTE, after Bind, rows committed)");
}

/// Each kind of error pgwarp answers itself, inside a transaction and in an implicit one
/// (a pipeline whose earlier INSERT Postgres rolls back): the client sees exactly what a
/// direct connection shows, one error each, and the same rows survive.
#[tokio::test]
async fn every_error_pgwarp_answers_itself_matches_postgres() {
    let origin = Origin::start();
    origin.sql("CREATE TABLE t (a int); GRANT ALL ON t TO app");
    let pgwarp = Pgwarp::start(&origin, |c| c.pool_size = 1).await;
    let cases: Vec<Vec<u8>> = vec![
        query("EXECUTE nosuch").to_vec(),
        query("DEALLOCATE nosuch").to_vec(),
        query("PREPARE dup AS SELECT 1").to_vec(),
        batch(&[parse("dup", "SELECT 2", &[]), sync()]),
        batch(&[bind("", "nosuch", &[]), execute("", 0), sync()]),
        batch(&[describe(b'S', "nosuch"), sync()]),
        batch(&[
            parse("", "INSERT INTO t VALUES (2)", &[]),
            bind("", "", &[]),
            execute("", 0),
            bind("", "nosuch", &[]),
            sync(),
        ]),
    ];
    let mut results = Vec::new();
    for port in [origin.cluster.port(), pgwarp.port] {
        let mut raw = RawClient::connect(port, APP_USER, APP_PASSWORD, APP_DB).await;
        raw.send(&query("PREPARE dup AS SELECT 1")).await;
        raw.until_ready().await;
        for case in &cases {
            let mut seen = Vec::new();
            for begin in [true, false] {
                if begin {
                    raw.send(&query("BEGIN; INSERT INTO t VALUES (1)")).await;
                    raw.until_ready().await;
                }
                raw.send(case).await;
                let msgs = raw.until_ready().await;
                let status = msgs.last().unwrap().body()[0] as char;
                raw.send(&query("COMMIT")).await;
                raw.until_ready().await;
                seen.push((tags(&msgs), error_code(&msgs), status, origin.sql("SELECT count(*) FROM t")));
                origin.sql("TRUNCATE t");
            }
            results.push(seen);
        }
    }
    let (direct, through) = results.split_at(cases.len());
    for (i, (d, p)) in direct.iter().zip(through).enumerate() {
        assert_eq!(d, p, "case {i}: direct vs pgwarp (tags, SQLSTATE, status, rows committed)");
    }
}

/// A cancel for client A must never reach client B's query: pgwarp reads A's origin key and
/// then connects to the origin to send it, by which time A may have released the connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_of_one_client_never_hits_another_clients_query() {
    let origin = Origin::start();
    let pgwarp = Pgwarp::start(&origin, |c| c.pool_size = 1).await;
    let a = pgwarp.client().await;
    let b = pgwarp.client().await;
    let token = a.cancel_token();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let s2 = stop.clone();
    let a_task = tokio::spawn(async move {
        let mut a_cancelled = 0;
        while !s2.load(std::sync::atomic::Ordering::Relaxed) {
            if a.simple_query("SELECT pg_sleep(0.002)").await.is_err() {
                a_cancelled += 1;
            }
        }
        a_cancelled
    });
    let s3 = stop.clone();
    let b_task = tokio::spawn(async move {
        let mut b_cancelled = 0;
        while !s3.load(std::sync::atomic::Ordering::Relaxed) {
            if let Err(e) = b.simple_query("SELECT pg_sleep(0.002)").await {
                assert_eq!(code(&e), "57014", "{e}");
                b_cancelled += 1;
            }
        }
        b_cancelled
    });
    for _ in 0..300 {
        token.cancel_query(tokio_postgres::NoTls).await.unwrap();
        tokio::time::sleep(Duration::from_millis(7)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (ac, bc) = (a_task.await.unwrap(), b_task.await.unwrap());
    println!("a cancelled {ac}, b cancelled {bc}");
    assert!(ac > 0, "A's cancels must still work");
    assert_eq!(bc, 0, "client B's queries were cancelled by A's cancel key");
}

/// A named Parse that Postgres skips (after an earlier error in its pipeline segment) is
/// followed, after the Sync, by a Parse of the same name: Postgres runs that one normally.
#[tokio::test]
async fn pipelined_reparse_after_a_skipped_parse_runs_like_postgres() {
    let origin = Origin::start();
    let pgwarp = Pgwarp::start(&origin, |c| c.pool_size = 1).await;
    let mut results = Vec::new();
    for port in [origin.cluster.port(), pgwarp.port] {
        let mut raw = RawClient::connect(port, APP_USER, APP_PASSWORD, APP_DB).await;
        raw.send(&batch(&[
            parse("", "SELECT 1/0", &[]),
            bind("", "", &[]),
            execute("", 0),
            parse("s1", "SELECT 11", &[]),
            sync(),
            parse("s1", "SELECT 11", &[]),
            bind("", "s1", &[]),
            execute("", 0),
            sync(),
        ]))
        .await;
        let a = raw.until_ready().await;
        let b = raw.until_ready().await;
        results.push((tags(&a), tags(&b), error_code(&b), first_column(&b)));
    }
    assert_eq!(results[0], results[1], "direct vs pgwarp");
}

/// The same name prepared twice in one pipeline, the first time successfully: the second is a
/// duplicate, in the extended protocol and in SQL, as on a direct connection; and a PREPARE
/// that failed leaves the name free for the next one.
#[tokio::test]
async fn pipelined_duplicates_resolve_like_postgres() {
    let origin = Origin::start();
    let pgwarp = Pgwarp::start(&origin, |c| c.pool_size = 1).await;
    let mut results = Vec::new();
    for port in [origin.cluster.port(), pgwarp.port] {
        let mut raw = RawClient::connect(port, APP_USER, APP_PASSWORD, APP_DB).await;
        raw.send(&batch(&[
            parse("s1", "SELECT 11", &[]),
            sync(),
            parse("s1", "SELECT 12", &[]),
            sync(),
            bind("", "s1", &[]),
            execute("", 0),
            sync(),
            query("PREPARE p AS SELECT nosuchcolumn"),
            query("PREPARE p AS SELECT 13"),
            query("PREPARE p AS SELECT 14"),
            query("EXECUTE p"),
        ]))
        .await;
        let mut seen = Vec::new();
        for _ in 0..7 {
            let m = raw.until_ready().await;
            seen.push((tags(&m), error_code(&m), first_column(&m)));
        }
        results.push(seen);
    }
    assert_eq!(results[0], results[1], "direct vs pgwarp");
}

/// Input pipelined behind a re-Parse that waits for the origin's answer is queued once and
/// planned once the answer comes, not re-planned (and copied) per message: 20,000 Syncs behind
/// it take about as long through pgwarp as directly (they took 13 s instead of 1 s).
#[tokio::test]
async fn a_long_pipeline_behind_a_waiting_reparse_is_not_replanned_per_message() {
    let n = 20_000;
    let origin = Origin::start();
    let pgwarp = Pgwarp::start(&origin, |c| c.pool_size = 1).await;
    let mut times = Vec::new();
    for port in [origin.cluster.port(), pgwarp.port] {
        let raw = RawClient::connect(port, APP_USER, APP_PASSWORD, APP_DB).await;
        let mut parts = vec![
            parse("", "SELECT pg_sleep(0.5)", &[]),
            bind("", "", &[]),
            execute("", 0),
            parse("s1", "SELECT 11", &[]),
            sync(),
            parse("s1", "SELECT 11", &[]),
            sync(),
        ];
        parts.extend((0..n).map(|_| sync()));
        let bytes = batch(&parts);
        let started = std::time::Instant::now();
        let (mut rd, mut wr) = raw.stream.into_split();
        let writer = tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            wr.write_all(&bytes).await.unwrap();
            wr
        });
        let mut ready = 0usize;
        let read_all = tokio::time::timeout(Duration::from_secs(60), async {
            use tokio::io::AsyncReadExt;
            let mut buf = Vec::new();
            let mut chunk = vec![0u8; 65536];
            while ready < n + 2 {
                let k = rd.read(&mut chunk).await.unwrap();
                assert!(k > 0, "connection closed after {ready} ReadyForQuery");
                buf.extend_from_slice(&chunk[..k]);
                let mut at = 0;
                while buf.len() >= at + 5 {
                    let len = u32::from_be_bytes(buf[at + 1..at + 5].try_into().unwrap()) as usize;
                    if buf.len() < at + 1 + len {
                        break;
                    }
                    ready += usize::from(buf[at] == b'Z');
                    at += 1 + len;
                }
                buf.drain(..at);
            }
        })
        .await;
        assert!(read_all.is_ok(), "port {port}: {ready} of {} ReadyForQuery", n + 2);
        times.push(started.elapsed());
        let _ = writer.await;
    }
    assert!(times[1] < times[0] * 3 + Duration::from_secs(1), "direct {:?}, through pgwarp {:?}", times[0], times[1]);
}

/// Leaves free exactly the pool connection that is not `pid`: two clients open transactions
/// (taking both connections of a pool of 2); the one on `pid` stays open and is returned.
async fn hold_all_but(pgwarp: &Pgwarp, pid: i32) -> tokio_postgres::Client {
    let b = pgwarp.client().await;
    b.simple_query("BEGIN").await.unwrap();
    let c = pgwarp.client().await;
    c.simple_query("BEGIN").await.unwrap();
    let pb: i32 = b.query_one("SELECT pg_backend_pid()", &[]).await.unwrap().get(0);
    let pc: i32 = c.query_one("SELECT pg_backend_pid()", &[]).await.unwrap().get(0);
    assert!(pb == pid || pc == pid, "{pb} {pc} {pid}");
    let (keep, free) = if pb == pid { (b, c) } else { (c, b) };
    free.simple_query("COMMIT").await.unwrap();
    keep
}

/// A role is restored after the other settings, and reset before them: a setting the login
/// user may set but the role may not would otherwise fail the hidden settings query, and the
/// client would run as the login user on its next connection.
#[tokio::test]
async fn a_role_is_restored_after_the_settings_only_its_login_may_set() {
    let origin = Origin::start();
    origin
        .sql("CREATE ROLE reader NOLOGIN; GRANT reader TO app; GRANT SET ON PARAMETER session_replication_role TO app");
    let pgwarp = Pgwarp::start(&origin, |c| c.pool_size = 2).await;
    let a = pgwarp.client().await;
    a.simple_query("SET session_replication_role = replica").await.unwrap();
    a.simple_query("SET ROLE reader").await.unwrap();
    let pid: i32 = a.query_one("SELECT pg_backend_pid()", &[]).await.unwrap().get(0);
    // The connection a used is held, so a's next transaction runs on the other one.
    let b = hold_all_but(&pgwarp, pid).await;
    let row = a
        .query_one("SELECT current_user::text, current_setting('session_replication_role'), pg_backend_pid()", &[])
        .await
        .unwrap();
    b.simple_query("COMMIT").await.unwrap();
    assert_ne!(row.get::<_, i32>(2), pid, "a must be on the other connection");
    assert_eq!((row.get::<_, String>(0), row.get::<_, String>(1)), ("reader".into(), "replica".into()));
}

/// A custom setting SET behind a leading comment (an ORM's or tracer's tag) follows its client
/// to another connection.
#[tokio::test]
async fn a_custom_setting_set_behind_a_comment_follows_its_client() {
    let origin = Origin::start();
    let pgwarp = Pgwarp::start(&origin, |c| c.pool_size = 2).await;
    let a = pgwarp.client().await;
    a.simple_query("/* app */ SET app.commented_tenant = 'a'").await.unwrap();
    let pid: i32 = a.query_one("SELECT pg_backend_pid()", &[]).await.unwrap().get(0);
    let b = hold_all_but(&pgwarp, pid).await;
    let row = a
        .query_one("SELECT coalesce(current_setting('app.commented_tenant', true), '<unset>'), pg_backend_pid()", &[])
        .await
        .unwrap();
    b.simple_query("COMMIT").await.unwrap();
    assert_ne!(row.get::<_, i32>(1), pid, "a must be on the other connection");
    assert_eq!(row.get::<_, String>(0), "a");
}

/// In an aborted transaction Postgres refuses PREPARE, EXECUTE and DEALLOCATE with 25P02
/// before it looks at a name, and changes nothing: pgwarp must not answer them from its own
/// statement map (a DEALLOCATE there would drop a statement Postgres keeps; a PREPARE would
/// create one Postgres never made).
#[tokio::test]
async fn prepared_statement_commands_in_an_aborted_transaction_match_postgres() {
    let origin = Origin::start();
    let pgwarp = Pgwarp::start(&origin, |c| c.pool_size = 1).await;
    let cases = [
        "EXECUTE nosuch",
        "EXECUTE kept",
        "DEALLOCATE kept",
        "DEALLOCATE nosuch",
        "PREPARE kept AS SELECT 2",
        "PREPARE fresh AS SELECT 3",
        "DEALLOCATE ALL",
    ];
    let mut results = Vec::new();
    for port in [origin.cluster.port(), pgwarp.port] {
        let mut raw = RawClient::connect(port, APP_USER, APP_PASSWORD, APP_DB).await;
        raw.send(&query("PREPARE kept AS SELECT 1")).await;
        raw.until_ready().await;
        raw.send(&query("BEGIN")).await;
        raw.until_ready().await;
        raw.send(&query("SELECT 1/0")).await;
        raw.until_ready().await;
        let mut seen = Vec::new();
        for case in cases {
            raw.send(&query(case)).await;
            let msgs = raw.until_ready().await;
            seen.push((case, tags(&msgs), error_code(&msgs), msgs.last().unwrap().body()[0] as char));
        }
        raw.send(&query("ROLLBACK")).await;
        raw.until_ready().await;
        // Afterwards: what the aborted commands left behind.
        for case in ["EXECUTE kept", "EXECUTE fresh"] {
            raw.send(&query(case)).await;
            let msgs = raw.until_ready().await;
            seen.push((case, tags(&msgs), error_code(&msgs), msgs.last().unwrap().body()[0] as char));
        }
        results.push(seen);
    }
    assert_eq!(results[0], results[1], "direct vs pgwarp (command, tags, SQLSTATE, status)");
    assert!(results[0].iter().take(cases.len()).all(|r| r.2.as_deref() == Some("25P02")), "{:?}", results[0]);
}

/// Answers pgwarp makes itself (a Close of a statement, a Parse the connection already has)
/// come out in their place between answers forwarded from the origin, also when the origin's
/// answers before and after them arrive in one read and are forwarded as one run.
#[tokio::test]
async fn pgwarps_own_answers_stay_in_order_between_forwarded_rows() {
    let origin = Origin::start();
    let pgwarp = Pgwarp::start(&origin, |c| c.pool_size = 1).await;
    let mut results = Vec::new();
    for port in [origin.cluster.port(), pgwarp.port] {
        let mut raw = RawClient::connect(port, APP_USER, APP_PASSWORD, APP_DB).await;
        raw.send(&batch(&[parse("s1", "SELECT 1", &[]), parse("s2", "SELECT $1::int", &[]), sync()])).await;
        let prepared = raw.until_ready().await;
        raw.send(&batch(&[
            parse("", "SELECT generate_series(1, 3)", &[]),
            bind("", "", &[]),
            execute("", 0),
            close(b'S', "s1"),
            describe(b'S', "s2"),
            parse("s1", "SELECT 1", &[]),
            bind("", "s1", &[]),
            execute("", 0),
            sync(),
        ]))
        .await;
        let answer = raw.until_ready().await;
        results.push((tags(&prepared), tags(&answer), first_column(&answer)));
    }
    assert_eq!(results[0].1, "12DDDC3tT12DCZ", "direct");
    assert_eq!(results[0], results[1], "direct vs pgwarp");
}

/// Copy input sent right behind the COPY, before the origin's CopyInResponse (pgx's CopyFrom
/// does this): every row arrives, in the simple and the extended protocol, with CopyDone or
/// CopyFail sent early too, and a COPY that fails ignores the early input, as on a direct
/// connection.
#[tokio::test]
async fn copy_input_sent_ahead_of_copy_in_response_runs_like_postgres() {
    let origin = Origin::start();
    origin.sql("CREATE TABLE early_copy (n int); GRANT ALL ON early_copy TO app;");
    let pgwarp = Pgwarp::start(&origin, |c| c.pool_size = 1).await;
    let copy = "COPY early_copy FROM STDIN";
    let cases: Vec<(&str, Vec<Vec<u8>>)> = vec![
        (
            "simple, rest later",
            vec![batch(&[query(copy), copy_data(b"1\n2\n3\n")]), batch(&[copy_data(b"4\n"), copy_done()])],
        ),
        ("simple, all at once", vec![batch(&[query(copy), copy_data(b"1\n2\n"), copy_done()])]),
        ("simple, early CopyFail", vec![batch(&[query(copy), copy_data(b"1\n"), copy_fail("changed my mind")])]),
        (
            "extended, Sync with the Execute",
            vec![batch(&[
                parse("", copy, &[]),
                bind("", "", &[]),
                execute("", 0),
                sync(),
                copy_data(b"5\n6\n"),
                copy_done(),
                sync(),
            ])],
        ),
        (
            "extended, no Sync before the data",
            vec![batch(&[
                parse("", copy, &[]),
                bind("", "", &[]),
                execute("", 0),
                copy_data(b"7\n"),
                copy_done(),
                sync(),
            ])],
        ),
        (
            "failing COPY ignores the early input",
            vec![batch(&[query("COPY no_such_table FROM STDIN"), copy_data(b"8\n"), copy_done()])],
        ),
    ];
    let mut results = Vec::new();
    for port in [origin.cluster.port(), pgwarp.port] {
        origin.sql("TRUNCATE early_copy");
        let mut raw = RawClient::connect(port, APP_USER, APP_PASSWORD, APP_DB).await;
        let mut seen = Vec::new();
        for (label, sends) in &cases {
            for (i, bytes) in sends.iter().enumerate() {
                if i > 0 {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                raw.send(bytes).await;
            }
            let answer = raw.until_ready().await;
            if label.starts_with("extended, Sync") {
                // The first Sync was swallowed by the COPY: one ReadyForQuery in all.
                assert_eq!(answer.last().map(|m| m.body()[0]), Some(b'I'));
            }
            seen.push((label.to_string(), tags(&answer), error_code(&answer)));
        }
        raw.send(&query("SELECT string_agg(n::text, ',' ORDER BY n) FROM early_copy")).await;
        let rows = first_column(&raw.until_ready().await);
        results.push((seen, rows));
    }
    assert_eq!(results[0], results[1], "direct vs pgwarp");
    assert_eq!(results[1].1, vec![Some("1,1,2,2,3,4,5,6,7".to_string())]);
}

/// A client asking for protocol 3.99 with an option pgwarp does not know is told the newest
/// version spoken, 3.0 as `major << 16 | minor`, and the option ignored, exactly as Postgres
/// tells it; then the login goes on.
#[tokio::test]
async fn protocol_version_negotiation_matches_postgres() {
    let origin = Origin::start();
    let pgwarp = Pgwarp::start(&origin, |_| {}).await;
    let mut startup = BytesMut::new();
    startup.put_i32(0);
    startup.put_i32((3 << 16) | 99);
    for s in ["user", APP_USER, "database", APP_DB, "_pq_.pgwarp_test", "on", ""] {
        startup.put_slice(s.as_bytes());
        startup.put_u8(0);
    }
    let len = startup.len() as i32;
    startup[..4].copy_from_slice(&len.to_be_bytes());
    let mut answers = Vec::new();
    for port in [origin.cluster.port(), pgwarp.port] {
        let mut raw = RawClient::open(port).await;
        raw.send(&startup).await;
        let first = raw.recv().await;
        assert_eq!(first.tag(), b'v');
        raw.login(APP_USER, APP_PASSWORD).await.expect("login after negotiation");
        answers.push(first.body().to_vec());
    }
    assert_eq!(answers[0], answers[1], "direct vs pgwarp");
    assert_eq!(&answers[1][..4], &[0, 3, 0, 0]);
}

/// A PREPARE inside a larger query makes a statement under the client's own name on the
/// origin: the connection stays with that client (who can EXECUTE and DEALLOCATE it as on a
/// direct connection), and the next client never sees it.
#[tokio::test]
async fn prepare_inside_a_larger_query_stays_with_its_client() {
    let origin = Origin::start();
    let pgwarp = Pgwarp::start(&origin, |c| c.pool_size = 1).await;
    let a = pgwarp.client().await;
    a.batch_execute("SELECT 1; PREPARE leaked AS SELECT 'secret of a'").await.unwrap();
    assert_eq!(first(&a.simple_query("EXECUTE leaked").await.unwrap()), "secret of a");
    a.batch_execute("DEALLOCATE leaked").await.unwrap();
    a.batch_execute("SELECT 1; PREPARE leaked AS SELECT 'again'").await.unwrap();
    drop(a);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let b = pgwarp.client().await;
    let err = b.simple_query("EXECUTE leaked").await.unwrap_err();
    assert_eq!(code(&err), "26000");
    b.batch_execute("PREPARE leaked AS SELECT 'b''s own'").await.unwrap();
    assert_eq!(first(&b.simple_query("EXECUTE leaked").await.unwrap()), "b's own");
}

/// SQL that drops one of pgwarp's own statements by name, inside a larger query where pgwarp
/// does not plan it: the statement is prepared again on next use, and its clients never see
/// "does not exist".
#[tokio::test]
async fn deallocate_of_pgwarps_statement_inside_a_larger_query_is_recovered() {
    let origin = Origin::start();
    let pgwarp = Pgwarp::start(&origin, |c| c.pool_size = 1).await;
    let a = pgwarp.client().await;
    let stmt = a.prepare("SELECT 41 + $1::int").await.unwrap();
    assert_eq!(a.query_one(&stmt, &[&1i32]).await.unwrap().get::<_, i32>(0), 42);
    let b = pgwarp.client().await;
    let name = first(
        &b.simple_query("SELECT name FROM pg_prepared_statements WHERE statement LIKE 'SELECT 41%'").await.unwrap(),
    );
    assert!(name.starts_with("pgwarp_"), "{name}");
    b.batch_execute(&format!("SELECT 1; DEALLOCATE \"{name}\"")).await.unwrap();
    for i in 0..3 {
        assert_eq!(a.query_one(&stmt, &[&i]).await.unwrap().get::<_, i32>(0), 41 + i);
    }
}

/// A statement_timeout so short that pgwarp's read-back of the client's settings is cancelled
/// by it: the client keeps its setting all the same (it keeps its connection), and the next
/// client does not get it.
#[tokio::test]
async fn a_statement_timeout_too_short_for_the_read_back_still_holds() {
    let origin = Origin::start();
    let pgwarp = Pgwarp::start(&origin, |c| c.pool_size = 1).await;
    let a = pgwarp.client().await;
    a.batch_execute("SET statement_timeout = '1ms'").await.unwrap();
    assert_eq!(first(&a.simple_query("SHOW statement_timeout").await.unwrap()), "1ms");
    let err = a.simple_query("SELECT pg_sleep(0.2)").await.unwrap_err();
    assert_eq!(code(&err), "57014");
    drop(a);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let b = pgwarp.client().await;
    assert_eq!(first(&b.simple_query("SHOW statement_timeout").await.unwrap()), "0");
    b.batch_execute("SELECT pg_sleep(0.05)").await.unwrap();
}

/// `UPDATE pg_settings` is a SET in disguise (the view's rule calls set_config): the setting
/// follows its client and never reaches the next one.
#[tokio::test]
async fn a_setting_changed_through_pg_settings_follows_its_client() {
    let origin = Origin::start();
    let pgwarp = Pgwarp::start(&origin, |c| c.pool_size = 1).await;
    let a = pgwarp.client().await;
    a.batch_execute("UPDATE pg_settings SET setting = '77MB' WHERE name = 'work_mem'").await.unwrap();
    let b = pgwarp.client().await;
    assert_eq!(first(&b.simple_query("SHOW work_mem").await.unwrap()), "4MB");
    assert_eq!(first(&a.simple_query("SHOW work_mem").await.unwrap()), "77MB");
}

/// SQL that is not UTF-8: a LATIN1 client's text goes through as it is, a stray byte gets
/// Postgres's own 22021, and neither ends the session. A Parse's SQL must be UTF-8 (pgwarp
/// keeps statements by their text): one that is not gets a 22021 error, not a closed session.
#[tokio::test]
async fn sql_that_is_not_utf8_gets_an_answer_not_a_closed_session() {
    let origin = Origin::start();
    let pgwarp = Pgwarp::start(&origin, |_| {}).await;
    let mut latin1_query = BytesMut::new();
    build::frame_into(&mut latin1_query, b'Q', |b| b.put_slice(b"SELECT 'caf\xe9'\0"));
    let mut answers = Vec::new();
    for port in [origin.cluster.port(), pgwarp.port] {
        let mut raw = RawClient::open(port).await;
        let startup = build::startup(&[("user", APP_USER), ("database", APP_DB), ("client_encoding", "LATIN1")]);
        raw.send(&startup).await;
        raw.login(APP_USER, APP_PASSWORD).await.expect("login");
        raw.send(&latin1_query).await;
        let rows = raw.until_ready().await;
        let row = rows.iter().find(|m| m.tag() == b'D').map(|m| m.body().to_vec());
        answers.push(row);
    }
    assert_eq!(answers[0], answers[1], "direct vs pgwarp");
    assert!(answers[1].as_ref().is_some_and(|r| r.ends_with(b"caf\xe9")));

    let mut raw = pgwarp.raw().await;
    raw.send(&latin1_query).await;
    assert_eq!(error_code(&raw.until_ready().await).as_deref(), Some("22021"));
    let mut bad_parse = BytesMut::new();
    build::frame_into(&mut bad_parse, b'P', |b| b.put_slice(b"\0SELECT 'caf\xe9'\0\0\0"));
    raw.send(&batch(&[bad_parse, bind("", "", &[]), execute("", 0), sync()])).await;
    assert_eq!(error_code(&raw.until_ready().await).as_deref(), Some("22021"));
    raw.send(&query("SELECT 'still here'")).await;
    assert_eq!(first_column(&raw.until_ready().await), vec![Some("still here".to_string())]);
}

/// SCRAM messages that are not SCRAM get 08P01 and a wrong length in SASLInitialResponse is
/// refused, as Postgres does; a wrong password stays 28P01.
#[tokio::test]
async fn malformed_scram_messages_get_the_sqlstates_postgres_gives() {
    let origin = Origin::start();
    let pgwarp = Pgwarp::start(&origin, |_| {}).await;
    let client_first = b"n,,n=,r=abcdefghijklmnopqrstuvwx";
    let mut lying_length = BytesMut::new();
    build::frame_into(&mut lying_length, b'p', |b| {
        build::put_cstr(b, "SCRAM-SHA-256");
        b.put_i32(1000);
        b.put_slice(client_first);
    });
    for port in [origin.cluster.port(), pgwarp.port] {
        // A client-final message that is not one.
        let mut raw = RawClient::open(port).await;
        raw.send(&build::startup(&[("user", APP_USER), ("database", APP_DB)])).await;
        assert_eq!(raw.recv().await.tag(), b'R');
        raw.send(&build::sasl_initial_response("SCRAM-SHA-256", client_first)).await;
        assert_eq!(raw.recv().await.tag(), b'R');
        raw.send(&build::password(b"garbage")).await;
        let answer = raw.recv().await;
        assert_eq!(error_code(&[answer]).as_deref(), Some("08P01"), "port {port}");
        // A length that does not match what follows.
        let mut raw = RawClient::open(port).await;
        raw.send(&build::startup(&[("user", APP_USER), ("database", APP_DB)])).await;
        assert_eq!(raw.recv().await.tag(), b'R');
        raw.send(&lying_length).await;
        let answer = raw.recv().await;
        assert_eq!(error_code(&[answer]).as_deref(), Some("08P01"), "port {port}");
    }
}
