//! MD5 password authentication: `md5(md5(password || user) || salt)`. The server side checks a
//! client's answer; the client side can answer from the stored hash alone, which is how pgwarp
//! logs in to the origin as a user whose md5 hash it holds (pass-through).

use md5::{Digest, Md5};

use super::scram::constant_time_eq;

fn hex_md5(parts: &[&[u8]]) -> String {
    let mut h = Md5::new();
    for p in parts {
        h.update(p);
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// The stored form, as in `pg_authid`: `md5` followed by `md5(password || user)` in hex.
pub fn stored_hash(user: &str, password: &str) -> String {
    format!("md5{}", hex_md5(&[password.as_bytes(), user.as_bytes()]))
}

/// The answer to a server's md5 challenge with `salt`, from the stored hash; None if `stored`
/// is not an md5 hash.
pub fn answer(stored: &str, salt: [u8; 4]) -> Option<String> {
    let inner = stored.strip_prefix("md5").filter(|h| h.len() == 32)?;
    Some(format!("md5{}", hex_md5(&[inner.as_bytes(), &salt])))
}

/// Checks a client's PasswordMessage answer against the stored hash and the salt we sent.
pub fn verify(stored: &str, salt: [u8; 4], answer: &str) -> bool {
    match self::answer(stored, salt) {
        Some(expected) => constant_time_eq(expected.as_bytes(), answer.as_bytes()),
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_the_client_side_computation() {
        let salt = [1, 2, 3, 4];
        let answer = postgres_protocol::authentication::md5_hash(b"alice", b"pw", salt);
        assert!(verify(&stored_hash("alice", "pw"), salt, &answer));
        assert!(!verify(&stored_hash("alice", "other"), salt, &answer));
        assert!(!verify("plain", salt, &answer));
        assert_eq!(super::answer(&stored_hash("alice", "pw"), salt), Some(answer));
    }
}
