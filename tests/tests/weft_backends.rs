//! Two weft nodes, every backend: pod to pod on one node and across nodes, node to remote pod
//! and pod to remote node, ICMP and TCP, with and without XDP; and a live switch of the backend
//! while a flow runs, with the loss counted.
use std::{net::Ipv4Addr, time::Duration};

use ipnet::Ipv4Net;
use weft_agent::datapath::XdpSetting;
use weft_common::{DecapHook, RouteMode, Stat};
use weft_tests::{
    agentless::{Pod, WeftNode, mtu_wire},
    flow::{FlowLoss, SequencedFlow, tcp_transfer, udp_echo_sizes},
    netns::{Netns, veth_pair},
};

const POD_MTU: u32 = 1450;

struct Cluster {
    a: WeftNode,
    b: WeftNode,
    a1: Pod,
    a2: Pod,
    b1: Pod,
}

fn xdp(with_xdp: bool) -> XdpSetting {
    if with_xdp {
        XdpSetting::On
    } else {
        XdpSetting::Off
    }
}

fn cluster(with_xdp: bool) -> Cluster {
    let ns_a = Netns::new("na");
    let ns_b = Netns::new("nb");
    veth_pair(&ns_a, "eth0", &ns_b, "eth0");
    mtu_wire(&ns_a, "eth0");
    mtu_wire(&ns_b, "eth0");
    ns_a.ip("addr add 192.168.70.1/24 dev eth0");
    ns_b.ip("addr add 192.168.70.2/24 dev eth0");
    let a = WeftNode::new(
        ns_a,
        Ipv4Addr::new(192, 168, 70, 1),
        "eth0",
        [2, 0x77, 0, 0, 0, 1],
        xdp(with_xdp),
    );
    let b = WeftNode::new(
        ns_b,
        Ipv4Addr::new(192, 168, 70, 2),
        "eth0",
        [2, 0x77, 0, 0, 0, 2],
        xdp(with_xdp),
    );
    let network: Ipv4Net = "10.244.0.0/16".parse().unwrap();
    a.route_cluster_network(network);
    b.route_cluster_network(network);
    let a1 = a.add_pod(Ipv4Addr::new(10, 244, 1, 2), POD_MTU);
    let a2 = a.add_pod(Ipv4Addr::new(10, 244, 1, 3), POD_MTU);
    let b1 = b.add_pod(Ipv4Addr::new(10, 244, 2, 2), POD_MTU);
    Cluster { a, b, a1, a2, b1 }
}

fn set_mode(c: &Cluster, mode: RouteMode) {
    c.a.add_peer("10.244.2.0/24".parse().unwrap(), c.b.ip, c.b.vtep_mac, mode);
    c.b.add_peer("10.244.1.0/24".parse().unwrap(), c.a.ip, c.a.vtep_mac, mode);
}

fn ping(from: &Netns, to: Ipv4Addr) {
    from.exec(
        "ping",
        &["-c", "2", "-i", "0.2", "-W", "2", &to.to_string()],
    );
}

fn connectivity(c: &Cluster, port: u16) {
    // Same node, across nodes, both directions.
    for (from, to) in [
        (&c.a1, &c.a2),
        (&c.a2, &c.a1),
        (&c.a1, &c.b1),
        (&c.b1, &c.a1),
    ] {
        ping(&from.ns, to.ip);
    }
    // Node to local pod, node to remote pod, pod to remote node.
    ping(&c.a.ns, c.a1.ip);
    ping(&c.a.ns, c.b1.ip);
    ping(&c.b.ns, c.a2.ip);
    ping(&c.b1.ns, c.a.ip);
    // Largest unfragmented ICMP across nodes.
    let max = (POD_MTU - 28).to_string();
    c.a1.ns.exec(
        "ping",
        &[
            "-c",
            "2",
            "-W",
            "2",
            "-M",
            "do",
            "-s",
            &max,
            &c.b1.ip.to_string(),
        ],
    );
    // TCP both ways across nodes and on one node.
    let t = Duration::from_secs(20);
    tcp_transfer(&c.b1.ns, c.b1.ip, port, &c.a1.ns, 4 << 20, t);
    tcp_transfer(&c.a1.ns, c.a1.ip, port + 1, &c.b1.ns, 4 << 20, t);
    tcp_transfer(&c.a2.ns, c.a2.ip, port + 2, &c.a1.ns, 4 << 20, t);
    // The node's own bulk traffic to a remote pod and back (hostNetwork pods, probes).
    tcp_transfer(&c.b1.ns, c.b1.ip, port + 3, &c.a.ns, 4 << 20, t);
    tcp_transfer(&c.b.ns, c.b.ip, port + 4, &c.a1.ns, 4 << 20, t);
    // Every datagram size from 1 to 9000 bytes across nodes: the MTU boundary and fragments.
    let retries = udp_echo_sizes(&c.a1.ns, &c.b1.ns, c.b1.ip, port + 5, 1..=9000);
    assert!(retries <= 5, "{retries} datagrams needed a retry");
    assert_eq!(
        c.a.drops_total(),
        0,
        "node A drops: {:?}",
        c.a.maps().drops().unwrap()
    );
    assert_eq!(
        c.b.drops_total(),
        0,
        "node B drops: {:?}",
        c.b.maps().drops().unwrap()
    );
}

fn stat(node: &WeftNode, s: Stat) -> u64 {
    node.maps().stat_count(s).unwrap()
}

#[test]
fn vxlan_backend_full_connectivity() {
    let c = cluster(true);
    set_mode(&c, RouteMode::Vxlan);
    connectivity(&c, 6001);
    assert!(stat(&c.a, Stat::VxlanEncap) > 0 && stat(&c.b, Stat::XdpVxlanDecap) > 0);
    assert!(stat(&c.a, Stat::LocalDelivered) > 0);
}

#[test]
fn ipip_backend_full_connectivity() {
    let c = cluster(true);
    set_mode(&c, RouteMode::Ipip);
    connectivity(&c, 6101);
    assert!(stat(&c.a, Stat::IpipEncap) > 0 && stat(&c.b, Stat::XdpIpipDecap) > 0);
    assert_eq!(stat(&c.a, Stat::VxlanEncap), 0);
}

#[test]
fn direct_backend_full_connectivity() {
    let c = cluster(true);
    set_mode(&c, RouteMode::Direct);
    connectivity(&c, 6201);
    assert!(stat(&c.a, Stat::DirectForward) > 0 && stat(&c.b, Stat::UnderlayDelivered) > 0);
    assert_eq!(
        stat(&c.a, Stat::VxlanEncap) + stat(&c.a, Stat::IpipEncap),
        0
    );
}

#[test]
fn tunnels_work_without_xdp_through_tc_decapsulation() {
    let c = cluster(false);
    set_mode(&c, RouteMode::Vxlan);
    connectivity(&c, 6301);
    set_mode(&c, RouteMode::Ipip);
    connectivity(&c, 6311);
    assert!(stat(&c.b, Stat::TcDecap) > 0);
    assert_eq!(
        stat(&c.b, Stat::XdpVxlanDecap) + stat(&c.b, Stat::XdpIpipDecap),
        0
    );
}

/// Switches the backend every 150 ms while a sequenced UDP flow runs between pods on the two
/// nodes; counts what did not arrive.
#[test]
fn live_backend_switch_loses_nothing() {
    let c = cluster(true);
    set_mode(&c, RouteMode::Vxlan);
    ping(&c.a1.ns, c.b1.ip);
    let flow = SequencedFlow::start(&c.a1.ns, &c.b1.ns, c.b1.ip, 7000);
    let modes = [
        RouteMode::Ipip,
        RouteMode::Direct,
        RouteMode::Vxlan,
        RouteMode::Direct,
        RouteMode::Ipip,
        RouteMode::Vxlan,
    ];
    for mode in modes {
        std::thread::sleep(Duration::from_millis(150));
        set_mode(&c, mode);
    }
    std::thread::sleep(Duration::from_millis(150));
    let FlowLoss {
        sent,
        lost,
        missing,
    } = flow.stop();
    eprintln!(
        "live backend switch: {} switches, {sent} packets sent, {lost} lost",
        modes.len()
    );
    assert!(sent > 1000, "the flow ran ({sent} packets)");
    assert_eq!(
        lost, 0,
        "packets lost during live backend switches: {missing:?}"
    );
    for s in [Stat::VxlanEncap, Stat::IpipEncap, Stat::DirectForward] {
        assert!(stat(&c.a, s) > 0, "{s:?} used");
    }
}

/// What a restarted agent does to the datapath: load the object again (adopting the pinned
/// maps) and switch every pinned link to the new programs.
fn restart_datapath(node: &WeftNode) -> usize {
    let root = node.pins.path.clone();
    let dev = node.underlay.clone();
    node.ns.run(move || {
        let mut dp = weft_agent::datapath::Datapath::load_pinned(&root).expect("reloading");
        dp.pin_programs().expect("pinning programs");
        dp.attach_underlay(&dev, weft_agent::datapath::XdpSetting::On)
            .expect("re-attaching the underlay");
        dp.attach_from_host(weft_common::HOST_PEER_DEV)
            .expect("re-attaching from_host");
        dp.reattach_pods().expect("re-attaching pods")
    })
}

/// Reloading the datapath while a flow runs: links are switched atomically, maps adopted.
#[test]
fn datapath_reload_during_a_flow_loses_nothing() {
    let c = cluster(true);
    set_mode(&c, RouteMode::Vxlan);
    ping(&c.a1.ns, c.b1.ip);
    let flow = SequencedFlow::start(&c.a1.ns, &c.b1.ns, c.b1.ip, 7001);
    for _ in 0..3 {
        std::thread::sleep(Duration::from_millis(150));
        assert_eq!(
            restart_datapath(&c.a),
            2,
            "both pod links of node A switched"
        );
        assert_eq!(restart_datapath(&c.b), 1, "the pod link of node B switched");
    }
    std::thread::sleep(Duration::from_millis(150));
    let FlowLoss {
        sent,
        lost,
        missing,
    } = flow.stop();
    eprintln!("datapath reloads during a flow: 6 reloads, {sent} packets sent, {lost} lost");
    assert!(sent > 1000);
    assert_eq!(lost, 0, "packets lost during reloads: {missing:?}");
    // The maps survived: routes and endpoints still there, traffic still flows.
    assert_eq!(c.a.maps().endpoints().unwrap().len(), 2);
    assert_eq!(c.a.maps().routes().unwrap().len(), 1);
    ping(&c.b1.ns, c.a2.ip);
}

/// `--xdp=auto` (the default) on a veth underlay decapsulates in tc, and says why; `on` attaches
/// XDP in the veth's driver; switching back to `auto` removes it again. The hook is recorded in
/// the config map, where `weft status` and the metrics read it.
#[test]
fn auto_decapsulates_in_tc_on_a_veth_underlay() {
    let ns_a = Netns::new("na");
    let ns_b = Netns::new("nb");
    veth_pair(&ns_a, "eth0", &ns_b, "eth0");
    ns_a.ip("addr add 192.168.71.1/24 dev eth0");
    let a = WeftNode::new(
        ns_a,
        Ipv4Addr::new(192, 168, 71, 1),
        "eth0",
        [2, 0x77, 0, 0, 0, 1],
        XdpSetting::Auto,
    );
    assert_eq!(a.decap, DecapHook::TcVeth);
    assert_eq!(a.decap.hook(), "tc");
    assert_eq!(
        DecapHook::of_flags(a.maps().config().unwrap().flags),
        DecapHook::TcVeth
    );
    assert!(!a.ns.ip("-d link show dev eth0").contains("xdp"));
    let switch = |setting: XdpSetting| {
        let root = a.pins.path.clone();
        a.ns.run(move || {
            let mut dp = weft_agent::datapath::Datapath::load_pinned(&root).unwrap();
            dp.attach_underlay("eth0", setting).unwrap()
        })
    };
    assert_eq!(switch(XdpSetting::On), DecapHook::XdpForced);
    let link = a.ns.ip("-d link show dev eth0");
    assert!(
        link.contains("xdp") && !link.contains("xdpgeneric"),
        "{link}"
    );
    assert_eq!(switch(XdpSetting::Auto), DecapHook::TcVeth);
    assert!(!a.ns.ip("-d link show dev eth0").contains("xdp"));
    assert_eq!(switch(XdpSetting::Off), DecapHook::TcOff);
    drop(ns_b);
}
