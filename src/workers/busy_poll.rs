//! Busy polling: a worker that runs out of work keeps checking for I/O for a few microseconds
//! before it sleeps.
//!
//! A pooler hop costs two wake-ups per round trip: the client's query wakes pgwarp, then the
//! origin's answer wakes it again. On a virtual machine a sleeping CPU is halted and waking it
//! takes an interrupt through the hypervisor, tens of microseconds, which dwarfs the few
//! microseconds pgwarp spends on a message. On the 2-core bench VM a zero-work server answered
//! pgbench in 95 µs sleeping and 34 µs polling (bench/canned_server.rs). So when a worker has
//! just done work and has none left, it polls its sockets without blocking (epoll with a zero
//! timeout) for up to `busy_poll`, yielding the CPU on each turn so that a database or client
//! process on the same core runs first; only then does it sleep. This is what Linux's
//! `net.core.busy_poll` and KVM's halt polling do, one level up.
//!
//! Polling must not keep a CPU from another process. Each turn yields first; a turn that took
//! long (another process ran in the yield) ends the polling, and so does a machine where more
//! tasks are runnable than there are CPUs (`run_queue`): a CPU that polls looks busy, so the
//! kernel would not move a waiting task onto it.
//!
//! Polling only pays when the next event comes soon. Each idle gap (from the moment the worker
//! ran out of work to the moment it had work again) is a hit if it was no longer than
//! `busy_poll`, whether a poll caught it or a sleep did; the worker polls while at least half of
//! its recent gaps (a moving average over about the last eight) were hits. Under sparse traffic
//! it stops polling after a few long gaps, and an idle pgwarp never polls: polling only
//! follows work.
//!
//! [`BusyPoll`] is the pure decision; `mod.rs` drives it from the runtime's park hooks.

use std::time::{Duration, Instant};

use crate::config::DEFAULT_BUSY_POLL;

/// The `busy_poll` to run with: the configured one, or for "auto" (None) the default, unless the
/// process may use less than a core per worker (`quota`, in cores): polling would then spend
/// the quota on waiting and get the process throttled.
pub fn resolve(configured: Option<Duration>, workers: usize, quota: Option<f64>) -> Duration {
    match (configured, quota) {
        (Some(d), _) => d,
        (None, Some(cores)) if cores < workers as f64 => Duration::ZERO,
        (None, _) => DEFAULT_BUSY_POLL,
    }
}

/// The hit average is kept in 1/256ths; each gap moves it an eighth of the way.
const FULL: u32 = 256;
/// Poll while the hit average is at least this (one half).
const THRESHOLD: u32 = FULL / 2;
/// A poll turn longer than this means another process ran in it.
const CONTENDED: Duration = Duration::from_micros(20);

/// One worker's busy-poll state.
#[derive(Debug)]
pub struct BusyPoll {
    /// How long to poll after work; zero turns polling off.
    max: Duration,
    /// Moving average of gaps no longer than `max`, in 1/256ths. Starts full.
    hits: u32,
    /// When the current idle gap began (the worker's first idle moment after work).
    idle_since: Option<Instant>,
    /// When the worker last looked for I/O in this gap: the last poll, or the wake-up from a sleep.
    /// Work found by that look arrived just before it, so this is when the gap ended.
    looked: Option<Instant>,
    /// Whether the worker went to sleep (rather than polling) at its last idle moment.
    slept: bool,
}

impl BusyPoll {
    pub fn new(max: Duration) -> BusyPoll {
        BusyPoll { max, hits: FULL, idle_since: None, looked: None, slept: false }
    }

    /// The worker has nothing to run. `worked`: whether it ran any task since the last call;
    /// `crowded`: whether another process is waiting for a CPU (asked only before a poll).
    /// Returns true to poll for I/O once more, false to sleep until an event.
    pub fn idle(&mut self, now: Instant, worked: bool, crowded: impl FnOnce() -> bool) -> bool {
        if worked {
            if let (Some(since), Some(looked)) = (self.idle_since, self.looked) {
                self.record(looked.saturating_duration_since(since));
            }
            self.idle_since = Some(now);
        }
        // A poll turn takes a microsecond or two. A longer one means the yield let another
        // process run: the CPU is wanted, and polling on would take turns from it.
        let contended =
            !worked && !self.slept && self.looked.is_some_and(|at| now.saturating_duration_since(at) > CONTENDED);
        let poll = match self.idle_since {
            Some(since) => {
                !contended && self.polling() && now.saturating_duration_since(since) < self.max && !crowded()
            }
            None => false,
        };
        self.looked = Some(now);
        self.slept = !poll;
        poll
    }

    /// The worker is running again after an idle moment.
    pub fn woke(&mut self, now: Instant) {
        if std::mem::take(&mut self.slept) {
            self.looked = Some(now);
        }
    }

    /// Whether recent gaps were short enough that polling pays.
    pub fn polling(&self) -> bool {
        !self.max.is_zero() && self.hits >= THRESHOLD
    }

    fn record(&mut self, gap: Duration) {
        let hit = if gap <= self.max { FULL / 8 } else { 0 };
        self.hits = self.hits - self.hits / 8 + hit;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn us(n: u64) -> Duration {
        Duration::from_micros(n)
    }

    /// Runs one idle gap of `gap` after work at `t`: polls every microsecond while told to,
    /// sleeps otherwise, and returns whether the event was caught by a poll.
    fn gap(p: &mut BusyPoll, t: &mut Instant, gap: Duration) -> bool {
        let end = *t + gap;
        let mut now = *t;
        let mut worked = true;
        loop {
            if !p.idle(now, std::mem::take(&mut worked), || false) {
                p.woke(end);
                *t = end + us(3);
                return false;
            }
            now += us(1);
            if now >= end {
                *t = now + us(3);
                return true;
            }
        }
    }

    #[test]
    fn auto_polls_unless_the_cpu_quota_is_below_a_core_per_worker() {
        assert_eq!(resolve(None, 2, None), DEFAULT_BUSY_POLL);
        assert_eq!(resolve(None, 2, Some(2.0)), DEFAULT_BUSY_POLL);
        assert_eq!(resolve(None, 2, Some(1.5)), Duration::ZERO);
        assert_eq!(resolve(None, 1, Some(0.25)), Duration::ZERO);
        assert_eq!(resolve(Some(us(30)), 1, Some(0.25)), us(30));
        assert_eq!(resolve(Some(Duration::ZERO), 2, None), Duration::ZERO);
    }

    #[test]
    fn an_idle_worker_that_never_worked_sleeps() {
        let mut p = BusyPoll::new(us(50));
        let t = Instant::now();
        assert!(!p.idle(t, false, || false));
        p.woke(t + us(1000));
        assert!(!p.idle(t + us(1001), false, || false));
    }

    #[test]
    fn polls_for_up_to_busy_poll_after_work_then_sleeps() {
        let mut p = BusyPoll::new(us(50));
        let t = Instant::now();
        assert!(p.idle(t, true, || false));
        for n in 1..50 {
            assert!(p.idle(t + us(n), false, || false), "turn {n}");
        }
        assert!(!p.idle(t + us(50), false, || false));
        // Work restarts the window.
        p.woke(t + us(60));
        assert!(p.idle(t + us(61), true, || false));
        assert!((2..=50).all(|n| p.idle(t + us(60 + n), false, || false)));
    }

    #[test]
    fn a_poll_turn_that_another_process_took_ends_the_polling() {
        let mut p = BusyPoll::new(us(100));
        let t = Instant::now();
        assert!(p.idle(t, true, || false));
        assert!(p.idle(t + us(2), false, || false));
        // The yield in that turn ran someone else for 30 µs: sleep rather than take turns.
        assert!(!p.idle(t + us(32), false, || false));
        // A long turn spent on our own work is not contention.
        p.woke(t + us(40));
        assert!(p.idle(t + us(41), true, || false));
        assert!(p.idle(t + us(90), true, || false));
    }

    #[test]
    fn a_process_waiting_for_a_cpu_vetoes_polling() {
        let mut p = BusyPoll::new(us(100));
        let t = Instant::now();
        assert!(!p.idle(t, true, || true));
        // Asked only when polling is otherwise due.
        p.woke(t + us(500));
        let mut asked = false;
        assert!(!p.idle(t + us(5000), false, || {
            asked = true;
            false
        }));
        assert!(!asked);
    }

    #[test]
    fn zero_turns_polling_off() {
        let mut p = BusyPoll::new(Duration::ZERO);
        let mut t = Instant::now();
        for _ in 0..10 {
            assert!(!gap(&mut p, &mut t, Duration::ZERO));
        }
    }

    #[test]
    fn short_gaps_are_caught_by_polling() {
        let mut p = BusyPoll::new(us(50));
        let mut t = Instant::now();
        let caught = (0..100).filter(|_| gap(&mut p, &mut t, us(30))).count();
        assert_eq!(caught, 100);
    }

    #[test]
    fn sparse_traffic_stops_polling_within_a_few_gaps() {
        let mut p = BusyPoll::new(us(50));
        let mut t = Instant::now();
        let mut polled = 0;
        for _ in 0..100 {
            gap(&mut p, &mut t, Duration::from_millis(2));
            polled += usize::from(p.polling());
        }
        assert!(!p.polling());
        assert!(polled <= 6, "kept polling for {polled} long gaps");
    }

    #[test]
    fn polling_resumes_when_gaps_turn_short_again() {
        let mut p = BusyPoll::new(us(50));
        let mut t = Instant::now();
        for _ in 0..50 {
            gap(&mut p, &mut t, Duration::from_millis(2));
        }
        assert!(!p.polling());
        // Short gaps, slept through at first, show that polling would pay.
        let caught: Vec<bool> = (0..10).map(|_| gap(&mut p, &mut t, us(20))).collect();
        assert!(!caught[0]);
        assert!(caught[9], "{caught:?}");
    }

    #[test]
    fn mostly_short_gaps_with_some_long_ones_keep_polling() {
        let mut p = BusyPoll::new(us(50));
        let mut t = Instant::now();
        let mut caught = 0;
        for i in 0..100 {
            let g = if i % 3 == 0 { us(400) } else { us(25) };
            caught += usize::from(gap(&mut p, &mut t, g));
        }
        assert!(caught >= 60, "caught {caught} of 67 short gaps");
    }

    #[test]
    fn mostly_long_gaps_stop_polling() {
        let mut p = BusyPoll::new(us(50));
        let mut t = Instant::now();
        for i in 0..100 {
            let g = if i % 3 == 0 { us(25) } else { us(400) };
            gap(&mut p, &mut t, g);
        }
        assert!(!p.polling());
    }
}
