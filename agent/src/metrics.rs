//! The agent's health and metrics, and the tiny HTTP server that serves them: `/healthz` (the
//! reconcile loop is alive), `/readyz` (the datapath is programmed and the first complete set
//! of peers applied), `/metrics` (Prometheus text format).
//!
//! The server is hand-written on `std::net::TcpListener` (one thread, one short request at a
//! time): three GET endpoints do not justify an HTTP framework in the agent.
use std::{
    fmt::Write as _,
    io::{BufRead as _, BufReader, Write as _},
    net::{SocketAddr, TcpListener},
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering::Relaxed},
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context as _, Result};
use weft_common::{ENDPOINTS_MAX, NODES_MAX, ROUTES_MAX};

use crate::datapath::Maps;

#[derive(Default)]
pub struct Metrics {
    pub ready: AtomicBool,
    pub datastore_connected: AtomicBool,
    pub reconcile_runs: AtomicU64,
    pub reconcile_errors: AtomicU64,
    pub reconcile_writes: AtomicU64,
    /// Sum of reconcile durations in microseconds.
    pub reconcile_micros_sum: AtomicU64,
    pub last_reconcile_micros: AtomicU64,
    pub peers: AtomicU64,
    pub offlink_peers: AtomicU64,
    /// Unix time (s) of the reconcile loop's last turn.
    pub heartbeat: AtomicU64,
    /// [bgp] BIRD's sessions and routes (backend bgp only).
    pub bgp: std::sync::Mutex<Option<crate::bgp::BgpStatus>>,
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Metrics {
    pub fn beat(&self) {
        self.heartbeat.store(now_secs(), Relaxed);
    }

    pub fn record_reconcile(&self, duration: Duration, writes: usize, ok: bool) {
        self.reconcile_runs.fetch_add(1, Relaxed);
        if !ok {
            self.reconcile_errors.fetch_add(1, Relaxed);
        }
        self.reconcile_writes.fetch_add(writes as u64, Relaxed);
        let us = duration.as_micros() as u64;
        self.reconcile_micros_sum.fetch_add(us, Relaxed);
        self.last_reconcile_micros.store(us, Relaxed);
    }

    /// Alive: the reconcile loop turned within the last minute (it turns at least every resync).
    pub fn healthy(&self) -> bool {
        now_secs().saturating_sub(self.heartbeat.load(Relaxed)) < 60
    }

    /// Prometheus text exposition; datapath figures are read from the maps when given.
    pub fn render(&self, maps: Option<&Maps>) -> String {
        let mut out = String::new();
        let mut gauge = |name: &str, help: &str, kind: &str, value: String| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
            );
        };
        let b = |v: &AtomicBool| (v.load(Relaxed) as u8).to_string();
        gauge(
            "weft_ready",
            "1 once the datapath is programmed",
            "gauge",
            b(&self.ready),
        );
        gauge(
            "weft_datastore_connected",
            "1 while the datastore is reachable",
            "gauge",
            b(&self.datastore_connected),
        );
        gauge(
            "weft_peers",
            "Remote nodes known",
            "gauge",
            self.peers.load(Relaxed).to_string(),
        );
        gauge(
            "weft_offlink_peers",
            "Peers routed directly but not on this node's underlay subnet",
            "gauge",
            self.offlink_peers.load(Relaxed).to_string(),
        );
        gauge(
            "weft_reconcile_total",
            "Reconcile runs",
            "counter",
            self.reconcile_runs.load(Relaxed).to_string(),
        );
        gauge(
            "weft_reconcile_errors_total",
            "Reconcile runs that failed (retried with backoff)",
            "counter",
            self.reconcile_errors.load(Relaxed).to_string(),
        );
        gauge(
            "weft_reconcile_writes_total",
            "Map entries written or removed by reconciles",
            "counter",
            self.reconcile_writes.load(Relaxed).to_string(),
        );
        gauge(
            "weft_reconcile_seconds_sum",
            "Total time spent reconciling",
            "counter",
            format!(
                "{:.6}",
                self.reconcile_micros_sum.load(Relaxed) as f64 / 1e6
            ),
        );
        gauge(
            "weft_reconcile_last_seconds",
            "Duration of the last reconcile",
            "gauge",
            format!(
                "{:.6}",
                self.last_reconcile_micros.load(Relaxed) as f64 / 1e6
            ),
        );
        if let Some(maps) = maps {
            let routes = maps.routes().map(|r| r.len()).unwrap_or(0);
            let endpoints = maps.endpoints().map(|r| r.len()).unwrap_or(0);
            let nodes = maps.nodes().map(|r| r.len()).unwrap_or(0);
            gauge(
                "weft_routes",
                "Entries in the route map",
                "gauge",
                routes.to_string(),
            );
            gauge(
                "weft_endpoints",
                "Entries in the endpoint map",
                "gauge",
                endpoints.to_string(),
            );
            gauge(
                "weft_nodes",
                "Entries in the node map",
                "gauge",
                nodes.to_string(),
            );
            let _ = writeln!(
                out,
                "# HELP weft_map_fill_ratio Entries over capacity per map\n# TYPE weft_map_fill_ratio gauge"
            );
            for (map, n, max) in [
                ("routes", routes, ROUTES_MAX),
                ("endpoints", endpoints, ENDPOINTS_MAX),
                ("nodes", nodes, NODES_MAX),
            ] {
                let _ = writeln!(
                    out,
                    "weft_map_fill_ratio{{map=\"{map}\"}} {:.6}",
                    n as f64 / max as f64
                );
            }
            let _ = writeln!(
                out,
                "# HELP weft_drops_total Packets dropped by the datapath\n# TYPE weft_drops_total counter"
            );
            for (reason, n) in maps.drops().unwrap_or_default() {
                let _ = writeln!(out, "weft_drops_total{{reason=\"{}\"}} {n}", reason.name());
            }
            let _ = writeln!(
                out,
                "# HELP weft_packets_total Packets by datapath outcome\n# TYPE weft_packets_total counter"
            );
            for (stat, n) in maps.stats().unwrap_or_default() {
                let _ = writeln!(out, "weft_packets_total{{path=\"{}\"}} {n}", stat.name());
            }
        }
        // [bgp]
        if let Ok(status) = self.bgp.lock()
            && let Some(status) = status.as_ref()
        {
            status.render_metrics(&mut out);
        }
        out
    }
}

/// Serves `/healthz`, `/readyz` and `/metrics` on `addr` from a background thread. Map
/// figures are read from the pins under `pin_root` on each scrape.
pub fn serve(addr: SocketAddr, metrics: Arc<Metrics>, pin_root: PathBuf) -> Result<SocketAddr> {
    let listener =
        TcpListener::bind(addr).with_context(|| format!("--metrics-addr: binding {addr}"))?;
    let local = listener.local_addr()?;
    std::thread::Builder::new().name("metrics-http".into()).spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
            let mut line = String::new();
            if BufReader::new(&stream).read_line(&mut line).is_err() {
                continue;
            }
            let path = line.split_whitespace().nth(1).unwrap_or("/");
            let (status, body) = match path {
                "/healthz" if metrics.healthy() => ("200 OK", "ok\n".to_string()),
                "/healthz" => ("503 Service Unavailable", "reconcile loop stalled\n".into()),
                "/readyz" if metrics.ready.load(Relaxed) => ("200 OK", "ready\n".into()),
                "/readyz" => ("503 Service Unavailable", "not ready\n".into()),
                "/metrics" => {
                    let maps = Maps::open_pinned(&pin_root).ok();
                    ("200 OK", metrics.render(maps.as_ref()))
                }
                _ => ("404 Not Found", "not found\n".into()),
            };
            let _ = write!(
                stream,
                "HTTP/1.0 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    })?;
    Ok(local)
}
