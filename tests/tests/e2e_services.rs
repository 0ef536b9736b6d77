//! End to end: Kubernetes Services through the rules kube-proxy writes, in both of its modes
//! (iptables and nftables), on a cluster of real agents: ClusterIP from pods (same-node and
//! remote backends, hairpin, TCP and UDP) and from a node, load balancing over backends on two
//! nodes, NodePort from another node and from a host outside the cluster with
//! `externalTrafficPolicy` Cluster and Local, and Service flows across agent SIGKILLs.
use std::{
    net::{Ipv4Addr, SocketAddr},
    time::Duration,
};

use weft_tests::{
    cluster::{Cluster, ClusterOptions, OutsideHost},
    flow::{EchoFlow, tcp_transfer_to},
    kube_proxy::{Endpoint, Mode, Protocol, Service},
    whoami::{self, Answer},
};

const BACKEND_PORT: u16 = 8080;
const TIMEOUT: Duration = Duration::from_secs(3);

fn service(
    name: &str,
    ip: [u8; 4],
    protocol: Protocol,
    node_port: Option<u16>,
    external_local: bool,
    endpoints: &[(Ipv4Addr, &str)],
) -> Service {
    service_to(
        name,
        ip,
        protocol,
        node_port,
        external_local,
        endpoints,
        BACKEND_PORT,
    )
}

fn service_to(
    name: &str,
    ip: [u8; 4],
    protocol: Protocol,
    node_port: Option<u16>,
    external_local: bool,
    endpoints: &[(Ipv4Addr, &str)],
    backend_port: u16,
) -> Service {
    Service {
        namespace: "default".into(),
        name: name.into(),
        port_name: protocol.name().into(),
        protocol,
        cluster_ip: Ipv4Addr::from(ip),
        port: 80,
        node_port,
        external_local,
        endpoints: endpoints
            .iter()
            .map(|(ip, node)| Endpoint {
                ip: *ip,
                port: backend_port,
                node: node.to_string(),
            })
            .collect(),
    }
}

struct Setup {
    cluster: Cluster,
    outside: OutsideHost,
    /// Client pod on node 0 (also the backend of the hairpin Service).
    client: Ipv4Addr,
    /// Backend on node 0, the client's node.
    b0: Ipv4Addr,
    /// Backend on node 1.
    b1: Ipv4Addr,
    services: Vec<Service>,
    _servers: Vec<whoami::Server>,
}

const LOCAL: [u8; 4] = [10, 96, 0, 10];
const REMOTE: [u8; 4] = [10, 96, 0, 11];
const HAIRPIN: [u8; 4] = [10, 96, 0, 12];
const BOTH: [u8; 4] = [10, 96, 0, 13];
const ONLY_NODE1: [u8; 4] = [10, 96, 0, 14];
/// Backed by a bulk-transfer server on node 1 (port 9100).
const BULK: [u8; 4] = [10, 96, 0, 15];
const BULK_PORT: u16 = 9100;
const NODE_PORT_CLUSTER: u16 = 30080;
const NODE_PORT_LOCAL: u16 = 30081;

fn setup() -> Setup {
    setup_with(false)
}

fn setup_with(default_xdp: bool) -> Setup {
    let mut cluster = Cluster::new(ClusterOptions {
        nodes: 2,
        default_xdp,
        ..Default::default()
    });
    let client = cluster.add_pod(0);
    let b0 = cluster.add_pod(0);
    let b1 = cluster.add_pod(1);
    let outside = cluster.add_outside_host();
    let (n0, n1) = (cluster.nodes[0].name.clone(), cluster.nodes[1].name.clone());
    let mut services = Vec::new();
    for protocol in [Protocol::Tcp, Protocol::Udp] {
        services.push(service("local", LOCAL, protocol, None, false, &[(b0, &n0)]));
        services.push(service(
            "remote",
            REMOTE,
            protocol,
            None,
            false,
            &[(b1, &n1)],
        ));
        services.push(service(
            "hairpin",
            HAIRPIN,
            protocol,
            None,
            false,
            &[(client, &n0)],
        ));
    }
    services.push(service(
        "both",
        BOTH,
        Protocol::Tcp,
        Some(NODE_PORT_CLUSTER),
        false,
        &[(b0, &n0), (b1, &n1)],
    ));
    services.push(service_to(
        "bulk",
        BULK,
        Protocol::Tcp,
        None,
        false,
        &[(b1, &n1)],
        BULK_PORT,
    ));
    services.push(service(
        "only-node1",
        ONLY_NODE1,
        Protocol::Tcp,
        Some(NODE_PORT_LOCAL),
        true,
        &[(b1, &n1)],
    ));
    let pod_ns = |node: usize, ip: Ipv4Addr| {
        &cluster.nodes[node]
            .pods
            .iter()
            .find(|p| p.ip == ip)
            .unwrap()
            .ns
    };
    let servers = vec![
        whoami::Server::start(pod_ns(0, client), client, BACKEND_PORT),
        whoami::Server::start(pod_ns(0, b0), b0, BACKEND_PORT),
        whoami::Server::start(pod_ns(1, b1), b1, BACKEND_PORT),
    ];
    Setup {
        cluster,
        outside,
        client,
        b0,
        b1,
        services,
        _servers: servers,
    }
}

fn vip(ip: [u8; 4]) -> SocketAddr {
    SocketAddr::from((Ipv4Addr::from(ip), 80))
}

impl Setup {
    fn pod_ns(&self, ip: Ipv4Addr) -> &weft_tests::netns::Netns {
        self.cluster
            .all_pods()
            .into_iter()
            .find(|(_, p)| p.ip == ip)
            .map(|(_, p)| &p.ns)
            .expect("pod")
    }

    fn fail(&self, what: &str, err: &str) -> ! {
        panic!(
            "{what}: {err}\n{}\n{}",
            self.cluster.datapath_state(),
            self.cluster.agent_logs()
        )
    }

    fn tcp(&self, from: &weft_tests::netns::Netns, target: SocketAddr, what: &str) -> Answer {
        match whoami::tcp_ask(from, target, 1, TIMEOUT).remove(0) {
            Ok(a) => a,
            Err(e) => self.fail(what, &e),
        }
    }

    fn udp(&self, from: &weft_tests::netns::Netns, target: SocketAddr, what: &str) -> Answer {
        whoami::udp_ask(from, target, TIMEOUT).unwrap_or_else(|e| self.fail(what, &e))
    }

    /// Every check of the issue, against the rules currently installed.
    fn check_services(&self, mode: Mode) {
        let client_ns = self.pod_ns(self.client);
        let node0 = &self.cluster.nodes[0];
        let node1 = &self.cluster.nodes[1];
        // ClusterIP from a pod: same-node backend, remote backend, TCP and UDP; the backend
        // sees the pod's own address (no masquerade inside the cluster network).
        for (target, backend, what) in [
            (LOCAL, self.b0, "same-node backend"),
            (REMOTE, self.b1, "remote backend"),
        ] {
            let a = self.tcp(
                client_ns,
                vip(target),
                &format!("{mode:?} TCP ClusterIP, {what}"),
            );
            assert_eq!(a.server, backend, "{mode:?} TCP {what}");
            assert_eq!(
                a.peer.ip(),
                std::net::IpAddr::V4(self.client),
                "{mode:?} {what}"
            );
            let a = self.udp(
                client_ns,
                vip(target),
                &format!("{mode:?} UDP ClusterIP, {what}"),
            );
            assert_eq!(a.server, backend, "{mode:?} UDP {what}");
            assert_eq!(
                a.peer.ip(),
                std::net::IpAddr::V4(self.client),
                "{mode:?} {what}"
            );
        }
        // Bulk data through a Service, content checked (MTU-sized segments, both directions
        // translated).
        tcp_transfer_to(
            self.pod_ns(self.b1),
            self.b1,
            BULK_PORT,
            client_ns,
            vip(BULK),
            2 << 20,
            Duration::from_secs(20),
        );
        // Hairpin: the client reaches itself through its Service (masqueraded by KUBE-SEP).
        let a = self.tcp(client_ns, vip(HAIRPIN), &format!("{mode:?} TCP hairpin"));
        assert_eq!(a.server, self.client);
        let a = self.udp(client_ns, vip(HAIRPIN), &format!("{mode:?} UDP hairpin"));
        assert_eq!(a.server, self.client);
        // ClusterIP from a node (its own traffic, and through weft_host to a remote backend).
        let a = self.tcp(
            &node0.ns,
            vip(LOCAL),
            &format!("{mode:?} node -> ClusterIP local"),
        );
        assert_eq!(a.server, self.b0);
        let a = self.tcp(
            &node0.ns,
            vip(REMOTE),
            &format!("{mode:?} node -> ClusterIP remote"),
        );
        assert_eq!(a.server, self.b1);
        let a = self.udp(
            &node0.ns,
            vip(REMOTE),
            &format!("{mode:?} node -> UDP ClusterIP"),
        );
        assert_eq!(a.server, self.b1);
        // Two backends on two nodes: 100 connections reach both.
        let answers = whoami::tcp_ask(client_ns, vip(BOTH), 100, TIMEOUT);
        let mut counts = [0usize; 2];
        for a in &answers {
            match a {
                Ok(a) if a.server == self.b0 => counts[0] += 1,
                Ok(a) if a.server == self.b1 => counts[1] += 1,
                Ok(a) => self.fail("balancing", &format!("unexpected backend {a:?}")),
                Err(e) => self.fail(&format!("{mode:?} balancing"), e),
            }
        }
        eprintln!("{mode:?}: 100 connections to a 2-backend Service: {counts:?}");
        assert!(
            counts[0] >= 10 && counts[1] >= 10,
            "{mode:?}: 100 connections split {counts:?}"
        );
        // NodePort (Cluster): from the other node and from outside the cluster, to both
        // nodes; masqueraded, so the backend sees a node address.
        for (from, what) in [(&node1.ns, "node 1"), (&self.outside.ns, "an outside host")] {
            for node in [node0, node1] {
                let target = SocketAddr::from((node.ip, NODE_PORT_CLUSTER));
                let answers = whoami::tcp_ask(from, target, 6, TIMEOUT);
                for a in answers {
                    let a = a.unwrap_or_else(|e| {
                        self.fail(&format!("{mode:?} NodePort {target} from {what}"), &e)
                    });
                    assert!(
                        a.server == self.b0 || a.server == self.b1,
                        "{mode:?} NodePort answered by {a:?}"
                    );
                }
            }
        }
        // NodePort (Local): only the node with a local endpoint answers, and the backend sees
        // the client's own address.
        let target = SocketAddr::from((node1.ip, NODE_PORT_LOCAL));
        let a = self.tcp(
            &self.outside.ns,
            target,
            &format!("{mode:?} Local NodePort"),
        );
        assert_eq!(a.server, self.b1);
        assert_eq!(
            a.peer.ip(),
            std::net::IpAddr::V4(self.outside.ip),
            "{mode:?}: externalTrafficPolicy Local keeps the client's address"
        );
        let target = SocketAddr::from((node0.ip, NODE_PORT_LOCAL));
        let refused = whoami::tcp_ask(&self.outside.ns, target, 1, Duration::from_millis(700));
        assert!(
            refused[0].is_err(),
            "{mode:?}: Local NodePort answered on a node without endpoints: {refused:?}"
        );
    }
}

#[test]
fn services_through_kube_proxy_rules() {
    let s = setup();
    for mode in [Mode::Iptables, Mode::Nftables] {
        s.cluster.install_services(mode, &s.services);
        s.check_services(mode);
    }
    for node in &s.cluster.nodes {
        let drops = node.maps().drops().unwrap();
        let total: u64 = drops.iter().map(|(_, n)| n).sum();
        assert_eq!(total, 0, "{}: {drops:?}", node.name);
    }
}

/// A Service flow (UDP request/response through a ClusterIP to a backend on the other node)
/// across SIGKILLs and restarts of both nodes' agents: nothing lost. The agents run with the
/// default `--xdp=auto`, which decapsulates in tc on a veth underlay (VXLAN through
/// `weft_vxlan`), so this also covers the stack taking replies the kernel's vxlan socket
/// decapsulated, and the device adopted across restarts.
#[test]
fn service_flows_survive_agent_restarts() {
    let mut s = setup_with(true);
    for node in &s.cluster.nodes {
        let (_, body) = node.http_get("/metrics").expect("/metrics");
        let hook = body
            .lines()
            .find(|l| l.starts_with("weft_decap_hook{"))
            .unwrap_or_default();
        assert!(
            hook.contains(r#"hook="tc""#)
                && hook.contains("veth")
                && hook.contains(r#"vxlan="weft_vxlan""#)
                && hook.ends_with(" 1"),
            "{}: {hook:?}",
            node.name
        );
    }
    const FLOW_REMOTE: [u8; 4] = [10, 96, 0, 20];
    const FLOW_LOCAL: [u8; 4] = [10, 96, 0, 21];
    let (n0, n1) = (
        s.cluster.nodes[0].name.clone(),
        s.cluster.nodes[1].name.clone(),
    );
    let mut services = s.services.clone();
    services.push(service_to(
        "flow-remote",
        FLOW_REMOTE,
        Protocol::Udp,
        None,
        false,
        &[(s.b1, &n1)],
        7500,
    ));
    services.push(service_to(
        "flow-local",
        FLOW_LOCAL,
        Protocol::Udp,
        None,
        false,
        &[(s.b0, &n0)],
        7501,
    ));
    s.cluster.install_services(Mode::Iptables, &services);
    let flow = EchoFlow::start(
        s.pod_ns(s.client),
        s.pod_ns(s.b1),
        SocketAddr::from((s.b1, 7500)),
        vip(FLOW_REMOTE),
    );
    let flow_local = EchoFlow::start(
        s.pod_ns(s.client),
        s.pod_ns(s.b0),
        SocketAddr::from((s.b0, 7501)),
        vip(FLOW_LOCAL),
    );
    for round in 0..4 {
        std::thread::sleep(Duration::from_millis(300));
        s.cluster.restart_agent(round % 2);
        s.cluster.wait_ready(round % 2);
    }
    std::thread::sleep(Duration::from_millis(300));
    for (f, what) in [(flow.stop(), "remote"), (flow_local.stop(), "same-node")] {
        eprintln!(
            "Service flow ({what} backend) across 4 agent SIGKILLs: {} sent, {} lost",
            f.sent, f.lost
        );
        assert!(f.sent > 1000);
        assert_eq!(f.lost, 0, "{what}: lost {:?}", f.missing);
    }
    // Still translating after the restarts; and with tc decapsulation, the rest of the
    // Service checks hold too.
    let a = s.tcp(s.pod_ns(s.client), vip(REMOTE), "after restarts");
    assert_eq!(a.server, s.b1);
    s.check_services(Mode::Iptables);
}

/// iperf3 (TCP, 3 s) from `client` to a server at `server_ip` in `server`; `reverse` has the
/// server send. Returns the received rate in bit/s.
fn iperf3_rate(
    client: &weft_tests::netns::Netns,
    server: &weft_tests::netns::Netns,
    server_ip: Ipv4Addr,
    port: u16,
    reverse: bool,
) -> f64 {
    let mut srv = std::process::Command::new("ip")
        .args(["netns", "exec", &server.name, "iperf3", "-s", "-1"])
        .args(["-B", &server_ip.to_string(), "-p", &port.to_string()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("iperf3 -s");
    let mut result = None;
    weft_tests::process::wait_until("iperf3 to run", Duration::from_secs(20), || {
        let mut args = vec!["netns", "exec", &client.name, "iperf3", "-J", "-t", "3"];
        let (ip, p) = (server_ip.to_string(), port.to_string());
        args.extend(["-c", &ip, "-p", &p]);
        if reverse {
            args.push("-R");
        }
        let out = std::process::Command::new("ip")
            .args(&args)
            .output()
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        result = v["end"]["sum_received"]["bits_per_second"].as_f64();
        result.is_some()
    });
    let _ = srv.kill();
    let _ = srv.wait();
    result.unwrap()
}

/// CNI chaining as kubelet's runtime does it: `portmap` (hostPort) and `bandwidth` (pod
/// ingress and egress rates) chained after weft.
#[test]
fn host_port_and_bandwidth_plugins_chained_after_weft() {
    let mut c = Cluster::new(ClusterOptions {
        nodes: 2,
        ..Default::default()
    });
    let outside = c.add_outside_host();
    let neighbour = c.add_pod(0);
    let remote = c.add_pod(1);
    // hostPort 18080 -> containerPort 8080 of a pod on node 0.
    let mapped = c.add_pod_chained(
        0,
        serde_json::json!({}),
        vec![serde_json::json!({
            "type": "portmap",
            "capabilities": {"portMappings": true},
            "runtimeConfig": {"portMappings": [
                {"hostPort": 18080, "containerPort": BACKEND_PORT, "protocol": "tcp"}
            ]}
        })],
    );
    let pod_ns = |c: &Cluster, ip: Ipv4Addr| {
        c.all_pods()
            .into_iter()
            .find(|(_, p)| p.ip == ip)
            .map(|(_, p)| p.ns.name.clone())
            .unwrap()
    };
    let _server = whoami::Server::start(
        &c.nodes[0].pods.iter().find(|p| p.ip == mapped).unwrap().ns,
        mapped,
        BACKEND_PORT,
    );
    let target = SocketAddr::from((c.nodes[0].ip, 18080));
    let from: Vec<(&weft_tests::netns::Netns, &str)> = vec![
        (&c.nodes[1].ns, "node 1"),
        (&outside.ns, "an outside host"),
        (&c.nodes[1].pods[0].ns, "a pod on node 1"),
        (&c.nodes[0].pods[0].ns, "a pod on the same node"),
    ];
    for (ns, what) in from {
        let a = whoami::tcp_ask(ns, target, 1, TIMEOUT)
            .remove(0)
            .unwrap_or_else(|e| panic!("hostPort from {what}: {e}\n{}", c.datapath_state()));
        assert_eq!(a.server, mapped, "hostPort from {what}");
    }
    let _ = (neighbour, pod_ns(&c, remote));

    // A pod shaped to 20 Mbit/s both ways by `bandwidth`; weft gets the same capability
    // (runtimeConfig.bandwidth) and sends the pod's traffic through the stack, where the
    // plugin's qdiscs are.
    const RATE: u64 = 20_000_000;
    let bandwidth = serde_json::json!({
        "ingressRate": RATE, "ingressBurst": 400_000,
        "egressRate": RATE, "egressBurst": 400_000
    });
    let shaped = c.add_pod_chained(
        0,
        serde_json::json!({
            "capabilities": {"bandwidth": true},
            "runtimeConfig": {"bandwidth": bandwidth.clone()}
        }),
        vec![serde_json::json!({
            "type": "bandwidth",
            "capabilities": {"bandwidth": true},
            "runtimeConfig": {"bandwidth": bandwidth}
        })],
    );
    let flags = c.nodes[0]
        .maps()
        .endpoints()
        .unwrap()
        .into_iter()
        .find(|(ip, _)| *ip == shaped)
        .unwrap()
        .1
        .flags;
    assert_eq!(
        flags & weft_common::EP_F_STACK_ONLY,
        weft_common::EP_F_STACK_ONLY
    );
    let shaped_ns = &c.nodes[0].pods.iter().find(|p| p.ip == shaped).unwrap().ns;
    let remote_ns = &c.nodes[1].pods[0].ns;
    for reverse in [false, true] {
        let rate = iperf3_rate(shaped_ns, remote_ns, remote, 7700, reverse);
        let what = if reverse { "ingress" } else { "egress" };
        eprintln!(
            "bandwidth plugin, {what}: {:.1} Mbit/s (set: 20)",
            rate / 1e6
        );
        assert!(
            (rate - RATE as f64).abs() <= 0.2 * RATE as f64,
            "{what} rate {rate:.0} bit/s is not within 20% of {RATE}"
        );
    }
    // An unshaped pod on the same node is not held to that rate.
    let free = iperf3_rate(&c.nodes[0].pods[0].ns, remote_ns, remote, 7701, false);
    assert!(free > 2.0 * RATE as f64, "unshaped pod: {free:.0} bit/s");
}
