//! `pgwarp tunnel` end to end, against a real PostgreSQL.
//!
//! Each test starts its own Postgres (with `log_connections` on, so the server's log shows every
//! TCP connection it received) and a `Tunnel` in-process on 127.0.0.1:0 in front of it. Clients
//! reach the tunnel the way pgwarp's origin side does, through `transport::websocket::connect`;
//! to run real Postgres sessions with tokio-postgres, a small local bridge accepts TCP connections
//! and carries each over its own WebSocket. The last test swaps that bridge for one written with
//! Python's `websockets` package, to show a standard WebSocket client interoperates.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use boring::asn1::Asn1Time;
use boring::bn::BigNum;
use boring::ec::{EcGroup, EcKey};
use boring::hash::MessageDigest;
use boring::nid::Nid;
use boring::pkey::{PKey, Private};
use boring::x509::extension::{BasicConstraints, ExtendedKeyUsage, KeyUsage, SubjectAlternativeName};
use boring::x509::{X509Builder, X509NameBuilder, X509};
use common::{PgCluster, PgOptions};
use futures_util::TryStreamExt;
use pgwarp::transport::websocket::{access_headers, connect, WsConfig, WsError};
use pgwarp::tunnel::{Tunnel, TunnelConfig};
use tokio::io::AsyncReadExt;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio::time::timeout;
use tokio_util::sync::CancellationToken;

const CLIENT_ID: &str = "pgwarp-test.access";
const CLIENT_SECRET: &str = "correct horse battery staple";
const DB_USER: &str = "tunnel_user";
const DB_PASSWORD: &str = "tunnel password";
const DB_NAME: &str = "tunnel_db";
const STEP: Duration = Duration::from_secs(30);

/// A Postgres that logs every connection it receives, with a SCRAM user and database.
fn start_cluster() -> PgCluster {
    let cluster = PgCluster::start_with(PgOptions {
        extra_conf: vec!["log_connections = on".to_string()],
        ..PgOptions::default()
    });
    cluster.create_user(DB_USER, DB_PASSWORD);
    cluster.create_database(DB_NAME, DB_USER);
    cluster
}

/// How many TCP connections the server has received so far, from its log.
fn connections_received(cluster: &PgCluster) -> usize {
    cluster.log().matches("connection received:").count()
}

/// A tunnel running in this process.
struct RunningTunnel {
    addr: SocketAddr,
    shutdown: CancellationToken,
    task: JoinHandle<()>,
}

impl RunningTunnel {
    async fn start(target: String, max_sessions: usize, tls: Option<(PathBuf, PathBuf)>) -> RunningTunnel {
        // The tunnel's log, shown with a failing test's output.
        let _ = tracing_subscriber::fmt().with_test_writer().with_env_filter("pgwarp=debug").try_init();
        let config = TunnelConfig {
            listen: "127.0.0.1:0".parse().expect("listen address"),
            target,
            client_id: CLIENT_ID.to_string(),
            client_secret: CLIENT_SECRET.to_string(),
            tls,
            max_sessions,
            ws: WsConfig::default(),
            workers: 2,
            busy_poll: None,
        };
        let tunnel = Tunnel::bind(config).await.expect("bind the tunnel");
        let addr = tunnel.local_addr();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(tunnel.run(shutdown.clone()));
        RunningTunnel { addr, shutdown, task }
    }

    fn ws_url(&self) -> String {
        format!("ws://{}/", self.addr)
    }

    /// Cancels the tunnel and checks that `run` returns, sessions and all.
    async fn stop(self) {
        self.shutdown.cancel();
        timeout(STEP, self.task).await.expect("the tunnel stops after shutdown").expect("tunnel task");
    }
}

/// Listens on a local port and carries each accepted connection over its own WebSocket to `url`:
/// what pgwarp's origin side does, in a form tokio-postgres can connect to.
async fn start_bridge(url: String, headers: Vec<(String, String)>, config: WsConfig) -> (u16, JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind the bridge");
    let port = listener.local_addr().expect("bridge address").port();
    let task = tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            let (url, headers, config) = (url.clone(), headers.clone(), config.clone());
            tokio::spawn(async move {
                match connect(&url, &headers, config).await {
                    Ok(mut ws) => {
                        let _ = tokio::io::copy_bidirectional(&mut tcp, &mut ws).await;
                    }
                    Err(err) => eprintln!("bridge: cannot open the WebSocket: {err}"),
                }
            });
        }
    });
    (port, task)
}

/// A TCP target on this machine.
fn tcp(port: u16) -> String {
    format!("127.0.0.1:{port}")
}

fn db_url(port: u16) -> String {
    common::postgres_url(port, DB_USER, DB_PASSWORD, DB_NAME)
}

/// Deterministic bytes covering every value.
fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 31 + i / 251) as u8).collect()
}

/// SELECT 1, a 1 MB bytea round trip, and a COPY out, on one session through `port`.
async fn run_postgres_session(port: u16) {
    let client = timeout(STEP, common::connect(&db_url(port))).await.expect("connect in time").expect("connect");

    let one: i32 = client.query_one("SELECT 1", &[]).await.expect("SELECT 1").get(0);
    assert_eq!(one, 1);

    let data = pattern(1 << 20);
    let row = client.query_one("SELECT $1::bytea, length($1::bytea)", &[&data]).await.expect("bytea round trip");
    let echoed: Vec<u8> = row.get(0);
    let length: i32 = row.get(1);
    assert_eq!(length, 1 << 20);
    assert!(echoed == data, "the bytea came back different");

    let copy = client
        .copy_out("COPY (SELECT g, repeat('x', 50) FROM generate_series(1, 20000) g) TO STDOUT")
        .await
        .expect("COPY out");
    let chunks: Vec<bytes::Bytes> = copy.try_collect().await.expect("COPY data");
    let text = String::from_utf8(chunks.concat()).expect("COPY text");
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 20000);
    assert_eq!(lines[0], format!("1\t{}", "x".repeat(50)));
    assert_eq!(lines[19999], format!("20000\t{}", "x".repeat(50)));

    let user: String = client.query_one("SELECT current_user::text", &[]).await.expect("current_user").get(0);
    assert_eq!(user, DB_USER);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_session_runs_through_the_tunnel() {
    let cluster = start_cluster();
    let tunnel = RunningTunnel::start(tcp(cluster.port()), 16, None).await;
    let (port, bridge) =
        start_bridge(tunnel.ws_url(), access_headers(CLIENT_ID, CLIENT_SECRET), WsConfig::default()).await;

    run_postgres_session(port).await;
    // A second session after the first one ended.
    run_postgres_session(port).await;

    bridge.abort();
    tunnel.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unix_socket_target_carries_a_postgres_session() {
    let cluster = start_cluster();
    let socket = cluster.socket_path();
    let tunnel = RunningTunnel::start(socket.display().to_string(), 16, None).await;
    let (port, bridge) =
        start_bridge(tunnel.ws_url(), access_headers(CLIENT_ID, CLIENT_SECRET), WsConfig::default()).await;

    let tcp_before = cluster.log().matches("connection received: host=127.0.0.1").count();
    run_postgres_session(port).await;
    let log = cluster.log();
    assert!(log.contains("connection received: host=[local]"), "no connection over the socket:\n{log}");
    assert_eq!(log.matches("connection received: host=127.0.0.1").count(), tcp_before, "the tunnel used TCP");

    bridge.abort();
    tunnel.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_or_missing_token_gets_403_and_never_reaches_the_database() {
    let cluster = start_cluster();
    let tunnel = RunningTunnel::start(tcp(cluster.port()), 16, None).await;
    let before = connections_received(&cluster);

    let attempts: Vec<(&str, Vec<(String, String)>)> = vec![
        ("wrong secret", access_headers(CLIENT_ID, "correct horse battery stapler")),
        ("wrong id", access_headers("someone-else.access", CLIENT_SECRET)),
        ("no headers", Vec::new()),
        ("id only", vec![("CF-Access-Client-Id".to_string(), CLIENT_ID.to_string())]),
        ("secret only", vec![("CF-Access-Client-Secret".to_string(), CLIENT_SECRET.to_string())]),
    ];
    for (what, headers) in attempts {
        let result = timeout(STEP, connect(&tunnel.ws_url(), &headers, WsConfig::default())).await.expect("in time");
        let err = result.err().unwrap_or_else(|| panic!("{what}: the upgrade was accepted"));
        assert!(err.to_string().contains("403"), "{what}: {err}");
        match &err {
            WsError::Refused { status, body } => {
                assert_eq!(status.as_u16(), 403, "{what}");
                assert!(body.contains("forbidden"), "{what}: body {body:?}");
                assert!(!body.contains(CLIENT_SECRET), "{what}: the body shows the secret");
            }
            other => panic!("{what}: expected a refusal, got {other}"),
        }
    }

    // Give a connection that slipped through time to show up in the log.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(connections_received(&cluster), before, "a refused caller reached Postgres:\n{}", cluster.log());

    // The same count does move for an admitted caller, so the check above can see one.
    let (port, bridge) =
        start_bridge(tunnel.ws_url(), access_headers(CLIENT_ID, CLIENT_SECRET), WsConfig::default()).await;
    let client = common::connect(&db_url(port)).await.expect("connect with the right token");
    client.simple_query("SELECT 1").await.expect("query");
    assert!(connections_received(&cluster) > before, "the admitted session is not in the log");

    drop(client);
    bridge.abort();
    tunnel.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_over_the_limit_get_503_until_one_ends() {
    let cluster = start_cluster();
    let tunnel = RunningTunnel::start(tcp(cluster.port()), 1, None).await;
    let headers = access_headers(CLIENT_ID, CLIENT_SECRET);

    let first = connect(&tunnel.ws_url(), &headers, WsConfig::default()).await.expect("first session");
    let err = connect(&tunnel.ws_url(), &headers, WsConfig::default()).await.err().expect("second must be refused");
    assert!(err.to_string().contains("503"), "{err}");
    assert!(matches!(&err, WsError::Refused { status, .. } if status.as_u16() == 503), "{err}");

    // Still a 403 for a wrong token when full: the token is checked first.
    let wrong = access_headers(CLIENT_ID, "nope");
    let err = connect(&tunnel.ws_url(), &wrong, WsConfig::default()).await.err().expect("wrong token refused");
    assert!(err.to_string().contains("403"), "{err}");

    // Once the first session ends, its slot is free again.
    drop(first);
    let deadline = Instant::now() + STEP;
    let second = loop {
        match connect(&tunnel.ws_url(), &headers, WsConfig::default()).await {
            Ok(ws) => break ws,
            Err(err) if Instant::now() < deadline && err.to_string().contains("503") => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(err) => panic!("the slot was not freed: {err}"),
        }
    };
    drop(second);
    tunnel.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_database_closes_the_websocket() {
    // A port nothing listens on: bind one, note it, and close it.
    let closed_port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.local_addr().expect("address").port()
    };
    let tunnel = RunningTunnel::start(tcp(closed_port), 4, None).await;
    let mut ws = connect(&tunnel.ws_url(), &access_headers(CLIENT_ID, CLIENT_SECRET), WsConfig::default())
        .await
        .expect("the upgrade is admitted");
    let mut buf = Vec::new();
    let n = timeout(STEP, ws.read_to_end(&mut buf)).await.expect("closed in time").expect("read");
    assert_eq!(n, 0, "no bytes expected");
    tunnel.stop().await;
}

/// A CA, and a certificate it signed for "localhost" and 127.0.0.1, written as PEM files.
struct TestPki {
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
}

fn ec_key() -> PKey<Private> {
    let group = EcGroup::from_curve_name(Nid::X9_62_PRIME256V1).expect("P-256");
    PKey::from_ec_key(EcKey::generate(&group).expect("EC key")).expect("PKey")
}

fn certificate(common_name: &str, key: &PKey<Private>, issuer: Option<(&X509, &PKey<Private>)>, serial: u32) -> X509 {
    let mut name = X509NameBuilder::new().expect("name");
    name.append_entry_by_text("CN", common_name).expect("CN");
    let name = name.build();
    let mut builder = X509Builder::new().expect("builder");
    builder.set_version(2).expect("version");
    builder
        .set_serial_number(&BigNum::from_u32(serial).expect("bn").to_asn1_integer().expect("serial"))
        .expect("serial");
    builder.set_subject_name(&name).expect("subject");
    builder.set_pubkey(key).expect("pubkey");
    builder.set_not_before(&Asn1Time::days_from_now(0).expect("time")).expect("not before");
    builder.set_not_after(&Asn1Time::days_from_now(7).expect("time")).expect("not after");
    let signer = match issuer {
        None => {
            builder.set_issuer_name(&name).expect("issuer");
            builder.append_extension(BasicConstraints::new().critical().ca().build().expect("bc")).expect("bc");
            builder
                .append_extension(KeyUsage::new().critical().key_cert_sign().crl_sign().build().expect("ku"))
                .expect("ku");
            key
        }
        Some((ca, ca_key)) => {
            builder.set_issuer_name(ca.subject_name()).expect("issuer");
            builder.append_extension(BasicConstraints::new().build().expect("bc")).expect("bc");
            builder.append_extension(ExtendedKeyUsage::new().server_auth().build().expect("eku")).expect("eku");
            let san = SubjectAlternativeName::new()
                .dns("localhost")
                .ip("127.0.0.1")
                .build(&builder.x509v3_context(Some(ca), None))
                .expect("san");
            builder.append_extension(san).expect("san");
            ca_key
        }
    };
    builder.sign(signer, MessageDigest::sha256()).expect("sign");
    builder.build()
}

fn make_pki(dir: &Path) -> TestPki {
    let ca_key = ec_key();
    let ca = certificate("pgwarp test CA", &ca_key, None, 1);
    let key = ec_key();
    let cert = certificate("localhost", &key, Some((&ca, &ca_key)), 2);
    let pki = TestPki { ca: dir.join("ca.pem"), cert: dir.join("server.pem"), key: dir.join("server.key") };
    std::fs::write(&pki.ca, ca.to_pem().expect("pem")).expect("write CA");
    std::fs::write(&pki.cert, cert.to_pem().expect("pem")).expect("write cert");
    std::fs::write(&pki.key, key.private_key_to_pem_pkcs8().expect("pem")).expect("write key");
    pki
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wss_with_a_private_ca_carries_a_postgres_session() {
    let cluster = start_cluster();
    let dir = tempfile::tempdir().expect("temp dir");
    let pki = make_pki(dir.path());
    let tunnel = RunningTunnel::start(tcp(cluster.port()), 16, Some((pki.cert.clone(), pki.key.clone()))).await;
    let port = tunnel.addr.port();
    let trusting = WsConfig { ca_file: Some(pki.ca.clone()), ..WsConfig::default() };
    let headers = access_headers(CLIENT_ID, CLIENT_SECRET);

    // By name and by address: the certificate names both.
    for host in ["localhost", "127.0.0.1"] {
        let (bridge_port, bridge) =
            start_bridge(format!("wss://{host}:{port}/"), headers.clone(), trusting.clone()).await;
        run_postgres_session(bridge_port).await;
        bridge.abort();
    }

    // The system roots do not know the private CA.
    let err = connect(&format!("wss://localhost:{port}/"), &headers, WsConfig::default())
        .await
        .err()
        .expect("an unknown CA must fail");
    assert!(matches!(err, WsError::TlsHandshake { .. }), "{err}");

    // A CA file without the right CA fails too.
    let other_dir = tempfile::tempdir().expect("temp dir");
    let other = make_pki(other_dir.path());
    let config = WsConfig { ca_file: Some(other.ca), ..WsConfig::default() };
    let err = connect(&format!("wss://localhost:{port}/"), &headers, config).await.err().expect("wrong CA must fail");
    assert!(matches!(err, WsError::TlsHandshake { .. }), "{err}");

    // The token is still required over TLS.
    let err = connect(&format!("wss://localhost:{port}/"), &access_headers(CLIENT_ID, "nope"), trusting.clone())
        .await
        .err()
        .expect("wrong token refused");
    assert!(err.to_string().contains("403"), "{err}");

    tunnel.stop().await;
}

/// A TCP-to-WebSocket bridge written with Python's `websockets` package. Modes:
/// `bridge` prints its port and serves until killed; `probe` opens one WebSocket and prints
/// `open` or `status <HTTP status>`.
const PYTHON_BRIDGE: &str = r#"
import asyncio
import sys

from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

url, client_id, client_secret, mode = sys.argv[1:5]
headers = {"CF-Access-Client-Id": client_id, "CF-Access-Client-Secret": client_secret}


async def tcp_to_ws(reader, ws):
    while data := await reader.read(65536):
        await ws.send(data)
    await ws.close()


async def ws_to_tcp(ws, writer):
    try:
        async for message in ws:
            if isinstance(message, str):
                raise RuntimeError("text frame from the tunnel")
            writer.write(message)
            await writer.drain()
    except ConnectionClosed:
        pass
    finally:
        writer.close()


async def handle(reader, writer):
    async with connect(url, additional_headers=headers, max_size=None) as ws:
        await asyncio.gather(tcp_to_ws(reader, ws), ws_to_tcp(ws, writer))


async def probe():
    try:
        async with connect(url, additional_headers=headers):
            print("open", flush=True)
    except InvalidStatus as err:
        print(f"status {err.response.status_code}", flush=True)


async def main():
    if mode == "probe":
        await probe()
        return
    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    print(server.sockets[0].getsockname()[1], flush=True)
    await server.serve_forever()


asyncio.run(main())
"#;

/// True when python3 can import the `websockets` asyncio client. Without it the interop test is
/// skipped locally and fails in CI.
fn python_websockets_available() -> bool {
    Command::new("python3")
        .args(["-c", "import websockets.asyncio.client"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|status| status.success())
        .unwrap_or(false)
}

fn python_bridge(url: &str, secret: &str, mode: &str) -> Command {
    let mut command = Command::new("python3");
    command.args(["-c", PYTHON_BRIDGE, url, CLIENT_ID, secret, mode]).stdin(Stdio::null()).stderr(Stdio::inherit());
    command
}

/// The Python bridge process; killed on drop.
struct PythonBridge(Child);

impl Drop for PythonBridge {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_websockets_client_interoperates() {
    if !python_websockets_available() {
        if std::env::var_os("CI").is_some() {
            panic!("python3 cannot import websockets (pip install websockets==15.0.1); CI must have it");
        }
        eprintln!("SKIPPED python_websockets_client_interoperates: python3 cannot import websockets");
        return;
    }
    let cluster = start_cluster();
    let tunnel = RunningTunnel::start(tcp(cluster.port()), 16, None).await;
    let url = tunnel.ws_url();

    // Refusals are well-formed HTTP answers to a standard client.
    for (secret, expected) in [("nope", "status 403"), (CLIENT_SECRET, "open")] {
        let command = python_bridge(&url, secret, "probe");
        let output = tokio::task::spawn_blocking(move || {
            let mut command = command;
            command.output()
        })
        .await
        .expect("join")
        .expect("run python3");
        assert!(output.status.success(), "python probe failed: {output:?}");
        assert_eq!(String::from_utf8_lossy(&output.stdout).trim(), expected);
    }

    let mut command = python_bridge(&url, CLIENT_SECRET, "bridge");
    let mut bridge = PythonBridge(command.stdout(Stdio::piped()).spawn().expect("start the python bridge"));
    let stdout = bridge.0.stdout.take().expect("bridge stdout");
    let first_line = tokio::task::spawn_blocking(move || {
        use std::io::BufRead;
        let mut line = String::new();
        std::io::BufReader::new(stdout).read_line(&mut line).map(|_| line)
    });
    let line = timeout(STEP, first_line).await.expect("bridge port in time").expect("join").expect("read port");
    let port: u16 = line.trim().parse().unwrap_or_else(|_| panic!("bridge printed {line:?}, not a port"));

    run_postgres_session(port).await;

    drop(bridge);
    tunnel.stop().await;
}
