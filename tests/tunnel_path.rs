//! The whole tunnel path with real parts: client -> pgwarp -> WebSocket -> `pgwarp tunnel` ->
//! Postgres, over ws:// and wss://, with Postgres TLS inside the tunnel, pgwarp's origin URL
//! naming a dead port so that only the tunnel reaches the database; both binaries with the
//! service token from the environment, one WebSocket per origin connection; a wrong service token;
//! pings that keep connections through a proxy that closes idle ones; and pgwarp's tunnel
//! client against websockify, a WebSocket-to-TCP bridge nobody here wrote.

mod common;
mod support;

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use common::PgwarpProcess;
use support::certs::Certs;
use support::*;

const ID: &str = "tunnel-id";
const SECRET: &str = "tunnel-secret-value";

/// `pgwarp tunnel` as the built binary, in front of `target`.
fn start_tunnel(target_port: u16, tls: Option<&Certs>) -> PgwarpProcess {
    let target = format!("127.0.0.1:{target_port}");
    let mut args = vec!["tunnel", "--target", &target, "--client-id", ID, "--client-secret", SECRET];
    let (cert, key);
    if let Some(c) = tls {
        cert = c.path("server.pem").display().to_string();
        key = c.path("server.key").display().to_string();
        args.extend(["--tls-cert", &cert, "--tls-key", &key]);
    }
    PgwarpProcess::start(&args)
}

/// pgwarp reaching the database only through the WebSocket at `url`: its origin URL names a
/// port where nothing listens, so a query that works went through the tunnel.
async fn pgwarp_through(origin: &Origin, url: String, tweak: impl FnOnce(&mut pgwarp::config::Config)) -> Pgwarp {
    Pgwarp::start(origin, |c| {
        c.origin = Some(common::postgres_url(common::free_port(), APP_USER, APP_PASSWORD, APP_DB));
        c.tunnel_url = Some(url);
        c.tunnel_client_id = Some(ID.into());
        c.tunnel_client_secret = Some(SECRET.into());
        tweak(c);
    })
    .await
}

/// Postgres with TLS, `pgwarp tunnel` over wss:// in front of it, and pgwarp through the tunnel
/// with Postgres TLS (verify-full) inside it, with `tweak` applied to pgwarp's config.
async fn tls_inside_wss(tweak: impl FnOnce(&mut pgwarp::config::Config)) -> (Certs, Origin, PgwarpProcess, Pgwarp) {
    let certs = Certs::new("tunnel", "DNS:localhost,IP:127.0.0.1");
    let origin = Origin::start_with_ssl(&certs);
    let tunnel = start_tunnel(origin.cluster.port(), Some(&certs));
    // Only the tunnel reaches the database: nothing listens on the URL's port.
    let url = format!(
        "postgres://{APP_USER}:{APP_PASSWORD}@localhost:{}/{APP_DB}?sslmode=verify-full&sslrootcert={}",
        common::free_port(),
        certs.path("ca.pem").display()
    );
    let ca = certs.path("ca.pem");
    let pgwarp = pgwarp_through(&origin, format!("wss://localhost:{}/", tunnel.port()), move |c| {
        c.origin = Some(url);
        c.tunnel_ca_file = Some(ca);
        tweak(c);
    })
    .await;
    (certs, origin, tunnel, pgwarp)
}

async fn exercise(pgwarp: &Pgwarp) {
    let client = pgwarp.client().await;
    assert_eq!(client.query_one("SELECT 1 + 1", &[]).await.unwrap().get::<_, i32>(0), 2);
    let blob = vec![7u8; 1 << 20];
    let back: Vec<u8> = client.query_one("SELECT $1::bytea", &[&blob]).await.unwrap().get(0);
    assert_eq!(back, blob);
    let rows = client.query("SELECT g FROM generate_series(1, 20000) g", &[]).await.unwrap();
    assert_eq!(rows.len(), 20000);
}

#[tokio::test]
async fn through_pgwarp_tunnel_over_ws() {
    let origin = Origin::start();
    let tunnel = start_tunnel(origin.cluster.port(), None);
    let pgwarp = pgwarp_through(&origin, format!("ws://127.0.0.1:{}/", tunnel.port()), |_| {}).await;
    exercise(&pgwarp).await;
}

#[tokio::test]
async fn through_pgwarp_tunnel_over_wss_with_postgres_tls_inside() {
    let (_certs, _origin, _tunnel, pgwarp) = tls_inside_wss(|_| {}).await;
    exercise(&pgwarp).await;
    let client = pgwarp.client().await;
    let ssl: bool =
        client.query_one("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()", &[]).await.unwrap().get(0);
    assert!(ssl, "Postgres TLS must run inside the tunnel");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_connection_of_tls_inside_wss_moves_between_workers_as_their_clients_take_turns() {
    // One connection, two workers: each turn of a client on the other worker moves the socket
    // under both TLS layers and the WebSocket to that worker's reactor.
    let (_certs, _origin, _tunnel, pgwarp) = tls_inside_wss(|c| {
        c.workers = 2;
        c.pool_size = 1;
    })
    .await;
    let mut clients = Vec::new();
    for i in 0..4i32 {
        let client = pgwarp.client().await;
        clients.push(tokio::spawn(async move {
            let mut pids = std::collections::BTreeSet::new();
            for j in 0..40i32 {
                let row =
                    client.query_one("SELECT $1::int * 1000 + $2::int, pg_backend_pid()", &[&i, &j]).await.unwrap();
                assert_eq!(row.get::<_, i32>(0), i * 1000 + j);
                pids.insert(row.get::<_, i32>(1));
            }
            pids
        }));
    }
    let mut pids = std::collections::BTreeSet::new();
    for c in clients {
        pids.extend(c.await.unwrap());
    }
    assert_eq!(pids.len(), 1, "every client used the one connection: {pids:?}");
}

/// Both binaries as an operator runs them, each taking the service token from the environment:
/// every origin connection is a WebSocket of its own (the tunnel logs one session for each
/// connection the database saw), and nothing reaches the database but through the tunnel.
#[tokio::test]
async fn the_binaries_take_the_token_from_the_environment_and_open_a_websocket_per_origin_connection() {
    let origin = Origin::start();
    origin.cluster.psql("ALTER SYSTEM SET log_connections = on; SELECT pg_reload_conf()");
    let env = [("PGWARP_TUNNEL_CLIENT_ID", ID), ("PGWARP_TUNNEL_CLIENT_SECRET", SECRET)];
    let target = format!("127.0.0.1:{}", origin.cluster.port());
    let tunnel = PgwarpProcess::start_with_env(&["tunnel", "--target", &target], &env);
    let tunnel_url = format!("ws://127.0.0.1:{}/", tunnel.port());
    let dead_origin = common::postgres_url(common::free_port(), APP_USER, APP_PASSWORD, APP_DB);
    let args = ["--origin", &dead_origin, "--tunnel-url", &tunnel_url, "--pool-size", "3", "--no-cache"];
    let before = origin.cluster.log().matches("connection authorized: user=app").count();
    let mut pgwarp = PgwarpProcess::start_with_env(&args, &env);

    // Three clients in transactions at once hold three origin connections.
    let url = pgwarp.url(APP_USER, APP_PASSWORD, APP_DB);
    let mut clients = Vec::new();
    let mut backends = std::collections::BTreeSet::new();
    for _ in 0..3 {
        let client = common::connect(&url).await.unwrap();
        client.batch_execute("BEGIN").await.unwrap();
        backends.insert(client.query_one("SELECT pg_backend_pid()", &[]).await.unwrap().get::<_, i32>(0));
        clients.push(client);
    }
    assert_eq!(backends.len(), 3, "three origin connections");
    for client in &clients {
        client.batch_execute("COMMIT").await.unwrap();
    }
    drop(clients);

    // Stopping pgwarp closes its origin connections, and the tunnel logs each session's end.
    pgwarp.signal("TERM");
    assert!(exited(&mut pgwarp, Duration::from_secs(10)).await.is_some(), "pgwarp stops; log:\n{}", pgwarp.log());
    let opened = origin.cluster.log().matches("connection authorized: user=app").count() - before;
    assert!(opened >= 3, "the database saw {opened} logins");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let ended = tunnel.log().matches("tunnel session ended").count();
        if ended == opened {
            break;
        }
        assert!(ended < opened, "{ended} tunnel sessions for {opened} origin connections:\n{}", tunnel.log());
        assert!(std::time::Instant::now() < deadline, "{ended} of {opened} sessions ended:\n{}", tunnel.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_wrong_service_token_never_reaches_the_database() {
    let origin = Origin::start();
    let tunnel = start_tunnel(origin.cluster.port(), None);
    let pgwarp = pgwarp_through(&origin, format!("ws://127.0.0.1:{}/", tunnel.port()), |c| {
        c.tunnel_client_secret = Some("wrong".into());
    })
    .await;
    let err = common::connect(&pgwarp.url()).await.unwrap_err();
    assert_eq!(code(&err), "08006", "{err:?}");
    // The tunnel logs the refusal after answering it: give a loaded machine a moment.
    let refused = || tunnel.log().contains("403") || tunnel.log().to_lowercase().contains("refused");
    for _ in 0..50 {
        if refused() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(refused(), "{}", tunnel.log());
    let seen = origin.sql("SELECT count(*) FROM pg_stat_activity WHERE usename = 'app'");
    assert_eq!(seen, "0");
}

/// websockify (PyPI): a generic WebSocket-to-TCP bridge in front of Postgres.
struct Websockify(Child);

impl Drop for Websockify {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A TCP relay to `target` that closes a connection which carried nothing either way for
/// `limit`, as a load balancer in front of a tunnel does (60 seconds is a common default).
async fn idle_closing_proxy(target: u16, limit: Duration) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((inbound, _)) = listener.accept().await {
            tokio::spawn(async move {
                let Ok(outbound) = TcpStream::connect(("127.0.0.1", target)).await else { return };
                let (mut in_read, mut in_write) = inbound.into_split();
                let (mut out_read, mut out_write) = outbound.into_split();
                let (mut up, mut down) = (vec![0u8; 16 << 10], vec![0u8; 16 << 10]);
                // Returning drops both connections: each side sees the other close.
                loop {
                    tokio::select! {
                        n = in_read.read(&mut up) => match n {
                            Ok(n @ 1..) => if out_write.write_all(&up[..n]).await.is_err() { return },
                            _ => return,
                        },
                        n = out_read.read(&mut down) => match n {
                            Ok(n @ 1..) => if in_write.write_all(&down[..n]).await.is_err() { return },
                            _ => return,
                        },
                        () = tokio::time::sleep(limit) => return,
                    }
                }
            });
        }
    });
    port
}

#[tokio::test]
async fn pings_keep_idle_and_pinned_tunnel_connections_open_through_a_proxy_that_closes_quiet_ones() {
    let origin = Origin::start();
    let tunnel = start_tunnel(origin.cluster.port(), None);
    let proxy = idle_closing_proxy(tunnel.port(), Duration::from_secs(4)).await;
    let quiet = Duration::from_secs(5);
    for (ping, kept) in [(Duration::from_secs(1), true), (Duration::ZERO, false)] {
        let pgwarp = pgwarp_through(&origin, format!("ws://127.0.0.1:{proxy}/"), |c| {
            c.pool_size = 1;
            c.tunnel_ping_interval = ping;
            // The pool checks idle connections every idle_timeout / 4 (here 2s), and an idle
            // connection pings at the first check a second after it last sent: within 3s.
            c.idle_timeout = Duration::from_secs(8);
        })
        .await;
        let client = pgwarp.client().await;
        let pid = || async { first(&client.simple_query("SELECT pg_backend_pid()").await.unwrap()) };

        // Idle in the pool longer than the proxy allows.
        let before = pid().await;
        tokio::time::sleep(quiet).await;
        let after = pid().await;
        assert_eq!(before == after, kept, "pings every {ping:?}: the pooled connection was kept: {}", before == after);

        // Pinned under a transaction while the client thinks.
        client.batch_execute("BEGIN").await.unwrap();
        tokio::time::sleep(quiet).await;
        let outcome = client.simple_query("SELECT 1").await;
        if kept {
            outcome.expect("the transaction's connection is still there");
            client.batch_execute("COMMIT").await.unwrap();
        } else {
            let err = outcome.expect_err("the proxy closed the transaction's connection");
            assert!(err.code().is_none_or(|c| c.code() == "08006"), "{err}");
        }
    }
}

fn websockify_available() -> bool {
    Command::new("websockify").arg("--help").stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok()
}

#[tokio::test]
async fn pgwarp_tunnel_client_works_against_websockify() {
    if !websockify_available() {
        assert!(std::env::var_os("CI").is_none(), "CI must install websockify (pip install websockify)");
        eprintln!("skipping: websockify is not installed (pip install websockify)");
        return;
    }
    let origin = Origin::start();
    let port = common::free_port();
    let bridge = Websockify(
        Command::new("websockify")
            .args([format!("127.0.0.1:{port}"), format!("127.0.0.1:{}", origin.cluster.port())])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    for _ in 0..100 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let pgwarp = pgwarp_through(&origin, format!("ws://127.0.0.1:{port}/"), |_| {}).await;
    exercise(&pgwarp).await;
    drop(bridge);
}
