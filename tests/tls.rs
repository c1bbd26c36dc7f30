//! TLS on both sides, against a real Postgres with `ssl = on` and certificates made by the test:
//! clients with psql's sslmode=require / verify-full, the origin in each sslmode (and a
//! verify-full failure on a wrong host name, prefer falling back to plain text), the origin asking
//! for pgwarp's client certificate, --tls-required, and certificate reload on SIGHUP.

mod common;
mod support;

use std::path::Path;
use std::time::Duration;

use common::PgwarpProcess;
use pgwarp::config::ClientCertCheck;
use support::certs::Certs;
use support::*;

fn origin_url(origin: &Origin, host: &str, params: &str) -> String {
    format!("postgres://{APP_USER}:{APP_PASSWORD}@{host}:{}/{APP_DB}?{params}", origin.cluster.port())
}

/// psql through pgwarp; returns (ok, stdout, stderr).
async fn psql_at(origin: &Origin, conninfo: String, sql: &str) -> (bool, String, String) {
    let out = psql(origin, vec![conninfo, "-c".into(), sql.into()]).await;
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).trim().to_owned(),
        String::from_utf8_lossy(&out.stderr).trim().to_owned(),
    )
}

#[tokio::test]
async fn clients_can_use_tls_and_verify_pgwarps_certificate() {
    let certs = Certs::new("client", "DNS:localhost");
    let origin = Origin::start();
    let (cert, key) = (certs.path("server.pem"), certs.path("server.key"));
    let pgwarp = Pgwarp::start(&origin, |c| {
        c.tls_cert = Some(cert);
        c.tls_key = Some(key);
    })
    .await;
    let base = format!("postgresql://{APP_USER}:{APP_PASSWORD}@localhost:{}/{APP_DB}", pgwarp.port);
    let (ok, out, err) = psql_at(&origin, format!("{base}?sslmode=require"), "SELECT 41 + 1").await;
    assert!(ok && out == "42", "{err}");
    let verify = format!("{base}?sslmode=verify-full&sslrootcert={}", certs.path("ca.pem").display());
    let (ok, out, err) = psql_at(&origin, verify, "SELECT 'verified'").await;
    assert!(ok && out == "verified", "{err}");
    // Plain text still works when TLS is offered but not required.
    let (ok, _, err) = psql_at(&origin, format!("{base}?sslmode=disable"), "SELECT 1").await;
    assert!(ok, "{err}");
}

#[tokio::test]
async fn tls_required_refuses_plain_clients() {
    let certs = Certs::new("required", "DNS:localhost");
    let origin = Origin::start();
    let (cert, key) = (certs.path("server.pem"), certs.path("server.key"));
    let pgwarp = Pgwarp::start(&origin, |c| {
        c.tls_cert = Some(cert);
        c.tls_key = Some(key);
        c.tls_required = true;
    })
    .await;
    let base = format!("postgresql://{APP_USER}:{APP_PASSWORD}@localhost:{}/{APP_DB}", pgwarp.port);
    let (ok, _, err) = psql_at(&origin, format!("{base}?sslmode=disable"), "SELECT 1").await;
    assert!(!ok && err.contains("requires an encrypted connection"), "{err}");
    let err = common::connect(&pgwarp.url()).await.unwrap_err();
    assert_eq!(code(&err), "28000", "{err:?}");
    let (ok, _, err) = psql_at(&origin, format!("{base}?sslmode=require"), "SELECT 1").await;
    assert!(ok, "{err}");
}

#[tokio::test]
async fn a_client_ca_file_asks_clients_for_a_certificate_it_signed_and_verify_full_for_their_own() {
    let certs = Certs::new("client-ca", "DNS:localhost");
    let stranger = Certs::new("client-ca-other", "DNS:localhost");
    let origin = Origin::start();
    let (cert, key, ca) = (certs.path("server.pem"), certs.path("server.key"), certs.path("ca.pem"));
    let start = |check| {
        let (cert, key, ca) = (cert.clone(), key.clone(), ca.clone());
        Pgwarp::start(&origin, move |c| {
            c.tls_cert = Some(cert);
            c.tls_key = Some(key);
            c.tls_client_ca_file = Some(ca);
            c.tls_client_cert = check;
        })
    };
    let with_cert = |port: u16, (cert, key): &(std::path::PathBuf, std::path::PathBuf)| {
        format!(
            "postgresql://{APP_USER}:{APP_PASSWORD}@localhost:{port}/{APP_DB}?sslmode=require&sslcert={}&sslkey={}",
            cert.display(),
            key.display()
        )
    };
    let app = certs.client(APP_USER);
    let other_user = certs.client("someone-else");
    let untrusted = stranger.client(APP_USER);

    // verify-ca, the default: any certificate the CA signed, whoever it names.
    let pgwarp = start(None).await;
    let base = format!("postgresql://{APP_USER}:{APP_PASSWORD}@localhost:{}/{APP_DB}", pgwarp.port);
    for client in [&app, &other_user] {
        let (ok, out, err) = psql_at(&origin, with_cert(pgwarp.port, client), "SELECT 'signed'").await;
        assert!(ok && out == "signed", "{err}");
    }
    // A certificate from another CA, or none, fails the handshake.
    let (ok, _, err) = psql_at(&origin, with_cert(pgwarp.port, &untrusted), "SELECT 1").await;
    assert!(!ok && err.contains("unknown ca"), "{err}");
    let (ok, _, err) = psql_at(&origin, format!("{base}?sslmode=require"), "SELECT 1").await;
    assert!(!ok && err.to_lowercase().contains("certificate"), "{err}");
    // Without TLS there is no certificate to check: refused like tls_required.
    let (ok, _, err) = psql_at(&origin, format!("{base}?sslmode=disable"), "SELECT 1").await;
    assert!(!ok && err.contains("requires a client certificate"), "{err}");
    // The password is still checked.
    let wrong = with_cert(pgwarp.port, &app).replace(APP_PASSWORD, "not-the-password");
    let (ok, _, err) = psql_at(&origin, wrong, "SELECT 1").await;
    assert!(!ok && err.contains("password authentication failed"), "{err}");
    drop(pgwarp);

    // verify-full: the certificate must name the user, as Postgres's clientcert=verify-full.
    let pgwarp = start(Some(ClientCertCheck::VerifyFull)).await;
    let (ok, out, err) = psql_at(&origin, with_cert(pgwarp.port, &app), "SELECT 'mine'").await;
    assert!(ok && out == "mine", "{err}");
    let (ok, _, err) = psql_at(&origin, with_cert(pgwarp.port, &other_user), "SELECT 1").await;
    assert!(!ok && err.contains(&format!("certificate authentication failed for user \"{APP_USER}\"")), "{err}");
}

#[tokio::test]
async fn origin_tls_follows_sslmode() {
    let certs = Certs::new("origin", "DNS:localhost");
    let origin = Origin::start_with_ssl(&certs);
    let ca = certs.path("ca.pem");
    let ca = ca.display();
    for (params, host, encrypted) in [
        ("sslmode=disable".to_string(), "localhost", "f"),
        ("sslmode=prefer".to_string(), "localhost", "t"),
        ("sslmode=require".to_string(), "127.0.0.1", "t"),
        (format!("sslmode=verify-ca&sslrootcert={ca}"), "127.0.0.1", "t"),
        (format!("sslmode=verify-full&sslrootcert={ca}"), "localhost", "t"),
    ] {
        let url = origin_url(&origin, host, &params);
        let pgwarp = Pgwarp::start(&origin, move |c| c.origin = Some(url)).await;
        let client = pgwarp.client().await;
        let ssl: bool = client
            .query_one("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()", &[])
            .await
            .unwrap_or_else(|e| panic!("{params}: {e:?}"))
            .get(0);
        assert_eq!(ssl, encrypted == "t", "{params}");
    }
}

#[tokio::test]
async fn verify_full_fails_clearly_on_a_wrong_host_name() {
    let certs = Certs::new("wronghost", "DNS:localhost");
    let origin = Origin::start_with_ssl(&certs);
    let url = origin_url(
        &origin,
        "127.0.0.1",
        &format!("sslmode=verify-full&sslrootcert={}", certs.path("ca.pem").display()),
    );
    let pgwarp = Pgwarp::start(&origin, move |c| c.origin = Some(url)).await;
    let err = common::connect(&pgwarp.url()).await.unwrap_err();
    let message = err.as_db_error().map(|e| e.message().to_owned()).unwrap_or_default();
    assert_eq!(code(&err), "08006", "{err:?}");
    assert!(message.contains("certificate verify failed") && message.contains("mismatch"), "{message}");
    // A CA that did not sign the certificate fails verify-ca too.
    let other = Certs::new("otherca", "DNS:localhost");
    let url =
        origin_url(&origin, "localhost", &format!("sslmode=verify-ca&sslrootcert={}", other.path("ca.pem").display()));
    let pgwarp = Pgwarp::start(&origin, move |c| c.origin = Some(url)).await;
    let err = common::connect(&pgwarp.url()).await.unwrap_err();
    let message = err.as_db_error().map(|e| e.message().to_owned()).unwrap_or_default();
    assert!(message.contains("certificate verify failed"), "{message}");
}

#[tokio::test]
async fn require_fails_against_an_origin_without_tls() {
    let origin = Origin::start();
    let url = origin_url(&origin, "127.0.0.1", "sslmode=require");
    let pgwarp = Pgwarp::start(&origin, move |c| c.origin = Some(url)).await;
    let err = common::connect(&pgwarp.url()).await.unwrap_err();
    let message = err.as_db_error().map(|e| e.message().to_owned()).unwrap_or_default();
    assert!(message.contains("does not accept TLS"), "{message}");
    // prefer, as in libpq, goes on in plain text there.
    let url = origin_url(&origin, "127.0.0.1", "sslmode=prefer");
    let pgwarp = Pgwarp::start(&origin, move |c| c.origin = Some(url)).await;
    let client = pgwarp.client().await;
    let ssl: bool =
        client.query_one("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()", &[]).await.unwrap().get(0);
    assert!(!ssl);
}

/// An origin that asks for a client certificate (pg_hba `clientcert=verify-ca`) gets the one the
/// origin URL names in sslcert and sslkey; without it the login fails with the server's reason.
#[tokio::test]
async fn origin_client_certificate_comes_from_sslcert_and_sslkey() {
    let certs = Certs::new("origin-client", "DNS:localhost");
    let origin = Origin::start_with_ssl(&certs);
    let (cert, key) = certs.client(APP_USER);
    let ca = certs.path("ca.pem");
    origin.cluster.psql(&format!("ALTER SYSTEM SET ssl_ca_file = '{}'", ca.display()));
    let hba = format!(
        "local all all trust\nhostnossl all {APP_USER} 127.0.0.1/32 reject\n\
         hostssl all {APP_USER} 127.0.0.1/32 scram-sha-256 clientcert=verify-ca\nhost all all 127.0.0.1/32 scram-sha-256\n"
    );
    std::fs::write(origin.cluster.data_dir().join("pg_hba.conf"), hba).unwrap();
    origin.cluster.psql("SELECT pg_reload_conf()");

    let verify = format!("sslmode=verify-full&sslrootcert={}", ca.display());
    let with_cert =
        origin_url(&origin, "localhost", &format!("{verify}&sslcert={}&sslkey={}", cert.display(), key.display()));
    let pgwarp = Pgwarp::start(&origin, move |c| c.origin = Some(with_cert)).await;
    let client = pgwarp.client().await;
    let dn: String =
        client.query_one("SELECT client_dn FROM pg_stat_ssl WHERE pid = pg_backend_pid()", &[]).await.unwrap().get(0);
    assert_eq!(dn, format!("/CN={APP_USER}"));

    // Without one, the client hears that pgwarp's own login failed, and pgwarp's log says why.
    let without = origin_url(&origin, "localhost", &verify);
    let process = PgwarpProcess::start(&["--origin", &without, "--log-level", "warn"]);
    let err = common::connect(&process.url(APP_USER, APP_PASSWORD, APP_DB)).await.unwrap_err();
    assert_eq!(code(&err), "08004", "{err:?}");
    let log = process.log();
    assert!(log.contains("requires a valid client certificate"), "{log}");
}

#[tokio::test]
async fn sighup_reloads_the_certificate() {
    let first = Certs::new("first", "DNS:localhost");
    let second = Certs::new("second", "DNS:localhost");
    let origin = Origin::start();
    let live = tempfile::tempdir().unwrap();
    let (cert, key) = (live.path().join("cert.pem"), live.path().join("key.pem"));
    let install = |c: &Certs| {
        std::fs::copy(c.path("server.pem"), &cert).unwrap();
        std::fs::copy(c.path("server.key"), &key).unwrap();
    };
    install(&first);
    let process = PgwarpProcess::start(&[
        "--origin",
        &origin.url(),
        "--tls-cert",
        cert.to_str().unwrap(),
        "--tls-key",
        key.to_str().unwrap(),
    ]);
    let verify_with = |ca: &Path| {
        format!(
            "postgresql://{APP_USER}:{APP_PASSWORD}@localhost:{}/{APP_DB}?sslmode=verify-full&sslrootcert={}",
            process.port(),
            ca.display()
        )
    };
    assert!(psql_at(&origin, verify_with(&first.path("ca.pem")), "SELECT 1").await.0);
    assert!(!psql_at(&origin, verify_with(&second.path("ca.pem")), "SELECT 1").await.0);
    install(&second);
    process.signal("HUP");
    // The reload runs on its own; wait for the new certificate rather than a fixed time.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (ok, _, err) = psql_at(&origin, verify_with(&second.path("ca.pem")), "SELECT 1").await;
        if ok {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "after SIGHUP the new certificate is served: {err}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(!psql_at(&origin, verify_with(&first.path("ca.pem")), "SELECT 1").await.0);
}
