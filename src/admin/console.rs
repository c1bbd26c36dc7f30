//! The admin console: `psql "host=... dbname=pgwarp user=<an admin user>"`, then `SHOW POOLS;`
//! and friends, as PgBouncer's `pgbouncer` database offers.
//!
//! Users named in `admin_users` log in with their usual password; the database name `pgwarp`
//! then reaches this console instead of the origin. It takes simple queries only, one command
//! each. `SHOW ...` answers from the same snapshot as `/metrics` (or from the rosters, for
//! CLIENTS and SERVERS); the other commands (`SHOW HELP` lists them) act on the server, as
//! PgBouncer's of the same names do. `parse` and `answer` are pure; `serve` owns the socket.

use std::collections::VecDeque;
use std::sync::Arc;

use bytes::BytesMut;
use tokio::io::AsyncWriteExt;

use super::listing::Listing;
use super::metrics::Snapshot;
use crate::config::Config;
use crate::protocol::error::{Severity, SqlState};
use crate::protocol::frontend::{query_text, QUERY, SYNC, TERMINATE};
use crate::protocol::{build, Message, MessageReader};
use crate::server::{ServerContext, ShutdownMode};
use crate::transport::ClientStream;

/// The database name that reaches the console.
pub const DATABASE: &str = "pgwarp";

pub(super) const TEXT: u32 = 25;
pub(super) const INT8: u32 = 20;
pub(super) const FLOAT8: u32 = 701;
pub(super) const BOOL: u32 = 16;

/// What `SHOW` can show.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Show {
    Help,
    Version,
    Pools,
    Clients,
    Servers,
    Stats,
    Cache,
    Config,
}

/// A console command. `Option<String>`: one database, or (`None`) all of them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command {
    Show(Show),
    /// Stop lending origin connections; answered once every one is back.
    Pause(Option<String>),
    Resume(Option<String>),
    /// Refuse new logins to a database; its connected clients carry on.
    Disable(String),
    Enable(String),
    Reload,
    /// Replace the origin connections as they come back.
    Reconnect(Option<String>),
    /// Wait until no connection a RECONNECT (or a new origin) replaced is open.
    WaitClose(Option<String>),
    /// End the clients and their origin connections now; the database stays paused.
    Kill(Option<String>),
    /// End one client (its `SHOW CLIENTS` id) and its origin connection now.
    KillClient(u64),
    Shutdown(ShutdownMode),
}

const SHOWS: [(&str, Show, &str); 8] = [
    ("HELP", Show::Help, "this list"),
    ("VERSION", Show::Version, "the pgwarp version"),
    ("POOLS", Show::Pools, "one row per (database, user) pool: connections, waiting clients, checkouts"),
    ("CLIENTS", Show::Clients, "one row per logged-in client: state (active, waiting, idle), address, connection held"),
    ("SERVERS", Show::Servers, "one row per origin connection: state (active, idle), transport, client served"),
    ("STATS", Show::Stats, "clients, logins, refusals by SQLSTATE, uptime, paused"),
    ("CACHE", Show::Cache, "the query cache: size, hits, misses, reasons for not caching"),
    ("CONFIG", Show::Config, "the settings in effect (no secrets)"),
];

/// The commands other than SHOW, as `SHOW HELP` lists them: `[db]` is an optional database
/// name (without it, every database), `db` a required one.
const COMMANDS: [(&str, &str); 10] = [
    ("PAUSE [db]", "stop lending origin connections; answers once every one is back in its pool"),
    ("RESUME [db]", "lend origin connections again after PAUSE or KILL (without db: end every pause)"),
    ("DISABLE db", "refuse new logins to db (SQLSTATE 55000); its connected clients carry on"),
    ("ENABLE db", "take logins to db again after DISABLE"),
    ("RELOAD", "re-read the config file and apply what can change without a restart"),
    ("RECONNECT [db]", "close each origin connection once its transaction ends; new ones open as needed"),
    ("WAIT_CLOSE [db]", "answer once every connection RECONNECT or a new origin replaced has closed"),
    ("KILL [db]", "close the clients and their origin connections now (57P01); new transactions wait until RESUME"),
    ("KILL_CLIENT id", "close one client (its SHOW CLIENTS id) and its origin connection now (57P01)"),
    (
        "SHUTDOWN [WAIT_FOR_SERVERS | WAIT_FOR_CLIENTS]",
        "stop pgwarp: closing every client now, once transactions end (as SIGTERM), or once clients leave",
    ),
];

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum ConsoleError {
    #[error("unknown admin command: try SHOW HELP")]
    Unknown,
}

/// The command in a simple query: a verb and at most one argument (see `COMMANDS`), any case,
/// an optional trailing semicolon. A database name is taken as written, or from inside double
/// quotes.
pub fn parse(sql: &str) -> Result<Command, ConsoleError> {
    let sql = sql.trim().trim_end_matches(';').trim_end();
    let words: Vec<&str> = sql.split_whitespace().collect();
    let (verb, arg) = match words.as_slice() {
        [verb] => (verb.to_ascii_uppercase(), None),
        [verb, arg] => (verb.to_ascii_uppercase(), Some(*arg)),
        _ => return Err(ConsoleError::Unknown),
    };
    let database = || arg.map(database_name).transpose();
    match (verb.as_str(), arg) {
        ("SHOW", Some(name)) => SHOWS
            .iter()
            .find(|(n, _, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, s, _)| Command::Show(*s))
            .ok_or(ConsoleError::Unknown),
        ("PAUSE", _) => database().map(Command::Pause),
        ("RESUME", _) => database().map(Command::Resume),
        ("RECONNECT", _) => database().map(Command::Reconnect),
        ("WAIT_CLOSE", _) => database().map(Command::WaitClose),
        ("KILL", _) => database().map(Command::Kill),
        ("DISABLE", Some(name)) => database_name(name).map(Command::Disable),
        ("ENABLE", Some(name)) => database_name(name).map(Command::Enable),
        ("RELOAD", None) => Ok(Command::Reload),
        ("KILL_CLIENT", Some(id)) => id.parse().map(Command::KillClient).map_err(|_| ConsoleError::Unknown),
        ("SHUTDOWN", None) => Ok(Command::Shutdown(ShutdownMode::Now)),
        ("SHUTDOWN", Some(mode)) if mode.eq_ignore_ascii_case("WAIT_FOR_SERVERS") => {
            Ok(Command::Shutdown(ShutdownMode::Drain))
        }
        ("SHUTDOWN", Some(mode)) if mode.eq_ignore_ascii_case("WAIT_FOR_CLIENTS") => {
            Ok(Command::Shutdown(ShutdownMode::WaitForClients))
        }
        _ => Err(ConsoleError::Unknown),
    }
}

/// A database name as written, or from inside double quotes; never empty.
fn database_name(word: &str) -> Result<String, ConsoleError> {
    let name = word.strip_prefix('"').and_then(|d| d.strip_suffix('"')).unwrap_or(word);
    if name.is_empty() {
        return Err(ConsoleError::Unknown);
    }
    Ok(name.to_owned())
}

/// A result set: columns `(name, type oid)` and text rows (`None` is NULL).
#[derive(Debug, PartialEq)]
pub struct Table {
    pub columns: Vec<(&'static str, u32)>,
    pub rows: Vec<Vec<Option<String>>>,
}

impl Table {
    fn settings(rows: Vec<(&str, String)>) -> Table {
        Table {
            columns: vec![("name", TEXT), ("value", TEXT)],
            rows: rows.into_iter().map(|(k, v)| vec![Some(k.to_owned()), Some(v)]).collect(),
        }
    }

    fn text(columns: Vec<(&'static str, u32)>, rows: Vec<Vec<String>>) -> Table {
        Table { columns, rows: rows.into_iter().map(|r| r.into_iter().map(Some).collect()).collect() }
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

/// The answer to `show`. CLIENTS and SERVERS come from `listing`.
pub fn answer(show: Show, snapshot: &Snapshot, listing: &Listing, config: &Config) -> Table {
    match show {
        Show::Help => Table::text(
            vec![("command", TEXT), ("does", TEXT)],
            SHOWS
                .iter()
                .map(|(n, _, what)| vec![format!("SHOW {n}"), (*what).to_owned()])
                .chain(COMMANDS.iter().map(|(usage, what)| vec![(*usage).to_owned(), (*what).to_owned()]))
                .collect(),
        ),
        Show::Version => Table::text(vec![("version", TEXT)], vec![vec![format!("pgwarp {}", snapshot.version)]]),
        Show::Pools => pools_table(snapshot),
        Show::Clients => listing.clients_table(),
        Show::Servers => listing.servers_table(),
        Show::Stats => {
            let rows = vec![
                ("clients", snapshot.clients.to_string()),
                ("max_clients", snapshot.max_clients.to_string()),
                ("logins", snapshot.logins.to_string()),
                ("uptime_seconds", format!("{:.0}", snapshot.uptime_seconds)),
                ("draining", snapshot.draining.to_string()),
                ("paused", snapshot.paused.to_string()),
                ("disabled", snapshot.disabled.join(",")),
            ];
            let mut table = Table::settings(rows);
            table.rows.extend(
                snapshot.refusals.iter().map(|(code, n)| vec![Some(format!("refusals_{code}")), Some(n.to_string())]),
            );
            table
        }
        Show::Cache => match &snapshot.cache {
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
                table.rows.extend(
                    c.uncacheable.iter().map(|(r, n)| vec![Some(format!("uncacheable_{r}")), Some(n.to_string())]),
                );
                table
            }
        },
        Show::Config => Table::settings(config_rows(config)),
    }
}

/// `SHOW POOLS`.
fn pools_table(snapshot: &Snapshot) -> Table {
    Table::text(
        vec![
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
            ("paused", BOOL),
            ("replaced", INT8),
            ("transaction_seconds", FLOAT8),
            ("queries", INT8),
            ("query_seconds", FLOAT8),
            ("received_bytes", INT8),
            ("sent_bytes", INT8),
        ],
        snapshot
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
                    if p.paused { "t" } else { "f" }.to_owned(),
                    p.replaced.to_string(),
                    format!("{:.6}", p.transaction_seconds),
                    p.queries.to_string(),
                    format!("{:.6}", p.query_seconds),
                    p.received_bytes.to_string(),
                    p.sent_bytes.to_string(),
                ]
            })
            .collect(),
    )
}

/// The settings worth seeing, without passwords or tokens.
fn config_rows(c: &Config) -> Vec<(&'static str, String)> {
    // OriginUrl's Debug leaves the password out.
    let origin = c.origin_url().map(|u| format!("{u:?}")).unwrap_or_default();
    let duration = |d: std::time::Duration| humantime::format_duration(d).to_string();
    vec![
        ("listen", c.listen.clone()),
        ("so_reuseport", c.so_reuseport.to_string()),
        ("unix_socket_dir", c.unix_socket_dir.as_ref().map(|d| d.display().to_string()).unwrap_or_default()),
        ("unix_socket_mode", format!("{:04o}", c.unix_socket_mode)),
        ("origin", origin),
        ("pool_size", c.pool_size.to_string()),
        ("max_client_conn", c.max_client_conn.to_string()),
        ("pool_timeout", duration(c.pool_timeout)),
        ("reserve_pool_size", c.reserve_pool_size.to_string()),
        ("reserve_pool_timeout", duration(c.reserve_pool_timeout)),
        ("idle_timeout", duration(c.idle_timeout)),
        ("min_pool_size", c.min_pool_size.to_string()),
        ("max_db_connections", c.max_db_connections.to_string()),
        ("max_user_connections", c.max_user_connections.to_string()),
        ("server_lifetime", duration(c.server_lifetime)),
        ("idle_transaction_timeout", duration(c.idle_transaction_timeout)),
        ("client_idle_timeout", duration(c.client_idle_timeout)),
        ("query_timeout", duration(c.query_timeout)),
        ("connect_timeout", duration(c.connect_timeout)),
        ("tcp_keepalive", c.tcp_keepalive.to_string()),
        ("tcp_keepidle", duration(c.tcp_keepidle)),
        ("tcp_keepintvl", duration(c.tcp_keepintvl)),
        ("tcp_keepcnt", c.tcp_keepcnt.to_string()),
        ("tcp_user_timeout", duration(c.tcp_user_timeout)),
        ("shutdown_timeout", duration(c.shutdown_timeout)),
        ("stats_period", duration(c.stats_period)),
        ("log_connections", c.log_connections.to_string()),
        ("log_disconnections", c.log_disconnections.to_string()),
        ("workers", c.workers.to_string()),
        ("busy_poll", c.busy_poll.map_or_else(|| "auto".to_string(), duration)),
        ("auth_method", format!("{:?}", c.auth_method)),
        ("auth_query", c.auth_query.clone().unwrap_or_default()),
        ("auth_user", c.auth_user.clone().unwrap_or_default()),
        ("auth_dbname", c.auth_dbname.clone().unwrap_or_default()),
        ("statement_cache_size", c.statement_cache_size.to_string()),
        ("cache.enabled", c.cache.enabled.to_string()),
        ("cache.max_age", duration(c.cache.max_age)),
        ("cache.stale_while_revalidate", duration(c.cache.stale_while_revalidate)),
        ("cache.max_size", c.cache.max_size.to_string()),
        ("cache.max_entry_size", c.cache.max_entry_size.to_string()),
        ("tls", c.tls_cert.is_some().to_string()),
        ("tls_required", c.tls_required.to_string()),
        ("tls_client_cert", c.client_cert_check().map_or("off", |check| check.as_str()).to_owned()),
        ("tunnel_url", c.tunnel_url.clone().unwrap_or_default()),
        ("tunnel_ping_interval", duration(c.tunnel_ping_interval)),
        ("admin_listen", c.admin_listen.clone().unwrap_or_default()),
        ("admin_users", c.admin_users.join(",")),
    ]
}

/// Runs the console for a logged-in admin until it leaves. The login's AuthenticationOk has
/// been sent; this sends the rest of the greeting.
pub async fn serve(ctx: &Arc<ServerContext>, stream: &mut ClientStream, mut reader: MessageReader) {
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
    // Messages that arrived while a PAUSE was waiting, to handle after it.
    let mut backlog = VecDeque::new();
    loop {
        if stream.write_all(&out).await.is_err() {
            return;
        }
        out.clear();
        let msg = match backlog.pop_front() {
            Some(msg) => msg,
            None => match next_message(ctx, stream, &mut reader).await {
                Some(msg) => msg,
                None => return,
            },
        };
        match msg.tag() {
            TERMINATE => return,
            QUERY => {
                let command = query_text(msg.body())
                    .map_err(|e| e.to_string())
                    .and_then(|sql| parse(sql).map_err(|e| e.to_string()));
                match command {
                    Ok(command) => {
                        if !run(ctx, command, stream, &mut reader, &mut backlog, &mut out).await {
                            return;
                        }
                    }
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

/// Carries out `command`, adding its answer to `out`. False: the console went away meanwhile.
async fn run(
    ctx: &Arc<ServerContext>,
    command: Command,
    stream: &mut ClientStream,
    reader: &mut MessageReader,
    backlog: &mut VecDeque<Message>,
    out: &mut BytesMut,
) -> bool {
    let refused = |e: &dyn std::fmt::Display| {
        build::error(Severity::Error, SqlState::OBJECT_NOT_IN_PREREQUISITE_STATE, &e.to_string())
    };
    // Any name is a database to pgwarp until someone logs in to it: a misspelt one is no
    // error, but the operator hears that nothing was there.
    let unknown = |database: Option<&String>| match database {
        Some(d) if !ctx.pools.serves(d) => build::notice(&format!(
            "nobody has used database {d:?} yet: this applies to those who log in to it from now on"
        )),
        _ => bytes::Bytes::new(),
    };
    if let Command::Pause(database) | Command::Kill(database) = &command {
        out.extend_from_slice(&unknown(database.as_ref()));
    }
    if let Command::Disable(database) = &command {
        out.extend_from_slice(&unknown(Some(database)));
    }
    match command {
        Command::Show(show) => {
            let listing =
                if matches!(show, Show::Clients | Show::Servers) { Listing::take(ctx) } else { Listing::default() };
            answer(show, &Snapshot::take(ctx), &listing, &ctx.config()).encode_into(out);
        }
        Command::Pause(database) => match pause(ctx, database.as_deref(), stream, reader, backlog).await {
            Some(answer) => out.extend_from_slice(&answer),
            None => return false,
        },
        Command::Disable(database) => {
            if ctx.pools.disable(&database) {
                tracing::info!(database, "DISABLE: new logins are refused");
            } else {
                out.extend_from_slice(&build::notice(&format!("database {database:?} was already disabled")));
            }
            out.extend_from_slice(&build::command_complete("DISABLE"));
        }
        Command::Enable(database) => {
            if ctx.pools.enable(&database) {
                tracing::info!(database, "ENABLE: logins are taken again");
            } else {
                out.extend_from_slice(&build::notice(&format!("database {database:?} was not disabled")));
            }
            out.extend_from_slice(&build::command_complete("ENABLE"));
        }
        Command::Kill(database) => {
            let killed = kill(ctx, database.as_deref());
            let what = database.as_ref().map_or_else(|| "every database".to_owned(), |d| format!("database {d:?}"));
            out.extend_from_slice(&build::notice(&format!(
                "closed {killed} client(s); {what} is paused: new transactions wait until RESUME"
            )));
            out.extend_from_slice(&build::command_complete("KILL"));
        }
        Command::KillClient(id) => match ctx.client_roster.list().into_iter().find(|c| c.id == id) {
            Some(client) if client.kill() => {
                tracing::info!(client = id, user = %client.user, database = %client.database, "KILL_CLIENT");
                out.extend_from_slice(&build::command_complete("KILL_CLIENT"));
            }
            Some(_) => {
                out.extend_from_slice(&refused(&format!("client {id} is an admin console: it cannot be killed")))
            }
            None => out.extend_from_slice(&build::error(
                Severity::Error,
                SqlState::UNDEFINED_OBJECT,
                &format!("no client with id {id} (see SHOW CLIENTS)"),
            )),
        },
        Command::Shutdown(mode) => {
            tracing::info!(?mode, "SHUTDOWN from the admin console");
            ctx.shutdown(mode);
            // Answered once the port is let go, so whoever asked may count on it. (The other
            // modes close this console right after the answer.)
            if mode == ShutdownMode::WaitForClients
                && answer_when(ctx, stream, reader, backlog, ctx.listener_closed()).await.is_none()
            {
                return false;
            }
            out.extend_from_slice(&build::command_complete("SHUTDOWN"));
        }
        Command::Reconnect(database) => {
            let pools = ctx.pools.reconnect(database.as_deref());
            tracing::info!(database = database.as_deref().unwrap_or("(all)"), pools, "RECONNECT");
            if pools == 0 {
                out.extend_from_slice(&build::notice(&match &database {
                    Some(d) => format!("no pool serves database {d:?} yet"),
                    None => "no pools yet".to_owned(),
                }));
            }
            out.extend_from_slice(&build::command_complete("RECONNECT"));
        }
        Command::WaitClose(database) => {
            let closed = ctx.pools.wait_close(database.as_deref());
            if answer_when(ctx, stream, reader, backlog, closed).await.is_none() {
                return false;
            }
            out.extend_from_slice(&build::command_complete("WAIT_CLOSE"));
        }
        Command::Resume(database) => match ctx.pools.resume(database.as_deref()) {
            Ok(()) => out.extend_from_slice(&build::command_complete("RESUME")),
            Err(e) => out.extend_from_slice(&refused(&e)),
        },
        Command::Reload => match crate::server::reload(ctx).await {
            Ok(notices) => {
                for notice in notices {
                    out.extend_from_slice(&build::notice(&notice));
                }
                out.extend_from_slice(&build::command_complete("RELOAD"));
            }
            Err(e) => out.extend_from_slice(&build::error(
                Severity::Error,
                SqlState::CONFIG_FILE_ERROR,
                &format!("{e}; nothing was changed"),
            )),
        },
    }
    true
}

/// The client's next message; `None` when the console should end (the client left or broke
/// the protocol, or shutdown began: those were told why).
async fn next_message(ctx: &ServerContext, stream: &mut ClientStream, reader: &mut MessageReader) -> Option<Message> {
    let read = tokio::select! {
        // Shutdown closes an idle console as it closes idle clients, even one whose next
        // command has just arrived.
        biased;
        () = ctx.drain.cancelled() => {
            let bye = build::error(Severity::Fatal, SqlState::ADMIN_SHUTDOWN, "pgwarp is shutting down");
            let _ = stream.write_all(&bye).await;
            return None;
        }
        read = reader.read(stream) => read,
    };
    match read {
        Ok(Some(msg)) => Some(msg),
        Ok(None) => None,
        Err(e) => {
            let error = build::error(Severity::Fatal, SqlState::PROTOCOL_VIOLATION, &e.to_string());
            let _ = stream.write_all(&error).await;
            None
        }
    }
}

/// KILL: holds back new transactions of `database` (every database when `None`), replaces its
/// origin connections, and closes its clients. The number of clients closed.
fn kill(ctx: &ServerContext, database: Option<&str>) -> usize {
    // First the pause, so that no connection a killed client gives up is lent again; it stays
    // in effect (already paused is fine) until RESUME. Its holders run on their own.
    drop(ctx.pools.pause(database));
    ctx.pools.close_connections(database);
    let killed =
        ctx.client_roster.list().into_iter().filter(|c| database.is_none_or(|d| *c.database == *d) && c.kill()).count();
    tracing::info!(database = database.unwrap_or("(all)"), clients = killed, "KILL");
    killed
}

/// PAUSE: the answer once every origin connection is back in its pool (or why not), or `None`
/// when the console went away meanwhile (the pause stays in effect).
async fn pause(
    ctx: &ServerContext,
    database: Option<&str>,
    stream: &mut ClientStream,
    reader: &mut MessageReader,
    backlog: &mut VecDeque<Message>,
) -> Option<bytes::Bytes> {
    let done = match ctx.pools.pause(database) {
        Ok(done) => done,
        Err(e) => {
            return Some(build::error(Severity::Error, SqlState::OBJECT_NOT_IN_PREREQUISITE_STATE, &e.to_string()))
        }
    };
    let Some(held) = answer_when(ctx, stream, reader, backlog, done).await else {
        tracing::warn!("the console that sent PAUSE left before the answer; pgwarp stays paused until RESUME");
        return None;
    };
    Some(if held {
        tracing::info!("PAUSE: every origin connection is back in its pool");
        build::command_complete("PAUSE")
    } else {
        build::error(
            Severity::Error,
            SqlState::OBJECT_NOT_IN_PREREQUISITE_STATE,
            "RESUME came before every origin connection was back",
        )
    })
}

/// Waits for `done` while still reading the console: what it sends meanwhile goes to
/// `backlog`, to be handled after. `None` when the console went away first.
async fn answer_when<T>(
    ctx: &ServerContext,
    stream: &mut ClientStream,
    reader: &mut MessageReader,
    backlog: &mut VecDeque<Message>,
    done: impl std::future::Future<Output = T>,
) -> Option<T> {
    tokio::pin!(done);
    loop {
        tokio::select! {
            value = &mut done => return Some(value),
            msg = next_message(ctx, stream, reader) => match msg {
                Some(msg) if msg.tag() != TERMINATE => backlog.push_back(msg),
                _ => return None,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pool::PoolSnapshot;

    #[test]
    fn commands_parse_in_any_case_with_an_optional_semicolon() {
        assert_eq!(parse("SHOW POOLS"), Ok(Command::Show(Show::Pools)));
        assert_eq!(parse("  show pools ;  "), Ok(Command::Show(Show::Pools)));
        assert_eq!(parse("Show Cache;"), Ok(Command::Show(Show::Cache)));
        assert_eq!(parse("show clients"), Ok(Command::Show(Show::Clients)));
        assert_eq!(parse("SHOW SERVERS;"), Ok(Command::Show(Show::Servers)));
        assert_eq!(parse("pause;"), Ok(Command::Pause(None)));
        assert_eq!(parse("PAUSE shop"), Ok(Command::Pause(Some("shop".into()))));
        assert_eq!(parse(" Resume "), Ok(Command::Resume(None)));
        assert_eq!(parse("resume \"Shop Db\""), Err(ConsoleError::Unknown), "one word only");
        assert_eq!(parse("resume \"Shop\""), Ok(Command::Resume(Some("Shop".into()))));
        assert_eq!(parse("RELOAD"), Ok(Command::Reload));
        assert_eq!(parse("disable shop"), Ok(Command::Disable("shop".into())));
        assert_eq!(parse("ENABLE shop;"), Ok(Command::Enable("shop".into())));
        assert_eq!(parse("KILL"), Ok(Command::Kill(None)));
        assert_eq!(parse("kill shop"), Ok(Command::Kill(Some("shop".into()))));
        assert_eq!(parse("KILL_CLIENT 42"), Ok(Command::KillClient(42)));
        assert_eq!(parse("shutdown"), Ok(Command::Shutdown(ShutdownMode::Now)));
        assert_eq!(parse("SHUTDOWN wait_for_servers"), Ok(Command::Shutdown(ShutdownMode::Drain)));
        assert_eq!(parse("SHUTDOWN WAIT_FOR_CLIENTS;"), Ok(Command::Shutdown(ShutdownMode::WaitForClients)));
        assert_eq!(parse("reconnect;"), Ok(Command::Reconnect(None)));
        assert_eq!(parse("RECONNECT shop"), Ok(Command::Reconnect(Some("shop".into()))));
        assert_eq!(parse("WAIT_CLOSE \"shop\""), Ok(Command::WaitClose(Some("shop".into()))));
        assert_eq!(parse("WAIT_CLOSE"), Ok(Command::WaitClose(None)));
        for bad in [
            "",
            "SHOW",
            "SHOW NOTHING",
            "SELECT 1",
            "SHOW POOLS; SHOW STATS",
            "SHOW POOLS EXTRA",
            "PAUSE a b",
            "DISABLE",
            "ENABLE",
            "KILL_CLIENT",
            "KILL_CLIENT x",
            "KILL_CLIENT -1",
            "SHUTDOWN NOW",
            "SHUTDOWN WAIT_FOR_CLIENTS x",
            "SHOW PAUSE",
            "RELOAD NOW",
            "POOLS",
            "RECONNECT a b",
            "RECONNECT \"\"",
            "WAIT_CLOSE;;x",
        ] {
            assert_eq!(parse(bad), Err(ConsoleError::Unknown), "{bad:?}");
        }
    }

    #[test]
    fn help_lists_every_command() {
        let help = answer(Show::Help, &Snapshot::default(), &Listing::default(), &Config::default());
        let names: Vec<&str> = help.rows.iter().filter_map(|r| r[0].as_deref()).collect();
        assert_eq!(names.len(), SHOWS.len() + COMMANDS.len());
        for name in ["SHOW CLIENTS", "SHOW SERVERS", "PAUSE [db]", "RELOAD", "KILL_CLIENT id", "SHUTDOWN"] {
            assert!(names.iter().any(|n| n.starts_with(name)), "{name} in {names:?}");
        }
        // Each usage line parses, with and without its optional part.
        for name in names {
            let with = name.replace("[db]", "shop").replace(" db", " shop").replace(" id", " 7");
            let with = with.replace("[WAIT_FOR_SERVERS | WAIT_FOR_CLIENTS]", "WAIT_FOR_CLIENTS");
            assert!(parse(&with).is_ok(), "{with}");
            let without = name.replace(" [db]", "").replace(" [WAIT_FOR_SERVERS | WAIT_FOR_CLIENTS]", "");
            if !without.contains(" db") && !without.contains(" id") {
                assert!(parse(&without).is_ok(), "{without}");
            }
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
                replaced: 0,
                paused: true,
                checkouts: 77,
                reserve_checkouts: 0,
                waits: 5,
                wait_seconds: 0.5,
                timeouts: 0,
                connects: 4,
                connect_failures: 1,
                transaction_seconds: 2.25,
                queries: 90,
                query_seconds: 1.125,
                received_bytes: 4000,
                sent_bytes: 9000,
            }],
            paused: true,
            ..Snapshot::default()
        };
        let table = answer(Show::Pools, &snapshot, &Listing::default(), &Config::default());
        assert_eq!(table.columns.len(), table.rows[0].len());
        let row: Vec<&str> = table.rows[0].iter().map(|c| c.as_deref().unwrap_or("NULL")).collect();
        let traffic = ["2.250000", "90", "1.125000", "4000", "9000"];
        let fixed = ["shop", "app", "20", "2", "3", "1", "77", "5", "0.500000", "0", "4", "1", "t", "0"];
        assert_eq!(row, [&fixed[..], &traffic[..]].concat());
        let version = answer(Show::Version, &snapshot, &Listing::default(), &Config::default());
        assert_eq!(version.rows, vec![vec![Some("pgwarp 9.9.9".to_owned())]]);
    }

    #[test]
    fn config_shows_no_passwords() {
        let config = Config {
            origin: Some("postgres://app:hunter2@db:5432/shop".into()),
            tunnel_client_secret: Some("token-secret".into()),
            ..Config::default()
        };
        let table = answer(Show::Config, &Snapshot::default(), &Listing::default(), &config);
        let text = format!("{:?}", table.rows);
        assert!(text.contains("db:5432") && !text.contains("hunter2") && !text.contains("token-secret"), "{text}");
    }
}
