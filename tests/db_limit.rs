//! `max_db_connections`: the origin connections of every pool of one database together stay
//! under the cap (as PgBouncer's), with several logins each having a pool of its own; a pool
//! at the cap takes another pool's idle connection rather than waiting. `max_user_connections`
//! does the same for the pools of one user over several databases. Against a real Postgres.

mod common;
mod support;

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use support::*;

/// Origin connections to the app database by pgwarp's roles, as Postgres counts them.
const OPEN_ON_ORIGIN: &str =
    "SELECT count(*) FROM pg_stat_activity WHERE datname = 'app' AND usename IN ('app', 'alice')";
/// Origin connections of `app`, to any database.
const OPEN_AS_APP: &str = "SELECT count(*) FROM pg_stat_activity WHERE usename = 'app'";

async fn count(monitor: &tokio_postgres::Client, sql: &str) -> i64 {
    monitor.query_one(sql, &[]).await.unwrap().get(0)
}

async fn open_on_origin(monitor: &tokio_postgres::Client) -> i64 {
    count(monitor, OPEN_ON_ORIGIN).await
}

/// Six clients, taking `urls` in turn, each run three short queries; returns the most origin
/// connections `count_sql` saw open at once meanwhile.
async fn most_open_while_busy(monitor: tokio_postgres::Client, count_sql: &'static str, urls: &[String]) -> i64 {
    let done = Arc::new(AtomicBool::new(false));
    let most = Arc::new(AtomicI64::new(0));
    let watcher = {
        let (done, most) = (done.clone(), most.clone());
        tokio::spawn(async move {
            while !done.load(Ordering::Relaxed) {
                most.fetch_max(count(&monitor, count_sql).await, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
    };
    let mut clients = Vec::new();
    for i in 0..6 {
        let url = urls[i % urls.len()].clone();
        clients.push(tokio::spawn(async move {
            let client = common::connect(&url).await.unwrap();
            for _ in 0..3 {
                client.query_one("SELECT 1 FROM pg_sleep(0.1)", &[]).await.unwrap();
            }
        }));
    }
    for c in clients {
        c.await.unwrap();
    }
    done.store(true, Ordering::Relaxed);
    watcher.await.unwrap();
    most.load(Ordering::Relaxed)
}

async fn start(origin: &Origin, pool_size: usize, max_db_connections: usize) -> Pgwarp {
    origin.cluster.create_user("alice", "alice-pw");
    origin.sql("GRANT CONNECT ON DATABASE app TO alice");
    Pgwarp::start(origin, |c| {
        c.pool_size = pool_size;
        c.max_db_connections = max_db_connections;
        c.pool_timeout = Duration::from_secs(10);
        c.users.insert(
            "alice".into(),
            pgwarp::config::UserConfig { password: "alice-pw".into(), origin_user: None, origin_password: None },
        );
    })
    .await
}

#[tokio::test]
async fn the_pools_of_one_database_together_stay_under_max_db_connections() {
    let origin = Origin::start();
    let pgwarp = start(&origin, 3, 3).await;
    let monitor = common::connect(&origin.cluster.superuser_url("app")).await.unwrap();

    // Two logins, each with a pool of 3, six clients: without the cap 6 connections.
    let urls = [pgwarp.url(), pgwarp.url_as("alice", "alice-pw")];
    let most = most_open_while_busy(monitor, OPEN_ON_ORIGIN, &urls).await;
    assert!((1..=3).contains(&most), "{most} origin connections were open at once");
}

#[tokio::test]
async fn at_the_cap_a_pool_takes_another_pools_idle_connection_instead_of_waiting() {
    let origin = Origin::start();
    let pgwarp = start(&origin, 2, 2).await;
    let monitor = common::connect(&origin.cluster.superuser_url("app")).await.unwrap();

    // app's pool opens both connections the cap allows, and leaves them idle.
    let (a, b) = (pgwarp.client().await, pgwarp.client().await);
    let (x, y) = tokio::join!(
        a.query_one("SELECT pg_backend_pid() FROM pg_sleep(0.2)", &[]),
        b.query_one("SELECT pg_backend_pid() FROM pg_sleep(0.2)", &[])
    );
    assert_ne!(x.unwrap().get::<_, i32>(0), y.unwrap().get::<_, i32>(0));
    assert_eq!(open_on_origin(&monitor).await, 2);

    // alice's pool, at the cap, closes one of them and is served at once.
    let started = Instant::now();
    let alice = common::connect(&pgwarp.url_as("alice", "alice-pw")).await.unwrap();
    let user: String = alice.query_one("SELECT current_user::text", &[]).await.unwrap().get(0);
    assert_eq!(user, "alice");
    assert!(started.elapsed() < Duration::from_secs(2), "waited {:?}", started.elapsed());
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(open_on_origin(&monitor).await, 2);
    // And app still works, within the same cap.
    let user: String = a.query_one("SELECT current_user::text", &[]).await.unwrap().get(0);
    assert_eq!(user, "app");
    assert!(open_on_origin(&monitor).await <= 2);
}

#[tokio::test]
async fn the_pools_of_one_user_over_several_databases_stay_under_max_user_connections() {
    let origin = Origin::start();
    origin.cluster.create_database("app2", APP_USER);
    let pgwarp = Pgwarp::start(&origin, |c| {
        c.pool_size = 3;
        c.max_user_connections = 2;
        c.pool_timeout = Duration::from_secs(10);
    })
    .await;
    let monitor = common::connect(&origin.cluster.superuser_url("postgres")).await.unwrap();
    let url_of = |db: &str| format!("postgres://{APP_USER}:{APP_PASSWORD}@127.0.0.1:{}/{db}", pgwarp.port);

    // The app database's pool opens the two connections the cap allows and leaves them idle.
    let (a, b) = (common::connect(&url_of(APP_DB)).await.unwrap(), common::connect(&url_of(APP_DB)).await.unwrap());
    let (x, y) = tokio::join!(
        a.query_one("SELECT pg_backend_pid() FROM pg_sleep(0.2)", &[]),
        b.query_one("SELECT pg_backend_pid() FROM pg_sleep(0.2)", &[])
    );
    assert_ne!(x.unwrap().get::<_, i32>(0), y.unwrap().get::<_, i32>(0));
    assert_eq!(count(&monitor, OPEN_AS_APP).await, 2);

    // app2's pool, at the user's cap, closes one of them and is served at once.
    let started = Instant::now();
    let other = common::connect(&url_of("app2")).await.unwrap();
    let db: String = other.query_one("SELECT current_database()::text", &[]).await.unwrap().get(0);
    assert_eq!(db, "app2");
    assert!(started.elapsed() < Duration::from_secs(2), "waited {:?}", started.elapsed());

    // Busy on both databases at once: never more than two connections of app.
    let most = most_open_while_busy(monitor, OPEN_AS_APP, &[url_of(APP_DB), url_of("app2")]).await;
    assert!((1..=2).contains(&most), "{most} origin connections of app were open at once");
}
