//! MD5 password authentication, server side: `md5(md5(password || user) || salt)`.

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

/// Checks a client's PasswordMessage answer against the stored hash and the salt we sent.
pub fn verify(stored: &str, salt: [u8; 4], answer: &str) -> bool {
    let Some(inner) = stored.strip_prefix("md5") else {
        return false;
    };
    let expected = format!("md5{}", hex_md5(&[inner.as_bytes(), &salt]));
    constant_time_eq(expected.as_bytes(), answer.as_bytes())
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
    }
}
