//! Packet injection into the underlay programs: `xdp_underlay` (decapsulation before GRO),
//! `from_underlay` (tc decapsulation fallback and delivery into pods) and `from_vxlan` (what
//! the kernel's vxlan socket on `weft_vxlan` decapsulated).
use etherparse::{IpNumber, Ipv4Header, Ipv4Options, UdpHeader};
use weft_common::{CONFIG_F_VXLAN_DEV, DropReason, Stat, TunnelKey, prog_names};
use weft_tests::{
    injection_node::*,
    packets::*,
    testrun::{TestRunOutput, run_tc, run_tc_gso, run_xdp},
};

const XDP_DROP: i32 = 1;
const XDP_PASS: i32 = 2;
const TC_ACT_OK: i32 = 0;
const TC_ACT_SHOT: i32 = 2;
const TC_ACT_REDIRECT: i32 = 7;

const NIC_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x50, 0x01];
const UNKNOWN_NODE_IP: [u8; 4] = [192, 168, 50, 77];

fn xdp(node: &mut Node, frame: &[u8]) -> TestRunOutput {
    run_xdp(node.dp.xdp_program().unwrap(), frame, 1)
}

fn tc(node: &mut Node, frame: &[u8]) -> TestRunOutput {
    let prog = node.dp.tc_program(prog_names::FROM_UNDERLAY).unwrap();
    run_tc(prog, frame, 0, 1)
}

fn drops(node: &Node, r: DropReason) -> u64 {
    node.dp.maps.drop_count(r).unwrap()
}

fn stat(node: &Node, s: Stat) -> u64 {
    node.dp.maps.stat_count(s).unwrap()
}

/// A frame from a remote pod to local pod 1, as the remote VTEP sends it.
fn inner_to_pod1(payload: &[u8]) -> Vec<u8> {
    tcp_frame(
        PEER_VTEP_MAC,
        VTEP_MAC,
        REMOTE_VXLAN_IP,
        POD1_IP,
        80,
        40000,
        payload,
    )
}

fn vxlan_from(src: [u8; 4], dport: u16, vni: u32, inner: &[u8]) -> Vec<u8> {
    vxlan_frame(
        &Outer {
            src_mac: PEER_MAC,
            dst_mac: NIC_MAC,
            src,
            dst: NODE_IP,
        },
        51000,
        dport,
        vni,
        inner,
    )
}

/// What the stack receives after XDP decapsulation: the inner packet under the outer MACs.
/// (Without XDP's metadata in front, tc sees this as a plain frame from the peer.)
fn decapsulated(inner: &[u8]) -> Vec<u8> {
    let mut out = NIC_MAC.to_vec();
    out.extend_from_slice(&PEER_MAC);
    out.extend_from_slice(&[0x08, 0x00]);
    out.extend_from_slice(&inner[14..]);
    out
}

/// What XDP hands on after decapsulating a packet from `peer`: its metadata (which
/// BPF_PROG_TEST_RUN returns in front of the packet; the magic says whether the inner source
/// is one of the peer's pods or the peer itself), then the packet.
fn xdp_decapsulated(inner: &[u8], peer: [u8; 4]) -> Vec<u8> {
    let magic = if inner[26..30] == peer {
        weft_common::DECAP_META_MAGIC
    } else {
        weft_common::DECAP_META_MAGIC_POD
    };
    let mut out = magic.to_ne_bytes().to_vec();
    out.extend_from_slice(&peer);
    out.extend_from_slice(&decapsulated(inner));
    out
}

#[test]
fn xdp_decapsulates_vxlan_exactly() {
    with_node(|node| {
        let inner = inner_to_pod1(b"reply from a remote pod");
        let out = xdp(node, &vxlan_from(PEER_IP, VXLAN_PORT, VNI, &inner));
        assert_eq!(out.verdict, XDP_PASS);
        assert_eq!(out.data, xdp_decapsulated(&inner, PEER_IP));
        assert_eq!(stat(node, Stat::XdpVxlanDecap), 1);
    });
}

#[test]
fn xdp_decapsulates_ipip_exactly() {
    with_node(|node| {
        let inner = inner_to_pod1(b"ipip reply");
        let out = xdp(
            node,
            &ipip_frame(PEER_MAC, NIC_MAC, PEER_IP, NODE_IP, &inner),
        );
        assert_eq!(out.verdict, XDP_PASS);
        assert_eq!(out.data, xdp_decapsulated(&inner, PEER_IP));
        assert_eq!(stat(node, Stat::XdpIpipDecap), 1);
    });
}

#[test]
fn xdp_decapsulates_outer_headers_with_options() {
    with_node(|node| {
        let inner = inner_to_pod1(b"options");
        let mut l4 = UdpHeader {
            source_port: 51000,
            destination_port: VXLAN_PORT,
            length: (16 + inner.len()) as u16,
            checksum: 0,
        }
        .to_bytes()
        .to_vec();
        l4.extend_from_slice(&vxlan_header(VNI));
        l4.extend_from_slice(&inner);
        let mut ip = Ipv4Header::new(0, 64, IpNumber::UDP, PEER_IP, NODE_IP).unwrap();
        ip.options = Ipv4Options::try_from(&[1u8, 1, 1, 0][..]).unwrap();
        let frame = ipv4_frame(PEER_MAC, NIC_MAC, &ip, &l4);
        let out = xdp(node, &frame);
        assert_eq!(out.verdict, XDP_PASS);
        assert_eq!(out.data, xdp_decapsulated(&inner, PEER_IP));
    });
}

#[test]
fn xdp_leaves_what_is_not_its_tunnel_untouched() {
    with_node(|node| {
        let inner = inner_to_pod1(b"x");
        let wrong_port = vxlan_from(PEER_IP, 4789, VNI, &inner);
        let wrong_vni = vxlan_from(PEER_IP, VXLAN_PORT, 42, &inner);
        let foreign_dst = vxlan_frame(
            &Outer {
                src_mac: PEER_MAC,
                dst_mac: NIC_MAC,
                src: PEER_IP,
                dst: [192, 168, 50, 9],
            },
            1,
            VXLAN_PORT,
            VNI,
            &inner,
        );
        let plain_udp = udp_frame(PEER_MAC, NIC_MAC, PEER_IP, NODE_IP, 1234, 53, b"dns");
        let arp = raw_frame(PEER_MAC, [0xff; 6], 0x0806, &[0u8; 28]);
        let ipv6 = raw_frame(PEER_MAC, NIC_MAC, 0x86dd, &[0x60; 60]);
        let mut vlan_payload = vec![0x00, 0x07, 0x08, 0x00];
        vlan_payload.extend_from_slice(&vxlan_from(PEER_IP, VXLAN_PORT, VNI, &inner)[14..]);
        let vlan = raw_frame(PEER_MAC, NIC_MAC, 0x8100, &vlan_payload);
        // An outer fragment: reassembly is the stack's job.
        let mut frag = vxlan_from(PEER_IP, VXLAN_PORT, VNI, &inner);
        frag[20] = 0x20; // MF
        frag[24] = 0;
        frag[25] = 0;
        let check = Ipv4Header::from_slice(&frag[14..])
            .unwrap()
            .0
            .calc_header_checksum();
        frag[24..26].copy_from_slice(&check.to_be_bytes());
        for frame in [
            &wrong_port,
            &wrong_vni,
            &foreign_dst,
            &plain_udp,
            &arp,
            &ipv6,
            &vlan,
            &frag,
        ] {
            let out = xdp(node, frame);
            assert_eq!(out.verdict, XDP_PASS);
            assert_eq!(&out.data, frame, "passed untouched");
        }
        let total: u64 = node.dp.maps.drops().unwrap().iter().map(|(_, n)| n).sum();
        assert_eq!(total, 0);
        assert_eq!(stat(node, Stat::XdpVxlanDecap), 0);
    });
}

#[test]
fn xdp_drops_tunnel_packets_from_unknown_sources() {
    with_node(|node| {
        let inner = inner_to_pod1(b"injected");
        let vx = vxlan_from(UNKNOWN_NODE_IP, VXLAN_PORT, VNI, &inner);
        assert_eq!(xdp(node, &vx).verdict, XDP_DROP);
        let ipip = ipip_frame(PEER_MAC, NIC_MAC, UNKNOWN_NODE_IP, NODE_IP, &inner);
        assert_eq!(xdp(node, &ipip).verdict, XDP_DROP);
        assert_eq!(drops(node, DropReason::UnknownTunnelSource), 2);
        // The tc fallback applies the same rule.
        assert_eq!(tc(node, &vx).verdict, TC_ACT_SHOT);
        assert_eq!(drops(node, DropReason::UnknownTunnelSource), 3);
    });
}

#[test]
fn xdp_drops_malformed_tunnel_packets_with_reasons() {
    with_node(|node| {
        let inner = inner_to_pod1(b"payload");
        // VXLAN without the I flag.
        let mut no_flag = vxlan_from(PEER_IP, VXLAN_PORT, VNI, &inner);
        no_flag[42] = 0;
        assert_eq!(xdp(node, &no_flag).verdict, XDP_DROP);
        assert_eq!(drops(node, DropReason::MalformedTunnel), 1);
        // An inner ARP frame.
        let inner_arp = raw_frame(PEER_VTEP_MAC, [0xff; 6], 0x0806, &[0u8; 28]);
        assert_eq!(
            xdp(node, &vxlan_from(PEER_IP, VXLAN_PORT, VNI, &inner_arp)).verdict,
            XDP_DROP
        );
        assert_eq!(drops(node, DropReason::InnerNotIpv4), 1);
        // Consistent lengths, but the UDP payload is shorter than VXLAN + inner headers.
        let full = vxlan_from(PEER_IP, VXLAN_PORT, VNI, &inner);
        let mut expected = 2;
        for udp_payload in 0..(8 + 14 + 20) {
            let frame = vxlan_from(PEER_IP, VXLAN_PORT, VNI, &[]);
            let mut frame = frame[..42].to_vec();
            frame.extend_from_slice(&full[42..42 + udp_payload]);
            let mut ip = Ipv4Header::from_slice(&frame[14..]).unwrap().0;
            ip.total_len = (frame.len() - 14) as u16;
            ip.header_checksum = ip.calc_header_checksum();
            frame[14..34].copy_from_slice(&ip.to_bytes());
            frame[38..40].copy_from_slice(&((8 + udp_payload) as u16).to_be_bytes());
            let out = xdp(node, &frame);
            assert_eq!(out.verdict, XDP_DROP, "UDP payload of {udp_payload} bytes");
            expected += 1;
            let counted =
                drops(node, DropReason::MalformedTunnel) + drops(node, DropReason::InnerNotIpv4);
            assert_eq!(counted, expected, "UDP payload of {udp_payload} bytes");
        }
    });
}

#[test]
fn xdp_every_truncation_has_a_defined_verdict() {
    with_node(|node| {
        let frame = vxlan_from(PEER_IP, VXLAN_PORT, VNI, &inner_to_pod1(b"truncate me"));
        for len in 14..frame.len() {
            let before: u64 = node.dp.maps.drops().unwrap().iter().map(|(_, n)| n).sum();
            let out = xdp(node, &frame[..len]);
            // The outer total length now exceeds the frame: not a valid packet for this node,
            // so it is the stack's (which discards it); it must reach it untouched.
            assert_eq!(out.verdict, XDP_PASS, "truncated to {len}");
            assert_eq!(&out.data[..], &frame[..len], "truncated to {len}");
            let after: u64 = node.dp.maps.drops().unwrap().iter().map(|(_, n)| n).sum();
            assert_eq!(after, before);
        }
        assert_eq!(stat(node, Stat::XdpVxlanDecap), 0);
    });
}

#[test]
fn tc_decapsulates_and_delivers_when_xdp_is_absent() {
    with_node(|node| {
        let inner = inner_to_pod1(b"tc fallback");
        let out = tc(node, &vxlan_from(PEER_IP, VXLAN_PORT, VNI, &inner));
        assert_eq!(out.verdict, TC_ACT_REDIRECT);
        let mut expected = POD1_MAC.to_vec();
        expected.extend_from_slice(&node.pod1_host_mac);
        expected.extend_from_slice(&[0x08, 0x00]);
        expected.extend_from_slice(&forwarded_ip(&inner));
        assert_eq!(out.data, expected);
        assert_eq!(stat(node, Stat::TcDecap), 1);
        assert_eq!(stat(node, Stat::UnderlayDelivered), 1);

        let out = tc(
            node,
            &ipip_frame(PEER_MAC, NIC_MAC, PEER_IP, NODE_IP, &inner),
        );
        assert_eq!(out.verdict, TC_ACT_REDIRECT);
        assert_eq!(out.data, expected);
        assert_eq!(stat(node, Stat::TcDecap), 2);
    });
}

#[test]
fn tc_delivers_decapsulated_and_routed_packets_to_pods() {
    with_node(|node| {
        let inner = inner_to_pod1(b"after xdp");
        let after_xdp = decapsulated(&inner);
        let out = tc(node, &after_xdp);
        assert_eq!(out.verdict, TC_ACT_REDIRECT);
        assert_eq!(&out.data[0..6], &POD1_MAC);
        assert_eq!(&out.data[6..12], &node.pod1_host_mac);
        assert_eq!(&out.data[14..], &forwarded_ip(&after_xdp)[..]);
        // Packets for the node itself, or anything else, are the stack's.
        let to_node = tcp_frame(PEER_MAC, NIC_MAC, PEER_IP, NODE_IP, 1, 22, b"ssh");
        let out = tc(node, &to_node);
        assert_eq!(out.verdict, TC_ACT_OK);
        assert_eq!(out.data, to_node);
        let mut ttl1 = decapsulated(&inner_to_pod1(b""));
        ttl1[22] = 1;
        let out = tc(node, &ttl1);
        assert_eq!(out.verdict, TC_ACT_OK);
        assert_eq!(out.data, ttl1);
        let total: u64 = node.dp.maps.drops().unwrap().iter().map(|(_, n)| n).sum();
        assert_eq!(total, 0);
    });
}

#[test]
fn tc_every_truncation_has_a_defined_verdict() {
    with_node(|node| {
        let frame = vxlan_from(PEER_IP, VXLAN_PORT, VNI, &inner_to_pod1(b"truncate me"));
        for len in 34..frame.len() {
            let out = tc(node, &frame[..len]);
            assert_eq!(out.verdict, TC_ACT_OK, "truncated to {len}");
            assert_eq!(&out.data[..], &frame[..len], "truncated to {len}");
        }
        let total: u64 = node.dp.maps.drops().unwrap().iter().map(|(_, n)| n).sum();
        assert_eq!(total, 0);
    });
}

#[test]
fn ipip_malformed_input_has_defined_verdicts() {
    with_node(|node| {
        let inner = inner_to_pod1(b"ipip payload");
        let full = ipip_frame(PEER_MAC, NIC_MAC, PEER_IP, NODE_IP, &inner);
        // Every truncation of the wire frame: the outer total length no longer fits, so it is
        // not a packet for this node; it reaches the stack untouched.
        for len in 14..full.len() {
            let out = xdp(node, &full[..len]);
            assert_eq!(out.verdict, XDP_PASS, "truncated to {len}");
            assert_eq!(&out.data[..], &full[..len]);
        }
        // Consistent outer lengths but an inner packet shorter than an IPv4 header.
        for inner_len in 0..20 {
            let mut frame = full[..34].to_vec();
            frame.extend_from_slice(&inner[14..14 + inner_len]);
            let mut ip = Ipv4Header::from_slice(&frame[14..]).unwrap().0;
            ip.total_len = (frame.len() - 14) as u16;
            ip.header_checksum = ip.calc_header_checksum();
            frame[14..34].copy_from_slice(&ip.to_bytes());
            assert_eq!(
                xdp(node, &frame).verdict,
                XDP_DROP,
                "inner of {inner_len} bytes"
            );
        }
        assert_eq!(drops(node, DropReason::MalformedTunnel), 20);
        // Inner version 6 and inner IHL below 5.
        for (offset, value) in [(34usize, 0x65u8), (34, 0x44)] {
            let mut frame = full.clone();
            frame[offset] = value;
            assert_eq!(xdp(node, &frame).verdict, XDP_DROP);
        }
        assert_eq!(drops(node, DropReason::MalformedTunnel), 22);
        // The same through the tc fallback.
        let mut frame = full.clone();
        frame[34] = 0x65;
        assert_eq!(tc(node, &frame).verdict, TC_ACT_SHOT);
        assert_eq!(drops(node, DropReason::MalformedTunnel), 23);
        for len in 34..full.len() {
            let out = tc(node, &full[..len]);
            assert_eq!(out.verdict, TC_ACT_OK, "truncated to {len}");
            assert_eq!(&out.data[..], &full[..len]);
        }
        // An IPIP fragment is the stack's.
        let mut frag = full.clone();
        frag[20] = 0x20;
        let mut ip = Ipv4Header::from_slice(&frag[14..]).unwrap().0;
        ip.header_checksum = ip.calc_header_checksum();
        frag[14..34].copy_from_slice(&ip.to_bytes());
        let out = xdp(node, &frag);
        assert_eq!(out.verdict, XDP_PASS);
        assert_eq!(out.data, frag);
        assert_eq!(stat(node, Stat::XdpIpipDecap), 0);
    });
}

#[test]
fn node_traffic_to_pods_goes_through_the_host_stack() {
    with_node(|node| {
        // A remote node (not a pod) talking to a local pod without a tunnel (or after XDP
        // decapsulation): the stack delivers it (conntrack, firewall).
        let plain = tcp_frame(PEER_MAC, NIC_MAC, PEER_IP, POD1_IP, 10250, 40000, b"probe");
        let out = tc(node, &plain);
        assert_eq!(out.verdict, TC_ACT_OK);
        assert_eq!(out.data, plain);
        assert_eq!(stat(node, Stat::PassedToStack), 1);
        // The same decapsulated by tc: handed to the stack decapsulated.
        let from_node = tcp_frame(
            PEER_VTEP_MAC,
            VTEP_MAC,
            PEER_IP,
            POD1_IP,
            10250,
            40000,
            b"probe",
        );
        let out = tc(node, &vxlan_from(PEER_IP, VXLAN_PORT, VNI, &from_node));
        assert_eq!(out.verdict, TC_ACT_OK);
        assert_eq!(&out.data[14..], &from_node[14..]);
        assert_eq!(stat(node, Stat::TcDecap), 1);
        assert_eq!(stat(node, Stat::PassedToStack), 2);
        assert_eq!(stat(node, Stat::UnderlayDelivered), 0);
    });
}

/// A tunnel packet whose inner source the sending node does not own: dropped by XDP and by
/// the tc fallback, VXLAN and IPIP alike.
#[test]
fn decapsulation_checks_the_inner_source() {
    with_node(|node| {
        let inner_from =
            |src: [u8; 4]| tcp_frame(PEER_VTEP_MAC, VTEP_MAC, src, POD1_IP, 80, 40000, b"inner");
        let mut expected = 0;
        // 8.8.8.8, a pod of another node (PEER_NO_NEIGH_IP's), a pod address nobody has.
        for src in [[8, 8, 8, 8], REMOTE_NO_NEIGH_IP, [10, 244, 99, 1]] {
            let inner = inner_from(src);
            let vx = vxlan_from(PEER_IP, VXLAN_PORT, VNI, &inner);
            let ipip = ipip_frame(PEER_MAC, NIC_MAC, PEER_IP, NODE_IP, &inner);
            assert_eq!(xdp(node, &vx).verdict, XDP_DROP);
            assert_eq!(xdp(node, &ipip).verdict, XDP_DROP);
            assert_eq!(tc(node, &vx).verdict, TC_ACT_SHOT);
            assert_eq!(tc(node, &ipip).verdict, TC_ACT_SHOT);
            expected += 4;
            assert_eq!(drops(node, DropReason::TunnelInnerSourceSpoofed), expected);
        }
        // The peer's own pods (every route mode it has) and the peer itself are its own.
        for src in [REMOTE_VXLAN_IP, REMOTE_IPIP_IP, REMOTE_DIRECT_IP, PEER_IP] {
            let inner = inner_from(src);
            let out = xdp(node, &vxlan_from(PEER_IP, VXLAN_PORT, VNI, &inner));
            assert_eq!(out.verdict, XDP_PASS);
            assert_eq!(out.data, xdp_decapsulated(&inner, PEER_IP));
            let ipip = ipip_frame(PEER_MAC, NIC_MAC, PEER_IP, NODE_IP, &inner);
            assert_eq!(xdp(node, &ipip).verdict, XDP_PASS);
        }
        assert_eq!(drops(node, DropReason::TunnelInnerSourceSpoofed), expected);
    });
}

/// Plain (unencapsulated) frames into pods: only from on-link peers (or their pods), from
/// the peer's own MAC.
#[test]
fn plain_frames_reach_pods_only_from_onlink_peers() {
    with_node(|node| {
        let plain =
            |mac: [u8; 6], src: [u8; 4]| tcp_frame(mac, NIC_MAC, src, POD1_IP, 80, 40000, b"plain");
        // A peer's pod (host-gw), from the peer's MAC: delivered.
        let ok = plain(PEER_MAC, REMOTE_DIRECT_IP);
        let out = tc(node, &ok);
        assert_eq!(out.verdict, TC_ACT_REDIRECT);
        assert_eq!(&out.data[14..], &forwarded_ip(&ok)[..]);
        // An on-link peer whose neighbour entry is not known yet: nothing to compare, accepted.
        assert_eq!(
            tc(node, &plain([2, 0, 0, 0, 0x50, 3], REMOTE_NO_NEIGH_IP)).verdict,
            TC_ACT_REDIRECT
        );
        // The peer's address from another MAC, and its pod's.
        for src in [PEER_IP, REMOTE_DIRECT_IP] {
            assert_eq!(
                tc(node, &plain([2, 0, 0, 0, 0x50, 0x66], src)).verdict,
                TC_ACT_SHOT
            );
        }
        assert_eq!(drops(node, DropReason::PlainPeerMacMismatch), 2);
        // Not peers: a host on the underlay, the internet, an address in the cluster network
        // nobody has, the pod of a peer behind a router.
        for src in [
            [192, 168, 50, 200],
            [8, 8, 8, 8],
            [10, 244, 99, 1],
            REMOTE_OFFLINK_IP,
        ] {
            assert_eq!(
                tc(node, &plain(PEER_MAC, src)).verdict,
                TC_ACT_SHOT,
                "{src:?}"
            );
        }
        assert_eq!(drops(node, DropReason::PlainFromNonPeer), 4);
        // To the node itself, anyone may send (the stack and its firewall decide).
        let to_node = tcp_frame(
            [2, 0, 0, 0, 0x50, 0x66],
            NIC_MAC,
            [8, 8, 8, 8],
            NODE_IP,
            1,
            22,
            b"",
        );
        assert_eq!(tc(node, &to_node).verdict, TC_ACT_OK);

        // With routed access allowed by the operator, outsiders' traffic goes to the stack.
        let mut cfg = node.dp.maps.config().unwrap();
        cfg.flags |= weft_common::CONFIG_F_ACCEPT_ROUTED;
        node.dp.maps.set_config(&cfg).unwrap();
        let outsider = plain([2, 0, 0, 0, 0x50, 0xc8], [192, 168, 50, 200]);
        let out = tc(node, &outsider);
        assert_eq!(out.verdict, TC_ACT_OK);
        assert_eq!(out.data, outsider);
        assert_eq!(drops(node, DropReason::PlainFromNonPeer), 4);
        assert_eq!(stat(node, Stat::UnderlayDelivered), 2);
    });
}

/// `from_vxlan` on `frame` (the inner frame the kernel's vxlan socket decapsulated), with the
/// tunnel key `key` (sending node, VNI) supplied as the socket's metadata would be.
fn from_vxlan(node: &mut Node, frame: &[u8], key: Option<([u8; 4], u32)>) -> TestRunOutput {
    node.dp
        .set_trace_tunnel(key.map(|(peer, vni)| TunnelKey {
            peer,
            vni,
            valid: 1,
        }))
        .unwrap();
    let prog = node.dp.tc_program(prog_names::FROM_VXLAN).unwrap();
    run_tc(prog, frame, 0, 1)
}

fn total_drops(node: &Node) -> u64 {
    node.dp.maps.drops().unwrap().iter().map(|(_, n)| n).sum()
}

/// What the kernel's vxlan socket decapsulated on `weft_vxlan`: a pod of the sending node to a
/// local pod goes into the pod; the sending node itself, or anything for the node, goes to the
/// stack untouched.
#[test]
fn from_vxlan_delivers_what_the_socket_decapsulated() {
    with_node(|node| {
        let inner = inner_to_pod1(b"through weft_vxlan");
        let out = from_vxlan(node, &inner, Some((PEER_IP, VNI)));
        assert_eq!(out.verdict, TC_ACT_REDIRECT);
        let mut expected = POD1_MAC.to_vec();
        expected.extend_from_slice(&node.pod1_host_mac);
        expected.extend_from_slice(&[0x08, 0x00]);
        expected.extend_from_slice(&forwarded_ip(&inner));
        assert_eq!(out.data, expected);
        assert_eq!(stat(node, Stat::VxlanDeviceDecap), 1);
        assert_eq!(stat(node, Stat::UnderlayDelivered), 1);
        // The sending node itself to a pod (a probe): the stack's (its conntrack, firewall).
        let probe = tcp_frame(
            PEER_VTEP_MAC,
            VTEP_MAC,
            PEER_IP,
            POD1_IP,
            10250,
            40000,
            b"p",
        );
        let out = from_vxlan(node, &probe, Some((PEER_IP, VNI)));
        assert_eq!(out.verdict, TC_ACT_OK);
        assert_eq!(out.data, probe);
        assert_eq!(stat(node, Stat::PassedToStack), 1);
        // A pod of the sending node to this node: the stack's.
        let to_node = udp_frame(
            PEER_VTEP_MAC,
            VTEP_MAC,
            REMOTE_VXLAN_IP,
            NODE_IP,
            5000,
            53,
            b"q",
        );
        let out = from_vxlan(node, &to_node, Some((PEER_IP, VNI)));
        assert_eq!(out.verdict, TC_ACT_OK);
        assert_eq!(out.data, to_node);
        assert_eq!(stat(node, Stat::VxlanDeviceDecap), 3);
        assert_eq!(stat(node, Stat::UnderlayDelivered), 1);
        assert_eq!(total_drops(node), 0);
    });
}

/// Everything the socket decapsulates is checked here, whichever interface it came in on:
/// the sending node, the VNI, the inner frame and its source, each drop with its reason.
#[test]
fn from_vxlan_checks_what_the_socket_decapsulated() {
    with_node(|node| {
        let inner_from =
            |src: [u8; 4]| tcp_frame(PEER_VTEP_MAC, VTEP_MAC, src, POD1_IP, 80, 40000, b"inner");
        let good = inner_from(REMOTE_VXLAN_IP);
        // No tunnel metadata: not from the socket.
        let out = from_vxlan(node, &good, None);
        assert_eq!(out.verdict, TC_ACT_SHOT);
        assert_eq!(drops(node, DropReason::TunnelMetadataMissing), 1);
        // From a node nobody knows, whatever else is wrong.
        for vni in [VNI, VNI + 1] {
            let out = from_vxlan(node, &good, Some((UNKNOWN_NODE_IP, vni)));
            assert_eq!(out.verdict, TC_ACT_SHOT);
        }
        assert_eq!(drops(node, DropReason::UnknownTunnelSource), 2);
        // Another VNI.
        let out = from_vxlan(node, &good, Some((PEER_IP, VNI + 1)));
        assert_eq!(out.verdict, TC_ACT_SHOT);
        assert_eq!(drops(node, DropReason::VxlanVniMismatch), 1);
        // Inner sources the sending node does not own: 8.8.8.8, a pod of another node, a pod
        // address nobody has.
        for src in [[8, 8, 8, 8], REMOTE_NO_NEIGH_IP, [10, 244, 99, 1]] {
            let out = from_vxlan(node, &inner_from(src), Some((PEER_IP, VNI)));
            assert_eq!(out.verdict, TC_ACT_SHOT, "inner source {src:?}");
        }
        assert_eq!(drops(node, DropReason::TunnelInnerSourceSpoofed), 3);
        // The sending node's pods in every mode it has, and the node itself, are its own.
        for src in [REMOTE_VXLAN_IP, REMOTE_IPIP_IP, REMOTE_DIRECT_IP, PEER_IP] {
            let out = from_vxlan(node, &inner_from(src), Some((PEER_IP, VNI)));
            assert_ne!(out.verdict, TC_ACT_SHOT, "inner source {src:?}");
        }
        // Not IPv4 inside.
        let arp = raw_frame(PEER_VTEP_MAC, VTEP_MAC, 0x0806, &[0; 28]);
        let out = from_vxlan(node, &arp, Some((PEER_IP, VNI)));
        assert_eq!(out.verdict, TC_ACT_SHOT);
        assert_eq!(drops(node, DropReason::InnerNotIpv4), 1);
        // A malformed or truncated inner IPv4 header (test runs start at the full header).
        let mut bad_version = good.clone();
        bad_version[14] = 0x65;
        assert_eq!(
            from_vxlan(node, &bad_version, Some((PEER_IP, VNI))).verdict,
            TC_ACT_SHOT
        );
        for len in 34..good.len() {
            let out = from_vxlan(node, &good[..len], Some((PEER_IP, VNI)));
            assert_eq!(out.verdict, TC_ACT_SHOT, "truncated to {len}");
        }
        assert_eq!(
            drops(node, DropReason::MalformedTunnel),
            1 + (good.len() - 34) as u64
        );
        assert_eq!(stat(node, Stat::UnderlayDelivered), 3, "the three pods");
    });
}

/// With `weft_vxlan` (`CONFIG_F_VXLAN_DEV`), `from_underlay` checks VXLAN carrying TCP and
/// leaves it to the kernel's vxlan socket untouched (its GRO has aggregated it), as any GSO
/// packet; what fails the checks is dropped here already; other protocols and IPIP are still
/// decapsulated here.
#[test]
fn from_underlay_leaves_vxlan_to_weft_vxlan() {
    with_node(|node| {
        let mut cfg = node.dp.maps.config().unwrap();
        cfg.flags |= CONFIG_F_VXLAN_DEV;
        node.dp.maps.set_config(&cfg).unwrap();
        let inner = inner_to_pod1(b"to the socket");
        let vx = vxlan_from(PEER_IP, VXLAN_PORT, VNI, &inner);
        let out = tc(node, &vx);
        assert_eq!(out.verdict, TC_ACT_OK);
        assert_eq!(out.data, vx);
        assert_eq!(stat(node, Stat::TcDecap), 0);
        let spoofed = tcp_frame(PEER_VTEP_MAC, VTEP_MAC, [8, 8, 8, 8], POD1_IP, 80, 1, b"");
        let out = tc(node, &vxlan_from(PEER_IP, VXLAN_PORT, VNI, &spoofed));
        assert_eq!(out.verdict, TC_ACT_SHOT);
        assert_eq!(drops(node, DropReason::TunnelInnerSourceSpoofed), 1);
        let out = tc(
            node,
            &ipip_frame(PEER_MAC, NIC_MAC, PEER_IP, NODE_IP, &inner),
        );
        assert_eq!(out.verdict, TC_ACT_REDIRECT);
        assert_eq!(stat(node, Stat::TcDecap), 1);
        // UDP: decapsulated and delivered here; arriving GSO (segments of 1000 bytes): to the
        // socket, which alone sheds the tunnel GSO state.
        let udp = udp_frame(
            PEER_VTEP_MAC,
            VTEP_MAC,
            REMOTE_VXLAN_IP,
            POD1_IP,
            4000,
            53,
            &[7; 2100],
        );
        let vx = vxlan_from(PEER_IP, VXLAN_PORT, VNI, &udp);
        let out = tc(node, &vx);
        assert_eq!(out.verdict, TC_ACT_REDIRECT);
        assert_eq!(&out.data[14..], &forwarded_ip(&udp)[..]);
        assert_eq!(stat(node, Stat::TcDecap), 2);
        let prog = node.dp.tc_program(prog_names::FROM_UNDERLAY).unwrap();
        let out = run_tc_gso(prog, &vx, 0, 1000, 1);
        assert_eq!(out.verdict, TC_ACT_OK);
        assert_eq!(out.data, vx);
        assert_eq!(stat(node, Stat::TcDecap), 2);
    });
}
