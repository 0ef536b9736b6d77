//! The agent's health and metrics, and the HTTP server that serves them: `/healthz` (the
//! reconcile loop is alive), `/readyz` (the datapath is programmed and the first complete set of
//! peers applied), `/metrics` (OpenMetrics text from `prometheus-client`; map fill, drops and
//! packet counters are read from the pinned maps on each scrape).
//!
//! The server is hyper on the agent's tokio runtime, with limits per connection so that no
//! client can take the endpoints away from the kubelet: request heads larger than
//! [`MAX_HEAD_BYTES`] are refused (memory stays bounded whatever a client sends), a head must
//! arrive within [`HEAD_TIMEOUT`], a connection lives at most [`CONNECTION_TIMEOUT`], and at most
//! [`MAX_CONNECTIONS`] are served at once (more are closed at once, not queued).
use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context as _, Result};
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode, body::Bytes, service::service_fn};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric as _},
    metrics::{
        MetricType,
        counter::{ConstCounter, Counter},
        gauge::{ConstGauge, Gauge},
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};
use weft_common::{ENDPOINTS_MAX, NODES_MAX, ROUTES_MAX};

use crate::datapath::Maps;

/// The port of `/healthz`, `/readyz` and `/metrics` (the `--metrics-addr` default's).
pub const DEFAULT_PORT: u16 = 9402;
/// Largest request head (request line and headers) the server reads.
pub const MAX_HEAD_BYTES: usize = 16 * 1024;
/// Time a client has to send its request head.
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(2);
/// Longest a connection is kept, whatever it does.
pub const CONNECTION_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections served at once.
pub const MAX_CONNECTIONS: usize = 64;

pub struct Metrics {
    pub ready: Gauge,
    pub datastore_connected: Gauge,
    pub peers: Gauge,
    pub offlink_peers: Gauge,
    /// Capacity of the datapath's conntrack map.
    pub conntrack_capacity: Gauge,
    /// Live conntrack entries counted by the GC's last complete pass.
    pub conntrack_entries: Gauge,
    /// Expired conntrack entries the GC deleted.
    pub conntrack_gc_deleted: Counter,
    pub reconciles: Counter,
    pub reconcile_errors: Counter,
    pub reconcile_writes: Counter,
    pub reconcile_seconds: Histogram,
    pub reconcile_last_seconds: Gauge<f64, AtomicU64>,
    /// Unix time (s) of the reconcile loop's last turn (not exported: /healthz reads it).
    heartbeat: AtomicU64,
    registry: Registry,
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Metrics {
    /// The agent's metrics; datapath figures come from the maps pinned under `pin_root`.
    pub fn new(pin_root: Option<PathBuf>) -> Self {
        let mut m = Self {
            ready: Gauge::default(),
            datastore_connected: Gauge::default(),
            peers: Gauge::default(),
            offlink_peers: Gauge::default(),
            conntrack_capacity: Gauge::default(),
            conntrack_entries: Gauge::default(),
            conntrack_gc_deleted: Counter::default(),
            reconciles: Counter::default(),
            reconcile_errors: Counter::default(),
            reconcile_writes: Counter::default(),
            // 10 µs .. ~5 s.
            reconcile_seconds: Histogram::new(exponential_buckets(1e-5, 4.0, 10)),
            reconcile_last_seconds: Gauge::default(),
            heartbeat: AtomicU64::new(now_secs()),
            registry: Registry::default(),
        };
        let r = &mut m.registry;
        r.register(
            "weft_ready",
            "1 once the datapath is programmed",
            m.ready.clone(),
        );
        r.register(
            "weft_datastore_connected",
            "1 while the datastore is reachable",
            m.datastore_connected.clone(),
        );
        r.register("weft_peers", "Remote nodes known", m.peers.clone());
        r.register(
            "weft_offlink_peers",
            "Peers routed directly but not on this node's underlay subnet",
            m.offlink_peers.clone(),
        );
        r.register(
            "weft_conntrack_capacity",
            "Capacity of the datapath's conntrack map (flows)",
            m.conntrack_capacity.clone(),
        );
        r.register(
            "weft_conntrack_entries",
            "Live conntrack entries counted by the GC's last complete pass",
            m.conntrack_entries.clone(),
        );
        r.register(
            "weft_conntrack_gc_deleted",
            "Expired conntrack entries deleted by the GC",
            m.conntrack_gc_deleted.clone(),
        );
        r.register("weft_reconcile", "Reconcile runs", m.reconciles.clone());
        r.register(
            "weft_reconcile_errors",
            "Reconcile runs that failed (retried with backoff)",
            m.reconcile_errors.clone(),
        );
        r.register(
            "weft_reconcile_writes",
            "Map entries written or removed by reconciles",
            m.reconcile_writes.clone(),
        );
        r.register(
            "weft_reconcile_seconds",
            "Time spent per reconcile",
            m.reconcile_seconds.clone(),
        );
        r.register(
            "weft_reconcile_last_seconds",
            "Duration of the last reconcile",
            m.reconcile_last_seconds.clone(),
        );
        if let Some(pin_root) = pin_root {
            r.register_collector(Box::new(MapsCollector { pin_root }));
        }
        m
    }

    /// Registers more metrics (before the server starts serving them).
    pub fn registry_mut(&mut self) -> &mut Registry {
        &mut self.registry
    }

    pub fn beat(&self) {
        self.heartbeat.store(now_secs(), Relaxed);
    }

    pub fn record_reconcile(&self, duration: Duration, writes: usize, ok: bool) {
        self.reconciles.inc();
        if !ok {
            self.reconcile_errors.inc();
        }
        self.reconcile_writes.inc_by(writes as u64);
        self.reconcile_seconds.observe(duration.as_secs_f64());
        self.reconcile_last_seconds.set(duration.as_secs_f64());
    }

    pub fn is_ready(&self) -> bool {
        self.ready.get() == 1
    }

    /// Alive: the reconcile loop turned within the last minute (it turns at least every second).
    pub fn healthy(&self) -> bool {
        now_secs().saturating_sub(self.heartbeat.load(Relaxed)) < 60
    }

    /// The OpenMetrics text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// Map fill, drops and packets by path, read from the pinned maps on each scrape.
#[derive(Debug)]
struct MapsCollector {
    pin_root: PathBuf,
}

impl Collector for MapsCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        // No maps (agent starting): no datapath figures.
        let Ok(maps) = Maps::open_pinned(&self.pin_root) else {
            return Ok(());
        };
        let routes = maps.routes().map(|r| r.len()).unwrap_or(0);
        let endpoints = maps.endpoints().map(|r| r.len()).unwrap_or(0);
        let nodes = maps.nodes().map(|r| r.len()).unwrap_or(0);
        for (name, help, n) in [
            ("weft_routes", "Entries in the route map", routes),
            ("weft_endpoints", "Entries in the endpoint map", endpoints),
            ("weft_nodes", "Entries in the node map", nodes),
        ] {
            let g = ConstGauge::new(n as i64);
            g.encode(encoder.encode_descriptor(name, help, None, g.metric_type())?)?;
        }
        {
            let mut fill = encoder.encode_descriptor(
                "weft_map_fill_ratio",
                "Entries over capacity per map",
                None,
                MetricType::Gauge,
            )?;
            for (map, n, max) in [
                ("routes", routes, ROUTES_MAX),
                ("endpoints", endpoints, ENDPOINTS_MAX),
                ("nodes", nodes, NODES_MAX),
            ] {
                ConstGauge::new(n as f64 / max as f64)
                    .encode(fill.encode_family(&[("map", map)])?)?;
            }
        }
        {
            let mut drops = encoder.encode_descriptor(
                "weft_drops",
                "Packets dropped by the datapath",
                None,
                MetricType::Counter,
            )?;
            for (reason, n) in maps.drops().unwrap_or_default() {
                ConstCounter::new(n).encode(drops.encode_family(&[("reason", reason.name())])?)?;
            }
        }
        let mut packets = encoder.encode_descriptor(
            "weft_packets",
            "Packets by datapath outcome",
            None,
            MetricType::Counter,
        )?;
        for (stat, n) in maps.stats().unwrap_or_default() {
            ConstCounter::new(n).encode(packets.encode_family(&[("path", stat.name())])?)?;
        }
        Ok(())
    }
}

fn respond(status: StatusCode, content_type: &str, body: String) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("Content-Type", content_type)
        .body(Full::new(Bytes::from(body)))
        .expect("a valid response")
}

async fn handle(
    metrics: Arc<Metrics>,
    req: Request<hyper::body::Incoming>,
) -> Response<Full<Bytes>> {
    const TEXT: &str = "text/plain; charset=utf-8";
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return respond(StatusCode::METHOD_NOT_ALLOWED, TEXT, "GET only\n".into());
    }
    match req.uri().path() {
        "/healthz" if metrics.healthy() => respond(StatusCode::OK, TEXT, "ok\n".into()),
        "/healthz" => respond(
            StatusCode::SERVICE_UNAVAILABLE,
            TEXT,
            "reconcile loop stalled\n".into(),
        ),
        "/readyz" if metrics.is_ready() => respond(StatusCode::OK, TEXT, "ready\n".into()),
        "/readyz" => respond(StatusCode::SERVICE_UNAVAILABLE, TEXT, "not ready\n".into()),
        "/metrics" => {
            // Map reads are syscalls: off the I/O threads.
            let body = tokio::task::spawn_blocking(move || metrics.render())
                .await
                .unwrap_or_default();
            respond(
                StatusCode::OK,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                body,
            )
        }
        _ => respond(StatusCode::NOT_FOUND, TEXT, "not found\n".into()),
    }
}

/// Binds `addr` and serves `/healthz`, `/readyz` and `/metrics` on the current tokio runtime.
/// Returns the bound address.
pub async fn serve(addr: SocketAddr, metrics: Arc<Metrics>) -> Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("--metrics-addr: binding {addr}"))?;
    let local = listener.local_addr()?;
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                // Out of file descriptors and the like: pause instead of spinning.
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            };
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                continue; // dropped: closed at once
            };
            let metrics = metrics.clone();
            tokio::spawn(async move {
                let service = service_fn(move |req| {
                    let metrics = metrics.clone();
                    async move { Ok::<_, std::convert::Infallible>(handle(metrics, req).await) }
                });
                let connection = hyper::server::conn::http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(HEAD_TIMEOUT)
                    .max_buf_size(MAX_HEAD_BYTES)
                    .keep_alive(false)
                    .serve_connection(TokioIo::new(stream), service);
                let _ = tokio::time::timeout(CONNECTION_TIMEOUT, connection).await;
                drop(slot);
            });
        }
    });
    Ok(local)
}
