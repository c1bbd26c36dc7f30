//! The origin as a libpq-style URL: `postgres[ql]://user:password@host:port/database?params`.
//!
//! As in libpq, a host that is a path (`/var/run/postgresql`, written `%2Fvar%2Frun%2Fpostgresql`
//! in the host part, or given as `?host=/var/run/postgresql`) is the directory of the server's
//! Unix-domain socket, `.s.PGSQL.<port>`; and `host`, `port`, `user`, `password` and `dbname` may
//! come as query parameters, which win over the URL's own parts.
//!
//! Several hosts may be named, as libpq takes them (`postgres://u@h1:5432,h2:5433/db`, or
//! `?host=h1,h2&port=5432`), with `target_session_attrs` saying which of them a connection may
//! use (see `origin::hosts`).

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

/// libpq's `target_session_attrs`: what a server must be for a connection to it to be kept.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SessionAttrs {
    #[default]
    Any,
    /// Takes read-write transactions by default: not a standby, and not
    /// `default_transaction_read_only`.
    ReadWrite,
    ReadOnly,
    /// Not in recovery (not a hot standby).
    Primary,
    Standby,
    /// A standby if any host is one, else any host.
    PreferStandby,
}

impl SessionAttrs {
    pub fn as_str(self) -> &'static str {
        match self {
            SessionAttrs::Any => "any",
            SessionAttrs::ReadWrite => "read-write",
            SessionAttrs::ReadOnly => "read-only",
            SessionAttrs::Primary => "primary",
            SessionAttrs::Standby => "standby",
            SessionAttrs::PreferStandby => "prefer-standby",
        }
    }

    fn parse(s: &str) -> Result<SessionAttrs, String> {
        [
            SessionAttrs::Any,
            SessionAttrs::ReadWrite,
            SessionAttrs::ReadOnly,
            SessionAttrs::Primary,
            SessionAttrs::Standby,
            SessionAttrs::PreferStandby,
        ]
        .into_iter()
        .find(|a| a.as_str() == s)
        .ok_or_else(|| format!("unknown target_session_attrs {s:?}"))
    }
}

#[derive(Clone, PartialEq, Eq)]
pub struct OriginUrl {
    /// A host name or IP address, or (starting with `/`) the directory of a Unix-domain socket.
    /// The first of the URL's hosts.
    pub host: String,
    pub port: u16,
    /// The URL's other hosts, with their ports, in the URL's order.
    pub more_hosts: Vec<(String, u16)>,
    pub target_session_attrs: SessionAttrs,
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
        write!(f, "postgres://{}@{}:{}", self.user, self.host, self.port)?;
        for (host, port) in &self.more_hosts {
            match host.contains(':') {
                true => write!(f, ",[{host}]:{port}")?,
                false => write!(f, ",{host}:{port}")?,
            }
        }
        write!(f, "/{}", self.database)?;
        if self.target_session_attrs != SessionAttrs::Any {
            write!(f, "?target_session_attrs={}", self.target_session_attrs.as_str())?;
        }
        Ok(())
    }
}

impl OriginUrl {
    pub fn parse(raw: &str) -> Result<OriginUrl, String> {
        // libpq takes `user@/db?host=...`; the url crate refuses an empty host after user info,
        // and a list of hosts, so a placeholder stands in for them while parsing.
        let (start, end) = hosts_span(raw);
        let listed = &raw[start..end];
        let hostless = raw.contains("://") && (listed.is_empty() || listed.contains(','));
        let url = if hostless {
            url::Url::parse(&format!("{}{HOST_PLACEHOLDER}{}", &raw[..start], &raw[end..]))
        } else {
            url::Url::parse(raw)
        }
        .map_err(|e| format!("{e}"))?;
        if !matches!(url.scheme(), "postgres" | "postgresql") {
            return Err(format!("scheme must be postgres:// or postgresql://, not {}://", url.scheme()));
        }
        let decode = |s: &str| -> Result<String, String> {
            percent_decode(s).ok_or_else(|| "invalid percent-encoding".to_string())
        };
        // As libpq: a list of hosts and a list of ports (None: the default), each of which a
        // parameter may replace; a port written after a host in the URL goes in the port list.
        let written: Vec<(String, Option<u16>)> = if !hostless {
            let host = url.host_str().unwrap_or_default();
            vec![(decode(host.trim_start_matches('[').trim_end_matches(']'))?, url.port())]
        } else if listed.is_empty() {
            Vec::new()
        } else {
            listed.split(',').map(|h| host_and_port(h, &decode)).collect::<Result<_, _>>()?
        };
        let mut ports: Vec<Option<u16>> = written.iter().map(|(_, p)| *p).collect();
        if ports.iter().all(Option::is_none) {
            ports.clear();
        }
        let mut hosts: Vec<String> = written.into_iter().map(|(h, _)| h).collect();
        let mut user = decode(url.username())?;
        let mut password = url.password().map(decode).transpose()?;
        let path = url.path().trim_start_matches('/');
        let mut database = (!path.is_empty()).then(|| decode(path)).transpose()?;
        let mut out = OriginUrl {
            host: String::new(),
            port: 5432,
            more_hosts: Vec::new(),
            target_session_attrs: SessionAttrs::Any,
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
                "host" => hosts = v.split(',').map(str::to_owned).collect(),
                "port" => ports = v.split(',').map(parse_port).collect::<Result<_, _>>()?,
                "target_session_attrs" => out.target_session_attrs = SessionAttrs::parse(&v)?,
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
        if hosts.is_empty() || hosts.iter().any(String::is_empty) {
            return Err("the URL names no host".into());
        }
        // As libpq: one port for every host, or one per host.
        let ports: Vec<Option<u16>> = match ports.len() {
            0 => vec![None; hosts.len()],
            1 => vec![ports[0]; hosts.len()],
            n if n == hosts.len() => ports,
            n => return Err(format!("the URL names {} hosts but {n} ports", hosts.len())),
        };
        if user.is_empty() {
            return Err("the URL names no user".into());
        }
        out.database = database.filter(|d| !d.is_empty()).unwrap_or_else(|| user.clone());
        let mut hosts = hosts.into_iter().zip(ports).map(|(h, p)| (h, p.unwrap_or(5432)));
        (out.host, out.port) = hosts.next().ok_or("the URL names no host")?;
        out.more_hosts = hosts.collect();
        out.user = user;
        out.password = password;
        Ok(out)
    }

    /// Whether the host (every host, when the URL names several) is the directory of a
    /// server's Unix-domain socket.
    pub fn is_unix_socket(&self) -> bool {
        unix_socket_path(&self.host, self.port).is_some()
            && self.more_hosts.iter().all(|(host, port)| unix_socket_path(host, *port).is_some())
    }
}

const HOST_PLACEHOLDER: &str = "pgwarp.invalid";

/// Where the URL's host list is (after the user info, up to the path): a byte range of `raw`,
/// empty when no host is written there (`postgres://u:p@/db`).
fn hosts_span(raw: &str) -> (usize, usize) {
    let Some(scheme) = raw.find("://") else { return (0, 0) };
    if !raw[..scheme].chars().all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c)) {
        return (0, 0);
    }
    let scheme_end = scheme + 3;
    let len = raw[scheme_end..].find(['/', '?', '#']).unwrap_or(raw.len() - scheme_end);
    let authority = &raw[scheme_end..scheme_end + len];
    let start = scheme_end + authority.rfind('@').map_or(0, |at| at + 1);
    (start, scheme_end + len)
}

/// One `host[:port]` of a list of hosts (`[::1]:5432` for an IPv6 address). Errors do not
/// quote what was written: a password with an unencoded `/` lands here.
fn host_and_port(
    written: &str,
    decode: &impl Fn(&str) -> Result<String, String>,
) -> Result<(String, Option<u16>), String> {
    let (host, port) = match written.strip_prefix('[') {
        Some(rest) => {
            let (host, after) = rest.split_once(']').ok_or("invalid host in the URL's list of hosts")?;
            (host, after.strip_prefix(':'))
        }
        None => match written.rsplit_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (written, None),
        },
    };
    let port = port.map(parse_port).transpose()?.flatten();
    Ok((decode(host)?, port))
}

/// A port of a list; empty is the default, as in libpq.
fn parse_port(p: &str) -> Result<Option<u16>, String> {
    if p.is_empty() {
        return Ok(None);
    }
    p.parse().map(Some).map_err(|_| "invalid port in the URL".to_owned())
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
    fn several_hosts_as_libpq_takes_them() {
        let u = OriginUrl::parse("postgres://app:pw@pg1:5433,pg2,[::1]:6000/appdb?target_session_attrs=read-write")
            .unwrap();
        assert_eq!((u.host.as_str(), u.port), ("pg1", 5433));
        assert_eq!(u.more_hosts, vec![("pg2".to_owned(), 5432), ("::1".to_owned(), 6000)]);
        assert_eq!((u.user.as_str(), u.password.as_deref(), u.database.as_str()), ("app", Some("pw"), "appdb"));
        assert_eq!(u.target_session_attrs, SessionAttrs::ReadWrite);
        assert_eq!(
            format!("{u:?}"),
            "postgres://app@pg1:5433,pg2:5432,[::1]:6000/appdb?target_session_attrs=read-write"
        );
        // As parameters: one port for all, or one each.
        let u = OriginUrl::parse("postgres://app@/db?host=a,b&port=7000").unwrap();
        assert_eq!((u.host.as_str(), u.port, u.more_hosts), ("a", 7000, vec![("b".to_owned(), 7000)]));
        let u = OriginUrl::parse("postgres://app@/db?host=a,b&port=7000,7001").unwrap();
        assert_eq!((u.port, u.more_hosts), (7000, vec![("b".to_owned(), 7001)]));
        assert!(OriginUrl::parse("postgres://app@/db?host=a,b,c&port=1,2")
            .unwrap_err()
            .contains("3 hosts but 2 ports"));
        assert!(OriginUrl::parse("postgres://app@a,,b/db").unwrap_err().contains("no host"));
        assert!(OriginUrl::parse("postgres://app@a,b:x/db").unwrap_err().contains("port"));
        // An empty port is the default; a host parameter keeps the URL's port, as in libpq.
        let u = OriginUrl::parse("postgres://app@a:,b:6000/db").unwrap();
        assert_eq!((u.port, u.more_hosts), (5432, vec![("b".to_owned(), 6000)]));
        let u = OriginUrl::parse("postgres://app@localhost:5433/db?host=/var/run/postgresql").unwrap();
        assert_eq!((u.host.as_str(), u.port), ("/var/run/postgresql", 5433));
        // A password with an unencoded `/` and `,` is not echoed back.
        let err = OriginUrl::parse("postgres://app:se,cret/x@h/db").unwrap_err();
        assert!(!err.contains("se,") && !err.contains("cret"), "{err}");
        assert!(OriginUrl::parse("postgres://app@a/db?target_session_attrs=leader").is_err());
        // One host stays one host.
        let u = OriginUrl::parse("postgres://app@one:5433/db").unwrap();
        assert_eq!(
            (u.host.as_str(), u.port, u.more_hosts.len(), u.target_session_attrs),
            ("one", 5433, 0, SessionAttrs::Any)
        );
    }

    #[test]
    fn refuses_what_it_cannot_follow() {
        assert!(OriginUrl::parse("postgres://app@/db").unwrap_err().contains("no host"));
        assert!(OriginUrl::parse("postgres://app@h/db?port=x").unwrap_err().contains("port"));
    }

    #[test]
    fn debug_hides_password() {
        let u = OriginUrl::parse("postgres://app:secret@h/db").unwrap();
        assert!(!format!("{u:?}").contains("secret"));
    }
}
