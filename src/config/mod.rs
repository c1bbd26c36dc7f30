//! Configuration: the TOML file, the command line and `DATABASE_URL`, merged into one `Config`.
//!
//! The struct is the documentation: every field says what it does and has a default, and unknown
//! keys are refused so a typo is an error rather than a silent default. Precedence: command-line
//! flags, then the config file, then `DATABASE_URL` (for the origin only), then the defaults.

pub mod diff;
mod origin_url;
mod units;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use serde::Deserialize;

pub use origin_url::{unix_socket_path, OriginUrl, SessionAttrs, SslMode};
pub use units::parse_auto_duration;
pub(crate) use units::{de_byte_size, de_duration};
pub use units::{parse_byte_size, parse_duration};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("invalid config file {path}: {message}")]
    Parse { path: String, message: String },
    #[error("invalid origin URL: {0}")]
    OriginUrl(String),
    #[error("no origin database: pass --origin, set `origin` in the config file, or set DATABASE_URL")]
    NoOrigin,
    #[error("invalid value for {key}: {message}")]
    Invalid { key: &'static str, message: String },
}

/// `busy_poll` when it is "auto" and the CPU quota allows: the longest window a worker polls
/// for, which it narrows to the gaps it sees. A point select's answer on a loaded VM took 100 to
/// 175 µs (2026-11-23), and KVM's halt polling stops at the same 200 µs.
pub const DEFAULT_BUSY_POLL: Duration = Duration::from_micros(200);
/// Past this a poll is a spin, not a wait for the next message.
pub const MAX_BUSY_POLL: Duration = Duration::from_millis(1);

/// Longest `tcp_keepidle` and `tcp_keepintvl` Linux accepts, in seconds.
pub const MAX_KEEPALIVE_SECS: u64 = 32_767;
/// Most keepalive probes (`tcp_keepcnt`) Linux sends before it gives up.
pub const MAX_KEEPALIVE_PROBES: u32 = 127;
/// Longest `tcp_user_timeout`: past a day it protects nothing.
pub const MAX_USER_TIMEOUT: Duration = Duration::from_secs(24 * 3600);

/// Checks `tcp_keepidle` or `tcp_keepintvl`: the kernel takes whole seconds, 1 to 32767.
fn check_keepalive_time(value: Duration) -> Result<(), &'static str> {
    if value.subsec_nanos() != 0 || value.as_secs() > MAX_KEEPALIVE_SECS {
        return Err("must be whole seconds, at most 32767s (0 keeps the system's)");
    }
    Ok(())
}

/// Checks a `busy_poll` value (None: "auto") against [`MAX_BUSY_POLL`].
pub fn check_busy_poll(busy_poll: Option<Duration>) -> Result<(), &'static str> {
    match busy_poll {
        Some(d) if d > MAX_BUSY_POLL => Err("must be at most 1ms (0 turns it off)"),
        _ => Ok(()),
    }
}

/// The `auth_query` that `auth_user` alone turns on (PgBouncer's since 1.21): no secret for a
/// role that may not log in or whose password has expired, as Postgres would refuse those.
/// Reading `pg_authid` takes a superuser; a SECURITY DEFINER function that returns the same
/// two columns does not.
pub const DEFAULT_AUTH_QUERY: &str = "SELECT rolname, CASE WHEN rolvaliduntil < now() THEN NULL ELSE rolpassword END \
     FROM pg_catalog.pg_authid WHERE rolname = $1 AND rolcanlogin";

/// How pgwarp checks client passwords.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq, clap::ValueEnum)]
pub enum AuthMethod {
    /// SCRAM-SHA-256, as Postgres does by default.
    #[default]
    #[serde(rename = "scram-sha-256")]
    #[value(name = "scram-sha-256")]
    ScramSha256,
    /// MD5 challenge-response, for old clients.
    #[serde(rename = "md5")]
    #[value(name = "md5")]
    Md5,
}

/// What a client certificate must prove (`tls_client_cert`), named as Postgres's `clientcert`.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
pub enum ClientCertCheck {
    /// Signed by a CA of `tls_client_ca_file`.
    #[default]
    #[serde(rename = "verify-ca")]
    VerifyCa,
    /// That, and its common name is the user the client logs in as.
    #[serde(rename = "verify-full")]
    VerifyFull,
}

impl ClientCertCheck {
    pub fn as_str(self) -> &'static str {
        match self {
            ClientCertCheck::VerifyCa => "verify-ca",
            ClientCertCheck::VerifyFull => "verify-full",
        }
    }
}

/// One client login that pgwarp accepts, and the origin credentials its work runs under.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct UserConfig {
    /// The client's password: plaintext, a SCRAM verifier (`SCRAM-SHA-256$...`, as in pg_authid),
    /// or an md5 hash (`md5...`). Verifiers work only with the matching auth_method.
    pub password: String,
    /// The origin role this user's queries run as. Default: the same name.
    pub origin_user: Option<String>,
    /// The origin role's password. Default: `password` when that is plaintext; else, when the
    /// user is its own origin role, the keys its login reveals (a SCRAM verifier copied from
    /// pg_authid) or the md5 hash itself; else the origin URL's password.
    pub origin_password: Option<String>,
}

/// Everything pgwarp can be told. See configs/pgwarp.toml for an annotated example.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Address to accept clients on. Default 127.0.0.1:6432 (0.0.0.0:6432 in the container).
    pub listen: String,
    /// Bind `listen` (and `admin_listen`) with SO_REUSEPORT, so a second pgwarp can listen on
    /// the same port: start the new one, then `SHUTDOWN WAIT_FOR_CLIENTS` the old one, and no
    /// client is refused during an upgrade (a rolling restart). Default false.
    pub so_reuseport: bool,
    /// Also accept clients on a Unix-domain socket in this directory, named as Postgres names
    /// its own (`.s.PGSQL.<listen port>`), so `psql -h DIR -p PORT` reaches it. TLS is neither
    /// offered nor required there. Default: none.
    pub unix_socket_dir: Option<std::path::PathBuf>,
    /// Permissions of that socket, as an octal string ("0770"). Default "0777", as PgBouncer's
    /// and Postgres's.
    #[serde(deserialize_with = "units::de_file_mode")]
    pub unix_socket_mode: u32,
    /// The origin database as a libpq-style URL: postgres://user:password@host:port/database.
    /// Its user and password are also the default client login (drop-in use).
    pub origin: Option<String>,
    /// Origin connections per (user, database) pool. Default 20.
    pub pool_size: usize,
    /// Client connections accepted at once; more are refused with SQLSTATE 53300. Default 10000.
    pub max_client_conn: usize,
    /// How long a client waits for an origin connection before SQLSTATE 53300. Default 30s.
    #[serde(deserialize_with = "units::de_duration")]
    pub pool_timeout: Duration,
    /// Extra origin connections per pool for clients that waited `reserve_pool_timeout`, as
    /// PgBouncer's: a burst gets through without a larger pool all the time. Default 0: none.
    pub reserve_pool_size: usize,
    /// How long a client waits before a reserve connection may be opened for it (one already
    /// open and idle serves a waiting client at once). Default 5s; 0 turns the reserve off, as
    /// in PgBouncer.
    #[serde(deserialize_with = "units::de_duration")]
    pub reserve_pool_timeout: Duration,
    /// Origin connections idle this long are closed. Default 10m.
    #[serde(deserialize_with = "units::de_duration")]
    pub idle_timeout: Duration,
    /// Origin connections to one database over all its pools (every user's), as PgBouncer's:
    /// at the cap, a pool closes another's idle connection or waits (up to `pool_timeout`).
    /// Default 0: no cap beyond `pool_size` per pool.
    pub max_db_connections: usize,
    /// Origin connections of one origin user over all its pools (every database's), as
    /// PgBouncer's, and the same way as `max_db_connections`. Default 0: no cap.
    pub max_user_connections: usize,
    /// Origin connections each pool keeps open even when idle (at most `pool_size`), opened
    /// ahead of need, so the first transactions after a quiet spell, or after start for the
    /// origin URL's own login, do not wait for a login to a far origin. Default 0.
    pub min_pool_size: usize,
    /// Origin connections connected this long are closed when they next come back to the pool
    /// (never in use), so connections get renewed: after a failover behind a DNS name, and
    /// against memory growth in long-lived backends. Default 1h; 0 turns it off (PgBouncer's
    /// 0 means "use once").
    #[serde(deserialize_with = "units::de_duration")]
    pub server_lifetime: Duration,
    /// A client idle this long inside a transaction is closed with FATAL 25P03, and its
    /// transaction rolled back, so one stuck client cannot keep an origin connection (and its
    /// locks) forever. Default 0: off, as in PgBouncer.
    #[serde(deserialize_with = "units::de_duration")]
    pub idle_transaction_timeout: Duration,
    /// A client idle this long outside a transaction is closed with FATAL 57P05. Default 0: off.
    #[serde(deserialize_with = "units::de_duration")]
    pub client_idle_timeout: Duration,
    /// A request the origin has not answered (ReadyForQuery) this long after it was sent ends
    /// its client with FATAL 57014: the query is cancelled and the origin connection closed,
    /// like PgBouncer's `query_timeout` (which does not cancel, and counts the pool wait too). Meant for network failures, set a little above the
    /// origin's `statement_timeout`. Default 0: off.
    #[serde(deserialize_with = "units::de_duration")]
    pub query_timeout: Duration,
    /// How long connecting and logging in to the origin may take. Default 10s.
    #[serde(deserialize_with = "units::de_duration")]
    pub connect_timeout: Duration,
    /// TCP keepalive on client and origin connections (and the tunnel's), as PgBouncer's
    /// `tcp_keepalive`: a peer that vanished without a reset is noticed. Default true.
    pub tcp_keepalive: bool,
    /// Idle time before the first keepalive probe, in whole seconds. Default 0: the system's
    /// (2h on Linux).
    #[serde(deserialize_with = "units::de_duration")]
    pub tcp_keepidle: Duration,
    /// Time between keepalive probes, in whole seconds. Default 0: the system's (75s).
    #[serde(deserialize_with = "units::de_duration")]
    pub tcp_keepintvl: Duration,
    /// Unanswered probes before the connection is given up. Default 0: the system's (9).
    pub tcp_keepcnt: u32,
    /// How long sent data may stay unacknowledged before the connection is given up
    /// (TCP_USER_TIMEOUT). Default 0: the system's retransmission limit (about 15 minutes).
    #[serde(deserialize_with = "units::de_duration")]
    pub tcp_user_timeout: Duration,
    /// On SIGTERM/SIGINT, how long running transactions get to finish. Default 30s.
    #[serde(deserialize_with = "units::de_duration")]
    pub shutdown_timeout: Duration,
    /// How often to log a line of what the pools did (transactions and requests per second,
    /// bytes each way, average times), as PgBouncer's `stats_period`. Default 60s; 0 turns it
    /// off.
    #[serde(deserialize_with = "units::de_duration")]
    pub stats_period: Duration,
    /// Log each client login (user, database, TLS), as PgBouncer's `log_connections`. Default
    /// false: with a connection per request (serverless apps) it would be most of the log.
    pub log_connections: bool,
    /// Log each client's end, with its reason and age, as PgBouncer's `log_disconnections`.
    /// Default false.
    pub log_disconnections: bool,
    /// Log filter: error, warn, info, debug, trace, or a tracing directive. Default info.
    pub log_level: String,
    /// Worker threads; 0 (the default) means one per CPU core. Each runs its clients on its own
    /// share of every pool (see `workers`).
    pub workers: usize,
    /// The longest a worker that has just done work polls for more before it sleeps ("200us";
    /// 0 turns it off; at most 1ms). It spares each hop the wake-up of a sleeping CPU (tens of
    /// microseconds on a VM) at the price of CPU time while polling; each worker polls only as
    /// long as its recent gaps needed, and stops by itself when traffic is sparse. "auto" (the
    /// default, None here) is 200us, or 0 when the process's CPU quota (cgroup) is less than
    /// one core per worker.
    #[serde(default, deserialize_with = "units::de_auto_duration")]
    pub busy_poll: Option<Duration>,
    /// Longest protocol message accepted, in bytes or with a unit ("256MiB"). Hard ceiling 1GiB.
    #[serde(deserialize_with = "units::de_byte_size")]
    pub max_message_size: usize,
    /// How clients prove their password: "scram-sha-256" (default) or "md5".
    pub auth_method: AuthMethod,
    /// Prepared statements kept per origin connection (LRU). Default 200.
    pub statement_cache_size: usize,
    /// Bytes of saved prepared statements one client may hold. Default 16MiB.
    #[serde(deserialize_with = "units::de_byte_size")]
    pub max_client_statement_bytes: usize,
    /// Extra client logins, by user name. The origin URL's user is always accepted too.
    pub users: BTreeMap<String, UserConfig>,
    /// Look up users that `users` does not list in the origin, as PgBouncer's auth_query does:
    /// this query, run as `auth_user` with the user name as $1, returns the user name and its
    /// `pg_authid` secret (SCRAM verifier or md5 hash). The client's password is checked against
    /// that, and pgwarp logs in to the origin as the user with the keys the client's login
    /// revealed (no password is stored anywhere). Setting `auth_user` alone turns it on with
    /// [`DEFAULT_AUTH_QUERY`]. Default: off.
    pub auth_query: Option<String>,
    /// Who runs `auth_query`: the origin URL's user (the default) or a `users` entry with an
    /// origin password.
    pub auth_user: Option<String>,
    /// The database `auth_query` runs in, whatever database the client asks for. Default: the
    /// origin URL's.
    pub auth_dbname: Option<String>,
    /// The query cache.
    pub cache: crate::cache::CacheConfig,
    /// TLS certificate chain (PEM) offered to clients; with `tls_key`, clients may use TLS.
    pub tls_cert: Option<std::path::PathBuf>,
    /// TLS private key (PEM) for `tls_cert`.
    pub tls_key: Option<std::path::PathBuf>,
    /// Refuse clients that do not use TLS (SQLSTATE 28000).
    pub tls_required: bool,
    /// CA certificates (PEM) that clients' certificates must chain to. With it, a client on TCP
    /// must use TLS and present a certificate signed by one of them (libpq's `sslcert` and
    /// `sslkey`) besides its password, as with PgBouncer's `client_tls_ca_file` and
    /// `client_tls_sslmode = verify-ca`. Re-read with `tls_cert` on SIGHUP and RELOAD.
    pub tls_client_ca_file: Option<std::path::PathBuf>,
    /// What a client certificate must prove, with `tls_client_ca_file`: `verify-ca` (the
    /// default) that a trusted CA signed it; `verify-full` also that its common name is the
    /// user the client logs in as, as Postgres's `clientcert=verify-full`.
    pub tls_client_cert: Option<ClientCertCheck>,
    /// Reach the origin through a WebSocket tunnel (`pgwarp tunnel` or any peer that carries
    /// raw Postgres bytes in binary frames): ws:// or wss:// URL. One WebSocket per origin
    /// connection; Postgres TLS per the origin URL's sslmode runs inside it.
    pub tunnel_url: Option<String>,
    /// Service token id, sent as `CF-Access-Client-Id` on the upgrade request.
    pub tunnel_client_id: Option<String>,
    /// Service token secret, sent as `CF-Access-Client-Secret`.
    pub tunnel_client_secret: Option<String>,
    /// For wss:// tunnels with a private CA: the CA certificates (PEM) to trust.
    pub tunnel_ca_file: Option<std::path::PathBuf>,
    /// A tunnel connection that has sent nothing this long sends a WebSocket Ping,
    /// so proxies in front of the tunnel do not close it as idle. Default 30s; 0 turns it off.
    #[serde(deserialize_with = "units::de_duration")]
    pub tunnel_ping_interval: Duration,
    /// Address of the admin HTTP endpoint (`/metrics` for Prometheus, `/healthz`), e.g.
    /// 127.0.0.1:9930. Default: off. It needs no password: keep it on a private address.
    pub admin_listen: Option<String>,
    /// Users who may log in to the admin console: database `pgwarp`, with their usual password,
    /// then `SHOW HELP`. Default: none, and the console is off (`pgwarp` is then an ordinary
    /// database name, passed to the origin).
    pub admin_users: Vec<String>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: "127.0.0.1:6432".into(),
            so_reuseport: false,
            unix_socket_dir: None,
            unix_socket_mode: 0o777,
            origin: None,
            pool_size: 20,
            max_client_conn: 10_000,
            pool_timeout: Duration::from_secs(30),
            reserve_pool_size: 0,
            reserve_pool_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(600),
            max_db_connections: 0,
            max_user_connections: 0,
            min_pool_size: 0,
            server_lifetime: Duration::from_secs(3600),
            idle_transaction_timeout: Duration::ZERO,
            client_idle_timeout: Duration::ZERO,
            query_timeout: Duration::ZERO,
            connect_timeout: Duration::from_secs(10),
            tcp_keepalive: true,
            tcp_keepidle: Duration::ZERO,
            tcp_keepintvl: Duration::ZERO,
            tcp_keepcnt: 0,
            tcp_user_timeout: Duration::ZERO,
            shutdown_timeout: Duration::from_secs(30),
            stats_period: Duration::from_secs(60),
            log_connections: false,
            log_disconnections: false,
            log_level: "info".into(),
            workers: 0,
            busy_poll: None,
            max_message_size: 256 << 20,
            auth_method: AuthMethod::ScramSha256,
            statement_cache_size: 200,
            max_client_statement_bytes: 16 << 20,
            users: BTreeMap::new(),
            auth_query: None,
            auth_user: None,
            auth_dbname: None,
            cache: crate::cache::CacheConfig::default(),
            tls_cert: None,
            tls_key: None,
            tls_client_ca_file: None,
            tls_client_cert: None,
            tls_required: false,
            tunnel_url: None,
            tunnel_client_id: None,
            tunnel_client_secret: None,
            tunnel_ca_file: None,
            tunnel_ping_interval: crate::transport::websocket::DEFAULT_PING_INTERVAL,
            admin_listen: None,
            admin_users: Vec::new(),
        }
    }
}

impl Config {
    /// What clients' certificates must prove: nothing (`None`) without `tls_client_ca_file`.
    pub fn client_cert_check(&self) -> Option<ClientCertCheck> {
        self.tls_client_ca_file.as_ref().map(|_| self.tls_client_cert.unwrap_or_default())
    }

    /// Reads a TOML config file.
    pub fn from_file(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ConfigError::Read { path: path.display().to_string(), source })?;
        Config::from_toml(&text).map_err(|message| ConfigError::Parse { path: path.display().to_string(), message })
    }

    pub fn from_toml(text: &str) -> Result<Config, String> {
        toml::from_str(text).map_err(|e| e.message().to_owned() + &span_hint(text, e.span()))
    }

    /// The parsed origin URL; an error when none was given or it does not parse.
    pub fn origin_url(&self) -> Result<OriginUrl, ConfigError> {
        let raw = self.origin.as_deref().ok_or(ConfigError::NoOrigin)?;
        OriginUrl::parse(raw).map_err(ConfigError::OriginUrl)
    }

    /// Where the Unix-domain socket for clients goes, for a server listening on TCP `port`.
    pub fn unix_socket(&self, port: u16) -> Option<std::path::PathBuf> {
        self.unix_socket_dir.as_ref().map(|dir| dir.join(format!(".s.PGSQL.{port}")))
    }

    /// Checks values that parse but make no sense.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |key, message: &str| Err(ConfigError::Invalid { key, message: message.into() });
        if self.listen.parse::<std::net::SocketAddr>().is_err() {
            return invalid("listen", "expected HOST:PORT with an IP address, e.g. 127.0.0.1:6432");
        }
        if let Some(admin) = &self.admin_listen {
            if admin.parse::<std::net::SocketAddr>().is_err() {
                return invalid("admin_listen", "expected HOST:PORT with an IP address, e.g. 127.0.0.1:9930");
            }
            if *admin == self.listen {
                return invalid("admin_listen", "must differ from listen");
            }
        }
        if let Some(dir) = &self.unix_socket_dir {
            if !dir.is_absolute() {
                return invalid("unix_socket_dir", "must be an absolute path");
            }
            // The longest socket name, for a five-digit port.
            if dir.join(".s.PGSQL.65535").as_os_str().len() > crate::transport::listen::MAX_SOCKET_PATH {
                return invalid("unix_socket_dir", "too long: a socket path may have at most 107 bytes");
            }
        }
        if self.pool_size == 0 {
            return invalid("pool_size", "must be at least 1");
        }
        if self.max_client_conn == 0 {
            return invalid("max_client_conn", "must be at least 1");
        }
        if self.statement_cache_size == 0 {
            return invalid("statement_cache_size", "must be at least 1");
        }
        if self.max_message_size < 1024 || self.max_message_size > crate::protocol::codec::HARD_MAX_MESSAGE {
            return invalid("max_message_size", "must be between 1KiB and 1GiB");
        }
        if self.pool_timeout.is_zero() || self.connect_timeout.is_zero() {
            return invalid("pool_timeout", "timeouts must be greater than zero");
        }
        for (key, value) in [("tcp_keepidle", self.tcp_keepidle), ("tcp_keepintvl", self.tcp_keepintvl)] {
            if let Err(message) = check_keepalive_time(value) {
                return invalid(key, message);
            }
        }
        if self.tcp_keepcnt > MAX_KEEPALIVE_PROBES {
            return invalid("tcp_keepcnt", "must be at most 127 (0 keeps the system's)");
        }
        if !self.tcp_user_timeout.subsec_nanos().is_multiple_of(1_000_000) || self.tcp_user_timeout > MAX_USER_TIMEOUT {
            return invalid("tcp_user_timeout", "must be whole milliseconds, at most 24h (0 keeps the system's)");
        }
        if !self.tcp_user_timeout.is_zero() && !cfg!(any(target_os = "linux", target_os = "android")) {
            return invalid("tcp_user_timeout", "is only supported on Linux");
        }
        if !self.tunnel_ping_interval.is_zero() && self.tunnel_ping_interval < Duration::from_secs(1) {
            return invalid("tunnel_ping_interval", "must be at least 1s (0 turns pings off)");
        }
        let reserve_on = self.reserve_pool_size > 0 && !self.reserve_pool_timeout.is_zero();
        if reserve_on && self.reserve_pool_timeout >= self.pool_timeout {
            return invalid("reserve_pool_timeout", "must be shorter than pool_timeout, or the reserve is never used");
        }
        if self.tls_cert.is_some() != self.tls_key.is_some() {
            return invalid("tls_cert", "tls_cert and tls_key go together");
        }
        if self.tls_required && self.tls_cert.is_none() {
            return invalid("tls_required", "needs tls_cert and tls_key");
        }
        if self.tls_client_ca_file.is_some() && self.tls_cert.is_none() {
            return invalid("tls_client_ca_file", "needs tls_cert and tls_key");
        }
        if self.tls_client_cert.is_some() && self.tls_client_ca_file.is_none() {
            return invalid("tls_client_cert", "needs tls_client_ca_file, the CAs client certificates must chain to");
        }
        if let Some(url) = &self.tunnel_url {
            if !(url.starts_with("ws://") || url.starts_with("wss://")) {
                return invalid("tunnel_url", "must start with ws:// or wss://");
            }
        }
        if let Err(message) = check_busy_poll(self.busy_poll) {
            return invalid("busy_poll", message);
        }
        if self.cache.max_age > Duration::from_secs(3600) {
            return invalid("cache.max_age", "must be at most 1h");
        }
        if self.cache.max_entry_size > self.cache.max_size {
            return invalid("cache.max_entry_size", "must not exceed cache.max_size");
        }
        tracing_subscriber::EnvFilter::try_new(&self.log_level)
            .map_err(|e| ConfigError::Invalid { key: "log_level", message: e.to_string() })?;
        let origin = self.origin_url()?;
        if origin.is_unix_socket() && self.tunnel_url.is_some() {
            let message = "the origin's host is a socket directory, which the tunnel's far end reaches, not pgwarp: give the origin a host name and `pgwarp tunnel --target` the socket";
            return invalid("tunnel_url", message);
        }
        if !origin.more_hosts.is_empty() && self.tunnel_url.is_some() {
            let message = "the origin URL names several hosts, but every connection goes to the tunnel's far end, which has one target: name one host";
            return invalid("tunnel_url", message);
        }
        Ok(())
    }
}

/// Points at the line of a TOML error, since toml's message alone lacks it.
fn span_hint(text: &str, span: Option<std::ops::Range<usize>>) -> String {
    match span {
        Some(r) => format!(" (line {})", text[..r.start.min(text.len())].lines().count().max(1)),
        None => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn example_config_in_configs_loads_and_validates() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/pgwarp.toml");
        let config = Config::from_file(&path).unwrap();
        config.validate().unwrap();
        assert_eq!(config.pool_size, 20);
        assert!(config.users.contains_key("reporting"));
        assert!(config.cache.enabled);
        assert_eq!(config.cache.max_age, Duration::from_secs(60));
        assert_eq!(config.admin_listen.as_deref(), Some("127.0.0.1:9930"));
        assert_eq!(config.server_lifetime, Duration::from_secs(3600));
        assert_eq!((config.idle_transaction_timeout, config.client_idle_timeout), (Duration::ZERO, Duration::ZERO));
        assert!(config.tcp_keepalive);
        assert_eq!((config.reserve_pool_size, config.reserve_pool_timeout), (0, Duration::from_secs(5)));
        assert_eq!((config.tcp_keepidle, config.tcp_keepcnt), (Duration::ZERO, 0));
    }

    #[test]
    fn tunnel_pings_are_at_least_a_second_apart_or_off() {
        let c = Config { origin: Some("postgres://u:p@h/db".into()), ..Config::default() };
        assert_eq!(c.tunnel_ping_interval, Duration::from_secs(30));
        let every = |d| Config { tunnel_ping_interval: d, ..c.clone() }.validate();
        assert!(matches!(
            every(Duration::from_millis(500)),
            Err(ConfigError::Invalid { key: "tunnel_ping_interval", .. })
        ));
        every(Duration::ZERO).unwrap();
        every(Duration::from_secs(1)).unwrap();
    }

    #[test]
    fn a_reserve_must_be_reachable_before_pool_timeout() {
        let c = Config { origin: Some("postgres://u:p@h/db".into()), reserve_pool_size: 2, ..Config::default() };
        c.validate().unwrap();
        let late = Config { reserve_pool_timeout: c.pool_timeout, ..c.clone() };
        assert!(matches!(late.validate(), Err(ConfigError::Invalid { key: "reserve_pool_timeout", .. })));
        Config { reserve_pool_size: 0, ..late.clone() }.validate().unwrap();
        Config { reserve_pool_timeout: Duration::ZERO, ..late }.validate().unwrap();
    }

    #[test]
    fn tcp_keepalive_values_are_what_the_kernel_takes() {
        let c = Config::from_toml(
            "origin = 'postgres://u:p@h/db'\ntcp_keepidle = '60s'\ntcp_keepintvl = '10s'\ntcp_keepcnt = 6\ntcp_user_timeout = '1500ms'",
        )
        .unwrap();
        c.validate().unwrap();
        assert_eq!(
            (c.tcp_keepidle, c.tcp_keepintvl, c.tcp_keepcnt),
            (Duration::from_secs(60), Duration::from_secs(10), 6)
        );
        assert_eq!(c.tcp_user_timeout, Duration::from_millis(1500));

        let refused = |c: Config| match c.validate() {
            Err(ConfigError::Invalid { key, .. }) => key,
            other => panic!("{other:?}"),
        };
        let ms = Duration::from_millis;
        assert_eq!(refused(Config { tcp_keepidle: ms(1500), ..c.clone() }), "tcp_keepidle");
        assert_eq!(refused(Config { tcp_keepintvl: Duration::from_secs(32_768), ..c.clone() }), "tcp_keepintvl");
        assert_eq!(refused(Config { tcp_keepcnt: 128, ..c.clone() }), "tcp_keepcnt");
        let micros = Duration::from_micros(1500);
        assert_eq!(refused(Config { tcp_user_timeout: micros, ..c.clone() }), "tcp_user_timeout");
        assert_eq!(refused(Config { tcp_user_timeout: Duration::from_secs(86_401), ..c.clone() }), "tcp_user_timeout");
        Config { tcp_keepidle: Duration::from_secs(32_767), tcp_keepcnt: 127, ..c }.validate().unwrap();
    }

    #[test]
    fn admin_listen_must_be_an_address_other_than_listen() {
        let c = Config { origin: Some("postgres://u:p@h/db".into()), ..Config::default() };
        for bad in ["localhost:9930", "9930", "127.0.0.1:6432"] {
            let c = Config { admin_listen: Some(bad.into()), ..c.clone() };
            assert!(matches!(c.validate(), Err(ConfigError::Invalid { key: "admin_listen", .. })), "{bad}");
        }
        Config { admin_listen: Some("0.0.0.0:9930".into()), ..c }.validate().unwrap();
    }

    #[test]
    fn unknown_keys_are_refused() {
        let err = Config::from_toml("pool_sise = 3").unwrap_err();
        assert!(err.contains("pool_sise"), "{err}");
    }

    #[test]
    fn durations_and_sizes_take_units() {
        let c = Config::from_toml("pool_timeout = \"1500ms\"\nmax_message_size = \"8MiB\"").unwrap();
        assert_eq!(c.pool_timeout, Duration::from_millis(1500));
        assert_eq!(c.max_message_size, 8 << 20);
        assert!(Config::from_toml("pool_timeout = \"soon\"").is_err());
    }

    #[test]
    fn validate_catches_nonsense() {
        let mut c = Config { origin: Some("postgres://u:p@h/db".into()), ..Config::default() };
        c.validate().unwrap();
        c.pool_size = 0;
        assert!(c.validate().is_err());
        let c = Config { listen: "localhost".into(), ..c };
        assert!(c.validate().is_err());
        assert!(matches!(Config::default().validate(), Err(ConfigError::NoOrigin)));
    }

    #[test]
    fn client_certificates_need_server_tls_and_a_ca_and_default_to_verify_ca() {
        let origin = "origin = \"postgres://u:p@h/db\"\n";
        let tls = "tls_cert = \"/c.pem\"\ntls_key = \"/k.pem\"\n";
        let with = |extra: &str| Config::from_toml(&format!("{origin}{extra}")).unwrap();
        let c = with(&format!("{tls}tls_client_ca_file = \"/ca.pem\""));
        c.validate().unwrap();
        assert_eq!(c.client_cert_check(), Some(ClientCertCheck::VerifyCa));
        let c = with(&format!("{tls}tls_client_ca_file = \"/ca.pem\"\ntls_client_cert = \"verify-full\""));
        assert_eq!(c.client_cert_check(), Some(ClientCertCheck::VerifyFull));
        assert_eq!(with(tls).client_cert_check(), None);
        let err = with("tls_client_ca_file = \"/ca.pem\"").validate().unwrap_err().to_string();
        assert!(err.contains("tls_client_ca_file"), "{err}");
        let err = with(&format!("{tls}tls_client_cert = \"verify-full\"")).validate().unwrap_err().to_string();
        assert!(err.contains("tls_client_cert"), "{err}");
        assert!(Config::from_toml("tls_client_cert = \"verify-some\"").is_err());
    }

    #[test]
    fn unix_sockets_need_absolute_short_paths_and_no_tunnel_to_a_socket_origin() {
        let base = Config { origin: Some("postgres://u:p@h/db".into()), ..Config::default() };
        let key_of = |c: Config| match c.validate() {
            Err(ConfigError::Invalid { key, .. }) => key,
            other => panic!("expected an invalid key, got {other:?}"),
        };
        let dir = |d: &str| Config { unix_socket_dir: Some(d.into()), ..base.clone() };
        dir("/var/run/pgwarp").validate().unwrap();
        assert_eq!(key_of(dir("run/pgwarp")), "unix_socket_dir");
        assert_eq!(key_of(dir(&format!("/{}", "d".repeat(100)))), "unix_socket_dir");

        let socket_origin = Config { origin: Some("postgres://u:p@%2Frun%2Fpg/db".into()), ..base.clone() };
        socket_origin.validate().unwrap();
        let tunnelled = Config { tunnel_url: Some("ws://edge:8080".into()), ..socket_origin };
        assert_eq!(key_of(tunnelled.clone()), "tunnel_url");
        let several = Config { origin: Some("postgres://u@h1,h2/db".into()), ..tunnelled };
        assert_eq!(key_of(several), "tunnel_url");
    }
}
