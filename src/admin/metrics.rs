//! The `/metrics` page: pgwarp's state and counters in the OpenMetrics text format, which
//! Prometheus (and anything that scrapes it) reads.
//!
//! A scrape takes a `Snapshot` of the live state (the counters themselves live where they are
//! counted: the pools, the cache, the server) and encodes it with `prometheus-client`. Encoding is
//! a pure function of the snapshot, so the page's exact text is unit-tested here.

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Registry;

use crate::cache::CacheSnapshot;
use crate::pool::PoolSnapshot;
use crate::server::ServerContext;

/// The content type of the page.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Everything the page shows, taken at one moment.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Snapshot {
    pub version: &'static str,
    pub uptime_seconds: f64,
    pub draining: bool,
    /// PAUSE is in effect for every database.
    pub paused: bool,
    /// Databases whose new logins DISABLE refuses.
    pub disabled: Vec<String>,
    pub clients: usize,
    /// Clients whose request the origin is answering now.
    pub awaiting_origin: usize,
    pub max_clients: usize,
    pub logins: u64,
    /// Refused client connections by SQLSTATE.
    pub refusals: Vec<(String, u64)>,
    pub pools: Vec<PoolSnapshot>,
    /// `None` when the cache is off.
    pub cache: Option<CacheSnapshot>,
}

impl Snapshot {
    pub fn take(ctx: &ServerContext) -> Snapshot {
        let mut pools: Vec<PoolSnapshot> = ctx
            .pools
            .all()
            .iter()
            .map(|p| PoolSnapshot { paused: ctx.pools.is_paused_database(p.database()), ..p.snapshot() })
            .collect();
        pools.sort_by(|a, b| (&a.database, &a.user).cmp(&(&b.database, &b.user)));
        Snapshot {
            version: env!("CARGO_PKG_VERSION"),
            uptime_seconds: ctx.started.elapsed().as_secs_f64(),
            draining: !ctx.accepting(),
            paused: ctx.pools.is_paused(),
            disabled: ctx.pools.disabled().into_iter().collect(),
            clients: ctx.connected_clients(),
            awaiting_origin: ctx.awaiting_origin.count(),
            max_clients: ctx.max_client_conn(),
            logins: ctx.clients.logins(),
            refusals: ctx.clients.refusals(),
            pools,
            cache: ctx.cache.as_ref().map(|c| c.snapshot()),
        }
    }
}

/// The page for `snapshot`.
pub fn encode(snapshot: Snapshot) -> String {
    let mut registry = Registry::with_prefix("pgwarp");
    registry.register_collector(Box::new(snapshot));
    let mut page = String::new();
    // Writing into a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut page, &registry);
    page
}

type Labels<'a> = Vec<(&'static str, &'a str)>;

/// Writes one metric family: its descriptor, then one sample per label set.
fn family<'a, M: EncodeMetric>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    samples: impl IntoIterator<Item = (Labels<'a>, M)>,
) -> Result<(), std::fmt::Error> {
    let mut samples = samples.into_iter().peekable();
    let Some((_, first)) = samples.peek() else {
        return Ok(());
    };
    let mut metric = encoder.encode_descriptor(name, help, None, first.metric_type())?;
    for (labels, value) in samples {
        value.encode(metric.encode_family(&labels)?)?;
    }
    Ok(())
}

fn one<M: EncodeMetric>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    value: M,
) -> Result<(), std::fmt::Error> {
    value.encode(encoder.encode_descriptor(name, help, None, value.metric_type())?)
}

fn pool_labels(p: &PoolSnapshot) -> Labels<'_> {
    vec![("database", p.database.as_str()), ("user", p.user.as_str())]
}

impl Collector for Snapshot {
    fn encode(&self, mut e: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        one(&mut e, "build", "The running pgwarp version", Info::new(vec![("version", self.version)]))?;
        one(&mut e, "uptime_seconds", "Seconds since pgwarp started", ConstGauge::new(self.uptime_seconds))?;
        one(&mut e, "draining", "1 while shutting down", ConstGauge::new(i64::from(self.draining)))?;
        one(&mut e, "paused", "1 while PAUSE holds back every database", ConstGauge::new(i64::from(self.paused)))?;
        let disabled = self.disabled.iter().map(|d| (vec![("database", d.as_str())], ConstGauge::new(1i64)));
        family(&mut e, "database_disabled", "1 for a database whose new logins DISABLE refuses", disabled)?;

        one(&mut e, "clients", "Client connections logged in or logging in", ConstGauge::new(self.clients as i64))?;
        let awaiting = ConstGauge::new(self.awaiting_origin as i64);
        one(&mut e, "clients_awaiting_origin", "Clients whose request the origin is answering now", awaiting)?;
        one(&mut e, "max_clients", "Client connections accepted at once", ConstGauge::new(self.max_clients as i64))?;
        one(&mut e, "client_logins", "Client logins", ConstCounter::new(self.logins))?;
        let refusals = self.refusals.iter().map(|(code, n)| (vec![("sqlstate", code.as_str())], ConstCounter::new(*n)));
        family(&mut e, "client_refusals", "Client connections refused, by the SQLSTATE they were sent", refusals)?;

        let pools = &self.pools;
        let gauge =
            |f: fn(&PoolSnapshot) -> usize| pools.iter().map(move |p| (pool_labels(p), ConstGauge::new(f(p) as i64)));
        let count = |f: fn(&PoolSnapshot) -> u64| pools.iter().map(move |p| (pool_labels(p), ConstCounter::new(f(p))));
        family(&mut e, "pool_size", "Most origin connections the pool may open", gauge(|p| p.size))?;
        family(&mut e, "pool_active_connections", "Origin connections serving a client", gauge(|p| p.active))?;
        family(&mut e, "pool_idle_connections", "Open origin connections waiting for a client", gauge(|p| p.idle))?;
        family(&mut e, "pool_waiting_clients", "Clients waiting for an origin connection", gauge(|p| p.waiting))?;
        family(&mut e, "pool_paused", "1 while PAUSE holds the pool back", gauge(|p| usize::from(p.paused)))?;
        family(
            &mut e,
            "pool_replaced_connections",
            "Open origin connections that RECONNECT or a new origin replaced, closing when their transaction ends",
            gauge(|p| p.replaced),
        )?;
        family(
            &mut e,
            "pool_checkouts",
            "Origin connections handed to a client (about one per transaction)",
            count(|p| p.checkouts),
        )?;
        family(
            &mut e,
            "pool_reserve_checkouts",
            "Checkouts on a reserve connection, after reserve_pool_timeout (counted in pool_checkouts too)",
            count(|p| p.reserve_checkouts),
        )?;
        let seconds =
            |f: fn(&PoolSnapshot) -> f64| pools.iter().map(move |p| (pool_labels(p), ConstCounter::new(f(p))));
        family(
            &mut e,
            "pool_transaction_seconds",
            "Time origin connections spent lent to clients (PgBouncer's total_xact_time)",
            seconds(|p| p.transaction_seconds),
        )?;
        family(
            &mut e,
            "pool_queries",
            "Requests the origin answered: a simple query, or an extended-protocol sequence up to its Sync",
            count(|p| p.queries),
        )?;
        family(
            &mut e,
            "pool_query_seconds",
            "Time from sending each request to the origin to its ReadyForQuery (PgBouncer's total_query_time)",
            seconds(|p| p.query_seconds),
        )?;
        family(&mut e, "pool_received_bytes", "Bytes received from the pool's clients", count(|p| p.received_bytes))?;
        family(
            &mut e,
            "pool_sent_bytes",
            "Bytes sent to the pool's clients, whoever answered",
            count(|p| p.sent_bytes),
        )?;
        family(&mut e, "pool_waits", "Checkouts that had to wait for a free connection", count(|p| p.waits))?;
        let waited = pools.iter().map(|p| (pool_labels(p), ConstCounter::new(p.wait_seconds)));
        family(&mut e, "pool_wait_seconds", "Time clients spent waiting for an origin connection", waited)?;
        family(
            &mut e,
            "pool_timeouts",
            "Clients that gave up waiting after pool_timeout (SQLSTATE 53300)",
            count(|p| p.timeouts),
        )?;
        family(&mut e, "origin_connects", "Origin connections opened", count(|p| p.connects))?;
        family(
            &mut e,
            "origin_connect_failures",
            "Failed attempts to open an origin connection",
            count(|p| p.connect_failures),
        )?;

        if let Some(c) = &self.cache {
            one(&mut e, "cache_entries", "Answers in the query cache", ConstGauge::new(c.entries as i64))?;
            one(&mut e, "cache_bytes", "Bytes the query cache holds", ConstGauge::new(c.bytes as i64))?;
            one(&mut e, "cache_max_bytes", "The query cache's capacity in bytes", ConstGauge::new(c.max_bytes as i64))?;
            one(&mut e, "cache_hits", "Batches answered from the cache", ConstCounter::new(c.hits))?;
            one(
                &mut e,
                "cache_stale_hits",
                "Batches answered with a stale entry while it was refreshed",
                ConstCounter::new(c.stale),
            )?;
            one(&mut e, "cache_misses", "Cacheable batches sent to the origin", ConstCounter::new(c.misses))?;
            one(&mut e, "cache_stores", "Answers stored in the cache", ConstCounter::new(c.stores))?;
            one(
                &mut e,
                "cache_invalidations",
                "Writes that invalidated cached answers",
                ConstCounter::new(c.invalidations),
            )?;
            let reasons = c.uncacheable.iter().map(|(reason, n)| (vec![("reason", *reason)], ConstCounter::new(*n)));
            family(&mut e, "cache_uncacheable", "Batches sent to the origin without the cache, by reason", reasons)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Snapshot {
        Snapshot {
            version: "1.2.3",
            uptime_seconds: 12.5,
            draining: false,
            paused: false,
            disabled: vec!["old".to_owned()],
            clients: 7,
            awaiting_origin: 2,
            max_clients: 100,
            logins: 40,
            refusals: vec![("28P01".to_owned(), 2), ("53300".to_owned(), 1)],
            pools: vec![PoolSnapshot {
                user: "app".to_owned(),
                database: "shop".to_owned(),
                size: 20,
                active: 3,
                idle: 5,
                waiting: 1,
                replaced: 2,
                paused: true,
                checkouts: 1000,
                reserve_checkouts: 6,
                transaction_seconds: 1.5,
                queries: 3000,
                query_seconds: 0.75,
                received_bytes: 40_000,
                sent_bytes: 90_000,
                waits: 4,
                wait_seconds: 0.25,
                timeouts: 1,
                connects: 8,
                connect_failures: 0,
            }],
            cache: None,
        }
    }

    #[test]
    fn the_page_shows_clients_pools_and_refusals_with_their_labels() {
        let page = encode(sample());
        for line in [
            "# TYPE pgwarp_build info",
            "pgwarp_build_info{version=\"1.2.3\"} 1",
            "pgwarp_uptime_seconds 12.5",
            "pgwarp_draining 0",
            "pgwarp_paused 0",
            "pgwarp_clients 7",
            "pgwarp_clients_awaiting_origin 2",
            "# TYPE pgwarp_client_logins counter",
            "pgwarp_client_logins_total 40",
            "pgwarp_client_refusals_total{sqlstate=\"28P01\"} 2",
            "pgwarp_client_refusals_total{sqlstate=\"53300\"} 1",
            "pgwarp_pool_size{database=\"shop\",user=\"app\"} 20",
            "pgwarp_pool_active_connections{database=\"shop\",user=\"app\"} 3",
            "pgwarp_pool_idle_connections{database=\"shop\",user=\"app\"} 5",
            "pgwarp_pool_waiting_clients{database=\"shop\",user=\"app\"} 1",
            "pgwarp_pool_replaced_connections{database=\"shop\",user=\"app\"} 2",
            "pgwarp_pool_paused{database=\"shop\",user=\"app\"} 1",
            "pgwarp_database_disabled{database=\"old\"} 1",
            "pgwarp_pool_checkouts_total{database=\"shop\",user=\"app\"} 1000",
            "pgwarp_pool_reserve_checkouts_total{database=\"shop\",user=\"app\"} 6",
            "pgwarp_pool_transaction_seconds_total{database=\"shop\",user=\"app\"} 1.5",
            "pgwarp_pool_queries_total{database=\"shop\",user=\"app\"} 3000",
            "pgwarp_pool_query_seconds_total{database=\"shop\",user=\"app\"} 0.75",
            "pgwarp_pool_received_bytes_total{database=\"shop\",user=\"app\"} 40000",
            "pgwarp_pool_sent_bytes_total{database=\"shop\",user=\"app\"} 90000",
            "pgwarp_pool_wait_seconds_total{database=\"shop\",user=\"app\"} 0.25",
            "pgwarp_pool_timeouts_total{database=\"shop\",user=\"app\"} 1",
            "pgwarp_origin_connects_total{database=\"shop\",user=\"app\"} 8",
        ] {
            assert!(page.lines().any(|l| l == line), "missing {line:?} in\n{page}");
        }
        assert!(page.ends_with("# EOF\n"), "{page}");
        assert!(!page.contains("cache"), "no cache metrics when the cache is off:\n{page}");
    }

    #[test]
    fn cache_counters_appear_when_the_cache_is_on() {
        let cache = CacheSnapshot {
            entries: 3,
            bytes: 4096,
            max_bytes: 1 << 20,
            hits: 10,
            misses: 4,
            stale: 1,
            stores: 3,
            invalidations: 2,
            uncacheable: vec![("write", 5), ("volatile_function", 0)],
        };
        let page = encode(Snapshot { cache: Some(cache), ..sample() });
        for line in [
            "pgwarp_cache_entries 3",
            "pgwarp_cache_bytes 4096",
            "pgwarp_cache_hits_total 10",
            "pgwarp_cache_stale_hits_total 1",
            "pgwarp_cache_misses_total 4",
            "pgwarp_cache_invalidations_total 2",
            "pgwarp_cache_uncacheable_total{reason=\"write\"} 5",
            "pgwarp_cache_uncacheable_total{reason=\"volatile_function\"} 0",
        ] {
            assert!(page.lines().any(|l| l == line), "missing {line:?} in\n{page}");
        }
    }

    #[test]
    fn label_values_are_escaped() {
        let mut s = sample();
        s.pools[0].database = "we\"ird\\db\nname".to_owned();
        let page = encode(s);
        assert!(page.contains("pgwarp_pool_size{database=\"we\\\"ird\\\\db\\nname\",user=\"app\"} 20"), "{page}");
    }
}
