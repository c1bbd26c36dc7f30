//! `GET /readyz`: can pgwarp serve queries right now, that is, reach the origin?
//!
//! `/healthz` says whether the process is alive and accepting (liveness); this says whether
//! the origin answers (readiness). The evidence, cheapest first: an origin connection that was
//! lent or given back healthy within the last `RECENT` (from the roster of origin connections,
//! no I/O); else a probe: one new connection to the origin, logged in with the origin URL's
//! credentials and closed again, within `PROBE_TIMEOUT`. Concurrent requests share one probe,
//! and its outcome is reused for `PROBE_REUSE`, so a burst of checks opens one connection.
//!
//! While PAUSE is in effect the answer is 200 `paused`: the operator is restarting or moving
//! the database on purpose, and clients should keep arriving to queue in pgwarp rather than
//! be sent nowhere.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::http::Response;
use crate::origin::{Credentials, OriginConn, OriginError};
use crate::roster::clock;
use crate::server::ServerContext;

/// A connection used this recently proves the origin reachable.
const RECENT: Duration = Duration::from_secs(5);
/// How long a probe may take (the whole request has 5 s).
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a probe's outcome answers later requests.
const PROBE_REUSE: Duration = Duration::from_secs(1);

/// What the readiness answer rests on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Evidence {
    Draining,
    Paused,
    /// An origin connection was used lately.
    RecentUse,
    /// A probe connected (Ok) or says why not.
    Probe(Result<(), String>),
}

/// The answer for `evidence`.
pub fn verdict(evidence: &Evidence) -> Response {
    match evidence {
        Evidence::Draining => Response::text(503, "draining\n"),
        Evidence::Paused => Response::text(200, "paused\n"),
        Evidence::RecentUse | Evidence::Probe(Ok(())) => Response::text(200, "ok\n"),
        Evidence::Probe(Err(why)) => Response::text(503, &format!("origin unreachable: {why}\n")),
    }
}

/// The last probe's outcome, shared by the admin requests.
#[derive(Debug, Default)]
pub struct Readiness {
    last: Mutex<Option<(Instant, Result<(), String>)>>,
    probing: tokio::sync::Mutex<()>,
}

impl Readiness {
    pub async fn check(&self, ctx: &ServerContext) -> Response {
        verdict(&self.evidence(ctx).await)
    }

    async fn evidence(&self, ctx: &ServerContext) -> Evidence {
        if !ctx.accepting() {
            return Evidence::Draining;
        }
        // A pause of the origin URL's own database (PAUSE db, KILL db) counts too: that is
        // the database the probe would reach.
        let own_database = ctx.config().origin_url().map(|o| o.database).unwrap_or_default();
        if ctx.pools.is_paused() || ctx.pools.is_paused_database(&own_database) {
            return Evidence::Paused;
        }
        let recent_ms = u64::try_from(RECENT.as_millis()).unwrap_or(u64::MAX);
        let since = clock::now_ms().saturating_sub(recent_ms);
        if ctx.pools.servers.list().iter().any(|s| s.state().1 >= since) {
            return Evidence::RecentUse;
        }
        // One probe at a time; whoever waited for it takes its outcome.
        let _probing = self.probing.lock().await;
        if let Some((at, outcome)) = &*self.last.lock().unwrap_or_else(|e| e.into_inner()) {
            if at.elapsed() < PROBE_REUSE {
                return Evidence::Probe(outcome.clone());
            }
        }
        let outcome = probe(ctx).await;
        if let Err(why) = &outcome {
            tracing::warn!(reason = %why, "readiness probe: the origin is unreachable");
        }
        *self.last.lock().unwrap_or_else(|e| e.into_inner()) = Some((Instant::now(), outcome.clone()));
        Evidence::Probe(outcome)
    }
}

/// Opens and closes one origin connection as the origin URL's user.
async fn probe(ctx: &ServerContext) -> Result<(), String> {
    let origin = ctx.config().origin_url().map_err(|e| e.to_string())?;
    let creds = Credentials::with_password(origin.user, origin.password, origin.database);
    let target = ctx.pools.target();
    // One deadline for the whole probe, however many hosts the origin URL names.
    let connected = tokio::time::timeout(PROBE_TIMEOUT, OriginConn::connect(&target, &creds, 1, PROBE_TIMEOUT)).await;
    match connected.unwrap_or(Err(OriginError::ConnectTimeout)) {
        Ok(conn) => {
            conn.close().await;
            Ok(())
        }
        // Said without secrets: the error names the step, not the credentials.
        Err(e) => Err(e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_on_recent_use_or_a_good_probe_and_not_while_draining_or_unreachable() {
        let status = |e: Evidence| verdict(&e).status;
        assert_eq!(status(Evidence::RecentUse), 200);
        assert_eq!(status(Evidence::Probe(Ok(()))), 200);
        assert_eq!(status(Evidence::Paused), 200);
        assert_eq!(status(Evidence::Draining), 503);
        let down = verdict(&Evidence::Probe(Err("could not connect to the origin: refused".into())));
        assert_eq!(down.status, 503);
        assert_eq!(down.body, b"origin unreachable: could not connect to the origin: refused\n");
    }
}
