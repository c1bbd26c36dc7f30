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
//! Polling only pays when the next event comes soon. An idle gap runs from the moment the
//! worker ran out of work to the moment it had work again, and it is a hit if it was no longer
//! than `busy_poll`, whether a poll caught it or a sleep did. Gaps are judged in two kinds, by
//! what the worker waits for when it runs out of work ([`Awaits`]): an origin's answer to a
//! request a session sent, or anything else, mostly clients' next messages. A database answers
//! a point query in a steady time; a client thinks for as long as its application makes it. One
//! client at a fixed rate shows both: a 150 µs answer, then 850 µs of think time. Judged
//! together they would poll through every gap or none; apart, the worker polls for the answers
//! and sleeps through the think time. For each kind:
//! - the worker polls while at least half of its recent gaps (a moving average over about the
//!   last eight) were hits. Under sparse traffic it stops after a few long gaps, and an idle
//!   pgwarp never polls: polling only follows work;
//! - it polls for a window sized from the longest of its last eight hits, with a quarter and
//!   10 µs to spare, at most `busy_poll`. A gap longer than the window is slept through and
//!   widens it; eight shorter ones narrow it. So `busy_poll` is a ceiling, not a cost paid on
//!   every miss: after 40 µs answers, a slow one costs 60 µs of polling, not 200.
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
/// How many recent hits the window is sized from.
const HISTORY: usize = 8;
/// Added to the longest recent hit for the window: a quarter of it, and this.
const SLACK: Duration = Duration::from_micros(10);

/// What a worker waits for when it runs out of work.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Awaits {
    /// A session sent its origin a request and waits for the answer. A database answers a
    /// short query in a steady time, so these gaps are short and regular: polling pays.
    Origin,
    /// Anything else: a client's next message, a new client, a timer. Client think time is
    /// whatever the application makes it.
    Clients,
}

/// Recent idle gaps of one kind.
#[derive(Debug)]
struct Gaps {
    /// Moving average of gaps no longer than `max`, in 1/256ths. Starts full.
    hits: u32,
    /// The last hits, oldest overwritten first.
    recent: [Duration; HISTORY],
    /// How many of `recent` are filled, and the next to overwrite.
    filled: usize,
    next: usize,
}

impl Gaps {
    fn new() -> Gaps {
        Gaps { hits: FULL, recent: [Duration::ZERO; HISTORY], filled: 0, next: 0 }
    }

    fn record(&mut self, gap: Duration, max: Duration) {
        let hit = gap <= max;
        self.hits = self.hits - self.hits / 8 + if hit { FULL / 8 } else { 0 };
        if hit {
            self.recent[self.next] = gap;
            self.next = (self.next + 1) % HISTORY;
            self.filled = (self.filled + 1).min(HISTORY);
        }
    }

    fn polling(&self) -> bool {
        self.hits >= THRESHOLD
    }

    /// How long to poll: long enough for the longest recent hit with some room, so a gap
    /// like those is caught and a longer one costs little more than they did; `max` until
    /// there are hits to go by.
    fn window(&self, max: Duration) -> Duration {
        match self.recent[..self.filled].iter().max() {
            Some(&longest) => (longest + longest / 4 + SLACK).min(max),
            None => max,
        }
    }
}

/// One worker's busy-poll state.
#[derive(Debug)]
pub struct BusyPoll {
    /// The longest a worker polls after work; zero turns polling off.
    max: Duration,
    /// Gaps spent waiting for an origin, and the others.
    origin: Gaps,
    clients: Gaps,
    /// When the current idle gap began (the worker's first idle moment after work), and what it
    /// waits for.
    idle_since: Option<(Instant, Awaits)>,
    /// When the worker last looked for I/O in this gap: the last poll, or the wake-up from a sleep.
    /// Work found by that look arrived just before it, so this is when the gap ended.
    looked: Option<Instant>,
    /// Whether the worker went to sleep (rather than polling) at its last idle moment.
    slept: bool,
}

impl BusyPoll {
    pub fn new(max: Duration) -> BusyPoll {
        BusyPoll { max, origin: Gaps::new(), clients: Gaps::new(), idle_since: None, looked: None, slept: false }
    }

    fn gaps(&mut self, awaits: Awaits) -> &mut Gaps {
        match awaits {
            Awaits::Origin => &mut self.origin,
            Awaits::Clients => &mut self.clients,
        }
    }

    /// The worker has nothing to run. `worked`: whether it ran any task since the last call;
    /// `awaits`: what it waits for now (asked only after work); `crowded`: whether another
    /// process is waiting for a CPU (asked only before a poll).
    /// Returns true to poll for I/O once more, false to sleep until an event.
    pub fn idle(
        &mut self,
        now: Instant,
        worked: bool,
        awaits: impl FnOnce() -> Awaits,
        crowded: impl FnOnce() -> bool,
    ) -> bool {
        if worked {
            if let (Some((since, kind)), Some(looked)) = (self.idle_since, self.looked) {
                let max = self.max;
                self.gaps(kind).record(looked.saturating_duration_since(since), max);
            }
            self.idle_since = Some((now, awaits()));
        }
        // A poll turn takes a microsecond or two. A longer one means the yield let another
        // process run: the CPU is wanted, and polling on would take turns from it.
        let contended =
            !worked && !self.slept && self.looked.is_some_and(|at| now.saturating_duration_since(at) > CONTENDED);
        let poll = match self.idle_since {
            Some((since, kind)) if !contended && !self.max.is_zero() => {
                let max = self.max;
                let gaps = self.gaps(kind);
                gaps.polling() && now.saturating_duration_since(since) < gaps.window(max) && !crowded()
            }
            _ => false,
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use Awaits::{Clients, Origin};

    fn us(n: u64) -> Duration {
        Duration::from_micros(n)
    }

    impl BusyPoll {
        fn polling(&self, awaits: Awaits) -> bool {
            match awaits {
                Origin => self.origin.polling(),
                Clients => self.clients.polling(),
            }
        }
    }

    /// How one idle gap went.
    #[derive(Debug)]
    struct Gap {
        /// The event was found by a poll, not by a wake-up from sleep.
        caught: bool,
        /// How long the worker polled.
        polled: Duration,
    }

    /// Runs one idle gap of `gap`, waiting for `awaits`, after work at `t`: polls every
    /// microsecond while told to, sleeps otherwise (a wake-up takes 40 µs).
    fn gap(p: &mut BusyPoll, t: &mut Instant, gap: Duration, awaits: Awaits) -> Gap {
        let start = *t;
        let end = start + gap;
        let mut now = start;
        let mut worked = true;
        loop {
            if !p.idle(now, std::mem::take(&mut worked), || awaits, || false) {
                p.woke(end + us(40));
                *t = end + us(43);
                return Gap { caught: false, polled: now - start };
            }
            now += us(1);
            if now >= end {
                *t = now + us(3);
                return Gap { caught: true, polled: now - start };
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
        assert!(!p.idle(t, false, || Clients, || false));
        p.woke(t + us(1000));
        assert!(!p.idle(t + us(1001), false, || Clients, || false));
    }

    #[test]
    fn polls_for_up_to_busy_poll_after_work_then_sleeps() {
        let mut p = BusyPoll::new(us(50));
        let t = Instant::now();
        assert!(p.idle(t, true, || Clients, || false));
        for n in 1..50 {
            assert!(p.idle(t + us(n), false, || Clients, || false), "turn {n}");
        }
        assert!(!p.idle(t + us(50), false, || Clients, || false));
        // Work restarts the window.
        p.woke(t + us(60));
        assert!(p.idle(t + us(61), true, || Clients, || false));
        assert!((2..=50).all(|n| p.idle(t + us(60 + n), false, || Clients, || false)));
    }

    #[test]
    fn a_poll_turn_that_another_process_took_ends_the_polling() {
        let mut p = BusyPoll::new(us(100));
        let t = Instant::now();
        assert!(p.idle(t, true, || Clients, || false));
        assert!(p.idle(t + us(2), false, || Clients, || false));
        // The yield in that turn ran someone else for 30 µs: sleep rather than take turns.
        assert!(!p.idle(t + us(32), false, || Clients, || false));
        // A long turn spent on our own work is not contention.
        p.woke(t + us(40));
        assert!(p.idle(t + us(41), true, || Clients, || false));
        assert!(p.idle(t + us(90), true, || Clients, || false));
    }

    #[test]
    fn a_process_waiting_for_a_cpu_vetoes_polling() {
        let mut p = BusyPoll::new(us(100));
        let t = Instant::now();
        assert!(!p.idle(t, true, || Clients, || true));
        // Asked only when polling is otherwise due.
        p.woke(t + us(500));
        let mut asked = false;
        assert!(!p.idle(
            t + us(5000),
            false,
            || Clients,
            || {
                asked = true;
                false
            }
        ));
        assert!(!asked);
    }

    #[test]
    fn zero_turns_polling_off() {
        let mut p = BusyPoll::new(Duration::ZERO);
        let mut t = Instant::now();
        for _ in 0..10 {
            assert!(!gap(&mut p, &mut t, Duration::ZERO, Origin).caught);
        }
    }

    #[test]
    fn short_gaps_are_caught_by_polling() {
        let mut p = BusyPoll::new(us(50));
        let mut t = Instant::now();
        let caught = (0..100).filter(|_| gap(&mut p, &mut t, us(30), Clients).caught).count();
        assert_eq!(caught, 100);
    }

    #[test]
    fn the_window_shrinks_to_the_gaps_it_catches() {
        let mut p = BusyPoll::new(us(500));
        let mut t = Instant::now();
        for _ in 0..10 {
            assert!(gap(&mut p, &mut t, us(40), Origin).caught);
        }
        // One answer slower than those costs a poll of about their length, not busy_poll.
        let slow = gap(&mut p, &mut t, Duration::from_millis(5), Origin);
        assert!(!slow.caught);
        assert!(slow.polled <= us(61), "{slow:?}");
        // And the next short ones are still caught.
        assert!(gap(&mut p, &mut t, us(40), Origin).caught);
    }

    #[test]
    fn the_window_grows_to_a_gap_it_slept_through() {
        let mut p = BusyPoll::new(us(500));
        let mut t = Instant::now();
        for _ in 0..10 {
            gap(&mut p, &mut t, us(40), Origin);
        }
        // The database slows down: its answers now take 200 µs. One is slept through, and the
        // window takes it in.
        let after: Vec<bool> = (0..5).map(|_| gap(&mut p, &mut t, us(200), Origin).caught).collect();
        assert_eq!(after, [false, true, true, true, true]);
        // Past busy_poll it does not go.
        let mut p = BusyPoll::new(us(100));
        for _ in 0..3 {
            gap(&mut p, &mut t, us(90), Origin);
        }
        assert!(gap(&mut p, &mut t, Duration::from_millis(1), Origin).polled <= us(100));
    }

    #[test]
    fn gaps_waiting_for_an_origin_and_for_clients_are_judged_apart() {
        // One client at a fixed rate: the database answers in 150 µs, the client sends its next
        // query 850 µs later. Polling catches the answers and sleeps through the think time.
        let mut p = BusyPoll::new(us(500));
        let mut t = Instant::now();
        let (mut caught, mut polled_for_clients) = (0, Duration::ZERO);
        for i in 0..100 {
            caught += usize::from(gap(&mut p, &mut t, us(150), Origin).caught);
            let client = gap(&mut p, &mut t, us(850), Clients);
            if i >= 10 {
                polled_for_clients += client.polled;
            }
        }
        assert!(caught >= 99, "caught {caught} of 100 answers");
        assert!(p.polling(Origin) && !p.polling(Clients));
        assert_eq!(polled_for_clients, Duration::ZERO);
    }

    #[test]
    fn sparse_traffic_stops_polling_within_a_few_gaps() {
        let mut p = BusyPoll::new(us(50));
        let mut t = Instant::now();
        let mut polled = 0;
        for _ in 0..100 {
            gap(&mut p, &mut t, Duration::from_millis(2), Clients);
            polled += usize::from(p.polling(Clients));
        }
        assert!(!p.polling(Clients));
        assert!(polled <= 6, "kept polling for {polled} long gaps");
    }

    #[test]
    fn polling_resumes_when_gaps_turn_short_again() {
        let mut p = BusyPoll::new(us(50));
        let mut t = Instant::now();
        for _ in 0..50 {
            gap(&mut p, &mut t, Duration::from_millis(2), Clients);
        }
        assert!(!p.polling(Clients));
        // Short gaps, slept through at first, show that polling would pay.
        let caught: Vec<bool> = (0..10).map(|_| gap(&mut p, &mut t, us(5), Clients).caught).collect();
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
            caught += usize::from(gap(&mut p, &mut t, g, Clients).caught);
        }
        assert!(caught >= 60, "caught {caught} of 67 short gaps");
    }

    #[test]
    fn mostly_long_gaps_stop_polling() {
        let mut p = BusyPoll::new(us(50));
        let mut t = Instant::now();
        for i in 0..100 {
            let g = if i % 3 == 0 { us(25) } else { us(400) };
            gap(&mut p, &mut t, g, Clients);
        }
        assert!(!p.polling(Clients));
    }
}
