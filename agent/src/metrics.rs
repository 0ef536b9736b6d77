//! The agent's health and metrics, and the HTTP server that serves them: `/healthz` (the
//! reconcile loop is alive), `/readyz` (the datapath is programmed and the first complete set of
//! peers applied), `/metrics` (OpenMetrics text from `prometheus-client`; map fill, drops and
//! packet counters are read from the pinned maps on each scrape).
//!
//! The server is hyper on the agent's tokio runtime, with limits per connection so that no
//! client can take the endpoints away from the kubelet: request heads larger than
//! [`MAX_HEAD_BYTES`] are refused (memory stays bounded whatever a client sends), a head must
//! arrive within [`HEAD_TIMEOUT`], a connection lives at most [`CONNECTION_TIMEOUT`], and at most
//! [`MAX_CONNECTIONS`] are served at once (a new one ends the oldest connection of the client
//! address holding the most: clients holding connections cannot lock the kubelet's probes
//! out, nor can one client churning connections push other clients' requests out).
use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    sync::{
        Arc, Mutex,
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
        family::Family,
        gauge::{ConstGauge, Gauge},
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};
use weft_common::map_names;

use crate::{
    bgp::BgpStatus,
    datapath::{MapFull, Maps},
};

/// A metric's labels, e.g. `[("reason", "outside_network")]`.
type Labels = Vec<(&'static str, &'static str)>;

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
    /// Node records refused, by reason (`crate::admission`).
    pub rejected_records: Family<Labels, Gauge>,
    /// 1 for each map that refused entries for lack of room at the last reconcile.
    pub map_full: Family<Labels, Gauge>,
    /// The maps of `map_full`, for `/readyz`.
    full_maps: std::sync::Mutex<Vec<(MapFull, usize)>>,
    /// Local pods cut off because their subnet is another node's now.
    pub fenced_endpoints: Counter,
    /// Why this node holds no subnet, when it lost its own (for `/readyz`).
    subnet_lost: std::sync::Mutex<Option<String>>,
    /// BIRD's sessions and routes, as the control loop last saw them (`None`: the backend is
    /// not bgp). Exported by [`BgpCollector`] on each scrape.
    pub bgp: Arc<Mutex<Option<BgpStatus>>>,
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
            rejected_records: Family::default(),
            map_full: Family::default(),
            full_maps: Default::default(),
            fenced_endpoints: Counter::default(),
            subnet_lost: Default::default(),
            bgp: Arc::default(),
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
        r.register(
            "weft_rejected_node_records",
            "Node records refused (not routed), by reason",
            m.rejected_records.clone(),
        );
        r.register(
            "weft_map_full",
            "1 while a map refuses entries for lack of room (see /readyz)",
            m.map_full.clone(),
        );
        r.register(
            "weft_fenced_endpoints",
            "Local pods cut off because their subnet is another node's now (recreate them)",
            m.fenced_endpoints.clone(),
        );
        for reason in crate::admission::REASONS {
            let _ = m.rejected_records.get_or_create(&vec![("reason", reason)]);
        }
        for map in ["routes", "nodes"] {
            let _ = m.map_full.get_or_create(&vec![("map", map)]);
        }
        if let Some(pin_root) = pin_root {
            r.register_collector(Box::new(MapsCollector { pin_root }));
        }
        r.register_collector(Box::new(BgpCollector {
            status: m.bgp.clone(),
        }));
        m
    }

    /// Registers more metrics (before the server starts serving them).
    pub fn registry_mut(&mut self) -> &mut Registry {
        &mut self.registry
    }

    /// The refused records by reason, as the reconciler counts them.
    pub fn set_rejected_records(&self, counts: &[(&'static str, usize)]) {
        for (reason, n) in counts {
            self.rejected_records
                .get_or_create(&vec![("reason", *reason)])
                .set(*n as i64);
        }
    }

    /// The maps that refused entries for lack of room at the last reconcile (none: all fit).
    pub fn set_full_maps(&self, full: &[(MapFull, usize)]) {
        for (label, map) in [("routes", map_names::ROUTES), ("nodes", map_names::NODES)] {
            let is_full = full.iter().any(|(f, _)| f.map == map);
            self.map_full
                .get_or_create(&vec![("map", label)])
                .set(i64::from(is_full));
        }
        if let Ok(mut maps) = self.full_maps.lock() {
            *maps = full.to_vec();
        }
    }

    /// This node lost its subnet to another node and holds none (`why`), or holds one again
    /// (None).
    pub fn set_subnet_lost(&self, why: Option<String>) {
        if let Ok(mut lost) = self.subnet_lost.lock() {
            *lost = why;
        }
    }

    /// Why the node is not ready, if it is not: the datapath not yet programmed, no subnet, or
    /// maps that refuse entries (named, with what to do).
    pub fn not_ready(&self) -> Option<String> {
        if let Some(why) = self.subnet_lost.lock().ok().and_then(|l| l.clone()) {
            return Some(format!("not ready: {why}"));
        }
        let full = self.full_maps.lock().map(|m| m.clone()).unwrap_or_default();
        if !full.is_empty() {
            let maps: Vec<String> = full
                .iter()
                .map(|(f, refused)| {
                    let flag = match f.map {
                        map_names::ROUTES => "--routes-max",
                        map_names::NODES => "--nodes-max",
                        _ => "its size flag",
                    };
                    format!(
                        "map {} is full ({} entries): {refused} entries do not fit; raise {flag} \
                         (a pinned map keeps its size until its pin is removed)",
                        f.map, f.capacity
                    )
                })
                .collect();
            return Some(format!("not ready: {}", maps.join("; ")));
        }
        (!self.is_ready()).then(|| "not ready".to_string())
    }

    /// Publishes the BGP side's status (`None`: the backend is not bgp, no BGP metrics).
    pub fn set_bgp(&self, status: Option<BgpStatus>) {
        if let Ok(mut s) = self.bgp.lock() {
            *s = status;
        }
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
        // Capacities as the maps were created (a pinned map keeps its size).
        let sized = [
            ("routes", routes, map_names::ROUTES),
            ("endpoints", endpoints, map_names::ENDPOINTS),
            ("nodes", nodes, map_names::NODES),
        ]
        .map(|(label, n, name)| (label, n, maps.capacity(name).unwrap_or(0)));
        {
            let mut capacity = encoder.encode_descriptor(
                "weft_map_capacity",
                "Capacity (max_entries) per map",
                None,
                MetricType::Gauge,
            )?;
            for (map, _, max) in sized {
                ConstGauge::new(i64::from(max)).encode(capacity.encode_family(&[("map", map)])?)?;
            }
        }
        {
            let mut fill = encoder.encode_descriptor(
                "weft_map_fill_ratio",
                "Entries over capacity per map",
                None,
                MetricType::Gauge,
            )?;
            for (map, n, max) in sized {
                ConstGauge::new(n as f64 / f64::from(max.max(1)))
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
        {
            // One series per local pod and direction: the endpoint map bounds them.
            let flows = maps.flows().unwrap_or_default();
            for (name, help, pick) in [
                (
                    "weft_endpoint_packets",
                    "Packets sent (out) and received (in) by each local pod",
                    (|f: &weft_common::FlowSlot| (f.packets_in, f.packets_out))
                        as fn(&weft_common::FlowSlot) -> (u64, u64),
                ),
                (
                    "weft_endpoint_bytes",
                    "IPv4 bytes sent (out) and received (in) by each local pod",
                    |f| (f.bytes_in, f.bytes_out),
                ),
            ] {
                let mut family =
                    encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
                for (ip, f) in &flows {
                    let ip = ip.to_string();
                    let (n_in, n_out) = pick(f);
                    ConstCounter::new(n_in).encode(
                        family.encode_family(&[("endpoint", ip.as_str()), ("direction", "in")])?,
                    )?;
                    ConstCounter::new(n_out).encode(
                        family.encode_family(&[("endpoint", ip.as_str()), ("direction", "out")])?,
                    )?;
                }
            }
        }
        if let Ok(config) = maps.config() {
            let hook = weft_common::DecapHook::of_flags(config.flags);
            let mut g = encoder.encode_descriptor(
                "weft_decap_hook",
                "Where tunnel packets are decapsulated (hook: xdp or tc) and why (--xdp)",
                None,
                MetricType::Gauge,
            )?;
            ConstGauge::new(1)
                .encode(g.encode_family(&[("hook", hook.hook()), ("reason", hook.reason())])?)?;
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

/// The bgp backend's figures (from BIRD, through the control loop): the speaker's state, the
/// sessions, learned and refused routes. Nothing while the backend is not bgp.
#[derive(Debug)]
struct BgpCollector {
    status: Arc<Mutex<Option<BgpStatus>>>,
}

impl Collector for BgpCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Some(status) = self.status.lock().ok().and_then(|s| s.clone()) else {
            return Ok(());
        };
        let established = status.sessions.iter().filter(|s| s.established()).count();
        for (name, help, n) in [
            (
                "weft_bgp_speaker_up",
                "1 while the agent's BIRD runs",
                i64::from(status.running),
            ),
            (
                "weft_bgp_sessions_established",
                "BGP sessions in state Established",
                established as i64,
            ),
            (
                "weft_bgp_sessions_configured",
                "BGP sessions configured (mesh peers and configured peers)",
                status.sessions.len() as i64,
            ),
            (
                "weft_bgp_learned_routes",
                "Routes learned over BGP and installed in weft's routing table",
                status.learned_routes as i64,
            ),
            (
                "weft_bgp_refused_routes",
                "Routes refused by the import filters (not a pod subnet of their sender's node)",
                status.refused_routes as i64,
            ),
        ] {
            let g = ConstGauge::new(n);
            g.encode(encoder.encode_descriptor(name, help, None, g.metric_type())?)?;
        }
        for (name, help, n) in [
            (
                "weft_bgp_speaker_restarts",
                "Times BIRD exited unasked and was restarted",
                status.crashes,
            ),
            (
                "weft_bgp_reloads",
                "BIRD reconfigurations (birdc configure)",
                status.reloads,
            ),
            (
                "weft_bgp_reload_errors",
                "Configurations BIRD refused",
                status.reload_errors,
            ),
        ] {
            let c = ConstCounter::new(n);
            c.encode(encoder.encode_descriptor(name, help, None, c.metric_type())?)?;
        }
        let mut sessions = encoder.encode_descriptor(
            "weft_bgp_session_established",
            "1 while the session to this peer is Established",
            None,
            MetricType::Gauge,
        )?;
        for s in &status.sessions {
            let peer = s.peer.to_string();
            ConstGauge::new(i64::from(s.established())).encode(
                sessions.encode_family(&[("peer", peer.as_str()), ("kind", s.kind.name())])?,
            )?;
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
        "/readyz" => match metrics.not_ready() {
            None => respond(StatusCode::OK, TEXT, "ready\n".into()),
            Some(why) => respond(StatusCode::SERVICE_UNAVAILABLE, TEXT, format!("{why}\n")),
        },
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

/// The connections being served, oldest first, each with its client's address and the means
/// to end it.
#[derive(Default)]
struct Connections {
    next_id: u64,
    open: std::collections::VecDeque<(u64, IpAddr, tokio::sync::oneshot::Sender<()>)>,
}

impl Connections {
    /// Makes room for a connection from `client`: at [`MAX_CONNECTIONS`], ends the oldest
    /// connection of the address that holds the most (ties: the address whose oldest is
    /// oldest). A client opening connections in a loop thus only ends its own, never a probe
    /// from another address that has not been read yet.
    fn make_room(&mut self) {
        if self.open.len() < MAX_CONNECTIONS {
            return;
        }
        let mut held: HashMap<IpAddr, usize> = HashMap::new();
        for (_, ip, _) in &self.open {
            *held.entry(*ip).or_default() += 1;
        }
        let most = held.values().copied().max().unwrap_or(0);
        // `open` is oldest first, so the first of the busiest address is its oldest.
        if let Some(i) = self.open.iter().position(|(_, ip, _)| held[ip] == most)
            && let Some((_, _, end)) = self.open.remove(i)
        {
            let _ = end.send(());
        }
    }
}

/// Binds `addr` and serves `/healthz`, `/readyz` and `/metrics` on the current tokio runtime.
/// Returns the bound address.
///
/// At most [`MAX_CONNECTIONS`] are served at once; a new one beyond that ends the oldest
/// connection of the address holding the most (not itself): clients that hold connections
/// open (slowly sending, or idle) are the ones to go, so a kubelet probe is answered whatever
/// they do.
pub async fn serve(addr: SocketAddr, metrics: Arc<Metrics>) -> Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("--metrics-addr: binding {addr}"))?;
    let local = listener.local_addr()?;
    let connections = Arc::new(std::sync::Mutex::new(Connections::default()));
    tokio::spawn(async move {
        loop {
            let Ok((stream, client)) = listener.accept().await else {
                // Out of file descriptors and the like: pause instead of spinning.
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            };
            let (end_tx, end_rx) = tokio::sync::oneshot::channel::<()>();
            let id = {
                let mut c = connections.lock().expect("connections lock");
                c.make_room();
                c.next_id += 1;
                let id = c.next_id;
                c.open.push_back((id, client.ip(), end_tx));
                id
            };
            let (metrics, connections) = (metrics.clone(), connections.clone());
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
                tokio::select! {
                    _ = tokio::time::timeout(CONNECTION_TIMEOUT, connection) => {}
                    _ = end_rx => {}
                }
                if let Ok(mut c) = connections.lock() {
                    c.open.retain(|(i, _, _)| *i != id);
                }
            });
            // A backlog of connections is accepted one at a time with the served ones' tasks
            // run in between, so a request that has arrived is answered before a burst of
            // newer connections can make room by ending its connection.
            tokio::task::yield_now().await;
        }
    });
    Ok(local)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn connections(clients: &[[u8; 4]]) -> (Connections, Vec<tokio::sync::oneshot::Receiver<()>>) {
        let mut c = Connections::default();
        let mut ends = Vec::new();
        for ip in clients {
            let (tx, rx) = tokio::sync::oneshot::channel();
            c.next_id += 1;
            c.open.push_back((c.next_id, IpAddr::from(*ip), tx));
            ends.push(rx);
        }
        (c, ends)
    }

    fn ended(ends: &mut [tokio::sync::oneshot::Receiver<()>]) -> Vec<usize> {
        ends.iter_mut()
            .enumerate()
            .filter_map(|(i, rx)| rx.try_recv().is_ok().then_some(i))
            .collect()
    }

    #[test]
    fn room_is_made_from_the_busiest_client_not_the_oldest_connection() {
        // The probe (10.0.0.1) is the oldest; a churning client holds the rest.
        let mut clients = vec![[10, 0, 0, 1]];
        clients.extend(std::iter::repeat_n([10, 0, 0, 2], MAX_CONNECTIONS - 1));
        let (mut c, mut ends) = connections(&clients);
        c.make_room();
        assert_eq!(
            ended(&mut ends),
            vec![1],
            "the churning client's oldest goes"
        );
        assert_eq!(c.open.len(), MAX_CONNECTIONS - 1);
        assert_eq!(c.open.front().map(|e| e.0), Some(1), "the probe stays");
    }

    #[test]
    fn room_is_made_only_at_the_limit_and_ties_end_the_oldest() {
        let (mut c, mut ends) = connections(&[[10, 0, 0, 1], [10, 0, 0, 2]]);
        c.make_room();
        assert!(ended(&mut ends).is_empty());
        let half = MAX_CONNECTIONS / 2;
        let mut clients = Vec::new();
        for _ in 0..half {
            clients.push([10, 0, 0, 3]);
            clients.push([10, 0, 0, 4]);
        }
        let (mut c, mut ends) = connections(&clients);
        c.make_room();
        assert_eq!(ended(&mut ends), vec![0]);
    }
}
