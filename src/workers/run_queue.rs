//! Whether any process is waiting for a CPU, machine-wide: busy polling must not keep a CPU
//! that another process could run on.
//!
//! A CPU that goes idle pulls waiting tasks from busier CPUs at once; a CPU that is polling
//! looks busy and does not, so the waiting task sits until the next periodic rebalance. The
//! kernel's own halt polling starts only after that idle-time pull found nothing, and
//! `busy_poll` follows the same rule: it polls only while the number of runnable tasks
//! (`/proc/loadavg`'s fourth field, which counts the asking thread) does not exceed the CPUs
//! online. The file is read (one `pread`) at most every 200 µs per worker.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

/// How long one reading stands.
const FRESH: Duration = Duration::from_micros(200);

/// A worker's view of the machine's run queue.
#[derive(Debug, Default)]
pub struct RunQueue {
    /// None if /proc/loadavg could not be opened: the run queue is then never crowded.
    loadavg: Option<File>,
    /// CPUs online; 0 until the first reading, which also opens `loadavg` (once).
    cpus: usize,
    read_at: Option<Instant>,
    crowded: bool,
}

impl RunQueue {
    /// Whether more tasks are runnable than there are CPUs (false if that cannot be read).
    pub fn crowded(&mut self, now: Instant) -> bool {
        if self.read_at.is_some_and(|at| now.saturating_duration_since(at) < FRESH) {
            return self.crowded;
        }
        self.read_at = Some(now);
        if self.cpus == 0 {
            self.loadavg = File::open("/proc/loadavg").ok();
            self.cpus = std::fs::read_to_string("/sys/devices/system/cpu/online")
                .ok()
                .and_then(|list| count_cpus(&list))
                .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
        }
        let mut buf = [0u8; 128];
        let runnable =
            self.loadavg.as_ref().and_then(|f| f.read_at(&mut buf, 0).ok()).and_then(|n| runnable(buf.get(..n)?));
        self.crowded = runnable.is_some_and(|r| r > self.cpus);
        self.crowded
    }
}

/// The runnable-task count from `/proc/loadavg` ("0.50 0.40 0.30 3/194 7543").
fn runnable(loadavg: &[u8]) -> Option<usize> {
    let text = std::str::from_utf8(loadavg).ok()?;
    text.split_whitespace().nth(3)?.split('/').next()?.parse().ok()
}

/// How many CPUs a list like "0-3,5,7-8" names.
fn count_cpus(list: &str) -> Option<usize> {
    let mut n = 0;
    for part in list.trim().split(',') {
        n += match part.split_once('-') {
            Some((a, b)) => b.parse::<usize>().ok()?.checked_sub(a.parse::<usize>().ok()?)? + 1,
            None => {
                part.parse::<usize>().ok()?;
                1
            }
        };
    }
    (n > 0).then_some(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_runnable_count() {
        assert_eq!(runnable(b"0.50 0.40 0.30 3/194 7543\n"), Some(3));
        assert_eq!(runnable(b"0.50 0.40"), None);
        assert_eq!(runnable(b"a b c x/y z"), None);
    }

    #[test]
    fn counts_cpu_lists() {
        assert_eq!(count_cpus("0-1\n"), Some(2));
        assert_eq!(count_cpus("0"), Some(1));
        assert_eq!(count_cpus("0-3,5,7-8"), Some(7));
        assert_eq!(count_cpus(""), None);
        assert_eq!(count_cpus("3-1"), None);
    }

    #[test]
    fn the_live_machine_reads() {
        let mut q = RunQueue::default();
        // Whatever the answer, it is read without error and then cached.
        let first = q.crowded(Instant::now());
        assert!(q.cpus >= 1);
        assert_eq!(q.crowded(q.read_at.unwrap()), first);
    }
}
