//! Unix-domain sockets on both sides, as PgBouncer and libpq use them: pgwarp reaching a
//! Postgres on the same machine through the server's socket (a directory as the origin URL's
//! host), and clients reaching pgwarp through its own (`unix_socket_dir`). The `pgwarp` binary,
//! a real Postgres that asks for SCRAM on its socket too, tokio-postgres and psql.

mod common;
mod support;

use std::path::Path;
use std::time::Duration;

use common::{PgCluster, PgOptions, PgwarpProcess};
use support::console::*;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A Postgres whose socket wants a SCRAM password like its TCP port, with the app role.
fn origin() -> Origin {
    let cluster = PgCluster::start_with(PgOptions { local_method: "scram-sha-256", ..PgOptions::default() });
    cluster.create_user(APP_USER, APP_PASSWORD);
    cluster.create_database(APP_DB, APP_USER);
    Origin { cluster }
}

/// The origin URL with the socket directory as its host, percent-encoded as libpq reads it.
/// `sslmode=verify-full` with no CA, which libpq ignores on a socket: the test server has no TLS.
fn socket_url(origin: &Origin) -> String {
    let dir = origin.cluster.socket_dir().display().to_string().replace('/', "%2F");
    format!("postgres://{APP_USER}:{APP_PASSWORD}@{dir}:{}/{APP_DB}?sslmode=verify-full", origin.cluster.port())
}

/// Starts pgwarp with `args` and waits for its socket too (bound after the TCP port).
async fn start(args: &[&str], socket: &Path) -> PgwarpProcess {
    let process = PgwarpProcess::start(args);
    eventually("pgwarp makes its socket", || socket.exists()).await;
    process
}

/// A tokio-postgres client on pgwarp's socket in `dir`.
async fn unix_client(
    dir: &Path,
    port: u16,
    db: &str,
    name: &str,
) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let (client, connection) = tokio_postgres::Config::new()
        .host_path(dir)
        .port(port)
        .user(APP_USER)
        .password(APP_PASSWORD)
        .dbname(db)
        .application_name(name)
        .connect(tokio_postgres::NoTls)
        .await?;
    tokio::spawn(connection);
    Ok(client)
}

fn socket_in(dir: &Path, port: u16) -> std::path::PathBuf {
    dir.join(format!(".s.PGSQL.{port}"))
}

#[tokio::test]
async fn work_cancels_and_outages_pass_between_a_socket_client_and_a_socket_origin() {
    let origin = origin();
    let certs = certs::Certs::new("unix", "DNS:localhost,IP:127.0.0.1");
    let dir = tempfile::tempdir().unwrap();
    let (origin_url, cert, key) = (
        socket_url(&origin),
        certs.path("server.pem").display().to_string(),
        certs.path("server.key").display().to_string(),
    );
    let port = common::free_port();
    let (listen, dir_arg, socket) =
        (format!("127.0.0.1:{port}"), dir.path().display().to_string(), socket_in(dir.path(), port));
    let args = [
        "--listen",
        &listen,
        "--origin",
        &origin_url,
        "--unix-socket-dir",
        &dir_arg,
        "--admin-users",
        APP_USER,
        "--no-cache",
        "--pool-size",
        "2",
        "--tls-cert",
        &cert,
        "--tls-key",
        &key,
        "--tls-required",
    ];
    let mut process = start(&args, &socket).await;

    // Work on pgwarp's socket runs on the origin's socket: Postgres sees no client address.
    let client = unix_client(dir.path(), port, APP_DB, "on-socket").await.expect("a socket client needs no TLS");
    let row = client.query_one("SELECT inet_client_addr() IS NULL, current_user::text", &[]).await.unwrap();
    assert_eq!((row.get::<_, bool>(0), row.get::<_, String>(1)), (true, APP_USER.to_owned()));
    client.batch_execute("CREATE TABLE t (id int PRIMARY KEY); BEGIN; INSERT INTO t VALUES (1)").await.unwrap();
    client.batch_execute("COMMIT").await.unwrap();

    // libpq (psql) finds it the way it finds Postgres's own socket.
    let url = format!("postgresql://{APP_USER}:{APP_PASSWORD}@/{APP_DB}?host={}&port={port}", dir.path().display());
    let out = psql(&origin, vec![url, "-c".into(), "SELECT count(*) FROM t".into()]).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "1");

    // TLS is neither offered on the socket (as Postgres: 'N') nor required there; TCP still
    // requires it.
    let mut raw = tokio::net::UnixStream::connect(&socket).await.unwrap();
    raw.write_all(&[0, 0, 0, 8, 4, 210, 22, 47]).await.unwrap();
    let mut answer = [0u8; 1];
    raw.read_exact(&mut answer).await.unwrap();
    assert_eq!(answer[0], b'N');
    drop(raw);
    let refused = common::connect(&process.url(APP_USER, APP_PASSWORD, APP_DB)).await.expect_err("TCP needs TLS");
    assert_eq!(code(&refused), "28000");

    // The console says who came how.
    let admin = unix_client(dir.path(), port, "pgwarp", "admin").await.unwrap();
    let clients = show(&admin, "CLIENTS").await;
    let on_socket = row_where(&clients, "application_name", "on-socket");
    assert_eq!(
        (cell(on_socket, "addr"), cell(on_socket, "port"), cell(on_socket, "tls")),
        (Some("unix"), None, Some("f"))
    );
    let servers = show(&admin, "SERVERS").await;
    assert!(!servers.is_empty() && servers.iter().all(|s| cell(s, "transport") == Some("unix")), "{servers:?}");

    // A cancel request on pgwarp's socket reaches the query on the origin's.
    let sleeper = unix_client(dir.path(), port, APP_DB, "sleeper").await.unwrap();
    let token = sleeper.cancel_token();
    let started = std::time::Instant::now();
    let sleep = tokio::spawn(async move { sleeper.simple_query("SELECT pg_sleep(30)").await });
    eventually("the sleep runs on the origin", || {
        origin.sql("SELECT count(*) FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(30)'") == "1"
    })
    .await;
    token.cancel_query(tokio_postgres::NoTls).await.unwrap();
    let cancelled = sleep.await.unwrap().expect_err("the sleep was cancelled");
    assert_eq!(code(&cancelled), "57014");
    assert!(started.elapsed() < Duration::from_secs(20));

    // The origin's socket going away is an ordinary origin outage, named.
    origin.cluster.stop();
    let down = client.simple_query("SELECT 1").await.expect_err("the origin is down");
    assert_eq!(code(&down), "08006", "{down}");
    let socket_of_origin = origin.cluster.socket_path().display().to_string();
    eventually("the log names the origin's socket", || process.log().contains(&socket_of_origin)).await;
    origin.cluster.start_again();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while client.simple_query("SELECT 1").await.is_err() {
        assert!(std::time::Instant::now() < deadline, "work resumes when the origin is back");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Shutdown removes the socket.
    drop((client, admin));
    process.signal("TERM");
    assert!(exited(&mut process, Duration::from_secs(10)).await.is_some());
    assert!(!socket.exists(), "the socket file is gone");
}

#[tokio::test]
async fn a_new_pgwarp_takes_the_socket_over_and_the_old_one_leaves_it() {
    let origin = origin();
    let dir = tempfile::tempdir().unwrap();
    let port = common::free_port();
    let socket = socket_in(dir.path(), port);
    // A socket file left by a pgwarp that was killed: nobody listens on it.
    drop(std::os::unix::net::UnixListener::bind(&socket).unwrap());

    // libpq's other spelling of a socket directory: the host as a query parameter.
    let origin_url = format!(
        "postgres://{APP_USER}:{APP_PASSWORD}@/{APP_DB}?host={}&port={}",
        origin.cluster.socket_dir().display(),
        origin.cluster.port()
    );
    let (listen, dir_arg) = (format!("127.0.0.1:{port}"), dir.path().display().to_string());
    let args = [
        "--origin",
        &origin_url,
        "--listen",
        &listen,
        "--unix-socket-dir",
        &dir_arg,
        "--so-reuseport",
        "--admin-users",
        APP_USER,
        "--no-cache",
    ];
    let mut old = start(&args, &socket).await;
    let staying = unix_client(dir.path(), port, APP_DB, "staying").await.expect("the dead socket was replaced");
    staying.batch_execute("CREATE TABLE t (id int); BEGIN; INSERT INTO t VALUES (1)").await.unwrap();
    let old_admin = unix_client(dir.path(), port, "pgwarp", "old-admin").await.unwrap();

    let mut new = PgwarpProcess::start(&args);
    eventually("the new pgwarp listens", || new.log().contains("pgwarp accepting clients")).await;

    // From the takeover on, every new socket client is the new one's, before the old one even
    // begins to shut down.
    let mut arrivals = vec![unix_client(dir.path(), port, APP_DB, "arrival-early").await.unwrap()];
    let new_admin = unix_client(dir.path(), port, "pgwarp", "new-admin").await.unwrap();
    row_where(&show(&new_admin, "CLIENTS").await, "application_name", "arrival-early");
    old_admin.simple_query("SHUTDOWN WAIT_FOR_CLIENTS").await.unwrap();
    for i in 0..5 {
        let arrival = unix_client(dir.path(), port, APP_DB, &format!("arrival{i}")).await.unwrap();
        assert_eq!(first(&arrival.simple_query("SELECT 1").await.unwrap()), "1");
        arrivals.push(arrival);
    }
    let clients = show(&new_admin, "CLIENTS").await;
    for i in 0..5 {
        row_where(&clients, "application_name", &format!("arrival{i}"));
    }
    assert!(!clients.iter().any(|r| cell(r, "application_name") == Some("staying")));

    // The old one finishes with its client, exits, and leaves the new one's socket alone.
    staying.batch_execute("COMMIT").await.unwrap();
    drop((staying, old_admin));
    let status = exited(&mut old, Duration::from_secs(10)).await.unwrap_or_else(|| panic!("{}", old.log()));
    assert!(status.success(), "{status}");
    assert!(socket.exists(), "the old pgwarp removed the new one's socket");
    let late = unix_client(dir.path(), port, APP_DB, "late").await.expect("the socket still serves");
    assert_eq!(first(&late.simple_query("SELECT count(*) FROM t").await.unwrap()), "1");

    drop((late, arrivals, new_admin));
    new.signal("TERM");
    assert!(exited(&mut new, Duration::from_secs(10)).await.is_some());
    assert!(!socket.exists());
}
