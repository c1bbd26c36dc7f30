//! SCRAM-SHA-256, the client side, logging in with keys instead of a password: pgwarp logging
//! in to the origin as a client whose proof it checked against the role's own verifier
//! (`ScramKeys`). The proof needs only the ClientKey, and the server's signature only the
//! ServerKey, so no password is ever needed. The keys fit only the verifier they came from: if
//! the origin answers with another salt, the role's password has changed since.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use sha2::{Digest, Sha256};

use super::scram::{constant_time_eq, hmac_sha256, ScramKeys};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ScramClientError {
    #[error("malformed SCRAM message from the server: {0}")]
    Malformed(&'static str),
    #[error("the server's SCRAM nonce does not extend ours")]
    Nonce,
    #[error("the server's salt or iteration count is not the verifier's the client was checked against (was the password changed?)")]
    OtherVerifier,
    #[error("the server's SCRAM signature is wrong")]
    BadServerSignature,
    #[error("the server refused the SCRAM exchange: {0}")]
    Refused(String),
}

/// One exchange, from the client-first-message on.
pub struct KeyedScramClient {
    keys: ScramKeys,
    nonce: String,
    /// Set once the server-first-message is answered: what the server's signature covers.
    auth_message: Option<String>,
}

/// The GS2 header for "no channel binding", and its base64 for the `c=` attribute.
const GS2_HEADER: &str = "n,,";
const GS2_HEADER_B64: &str = "biws";

impl KeyedScramClient {
    /// Starts an exchange; returns it and the client-first-message. Postgres takes the user
    /// name from the startup packet, so the message names none (as libpq's does).
    pub fn start(keys: ScramKeys, nonce: String) -> (KeyedScramClient, String) {
        let first = format!("{GS2_HEADER}n=,r={nonce}");
        (KeyedScramClient { keys, nonce, auth_message: None }, first)
    }

    /// Answers the server-first-message with the client-final-message.
    pub fn answer(&mut self, server_first: &[u8]) -> Result<String, ScramClientError> {
        let text = std::str::from_utf8(server_first).map_err(|_| ScramClientError::Malformed("not UTF-8"))?;
        let (mut full_nonce, mut salt, mut iterations) = (None, None, None);
        for attr in text.split(',') {
            if let Some(v) = attr.strip_prefix("r=") {
                full_nonce = Some(v);
            } else if let Some(v) = attr.strip_prefix("s=") {
                salt = Some(v);
            } else if let Some(v) = attr.strip_prefix("i=") {
                iterations = Some(v);
            }
        }
        let full_nonce = full_nonce.ok_or(ScramClientError::Malformed("no nonce"))?;
        if full_nonce.len() <= self.nonce.len() || !full_nonce.starts_with(&self.nonce) {
            return Err(ScramClientError::Nonce);
        }
        let salt = B64
            .decode(salt.ok_or(ScramClientError::Malformed("no salt"))?)
            .map_err(|_| ScramClientError::Malformed("salt is not base64"))?;
        let iterations: u32 = iterations
            .ok_or(ScramClientError::Malformed("no iteration count"))?
            .parse()
            .map_err(|_| ScramClientError::Malformed("iteration count is not a number"))?;
        if salt != self.keys.salt || iterations != self.keys.iterations {
            return Err(ScramClientError::OtherVerifier);
        }
        let without_proof = format!("c={GS2_HEADER_B64},r={full_nonce}");
        let auth_message = format!("n=,r={},{text},{without_proof}", self.nonce);
        let stored_key: [u8; 32] = Sha256::digest(self.keys.client_key).into();
        let signature = hmac_sha256(&stored_key, auth_message.as_bytes());
        let proof: Vec<u8> = self.keys.client_key.iter().zip(signature).map(|(k, s)| k ^ s).collect();
        self.auth_message = Some(auth_message);
        Ok(format!("{without_proof},p={}", B64.encode(proof)))
    }

    /// Checks the server-final-message: the server, too, must prove it holds the verifier.
    pub fn finish(&self, server_final: &[u8]) -> Result<(), ScramClientError> {
        let text = std::str::from_utf8(server_final).map_err(|_| ScramClientError::Malformed("not UTF-8"))?;
        if let Some(e) = text.strip_prefix("e=") {
            return Err(ScramClientError::Refused(e.chars().take(200).collect()));
        }
        let auth_message = self.auth_message.as_ref().ok_or(ScramClientError::Malformed("final before first"))?;
        let v = text.strip_prefix("v=").ok_or(ScramClientError::Malformed("no server signature"))?;
        let v = B64.decode(v).map_err(|_| ScramClientError::Malformed("server signature is not base64"))?;
        let expected = hmac_sha256(&self.keys.server_key, auth_message.as_bytes());
        if constant_time_eq(&v, &expected) {
            Ok(())
        } else {
            Err(ScramClientError::BadServerSignature)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::scram::{ScramError, ScramExchange, ScramSecret};
    use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};

    /// The keys a client with `password` reveals to a server holding `secret`.
    fn keys_from_a_login(secret: &ScramSecret, password: &str) -> ScramKeys {
        let mut client = ScramSha256::new(password.as_bytes(), ChannelBinding::unsupported());
        let (ex, server_first) = ScramExchange::start(secret.clone(), "srv1".into(), client.message()).unwrap();
        client.update(server_first.as_bytes()).unwrap();
        let (_, keys) = ex.finish(client.message()).unwrap();
        keys
    }

    /// Logs in with `keys` to a server holding `secret`.
    fn log_in(keys: ScramKeys, secret: &ScramSecret) -> Result<(), String> {
        let (mut client, first) = KeyedScramClient::start(keys, "cli2".into());
        let (ex, server_first) =
            ScramExchange::start(secret.clone(), "srv2".into(), first.as_bytes()).map_err(|e| e.to_string())?;
        let last = client.answer(server_first.as_bytes()).map_err(|e| e.to_string())?;
        let (server_final, _) = ex.finish(last.as_bytes()).map_err(|e| e.to_string())?;
        client.finish(server_final.as_bytes()).map_err(|e| e.to_string())
    }

    #[test]
    fn keys_from_one_login_make_the_next_without_the_password() {
        let secret = ScramSecret::from_password("s3cret", b"0123456789abcdef", 4096);
        let keys = keys_from_a_login(&secret, "s3cret");
        assert_eq!(keys.server_key, secret.server_key);
        log_in(keys.clone(), &secret).unwrap();
        // A server holding another verifier of the same password (new salt) cannot be answered.
        let renewed = ScramSecret::from_password("s3cret", b"fedcba9876543210", 4096);
        assert!(log_in(keys, &renewed).unwrap_err().contains("password changed"));
    }

    #[test]
    fn wrong_keys_fail_the_servers_check() {
        let secret = ScramSecret::from_password("s3cret", b"0123456789abcdef", 4096);
        let mut keys = keys_from_a_login(&secret, "s3cret");
        keys.client_key[0] ^= 1;
        assert_eq!(log_in(keys, &secret).unwrap_err(), ScramError::BadProof.to_string());
    }

    #[test]
    fn an_impostor_server_is_caught() {
        let secret = ScramSecret::from_password("s3cret", b"0123456789abcdef", 4096);
        let keys = keys_from_a_login(&secret, "s3cret");
        let (mut client, _) = KeyedScramClient::start(keys, "cli".into());
        client.answer(b"r=clisrv,s=MDEyMzQ1Njc4OWFiY2RlZg==,i=4096").unwrap();
        assert_eq!(client.finish(b"v=AAAA"), Err(ScramClientError::BadServerSignature));
        assert!(matches!(client.finish(b"e=invalid-proof"), Err(ScramClientError::Refused(_))));
        assert_eq!(client.answer(b"r=other,s=MDEy,i=4096"), Err(ScramClientError::Nonce));
        assert_eq!(client.answer(b"r=cli,s=MDEy,i=4096"), Err(ScramClientError::Nonce));
        assert!(matches!(client.answer(b"r=clix,i=4096"), Err(ScramClientError::Malformed(_))));
    }
}
