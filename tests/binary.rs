//! The `pgwarp` binary as an operator meets it: flags, config file, exit codes, and graceful
//! shutdown on SIGTERM.

mod common;
mod support;

use std::process::Command;
use std::time::{Duration, Instant};

use common::PgwarpProcess;
use support::*;

fn pgwarp(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_pgwarp")).args(args).env_remove("DATABASE_URL").output().unwrap()
}

#[test]
fn help_explains_every_flag() {
    let out = pgwarp(&["--help"]);
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--config",
        "--listen",
        "--origin",
        "--pool-size",
        "--max-client-conn",
        "--pool-timeout",
        "--idle-timeout",
        "--log-level",
        "--admin-listen",
    ] {
        assert!(help.contains(flag), "--help lacks {flag}:\n{help}");
    }
}

#[test]
fn bad_values_are_one_line_errors_with_exit_code_2() {
    let cases: &[&[&str]] = &[
        &["--origin", "postgres://a:b@h/db", "--pool-size", "zero"],
        &["--origin", "postgres://a:b@h/db", "--pool-timeout", "soon"],
        &["--origin", "mysql://a:b@h/db"],
        &["--origin", "postgres://a:b@h/db", "--pool-size", "0"],
        &["--origin", "postgres://a:b@h/db", "--listen", "nowhere"],
        &["--origin", "postgres://a:b@h/db", "--admin-listen", "nowhere"],
        &[],
        &["--config", "/nonexistent/pgwarp.toml"],
    ];
    for args in cases {
        let out = pgwarp(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.trim().starts_with("pgwarp:") || err.contains("error:"), "{args:?}: {err}");
        if err.starts_with("pgwarp:") {
            assert_eq!(err.trim().lines().count(), 1, "{args:?}: {err}");
        }
    }
}

#[test]
fn config_file_typo_names_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(&path, "origin = \"postgres://a:b@h/db\"\npool_sise = 3\n").unwrap();
    let out = pgwarp(&["--config", path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("pool_sise") && err.trim().lines().count() == 1, "{err}");
}

#[tokio::test]
async fn runs_from_a_config_file() {
    let origin = Origin::start();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pgwarp.toml");
    std::fs::write(&path, format!("origin = \"{}\"\npool_size = 2\nlog_level = \"warn\"\n", origin.url())).unwrap();
    let process = PgwarpProcess::start(&["--config", path.to_str().unwrap()]);
    let client = common::connect(&process.url(APP_USER, APP_PASSWORD, APP_DB)).await.unwrap();
    assert_eq!(client.query_one("SELECT 40 + 2", &[]).await.unwrap().get::<_, i32>(0), 42);
}

#[tokio::test]
async fn sigterm_lets_transactions_finish_and_closes_idle_clients() {
    let origin = Origin::start();
    origin.sql("CREATE TABLE done (v int); GRANT ALL ON done TO app");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pgwarp.toml");
    std::fs::write(&path, format!("origin = \"{}\"\nshutdown_timeout = \"20s\"\n", origin.url())).unwrap();
    let mut process = PgwarpProcess::start(&["--config", path.to_str().unwrap()]);
    let url = process.url(APP_USER, APP_PASSWORD, APP_DB);
    let busy = common::connect(&url).await.unwrap();
    let idle = common::connect(&url).await.unwrap();
    idle.query_one("SELECT 1", &[]).await.unwrap();
    busy.batch_execute("BEGIN; INSERT INTO done VALUES (1)").await.unwrap();

    process.signal("TERM");
    tokio::time::sleep(Duration::from_millis(300)).await;
    // The idle client was told why and closed.
    let err = idle.query_one("SELECT 1", &[]).await.unwrap_err();
    assert!(code(&err) == "57P01" || idle.is_closed(), "{err}");
    // No new clients.
    assert!(common::connect(&url).await.is_err());
    // The open transaction may finish.
    busy.batch_execute("INSERT INTO done VALUES (2); COMMIT").await.unwrap();
    let status = tokio::task::spawn_blocking(move || process.wait_exit(Duration::from_secs(10))).await.unwrap();
    assert_eq!(status.and_then(|s| s.code()), Some(0), "pgwarp exits cleanly once the transaction is done");
    assert_eq!(origin.sql("SELECT count(*) FROM done"), "2");
}

#[tokio::test]
async fn shutdown_timeout_ends_transactions_that_do_not_finish() {
    let origin = Origin::start();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pgwarp.toml");
    std::fs::write(&path, format!("origin = \"{}\"\nshutdown_timeout = \"1s\"\n", origin.url())).unwrap();
    let mut process = PgwarpProcess::start(&["--config", path.to_str().unwrap()]);
    let stuck = common::connect(&process.url(APP_USER, APP_PASSWORD, APP_DB)).await.unwrap();
    stuck.batch_execute("BEGIN").await.unwrap();
    let start = Instant::now();
    process.signal("TERM");
    let status = tokio::task::spawn_blocking(move || process.wait_exit(Duration::from_secs(10))).await.unwrap();
    assert!(status.is_some(), "pgwarp did not exit");
    assert!(start.elapsed() < Duration::from_secs(8));
    assert!(stuck.batch_execute("SELECT 1").await.is_err());
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        origin.sql("SELECT count(*) FROM pg_stat_activity WHERE usename = 'app' AND state LIKE 'idle in transaction%'"),
        "0"
    );
}
