//! Worker threads: one single-threaded runtime per core, PgBouncer-style.
//!
//! A client's session runs its whole life on one worker, and the pools keep idle connections
//! per worker (`pool`), so the origin connection it borrows is normally one its own thread
//! opened. A transaction then never crosses threads: no work stealing, no cross-thread
//! wake-ups on the hot path. On a loaded 2-core machine this was worth ~10% throughput over
//! tokio's work-stealing runtime (pgbench -S, 32 clients; see bench/). Unlike PgBouncer's
//! `so_reuseport` processes, the pool is still one pool: its size and first-come-first-served
//! order hold across workers, and a worker with no idle connection of its own borrows another's.
//! New clients go to the worker with the fewest live sessions.

use std::cell::Cell;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::runtime::{Builder, Handle};
use tokio::sync::oneshot;

thread_local! {
    static WORKER: Cell<usize> = const { Cell::new(0) };
}

/// The index of the worker running the caller (0 outside the workers, e.g. in tests that run
/// a server on their own runtime).
pub fn current() -> usize {
    WORKER.with(Cell::get)
}

/// The worker threads, stopped (and what they run dropped) when this is dropped.
pub struct Workers {
    workers: Vec<Worker>,
}

struct Worker {
    handle: Handle,
    live: Arc<AtomicUsize>,
    _stop: oneshot::Sender<()>,
}

impl Workers {
    /// Starts `n` (at least one) worker threads, each with its own current-thread runtime.
    pub fn start(n: usize) -> std::io::Result<Workers> {
        let mut workers = Vec::with_capacity(n.max(1));
        for index in 0..n.max(1) {
            let runtime = Builder::new_current_thread().enable_all().build()?;
            let handle = runtime.handle().clone();
            let (stop, stopped) = oneshot::channel::<()>();
            std::thread::Builder::new().name(format!("pgwarp-worker-{index}")).spawn(move || {
                WORKER.with(|w| w.set(index));
                runtime.block_on(async {
                    let _ = stopped.await;
                });
            })?;
            workers.push(Worker { handle, live: Arc::new(AtomicUsize::new(0)), _stop: stop });
        }
        Ok(Workers { workers })
    }

    pub fn len(&self) -> usize {
        self.workers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.workers.is_empty()
    }

    /// Runs the future `task` makes on the worker with the fewest live tasks.
    pub fn spawn<F, Fut>(&self, task: F)
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let Some(worker) = self.workers.iter().min_by_key(|w| w.live.load(Ordering::Relaxed)) else {
            return;
        };
        let live = worker.live.clone();
        live.fetch_add(1, Ordering::Relaxed);
        // Built on the worker itself: the task may then hold thread-bound I/O registrations.
        worker.handle.spawn(async move {
            let _live = LiveGuard(live);
            task().await;
        });
    }
}

/// Counts a task as live until it ends (or is dropped with its runtime).
struct LiveGuard(Arc<AtomicUsize>);

impl Drop for LiveGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// How many workers `configured` means: 0 is one per core.
pub fn resolve(configured: usize) -> usize {
    match configured {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolve_defaults_to_one_per_core() {
        assert_eq!(resolve(3), 3);
        assert!(resolve(0) >= 1);
    }

    #[test]
    fn tasks_run_on_the_least_loaded_worker_and_know_its_index() {
        let workers = Workers::start(2).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let (hold, held) = tokio::sync::watch::channel(false);
        for _ in 0..4 {
            let tx = tx.clone();
            let mut held = held.clone();
            workers.spawn(move || async move {
                tx.send(current()).unwrap();
                let _ = held.wait_for(|v| *v).await;
            });
        }
        let mut seen: Vec<usize> = (0..4).map(|_| rx.recv().unwrap()).collect();
        seen.sort();
        assert_eq!(seen, vec![0, 0, 1, 1]);
        hold.send(true).unwrap();
    }
}
