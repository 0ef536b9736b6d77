//! End to end, every backend: the connectivity matrix with nodes spread over two underlay
//! subnets joined by a router, so DirectRouting takes both paths; per-peer route modes as the
//! agents programmed them.
use std::net::Ipv4Addr;

use weft_common::RouteMode;
use weft_tests::cluster::{Cluster, ClusterOptions};

fn cluster(backend: &str, direct_routing: bool, two_subnets: bool) -> Cluster {
    let mut cluster = Cluster::new(ClusterOptions {
        nodes: 3,
        backend: backend.into(),
        direct_routing,
        two_subnets,
    });
    for node in 0..cluster.nodes.len() {
        cluster.add_pod(node);
    }
    cluster
}

fn assert_full_matrix(cluster: &Cluster) {
    let probes = cluster.connectivity_matrix();
    let failed: Vec<String> = probes
        .iter()
        .filter(|p| !p.ok)
        .map(|p| format!("{} -> {}", p.from, p.to))
        .collect();
    assert!(
        failed.is_empty(),
        "unreachable: {failed:?}\n{}",
        cluster.agent_logs()
    );
}

/// The mode each node programmed for every peer, by the peer's underlay address.
fn modes(cluster: &Cluster, node: usize) -> Vec<(Ipv4Addr, RouteMode)> {
    let mut out: Vec<(Ipv4Addr, RouteMode)> = cluster.nodes[node]
        .maps()
        .routes()
        .unwrap()
        .iter()
        .map(|(_, r)| {
            (
                Ipv4Addr::from(r.node_ip),
                RouteMode::from_u8(r.mode).expect("valid mode"),
            )
        })
        .collect();
    out.sort_by_key(|(ip, _)| *ip);
    out
}

fn same_subnet(a: Ipv4Addr, b: Ipv4Addr) -> bool {
    a.octets()[..3] == b.octets()[..3]
}

#[test]
fn ipip_across_two_subnets() {
    let c = cluster("ipip", false, true);
    assert_full_matrix(&c);
    for i in 0..c.nodes.len() {
        assert!(
            modes(&c, i).iter().all(|(_, m)| *m == RouteMode::Ipip),
            "{:?}",
            modes(&c, i)
        );
    }
}

#[test]
fn host_gw_on_one_subnet() {
    let c = cluster("host-gw", false, false);
    assert_full_matrix(&c);
    for i in 0..c.nodes.len() {
        assert!(
            modes(&c, i).iter().all(|(_, m)| *m == RouteMode::Direct),
            "{:?}",
            modes(&c, i)
        );
    }
}

fn direct_routing(backend: &str, tunnel: RouteMode) {
    let c = cluster(backend, true, true);
    assert_full_matrix(&c);
    for i in 0..c.nodes.len() {
        for (peer, mode) in modes(&c, i) {
            let want = if same_subnet(c.nodes[i].ip, peer) {
                RouteMode::Direct
            } else {
                tunnel
            };
            assert_eq!(mode, want, "{} -> {peer}", c.nodes[i].name);
        }
    }
}

#[test]
fn direct_routing_over_vxlan_takes_both_paths() {
    direct_routing("vxlan", RouteMode::Vxlan);
}

#[test]
fn direct_routing_over_ipip_takes_both_paths() {
    direct_routing("ipip", RouteMode::Ipip);
}
