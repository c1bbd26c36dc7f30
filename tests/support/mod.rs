//! Helpers for tests that drive pgwarp itself: an origin database with an application role, a
//! pgwarp server running in-process on a free port, and a raw wire-protocol client for the
//! messages drivers do not let a test send (garbage, unnamed statements across Syncs, ...).

#![allow(dead_code)]

pub mod certs;
pub mod console;

use std::time::Duration;

use bytes::{BufMut, BytesMut};
use pgwarp::config::Config;
use pgwarp::protocol::backend as be;
use pgwarp::protocol::build;
use pgwarp::protocol::error::ErrorFields;
use pgwarp::protocol::{Message, MessageReader};
use pgwarp::server::{Server, ShutdownHandle};
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::common::PgCluster;

pub const APP_USER: &str = "app";
pub const APP_PASSWORD: &str = "secret";
pub const APP_DB: &str = "app";

/// A real Postgres with an `app` role owning an `app` database.
pub struct Origin {
    pub cluster: PgCluster,
}

impl Origin {
    pub fn start() -> Origin {
        let cluster = PgCluster::start();
        cluster.create_user(APP_USER, APP_PASSWORD);
        cluster.create_database(APP_DB, APP_USER);
        Origin { cluster }
    }

    pub fn url(&self) -> String {
        self.cluster.url(APP_USER, APP_PASSWORD, APP_DB)
    }

    /// The same, with `ssl = on` serving the given certificate.
    pub fn start_with_ssl(certs: &certs::Certs) -> Origin {
        let cluster = PgCluster::start_with(crate::common::PgOptions {
            extra_conf: vec![
                "ssl = on".into(),
                format!("ssl_cert_file = '{}'", certs.path("server.pem").display()),
                format!("ssl_key_file = '{}'", certs.path("server.key").display()),
            ],
            ..crate::common::PgOptions::default()
        });
        cluster.create_user(APP_USER, APP_PASSWORD);
        cluster.create_database(APP_DB, APP_USER);
        Origin { cluster }
    }

    /// Runs SQL as the superuser in the app database.
    pub fn sql(&self, sql: &str) -> String {
        self.cluster.psql_db(APP_DB, sql)
    }
}

/// pgwarp running inside the test's runtime.
pub struct Pgwarp {
    pub port: u16,
    pub shutdown: ShutdownHandle,
    pub task: tokio::task::JoinHandle<()>,
}

impl Pgwarp {
    /// Starts pgwarp in front of `origin`, with `tweak` applied to the config.
    pub async fn start(origin: &Origin, tweak: impl FnOnce(&mut Config)) -> Pgwarp {
        let mut config = Config {
            listen: "127.0.0.1:0".into(),
            origin: Some(origin.url()),
            log_level: "warn".into(),
            ..Config::default()
        };
        // These suites write behind pgwarp's back (origin.sql), which the cache only notices
        // after max_age; tests/cache.rs turns it on.
        config.cache.enabled = false;
        tweak(&mut config);
        let server = Server::bind(config).await.expect("pgwarp starts");
        let port = server.local_addr().unwrap().port();
        let shutdown = server.shutdown_handle();
        let task = tokio::spawn(server.run());
        Pgwarp { port, shutdown, task }
    }

    pub fn url(&self) -> String {
        self.url_as(APP_USER, APP_PASSWORD)
    }

    pub fn url_as(&self, user: &str, password: &str) -> String {
        format!("postgres://{user}:{password}@127.0.0.1:{}/{APP_DB}", self.port)
    }

    pub async fn client(&self) -> tokio_postgres::Client {
        crate::common::connect(&self.url()).await.expect("connect through pgwarp")
    }

    pub async fn raw(&self) -> RawClient {
        RawClient::connect(self.port, APP_USER, APP_PASSWORD, APP_DB).await
    }
}

impl Drop for Pgwarp {
    fn drop(&mut self) {
        self.shutdown.shutdown(pgwarp::server::ShutdownMode::Drain);
    }
}

/// The first column of the first row of a simple query's answer ("NULL" for null, "" when no
/// row came back).
pub fn first(msgs: &[tokio_postgres::SimpleQueryMessage]) -> String {
    msgs.iter()
        .find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => Some(r.get(0).unwrap_or("NULL").to_owned()),
            _ => None,
        })
        .unwrap_or_default()
}

/// Runs `sql` 50 times, 20 ms apart: long enough for the cache's catalog to load (the first
/// cacheable read starts the load) and for the answer to be stored.
pub async fn warm(client: &tokio_postgres::Client, sql: &str) {
    for _ in 0..50 {
        client.simple_query(sql).await.unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// Waits up to `timeout` for the process to exit, letting this test's own tasks (its clients'
/// connections) run meanwhile; `None` if it is still running.
pub async fn exited(process: &mut crate::common::PgwarpProcess, timeout: Duration) -> Option<std::process::ExitStatus> {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if let Some(status) = process.wait_exit(Duration::ZERO) {
            return Some(status);
        }
        if std::time::Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Runs psql (-X -A -t plus `args`) on the blocking pool, so the in-process pgwarp keeps running.
pub async fn psql(origin: &Origin, args: Vec<String>) -> std::process::Output {
    let bin = origin.cluster.bin("psql");
    tokio::task::spawn_blocking(move || {
        std::process::Command::new(bin).args(["-X", "-A", "-t"]).args(args).output().expect("run psql")
    })
    .await
    .unwrap()
}

/// The SQLSTATE of a tokio-postgres error, or "" when it has none.
pub fn code(e: &tokio_postgres::Error) -> String {
    e.code().map(|c| c.code().to_owned()).unwrap_or_default()
}

/// A wire-protocol client that sends exactly what a test says.
pub struct RawClient {
    pub stream: TcpStream,
    reader: MessageReader,
}

impl RawClient {
    /// Connects without logging in.
    pub async fn open(port: u16) -> RawClient {
        let stream = TcpStream::connect(("127.0.0.1", port)).await.expect("tcp connect");
        RawClient { stream, reader: MessageReader::new(1 << 30) }
    }

    /// Connects and logs in with SCRAM (or md5/cleartext if asked), up to ReadyForQuery.
    pub async fn connect(port: u16, user: &str, password: &str, db: &str) -> RawClient {
        let mut c = RawClient::open(port).await;
        c.send(&build::startup(&[("user", user), ("database", db)])).await;
        c.login(user, password).await.expect("login");
        c
    }

    /// Answers authentication requests; returns the ErrorResponse if login fails.
    pub async fn login(&mut self, user: &str, password: &str) -> Result<(), ErrorFields> {
        let mut scram: Option<ScramSha256> = None;
        loop {
            let msg = self.recv().await;
            match msg.tag() {
                b'R' => match be::auth_request(msg.body()).unwrap() {
                    be::AuthRequest::Ok => {}
                    be::AuthRequest::Sasl { .. } => {
                        let s = ScramSha256::new(password.as_bytes(), ChannelBinding::unsupported());
                        self.send(&build::sasl_initial_response("SCRAM-SHA-256", s.message())).await;
                        scram = Some(s);
                    }
                    be::AuthRequest::SaslContinue { data } => {
                        let s = scram.as_mut().unwrap();
                        s.update(data).unwrap();
                        let reply = build::password(s.message());
                        self.send(&reply).await;
                    }
                    be::AuthRequest::SaslFinal { data } => scram.take().unwrap().finish(data).unwrap(),
                    be::AuthRequest::Md5 { salt } => {
                        let h = postgres_protocol::authentication::md5_hash(user.as_bytes(), password.as_bytes(), salt);
                        let mut data = h.into_bytes();
                        data.push(0);
                        self.send(&build::password(&data)).await;
                    }
                    other => panic!("unexpected auth request {other:?}"),
                },
                b'E' => return Err(ErrorFields::parse(msg.body()).unwrap()),
                b'Z' => return Ok(()),
                _ => {}
            }
        }
    }

    pub async fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.expect("send");
    }

    /// The next message; panics after 10 s or at end of stream.
    pub async fn recv(&mut self) -> Message {
        tokio::time::timeout(Duration::from_secs(10), self.reader.read(&mut self.stream))
            .await
            .expect("message within 10s")
            .expect("readable")
            .expect("not end of stream")
    }

    /// The next message, or None at end of stream.
    pub async fn recv_or_eof(&mut self) -> Option<Message> {
        tokio::time::timeout(Duration::from_secs(10), self.reader.read(&mut self.stream))
            .await
            .expect("message within 10s")
            .ok()
            .flatten()
    }

    /// Messages up to and including ReadyForQuery, as tags.
    pub async fn until_ready(&mut self) -> Vec<Message> {
        let mut out = Vec::new();
        loop {
            let m = self.recv().await;
            let done = m.tag() == b'Z';
            out.push(m);
            if done {
                return out;
            }
        }
    }
}

/// The tags of a message list as a string, e.g. "12DCZ".
pub fn tags(msgs: &[Message]) -> String {
    msgs.iter().map(|m| m.tag() as char).collect()
}

/// The text of the first column of every DataRow.
pub fn first_column(msgs: &[Message]) -> Vec<Option<String>> {
    msgs.iter().filter(|m| m.tag() == b'D').map(|m| be::data_row_text(m.body()).unwrap().remove(0)).collect()
}

/// The SQLSTATE of the first ErrorResponse in a message list.
pub fn error_code(msgs: &[Message]) -> Option<String> {
    msgs.iter().find(|m| m.tag() == b'E').map(|m| ErrorFields::parse(m.body()).unwrap().code)
}

// ---- frontend messages for raw tests ----

pub fn parse(name: &str, sql: &str, types: &[u32]) -> BytesMut {
    let mut b = BytesMut::new();
    build::parse_into(&mut b, name, sql, types);
    b
}

/// Bind with text parameters and text results.
pub fn bind(portal: &str, stmt: &str, params: &[&str]) -> BytesMut {
    let mut out = BytesMut::new();
    build::frame_into(&mut out, b'B', |b| {
        build::put_cstr(b, portal);
        build::put_cstr(b, stmt);
        b.put_i16(0);
        b.put_i16(params.len() as i16);
        for p in params {
            b.put_i32(p.len() as i32);
            b.put_slice(p.as_bytes());
        }
        b.put_i16(0);
    });
    out
}

pub fn describe(kind: u8, name: &str) -> BytesMut {
    let mut out = BytesMut::new();
    build::frame_into(&mut out, b'D', |b| {
        b.put_u8(kind);
        build::put_cstr(b, name);
    });
    out
}

pub fn close(kind: u8, name: &str) -> BytesMut {
    let mut out = BytesMut::new();
    build::frame_into(&mut out, b'C', |b| {
        b.put_u8(kind);
        build::put_cstr(b, name);
    });
    out
}

pub fn execute(portal: &str, max_rows: i32) -> BytesMut {
    let mut out = BytesMut::new();
    build::frame_into(&mut out, b'E', |b| {
        build::put_cstr(b, portal);
        b.put_i32(max_rows);
    });
    out
}

pub fn flush() -> BytesMut {
    let mut out = BytesMut::new();
    build::frame_into(&mut out, b'H', |_| {});
    out
}

pub fn sync() -> BytesMut {
    BytesMut::from(&build::sync()[..])
}

pub fn query(sql: &str) -> BytesMut {
    BytesMut::from(&build::query(sql)[..])
}

/// Concatenates messages into one write.
pub fn batch(parts: &[BytesMut]) -> Vec<u8> {
    parts.iter().flat_map(|p| p.iter().copied()).collect()
}

pub fn copy_data(data: &[u8]) -> BytesMut {
    let mut out = BytesMut::new();
    build::frame_into(&mut out, b'd', |b| b.put_slice(data));
    out
}

pub fn copy_done() -> BytesMut {
    let mut out = BytesMut::new();
    build::frame_into(&mut out, b'c', |_| {});
    out
}

pub fn copy_fail(reason: &str) -> BytesMut {
    let mut out = BytesMut::new();
    build::frame_into(&mut out, b'f', |b| build::put_cstr(b, reason));
    out
}

/// Waits up to 10 s for `check` to hold (a closed connection's backend takes a moment to
/// leave `pg_stat_activity`, a query a moment to start).
pub async fn eventually(why: &str, mut check: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !check() {
        assert!(std::time::Instant::now() < deadline, "{why}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
