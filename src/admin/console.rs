//! The admin console: `psql "host=... dbname=pgwarp user=<an admin user>"`, then `SHOW POOLS;`
//! and friends, as PgBouncer's `pgbouncer` database offers.
//!
//! Users named in `admin_users` log in with their usual password; the database name `pgwarp`
//! then reaches this console instead of the origin. It takes simple queries only, one command
//! each, and answers from the same snapshot as `/metrics`. `parse` and `answer` are pure; `serve`
//! owns the socket.

use bytes::BytesMut;
use tokio::io::AsyncWriteExt;

use super::metrics::Snapshot;
use crate::config::Config;
use crate::protocol::error::{Severity, SqlState};
use crate::protocol::frontend::{query_text, QUERY, SYNC, TERMINATE};
use crate::protocol::{build, MessageReader};
use crate::server::ServerContext;
use crate::transport::ClientStream;

/// The database name that reaches the console.
pub const DATABASE: &str = "pgwarp";

const TEXT: u32 = 25;
const INT8: u32 = 20;
const FLOAT8: u32 = 701;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    Help,
    Version,
    Pools,
    Stats,
    Cache,
    Config,
}

const COMMANDS: [(&str, Command, &str); 6] = [
    ("HELP", Command::Help, "this list"),
    ("VERSION", Command::Version, "the pgwarp version"),
    ("POOLS", Command::Pools, "one row per (database, user) pool: connections, waiting clients, checkouts"),
    ("STATS", Command::Stats, "clients, logins, refusals by SQLSTATE, uptime"),
    ("CACHE", Command::Cache, "the query cache: size, hits, misses, reasons for not caching"),
    ("CONFIG", Command::Config, "the settings in effect (no secrets)"),
];

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum ConsoleError {
    #[error("unknown admin command: try SHOW HELP")]
    Unknown,
}

/// The command in a simple query: `SHOW <NAME>`, any case, an optional trailing semicolon.
pub fn parse(sql: &str) -> Result<Command, ConsoleError> {
    let sql = sql.trim().trim_end_matches(';').trim_end();
    let mut words = sql.split_whitespace();
    let (Some(show), Some(name), None) = (words.next(), words.next(), words.next()) else {
        return Err(ConsoleError::Unknown);
    };
    if !show.eq_ignore_ascii_case("SHOW") {
        return Err(ConsoleError::Unknown);
    }
    COMMANDS.iter().find(|(n, _, _)| n.eq_ignore_ascii_case(name)).map(|(_, c, _)| *c).ok_or(ConsoleError::Unknown)
}

/// A result set: columns `(name, type oid)` and text rows.
#[derive(Debug, PartialEq)]
pub struct Table {
    pub columns: Vec<(&'static str, u32)>,
    pub rows: Vec<Vec<String>>,
}

impl Table {
    fn settings(rows: Vec<(&str, String)>) -> Table {
        Table {
            columns: vec![("name", TEXT), ("value", TEXT)],
            rows: rows.into_iter().map(|(k, v)| vec![k.to_owned(), v]).collect(),
        }
    }

    /// RowDescription, the rows, and CommandComplete `SHOW`.
    pub fn encode_into(&self, out: &mut BytesMut) {
        build::row_description_into(out, &self.columns);
        for row in &self.rows {
            build::data_row_into(out, row);
        }
        out.extend_from_slice(&build::command_complete("SHOW"));
    }
}

/// The answer to `command`.
pub fn answer(command: Command, snapshot: &Snapshot, config: &Config) -> Table {
    match command {
        Command::Help => Table {
            columns: vec![("command", TEXT), ("shows", TEXT)],
            rows: COMMANDS.iter().map(|(n, _, what)| vec![format!("SHOW {n}"), (*what).to_owned()]).collect(),
        },
        Command::Version => {
            Table { columns: vec![("version", TEXT)], rows: vec![vec![format!("pgwarp {}", snapshot.version)]] }
        }
        Command::Pools => Table {
            columns: vec![
                ("database", TEXT),
                ("user", TEXT),
                ("size", INT8),
                ("active", INT8),
                ("idle", INT8),
                ("waiting", INT8),
                ("checkouts", INT8),
                ("waits", INT8),
                ("wait_seconds", FLOAT8),
                ("timeouts", INT8),
                ("connects", INT8),
                ("connect_failures", INT8),
            ],
            rows: snapshot
                .pools
                .iter()
                .map(|p| {
                    vec![
                        p.database.clone(),
                        p.user.clone(),
                        p.size.to_string(),
                        p.active.to_string(),
                        p.idle.to_string(),
                        p.waiting.to_string(),
                        p.checkouts.to_string(),
                        p.waits.to_string(),
                        format!("{:.6}", p.wait_seconds),
                        p.timeouts.to_string(),
                        p.connects.to_string(),
                        p.connect_failures.to_string(),
                    ]
                })
                .collect(),
        },
        Command::Stats => {
            let rows = vec![
                ("clients", snapshot.clients.to_string()),
                ("max_clients", snapshot.max_clients.to_string()),
                ("logins", snapshot.logins.to_string()),
                ("uptime_seconds", format!("{:.0}", snapshot.uptime_seconds)),
                ("draining", snapshot.draining.to_string()),
            ];
            let mut table = Table::settings(rows);
            table
                .rows
                .extend(snapshot.refusals.iter().map(|(code, n)| vec![format!("refusals_{code}"), n.to_string()]));
            table
        }
        Command::Cache => match &snapshot.cache {
            None => Table::settings(vec![("enabled", "false".to_owned())]),
            Some(c) => {
                let rows = vec![
                    ("enabled", "true".to_owned()),
                    ("entries", c.entries.to_string()),
                    ("bytes", c.bytes.to_string()),
                    ("max_bytes", c.max_bytes.to_string()),
                    ("hits", c.hits.to_string()),
                    ("stale_hits", c.stale.to_string()),
                    ("misses", c.misses.to_string()),
                    ("stores", c.stores.to_string()),
                    ("invalidations", c.invalidations.to_string()),
                ];
                let mut table = Table::settings(rows);
                table.rows.extend(c.uncacheable.iter().map(|(r, n)| vec![format!("uncacheable_{r}"), n.to_string()]));
                table
            }
        },
        Command::Config => Table::settings(config_rows(config)),
    }
}

/// The settings worth seeing, without passwords or tokens.
fn config_rows(c: &Config) -> Vec<(&'static str, String)> {
    // OriginUrl's Debug leaves the password out.
    let origin = c.origin_url().map(|u| format!("{u:?}")).unwrap_or_default();
    let duration = |d: std::time::Duration| humantime::format_duration(d).to_string();
    vec![
        ("listen", c.listen.clone()),
        ("origin", origin),
        ("pool_size", c.pool_size.to_string()),
        ("max_client_conn", c.max_client_conn.to_string()),
        ("pool_timeout", duration(c.pool_timeout)),
        ("idle_timeout", duration(c.idle_timeout)),
        ("connect_timeout", duration(c.connect_timeout)),
        ("shutdown_timeout", duration(c.shutdown_timeout)),
        ("workers", c.workers.to_string()),
        ("auth_method", format!("{:?}", c.auth_method)),
        ("statement_cache_size", c.statement_cache_size.to_string()),
        ("cache.enabled", c.cache.enabled.to_string()),
        ("cache.max_age", duration(c.cache.max_age)),
        ("cache.stale_while_revalidate", duration(c.cache.stale_while_revalidate)),
        ("cache.max_size", c.cache.max_size.to_string()),
        ("cache.max_entry_size", c.cache.max_entry_size.to_string()),
        ("tls", c.tls_cert.is_some().to_string()),
        ("tls_required", c.tls_required.to_string()),
        ("tunnel_url", c.tunnel_url.clone().unwrap_or_default()),
        ("admin_listen", c.admin_listen.clone().unwrap_or_default()),
        ("admin_users", c.admin_users.join(",")),
    ]
}

/// Runs the console for a logged-in admin until it leaves. The login's AuthenticationOk has
/// been sent; this sends the rest of the greeting.
pub async fn serve(ctx: &ServerContext, stream: &mut ClientStream, mut reader: MessageReader) {
    let mut out = BytesMut::new();
    for (name, value) in [
        ("server_version", format!("{}/pgwarp", env!("CARGO_PKG_VERSION"))),
        ("server_encoding", "UTF8".to_owned()),
        ("client_encoding", "UTF8".to_owned()),
        ("DateStyle", "ISO, MDY".to_owned()),
        ("integer_datetimes", "on".to_owned()),
        ("standard_conforming_strings", "on".to_owned()),
    ] {
        out.extend_from_slice(&build::parameter_status(name, &value));
    }
    out.extend_from_slice(&build::backend_key_data(0, 0));
    out.extend_from_slice(&build::ready_for_query(b'I'));
    // After an extended-protocol message: ignore everything up to the Sync.
    let mut skipping = false;
    loop {
        if stream.write_all(&out).await.is_err() {
            return;
        }
        out.clear();
        let read = tokio::select! {
            read = reader.read(stream) => read,
            // Shutdown closes an idle console as it closes idle clients.
            () = ctx.drain.cancelled() => {
                let bye = build::error(Severity::Fatal, SqlState::ADMIN_SHUTDOWN, "pgwarp is shutting down");
                let _ = stream.write_all(&bye).await;
                return;
            }
        };
        let msg = match read {
            Ok(Some(msg)) => msg,
            Ok(None) => return,
            Err(e) => {
                let error = build::error(Severity::Fatal, SqlState::PROTOCOL_VIOLATION, &e.to_string());
                let _ = stream.write_all(&error).await;
                return;
            }
        };
        match msg.tag() {
            TERMINATE => return,
            QUERY => {
                let answer = query_text(msg.body()).map_err(|e| e.to_string()).and_then(|sql| {
                    parse(sql).map_err(|e| e.to_string()).map(|c| answer(c, &Snapshot::take(ctx), &ctx.config))
                });
                match answer {
                    Ok(table) => table.encode_into(&mut out),
                    Err(e) => out.extend_from_slice(&build::error(Severity::Error, SqlState::SYNTAX_ERROR, &e)),
                }
                out.extend_from_slice(&build::ready_for_query(b'I'));
            }
            SYNC => {
                skipping = false;
                out.extend_from_slice(&build::ready_for_query(b'I'));
            }
            _ if skipping => {}
            _ => {
                skipping = true;
                let message = "the admin console takes simple queries only (e.g. psql), not the extended protocol";
                out.extend_from_slice(&build::error(Severity::Error, SqlState::FEATURE_NOT_SUPPORTED, message));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pool::PoolSnapshot;

    #[test]
    fn show_commands_parse_in_any_case_with_an_optional_semicolon() {
        assert_eq!(parse("SHOW POOLS"), Ok(Command::Pools));
        assert_eq!(parse("  show pools ;  "), Ok(Command::Pools));
        assert_eq!(parse("Show Cache;"), Ok(Command::Cache));
        for bad in ["", "SHOW", "SHOW NOTHING", "SELECT 1", "SHOW POOLS; SHOW STATS", "SHOW POOLS EXTRA"] {
            assert_eq!(parse(bad), Err(ConsoleError::Unknown), "{bad:?}");
        }
    }

    #[test]
    fn pools_are_one_row_each_with_numbers_as_text() {
        let snapshot = Snapshot {
            version: "9.9.9",
            pools: vec![PoolSnapshot {
                user: "app".into(),
                database: "shop".into(),
                size: 20,
                active: 2,
                idle: 3,
                waiting: 1,
                checkouts: 77,
                waits: 5,
                wait_seconds: 0.5,
                timeouts: 0,
                connects: 4,
                connect_failures: 1,
            }],
            ..Snapshot::default()
        };
        let table = answer(Command::Pools, &snapshot, &Config::default());
        assert_eq!(table.columns.len(), table.rows[0].len());
        assert_eq!(table.rows, vec![vec!["shop", "app", "20", "2", "3", "1", "77", "5", "0.500000", "0", "4", "1"]]);
        let version = answer(Command::Version, &snapshot, &Config::default());
        assert_eq!(version.rows, vec![vec!["pgwarp 9.9.9".to_owned()]]);
    }

    #[test]
    fn config_shows_no_passwords() {
        let config = Config {
            origin: Some("postgres://app:hunter2@db:5432/shop".into()),
            tunnel_client_secret: Some("token-secret".into()),
            ..Config::default()
        };
        let table = answer(Command::Config, &Snapshot::default(), &config);
        let text = format!("{:?}", table.rows);
        assert!(text.contains("db:5432") && !text.contains("hunter2") && !text.contains("token-secret"), "{text}");
    }
}
