//! What RELOAD may change. A re-read config is compared with the running one: settings that
//! apply to a running server (the origin and its tunnel, pool sizes and timeouts, client
//! limits, logins, cache freshness) are taken; settings that only a restart can change
//! (pgwarp's own addresses, worker threads, ...) keep their running values and are reported.
//! Pure, so the split is unit-tested here.

use super::Config;

/// How a re-read config differs from the running one.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Changes {
    /// Settings that changed and take effect now.
    pub applied: Vec<&'static str>,
    /// Settings that changed in the file but keep their running values until a restart.
    pub kept: Vec<&'static str>,
}

/// The config to run with after a reload: `loaded`, except that every setting a running server
/// cannot change keeps its value from `running`; and what changed, either way.
pub fn reconcile(running: &Config, mut loaded: Config) -> (Config, Changes) {
    let mut changes = Changes::default();
    macro_rules! restart_only {
        ($($key:literal => $($field:ident).+),* $(,)?) => {$(
            if loaded.$($field).+ != running.$($field).+ {
                changes.kept.push($key);
                loaded.$($field).+ = running.$($field).+.clone();
            }
        )*};
    }
    macro_rules! reloadable {
        ($($key:literal => $($field:ident).+),* $(,)?) => {$(
            if loaded.$($field).+ != running.$($field).+ {
                changes.applied.push($key);
            }
        )*};
    }
    restart_only! {
        "listen" => listen,
        "so_reuseport" => so_reuseport,
        "unix_socket_dir" => unix_socket_dir,
        "unix_socket_mode" => unix_socket_mode,
        "workers" => workers,
        "max_db_connections" => max_db_connections,
        "max_user_connections" => max_user_connections,
        "busy_poll" => busy_poll,
        "tcp_keepalive" => tcp_keepalive,
        "tcp_keepidle" => tcp_keepidle,
        "tcp_keepintvl" => tcp_keepintvl,
        "tcp_keepcnt" => tcp_keepcnt,
        "tcp_user_timeout" => tcp_user_timeout,
        "tunnel_ping_interval" => tunnel_ping_interval,
        "log_level" => log_level,
        "admin_listen" => admin_listen,
        "tls_cert" => tls_cert,
        "tls_key" => tls_key,
        "tls_client_ca_file" => tls_client_ca_file,
        "tls_client_cert" => tls_client_cert,
        "cache.enabled" => cache.enabled,
        "cache.max_size" => cache.max_size,
        "cache.max_entry_size" => cache.max_entry_size,
    }
    reloadable! {
        "origin" => origin,
        "tunnel_url" => tunnel_url,
        "tunnel_client_id" => tunnel_client_id,
        "tunnel_client_secret" => tunnel_client_secret,
        "tunnel_ca_file" => tunnel_ca_file,
        "pool_size" => pool_size,
        "max_client_conn" => max_client_conn,
        "pool_timeout" => pool_timeout,
        "reserve_pool_size" => reserve_pool_size,
        "reserve_pool_timeout" => reserve_pool_timeout,
        "idle_timeout" => idle_timeout,
        "min_pool_size" => min_pool_size,
        "server_lifetime" => server_lifetime,
        "idle_transaction_timeout" => idle_transaction_timeout,
        "client_idle_timeout" => client_idle_timeout,
        "query_timeout" => query_timeout,
        "connect_timeout" => connect_timeout,
        "shutdown_timeout" => shutdown_timeout,
        "stats_period" => stats_period,
        "log_connections" => log_connections,
        "log_disconnections" => log_disconnections,
        "max_message_size" => max_message_size,
        "auth_method" => auth_method,
        "statement_cache_size" => statement_cache_size,
        "max_client_statement_bytes" => max_client_statement_bytes,
        "users" => users,
        "auth_query" => auth_query,
        "auth_user" => auth_user,
        "auth_dbname" => auth_dbname,
        "admin_users" => admin_users,
        "tls_required" => tls_required,
        "cache.max_age" => cache.max_age,
        "cache.stale_while_revalidate" => cache.stale_while_revalidate,
    }
    (loaded, changes)
}

/// How a reload changes the way to the origin.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OriginMove {
    /// Same place, same way (a changed user, password or database name alone is no move: new
    /// connections log in differently; see `UserDirectory::rotations`).
    None,
    /// Same server, reached another way: TLS settings, `target_session_attrs`, the tunnel's
    /// token or CA. Connections
    /// are replaced; what the server said (the query cache) still holds.
    Route,
    /// Another server: another host or port (or list of them), or another tunnel. Connections are replaced, and
    /// the query cache forgets what the old server said.
    Place,
}

pub fn origin_move(running: &Config, next: &Config) -> OriginMove {
    let place = |c: &Config| (c.origin_url().ok().map(|u| (u.host, u.port, u.more_hosts)), c.tunnel_url.clone());
    let route = |c: &Config| {
        // TLS settings mean nothing for an origin on a Unix-domain socket.
        let tls = c
            .origin_url()
            .ok()
            .filter(|u| !u.is_unix_socket())
            .map(|u| (u.sslmode, u.sslrootcert, u.sslcert, u.sslkey));
        let attrs = c.origin_url().ok().map(|u| u.target_session_attrs);
        (tls, attrs, c.tunnel_client_id.clone(), c.tunnel_client_secret.clone(), c.tunnel_ca_file.clone())
    };
    if place(running) != place(next) {
        OriginMove::Place
    } else if route(running) != route(next) {
        OriginMove::Route
    } else {
        OriginMove::None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn running() -> Config {
        Config { origin: Some("postgres://app:pw@db/app".into()), ..Config::default() }
    }

    #[test]
    fn an_identical_config_changes_nothing() {
        let (next, changes) = reconcile(&running(), running());
        assert_eq!(changes, Changes::default());
        assert_eq!(next, running());
    }

    #[test]
    fn runtime_settings_are_taken_and_restart_only_ones_keep_their_running_values() {
        let mut loaded = running();
        loaded.pool_size = 3;
        loaded.pool_timeout = Duration::from_secs(2);
        loaded.reserve_pool_size = 4;
        loaded.admin_users = vec!["ops".into()];
        loaded.cache.max_age = Duration::from_secs(5);
        loaded.listen = "0.0.0.0:7000".into();
        loaded.workers = 8;
        loaded.origin = Some("postgres://app:pw@elsewhere/app".into());
        loaded.cache.max_size = 1 << 20;
        loaded.unix_socket_dir = Some("/run/pgwarp".into());
        loaded.unix_socket_mode = 0o700;
        loaded.tcp_keepidle = Duration::from_secs(60);
        loaded.tcp_user_timeout = Duration::from_secs(30);
        let (next, changes) = reconcile(&running(), loaded);
        let applied = ["origin", "pool_size", "pool_timeout", "reserve_pool_size", "admin_users", "cache.max_age"];
        assert_eq!(changes.applied, applied);
        let kept = [
            "listen",
            "unix_socket_dir",
            "unix_socket_mode",
            "workers",
            "tcp_keepidle",
            "tcp_user_timeout",
            "cache.max_size",
        ];
        assert_eq!(changes.kept, kept);
        assert_eq!((next.unix_socket_dir, next.unix_socket_mode), (None, 0o777));
        assert_eq!((next.tcp_keepidle, next.tcp_user_timeout), (Duration::ZERO, Duration::ZERO));
        assert_eq!((next.pool_size, next.pool_timeout), (3, Duration::from_secs(2)));
        assert_eq!(next.cache.max_age, Duration::from_secs(5));
        assert_eq!((next.listen.as_str(), next.workers), ("127.0.0.1:6432", 0));
        assert_eq!(next.origin.as_deref(), Some("postgres://app:pw@elsewhere/app"));
        assert_eq!(next.cache.max_size, running().cache.max_size);
    }

    #[test]
    fn the_origin_moves_with_its_address_tls_or_tunnel_but_not_its_login() {
        let with = |url: &str| Config { origin: Some(url.into()), ..Config::default() };
        let base = with("postgres://app:pw@db:5432/app");
        let moved = |next: &Config| origin_move(&base, next);
        assert_eq!(moved(&base.clone()), OriginMove::None);
        assert_eq!(moved(&with("postgres://app:new@db:5432/app")), OriginMove::None, "a new password");
        assert_eq!(moved(&with("postgres://other:pw@db/shop")), OriginMove::None, "another login and database");
        assert_eq!(moved(&with("postgres://app:pw@standby:5432/app")), OriginMove::Place);
        assert_eq!(moved(&with("postgres://app:pw@db:5433/app")), OriginMove::Place);
        assert_eq!(moved(&with("postgres://app:pw@db:5432/app?sslmode=require")), OriginMove::Route);
        let tunnelled = Config { tunnel_url: Some("ws://edge:8080".into()), ..base.clone() };
        assert_eq!(moved(&tunnelled), OriginMove::Place);
        let token = Config { tunnel_client_secret: Some("rotated".into()), ..tunnelled.clone() };
        assert_eq!(origin_move(&tunnelled, &token), OriginMove::Route);

        // To the server's socket on the same machine, and TLS settings there (which mean nothing).
        let socket = with("postgres://app:pw@%2Frun%2Fpostgresql:5432/app");
        assert_eq!(moved(&socket), OriginMove::Place);
        let socket_tls = with("postgres://app:pw@%2Frun%2Fpostgresql:5432/app?sslmode=require");
        assert_eq!(origin_move(&socket, &socket_tls), OriginMove::None);
    }

    #[test]
    fn the_upkeep_settings_reload() {
        let mut loaded = running();
        loaded.min_pool_size = 2;
        loaded.server_lifetime = Duration::from_secs(60);
        loaded.idle_transaction_timeout = Duration::from_secs(5);
        loaded.client_idle_timeout = Duration::from_secs(300);
        loaded.query_timeout = Duration::from_secs(60);
        let (next, changes) = reconcile(&running(), loaded.clone());
        assert_eq!(
            changes.applied,
            vec![
                "min_pool_size",
                "server_lifetime",
                "idle_transaction_timeout",
                "client_idle_timeout",
                "query_timeout"
            ]
        );
        assert_eq!(next, loaded);
    }

    #[test]
    fn a_new_login_counts_as_a_users_change() {
        let mut loaded = running();
        let user = crate::config::UserConfig { password: "pw".into(), origin_user: None, origin_password: None };
        loaded.users.insert("reporting".into(), user);
        assert_eq!(reconcile(&running(), loaded).1.applied, vec!["users"]);
    }
}
