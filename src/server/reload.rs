//! RELOAD (the admin console) and SIGHUP: re-read the settings and apply what a running server
//! can change.
//!
//! The flags and `DATABASE_URL` pgwarp started with are merged with the config file again, as
//! at start-up, so a flag still wins over the file. `config::diff` decides what changes now and
//! what keeps its running value until a restart. Everything that can fail (reading and checking
//! the file, deriving password verifiers, reading the TLS certificates) runs before anything is
//! changed, so a bad file changes nothing.
//!
//! A new origin address (or TLS settings, or tunnel) sends new connections there and replaces
//! the open ones as their transactions end (`pool::reconnect`); the query cache forgets what
//! the old origin said. A new origin password is taken by the pools that used the old one.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::ServerContext;
use crate::auth::UserDirectory;
use crate::config::diff::{origin_move, reconcile, Changes, OriginMove};
use crate::config::{Config, ConfigError};
use crate::pool::PoolConfig;
use crate::transport::tls::TlsError;

#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("the reload task failed: {0}")]
    Task(String),
}

/// Re-reads the settings and applies them. The lines returned say what happened, for the
/// console (as NOTICEs); the log says the same.
pub async fn reload(ctx: &Arc<ServerContext>) -> Result<Vec<String>, ReloadError> {
    let _one_at_a_time = ctx.reloading.lock().await;
    let running = ctx.config();
    let loaded = match ctx.source.get() {
        Some(source) => source.load()?,
        None => (*running).clone(),
    };
    let (next, changes) = reconcile(&running, loaded);
    next.validate()?;
    let users = if changes
        .applied
        .iter()
        .any(|k| matches!(*k, "origin" | "users" | "auth_method" | "auth_query" | "auth_user" | "auth_dbname"))
    {
        Some(UserDirectory::build(&next, &next.origin_url()?).await?)
    } else {
        None
    };
    let how = origin_move(&running, &next);
    let moved = if how != OriginMove::None {
        let origin = next.origin_url()?;
        let config = next.clone();
        // Reads certificate files: off the async threads.
        let built = tokio::task::spawn_blocking(move || crate::server::origin_target(&config, &origin));
        Some(built.await.map_err(|e| ReloadError::Task(e.to_string()))??)
    } else {
        None
    };
    if ctx.tls.is_some() {
        // Reading files: off the async threads. On failure the old certificate stays.
        let ctx = ctx.clone();
        let reread = tokio::task::spawn_blocking(move || ctx.tls.as_ref().map_or(Ok(()), |tls| tls.reload()));
        reread.await.map_err(|e| ReloadError::Task(e.to_string()))??;
    }

    // From here on nothing can fail.
    let mut notes = Vec::new();
    if let Some(users) = users {
        let users = Arc::new(users);
        let old = std::mem::replace(&mut *ctx.users.write().unwrap_or_else(|e| e.into_inner()), users.clone());
        for (user, was, now) in old.rotations(&users) {
            let pools = ctx.pools.rotate_password(&user, &was, &now);
            notes.push(format!("the origin password of {user} changed: {pools} pools open new connections with it"));
        }
    }
    if let Some(target) = moved {
        let through = if target.tunnel.is_some() { " (through the tunnel)" } else { "" };
        let to = format!("{}{through}", target.place());
        ctx.pools.retarget(target);
        if how == OriginMove::Place {
            if let Some(cache) = &ctx.cache {
                cache.forget_origin();
            }
            notes.push(format!(
                "the origin is now {to}: connections to the old one close as their transactions end (WAIT_CLOSE waits for them); the query cache was emptied"
            ));
        } else {
            notes.push(format!(
                "the origin {to} is now reached with new TLS or tunnel settings: open connections are replaced as their transactions end (WAIT_CLOSE waits for them)"
            ));
        }
    }
    notes.extend(apply(ctx, &running, &next));
    *ctx.config.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(next);
    notes.splice(0..0, describe(&changes, ctx.source.get().and_then(|s| s.file()).is_some(), ctx.tls.is_some()));
    for note in &notes {
        tracing::info!("reload: {note}");
    }
    for key in &changes.kept {
        tracing::warn!(
            setting = key,
            "reload: changed in the config file, but needs a restart; keeping the running value"
        );
    }
    Ok(notes)
}

/// Applies the settings that live outside `Config` itself: pools, client slots, the cache.
fn apply(ctx: &Arc<ServerContext>, running: &Config, next: &Config) -> Vec<String> {
    let mut notes = Vec::new();
    ctx.pools.reconfigure(PoolConfig::from(next));
    resize_client_slots(ctx, running.max_client_conn, next.max_client_conn);
    if let Some(cache) = &ctx.cache {
        if !cache.set_freshness(next.cache.max_age, next.cache.stale_while_revalidate) {
            let built = humantime::format_duration(cache.config.max_age + cache.config.stale_while_revalidate);
            notes.push(format!(
                "cache entries still leave memory {built} after they were stored (max_age + stale_while_revalidate at start) until a restart"
            ));
        }
    }
    notes
}

/// What changed, as the console is told.
fn describe(changes: &Changes, has_file: bool, has_tls: bool) -> Vec<String> {
    let mut notes = Vec::new();
    if !has_file {
        notes.push("pgwarp was started without --config: there is no file to re-read".to_owned());
    }
    if changes.applied.is_empty() {
        notes.push("no setting changed".to_owned());
    } else {
        notes.push(format!("applied: {}", changes.applied.join(", ")));
    }
    for key in &changes.kept {
        notes.push(format!("{key} changed in the config file but needs a restart: keeping the running value"));
    }
    if has_tls {
        notes.push("re-read the TLS certificate and key".to_owned());
    }
    notes
}

/// Changes how many clients may be connected at once. Growing adds slots; shrinking retires
/// free slots now and the rest as clients leave (nobody connected is turned away).
fn resize_client_slots(ctx: &Arc<ServerContext>, old: usize, new: usize) {
    let slots = &ctx.client_slots;
    if new > old {
        let by = new - old;
        let paid =
            ctx.client_slots_owed.fetch_update(Ordering::AcqRel, Ordering::Acquire, |o| Some(o.saturating_sub(by)));
        slots.add_permits(by - paid.map_or(0, |owed| owed.min(by)));
    } else if new < old {
        let owed = (old - new) - slots.forget_permits(old - new);
        if owed == 0 {
            return;
        }
        ctx.client_slots_owed.fetch_add(owed, Ordering::AcqRel);
        let ctx = ctx.clone();
        tokio::spawn(async move {
            while ctx.client_slots_owed.load(Ordering::Acquire) > 0 {
                let Ok(permit) = ctx.client_slots.clone().acquire_owned().await else { return };
                if ctx.client_slots_owed.fetch_update(Ordering::AcqRel, Ordering::Acquire, |o| o.checked_sub(1)).is_ok()
                {
                    permit.forget();
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_console_hears_what_was_applied_and_what_waits_for_a_restart() {
        let changes = Changes { applied: vec!["pool_size", "users"], kept: vec!["listen"] };
        let notes = describe(&changes, true, false);
        assert_eq!(
            notes,
            vec![
                "applied: pool_size, users".to_owned(),
                "listen changed in the config file but needs a restart: keeping the running value".to_owned(),
            ]
        );
        let notes = describe(&Changes::default(), false, true);
        assert_eq!(notes.len(), 3, "{notes:?}");
        assert!(notes[0].contains("without --config") && notes[1] == "no setting changed", "{notes:?}");
    }
}
