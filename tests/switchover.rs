//! Moving pgwarp to another origin, and replacing its origin connections, without a restart:
//! the PgBouncer operator's `RELOAD` (a new host in the config file, a rotated password),
//! `RECONNECT` and `WAIT_CLOSE`, against two real Postgres servers and the `pgwarp` binary.

mod common;
mod support;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::PgwarpProcess;
use support::*;

/// The config file: `origin`, and the app role as admin; one worker, so that an idle connection
/// is the one reused next.
fn write_config(file: &Path, origin: &str) {
    let text = format!("origin = \"{origin}\"\npool_size = 4\nworkers = 1\nadmin_users = [\"app\"]\n");
    std::fs::write(file, text).unwrap();
}

/// A temporary config file naming `origin` (gone with the directory).
fn config_file(origin: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("pgwarp.toml");
    write_config(&file, origin);
    (dir, file)
}

fn start(file: &Path) -> PgwarpProcess {
    PgwarpProcess::start(&["--config", file.to_str().unwrap(), "--log-level", "info"])
}

/// Runs one console command with psql, so its NOTICEs can be read: stderr.
async fn console(origin: &Origin, process: &PgwarpProcess, password: &str, command: &str) -> String {
    let run = psql(origin, vec!["-c".into(), command.into(), process.url(APP_USER, password, "pgwarp")]);
    let out = tokio::time::timeout(Duration::from_secs(20), run)
        .await
        .unwrap_or_else(|_| panic!("{command} did not answer in 20 s; log:\n{}", process.log()));
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{command}: {stderr}\nlog:\n{}", process.log());
    stderr
}

/// pgwarp's connections to `origin` right now (its backends for the app role).
fn app_backends(origin: &Origin) -> usize {
    let count = origin.sql("SELECT count(*) FROM pg_stat_activity WHERE usename = 'app'");
    count.trim().parse().unwrap()
}

/// The extended protocol, which the cache answers.
async fn place(client: &tokio_postgres::Client) -> String {
    client.query_one("SELECT name FROM place", &[]).await.unwrap().get(0)
}

async fn cache_hits(process: &PgwarpProcess) -> u64 {
    let console = common::connect(&process.url(APP_USER, APP_PASSWORD, "pgwarp")).await.unwrap();
    let shown = console.simple_query("SHOW CACHE").await.unwrap();
    for message in shown {
        if let tokio_postgres::SimpleQueryMessage::Row(row) = message {
            if row.get(0) == Some("hits") {
                return row.get(1).unwrap().parse().unwrap();
            }
        }
    }
    panic!("SHOW CACHE has no hits row")
}

async fn one(client: &tokio_postgres::Client, sql: &str) -> String {
    first(&client.simple_query(sql).await.unwrap())
}

#[tokio::test]
async fn a_new_origin_on_reload_takes_new_transactions_while_open_ones_finish_on_the_old() {
    let (old, new) = (Origin::start(), Origin::start());
    for (origin, name) in [(&old, "old"), (&new, "new")] {
        origin.sql(&format!(
            "CREATE TABLE place (name text); INSERT INTO place VALUES ('{name}'); ALTER TABLE place OWNER TO app; \
             CREATE TABLE note (said text); ALTER TABLE note OWNER TO app"
        ));
    }
    let (_dir, file) = config_file(&old.url());
    let process = start(&file);
    let url = process.url(APP_USER, APP_PASSWORD, APP_DB);

    let reader = common::connect(&url).await.unwrap();
    let statement = reader.prepare("SELECT name FROM place WHERE $1::int = 1").await.unwrap();
    // Once the cache has loaded the catalog, the answer comes from the cache.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while cache_hits(&process).await == 0 {
        assert!(std::time::Instant::now() < deadline, "the cache never answered");
        assert_eq!(place(&reader).await, "old");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let row = reader.query_one(&statement, &[&1i32]).await.unwrap();
    assert_eq!(row.get::<_, String>(0), "old");

    // A client pinned to its connection: its LISTEN cannot move.
    let listener = common::connect(&url).await.unwrap();
    listener.simple_query("LISTEN moves").await.unwrap();
    // A query running on the old origin, to cancel after the move.
    let sleeper = common::connect(&url).await.unwrap();
    let cancel = sleeper.cancel_token();
    let sleeping = tokio::spawn(async move { sleeper.simple_query("SELECT pg_sleep(60)").await.map(|_| ()) });
    let asleep = "SELECT count(*) FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(60)' AND state = 'active'";
    eventually("the query started on the old origin", || old.sql(asleep).trim() == "1").await;

    // A client that logs in before the move and runs its query after.
    let latecomer = common::connect(&url).await.unwrap();

    let writer = common::connect(&url).await.unwrap();
    writer.simple_query("BEGIN").await.unwrap();
    // A write to another table: the cached answers about `place` stay current.
    writer.simple_query("INSERT INTO note VALUES ('written before the move')").await.unwrap();

    write_config(&file, &new.url());
    let notices = console(&old, &process, APP_PASSWORD, "RELOAD").await;
    assert!(notices.contains("applied: origin"), "{notices}");
    assert!(notices.contains(&format!("the origin is now 127.0.0.1:{}", new.cluster.port())), "{notices}");

    // New transactions go to the new origin: not from the cache, and the prepared statement is
    // prepared there again.
    assert_eq!(place(&reader).await, "new");
    let row = reader.query_one(&statement, &[&1i32]).await.unwrap();
    assert_eq!(row.get::<_, String>(0), "new");
    let late = common::connect(&url).await.unwrap();
    assert_eq!(place(&late).await, "new");

    // The transaction that was open keeps its connection to the old origin until it ends.
    assert_eq!(one(&writer, "SELECT name FROM place").await, "old");
    // The cancel goes where the query runs: the old origin.
    cancel.cancel_query(tokio_postgres::NoTls).await.unwrap();
    let cancelled = tokio::time::timeout(Duration::from_secs(10), sleeping).await.unwrap().unwrap().unwrap_err();
    assert_eq!(code(&cancelled), "57014", "{cancelled}");
    // And a query on the new origin is cancelled there, whenever its client logged in.
    let cancel = latecomer.cancel_token();
    let sleeping = tokio::spawn(async move { latecomer.simple_query("SELECT pg_sleep(60)").await.map(|_| ()) });
    eventually("the query started on the new origin", || new.sql(asleep).trim() == "1").await;
    cancel.cancel_query(tokio_postgres::NoTls).await.unwrap();
    let cancelled = tokio::time::timeout(Duration::from_secs(10), sleeping).await.unwrap().unwrap().unwrap_err();
    assert_eq!(code(&cancelled), "57014", "{cancelled}");
    // The pinned client is closed (it is idle), so it reconnects to the new origin.
    eventually("the LISTEN client still holds the old origin", || listener.is_closed()).await;
    eventually("only the open transaction's connection is left on the old origin", || app_backends(&old) == 1).await;
    writer.simple_query("COMMIT").await.unwrap();
    console(&new, &process, APP_PASSWORD, "WAIT_CLOSE").await;
    let closed = "WAIT_CLOSE answered, so pgwarp has closed its last connection to the old origin";
    eventually(closed, || app_backends(&old) == 0).await;
    assert_eq!(old.sql("SELECT count(*) FROM note").trim(), "1", "the transaction committed there");
    assert_eq!(one(&writer, "SELECT name FROM place").await, "new");
    assert!(app_backends(&new) >= 1);

    // Neither pgwarp nor the clients restarted: the same sessions go on.
    assert_eq!(one(&reader, "SELECT 1").await, "1");
    assert!(process.log().contains("reload: the origin is now"), "{}", process.log());
}

#[tokio::test]
async fn reconnect_replaces_connections_as_their_transactions_end() {
    let origin = Origin::start();
    let (_dir, file) = config_file(&origin.url());
    // No cache: its catalog load would be another connection to tell apart.
    let process = PgwarpProcess::start(&["--config", file.to_str().unwrap(), "--no-cache"]);
    let url = process.url(APP_USER, APP_PASSWORD, APP_DB);

    let client = common::connect(&url).await.unwrap();
    let first_pid = one(&client, "SELECT pg_backend_pid()").await;
    assert_eq!(one(&client, "SELECT pg_backend_pid()").await, first_pid, "one idle connection, reused");

    let inside = common::connect(&url).await.unwrap();
    inside.simple_query("BEGIN").await.unwrap();
    let inside_pid = one(&inside, "SELECT pg_backend_pid()").await;

    console(&origin, &process, APP_PASSWORD, "RECONNECT app").await;
    let second_pid = one(&client, "SELECT pg_backend_pid()").await;
    assert_ne!(second_pid, first_pid, "the idle connection was replaced");
    assert_eq!(one(&inside, "SELECT pg_backend_pid()").await, inside_pid, "never in the middle of a transaction");

    let console_url = process.url(APP_USER, APP_PASSWORD, "pgwarp");
    let pools = common::connect(&console_url).await.unwrap().simple_query("SHOW POOLS").await.unwrap();
    let replaced = pools.iter().find_map(|m| match m {
        tokio_postgres::SimpleQueryMessage::Row(row) => row.get("replaced").map(str::to_owned),
        _ => None,
    });
    assert_eq!(replaced.as_deref(), Some("1"), "SHOW POOLS counts the connection still to be replaced");

    // WAIT_CLOSE waits for the transaction: it answers only after the COMMIT.
    let waiting = {
        let (url, origin_psql) = (process.url(APP_USER, APP_PASSWORD, "pgwarp"), origin.cluster.bin("psql"));
        tokio::task::spawn_blocking(move || {
            std::process::Command::new(origin_psql).args(["-X", "-c", "WAIT_CLOSE", &url]).output().unwrap()
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!waiting.is_finished(), "WAIT_CLOSE answered while a replaced connection was in use");
    inside.simple_query("COMMIT").await.unwrap();
    let answered = tokio::time::timeout(Duration::from_secs(10), waiting).await.unwrap().unwrap();
    assert!(answered.status.success(), "{}", String::from_utf8_lossy(&answered.stderr));
    let gone = format!("SELECT count(*) FROM pg_stat_activity WHERE pid IN ({first_pid}, {inside_pid})");
    eventually("the replaced backends never left", || origin.sql(&gone).trim() == "0").await;
    assert_ne!(one(&inside, "SELECT pg_backend_pid()").await, inside_pid);

    // RECONNECT of a database nobody uses replaces nothing.
    let notices = console(&origin, &process, APP_PASSWORD, "RECONNECT nothere").await;
    assert!(notices.contains("no pool serves database \"nothere\""), "{notices}");
    assert_eq!(one(&client, "SELECT pg_backend_pid()").await, second_pid);
}

#[tokio::test]
async fn a_rotated_origin_password_is_used_by_the_clients_already_connected() {
    let origin = Origin::start();
    let (_dir, file) = config_file(&origin.url());
    let process = start(&file);

    let client = common::connect(&process.url(APP_USER, APP_PASSWORD, APP_DB)).await.unwrap();
    assert_eq!(one(&client, "SELECT current_user").await, APP_USER);

    // The operator's rotation: the role's password, then the config, then RELOAD and RECONNECT.
    origin.sql("ALTER ROLE app PASSWORD 'rotated'");
    write_config(&file, &origin.cluster.url(APP_USER, "rotated", APP_DB));
    let notices = console(&origin, &process, APP_PASSWORD, "RELOAD").await;
    assert!(notices.contains("the origin password of app changed: 1 pools open new connections with it"), "{notices}");
    assert!(!notices.contains("the origin is now"), "a password is no new origin: {notices}");
    console(&origin, &process, "rotated", "RECONNECT").await;

    // The client logged in with the old password; its work now runs on connections opened
    // with the new one.
    assert_eq!(one(&client, "SELECT pg_backend_pid() > 0").await, "t");
    assert_eq!(one(&client, "SELECT current_user").await, APP_USER);
    let fresh = common::connect(&process.url(APP_USER, "rotated", APP_DB)).await.expect("the new password logs in");
    assert_eq!(one(&fresh, "SELECT 1").await, "1");
    let err = common::connect(&process.url(APP_USER, APP_PASSWORD, APP_DB)).await.unwrap_err();
    assert_eq!(code(&err), "28P01", "the old password no longer logs in: {err}");
}

/// The port of the server a client's transactions run on.
async fn server_port(client: &tokio_postgres::Client) -> u16 {
    let port: i32 = client.query_one("SELECT inet_server_port()", &[]).await.unwrap().get(0);
    u16::try_from(port).unwrap()
}

#[tokio::test]
async fn an_origin_url_with_several_hosts_uses_the_first_that_answers_and_suits_target_session_attrs() {
    let (a, b) = (Origin::start(), Origin::start());
    // `a` takes only read-only transactions, as a standby would (libpq's read-write check looks
    // at default_transaction_read_only too); `b` is read-write.
    a.sql("ALTER DATABASE app SET default_transaction_read_only = on");
    let (pa, pb) = (a.cluster.port(), b.cluster.port());
    let dead = common::free_port();
    let url = |hosts: &str, attrs: &str| format!("postgres://{APP_USER}:{APP_PASSWORD}@{hosts}/{APP_DB}{attrs}");
    let through = |origin: String| Pgwarp::start(&a, move |c| c.origin = Some(origin));

    // Any server: the first host that answers, past one that does not.
    let pgwarp = through(url(&format!("127.0.0.1:{pa},127.0.0.1:{pb}"), "")).await;
    assert_eq!(server_port(&pgwarp.client().await).await, pa);
    drop(pgwarp);
    let pgwarp = through(url(&format!("127.0.0.1:{dead},127.0.0.1:{pb}"), "")).await;
    assert_eq!(server_port(&pgwarp.client().await).await, pb);
    drop(pgwarp);

    // read-write passes over the read-only host, and writes work.
    let pgwarp = through(url(&format!("127.0.0.1:{pa},127.0.0.1:{pb}"), "?target_session_attrs=read-write")).await;
    let client = pgwarp.client().await;
    assert_eq!(server_port(&client).await, pb);
    client.batch_execute("CREATE TABLE written (id int)").await.unwrap();
    // A cancel reaches the host the query runs on.
    let cancel = client.cancel_token();
    let slow = tokio::spawn(async move { client.batch_execute("SELECT pg_sleep(30)").await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    cancel.cancel_query(tokio_postgres::NoTls).await.unwrap();
    let err = tokio::time::timeout(Duration::from_secs(5), slow).await.unwrap().unwrap().unwrap_err();
    assert_eq!(support::code(&err), "57014");
    drop(pgwarp);

    // read-only takes the read-only host even when it is listed last.
    let pgwarp = through(url(&format!("127.0.0.1:{pb},127.0.0.1:{pa}"), "?target_session_attrs=read-only")).await;
    assert_eq!(server_port(&pgwarp.client().await).await, pa);
    drop(pgwarp);

    // Nothing suits: a clear error (here at login, which needs the origin's parameters).
    let pgwarp = through(url(&format!("127.0.0.1:{pa},127.0.0.1:{dead}"), "?target_session_attrs=read-write")).await;
    let err = common::connect(&pgwarp.url()).await.unwrap_err();
    assert_eq!(support::code(&err), "08006");
    let message = err.as_db_error().map(|e| e.message().to_owned()).unwrap_or_default();
    assert!(message.contains("no origin host that is read-write"), "{message}");
    // The failover: `a` takes writes now, and the next connection finds it.
    a.sql("SET default_transaction_read_only = off; ALTER DATABASE app RESET default_transaction_read_only");
    assert_eq!(server_port(&pgwarp.client().await).await, pa);
}
