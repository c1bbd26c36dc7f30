//! The console commands an operator runs a pooler with, as PgBouncer's of the same names:
//! `PAUSE db`, `RESUME db`, `DISABLE`, `ENABLE`, `KILL`, `KILL_CLIENT`, the three `SHUTDOWN`s,
//! and a rolling restart through `so_reuseport`. The `pgwarp` binary in front of a real
//! Postgres, driven by tokio-postgres.

mod common;
mod support;

use std::time::Duration;

use common::PgwarpProcess;
use support::console::*;
use support::*;

/// A second database the app role owns, to show that commands naming one spare the other.
const OTHER_DB: &str = "other";

/// pgwarp (the binary) in front of `origin`, the app role as admin, no cache.
fn start(origin: &Origin, extra: &[&str]) -> PgwarpProcess {
    let url = origin.url();
    let mut args = vec!["--origin", url.as_str(), "--admin-users", APP_USER, "--no-cache", "--log-level", "info"];
    args.extend_from_slice(extra);
    PgwarpProcess::start(&args)
}

async fn client(process: &PgwarpProcess, db: &str) -> tokio_postgres::Client {
    common::connect(&process.url(APP_USER, APP_PASSWORD, db)).await.unwrap()
}

async fn named(process: &PgwarpProcess, name: &str) -> tokio_postgres::Client {
    let url = format!("{}?application_name={name}", process.url(APP_USER, APP_PASSWORD, APP_DB));
    common::connect(&url).await.unwrap()
}

/// Whether a backend of the origin runs a query containing `text` (other than this check).
fn origin_runs(origin: &Origin, text: &str) -> bool {
    let sql = format!("SELECT count(*) FROM pg_stat_activity WHERE query LIKE '%{text}%' AND pid <> pg_backend_pid()");
    origin.sql(&sql).trim() != "0"
}

fn origin_has_backend(origin: &Origin, pid: &str) -> bool {
    origin.sql(&format!("SELECT count(*) FROM pg_stat_activity WHERE pid = {pid}")).trim() != "0"
}

/// The status line of `GET /healthz` on `port`.
fn healthz(port: u16) -> String {
    use std::io::{Read, Write};
    let mut socket = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect to the admin port");
    socket.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut reply = String::new();
    socket.read_to_string(&mut reply).unwrap();
    reply.split(' ').take(2).collect::<Vec<_>>().join(" ")
}

/// Waits up to 10 s for `client`'s connection to be closed.
async fn closed(client: &tokio_postgres::Client, who: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !client.is_closed() {
        assert!(std::time::Instant::now() < deadline, "{who} is still connected");
        // A query notices a closed connection; tokio-postgres's own task does too.
        let _ = client.simple_query("SELECT 1").await;
    }
}

#[tokio::test]
async fn pause_disable_and_kill_act_on_one_database_and_spare_the_other() {
    let origin = Origin::start();
    origin.cluster.create_database(OTHER_DB, APP_USER);
    let process = start(&origin, &["--pool-size", "2", "--pool-timeout", "60s"]);
    let app = client(&process, APP_DB).await;
    let other = client(&process, OTHER_DB).await;
    let admin = client(&process, "pgwarp").await;
    app.simple_query("SELECT 1").await.unwrap();
    other.simple_query("SELECT 1").await.unwrap();

    // PAUSE of one database answers at once while the other database has a transaction open;
    // its new transactions wait, the other database's run.
    app.batch_execute("BEGIN; SELECT 1").await.unwrap();
    let pause = format!("PAUSE {OTHER_DB}");
    let paused = tokio::time::timeout(Duration::from_secs(5), admin.simple_query(&pause));
    paused.await.expect("PAUSE other does not wait for app's transaction").unwrap();
    app.batch_execute("COMMIT").await.unwrap();
    let pools = show(&admin, "POOLS").await;
    assert_eq!(cell(row_where(&pools, "database", OTHER_DB), "paused"), Some("t"), "{pools:#?}");
    assert_eq!(cell(row_where(&pools, "database", APP_DB), "paused"), Some("f"));
    let stats = show(&admin, "STATS").await;
    assert_eq!(cell(row_where(&stats, "name", "paused"), "value"), Some("false"), "not everything is paused");
    let waiting = tokio::spawn(async move {
        let answer = other.query_one("SELECT 2", &[]).await.map(|r| r.get::<_, i32>(0));
        (other, answer)
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!waiting.is_finished(), "a paused database lends nothing");
    assert_eq!(first(&app.simple_query("SELECT 40 + 2").await.unwrap()), "42");
    let err = admin.simple_query(&format!("PAUSE {OTHER_DB}")).await.unwrap_err();
    assert_eq!(code(&err), "55000", "{err}");
    let err = admin.simple_query(&format!("RESUME {APP_DB}")).await.unwrap_err();
    assert_eq!(code(&err), "55000", "{APP_DB} is not paused: {err}");
    admin.simple_query(&format!("RESUME {OTHER_DB}")).await.unwrap();
    let (other, answer) = tokio::time::timeout(Duration::from_secs(10), waiting).await.expect("RESUME").unwrap();
    assert_eq!(answer.unwrap(), 2);

    // DISABLE refuses new logins to one database; its connected clients and the other
    // database carry on. ENABLE takes them again.
    admin.simple_query(&format!("DISABLE {APP_DB}")).await.unwrap();
    let err = common::connect(&process.url(APP_USER, APP_PASSWORD, APP_DB)).await.unwrap_err();
    assert_eq!(code(&err), "55000", "{err}");
    let message = err.as_db_error().map(|e| e.message().to_owned()).unwrap_or_default();
    assert!(message.contains("not currently accepting connections"), "{message}");
    assert_eq!(first(&app.simple_query("SELECT 1").await.unwrap()), "1");
    client(&process, OTHER_DB).await.simple_query("SELECT 1").await.unwrap();
    let stats = show(&admin, "STATS").await;
    assert_eq!(cell(row_where(&stats, "name", "disabled"), "value"), Some(APP_DB));
    admin.simple_query(&format!("ENABLE {APP_DB}")).await.unwrap();
    client(&process, APP_DB).await.simple_query("SELECT 1").await.unwrap();

    // KILL of one database: its clients are closed at once, even inside a transaction, and
    // their origin connections with them (the row lock goes); the other database's stay.
    app.batch_execute("CREATE TABLE t (id int PRIMARY KEY); INSERT INTO t VALUES (1)").await.unwrap();
    app.batch_execute("BEGIN; SELECT * FROM t WHERE id = 1 FOR UPDATE").await.unwrap();
    let holder_pid = first(&app.simple_query("SELECT pg_backend_pid()").await.unwrap());
    let idle = client(&process, APP_DB).await;
    idle.simple_query("SELECT 1").await.unwrap();
    let answer = admin.simple_query(&format!("KILL {APP_DB}")).await.unwrap();
    assert!(matches!(answer.last(), Some(tokio_postgres::SimpleQueryMessage::CommandComplete(_))));
    closed(&app, "the client inside a transaction").await;
    closed(&idle, "the idle client").await;
    let err = app.simple_query("SELECT 1").await.unwrap_err();
    assert!(err.is_closed() || code(&err) == "57P01", "{err}");
    eventually("the killed client's origin backend is gone", || !origin_has_backend(&origin, &holder_pid)).await;
    assert_eq!(origin.sql("SELECT id FROM t FOR UPDATE NOWAIT").trim(), "1", "the row lock went with it");
    assert_eq!(first(&other.simple_query("SELECT 3").await.unwrap()), "3", "the other database is spared");

    // The killed database stays paused: a new client logs in, and its work waits for RESUME.
    let pools = show(&admin, "POOLS").await;
    assert_eq!(cell(row_where(&pools, "database", APP_DB), "paused"), Some("t"), "{pools:#?}");
    let late = client(&process, APP_DB).await;
    let waiting = tokio::spawn(async move { late.query_one("SELECT 4", &[]).await.map(|r| r.get::<_, i32>(0)) });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!waiting.is_finished(), "a killed database waits for RESUME");
    admin.simple_query("RESUME").await.unwrap();
    assert_eq!(tokio::time::timeout(Duration::from_secs(10), waiting).await.unwrap().unwrap().unwrap(), 4);
}

#[tokio::test]
async fn kill_client_closes_a_running_or_waiting_client_and_spares_everyone_else() {
    let origin = Origin::start();
    let process = start(&origin, &["--pool-size", "2", "--pool-timeout", "60s"]);
    let sleeper = named(&process, "sleeper").await;
    let bystander = named(&process, "bystander").await;
    let queued = named(&process, "queued").await;
    let admin = client(&process, "pgwarp").await;

    // The sleeper and the bystander hold both connections; the third client waits for one.
    let sleeping = tokio::spawn(async move { sleeper.simple_query("SELECT pg_sleep(60)").await.map(|_| ()) });
    eventually("the sleep starts on the origin", || origin_runs(&origin, "pg_sleep(60)")).await;
    bystander.batch_execute("BEGIN; SELECT 1").await.unwrap();
    let waiting = tokio::spawn(async move { queued.simple_query("SELECT 11").await.map(|_| ()) });
    let clients = until_shown(&admin, "CLIENTS", |c| {
        c.iter().any(|r| cell(r, "application_name") == Some("queued") && cell(r, "state") == Some("waiting"))
    })
    .await;
    let id = |name: &str| cell(row_where(&clients, "application_name", name), "id").unwrap().to_owned();

    // Waiting is no shelter (pool_timeout is a minute away).
    admin.simple_query(&format!("KILL_CLIENT {}", id("queued"))).await.unwrap();
    let answer = tokio::time::timeout(Duration::from_secs(10), waiting).await.expect("closed while waiting");
    assert_eq!(code(&answer.unwrap().unwrap_err()), "57P01");

    // A running query is cancelled on the origin, and its connection closed.
    admin.simple_query(&format!("KILL_CLIENT {}", id("sleeper"))).await.unwrap();
    let answer = tokio::time::timeout(Duration::from_secs(10), sleeping).await.expect("the client is closed at once");
    let err = answer.unwrap().expect_err("the killed client's query does not finish");
    assert_eq!(code(&err), "57P01", "{err}");
    let message = err.as_db_error().map(|e| e.message().to_owned()).unwrap_or_default();
    assert!(message.contains("KILL"), "says why: {message}");
    eventually("the query is cancelled on the origin", || !origin_runs(&origin, "pg_sleep(60)")).await;
    until_shown(&admin, "CLIENTS", |c| {
        !c.iter().any(|r| matches!(cell(r, "application_name"), Some("sleeper" | "queued")))
    })
    .await;
    assert_eq!(first(&bystander.simple_query("SELECT 5").await.unwrap()), "5", "its transaction goes on");
    bystander.batch_execute("COMMIT").await.unwrap();

    // A console cannot be killed, and an unknown id is an error of its own.
    let clients = show(&admin, "CLIENTS").await;
    let console_id = cell(row_where(&clients, "database", "pgwarp"), "id").unwrap().to_owned();
    let err = admin.simple_query(&format!("KILL_CLIENT {console_id}")).await.unwrap_err();
    assert_eq!(code(&err), "55000", "{err}");
    let err = admin.simple_query("KILL_CLIENT 999999999").await.unwrap_err();
    assert_eq!(code(&err), "42704", "{err}");
    assert_eq!(first(&bystander.simple_query("SELECT 6").await.unwrap()), "6");
}

#[tokio::test]
async fn shutdown_wait_for_clients_hands_the_port_to_a_new_pgwarp_without_refusing_anyone() {
    let origin = Origin::start();
    let listen = format!("127.0.0.1:{}", common::free_port());
    let admin_port = common::free_port();
    let admin_listen = format!("127.0.0.1:{admin_port}");
    let args = ["--listen", listen.as_str(), "--so-reuseport", "--admin-listen", admin_listen.as_str()];
    let mut old = start(&origin, &args);
    // Both connected before the new process exists, so both are the old one's.
    let staying = named(&old, "staying").await;
    let old_admin = client(&old, "pgwarp").await;
    staying.batch_execute("BEGIN; SELECT 1").await.unwrap();

    let new = start(&origin, &args);
    eventually("the new pgwarp listens on the same port", || new.log().contains("pgwarp accepting clients")).await;
    old_admin.simple_query("SHUTDOWN WAIT_FOR_CLIENTS").await.unwrap();

    // From the answer on, every new client is the new pgwarp's: its console lists them all.
    let mut arrivals = Vec::new();
    for i in 0..10 {
        let arrival = named(&new, &format!("arrival{i}")).await;
        assert_eq!(first(&arrival.simple_query("SELECT 1").await.unwrap()), "1");
        arrivals.push(arrival);
    }
    // The shared admin port is the new one's too: its health checks never see the old drain.
    for _ in 0..20 {
        assert_eq!(healthz(admin_port), "HTTP/1.1 200", "a health check met the old pgwarp");
    }
    let new_admin = client(&new, "pgwarp").await;
    let clients = show(&new_admin, "CLIENTS").await;
    for i in 0..10 {
        row_where(&clients, "application_name", &format!("arrival{i}"));
    }
    assert!(!clients.iter().any(|r| cell(r, "application_name") == Some("staying")));

    // The old pgwarp serves its client to the end, transaction and all, then exits.
    assert_eq!(first(&staying.simple_query("SELECT 7").await.unwrap()), "7");
    staying.batch_execute("COMMIT").await.unwrap();
    assert!(exited(&mut old, Duration::from_millis(500)).await.is_none(), "it waits for its clients");
    assert_eq!(first(&old_admin.simple_query("SHOW STATS").await.unwrap()), "clients");
    drop(staying);
    drop(old_admin);
    let status =
        exited(&mut old, Duration::from_secs(10)).await.unwrap_or_else(|| panic!("still running:\n{}", old.log()));
    assert!(status.success(), "{status}");
    assert_eq!(first(&arrivals[0].simple_query("SELECT 8").await.unwrap()), "8");
}

#[tokio::test]
async fn shutdown_waits_for_transactions_or_not_and_a_second_signal_stops_waiting() {
    let origin = Origin::start();

    // WAIT_FOR_SERVERS, as SIGTERM: idle clients are closed, an open transaction finishes.
    let mut process = start(&origin, &[]);
    let (busy, idle, admin) =
        (client(&process, APP_DB).await, client(&process, APP_DB).await, client(&process, "pgwarp").await);
    idle.simple_query("SELECT 1").await.unwrap();
    busy.batch_execute("BEGIN; SELECT 1").await.unwrap();
    admin.simple_query("SHUTDOWN WAIT_FOR_SERVERS").await.unwrap();
    closed(&idle, "the idle client").await;
    assert_eq!(first(&busy.simple_query("SELECT 9").await.unwrap()), "9", "the transaction carries on");
    busy.batch_execute("COMMIT").await.unwrap();
    let status = exited(&mut process, Duration::from_secs(10)).await.expect("exits once the transaction ended");
    assert!(status.success(), "{status}");

    // Plain SHUTDOWN closes everyone at once, inside a transaction or not (shutdown_timeout
    // is 30 s: the exit comes long before).
    let mut process = start(&origin, &[]);
    let (busy, admin) = (client(&process, APP_DB).await, client(&process, "pgwarp").await);
    busy.batch_execute("BEGIN; SELECT 1").await.unwrap();
    admin.simple_query("SHUTDOWN").await.unwrap();
    let status = exited(&mut process, Duration::from_secs(5)).await.expect("exits at once");
    assert!(status.success(), "{status}");
    assert!(busy.simple_query("SELECT 1").await.is_err());

    // A signal after SHUTDOWN WAIT_FOR_SERVERS, as a second SIGTERM, closes the rest at once.
    let mut process = start(&origin, &[]);
    let (busy, admin) = (client(&process, APP_DB).await, client(&process, "pgwarp").await);
    busy.batch_execute("BEGIN; SELECT 1").await.unwrap();
    admin.simple_query("SHUTDOWN WAIT_FOR_SERVERS").await.unwrap();
    assert!(exited(&mut process, Duration::from_millis(300)).await.is_none(), "the transaction may finish");
    process.signal("INT");
    assert!(exited(&mut process, Duration::from_secs(5)).await.is_some(), "SIGINT ends the wait");

    // After SHUTDOWN WAIT_FOR_CLIENTS, SIGTERM drains: idle clients go, then pgwarp exits.
    let mut process = start(&origin, &[]);
    let (idle, admin) = (client(&process, APP_DB).await, client(&process, "pgwarp").await);
    idle.simple_query("SELECT 1").await.unwrap();
    admin.simple_query("SHUTDOWN WAIT_FOR_CLIENTS").await.unwrap();
    assert!(exited(&mut process, Duration::from_millis(300)).await.is_none(), "its clients stay");
    assert_eq!(first(&idle.simple_query("SELECT 12").await.unwrap()), "12");
    process.signal("TERM");
    closed(&idle, "the idle client").await;
    assert!(exited(&mut process, Duration::from_secs(10)).await.is_some(), "SIGTERM drains and exits");

    // The first SIGTERM waits for the transaction; the second does not.
    let mut process = start(&origin, &[]);
    let busy = client(&process, APP_DB).await;
    busy.batch_execute("BEGIN; SELECT 1").await.unwrap();
    process.signal("TERM");
    assert!(exited(&mut process, Duration::from_millis(500)).await.is_none());
    assert_eq!(first(&busy.simple_query("SELECT 10").await.unwrap()), "10");
    process.signal("TERM");
    let status = exited(&mut process, Duration::from_secs(5)).await.expect("the second signal closes the rest");
    assert!(status.success(), "{status}");
    assert!(busy.simple_query("SELECT 1").await.is_err());
}
