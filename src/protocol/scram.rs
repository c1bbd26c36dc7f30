//! SCRAM-SHA-256 (RFC 5802/7677), the server side: checking a client's proof against a stored
//! verifier. The client side (pgwarp logging in to the origin) uses `postgres-protocol` with a
//! password, or `scram_client` with the keys a client's proof revealed here.
//!
//! Deriving a verifier from a password (PBKDF2) is deliberately slow; callers run
//! `ScramSecret::from_password` on a blocking thread. Checking a proof is a few HMACs.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

type HmacSha256 = Hmac<Sha256>;

/// A stored SCRAM verifier, as in `pg_authid.rolpassword`:
/// `SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScramSecret {
    pub iterations: u32,
    pub salt: Vec<u8>,
    pub stored_key: [u8; 32],
    pub server_key: [u8; 32],
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ScramError {
    #[error("malformed SCRAM message: {0}")]
    Malformed(&'static str),
    #[error("channel binding is not supported on this connection")]
    ChannelBinding,
    #[error("SCRAM nonce mismatch")]
    Nonce,
    #[error("password authentication failed")]
    BadProof,
}

impl ScramSecret {
    pub fn parse(s: &str) -> Option<ScramSecret> {
        let rest = s.strip_prefix("SCRAM-SHA-256$")?;
        let (iter_salt, keys) = rest.split_once('$')?;
        let (iterations, salt) = iter_salt.split_once(':')?;
        let (stored, server) = keys.split_once(':')?;
        Some(ScramSecret {
            iterations: iterations.parse().ok()?,
            salt: B64.decode(salt).ok()?,
            stored_key: B64.decode(stored).ok()?.try_into().ok()?,
            server_key: B64.decode(server).ok()?.try_into().ok()?,
        })
    }

    /// Derives a verifier from a plaintext password. Slow on purpose: call off the async workers.
    pub fn from_password(password: &str, salt: &[u8], iterations: u32) -> ScramSecret {
        let salted = hi(password.as_bytes(), salt, iterations);
        let client_key = hmac(&salted, b"Client Key");
        let stored_key: [u8; 32] = Sha256::digest(client_key).into();
        let server_key = hmac(&salted, b"Server Key");
        ScramSecret { iterations, salt: salt.to_vec(), stored_key, server_key }
    }
}

fn hmac(key: &[u8], data: &[u8]) -> [u8; 32] {
    // HMAC accepts keys of any length, so this cannot fail.
    let mut mac = <HmacSha256 as Mac>::new_from_slice(key).unwrap_or_else(|_| unreachable!());
    mac.update(data);
    mac.finalize().into_bytes().into()
}

/// PBKDF2-HMAC-SHA-256 with one output block: the SCRAM `Hi` function.
fn hi(password: &[u8], salt: &[u8], iterations: u32) -> [u8; 32] {
    let mut block = salt.to_vec();
    block.extend_from_slice(&1u32.to_be_bytes());
    let mut u = hmac(password, &block);
    let mut out = u;
    for _ in 1..iterations {
        u = hmac(password, &u);
        for (o, x) in out.iter_mut().zip(u.iter()) {
            *o ^= x;
        }
    }
    out
}

/// What logging in with SCRAM takes, short of the password: the keys a client's proof reveals to
/// a server holding the verifier, and the salt and iteration count they belong to. pgwarp logs
/// in to the origin as that client with them (pass-through, as PgBouncer does). Secret: Debug
/// shows none of it.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct ScramKeys {
    pub iterations: u32,
    pub salt: Vec<u8>,
    pub client_key: [u8; 32],
    pub server_key: [u8; 32],
}

impl std::fmt::Debug for ScramKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ScramKeys(..)")
    }
}

pub(crate) fn hmac_sha256(key: &[u8], data: &[u8]) -> [u8; 32] {
    hmac(key, data)
}

/// Compares two byte strings in time that depends only on their lengths.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// One SCRAM exchange with a client, after the server has chosen its nonce.
pub struct ScramExchange {
    secret: ScramSecret,
    server_nonce: String,
    client_first_bare: String,
    server_first: String,
    full_nonce: String,
    gs2_header: String,
}

impl ScramExchange {
    /// Handles the client-first-message; returns the exchange and the server-first-message.
    pub fn start(
        secret: ScramSecret,
        server_nonce: String,
        client_first: &[u8],
    ) -> Result<(ScramExchange, String), ScramError> {
        let text = std::str::from_utf8(client_first).map_err(|_| ScramError::Malformed("not UTF-8"))?;
        // gs2-header: cbind-flag "," [authzid] ","
        let (flag, rest) = text.split_once(',').ok_or(ScramError::Malformed("no gs2 header"))?;
        match flag {
            "n" | "y" => {}
            f if f.starts_with("p=") => return Err(ScramError::ChannelBinding),
            _ => return Err(ScramError::Malformed("bad channel binding flag")),
        }
        let (authzid, bare) = rest.split_once(',').ok_or(ScramError::Malformed("no gs2 header"))?;
        if !authzid.is_empty() {
            return Err(ScramError::Malformed("authzid is not supported"));
        }
        let gs2_header = format!("{flag},{authzid},");
        // client-first-bare: n=<user>,r=<nonce>[,extensions]; Postgres ignores the user name here.
        let client_nonce = bare
            .split(',')
            .find_map(|attr| attr.strip_prefix("r="))
            .filter(|n| !n.is_empty())
            .ok_or(ScramError::Malformed("no client nonce"))?;
        let full_nonce = format!("{client_nonce}{server_nonce}");
        let server_first = format!("r={full_nonce},s={},i={}", B64.encode(&secret.salt), secret.iterations);
        Ok((
            ScramExchange {
                secret,
                server_nonce,
                client_first_bare: bare.to_owned(),
                server_first: server_first.clone(),
                full_nonce,
                gs2_header,
            },
            server_first,
        ))
    }

    /// Checks the client-final-message; on success returns the server-final-message and the
    /// client's keys (its ClientKey, recovered from the proof, is what logging in again takes).
    pub fn finish(self, client_final: &[u8]) -> Result<(String, ScramKeys), ScramError> {
        let text = std::str::from_utf8(client_final).map_err(|_| ScramError::Malformed("not UTF-8"))?;
        let (without_proof, proof_b64) = text.rsplit_once(",p=").ok_or(ScramError::Malformed("no proof"))?;
        let mut channel_binding = None;
        let mut nonce = None;
        for attr in without_proof.split(',') {
            if let Some(v) = attr.strip_prefix("c=") {
                channel_binding = Some(v);
            } else if let Some(v) = attr.strip_prefix("r=") {
                nonce = Some(v);
            }
        }
        let expected_cb = B64.encode(self.gs2_header.as_bytes());
        if channel_binding != Some(expected_cb.as_str()) {
            return Err(ScramError::ChannelBinding);
        }
        let nonce = nonce.ok_or(ScramError::Malformed("no nonce"))?;
        if nonce != self.full_nonce || !nonce.ends_with(&self.server_nonce) {
            return Err(ScramError::Nonce);
        }
        let proof = B64.decode(proof_b64).map_err(|_| ScramError::Malformed("proof is not base64"))?;
        if proof.len() != 32 {
            return Err(ScramError::Malformed("proof is not 32 bytes"));
        }
        let auth_message = format!("{},{},{}", self.client_first_bare, self.server_first, without_proof);
        let client_signature = hmac(&self.secret.stored_key, auth_message.as_bytes());
        let mut client_key = [0u8; 32];
        for i in 0..32 {
            client_key[i] = proof[i] ^ client_signature[i];
        }
        let computed: [u8; 32] = Sha256::digest(client_key).into();
        if !constant_time_eq(&computed, &self.secret.stored_key) {
            return Err(ScramError::BadProof);
        }
        let server_signature = hmac(&self.secret.server_key, auth_message.as_bytes());
        let keys = ScramKeys {
            iterations: self.secret.iterations,
            salt: self.secret.salt,
            client_key,
            server_key: self.secret.server_key,
        };
        Ok((format!("v={}", B64.encode(server_signature)), keys))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};

    /// Runs a full exchange against postgres-protocol's client, the one tokio-postgres uses.
    fn exchange(client_password: &str, server_password: &str) -> Result<(), ScramError> {
        let secret = ScramSecret::from_password(server_password, b"0123456789abcdef", 4096);
        let mut client = ScramSha256::new(client_password.as_bytes(), ChannelBinding::unsupported());
        let (ex, server_first) = ScramExchange::start(secret, "servernonce".into(), client.message())?;
        client.update(server_first.as_bytes()).unwrap();
        let (server_final, _) = ex.finish(client.message())?;
        client.finish(server_final.as_bytes()).map_err(|_| ScramError::BadProof)
    }

    #[test]
    fn real_client_authenticates_with_right_password() {
        exchange("s3cret", "s3cret").unwrap();
    }

    #[test]
    fn wrong_password_is_refused() {
        assert_eq!(exchange("wrong", "s3cret"), Err(ScramError::BadProof));
    }

    #[test]
    fn parses_postgres_verifier_and_matches_derivation() {
        let verifier = postgres_protocol::password::scram_sha_256(b"pw");
        let parsed = ScramSecret::parse(&verifier).unwrap();
        let derived = ScramSecret::from_password("pw", &parsed.salt, parsed.iterations);
        assert_eq!(parsed, derived);
        assert!(ScramSecret::parse("md5abc").is_none());
        assert!(ScramSecret::parse("SCRAM-SHA-256$x:y$z").is_none());
    }

    #[test]
    fn channel_binding_request_is_refused() {
        let secret = ScramSecret::from_password("pw", b"salt", 16);
        let r = ScramExchange::start(secret, "n".into(), b"p=tls-server-end-point,,n=,r=abc");
        assert!(matches!(r, Err(ScramError::ChannelBinding)));
    }

    #[test]
    fn malformed_messages_are_refused() {
        let secret = ScramSecret::from_password("pw", b"salt", 16);
        assert!(ScramExchange::start(secret.clone(), "n".into(), b"garbage").is_err());
        assert!(ScramExchange::start(secret.clone(), "n".into(), b"n,,n=,r=").is_err());
        let (ex, _) = ScramExchange::start(secret, "n".into(), b"n,,n=,r=abc").unwrap();
        assert!(ex.finish(b"c=biws,r=abcn").is_err());
    }
}
