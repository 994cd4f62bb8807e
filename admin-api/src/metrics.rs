//! Prometheus metrics: HTTP request counters (kept here), store counters (read from the
//! service at scrape time through a [`Collector`]) and the runtime's worker count.

use std::{fmt, sync::Arc, time::Instant};

use axum::{
    extract::{MatchedPath, Request, State},
    http::Method,
    middleware::Next,
    response::Response,
};
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric},
    metrics::{
        counter::{ConstCounter, Counter},
        family::Family,
        gauge::ConstGauge,
    },
    registry::Registry,
};

use crate::{AdminService, AppState};

/// Label value for requests no route matched (kept constant so that scanners probing random
/// paths cannot blow up the number of series).
pub(crate) const UNMATCHED_ROUTE: &str = "<unmatched>";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HttpLabels {
    method: &'static str,
    /// The route pattern (e.g. `/v2/images/{id}`), never the raw path.
    route: String,
    status: u16,
}

pub(crate) struct Metrics {
    registry: Registry,
    http_requests: Family<HttpLabels, Counter>,
}

impl Metrics {
    pub(crate) fn new(service: Arc<dyn AdminService>) -> Self {
        let mut registry = Registry::default();
        let http_requests = Family::<HttpLabels, Counter>::default();
        registry.register(
            "cairn_http_requests",
            "HTTP requests answered, by method, route pattern and status",
            http_requests.clone(),
        );
        registry.register_collector(Box::new(StoreCollector { service }));
        registry.register_collector(Box::new(RuntimeCollector));
        Self {
            registry,
            http_requests,
        }
    }

    /// The exposition in OpenMetrics text format (ends with `# EOF`).
    pub(crate) fn encode(&self) -> Result<String, fmt::Error> {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)?;
        Ok(out)
    }
}

/// Bounded set of method labels; anything exotic is `OTHER`.
fn method_label(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::HEAD => "HEAD",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::PATCH => "PATCH",
        Method::DELETE => "DELETE",
        Method::OPTIONS => "OPTIONS",
        _ => "OTHER",
    }
}

/// Middleware counting every answered request.
pub(crate) async fn track_requests(
    State(state): State<AppState>,
    req: Request,
    next: Next,
) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| UNMATCHED_ROUTE.to_owned(), |p| p.as_str().to_owned());
    let method = method_label(req.method());
    let started = Instant::now();
    let response = next.run(req).await;
    let status = response.status().as_u16();
    tracing::debug!(
        method,
        route = %route,
        status,
        elapsed_us = started.elapsed().as_micros() as u64,
        "http request"
    );
    state
        .metrics
        .http_requests
        .get_or_create(&HttpLabels {
            method,
            route,
            status,
        })
        .inc();
    response
}

/// Reads the store counters from the service on each scrape.
struct StoreCollector {
    service: Arc<dyn AdminService>,
}

impl fmt::Debug for StoreCollector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StoreCollector").finish_non_exhaustive()
    }
}

/// The async runtime the daemon runs on (read at scrape time, which runs on it).
#[derive(Debug)]
struct RuntimeCollector;

impl Collector for RuntimeCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> fmt::Result {
        if let Ok(h) = tokio::runtime::Handle::try_current() {
            gauge(
                &mut enc,
                "cairn_runtime_workers",
                "Worker threads of the async runtime (--workers)",
                h.metrics().num_workers() as u64,
            )?;
        }
        Ok(())
    }
}

fn gauge(enc: &mut DescriptorEncoder, name: &str, help: &str, v: u64) -> fmt::Result {
    let g = ConstGauge::new(i64::try_from(v).unwrap_or(i64::MAX));
    g.encode(enc.encode_descriptor(name, help, None, g.metric_type())?)
}

/// `name` without the `_total` suffix: the encoder appends it to counter samples.
fn counter(enc: &mut DescriptorEncoder, name: &str, help: &str, v: u64) -> fmt::Result {
    let c = ConstCounter::new(v);
    c.encode(enc.encode_descriptor(name, help, None, c.metric_type())?)
}

impl Collector for StoreCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> fmt::Result {
        let s = self.service.store_metrics();
        let e = &mut enc;
        gauge(e, "cairn_store_objects", "Objects in the store", s.objects)?;
        gauge(
            e,
            "cairn_store_logical_bytes",
            "Sum of object virtual sizes in bytes",
            s.logical_bytes,
        )?;
        gauge(
            e,
            "cairn_store_allocated_bytes",
            "Sum over objects of mapped bytes (shared blocks count once per object)",
            s.allocated_bytes,
        )?;
        gauge(
            e,
            "cairn_store_physical_bytes",
            "Bytes the segment files hold (shared blocks once)",
            s.physical_bytes,
        )?;
        gauge(
            e,
            "cairn_store_free_bytes",
            "Free bytes on the filesystem holding the store",
            s.free_bytes,
        )?;
        gauge(e, "cairn_store_segments", "Segment files", s.segments)?;
        counter(
            e,
            "cairn_store_checksum_errors",
            "Blocks whose CRC32 did not match on read",
            s.checksum_errors,
        )?;
        counter(
            e,
            "cairn_store_healed_blocks",
            "Blocks of torn writes given back their previous checksum at open (the write never landed)",
            s.healed_blocks,
        )?;
        counter(
            e,
            "cairn_store_read_retries",
            "Reads retried with writes held off after a first checksum mismatch",
            s.read_retries,
        )?;
        counter(e, "cairn_store_reads", "Read operations", s.reads)?;
        counter(e, "cairn_store_writes", "Write operations", s.writes)?;
        counter(e, "cairn_store_read_bytes", "Bytes read", s.read_bytes)?;
        counter(
            e,
            "cairn_store_written_bytes",
            "Bytes written",
            s.written_bytes,
        )?;
        counter(e, "cairn_store_flushes", "Durable flushes", s.flushes)?;
        let c = self.service.conversion_metrics();
        gauge(
            e,
            "cairn_image_conversions_running",
            "Image conversions (raw caches, volumes from images) running",
            c.running,
        )?;
        gauge(
            e,
            "cairn_image_conversions_waiting",
            "Image conversions waiting for a slot (--image-convert-jobs)",
            c.waiting,
        )?;
        counter(
            e,
            "cairn_image_conversions_completed",
            "Image conversions that completed",
            c.completed,
        )?;
        counter(
            e,
            "cairn_image_conversions_in_process",
            "Completed image conversions done in-process (qcow2) rather than by qemu-img",
            c.in_process,
        )?;
        counter(
            e,
            "cairn_image_conversions_failed",
            "Image conversions that failed",
            c.failed,
        )?;
        gauge(
            e,
            "cairn_image_conversion_bytes",
            "Virtual bytes of the running conversions",
            c.bytes_total,
        )?;
        gauge(
            e,
            "cairn_image_conversion_done_bytes",
            "Of those, the bytes converted so far",
            c.bytes_done,
        )?;
        Ok(())
    }
}
