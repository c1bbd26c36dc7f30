//! A coarse clock for the roster: milliseconds since pgwarp started, advanced by a background
//! thread every `TICK`. Reading it is one relaxed load, so a checkout can note when a state
//! began without asking the operating system for the time.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// How often the clock advances: the resolution of the console's `state_seconds`.
pub const TICK: Duration = Duration::from_millis(100);

static NOW_MS: AtomicU64 = AtomicU64::new(0);
static STARTED: OnceLock<Instant> = OnceLock::new();

/// Starts the ticking thread (once per process; later calls do nothing).
pub fn start() {
    let mut first = false;
    let epoch = *STARTED.get_or_init(|| {
        first = true;
        Instant::now()
    });
    if !first {
        return;
    }
    let spawned = std::thread::Builder::new().name("pgwarp-clock".into()).spawn(move || loop {
        std::thread::sleep(TICK);
        NOW_MS.store(u64::try_from(epoch.elapsed().as_millis()).unwrap_or(u64::MAX), Ordering::Relaxed);
    });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "cannot start the roster clock; state times will read 0");
    }
}

/// Milliseconds since `start`, to `TICK`.
pub fn now_ms() -> u64 {
    NOW_MS.load(Ordering::Relaxed)
}
