//! Logins pgwarp's config does not list, as PgBouncer's `auth_query` offers them: the user's
//! secret is looked up in the origin at login, the client's password is checked against it, and
//! pgwarp reaches the origin as that user with what the login revealed (SCRAM keys, or the md5
//! hash), no password stored anywhere. Also a SCRAM verifier copied into `[users]`. Against a
//! real Postgres, with tokio-postgres as the client.

mod common;
mod support;

use std::collections::HashSet;

use common::{PgCluster, PgOptions};
use pgwarp::config::AuthMethod;
use support::*;

/// The setup PgBouncer's docs recommend: a SECURITY DEFINER function that only the auth user
/// may call, so that user needs no superuser rights to read secrets.
const LOOKUP_FUNCTION: &str = "CREATE SCHEMA pgwarp_auth; \
     CREATE FUNCTION pgwarp_auth.lookup(p_user text) RETURNS TABLE (usename name, passwd text) \
       LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog \
       AS $$ SELECT rolname, CASE WHEN rolvaliduntil < now() THEN NULL ELSE rolpassword END \
             FROM pg_authid WHERE rolname = p_user AND rolcanlogin $$; \
     REVOKE ALL ON FUNCTION pgwarp_auth.lookup(text) FROM PUBLIC; \
     GRANT USAGE ON SCHEMA pgwarp_auth TO app; \
     GRANT EXECUTE ON FUNCTION pgwarp_auth.lookup(text) TO app";
const LOOKUP_QUERY: &str = "SELECT usename, passwd FROM pgwarp_auth.lookup($1)";

async fn current_user(url: &str) -> Result<String, tokio_postgres::Error> {
    let client = common::connect(url).await?;
    Ok(client.query_one("SELECT current_user::text", &[]).await?.get(0))
}

async fn refused_with(url: &str) -> (String, String) {
    match common::connect(url).await {
        Ok(_) => panic!("{url} logged in"),
        Err(e) => {
            let db = e.as_db_error().unwrap_or_else(|| panic!("not a server error: {e}"));
            (db.code().code().to_owned(), db.message().to_owned())
        }
    }
}

#[tokio::test]
async fn unlisted_users_log_in_with_their_own_origin_passwords_through_auth_query() {
    let origin = Origin::start();
    origin.sql(LOOKUP_FUNCTION);
    origin.cluster.create_user("alice", "alice-pw");
    origin.cluster.psql(
        "CREATE ROLE nopass LOGIN; \
         CREATE ROLE expired LOGIN PASSWORD 'x' VALID UNTIL '2001-01-01'; \
         CREATE ROLE nologin NOLOGIN PASSWORD 'x'",
    );
    origin.sql("GRANT CONNECT ON DATABASE app TO alice, nopass, expired, nologin");
    let pgwarp = Pgwarp::start(&origin, |c| {
        c.pool_size = 2;
        c.auth_query = Some(LOOKUP_QUERY.into());
        c.admin_users = vec!["alice".into()];
    })
    .await;

    assert_eq!(current_user(&pgwarp.url_as("alice", "alice-pw")).await.unwrap(), "alice");
    // The origin URL's own login is untouched.
    assert_eq!(current_user(&pgwarp.url()).await.unwrap(), APP_USER);

    // Eight clients at once on a pool of two: the pool opens its second connection with the
    // keys a login revealed, long after that login, and every query runs as alice.
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let url = pgwarp.url_as("alice", "alice-pw");
        tasks.push(tokio::spawn(async move {
            let client = common::connect(&url).await.unwrap();
            let row = client
                .query_one("SELECT current_user::text, pg_backend_pid(), pg_sleep(0.2)::text", &[])
                .await
                .unwrap();
            (row.get::<_, String>(0), row.get::<_, i32>(1))
        }));
    }
    let mut pids = HashSet::new();
    for t in tasks {
        let (user, pid) = t.await.unwrap();
        assert_eq!(user, "alice");
        pids.insert(pid);
    }
    assert_eq!(pids.len(), 2, "the pool of two should have served from two connections");

    // A wrong password, an unknown user, a user without a password, with an expired one or
    // without LOGIN all get Postgres's own answer, so a client cannot tell which it was.
    for (user, password) in [("alice", "wrong"), ("mallory", "x"), ("nopass", ""), ("expired", "x"), ("nologin", "x")] {
        let (code, message) = refused_with(&pgwarp.url_as(user, password)).await;
        assert_eq!(code, "28P01", "{user}");
        assert_eq!(message, format!("password authentication failed for user \"{user}\""));
    }

    // A looked-up user may be an admin.
    let console = common::connect(&format!("postgres://alice:alice-pw@127.0.0.1:{}/pgwarp", pgwarp.port)).await;
    let pools = console.unwrap().simple_query("SHOW POOLS").await.unwrap();
    assert!(pools.iter().any(|m| matches!(m, tokio_postgres::SimpleQueryMessage::Row(r) if r.get(1) == Some("alice"))));
}

#[tokio::test]
async fn a_changed_password_takes_effect_at_the_next_login_and_for_new_origin_connections() {
    let origin = Origin::start();
    origin.sql(LOOKUP_FUNCTION);
    origin.cluster.create_user("alice", "old-pw");
    origin.sql("GRANT CONNECT ON DATABASE app TO alice");
    let pgwarp = Pgwarp::start(&origin, |c| c.auth_query = Some(LOOKUP_QUERY.into())).await;
    assert_eq!(current_user(&pgwarp.url_as("alice", "old-pw")).await.unwrap(), "alice");

    origin.cluster.psql("ALTER ROLE alice PASSWORD 'new-pw'");
    assert_eq!(refused_with(&pgwarp.url_as("alice", "old-pw")).await.0, "28P01");
    let client = common::connect(&pgwarp.url_as("alice", "new-pw")).await.unwrap();
    // Close alice's idle origin connections, made with the old keys: the next query needs a new
    // one, which the new login's keys open (the old ones no longer fit the origin's verifier).
    origin.sql("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = 'alice'");
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let user: String = client.query_one("SELECT current_user::text", &[]).await.unwrap().get(0);
    assert_eq!(user, "alice");
}

#[tokio::test]
async fn md5_stored_users_log_in_with_md5_and_reach_the_origin_with_the_hash() {
    let cluster = PgCluster::start_with(PgOptions { hba_method: "md5", ..PgOptions::default() });
    cluster.create_user(APP_USER, APP_PASSWORD);
    cluster.create_database(APP_DB, APP_USER);
    let origin = Origin { cluster };
    origin.sql(LOOKUP_FUNCTION);
    origin.cluster.create_md5_user("bob", "bob-pw");
    origin.cluster.create_user("alice", "alice-pw");
    origin.sql("GRANT CONNECT ON DATABASE app TO alice, bob");

    let md5 = Pgwarp::start(&origin, |c| {
        c.auth_query = Some(LOOKUP_QUERY.into());
        c.auth_method = AuthMethod::Md5;
    })
    .await;
    assert_eq!(current_user(&md5.url_as("bob", "bob-pw")).await.unwrap(), "bob");
    assert_eq!(refused_with(&md5.url_as("bob", "wrong")).await.0, "28P01");
    // A SCRAM-stored user is checked with SCRAM even here, as Postgres does.
    assert_eq!(current_user(&md5.url_as("alice", "alice-pw")).await.unwrap(), "alice");

    // Where SCRAM is required, an md5-stored user cannot log in (as in Postgres).
    let scram = Pgwarp::start(&origin, |c| c.auth_query = Some(LOOKUP_QUERY.into())).await;
    assert_eq!(refused_with(&scram.url_as("bob", "bob-pw")).await.0, "28P01");
}

#[tokio::test]
async fn a_verifier_copied_from_pg_authid_is_enough_to_reach_the_origin() {
    let origin = Origin::start();
    origin.cluster.create_user("carol", "carol-pw");
    origin.sql("GRANT CONNECT ON DATABASE app TO carol");
    let verifier = origin.cluster.psql("SELECT rolpassword FROM pg_authid WHERE rolname = 'carol'");
    assert!(verifier.starts_with("SCRAM-SHA-256$"), "{verifier}");
    let pgwarp = Pgwarp::start(&origin, |c| {
        c.pool_size = 1;
        c.users.insert(
            "carol".into(),
            pgwarp::config::UserConfig { password: verifier, origin_user: None, origin_password: None },
        );
    })
    .await;
    assert_eq!(current_user(&pgwarp.url_as("carol", "carol-pw")).await.unwrap(), "carol");
    assert_eq!(refused_with(&pgwarp.url_as("carol", "wrong")).await.0, "28P01");
}

#[tokio::test]
async fn a_failing_auth_query_refuses_that_login_clearly_and_nothing_else() {
    let origin = Origin::start();
    origin.cluster.create_user("alice", "alice-pw");
    let pgwarp = Pgwarp::start(&origin, |c| c.auth_query = Some("SELECT * FROM no_such_lookup($1)".into())).await;
    let (code, message) = refused_with(&pgwarp.url_as("alice", "alice-pw")).await;
    assert_eq!(code, "08004");
    // The client has proven nothing, so the origin's reason is for the log only.
    assert_eq!(message, "pgwarp could not look the user up: see pgwarp's log");
    // Listed logins do not need the query.
    assert_eq!(current_user(&pgwarp.url()).await.unwrap(), APP_USER);
}
