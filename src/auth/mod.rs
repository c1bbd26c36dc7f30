//! Who may log in to pgwarp, how their password is checked, and which origin role their work
//! runs as, with what secret. Built once at start-up (and on RELOAD); deriving SCRAM verifiers
//! from plaintext passwords (PBKDF2) runs on a blocking thread. Users the directory does not
//! list may be looked up in the origin with `auth_query` (`lookup`).

pub mod lookup;

use std::collections::HashMap;
use std::sync::Arc;

use rand::RngCore;

use crate::config::{AuthMethod, Config, ConfigError, OriginUrl};
use crate::origin::OriginSecret;
use crate::protocol::md5;
use crate::protocol::scram::{ScramKeys, ScramSecret};

pub use lookup::AuthLookup;

/// SCRAM iterations for verifiers pgwarp derives itself (Postgres' default).
const SCRAM_ITERATIONS: u32 = 4096;

/// How one user's password is checked.
#[derive(Clone, Debug)]
pub enum ClientSecret {
    Scram(ScramSecret),
    /// `md5` + md5(password || user), as pg_authid stores it.
    Md5(String),
    /// No password configured anywhere (the origin URL has none): accept without one.
    Trust,
}

/// How pgwarp logs in to the origin for one user.
#[derive(Clone, Debug)]
pub enum OriginLogin {
    /// With this secret.
    Fixed(OriginSecret),
    /// With the SCRAM keys the client's own login revealed (pass-through): the user's secret
    /// is the origin role's own verifier.
    ClientKeys,
}

#[derive(Clone, Debug)]
pub struct UserEntry {
    pub secret: ClientSecret,
    pub origin_user: String,
    pub origin_login: OriginLogin,
}

impl UserEntry {
    /// The secret to log in to the origin with, given the keys this client's SCRAM login
    /// revealed; None when pass-through needs keys the login did not give.
    pub fn origin_secret(&self, keys: Option<ScramKeys>) -> Option<OriginSecret> {
        match &self.origin_login {
            OriginLogin::Fixed(secret) => Some(secret.clone()),
            OriginLogin::ClientKeys => keys.map(OriginSecret::ScramKeys),
        }
    }
}

#[derive(Debug)]
pub struct UserDirectory {
    users: HashMap<String, Arc<UserEntry>>,
    /// How to look up users not listed here, when `auth_query` or `auth_user` is set.
    lookup: Option<Arc<AuthLookup>>,
}

impl UserDirectory {
    pub async fn build(config: &Config, origin: &OriginUrl) -> Result<UserDirectory, ConfigError> {
        let method = config.auth_method;
        let mut plan: Vec<(String, Option<String>, String, OriginLogin)> = Vec::new();
        let origin_secret = || origin.password.clone().map_or(OriginSecret::None, OriginSecret::Password);
        plan.push((
            origin.user.clone(),
            origin.password.clone(),
            origin.user.clone(),
            OriginLogin::Fixed(origin_secret()),
        ));
        for (name, u) in &config.users {
            let origin_user = u.origin_user.clone().unwrap_or_else(|| name.clone());
            let login = if let Some(p) = &u.origin_password {
                OriginLogin::Fixed(OriginSecret::Password(p.clone()))
            } else if u.password.starts_with("SCRAM-SHA-256$") && origin_user == *name && origin_user != origin.user {
                OriginLogin::ClientKeys
            } else if u.password.starts_with("md5") && origin_user == *name && origin_user != origin.user {
                OriginLogin::Fixed(OriginSecret::Md5Hash(u.password.clone()))
            } else if !u.password.starts_with("SCRAM-SHA-256$") && !u.password.starts_with("md5") {
                OriginLogin::Fixed(OriginSecret::Password(u.password.clone()))
            } else {
                OriginLogin::Fixed(origin_secret())
            };
            plan.push((name.clone(), Some(u.password.clone()), origin_user, login));
        }
        let built = tokio::task::spawn_blocking(move || {
            plan.into_iter()
                .map(|(name, password, origin_user, origin_login)| {
                    let secret = client_secret(method, &name, password.as_deref())?;
                    Ok((name, Arc::new(UserEntry { secret, origin_user, origin_login })))
                })
                .collect::<Result<HashMap<_, _>, ConfigError>>()
        })
        .await
        .map_err(|e| ConfigError::Invalid { key: "users", message: e.to_string() })??;
        let lookup = AuthLookup::from_config(config, &built)?.map(Arc::new);
        Ok(UserDirectory { users: built, lookup })
    }

    pub fn get(&self, name: &str) -> Option<Arc<UserEntry>> {
        self.users.get(name).cloned()
    }

    /// A verifier that matches no password, for a user that does not exist (or cannot log in),
    /// so it goes through the same exchange as one that does. Its salt is the same for the same
    /// name every time, as a real user's is, and differs between names (Postgres' mock salt):
    /// probing twice tells nothing.
    pub fn decoy_for(&self, user: &str) -> ScramSecret {
        static KEY: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
        let key = KEY.get_or_init(|| random_bytes(32));
        let salt = crate::protocol::scram::hmac_sha256(key, user.as_bytes())[..16].to_vec();
        ScramSecret { iterations: SCRAM_ITERATIONS, salt, stored_key: [0; 32], server_key: [0; 32] }
    }

    /// How to look up users not listed, if `auth_query` is on.
    pub fn lookup(&self) -> Option<&Arc<AuthLookup>> {
        self.lookup.as_ref()
    }

    /// The configured origin passwords `next` changes: for each user listed in both with the
    /// same origin role and another fixed secret, `(origin role, old secret, new secret)`, once
    /// per role and old secret, unless another login of `next` still uses the old secret (the
    /// pool is also that login's: a configured password is part of a pool's identity). Pools
    /// logged in with the old secret switch to the new one.
    pub fn rotations(&self, next: &UserDirectory) -> Vec<(String, OriginSecret, OriginSecret)> {
        let mut out: Vec<(String, OriginSecret, OriginSecret)> = Vec::new();
        for (name, was) in &self.users {
            let Some(now) = next.users.get(name) else { continue };
            let (OriginLogin::Fixed(old), OriginLogin::Fixed(new)) = (&was.origin_login, &now.origin_login) else {
                continue;
            };
            if was.origin_user != now.origin_user || old == new {
                continue;
            }
            let still_used = next.users.values().any(|u| {
                u.origin_user == was.origin_user && matches!(&u.origin_login, OriginLogin::Fixed(s) if s == old)
            });
            if still_used {
                continue;
            }
            if !out.iter().any(|(user, o, _)| *user == was.origin_user && o == old) {
                out.push((was.origin_user.clone(), old.clone(), new.clone()));
            }
        }
        out
    }
}

fn client_secret(method: AuthMethod, user: &str, password: Option<&str>) -> Result<ClientSecret, ConfigError> {
    let invalid = |message: String| ConfigError::Invalid { key: "users", message };
    let Some(password) = password else {
        return Ok(ClientSecret::Trust);
    };
    match method {
        AuthMethod::ScramSha256 => {
            if password.starts_with("SCRAM-SHA-256$") {
                ScramSecret::parse(password)
                    .map(ClientSecret::Scram)
                    .ok_or_else(|| invalid(format!("user {user:?} has a malformed SCRAM verifier")))
            } else if password.starts_with("md5") && password.len() == 35 {
                Err(invalid(format!("user {user:?} has an md5 hash but auth_method is scram-sha-256")))
            } else {
                Ok(ClientSecret::Scram(ScramSecret::from_password(password, &random_bytes(16), SCRAM_ITERATIONS)))
            }
        }
        AuthMethod::Md5 => {
            if password.starts_with("SCRAM-SHA-256$") {
                Err(invalid(format!("user {user:?} has a SCRAM verifier but auth_method is md5")))
            } else if password.starts_with("md5") && password.len() == 35 {
                Ok(ClientSecret::Md5(password.to_owned()))
            } else {
                Ok(ClientSecret::Md5(md5::stored_hash(user, password)))
            }
        }
    }
}

pub fn random_bytes(n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    rand::thread_rng().fill_bytes(&mut v);
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn origin_user_is_a_login_and_users_table_adds_more() {
        let mut config = Config::from_toml(
            "[users.alice]\npassword = \"pw\"\norigin_user = \"app\"\n[users.bob]\npassword = \"md5\"\n",
        )
        .unwrap();
        config.origin = Some("postgres://app:secret@h/db".into());
        let dir = UserDirectory::build(&config, &config.origin_url().unwrap()).await.unwrap();
        let app = dir.get("app").unwrap();
        assert!(matches!(app.secret, ClientSecret::Scram(_)));
        assert_eq!(app.origin_secret(None), Some(OriginSecret::Password("secret".into())));
        let alice = dir.get("alice").unwrap();
        assert_eq!(alice.origin_user, "app");
        assert_eq!(alice.origin_secret(None), Some(OriginSecret::Password("pw".into())));
        assert!(dir.get("carol").is_none());
        assert!(dir.lookup().is_none());
        assert_eq!(dir.decoy_for("carol"), dir.decoy_for("carol"));
        assert_ne!(dir.decoy_for("carol").salt, dir.decoy_for("dave").salt);
    }

    #[tokio::test]
    async fn a_copied_verifier_logs_in_to_the_origin_with_the_clients_own_keys() {
        let verifier = postgres_protocol::password::scram_sha_256(b"pw");
        let toml = format!(
            "[users.carol]\npassword = \"{verifier}\"\n\
             [users.dave]\npassword = \"{verifier}\"\norigin_user = \"app\"\n\
             [users.erin]\npassword = \"{verifier}\"\norigin_password = \"e\"\n"
        );
        let mut config = Config::from_toml(&toml).unwrap();
        config.origin = Some("postgres://app:secret@h/db".into());
        let dir = UserDirectory::build(&config, &config.origin_url().unwrap()).await.unwrap();
        let keys = ScramKeys { iterations: 4096, salt: vec![1], client_key: [1; 32], server_key: [2; 32] };
        let carol = dir.get("carol").unwrap();
        assert!(matches!(carol.origin_login, OriginLogin::ClientKeys));
        assert_eq!(carol.origin_secret(Some(keys.clone())), Some(OriginSecret::ScramKeys(keys)));
        assert_eq!(carol.origin_secret(None), None);
        // Mapped to the origin URL's role: its password; an origin_password always wins.
        assert_eq!(dir.get("dave").unwrap().origin_secret(None), Some(OriginSecret::Password("secret".into())));
        assert_eq!(dir.get("erin").unwrap().origin_secret(None), Some(OriginSecret::Password("e".into())));
    }

    #[tokio::test]
    async fn a_changed_origin_password_is_a_rotation_of_that_role_only() {
        let build = |origin: &str, toml: &str| {
            let mut config = Config::from_toml(toml).unwrap();
            config.origin = Some(origin.into());
            async move { UserDirectory::build(&config, &config.origin_url().unwrap()).await.unwrap() }
        };
        let users = "[users.alice]\npassword = \"a\"\norigin_user = \"app\"\n[users.bob]\npassword = \"b\"\n";
        let before = build("postgres://app:one@h/db", users).await;
        let password = |p: &str| OriginSecret::Password(p.into());

        // The origin URL's password. alice is mapped to app too, but logs in to the origin with
        // her own password ("a"), so only the origin URL's login moves.
        let after = build("postgres://app:two@h/db", users).await;
        assert_eq!(before.rotations(&after), vec![("app".to_owned(), password("one"), password("two"))]);

        // bob's plaintext password is also his origin password.
        let changed = build("postgres://app:one@h/db", &users.replace("\"b\"", "\"b2\"")).await;
        assert_eq!(before.rotations(&changed), vec![("bob".to_owned(), password("b"), password("b2"))]);

        assert!(before.rotations(&build("postgres://app:one@h/db", users).await).is_empty());
        // alice moves to a password of her own while the origin URL's login keeps "one": their
        // shared pool stays with "one", and alice's new password gets a pool of its own.
        let shared = "[users.alice]\npassword = \"a\"\norigin_user = \"app\"\norigin_password = \"one\"\n";
        let before_shared = build("postgres://app:one@h/db", shared).await;
        let split =
            build("postgres://app:one@h/db", &shared.replace("origin_password = \"one\"", "origin_password = \"x\""))
                .await;
        assert!(before_shared.rotations(&split).is_empty());
        // Another role for the origin URL is a new login, not a rotation.
        assert!(before.rotations(&build("postgres://other:two@h/db", users).await).is_empty());
    }

    #[tokio::test]
    async fn md5_method_uses_md5_hashes() {
        let mut config = Config { auth_method: AuthMethod::Md5, ..Config::default() };
        config.origin = Some("postgres://app:secret@h/db".into());
        let dir = UserDirectory::build(&config, &config.origin_url().unwrap()).await.unwrap();
        match &dir.get("app").unwrap().secret {
            ClientSecret::Md5(h) => assert_eq!(h, &md5::stored_hash("app", "secret")),
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn verifier_of_the_wrong_kind_is_a_config_error() {
        let mut config =
            Config::from_toml("auth_method = \"md5\"\n[users.x]\npassword = \"SCRAM-SHA-256$4096:c2FsdA==$a:b\"\n")
                .unwrap();
        config.origin = Some("postgres://app:secret@h/db".into());
        assert!(UserDirectory::build(&config, &config.origin_url().unwrap()).await.is_err());
    }
}
