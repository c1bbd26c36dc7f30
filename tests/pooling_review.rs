//! Pooling and protocol faults found in review, each reproduced against a real Postgres: what
//! one client leaves behind on an origin connection must never reach the next client, and
//! errors, cancels and statements must behave as they do on a direct connection.

mod common;
mod support;

use std::time::Duration;

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
