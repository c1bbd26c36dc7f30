//! A log line every `stats_period` saying what the pools did in it, as PgBouncer's
//! `stats_period` writes one: transactions and requests per second, bytes per second each way,
//! and the average transaction, request and wait times, over every pool. For operators who
//! read logs rather than scrape `/metrics`; the same totals are there and in `SHOW POOLS`.
//! Nothing is logged for a period in which nothing happened.

use std::sync::Arc;
use std::time::Duration;

use crate::pool::PoolSnapshot;
use crate::server::ServerContext;

/// How often to look at the setting again while the line is off.
const OFF_RECHECK: Duration = Duration::from_secs(60);

/// The pools' counters summed, at one moment.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Totals {
    pub transactions: u64,
    pub transaction_seconds: f64,
    pub queries: u64,
    pub query_seconds: f64,
    pub waits: u64,
    pub wait_seconds: f64,
    pub received: u64,
    pub sent: u64,
}

impl Totals {
    pub fn of(pools: &[PoolSnapshot]) -> Totals {
        pools.iter().fold(Totals::default(), |t, p| Totals {
            transactions: t.transactions + p.checkouts,
            transaction_seconds: t.transaction_seconds + p.transaction_seconds,
            queries: t.queries + p.queries,
            query_seconds: t.query_seconds + p.query_seconds,
            waits: t.waits + p.waits,
            wait_seconds: t.wait_seconds + p.wait_seconds,
            received: t.received + p.received_bytes,
            sent: t.sent + p.sent_bytes,
        })
    }
}

/// One period's rates (per second) and averages (microseconds).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Summary {
    pub transactions_per_sec: f64,
    pub queries_per_sec: f64,
    pub received_per_sec: f64,
    pub sent_per_sec: f64,
    pub transaction_us: f64,
    pub query_us: f64,
    pub wait_us: f64,
}

/// What happened between `before` and `now`, `elapsed` apart; None when nothing did.
pub fn summarize(before: &Totals, now: &Totals, elapsed: Duration) -> Option<Summary> {
    let count = |a: u64, b: u64| b.saturating_sub(a) as f64;
    let time = |a: f64, b: f64| (b - a).max(0.0);
    let (transactions, queries) = (count(before.transactions, now.transactions), count(before.queries, now.queries));
    let (received, sent) = (count(before.received, now.received), count(before.sent, now.sent));
    if transactions == 0.0 && queries == 0.0 && received == 0.0 && sent == 0.0 {
        return None;
    }
    let secs = elapsed.as_secs_f64().max(1e-3);
    let average_us = |total: f64, n: f64| if n > 0.0 { total * 1e6 / n } else { 0.0 };
    let waits = count(before.waits, now.waits);
    Some(Summary {
        transactions_per_sec: transactions / secs,
        queries_per_sec: queries / secs,
        received_per_sec: received / secs,
        sent_per_sec: sent / secs,
        transaction_us: average_us(time(before.transaction_seconds, now.transaction_seconds), transactions),
        query_us: average_us(time(before.query_seconds, now.query_seconds), queries),
        wait_us: average_us(time(before.wait_seconds, now.wait_seconds), waits),
    })
}

/// Logs a line every `stats_period` (read again each time, so RELOAD changes it) until the
/// task is dropped.
pub async fn run(ctx: Arc<ServerContext>) {
    let totals = || Totals::of(&ctx.pools.all().iter().map(|p| p.snapshot()).collect::<Vec<_>>());
    let mut before = totals();
    let mut since = tokio::time::Instant::now();
    loop {
        let period = ctx.config().stats_period;
        if period.is_zero() {
            tokio::time::sleep(OFF_RECHECK).await;
            before = totals();
            since = tokio::time::Instant::now();
            continue;
        }
        tokio::time::sleep_until(since + period).await;
        let now = totals();
        let at = tokio::time::Instant::now();
        if let Some(s) = summarize(&before, &now, at - since) {
            tracing::info!(
                xacts_per_sec = format_args!("{:.1}", s.transactions_per_sec),
                queries_per_sec = format_args!("{:.1}", s.queries_per_sec),
                in_bytes_per_sec = format_args!("{:.0}", s.received_per_sec),
                out_bytes_per_sec = format_args!("{:.0}", s.sent_per_sec),
                xact_us = format_args!("{:.0}", s.transaction_us),
                query_us = format_args!("{:.0}", s.query_us),
                wait_us = format_args!("{:.0}", s.wait_us),
                "stats"
            );
        }
        (before, since) = (now, at);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(checkouts: u64, queries: u64, received_bytes: u64) -> PoolSnapshot {
        PoolSnapshot {
            checkouts,
            transaction_seconds: checkouts as f64 * 0.002,
            queries,
            query_seconds: queries as f64 * 0.001,
            waits: 4,
            wait_seconds: 0.004,
            received_bytes,
            sent_bytes: 2 * received_bytes,
            ..PoolSnapshot::default()
        }
    }

    #[test]
    fn a_period_gives_rates_per_second_and_average_times_over_every_pool() {
        let before = Totals::of(&[pool(100, 200, 1000), pool(0, 0, 0)]);
        let mut later = pool(50, 100, 500);
        later.waits = 6;
        later.wait_seconds = 0.010;
        let now = Totals::of(&[pool(300, 600, 3000), later]);
        let s = summarize(&before, &now, Duration::from_secs(10)).unwrap();
        assert_eq!((s.transactions_per_sec, s.queries_per_sec), (25.0, 50.0));
        assert_eq!((s.received_per_sec, s.sent_per_sec), (250.0, 500.0));
        assert!((s.transaction_us - 2000.0).abs() < 1e-6, "{s:?}");
        assert!((s.query_us - 1000.0).abs() < 1e-6, "{s:?}");
        // Two more waits (8 before, 10 now), 6ms more waiting in all.
        assert!((s.wait_us - 3000.0).abs() < 1e-6, "{s:?}");
    }

    #[test]
    fn a_quiet_period_logs_nothing() {
        let t = Totals::of(&[pool(100, 200, 1000)]);
        assert_eq!(summarize(&t, &t, Duration::from_secs(60)), None);
    }
}
