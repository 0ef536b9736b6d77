//! End to end, the bgp backend: real agents running real BIRDs, nodes on two underlay subnets
//! behind a router running BIRD as a route reflector, or a full mesh on one subnet; traffic
//! unencapsulated (counters and a capture on the router), hijacks refused, convergence measured,
//! restarts of the agent, of BIRD and of the router, live switches to and from bgp.
use std::{
    collections::BTreeSet,
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use ipnet::Ipv4Net;
use serde_json::json;
use weft_common::{BGP_TABLE_DEFAULT, DropReason, RouteMode, Stat};
use weft_tests::{
    capture::Capture,
    cluster::{CLUSTER_NETWORK, Cluster, ClusterOptions, Node, binary},
    flow::{FlowLoss, SequencedFlow},
    process::wait_until,
};

fn network() -> Ipv4Net {
    CLUSTER_NETWORK.parse().unwrap()
}

fn cluster(nodes: usize, two_subnets: bool, extra: serde_json::Value, rr: bool) -> Cluster {
    let mut c = Cluster::new(ClusterOptions {
        nodes,
        backend: "bgp".into(),
        two_subnets,
        backend_extra: extra,
        route_reflector: rr,
        ..Default::default()
    });
    for node in 0..c.nodes.len() {
        c.add_pod(node);
    }
    c
}

/// The route reflector topology: nodes peer only with the router's address on their subnet.
fn rr_extra() -> serde_json::Value {
    json!({"Mesh": false, "Peers": Cluster::route_reflector_peers()})
}

fn subnet(node: &Node) -> Ipv4Net {
    weft_agent::subnet_env::SubnetEnv::read(&node.subnet_file())
        .expect("subnet file")
        .subnet
}

/// Prefixes in the node's BGP table (what BIRD installed for the datapath).
fn learned(node: &Node) -> BTreeSet<Ipv4Net> {
    let path = node.ns.path();
    node.ns.run(move || {
        let _ = path;
        weft_agent::bgp::table::read(BGP_TABLE_DEFAULT)
            .expect("reading the BGP table")
            .into_keys()
            .collect()
    })
}

/// Waits until every node's BGP table holds every other node's subnet (and nothing else).
fn wait_learned(c: &Cluster, timeout: Duration) {
    let subnets: Vec<Ipv4Net> = c.nodes.iter().map(subnet).collect();
    for (i, node) in c.nodes.iter().enumerate() {
        let want: BTreeSet<Ipv4Net> = subnets
            .iter()
            .enumerate()
            .filter(|(j, _)| *j != i)
            .map(|(_, s)| *s)
            .collect();
        let started = Instant::now();
        while learned(node) != want {
            if started.elapsed() > timeout {
                panic!(
                    "{}: BGP table {:?}, want {want:?}\n{}\n{}",
                    node.name,
                    learned(node),
                    c.datapath_state(),
                    c.agent_logs()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

fn metric(node: &Node, name: &str) -> Option<f64> {
    let addr = std::net::SocketAddr::from((node.ip, 9402));
    let (_, body) = weft_tests::cluster::http_get(&node.ns, addr, "/metrics")?;
    body.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{']))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

fn wait_metric(node: &Node, name: &str, want: f64) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let got = metric(node, name);
        if got == Some(want) {
            return;
        }
        if Instant::now() > deadline {
            panic!(
                "{}: {name} is {got:?}, want {want}\n{}\n{}",
                node.name,
                weft_status(node, false),
                node.agent.as_ref().map(|a| a.log()).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn stat(node: &Node, s: Stat) -> u64 {
    node.maps().stat_count(s).unwrap()
}

fn drops(node: &Node, r: DropReason) -> u64 {
    node.maps().drop_count(r).unwrap()
}

/// `weft status` on a node (the CLI reads the pins and asks the node's BIRD).
fn weft_status(node: &Node, json: bool) -> String {
    let mut args = vec![
        format!("--net={}", node.ns.path()),
        binary("weft").display().to_string(),
        "--pin-root".into(),
        node.pins.path.display().to_string(),
        "--bird-socket".into(),
        node.bird_socket().display().to_string(),
        "status".into(),
    ];
    if json {
        args.push("--json".into());
    }
    let out = std::process::Command::new("nsenter")
        .args(&args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Nodes on two subnets behind a route reflector: every pair answers, nothing is encapsulated
/// (the datapath's counters and a capture on the router say so), sessions and learned prefixes
/// show in `weft status` and the metrics; routes the router announces for pod subnets it does
/// not own (more specific than a node's, or nobody's) are refused.
#[test]
fn route_reflector_across_two_subnets() {
    let mut c = cluster(3, true, rr_extra(), true);
    wait_learned(&c, Duration::from_secs(30));
    for node in &c.nodes {
        wait_metric(node, "weft_bgp_sessions_established", 1.0);
        wait_metric(node, "weft_bgp_learned_routes", 2.0);
    }
    assert_eq!(c.router.as_ref().unwrap().established(), 3);

    let capture = Capture::start(&c.underlay, network());
    c.assert_full_matrix();
    c.assert_tcp_udp_matrix();
    let seen = capture.stop();
    assert_eq!(
        (seen.ipip, seen.vxlan),
        (0, 0),
        "tunnel packets on the router"
    );
    assert!(
        seen.plain_pod > 100,
        "plain pod packets on the router: {seen:?}"
    );
    for node in &c.nodes {
        assert_eq!(stat(node, Stat::VxlanEncap), 0, "{}", node.name);
        assert_eq!(stat(node, Stat::IpipEncap), 0, "{}", node.name);
        assert!(stat(node, Stat::BgpForward) > 0, "{}", node.name);
        let modes: Vec<u8> = node
            .maps()
            .routes()
            .unwrap()
            .iter()
            .map(|(_, r)| r.mode)
            .collect();
        assert!(
            modes.iter().all(|m| *m == RouteMode::Bgp as u8),
            "{modes:?}"
        );
    }
    // Node 0 (subnet A) reaches node 1 (subnet B) through the router: the next hop in its BGP
    // table is the router, not node 1.
    let route = c.nodes[0].ns.ip(&format!(
        "route show {} table {BGP_TABLE_DEFAULT}",
        subnet(&c.nodes[1])
    ));
    assert!(route.contains("via 192.168.100.1"), "{route}");

    let status = weft_status(&c.nodes[0], false);
    assert!(
        status.contains("bgp        1/1 sessions established, 2 prefixes learned"),
        "{status}"
    );
    assert!(status.contains("192.168.100.1"), "{status}");
    for other in &c.nodes[1..] {
        assert!(status.contains(&subnet(other).to_string()), "{status}");
    }
    let v: serde_json::Value = serde_json::from_str(&weft_status(&c.nodes[0], true)).unwrap();
    assert_eq!(v["bgp"]["sessions"][0]["established"], json!(true), "{v}");
    assert_eq!(v["bgp"]["learned"].as_array().unwrap().len(), 2, "{v}");

    // The router announces a more specific prefix inside node 1's subnet (it would win every
    // longest-prefix match), a pod subnet no node owns and a foreign prefix: all refused.
    let hijack: Ipv4Net = Ipv4Net::new(subnet(&c.nodes[1]).network(), 25).unwrap();
    let unowned: Ipv4Net = "10.244.200.0/24".parse().unwrap();
    let foreign: Ipv4Net = "10.99.0.0/16".parse().unwrap();
    c.router
        .as_mut()
        .unwrap()
        .reconfigure(Cluster::route_reflector_spec(&[hijack, unowned, foreign]).config());
    for node in &c.nodes {
        wait_metric(node, "weft_bgp_refused_routes", 3.0);
        let table = learned(node);
        assert!(!table.contains(&hijack) && !table.contains(&unowned) && !table.contains(&foreign));
        assert_eq!(table.len(), 2, "{table:?}");
    }
    let status = weft_status(&c.nodes[0], false);
    assert!(status.contains(&format!("refused  {hijack}")), "{status}");
    c.assert_full_matrix();
}
