//! The service-token check on a tunnel's upgrade requests.
//!
//! A caller proves it may reach the database by sending the token's id and secret in the
//! `CF-Access-Client-Id` and `CF-Access-Client-Secret` headers. Both are checked on every request,
//! in time that does not depend on where a wrong value differs from the right one: each value is
//! hashed with SHA-256 and the digests are compared without an early exit, and the id is checked
//! even when the secret is missing or wrong (and the other way round). Only the digests of the
//! expected values are kept.

use http::HeaderMap;
use sha2::{Digest, Sha256};

use crate::transport::websocket::{ACCESS_CLIENT_ID_HEADER, ACCESS_CLIENT_SECRET_HEADER};

type Sha256Digest = [u8; 32];

/// The token a caller must present.
pub(crate) struct ServiceToken {
    id: Sha256Digest,
    secret: Sha256Digest,
}

impl ServiceToken {
    pub(crate) fn new(client_id: &str, client_secret: &str) -> ServiceToken {
        ServiceToken { id: sha256(client_id.as_bytes()), secret: sha256(client_secret.as_bytes()) }
    }

    /// True when `headers` carry this token's id and secret.
    pub(crate) fn admits(&self, headers: &HeaderMap) -> bool {
        // A missing header is checked as an empty value, which never matches (the tunnel refuses
        // to start with an empty id or secret), so it costs the same as a wrong one.
        let presented = |name: &str| headers.get(name).map(|value| value.as_bytes()).unwrap_or_default();
        let id_ok = digests_equal(&sha256(presented(ACCESS_CLIENT_ID_HEADER)), &self.id);
        let secret_ok = digests_equal(&sha256(presented(ACCESS_CLIENT_SECRET_HEADER)), &self.secret);
        // `&`, not `&&`: both comparisons always run.
        id_ok & secret_ok
    }
}

fn sha256(bytes: &[u8]) -> Sha256Digest {
    Sha256::digest(bytes).into()
}

/// Compares two digests, looking at every byte whatever the first difference.
fn digests_equal(a: &Sha256Digest, b: &Sha256Digest) -> bool {
    let difference = a.iter().zip(b.iter()).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(difference) == 0
}

#[cfg(test)]
mod tests {
    use http::HeaderValue;

    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.insert(*name, HeaderValue::from_str(value).expect("header value"));
        }
        map
    }

    fn token() -> ServiceToken {
        ServiceToken::new("app.access", "s3cret-value")
    }

    #[test]
    fn right_id_and_secret_are_admitted() {
        let request =
            headers(&[(ACCESS_CLIENT_ID_HEADER, "app.access"), (ACCESS_CLIENT_SECRET_HEADER, "s3cret-value")]);
        assert!(token().admits(&request));
    }

    #[test]
    fn header_names_match_in_any_case() {
        let request = headers(&[("cf-access-client-id", "app.access"), ("CF-ACCESS-CLIENT-SECRET", "s3cret-value")]);
        assert!(token().admits(&request));
    }

    #[test]
    fn wrong_secret_is_refused() {
        let request =
            headers(&[(ACCESS_CLIENT_ID_HEADER, "app.access"), (ACCESS_CLIENT_SECRET_HEADER, "s3cret-valuE")]);
        assert!(!token().admits(&request));
    }

    #[test]
    fn wrong_id_with_right_secret_is_refused() {
        let request = headers(&[(ACCESS_CLIENT_ID_HEADER, "other"), (ACCESS_CLIENT_SECRET_HEADER, "s3cret-value")]);
        assert!(!token().admits(&request));
    }

    #[test]
    fn prefix_or_extension_of_the_secret_is_refused() {
        for secret in ["s3cret", "s3cret-value ", "s3cret-value-and-more", ""] {
            let request = headers(&[(ACCESS_CLIENT_ID_HEADER, "app.access"), (ACCESS_CLIENT_SECRET_HEADER, secret)]);
            assert!(!token().admits(&request), "{secret:?} was admitted");
        }
    }

    #[test]
    fn missing_headers_are_refused() {
        assert!(!token().admits(&HeaderMap::new()));
        assert!(!token().admits(&headers(&[(ACCESS_CLIENT_ID_HEADER, "app.access")])));
        assert!(!token().admits(&headers(&[(ACCESS_CLIENT_SECRET_HEADER, "s3cret-value")])));
    }

    #[test]
    fn digest_comparison_sees_every_byte() {
        let a = sha256(b"x");
        for i in 0..a.len() {
            let mut b = a;
            b[i] ^= 0x80;
            assert!(!digests_equal(&a, &b), "difference at byte {i} missed");
        }
        assert!(digests_equal(&a, &sha256(b"x")));
    }
}
