//! What a running mount counts: requests to the remote and kernel (FUSE) calls by kind, with
//! latencies and errors; bytes fetched and sent; retries; the cache's hits and misses. Served
//! as Prometheus text (`--metrics-addr`), written as a JSON summary at unmount
//! (`--metrics-file`), and behind the slow-operation log lines.
//!
//! One set per process: the daemon serves one mount.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use parking_lot::Mutex;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use serde::Serialize;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Op {
    op: &'static str,
}

fn latency_histogram() -> Histogram {
    // 100 µs to ~100 s.
    Histogram::new(exponential_buckets(0.0001, 4.0, 11))
}

type Latencies = Family<Op, Histogram, fn() -> Histogram>;

/// Totals of one kind of operation, for the JSON summary.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct OpTotals {
    pub count: u64,
    pub errors: u64,
    pub seconds: f64,
    pub max_seconds: f64,
}

pub struct Metrics {
    requests: Family<Op, Counter>,
    request_errors: Family<Op, Counter>,
    request_latency: Latencies,
    fuse_calls: Family<Op, Counter>,
    fuse_errors: Family<Op, Counter>,
    fuse_latency: Latencies,
    fetched: Counter,
    sent: Counter,
    retries: Counter,
    revalidated: Counter,
    /// Longer than this is logged as slow (milliseconds; 0: never).
    slow_ms: AtomicU64,
    totals: Mutex<BTreeMap<(&'static str, &'static str), OpTotals>>,
    registry: Mutex<Option<Registry>>,
    /// Where `/metrics` is served, once it is.
    endpoint: Mutex<Option<std::net::SocketAddr>>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

/// The process's metrics.
pub fn get() -> &'static Metrics {
    static M: OnceLock<Metrics> = OnceLock::new();
    M.get_or_init(Metrics::new)
}

impl Metrics {
    fn new() -> Metrics {
        let m = Metrics {
            requests: Family::default(),
            request_errors: Family::default(),
            request_latency: Family::new_with_constructor(latency_histogram),
            fuse_calls: Family::default(),
            fuse_errors: Family::default(),
            fuse_latency: Family::new_with_constructor(latency_histogram),
            fetched: Counter::default(),
            sent: Counter::default(),
            retries: Counter::default(),
            revalidated: Counter::default(),
            slow_ms: AtomicU64::new(1000),
            totals: Mutex::new(BTreeMap::new()),
            registry: Mutex::new(None),
            endpoint: Mutex::new(None),
        };
        let mut r = Registry::with_prefix("artifactfs");
        r.register(
            "remote_requests",
            "Requests to the remote, by operation",
            m.requests.clone(),
        );
        r.register(
            "remote_request_errors",
            "Requests to the remote that failed, by operation",
            m.request_errors.clone(),
        );
        r.register(
            "remote_request_seconds",
            "Time of requests to the remote, by operation",
            m.request_latency.clone(),
        );
        r.register("fuse_calls", "Kernel (FUSE) calls, by operation", m.fuse_calls.clone());
        r.register(
            "fuse_errors",
            "Kernel calls answered with an error, by operation",
            m.fuse_errors.clone(),
        );
        r.register(
            "fuse_seconds",
            "Time of kernel calls, by operation",
            m.fuse_latency.clone(),
        );
        r.register("fetched_bytes", "Bytes received from the remote", m.fetched.clone());
        r.register("sent_bytes", "Bytes sent to the remote", m.sent.clone());
        r.register(
            "retries",
            "Requests tried again after a transient failure",
            m.retries.clone(),
        );
        r.register(
            "revalidated_folders",
            "Folder listings checked again in the background (metadata.revalidate_interval)",
            m.revalidated.clone(),
        );
        *m.registry.lock() = Some(r);
        m
    }

    /// Sets the slow-operation threshold (zero: never log).
    pub fn set_slow_threshold(&self, d: Duration) {
        self.slow_ms.store(d.as_millis() as u64, Ordering::Relaxed);
    }

    /// Adds the cache's counters (hits, misses, evictions) to what is served.
    pub fn add_cache(&self, cache: Arc<crate::cache::Cache>) {
        if let Some(r) = self.registry.lock().as_mut() {
            r.register_collector(Box::new(CacheCollector(cache)));
        }
    }

    fn record(&self, kind: &'static str, op: &'static str, elapsed: Duration, ok: bool, what: &str) {
        let label = Op { op };
        let secs = elapsed.as_secs_f64();
        let (calls, errors, latency) = if kind == "remote" {
            (&self.requests, &self.request_errors, &self.request_latency)
        } else {
            (&self.fuse_calls, &self.fuse_errors, &self.fuse_latency)
        };
        calls.get_or_create(&label).inc();
        if !ok {
            errors.get_or_create(&label).inc();
        }
        latency.get_or_create(&label).observe(secs);
        {
            let mut t = self.totals.lock();
            let e = t.entry((kind, op)).or_default();
            e.count += 1;
            e.errors += u64::from(!ok);
            e.seconds += secs;
            e.max_seconds = e.max_seconds.max(secs);
        }
        let slow = self.slow_ms.load(Ordering::Relaxed);
        if slow > 0 && elapsed.as_millis() as u64 >= slow {
            tracing::warn!(kind, op, what, ms = elapsed.as_millis() as u64, "slow operation");
        }
    }

    /// A request to the remote ended (`what`: the path, for the slow-operation log).
    pub fn remote(&self, op: &'static str, elapsed: Duration, ok: bool, what: &str) {
        self.record("remote", op, elapsed, ok, what);
    }

    /// A kernel call was answered (errors are counted by [`Metrics::fuse_failed`]).
    pub fn fuse(&self, op: &'static str, elapsed: Duration) {
        self.record("fuse", op, elapsed, true, "");
    }

    /// A kernel call is answered with an error.
    pub fn fuse_failed(&self, op: &'static str) {
        self.fuse_errors.get_or_create(&Op { op }).inc();
        self.totals.lock().entry(("fuse", op)).or_default().errors += 1;
    }

    pub fn fetched(&self, n: u64) {
        self.fetched.inc_by(n);
    }

    pub fn sent(&self, n: u64) {
        self.sent.inc_by(n);
    }

    pub fn retried(&self) {
        self.retries.inc();
    }

    /// A background revalidation round looked at `n` folders.
    pub fn revalidated(&self, n: u64) {
        self.revalidated.inc_by(n);
    }

    /// Where `/metrics` is served, if it is.
    pub fn endpoint(&self) -> Option<std::net::SocketAddr> {
        *self.endpoint.lock()
    }

    /// Prometheus text format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if let Some(r) = self.registry.lock().as_ref() {
            let _ = prometheus_client::encoding::text::encode(&mut out, r);
        }
        out
    }

    /// The JSON summary written at unmount.
    pub fn summary(&self) -> serde_json::Value {
        serde_json::json!({
            "fetched_bytes": self.fetched.get(),
            "sent_bytes": self.sent.get(),
            "retries": self.retries.get(),
            "revalidated_folders": self.revalidated.get(),
            "operations": self
                .totals
                .lock()
                .iter()
                .map(|((kind, op), t)| (format!("{kind}.{op}"), t.clone()))
                .collect::<BTreeMap<_, _>>(),
        })
    }
}

#[derive(Debug)]
struct CacheCollector(Arc<crate::cache::Cache>);

impl Collector for CacheCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let c = self.0.session_counters();
        for (name, help, v) in [
            ("cache_hit_bytes", "Bytes read that the cache had", c.hit_bytes),
            ("cache_miss_bytes", "Bytes read that the cache lacked", c.miss_bytes),
            ("cache_evicted_versions", "Whole versions evicted", c.evicted_versions),
            (
                "cache_punched_chunks",
                "Chunks of open versions evicted",
                c.punched_chunks,
            ),
        ] {
            let e = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            ConstCounter::new(v).encode(e)?;
        }
        let e = encoder.encode_descriptor("cache_bytes", "Bytes the cache holds", None, MetricType::Gauge)?;
        prometheus_client::metrics::gauge::ConstGauge::new(self.0.used() as i64).encode(e)?;
        Ok(())
    }
}

/// Serves `GET /metrics` on `addr` until the runtime stops.
pub async fn serve(addr: std::net::SocketAddr) -> std::io::Result<std::net::SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    *get().endpoint.lock() = Some(bound);
    if !bound.ip().is_loopback() {
        tracing::warn!(%bound, "the metrics endpoint is reachable from other machines");
    }
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(|| async {
            (
                [(
                    axum::http::header::CONTENT_TYPE,
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                )],
                get().render(),
            )
        }),
    );
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::warn!("metrics endpoint stopped: {e}");
        }
    });
    Ok(bound)
}
