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
//!
//! A worker that runs out of work polls for I/O a little before it sleeps (`busy_poll`).
//! To tell a wait for a database from a wait for clients, each worker counts its sessions that
//! wait for their origin's answer; `AwaitingOrigin` adds those counts up for the metrics page.

mod busy_poll;
mod quota;
mod run_queue;

use std::cell::{Cell, OnceCell, RefCell};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use tokio::runtime::{Builder, Handle};
use tokio::sync::oneshot;

use busy_poll::{Awaits, BusyPoll};
use run_queue::RunQueue;

thread_local! {
    static WORKER: Cell<usize> = const { Cell::new(0) };
    /// Polls of this worker's tasks so far: how the park hook tells work from an empty turn.
    static POLLS: Cell<u64> = const { Cell::new(0) };
    static IDLE: RefCell<Idle> = RefCell::new(Idle::default());
    /// Sessions on this worker waiting for their origin to answer (`mark_awaiting_origin`),
    /// shared with `Workers`; unset outside the workers.
    static AWAITING: OnceCell<Arc<AtomicUsize>> = const { OnceCell::new() };
}

/// Sets a session's flag `awaiting` to `owed`, whether its origin owes it an answer, and counts
/// it in its worker's sessions that do: busy polling tells a wait for a database, short and
/// steady, from a wait for clients (see `busy_poll`). A session clears its flag when it ends.
pub fn mark_awaiting_origin(awaiting: &mut bool, owed: bool) {
    if *awaiting == owed {
        return;
    }
    *awaiting = owed;
    // Normally on the worker that set it; elsewhere (a runtime dropped from another thread, or
    // at thread exit) the count is only a hint, so it must not underflow or fail.
    let _ = AWAITING.try_with(|n| {
        let Some(n) = n.get() else { return };
        if owed {
            n.fetch_add(1, Ordering::Relaxed);
        } else {
            let _ = n.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| v.checked_sub(1));
        }
    });
}

/// The sessions of a set of workers that wait for their origin to answer, counted per worker
/// by `mark_awaiting_origin`: requests the databases are working on now.
#[derive(Clone, Debug, Default)]
pub struct AwaitingOrigin(Arc<[Arc<AtomicUsize>]>);

impl AwaitingOrigin {
    /// How many sessions wait for their origin now, over every worker.
    pub fn count(&self) -> usize {
        self.0.iter().map(|n| n.load(Ordering::Relaxed)).sum()
    }
}

/// A worker thread's busy-poll state and the waker that keeps its runtime from sleeping.
#[derive(Default)]
struct Idle {
    poll: Option<BusyPoll>,
    polls_seen: u64,
    /// Wakes the worker's `block_on` future: a woken runtime checks I/O without blocking.
    keep_awake: Option<Waker>,
    run_queue: RunQueue,
}

/// The runtime's park hook: it runs each time the worker has no task left. Waking the
/// `block_on` future here makes the runtime poll I/O with a zero timeout instead of sleeping.
fn before_park() {
    IDLE.with(|idle| {
        let mut idle = idle.borrow_mut();
        let polls = POLLS.with(Cell::get);
        let worked = polls != idle.polls_seen;
        idle.polls_seen = polls;
        let Idle { poll, run_queue, keep_awake, .. } = &mut *idle;
        let Some(poll) = poll.as_mut() else { return };
        let now = Instant::now();
        let awaiting = || AWAITING.with(|n| n.get().map_or(0, |n| n.load(Ordering::Relaxed)));
        let awaits = || if awaiting() > 0 { Awaits::Origin } else { Awaits::Clients };
        if poll.idle(now, worked, awaits, || run_queue.crowded(now)) {
            // Let a database or client process that shares this core run first.
            std::thread::yield_now();
            if let Some(waker) = keep_awake {
                waker.wake_by_ref();
            }
        }
    });
}

fn after_unpark() {
    IDLE.with(|idle| {
        if let Some(poll) = idle.borrow_mut().poll.as_mut() {
            poll.woke(Instant::now());
        }
    });
}

/// Never ready; keeps the waker that `before_park` uses.
fn keep_awake_slot(cx: &mut Context<'_>) -> Poll<()> {
    IDLE.with(|idle| {
        let mut idle = idle.borrow_mut();
        if !idle.keep_awake.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            idle.keep_awake = Some(cx.waker().clone());
        }
    });
    Poll::Pending
}

/// A task that counts its polls in `POLLS`.
struct Counted(Pin<Box<dyn Future<Output = ()> + Send>>);

impl Future for Counted {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        POLLS.with(|p| p.set(p.get().wrapping_add(1)));
        self.0.as_mut().poll(cx)
    }
}

/// The index of the worker running the caller (0 outside the workers, e.g. in tests that run
/// a server on their own runtime).
pub fn current() -> usize {
    WORKER.with(Cell::get)
}

/// The worker threads, stopped (and what they run dropped) when this is dropped.
pub struct Workers {
    workers: Vec<Worker>,
    busy_poll: Duration,
}

struct Worker {
    handle: Handle,
    live: Arc<AtomicUsize>,
    /// Its sessions waiting for their origin (`mark_awaiting_origin`).
    awaiting: Arc<AtomicUsize>,
    _stop: oneshot::Sender<()>,
}

impl Workers {
    /// Starts `n` (at least one) worker threads, each with its own current-thread runtime,
    /// each polling for I/O up to `busy_poll` after work before it sleeps (zero: never).
    pub fn start(n: usize, busy_poll: Duration) -> std::io::Result<Workers> {
        let mut workers = Vec::with_capacity(n.max(1));
        for index in 0..n.max(1) {
            let runtime = Builder::new_current_thread()
                .enable_all()
                .on_thread_park(before_park)
                .on_thread_unpark(after_unpark)
                .build()?;
            let handle = runtime.handle().clone();
            let (stop, stopped) = oneshot::channel::<()>();
            let awaiting = Arc::new(AtomicUsize::new(0));
            let counted = Arc::clone(&awaiting);
            std::thread::Builder::new().name(format!("pgwarp-worker-{index}")).spawn(move || {
                WORKER.with(|w| w.set(index));
                AWAITING.with(|n| {
                    n.get_or_init(|| counted);
                });
                if !busy_poll.is_zero() {
                    IDLE.with(|idle| idle.borrow_mut().poll = Some(BusyPoll::new(busy_poll)));
                }
                runtime.block_on(async {
                    tokio::select! {
                        _ = stopped => {}
                        _ = std::future::poll_fn(keep_awake_slot) => {}
                    }
                });
            })?;
            workers.push(Worker { handle, live: Arc::new(AtomicUsize::new(0)), awaiting, _stop: stop });
        }
        Ok(Workers { workers, busy_poll })
    }

    /// How long each worker polls after work before it sleeps.
    pub fn busy_poll(&self) -> Duration {
        self.busy_poll
    }

    /// Counts these workers' sessions that wait for their origin.
    pub fn awaiting_origin(&self) -> AwaitingOrigin {
        AwaitingOrigin(self.workers.iter().map(|w| Arc::clone(&w.awaiting)).collect())
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
        worker.handle.spawn(Counted(Box::pin(async move {
            let _live = LiveGuard(live);
            task().await;
        })));
    }
}

/// Counts a task as live until it ends (or is dropped with its runtime).
struct LiveGuard(Arc<AtomicUsize>);

impl Drop for LiveGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The busy-poll window for `workers` workers: `configured`, or for "auto" (None) the default
/// unless the process's CPU quota is below one core per worker (see `busy_poll`).
pub fn resolve_busy_poll(configured: Option<Duration>, workers: usize) -> Duration {
    let quota = quota::cpu_quota();
    let resolved = busy_poll::resolve(configured, workers, quota);
    if configured.is_none() && resolved.is_zero() {
        tracing::info!(
            cpu_quota = quota.unwrap_or_default(),
            workers,
            "busy polling off: the CPU quota is less than one core per worker (set busy_poll to override)"
        );
    }
    resolved
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
        let workers = Workers::start(2, Duration::from_micros(50)).unwrap();
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

    /// CPU time (user + system) of the calling thread, in clock ticks.
    #[cfg(target_os = "linux")]
    fn thread_cpu_ticks() -> u64 {
        let stat = std::fs::read_to_string("/proc/thread-self/stat").unwrap();
        // Fields after the parenthesised name: state is field 3, utime 14, stime 15.
        let rest = &stat[stat.rfind(')').unwrap() + 2..];
        let fields: Vec<&str> = rest.split(' ').collect();
        fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn an_idle_worker_stops_polling_after_one_window() {
        let workers = Workers::start(1, Duration::from_millis(1)).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        workers.spawn(move || async move {
            // Work that idles briefly between messages: the worker polls through the gaps.
            let (mut a, mut b) = tokio::io::duplex(64);
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let echo = async move {
                let mut buf = [0u8; 1];
                while b.read_exact(&mut buf).await.is_ok() {
                    if b.write_all(&buf).await.is_err() {
                        break;
                    }
                }
            };
            let ping = async move {
                let mut buf = [0u8; 1];
                for _ in 0..100 {
                    a.write_all(b"x").await.unwrap();
                    a.read_exact(&mut buf).await.unwrap();
                }
            };
            tokio::join!(echo, ping);
            // Then a long idle stretch: one window of polling at most, then sleep.
            let before = thread_cpu_ticks();
            tokio::time::sleep(Duration::from_millis(500)).await;
            tx.send(thread_cpu_ticks() - before).unwrap();
        });
        let idle_ticks = rx.recv_timeout(Duration::from_secs(10)).unwrap();
        // Polling through the 500 ms would cost ~50 ticks (100 Hz); a 1 ms window, at most 1.
        assert!(idle_ticks <= 5, "the idle worker used {idle_ticks} ticks of CPU in 500 ms");
    }
}
