//! Who may log in to pgwarp, how their password is checked, and which origin role their work
//! runs as. Built once at start-up; deriving SCRAM verifiers from plaintext passwords (PBKDF2)
//! runs on a blocking thread.

use std::collections::HashMap;
use std::sync::Arc;

use rand::RngCore;

use crate::config::{AuthMethod, Config, ConfigError, OriginUrl};
use crate::protocol::md5;
use crate::protocol::scram::ScramSecret;

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

#[derive(Clone, Debug)]
pub struct UserEntry {
    pub secret: ClientSecret,
    pub origin_user: String,
    pub origin_password: Option<String>,
}

#[derive(Debug)]
pub struct UserDirectory {
    users: HashMap<String, Arc<UserEntry>>,
    /// A verifier that matches no password, so unknown users go through the same exchange.
    decoy: ScramSecret,
}

impl UserDirectory {
    pub async fn build(config: &Config, origin: &OriginUrl) -> Result<UserDirectory, ConfigError> {
        let method = config.auth_method;
        let mut plan: Vec<(String, Option<String>, UserEntryTemplate)> = Vec::new();
        plan.push((
            origin.user.clone(),
            origin.password.clone(),
            UserEntryTemplate { origin_user: origin.user.clone(), origin_password: origin.password.clone() },
        ));
        for (name, u) in &config.users {
            let plaintext = !u.password.starts_with("SCRAM-SHA-256$") && !u.password.starts_with("md5");
            let origin_password = u
                .origin_password
                .clone()
                .or_else(|| plaintext.then(|| u.password.clone()))
                .or_else(|| origin.password.clone());
            plan.push((
                name.clone(),
                Some(u.password.clone()),
                UserEntryTemplate {
                    origin_user: u.origin_user.clone().unwrap_or_else(|| name.clone()),
                    origin_password,
                },
            ));
        }
        let built = tokio::task::spawn_blocking(move || {
            plan.into_iter()
                .map(|(name, password, t)| {
                    let secret = client_secret(method, &name, password.as_deref())?;
                    Ok((
                        name,
                        Arc::new(UserEntry { secret, origin_user: t.origin_user, origin_password: t.origin_password }),
                    ))
                })
                .collect::<Result<HashMap<_, _>, ConfigError>>()
        })
        .await
        .map_err(|e| ConfigError::Invalid { key: "users", message: e.to_string() })??;
        let decoy = ScramSecret {
            iterations: SCRAM_ITERATIONS,
            salt: random_bytes(16),
            stored_key: [0; 32],
            server_key: [0; 32],
        };
        Ok(UserDirectory { users: built, decoy })
    }

    pub fn get(&self, name: &str) -> Option<Arc<UserEntry>> {
        self.users.get(name).cloned()
    }

    pub fn decoy(&self) -> &ScramSecret {
        &self.decoy
    }
}

struct UserEntryTemplate {
    origin_user: String,
    origin_password: Option<String>,
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
        assert_eq!(app.origin_password.as_deref(), Some("secret"));
        let alice = dir.get("alice").unwrap();
        assert_eq!((alice.origin_user.as_str(), alice.origin_password.as_deref()), ("app", Some("pw")));
        assert!(dir.get("carol").is_none());
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
