//! What pgwarp does over time, set as PgBouncer users set it: `idle_transaction_timeout` and
//! `client_idle_timeout` (a client that holds still too long is closed as Postgres itself
//! closes it), `query_timeout` (a request the origin leaves unanswered ends its client and is
//! cancelled), `server_lifetime` (origin connections are renewed between transactions),
//! `min_pool_size` (connections opened ahead of need and kept) and the `tcp_*` keepalive
//! settings (idle connections are probed), against a real Postgres.

mod common;
mod support;

use std::time::{Duration, Instant};

use pgwarp::protocol::error::ErrorFields;
use support::*;

/// Waits for the message that closes a client that held still: returns its severity and
/// SQLSTATE, and checks that the connection then ends.
async fn closed_with(raw: &mut RawClient) -> (String, String) {
    let msg = raw.recv().await;
    assert_eq!(msg.tag(), b'E', "expected an ErrorResponse");
    let fields = ErrorFields::parse(msg.body()).unwrap();
    assert!(raw.recv_or_eof().await.is_none(), "the connection stays open after {fields:?}");
    (fields.severity, fields.code)
}

/// A raw client straight to the origin, as `app`.
async fn direct(origin: &Origin) -> RawClient {
    RawClient::connect(origin.cluster.port(), APP_USER, APP_PASSWORD, APP_DB).await
}

/// The first column of the first row of a raw query's answer ("" when there is none).
async fn one_value(raw: &mut RawClient, sql: &str) -> String {
    raw.send(&query(sql)).await;
    let answer = raw.until_ready().await;
    assert_eq!(error_code(&answer), None, "{sql}");
    first_column(&answer).into_iter().next().flatten().unwrap_or_default()
}

#[tokio::test]
async fn a_client_idle_in_a_transaction_is_closed_as_postgres_closes_it_and_its_connection_is_reused() {
    let origin = Origin::start();
    origin.sql("CREATE TABLE accounts (id int primary key, balance int); INSERT INTO accounts VALUES (1, 100)");
    origin.sql("GRANT ALL ON accounts TO app");
    let pgwarp = Pgwarp::start(&origin, |c| {
        c.pool_size = 1;
        c.idle_transaction_timeout = Duration::from_millis(300);
    })
    .await;

    // What Postgres does with its own idle_in_transaction_session_timeout.
    let mut pg = direct(&origin).await;
    one_value(&mut pg, "SET idle_in_transaction_session_timeout = '300ms'").await;
    one_value(&mut pg, "BEGIN").await;
    let expected = closed_with(&mut pg).await;
    assert_eq!(expected, ("FATAL".to_owned(), "25P03".to_owned()));

    let mut a = pgwarp.raw().await;
    one_value(&mut a, "BEGIN").await;
    let pid = one_value(&mut a, "UPDATE accounts SET balance = 0 WHERE id = 1 RETURNING pg_backend_pid()").await;
    let idle_since = Instant::now();
    assert_eq!(closed_with(&mut a).await, expected);
    let waited = idle_since.elapsed();
    assert!(waited >= Duration::from_millis(250) && waited < Duration::from_secs(5), "closed after {waited:?}");

    // The transaction was rolled back, its lock is free, and the pool's only connection was
    // cleaned and reused rather than dropped.
    let b = pgwarp.client().await;
    b.batch_execute("SET lock_timeout = '2s'").await.unwrap();
    let row = b.query_one("SELECT balance, pg_backend_pid()::text FROM accounts WHERE id = 1 FOR UPDATE", &[]).await;
    let row = row.unwrap();
    assert_eq!(row.get::<_, i32>(0), 100, "the idle client's update must be rolled back");
    assert_eq!(row.get::<_, String>(1), pid, "the connection was dropped instead of rolled back and reused");
}

#[tokio::test]
async fn a_transaction_that_keeps_working_or_waits_on_the_origin_is_not_idle() {
    let origin = Origin::start();
    let pgwarp = Pgwarp::start(&origin, |c| {
        c.idle_transaction_timeout = Duration::from_millis(300);
        c.client_idle_timeout = Duration::from_millis(300);
    })
    .await;
    let client = pgwarp.client().await;
    client.batch_execute("BEGIN").await.unwrap();
    // A statement that runs longer than the limit is work, not idleness.
    client.batch_execute("SELECT pg_sleep(0.6)").await.unwrap();
    // Nor is a client that keeps sending, each pause shorter than the limit.
    for _ in 0..8 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        client.query_one("SELECT 1", &[]).await.unwrap();
    }
    client.batch_execute("COMMIT").await.unwrap();
    // Outside a transaction too.
    for _ in 0..8 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        client.query_one("SELECT 1", &[]).await.unwrap();
    }
}

#[tokio::test]
async fn a_client_idle_outside_a_transaction_is_closed_as_postgres_closes_it_pinned_or_not() {
    let origin = Origin::start();
    let pgwarp = Pgwarp::start(&origin, |c| {
        c.pool_size = 1;
        c.client_idle_timeout = Duration::from_millis(300);
    })
    .await;

    // Postgres 14 and later: idle_session_timeout.
    let mut pg = direct(&origin).await;
    one_value(&mut pg, "SET idle_session_timeout = '300ms'").await;
    let expected = closed_with(&mut pg).await;
    assert_eq!(expected, ("FATAL".to_owned(), "57P05".to_owned()));

    // A client holding no origin connection.
    let mut a = pgwarp.raw().await;
    one_value(&mut a, "SELECT 1").await;
    assert_eq!(closed_with(&mut a).await, expected);

    // A client pinned to the pool's only connection by session state: closing it frees the
    // connection, reset, for the next client.
    let mut b = pgwarp.raw().await;
    one_value(&mut b, "LISTEN idle_channel").await;
    assert_eq!(closed_with(&mut b).await, expected);
    let c = pgwarp.client().await;
    let channels = c.query_one("SELECT count(*) FROM pg_listening_channels()", &[]).await.unwrap();
    assert_eq!(channels.get::<_, i64>(0), 0, "the pinned client's LISTEN outlived it");
}

#[tokio::test]
async fn without_the_limits_an_idle_client_stays() {
    let origin = Origin::start();
    let pgwarp = Pgwarp::start(&origin, |_| {}).await;
    let client = pgwarp.client().await;
    client.batch_execute("BEGIN").await.unwrap();
    tokio::time::sleep(Duration::from_millis(700)).await;
    client.batch_execute("COMMIT").await.unwrap();
    tokio::time::sleep(Duration::from_millis(700)).await;
    client.query_one("SELECT 1", &[]).await.unwrap();
}

#[tokio::test]
async fn server_lifetime_renews_connections_between_transactions_never_during_one() {
    let origin = Origin::start();
    let pgwarp = Pgwarp::start(&origin, |c| {
        c.pool_size = 1;
        c.server_lifetime = Duration::from_millis(400);
    })
    .await;
    let client = pgwarp.client().await;
    let pid = |row: tokio_postgres::Row| row.get::<_, i32>(0);
    let first = pid(client.query_one("SELECT pg_backend_pid()", &[]).await.unwrap());

    client.batch_execute("BEGIN").await.unwrap();
    let before = pid(client.query_one("SELECT pg_backend_pid()", &[]).await.unwrap());
    tokio::time::sleep(Duration::from_millis(600)).await;
    let during = pid(client.query_one("SELECT pg_backend_pid()", &[]).await.unwrap());
    assert_eq!((before, during), (first, first), "a connection in use must not be renewed");
    client.batch_execute("COMMIT").await.unwrap();

    // Back in the pool past its lifetime: closed, and the next transaction gets a new one.
    let next = pid(client.query_one("SELECT pg_backend_pid()", &[]).await.unwrap());
    assert_ne!(next, first, "the connection outlived server_lifetime");
    let gone = format!("SELECT count(*) FROM pg_stat_activity WHERE pid = {first}");
    wait_for(|| origin.sql(&gone) == "0").await;

    // An idle connection past its lifetime is closed by the pool's reaper.
    let alive = format!("SELECT count(*) FROM pg_stat_activity WHERE pid = {next}");
    assert_eq!(origin.sql(&alive), "1");
    wait_for(|| origin.sql(&alive) == "0").await;
}

#[tokio::test]
async fn a_request_the_origin_leaves_unanswered_past_query_timeout_ends_its_client_and_is_cancelled() {
    let origin = Origin::start();
    let pgwarp = Pgwarp::start(&origin, |c| {
        c.pool_size = 1;
        c.query_timeout = Duration::from_millis(500);
    })
    .await;

    // Under the limit nothing happens: a slow statement, a transaction idle between statements
    // for longer than the limit (idleness is not a query), and a pipeline whose requests each
    // take less than the limit but together more (each counts from the answer before it).
    let client = pgwarp.client().await;
    client.batch_execute("BEGIN").await.unwrap();
    client.batch_execute("SELECT pg_sleep(0.3)").await.unwrap();
    tokio::time::sleep(Duration::from_millis(700)).await;
    client.batch_execute("SELECT pg_sleep(0.3)").await.unwrap();
    client.batch_execute("COMMIT").await.unwrap();
    let mut raw = pgwarp.raw().await;
    raw.send(&[query("SELECT pg_sleep(0.3)"), query("SELECT pg_sleep(0.3)"), query("SELECT 'piped'")].concat()).await;
    for _ in 0..2 {
        assert_eq!(error_code(&raw.until_ready().await), None);
    }
    assert_eq!(first_column(&raw.until_ready().await), vec![Some("piped".to_owned())]);
    // asyncpg prepares with Parse/Describe/Flush and runs the statement later: the time in
    // between is the client's, not a request's.
    raw.send(&[parse("", "SELECT 'prepared'", &[]), describe(b'S', ""), flush()].concat()).await;
    for tag in [b'1', b't', b'T'] {
        assert_eq!(raw.recv().await.tag(), tag);
    }
    tokio::time::sleep(Duration::from_millis(700)).await;
    raw.send(&[bind("", "", &[]), execute("", 0), sync()].concat()).await;
    assert_eq!(first_column(&raw.until_ready().await), vec![Some("prepared".to_owned())]);

    // Over it: the client ends as PgBouncer ends it, with the SQLSTATE of a cancelled query.
    let pid = one_value(&mut raw, "SELECT pg_backend_pid()").await;
    raw.send(&query("SELECT pg_sleep(60)")).await;
    let sent = Instant::now();
    assert_eq!(closed_with(&mut raw).await, ("FATAL".to_owned(), "57014".to_owned()));
    let waited = sent.elapsed();
    assert!(waited >= Duration::from_millis(450) && waited < Duration::from_secs(5), "closed after {waited:?}");

    // The query was cancelled and its connection closed, not handed to the next client: the
    // pool's only slot is free again at once, on a new backend.
    let gone = format!("SELECT count(*) FROM pg_stat_activity WHERE pid = {pid}");
    wait_for(|| origin.sql(&gone) == "0").await;
    let next = pgwarp.client().await;
    let row = next.query_one("SELECT pg_backend_pid()", &[]).await.unwrap();
    assert_ne!(row.get::<_, i32>(0).to_string(), pid);
    assert_eq!(client.query_one("SELECT 1", &[]).await.unwrap().get::<_, i32>(0), 1, "another client is unaffected");
}

/// Origin backends logged in as the app role.
fn app_backends(origin: &Origin) -> usize {
    origin.sql("SELECT count(*) FROM pg_stat_activity WHERE usename = 'app'").parse().unwrap()
}

#[tokio::test]
async fn min_pool_size_opens_connections_before_the_first_client_and_keeps_them_through_idle_timeout() {
    let origin = Origin::start();
    let pgwarp = Pgwarp::start(&origin, |c| {
        c.pool_size = 4;
        c.min_pool_size = 2;
        c.idle_timeout = Duration::from_millis(300);
    })
    .await;
    // Opened at start, with no client yet.
    wait_for(|| app_backends(&origin) == 2).await;

    // Busy: the pool grows past the minimum...
    let clients: Vec<_> = futures_util::future::join_all((0..4).map(|_| pgwarp.client())).await;
    for c in &clients {
        c.batch_execute("BEGIN").await.unwrap();
    }
    assert_eq!(app_backends(&origin), 4);
    for c in &clients {
        c.batch_execute("COMMIT").await.unwrap();
    }
    // ... and shrinks back to it through idle_timeout, not below.
    wait_for(|| app_backends(&origin) == 2).await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(app_backends(&origin), 2, "idle_timeout closed connections min_pool_size keeps");

    // Connections that die are replaced.
    origin.sql("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = 'app'");
    wait_for(|| app_backends(&origin) == 2).await;
    let row = clients[0].query_one("SELECT 1", &[]).await.unwrap();
    assert_eq!(row.get::<_, i32>(0), 1);
}

#[tokio::test]
async fn without_min_pool_size_nothing_is_opened_ahead_of_need() {
    let origin = Origin::start();
    let pgwarp = Pgwarp::start(&origin, |c| c.idle_timeout = Duration::from_millis(300)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(app_backends(&origin), 0);
    pgwarp.client().await.query_one("SELECT 1", &[]).await.unwrap();
    wait_for(|| app_backends(&origin) == 0).await;
}

/// Polls `done` every 50 ms for up to 5 s.
async fn wait_for(mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !done() {
        assert!(Instant::now() < deadline, "timed out");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// One IPv4 TCP socket of this machine, from /proc/net/tcp.
#[derive(Debug)]
struct TcpSocket {
    local_port: u16,
    remote_port: u16,
    established: bool,
    /// The kernel's timer kind: 0 none, 1 retransmit, 2 keepalive, 3 TIME_WAIT, 4 zero window.
    timer: u8,
    /// Time left on that timer, in hundredths of a second.
    timer_left: u64,
}

fn tcp_sockets() -> Vec<TcpSocket> {
    let table = std::fs::read_to_string("/proc/net/tcp").expect("read /proc/net/tcp");
    let port = |address: &str| u16::from_str_radix(address.rsplit(':').next().unwrap(), 16).unwrap();
    table
        .lines()
        .skip(1)
        .map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let (timer, left) = f[5].split_once(':').unwrap();
            TcpSocket {
                local_port: port(f[1]),
                remote_port: port(f[2]),
                established: f[3] == "01",
                timer: u8::from_str_radix(timer, 16).unwrap(),
                timer_left: u64::from_str_radix(left, 16).unwrap(),
            }
        })
        .collect()
}

#[tokio::test]
async fn tcp_keepalive_probes_idle_client_and_origin_connections_on_the_configured_schedule() {
    let origin = Origin::start();
    let pg_port = origin.cluster.port();
    let pgwarp = Pgwarp::start(&origin, |c| {
        c.tcp_keepidle = Duration::from_secs(77);
        c.tcp_keepintvl = Duration::from_secs(5);
        c.tcp_keepcnt = 3;
    })
    .await;
    let client = pgwarp.client().await;
    client.simple_query("SELECT 1").await.unwrap();

    // pgwarp's end of the client's connection, and of the origin connection it went back to
    // the pool: both idle, both with a keepalive timer due within 77 seconds (a connection
    // without keepalive has no timer while idle; with the system's setting it is 2 hours).
    let keepalive_within_77s = |s: &TcpSocket| s.timer == 2 && s.timer_left <= 7_700 && s.timer_left > 6_000;
    eventually("pgwarp's idle sockets have keepalive timers due within tcp_keepidle", || {
        let sockets = tcp_sockets();
        let client_side: Vec<_> = sockets.iter().filter(|s| s.established && s.local_port == pgwarp.port).collect();
        let origin_side: Vec<_> = sockets.iter().filter(|s| s.established && s.remote_port == pg_port).collect();
        client_side.len() == 1
            && !origin_side.is_empty()
            && client_side.iter().chain(&origin_side).all(|s| keepalive_within_77s(s))
    })
    .await;

    // Turned off, the client connection has no keepalive timer while idle.
    let without = Pgwarp::start(&origin, |c| c.tcp_keepalive = false).await;
    let quiet = without.client().await;
    quiet.simple_query("SELECT 1").await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let sockets = tcp_sockets();
    let client_side: Vec<_> = sockets.iter().filter(|s| s.established && s.local_port == without.port).collect();
    assert_eq!(client_side.len(), 1, "{sockets:?}");
    assert_eq!(client_side[0].timer, 0, "keepalive off, yet a timer runs on the idle client socket: {client_side:?}");
}

#[tokio::test]
async fn reserve_connections_close_after_idle_timeout_and_min_pool_size_keeps_the_pools_own() {
    let origin = Origin::start();
    let pgwarp = Pgwarp::start(&origin, |c| {
        c.pool_size = 1;
        c.min_pool_size = 1;
        c.reserve_pool_size = 1;
        c.reserve_pool_timeout = Duration::from_millis(200);
        c.idle_timeout = Duration::from_millis(800);
    })
    .await;
    let holder = pgwarp.client().await;
    holder.batch_execute("BEGIN").await.unwrap();
    let own = first(&holder.simple_query("SELECT pg_backend_pid()").await.unwrap());
    let burst = pgwarp.client().await;
    let reserve = first(&burst.simple_query("SELECT pg_backend_pid()").await.unwrap());
    assert_ne!(own, reserve);
    holder.batch_execute("COMMIT").await.unwrap();

    // Both idle past idle_timeout: the reserve's goes, the one min_pool_size keeps stays.
    let open = |pid: &str| origin.sql(&format!("SELECT count(*) FROM pg_stat_activity WHERE pid = {pid}")) == "1";
    eventually("the idle reserve connection is closed", || !open(&reserve)).await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert!(open(&own), "min_pool_size keeps the pool's own connection");
    assert_eq!(first(&burst.simple_query("SELECT pg_backend_pid()").await.unwrap()), own);
}
