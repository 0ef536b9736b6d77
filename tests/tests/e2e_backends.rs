//! End to end, every backend: the connectivity matrix with nodes spread over two underlay
//! subnets joined by a router, so DirectRouting takes both paths; per-peer route modes as the
//! agents programmed them.
use std::{net::Ipv4Addr, time::Duration};

use weft_common::RouteMode;
use weft_tests::{
    cluster::{Cluster, ClusterOptions, http_get},
    flow::{FlowLoss, SequencedFlow, tcp_transfer, udp_echo_sizes},
    process::wait_until,
};

fn cluster(backend: &str, direct_routing: bool, two_subnets: bool) -> Cluster {
    cluster_with(backend, direct_routing, two_subnets, false)
}

/// `cluster`; `default_xdp`: the agents' default hook (tc on these veth underlays, VXLAN
/// through `weft_vxlan`) instead of `--xdp=on`.
fn cluster_with(
    backend: &str,
    direct_routing: bool,
    two_subnets: bool,
    default_xdp: bool,
) -> Cluster {
    let mut cluster = Cluster::new(ClusterOptions {
        nodes: 3,
        backend: backend.into(),
        direct_routing,
        two_subnets,
        default_xdp,
        ..Default::default()
    });
    for node in 0..cluster.nodes.len() {
        cluster.add_pod(node);
    }
    cluster
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
    c.assert_full_matrix();
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
    c.assert_full_matrix();
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
    c.assert_full_matrix();
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

/// The MTU of the default route of every pod of the cluster (None: the route has none), after
/// checking that each pod's interface has the underlay's whole MTU.
fn pod_route_mtus(c: &Cluster) -> Vec<Option<u32>> {
    let mut out = Vec::new();
    for node in &c.nodes {
        for pod in &node.pods {
            let mtu = pod.ns.exec("cat", &["/sys/class/net/eth0/mtu"]);
            assert_eq!(mtu.trim(), "1500", "{}'s pod {}", node.name, pod.ip);
            let route = pod.ns.exec("ip", &["-4", "route", "show", "default"]);
            let words: Vec<&str> = route.split_whitespace().collect();
            out.push(
                words
                    .iter()
                    .position(|w| *w == "mtu")
                    .map(|i| words[i + 1].parse().expect(&route)),
            );
        }
    }
    out
}

/// Changing `Backend.Type` (and DirectRouting) in net-conf.json while a flow runs: every node
/// re-programs its routes, no pod is rebuilt, pod addresses stay, and the loss is counted. The
/// agents' default hook: VXLAN through `weft_vxlan`, IPIP decapsulated by tc, host-gw plain.
/// Pods keep the underlay's MTU on their interface; the MTU of their default route follows the
/// backend's overhead, and bulk TCP and UDP of every size cross after each switch.
#[test]
fn live_backend_switch_through_the_config() {
    let mut c = cluster_with("vxlan", false, false, true);
    let pods = c.nodes.iter().map(|n| n.pods.len()).sum::<usize>();
    assert_eq!(pod_route_mtus(&c), vec![Some(1450); pods], "at ADD");
    let endpoints_before: Vec<_> = (0..c.nodes.len())
        .map(|i| c.nodes[i].maps().endpoints().unwrap())
        .collect();
    let (a, b) = (&c.nodes[0].pods[0], &c.nodes[1].pods[0]);
    let flow = SequencedFlow::start(&a.ns, &b.ns, b.ip, 7400);
    let steps = [
        ("ipip", false, RouteMode::Ipip, Some(1480)),
        ("host-gw", false, RouteMode::Direct, None),
        ("vxlan", true, RouteMode::Direct, Some(1450)),
        ("vxlan", false, RouteMode::Vxlan, Some(1450)),
    ];
    for (backend, direct, want, route_mtu) in steps {
        std::thread::sleep(Duration::from_millis(300));
        c.options.backend = backend.into();
        c.options.direct_routing = direct;
        c.write_net_conf();
        for i in 0..c.nodes.len() {
            wait_until(
                &format!("{} to switch to {backend}", c.nodes[i].name),
                Duration::from_secs(20),
                || c.nodes[i].routes_all_in(want),
            );
        }
        wait_until(
            &format!("the pods' route MTU {route_mtu:?} under {backend}"),
            Duration::from_secs(10),
            || pod_route_mtus(&c) == vec![route_mtu; pods],
        );
        for node in &c.nodes {
            assert_eq!(node.subnet_env().route_mtu, route_mtu, "{}", node.name);
        }
    }
    std::thread::sleep(Duration::from_millis(300));
    let FlowLoss {
        sent,
        lost,
        missing,
    } = flow.stop();
    eprintln!(
        "live backend switch via net-conf.json: 4 switches, {sent} packets sent, {lost} lost"
    );
    assert!(sent > 1000);
    assert_eq!(lost, 0, "packets lost during live switches: {missing:?}");
    let endpoints_after: Vec<_> = (0..c.nodes.len())
        .map(|i| c.nodes[i].maps().endpoints().unwrap())
        .collect();
    assert_eq!(endpoints_before, endpoints_after, "pods untouched");
    c.assert_full_matrix();
    // Bulk both ways and UDP of every size, over vxlan after four switches.
    let (a, b) = (&c.nodes[0].pods[0], &c.nodes[1].pods[0]);
    tcp_transfer(&b.ns, b.ip, 7410, &a.ns, 4 << 20, Duration::from_secs(30));
    tcp_transfer(&a.ns, a.ip, 7411, &b.ns, 4 << 20, Duration::from_secs(30));
    let retries = udp_echo_sizes(&a.ns, &b.ns, b.ip, 7412, 1300..=1500);
    assert!(retries <= 2, "{retries} retries");
}

/// host-gw adds nothing: `Backend.MTU` may give pods the whole underlay MTU (1500 here), as
/// flannel's host-gw does. Full-size packets cross nodes unfragmented, and a live switch to a
/// tunnel that would not fit them is refused: the routes stay direct and the agents say why.
#[test]
fn host_gw_pods_take_the_full_underlay_mtu_and_tunnels_that_do_not_fit_are_refused() {
    let mut c = Cluster::new(ClusterOptions {
        nodes: 2,
        backend: "host-gw".into(),
        backend_extra: serde_json::json!({"MTU": 1500}),
        ..Default::default()
    });
    for node in 0..c.nodes.len() {
        c.add_pod(node);
    }
    let full_size_ping = |c: &Cluster| {
        let (a, b) = (&c.nodes[0].pods[0], &c.nodes[1].pods[0]);
        // 1472 bytes of ICMP payload: a 1500-byte IPv4 packet, DF set.
        a.ns.exec_ok(
            "ping",
            &[
                "-M",
                "do",
                "-s",
                "1472",
                "-c",
                "3",
                "-i",
                "0.2",
                "-W",
                "1",
                &b.ip.to_string(),
            ],
        )
    };
    for node in &c.nodes {
        let mtu = node.pods[0].ns.exec("cat", &["/sys/class/net/eth0/mtu"]);
        assert_eq!(mtu.trim(), "1500", "{}'s pod", node.name);
    }
    assert!(
        full_size_ping(&c),
        "1500-byte packets between pods on two nodes"
    );
    c.assert_full_matrix();

    c.options.backend = "vxlan".into();
    c.write_net_conf();
    wait_until(
        "every agent to refuse vxlan",
        Duration::from_secs(20),
        || {
            c.nodes.iter().all(|n| {
                n.log().contains("ignoring the changed") && n.log().contains("Backend.MTU")
            })
        },
    );
    for i in 0..c.nodes.len() {
        let m = modes(&c, i);
        assert!(
            !m.is_empty() && m.iter().all(|(_, mode)| *mode == RouteMode::Direct),
            "{}: {m:?}",
            c.nodes[i].name
        );
    }
    assert!(
        full_size_ping(&c),
        "still 1500-byte packets after the refused switch"
    );
}

/// host-gw cannot reach peers off the node's subnet; the agent says which (flannel breaks
/// silently there).
#[test]
fn host_gw_reports_off_link_peers() {
    let c = cluster("host-gw", false, true);
    // Nodes 0 and 2 share a subnet; node 1 is on the other.
    let expected = [1u64, 2, 1];
    for (i, want) in expected.iter().enumerate() {
        let node = &c.nodes[i];
        let addr = node.metrics_addr();
        wait_until(
            &format!("{} to report off-link peers", node.name),
            Duration::from_secs(20),
            || {
                let Some((200, body)) = http_get(&node.ns, addr, "/metrics") else {
                    return false;
                };
                body.lines()
                    .find(|l| l.starts_with("weft_offlink_peers "))
                    .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
                    == Some(*want)
            },
        );
    }
    // Same-subnet pods still reach each other.
    let (a, b) = (&c.nodes[0].pods[0], &c.nodes[2].pods[0]);
    a.ns.exec(
        "ping",
        &["-c", "2", "-i", "0.2", "-W", "2", &b.ip.to_string()],
    );
}

/// Path MTU discovery across a smaller underlay: node 1 sits on the second subnet, whose
/// links and router port have an MTU of 1400. A pod on node 0 (pod MTU 1450) sending a DF
/// packet that needs 1500 bytes once encapsulated is told the path's inner MTU (1400 - 50) by
/// ICMP fragmentation-needed instead of losing it silently; TCP and UDP (DF, PMTU discovery on)
/// of every size cross.
#[test]
fn path_mtu_discovery_across_a_smaller_underlay() {
    let mut c = Cluster::new(ClusterOptions {
        nodes: 2,
        backend: "vxlan".into(),
        direct_routing: false,
        two_subnets: true,
        second_subnet_mtu: Some(1400),
        ..Default::default()
    });
    let a = c.add_pod(0);
    let b = c.add_pod(1);
    let (a_ns, b_ns) = (&c.nodes[0].pods[0].ns, &c.nodes[1].pods[0].ns);
    // The first oversized packet is lost at the router (which tells node 0); the next ones
    // are answered by node 0 with the path's inner MTU.
    let out = std::process::Command::new("ip")
        .args([
            "netns", "exec", &a_ns.name, "ping", "-M", "do", "-s", "1422", "-c", "3",
        ])
        .args(["-i", "0.3", "-W", "1", &b.to_string()])
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("mtu = 1350") || text.contains("mtu=1350"),
        "ping -M do across the smaller underlay: {text}\n{}",
        c.datapath_state()
    );
    let stats = c.nodes[0].maps().stats().unwrap();
    let stat = |s: weft_common::Stat| stats.iter().find(|(k, _)| *k == s).unwrap().1;
    assert!(stat(weft_common::Stat::PathMtuLearned) >= 1, "{stats:?}");
    assert!(stat(weft_common::Stat::FragNeededSent) >= 1, "{stats:?}");
    // What fits the path passes with DF.
    a_ns.exec(
        "ping",
        &[
            "-M",
            "do",
            "-s",
            "1322",
            "-c",
            "2",
            "-i",
            "0.2",
            "-W",
            "2",
            &b.to_string(),
        ],
    );
    // UDP with path MTU discovery on (DF set; the pod fragments itself once told): every
    // size crosses, the first too-big one retried once.
    let retries = udp_echo_sizes(a_ns, b_ns, b, 7600, 1300..=1460);
    assert!(retries <= 2, "{retries} retries");
    // TCP both ways, bulk.
    tcp_transfer(b_ns, b, 7601, a_ns, 4 << 20, Duration::from_secs(30));
    tcp_transfer(a_ns, a, 7602, b_ns, 4 << 20, Duration::from_secs(30));
    let _ = &mut c;
}
