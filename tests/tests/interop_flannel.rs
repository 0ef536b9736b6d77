//! Differential interop with the kernel's own VXLAN, configured exactly as flannel's vxlan
//! backend configures a node (the kernel selftest `test_tc_tunnel` pattern): weft's
//! encapsulation is decapsulated by the kernel's device, and the kernel's encapsulation by
//! weft. Wire compatibility lets a cluster migrate from flannel node by node.
use std::{net::Ipv4Addr, time::Duration};

use weft_common::{RouteMode, Stat};
use weft_tests::{
    agentless::{FlannelNode, WeftNode, mtu_wire},
    flow::tcp_transfer,
    netns::{Netns, veth_pair},
};

const POD_MTU: u32 = 1450;
const TRANSFER: usize = 10 * 1024 * 1024;

#[test]
fn weft_and_flannel_vxlan_nodes_interoperate() {
    let ns_weft = Netns::new("nw");
    let ns_flannel = Netns::new("nf");
    veth_pair(&ns_weft, "eth0", &ns_flannel, "eth0");
    for ns in [&ns_weft, &ns_flannel] {
        mtu_wire(ns, "eth0");
    }
    ns_weft.ip("addr add 192.168.60.1/24 dev eth0");
    ns_flannel.ip("addr add 192.168.60.2/24 dev eth0");
    let weft_ip = Ipv4Addr::new(192, 168, 60, 1);
    let flannel_ip = Ipv4Addr::new(192, 168, 60, 2);

    let weft = WeftNode::new(
        ns_weft,
        weft_ip,
        "eth0",
        [0x02, 0x77, 0, 0, 0, 1],
        weft_agent::datapath::XdpSetting::On,
    );
    let weft_pod = weft.add_pod(Ipv4Addr::new(10, 244, 1, 2), POD_MTU);
    let flannel = FlannelNode::new(
        ns_flannel,
        flannel_ip,
        "eth0",
        "10.244.2.0/24".parse().unwrap(),
        POD_MTU,
    );

    weft.add_peer(
        flannel.subnet,
        flannel_ip,
        flannel.vtep_mac,
        RouteMode::Vxlan,
    );
    flannel.add_peer("10.244.1.0/24".parse().unwrap(), weft_ip, weft.vtep_mac);

    let flannel_pod = &flannel.pod;
    // ICMP both ways, including the largest unfragmented packet the pod MTU allows.
    let max_icmp = (POD_MTU - 28).to_string();
    for (from, to) in [(&weft_pod, flannel_pod.ip), (flannel_pod, weft_pod.ip)] {
        from.ns.exec(
            "ping",
            &["-c", "3", "-i", "0.2", "-W", "2", &to.to_string()],
        );
        from.ns.exec(
            "ping",
            &[
                "-c",
                "2",
                "-W",
                "2",
                "-M",
                "do",
                "-s",
                &max_icmp,
                &to.to_string(),
            ],
        );
    }

    // 10 MB of TCP each way, over MTU-sized frames on the wire.
    let t1 = tcp_transfer(
        &flannel_pod.ns,
        flannel_pod.ip,
        5001,
        &weft_pod.ns,
        TRANSFER,
        Duration::from_secs(30),
    );
    let t2 = tcp_transfer(
        &weft_pod.ns,
        weft_pod.ip,
        5002,
        &flannel_pod.ns,
        TRANSFER,
        Duration::from_secs(30),
    );
    eprintln!(
        "weft -> flannel: {} bytes in {:?} ({:.2} Gbit/s); flannel -> weft: {} bytes in {:?} ({:.2} Gbit/s)",
        t1.bytes,
        t1.elapsed,
        t1.bytes as f64 * 8.0 / t1.elapsed.as_secs_f64() / 1e9,
        t2.bytes,
        t2.elapsed,
        t2.bytes as f64 * 8.0 / t2.elapsed.as_secs_f64() / 1e9,
    );

    // The packets took weft's paths: encapsulated by from_pod, decapsulated by XDP, delivered
    // by tc; nothing dropped.
    let maps = weft.maps();
    let stat = |s| maps.stat_count(s).unwrap();
    eprintln!("weft counters: {:?}", maps.stats().unwrap());
    // from_pod sees GSO super-packets (up to 64 KB): 10 MB is at least 160 of them. XDP sees
    // wire frames: 10 MB in 1398-byte segments is about 7,500.
    assert!(
        stat(Stat::VxlanEncap) >= 160,
        "encapsulated {}",
        stat(Stat::VxlanEncap)
    );
    assert!(
        stat(Stat::XdpVxlanDecap) >= 7000,
        "decapsulated {}",
        stat(Stat::XdpVxlanDecap)
    );
    // GRO coalesces the decapsulated frames before tc delivers them.
    assert!(
        stat(Stat::UnderlayDelivered) >= 100,
        "delivered {}",
        stat(Stat::UnderlayDelivered)
    );
    assert_eq!(stat(Stat::TcDecap), 0, "XDP decapsulated everything");
    assert_eq!(weft.drops_total(), 0, "drops: {:?}", maps.drops().unwrap());
}
