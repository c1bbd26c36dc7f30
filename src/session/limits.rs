//! How long a client may take over a stretch of its session: hold still inside a transaction
//! (`idle_transaction_timeout`) or outside one (`client_idle_timeout`) while holding an origin
//! connection or not, and wait for the origin to answer a request (`query_timeout`). The session
//! loop tells its [`Watch`] at each turn which [`Stretch`] it is in; the watch runs a timer for
//! the stretch under way and says when its limit is up. With every limit off (the default) it
//! never starts a timer, and the watch rides on the session's existing wait for shutdown, so the
//! common path pays a read of the pool's settings per turn.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::time::Sleep;

/// What a client is doing, as far as its time limits go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Stretch {
    /// Nothing under way in either direction, inside a transaction or not.
    Still { in_transaction: bool },
    /// The origin owes an answer to a request sent at `since`. Each request of a pipeline is a
    /// stretch of its own, from the moment the one before it was answered.
    Query { since: Instant },
}

/// The timer of the stretch under way; boxed, so a watch without one stays small.
struct Timer {
    sleep: Pin<Box<Sleep>>,
    stretch: Stretch,
    /// When the stretch began, and the limit its deadline was set with.
    start: tokio::time::Instant,
    limit: Duration,
}

#[derive(Default)]
pub(super) struct Watch {
    timer: Option<Timer>,
}

impl Watch {
    /// Every limit is off (a RELOAD may have turned them off): no stretch is timed.
    pub fn off(&mut self) {
        self.timer = None;
    }

    /// Notes the stretch the client is in now (`None`: busy, with nothing owed by the origin).
    /// A stretch keeps its start while it lasts, so its limit counts from there: the moment it
    /// was first observed when holding still, the request's own time for a query. Any other
    /// stretch, or none, ends it. `limit` gives the limit for a stretch (zero: none), as the
    /// settings are now: a RELOAD that changes it moves the deadline of the stretch under way,
    /// still counted from its start, as PgBouncer's periodic check would.
    pub fn observe(&mut self, now: Option<Stretch>, limit: impl FnOnce(Stretch) -> Duration) {
        let Some(stretch) = now else {
            self.timer = None;
            return;
        };
        let limit = limit(stretch);
        let start = match (&self.timer, stretch) {
            (Some(t), _) if t.stretch == stretch && t.limit == limit => return,
            (Some(t), _) if t.stretch == stretch => t.start,
            (_, Stretch::Still { .. }) => tokio::time::Instant::now(),
            (_, Stretch::Query { since }) => tokio::time::Instant::from_std(since),
        };
        self.timer = (!limit.is_zero()).then(|| Timer {
            sleep: Box::pin(tokio::time::sleep_until(start + limit)),
            stretch,
            start,
            limit,
        });
    }

    /// Polls `stop` first, then the limit of the stretch under way: `Some(None)` when `stop` is
    /// ready, `Some(Some(stretch))` when that stretch's limit is up.
    pub fn poll_stop_or_expired<F: Future<Output = ()>>(
        &mut self,
        stop: Pin<&mut F>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Stretch>> {
        if stop.poll(cx).is_ready() {
            return Poll::Ready(None);
        }
        match &mut self.timer {
            Some(t) => t.sleep.as_mut().poll(cx).map(|()| Some(t.stretch)),
            None => Poll::Pending,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STILL_IN: Stretch = Stretch::Still { in_transaction: true };
    const STILL_OUT: Stretch = Stretch::Still { in_transaction: false };

    /// Limits in milliseconds: inside a transaction, outside one, and for a query.
    fn limits(in_transaction: u64, outside: u64, query: u64) -> impl Fn(Stretch) -> Duration {
        move |stretch| {
            Duration::from_millis(match stretch {
                Stretch::Still { in_transaction: true } => in_transaction,
                Stretch::Still { in_transaction: false } => outside,
                Stretch::Query { .. } => query,
            })
        }
    }

    /// Waits until the watch's limit is up (with no stop in sight).
    async fn expired(watch: &mut Watch) -> Stretch {
        let mut never = std::pin::pin!(std::future::pending::<()>());
        let woke = std::future::poll_fn(|cx| watch.poll_stop_or_expired(never.as_mut(), cx)).await;
        woke.expect("the limit, not a stop")
    }

    /// Now, on tokio's clock (paused in these tests), as the session's `Instant`s are taken.
    fn now() -> Instant {
        tokio::time::Instant::now().into_std()
    }

    #[tokio::test(start_paused = true)]
    async fn a_stretch_of_stillness_expires_after_its_own_limit() {
        let mut watch = Watch::default();
        watch.observe(Some(STILL_IN), limits(300, 1000, 0));
        let started = tokio::time::Instant::now();
        assert_eq!(expired(&mut watch).await, STILL_IN);
        assert_eq!(started.elapsed(), Duration::from_millis(300));

        let mut watch = Watch::default();
        watch.observe(Some(STILL_OUT), limits(300, 1000, 0));
        let started = tokio::time::Instant::now();
        assert_eq!(expired(&mut watch).await, STILL_OUT);
        assert_eq!(started.elapsed(), Duration::from_millis(1000));
    }

    #[tokio::test(start_paused = true)]
    async fn a_stretch_keeps_its_start_and_busy_ends_it() {
        let mut watch = Watch::default();
        watch.observe(Some(STILL_IN), limits(300, 0, 0));
        tokio::time::advance(Duration::from_millis(200)).await;
        // Still the same stretch: the limit counts from its start.
        watch.observe(Some(STILL_IN), limits(300, 0, 0));
        let started = tokio::time::Instant::now();
        assert_eq!(expired(&mut watch).await, STILL_IN);
        assert_eq!(started.elapsed(), Duration::from_millis(100));
        watch.observe(None, limits(300, 0, 0));
        assert!(watch.timer.is_none());
        // A new stretch outside a transaction has no limit here.
        watch.observe(Some(STILL_OUT), limits(300, 0, 0));
        assert!(watch.timer.is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn a_query_counts_from_when_it_was_sent_and_each_request_of_a_pipeline_on_its_own() {
        let mut watch = Watch::default();
        let sent = now();
        tokio::time::advance(Duration::from_millis(100)).await;
        // First seen 100ms after it was sent: 200ms are left.
        watch.observe(Some(Stretch::Query { since: sent }), limits(0, 0, 300));
        let seen = tokio::time::Instant::now();
        tokio::time::advance(Duration::from_millis(150)).await;
        // The next request of the pipeline is answered from here: a new stretch, a new limit.
        let next = Stretch::Query { since: now() };
        watch.observe(Some(next), limits(0, 0, 300));
        assert_eq!(expired(&mut watch).await, next);
        assert_eq!(seen.elapsed(), Duration::from_millis(450));

        // The same request observed again keeps its deadline.
        let mut watch = Watch::default();
        let query = Stretch::Query { since: now() };
        watch.observe(Some(query), limits(0, 0, 300));
        tokio::time::advance(Duration::from_millis(250)).await;
        watch.observe(Some(query), limits(0, 0, 300));
        let started = tokio::time::Instant::now();
        assert_eq!(expired(&mut watch).await, query);
        assert_eq!(started.elapsed(), Duration::from_millis(50));
    }

    #[tokio::test(start_paused = true)]
    async fn an_answered_query_is_not_held_against_the_stillness_after_it() {
        let mut watch = Watch::default();
        watch.observe(Some(Stretch::Query { since: now() }), limits(300, 0, 200));
        tokio::time::advance(Duration::from_millis(150)).await;
        // Answered: the client holds still inside its transaction, with a limit of its own.
        watch.observe(Some(STILL_IN), limits(300, 0, 200));
        let started = tokio::time::Instant::now();
        assert_eq!(expired(&mut watch).await, STILL_IN);
        assert_eq!(started.elapsed(), Duration::from_millis(300));
    }

    #[tokio::test(start_paused = true)]
    async fn a_changed_limit_moves_the_deadline_of_the_stretch_under_way_from_its_start() {
        let mut watch = Watch::default();
        watch.observe(Some(STILL_IN), limits(1000, 0, 0));
        let started = tokio::time::Instant::now();
        tokio::time::advance(Duration::from_millis(200)).await;
        // Lowered by a RELOAD: due 300ms after the stretch began, not after the change.
        watch.observe(Some(STILL_IN), limits(300, 0, 0));
        assert_eq!(expired(&mut watch).await, STILL_IN);
        assert_eq!(started.elapsed(), Duration::from_millis(300));
        // Turned off for the stretch: no timer.
        watch.observe(Some(STILL_IN), limits(0, 0, 0));
        assert!(watch.timer.is_none());
    }

    #[tokio::test]
    async fn a_stop_comes_first() {
        let mut watch = Watch::default();
        watch.observe(Some(STILL_IN), limits(1, 1, 1));
        tokio::time::sleep(Duration::from_millis(5)).await;
        let mut ready = std::pin::pin!(std::future::ready(()));
        let woke = std::future::poll_fn(|cx| watch.poll_stop_or_expired(ready.as_mut(), cx)).await;
        assert_eq!(woke, None);
    }
}
