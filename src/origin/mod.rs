//! One origin connection: connecting and logging in as a client, the statements it has prepared,
//! the session settings applied to it, and the queue of answers it owes.

mod conn;
pub mod hosts;
pub mod queue;
pub mod settings;
pub mod statements;

pub use conn::{BackendKey, Credentials, OriginConn, OriginSecret};
pub use queue::{Decision, Expect, Owner, ResponseQueue, Undo};
pub use statements::ServerStatements;

use crate::protocol::error::{ErrorFields, SqlState};
use crate::transport::ConnectError;

#[derive(Debug, thiserror::Error)]
pub enum OriginError {
    #[error("could not connect to the origin: {0}")]
    Connect(crate::transport::ConnectError),
    #[error("timed out connecting to the origin")]
    ConnectTimeout,
    #[error("origin refused the connection: {} ({})", .0.message, .0.code)]
    Refused(ErrorFields),
    #[error("origin asked for an authentication method pgwarp does not support ({0})")]
    UnsupportedAuth(String),
    #[error("origin asked for {asked}, but pgwarp holds {held} for this role")]
    CannotAnswer { asked: String, held: &'static str },
    #[error("SCRAM with the origin failed: {0}")]
    Scram(String),
    #[error("origin connection lost: {0}")]
    Io(#[from] std::io::Error),
    #[error("origin connection closed")]
    Closed,
    #[error("origin sent something pgwarp cannot read: {0}")]
    Protocol(String),
    #[error("no origin host is usable as {wanted} (target_session_attrs): {tried}")]
    NoSuitableHost { wanted: &'static str, tried: String },
}

impl OriginError {
    /// The SQLSTATE and message a client sees. Origin errors pass through with their own code,
    /// except authentication failures, which are pgwarp's configuration problem, not the client's.
    pub fn client_facing(&self) -> (String, String) {
        match self {
            OriginError::Refused(f) if f.code.starts_with("28") => (
                SqlState::CONNECTION_REJECTED.code().into(),
                "pgwarp could not log in to the origin database; check pgwarp's origin credentials".into(),
            ),
            OriginError::Refused(f) => (f.code.clone(), f.message.clone()),
            OriginError::UnsupportedAuth(_) | OriginError::CannotAnswer { .. } | OriginError::Scram(_) => {
                (SqlState::CONNECTION_REJECTED.code().into(), "pgwarp could not log in to the origin database".into())
            }
            // The TLS reason (bad certificate, host name mismatch) is the operator's to fix, but
            // naming it saves everybody a trip to the logs; it holds no secrets.
            OriginError::Connect(e @ (ConnectError::Tls(_) | ConnectError::TlsRefused(_))) => (
                SqlState::CONNECTION_FAILURE.code().into(),
                format!("pgwarp could not connect to the origin database: {e}"),
            ),
            // Which hosts were what is the operator's to know; a client learns what was wanted.
            OriginError::NoSuitableHost { wanted: "any", .. } => {
                (SqlState::CONNECTION_FAILURE.code().into(), "pgwarp could not connect to any origin host".into())
            }
            OriginError::NoSuitableHost { wanted, .. } => (
                SqlState::CONNECTION_FAILURE.code().into(),
                format!("pgwarp found no origin host that is {wanted} (target_session_attrs)"),
            ),
            OriginError::Connect(_) | OriginError::ConnectTimeout => {
                (SqlState::CONNECTION_FAILURE.code().into(), "pgwarp could not connect to the origin database".into())
            }
            OriginError::Io(_) | OriginError::Closed | OriginError::Protocol(_) => {
                (SqlState::CONNECTION_FAILURE.code().into(), "the connection to the origin database was lost".into())
            }
        }
    }
}
