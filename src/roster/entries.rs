//! The two kinds of roster entry. Fixed facts are plain fields; the state is one `AtomicU64`
//! packing the state with the `clock` reading it began at, so a change is a single store.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use super::{clock, Listable};
use crate::cancel::CancelSlot;
use crate::transport::Peer;

/// Packs a state (2 bits) with the clock reading it began at.
fn pack(state: u8, since_ms: u64) -> u64 {
    since_ms << 2 | u64::from(state & 3)
}

fn unpack(packed: u64) -> (u8, u64) {
    ((packed & 3) as u8, packed >> 2)
}

/// What a client is doing, as `SHOW CLIENTS` tells it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClientState {
    /// Holds no origin connection.
    Idle = 0,
    /// Asked for an origin connection and has none yet (the pool is busy or paused).
    Waiting = 1,
    /// Holds an origin connection.
    Active = 2,
}

impl ClientState {
    pub fn as_str(self) -> &'static str {
        match self {
            ClientState::Idle => "idle",
            ClientState::Waiting => "waiting",
            ClientState::Active => "active",
        }
    }

    fn from_bits(bits: u8) -> ClientState {
        match bits {
            1 => ClientState::Waiting,
            2 => ClientState::Active,
            _ => ClientState::Idle,
        }
    }
}

/// One logged-in client (or admin console).
#[derive(Debug)]
pub struct ClientEntry {
    pub id: u64,
    pub user: Box<str>,
    pub database: Box<str>,
    pub peer: Peer,
    /// The worker thread the client runs on.
    pub worker: usize,
    pub tls: bool,
    /// From the startup packet, then as the client's own `SET`s leave it (read back with the
    /// rest of its settings).
    application_name: Mutex<Box<str>>,
    pub connected_at: SystemTime,
    state: AtomicU64,
    /// Named prepared statements the client holds in pgwarp.
    statements: AtomicU32,
    /// How to end the client (`KILL`, `KILL_CLIENT`); `None` for an admin console.
    stop: Option<Arc<CancelSlot>>,
}

/// The facts a client entry starts with.
pub struct ClientFacts {
    pub user: String,
    pub database: String,
    pub peer: Peer,
    pub tls: bool,
    pub application_name: String,
    /// The client's cancel slot, whose stop signal ends it; `None` for an admin console.
    pub stop: Option<Arc<CancelSlot>>,
}

static NEXT_CLIENT: AtomicU64 = AtomicU64::new(1);

impl ClientEntry {
    /// A new entry with a fresh id, idle from now, on the calling worker.
    pub fn new(facts: ClientFacts) -> ClientEntry {
        ClientEntry {
            id: NEXT_CLIENT.fetch_add(1, Ordering::Relaxed),
            user: facts.user.into(),
            database: facts.database.into(),
            peer: facts.peer,
            worker: crate::workers::current(),
            tls: facts.tls,
            application_name: Mutex::new(facts.application_name.into()),
            connected_at: SystemTime::now(),
            state: AtomicU64::new(pack(ClientState::Idle as u8, clock::now_ms())),
            statements: AtomicU32::new(0),
            stop: facts.stop,
        }
    }

    /// Ends the client at once with FATAL 57P01; false for an admin console, which cannot be.
    pub fn kill(&self) -> bool {
        self.stop.as_ref().map(|slot| slot.kill()).is_some()
    }

    /// Whether this is an admin console rather than a client of the origin.
    pub fn is_console(&self) -> bool {
        self.stop.is_none()
    }

    /// Notes a new state, from now.
    pub fn set_state(&self, state: ClientState) {
        self.state.store(pack(state as u8, clock::now_ms()), Ordering::Relaxed);
    }

    /// The state, and the clock reading it began at.
    pub fn state(&self) -> (ClientState, u64) {
        let (bits, since) = unpack(self.state.load(Ordering::Relaxed));
        (ClientState::from_bits(bits), since)
    }

    /// Idle from now, holding `statements` named prepared statements.
    pub fn idle(&self, statements: usize) {
        self.statements.store(u32::try_from(statements).unwrap_or(u32::MAX), Ordering::Relaxed);
        self.set_state(ClientState::Idle);
    }

    pub fn statements(&self) -> u32 {
        self.statements.load(Ordering::Relaxed)
    }

    pub fn application_name(&self) -> String {
        self.application_name.lock().unwrap_or_else(|e| e.into_inner()).to_string()
    }

    /// Rare: only when the client's settings are read back.
    pub fn set_application_name(&self, name: &str) {
        let mut current = self.application_name.lock().unwrap_or_else(|e| e.into_inner());
        if **current != *name {
            *current = name.into();
        }
    }
}

impl Listable for ClientEntry {
    fn id(&self) -> u64 {
        self.id
    }
}

/// What an origin connection is doing, as `SHOW SERVERS` tells it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ServerState {
    /// In the pool, waiting for a client.
    Idle = 0,
    /// Lent to a client (or to pgwarp's own work, client id 0).
    Active = 1,
}

impl ServerState {
    pub fn as_str(self) -> &'static str {
        match self {
            ServerState::Idle => "idle",
            ServerState::Active => "active",
        }
    }
}

/// One open origin connection.
#[derive(Debug)]
pub struct ServerEntry {
    /// The connection's own id (as in pgwarp's logs).
    pub id: u64,
    pub user: Box<str>,
    pub database: Box<str>,
    /// The origin backend's process id, as in `pg_stat_activity.pid`.
    pub pid: i32,
    /// How the connection reaches the origin: tcp, tls, websocket or websocket+tls.
    pub transport: &'static str,
    pub connected_at: SystemTime,
    state: AtomicU64,
    /// The client it is lent to (0: none, or pgwarp's own work such as a login check).
    client: AtomicU64,
    /// Statements prepared on it, as of its last return to the pool.
    statements: AtomicU32,
}

/// The facts a server entry starts with.
pub struct ServerFacts {
    pub id: u64,
    pub user: String,
    pub database: String,
    pub pid: i32,
    pub transport: &'static str,
}

impl ServerEntry {
    /// A new entry, active (a connection is opened for a checkout) from now.
    pub fn new(facts: ServerFacts) -> ServerEntry {
        ServerEntry {
            id: facts.id,
            user: facts.user.into(),
            database: facts.database.into(),
            pid: facts.pid,
            transport: facts.transport,
            connected_at: SystemTime::now(),
            state: AtomicU64::new(pack(ServerState::Active as u8, clock::now_ms())),
            client: AtomicU64::new(0),
            statements: AtomicU32::new(0),
        }
    }

    /// Lent to `client` from now.
    pub fn lend(&self, client: u64) {
        self.client.store(client, Ordering::Relaxed);
        self.state.store(pack(ServerState::Active as u8, clock::now_ms()), Ordering::Relaxed);
    }

    /// Back in the pool from now, with `statements` prepared on it.
    pub fn returned(&self, statements: usize) {
        self.client.store(0, Ordering::Relaxed);
        self.statements.store(u32::try_from(statements).unwrap_or(u32::MAX), Ordering::Relaxed);
        self.state.store(pack(ServerState::Idle as u8, clock::now_ms()), Ordering::Relaxed);
    }

    /// The state, and the clock reading it began at.
    pub fn state(&self) -> (ServerState, u64) {
        let (bits, since) = unpack(self.state.load(Ordering::Relaxed));
        (if bits == 1 { ServerState::Active } else { ServerState::Idle }, since)
    }

    /// The client it serves while active (0: none).
    pub fn client(&self) -> u64 {
        self.client.load(Ordering::Relaxed)
    }

    pub fn statements(&self) -> u32 {
        self.statements.load(Ordering::Relaxed)
    }
}

impl Listable for ServerEntry {
    fn id(&self) -> u64 {
        self.id
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_and_start_pack_into_one_word() {
        for state in 0..3u8 {
            for since in [0, 1, 99_999, u64::MAX >> 2] {
                assert_eq!(unpack(pack(state, since)), (state, since));
            }
        }
    }

    #[test]
    fn a_client_moves_between_states_and_a_server_between_clients() {
        let client = ClientEntry::new(ClientFacts {
            user: "app".into(),
            database: "shop".into(),
            peer: Peer::Tcp("127.0.0.1:5000".parse().unwrap()),
            tls: false,
            application_name: "psql".into(),
            stop: None,
        });
        assert!(client.is_console() && !client.kill(), "a console has no stop signal");
        assert_eq!(client.state().0, ClientState::Idle);
        client.set_state(ClientState::Waiting);
        assert_eq!(client.state().0, ClientState::Waiting);
        client.set_state(ClientState::Active);
        assert_eq!(client.state().0, ClientState::Active);
        client.set_application_name("report");
        assert_eq!(client.application_name(), "report");

        let server = ServerEntry::new(ServerFacts {
            id: 7,
            user: "app".into(),
            database: "shop".into(),
            pid: 4242,
            transport: "tcp",
        });
        assert_eq!(server.state().0, ServerState::Active);
        server.returned(3);
        assert_eq!((server.state().0, server.client(), server.statements()), (ServerState::Idle, 0, 3));
        server.lend(client.id);
        assert_eq!((server.state().0, server.client()), (ServerState::Active, client.id));
    }
}
