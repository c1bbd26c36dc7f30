//! `auth_query`: users that the directory does not list are looked up in the origin, as
//! PgBouncer does. The query runs as `auth_user` on a connection of that role's pool, with the
//! user name as its one parameter, and returns the user's `pg_authid` secret. The client is then
//! checked against that secret, and pgwarp logs in to the origin as the user with what the
//! login revealed: the SCRAM keys of the client's proof, or the md5 hash itself. No password
//! for these users is configured or stored anywhere.
//!
//! The secret is looked up at every login, so a changed or revoked password takes effect at
//! once; a login costs one small query on a pooled connection.

use std::collections::HashMap;
use std::sync::Arc;

use super::{client_secret, ClientSecret, OriginLogin, UserEntry};
use crate::config::{AuthMethod, Config, ConfigError, DEFAULT_AUTH_QUERY};
use crate::origin::settings::Settings;
use crate::origin::{Credentials, OriginError, OriginSecret};
use crate::pool::{PoolError, PoolSet};
use crate::protocol::error::ErrorFields;

#[derive(Debug, thiserror::Error)]
pub enum LookupError {
    #[error("{0}")]
    Pool(#[from] PoolError),
    #[error("{0}")]
    Origin(#[from] OriginError),
    #[error("auth_query failed: {} ({})", .0.message, .0.code)]
    Query(ErrorFields),
    #[error("auth_query returned {0} rows for one user")]
    Rows(usize),
    #[error("auth_query returned {0} columns; it must return the user name and its secret")]
    Columns(usize),
}

/// How to look users up: the query and who runs it.
#[derive(Debug)]
pub struct AuthLookup {
    query: String,
    /// The origin role that runs the query, and its secret.
    runner: String,
    runner_secret: OriginSecret,
    /// The database it runs in.
    dbname: String,
    method: AuthMethod,
}

impl AuthLookup {
    /// The lookup the config asks for, if any. `auth_user` must be a login whose origin secret
    /// pgwarp holds: the origin URL's user, or a `users` entry with a password.
    pub(super) fn from_config(
        config: &Config,
        users: &HashMap<String, Arc<UserEntry>>,
    ) -> Result<Option<AuthLookup>, ConfigError> {
        if config.auth_query.is_none() && config.auth_user.is_none() {
            return Ok(None);
        }
        let invalid = |message: String| ConfigError::Invalid { key: "auth_user", message };
        let origin = config.origin_url()?;
        let name = config.auth_user.clone().unwrap_or(origin.user);
        let dbname = config.auth_dbname.clone().unwrap_or(origin.database);
        let entry = users.get(&name).ok_or_else(|| {
            invalid(format!("{name:?} is neither the origin URL's user nor listed in [users] with an origin password"))
        })?;
        let OriginLogin::Fixed(secret) = &entry.origin_login else {
            return Err(invalid(format!("{name:?} needs an origin_password in [users] to run auth_query")));
        };
        let query = config.auth_query.clone().unwrap_or_else(|| DEFAULT_AUTH_QUERY.to_owned());
        if !query.contains("$1") {
            return Err(ConfigError::Invalid { key: "auth_query", message: "must take the user name as $1".into() });
        }
        Ok(Some(AuthLookup {
            query,
            runner: entry.origin_user.clone(),
            runner_secret: secret.clone(),
            dbname,
            method: config.auth_method,
        }))
    }

    /// Looks `user` up. None: no such user, or one who cannot log in (no password, or an md5
    /// hash where SCRAM is required); the caller then runs the same password exchange as for
    /// any unknown user.
    ///
    /// The query runs in one database whatever the client asked for: a client that has not
    /// proven anything yet must not make pgwarp open pools in databases of its choosing.
    pub async fn find(&self, pools: &PoolSet, user: &str) -> Result<Option<UserEntry>, LookupError> {
        let pool = pools.get(&Credentials {
            user: self.runner.clone(),
            secret: self.runner_secret.clone(),
            database: self.dbname.clone(),
        });
        // Client 0: pgwarp's own work.
        let mut conn = pool.checkout(0).await?;
        // Whatever a client left applied here (a search_path) must not steer the query. On an
        // origin error the connection is dropped, not checked in.
        if let Some(sql) = crate::origin::settings::sync_sql(conn.applied(), &Settings::new()) {
            let reset = conn.simple_query(&sql).await?;
            if let Some(e) = reset.error {
                conn.broken = true;
                pool.checkin(conn);
                return Err(LookupError::Query(e));
            }
            conn.set_applied(Settings::new());
        }
        let outcome = conn.query_with_params(&self.query, &[Some(user)], 1).await?;
        pool.checkin(conn);
        if let Some(e) = outcome.error {
            return Err(LookupError::Query(e));
        }
        if outcome.rows_left_out > 0 {
            return Err(LookupError::Rows(outcome.rows.len() + outcome.rows_left_out));
        }
        let secret = match outcome.rows.as_slice() {
            [] => return Ok(None),
            // The name column must say the user asked for: a query that ignores $1 logs
            // nobody in as someone else.
            [row] => match row.as_slice() {
                [Some(name), secret] if name == user => secret.clone(),
                [_, _] => return Ok(None),
                other => return Err(LookupError::Columns(other.len())),
            },
            rows => return Err(LookupError::Rows(rows.len())),
        };
        let (method, name, secret) = (self.method, user.to_owned(), secret);
        // A plaintext secret takes a PBKDF2 derivation: off the workers.
        let entry = tokio::task::spawn_blocking(move || entry_for(method, &name, secret.as_deref()))
            .await
            .map_err(|e| OriginError::Protocol(e.to_string()))?;
        Ok(entry)
    }
}

/// The entry for a user whose stored secret is `stored` (None or empty: no password), or None
/// when such a user cannot log in under `method`.
fn entry_for(method: AuthMethod, user: &str, stored: Option<&str>) -> Option<UserEntry> {
    let stored = stored.filter(|s| !s.is_empty())?;
    let scram = stored.starts_with("SCRAM-SHA-256$");
    let md5 = stored.starts_with("md5") && stored.len() == 35;
    let (secret, origin_login) = if scram {
        // Postgres too answers a SCRAM verifier with SCRAM when md5 is asked for.
        (ClientSecret::Scram(crate::protocol::scram::ScramSecret::parse(stored)?), OriginLogin::ClientKeys)
    } else if md5 {
        if method != AuthMethod::Md5 {
            tracing::info!(user, "user has an md5 password, but auth_method is scram-sha-256");
            return None;
        }
        (ClientSecret::Md5(stored.to_owned()), OriginLogin::Fixed(OriginSecret::Md5Hash(stored.to_owned())))
    } else {
        let secret = client_secret(method, user, Some(stored)).ok()?;
        (secret, OriginLogin::Fixed(OriginSecret::Password(stored.to_owned())))
    };
    Some(UserEntry { secret, origin_user: user.to_owned(), origin_login })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stored_secrets_become_entries_as_postgres_would_check_them() {
        let verifier = postgres_protocol::password::scram_sha_256(b"pw");
        let md5 = crate::protocol::md5::stored_hash("bob", "pw");
        for method in [AuthMethod::ScramSha256, AuthMethod::Md5] {
            let e = entry_for(method, "alice", Some(&verifier)).unwrap();
            assert!(matches!((e.secret, e.origin_login), (ClientSecret::Scram(_), OriginLogin::ClientKeys)));
            assert!(entry_for(method, "alice", None).is_none());
            assert!(entry_for(method, "alice", Some("")).is_none());
            assert!(entry_for(method, "alice", Some("SCRAM-SHA-256$broken")).is_none());
        }
        assert!(entry_for(AuthMethod::ScramSha256, "bob", Some(&md5)).is_none());
        let e = entry_for(AuthMethod::Md5, "bob", Some(&md5)).unwrap();
        assert!(matches!(e.secret, ClientSecret::Md5(ref h) if *h == md5));
        assert_eq!(e.origin_secret(None), Some(OriginSecret::Md5Hash(md5)));
        let e = entry_for(AuthMethod::ScramSha256, "carl", Some("plain")).unwrap();
        assert!(matches!(e.secret, ClientSecret::Scram(_)));
        assert_eq!(e.origin_secret(None), Some(OriginSecret::Password("plain".into())));
    }

    #[tokio::test]
    async fn the_runner_must_be_a_login_with_an_origin_secret() {
        let base = "origin = \"postgres://app:secret@h/db\"\n";
        let dir = |extra: &str| {
            let config = Config::from_toml(&format!("{base}{extra}")).unwrap();
            async move { crate::auth::UserDirectory::build(&config, &config.origin_url().unwrap()).await }
        };
        assert!(dir("").await.unwrap().lookup().is_none());
        let on = dir("auth_user = \"app\"\n").await.unwrap();
        let lookup = on.lookup().unwrap();
        assert_eq!((lookup.runner.as_str(), lookup.query.as_str()), ("app", DEFAULT_AUTH_QUERY));
        assert_eq!(lookup.dbname, "db");
        let custom =
            dir("auth_query = \"SELECT u, p FROM auth.lookup($1)\"\nauth_dbname = \"postgres\"\n").await.unwrap();
        assert_eq!(
            (custom.lookup().unwrap().runner.as_str(), custom.lookup().unwrap().dbname.as_str()),
            ("app", "postgres")
        );
        assert!(dir("auth_user = \"nobody\"\n").await.is_err());
        let verifier = postgres_protocol::password::scram_sha_256(b"pw");
        assert!(dir(&format!("auth_user = \"ops\"\n[users.ops]\npassword = \"{verifier}\"\n")).await.is_err());
        let ops = dir("auth_user = \"ops\"\n[users.ops]\npassword = \"o\"\n").await.unwrap();
        assert_eq!(ops.lookup().unwrap().runner_secret, OriginSecret::Password("o".into()));
        assert!(dir("auth_query = \"SELECT 1\"\n").await.is_err());
    }
}
