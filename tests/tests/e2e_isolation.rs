//! End to end: nothing enters a pod with a source it does not own. Tunnel packets forged by a
//! pod or a node, and plain or encapsulated traffic from a host on the underlay that is not a
//! node, deliver nothing; each is dropped with its reason. Controls sent the same way with
//! sources that are owned do arrive, so "nothing arrived" means something.
use std::{net::SocketAddr, time::Duration};

use weft_common::DropReason;
use weft_tests::{
    cluster::{Cluster, ClusterOptions},
    inject::{UdpCounter, frame_send, ipip_send, udp_send},
    packets::{udp_frame, vxlan_header},
    process::wait_until,
};

const PORT: u16 = 9999;
const VXLAN_PORT: u16 = 8472;

fn vtep_mac(ip: std::net::Ipv4Addr) -> [u8; 6] {
    let o = ip.octets();
    [0x02, 0x57, o[0], o[1], o[2], o[3]]
}

/// A VXLAN payload (header and inner frame) carrying UDP from `src` to `dst:PORT`.
fn vxlan_payload(
    node: std::net::Ipv4Addr,
    src: std::net::Ipv4Addr,
    dst: std::net::Ipv4Addr,
) -> Vec<u8> {
    let inner = udp_frame(
        [0x02, 0x66, 0, 0, 0, 1],
        vtep_mac(node),
        src.octets(),
        dst.octets(),
        1234,
        PORT,
        b"forged",
    );
    let mut out = vxlan_header(1).to_vec();
    out.extend_from_slice(&inner);
    out
}

/// The IPv4 packet (no Ethernet) of UDP from `src` to `dst:PORT`.
fn ip_packet(src: std::net::Ipv4Addr, dst: std::net::Ipv4Addr) -> Vec<u8> {
    udp_frame(
        [0; 6],
        [0; 6],
        src.octets(),
        dst.octets(),
        1234,
        PORT,
        b"forged",
    )[14..]
        .to_vec()
}

fn drops(cluster: &Cluster, node: usize, reason: DropReason) -> u64 {
    cluster.nodes[node].maps().drop_count(reason).unwrap()
}

#[test]
fn forged_tunnel_packets_deliver_nothing() {
    let mut c = Cluster::new(ClusterOptions::default());
    let attacker = c.add_pod(0);
    let target = c.add_pod(1);
    let other = c.add_pod(2);
    let (n0, n1) = (c.nodes[0].ip, c.nodes[1].ip);
    let counter = UdpCounter::start(&c.nodes[1].pods[0].ns, target, PORT);
    let pod = &c.nodes[0].pods[0].ns;

    // A pod sends VXLAN to the target's node (its node's masquerade would make the outer
    // source a node's) and raw IPIP, with inner sources 8.8.8.8 and another node's pod.
    for inner_src in [std::net::Ipv4Addr::new(8, 8, 8, 8), other] {
        udp_send(
            pod,
            SocketAddr::from((n1, VXLAN_PORT)),
            vxlan_payload(n1, inner_src, target),
        );
        ipip_send(pod, n1, ip_packet(inner_src, target));
    }
    // Even to its own node, and with its own address inside.
    udp_send(
        pod,
        SocketAddr::from((n0, VXLAN_PORT)),
        vxlan_payload(n0, attacker, target),
    );
    wait_until(
        "node 0 to count 5 tunnel packets from its pod",
        Duration::from_secs(5),
        || drops(&c, 0, DropReason::TunnelFromPod) == 5,
    );

    // A node (root on it, or the masquerade of old) sends the same with its own outer
    // address: the receiving node checks the inner source against the sender's pod CIDR.
    let node0 = &c.nodes[0].ns;
    for inner_src in [std::net::Ipv4Addr::new(8, 8, 8, 8), other] {
        udp_send(
            node0,
            SocketAddr::from((n1, VXLAN_PORT)),
            vxlan_payload(n1, inner_src, target),
        );
        ipip_send(node0, n1, ip_packet(inner_src, target));
    }
    wait_until(
        "node 1 to drop 4 spoofed inner sources",
        Duration::from_secs(5),
        || drops(&c, 1, DropReason::TunnelInnerSourceSpoofed) == 4,
    );
    // Control: the same from node 0 with an inner source it owns (its pod) arrives.
    udp_send(
        node0,
        SocketAddr::from((n1, VXLAN_PORT)),
        vxlan_payload(n1, attacker, target),
    );
    ipip_send(node0, n1, ip_packet(attacker, target));
    wait_until(
        "the two owned packets to arrive",
        Duration::from_secs(5),
        || counter.count() == 2,
    );
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(counter.count(), 2, "only the controls arrived");
    c.assert_full_matrix();
}

#[test]
fn an_outside_host_reaches_no_pod() {
    let mut c = Cluster::new(ClusterOptions {
        nodes: 2,
        ..Default::default()
    });
    let local = c.add_pod(0);
    let remote = c.add_pod(1);
    let outside = c.add_outside_host();
    let (n0, n1) = (c.nodes[0].ip, c.nodes[1].ip);
    let local_count = UdpCounter::start(&c.nodes[0].pods[0].ns, local, PORT);
    let remote_count = UdpCounter::start(&c.nodes[1].pods[0].ns, remote, PORT);
    let n0_mac = c.nodes[0].ns.mac("eth0");
    let out_mac = outside.ns.mac("eth0");

    // Routed through node 0 as if it were the cluster's router: plain UDP to a pod on node 0
    // and to one on node 1.
    outside.ns.ip(&format!("route add 10.244.0.0/16 via {n0}"));
    for pod in [local, remote] {
        udp_send(
            &outside.ns,
            SocketAddr::from((pod, PORT)),
            b"plain".to_vec(),
        );
    }
    // The same as raw frames straight to node 0's MAC (what routing produces).
    for pod in [local, remote] {
        let frame = udp_frame(
            out_mac,
            n0_mac,
            outside.ip.octets(),
            pod.octets(),
            1,
            PORT,
            b"raw",
        );
        frame_send(&outside.ns, "eth0", frame);
    }
    // Encapsulated: VXLAN and IPIP to node 0, inner sources a node 1 pod and 8.8.8.8.
    for inner_src in [remote, std::net::Ipv4Addr::new(8, 8, 8, 8)] {
        udp_send(
            &outside.ns,
            SocketAddr::from((n0, VXLAN_PORT)),
            vxlan_payload(n0, inner_src, local),
        );
        ipip_send(&outside.ns, n0, ip_packet(inner_src, local));
    }
    wait_until(
        "node 0 to drop the outsider's packets",
        Duration::from_secs(5),
        || {
            drops(&c, 0, DropReason::PlainFromNonPeer) == 2
                && drops(&c, 0, DropReason::HostForeignSource) == 2
                && drops(&c, 0, DropReason::UnknownTunnelSource) == 4
        },
    );

    // Control: a frame sent the same way by node 1 (a peer, its own address and MAC) to the
    // pod on node 0 arrives.
    let n1_mac = c.nodes[1].ns.mac("eth0");
    let frame = udp_frame(
        n1_mac,
        n0_mac,
        n1.octets(),
        local.octets(),
        1,
        PORT,
        b"peer",
    );
    frame_send(&c.nodes[1].ns, "eth0", frame);
    wait_until("the peer's frame to arrive", Duration::from_secs(5), || {
        local_count.count() == 1
    });
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(local_count.count(), 1, "only the peer's frame arrived");
    assert_eq!(remote_count.count(), 0, "nothing reached the remote pod");
}
