//! Cancel keys. Each client gets its own BackendKeyData from pgwarp; a CancelRequest carrying it
//! is forwarded to the origin connection that client is using at that moment, and to nothing
//! else. A client not running anything has no origin connection, so its cancel does nothing.
//!
//! Forwarding takes a new connection to the origin, so the client may finish and release its
//! connection before the request arrives; had another client taken it by then, the cancel would
//! hit that client's query. So, as PgBouncer does, a connection whose key a cancel has read goes
//! to nobody else until the postmaster has closed the cancel's socket (it has signalled the
//! backend by then, and a backend idle between commands ignores the signal).

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::Poll;

use futures_util::task::AtomicWaker;
use rand::Rng;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Notify;

use crate::origin::BackendKey;
use crate::protocol::build;
use crate::protocol::scram::constant_time_eq;
use crate::transport::{self, OriginTarget};

fn unpack(packed: u64) -> BackendKey {
    let packed = packed & !CANCEL_READ;
    BackendKey { pid: (packed >> 32) as u32 as i32, secret: packed as u32 as i32 }
}

/// How far shutdown has gone, as a client sees it. Ordered: a later stage implies the earlier.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
#[repr(u8)]
pub enum Stop {
    Running = 0,
    /// Finish what is running, then leave.
    Drain = 1,
    /// Leave now.
    Kill = 2,
    /// Leave now: an operator killed this client (`KILL`, `KILL_CLIENT`), not shutdown.
    Killed = 3,
}

impl Stop {
    fn from_u8(v: u8) -> Stop {
        match v {
            0 => Stop::Running,
            1 => Stop::Drain,
            2 => Stop::Kill,
            _ => Stop::Killed,
        }
    }
}

/// One client's entry in the registry: where its work is running right now (for cancels), and
/// the shutdown signal it watches. Touched on every transaction, so both are plain atomics: a
/// shared lock or a shared `Notify` here cost measurable throughput.
#[derive(Debug)]
pub struct CancelSlot {
    /// Where the connection the client's work last ran on is (RELOAD may move the origin, and
    /// a connection opened before keeps its old address until it closes).
    target: Mutex<Arc<OriginTarget>>,
    /// `target`'s address, so `attach` can tell a new target without taking the lock. The
    /// mutex holds that `Arc`, so the address cannot be reused while it is recorded here.
    target_addr: AtomicUsize,
    /// The origin connection's BackendKeyData packed as `pid << 32 | secret`; 0 when idle
    /// (Postgres never uses pid 0), with `CANCEL_READ` set once a cancel has read it.
    key: AtomicU64,
    /// Cancel requests of this client on their way to the origin.
    in_flight: AtomicU32,
    /// Woken when `in_flight` drops to 0.
    settled: Notify,
    stop: AtomicU8,
    waker: AtomicWaker,
}

/// Marks a key a cancel request has read. Postgres pids are positive, so the top bit is free.
const CANCEL_READ: u64 = 1 << 63;

impl CancelSlot {
    /// Records the origin connection the client's work now runs on, and where it is. Only when
    /// it has none.
    #[inline]
    pub fn attach(&self, key: BackendKey, target: &Arc<OriginTarget>) {
        // Before the key is published: a cancel that reads the key finds its target.
        let addr = Arc::as_ptr(target) as usize;
        if self.target_addr.load(Ordering::Acquire) != addr {
            *self.target.lock().unwrap_or_else(|e| e.into_inner()) = target.clone();
            self.target_addr.store(addr, Ordering::Release);
        }
        let packed = (u64::from(key.pid as u32) << 32) | u64::from(key.secret as u32);
        self.key.store(packed, Ordering::Release);
    }

    /// The client's work no longer runs on a connection. True when a cancel request has read
    /// the connection's key: it must not serve anyone else before `cancels_settled`. One atomic
    /// swap, so a cancel either read the key before (and is counted) or finds none.
    #[must_use]
    pub fn detach(&self) -> bool {
        self.key.swap(0, Ordering::AcqRel) & CANCEL_READ != 0
    }

    /// Resolves once every cancel request of this client has been taken by the origin (or has
    /// failed or timed out).
    pub async fn cancels_settled(&self) {
        loop {
            let settled = self.settled.notified();
            tokio::pin!(settled);
            // Registered before the check, so a cancel finishing in between still wakes us.
            settled.as_mut().enable();
            if self.in_flight.load(Ordering::Acquire) == 0 {
                return;
            }
            settled.await;
        }
    }

    /// The key a cancel request should go to, marked as read in the same atomic step (so a
    /// release cannot slip between reading and marking). None: no work is running.
    fn read_for_cancel(&self) -> Option<BackendKey> {
        let mut packed = self.key.load(Ordering::Acquire);
        loop {
            if packed & !CANCEL_READ == 0 {
                return None;
            }
            match self.key.compare_exchange_weak(packed, packed | CANCEL_READ, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return Some(unpack(packed)),
                Err(now) => packed = now,
            }
        }
    }

    fn cancel_done(&self) {
        if self.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.settled.notify_waiters();
        }
    }

    #[cfg(test)]
    fn get(&self) -> Option<BackendKey> {
        match self.key.load(Ordering::Acquire) & !CANCEL_READ {
            0 => None,
            packed => Some(unpack(packed)),
        }
    }

    /// How far shutdown has gone.
    pub fn stop(&self) -> Stop {
        Stop::from_u8(self.stop.load(Ordering::Acquire))
    }

    /// Resolves once shutdown reaches `stage`. Only the client's own task may poll this (the
    /// slot keeps one waker).
    pub fn stopped(&self, stage: Stop) -> impl Future<Output = ()> + '_ {
        std::future::poll_fn(move |cx| {
            if self.stop() >= stage {
                return Poll::Ready(());
            }
            self.waker.register(cx.waker());
            if self.stop() >= stage {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        })
    }

    /// Ends this client now, on an operator's word.
    pub fn kill(&self) {
        self.signal(Stop::Killed);
    }

    fn signal(&self, stage: Stop) {
        self.stop.fetch_max(stage as u8, Ordering::AcqRel);
        self.waker.wake();
    }
}

#[derive(Debug, Default)]
pub struct CancelRegistry {
    keys: Mutex<HashMap<i32, (i32, Arc<CancelSlot>)>>,
    /// The stage every client is at; a client registering late starts there.
    stop: AtomicU8,
}

impl CancelRegistry {
    /// Issues a fresh key for a client whose work runs on `target`; it is withdrawn when the
    /// handle drops.
    pub fn register(self: &Arc<Self>, target: Arc<OriginTarget>) -> CancelHandle {
        let mut rng = rand::thread_rng();
        let mut keys = self.keys.lock().unwrap_or_else(|e| e.into_inner());
        // Read under the lock, so `stop_all` either sees this slot or this slot sees its stage.
        let stop = AtomicU8::new(self.stop.load(Ordering::Acquire));
        let slot = Arc::new(CancelSlot {
            target_addr: AtomicUsize::new(Arc::as_ptr(&target) as usize),
            target: Mutex::new(target),
            key: AtomicU64::new(0),
            in_flight: AtomicU32::new(0),
            settled: Notify::new(),
            stop,
            waker: AtomicWaker::new(),
        });
        loop {
            let pid = rng.gen_range(1..i32::MAX);
            if let std::collections::hash_map::Entry::Vacant(v) = keys.entry(pid) {
                let secret = rng.gen::<i32>();
                v.insert((secret, slot.clone()));
                return CancelHandle { pid, secret, slot, registry: self.clone() };
            }
        }
    }

    /// Moves every client, present and future, to shutdown stage `stage`.
    pub fn stop_all(&self, stage: Stop) {
        let keys = self.keys.lock().unwrap_or_else(|e| e.into_inner());
        self.stop.fetch_max(stage as u8, Ordering::AcqRel);
        for (_, slot) in keys.values() {
            slot.signal(stage);
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
        // Counted before the key is read: a release that finds the key read finds it counted.
        slot.in_flight.fetch_add(1, Ordering::AcqRel);
        let Some(key) = slot.read_for_cancel() else {
            slot.cancel_done();
            return;
        };
        tokio::spawn(async move {
            let target = slot.target.lock().unwrap_or_else(|e| e.into_inner()).clone();
            send_cancel(target, key).await;
            slot.cancel_done();
        });
    }
}

/// Sends a CancelRequest for `key` on a new connection to the origin, and waits until the
/// postmaster closes that connection: by then it has signalled the backend.
pub async fn send_cancel(target: Arc<OriginTarget>, key: BackendKey) {
    let result = async {
        let mut stream = transport::connect(&target).await.map_err(|e| e.to_string())?;
        stream.write_all(&build::cancel_request(key.pid, key.secret)).await.map_err(|e| e.to_string())?;
        stream.flush().await.map_err(|e| e.to_string())?;
        // The postmaster answers nothing; a read error is the close too.
        let mut buf = [0u8; 64];
        while matches!(stream.read(&mut buf).await, Ok(n) if n > 0) {}
        Ok::<(), String>(())
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
    use crate::config::SslMode;
    use crate::transport::tls::OriginTls;

    fn target() -> Arc<OriginTarget> {
        Arc::new(OriginTarget {
            host: "localhost".into(),
            port: 5432,
            tls: Arc::new(OriginTls::new(SslMode::Disable, None, None, None).unwrap()),
            tunnel: None,
            tcp: Default::default(),
            choice: Default::default(),
        })
    }

    #[test]
    fn keys_are_unique_and_withdrawn_on_drop() {
        let reg = Arc::new(CancelRegistry::default());
        let a = reg.register(target());
        let b = reg.register(target());
        assert_ne!(a.pid, b.pid);
        assert_eq!(reg.keys.lock().unwrap().len(), 2);
        drop(a);
        assert_eq!(reg.keys.lock().unwrap().len(), 1);
    }

    #[test]
    fn slot_round_trips_any_origin_key() {
        let reg = Arc::new(CancelRegistry::default());
        let h = reg.register(target());
        assert_eq!(h.slot.get(), None);
        for (pid, secret) in [(1, 0), (i32::MAX, -1), (12345, i32::MIN), (7, 42)] {
            h.slot.attach(BackendKey { pid, secret }, &h.slot.target.lock().unwrap().clone());
            assert_eq!(h.slot.get(), Some(BackendKey { pid, secret }));
            assert_eq!(h.slot.read_for_cancel(), Some(BackendKey { pid, secret }));
            assert!(h.slot.detach());
        }
        assert_eq!(h.slot.get(), None);
        assert_eq!(h.slot.read_for_cancel(), None);
    }

    #[tokio::test]
    async fn a_connection_whose_key_a_cancel_read_waits_for_that_cancel() {
        let reg = Arc::new(CancelRegistry::default());
        let h = reg.register(target());
        let at = target();
        h.slot.attach(BackendKey { pid: 5, secret: 6 }, &at);
        assert!(!h.slot.detach(), "no cancel: released at once");
        h.slot.attach(BackendKey { pid: 5, secret: 6 }, &at);
        h.slot.in_flight.fetch_add(1, Ordering::AcqRel);
        assert!(h.slot.read_for_cancel().is_some());
        assert!(h.slot.detach());
        let slot = h.slot.clone();
        let waiting = tokio::spawn(async move { slot.cancels_settled().await });
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished());
        h.slot.cancel_done();
        tokio::time::timeout(std::time::Duration::from_secs(5), waiting).await.unwrap().unwrap();
    }

    #[test]
    fn a_cancel_goes_where_the_connection_is() {
        let reg = Arc::new(CancelRegistry::default());
        let h = reg.register(target());
        let moved = Arc::new(OriginTarget { host: "standby".into(), ..(*target()).clone() });
        h.slot.attach(BackendKey { pid: 5, secret: 6 }, &moved);
        assert_eq!(h.slot.target.lock().unwrap().host, "standby");
        assert!(!h.slot.detach());
        let back = target();
        h.slot.attach(BackendKey { pid: 5, secret: 6 }, &back);
        assert!(Arc::ptr_eq(&h.slot.target.lock().unwrap(), &back));
    }

    #[tokio::test]
    async fn stop_reaches_present_and_late_clients() {
        let reg = Arc::new(CancelRegistry::default());
        let early = reg.register(target());
        let waiting = {
            let slot = early.slot.clone();
            tokio::spawn(async move { slot.stopped(Stop::Drain).await })
        };
        tokio::task::yield_now().await;
        reg.stop_all(Stop::Drain);
        tokio::time::timeout(std::time::Duration::from_secs(5), waiting).await.unwrap().unwrap();
        assert_eq!(early.slot.stop(), Stop::Drain);
        let late = reg.register(target());
        assert_eq!(late.slot.stop(), Stop::Drain);
        reg.stop_all(Stop::Kill);
        late.slot.stopped(Stop::Kill).await;
        assert_eq!(early.slot.stop(), Stop::Kill);
    }

    #[tokio::test]
    async fn a_kill_reaches_one_client_and_outranks_shutdown() {
        let reg = Arc::new(CancelRegistry::default());
        let (killed, spared) = (reg.register(target()), reg.register(target()));
        let waiting = {
            let slot = killed.slot.clone();
            tokio::spawn(async move { slot.stopped(Stop::Kill).await })
        };
        tokio::task::yield_now().await;
        killed.slot.kill();
        tokio::time::timeout(std::time::Duration::from_secs(5), waiting).await.unwrap().unwrap();
        assert_eq!((killed.slot.stop(), spared.slot.stop()), (Stop::Killed, Stop::Running));
        // A shutdown afterwards does not hide why the client was ended.
        reg.stop_all(Stop::Kill);
        assert_eq!((killed.slot.stop(), spared.slot.stop()), (Stop::Killed, Stop::Kill));
        assert_eq!(reg.register(target()).slot.stop(), Stop::Kill, "a kill is no shutdown stage for new clients");
    }
}
