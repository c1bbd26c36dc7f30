//! The origin as a libpq-style URL: `postgres[ql]://user:password@host:port/database?params`.

use std::fmt;

/// libpq's sslmode values. `prefer` is libpq's default.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SslMode {
    Disable,
    Allow,
    #[default]
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl SslMode {
    pub fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Allow => "allow",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }

    fn parse(s: &str) -> Result<SslMode, String> {
        Ok(match s {
            "disable" => SslMode::Disable,
            "allow" => SslMode::Allow,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            other => return Err(format!("unknown sslmode {other:?}")),
        })
    }
}

#[derive(Clone, PartialEq, Eq)]
pub struct OriginUrl {
    pub host: String,
    pub port: u16,
    pub user: String,
    pub password: Option<String>,
    pub database: String,
    pub sslmode: SslMode,
    pub sslrootcert: Option<String>,
    pub sslcert: Option<String>,
    pub sslkey: Option<String>,
    pub application_name: Option<String>,
}

/// Never print the password.
impl fmt::Debug for OriginUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "postgres://{}@{}:{}/{}", self.user, self.host, self.port, self.database)
    }
}

impl OriginUrl {
    pub fn parse(raw: &str) -> Result<OriginUrl, String> {
        let url = url::Url::parse(raw).map_err(|e| format!("{e}"))?;
        if !matches!(url.scheme(), "postgres" | "postgresql") {
            return Err(format!("scheme must be postgres:// or postgresql://, not {}://", url.scheme()));
        }
        let decode = |s: &str| -> Result<String, String> {
            percent_decode(s).ok_or_else(|| "invalid percent-encoding".to_string())
        };
        let host = url.host_str().filter(|h| !h.is_empty()).ok_or("the URL names no host")?;
        let host = host.trim_start_matches('[').trim_end_matches(']').to_owned();
        let user = decode(url.username())?;
        if user.is_empty() {
            return Err("the URL names no user".into());
        }
        let password = url.password().map(decode).transpose()?;
        let path = url.path().trim_start_matches('/');
        let database = if path.is_empty() { user.clone() } else { decode(path)? };
        let mut out = OriginUrl {
            host,
            port: url.port().unwrap_or(5432),
            user,
            password,
            database,
            sslmode: SslMode::default(),
            sslrootcert: None,
            sslcert: None,
            sslkey: None,
            application_name: None,
        };
        for (k, v) in url.query_pairs() {
            match &*k {
                "sslmode" => out.sslmode = SslMode::parse(&v)?,
                "sslrootcert" => out.sslrootcert = Some(v.into_owned()),
                "sslcert" => out.sslcert = Some(v.into_owned()),
                "sslkey" => out.sslkey = Some(v.into_owned()),
                "application_name" => out.application_name = Some(v.into_owned()),
                "connect_timeout" => {}
                other => return Err(format!("unsupported URL parameter {other:?}")),
            }
        }
        Ok(out)
    }
}

fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = s.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_full_url() {
        let u = OriginUrl::parse("postgres://app:p%40ss@db.internal:6543/appdb?sslmode=require").unwrap();
        assert_eq!(u.host, "db.internal");
        assert_eq!(u.port, 6543);
        assert_eq!(u.user, "app");
        assert_eq!(u.password.as_deref(), Some("p@ss"));
        assert_eq!(u.database, "appdb");
        assert_eq!(u.sslmode, SslMode::Require);
    }

    #[test]
    fn defaults_port_and_database() {
        let u = OriginUrl::parse("postgresql://app@127.0.0.1").unwrap();
        assert_eq!((u.port, u.database.as_str(), u.password), (5432, "app", None));
    }

    #[test]
    fn refuses_bad_urls() {
        assert!(OriginUrl::parse("mysql://a@b/c").is_err());
        assert!(OriginUrl::parse("postgres://h/db").is_err());
        assert!(OriginUrl::parse("postgres://u@h/db?sslmode=maybe").is_err());
        assert!(OriginUrl::parse("postgres://u@h/db?bogus=1").is_err());
    }

    #[test]
    fn debug_hides_password() {
        let u = OriginUrl::parse("postgres://app:secret@h/db").unwrap();
        assert!(!format!("{u:?}").contains("secret"));
    }
}
