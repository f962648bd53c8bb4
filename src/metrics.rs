//! Prometheus metrics. Every name starts with `terrapeak_` and carries its unit; every label takes
//! values from a fixed set (route templates, configured upstream hosts, kinds, classes), never a
//! client's path, a version or a name, so the number of series stays fixed.

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};
use std::time::Duration;

/// The `kind` label values of `terrapeak_cache_results_total`.
pub const CACHE_KINDS: [&str; 7] = [
    "version_list",
    "download_json",
    "provider_zip",
    "sums",
    "signature",
    "module_archive",
    "mirror_json",
];

/// Every metric TerraPeak exports. One per server; cheap to share behind an `Arc`.
pub struct Metrics {
    registry: Registry,
    /// `route`, `method`, `status` (1xx..5xx).
    pub http_requests: IntCounterVec,
    /// `route`: time until the last byte went out (or the client left).
    pub http_duration: HistogramVec,
    /// `kind`, `result` (hit, miss, stale, pass).
    pub cache_results: IntCounterVec,
    /// `source`: cache (HIT, STALE), upstream (MISS, PASS), none (errors, probes, discovery).
    pub sent_bytes: IntCounterVec,
    /// `upstream` (a configured host), `kind` (api, artifact, git).
    pub upstream_requests: IntCounterVec,
    /// `upstream`, `kind`, `class`.
    pub upstream_errors: IntCounterVec,
    /// `upstream`, `kind`: until the whole answer (api) or its headers (artifact, git).
    pub upstream_duration: HistogramVec,
    /// `upstream`: 1 while the registry API's circuit is open.
    pub upstream_circuit_open: IntGaugeVec,
    /// Artifact hosts whose circuit is open right now.
    pub artifact_host_circuits_open: IntGauge,
    /// Artifact fills running (downloading, verifying or publishing).
    pub fills_in_progress: IntGauge,
    /// Client responses currently streaming from a fill.
    pub fill_readers: IntGauge,
    /// Bytes of upstream chunks that fills hold in memory for their readers.
    pub fill_memory_bytes: IntGauge,
    /// Client connections open on the plain-HTTP listener.
    pub http_connections_open: IntGauge,
    /// Of those, idle HTTP/1 connections parked without hyper's buffers.
    pub http_connections_parked: IntGauge,
    /// Requests that joined a fill or a metadata fetch already under way instead of asking
    /// upstream themselves.
    pub singleflight_joined: IntCounter,
    /// `backend`, `operation`.
    pub storage_operations: IntCounterVec,
    /// `backend`, `operation`.
    pub storage_errors: IntCounterVec,
    /// `backend`, `operation`.
    pub storage_duration: HistogramVec,
    /// `reason`: requests refused by access control.
    pub auth_failures: IntCounterVec,
    /// `reason`: 1 while a side of the store (reads or writes) fails for that reason.
    pub storage_degraded: IntGaugeVec,
    /// `kind` (provider, module): requests a sealed TerraPeak (cache.offline) could not answer
    /// because what they asked for was never imported.
    pub offline_misses: IntCounterVec,
    /// Bytes in the store, as the last inventory counted them.
    pub cache_stored_bytes: IntGauge,
    /// Objects in the store, as the last inventory counted them.
    pub cache_objects: IntGauge,
    /// `reason` (size, unused): units evicted.
    pub evictions: IntCounterVec,
    /// The latest problems clients met, for the status page (not exported).
    pub problems: crate::status::Problems,
    /// Samples of the cache counters, for the status page's recent figures (not exported).
    pub history: crate::status::History,
}

fn latency_buckets() -> Vec<f64> {
    vec![
        0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
        60.0, 300.0,
    ]
}

impl Metrics {
    pub fn new() -> Metrics {
        let registry = Registry::new_custom(Some("terrapeak".into()), None).expect("valid prefix");
        let counter = |name: &str, help: &str, labels: &[&str]| {
            let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
            registry.register(Box::new(c.clone())).expect("unique");
            c
        };
        let histogram = |name: &str, help: &str, labels: &[&str]| {
            let h = HistogramVec::new(
                HistogramOpts::new(name, help).buckets(latency_buckets()),
                labels,
            )
            .expect("valid metric");
            registry.register(Box::new(h.clone())).expect("unique");
            h
        };
        let gauge = |name: &str, help: &str| {
            let g = IntGauge::new(name, help).expect("valid metric");
            registry.register(Box::new(g.clone())).expect("unique");
            g
        };
        let gauge_vec = |name: &str, help: &str, labels: &[&str]| {
            let g = IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric");
            registry.register(Box::new(g.clone())).expect("unique");
            g
        };
        let metrics = Metrics {
            http_requests: counter(
                "http_requests_total",
                "HTTP requests by route template, method and status class.",
                &["route", "method", "status"],
            ),
            http_duration: histogram(
                "http_request_duration_seconds",
                "Time from request to the last byte of the response, by route template.",
                &["route"],
            ),
            cache_results: counter(
                "cache_results_total",
                "Cache answers by kind of object and result (hit, miss, stale, pass).",
                &["kind", "result"],
            ),
            sent_bytes: counter(
                "sent_bytes_total",
                "Response body bytes sent to clients, by where they came from (cache, upstream, none).",
                &["source"],
            ),
            upstream_requests: counter(
                "upstream_requests_total",
                "Requests to upstreams, by configured upstream and kind (api, artifact, git).",
                &["upstream", "kind"],
            ),
            upstream_errors: counter(
                "upstream_errors_total",
                "Failed upstream requests, by configured upstream, kind and error class.",
                &["upstream", "kind", "class"],
            ),
            upstream_duration: histogram(
                "upstream_request_duration_seconds",
                "Upstream latency: the whole answer for the API, the response headers for artifacts and git.",
                &["upstream", "kind"],
            ),
            upstream_circuit_open: gauge_vec(
                "upstream_circuit_open",
                "1 while the registry API circuit of an upstream is open (failing fast).",
                &["upstream"],
            ),
            artifact_host_circuits_open: gauge(
                "artifact_host_circuits_open",
                "Artifact hosts whose circuit is open (failing fast).",
            ),
            fills_in_progress: gauge(
                "fills_in_progress",
                "Artifact fills running: downloading, verifying or publishing.",
            ),
            fill_readers: gauge(
                "fill_readers",
                "Client responses streaming from an artifact fill in progress.",
            ),
            fill_memory_bytes: gauge(
                "fill_memory_bytes",
                "Bytes of upstream chunks artifact fills hold in memory for their readers.",
            ),
            http_connections_open: gauge(
                "http_connections_open",
                "Client connections open on the plain-HTTP listener.",
            ),
            http_connections_parked: gauge(
                "http_connections_parked",
                "Idle keep-alive connections parked (waiting for a request without per-connection buffers).",
            ),
            singleflight_joined: {
                let c = IntCounter::new(
                    "singleflight_joined_total",
                    "Requests that joined a download already under way instead of asking upstream.",
                )
                .expect("valid metric");
                registry.register(Box::new(c.clone())).expect("unique");
                c
            },
            storage_operations: counter(
                "storage_operations_total",
                "Storage operations by backend and operation.",
                &["backend", "operation"],
            ),
            storage_errors: counter(
                "storage_errors_total",
                "Failed storage operations by backend and operation.",
                &["backend", "operation"],
            ),
            storage_duration: histogram(
                "storage_operation_duration_seconds",
                "Storage operation latency by backend and operation.",
                &["backend", "operation"],
            ),
            auth_failures: counter(
                "auth_failures_total",
                "Requests refused by access control, by reason (missing_credentials, unknown_token, missing_scope, bad_signature, expired_signature).",
                &["reason"],
            ),
            storage_degraded: gauge_vec(
                "storage_degraded",
                "1 while reads or writes of the store fail for this reason (no_space, quota, read_only, permission, io, store); cached objects are still served.",
                &["reason"],
            ),
            offline_misses: counter(
                "offline_misses_total",
                "Requests a sealed TerraPeak (cache.offline) answered 404 because the object was never imported, by kind (provider, module).",
                &["kind"],
            ),
            cache_stored_bytes: gauge(
                "cache_stored_bytes",
                "Bytes in the store (every object), as the last inventory pass counted them.",
            ),
            cache_objects: gauge(
                "cache_objects",
                "Objects in the store, as the last inventory pass counted them.",
            ),
            evictions: counter(
                "evictions_total",
                "Units (a provider platform, a module version) evicted, by reason (size: over storage.max_size; unused: past cache.evict_unused_after).",
                &["reason"],
            ),
            problems: Default::default(),
            history: Default::default(),
            registry,
        };
        for reason in ["size", "unused"] {
            metrics.evictions.with_label_values(&[reason]);
        }
        for kind in ["provider", "module"] {
            metrics.offline_misses.with_label_values(&[kind]);
        }
        let build = IntGaugeVec::new(
            Opts::new("build_info", "TerraPeak's version; always 1."),
            &["version"],
        )
        .expect("valid metric");
        build.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        metrics.registry.register(Box::new(build)).expect("unique");
        metrics
            .registry
            .register(Box::new(
                prometheus::process_collector::ProcessCollector::for_self(),
            ))
            .expect("unique");
        metrics
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("text encoding never fails");
        String::from_utf8(out).expect("the text format is UTF-8")
    }

    /// The counters the status page's history keeps, as they stand.
    pub fn status_counters(&self) -> crate::status::Counters {
        let count = |result: &str| -> u64 {
            CACHE_KINDS
                .iter()
                .map(|k| self.cache_results.with_label_values(&[k, result]).get())
                .sum()
        };
        crate::status::Counters {
            requests: sum_counters(&self.http_requests),
            hits: count("hit") + count("stale"),
            misses: count("miss") + count("pass"),
            bytes_from_cache: self.sent_bytes.with_label_values(&["cache"]).get(),
            bytes_from_upstream: self.sent_bytes.with_label_values(&["upstream"]).get(),
        }
    }

    pub fn observe_storage(&self, backend: &str, operation: &str, took: Duration, ok: bool) {
        let labels = [backend, operation];
        self.storage_operations.with_label_values(&labels).inc();
        self.storage_duration
            .with_label_values(&labels)
            .observe(took.as_secs_f64());
        if !ok {
            self.storage_errors.with_label_values(&labels).inc();
        }
    }
}

/// The sum of every series of a counter family.
pub fn sum_counters(family: &IntCounterVec) -> u64 {
    use prometheus::core::Collector;
    family
        .collect()
        .iter()
        .flat_map(|f| f.get_metric())
        .map(|m| m.get_counter().get_value() as u64)
        .sum()
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

/// The content type of [`Metrics::render`].
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_name_is_prefixed_and_the_process_is_described() {
        let m = Metrics::new();
        m.http_requests
            .with_label_values(&["/healthz", "GET", "2xx"])
            .inc();
        let text = m.render();
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            assert!(line.starts_with("terrapeak_"), "{line}");
        }
        assert!(text.contains("terrapeak_build_info{version=\""));
        assert!(text.contains("terrapeak_process_resident_memory_bytes"));
        assert!(text.contains(
            "terrapeak_http_requests_total{method=\"GET\",route=\"/healthz\",status=\"2xx\"} 1"
        ));
    }

    #[test]
    fn the_grafana_dashboard_charts_only_metrics_that_exist() {
        let m = Metrics::new();
        // Families with labels appear once they have a series.
        m.http_requests
            .with_label_values(&["r", "GET", "2xx"])
            .inc();
        m.http_duration.with_label_values(&["r"]).observe(0.1);
        m.cache_results.with_label_values(&["k", "hit"]).inc();
        m.sent_bytes.with_label_values(&["cache"]).inc();
        m.upstream_requests.with_label_values(&["u", "api"]).inc();
        m.upstream_errors
            .with_label_values(&["u", "api", "timeout"])
            .inc();
        m.upstream_duration
            .with_label_values(&["u", "api"])
            .observe(0.1);
        m.upstream_circuit_open.with_label_values(&["u"]).set(0);
        m.observe_storage("file", "read", Duration::from_millis(1), false);
        let text = m.render();
        let dashboard = include_str!("../contrib/grafana/terrapeak-dashboard.json");
        let mut names: Vec<&str> = dashboard
            .match_indices("terrapeak_")
            .map(|(i, _)| {
                let rest = &dashboard[i..];
                let end = rest
                    .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                    .unwrap_or(rest.len());
                &rest[..end]
            })
            .filter(|n| n.len() > "terrapeak_".len())
            .collect();
        names.sort_unstable();
        names.dedup();
        assert!(names.len() >= 10, "{names:?}");
        for name in names {
            assert!(
                text.lines().any(|l| l.starts_with(name)),
                "the dashboard charts {name}, which TerraPeak does not export"
            );
        }
    }
}
