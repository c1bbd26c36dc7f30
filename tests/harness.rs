//! Tests of the test harness itself (tests/common): the clusters it starts must be real,
//! isolated PostgreSQL servers with the authentication each test asks for, and must survive
//! restarts on the same port. Every other integration test relies on these properties.

mod common;

use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::time::Duration;

use common::{connect, PgCluster, PgOptions};
use tokio_postgres::error::SqlState;
use tokio_postgres::Client;

async fn select_one(client: &Client) -> i32 {
    client.query_one("SELECT 1", &[]).await.unwrap().get(0)
}

async fn current_user(client: &Client) -> String {
    client.query_one("SELECT current_user::text", &[]).await.unwrap().get(0)
}

fn accepts_tcp(port: u16) -> bool {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_ok()
}

#[tokio::test]
async fn cluster_accepts_scram_logins() {
    let pg = PgCluster::start();
    let superuser = connect(&pg.superuser_url("postgres")).await.unwrap();
    assert_eq!(select_one(&superuser).await, 1);
    assert_eq!(pg.psql("SHOW password_encryption"), "scram-sha-256");

    pg.create_user("alice", "s3cret with spaces & symbols");
    let stored = pg.psql("SELECT rolpassword FROM pg_authid WHERE rolname = 'alice'");
    assert!(stored.starts_with("SCRAM-SHA-256$"), "stored as {stored}");
    let alice = connect(&pg.url("alice", "s3cret with spaces & symbols", "postgres")).await.unwrap();
    assert_eq!(current_user(&alice).await, "alice");
}

#[tokio::test]
async fn scram_cluster_rejects_wrong_and_md5_stored_passwords() {
    let pg = PgCluster::start();
    pg.create_user("alice", "right");
    let err = connect(&pg.url("alice", "wrong", "postgres")).await.expect_err("wrong password must be refused");
    assert_eq!(err.code(), Some(&SqlState::INVALID_PASSWORD), "{err}");

    // An md5 hash cannot answer a SCRAM challenge.
    pg.create_md5_user("legacy", "right");
    let err = connect(&pg.url("legacy", "right", "postgres"))
        .await
        .expect_err("md5-stored password under scram-sha-256 hba must be refused");
    assert_eq!(err.code(), Some(&SqlState::INVALID_PASSWORD), "{err}");
}

#[tokio::test]
async fn md5_cluster_accepts_md5_stored_passwords() {
    let pg = PgCluster::start_with(PgOptions { hba_method: "md5", ..Default::default() });
    pg.create_md5_user("legacy", "md5pass");
    let stored = pg.psql("SELECT rolpassword FROM pg_authid WHERE rolname = 'legacy'");
    assert!(stored.starts_with("md5"), "stored as {stored}");
    let legacy = connect(&pg.url("legacy", "md5pass", "postgres")).await.unwrap();
    assert_eq!(current_user(&legacy).await, "legacy");

    // SCRAM-stored passwords still work under md5 (the server switches to SCRAM).
    let superuser = connect(&pg.superuser_url("postgres")).await.unwrap();
    assert_eq!(select_one(&superuser).await, 1);
}

#[tokio::test]
async fn hba_method_and_extra_conf_are_applied() {
    let pg = PgCluster::start_with(PgOptions {
        hba_method: "trust",
        extra_conf: vec!["work_mem = '7MB'".to_string()],
        ..Default::default()
    });
    assert_eq!(pg.psql("SHOW work_mem"), "7MB");
    assert_eq!(pg.psql("SELECT auth_method FROM pg_hba_file_rules WHERE type = 'host'"), "trust");
    // trust ignores the password entirely.
    let client = connect(&pg.url("postgres", "not-the-password", "postgres")).await.unwrap();
    assert_eq!(select_one(&client).await, 1);

    let cleartext = PgCluster::start_with(PgOptions { hba_method: "password", ..Default::default() });
    cleartext.create_md5_user("legacy", "pw");
    let legacy = connect(&cleartext.url("legacy", "pw", "postgres")).await.unwrap();
    assert_eq!(select_one(&legacy).await, 1);
}

#[tokio::test]
async fn restart_keeps_the_port_working() {
    let pg = PgCluster::start();
    let port = pg.port();
    let before = connect(&pg.superuser_url("postgres")).await.unwrap();
    assert_eq!(select_one(&before).await, 1);

    pg.restart();
    assert_eq!(pg.port(), port);
    assert!(before.query_one("SELECT 1", &[]).await.is_err(), "a session from before the restart must be gone");
    let after = connect(&pg.superuser_url("postgres")).await.unwrap();
    assert_eq!(select_one(&after).await, 1);
}

#[tokio::test]
async fn stop_and_start_again_keep_port_and_data() {
    let pg = PgCluster::start();
    pg.psql("CREATE TABLE kept (v int); INSERT INTO kept VALUES (42);");
    pg.stop();
    assert!(!accepts_tcp(pg.port()), "stopped server still listens");
    assert!(connect(&pg.superuser_url("postgres")).await.is_err());

    pg.start_again();
    let client = connect(&pg.superuser_url("postgres")).await.unwrap();
    let v: i32 = client.query_one("SELECT v FROM kept", &[]).await.unwrap().get(0);
    assert_eq!(v, 42);
}

#[tokio::test]
async fn clusters_are_isolated_and_removed_on_drop() {
    let first = PgCluster::start();
    let second = PgCluster::start();
    assert_ne!(first.port(), second.port());
    assert_ne!(first.data_dir(), second.data_dir());
    first.psql("CREATE TABLE only_in_first (v int)");
    assert_eq!(second.psql("SELECT count(*) FROM pg_class WHERE relname = 'only_in_first'"), "0");

    let (port, data_dir) = (first.port(), first.data_dir());
    drop(first);
    assert!(!accepts_tcp(port), "dropped cluster still listens");
    assert!(!data_dir.exists(), "dropped cluster left {data_dir:?}");
    assert_eq!(second.psql("SELECT 1"), "1");
}

#[test]
fn psql_runs_statements_separately_and_trims_output() {
    let pg = PgCluster::start();
    pg.create_user("owner", "pw");
    // CREATE DATABASE cannot run inside a multi-statement query string, so this proves
    // statements are sent one at a time.
    pg.psql("SELECT 1;\nCREATE DATABASE app OWNER owner;");
    pg.create_database("app2", "owner");
    assert_eq!(pg.psql_db("app", "SELECT current_database(); SELECT 2;"), "app\n2");
    assert!(pg.bin("initdb").exists());
}

#[test]
#[should_panic(expected = "psql failed")]
fn psql_panics_on_sql_errors() {
    let pg = PgCluster::start();
    pg.psql("SELECT no_such_column");
}

/// Set for the child process of `cluster_is_cleaned_up_when_the_test_process_is_killed`.
const ORPHAN_ENV: &str = "PGWARP_HARNESS_ORPHAN_CHILD";

/// Runs only as the child of the test below: starts a cluster, says where, and waits to be
/// killed.
#[test]
#[ignore = "helper: run by cluster_is_cleaned_up_when_the_test_process_is_killed"]
fn orphan_child_holds_a_cluster() {
    if std::env::var_os(ORPHAN_ENV).is_none() {
        return;
    }
    let pg = PgCluster::start();
    println!("cluster {} {}", pg.port(), pg.data_dir().display());
    std::thread::sleep(Duration::from_secs(120));
}

#[test]
fn cluster_is_cleaned_up_when_the_test_process_is_killed() {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};

    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "orphan_child_holds_a_cluster", "--ignored", "--nocapture"])
        .env(ORPHAN_ENV, "1")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = BufReader::new(child.stdout.take().unwrap());
    let line = stdout
        .lines()
        .map(|line| line.unwrap())
        .find(|line| line.starts_with("cluster "))
        .expect("child reports its cluster");
    let mut fields = line.split_whitespace().skip(1);
    let port: u16 = fields.next().unwrap().parse().unwrap();
    let data_dir = std::path::PathBuf::from(fields.next().unwrap());
    assert!(accepts_tcp(port));

    // SIGKILL: no destructor runs in the child.
    child.kill().unwrap();
    child.wait().unwrap();

    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while (accepts_tcp(port) || data_dir.exists()) && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(!accepts_tcp(port), "orphaned server still listens on {port}");
    assert!(!data_dir.exists(), "orphaned cluster left {data_dir:?}");
}
