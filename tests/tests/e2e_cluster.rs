//! End to end: clusters of real agents (etcd datastore) and pods created by the real CNI plugin,
//! in network namespaces. Connectivity matrices, churn and agent restarts.
use std::time::Duration;

use weft_tests::{
    cluster::{Cluster, ClusterOptions},
    flow::{FlowLoss, SequencedFlow, tcp_transfer, udp_echo_sizes},
    process::wait_until,
};

fn cluster_with_pods(options: ClusterOptions, pods_per_node: usize) -> Cluster {
    let mut cluster = Cluster::new(options);
    for node in 0..cluster.nodes.len() {
        for _ in 0..pods_per_node {
            cluster.add_pod(node);
        }
    }
    cluster
}

/// Traffic that would expose an MTU mistake between pods on different nodes.
fn bulk_and_sizes(cluster: &Cluster, port: u16) {
    let a = &cluster.nodes[0].pods[0];
    let b = &cluster.nodes[1].pods[0];
    tcp_transfer(&b.ns, b.ip, port, &a.ns, 8 << 20, Duration::from_secs(30));
    tcp_transfer(
        &a.ns,
        a.ip,
        port + 1,
        &b.ns,
        8 << 20,
        Duration::from_secs(30),
    );
    let retries = udp_echo_sizes(&a.ns, &b.ns, b.ip, port + 2, 1..=9000);
    assert!(retries <= 5, "{retries} datagrams needed a retry");
}

/// The value of the sample `name{labels}` in an OpenMetrics text.
fn sample(body: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    body.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (series, value) = l.rsplit_once(' ')?;
        let (n, rest) = series.split_once('{').unwrap_or((series, ""));
        (n == name
            && labels
                .iter()
                .all(|(k, v)| rest.contains(&format!("{k}=\"{v}\""))))
        .then(|| value.parse().ok())?
    })
}

/// Per-endpoint flow counters: every pod of node 0 sent and received, one series per pod and
/// direction; and every metric the Grafana dashboard queries exists in a live agent's
/// /metrics.
fn assert_endpoint_counters_and_dashboard_metrics(cluster: &Cluster) {
    let node = &cluster.nodes[0];
    let (status, body) = node.http_get("/metrics").expect("/metrics answers");
    assert_eq!(status, 200);
    for pod in &node.pods {
        let ip = pod.ip.to_string();
        for metric in ["weft_endpoint_packets_total", "weft_endpoint_bytes_total"] {
            for dir in ["in", "out"] {
                let v = sample(&body, metric, &[("endpoint", &ip), ("direction", dir)])
                    .unwrap_or_else(|| panic!("{metric} of {ip} {dir} missing:\n{body}"));
                assert!(v > 0.0, "{metric} of {ip} {dir} is {v}");
            }
        }
    }
    let series = body
        .lines()
        .filter(|l| l.starts_with("weft_endpoint_packets_total{"))
        .count();
    assert_eq!(
        series,
        2 * node.pods.len(),
        "one series per pod and direction"
    );

    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/grafana/weft.json");
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let mut queried = std::collections::BTreeSet::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"].as_str().unwrap();
            let mut rest = expr;
            while let Some(i) = rest.find("weft_") {
                let name: String = rest[i..]
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                rest = &rest[i + name.len()..];
                queried.insert(name);
            }
        }
    }
    for must in [
        "weft_drops_total",
        "weft_packets_total",
        "weft_reconcile_seconds_bucket",
        "weft_map_fill_ratio",
        "weft_offlink_peers",
    ] {
        assert!(
            queried.contains(must),
            "the dashboard lost its {must} panel"
        );
    }
    let exposed: std::collections::BTreeSet<&str> = body
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split(['{', ' ']).next())
        .collect();
    let missing: Vec<_> = queried
        .iter()
        .filter(|m| !exposed.contains(m.as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "the dashboard queries metrics the agent does not export: {missing:?}"
    );
}

/// `weft monitor` on a node of a real cluster reports a pod sending from an address that is not
/// its own, naming the pod as the runtime named it (CNI_ARGS) and the nodes as the agents named
/// themselves (their etcd leases); `--node` takes the peer's name.
fn monitor_names_a_spoofing_pod(cluster: &mut Cluster) {
    use std::io::Read as _;
    let (index, _) = cluster.add_named_pod(0, "default", "spoofer", None);
    let node = &cluster.nodes[0];
    let pod = &node.pods[index];
    let target = cluster.nodes[1].pods[0].ip;
    let mut monitor = std::process::Command::new("nsenter")
        .arg(format!("--net={}", node.ns.path()))
        .arg(weft_tests::cluster::binary("weft"))
        .arg("--pin-root")
        .arg(&node.pins.path)
        .args([
            "--json",
            "monitor",
            "--reason",
            "spoofed_ip",
            "--node",
            &cluster.nodes[1].name,
            "--count",
            "1",
            "--cni-data-dir",
        ])
        .arg(node.dir.join("ipam"))
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    wait_until("weft monitor to attach", Duration::from_secs(10), || {
        node.maps()
            .monitor_configs()
            .unwrap()
            .iter()
            .any(|c| c.owner_pid == monitor.id())
    });
    // A second address inside the pod: the pod sends from it.
    let spoofed = std::net::Ipv4Addr::from(u32::from(pod.ip) + 100);
    pod.ns.ip(&format!("addr add {spoofed}/32 dev eth0"));
    let _ = pod.ns.exec_ok(
        "ping",
        &[
            "-c",
            "1",
            "-W",
            "1",
            "-I",
            &spoofed.to_string(),
            &target.to_string(),
        ],
    );
    let mut out = String::new();
    let (tx, rx) = std::sync::mpsc::channel();
    let mut stdout = monitor.stdout.take().unwrap();
    std::thread::spawn(move || {
        let _ = stdout.read_to_string(&mut out);
        let _ = tx.send(out);
    });
    let out = rx
        .recv_timeout(Duration::from_secs(10))
        .unwrap_or_else(|_| {
            let _ = monitor.kill();
            panic!("weft monitor reported nothing")
        });
    monitor.wait().unwrap();
    let ev: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    let pod_name = "default/spoofer";
    assert_eq!(ev["reason"], "spoofed_ip", "{ev}");
    assert_eq!(ev["hook"], "from_pod");
    assert_eq!(ev["endpoint"], pod_name, "{ev}");
    assert_eq!(ev["src"], spoofed.to_string());
    assert_eq!(ev["dst"], target.to_string());
    assert_eq!(ev["protocol"], "icmp");
    assert_eq!(
        ev["dst_node"], cluster.nodes[1].name,
        "the peer by its name: {ev}"
    );
    assert_eq!(ev["dst_node_ip"], cluster.nodes[1].ip.to_string());
    assert_eq!(ev["node"], node.name, "{ev}");
    assert!(
        node.maps().monitor_flags().unwrap().iter().all(|f| *f == 0),
        "detached"
    );
}

#[test]
fn vxlan_cluster_full_connectivity() {
    let mut cluster = cluster_with_pods(ClusterOptions::default(), 2);
    let probes = cluster.assert_full_matrix();
    // TCP and UDP too, for every pair the ICMP matrix covers (but pod -> node).
    assert_eq!(cluster.assert_tcp_udp_matrix(), 6 * 5 + 3 * 6);
    assert_eq!(probes, 6 * 5 + 6 * 3 + 3 * 6, "matrix size");
    bulk_and_sizes(&cluster, 8001);
    assert_endpoint_counters_and_dashboard_metrics(&cluster);
    for node in &cluster.nodes {
        let drops: u64 = node.maps().drops().unwrap().iter().map(|(_, n)| n).sum();
        assert_eq!(
            drops,
            0,
            "{} dropped packets: {:?}",
            node.name,
            node.maps().drops().unwrap()
        );
    }
    // Last: it makes a drop.
    monitor_names_a_spoofing_pod(&mut cluster);
}

#[test]
fn churn_nodes_and_pods_converge() {
    let mut cluster = cluster_with_pods(ClusterOptions::default(), 1);
    let flow = SequencedFlow::start(
        &cluster.nodes[0].pods[0].ns,
        &cluster.nodes[1].pods[0].ns,
        cluster.nodes[1].pods[0].ip,
        7100,
    );
    // A fourth node joins: every node learns its subnet.
    let new = cluster.add_node();
    cluster.wait_converged(new);
    for i in 0..cluster.nodes.len() {
        cluster.wait_converged(i);
    }
    cluster.add_pod(new);
    cluster.assert_full_matrix();
    // A node leaves: no node keeps a route to it.
    let gone = cluster.remove_node(2);
    let gone_ip = gone.ip;
    drop(gone);
    for node in &cluster.nodes {
        wait_until(
            &format!("{} to forget {gone_ip}", node.name),
            // Its lease is deleted: every node must converge within seconds.
            Duration::from_secs(5),
            || {
                let routes = node.maps().routes().unwrap();
                routes
                    .iter()
                    .all(|(_, r)| std::net::Ipv4Addr::from(r.node_ip) != gone_ip)
                    && node
                        .maps()
                        .nodes()
                        .unwrap()
                        .iter()
                        .all(|(ip, _)| *ip != gone_ip)
            },
        );
    }
    // Pods deleted and created: endpoints follow.
    let node0 = &cluster.nodes[0];
    let before = node0.maps().endpoints().unwrap().len();
    cluster.add_pod(0);
    assert_eq!(
        cluster.nodes[0].maps().endpoints().unwrap().len(),
        before + 1
    );
    cluster.delete_pod(0, 1);
    assert_eq!(cluster.nodes[0].maps().endpoints().unwrap().len(), before);
    cluster.assert_full_matrix();
    let FlowLoss {
        sent,
        lost,
        missing,
    } = flow.stop();
    eprintln!("churn: flow of {sent} packets between untouched pods lost {lost}");
    assert_eq!(
        lost, 0,
        "the flow between untouched pods lost packets during churn: {missing:?}"
    );
}

#[test]
fn agent_sigkill_and_restart_loses_no_packets() {
    // The agent's default hook: on these veth underlays, tc with TCP in VXLAN through
    // `weft_vxlan`, which a restarted agent adopts (the sequenced UDP flows are decapsulated by
    // from_underlay; a TCP transfer after each restart crosses the device).
    let mut cluster = cluster_with_pods(
        ClusterOptions {
            nodes: 2,
            default_xdp: true,
            ..Default::default()
        },
        1,
    );
    let (a, b) = (&cluster.nodes[0].pods[0], &cluster.nodes[1].pods[0]);
    let forward = SequencedFlow::start(&a.ns, &b.ns, b.ip, 7200);
    let backward = SequencedFlow::start(&b.ns, &a.ns, a.ip, 7201);
    for round in 0..3 {
        std::thread::sleep(Duration::from_millis(300));
        cluster.restart_agent(round % 2);
        // The restarted agent becomes ready again (adopting its pins).
        cluster.wait_ready(round % 2);
        let (from, to) = (
            &cluster.nodes[1 - round % 2].pods[0],
            &cluster.nodes[round % 2].pods[0],
        );
        let through_device = || {
            cluster.nodes[round % 2]
                .maps()
                .stat_count(weft_common::Stat::VxlanDeviceDecap)
                .unwrap()
        };
        let count = through_device();
        tcp_transfer(
            &to.ns,
            to.ip,
            7210 + round as u16,
            &from.ns,
            1 << 20,
            Duration::from_secs(30),
        );
        assert!(
            through_device() > count,
            "TCP through the adopted weft_vxlan"
        );
    }
    std::thread::sleep(Duration::from_millis(300));
    let f = forward.stop();
    let b = backward.stop();
    eprintln!(
        "agent restarts: 3 SIGKILLs; {} + {} packets sent, {} + {} lost",
        f.sent, b.sent, f.lost, b.lost
    );
    assert!(f.sent > 1000 && b.sent > 1000);
    assert_eq!(
        f.lost + b.lost,
        0,
        "packets lost across agent restarts: {:?} {:?}",
        f.missing,
        b.missing
    );
    // The device gone (deleted by hand): the agent makes it again within a second or so, and
    // VXLAN goes through it again.
    let node = &cluster.nodes[1];
    let vxlan_decap = || weft_common::vxlan_decap(node.maps().config().unwrap().flags);
    assert_eq!(vxlan_decap(), weft_common::VXLAN_DEV);
    let before = node.ns.ifindex(weft_common::VXLAN_DEV);
    node.ns
        .ip(&format!("link delete {}", weft_common::VXLAN_DEV));
    wait_until(
        "the agent to make weft_vxlan again",
        Duration::from_secs(10),
        || {
            node.ns
                .exec_ok("ip", &["link", "show", weft_common::VXLAN_DEV])
                && vxlan_decap() == weft_common::VXLAN_DEV
        },
    );
    assert_ne!(node.ns.ifindex(weft_common::VXLAN_DEV), before);
    cluster.assert_full_matrix();
    // TCP into node 1's pod goes through the new device.
    let through_device = || {
        node.maps()
            .stat_count(weft_common::Stat::VxlanDeviceDecap)
            .unwrap()
    };
    let count = through_device();
    let (a, b) = (&cluster.nodes[0].pods[0], &node.pods[0]);
    tcp_transfer(&b.ns, b.ip, 7202, &a.ns, 4 << 20, Duration::from_secs(30));
    assert!(through_device() > count, "TCP through the new weft_vxlan");
}

#[test]
fn flannel_node_and_weft_nodes_share_a_cluster() {
    let cluster_opts = ClusterOptions {
        nodes: 2,
        ..Default::default()
    };
    let mut cluster = cluster_with_pods(cluster_opts, 1);
    let subnet = cluster.unheld_subnets()[0];
    let f = cluster.add_flannel_node(subnet);
    // The weft agents pick the flannel node's lease up from etcd, as flannel nodes would.
    for node in &cluster.nodes {
        wait_until(
            &format!("{} to route {subnet}", node.name),
            Duration::from_secs(30),
            || {
                node.maps()
                    .routes()
                    .unwrap()
                    .iter()
                    .any(|(net, _)| *net == subnet)
            },
        );
    }
    cluster.sync_flannel_nodes();
    let flannel_pod = &cluster.flannel[f].pod;
    for node in &cluster.nodes {
        let pod = &node.pods[0];
        pod.ns.exec(
            "ping",
            &[
                "-c",
                "2",
                "-i",
                "0.2",
                "-W",
                "2",
                &flannel_pod.ip.to_string(),
            ],
        );
        flannel_pod.ns.exec(
            "ping",
            &["-c", "2", "-i", "0.2", "-W", "2", &pod.ip.to_string()],
        );
    }
    let a = &cluster.nodes[0].pods[0];
    tcp_transfer(
        &flannel_pod.ns,
        flannel_pod.ip,
        7300,
        &a.ns,
        4 << 20,
        Duration::from_secs(30),
    );
    tcp_transfer(
        &a.ns,
        a.ip,
        7301,
        &flannel_pod.ns,
        4 << 20,
        Duration::from_secs(30),
    );
}
