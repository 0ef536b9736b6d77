//! `cargo xtask bench`'s datapath part (issue 7): weft's backends side by side with the
//! kernel's own paths on the same two-node namespace testbed, in one run, on both wire models
//! (DESIGN.md: `datapath` = MTU-sized frames on the underlay, `datapath_veth` = ideal veth
//! offloads), plus the per-program cost through BPF_PROG_TEST_RUN. Prints one JSON object.
use std::{
    collections::BTreeMap,
    net::Ipv4Addr,
    process::{Child, Command, Stdio},
    time::Duration,
};

use serde_json::{Value, json};
use weft_common::{RouteMode, prog_names};
use weft_tests::{
    agentless::{FlannelNode, Pod, WeftNode, mtu_wire},
    injection_node::*,
    netns::{Netns, veth_pair},
    packets::*,
    testrun::{run_tc, run_xdp},
};

const POD_MTU: u32 = 1450;

/// Builds a contestant's testbed; the argument selects the MTU-sized wire.
type BuildTestbed = fn(bool) -> Testbed;
const NODE_A: Ipv4Addr = Ipv4Addr::new(192, 168, 80, 1);
const NODE_B: Ipv4Addr = Ipv4Addr::new(192, 168, 80, 2);

struct Settings {
    tcp_secs: u32,
    tcp_runs: u32,
    udp_secs: u32,
    pings: u32,
    prog_calls: u64,
}

/// What a contestant's testbed must keep alive while it is measured.
enum Testbed {
    Weft {
        _a: WeftNode,
        _b: WeftNode,
        pa: Pod,
        pb: Pod,
    },
    Flannel {
        _a: FlannelNode,
        b: FlannelNode,
        pa_ns: String,
    },
    HostGw {
        _a: Netns,
        _b: Netns,
        pa: Pod,
        pb: Pod,
    },
    /// Two nodes on two subnets with a router namespace between them.
    Routed {
        _nodes: Vec<Box<dyn std::any::Any>>,
        _router: Netns,
        pa: Pod,
        pb: Pod,
    },
}

impl Testbed {
    fn client_ns(&self) -> &str {
        match self {
            Testbed::Weft { pa, .. } | Testbed::HostGw { pa, .. } | Testbed::Routed { pa, .. } => {
                &pa.ns.name
            }
            Testbed::Flannel { pa_ns, .. } => pa_ns,
        }
    }
    fn server(&self) -> (&str, Ipv4Addr) {
        match self {
            Testbed::Weft { pb, .. } | Testbed::HostGw { pb, .. } | Testbed::Routed { pb, .. } => {
                (&pb.ns.name, pb.ip)
            }
            Testbed::Flannel { b, .. } => (&b.pod.ns.name, b.pod.ip),
        }
    }
}

fn underlay(mtu_sized: bool) -> (Netns, Netns) {
    let a = Netns::new("ba");
    let b = Netns::new("bb");
    veth_pair(&a, "eth0", &b, "eth0");
    if mtu_sized {
        mtu_wire(&a, "eth0");
        mtu_wire(&b, "eth0");
    }
    a.ip(&format!("addr add {NODE_A}/24 dev eth0"));
    b.ip(&format!("addr add {NODE_B}/24 dev eth0"));
    (a, b)
}

fn weft(mode: RouteMode, mtu_sized: bool) -> Testbed {
    weft_with(mode, mtu_sized, true)
}

fn weft_with(mode: RouteMode, mtu_sized: bool, xdp: bool) -> Testbed {
    let (na, nb) = underlay(mtu_sized);
    let a = WeftNode::new(na, NODE_A, "eth0", [2, 0x77, 0, 0, 0, 1], xdp);
    let b = WeftNode::new(nb, NODE_B, "eth0", [2, 0x77, 0, 0, 0, 2], xdp);
    let pa = a.add_pod(Ipv4Addr::new(10, 244, 1, 2), POD_MTU);
    let pb = b.add_pod(Ipv4Addr::new(10, 244, 2, 2), POD_MTU);
    a.add_peer("10.244.2.0/24".parse().unwrap(), NODE_B, b.vtep_mac, mode);
    b.add_peer("10.244.1.0/24".parse().unwrap(), NODE_A, a.vtep_mac, mode);
    Testbed::Weft {
        _a: a,
        _b: b,
        pa,
        pb,
    }
}

fn flannel(mtu_sized: bool) -> Testbed {
    let (na, nb) = underlay(mtu_sized);
    let a = FlannelNode::new(
        na,
        NODE_A,
        "eth0",
        "10.244.1.0/24".parse().unwrap(),
        POD_MTU,
    );
    let b = FlannelNode::new(
        nb,
        NODE_B,
        "eth0",
        "10.244.2.0/24".parse().unwrap(),
        POD_MTU,
    );
    a.add_peer(b.subnet, NODE_B, b.vtep_mac);
    b.add_peer(a.subnet, NODE_A, a.vtep_mac);
    let pa_ns = a.pod.ns.name.clone();
    Testbed::Flannel { _a: a, b, pa_ns }
}

/// The limit: plain kernel routing between nodes on one L2 segment, no encapsulation, pods on
/// veths routed by the node (as host-gw does; 1500 MTU since nothing is added).
fn kernel_host_gw(mtu_sized: bool) -> Testbed {
    let (na, nb) = underlay(mtu_sized);
    let mut pods = Vec::new();
    for (node, subnet, peer, peer_subnet) in [(&na, 1, NODE_B, 2), (&nb, 2, NODE_A, 1)] {
        node.sysctl("net.ipv4.ip_forward", "1");
        let pod = Netns::new("bp");
        node.ip(&format!(
            "link add hv type veth peer name eth0 netns {}",
            pod.name
        ));
        node.ip(&format!("addr add 10.244.{subnet}.1/24 dev hv"));
        node.ip("link set hv up");
        pod.ip("link set eth0 up");
        let ip = Ipv4Addr::new(10, 244, subnet, 2);
        pod.ip(&format!("addr add {ip}/24 dev eth0"));
        pod.ip(&format!("route add default via 10.244.{subnet}.1"));
        node.ip(&format!("route add 10.244.{peer_subnet}.0/24 via {peer}"));
        pods.push(Pod {
            ns: pod,
            ip,
            host_ifname: "hv".into(),
        });
    }
    let pb = pods.pop().unwrap();
    let pa = pods.pop().unwrap();
    Testbed::HostGw {
        _a: na,
        _b: nb,
        pa,
        pb,
    }
}

/// Node addresses on two subnets joined by a router (the bgp backend's setting).
const ROUTED_A: Ipv4Addr = Ipv4Addr::new(192, 168, 81, 2);
const ROUTED_B: Ipv4Addr = Ipv4Addr::new(192, 168, 82, 2);
const ROUTER_A: Ipv4Addr = Ipv4Addr::new(192, 168, 81, 1);
const ROUTER_B: Ipv4Addr = Ipv4Addr::new(192, 168, 82, 1);

/// Node A - router - node B, each link a veth pair (MTU-sized on request). The router forwards
/// the pod subnets to their nodes with kernel routes, as BIRD on a router installs them.
fn routed_underlay(mtu_sized: bool) -> (Netns, Netns, Netns) {
    let a = Netns::new("bra");
    let r = Netns::new("brr");
    let b = Netns::new("brb");
    veth_pair(&a, "eth0", &r, "ra");
    veth_pair(&r, "rb", &b, "eth0");
    if mtu_sized {
        for (ns, dev) in [(&a, "eth0"), (&r, "ra"), (&r, "rb"), (&b, "eth0")] {
            mtu_wire(ns, dev);
        }
    }
    a.ip(&format!("addr add {ROUTED_A}/24 dev eth0"));
    b.ip(&format!("addr add {ROUTED_B}/24 dev eth0"));
    r.ip(&format!("addr add {ROUTER_A}/24 dev ra"));
    r.ip(&format!("addr add {ROUTER_B}/24 dev rb"));
    r.sysctl("net.ipv4.ip_forward", "1");
    a.ip(&format!("route add default via {ROUTER_A}"));
    b.ip(&format!("route add default via {ROUTER_B}"));
    r.ip(&format!("route add 10.244.1.0/24 via {ROUTED_A}"));
    r.ip(&format!("route add 10.244.2.0/24 via {ROUTED_B}"));
    (a, r, b)
}

/// weft's bgp mode through the router: `bgp` routes, next hop from weft's BGP table, where the
/// route to the other node's pods points at the router (as BIRD installs it).
fn weft_bgp(mtu_sized: bool, xdp: bool) -> Testbed {
    let (na, router, nb) = routed_underlay(mtu_sized);
    let a = WeftNode::new(na, ROUTED_A, "eth0", [2, 0x77, 0, 0, 0, 1], xdp);
    let b = WeftNode::new(nb, ROUTED_B, "eth0", [2, 0x77, 0, 0, 0, 2], xdp);
    let pa = a.add_pod(Ipv4Addr::new(10, 244, 1, 2), POD_MTU);
    let pb = b.add_pod(Ipv4Addr::new(10, 244, 2, 2), POD_MTU);
    for (node, subnet, peer, peer_mac, gw) in [
        (&a, "10.244.2.0/24", ROUTED_B, b.vtep_mac, ROUTER_A),
        (&b, "10.244.1.0/24", ROUTED_A, a.vtep_mac, ROUTER_B),
    ] {
        node.add_peer(subnet.parse().unwrap(), peer, peer_mac, RouteMode::Bgp);
        node.ns.ip(&format!(
            "route add {subnet} via {gw} dev eth0 table {} proto bird",
            weft_common::BGP_TABLE_DEFAULT
        ));
    }
    Testbed::Routed {
        _nodes: vec![Box::new(a), Box::new(b)],
        _router: router,
        pa,
        pb,
    }
}

/// The kernel's own routing through the same router: pods on veths routed by their node, the
/// other node's pod subnet via the router (what Calico's BGP mode programs), no eBPF.
fn kernel_routed(mtu_sized: bool) -> Testbed {
    let (na, router, nb) = routed_underlay(mtu_sized);
    let mut pods = Vec::new();
    for (node, subnet, peer_subnet, gw) in [(&na, 1, 2, ROUTER_A), (&nb, 2, 1, ROUTER_B)] {
        node.sysctl("net.ipv4.ip_forward", "1");
        let pod = Netns::new("bp");
        node.ip(&format!(
            "link add hv type veth peer name eth0 netns {}",
            pod.name
        ));
        node.ip(&format!("addr add 10.244.{subnet}.1/24 dev hv"));
        node.ip("link set hv up");
        pod.ip("link set eth0 up");
        let ip = Ipv4Addr::new(10, 244, subnet, 2);
        pod.ip(&format!("addr add {ip}/24 dev eth0"));
        pod.ip(&format!("route add default via 10.244.{subnet}.1"));
        node.ip(&format!("route add 10.244.{peer_subnet}.0/24 via {gw}"));
        pods.push(Pod {
            ns: pod,
            ip,
            host_ifname: "hv".into(),
        });
    }
    let pb = pods.pop().unwrap();
    let pa = pods.pop().unwrap();
    Testbed::Routed {
        _nodes: vec![Box::new(na), Box::new(nb)],
        _router: router,
        pa,
        pb,
    }
}

fn netns_cmd(ns: &str, args: &[&str]) -> Command {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", ns]).args(args);
    cmd
}

struct Server(Child);
impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn iperf3(bed: &Testbed, extra: &[&str]) -> Value {
    let (server_ns, server_ip) = bed.server();
    let _server = Server(
        netns_cmd(
            server_ns,
            &["iperf3", "-s", "-1", "-B", &server_ip.to_string()],
        )
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("starting iperf3 -s"),
    );
    std::thread::sleep(Duration::from_millis(300));
    let ip = server_ip.to_string();
    let mut args = vec!["iperf3", "-c", ip.as_str(), "-J"];
    args.extend_from_slice(extra);
    let out = netns_cmd(bed.client_ns(), &args)
        .output()
        .expect("running iperf3 -c");
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "iperf3 output is not JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

fn tcp_gbps(bed: &Testbed, s: &Settings) -> f64 {
    let secs = s.tcp_secs.to_string();
    (0..s.tcp_runs)
        .map(|_| {
            let v = iperf3(bed, &["-t", &secs]);
            v["end"]["sum_received"]["bits_per_second"]
                .as_f64()
                .unwrap_or(0.0)
                / 1e9
        })
        .fold(0.0, f64::max)
}

fn udp64_kpps(bed: &Testbed, s: &Settings) -> f64 {
    let secs = s.udp_secs.to_string();
    let v = iperf3(bed, &["-u", "-l", "64", "-b", "0", "-t", &secs]);
    let sum = &v["end"]["sum"];
    let packets = sum["packets"].as_f64().unwrap_or(0.0);
    let lost = sum["lost_packets"].as_f64().unwrap_or(0.0);
    let seconds = sum["seconds"].as_f64().unwrap_or(1.0).max(0.001);
    (packets - lost) / seconds / 1e3
}

fn rtt_us(bed: &Testbed, s: &Settings) -> (f64, f64) {
    let (_, server_ip) = bed.server();
    let out = netns_cmd(
        bed.client_ns(),
        &[
            "ping",
            "-c",
            &s.pings.to_string(),
            "-i",
            "0.002",
            "-W",
            "1",
            &server_ip.to_string(),
        ],
    )
    .output()
    .expect("running ping");
    let text = String::from_utf8_lossy(&out.stdout);
    let mut rtts: Vec<f64> = text
        .lines()
        .filter_map(|l| l.split("time=").nth(1))
        .filter_map(|t| t.split_whitespace().next()?.parse::<f64>().ok())
        .map(|ms| ms * 1000.0)
        .collect();
    if rtts.is_empty() {
        return (f64::NAN, f64::NAN);
    }
    rtts.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let pct = |p: f64| rtts[((rtts.len() as f64 - 1.0) * p).round() as usize];
    (pct(0.50), pct(0.99))
}

fn measure(bed: &Testbed, s: &Settings) -> Value {
    // Warm up neighbour entries and caches.
    let (_, ip) = bed.server();
    let _ = netns_cmd(
        bed.client_ns(),
        &["ping", "-c", "2", "-i", "0.2", "-W", "1", &ip.to_string()],
    )
    .output();
    let tcp = tcp_gbps(bed, s);
    let udp = udp64_kpps(bed, s);
    let (p50, p99) = rtt_us(bed, s);
    json!({"tcp_gbps": round(tcp, 3), "udp64_kpps": round(udp, 1), "rtt_p50_us": round(p50, 1), "rtt_p99_us": round(p99, 1)})
}

fn round(v: f64, digits: i32) -> f64 {
    let f = 10f64.powi(digits);
    (v * f).round() / f
}

/// Average kernel-reported run time of one program invocation over `calls` single runs.
/// (`repeat` > 1 would re-run on the already rewritten packet and measure another path.)
fn per_call_ns(calls: u64, mut run: impl FnMut() -> u64) -> f64 {
    let total: u64 = (0..calls).map(|_| run()).sum();
    total as f64 / calls as f64
}

fn prog_costs(s: &Settings) -> Value {
    let calls = s.prog_calls;
    with_node(move |node| {
        let idx = node.pod1_ifindex;
        let mut out = BTreeMap::new();
        let mut tc = |name: &str, frame: Vec<u8>, ifindex: u32, prog: &str, node: &mut Node| {
            let p = node.dp.tc_program(prog).unwrap();
            let ns = per_call_ns(calls, || run_tc(p, &frame, ifindex, 1).duration_ns);
            out.insert(name.to_string(), round(ns, 1));
        };
        let pod = |dst| tcp_frame(POD1_MAC, [0xee; 6], POD1_IP, dst, 40000, 80, &[0u8; 64]);
        tc(
            "from_pod_baseline_arp",
            raw_frame(POD1_MAC, [0xff; 6], 0x0806, &[0u8; 46]),
            idx,
            prog_names::FROM_POD,
            node,
        );
        tc(
            "from_pod_vxlan_encap",
            pod(REMOTE_VXLAN_IP),
            idx,
            prog_names::FROM_POD,
            node,
        );
        tc(
            "from_pod_ipip_encap",
            pod(REMOTE_IPIP_IP),
            idx,
            prog_names::FROM_POD,
            node,
        );
        tc(
            "from_pod_direct",
            pod(REMOTE_DIRECT_IP),
            idx,
            prog_names::FROM_POD,
            node,
        );
        tc(
            "from_pod_local_delivery",
            pod(POD2_IP),
            idx,
            prog_names::FROM_POD,
            node,
        );
        let inner = tcp_frame(
            PEER_VTEP_MAC,
            VTEP_MAC,
            REMOTE_VXLAN_IP,
            POD1_IP,
            80,
            40000,
            &[0u8; 64],
        );
        let nic = [2, 0, 0, 0, 0x50, 1];
        let mut delivered = inner.clone();
        delivered[0..6].copy_from_slice(&nic);
        tc(
            "from_underlay_delivery",
            delivered,
            0,
            prog_names::FROM_UNDERLAY,
            node,
        );
        let outer = Outer {
            src_mac: PEER_MAC,
            dst_mac: nic,
            src: PEER_IP,
            dst: NODE_IP,
        };
        let vx = vxlan_frame(&outer, 50000, VXLAN_PORT, VNI, &inner);
        tc(
            "from_underlay_tc_vxlan_decap",
            vx.clone(),
            0,
            prog_names::FROM_UNDERLAY,
            node,
        );
        let ipip = ipip_frame(PEER_MAC, nic, PEER_IP, NODE_IP, &inner);
        let arp = raw_frame(PEER_MAC, [0xff; 6], 0x0806, &[0u8; 46]);
        let xdp = node.dp.xdp_program().unwrap();
        for (name, frame) in [
            ("xdp_baseline_arp", &arp),
            ("xdp_vxlan_decap", &vx),
            ("xdp_ipip_decap", &ipip),
        ] {
            let ns = per_call_ns(calls, || run_xdp(xdp, frame, 1).duration_ns);
            out.insert(name.to_string(), round(ns, 1));
        }
        // Conntrack: `from_pod_local_delivery` above is the fast path with an entry hit (the
        // first call created it); here every call opens a new flow (a miss and an insert; past
        // the map's size, LRU eviction too).
        let frames: Vec<Vec<u8>> = (0..calls)
            .map(|i| {
                let (sport, dport) = (1024 + (i % 60_000) as u16, 80 + (i / 60_000) as u16);
                tcp_frame(
                    POD1_MAC, [0xee; 6], POD1_IP, POD2_IP, sport, dport, &[0u8; 64],
                )
            })
            .collect();
        let p = node.dp.tc_program(prog_names::FROM_POD).unwrap();
        let mut next = frames.iter();
        let ns = per_call_ns(calls, || {
            run_tc(p, next.next().unwrap(), idx, 1).duration_ns
        });
        out.insert("from_pod_ct_new_flow".into(), round(ns, 1));
        // A Service's backend answering: the stack delivered the request (to_pod records the
        // flow), so the reply is handed back to the stack (the stack's own cost not included).
        let request = tcp_frame(
            POD1_MAC, [0xee; 6], POD1_IP, POD2_IP, 50_000, 8080, &[0u8; 64],
        );
        let reply = tcp_frame(
            POD2_MAC, [0xee; 6], POD2_IP, POD1_IP, 8080, 50_000, &[0u8; 64],
        );
        let to_pod = node.dp.tc_program(prog_names::TO_POD).unwrap();
        let ns = per_call_ns(calls, || {
            run_tc(to_pod, &request, node.pod2_ifindex, 1).duration_ns
        });
        out.insert("to_pod_stack_flow".into(), round(ns, 1));
        let p = node.dp.tc_program(prog_names::FROM_POD).unwrap();
        let ns = per_call_ns(calls, || {
            run_tc(p, &reply, node.pod2_ifindex, 1).duration_ns
        });
        out.insert("from_pod_stack_flow".into(), round(ns, 1));
        serde_json::to_value(out).unwrap()
    })
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    // `--only a,b`: just these contestants (and no per-program costs), e.g. for repeated rounds.
    let only: Option<Vec<String>> = std::env::args()
        .skip_while(|a| a != "--only")
        .nth(1)
        .map(|v| v.split(',').map(str::to_string).collect());
    let s = if quick {
        Settings {
            tcp_secs: 2,
            tcp_runs: 1,
            udp_secs: 2,
            pings: 200,
            prog_calls: 5_000,
        }
    } else {
        Settings {
            tcp_secs: 5,
            tcp_runs: 3,
            udp_secs: 5,
            pings: 1000,
            prog_calls: 50_000,
        }
    };
    let mut report = serde_json::Map::new();
    for (key, mtu_sized) in [("datapath", true), ("datapath_veth", false)] {
        let mut section = serde_json::Map::new();
        let contestants: [(&str, BuildTestbed); 10] = [
            ("weft-vxlan-tc", |m| weft_with(RouteMode::Vxlan, m, false)),
            ("weft-hostgw-tc", |m| weft_with(RouteMode::Direct, m, false)),
            ("kernel-hostgw", kernel_host_gw),
            ("kernel-vxlan", flannel),
            ("weft-vxlan", |m| weft(RouteMode::Vxlan, m)),
            ("weft-ipip", |m| weft(RouteMode::Ipip, m)),
            ("weft-hostgw", |m| weft(RouteMode::Direct, m)),
            ("kernel-routed", kernel_routed),
            ("weft-bgp-tc", |m| weft_bgp(m, false)),
            ("weft-bgp", |m| weft_bgp(m, true)),
        ];
        for (name, build) in contestants {
            if only.as_ref().is_some_and(|o| !o.iter().any(|n| n == name)) {
                continue;
            }
            eprintln!("bench: {key} {name}");
            let bed = build(mtu_sized);
            section.insert(name.to_string(), measure(&bed, &s));
        }
        report.insert(key.to_string(), Value::Object(section));
    }
    if only.is_none() {
        eprintln!("bench: per-program cost");
        report.insert("prog_ns".into(), prog_costs(&s));
    }
    println!("{}", Value::Object(report));
}
