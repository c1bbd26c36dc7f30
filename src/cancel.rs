//! Cancel keys. Each client gets its own BackendKeyData from pgwarp; a CancelRequest carrying it
//! is forwarded to the origin connection that client is using at that moment, and to nothing
//! else. A client not running anything has no origin connection, so its cancel does nothing.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use rand::Rng;
use tokio::io::AsyncWriteExt;

use crate::origin::BackendKey;
use crate::protocol::build;
use crate::protocol::scram::constant_time_eq;
use crate::transport::{self, OriginTarget};

/// Where a client's work is running right now.
#[derive(Debug, Default)]
pub struct CancelSlot {
    target: Mutex<Option<(Arc<OriginTarget>, BackendKey)>>,
}

impl CancelSlot {
    pub fn set(&self, value: Option<(Arc<OriginTarget>, BackendKey)>) {
        *self.target.lock().unwrap_or_else(|e| e.into_inner()) = value;
    }

    fn get(&self) -> Option<(Arc<OriginTarget>, BackendKey)> {
        self.target.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

#[derive(Debug, Default)]
pub struct CancelRegistry {
    keys: Mutex<HashMap<i32, (i32, Arc<CancelSlot>)>>,
}

impl CancelRegistry {
    /// Issues a fresh key for a client; it is withdrawn when the handle drops.
    pub fn register(self: &Arc<Self>) -> CancelHandle {
        let mut rng = rand::thread_rng();
        let slot = Arc::new(CancelSlot::default());
        let mut keys = self.keys.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            let pid = rng.gen_range(1..i32::MAX);
            if let std::collections::hash_map::Entry::Vacant(v) = keys.entry(pid) {
                let secret = rng.gen::<i32>();
                v.insert((secret, slot.clone()));
                return CancelHandle { pid, secret, slot, registry: self.clone() };
            }
        }
    }

    /// Handles a CancelRequest: forwards it if the key matches a client that is running
    /// something. Never says whether it did (neither does Postgres).
    pub fn cancel(&self, pid: i32, secret: i32) {
        let slot = {
            let keys = self.keys.lock().unwrap_or_else(|e| e.into_inner());
            match keys.get(&pid) {
                Some((s, slot)) if constant_time_eq(&s.to_be_bytes(), &secret.to_be_bytes()) => slot.clone(),
                _ => {
                    tracing::debug!(pid, "cancel request with unknown key ignored");
                    return;
                }
            }
        };
        if let Some((target, key)) = slot.get() {
            tokio::spawn(send_cancel(target, key));
        }
    }
}

/// Sends a CancelRequest for `key` on a new connection to the origin.
pub async fn send_cancel(target: Arc<OriginTarget>, key: BackendKey) {
    let result = async {
        let mut stream = transport::connect(&target).await.map_err(|e| e.to_string())?;
        stream.write_all(&build::cancel_request(key.pid, key.secret)).await.map_err(|e| e.to_string())?;
        stream.flush().await.map_err(|e| e.to_string())?;
        stream.shutdown().await.map_err(|e| e.to_string())
    };
    match tokio::time::timeout(std::time::Duration::from_secs(5), result).await {
        Ok(Ok(())) => tracing::debug!(origin_pid = key.pid, "forwarded cancel request"),
        Ok(Err(e)) => tracing::warn!(error = %e, "could not forward cancel request"),
        Err(_) => tracing::warn!("timed out forwarding cancel request"),
    }
}

/// A client's cancel key; withdrawn on drop.
#[derive(Debug)]
pub struct CancelHandle {
    pub pid: i32,
    pub secret: i32,
    pub slot: Arc<CancelSlot>,
    registry: Arc<CancelRegistry>,
}

impl Drop for CancelHandle {
    fn drop(&mut self) {
        self.registry.keys.lock().unwrap_or_else(|e| e.into_inner()).remove(&self.pid);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_unique_and_withdrawn_on_drop() {
        let reg = Arc::new(CancelRegistry::default());
        let a = reg.register();
        let b = reg.register();
        assert_ne!(a.pid, b.pid);
        assert_eq!(reg.keys.lock().unwrap().len(), 2);
        drop(a);
        assert_eq!(reg.keys.lock().unwrap().len(), 1);
    }
}
