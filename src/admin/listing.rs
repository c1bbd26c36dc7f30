//! `SHOW CLIENTS` and `SHOW SERVERS`: one row per logged-in client and per open origin
//! connection, read from the rosters (`roster`). Taking the rows copies what the entries say
//! now; turning them into tables is pure and unit-tested here.

use std::collections::HashMap;
use std::time::SystemTime;

use super::console::{Table, BOOL, FLOAT8, INT8, TEXT};
use crate::roster::{clock, ClientState, ServerState};
use crate::server::ServerContext;
use crate::transport::Peer;

/// One client as `SHOW CLIENTS` shows it.
#[derive(Clone, Debug, PartialEq)]
pub struct ClientRow {
    pub id: u64,
    pub user: String,
    pub database: String,
    pub state: ClientState,
    /// The roster clock's reading when the state began.
    pub since_ms: u64,
    pub peer: Peer,
    pub worker: usize,
    pub tls: bool,
    pub application_name: String,
    pub connected_at: SystemTime,
    pub statements: u32,
}

/// One origin connection as `SHOW SERVERS` shows it.
#[derive(Clone, Debug, PartialEq)]
pub struct ServerRow {
    pub id: u64,
    pub user: String,
    pub database: String,
    pub state: ServerState,
    pub since_ms: u64,
    pub pid: i32,
    pub transport: &'static str,
    pub connected_at: SystemTime,
    /// The client it is lent to; 0 for none (or pgwarp's own work).
    pub client: u64,
    pub statements: u32,
}

/// Both rosters at (about) one moment, with the clock reading they are measured against.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Listing {
    pub now_ms: u64,
    pub clients: Vec<ClientRow>,
    pub servers: Vec<ServerRow>,
}

impl Listing {
    pub fn take(ctx: &ServerContext) -> Listing {
        let clients = ctx
            .client_roster
            .list()
            .iter()
            .map(|c| {
                let (state, since_ms) = c.state();
                ClientRow {
                    id: c.id,
                    user: c.user.to_string(),
                    database: c.database.to_string(),
                    state,
                    since_ms,
                    peer: c.peer,
                    worker: c.worker,
                    tls: c.tls,
                    application_name: c.application_name(),
                    connected_at: c.connected_at,
                    statements: c.statements(),
                }
            })
            .collect();
        let servers = ctx
            .pools
            .servers
            .list()
            .iter()
            .map(|s| {
                let (state, since_ms) = s.state();
                ServerRow {
                    id: s.id,
                    user: s.user.to_string(),
                    database: s.database.to_string(),
                    state,
                    since_ms,
                    pid: s.pid,
                    transport: s.transport,
                    connected_at: s.connected_at,
                    client: if state == ServerState::Active { s.client() } else { 0 },
                    statements: s.statements(),
                }
            })
            .collect();
        Listing { now_ms: clock::now_ms(), clients, servers }
    }

    /// `SHOW CLIENTS`.
    pub fn clients_table(&self) -> Table {
        // Which connection each active client holds: the servers say whom they serve.
        let held: HashMap<u64, u64> = self.servers.iter().filter(|s| s.client != 0).map(|s| (s.client, s.id)).collect();
        Table {
            columns: vec![
                ("id", INT8),
                ("user", TEXT),
                ("database", TEXT),
                ("state", TEXT),
                ("state_seconds", FLOAT8),
                ("addr", TEXT),
                ("port", INT8),
                ("worker", INT8),
                ("tls", BOOL),
                ("application_name", TEXT),
                ("connect_time", TEXT),
                ("server_id", INT8),
                ("prepared_statements", INT8),
            ],
            rows: self
                .clients
                .iter()
                .map(|c| {
                    vec![
                        Some(c.id.to_string()),
                        Some(c.user.clone()),
                        Some(c.database.clone()),
                        Some(c.state.as_str().to_owned()),
                        Some(self.seconds_since(c.since_ms)),
                        Some(c.peer.addr()),
                        c.peer.port().map(|p| p.to_string()),
                        Some(c.worker.to_string()),
                        Some(bool_text(c.tls)),
                        Some(c.application_name.clone()),
                        Some(timestamp(c.connected_at)),
                        held.get(&c.id).map(u64::to_string),
                        Some(c.statements.to_string()),
                    ]
                })
                .collect(),
        }
    }

    /// `SHOW SERVERS`.
    pub fn servers_table(&self) -> Table {
        Table {
            columns: vec![
                ("id", INT8),
                ("user", TEXT),
                ("database", TEXT),
                ("state", TEXT),
                ("state_seconds", FLOAT8),
                ("transport", TEXT),
                ("pid", INT8),
                ("connect_time", TEXT),
                ("client_id", INT8),
                ("prepared_statements", INT8),
            ],
            rows: self
                .servers
                .iter()
                .map(|s| {
                    vec![
                        Some(s.id.to_string()),
                        Some(s.user.clone()),
                        Some(s.database.clone()),
                        Some(s.state.as_str().to_owned()),
                        Some(self.seconds_since(s.since_ms)),
                        Some(s.transport.to_owned()),
                        Some(s.pid.to_string()),
                        Some(timestamp(s.connected_at)),
                        (s.client != 0).then(|| s.client.to_string()),
                        Some(s.statements.to_string()),
                    ]
                })
                .collect(),
        }
    }

    fn seconds_since(&self, since_ms: u64) -> String {
        format!("{:.1}", self.now_ms.saturating_sub(since_ms) as f64 / 1000.0)
    }
}

fn bool_text(b: bool) -> String {
    if b { "t" } else { "f" }.to_owned()
}

/// UTC, to the second: `2026-01-31T12:00:00Z`.
fn timestamp(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn listing() -> Listing {
        let at = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let client = |id, state, since_ms| ClientRow {
            id,
            user: "app".into(),
            database: "shop".into(),
            state,
            since_ms,
            peer: Peer::Tcp("10.0.0.7:51000".parse().unwrap()),
            worker: 1,
            tls: id == 2,
            application_name: format!("job{id}"),
            connected_at: at,
            statements: 3,
        };
        Listing {
            now_ms: 10_000,
            clients: vec![client(1, ClientState::Active, 7_500), client(2, ClientState::Waiting, 9_900)],
            servers: vec![
                ServerRow {
                    id: 40,
                    user: "app".into(),
                    database: "shop".into(),
                    state: ServerState::Active,
                    since_ms: 7_500,
                    pid: 4242,
                    transport: "tls",
                    connected_at: at,
                    client: 1,
                    statements: 5,
                },
                ServerRow {
                    id: 41,
                    user: "app".into(),
                    database: "shop".into(),
                    state: ServerState::Idle,
                    since_ms: 0,
                    pid: 4243,
                    transport: "tcp",
                    connected_at: at,
                    client: 0,
                    statements: 0,
                },
            ],
        }
    }

    fn text(row: &[Option<String>]) -> Vec<&str> {
        row.iter().map(|c| c.as_deref().unwrap_or("NULL")).collect()
    }

    #[test]
    fn clients_show_their_state_and_the_connection_an_active_one_holds() {
        let table = listing().clients_table();
        assert!(table.rows.iter().all(|r| r.len() == table.columns.len()));
        assert_eq!(
            text(&table.rows[0]),
            [
                "1",
                "app",
                "shop",
                "active",
                "2.5",
                "10.0.0.7",
                "51000",
                "1",
                "f",
                "job1",
                "2023-11-14T22:13:20Z",
                "40",
                "3"
            ]
        );
        assert_eq!(text(&table.rows[1])[3..5], ["waiting", "0.1"]);
        assert_eq!(text(&table.rows[1])[8], "t");
        assert_eq!(text(&table.rows[1])[11], "NULL", "a waiting client holds no connection");
    }

    #[test]
    fn a_client_on_the_unix_socket_shows_addr_unix_and_no_port() {
        let mut listing = listing();
        listing.clients[0].peer = Peer::Unix;
        let table = listing.clients_table();
        assert_eq!(text(&table.rows[0])[5..7], ["unix", "NULL"]);
    }

    #[test]
    fn servers_show_whom_they_serve_only_while_active() {
        let table = listing().servers_table();
        assert!(table.rows.iter().all(|r| r.len() == table.columns.len()));
        assert_eq!(
            text(&table.rows[0]),
            ["40", "app", "shop", "active", "2.5", "tls", "4242", "2023-11-14T22:13:20Z", "1", "5"]
        );
        assert_eq!(
            text(&table.rows[1]),
            ["41", "app", "shop", "idle", "10.0", "tcp", "4243", "2023-11-14T22:13:20Z", "NULL", "0"]
        );
    }
}
