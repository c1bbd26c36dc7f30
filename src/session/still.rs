//! How long a client may hold still: `idle_transaction_timeout` inside a transaction and
//! `client_idle_timeout` outside one. The session loop tells its [`Watch`] at each turn whether
//! the client is holding still; the watch runs a timer for the stretch under way and says when
//! its limit is up. With both limits off (the default) it never starts a timer, and the watch
//! rides on the session's existing wait for shutdown, so the common path pays a flag check.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::time::Sleep;

/// The timer of one stretch of holding still; boxed, so a watch without one stays small.
struct Timer {
    sleep: Pin<Box<Sleep>>,
    in_transaction: bool,
}

pub(super) struct Watch {
    on: bool,
    timer: Option<Timer>,
}

impl Watch {
    /// A watch that observes only when `on` (some limit is set).
    pub fn new(on: bool) -> Watch {
        Watch { on, timer: None }
    }

    pub fn on(&self) -> bool {
        self.on
    }

    /// Notes whether the client holds still now (`Some(inside a transaction)`) or is busy
    /// (`None`). A stretch keeps its timer while it lasts, so the limit counts from its start;
    /// busy ends it. `limit` gives the limit for a stretch inside or outside a transaction
    /// (zero: none), read only when a stretch begins.
    pub fn observe(&mut self, still: Option<bool>, limit: impl FnOnce(bool) -> Duration) {
        match still {
            Some(in_transaction) if self.timer.as_ref().is_none_or(|t| t.in_transaction != in_transaction) => {
                let limit = limit(in_transaction);
                self.timer =
                    (!limit.is_zero()).then(|| Timer { sleep: Box::pin(tokio::time::sleep(limit)), in_transaction });
            }
            Some(_) => {}
            None if self.timer.is_some() => self.timer = None,
            None => {}
        }
    }

    /// Polls `stop` first, then the limit of the stretch under way: `Some(None)` when `stop` is
    /// ready, `Some(Some(inside a transaction))` when the limit is up.
    pub fn poll_stop_or_expired<F: Future<Output = ()>>(
        &mut self,
        stop: Pin<&mut F>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<bool>> {
        if stop.poll(cx).is_ready() {
            return Poll::Ready(None);
        }
        match &mut self.timer {
            Some(t) => t.sleep.as_mut().poll(cx).map(|()| Some(t.in_transaction)),
            None => Poll::Pending,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(in_transaction: u64, outside: u64) -> impl Fn(bool) -> Duration {
        move |tx| Duration::from_millis(if tx { in_transaction } else { outside })
    }

    /// Waits until the watch's limit is up (with no stop in sight).
    async fn expired(watch: &mut Watch) -> bool {
        let mut never = std::pin::pin!(std::future::pending::<()>());
        let woke = std::future::poll_fn(|cx| watch.poll_stop_or_expired(never.as_mut(), cx)).await;
        woke.expect("the limit, not a stop")
    }

    #[tokio::test(start_paused = true)]
    async fn a_stretch_of_stillness_expires_after_its_own_limit() {
        let mut watch = Watch::new(true);
        watch.observe(Some(true), limits(300, 1000));
        let started = tokio::time::Instant::now();
        assert!(expired(&mut watch).await, "inside a transaction");
        assert_eq!(started.elapsed(), Duration::from_millis(300));

        let mut watch = Watch::new(true);
        watch.observe(Some(false), limits(300, 1000));
        let started = tokio::time::Instant::now();
        assert!(!expired(&mut watch).await, "outside a transaction");
        assert_eq!(started.elapsed(), Duration::from_millis(1000));
    }

    #[tokio::test(start_paused = true)]
    async fn a_stretch_keeps_its_start_and_busy_ends_it() {
        let mut watch = Watch::new(true);
        watch.observe(Some(true), limits(300, 0));
        tokio::time::advance(Duration::from_millis(200)).await;
        // Still the same stretch: the limit counts from its start.
        watch.observe(Some(true), |_| unreachable!("the stretch already has its timer"));
        let started = tokio::time::Instant::now();
        assert!(expired(&mut watch).await);
        assert_eq!(started.elapsed(), Duration::from_millis(100));
        watch.observe(None, limits(300, 0));
        assert!(watch.timer.is_none());
        // A new stretch outside a transaction has no limit here.
        watch.observe(Some(false), limits(300, 0));
        assert!(watch.timer.is_none());
    }

    #[tokio::test]
    async fn a_stop_comes_first() {
        let mut watch = Watch::new(true);
        watch.observe(Some(true), limits(1, 1));
        tokio::time::sleep(Duration::from_millis(5)).await;
        let mut ready = std::pin::pin!(std::future::ready(()));
        let woke = std::future::poll_fn(|cx| watch.poll_stop_or_expired(ready.as_mut(), cx)).await;
        assert_eq!(woke, None);
    }
}
