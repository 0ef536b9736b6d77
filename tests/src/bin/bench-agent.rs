//! Agent benchmark (`cargo xtask bench` runs it; run it from a release build): prints ONE JSON
//! object on stdout.
//!
//! - `reconcile_empty_to_{1000,10000}_ms`: the agent's reconciler (snapshot of N remote nodes,
//!   resync against freshly created pinned maps) from an empty datapath to N routes and nodes.
//! - `agent_start_to_10000_routes_ms`: the real agent binary started against an etcd holding
//!   10,000 leases, from process start to 10,000 routes in its map (datapath load and
//!   verification, subnet lease, list over etcd, reconcile).
//! - `event_to_map_us_{p50,p99,max}`: with 10,000 nodes programmed, a lease written to etcd
//!   until its route is in the agent's map (etcd write, watch delivery, reconcile); and
//!   `etcd_put_us_*`, the etcd write alone (its commit, an fsync, is most of the latency).
//! - `agent_rss_mib_at_10000`: the agent's resident memory with 10,000 nodes.
use std::{
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use aya::maps::{LpmTrie, MapData, lpm_trie::Key};
use ipnet::Ipv4Net;
use serde_json::json;
use weft_agent::{
    config::BackendType,
    datapath::{Datapath, pin_dir},
    datastore::{Event, NodeLease, etcd::EtcdClient, subnet_key},
    node_net::vtep_mac_for,
    reconcile::{ModePolicy, Reconciler},
};
use weft_common::{RouteInfo, map_names};
use weft_tests::{cluster::Cluster, pins::PinDir, process::wait_until};

const PREFIX: &str = "/coreos.com/network";

fn peer(i: u32) -> NodeLease {
    // Subnets 10.<i/256+1>.<i%256>.0/24 of 10.0.0.0/8, node addresses 172.16.0.0/12.
    let subnet = Ipv4Net::new(Ipv4Addr::from(0x0a01_0000u32 + (i << 8)), 24).unwrap();
    let ip = Ipv4Addr::from(0xac10_0000u32 + i + 1);
    NodeLease {
        subnet,
        public_ip: ip,
        backend: Some(BackendType::Vxlan),
        vtep_mac: Some(vtep_mac_for(ip)),
        name: subnet_key(subnet),
        node_name: None,
        seniority: i64::from(i),
        unknown_backend: None,
    }
}

fn reconcile_from_empty(n: u32) -> f64 {
    let pins = PinDir::new("bench");
    let mut dp = Datapath::load_pinned(&pins.path).expect("loading the datapath");
    let mut rec = Reconciler::new(
        ModePolicy {
            backend: BackendType::Vxlan,
            direct_routing: false,
            underlay_subnet: "192.168.0.0/24".parse().unwrap(),
            bgp: None,
        },
        "10.0.1.0/24".parse().unwrap(),
        Ipv4Addr::new(192, 168, 0, 1),
    );
    // Records are checked as the agent checks them.
    rec.set_network("10.0.0.0/8".parse().unwrap(), 24);
    let leases: Vec<NodeLease> = (0..n).map(peer).collect();
    let start = Instant::now();
    rec.handle(Event::Snapshot(leases));
    let report = rec.resync(&mut dp.maps).expect("reconcile");
    let took = start.elapsed();
    assert_eq!(report.writes, 2 * n as usize);
    assert_eq!(dp.maps.routes().unwrap().len(), n as usize);
    took.as_secs_f64() * 1e3
}

fn put_leases(client: &EtcdClient, leases: &[NodeLease]) {
    for chunk in leases.chunks(100) {
        let kvs: Vec<(String, Vec<u8>)> = chunk
            .iter()
            .map(|l| {
                let key = format!("{PREFIX}/subnets/{}", subnet_key(l.subnet));
                (key, l.to_flannel_json(1).to_string().into_bytes())
            })
            .collect();
        client.put_all(&kvs).expect("writing leases");
    }
}

fn rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        .map(|kb| kb / 1024.0)
        .unwrap_or(0.0)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn main() {
    let r1k = reconcile_from_empty(1_000);
    let r10k = reconcile_from_empty(10_000);

    let conf = json!({"Network": "10.0.0.0/8", "SubnetLen": 24, "Backend": {"Type": "vxlan"}});
    let mut c = Cluster::agents(0, conf, 60);
    let endpoint = c.etcd.endpoint();
    let client = c.in_underlay(move || EtcdClient::new(&[endpoint]).unwrap());
    let leases: Vec<NodeLease> = (0..10_000).map(peer).collect();
    {
        let client = client.clone();
        c.in_underlay(move || put_leases(&client, &leases));
    }
    let start = Instant::now();
    let i = c.add_node();
    let node = &c.nodes[i];
    wait_until(
        &format!("10,000 routes\n{}", node.log()),
        Duration::from_secs(120),
        || node.route_count() >= 10_000,
    );
    let start_to_10k = start.elapsed().as_secs_f64() * 1e3;
    let pid = node.agent.as_ref().unwrap().pid();

    // Event -> map latency, polling the pinned LPM trie directly.
    let routes_pin = pin_dir(&node.pins.path)
        .join("maps")
        .join(map_names::ROUTES);
    let trie: LpmTrie<MapData, [u8; 4], RouteInfo> = LpmTrie::try_from(aya::maps::Map::LpmTrie(
        MapData::from_pin(&routes_pin).unwrap(),
    ))
    .unwrap();
    let sum_before = node.metric("weft_reconcile_seconds_sum").unwrap_or(0.0);
    let runs_before = node.metric("weft_reconcile_total").unwrap_or(0.0);
    let mut latencies = Vec::new();
    let mut put_latencies = Vec::new();
    for j in 0..200u32 {
        let l = peer(20_000 + j);
        let key = Key::new(24, l.subnet.network().octets());
        let client = client.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        let put = c.underlay.spawn(move || {
            rx.recv().unwrap();
            let t = Instant::now();
            put_leases(&client, &[l]);
            t.elapsed().as_secs_f64() * 1e6
        });
        let t = Instant::now();
        tx.send(()).unwrap();
        while trie.get(&key, 0).is_err() {
            if t.elapsed() > Duration::from_secs(10) {
                panic!("route for event {j} never appeared\n{}", node.log());
            }
            std::hint::spin_loop();
        }
        latencies.push(t.elapsed().as_secs_f64() * 1e6);
        put_latencies.push(put.join().unwrap());
    }
    latencies.sort_by(|a, b| a.partial_cmp(b).unwrap());
    put_latencies.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let agent_us_per_event = (node.metric("weft_reconcile_seconds_sum").unwrap_or(0.0)
        - sum_before)
        / (node.metric("weft_reconcile_total").unwrap_or(0.0) - runs_before).max(1.0)
        * 1e6;
    // Let the agent settle (resync, allocator) before reading its memory.
    std::thread::sleep(Duration::from_secs(1));
    let rss = rss_mib(pid);
    let out = json!({
        "reconcile_empty_to_1000_ms": (r1k * 100.0).round() / 100.0,
        "reconcile_empty_to_10000_ms": (r10k * 100.0).round() / 100.0,
        "agent_start_to_10000_routes_ms": start_to_10k.round(),
        "event_to_map_us_p50": percentile(&latencies, 0.5).round(),
        "event_to_map_us_p99": percentile(&latencies, 0.99).round(),
        "event_to_map_us_max": latencies.last().unwrap().round(),
        "event_samples": latencies.len(),
        // The agent's own share: its reconcile per event, from its metrics.
        "agent_reconcile_us_per_event": (agent_us_per_event * 10.0).round() / 10.0,
        // The etcd write alone (committed when it returns; the watch fires after commit).
        "etcd_put_us_p50": percentile(&put_latencies, 0.5).round(),
        "etcd_put_us_p99": percentile(&put_latencies, 0.99).round(),
        "agent_rss_mib_at_10000": (rss * 10.0).round() / 10.0,
        "goals": {"reconcile_10000_ms": 1000, "event_to_map_ms": 10, "rss_mib": 100},
    });
    c.nodes.clear();
    println!("{out}");
}
