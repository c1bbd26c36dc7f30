//! An origin URL with several hosts (a primary and its standbys, as Patroni or a managed
//! service lists them) and libpq's `target_session_attrs`: a new origin connection goes to the
//! first host that answers and is what the URL asks for, as libpq's does. pgwarp tries the host
//! that last took a connection first, then the others in the URL's order, so after a failover
//! new connections do not pay a login to the old primary each before they find the new one.
//!
//! What a server is comes from the ParameterStatus it sends at login (`in_hot_standby` and
//! `default_transaction_read_only`, reported since Postgres 14), or from a query on older
//! servers. The decisions are pure; `connect` runs them.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use super::conn::OriginConn;
use super::{Credentials, OriginError};
use crate::config::SessionAttrs;
use crate::protocol::error::SqlState;
use crate::transport::OriginTarget;

/// What a server is, as far as `target_session_attrs` goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServerRole {
    /// In recovery: a hot standby.
    pub standby: bool,
    /// Read-only transactions by default: a standby, or `default_transaction_read_only`.
    pub read_only: bool,
}

/// The query that tells an older server's role: in recovery, and transactions read-only.
const ROLE_QUERY: &str = "SELECT pg_catalog.pg_is_in_recovery(), pg_catalog.current_setting('transaction_read_only')";

impl ServerRole {
    /// From the ParameterStatus values a server sent at login; `None` when it did not report
    /// both (before Postgres 14).
    pub fn from_params(params: &BTreeMap<String, String>) -> Option<ServerRole> {
        let on = |name: &str| params.get(name).map(|v| v == "on");
        let standby = on("in_hot_standby")?;
        let read_only = on("default_transaction_read_only")?;
        Some(ServerRole { standby, read_only: standby || read_only })
    }

    /// From the row of `ROLE_QUERY`.
    fn from_row(row: &[Option<String>]) -> Option<ServerRole> {
        match row {
            [Some(recovery), Some(read_only)] => {
                let standby = recovery == "t";
                Some(ServerRole { standby, read_only: standby || read_only == "on" })
            }
            _ => None,
        }
    }

    /// What the server is, in `target_session_attrs` words (for the log and errors).
    fn describe(self) -> &'static str {
        match (self.standby, self.read_only) {
            (true, _) => "a standby",
            (false, true) => "a read-only primary",
            (false, false) => "a read-write primary",
        }
    }
}

/// Whether a server of `role` suits `attrs`. `prefer-standby` takes only a standby on the first
/// pass over the hosts (`first_pass`) and any server on the second.
pub fn suits(attrs: SessionAttrs, role: ServerRole, first_pass: bool) -> bool {
    match attrs {
        SessionAttrs::Any => true,
        SessionAttrs::ReadWrite => !role.read_only,
        SessionAttrs::ReadOnly => role.read_only,
        SessionAttrs::Primary => !role.standby,
        SessionAttrs::Standby => role.standby,
        SessionAttrs::PreferStandby => role.standby || !first_pass,
    }
}

/// The order to try `n` hosts in: the one that last took a connection first, then the others
/// in the URL's order.
pub fn order(n: usize, last_good: usize) -> impl Iterator<Item = usize> {
    let first = if last_good < n { last_good } else { 0 };
    std::iter::once(first).chain((0..n).filter(move |&i| i != first))
}

/// What trying one host came to.
enum Attempt {
    Suits(Box<OriginConn>),
    /// Logged in, but not what `target_session_attrs` wants.
    Unsuitable(ServerRole),
}

/// Connects to the first host of `target` that answers and suits its `target_session_attrs`,
/// each host within `timeout` (its login and, on an older server, the query for its role).
/// As in libpq, a host that answers but refuses the login ends the search with its error,
/// unless it is starting up or shutting down (57P03).
pub async fn connect(
    target: &Arc<OriginTarget>,
    creds: &Credentials,
    statement_cache: usize,
    timeout: Duration,
) -> Result<OriginConn, OriginError> {
    let choice = &target.choice;
    let passes = if choice.attrs == SessionAttrs::PreferStandby { 2 } else { 1 };
    let mut tried: Vec<String> = Vec::new();
    let mut last_error = None;
    let mut any_unsuitable = false;
    for pass in 0..passes {
        for i in order(target.host_count(), choice.last_good.load(Ordering::Relaxed)) {
            let host = target.host(i);
            let attempt =
                tokio::time::timeout(timeout, attempt(&host, creds, statement_cache, choice.attrs, pass == 0))
                    .await
                    .unwrap_or(Err(OriginError::ConnectTimeout));
            match attempt {
                Ok(Attempt::Suits(conn)) => {
                    choice.last_good.store(i, Ordering::Relaxed);
                    return Ok(*conn);
                }
                Ok(Attempt::Unsuitable(role)) => {
                    tracing::debug!(host = %host.place(), role = role.describe(), "origin host is not what target_session_attrs wants");
                    any_unsuitable = true;
                    if pass == 0 {
                        tried.push(format!("{} ({})", host.place(), role.describe()));
                    }
                }
                Err(OriginError::Refused(f)) if f.code != SqlState::CANNOT_CONNECT_NOW.code() => {
                    return Err(OriginError::Refused(f));
                }
                Err(e) => {
                    if pass == 0 {
                        tracing::warn!(host = %host.place(), error = %e, "origin host unusable, trying the next");
                        tried.push(format!("{} ({e})", host.place()));
                    }
                    last_error = Some(e);
                }
            }
        }
    }
    // Where every host failed to connect, the last failure says what (one host: its own).
    match last_error {
        Some(e) if !any_unsuitable && target.host_count() == 1 => Err(e),
        _ => Err(OriginError::NoSuitableHost { wanted: choice.attrs.as_str(), tried: tried.join(", ") }),
    }
}

/// Logs in to one host and, when it matters, finds out whether it suits `attrs`.
async fn attempt(
    host: &Arc<OriginTarget>,
    creds: &Credentials,
    statement_cache: usize,
    attrs: SessionAttrs,
    first_pass: bool,
) -> Result<Attempt, OriginError> {
    let mut conn = OriginConn::connect_inner(host, creds, statement_cache).await?;
    if attrs == SessionAttrs::Any {
        return Ok(Attempt::Suits(Box::new(conn)));
    }
    let role = role_of(&mut conn).await?;
    if suits(attrs, role, first_pass) {
        return Ok(Attempt::Suits(Box::new(conn)));
    }
    tokio::spawn(conn.close());
    Ok(Attempt::Unsuitable(role))
}

/// What the server on `conn` is: from its login's ParameterStatus, or by asking.
async fn role_of(conn: &mut OriginConn) -> Result<ServerRole, OriginError> {
    if let Some(role) = ServerRole::from_params(&conn.params) {
        return Ok(role);
    }
    let out = conn.simple_query(ROLE_QUERY).await?;
    out.rows
        .first()
        .and_then(|row| ServerRole::from_row(row))
        .ok_or_else(|| OriginError::Protocol("cannot tell whether the origin host is a standby".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    const PRIMARY: ServerRole = ServerRole { standby: false, read_only: false };
    const READ_ONLY_PRIMARY: ServerRole = ServerRole { standby: false, read_only: true };
    const STANDBY: ServerRole = ServerRole { standby: true, read_only: true };

    #[test]
    fn a_servers_role_comes_from_what_it_reports_at_login_or_from_the_query() {
        let role = |pairs: &[(&str, &str)]| ServerRole::from_params(&params(pairs));
        assert_eq!(role(&[("in_hot_standby", "off"), ("default_transaction_read_only", "off")]), Some(PRIMARY));
        assert_eq!(
            role(&[("in_hot_standby", "off"), ("default_transaction_read_only", "on")]),
            Some(READ_ONLY_PRIMARY)
        );
        assert_eq!(role(&[("in_hot_standby", "on"), ("default_transaction_read_only", "off")]), Some(STANDBY));
        // Postgres 13 and older report neither: ask.
        assert_eq!(role(&[("server_version", "13.4")]), None);
        assert_eq!(role(&[("in_hot_standby", "off")]), None);
        let row = |a: &str, b: &str| ServerRole::from_row(&[Some(a.into()), Some(b.into())]);
        assert_eq!(row("f", "off"), Some(PRIMARY));
        assert_eq!(row("f", "on"), Some(READ_ONLY_PRIMARY));
        assert_eq!(row("t", "on"), Some(STANDBY));
        assert_eq!(ServerRole::from_row(&[None]), None);
    }

    #[test]
    fn each_target_session_attrs_takes_the_servers_libpq_takes() {
        use SessionAttrs::*;
        let takes =
            |attrs, first_pass| [PRIMARY, READ_ONLY_PRIMARY, STANDBY].map(|role| suits(attrs, role, first_pass));
        assert_eq!(takes(Any, true), [true, true, true]);
        assert_eq!(takes(ReadWrite, true), [true, false, false]);
        assert_eq!(takes(ReadOnly, true), [false, true, true]);
        assert_eq!(takes(Primary, true), [true, true, false]);
        assert_eq!(takes(Standby, true), [false, false, true]);
        assert_eq!(takes(PreferStandby, true), [false, false, true]);
        assert_eq!(takes(PreferStandby, false), [true, true, true]);
    }

    #[test]
    fn the_host_that_last_worked_is_tried_first_then_the_rest_in_order() {
        assert_eq!(order(3, 0).collect::<Vec<_>>(), vec![0, 1, 2]);
        assert_eq!(order(3, 2).collect::<Vec<_>>(), vec![2, 0, 1]);
        assert_eq!(order(1, 0).collect::<Vec<_>>(), vec![0]);
        // A RELOAD may leave fewer hosts than the index remembered.
        assert_eq!(order(2, 5).collect::<Vec<_>>(), vec![0, 1]);
    }
}
