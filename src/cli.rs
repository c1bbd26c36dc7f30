//! The command line. Every flag has a config-file key of the same name (with `_` for `-`);
//! a flag overrides the file, and the file overrides `DATABASE_URL`.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::config::{check_busy_poll, parse_auto_duration, parse_duration, AuthMethod, Config, ConfigError};

#[derive(Debug, Parser)]
#[command(
    name = "pgwarp",
    version,
    about = "PostgreSQL connection pooler (transaction mode) with prepared statements that survive pooling",
    long_about = "pgwarp accepts PostgreSQL clients and runs their transactions on a small pool of \
                  connections to one origin database. Point DATABASE_URL at pgwarp instead of the \
                  database: the same user, password and database name keep working.\n\n\
                  Example:\n  pgwarp --origin postgres://app:secret@db.internal:5432/app\n  \
                  psql postgres://app:secret@127.0.0.1:6432/app"
)]
pub struct Cli {
    #[command(flatten)]
    pub run: RunArgs,
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the far end of a WebSocket tunnel next to a private database: accept upgrades that
    /// carry the service token and pipe each one to the database over TCP.
    Tunnel(TunnelArgs),
}

#[derive(Debug, Args)]
pub struct TunnelArgs {
    /// Address to accept WebSocket upgrades on.
    #[arg(long, value_name = "ADDR")]
    pub listen: std::net::SocketAddr,
    /// The Postgres server: host:port, or the path of its Unix-domain socket
    /// (e.g. /var/run/postgresql/.s.PGSQL.5432) when the tunnel runs on the database's host.
    #[arg(long, value_name = "HOST:PORT|SOCKET")]
    pub target: String,
    /// Service token id callers must send as CF-Access-Client-Id.
    #[arg(long, value_name = "ID", env = "PGWARP_TUNNEL_CLIENT_ID")]
    pub client_id: String,
    /// Service token secret callers must send as CF-Access-Client-Secret.
    #[arg(long, value_name = "SECRET", env = "PGWARP_TUNNEL_CLIENT_SECRET", hide_env_values = true)]
    pub client_secret: String,
    /// Certificate chain (PEM) to serve wss:// instead of ws://.
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// Private key (PEM) for --tls-cert.
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Most tunnel sessions at once; more upgrades get HTTP 503.
    #[arg(long, value_name = "N", default_value_t = 1000)]
    pub max_sessions: usize,
    /// Worker threads that relay sessions; 0 means one per CPU core.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub workers: usize,
    /// After work, the longest a worker polls for more before its CPU sleeps; 0 turns it off.
    /// auto: 200us, or 0 under a CPU quota of less than a core per worker.
    #[arg(long, value_name = "DURATION", value_parser = parse_busy_poll, default_value = "auto")]
    pub busy_poll: BusyPollArg,
    /// Log level or tracing filter.
    #[arg(long, value_name = "LEVEL", default_value = "info")]
    pub log_level: String,
}

#[derive(Clone, Debug, Default, Args)]
pub struct RunArgs {
    /// TOML config file; flags given here override its values (see configs/pgwarp.toml).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Address to accept clients on [default: 127.0.0.1:6432; the container image sets
    /// PGWARP_LISTEN=0.0.0.0:6432].
    #[arg(long, value_name = "ADDR", env = "PGWARP_LISTEN")]
    pub listen: Option<String>,
    /// Bind the listening sockets with SO_REUSEPORT, so a new pgwarp can take over the port
    /// while this one finishes with its clients (SHUTDOWN WAIT_FOR_CLIENTS) [default: off].
    #[arg(long)]
    pub so_reuseport: bool,
    /// Also accept clients on a Unix-domain socket in this directory, .s.PGSQL.<port> as
    /// Postgres names it: psql -h DIR -p PORT [default: off].
    #[arg(long, value_name = "DIR")]
    pub unix_socket_dir: Option<PathBuf>,
    /// Serve /metrics (Prometheus) and /healthz over HTTP on this address, e.g. 127.0.0.1:9930
    /// [default: off; the container image sets PGWARP_ADMIN_LISTEN=0.0.0.0:9930].
    #[arg(long, value_name = "ADDR", env = "PGWARP_ADMIN_LISTEN")]
    pub admin_listen: Option<String>,
    /// Users (comma-separated) who may open the admin console: database `pgwarp`, then SHOW HELP.
    #[arg(long, value_name = "USERS", value_delimiter = ',')]
    pub admin_users: Option<Vec<String>>,
    /// Origin database URL, postgres://user:password@host:port/database [env: DATABASE_URL].
    /// Its user and password are also what clients log in with.
    #[arg(long, value_name = "URL")]
    pub origin: Option<String>,
    /// Origin connections per (user, database) [default: 20].
    #[arg(long, value_name = "N")]
    pub pool_size: Option<usize>,
    /// Most client connections at once; more are refused with SQLSTATE 53300 [default: 10000].
    #[arg(long, value_name = "N")]
    pub max_client_conn: Option<usize>,
    /// How long a client waits for a free origin connection before SQLSTATE 53300 [default: 30s].
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub pool_timeout: Option<Duration>,
    /// Close origin connections idle this long [default: 10m].
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub idle_timeout: Option<Duration>,
    /// Log level: error, warn, info, debug, trace, or a tracing filter [default: info].
    #[arg(long, value_name = "LEVEL")]
    pub log_level: Option<String>,
    /// Worker threads, each with its share of every pool; 0 means one per CPU core [default: 0].
    #[arg(long, value_name = "N")]
    pub workers: Option<usize>,
    /// After work, the longest a worker polls for more before its CPU sleeps; 0 turns it off,
    /// at most 1ms. auto: 200us, or 0 under a CPU quota of less than a core per worker
    /// [default: auto].
    #[arg(long, value_name = "DURATION", value_parser = parse_busy_poll)]
    pub busy_poll: Option<BusyPollArg>,
    /// How clients prove their password [default: scram-sha-256].
    #[arg(long, value_name = "METHOD")]
    pub auth_method: Option<AuthMethod>,
    /// Turn the query cache off (the `[cache]` section's `enabled = false`).
    #[arg(long)]
    pub no_cache: bool,
    /// TLS certificate chain (PEM) for clients; reloaded on SIGHUP.
    #[arg(long, value_name = "FILE")]
    pub tls_cert: Option<std::path::PathBuf>,
    /// TLS private key (PEM) for --tls-cert.
    #[arg(long, value_name = "FILE")]
    pub tls_key: Option<std::path::PathBuf>,
    /// Refuse clients that do not ask for TLS.
    #[arg(long)]
    pub tls_required: bool,
    /// Reach the origin through a WebSocket tunnel (ws:// or wss://), e.g. a `pgwarp tunnel`.
    #[arg(long, value_name = "URL", env = "PGWARP_TUNNEL_URL")]
    pub tunnel_url: Option<String>,
    /// Service token id for the tunnel (sent as CF-Access-Client-Id).
    #[arg(long, value_name = "ID", env = "PGWARP_TUNNEL_CLIENT_ID")]
    pub tunnel_client_id: Option<String>,
    /// Service token secret for the tunnel (sent as CF-Access-Client-Secret).
    #[arg(long, value_name = "SECRET", env = "PGWARP_TUNNEL_CLIENT_SECRET", hide_env_values = true)]
    pub tunnel_client_secret: Option<String>,
    /// CA certificates (PEM) to trust for a wss:// tunnel with a private CA.
    #[arg(long, value_name = "FILE")]
    pub tunnel_ca_file: Option<PathBuf>,
}

/// Where the settings come from: the flags and `DATABASE_URL` pgwarp was started with, and the
/// config file they name, re-read on each `load` (RELOAD and SIGHUP), with the same precedence
/// as at start-up.
#[derive(Clone, Debug)]
pub struct ConfigSource {
    args: RunArgs,
    database_url: Option<String>,
}

impl ConfigSource {
    pub fn new(args: RunArgs, database_url: Option<String>) -> ConfigSource {
        ConfigSource { args, database_url }
    }

    /// Merges and validates the settings as they stand now.
    pub fn load(&self) -> Result<Config, ConfigError> {
        self.args.clone().into_config(self.database_url.clone())
    }

    /// The config file, if one was given.
    pub fn file(&self) -> Option<&std::path::Path> {
        self.args.config.as_deref()
    }
}

impl RunArgs {
    /// Merges defaults, `DATABASE_URL`, the config file and the flags, in rising precedence.
    pub fn into_config(self, database_url: Option<String>) -> Result<Config, ConfigError> {
        let mut c = match &self.config {
            Some(path) => Config::from_file(path)?,
            None => Config::default(),
        };
        if c.origin.is_none() {
            c.origin = database_url.filter(|u| !u.is_empty());
        }
        if let Some(v) = self.listen {
            c.listen = v;
        }
        if let Some(v) = self.origin {
            c.origin = Some(v);
        }
        if self.so_reuseport {
            c.so_reuseport = true;
        }
        if let Some(v) = self.unix_socket_dir {
            c.unix_socket_dir = Some(v);
        }
        if let Some(v) = self.admin_listen {
            c.admin_listen = Some(v);
        }
        if let Some(v) = self.admin_users {
            c.admin_users = v;
        }
        if let Some(v) = self.pool_size {
            c.pool_size = v;
        }
        if let Some(v) = self.max_client_conn {
            c.max_client_conn = v;
        }
        if let Some(v) = self.pool_timeout {
            c.pool_timeout = v;
        }
        if let Some(v) = self.idle_timeout {
            c.idle_timeout = v;
        }
        if let Some(v) = self.log_level {
            c.log_level = v;
        }
        if let Some(v) = self.workers {
            c.workers = v;
        }
        if let Some(BusyPollArg(v)) = self.busy_poll {
            c.busy_poll = v;
        }
        if let Some(v) = self.auth_method {
            c.auth_method = v;
        }
        if self.no_cache {
            c.cache.enabled = false;
        }
        if let Some(v) = self.tls_cert {
            c.tls_cert = Some(v);
        }
        if let Some(v) = self.tls_key {
            c.tls_key = Some(v);
        }
        if self.tls_required {
            c.tls_required = true;
        }
        for (flag, slot) in [
            (self.tunnel_url, &mut c.tunnel_url),
            (self.tunnel_client_id, &mut c.tunnel_client_id),
            (self.tunnel_client_secret, &mut c.tunnel_client_secret),
        ] {
            if flag.is_some() {
                *slot = flag;
            }
        }
        if let Some(v) = self.tunnel_ca_file {
            c.tunnel_ca_file = Some(v);
        }
        c.validate()?;
        Ok(c)
    }
}

/// `--busy-poll`: a duration, or None for "auto".
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BusyPollArg(pub Option<Duration>);

/// A `busy_poll` duration (at most 1ms), or "auto". Checked here too because `pgwarp tunnel`
/// takes it without a `Config`.
fn parse_busy_poll(s: &str) -> Result<BusyPollArg, String> {
    let d = parse_auto_duration(s)?;
    check_busy_poll(d)?;
    Ok(BusyPollArg(d))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("pgwarp").chain(args.iter().copied()))
    }

    #[test]
    fn flags_override_environment() {
        let cli = parse(&["--origin", "postgres://a:b@h/db", "--pool-size", "3", "--pool-timeout", "2s"]).unwrap();
        let c = cli.run.into_config(Some("postgres://x:y@other/db".into())).unwrap();
        assert_eq!(c.origin.as_deref(), Some("postgres://a:b@h/db"));
        assert_eq!(c.pool_size, 3);
        assert_eq!(c.pool_timeout, Duration::from_secs(2));
    }

    #[test]
    fn database_url_is_the_fallback_origin() {
        let c = parse(&[]).unwrap().run.into_config(Some("postgres://x:y@h/db".into())).unwrap();
        assert_eq!(c.origin.as_deref(), Some("postgres://x:y@h/db"));
        assert!(parse(&[]).unwrap().run.into_config(None).is_err());
    }

    #[test]
    fn bad_values_are_errors() {
        assert!(parse(&["--pool-size", "many"]).is_err());
        assert!(parse(&["--pool-timeout", "forever"]).is_err());
        let cli = parse(&["--origin", "postgres://a@h/db", "--pool-size", "0"]).unwrap();
        assert!(cli.run.into_config(None).is_err());
        assert!(parse(&["--busy-poll", "2ms"]).is_err());
        assert!(parse(&["--busy-poll", "soon"]).is_err());
    }

    #[test]
    fn busy_poll_defaults_to_auto_and_zero_turns_it_off() {
        let c = parse(&["--origin", "postgres://a@h/db"]).unwrap().run.into_config(None).unwrap();
        assert_eq!(c.busy_poll, None);
        let c = parse(&["--origin", "postgres://a@h/db", "--busy-poll", "0"]).unwrap().run.into_config(None).unwrap();
        assert_eq!(c.busy_poll, Some(Duration::ZERO));
        let c =
            parse(&["--origin", "postgres://a@h/db", "--busy-poll", "auto"]).unwrap().run.into_config(None).unwrap();
        assert_eq!(c.busy_poll, None);
    }

    #[test]
    fn tunnel_busy_poll_flag() {
        let base =
            ["tunnel", "--listen", "127.0.0.1:1", "--target", "h:5432", "--client-id", "i", "--client-secret", "s"];
        let tunnel = |extra: &[&str]| match parse(&[&base[..], extra].concat()).map(|c| c.command) {
            Ok(Some(Command::Tunnel(t))) => Ok(t.busy_poll),
            Ok(_) => panic!("not the tunnel command"),
            Err(e) => Err(e),
        };
        assert_eq!(tunnel(&[]).unwrap(), BusyPollArg(None));
        assert_eq!(tunnel(&["--busy-poll", "30us"]).unwrap(), BusyPollArg(Some(Duration::from_micros(30))));
        assert!(tunnel(&["--busy-poll", "5ms"]).is_err());
    }
}
