//! The origin as a libpq-style URL: `postgres[ql]://user:password@host:port/database?params`.
//!
//! As in libpq, a host that is a path (`/var/run/postgresql`, written `%2Fvar%2Frun%2Fpostgresql`
//! in the host part, or given as `?host=/var/run/postgresql`) is the directory of the server's
//! Unix-domain socket, `.s.PGSQL.<port>`; and `host`, `port`, `user`, `password` and `dbname` may
//! come as query parameters, which win over the URL's own parts.

use std::fmt;

/// libpq's sslmode values. `prefer` is libpq's default.
/// Ordered from least to most demanding.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
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
    /// A host name or IP address, or (starting with `/`) the directory of a Unix-domain socket.
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
        // libpq takes `user@/db?host=...`; the url crate refuses an empty host after user info,
        // so a placeholder stands in for it while parsing.
        let hostless = hostless_at(raw);
        let url = match hostless {
            Some(at) => url::Url::parse(&format!("{}{HOST_PLACEHOLDER}{}", &raw[..=at], &raw[at + 1..])),
            None => url::Url::parse(raw),
        }
        .map_err(|e| format!("{e}"))?;
        if !matches!(url.scheme(), "postgres" | "postgresql") {
            return Err(format!("scheme must be postgres:// or postgresql://, not {}://", url.scheme()));
        }
        let decode = |s: &str| -> Result<String, String> {
            percent_decode(s).ok_or_else(|| "invalid percent-encoding".to_string())
        };
        let host = if hostless.is_some() { "" } else { url.host_str().unwrap_or_default() };
        let mut host = decode(host.trim_start_matches('[').trim_end_matches(']'))?;
        let mut port = url.port();
        let mut user = decode(url.username())?;
        let mut password = url.password().map(decode).transpose()?;
        let path = url.path().trim_start_matches('/');
        let mut database = (!path.is_empty()).then(|| decode(path)).transpose()?;
        let mut out = OriginUrl {
            host: String::new(),
            port: 5432,
            user: String::new(),
            password: None,
            database: String::new(),
            sslmode: SslMode::default(),
            sslrootcert: None,
            sslcert: None,
            sslkey: None,
            application_name: None,
        };
        // As libpq decodes them: `%XX` only (a `+` is a plus sign, as in base64 passwords).
        for pair in url.query().unwrap_or_default().split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').ok_or_else(|| format!("URL parameter {pair:?} has no value"))?;
            let (k, v) = (decode(k)?, decode(v)?);
            match k.as_str() {
                "host" => host = v,
                "port" => port = Some(v.parse().map_err(|_| format!("invalid port {v:?}"))?),
                "user" => user = v,
                "password" => password = Some(v),
                "dbname" => database = Some(v),
                "sslmode" => out.sslmode = SslMode::parse(&v)?,
                "sslrootcert" => out.sslrootcert = Some(v),
                "sslcert" => out.sslcert = Some(v),
                "sslkey" => out.sslkey = Some(v),
                "application_name" => out.application_name = Some(v),
                "connect_timeout" => {}
                other => return Err(format!("unsupported URL parameter {other:?}")),
            }
        }
        if host.is_empty() {
            return Err("the URL names no host".into());
        }
        if host.contains(',') {
            return Err("the URL names several hosts; pgwarp connects to one".into());
        }
        if user.is_empty() {
            return Err("the URL names no user".into());
        }
        out.database = database.filter(|d| !d.is_empty()).unwrap_or_else(|| user.clone());
        out.host = host;
        out.port = port.unwrap_or(5432);
        out.user = user;
        out.password = password;
        Ok(out)
    }

    /// Whether the host is the directory of the server's Unix-domain socket.
    pub fn is_unix_socket(&self) -> bool {
        unix_socket_path(&self.host, self.port).is_some()
    }
}

const HOST_PLACEHOLDER: &str = "pgwarp.invalid";

/// Where the `@` ending the user info is, when no host follows it (`postgres://u:p@/db`).
fn hostless_at(raw: &str) -> Option<usize> {
    let start = raw.find("://")? + 3;
    let len = raw[start..].find(['/', '?', '#']).unwrap_or(raw.len() - start);
    let authority = &raw[start..start + len];
    authority.ends_with('@').then(|| start + len - 1)
}

/// The Unix-domain socket a Postgres server listening on `port` makes in directory `host`, as
/// libpq finds it; `None` when `host` is a host name or address, not a path.
pub fn unix_socket_path(host: &str, port: u16) -> Option<std::path::PathBuf> {
    host.starts_with('/').then(|| std::path::Path::new(host).join(format!(".s.PGSQL.{port}")))
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
    // libpq refuses an encoded NUL too: no C string can hold it.
    String::from_utf8(out).ok().filter(|s| !s.contains('\0'))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

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
    fn a_path_as_host_is_a_unix_socket_directory() {
        let u = OriginUrl::parse("postgres://app:pw@%2Fvar%2Frun%2Fpostgresql:5433/appdb").unwrap();
        assert_eq!(u.host, "/var/run/postgresql");
        assert_eq!(unix_socket_path(&u.host, u.port).unwrap(), Path::new("/var/run/postgresql/.s.PGSQL.5433"));
        assert_eq!((u.user.as_str(), u.database.as_str()), ("app", "appdb"));

        let u = OriginUrl::parse("postgresql://app:pw@/appdb?host=/tmp/pg%20dir&port=6000").unwrap();
        assert_eq!(unix_socket_path(&u.host, u.port).unwrap(), Path::new("/tmp/pg dir/.s.PGSQL.6000"));
        assert_eq!(u.password.as_deref(), Some("pw"));

        assert!(!OriginUrl::parse("postgres://app@db:5433/x").unwrap().is_unix_socket());
    }

    #[test]
    fn query_parameters_win_over_the_url_parts() {
        let u = OriginUrl::parse("postgres://a:b@h1:1/d1?host=h2&port=2&user=u2&password=p%402&dbname=d2").unwrap();
        assert_eq!(
            (u.host.as_str(), u.port, u.user.as_str(), u.password.as_deref(), u.database.as_str()),
            ("h2", 2, "u2", Some("p@2"), "d2")
        );
        let u = OriginUrl::parse("postgresql:///?host=/sock&user=app").unwrap();
        assert_eq!((u.host.as_str(), u.database.as_str()), ("/sock", "app"));
        // libpq's decoding, not a web form's: a plus sign stays one.
        let u = OriginUrl::parse("postgres://app@h/db?password=ab+c/d%3D%3D&application_name=a+b").unwrap();
        assert_eq!((u.password.as_deref(), u.application_name.as_deref()), (Some("ab+c/d=="), Some("a+b")));
        assert!(OriginUrl::parse("postgres://app@h/db?password=a%00b").is_err(), "no NUL");
    }

    #[test]
    fn refuses_what_it_cannot_follow() {
        assert!(OriginUrl::parse("postgres://app@h1,h2/db").unwrap_err().contains("several hosts"));
        assert!(OriginUrl::parse("postgres://app@/db").unwrap_err().contains("no host"));
        assert!(OriginUrl::parse("postgres://app@h/db?port=x").unwrap_err().contains("port"));
    }

    #[test]
    fn debug_hides_password() {
        let u = OriginUrl::parse("postgres://app:secret@h/db").unwrap();
        assert!(!format!("{u:?}").contains("secret"));
    }
}
